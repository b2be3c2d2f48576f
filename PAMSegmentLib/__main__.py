"""``python -m PAMSegmentLib ...`` and the ``pamsegment`` command (pyproject's entry point) call
``run``: ``cli.main``, imported here.

Importing ``cli`` takes ~20 ms (argparse, dataclasses, typing...); a Ctrl-C then, which
``cli.main`` cannot catch yet, ends here as it would later: one line, exit 130, no traceback.
This module imports only ``sys`` first, so what is left uncovered is Python's own start-up.

Once ``cli.main`` has returned, its work is written and reported: Ctrl-C is then ignored (and
``propagate`` leaves it ignored from the moment its output is in place), so an interrupt during
Python's shutdown (about half a second with torch loaded) neither changes the exit status nor
prints a traceback.

OpenBLAS (scipy's copy loads once the image is read) starts one thread per core, each with its
buffer; under an address-space limit (`ulimit -v`, a cluster's h_vmem) that its buffers no longer
fit it retried for good, in C, deaf to Ctrl-C and SIGTERM (a review, session 33: killed after 11
minutes). Nothing here gains from BLAS threads (the network has torch's own), so one is asked for
unless OPENBLAS_NUM_THREADS is set, and ``cli.main`` loads scipy before a command reads an image
(with one thread alone it still hung): the run then ends with the memory message in a second.
"""

import os
import sys


def run() -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import signal

        from .cli import main
    except KeyboardInterrupt:
        print("pamsegment: interrupted; nothing was written", file=sys.stderr)  # as cli.main says it
        return 130  # cli.EXIT_INTERRUPTED
    code = None
    try:
        code = main(ends_process=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the work is written and reported (see above)
    except KeyboardInterrupt:  # a second Ctrl-C in the instant before main's handler ignored it (or after
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # main returned, before the lines above): one line, no
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # traceback (a trial, session 48)
        if code is None:
            print("pamsegment: interrupted; nothing was written", file=sys.stderr)
            code = 130
    return code


if __name__ == "__main__":
    sys.exit(run())
