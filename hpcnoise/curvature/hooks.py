"""``CurvatureHooks``: per-sample curvature quantities of one batch from module hooks in its single backward.

The training step backpropagates the MEAN loss, so the output gradient autograd delivers is (1/m)
dl_i/dy_i; the hooks square it as it comes and multiply the sums by m^2 once, when the recording ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from hpcnoise.curvature.handlers import HANDLERS, ConvMode, HookOptions, LayerHandler, Sums
from hpcnoise.models import GhostBatchNorm

QUANTITIES = ("sum_grad_squared", "signed_sum", "kfac")
# Per-parameter quantities and the power of m that undoes the mean loss's 1/m in them: g_i = m * (what
# autograd delivers), so squares scale by m^2 and signed sums by m.
MEAN_LOSS_POWER = {"sum_grad_squared": 2, "signed_sum": 1}


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
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) != 1:
            raise ValueError(
                f"curvature hooks need parameters of one dtype on one device, got {sorted(map(str, kinds)) or 'none'}"
            )
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
        self._flat: dict[str, Tensor] = {}  # quantity -> the one buffer its per-parameter sums are views of
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
        label = f"hpcnoise.curvature.{type(module).__name__}"  # names the hook's work in profiles

        def on_grad(delta: Tensor) -> None:
            if self._recording != recording:
                raise RuntimeError("backward ran outside the recording() whose forward it belongs to")
            if not holder:
                raise RuntimeError("a second backward through one recorded forward")
            saved = holder.pop()  # dropped once used
            with torch.no_grad(), record_function(label):
                if "sum_grad_squared" in sums:
                    handler.sum_grad_squared(module, saved, delta, sums["sum_grad_squared"], self.opts)
                if "signed_sum" in sums:
                    handler.signed_sum(module, saved, delta, sums["signed_sum"], self.opts, signs)  # type: ignore[arg-type]
                if factors is not None:
                    handler.kfac(module, saved, delta, factors, self.opts)

        output.register_hook(on_grad)

    @contextmanager
    def recording(
        self,
        batch_size: int,
        signs: Tensor | None = None,
        quantities: tuple[str, ...] | None = None,
        into: dict[str, list[Tensor]] | None = None,
    ) -> Iterator[None]:
        """Activate the hooks for one step: its forward and backward of the mean loss over batch_size.

        ``signs`` (batch_size values, +-1) are needed for ``signed_sum``; ``quantities`` restricts this
        recording to a subset of the constructed ones (e.g. K-FAC factors only on refresh steps).
        ``into``: for per-parameter quantities, zeroed tensors (one per parameter of ``params``) to sum
        into instead of a buffer of the recording's own, e.g. gradient-bucket views whose collective
        starts during backward; their results are left UNSCALED (the caller multiplies them by
        ``batch_size ** MEAN_LOSS_POWER[q]``, after summing over workers).
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
        into = into or {}
        if set(into) - (set(active) & set(MEAN_LOSS_POWER)):
            raise ValueError(f"into: per-parameter quantities of this recording only, got {sorted(into)}")
        self._count += 1
        self._active, self._signs = active, signs
        self._allocate(active, into)
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
        self._collect(batch_size)

    def _allocate(self, active: tuple[str, ...], into: dict[str, list[Tensor]]) -> None:
        """Zeroed accumulators for one recording of the ``active`` quantities (``into``: given ones)."""
        self._sums, self._flat = {}, {}
        for q in active:
            if q == "kfac":
                continue
            if q in into:
                at = {id(p): t for p, t in zip(self.params, into[q], strict=True)}
            else:
                # one zeroed buffer per quantity, each parameter's sums a view of it: one allocation and,
                # in ``_collect``, one scaling, instead of one per parameter
                flat = self.params[0].new_zeros(sum(p.numel() for p in self.params))
                views = iter(flat.split([p.numel() for p in self.params]))
                at = {id(p): next(views).view_as(p) for p in self.params}
                self._flat[q] = flat
            self._sums[q] = {
                module: {name: at[id(p)] for name, p in module.named_parameters(recurse=False)}
                for module in self._handlers
            }
        self._factors = {}
        if "kfac" in active:
            for module, (k, o), w, _ in self.kfac_layers:
                p = self.params[w]
                self._factors[module] = [p.new_zeros(k, k), p.new_zeros(o, o)]
        self._results, self._kfac_results = None, None

    def _collect(self, batch_size: int) -> None:
        """The recording's results, aligned with ``params`` (and ``kfac_layers``), the mean's 1/m undone."""
        self._results = {}
        for q, per_module in self._sums.items():
            if q in self._flat:  # not the sums the caller gave (``into``): those are scaled after summing
                self._flat[q].mul_(float(batch_size) ** MEAN_LOSS_POWER[q])
            self._results[q] = [per_module[self._owner[id(p)][0]][self._owner[id(p)][1]] for p in self.params]
        self._kfac_results = []
        for module, _, w, b in self.kfac_layers:
            if module in self._factors:
                a_factor, g_factor = self._factors[module]
                self._kfac_results.append(KFactors(a_factor, g_factor.mul_(float(batch_size) ** 2), w, b))
        self._sums, self._flat, self._factors = {}, {}, {}

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
