"""Session 43's review of the in-place segment read (mrml.segment_mask on the volume's own voxels):
each test fails on the code before its mend."""

from __future__ import annotations

import numpy as np

from conftest_mrml import *  # noqa: F401,F403
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node, matrix_from_array, slicer, vtk

from PAMSegmentLib import mrml as mrml_lib
from test_module_static import _edit, _propagated, _segment_array, _slicer  # noqa: F401
from test_module_static import drawn, module, mrml, panel  # noqa: F401,F811 - fixtures
from test_propagate_all import organs  # noqa: F401 - fixture


def _organ_drawn(shape, radii, brightness: float, noise: float = 0.0):
    """A bright ellipsoid in the middle of a float volume ("ct") and its middle slice drawn:
    (volume node, the ellipsoid, the drawing)."""
    organ = ellipsoid(shape, tuple(n // 2 for n in shape), radii)
    image = organ * brightness + (np.random.default_rng(0).normal(0, noise, shape) if noise else 0.0)
    volume = make_volume_node(image.astype(np.float32), name="ct")
    drawing = np.zeros(shape, np.uint8)
    drawing[shape[0] // 2] = organ[shape[0] // 2]
    return volume, organ, drawing


def _layer_segmentation(reference_volume, ijk_to_world: np.ndarray, values: np.ndarray):
    """A segmentation whose one segment is stored as ``values`` (k, j, i) on the grid ``ijk_to_world``."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, values.shape[2] - 1, 0, values.shape[1] - 1, 0, values.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(matrix_from_array(ijk_to_world))
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.ravel()
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    sid = seg.GetSegmentation().AddEmptySegment("", "s", [0.5, 0.5, 0.5])
    seg.GetSegmentation().GetSegment(sid).AddRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    return seg, sid


def test_a_voxel_size_a_little_off_is_not_read_in_place_where_it_adds_up_along_the_axis(mrml_scene):
    """A stored grid whose voxels are 9e-5 larger than the volume's, three voxels apart: along a
    6000-voxel axis the stored voxel nearest to the volume's is one further on from i = 5556 (the
    tolerance was checked on each matrix element, not over the volume: 1776 voxels one off)."""
    n = 6000
    volume_matrix = np.eye(4)
    volume_matrix[:3, 3] = (1.0, 2.0, 3.0)
    volume = make_volume_node(np.zeros((2, 2, n), np.int16), volume_matrix)
    to_stored = np.eye(4)
    to_stored[0, 0], to_stored[0, 3] = 1 + 9e-5, 3
    stripes = np.zeros((2, 2, n + 20), np.uint8)
    stripes[..., ::2] = 1  # even stored columns
    seg, sid = _layer_segmentation(volume, volume_matrix @ np.linalg.inv(to_stored), stripes)
    nearest = (np.rint(to_stored[0, 0] * np.arange(n) + 3).astype(int) % 2 == 0).astype(np.uint8)
    mask = mrml_lib.segment_mask(seg, sid, volume)
    assert int(np.count_nonzero(mask[0, 0] != nearest)) == 0
    np.testing.assert_array_equal(mask, (slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume) > 0))


def test_a_segment_erased_to_nothing_on_a_finer_grid_reads_as_empty(mrml_scene):
    """Drawn and then erased whole on a segmentation grid twice as fine as the volume (Specify
    geometry): its layer keeps its extent but no voxel of its label, and Slicer's export of it fails
    (the read raised AttributeError: 'NoneType' object has no attribute 'GetDataType')."""
    shape = (6, 8, 10)
    base = np.diag([0.8, 0.9, 2.0, 1.0])
    volume = make_volume_node(np.zeros(shape, np.int16), base)
    fine = base.copy()
    fine[:3, :3] /= 2
    geometry = make_volume_node(np.zeros(tuple(2 * s for s in shape), np.int16), fine, name="fine")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(geometry)
    sid = seg.GetSegmentation().AddEmptySegment("", "s", [0.5, 0.5, 0.5])
    fine_shape = tuple(2 * s for s in shape)
    slicer.util.updateSegmentBinaryLabelmapFromArray(ellipsoid(fine_shape, (6, 8, 10), (3, 4, 5)).astype(np.uint8),
                                                     seg, sid, geometry)
    assert mrml_lib.segment_mask(seg, sid, volume).any()
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros(fine_shape, np.uint8), seg, sid, geometry)  # erased
    mask = mrml_lib.segment_mask(seg, sid, volume)
    assert mask.shape == shape and mask.dtype == np.uint8 and not mask.any()


def test_panel_undo_asks_when_the_volume_can_no_longer_be_read(panel, drawn, monkeypatch):  # noqa: F811
    """The user edits a slice of a result, then the volume's origin becomes NaN: the edit check cannot
    read the segment on it. Undo took that as "no edits" and discarded the edit without asking."""
    truth, volume, segmentation, segment_id = _propagated(panel, drawn, monkeypatch)
    edited = _segment_array(segmentation, segment_id, volume)
    edited[6] = False
    _edit(segmentation, segment_id, volume, edited)
    origin = volume.GetOrigin()
    volume.SetOrigin(float("nan"), 0.0, 0.0)
    asked = []
    monkeypatch.setattr(_slicer().util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or False)
    panel.ui.undoButton.click()
    assert len(asked) == 1, asked
    assert asked[0].startswith('Cannot check the segment for your edits before undoing: Volume "'), asked[0]
    assert "has no usable position" in asked[0] and "Undo anyway?" in asked[0]
    volume.SetOrigin(*origin)
    np.testing.assert_array_equal(_segment_array(segmentation, segment_id, volume), edited)  # declined: kept


def _bounding_box_four_passes(mask):
    """The engine's _bounding_box before session 43 (four passes over the whole array), the reference."""
    if not mask.any():
        return mask, (0,) * mask.ndim
    sl = []
    for ax in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        sl.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return mask[tuple(sl)], tuple(s.start for s in sl)


def test_bounding_box_in_one_pass_gives_the_same_box():
    """The engine's bounding box read in one pass over the whole array (then within the slices found)
    gives the box and the view the four passes gave: 400 random masks of 1 to 4 dimensions, boolean,
    label and float (NaN counts as set, as it did), empty ones, ones touching the array's edges."""
    from PAMSegmentLib.propagate import _bounding_box

    rng = np.random.default_rng(43)
    for n in range(400):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(rng.integers(1, 9)) for _ in range(ndim))
        kind = n % 4
        mask = np.zeros(shape, dtype=[bool, np.uint8, np.int16, np.float32][kind])
        for _ in range(int(rng.integers(0, 4))):  # a few set voxels anywhere (none: an empty mask)
            at = tuple(int(rng.integers(0, s)) for s in shape)
            mask[at] = [True, 7, -3, np.nan][kind]
        got, start = _bounding_box(mask)
        want, want_start = _bounding_box_four_passes(mask)
        assert start == want_start and got.shape == want.shape, (shape, start, want_start)
        np.testing.assert_array_equal(got, want)
        assert got.base is mask or got is mask  # a view, as before: no copy
    empty = np.zeros((0, 4, 4), bool)
    assert _bounding_box(empty)[1] == (0, 0, 0) and _bounding_box(empty)[0] is empty


def test_a_finished_segment_passed_over_copies_no_volume(mrml_scene, monkeypatch):
    """Propagate all drawn on a segmentation of finished organs: each one's job was made, the volume
    copied, then refused for its 3D shape (0.04 s and the volume's size each at 512 x 512 x 300). The
    copy now comes after the drawing's checks: the drawing's job copies it, the finished one's not."""
    volume, organ, drawing = _organ_drawn((24, 40, 40), (10, 12, 12), 100.0, noise=3.0)
    seg, ids = make_segmentation(volume, {"finished": organ.astype(np.uint8), "drawn": drawing})
    copies = []
    real = mrml_lib.volume_array
    monkeypatch.setattr(mrml_lib, "volume_array", lambda node: copies.append(node.GetName()) or real(node))
    from PAMSegmentLib.baselines import get_predictor

    queue = mrml_lib.propagate_segments(volume, seg, model=get_predictor("copy"), history=mrml_lib.PropagationHistory())
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("finished", "too many"),
                                                                            ("drawn", "written")]
    assert copies == ["ct"]  # the drawing's job only


