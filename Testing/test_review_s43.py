"""Session 43's review of the in-place segment read (mrml.segment_mask on the volume's own voxels):
each test fails on the code before its mend."""

from __future__ import annotations

import numpy as np

from conftest_mrml import *  # noqa: F401,F403
from conftest_mrml import ellipsoid, make_volume_node, matrix_from_array, slicer, vtk

from PAMSegmentLib import mrml as mrml_lib
from test_module_static import _edit, _propagated, _segment_array, _slicer  # noqa: F401
from test_module_static import drawn, module, mrml, panel  # noqa: F401,F811 - fixtures


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
