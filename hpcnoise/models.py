"""Networks, and the (ghost) batch norm they all use.

A Linear or Conv layer followed by batch norm has no bias: batch norm removes it, so its batch gradient
is zero, yet its per-sample gradients are not, and Fisher noise would make it random-walk while the
running mean follows it with a lag (a train/eval mismatch). Parameter counts are the published
architectures' minus those redundant biases.

Every network is built by a function registered in ``MODELS`` under its CLI name. Builders receive the
input shape (without the batch dimension), the number of classes and a ``norm`` factory; every batch
norm in every network comes from that factory, so ghost batch norm is a config switch, not a variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]
SumOverWorkers = Callable[[Tensor, str], Tensor]  # sums a tensor over all workers in place (collective name)


class GhostBatchNorm(nn.Module):
    """Batch norm whose statistics come from ghost batches of ``ghost_size`` samples (Hoffer et al. 2017).

    Works on (N, C), (N, C, L) and (N, C, H, W). ``ghost_size=0`` means one ghost batch per forward
    (the whole local batch): plain batch norm. All ghost batches are normalised by one native
    batch-norm call on a (ghost_size, ghosts * C, ...) rearrangement of the batch, not a loop over chunks.
    A ghost batch with one value per channel normalises to 0 (its output is the bias).

    Running statistics are NOT updated in ``forward``. Instead, each training forward leaves
    ``stat_sums``: the sum over its ghost batches of the ghost means and of the unbiased ghost
    variances. The training step adds these sums to its one fused allreduce and calls
    ``update_running_stats`` with the sums over all ghost batches of the global batch, once per
    step, with momentum ``momentum``: running <- (1 - momentum) * running + momentum * average.
    This differs from Hoffer et al., who update sequentially per ghost batch (an effective per-step
    momentum of 1 - (1 - momentum)^K for K ghost batches, weighted towards the last one); averaging is
    order-independent, so buffers are identical across ranks and world sizes.

    Without ghost batches (``ghost_size=0``) a forward normalises the local batch, which depends on the
    world size W. Inside ``synchronized`` it normalises the GLOBAL batch instead (sync batch norm,
    ``_GlobalBatchNorm``): the statistics and the backward's sums are summed over workers, so W ranks
    of m samples compute what one rank of W * m does. ``stat_sums`` then holds the global mean and
    unbiased variance on every rank (one "ghost batch" per rank, so the step's average over the W
    ranks' sums gives them back).
    """

    running_mean: torch.Tensor  # buffers, declared for type checkers (nn.Module types attributes loosely)
    running_var: torch.Tensor

    def __init__(self, num_features: int, ghost_size: int = 0, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.ghost_size = ghost_size
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.stat_sums: torch.Tensor | None = None  # (2, C): summed ghost means, summed ghost variances
        self.ghost_count = 0  # ghost batches behind stat_sums
        self.save_xhat = False  # set by curvature hooks that need the normalised input
        self.saved_xhat: torch.Tensor | None = None
        self.sum_over_workers: SumOverWorkers | None = None  # set inside ``synchronized``
        self.name = "bn"  # names its collectives; set by ``synchronized``

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"

    def _shape(self, x: torch.Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            xhat = (x - self.running_mean.view(self._shape(x))) * torch.rsqrt(
                self.running_var.view(self._shape(x)) + self.eps
            )
            return xhat * self.weight.view(self._shape(x)) + self.bias.view(self._shape(x))
        n, c = x.shape[0], x.shape[1]
        g = self.ghost_size or n
        if n % g:
            raise ValueError(f"ghost_size {g} does not divide the local batch of {n} samples")
        k = n // g  # ghost batches
        count = x.numel() // (k * c)  # values per channel per ghost batch
        if self.sum_over_workers is not None and k == 1:
            return self._global(x)
        if count == 1:  # a lone value is its own mean: xhat = 0 (gradient 0) and the variance is 0
            return self._single_value(x, k)
        # Every (ghost batch, channel) pair becomes a channel of its own, (k*g, C, ...) -> (g, k*C, ...),
        # so one native batch-norm call normalises them all over contiguous memory (on CPU several times
        # faster, forward and backward, than reductions over the strided ghost dimension). The kernel
        # writes each pair's mean and unbiased variance into ``stats`` (momentum 1 replaces the zeros).
        rest = x.shape[2:]

        def back(t: torch.Tensor) -> torch.Tensor:  # (g, k*C, ...) -> (k*g, C, ...)
            return t if k == 1 else t.reshape(g, k, c, *rest).transpose(0, 1).reshape(x.shape)

        xt = x if k == 1 else x.reshape(k, g, c, *rest).transpose(0, 1).reshape(g, k * c, *rest)
        stats = x.new_zeros(2, k * c)
        weight, bias = (self.weight, self.bias) if k == 1 else (self.weight.repeat(k), self.bias.repeat(k))
        yt, mean, invstd = torch.native_batch_norm(xt, weight, bias, stats[0], stats[1], True, 1.0, self.eps)
        with torch.no_grad():
            self.stat_sums = stats.view(2, k, c).sum(1)
            self.ghost_count = k
            if self.save_xhat:  # the normalised input, from the kernel's own ghost means and 1/std,
                # formed in x's own layout (ghost batch k as a leading dimension), so no transposing copy
                per_ghost = [k, 1, c] + [1] * len(rest)
                xv = x.detach().reshape(k, g, c, *rest)
                self.saved_xhat = (xv - mean.view(per_ghost)).mul_(invstd.view(per_ghost)).view(x.shape)
        return back(yt)

    def _single_value(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Training forward when each ghost batch holds one value per channel: the output is the bias."""
        xhat = x * 0  # keeps x in the graph, so earlier layers receive (zero) gradients
        with torch.no_grad():
            self.stat_sums = torch.stack([x.reshape(k, -1).sum(0), x.new_zeros(x.shape[1])])
            self.ghost_count = k
            if self.save_xhat:
                self.saved_xhat = xhat.detach()
        return xhat * self.weight.view(self._shape(x)) + self.bias.view(self._shape(x))

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward over the global batch (statistics summed over workers)."""
        assert self.sum_over_workers is not None
        y, xhat, stats = _GlobalBatchNorm.apply(
            x, self.weight, self.bias, self.eps, self.running_mean, self.sum_over_workers, self.name
        )
        self.stat_sums = stats
        self.ghost_count = 1
        if self.save_xhat:
            self.saved_xhat = xhat
        return y


@torch.no_grad()
def update_running_stats(norms: list[GhostBatchNorm], sums: list[torch.Tensor], ghosts: int) -> None:
    """Move every batch norm's running statistics towards the global ghost-batch averages, once per step:
    running <- (1 - momentum) running + momentum * (sum / ghosts), with ``sums`` the batch norms'
    ``stat_sums`` summed over workers and ``ghosts`` the ghost batches in the global batch. Multi-tensor
    (foreach) kernels over all batch norms of one momentum, not four small operations per layer."""
    by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for bn, c in zip(norms, sums, strict=True):
        running, stats = by_momentum.setdefault(bn.momentum, ([], []))
        running += [bn.running_mean, bn.running_var]
        stats += list(c.view(2, -1))  # the summed ghost means, then the summed ghost variances
    for momentum, (running, stats) in by_momentum.items():
        torch._foreach_mul_(running, 1 - momentum)
        torch._foreach_add_(running, stats, alpha=momentum / ghosts)


def ghost_norms(model: nn.Module) -> list[GhostBatchNorm]:
    """All batch norms of a model, in module order (the order their statistics are packed in)."""
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm)]


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm over the global batch, each worker holding a share of it (sync batch norm).

    Hand-written because Horovod's SyncBatchNorm (and torch's) runs on CUDA only, updates the running
    statistics inside every forward and is a different module (other state_dict keys, no ``stat_sums``
    for the step's once-per-step update, no normalised input for the curvature hooks). Per channel,
    with N the global count: forward sums sum(x - K) and sum((x - K)^2) over workers in one collective,
    K the running mean (the same on every rank); backward sums sum(dy) and sum(dy * xhat) and forms
    dx = weight / std * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N), the gradient of the SUM of the
    workers' losses with respect to this worker's inputs. The step averages the W workers' gradients,
    so the result is the gradient of the global mean loss, as with one worker.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, shift, sum_over_workers, name):  # type: ignore[override]
        dims = [0, *range(2, x.dim())]  # every dimension but the channel
        shape = [1, -1] + [1] * (x.dim() - 2)
        # One collective: the sums of x - K and (x - K)^2 about a shift K identical on every rank (the
        # running mean), so var = E(x - K)^2 - (mean - K)^2 cancels only (mean - K)^2 / var, small once
        # the running mean follows the batch (at the start, K = 0: the raw moments of the layer input).
        shifted = x - shift.view(shape)
        sums = torch.cat([shifted.sum(dims), shifted.square().sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
        sum_over_workers(sums, f"{name}.stats")  # a fill above, not a host copy, for the count
        c = shift.numel()
        n = sums[-1]
        offset = sums[:c] / n  # mean - K
        var = (sums[c : 2 * c] / n - offset.square()).clamp_min(0)  # biased, for normalising
        mean = shift + offset
        invstd = torch.rsqrt(var + eps)
        xhat = (shifted - offset.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.sum_over_workers, ctx.name, ctx.dims, ctx.shape = sum_over_workers, name, dims, shape
        stats = torch.stack([mean, var * n / (n - 1).clamp_min(1)])  # mean and unbiased variance
        ctx.mark_non_differentiable(xhat, stats)
        return xhat * weight.view(shape) + bias.view(shape), xhat, stats

    @staticmethod
    def backward(ctx, dy, _dxhat, _dstats):  # type: ignore[override]
        xhat, weight, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local = torch.stack([dy.sum(dims), (dy * xhat).sum(dims)])  # the local d(bias), d(weight)
        summed = ctx.sum_over_workers(local.clone(), f"{ctx.name}.grad")
        dx = (weight * invstd).view(shape) * (dy - summed[0].div(n).view(shape) - xhat * summed[1].div(n).view(shape))
        return dx, local[1], local[0], None, None, None, None


@contextmanager
def synchronized(model: nn.Module, sum_over_workers: SumOverWorkers | None) -> Iterator[None]:
    """Inside, every batch norm without ghost batches normalises the global batch (``None``: no-op)."""
    norms = ghost_norms(model) if sum_over_workers is not None else []
    for i, bn in enumerate(norms):
        bn.sum_over_workers, bn.name = sum_over_workers, f"hpcnoise.bn{i}"
    try:
        yield
    finally:
        for bn in norms:
            bn.sum_over_workers = None


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[tuple[int, ...], int, NormFactory], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {}


def register(name: str, description: str) -> Callable:
    def wrap(fn: Callable[[tuple[int, ...], int, NormFactory], nn.Module]) -> Callable:
        MODELS[name] = ModelSpec(fn, description)
        return fn

    return wrap


def build_model(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    ghost_size: int = 0,
    bn_momentum: float = 0.1,
    seed: int = 0,
) -> nn.Module:
    """Build a registered network with initial weights drawn from its own generator (``seed``)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")

    def norm(c: int) -> nn.Module:
        return GhostBatchNorm(c, ghost_size=ghost_size, momentum=bn_momentum)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name].build(in_shape, num_classes, norm)


