"""Layer handlers: one per layer type (as in BackPACK), each turning what its layer kept from the forward
pass and the output gradient delta into curvature sums. Each curvature quantity is one method.

Batch norm couples the samples of a (ghost) batch through its statistics, so in training mode the
gradient of l_i is not a per-sample quantity. Under batch norm in training mode the suite DEFINES g_i as
sample i's contribution to the batch gradient: the batch gradient is sum_i g_i, and each g_i is built from
sample i's layer input and its backpropagated output gradient delta_i (which carries the coupling). This
is what the hooks see, and in eval mode, or without batch norm, it is the true per-sample gradient.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from types import EllipsisType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.curvature.taps import by_taps, sum_squares_by_taps
from hpcnoise.models import GhostBatchNorm


class ConvMode(str, enum.Enum):
    """How convolution weights get their squared per-sample gradients."""

    EXACT = "exact"  # true per-sample gradients sum_t delta_{i,t} a_{i,t}^T, squared and summed
    SPATIAL = "spatial"  # the paper's Appendix C: sum_t delta_{i,t}^2 (a_{i,t}^2)^T (spatial independence)


ConvProducts = Literal["taps", "patches"]  # how exact convolution sums form the per-sample products


@dataclass(frozen=True)
class HookOptions:
    """Settings the handlers share."""

    conv_mode: ConvMode = ConvMode.EXACT
    chunk_size: int = 256  # samples per per-sample-gradient chunk; bounds the (chunk, out, in*k) buffer
    # exact convolution sums by "taps" or by "patches" (hpcnoise.curvature.taps); None: ``by_taps`` picks
    conv_products: ConvProducts | None = None


Sums = dict[str, Tensor]  # parameter name ("weight", "bias") -> accumulator of the parameter's shape


class LayerHandler:
    """What one layer type keeps from its forward pass, and the curvature sums it computes from it.

    ``save`` runs in the forward hook; quantity methods such as ``sum_grad_squared`` run in the tensor
    hook on the layer output, receive delta = d(loss)/d(output) as autograd delivers it (no 1/m undone) and
    add into ``sums`` in place. They run under ``torch.no_grad``.
    """

    def check(self, module: nn.Module) -> None:
        """Raise if the module is configured in a way the handler does not support."""

    def save(self, module: nn.Module, inp: Tensor) -> Tensor:
        """The tensor the backward computation needs; by default the layer input."""
        return inp.detach()

    def sum_grad_squared(self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions) -> None:
        raise NotImplementedError

    def signed_sum(
        self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions, signs: Tensor
    ) -> None:
        """sums += sum_i sigma_i g_i (up to the 1/m the recording undoes): full-Fisher noise samples."""
        raise NotImplementedError

    def kfac(self, module: nn.Module, saved: Tensor, delta: Tensor, factors: list[Tensor], opts: HookOptions) -> None:
        """factors[0] += sum_i (1/T) sum_t a a^T (input, with a 1 for the bias); factors[1] += sum_{i,t} delta delta^T.

        Layers without a Kronecker factorisation (batch norm) do not implement it.
        """
        raise NotImplementedError

    def kfac_shapes(self, module: nn.Module) -> tuple[int, int] | None:
        """(input size incl. bias column, output size) of the K-FAC factors, or None if not factored."""
        return None


def _homogeneous(a: Tensor, bias: bool) -> Tensor:
    """Append a column of ones (the bias's input) to rows a: (R, K) -> (R, K + 1)."""
    return torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if bias else a


def _sum_sq_per_sample(a: Tensor, delta: Tensor, out: Tensor, chunk: int) -> None:
    """out += sum_i (delta_i^T a_i)^2 for a: (N, T, K), delta: (N, T, O), out: (O, K).

    The per-sample products sum_t delta_{i,t} a_{i,t}^T are formed ``chunk`` samples at a time (one
    batched matmul each), squared in place and summed, so at most (chunk, O, K) floats are held.
    """
    for start in range(0, a.shape[0], chunk):
        g = torch.bmm(delta[start : start + chunk].transpose(1, 2), a[start : start + chunk])  # (c, O, K)
        out += g.square_().sum(0)


class LinearHandler(LayerHandler):
    """nn.Linear. Input (N, in): sum_i g_i^2 = (delta^2)^T (a^2), one extra weight-sized matmul, exact.

    Inputs with extra dimensions (N, ..., in) share the weight across positions, so they use explicit
    per-sample products (chunked), like exact convolutions.
    """

    def sum_grad_squared(self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions) -> None:
        if saved.dim() == 2:
            d2 = delta.square()  # (N, out)
            sums["weight"].addmm_(d2.t(), saved.square())
            if "bias" in sums:
                sums["bias"] += d2.sum(0)
            return
        n = saved.shape[0]
        a = saved.reshape(n, -1, saved.shape[-1])  # (N, T, in)
        d = delta.reshape(n, -1, delta.shape[-1])  # (N, T, out)
        _sum_sq_per_sample(a, d, sums["weight"], opts.chunk_size)
        if "bias" in sums:
            sums["bias"] += d.sum(1).square_().sum(0)

    def signed_sum(
        self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions, signs: Tensor
    ) -> None:
        sd = delta * signs.view(-1, *[1] * (delta.dim() - 1))
        sums["weight"].addmm_(sd.reshape(-1, sd.shape[-1]).t(), saved.reshape(-1, saved.shape[-1]))
        if "bias" in sums:
            sums["bias"] += sd.reshape(-1, sd.shape[-1]).sum(0)

    def kfac(self, module: nn.Module, saved: Tensor, delta: Tensor, factors: list[Tensor], opts: HookOptions) -> None:
        assert isinstance(module, nn.Linear)
        positions = saved[0].numel() // saved.shape[-1]  # T: shared-weight positions per sample
        a = _homogeneous(saved.reshape(-1, saved.shape[-1]), module.bias is not None)
        factors[0].addmm_(a.t(), a, alpha=1.0 / positions)
        d = delta.reshape(-1, delta.shape[-1])
        factors[1].addmm_(d.t(), d)

    def kfac_shapes(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.in_features + (module.bias is not None), module.out_features


_ConvNd = nn.Conv1d | nn.Conv2d


class ConvHandler(LayerHandler):
    """nn.Conv1d and nn.Conv2d (any stride, padding, dilation and padding mode; groups=1).

    Exact: per-sample weight gradients from the unfolded input, sum_t delta_{i,t} a_{i,t}^T, squared and
    summed in chunks; bias sum_i (sum_t delta_{i,t})^2. Spatial (Appendix C): sum_{i,t} delta_{i,t}^2
    (a_{i,t}^2)^T, which is the weight gradient of the same convolution applied to a^2 with output
    gradient delta^2, so it runs as one native convolution backward; bias sum_{i,t} delta_{i,t}^2. The two
    agree when the output has a single position.
    """

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, _ConvNd)
        if module.groups != 1:
            raise ValueError(
                f"{type(module).__name__} with groups={module.groups}: per-sample squared gradients "
                "support groups=1 only"
            )

    @staticmethod
    def _pad_amounts(module: _ConvNd) -> tuple[list[int], str]:
        """F.pad amounts (last dimension first) and mode of the padding the convolution applies."""
        if isinstance(module.padding, str):  # 'valid' or 'same' (which may be asymmetric)
            pad = list(module._reversed_padding_repeated_twice)
        else:
            pad = [q for p in reversed(module.padding) for q in (p, p)]
        return pad, "constant" if module.padding_mode == "zeros" else module.padding_mode

    @staticmethod
    def _patches(module: _ConvNd, x: Tensor) -> Tensor:
        """Patches of a padded input (c, C, *spatial) as (c, T, C * prod(kernel)), in one copy.

        Columns are ordered as weight.view(out, -1). Built from strided views (Tensor.unfold), which
        on CPU is several times faster than F.unfold, whose im2col loops over samples.
        """
        nd = x.dim() - 2
        for i in range(nd):  # each unfold appends a window dimension of span dilation * (k - 1) + 1
            span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
            x = x.unfold(2 + i, span, module.stride[i])
        taps: tuple[EllipsisType | slice, ...] = (..., *(slice(None, None, d) for d in module.dilation))
        x = x[taps]  # every d-th element of each window: (c, C, *T, *kernel)
        perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]  # -> (c, *T, C, *kernel)
        # contiguous(): where reshape can return a view (one input channel), its overlapping windows
        # would make bmm copy sample by sample
        return x.permute(perm).reshape(x.shape[0], -1, module.weight[0].numel()).contiguous()

    def sum_grad_squared(self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions) -> None:
        assert isinstance(module, _ConvNd)
        n, out_ch = delta.shape[:2]
        positions = tuple(range(2, delta.dim()))
        if opts.conv_mode is ConvMode.SPATIAL:
            d2 = delta.square()
            # padding commutes with squaring: pad(a)^2 = pad(a^2) for every padding mode
            sums["weight"] += self._weight_gradient(module, saved.square(), d2, sums["weight"])
            if "bias" in sums:
                sums["bias"] += d2.sum((0, *positions))
            return
        if "bias" in sums:
            sums["bias"] += delta.sum(positions).square_().sum(0)  # sum_i (sum_t delta_{i,t})^2
        if by_taps(module, delta) if opts.conv_products is None else opts.conv_products == "taps":
            pad, mode = self._pad_amounts(module)
            for start in range(0, n, opts.chunk_size):
                x, d = saved[start : start + opts.chunk_size], delta[start : start + opts.chunk_size]
                padded = F.pad(x, pad, mode=mode) if any(pad) else x
                sum_squares_by_taps(padded, d, sums["weight"], module.stride, module.dilation, module.kernel_size)
            return
        w = sums["weight"].view(out_ch, -1)  # (out, C*k)
        for a, d in self._chunks(module, saved, delta, opts.chunk_size):
            _sum_sq_per_sample(a, d, w, opts.chunk_size)

    def _weight_gradient(self, module: _ConvNd, x: Tensor, d: Tensor, like: Tensor) -> Tensor:
        """The weight gradient of ``module`` for input ``x`` and output gradient ``d``, summed over the
        batch, shaped and laid out as ``like``: one native convolution backward (the input padded first
        where the kernel cannot pad)."""
        pad, mode = self._pad_amounts(module)
        zero_pad = mode == "constant" and pad[::2] == pad[1::2]  # symmetric zeros: the kernel can pad
        if not zero_pad:
            x = F.pad(x, pad, mode=mode)
        grads: tuple[Tensor, Tensor, Tensor] = torch.ops.aten.convolution_backward(
            d, x, like, None, module.stride, pad[-2::-2] if zero_pad else [0] * len(pad[::2]),
            module.dilation, False, [0] * (x.dim() - 2), 1, (False, True, False),
        )  # fmt: skip
        return grads[1]

    def _chunks(self, module: _ConvNd, saved: Tensor, delta: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(patches (c, T, C*k), delta (c, T, out)) chunk by chunk: patches are k times the input's size."""
        n, out_ch = delta.shape[:2]
        pad, mode = self._pad_amounts(module)
        d = delta.reshape(n, out_ch, -1).transpose(1, 2)
        for start in range(0, n, chunk):
            x = saved[start : start + chunk]
            yield self._patches(module, F.pad(x, pad, mode=mode) if any(pad) else x), d[start : start + chunk]

    def signed_sum(
        self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions, signs: Tensor
    ) -> None:
        """The weight gradient with each sample's output gradient signed: one native convolution backward."""
        assert isinstance(module, _ConvNd)
        sd = delta * signs.view(-1, *[1] * (delta.dim() - 1))
        sums["weight"] += self._weight_gradient(module, saved, sd, sums["weight"])
        if "bias" in sums:
            sums["bias"] += sd.sum((0, *range(2, sd.dim())))

    def kfac(self, module: nn.Module, saved: Tensor, delta: Tensor, factors: list[Tensor], opts: HookOptions) -> None:
        """KFC (Grosse & Martens 2016): A over patches averaged over positions, G summed over positions."""
        assert isinstance(module, _ConvNd)
        for a, d in self._chunks(module, saved, delta, opts.chunk_size):
            rows = _homogeneous(a.reshape(-1, a.shape[-1]), module.bias is not None)
            factors[0].addmm_(rows.t(), rows, alpha=1.0 / a.shape[1])
            dr = d.reshape(-1, d.shape[-1])
            factors[1].addmm_(dr.t(), dr)

    def kfac_shapes(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, _ConvNd)
        return module.weight[0].numel() + (module.bias is not None), module.out_channels


class GhostBatchNormHandler(LayerHandler):
    """hpcnoise.models.GhostBatchNorm affine parameters.

    g_i(weight) = sum over positions of delta_i * xhat_i and g_i(bias) = sum over positions of delta_i,
    with xhat the normalised input. In training mode this is sample i's contribution to the batch
    gradient (see the module docstring); the module hands over xhat when ``save_xhat`` is set. In eval
    mode xhat comes from the running statistics and g_i is the exact per-sample gradient.
    """

    def save(self, module: nn.Module, inp: Tensor) -> Tensor:
        assert isinstance(module, GhostBatchNorm)
        if module.training:
            xhat = module.saved_xhat
            if xhat is None:
                raise RuntimeError("GhostBatchNorm did not save xhat; is save_xhat set?")
            module.saved_xhat = None  # the hook holds it until the backward, then drops it
            return xhat
        shape = [1, -1] + [1] * (inp.dim() - 2)
        mean, var = module.running_mean, module.running_var
        return (inp.detach() - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)

    def sum_grad_squared(self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions) -> None:
        if delta.dim() == 2:
            sums["weight"] += (delta * saved).square_().sum(0)
            sums["bias"] += delta.square().sum(0)
            return
        dims = tuple(range(2, delta.dim()))  # spatial positions
        sums["weight"] += (delta * saved).sum(dims).square_().sum(0)
        sums["bias"] += delta.sum(dims).square_().sum(0)

    def signed_sum(
        self, module: nn.Module, saved: Tensor, delta: Tensor, sums: Sums, opts: HookOptions, signs: Tensor
    ) -> None:
        dims = tuple(range(2, delta.dim()))
        per_w = (delta * saved).sum(dims) if dims else delta * saved  # (N, C)
        per_b = delta.sum(dims) if dims else delta
        sums["weight"] += signs @ per_w
        sums["bias"] += signs @ per_b


HANDLERS: dict[type[nn.Module], LayerHandler] = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(),
    nn.Conv2d: ConvHandler(),
    GhostBatchNorm: GhostBatchNormHandler(),
}