def test_the_queue_passes_over_segments_a_step_at_a_time(mrml_scene):
    """start_next(seconds=...) returns after passing over segments for that long, the queue not done
    (the panel lets Slicer draw and take a Cancel between): with 0 s, one segment a call."""
    from test_propagate_all import SHAPE, _slice_only

    left = ellipsoid(SHAPE, (12, 24, 16), (8, 10, 10))
    volume = make_volume_node((left * 100.0).astype(np.float32), name="ct")
    seg, ids = make_segmentation(volume, {"nothing": np.zeros(SHAPE, np.uint8), "solid": left.astype(np.uint8),
                                          "left": _slice_only(left, 12)})
    queue = mrml_lib.SegmentQueue(volume, seg)
    from PAMSegmentLib.baselines import get_predictor

    def make(sid):
        return mrml_lib.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))

    seen = []
    for _ in range(2):
        assert queue.start_next(make, seconds=0) is None and not queue.done
        seen.append([outcome for _, _, outcome, _ in queue.outcomes])
    assert seen == [["empty"], ["empty", "too many"]]
    job = queue.start_next(make, seconds=0)
    assert job is not None and job.segment_id == ids["left"] and queue.position == 3
    job.run()
    job.apply()
    queue.record("written", "")
    assert queue.start_next(make, seconds=0) is None and queue.done
    assert queue.summary()[0].startswith('Propagated the drawn segment "left". Left as it is, a 3D segment: "solid"')


