"""The paper's networks (sizes, gradients, curvature hooks, batch norms) and GhostBatchNorm itself.

GhostBatchNorm is checked against torch's batch norm applied ghost batch by ghost batch, in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.curvature import SumGradSquared
from hpcnoise.models import MODELS, GhostBatchNorm, ZeroPadShortcut, build_model, ghost_norms, update_running_stats

TOL = 1e-5  # relative error allowed (float64 reaches ~1e-14)
MNIST, CIFAR = (1, 28, 28), (3, 32, 32)  # input shapes (channels, height, width); Fashion-MNIST as MNIST


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread, so no thread spin-waits for a core on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


# --- parameter counts ----------------------------------------------------------------------------
# Derived layer by layer: a conv or dense layer has in * out * k * k weights (+ out biases where it has
# them), a batch norm 2 per channel (weight, bias).
# Layers followed by batch norm carry no bias (see hpcnoise.models); counts below are the published
# architectures' minus those redundant biases.
# mnist_mlp (Keskar et al.'s F1): 784*512 = 401,408; 4 x 512*512 = 1,048,576; 5 batch norms x 2*512 =
#   5,120; 512*10 + 10 = 5,130. Total 1,460,234 (the published F1 with biases: 1,462,794).
# lenet5: conv 1*6*25 = 150; conv 6*16*25 = 2,400; dense 400*120 = 48,000; 120*84 = 10,080;
#   84*10 + 10 = 850: 61,480, which is the published 61,706 less the 6 + 16 + 120 + 84 = 226 biases
#   (28 x 28 padded by 2 and 32 x 32 alike), plus batch norms 2*(6 + 16 + 120 + 84) = 452: 61,932.
# alexnet (Keskar et al.'s C1/C3, no biases before batch norm): conv 3*64*25 = 4,800; 64*64*25 = 102,400;
#   32 -> max pool 3/2 -> 15 -> 7, dense 64*7*7*384 = 1,204,224; 384*192 = 73,728;
#   batch norms 2*(64 + 64 + 384 + 192) = 1,408; classifier 192*10 + 10 = 1,930. Total 1,388,490;
#   100 classes: 192*100 + 100 = 19,300 instead, 1,405,860.
# vgg16_bn: 13 conv 3x3 without bias: 3*64*9 = 1,728; 64*64*9 = 36,864; 64*128*9 = 73,728;
#   128*128*9 = 147,456; 128*256*9 = 294,912; 2 x 589,824; 256*512*9 = 1,179,648;
#   5 x 512*512*9 = 2,359,296: 14,710,464 together. Batch norms 2*(2*64 + 2*128 + 3*256 + 6*512
#   + 512) = 9,472; dense 512*512 = 262,144; classifier 512*10 + 10 = 5,130. Total 14,987,210
#   (published with biases: 14,991,946); 100 classes: 51,300 instead, 15,033,380.
# resnet44 (n = 7, option A: no shortcut parameters, convs without bias): stem 3*16*9 = 432;
#   stage 1: 14 x 16*16*9 = 32,256; stage 2: 16*32*9 + 13 x 32*32*9 = 124,416; stage 3: 32*64*9 +
#   13 x 64*64*9 = 497,664; batch norms 2*(16 + 14*(16 + 32 + 64)) = 3,168; classifier 64*10 + 10 = 650.
#   Total 658,586 (He et al.: 0.66M); 100 classes: 6,500 instead, 664,436.
# resnet44x2 (widths 32/64/128): stem 864; stages 129,024 + 497,664 + 1,990,656; batch norms
#   2*(32 + 14*(32 + 64 + 128)) = 6,336; classifier 1,290. Total 2,625,834; 100 classes (12,900): 2,637,444.
PARAMETER_COUNTS = [
    ("mnist_mlp", MNIST, 10, 1_460_234),
    ("lenet5", MNIST, 10, 61_932),
    ("lenet5", (1, 32, 32), 10, 61_932),
    ("alexnet", CIFAR, 10, 1_388_490),
    ("alexnet", CIFAR, 100, 1_405_860),
    ("vgg16_bn", CIFAR, 10, 14_987_210),
    ("vgg16_bn", CIFAR, 100, 15_033_380),
    ("resnet44", CIFAR, 10, 658_586),
    ("resnet44", CIFAR, 100, 664_436),
    ("resnet44x2", CIFAR, 10, 2_625_834),
    ("resnet44x2", CIFAR, 100, 2_637_444),
]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "in_shape", "classes", "expected"),
    PARAMETER_COUNTS,
    ids=[f"{n}-{s[1]}px-{c}" for n, s, c, _ in PARAMETER_COUNTS],
)
def test_parameter_count(name: str, in_shape: tuple[int, ...], classes: int, expected: int) -> None:
    assert num_params(build_model(name, in_shape, classes)) == expected


@pytest.mark.parametrize("in_shape", [MNIST, (1, 32, 32)], ids=["28px", "32px"])
def test_lenet5_weights_are_the_published_61706(in_shape: tuple[int, ...]) -> None:
    model = build_model("lenet5", in_shape, 10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = sum(p.numel() for m in layers for p in m.parameters())
    assert weights + 226 == 61_706  # plus the biases that batch norm makes redundant
    assert num_params(model) - weights == 452  # the batch norms' affine parameters


def test_registry_holds_the_paper_networks() -> None:
    paper = {"mnist_mlp", "lenet5", "alexnet", "vgg16_bn", "resnet44", "resnet44x2"}
    assert paper | {"mlp", "cnn1d"} <= set(MODELS)


# --- every network: gradients, curvature hooks, batch norms --------------------------------------
# (name, input shape, classes, batch norms): MNIST nets at 10 classes, CIFAR nets at 10 or 100
NETWORKS = [
    ("mnist_mlp", MNIST, 10, 5),
    ("lenet5", MNIST, 10, 4),
    ("alexnet", CIFAR, 100, 4),
    ("vgg16_bn", CIFAR, 10, 14),  # 13 conv + 1 dense
    ("resnet44", CIFAR, 10, 43),  # stem + 2 per block x 21 blocks
    ("resnet44x2", CIFAR, 100, 43),
]
NET_IDS = [n[0] for n in NETWORKS]
BATCH, GHOST = 4, 2  # a tiny batch of two ghost batches


def batch(in_shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *in_shape, generator=gen), torch.randint(0, classes, (BATCH,), generator=gen)


def classifier(model: nn.Module) -> nn.Linear:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.bias is not None
    return last


@pytest.mark.parametrize(("name", "in_shape", "classes", "norms"), NETWORKS, ids=NET_IDS)
def test_forward_backward(name: str, in_shape: tuple[int, ...], classes: int, norms: int) -> None:
    model = build_model(name, in_shape, classes, ghost_size=GHOST)
    x, y = batch(in_shape, classes)
    out = model(x)
    assert out.shape == (BATCH, classes) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # the classifier bias gradient of the mean cross-entropy is mean_i (softmax_i - onehot_i)
    residual = out.detach().softmax(1) - F.one_hot(y, classes)
    torch.testing.assert_close(classifier(model).bias.grad, residual.mean(0))
    # every weight matrix or kernel is reached (biases before a batch norm have zero gradient)
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() > 1)  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "in_shape", "classes", "norms"), NETWORKS, ids=NET_IDS)
def test_sum_grad_squared_runs(name: str, in_shape: tuple[int, ...], classes: int, norms: int) -> None:
    model = build_model(name, in_shape, classes, ghost_size=GHOST)
    sgs = SumGradSquared(model)
    x, y = batch(in_shape, classes)
    with sgs.recording(BATCH):
        out = model(x)
        F.cross_entropy(out, y).backward()
    sums = sgs.result()
    params = list(model.parameters())
    assert len(sums) == len(params)
    for s, p in zip(sums, params, strict=True):
        assert s.shape == p.shape and torch.isfinite(s).all() and (s >= 0).all()
        # Cauchy-Schwarz: sum_i g_i^2 >= (sum_i g_i)^2 / m = m * grad^2, since the g_i add up to m * grad
        assert p.grad is not None
        slack = BATCH * p.grad.square() - s
        assert slack.max() <= 1e-4 * s.max().clamp_min(1e-12)
    # the classifier bias's per-sample gradient is softmax_i - onehot_i exactly
    residual = out.detach().softmax(1) - F.one_hot(y, classes)
    bias = classifier(model).bias
    torch.testing.assert_close(next(s for s, p in zip(sums, params) if p is bias), residual.square().sum(0))
    sgs.remove()


@pytest.mark.parametrize("ghost_size", [0, GHOST])
@pytest.mark.parametrize(("name", "in_shape", "classes", "norms"), NETWORKS, ids=NET_IDS)
def test_batch_norms_are_ghost_batch_norms(
    name: str, in_shape: tuple[int, ...], classes: int, norms: int, ghost_size: int
) -> None:
    model = build_model(name, in_shape, classes, ghost_size=ghost_size, bn_momentum=0.25)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    bns = ghost_norms(model)
    assert len(bns) == norms
    assert all(bn.ghost_size == ghost_size and bn.momentum == 0.25 for bn in bns)
    model(batch(in_shape, classes)[0])
    assert [bn.ghost_count for bn in bns] == [BATCH // (ghost_size or BATCH)] * norms


def test_ghost_size_that_does_not_divide_the_batch_fails_in_a_network() -> None:
    model = build_model("lenet5", MNIST, 10, ghost_size=3)
    with pytest.raises(ValueError, match="ghost_size 3 does not divide the local batch of 4 samples"):
        model(batch(MNIST, 10)[0])


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet44", "resnet44x2"])
def test_he_initialisation(name: str) -> None:
    model = build_model(name, CIFAR, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if conv.weight.numel() >= 20_000:  # enough draws for a 3% check of the standard deviation
            target = (2 / (conv.out_channels * 9)) ** 0.5  # N(0, 2 / fan_out), fan_out = 9 * out
            assert abs(conv.weight.std().item() / target - 1) < 0.03
        if conv.bias is not None:
            assert (conv.bias == 0).all()


def test_initialisation_follows_the_seed() -> None:
    a, b, c = (build_model("resnet44", CIFAR, 10, seed=s) for s in (3, 3, 4))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    first = next(a.parameters())
    assert (first - next(c.parameters())).abs().max() > 0.1


def test_resnets_use_parameter_free_shortcuts() -> None:
    model = build_model("resnet44", CIFAR, 10)
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))  # no 1x1
    assert sum(isinstance(m, ZeroPadShortcut) for m in model.modules()) == 2  # where stages 2 and 3 start
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])  # identity on the old channels, subsampled
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()  # zeros on the 16 new ones


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg16_bn", "resnet44"])
def test_image_networks_reject_flat_inputs(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} needs \(channels, height, width\) images"):
        build_model(name, (784,), 10)


# --- GhostBatchNorm against chunk-by-chunk batch norm --------------------------------------------
SHAPES = [(12, 5), (12, 5, 7), (12, 5, 3, 4)]
SHAPE_IDS = ["NC", "NCL", "NCHW"]
CHANNEL_DIMS = {2: (0,), 3: (0, 2), 4: (0, 2, 3)}  # dimensions a channel's statistics run over


def gbn_and_inputs(shape: tuple[int, ...], ghost_size: int, seed: int = 0) -> tuple[GhostBatchNorm, Tensor]:
    """A float64 GhostBatchNorm with random affine parameters and running statistics, and an input."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    bn = GhostBatchNorm(c, ghost_size=ghost_size, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1  # mean and scale away from 0, 1
    return bn, x


