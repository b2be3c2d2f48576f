"""``python -m PAMSegmentLib ...`` runs the ``pamsegment`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
