"""Session 46: Slicer-side (real MRML nodes, slicer-core)."""

from __future__ import annotations

import numpy as np
from conftest_mrml import *  # noqa: F401,F403
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node

from PAMSegmentLib import mrml
from PAMSegmentLib.baselines import get_predictor


def test_a_label_map_volume_is_noted_once_in_a_queue(mrml_scene):
    """A review (session 46): "Propagate all drawn segments" on a volume that is a label map put the
    same long note in every segment's line; it is said for the first written segment only."""
    shape = (24, 40, 60)
    left, right = ellipsoid(shape, (12, 20, 16), (8, 10, 10)), ellipsoid(shape, (12, 20, 44), (6, 9, 9))
    labels = (left * 3 + right * 5).astype(np.int16)  # a label map given as the volume
    volume = make_volume_node(labels, name="labels")
    seg, ids = make_segmentation(volume, {"left": np.where(np.arange(24)[:, None, None] == 12, left, 0),
                                          "right": np.where(np.arange(24)[:, None, None] == 12, right, 0)})
    queue = mrml.propagate_segments(volume, seg, model=get_predictor("copy"))
    details = {name: detail for _, name, outcome, detail in queue.outcomes if outcome == "written"}
    assert set(details) == {"left", "right"}
    said = "the image holds only 3 distinct values (0, 3, 5), in flat regions: it looks like a label map"
    assert said in details["left"] and said not in details["right"]
    scan = make_volume_node((labels * 20 + np.random.default_rng(0).normal(0, 8, shape)).astype(np.float32),
                            name="scan")
    seg2, _ = make_segmentation(scan, {"left": np.where(np.arange(24)[:, None, None] == 12, left, 0)})
    assert "label map" not in " ".join(d for *_, d in mrml.propagate_segments(scan, seg2,
                                                                              model=get_predictor("copy")).outcomes)
