"""Session 41: the Slicer path with many segments sharing one labelmap layer on a finer segmentation
grid (a helper's scale probe on slicer-core): what each segment's checks and Undo cost grew with the
shared layer, not with the segment."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node
from PAMSegmentLib import mrml
from PAMSegmentLib.baselines import get_predictor
from test_review_s31 import _oversample

SHAPE = (20, 40, 40)


def _one_finer_layer(truth, block, prompt, factor):
    """A volume of ``truth`` and a segmentation of "block" and "ball" (``prompt``) in one labelmap
    layer, oversampled ``factor`` times (the Segment Editor's Specify geometry)."""
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    seg, ids = make_segmentation(volume, {"block": block, "ball": prompt})
    segmentation = seg.GetSegmentation()
    segmentation.CollapseBinaryLabelmaps(False)
    _oversample(seg, volume, factor)
    segmentation.CollapseBinaryLabelmaps(False)
    assert segmentation.GetNumberOfLayers() == 1
    return volume, seg, ids


@pytest.fixture
def shared_fine_layer(mrml_scene):
    """A ball drawn on slice 10 and a large block (another structure) in one labelmap layer,
    oversampled 3 times (Specify geometry): the layer spans the block, the ball's own voxels are a
    small part of it. The ball is propagated (copy baseline) with a history."""
    truth = ellipsoid(SHAPE, (10, 30, 30), (4, 5, 5))
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[10] = truth[10]
    block = np.zeros(SHAPE, np.uint8)
    block[1:19, 1:22, 1:22] = 1
    volume, seg, ids = _one_finer_layer(truth, block, prompt, 3.0)
    segmentation = seg.GetSegmentation()
    history = mrml.PropagationHistory()
    job = mrml.SegmentPropagation(volume, seg, ids["ball"], mode="replace", model=get_predictor("copy"))
    job.start()
    assert job.wait(60) and job.state == "finished", job.error
    job.apply(history=history)
    segmentation.CollapseBinaryLabelmaps(False)  # (as the Segment Editor keeps them)
    return volume, seg, ids, history


def _layer_voxels(seg, sid):
    e = seg.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap").GetExtent()
    return (e[1] - e[0] + 1) * (e[3] - e[2] + 1) * (e[5] - e[4] + 1)


def _numpy_peak(call):
    tracemalloc.start()
    try:
        out = call()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_check_for_unseen_edits_reads_the_segments_own_voxels_not_the_shared_layer(shared_fine_layer):
    """check_no_unseen_edits (every prompt-line refresh of a propagated segment, and every update)
    unpacked both snapshots over the whole layer's extent as int64: about 10 bytes a voxel of a
    layer shared with other segments (30 segments on a x3 grid: 2.1 GB for a 25 MB volume). It now
    compares the segment's own voxels within their box, then and now."""
    volume, seg, ids, history = shared_fine_layer
    sid = ids["ball"]
    entry = history.get(seg, sid)
    assert entry is not None and entry.own_after is not None
    layer = _layer_voxels(seg, sid)
    assert layer > 400_000
    _, peak = _numpy_peak(lambda: mrml.check_no_unseen_edits(entry, seg, sid, volume, edited=[]))
    assert peak < 0.5 * layer, f"{peak / layer:.1f} bytes a layer voxel"
    # an edit on a thin slice of the finer grid, between the volume's slices, is still found
    from vtk.util import numpy_support

    stored = seg.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap")
    e = stored.GetExtent()
    voxels = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    label = seg.GetSegmentation().GetSegment(sid).GetLabelValue()
    held = np.argwhere(voxels == label)
    k = int(np.median(held[:, 0]))
    k = k + 1 if (k + 1 - e[4]) % 3 else k + 2  # a fine slice that is not the nearest to a volume slice
    thin = voxels[k - e[4]]
    ys, xs = np.nonzero(voxels[int(np.median(held[:, 0]))] == label)
    thin[ys.min():ys.min() + 6, xs.min():xs.min() + 6] = label
    stored.Modified()
    with pytest.raises(mrml.InputError, match="was edited where the volume's voxels do not show it"):
        mrml.check_no_unseen_edits(entry, seg, sid, volume, edited=[])


def test_the_prompt_reads_its_own_voxels_a_slice_at_a_time(shared_fine_layer):
    """_own_voxels_box (the prompt line's check of a drawing on the finer grid, a job's start, the
    digest of the segment's voxels) compared the whole shared layer with the label at once: one
    boolean a layer voxel (+390 MB on the prompt line for a 26 MB volume with 30 segments). And
    _segment_own_voxels, before a write, copied the box of the whole layer's content (the other
    segments' too: 198 MB for a one-slice segment among 30), not of the segment's own voxels."""
    volume, seg, ids, history = shared_fine_layer
    segment = seg.GetSegmentation().GetSegment(ids["ball"])
    layer = _layer_voxels(seg, ids["ball"])
    (box, corner, _), peak = _numpy_peak(lambda: mrml._own_voxels_box(segment))
    assert peak < 0.25 * layer, f"{peak / layer:.2f} bytes a layer voxel"
    own = mrml._segment_own_voxels(seg, ids["ball"])
    whole = segment.GetRepresentation("Binary labelmap").GetExtent()
    first = [max(int(c) - 1, whole[2 * a]) for a, c in enumerate(corner)]  # one voxel around it, within the layer
    last = [min(int(c) + n, whole[2 * a + 1]) for a, (c, n) in enumerate(zip(corner, box.shape[::-1]))]
    assert own.GetExtent() == (first[0], last[0], first[1], last[1], first[2], last[2])
    assert np.prod([b - a + 1 for a, b in zip(first, last)]) < layer / 20


def test_undo_gives_a_segment_of_a_shared_layer_a_layer_of_its_own_voxels(shared_fine_layer):
    """Undo of a segment that shared its layer rebuilt the layer's whole extent (through int64) and
    gave the segment a layer that large: each undo of a one-slice segment among 30 on 512 x 512 x
    300 left a 43-75 MB layer and peaked 386-675 MB. The restored layer now spans the segment's own
    voxels, which stay where they were in the world."""
    volume, seg, ids, history = shared_fine_layer
    sid = ids["ball"]
    shared = _layer_voxels(seg, sid)
    entry = history.get(seg, sid)
    before = entry.before
    assert before is not None and before.shared
    (k0, j0, i0), crop = before.own_box()
    on_volume = mrml.segment_mask(seg, sid, volume).copy()
    history.undo_last(seg, sid)
    stored = seg.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap")
    e, old = stored.GetExtent(), before.extent
    # its own voxels and one voxel of zeros around them, within the shared layer's extent (without that
    # margin a volume voxel half a fine voxel past the edge read the edge: a re-review, x2 grids)
    first = (max(i0 - 1, old[0]), max(j0 - 1, old[2]), max(k0 - 1, old[4]))
    last = (min(i0 + crop.shape[2], old[1]), min(j0 + crop.shape[1], old[3]), min(k0 + crop.shape[0], old[5]))
    assert e == (first[0], last[0], first[1], last[1], first[2], last[2])
    assert _layer_voxels(seg, sid) < shared / 20
    from vtk.util import numpy_support

    label = seg.GetSegmentation().GetSegment(sid).GetLabelValue()
    restored = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        last[2] - first[2] + 1, last[1] - first[1] + 1, last[0] - first[0] + 1)
    at = (k0 - first[2], j0 - first[1], i0 - first[0])
    inner = restored[at[0]:at[0] + crop.shape[0], at[1]:at[1] + crop.shape[1], at[2]:at[2] + crop.shape[2]]
    np.testing.assert_array_equal(inner == label, crop)
    assert int(np.count_nonzero(restored)) == int(crop.sum())
    assert on_volume.any()


