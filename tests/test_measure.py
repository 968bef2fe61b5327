"""Sharpness, Fisher norms and gradient variance (hpcnoise.measure), checked against brute force.

Sharpness against the top eigenvalue of the exact Hessian (torch.autograd.functional.hessian), on one
process and on two ranks under mpirun; Fisher norms against an explicitly formed F; gradient variances
against their exact expectation from the population of per-sample gradients.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hpcnoise.cli.sharpness import main
from hpcnoise.comm import init
from hpcnoise.curvature import SumGradSquared
from hpcnoise.measure import (
    ChannelSign,
    HessianOperator,
    diagnostics_row,
    fisher_norms,
    fit_softmax_temperature,
    fixed_subset,
    fold_batchnorm,
    gradient_variance,
    load_run,
    logits_of,
    max_eigenvalue,
    sharpness_of,
)
from hpcnoise.models import MODELS, GhostBatchNorm, build_model, cnn1d, mlp
from hpcnoise.train import train
from tests.helpers.configs import small_config
from tests.helpers.launch import HELPERS, run_launched
from tests.helpers.measure_worker import (
    MAIN_SAMPLES,
    SHARPNESS_SAMPLES,
    TINY_CFG,
    measure_all,
    tiny_problem,
)

WORKER = str(HELPERS / "measure_worker.py")
HESSIAN_TOL = 1e-4  # relative error of the top eigenvalue against the exact Hessian


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def exact_hessian(model: nn.Module, x: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """The d x d Hessian of the mean CE(model(x) / T, y) over the flattened parameters (eval mode)."""
    model.eval()
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())

    def loss(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return F.cross_entropy(functional_call(model, (params, buffers), (x,)) / temperature, y)

    return torch.autograd.functional.hessian(loss, flat_params(model))


def exact_top_eigenvalue(model: nn.Module, x: Tensor, y: Tensor, temperature: float = 1.0) -> float:
    return torch.linalg.eigvalsh(exact_hessian(model, x, y, temperature))[-1].item()


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- sharpness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fold,temperature", [(True, True), (False, False)])
def test_sharpness_matches_exact_hessian(fold: bool, temperature: bool) -> None:
    model, data = tiny_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heldout = (data.x_test, data.y_test) if temperature else None
    res = sharpness_of(
        model, data.x_train, data.y_train, init("cpu"), samples=SHARPNESS_SAMPLES, heldout=heldout, fold=fold,
        chunk=8, tol=1e-10,
    )  # fmt: skip
    idx = fixed_subset(data.x_train.shape[0], SHARPNESS_SAMPLES)
    net = fold_batchnorm(model) if fold else model
    exact = exact_top_eigenvalue(net, data.x_train[idx], data.y_train[idx], res["temperature"])
    assert rel_err(res["max_eigenvalue"], exact) < HESSIAN_TOL
    assert res["folded_bn"] is fold and res["world_size"] == 1 and res["samples"] == SHARPNESS_SAMPLES
    assert 5 <= res["iterations"] < 200
    if temperature:
        # fitted on the held-out split: the NLL there is minimal at T, and T is not trivially 1
        assert abs(res["temperature"] - 1.0) > 0.05
        z = logits_of(net, data.x_test)
        nll = [F.cross_entropy(z / (res["temperature"] * f), data.y_test).item() for f in (0.98, 1.0, 1.02)]
        assert nll[1] < nll[0] and nll[1] < nll[2]
    else:
        assert res["temperature"] == 1.0
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_temperature_changes_the_hessian_as_predicted() -> None:
    """CE(z / T) has Hessian H(T); check the operator's temperature against the exact Hessian at T = 2.5."""
    model, data = tiny_problem()
    net = fold_batchnorm(model)
    x, y = data.x_train[:30], data.y_train[:30]
    value, _ = max_eigenvalue(net, x, y, init("cpu"), softmax_temperature=2.5, chunk=7, tol=1e-10)
    assert rel_err(value, exact_top_eigenvalue(net, x, y, 2.5)) < HESSIAN_TOL
    assert rel_err(value, exact_top_eigenvalue(net, x, y, 1.0)) > 0.1  # T really entered


def test_power_iteration_agrees_with_lanczos() -> None:
    model, data = tiny_problem()
    kwargs: dict[str, Any] = {
        "samples": SHARPNESS_SAMPLES,
        "heldout": (data.x_test, data.y_test),
        "chunk": 64,
    }
    comm = init("cpu")
    lanczos = sharpness_of(model, data.x_train, data.y_train, comm, method="lanczos", tol=1e-9, **kwargs)
    power = sharpness_of(model, data.x_train, data.y_train, comm, method="power", tol=1e-9, max_products=5000, **kwargs)
    assert power["method"] == "power" and power["iterations"] > 1
    assert rel_err(power["max_eigenvalue"], lanczos["max_eigenvalue"]) < 1e-6


