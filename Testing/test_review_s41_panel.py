"""Session 41: the Slicer panel (on the stand-in Qt of test_module_static)."""

from __future__ import annotations

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from test_module_static import drawn, module, mrml, panel  # noqa: F401,F811 - fixtures


def test_the_panel_lets_an_ended_job_go(panel, drawn, monkeypatch):  # noqa: F811
    """A helper's probe (session 41): the panel kept the finished job, with the volume, the prompt
    and the result (300 MB after a propagation of 512 x 512 x 300, 450 MB after an update), until
    the next job was made, whose memory check then counted them as used (its peak 1327 MB against
    1177 MB with the old job let go). Once a job has ended and been written, its arrays go; the job
    stays, with its summary."""
    import weakref

    truth, volume, segmentation, segment_id = drawn
    panel.ui.volumeSelector.setCurrentNode(volume)
    panel.ui.segmentationSelector.setCurrentNode(segmentation)
    panel.ui.segmentSelector.setCurrentSegmentID(segment_id)
    monkeypatch.setattr(type(panel.logic), "missingRequirements", staticmethod(lambda network=True: []))
    panel.ui.trackModelRadioButton.checked = True
    panel.onModelChoiceChanged()
    panel.onPropagate()
    job = panel.job
    assert job is not None and job.wait(60) and job.state == "finished", job.error
    image, mask = weakref.ref(job.image), weakref.ref(job.result.mask)
    panel.onPollJob()
    status = panel.ui.statusLabel.text
    assert status.startswith('"') and job.summary() in status, status  # written: '"tumor": ... slices ...'
    assert panel.job is job and job.state == "finished" and job.applied_segment_id
    assert job.image is None and job.prompt is None and job.result.mask is None
    assert image() is None and mask() is None  # nothing else holds the volume's copy or the result
    panel.updateButtons()
    assert panel.ui.propagateButton.enabled or panel.ui.updateButton.enabled
