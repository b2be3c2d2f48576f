"""Classical slice predictors: the floor the network must clear, and a fallback without a network.

Both implement ``SlicePredictor`` so the same engine (walk, stopping, batching, cancellation,
keyframe fusion, 3D components) runs them exactly as it runs PAM; only the slice prediction
differs. Select them by name with ``get_predictor("copy" | "track" | "pam")``.

* ``CopyPredictor`` (``copy``): the guide's mask is copied onto the query slice, trimmed to the
  voxels whose (lightly smoothed) intensity lies in the prompt's intensity range, and may grow
  by ``grow_px`` into in-range neighbours. It is kept only while the intensity inside it does
  not drift from the prompt's.
* ``TrackPredictor`` (``track``): slice-to-slice deformable registration (SimpleITK demons) of
  the query slice (fixed) to the guide slice (moving) on a crop around the guide mask, and the
  guide mask warped onto the query with linear interpolation (a probability).

Both walk slice by slice (``max_window = 1``: the guide is always the previous slice). For
``copy`` a longer window would only copy the same stale mask further; for ``track`` the
registration between neighbouring slices is the classical choice because the deformation is
smallest there (demons is a local optimiser: registering slices 10 apart fails on exactly the
shape changes the method should follow), at the price of accumulating small errors.

Stopping (the engine stops a side at the first empty slice): a slice is "empty" (presence 0)
when the median intensity inside the predicted mask is more than ``k`` robust SDs away from the
median of the drawn slice the walk started from, when too few of its voxels lie in that slice's
intensity range, or when its area falls below ``min_area_fraction`` of that slice's area. The presence is a graded score
(1 = intensity exactly as in the prompt, 0.5 = at the limit), so the engine's per-slice
confidence means something for these methods too.

Defaults (k = 2, no growth for copy, 40 demons iterations, sigma 1.5 px, crops of at most 128 px)
were checked on the held-out structures of scripts/split.json at the 50 % prompt (CT, MR and
spine groups, 47 structures), mean Dice: copy 0.584 / 0.606 / 0.641 / 0.664 and track
0.637 / 0.648 / 0.657 / 0.672 for k = 3 / 2.5 / 2 / 1.5 (over-running the object's ends is the
main error, so a tighter gate helps there); k = 2 is kept as a margin for intensity
inhomogeneity on unseen scans. Letting copy grow by 1 px per slice leaked (0.38); sigma 2.5,
60 iterations, diffeomorphic demons or no pre-smoothing did not help track.

Keyframes: the engine calls ``begin`` with the first drawn slice only, but every walk starts
from a drawn slice. A predictor remembers which slices it predicted itself; a guide it never
predicted is a drawn slice, whose own statistics then gate the slices walked from it (each
predicted slice inherits the drawn slice its walk started from). So the drift test is always
against the nearest user-drawn slice, not against a sliver drawn at the far end of the object.

These predictors and the engine need numpy, scipy, cc3d and SimpleITK only: torch is imported
only for ``pam`` (``PAMSegmentLib.pam_predictor``), so they are a fallback where torch is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .propagate import SlicePrediction, SlicePredictor

__all__ = ["CopyPredictor", "TrackPredictor", "IntensityGate", "get_predictor", "METHOD_NAMES"]

METHOD_NAMES = ("pam", "pam-memory", "track", "copy")


# ---------------------------------------------------------------------------------------------
# shared pieces


@dataclass
class IntensityGate:
    """The prompt region's intensity statistics and the drift test against them.

    median/sd: median and robust SD (max of 1.4826 MAD and IQR/1.349, floored at 2 % of the
    slice's 1-99 % range so a flat phantom region still has a usable width; a padding plateau
    outside a CT's field of view left out of that range, see ``_padding``); [low, high]: the
    prompt's 1st-99th percentile widened by ``k / 2`` robust SDs on each side (1 SD at the default
    k = 2): the "in-window" range.
    """

    median: float
    sd: float
    low: float
    high: float
    k: float = 2.0
    min_inside: float = 0.5

    @classmethod
    def from_prompt(cls, image_slice: np.ndarray, mask: np.ndarray, k: float = 2.0,
                    min_inside: float = 0.5, sd_floor: float = 0.02, raw: np.ndarray | None = None,
                    padding: np.ndarray | bool | None = None) -> "IntensityGate":
        """``image_slice``: the (smoothed) slice the statistics are taken on; ``raw``: the same slice
        as stored, where a padding plateau is found (exact values: smoothing blurs its edge), or
        ``padding``: where it is (``_padding`` of a larger slice this one is cut from; False: none)."""
        vals = np.asarray(image_slice, dtype=np.float64)[np.asarray(mask, dtype=bool)]
        if vals.size == 0:
            raise InputError("the prompt slice's mask is empty")
        med = float(np.median(vals))
        mad = 1.4826 * float(np.median(np.abs(vals - med)))
        q1, q99, q25, q75 = np.percentile(vals, [1, 99, 25, 75])
        whole = np.asarray(image_slice, dtype=np.float64)
        if padding is None:
            padding = _padding(np.asarray(raw if raw is not None else image_slice))
        if padding is not None and padding is not False:
            padding = np.asarray(padding, dtype=bool)  # (0/1 integers: ~ would be a bitwise NOT)
            if padding.shape != whole.shape:
                raise InputError(f"the padding mask has shape {padding.shape}, the slice {whole.shape}")
        kept = whole if padding is None or padding is False or padding.all() else whole[~padding]
        s1, s99 = np.percentile(kept, [1, 99])
        floor = max(sd_floor * float(s99 - s1), 1e-6 * abs(med), 1e-300)  # relative: any unit of the values
        sd = max(mad, float(q75 - q25) / 1.349, floor)
        return cls(med, sd, float(q1) - k * sd * 0.5, float(q99) + k * sd * 0.5, k, min_inside)

    def in_range(self, values: np.ndarray) -> np.ndarray:
        return (values >= self.low) & (values <= self.high)

    def score(self, values: np.ndarray) -> float:
        """Presence score in [0, 1]: 1 = like the prompt, >= 0.5 = within the limits, 0 = drifted."""
        if values.size == 0:
            return 0.0
        z = abs(float(np.median(values)) - self.median) / self.sd
        p_z = 1.0 - 0.5 * z / self.k
        frac = float(np.count_nonzero(self.in_range(values))) / values.size
        p_f = 0.5 + 0.5 * (frac - self.min_inside) / max(1.0 - self.min_inside, 1e-6)
        return float(np.clip(min(p_z, p_f), 0.0, 1.0))


def _padding(raw: np.ndarray) -> np.ndarray | None:
    """Where a slice holds padding (with 3 px around it, which a smoothed copy blurs), or None: its
    minimum, when that is a negative value held by 0.1 % of the pixels or more and lying apart from all
    others by over a tenth of their 1-99 % range (a CT's -2048, -3024 or -32768 outside the scanner's
    field of view). Air clamped at -1024 beside air at -1000 is none; neither is noise down to a
    minimum, nor a zero background (a masked MR or template: image content, as the evaluation's MNI
    template and brains have it, whose results stay as they were); a constant negative background (a
    z-scored image) or a CT masked to the body at exactly -1024 is taken for padding (README).
    Left in, it widened the drift test's floor (2 % of the slice's range: 660 HU with -32768) until
    the tissue around an organ passed as the organ: a session-39 trial's `track` ran through all 40
    slices of a CT padded with -2048, 23 (the organ's) with -1024."""
    raw = np.asarray(raw)
    if raw.size == 0 or raw.dtype.kind not in "iuf":
        return None
    low = raw.min()
    if not low < 0:
        return None
    at = raw == low
    n = int(np.count_nonzero(at))
    if n < 0.001 * raw.size or n == raw.size:  # (smoothed, 0.3 % of padding moved the 1st percentile)
        return None
    rest = raw[~at].astype(np.float64)
    r1, r99 = np.percentile(rest, [1, 99])
    if not float(rest.min()) - float(low) > 0.1 * float(r99 - r1):
        return None
    padding = ndimage.binary_dilation(at, iterations=3) if at.ndim else at
    return None if padding.all() else padding


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop_around(mask: np.ndarray, pad_fraction: float, min_pad: int) -> tuple[slice, slice] | None:
    """Slices of the guide mask's bounding box padded by ``pad_fraction`` of its size (clipped)."""
    box = _bbox(mask)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    pr = max(int(np.ceil(pad_fraction * (r1 - r0))), min_pad)
    pc = max(int(np.ceil(pad_fraction * (c1 - c0))), min_pad)
    h, w = mask.shape
    return slice(max(r0 - pr, 0), min(r1 + pr, h)), slice(max(c0 - pc, 0), min(c1 + pc, w))


class _ClassicalPredictor(SlicePredictor):
    """Common state: prompt statistics, slice-by-slice walk, graded presence."""

    window_mm = 0.0
    max_window = 1
    min_window = 1
    threshold = 0.5
    presence_threshold = 0.5
    min_area_fraction = 0.0  # the engine's test is against the previous guide; ours is in predict()
    min_area_px = 1

    def __init__(self, k: float = 2.0, min_inside: float = 0.5, min_area_fraction: float = 0.05,
                 smooth_sigma: float = 1.0):
        self.k, self.min_inside = float(k), float(min_inside)
        self.prompt_area_fraction = float(min_area_fraction)
        self.smooth_sigma = float(smooth_sigma)
        self.gate: IntensityGate | None = None
        self.prompt_area = 0
        self._drawn: dict[int, dict] | None = None

    def _smooth(self, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr, dtype=np.float32)
        return ndimage.gaussian_filter(arr, self.smooth_sigma) if self.smooth_sigma > 0 else arr

    def _drawn_state(self, image_slice: np.ndarray, mask: np.ndarray) -> dict:
        """Statistics of a user-drawn slice: the gate, its area, anything subclasses add."""
        mask = np.asarray(mask, dtype=bool)
        sl = _crop_around(mask, 0.5, 8)
        if sl is None:
            raise InputError("a drawn slice's mask is empty")
        # Statistics on the lightly smoothed slice: the same smoothing is applied to queries. Padding
        # is looked for on the whole slice: a crop may hold too little of it to be found, yet enough,
        # smoothed, to widen the gate; and in a crop of soft tissue a few voxels of air clamped at
        # -1024 would pass for a plateau far below the rest (374 crops of the evaluation's structures).
        padding = _padding(image_slice)
        padding = False if padding is None else padding[sl]
        gate = IntensityGate.from_prompt(self._smooth(image_slice[sl]), mask[sl], k=self.k,
                                         min_inside=self.min_inside, padding=padding)
        return {"gate": gate, "area": int(mask.sum())}

    def begin(self, volume, prompt_index, prompt_mask):
        self._drawn = {int(prompt_index): self._drawn_state(volume[prompt_index], prompt_mask)}
        self._origin: dict[int, int] = {}  # predicted slice -> the drawn slice its walk started from
        self._use(int(prompt_index))

    def _use(self, drawn_index: int) -> None:
        st = self._drawn[drawn_index]
        self.gate, self.prompt_area, self._state = st["gate"], st["area"], st

    def _start(self, volume, guide_index: int, guide_mask: np.ndarray) -> int:
        """Select the statistics for a predict() call; returns the origin drawn slice."""
        self._check_begun()
        gi = int(guide_index)
        if gi in self._origin:
            origin = self._origin[gi]
        else:
            origin = gi
            if gi not in self._drawn:  # a drawn slice we have not seen: a keyframe
                self._drawn[gi] = self._drawn_state(volume[gi], guide_mask)
        self._use(origin)
        return origin

    def _prepare(self, volume, guide_index, guide_mask, query_indices, pad_fraction: float, min_pad: int):
        """Common start of predict(): the statistics to use, empty outputs and the crop around the guide."""
        guide_mask = np.asarray(guide_mask, dtype=bool)
        origin = self._start(volume, guide_index, guide_mask)
        n, (h, w) = len(query_indices), guide_mask.shape
        prob = np.zeros((n, h, w), dtype=np.float32)
        presence = np.zeros(n, dtype=np.float32)
        return guide_mask, origin, prob, presence, _crop_around(guide_mask, pad_fraction, min_pad)

    def _presence(self, query_smoothed: np.ndarray, pred_mask: np.ndarray) -> float:
        area = int(np.count_nonzero(pred_mask))
        if area == 0 or area < self.prompt_area_fraction * self.prompt_area:
            return 0.0
        return self.gate.score(query_smoothed[pred_mask])

    def _check_begun(self):
        if self._drawn is None:
            raise RuntimeError(f"{type(self).__name__}.begin() must be called before predict()")


# ---------------------------------------------------------------------------------------------
# copy


class CopyPredictor(_ClassicalPredictor):
    """The guide's mask copied to the query slice while the intensity inside it does not drift.

    refine=True keeps only copied voxels whose smoothed intensity is in the prompt's range
    (closing + hole filling so noise does not punch holes); ``grow_px`` > 0 additionally lets the
    mask grow by that many pixels per slice into in-range voxels (follows slowly growing
    objects; 0 = pure copy, the mask can only shrink).
    """

    def __init__(self, k: float = 2.0, min_inside: float = 0.5, min_area_fraction: float = 0.05,
                 refine: bool = True, grow_px: int = 0, smooth_sigma: float = 1.0):
        super().__init__(k, min_inside, min_area_fraction, smooth_sigma)
        self.refine, self.grow_px = bool(refine), int(grow_px)

    def predict(self, volume, guide_index, guide_mask, query_indices: Sequence[int]) -> SlicePrediction:
        guide_mask, origin, prob, presence, sl = self._prepare(volume, guide_index, guide_mask, query_indices,
                                                              0.5, max(self.grow_px, 0) + 4)
        if sl is None:
            return SlicePrediction(prob, presence)
        g = guide_mask[sl]
        for q, idx in enumerate(query_indices):
            img = self._smooth(volume[idx][sl])
            pred = g
            if self.refine:
                inr = self.gate.in_range(img)
                if self.grow_px > 0:
                    grown = ndimage.binary_dilation(g, iterations=self.grow_px)
                    cand = (g | (grown & inr)) & inr
                else:
                    cand = g & inr
                # closed with a margin: scipy's closing erodes from outside the array, so it took the
                # slice's edge row off an object touching it (a drawing on edge pixels only came back empty)
                closed = ndimage.binary_closing(np.pad(cand, 1), iterations=1)[1:-1, 1:-1]
                cand = ndimage.binary_fill_holes(closed) & (
                    ndimage.binary_dilation(g, iterations=self.grow_px) if self.grow_px > 0 else g)
                pred = _largest_overlapping(cand, g)
            # The mask whatever the drift test says: the engine empties a slice whose presence is
            # below the threshold where its stop tests apply, but not between two drawn keyframes.
            presence[q] = self._presence(img, pred)
            prob[q][sl] = pred
            self._origin[int(idx)] = origin
        return SlicePrediction(prob, presence)


def _largest_overlapping(mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Components of ``mask`` overlapping ``ref``; drops specks the refinement leaves around."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    keep = np.unique(lab[ref & mask])
    keep = keep[keep != 0]
    if keep.size == 0:
        return np.zeros_like(mask)
    sizes = ndimage.sum_labels(mask, lab, keep)
    big = keep[sizes >= max(4, 0.02 * sizes.max())]
    return np.isin(lab, big)


# ---------------------------------------------------------------------------------------------
# track


# SimpleITK's demons (physical units = full-resolution px, as here) returns displacement fields of
# NaN on grids coarser than about 17.8 times the image (measured on discs in 1150-3000 px crops:
# the warp of a NaN field is empty, so a large object in a large slice was not propagated at all).
MAX_FACTOR = 16.0


class TrackPredictor(_ClassicalPredictor):
    """Slice-to-slice demons registration warping the guide mask onto the query slice.

    Per query: crop around the guide mask (bbox padded by ``pad`` of its size on each side),
    window both slices with PAM's window (``window_percentiles`` of the prompt region, widened
    by ``window_margin`` of its width so neighbouring tissue keeps some contrast), downsample
    the crop to at most ``max_side`` px, register query (fixed) to guide (moving) with SimpleITK's
    fast symmetric forces demons (``iterations``, displacement smoothing ``sigma`` px, no
    histogram matching), then resample the guide mask through the displacement field with
    linear interpolation on the full-resolution crop: the query's foreground probability.
    ``coarse_iterations`` > 0 adds ``coarse_levels`` pyramid levels (each half the resolution of
    the next): demons first runs that many iterations on the coarsest grid, and each level's
    displacement field, resampled onto the next finer grid, is where that level starts; the
    finest runs ``iterations`` (large motions converge in fewer steps).
    ``max_step`` > 0 limits each demons update to that many px *of the grid it runs on*; 0 keeps
    SimpleITK's default limit of 0.5 in physical units, which here are full-resolution px, so on a
    crop downsampled f times a level moved at most 0.5 / f of its own px per iteration.
    """

    def __init__(self, k: float = 2.0, min_inside: float = 0.5, min_area_fraction: float = 0.05,
                 iterations: int = 40, sigma: float = 1.5, pad: float = 0.5, max_side: int = 128,
                 window_percentiles: tuple[float, float] = (0.5, 99.5), window_margin: float = 0.25,
                 smooth_sigma: float = 1.0, diffeomorphic: bool = False, threads: int | None = 1,
                 coarse_iterations: int = 0, coarse_levels: int = 1, max_step: float = 0.0):
        super().__init__(k, min_inside, min_area_fraction, smooth_sigma)
        import SimpleITK  # noqa: F401  (fail at construction, not mid-walk, if missing)

        if int(iterations) < 1 or int(coarse_iterations) < 0 or int(max_side) < 8 or int(coarse_levels) < 1:
            raise ValueError(f"registration needs iterations >= 1, coarse_iterations >= 0, coarse_levels >= 1 and "
                             f"max_side >= 8; got {iterations}, {coarse_iterations}, {coarse_levels}, {max_side}")
        self.iterations, self.sigma, self.pad, self.max_side = int(iterations), float(sigma), float(pad), int(max_side)
        self.coarse_iterations, self.coarse_levels = int(coarse_iterations), int(coarse_levels)
        if not float(max_step) >= 0.0:
            raise ValueError(f"registration max_step must be >= 0 (0 = SimpleITK's default), got {max_step}")
        self.max_step = float(max_step)
        self.window_percentiles, self.window_margin = tuple(window_percentiles), float(window_margin)
        self.diffeomorphic, self.threads = bool(diffeomorphic), threads

    def _drawn_state(self, image_slice, mask):
        st = super()._drawn_state(image_slice, mask)
        vals = np.asarray(image_slice, dtype=np.float64)[np.asarray(mask, dtype=bool)]
        lo, hi = np.percentile(vals, self.window_percentiles)
        width = float(hi - lo)
        if width <= 1e-6 * max(abs(lo), abs(hi)):  # relative to the region's values: any unit, any fill value
            width = 4 * st["gate"].sd  # a flat region: fall back to the robust spread
            lo, hi = lo - width / 2, hi + width / 2
        st["window"] = (float(lo - self.window_margin * width), float(hi + self.window_margin * width))
        return st

    def _normalise(self, arr: np.ndarray) -> np.ndarray:
        lo, hi = self._state["window"]
        width = hi - lo
        if not np.float32(width) > 0:  # a flat region of 0: its floor width (1e-300) is 0 in float32: 0 / 0 warned
            width = 1.0
        return np.clip((np.asarray(arr, dtype=np.float32) - lo) / width, 0.0, 1.0).astype(np.float32)

    def _factors(self, shape) -> list[float]:
        """Grid coarsening factors, finest first: the registration grid (at most ``max_side`` px),
        then each pyramid level twice as coarse; none above MAX_FACTOR (a crop over 16 x
        ``max_side`` px is registered on a grid finer than ``max_side``, and pyramid levels coarser
        than that are left out)."""
        fine = min(max(1.0, max(shape) / self.max_side), MAX_FACTOR)
        levels = [fine * 2.0 ** k for k in range(1 + (self.coarse_levels if self.coarse_iterations else 0))]
        return [f for f in levels if f <= MAX_FACTOR]

    def pyramid(self, arr: np.ndarray) -> list:
        """A normalised 2D crop on the registration's grids, finest first: (coarsening factor,
        SimpleITK image whose physical units are full-resolution pixels) per level.
        ``register_pyramids`` takes two of them; a slice used by two registrations needs its
        pyramid only once."""
        import SimpleITK as sitk

        arr = np.asarray(arr, dtype=np.float32)
        h, w = arr.shape
        out = []
        for f in self._factors(arr.shape):
            if f <= 1.0:
                out.append((f, sitk.GetImageFromArray(arr)))
                continue
            size = [max(int(round(w / f)), 4), max(int(round(h / f)), 4)]
            sp = (w / size[0], h / size[1])
            origin = (0.5 * (sp[0] - 1.0), 0.5 * (sp[1] - 1.0))  # pixel-centre aligned coarse grid
            # Anti-aliasing blur, then resample onto the coarse grid.
            out.append((f, sitk.Resample(sitk.GetImageFromArray(ndimage.gaussian_filter(arr, 0.5 * f)), size,
                                         sitk.Transform(), sitk.sitkLinear, origin, sp, (1.0, 0.0, 0.0, 1.0), 0.0,
                                         sitk.sitkFloat32)))
        return out

    def register(self, fixed: np.ndarray, moving: np.ndarray):
        """Demons registration of two normalised 2D crops of the same shape -> a SimpleITK
        transform mapping ``fixed`` pixels to ``moving`` ones (what ``warp`` resamples through).
        Depends on the images only, so several can run at once (SimpleITK releases the GIL)."""
        return self.register_pyramids(self.pyramid(fixed), self.pyramid(moving))

    def register_pyramids(self, fixed: list, moving: list):
        """``register`` on two ``pyramid`` results (same crop shape)."""
        import SimpleITK as sitk

        if [f for f, _ in fixed] != [f for f, _ in moving] or fixed[0][1].GetSize() != moving[0][1].GetSize():
            raise ValueError("register_pyramids needs two pyramids of the same crop shape")

        def demons(iterations, f):
            d = (sitk.DiffeomorphicDemonsRegistrationFilter() if self.diffeomorphic
                 else sitk.FastSymmetricForcesDemonsRegistrationFilter())
            d.SetNumberOfIterations(iterations)
            d.SetSmoothDisplacementField(True)
            d.SetStandardDeviations(self.sigma * f)  # physical units = full-res pixels
            if self.max_step > 0:  # likewise: max_step grid px = max_step * f physical units
                d.SetMaximumUpdateStepLength(self.max_step * f)
            d.SetUseImageSpacing(True)
            if self.threads:
                d.SetNumberOfThreads(int(self.threads))
            return d

        field = None
        for level in range(len(fixed) - 1, -1, -1):  # coarsest first
            (f, f_img), (_, m_img) = fixed[level], moving[level]
            d = demons(self.iterations if level == 0 else self.coarse_iterations, f)
            if field is None:
                field = d.Execute(f_img, m_img)
            else:
                # The coarser field, in physical units, resampled onto this grid: where it starts.
                init = sitk.Resample(field, f_img, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
                field = d.Execute(f_img, m_img, init)
        values = sitk.GetArrayViewFromImage(field)
        if not np.isfinite(values).all():  # a safety net under MAX_FACTOR: no motion where demons failed
            clean = sitk.GetImageFromArray(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), isVector=True)
            clean.CopyInformation(field)
            field = clean
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))

    @staticmethod
    def warp(transform, moving_mask: np.ndarray, supersample: int = 1) -> np.ndarray:
        """``moving_mask`` resampled through ``transform`` (linear: a probability), same shape.
        ``supersample`` s > 1: ``moving_mask`` is on a grid s times finer than the registered crop
        (s x s sub-pixels per pixel), and so is the result."""
        import SimpleITK as sitk

        arr = np.asarray(moving_mask, dtype=np.float32)
        if supersample <= 1:
            mask = sitk.GetImageFromArray(arr)
            warped = sitk.Resample(mask, mask, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            return sitk.GetArrayViewFromImage(warped).copy()
        values, (r0, c0) = TrackPredictor.warp_region(transform, arr, supersample)
        out = np.zeros_like(arr)
        out[r0:r0 + values.shape[0], c0:c0 + values.shape[1]] = values
        return out

    @staticmethod
    def warp_region(transform, moving_mask: np.ndarray, supersample: int):
        """``warp`` of a mask on a grid ``supersample`` (s) times finer than the registered crop,
        computed only where it can be non-zero: ``(values, (row0, col0))``, the warped mask on
        that part of the fine grid (0 elsewhere). The fine grid has s^2 times the pixels, so only
        the mask's bounding box widened by the field's largest displacement (+1 px for the
        interpolation) is resampled, its edges on multiples of s (whole crop pixels): the same
        values as resampling the whole fine grid, at a fraction of the cost."""
        import SimpleITK as sitk

        s = int(supersample)
        arr = np.asarray(moving_mask, dtype=np.float32)
        box = _bbox(arr)
        if box is None:
            return np.zeros((0, 0), np.float32), (0, 0)
        mask = sitk.GetImageFromArray(arr)
        mask.SetSpacing((1.0 / s,) * 2)  # sub-pixel centres in the crop's pixel units (the field's)
        mask.SetOrigin((0.5 / s - 0.5,) * 2)
        reach = float(np.abs(sitk.GetArrayViewFromImage(transform.GetDisplacementField())).max()) \
            if isinstance(transform, sitk.DisplacementFieldTransform) else np.inf
        if np.isfinite(reach):
            margin = int(np.ceil((reach + 1.0) * s)) + 1  # fine px
            b0, b1, b2, b3 = box  # rows [b0, b1), columns [b2, b3)
            r0, r1 = max(b0 - margin, 0) // s * s, min(-(-(b1 + margin) // s) * s, arr.shape[0])
            c0, c1 = max(b2 - margin, 0) // s * s, min(-(-(b3 + margin) // s) * s, arr.shape[1])
        else:  # any other transform: the whole grid
            r0, r1, c0, c1 = 0, arr.shape[0], 0, arr.shape[1]
        origin = ((c0 + 0.5) / s - 0.5, (r0 + 0.5) / s - 0.5)
        warped = sitk.Resample(mask, [int(c1 - c0), int(r1 - r0)], transform, sitk.sitkLinear, origin,
                               (1.0 / s,) * 2, (1.0, 0.0, 0.0, 1.0), 0.0, sitk.sitkFloat32)
        return sitk.GetArrayViewFromImage(warped).copy(), (int(r0), int(c0))

    def predict(self, volume, guide_index, guide_mask, query_indices: Sequence[int]) -> SlicePrediction:
        guide_mask, origin, prob, presence, sl = self._prepare(volume, guide_index, guide_mask, query_indices,
                                                              self.pad, 8)
        if sl is None:
            return SlicePrediction(prob, presence)
        # Every query is registered to the same guide crop: its grid images are made once.
        moving = self.pyramid(self._normalise(self._smooth(volume[guide_index][sl])))
        g = guide_mask[sl]
        for q, idx in enumerate(query_indices):
            raw = self._smooth(volume[idx][sl])
            p = np.clip(self.warp(self.register_pyramids(self.pyramid(self._normalise(raw)), moving), g), 0.0, 1.0)
            presence[q] = self._presence(raw, p >= self.threshold)
            prob[q][sl] = p  # whatever the drift test says (see CopyPredictor.predict)
            self._origin[int(idx)] = origin
        return SlicePrediction(prob, presence)


# ---------------------------------------------------------------------------------------------
# registry


def get_predictor(method: str, checkpoint=None, device: str = "cpu", **options) -> SlicePredictor:
    """A slice predictor by name: ``pam`` (the checkpoint, or the shipped default weights when
    ``checkpoint`` is None), ``pam-memory`` (the same network with a memory bank of earlier
    guides), ``copy`` or ``track``. ``options`` go to the baseline's constructor.
    Raises InputError for an unknown method or a checkpoint given to a baseline."""
    name = str(method).strip().lower()
    if name in ("pam", "pam-memory"):
        from .checkpoints import load_model
        from .pam_predictor import MemoryPAMPredictor, PAMPredictor

        if options and name == "pam":
            raise InputError(f"method 'pam' takes no options, got {', '.join(sorted(options))}")
        unknown = sorted(set(options) - {"memory", "current_weight"})
        if unknown:  # before the model is loaded (a TypeError from the constructor before)
            raise InputError(f"bad option for method 'pam-memory': {', '.join(unknown)} (it takes memory and "
                             "current_weight)")
        memory, weight = options.get("memory", 2), options.get("current_weight", 0.5)
        if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory < 1:
            raise InputError(f"bad option for method 'pam-memory': memory must be a whole number of guides, at least "
                             f"1; got {memory!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not 0.0 <= weight <= 1.0:
            raise InputError(f"bad option for method 'pam-memory': current_weight must be a number from 0 to 1; got "
                             f"{weight!r}")
        model = load_model(checkpoint, device=device)
        return PAMPredictor(model) if name == "pam" else MemoryPAMPredictor(model, **options)
    if name in ("copy", "track"):
        if checkpoint is not None:
            raise InputError(f"method {name!r} does not use a checkpoint (got {checkpoint}); drop --checkpoint or use --method pam")
        cls = CopyPredictor if name == "copy" else TrackPredictor
        try:
            return cls(**options)
        except (TypeError, ValueError, OverflowError) as exc:  # an unknown option, or a value it refuses (inf)
            raise InputError(f"bad option for method {name!r}: {exc}") from None
    raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHOD_NAMES)}")
