#!/usr/bin/env python
"""Few-shot cell labelling on a real brightfield pathology image, checked by eye.

    python scripts/look_cells_ihc.py [--figure docs/cells_ihc.jpg]

The image is scikit-image's bundled ``immunohistochemistry()`` (``ihc.png``, 512 x 512 RGB:
colonic glands, FHL2 protein stained brown with DAB, nuclei blue with hematoxylin; acquired at
the Center for Microscopy And Molecular Imaging (CMMI), "no known copyright restrictions"). It has
no reference labels, so there is no F1 here: the script prints counts and writes a figure to look
at. Two runs:

1. *stroma*: six stromal nuclei outlined as examples (the hematoxylin channel's pieces of 60-250 px
   centred in the stroma between the glands, rows 200-330, columns 150-300, as a tracing would
   give them);
2. *stroma + epithelium*: the same plus four nuclei of the lower gland's epithelium (blue-grey
   under the brown stain), drawn as ellipses of 6 x 7 px where the engineer saw them.

For each run: cells found, and how many are centred in the brown-stained glands (``gland_epithelium``:
the DAB channel of scikit-image's colour deconvolution, smoothed, above its Otsu threshold).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PAMSegmentLib.cells import label_cells, split_instances  # noqa: E402

STROMA_BOX = (200, 330, 150, 300)  # rows, columns where the stromal examples are taken
EPITHELIAL_NUCLEI = [(357, 327), (360, 343), (369, 310), (345, 266)]  # (row, column) of the lower gland's


def ihc_image() -> np.ndarray:
    from skimage import data

    return data.immunohistochemistry()


def stromal_examples(image: np.ndarray, n: int = 6) -> np.ndarray:
    """Label map of ``n`` stromal nuclei: pieces of the hematoxylin channel (Otsu threshold of the
    smoothed channel, opened, holes filled, split like the labeller's output) of 60-250 px whose
    centre lies in STROMA_BOX, in raster order of their labels."""
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    hem = gaussian(rgb2hed(image)[..., 0], 1)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(hem > threshold_otsu(hem)))
    pieces, _ = ndimage.label(fg)
    areas = np.bincount(pieces.ravel())[1:]
    radius = float(np.sqrt(np.median(areas[areas > 30]) / np.pi))
    split = split_instances(fg, radius)
    r0, r1, c0, c1 = STROMA_BOX
    examples = np.zeros(image.shape[:2], np.int32)
    ids = [int(v) for v in np.unique(split) if v]
    centres = ndimage.center_of_mass(split > 0, split, ids)
    sizes = ndimage.sum(split > 0, split, ids)
    for v, (r, c), a in zip(ids, centres, sizes):
        if r0 < r < r1 and c0 < c < c1 and 60 < a < 250:
            examples[split == v] = examples.max() + 1
            if examples.max() == n:
                break
    return examples


def with_epithelial(examples: np.ndarray) -> np.ndarray:
    from skimage.draw import ellipse

    out = examples.copy()
    for r, c in EPITHELIAL_NUCLEI:
        rr, cc = ellipse(r, c, 6, 7, shape=out.shape)
        out[rr, cc] = out.max() + 1
    return out


def gland_epithelium(image: np.ndarray) -> np.ndarray:
    """The brown-stained glands: rgb2hed's DAB channel smoothed (sigma 8 px) above its Otsu
    threshold (58 % of the image; it covers the glands' nuclei as well as their stained cells)."""
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    dab = gaussian(rgb2hed(image)[..., 2], 8)
    return dab > threshold_otsu(dab)


def centred_in(labels: np.ndarray, region: np.ndarray) -> int:
    ids = [int(v) for v in np.unique(labels) if v]
    centres = ndimage.center_of_mass(labels > 0, labels, ids)
    return int(sum(region[int(round(r)), int(round(c))] for r, c in centres))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--figure", default=None, help="write the two runs' outlines side by side (e.g. docs/cells_ihc.jpg)")
    args = ap.parse_args(argv)
    image = ihc_image()
    glands = gland_epithelium(image)
    stroma = stromal_examples(image)
    panels = []
    for name, examples in (("stroma", stroma), ("stroma + epithelium", with_epithelial(stroma))):
        result = label_cells(image, examples)
        print(f"{name}: {result.summary()}; "
              f"{centred_in(result.labels, glands)} cells centred in the glands")
        if args.figure:
            from skimage.segmentation import find_boundaries

            panel = image.copy()
            panel[find_boundaries(result.labels)] = (0, 200, 0)
            panel[find_boundaries(examples)] = (255, 0, 0)
            panels.append(panel)
    if args.figure:
        from PIL import Image

        Image.fromarray(np.concatenate(panels, axis=1)).save(args.figure, quality=88)
        print(f"wrote {args.figure} (examples red, cells found green)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
