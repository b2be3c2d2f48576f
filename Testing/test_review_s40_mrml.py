"""Session 40, the Slicer side: writing a result onto a finer segmentation grid is checked for memory."""

from __future__ import annotations

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import (assert_same_labelmap, ellipsoid, internal_labelmap_state, make_segmentation, make_volume_node,
                           slicer, vtk)
from PAMSegmentLib import mrml
from PAMSegmentLib.baselines import get_predictor
from PAMSegmentLib.errors import NotEnoughMemory
from test_review_s31 import _oversample

SHAPE = (20, 40, 40)
MiB = 2**20


@pytest.fixture
def oversampled_ball(mrml_scene):
    """A ball drawn on slice 10 of a 40 x 40 x 20 volume, its segmentation oversampled 3 times."""
    truth = ellipsoid(SHAPE, (10, 20, 20), (6, 10, 10))
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[10] = truth[10]
    seg, ids = make_segmentation(volume, {"ball": prompt})
    _oversample(seg, volume, 3.0)
    return volume, seg, ids["ball"], truth


def _finished(job):
    job.start()
    assert job.wait(60) and job.state == "finished", job.error
    return job


@pytest.mark.parametrize("mode", ["replace", "new"])
def test_a_result_too_large_for_the_memory_free_on_a_finer_grid_is_refused_before_anything_changes(
        oversampled_ball, monkeypatch, mode):
    """Session 39 narrowed the write on an oversampled segmentation grid to the box around the
    result, yet a large result there still needs some 4 bytes a voxel of that box on the fine grid
    (measured 3.4-3.6): a whole-volume result at oversampling 4 on a 512 x 512 x 200 CT is 3.4 G
    voxels, and VTK ends Slicer on an allocation that fails. The job's own memory check counts the
    volume's grid only. Now the write is checked first and refused with nothing changed (no undo
    step either), and written when told to."""
    volume, seg, sid, truth = oversampled_ball
    job = _finished(mrml.SegmentPropagation(volume, seg, sid, mode=mode, model=get_predictor("copy")))
    result = job.result.mask > 0
    ks, js, is_ = (np.flatnonzero(result.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    box = (ks[-1] - ks[0] + 1) * (js[-1] - js[0] + 1) * (is_[-1] - is_[0] + 1) * 27  # on the x3 grid
    need = box * mrml.WRITE_BYTES_PER_VOXEL
    assert need > 400_000  # (the copy baseline's result spans several slices: 4 bytes x 130 k voxels)
    before = internal_labelmap_state(seg, sid)
    segments_before = seg.GetSegmentation().GetNumberOfSegments()
    calls = []
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: need - 1)
    with pytest.raises(NotEnoughMemory) as info:
        job.apply(history=mrml.PropagationHistory(), before_write=lambda: calls.append("before_write"))
    reason = info.value.reason
    assert reason.startswith('writing "ball": the result on the segmentation\'s own grid (3 times as fine as the '
                             "volume's along each axis: Segment Editor > Specify geometry) is ")
    assert f"needs about {need / MiB:,.0f} MB to write" in reason and "Nothing was changed" in reason
    assert "memory_check=False" in str(info.value) and "memory_check" not in reason  # (the panel shows the reason)
    assert calls == [] and job.state == "finished" and job.applied_segment_id is None
    assert seg.GetSegmentation().GetNumberOfSegments() == segments_before
    assert_same_labelmap(internal_labelmap_state(seg, sid), before)

    monkeypatch.setattr(mrml, "_memory_free_now", lambda: need)  # just enough: written
    written = job.apply(history=mrml.PropagationHistory(), before_write=lambda: calls.append("before_write"))
    assert calls == ["before_write"] and (written == sid) == (mode == "replace")
    np.testing.assert_array_equal(mrml.segment_mask(seg, written, volume) > 0, result)


def test_told_to_the_refused_write_goes_ahead_and_a_grid_like_the_volumes_is_not_checked(oversampled_ball,
                                                                                        monkeypatch):
    volume, seg, sid, truth = oversampled_ball
    job = _finished(mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy")))
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 1000)
    with pytest.raises(NotEnoughMemory):
        job.apply()
    assert job.apply(memory_check=False) == sid
    np.testing.assert_array_equal(mrml.segment_mask(seg, sid, volume) > 0, job.result.mask > 0)
    with pytest.raises(ValueError, match="memory_check"):
        job.apply(memory_check="no")  # (a flag; checked even after the write: it is the call's argument)

    # a job made with memory_check=False (the panel's "Run it anyway") is still checked when written
    # (a re-review: the write is another risk than the run the user accepted); propagate_segment's
    # memory_check=False is for both
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 10**12)
    other = mrml.segment_mask(seg, sid, volume)
    other[:] = 0
    other[10] = truth[10]
    seg2, ids = make_segmentation(volume, {"ball": other})
    _oversample(seg2, volume, 3.0)
    job2 = _finished(mrml.SegmentPropagation(volume, seg2, ids["ball"], model=get_predictor("copy"),
                                             memory_check=False))
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 1000)
    with pytest.raises(NotEnoughMemory):
        job2.apply()
    assert job2.apply(memory_check=False) == ids["ball"]
    seg3, ids3 = make_segmentation(volume, {"ball": other})
    _oversample(seg3, volume, 3.0)
    assert mrml.propagate_segment(volume, seg3, ids3["ball"], model=get_predictor("copy"), memory_check=False,
                                  history=mrml.PropagationHistory()) == ids3["ball"]
    np.testing.assert_array_equal(mrml.segment_mask(seg3, ids3["ball"], volume), job.result.mask > 0)

    # on the volume's own grid nothing is resampled, so nothing is checked at write time
    plain, ids4 = make_segmentation(volume, {"ball": other})
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 10**12)
    job4 = _finished(mrml.SegmentPropagation(volume, plain, ids4["ball"], model=get_predictor("copy")))
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 1)
    assert job4.apply() == ids4["ball"]


