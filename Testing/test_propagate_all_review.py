"""Propagate all drawn, after a hostile review (session 42, a helper on slicer-core and the stand-in
panel of test_module_static): a result's notes kept, a failing server ending the queue, no modal
question in a queue, the library letting each job go, what a stop says, the panel's other buttons
and a fault while showing a result, output "new" pressed twice."""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import assert_same_labelmap, ellipsoid, internal_labelmap_state, make_segmentation, make_volume_node
from PAMSegmentLib import baselines, mrml
from PAMSegmentLib.baselines import CopyPredictor, get_predictor
from PAMSegmentLib.errors import InputError, NotEnoughMemory, PAMError
from test_module_static import module, panel, poll_until_idle  # noqa: F401 - fixtures
from test_propagate_all import ready as _ready

SHAPE = (24, 48, 64)


def _slice_only(mask, k):
    out = np.zeros_like(mask, dtype=np.uint8)
    out[k] = mask[k]
    return out


def _organs(extra=None):
    """Two bright ellipsoids, "left" and "right" drawn on slice 12, and an empty "nothing"."""
    left = ellipsoid(SHAPE, (12, 24, 16), (8, 10, 10))
    right = ellipsoid(SHAPE, (12, 24, 46), (6, 9, 9))
    image = (left * 120.0 + right * 200.0 + np.random.default_rng(0).normal(0, 4, SHAPE)).astype(np.float32)
    volume = make_volume_node(image, name="ct")
    drawn = {"left": _slice_only(left, 12), "nothing": np.zeros(SHAPE, np.uint8), "right": _slice_only(right, 12)}
    drawn.update(extra or {})
    seg, ids = make_segmentation(volume, drawn)
    return volume, seg, ids, {"left": left, "right": right}


def _states(seg, ids):
    return {name: internal_labelmap_state(seg, sid) for name, sid in ids.items()}


def _assert_unchanged(seg, ids, before):
    for name, sid in ids.items():
        assert_same_labelmap(internal_labelmap_state(seg, sid), before[name])


@pytest.fixture
def fast(monkeypatch):
    """The panel's "Registration tracking" runs the copy baseline (fast, the same flow)."""
    real = baselines.get_predictor
    monkeypatch.setattr(baselines, "get_predictor",
                        lambda method, **kw: real("copy") if method == "track" else real(method, **kw))


def test_a_written_result_s_notes_are_in_the_summary(mrml_scene):
    """A stray click on slice 16 beside the drawing on slice 12: Propagate says so in an orange
    status line; the queue said "Propagated all 2 drawn segments", in green, without it."""
    left = ellipsoid(SHAPE, (12, 24, 16), (8, 10, 10))
    drawn = _slice_only(left, 12)
    drawn[16, 24, 16] = 1
    volume, seg, ids, _ = _organs({"left": drawn})
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    outcomes = {name: (outcome, detail) for _, name, outcome, detail in queue.outcomes}
    assert outcomes["right"] == ("written", "")
    assert outcomes["left"][0] == "written" and "stray click" in outcomes["left"][1], outcomes["left"]
    text, level = queue.summary()
    assert level == "warning"
    assert text.startswith('Propagated all 2 drawn segments: "left", "right". Check: "left" (slice 16 holds 1 '
                           "voxel"), text


