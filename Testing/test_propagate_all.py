"""Propagate all drawn segments (session 42): the segments of one segmentation propagated one after
another, each as Propagate does (its own write, its own Undo), the others passed over with why;
the library's ``propagate_segments`` and ``SegmentQueue``, and the panel's button on the stand-in Qt
of test_module_static."""

from __future__ import annotations

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import assert_same_labelmap, ellipsoid, internal_labelmap_state, make_segmentation, make_volume_node
from PAMSegmentLib import mrml
from PAMSegmentLib.baselines import get_predictor
from PAMSegmentLib.metrics import dice
from PAMSegmentLib.propagate import CancelToken
from test_module_static import module, panel, poll_until_idle  # noqa: F401 - fixtures

SHAPE = (24, 48, 64)


def _slice_only(mask, k):
    out = np.zeros_like(mask, dtype=np.uint8)
    out[k] = mask[k]
    return out


@pytest.fixture
def organs(mrml_scene):
    """Two bright ellipsoids side by side ("left" at 120, "right" at 200, background 0 with noise)
    and a segmentation of: "left" and "right" drawn on their middle slices, "nothing" (empty) and
    "solid" (the right ellipsoid drawn on every one of its slices: a 3D mask)."""
    left = ellipsoid(SHAPE, (12, 24, 16), (8, 10, 10))
    right = ellipsoid(SHAPE, (12, 24, 46), (6, 9, 9))
    image = (left * 120.0 + right * 200.0 + np.random.default_rng(0).normal(0, 4, SHAPE)).astype(np.float32)
    volume = make_volume_node(image, name="ct")
    seg, ids = make_segmentation(volume, {"left": _slice_only(left, 12), "nothing": np.zeros(SHAPE, np.uint8),
                                          "right": _slice_only(right, 12), "solid": right.astype(np.uint8)})
    return volume, seg, ids, {"left": left, "right": right}


def _mask(seg, sid, volume):
    return mrml.segment_mask(seg, sid, volume).astype(bool)


def test_each_drawn_segment_is_propagated_and_the_others_passed_over_with_why(organs):
    volume, seg, ids, truth = organs
    solid_before = internal_labelmap_state(seg, ids["solid"])
    history = mrml.PropagationHistory()
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"), history=history)
    outcomes = {name: (outcome, detail) for _, name, outcome, detail in queue.outcomes}
    # in the segmentation's order
    assert [name for _, name, _, _ in queue.outcomes] == ["left", "nothing", "right", "solid"]
    assert outcomes["left"] == ("written", "") and outcomes["right"] == ("written", "")
    assert outcomes["nothing"] == ("empty", "")
    assert outcomes["solid"] == ("too many", "on 13 of 24 axial slices")  # a finished segment
    for name in ("left", "right"):  # each is its own 3D object, from its own drawing
        got = _mask(seg, ids[name], volume)
        assert dice(got, truth[name]) > 0.85, name
        assert np.flatnonzero(got.any(axis=(1, 2))).size >= 10, name
    assert not _mask(seg, ids["nothing"], volume).any()
    assert_same_labelmap(internal_labelmap_state(seg, ids["solid"]), solid_before)
    assert queue.summary() == ('Propagated all 2 drawn segments: "left", "right". Left as it is, a 3D segment: "solid" '
                               "(on 13 of 24 axial slices) (a drawing to propagate is on one slice or a few keyframes: "
                               "at most 32, on at most half the slices). 1 empty segment was left as it was.", "ok")
    # each write is its own Undo: the right one goes back to its drawing, the left one stays
    left_after = _mask(seg, ids["left"], volume)
    mrml.undo_last(seg, ids["right"], history)
    np.testing.assert_array_equal(_mask(seg, ids["right"], volume), _slice_only(truth["right"], 12).astype(bool))
    np.testing.assert_array_equal(_mask(seg, ids["left"], volume), left_after)


