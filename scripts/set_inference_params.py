#!/usr/bin/env python
"""Change a PAMSegment checkpoint's inference parameters (not its weights) and record why.

    python scripts/set_inference_params.py Resources/Models/pam_small.pt --set registration_weight=0.6 \\
        --reason "validation: 0.728 / 0.576 vs 0.645 / 0.535" --out Resources/Models/pam_small.pt

Inference parameters (``PAMSegmentLib.checkpoints.InferenceParams``) are chosen on training-case
structures with ``scripts/validate.py``; this writes the chosen values into the checkpoint so the
CLI, the Python API and the Slicer module all use them. The weights (and their sha256) are
unchanged; the change is appended to the provenance's ``inference_changes`` list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.checkpoints import InferenceParams, load_checkpoint_file, save_checkpoint  # noqa: E402
from PAMSegmentLib.errors import PAMError  # noqa: E402


def parse_assignment(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(InferenceParams)}
    if not sep or name not in fields:
        raise SystemExit(f"error: --set expects NAME=VALUE with NAME one of {', '.join(fields)}; got {text!r}")
    kind = type(getattr(InferenceParams(), name))
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return name, value.lower() in ("true", "1")
        return name, kind(value)
    except ValueError:
        raise SystemExit(f"error: {name} expects a {kind.__name__}, got {value!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--set", action="append", required=True, metavar="NAME=VALUE", dest="assignments")
    ap.add_argument("--reason", required=True, help="why (the validation figures), kept in the provenance")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out other than the checkpoint")
    args = ap.parse_args(argv)
    changes = dict(parse_assignment(a) for a in args.assignments)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise SystemExit(f"error: --out {out} is a folder or lies in a folder that does not exist; give a file path")
    try:
        model = load_checkpoint_file(args.checkpoint)
    except (PAMError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if model.kind != "pamsegment":
        raise SystemExit("error: only PAMSegment checkpoints carry inference parameters; the official file does not")
    if out.exists() and not args.overwrite and out.resolve() != Path(args.checkpoint).resolve():
        raise SystemExit(f"error: --out {out} exists and is another file than the checkpoint; give --overwrite to "
                         "replace it")
    card = out.with_suffix(".json")
    card_record = None
    if card.is_file():  # a model card beside --out must describe these weights, or the pair would stop loading
        try:
            card_record = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card_record = None
        card_sha = card_record.get("sha256_weights") if isinstance(card_record, dict) else None
        if card_sha and card_sha != model.sha256:
            raise SystemExit(f"error: {card} is the model card of other weights ({card_sha[:12]}...; these are "
                             f"{model.sha256[:12]}...): writing them as {out.name} would leave a card that does not "
                             "match; choose another --out")
    try:
        inference = dataclasses.replace(model.inference, **changes)
    except ValueError as exc:  # a value outside its range: nothing is written
        raise SystemExit(f"error: {exc}") from None
    provenance = dict(model.provenance)
    provenance["inference_changes"] = list(provenance.get("inference_changes", [])) + [
        {"set": changes, "before": {k: getattr(model.inference, k) for k in changes}, "reason": args.reason}]
    try:
        digest = save_checkpoint(args.out, model.network, model.preprocessing, inference, provenance)
    except PAMError as exc:  # (a full disk: nothing replaced)
        raise SystemExit(f"error: {exc}") from None
    if digest != model.sha256:
        raise SystemExit(f"error: the weights changed while rewriting ({model.sha256} -> {digest})")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in changes.items()) + f" (weights sha256 {digest[:8]}...)")
    if card.is_file():  # the model card lists the inference parameters too
        record = card_record
        if isinstance(record, dict) and record.get("file") == out.name and isinstance(record.get("inference"), dict):
            # The default weights are held to their card (checkpoints._check_model_card): its inference
            # section follows the checkpoint, or they would no longer load; so do its provenance and size.
            record["inference"] = json.loads(json.dumps(inference.to_dict(), default=str))
            if isinstance(record.get("provenance"), dict):
                record["provenance"]["inference_changes"] = json.loads(
                    json.dumps(provenance["inference_changes"], default=str))
            record["size_bytes"] = out.stat().st_size
            tmp = card.with_name(card.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, card)
            print(f"note: updated the inference section of {card}; its evaluation figures are those of the old "
                  f"parameters: rewrite it with scripts/make_model_card.py {args.out} once you have new ones")
        else:
            print(f"note: {card} still lists the old inference parameters: rewrite it with scripts/make_model_card.py "
                  f"{args.out} (see its docstring for the logs and evaluation to give)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
