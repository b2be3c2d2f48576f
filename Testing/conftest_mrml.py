"""Fixtures for tests on real MRML nodes (the `slicer-core` wheel: MRML, segmentations, no Qt).

Import into a test module with ``from conftest_mrml import *  # noqa: F401,F403``. Kept out of
Testing/conftest.py so suites that do not need Slicer do not pay for it.

The wheel has the scene and the module logics but no application: the fixture builds a scene,
registers the logics `slicer.util` reaches for (Colors, Data, Volumes, Segmentations) on an
application logic, and sets `slicer.mrmlScene` / `slicer.modules` the way Slicer would.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from PAMSegmentLib.mrml import headless_scene  # noqa: E402

__all__ = ["mrml_scene", "scene_context", "make_volume_node", "make_segmentation", "ellipsoid", "matrix_from_array",
           "oblique_ijk_to_ras", "internal_labelmap_state", "assert_same_labelmap", "slicer", "vtk"]


@contextlib.contextmanager
def scene_context():
    """A fresh scene with the logics registered; `slicer.mrmlScene`/`slicer.modules` point at it."""
    saved = {k: getattr(slicer, k, None) for k in ("mrmlScene", "modules", "app")}
    scene, app, logics = headless_scene()  # keep the logics alive as long as the scene
    try:
        yield scene
    finally:
        scene.Clear(1)
        for key, value in saved.items():
            if value is None:
                if hasattr(slicer, key):
                    delattr(slicer, key)
            else:
                setattr(slicer, key, value)


@pytest.fixture
def mrml_scene():
    """A fresh scene with the Colors, Data, Volumes and Segmentations logics (see scene_context)."""
    with scene_context() as scene:
        yield scene


def matrix_from_array(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def oblique_ijk_to_ras(spacing_ijk=(0.8, 0.9, 2.0), origin=(10.0, -20.0, 5.0), degrees=(30.0, 23.0)) -> np.ndarray:
    """An IJK-to-RAS with a rotation about S then about R (no axis is anatomical any more)."""
    a, b = np.deg2rad(degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag(spacing_ijk)
    m[:3, 3] = origin
    return m


def make_volume_node(array: np.ndarray, ijk_to_ras: np.ndarray | None = None, spacing_ijk=(0.8, 0.9, 2.0),
                     name: str = "volume"):
    """A scalar volume node holding ``array`` (k, j, i)."""
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), name=name)
    if ijk_to_ras is None:
        node.SetSpacing(*spacing_ijk)
        node.SetOrigin(-12.0, 30.0, 7.5)
    else:
        node.SetIJKToRASMatrix(matrix_from_array(ijk_to_ras))
    return node


def make_segmentation(geometry_node, masks: dict[str, np.ndarray], colors: dict[str, tuple] | None = None):
    """A segmentation whose geometry comes from ``geometry_node``, one segment per mask (on its grid).

    Returns (segmentation node, {name: segment id}).
    """
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(geometry_node)
    ids = {}
    palette = [(0.9, 0.2, 0.1), (0.1, 0.7, 0.3), (0.2, 0.3, 0.9)]
    for n, (name, mask) in enumerate(masks.items()):
        color = (colors or {}).get(name, palette[n % len(palette)])
        sid = seg.GetSegmentation().AddEmptySegment("", name, list(color))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, geometry_node)
        ids[name] = sid
    return seg, ids


def ellipsoid(shape, center, radii) -> np.ndarray:
    """Boolean ellipsoid on a (k, j, i) grid; center and radii in voxels, (k, j, i)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    return r2 <= 1.0


def internal_labelmap_state(segmentation_node, segment_id):
    """Everything that defines a segment's stored labelmap: (voxels, extent, image-to-world,
    (scalar type, label value)). The label value says which voxel value is the segment's: the same
    voxels under another label value are another (often empty) segment. It shares the last item
    with the scalar type so that callers unpacking four items keep working."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    lm = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation_node, segment_id)
    return (np.array(voxels, copy=True), tuple(lm.GetExtent()), slicer.util.arrayFromVTKMatrix(m).copy(),
            (lm.GetScalarType(), int(segment.GetLabelValue())))


def assert_same_labelmap(after, before):
    """Two ``internal_labelmap_state`` results are bit-identical (voxels, extent, geometry, scalar
    type and label value)."""
    np.testing.assert_array_equal(after[0], before[0])
    assert after[0].dtype == before[0].dtype
    assert after[1] == before[1]
    assert after[3][0] == before[3][0], f"scalar type {after[3][0]} != {before[3][0]}"
    assert after[3][1] == before[3][1], f"label value {after[3][1]} != {before[3][1]}"
    np.testing.assert_array_equal(after[2], before[2])


def outline_painted_in_ras_view(ijk_to_ras: np.ndarray, truth: np.ndarray, centre_ijk) -> np.ndarray:
    """``truth`` where an axial outline painted in a RAS-aligned slice view through ``centre_ijk`` (i, j,
    k) lands on a volume of that IJK-to-RAS: within 1 mm of the view's plane (bands across an oblique
    volume's slices)."""
    shape = truth.shape
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = ijk_to_ras @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    centre = ijk_to_ras @ np.array([*centre_ijk, 1.0])
    return ((np.abs(ras[2] - centre[2]) <= 1.0).reshape(shape) & truth).astype(np.uint8)