def test_the_library_lets_each_job_go_before_the_next_is_made(mrml_scene, monkeypatch):
    """A run refused by the engine kept its copy of the volume (and its traceback's frames) while the
    next segment's job copied the volume again: twice the volume, where the next job's memory check
    then counted the first copy as used."""
    volume, seg, ids, _ = _organs()

    class Picky(CopyPredictor):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            if guide_index == 12 and np.count_nonzero(guide_mask) < 290:  # "right" (254 px), refused by the run
                raise InputError("the drawing is smaller than 290 pixels")
            return super().predict(volume, guide_index, guide_mask, query_indices)

    images, alive = [], []
    real_init = mrml.SegmentPropagation._init_job

    def spy(self, *args, **kwargs):
        alive.append([ref() is not None for ref in images])
        real_init(self, *args, **kwargs)
        images.append(weakref.ref(self.image))

    monkeypatch.setattr(mrml.SegmentPropagation, "_init_job", spy)
    import gc

    gc.disable()  # (only references count: no collector run frees the copy by chance)
    try:
        queue = mrml.propagate_segments(volume, seg, [ids["right"], ids["left"]], model=Picky())
    finally:
        gc.enable()
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("right", "skipped"), ("left", "written")]
    assert alive == [[], [False]]


def test_a_server_failing_every_job_ends_the_queue():
    """A server whose model fails (not a refusal of the inputs) failed every job as an InputError, so
    the queue uploaded and ran every segment, each failing the same way. The server now says what
    kind of failure it was, and its client raises PAMError for its own failures."""
    pytest.importorskip("fastapi")
    from conftest import serving
    from doubles import OracleModel

    from PAMSegmentLib.remote import RemoteModel
    from PAMSegmentLib.server import create_app
    from test_server import case

    image, prompt, truth = case()

    class Broken(OracleModel):
        def predict(self, *a, **k):
            raise RuntimeError("the server's weights are broken")

    class Refusing(OracleModel):
        def predict(self, *a, **k):
            raise InputError("the drawing is refused")

    models = {"model": Broken(truth)}
    with serving(create_app(lambda method: models["model"])) as url:
        client = RemoteModel(url, poll_interval=0.01)
        with pytest.raises(PAMError, match="could not propagate: internal error: RuntimeError") as failed:
            client.propagate(image, prompt, (1, 1, 1))
        assert not isinstance(failed.value, InputError)
        models["model"] = Refusing(truth)
        with pytest.raises(InputError, match="could not propagate: the drawing is refused"):
            client.propagate(image, prompt, (1, 1, 1))


def test_a_server_that_does_not_say_the_kind_is_read_from_its_message():
    """A server from before session 42 sends no "failure": its "internal error: ..." jobs are its own."""
    from PAMSegmentLib.remote import job_failure

    old_internal = job_failure({"state": "failed", "message": "internal error: ValueError: boom"})
    assert type(old_internal) is PAMError and str(old_internal) == ("the server could not propagate: internal error: "
                                                                    "ValueError: boom")
    assert type(job_failure({"state": "failed", "message": "the prompt is empty"})) is InputError
    assert type(job_failure({"state": "failed", "failure": "error", "message": "checkpoint unreadable"})) is PAMError
    assert type(job_failure({"state": "failed", "failure": "input", "message": "internal error: x"})) is InputError


def test_a_queue_asks_nothing_when_a_write_is_refused_for_memory(panel, fast, monkeypatch):  # noqa: F811
    """On a finer segmentation grid, a write refused for memory opened "Write it anyway now?" for
    every segment, holding an unattended queue: in a queue it is noted and the queue goes on."""
    import slicer

    from test_review_s31 import _oversample

    volume, seg, ids, _ = _organs()
    _oversample(seg, volume, 2.0)
    ui = _ready(panel, volume, seg, monkeypatch)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True)

    def refuse(*args, **kwargs):
        raise NotEnoughMemory("x", reason="writing: needs about 9 GB and about 1 GB is free now")

    monkeypatch.setattr(mrml, "check_write_memory", refuse)
    before = _states(seg, ids)
    ui.propagateAllButton.click()
    poll_until_idle(panel, timeout=120)
    assert asked == []
    _assert_unchanged(seg, ids, before)
    assert ui.statusLabel.text.startswith('Propagated 0 of 2 drawn segments. Not propagated: "left", "right" (not '
                                          "written: writing: needs about 9 GB"), ui.statusLabel.text


