"""Few-shot labelling of cells (nuclei) in large 2D images: the user outlines a few cells, every
cell of the image comes back as its own label.

The way ilastik's pixel classification does it, with scikit-image and scikit-learn
(``pip install ".[cells]"`` in the PAMSegment source folder):

1. The example cells set the scale: r = the median equivalent radius of their outlines.
2. Every pixel gets multiscale features (``skimage.feature.multiscale_basic_features``:
   smoothed intensity, edges and texture at scales from r / 4 to r; colour images per channel).
3. A random forest learns cell vs background from the examples' pixels and, as background, a
   ring 2 to max(2, r / 3) px outside each example (plus any background the user marked; pixels
   of other examples never count as background). Without marks (``contrast_background``), also
   pixels spread over the image whose colour is far from the examples' (``_unlike_examples``).
4. The image is classified in tiles (``tile`` px plus a margin of 4 x the largest feature
   scale, so tiles join without seams): memory stays bounded for large images, and the result
   does not depend on the tile size. Optionally (``self_training``, off by default) one round
   of self-training follows: pixels the first forest is sure of (probability below 0.1 or above
   0.9), sampled from every tile, join the drawn ones (at most as many per class) and the forest
   is fitted again. It helped with 10 examples on the evaluation image but was unstable: on the
   same image tiled 4 x 4 it doubled the cells found, taking background for cells.
5. Touching cells are split by a watershed of the distance to the background, seeded at local
   maxima at least 0.6 r apart; pieces smaller than a quarter of the smallest example are
   dropped. The example cells are kept exactly as drawn.

The result lists, per cell, its label, area, centroid and mean cell probability (a confidence:
review the lowest first).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .checks import check_flag, is_number
from .errors import InputError, PropagationCancelled

__all__ = ["CellResult", "label_cells", "example_cells", "match_instances"]

MAX_SAMPLES = 20000  # pixels per class the forest learns from


@dataclass
class CellResult:
    labels: np.ndarray  # (H, W) int32 instance labels, 0 = background; the examples come first
    probability: np.ndarray  # (H, W) float32 cell probability
    n_examples: int
    radius: float  # the examples' median equivalent radius, px
    cells: list[dict]  # per label: label, area, centroid (row, col), probability, example (bool)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what looks wrong in the result, and what to do

    def summary(self) -> str:
        return (f"{len(self.cells)} cells ({self.n_examples} drawn as examples, {len(self.cells) - self.n_examples} "
                f"found); typical radius {self.radius:.1f} px; {self.seconds:.1f} s")


def example_cells(examples: np.ndarray) -> np.ndarray:
    """The user's examples as instances: each label's connected components (8-connected, so that a
    thin drawn outline stays one) are separate cells."""
    ex = np.asarray(examples)
    out = np.zeros(ex.shape, np.int32)
    n = 0
    for lab in np.unique(ex):
        if lab == 0:
            continue
        comps, k = ndimage.label(ex == lab, structure=np.ones((3, 3), bool))
        out[comps > 0] = comps[comps > 0] + n
        n += k
    return out


SPECK_PX = 8  # an example piece this small and under a tenth of the median example is a stray pixel


def _tidy_examples(cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Examples drawn as outlines filled (a ring around at least its own area of background: the
    cell is what it encloses), and specks left out (at most SPECK_PX px and under a tenth of the
    median example's area: a stray pixel of a label set the smallest cell size and was trained on
    as a cell; a small but whole cell among large ones stays). Returns the examples renumbered
    from 1, and a note per change."""
    notes = []
    if not cells.any():
        return cells, notes
    out = cells.copy()
    rings = 0
    for k, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        own = cells[box] == k
        inside = ndimage.binary_fill_holes(own) & ~own & (cells[box] == 0)
        if inside.sum() >= own.sum():
            out[box][inside] = k
            rings += 1
    if rings:
        notes.append(f"{rings} example cell{'s were' if rings > 1 else ' was'} drawn as an outline; filled (draw "
                     "examples filled, as the cells are)")
    areas = np.bincount(out.ravel())[1:]
    small = np.flatnonzero((areas < 0.1 * np.median(areas)) & (areas <= SPECK_PX)) + 1
    if small.size and small.size <= len(areas) - 2:  # at least two examples stay
        rows = [ndimage.center_of_mass(out == k) for k in small[:3]]
        where = "; ".join(f"row {r:.0f}, column {c:.0f} ({areas[k - 1]} px)" for k, (r, c) in zip(small, rows))
        notes.append(f"{small.size} example{'s' if small.size > 1 else ''} of at most {SPECK_PX} px, under a tenth "
                     f"of the median example's area ({np.median(areas):.0f} px) left out as stray pixels ({where}"
                     f"{'; ...' if small.size > 3 else ''}): draw whole cells")
        out[np.isin(out, small)] = 0
    present = np.unique(out)
    present = present[present > 0]  # (with no 0 pixel left, the first label was renumbered 0: lost)
    renumber = np.zeros(int(out.max()) + 1, np.int32)
    renumber[present] = np.arange(1, len(present) + 1)
    return renumber[out], notes


