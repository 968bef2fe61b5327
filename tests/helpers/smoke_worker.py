"""Run the smoke variant of presets in one launcher world (saves Horovod start-ups).

python tests/helpers/smoke_worker.py OUT_DIR [PRESET ...]      (default: every Table 1-3 preset)
"""

from __future__ import annotations

import sys
from dataclasses import replace

from hpcnoise.comm import init
from hpcnoise.presets import PRESETS, get_preset
from hpcnoise.train import train


def main() -> None:
    out = sys.argv[1]
    names = sys.argv[2:] or sorted(n for n in PRESETS if n.startswith("table"))
    comm = init("cpu")
    for name in names:
        cfg = get_preset(name, smoke=True)
        train(replace(cfg, out_dir=out, run_name=cfg.preset, progress=False), comm)


if __name__ == "__main__":
    main()
