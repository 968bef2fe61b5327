"""Squared per-sample gradient sums from hooks, checked against brute-force per-sample autograd."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.curvature import CurvatureHooks, SumGradSquared, handlers
from hpcnoise.models import GhostBatchNorm, build_model

TOL = 1e-5  # relative error allowed against brute force (float64 reaches ~1e-15)

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> per-sample losses (N,)


def squared_error(out: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (out - target).square().flatten(1).sum(1)


def cross_entropy(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target, reduction="none")


def brute_force(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[Tensor]:
    """sum_i g_i^2 by one autograd call per sample (valid when samples are independent)."""
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for s, g in zip(sums, grads, strict=True):
            if g is not None:
                s += g.square()
    return sums


def hooked(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, batch_size: int | None = None, **kwargs
) -> list[Tensor]:
    """sum_i g_i^2 from SumGradSquared over one backward of the mean loss."""
    sgs = SumGradSquared(model, **kwargs)
    with sgs.recording(batch_size or x.shape[0]):
        loss_fn(model(x), y).mean().backward()
    out = sgs.result()
    sgs.remove()
    model.zero_grad(set_to_none=True)
    return out


def assert_rel_close(actual: list[Tensor], expected: list[Tensor], tol: float = TOL) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = e.abs().max().clamp_min(1e-30)
        err = ((a - e).abs().max() / scale).item()
        assert err < tol, f"relative error {err:.2e} for shape {tuple(e.shape)}"


def rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


def data(shape: tuple[int, ...], out_shape: tuple[int, ...], n: int = 7, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    y = torch.randn(n, *out_shape, generator=gen, dtype=torch.float64)
    return x, y


def out_shape(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(layer(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])


def randomise_running_stats(model: nn.Module, seed: int = 1) -> None:
    """Give every batch norm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, GhostBatchNorm):
                c = bn.num_features
                cast(Tensor, bn.running_mean).copy_(torch.randn(c, generator=gen))
                cast(Tensor, bn.running_var).copy_(torch.rand(c, generator=gen) + 0.5)
                bn.weight.copy_(torch.randn(c, generator=gen))
                bn.bias.copy_(torch.randn(c, generator=gen))


# --- single layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_shape", [(5,), (3, 5)], ids=["2d", "3d"])
def test_linear(bias: bool, in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias).double()
    x, y = data(in_shape, out_shape(layer, in_shape))
    assert_rel_close(hooked(layer, x, y, squared_error, chunk_size=3), brute_force(layer, x, y, squared_error))


CONVS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "1d-stride-dilation": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (3, 11)),
    "1d-same-reflect": (lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 9)),
    "1d-nobias": (lambda: nn.Conv1d(2, 3, 5, padding=2, bias=False), (2, 8)),
    "2d-stride-padding": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 6, 5)),
    "2d-dilation-circular": (
        lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="circular", bias=False),
        (2, 5, 5),
    ),
}


