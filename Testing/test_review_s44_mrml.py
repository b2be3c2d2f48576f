"""Session 44: Slicer-side mends (real MRML nodes, slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest_mrml import *  # noqa: F401,F403
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node
from doubles import OracleModel

from PAMSegmentLib.mrml import PropagationHistory, propagate_segment, segment_mask


@pytest.mark.parametrize("shared", [False, True])
def test_undo_keeps_every_segments_3d_surface(mrml_scene, shared):
    """A review (session 44): Undo propagation put the drawing back and invalidated the derived
    representations, which Slicer does for every segment of the segmentation: the other segments'
    surfaces went too, and Slicer's 3D view, which shows a segmentation only where its first segment
    holds a surface, showed none (Show 3D unticked itself). The surfaces are made again now: the
    drawn segment's from its drawing, the other's as it was."""
    surface = "Closed surface"
    shape = (20, 32, 36)
    a, b = ellipsoid(shape, (10, 10, 10), (6, 6, 6)), ellipsoid(shape, (10, 22, 26), (6, 6, 6))
    image = (a * 100.0 + b * 60 + np.random.default_rng(1).normal(0, 5, shape)).astype(np.float32)
    vol = make_volume_node(image)
    prompt = np.zeros(shape, np.uint8)
    prompt[10] = a[10]
    seg, ids = make_segmentation(vol, {"A": prompt, "B": b.astype(np.uint8)})
    segmentation = seg.GetSegmentation()
    if shared:
        segmentation.CollapseBinaryLabelmaps(False)
    seg.CreateClosedSurfaceRepresentation()  # Show 3D

    def points(name):
        poly = segmentation.GetSegment(ids[name]).GetRepresentation(surface)
        return None if poly is None else poly.GetNumberOfPoints()

    drawn, other = points("A"), points("B")
    assert drawn and other
    history = PropagationHistory()
    propagate_segment(vol, seg, ids["A"], model=OracleModel(a, window=3), history=history)
    assert points("A") > drawn
    before = segmentation.GetSegment(ids["B"]).GetRepresentation(surface).GetAddressAsString("vtkPolyData")
    history.undo_last(seg, ids["A"])
    assert segmentation.ContainsRepresentation(surface)
    assert points("A") == drawn and points("B") == other
    # the other segment's surface is put back as it was, not converted again (50 large segments: 3 s)
    assert segmentation.GetSegment(ids["B"]).GetRepresentation(surface).GetAddressAsString("vtkPolyData") == before
    np.testing.assert_array_equal(segment_mask(seg, ids["A"], vol), prompt.astype(bool))
    np.testing.assert_array_equal(segment_mask(seg, ids["B"], vol), b)


def test_undo_without_a_surface_makes_none(mrml_scene):
    """Where no surface was shown, Undo makes none (building one costs time on a large segmentation)."""
    shape = (16, 24, 24)
    a = ellipsoid(shape, (8, 12, 12), (5, 6, 6))
    vol = make_volume_node((a * 100.0).astype(np.float32))
    prompt = np.zeros(shape, np.uint8)
    prompt[8] = a[8]
    seg, ids = make_segmentation(vol, {"A": prompt})
    history = PropagationHistory()
    propagate_segment(vol, seg, ids["A"], model=OracleModel(a, window=3), history=history)
    history.undo_last(seg, ids["A"])
    assert not seg.GetSegmentation().ContainsRepresentation("Closed surface")
    np.testing.assert_array_equal(segment_mask(seg, ids["A"], vol), prompt.astype(bool))