@pytest.mark.parametrize("removed", ["volume", "segmentation"])
def test_a_node_removed_mid_queue_is_said_as_such(panel, fast, monkeypatch, removed):  # noqa: F811
    import slicer

    volume, seg, ids, _ = _organs()
    ui = _ready(panel, volume, seg, monkeypatch)
    ui.propagateAllButton.click()
    assert panel.job.wait(60)
    slicer.mrmlScene.RemoveNode(volume if removed == "volume" else seg)
    poll_until_idle(panel, timeout=60)
    assert panel.queue is None
    text = ui.statusLabel.text
    assert text.startswith("Stopped: the volume or the segmentation was removed."), text
    assert "Cancelled" not in text


def test_other_buttons_wait_for_the_queue_s_finished_job(panel, fast, monkeypatch):  # noqa: F811
    """Propagate called (say from the Python console) while the queue's first job had finished but
    was not polled yet: that job's result was dropped unwritten and the queue booked the new job as
    the first segment's. The handlers now wait for the queue (the buttons were already off)."""
    volume, seg, ids, truth = _organs()
    ui = _ready(panel, volume, seg, monkeypatch)
    ui.segmentSelector.setCurrentSegmentID(ids["right"])
    ui.propagateAllButton.click()
    first = panel.job
    assert first.wait(60) and first.state == "finished"
    for handler in (panel.onPropagate, panel.onUpdate, panel.onUndo):
        handler()
        assert panel.job is first
    poll_until_idle(panel, timeout=60)
    assert first.applied_segment_id == ids["left"]
    assert ui.statusLabel.text == 'Propagated all 2 drawn segments: "left", "right". 1 empty segment was left as it was.'
    for name in ("left", "right"):
        assert mrml.segment_mask(seg, ids[name], volume).any(axis=(1, 2)).sum() >= 10


def test_a_fault_while_showing_a_result_ends_the_queue_and_frees_the_panel(panel, fast, monkeypatch):  # noqa: F811
    """Injected fault in the status line of a written result: the queue stayed set with the poll
    timer stopped, and every button said "A propagation is running." until the module was reloaded."""
    volume, seg, ids, _ = _organs()
    ui = _ready(panel, volume, seg, monkeypatch)
    ui.propagateAllButton.click()
    first = panel.job
    assert first.wait(60)
    monkeypatch.setattr(mrml.SegmentPropagation, "summary", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        panel.pollTimer.fire()
    assert panel.queue is None and not panel.pollTimer.active
    assert first.applied_segment_id == ids["left"]  # it was written before the fault
    assert ui.propagateAllButton.enabled and ui.propagateButton.enabled is not None
    text = ui.statusLabel.text
    assert text.startswith("Stopped: an internal error of the panel") and 'Propagated before: "left"' in text, text


def test_output_new_pressed_twice_does_not_propagate_again(panel, fast, monkeypatch):  # noqa: F811
    """With output "new segment" the drawn segments never hold a result, so a second press (after
    drawing one more structure, say) propagated all of them again into "... (PAM 2)"."""
    volume, seg, ids, _ = _organs()
    ui = _ready(panel, volume, seg, monkeypatch)
    ui.newSegmentRadioButton.setChecked(True)
    ui.propagateAllButton.click()
    poll_until_idle(panel, timeout=60)
    segmentation = seg.GetSegmentation()

    def names():
        return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]

    assert names() == ["left", "nothing", "right", "left (PAM)", "right (PAM)"]
    ui.propagateAllButton.click()
    poll_until_idle(panel, timeout=60)
    assert names() == ["left", "nothing", "right", "left (PAM)", "right (PAM)"]
    assert ui.statusLabel.text == (
        'No segment of the segmentation holds a drawing to propagate. Left as they hold PAM results: "left (PAM)", '
        '"right (PAM)" (to change one, fix its slices and press Update from my edits). Propagated before into new '
        'segments, left as they are: "left" (into "left (PAM)"), "right" (into "right (PAM)") (delete a result '
        'segment to propagate its drawing again). 1 empty segment was left as it was.')
    # the result deleted: its drawing is propagated again
    segmentation.RemoveSegment([segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
                                if segmentation.GetNthSegment(n).GetName() == "left (PAM)"][0])
    ui.propagateAllButton.click()
    poll_until_idle(panel, timeout=60)
    assert names() == ["left", "nothing", "right", "right (PAM)", "left (PAM)"]


