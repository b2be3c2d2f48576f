#!/usr/bin/env python
"""One-prompt labelling of 2D image sets (``PAMSegmentLib.imageset.label_images``): how well one
labelled image labels the rest of a set.

    python scripts/evaluate_image_sets.py CKPT --cache CACHE --sets validation [--configs pam:similar,pam:prompt]
    python scripts/evaluate_image_sets.py CKPT --cache CACHE --sets evaluation --out runs/imagesets

A set is built from one structure: every slice along axis 0 that holds it (at most 40, evenly
picked) plus slices without it (a fifth as many, at least 2, from beyond its extent, where the
case has them), shuffled (seed 0). The prompt is the reference on the middle slice of the
extent; every other image is labelled and scored by 2D Dice (an image without the structure
scores 1 when left empty, 0 otherwise). Reported per structure: mean Dice over the images that
hold it, and how many images without it were wrongly labelled.

``--sets validation``: training-case structures only (the 24 of scripts/validate.py), to choose
defaults. ``--sets evaluation``: held-out structures of scripts/split.json (CT organs, the MR scan,
spine MR, the held-out brain subject), plus cross-scanner CT sets (each held-out organ's slices of
both TotalSegmentator CTs in one set: 3 mm and 512 x 512 DICOM slices of two patients, different
sizes), reported, never used to choose.

Configs ``METHOD:ORDER``: METHOD ``pam`` (the checkpoint as shipped), ``pam-nogate`` (drift test
off), ``pam-guide`` / ``pam-prompt`` / ``pam-both`` (the drift test against that reference),
``pam-reg0`` (network alone: registration and drift test off), ``track`` (demons
registration alone), ``copy``; ORDER one of ``similar``, ``prompt``, ``given`` (the true slice
order: an upper reference for sequences). The README's tables:
``--sets evaluation --configs pam:similar,pam:prompt,pam:given,track:similar,copy:prompt`` and
``--sets validation --configs pam:similar,pam:prompt,pam-reg0:similar,track:similar,pam:given``.

``--corrections N``: the correction loop of ``--labelled``. After each run the simulated user
corrects the worst labelled image (lowest 2D Dice among those holding the structure; its mask
becomes the reference) and the set is labelled again with every corrected image as a further
labelled image (``more_prompts``), N times. Each round is scored over the same images: those
never drawn (neither the prompt nor a corrected one), so the figures say how much a correction
helps the others. Written as ``dice_rounds`` in results.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.baselines import get_predictor  # noqa: E402
from PAMSegmentLib.evaluation import load_case, load_split, mean, validation_items, write_csv  # noqa: E402
from PAMSegmentLib.imageset import label_images  # noqa: E402
from PAMSegmentLib.metrics import dice  # noqa: E402

MAX_POSITIVE = 40
VALIDATION_CASES = ("ts_ct", "ts_ct_dicom", "tptbox_ct_vert")


def make_predictor(method: str, checkpoint: str):
    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.pam_predictor import PAMPredictor

    if method in ("track", "copy"):
        return get_predictor(method)
    model = load_model(checkpoint)
    if method == "pam":
        return PAMPredictor(model)
    if method == "pam-nogate":
        return PAMPredictor(model, intensity_gate=False)
    if method in ("pam-guide", "pam-both", "pam-prompt"):  # the drift test against that reference
        return PAMPredictor(model, intensity_gate=True, gate_reference=method[len("pam-"):])
    if method.startswith("pam-pres"):  # the object-present threshold, e.g. pam-pres0.6
        predictor = PAMPredictor(model)
        predictor.presence_threshold = float(method[len("pam-pres"):])
        return predictor
    if method.startswith("pam-floor"):  # the drift test's SD floor, e.g. pam-floor0.1
        predictor = PAMPredictor(model)
        predictor.gate_sd_floor = float(method[len("pam-floor"):])
        return predictor
    if method == "pam-reg0":
        model.inference = replace(model.inference, intensity_gate=False)
        return PAMPredictor(model, registration_weight=0.0)
    raise SystemExit(f"unknown method {method}")


def build_set(parts, rng, shuffle=True):
    """parts: [(image (k, j, i), ref bool (k, j, i))] -> images, refs (2D lists), prompt index.
    The prompt is the middle slice of the first part's extent. ``shuffle=False`` keeps the
    slices in their order (the same images: the ``given`` order's sequence)."""
    picked, prompt = [], None
    for n, (image, ref) in enumerate(parts):
        has = np.flatnonzero(ref.any(axis=(1, 2)))
        pos = has if len(has) <= MAX_POSITIVE else has[np.round(np.linspace(0, len(has) - 1, MAX_POSITIVE)).astype(int)]
        if n == 0:
            prompt = (0, int(has[len(has) // 2]))
            pos = np.union1d(pos, [prompt[1]])
        outside = np.array([k for k in range(ref.shape[0]) if k < has[0] - 1 or k > has[-1] + 1], dtype=int)
        n_neg = min(len(outside), max(2, len(pos) // 5))
        neg = rng.choice(outside, size=n_neg, replace=False) if n_neg else np.array([], dtype=int)
        picked += [(n, int(k)) for k in np.union1d(pos, neg)]
    order = rng.permutation(len(picked)) if shuffle else np.arange(len(picked))
    picked = [picked[i] for i in order]
    images = [parts[n][0][k] for n, k in picked]
    refs = [parts[n][1][k] for n, k in picked]
    return images, refs, picked.index(prompt)


def score(masks, refs, prompt):
    pos, false_pos, n_neg = [], 0, 0
    for q, (m, r) in enumerate(zip(masks, refs)):
        if q == prompt:
            continue
        if r.any():
            pos.append(dice(m > 0, r))
        else:
            n_neg += 1
            false_pos += int((m > 0).any())
    return float(np.mean(pos)), false_pos, n_neg


def validation_sets(cache, split):
    cases, items = validation_items(cache, split, VALIDATION_CASES, 24)
    for cid, lab in items:
        c = cases[cid]
        yield "validation", f"{cid}:{c.label_names.get(lab, lab)}", [(c.image, c.labels == lab)]


def evaluation_sets(cache, split):
    structures = load_split(split)
    loaded = {}
    for s in structures:
        if s.case not in loaded:
            loaded[s.case] = load_case(cache, s.case)
        c = loaded[s.case]
        yield s.group, f"{s.case}:{s.name}", [(c.image, c.labels == s.label)]
    # Cross-scanner: both TotalSegmentator CTs' slices of a held-out organ in one set.
    a, b = loaded.get("ts_ct") or load_case(cache, "ts_ct"), loaded.get("ts_ct_dicom") or load_case(cache, "ts_ct_dicom")
    both = {s.label: s.name for s in structures if s.case == "ts_ct"}.items() & \
        {s.label: s.name for s in structures if s.case == "ts_ct_dicom"}.items()
    for lab, name in sorted(both):
        yield "CT, two patients and scanners in one set", f"ts_ct+ts_ct_dicom:{name}", \
            [(a.image, a.labels == lab), (b.image, b.labels == lab)]


def correction_rounds(images, refs, prompt, predictor, order, first, n_rounds) -> list[float]:
    """Mean 2D Dice, after the first run and after each of ``n_rounds`` corrections (the worst
    labelled image drawn as the reference, then the set labelled again with ``more_prompts``),
    over the images that hold the structure and were never drawn."""
    drawn, results = {}, [first]
    for _ in range(n_rounds):
        current = results[-1]
        candidates = [(dice(current.masks[q] > 0, refs[q]), q) for q in range(len(images))
                      if q != prompt and q not in drawn and refs[q].any()]
        if len(candidates) < 2:  # keep at least one image to score
            break
        drawn[min(candidates)[1]] = refs[min(candidates)[1]].astype(np.uint8)
        results.append(label_images(images, prompt, refs[prompt].astype(np.uint8), predictor, order=order,
                                    more_prompts=dict(drawn)))
    scored = [q for q in range(len(images)) if q != prompt and q not in drawn and refs[q].any()]
    return [float(np.mean([dice(r.masks[q] > 0, refs[q]) for q in scored])) for r in results]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--split", default=str(ROOT / "scripts" / "split.json"))
    ap.add_argument("--sets", choices=("validation", "evaluation"), default="validation")
    ap.add_argument("--configs", default="pam:similar,pam:prompt,pam-nogate:similar,pam-nogate:prompt")
    ap.add_argument("--groups", default=None, help="evaluation groups to keep (comma-separated substrings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for results.csv")
    ap.add_argument("--corrections", type=int, default=0,
                    help="rounds of the simulated correction loop (see the docstring; default 0)")
    args = ap.parse_args(argv)
    if args.corrections < 0:
        ap.error("--corrections must be 0 or more")
    import torch

    torch.set_num_threads(args.threads)
    configs = [c.split(":") for c in args.configs.split(",")]
    predictors = {m: make_predictor(m, args.checkpoint) for m in {m for m, _ in configs}}
    sets = validation_sets(args.cache, args.split) if args.sets == "validation" else evaluation_sets(args.cache, args.split)
    rows, per_image = [], []
    for group, name, parts in sets:
        if args.groups and not any(g.lower() in group.lower() for g in args.groups.split(",")):
            continue
        line = [f"{name:42s}"]
        for method, order in configs:
            # "given" walks the slices in their true order; the other orders see them shuffled.
            images, refs, prompt = build_set(parts, np.random.default_rng(0), shuffle=order != "given")
            t0 = time.perf_counter()
            res = label_images(images, prompt, refs[prompt].astype(np.uint8), predictors[method], order=order)
            d, fp, n_neg = score(res.masks, refs, prompt)
            for q, (m, ref) in enumerate(zip(res.masks, refs)):  # per image, for choosing a confidence floor
                if q != prompt:
                    per_image.append({"structure": name, "config": f"{method}:{order}", "has": int(ref.any()),
                                      "confidence": float(max(res.confidence[lab][q] for lab in res.labels)),
                                      "dice": dice(m > 0, ref)})
            row = {"group": group, "structure": name, "config": f"{method}:{order}", "dice": d,
                   "false_pos": fp, "negatives": n_neg, "images": len(images),
                   "seconds": time.perf_counter() - t0}
            line.append(f"{method}:{order} {d:.3f} fp {fp}/{n_neg}")
            if args.corrections:
                rounds = correction_rounds(images, refs, prompt, predictors[method], order, res, args.corrections)
                row["dice_rounds"] = " ".join(f"{v:.4f}" for v in rounds)
                line.append("rounds " + " ".join(f"{v:.3f}" for v in rounds))
            rows.append(row)
        print("  ".join(line), flush=True)
    print()
    groups = sorted({r["group"] for r in rows})
    for method, order in configs:
        cfg = f"{method}:{order}"
        per = [f"{g}: {mean(r['dice'] for r in rows if r['config'] == cfg and r['group'] == g):.3f}" for g in groups]
        allr = [r for r in rows if r["config"] == cfg]
        fp = sum(r["false_pos"] for r in allr)
        neg = sum(r["negatives"] for r in allr)
        print(f"{cfg:22s} mean {mean(r['dice'] for r in allr):.3f}  false positives {fp}/{neg}  | " + "; ".join(per))
        if args.corrections:
            rounds = np.array([[float(v) for v in r["dice_rounds"].split()] for r in allr
                               if len(r["dice_rounds"].split()) == args.corrections + 1])
            print(f"{'':22s} correction rounds over the images never drawn ({len(rounds)} sets): "
                  + " -> ".join(f"{v:.3f}" for v in rounds.mean(axis=0)))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_csv(rows, Path(args.out) / "results.csv")
        write_csv(per_image, Path(args.out) / "images.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
