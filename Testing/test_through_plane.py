"""Thick slices: walks through slices interpolated along the axis (``through_plane_mm``)."""

from __future__ import annotations

import numpy as np
import pytest

from PAMSegmentLib.checkpoints import InferenceParams, load_checkpoint_file
from PAMSegmentLib.errors import PropagationCancelled
from PAMSegmentLib.propagate import (AxisInterpolated, CancelToken, SlicePrediction, SlicePredictor, propagate,
                                     through_plane_factor)


def test_interpolated_volume_keeps_the_original_slices_and_blends_linearly_between():
    vol = np.stack([np.full((2, 3), v, np.int16) for v in (0, 30, 60, 90)])
    fine = AxisInterpolated(vol, 3)
    assert fine.shape == (10, 2, 3) and len(fine) == 10 and fine.dtype == np.float32
    for i in range(4):  # original slice i is slice 3 i
        np.testing.assert_array_equal(fine[3 * i], vol[i])
    assert fine[1][0, 0] == pytest.approx(10.0) and fine[2][0, 0] == pytest.approx(20.0)
    assert fine[8][1, 2] == pytest.approx(80.0)
    np.testing.assert_allclose(fine[[4, 5, 9]][:, 0, 0], [40.0, 50.0, 90.0])
    with pytest.raises(IndexError):
        fine[10]
    # indexed as an array (a custom predictor slices it as one): ranges, crops, negative indices
    np.testing.assert_allclose(fine[1:3][:, 0, 0], [10.0, 20.0])
    np.testing.assert_allclose(fine[4, 0:1, 1:3], [[40.0, 40.0]])
    np.testing.assert_array_equal(fine[-1], vol[-1])
    with pytest.raises(TypeError):
        fine[1.5]


@pytest.mark.parametrize("spacing, target, k", [(3.0, 1.5, 2), (2.0, 1.5, 2), (1.5, 1.5, 1), (1.0, 1.5, 1),
                                                (5.0, 1.5, 4), (3.0, 1.0, 3), (3.0, 0.0, 1), (20.0, 0.25, 8)])
def test_interpolation_factor(spacing, target, k):
    class P(SlicePredictor):
        through_plane_mm = target

        def predict(self, *a):  # pragma: no cover - never called
            raise AssertionError

    assert through_plane_factor(spacing, P()) == k


class _ThresholdModel(SlicePredictor):
    """Segments the slice it is asked for by thresholding it (>= 0.6), so what it returns depends on
    the interpolated slices; presence = 1 where anything is found. Records every query."""

    def __init__(self, through_plane_mm: float, window_mm: float = 6.0):
        self.through_plane_mm = through_plane_mm
        self.window_mm, self.max_window, self.min_window = window_mm, 40, 1
        self.queries: list[int] = []
        self.volumes: set[int] = set()
        self.begun: list[int] = []

    def begin(self, volume, prompt_index, prompt_mask):
        self.begun.append(int(prompt_index))

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.volumes.add(id(volume))
        self.queries += [int(q) for q in query_indices]
        prob = (volume[list(query_indices)] >= 0.6).astype(np.float32)
        return SlicePrediction(prob, prob.reshape(len(prob), -1).max(axis=1))


def _cylinder(first: int, last: int, shape=(12, 16, 16)):
    truth = np.zeros(shape, bool)
    j, i = np.ogrid[:16, :16]
    truth[first : last + 1] = (j - 8) ** 2 + (i - 8) ** 2 <= 16
    return truth, truth.astype(np.float32)  # image: 1 inside, 0 outside


