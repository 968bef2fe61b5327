"""Measurements on a tiny seeded problem under whatever launcher started this process.

    python tests/helpers/measure_worker.py OUT_DIR [RUN_DIR]

Every rank builds the same tiny network and data (``tiny_problem``), runs the sharpness protocol, the
Fisher norms and the gradient variances with the launcher's Comm, and writes OUT_DIR/rank<R>.json. The
tests compare these with an exact Hessian and with the same measurements on one process. Given a
finished RUN_DIR, it also runs ``hpcnoise sharpness RUN_DIR`` (hpcnoise.cli.sharpness.main) on all ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcnoise.cli.sharpness import main as sharpness_main
from hpcnoise.comm import Comm, init
from hpcnoise.config import Config
from hpcnoise.data import Data
from hpcnoise.measure import fisher_norms, gradient_variance, sharpness_of
from hpcnoise.models import GhostBatchNorm, mlp

# The tiny problem: 5 inputs, 3 classes, an MLP of width 6 with batch norm, float64.
IN, CLASSES, WIDTH = 5, 3, 6
N_TRAIN, N_HELDOUT = 96, 64
SHARPNESS_SAMPLES = 45  # odd: the two ranks' shares differ (22 and 23), testing the count weighting
MAIN_SAMPLES = "512"  # training samples for `hpcnoise sharpness` on a small real run
TINY_CFG = Config(batch_size=32, small_batch=8, seed=3)  # M_L = 32, M_S = 8: s^2 = 3 / 32


def tiny_problem(seed: int = 0, n_train: int = N_TRAIN) -> tuple[nn.Module, Data]:
    """A float64 MLP with non-trivial batch-norm statistics and affine parameters, and synthetic data.

    Labels are drawn from softmax(3 * logits), so the network is under-confident (the fitted temperature
    is near 1/3) and not at a minimum.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp((IN,), CLASSES, lambda c: GhostBatchNorm(c), width=WIDTH).double()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, GhostBatchNorm):
                c = bn.num_features
                bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen, dtype=torch.float64))
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen, dtype=torch.float64))
                bn.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
                bn.bias.copy_(0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
    n = n_train + N_HELDOUT
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # labels drawn from the network's own softmax at temperature 1 / 3
        y = torch.multinomial(torch.softmax(3 * model.eval()(x), 1), 1, generator=gen).squeeze(1)
    data = Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], CLASSES)
    return model, data


def measure_all(comm: Comm) -> dict[str, Any]:
    """Everything the distributed test compares, measured with ``comm`` (one process or several ranks)."""
    model, data = tiny_problem()
    heldout = (data.x_test, data.y_test)
    out: dict[str, Any] = {
        "rank": comm.rank,
        "size": comm.size,
        "sharpness": sharpness_of(
            model,
            data.x_train,
            data.y_train,
            comm,
            samples=SHARPNESS_SAMPLES,
            heldout=heldout,
            chunk=8,
            tol=1e-10,
        ),
        "fisher": fisher_norms(model, data.x_train[:40], data.y_train[:40], comm, chunk=12),
    }
    out["grad_variance"] = {
        r: gradient_variance(model, data, r, TINY_CFG, 7, comm=comm, train_mode=False) for r in ("sb", "diagf")
    }
    return out


def main() -> None:
    out = Path(sys.argv[1])
    comm = init("cpu")
    torch.set_num_threads(1)
    result = measure_all(comm)
    if len(sys.argv) > 2:  # a finished run directory: `hpcnoise sharpness` under this launcher too
        result["main_exit"] = sharpness_main([sys.argv[2], "--samples", MAIN_SAMPLES])
    (out / f"rank{comm.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
