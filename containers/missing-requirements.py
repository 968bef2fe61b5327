"""Print the requirements of an installed distribution that are not installed at all, one per line.

    python3 containers/missing-requirements.py hpcnoise > requirements.txt

The image installs hpcnoise with ``pip install --no-deps`` and then only these: the base image's own
torch, torchvision, numpy and MPI stay exactly as they are (pip would otherwise replace an NGC image's
pre-release torch, e.g. 2.5.0a0+git..., with a PyPI build that lacks the image's CUDA tuning).
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, requires, version


def missing(dist: str) -> list[str]:
    out = []
    for req in requires(dist) or []:
        if "extra ==" in req:  # optional extras (dev tools) are not part of the image
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if name is None:
            continue
        try:
            version(name.group(0))
        except PackageNotFoundError:
            out.append(req)
    return out


if __name__ == "__main__":
    for line in missing(sys.argv[1] if len(sys.argv) > 1 else "hpcnoise"):
        print(line)
