"""MRML adapter: propagate a segment of a Slicer segmentation through a volume.

This is the second edge where array order meets the outside world (the first is
``PAMSegmentLib.volumes``). Slicer's ``arrayFromVolume`` already gives (k, j, i) arrays; the volume's
spacing comes as (i, j, k) and is reversed here. Everything else stays in the volume's voxel grid:
the engine never resamples, so an oblique volume (rotated IJK-to-RAS) needs nothing special, and a
segmentation with its own geometry (other resolution, other orientation, other parent transform) is
read and written through the volume's grid by Slicer's segmentation logic.

Threading contract (the module's GUI relies on it):

* ``SegmentPropagation.__init__`` runs on the main thread and copies every array and value it
  needs out of MRML;
* ``start()`` runs the engine on a worker thread that touches only those copies (never MRML, VTK
  or Qt), reports ``progress``/``message`` and honours ``cancel()`` between batches;
* ``apply()`` runs on the main thread and writes the result with one segmentation-logic call.
  Until then the segmentation is untouched, so a cancelled or failed job changes nothing.

``slicer`` and ``vtk`` are imported inside functions: the rest of PAMSegmentLib (and its tests)
must import without Slicer.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import json
import logging
import math
import struct
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .checks import check_flag, empty_between_drawn, largest_gap, runs_text, state_from_json, state_to_json
from .errors import (DrawnIn3D, EmptySegment, InputError, NotEnoughMemory, PAMError, PaintedAcross, PropagationCancelled,
                     out_of_memory)

__all__ = [
    "MODES",
    "PAM_SUFFIX",
    "VolumeGrid",
    "PromptInfo",
    "SegmentPropagation",
    "propagate_segment",
    "propagate_segments",
    "SegmentQueue",
    "volume_array",
    "segment_mask",
    "describe_prompt",
    "axis_plane_name",
    "write_segment_mask",
    "PackedMask",
    "LabelmapSnapshot",
    "HistoryEntry",
    "PropagationHistory",
    "RUN_TAG",
    "RECORD_TAG",
    "encode_record",
    "decode_record",
    "SegmentUpdate",
    "update_segment",
    "undo_last",
    "edited_slices",
    "plan_keyframes",
    "review_order",
    "next_slice_to_review",
    "slice_centroid_ras",
    "jump_slices_to",
    "confidence_plot",
]

MODES = ("replace", "new")
# Segment tag naming the propagation a segment holds (PropagationHistory checks it on lookup).
RUN_TAG = "PAMSegment.Run"
# Segment tag holding what an update and the review need of that propagation (``encode_record``),
# saved with the segmentation, so that a result propagated in an earlier Slicer session can be
# updated and reviewed after the scene is loaded again.
RECORD_TAG = "PAMSegment.Record"
PAM_SUFFIX = " (PAM)"
STATES = ("pending", "running", "finished", "cancelled", "failed")

log = logging.getLogger(__name__)


def _slicer():
    try:
        import slicer  # noqa: PLC0415 - lazy on purpose: the library imports without Slicer
    except ImportError as exc:  # pragma: no cover - exercised only outside Slicer/slicer-core
        raise PAMError("PAMSegmentLib.mrml needs 3D Slicer (or the slicer-core wheel)") from exc
    return slicer


# ----------------------------------------------------------------------------------------------
# Reading MRML (main thread)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeGrid:
    """Where a (k, j, i) array sits in RAS: enough to write a mask back without the volume node."""

    shape: tuple[int, int, int]  # (k, j, i)
    spacing: tuple[float, float, float]  # mm, (k, j, i)
    ijk_to_ras: np.ndarray  # 4x4, columns are the i, j, k axes (Slicer's convention)

    def same_as(self, other: "VolumeGrid", tol: float = 1e-6) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=tol)


@dataclass(frozen=True)
class PromptInfo:
    """The slices a segment is drawn on, as the panel shows them."""

    axis: int  # array axis of (k, j, i) the user drew across; 0 for slices of constant k
    slices: list[int]  # slice indices along that axis
    plane: str  # "axial", "coronal", "sagittal" or "oblique" for the slices' orientation
    n_slices: int  # length of the volume along ``axis``

    def describe(self) -> str:
        idx = ", ".join(str(s) for s in self.slices[:8]) + (" ..." if len(self.slices) > 8 else "")
        word = "slice" if len(self.slices) == 1 else "slices"
        # Slice numbers are the volume's own (0 to n - 1, as Slicer's Data Probe shows the IJK index);
        # "array axis" only where the plane's name does not tell the slices apart (oblique volumes).
        axis = f", array axis {self.axis}" if self.plane.startswith("oblique") else ""
        return f"{len(self.slices)} {self.plane} {word} ({idx}; slices 0-{self.n_slices - 1}){axis}"


def _segment_tag(segment, key: str) -> str | None:
    """A vtkSegment's tag value, or None when it has none."""
    import vtk  # noqa: PLC0415

    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def _set_segment_tag(segment, key: str, value: str) -> None:
    if _segment_tag(segment, key) != value:  # setting it fires a segment-modified event
        segment.SetTag(key, value)


def _clear_run_tags(segment) -> None:
    """The segment holds no remembered PAM result: neither RUN_TAG nor RECORD_TAG."""
    segment.RemoveTag(RUN_TAG)
    segment.RemoveTag(RECORD_TAG)


def _put_run_tags(segment, run: str | None, record: str | None) -> None:
    """Tag the segment as holding that run's result (both tags), or as holding none."""
    if run and record:
        _set_segment_tag(segment, RUN_TAG, run)
        _set_segment_tag(segment, RECORD_TAG, record)
    else:
        _clear_run_tags(segment)


def _grid_of(volume_node) -> VolumeGrid:
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f'volume "{volume_node.GetName()}" has no voxels loaded')
    dims = image.GetDimensions()  # (i, j, k)
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    matrix = slicer.util.arrayFromVTKMatrix(m).copy()
    # Array index 0 is the image's first voxel, which need not be voxel (0, 0, 0) of the node's
    # IJK: an extent that starts elsewhere is folded into the matrix, so that ijk_to_ras maps
    # array indices (what is read, written and shown) wherever the extent starts.
    name = volume_node.GetName()
    if not np.all(np.isfinite(matrix)):  # the drawing was blamed: "none lies inside volume ...: draw it on this volume"
        raise InputError(f'volume "{name}" has no usable position: its IJK-to-RAS matrix (origin, spacing, directions) '
                         "holds NaN or infinity; fix them in the Volumes module (Volume Information) or load the "
                         "volume again")
    axes = matrix[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if not np.all(lengths > 0) or abs(np.linalg.det(axes)) <= 1e-9 * float(np.prod(lengths)):
        raise InputError(f'volume "{name}" has a degenerate grid (a voxel size of 0, or two axes parallel): fix its '
                         "spacing and directions in the Volumes module (Volume Information) or load it again")
    start = np.array(image.GetExtent()[0::2], float)
    matrix[:3, 3] += matrix[:3, :3] @ start
    # sizes, not signs (a negative spacing flips its axis in the matrix, where the sign is kept): the engine
    # refused "spacing must be three positive numbers, got (-2.0, 0.9, 0.8)" in (k, j, i) order
    spacing_ijk = np.abs(volume_node.GetSpacing())
    return VolumeGrid(
        shape=(int(dims[2]), int(dims[1]), int(dims[0])),
        spacing=(float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0])),
        ijk_to_ras=matrix,
    )


def _voxels_mtime(volume_node) -> tuple[int, int] | None:
    """Modification times of the volume's image data and its scalars (None without voxels)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        return None
    scalars = image.GetPointData().GetScalars()
    return int(image.GetMTime()), int(scalars.GetMTime()) if scalars is not None else 0


def _check_scalar_volume(volume_node) -> None:
    """InputError unless ``volume_node`` is a scalar volume with one component per voxel."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume (a vector, tensor or missing volume cannot be propagated)")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):  # its label values are no intensities to follow
        raise InputError(f'"{volume_node.GetName()}" is a label map volume; select the image (scalar volume) the '
                         "segment was drawn on")
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if image is not None and (scalars is None or 0 in image.GetDimensions()):  # (a tensors-only image: no scalars)
        raise InputError(f'volume "{volume_node.GetName()}" has no voxels loaded (its image holds no scalar values)')
    if image is not None and scalars.GetNumberOfTuples() != int(np.prod(image.GetDimensions(), dtype=np.int64)):
        raise InputError(f'volume "{volume_node.GetName()}" is damaged: its voxels ({scalars.GetNumberOfTuples():,}) '
                         f'do not fill its extent ({" x ".join(map(str, image.GetDimensions()))}); load it again')
    if image is not None and image.GetNumberOfScalarComponents() != 1:
        raise InputError(f'volume "{volume_node.GetName()}" has {image.GetNumberOfScalarComponents()} '
                         "components per voxel; convert it to a single-component (scalar) volume first")
    if image is not None and 0 < min(image.GetDimensions()) < 2:  # the engine refuses it (session 30)
        dims = " x ".join(map(str, image.GetDimensions()))
        raise InputError(f'volume "{volume_node.GetName()}" is one voxel thick ({dims} voxels): PAMSegment propagates '
                         "a drawing through the slices of a 3D volume (a set of 2D images is labelled with "
                         "`pamsegment label-images`)")


def volume_array(volume_node) -> tuple[np.ndarray, VolumeGrid]:
    """A copy of the volume's voxels, (k, j, i), in their own type, and its grid. (The engine takes
    float32 slice by slice: a float32 copy of an int16 CT was 2 bytes a voxel more, 6 for uint8.)"""
    slicer = _slicer()
    _check_scalar_volume(volume_node)
    grid = _grid_of(volume_node)
    voxels = slicer.util.arrayFromVolume(volume_node)  # a view of the node's voxels, no copy
    try:
        array = np.array(voxels, copy=True)
    except MemoryError:  # (numpy's _ArrayMemoryError, reported without a word of what to do)
        array = None
    if array is None:  # raised here, not in the except block, which would keep the failed copy's frame
        raise InputError(f'volume "{volume_node.GetName()}" ({" x ".join(map(str, voxels.shape[::-1]))} voxels) '
                         f"could not be copied for the job: its {voxels.nbytes / 2**20:,.0f} MB did not fit in the "
                         "memory free now. Nothing was started; close other programs or data you do not need, or "
                         "crop the volume around the object first (Crop Volume module)")
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f'volume "{volume_node.GetName()}" is not a 3D image (array shape {array.shape})')
    if array.dtype.kind == "f":  # said before the job starts, with what to do in Slicer (the engine said it later)
        bad = sum(int(plane.size - np.count_nonzero(np.isfinite(plane))) for plane in array)
        if bad:
            raise InputError(f'volume "{volume_node.GetName()}" has {bad:,} NaN/inf voxel{"s" if bad != 1 else ""}; '
                             "replace them first (Python console: a = slicer.util.arrayFromVolume(v); "
                             "a[~numpy.isfinite(a)] = 0; slicer.util.arrayFromVolumeModified(v))")
    return array, grid


def _source_representation(segmentation) -> str | None:
    """The segmentation's source (formerly "master") representation name."""
    getter = (getattr(segmentation, "GetSourceRepresentationName", None)
              or getattr(segmentation, "GetMasterRepresentationName", None))
    return getter() if getter is not None else None


def _segment(segmentation_node, segment_id):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("select a segmentation")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise InputError(f'segment "{segment_id}" is not in segmentation "{segmentation_node.GetName()}"; '
                         "select a segment")
    source = _source_representation(segmentation)
    if source is not None and source != _binary_name():
        # A result written as a labelmap would only be a derived copy of the source: lost on saving,
        # and in replace mode it could not be undone. The Segment Editor converts on opening.
        raise InputError(f'segmentation "{segmentation_node.GetName()}" stores its segments as "{source}", '
                         "not as binary labelmaps; open it in the Segment Editor (which offers to convert it) or set "
                         "its source representation to Binary labelmap (Segmentations module), then try again")
    return segment


def segment_mask(segmentation_node, segment_id: str, volume_node, check_memory: str | None = None) -> np.ndarray:
    """The segment as a uint8 0/1 array on the volume's voxel grid, (k, j, i).

    A segment stored on the volume's own voxels (the usual case) is read in place from its layer
    (``_segment_mask_same_voxels``); on any other grid Slicer's export resamples from the
    segmentation's own geometry (and parent transform) to the volume's, so the mask lines up with
    ``volume_array`` whatever resolution the user segmented at (a segment erased to nothing, which
    the export fails on, reads as empty). ``check_memory``: what the read is for, to refuse it
    (``check_read_memory``) where it would not fit in the memory free now (VTK's export then ends
    the whole process).
    """
    slicer = _slicer()
    if check_memory is not None:
        _check_scalar_volume(volume_node)
        check_read_memory(volume_node, check_memory, job=False)
    segment = _segment(segmentation_node, segment_id)
    between = _linear_between(volume_node, segmentation_node)
    if between is not None or (volume_node is not None and
                               volume_node.GetParentTransformNode() is segmentation_node.GetParentTransformNode()):
        # the common case, the segment stored on the volume's own voxels (drawn with the volume as the
        # segmentation's geometry, or a result written there): read in place, without the export
        mask = _segment_mask_same_voxels(segment, volume_node, np.eye(4) if between is None else between)
        if mask is not None:
            return mask
    if between is not None:
        return _segment_mask_linear(segmentation_node, segment, segment_id, volume_node, between)
    try:
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    except (RuntimeError, AttributeError) as exc:
        # a segment erased to nothing: Slicer's export of a layer without a voxel of its label fails on
        # another grid (a finer one after Specify geometry: an AttributeError from the labelmap it left empty)
        if volume_node is not None and _plain_layer(segment.GetRepresentation(_binary_name())) and \
                _own_voxels_box(segment) is None:
            return np.zeros(_grid_of(volume_node).shape, dtype=np.uint8)
        raise InputError(f"could not read the segment on the volume's grid: {exc}") from None
    # (bool and uint8 0/1 share their bytes: no second copy; the array is a view, so write only 0 or 1 into it)
    return np.greater(array, 0).view(np.uint8)


def _linear_between(volume_node, segmentation_node) -> np.ndarray | None:
    """The 4x4 from the volume's coordinates to the segmentation's when both nodes have parent
    transforms, different and both linear; else None. Slicer's export resamples through the general
    transform between two such nodes, which misplaces voxels even where the grids coincide (a
    result written on the volume's voxels read back 98 of 5585 voxels wrong; half a slice of
    translation, a thousand), so ``segment_mask`` reads those exactly itself."""
    if volume_node is None:
        return None
    transforms = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    if None in transforms or transforms[0] is transforms[1]:
        return None
    return _volume_to_segmentation(volume_node, segmentation_node)


def _plain_layer(stored) -> bool:
    """Whether a stored labelmap holds one value per voxel of its extent (as Slicer stores them)."""
    if stored is None or stored.GetPointData().GetScalars() is None or stored.GetNumberOfScalarComponents() != 1:
        return False
    e = stored.GetExtent()
    voxels = max(0, e[1] - e[0] + 1) * max(0, e[3] - e[2] + 1) * max(0, e[5] - e[4] + 1)
    return stored.GetPointData().GetScalars().GetNumberOfTuples() == voxels


def _layer(stored) -> np.ndarray:
    """A stored labelmap's values as a (k, j, i) array over its extent, in place (no copy)."""
    from vtk.util import numpy_support  # noqa: PLC0415

    e = stored.GetExtent()
    return numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)


# how far from whole voxels (in voxels) and from the volume's axes a stored grid may lie and still be
# read as the volume's own voxels (Slicer's export, a nearest-neighbour resample there, picks the same)
_SAME_VOXELS = 1e-3


def _segment_mask_same_voxels(segment, volume_node, between: np.ndarray) -> np.ndarray | None:
    """``segment_mask`` where the segment's stored labelmap lies on the volume's own voxels (the same
    axes and voxel size, its extent anywhere: whole voxels apart), read in place: the segment's label
    in its layer, copied a slice at a time into a volume-sized 0/1 array. None on any other grid.

    Slicer's export gives the same voxels there, but through a temporary labelmap node added to and
    removed from the scene and a resample of the whole volume: 0.2-0.25 s a read at 512 x 512 x
    300 (about five reads a propagation on Slicer's main thread; session 43's probe)."""
    import vtk  # noqa: PLC0415

    stored = segment.GetRepresentation(_binary_name())
    if not _plain_layer(stored):
        return None  # (none, or not a labelmap Slicer stores: the export says what it makes of it)
    matrix = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(matrix)
    grid = _grid_of(volume_node)
    # volume array index (i, j, k) -> the stored labelmap's (i, j, k)
    to_stored = np.linalg.solve(_slicer().util.arrayFromVTKMatrix(matrix), between @ np.asarray(grid.ijk_to_ras, float))
    shift = np.rint(to_stored[:3, 3])
    # the farthest any voxel of the volume lands from a whole voxel of the stored grid (a scale error of 1e-4
    # is half a voxel 5000 voxels on: a review's 6000-voxel axis read one voxel off there)
    reach = np.abs(to_stored[:3, :3] - np.eye(3)) @ (np.array(grid.shape[::-1], float) - 1)
    if not (np.all(np.isfinite(to_stored)) and float(np.max(reach + np.abs(to_stored[:3, 3] - shift))) <= _SAME_VOXELS):
        return None
    e = stored.GetExtent()
    out = np.zeros(grid.shape, dtype=np.uint8)
    # the overlap, in the volume's (k, j, i) indices and the layer's
    lo = [max(0, e[2 * a] - int(shift[a])) for a in range(3)]  # (i, j, k)
    hi = [min(grid.shape[2 - a], e[2 * a + 1] - int(shift[a]) + 1) for a in range(3)]
    if any(h <= l for l, h in zip(lo, hi)) or any(e[2 * a + 1] < e[2 * a] for a in range(3)):
        return out
    layer = _layer(stored)
    at = [lo[a] + int(shift[a]) - e[2 * a] for a in range(3)]  # the overlap's first voxel in the layer
    rows = slice(at[1], at[1] + hi[1] - lo[1])
    columns = slice(at[0], at[0] + hi[0] - lo[0])
    label = segment.GetLabelValue()
    for k in range(lo[2], hi[2]):  # a slice at a time: no boolean copy of a whole (shared, oversampled) layer
        out[k, lo[1]:hi[1], lo[0]:hi[0]] = layer[at[2] + k - lo[2], rows, columns] == label
    return out


def _segment_mask_linear(segmentation_node, segment, segment_id: str, volume_node, between: np.ndarray) -> np.ndarray:
    """``segment_mask`` through a linear map: each volume voxel takes the value of the stored
    labelmap's voxel nearest to it (exact where the grids coincide, as after ``write_segment_mask``),
    slice by slice; the segment's own label value in a shared layer."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    grid = _grid_of(volume_node)
    out = np.zeros(grid.shape, dtype=np.uint8)
    stored = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if stored is None or stored.GetPointData().GetScalars() is None:
        return out
    lo = np.array(stored.GetExtent()[0::2])
    dims = np.array(stored.GetExtent()[1::2]) - lo + 1
    if (dims <= 0).any():
        return out
    values = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
    label = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else 1
    m = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(m)
    # volume (i, j, k) -> stored (i, j, k)
    to_stored = np.linalg.inv(slicer.util.arrayFromVTKMatrix(m)) @ between @ np.asarray(grid.ijk_to_ras, float)
    k_n, j_n, i_n = grid.shape
    jj, ii = np.mgrid[:j_n, :i_n]
    plane = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)]).astype(float)
    for k in range(k_n):
        plane[2] = k
        idx = np.rint((to_stored @ plane)[:3] - 1e-9).astype(np.int64) - lo[:, None]  # ties: the lower voxel
        inside = np.all((idx >= 0) & (idx < dims[:, None]), axis=0)
        hit = np.zeros(ii.size, dtype=bool)
        hit[inside] = values[idx[2, inside], idx[1, inside], idx[0, inside]] == label
        out[k] = hit.reshape(j_n, i_n)
    return out


def _prompt_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """``segment_mask`` of the segment the user drew as the prompt. If nothing of it lands on the
    volume's grid although the segment holds voxels, an InputError says why, rather than the
    engine's "the prompt is empty"."""
    _check_not_half_a_voxel_apart(segmentation_node, segment_id, volume_node)
    mask = segment_mask(segmentation_node, segment_id, volume_node)
    if not mask.any():
        _explain_lost_prompt(segmentation_node, segment_id, volume_node)
    return mask


def _slice_pair(value) -> tuple[int, int]:
    """A job's ``range``: two whole slice numbers, as the engine takes them (3.0 too; 1.5 was cut
    to 1 and "ab" raised ValueError)."""
    from .checks import is_number  # noqa: PLC0415

    try:
        first, last = value
    except (TypeError, ValueError):
        raise InputError(f"range must be two slice numbers (first, last), got {value!r}") from None
    if not all(is_number(v, -math.inf, math.inf, whole=True) for v in (first, last)):
        raise InputError(f"range must be two whole slice numbers (first, last), got {value!r}")
    return int(first), int(last)


def _placement(volume_node, segmentation_node) -> tuple:
    """Where the volume lies against the segmentation: the parent transform nodes' IDs and where
    the volume's corners and centre land in the segmentation's coordinates (through the 4x4
    between them, or the non-linear transform: a warp's own edits, or a move of a transform above
    it, show there; a renamed transform node does not)."""
    transforms = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    grid = _grid_of(volume_node)
    corners = np.array([[i, j, k] for i in (0, grid.shape[2] - 1) for j in (0, grid.shape[1] - 1)
                        for k in (0, grid.shape[0] - 1)] + [[(n - 1) / 2 for n in grid.shape[::-1]]], float)
    points = (np.c_[corners, np.ones(len(corners))] @ np.asarray(grid.ijk_to_ras, float).T)[:, :3]
    between = _volume_to_segmentation(volume_node, segmentation_node)
    if between is not None:
        placed = points @ between[:3, :3].T + between[:3, 3]
    else:
        slicer = _slicer()
        import vtk  # noqa: PLC0415

        warp = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transforms[0], transforms[1], warp)
        placed = np.array([warp.TransformPoint(*map(float, p)) for p in points])
    return tuple(t.GetID() if t is not None else None for t in transforms), placed


