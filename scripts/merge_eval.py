#!/usr/bin/env python
"""Merge evaluation runs into one results.csv (and summary) for the README.

    python scripts/merge_eval.py --out runs/eval_final runs/eval_r2/*/results.csv runs/eval_baselines/results.csv

Rows are kept only for (case, structure, protocol) combinations that every method in the merge
was evaluated on, so each table compares methods on the same structures. The summary and figure
are then rebuilt with ``scripts/evaluate.py --from-csv``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib import evaluation as ev  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows, seen = [], set()
    for path in args.inputs:
        for r in ev.read_csv(path):
            # The same run can appear in several inputs (every run also scores the 50 % prompt): keep the first.
            key = (r["case"], r["structure"], r["method"], r["protocol"], r["position"], r["round"])
            if key not in seen:
                seen.add(key)
                rows.append(r)

    def family(method: str) -> str:  # ci@pam and scratch@pam belong to pam's session
        return method.split("@")[-1]

    def proto(r):
        # Positions count as separate protocols: a structure scored at 30/50/70 % by one method
        # but only at 50 % by another enters the position table for neither.
        return f"single@{r['position']}" if r["protocol"] == "single" else r["protocol"]

    primary = {r["method"] for r in rows if "@" not in r["method"] and r["method"] != "ci"}
    by_key: dict[tuple, set] = {}
    for r in rows:
        if r["method"] in primary:
            by_key.setdefault((r["case"], r["structure"], proto(r)), set()).add(r["method"])
    # A protocol's comparison uses the methods evaluated with it; a structure enters it only when
    # all of them have it.
    methods_of = {}
    for (c, s, p), ms in by_key.items():
        methods_of.setdefault(p, set()).update(ms)
    keep = {k for k, ms in by_key.items() if ms == methods_of[k[2]]}
    merged = [r for r in rows if (r["case"], r["structure"], proto(r)) in keep
              and (r["method"] in primary or family(r["method"]) in primary or r["method"] == "ci")]
    args.out.mkdir(parents=True, exist_ok=True)
    ev.write_csv(merged, args.out / "results.csv")
    print(f"{len(merged)} rows from {len(args.inputs)} files; protocols: "
          + ", ".join(f"{p}: {sorted(ms)}" for p, ms in methods_of.items()))
    return subprocess.call([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--from-csv", "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
