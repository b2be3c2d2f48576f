"""``python -m PAMSegmentLib ...`` and the ``pamsegment`` command (pyproject's entry point) call
``run``: ``cli.main``, imported here.

Importing ``cli`` takes ~20 ms (argparse, dataclasses, typing...); a Ctrl-C then, which
``cli.main`` cannot catch yet, ends here as it would later: one line, exit 130, no traceback.
This module imports only ``sys`` first, so what is left uncovered is Python's own start-up.

Once ``cli.main`` has returned, its work is written and reported: Ctrl-C is then ignored (and
``propagate`` leaves it ignored from the moment its output is in place), so an interrupt during
Python's shutdown (about half a second with torch loaded) neither changes the exit status nor
prints a traceback.
"""

import sys


def run() -> int:
    try:
        import signal

        from .cli import main
    except KeyboardInterrupt:
        print("pamsegment: interrupted; nothing was written", file=sys.stderr)  # as cli.main says it
        return 130  # cli.EXIT_INTERRUPTED
    code = main(ends_process=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the work is written and reported (see above)
    return code


if __name__ == "__main__":
    sys.exit(run())