def _same_placement(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and bool(np.allclose(a[1], b[1], rtol=0, atol=1e-3))  # mm


def _volume_to_segmentation(volume_node, segmentation_node) -> np.ndarray | None:
    """The 4x4 from the volume node's coordinates to the segmentation node's (identity without
    parent transforms, or with the same one); None when a transform between them is not linear."""
    transforms = volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode()
    if transforms[0] is transforms[1]:
        return np.eye(4)
    if any(t is not None and not t.IsTransformToWorldLinear() for t in transforms):
        return None
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    m = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(transforms[0], transforms[1], m)
    return slicer.util.arrayFromVTKMatrix(m).copy()


def _reference_geometry_matrix(segmentation_node) -> np.ndarray | None:
    """The image-to-world 4x4 of the segmentation's reference image geometry (its own grid, where
    the Segment Editor paints), or None when it has none."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    converter = slicer.vtkSegmentationConverter
    serialized = segmentation_node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName())
    if not serialized:
        return None
    geometry = slicer.vtkOrientedImageData()
    if not converter.DeserializeImageGeometry(serialized, geometry, False):
        return None
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _check_not_half_a_voxel_apart(segmentation_node, segment_id: str, volume_node) -> None:
    """InputError when the segmentation's grid (where the Segment Editor paints and a result is
    written) has the volume's voxel size along an axis but lies half a voxel off it: each voxel of
    one lies halfway between two of the other, and Slicer's nearest-neighbour resampling breaks
    those ties alike (or, by rounding, not even alike) reading and writing, so a written result
    came back moved by a voxel, drawn slices included, and every update moved it again (a review,
    session 30: the drawing's centre 22 -> 21 -> 20 in i)."""
    theirs = _reference_geometry_matrix(segmentation_node)
    between = _volume_to_segmentation(volume_node, segmentation_node)
    if theirs is None or between is None:
        return
    grid = _grid_of(volume_node)
    # volume (i, j, k) -> the segmentation grid's (i, j, k)
    to_theirs = np.linalg.inv(theirs) @ between @ np.asarray(grid.ijk_to_ras, float)
    from .volumes import halfway_axes  # noqa: PLC0415

    halfway = [2 - col for col in halfway_axes(to_theirs[:3, :3], to_theirs[:3, 3])]  # array axes (k, j, i)
    if not halfway:
        return
    names = _plane_names(grid.ijk_to_ras)
    across = " and ".join(f"across its {names[a]} slices" for a in sorted(halfway))
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    raise InputError(
        f'segmentation "{segmentation_node.GetName()}" lies half a voxel off volume "{volume_node.GetName()}" '
        f"({across}), with voxels of the same size: every voxel of one lies halfway between two of the other, so a "
        f'result written into "{segment.GetName() if segment is not None else segment_id}" would come back moved by '
        "one voxel. In the Segment Editor, Specify geometry from this volume, then try again")


def _own_voxel_count(segment) -> int:
    """How many of its own stored voxels the segment holds (``_own_voxels_box``; 0 for none)."""
    found = _own_voxels_box(segment)
    return 0 if found is None else int(np.count_nonzero(found[0]))


def _own_voxels_box(segment):
    """The segment's own stored voxels (those holding its label), read in place (no copy of a
    labelmap that may span the whole, oversampled scan) and cropped to their box: (box (k, j, i),
    the box's first voxel as the labelmap's (i, j, k) index, its image-to-world 4x4), or None when
    it holds none or has no binary labelmap."""
    import vtk  # noqa: PLC0415

    stored = segment.GetRepresentation(_binary_name()) if segment is not None else None
    if stored is None or stored.GetPointData().GetScalars() is None:
        return None
    extent = stored.GetExtent()
    if min(extent[1] - extent[0], extent[3] - extent[2], extent[5] - extent[4]) < 0:
        return None
    layer = _layer(stored)
    # a slice at a time (a boolean of a whole layer shared with other segments on a finer grid was
    # hundreds of MB on every prompt refresh, session 41)
    packed = PackedMask.of(layer, value=segment.GetLabelValue())
    n = int(np.prod(packed.box))
    if not n:
        return None
    box = np.unpackbits(packed.bits, count=n).reshape(packed.box).astype(bool)
    corner = np.array([extent[0] + packed.offset[2], extent[2] + packed.offset[1], extent[4] + packed.offset[0]])
    matrix = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(matrix)
    return box, corner, _slicer().util.arrayFromVTKMatrix(matrix)


def _check_drawing_read_whole(segmentation_node, segment_id: str, volume_node, mask: np.ndarray) -> None:
    """InputError when a part of the segment's drawing on its own, finer grid reaches no voxel of
    the volume (``mask``: what did): a keyframe drawn on a thin slice between the volume's slices
    would be left out without a word, and a replace output would then write over it. A part is a
    26-connected piece of the segment's own voxels of at least 10 voxels and 1 % of them (a stray
    voxel is not worth a refusal). Nothing to check on a grid no finer than the volume's."""
    import cc3d  # noqa: PLC0415

    if not _finer_than_volume(segmentation_node, segment_id, volume_node):
        return
    between = _volume_to_segmentation(volume_node, segmentation_node)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    # read in place, cropped to the segment's own voxels (this runs on every stroke, for the prompt line)
    found = _own_voxels_box(segment) if between is not None else None
    if found is None:
        return
    own, corner, matrix = found
    held = int(np.count_nonzero(own))
    if held < 10:
        return
    # The segment's voxels the volume's read reached: the stored voxel nearest to each voxel of
    # ``mask`` (both neighbours where it lies halfway: which one the resampler took is its choice).
    grid = _grid_of(volume_node)
    to_own = np.linalg.inv(matrix) @ between @ np.asarray(grid.ijk_to_ras, float)
    kji = np.argwhere(mask)
    at = to_own[:3, :3] @ kji[:, ::-1].T.astype(float) + to_own[:3, 3:4]  # (i, j, k) on the segment's grid
    seen = np.zeros(own.shape, dtype=bool)
    for pick in (np.floor(at + 0.5 + 1e-3), np.ceil(at - 0.5 - 1e-3)):
        idx = pick.astype(np.int64) - corner[:, None]
        inside = np.all((idx >= 0) & (idx < np.array(own.shape[::-1])[:, None]), axis=0)
        seen[idx[2, inside], idx[1, inside], idx[0, inside]] = True
    parts, n = cc3d.connected_components(own, connectivity=26, return_N=True)
    size = np.bincount(parts.ravel(), minlength=n + 1)
    reached = np.zeros(n + 1, dtype=bool)
    reached[np.unique(parts[seen & own])] = True
    lost = [p for p in range(1, n + 1) if not reached[p] and size[p] >= max(10, 0.01 * held)]
    if not lost:
        return
    where = np.argwhere(np.isin(parts, lost))  # (k, j, i) in the box
    on_volume = np.linalg.inv(to_own) @ np.c_[where[:, ::-1] + corner, np.ones(len(where))].T  # the volume's (i, j, k)
    # A part lying (even partly) outside the volume is not a prompt on it (e.g. a crop of the scan
    # drawn on): it is kept as it is by the write. Only parts within the volume's box count.
    dims_ijk = np.asarray(grid.shape[::-1], float)[:, None]
    outside = np.any((on_volume[:3] < -0.5) | (on_volume[:3] > dims_ijk - 0.5), axis=0)
    of_part = parts[tuple(where.T)]
    lost = sorted(set(lost) - set(np.unique(of_part[outside]).tolist()))
    if not lost:
        return
    keep = np.isin(of_part, lost)
    on_volume = on_volume[:, keep]
    spans = np.ptp(on_volume[:3], axis=1)
    axis_ijk = int(np.argmin(spans))  # the part is thinnest across the volume's slices along this axis
    at_slice = float(np.median(on_volume[axis_ijk]))
    plane = axis_plane_name(grid.ijk_to_ras, 2 - axis_ijk)
    voxels = int(size[lost].sum())
    near = (f"between {plane} slices {int(np.floor(at_slice))} and {int(np.floor(at_slice)) + 1}"
            if abs(at_slice - round(at_slice)) > 0.05 else f"near {plane} slice {int(round(at_slice))}")
    raise InputError(
        f'segment "{segment.GetName()}": part of its drawing ({voxels} voxels, {near}) lies on thin slices of the '
        "segmentation's grid, which is finer than the volume's, where no voxel of volume "
        f'"{volume_node.GetName()}" reads it: it would be left out (and output replace would write over it). Draw '
        "it on the volume's own slices (in the Segment Editor, Specify geometry from the volume, then draw again), "
        "or erase it, then propagate")


def _own_matrix(segmentation_node, segment_id: str) -> np.ndarray | None:
    """The segment's stored labelmap's image-to-world 3x3 (columns: its i, j, k steps in mm), or None."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    stored = segment.GetRepresentation(_binary_name()) if segment is not None else None
    if stored is None:
        return None
    m = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)[:3, :3]


def _own_voxel_size(segmentation_node, segment_id: str) -> np.ndarray | None:
    """The segment's stored labelmap's voxel size along i, j, k (mm), or None if it has none."""
    matrix = _own_matrix(segmentation_node, segment_id)
    return None if matrix is None else np.linalg.norm(matrix, axis=0)


def _finer_than_volume(segmentation_node, segment_id: str, volume_node) -> bool:
    """Whether the segment's own grid has voxels smaller than the volume's along some axis (some of
    its voxels then lie between the volume's sample points)."""
    own = _own_voxel_size(segmentation_node, segment_id)
    if own is None or volume_node is None:
        return False
    theirs = np.linalg.norm(_grid_of(volume_node).ijk_to_ras[:3, :3], axis=0)
    return bool(np.any(np.sort(own) < np.sort(theirs) * (1 - 1e-6)))  # smallest vs smallest, and so on


def _own_voxels_digest(segmentation_node, segment_id: str) -> str | None:
    """A digest of which voxels of the segment's own stored labelmap hold its label, and where they
    lie (the grid's axes and the box's first voxel in the world), read in place: on a segmentation
    grid finer than the volume an edit on a thin slice between the volume's slices is seen by no
    read on the volume's grid, but changes this (a review, session 31: such a stroke made while
    propagating was written over). Unchanged by a shared layer's extent or another segment's
    voxels. None without a binary labelmap."""
    import hashlib  # noqa: PLC0415

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    stored = segment.GetRepresentation(_binary_name()) if segment is not None else None
    if stored is None:
        return None
    found = _own_voxels_box(segment)
    if found is None:  # none of its own: the grid's axes alone
        import vtk  # noqa: PLC0415

        vtk_matrix = vtk.vtkMatrix4x4()
        stored.GetImageToWorldMatrix(vtk_matrix)
        matrix = _slicer().util.arrayFromVTKMatrix(vtk_matrix)
    else:
        box, corner, matrix = found
    digest = hashlib.sha256()
    # the grid's axes (not its origin: a layer's origin moves by whole voxels when layers are merged);
    # rounded, and + 0.0 so that -0.0 and 0.0 are one value
    digest.update((np.round(matrix[:3, :3], 6) + 0.0).tobytes())
    if found is not None:
        where = np.round(matrix @ np.append(corner, 1.0), 4)[:3] + 0.0  # the box's first voxel in the world (mm)
        digest.update(where.tobytes())
        digest.update(np.asarray(box.shape, np.int64).tobytes())
        digest.update(np.packbits(box).tobytes())
    return digest.hexdigest()


def check_no_unseen_edits(entry: "HistoryEntry", segmentation_node, segment_id: str, volume_node,
                          edited: Sequence[int]) -> None:
    """InputError when the segment's own labelmap changed since the write near volume slices (along
    the propagation axis) that the volume grid shows as unedited: an edit on thin slices of a finer
    segmentation grid, between the volume's slices, which an update would silently write over.
    Needs ``entry.own_after``; without parent transforms (the check maps voxels through the
    segmentation's and volume's own matrices)."""
    unseen = unseen_edit_slices(entry, segmentation_node, segment_id, volume_node, edited)
    if unseen:
        name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        shown = ", ".join(map(str, unseen[:6])) + (" ..." if len(unseen) > 6 else "")
        raise InputError(
            f'"{name}" was edited where the volume\'s voxels do not show it (near volume slice'
            f'{"s" if len(unseen) > 1 else ""} {shown}): the segmentation\'s grid is finer than the volume\'s, and the '
            "update, which reads the segment on the volume's grid, cannot see that edit and would write over it. "
            "Make the edit on the volume's slices and larger than its voxels (or set the segmentation's geometry "
            "from the volume in the Segment Editor), or undo it, then update")


def unseen_edit_slices(entry: "HistoryEntry", segmentation_node, segment_id: str, volume_node,
                       edited: Sequence[int]) -> list[int]:
    """The volume slices (along the propagation axis) near which the segment's own labelmap changed
    since the write while the volume grid shows them unedited (not in ``edited``): see
    ``check_no_unseen_edits``. Empty where it cannot tell (no ``entry.own_after``, transforms)."""
    then = entry.own_after
    if then is None or segmentation_node.GetParentTransformNode() is not None or (
            volume_node is not None and volume_node.GetParentTransformNode() is not None):
        return []
    now = LabelmapSnapshot.take(segmentation_node, segment_id)
    if now is None or not np.allclose(now.image_to_world, then.image_to_world, atol=1e-6):
        return []
    # Compared within the box of the segment's own voxels then and now: a layer shared with other
    # segments spans theirs too (30 segments on a x3 grid: 2.1 GB for a 25 MB volume, session 41).
    now_box, then_box = now.own_box(), then.own_box()
    boxes = [box for box in (now_box, then_box) if box is not None]
    if not boxes:
        return []
    lo = [min(first[a] for first, _ in boxes) for a in range(3)]  # k, j, i
    hi = [max(first[a] + crop.shape[a] for first, crop in boxes) for a in range(3)]

    def placed(box):
        out = np.zeros(tuple(h - l_ for l_, h in zip(lo, hi)), dtype=bool)
        if box is not None:
            first, crop = box
            out[tuple(slice(f - l_, f - l_ + n) for f, l_, n in zip(first, lo, crop.shape))] = crop
        return out

    changed = np.argwhere(placed(now_box) != placed(then_box))  # (k, j, i) within the union box
    if not len(changed):
        return []
    ijk = np.c_[changed[:, 2] + lo[2], changed[:, 1] + lo[1], changed[:, 0] + lo[0], np.ones(len(changed))]
    to_volume = np.linalg.inv(entry.grid.ijk_to_ras) @ now.image_to_world
    coords = (to_volume @ ijk.T)[2 - entry.axis]  # along the propagation axis (array axis 0 is IJK k)
    # A voxel halfway between two of the volume's slices is read by neither when the segmentation is
    # finer along that axis (each volume slice then has a nearer segmentation voxel): never seen.
    # With as coarse a step along it (finer in-plane only), one of the two reads it.
    step = float(np.max(np.abs(to_volume[2 - entry.axis, :3])))  # volume slices per segmentation voxel
    halfway = np.abs(coords - np.floor(coords) - 0.5) < 1e-3
    finer_along = step < 1 - 1e-6
    seen = np.asarray(sorted({int(v) for v in edited}), dtype=int)
    nearest, below = np.rint(coords).astype(int), np.floor(coords).astype(int)
    if finer_along:  # halfway: read by neither neighbour
        missed = np.where(halfway | ~np.isin(nearest, seen), nearest, -1)
    else:  # halfway: one of the two neighbours reads it (which one is the resampler's choice)
        either = np.isin(below, seen) | np.isin(below + 1, seen)
        missed = np.where(halfway, np.where(either, -1, below), np.where(np.isin(nearest, seen), -1, nearest))
    return sorted({int(v) for v in np.unique(missed)} & set(range(entry.grid.shape[entry.axis])))


def _explain_lost_prompt(segmentation_node, segment_id: str, volume_node) -> None:
    """InputError if the segment holds voxels of its own (none reached the volume's grid): drawn on
    a thin slice of a finer segmentation grid, between the volume's slices (the export onto the
    volume is nearest neighbour), or outside the volume. Returns if the segment is empty."""
    from vtk.util import numpy_support  # noqa: PLC0415

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    stored = segment.GetRepresentation(_binary_name())
    if stored is None or stored.GetPointData().GetScalars() is None or stored.IsEmpty():
        return
    held = int(np.count_nonzero(numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()) == segment.GetLabelValue()))
    if not held:
        return
    own = _own_voxel_size(segmentation_node, segment_id)  # voxel size along i, j, k (mm)
    theirs = np.linalg.norm(_grid_of(volume_node).ijk_to_ras[:3, :3], axis=0)
    name, volume = segment.GetName(), volume_node.GetName()
    if np.prod(own) < np.prod(theirs) * (1 - 1e-6):
        sizes = [" x ".join(f"{v:.3g}" for v in size) for size in (own, theirs)]
        raise InputError(
            f'segment "{name}" holds {held} voxels, but none falls on a voxel of volume "{volume}": the segmentation\'s '
            f"grid ({sizes[0]} mm voxels) is finer than the volume's ({sizes[1]} mm), so a drawing on its thin slices "
            f"can lie between the volume's slices (or the segment lies outside the volume). Draw on the volume's own "
            f'slices: in the Segment Editor, set the segmentation\'s geometry from volume "{volume}" (Specify '
            "geometry), then draw again")
    raise InputError(f'segment "{name}" holds {held} voxels, but none lies inside volume "{volume}": draw it on this '
                     "volume, or select the volume it was drawn on")


def axis_plane_name(ijk_to_ras: np.ndarray, axis: int) -> str:
    """Anatomical name of the slices that are perpendicular to array ``axis`` (k, j, i order).

    A slice of constant k is spanned by the i and j directions; it is axial when its normal, the
    k direction, points mostly superior-inferior, and so on. Slices more than ~25 degrees off every
    anatomical plane are "oblique".
    """
    from .volumes import plane_name

    return plane_name(np.asarray(ijk_to_ras, dtype=float)[:3, :3].ravel(), axis)


def _plane_names(ijk_to_ras: np.ndarray) -> list[str]:
    """What the slices perpendicular to each array axis are called, for messages ("axial", ...;
    "oblique (axis 0)" where two axes would share a name)."""
    names = [axis_plane_name(ijk_to_ras, a) for a in range(3)]
    return [f"{n} (axis {a})" if names.count(n) > 1 else n for a, n in enumerate(names)]


def _ijk_to_world(grid: VolumeGrid, volume_node=None) -> np.ndarray:
    """The grid's IJK-to-RAS in the world, through the volume's parent transform when it is linear
    (as the slice views show it); the volume's own matrix otherwise."""
    matrix = np.asarray(grid.ijk_to_ras, dtype=float)
    transform = volume_node.GetParentTransformNode() if volume_node is not None else None
    if transform is None or not transform.IsTransformToWorldLinear():
        return matrix
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return slicer.util.arrayFromVTKMatrix(to_world) @ matrix


def _check_not_painted_across(prompt: np.ndarray, grid: VolumeGrid, axis: int, drawn: list[int],
                              volume_node=None, flat_only: bool = False) -> None:
    """On a volume whose slices are oblique to RAS (its own matrix or a parent transform, by more than
    0.1 degree: a large outline on thin slices crosses several at 0.5 degree), one outline painted in
    Slicer's RAS-aligned slice views crosses several of the volume's slices in bands, each of which
    would be kept as a drawn keyframe (the result's slices cut to slivers): refused, with the view
    setting that avoids it. ``flat_only``: only a drawing flat in a plane of a RAS view
    (``_flat_in_a_view_plane``; for bands over more than half the slices, which a finished structure
    has too)."""
    from .propagate import tilted_drawing  # noqa: PLC0415

    bands = tilted_drawing(prompt, axis, drawn) if _oblique_axis(grid, axis, volume_node) else None
    if bands is not None and (not flat_only or _flat_in_a_view_plane(prompt, _ijk_to_world(grid, volume_node))):
        plane = axis_plane_name(grid.ijk_to_ras, axis)
        raise PaintedAcross(f"it lies on {len(drawn)} adjacent {plane} slices of the volume ({bands[0]}-{bands[1]}) "
                            "whose "
                         "outlines barely overlap: one outline painted in a slice view that is not aligned with this "
                         "oblique volume crosses its slices in bands. Click the slice view's 'Rotate to volume plane' "
                         "(in its pin menu), erase the drawing and draw it again")


def _oblique_axis(grid: VolumeGrid, axis: int, volume_node=None) -> bool:
    """Whether the slices across array ``axis`` are oblique to RAS in the world (by more than 0.1
    degree: a large outline on thin slices crosses several at 0.5 degree)."""
    normal = _ijk_to_world(grid, volume_node)[:3, 2 - int(axis)]
    return float(np.max(np.abs(normal)) / max(float(np.linalg.norm(normal)), 1e-12)) < np.cos(np.radians(0.1))


def _flat_in_a_view_plane(prompt: np.ndarray, ijk_to_world: np.ndarray) -> bool:
    """Whether the drawing is flat in a plane of one of Slicer's RAS-aligned views (axial, coronal or
    sagittal), as one painted outline is: the direction in which its voxels' centres spread least
    (their principal axes, in world mm) lies within 15 degrees of a world axis, they span there at most
    twice a voxel's extent along that axis, and across the plane at least twice as much as through it
    and four of the largest voxel sides. A thin structure crossing the slices (a vessel, finished)
    spreads about as little along two directions, and is no outline (reviews, session 47: vessels
    were told to be erased and drawn again in another view; tests along world axes alone let narrow
    outlines through)."""
    m = np.asarray(ijk_to_world, dtype=float)[:3, :3]
    world = np.argwhere(np.asarray(prompt) != 0)[:, ::-1] @ m.T  # voxel centres (less the origin), mm
    if len(world) < 3:
        return True
    centred = world - world.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending: vectors[:, 0] spreads least
    spans = [float(np.ptp(centred @ vectors[:, n])) for n in range(3)]
    normal = vectors[:, 0]
    w = int(np.argmax(np.abs(normal)))
    # (and across it at least four of the largest voxel sides: a vessel on 3 mm slices tilted 40 degrees spreads
    # in steps of a slice, more than twice its width, yet no wider)
    return (abs(float(normal[w])) >= np.cos(np.radians(15.0)) and spans[0] <= 2.0 * float(np.sum(np.abs(m[w])))
            and spans[1] >= max(2.0 * spans[0], 4.0 * float(np.max(np.linalg.norm(m, axis=0)))))


def _in_segment_words(text: str) -> str:
    """The engine's message about a prompt's label, for a segment (which has a name, not a label
    number): "label 1 is drawn ..." -> "it is drawn ..."."""
    import re  # noqa: PLC0415

    text = re.sub(r"^label \d+ ", "it ", text)
    return text.replace("the prompt is empty: draw the object on one slice (label > 0)",
                        "it is empty: draw the object on one slice")


def _same_kind(exc: InputError, text: str) -> InputError:
    """``exc`` said in other words, of its own kind (a DrawnIn3D keeps where it was drawn)."""
    if isinstance(exc, DrawnIn3D):
        return DrawnIn3D(text, where=exc.where)
    return PaintedAcross(text) if isinstance(exc, PaintedAcross) else InputError(text)


_PARALLEL = float(np.cos(np.radians(1.0)))  # a segmentation grid's axis within 1 degree of the volume's
_THICKER = 1.01  # ... and its voxel more than 1 % longer along it: a grid made on a thicker series


def _drawn_axis_on_own_grid(segmentation_node, segment_id: str, volume_node, grid: VolumeGrid) -> int | None:
    """The volume's array axis the segment is drawn across, told on the segment's own grid where that
    grid is parallel to the volume's and thicker along some axis (a segmentation made on a coarser
    series): there each drawn slice covers several of the volume's, which can make a narrow object
    look thinner across another axis (a fuzz, session 42: keyframes 3 mm apart on a 3 mm grid were
    read as drawn on 5 sagittal slices, and walked along that axis). The one own axis along which
    its slices are drawn apart or two neighbours at most (fewest occupied, where more than one is);
    None otherwise (the engine's choice on the volume's grid stands)."""
    if segmentation_node is None or volume_node is None or segmentation_node.GetParentTransformNode() is not None \
            or volume_node.GetParentTransformNode() is not None:
        return None
    own = _own_matrix(segmentation_node, segment_id)  # (the cheap checks before the segment's voxels are read)
    if own is None:
        return None
    theirs = np.asarray(grid.ijk_to_ras, dtype=np.float64)[:3, :3]
    own_sides, their_sides = np.linalg.norm(own, axis=0), np.linalg.norm(theirs, axis=0)
    cosines = np.abs(own.T @ theirs) / np.outer(own_sides, their_sides)  # own i, j, k x volume i, j, k
    match = np.argmax(cosines, axis=1)
    if sorted(match.tolist()) != [0, 1, 2] or cosines[range(3), match].min() < _PARALLEL \
            or not np.any(own_sides > their_sides[match] * _THICKER):
        return None  # oblique to the volume, or no thicker than it: the volume's grid tells
    found = _own_voxels_box(segmentation_node.GetSegmentation().GetSegment(segment_id))
    if found is None:
        return None
    box = found[0]
    drawn = []  # (occupied own slices, the volume's array axis) of the axes it may be drawn across
    for ax in range(3):  # (box axes k, j, i: own columns 2, 1, 0)
        occupied = np.flatnonzero(np.count_nonzero(box, axis=tuple(a for a in range(3) if a != ax)))
        first, last = _longest_run(occupied)
        if occupied.size and last - first + 1 <= 2:
            drawn.append((int(occupied.size), 2 - int(match[2 - ax])))
    drawn.sort()
    if not drawn or (len(drawn) > 1 and drawn[0][0] == drawn[1][0]):
        return None
    return drawn[0][1]


def _prompt_info(prompt: np.ndarray, grid: VolumeGrid, volume_node=None, axis: int | None = None) -> PromptInfo:
    """Where ``prompt`` is drawn; ``axis``: the axis it is drawn across, when the segment's own grid
    tells it (``_drawn_axis_on_own_grid``): a refusal along it gives way to the engine's own choice."""
    from .propagate import find_prompt_slices  # noqa: PLC0415 - keeps torch out of `import mrml`

    try:
        try:
            axis, slices = find_prompt_slices(prompt, axis=axis, plane_names=_plane_names(grid.ijk_to_ras))
        except InputError:
            if axis is None:
                raise
            axis, slices = find_prompt_slices(prompt, plane_names=_plane_names(grid.ijk_to_ras))
    except InputError as exc:
        if isinstance(exc, DrawnIn3D):  # bands over more than half the slices (15 degrees on a 30-slice CT) were
            # called a 3D mask, with advice to draw on one slice, which the user had done (a trial, session 47)
            # Told apart from a finished structure by being flat in a plane of a RAS view (a finished vessel
            # crossing the slices was told to be erased and drawn again: a review). Bands on fewer slices are
            # refused as before, flat or not: a narrow stroke is as thin as a vessel, and taken as keyframes
            # it would cut the result to slivers (a re-review's sweep: 50 such strokes let through).
            for ax in (a for a in range(3) if _oblique_axis(grid, a, volume_node)):  # (none: no cost)
                occupied = np.flatnonzero(np.any(prompt, axis=tuple(a for a in range(3) if a != ax))).tolist()
                _check_not_painted_across(prompt, grid, ax, occupied, volume_node, flat_only=True)
        raise _same_kind(exc, _in_segment_words(str(exc))) from None
    _check_not_painted_across(prompt, grid, axis, next(iter(slices.values())), volume_node)
    lab = next(iter(slices))
    return PromptInfo(axis=axis, slices=list(slices[lab]), plane=axis_plane_name(grid.ijk_to_ras, axis),
                      n_slices=int(prompt.shape[axis]))


def describe_prompt(volume_node, segmentation_node, segment_id: str) -> PromptInfo:
    """Which slices of the volume the segment is drawn on (for the panel). Raises InputError."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume")
    _check_scalar_volume(volume_node)  # as volume_array will check it on Propagate
    # the segment's read below is, on a grid other than the volume's own voxels, Slicer's export: a volume-sized
    # image made by VTK, which ends the whole process (Slicer and unsaved work) when it cannot allocate it:
    # refused as a propagation is (a trial, session 37)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segmentation_node is not None else None
    check_read_memory(volume_node, f'reading "{segment.GetName() if segment is not None else segment_id}" on '
                                   f'"{volume_node.GetName()}"', job=False)
    grid = _grid_of(volume_node)
    mask = _prompt_mask(segmentation_node, segment_id, volume_node)
    try:
        info = _prompt_info(mask, grid, volume_node, _drawn_axis_on_own_grid(segmentation_node, segment_id,
                                                                            volume_node, grid))
    except InputError as exc:
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        raise InputError(f'segment "{segment.GetName()}": {exc}') from None
    _check_drawing_read_whole(segmentation_node, segment_id, volume_node, mask)  # after the cheap refusals
    return info


# ----------------------------------------------------------------------------------------------
# Writing MRML (main thread)
# ----------------------------------------------------------------------------------------------


def _unique_segment_name(segmentation, base: str) -> str:
    names = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    name, n = f"{base}{PAM_SUFFIX}", 2
    while name in names:
        name, n = f"{base} (PAM {n})", n + 1
    return name


def write_segment_mask(mask: np.ndarray, grid: VolumeGrid, segmentation_node, segment_id: str,
                       volume_node=None) -> None:
    """Replace the segment's content inside the volume's extent by ``mask`` (k, j, i) in one call
    (``result_labelmap``, then ``_write_labelmap``).

    Uses the Segment Editor's own write (``SetBinaryLabelmapToSegment``, replace mode) rather than
    ``slicer.util.updateSegmentBinaryLabelmapFromArray``: the latter places the array on the
    reference volume's grid but ignores the volume's parent transform, whereas the export used to
    read the prompt honours it, so a transformed volume would get its result shifted. Here the
    labelmap is built from the recorded grid and mapped through the transform between the volume
    and the segmentation. Other segments keep their voxels (Slicer moves an overlapping segment to
    its own layer rather than overwriting), and nothing outside the volume's extent changes. The
    segment is stored on the segmentation's own grid (its reference geometry) when that differs from
    the volume's, as the Segment Editor's effects store it.
    """
    _write_labelmap(result_labelmap(mask, grid, segmentation_node, segment_id, volume_node), segmentation_node,
                    segment_id)


def result_labelmap(mask: np.ndarray, grid: VolumeGrid, segmentation_node, segment_id: str | None, volume_node=None,
                    check_memory: str | None = None):
    """The labelmap ``write_segment_mask`` hands to Slicer's replace write: ``mask`` (k, j, i) on the
    segmentation's coordinates and grid, widened to keep what segment ``segment_id`` (None: a segment
    not added yet, which holds nothing) holds outside the volume. Changes nothing in the scene, so a
    job's ``apply`` makes it before anything is changed. ``check_memory``: what the write is for, to
    refuse it (``NotEnoughMemory``) where the labelmap on a finer segmentation grid would not fit in
    the memory free now (``check_write_memory``)."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415
    from vtk.util import numpy_support  # noqa: PLC0415

    mask = np.asarray(mask)
    if tuple(mask.shape) != tuple(grid.shape):
        raise InputError(f"result shape {mask.shape} does not match the volume's grid {grid.shape}")
    k, j, i = mask.shape
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(i, j, k)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    # 0/1 straight into the labelmap's voxels (x fastest = C order), no copy of the mask between
    np.greater(mask, 0, out=numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(k, j, i)
               .view(bool))
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(grid.ijk_to_ras))

    volume_transform = volume_node.GetParentTransformNode() if volume_node is not None else None
    segmentation_transform = segmentation_node.GetParentTransformNode()
    if volume_transform is not segmentation_transform:
        if all(t is None or t.IsTransformToWorldLinear() for t in (volume_transform, segmentation_transform)):
            # Linear: the labelmap's own matrix moves, no voxel is resampled. (Resampling through the
            # general transform between two transformed nodes misplaced voxels: the pair is not seen
            # as linear, so the labelmap was resampled onto its original axes.)
            labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(
                _volume_to_segmentation(volume_node, segmentation_node) @ np.asarray(grid.ijk_to_ras, dtype=float)))
        else:
            to_segmentation = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_transform, segmentation_transform,
                                                                 to_segmentation)
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, to_segmentation)

    # (a copy of its layer: made once per write)
    own = _segment_own_voxels(segmentation_node, segment_id) if segment_id is not None else None
    labelmap = _on_segmentation_grid(labelmap, segmentation_node, own, check_memory)
    return _with_segment_outside(labelmap, own)


