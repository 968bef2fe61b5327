"""The tuned study's protocol (hpcnoise.search_spaces, hpcnoise.tuning, ``hpcnoise study --tune``): trials
deterministic for a seed and spread over each space, the manifest written once, bad spaces and inputs as
one line, the declared selection rule blind to test metrics, reruns per budget, and (slow) a smoke-sized
study end to end that resumes after a stop."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from hpcnoise.config import config_from_dict
from hpcnoise.errors import EXIT_PREEMPTED, EXIT_USAGE, ConfigError
from hpcnoise.search_spaces import SEARCH_SPACES, check_space
from hpcnoise.tuning import (
    MANIFEST,
    TRIALS_FILE,
    default_rerun_seeds,
    plan,
    rerun_cells,
    select,
    trial_rows,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent
REGIMES = list(SEARCH_SPACES)
BUDGETS = {"equal": 1.0, "long": 2.0}


def manifest_at(root: Path, trials: int = 4, seed: int = 0, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(workloads=["mlp"], regimes=REGIMES, trials=trials, seed=seed, budgets=BUDGETS)
    args.update(changes)
    seeds = default_rerun_seeds(args["seed"])
    return write_manifest(
        root, args["workloads"], args["regimes"], args["trials"], args["seed"], args["budgets"], seeds, smoke=True
    )


# --- trials and manifest ---------------------------------------------------------------------------------
def test_manifest_is_written_once_and_byte_identical_for_a_seed(tmp_path: Path) -> None:
    first = manifest_at(tmp_path / "a")
    files = {name: (tmp_path / "a" / name).read_bytes() for name in (MANIFEST, TRIALS_FILE)}
    stamps = {name: (tmp_path / "a" / name).stat().st_mtime_ns for name in files}
    assert manifest_at(tmp_path / "a") == first  # found, not rewritten
    assert {name: (tmp_path / "a" / name).stat().st_mtime_ns for name in files} == stamps
    for name in files:
        (tmp_path / "a" / name).unlink()
    manifest_at(tmp_path / "a")
    assert {name: (tmp_path / "a" / name).read_bytes() for name in files} == files
    assert first["trials_sha256"] == hashlib.sha256(files[TRIALS_FILE]).hexdigest()
    lines = files[TRIALS_FILE].decode().splitlines()
    assert len(lines) == 3 * 4 and all(json.loads(line)["index"] == i for i, line in enumerate(lines))
    assert len({t["run_name"] for t in first["trials"]}) == 12
    other = plan(tmp_path / "b", ["mlp"], REGIMES, 4, 1, BUDGETS, default_rerun_seeds(1), smoke=True)[0]
    assert [t["point"] for t in other["trials"]] != [t["point"] for t in first["trials"]]


@pytest.mark.parametrize(
    "change",
    [dict(trials=5), dict(seed=3), dict(budgets={"equal": 1.0, "long": 3.0}), dict(workloads=["mlp", "cnn1d"])],
    ids=["trials", "seed", "long-factor", "workloads"],
)
def test_other_inputs_are_one_line(tmp_path: Path, change: dict[str, Any]) -> None:
    manifest_at(tmp_path)
    before = (tmp_path / MANIFEST).read_bytes()
    with pytest.raises(ConfigError, match="exists with other settings") as e:
        manifest_at(tmp_path, **change)
    assert "\n" not in str(e.value) and "start over" in str(e.value)
    assert (tmp_path / MANIFEST).read_bytes() == before


def test_trials_cover_each_space_and_its_marginals_are_uniform(tmp_path: Path) -> None:
    n = 64
    manifest, _ = plan(tmp_path, ["mlp"], REGIMES, n, 0, BUDGETS, default_rerun_seeds(0), smoke=True)
    for regime, space in SEARCH_SPACES.items():
        trials = [t for t in manifest["trials"] if t["regime"] == regime]
        assert len(trials) == n
        base = config_from_dict(trials[0]["config"])
        for i, (field, entry) in enumerate(space.items()):
            units = [t["point"][i] for t in trials]
            assert stats.kstest(units, "uniform").pvalue > 0.01, (regime, field)
            values = [t["values"][field] for t in trials]
            assert all(entry["low"] <= v <= entry["high"] for v in values), (regime, field)
            scale = math.log if entry["distribution"] == "log" else float
            width = scale(entry["high"]) - scale(entry["low"])
            assert (scale(min(values)) - scale(entry["low"])) / width < 0.05, (regime, field)
            assert (scale(entry["high"]) - scale(max(values))) / width < 0.05, (regime, field)
        for t in trials:  # the values reach the configs: lr a factor of the rule-derived rate
            cfg = config_from_dict(t["config"])
            assert math.isclose(
                cfg.lr, t["values"]["lr"] * config_from_dict(trials[0]["config"]).lr / trials[0]["values"]["lr"]
            )
            assert math.isclose(cfg.warmup_epochs, t["values"]["warmup_fraction"] * base.epochs)
            assert cfg.stop_blown_up and cfg.val_samples > 0 and cfg.seed == 0
            if "noise_fraction" in t["values"]:
                assert cfg.noise_fraction == t["values"]["noise_fraction"]
                assert cfg.noise_multiplier == t["values"]["noise_multiplier"]


# --- search spaces ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "space, words",
    [
        ({}, "is empty"),
        ({"lr": {"distribution": "uniform", "low": 0.5, "high": 0.5}}, "an empty range"),
        ({"lr": {"distribution": "uniform", "low": 2.0, "high": 1.0}}, "an inverted range"),
        ({"learning_rate": {"distribution": "log", "low": 0.1, "high": 1.0}}, "unknown field 'learning_rate'"),
        ({"model": {"distribution": "log", "low": 0.1, "high": 1.0}}, "unknown field 'model'"),
        ({"noise_multiplier": {"distribution": "log", "low": 0.0, "high": 2.0}}, "a log range needs low > 0"),
        ({"lr": {"distribution": "normal", "low": 0.1, "high": 1.0}}, "distribution must be one of log, uniform"),
    ],
    ids=["empty", "empty-range", "inverted", "unknown-field", "not-numeric", "log-low-0", "distribution"],
)
def test_bad_spaces_are_one_line(space: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_space("lb", space)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("search space 'lb'")


def test_the_spaces_are_valid_and_share_their_ranges() -> None:
    for regime, space in SEARCH_SPACES.items():
        check_space(regime, space)
        assert (
            space["lr"] == SEARCH_SPACES["sb"]["lr"]
            and space["warmup_fraction"] == SEARCH_SPACES["sb"]["warmup_fraction"]
        )
    assert SEARCH_SPACES["lb"]["lr"]["low"] <= 1 / math.sqrt(32)  # the linear-centred range holds the sqrt rate


# --- selection ---------------------------------------------------------------------------------------------
def hand_made() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Two regimes of four trials: (sb) a tie at 0.10 between trials 2 and 3 below a diverged trial 0;
    (lb) every finite trial worse than a blown-up one stopped at 0.15, trial 0 missing."""
    trials = [
        {"workload": "mlp", "regime": r, "trial": i, "run_name": f"{r}-{i}"} for r in ("sb", "lb") for i in range(4)
    ]
    manifest = {"workloads": ["mlp"], "regimes": ["sb", "lb"], "trials": trials}

    def row(regime: str, trial: int, state: str, error: float | None, blown: bool = False) -> dict[str, Any]:
        return dict(
            run_name=f"{regime}-{trial}",
            workload="mlp",
            regime=regime,
            trial=trial,
            state=state,
            final_val_error=error,
            blown_up=blown,
        )

    rows = [
        row("sb", 0, "diverged", None),
        row("sb", 1, "finished", 0.30),
        row("sb", 2, "finished", 0.10),
        row("sb", 3, "finished", 0.10),
        row("lb", 1, "finished", 0.40),
        row("lb", 2, "finished", 0.15, blown=True),
        row("lb", 3, "finished", 0.20),
    ]
    return manifest, rows