def _check(image, examples, background):
    from .checks import as_array

    img = as_array(image, "image", "PAMSegmentLib.volumes.read_image_2d(path, keep_colour=True)[0]")
    # a 4th channel that is not opaque everywhere is said in the result's warnings (a Python API trial, s36)
    fourth = img.ndim == 3 and img.shape[-1] == 4 and not np.all(
        img[..., 3] == (np.iinfo(img.dtype).max if np.issubdtype(img.dtype, np.integer) else img[..., 3].max()))
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3]
    elif img.ndim != 2:
        raise InputError(f"the image must be 2D (rows, columns) or colour (rows, columns, 3), got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise InputError(f"the image must hold real grey or colour values, got {img.dtype}")
    if not np.all(np.isfinite(img)):
        raise InputError("the image holds NaN/inf values; replace them first")
    if min(img.shape[:2]) < 8:  # the texture features need a few pixels each way
        raise InputError(f"the image is {img.shape[1]} x {img.shape[0]} pixels; cell labelling needs at least 8 x 8")
    ex = as_array(examples, "example mask", "PAMSegmentLib.volumes.read_labelmap_2d")
    if ex.ndim != 2:  # (a (1, H, W) array was "the example mask is W x 1 pixels")
        raise InputError(f"the example mask must be 2D (rows, columns), got shape {ex.shape}")
    if ex.shape != img.shape[:2]:
        raise InputError(f"the example mask is {ex.shape[1]} x {ex.shape[0]} pixels but the image is "
                         f"{img.shape[1]} x {img.shape[0]}; draw the examples on that image")
    if not (np.issubdtype(ex.dtype, np.integer) or ex.dtype == bool):
        raise InputError("the example mask must be an integer label map (0 = background)")
    if ex.dtype != bool and ex.min() < 0:
        raise InputError(f"the example mask holds the negative value {int(ex.min())}: labels are whole numbers from 1 "
                         "(0 = background); renumber it")
    cells, notes = _tidy_examples(example_cells(ex))
    if fourth:
        notes.insert(0, "the image's 4th channel (alpha?) was left out: the cells are labelled from its first three "
                        "(colour) channels")
    n = int(cells.max())
    if n == 0:
        raise InputError("no example cells: outline a few cells (at least 2) in the example mask")
    if n < 2:
        raise InputError("only 1 example cell (touching cells drawn with one label count as one: give them different "
                         "labels); outline at least 2 (3-10 typical cells; also mark some background)")
    bg = None
    if background is not None:
        bg = as_array(background, "background mask", "PAMSegmentLib.volumes.read_labelmap_2d").astype(bool)
        if bg.shape != img.shape[:2]:
            raise InputError("the background mask must have the image's size")
        if (bg & (cells > 0)).any():
            raise InputError("the background mask overlaps the example cells; erase the overlap")
        if not bg.any():  # e.g. a background layer saved before anything was drawn on it
            bg = None  # as no mask: the background unlike the examples is then learnt as usual
            notes.append("the background mask marks no pixels, so it was taken as no background marks; mark some "
                         "background in it (or leave it out)")
    from .volumes import float32_values

    # float64 values float32 cannot hold: 0 cells found and numpy's warnings; rescaled to 0-1 first
    return float32_values(img, precision=True)[0], cells, n, bg, notes


def _some(lines: list[str], what: str) -> list[str]:
    """``lines`` (a warning per example), or the first three of them and one line for the rest when
    there are more than EXAMPLE_WARNINGS: an anti-aliased mask read with --as-drawn gave 1663 one- to
    nine-pixel examples and a line for each of about 200 (a trial, session 47)."""
    if len(lines) <= EXAMPLE_WARNINGS:
        return lines
    return [*lines[:3], f"and {len(lines) - 3} more examples {what}: are the examples whole cells, each drawn with "
                        "a label of its own?"]


EXAMPLE_WARNINGS = 5  # warnings of one kind about single examples given one by one, at most


def _large_examples(cells: np.ndarray, areas: np.ndarray) -> dict[int, str]:
    """A warning per example cell (by its index from 0) over 1.75 times the other examples' median
    area: often touching cells drawn with one label, which count as one (two equal cells make 2 times)."""
    out = {}
    for k in range(len(areas)):
        ratio = areas[k] / np.median(np.delete(areas, k))
        if ratio > 1.75:
            row, col = ndimage.center_of_mass(cells == k + 1)
            out[k] = (f"the example at row {row:.0f}, column {col:.0f} ({areas[k]} px) is {ratio:.1f} times the "
                      "other examples' median area: if it is touching cells drawn with one label, they count as "
                      "one cell; give them different labels and run again")
    return out


def _merged_examples(cells: np.ndarray, areas: np.ndarray, skip=()) -> list[str]:
    """A warning per example cell that looks like touching cells drawn with one label whatever the
    other examples' size (``_large_examples`` compares sizes only: in a 0/255 mask where every
    example is a touching pair, none stands out; a trial, session 36): concave (solidity under
    0.92; a round nucleus about 0.96, two touching discs 0.88) and cut by the watershed at the
    smallest example's radius into two or more parts of a quarter of its area or more, joined by a
    neck under 0.7 x the smaller part's diameter. Examples ``skip`` (indices from 0) are left out.
    On the stardist nuclei's 125 reference cells it named 1 (a concave 105 px piece)."""
    from skimage.measure import regionprops

    smallest = float(areas.min())
    out = []
    for k, box in enumerate(ndimage.find_objects(cells), 1):
        if box is None or k - 1 in skip:
            continue
        box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        piece = cells[box] == k
        if regionprops(piece.astype(np.uint8))[0].solidity >= 0.92:
            continue
        parts = split_instances(piece, float(np.sqrt(smallest / np.pi)))
        sizes = np.bincount(parts.ravel())[1:]
        big = np.flatnonzero(sizes >= 0.25 * smallest) + 1
        necks = []
        for n, i in enumerate(big):
            grown = ndimage.binary_dilation(parts == i)
            for j in big[n + 1:]:
                width = int(np.count_nonzero(grown & (parts == j)))
                if width:
                    necks.append((width / (2 * np.sqrt(min(sizes[i - 1], sizes[j - 1]) / np.pi)), width))
        if necks and min(necks)[0] < 0.7:
            row, col = (float(v) + b.start for v, b in zip(ndimage.center_of_mass(piece), box))
            out.append(f"the example at row {row:.0f}, column {col:.0f} ({areas[k - 1]} px) narrows to "
                       f"{min(necks)[1]} px between {len(big)} rounder parts: if it is touching cells drawn with one "
                       "label, they count as one cell; give them different labels and run again")
    return out


def _example_contrasts(img: np.ndarray, cells: np.ndarray, mirror: str = "", rng=None, tries: int = 0):
    """(each example's contrast at its place, None where its box leaves the image; that of its
    outline at ``tries`` random places each): the distance between its mean grey value or colour
    and a 3 px ring's around it (``img`` scaled to 0..1). ``mirror`` "lr", "ud" or "both": the
    outlines mirrored, at the mirrored places."""
    img3 = img if img.ndim == 3 else img[..., None]
    rows, cols = cells.shape
    own, placed = [], []
    for k, box in enumerate(ndimage.find_objects(cells), 1):
        if box is None:
            continue
        shape = np.pad(cells[box] == k, 4)
        h, w = shape.shape
        if h >= rows or w >= cols:
            own.append(None)
            continue
        r, c = box[0].start - 4, box[1].start - 4
        if mirror in ("lr", "both"):
            shape, c = shape[:, ::-1], cols - (c + w)
        if mirror in ("ud", "both"):
            shape, r = shape[::-1], rows - (r + h)
        ring = ndimage.binary_dilation(shape, iterations=3) & ~shape

        def contrast(r, c):
            window = img3[r:r + h, c:c + w]
            return float(np.linalg.norm(window[shape].mean(axis=0) - window[ring].mean(axis=0)))

        own.append(contrast(r, c) if r >= 0 and c >= 0 and r + h <= rows and c + w <= cols else None)
        if rng is not None:
            placed += [contrast(int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1)))
                       for _ in range(tries)]
    return own, placed