def _write_labelmap(labelmap, segmentation_node, segment_id: str) -> None:
    """Slicer's replace write of ``labelmap`` (``result_labelmap``) into the segment: one change."""
    slicer = _slicer()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            labelmap.GetExtent()):
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        raise PAMError(f'Slicer could not write the result into segment '
                       f'"{segment.GetName() if segment is not None else segment_id}"')


def _on_segmentation_grid(labelmap, segmentation_node, own=None, check_memory: str | None = None):
    """``labelmap`` resampled (nearest neighbour) onto the segmentation's own grid (its reference
    image geometry, where the Segment Editor paints) when that grid is not the volume's: stored on
    the volume's grid, the segment would be resampled as a whole by the next editor stroke, and
    every slice would then look edited to *Update from my edits*. Unchanged when the grids match.
    ``own``: the segment's own voxels (``_segment_own_voxels``), or None. ``check_memory``: what the
    write is for, to refuse it (``check_write_memory``) before anything is resampled."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    b = _reference_geometry_matrix(segmentation_node)
    if b is None:
        return labelmap
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    a = slicer.util.arrayFromVTKMatrix(matrix)
    if np.allclose(a[:3, :3], b[:3, :3], atol=1e-6):
        # Same axes and voxel size: the grids coincide if the origins differ by whole voxels.
        offset = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])
        if np.allclose(offset, np.round(offset), atol=1e-4):
            return labelmap
    # Only the result's footprint on that grid: the reference geometry usually spans the whole scan,
    # and a result padded to it would replace the segment everywhere outside a cropped volume.
    to_theirs = np.linalg.inv(b) @ a
    footprint = slicer.vtkOrientedImageData()
    footprint.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(b))
    # And within it only the box that holds the result or the segment's voxels: elsewhere both are
    # empty and the write changes nothing. The whole footprint cost the volume's voxels times the
    # oversampling factor cubed: x3 on a 512 x 512 x 200 CT, 13 s and 2.5 GB on the GUI thread for
    # a small result (1.4 G voxels; under a memory limit Slicer aborted; session 39).
    footprint.SetExtent(*_written_extent(labelmap, to_theirs, b, own))
    # Each axis of one grid along an axis of the other: the box is the footprint. Otherwise
    # (rotated grids) the box's corners lie outside the volume and keep what the segment holds.
    axis_aligned = bool(((np.abs(to_theirs[:3, :3]) > 1e-6).sum(axis=1) == 1).all())
    if check_memory is not None:
        check_write_memory(footprint.GetDimensions(), labelmap.GetDimensions(), axis_aligned,
                           abs(np.linalg.det(a[:3, :3]) / np.linalg.det(b[:3, :3])) ** (1 / 3), check_memory)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, footprint, resampled, False, False)
    if own is not None and not axis_aligned:
        _keep_segment_outside_footprint(resampled, labelmap, own)
    return resampled


def _written_extent(labelmap, to_theirs: np.ndarray, b: np.ndarray, own) -> tuple[int, ...]:
    """The extent, on the segmentation's grid (image-to-world ``b``), that the result ``labelmap``
    (``to_theirs``: its ijk to that grid's) is written into: its footprint there, cut to the box
    around the result's voxels and the segment's own (``own``: ``_segment_own_voxels``; a voxel of
    neither is 0 before and after)."""
    import vtk  # noqa: PLC0415

    full = _footprint_extent(labelmap.GetExtent(), to_theirs)
    boxes = []
    result = _content_extent(labelmap)
    if result is not None:
        boxes.append(_footprint_extent(result, to_theirs))
    held = _content_extent(own) if own is not None else None
    if held is not None:
        matrix = vtk.vtkMatrix4x4()
        own.GetImageToWorldMatrix(matrix)
        boxes.append(_footprint_extent(held, np.linalg.inv(b) @ _slicer().util.arrayFromVTKMatrix(matrix)))
    if not boxes:
        return tuple(v for a in range(3) for v in (full[2 * a], full[2 * a]))  # nothing to write: one voxel
    lo = [max(full[2 * a], min(box[2 * a] for box in boxes)) for a in range(3)]
    hi = [min(full[2 * a + 1], max(box[2 * a + 1] for box in boxes)) for a in range(3)]
    if any(h < low for low, h in zip(lo, hi)):  # the segment's voxels all outside the volume, no result
        return tuple(v for a in range(3) for v in (full[2 * a], full[2 * a]))
    return tuple(v for a in range(3) for v in (lo[a], hi[a]))


def _content_extent(image) -> tuple[int, ...] | None:
    """The VTK extent of the box around ``image``'s non-zero voxels; None when it has none."""
    e = image.GetExtent()
    if image.GetPointData().GetScalars() is None or any(e[2 * a + 1] < e[2 * a] for a in range(3)):
        return None
    voxels = _layer(image)
    ks = np.flatnonzero(voxels.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    part = voxels[ks[0]:ks[-1] + 1]
    js = np.flatnonzero(part.any(axis=(0, 2)))
    is_ = np.flatnonzero(part[:, js[0]:js[-1] + 1].any(axis=(0, 1)))
    return (e[0] + int(is_[0]), e[0] + int(is_[-1]), e[2] + int(js[0]), e[2] + int(js[-1]),
            e[4] + int(ks[0]), e[4] + int(ks[-1]))


def _keep_segment_outside_footprint(resampled, labelmap, own) -> None:
    """On a grid rotated against the volume's, the box around the volume's footprint also holds
    voxels outside the volume: there ``resampled`` (the result) takes what the segment holds
    (``own``: ``_segment_own_voxels``), so the replace write leaves it unchanged outside the volume."""
    slicer = _slicer()
    from vtk.util import numpy_support  # noqa: PLC0415

    resample = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage
    ones = slicer.vtkOrientedImageData()
    ones.DeepCopy(labelmap)  # the volume's footprint: 1 wherever the result has a voxel
    numpy_support.vtk_to_numpy(ones.GetPointData().GetScalars())[:] = 1
    inside_image = slicer.vtkOrientedImageData()
    resample(ones, resampled, inside_image, False, False)
    inside = numpy_support.vtk_to_numpy(inside_image.GetPointData().GetScalars()) > 0
    if inside.all():
        return
    current = slicer.vtkOrientedImageData()
    resample(own, resampled, current, False, False)
    out = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    out[~inside] = numpy_support.vtk_to_numpy(current.GetPointData().GetScalars())[~inside]
    resampled.Modified()


def _footprint_extent(extent, to_target: np.ndarray) -> tuple[int, ...]:
    """The extent, on a target grid, of the voxels whose centres lie within the box the voxels of
    ``extent`` cover (their centres +- half a voxel); ``to_target`` maps source to target ijk."""
    lo = np.array(extent[0::2], float) - 0.5
    hi = np.array(extent[1::2], float) + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]).T
    ijk = (to_target @ corners)[:3]
    first = np.ceil(ijk.min(axis=1) - 1e-4).astype(int)
    last = np.floor(ijk.max(axis=1) + 1e-4).astype(int)
    last = np.maximum(last, first)  # at least one voxel per axis
    return tuple(int(v) for pair in zip(first, last) for v in pair)


def _segment_own_voxels(segmentation_node, segment_id: str):
    """A copy of the segment's stored labelmap (extent and geometry) holding 1 on its own voxels and
    0 elsewhere (a layer may be shared with other segments); None when it stores none."""
    from vtk.util import numpy_support  # noqa: PLC0415

    import vtk  # noqa: PLC0415

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    stored = segment.GetRepresentation(_binary_name()) if segment is not None else None
    if stored is None or stored.GetPointData().GetScalars() is None or stored.IsEmpty():
        return None
    # Only the box of the layer's non-zero voxels: after Specify geometry a layer can span the whole
    # finer grid (a one-slice drawing on 256 x 256 x 200 at x3: 354 M voxels copied before the write's
    # memory check; a re-review, session 40), with a voxel of the layer's zeros around it where the
    # layer has them: a nearest-neighbour resample of this copy that falls exactly half-way past its
    # edge (a layer on a grid half a voxel off, or twice as fine) took the edge's 1 instead of the 0 beyond
    # it, and a replace write added a column of voxels outside the volume (a second re-review).
    e = stored.GetExtent()
    layer = _layer(stored)
    # (the box of its own voxels, not of the layer's: in a layer shared with other segments that is
    # theirs too, 198 MB copied for a one-slice segment among 30 on a x3 grid, session 41)
    packed = PackedMask.of(layer, value=segment.GetLabelValue())
    if not int(np.prod(packed.box)):
        return None
    (k0, j0, i0), (nk, nj, ni) = packed.offset, packed.box
    box = (e[0] + i0, e[0] + i0 + ni - 1, e[2] + j0, e[2] + j0 + nj - 1, e[4] + k0, e[4] + k0 + nk - 1)
    box = tuple(max(box[a] - 1, e[a]) if a % 2 == 0 else min(box[a] + 1, e[a]) for a in range(6))
    own = _slicer().vtkOrientedImageData()
    own.SetExtent(*box)
    own.AllocateScalars(stored.GetScalarType(), 1)
    matrix = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(matrix)
    own.SetImageToWorldMatrix(matrix)
    voxels = numpy_support.vtk_to_numpy(own.GetPointData().GetScalars()).reshape(
        box[5] - box[4] + 1, box[3] - box[2] + 1, box[1] - box[0] + 1)
    label = segment.GetLabelValue()
    for k in range(voxels.shape[0]):  # a slice at a time: no boolean copy of a whole layer
        voxels[k] = layer[box[4] - e[4] + k, box[2] - e[2]:box[3] - e[2] + 1, box[0] - e[0]:box[1] - e[0] + 1] == label
    return own


def _with_segment_outside(labelmap, own):
    """``labelmap`` (the result on the volume's grid, in the segmentation's coordinates), widened to
    keep the segment's own voxels (``own``: ``_segment_own_voxels``, or None) that lie outside it:
    Slicer's replace write replaces the whole segment, so without this a propagation on a cropped
    volume would erase the rest of the segment. Returns ``labelmap`` itself when the segment has
    nothing outside it."""
    slicer = _slicer()
    from vtk.util import numpy_support  # noqa: PLC0415

    held = _content_extent(own) if own is not None else None
    if held is None:
        return labelmap
    if _content_inside(own, held, labelmap):
        return labelmap  # the usual case, decided without resampling the whole segment
    widened = slicer.vtkOrientedImageData()
    # Nearest neighbour onto the result's grid, padded to the segment's whole extent.
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(own, labelmap, widened, False, True)
    e, w = labelmap.GetExtent(), widened.GetExtent()
    if all(w[2 * a] >= e[2 * a] and w[2 * a + 1] <= e[2 * a + 1] for a in range(3)):
        return labelmap  # nothing of the segment lies outside the result's extent
    if not all(w[2 * a] <= e[2 * a] and w[2 * a + 1] >= e[2 * a + 1] for a in range(3)):
        raise PAMError("could not combine the result with the rest of the segment; nothing was changed")
    dims = widened.GetDimensions()
    out = numpy_support.vtk_to_numpy(widened.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    inside = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    out[e[4] - w[4]:e[5] - w[4] + 1, e[2] - w[2]:e[3] - w[2] + 1, e[0] - w[0]:e[1] - w[0] + 1] = inside
    widened.Modified()
    return widened


def _content_inside(image, held: tuple[int, ...], labelmap) -> bool:
    """Whether the non-zero voxels of oriented ``image`` (``held``: their index box, from
    ``_content_extent``) all lie within ``labelmap``'s extent (the box's corners mapped through both
    image-to-world matrices)."""
    slicer = _slicer()
    import vtk  # noqa: PLC0415

    corners = np.array([[i, j, k, 1.0] for i in held[0:2] for j in held[2:4] for k in held[4:6]]).T
    m_image, m_labelmap = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m_image)
    labelmap.GetImageToWorldMatrix(m_labelmap)
    to_labelmap = np.linalg.inv(slicer.util.arrayFromVTKMatrix(m_labelmap)) @ slicer.util.arrayFromVTKMatrix(m_image)
    ijk = (to_labelmap @ corners)[:3]
    e = labelmap.GetExtent()
    return all(ijk[a].min() >= e[2 * a] - 0.5 and ijk[a].max() <= e[2 * a + 1] + 0.5 for a in range(3))


def _add_result_segment(segmentation_node, source_segment_id: str) -> str:
    """A new empty segment "<name> (PAM)" with the source segment's colour and terminology."""
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSegment(source_segment_id)
    segment = slicer.vtkSegment()
    segment.DeepCopyMetadata(source)  # colour, terminology tags
    _clear_run_tags(segment)  # not the source's result: a run tags it when it is remembered
    _set_segment_tag(segment, SOURCE_TAG, source_segment_id)  # (Propagate all drawn does not propagate it twice)
    segment.SetName(_unique_segment_name(segmentation, source.GetName()))
    segment.SetColor(source.GetColor())
    new_id = segmentation.GenerateUniqueSegmentID(source_segment_id + "_PAM")
    if not segmentation.AddSegment(segment, new_id):
        raise PAMError("Slicer could not add the result segment")
    return new_id


# ----------------------------------------------------------------------------------------------
# The engine call (worker thread) - tests replace these two functions
# ----------------------------------------------------------------------------------------------


def _memory_failure(exc: BaseException, device: str) -> str:
    """What the panel says when a job ran out of memory: what ran out and what to do."""
    detail = " ".join(str(exc).split())[:120]
    gpu = device != "cpu" and any(t in detail.lower() for t in ("cuda", "gpu", "mps"))
    where = "memory on the GPU" if gpu else "memory"
    advice = ("choose device cpu, or crop the volume (Crop Volume module)" if gpu else
              "close other programs or remove data from the scene you no longer need, or crop the volume (Crop "
              "Volume module) to the structure's region")
    return f"not enough {where} for the job ({detail or type(exc).__name__}); {advice}"  # (the panel: nothing changed)


def _load_model(checkpoint, device: str):
    from .checkpoints import load_model  # noqa: PLC0415

    return load_model(checkpoint, device=device)


def _with_intensity_gate(model, gate: bool | None):
    """PAM's network with the drift test switched on or off for this job (None: the checkpoint's
    setting). The loaded model itself is left as it is (the Logic caches it across jobs); other
    predictors (the classical trackers, which always test drift) are returned unchanged."""
    if gate is not None and getattr(model, "runs_remotely", False) is True:  # a server: set for the job there
        import copy

        remote = copy.copy(model)
        remote.intensity_gate = "on" if gate else "off"
        remote.gate_required = False  # an older server keeps its own setting (the checkbox is always sent)
        return remote
    if gate is None or not hasattr(model, "inference") or not hasattr(model, "network"):
        return model
    from .pam_predictor import PAMPredictor  # noqa: PLC0415

    inf = model.inference
    reference = inf.intensity_gate_reference if inf.intensity_gate else "guide"
    return PAMPredictor(model, intensity_gate=gate, gate_reference=reference)


def _run_engine(image, prompt, spacing, *, model, device, range, progress, cancel,  # noqa: A002
                batch_size=16, threads=None, axis=None, previous=None, empty_slices=None):
    """Run PAMSegmentLib.propagate. Runs on the worker thread: arrays in, result out, no MRML.

    ``axis``, ``previous`` and ``empty_slices`` are given by an update (``SegmentUpdate``): the
    axis of the first propagation, its result (so the engine recomputes only what the new
    keyframes change) and the slices the user erased (walls the object does not cross)."""
    from .propagate import propagate  # noqa: PLC0415

    # a RemoteModel's server does the work (propagate checks the inputs here first)
    return propagate(image, prompt, spacing, model, range=range, device=device, progress=progress, cancel=cancel,
                     batch_size=batch_size, threads=threads, axis=axis, previous=previous,
                     empty_slices=empty_slices)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


# What a job needs from the moment it is checked (holding its copy of the volume and the prompt)
# to its peak, measured on the slicer-core scene (session 34; the process's peak reset once, before
# the job): 512 x 512 int16, one drawn slice, the classical methods 132-135 MB for 100 slices
# (a small and a large object), 307 / 457 MB for 200 / 300 slices of a large object (`track`
# 310); the network 472 MB for 100 slices and 677 MB for 200 when the job loads torch, 290 / 549 MB
# when it is loaded already; two drawn slices 80 apart 567 MB (100 slices). The estimate below is
# 4-24 % above these for 200 slices or more and up to 60 % above on small volumes (by tens of MB).
JOB_FIXED_BYTES = {"classical": 50 * 2**20, "network": 150 * 2**20, "network and torch": 300 * 2**20}
JOB_BYTES_PER_VOXEL = {"classical": 6, "network": 8}  # the prompt, the walks' masks, the result, the write
# a voxel of the largest gap between two neighbouring drawn slices, where both walks' float32
# probabilities are held until fused (a large object drawn at 10 % and 90 % of 200 slices: the
# classical methods 2 bytes measured, whose untouched zero pages outside a small object cost none)
JOB_GAP_BYTES_PER_VOXEL = {"classical": 3, "network": 8}
# A network of the official preset's size (32.5 M parameters, 224 px, batches of 16) holds about
# 0.8 GB more than the shipped one (the benchmark's network part: 1.2-1.3 GB peak against 0.5 GB).
LARGE_NETWORK_BYTES = 800 * 2**20
LARGE_NETWORK_PARAMETERS = 10_000_000
LARGE_CHECKPOINT_FILE_BYTES = 50 * 2**20  # a checkpoint not loaded yet: 130 MB official, 8 MB shipped


