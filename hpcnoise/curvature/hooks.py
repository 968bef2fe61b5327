"""``CurvatureHooks``: per-sample curvature quantities of one batch from module hooks in its single backward.

The training step backpropagates the MEAN loss, so the output gradient autograd delivers is (1/m)
dl_i/dy_i; the hooks square it as it comes and multiply the sums by m^2 once, when the recording ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from hpcnoise.curvature.handlers import HANDLERS, ConvMode, HookOptions, LayerHandler
from hpcnoise.curvature.quantities import QUANTITIES, Accumulators
from hpcnoise.models import GhostBatchNorm


class CurvatureHooks:
    """Per-sample curvature quantities of one batch, from module hooks in its single backward pass.

    Quantities: any subset of ``hpcnoise.curvature.quantities.QUANTITIES``, chosen at construction; each
    recording may use fewer (e.g. ``sum_grad_squared``, S = sum_i g_i^2 per parameter; ``signed_sum``,
    r = sum_i sigma_i g_i for given signs; ``kfac``, K-FAC factor sums per Linear/Conv layer).

    Usage, once per training step (``m`` samples whose MEAN loss is backpropagated)::

        with hooks.recording(m, signs=sigma):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        sums = hooks.result()  # aligned with hooks.params == list(model.parameters())

    Hooks cost nothing outside ``recording()``, and inside it they skip modules in eval mode (as K-FAC
    hooks do), leaving zeros, unless ``record_eval`` is set (frozen-network measurements, tests). Each
    module may run once per recorded forward, and one backward follows it. Float32 parameters give
    float32 arithmetic throughout, also under bf16 autocast (saved inputs and output gradients are cast
    to the parameters' dtype first); the 1/m of the mean is undone once, when the recording ends.
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
        self.dtype = self.params[0].dtype if self.params else torch.float32  # every product is formed in it
        self._handlers: dict[nn.Module, LayerHandler] = {}
        owners: set[int] = set()
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
                if id(p) in owners:
                    raise ValueError(f"parameter {name} of {type(module).__name__} is shared between modules")
                owners.add(id(p))
            self._handlers[module] = handler
        self._hooks: list[RemovableHandle] = [m.register_forward_hook(self._forward_hook) for m in self._handlers]
        self._recording = 0  # id of the recording in progress; 0 when none
        self._count = 0  # recordings so far
        self._signs: Tensor | None = None
        self._acc: dict[str, Accumulators] = {}  # the recording's accumulators, per quantity
        self._seen: set[nn.Module] = set()
        self._pending: dict[nn.Module, list[Tensor]] = {}  # saved forward tensors awaiting the backward
        self._results: dict[str, list[Any]] | None = None

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
        recording, signs = self._recording, self._signs
        work = [(QUANTITIES[q], acc.per_layer[module]) for q, acc in self._acc.items() if module in acc.per_layer]
        label = f"hpcnoise.curvature.{type(module).__name__}"  # names the hook's work in profiles

        def on_grad(delta: Tensor) -> None:
            if self._recording != recording:
                raise RuntimeError("backward ran outside the recording() whose forward it belongs to")
            if not holder:
                raise RuntimeError("a second backward through one recorded forward")
            # Under bf16 autocast the saved input and the output gradient are bfloat16: every per-sample
            # product is formed in the parameters' dtype (float32), never in bf16 (hpcnoise.precision).
            saved = holder.pop().to(self.dtype)  # dropped once used
            delta = delta.to(self.dtype)
            with torch.no_grad(), record_function(label):
                for quantity, into in work:
                    quantity.accumulate(handler, module, saved, delta, into, self.opts, signs)

        output.register_hook(on_grad)  # type: ignore[no-untyped-call]  # unannotated in torch

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
        ``batch_size ** QUANTITIES[q].mean_loss_power``, after summing over workers).
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
        signed = [q for q in active if QUANTITIES[q].needs_signs]
        if signed and (signs is None or signs.shape != (batch_size,)):
            raise ValueError(f"{', '.join(signed)} needs signs of shape ({batch_size},)")
        into = into or {}
        if any(q not in active or not QUANTITIES[q].per_parameter for q in into):
            raise ValueError(f"into: per-parameter quantities of this recording only, got {sorted(into)}")
        self._count += 1
        self._signs = signs
        self._results = None
        self._acc = {q: QUANTITIES[q].allocate(self.params, self._handlers, into.get(q)) for q in active}
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

    def _collect(self, batch_size: int) -> None:
        """The recording's results, aligned with ``params`` (or the factored layers), the mean's 1/m undone."""
        self._results = {q: QUANTITIES[q].finish(acc, batch_size) for q, acc in self._acc.items()}
        self._acc = {}

    def result(self, quantity: str = "sum_grad_squared") -> list[Any]:
        """A quantity of the last recording: one tensor per parameter of ``params`` for per-parameter
        quantities, one ``KFactors`` per factored layer for ``kfac``."""
        if self._results is None or quantity not in self._results:
            raise RuntimeError(f"no completed recording of {quantity}")
        return self._results[quantity]

    def remove(self) -> None:
        """Remove all hooks; the object cannot record afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


class SumGradSquared(CurvatureHooks):
    """``CurvatureHooks`` computing only S = sum_i g_i^2 per parameter (the diagonal Fisher's sums)."""
