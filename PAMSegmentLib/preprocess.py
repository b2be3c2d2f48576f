"""PAM's preprocessing: intensity window from the prompt region, square ROI crop around the
guiding mask, resize to the network's input size, and the exact inverse back to the slice grid.

Training (``PAMSegmentLib.training``) and inference (``PAMSegmentLib.propagate``) both call these
functions, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_number, names_shown, shown

__all__ = [
    "PreprocessingParams",
    "IntensityWindow",
    "CropBox",
    "intensity_window",
    "crop_box_for_mask",
    "crop_slices",
    "uncrop_probability",
]


@dataclass(frozen=True)
class PreprocessingParams:
    """Everything preprocessing depends on; stored in our checkpoints."""

    input_size: int = 224
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    # Fraction of the window's width added on each side. PAM uses 0 (the window is exactly the
    # prompt's intensity range); a margin keeps some contrast between surrounding tissues.
    window_margin: float = 0.0
    crop_scale: float = 1.5
    min_crop: int = 16

    def __post_init__(self):
        # Checked because a checkpoint is untrusted input (a NaN crop scale or a 0 px input would
        # fail mid-run or silently return only the drawn slice).
        if not is_number(self.input_size, 16, 512, whole=True):
            raise ValueError(f"input_size must be a whole number within [16, 512], got {shown(self.input_size)}")
        pct = self.window_percentiles
        if len(pct) != 2 or not all(is_number(v, 0, 100) for v in pct) or not pct[0] < pct[1]:
            raise ValueError(f"window_percentiles must be two increasing numbers within [0, 100], got {shown(pct)}")
        if not is_number(self.window_margin, 0, 10):
            raise ValueError(f"window_margin must be a number within [0, 10], got {shown(self.window_margin)}")
        if not is_number(self.crop_scale, 1, 10):
            raise ValueError(f"crop_scale must be a number within [1, 10], got {shown(self.crop_scale)}")
        if not is_number(self.min_crop, 1, 4096, whole=True):
            raise ValueError(f"min_crop must be a whole number within [1, 4096], got {shown(self.min_crop)}")
        for name in ("input_size", "min_crop"):  # 128.0 (a header written by hand or by JSON) is 128
            object.__setattr__(self, name, int(getattr(self, name)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window_percentiles"] = list(self.window_percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessingParams":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = sorted((k for k in d if k not in known), key=str)
        if unknown:
            raise ValueError(f"unknown preprocessing field(s): {names_shown(unknown)}")
        if "window_percentiles" in d:  # two real numbers (a string "19" was read as (1, 9), [True, 50] accepted)
            pct = d["window_percentiles"]
            try:  # a list, tuple, array or tensor of two numbers
                ok = not isinstance(pct, (str, bytes, bytearray, memoryview, dict, set, frozenset)) and len(pct) == 2
                values = list(pct) if ok else []
                ok = ok and not any(isinstance(v, (bool, np.bool_, str, bytes)) or str(getattr(v, "dtype", "")).split(
                    ".")[-1].startswith(("bool", "complex")) for v in values)  # (numpy's or torch's bools, complex)
                values = [float(v) for v in values] if ok else []
            except (TypeError, ValueError, RuntimeError, OverflowError):
                values = []
            if len(values) != 2 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"window_percentiles must be a list of two increasing numbers within [0, 100], got "
                                 f"{shown(pct)}")
            d["window_percentiles"] = tuple(values)
        return cls(**d)


@dataclass(frozen=True)
class IntensityWindow:
    """Maps [low, high] linearly to [-1, 1], clipping outside."""

    low: float
    high: float

    def apply(self, x: np.ndarray | torch.Tensor):
        scale = 2.0 / (self.high - self.low)
        if isinstance(x, torch.Tensor):
            return (x.clamp(self.low, self.high) - self.low) * scale - 1.0
        # in float64: float32 values near its limit (3e38) overflowed to inf and NaN here
        return ((np.clip(np.asarray(x, dtype=np.float64), self.low, self.high) - self.low) * scale - 1.0
                ).astype(np.float32)


def _magnitude(lo: float, hi: float) -> float:
    """The scale of a region's values, for relative tests: the larger of |lo| and |hi| (0 only
    for a region of zeros). The region's own values, not the slice's: a fill value of -1e30
    outside the field of view must not make every region look flat."""
    return max(abs(float(lo)), abs(float(hi)))


# A few voxels far outside the rest of a drawing (beyond this many interquartile ranges from its
# quartiles: bone or contrast touched by the brush) are left out of its window where they are at most
# the given share of it and widen the window at least twofold (``intensity_window``'s outlier_share).
OUTLIER_FENCE_IQR = 3.0


def intensity_window(image_slice: np.ndarray, mask: np.ndarray, params: PreprocessingParams,
                     outlier_share: float = 0.0) -> IntensityWindow:
    """Window from the voxels inside ``mask`` on ``image_slice`` (both (j, i) or any same shape).
    ``outlier_share`` > 0: voxels beyond OUTLIER_FENCE_IQR interquartile ranges of the quartiles,
    if they are at most that share of the region and leaving them out at least halves the window,
    are left out (session 48: three voxels of bone, 1.7 % of a kidney's drawn slice, made the window
    ten times as wide as the kidney's own values, and every walk from it ended at once)."""
    values = np.asarray(image_slice)[np.asarray(mask) > 0]
    if values.size == 0:
        values = np.asarray(image_slice).ravel()
    values = values.astype(np.float64)
    lo, hi = np.percentile(values, params.window_percentiles)
    if outlier_share > 0 and values.size:
        q1, q3 = np.percentile(values, (25, 75))
        reach = OUTLIER_FENCE_IQR * (q3 - q1)
        kept = values[(values >= q1 - reach) & (values <= q3 + reach)]
        # (not for a region half of one value: its quartiles meet, and every other value is "far out";
        # the window of what is left is flat, and fell back to the whole slice's spread: a re-review)
        if q3 > q1 and 0 < values.size - kept.size <= outlier_share * values.size:
            lo_kept, hi_kept = np.percentile(kept, params.window_percentiles)
            if hi_kept - lo_kept <= 0.5 * (hi - lo):
                lo, hi = lo_kept, hi_kept
    width = hi - lo
    if width <= 1e-6 * _magnitude(lo, hi):
        # A uniform region (synthetic data, a flat phantom): fall back to the slice's spread so the
        # window is never degenerate. "Uniform" is relative to the slice's own values, so that an
        # image in other units (x 1e-12) is windowed as the same image in HU.
        spread = float(np.std(np.asarray(image_slice, dtype=np.float64))) or 1.0
        lo, hi, width = lo - spread, hi + spread, 2 * spread
    lo -= params.window_margin * width
    hi += params.window_margin * width
    return IntensityWindow(float(lo), float(hi))


@dataclass(frozen=True)
class CropBox:
    """A square window [row0, row0+side) x [col0, col0+side) on a slice; may extend past its edges."""

    row0: int
    col0: int
    side: int


def crop_box_for_mask(mask: np.ndarray, params: PreprocessingParams) -> CropBox:
    """Square centred on the mask's bounding box, side = crop_scale x its larger extent."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("cannot place a crop around an empty mask")
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = int(max(round(params.crop_scale * max(r1 - r0, c1 - c0)), params.min_crop))
    center_r, center_c = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    return CropBox(int(round(center_r - side / 2.0)), int(round(center_c - side / 2.0)), side)


def _padded_window(arr: np.ndarray, box: CropBox, fill: float) -> np.ndarray:
    """arr (..., H, W) -> (..., side, side), filled with ``fill`` where the box leaves the array."""
    h, w = arr.shape[-2:]
    out = np.full(arr.shape[:-2] + (box.side, box.side), fill, dtype=np.float32)
    r0, c0 = max(box.row0, 0), max(box.col0, 0)
    r1, c1 = min(box.row0 + box.side, h), min(box.col0 + box.side, w)
    if r1 > r0 and c1 > c0:
        out[..., r0 - box.row0 : r1 - box.row0, c0 - box.col0 : c1 - box.col0] = arr[..., r0:r1, c0:c1]
    return out


# Bytes a crop pixel takes at the peak of a prediction: the padded float32 crop, its float64 window,
# the float32 result and the probability put back on the slice (measured: one 15000 px crop, 4.4 GB).
CROP_BYTES_PER_PIXEL = 20


def _check_crop_memory(n: int, box: CropBox, slice_shape: tuple[int, int]) -> None:
    """InputError when ``n`` crops of ``box`` would take more than a quarter of this machine's
    memory: the crop is a square of 1.5 x the object's longer extent, so an object along a long thin
    slice (3 x 20000 px, a 0.3 MB upload to a server) asked for 3 GB and more, and one of 60000 px
    would have taken all of it (the OS kills the process, or the server)."""
    from .errors import InputError
    from .volumes import physical_memory_bytes

    need = int(n) * int(box.side) ** 2 * CROP_BYTES_PER_PIXEL
    memory = physical_memory_bytes()
    if memory and need > memory // 4:
        h, w = slice_shape
        raise InputError(f"the network works on a square crop around the object, here {box.side} x {box.side} px on "
                         f"slices of {h} x {w} px: {need / 1024**3:.1f} GB "
                         f"for {n} slice{'s' if n != 1 else ''}, more than a quarter of this machine's "
                         f"{memory / 1024**3:.0f} GB of memory. "
                         + (f"A smaller --batch-size (batch_size= in Python; a server's own --batch-size; {n} "
                            "slices went at once) may do; else "
                            if n > 1 else "")
                         + "crop or downsample the image around the object, or use --method track (registration, "
                           "no network)")


def crop_slices(slices: np.ndarray, box: CropBox, size: int, window: IntensityWindow | None = None,
                is_mask: bool = False, antialias: bool = True) -> torch.Tensor:
    """Crop (N, H, W) slices to ``box`` and resize to (N, 1, size, size).

    Images are windowed to [-1, 1] (outside the slice counts as the window's low end) and resized
    bilinearly, antialiased when shrunk (``antialias``; the authors' code resizes without);
    masks are resized with nearest neighbour.
    """
    _check_crop_memory(len(slices), box, slices.shape[-2:])
    if is_mask:
        crop = _padded_window(slices.astype(np.float32), box, 0.0)
    else:
        # Crop the raw values first (filling with the window's low end, i.e. -1 after windowing)
        # and window only the crop: full 512 x 512 slices are never converted.
        crop = window.apply(_padded_window(slices, box, window.low))
    t = torch.from_numpy(crop)[:, None]
    if box.side == size:
        return t
    if is_mask:
        return F.interpolate(t, size=(size, size), mode="nearest")
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=bool(antialias) and box.side > size)


def uncrop_probability(prob: torch.Tensor | np.ndarray, box: CropBox, slice_shape: tuple[int, int]) -> np.ndarray:
    """Inverse of the crop: (N, size, size) probabilities -> (N, H, W) on the slice grid, 0 outside."""
    p = torch.as_tensor(prob, dtype=torch.float32)[:, None]
    if p.shape[-1] != box.side:
        p = F.interpolate(p, size=(box.side, box.side), mode="bilinear", align_corners=False)
    p = p[:, 0].numpy()
    h, w = slice_shape
    out = np.zeros((p.shape[0], h, w), dtype=np.float32)
    r0, c0 = max(box.row0, 0), max(box.col0, 0)
    r1, c1 = min(box.row0 + box.side, h), min(box.col0 + box.side, w)
    if r1 > r0 and c1 > c0:
        out[:, r0:r1, c0:c1] = p[:, r0 - box.row0 : r1 - box.row0, c0 - box.col0 : c1 - box.col0]
    return out