def test_small_things(mrml_scene):
    volume, seg, ids, _ = _organs()
    with pytest.raises(InputError, match="has no segment of ID 'nope'"):
        mrml.SegmentQueue(volume, seg, [ids["left"], "nope"])
    queue = mrml.SegmentQueue(volume, seg, [ids["left"]])
    queue.next()
    queue.record("skipped", "it is drawn on 13 of 24 axial slices")
    assert queue.summary()[0].startswith("Propagated 0 of 1 drawn segment. Not propagated"), queue.summary()
    cancelled = mrml.SegmentQueue(volume, seg, [ids["left"], ids["right"]])
    cancelled.next()
    cancelled.stop("cancelled", "cancelled")
    assert cancelled.summary() == ('Cancelled while propagating "left", which was left as it was. 1 segment not '
                                   "reached.", "warning")  # the user's own cancel: not an error


def test_the_progress_bar_says_which_segment_while_it_starts(panel, fast, monkeypatch):  # noqa: F811
    volume, seg, ids, _ = _organs()
    ui = _ready(panel, volume, seg, monkeypatch)
    ui.propagateAllButton.click()
    assert ui.progressBar.format == "segment 1 of 3: starting"
    deadline = time.time() + 60
    while panel.pollTimer.active and time.time() < deadline:
        panel.pollTimer.fire()
        time.sleep(0.01)