def test_hessian_operator_is_symmetric_and_linear() -> None:
    """u^T H v = v^T H u and H(a u + v) = a H u + H v, on one rank, in float64."""
    model, data = tiny_problem()
    op = HessianOperator(fold_batchnorm(model), data.x_train, data.y_train, init("cpu"), chunk=10)
    gen = torch.Generator().manual_seed(1)
    u, v = (torch.randn(op.dim, generator=gen, dtype=torch.float64).numpy() for _ in range(2))
    hu, hv = op(u), op(v)
    assert abs(u @ hv - v @ hu) < 1e-10 * abs(u @ hv)
    assert abs(op(3 * u + v) - (3 * hu + hv)).max() < 1e-10 * abs(hu).max()


@pytest.mark.slow
def test_sharpness_two_ranks_under_mpirun(tmp_path: Path, finished_run: Path) -> None:
    """Two ranks (shares of 22 and 23 samples) give the exact top eigenvalue, on both ranks, and the same
    Fisher norms and gradient variances as one process; `hpcnoise sharpness` on a real run agrees with
    its one-process result."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("sharpness.json"))
    proc = run_launched("mpirun", 2, [WORKER, str(tmp_path), str(run)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((run / "sharpness.json").read_text())
    assert main([str(run), "--samples", MAIN_SAMPLES]) == 0
    one_main = json.loads((run / "sharpness.json").read_text())
    assert (two["world_size"], one_main["world_size"], two["samples"]) == (2, 1, int(MAIN_SAMPLES))
    assert rel_err(two["temperature"], one_main["temperature"]) < 1e-9
    assert rel_err(two["max_eigenvalue"], one_main["max_eigenvalue"]) < 1e-4  # float32 sums in another order
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    one = measure_all(init("cpu"))
    model, data = tiny_problem()
    idx = fixed_subset(data.x_train.shape[0], SHARPNESS_SAMPLES)
    exact = exact_top_eigenvalue(
        fold_batchnorm(model), data.x_train[idx], data.y_train[idx], ranks[0]["sharpness"]["temperature"]
    )
    for r in ranks:
        assert r["main_exit"] == 0
        s = r["sharpness"]
        assert r["size"] == 2 and s["world_size"] == 2
        assert rel_err(s["max_eigenvalue"], exact) < HESSIAN_TOL
        assert s["max_eigenvalue"] == ranks[0]["sharpness"]["max_eigenvalue"]  # lockstep: identical
        assert s["iterations"] == ranks[0]["sharpness"]["iterations"]
        assert rel_err(s["temperature"], one["sharpness"]["temperature"]) < 1e-12
        for key in ("fisher_frobenius", "diag_fisher_frobenius", "fisher_trace"):
            assert rel_err(r["fisher"][key], one["fisher"][key]) < 1e-10, key
        for regime, layers in one["grad_variance"].items():
            for layer, value in layers.items():
                assert rel_err(r["grad_variance"][regime][layer], value) < 1e-9, (regime, layer)


# --- reparametrisation: folding and temperature -----------------------------------------------------------
def _randomise_norms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, GhostBatchNorm):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=gen))
                bn.running_var.copy_(0.2 + 3 * torch.rand(c, generator=gen))
                bn.weight.copy_(torch.randn(c, generator=gen))
                bn.bias.copy_(torch.randn(c, generator=gen))


# Input shapes for the registered networks (image networks: CIFAR-sized).
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
FOLD_SHAPES = {"mlp": (40,), "cnn1d": (40,), "mnist_mlp": (1, 28, 28), "lenet5": (1, 28, 28)}


def _fold_check(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, tol: float) -> nn.Module:
    """Fold ``model`` (train mode, randomised norms) and check eval outputs, parameters and the original."""
    _randomise_norms(model, 1)
    x = torch.randn(4, *shape, dtype=dtype)
    model.train()  # the caller's mode must survive
    folded = fold_batchnorm(model)
    assert model.training and any(isinstance(m, GhostBatchNorm) for m in model.modules())
    assert not any(isinstance(m, GhostBatchNorm) for m in folded.modules())
    # parameters: the norms' gamma and beta are gone, layers that had no bias before a norm gained one
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]

    def biases(net: nn.Module) -> int:
        return sum(m.bias.numel() for m in net.modules() if isinstance(m, _FOLDABLE) and m.bias is not None)

    expected_count = sum(p.numel() for p in model.parameters()) - sum(2 * m.num_features for m in norms)
    assert sum(p.numel() for p in folded.parameters()) == expected_count + biases(folded) - biases(model)
    expected, got = logits_of(model, x), logits_of(folded, x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < tol  # relative to the output scale
    assert (got.argmax(1) == expected.argmax(1)).all()
    return folded


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_preserves_eval_outputs_of_every_network(name: str) -> None:
    """float64, gammas of both signs: exact to rounding (~1e-15), also through max pooling (AlexNet)."""
    shape = FOLD_SHAPES.get(name, (3, 32, 32))
    model = build_model(name, shape, 10, ghost_size=2).double()
    folded = _fold_check(model, shape, torch.float64, 1e-6)
    pooled_norms = {"alexnet": 2}.get(name, 0)  # AlexNet's conv -> max pool -> norm, with negative gammas
    assert sum(isinstance(m, ChannelSign) for m in folded.modules()) == pooled_norms


@pytest.mark.parametrize("builder", [mlp, cnn1d])
def test_fold_in_float32(builder: object) -> None:
    torch.manual_seed(0)
    model = builder((40,), 10, lambda c: GhostBatchNorm(c), width=16)  # type: ignore[operator]
    _fold_check(model, (40,), torch.float32, 1e-5)


def test_fold_refuses_norms_it_cannot_fold() -> None:
    for model in (
        nn.Sequential(GhostBatchNorm(4), nn.Linear(4, 2)),  # nothing before it
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), GhostBatchNorm(4)),  # a ReLU between
    ):
        with pytest.raises(ValueError, match="does not normalise the output of a Linear or Conv layer"):
            fold_batchnorm(model)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    """Labels drawn from softmax(z / T0): the fitted T is within 4 standard errors of T0 = 2.5.

    The standard error is 1 / sqrt(N * I(T0)), I the per-sample Fisher information of T, taken from the
    curvature of the mean NLL at T0 (finite differences).
    """
    gen = torch.Generator().manual_seed(0)
    n, t0 = 20_000, 2.5
    z = 4 * torch.randn(n, 10, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / t0, 1), 1, generator=gen).squeeze(1)
    fitted = fit_softmax_temperature(z, y)
    h = 1e-3
    nll = [F.cross_entropy(z / (t0 + k * h), y).item() for k in (-1, 0, 1)]
    info = (nll[0] - 2 * nll[1] + nll[2]) / h**2  # per-sample information about T
    se = 1 / math.sqrt(n * info)
    assert 0 < se < 0.1
    assert abs(fitted - t0) < 4 * se
    assert abs(fit_softmax_temperature(z / 0.3, y) - t0 * (1 / 0.3)) < 4 * se / 0.3  # T scales with the logits


# --- Fisher norms --------------------------------------------------------------------------------------
def per_sample_loop(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(N, d) per-sample gradients, one autograd call per sample (eval mode)."""
    model.eval()
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [6, 64])
def test_fisher_norms_match_explicit_fisher(chunk: int) -> None:
    model, data = tiny_problem()
    x, y = data.x_train[:20], data.y_train[:20]
    model.train()
    norms = fisher_norms(model, x, y, chunk=chunk)
    assert model.training  # mode restored
    g = per_sample_loop(model, x, y)
    fisher = g.T @ g / x.shape[0]  # d x d, affordable for the tiny model only
    assert rel_err(norms["fisher_frobenius"], torch.linalg.matrix_norm(fisher).item()) < 1e-6
    assert rel_err(norms["diag_fisher_frobenius"], fisher.diagonal().norm().item()) < 1e-6
    assert rel_err(norms["fisher_trace"], fisher.trace().item()) < 1e-6
    # ... and diag F as the training hooks compute it, in eval mode
    sgs = SumGradSquared(model, record_eval=True)
    model.eval()
    with sgs.recording(x.shape[0]):
        F.cross_entropy(model(x), y).backward()
    hooked = torch.cat([s.reshape(-1) for s in sgs.result()]) / x.shape[0]
    assert rel_err(norms["diag_fisher_frobenius"], hooked.norm().item()) < 1e-6
    # the full Fisher is larger: off-diagonal mass (Fig. 3a)
    assert norms["fisher_frobenius"] > 1.2 * norms["diag_fisher_frobenius"]


