"""Running the toy: check the input, compute, draw, and write the three PNGs and toy.json atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcnoise.files import unwritable, write_files_atomic
from hpcnoise.toy.figures import draw_one_step, draw_theorem, draw_trajectories
from hpcnoise.toy.model import ToyConfig, ToyError, spd_eigh
from hpcnoise.toy.simulate import ToyResults, compute
from hpcnoise.toy.summary import summarise

__all__ = ["FIG1_NAME", "FIG2_NAME", "JSON_NAME", "THEOREM_NAME", "run"]

FIG1_NAME = "toy_fig1_one_step.png"
FIG2_NAME = "toy_fig2_trajectories.png"
THEOREM_NAME = "toy_theorem.png"
JSON_NAME = "toy.json"


def _validate(cfg: ToyConfig) -> None:
    """Reject chains and seeds the toy cannot use (naming the option), and an A that is not SPD."""
    if cfg.chains < 2:
        raise ToyError(f"--chains must be an integer >= 2 (got {cfg.chains})")
    if cfg.seed < 0:
        raise ToyError(f"--seed must be a non-negative integer (got {cfg.seed})")
    spd_eigh(cfg.matrix)


def _check_out_dir(out_dir: Path) -> None:
    """Fail early, before any work, when out_dir cannot be a writable directory (creates nothing)."""
    problem = unwritable(out_dir)
    if problem is not None:
        raise ToyError(f"cannot write to {out_dir}: {problem[1]}")


def _draw(res: ToyResults, out_dir: Path) -> dict[Path, bytes]:
    """The three pictures as PNG bytes, keyed by the path each is written to."""
    cfg, a = res.cfg, res.cfg.matrix
    return {
        out_dir / FIG1_NAME: draw_one_step(a, res.step, cfg.sigma),
        out_dir / FIG2_NAME: draw_trajectories(a, res.paths, cfg.plot_every, res.traces, cfg.lr),
        out_dir / THEOREM_NAME: draw_theorem(res.checks),
    }


def run(out_dir: Path, chains: int = ToyConfig.chains, seed: int = ToyConfig.seed) -> dict[str, Any]:
    """Compute everything, write the three PNGs and toy.json into out_dir, and return toy.json's content.

    Nothing is written unless everything was computed and drawn; toy.json is renamed into place last, so its
    presence marks a complete run.
    """
    cfg = ToyConfig(chains=chains, seed=seed)
    _validate(cfg)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    res = compute(cfg)
    files = _draw(res, out_dir)
    json_path = out_dir / JSON_NAME
    summary = summarise(res, [*files, json_path])
    files[json_path] = (json.dumps(summary, indent=1, allow_nan=False) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomic(files)
    return summary
