"""``python -m hpcnoise.cli``: the same as the ``hpcnoise`` command."""

import sys

from hpcnoise.cli import main

sys.exit(main())
