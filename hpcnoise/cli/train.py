"""``hpcnoise train [PRESET] [--smoke] [--key=value ...]``: train one configuration under any launcher."""

from __future__ import annotations

import sys

from hpcnoise.cli.common import error, is_rank0
from hpcnoise.config import apply_overrides, check_values
from hpcnoise.errors import ConfigError, Parser, RunStopped
from hpcnoise.presets import DEFAULT_PRESET, get_preset


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="hpcnoise train",
        description="Train one configuration. Overrides are --key=value with any field of "
        "hpcnoise.config.Config (see `hpcnoise presets --fields`).",
    )
    parser.add_argument("preset", nargs="?", default=DEFAULT_PRESET, help=f"preset name (default {DEFAULT_PRESET})")
    parser.add_argument("--smoke", action="store_true", help="the preset's seconds-long smoke variant")
    try:  # the checks that need no torch first, so that most bad input answers at once
        args, overrides = parser.parse_known_args(argv)
        cfg = apply_overrides(get_preset(args.preset, args.smoke), overrides)
        check_values(cfg)
    except ConfigError as e:
        return error(str(e), rank0=is_rank0())
    from hpcnoise.comm import detect_launcher, init, launcher_rank
    from hpcnoise.train import train
    from hpcnoise.workload import validate

    try:
        validate(cfg, detect_launcher()[1])  # before init(), which would fail on e.g. a missing GPU
        train(cfg, init(cfg.device, timeline=cfg.horovod_timeline))
    except ConfigError as e:
        return error(str(e), rank0=launcher_rank() == 0)
    except RunStopped as e:  # preempted, diverged, locked by another job, a failed write, no checkpoint
        if launcher_rank() == 0:
            print(e.line(), file=sys.stderr, flush=True)
        return e.exit_code
    return 0