def test_select_follows_the_declared_rule() -> None:
    manifest, rows = hand_made()
    chosen = select(manifest, rows)
    assert {key: t["trial"] for key, t in chosen.items()} == {("mlp", "sb"): 2, ("mlp", "lb"): 2}
    everything_diverged = [{**r, "state": "diverged", "final_val_error": None} for r in rows]
    assert {k: t["trial"] for k, t in select(manifest, everything_diverged).items()} == {
        ("mlp", "sb"): 0,
        ("mlp", "lb"): 0,
    }
    nan = [{**r, "final_val_error": math.nan} if r["trial"] == 2 else r for r in rows]  # no finite metric: last
    assert {k: t["trial"] for k, t in select(manifest, nan).items()} == {("mlp", "sb"): 3, ("mlp", "lb"): 3}


def test_select_reads_no_test_metric() -> None:
    manifest, rows = hand_made()
    absurd = [
        {**r, "final_test_error": -1e9 * (r["trial"] + 1), "test_error": math.nan, "best_test_error": "x", "test": {}}
        for r in rows
    ]
    assert select(manifest, absurd) == select(manifest, rows)


# --- reruns ------------------------------------------------------------------------------------------------
def test_reruns_per_budget(tmp_path: Path) -> None:
    manifest = manifest_at(tmp_path)
    chosen = select(manifest, [])  # no rows: trial 0 of each
    equal = rerun_cells(manifest, chosen, "equal")
    assert (
        len(equal) == 3 * 5
        and {c.seed for c in equal} == set(manifest["rerun_seeds"])
        and 0 not in manifest["rerun_seeds"]
    )
    assert all(c.out_dir == str(tmp_path.absolute() / "reruns") and not c.stop_blown_up for c in equal)
    long = rerun_cells(manifest, chosen, "long")
    assert {c.regime for c in long} == {"lb", "diagf"} and len(long) == 2 * 5
    for cell in long:
        trial = config_from_dict(chosen[("mlp", cell.regime)]["config"])
        assert cell.epochs == 2 * trial.epochs and math.isclose(cell.warmup_epochs, 2 * trial.warmup_epochs)
        assert cell.lr_decay_epochs == tuple(2 * e for e in trial.lr_decay_epochs)
        assert cell.noise_fraction == trial.noise_fraction and cell.lr == trial.lr
    assert len({c.run_name for c in equal + long}) == 25
    broken = {**manifest, "budgets": {**manifest["budgets"], "long": {**manifest["budgets"]["long"], "factor": 0.5}}}
    with pytest.raises(ConfigError, match="must be >= 1"):
        rerun_cells(broken, chosen, "long")


