"""The run's number format (``Config.dtype``): the weights' dtype and the autocast around forward and backward.

- ``float32`` and ``float64`` run as they are (float64 for numerical studies).
- ``bf16`` is mixed precision as MLPerf-class training loops run it on A100, H100 or H200: float32
  weights, the forward and backward under ``torch.autocast(dtype=torch.bfloat16)`` (on CPU and CUDA).
  Everything the curvature noise is made of stays float32: the curvature hooks cast each layer's saved
  input and output gradient to float32 before forming per-sample products (squares of bf16 values keep
  about 3 significant digits), and the statistics, the collectives, the noise and the optimiser work on
  float32 tensors. bfloat16 has float32's exponent range, so no loss scaling is needed (float16 would).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from hpcnoise.errors import ConfigError

# The weights' (and data's) dtype of each number format.
WEIGHTS = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.float32}


def weight_dtype(name: str) -> torch.dtype:
    """The dtype of the weights, the data and every float32 quantity of a run in number format ``name``."""
    return WEIGHTS[name]


def autocast(mixed: bool, device: torch.device) -> AbstractContextManager[object]:
    """bf16 autocast on ``device`` when ``mixed``, else nothing: wraps a forward (its backward follows the
    forward's casts) in training, evaluation and the benchmarks' plain loop alike."""
    if not mixed:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def check_device(name: str, device: str) -> None:
    """One ConfigError when the config's ``device`` (auto, cpu, cuda) cannot run number format ``name``:
    bf16 on a GPU without bfloat16 (CPU autocast always has it)."""
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name()
        raise ConfigError(
            f"dtype bf16 needs a GPU with bfloat16 support (Ampere or newer); {gpu} has none: use float32"
        )