def _paused_after_first(panel, organs, monkeypatch):  # noqa: F811
    """The panel's Propagate all drawn on the organs (left, nothing, right, solid) passing over one
    segment at a time: paused after "left" is written and "nothing" passed over."""
    from test_propagate_all import ready

    volume, seg, ids, _ = organs
    import sys

    monkeypatch.setattr(sys.modules[type(panel).__module__], "QUEUE_STEP_SECONDS", 0.0)
    ui = ready(panel, volume, seg, monkeypatch)
    ui.propagateAllButton.click()
    first = panel.job
    assert first.segment_id == ids["left"] and first.wait(60)
    while panel.pollTimer.active:
        panel.pollTimer.fire()
    return ui


def test_the_panel_pauses_between_segments_passed_over_and_cancel_ends_it(panel, organs, monkeypatch):  # noqa: F811
    """Between segments passed over, Slicer draws and takes clicks: the progress says which segment is
    being checked, Cancel is on and ends the queue there (the finished organs of a large segmentation
    held Slicer for seconds, with no way to stop)."""
    from test_module_static import FakeTimer

    volume, seg, ids, _ = organs
    right_before = mrml_lib.segment_mask(seg, ids["right"], volume).copy()
    ui = _paused_after_first(panel, organs, monkeypatch)
    assert panel.queue is not None and not panel.queue.done
    assert ui.progressBar.format == "segment 2 of 4: checking"
    assert ui.cancelButton.enabled and not ui.propagateAllButton.enabled and not ui.propagateButton.enabled
    assert len(FakeTimer.deferred) == 1  # the pause's call, to go on
    assert ui.statusLabel.text == ('Propagate all drawn: checking the segments of "segmentation" for drawings (Cancel '
                                   "stops here)...") and ui.progressBar.value == 0
    ui.cancelButton.click()
    assert panel.queue is None
    assert ui.statusLabel.text == ('Cancelled. Propagated before: "left" (to take one back, select it and press Undo '
                                   'propagation). 2 segments not reached. 1 empty segment was left as it was.')
    FakeTimer.deferred.pop(0)()  # the pause's call, after the Cancel: nothing more
    assert panel.queue is None and panel.job.segment_id == ids["left"]
    np.testing.assert_array_equal(mrml_lib.segment_mask(seg, ids["right"], volume), right_before)
    assert ui.propagateAllButton.enabled and not ui.cancelButton.enabled


