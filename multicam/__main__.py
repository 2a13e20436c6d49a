"""``python -m multicam``: the same as the ``multicam`` command."""

import sys

from .cli import main

sys.exit(main())
