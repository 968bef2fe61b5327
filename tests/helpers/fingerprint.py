"""Fixed-seed fingerprints of every regime: float64 CPU runs whose metrics (timings dropped), diagnostics
and final parameters are hashed, so a refactor of the step can show bit-identical behaviour.

    python -m tests.helpers.fingerprint OUT.json    # from the repository root; then diff two such files
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from hpcnoise.comm import init
from hpcnoise.train import train
from tests.helpers.configs import small_config

CASES: dict[str, dict[str, object]] = {
    "sb": dict(regime="sb"),
    "lb": dict(regime="lb"),
    "lb-gbn": dict(regime="lb", ghost_bn=True, ghost_size=64),
    "diagf": dict(regime="diagf", fisher_every=2),
    "diagf-gbn-cnn": dict(regime="diagf", ghost_bn=True, ghost_size=64, model="cnn1d"),
    "diagf-parameter": dict(regime="diagf", noise_placement="parameter"),
    "trace": dict(regime="trace"),
    "multiplicative": dict(regime="multiplicative"),
    "fullf": dict(regime="fullf"),
    "kfac": dict(regime="kfac", kfac_every=3, ghost_bn=True, ghost_size=64),
    "kfac-cnn": dict(regime="kfac", kfac_every=2, model="cnn1d"),
    "batchchange": dict(regime="batchchange", batchchange_epochs=1),
}
TIMING = ("time", "wall", "samples_per_s", "epoch_time")


def fingerprint(name: str, changes: dict[str, object], out_dir: Path) -> dict:
    cfg = small_config(
        dtype="float64", epochs=3, noise_epochs=2, diagnostics_every=2, run_name=name, out_dir=str(out_dir), **changes
    )
    summary = train(cfg, init("cpu"))
    run = out_dir / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]
    diag = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    diag = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in diag]
    state = torch.load(run / "model.pt")
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    return {"metrics": rows, "diagnostics": diag, "params_sha256": digest, "steps": summary["steps"]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: fingerprint(name, changes, Path(tmp)) for name, changes in CASES.items()}
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
