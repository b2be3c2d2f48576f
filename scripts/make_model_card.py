#!/usr/bin/env python
"""Write the model card of a trained checkpoint (JSON beside it + a markdown section).

    python scripts/make_model_card.py Resources/Models/pam_small.pt \
        --train-log docs/train_logs/pam_small_stage1.csv --train-log docs/train_logs/pam_small_stage2.csv \
        --train-log docs/train_logs/pam_small_stage3.csv --train-log docs/train_logs/pam_small_stage4.csv \
        --eval docs/evaluation/results.csv --out-md docs/model_card.md

(one --train-log per training stage, first to last; the shipped weights have four). --split names
the split the weights were trained with when it is not scripts/split.json.

Everything in the card is read from the checkpoint (config, preprocessing, provenance, sha256),
the training logs and the evaluation CSV written by scripts/evaluate.py; nothing is typed in.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.checkpoints import load_checkpoint_file, training_chain  # noqa: E402
from PAMSegmentLib.errors import PAMError  # noqa: E402


# What the shipped weights' stage commands need besides themselves (the data each read, which
# starting weights are kept, what the revisions do not hold), as measured from the stages'
# provenance. Printed only in the card of those weights (their weights' sha256, SHIPPED_WEIGHTS):
# another checkpoint's card gets GENERIC_NOTE. A new shipped training stage updates this text.
SHIPPED_WEIGHTS = "795f18e3ce7cde76f9bf73d37aa7878731883c80ecae0bb848be018a7a7399b9"
SHIPPED_NOTE = (
    "(each stage continues from the previous one's weights; `--cache` "
    "named this machine's data cache, prepared with `python scripts/prepare_data.py --cache CACHE "
    '--synthetic 400` for stages 1-3 (400 synthetic volumes; on a cache that also holds the layered '
    'columns, add `--max-synthetic 400` to repeat them) and with `--synthetic-stacks 160` added for stage'
    " 4 (560). The git revision given is the commit each stage's tree was at: stages 1, 3 and 4 ran it as "
    "committed; stage 2 ran on uncommitted changes, its `--presence-weight` option committed 22 minutes "
    "after it started (85cf8db), so no commit holds exactly the code that trained it. None of the stages "
    "can be repeated bit for bit: at their revisions the learning rate and the rollouts followed wall time "
    "even with `--max-iterations` (runs with `--max-iterations` repeat exactly from 4c93ef5 on, where it "
    "sets the schedule). The weights a stage started from: stage 2's and stage 4's are "
    "`Resources/Models/pam_small.pt` at their revisions; stage 2's output `runs/pam_small_r3.pt` (weights"
    ' sha256 `c3d26b934f62c5d6...`), which stage 3 started from, was not kept, so stage 3 can only be '
    'repeated from a new stage 2)'
)
GENERIC_NOTE = (
    "(each stage continues from the previous one's weights; the git revision given is the commit its "
    "tree was at, with the files it had changed in its provenance's `git_changes` where recorded)"
)


def _shown_path(path: Path) -> str:
    """The checkpoint's path for the card's text: relative to the repository when inside it
    (``Resources/Models/pam_small.pt``), else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def training_summary(logs: list[Path]) -> list[dict]:
    """Per training log: its last row's iteration and time (a log is written every few iterations,
    so the run's own count is the provenance's, ``training_stages[].iterations``) and the loss."""
    out = []
    for log in logs:
        with open(log, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            lacking = {"iteration", "seconds", "loss"} - set(reader.fieldnames or ())
        if lacking:  # (a .json summary given as --train-log was KeyError: 'iteration', or taken as no rows)
            raise ValueError(f"--train-log {log} is not a training curve (no {', '.join(sorted(lacking))} column): "
                             "give the .csv scripts/train.py wrote (--log)")
        if not rows:
            continue
        tail = rows[-20:]
        out.append({
            "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log),
            "last_logged_iteration": int(rows[-1]["iteration"]),
            "last_logged_seconds": float(rows[-1]["seconds"]),
            "final_loss_mean_last_20_logged": round(sum(float(r["loss"]) for r in tail) / len(tail), 4),
        })
    return out


def eval_summary(path: Path, weights_sha256: str = "") -> dict:
    """Mean Dice by group and method at the 50 % prompt. The rows of method ``pam`` that carry a
    weights sha256 (evaluate.py stamps them since session 24) must carry this checkpoint's: a card
    must not quote another checkpoint's figures."""
    rows = [r for r in _rows(path) if r.get("protocol") == "single" and float(r.get("position") or 0.5) == 0.5
            and not r.get("error")]
    stamped = {r.get("weights_sha256") for r in rows if r["method"] == "pam" and r.get("weights_sha256")}
    if weights_sha256 and stamped - {weights_sha256}:
        raise SystemExit(f"error: the pam rows of {path} were made with weights {', '.join(x[:16] for x in stamped)}"
                         f"..., not this checkpoint's {weights_sha256[:16]}...: give the evaluation of these weights")
    n_stamped = sum(1 for r in rows if r["method"] == "pam" and r.get("weights_sha256"))
    groups: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault(r["group"], {}).setdefault(r["method"], []).append(float(r["dice"]))
    table = {g: {m: round(sum(v) / len(v), 3) for m, v in ms.items()} for g, ms in groups.items()}
    n = {g: max(len(v) for v in ms.values()) for g, ms in groups.items()}
    return {"mean_dice_by_group": table, "structures_by_group": n, "source": str(path),
            "pam_rows_with_these_weights": f"{n_stamped} of {sum(1 for r in rows if r['method'] == 'pam')}"}


def training_stages(provenance: dict) -> list[dict]:
    """The checkpoint's training stages, first to last, from the ``init_from`` chain."""
    return [{k: prov.get(k) for k in ("command", "iterations", "train_seconds", "machine", "seed", "git_revision")}
            for prov in training_chain(provenance)]


def check_logs(logs: list[dict], stages: list[dict]) -> None:
    """SystemExit unless the training logs given are the checkpoint's stages, in order: one per stage,
    each ending within 9 iterations of what that stage's provenance counted (older logs wrote a row
    every 10 iterations). A card of other logs would claim another run's compute."""
    if not logs:
        return
    if len(logs) != len(stages):
        raise SystemExit(f"error: {len(logs)} --train-log given, but the checkpoint's provenance has {len(stages)} "
                         "training stages: give one log per stage, oldest first")
    for n, (log, stage) in enumerate(zip(logs, stages), start=1):
        counted = stage.get("iterations")
        if isinstance(counted, int) and not 0 <= counted - log["last_logged_iteration"] <= 9:
            raise SystemExit(f"error: {log['log']} ends at iteration {log['last_logged_iteration']}, but stage {n} "
                             f"of the checkpoint ran {counted}: it is another run's log")


def stage_case_notes(provenance: dict, final: list[str]) -> list[str]:
    """Per earlier stage whose provenance lists other real cases than ``final``: what it read."""
    notes = []
    for n, cases in enumerate((prov.get("cases") for prov in training_chain(provenance)), start=1):
        if cases and set(cases) != set(final):
            missing, extra = sorted(set(final) - set(cases)), sorted(set(cases) - set(final))
            notes.append(f"stage {n} read {len(cases)} real ones"
                         + (f", without {', '.join(missing)}" if missing else "")
                         + (f", with {', '.join(extra)}" if extra else ""))
    return notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--train-log", type=Path, action="append", default=[])
    ap.add_argument("--eval", type=Path, default=None, help="results.csv of scripts/evaluate.py")
    ap.add_argument("--out-json", type=Path, default=None, help="default: <checkpoint>.json")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--split", type=Path, default=ROOT / "scripts" / "split.json",
                    help="the split the checkpoint was trained with (default: scripts/split.json)")
    args = ap.parse_args(argv)

    model = load_checkpoint_file(args.checkpoint)
    logs, stages = training_summary(args.train_log), training_stages(model.provenance)
    check_logs(logs, stages)
    split_bytes = args.split.read_bytes()
    recorded = model.provenance.get("split_sha256") if isinstance(model.provenance, dict) else None
    if isinstance(recorded, str) and recorded != hashlib.sha256(split_bytes).hexdigest():
        raise ValueError(f"the checkpoint was trained with a split of sha256 {recorded[:16]}... "
                         f"({model.provenance.get('split')}), and {args.split} is another: give that split (--split) "
                         "so that the card names the data the weights saw")
    split = json.loads(split_bytes)
    card = {
        "name": args.checkpoint.stem,
        "file": args.checkpoint.name,
        "size_bytes": args.checkpoint.stat().st_size,
        "sha256_weights": model.sha256,
        "network": model.config.to_dict(),
        "parameters": model.network.n_parameters(),
        "preprocessing": model.preprocessing.to_dict(),
        "inference": model.inference.to_dict(),
        "provenance": model.provenance,
        "training": logs,
        "training_stages": stages,
        "data": {
            # What this checkpoint was trained on (its provenance), not what the split lists today.
            # (an empty list is a synthetic-only run: it was given the split's 17 real cases)
            "training_cases": (model.provenance["cases"] if "cases" in model.provenance
                               else [e["case"] for e in split["train"]]),
            "synthetic": split.get("train_synthetic"),
            "evaluation_cases": [{"case": e["case"], "group": e["group"]} for e in split["eval"]],
            "heldout_structures": split["heldout_structures"],
            "split_file": (str(args.split.resolve().relative_to(ROOT)) if args.split.resolve().is_relative_to(ROOT)
                           else str(args.split)),
        },
        "evaluation": eval_summary(args.eval, model.sha256) if args.eval else None,
        "intended_use": "Propagating a mask drawn on one (or a few) slices of a 3D medical image to the "
                        "whole structure, for review and correction by the user. Not a diagnostic device.",
    }
    out_json = args.out_json or args.checkpoint.with_suffix(".json")
    out_json.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out_json}")
    if args.out_md:
        t = card["training"]
        total_min = sum(x["last_logged_seconds"] for x in t) / 60
        stages = card["training_stages"]
        # Iterations as each run's provenance counted them (its log's last row, written every 10
        # iterations, can be up to 9 fewer); the logs' counts where no provenance has them.
        counted = [st.get("iterations") for st in stages] if len(stages) == len(t) else [None] * len(t)
        its = [c if isinstance(c, int) else x["last_logged_iteration"] for c, x in zip(counted, t)]
        total_it = sum(its)
        lines = [
            f"* **File**: `{_shown_path(args.checkpoint)}` ({card['size_bytes'] / 1e6:.1f} MB), weights sha256 "
            f"`{card['sha256_weights'][:16]}...` (full value and everything below in `{out_json.name}`).",
            f"* **Network**: preset `{card['network']['name']}`, {card['parameters'] / 1e6:.2f} M parameters, "
            f"{card['network']['input_size']} px crops, {card['network']['n_stages']} stages "
            f"{card['network']['base_features']}-{card['network']['max_features']} features, cross-attention at the "
            f"{card['network']['n_attention_stages']} deepest stages, object-present head.",
            f"* **Training**: {total_it} iterations in {total_min:.0f} min ("
            + (" / ".join(sorted({str(st['machine']) for st in stages if st.get('machine')})) or "machine not recorded")
            + "); "
            "runs: " + "; ".join(f"`{x['log']}` ({n} it, {x['last_logged_seconds'] / 60:.0f} min)"
                                  for x, n in zip(t, its)) + ".",
            f"* **Commands** {SHIPPED_NOTE if card['sha256_weights'] == SHIPPED_WEIGHTS else GENERIC_NOTE}: "
            + "; ".join(f"`{st.get('command') or '?'}` (git {str(st.get('git_revision') or '?')[:10]})"
                        for st in card["training_stages"]) + ".",
            f"* **Inference** (in the checkpoint; the CLI, Python API and Slicer use it): window "
            f"{card['inference']['window_mm']:g} mm, presence threshold {card['inference']['presence_threshold']:g}, "
            f"registration fusion weight {card['inference']['registration_weight']:g} "
            f"({card['inference']['registration_max_side']} px, {card['inference']['registration_iterations']} iterations"
            + (f" after {card['inference']['registration_coarse_iterations']} on a grid half as fine"
               if card["inference"].get("registration_coarse_iterations", 0) else "")
            + (f", the carried mask on a {card['inference']['registration_carry_supersample']}x finer grid"
               if card["inference"].get("registration_carry_supersample", 1) > 1 else "") + "), "
            + ({"both": "intensity drift test against the guide's and the drawn slice's regions (either ends a walk)"}
               .get(card["inference"]["intensity_gate_reference"],
                    f"intensity drift test against the {card['inference']['intensity_gate_reference']} region")
               if card["inference"]["intensity_gate"] else "no intensity drift test")
            + (f", with two or more keyframes walks beyond the outermost end below a network-registration "
               f"agreement of {card['inference']['keyframe_outward_min_agreement']:g} (Dice)"
               if card["inference"].get("keyframe_outward_min_agreement", 0) else "")
            + "".join(f"; set after training: {', '.join(f'{k}={v}' for k, v in c['set'].items())} ({c['reason']})"
                      for c in card["provenance"].get("inference_changes", [])) + ".",
            f"* **Data**: {len(card['data']['training_cases'])} real training cases"
            + (" (" + ", ".join(card["data"]["training_cases"][:6])
               + (", ...)" if len(card["data"]["training_cases"]) > 6 else ")")
               if card["data"]["training_cases"] else "")
            + " plus synthetic volumes"
            + "".join(f" ({note})" for note in stage_case_notes(model.provenance, card["data"]["training_cases"]))
            + "; held-out structures "
            + ", ".join(card["data"]["heldout_structures"]) + "; evaluation-only scans: "
            + ", ".join(sorted({e['case'] for e in card['data']['evaluation_cases'] if e['case'] not in ('ts_ct', 'ts_ct_dicom')})) + ".",
        ]
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out_md}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PAMError, OSError, ValueError) as exc:  # one line, not a traceback (a missing file, a wrong log)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
