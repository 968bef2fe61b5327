"""Bad input at every entry point: exit status 2, one line on stderr naming the argument, nothing written.

Each case runs one ``hpcnoise`` subcommand as a subprocess in a fresh working directory that holds the
files the cases point at (a plain file, an empty directory, a sweep file, broken run directories, raw
files and a prepared file of the wrong format). The whole tree is compared before and after, so a case
that creates its ``--out``/``--out_dir`` directory, a data cache (``HPCNOISE_DATA`` points inside it)
or any stray file fails. Most cases answer before torch loads; those that need torch (about 2 s each
on 2 cores) still fail before any data is generated or any model is trained, and are kept few: their
neighbours are covered in process elsewhere (tests/test_data.py: missing prepared files and raw files;
tests/test_analysis.py: report inputs; tests/test_slurm.py: sweep files; tests/test_train.py: BAD_INPUT).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpcnoise.config import RANGES, Config, check_values
from hpcnoise.errors import ConfigError

TRAIN = ("train", "--smoke", "--out_dir=runs", "--progress=false")  # the default preset, seconds-long variant
DRY = ("--dry-run",)

# (id, argv after `hpcnoise`, a substring of the one stderr line: the argument and what is valid)
TRAIN_CASES = [
    ("negative-lambda", [*TRAIN, "--noise_multiplier=-0.5"], "noise_multiplier must be >= 0, got -0.5"),
    ("min-buckets", [*TRAIN, "--min_buckets=0"], "min_buckets must be a positive integer, got 0"),
    (
        "unknown-calibration",
        [*TRAIN, "--noise_calibration=magic"],
        "noise_calibration must be one of paper, temperature",
    ),
    (
        "temperature-no-rule",
        [*TRAIN, "--noise_calibration=temperature", "--lr_scaling=none"],
        "lr_scaling must be linear or sqrt, got 'none'",
    ),
    ("temperature-no-noise", [*TRAIN, "--noise_calibration=temperature", "--regime=lb"], "needs a noise regime"),
    ("momentum-above-1", [*TRAIN, "--momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
    ("bn-momentum-0", [*TRAIN, "--bn_momentum=0"], "bn_momentum must be in (0, 1], got 0.0"),
    ("lr-decay-factor", [*TRAIN, "--lr_decay_factor=1.5"], "lr_decay_factor must be in (0, 1], got 1.5"),
    ("weight-decay", [*TRAIN, "--weight_decay=-1e-4"], "weight_decay must be >= 0, got -0.0001"),
    ("ghost-size-0", [*TRAIN, "--ghost_size=0"], "ghost_size must be a positive integer, got 0"),
    ("sharpness-samples", [*TRAIN, "--sharpness_samples=0"], "sharpness_samples must be a positive integer, got 0"),
    ("threads", [*TRAIN, "--threads=-2"], "threads must be >= 0, got -2"),
    ("seed", [*TRAIN, "--seed=-1"], "seed must be >= 0, got -1"),
    ("lr-nan", [*TRAIN, "--lr=nan"], "field 'lr' expects float, got 'nan'"),
    ("bool", [*TRAIN, "--ghost_bn=maybe"], "field 'ghost_bn' expects bool, got 'maybe'"),
    ("int-list", [*TRAIN, "--lr_decay_epochs=2,x"], "field 'lr_decay_epochs' expects comma-separated list of int"),
    ("decay-epoch", [*TRAIN, "--lr_decay_epochs=-1"], "lr_decay_epochs must be epochs >= 0"),
    ("small-above-large", [*TRAIN, "--small_batch=1024"], "small_batch (1024) must not exceed batch_size (512)"),
    ("run-name-path", [*TRAIN, "--run_name=a/b"], "run_name must be a plain directory name (no '/'), got 'a/b'"),
    ("smoke-value", ["train", "--smoke=yes"], "argument --smoke: ignored explicit argument 'yes'"),
    ("preset", ["train", "nosuchpreset"], "unknown preset 'nosuchpreset'; valid: mnist1d-"),
    ("positional", ["train", "mnist1d-sb", "extra", "--smoke"], "override 'extra' is not of the form --key=value"),
    # these need torch (registries, the device), and still fail before data or a model
    ("no-gpu", [*TRAIN, "--device=cuda"], "device 'cuda' is not available on this machine (no CUDA GPU); valid"),
    (
        "model-vs-dataset",
        [*TRAIN, "--model=resnet44", "--dataset=mnist1d"],
        "model 'resnet44' does not fit dataset 'mnist1d' (inputs (40,): resnet44 needs (channels, height, width) "
        "images of at least 1 pixels, got (40,)); models for mnist1d: cnn1d, mlp, mnist_mlp",
    ),
    (
        "data-wrong-format",
        [*TRAIN, "--dataset=cifar10", "--model=mlp", "--data_root=prepared"],
        "prepared data file prepared/cifar10-train.pt is unreadable",
    ),
    ("data-root-file", [*TRAIN, "--data_root=afile"], "data_root 'afile' is not a directory"),
    ("dtype", [*TRAIN, "--dtype=half"], "dtype must be one of float32, float64, bf16, got 'half'"),
    (
        "channels-last-mlp",
        [*TRAIN, "--channels_last=true"],
        "channels_last applies to 2-D convolutional networks; 'mlp' on 'mnist1d' has none (valid here: none",
    ),
]

SWEEP_CASES = [
    ("write-table", ["sweep", "write", "nosuch", "--out", "x.jsonl"], "unknown table 'nosuch'; valid: mnist1d,"),
    ("write-no-out", ["sweep", "write", "mnist1d"], "the following arguments are required: --out"),
    ("write-under-file", ["sweep", "write", "mnist1d", "--out", "afile/x.jsonl"], "cannot write 'afile/x.jsonl'"),
    ("write-onto-dir", ["sweep", "write", "mnist1d", "--out", "adir"], "cannot write 'adir': Is a directory"),
    ("run-not-json", ["sweep", "run", "notjson.jsonl", "--index", "0"], "'notjson.jsonl' line 1 is not JSON"),
    (
        "run-override",
        ["sweep", "run", "cells.jsonl", "--index", "0", "--momentum=1.5"],
        "momentum must be in [0, 1), got 1.5",
    ),
    ("submit-table", ["sweep", "submit", "nosuch", *DRY], "unknown table 'nosuch'"),
    ("submit-parallel", ["sweep", "submit", "mnist1d", *DRY, "--max-parallel=-1"], "--max-parallel must be >= 0"),
    (
        "submit-script",
        ["sweep", "submit", "mnist1d", *DRY, "--script=nope.sbatch"],
        "batch script 'nope.sbatch' not found",
    ),
    ("submit-override", ["sweep", "submit", "mnist1d", *DRY, "--lr=fast"], "field 'lr' expects float, got 'fast'"),
]

# `hpcnoise sweep status` cases go here once that command exists (same form: id, argv, substring).
SWEEP_STATUS_CASES: list[tuple[str, list[str], str]] = [
    ("status-missing", ["sweep", "status", "nothere"], "nothere"),
    ("status-notjson", ["sweep", "status", "notjson.jsonl"], "'notjson.jsonl' line 1 is not JSON"),
    ("status-empty-dir", ["sweep", "status", "adir"], "adir"),
    (
        "submit-range",
        ["sweep", "submit", "mnist1d", "--dry-run", "--momentum=2"],
        "momentum must be in [0, 1), got 2.0",
    ),
]

OTHER_CASES = [
    # bench step
    ("bench-dtypes", ["bench", "step", "--dtypes", "float32,fp8"], "--dtypes: unknown number format 'fp8'; valid"),
    # study
    ("study-np", ["study", "--np", "0"], "--np must be >= 1, and 1 with --launcher=none (got --np 0)"),
    ("study-np-none", ["study", "--launcher", "none", "--np", "2"], "and 1 with --launcher=none (got --np 2)"),
    ("study-launcher", ["study", "--launcher", "slurm"], "argument --launcher: invalid choice: 'slurm'"),
    ("study-threads", ["study", "--paper", "--threads", "-1"], "--threads must be >= 0"),
    (
        "study-quick-threads",
        ["study", "--threads", "2"],
        "the tuned settings' runs use 1 thread each (got --threads 2)",
    ),
    ("study-settings-paper", ["study", "--paper", "--settings", "x.json"], "--settings of the quick default"),
    ("study-out", ["study", "--out", "afile/study"], "cannot write to --out"),
    # report
    (
        "study-np-batch",
        ["study", "--paper", "--np", "3"],
        "--np 3: small_batch=128 is not divisible by the world size 3",
    ),
    ("report-empty", ["report", "adir"], "no run directories (directories with config.json) under adir"),
    # sharpness
    ("sharpness-missing", ["sharpness", "missing"], "run directory 'missing' does not exist"),
    ("sharpness-file", ["sharpness", "afile"], "run directory 'afile' is not a directory"),
    ("sharpness-not-run", ["sharpness", "adir"], "'adir': not a run directory, no config.json"),
    ("sharpness-config", ["sharpness", "badconfig"], "'badconfig/config.json' does not hold a valid config"),
    ("sharpness-model", ["sharpness", "badmodel"], "'badmodel/model.pt' is not a model file written by torch.save"),
    ("sharpness-samples", ["sharpness", "badmodel", "--samples", "0"], "--samples must be positive, got 0"),
    ("sharpness-method", ["sharpness", "badmodel", "--method", "x"], "argument --method: invalid choice: 'x'"),
    # data prepare
    (
        "prepare-name",
        ["data", "prepare", "svhn", "--root", "root"],
        "unknown dataset 'svhn'; valid: mnist, fashion_mnist, cifar10, cifar100",
    ),
    ("prepare-no-name", ["data", "prepare"], "the following arguments are required: name"),
    ("prepare-root", ["data", "prepare", "mnist", "--root", "afile/sub"], "cannot write to --root afile/sub"),
    (
        "prepare-bad-raw",
        ["data", "prepare", "mnist", "--root", "raw", "--no-download"],
        "cannot read the raw mnist files in raw",
    ),
    # benchmarks
    ("bench-fisher-batch", ["bench", "fisher", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (
        "bench-fisher-layers-models",
        ["bench", "fisher", "--layers", "--models", "mlp"],
        "--models mlp: with --layers, valid: cnn1d, lenet5, resnet44, vgg16_bn",
    ),
    ("bench-fisher-layers-conv", ["bench", "fisher", "--layers", "--conv"], "--conv is exclusive with --models and"),
    ("bench-data-batches", ["bench", "data", "--batches", "a,b"], "argument --batches: expected comma-separated"),
    ("bench-train-models", ["bench", "train", "--models", "foo"], "--models: unknown model 'foo'; valid: all, mlp"),
    ("bench-train-out", ["bench", "train", "--out", "afile/runs"], "cannot keep the runs in --out afile/runs: "),
    (
        "bench-train-bandwidth",
        ["bench", "train", "--intra-bandwidth", "0"],
        "--intra-bandwidth must be a finite number > 0, got 0",
    ),
    ("bench-step-models", ["bench", "step", "--models", "foo"], "--models: unknown model 'foo'; valid: all, mlp"),
    ("bench-step-rounds", ["bench", "step", "--rounds", "0"], "--rounds must be a positive integer, got 0"),
    ("bench-step-batch", ["bench", "step", "--batch", "0"], "--batch must be a positive integer, got 0"),
    ("bench-step-profile", ["bench", "step", "--profile", "-1"], "--profile must be >= 0 (0: no profile), got -1"),
    ("bench-step-no-gpu", ["bench", "step", "--device", "cuda"], "device 'cuda' is not available on this machine"),
    (
        "bench-step-bucket-mb",
        ["bench", "step", "--bucket-mb", "1,1"],
        "--bucket-mb must be distinct sizes > 0 in MiB, comma-separated, got '1,1'",
    ),
    ("bench-scaling-min-buckets", ["bench", "scaling", "--min-buckets", "0"], "--min-buckets must be a positive"),
    ("bench-which", ["bench", "nope"], "hpcnoise bench needs one of: fisher, data, train"),
    # toy
    ("toy-chains", ["toy", "--chains", "1"], "--chains must be an integer >= 2 (got 1)"),
    ("toy-chains-int", ["toy", "--chains", "many"], "argument --chains: invalid int value: 'many'"),
    ("toy-chains-max", ["toy", "--chains", "99999999"], "--chains must be an integer from 2 to 1000000"),
    ("toy-out", ["toy", "--out", "afile"], "cannot write to afile: "),
    # presets and the command itself
    ("presets", ["presets", "--bogus"], "unrecognized arguments: --bogus"),
    ("command", ["frobnicate"], "unknown command 'frobnicate'; valid: study, train,"),
]

CASES = [
    *((f"train-{i}", a, m) for i, a, m in TRAIN_CASES),
    *((f"sweep-{i}", a, m) for i, a, m in SWEEP_CASES + SWEEP_STATUS_CASES),
    *OTHER_CASES,
]


def workspace(root: Path) -> None:
    """The files the cases point at."""
    (root / "afile").write_text("a plain file\n")
    (root / "adir").mkdir()
    (root / "cells.jsonl").write_text(json.dumps({"index": 0, "config": {"seed": 0}}) + "\n")
    (root / "notjson.jsonl").write_text("not json\n")
    # finished-looking run directories whose config.json or model.pt is not what train() writes
    for name, config, model in (("badconfig", "{not json", b"PK"), ("badmodel", '{"config": {}}', b"not a zip")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
        (root / name / "summary.json").write_text("{}")
        (root / name / "model.pt").write_bytes(model)
    # MNIST raw files present (so torchvision reads them) but not in the IDX format
    raw = root / "raw" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"not an IDX file")
    (root / "prepared").mkdir()  # a prepared split that is not an hpcnoise-images-v1 file
    (root / "prepared" / "cifar10-train.pt").write_text("not a torch file")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root, with a digest of each file's bytes ("dir" for directories)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def child_env(root: Path) -> dict[str, str]:
    """The environment of one plain process: no launcher, no GPU, a data cache inside the workspace."""
    launcher = ("OMPI_", "PMI", "PMIX_", "HOROVOD_", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(HPCNOISE_DATA=str(root / "cache"), CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.parametrize("argv,message", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_bad_input(tmp_path: Path, argv: list[str], message: str) -> None:
    workspace(tmp_path)
    before = snapshot(tmp_path)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hpcnoise.cli", *argv],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr
    assert message in lines[0], lines[0]
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before  # nothing written: no --out/--out_dir, no cache, no stray file
    assert took < 60, f"bad input took {took:.1f} s to be refused"


def test_case_ids_are_unique() -> None:
    ids = [i for i, _, _ in CASES]
    assert len(ids) == len(set(ids))


# --- the one table of numeric ranges (hpcnoise.config.RANGES), in process --------------------------------
def test_every_numeric_field_has_a_range() -> None:
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    numeric = {name for name, hint in hints.items() if hint in ("int", "float", int, float)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_range_bounds(key: str) -> None:
    """Each bound is checked as declared: the bound itself is in or out, a step beyond it is out."""
    low, high, low_open, high_open = RANGES[key]
    step = 1 if isinstance(getattr(Config(), key), int) else 0.5
    checks: list[tuple[Any, bool]] = []
    if low is not None:
        checks += [(low, not low_open), (low - step, False)]
    if high is not None:
        checks += [(high, not high_open), (high + step, False)]
    for value, ok in checks:
        cfg = dataclasses.replace(Config(), **{key: value})
        if key == "batch_size":  # keep the small batch within the large one
            cfg = dataclasses.replace(cfg, small_batch=1)
        if ok:
            check_values(cfg)
        else:
            with pytest.raises(ConfigError, match=f"^{key} must be "):
                check_values(cfg)


def test_sharpness_methods_match_the_measurement() -> None:
    """`hpcnoise sharpness` lists the methods without importing torch; they must be the measurement's."""
    from hpcnoise.cli import sharpness
    from hpcnoise.measure.sharpness import METHODS

    assert sharpness.METHODS == METHODS


def test_model_fit_check_agrees_with_the_builders() -> None:
    """``validate`` decides "model fits dataset" on the meta device; the real builders must agree, pair by pair."""
    from hpcnoise.data import DATASETS
    from hpcnoise.models import MODELS, build_model
    from hpcnoise.workload import dataset_shape, model_problem

    for dataset in DATASETS:
        in_shape, classes = dataset_shape(dataset)
        for model in MODELS:
            try:
                build_model(model, in_shape, classes)
                builds = True
            except (ValueError, TypeError):
                builds = False
            assert (model_problem(model, dataset) is None) == builds, (model, dataset)
