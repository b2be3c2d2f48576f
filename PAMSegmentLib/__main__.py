"""``python -m PAMSegmentLib ...`` and the ``pamsegment`` command (pyproject's entry point) call
``run``: ``cli.main``, imported here.

Importing ``cli`` takes ~20 ms (argparse, dataclasses, typing...); a Ctrl-C then, which
``cli.main`` cannot catch yet, ends here as it would later: one line, exit 130, no traceback.
This module imports only ``sys`` first, so what is left uncovered is Python's own start-up.
"""

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("pamsegment: interrupted; nothing was written", file=sys.stderr)  # as cli.main says it
        return 130  # cli.EXIT_INTERRUPTED
    return main()


if __name__ == "__main__":
    sys.exit(run())
