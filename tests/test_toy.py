"""Tests of the 2-D quadratic toy: closed forms, Theorem 3.1 by Monte-Carlo, the pictures' data, files, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpcnoise import toy
from hpcnoise.cli import toy as toy_cli
from hpcnoise.toy import Noise
from hpcnoise.toy import runner as toy_runner

CFG = toy.ToyConfig()
A = CFG.matrix
THETA0 = np.array(CFG.theta0)
LAMBDA_MIN, LAMBDA_MAX = 4.0 - math.sqrt(13.0), 4.0 + math.sqrt(13.0)  # eigenvalues of [[2, 3], [3, 6]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = (toy.FIG1_NAME, toy.FIG2_NAME, toy.THEOREM_NAME, toy.JSON_NAME)


def _random_spd(d: int, seed: int) -> np.ndarray:
    """A random SPD matrix with correlated coordinates and spread-out eigenvalues."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(0.2, 9.0, d)) @ q.T


# ---------------------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("a", [A, _random_spd(2, 1), _random_spd(3, 2), _random_spd(5, 3)])
def test_traces_match_closed_forms(a: np.ndarray) -> None:
    closed = toy.trace_closed_forms(a, sigma=0.1)
    brute = {
        Noise.NONE: 0.0,
        Noise.ISOTROPIC: 0.01 * np.trace(a),
        Noise.FULL: np.trace(a @ a),  # Tr(A^2)
        Noise.DIAG: sum(a[i, i] ** 2 for i in range(len(a))),  # sum_i A_ii^2
    }
    for kind in Noise:
        value = toy.noise_trace(a, toy.noise_factor(a, kind, sigma=0.1))
        assert value == pytest.approx(closed[kind], rel=1e-12, abs=1e-12)
        assert closed[kind] == pytest.approx(brute[kind], rel=1e-12, abs=1e-12)
    # ||A||_F^2 - ||diag A||_F^2 is the off-diagonal mass, which diagonal noise does not pay for.
    off = float(np.sum(a**2) - np.sum(np.diag(a) ** 2))
    assert closed[Noise.FULL] - closed[Noise.DIAG] == pytest.approx(off, rel=1e-12)
    assert off > 0.0


def test_toy_matrix_numbers() -> None:
    traces = {kind: toy.noise_trace(A, toy.noise_factor(A, kind)) for kind in Noise}
    assert traces[Noise.FULL] == pytest.approx(58.0, abs=1e-12)  # 4 + 9 + 9 + 36
    assert traces[Noise.DIAG] == pytest.approx(40.0, abs=1e-12)  # 4 + 36
    assert traces[Noise.ISOTROPIC] == pytest.approx(0.08, abs=1e-14)  # 0.1^2 * 8
    assert traces[Noise.NONE] == 0.0
    full, diag = toy.noise_factor(A, Noise.FULL), toy.noise_factor(A, Noise.DIAG)
    np.testing.assert_allclose(full @ full.T, A, atol=1e-13)
    np.testing.assert_allclose(full, full.T, atol=0)
    np.testing.assert_allclose(diag @ diag.T, np.diag([2.0, 6.0]), atol=1e-15)


def test_theorem_constants() -> None:
    gamma = 2.0 * LAMBDA_MAX / LAMBDA_MIN
    assert toy.theorem_gamma(A) == pytest.approx(gamma, rel=1e-12)
    lrs = toy.theorem_lrs(A, 500)
    assert lrs[0] == pytest.approx(1.0 / LAMBDA_MAX, rel=1e-12)  # a_0 = 1 / lambda_max
    assert np.all(np.diff(lrs) < 0.0)
    assert lrs[499] == pytest.approx(2.0 / ((499 + gamma) * LAMBDA_MIN), rel=1e-12)
    # Noise term dominates from theta0: nu = 2 Tr(C^T A C) / lambda_min^2.
    assert toy.theorem_nu(A, toy.noise_factor(A, Noise.FULL), THETA0) == pytest.approx(
        2 * 58.0 / LAMBDA_MIN**2, rel=1e-12
    )
    assert toy.theorem_nu(A, toy.noise_factor(A, Noise.DIAG), THETA0) == pytest.approx(
        2 * 40.0 / LAMBDA_MIN**2, rel=1e-12
    )
    # Far start: the initial-loss term gamma L(theta0) dominates.
    far = 10 * THETA0
    assert toy.theorem_nu(A, toy.noise_factor(A, Noise.DIAG), far) == pytest.approx(gamma * 525.0, rel=1e-12)