# --- gradient variance --------------------------------------------------------------------------------
def expected_variances(model: nn.Module, x: Tensor, y: Tensor, draws: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per regime and layer: (exact expected variance, relative standard deviation of its estimate).

    Drawing M of N samples without replacement, the batch mean has covariance C_M = Sigma / M * (N - M)
    / (N - 1), Sigma the population covariance of per-sample gradients. Noise independent of the draw
    given its statistics adds its expected covariance: diagf s^2 diag(F), fullf s^2 F (the same
    marginal variances: Fig. 3b's point), trace s^2 Tr(F) / d I, with F = mean_i g_i g_i^T over the
    population. The layer value is Tr(C) / d_l. Its estimate over B draws has relative variance
    2 ||C||_F^2 / ((B - 1) Tr(C)^2) for Gaussian means, plus a fourth-moment term sum_j k_j C_jj^2 /
    (B Tr(C)^2) with k_j the excess kurtosis of coordinate j of the mean (per-sample kurtosis / M).
    """
    g = per_sample_loop(model, x, y)
    n = g.shape[0]
    dev = g - g.mean(0)
    sigma = dev.T @ dev / n
    kurt = torch.nan_to_num((dev**4).mean(0) / (dev**2).mean(0) ** 2 - 3).clamp_min(0)
    ml, ms, s2 = TINY_CFG.batch_size, TINY_CFG.small_batch, TINY_CFG.noise_scale**2
    fisher = g.T @ g / n
    c_lb = sigma / ml * (n - ml) / (n - 1)
    covs = {
        "sb": (sigma / ms * (n - ms) / (n - 1), ms),
        "lb": (c_lb, ml),
        "diagf": (c_lb + s2 * torch.diag(fisher.diagonal()), ml),
        "fullf": (c_lb + s2 * fisher, ml),
        "trace": (c_lb + s2 * fisher.trace() / g.shape[1] * torch.eye(g.shape[1], dtype=g.dtype), ml),
    }
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for regime, (c, m) in covs.items():
        out[regime], offset = {}, 0
        for name, p in model.named_parameters():
            sl = slice(offset, offset + p.numel())
            offset += p.numel()
            block, tr = c[sl, sl], c[sl, sl].trace()
            rel_var = 2 * block.square().sum() / ((draws - 1) * tr**2)
            rel_var += (kurt[sl] / m * block.diagonal() ** 2).sum() / (draws * tr**2)
            out[regime][name] = ((tr / p.numel()).item(), rel_var.sqrt().item())
    return out


def test_gradient_variance_matches_its_expectation() -> None:
    """sb, lb, diagf, fullf and trace variances at a frozen tiny network (eval mode) against their exact
    expectation, within 4.5 Monte-Carlo standard deviations; sb / lb is M_L / M_S corrected for finite
    sampling."""
    draws, n = 1000, 400
    model, data = tiny_problem(n_train=n)
    expected = expected_variances(model, data.x_train, data.y_train, draws)
    est = {r: gradient_variance(model, data, r, TINY_CFG, draws, train_mode=False) for r in expected}
    for regime, layers in expected.items():
        for layer, (value, rel_sd) in layers.items():
            assert rel_sd < 0.15, (regime, layer)  # the check has teeth
            assert abs(est[regime][layer] / value - 1) < 4.5 * rel_sd, (
                regime,
                layer,
                est[regime][layer],
                value,
            )
    ml, ms = TINY_CFG.batch_size, TINY_CFG.small_batch
    ratio = ml / ms * (n - ms) / (n - ml)  # 4 * 392 / 368 = 4.26 for 32 / 8 of 400
    for layer in est["sb"]:
        sd = math.hypot(expected["sb"][layer][1], expected["lb"][layer][1])
        assert abs(est["sb"][layer] / est["lb"][layer] / ratio - 1) < 4.5 * sd, layer
    # diag-F noise restores (at least) the small batch's marginal variance on every layer
    assert all(est["diagf"][k] > 0.7 * est["sb"][k] for k in est["sb"])


@pytest.mark.parametrize("regime", ["kfac", "multiplicative", "batchchange"])
def test_gradient_variance_of_other_regimes(regime: str) -> None:
    """Regimes without a closed form here run through the same machinery and add variance to lb's."""
    model, data = tiny_problem(n_train=128)
    cfg = replace(TINY_CFG, batchchange_epochs=1)
    lb = gradient_variance(model, data, "lb", cfg, 40, epoch=1, train_mode=False)
    var = gradient_variance(model, data, regime, cfg, 40, epoch=1, train_mode=False)
    assert list(var) == list(lb) and all(math.isfinite(v) and v >= 0 for v in var.values())
    if regime == "batchchange":  # at epoch 1 (past batchchange_epochs) it is lb, draw for draw
        assert var == lb
    else:
        assert sum(var.values()) > 1.05 * sum(lb.values())


def test_gradient_variance_leaves_the_network_frozen() -> None:
    """Train mode (ghost batch norm over the draw) changes no parameter, buffer or .grad, nor the mode."""
    model, data = tiny_problem(n_train=128)
    for bn in model.modules():
        if isinstance(bn, GhostBatchNorm):
            bn.ghost_size = 8
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(TINY_CFG, ghost_bn=True, ghost_size=8)
    var = {r: gradient_variance(model, data, r, cfg, 6) for r in ("sb", "lb", "diagf")}
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    total = {r: sum(v.values()) for r, v in var.items()}
    assert total["sb"] > 1.5 * total["lb"] > 0 and total["diagf"] > total["lb"]


def test_diagnostics_row() -> None:
    model, data = tiny_problem(n_train=128)
    row = diagnostics_row(model, data, TINY_CFG, init("cpu"), epoch=3, fisher_samples=50, draws=4)
    assert set(row) >= {"epoch", "fisher_frobenius", "diag_fisher_frobenius", "grad_variance"}
    idx = fixed_subset(128, 50, TINY_CFG.seed)
    norms = fisher_norms(model, data.x_train[idx], data.y_train[idx])
    assert row["epoch"] == 3 and row["fisher_frobenius"] == norms["fisher_frobenius"]
    assert row["fisher_frobenius"] > row["diag_fisher_frobenius"] > 0
    assert set(row["grad_variance"]) == {"sb", "lb", "diagf"}
    layers = [k for k, _ in model.named_parameters()]
    assert all(list(v) == layers and min(v.values()) >= 0 for v in row["grad_variance"].values())
    json.dumps(row)  # one JSON line of diagnostics.jsonl


# --- `hpcnoise sharpness RUN_DIR` ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    train(small_config(out_dir=str(out), run_name="r", epochs=1, regime="diagf", ghost_bn=True), init("cpu"))
    return out / "r"


def test_main_writes_sharpness_json(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(finished_run), "--samples", "512"]) == 0
    res = json.loads((finished_run / "sharpness.json").read_text())
    keys = "max_eigenvalue temperature samples method folded_bn iterations wall_time_s world_size"
    assert set(res) == set(keys.split())
    assert (res["samples"], res["method"], res["folded_bn"], res["world_size"]) == (512, "lanczos", True, 1)
    assert 0 < res["iterations"] < 500 and res["wall_time_s"] > 0
    assert "hpcnoise: sharpness" in capsys.readouterr().out
    # The record agrees with an independent look at the same model: T minimises the test NLL, and the
    # eigenvalue bounds the Rayleigh quotient of the Hessian along the mean gradient (a sharp direction).
    _, data, model = load_run(finished_run, init("cpu"))
    net = fold_batchnorm(model)
    t = res["temperature"]
    assert 0.05 < t < 20
    z = logits_of(net, data.x_test)
    assert all(F.cross_entropy(z / t, data.y_test) < F.cross_entropy(z / (t * f), data.y_test) for f in (0.97, 1.03))
    idx = fixed_subset(data.x_train.shape[0], 512)
    op = HessianOperator(net, data.x_train[idx], data.y_train[idx], init("cpu"), softmax_temperature=t)
    loss = F.cross_entropy(net(data.x_train[idx]) / t, data.y_train[idx])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    gdir = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
    gdir /= (gdir @ gdir) ** 0.5
    rayleigh = gdir @ op(gdir)
    assert 0 < rayleigh <= res["max_eigenvalue"] * (1 + 1e-4)


def test_main_without_fold_and_temperature(finished_run: Path) -> None:
    assert main([str(finished_run), "--samples", "256", "--no-fold", "--no-temperature"]) == 0
    res = json.loads((finished_run / "sharpness.json").read_text())
    assert res["temperature"] == 1.0 and res["folded_bn"] is False and res["max_eigenvalue"] > 0


@pytest.mark.parametrize("case", ["missing", "unfinished", "too_many_samples"])
def test_main_errors_cleanly(tmp_path: Path, finished_run: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    args = [str(run)]
    if case == "unfinished":
        run.mkdir()
        shutil.copy(finished_run / "config.json", run / "config.json")
    if case == "too_many_samples":
        shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("sharpness.json"))
        args += ["--samples", "100000"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcnoise: error: ")
    message = {
        "missing": "does not exist",
        "unfinished": "unfinished run, no summary.json",
        "too_many_samples": "--samples 100000 exceeds the run's 2048 training samples",
    }[case]
    assert message in lines[0]
    assert not (run / "sharpness.json").exists()
