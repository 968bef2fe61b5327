"""``hpcnoise data prepare NAME [--root DIR] [--no-download]``: download and pack an image dataset
(hpcnoise.download) on a machine with internet, once; training jobs then read the packed files."""

from __future__ import annotations

import sys
from pathlib import Path

from hpcnoise.cli.common import error
from hpcnoise.download import SOURCES, PrepareError, download_and_pack, one_line
from hpcnoise.errors import Parser


def _parser() -> Parser:
    p = Parser(
        error_type=PrepareError,
        prog="hpcnoise data prepare",
        description="Download (or read already present) raw files of an image dataset and write one "
        "compact file per split (uint8 images, int64 labels, checksummed header) into --root.",
    )
    p.add_argument("name", help=f"dataset: {', '.join(SOURCES)}")
    p.add_argument(
        "--root",
        default=None,
        help="directory for raw and prepared files; training uses it as --data_root "
        "(default: $HPCNOISE_DATA, else ~/.cache/hpcnoise)",
    )
    p.add_argument(
        "--no-download",
        action="store_true",
        help="never touch the network: the raw files must already be in --root (compute nodes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``hpcnoise data prepare NAME [--root DIR] [--no-download]``; argv is what follows ``prepare``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        if args.root:
            root = Path(args.root).expanduser()
        else:
            from hpcnoise.data import cache_dir  # lazy: torch

            root = cache_dir()
        download_and_pack(args.name, root, download=not args.no_download)
    except PrepareError as e:
        return error(str(e))
    except OSError as e:  # writing the prepared files (disk full, quota): no file is left half-written
        return error(f"cannot write the prepared files: {one_line(e)}")
    return 0
