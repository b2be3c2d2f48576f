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

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError, PAMError, PropagationCancelled

__all__ = [
    "MODES",
    "PAM_SUFFIX",
    "VolumeGrid",
    "PromptInfo",
    "SegmentPropagation",
    "propagate_segment",
    "volume_array",
    "segment_mask",
    "describe_prompt",
    "axis_plane_name",
    "write_segment_mask",
]

MODES = ("replace", "new")
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
        return f"{len(self.slices)} {self.plane} {word} ({idx} of {self.n_slices}), array axis {self.axis}"


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
    spacing_ijk = volume_node.GetSpacing()
    return VolumeGrid(
        shape=(int(dims[2]), int(dims[1]), int(dims[0])),
        spacing=(float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0])),
        ijk_to_ras=matrix,
    )


def volume_array(volume_node) -> tuple[np.ndarray, VolumeGrid]:
    """A float32 copy of the volume's voxels, (k, j, i), and its grid."""
    slicer = _slicer()
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume (a vector, tensor or missing volume cannot be propagated)")
    grid = _grid_of(volume_node)
    image = volume_node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f'volume "{volume_node.GetName()}" has {image.GetNumberOfScalarComponents()} '
                         "components per voxel; convert it to a single-component (scalar) volume first")
    array = np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True)
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f'volume "{volume_node.GetName()}" is not a 3D image (array shape {array.shape})')
    return array, grid


def _segment(segmentation_node, segment_id):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("select a segmentation")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise InputError(f'segment "{segment_id}" is not in segmentation "{segmentation_node.GetName()}"; '
                         "select a segment")
    return segment


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a uint8 0/1 array on the volume's voxel grid, (k, j, i).

    Slicer's export resamples from the segmentation's own geometry (and parent transform) to the
    volume's, so the mask lines up with ``volume_array`` whatever resolution the user segmented at.
    """
    slicer = _slicer()
    _segment(segmentation_node, segment_id)
    try:
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    except RuntimeError as exc:
        raise InputError(f"could not read the segment on the volume's grid: {exc}") from None
    return (np.asarray(array) > 0).astype(np.uint8)


def axis_plane_name(ijk_to_ras: np.ndarray, axis: int) -> str:
    """Anatomical name of the slices that are perpendicular to array ``axis`` (k, j, i order).

    A slice of constant k is spanned by the i and j directions; it is axial when its normal, the
    k direction, points mostly superior-inferior, and so on. Slices more than ~25 degrees off every
    anatomical plane are "oblique".
    """
    column = 2 - int(axis)  # array axis 0 is k = IJK column 2
    normal = np.asarray(ijk_to_ras, dtype=float)[:3, column]
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return "oblique"
    normal = np.abs(normal) / norm
    dominant = int(np.argmax(normal))
    if normal[dominant] < np.cos(np.deg2rad(25)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[dominant]  # normal along R, A or S


def _prompt_info(prompt: np.ndarray, grid: VolumeGrid) -> PromptInfo:
    from .propagate import find_prompt_slices  # noqa: PLC0415 - keeps torch out of `import mrml`

    axis, slices = find_prompt_slices(prompt)
    lab = next(iter(slices))
    return PromptInfo(axis=axis, slices=list(slices[lab]), plane=axis_plane_name(grid.ijk_to_ras, axis),
                      n_slices=int(prompt.shape[axis]))


def describe_prompt(volume_node, segmentation_node, segment_id: str) -> PromptInfo:
    """Which slices of the volume the segment is drawn on (for the panel). Raises InputError."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume")
    grid = _grid_of(volume_node)
    mask = segment_mask(segmentation_node, segment_id, volume_node)
    return _prompt_info(mask, grid)


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
    """Replace the segment's content inside the volume's extent by ``mask`` (k, j, i) in one call.

    Uses the Segment Editor's own write (``SetBinaryLabelmapToSegment``, replace mode) rather than
    ``slicer.util.updateSegmentBinaryLabelmapFromArray``: the latter places the array on the
    reference volume's grid but ignores the volume's parent transform, whereas the export used to
    read the prompt honours it, so a transformed volume would get its result shifted. Here the
    labelmap is built from the recorded grid and mapped through the transform between the volume
    and the segmentation. Other segments keep their voxels (Slicer moves an overlapping segment to
    its own layer rather than overwriting), and nothing outside the volume's extent changes.
    """
    slicer = _slicer()
    import vtk  # noqa: PLC0415
    from vtk.util import numpy_support  # noqa: PLC0415

    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    if tuple(mask.shape) != tuple(grid.shape):
        raise InputError(f"result shape {mask.shape} does not match the volume's grid {grid.shape}")
    k, j, i = mask.shape
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(i, j, k)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = mask.ravel()  # x fastest = C order
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(grid.ijk_to_ras))

    volume_transform = volume_node.GetParentTransformNode() if volume_node is not None else None
    segmentation_transform = segmentation_node.GetParentTransformNode()
    if volume_transform is not segmentation_transform:
        to_segmentation = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_transform, segmentation_transform, to_segmentation)
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, to_segmentation)

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            labelmap.GetExtent()):
        raise PAMError(f'Slicer could not write the result into segment "{segment_id}"')