def _network_of(model, checkpoint=None) -> str | None:
    """Which network a job with ``model`` runs in this process: "small", "large" (the official
    preset's size) or None (a classical method, a server, a stand-in without a network)."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if model is None:  # loaded by the job: ``checkpoint``, or the default weights ($PAMSEGMENT_MODEL or shipped)
        if checkpoint in (None, ""):
            checkpoint = os.environ.get("PAMSEGMENT_MODEL") or None  # (as checkpoints.default_checkpoint_path)
        try:
            size = os.path.getsize(checkpoint) if checkpoint is not None else 0
        except (OSError, TypeError, ValueError):
            size = 0
        return "large" if size > LARGE_CHECKPOINT_FILE_BYTES else "small"
    if "torch" not in sys.modules:
        return None  # (a network model cannot exist without torch)
    from .checkpoints import PAMModel  # noqa: PLC0415
    from .pam_predictor import PAMPredictor  # noqa: PLC0415

    net = model.model if isinstance(model, PAMPredictor) else model
    if not isinstance(net, PAMModel):
        return None
    parameters = sum(int(p.numel()) for p in net.network.parameters())
    return "large" if parameters > LARGE_NETWORK_PARAMETERS else "small"


def job_memory_bytes(shape, axis: int, slices, network: str | None, torch_loaded: bool = True) -> int:
    """The memory a job needs from the moment it is checked to its peak: ``JOB_FIXED_BYTES`` (+
    ``LARGE_NETWORK_BYTES`` for a "large" ``network``) + ``JOB_BYTES_PER_VOXEL`` bytes a voxel +
    ``JOB_GAP_BYTES_PER_VOXEL`` (3, 8 with the network) a voxel of the largest gap between two
    neighbouring drawn ``slices`` (both walks' probabilities until they are fused). ``network``:
    None, "small" or "large" (``_network_of``)."""
    fixed, per_voxel = _job_memory_parts(shape, axis, slices, network, torch_loaded)
    return fixed + int(math.prod(int(n) for n in shape) * per_voxel)


def _job_memory_parts(shape, axis: int, slices, network: str | None, torch_loaded: bool,
                      remote_copy: int = 0) -> tuple[int, float]:
    if network not in (None, "small", "large"):
        raise ValueError(f'network must be None, "small" or "large", got {network!r}')
    kind = "classical" if network is None else "network"
    fixed = JOB_FIXED_BYTES[kind if network is None or torch_loaded else "network and torch"]
    fixed += LARGE_NETWORK_BYTES if network == "large" else 0
    gap = largest_gap([[int(s) for s in slices]])
    between = JOB_GAP_BYTES_PER_VOXEL[kind] * max(gap, 0) / max(int(shape[axis]), 1)
    return fixed, JOB_BYTES_PER_VOXEL[kind] + remote_copy + between


def _memory_free_now() -> int | None:
    """What this process can still take (``volumes.memory_room``); None where the system does not say."""
    from .volumes import memory_room  # noqa: PLC0415

    return memory_room()


# Beside the copy of the volume, what taking the segment out of the scene holds at its peak: the
# export's two int16 images at once (then its 0/1 mask); measured under ``ulimit -v`` (session 35):
# 512 x 512 x 200 int16 needed 332 MiB, 512 x 512 x 400 632 MiB (the volume's 2 bytes + these).
READ_BYTES_PER_VOXEL = 4
READ_FIXED_BYTES = 48 * 2**20


def check_read_memory(volume_node, what: str, job: bool = True) -> None:
    """Refuse (``NotEnoughMemory``) a job when the copies it takes out of the scene before its own
    check (``check_job_memory``) do not fit in what is free: the volume's copy and the segment's
    export (``READ_BYTES_PER_VOXEL`` a voxel beside the volume's own size, + ``READ_FIXED_BYTES``).
    The export runs in VTK, which ends the whole process on an allocation that fails
    (``std::bad_alloc``: Slicer gone, unsaved work and all; a review, session 35, under ``ulimit
    -v``). An update's prompt and earlier result are made after the export's images are let go.
    ``job`` False: a read of the segment alone (the panel's prompt line, its edit checks), which
    copies no volume and has nothing to run anyway."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        return
    voxels = int(np.prod([max(int(n), 0) for n in image.GetDimensions()], dtype=np.int64))
    need = READ_FIXED_BYTES + voxels * ((int(image.GetScalarSize()) if job else 0) + READ_BYTES_PER_VOXEL)
    free = _memory_free_now()
    if free is None or need <= free:
        return
    from .volumes import _mb_or_gb  # noqa: PLC0415

    refusal = _not_enough_memory(what, image.GetDimensions(), f"{_mb_or_gb(need)} just to copy the "
                                 f"{'volume and the ' if job else ''}segment out of the scene", free,
                                 "crop the volume around the object first (Crop Volume module)" if job else
                                 "save your work and restart Slicer")
    raise refusal if job else NotEnoughMemory(refusal.reason + ".", reason=refusal.reason + ".")


# Writing a result onto a segmentation grid that is not the volume's (Segment Editor > Specify
# geometry) holds, a voxel of the box written on that grid: the resampled result and Slicer's
# replace write into the segment's layer, 3.4-3.6 bytes measured on slicer-core at oversampling 2,
# 3 and 4 (boxes of 9-74 M voxels; session 40); on a grid rotated against the volume's, two more
# 1-byte images of the box and a 1-byte copy of the result on the volume's grid (the footprint test).
WRITE_BYTES_PER_VOXEL = 4
WRITE_ROTATED_BYTES_PER_VOXEL = 6


def check_write_memory(box_ijk, volume_ijk, axis_aligned: bool, finer: float, what: str) -> None:
    """Refuse (``NotEnoughMemory``) writing a result whose labelmap on the segmentation's grid (the
    box ``box_ijk`` voxels there; ``volume_ijk`` the result's dimensions on the volume's grid,
    ``finer`` how many times as fine the segmentation's voxels are along an axis) would not fit in the
    memory free now: VTK ends the whole process on an allocation that fails (std::bad_alloc; a
    whole-volume result at oversampling 4 needs some 256 bytes a volume voxel). Nothing is changed
    before this check. ``what``: what the write is for."""
    box = math.prod(int(n) for n in box_ijk)
    need = box * (WRITE_BYTES_PER_VOXEL if axis_aligned else WRITE_ROTATED_BYTES_PER_VOXEL)
    need += 0 if axis_aligned else math.prod(int(n) for n in volume_ijk)
    free = _memory_free_now()
    if free is None or need <= free:
        return
    from .volumes import _mb_or_gb  # noqa: PLC0415

    grid = (f"{finer:.2g} times as fine as the volume's along each axis" if finer > 1.01 else
            "not the volume's grid")
    text = (f"{what}: the result on the segmentation's own grid ({grid}: Segment Editor > Specify geometry) is "
            f"{' x '.join(str(int(n)) for n in box_ijk)} voxels and needs about {_mb_or_gb(need)} to write, and about "
            f"{_mb_or_gb(free)} is free now, so the system could stop Slicer, unsaved work and all. Nothing was "
            "changed. Save your work, close other programs or data you do not need, or lower the segmentation's "
            "oversampling (Specify geometry) and propagate again")
    raise NotEnoughMemory(f"{text}; to write it anyway, pass memory_check=False to apply() (memoryCheck=False to the "
                          "module Logic's finishPropagation or process)", reason=text)


def _not_enough_memory(what: str, size_ijk, needs: str, free: int, advice: str) -> NotEnoughMemory:
    """The refusal of a job short of memory (``check_read_memory``, ``check_job_memory``): ``needs``
    what it needs, ``advice`` what to do beside closing other programs."""
    from .volumes import _mb_or_gb  # noqa: PLC0415

    text = (f"{what} ({' x '.join(str(int(n)) for n in size_ijk)} voxels) needs about {needs} and about "
            f"{_mb_or_gb(free)} is free now, so the system could stop Slicer, unsaved work and all. Close other "
            f"programs or data you do not need, or {advice}")
    return NotEnoughMemory(f"{text}. Nothing was started; to run it anyway, pass memory_check=False "
                           "(memoryCheck=False to the module's Logic)", reason=text)


def check_job_memory(image: np.ndarray, axis: int, slices, model, what: str, checkpoint=None) -> None:
    """Refuse (``NotEnoughMemory``) a job whose estimated peak (``job_memory_bytes``) is more than
    the memory free now: Slicer holds the user's unsaved work, and a run that runs the machine out
    of memory can end with the system stopping Slicer without a word. (A GPU's host-side memory is
    not counted.)"""
    import sys  # noqa: PLC0415

    network, torch_loaded = _network_of(model, checkpoint), "torch" in sys.modules
    # a server job sends a float volume of more than 4 bytes a voxel as float32 (remote._compact)
    remote_copy = 4 if getattr(model, "runs_remotely", False) and image.dtype.itemsize > 4 else 0
    fixed, per_voxel = _job_memory_parts(image.shape, axis, slices, network, torch_loaded, remote_copy)
    need = fixed + int(image.size * per_voxel)  # (job_memory_bytes, from the parts the advice below needs)
    free = _memory_free_now()
    if free is None or need <= free:
        return
    from .volumes import _mb_or_gb  # noqa: PLC0415

    # a cropped volume's job: its copy (held now, freed by this refusal) and its share of the rest
    fits = (free + image.nbytes - fixed) / (per_voxel + image.itemsize)
    advice = (f"crop the volume around the object first (Crop Volume module: about {fits / 1e6:,.1f} million voxels "
              "fit now)" if fits >= 1e6 else "free memory first: too little is free now for a volume of any size")
    # (raised unnamed: a local holding it made a cycle through this frame, which kept the refused
    # job's copy of the volume until the next garbage collection)
    raise _not_enough_memory(what, image.shape[::-1], f"{_mb_or_gb(need)} more memory at its peak", free, advice)


class SegmentPropagation:
    """One propagation of one segment, run in the background.

    Construct on the main thread (copies everything out of MRML and validates the prompt; raises
    InputError for an empty or 3D segment), ``start()`` the worker, poll ``state``, ``progress``,
    ``message``, ``eta_seconds`` (e.g. from a QTimer), then ``apply()`` on the main thread once
    ``state == "finished"``. ``cancel()`` may be called from any thread at any time.

    Options: ``mode`` "replace" (the prompt segment becomes 3D) or "new" (a new segment
    "<name> (PAM)" with the same colour, the original untouched); ``checkpoint`` a file path or None
    for the shipped default weights; ``model`` an already loaded model (then ``checkpoint`` is not
    read); ``device``; ``range`` (first, last) slice along the propagation axis; ``threads`` torch
    CPU threads (None: torch's default; Slicer leaves one core to its GUI); ``cancel`` a CancelToken
    to share; ``progress`` an extra ``progress(fraction, message)`` listener (called on the worker);
    ``intensity_gate`` True/False switches PAM's drift test on/off for this job (None: the
    checkpoint's setting). ``memory_check`` False skips the refusal (``NotEnoughMemory``, an
    InputError) of a job whose estimated peak memory (``job_memory_bytes``) is more than is free.
    """

    def __init__(self, volume_node, segmentation_node, segment_id: str, *, mode: str = "replace",
                 checkpoint=None, device: str = "cpu", range=None, model=None,  # noqa: A002
                 batch_size: int = 16, threads: int | None = None, cancel=None, progress=None,
                 intensity_gate: bool | None = None, memory_check: bool = True):
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        segment = _segment(segmentation_node, segment_id)
        check_flag("memory_check", memory_check)
        _check_scalar_volume(volume_node)
        # said before the memory check ("Run it anyway?", then "empty"), and run anyway too (where the engine's
        # "the prompt is empty" came back as a plain InputError: Propagate all drawn called it not propagated)
        if _own_voxels_box(segment) is None:
            raise EmptySegment(f'segment "{segment.GetName()}" on volume "{volume_node.GetName()}": it is empty: '
                               "draw the object on one slice and try again")
        if memory_check:
            check_read_memory(volume_node, f'propagating "{segment.GetName()}" on "{volume_node.GetName()}"')
        grid = _grid_of(volume_node)
        # The volume's copy after the drawing's checks: a drawing refused (a finished 3D segment "Propagate all
        # drawn" passes over) copies none (0.04 s and 150 MB at 512 x 512 x 300 int16). Run anyway (no memory
        # check): first, as before, so that a copy which does not fit is said in words (the segment's read
        # through Slicer's export, on another grid, ends the whole process where VTK cannot allocate: a review)
        copied = volume_array(volume_node) if not memory_check else None
        self.prompt = _prompt_mask(segmentation_node, segment_id, volume_node)
        self.source = self.prompt  # what the segment held when the job was made (apply checks it is unchanged)
        try:
            self.prompt_info = _prompt_info(self.prompt, grid, volume_node,
                                            _drawn_axis_on_own_grid(segmentation_node, segment_id, volume_node, grid))
        except InputError as exc:
            text = f'segment "{segment.GetName()}" on volume "{volume_node.GetName()}": {exc}'
            if "3D mask" in text and _segment_tag(segment, RUN_TAG):  # a result this module wrote and remembers
                text += (". It holds a result PAMSegment wrote: fix its wrong slices and press Update from my edits "
                         "(update_segment from Python), or Undo propagation to get your drawing back")
            raise _same_kind(exc, text) from None
        _check_drawing_read_whole(segmentation_node, segment_id, volume_node, self.prompt)  # after the cheap refusals
        self.image, self.grid = copied if copied is not None else volume_array(volume_node)
        self._init_job(volume_node, segmentation_node, segment_id, segment.GetName(), mode=mode,
                       checkpoint=checkpoint, device=device, range=range, model=model, batch_size=batch_size,
                       threads=threads, cancel=cancel, progress=progress, intensity_gate=intensity_gate,
                       memory_check=memory_check)

    kind = "propagation"

    def _init_job(self, volume_node, segmentation_node, segment_id, segment_name, *, mode, checkpoint, device,
                  range, model, batch_size, threads, cancel, progress, intensity_gate=None,  # noqa: A002
                  memory_check=True):
        # (memory_check: a flag, as both constructors checked) before anything else is held (the volume's
        # copy is, and is counted)
        if memory_check:
            verb = "updating" if self.kind == "update" else "propagating"
            check_job_memory(self.image, self.prompt_info.axis, self.prompt_info.slices, model,
                             f'{verb} "{segment_name}" on "{volume_node.GetName()}"', checkpoint=checkpoint)
        self.volume_node = volume_node
        # What apply() compares against: taken after the voxels were read (reading can bump it).
        self._voxels_mtime = _voxels_mtime(volume_node)
        self.segmentation_node = segmentation_node
        self._placement = _placement(volume_node, segmentation_node)  # apply() refuses if either moved
        self.segment_id = segment_id
        self.segment_name = segment_name
        self.mode = mode
        # on a finer segmentation grid, what apply() compares the segment's own voxels against (an edit
        # on a thin slice between the volume's slices shows in no read on the volume's grid)
        self._own_digest = (_own_voxels_digest(segmentation_node, segment_id) if mode == "replace" and
                            _finer_than_volume(segmentation_node, segment_id, volume_node) else None)
        self._applying = False  # apply() is writing: a cancel() from another thread is too late then
        self._cancel_while_applying = False  # ... unless that apply is refused (then the cancel holds)
        self.checkpoint = None if checkpoint in (None, "") else str(checkpoint)
        self.device = device
        self.range = None if range is None else _slice_pair(range)
        self.model = model
        self.batch_size = batch_size
        self.threads = threads
        check_flag("intensity_gate", intensity_gate, optional=True)  # "off" would count as True
        self.intensity_gate = None if intensity_gate is None else bool(intensity_gate)

        from .propagate import CancelToken  # noqa: PLC0415

        self._cancel = cancel if cancel is not None else CancelToken()
        self._listener = progress
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._probe_beats = 0  # how often the GIL probe thread got the GIL (see share_time)
        self._probe_mark = (0, 0.0)
        self._share_pause = 0  # polls left without waiting (the worker itself kept the GIL, see share_time)
        self._state = "pending"
        self._progress = 0.0
        self._message = "waiting to start"
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._t_engine: float | None = None
        self.result = None
        self.exception: BaseException | None = None
        self.error = ""
        self._traceback = ""  # an unexpected failure's, logged from the main thread (log_failure)
        self.applied_segment_id: str | None = None
        self.history_entry: HistoryEntry | None = None  # set by apply(history=...)

    # -- state, readable from any thread -------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def message(self) -> str:
        return self._message

    @property
    def done(self) -> bool:
        return self._state in ("finished", "cancelled", "failed")

    @property
    def elapsed(self) -> float:
        """Seconds since start (frozen when the job ends)."""
        if self._t_start is None:
            return 0.0
        return (self._t_end if self._t_end is not None else time.perf_counter()) - self._t_start

    @property
    def eta_seconds(self) -> float | None:
        """Rough time left, from the engine's pace so far; None until there is a pace to go by."""
        if self._state != "running" or self._t_engine is None or self._progress < 0.02:
            return None
        spent = time.perf_counter() - self._t_engine
        return max(0.0, spent * (1.0 - self._progress) / self._progress)

    @property
    def slices_total(self) -> int:
        """Slices along the propagation axis inside the range (what the progress bar counts)."""
        lo, hi = self.range if self.range is not None else (0, self.prompt_info.n_slices - 1)
        return hi - lo + 1

    @property
    def slices_done(self) -> int:
        """Slices covered so far, counting the drawn ones; a side that stopped early counts as done."""
        drawn = len(self.prompt_info.slices)
        return int(round(drawn + self._progress * max(self.slices_total - drawn, 0)))

    def release(self) -> bool:
        """Let go of the job's volume-sized arrays once it has ended (its result written, cancelled or
        failed): the volume's copy, the prompt, the segment as read and, for an update, the earlier
        result; and the result's mask. Its summary and the rest of its result stay. A panel keeps
        its last job to show it: without this the next job was made while these were held (300 MB
        after a propagation of 512 x 512 x 300, 450 MB after an update; a helper's probe, session 41).
        False (nothing let go) while it runs or holds a result not yet written."""
        with self._lock:
            if self._state in ("pending", "running") or self._applying or (
                    self._state == "finished" and self.applied_segment_id is None):
                return False
        self._summary_kept = self.summary()
        self._cleared_kept = self.cleared_slices() if hasattr(self, "cleared_slices") else None
        failure, seen = self.exception, set()  # its traceback's frames held the volume's copy and the engine's
        while failure is not None and id(failure) not in seen:  # arrays (log_failure prints the text kept before)
            seen.add(id(failure))
            failure.__traceback__ = None
            failure = failure.__cause__ or failure.__context__
        self.image = self.prompt = self.source = None
        if hasattr(self, "previous"):
            self.previous = None
        if self.result is not None:
            self.result = dataclasses.replace(self.result, mask=None)
        return True

    def summary(self) -> str:
        """One line for the status label."""
        if getattr(self, "_summary_kept", None) is not None:  # (released: the arrays it came from are gone)
            return self._summary_kept
        if self._state == "finished" and self.result is not None:
            lab = next(iter(self.result.slice_range))
            first, last = self.result.slice_range[lab]
            n = last - first + 1
            where = f"{first}-{last}" if n != 1 else f"{first}"
            return (f"{n} {self.prompt_info.plane} slice{'s' if n != 1 else ''} ({where}), "
                    f"{self.result.n_predicted} predicted in {self.elapsed:.1f} s")
        if self._state == "failed":
            return f"failed: {self.error}"
        if self._state == "cancelled":
            return "cancelled; the segmentation was not changed"
        return self._message

    def log_failure(self) -> None:
        """Log an unexpected failure's traceback (not a PAMError, whose message says it all), once;
        called on the main thread by whoever sees the job failed (the worker must not log: Slicer's
        log handler updates its Error Log, a Qt model)."""
        with self._lock:
            tb, self._traceback = self._traceback, ""
        if tb:
            log.error("PAMSegment: %s failed\n%s", self.kind, tb.rstrip())

    # -- running ------------------------------------------------------------------------------

    def _not_pending(self) -> str:
        if self._state == "cancelled" and self._t_start is None:  # cancelled before it ran
            return "this propagation was cancelled before it started; make a new one to run"
        return f"this propagation was already started ({self._state})"

    def start(self) -> "SegmentPropagation":
        """Run the engine on a background thread; returns immediately."""
        with self._lock:
            if self._state != "pending":
                raise PAMError(self._not_pending())
            self._state = "running"
            self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._work, name="PAMSegment propagation", daemon=True)
        self._probe_mark = (0, time.perf_counter())
        self._thread.start()
        threading.Thread(target=self._probe_gil, name="PAMSegment GIL probe", daemon=True).start()
        return self

    # The GUI thread and the worker share Python's GIL. An application whose event loop keeps the
    # GIL while it waits for events (an embedded interpreter that never releases it between them)
    # lets the worker run only while the GUI thread itself runs Python: a propagation would then
    # crawl, a few steps per poll. A probe thread counts how often it gets the GIL; when it got it
    # (almost) never between two polls, each poll waits for the worker with the GIL released.
    PROBE_PERIOD = 0.005  # s between the probe's attempts to take the GIL
    STARVED_BELOW = 20.0  # probe successes per second below which the GUI thread keeps the GIL
    SHARE_PAUSE_POLLS = 4  # polls without waiting after a wait that showed the worker keeps the GIL

    def _probe_gil(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            time.sleep(self.PROBE_PERIOD)  # releases the GIL; waking up needs it again
            self._probe_beats += 1

    def share_time(self, interval: float, share: float = 0.6) -> float:
        """Call from the GUI thread's poll timer (every ``interval`` seconds) while the job runs.
        If the worker was starved of the GIL since the last call, wait up to ``share`` x
        ``interval`` for it with the GIL released; otherwise return at once. Returns the seconds
        waited (0.0 when the event loop already lets the worker run)."""
        if self._thread is None or self.done:
            return 0.0
        beats, since = self._probe_mark
        now = time.perf_counter()
        starved = now - since > 0.05 and (self._probe_beats - beats) / (now - since) < self.STARVED_BELOW
        if starved and self._share_pause > 0:
            self._share_pause -= 1
            starved = False
        if starved:
            before = self._probe_beats
            self._thread.join(max(0.0, share * interval))
            waited = time.perf_counter() - now
            if waited > 0.02 and (self._probe_beats - before) / waited < self.STARVED_BELOW:
                # The probe starved even while this thread waited: the worker itself keeps the GIL
                # (a long native call that does not release it), not the event loop. Waiting does
                # not help it then, so the next few polls do not wait.
                self._share_pause = self.SHARE_PAUSE_POLLS
        end = time.perf_counter()
        self._probe_mark = (self._probe_beats, end)
        return end - now if starved else 0.0

    def run(self) -> "SegmentPropagation":
        """Run the engine on the calling thread (CLI, tests, ``propagate_segment``)."""
        with self._lock:
            if self._state != "pending":
                raise PAMError(self._not_pending())
            self._state = "running"
            self._t_start = time.perf_counter()
        self._work()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ends (or ``timeout`` seconds). True when the job is done."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    @property
    def cancellable(self) -> bool:
        """Running, or finished but not written yet, and no cancel asked for yet: ``cancel()`` still
        means something (the panel's Cancel stays off once pressed, or once a scene close cancelled)."""
        if self._cancel.is_cancelled or self._applying:
            return False
        return not self.done or (self._state == "finished" and self.applied_segment_id is None)

    def cancel(self) -> None:
        """Ask the worker to stop at the next batch. Nothing is ever written by a cancelled job; a
        cancel from another thread while ``apply()`` writes comes too late and changes nothing (a
        review, session 31: it marked a written result "not changed" and lost its Undo)."""
        with self._lock:
            if self._applying:  # too late if it writes; if it is refused, the cancel then holds
                self._cancel_while_applying = True
                return
            self._cancel.cancel()
            if self._state == "pending":
                self._finish("cancelled", "cancelled before it started")
            elif self._state == "finished" and self.applied_segment_id is None:
                # Finished between the panel's polls but not written yet: the user's cancel still wins.
                self.result = None
                self._finish("cancelled", "cancelled; the segmentation was not changed")

    def _finish(self, state: str, message: str) -> None:
        self._t_end = time.perf_counter()
        self._message = message
        self._state = state

    def _on_progress(self, fraction: float, message: str) -> None:
        self._progress = float(min(max(fraction, 0.0), 1.0))
        self._message = message
        if self._listener is not None:
            self._listener(fraction, message)

    def _work(self) -> None:
        # Worker thread: only the arrays copied in __init__ and plain values are used here.
        try:
            if self._cancel.is_cancelled:
                raise PropagationCancelled("propagation cancelled; nothing was changed")
            model = self.model
            if model is None:
                self._message = "loading model"
                model = _load_model(self.checkpoint, self.device)
                self.model = model
            if self._cancel.is_cancelled:
                raise PropagationCancelled("propagation cancelled; nothing was changed")
            self._message = "propagating"
            self._t_engine = time.perf_counter()
            result = _run_engine(self.image, self.prompt, self.grid.spacing,
                                 model=_with_intensity_gate(model, self.intensity_gate), device=self.device,
                                 range=self.range, progress=self._on_progress, cancel=self._cancel,
                                 batch_size=self.batch_size, threads=self.threads, **self._engine_options())
            if tuple(result.mask.shape) != self.grid.shape:
                raise PAMError(f"the engine returned a {result.mask.shape} mask for a {self.grid.shape} volume")
            from .volumes import trim_heap  # noqa: PLC0415

            trim_heap()  # the run's freed temporaries, before apply() adds the write's (a plain C call)
        except PropagationCancelled:
            with self._lock:
                self._finish("cancelled", "cancelled; the segmentation was not changed")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the panel, not a dead thread
            if self._cancel.is_cancelled:  # the user stopped it (e.g. while the model was loading)
                with self._lock:
                    self._finish("cancelled", "cancelled; the segmentation was not changed")
                return
            # Not logged here: Slicer's log handler feeds a Qt model, which only the main thread may touch.
            memory = out_of_memory(exc)  # says itself: no traceback for the Error Log
            tb = "" if isinstance(exc, PAMError) or memory else traceback.format_exc()
            with self._lock:
                self._traceback = tb
                self.exception = exc
                if memory:  # (a trial, session 36: "Failed (nothing was changed): MemoryError", no advice)
                    self.error = _memory_failure(exc, self.device)
                    self._finish("failed", self.error)
                    return
                # a programming fault's own text means nothing to a user (a KeyError read "'weights'"):
                # its kind named, and where the details are (out of memory and the like say themselves)
                bug = isinstance(exc, (KeyError, IndexError, AttributeError, TypeError, NameError, AssertionError,
                                       ZeroDivisionError))
                self.error = (f"an internal error ({type(exc).__name__}: {str(exc)[:300]}); the Python console "
                              "has the details") if bug else (str(exc) or type(exc).__name__)
                self._finish("failed", self.error)
        except BaseException as exc:  # a KeyboardInterrupt or SystemExit: the job ends, not "running" for ever
            with self._lock:  # (a review, session 31: Cancel could not end it, and the panel stayed blocked)
                self.exception = exc
                self.error = f"interrupted ({type(exc).__name__})"
                self._finish("cancelled" if self._cancel.is_cancelled else "failed", self.error)
            if threading.current_thread() is not self._thread:
                raise  # run() on the caller's thread: the interrupt is the caller's
        else:
            with self._lock:
                if self._cancel.is_cancelled:  # cancelled during the last batch: still nothing written
                    self._finish("cancelled", "cancelled; the segmentation was not changed")
                    return
                self.result = result
                self._progress = 1.0
                self._finish("finished", "done")

    def _engine_options(self) -> dict:
        """Extra engine arguments (an update passes the axis and the previous result)."""
        return {}

    # -- writing back (main thread) -----------------------------------------------------------

    def _check_scene_unchanged(self) -> None:
        for node, what in ((self.volume_node, "volume"), (self.segmentation_node, "segmentation")):
            scene = node.GetScene()
            if scene is None or scene.GetNodeByID(node.GetID()) is not node:
                raise InputError(f"the {what} was removed while propagating; nothing was written")
        if self.segmentation_node.GetSegmentation().GetSegment(self.segment_id) is None:
            raise InputError(f'segment "{self.segment_name}" was deleted while propagating; nothing was written')
        if not _grid_of(self.volume_node).same_as(self.grid):
            raise InputError("the volume's geometry changed while propagating; nothing was written. Run again.")
        if self.mode == "replace" and not _same_placement(_placement(self.volume_node, self.segmentation_node),
                                                          self._placement):
            # (a new segment is written where the volume is now, as the result is computed on it;
            # a replace would be refused below as an edit, with the wrong advice)
            raise InputError("the volume or the segmentation was moved (its transform changed) while propagating, so "
                             "the result would land elsewhere than the drawing; nothing was written. Run again.")
        try:  # Specify geometry while propagating (a review, session 31: written a voxel off, drawn slices too)
            _check_not_half_a_voxel_apart(self.segmentation_node, self.segment_id, self.volume_node)
        except InputError as exc:
            raise InputError(f"the segmentation's geometry changed while propagating: {exc}. Nothing was written."
                             ) from None
        if not self._voxels_unchanged():
            raise InputError("the volume's voxels changed while propagating (the result was computed from the old "
                             "ones); nothing was written. Run again.")
        if self.mode == "replace":
            current = segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
            if not np.array_equal(current, self.source) or (
                    self._own_digest is not None
                    and _own_voxels_digest(self.segmentation_node, self.segment_id) != self._own_digest):
                raise InputError(
                    f'segment "{self.segment_name}" was edited while propagating, so replacing it would lose '
                    "the edit; nothing was written. " + ("Update again." if self.kind == "update" else
                                                         "Run again, or use output 'new segment'.")
                )

    def _voxels_unchanged(self) -> bool:
        """Whether the volume still holds the voxels the job read. Unmodified since (the image's
        and its scalars' modification times) is unchanged at no cost; otherwise the voxels are
        compared slice by slice (no second copy of the volume), NaN-aware only if needed."""
        if self._voxels_mtime is not None and _voxels_mtime(self.volume_node) == self._voxels_mtime:
            return True
        slicer = _slicer()
        current = slicer.util.arrayFromVolume(self.volume_node)
        if current.shape != self.image.shape:
            return False
        for k in range(current.shape[0]):
            now = current[k]
            if not np.array_equal(now, self.image[k]) and not (
                    np.issubdtype(current.dtype, np.floating) and np.array_equal(now, self.image[k], equal_nan=True)):
                return False
        return True

    def apply(self, history: "PropagationHistory | None" = None, before_write=None,
              memory_check: bool = True) -> str:
        """Write the result into the segmentation (main thread only); returns the segment id written.

        In "replace" mode the prompt segment is replaced inside the volume's extent; in "new" mode a
        segment "<name> (PAM)" is added. One call writes the whole mask, so the Segment Editor sees
        one change. Calling it again returns the same id without writing twice.

        With ``history`` (a ``PropagationHistory``) the segment's stored labelmap is saved before the
        write (for ``undo_last``) and the result is remembered for ``SegmentUpdate`` and the review.
        ``before_write()`` is called once every check has passed, right before the write (the panel
        saves the Segment Editor's undo state there, so a refused write leaves no empty undo step).
        ``memory_check`` False writes a result refused because its labelmap on a finer segmentation
        grid would not fit in the memory free now (``check_write_memory``; the job stays finished, so
        apply can be called again). A job made with ``memory_check=False`` (the panel's "Run it
        anyway") is still checked here: the write is another risk than the run the user accepted.
        """
        if threading.current_thread() is not threading.main_thread():
            raise PAMError("apply() must run on the main thread (it writes MRML nodes)")
        check_flag("memory_check", memory_check)
        if self.applied_segment_id is not None:
            return self.applied_segment_id
        with self._lock:  # a cancel() from another thread from now on is too late (it waits for no write)
            if self._state != "finished":
                raise PAMError(f"nothing to apply: the {self.kind} is {self._state}"
                               + (f" ({self.error})" if self.error else ""))
            if self._applying:  # (from an observer of the write, say: it would write twice)
                raise PAMError(f"this {self.kind}'s result is being written already")
            self._applying, self._cancel_while_applying = True, False
        try:
            return self._apply(history, before_write, memory_check)
        finally:
            with self._lock:
                self._applying = False
                if self.applied_segment_id is None and self._cancel_while_applying:
                    # refused or failed after a cancel that came while it was checked: the cancel holds
                    self._cancel.cancel()
                    self.result = None
                    self._finish("cancelled", "cancelled; the segmentation was not changed")

    def _apply(self, history, before_write, memory_check: bool) -> str:
        self._check_scene_unchanged()
        mask = self.result.mask  # (write_segment_mask writes its voxels > 0)
        node = self.segmentation_node
        _segment(node, self.segment_id)  # still there, still stored as binary labelmaps
        before = None
        source = node.GetSegmentation().GetSegment(self.segment_id)
        before_tags = (_segment_tag(source, RUN_TAG), _segment_tag(source, RECORD_TAG))
        if history is not None and self.mode == "replace":
            before = LabelmapSnapshot.take(node, self.segment_id)
            if before is None:  # never replace what could not be saved for Undo
                raise PAMError(f'the state of segment "{self.segment_name}" could not be saved for Undo; '
                               "nothing was changed (choose the new-segment output instead)")
        # made (and checked for memory) before anything changes; a new segment holds nothing yet
        try:
            labelmap = result_labelmap(mask, self.grid, node, self.segment_id if self.mode == "replace" else None,
                                       self.volume_node, check_memory=(f'writing "{self.segment_name}"' if memory_check
                                                                       else None))
        except Exception as exc:
            if isinstance(exc, PAMError):
                raise
            log.exception("PAMSegment: preparing the %s of %s for writing failed", self.kind, self.segment_id)
            raise PAMError(f"the result could not be written ({type(exc).__name__}: {str(exc)[:200] or 'no details'}); "
                           "nothing was changed") from exc
        if before_write is not None:
            before_write()
        target = self.segment_id if self.mode == "replace" else None  # (new mode: once the segment is added)
        entry = None
        try:  # all or nothing: the write, and the session's memory of it (for Undo and updates)
            was_modifying = node.StartModify()
            try:
                if self.mode == "new":
                    target = _add_result_segment(node, self.segment_id)
                _write_labelmap(labelmap, node, target)
                del labelmap  # (held while the run is remembered, it was 1 byte a voxel above the job's estimate)
            finally:
                node.EndModify(was_modifying)
            if history is not None:
                entry = self._history_entry(target, before, before_tags)
        except BaseException as exc:  # (a Ctrl-C in a script, memory running out while remembering the run)
            taken_back = self._take_back(target, before, before_tags)
            if isinstance(exc, Exception) and not isinstance(exc, (InputError, PAMError)):
                log.exception("PAMSegment: writing the %s of %s failed", self.kind, target)
                raise PAMError(
                    f"the result could not be written and remembered for Undo ({type(exc).__name__}: "
                    f"{str(exc)[:200] or 'no details'}); " + ("it was taken back: nothing was changed" if taken_back
                                                             else "the segment may hold part of it: use the Segment "
                                                                  "Editor's Undo")) from exc
            raise
        self.applied_segment_id = target
        if self.mode == "replace":  # its own run now, not a result propagated from another segment
            source.RemoveTag(SOURCE_TAG)
        if history is None and self.mode == "replace":  # not remembered: an earlier run's tags are stale now
            _clear_run_tags(source)
        if entry is not None:
            self.history_entry = history.record(entry)
            _store_record(node, target, self.history_entry)  # a failure costs only the next session's update
        return target

    def _take_back(self, target: str | None, before: "LabelmapSnapshot | None", before_tags: tuple) -> bool:
        """Undo a write that could not be completed (main thread): a segment this job added is
        removed (``target`` None: none was added), a replaced one restored from ``before``. False
        when it could not be (replaced without a saved state, or the restore failed: logged); the
        panel's saved Segment Editor state is then what is left."""
        node = self.segmentation_node
        try:
            if self.mode == "new":
                if target is not None and node.GetSegmentation().GetSegment(target) is not None:
                    node.GetSegmentation().RemoveSegment(target)
                return True
            if before is None:
                return False
            before.restore(node, self.segment_id)
            _put_run_tags(node.GetSegmentation().GetSegment(self.segment_id), *before_tags)
            return True
        except Exception:  # noqa: BLE001 - the original failure is what the user is told
            log.exception("PAMSegment: could not take back the %s of %s", self.kind, target)
            return False

    def _history_entry(self, target: str, before: "LabelmapSnapshot | None",
                       before_tags: tuple = (None, None)) -> "HistoryEntry":
        """What the session remembers of this run (main thread, right after the write)."""
        written = segment_mask(self.segmentation_node, target, self.volume_node).view(bool)  # 0/1: no copy
        result = self.result
        label = next(iter(result.keyframes)) if result.keyframes else 1
        axis = result.axis
        # The keyframes as the segment holds them (read back on the volume grid), so that the next
        # update's prompt, read the same way, matches them bit for bit where the user changed nothing.
        on_axis = np.moveaxis(written, axis, 0)
        keyframes, empty = {}, set(self._empty_keyframes())
        for s in sorted(result.keyframes.get(label, {})):
            if on_axis[s].any():
                keyframes[s] = on_axis[s].copy()
            else:
                empty.add(s)
        conf = np.asarray(result.confidence.get(label, np.full(written.shape[axis], np.nan)), dtype=np.float32)
        agreement = result.agreement.get(label)
        recomputed = sorted(tuple(int(v) for v in iv) for iv in result.recomputed.get(label, []))
        result_mask, written_mask = PackedMask.of(result.mask, value=label), PackedMask.of(written)
        if _same_packed(result_mask, written_mask):  # (the usual case: one copy, not two; a helper's probe, s41)
            written_mask = result_mask
        return HistoryEntry(
            segmentation_node=self.segmentation_node, segment_id=target, volume_node=self.volume_node,
            grid=self.grid, axis=axis, range=tuple(result.range) if result.range is not None else
            (0, written.shape[axis] - 1), early_stop=bool(result.early_stop), keyframes=keyframes,
            empty_keyframes=frozenset(empty), confidence=conf.copy(),
            agreement=None if agreement is None else np.asarray(agreement, dtype=np.float32).copy(),
            begin_state=result.begin_state.get(label), stops=[dict(s) for s in result.stops.get(label, [])],
            result_mask=result_mask,
            written=written_mask, before=before, created=self.mode == "new", kind=self.kind,
            n_predicted=int(result.n_predicted), recomputed=recomputed, seconds=float(self.elapsed),
            edited=list(self._edited_slices()), reviewed=self._carried_reviews(recomputed),
            parent=self._parent_entry(), occupied=tuple(np.flatnonzero(on_axis.any(axis=(1, 2))).tolist()),
            run_id=self._run_id(target), before_tags=before_tags if self.mode == "replace" else (None, None),
            own_after=(LabelmapSnapshot.take(self.segmentation_node, target)
                       if _finer_than_volume(self.segmentation_node, target, self.volume_node) else None),
            flagged=tuple(int(s) for s in (*result.thin.get(label, ()), *result.dropped.get(label, ()))),
            users_own=tuple(int(s) for s in result.edited.get(label, ())),
            outward_wall_test=bool(result.outward_wall_test),
            disagree=tuple(result.disagree.get(label, ())),
        )

    def _run_id(self, target: str) -> str:
        """Tag the written segment as this run's and return the tag: a fresh one per write, so the
        history can tell which run a segment holds after the Segment Editor's undo (which puts back
        the segment with the tag it had). A tag, not the vtkSegment object: that undo replaces
        segment objects, and copies tags with them."""
        run_id = uuid.uuid4().hex
        _set_segment_tag(self.segmentation_node.GetSegmentation().GetSegment(target), RUN_TAG, run_id)
        return run_id

    def _empty_keyframes(self):
        return ()

    def _edited_slices(self):
        return ()

    def _carried_reviews(self, recomputed) -> set:
        return set()

    def _parent_entry(self):
        return None


def propagate_segment(volume_node, segmentation_node, segment_id: str, *, mode: str = "replace",
                      checkpoint=None, device: str = "cpu", range=None, model=None,  # noqa: A002
                      progress=None, cancel=None, history: "PropagationHistory | None" = None,
                      memory_check: bool = True) -> str:
    """Propagate a segment drawn on one (or a few) slices through the volume, synchronously.

    Reads the volume and the segment on the volume's grid, runs the engine on the calling thread,
    writes the result in one step and returns the id of the segment written (the same segment for
    ``mode="replace"``, a new "<name> (PAM)" segment for ``mode="new"``). ``progress`` is called as
    ``progress(fraction, message)``; ``cancel`` is a ``CancelToken``; ``history`` a
    ``PropagationHistory`` that remembers the result (for ``update_segment`` and ``undo_last``);
    ``memory_check`` False runs a job refused for memory (``NotEnoughMemory``) and writes a result
    refused for it (``SegmentPropagation.apply``). Raises InputError,
    CheckpointError or PropagationCancelled; on any error the segmentation is unchanged.
    """
    job = SegmentPropagation(volume_node, segmentation_node, segment_id, mode=mode, checkpoint=checkpoint,
                             device=device, range=range, model=model, cancel=cancel, progress=progress,
                             memory_check=memory_check)
    return _run_and_apply(job, history, memory_check)


def _run_and_apply(job: SegmentPropagation, history, memory_check: bool = True) -> str:
    job.run()
    if job.state == "cancelled":
        raise PropagationCancelled(f"{job.kind} cancelled; nothing was changed")
    if job.state == "failed":
        job.log_failure()
        raise job.exception
    return job.apply(history=history, memory_check=memory_check)


# ----------------------------------------------------------------------------------------------
# Corrections: session memory, update from the user's edits, undo, review by confidence
# ----------------------------------------------------------------------------------------------
#
# After a result is applied with a ``PropagationHistory``, the session remembers per (segmentation
# node, segment) what the engine returned and what the segment held right after the write. The
# user then fixes the slices that went wrong in the Segment Editor. ``SegmentUpdate`` reads the
# segment again, finds the slices that differ from what was written (the user's edits), makes them
# keyframes next to the earlier ones, and lets the engine recompute only the intervals whose
# keyframes changed. Every keyframe, edited or drawn before, is kept bit for bit.
#
# A slice the user erased completely is an *empty keyframe*: "the object is absent here". The
# engine takes it as a wall (``propagate(..., empty_slices=...)``): no walk crosses it, a walk
# from a drawn keyframe towards it stops before it (earlier if the object ends), two drawn
# keyframes on either side are not fused across it, and nothing beyond the outermost one is
# predicted. Adding a wall beyond an unchanged drawn keyframe re-runs nothing (the earlier walk
# is truncated). Empty keyframes are remembered like the others.


@dataclass(frozen=True)
class PackedMask:
    """A boolean volume kept small: its bounding box, bit-packed (a result costs ~1/8 of its box)."""

    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    box: tuple[int, int, int]
    bits: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, value: int | None = None) -> "PackedMask":
        """``mask > 0`` packed (``value``: ``mask == value``), read a slice at a time: beyond the
        packed bits only the bounding box as bytes is held (a whole boolean copy or two of a large
        volume was the peak of writing a result in Slicer, session 34)."""
        mask = np.asarray(mask)
        if mask.ndim < 2:
            return cls._of_whole(mask > 0 if value is None else mask == value)

        def on(part):
            return part > 0 if value is None else part == value

        rows = np.zeros(mask.shape[1:], dtype=bool)  # which voxels of a slice are set in any slice
        first = last = None
        for k in range(mask.shape[0]):
            here = on(mask[k])
            if here.any():
                first = k if first is None else first
                last = k
                rows |= here
        if first is None:
            return cls(tuple(int(n) for n in mask.shape), (0,) * mask.ndim, (0,) * mask.ndim,
                       np.packbits(np.zeros(0, dtype=bool)))
        lo, hi = [first], [last + 1]
        for ax in range(rows.ndim):
            present = np.flatnonzero(rows.any(axis=tuple(a for a in range(rows.ndim) if a != ax)))
            lo.append(int(present[0]))
            hi.append(int(present[-1]) + 1)
        inner = tuple(slice(a, b) for a, b in zip(lo[1:], hi[1:]))
        crop = np.empty(tuple(b - a for a, b in zip(lo, hi)), dtype=bool)
        for k in range(first, last + 1):
            crop[k - first] = on(mask[k][inner])
        return cls(tuple(int(n) for n in mask.shape), tuple(lo), tuple(int(n) for n in crop.shape),
                   np.packbits(crop.ravel()))

    @classmethod
    def _of_whole(cls, mask: np.ndarray) -> "PackedMask":
        lo, hi = [], []
        for ax in range(mask.ndim):
            other = tuple(a for a in range(mask.ndim) if a != ax)
            present = np.flatnonzero(mask.any(axis=other))
            lo.append(int(present[0]) if present.size else 0)
            hi.append(int(present[-1]) + 1 if present.size else 0)
        crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        return cls(tuple(int(n) for n in mask.shape), tuple(lo), tuple(int(n) for n in crop.shape),
                   np.packbits(crop.ravel()))

    def unpack(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        n = int(np.prod(self.box))
        if n:
            crop = np.unpackbits(self.bits, count=n).reshape(self.box).astype(bool)
            out[tuple(slice(o, o + b) for o, b in zip(self.offset, self.box))] = crop
        return out

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


def _binary_name() -> str:
    return _slicer().vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _sharing(segmentation, segment_id: str) -> list[str]:
    others: list[str] = []
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, others, False)
    return list(others)


@dataclass(frozen=True)
class LabelmapSnapshot:
    """A segment's stored binary labelmap, exactly: voxels, extent, image-to-world, scalar type and
    label value. Voxels are bit-packed when they hold only 0 and the label value (the usual case).

    If the segment shared its labelmap layer with other segments, only its own voxels are kept; a
    restore then gives the segment a layer of its own (the other segments are never touched)."""

    extent: tuple[int, ...]
    image_to_world: np.ndarray
    scalar_type: int
    label_value: int
    dims: tuple[int, int, int]  # (k, j, i) of the extent
    packed: PackedMask | None
    raw: np.ndarray | None
    shared: bool = False  # the layer held other segments' voxels too (its extent is theirs as well)

    @classmethod
    def take(cls, segmentation_node, segment_id: str) -> "LabelmapSnapshot | None":
        """None when the segment has no binary labelmap to save (e.g. a closed-surface source)."""
        slicer = _slicer()
        from vtk.util import numpy_support  # noqa: PLC0415

        segmentation = segmentation_node.GetSegmentation()
        source = _source_representation(segmentation)
        if source is not None and source != _binary_name():
            return None
        segment = segmentation.GetSegment(segment_id)
        labelmap = segment.GetRepresentation(_binary_name()) if segment is not None else None
        if labelmap is None:
            return None
        extent = tuple(int(e) for e in labelmap.GetExtent())
        dims = (max(extent[5] - extent[4] + 1, 0), max(extent[3] - extent[2] + 1, 0), max(extent[1] - extent[0] + 1, 0))
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is None or int(np.prod(dims)) == 0:
            voxels = np.zeros(dims, dtype=np.uint8)
        else:  # read in place, a slice at a time (copies of a whole layer were the peak of a write)
            voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims)
        label = int(segment.GetLabelValue())
        # In a layer shared with other segments only the segment's own voxels are kept (the rest 0).
        shared = bool(_sharing(segmentation, segment_id))
        only_label = shared or all(np.count_nonzero(part) == np.count_nonzero(part == label) for part in voxels)
        import vtk  # noqa: PLC0415

        vtk_matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(vtk_matrix)
        matrix = slicer.util.arrayFromVTKMatrix(vtk_matrix).copy()
        return cls(extent=extent, image_to_world=matrix, scalar_type=int(labelmap.GetScalarType()), label_value=label,
                   dims=dims, packed=PackedMask.of(voxels, value=label) if only_label else None,
                   raw=None if only_label else np.array(voxels, copy=True), shared=shared)

    def voxels(self) -> np.ndarray:
        from vtk.util import numpy_support  # noqa: PLC0415

        dtype = numpy_support.get_vtk_to_numpy_typemap()[self.scalar_type]
        if self.raw is not None:
            return self.raw.astype(dtype, copy=True)
        # in the stored type (bool x label was int64: 8 bytes a voxel of a layer that may span a finer grid)
        out = self.packed.unpack().astype(dtype)
        if self.label_value != 1:
            out *= np.asarray(self.label_value, dtype=dtype)
        return out

    def own_box(self) -> tuple[tuple[int, int, int], np.ndarray] | None:
        """The segment's own voxels (those holding its label) cropped to their box: (the box's first
        voxel as the labelmap's (k, j, i) index, the boolean box), or None when it holds none. Only
        the box is unpacked, not the layer's whole extent."""
        packed = self.packed if self.packed is not None else PackedMask.of(self.raw, value=self.label_value)
        n = int(np.prod(packed.box))
        if not n:
            return None
        crop = np.unpackbits(packed.bits, count=n).reshape(packed.box).astype(bool)
        first = (self.extent[4] + packed.offset[0], self.extent[2] + packed.offset[1],
                 self.extent[0] + packed.offset[2])
        return first, crop

    def restore(self, segmentation_node, segment_id: str) -> None:
        """Put the saved labelmap back as the segment's own (main thread), in one modification."""
        slicer = _slicer()
        from vtk.util import numpy_support  # noqa: PLC0415

        segmentation = segmentation_node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise InputError(f'segment "{segment_id}" is no longer in the segmentation; nothing to undo')
        image = slicer.vtkOrientedImageData()
        own = self.own_box() if self.shared else None
        if own is not None:
            # a layer shared with others spans their voxels too (a whole finer grid after Specify geometry):
            # the segment's own layer spans its own voxels and one voxel of zeros around them within the
            # old extent (the same voxels in the world, on the same grid; without that margin a volume
            # voxel half a fine voxel past the edge read the edge's 1, not the 0 beyond: a re-review)
            (k0, j0, i0), crop = own
            e = self.extent
            first = (max(i0 - 1, e[0]), max(j0 - 1, e[2]), max(k0 - 1, e[4]))
            last = (min(i0 + crop.shape[2], e[1]), min(j0 + crop.shape[1], e[3]), min(k0 + crop.shape[0], e[5]))
            image.SetExtent(first[0], last[0], first[1], last[1], first[2], last[2])
            image.AllocateScalars(self.scalar_type, 1)
            values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
                tuple(b - a + 1 for a, b in zip(first[::-1], last[::-1])))
            values[:] = 0
            at = (k0 - first[2], j0 - first[1], i0 - first[0])
            values[tuple(slice(a, a + n) for a, n in zip(at, crop.shape))][crop] = self.label_value
        else:
            image.SetExtent(*self.extent)
            image.AllocateScalars(self.scalar_type, 1)
            if int(np.prod(self.dims)):
                numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = self.voxels().ravel()
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(self.image_to_world))
        derived = []  # (the representations shown: a 3D surface)
        segmentation.GetContainedRepresentationNames(derived)
        derived = [name for name in derived if name != _binary_name()]
        # the other segments' derived representations, as they are (their voxels do not change here)
        others = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        kept = {(other, name): rep for other in others if other != segment_id
                for name in derived if (rep := segmentation.GetSegment(other).GetRepresentation(name)) is not None}
        was_modifying = segmentation_node.StartModify()
        try:
            if _sharing(segmentation, segment_id):
                segmentation.SeparateSegmentLabelmap(segment_id)
            segment.AddRepresentation(_binary_name(), image)
            segment.SetLabelValue(self.label_value)
            image.Modified()  # the stale derived representations go, like after an editor stroke ...
        finally:
            segmentation_node.EndModify(was_modifying)
        # ... but Slicer drops them from every segment then and no view rebuilds them (its 3D view shows a
        # segmentation only where its first segment holds a surface; a review, session 44: Undo hid the whole
        # segmentation in 3D and unticked Show 3D): the others' are put back as they were and the restored
        # segment's made again, as the Segment Editor does after its own edits (remaking all of them took 3 s
        # for 50 large segments on Slicer's main thread; only the missing ones are converted)
        for (other, name), rep in kept.items():
            held = segmentation.GetSegment(other)
            if held is not None and held.GetRepresentation(name) is None:
                held.AddRepresentation(name, rep)
        for name in derived:
            segmentation.CreateRepresentation(name)  # (converts the segments that lack it: the restored one)


