"""``hpcnoise toy``: run the 2-D quadratic of the paper's Section 3 (``hpcnoise.toy``) and print a summary."""

from __future__ import annotations

import sys
from pathlib import Path

from hpcnoise import toy
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser

MAX_CHAINS = 1_000_000  # 100x the default; memory and time grow linearly with the chains


def build_parser() -> Parser:
    """The options of ``hpcnoise toy``; a bad one raises ToyError (one line) instead of exiting."""
    description = toy.__doc__.splitlines()[0] if toy.__doc__ else None
    parser = Parser(prog="hpcnoise toy", description=description, error_type=toy.ToyError)
    parser.add_argument("--out", type=Path, default=Path("toy"), help="output directory (default: toy)")
    parser.add_argument(
        "--chains", type=int, default=toy.ToyConfig.chains, help=f"Monte-Carlo chains (2 to {MAX_CHAINS})"
    )
    parser.add_argument("--seed", type=int, default=toy.ToyConfig.seed, help="random seed (>= 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`hpcnoise toy`: run the toy and print a summary.

    Bad input, or an OSError while writing, gives one line on stderr, exit status 2 and no output files.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.chains > MAX_CHAINS:
            raise toy.ToyError(f"--chains must be an integer from 2 to {MAX_CHAINS} (got {args.chains})")
        summary = toy.run(args.out, chains=args.chains, seed=args.seed)
    except (ConfigError, OSError) as exc:  # ToyError is a ConfigError
        print(f"hpcnoise toy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(toy.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