def _examples_stand_out(img: np.ndarray, cells: np.ndarray, seed: int, tries: int = 16) -> str | None:
    """A warning when the example cells look drawn on another copy of the image (a trial, session
    36: examples outlined on a flipped copy found 212 cells, F1 0.01, without a word): for half the
    examples or more (at least 2), their outline mirrored (left-right, up-down or both) differs from
    its surroundings more than twice as much as at its own place and more than 75 % of random
    placements do (a flipped copy); or at their own places the examples (median) differ no more than
    half of the random placements (not on this image's cells). ``img`` scaled to 0..1. On
    stardist's nuclei, 60 random sets each of 2, 3, 4, 5 and 8 true examples, grey and H&E-tinted:
    none of the 600 warned; flipped, 38-48 % of the sets of 2 were caught, 68-82 % of 3, 90-93 % of
    4-5 and 97-100 % of 8 (a flipped outline landing on another cell cannot be told apart). With
    outlines 1 px too tight and light falling to a quarter across the image, 3 of 1476 true sets
    warned (the rule on the medians, first tried, warned on 1 in 400 sets under even light)."""
    own, placed = _example_contrasts(img, cells, rng=np.random.default_rng(seed), tries=tries)
    inside = [o for o in own if o is not None]
    if len(inside) < 2 or not placed:
        return None
    mine, half, most = float(np.median(inside)), float(np.percentile(placed, 50)), float(np.percentile(placed, 75))
    # per example, not on the medians: one mirrored outline landing on a bright cell decided for two
    # examples (a re-review, session 36); an example whose box leaves the image either way does not vote
    votes = {}
    for m in ("lr", "ud", "both"):
        there = _example_contrasts(img, cells, m)[0]
        votes[m] = sum(o is not None and t is not None and t > max(2 * o, most) for o, t in zip(own, there))
    best = max(votes, key=votes.get)
    if votes[best] >= max(2, int(np.ceil(len(inside) / 2))):
        how = {"lr": "left-right", "ud": "upside down", "both": "both ways (turned half round)"}[best]
        return (f"the example cells lie on this image's cells only when mirrored {how} ({votes[best]} of "
                f"{len(inside)}): they differ from their surroundings by {mine:.3f} at their places: were they "
                "drawn on a flipped copy? Draw them on this image as it is")
    if mine <= half:
        return (f"the example cells differ from their surroundings no more than their outlines placed at random on "
                f"the image do (contrast with a 3 px ring {mine:.3f}, at random {half:.3f}): do they lie on the cells "
                "of this image? Draw them on this image as it is (not a rotated or cropped copy)")
    return None


def _marks_like_cells(image: np.ndarray, examples: np.ndarray, marked: np.ndarray) -> list[tuple[float, float]]:
    """The pieces of the background marks ``marked`` that look like the example cells: sized like
    them (half the smallest to twice the largest) and, in the image, nearer their mean grey value or
    colour than a 3 px ring around them. Returns each such piece's centre (row, column)."""
    cells = example_cells(examples)
    pieces, n = ndimage.label(marked)
    if not cells.any() or not n:
        return []
    areas, sizes = np.bincount(cells.ravel())[1:], np.bincount(pieces.ravel())[1:]
    candidates = np.flatnonzero((sizes >= areas.min() / 2) & (sizes <= 2 * areas.max())) + 1
    if not candidates.size:
        return []
    img = np.asarray(image)
    img = img[..., :3] if img.ndim == 3 else img[..., None]

    def look(mask):
        return img[mask].astype(np.float64).mean(axis=0)

    ex = cells > 0
    cell_look, ring_look = look(ex), look(ndimage.binary_dilation(ex, iterations=3) & ~ex & ~marked)
    out = []
    boxes = ndimage.find_objects(pieces)  # each piece within its own box: a whole-image mask per mark
    for k in candidates:                   # took about 0.003 s per mark and megapixel (a review, s32)
        box = boxes[k - 1]
        piece = pieces[box] == k
        v = img[box][piece].astype(np.float64).mean(axis=0)
        if np.linalg.norm(v - cell_look) < np.linalg.norm(v - ring_look):
            centre = ndimage.center_of_mass(piece)
            out.append(tuple(float(x + s.start) for x, s in zip(centre, box)))
    return out


def _features(img: np.ndarray, radius: float) -> np.ndarray:
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(img, channel_axis=-1 if img.ndim == 3 else None,
                                     sigma_min=max(radius / 4.0, 0.5), sigma_max=max(radius, 1.0),
                                     num_sigma=4).astype(np.float32)