def test_undo_of_a_segment_pushed_out_of_the_history_says_so(mrml_scene):
    """The session remembers the state before a run for its last 32 segments (PropagationHistory's
    max_entries); Undo of an older one was refused as if the segment had been "read back from the
    record saved with it (a loaded scene, a copied segment, the Segment Editor's redo)", none of
    which the user did (a helper's probe, 40 segments). It now says why."""
    truth = ellipsoid(SHAPE, (10, 20, 20), (6, 8, 8))
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    masks = {}
    for n, (y, x) in enumerate(((8, 8), (8, 30), (30, 8))):
        prompt = np.zeros(SHAPE, np.uint8)
        prompt[10, y - 3:y + 3, x - 3:x + 3] = 1
        masks[f"s{n}"] = prompt
    seg, ids = make_segmentation(volume, masks)
    history = mrml.PropagationHistory(max_entries=2)
    for name in ("s0", "s1", "s2"):
        mrml.propagate_segment(volume, seg, ids[name], model=get_predictor("copy"), history=history)
    with pytest.raises(mrml.InputError) as caught:
        history.undo_last(seg, ids["s0"])
    assert str(caught.value) == (
        'cannot undo: what "s0" held before its propagation is no longer remembered (the last 2 segments propagated '
        "or updated in this session are kept for Undo, and 2 others were since; the Segment Editor's Undo may still "
        "take it back; Update from my edits and the review still work)")
    history.undo_last(seg, ids["s2"])  # (the newer ones still undo)
    # a segment a new-segment run made: taking it back is deleting it
    made = mrml.propagate_segment(volume, seg, ids["s2"], mode="new", model=get_predictor("copy"), history=history)
    for name in ("s1", "s0"):  # (s0: read back from its record, updated... pushed out again by these two)
        history.forget(seg, ids[name])
        mrml.propagate_segment(volume, seg, ids[name], mode="new", model=get_predictor("copy"), history=history)
    with pytest.raises(mrml.InputError) as caught:
        history.undo_last(seg, made)
    name = seg.GetSegmentation().GetSegment(made).GetName()
    assert str(caught.value) == (
        f'cannot undo: "{name}" was made by a propagation no longer remembered (the last 2 segments propagated or '
        "updated in this session are kept for Undo, and 2 others were since): delete the segment in the Segment "
        "Editor to take it back")