def test_walk_steps_through_interpolated_slices_and_keeps_the_original_ones():
    """3 mm slices, target 1.5 mm: k = 2. The object fills slices 3-8; the slice interpolated
    between 8 and 9 is 0.5 inside it (below the 0.6 threshold), so the upward walk ends there and
    slice 9 is never predicted. The result, ranges and stops are in original slices."""
    truth, image = _cylinder(3, 8)
    prompt = truth.astype(np.uint8) * 0
    prompt[5][truth[5]] = 1
    model = _ThresholdModel(1.5)
    seen: list[float] = []
    res = propagate(image, prompt, (3.0, 1.0, 1.0), model, batch_size=1, progress=lambda f, m: seen.append(f))
    np.testing.assert_array_equal(res.mask > 0, truth)
    assert res.mask.shape == truth.shape and res.slice_range[1] == (3, 8)
    assert model.begun == [10]  # the prompt's slice 5 is slice 10 of the interpolated walk
    # One slice a batch; both sides end at the first slice below 0.6: 17 (between 8 and 9) upwards
    # and 5 (between 2 and 3) downwards.
    assert sorted(model.queries) == list(range(5, 10)) + list(range(11, 18))
    assert res.n_predicted == 12
    assert {(s["start"], s["direction"], s["last"]) for s in res.stops[1]} == {(5, 1, 8), (5, -1, 3)}
    assert np.isnan(res.confidence[1][9]) and np.isfinite(res.confidence[1][3:9]).all()
    assert seen[-1] == 1.0 and all(a <= b for a, b in zip(seen, seen[1:]))


def test_off_walks_the_volume_itself():
    truth, image = _cylinder(3, 8)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[5][truth[5]] = 1
    model = _ThresholdModel(0.0)
    res = propagate(image, prompt, (3.0, 1.0, 1.0), model)
    np.testing.assert_array_equal(res.mask > 0, truth)
    assert max(model.queries) == 9 and model.begun == [5]  # slice 9 is where the walk finds nothing
    model = _ThresholdModel(3.0)  # spacing not above the target: off as well
    propagate(image, prompt, (3.0, 1.0, 1.0), model)
    assert model.begun == [5]


def test_keyframes_and_the_slices_between_them_stay_on_the_original_grid():
    """Two drawn slices (2 and 9; the drawn masks differ from the image on purpose): they are kept
    exactly, every slice between them is predicted through the interpolated walk from both sides."""
    truth, image = _cylinder(0, 11)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[2, 6:10, 6:10] = 1
    prompt[9, 7:9, 7:9] = 1
    model = _ThresholdModel(1.0)  # k = 3
    res = propagate(image, prompt, (3.0, 1.0, 1.0), model)
    np.testing.assert_array_equal(res.mask[2], prompt[2])
    np.testing.assert_array_equal(res.mask[9], prompt[9])
    for s in (0, 1, 3, 4, 5, 6, 7, 8, 10, 11):
        np.testing.assert_array_equal(res.mask[s] > 0, truth[s], err_msg=f"slice {s}")
    # Between the keyframes both walks cover the interpolated slices 7..26 (from each side).
    assert sorted(set(model.queries) & set(range(7, 27))) == list(range(7, 27))


def test_cancel_inside_an_interpolated_walk_changes_nothing():
    truth, image = _cylinder(0, 11)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[5][truth[5]] = 1
    token = CancelToken()
    with pytest.raises(PropagationCancelled):
        propagate(image, prompt, (3.0, 1.0, 1.0), _ThresholdModel(1.5), batch_size=2,
                  progress=lambda f, m: token.cancel(), cancel=token)
    assert prompt.sum() == truth[5].sum()  # the input is untouched


def test_inference_parameter_is_validated_and_old_checkpoints_read_as_off():
    assert InferenceParams().through_plane_mm == 0.0
    assert InferenceParams.from_dict({"window_mm": 20.0}).through_plane_mm == 0.0
    assert InferenceParams(through_plane_mm=1.5).through_plane_mm == 1.5
    for bad in (-1.0, 0.1, 25.0):
        with pytest.raises(ValueError, match="through_plane_mm must be 0"):
            InferenceParams(through_plane_mm=bad)


