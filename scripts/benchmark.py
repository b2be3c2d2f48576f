#!/usr/bin/env python
"""Speed, memory and scaling of propagation (issue 5); the logic is PAMSegmentLib.benchmark.

Network alone (default vs official preset vs SAM 2 tiny), end to end on synthetic 512 x 512 CTs
(read, preprocess, propagate, write; wall time and peak RSS in a fresh process per row, unless
--quick or --in-process runs them in this one) and the
Slicer path on slicer-core MRML nodes. Prints the tables and the issue's targets and writes
network.csv, paired.csv, end_to_end.csv, slicer.csv, targets.csv, benchmark.json, benchmark.md and
benchmark.png into --out: by default docs/benchmark/ in this repository for a full run as
published (all parts, default sizes, 2 threads, the shipped weights), and ./benchmark_out/ for a
run with --quick, --parts, a changed size or repeat count, --threads other than 2 or other weights.

Examples:
    python scripts/benchmark.py --threads 2 --checkpoint Resources/Models/pam_small.pt  # the full run (~15 min on 2 cores)
    python scripts/benchmark.py --quick --threads 1                # smoke run, seconds, into ./benchmark_out
    python scripts/benchmark.py --parts network,e2e --out /tmp/b   # some parts only
Same as `pamsegment benchmark ...` (whose full-run --out default is ./docs/benchmark).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PAMSegmentLib.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=str(ROOT / "docs" / "benchmark"), ends_process=True))