def test_undo_on_a_twice_finer_grid_gives_the_volume_grid_the_drawing_back(mrml_scene):
    """A re-review (session 41): Undo of a segment that shared its layer restored it on a layer cut
    exactly to its own voxels; on a x2 grid a volume voxel whose centre lies half a fine voxel past
    the edge then read the edge's 1 (the old whole-extent layer gave the 0 beyond): a 4-voxel drawing
    came back as 6. One voxel of zeros is kept around it, as before a write."""
    from vtk.util import numpy_support

    shape = (16, 32, 32)
    truth = ellipsoid(shape, (8, 16, 16), (5, 8, 8))
    prompt = np.zeros(shape, np.uint8)
    prompt[8, 14:18, 14:18] = 1
    block = np.zeros(shape, np.uint8)
    block[1:15, 1:30, 1:8] = 1
    volume, seg, ids = _one_finer_layer(truth, block, prompt, 2.0)
    segmentation = seg.GetSegmentation()
    sid = ids["ball"]
    segment = segmentation.GetSegment(sid)
    stored = segment.GetRepresentation("Binary labelmap")
    e = stored.GetExtent()
    layer = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    label = segment.GetLabelValue()
    slices = np.unique(np.argwhere(layer == label)[:, 0])
    layer[layer == label] = 0
    for k in slices:  # a 5 x 5 square painted on the finer grid (an odd number of its voxels)
        layer[k, 30:35, 30:35] = label
    stored.Modified()
    before = mrml.segment_mask(seg, sid, volume).copy()
    history = mrml.PropagationHistory()
    mrml.propagate_segment(volume, seg, sid, model=get_predictor("copy"), history=history)
    segmentation.CollapseBinaryLabelmaps(False)
    history.undo_last(seg, sid)
    after = mrml.segment_mask(seg, sid, volume)
    assert int(before.sum()) == 4
    np.testing.assert_array_equal(after, before)