def test_exact_curve_reaches_the_closed_form_limits() -> None:
    full, diag = toy.noise_factor(A, Noise.FULL), toy.noise_factor(A, Noise.DIAG)
    # Constant lr: after 2000 steps the transient is (1 - 0.1 lambda_min)^4000 ~ 1e-70 of L0.
    for c in (full, diag):
        exact = toy.exact_loss_curve(A, c, THETA0, toy.constant_lrs(0.1, 2000))
        assert exact[-1] == pytest.approx(toy.stationary_loss(A, c, 0.1), rel=1e-10)
    assert toy.stationary_loss(A, full, 0.1) == pytest.approx(0.316872428, rel=1e-8)
    assert toy.stationary_loss(A, diag, 0.1) == pytest.approx(0.279835391, rel=1e-8)
    # Theorem schedule: (k + gamma) E[L_k] approaches schedule_limit like 1/k.
    gamma, steps = toy.theorem_gamma(A), 20000
    lrs = toy.theorem_lrs(A, steps)
    for c in (full, diag):
        exact = toy.exact_loss_curve(A, c, THETA0, lrs)
        limit = toy.schedule_limit(A, c)
        err = [abs((k + gamma) * exact[k] / limit - 1.0) for k in (steps // 4, steps)]
        assert err[1] < 2e-3
        assert err[1] < err[0] / 2  # still converging towards it, not settled elsewhere
    # At a constant rate diagonal noise is cheaper; under the decaying schedule the order reverses.
    assert toy.stationary_loss(A, diag, 0.1) < toy.stationary_loss(A, full, 0.1)
    assert toy.schedule_limit(A, diag) > toy.schedule_limit(A, full)


def test_noiseless_trajectory_is_gradient_descent() -> None:
    steps = 500
    path = toy.trajectory(A, np.zeros((2, 2)), THETA0, toy.constant_lrs(0.1, steps), np.random.default_rng(0))
    step = np.eye(2) - 0.1 * A
    expected = np.linalg.matrix_power(step, steps) @ THETA0
    np.testing.assert_allclose(path[-1], expected, atol=1e-12)
    np.testing.assert_allclose(path[1], step @ THETA0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# Monte-Carlo


@pytest.fixture(scope="module")
def theorem_checks() -> dict[Noise, toy.BoundCheck]:
    return toy.check_theorem(A, THETA0, steps=500, chains=2000, rng=np.random.default_rng(11))


@pytest.mark.parametrize("kind", [Noise.FULL, Noise.DIAG])
def test_theorem_bound_holds(theorem_checks: dict[Noise, toy.BoundCheck], kind: Noise) -> None:
    chk = theorem_checks[kind]
    assert chk.mean.shape == chk.se.shape == chk.exact.shape == chk.bound.shape == (501,)
    assert chk.mean[0] == pytest.approx(5.25, abs=1e-12)  # L(theta0), deterministic
    assert chk.se[0] == 0.0
    assert np.all(chk.se[1:] > 0.0)
    assert chk.holds  # mean + 3 SE <= nu / (k + gamma) at every k
    assert chk.exact_holds
    assert np.all(chk.mean + 3 * chk.se <= chk.bound)
    assert 0.0 < chk.worst_ratio < 1.0
    # The Monte-Carlo mean agrees with the exact moment recursion (brute force versus closed form).
    z = np.abs(chk.mean[1:] - chk.exact[1:]) / chk.se[1:]
    assert float(z.max()) < 5.0


def test_theorem_bound_holds_when_initial_loss_dominates() -> None:
    a = _random_spd(2, 7)
    theta0 = np.array([30.0, -20.0])
    checks = toy.check_theorem(a, theta0, steps=200, chains=1000, rng=np.random.default_rng(5))
    for kind, chk in checks.items():
        assert chk.nu == pytest.approx(toy.theorem_gamma(a) * float(toy.loss(a, theta0)), rel=1e-12), kind
        assert chk.bound[0] == pytest.approx(chk.mean[0], rel=1e-12)  # tight at k = 0 by construction
        assert chk.holds and chk.exact_holds


def test_diagonal_noise_has_smaller_stationary_loss() -> None:
    st = toy.compare_stationary(A, THETA0, lr=0.1, steps=500, chains=4000, rng=np.random.default_rng(3))
    assert st.diag_smaller
    assert st.diff_mean - 3.0 * st.diff_se > 0.0
    # Paired chains: the difference is far better resolved than either mean.
    assert st.diff_se < min(st.full_se, st.diag_se)
    assert abs(st.full_mean - st.full_closed) < 4.0 * st.full_se
    assert abs(st.diag_mean - st.diag_closed) < 4.0 * st.diag_se
    assert abs(st.diff_mean - (st.full_closed - st.diag_closed)) < 4.0 * st.diff_se
    assert st.full_closed - st.diag_closed == pytest.approx(0.037037037, rel=1e-6)


def test_trajectory_length_and_determinism() -> None:
    lrs = toy.constant_lrs(0.1, 500)
    full = toy.noise_factor(A, Noise.FULL)
    first = toy.trajectory(A, full, THETA0, lrs, np.random.default_rng(42))
    again = toy.trajectory(A, full, THETA0, lrs, np.random.default_rng(42))
    other = toy.trajectory(A, full, THETA0, lrs, np.random.default_rng(43))
    assert first.shape == (501, 2)
    np.testing.assert_array_equal(first[0], THETA0)
    np.testing.assert_array_equal(first, again)
    assert float(np.abs(first[-1] - other[-1]).max()) > 1e-3
    assert np.all(np.isfinite(first))


def test_one_step_clouds_model_sgd_noise() -> None:
    rng = np.random.default_rng(0)
    x, e = toy.regression_data(A, 4096, rng)
    np.testing.assert_allclose(x.T @ x / 4096, A, atol=1e-12)
    np.testing.assert_allclose(x.T @ e, 0.0, atol=1e-9)
    assert float(e @ e / 4096) == pytest.approx(1.0, rel=1e-12)

    step = toy.one_step(A, np.array(CFG.theta_one_step), 0.1, 4096, 128, 2000, 0.1, rng)
    assert step.scale == pytest.approx(0.0870, abs=1e-4)  # sqrt((4096 - 128) / (4096 * 128))
    np.testing.assert_allclose(step.mean_step, [-0.55, 0.35], atol=1e-12)  # theta - 0.1 A theta
    for cloud in step.clouds.values():
        assert cloud.shape == (2000, 2)
        np.testing.assert_allclose(cloud.mean(axis=0), step.mean_step, atol=0.01)
    # Full Fisher noise is close to the SGD noise; diagonal Fisher noise is not (Fig. 1 caption).
    assert step.rel_err_full < 0.3 < step.rel_err_diag
    # The isotropic cloud has the requested spread: lr * sigma = 0.01 per coordinate.
    np.testing.assert_allclose(step.clouds["isotropic"].std(axis=0), 0.01, rtol=0.1)


# ---------------------------------------------------------------------------------------------------------
# Files and the command line


@pytest.fixture(scope="module")
def run_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("toy") / "nested" / "out"
    return out, toy.run(out, chains=2000, seed=1)  # diag - full is ~7 SE at 2000 paired chains


def test_run_writes_pngs_and_json(run_result: tuple[Path, dict[str, Any]]) -> None:
    out, summary = run_result
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary files left
    for name in OUTPUTS[:3]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 20_000
    saved = json.loads((out / toy.JSON_NAME).read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["config"]["chains"] == 2000 and saved["config"]["seed"] == 1
    assert saved["traces"]["full"]["value"] == pytest.approx(58.0, abs=1e-12)
    assert saved["traces"]["diag"]["value"] == pytest.approx(40.0, abs=1e-12)
    for kind in ("full", "diag"):
        assert saved["theorem"][kind]["holds"] and saved["theorem"][kind]["exact_holds"]
        assert len(saved["theorem"][kind]["curve"]["mean"]) == 501
    assert saved["stationary"]["diag_smaller"]
    assert len(saved["trajectories"]["full"]) == 51  # every 10th of 501 iterates
    assert saved["files"] == [str(out / name) for name in OUTPUTS]


def test_run_is_deterministic_for_a_seed(run_result: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, first = run_result
    again = toy.run(tmp_path / "again", chains=2000, seed=1)
    for key in ("theorem", "stationary", "one_step", "trajectories"):
        assert again[key] == first[key], key


def test_main_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert toy_cli.main(["--out", str(out), "--chains", "2000", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "Tr(A^2) = ||A||_F^2 = 58" in text
    assert "||diag A||_F^2 = 40" in text
    assert text.count("bound HOLDS") == 2
    assert "diagonal smaller" in text
    assert str(out / toy.JSON_NAME) in text
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


@pytest.mark.parametrize(
    "args",
    [
        ["--chains", "0"],
        ["--chains", "-3"],
        ["--chains", "1"],
        ["--chains", "many"],
        ["--seed", "-1"],
        ["--x"],
    ],
)
def test_main_rejects_bad_input(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert toy_cli.main(["--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcnoise toy: error: ")
    assert not out.exists()


def test_main_rejects_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for out in (blocker, blocker / "sub"):
        assert toy_cli.main(["--out", str(out), "--chains", "50"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a directory" in err[0]
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_run_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(toy_runner, "draw_theorem", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="drawing failed"):
        toy.run(out, chains=50, seed=0)
    assert not out.exists()

    # A failure while writing removes every temporary file and leaves no partial output.
    monkeypatch.undo()
    out.mkdir()

    def no_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert toy_cli.main(["--out", str(out), "--chains", "50"]) == 2
    assert "No space left on device" in stderr.getvalue()
    assert list(out.iterdir()) == []
