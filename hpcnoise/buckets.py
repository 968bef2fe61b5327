"""Persistent gradient buckets, each summed over workers as soon as backward has filled it.

The gradients live in a few flat buffers ("buckets") for the whole run, with every ``p.grad`` a view
into one of them (as DDP's ``gradient_as_bucket_view``), so no step copies gradients into or out of a
collective buffer. Parameters are assigned to buckets in REVERSE order, the order backward produces
their gradients, up to ``cap_bytes`` per bucket and, so that a small network still overlaps its
communication with backward, up to 1/``min_buckets`` of all the gradients' bytes (a parameter larger
than that has a bucket of its own): with one bucket, a small network's whole sum waited for the end of
backward (``hpcnoise bench step --bucket-mb`` compares layouts side by side). Before a step's backward,
``arm`` zeroes the buffers and points ``p.grad`` at the views (autograd then accumulates in place); a
post-accumulate-grad hook per parameter counts the bucket's gradients, and when the last one has arrived
the bucket's asynchronous sum-allreduce starts (``Comm.allreduce_sum_async_``, named
``hpcnoise.bucket<i>``: every rank names the same bucket alike), while backward goes on with earlier
layers. ``flush`` starts any bucket whose gradients never arrived (a parameter unused in this forward:
its gradient is 0), in bucket order on every rank; ``wait`` completes them all.

The sums are elementwise, so splitting the gradients over buckets changes no bit of the result, and
the semantics are those of the single fused collective (hpcnoise.step). Per-parameter curvature sums
(diagonal Fisher, full-Fisher signed sums) ride in the buckets after the gradients; the step's other
tensors (batch-norm statistic sums, the counts with the stop flag, K-FAC factors) follow in one more
collective after backward. Hand-written rather than ``hvd.DistributedOptimizer`` because the
step must own the reduction: the curvature statistics and batch-norm sums travel with the gradients,
and noise is added to the averaged gradient before the optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hpcnoise.comm import Comm

DEFAULT_CAP_MB = 25.0  # as DDP's bucket_cap_mb
MIN_BUCKETS = 16  # buckets hold at most 1/16 of the gradients (Config.min_buckets)


def assign(sizes: Sequence[int], cap_bytes: int, min_buckets: int = 1) -> list[list[int]]:
    """Parameter indices per bucket, from the parameters' sizes in bytes: reverse parameter order, a new
    bucket when the next parameter would take this one past the cap, ``cap_bytes`` or 1/``min_buckets``
    of the total, whichever is smaller (a parameter larger than the cap gets a bucket of its own). Also
    the scaling model's rule (hpcnoise.benchmarks.scaling)."""
    cap_bytes = min(cap_bytes, -(-sum(sizes) // max(min_buckets, 1)))
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(sizes))):
        if not buckets or (size + sizes[i] > cap_bytes and buckets[-1]):
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += sizes[i]
    return buckets


class Buckets:
    """The gradient buckets of one network's parameters (one dtype and device).

    A step may carry ``extra`` per-parameter sums with the gradients (the curvature sums S_w or r_w,
    one tensor shaped like each parameter): bucket k then holds its gradients followed by each extra
    quantity of the same parameters, so those sums start with the bucket, during backward (the hooks
    finish a layer's sums before its parameters' gradients arrive). Each number of extras has its own
    persistent buffers (a layout), made on first use.
    """

    def __init__(self, params: list[nn.Parameter], cap_bytes: int, min_buckets: int = 1):
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("gradient buckets need parameters of one dtype and device")
        self.params = params
        self.members = assign([p.numel() * p.element_size() for p in params], cap_bytes, min_buckets)
        self._bucket_of = [0] * len(params)
        for k, members in enumerate(self.members):
            for i in members:
                self._bucket_of[i] = k
        self._layouts: dict[int, tuple[list[Tensor], list[list[Tensor]]]] = {}
        self.flats, views = self._layout(0)
        self.views: list[Tensor] = views[0]  # views[i]: p_i's gradient in its bucket
        self._missing: list[int] = []
        self._handles: list[Any] = []
        self._started: list[bool] = []
        self._comm: Comm | None = None
        self._hooks: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._arrived(i))  # type: ignore[no-untyped-call]  # unannotated in torch
            for i, p in enumerate(params)
        ]

    def _layout(self, extra: int) -> tuple[list[Tensor], list[list[Tensor]]]:
        """The buffers with ``extra`` per-parameter quantities after the gradients in every bucket, and
        views[q][i]: parameter i's segment q (0: its gradient) in its bucket."""
        if extra not in self._layouts:
            flats, views = [], [[torch.empty(0)] * len(self.params) for _ in range(1 + extra)]
            for members in self.members:
                sizes = [self.params[i].numel() for i in members]
                flat = self.params[members[0]].new_zeros((1 + extra) * sum(sizes))
                for q, segment in enumerate(flat.chunk(1 + extra)):
                    for i, v in zip(members, torch.split(segment, sizes)):
                        # gradients in the parameter's own memory layout (channels-last convolutions too),
                        # so that backward accumulates into them without a layout change; the curvature
                        # sums contiguous, as the hooks write them
                        like = self.params[i]
                        views[q][i] = v.as_strided(like.shape, like.stride()) if q == 0 else v.view_as(like)
                flats.append(flat)
            self._layouts[extra] = (flats, views)
        return self._layouts[extra]

    def _arrived(self, i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if self._comm is None:
                return  # a backward outside an armed step (measurements): nothing to start
            k = self._bucket_of[i]
            self._missing[k] -= 1
            if self._missing[k] == 0:
                self._start(k)

        return hook

    def _start(self, k: int) -> None:
        assert self._comm is not None
        self._handles[k] = self._comm.allreduce_sum_async_(self.flats[k], f"hpcnoise.bucket{k}")
        self._started[k] = True

    def arm(self, comm: Comm, extra: int = 0) -> list[list[Tensor]]:
        """Zeroed buckets, ``p.grad`` as their views, and the hooks ready to start each bucket's sum.
        ``extra``: per-parameter quantities to carry with the gradients; their zeroed views, one list
        (in parameter order) per quantity, for the curvature hooks to accumulate into."""
        self.flats, views = self._layout(extra)
        self.views = views[0]
        for flat in self.flats:
            flat.zero_()
        for p, v in zip(self.params, self.views):
            p.grad = v
        self._missing = [len(b) for b in self.members]
        self._handles = [None] * len(self.members)
        self._started = [False] * len(self.members)
        self._comm = comm
        return views[1:]

    def flush(self) -> None:
        """Start, in bucket order, every bucket not started yet (gradients that never arrived are 0)."""
        for k, started in enumerate(self._started):
            if not started:
                self._start(k)

    def wait(self) -> list[Tensor]:
        """Wait for every bucket's sum; the summed gradients (the views), in parameter order (the extra
        quantities' sums are in the views ``arm`` returned)."""
        assert self._comm is not None
        for h in self._handles:
            self._comm.wait(h)
        self._comm = None
        return list(self.views)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
