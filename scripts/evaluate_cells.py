#!/usr/bin/env python
"""Few-shot cell labelling (``PAMSegmentLib.cells.label_cells``) on stardist's 2D nuclei image.

    python scripts/evaluate_cells.py --cache CACHE [--seeds 5]

stardist 0.9.2's ``img2d.tif`` / ``mask2d.tif`` (512 x 512 fluorescence nuclei, 125 instances,
of which the 124 over 30 px are scored; BSD-3) from the wheel in ``CACHE/raw``
(``scripts/prepare_data.py`` fetches it). For k = 3, 5 and 10 example cells drawn at random (per seed), every other nucleus is to be found: instance F1 at
IoU >= 0.5 (Hungarian matching; the examples left out), mean IoU of the matches, and the
foreground Dice. Settings: as shipped; with 5 background dots (discs of 8 px radius at random
spots at least 10 px from any nucleus, as a user would click); with the opt-in self-training,
without and with the dots; and a baseline without examples (Otsu's threshold of the smoothed image, the same watershed split).
This image was never used to train the PAM network; the cell labeller itself has no trained
weights. Its 3D sibling ``img3d.tif`` is part of the PAM training data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.cells import label_cells, match_instances, split_instances  # noqa: E402
from PAMSegmentLib.metrics import dice  # noqa: E402


MIN_AREA = 30  # px: smaller reference instances (one of the image's 125) are not scored


def scored_nuclei(ref: np.ndarray) -> list[int]:
    """The reference instances scored: those over MIN_AREA px."""
    return [int(v) for v in np.unique(ref) if v and (ref == v).sum() > MIN_AREA]


def otsu_baseline(image: np.ndarray, radius: float) -> np.ndarray:
    from skimage.filters import gaussian, threshold_otsu

    sm = gaussian(image.astype(float), 1)
    return split_instances(ndimage.binary_fill_holes(ndimage.binary_opening(sm > threshold_otsu(sm))), radius)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    import tifffile

    found = sorted(Path(args.cache, "raw").glob("stardist-*/stardist/data/images/img2d.tif"))
    if not found:
        raise SystemExit(f"no stardist wheel under {args.cache}/raw; run scripts/prepare_data.py first")
    image = tifffile.imread(found[0])
    ref = tifffile.imread(found[0].with_name("mask2d.tif"))
    ids = scored_nuclei(ref)
    far = ndimage.distance_transform_edt(ref == 0) > 10
    far_px = np.flatnonzero(far.ravel())
    print(f"{found[0].name}: {image.shape[1]} x {image.shape[0]} px, {len(ids)} nuclei\n")
    print("| examples | setting | F1 (IoU 0.5) | precision | recall | mean IoU | foreground Dice |")
    print("|---|---|---|---|---|---|---|")
    for k in (3, 5, 10):
        rows = {"as shipped": [], "+ 5 background dots": [], "with self-training (opt-in)": [],
                "self-training + 5 background dots": []}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            pick = rng.choice(ids, k, replace=False)
            examples = np.where(np.isin(ref, pick), ref, 0)
            dots = np.zeros(ref.shape, bool)
            dots.ravel()[rng.choice(far_px, 5, replace=False)] = True
            background = ndimage.binary_dilation(dots, iterations=8) & far
            for name, kw in (("as shipped", {}), ("+ 5 background dots", {"background": background}),
                             ("with self-training (opt-in)", {"self_training": True}),
                             ("self-training + 5 background dots", {"self_training": True, "background": background})):
                out = label_cells(image, examples, seed=seed, **kw).labels
                s = match_instances(out, ref, exclude=pick)
                rows[name].append((s["f1"], s["precision"], s["recall"], s["mean_iou"], dice(out > 0, ref > 0)))
        for name, vals in rows.items():
            m = np.mean(vals, axis=0)
            print(f"| {k} | {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | {m[4]:.3f} |")
    areas = np.bincount(ref.ravel())[1:]
    radius = float(np.median(np.sqrt(areas[areas > 0] / np.pi)))
    base = otsu_baseline(image, radius)
    s = match_instances(base, ref)
    fg = dice(base > 0, ref > 0)
    print(f"| 0 | Otsu threshold + the same split (median radius given) | {s['f1']:.3f} | {s['precision']:.3f} | "
          f"{s['recall']:.3f} | {s['mean_iou']:.3f} | {fg:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
