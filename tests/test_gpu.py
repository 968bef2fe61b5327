"""The step on a CUDA GPU: the same numbers as on the CPU (float64), CUDA-event phase timing, and the
step benchmark on the device. Skipped where torch sees no GPU; ``jobs/gpu-check.sh`` runs them there."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
import torch

from hpcnoise.benchmarks.step_compare import step_config
from hpcnoise.comm import Comm
from hpcnoise.step import PhaseTimer, StepInput, make_step_parts, train_step
from hpcnoise.workload import data_and_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BATCH = 64


def one_worker(device: str) -> Comm:
    return Comm(rank=0, size=1, local_rank=0, launcher="none", device=torch.device(device))


def run_steps(device: str, model: str, regime: str, steps: int, **changes: Any) -> tuple[list[torch.Tensor], dict]:
    """``steps`` training steps on one worker of ``device`` with gradient buckets (the several-worker
    layout, curvature sums riding in them); the parameters and the statistics cache, on the CPU."""
    cfg = replace(step_config(model, regime, BATCH, 0), device=device, **({"dtype": "float64"} | changes))
    comm = one_worker(device)
    torch.manual_seed(0)
    data, net = data_and_model(cfg, comm)
    t = make_step_parts(cfg, comm, net, buckets=True)
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    cache: dict[str, Any] = {}
    state: dict[str, Any] = {}
    ghosts = BATCH // cfg.ghost_size
    for step in range(steps):
        inp = StepInput(step, cfg.lr, x, y, BATCH, ghosts, t.regime.noise is not None, False)
        train_step(t, inp, cache, state, PhaseTimer(comm.device))
    t.net.detach()
    params = [p.detach().cpu() for p in net.parameters()]
    return params, {k: [v.cpu() for v in vs] for k, vs in cache.items() if isinstance(vs, list)}


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_lb_steps_on_gpu_equal_the_cpus(model: str) -> None:
    """No noise: three lb steps on the GPU give the CPU's parameters up to float64 rounding."""
    gpu, _ = run_steps("cuda", model, "lb", 3)
    cpu, _ = run_steps("cpu", model, "lb", 3)
    for g, c in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(g, c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv_mode", ["exact", "spatial"])
def test_diag_fisher_on_gpu_equals_the_cpus(conv_mode: str) -> None:
    """The first step's diagonal Fisher, from hooks and buckets on the GPU, is the CPU's (the noise
    itself differs: CUDA's generator is Philox, the CPU's Mersenne Twister)."""
    _, gpu = run_steps("cuda", "cnn1d", "diagf", 1, conv_mode=conv_mode)
    _, cpu = run_steps("cpu", "cnn1d", "diagf", 1, conv_mode=conv_mode)
    assert gpu["diag_fisher"] and len(gpu["diag_fisher"]) == len(cpu["diag_fisher"])
    for g, c in zip(gpu["diag_fisher"], cpu["diag_fisher"], strict=True):
        torch.testing.assert_close(g, c, rtol=1e-9, atol=1e-15)


def test_phase_timer_records_cuda_events_and_reads_them_once() -> None:
    timer = PhaseTimer(torch.device("cuda"))
    timer.start()
    a = torch.randn(1024, 1024, device="cuda")
    (a @ a).sum()
    timer.lap("matmul")
    assert len(timer._events) == 1  # recorded, not read: no synchronisation inside the step
    seconds = timer.seconds
    assert seconds["matmul"] > 0 and not timer._events


def test_bench_step_on_gpu() -> None:
    args = ["bench", "step", "--device", "cuda", "--models", "cnn1d", "--batch", "64", "--steps", "1", "--rounds", "2"]
    proc = subprocess.run([sys.executable, "-m", "hpcnoise.cli", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cuda" in proc.stdout
    assert "[cnn1d float32] lb throughput >= 0.95x horovod:" in proc.stdout


def test_bf16_step_on_gpu_keeps_its_statistics_float32() -> None:
    """Two diag-F steps under CUDA bf16 autocast: float32 weights and diag F, close to float32's diag F
    (within the bf16 forward's own error, tests/test_precision.py)."""
    params, bf16 = run_steps("cuda", "cnn1d", "diagf", 1, dtype="bf16")
    _, single = run_steps("cuda", "cnn1d", "diagf", 1, dtype="float32")
    assert all(p.dtype == torch.float32 for p in params)
    for b, f in zip(bf16["diag_fisher"], single["diag_fisher"], strict=True):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert (b - f).abs().max() <= 0.3 * f.abs().max()


@pytest.mark.parametrize("conv_mode", ["exact", "spatial"])
def test_channels_last_on_gpu_equals_the_default_layout(conv_mode: str) -> None:
    """float64: no TF32 (cuDNN's default for float32 convolutions), whose kernels differ between layouts."""
    _, last = run_steps("cuda", "lenet5", "diagf", 1, conv_mode=conv_mode, channels_last=True)
    _, default = run_steps("cuda", "lenet5", "diagf", 1, conv_mode=conv_mode)
    for a, b in zip(last["diag_fisher"], default["diag_fisher"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())
