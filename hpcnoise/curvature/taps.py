"""Exact per-sample squared convolution gradients, tap by tap, without building patches.

Sample i's weight gradient of a convolution is G_i[o, c, j] = sum_t delta_i[o, t] x_i[c, s t + d j]
(x padded, s the stride, d the dilation, j a kernel tap). The patch method (``ConvHandler._patches``)
copies every sample's input k times (k = taps of the kernel) to form all taps in one batched product;
on the CPU that copy, not the product, dominated: resnet44's 16-channel 3x3 layers spent 17 ms per 32
samples in it and the product where the method below needs 3.3 ms. Here each tap is one batched product
over a strided view of the input, so the only copies are the input's stride phases (once) and delta
(once):

- the padded input splits into its stride phases, P_r[c, u] = x[c, s u + r] (one copy of the input in
  all); tap j reads phase r = (d j) mod s shifted by a = (d j) div s, so its input is contiguous in t;
- in 2-D the phase is flattened row by row with row length W' = T_w + max shift, and delta is
  zero-padded to that row length; then each tap's input is ONE contiguous window of the flat phase
  (positions past a row's end meet delta's zero columns), so G_i for tap j is
  delta_i (O x T_h W') times a strided window (T_h W' x C): a plain batched matrix product with no copy.
  The zero columns cost W'/T_w - 1 extra multiply-adds (6% for resnet44's 32x32 layers, 25% at 8x8).

``by_taps`` says where this pays, from measurements on a 2-core x86 CPU (``hpcnoise bench fisher
--layers`` times both ways on every convolution of the suite's networks): in 1-D always; in 2-D with 8
input channels or more; with fewer, only for narrow outputs on wide images. A tap's product with few
input channels is too thin for the matrix kernel, and the patch copy is then cheap next to the product
(at a batch of 128: VGG's 3 -> 64 layer 47 ms by taps, 25 by patches; LeNet-5's 6 -> 16 on 10 x 10
outputs, where the zero columns add 40%, 4.6 against 3.8; but resnet44's 3 -> 16, 7.5 against 14.4).
"""

from __future__ import annotations

import itertools
from types import EllipsisType

import torch
from torch import Tensor, nn

Index = tuple[EllipsisType | slice, ...]
FEW_INPUT_CHANNELS = 8  # 2-D layers with fewer input channels go by taps only where both of these hold:
FEW_OUTPUT_CHANNELS = 32  # fewer output channels than this
ZERO_COLUMNS = 0.25  # and delta's zero columns add less than this share of multiply-adds


def by_taps(module: nn.Conv1d | nn.Conv2d, delta: Tensor) -> bool:
    """Whether a convolution's exact sums, for output gradient ``delta``, run tap by tap (else by patches).

    On a GPU the patch method stays until a GPU has timed both: one product per tap is k launches per
    layer where patches take two, and a GPU's bandwidth makes the patch copy cheap.
    """
    if delta.device.type != "cpu":
        return False
    if delta.dim() == 3 or module.in_channels >= FEW_INPUT_CHANNELS:
        return True
    width = delta.shape[-1]
    most = module.dilation[-1] * (module.kernel_size[-1] - 1) // module.stride[-1]
    return module.out_channels < FEW_OUTPUT_CHANNELS and most / width < ZERO_COLUMNS


def sum_squares_by_taps(
    padded: Tensor,
    delta: Tensor,
    out: Tensor,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    kernel: tuple[int, ...],
) -> None:
    """out (O, C, *kernel) += sum_i G_i^2 for ``padded`` input (n, C, *L) and output gradient ``delta``
    (n, O, *T) of a convolution with groups=1, in 1-D or 2-D. Holds (taps, n, O, C) floats at once."""
    dims = padded.dim() - 2
    n, channels = padded.shape[:2]
    out_ch, positions = delta.shape[1], delta.shape[2:]
    taps = list(itertools.product(*(range(k) for k in kernel)))

    def phase_shift(tap: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (
            tuple(dilation[i] * tap[i] % stride[i] for i in range(dims)),
            tuple(dilation[i] * tap[i] // stride[i] for i in range(dims)),
        )

    most = [dilation[i] * (kernel[i] - 1) // stride[i] for i in range(dims)]
    extent = [positions[i] + most[i] for i in range(dims)]
    if dims == 2:
        extent[0] += 1  # the last tap's window runs up to most[1] elements past the last full row
    phases: dict[tuple[int, ...], Tensor] = {}
    for tap in taps:
        r, _ = phase_shift(tap)
        if r in phases:
            continue
        every: Index = (..., *(slice(r[i], r[i] + stride[i] * extent[i], stride[i]) for i in range(dims)))
        view = padded[every]
        phase = padded.new_zeros(n, channels, *extent)
        head: Index = (..., *(slice(0, view.shape[2 + i]) for i in range(dims)))
        phase[head] = view
        phases[r] = phase.view(n, channels, -1)
    if dims == 2 and extent[1] > positions[1]:
        delta = torch.nn.functional.pad(delta, [0, extent[1] - positions[1]])  # zero columns: row length W'
    d = delta.reshape(n, out_ch, -1)
    length = d.shape[-1]
    row = extent[1] if dims == 2 else 1
    grads = d.new_empty(len(taps), n, out_ch, channels)
    for g, tap in zip(grads, taps):
        r, a = phase_shift(tap)
        start = a[0] * row + (a[1] if dims == 2 else 0)
        torch.bmm(d, phases[r][:, :, start : start + length].transpose(1, 2), out=g)
    # (taps, O, C) -> (O, C, *kernel): taps enumerate the kernel in row-major order, as the weight does
    out += grads.square_().sum(1).permute(1, 2, 0).reshape(out.shape)
