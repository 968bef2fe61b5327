"""The floor of the diag-F step: lb's step plus diag F's own work, timed on its own in the same run.

``hpcnoise bench step`` times ``diagf exact floor`` (and ``diagf spatial floor`` for convolutional
networks) beside ``diagf exact``: one lb step whose gradient buckets carry diag F's per-parameter sums
too (``carry_sums``: the bytes diag-F's collective must move, here zeros), then, on tensors captured once
from a real recorded step (every layer's saved input and output gradient), the curvature handlers'
``sum_grad_squared`` called directly, layer by layer, and the noise: one N(0, I) draw of every parameter
scaled by lambda s sqrt(diag F). That is the work the step cannot skip (the design sums each worker's
diag-F accumulator over all workers), without what running it inside backward adds (the hooks, saving
the inputs, the interleaving with autograd). ``diagf`` over ``lb`` minus ``floor`` over ``lb`` is that
overhead; the floor's own excess over 1 is the curvature products, their collective and the noise.
Hand-written (no library times a step's parts apart): torch.profiler's shares include the profiler's own
cost per operator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.curvature.handlers import HANDLERS, ConvMode, HookOptions, LayerHandler
from hpcnoise.models import ghost_norms
from hpcnoise.precision import autocast
from hpcnoise.regimes import noise_std, standard_normal_like
from hpcnoise.seeding import generator
from hpcnoise.step import StepParts

Record = tuple[LayerHandler, nn.Module, Tensor, Tensor]  # handler, layer, saved input, output gradient


def capture(model: nn.Module, x: Tensor, y: Tensor, mixed: bool) -> list[Record]:
    """Every handled layer's saved tensor and output gradient of one forward and backward of the mean loss
    on a copy of ``model`` (train mode, ghost batch norms saving their normalised input)."""
    net = copy.deepcopy(model).train()
    records: list[Record] = []
    for bn in ghost_norms(net):
        bn.save_xhat = True

    def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        handler = HANDLERS[type(module)]
        saved = handler.save(module, inputs[0]).to(output.dtype if not mixed else torch.float32)

        def on_grad(delta: Tensor) -> None:
            records.append((handler, module, saved, delta.detach().float() if mixed else delta.detach().clone()))

        output.register_hook(on_grad)  # type: ignore[no-untyped-call]  # unannotated in torch

    handles = [m.register_forward_hook(forward_hook) for m in net.modules() if type(m) in HANDLERS]
    try:
        with autocast(mixed, x.device):
            loss = F.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
    finally:
        for h in handles:
            h.remove()
    return records


def carry_sums(parts: StepParts, sums: int = 1) -> None:
    """Make ``parts``' gradient buckets carry ``sums`` per-parameter sums after the gradients at every
    step, as diag-F's do (``Buckets.arm``), whatever the regime: lb's step with diag-F's bytes in its
    collective. Without buckets (one worker, or ``allreduce=fused``) there is nothing to widen."""
    buckets = parts.net.buckets
    if buckets is None:
        return
    arm = buckets.arm

    def arm_carrying(comm: Comm, extra: int = 0) -> list[list[Tensor]]:
        return arm(comm, max(extra, sums))[:extra]  # the step gets the views it asked for

    buckets.arm = arm_carrying  # type: ignore[method-assign]  # this benchmark's step only


def floor_step(cfg: Config, model: nn.Module, x: Tensor, y: Tensor, lb: Callable[[], object]) -> Callable[[], None]:
    """lb's step ``lb`` (its buckets carrying diag F's sums, ``carry_sums``), then the curvature sums of
    the captured layers (``cfg.conv_mode``) and the noise."""
    records = capture(model, x, y, cfg.dtype == "bf16")
    opts = HookOptions(ConvMode(cfg.conv_mode), 256)
    # contiguous, as the step's own sums are (views of one flat bucket), whatever the weights' memory format
    dense = torch.contiguous_format
    sums = {
        m: {name: torch.zeros_like(p, memory_format=dense) for name, p in m.named_parameters(recurse=False)}
        for _, m, _, _ in records
    }
    params = [p for _, m, _, _ in records for p in m.parameters(recurse=False)]
    fisher = [torch.rand_like(p) for p in params]  # the values do not change the cost
    gen = generator(cfg.seed, "noise", 0, device=x.device)
    std = noise_std(cfg)

    def step() -> None:
        lb()
        with torch.no_grad():
            for acc in sums.values():
                torch._foreach_zero_(list(acc.values()))
            for handler, module, saved, delta in records:
                handler.sum_grad_squared(module, saved, delta, sums[module], opts)
            xi = standard_normal_like(params, gen)
            torch._foreach_mul_(xi, torch._foreach_sqrt(fisher))
            torch._foreach_mul_(xi, std)

    return step