def test_a_result_edited_since_is_left_for_its_update(mrml_scene):
    """A second review: a result whose leak was erased on most of its slices (its update still to
    come) no longer "held a PAM result", so Propagate all drawn took it for a drawing on those slices
    and propagated it again from scratch: the erased leak came back, said "Propagated all"."""
    volume, seg, ids, _ = _organs()
    history = mrml.PropagationHistory()
    mrml.propagate_segments(volume, seg, [ids["left"]], model=get_predictor("copy"), history=history)
    import slicer

    mask = mrml.segment_mask(seg, ids["left"], volume).copy()
    occupied = np.flatnonzero(mask.any(axis=(1, 2)))
    mask[[s for s in occupied if s != 12][: 2 * len(occupied) // 3]] = 0  # most of the predicted slices erased
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, ids["left"], volume)
    assert not history.get(seg, ids["left"]).holds_result(mask.astype(bool))
    before = internal_labelmap_state(seg, ids["left"])
    queue = mrml.propagate_segments(volume, seg, [ids["left"], ids["right"]], model=get_predictor("copy"),
                                    history=history)
    assert [(name, outcome, detail) for _, name, outcome, detail in queue.outcomes] == [
        ("left", "result", "edited"), ("right", "written", "")]
    assert_same_labelmap(internal_labelmap_state(seg, ids["left"]), before)
    assert queue.summary() == ('Propagated the drawn segment "right". Left as it is, a PAM result edited since: "left" '
                               "(select it and press Update from my edits to propagate the edits).", "ok")


def test_a_finished_3d_segment_of_a_few_slices_is_left_as_it_is(mrml_scene):
    """A second review: a complete small structure (an adrenal gland, a vertebra: a few slices, within
    the keyframe limits) was taken as a drawing on every one of its slices and rewritten (152 -> 162
    voxels on a real CT). Filled on three or more neighbouring slices: a 3D segment, passed over."""
    small = ellipsoid(SHAPE, (5, 10, 50), (2, 4, 4))
    assert np.flatnonzero(small.any(axis=(1, 2))).tolist() == [3, 4, 5, 6, 7]
    two = np.zeros(SHAPE, np.uint8)
    left = ellipsoid(SHAPE, (12, 24, 16), (8, 10, 10))
    two[[8, 9]] = left[[8, 9]]  # two neighbouring drawn slices: keyframes, still a drawing
    volume, seg, ids, _ = _organs({"adrenal": small.astype(np.uint8), "left": two})
    before = internal_labelmap_state(seg, ids["adrenal"])
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    outcomes = {name: (outcome, detail) for _, name, outcome, detail in queue.outcomes}
    assert outcomes["adrenal"] == ("complete", "axial slices 3-7") and outcomes["left"][0] == "written"
    assert_same_labelmap(internal_labelmap_state(seg, ids["adrenal"]), before)
    assert ('Left as it is, a 3D segment filled slice after slice, not a drawing: "adrenal" (axial slices 3-7) (to '
            "propagate it from its slices anyway, select it and press Propagate).") in queue.summary()[0]


def test_a_result_segment_reused_for_another_structure_no_longer_names_its_source(mrml_scene):
    """A second review: "left (PAM)", erased and redrawn as another structure and propagated in place,
    kept its source tag: Propagate all drawn (output new) then passed over "left" as propagated
    "into" that other structure, and its advice would delete it."""
    import slicer

    volume, seg, ids, truth = _organs()
    history = mrml.PropagationHistory()
    mrml.propagate_segments(volume, seg, [ids["left"]], mode="new", model=get_predictor("copy"), history=history)
    segmentation = seg.GetSegmentation()
    result_id = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())
                 if segmentation.GetNthSegment(n).GetName() == "left (PAM)"][0]
    assert mrml._segment_tag(segmentation.GetSegment(result_id), mrml.SOURCE_TAG) == ids["left"]
    slicer.util.updateSegmentBinaryLabelmapFromArray(_slice_only(truth["right"], 12), seg, result_id, volume)
    segmentation.GetSegment(result_id).SetName("spleen")
    mrml.propagate_segment(volume, seg, result_id, model=get_predictor("copy"), history=history)
    assert mrml._segment_tag(segmentation.GetSegment(result_id), mrml.SOURCE_TAG) is None
    queue = mrml.propagate_segments(volume, seg, [ids["left"]], mode="new", model=get_predictor("copy"),
                                    history=history)
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("left", "written")]


def test_segments_passed_over_for_one_reason_are_named_together(mrml_scene):
    """A second review: a limit that refuses every segment (a server's largest volume, memory) was
    said once per segment, the same text over and over."""
    volume, seg, ids, _ = _organs()
    queue = mrml.SegmentQueue(volume, seg, [ids["left"], ids["right"]])
    for sid in (ids["left"], ids["right"]):
        assert queue.next() == sid
        queue.record("skipped", "the server takes volumes of at most 1000 voxels")
    assert queue.summary() == ('Propagated 0 of 2 drawn segments. Not propagated: "left", "right" (the server takes '
                               "volumes of at most 1000 voxels).", "error")


