#!/usr/bin/env python
"""Validation on structures of the TRAINING cases (never evaluation data) to choose inference
options and checkpoints.

    python scripts/validate.py CKPT [--configs pam,pam+gate,window10,track] [--cache cache]

24 structures (seed 0) of ts_ct, ts_ct_dicom and tptbox_ct_vert listed as training labels in
scripts/split.json, with >= 500 voxels over >= 5 slices; prompt = reference on the middle slice
of the extent along axis 0 (``--keyframes``: at 25 % and 75 %); prints the mean 3D Dice per
configuration. ``--fresh`` leaves out those 24 default structures (with ``--cases`` and a large
``--n``: a hypothesis confirmed on training-case structures never used to choose).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.baselines import get_predictor  # noqa: E402
from PAMSegmentLib.errors import InputError  # noqa: E402
from PAMSegmentLib.evaluation import (contour_interpolation, prompt_from_reference, validation_items,  # noqa: E402
                                      validation_prompt_slices)
from PAMSegmentLib.metrics import dice  # noqa: E402
from PAMSegmentLib.propagate import propagate  # noqa: E402

CASES = ("ts_ct", "ts_ct_dicom", "tptbox_ct_vert")
N_DEFAULT = 24  # structures of the default set


# validate.py config options: flags, and numeric options (prefix -> (settings group or None, key, type)).
_FLAGS = {
    "gate": {"gate": True},  # the drift test against the drawn slice
    "gateg": {"gate": True, "gate_reference": "guide"},  # against the window's guide region
    "gateb": {"gate": True, "gate_reference": "both"},  # against both: ends where either fails
    "nogate": {"gate": False},
    # A prior-channel network's query prior (checkpoints.QUERY_PRIORS).
    "carried": {"query_prior": "carried"},
    "guideprior": {"query_prior": "guide"},
    # The registration's demons filter: diffeomorphic instead of fast symmetric forces.
    "regdiffeo": {"registration_options": {"diffeomorphic": True}},
    # The network's intensity window from each window's guide instead of the drawn slice.
    "wguide": {"network_window": "guide"},
    # ... from the drawn slice each walk started from (several keyframes).
    "kfwin": {"network_window": "origin"},
    # Which drawn slice PAM begins from (its intensity window, the drift test's first statistics): the one
    # of most voxels; the lowest holding at least a quarter of the largest's (shipped since session 45); the
    # lowest (before).
    "kflargest": {"begin_keyframe": "largest"},
    "kfsizable": {"begin_keyframe": "lowest-sizable"},
    "kflowest": {"begin_keyframe": "lowest"},
    # Between two keyframes a slice one walk left empty takes the other walk's prediction alone (the
    # engine's rule since session 19); kfvotes: the walk that lost the object still votes (before).
    "kfnoempty": {"keyframe_empty_side_votes": False},
    "kfvotes": {"keyframe_empty_side_votes": True},
    # The authors' published walk (overlapping windows, votes united, 6-connected components; the
    # official checkpoint's default) instead of the engine's.
    "published": {"published_scheme": True, "authors_preprocessing": True},
}
_NUMERIC = {
    "kfagree": (None, "keyframe_outward_min_agreement", float),  # min Dice network vs warped, outward
    # between two keyframes a walk whose area is at most F x the drawn slices' (distance-weighted) lost it
    "kfcollapse": (None, "keyframe_collapse_fraction", float),
    "fb": (None, "consistency_min_dice", float),
    "thr": (None, "threshold", float),
    "pres": (None, "presence_threshold", float),
    "reg": (None, "registration_weight", float),
    "regside": ("registration_options", "max_side", int),
    "regit": ("registration_options", "iterations", int),
    "regcoarse": ("registration_options", "coarse_iterations", int),
    "reglevels": ("registration_options", "coarse_levels", int),
    "regsigma": ("registration_options", "sigma", float),
    "regstep": ("registration_options", "max_step", float),  # demons step limit, grid px per iteration
    "carryss": (None, "carry_supersample", int),  # the chain's carried mask on an s times finer grid
    "up": (None, "through_plane_mm", float),  # thick slices: walks through slices interpolated to <= T mm (0 = off)
    "gatek": (None, "gate_k", float),  # the drift test's window: the reference's 1-99 % range +- k/2 robust SDs
    "crop": (None, "crop_scale", float),  # the network crop's side, x the guide mask's larger extent
    # a drawn slice's few far-out voxels (at most this share) left out of the network's window (0 = off)
    "outliers": (None, "window_outlier_share", float),
}
_PREFIXES_LONGEST_FIRST = sorted(_NUMERIC, key=len, reverse=True)


def parse_config(config: str) -> dict:
    """``pam[+OPTION...]`` or ``windowMM`` -> the PAMPredictor settings it names; ``track[+OPTION...]``
    -> the baseline's registration options (only ``reg...`` options that set them are accepted).
    Options: ``gate`` (intensity drift test against the drawn slice),
    ``gateg`` (against the window's guide), ``nogate`` (no drift test), ``carried`` / ``guideprior``
    (a prior-channel network's query prior: the registration-carried mask / the guide's mask), ``fbD`` (forward-backward check, min Dice D),
    ``thrT`` (mask threshold), ``presP`` (presence threshold), ``regW`` (registration weight; ``reg0`` = network only),
    ``regdiffeo`` (its demons filter: diffeomorphic instead of fast symmetric forces),
    ``regsideN`` / ``regitN`` / ``regcoarseN`` (its grid size in px, iterations, and iterations of a
    half-resolution pyramid level first; ``reglevelsN``: that many such levels, each half the
    next), ``regsigmaS`` (its displacement smoothing, px), ``regstepS`` (its demons step limit, px of the
    grid per iteration; 0 = SimpleITK's default), ``carryssS`` (the registration chain's carried mask on
    an S times finer grid; ``carryss1`` = the slices' own grid), ``kfagreeD`` (with several
    keyframes, walks beyond the outermost ones end where the network's and the warped mask's
    Dice < D). ``upT`` (thick slices: walks through slices interpolated to <= T mm; 0 = off). ``cropS`` (the
    network crop's side, S x the guide mask's larger extent; the checkpoint's is 1.5). ``outliersF`` (a
    drawn slice's far-out voxels, at most the share F, left out of the network's window where they would
    widen it twofold; 0 = off). ``wguide`` (the
    network's intensity window from each window's guide instead of the drawn slice), ``kfwin`` (from
    the drawn slice each walk started from), ``kflargest`` / ``kfsizable`` / ``kflowest`` (which drawn
    slice PAM begins from: the largest; the lowest of at least a quarter of the largest's voxels, the
    shipped one since session 45; the lowest), ``published`` (the authors' published walk: overlapping
    windows whose votes are united, 6-connected components). Unknown options are an error."""
    if config.startswith("window"):
        return {"window_mm": float(config[len("window"):])}
    head, *tokens = config.split("+")
    if head not in ("pam", "track"):
        raise SystemExit(f"error: unknown config {config!r}; expected pam[+option...], windowMM or track[+option...]")
    opts: dict = {}
    for t in tokens:
        try:
            if t in _FLAGS:
                for key, value in _FLAGS[t].items():
                    if isinstance(value, dict):  # a settings group: merged, not replaced
                        opts.setdefault(key, {}).update(value)
                    else:
                        opts[key] = value
                continue
            # Longest prefix first ("regsigma" before "reg"); the rest of the token is the value.
            prefix = next(p for p in _PREFIXES_LONGEST_FIRST if t.startswith(p))
            group, key, kind = _NUMERIC[prefix]
            value = kind(t[len(prefix):])
            (opts.setdefault(group, {}) if group else opts)[key] = value
        except (StopIteration, ValueError):
            raise SystemExit(f"error: unknown option {t!r} in config {config!r}; options: {', '.join(_FLAGS)}, or a "
                             f"number after one of {', '.join(_NUMERIC)}") from None
    if head == "track" and set(opts) - {"registration_options"}:
        raise SystemExit(f"error: config {config!r}: the track baseline takes only its registration's options "
                         f"({', '.join(p for p, (group, _, _) in _NUMERIC.items() if group == 'registration_options')})")
    return opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--configs", default="pam",
                    help="comma-separated: pam[+OPTION...], windowMM, track[+regOPTION...], ci (contour "
                         "interpolation, with --keyframes). OPTIONs: " + ", ".join(_FLAGS) + ", or a number after "
                         + ", ".join(_NUMERIC) + " (e.g. pam+reg0.5+gateg; see parse_config's docstring for each)")
    ap.add_argument("--cache", default=os.environ.get("PAMSEGMENT_CACHE", str(ROOT / "cache")))
    ap.add_argument("--n", type=int, default=N_DEFAULT,
                    help=f"structures drawn (seed 0) from the cases (default {N_DEFAULT}); --fresh removes the default "
                         "set's from them afterwards")
    ap.add_argument("--per-structure", action="store_true", help="also print every structure's Dice")
    ap.add_argument("--keyframes", action="store_true",
                    help="prompt = the reference at 25 %% and 75 %% of the extent (two keyframes) instead of the middle "
                         "slice; config `ci` = contour interpolation of them")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated training cases (default {','.join(CASES)})")
    ap.add_argument("--fresh", action="store_true",
                    help="leave out the default set's structures (to confirm a hypothesis on structures never used to choose)")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    parsed = {c: parse_config(c) for c in configs if c != "ci"}  # a typo fails here, before any case is read
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    if "ci" in configs and not args.keyframes:  # (it interpolated one slice: Dice 0.068, exit 0)
        raise SystemExit("error: config ci interpolates between two drawn slices: give --keyframes with it")
    import torch

    torch.set_num_threads(1)
    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.pam_predictor import PAMPredictor

    try:  # before any case is read: a wrong file is one line, at once
        model = load_checkpoint_file(args.checkpoint)
    except (PAMError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    names = list(dict.fromkeys(c.strip() for c in args.cases.split(",") if c.strip()))  # ts_ct,ts_ct: once
    try:
        cases, items = validation_items(args.cache, ROOT / "scripts" / "split.json", names, args.n)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.fresh:
        _, used = validation_items(args.cache, ROOT / "scripts" / "split.json", list(CASES), N_DEFAULT)
        used = set(used)
        items = [it for it in items if it not in used]
    if not items:
        raise SystemExit("error: no structures to validate" + (
            " (--fresh left out all of them: --fresh removes the default set after --n structures are drawn, "
            "so give a larger --n)" if args.fresh else ""))
    scores = {c: [] for c in configs}
    for cid, lab in items:
        case = cases[cid]
        ref = case.labels == lab
        prompt = prompt_from_reference(ref, validation_prompt_slices(ref, args.keyframes))
        for c in configs:
            if c == "ci":
                scores[c].append(dice(contour_interpolation(prompt > 0), ref))
                continue
            opts = parsed[c]
            if c.split("+")[0] == "track":  # the baseline; only its registration options apply
                predictor = get_predictor("track", **opts.get("registration_options", {}))
            else:
                # Options not named keep the checkpoint's inference parameters.
                predictor = PAMPredictor(model, intensity_gate=opts.get("gate"),
                                         registration_weight=opts.get("registration_weight"),
                                         gate_reference=opts.get("gate_reference", "prompt" if "gate" in opts else None),
                                         query_prior=opts.get("query_prior"))
                predictor.registration_options = opts.get("registration_options", {})
                for name in ("window_mm", "threshold", "presence_threshold", "consistency_min_dice",
                             "keyframe_outward_min_agreement", "carry_supersample", "through_plane_mm", "crop_scale", "network_window",
                             "begin_keyframe",
                             "keyframe_empty_side_votes", "published_scheme", "authors_preprocessing", "gate_k",
                             "keyframe_collapse_fraction", "window_outlier_share"):
                    if name in opts:
                        setattr(predictor, name, opts[name])
            res = propagate(case.image, prompt, case.spacing, predictor, axis=0)
            scores[c].append(dice(res.mask > 0, ref))
        if args.per_structure:
            name = case.label_names.get(lab, str(lab))
            print(f"{cid:18s} {name[:28]:28s} " + " ".join(f"{c} {scores[c][-1]:.3f}" for c in configs), flush=True)
    print(f"{len(items)} training-case structures; mean Dice: "
          + ", ".join(f"{c} {np.mean(v):.3f}" for c, v in scores.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as exc:  # an option a predictor refuses (pam+reg2), found at its first structure
        sys.exit(f"error: {exc}")
