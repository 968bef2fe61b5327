"""Distributed semantics under the REAL launchers (horovodrun and mpirun, 2 ranks on CPU).

The acceptance test of the suite: with the same seed, 1 worker x 256 and 2 workers x 128 see the same
global batch, so they must produce the same diag F, the same noise and the same parameters after
several steps (to float tolerance: only the order of the sums differs). Within one run, the replicas
must stay bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.configs import overrides, small_config
from tests.helpers.launch import HELPERS, run_launched
from tests.helpers.regimes import ALTERNATE

pytestmark = pytest.mark.slow  # every test starts ranks under horovodrun or mpirun

WORKER = str(HELPERS / "dist_worker.py")


def run_worker(launcher: str, np: int, out: Path, **changes: object) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = small_config(out_dir=str(out / "runs"), run_name="r", **changes)
    proc = run_launched(launcher, np, [WORKER, str(out), *overrides(cfg)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(np)]


def assert_close_lists(
    a: list[torch.Tensor] | None, b: list[torch.Tensor] | None, what: str, rtol: float, atol: float, scaled: float = 0
) -> None:
    """Elementwise within rtol and atol; ``scaled`` > 0 instead bounds each tensor's largest difference
    by ``scaled`` times its largest entry (bf16: small entries carry few digits of their own)."""
    assert (a is None) == (b is None), what
    if a is None or b is None:
        return
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if scaled:
            err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
            assert err <= scaled, f"{what}[{i}]: largest difference {err:.2e} of the largest entry (> {scaled})"
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def assert_same_trajectory(one: dict, two: dict, tol: dict) -> None:
    assert len(one["steps"]) == len(two["steps"]) > 0
    for s1, s2 in zip(one["steps"], two["steps"]):
        assert_close_lists(s1["diag_fisher"], s2["diag_fisher"], "diag F", **tol)
        assert_close_lists(s1["grads"], s2["grads"], "g_LB", **tol)
        assert_close_lists(s1["noise"], s2["noise"], "noise", **tol)
        assert s1["state"].keys() == s2["state"].keys()
        assert_close_lists(list(s1["state"].values()), list(s2["state"].values()), "state", **tol)


# 5 steps: 1280 training samples at a global batch of 256, one epoch.
FIVE_STEPS = dict(train_samples=1280, epochs=1, batch_size=256, small_batch=64)


# Tolerances per dtype. In float32 a conv layer followed by batch norm has weight gradients that are
# small differences of large terms, so the order of the sums (one worker vs two) alone moves them by
# up to ~1e-3 relative; the CNN is therefore compared in float64, where only true differences show.
TOLERANCE = {
    "float32": dict(rtol=1e-4, atol=1e-6),
    "float64": dict(rtol=1e-9, atol=1e-12),
    "bf16": dict(rtol=0, atol=0, scaled=2e-2),
}


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
@pytest.mark.parametrize("model,dtype", [("mlp", "float32"), ("mlp", "float64"), ("cnn1d", "float64")])
def test_world_size_invariance(tmp_path: Path, launcher: str, model: str, dtype: str) -> None:
    cfg = dict(FIVE_STEPS, model=model, dtype=dtype, regime="diagf", ghost_bn=True, ghost_size=64)
    one = run_worker("none", 1, tmp_path / "w1", **cfg)[0]
    two = run_worker(launcher, 2, tmp_path / "w2", **cfg)
    assert len(one["steps"]) == 5
    assert_same_trajectory(one, two[0], TOLERANCE[dtype])
    # The noise is real: non-zero and of the size s * sqrt(diag F) predicts.
    f = torch.cat([t.flatten() for t in one["steps"][0]["diag_fisher"]])
    z = torch.cat([t.flatten() for t in one["steps"][0]["noise"]])
    assert f.min() >= 0 and f.max() > 0
    s = small_config(**cfg).noise_scale
    ratio = (z**2).sum() / (s**2 * f.sum())  # E ||z||^2 = s^2 Tr diag F
    assert 0.8 < ratio.item() < 1.2


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_world_size_invariance_bf16(tmp_path: Path, model: str) -> None:
    """bf16 (float32 weights, bf16 autocast): W = 1 against W = 2 at the first step.

    The hooks square the same bf16 activations and output gradients in float32 on one worker or two, so
    diag F and the noise drawn from it agree as in float32. The gradient does not: under autocast each
    worker's weight gradient is a bf16 matrix product over its own samples, rounded to 8 bits (relative
    2^-9) before the sum over workers, so W = 1 and W = 2 differ by up to about 2 x 2^-9 of a tensor's
    largest entry, as in any bf16 Horovod loop. Later steps move apart further (a weight one float32 ulp
    apart can round to another bf16 value), so they are compared only for the shape of the run."""
    cfg = dict(FIVE_STEPS, model=model, dtype="bf16", regime="diagf", ghost_bn=True, ghost_size=64)
    one = run_worker("none", 1, tmp_path / "w1", **cfg)[0]
    two = run_worker("horovodrun", 2, tmp_path / "w2", **cfg)
    first1, first2 = one["steps"][0], two[0]["steps"][0]
    assert_close_lists(first2["diag_fisher"], first1["diag_fisher"], "diag F", 0, 0, scaled=1e-5)
    assert_close_lists(first2["noise"], first1["noise"], "noise", 0, 0, scaled=1e-5)
    assert_close_lists(first2["grads"], first1["grads"], "g_LB", 0, 0, scaled=8e-3)
    assert len(one["steps"]) == len(two[0]["steps"]) == 5
    for step in one["steps"] + two[0]["steps"]:
        assert all(t.dtype == torch.float32 for key in ("diag_fisher", "grads", "noise") for t in step[key])


REGIME_CASES = {
    "sb": dict(regime="sb"),
    "lb": dict(regime="lb"),
    "trace": dict(regime="trace"),
    "multiplicative": dict(regime="multiplicative"),
    "fullf": dict(regime="fullf"),
    "kfac": dict(regime="kfac", kfac_every=2),
    "diagf-every-2": dict(regime="diagf", fisher_every=2),
    "batchchange": dict(regime="batchchange", epochs=2, batchchange_epochs=1),
    # registered by the test helpers alone (tests.helpers.regimes): a new regime is one registry entry
    ALTERNATE: dict(regime=ALTERNATE),
}


@pytest.mark.parametrize("case", list(REGIME_CASES))
def test_world_size_invariance_every_regime(tmp_path: Path, case: str) -> None:
    """1 x 256 and 2 x 128 (horovodrun) agree for every regime (the CNN: conv, batch norm, linear)."""
    cfg = dict(FIVE_STEPS, model="cnn1d", dtype="float64", ghost_bn=True, ghost_size=32, **REGIME_CASES[case])
    one = run_worker("none", 1, tmp_path / "w1", **cfg)[0]
    two = run_worker("horovodrun", 2, tmp_path / "w2", **cfg)
    # K-FAC takes matrix square roots of factors that are singular (the softmax output gradients sum to
    # zero), and sqrt is not Lipschitz at a zero eigenvalue: rounding-level differences of the factors
    # become ~1e-9 absolute differences of the noise.
    tol = dict(rtol=1e-6, atol=1e-7) if case == "kfac" else TOLERANCE["float64"]
    assert_same_trajectory(one, two[0], tol)
    noisy = [s["noise"] for s in one["steps"] if s["noise"] is not None]
    assert bool(noisy) == (case not in ("sb", "lb", "batchchange"))
    if case == ALTERNATE:  # its noise is on at even steps only
        on = [any(bool(z.any()) for z in s["noise"]) for s in one["steps"]]
        assert on == [step % 2 == 0 for step in range(len(on))], on
    for s0, s1 in zip(two[0]["steps"], two[1]["steps"]):  # replicas bit-identical
        for key in s0["state"]:
            assert torch.equal(s0["state"][key], s1["state"][key]), key


# SB without ghost batch norm: 10 steps of 128 samples, precise BN (2 batches) before the evaluation.
SB_STEPS = dict(train_samples=1280, epochs=1, regime="sb", small_batch=128, ghost_bn=False, precise_bn_batches=2)


@pytest.mark.parametrize("model,dtype", [("mlp", "float32"), ("cnn1d", "float64")])
def test_small_batch_is_world_size_invariant(tmp_path: Path, model: str, dtype: str) -> None:
    """SB's batch norm normalises the global batch of 128 (``sync_bn``), so 1 x 128 and 2 x 64 under
    horovodrun take the same steps and evaluate alike (precise BN included); local batch norm would
    normalise 64 samples per rank, and visibly differs."""
    cfg = dict(SB_STEPS, model=model, dtype=dtype)
    one = run_worker("none", 1, tmp_path / "w1", **cfg)[0]
    two = run_worker("horovodrun", 2, tmp_path / "w2", **cfg)
    assert len(one["steps"]) == 10
    assert_same_trajectory(one, two[0], TOLERANCE[dtype])
    for key in ("final_test_error", "final_test_loss"):
        assert two[0]["summary"][key] == pytest.approx(one["summary"][key], rel=1e-4), key
    for s0, s1 in zip(two[0]["steps"], two[1]["steps"]):
        for key in s0["state"]:
            assert torch.equal(s0["state"][key], s1["state"][key]), key
    if dtype == "float64":  # the control: each rank's own 64 samples
        local = run_worker("horovodrun", 2, tmp_path / "local", **cfg, sync_bn=False)[0]
        g1, g2 = one["steps"][-1]["grads"], local["steps"][-1]["grads"]
        assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g1, g2)) > 1e-3


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_ranks_bit_identical(tmp_path: Path, launcher: str) -> None:
    ranks = run_worker(launcher, 2, tmp_path, **FIVE_STEPS, regime="diagf", ghost_bn=True, ghost_size=64)
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        for key in s0["state"]:
            assert torch.equal(s0["state"][key], s1["state"][key]), key
        for a, b in zip(s0["noise"], s1["noise"]):
            assert torch.equal(a, b)
    for key in ("final_test_error", "final_test_loss", "final_train_loss"):
        assert ranks[0]["summary"][key] == ranks[1]["summary"][key], key


def test_cli_under_horovodrun_writes_run_directory(tmp_path: Path) -> None:
    proc = run_launched(
        "horovodrun",
        2,
        ["-m", "hpcnoise.cli", "train", "mnist1d-diagf-gbn", "--smoke", f"--out_dir={tmp_path}", "--run_name=r"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "r"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "model.pt", "summary.json"]
    import json

    record = json.loads((run / "config.json").read_text())
    # horovodrun starts ranks through mpirun when Horovod has MPI (as here), through Gloo otherwise.
    assert record["world_size"] == 2 and record["launcher"] in ("mpirun", "horovodrun")
    assert record["versions"]["horovod"] == "0.28.1"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == record["config"]["epochs"]


def test_batch_not_divisible_by_world_size(tmp_path: Path) -> None:
    proc = run_launched(
        "mpirun", 2, ["-m", "hpcnoise.cli", "train", "--smoke", "--batch_size=511", f"--out_dir={tmp_path}"]
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcnoise: error:")]
    assert len(errors) == 1, proc.stderr
    assert "batch_size=511" in errors[0] and "world size 2" in errors[0]
    assert not any(tmp_path.iterdir())


# One smoke preset per network and per regime of Tables 1-3 (all 68 presets take ~20 minutes on 2
# cores; `python tests/helpers/smoke_worker.py OUT` under horovodrun runs them all).
SMOKE_PRESETS = [
    "table1-mnist-mnist_mlp-diagf-gbn",
    "table1-mnist-lenet5-trace-gbn",
    "table1-fashion_mnist-lenet5-lb-gbn",
    "table1-cifar10-alexnet-diagf-gbn",
    "table1-cifar10-vgg16_bn-sb",
    "table2-cifar10-resnet44-kfac-gbn",
    "table2-cifar10-resnet44-batchchange",
    "table2-cifar100-vgg16_bn-multiplicative-gbn",
    "table3-cifar100-resnet44x2-diagf-gbn",
]


def test_table_preset_smoke_under_horovodrun(tmp_path: Path) -> None:
    """Smoke variants of Table 1-3 presets (every network, every regime) train under horovodrun -np 2."""
    import json

    worker = str(HELPERS / "smoke_worker.py")
    proc = run_launched("horovodrun", 2, [worker, str(tmp_path), *SMOKE_PRESETS], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}-smoke" for n in SMOKE_PRESETS)
    for run in tmp_path.iterdir():
        summary = json.loads((run / "summary.json").read_text())
        record = json.loads((run / "config.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] > 0, run.name
        assert record["config"]["synthetic_data"] is True


def test_horovod_timeline_is_written_into_the_run_directory(tmp_path: Path) -> None:
    """``--horovod_timeline=true`` under horovodrun: Horovod's timeline of the run's named collectives
    (the gradient buckets, the rest of the step's sums) lands in RUN_DIR/horovod_timeline.json."""
    args = ["-m", "hpcnoise.cli", "train", "mnist1d-diagf-gbn", "--smoke", f"--out_dir={tmp_path}", "--run_name=r"]
    proc = run_launched("horovodrun", 2, [*args, "--horovod_timeline=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timeline = (tmp_path / "r" / "horovod_timeline.json").read_text()
    assert timeline.lstrip().startswith("[")  # chrome://tracing's array of events
    for name in ("hpcnoise.bucket0", "hpcnoise.rest"):
        assert name in timeline, name


def test_bench_step_under_horovodrun(tmp_path: Path) -> None:
    """``hpcnoise bench step`` times every variant under the real launcher and marks the targets."""
    import pandas as pd

    csv = tmp_path / "step.csv"
    args = ["-m", "hpcnoise.cli", "bench", "step", "--models", "cnn1d", "--batch", "64", "--steps", "1"]
    proc = run_launched(
        "horovodrun", 2, [*args, "--rounds", "1", "--threads", "1", "--csv", str(csv), "--profile", "3"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 worker(s)" in proc.stdout
    # --profile: where the step's time goes, by the step's own labels
    for variant in ("lb", "diagf exact", "diagf spatial"):
        assert f"profile of {variant!r}" in proc.stdout, variant
    for label in ("hpcnoise.curvature.Conv1d", "hpcnoise.curvature.GhostBatchNorm", "hpcnoise.normals"):
        assert label in proc.stdout, label
    table = pd.read_csv(csv).set_index("variant")
    variants = ["horovod", "lb", "lb fused", "diagf exact", "diagf spatial", "plain nn.BN", "backpack"]
    floors = ["diagf exact floor", "diagf spatial floor"]  # each diag-F variant's floor: lb plus its one extra pass
    assert sorted(table.index) == sorted(variants + floors)
    assert (table["samples/s"] > 0).all()
    assert table.loc["diagf exact", "curvature ms"] == table.loc["diagf exact", "curvature ms"]  # not NaN
    assert "[cnn1d float32] lb throughput >= 1.0x horovod:" in proc.stdout
    assert "[cnn1d float32] diagf exact step <= 1.7x lb:" in proc.stdout
    assert "its floor" in proc.stdout  # each diag-F target line names its variant's floor
    assert "[cnn1d float32] diagf exact over lb <= BackPACK" in proc.stdout