def chunks(x: Tensor, ghost_size: int) -> tuple[Tensor, ...]:
    return x.split(ghost_size or x.shape[0])


@pytest.mark.parametrize("ghost_size", [3, 4, 0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ghost_batch_norm_equals_chunked_batch_norm(shape: tuple[int, ...], ghost_size: int) -> None:
    bn, x = gbn_and_inputs(shape, ghost_size)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    y = bn(x1)
    y.backward(gy)

    x2 = x.clone().requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    ref = torch.cat([F.batch_norm(ch, None, None, w, b, training=True, eps=bn.eps) for ch in chunks(x2, ghost_size)])
    ref.backward(gy)

    assert_rel_close(y, ref)
    for actual, expected in ((x1.grad, x2.grad), (bn.weight.grad, w.grad), (bn.bias.grad, b.grad)):
        assert actual is not None and expected is not None
        assert_rel_close(actual, expected)


@pytest.mark.parametrize("ghost_size", [3, 4, 0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ghost_batch_norm_statistics_and_xhat(shape: tuple[int, ...], ghost_size: int) -> None:
    bn, x = gbn_and_inputs(shape, ghost_size)
    bn.save_xhat = True
    bn(x)
    dims = CHANNEL_DIMS[len(shape)]
    means = [ch.mean(dims) for ch in chunks(x, ghost_size)]
    variances = [ch.var(dims, correction=1) for ch in chunks(x, ghost_size)]  # unbiased, per ghost batch
    assert bn.ghost_count == len(means) == shape[0] // (ghost_size or shape[0])
    assert bn.stat_sums is not None and bn.stat_sums.shape == (2, shape[1])
    assert_rel_close(bn.stat_sums[0], torch.stack(means).sum(0))
    assert_rel_close(bn.stat_sums[1], torch.stack(variances).sum(0))
    view = [1, -1] + [1] * (len(shape) - 2)
    xhat = [
        (ch - ch.mean(dims).view(view)) / (ch.var(dims, correction=0).view(view) + bn.eps).sqrt()
        for ch in chunks(x, ghost_size)
    ]
    assert bn.saved_xhat is not None
    assert_rel_close(bn.saved_xhat, torch.cat(xhat))


def test_update_running_stats_moves_towards_the_ghost_averages() -> None:
    bn, x = gbn_and_inputs((12, 5, 3, 4), ghost_size=4)
    before = bn.running_mean.clone(), bn.running_var.clone()
    bn(x)
    assert bn.stat_sums is not None
    update_running_stats([bn], [bn.stat_sums], bn.ghost_count)
    # running <- (1 - momentum) * running + momentum * average, momentum 0.3
    dims = (0, 2, 3)
    expected_mean = torch.stack([ch.mean(dims) for ch in x.split(4)]).mean(0)
    expected_var = torch.stack([ch.var(dims, correction=1) for ch in x.split(4)]).mean(0)
    assert_rel_close(bn.running_mean, 0.7 * before[0] + 0.3 * expected_mean)
    assert_rel_close(bn.running_var, 0.7 * before[1] + 0.3 * expected_var)


def test_update_running_stats_of_several_norms_each_with_its_momentum() -> None:
    """One call updates every batch norm, grouped by momentum, each as if updated alone."""
    torch.manual_seed(3)
    norms = [GhostBatchNorm(c, momentum=m).double() for c, m in ((3, 0.1), (5, 0.3), (4, 0.1))]
    for bn in norms:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    sums = [torch.randn(2, bn.num_features, dtype=torch.float64).abs() for bn in norms]
    expected = [
        (
            (1 - bn.momentum) * bn.running_mean + bn.momentum * c[0] / 6,
            (1 - bn.momentum) * bn.running_var + bn.momentum * c[1] / 6,
        )
        for bn, c in zip(norms, sums)
    ]
    update_running_stats(norms, sums, ghosts=6)
    for bn, (mean, var) in zip(norms, expected):
        assert_rel_close(bn.running_mean, mean)
        assert_rel_close(bn.running_var, var)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ghost_size_zero_is_torch_batch_norm(shape: tuple[int, ...]) -> None:
    bn, x = gbn_and_inputs(shape, ghost_size=0)
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1], momentum=0.3).double()
    ref.load_state_dict(bn.state_dict(), strict=False)  # same weight, bias and running statistics
    assert_rel_close(bn(x), ref(x))  # training mode; torch updates its running statistics here
    assert bn.stat_sums is not None and bn.ghost_count == 1
    update_running_stats([bn], [bn.stat_sums], 1)  # one ghost batch: the sums are the averages
    assert ref.running_mean is not None and ref.running_var is not None
    assert_rel_close(bn.running_mean, ref.running_mean)
    assert_rel_close(bn.running_var, ref.running_var)
    bn.eval()
    ref.eval()
    assert_rel_close(bn(x), ref(x))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_eval_mode_uses_running_statistics(shape: tuple[int, ...]) -> None:
    bn, x = gbn_and_inputs(shape, ghost_size=4)
    bn.eval()
    x = x[:5]  # eval ignores ghost batches: any batch size
    view = [1, -1] + [1] * (len(shape) - 2)
    expected = (x - bn.running_mean.view(view)) / (bn.running_var.view(view) + bn.eps).sqrt()
    expected = expected * bn.weight.view(view) + bn.bias.view(view)
    assert_rel_close(bn(x), expected.detach())
    assert bn.stat_sums is None and bn.ghost_count == 0  # nothing recorded for the running statistics


def test_ghost_size_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="ghost_size 4 does not divide the local batch of 10 samples"):
        GhostBatchNorm(3, ghost_size=4)(torch.randn(10, 3))


def test_ghost_batches_of_one_value_normalise_to_zero() -> None:
    bn, x = gbn_and_inputs((6, 4), ghost_size=1)
    x.requires_grad_()
    bn.save_xhat = True
    y = bn(x)
    assert torch.equal(y, bn.bias.expand(6, 4))  # xhat = 0: each value is its own ghost mean
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(6, 4, dtype=torch.float64))
    assert bn.ghost_count == 6 and bn.stat_sums is not None
    assert_rel_close(bn.stat_sums[0], x.detach().sum(0))
    assert (bn.stat_sums[1] == 0).all() and bn.saved_xhat is not None and (bn.saved_xhat == 0).all()


def test_ghost_batch_norm_second_derivatives() -> None:
    """Double backward works (Hessian-vector products through training-mode batch norm)."""
    bn, x = gbn_and_inputs((6, 2, 3), ghost_size=3)
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), w, b))