def test_the_panel_goes_on_after_a_pause(panel, organs, monkeypatch):  # noqa: F811
    from test_module_static import FakeTimer, poll_until_idle

    volume, seg, ids, _ = organs
    ui = _paused_after_first(panel, organs, monkeypatch)
    FakeTimer.deferred.pop(0)()  # Slicer's event loop calls it: "right" is propagated next
    assert panel.job.segment_id == ids["right"]
    poll_until_idle(panel, timeout=120)
    assert panel.queue is None
    assert ui.statusLabel.text.startswith('Propagated all 2 drawn segments: "left", "right". Left as it is, a 3D '
                                          'segment: "solid"'), ui.statusLabel.text


def test_a_cancelled_queues_pause_call_does_not_drive_the_next_queue(panel, organs, monkeypatch):  # noqa: F811
    """A review's probe: paused, Cancel, Propagate all again (that queue pauses too): the first queue's
    call, delivered late, drove the new queue a step early, and two chains of calls drove it from then
    on (a job not yet written then met the other chain: 'PAMError: segment "right" has not been
    recorded yet', the queue ended "failed" and the poll wrote the result anyway)."""
    from test_module_static import FakeTimer

    ui = _paused_after_first(panel, organs, monkeypatch)
    ui.cancelButton.click()
    ui.propagateAllButton.click()  # "left" holds a result now: passed over, and the new queue pauses
    second = panel.queue
    assert [(name, outcome) for _, name, outcome, _ in second.outcomes] == [("left", "result")]
    assert len(FakeTimer.deferred) == 2  # the cancelled queue's call, then the new one's
    FakeTimer.deferred.pop(0)()  # the cancelled queue's call arrives: nothing
    assert [(name, outcome) for _, name, outcome, _ in second.outcomes] == [("left", "result")]
    assert len(FakeTimer.deferred) == 1
    FakeTimer.deferred.pop(0)()  # its own: goes on ("nothing" passed over, pause again)
    assert [outcome for _, _, outcome, _ in second.outcomes] == ["result", "empty"] and len(FakeTimer.deferred) == 1


def test_cancel_stays_off_for_a_queue_job_that_ended_before_its_poll(panel, organs, monkeypatch):  # noqa: F811
    """Cancel pressed while "right" runs stays off once the worker has stopped and before the poll (it
    came back on: a second click ended the queue, and the poll then replaced the queue's summary,
    which said what was written before, by "Cancelled; the segmentation was not changed.")."""
    from test_module_static import FakeTimer, poll_until_idle

    volume, seg, ids, _ = organs
    ui = _paused_after_first(panel, organs, monkeypatch)
    FakeTimer.deferred.pop(0)()  # "right" starts
    job = panel.job
    assert job.segment_id == ids["right"]
    ui.cancelButton.click()
    assert job.wait(60)
    panel.updateButtons()  # a prompt refresh or a selection change before the poll
    assert not ui.cancelButton.enabled
    poll_until_idle(panel, timeout=60)
    assert ui.statusLabel.text.startswith('Cancelled while propagating "right", which was left as it was. Propagated '
                                          'before: "left"'), ui.statusLabel.text


def test_entering_the_module_during_a_pause_keeps_the_queues_inputs(panel, organs, monkeypatch):  # noqa: F811
    """As while a job runs, the panel shows the running queue's segmentation when the module is entered
    again during a pause; it follows the Segment Editor's selection on the next entry after."""
    volume, seg, ids, _ = organs
    ui = _paused_after_first(panel, organs, monkeypatch)
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    editor = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSingletonTag("SegmentEditor")
    editor.SetAndObserveSegmentationNode(other)
    panel.exit()
    panel.enter()
    assert ui.segmentationSelector.currentNode() is seg


