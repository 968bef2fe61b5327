"""Per-sample curvature quantities from one forward and backward pass, with module hooks.

``SumGradSquared`` gives, for every parameter, S = sum_i g_i * g_i over the samples of a batch, where g_i is
the gradient of the individual loss l_i. The training step backpropagates the MEAN loss, so the output
gradient autograd delivers is (1/m) dl_i/dy_i; the hooks square it as it comes and multiply the sums by
m^2 once, when the recording ends. diag F of the global batch is then (sum over workers of S) / M_L.

Layer types are served by handlers in ``HANDLERS`` (one per type, as in BackPACK). A handler says what
its layer keeps from the forward pass and turns that, with the output gradient delta, into curvature
sums. Each quantity is one method of the handler, so later ones (Rademacher-signed sums sum_i sigma_i g_i
for full-Fisher noise, K-FAC factors A = a^T a and G = delta^T delta) are added as further methods beside
``sum_grad_squared`` and reuse the hook machinery unchanged.

Batch norm couples the samples of a (ghost) batch through its statistics, so in training mode the
gradient of l_i is not a per-sample quantity. Under batch norm in training mode the suite DEFINES g_i as
sample i's contribution to the batch gradient: the batch gradient is sum_i g_i, and each g_i is built from
sample i's layer input and its backpropagated output gradient delta_i (which carries the coupling). This
is what the hooks see, and in eval mode, or without batch norm, it is the true per-sample gradient.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import EllipsisType
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hpcnoise.models import GhostBatchNorm


class ConvMode(str, enum.Enum):
    """How convolution weights get their squared per-sample gradients."""

    EXACT = "exact"  # true per-sample gradients sum_t delta_{i,t} a_{i,t}^T, squared and summed
    SPATIAL = "spatial"  # the paper's Appendix C: sum_t delta_{i,t}^2 (a_{i,t}^2)^T (spatial independence)


@dataclass(frozen=True)
class HookOptions:
    """Settings the handlers share."""

    conv_mode: ConvMode = ConvMode.EXACT
    chunk_size: int = 256  # samples per per-sample-gradient chunk; bounds the (chunk, out, in*k) buffer


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
        pad, mode = self._pad_amounts(module)
        zero_pad = mode == "constant" and pad[::2] == pad[1::2]  # symmetric zeros: the kernel can pad
        if opts.conv_mode is ConvMode.SPATIAL:
            x = saved.square() if zero_pad else F.pad(saved, pad, mode=mode).square()
            d2 = delta.square()
            grad_w = torch.ops.aten.convolution_backward(
                d2, x, sums["weight"], None, module.stride, pad[-2::-2] if zero_pad else [0] * len(pad[::2]),
                module.dilation, False, [0] * (x.dim() - 2), 1, (False, True, False),
            )[1]  # fmt: skip
            sums["weight"] += grad_w
            if "bias" in sums:
                sums["bias"] += d2.sum((0, *range(2, d2.dim())))
            return
        w = sums["weight"].view(out_ch, -1)  # (out, C*k)
        for a, d in self._chunks(module, saved, delta, opts.chunk_size):
            _sum_sq_per_sample(a, d, w, opts.chunk_size)
            if "bias" in sums:
                sums["bias"] += d.sum(1).square_().sum(0)

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
        assert isinstance(module, _ConvNd)
        w = sums["weight"].view(delta.shape[1], -1)
        start = 0
        for a, d in self._chunks(module, saved, delta, opts.chunk_size):
            sd = d * signs[start : start + d.shape[0]].view(-1, 1, 1)  # (c, T, out)
            w.addmm_(sd.reshape(-1, sd.shape[-1]).t(), a.reshape(-1, a.shape[-1]))
            if "bias" in sums:
                sums["bias"] += sd.sum((0, 1))
            start += d.shape[0]

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
        mean, var = cast(Tensor, module.running_mean), cast(Tensor, module.running_var)
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


QUANTITIES = ("sum_grad_squared", "signed_sum", "kfac")


@dataclass(frozen=True)
class KFactors:
    """One layer's K-FAC factors and where its parameters sit in ``params``.

    The hooks return sums over a batch; the ``kfac`` statistic divides them by the global batch size.
    """

    A: Tensor  # (K, K): sum_i (1/T) sum_t a a^T, a with a trailing 1 when the layer has a bias
    G: Tensor  # (O, O): sum_{i,t} g g^T of the per-sample output gradients g (mean-loss 1/m undone)
    weight: int  # index of the weight in params
    bias: int | None  # index of the bias in params, or None


class CurvatureHooks:
    """Per-sample curvature quantities of one batch, from module hooks in its single backward pass.

    Quantities (any subset, chosen at construction; each recording may use fewer):
    - ``sum_grad_squared``: S = sum_i g_i^2 per parameter (diagonal Fisher times the batch size);
    - ``signed_sum``: r = sum_i sigma_i g_i per parameter for given signs sigma (full-Fisher noise:
      Cov_sigma(r) = sum_i g_i g_i^T when sigma is Rademacher);
    - ``kfac``: per Linear/Conv layer, the K-FAC factors A and G as sums over the batch (``KFactors``).

    Usage, once per training step (``m`` samples whose MEAN loss is backpropagated)::

        with hooks.recording(m, signs=sigma):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        sums = hooks.result()  # aligned with hooks.params == list(model.parameters())

    Hooks cost nothing outside ``recording()``, and inside it they skip modules in eval mode (as K-FAC
    hooks do), leaving zeros, unless ``record_eval`` is set (frozen-network measurements, tests). Each
    module may run once per recorded forward, and one backward follows it. Float32 parameters give
    float32 arithmetic throughout; the 1/m of the mean is undone once, when the recording ends.
    """

    def __init__(
        self,
        model: nn.Module,
        conv_mode: str | ConvMode = "exact",
        chunk_size: int = 256,
        record_eval: bool = False,
        quantities: tuple[str, ...] = ("sum_grad_squared",),
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        unknown = set(quantities) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"unknown curvature quantities {sorted(unknown)}; valid: {', '.join(QUANTITIES)}")
        self.quantities = tuple(quantities)
        self.opts = HookOptions(ConvMode(conv_mode), chunk_size)
        self.record_eval = record_eval
        self.params: list[nn.Parameter] = list(model.parameters())
        self._handlers: dict[nn.Module, LayerHandler] = {}
        self._owner: dict[int, tuple[nn.Module, str]] = {}  # id(param) -> (module, name)
        for module in model.modules():
            direct = list(module.named_parameters(recurse=False))
            if not direct:
                continue
            handler = HANDLERS.get(type(module))
            if handler is None:
                supported = ", ".join(sorted(t.__name__ for t in HANDLERS))
                raise TypeError(
                    f"no curvature handler for {type(module).__name__}, which owns parameters "
                    f"{[name for name, _ in direct]}; supported types: {supported}"
                )
            handler.check(module)
            for name, p in direct:
                if id(p) in self._owner:
                    raise ValueError(f"parameter {name} of {type(module).__name__} is shared between modules")
                self._owner[id(p)] = (module, name)
            self._handlers[module] = handler
        index = {id(p): i for i, p in enumerate(self.params)}
        # Layers with K-FAC factors, in module order: (module, (K, O), weight index, bias index).
        self.kfac_layers: list[tuple[nn.Module, tuple[int, int], int, int | None]] = []
        for module, handler in self._handlers.items():
            shapes = handler.kfac_shapes(module)
            if shapes is not None:
                bias = getattr(module, "bias", None)
                self.kfac_layers.append(
                    (module, shapes, index[id(module.weight)], None if bias is None else index[id(bias)])
                )
        self._hooks: list[RemovableHandle] = [m.register_forward_hook(self._forward_hook) for m in self._handlers]
        self._recording = 0  # id of the recording in progress; 0 when none
        self._count = 0  # recordings so far
        self._active: tuple[str, ...] = ()
        self._signs: Tensor | None = None
        self._sums: dict[str, dict[nn.Module, Sums]] = {}
        self._factors: dict[nn.Module, list[Tensor]] = {}
        self._seen: set[nn.Module] = set()
        self._pending: dict[nn.Module, list[Tensor]] = {}  # saved forward tensors awaiting the backward
        self._results: dict[str, list[Tensor]] | None = None
        self._kfac_results: list[KFactors] | None = None

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self._recording or not (module.training or self.record_eval):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # no backward will follow (no_grad, frozen network)
        if module in self._seen:
            raise RuntimeError(
                f"{type(module).__name__} ran twice in one recorded forward; per-sample squares of a "
                "reused module cannot be summed per call"
            )
        self._seen.add(module)
        handler = self._handlers[module]
        holder = [handler.save(module, inputs[0])]
        self._pending[module] = holder
        recording, active, signs = self._recording, self._active, self._signs
        sums = {q: self._sums[q][module] for q in active if q != "kfac"}
        factors = self._factors.get(module)

        def on_grad(delta: Tensor) -> None:
            if self._recording != recording:
                raise RuntimeError("backward ran outside the recording() whose forward it belongs to")
            if not holder:
                raise RuntimeError("a second backward through one recorded forward")
            saved = holder.pop()  # dropped once used
            with torch.no_grad():
                if "sum_grad_squared" in sums:
                    handler.sum_grad_squared(module, saved, delta, sums["sum_grad_squared"], self.opts)
                if "signed_sum" in sums:
                    handler.signed_sum(module, saved, delta, sums["signed_sum"], self.opts, signs)  # type: ignore[arg-type]
                if factors is not None:
                    handler.kfac(module, saved, delta, factors, self.opts)

        output.register_hook(on_grad)

    @contextmanager
    def recording(
        self, batch_size: int, signs: Tensor | None = None, quantities: tuple[str, ...] | None = None
    ) -> Iterator[None]:
        """Activate the hooks for one step: its forward and backward of the mean loss over batch_size.

        ``signs`` (batch_size values, +-1) are needed for ``signed_sum``; ``quantities`` restricts this
        recording to a subset of the constructed ones (e.g. K-FAC factors only on refresh steps).
        """
        if not self._hooks:
            raise RuntimeError("hooks were removed")
        if self._recording:
            raise RuntimeError("recording() is not re-entrant")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        active = self.quantities if quantities is None else tuple(quantities)
        if set(active) - set(self.quantities):
            raise ValueError(f"quantities {active} not among those constructed: {self.quantities}")
        if "signed_sum" in active and (signs is None or signs.shape != (batch_size,)):
            raise ValueError(f"signed_sum needs signs of shape ({batch_size},)")
        self._count += 1
        self._active, self._signs = active, signs
        self._sums = {
            q: {
                module: {
                    name: torch.zeros_like(p, memory_format=torch.contiguous_format)
                    for name, p in module.named_parameters(recurse=False)
                }
                for module in self._handlers
            }
            for q in active
            if q != "kfac"
        }
        self._factors = {}
        if "kfac" in active:
            for module, (k, o), w, _ in self.kfac_layers:
                p = self.params[w]
                self._factors[module] = [p.new_zeros(k, k), p.new_zeros(o, o)]
        self._results, self._kfac_results = None, None
        norms = [m for m in self._handlers if isinstance(m, GhostBatchNorm)]
        for bn in norms:
            bn.save_xhat = True
        self._recording = self._count
        try:
            yield
        finally:
            self._recording = 0
            self._signs = None
            for bn in norms:
                bn.save_xhat = False
                bn.saved_xhat = None
            for holder in self._pending.values():
                holder.clear()  # forwards whose backward never came: drop their inputs
            self._pending.clear()
            self._seen.clear()
        # Undo the mean's 1/m: g_i = m * (what autograd delivers), so squares scale by m^2, sums by m.
        scale = {"sum_grad_squared": float(batch_size) ** 2, "signed_sum": float(batch_size)}
        self._results = {}
        for q, per_module in self._sums.items():
            for sums in per_module.values():
                for t in sums.values():
                    t.mul_(scale[q])
            self._results[q] = [per_module[self._owner[id(p)][0]][self._owner[id(p)][1]] for p in self.params]
        self._kfac_results = []
        for module, _, w, b in self.kfac_layers:
            if module in self._factors:
                a_factor, g_factor = self._factors[module]
                self._kfac_results.append(KFactors(a_factor, g_factor.mul_(float(batch_size) ** 2), w, b))
        self._sums, self._factors = {}, {}

    def result(self, quantity: str = "sum_grad_squared") -> list[Tensor]:
        """A per-parameter quantity of the last recording, one tensor per parameter of ``params``."""
        if self._results is None or quantity not in self._results:
            raise RuntimeError(f"no completed recording of {quantity}")
        return self._results[quantity]

    def kfac_result(self) -> list[KFactors]:
        """The K-FAC factor sums of the last recording, one entry per factored layer (``kfac_layers``)."""
        if self._kfac_results is None or (self.kfac_layers and not self._kfac_results):
            raise RuntimeError("no completed recording of kfac")
        return self._kfac_results

    def remove(self) -> None:
        """Remove all hooks; the object cannot record afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


class SumGradSquared(CurvatureHooks):
    """``CurvatureHooks`` computing only S = sum_i g_i^2 per parameter (the diagonal Fisher's sums)."""