def _dense(fan_in: int, widths: tuple[int, ...], num_classes: int, norm: NormFactory) -> list[nn.Module]:
    """Hidden layers linear (no bias) -> batch norm -> ReLU of the given widths, then the linear classifier."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(fan_in, width, bias=False), norm(width), nn.ReLU()]
        fan_in = width
    return [*layers, nn.Linear(fan_in, num_classes)]


@register("mlp", "MLP: 2 hidden layers of 512 units, batch norm, ReLU")
def mlp(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 512) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *_dense(math.prod(in_shape), (width, width), num_classes, norm))


@register("cnn1d", "1-D CNN: 3 conv layers of 32 channels (kernel 5), batch norm, ReLU, linear head")
def cnn1d(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 32) -> nn.Module:
    channels, length = (1, in_shape[0]) if len(in_shape) == 1 else in_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (channels, length))]
    for stride in (1, 2, 2):
        layers += [nn.Conv1d(channels, width, 5, stride=stride, padding=2, bias=False), norm(width), nn.ReLU()]
        channels, length = width, (length - 1) // stride + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * length, num_classes))


# --- the paper's networks (Table 1) ------------------------------------------------------------------
# The paper names its networks (MLP, LeNet, AlexNet, VGG16, ResNet44, ResNet44x2) but gives no widths.
# Its large-batch baseline is Hoffer et al.'s (2017) ghost batch norm, so where the paper is silent we
# follow the networks of Hoffer et al.'s code and of Keskar et al. (2016), which both papers cite.
# No network has dropout: its masks would come from torch's global generator, outside the suite's
# per-stream seeding, and would differ between 1 x M and W x M/W runs of the same global batch.


def _image(in_shape: tuple[int, ...], name: str, min_size: int = 1) -> tuple[int, int, int]:
    """(channels, height, width) of an image input shape, or a clear error."""
    if len(in_shape) != 3 or min(in_shape[1:]) < min_size:
        raise ValueError(f"{name} needs (channels, height, width) images of at least {min_size} pixels, got {in_shape}")
    return in_shape[0], in_shape[1], in_shape[2]


def _he_init_convs(model: nn.Module) -> nn.Module:
    """He et al. (2015) initialisation of every convolution: N(0, 2 / (k * k * out_channels)), zero bias.

    The fan-out form of the ResNet authors' code (fb.resnet.torch) and of Zagoruyko's CIFAR VGG; linear
    layers keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


