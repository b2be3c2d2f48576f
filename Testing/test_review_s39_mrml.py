"""Session 39, the Slicer side: what a hostile trial of the Logic on real slicer-core nodes found."""

from __future__ import annotations

import numpy as np

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node, slicer
import PAMSegmentLib.mrml as mrml
from test_review_s31 import _oversample

SHAPE = (30, 96, 96)


def _voxels(extent) -> int:
    return (extent[1] - extent[0] + 1) * (extent[3] - extent[2] + 1) * (extent[5] - extent[4] + 1)


def _held(seg, sid) -> int:
    """The voxels the segment holds (0 when it stores none)."""
    from vtk.util import numpy_support

    own = mrml._segment_own_voxels(seg, sid)
    return 0 if own is None else int(numpy_support.vtk_to_numpy(own.GetPointData().GetScalars()).sum())


def test_a_result_on_an_oversampled_segmentation_is_written_into_its_own_box_only(mrml_scene, monkeypatch):
    """A trial (session 39): on a segmentation oversampled 3 times (Segment Editor > Specify
    geometry), the result was resampled onto the volume's whole footprint on the fine grid: the
    volume's voxels x 27 on the GUI thread whatever the result's size (a 512 x 512 x 200 CT: 13 s
    and 2.5 GB more for a small nodule; under a memory limit Slicer aborted). Now only the box
    around the result and the segment's own voxels is written; a voxel the segment held inside the
    volume but the result does not is still cleared (one outside the volume is kept: test_mrml's
    cropped-volume tests, oversampled too)."""
    vol = make_volume_node(np.zeros(SHAPE, np.int16))
    stray = np.zeros(SHAPE, np.uint8)
    stray[2:4, 5:9, 5:9] = 1  # held by the segment, not by the result: must go
    seg, ids = make_segmentation(vol, {"nodule": stray})
    sid = ids["nodule"]
    _oversample(seg, vol, 3.0)
    grid = mrml._grid_of(vol)
    full_footprint = np.prod(SHAPE) * 27
    assert slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).astype(bool).sum() == stray.sum()
    real = slicer.vtkSlicerSegmentationsModuleLogic
    written = []  # the extent of each labelmap handed to Slicer's write: what was resampled for it

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def SetBinaryLabelmapToSegment(self, labelmap, *args):
            written.append(labelmap.GetExtent())
            return real.SetBinaryLabelmapToSegment(labelmap, *args)

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Spy())

    nodule = ellipsoid(SHAPE, (15, 60, 60), (3, 5, 5))
    mrml.write_segment_mask(nodule, grid, seg, sid, vol)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).astype(bool), nodule)
    # the box from the stray voxels' corner to the nodule's on the fine grid (x3 each way), not 24.9 M voxels
    box = (18 - 2 + 1) * (65 - 5 + 1) * (65 - 5 + 1) * 27
    assert len(written) == 1 and _voxels(written[0]) <= box < full_footprint / 3  # (the old code: 24.9 M)

    mrml.write_segment_mask(nodule, grid, seg, sid, vol)  # written again: now only the nodule's own box
    assert _voxels(written[1]) <= (7 + 1) * (11 + 1) * (11 + 1) * 27
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).astype(bool), nodule)

    mrml.write_segment_mask(np.zeros(SHAPE, np.uint8), grid, seg, sid, vol)  # an empty result empties it
    assert _held(seg, sid) == 0 and _voxels(written[2]) <= (7 + 1) * (11 + 1) * (11 + 1) * 27
