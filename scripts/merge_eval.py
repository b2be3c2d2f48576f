#!/usr/bin/env python
"""Merge evaluation runs into one results.csv (and summary) for the README.

    python scripts/merge_eval.py --out runs/eval_final runs/eval_r2/*/results.csv runs/eval_baselines/results.csv

An input written ``PATH::OLD=NEW`` has its method OLD renamed NEW (also ``ci@OLD``/``scratch@OLD``),
e.g. to show a run of the same weights with other inference parameters beside the current one:

    python scripts/merge_eval.py --out docs/evaluation runs/eval_r9/*/results.csv \
        runs/eval_r5/main/results.csv::pam=pam-net ... runs/eval_baselines/results.csv

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
    ap.add_argument("inputs", nargs="+", help="results.csv files, each optionally PATH::OLD=NEW")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows, seen, sources = [], {}, []
    for given in args.inputs:
        path, _, rename = given.partition("::")
        old, eq, new = rename.partition("=")
        if rename and (not eq or not old or not new):
            raise SystemExit(f"error: expected PATH::OLD=NEW to rename a method, got {given!r}")
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} is not a file; give results.csv files of scripts/evaluate.py")
        read = ev.read_csv(Path(path))
        lacking = {"case", "structure", "method", "protocol", "position", "round"} - set(read[0] if read else {})
        if read and lacking:
            raise SystemExit(f"error: {path} is not a results table of scripts/evaluate.py (no "
                             f"{', '.join(sorted(lacking))} column)")
        if rename and not any(r["method"].split("@")[-1] == old for r in read):
            raise SystemExit(f"error: {given}: {path} has no method {old!r} to rename (its methods: "
                             f"{', '.join(sorted({r['method'] for r in read}))})")
        for r in read:
            if rename and r["method"].split("@")[-1] == old:
                r["method"] = r["method"][: -len(old)] + new
            # The same run can appear in several inputs (every run also scores the 50 % prompt): keep the first.
            # The prompt variant is part of a row's identity (imperfect drawings: erode/dilate/rough), and two
            # rows of one identity that score differently are two different runs (another --axis or
            # --tolerance, which rows do not record): refused, not one kept silently (a review: merging
            # axis-1 results before results.csv put axis-1 track beside axis-0 pam).
            key = (r["case"], r["structure"], r["method"], r["protocol"], r["position"], r["round"],
                   r.get("prompt_variant") or "")
            score = (r.get("dice"), r.get("nsd"))
            if key not in seen:
                seen[key] = (score, path)
                rows.append(r)
                sources.append(path)
            elif seen[key][0] != score:
                raise SystemExit(f"error: {path} and {seen[key][1]} both hold {', '.join(map(str, key))} with "
                                 f"different scores ({score} vs {seen[key][0]}): runs of another --axis or "
                                 "--tolerance cannot be merged into one table; if one is a re-run of the method "
                                 "(e.g. copy after a fix), give the other file as PATH::OLD=NEW to keep both")

    # Rows must agree on their propagation axis and NSD tolerance: another axis is another experiment,
    # and NSDs at other tolerances do not average. Rows written before evaluate.py recorded them
    # (session 29) were all run along axis 0 at 2 mm (docs/evaluation/provenance.json's commands).
    for field, option, before in (("axis", "--axis", 0.0), ("nsd_tolerance_mm", "--tolerance", 2.0)):
        values = {}
        for r, src in zip(rows, sources):
            values.setdefault(float(r[field]) if r.get(field) not in (None, "") else before, src)
        if len(values) > 1:
            raise SystemExit(f"error: the inputs were run with different {option} ("
                             + ", ".join(f"{v:g} in {src}" for v, src in values.items())
                             + "): merge runs of one value only")

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
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} is a file; give a folder for the merged tables")
    args.out.mkdir(parents=True, exist_ok=True)
    ev.write_csv(merged, args.out / "results.csv")
    print(f"{len(merged)} rows from {len(args.inputs)} files; protocols: "
          + ", ".join(f"{p}: {sorted(ms)}" for p, ms in methods_of.items()))
    return subprocess.call([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--from-csv", "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