def test_drawings_that_look_filled_but_are_not(mrml_scene):
    """A third review: a result erased and drawn again on one slice (its run tag still there) was
    "a PAM result edited since", whose advised update changed nothing; one stroke on a segmentation
    grid three times thicker than the volume's lands on three volume slices and was "a 3D segment";
    two keyframes and a stray click on the next slice too. All three are drawings, as Propagate
    takes them."""
    import slicer

    shape = (30, 40, 48)
    kid = ellipsoid(shape, (15, 20, 24), (10, 8, 8))
    image = (kid * 200.0 + np.random.default_rng(0).normal(0, 3, shape)).astype(np.float32)
    fine = make_volume_node(image, spacing_ijk=(0.8, 0.9, 1.0), name="thin")
    coarse = make_volume_node(np.zeros((10, 40, 48), np.float32), spacing_ijk=(0.8, 0.9, 3.0), name="thick")
    coarse.SetOrigin(fine.GetOrigin()[0], fine.GetOrigin()[1], fine.GetOrigin()[2] + 1.0)
    thick_drawing = np.zeros((10, 40, 48), np.uint8)
    thick_drawing[5] = kid[16]  # one slice of the thick grid: slices 15-17 of the thin one
    seg, ids = make_segmentation(coarse, {"thick": thick_drawing})
    two_and_speck = np.zeros(shape, np.uint8)
    two_and_speck[[14, 15]] = kid[[14, 15]]
    two_and_speck[16, 20, 24] = 1
    sid = seg.GetSegmentation().AddEmptySegment("", "two+speck", [0.5, 0.5, 0.5])
    slicer.util.updateSegmentBinaryLabelmapFromArray(two_and_speck, seg, sid, fine)
    ids["two+speck"] = sid
    history = mrml.PropagationHistory()
    queue = mrml.propagate_segments(fine, seg, model=get_predictor("copy"), history=history)
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("thick", "written"),
                                                                          ("two+speck", "written")]
    # the result erased and drawn again on one slice: a drawing again, propagated
    redrawn = np.zeros(shape, np.uint8)
    redrawn[12] = kid[12]
    slicer.util.updateSegmentBinaryLabelmapFromArray(redrawn, seg, ids["thick"], fine)
    assert mrml._segment_tag(seg.GetSegmentation().GetSegment(ids["thick"]), mrml.RUN_TAG)
    queue = mrml.propagate_segments(fine, seg, [ids["thick"]], model=get_predictor("copy"), history=history)
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("thick", "written")]
    assert mrml.segment_mask(seg, ids["thick"], fine).any(axis=(1, 2)).sum() >= 10


def test_a_solid_structure_refused_for_its_shape_is_left_as_a_3d_segment(mrml_scene):
    """A third review: thin curved finished structures (TotalSegmentator's labels 101 and 111) were
    refused as "drawn on more than one plane", in red, with advice to erase part of them. Refused
    for its shape while solid along every axis: a 3D segment; a drawing with a stray stroke keeps the
    refusal and its advice."""
    shape = (30, 40, 48)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    tube = ((j - 20 - 8 * np.sin(k / 5.0)) ** 2 + (i - 10 - k) ** 2 <= 4).astype(np.uint8)  # a curved rod
    drawing = np.zeros(shape, np.uint8)
    drawing[15] = ellipsoid(shape, (15, 20, 30), (3, 8, 8))[15]
    drawing[10:20, 30, 30] = 1  # a stray stroke from a coronal view
    volume = make_volume_node(np.zeros(shape, np.float32), name="ct")
    seg, ids = make_segmentation(volume, {"rib": tube, "drawn": drawing})

    def make(segment_id):
        raise InputError("it is drawn on more than one plane: erase what is drawn on coronal slice 30")

    queue = mrml.SegmentQueue(volume, seg)
    assert queue.start_next(make) is None
    assert [(name, outcome, detail) for _, name, outcome, detail in queue.outcomes] == [
        ("rib", "too many", "solid along every axis"),
        ("drawn", "skipped", "it is drawn on more than one plane: erase what is drawn on coronal slice 30")]


