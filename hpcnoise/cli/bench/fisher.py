"""``hpcnoise bench fisher [--models ...|--conv] [--batch B] [--steps N] [--threads T]``: the cost of squared
per-sample gradients in a training step (hpcnoise.benchmarks.fisher_cost); with ``--layers``, each
convolution's two ways of forming exact sums (hpcnoise.benchmarks.conv_layers)."""

from __future__ import annotations

import torch

from hpcnoise.benchmarks import conv_layers, fisher_cost
from hpcnoise.benchmarks.conv_layers import LAYER_MODELS
from hpcnoise.benchmarks.fisher_conv import CONV_SHAPES
from hpcnoise.benchmarks.fisher_cost import MODELS, run
from hpcnoise.cli.common import check_positive, error
from hpcnoise.errors import ConfigError, Parser


def _parser() -> Parser:
    parser = Parser(prog="hpcnoise bench fisher", description=(fisher_cost.__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted({*MODELS, *CONV_SHAPES, *LAYER_MODELS}),
        default=None,
        help=f"networks to measure (default: {' '.join(MODELS)})",
    )
    parser.add_argument("--conv", action="store_true", help=f"same as --models {' '.join(CONV_SHAPES)}")
    parser.add_argument(
        "--layers",
        action="store_true",
        help="instead: each convolution's exact sums tap by tap against by patches (default models: "
        f"{' '.join(LAYER_MODELS)}; default batch 128)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="local batch size (samples per step; default: 1024 for mlp and cnn1d, 128 for lenet5 and resnet44)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.conv and (args.models is not None or args.layers):
            raise ConfigError("--conv is exclusive with --models and --layers")
        valid = LAYER_MODELS if args.layers else (*MODELS, *CONV_SHAPES)
        bad = [m for m in args.models or [] if m not in valid]
        if bad:
            with_layers = "with" if args.layers else "without"
            raise ConfigError(f"--models {' '.join(bad)}: {with_layers} --layers, valid: {', '.join(valid)}")
        for name in ("batch", "steps", "threads"):
            value = getattr(args, name)
            if value is not None:
                check_positive(value, f"--{name}")
    except ConfigError as e:
        return error(str(e))
    torch.set_num_threads(args.threads)
    if args.layers:
        conv_layers.run(args.models or list(LAYER_MODELS), args.batch or 128, args.steps)
        return 0
    run(list(CONV_SHAPES) if args.conv else args.models or list(MODELS), args.batch, args.steps)
    return 0