def _add_result_segment(segmentation_node, source_segment_id: str) -> str:
    """A new empty segment "<name> (PAM)" with the source segment's colour and terminology."""
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSegment(source_segment_id)
    segment = slicer.vtkSegment()
    segment.DeepCopyMetadata(source)  # colour, terminology tags
    segment.SetName(_unique_segment_name(segmentation, source.GetName()))
    segment.SetColor(source.GetColor())
    new_id = segmentation.GenerateUniqueSegmentID(source_segment_id + "_PAM")
    if not segmentation.AddSegment(segment, new_id):
        raise PAMError("Slicer could not add the result segment")
    return new_id


# ----------------------------------------------------------------------------------------------
# The engine call (worker thread) - tests replace these two functions
# ----------------------------------------------------------------------------------------------


def _load_model(checkpoint, device: str):
    from .checkpoints import load_model  # noqa: PLC0415

    return load_model(checkpoint, device=device)


def _run_engine(image, prompt, spacing, *, model, device, range, progress, cancel,  # noqa: A002
                batch_size=16, threads=None):
    """Run PAMSegmentLib.propagate. Runs on the worker thread: arrays in, result out, no MRML."""
    from .propagate import propagate  # noqa: PLC0415

    return propagate(image, prompt, spacing, model, range=range, device=device, progress=progress, cancel=cancel,
                     batch_size=batch_size, threads=threads)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


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
    to share; ``progress`` an extra ``progress(fraction, message)`` listener (called on the worker).
    """

    def __init__(self, volume_node, segmentation_node, segment_id: str, *, mode: str = "replace",
                 checkpoint=None, device: str = "cpu", range=None, model=None,  # noqa: A002
                 batch_size: int = 16, threads: int | None = None, cancel=None, progress=None):
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        segment = _segment(segmentation_node, segment_id)
        self.image, self.grid = volume_array(volume_node)
        self.prompt = segment_mask(segmentation_node, segment_id, volume_node)
        try:
            self.prompt_info = _prompt_info(self.prompt, self.grid)
        except InputError as exc:
            raise InputError(f'segment "{segment.GetName()}" on volume "{volume_node.GetName()}": {exc}') from None

        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.segment_name = segment.GetName()
        self.mode = mode
        self.checkpoint = None if checkpoint in (None, "") else str(checkpoint)
        self.device = device
        self.range = None if range is None else (int(range[0]), int(range[1]))
        self.model = model
        self.batch_size = batch_size
        self.threads = threads

        from .propagate import CancelToken  # noqa: PLC0415

        self._cancel = cancel if cancel is not None else CancelToken()
        self._listener = progress
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state = "pending"
        self._progress = 0.0
        self._message = "waiting to start"
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._t_engine: float | None = None
        self.result = None
        self.exception: BaseException | None = None
        self.error = ""
        self.applied_segment_id: str | None = None

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

    def summary(self) -> str:
        """One line for the status label."""
        if self._state == "finished" and self.result is not None:
            lab = next(iter(self.result.slice_range))
            first, last = self.result.slice_range[lab]
            return (f"{last - first + 1} {self.prompt_info.plane} slices ({first}-{last}), "
                    f"{self.result.n_predicted} predicted in {self.elapsed:.1f} s")
        if self._state == "failed":
            return f"failed: {self.error}"
        if self._state == "cancelled":
            return "cancelled; the segmentation was not changed"
        return self._message

    # -- running ------------------------------------------------------------------------------

    def start(self) -> "SegmentPropagation":
        """Run the engine on a background thread; returns immediately."""
        with self._lock:
            if self._state != "pending":
                raise PAMError(f"this propagation was already started ({self._state})")
            self._state = "running"
            self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._work, name="PAMSegment propagation", daemon=True)
        self._thread.start()
        return self

    def run(self) -> "SegmentPropagation":
        """Run the engine on the calling thread (CLI, tests, ``propagate_segment``)."""
        with self._lock:
            if self._state != "pending":
                raise PAMError(f"this propagation was already started ({self._state})")
            self._state = "running"
            self._t_start = time.perf_counter()
        self._work()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ends (or ``timeout`` seconds). True when the job is done."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        """Ask the worker to stop at the next batch. Nothing is ever written by a cancelled job."""
        self._cancel.cancel()
        with self._lock:
            if self._state == "pending":
                self._finish("cancelled", "cancelled before it started")

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
            result = _run_engine(self.image, self.prompt, self.grid.spacing, model=model, device=self.device,
                                 range=self.range, progress=self._on_progress, cancel=self._cancel,
                                 batch_size=self.batch_size, threads=self.threads)
            if tuple(result.mask.shape) != self.grid.shape:
                raise PAMError(f"the engine returned a {result.mask.shape} mask for a {self.grid.shape} volume")
        except PropagationCancelled:
            with self._lock:
                self._finish("cancelled", "cancelled; the segmentation was not changed")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the panel, not a dead thread
            if self._cancel.is_cancelled:  # the user stopped it (e.g. while the model was loading)
                with self._lock:
                    self._finish("cancelled", "cancelled; the segmentation was not changed")
                return
            if not isinstance(exc, PAMError):
                log.exception("PAMSegment propagation failed")
            with self._lock:
                self.exception = exc
                self.error = str(exc) or type(exc).__name__
                self._finish("failed", self.error)
        else:
            with self._lock:
                self.result = result
                self._progress = 1.0
                self._finish("finished", "done")

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
        if self.mode == "replace":
            current = segment_mask(self.segmentation_node, self.segment_id, self.volume_node)
            if not np.array_equal(current, self.prompt):
                raise InputError(
                    f'segment "{self.segment_name}" was edited while propagating, so replacing it would lose '
                    "the edit; nothing was written. Run again, or use output 'new segment'."
                )

    def apply(self) -> str:
        """Write the result into the segmentation (main thread only); returns the segment id written.

        In "replace" mode the prompt segment is replaced inside the volume's extent; in "new" mode a
        segment "<name> (PAM)" is added. One call writes the whole mask, so the Segment Editor sees
        one change. Calling it again returns the same id without writing twice.
        """
        if threading.current_thread() is not threading.main_thread():
            raise PAMError("apply() must run on the main thread (it writes MRML nodes)")
        if self.applied_segment_id is not None:
            return self.applied_segment_id
        if self._state != "finished":
            raise PAMError(f"nothing to apply: the propagation is {self._state}"
                           + (f" ({self.error})" if self.error else ""))
        self._check_scene_unchanged()
        mask = self.result.mask > 0
        node = self.segmentation_node
        was_modifying = node.StartModify()
        try:
            target = self.segment_id
            if self.mode == "new":
                target = _add_result_segment(node, self.segment_id)
            try:
                write_segment_mask(mask, self.grid, node, target, self.volume_node)
            except Exception:
                if target != self.segment_id:
                    node.GetSegmentation().RemoveSegment(target)
                raise
        finally:
            node.EndModify(was_modifying)
        self.applied_segment_id = target
        return target


def propagate_segment(volume_node, segmentation_node, segment_id: str, *, mode: str = "replace",
                      checkpoint=None, device: str = "cpu", range=None, model=None,  # noqa: A002
                      progress=None, cancel=None) -> str:
    """Propagate a segment drawn on one (or a few) slices through the volume, synchronously.

    Reads the volume and the segment on the volume's grid, runs the engine on the calling thread,
    writes the result in one step and returns the id of the segment written (the same segment for
    ``mode="replace"``, a new "<name> (PAM)" segment for ``mode="new"``). ``progress`` is called as
    ``progress(fraction, message)``; ``cancel`` is a ``CancelToken``. Raises InputError,
    CheckpointError or PropagationCancelled; on any error the segmentation is unchanged.
    """
    job = SegmentPropagation(volume_node, segmentation_node, segment_id, mode=mode, checkpoint=checkpoint,
                             device=device, range=range, model=model, cancel=cancel, progress=progress)
    job.run()
    if job.state == "cancelled":
        raise PropagationCancelled("propagation cancelled; nothing was changed")
    if job.state == "failed":
        raise job.exception
    return job.apply()