def test_finished_segments_on_coarser_grids_and_with_tapered_ends_are_left_as_they_are(mrml_scene):
    """A fourth review: a finished organ on three slices of a segmentation grid 1.5x thicker than the
    volume's (4 volume slices) was propagated (rounded, 6 were asked), and one whose end slices hold a
    fifth of its largest (37 / 197 / 37 voxels) lost them as "specks" and was propagated too."""
    shape = (30, 40, 48)
    kid = ellipsoid(shape, (15, 20, 24), (10, 8, 8))
    image = (kid * 200.0 + np.random.default_rng(0).normal(0, 3, shape)).astype(np.float32)
    volume = make_volume_node(image, spacing_ijk=(0.8, 0.9, 2.0), name="ct")
    coarse = make_volume_node(np.zeros((20, 40, 48), np.float32), spacing_ijk=(0.8, 0.9, 3.0), name="thick")
    coarse.SetOrigin(*volume.GetOrigin())
    organ = np.zeros((20, 40, 48), np.uint8)
    organ[8:11] = kid[15]  # three slices of the thick grid: 4-5 of the volume's
    seg, ids = make_segmentation(coarse, {"organ": organ})
    import slicer

    tapered = np.zeros(shape, np.uint8)
    tapered[15] = kid[15]
    small = ellipsoid(shape, (15, 20, 24), (3, 3, 3))
    tapered[[14, 16]] = small[15]  # 37 / 197 / 37 voxels
    sid = seg.GetSegmentation().AddEmptySegment("", "tapered", [0.5, 0.5, 0.5])
    slicer.util.updateSegmentBinaryLabelmapFromArray(tapered, seg, sid, volume)
    ids["tapered"] = sid
    before = {name: internal_labelmap_state(seg, ids[name]) for name in ids}
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("organ", "complete"),
                                                                          ("tapered", "complete")]
    for name in ids:
        assert_same_labelmap(internal_labelmap_state(seg, ids[name]), before[name])


def test_an_outline_painted_across_an_oblique_volume_keeps_its_advice(mrml_scene):
    """A fourth review: every refusal went through the solid test, and the bands of one outline painted
    across an oblique volume count as solid on the volume's grid: it became "a 3D segment", its
    'Rotate to volume plane' advice lost. Such a refusal is told by the world's axes: the painted bands
    are thin along the view's, a finished structure is not."""
    from conftest_mrml import oblique_ijk_to_ras, outline_painted_in_ras_view

    shape = (24, 40, 44)
    truth = ellipsoid(shape, (12, 20, 22), (8, 12, 14))
    image = (truth * 200.0 + np.random.default_rng(0).normal(0, 3, shape)).astype(np.float32)
    m = oblique_ijk_to_ras(degrees=(0.0, 20.0))
    painted = outline_painted_in_ras_view(m, truth, (22, 20, 12))
    volume = make_volume_node(image, ijk_to_ras=m)
    finished = ellipsoid(shape, (12, 20, 22), (3, 6, 6)).astype(np.uint8)
    seg, ids = make_segmentation(volume, {"tumor": painted, "nodule": finished})
    queue = mrml.SegmentQueue(volume, seg)
    assert not queue._solid_in_world(ids["tumor"]) and queue._solid_in_world(ids["nodule"])
    assert queue.start_next(lambda sid: mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))) is None
    outcomes = {name: (outcome, detail) for _, name, outcome, detail in queue.outcomes}
    assert outcomes["tumor"][0] == "skipped" and "Rotate to volume plane" in outcomes["tumor"][1]
    assert outcomes["nodule"][0] in ("complete", "too many")


@pytest.mark.parametrize("factor,phase", [(1.3, 0.25), (1.57, 0.5), (1.6, 0.25)])
def test_a_finished_organ_on_three_slices_of_a_slightly_coarser_grid_is_left_as_it_is(mrml_scene, factor, phase):
    """A fuzz (session 42): on a segmentation grid 1.2-1.3x or 1.55-1.6x thicker than the volume's, an
    organ on three of its own slices reads as 3-4 volume slices, as two of its slices can: no threshold
    in the volume's slices tells them apart, and it was rewritten. Counted on its own slices."""
    import slicer

    shape = (40, 40, 40)
    volume = make_volume_node(np.random.default_rng(0).normal(100, 5, shape).astype(np.float32),
                              spacing_ijk=(1.0, 1.0, 2.0), name="vol")
    nk = int(40 / factor) + 1
    coarse = make_volume_node(np.zeros((nk, 40, 40), np.float32), spacing_ijk=(1.0, 1.0, 2.0 * factor), name="c")
    origin = np.array(volume.GetOrigin())
    coarse.SetOrigin(origin[0], origin[1], origin[2] - 1.0 + factor + phase * 2.0 * factor)
    organ = np.zeros((nk, 40, 40), np.uint8)
    organ[nk // 2 - 1:nk // 2 + 2] = ellipsoid((3, 40, 40), (1, 20, 20), (2.0, 9, 9))
    seg, ids = make_segmentation(coarse, {"organ": organ})
    slicer.mrmlScene.RemoveNode(coarse)
    before = internal_labelmap_state(seg, ids["organ"])
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("organ", "complete")]
    assert_same_labelmap(internal_labelmap_state(seg, ids["organ"]), before)