def _unlike_examples(img: np.ndarray, examples: np.ndarray, ring_px: int, n_ring: int, seed: int) -> np.ndarray:
    """Background the user did not mark: pixels spread over the whole image whose (lightly smoothed)
    grey value or colour is far from the example cells' (more than twice as far from their median
    as 95 % of the examples' own pixels, and at least 0.15 of the intensity range), away from the
    examples. At most as many as the rings hold (at least 2000). Chosen from a fixed random set of
    pixels, so the result does not depend on tiling."""
    h, w = img.shape[:2]
    smooth = ndimage.gaussian_filter(img, sigma=(1, 1, 0) if img.ndim == 3 else 1)
    values = smooth.reshape(h * w, -1)
    centre = np.median(values[examples.ravel()], axis=0)
    d_ex = np.linalg.norm(values[examples.ravel()] - centre, axis=1)
    limit = max(2.0 * float(np.percentile(d_ex, 95)), 0.15)
    rng = np.random.default_rng(seed + 7)
    cand = rng.choice(h * w, min(h * w, 50000), replace=False)
    cand = cand[np.linalg.norm(values[cand] - centre, axis=1) > limit]
    near = ndimage.binary_dilation(examples, iterations=ring_px + 1).ravel()
    cand = cand[~near[cand]][: max(n_ring, 2000)]
    out = np.zeros(h * w, bool)
    out[cand] = True
    return out.reshape(h, w)