@register("mnist_mlp", "MLP for MNIST (Keskar et al.'s F1): 5 hidden layers of 512, batch norm, ReLU")
def mnist_mlp(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 512) -> nn.Module:
    """Keskar et al.'s (2016) F1 as in Hoffer et al.'s code: 784-512-512-512-512-512-10.

    Each hidden layer is linear -> batch norm -> ReLU; PyTorch's default initialisation, as in that code.
    """
    return nn.Sequential(nn.Flatten(), *_dense(math.prod(in_shape), (width,) * 5, num_classes, norm))


@register("lenet5", "LeNet-5 (LeCun et al. 1998) with batch norm; 28x28 inputs padded to its 32x32 retina")
def lenet5(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """LeNet-5 with a fully connected C3: conv 5x5 x6, pool, conv 5x5 x16, pool, dense 120, 84, classes.

    Its convolutions and dense layers hold the usual 61,706 parameters (1 input channel, 10 classes).
    Inputs smaller than 32 x 32 are zero-padded by the first convolution (2 pixels for 28 x 28). Modern
    choices where the 1998 net differs: ReLU and 2x2 max pooling instead of scaled tanh and trainable
    subsampling, and batch norm after each hidden layer, since the paper trains LeNet with ghost batch
    norm. PyTorch's default initialisation (uniform, scale 1/sqrt(fan_in)).
    """
    channels, h, w = _image(in_shape, "lenet5", min_size=28)
    pad = max(0, (32 - min(h, w)) // 2)

    def features(size: int) -> int:  # conv 5x5, pool 2, conv 5x5, pool 2
        return ((size + 2 * pad - 4) // 2 - 4) // 2

    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad, bias=False),
        norm(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, bias=False),
        norm(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *_dense(16 * features(h) * features(w), (120, 84), num_classes, norm),
    )


@register("alexnet", "CIFAR AlexNet (Keskar et al.'s C1/C3): conv 5x5 x64 twice, dense 384, 192, batch norm")
def alexnet(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """The paper's "shallow convolutional" AlexNet, read as Keskar et al.'s (2016) C1/C3.

    Keskar et al. describe C1 (CIFAR-10) and C3 (CIFAR-100) as a modified AlexNet; this is the PyTorch
    form in Hoffer et al.'s code: two blocks of conv 5x5 (64 channels, no bias) -> max pool 3 stride 2 ->
    batch norm -> ReLU, dense 384 and 192 (no bias) -> batch norm -> ReLU, and the classifier. PyTorch's
    default initialisation, as in that code.
    """
    channels, h, w = _image(in_shape, "alexnet", min_size=7)

    def features(size: int) -> int:  # two max pools of 3, stride 2, no padding
        for _ in range(2):
            size = (size - 3) // 2 + 1
        return size

    return nn.Sequential(
        nn.Conv2d(channels, 64, 5, padding=2, bias=False),
        nn.MaxPool2d(3, stride=2),
        norm(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 5, padding=2, bias=False),
        nn.MaxPool2d(3, stride=2),
        norm(64),
        nn.ReLU(),
        nn.Flatten(),
        *_dense(64 * features(h) * features(w), (384, 192), num_classes, norm),
    )


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register("vgg16_bn", "VGG16 with batch norm for CIFAR: 13 conv 3x3 layers, a 512-unit hidden layer")
def vgg16_bn(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """VGG16 (Simonyan & Zisserman 2014, configuration D) in its CIFAR form with batch norm.

    As in Zagoruyko's cifar.torch and Keskar et al.'s C2/C4: 13 conv 3x3 -> batch norm -> ReLU layers
    with five 2x2 max pools, then dense 512 -> batch norm -> ReLU and the classifier. He initialisation.
    """
    channels, h, w = _image(in_shape, "vgg16_bn", min_size=32)
    layers: list[nn.Module] = []
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), norm(v), nn.ReLU()]
            channels = v
    return _he_init_convs(nn.Sequential(*layers, nn.Flatten(), *_dense(channels * h * w, (512,), num_classes, norm)))


class ZeroPadShortcut(nn.Module):
    """He et al.'s (2016) option-A shortcut: subsample by ``stride``, zero-pad the new channels.

    Parameter-free, so the curvature hooks have nothing to do for it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_lo = (out_channels - in_channels) // 2  # new channels, split between both ends
        self.pad_hi = out_channels - in_channels - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    """Residual block: conv 3x3 -> batch norm -> ReLU -> conv 3x3 -> batch norm, plus shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else ZeroPadShortcut(in_channels, out_channels, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, n: int, width: int) -> nn.Module:
    """He et al.'s (2016) CIFAR ResNet of 6n + 2 layers.

    Conv 3x3 -> batch norm -> ReLU, three stages of n basic blocks with width, 2 x width and 4 x width
    channels (stride 2 and option-A shortcuts where a stage starts), global average pooling, classifier.
    Convolutions have no bias (batch norm follows); He initialisation.
    """
    channels = _image(in_shape, f"resnet{6 * n + 2}")[0]
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
    c = width
    for stage in range(3):
        out = width * 2**stage
        for block in range(n):
            layers.append(BasicBlock(c, out, 2 if stage > 0 and block == 0 else 1, norm))
            c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return _he_init_convs(nn.Sequential(*layers))


@register("resnet44", "ResNet-44 for CIFAR (He et al. 2016): 3 x 7 blocks, widths 16/32/64, option-A")
def resnet44(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    return cifar_resnet(in_shape, num_classes, norm, n=7, width=16)


@register("resnet44x2", "ResNet-44 twice as wide (the paper's CIFAR-100 net): widths 32/64/128")
def resnet44x2(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    return cifar_resnet(in_shape, num_classes, norm, n=7, width=32)