def test_pam_predictor_follows_the_checkpoints_parameter(small_checkpoint):
    """The network path end to end on 4 mm slices (k = 3 at 1.5 mm): the result is on the original
    grid, the drawn slice is kept, and the same input gives the same output."""
    from dataclasses import replace

    model = load_checkpoint_file(small_checkpoint.path)
    model.inference = replace(model.inference, through_plane_mm=1.5)
    shape = (10, 48, 48)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    obj = ((k - 5) / 3.5) ** 2 + ((j - 24) / 10.0) ** 2 + ((i - 22) / 11.0) ** 2 <= 1
    image = np.where(obj, 120.0, 30.0) + np.random.default_rng(4).normal(0, 8, shape)
    prompt = np.zeros(shape, np.uint8)
    prompt[5][obj[5]] = 1
    a, b = (propagate(image, prompt, (4.0, 0.8, 0.8), model, early_stop=False) for _ in range(2))
    assert a.mask.shape == shape
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.mask[5], prompt[5])
    assert a.n_predicted == 27  # every interpolated slice but the prompt's: 9 x 3


def test_an_update_with_a_new_keyframe_recomputes_only_what_changed_and_matches_a_fresh_run():
    """The correction loop on an interpolated walk: adding a drawn slice at 9 (prompt at 3) keeps
    the walk below 3 from the first run and recomputes 4..8 and beyond 9; the result is the same
    as propagating both drawn slices from scratch."""
    truth, image = _cylinder(1, 10)
    first_prompt = np.zeros(truth.shape, np.uint8)
    first_prompt[3][truth[3]] = 1
    first = propagate(image, first_prompt, (3.0, 1.0, 1.0), _ThresholdModel(1.5))
    prompt = first_prompt.copy()
    prompt[9, 6:11, 6:11] = 1  # the user's drawing on slice 9 (a square, not the disc)
    model = _ThresholdModel(1.5)
    update = propagate(image, prompt, (3.0, 1.0, 1.0), model, previous=first)
    fresh = propagate(image, prompt, (3.0, 1.0, 1.0), _ThresholdModel(1.5))
    assert update.recomputed == {1: [(4, 8), (10, 11)]}
    assert min(model.queries) > 6  # nothing below the old prompt (slice 3 = interpolated slice 6) again
    np.testing.assert_array_equal(update.mask, fresh.mask)
    np.testing.assert_array_equal(update.mask[9], prompt[9])
    np.testing.assert_array_equal(update.mask[:9] > 0, truth[:9])


def test_a_walk_keeps_only_the_interpolated_slices_it_still_needs():
    from PAMSegmentLib.propagate import _OriginalSlices

    kept = _OriginalSlices(k=3, span=4)
    for j in range(1, 16):
        kept[j] = j
    # every original slice (multiples of 3), and the interpolated ones within 4 of the newest (15)
    assert sorted(kept) == [3, 6, 9, 11, 12, 13, 14, 15]
    kept.pop(14)  # a dropped slice (forward-backward check) may be popped before it ages out
    kept[16] = 16
    assert sorted(kept) == [3, 6, 9, 12, 13, 15, 16]


def test_a_downward_walk_that_ends_between_two_slices_records_the_last_slice_it_reached():
    """A mutation review: a downward walk ending on an interpolated slice could have recorded the
    original slice below it. Slice 2 holds the disc at 0.4 (below the 0.6 threshold) and slice 3
    at 1.0: the interpolated slice between them (0.7) still holds it, slice 2 does not, so the
    downward walk's last original slice with the object is 3, not 2."""
    truth, image = _cylinder(3, 8)
    image[2] = 0.4 * truth[3]
    prompt = truth.astype(np.uint8) * 0
    prompt[5][truth[5]] = 1
    res = propagate(image, prompt, (3.0, 1.0, 1.0), _ThresholdModel(1.5), batch_size=1)
    np.testing.assert_array_equal(res.mask > 0, truth)
    down = [s for s in res.stops[1] if s["direction"] == -1]
    assert [(s["start"], s["last"]) for s in down] == [(5, 3)]