@dataclass(eq=False)
class HistoryEntry:
    """What the session remembers of the last propagation or update applied to one segment."""

    segmentation_node: object
    segment_id: str
    volume_node: object
    grid: VolumeGrid
    axis: int  # array axis of (k, j, i) the propagation walked along
    range: tuple[int, int]
    early_stop: bool
    keyframes: dict[int, np.ndarray]  # slice -> 2D bool mask: the user's drawn slices (engine keyframes)
    empty_keyframes: frozenset[int]  # slices the user erased entirely: "the object is absent here"
    confidence: np.ndarray  # float32 per slice along the axis; NaN where not predicted
    result_mask: PackedMask  # the engine's result
    written: PackedMask  # what the segment held right after the write, on the volume grid
    before: LabelmapSnapshot | None  # the segment before this run (None: the run created the segment)
    created: bool  # "new" mode: the run added this segment
    kind: str  # "propagation" or "update"
    n_predicted: int
    recomputed: list[tuple[int, int]]
    seconds: float
    edited: list[int]  # the edited slices an update was computed from
    reviewed: set[int] = field(default_factory=set)
    parent: "HistoryEntry | None" = None  # the entry an update replaced (restored by undo)
    occupied: tuple[int, ...] | None = None  # slices holding the object in ``written`` (computed once)
    # per slice, the agreement the engine's one-sided walks recorded (PropagationResult.agreement)
    agreement: np.ndarray | None = None
    # how that run's one-sided walks ended (PropagationResult.stops of its label): an update that
    # reuses a walk repeats its ending, so its report and drift notes are those of a fresh run
    stops: list = field(default_factory=list)
    begin_state: object = None  # the predictor's begin_state in that run (PropagationResult.begin_state)
    # The segment's RUN_TAG value when written: another segment given the same ID later lacks it.
    run_id: str | None = None
    # The RECORD_TAG text stored with the segment for this run (put back when an update is undone).
    record: str | None = None
    # Read back from the segment's RECORD_TAG (a scene saved and loaded again): no Undo state.
    restored: bool = False
    # The name of the volume propagated on, once its node left the scene (``_rebind_removed_volume``).
    removed_volume_name: str | None = None
    # The segment's (RUN_TAG, RECORD_TAG) before the run, put back with ``before`` by Undo.
    before_tags: tuple = (None, None)
    # The segment's own labelmap right after the write, kept only when the segmentation's grid is
    # finer than the volume's: an edit on its thin slices between the volume's slices does not show
    # on the volume grid, and an update would write over it (``check_no_unseen_edits``).
    own_after: "LabelmapSnapshot | None" = None
    # slices this run's thin and dropped notes name (PropagationResult.thin / .dropped; kept in the
    # record since session 31): review shows them first, the confidence staying as the walks gave it
    flagged: tuple = ()
    # drawn slices update rounds added (PropagationResult.edited; in the record too): handed on to
    # the next update, whose notes then do not take them for stray clicks
    users_own: tuple = ()
    # PropagationResult.outward_wall_test of the run (in the record since session 32; False before)
    outward_wall_test: bool = False
    # PropagationResult.disagree of the run ((a, b, overlap): drawn slices whose walks did not meet; in the
    # record since session 48): an update that reuses such a pair says it again
    disagree: tuple = ()

    @property
    def user_slices(self) -> list[int]:
        """Every slice that came from the user: drawn keyframes and erased ones."""
        return sorted(set(self.keyframes) | set(self.empty_keyframes))

    @property
    def n_slices(self) -> int:
        return int(self.grid.shape[self.axis])

    @property
    def undo_available(self) -> bool:
        return self.before is not None or self.created

    def volume_for(self, volume_node=None):
        """The volume to read the segment on: the one propagated on, else ``volume_node`` if it has
        the same grid (a result saved in an earlier session whose volume was not found), else None."""
        if self.volume_node is not None:
            return self.volume_node
        if volume_node is not None and volume_node.GetImageData() is not None and _grid_of(volume_node).same_as(self.grid):
            return volume_node
        return None

    def written_mask(self) -> np.ndarray:
        return self.written.unpack()

    def occupied_slices(self) -> list[int]:
        """Slices along the axis that hold the object in the written result."""
        if self.occupied is None:
            other = tuple(a for a in range(3) if a != self.axis)
            self.occupied = tuple(np.flatnonzero(self.written_mask().any(axis=other)).tolist())
        return list(self.occupied)

    def edited_slices(self, current: np.ndarray) -> list[int]:
        return edited_slices(current, self.written_mask(), self.axis)

    def holds_result(self, current: np.ndarray) -> bool:
        """Whether the segment (``current``, on the volume grid) is still mostly the result PAM
        wrote: more than half of the object slices PAM predicted (not the user's) are unedited.
        Such a segment is a result to update, not a prompt (its slices would all be taken as drawn
        keyframes); one whose PAM slices were mostly erased or redrawn is the user starting over."""
        pam_slices = set(self.occupied_slices()) - set(self.user_slices)
        unchanged = pam_slices - set(self.edited_slices(current))
        return 2 * len(unchanged) > len(pam_slices)

    def previous_result(self):
        """The engine's ``PropagationResult`` to pass as ``previous`` (label 1, full size)."""
        from .propagate import PropagationResult  # noqa: PLC0415 - keeps torch out of `import mrml`

        mask = self.result_mask.unpack().astype(np.uint8)
        keyframes = {s: m.copy() for s, m in self.keyframes.items()}
        blank = np.zeros(np.delete(mask.shape, self.axis), dtype=bool)
        keyframes.update({s: blank.copy() for s in self.empty_keyframes})  # walls: the engine's empty masks
        return PropagationResult(
            mask=mask, axis=self.axis, confidence={1: self.confidence.copy()},
            slice_range={}, prompt_slices={1: sorted(self.keyframes)},
            keyframes={1: dict(sorted(keyframes.items()))}, range=tuple(self.range),
            early_stop=self.early_stop, remove_disconnected=self.early_stop,  # the engine's default, as run
            agreement={} if self.agreement is None else {1: self.agreement.copy()},
            begin_state={1: self.begin_state}, stops={1: [dict(s) for s in self.stops]},
            edited={1: list(self.users_own)} if self.users_own else {},
            outward_wall_test=self.outward_wall_test,
            disagree={1: list(self.disagree)} if self.disagree else {},
        )

    def gap_slices(self) -> list[int]:
        """Empty slices between two of the user's drawn slices (the walks from both sides found
        nothing there; the engine gives them confidence 0): the object may go on there."""
        return empty_between_drawn(self.user_slices, self.keyframes, self.occupied_slices())

    def review_order(self) -> list[int]:
        """Least confident first, among the slices holding the result and the empty ones between
        two drawn slices (``gap_slices``)."""
        from .propagate import flagged_first  # noqa: PLC0415 - keeps the engine out of `import mrml`

        conf = flagged_first(self.confidence, self.flagged) if self.flagged else self.confidence
        return review_order(conf, self.reviewed, self.user_slices,
                            sorted(set(self.occupied_slices()) | set(self.gap_slices()) | set(self.flagged)))

    def next_to_review(self) -> int | None:
        order = self.review_order()
        return order[0] if order else None

    def review_point_ras(self, index: int) -> tuple[float, float, float]:
        """World (RAS) position to centre the views on for slice ``index``: the centroid of the
        segment there (the slice's centre if empty), through the volume's parent transform."""
        ras = slice_centroid_ras(self.written_mask(), self.axis, index, self.grid.ijk_to_ras)
        node = self.volume_node
        transform = node.GetParentTransformNode() if node is not None else None
        if transform is not None:
            import vtk  # noqa: PLC0415

            to_world = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(to_world)
            ras = tuple(float(v) for v in to_world.TransformPoint(ras))
        return ras

    def describe(self) -> str:
        occupied = self.occupied_slices()
        plane = axis_plane_name(self.grid.ijk_to_ras, self.axis)
        where = f"{plane} slices {occupied[0]}-{occupied[-1]}" if occupied else "no slice"
        yours = ", ".join(str(s) for s in self.user_slices[:10]) + (" ..." if len(self.user_slices) > 10 else "")
        saved = " (read back from the record saved with the segment: it can be updated, not undone)" \
            if self.restored else ""
        return f"{self.result_name()} on {where}; your slices: {yours}{saved}"

    def result_name(self) -> str:
        """What made the result, as the panel names the methods: "PAM result", "Registration
        tracking result" or "Copied-mask result" (from the predictor's class in ``begin_state``; a
        record from before it, or an unknown predictor, is a PAM result)."""
        try:
            predictor = str(self.begin_state[0])
        except (TypeError, IndexError, KeyError):
            return "PAM result"
        return {"TrackPredictor": "Registration tracking result",
                "CopyPredictor": "Copied-mask result"}.get(predictor, "PAM result")


