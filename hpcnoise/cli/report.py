"""``hpcnoise report RUNS_DIR [--out DIR]``: the report (analysis.report) of a root of run directories."""

from __future__ import annotations

import sys
from pathlib import Path

from hpcnoise.errors import EXIT_USAGE, Parser

# analysis.report loads pandas and seaborn: imported once the arguments are parsed.
DESCRIPTION = "``hpcnoise report RUNS_DIR [--out DIR]``: the paper's tables and figures from a root of run directories."


def main(argv: list[str] | None = None) -> int:
    """`hpcnoise report RUNS_DIR [--out DIR]`: write the report; bad input: one line on stderr, exit 2."""
    from analysis.report import REPORT_NAME, ReportError, make

    parser = Parser(prog="hpcnoise report", description=DESCRIPTION, error_type=ReportError)
    parser.add_argument("runs_dir", type=Path, help="root of run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUNS_DIR/report)")
    try:
        args = parser.parse_args(argv)
        out = args.out if args.out is not None else args.runs_dir / "report"
        loaded = make(args.runs_dir, out)
    except (ReportError, OSError) as exc:
        print(f"hpcnoise report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    n_skipped = sum(s.what == "run" for s in loaded.skipped)
    n_diverged = f"{len(loaded.diverged)} diverged, " if len(loaded.diverged) else ""
    print(f"hpcnoise report: {len(loaded.runs)} runs ({n_diverged}{n_skipped} skipped) -> {out / REPORT_NAME}")
    return 0