def test_a_second_run_passes_over_the_results_it_wrote(organs):
    """Segments holding the PAM result the history remembers are results to update, not drawings:
    passed over, unchanged, with what to do."""
    volume, seg, ids, _ = organs
    history = mrml.PropagationHistory()
    mrml.propagate_segments(volume, seg, [ids["left"], ids["right"]], model=get_predictor("copy"), history=history)
    before = {name: internal_labelmap_state(seg, ids[name]) for name in ("left", "right")}
    queue = mrml.propagate_segments(volume, seg, [ids["left"], ids["right"]], model=get_predictor("copy"),
                                    history=history)
    assert [(name, outcome, detail) for _, name, outcome, detail in queue.outcomes] == [
        ("left", "result", ""), ("right", "result", "")]
    for name in ("left", "right"):
        assert_same_labelmap(internal_labelmap_state(seg, ids[name]), before[name])
    assert queue.summary() == ('No segment of the segmentation holds a drawing to propagate. Left as they hold PAM '
                               'results: "left", "right" (to change one, fix its slices and press Update from my '
                               'edits).', "warning")


def test_cancel_leaves_the_segment_being_propagated_as_it_was_and_starts_no_more(organs):
    volume, seg, ids, _ = organs
    right_before = internal_labelmap_state(seg, ids["right"])
    cancel, seen = CancelToken(), []

    def progress(fraction, message):  # cancelled once the second segment's walk is under way
        seen.append(fraction)
        if len([f for f in seen if f == 0.0]) >= 2 or (len(seen) > 1 and fraction < seen[-2]):
            cancel.cancel()

    queue = mrml.propagate_segments(volume, seg, [ids["left"], ids["right"], ids["solid"]],
                                    model=get_predictor("copy"), cancel=cancel, progress=progress,
                                    history=mrml.PropagationHistory())
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [
        ("left", "written"), ("right", "cancelled"), ("solid", "not started")]
    assert queue.stopped == "cancelled" and queue.done
    assert_same_labelmap(internal_labelmap_state(seg, ids["right"]), right_before)
    assert _mask(seg, ids["left"], volume).any(axis=(1, 2)).sum() >= 10
    text, level = queue.summary()
    assert text == ('Cancelled while propagating "right", which was left as it was. Propagated before: "left" (to take '
                    "one back, select it and press Undo propagation). 1 segment not reached."), text
    assert level == "warning"


def test_a_failed_run_stops_the_queue_and_changes_nothing(organs, tmp_path):
    volume, seg, ids, _ = organs
    before = {name: internal_labelmap_state(seg, ids[name]) for name in ("left", "right")}
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    queue = mrml.propagate_segments(volume, seg, [ids["left"], ids["right"]], checkpoint=str(bad))
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("left", "failed"), ("right", "not started")]
    assert "broken.pt" in queue.outcomes[0][3]
    for name in ("left", "right"):
        assert_same_labelmap(internal_labelmap_state(seg, ids[name]), before[name])
    text, level = queue.summary()
    assert level == "error" and text.startswith('Stopped: propagating "left" failed, nothing was changed in it ('), text
    assert text.endswith("1 segment not reached."), text