# -- the result saved with the scene ----------------------------------------------------------------
#
# RECORD_TAG's text: base64 of zlib(MAGIC + 4-byte header length + JSON header + arrays). Base64 holds
# none of the characters Slicer uses to join tags in a .seg.nrrd header (":" and "|"). The text comes
# from a file, so it is read as untrusted: only the header (at most 1 MiB) is inflated before the
# record's grid is found to be that of a volume in the scene, which bounds every array that follows;
# every array's shape is checked against the grid, and anything wrong makes the record unused
# (ValueError, whatever failed).

_RECORD_MAGIC = b"PAMSegment-record\x00"
_RECORD_VERSION = 1
MAX_RECORD_CHARS = 64 * 2**20  # a record is not saved (nor read) beyond this; a large result is ~0.1 MB
_MAX_HEADER_BYTES = 2**20
_MAX_RECORD_VOXELS = 2**31


def _packed_meta(packed: PackedMask) -> dict:
    return {"shape": list(packed.shape), "offset": list(packed.offset), "box": list(packed.box)}


def _same_packed(a: PackedMask, b: PackedMask) -> bool:
    return (a.shape, a.offset, a.box) == (b.shape, b.offset, b.box) and np.array_equal(a.bits, b.bits)


def encode_record(entry: HistoryEntry) -> str:
    """The RECORD_TAG text of a history entry: what ``decode_record`` needs to rebuild it in
    another session (the written result, the user's slices, confidence, the walks' agreement
    and endings and what the predictor took from the drawn slice), not the Undo state."""
    from .propagate import disagree_to_json, stops_to_json  # noqa: PLC0415 - keeps the engine out of `import mrml`

    arrays = [np.ascontiguousarray(entry.written.bits, dtype=np.uint8)]
    header = {
        "version": _RECORD_VERSION, "run_id": entry.run_id, "kind": entry.kind, "axis": int(entry.axis),
        "range": [int(v) for v in entry.range], "early_stop": bool(entry.early_stop),
        "keyframes": sorted(int(s) for s in entry.keyframes),
        "empty_keyframes": sorted(int(s) for s in entry.empty_keyframes),
        "grid": {"shape": list(entry.grid.shape), "spacing": list(entry.grid.spacing),
                 "ijk_to_ras": np.asarray(entry.grid.ijk_to_ras, float).tolist()},
        "volume_id": entry.volume_node.GetID() if entry.volume_node is not None else None,
        "volume_name": entry.volume_node.GetName() if entry.volume_node is not None else None,
        "written": _packed_meta(entry.written), "result": None, "agreement": entry.agreement is not None,
        "n_predicted": int(entry.n_predicted), "recomputed": [list(map(int, iv)) for iv in entry.recomputed],
        "seconds": float(entry.seconds), "edited": [int(s) for s in entry.edited],
        "reviewed": sorted(int(s) for s in entry.reviewed),
        "stops": stops_to_json(entry.stops),
        # (session 31) review's first slices (thin, dropped) and the drawn slices update rounds added
        "flagged": sorted(int(s) for s in entry.flagged), "users_own": sorted(int(s) for s in entry.users_own),
        "outward_wall_test": bool(entry.outward_wall_test),  # (session 32)
        "disagree": disagree_to_json(entry.disagree),  # (session 48)
    }
    try:
        header["begin_state"] = state_to_json(entry.begin_state)
    except TypeError:
        header["begin_state"] = None  # an update then recomputes every walk, which is correct, only slower
    if not _same_packed(entry.result_mask, entry.written):
        header["result"] = _packed_meta(entry.result_mask)
        arrays.append(np.ascontiguousarray(entry.result_mask.bits, dtype=np.uint8))
    arrays.append(np.asarray(entry.confidence, dtype="<f4"))
    if entry.agreement is not None:
        arrays.append(np.asarray(entry.agreement, dtype="<f4"))
    head = json.dumps(header, allow_nan=False).encode()
    payload = b"".join([_RECORD_MAGIC, struct.pack("<I", len(head)), head] + [a.tobytes() for a in arrays])
    return base64.b64encode(zlib.compress(payload, 6)).decode("ascii")


def _int_list(value, name: str, length: int | None = None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} is not a list of integers")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} has {len(value)} values, not {length}")
    return value


def _check_packed(meta, shape: tuple[int, int, int], name: str) -> tuple[tuple, tuple, tuple, int]:
    if not isinstance(meta, dict):
        raise ValueError(f"{name} is missing")
    packed_shape = tuple(_int_list(meta.get("shape"), f"{name} shape", 3))
    offset = tuple(_int_list(meta.get("offset"), f"{name} offset", 3))
    box = tuple(_int_list(meta.get("box"), f"{name} box", 3))
    if packed_shape != shape:
        raise ValueError(f"{name} is {packed_shape}, the grid {shape}")
    if any(o < 0 or b < 0 or o + b > n for o, b, n in zip(offset, box, shape)):
        raise ValueError(f"{name} box lies outside the grid")
    return packed_shape, offset, box, (int(np.prod(box)) + 7) // 8


class RecordVolumeMissing(ValueError):
    """A record that looks right but no volume of the scene has its grid (yet): not used now."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number a record holds")


def decode_record(text: str, segmentation_node, segment_id: str, run_id: str) -> HistoryEntry:
    """Rebuild a ``HistoryEntry`` from RECORD_TAG's text (``encode_record``) for the segment tagged
    ``run_id``. ValueError, saying what is wrong, for anything that is not such a record of that
    run (``RecordVolumeMissing`` when no volume of the scene has the record's grid: nothing of the
    record beyond its header is inflated then, so a record cannot make this allocate more than the
    scene's own volumes take). The entry has no Undo state; its volume is the node saved with it
    (same ID and name) or the one node of that name, on the same grid, else None (an update then
    needs the volume selected)."""
    try:
        return _decode_record(text, segmentation_node, segment_id, run_id)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted input: whatever fails, the record is not used
        raise ValueError(f"the record is malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _decode_record(text: str, segmentation_node, segment_id: str, run_id: str) -> HistoryEntry:
    if not isinstance(text, str) or len(text) > MAX_RECORD_CHARS:
        raise ValueError(f"the record is {len(text)} characters, over {MAX_RECORD_CHARS}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"the record is not base64 ({exc})") from exc
    inflate = zlib.decompressobj()
    try:
        start = inflate.decompress(raw, len(_RECORD_MAGIC) + 4 + _MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise ValueError(f"the record is not compressed data ({exc})") from exc
    if not start.startswith(_RECORD_MAGIC) or len(start) < len(_RECORD_MAGIC) + 4:
        raise ValueError("the record does not start as a PAMSegment record")
    (n_head,) = struct.unpack("<I", start[len(_RECORD_MAGIC):len(_RECORD_MAGIC) + 4])
    body = start[len(_RECORD_MAGIC) + 4:]
    if n_head > _MAX_HEADER_BYTES or len(body) < n_head:
        raise ValueError("the record's header is cut or too long")
    try:
        header = json.loads(body[:n_head], parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"the record's header is malformed ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get("version") != _RECORD_VERSION:
        raise ValueError("the record is of another version")
    if header.get("run_id") != run_id:
        raise ValueError("the record is of another run than the segment's PAMSegment.Run tag")
    grid_meta = header.get("grid")
    if not isinstance(grid_meta, dict):
        raise ValueError("the record has no grid")
    shape = tuple(_int_list(grid_meta.get("shape"), "grid shape", 3))
    if min(shape) < 1 or math.prod(shape) > _MAX_RECORD_VOXELS:
        raise ValueError(f"grid {shape} is empty or too large")
    spacing = grid_meta.get("spacing")
    if not isinstance(spacing, list) or len(spacing) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in spacing):
        raise ValueError("the record's grid spacing is malformed")
    spacing = tuple(float(v) for v in spacing)
    matrix = np.asarray(grid_meta.get("ijk_to_ras"), dtype=float)
    finite = np.isfinite(matrix).all() and np.isfinite(spacing).all()
    if matrix.shape != (4, 4) or not finite or min(spacing) <= 0:
        raise ValueError("the record's grid geometry is malformed")
    grid = VolumeGrid(shape=shape, spacing=spacing, ijk_to_ras=matrix)
    scene = segmentation_node.GetScene()
    volumes = _scalar_volumes(scene)
    if not any(_grid_of(v).same_as(grid) for v in volumes):
        raise RecordVolumeMissing(f"no volume in the scene has the record's grid "
                                  f"({' x '.join(map(str, shape[::-1]))} voxels)")
    axis = header.get("axis")
    if axis not in (0, 1, 2) or isinstance(axis, bool):
        raise ValueError(f"axis {axis!r} is not 0, 1 or 2")
    n = shape[axis]
    lo, hi = _int_list(header.get("range"), "range", 2)
    header.setdefault("reviewed", [])
    header.setdefault("flagged", [])  # (records before session 31 have neither)
    header.setdefault("users_own", [])
    slices = [s for name in ("keyframes", "empty_keyframes", "edited", "reviewed", "flagged", "users_own")
              for s in _int_list(header.get(name), name)]
    if not 0 <= lo <= hi < n or any(not 0 <= s < n for s in slices):
        raise ValueError(f"a slice index lies outside the {n} slices along axis {axis}")
    recomputed = header.get("recomputed", [])
    if not isinstance(recomputed, list):
        raise ValueError("recomputed is not a list")
    recomputed = [tuple(_int_list(iv, "recomputed", 2)) for iv in recomputed]
    n_predicted, seconds = header.get("n_predicted", 0), header.get("seconds", 0.0)
    if not isinstance(n_predicted, int) or isinstance(n_predicted, bool) or not 0 <= n_predicted <= 2**40:
        raise ValueError("n_predicted is not a count")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 1e9:
        raise ValueError("seconds is not a duration")
    try:
        begin_state = state_from_json(header.get("begin_state"))
    except ValueError:
        begin_state = None  # an update then recomputes every walk, which is correct, only slower
    from .propagate import _stops_from_json, disagree_from_json  # noqa: PLC0415 - the engine out of `import mrml`

    try:  # none in records of before session 30
        stops = _stops_from_json(header.get("stops", []), n, 1)
    except ValueError:
        stops = []  # an update then reports only the walks it computes, as before session 30
    written_meta = _check_packed(header.get("written"), shape, "written mask")
    parts = [written_meta]
    result_meta = None
    if header.get("result") is not None:
        result_meta = _check_packed(header["result"], shape, "result mask")
        parts.append(result_meta)
    sizes = [m[3] for m in parts] + [4 * n] + ([4 * n] if header.get("agreement") else [])
    try:
        rest = body[n_head:] + inflate.decompress(inflate.unconsumed_tail, sum(sizes) + 1)
    except zlib.error as exc:
        raise ValueError(f"the record is not compressed data ({exc})") from exc
    if len(rest) != sum(sizes) or inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("the record's arrays are cut or longer than its header says")
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(rest[pos:pos + size])
        pos += size

    def packed(meta, chunk):
        return PackedMask(meta[0], meta[1], meta[2], np.frombuffer(chunk, dtype=np.uint8).copy())

    written = packed(written_meta, chunks[0])
    result = packed(result_meta, chunks[1]) if result_meta is not None else written
    i = 2 if result_meta is not None else 1
    confidence = np.frombuffer(chunks[i], dtype="<f4").astype(np.float32)
    agreement = np.frombuffer(chunks[i + 1], dtype="<f4").astype(np.float32) if header.get("agreement") else None
    on_axis = np.moveaxis(written.unpack(), axis, 0)
    keyframes = {int(s): on_axis[s].copy() for s in header["keyframes"]}
    try:  # (none in records of before session 48; a malformed one is left out: only a note rests on it)
        disagree = tuple(disagree_from_json(header.get("disagree", []), sorted(keyframes)))
    except ValueError:
        disagree = ()
    volume = _saved_volume(volumes, header.get("volume_id"), header.get("volume_name"), grid)
    kind = header.get("kind") if header.get("kind") in ("propagation", "update") else "propagation"
    return HistoryEntry(
        segmentation_node=segmentation_node, segment_id=segment_id, volume_node=volume, grid=grid, axis=axis,
        range=(lo, hi), early_stop=header.get("early_stop") is not False, keyframes=keyframes,
        empty_keyframes=frozenset(header["empty_keyframes"]), confidence=confidence, result_mask=result,
        written=written, before=None, created=False, kind=kind, n_predicted=n_predicted,
        recomputed=recomputed, seconds=float(seconds), edited=list(header["edited"]),
        reviewed=set(header["reviewed"]), flagged=tuple(header["flagged"]), users_own=tuple(header["users_own"]),
        outward_wall_test=header.get("outward_wall_test") is True,
        disagree=disagree, agreement=agreement, begin_state=begin_state, stops=stops, run_id=run_id, record=text,
        restored=True,
    )


def _volumes_signature(scene) -> tuple:
    """What would let a waiting record be read: the scene's scalar volumes and their voxels' state."""
    return tuple((v.GetID(), v.GetMTime(), v.GetImageData().GetMTime()) for v in _scalar_volumes(scene))


def _scalar_volumes(scene) -> list:
    if scene is None:
        return []
    nodes = (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
    return [v for v in nodes if v is not None and v.GetImageData() is not None]


def _rebind_removed_volume(entry: HistoryEntry, scene) -> None:
    """A volume node removed from the scene since the run (deleted, or closed and loaded again) is
    the saved record's case: each entry of the chain (an update's parents too) takes the scene's
    volume of the same name and grid (``_saved_volume``), else none until one is loaded (the user
    may select it). Kept, the removed node was asked for by name although the reloaded one was
    selected, or its stale voxels were used."""
    while entry is not None:
        node = entry.volume_node
        if node is not None and not (node.GetScene() is scene and scene.GetNodeByID(node.GetID()) is node):
            entry.removed_volume_name, entry.volume_node = node.GetName(), None
        if entry.volume_node is None and entry.removed_volume_name is not None:
            entry.volume_node = _saved_volume(_scalar_volumes(scene), None, entry.removed_volume_name, entry.grid)
            if entry.volume_node is not None:
                entry.removed_volume_name = None
        entry = entry.parent


def _saved_volume(volumes, volume_id, volume_name, grid: VolumeGrid):
    """The volume a saved result was propagated on, among ``volumes`` (the scene's): the node of
    that ID if it also has that name and the result's grid, else the one node of that name and
    grid, else None. The name decides: another scene's nodes may carry the ID (volumes loaded in
    another order) on a volume of the same grid, e.g. a T1 where the result was made on the T2."""
    if not isinstance(volume_name, str):
        return None
    named = [v for v in volumes if v.GetName() == volume_name and _grid_of(v).same_as(grid)]
    by_id = [v for v in named if v.GetID() == volume_id]
    if by_id:
        return by_id[0]
    return named[0] if len(named) == 1 else None


def _store_record(segmentation_node, segment_id: str, entry: HistoryEntry) -> None:
    """Save the entry with the segment (RECORD_TAG); a failure costs only the next session's update."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    try:
        text = encode_record(entry)
        if len(text) > MAX_RECORD_CHARS:
            raise ValueError(f"{len(text)} characters, over {MAX_RECORD_CHARS}")
        _set_segment_tag(segment, RECORD_TAG, text)  # (outside this try, its failure read "Result not written")
    except Exception:  # noqa: BLE001 - the result is written and remembered in this session
        log.exception("PAMSegment: the result of %s is not saved for later sessions", segment_id)
        segment.RemoveTag(RECORD_TAG)
        return
    entry.record = text


