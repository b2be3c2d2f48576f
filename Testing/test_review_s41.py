"""Session 41: a prompt of many labels drawn on different slices (each structure on its own middle
slice), and other findings of the session's reviews."""

from __future__ import annotations

import tracemalloc

import numpy as np

from PAMSegmentLib import propagate as engine
from PAMSegmentLib.baselines import CopyPredictor


def _spread_labels(n_labels=40, shape=(80, 48, 48), seed=0):
    """A prompt of ``n_labels`` discs, each drawn on one slice of its own along axis 0, in a grid."""
    rng = np.random.default_rng(seed)
    prompt = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    for lab in range(1, n_labels + 1):
        cy, cx = 6 + 12 * ((lab - 1) % 4), 6 + 12 * (((lab - 1) // 4) % 4)
        z = 5 + int(rng.integers(0, shape[0] - 10))
        prompt[z][(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = lab
    return prompt


def test_many_labels_on_different_slices_do_not_hold_a_mask_of_the_drawing_each():
    """Session 41: find_prompt_slices kept, per label, a boolean mask of the whole drawing's box
    (views of ``prompt == label``), and the box of labels drawn on slices along the whole axis is
    the whole volume: 49 labels on 256 x 256 x 600 peaked at 1414 MB for a 39 MB prompt (0.8 s; now
    250 MB, 0.05 s). Each label's box now comes from the drawn voxels' positions: here, 40 labels
    on 80 x 48 x 48, the old code's peak was 28.6 bytes a voxel (now 1.8: the drawn voxels' two masks)."""
    prompt = _spread_labels()
    tracemalloc.start()
    try:
        axis, slices = engine.find_prompt_slices(prompt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert axis == 0 and sorted(slices) == list(range(1, 41))
    for lab, drawn in slices.items():
        assert drawn == [int(np.flatnonzero((prompt == lab).any(axis=(1, 2)))[0])]
    assert peak < 4 * prompt.size, f"{peak / prompt.size:.1f} bytes a voxel"


def test_label_boxes_are_the_labels_bounding_boxes():
    """The one-pass boxes equal ``_bounding_box(prompt == label)`` (mask and start) for sparse
    prompts of several integer types, views of moved axes, keyframes and labels absent; dense,
    floating-point and one-label prompts go the label-by-label way (a guard: passes on the code
    before, which had no such function)."""
    rng = np.random.default_rng(41)
    checked_sparse = 0
    for trial in range(60):
        shape = tuple(int(v) for v in rng.integers(3, 30, size=3))
        prompt = np.zeros(shape, dtype=[np.uint8, np.int16, np.uint16, np.int32, np.int64][trial % 5])
        n = int(rng.integers(1, 6))
        for lab in range(1, n + 1):
            for _ in range(int(rng.integers(1, 3))):  # one or two drawn slices (keyframes)
                z = int(rng.integers(0, shape[0]))
                y0, x0 = int(rng.integers(0, shape[1])), int(rng.integers(0, shape[2]))
                prompt[z, y0:y0 + int(rng.integers(1, 4)), x0:x0 + int(rng.integers(1, 4))] = lab * 7
        view = np.moveaxis(prompt, trial % 3, 0)
        labels = [7 * lab for lab in range(1, n + 1)] + [5]  # 5: not drawn
        sparse = engine._sparse_label_boxes(view, labels)
        checked_sparse += sparse is not None
        for boxes in (engine._label_boxes(view, labels), sparse):
            if boxes is None:
                continue
            for lab in labels:
                want_mask, want_start = engine._bounding_box(view == lab)
                got_mask, got_start = boxes[lab]
                assert got_start == want_start, (trial, lab)
                np.testing.assert_array_equal(got_mask, want_mask)
    assert checked_sparse > 20
    dense = np.ones((4, 5, 6), dtype=np.uint8)
    dense[2] = 2
    assert engine._sparse_label_boxes(dense, [1, 2]) is None
    assert engine._sparse_label_boxes(dense.astype(np.float32), [1, 2]) is None
    assert engine._label_boxes(dense.astype(np.float32), [2])[2][1] == (2, 0, 0)


def test_many_labels_propagate_as_before():
    """The engine's per-label loop takes each label's drawing from the one-pass boxes: the merged
    map, ranges and keyframes are those of labels run one at a time (copy predictor: 12 labels,
    each a bright disc over 9 slices around its own drawn slice). A guard: passes on the code before."""
    prompt = _spread_labels(n_labels=12, shape=(40, 48, 48), seed=3)
    rng = np.random.default_rng(3)
    image = rng.normal(0, 5, prompt.shape).astype(np.float32)
    for lab in range(1, 13):  # each label's disc bright over 8 slices around its drawing
        z = int(np.flatnonzero((prompt == lab).any(axis=(1, 2)))[0])
        disc = (prompt[z] == lab)
        image[max(0, z - 4):z + 5][:, disc] += 100 + 10 * lab
    result = engine.propagate(image, prompt, (1.0, 1.0, 1.0), CopyPredictor())
    for lab in range(1, 13):
        alone = engine.propagate(image, np.where(prompt == lab, lab, 0).astype(np.uint8), (1.0, 1.0, 1.0),
                                 CopyPredictor())
        np.testing.assert_array_equal(result.mask == lab, alone.mask == lab)
        assert result.slice_range[lab] == alone.slice_range[lab]
        assert result.keyframes[lab].keys() == alone.keyframes[lab].keys()
        z = result.prompt_slices[lab][0]
        assert 7 <= result.slice_range[lab][1] - result.slice_range[lab][0] <= 9, result.slice_range[lab]
        assert (result.mask[z] == lab).sum() == (prompt[z] == lab).sum()