def test_edited_slices_within_the_masks_box_finds_what_the_whole_comparison_found():
    """edited_slices compares within the box of both masks' voxels: the same slices as the whole-volume
    comparison over 500 random pairs (empty ones, negative values, along each axis)."""
    rng = np.random.default_rng(4343)
    for n in range(500):
        shape = tuple(int(rng.integers(1, 9)) for _ in range(3))
        pair = []
        for _ in range(2):
            mask = np.zeros(shape, dtype=[bool, np.uint8, np.int16][n % 3])
            for _ in range(int(rng.integers(0, 5))):
                mask[tuple(int(rng.integers(0, s)) for s in shape)] = [True, 1, int(rng.choice([-2, 1, 3]))][n % 3]
            pair.append(mask)
        if n % 7 == 0:
            pair[1] = pair[0].copy()  # nothing edited
        axis = n % 3
        whole = np.flatnonzero(((pair[0] > 0) != (pair[1] > 0)).any(axis=tuple(a for a in range(3) if a != axis)))
        assert mrml_lib.edited_slices(pair[0], pair[1], axis) == whole.tolist(), (n, shape, axis)


def test_run_anyway_copies_the_volume_before_reading_the_segment(mrml_scene, monkeypatch):
    """A review: with the memory check (the queue, Propagate) the segment is read first and the volume
    copied after the drawing's checks; run anyway (memory_check=False) copies it first, as before,
    so that a copy which does not fit is said in words ("could not be copied for the job") before
    Slicer's export of a segment on another grid could end the process (VTK's bad_alloc, exit 134
    under a memory limit: a review's probe)."""
    shape = (8, 16, 16)
    volume, _, drawing = _organ_drawn(shape, (3, 5, 5), 50.0)
    seg, ids = make_segmentation(volume, {"drawn": drawing})
    order = []
    real_copy, real_read = mrml_lib.volume_array, mrml_lib._prompt_mask
    monkeypatch.setattr(mrml_lib, "volume_array", lambda node: order.append("copy") or real_copy(node))
    monkeypatch.setattr(mrml_lib, "_prompt_mask", lambda *a: order.append("read") or real_read(*a))
    for check, expected in ((True, ["read", "copy"]), (False, ["copy", "read"])):
        order.clear()
        job = mrml_lib.SegmentPropagation(volume, seg, ids["drawn"], memory_check=check)
        assert order == expected and job.image.shape == shape


def test_run_anyway_passes_over_an_empty_segment_as_empty(mrml_scene):
    """A review: with the memory check off (run anyway), an empty segment was refused by the engine's
    "the prompt is empty" as a plain InputError: Propagate all drawn said 'Propagated 0 of 1 drawn
    segment. Not propagated: "empty" ...' where with the check it says no segment holds a drawing."""
    shape = (8, 16, 16)
    volume = make_volume_node(np.zeros(shape, np.float32), name="ct")
    seg, ids = make_segmentation(volume, {"empty": np.zeros(shape, np.uint8)})
    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.errors import EmptySegment

    import pytest

    with pytest.raises(EmptySegment):
        mrml_lib.SegmentPropagation(volume, seg, ids["empty"], memory_check=False)
    queue = mrml_lib.propagate_segments(volume, seg, model=get_predictor("copy"), memory_check=False,
                                        history=mrml_lib.PropagationHistory())
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("empty", "empty")]
    assert queue.summary()[0].startswith("No segment of the segmentation holds a drawing to propagate")
    with pytest.raises(mrml_lib.InputError, match="axis must be one of 0-2"):
        mrml_lib.edited_slices(np.zeros(shape), np.zeros(shape), 3)
