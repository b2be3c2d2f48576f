"""Session 48, the panel: a review of the Slicer module's widget code."""

from __future__ import annotations

import types

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from test_module_static import _slicer, drawn, module, mrml, oracle_loader, panel, poll_until_idle  # noqa: F401,F811


def _packages_missing(widget, drawing, monkeypatch, asked):
    """The panel with the drawn segment selected and one package missing (until the stand-in installer
    the test sets clears the returned list); the installation is agreed to (questions go to ``asked``)."""
    truth, volume, segmentation, segment_id = drawing
    oracle_loader(monkeypatch, truth)
    widget.ui.segmentationSelector.setCurrentNode(segmentation)
    missing = [("cc3d", "connected-components-3d>=3.12")]
    monkeypatch.setattr(widget.logic, "missingRequirements", lambda network=True: list(missing))
    monkeypatch.setattr(_slicer().util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True)
    # close() cancels it, as a QProgressDialog's does (Qt 5 and 6: wasCanceled is true once closed)
    dialog = types.SimpleNamespace(labelText="", wasCanceled=False)
    dialog.close = lambda: setattr(dialog, "wasCanceled", True)
    monkeypatch.setattr(_slicer().util, "createProgressDialog", lambda **kw: dialog)
    return missing, dialog


def test_a_second_press_while_packages_install_starts_nothing_more(panel, drawn, monkeypatch):  # noqa: F811
    """A review (session 48): during the installation the panel answers (pip's output is pumped through
    processEvents), and Propagate pressed again asked again, ran a second installation inside the first
    and started a job the first press then replaced, never written nor cancelled. The buttons are off
    while packages install, a press meanwhile does nothing, and one propagation runs after."""
    segmentation = drawn[2]
    ui, logic = panel.ui, panel.logic
    asked, installs, during = [], [], []
    missing, dialog = _packages_missing(panel, drawn, monkeypatch, asked)
    started = []
    real_start = logic.startPropagation
    monkeypatch.setattr(logic, "startPropagation", lambda *a, **k: started.append(1) or real_start(*a, **k))

    def install(todo, report):
        installs.append(todo)
        during.append((ui.propagateButton.enabled, ui.propagateButton.toolTip, ui.propagateAllButton.enabled,
                       ui.updateButton.enabled))
        panel.onPropagate()  # a press that reached the panel anyway (a click queued before the buttons went off)
        panel.onPropagateAll()
        panel.onUpdate()
        missing.clear()

    monkeypatch.setattr(logic, "installRequirements", install)
    ui.propagateButton.click()
    assert len(asked) == 1 and len(installs) == 1 and len(started) == 1
    assert during == [(False, "Installing the Python packages PAMSegment needs.", False, False)]
    poll_until_idle(panel)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1 and "liver" in ui.statusLabel.text


def test_cancel_in_the_install_dialog_starts_no_propagation(panel, drawn, monkeypatch):  # noqa: F811
    """The installation dialog's Cancel cannot stop pip; it went on to propagate when pip ended. Now the
    packages are there and nothing is started, which the status says."""
    ui, logic = panel.ui, panel.logic
    missing, dialog = _packages_missing(panel, drawn, monkeypatch, [])

    def install(todo, report):
        dialog.wasCanceled = True
        missing.clear()

    monkeypatch.setattr(logic, "installRequirements", install)
    ui.propagateButton.click()
    assert panel.job is None and "nothing was propagated" in ui.statusLabel.text
    assert ui.propagateButton.enabled  # pressed again, it runs
    ui.propagateButton.click()
    assert panel.job is not None
    poll_until_idle(panel)


def test_how_a_run_ended_is_shown_in_the_status_bar_while_the_panel_is_hidden(panel, drawn, monkeypatch):  # noqa: F811
    """A review (session 48): a user who went back to the Segment Editor while the run went on (as the
    panel invites) saw nothing of how it ended, "Result not written" included: that went to the hidden
    panel only. While hidden, the end is shown in Slicer's status bar too; while shown, only in the panel."""
    truth, volume, segmentation, segment_id = drawn
    oracle_loader(monkeypatch, truth)
    shown = []
    monkeypatch.setattr(_slicer().util, "showStatusMessage", lambda text, msec=0: shown.append((text, msec)))
    ui = panel.ui
    ui.segmentationSelector.setCurrentNode(segmentation)
    ui.propagateButton.click()
    poll_until_idle(panel)
    assert "liver" in ui.statusLabel.text and shown == []  # shown: the panel says it
    panel.onUndo()  # (back to the drawing)
    ui.propagateButton.click()
    panel.exit()  # the user goes to another module
    poll_until_idle(panel)
    assert shown and shown[-1] == ("PAMSegment: " + ui.statusLabel.text, 15000) and "liver" in shown[-1][0]