def test_the_queue_bookkeeping(organs):
    volume, seg, ids, _ = organs
    with pytest.raises(mrml.InputError, match="listed twice"):
        mrml.SegmentQueue(volume, seg, [ids["left"], ids["left"]])
    queue = mrml.SegmentQueue(volume, seg, [ids["left"], ids["right"]])
    with pytest.raises(mrml.PAMError, match="no segment"):
        queue.record("written")
    assert queue.next() == ids["left"] and queue.position == 1 and queue.total == 2
    with pytest.raises(mrml.PAMError, match='"left" has not been recorded'):
        queue.next()
    with pytest.raises(ValueError, match="outcome must be one of"):
        queue.record("done")
    queue.record("written")
    seg.GetSegmentation().GetSegment(ids["right"]).SetName("kidney")  # renamed meanwhile: said by its name now
    assert queue.next() == ids["right"]
    queue.record("written")
    assert queue.next() is None and queue.done
    assert queue.summary() == ('Propagated all 2 drawn segments: "left", "kidney".', "ok")
    one = mrml.SegmentQueue(volume, seg, [ids["left"]])
    one.next()
    one.record("written")
    assert one.summary() == ('Propagated the drawn segment "left".', "ok")
    none = mrml.SegmentQueue(volume, seg, [ids["nothing"]])
    none.next()
    none.record("empty")
    text, level = none.summary()
    assert level == "error" and text.startswith("No segment of the segmentation holds a drawing"), text


def ready(panel, volume, seg, monkeypatch):  # noqa: F811
    """The panel with "Registration tracking" chosen, the volume and the segmentation selected."""
    ui = panel.ui
    monkeypatch.setattr(type(panel.logic), "missingRequirements", staticmethod(lambda network=True: []))
    ui.trackModelRadioButton.checked = True
    panel.onModelChoiceChanged()
    ui.volumeSelector.setCurrentNode(volume)
    ui.segmentationSelector.setCurrentNode(seg)
    panel.updateButtons()
    return ui


def test_the_panel_propagates_all_drawn_segments_one_after_another(panel, organs, monkeypatch):  # noqa: F811
    volume, seg, ids, truth = organs
    ui = ready(panel, volume, seg, monkeypatch)
    ui.segmentSelector.setCurrentSegmentID("")  # no segment selected: all of them are propagated
    panel.updateButtons()
    assert not ui.propagateButton.enabled and ui.propagateAllButton.enabled
    solid_before = internal_labelmap_state(seg, ids["solid"])
    undo_states = []
    monkeypatch.setattr(panel, "_saveStateForUndo", lambda node: undo_states.append(node))
    ui.propagateAllButton.click()
    assert panel.queue is not None and panel.job.segment_id == ids["left"]
    assert ui.statusLabel.text.startswith('Propagating "left" (segment 1 of 4)...'), ui.statusLabel.text
    assert not ui.propagateAllButton.enabled and not ui.propagateButton.enabled and ui.cancelButton.enabled
    first = panel.job
    assert first.wait(60)
    poll_until_idle(panel, timeout=120)
    assert panel.queue is None and panel.job is not first and panel.job.segment_id == ids["right"]
    assert undo_states == [seg, seg]  # one Segment Editor undo step per segment written
    for name in ("left", "right"):
        assert dice(_mask(seg, ids[name], volume), truth[name]) > 0.8, name
    assert_same_labelmap(internal_labelmap_state(seg, ids["solid"]), solid_before)
    assert ui.statusLabel.text.startswith('Propagated all 2 drawn segments: "left", "right". Left as it is, a 3D '
                                          'segment: "solid" (on 13 of 24 axial slices)'), ui.statusLabel.text
    assert ui.propagateAllButton.enabled and ui.progressBar.format == "done"


def test_cancel_in_the_panel_ends_the_queue(panel, organs, monkeypatch):  # noqa: F811
    volume, seg, ids, _ = organs
    ui = ready(panel, volume, seg, monkeypatch)
    before = {name: internal_labelmap_state(seg, ids[name]) for name in ids}
    ui.propagateAllButton.click()
    ui.cancelButton.click()  # while "left" runs (or just ended, not written: the same)
    poll_until_idle(panel, timeout=120)
    assert panel.queue is None
    for name in ids:
        assert_same_labelmap(internal_labelmap_state(seg, ids[name]), before[name])
    assert ui.statusLabel.text == ('Cancelled while propagating "left", which was left as it was. 3 segments not '
                                   "reached.")


