#!/usr/bin/env python
"""Time and peak memory of few-shot cell labelling on large images.

    python scripts/benchmark_cells.py [--sizes 2048,4096] [--colour]

The test fixture's 256 x 256 nuclei crop (Testing/data/stardist_nuclei_crop.npz) tiled to each
size, five of its nuclei outlined in the top-left copy; each size runs in a fresh process so its
peak resident memory is its own. Prints size, cells found (35 per copy are there), seconds and
peak memory. ``--colour`` also runs each size as an H&E-like colour image (the grey values
inverted, so that nuclei are dark, and tinted per channel), as brightfield slides are exported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one(size: int, colour: bool = False) -> dict:
    sys.path.insert(0, str(ROOT))
    from PAMSegmentLib.cells import label_cells

    data = np.load(ROOT / "Testing" / "data" / "stardist_nuclei_crop.npz")
    image, ref = data["image"], data["labels"]
    reps = max(size // image.shape[0], 1)
    big = np.tile(image, (reps, reps))
    if colour:  # dark purple nuclei on pink: 255 - the scaled grey value x a tint per channel
        grey = big.astype(np.float32) / float(big.max())
        big = (255 - grey[..., None] * np.array([120, 170, 90], np.float32)).astype(np.uint8)
    examples = np.zeros(big.shape[:2], np.uint16)
    examples[: image.shape[0], : image.shape[1]] = np.where(np.isin(ref, [20, 17, 11, 13, 26]), ref, 0)
    t0 = time.perf_counter()
    result = label_cells(big, examples)
    return {"size": big.shape[0], "kind": "colour" if colour else "grey", "cells": len(result.cells),
            "present": 35 * reps * reps,
            "seconds": time.perf_counter() - t0,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--colour", action="store_true", help="also run each size as an H&E-like colour image")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.colour)))
        return 0
    print("| image (px) | kind | cells found / present | seconds | peak memory (GB) |\n|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for colour in ((False, True) if args.colour else (False,)):
            out = subprocess.run([sys.executable, __file__, "--one", str(size), *(["--colour"] if colour else [])],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['size']} x {r['size']} | {r['kind']} | {r['cells']} / {r['present']} | {r['seconds']:.1f} "
                  f"| {r['peak_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