def test_a_closed_scenes_nodes_are_not_held_by_the_ended_job(panel, drawn, monkeypatch, mrml_scene):  # noqa: F811
    """A review (session 48): the panel kept its last job after the scene closed, and the job held the
    scene's volume and segmentation nodes (hundreds of MB for a CT) until the next propagation."""
    import gc
    import weakref

    truth, volume, segmentation, segment_id = drawn
    oracle_loader(monkeypatch, truth)
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.ui.propagateButton.click()
    poll_until_idle(panel)
    assert panel.job is not None and panel.job.volume_node is volume
    image = weakref.ref(volume.GetImageData())
    del volume, segmentation, truth, drawn
    panel.ui.volumeSelector.setCurrentNode(None)
    panel.ui.segmentationSelector.setCurrentNode(None)
    mrml_scene.InvokeEvent(mrml_scene.StartCloseEvent)
    mrml_scene.Clear(0)
    gc.collect()
    assert panel.job is None and image() is None


def test_edits_are_followed_after_the_nodes_segmentation_object_is_replaced(panel, drawn, mrml_scene):  # noqa: F811
    """A review (session 48): the panel observed the node's vtkSegmentation, which Slicer replaces in the
    node (SetAndObserveSegmentation: a segmentation in a Sequence, at each frame); edits were then not
    followed (the prompt line went stale). The node, which passes its segmentation's events on, is
    observed: the replacement itself and the edits after it are followed."""
    import slicer

    truth, volume, segmentation, segment_id = drawn
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.promptRefreshTimer.fire()
    assert panel.ui.promptLabel.text.startswith("Drawn on 1 axial slice")
    replacement = slicer.vtkSegmentation()
    replacement.DeepCopy(segmentation.GetSegmentation())
    segmentation.SetAndObserveSegmentation(replacement)
    assert panel.promptRefreshTimer.active  # the replacement is a change of what is drawn
    panel.promptRefreshTimer.fire()
    assert not panel.promptRefreshTimer.active
    prompt = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    prompt[8] = truth[8]  # a second drawn slice, on the new object
    slicer.util.updateSegmentBinaryLabelmapFromArray(prompt, segmentation, segment_id, volume)
    assert panel.promptRefreshTimer.active
    panel.promptRefreshTimer.fire()
    assert panel.ui.promptLabel.text.startswith("Drawn on 2 axial slices")


def test_a_scene_closed_while_hidden_is_said_once_in_the_status_bar(panel, drawn, monkeypatch, mrml_scene):  # noqa: F811
    """A re-review (session 48): the scene close's "Propagation cancelled" was shown in the status bar, then
    again when the cancelled job's last poll said the same."""
    import threading

    truth, volume, segmentation, segment_id = drawn
    gate = {"started": threading.Event(), "go": threading.Event()}
    oracle_loader(monkeypatch, truth, gate)
    shown = []
    monkeypatch.setattr(_slicer().util, "showStatusMessage", lambda text, msec=0: shown.append(text))
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.ui.propagateButton.click()
    assert gate["started"].wait(10)
    panel.exit()
    panel.onSceneStartClose(None, None)
    gate["go"].set()
    poll_until_idle(panel)
    assert shown == ["PAMSegment: Propagation cancelled because the scene was closed."]


def test_slicer_keeps_the_keyframe_note_for_its_updates_and_in_its_record(mrml_scene):
    """A re-review (session 48): Slicer's history (and the record saved with the segment) did not hold
    the walks-do-not-meet pairs, so an update there dropped the note of a pair it reused."""
    import numpy as np

    from conftest_mrml import make_segmentation, make_volume_node
    from PAMSegmentLib.mrml import PropagationHistory, SegmentPropagation, decode_record, encode_record
    from test_mrml_corrections import _run_of
    from test_review_s48 import _FollowsOneOf, _discs

    one, two, _ = _discs(20)
    image = np.random.default_rng(0).normal(size=one.shape).astype(np.float32)
    drawing = np.zeros(one.shape, np.uint8)
    drawing[4], drawing[12] = one[4], two[12]
    vol = make_volume_node(image)
    seg, ids = make_segmentation(vol, {"organ": drawing})
    job = SegmentPropagation(vol, seg, ids["organ"], model=_FollowsOneOf([one, two])).run()
    assert job.state == "finished" and job.result.disagree == {1: [(4, 12, 0.0)]}
    history = PropagationHistory()
    job.apply(history=history)
    entry = history.get(seg, ids["organ"])
    assert entry.disagree == ((4, 12, 0.0),) and entry.previous_result().disagree == {1: [(4, 12, 0.0)]}
    text = encode_record(entry)
    back = decode_record(text, seg, ids["organ"], _run_of(text))
    assert back.disagree == ((4, 12, 0.0),) and back.previous_result().disagree == {1: [(4, 12, 0.0)]}