def test_the_write_estimate_counts_the_rotated_grids_footprint_test(monkeypatch):
    """On a grid rotated against the volume's the write also holds two more images of the box and
    a copy of the result on the volume's grid: 6 bytes a box voxel + 1 a volume voxel."""
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 10 * 20 * 30 * 6 + 5 * 5 * 5 - 1)
    with pytest.raises(NotEnoughMemory, match="not the volume's grid"):
        mrml.check_write_memory((10, 20, 30), (5, 5, 5), False, 1.0, "writing")
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 10 * 20 * 30 * 6 + 5 * 5 * 5)
    mrml.check_write_memory((10, 20, 30), (5, 5, 5), False, 1.0, "writing")
    mrml.check_write_memory((10, 20, 30), (5, 5, 5), True, 2.0, "writing")  # aligned: 4 bytes a voxel fit
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: None)  # the system does not say: not refused
    mrml.check_write_memory((10**4, 10**4, 10**4), (5, 5, 5), True, 4.0, "writing")


def test_a_failure_while_the_result_is_prepared_is_one_message_and_changes_nothing(oversampled_ball, monkeypatch,
                                                                                    caplog):
    """The result's labelmap is now made before the write's try (which takes a write back and says
    so): an unexpected failure there (numpy's MemoryError has no text) is still one message."""
    import logging

    volume, seg, sid, truth = oversampled_ball
    job = _finished(mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy")))
    before = internal_labelmap_state(seg, sid)

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(mrml, "_on_segmentation_grid", out_of_memory)
    with caplog.at_level(logging.CRITICAL, logger="PAMSegmentLib.mrml"):
        with pytest.raises(mrml.PAMError, match=r"^the result could not be written \(MemoryError: no details\); "
                                                r"nothing was changed$"):
            job.apply(history=mrml.PropagationHistory())
    assert_same_labelmap(internal_labelmap_state(seg, sid), before)
    assert job.state == "finished" and job.applied_segment_id is None



def test_the_segments_own_voxels_are_copied_within_their_box_only(oversampled_ball):
    """A re-review (session 40): after Specify geometry a segment's layer can span the whole finer
    grid, and the write copied all of it (a one-slice drawing on 256 x 256 x 200 at x3: 354 M
    voxels, +342 MB) before its memory check. Only the box of the layer's voxels is copied now."""
    from vtk.util import numpy_support

    volume, seg, sid, truth = oversampled_ball
    stored = seg.GetSegmentation().GetSegment(sid).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    e = stored.GetExtent()
    layer = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    ks, js, is_ = (np.flatnonzero(layer.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    box = (e[0] + is_[0], e[0] + is_[-1], e[2] + js[0], e[2] + js[-1], e[4] + ks[0], e[4] + ks[-1])
    assert (e[5] - e[4] + 1) > 3 * (ks[-1] - ks[0] + 1)  # (the layer spans the fine grid, the drawing 3 slices)
    own = mrml._segment_own_voxels(seg, sid)
    # (with a voxel of the layer's zeros around the box: test_a_copy_cut_to_its_box_keeps_a_half_voxel_tie_as_it_was)
    padded = tuple(max(box[a] - 1, e[a]) if a % 2 == 0 else min(box[a] + 1, e[a]) for a in range(6))
    assert own.GetExtent() == tuple(int(v) for v in padded)
    voxels = numpy_support.vtk_to_numpy(own.GetPointData().GetScalars())
    assert int(voxels.sum()) == int((layer == seg.GetSegmentation().GetSegment(sid).GetLabelValue()).sum()) > 0
    m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    own.GetImageToWorldMatrix(m1)
    stored.GetImageToWorldMatrix(m2)
    np.testing.assert_array_equal(slicer.util.arrayFromVTKMatrix(m1), slicer.util.arrayFromVTKMatrix(m2))


def test_a_finished_run_gives_its_freed_memory_back_before_the_write(oversampled_ball, monkeypatch):
    """A re-review (session 40): glibc kept a large run's freed temporaries resident, and the write
    came on top of them (a body outline on 512 x 512 x 300 with the copy baseline: 530 MB above the
    job's memory check against its 500 MB estimate; 418 MB after malloc_trim). The worker trims the
    heap once the engine has returned."""
    import PAMSegmentLib.volumes as volumes

    volume, seg, sid, truth = oversampled_ball
    order = []
    real_engine = mrml._run_engine
    monkeypatch.setattr(mrml, "_run_engine", lambda *a, **k: (order.append("engine"), real_engine(*a, **k))[1])
    monkeypatch.setattr(volumes, "trim_heap", lambda: order.append("trim"))
    job = _finished(mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy")))
    assert order == ["engine", "trim"]
    job.apply()


def test_a_copy_cut_to_its_box_keeps_a_half_voxel_tie_as_it_was(mrml_scene):
    """A second re-review (session 40): with the segment's own voxels cut to exactly their box, a
    layer on a grid half a voxel off the volume's resampled at a tie took the box's edge voxel (1)
    where the full copy had the 0 beyond it: writing an empty result inside the volume added a column
    of 4 voxels to what the segment held outside it (16 voxels instead of 12). A voxel of zeros is
    kept around the box."""
    from vtk.util import numpy_support

    vol = slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.int16), name="vol")
    vol.SetIJKToRASMatrix(vtk.vtkMatrix4x4())  # identity: world x 0..3
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    layer = slicer.vtkOrientedImageData()
    layer.SetExtent(-6, 9, 0, 3, 0, 3)
    layer.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 0.5)  # half a voxel off along x (an imported labelmap)
    layer.SetImageToWorldMatrix(matrix)
    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(4, 4, 16)
    voxels[:] = 0
    voxels[1:3, 1:3, 0:3] = 1  # world x -5.5 .. -3.5: outside the volume
    segment = slicer.vtkSegment()
    segment.SetName("s")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), layer)
    seg.GetSegmentation().AddSegment(segment, "s")

    mrml.write_segment_mask(np.zeros((4, 4, 4), np.uint8), mrml._grid_of(vol), seg, "s", vol)
    stored = seg.GetSegmentation().GetSegment("s").GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    e = stored.GetExtent()
    held = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    k, j, i = np.nonzero(held == seg.GetSegmentation().GetSegment("s").GetLabelValue())
    m = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(m)
    x = slicer.util.arrayFromVTKMatrix(m) @ np.vstack([i + e[0], j + e[2], k + e[4], np.ones_like(i)])
    assert len(i) == 12 and sorted(set(np.round(x[0], 3))) == [-6.0, -5.0, -4.0]  # re-gridded, nothing added