def _picky_copy(smallest: int):
    """The copy baseline refusing, as the engine refuses a drawing, a drawn slice (12) under ``smallest``
    pixels: an InputError raised by the run, not by the job's construction."""
    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.errors import InputError

    class Picky(CopyPredictor):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            if guide_index == 12 and np.count_nonzero(guide_mask) < smallest:
                raise InputError(f"the drawing is smaller than {smallest} pixels")
            return super().predict(volume, guide_index, guide_mask, query_indices)

    return Picky()


def test_a_run_refusing_one_drawing_passes_over_it_and_goes_on(organs):
    """The right ellipsoid's drawing (254 px) is refused by the run itself: noted with why, and the
    segments after it still propagate (a refusal of one drawing is not the queue's end)."""
    volume, seg, ids, truth = organs
    right_before = internal_labelmap_state(seg, ids["right"])
    areas = {name: int(truth[name][12].sum()) for name in ("left", "right")}
    assert areas["right"] < 290 < areas["left"], areas
    queue = mrml.propagate_segments(volume, seg, [ids["right"], ids["left"]], model=_picky_copy(290))
    assert [(name, outcome, detail) for _, name, outcome, detail in queue.outcomes] == [
        ("right", "skipped", "the drawing is smaller than 290 pixels"), ("left", "written", "")]
    assert_same_labelmap(internal_labelmap_state(seg, ids["right"]), right_before)
    assert dice(_mask(seg, ids["left"], volume), truth["left"]) > 0.85


def test_a_segment_edited_while_it_runs_is_not_written_and_the_others_go_on(organs):
    """The user erases part of "left" while it propagates: its result is not written over the edit
    (as with Propagate), the queue goes on with "right"."""
    import slicer

    volume, seg, ids, truth = organs
    edited = []

    def progress(fraction, message):
        if not edited and fraction > 0:  # the first segment's walk has begun: the user edits it
            mask = mrml.segment_mask(seg, ids["left"], volume).copy()
            mask[12, :, :10] = 0
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, ids["left"], volume)
            edited.append(internal_labelmap_state(seg, ids["left"]))

    queue = mrml.propagate_segments(volume, seg, [ids["left"], ids["right"]], model=get_predictor("copy"),
                                    progress=progress)
    assert [(name, outcome) for _, name, outcome, _ in queue.outcomes] == [("left", "not written"),
                                                                          ("right", "written")]
    assert "edited while propagating" in queue.outcomes[0][3]
    assert_same_labelmap(internal_labelmap_state(seg, ids["left"]), edited[0])  # the edit, not the result
    assert dice(_mask(seg, ids["right"], volume), truth["right"]) > 0.85
    text, level = queue.summary()
    assert level == "warning" and text.startswith('Propagated 1 of 2 drawn segments: "right". Not propagated: "left" '
                                                  '(not written: segment "left" was edited while propagating'), text


def test_a_failed_run_in_the_panel_ends_the_queue(panel, organs, tmp_path, monkeypatch):  # noqa: F811
    volume, seg, ids, _ = organs
    ui = panel.ui
    monkeypatch.setattr(type(panel.logic), "missingRequirements", staticmethod(lambda network=True: []))
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    ui.checkpointModelRadioButton.checked = True
    ui.checkpointPathLineEdit.setCurrentPath(str(bad))
    panel.onModelChoiceChanged()
    ui.volumeSelector.setCurrentNode(volume)
    ui.segmentationSelector.setCurrentNode(seg)
    before = {name: internal_labelmap_state(seg, ids[name]) for name in ids}
    ui.propagateAllButton.click()
    poll_until_idle(panel, timeout=60)
    assert panel.queue is None
    for name in ids:
        assert_same_labelmap(internal_labelmap_state(seg, ids[name]), before[name])
    text = ui.statusLabel.text
    assert text.startswith('Stopped: propagating "left" failed, nothing was changed in it (') and "broken.pt" in text
    assert text.endswith("3 segments not reached."), text
