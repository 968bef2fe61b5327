"""``hpcnoise presets [--fields]``: the presets, the registries and (``--fields``) every config field."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hpcnoise.cli.common import error
from hpcnoise.config import Config
from hpcnoise.errors import ConfigError, Parser
from hpcnoise.presets import PRESETS, get_preset


def main(argv: list[str]) -> int:
    parser = Parser(prog="hpcnoise presets", description="List presets and registries.")
    parser.add_argument("--fields", action="store_true", help="also list every config field and its default")
    try:
        args = parser.parse_args(argv)
    except ConfigError as e:
        return error(str(e))
    from hpcnoise.data import DATASETS  # lazy: torch
    from hpcnoise.models import MODELS
    from hpcnoise.regimes import REGIMES

    print("presets (hpcnoise train PRESET [--smoke]):")
    for name in sorted(PRESETS):
        c = get_preset(name)
        print(
            f"  {name:24s} {c.dataset}/{c.model} {c.regime}{'+gbn' if c.ghost_bn else ''} "
            f"batch {c.batch_size if c.regime != 'sb' else c.small_batch} lr {c.lr:g} epochs {c.epochs}"
        )
    registries: list[tuple[str, dict[str, Any]]] = [("regimes", REGIMES), ("models", MODELS), ("datasets", DATASETS)]
    for title, registry in registries:
        print(f"{title}:")
        for name, spec in sorted(registry.items()):
            print(f"  {name:24s} {spec.description}")
    if args.fields:
        print("config fields (--key=value):")
        for f in fields(Config):
            print(f"  {f.name:24s} {f.default!r}")
    return 0
