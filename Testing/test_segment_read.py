"""Reading a segment on the volume's grid (mrml.segment_mask) without Slicer's export where the segment
is stored on the volume's own voxels (session 43).

The export adds a temporary labelmap node (with a display and a colour node) to the scene and
resamples the whole volume: 0.2-0.25 s a read at 512 x 512 x 300 on Slicer's main thread, about
five times a propagation. Where the segment's stored labelmap lies on the volume's voxels (the same
axes and voxel size, its extent anywhere, whole voxels apart) it is read in place. These tests hold
the two reads equal voxel for voxel over many grids, and show that the common grids add nothing to
the scene.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403
from conftest_mrml import ellipsoid, make_volume_node, matrix_from_array, oblique_ijk_to_ras, slicer

from PAMSegmentLib import mrml


def _export(seg, sid, volume):
    """What the export (Slicer's own resample onto the volume's grid) reads: the reference."""
    return (slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume) > 0).astype(np.uint8)


class _NodesAdded:
    """Counts nodes added to the scene while it is held (the export's temporary labelmap adds three)."""

    def __init__(self, scene):
        self.scene, self.count = scene, 0

    def __enter__(self):
        self.tag = self.scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, self._added)
        return self

    def _added(self, *unused):
        self.count += 1

    def __exit__(self, *unused):
        self.scene.RemoveObserver(self.tag)


def _geometry_node(ijk_to_ras: np.ndarray, shape, name="geometry"):
    node = make_volume_node(np.zeros(shape, np.int16), ijk_to_ras, name=name)
    return node


def _segmentation_on(geometry, masks: dict[str, np.ndarray]):
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(geometry)
    ids = {}
    for name, mask in masks.items():
        sid = seg.GetSegmentation().AddEmptySegment("", name, [0.5, 0.5, 0.5])
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, geometry)
        ids[name] = sid
    seg.GetSegmentation().CollapseBinaryLabelmaps(False)  # segments apart from each other: one shared layer
    return seg, ids


def _shifted(ijk_to_ras: np.ndarray, shift_ijk) -> np.ndarray:
    """The same grid with its first voxel moved by ``shift_ijk`` voxels (i, j, k)."""
    out = ijk_to_ras.copy()
    out[:3, 3] += ijk_to_ras[:3, :3] @ np.asarray(shift_ijk, float)
    return out


STRAIGHT = np.diag([0.8, 0.9, 2.0, 1.0])
STRAIGHT[:3, 3] = (-12.0, 30.0, 7.5)


def _scene_case(rng, kind: str):
    """A volume (k, j, i) and a segmentation geometry of the kind asked, with three segments sharing
    what layers Slicer gives them; returns (volume, segmentation, ids, whether the grid is the
    volume's own voxels)."""
    shape = (int(rng.integers(8, 16)), int(rng.integers(12, 24)), int(rng.integers(12, 24)))
    base = oblique_ijk_to_ras() if rng.random() < 0.5 else STRAIGHT.copy()
    volume = make_volume_node(rng.normal(0, 1, shape).astype(np.int16), base, name="volume")
    own = True
    if kind == "volume":
        g_matrix, g_shape = base, shape
    elif kind == "shifted":  # another series' grid on the same voxels: larger, smaller, apart by whole voxels
        shift = rng.integers(-4, 5, 3)
        g_matrix, g_shape = _shifted(base, shift), tuple(int(n + rng.integers(-3, 6)) for n in shape)
    elif kind == "nearly":  # the same voxels but for rounding (1e-6 mm)
        g_matrix, g_shape = base.copy(), shape
        g_matrix[:3, 3] += 1e-6
    elif kind == "finer":
        g_matrix, g_shape = base.copy(), tuple(2 * n for n in shape)
        g_matrix[:3, :3] = base[:3, :3] / 2
        own = False
    elif kind == "half":  # half a voxel apart along i
        g_matrix, g_shape = _shifted(base, (0.5, 0, 0)), shape
        own = False
    elif kind == "flipped":  # the volume's voxels, its i axis reversed
        g_matrix, g_shape = base.copy(), shape
        g_matrix[:3, 0] = -base[:3, 0]
        g_matrix[:3, 3] = base[:3, 3] + base[:3, 0] * (shape[2] - 1)
        own = False
    else:
        raise AssertionError(kind)
    geometry = _geometry_node(g_matrix, g_shape)
    masks = {}
    for n in range(3):
        centre = [rng.uniform(0, s) for s in g_shape]
        radii = [rng.uniform(1.5, max(2.0, s / 3)) for s in g_shape]
        masks[f"s{n}"] = ellipsoid(g_shape, centre, radii)
    masks["s1"] &= ~masks["s0"]  # apart from the others: one shared layer
    masks["s2"] &= ~masks["s0"] & ~masks["s1"]
    seg, ids = _segmentation_on(geometry, masks)
    segmentation = seg.GetSegmentation()
    labels = sorted(segmentation.GetSegment(sid).GetLabelValue() for sid in ids.values())
    assert segmentation.GetNumberOfLayers() == 1 and labels == [1, 2, 3]  # one layer, told apart by label value
    return volume, seg, ids, own


