"""Spacing-aware segmentation metrics: Dice, normalized surface Dice (NSD) and HD95.

Inputs are boolean masks of the same shape (K, J, I) (any number of dimensions works) and
the voxel spacing in mm in the same axis order. Surfaces are the masks' border voxels: voxels
of the mask with a face neighbour (6-connectivity in 3D) outside the mask; outside the array
counts as background. Distances are Euclidean in mm between border voxel centres.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = ["dice", "surface_distances", "normalized_surface_dice", "hd95", "evaluate"]


def _check(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if spacing is None:
        return pred, ref, (1.0,) * pred.ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != pred.ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing {spacing} must be {pred.ndim} positive numbers (mm, same axis order as the masks)")
    return pred, ref, sp


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap 2|P∩R| / (|P| + |R|) of two boolean masks of equal shape; 1.0 if both are empty."""
    pred, ref, _ = _check(pred, ref)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of pred | ref, padded by one background voxel.

    One voxel is enough margin: the pad keeps border voxels on the array edge as border voxels
    (outside is background), and because every border voxel of both masks lies inside the box,
    the distance transforms over the box are exact (no larger tolerance margin is needed).
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    region = tuple(box)
    return np.pad(pred[region], 1), np.pad(ref[region], 1)


def _border(mask: np.ndarray) -> np.ndarray:
    face_neighbours = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=face_neighbours, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred border -> nearest ref border voxel,
    ref border -> nearest pred border voxel), two 1D float arrays with one entry per border
    voxel of pred and of ref respectively.

    If exactly one mask is empty, the distances from the other mask's border are all inf and
    the empty mask's array is empty; if both are empty both arrays are empty.
    """
    pred, ref, sp = _check(pred, ref, spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return np.zeros(0), np.zeros(0)
    pred, ref = _crop_to_union(pred, ref)
    pred_border, ref_border = _border(pred), _border(ref)
    if not has_ref:
        return np.full(int(np.count_nonzero(pred_border)), np.inf), np.zeros(0)
    if not has_pred:
        return np.zeros(0), np.full(int(np.count_nonzero(ref_border)), np.inf)
    to_ref = ndimage.distance_transform_edt(~ref_border, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sp)
    return to_ref[pred_border].astype(np.float64), to_pred[ref_border].astype(np.float64)


def _nsd(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    total = pred_to_ref.size + ref_to_pred.size
    if total == 0:
        return 1.0
    within = int(np.count_nonzero(pred_to_ref <= tolerance_mm)) + int(np.count_nonzero(ref_to_pred <= tolerance_mm))
    return within / total


def _hd95(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    if pred_to_ref.size + ref_to_pred.size == 0:
        return 0.0
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return float("inf")
    return float(np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95))


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Fraction of all border voxels (of pred and of ref) lying within ``tolerance_mm`` of the
    other mask's border. 1.0 if both masks are empty, 0.0 if exactly one is."""
    return _nsd(*surface_distances(pred, ref, spacing), tolerance_mm)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm: the 95th percentile (linear
    interpolation) of both directed surface-distance sets pooled, as medpy's ``hd95``.
    (MONAI instead takes the max of the two directed percentiles.) 0.0 if both masks are
    empty, inf if exactly one is."""
    return _hd95(*surface_distances(pred, ref, spacing))


def evaluate(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> dict[str, float]:
    """{"dice", "nsd", "hd95"} for boolean masks (K, J, I) with spacing (k, j, i) in mm."""
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    return {"dice": dice(pred, ref), "nsd": _nsd(d_pred, d_ref, tolerance_mm), "hd95": _hd95(d_pred, d_ref)}