class PropagationHistory:
    """Session memory of applied propagations: one ``HistoryEntry`` per (segmentation, segment).

    Held by the module's Logic (not global). Bounded: one entry per segment (plus the one an update
    replaced, so the update can be undone), arrays bit-packed to their bounding box, and at most
    ``max_entries`` segments (the least recently used is forgotten first). Entries whose node left
    the scene or whose segment was deleted (or replaced by another segment under the same ID) are
    dropped when looked up."""

    def __init__(self, max_entries: int = 32):
        from collections import OrderedDict  # noqa: PLC0415

        self.max_entries = int(max_entries)
        self._entries: OrderedDict = OrderedDict()
        # Results read back from saved records, kept apart (and fewer) so that looking at segments
        # never pushes a run of this session, and its Undo state, out of ``_entries``.
        self._restored: OrderedDict = OrderedDict()
        # records not read: True when unreadable (not tried again), else the scene's volumes when no
        # volume had the record's grid (tried again once they change)
        self._unreadable: OrderedDict = OrderedDict()
        # (segmentation, segment) -> the run an undone update put the segment back at, whose own
        # step before was not kept: its refusal to undo says so (not "a loaded scene ...")
        self._undone_to: OrderedDict = OrderedDict()
        # (segmentation, segment) -> the run pushed out of ``_entries`` by newer ones: its refusal to
        # undo says so (it blamed a loaded scene; a helper's probe with 40 segments, session 41)
        self._evicted: OrderedDict = OrderedDict()

    @staticmethod
    def _key(segmentation_node, segment_id: str):
        return (segmentation_node.GetID(), str(segment_id))

    def back_after_undo(self, segmentation_node, segment_id: str, entry=None) -> bool:
        """Whether the segment holds the result an undone update put it back at (``entry``: its
        current entry, if looked up already): that result's own earlier step was not kept."""
        entry = self.get(segmentation_node, segment_id) if entry is None else entry
        back_at = self._undone_to.get(self._key(segmentation_node, segment_id))
        return bool(entry is not None and entry.restored and back_at is not None and back_at == entry.run_id)

    MAX_RESTORED = 8

    def __len__(self) -> int:
        """Runs of this session remembered (results read back from records are not counted)."""
        return len(self._entries)

    def get(self, segmentation_node, segment_id: str) -> HistoryEntry | None:
        """The segment's last remembered run, or None. A segment this session never propagated, or
        one whose run this session no longer holds, is looked up in its RECORD_TAG (a result saved
        with the scene in an earlier session): read back, it can be updated and reviewed, not undone."""
        if segmentation_node is None or not segment_id:
            return None
        key = self._key(segmentation_node, segment_id)
        entry = self._entries.get(key)
        scene = segmentation_node.GetScene()
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        if scene is None or scene.GetNodeByID(segmentation_node.GetID()) is not segmentation_node or segment is None:
            self._entries.pop(key, None)
            self._restored.pop(key, None)
            return None
        tag = _segment_tag(segment, RUN_TAG)
        if entry is not None:
            _rebind_removed_volume(entry, scene)
            if entry.segmentation_node is segmentation_node and (entry.run_id is None or tag == entry.run_id):
                return entry
            if (entry.segmentation_node is segmentation_node and entry.parent is not None
                    and entry.parent.run_id == tag):
                # The Segment Editor's undo put back the segment from before the update: the
                # propagation it updated is current again, as after undo_last.
                self._entries[key] = entry.parent
                return entry.parent
            del self._entries[key]  # another segment under this ID, or the result undone
        return self._restore(segmentation_node, segment_id, segment, tag)

    def _restore(self, segmentation_node, segment_id: str, segment, run_id: str | None) -> HistoryEntry | None:
        key = self._key(segmentation_node, segment_id)
        kept = self._restored.get(key)
        if kept is not None and kept.segmentation_node is segmentation_node and kept.run_id == run_id:
            self._restored.move_to_end(key)
            return kept
        self._restored.pop(key, None)
        text = _segment_tag(segment, RECORD_TAG) if run_id else None
        if not text:
            return None
        bad = (key, run_id, len(text), hash(text))
        seen = self._unreadable.get(bad)
        scene = segmentation_node.GetScene()
        if seen is True or (seen is not None and seen == _volumes_signature(scene)):
            return None  # unreadable, or still no volume of its grid: not decoded again on every refresh
        try:
            entry = decode_record(text, segmentation_node, segment_id, run_id)
        except RecordVolumeMissing as exc:  # tried again once the scene's volumes change
            log.debug('PAMSegment: the saved PAM result of segment "%s" is not used yet: %s', segment.GetName(), exc)
            self._remember_unread(bad, _volumes_signature(scene))
            return None
        except ValueError as exc:
            self._remember_unread(bad, True)  # said once, not on every refresh of the panel
            log.warning('PAMSegment: the saved PAM result of segment "%s" is not used: %s', segment.GetName(), exc)
            return None
        self._restored[key] = entry
        while len(self._restored) > self.MAX_RESTORED:
            self._restored.popitem(last=False)
        return entry

    def _remember_unread(self, bad: tuple, why) -> None:
        """A record not read: True (unreadable) or the scene's volumes when no volume had its grid."""
        self._unreadable[bad] = why
        while len(self._unreadable) > 256:
            self._unreadable.popitem(last=False)

    def record(self, entry: HistoryEntry) -> HistoryEntry:
        key = self._key(entry.segmentation_node, entry.segment_id)
        self._entries.pop(key, None)
        self._restored.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:  # (an entry kept after an update: its run_id says which)
            old_key, old = self._entries.popitem(last=False)
            self._evicted[old_key] = (old.run_id, old.created)
            while len(self._evicted) > 64 * self.max_entries:
                self._evicted.popitem(last=False)
        return entry

    def mark_reviewed(self, entry: HistoryEntry, index: int) -> None:
        """Mark slice ``index`` of ``entry`` (as ``get`` returned it) reviewed, in memory and in the
        record saved with the segment, so that a reloaded scene goes on where the review stopped."""
        entry.reviewed.add(int(index))
        segment = entry.segmentation_node.GetSegmentation().GetSegment(entry.segment_id)
        if entry.record is not None and segment is not None and _segment_tag(segment, RUN_TAG) == entry.run_id:
            _store_record(entry.segmentation_node, entry.segment_id, entry)

    def forget(self, segmentation_node, segment_id: str | None = None) -> None:
        """Forget one segment, or every segment of a segmentation node."""
        for entries in (self._entries, self._restored, self._undone_to, self._evicted):
            for key in list(entries):
                if key[0] == segmentation_node.GetID() and (segment_id is None or key[1] == segment_id):
                    del entries[key]

    def clear(self) -> None:
        self._entries.clear()
        self._restored.clear()
        self._unreadable.clear()
        self._undone_to.clear()
        self._evicted.clear()

    def undo_last(self, segmentation_node, segment_id: str, before_write=None) -> str:
        """Undo the last propagation or update applied to the segment (main thread).

        The segment's stored labelmap is restored exactly as it was before it (voxels, extent,
        geometry, scalar type, label value); a segment the propagation added ("new" mode) is
        removed. After undoing an update the propagation it updated is current again (so its
        result can be updated or undone); after undoing a propagation the segment is forgotten.
        Edits made since the run are discarded with it. Returns a sentence for the status line.
        ``before_write()`` runs once the undo is certain, right before the segment changes (Slicer
        saves a Segment Editor undo state there: one saved before a refused undo was an empty step).
        """
        if threading.current_thread() is not threading.main_thread():
            raise PAMError("undo_last() must run on the main thread (it writes MRML nodes)")
        entry = self.get(segmentation_node, segment_id)
        if entry is None:
            raise InputError("nothing to undo: this segment has no PAM propagation in this session")
        segmentation = segmentation_node.GetSegmentation()
        name = segmentation.GetSegment(segment_id).GetName()
        if not entry.created and entry.before is None:
            if self.back_after_undo(segmentation_node, segment_id, entry):
                raise InputError(f'cannot undo: "{name}" is back at the result from before an update you undid, and '
                                 "only one step before an update is kept: the steps before it can no longer be "
                                 "undone with Undo propagation (Update from my edits and the review still work)")
            evicted = self._evicted.get(self._key(segmentation_node, segment_id))
            if entry.restored and evicted is not None and evicted[0] == entry.run_id:
                kept = (f"the last {self.max_entries} segments propagated or updated in this session are kept for "
                        f"Undo, and {self.max_entries} others were since")
                if evicted[1]:  # made by a new-segment run: taking it back is deleting it
                    raise InputError(f'cannot undo: "{name}" was made by a {entry.kind} no longer remembered ({kept}): '
                                     "delete the segment in the Segment Editor to take it back")
                raise InputError(f'cannot undo: what "{name}" held before its {entry.kind} is no longer remembered '
                                 f"({kept}; the Segment Editor's Undo may still take it back; Update from my edits "
                                 "and the review still work)")
            if entry.restored:
                raise InputError(f'cannot undo: "{name}" holds a PAM result read back from the record saved with it '
                                 "(a loaded scene, a copied segment, the Segment Editor's redo); what it held before "
                                 f"that {entry.kind} is kept only right after the run, in the session that ran it "
                                 "(Update from my edits and the review still work)")
            raise InputError(f'cannot undo: the state of "{name}" before the {entry.kind} was not saved')
        if before_write is not None:
            before_write()
        if entry.created:
            segmentation.RemoveSegment(segment_id)
            self.forget(segmentation_node, segment_id)
            return f'removed "{name}", the segment the propagation added'
        # The saved state is a binary labelmap: written into a segmentation whose source became a
        # closed surface since the run, it would be a derived copy and the surface would keep the result.
        _segment(segmentation_node, segment_id)
        entry.before.restore(segmentation_node, segment_id)
        key = self._key(segmentation_node, segment_id)
        segment = segmentation.GetSegment(segment_id)
        if entry.parent is not None:
            if entry.parent.run_id:
                _set_segment_tag(segment, RUN_TAG, entry.parent.run_id)  # it holds that run's result again
            if entry.parent.record:
                _set_segment_tag(segment, RECORD_TAG, entry.parent.record)
            else:
                segment.RemoveTag(RECORD_TAG)
            self._entries[key] = entry.parent
            return f'"{name}" is back as it was before the update'
        # the tags first: if that fails the session still remembers the run, whose tags the segment keeps
        _put_run_tags(segment, *entry.before_tags)  # an earlier PAM result held before is that result again
        del self._entries[key]
        if entry.kind == "update":  # only one earlier step is kept: what came before it is final now
            if entry.before_tags[0]:
                self._undone_to[key] = entry.before_tags[0]
                while len(self._undone_to) > self.max_entries:
                    self._undone_to.popitem(last=False)
            return (f'"{name}" is back as it was before the update; the steps before it can no longer be undone '
                    "with Undo propagation")
        return f'"{name}" is back as it was before the propagation'


def undo_last(segmentation_node, segment_id: str, history: PropagationHistory) -> str:
    """``history.undo_last(segmentation_node, segment_id)``; see there."""
    return history.undo_last(segmentation_node, segment_id)


# -- pure helpers (no MRML) ---------------------------------------------------------------------


def edited_slices(current: np.ndarray, written: np.ndarray, axis: int) -> list[int]:
    """Slices along ``axis`` where the segment now differs from what was written: the user's edits.
    Compared within the box holding both's voxels only (three volume-sized boolean arrays were 0.1 s
    at 512 x 512 x 300, after every stroke: the panel's prompt line checks for edits)."""
    from .propagate import _bounding_box  # noqa: PLC0415

    current, written = np.asarray(current), np.asarray(written)
    if current.shape != written.shape:
        raise InputError(f"the segment's grid {current.shape} differs from the result's {written.shape}")
    if not (isinstance(axis, (int, np.integer)) and 0 <= axis < current.ndim):
        raise InputError(f"axis must be one of 0-{current.ndim - 1}, got {axis!r}")
    lo, hi = None, None
    for mask in (current, written):
        box, start = _bounding_box(mask)
        if box is not mask:  # (the array itself comes back when it holds nothing)
            end = [b + n for b, n in zip(start, box.shape)]
            lo = list(start) if lo is None else [min(a, b) for a, b in zip(lo, start)]
            hi = end if hi is None else [max(a, b) for a, b in zip(hi, end)]
    if lo is None:
        return []
    where = tuple(slice(a, b) for a, b in zip(lo, hi))
    other = tuple(a for a in range(current.ndim) if a != axis)
    return (np.flatnonzero(((current[where] > 0) != (written[where] > 0)).any(axis=other)) + lo[axis]).tolist()


def plan_keyframes(current: np.ndarray, axis: int, keyframes, empty_keyframes, edited) -> tuple[dict, set]:
    """The keyframes of an update: the earlier ones and the edited slices, with their current masks.

    Returns ({slice: 2D bool mask} for slices with the object, {slices erased entirely})."""
    on_axis = np.moveaxis(np.asarray(current) > 0, axis, 0)
    drawn, empty = {}, set()
    for s in sorted(set(keyframes) | set(empty_keyframes) | set(edited)):
        if on_axis[s].any():
            drawn[int(s)] = on_axis[s].copy()
        else:
            empty.add(int(s))
    return drawn, empty


def review_order(confidence, reviewed=(), keyframes=(), candidates=None) -> list[int]:
    """Slices to review, least confident first: ``propagate.review_order`` (the engine's order,
    which the command line's "check first" uses too)."""
    from .propagate import review_order as engine_order  # noqa: PLC0415 - keeps torch out of `import mrml`

    return engine_order(confidence, reviewed, keyframes, candidates)


def next_slice_to_review(confidence, reviewed=(), keyframes=(), candidates=None) -> int | None:
    """The least confident slice not yet reviewed (see ``review_order``), or None when all are."""
    order = review_order(confidence, reviewed, keyframes, candidates)
    return order[0] if order else None


def slice_centroid_ras(mask: np.ndarray, axis: int, index: int, ijk_to_ras: np.ndarray) -> tuple[float, float, float]:
    """RAS of the centroid of ``mask`` on slice ``index`` along ``axis`` (the slice's centre if empty)."""
    mask = np.asarray(mask) > 0
    plane = np.take(mask, index, axis=axis)
    if plane.any():
        centre = [float(c.mean()) for c in np.nonzero(plane)]
    else:
        centre = [(n - 1) / 2.0 for n in plane.shape]
    kji = centre[:axis] + [float(index)] + centre[axis:]
    ijk1 = np.array([kji[2], kji[1], kji[0], 1.0])
    ras = np.asarray(ijk_to_ras, dtype=float) @ ijk1
    return float(ras[0]), float(ras[1]), float(ras[2])


def jump_slices_to(scene, ras) -> None:
    """Centre every slice view of ``scene`` on ``ras`` (what "Next slice to review" does)."""
    slicer = _slicer()
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)


PLOT_COLORS = {
    "keyframe": (45, 110, 220),  # the user's slices
    "low": (205, 60, 50),  # confidence < 0.5
    "medium": (230, 160, 40),  # < 0.8
    "high": (60, 160, 80),  # >= 0.8
    "reviewed": (160, 160, 160),
    "current": (20, 20, 20),
    "axis": (200, 200, 200),
}