@pytest.mark.parametrize("method", ["taps", "patches"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_exact(name: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of forming the per-sample products (hpcnoise.curvature.taps) give the brute force."""
    monkeypatch.setattr(handlers, "by_taps", lambda *shape: method == "taps")
    torch.manual_seed(0)
    build, in_shape = CONVS[name]
    layer = build().double()
    x, y = data(in_shape, out_shape(layer, in_shape))
    expected = brute_force(layer, x, y, squared_error)
    for chunk in (3, 256):  # chunks that split the batch unevenly, and one chunk
        assert_rel_close(hooked(layer, x, y, squared_error, chunk_size=chunk), expected)


def spatial_reference(layer: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """sum_{i,t} g_{i,t}^2 with g_{i,t} the gradient of l_i through output position t alone."""
    params = list(layer.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        out = layer(x[i : i + 1])
        (delta,) = torch.autograd.grad(squared_error(out, y[i : i + 1]).sum(), out, retain_graph=True)
        flat = delta.flatten(2)
        for t in range(flat.shape[2]):
            mask = torch.zeros_like(flat)
            mask[:, :, t] = flat[:, :, t]
            grads = torch.autograd.grad(out, params, mask.view_as(delta), retain_graph=True)
            for s, g in zip(sums, grads, strict=True):
                s += g.square()
    return sums


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_spatial_is_appendix_c(name: str) -> None:
    torch.manual_seed(0)
    build, in_shape = CONVS[name]
    layer = build().double()
    x, y = data(in_shape, out_shape(layer, in_shape), n=4)
    spatial = hooked(layer, x, y, squared_error, conv_mode="spatial")
    assert_rel_close(spatial, spatial_reference(layer, x, y))
    assert rel_diff(spatial, brute_force(layer, x, y, squared_error)) > 1e-3  # a real approximation


@pytest.mark.parametrize(
    "build, in_shape",
    [
        (lambda: nn.Conv1d(3, 4, 7), (3, 7)),  # kernel covers the input
        (lambda: nn.Conv2d(3, 4, 1), (3, 1, 1)),  # kernel size 1 on a single position
        (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=4), (2, 3, 3)),  # strided down to one position
    ],
)
def test_conv_spatial_equals_exact_with_one_output_position(
    build: Callable[[], nn.Module], in_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    layer = build().double()
    assert out_shape(layer, in_shape)[1:] in ((1,), (1, 1))
    x, y = data(in_shape, out_shape(layer, in_shape))
    expected = brute_force(layer, x, y, squared_error)
    assert_rel_close(hooked(layer, x, y, squared_error, conv_mode="spatial"), expected)
    assert_rel_close(hooked(layer, x, y, squared_error, conv_mode="exact"), expected)


def test_conv_kernel_size_one_with_many_positions_is_still_approximate() -> None:
    """A 1x1 kernel shares its weight across positions, so spatial independence is still an assumption."""
    torch.manual_seed(0)
    layer = nn.Conv1d(3, 4, 1).double()
    x, y = data((3, 6), out_shape(layer, (3, 6)))
    exact = hooked(layer, x, y, squared_error)
    assert_rel_close(exact, brute_force(layer, x, y, squared_error))
    assert rel_diff(hooked(layer, x, y, squared_error, conv_mode="spatial"), exact) > 1e-3


def test_conv_groups_rejected() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        SumGradSquared(nn.Conv1d(4, 4, 3, groups=2))


# --- batch norm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(4,), (4, 6), (4, 3, 3)], ids=["2d", "3d", "4d"])
def test_ghost_batch_norm_eval_is_per_sample(in_shape: tuple[int, ...]) -> None:
    bn = GhostBatchNorm(4).double().eval()
    randomise_running_stats(bn)
    x, y = data(in_shape, in_shape)
    expected = brute_force(bn, x, y, squared_error)
    assert_rel_close(hooked(bn, x, y, squared_error, record_eval=True), expected)
    # by default, modules in eval mode are skipped, like K-FAC hooks
    assert all((s == 0).all() for s in hooked(bn, x, y, squared_error))


def per_sample_contributions(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[Tensor]:
    """sum_i g_i^2 with g_i sample i's term of the batch gradient, computed explicitly.

    Layer inputs and output gradients are captured with plain hooks; xhat of each (ghost) batch norm is
    recomputed from its ghost-batch statistics. Also checks that sum_i g_i is the batch gradient.
    """
    m = x.shape[0]
    saved: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        output.retain_grad()
        saved[module] = (inputs[0].detach(), output)

    layers = [mod for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv1d, GhostBatchNorm))]
    handles = [mod.register_forward_hook(keep) for mod in layers]
    loss_fn(model(x), y).mean().backward()
    for h in handles:
        h.remove()
    sums: dict[int, Tensor] = {}
    for mod in layers:
        a, out = saved[mod]
        assert out.grad is not None
        delta = out.grad * m  # d l_i / d y_i, the mean's 1/m undone
        if isinstance(mod, nn.Linear):
            g_w = torch.einsum("no,ni->noi", delta, a)
            g_b = delta
        elif isinstance(mod, nn.Conv1d):
            pad = cast(tuple[int], mod.padding)[0]
            patches = F.pad(a, (pad, pad)).unfold(2, mod.kernel_size[0], mod.stride[0])  # (N, C, T, k)
            g_w = torch.einsum("not,nctk->nock", delta, patches)
            g_b = delta.sum(2)
        else:
            assert isinstance(mod, GhostBatchNorm)
            ghost = mod.ghost_size or m
            ag = a.reshape(m // ghost, ghost, *a.shape[1:])
            dims = [1] + list(range(3, ag.dim()))
            mean = ag.mean(dims, keepdim=True)
            var = ag.var(dims, correction=0, keepdim=True)
            xhat = ((ag - mean) / torch.sqrt(var + mod.eps)).reshape(a.shape)
            spatial = tuple(range(2, a.dim()))
            g_w = (delta * xhat).sum(spatial) if spatial else delta * xhat
            g_b = delta.sum(spatial) if spatial else delta
        for param, g in zip((mod.weight, mod.bias), (g_w, g_b), strict=True):
            if param is None:  # a layer without bias (followed by batch norm)
                continue
            assert param.grad is not None
            torch.testing.assert_close(g.sum(0) / m, param.grad)  # the contributions add up to the gradient
            sums[id(param)] = g.square().sum(0)
    model.zero_grad(set_to_none=True)
    return [sums[id(p)] for p in model.parameters()]


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_train_mode_batch_norm_is_per_sample_contribution(name: str) -> None:
    model = build_model(name, (20,), 3, ghost_size=4).double().train()
    randomise_running_stats(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    expected = per_sample_contributions(model, x, y, cross_entropy)
    assert_rel_close(hooked(model, x, y, cross_entropy), expected)


# --- whole networks and scaling --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_network_eval_mode(name: str) -> None:
    model = build_model(name, (40,), 10).double().eval()
    randomise_running_stats(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    expected = brute_force(model, x, y, cross_entropy)
    assert_rel_close(hooked(model, x, y, cross_entropy, record_eval=True, chunk_size=4), expected)


def test_network_without_batch_norm_train_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 12)),
        nn.Conv1d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.ReLU(),
        nn.Linear(8, 5),
    ).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=gen)
    assert_rel_close(hooked(model, x, y, cross_entropy, chunk_size=4), brute_force(model, x, y, cross_entropy))


def test_float32_matches_float64() -> None:
    model = build_model("cnn1d", (40,), 10).eval()
    randomise_running_stats(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    single = hooked(model, x, y, cross_entropy, record_eval=True)
    double = hooked(model.double(), x.double(), y, cross_entropy, record_eval=True)
    assert all(s.dtype == torch.float32 for s in single)
    assert_rel_close([s.double() for s in single], double, tol=1e-4)


def test_mean_loss_scaling() -> None:
    """batch_size=m gives sum_i g_i^2 itself: not m^2 or 1/m^2 times it."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x, y = data((5,), (3,), n=10)
    expected = brute_force(layer, x, y, squared_error)
    assert_rel_close(hooked(layer, x, y, squared_error), expected)
    sgs = SumGradSquared(layer)
    with sgs.recording(1):  # a summed loss has nothing to undo
        squared_error(layer(x), y).sum().backward()
    assert_rel_close(sgs.result(), expected)
    doubled = hooked(layer, x, y, squared_error, batch_size=20)
    assert_rel_close(doubled, [4 * e for e in expected])


# --- API behaviour ---------------------------------------------------------------------------------


def test_unsupported_module_raises_type_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="LayerNorm") as info:
        SumGradSquared(model)
    assert "Linear" in str(info.value) and "Conv2d" in str(info.value)
    SumGradSquared(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Flatten()))  # parameter-free modules pass


def test_parameters_of_mixed_dtypes_are_refused() -> None:
    """The sums of one quantity share one buffer, so the parameters must share a dtype and device."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match="one dtype on one device") as info:
        SumGradSquared(model)
    assert "torch.float32" in str(info.value) and "torch.float64" in str(info.value)


def test_each_recording_has_its_own_sums() -> None:
    """Results of one recording stay as they were after the next (each recording allocates afresh)."""
    model = build_model("mlp", (40,), 10)
    sgs = SumGradSquared(model)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    with sgs.recording(8):
        F.cross_entropy(model(x), y).backward()
    first = sgs.result()
    kept = [s.clone() for s in first]
    with sgs.recording(8):
        F.cross_entropy(model(2 * x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert not all(torch.equal(a, b) for a, b in zip(first, sgs.result()))


def test_params_order_and_shapes() -> None:
    model = build_model("cnn1d", (40,), 10)
    sgs = SumGradSquared(model)
    assert sgs.params == list(model.parameters())
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    with sgs.recording(8):
        F.cross_entropy(model(x), y).backward()
    assert [s.shape for s in sgs.result()] == [p.shape for p in sgs.params]


def test_hooks_inactive_outside_recording() -> None:
    model = build_model("mlp", (40,), 10)
    sgs = SumGradSquared(model)
    outputs: list[Tensor] = []
    probes = [
        m.register_forward_hook(lambda mod, inp, out: outputs.append(out))
        for m in model.modules()
        if isinstance(m, (nn.Linear, GhostBatchNorm))
    ]
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    assert outputs and all(not out._backward_hooks for out in outputs)  # no tensor hooks: no cost
    assert all(not bn.save_xhat and bn.saved_xhat is None for bn in model.modules() if isinstance(bn, GhostBatchNorm))
    with pytest.raises(RuntimeError):
        sgs.result()

    with sgs.recording(8):
        F.cross_entropy(model(x), y).backward()
    first = [s.clone() for s in sgs.result()]
    assert all(not bn.save_xhat and bn.saved_xhat is None for bn in model.modules() if isinstance(bn, GhostBatchNorm))
    F.cross_entropy(model(2 * x), y).backward()  # outside: the last result stays as it was
    assert all(torch.equal(a, b) for a, b in zip(first, sgs.result(), strict=True))

    for p in probes:
        p.remove()
    sgs.remove()
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError), sgs.recording(8):
        pass


def test_backward_after_recording_raises() -> None:
    layer = nn.Linear(3, 2)
    sgs = SumGradSquared(layer)
    x = torch.randn(4, 3)
    with sgs.recording(4):
        loss = layer(x).square().mean()
    with pytest.raises(RuntimeError, match="outside"):
        loss.backward()


def test_module_reused_in_one_forward_raises() -> None:
    layer = nn.Linear(3, 3)
    sgs = SumGradSquared(layer)
    with pytest.raises(RuntimeError, match="twice"), sgs.recording(2):
        layer(layer(torch.randn(2, 3))).sum().backward()


# --- signed sums (full-Fisher noise) and K-FAC factors ----------------------------------------------
def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[list[Tensor]]:
    """g_i for every sample, one autograd call each (samples independent: eval mode or no batch norm)."""
    params = list(model.parameters())
    out = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        out.append(
            [
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)
            ]
        )
    return out


def conv_and_linear_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, stride=2), GhostBatchNorm(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 4)
    ).double()


@pytest.mark.parametrize("train_mode", [False, True])
def test_signed_sum_matches_per_sample_gradients(train_mode: bool) -> None:
    model = conv_and_linear_net()
    model.train(train_mode)
    x, y = data((2, 8), (4,), n=6)
    signs = torch.tensor([1.0, -1, -1, 1, 1, -1], dtype=torch.float64)
    hooks = CurvatureHooks(model, quantities=("signed_sum", "sum_grad_squared"), record_eval=True)
    with hooks.recording(6, signs=signs):
        squared_error(model(x), y).mean().backward()
    if train_mode:  # samples coupled by batch norm: the contributions, with all signs +1, add up to m * grad
        model.zero_grad(set_to_none=True)
        assert_rel_close(hooks.result("sum_grad_squared"), per_sample_contributions(model, x, y, squared_error))
        with hooks.recording(6, signs=torch.ones(6, dtype=torch.float64), quantities=("signed_sum",)):
            squared_error(model(x), y).mean().backward()
        assert_rel_close(hooks.result("signed_sum"), [p.grad * 6 for p in model.parameters()])  # type: ignore[operator]
        return
    grads = per_sample_grads(model, x, y, squared_error)
    expected = [sum(s * g[j] for s, g in zip(signs, grads)) for j in range(len(grads[0]))]
    assert_rel_close(hooks.result("signed_sum"), expected)  # type: ignore[arg-type]
    # with all signs +1 the signed sum is the batch gradient times m
    with hooks.recording(6, signs=torch.ones(6, dtype=torch.float64), quantities=("signed_sum",)):
        squared_error(model(x), y).mean().backward()
    total = [sum(g[j] for g in grads) for j in range(len(grads[0]))]
    assert_rel_close(hooks.result("signed_sum"), total)  # type: ignore[arg-type]


def test_kfac_factors_match_explicit_sums() -> None:
    model = conv_and_linear_net().eval()
    x, y = data((2, 8), (4,), n=5)
    hooks = CurvatureHooks(model, quantities=("kfac",), record_eval=True)
    acts: dict[nn.Module, Tensor] = {}
    outs: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        output.retain_grad()
        acts[module], outs[module] = inputs[0].detach(), output

    handles = [m.register_forward_hook(keep) for m in (model[0], model[4])]
    with hooks.recording(5):
        squared_error(model(x), y).mean().backward()
    for h in handles:
        h.remove()
    factors = hooks.result("kfac")
    assert [f.weight for f in factors] == [0, 4] and [f.bias for f in factors] == [1, 5]
    # Linear: A = sum_i [a_i,1][a_i,1]^T, G = sum_i g_i g_i^T with g_i = m * dL/dy_i
    a = torch.cat([acts[model[4]], torch.ones(5, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(factors[1].A, a.t() @ a, rtol=1e-12, atol=1e-12)
    g = outs[model[4]].grad * 5
    torch.testing.assert_close(factors[1].G, g.t() @ g, rtol=1e-12, atol=1e-12)
    # Conv1d: patches by explicit unfold; A averages over the T output positions, G sums over them
    conv = model[0]
    xp = F.pad(acts[conv], (1, 1))
    patches = torch.stack([xp[:, :, t * 2 : t * 2 + 3].reshape(5, -1) for t in range(4)], 1)  # (N, T, C*k)
    rows = torch.cat([patches.reshape(-1, 6), torch.ones(20, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(factors[0].A, rows.t() @ rows / 4, rtol=1e-12, atol=1e-12)
    d = (outs[conv].grad * 5).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(factors[0].G, d.t() @ d, rtol=1e-12, atol=1e-12)
    # For ONE sample through a Linear layer, A (x) G is exactly g g^T: its diagonal is g^2.
    one = CurvatureHooks(model, quantities=("kfac", "sum_grad_squared"), record_eval=True)
    with one.recording(1):
        squared_error(model(x[:1]), y[:1]).mean().backward()
    f = one.result("kfac")[1]
    diag_kron = torch.outer(f.G.diagonal(), f.A.diagonal())  # diag of A (x) G as (out, in+1)
    sq = one.result()
    torch.testing.assert_close(diag_kron[:, :-1], sq[4], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(diag_kron[:, -1], sq[5], rtol=1e-10, atol=1e-14)


def test_layer_benchmark_times_both_ways_of_every_distinct_convolution() -> None:
    """``hpcnoise bench fisher --layers``: one row per distinct convolution, both ways agreeing."""
    from hpcnoise.benchmarks.conv_layers import layer_table

    table = layer_table(["cnn1d", "lenet5"], batch=3, rounds=1)
    assert list(table["model"]) == ["cnn1d"] * 3 + ["lenet5"] * 2  # cnn1d's last two differ in input length
    assert list(table["input"]) == ["40", "40", "20", "28x28", "14x14"]
    assert list(table["picked"]) == ["taps", "taps", "taps", "taps", "patches"]  # lenet5's 6 -> 16: patches
    assert (table[["taps ms", "patches ms"]] > 0).all().all()
    assert (table["rel diff"].astype(float) < 1e-5).all()


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_signed_sum_every_padding_stride_and_dilation(name: str) -> None:
    """sum_i sigma_i g_i of a convolution (one native convolution backward) against per-sample autograd."""
    torch.manual_seed(0)
    build, in_shape = CONVS[name]
    layer = build().double()
    x, y = data(in_shape, out_shape(layer, in_shape))
    signs = torch.tensor([1.0, -1, -1, 1, 1, -1, 1], dtype=torch.float64)
    hooks = CurvatureHooks(layer, quantities=("signed_sum",))
    with hooks.recording(len(x), signs=signs):
        squared_error(layer(x), y).mean().backward()
    params = list(layer.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(squared_error(layer(x[i : i + 1]), y[i : i + 1]).sum(), params)
        for e, g in zip(expected, grads, strict=True):
            e += signs[i] * g
    assert_rel_close(hooks.result("signed_sum"), expected)