def test_a_failed_jobs_release_lets_its_arrays_go(mrml_scene):
    """A re-review (session 41): release() let go of a failed job's volume copy, but its exception's
    traceback held the engine's frames (the volume copy and the engine's working arrays) for the
    rest of the session."""
    import gc
    import weakref

    truth = ellipsoid(SHAPE, (10, 20, 20), (6, 8, 8))
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[10] = truth[10]
    seg, ids = make_segmentation(volume, {"ball": prompt})
    held = []
    from doubles import OracleModel

    class Failing(OracleModel):
        """A predictor whose first prediction allocates working memory and fails."""

        def predict(self, volume, guide_index, guide_mask, query_indices):
            work = np.ones(2_000_000)
            held.append(weakref.ref(work))
            raise RuntimeError("simulated failure")

    job = mrml.SegmentPropagation(volume, seg, ids["ball"], model=Failing(truth))
    assert not job.release() and job.image is not None  # (not started: nothing to let go; a re-review)
    job.start()
    assert job.wait(60) and job.state == "failed"
    image = weakref.ref(job.image)
    assert job.release()
    gc.collect()
    assert image() is None and held and held[0]() is None
    assert "simulated failure" in job.summary()


def test_a_history_entry_keeps_one_copy_of_a_result_written_as_it_came(shared_fine_layer):
    """A history entry packed the engine's result and the segment as written separately, though they
    are the same bits when the write changed nothing (13 MB an entry for a result across 512 x 512 x
    300, 32 entries kept): one copy is kept then."""
    volume, seg, ids, history = shared_fine_layer
    entry = history.get(seg, ids["ball"])
    assert mrml._same_packed(entry.result_mask, entry.written)
    assert entry.written is entry.result_mask


@pytest.mark.parametrize("shared", [False, True])
def test_an_edit_made_in_place_while_propagating_is_never_written_over(mrml_scene, shared):
    """A guard, from a re-review (session 41) of an attempt to skip the segment's re-read before a
    write when its labelmap's modification times had not changed (reverted): Slicer's documented
    in-place edit (arrayFromSegmentInternalBinaryLabelmap, then the segment's Modified()) leaves
    those times as they were, and the attempt wrote over such an erase. The write is refused."""
    import slicer

    truth = ellipsoid(SHAPE, (10, 20, 20), (6, 8, 8))
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[10] = truth[10]
    block = np.zeros(SHAPE, np.uint8)
    block[2:6, 2:10, 2:10] = 1
    seg, ids = make_segmentation(volume, {"ball": prompt, "block": block})
    sid = ids["ball"]
    if shared:
        seg.GetSegmentation().CollapseBinaryLabelmaps(False)
    job = mrml.SegmentPropagation(volume, seg, sid, mode="replace", model=get_predictor("copy"))
    job.start()
    assert job.wait(60) and job.state == "finished", job.error
    label = seg.GetSegmentation().GetSegment(sid).GetLabelValue()
    voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg, sid)  # the stored voxels, no copy
    e = seg.GetSegmentation().GetSegment(sid).GetRepresentation("Binary labelmap").GetExtent()
    hole = np.s_[10 - e[4], 18 - e[2]:23 - e[2], 18 - e[0]:23 - e[0]]
    assert (voxels[hole] == label).all()
    voxels[hole] = 0
    seg.GetSegmentation().GetSegment(sid).Modified()  # as slicer.util's docstring says
    with pytest.raises(mrml.InputError, match="was edited while propagating"):
        job.apply(history=mrml.PropagationHistory())
    assert not mrml.segment_mask(seg, sid, volume)[10, 18:23, 18:23].any()