def test_trial_rows_of_an_unrun_study(tmp_path: Path) -> None:
    manifest = manifest_at(tmp_path, trials=2)
    rows = trial_rows(tmp_path)
    assert [r["state"] for r in rows] == ["missing"] * 6
    assert set(rows[0]) == {"run_name", "workload", "regime", "trial", "state", "final_val_error", "blown_up"}
    assert [r["run_name"] for r in rows] == [t["run_name"] for t in manifest["trials"]]


# --- the command -------------------------------------------------------------------------------------------
def study(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hpcnoise.cli", "study", "--tune", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--trials", "0"], "--trials must be a positive integer, got 0"),
        (["--long-factor", "0.5"], "--long-factor must be a number >= 1"),
        (["--workloads", "resnet"], "unknown workload 'resnet'"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--threads", "2"], "use 1 thread each"),
        (["--grid"], "not allowed with argument --tune"),
    ],
    ids=["trials-0", "k-below-1", "unknown-workload", "seed", "threads", "grid"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, argv: list[str], words: str) -> None:
    proc = study(*argv, "--smoke", "--out", str(tmp_path / "tune"))
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr.startswith("hpcnoise study: error: ") and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "tune").exists()


@pytest.mark.slow
def test_a_smoke_study_runs_end_to_end_and_resumes_after_a_stop(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    argv = [sys.executable, "-m", "hpcnoise.cli", "study", "--tune", "--smoke", "--trials", "2", "--workloads", "mlp"]
    argv += ["--out", str(out)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )
    try:
        end = time.time() + 120
        while not list(out.glob("trials/*/summary.json")):  # one trial finished, others under way
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < end, "no trial finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("hpcnoise study: stopped after a checkpoint"), err[-3000:]
    kept = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/summary.json")}
    fixed = {name: (out / name).read_bytes() for name in (MANIFEST, TRIALS_FILE)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in fixed} == fixed  # the trials never change
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished trials are kept, not rerun
    assert len(list(out.glob("trials/*/summary.json"))) + len(list(out.glob("trials/*/diverged.json"))) == 6
    selected = json.loads((out / "selected.json").read_text())
    assert set(selected["mlp"]) == {"sb", "lb", "diagf"}
    reruns = [p.parent for p in out.glob("reruns/*/config.json")]
    assert len(reruns) == 3 * 5 + 2 * 5
    assert (out / "report" / "report.md").exists()


@pytest.fixture(scope="module")
def smoke_settings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke tuned study (MLP, 2 trials) whose tuned_settings.json the quick study reruns."""
    out = tmp_path_factory.mktemp("tuned") / "tune"
    argv = [sys.executable, "-m", "hpcnoise.cli", "study", "--tune", "--smoke", "--trials", "2", "--workloads", "mlp"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_study_reruns_the_tuned_settings_and_says_so(tmp_path: Path, smoke_settings: Path) -> None:
    settings = json.loads((smoke_settings / "tuned_settings.json").read_text())
    assert settings["provenance"]["command"].endswith("--workloads mlp --smoke")
    assert settings["provenance"]["selection"] == json.loads((smoke_settings / MANIFEST).read_text())["selection"]
    picked = {(t["regime"], t["trial"]) for t in settings["manifest"]["trials"]}
    record = json.loads((smoke_settings / "selected.json").read_text())["mlp"]
    assert picked == {(r, e["trial"]) for r, e in record.items()}
    assert all(0 <= t["val_accuracy"] <= 100 for t in settings["manifest"]["trials"])
    out = tmp_path / "quick"
    argv = [sys.executable, "-m", "hpcnoise.cli", "study", "--settings", str(smoke_settings / "tuned_settings.json")]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the tuned settings (hpcnoise study --tune" in done.stdout
    names = sorted(p.parent.name for p in out.glob("reruns/*/summary.json"))
    assert len(names) == 3 * 5 + 1 * 5  # every regime at equal epochs, LB+GBN also at the long budget
    for name in names:  # the tuned study's own reruns of these seeds: the same runs, the same numbers
        ours = json.loads((out / "reruns" / name / "summary.json").read_text())
        theirs = json.loads((smoke_settings / "reruns" / name / "summary.json").read_text())
        assert ours["final_test_error"] == theirs["final_test_error"], name
    report = (out / "report" / "report.md").read_text()
    assert "The settings were tuned elsewhere, not in this study" in report
    assert "settings tuned elsewhere" in report.splitlines()[2]
    again = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "already finished" in again.stdout  # rerunning continues: nothing left


def test_quick_study_without_its_settings_is_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "hpcnoise.cli", "study", "--settings", str(tmp_path / "none.json")]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().startswith("hpcnoise study: error: no tuned settings at ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "q").exists()


@pytest.mark.slow
def test_tuned_presets_are_the_selected_settings(smoke_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcnoise import presets

    monkeypatch.setattr(presets, "TUNED_SETTINGS", smoke_settings / "tuned_settings.json")
    for t in json.loads((smoke_settings / "tuned_settings.json").read_text())["manifest"]["trials"]:
        cfg = presets.tuned_preset(t["workload"], t["regime"], smoke=True)
        chosen = t["config"]
        assert (cfg.lr, cfg.noise_multiplier, cfg.noise_fraction) == (
            chosen["lr"],
            chosen["noise_multiplier"],
            chosen["noise_fraction"],
        )
        assert cfg.warmup_epochs == pytest.approx(chosen["warmup_epochs"])  # smoke: the same epochs
        assert not cfg.stop_blown_up and cfg.val_samples > 0
    assert presets.tuned_preset_name("mlp", "diagf") == "tuned-mlp-diagf-gbn"


def test_a_manifest_written_before_a_config_field_existed_is_still_found(tmp_path: Path) -> None:
    """A study started by an earlier version (its trial configs lack a field added since, e.g.
    channels_last) continues: the same settings, with the new field at its default, are the same study."""
    manifest_at(tmp_path, trials=2)
    path = tmp_path / MANIFEST
    old = json.loads(path.read_text())
    for t in old["trials"]:
        del t["config"]["channels_last"]
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    assert manifest_at(tmp_path, trials=2) == old  # found, kept as written
    with pytest.raises(ConfigError, match="exists with other settings"):
        manifest_at(tmp_path, trials=3)


def test_quick_study_refuses_a_broken_settings_file_and_a_paper_study_root(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "hpcnoise-tuned-settings/1", "manifest": {}}))
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "study.sweep.jsonl").write_text("")
    cases = [
        (["--settings", str(broken), "--out", str(tmp_path / "q")], "is not a tuned-settings file"),
        (["--out", str(paper)], "holds the paper's study (hpcnoise study --paper); give another --out"),
    ]
    for argv, words in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "hpcnoise.cli", "study", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert proc.returncode == EXIT_USAGE and words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "q").exists() and sorted(p.name for p in paper.iterdir()) == ["study.sweep.jsonl"]