def label_cells(image, examples, *, background=None, tile: int = 1024, seed: int = 0, self_training: bool = False,
                contrast_background: bool = True,
                progress: Callable[[float, str], None] | None = None, cancel=None) -> CellResult:
    """Label every cell of ``image`` (2D grey or (H, W, 3) colour; a 4th channel, alpha, is left
    out with a warning) like the cells outlined in
    ``examples`` (a label map: each connected component is one example cell). ``background``:
    optional mask of pixels the user marked as not-cell. Raises InputError for bad input,
    PropagationCancelled when ``cancel`` is set."""
    t0 = time.perf_counter()
    try:
        import skimage.feature  # noqa: F401 - both extras, checked together
        from sklearn.ensemble import RandomForestClassifier
    except ImportError:
        raise InputError('cell labelling needs scikit-image and scikit-learn: pip install ".[cells]" in the PAMSegment '
                         'source folder (or pip install scikit-image scikit-learn)') \
            from None
    from .propagate import check_progress_and_cancel

    check_progress_and_cancel(progress, cancel)
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 64:
        raise InputError(f"tile must be a whole number of at least 64 px, got {tile!r}")
    check_flag("self_training", self_training)
    check_flag("contrast_background", contrast_background)
    if not is_number(seed, 0, 2**32 - 1, whole=True):  # not a bool either
        raise InputError(f"seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
    seed = int(seed)
    img, cells, n_ex, bg_user, example_notes = _check(image, examples, background)
    areas = np.bincount(cells.ravel())[1:]
    radius = float(np.median(np.sqrt(areas / np.pi)))
    # The intensities on one scale (per channel for colour): 0.5-99.5 percentiles to 0..1.
    lo, hi = np.percentile(img, [0.5, 99.5], axis=(0, 1))
    width = np.asarray(hi - lo, dtype=np.float64)  # per channel; relative to the image's own values (any unit)
    # In place on _check's float32 copy: whole-image float64 temporaries took 48 bytes a colour pixel
    img -= np.asarray(lo, dtype=np.float32)
    img /= np.where(width > 0, width, 1.0).astype(np.float32)
    np.clip(img, 0, 1, out=img)
    unlike = _examples_stand_out(img, cells, seed)

    h, w = img.shape[:2]
    pad = int(np.ceil(4 * max(radius, 1.0))) + 2  # the largest feature scale's reach
    starts = [(r, c) for r in range(0, h, tile) for c in range(0, w, tile)]

    one_tile = {} if len(starts) == 1 else None  # a single tile: its features are computed once for every pass

    def tile_features(r, c):
        """Features of tile (r, c) computed with a margin (so tiles join without seams): (features
        of the tile itself, the tile's slices)."""
        if one_tile:
            return one_tile["features"]
        outer = (slice(max(r - pad, 0), min(r + tile + pad, h)), slice(max(c - pad, 0), min(c + tile + pad, w)))
        f = _features(img[outer], radius)
        inner = (slice(r - outer[0].start, r - outer[0].start + min(tile, h - r)),
                 slice(c - outer[1].start, c - outer[1].start + min(tile, w - c)))
        out = f[inner], (slice(r, r + tile), slice(c, c + tile))
        if one_tile is not None:
            one_tile["features"] = out
        return out

    # Training pixels: the examples' and, as background, a ring just outside each example (and
    # what the user marked), gathered tile by tile so that memory stays bounded.
    ex_all = cells > 0
    ring_px = max(2, int(round(radius / 3)))
    rows, cols = np.flatnonzero(ex_all.any(1)), np.flatnonzero(ex_all.any(0))
    near = (slice(max(rows[0] - ring_px - 1, 0), rows[-1] + ring_px + 2),
            slice(max(cols[0] - ring_px - 1, 0), cols[-1] + ring_px + 2))  # where the rings can be
    bg_all = np.zeros_like(ex_all) if bg_user is None else bg_user.copy()
    bg_all[near] |= (ndimage.binary_dilation(ex_all[near], iterations=ring_px)
                     & ~ndimage.binary_dilation(ex_all[near], iterations=1))
    rng = np.random.default_rng(seed)
    if bg_user is None and contrast_background:
        bg_all |= _unlike_examples(img, ex_all, ring_px, int(bg_all.sum()), seed)
    fg_parts, bg_parts = [], []
    learning = [(r, c) for r, c in starts
                if ex_all[r:r + tile, c:c + tile].any() or bg_all[r:r + tile, c:c + tile].any()]
    for n, (r, c) in enumerate(learning):
        if cancel is not None and cancel.is_cancelled:
            raise PropagationCancelled("cancelled")
        f, region = tile_features(r, c)
        if progress is not None:  # without background marks every tile is learnt from: half the run
            progress(LEARN_SHARE * (n + 1) / len(learning), f"learning from tile {n + 1} of {len(learning)}")
        for parts, mask in ((fg_parts, ex_all[region]), (bg_parts, bg_all[region])):
            rr, cc = np.nonzero(mask)
            parts.append(((rr + r) * w + (cc + c), f[rr, cc]))  # each pixel's index in the whole image

    def sample(parts):
        # In image order whatever the tiling, so that the forest does not depend on the tile size.
        index = np.concatenate([p[0] for p in parts])
        x = np.concatenate([p[1] for p in parts])[np.argsort(index, kind="stable")]
        return x[np.sort(rng.choice(len(x), MAX_SAMPLES, replace=False))] if len(x) > MAX_SAMPLES else x

    x_fg, x_bg = sample(fg_parts), sample(bg_parts)
    if len(x_bg) == 0:  # (the forest learned one class and predict_proba(...)[:, 1] was an IndexError)
        raise InputError("the examples (and the rings around them) cover the whole image: nothing is left to learn "
                         "the background from; draw fewer or smaller examples, or mark some background "
                         "(--background, --background-label; background= in Python)")
    forest = RandomForestClassifier(n_estimators=50, max_depth=12, min_samples_leaf=2, n_jobs=1,
                                    random_state=seed, class_weight="balanced")
    forest.fit(np.concatenate([x_fg, x_bg]), np.r_[np.ones(len(x_fg)), np.zeros(len(x_bg))])

    rounds = 1 + int(self_training)

    def classify(forest, round_no, keep_features):
        """The cell probability of every pixel, tile by tile."""
        prob = np.zeros((h, w), np.float32)
        kept = []
        for n, (r, c) in enumerate(starts):
            if cancel is not None and cancel.is_cancelled:
                raise PropagationCancelled("cancelled")
            f, region = tile_features(r, c)
            fi = f.reshape(-1, f.shape[-1])
            p = forest.predict_proba(fi)[:, 1]
            prob[region] = p.reshape(f.shape[:2])
            if keep_features:  # a random share of each tile's pixels, for the self-training round
                pick = rng.choice(fi.shape[0], min(fi.shape[0], max(2 * MAX_SAMPLES // len(starts), 64)), replace=False)
                kept.append((fi[pick], p[pick]))
            if progress is not None:
                done = (round_no * len(starts) + n + 1) / (rounds * len(starts))
                # (to 0.89: the instance split's first step reports 0.9, so the fractions keep rising)
                progress(LEARN_SHARE + (0.89 - LEARN_SHARE) * done, f"classified tile {n + 1} of {len(starts)}")
        return prob, kept

    prob, kept = classify(forest, 0, self_training)
    if self_training:
        # One round of self-training on the whole image: the pixels the first forest is sure of
        # (probability below 0.1 or above 0.9), sampled from every tile, join the drawn ones, so
        # the forest also learns the background and cells far from the examples.
        f_all = np.concatenate([k[0] for k in kept])
        p_all = np.concatenate([k[1] for k in kept])
        sure_bg, sure_fg = f_all[p_all < 0.1], f_all[p_all > 0.9]
        # At most as many as were drawn per class: the drawn pixels stay the main evidence (with
        # more, a first forest's confident mistakes outvoted them on large images).
        sure_bg = sure_bg[rng.permutation(len(sure_bg))[:len(x_bg)]]
        sure_fg = sure_fg[rng.permutation(len(sure_fg))[:len(x_fg)]]
        forest.fit(np.concatenate([x_fg, sure_fg, x_bg, sure_bg]),
                   np.r_[np.ones(len(x_fg) + len(sure_fg)), np.zeros(len(x_bg) + len(sure_bg))])
        prob, _ = classify(forest, 1, False)

    # The normalised image and a single tile's features are not needed any more: the instance
    # split below is the run's peak of memory.
    img = None  # (the tiles' closure holds it: rebound, not deleted)
    if one_tile:
        one_tile.clear()
    # Instances: a watershed of the distance to the background, seeded at well separated peaks.
    # On a large image this takes about a tenth of the run, so it reports its steps (0.9 to 0.95)
    # and can be cancelled between them.
    def split_step(done: float, message: str) -> None:
        if cancel is not None and cancel.is_cancelled:
            raise PropagationCancelled("cancelled")
        if progress is not None:
            progress(0.9 + 0.05 * done, f"splitting touching cells: {message}")

    split_step(0.0, "filling gaps")
    fg = ndimage.binary_opening(prob >= 0.5, iterations=1) & (cells == 0)
    # Holes no larger than the largest example are gaps inside a cell; larger ones (a gland's lumen
    # ringed by nuclei) are background and stay open.
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(fg) & ~fg)
    if n_holes:
        small = np.bincount(holes.ravel()) <= areas.max()
        small[0] = False
        fg |= small[holes]
        # an example ringed by found foreground is a hole too: kept as drawn, not filled over (a found
        # cell took both examples of a constant image, "-1 found"; a Python API trial, session 36)
        fg &= cells == 0
    if bg_user is not None:  # the user's background marks are background: learnt from, and held (found cells
        fg &= ~bg_user  # lay on 903 marked pixels; a fuzzing trial, session 37)
    found = split_instances(fg, radius, step=split_step)
    sizes = np.bincount(found.ravel())
    keep = sizes >= max(0.25 * areas.min(), 4)
    keep[0] = False
    relabel = np.zeros(sizes.size, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1) + n_ex
    out = cells.copy()
    out[found > 0] = relabel[found[found > 0]]

    if cancel is not None and cancel.is_cancelled:
        raise PropagationCancelled("cancelled")
    if progress is not None:
        progress(0.95, "measuring the cells")
    cells_info = []
    index = np.unique(out)[1:]  # labels present (an example cell drawn over by none is still there)
    if index.size:
        area = ndimage.sum_labels(np.ones_like(out), out, index)
        cents = ndimage.center_of_mass(np.ones_like(out), out, index)
        mean_p = ndimage.mean(prob, out, index)
        for lab, a, cen, mp in zip(index, area, cents, mean_p):
            if a > 0:
                cells_info.append({"label": int(lab), "area": int(a), "centroid": (float(cen[0]), float(cen[1])),
                                   "probability": float(mp), "example": bool(lab <= n_ex)})
    if progress is not None:
        progress(1.0, "done")
    large = _large_examples(cells, areas)
    warnings_ = example_notes + ([unlike] if unlike else []) \
        + _some(list(large.values()), "over 1.75 times the other examples' median area") \
        + _some(_merged_examples(cells, areas, skip=large), "that look like touching cells drawn with one label")
    found_areas = [c["area"] for c in cells_info if not c["example"]]
    giant = sum(a > 4 * areas.max() for a in found_areas)
    covered = float((out > 0).mean())
    if giant or covered > 0.6:
        warnings_.append(f"the result looks wrong: {giant} found cells are over 4 times the largest example and "
                         f"{100 * covered:.0f} % of the image is labelled as cells; the background was probably "
                         "learned too little: mark some background (a few dots or strokes) and run again")
    small = float(np.median(found_areas)) if len(found_areas) >= SMALL_CELLS_FEWEST else None
    if small is not None and small < SMALL_CELLS_SHARE * float(np.median(areas)):
        warnings_.append(f"the {len(found_areas)} found cells are much smaller than the examples (median "
                         f"{small:.0f} px against {float(np.median(areas)):.0f} px): unless the cells there are that "
                         "small, cells were split into pieces or specks of background taken for cells; mark some "
                         "background (a few dots or strokes), check that the examples are whole cells, and run again")
    return CellResult(out, prob, n_ex, radius, cells_info, time.perf_counter() - t0, warnings_)


# The "small cells" warning: found cells' median area below this share of the examples' median, with at
# least this many found. On stardist's nuclei image (evaluate_cells.py's 30 runs, session 46) the lowest
# share was 0.44 (F1 0.46, warned already); a Python API trial's over-split runs (457-494 pieces for 125
# nuclei, F1 0.24-0.34, no warning) had 0.15-0.24.
SMALL_CELLS_SHARE = 0.4
SMALL_CELLS_FEWEST = 20


def split_instances(fg: np.ndarray, radius: float,
                    step: Callable[[float, str], None] | None = None) -> np.ndarray:
    """Instances of a foreground mask: a watershed of the distance to the background, seeded at
    peaks at least 0.6 x ``radius`` apart (touching cells of that radius are split). ``step``
    (optional) is called as step(share done, what comes next) before each part (it may raise to
    cancel); the shares are those of a 4096 px image (the watershed about half)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    step = step or (lambda done, message: None)
    step(0.1, "distances to the background")
    dist = ndimage.distance_transform_edt(fg)
    step(0.35, "finding cell centres")
    comps, _ = ndimage.label(fg)
    peaks = peak_local_max(dist, min_distance=max(int(round(0.6 * radius)), 1), labels=comps, exclude_border=False)
    # Touching peaks are one marker: a small cell's flat top (several pixels at one distance, with
    # min_distance 1) cut it into 3 px pieces that fell under the size floor (all of 400 cells of
    # radius 2 were lost).
    at_peak = np.zeros(fg.shape, bool)
    at_peak[tuple(peaks.T)] = True
    markers, _ = ndimage.label(at_peak, structure=np.ones((3, 3), bool))
    step(0.55, "watershed")
    return watershed(-dist, markers, mask=fg)


def match_instances(pred: np.ndarray, ref: np.ndarray, iou: float = 0.5, exclude=()) -> dict:
    """Instance matching at IoU >= ``iou`` (one to one, by the Hungarian method on IoU): precision,
    recall, F1 and the mean IoU of matched pairs. Reference instances in ``exclude`` (and predicted
    instances overlapping them most) are left out (e.g. the examples the user drew)."""
    from scipy.optimize import linear_sum_assignment

    pred, ref = np.asarray(pred), np.asarray(ref)
    excl = set(int(v) for v in exclude)
    r_ids = [int(v) for v in np.unique(ref) if v and int(v) not in excl]
    p_ids = [int(v) for v in np.unique(pred) if v]
    p_area_all = np.bincount(pred.ravel().astype(np.int64))  # areas by id, one pass
    r_area_all = np.bincount(ref.ravel().astype(np.int64))
    if excl:  # drop predictions that are mostly an excluded reference instance
        in_excl = np.bincount(pred.ravel().astype(np.int64), weights=np.isin(ref, list(excl)).ravel(),
                              minlength=p_area_all.size)
        p_ids = [p for p in p_ids if in_excl[p] / p_area_all[p] < 0.5]
    if not r_ids or not p_ids:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "mean_iou": 0.0, "tp": 0,
                "n_pred": len(p_ids), "n_ref": len(r_ids)}
    r_index = {v: n for n, v in enumerate(r_ids)}
    p_index = {v: n for n, v in enumerate(p_ids)}
    both = (pred > 0) & (ref > 0)
    inter = np.zeros((len(p_ids), len(r_ids)))
    pairs, counts = np.unique(np.stack([pred[both], ref[both]]), axis=1, return_counts=True)
    for (p, r), k in zip(pairs.T, counts):
        if int(p) in p_index and int(r) in r_index:
            inter[p_index[int(p)], r_index[int(r)]] = k
    p_area = p_area_all[p_ids].astype(float)
    r_area = r_area_all[r_ids].astype(float)
    ious = inter / (p_area[:, None] + r_area[None, :] - inter)
    rows, cols = linear_sum_assignment(-ious)
    good = ious[rows, cols] >= iou
    tp = int(good.sum())
    precision, recall = tp / len(p_ids), tp / len(r_ids)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "mean_iou": float(ious[rows, cols][good].mean()) if tp else 0.0, "tp": tp,
            "n_pred": len(p_ids), "n_ref": len(r_ids)}


# ----------------------------------------------------------------------------- the command


def add_label_cells_arguments(p) -> None:
    from .cli import _positive_int

    p.add_argument("image", metavar="IMAGE", help="2D image (TIFF, PNG, JPEG, ...; grey or colour)")
    p.add_argument("examples", metavar="EXAMPLES",
                   help="label map of the same size with a few cells outlined (each connected piece is one cell)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="instance label map (.tif, .png, .nrrd, .nii.gz, .mha; a .png with more than 65535 cells "
                        "becomes <name>.tif, or <name>_labels.tif (then _labels2.tif ...) if <name>.tif or its table "
                        "is an input, a folder, read-only or a link that cannot be written); a table of the cells is "
                        "written beside it as OUT's name + .csv")
    p.add_argument("--background", metavar="MASK", help="optional mask of pixels that are not cells")
    p.add_argument("--background-label", type=_positive_int, metavar="N",
                   help="pixels of label N in EXAMPLES mark background, not a cell (draw both in one file)")
    p.add_argument("--as-drawn", action="store_true",
                   help="read EXAMPLES' (and --background's) values as drawn, even where they look like the grey "
                        "steps of a smoothed mask or like an image (a dense instance mask)")
    p.add_argument("--tile", type=_tile_side, default=1024, metavar="PX",
                   help="tile side for classifying large images, at least 64 px (default 1024; the result does not "
                        "depend on it)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the image looks too large for the memory this process may use (the check "
                        "before the work refuses it; with enough swap it may still finish)")
    p.add_argument("--self-training", action="store_true",
                   help="one round of self-training on the pixels the first pass is sure of (off by default: "
                        "it can also reinforce mistakes; see the README)")


# Peak memory of `label-cells` (measured with session 32's scripts/benchmark_cells.py-like runs,
# RSS sampled every 20 ms, 2000 and 4000 px square H&E-like images): a share per pixel of the
# whole image (colour 66 bytes, grey 54: the image, its normalised copy, the probability map and
# the instance split's arrays), one tile's features with their margin (16 features per channel,
# computed in float64 and kept in float32) and the interpreter with its libraries. Those runs took
# in-memory arrays; through the command (reading the file, full-size examples and marks, the
# output's write) a helper measured grey tiled TIFFs of 6000 and 10 000 px square at 2.53 and 6.15
# GiB, about 61 bytes a pixel more each (session 41, when the figures were 54 and 66): 62 and 74.
CELLS_BYTES_PER_PIXEL = {1: 62, 3: 74}
LEARN_SHARE = 0.3  # of the progress bar: the features of the tiles learnt from (every tile without background marks)
CELLS_FIXED_BYTES = 400 * 2**20


def _tile_bytes(side: int, channels: int) -> int:
    """One tile's features with a 32 px margin each way (cells up to 15 px across): 16 a channel,
    computed in float64 and kept in float32, 16 bytes a feature for grey and 20 for colour (the
    peaks of 1024-3072 px square crops of a 4000 px H&E-like image, session 36: 12 for both
    underestimated colour crops of 1536-3072 px by up to 18 % (1.67 GB at 2048 px against 1.38) and
    a grey 2560 px crop by 1 %; now each of the ten is estimated 4-87 % above its peak)."""
    return (side + 64) ** 2 * 16 * channels * (20 if channels == 3 else 16)


def cells_memory_bytes(rows: int, columns: int, channels: int, tile: int) -> int:
    """About the peak memory `label-cells` needs for an image of this size (pixels from its header)."""
    pixels = rows * columns * CELLS_BYTES_PER_PIXEL[channels]
    return int(CELLS_FIXED_BYTES + pixels + _tile_bytes(min(tile, max(rows, columns)), channels))


def _check_cells_memory(path, tile: int, skip: bool) -> None:
    """Before anything is read: refuse an image whose labelling cannot fit this machine's memory
    (it ran for most of an hour and then died in the instance split, or was killed without a
    word), naming the largest region that fits; warn when it fits but not in what is free now."""
    from pathlib import Path

    from .volumes import check_memory, image_pixels_2d

    header = image_pixels_2d(path)
    if header is None:
        return
    rows, columns, channels = header
    kind = "colour" if channels == 3 else "grey"

    def advice(limit: int) -> str:  # the largest square region that fits, with a whole tile's features
        room = 0.9 * limit - CELLS_FIXED_BYTES - _tile_bytes(tile, channels)
        fits = int(np.sqrt(room / CELLS_BYTES_PER_PIXEL[channels])) if room > 0 else 0
        text = (f"Crop the region to label to at most about {fits // 100 * 100:,} x {fits // 100 * 100:,} px {kind}"
                if fits >= 100 else "Use a machine with more memory")
        if tile > 1024:  # a tile's features (16 a channel, computed in float64) weigh with a large --tile
            text += f" (or give a smaller --tile than {tile}: the default 1024 needs less)"
        return text

    check_memory(cells_memory_bytes(rows, columns, channels, tile),
                 f"labelling the cells of {Path(path).name} ({columns:,} x {rows:,} px {kind}, about "
                 f"{CELLS_BYTES_PER_PIXEL[channels]} bytes a pixel)", advice, skip)


def _tile_side(text: str) -> int:
    """--tile: a whole number of at least 64 (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 64:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 64 px, got {text!r}")
    return value


def _tif_fallback(out, inputs) -> tuple:
    """(the TIFF a .png OUT becomes when the cells do not fit a PNG, why not ``<stem>.tif``):
    ``<stem>.tif``, or, when that or its table is one of ``inputs`` (the same file, also through a
    symbolic link) or a folder, ``<stem>_labels.tif`` (then ``_labels2`` ...)."""
    from .cli import _same_path

    from .volumes import check_link_target, check_not_read_only

    def taken(candidate):
        for p in (candidate, candidate.with_name(candidate.name + ".csv")):
            if any(_same_path(p, given) for given in inputs):
                return f"{p.name} is one of the inputs"
            if p.is_dir():
                return f"{p.name} is a folder"
            try:  # a protected file (chmod a-w) is kept, as it is when named with -o (it was replaced)
                check_not_read_only(p)
                check_link_target(p)
            except InputError:
                return f"{p.name} is read-only" if p.exists() else f"{p.name} is a link that cannot be written"
        return None

    stem = out.name[:-4]
    why = taken(out.with_name(f"{stem}.tif"))
    if why is None:
        tif = out.with_name(f"{stem}.tif")
        return tif, (f" (replacing the existing {tif.name})" if tif.exists() else "")
    n = 1
    while taken(out.with_name(f"{stem}_labels{n if n > 1 else ''}.tif")) is not None:
        n += 1
    return out.with_name(f"{stem}_labels{n if n > 1 else ''}.tif"), f" ({why})"


def cmd_label_cells(args) -> int:
    import csv
    from pathlib import Path

    from .cli import EXIT_OK, _ProgressBar, _same_path, check_not_empty
    from .volumes import (MASK_2D_EXTENSIONS, check_link_target, check_name_length, check_not_read_only,
                          check_output_path, read_image_2d, read_labelmap_2d, replace_together, write_labelmap_2d)

    t0 = time.perf_counter()
    check_not_empty(("IMAGE", args.image, "the image"), ("EXAMPLES", args.examples, "the examples' label map"),
                    ("-o", args.output, "the output file"))
    out = Path(args.output)
    check_output_path(args.output, MASK_2D_EXTENSIONS, example="cells.tif")  # (its trailing slash kept)
    inputs = [given for given in (args.image, args.examples, args.background) if given]
    table = out.with_name(out.name + ".csv")
    for given in inputs:
        if _same_path(out, given):
            raise InputError(f"the output {out} is one of the inputs ({given}); choose another -o file")
        if _same_path(table, given):  # e.g. a symbolic link named like the table, onto an input
            raise InputError(f"{table}, where the table of cells goes, is one of the inputs ({given}); move it "
                             "away or choose another -o file")
    # A PNG holds at most 65535 labels; a result with more goes to a TIFF beside OUT, whose name is
    # chosen now, before the work, so that it never replaces an input.
    fallback = _tif_fallback(out, inputs) if out.name.lower().endswith(".png") else None
    check_name_length(out, suffix=".csv", whose="the table of cells beside it")
    if table.is_dir():  # the move at the end would fail after the work
        raise InputError(f"{table} is a folder, where the table of cells goes; move it away or choose another -o "
                         "file")
    for written in (out, table):
        check_link_target(written)  # a link is written onto its target: its folder must take files
        check_not_read_only(written)
    _check_cells_memory(args.image, args.tile, args.no_memory_check)
    def note(text: str) -> None:
        print(f"note: {text}", flush=True)

    image, ref = read_image_2d(args.image, keep_colour=True, say=note)
    examples = read_labelmap_2d(args.examples, reference=(image[..., 0] if image.ndim == 3 else image, ref), say=note,
                                as_drawn=args.as_drawn)
    background = None
    if args.background:
        background = read_labelmap_2d(args.background, reference=(examples, ref), as_drawn=args.as_drawn) > 0
    if args.background_label is not None:
        marked = examples == args.background_label
        if not marked.any():
            raise InputError(f"no pixel of EXAMPLES has the background label {args.background_label}")
        background = marked if background is None else background | marked
        examples = np.where(marked, 0, examples)
        if not examples.any():
            raise InputError(f"EXAMPLES holds no cells besides the background label {args.background_label}; "
                             "outline the cells with other labels")
        # The same label drawn for a cell and for background marks teaches that cell as background.
        like = _marks_like_cells(image, examples, marked)
        if like:
            row, col = like[0]
            look = "colour" if image.ndim == 3 else "grey value"
            one, where = len(like) == 1, f"row {row:.0f}, column {col:.0f}"
            what = f"a piece at {where} that looks" if one else f"{len(like)} pieces (the first at {where}) that look"
            it = "it is" if one else "they are"
            print(f"warning: --background-label {args.background_label} marks {what} like the example cells (their "
                  f"size, and nearer their {look} than their surroundings'): {it} learned as background and kept "
                  f"background in the result. If {it} "
                  f"{'a cell' if one else 'cells'}, draw {'it' if one else 'them'} with another label (or give "
                  "--background-label a label no cell uses)", flush=True)
    with _ProgressBar("labelling cells", show_message=True) as bar:
        result = label_cells(image, examples, background=background, tile=args.tile,
                             self_training=args.self_training, progress=bar)
    if fallback is not None and int(result.labels.max()) > 65535:
        # PNG holds at most 16-bit labels; rather than lose the work, write the TIFF chosen above.
        png, (out, why) = out, fallback
        # an earlier run's map and table keep their names: said, or a pipeline reading -o reads them
        # (a trial, session 36)
        stale = [p.name for p in (png, png.with_name(png.name + ".csv")) if p.exists()]
        old = (f"; {' and '.join(stale)}, from an earlier run, {'are' if len(stale) > 1 else 'is'} left as "
               f"{'they were' if len(stale) > 1 else 'it was'}: not this run's result" if stale else "")
        print(f"note: {int(result.labels.max())} cells do not fit a PNG file (at most 65535); writing {out.name} "
              f"instead{why}{old}", flush=True)
    table = out.with_name(out.name + ".csv")
    # Both files are written to temporaries beside them, then moved in together (Ctrl-C ignored for
    # the two renames, the table first): an interrupted run leaves both old files, and a failed move
    # never a new map beside an old table. A symbolic link stays one.
    def write_table(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "area_px", "row", "column", "probability", "drawn"])
            for c in result.cells:
                w.writerow([c["label"], c["area"], f"{c['centroid'][0]:.1f}", f"{c['centroid'][1]:.1f}",
                            f"{c['probability']:.3f}", "yes" if c["example"] else "no"])

    def report():  # within the moves' Ctrl-C shield: an interrupt now would say "nothing was written"
        print(f"wrote {out} and {table}: {result.summary()} labelling, {time.perf_counter() - t0:.1f} s in all",
              flush=True)
        for warning in result.warnings:
            print(f"warning: {warning}", flush=True)
        if background is None and not any("mark some background" in w for w in result.warnings):  # not twice
            print("note: no background was marked; a few background marks (--background-label N, or "
                  "--background MASK) usually remove cells found in the background (README: label-cells)",
                  flush=True)

    if result.labels.size >= 2**24:  # a large image's map and table take seconds to write
        print(f"writing {out.name} and {table.name} ({len(result.cells)} cells) ...", flush=True)
    replace_together([(table, ".csv", write_table),
                      (out, check_output_path(out, MASK_2D_EXTENSIONS, probe=False),  # the format's extension
                       lambda tmp: write_labelmap_2d(result.labels, ref, tmp))],
                     keep_ctrl_c_ignored=getattr(args, "_ends_process", False), after=report)
    from .volumes import say_leftovers

    say_leftovers([table, out])
    return EXIT_OK
