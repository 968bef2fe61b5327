"""Run the smoke variant of every preset of the given tables in one launcher world (saves start-ups).

    python tests/smoke_worker.py OUT_DIR TABLE [TABLE ...]
"""

from __future__ import annotations

import sys
from dataclasses import replace

from hpcnoise.comm import init
from hpcnoise.presets import TABLES, get_table
from hpcnoise.train import train


def main() -> None:
    out, tables = sys.argv[1], sys.argv[2:] or list(TABLES)
    comm = init("cpu")
    for table in tables:
        seen = set()
        for cfg in get_table(table, smoke=True):
            if cfg.preset in seen:  # one seed per preset is enough for plumbing
                continue
            seen.add(cfg.preset)
            train(replace(cfg, out_dir=out, run_name=cfg.preset, progress=False), comm)


if __name__ == "__main__":
    main()