@pytest.mark.parametrize("kind", ["volume", "shifted", "nearly", "finer", "half", "flipped"])
def test_segment_mask_equals_slicers_export_on_every_grid(mrml_scene, kind):
    """Voxel for voxel the export's read, on grids the volume's own (read in place) and others (read
    by the export, as before), 12 random scenes each, straight and oblique volumes, three segments."""
    rng = np.random.default_rng(["volume", "shifted", "nearly", "finer", "half", "flipped"].index(kind))
    read_in_place = 0
    for _ in range(12):
        volume, seg, ids, own = _scene_case(rng, kind)
        for sid in ids.values():
            with _NodesAdded(mrml_scene) as added:
                mask = mrml.segment_mask(seg, sid, volume)
            expected = _export(seg, sid, volume)
            assert mask.dtype == np.uint8 and mask.shape == expected.shape
            np.testing.assert_array_equal(mask, expected)
            read_in_place += added.count == 0
        mrml_scene.Clear(0)
    # the volume's own voxels: read without the export (nothing added to the scene); other grids: the export
    assert read_in_place == (36 if own else 0)


def test_segment_mask_in_place_with_transforms(mrml_scene):
    """The same parent transform on both nodes: read in place, equal to the export. Two different
    linear transforms that bring the grids onto whole voxels: read in place, equal to the exact read
    of such transforms (the export misplaces voxels there, see _linear_between)."""
    rng = np.random.default_rng(7)
    shape = (10, 14, 16)
    truth = ellipsoid(shape, (5, 7, 8), (4, 5, 6))
    volume = make_volume_node(rng.normal(0, 1, shape).astype(np.int16), STRAIGHT, name="volume")
    seg, ids = _segmentation_on(volume, {"a": truth})
    moved = np.eye(4)
    moved[:3, 3] = (3.0, -4.0, 5.0)
    shared = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shared.SetMatrixTransformToParent(matrix_from_array(moved))
    volume.SetAndObserveTransformNodeID(shared.GetID())
    seg.SetAndObserveTransformNodeID(shared.GetID())
    with _NodesAdded(mrml_scene) as added:
        mask = mrml.segment_mask(seg, ids["a"], volume)
    assert added.count == 0
    np.testing.assert_array_equal(mask, _export(seg, ids["a"], volume))
    assert int(mask.sum()) == int(truth.sum())

    # two transforms, the segmentation's moved by two whole voxels along k against the volume's
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    two_slices = moved.copy()
    two_slices[2, 3] += 2 * STRAIGHT[2, 2]
    other.SetMatrixTransformToParent(matrix_from_array(two_slices))
    seg.SetAndObserveTransformNodeID(other.GetID())
    with _NodesAdded(mrml_scene) as added:
        mask = mrml.segment_mask(seg, ids["a"], volume)
    assert added.count == 0
    between = mrml._linear_between(volume, seg)
    exact = mrml._segment_mask_linear(seg, seg.GetSegmentation().GetSegment(ids["a"]), ids["a"], volume, between)
    np.testing.assert_array_equal(mask, exact)
    np.testing.assert_array_equal(mask[2:], truth[:-2].astype(np.uint8))  # two slices up
    assert not mask[:2].any()


def test_segment_mask_of_an_empty_segment_and_one_outside(mrml_scene):
    """An empty segment and one stored wholly beyond the volume read as zeros, as the export reads them."""
    shape = (8, 12, 12)
    volume = make_volume_node(np.zeros(shape, np.int16), STRAIGHT, name="volume")
    beyond = _geometry_node(_shifted(STRAIGHT, (0, 0, 20)), shape)  # 20 slices past the volume's last
    seg, ids = _segmentation_on(beyond, {"far": ellipsoid(shape, (4, 6, 6), (3, 4, 4))})
    empty = seg.GetSegmentation().AddEmptySegment("", "empty", [0.1, 0.2, 0.3])
    for sid in (ids["far"], empty):
        mask = mrml.segment_mask(seg, sid, volume)
        assert mask.shape == shape and not mask.any()
        np.testing.assert_array_equal(mask, _export(seg, sid, volume))


def test_panel_benchmark_script_prints_each_call(tmp_path):
    """scripts/benchmark_slicer_panel.py (the README's main-thread figures) runs and prints a time for
    each of the panel's calls and the two totals (a small volume here; no timing is asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_slicer_panel.py"
    out = subprocess.run([sys.executable, str(script), "--depth", "16", "--size", "48", "--repeats", "1",
                          "--finished", "2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "48 x 48 x 16 int16, median of 1 runs (seconds):"
    queue = lines[-2:]  # Propagate all drawn: the two organs passed over, both drawings propagated
    assert queue[0].startswith("propagate all drawn, 2 finished segments and 2 drawings: main thread ")
    assert queue[1].strip().startswith('Propagated all 2 drawn segments: "drawn 0", "drawn 1". Left as they are')
    lines = lines[:-2]
    timed = [line for line in lines[1:] if not line.strip().endswith(" s")]
    assert len(timed) == 10 and all(float(line.split()[-1]) >= 0 for line in timed)
    totals = {line.split(":")[0].strip(): float(line.split()[-2]) for line in lines if "main thread in all" in line}
    assert set(totals) == {"propagate", "update"}
    sums = {kind: sum(float(line.split()[-1]) for line in timed
                      if line.strip().startswith(kind) and "worker" not in line) for kind in totals}
    assert totals == pytest.approx(sums, abs=0.011)
