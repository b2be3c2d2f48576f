"""Session 40: the Slicer panel (on the stand-in Qt of test_module_static), from a desk-check."""

from __future__ import annotations

import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from test_module_static import drawn, module, mrml, panel  # noqa: F401,F811 - fixtures


def _torch_fails_to_load(monkeypatch):
    """``import torch`` raises what an installed torch whose native libraries do not load raises."""
    import builtins
    import sys

    real_import = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise OSError('[WinError 126] The specified module could not be found. Error loading "fbgemm.dll"')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # (a failed import leaves no module behind)


@pytest.mark.parametrize("button", ["propagateButton", "updateButton"])
def test_a_torch_that_is_installed_but_does_not_load_is_said_in_the_panel(panel, drawn, monkeypatch,  # noqa: F811
                                                                          button):
    """A desk-check of the panel (session 40): a torch whose native libraries fail to load raises
    OSError, not ImportError, so the version check counts it installed and the device lookup raised
    out of the click handler: Propagate and Update did nothing, without a word (a traceback in the
    Python console only), and every module entry raised again."""
    truth, volume, segmentation, segment_id = drawn
    panel.ui.volumeSelector.setCurrentNode(volume)
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.ui.segmentSelector.setCurrentSegmentID(segment_id)
    logic = type(panel.logic)
    monkeypatch.setattr(logic, "missingRequirements", staticmethod(lambda network=True: []))
    _torch_fails_to_load(monkeypatch)
    assert logic.availableDevices() == ["cpu"]  # (the deferred lookup on entering the module)
    getattr(panel, "onPropagate" if button == "propagateButton" else "onUpdate")()
    text = panel.ui.statusLabel.text
    assert text.startswith("PyTorch is installed but cannot be loaded (OSError: [WinError 126] The specified module "
                           'could not be found. Error loading "fbgemm.dll"). Reinstall it')
    assert text.endswith("Nothing was changed.") and panel.job is None

    panel.ui.trackModelRadioButton.checked = True  # the classical tracker needs no torch: it runs
    panel.onModelChoiceChanged()
    panel.onPropagate()
    assert panel.job is not None and panel.job.kind == "propagation", panel.ui.statusLabel.text
    assert panel.job.wait(60) and panel.job.state == "finished", panel.job.error


def test_a_segment_deleted_while_the_selector_keeps_its_id_is_no_input(panel, drawn):  # noqa: F811
    """A desk-check (session 40): Slicer's segment selector returns early on a segmentation with no
    segments, keeping the ID of the segment just deleted; the panel then kept Propagate on for a
    segment that no longer exists. A segment ID the segmentation does not hold counts as none."""
    truth, volume, segmentation, segment_id = drawn
    panel.ui.volumeSelector.setCurrentNode(volume)
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.ui.segmentSelector.setCurrentSegmentID(segment_id)
    panel.updateButtons()
    assert panel.ui.propagateButton.enabled
    segmentation.GetSegmentation().RemoveSegment(segment_id)  # the selector (a stand-in) keeps the ID
    assert panel.ui.segmentSelector.currentSegmentID() == segment_id
    panel.updateButtons()
    panel._refreshPromptLabel()
    assert not panel.ui.propagateButton.enabled
    assert panel.ui.promptLabel.text == "Select a volume and a segment drawn on one slice."


def test_a_failed_check_for_unseen_edits_leaves_update_on_and_says_the_prompt(panel, drawn,  # noqa: F811
                                                                            monkeypatch, caplog):
    """A desk-check (session 40): the prompt line's check for edits only a finer segmentation grid
    shows ran outside the panel's error handling: a failure there (memory running out hashing a
    large layer) left the prompt line unset and raised out of the refresh timer; and Update must not
    be switched off as "no edits for certain" when the check could not run."""
    import logging

    from test_module_static import _propagated

    _propagated(panel, drawn, monkeypatch)
    logic = type(panel.logic)

    def fails(self, *args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(logic, "unseenEdits", fails)
    panel._noEditsOf = None
    panel.ui.promptLabel.text = ""
    with caplog.at_level(logging.ERROR):
        panel._refreshPromptLabel()
    assert panel.ui.promptLabel.text == ("Propagated: PAM result on axial slices 4-16; your slices: 10. Fix any wrong "
                                         "slice in the Segment Editor, then press Update from my edits.")
    assert panel._noEditsOf is None  # (not "no edits for certain": Update stays on)
    assert "checking the segment for edits on its finer grid failed" in caplog.text
