"""Run ``train`` under whatever launcher started this process and save what every step exposed.

    python tests/helpers/dist_worker.py OUT_DIR --key=value ...

The tests' own regime (tests.helpers.regimes) is registered before the config is checked. Each rank
writes OUT_DIR/rank<R>.pt with, for every step: diag F, the noise, g_LB and the parameters
and buffers after the step. The tests compare these across ranks and across world sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hpcnoise.comm import init
from hpcnoise.config import Config, apply_overrides
from hpcnoise.train import StepInfo, train
from tests.helpers import regimes  # noqa: F401  (registers the tests' own regime, diagf-alternate)


def main() -> None:
    out = Path(sys.argv[1])
    cfg = apply_overrides(Config(), sys.argv[2:])
    comm = init(cfg.device)
    steps: list[dict[str, object]] = []

    def record(info: StepInfo) -> None:
        def copy(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.detach().clone() for t in ts]

        steps.append(
            {
                "grads": copy(info.grads),
                "diag_fisher": copy(info.diag_fisher),
                "noise": copy(info.noise),
                "state": {k: v.detach().clone() for k, v in info.model.state_dict().items()},
            }
        )

    summary = train(cfg, comm, step_hook=record)
    torch.save({"steps": steps, "summary": summary, "world": comm.size}, out / f"rank{comm.rank}.pt")


if __name__ == "__main__":
    main()