def confidence_plot(confidence, keyframes=(), reviewed=(), current: int | None = None, width: int = 256,
                    height: int = 56) -> list[tuple[int, int, int, int, tuple[int, int, int]]]:
    """The confidence plot as rectangles (x, y, w, h, rgb) on a ``width`` x ``height`` canvas,
    drawn in order: one bar per slice along the axis, height = confidence, colour by confidence
    (the user's slices blue and full height, reviewed ones grey, NaN none), a baseline, and a dark
    line at ``current``. The panel paints them with QPainter."""
    conf = np.asarray(confidence, dtype=float)
    n = max(int(conf.size), 1)
    keys, seen = {int(s) for s in keyframes}, {int(s) for s in reviewed}
    rects = [(0, height - 1, width, 1, PLOT_COLORS["axis"])]
    usable = height - 2
    for s in range(conf.size):
        x0, x1 = (s * width) // n, ((s + 1) * width) // n
        w = max(x1 - x0, 1)
        if s in keys:
            value, color = 1.0, PLOT_COLORS["keyframe"]
        elif not np.isfinite(conf[s]):
            continue
        else:
            value = float(min(max(conf[s], 0.0), 1.0))
            color = (PLOT_COLORS["reviewed"] if s in seen else PLOT_COLORS["low"] if value < 0.5
                     else PLOT_COLORS["medium"] if value < 0.8 else PLOT_COLORS["high"])
        h = max(int(round(value * usable)), 1)
        rects.append((x0, height - 1 - h, w, h, color))
    if current is not None and 0 <= int(current) < conf.size:
        x0, x1 = (int(current) * width) // n, ((int(current) + 1) * width) // n
        rects.append(((x0 + x1) // 2, 0, 1, height, PLOT_COLORS["current"]))
    return rects


# -- the update job ------------------------------------------------------------------------------


class SegmentUpdate(SegmentPropagation):
    """"Update from my edits": re-propagate a segment the session propagated, keeping the user's edits.

    Construct on the main thread with the ``PropagationHistory`` that remembers the segment: it
    reads the segment on the volume's grid, finds the slices that differ from what was written
    (the edits), and builds the engine's prompt from the keyframes = earlier keyframes + edited
    slices (with their current masks). The worker calls the engine with the earlier result as
    ``previous``, so only the intervals whose keyframes changed are recomputed (``recomputed``,
    ``result.n_predicted``). ``apply(history=...)`` writes the new 3D mask in one step into the
    same segment. Raises InputError when the segment has no remembered propagation, was not
    edited, or is read on a volume of another geometry. Same polling API as SegmentPropagation.
    """

    kind = "update"

    def __init__(self, volume_node, segmentation_node, segment_id: str, history: PropagationHistory, *,
                 checkpoint=None, device: str = "cpu", model=None, batch_size: int = 16,
                 threads: int | None = None, cancel=None, progress=None, intensity_gate: bool | None = None,
                 memory_check: bool = True):
        segment = _segment(segmentation_node, segment_id)
        name = segment.GetName()
        entry = history.get(segmentation_node, segment_id) if history is not None else None
        if entry is None:
            raise InputError(f'segment "{name}" has no PAM result to update: draw it on one slice and press '
                             "Propagate first")
        if volume_node is None:
            volume_node = entry.volume_node
        elif entry.volume_node is not None and volume_node is not entry.volume_node:
            raise InputError(f'segment "{name}" was propagated on volume "{entry.volume_node.GetName()}", not '
                             f'"{volume_node.GetName()}"; select "{entry.volume_node.GetName()}" to update it')
        if volume_node is None:
            raise InputError(f'segment "{name}" was propagated on a volume this scene no longer holds under its name '
                             "(removed, renamed, or a scene of an earlier session): select the volume it was "
                             "propagated on, then update")
        check_flag("memory_check", memory_check)
        _check_scalar_volume(volume_node)
        if not _grid_of(volume_node).same_as(entry.grid):  # (before the volume is copied, and its memory checked)
            if entry.volume_node is None:
                raise InputError(f'segment "{name}" was propagated on a volume of another grid than '
                                 f'"{volume_node.GetName()}" ({" x ".join(map(str, entry.grid.shape[::-1]))} '
                                 "voxels): select the volume it was propagated on, then update")
            source = entry.volume_node.GetName()
            raise InputError(f'segment "{name}" was propagated on volume "{source}", whose grid differs from '
                             f'"{volume_node.GetName()}"; select "{source}" to update it')
        if memory_check:
            check_read_memory(volume_node, f'updating "{name}" on "{volume_node.GetName()}"')
        self.image, self.grid = volume_array(volume_node)
        _check_not_half_a_voxel_apart(segmentation_node, segment_id, volume_node)
        self.source = segment_mask(segmentation_node, segment_id, volume_node)
        self.entry = entry
        self.edited = entry.edited_slices(self.source)
        check_no_unseen_edits(entry, segmentation_node, segment_id, volume_node, self.edited)
        if not self.edited:
            raise InputError(f'no slice of "{name}" differs from the last PAM result: fix the slices that are '
                             "wrong in the Segment Editor, then update")
        self.drawn, self.empty = plan_keyframes(self.source, entry.axis, entry.keyframes, entry.empty_keyframes,
                                                self.edited)
        n = entry.n_slices
        if not self.drawn:
            raise InputError(f'every slice of "{name}" that came from you is empty now, so there is nothing to '
                             "propagate from: draw the object on a slice (or clear the segment)")
        from .propagate import keyframe_limit, too_many_keyframes  # noqa: PLC0415

        if too_many_keyframes(len(self.drawn), n):
            raise InputError(f'"{name}" now has {len(self.drawn)} slices from you out of {n}: more than PAM uses '
                             f"as keyframes (at most {keyframe_limit(n)}); keep editing by hand, or "
                             "draw a few slices of a fresh segment and propagate again")
        lo, hi = entry.range
        outside = [s for s in sorted(self.drawn) if not lo <= s <= hi]
        if outside:  # (a Logic.process(range=...) run): refused here, not by the engine in the worker
            raise InputError(f'"{name}" holds your slice {outside[0]}, outside slices {lo}-{hi}, the range its '
                             "propagation was limited to: undo the propagation and propagate again over a wider "
                             "range, or erase that slice")
        prompt = np.zeros(self.grid.shape, dtype=np.uint8)
        on_axis = np.moveaxis(prompt, entry.axis, 0)
        for s, m in self.drawn.items():
            on_axis[s] = m
        self.prompt = prompt
        self.previous = entry.previous_result()
        self.prompt_info = PromptInfo(axis=entry.axis, slices=sorted(self.drawn),
                                      plane=axis_plane_name(self.grid.ijk_to_ras, entry.axis), n_slices=n)
        self._init_job(volume_node, segmentation_node, segment_id, name, mode="replace", checkpoint=checkpoint,
                       device=device, range=entry.range, model=model, batch_size=batch_size, threads=threads,
                       cancel=cancel, progress=progress, intensity_gate=intensity_gate, memory_check=memory_check)

    # worker
    def _engine_options(self) -> dict:
        lo, hi = self.entry.range
        return {"axis": self.entry.axis, "previous": self.previous,
                "empty_slices": sorted(s for s in self.empty if lo <= s <= hi)}

    # reporting
    @property
    def recomputed(self) -> list[tuple[int, int]]:
        if self.result is None:
            return []
        return sorted(tuple(int(v) for v in iv) for ivs in self.result.recomputed.values() for iv in ivs)

    @property
    def n_recomputed(self) -> int:
        return int(sum(b - a + 1 for a, b in self.recomputed))

    def cleared_slices(self) -> list[int]:
        """Slices that held the object in the earlier result and are empty in this one, other than the
        ones the user erased or edited: what walls (erased slices) cut off, or walks that ended sooner."""
        if getattr(self, "_cleared_kept", None) is not None:  # (released)
            return list(self._cleared_kept)
        if self.result is None:
            return []
        other = tuple(a for a in range(3) if a != self.entry.axis)
        now = set(np.flatnonzero(np.asarray(self.result.mask).any(axis=other)).tolist())
        return sorted(set(self.entry.occupied_slices()) - now - set(self.empty) - set(self.edited))

    def summary(self) -> str:
        if getattr(self, "_summary_kept", None) is not None:  # (released)
            return self._summary_kept
        if self._state == "finished" and self.result is not None:
            edits = ", ".join(str(s) for s in self.edited[:8]) + (" ..." if len(self.edited) > 8 else "")
            word = "slice" if len(self.edited) == 1 else "slices"
            intervals = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.recomputed) or "none"
            text = (f"updated from {len(self.edited)} edited {word} ({edits}): {self.n_recomputed} of "
                    f"{self.slices_total} slices recomputed ({intervals}), {self.result.n_predicted} predicted "
                    f"in {self.elapsed:.1f} s")
            cleared = self.cleared_slices()
            walled = [c for c in cleared if self._beyond_a_new_wall(c)]  # (a re-review, session 31: all the
            ended = [c for c in cleared if c not in walled]  # cleared slices were said to be beyond one)
            for group, why in ((walled, "beyond a slice you erased, where the object is absent (draw on a slice "
                                        "there to bring {} back)"),
                               (ended, "the walks from your edits ended sooner (draw on a slice there if the object "
                                       "goes on)")):
                if group:
                    plural = len(group) > 1
                    text += (f"; slice{'s' if plural else ''} {runs_text(group)} no longer hold{'' if plural else 's'} "
                             f"the object: " + why.format("them" if plural else "it"))
            gaps = self.new_gaps()
            if gaps:  # as the command line's update note (a trial, session 45: the panel said nothing of it)
                plural = len(gaps) > 1
                text += (f"; erased on slice{'s' if plural else ''} {runs_text(gaps)}, between drawn slices: the "
                         "object is absent there, a gap in the result (draw on "
                         f"{'them' if plural else 'it'} again if the object goes on there)")
            return text
        return super().summary()

    def new_gaps(self) -> list[int]:
        """Slices erased in this update that lie between two drawn slices: walls no walk crosses, so
        the object has a gap there."""
        drawn = sorted(self.drawn)
        if len(drawn) < 2:
            return []
        walls = set(self.empty) - set(self.entry.empty_keyframes)
        return sorted(w for w in walls if drawn[0] < w < drawn[-1])

    def _beyond_a_new_wall(self, index: int) -> bool:
        """Whether a slice erased in this update lies between ``index`` and the drawn slice nearest to
        it on the way there (so that wall cut it off)."""
        walls = set(self.empty) - set(self.entry.empty_keyframes)
        drawn = sorted(self.drawn)
        if not walls or not drawn:
            return False
        below = max((d for d in drawn if d < index), default=None)
        above = min((d for d in drawn if d > index), default=None)
        return any((below is not None and below < w < index) or (above is not None and index < w < above)
                   for w in walls)

    # history
    def _empty_keyframes(self):
        return self.empty

    def _edited_slices(self):
        return self.edited

    def _carried_reviews(self, recomputed) -> set:
        """Reviews stay valid on slices the update neither recomputed nor took from the user."""
        changed = set(self.edited)
        for a, b in recomputed:
            changed.update(range(a, b + 1))
        return {s for s in self.entry.reviewed if s not in changed}

    def _parent_entry(self):
        import dataclasses  # noqa: PLC0415

        return dataclasses.replace(self.entry, parent=None)  # one level: memory stays bounded


def update_segment(volume_node, segmentation_node, segment_id: str, history: PropagationHistory, *,
                   checkpoint=None, device: str = "cpu", model=None, progress=None, cancel=None,
                   memory_check: bool = True) -> SegmentUpdate:
    """"Update from my edits", synchronously: build a ``SegmentUpdate``, run it on the calling thread
    and apply it (recorded in ``history``). Returns the applied job (``summary()``, ``recomputed``,
    ``result.n_predicted``). Raises InputError, CheckpointError or PropagationCancelled; on any
    error the segmentation is unchanged (``memory_check``: as in ``propagate_segment``)."""
    job = SegmentUpdate(volume_node, segmentation_node, segment_id, history, checkpoint=checkpoint, device=device,
                        model=model, cancel=cancel, progress=progress, memory_check=memory_check)
    _run_and_apply(job, history, memory_check)
    return job


QUEUE_OUTCOMES = ("written", "empty", "result", "propagated", "complete", "too many", "skipped", "not written",
                  "failed", "cancelled", "not started")
SOURCE_TAG = "PAMSegment.Source"  # on a segment output "new" added: the ID of the segment it was propagated from


class SegmentQueue:
    """What "Propagate all drawn segments" goes through: the segments of one segmentation, in its
    order, one propagation at a time (each is a ``SegmentPropagation`` of its own: written, and
    undone, on its own), and what became of each. Bookkeeping only (main thread): the caller takes
    the next job with ``start_next(...)``, runs it and says what became of it with ``record(outcome,
    detail)`` (``after_failure(job)`` for a failed one), or ends the queue with ``stop(...)``. The
    segment list is taken when the queue is made, so segments a run adds (mode "new") are not
    propagated in turn.

    ``outcomes``: (segment id, name, outcome, detail) in the order the segments ended, the outcome
    one of ``QUEUE_OUTCOMES``: "written" (detail: the result's notes, "" if none); "empty" (no
    voxel: passed over); "result" (a PAM result: detail "" where it still holds it, "edited" where
    it was edited since: an update's to make); "propagated" (mode "new": propagated before into a
    new segment that still holds its result, named in the detail); "complete" (filled on three or
    more neighbouring slices: a finished 3D segment, not a drawing; detail: where); "too many" (on
    more slices than keyframes can be, or solid along every axis; detail: where); "skipped"
    (refused before it ran: outside the volume, not enough memory...); "not
    written" (ran, but the write was refused, e.g. the segment was edited meanwhile); "failed";
    "cancelled"; "not started" (after a stop). Each left as it was.
    """

    def __init__(self, volume_node, segmentation_node, segment_ids=None, mode: str = "replace"):
        segmentation = segmentation_node.GetSegmentation()
        if segment_ids is None:
            segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        self.volume_node, self.segmentation_node, self.mode = volume_node, segmentation_node, mode
        self.segment_ids = tuple(str(s) for s in segment_ids)
        if len(set(self.segment_ids)) != len(self.segment_ids):
            raise InputError("a segment is listed twice; list each segment once")
        unknown = [s for s in self.segment_ids if segmentation.GetSegment(s) is None]
        if unknown:
            raise InputError(f"the segmentation has no segment of ID {', '.join(repr(s) for s in unknown[:5])}")
        self._names = {s: self._name_now(s) or s for s in self.segment_ids}
        self._next = 0
        self.current: str | None = None
        self.outcomes: list[tuple[str, str, str, str]] = []
        self.stopped = ""  # why the queue ended before its last segment ("" while running or when it did not)
        self._volume_noted = False  # the volume's own note (a label map?) said for a segment already
        # Without the caller's history (a script's propagate_segments): results saved with the segments
        # are still read back from their records, into this
        self._records = PropagationHistory()

    def volume_notes_once(self, notes: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``notes`` (``segment_notes``) without the note about the volume itself (``"labelmap"``: it
        looks like a label map) once an earlier segment of this queue had it: one volume, said once
        (a review, session 46: the same long note in every segment's line of the summary)."""
        out = []
        for kind, text in notes:
            if kind == "labelmap":
                if self._volume_noted:
                    continue
                self._volume_noted = True
            out.append((kind, text))
        return out

    @property
    def total(self) -> int:
        return len(self.segment_ids)

    @property
    def position(self) -> int:
        """1-based place of the current segment in the queue (0 before the first)."""
        return self._next

    @property
    def done(self) -> bool:
        return self.current is None and (bool(self.stopped) or self._next >= self.total)

    def _name_now(self, segment_id: str) -> str | None:
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        return None if segment is None else segment.GetName()

    def name(self, segment_id: str) -> str:
        """The segment's name now (the one it had when last seen, once deleted)."""
        now = self._name_now(segment_id)
        if now:
            self._names[segment_id] = now
        return self._names.get(segment_id, segment_id)

    def next(self) -> str | None:
        """The next segment to propagate, or None when the queue has ended."""
        if self.current is not None:
            raise PAMError(f'segment "{self.name(self.current)}" has not been recorded yet')
        if self.stopped or self._next >= self.total:
            return None
        self.current = self.segment_ids[self._next]
        self._next += 1
        return self.current

    def start_next(self, make, history: "PropagationHistory | None" = None, seconds: float | None = None):
        """Make the job of the next segment that can be propagated: ``make(segment_id)`` returns it,
        not started (the caller starts or runs it), raising InputError for a segment it refuses.
        Segments that are no drawing to propagate are recorded and passed over: deleted, empty,
        refused (outside the volume, not enough memory: no "run it anyway" in a queue), PAM results
        (``history`` remembers them or their segment says so: a result to update, whose every slice
        would be taken as drawn, also once edited, unless erased and drawn again), with mode "new"
        drawings propagated before into a new segment that still holds its result, and finished 3D
        segments: filled on neighbouring slices three of the segment's own slices thick or more
        (specks left out: a small organ drawn slice by slice passes the keyframe limits and would be
        rewritten), or on more slices than keyframes can be, or refused for their shape while solid
        along every axis (a thin curved structure). Returns the job, or None once the queue has ended
        (also when its volume or segmentation left the scene). ``seconds``: pass over segments for at
        most about this long, then return None with the queue not ``done`` (call again): a panel lets
        its application draw and take a Cancel between segments passed over (at 512 x 512 x 300 each
        takes about 0.08 s: a hundred finished organs froze Slicer for seconds)."""
        since, looked = time.perf_counter(), False
        while not (looked and seconds is not None and time.perf_counter() - since >= seconds) and \
                (segment_id := self.next()) is not None:
            looked = True
            if self.segmentation_node.GetScene() is None or self.volume_node.GetScene() is None:
                self.stop("the volume or the segmentation was removed", "not started")
                return None
            if self.segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
                self.record("skipped", "it was deleted")
                continue
            try:
                held = self._held_result(segment_id, history)
            except Exception:  # noqa: BLE001 - unreadable or too large to read here: the job says why
                held = None
            if held is not None and held[0] != "tagged":
                self.record(*held)
                continue
            tagged = held is not None  # a PAM result edited since, or erased and drawn again
            try:
                job = make(segment_id)
            except EmptySegment:
                self.record("empty")
                continue
            except NotEnoughMemory as exc:
                self.record("skipped", exc.reason)
                continue
            except DrawnIn3D as exc:  # on too many slices to be keyframes: a finished segment
                self._finished(tagged, "too many", f"on {exc.where}")
                continue
            except PaintedAcross as exc:  # bands of one outline painted across an oblique volume, or a finished
                # structure on it (a rib: "erase the drawing and draw it again" would destroy it): told by its
                # thickness along the world's axes (an outline painted in a RAS view is thin along one of them)
                if tagged or self._solid_in_world(segment_id):
                    self._finished(tagged, "too many", "solid along every axis")
                else:
                    self.record("skipped", str(exc))
                continue
            except InputError as exc:
                if tagged or self._solid(segment_id):  # (a thin curved organ "drawn on more than one plane")
                    self._finished(tagged, "too many", "solid along every axis")
                else:
                    self.record("skipped", str(exc))
                continue
            run = self._filled_run(job)
            if run is not None:  # (the job made is let go unstarted: its copy of the volume with it)
                self._finished(tagged, "complete", f"{job.prompt_info.plane} slices {run[0]}-{run[1]}")
                continue
            return job
        return None

    def _finished(self, tagged: bool, outcome: str, detail: str) -> None:
        """Record the current segment as filled in 3D: a PAM result edited since where it was one."""
        self.record(*(("result", "edited") if tagged else (outcome, detail)))

    def _filled_run(self, job) -> tuple[int, int] | None:
        """(first, last) drawn slice of ``job`` (along its axis, on the volume's grid) when its segment is
        a finished 3D one, None for a drawing: three or more neighbouring slices filled, counted on the
        segment's own slices where its grid is parallel to the job's axis and thicker (a threshold in the
        volume's slices cannot tell two slices of a 1.3x coarser grid from three: a fuzz, session 42),
        else on the volume's (the volume's own grid; a finer one: one volume slice is three slices of a
        grid oversampled x3). Slices holding a speck (under 5 % of the largest, or 3 voxels) are left out."""
        info = job.prompt_info
        grid = np.asarray(job.grid.ijk_to_ras, dtype=np.float64)[:3, :3]
        along = grid[:, 2 - info.axis]  # (array axis k, j, i is the matrix's column 2, 1, 0)
        step = float(np.linalg.norm(along))
        own = _own_matrix(self.segmentation_node, job.segment_id)  # (the grid first: voxels read only if need be)
        thick = step
        if own is not None and step > 0:
            sides = np.linalg.norm(own, axis=0)
            cosines = np.abs(own.T @ (along / step)) / sides
            column = int(np.argmax(cosines))  # the own grid's i, j or k most parallel to the job's axis
            if cosines[column] > _PARALLEL and sides[column] > step * _THICKER:
                found = _own_voxels_box(self.segmentation_node.GetSegmentation().GetSegment(job.segment_id))
                if found is not None:
                    per_slice = np.count_nonzero(found[0], axis=tuple(a for a in range(3) if a != 2 - column))
                    first, last = _longest_run(np.flatnonzero(per_slice >= max(3, 0.05 * int(per_slice.max()))))
                    return (min(info.slices), max(info.slices)) if last - first + 1 >= 3 else None
            # an own grid oblique to the axis: in the volume's slices, more than two of its own slices can cover
            thick = max(float(np.max(cosines * sides)), step)
            thick = step if thick <= step * _THICKER else thick
        counts = {s: int(np.count_nonzero(np.take(job.prompt, s, axis=info.axis))) for s in info.slices}
        largest = max(counts.values(), default=0)
        # (a speck: a stray click; a tapered end slice of a finished organ holds more: a third of the largest
        # was too much, a fourth review: TotalSegmentator's 8/28/34-voxel structure was propagated)
        first, last = _longest_run([s for s, n in counts.items() if n >= max(3, 0.05 * largest)])
        covered_by_two = int(np.ceil(2 * thick / step - 1e-6)) if step > 0 else 2
        return (min(info.slices), max(info.slices)) if last - first + 1 > max(covered_by_two, 2) else None

    def _solid(self, segment_id: str) -> bool:
        """Whether the segment, on its own grid, spans runs of three or more of the volume's slices' worth of
        its own slices along every axis, holding two and a half of its largest slice's worth of voxels or
        more (per volume slice's worth): a finished structure (a rib, a vessel), not a drawing refused for
        a stray stroke (one volume slice is three slices of a grid oversampled x3)."""
        found = _own_voxels_box(self.segmentation_node.GetSegmentation().GetSegment(segment_id))
        if found is None:
            return False
        box, _, matrix = found
        sides = np.linalg.norm(matrix[:3, :3], axis=0)  # (i, j, k)
        volume_steps = np.linalg.norm(_grid_of(self.volume_node).ijk_to_ras[:3, :3], axis=0)
        total = int(np.count_nonzero(box))
        for ax in range(3):
            per = max(1.0, float(np.min(volume_steps)) / float(sides[2 - ax]))  # own slices per volume slice
            per_slice = np.count_nonzero(box, axis=tuple(a for a in range(3) if a != ax))
            first, last = _longest_run(np.flatnonzero(per_slice >= max(3, 0.05 * int(per_slice.max()))))
            if total < 2.5 * per * int(per_slice.max()) or last - first + 1 < 3 * per - 1e-6:
                return False
        return True

    def _solid_in_world(self, segment_id: str) -> bool:
        """Whether the segment's own voxels span runs of four or more of its largest voxel side along each
        of the world's (RAS) axes: a finished structure, not an outline painted in a RAS-aligned slice
        view (its voxels lie within about one voxel of the view's plane)."""
        found = _own_voxels_box(self.segmentation_node.GetSegmentation().GetSegment(segment_id))
        if found is None:
            return False
        box, corner, matrix = found
        ijk = np.argwhere(box)[:, ::-1] + corner  # (k, j, i) in the box -> (i, j, k) of the labelmap
        world = ijk @ matrix[:3, :3].T + matrix[:3, 3]
        size = float(np.max(np.linalg.norm(matrix[:3, :3], axis=0)))  # (an oblique voxel's band: about one)
        for w in range(3):
            bins = np.unique(np.floor(world[:, w] / size).astype(np.int64))
            first, last = _longest_run(bins)
            if last - first + 1 < 4:
                return False
        return True

    def _held_result(self, segment_id: str, history) -> tuple[str, str] | None:
        """("result", "") for a segment that holds the PAM result ``history`` remembers, ("tagged", "")
        for one that was a PAM result and was edited since (a result still when it is filled slice after
        slice; a drawing when erased and drawn again), ("propagated", the result segment's name) for a
        drawing propagated before into a new segment that still holds its result (mode "new"), or None
        for a segment to propagate."""
        history = history if history is not None else self._records
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        entry = history.get(self.segmentation_node, segment_id)
        if entry is not None or _segment_tag(segment, RUN_TAG):
            holds = entry is not None and _holds_result(history, self.segmentation_node, segment_id, self.volume_node)
            return ("result", "") if holds else ("tagged", "")
        if self.mode != "new":
            return None
        segmentation = self.segmentation_node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            other, other_id = segmentation.GetNthSegment(n), segmentation.GetNthSegmentID(n)
            if other_id == segment_id or _segment_tag(other, SOURCE_TAG) != segment_id:
                continue
            # Its tag says it was made from this drawing. Passed over while it holds its result, as this
            # session's runs, its updates or the record saved with the scene say, or, where nothing says
            # (a script's runs without a history), while it holds at least half as many voxels as the
            # drawing: a reloaded scene's drawings, whose
            # results were read back from their records as not "created" by this session, were propagated
            # again into "(PAM 2)" (a trial, session 47).
            if history.get(self.segmentation_node, other_id) is not None:
                held = _holds_result(history, self.segmentation_node, other_id, self.volume_node)
            else:  # (a result mostly erased, a few stray voxels left, holds the drawing back no more: a re-review)
                kept = _own_voxel_count(other)
                held = kept > 0 and 2 * kept >= _own_voxel_count(segment)
            if held:
                return "propagated", other.GetName()
        return None

    def after_failure(self, job) -> bool:
        """Note the current segment's failed job. A refusal of its drawing (an InputError from the
        engine) passes over it (True: go on); any other failure (a broken checkpoint, a server out of
        reach or failing, memory) would fail the segments after it too, and ends the queue (False)."""
        if isinstance(job.exception, InputError):
            self.record("skipped", job.error or str(job.exception))
            return True
        self.stop("failed", "failed", job.error or type(job.exception).__name__)
        return False

    def record(self, outcome: str, detail: str = "") -> None:
        """What became of the current segment."""
        if outcome not in QUEUE_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(QUEUE_OUTCOMES)}, got {outcome!r}")
        if self.current is None:
            raise PAMError("no segment is being propagated")
        self.outcomes.append((self.current, self.name(self.current), outcome, " ".join(str(detail).split())))
        self.current = None

    def stop(self, why: str, outcome: str | None = None, detail: str = "") -> None:
        """End the queue early: the current segment (if any) gets ``outcome`` (and ``detail``),
        the segments after it are "not started". ``why``: "cancelled", "failed" or a phrase ("the
        volume or the segmentation was removed")."""
        if self.current is not None:
            self.record(outcome or "cancelled", detail)
        for segment_id in self.segment_ids[self._next:]:
            self.outcomes.append((segment_id, self.name(segment_id), "not started", ""))
        self._next = self.total
        self.stopped = why or "stopped"

    def of(self, *outcomes: str) -> list[tuple[str, str, str, str]]:
        return [o for o in self.outcomes if o[2] in outcomes]

    def summary(self) -> tuple[str, str]:
        """(a sentence for the panel's status line, its level: "ok", "warning" or "error")."""
        written = self.of("written")
        quoted = ", ".join(f'"{name}"' for _, name, _, _ in written)
        held = self.of("result")
        left = held or self.of("propagated", "complete", "too many")
        # drawn: what the queue propagated or tried to (the segments it did not reach are not known)
        drawn = len(self.of("written", "skipped", "not written", "failed", "cancelled"))
        parts = []
        if self.stopped:
            ended = self.of("cancelled", "failed")
            at = f' "{ended[0][1]}"' if ended else ""
            if ended and ended[0][2] == "failed":
                parts.append(f"Stopped: propagating{at} failed, nothing was changed in it ({_detail(ended[0][3])}).")
            elif self.stopped == "cancelled":
                parts.append(f"Cancelled{' while propagating' + at + ', which was left as it was' if at else ''}.")
            elif self.stopped == "failed":
                parts.append("Stopped by a failure (the Python console has the details).")
            else:
                parts.append(f"Stopped: {_detail(self.stopped)}.")
            if written:
                parts.append(f"Propagated before: {quoted} (to take one back, select it and press Undo propagation).")
            not_started = len(self.of("not started"))
            if not_started:
                parts.append(f"{not_started} segment{'s' if not_started > 1 else ''} not reached.")
        elif not drawn:
            parts.append("No segment of the segmentation holds a drawing to propagate" + (
                "; nothing was changed." if not left else "."))
        elif len(written) == drawn:
            parts.append(f"Propagated all {drawn} drawn segments: {quoted}." if drawn > 1
                         else f"Propagated the drawn segment {quoted}.")
        else:
            parts.append(f"Propagated {len(written)} of {drawn} drawn segment{'s' if drawn > 1 else ''}"
                         + (f": {quoted}." if written else "."))
        checks = [(name, detail) for _, name, _, detail in written if detail]
        if checks:
            parts.append("Check: " + "; ".join(f'"{name}" ({_detail(detail)})' for name, detail in checks) + ".")
        passed = self.of("skipped", "not written")
        if passed:  # segments passed over for one reason named together (a server's or memory's limit, say)
            why: dict[str, list[str]] = {}
            for _, name, outcome, detail in passed:
                why.setdefault(("not written: " if outcome == "not written" else "") + _detail(detail, name),
                               []).append(f'"{name}"')
            parts.append("Not propagated: " + "; ".join(f"{', '.join(names)} ({text})" for text, names in why.items())
                         + ".")
        groups = (
            ([f'"{n}"' for _, n, _, d in held if not d],
             "Left as {they} {hold} {a}PAM result{s}: {names} (to change {it}, fix its slices and press Update "
             "from my edits)."),
            ([f'"{n}"' for _, n, _, d in held if d],
             "Left as {they} {are}, {a}PAM result{s} edited since: {names} (select {it} and press Update from my "
             "edits to propagate the edits)."),
            ([f'"{n}" (into "{d}")' for _, n, _, d in self.of("propagated")],
             "Propagated before into {a}new segment{s}, left as {they} {are}: {names} (delete a result segment to "
             "propagate its drawing again)."),
            ([f'"{n}" ({d})' for _, n, _, d in self.of("complete")],
             "Left as {they} {are}, {a}3D segment{s} filled slice after slice, not {a}drawing{s}: {names} (to "
             "propagate {it} from {its} slices anyway, select {it} and press Propagate)."),
            ([f'"{n}" ({d})' for _, n, _, d in self.of("too many")],
             "Left as {they} {are}, {a}3D segment{s}: {names} (a drawing to propagate is on one slice or a few "
             "keyframes: at most 32, on at most half the slices)."))
        for items, text in groups:
            if items:
                one = len(items) == 1
                parts.append(text.format(they="it" if one else "they", hold="holds" if one else "hold",
                                         are="is" if one else "are", a="a " if one else "", s="" if one else "s",
                                         it="it" if one else "one", its="its", names=", ".join(items)))
        empty = len(self.of("empty"))
        if empty:
            parts.append(f"{empty} empty segments were left as they were." if empty > 1
                         else "1 empty segment was left as it was.")
        if self.stopped:
            level = "warning" if written or self.stopped == "cancelled" else "error"
        elif not drawn:
            level = "warning" if left else "error"
        elif passed:
            level = "warning" if written else "error"
        else:
            level = "warning" if checks else "ok"
        return " ".join(parts), level


def _longest_run(slices) -> tuple[int, int]:
    """(first, last) of the longest run of neighbouring slices in ``slices`` ((0, -1) for none)."""
    best, start, prev = (0, -1), None, None
    for s in sorted(int(v) for v in slices):
        start = s if prev is None or s != prev + 1 else start
        if s - start > best[1] - best[0]:
            best = (start, s)
        prev = s
    return best


def segment_notes(result) -> list[tuple[str, str]]:
    """A written result's notes for one segment, (kind, text) as ``kinds_of_notes`` gives them without
    an update's "dropped" (a propagation's own) and without the "label 1: " in front."""
    return [(kind, note.split(": ", 1)[1] if note.startswith("label ") else note)
            for kind, note in result.kinds_of_notes() if kind != "dropped"]


def written_notes(result=None, notes=None) -> str:
    """A written result's notes (``segment_notes``, or ``notes`` already taken), as a queue's summary
    lists them (the panel's status line shows them after a single Propagate): "" when it has none."""
    notes = segment_notes(result) if notes is None else notes
    return "; ".join("it stopped right next to the drawn slice, where the tissue changed; if the structure goes on, "
                     "uncheck 'Stop where the tissue changes' and propagate it again" if kind == "drift" else text
                     for kind, text in notes)


def _detail(text: str, name: str | None = None) -> str:
    """A refusal's text for a list: without the segment's own name in front, at most 240 characters."""
    text = " ".join(str(text).split()).rstrip(".")
    if name is not None and text.startswith(f'segment "{name}" on volume "'):
        rest = text.split('": ', 1)
        text = rest[1] if len(rest) == 2 else text
    return text if len(text) <= 240 else text[:237].rstrip() + "..."


def propagate_segments(volume_node, segmentation_node, segment_ids=None, *, mode: str = "replace", checkpoint=None,
                       device: str = "cpu", model=None, history: PropagationHistory | None = None,
                       progress=None, cancel=None, intensity_gate: bool | None = None,
                       memory_check: bool = True) -> SegmentQueue:
    """Propagate every drawn segment (or those of ``segment_ids``) one after another, synchronously,
    each as ``propagate_segment`` does; what "Propagate all drawn segments" does in the panel.
    Segments without a voxel are passed over, one that cannot be propagated (drawn in 3D, holding
    the PAM result ``history`` remembers: update it instead) is skipped with why, and the others
    go on. A run that fails (a broken checkpoint, a server out of reach) stops the queue; a
    ``cancel`` (a ``CancelToken``) ends it leaving the segment being propagated as it was, the ones
    written before it written (each its own Undo with ``history``). ``progress(fraction,
    message)`` gets each segment's progress. Returns the ``SegmentQueue`` (``outcomes``,
    ``summary()``)."""
    from .propagate import CancelToken  # noqa: PLC0415

    cancel = cancel if cancel is not None else CancelToken()
    queue = SegmentQueue(volume_node, segmentation_node, segment_ids, mode=mode)

    def make(segment_id):
        return SegmentPropagation(volume_node, segmentation_node, segment_id, mode=mode, checkpoint=checkpoint,
                                  device=device, model=model, cancel=cancel, progress=progress,
                                  intensity_gate=intensity_gate, memory_check=memory_check)

    while not queue.done:
        if cancel.is_cancelled:
            queue.stop("cancelled")
            break
        job = queue.start_next(make, history)
        if job is None:
            break
        try:
            _run_queued(queue, job, history, memory_check)
        finally:
            job.release()  # (its copy of the volume and its result go before the next segment's job is made)
        model = job.model if job.model is not None else model  # loaded once, for the segments after
    return queue


def _run_queued(queue: SegmentQueue, job: SegmentPropagation, history, memory_check: bool) -> None:
    """Run one queued job on the calling thread, write its result and record what became of it."""
    job.run()
    if job.state == "cancelled":
        queue.stop("cancelled", "cancelled")
        return
    if job.state == "failed":
        if not queue.after_failure(job):
            job.log_failure()
        return
    try:
        job.apply(history=history, memory_check=memory_check)
    except InputError as exc:  # the write refused (the segment edited meanwhile, memory on a finer grid)
        queue.record("not written", str(exc))
    except Exception as exc:  # noqa: BLE001 - its text says whether the write was taken back; told in outcomes
        name = queue.name(queue.current)
        queue.stop(f'writing "{name}" failed', "not written", str(exc) or type(exc).__name__)
    else:
        queue.record("written", written_notes(notes=queue.volume_notes_once(segment_notes(job.result))))


def _holds_result(history, segmentation_node, segment_id: str, volume_node) -> bool:
    """Whether the segment holds the PAM result ``history`` remembers (``HistoryEntry.holds_result``),
    read on the volume it was propagated on (else ``volume_node`` if of its grid)."""
    entry = history.get(segmentation_node, segment_id) if history is not None else None
    volume = entry.volume_for(volume_node) if entry is not None else None
    if volume is None:
        return False
    return entry.holds_result(segment_mask(segmentation_node, segment_id, volume, check_memory="reading the segment"))


HOLDS_RESULT = ("it holds a PAM result: select it and press Update from my edits, or Undo propagation to get the "
                "drawing back")


def headless_scene():
    """A new MRML scene with the Colors, Data, Volumes and Segmentations logics registered, and
    ``slicer.mrmlScene``/``slicer.modules`` pointing at it, for use without the Slicer application
    (the ``slicer-core`` wheel: tests, benchmarks, batch scripts). Returns (scene, app logic,
    {name: logic}); the caller restores ``slicer.mrmlScene``/``slicer.modules`` if it needs to."""
    import types

    slicer = _slicer()
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Data", slicer.vtkSlicerDataModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for name, lg in logics.items()})
    return scene, app, logics