def test_a_drawing_with_a_stray_stroke_on_an_oversampled_grid_keeps_its_refusal(mrml_scene):
    """A fuzz (session 42): on a grid oversampled x3 one volume slice is three of its own, so the
    solid test took an axial drawing with a stray coronal stroke for "a 3D segment", its refusal's
    advice (erase the stroke) lost. The test counts in the volume's slices now."""
    from test_review_s31 import _oversample

    shape = (30, 40, 40)
    volume = make_volume_node(np.random.default_rng(0).normal(100, 5, shape).astype(np.float32),
                              spacing_ijk=(1.0, 1.0, 2.0), name="vol")
    stroke = np.zeros(shape, np.uint8)
    stroke[15] = ellipsoid((1, 40, 40), (0, 20, 20), (1, 8, 8))[0]
    stroke[16:24, 30, 18:23] = 1  # a short stroke in a coronal view, off the drawing
    seg, ids = make_segmentation(volume, {"drawn": stroke})
    _oversample(seg, volume, 3.0)
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    (_, name, outcome, detail), = queue.outcomes
    assert outcome == "skipped" and "drawn on more than one plane" in detail, (outcome, detail)


@pytest.mark.parametrize("factor,keyframes,step", [(3.0, 2, 3), (2.5, 3, 3), (3.0, 3, 3), (3.0, 2, 1)])
def test_keyframes_on_a_coarser_segmentation_grid_are_walked_across_their_own_plane(mrml_scene, factor, keyframes,
                                                                                   step):
    """A fuzz (session 42): a narrow object (5 mm wide) drawn on two or three slices of a segmentation
    made on a 2.5-3x thicker series covers 3 of the volume's slices a keyframe, so it looked thinner
    across the sagittal axis: Propagate walked it sagittally, Propagate all drawn called it a 3D
    segment. The drawn axis is told on the segment's own grid (also for two neighbouring keyframes: a
    review)."""
    shape = (60, 40, 40)
    volume = make_volume_node(np.random.default_rng(0).normal(100, 5, shape).astype(np.float32),
                              spacing_ijk=(1.0, 1.0, 1.0), name="vol")
    nk = int(60 / factor)
    coarse = make_volume_node(np.zeros((nk, 40, 40), np.float32), spacing_ijk=(1.0, 1.0, factor), name="c")
    origin = np.array(volume.GetOrigin())
    coarse.SetOrigin(origin[0], origin[1], origin[2] - 0.5 + 0.5 * factor)
    drawn = np.zeros((nk, 40, 40), np.uint8)
    for t in range(keyframes):
        drawn[4 + step * t] = ellipsoid((1, 40, 40), (0, 20, 20), (1, 9, 2.5))[0]
    seg, ids = make_segmentation(coarse, {"drawn": drawn})
    import slicer

    slicer.mrmlScene.RemoveNode(coarse)
    job = mrml.SegmentPropagation(volume, seg, ids["drawn"], model=get_predictor("copy"))
    assert job.prompt_info.plane == "axial" and job.prompt_info.axis == 0, job.prompt_info
    assert mrml.describe_prompt(volume, seg, ids["drawn"]).axis == 0
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("drawn", "written")]
