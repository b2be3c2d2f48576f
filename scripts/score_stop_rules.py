#!/usr/bin/env python
"""Score extra stopping rules offline on records written by ``scripts/stop_signals.py``.

    python scripts/score_stop_rules.py runs/stop_design.npz --rules "net<0.2,pres<0.7,net<0.2|gate<0.3"

A rule is one or more conditions joined by ``|`` (any of them ends the side at that slice):

* ``net<F``: the network's own mask is smaller than F x the guide's area;
* ``pres<T``: the object-present probability is below T;
* ``nw<D``: Dice between the network's mask and the registration's warped mask is below D;
* ``gate<G``: the intensity-drift score of the fused region against the drawn slice is below G;
* ``gateg<G``: the same score against the region of the window's guide slice;
* ``grow>K``: the fused mask is larger than K x the drawn mask.

A suffix ``@N`` requires the rule to fire on N consecutive slices; the side then ends at the
first of them.

A side ends at the first slice (walk order) where the rule fires; that slice and everything
beyond it are emptied, the rest is as recorded. Prints each rule's mean Dice over structures.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


# Each signal of a recorded slice, as the rules compare it.
SIGNALS = {
    "net": lambda r: r["a_net"] / max(r["a_guide"], 1),
    "pres": lambda r: r["presence"],
    "nw": lambda r: r["dice_net_warp"],
    "gate": lambda r: r["gate"],
    "gateg": lambda r: r["gate_guide"],
    "grow": lambda r: r["a_fused"] / max(r["a_prompt"], 1),
}


def parse_rule(rule: str):
    conds = []
    for part in rule.split("|"):
        part = part.strip()
        for op in ("<", ">"):
            if op in part:
                name, value = part.split(op, 1)
                conds.append((name.strip(), op, float(value)))
                break
        else:
            raise SystemExit(f"error: cannot parse condition {part!r} in rule {rule!r} (e.g. net<0.2)")
        if conds[-1][0] not in SIGNALS:
            raise SystemExit(f"error: unknown signal {conds[-1][0]!r} in rule {rule!r}; use {', '.join(SIGNALS)}")
    return conds


def fires(conds, r: dict) -> bool:
    for name, op, v in conds:
        x = SIGNALS[name](r)
        if (x < v) if op == "<" else (x > v):
            return True
    return False


def score(path: str, rule: str | None) -> tuple[float, list[float]]:
    z = np.load(path)
    fields = [str(f) for f in z["fields"]]
    rows = z["rows"]
    items = [json.loads(str(x)) for x in z["items"]]
    run = 1
    if rule and "@" in rule:
        rule, n = rule.rsplit("@", 1)
        run = int(n)
    conds = parse_rule(rule) if rule else []
    dices = []
    for k, (_cid, _name, lo, missed, _pred_total, *rest) in enumerate(items):
        hi = rest[0] if rest else lo  # the outermost drawn slices (one prompt: the same slice)
        sub = [dict(zip(fields, r)) for r in rows[rows[:, 0] == k]]
        inter = pred = 0.0
        ref = float(missed)
        for side in (-1, 0, 1):
            start = lo if side < 0 else hi
            walk = sorted((r for r in sub if r["side"] == side), key=lambda r: abs(r["slice"] - start))
            flags = [bool(side and conds and fires(conds, r)) for r in walk]
            end_at = next((i for i in range(len(walk)) if all(flags[i:i + run])), len(walk))
            for i, r in enumerate(walk):
                ref += r["a_ref"]
                if i < end_at:
                    inter += r["inter"]
                    pred += r["a_pred"]
        dices.append(2 * inter / max(pred + ref, 1.0))
    return float(np.mean(dices)), dices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+")
    ap.add_argument("--rules", default="", help="comma-separated rules; the recorded walk is always shown first")
    args = ap.parse_args(argv)
    rules = [None] + [r for r in args.rules.split(",") if r.strip()]
    print("rule".ljust(28) + " ".join(p.split("/")[-1][:14].rjust(14) for p in args.records))
    for rule in rules:
        vals = [score(p, rule)[0] for p in args.records]
        print((rule or "(as recorded)").ljust(28) + " ".join(f"{v:14.3f}" for v in vals), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
