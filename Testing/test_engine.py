"""Propagation engine mechanics, checked with predictors whose answers are known.

``OracleModel`` returns the true mask of every query slice, so any difference between the result
and the truth is the engine's doing (walk, stopping, batching, post-processing).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from doubles import LeakModel, OracleModel, ShiftModel

from PAMSegmentLib.checkpoints import load_checkpoint_file
from PAMSegmentLib.errors import InputError, PropagationCancelled
from PAMSegmentLib.propagate import (CancelToken, PropagationResult, SlicePrediction, SlicePredictor,
                                     find_prompt_slices, propagate)

ISO = (1.0, 1.0, 1.0)
SHAPE = (30, 16, 16)


def disc(shape2d=SHAPE[1:], center=(8, 8), radius=4.0) -> np.ndarray:
    j, i = np.ogrid[: shape2d[0], : shape2d[1]]
    return (j - center[0]) ** 2 + (i - center[1]) ** 2 <= radius**2


def tube(first: int, last: int, shape=SHAPE, **kw) -> np.ndarray:
    """A disc repeated on slices first..last (both included), along axis 0."""
    m = np.zeros(shape, bool)
    m[first : last + 1] = disc(shape[1:], **kw)
    return m


def prompt_from(truth: np.ndarray, slices, label: int = 1) -> np.ndarray:
    p = np.zeros(truth.shape, np.uint8)
    for s in np.atleast_1d(slices):
        p[s][truth[s]] = label
    return p


def image_for(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=truth.shape).astype(np.float32)


def predicted(model: OracleModel) -> list[int]:
    return sorted(q for _, qs in model.calls for q in qs)


# ----------------------------------------------------------------------------- stopping


def test_stops_exactly_where_the_object_ends():
    truth = tube(8, 20)
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=1)
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    done = predicted(model)
    # One slice past each end is predicted (found empty), and nothing further.
    assert min(done) == 7 and max(done) == 21
    assert len(done) == len(set(done)) == 14  # every slice once: 7..13 and 15..21
    assert res.slice_range == {1: (8, 20)}
    assert res.axis == 0 and res.prompt_slices == {1: [14]}
    assert np.isnan(res.confidence[1][:7]).all() and np.isnan(res.confidence[1][22:]).all()


def test_stopping_with_whole_windows_per_batch():
    truth = tube(8, 20)
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    done = predicted(model)
    # A window is predicted in one call, so the empty slice's window is completed, no further.
    assert 7 - 3 <= min(done) <= 7 and 21 <= max(done) <= 21 + 3
    assert len(model.calls) == 2 + 2  # 13..10, 9..6 down; 15..18, 19..22 up


def test_range_is_honoured_both_ends_included():
    truth = tube(2, 27)
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, range=(10, 18), batch_size=3)
    assert set(predicted(model)) == set(range(10, 19)) - {14}
    want = np.zeros_like(truth)
    want[10:19] = truth[10:19]
    np.testing.assert_array_equal(res.mask, want.astype(np.uint8))
    assert res.slice_range[1] == (10, 18)


def test_object_that_splits_into_two_parts():
    """Y shape: one part on slices 4..12, two parts (left, right) on 13..22."""
    truth = np.zeros(SHAPE, bool)
    j, i = np.ogrid[:16, :16]
    wide = ((j - 8) / 4.0) ** 2 + ((i - 8) / 6.5) ** 2 <= 1
    truth[4:13] = wide
    truth[13:23] = disc(center=(8, 3), radius=2.5) | disc(center=(8, 13), radius=2.5)
    assert not (disc(center=(8, 3), radius=2.5) & disc(center=(8, 13), radius=2.5)).any()
    for prompt_slice in (8, 18):  # on the single part, then on both parts
        model = OracleModel(truth, window=4)
        res = propagate(image_for(truth), prompt_from(truth, prompt_slice), ISO, model, batch_size=2)
        np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
        assert res.slice_range[1] == (4, 22)


def test_no_early_stop_predicts_every_slice_and_keeps_reappearing_object():
    truth = tube(4, 10) | tube(14, 22)  # vanishes on 11, 12, 13
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 7), ISO, model, early_stop=False, batch_size=4)
    assert predicted(model) == [s for s in range(SHAPE[0]) if s != 7]
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    assert res.slice_range[1] == (4, 22)

    # With the stopping rule the walk ends at the gap.
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 7), ISO, model, batch_size=1)
    np.testing.assert_array_equal(res.mask, tube(4, 10).astype(np.uint8))
    assert max(predicted(model)) == 11


def test_a_slice_too_small_to_go_on_ends_the_walk_and_stays_empty():
    """With min_area_fraction 0.25, a slice whose region is under a quarter of its guide's ends
    the walk. Slice 21 holds a 2-pixel crumb touching slice 20's disc; its guide (slice 18) has
    the 49-pixel disc, and 2 < 0.25 x 49 = 12.25: the walk ends there and the crumb is not kept."""
    truth = tube(8, 20)
    truth[21, 8, 8:10] = True
    model = OracleModel(truth, window=4)
    model.min_area_fraction = 0.25
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    np.testing.assert_array_equal(res.mask, tube(8, 20).astype(np.uint8))
    assert res.slice_range == {1: (8, 20)}
    assert sorted((s["direction"], s["last"], s["reason"]) for s in res.stops[1]) == [(-1, 8, "area"),
                                                                                      (1, 20, "area")]


class _FairlySureOracle(OracleModel):
    """The true masks as probability 0.8 (0 elsewhere), with an object-present probability of 0.75."""

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        return SlicePrediction(0.8 * pred.prob, np.full(len(pred.prob), 0.75, np.float32))


def test_slice_confidence_is_the_mean_foreground_probability_times_the_presence():
    truth = tube(8, 20)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, _FairlySureOracle(truth, window=4))
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    conf = res.confidence[1]
    assert conf[14] == 1.0  # the drawn slice
    # 0.8 on every object pixel x presence 0.75 = 0.6 on slices 8-13 and 15-20.
    np.testing.assert_allclose(conf[[*range(8, 14), *range(15, 21)]], 0.6, rtol=1e-6)
    assert conf[7] == conf[21] == 0.0  # found empty (no foreground): the walks ended there
    assert np.isnan(conf[:7]).all() and np.isnan(conf[22:]).all()


def test_range_may_end_on_the_last_slice_but_not_past_it():
    truth = tube(8, 20)
    image, prompt = image_for(truth), prompt_from(truth, 14)
    res = propagate(image, prompt, ISO, OracleModel(truth), range=(5, 29))  # 30 slices: 29 is the last
    assert res.range == (5, 29) and res.slice_range == {1: (8, 20)}
    with pytest.raises(InputError, match=r"^range 5:30 is outside the 30 slices along axis 0 \(valid 0:29\)$"):
        propagate(image, prompt, ISO, OracleModel(truth), range=(5, 30))


# ----------------------------------------------------------------------------- cancel, progress, batching


def test_cancel_from_the_progress_callback():
    truth = tube(2, 27)
    model = OracleModel(truth, window=4)
    token = CancelToken()
    with pytest.raises(PropagationCancelled):
        propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=2,
                  progress=lambda frac, msg: token.cancel(), cancel=token)
    assert len(model.calls) == 1  # checked between batches: the second batch never ran


def test_progress_is_monotone_and_ends_at_one():
    truth = tube(4, 10) | tube(14, 22)
    for kwargs in ({}, {"early_stop": False}, {"batch_size": 1}):
        seen: list[float] = []
        propagate(image_for(truth), prompt_from(truth, [6, 9]), ISO, OracleModel(truth), **kwargs,
                  progress=lambda frac, msg: seen.append(frac))
        assert seen, kwargs
        assert all(0.0 <= f <= 1.0 for f in seen)
        assert all(a <= b for a, b in zip(seen, seen[1:]))
        assert seen[-1] == 1.0


class _ProgressSpy(OracleModel):
    """Records the last progress fraction reported before each predict call."""

    def __init__(self, truth):
        super().__init__(truth, window=4)
        self.reported = [0.0]
        self.at_call: list[float] = []

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.at_call.append(self.reported[-1])
        return super().predict(volume, guide_index, guide_mask, query_indices)


@pytest.mark.parametrize("end", [9, 10, 11, 12])
def test_progress_counts_slices_when_a_side_stops_early(end):
    """When the downward side stops inside a batch, progress jumps to exactly that side's share
    (14 of the 29 slices to walk), wherever in the batch the empty slice was."""
    truth = tube(end, 20)
    model = _ProgressSpy(truth)
    propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64,
              progress=lambda frac, msg: model.reported.append(frac))
    first_up = next(n for n, (g, qs) in enumerate(model.calls) if qs[0] > 14)
    assert model.at_call[first_up] == pytest.approx(14 / 29)


# ----------------------------------------------------------------------------- forward-backward check


def _leak_setup():
    truth = tube(8, 20)  # disc of radius 4 at (8, 8): 49 pixels per slice
    neighbour = np.zeros(SHAPE, bool)
    neighbour[:, 1:15, 13:16] = True  # a look-alike strip beside it on every slice (42 pixels)
    return truth, neighbour


def test_without_the_check_a_drifting_model_leaks_into_the_neighbour():
    truth, neighbour = _leak_setup()
    model = LeakModel(truth, neighbour, leak_distance=3, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    assert (res.mask.astype(bool) & neighbour & ~truth).sum() > 0


def test_forward_backward_check_drops_drifted_slices_and_walks_on_from_the_last_good_one():
    """Window 4 from slice 14: slices 17 and 18 leak (3 and 4 away). Predicting 14 back from 18
    gives the disc plus the strip (Dice 2*49/(49+91) = 0.70 < 0.9), from 16 the disc again
    (Dice 1), so 17 and 18 are dropped and predicted again from 16, where they do not leak."""
    truth, neighbour = _leak_setup()
    model = LeakModel(truth, neighbour, leak_distance=3, window=4, consistency_min_dice=0.9)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    assert res.slice_range == {1: (8, 20)}
    # The first upward window and its checks: 15..18 from 14, then back 18 -> 14 (fails) and
    # 16 -> 14 (passes); the next window starts at 17 with 16 as its guide.
    first_up = next(n for n, (g, qs) in enumerate(model.calls) if qs[0] > 14)
    assert model.calls[first_up:first_up + 4] == [(14, [15, 16, 17, 18]), (18, [14]), (16, [14]), (16, [17, 18, 19, 20])]


def test_forward_backward_check_ends_a_side_that_drifts_at_once():
    """A model that leaks from the first slice on: nothing predicted is consistent, both sides
    end at the drawn slice (rather than filling the neighbour)."""
    truth, neighbour = _leak_setup()
    model = LeakModel(truth, neighbour, leak_distance=1, window=4, consistency_min_dice=0.9)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    np.testing.assert_array_equal(res.mask, prompt_from(truth, 14))
    assert res.slice_range == {1: (14, 14)}
    assert np.isnan(res.confidence[1][15:]).all() and np.isnan(res.confidence[1][:14]).all()


def test_forward_backward_check_keeps_a_window_whose_back_prediction_meets_the_minimum_exactly():
    """consistency_min_dice = 1: a model that never leaks predicts the guide back exactly (Dice 1,
    which meets the minimum), so no slice is dropped and each window is checked once, from its
    farthest slice."""
    truth, neighbour = _leak_setup()
    model = LeakModel(truth, neighbour, leak_distance=100, window=4, consistency_min_dice=1.0)
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=64)
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    first_up = next(n for n, (g, qs) in enumerate(model.calls) if qs[0] > 14)
    assert model.calls[first_up:first_up + 3] == [(14, [15, 16, 17, 18]), (18, [14]), (18, [19, 20, 21, 22])]


def test_forward_backward_check_keeps_progress_monotone_and_complete():
    truth, neighbour = _leak_setup()
    for leak in (1, 3):
        seen: list[float] = []
        model = LeakModel(truth, neighbour, leak_distance=leak, window=4, consistency_min_dice=0.9)
        propagate(image_for(truth), prompt_from(truth, 14), ISO, model, batch_size=2,
                  progress=lambda frac, msg: seen.append(frac))
        assert all(a <= b for a, b in zip(seen, seen[1:])) and seen[-1] == 1.0


def test_batching_does_not_change_the_result():
    truth = tube(5, 24)
    image, prompt = image_for(truth), prompt_from(truth, [12, 16])
    for make in (lambda: OracleModel(truth, window=4), lambda: ShiftModel(shift=1, window=4)):
        results = [propagate(image, prompt, ISO, make(), batch_size=b, range=(2, 27)) for b in (1, 3, 64)]
        for other in results[1:]:
            np.testing.assert_array_equal(other.mask, results[0].mask)
            np.testing.assert_array_equal(other.confidence[1], results[0].confidence[1])
            assert other.slice_range == results[0].slice_range


# ----------------------------------------------------------------------------- post-processing, axes, labels


class _StrayBlobOracle(OracleModel):
    """The truth plus a small blob far from the object on slice ``at``."""

    def __init__(self, truth, at):
        super().__init__(truth, window=4)
        self.at = at

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        for q, idx in enumerate(query_indices):
            if idx == self.at:
                pred.prob[q, 0:2, 0:2] = 1.0
        return pred


def test_components_not_connected_to_the_prompt_are_removed():
    truth = tube(6, 20, center=(9, 9), radius=3)
    stray = np.zeros_like(truth)
    stray[12, 0:2, 0:2] = True
    res = propagate(image_for(truth), prompt_from(truth, 14), ISO, _StrayBlobOracle(truth, at=12))
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    kept = propagate(image_for(truth), prompt_from(truth, 14), ISO, _StrayBlobOracle(truth, at=12),
                     remove_disconnected=False)
    np.testing.assert_array_equal(kept.mask, (truth | stray).astype(np.uint8))


def test_a_thin_oblique_object_touching_the_next_slice_at_a_corner_is_kept():
    """A thin vessel running obliquely: a 2 x 2 px square that moves 2 px down and 2 px right per
    slice (slices 4-8), so consecutive slices touch only at one corner ((k, r+1, c+1) and
    (k+1, r+2, c+2)). The component filter keeps 26-connected components: all of it stays."""
    truth = np.zeros(SHAPE, bool)
    for n, k in enumerate(range(4, 9)):
        truth[k, 2 + 2 * n:4 + 2 * n, 2 + 2 * n:4 + 2 * n] = True
    res = propagate(image_for(truth), prompt_from(truth, 6), ISO, OracleModel(truth, window=4))
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    assert res.slice_range == {1: (4, 8)}


@pytest.mark.parametrize("axis", [1, 2])
def test_axis_is_detected_from_the_prompt(axis):
    shape = (20, 24, 28)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    truth = ((k - 10) / 6.0) ** 2 + ((j - 12) / 7.0) ** 2 + ((i - 14) / 8.0) ** 2 <= 1
    prompt = np.zeros(shape, np.uint8)
    index = [slice(None)] * 3
    index[axis] = shape[axis] // 2
    prompt[tuple(index)] = truth[tuple(index)]
    model = OracleModel(np.moveaxis(truth, axis, 0), window=4)
    res = propagate(image_for(truth), prompt, ISO, model)
    assert res.axis == axis
    assert res.prompt_slices == {1: [shape[axis] // 2]}
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    # Given explicitly, the same.
    res2 = propagate(image_for(truth), prompt, ISO, OracleModel(np.moveaxis(truth, axis, 0), window=4), axis=axis)
    np.testing.assert_array_equal(res2.mask, res.mask)


class _LabelOracle(SlicePredictor):
    """True mask of whichever label the current prompt was drawn on (``truth`` is a label map)."""

    def __init__(self, truth: np.ndarray, window: int = 4):
        self.truth = truth
        self.window_mm, self.max_window, self.min_window = float(window), window, 1
        self.label = 0
        self.labels_begun: list[int] = []

    def begin(self, volume, prompt_index, prompt_mask):
        values, counts = np.unique(self.truth[prompt_index][prompt_mask], return_counts=True)
        self.label = int(values[np.argmax(counts)])
        self.labels_begun.append(self.label)

    def predict(self, volume, guide_index, guide_mask, query_indices):
        return SlicePrediction((self.truth[list(query_indices)] == self.label).astype(np.float32))


def test_several_labels_into_one_label_map():
    truth = np.zeros(SHAPE, np.uint8)
    truth[tube(3, 12, center=(4, 4), radius=3)] = 1
    truth[tube(9, 25, center=(11, 11), radius=3)] = 4
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[8][truth[8] == 1] = 1
    prompt[20][truth[20] == 4] = 4
    model = _LabelOracle(truth)
    res = propagate(image_for(truth), prompt, ISO, model)
    assert model.labels_begun == [1, 4]
    np.testing.assert_array_equal(res.mask, truth)
    assert res.slice_range == {1: (3, 12), 4: (9, 25)}
    only4 = propagate(image_for(truth), prompt, ISO, _LabelOracle(truth), labels=[4])
    np.testing.assert_array_equal(only4.mask, np.where(truth == 4, 4, 0))


def test_keyframes_are_kept_exactly_and_slices_between_come_from_both_sides():
    truth = tube(3, 25)
    prompt = prompt_from(truth, [8, 16])
    prompt[8, 8, 13] = 1  # the user's keyframes differ from what the model would say
    prompt[16, 3, 8] = 0
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt, ISO, model)
    np.testing.assert_array_equal(res.mask[8], prompt[8])
    np.testing.assert_array_equal(res.mask[16], prompt[16])
    assert res.prompt_slices == {1: [8, 16]}
    between = range(9, 16)
    counts = {s: sum(qs.count(s) for _, qs in model.calls) for s in between}
    assert counts == {s: 2 for s in between}  # once walking up from 8, once walking down from 16
    assert any(g == 8 and 9 in qs for g, qs in model.calls)
    assert any(g == 16 and 15 in qs for g, qs in model.calls)
    np.testing.assert_array_equal(res.mask[9:16], truth[9:16])


class _ForwardOnlyOracle(OracleModel):
    """Right when walking towards higher slices, empty when walking down."""

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        if min(query_indices) < guide_index:
            pred.prob[:] = 0
        return pred


def test_keyframe_fusion_weights_each_side_by_distance():
    truth = tube(3, 25)
    voting = _ForwardOnlyOracle(truth, window=4)
    voting.keyframe_empty_side_votes = True  # the rule before session 19 (validate.py's pam+kfvotes)
    res = propagate(image_for(truth), prompt_from(truth, [8, 16]), ISO, voting, range=(8, 16))
    # Slice s gets weight (16 - s) / 8 from keyframe 8's (correct) side: >= 0.5 up to slice 12.
    occupied = [s for s in range(9, 16) if res.mask[s].any()]
    assert occupied == [9, 10, 11, 12] and res.gaps == {1: [13, 14, 15]}
    # Now a walk that predicted nothing on a slice between two keyframes (both hold the object)
    # does not vote there: the other side's prediction is taken alone.
    res = propagate(image_for(truth), prompt_from(truth, [8, 16]), ISO, _ForwardOnlyOracle(truth, window=4),
                    range=(8, 16))
    np.testing.assert_array_equal(res.mask[8:17] > 0, truth[8:17])


class _UnsureOracle(OracleModel):
    """The true masks, but an object-present probability of 0.2 on every slice: the presence
    alone would end every walk at once."""

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        return SlicePrediction(pred.prob, np.full(len(pred.prob), 0.2, np.float32))


def test_stop_signals_do_not_empty_slices_between_two_keyframes():
    """Both keyframes hold the object, so between them a low presence keeps the masks (slices
    9-15 as the truth); beyond them it still ends the walks on their first slice (7 and 17)."""
    truth = tube(3, 25)
    res = propagate(image_for(truth), prompt_from(truth, [8, 16]), ISO, _UnsureOracle(truth, window=4))
    np.testing.assert_array_equal(res.mask[8:17], truth[8:17])
    assert res.slice_range == {1: (8, 16)}
    assert sorted((s["start"], s["last"], s["reason"]) for s in res.stops[1]) == [(8, 8, "presence"),
                                                                                  (16, 16, "presence")]
    single = propagate(image_for(truth), prompt_from(truth, 12), ISO, _UnsureOracle(truth, window=4))
    assert single.slice_range == {1: (12, 12)}  # one keyframe: the presence still ends both walks


class _AgreementOracle(OracleModel):
    """The true masks, reporting a network-vs-registration agreement of 0.1 on slices below 6 and
    above 20 and on slices 11-13, and 0.9 elsewhere."""

    keyframe_outward_min_agreement = 0.4

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        agree = np.array([0.1 if q < 6 or q > 20 or 11 <= q <= 13 else 0.9 for q in query_indices], np.float32)
        return SlicePrediction(pred.prob, pred.presence, agreement=agree)


def test_agreement_ends_walks_beyond_the_outermost_keyframes_only():
    truth = tube(3, 25)
    image = image_for(truth)
    res = propagate(image, prompt_from(truth, [8, 16]), ISO, _AgreementOracle(truth, window=4))
    # Outward walks end on the first disagreeing slice (5 and 21); between the keyframes it is ignored.
    assert res.slice_range == {1: (6, 20)}
    np.testing.assert_array_equal(res.mask[6:21], truth[6:21])
    assert sorted((s["start"], s["last"], s["reason"]) for s in res.stops[1]) == [(8, 6, "agreement"),
                                                                                  (16, 20, "agreement")]
    # One drawn slice: no agreement test, the walks follow the object to its ends (3 and 25).
    single = propagate(image, prompt_from(truth, 16), ISO, _AgreementOracle(truth, window=4))
    assert single.slice_range == {1: (3, 25)}
    # Off (0): the keyframe run follows the object to its ends as well.
    off = _AgreementOracle(truth, window=4)
    off.keyframe_outward_min_agreement = 0.0
    assert propagate(image, prompt_from(truth, [8, 16]), ISO, off).slice_range == {1: (3, 25)}


class _BorderlineAgreementOracle(OracleModel):
    """The true masks, reporting an agreement of exactly 0.5 on every slice, with a minimum of 0.5."""

    keyframe_outward_min_agreement = 0.5

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        return SlicePrediction(pred.prob, pred.presence, agreement=np.full(len(pred.prob), 0.5, np.float32))


def test_an_agreement_equal_to_the_minimum_does_not_end_the_walks():
    """Only an agreement *below* the minimum ends a walk beyond the outermost keyframes: at 0.5
    against 0.5 both walks follow the object to its ends (3 and 25) and stop there by its area."""
    truth = tube(3, 25)
    res = propagate(image_for(truth), prompt_from(truth, [8, 16]), ISO, _BorderlineAgreementOracle(truth, window=4))
    assert res.slice_range == {1: (3, 25)}
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    assert sorted((s["start"], s["last"], s["reason"]) for s in res.stops[1]) == [(8, 3, "area"), (16, 25, "area")]


def test_an_update_applies_the_agreement_test_to_a_reused_walk_without_predicting_it_again():
    """Drawing a second keyframe turns the agreement test on for the walk beyond the first one
    (17-29). That walk is a prefix of the single-prompt walk, so the update cuts the reused walk
    at its first recorded disagreement (slice 21) instead of predicting it again; the result is
    the same as a run from scratch, mask and confidence."""
    truth = tube(3, 25)
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 16), ISO, _AgreementOracle(truth, window=4))
    assert first.slice_range == {1: (3, 25)}
    assert first.agreement[1][21] == pytest.approx(0.1) and first.agreement[1][18] == pytest.approx(0.9)
    model = _AgreementOracle(truth, window=4)
    res = propagate(image, prompt_from(truth, [8, 16]), ISO, model, previous=first)
    assert res.recomputed == {1: [(0, 7), (9, 15)]}
    assert not [q for q in predicted(model) if q > 16]
    scratch = propagate(image, prompt_from(truth, [8, 16]), ISO, _AgreementOracle(truth, window=4))
    np.testing.assert_array_equal(res.mask, scratch.mask)
    np.testing.assert_array_equal(res.confidence[1], scratch.confidence[1])
    assert res.slice_range == scratch.slice_range == {1: (6, 20)}
    assert {"start": 16, "direction": 1, "last": 20, "reason": "agreement"} in res.stops[1]
    # Back to one drawn slice the test is off again: the cut walk cannot be reused, it is predicted.
    model = _AgreementOracle(truth, window=4)
    back = propagate(image, prompt_from(truth, 16), ISO, model, previous=res)
    assert back.recomputed == {1: [(0, 15), (17, 29)]}
    np.testing.assert_array_equal(back.mask, first.mask)


def test_a_result_saved_as_json_and_read_back_is_reused_as_the_one_in_memory():
    """to_record / from_record: what the command line keeps beside OUT so that an update from files
    reuses walks as Slicer's in-memory update does (it recomputed every slice). The rebuilt result
    gives the same update as the original, and a damaged record is refused by name."""
    import json

    truth = tube(3, 25)
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 16), ISO, _AgreementOracle(truth, window=4))
    record = json.loads(json.dumps(first.to_record()))
    assert record["labels"]["1"]["keyframes"] == [16] and record["labels"]["1"]["walls"] == []
    again = PropagationResult.from_record(first.mask, record)
    model = _AgreementOracle(truth, window=4)
    res = propagate(image, prompt_from(truth, [8, 16]), ISO, model, previous=again)
    assert res.recomputed == {1: [(0, 7), (9, 15)]} and not [q for q in predicted(model) if q > 16]
    memory = propagate(image, prompt_from(truth, [8, 16]), ISO, _AgreementOracle(truth, window=4), previous=first)
    np.testing.assert_array_equal(res.mask, memory.mask)
    np.testing.assert_array_equal(res.confidence[1], memory.confidence[1])
    # another image (its digest differs): nothing reused
    other = propagate(image + 1.0, prompt_from(truth, [8, 16]), ISO, _AgreementOracle(truth, window=4), previous=again)
    assert other.recomputed == {1: [(0, 7), (9, 15), (17, 29)]}
    for damage, phrase in [(lambda r: r.update(axis=3), "its axis is not 0, 1 or 2"),
                           (lambda r: r.update(range=[0, 99]), "its range is not two slices within 0-29"),
                           (lambda r: r["labels"]["1"].update(confidence=[0.5]), "label 1's confidence is not 30"),
                           (lambda r: r["labels"]["1"].update(walls=[16]), "label 1's keyframes or walls are not"),
                           (lambda r: r["labels"]["1"].update(begin=[[[[[[1]]]]]]), "begin_state is nested too deep")]:
        bad = json.loads(json.dumps(record))
        damage(bad)
        with pytest.raises(ValueError, match=phrase):
            PropagationResult.from_record(first.mask, bad)


# ----------------------------------------------------------------------------- empty keyframes (walls)


def test_empty_slice_between_two_keyframes_splits_them():
    """Slice 12 erased between keyframes 8 and 16: each side walks only up to it, nothing is fused
    across it, and it stays empty (the oracle would put the object there)."""
    truth = tube(3, 25)
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, [8, 16]), ISO, model, empty_slices=[12])
    walked = [(g, q) for g, qs in model.calls for q in qs]
    assert sorted(q for g, q in walked if g == 8 and q > 8) == [9, 10, 11]
    assert sorted(q for g, q in walked if g == 16 and q < 16) == [13, 14, 15]
    assert not res.mask[12].any()
    np.testing.assert_array_equal(res.mask[3:12], truth[3:12])
    np.testing.assert_array_equal(res.mask[13:26], truth[13:26])
    assert res.keyframes[1].keys() == {8, 12, 16} and not res.keyframes[1][12].any()
    assert res.recomputed == {1: [(0, 7), (9, 11), (13, 15), (17, 29)]}


def test_empty_slice_beyond_the_keyframe_bounds_the_object():
    truth = tube(3, 25)
    model = OracleModel(truth, window=4)
    res = propagate(image_for(truth), prompt_from(truth, 8), ISO, model, empty_slices=[14, 20])
    assert res.slice_range == {1: (3, 13)}
    assert max(predicted(model)) == 13  # nothing walked past the wall, nothing beyond the outer wall
    assert np.isnan(res.confidence[1][14:]).all()


class TwoOracles(SlicePredictor):
    """The true mask of whichever of several objects the drawn slice belongs to."""

    def __init__(self, truths, window=4):
        self.truths, self.current = [t.astype(bool) for t in truths], None
        self.window_mm, self.max_window, self.min_window = float(window), window, 1

    def begin(self, volume, prompt_index, prompt_mask):
        self.current = max(self.truths, key=lambda t: int((t[prompt_index] & prompt_mask).sum()))

    def predict(self, volume, guide_index, guide_mask, query_indices):
        prob = self.current[list(query_indices)].astype(np.float32)
        return SlicePrediction(prob, prob.reshape(len(prob), -1).max(axis=1))


def test_an_update_with_two_overlapping_labels_equals_a_fresh_run():
    # Label 1 (drawn on slice 8) runs over slices 4-20, label 2 (drawn on 18, a disc shifted by 3 px)
    # over 14-26: where the discs overlap on 14-20 label 1 wins. The user then walls label 1 at
    # slice 12: label 2 must get back the voxels label 1 gave up (reusing the merged map left them
    # unlabelled: 935 voxels in the audit).
    one, two = tube(4, 20), tube(14, 26, center=(8, 11))
    prompt = prompt_from(one, 8)
    prompt[prompt_from(two, 18) > 0] = 2
    image = image_for(one | two)
    first = propagate(image, prompt, ISO, TwoOracles([one, two]))
    # Label 2 lost the overlap on 14-20 except on its drawn slice 18, where its drawing took it from
    # label 1: both lost voxels. The reported extents are what the merged map holds.
    assert first.overlapped == {1, 2} and first.slice_range == {1: (4, 20), 2: (14, 26)}
    assert not ((first.mask[15] == 2) & one[15]).any() and ((first.mask[18] == 2) == two[18]).all()
    update = propagate(image, prompt, ISO, TwoOracles([one, two]), previous=first, empty_slices={1: [12]})
    fresh = propagate(image, prompt, ISO, TwoOracles([one, two]), empty_slices={1: [12]})
    np.testing.assert_array_equal(update.mask, fresh.mask)
    np.testing.assert_array_equal(update.mask == 2, two)
    # label 2's walks are reused (s29): the result keeps the voxels it lost to label 1 (lost_voxels),
    # so its own mask is rebuilt, not recomputed; the same through a record written to JSON and read back
    assert update.recomputed[2] == []
    assert np.array_equal(np.sort(first.lost_voxels[2]), np.flatnonzero(two & (first.mask == 1)))
    import json

    from PAMSegmentLib.propagate import PropagationResult

    stored = PropagationResult.from_record(first.mask, json.loads(json.dumps(first.to_record())) | {
        "image_digest": first.image_digest})
    via_record = propagate(image, prompt, ISO, TwoOracles([one, two]), previous=stored, empty_slices={1: [12]})
    np.testing.assert_array_equal(via_record.mask, fresh.mask)
    assert via_record.recomputed[2] == []


class WindowedOracle(OracleModel):
    """An oracle that, like PAM, takes a state from the drawn slice it begins on (``begin_state``)."""

    def begin(self, volume, prompt_index, prompt_mask):
        self.begin_state = float(np.asarray(volume[prompt_index])[prompt_mask].mean())


def test_an_update_recomputes_when_the_predictor_begins_differently():
    # PAM takes its intensity window from the lowest drawn slice: a keyframe drawn below it changes
    # the window, so walks of the earlier run are not what a fresh run would compute (the audit saw
    # 72-349 voxels differ on the demo CT). Such an update recomputes everything.
    truth = tube(3, 25)
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 12), ISO, WindowedOracle(truth, window=4))
    (name, began, settings), = first.begin_state.values()
    assert (name, began) == ("WindowedOracle", pytest.approx(float(image[12][truth[12]].mean())))
    # the instance's settings and the class-level defaults it inherits (the engine's thresholds)
    assert {"max_window=4", "min_window=1", "window_mm=4.0", "with_presence=False", "threshold=0.5",
            "presence_threshold=0.5"} <= set(settings)
    above = WindowedOracle(truth, window=4)  # keyframe added above the first: same beginning, reuse
    update = propagate(image, prompt_from(truth, [12, 20]), ISO, above, previous=first)
    assert 0 < update.n_predicted < first.n_predicted and min(predicted(above)) > 12
    below = WindowedOracle(truth, window=4)  # keyframe added below: another beginning, all recomputed
    update = propagate(image, prompt_from(truth, [6, 12]), ISO, below, previous=first)
    fresh = propagate(image, prompt_from(truth, [6, 12]), ISO, WindowedOracle(truth, window=4))
    assert update.n_predicted == fresh.n_predicted == 30 and update.recomputed == fresh.recomputed
    np.testing.assert_array_equal(update.mask, fresh.mask)


def test_an_update_with_other_settings_recomputes():
    """previous= of a run with other settings of the same method (another registration weight, the
    network alone after the fusion) kept that run's walks: the result mixed two settings."""
    from PAMSegmentLib.baselines import get_predictor

    truth = tube(3, 25)
    image = image_for(truth) + 5 * truth
    first = propagate(image, prompt_from(truth, 12), ISO, get_predictor("track", iterations=5))
    same = get_predictor("track", iterations=5)
    assert 0 < propagate(image, prompt_from(truth, [12, 20]), ISO, same, previous=first).n_predicted \
        < first.n_predicted  # the same settings: the walks below 12 are reused
    update = propagate(image, prompt_from(truth, [12, 20]), ISO, get_predictor("track", iterations=40),
                       previous=first)
    fresh = propagate(image, prompt_from(truth, [12, 20]), ISO, get_predictor("track", iterations=40))
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.n_predicted == fresh.n_predicted > 0


def test_an_update_by_another_method_recomputes():
    # A `copy` result passed to a `track` update kept copy's slices (696 voxels off a fresh run).
    from PAMSegmentLib.baselines import get_predictor

    truth = tube(3, 25)
    image = image_for(truth) + 5 * truth
    first = propagate(image, prompt_from(truth, 12), ISO, get_predictor("copy"))
    update = propagate(image, prompt_from(truth, [12, 20]), ISO, get_predictor("track"), previous=first)
    fresh = propagate(image, prompt_from(truth, [12, 20]), ISO, get_predictor("track"))
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.n_predicted == fresh.n_predicted > 0


def test_reuse_needs_the_same_component_filter():
    # The first run removed a blob not connected to the prompt; an update without the filter must
    # not reuse the filtered walks (the blob would stay missing).
    truth = tube(3, 12)
    truth[20:24, 2:5, 2:5] = True  # the blob, beyond a gap
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 8), ISO, OracleModel(truth, window=4), early_stop=False)
    assert first.remove_disconnected is False and first.mask[20:24].any()
    filtered = propagate(image, prompt_from(truth, 8), ISO, OracleModel(truth, window=4), early_stop=False,
                         remove_disconnected=True)
    assert not filtered.mask[20:24].any()
    update = propagate(image, prompt_from(truth, [8, 10]), ISO, OracleModel(truth, window=4), early_stop=False,
                       previous=filtered)
    fresh = propagate(image, prompt_from(truth, [8, 10]), ISO, OracleModel(truth, window=4), early_stop=False)
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.mask[20:24].any()


def test_an_update_recomputes_the_slices_below_a_redrawn_keyframe():
    """Keyframes 8 and 16; the model copies its guide's mask. Keyframe 16 is then redrawn as a
    disc of radius 2 inside the radius-4 one: the slices between are fused again. Slice s gets
    the radius-4 disc where keyframe 8's side weighs at least half, (16 - s) / 8 >= 0.5, i.e. on
    slices 9-12, and the radius-2 disc on 13-15; above 16 the walk copies the new drawing."""
    truth = tube(3, 25)
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, [8, 16]), ISO, ShiftModel(0, window=4))
    np.testing.assert_array_equal(first.mask[9:16], np.repeat(disc()[None], 7, axis=0).astype(np.uint8))
    prompt = prompt_from(truth, 8)
    prompt[16][disc(radius=2)] = 1
    res = propagate(image, prompt, ISO, ShiftModel(0, window=4), previous=first)
    assert res.recomputed == {1: [(9, 15), (17, 29)]}  # below keyframe 8 the walk is reused
    for s in range(9, 13):
        np.testing.assert_array_equal(res.mask[s], disc().astype(np.uint8), err_msg=f"slice {s}")
    for s in [*range(13, 16), *range(17, 30)]:
        np.testing.assert_array_equal(res.mask[s], disc(radius=2).astype(np.uint8), err_msg=f"slice {s}")
    np.testing.assert_array_equal(res.mask, propagate(image, prompt, ISO, ShiftModel(0, window=4)).mask)


def test_an_update_over_a_wider_range_recomputes_the_walks():
    """The first run was limited to slices 10-18; run again over the whole volume with it as
    ``previous``, its walks (cut at the range's ends) are not reused: the object is found on
    slices 3-25, as from scratch."""
    truth = tube(3, 25)
    image, prompt = image_for(truth), prompt_from(truth, 14)
    first = propagate(image, prompt, ISO, OracleModel(truth, window=4), range=(10, 18))
    assert first.slice_range == {1: (10, 18)}
    res = propagate(image, prompt, ISO, OracleModel(truth, window=4), previous=first)
    np.testing.assert_array_equal(res.mask, truth.astype(np.uint8))
    assert res.recomputed == {1: [(0, 13), (15, 29)]} and res.slice_range == {1: (3, 25)}


def test_adding_a_wall_reuses_the_earlier_walk_and_predicts_nothing():
    truth = tube(3, 25)
    image, prompt = image_for(truth), prompt_from(truth, 8)
    first = propagate(image, prompt, ISO, OracleModel(truth, window=4))
    model = OracleModel(truth, window=4)
    res = propagate(image, prompt, ISO, model, previous=first, empty_slices=[20])
    assert model.calls == [] and res.n_predicted == 0 and res.recomputed == {1: []}
    np.testing.assert_array_equal(res.mask[:20], first.mask[:20])
    assert not res.mask[20:].any()
    # moving the wall further out needs the walk beyond the old one: recomputed
    model = OracleModel(truth, window=4)
    again = propagate(image, prompt, ISO, model, previous=res, empty_slices=[24])
    assert again.recomputed == {1: [(9, 23)]} and min(predicted(model)) == 9
    assert again.slice_range == {1: (3, 23)}


@pytest.mark.parametrize("empty, phrase", [
    ([8], r"slice 8 is both drawn \(label 1\) and marked empty"),
    ([40], "empty slice 40 lies outside the range 0:29"),
    ({2: [5]}, r"empty slices given for label 2, which is not among the labels propagated \(1\)"),
    (["x"], "an empty slice must be a whole number, got 'x'"),
])
def test_empty_slice_input_errors(empty, phrase):
    truth = tube(3, 25)
    with pytest.raises(InputError, match=phrase):
        propagate(image_for(truth), prompt_from(truth, 8), ISO, OracleModel(truth), empty_slices=empty)


def test_the_hint_for_an_empty_slice_drawn_by_several_labels_names_only_labels_not_drawn_there():
    """A review: the hint suggested marking the slice for labels drawn on it too, which fails again.
    Labels 1 and 2 are drawn on slice 9, label 3 elsewhere: only label 3 is suggested."""
    truth = tube(3, 25)
    prompt = prompt_from(truth, 8)
    prompt[9][truth[9]] = 2
    other = np.zeros_like(truth)
    other[3:26, 1:3, 1:3] = True
    prompt[8][other[8]] = 3
    prompt[9][other[9]] = 1
    with pytest.raises(InputError, match=r"^slice 9 is both drawn \(label 1\) and marked empty; erase it or unmark it "
                                         r"\(to mark it empty for other labels only, propagate them on their own: "
                                         r"--label 3 --empty-slices 9, or mark it for each of them: --empty-slices "
                                         r"3:9; empty_slices=\{label: \[...\]\} in Python\)$"):
        propagate(image_for(truth), prompt, ISO, OracleModel(truth | other), empty_slices=[9])


def test_an_empty_slice_drawn_for_another_label_says_how_to_mark_it_for_some_labels():
    """--empty-slices 9 where label 2 is drawn on 9: the refusal now names the way (README: --label N
    --empty-slices K) to mark it for the other labels only."""
    truth = tube(3, 25)
    prompt = prompt_from(truth, 8)
    prompt[9][truth[9]] = 2
    with pytest.raises(InputError, match=r"^slice 9 is both drawn \(label 2\) and marked empty; erase it or unmark it "
                                         r"\(to mark it empty for other labels only, propagate them on their own: "
                                         r"--label 1 --empty-slices 9, or mark it for each of them: --empty-slices "
                                         r"1:9; empty_slices=\{label: \[...\]\} in Python\)$"):
        propagate(image_for(truth), prompt, ISO, OracleModel(truth), empty_slices=[9])


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("case, phrase", [
    ("empty prompt", "the prompt is empty"),
    ("missing label", "label 3 is not in the prompt; labels present: 1"),
    ("3D mask as prompt", "that is a 3D mask, not a slice prompt"),
    ("2D image", "the image must be a 3D volume, got 2D"),
    ("NaN image", "the image has 1 NaN/inf voxel;"),
    ("shape mismatch", "the prompt's shape (30, 16, 15) differs from the image's (30, 16, 16)"),
    ("range past the end", "range 5:40 is outside the 30 slices along axis 0"),
    ("prompt outside range", "label 1's prompt slice 14 lies outside the range 16:20; widen the range to include it"),
    ("a label outside range", "label 2's prompt slice 10 lies outside the range 12:20; widen the range to include it, or "
                              "leave label 2 out"),
    ("zero batch", "batch size must be at least 1"),
    ("bad axis", "axis must be 0, 1 or 2"),
])
def test_input_errors(case, phrase):
    truth = tube(8, 20)
    image, prompt = image_for(truth), prompt_from(truth, 14)
    kwargs: dict = {}
    if case == "empty prompt":
        prompt[:] = 0
    elif case == "missing label":
        kwargs["labels"] = [3]
    elif case == "3D mask as prompt":
        prompt[2:28, 2:14, 2:14] = 1
    elif case == "2D image":
        image, prompt = image[0], prompt[0]
    elif case == "NaN image":
        image[3, 4, 5] = np.nan
    elif case == "shape mismatch":
        prompt = prompt[:, :, :15]
    elif case == "range past the end":
        kwargs["range"] = (5, 40)
    elif case == "prompt outside range":
        kwargs["range"] = (16, 20)
    elif case == "a label outside range":
        prompt[10, 1:3, 1:3] = 2
        kwargs["range"] = (12, 20)
    elif case == "zero batch":
        kwargs["batch_size"] = 0
    elif case == "bad axis":
        kwargs["axis"] = 3
    with pytest.raises(InputError) as err:
        propagate(image, prompt, ISO, OracleModel(truth), **kwargs)
    assert phrase in str(err.value)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(labels=[]), "labels is empty: give at least one label of the prompt (or None for all)"),
    (dict(labels=1), "labels must be a list of label numbers, got 1"),
    (dict(spacing=1.0), "spacing must be three positive numbers (k, j, i), got 1.0"),
    (dict(range=(None, 20)), "range's first slice must be a whole number, got None"),
    (dict(range=(1, 20, 3)), "range must be (first, last) slice numbers"),
    (dict(batch_size=2.5), "batch size must be a whole number, got 2.5"),
    (dict(threads=-1), "threads must be at least 1, got -1"),
    (dict(cancel=True), "cancel must be a CancelToken, got bool"),
    (dict(previous=np.zeros(3)), "previous must be the PropagationResult of an earlier run, got ndarray"),
    (dict(empty_slices="20"), "empty slices must be a list of slice numbers, got '20'"),
    (dict(empty_slices=[20.7]), "an empty slice must be a whole number, got 20.7"),
    (dict(empty_slices={"a": [20]}), "an empty_slices label must be a whole number, got 'a'"),
    (dict(empty_slices={2: [20]}), "empty slices given for label 2, which is not among the labels propagated (1)"),
    (dict(image_scale=1e39), "the image has values beyond float32's range"),
])
def test_option_type_errors_are_input_errors(kwargs, phrase):
    # Each of these ended in a bare TypeError/ValueError/AttributeError, or was silently
    # reinterpreted (the string "20" became walls 0 and 2; 20.7 became 20).
    truth = tube(8, 20)
    image, prompt = image_for(truth).astype(np.float64), prompt_from(truth, 14)
    image *= kwargs.pop("image_scale", 1.0)
    spacing = kwargs.pop("spacing", ISO)
    with pytest.raises(InputError) as err:
        propagate(image, prompt, spacing, OracleModel(truth), **kwargs)
    assert phrase in str(err.value)


def test_find_prompt_slices_keyframes_and_axis():
    prompt = np.zeros((12, 10, 10), np.uint8)
    prompt[3, 2:5, 2:5] = 2
    prompt[7, 2:5, 2:5] = 2
    assert find_prompt_slices(prompt) == (0, {2: [3, 7]})


def test_find_prompt_slices_refuses_a_drawing_on_another_plane():
    # Drawn on axial slice 6 (axis 0): along axis 1 it crosses rows 2-6 as one-voxel lines, which
    # must not become five "keyframes".
    prompt = np.zeros((12, 10, 10), np.uint8)
    prompt[6, 2:7, 3:8] = 1
    assert find_prompt_slices(prompt) == (0, {1: [6]})
    with pytest.raises(InputError, match=r"label 1 is drawn on 1 slice along axis 0 but crosses 5 slices along "
                                         r"axis 1, the propagation axis: propagate it along axis 0 \(--axis 0\)"):
        find_prompt_slices(prompt, axis=1)
    # Two labels on different planes: label 2 on sagittal slice 8 (axis 2), label 1 on axial slice 6.
    prompt[1:5, 2:9, 8] = 2
    with pytest.raises(InputError, match=r"label 2 is drawn on 1 slice along axis 2 but crosses 4 slices along "
                                         r"axis 0.*separately \(--label 2 --axis 2\)"):
        find_prompt_slices(prompt)
    assert find_prompt_slices(prompt, labels=[2]) == (2, {2: [8]})
    # Two labels both on axial slices with a wrong --axis: "--label 1 --axis 0" would drop label 2.
    prompt[prompt == 2] = 0
    prompt[9, 1:4, 1:4] = 2
    with pytest.raises(InputError, match=r"label 1 is drawn on 1 slice along axis 0 but crosses 5 slices along axis "
                                         r"2, the propagation axis: all labels are drawn on slices along axis 0: "
                                         r"propagate them along it \(--axis 0\)$"):
        find_prompt_slices(prompt, axis=2)
    assert find_prompt_slices(prompt, axis=0) == (0, {1: [6], 2: [9]})
    # Keyframes on slices 3 and 7 of a flat object (rows 2-4) are still keyframes.
    flat = np.zeros((12, 10, 10), np.uint8)
    flat[3, 2:5, 2:9] = flat[7, 2:5, 2:9] = 1
    assert find_prompt_slices(flat, axis=0) == (0, {1: [3, 7]})


def test_find_prompt_slices_thin_object_on_several_keyframes():
    # A 3x3 px tube drawn on 4 axial slices crosses only 3 coronal slices: counting slices alone
    # chose axis 1 (the result was little more than the drawing); it is drawn on axis 0's slices.
    prompt = np.zeros((40, 64, 64), np.uint8)
    for k in (8, 16, 24, 32):
        prompt[k, 30:33, 30:33] = 1
    assert find_prompt_slices(prompt) == (0, {1: [8, 16, 24, 32]})
    assert find_prompt_slices(prompt, axis=0) == (0, {1: [8, 16, 24, 32]})
    with pytest.raises(InputError, match="label 1 is drawn on 4 slices along axis 0 but crosses 3 slices along axis 1"):
        find_prompt_slices(prompt, axis=1)
    # Adjacent keyframes (two voxels thick along their axis) are still keyframes of that axis.
    prompt[9, 30:33, 30:33] = 1
    assert find_prompt_slices(prompt) == (0, {1: [8, 9, 16, 24, 32]})


def test_find_prompt_slices_refuses_a_stroke_drawn_in_a_perpendicular_view():
    # An axial drawing on slice 12 (a 20 x 20 square, 400 voxels) and a short stroke drawn in a
    # coronal view (row 20) across slices 11-13: slices 11 and 13 hold only its 15-voxel line
    # (15 <= 0.25 x 400). Taken as keyframes, they made the result a line on every slice.
    prompt = np.zeros((24, 40, 44), np.uint8)
    prompt[12, 10:30, 10:30] = 1
    prompt[11:14, 20, 15:30] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on more than one plane: slice 12 along axis 0 and slice "
                                         r"20 along axis 1 \(slices 11, 13 along axis 0 hold nothing but its line, "
                                         r"one voxel thin: a stroke drawn in another view\?\); erase what is drawn on "
                                         r"slice 20 along axis 1 and draw on slices along axis 0 only, then try again$"):
        find_prompt_slices(prompt)
    with pytest.raises(InputError, match=r"axial slice 12 and coronal slice 20 \(axial slices 11, 13 hold nothing "
                                         r"but its line.*draw on axial slices only"):
        find_prompt_slices(prompt, plane_names=("axial", "coronal", "sagittal"))
    # Beside keyframes 5 and 20, a stroke across slices 12-13 leaves its line on slice 13 only.
    prompt[11] = prompt[13] = 0
    prompt[5, 10:30, 10:30] = prompt[20, 10:30, 10:30] = 1
    prompt[13, 20, 15:30] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on more than one plane: slices 5, 12, 20 along axis 0 "
                                         r"and slice 20 along axis 1 \(slice 13 along axis 0 holds nothing but"):
        find_prompt_slices(prompt)
    # An update's keyframes are whole slices of an earlier result: a thin slice there is the
    # object's tip, not a stroke.
    assert find_prompt_slices(prompt, update=True) == (0, {1: [5, 12, 13, 20]})


def test_find_prompt_slices_names_two_planes_rather_than_a_3d_mask():
    # A whole axial drawing on slice 12 (rows 8-31) and a whole coronal one on row 20 (slices 2-21,
    # 34 voxels a slice): refused, as before, but it was called "drawn on 20 of 24 slices along
    # axis 0: that is a 3D mask".
    prompt = np.zeros((24, 40, 44), np.uint8)
    prompt[12, 8:32, 10:30] = 1
    prompt[2:22, 20, 5:39] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on more than one plane: slice 12 along axis 0 and slice "
                                         r"20 along axis 1 \(slices 2-11, 13-21 along axis 0 hold nothing but its line, "
                                         r"one voxel thin\); that is not a slice prompt: draw it on slices of one plane "
                                         r"only \(one slice, or a few keyframes, at most 32\), then try again$"):
        find_prompt_slices(prompt)
    with pytest.raises(InputError, match=r"drawn on more than one plane: axial slice 12 and coronal slice 20 "):
        find_prompt_slices(prompt, plane_names=("axial", "coronal", "sagittal"))
    # A stroke's end can be a single voxel in its plane: part of the line, not an axial drawing.
    prompt[1, 20, 20] = 1
    with pytest.raises(InputError, match=r"slice 12 along axis 0 and slice 20 along axis 1 \(slices 1-11, 13-21 "):
        find_prompt_slices(prompt)
    # A 3D mask is still called one.
    box = np.zeros((24, 40, 44), np.uint8)
    box[2:22, 10:30, 10:30] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on 20 of 24 slices along axis 0: that is a 3D mask"):
        find_prompt_slices(box)
    # Keyframes on more than half the slices are refused too, and the message says that limit
    # besides the count of 32 (16 separate keyframes of 31 slices).
    spaced = np.zeros((31, 40, 44), np.uint8)
    spaced[0:31:2, 10:30, 10:30] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on 16 of 31 slices along axis 0: that is a 3D mask, not a "
                                         r"slice prompt; draw it on one slice \(or a few keyframes: at most 32, and on "
                                         r"at most half the slices\)$"):
        find_prompt_slices(spaced)


def test_a_finished_segmentation_as_prompt_is_called_a_3d_mask_not_a_drawing_on_another_plane():
    """A full segmentation given as PROMPT (the wrong file): its thin structures (a rib, one voxel
    thin along axis 2 here, label 1) were checked first and reported as drawn on another plane,
    with advice (--label 1 --axis 2) that then ran on slices of a 3D mask."""
    seg = np.zeros((30, 60, 60), np.uint8)
    seg[8:22, 5:31, 5] = 1  # a plate one voxel thin along axis 2, over 14 slices along axis 0
    k, j, i = np.ogrid[:30, :60, :60]
    seg[((k - 15) / 8) ** 2 + ((j - 30) / 20) ** 2 + ((i - 30) / 20) ** 2 <= 1] = 2  # 17 of 30 slices along axis 0
    with pytest.raises(InputError, match=r"^label 2 is drawn on 17 of 30 slices along axis 0: that is a 3D mask, not "
                                         r"a slice prompt; draw it on one slice"):
        find_prompt_slices(seg)
    seg[((k - 15) / 8) ** 2 + ((j - 30) / 20) ** 2 + ((i - 52) / 6) ** 2 <= 1] = 3  # a second organ
    with pytest.raises(InputError, match=r"^label 2 is drawn on 17 of 30 slices along axis 0: that is a 3D mask, not "
                                         r"a slice prompt \(2 of the 3 labels are: is the prompt a finished "
                                         r"segmentation\?\); draw it"):
        find_prompt_slices(seg)
    # The plate alone is still a drawing on another plane, with its axis.
    with pytest.raises(InputError, match=r"^label 1 is drawn on 1 slice along axis 2 .*\(--axis 2\)$"):
        find_prompt_slices((seg == 1).astype(np.uint8), axis=0)
    assert find_prompt_slices((seg == 1).astype(np.uint8)) == (2, {1: [5]})


def test_find_prompt_slices_keeps_small_objects_drawn_on_adjacent_slices():
    prompt = np.zeros((24, 40, 44), np.uint8)
    prompt[11:14, 19:22, 20:23] = 1  # a 3 x 3 px vessel drawn on slices 11-13
    assert find_prompt_slices(prompt) == (0, {1: [11, 12, 13]})
    # Tapering to a 3-voxel row on slices 11 and 13: more than a quarter of slice 12's 9 voxels.
    prompt[11, [19, 21]] = prompt[13, [19, 21]] = 0
    assert find_prompt_slices(prompt) == (0, {1: [11, 12, 13]})
    # A ball painted with a sphere brush (radius 3): one voxel at each pole is no line.
    k, j, i = np.ogrid[:24, :40, :44]
    ball = ((k - 12) ** 2 + (j - 20) ** 2 + (i - 22) ** 2 <= 9).astype(np.uint8)
    assert ball[9].sum() == ball[15].sum() == 1
    assert find_prompt_slices(ball, axis=0) == (0, {1: list(range(9, 16))})


@pytest.mark.parametrize("value, advice", [
    (-1, "the prompt holds negative values, as an image does: are the image and the prompt swapped?"),
    (70000, "renumber the label map"),
])
def test_find_prompt_slices_refuses_labels_a_result_cannot_hold(value, advice):
    prompt = np.zeros((12, 10, 10), np.int32)
    prompt[6, 2:7, 3:8] = value
    with pytest.raises(InputError) as err:
        find_prompt_slices(prompt)
    assert str(err.value) == f"the prompt has label {value}: labels must be whole numbers from 1 to 65535 " \
                             f"(0 = background); {advice}"


def test_find_prompt_slices_hints_that_an_image_given_as_the_prompt_is_one():
    # A CT given as the prompt (IMAGE and PROMPT swapped) was told to renumber its labels; one
    # without negative values got a message about planes or a 3D mask alone.
    prompt = np.ones((12, 40, 40), np.int32)  # label 1 everywhere: a 3D mask along any axis
    prompt[6, 10:40, 10:40] = np.arange(2, 902).reshape(30, 30)  # 900 more values: 901 in all
    with pytest.raises(InputError, match=r"3D mask, not a slice prompt; draw it on one slice \(or a few keyframes: at "
                                         r"most 32, and on at most half the slices\)$"):
        find_prompt_slices(prompt)
    prompt[7, 10:20, 10:20] = np.arange(902, 1002).reshape(10, 10)  # 1001 values
    with pytest.raises(InputError, match=r"3D mask, not a slice prompt; draw it on one slice \(or a few keyframes: at "
                                         r"most 32, and on at most half the slices\); the prompt holds 1001 different values, as an image does: are "
                                         r"the image and the prompt swapped\?$"):
        find_prompt_slices(prompt)
    with pytest.raises(InputError, match=r"^label 5000 is not in the prompt; labels present: 1, 2, 3, .*, 20 \.\.\. "
                                         r"\(1001 in all\); the prompt holds 1001 different values"):
        find_prompt_slices(prompt, labels=[5000])
    prompt[prompt == 1] = 0  # many labels, each drawn on one slice: no error, so no hint either
    axis, slices = find_prompt_slices(prompt)
    assert axis == 0 and len(slices) == 1000


# ----------------------------------------------------------------------------- the real network


def test_device_asked_for_must_be_the_models(small_checkpoint):
    # device= applies to loading the default weights; with a model object it was silently ignored.
    model = load_checkpoint_file(small_checkpoint.path)
    truth = tube(8, 20)
    with pytest.raises(InputError, match="device 'cuda:0' was asked for, but the model given is on 'cpu'"):
        propagate(image_for(truth), prompt_from(truth, 14), ISO, model, device="cuda:0")


def test_pam_predictor_end_to_end_is_deterministic(small_checkpoint):
    model = load_checkpoint_file(small_checkpoint.path)
    shape = (20, 64, 64)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    obj = ((k - 10) / 6.0) ** 2 + ((j - 30) / 12.0) ** 2 + ((i - 34) / 14.0) ** 2 <= 1
    image = np.where(obj, 120.0, 30.0) + np.random.default_rng(3).normal(0, 8, shape)
    prompt = prompt_from(obj, 10)
    runs = [propagate(image, prompt, (2.0, 0.8, 0.8), model, batch_size=8, early_stop=False, range=(4, 16))
            for _ in range(2)]
    a, b = runs
    assert a.mask.shape == shape and a.mask.dtype == np.uint8
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.confidence[1], b.confidence[1])
    np.testing.assert_array_equal(a.mask[10], prompt[10])
    assert a.n_predicted == 12
    assert np.isfinite(a.confidence[1][4:17]).all() and np.isnan(a.confidence[1][:4]).all()


def test_pam_predictor_encodes_each_guide_mask_of_a_slice_anew(small_checkpoint):
    """Two walks can guide from the same slice with different masks (between two keyframes, the
    walk from each side). The network's encoded guide is cached per slice, crop and mask: a square
    and its outline (same bounding box, hence the same crop) on slice 5 each get their own answer."""
    from PAMSegmentLib.pam_predictor import PAMPredictor

    model = load_checkpoint_file(small_checkpoint.path)
    square = np.zeros((64, 64), bool)
    square[20:40, 22:42] = True
    outline = square.copy()
    outline[23:37, 25:39] = False
    image = np.where(square, 120.0, 30.0)[None].repeat(10, axis=0) + np.random.default_rng(0).normal(0, 8, (10, 64, 64))
    fresh = PAMPredictor(model)
    fresh.begin(image, 5, square)
    alone = fresh.predict(image, 5, outline, [6]).prob
    p = PAMPredictor(model)
    p.begin(image, 5, square)
    first = p.predict(image, 5, square, [6]).prob
    assert not np.array_equal(first, alone)  # the guide's mask matters to the network
    np.testing.assert_array_equal(p.predict(image, 5, outline, [6]).prob, alone)


class _FadingOracle(OracleModel):
    """The true mask, with a foreground probability that falls with the distance from slice 10
    (0.95 - 0.05 x distance): the slice confidence is that probability, easy to check."""

    def predict(self, volume, guide_index, guide_mask, query_indices):
        pred = super().predict(volume, guide_index, guide_mask, query_indices)
        fade = np.array([0.95 - 0.05 * abs(q - 10) for q in query_indices], dtype=np.float32)
        return SlicePrediction(pred.prob * fade[:, None, None], pred.presence)


def test_slice_table_and_the_slices_to_check_first():
    # A cylinder on slices 6..13 (5 x 5 = 25 px), drawn on slice 10; the walks end where it does.
    truth = np.zeros((20, 12, 12), bool)
    truth[6:14, 3:8, 3:8] = True
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[10][truth[10]] = 1
    noise = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)  # the oracle does not look at it
    res = propagate(noise, prompt, (1.0, 1.0, 1.0), _FadingOracle(truth, window=3))
    rows = res.slice_table()
    held = {r["slice"]: r for r in rows if r["voxels"]}
    assert sorted(held) == list(range(6, 14)) and all(r["voxels"] == 25 for r in held.values())
    assert held[10]["drawn"] and held[10]["confidence"] is None  # the drawn slice: kept as drawn, no score
    for k in (6, 7, 8, 9, 11, 12, 13):
        assert not held[k]["drawn"] and held[k]["confidence"] == pytest.approx(0.95 - 0.05 * abs(k - 10), abs=1e-6)
    # each walk's last slice with the object says what ended it (the object vanished beyond it)
    ends = {r["slice"]: r["walk_end"] for r in rows if r["walk_end"]}
    assert ends == {6: "area", 13: "area"}
    # predicted but empty slices beyond the ends are listed with 0 voxels, nothing else is
    assert all(r["voxels"] == 0 and not r["drawn"] for r in rows if r["slice"] not in held)
    assert {r["slice"] for r in rows} <= set(range(3, 17))
    # least confident first, farthest from the drawing; ties by slice
    assert res.review_first(1) == [6, 7, 13]
    assert res.review_first(1, n=5) == [6, 7, 13, 8, 12]


def test_an_update_without_early_stopping_applies_no_agreement_stop():
    """``early_stop=False`` walks through low network-registration agreement in a fresh run; an
    update that reuses such a run (``previous=``) adding a second keyframe must not cut the reused
    outer walk at the recorded low agreement (it ended it at slice 8 and recorded a stop)."""
    truth = np.zeros((30, 16, 16), bool)
    truth[3:27, 4:10, 4:10] = True

    class Agreeing(SlicePredictor):
        window_mm, max_window, keyframe_outward_min_agreement = 4.0, 4, 0.4

        def predict(self, volume, guide_index, guide_mask, query_indices):
            q = list(query_indices)
            return SlicePrediction(truth[q].astype(np.float32),
                                   agreement=np.array([0.1 if k < 8 else 0.9 for k in q], np.float32))

    def prompt(*slices):
        p = np.zeros(truth.shape, np.uint8)
        for k in slices:
            p[k][truth[k]] = 1
        return p

    first = propagate(truth * 1.0, prompt(15), (1, 1, 1), Agreeing(), early_stop=False)
    fresh = propagate(truth * 1.0, prompt(15, 20), (1, 1, 1), Agreeing(), early_stop=False, update=True)
    reused = propagate(truth * 1.0, prompt(15, 20), (1, 1, 1), Agreeing(), early_stop=False, previous=first)
    assert fresh.slice_range == reused.slice_range == {1: (3, 26)}
    assert reused.stops.get(1, []) == [] and fresh.stops.get(1, []) == []  # no walk ended


def test_a_thread_count_beyond_what_the_machine_can_use_is_refused():
    """--threads 100000 failed to start its threads and crashed the process (exit 139); 1000 ran
    10 times slower. Now 4 per core (at least 64) is the most."""
    import os

    from PAMSegmentLib.checks import max_threads
    from PAMSegmentLib.propagate import torch_threads

    truth = tube(8, 20)
    limit = max(64, 4 * (os.cpu_count() or 1))
    assert max_threads() == limit
    with pytest.raises(InputError, match=rf"^threads {limit + 1} is more than this machine can use \(\d+ CPU "
                                         rf"cores; the limit is 4 threads per core or 64, whichever is more\): give "
                                         rf"at most {limit}; more threads than cores only slow the network down$"):
        propagate(image_for(truth), prompt_from(truth, 14), ISO, OracleModel(truth), threads=limit + 1)
    with pytest.raises(InputError, match=r"^threads 100000 is more"):
        with torch_threads(100000):
            pass
    result = propagate(image_for(truth), prompt_from(truth, 14), ISO, OracleModel(truth), threads=limit)
    assert result.mask.any()


@pytest.mark.parametrize("make, phrase", [
    (lambda a: (a * 1j).astype(np.complex64), "the image must hold real numbers (integers or floats), got complex64"),
    (lambda a: a.astype(object), "the image must hold real numbers (integers or floats), got object"),
    (lambda a: np.full_like(a, 7.0), "the image holds one value everywhere (7): there is nothing to follow"),
    (lambda a: a.astype(np.int64) + 2 ** 62, "so small a spread on so large an offset does not survive the float32"),
    (lambda a: a.astype(np.float64) + 1e12, "so small a spread on so large an offset does not survive the float32"),
])
def test_images_the_predictors_cannot_read_faithfully_are_refused(make, phrase):
    """Complex images lost their imaginary part with a numpy warning; int64 values near 2**62 raised
    ZeroDivisionError; a float64 image on an offset of 1e12 returned the drawn slice alone."""
    truth = tube(8, 20)
    with pytest.raises(InputError, match=re.escape(phrase)):
        propagate(make(image_for(truth)), prompt_from(truth, 14), ISO, OracleModel(truth))
    # The same images without the offset, or with one float32 keeps, propagate.
    for ok in (image_for(truth).astype(np.float64) + 1e6, image_for(truth).astype(np.float32) * 1000 + 2.0 ** 25,
               image_for(truth).astype(np.float64) * 1000 + 1e9):  # ~16 float32 levels and more: propagated
        assert propagate(ok, prompt_from(truth, 14), ISO, OracleModel(truth)).slice_range[1][1] > 14


def test_progress_names_the_label_when_several_propagate():
    """39 labels showed only "propagating: 63%" (a review): with several labels each progress
    message says which one, and how many there are; one label's messages are as before."""
    truth = tube(3, 25)
    prompt = prompt_from(truth, 8)
    other = np.zeros_like(truth)
    other[3:26, 1:4, 1:4] = True
    prompt[8][other[8]] = 2
    seen = []
    propagate(image_for(truth), prompt, ISO, OracleModel(truth | other), progress=lambda f, m: seen.append(m))
    labels = [m.split(": ", 1)[0] for m in seen if m != "done"]
    assert labels[0] == "label 1 (1/2)" and labels[-1] == "label 2 (2/2)"
    assert set(labels) == {"label 1 (1/2)", "label 2 (2/2)"}
    seen.clear()
    propagate(image_for(truth), prompt_from(truth, 8), ISO, OracleModel(truth), progress=lambda f, m: seen.append(m))
    assert seen and not any(m.startswith("label") for m in seen)


def test_an_update_does_not_reuse_a_result_computed_with_another_early_stop():
    """Pins that ``previous`` is reused only when it was computed with the same ``early_stop``.
    The object lies on slices 8-12 and, after a gap, 16-20; it is drawn on slice 10 and no
    component filter runs. With ``early_stop=True`` the walks stop at the gap (slices 8-12 only);
    with ``early_stop=False`` they go on and find 16-20 too. An update without early stopping,
    given the early-stopped result, must not reuse its walks: it must equal a fresh run, slices
    8-12 and 16-20. (Reusing them dropped 16-20 without a word, with ``n_predicted == 0``.)"""
    truth = np.zeros(SHAPE, bool)
    truth[8:13, 5:10, 5:10] = True
    truth[16:21, 5:10, 5:10] = True
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 10), ISO, OracleModel(truth), early_stop=True,
                      remove_disconnected=False)
    assert np.flatnonzero(first.mask.any(axis=(1, 2))).tolist() == [8, 9, 10, 11, 12]
    update = propagate(image, prompt_from(truth, 10), ISO, OracleModel(truth), early_stop=False,
                       remove_disconnected=False, previous=first)
    fresh = propagate(image, prompt_from(truth, 10), ISO, OracleModel(truth), early_stop=False,
                      remove_disconnected=False)
    assert np.flatnonzero(update.mask.any(axis=(1, 2))).tolist() == [*range(8, 13), *range(16, 21)]
    np.testing.assert_array_equal(update.mask, fresh.mask)
    np.testing.assert_array_equal(update.mask, truth.astype(np.uint8))
    assert update.n_predicted == fresh.n_predicted > 0


@pytest.mark.parametrize("spacing, expected", [
    (2.5, 8),    # 20 / 2.5 = 8 exactly
    (0.7, 28),   # 20 / 0.7 = 28.57..., rounded down
    (0.3, 40),   # 20 / 0.3 = 66.7, capped at max_window
    (30.0, 1),   # 20 / 30 = 0.67 -> 0, raised to min_window
])
def test_window_slices_rounds_the_window_down_and_keeps_it_within_its_bounds(spacing, expected):
    """Pins ``window_slices``: the number of slices covering ``window_mm`` at this slice spacing,
    rounded down, then kept between ``min_window`` (1) and ``max_window`` (40). With
    window_mm = 20: 2.5 mm -> 8, 0.7 mm -> 28 (not 29: rounding up would make the window wider
    than 20 mm), 0.3 mm -> 40 (the cap), 30 mm -> 1 (the floor)."""
    from types import SimpleNamespace

    from PAMSegmentLib.propagate import window_slices

    assert window_slices(spacing, SimpleNamespace(window_mm=20.0, max_window=40, min_window=1)) == expected


def test_a_result_read_back_from_its_record_keeps_its_walls():
    """A mutation review: a record read back without its walls went unnoticed (the update then
    recomputed everything, right but slower). ``from_record(to_record())`` keeps every keyframe,
    the walls among them as empty masks, and an update from it with the same keyframes and
    walls predicts nothing again."""
    from PAMSegmentLib.propagate import PropagationResult

    truth = tube(3, 25)
    prompt = prompt_from(truth, [8, 16])
    first = propagate(image_for(truth), prompt, ISO, OracleModel(truth), empty_slices=[20])
    back = PropagationResult.from_record(first.mask, first.to_record())
    assert sorted(back.keyframes[1]) == [8, 16, 20]
    assert not back.keyframes[1][20].any() and np.array_equal(back.keyframes[1][8], prompt[8] > 0)
    again = propagate(image_for(truth), prompt, ISO, OracleModel(truth), empty_slices=[20], previous=back)
    np.testing.assert_array_equal(again.mask, first.mask)
    assert again.n_predicted == 0


def test_between_two_keyframes_neither_walk_uses_the_stop_signals():
    """A mutation review: one side's walk between two keyframes could use the stop signals unseen,
    since with an oracle both sides predict the same mask. Here the walk upward from 8 predicts
    the truth and the walk downward from 16 the truth shifted two columns, both with an
    object-present probability of 0.2 (below the 0.5 that ends a walk elsewhere). Each slice
    follows the side nearer to it: the truth next to 8, the shifted mask next to 16. Were the
    upward walk stopped by the presence, slice 9 would take the downward walk's shifted mask."""
    truth = tube(3, 25)
    shifted = np.roll(truth, 2, axis=2)

    class TwoSided(OracleModel):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            source = truth if query_indices[0] > guide_index else shifted
            prob = source[list(query_indices)].astype(np.float32)
            return SlicePrediction(prob, np.full(len(prob), 0.2, np.float32))

    prompt = prompt_from(truth, 8)
    prompt[16][shifted[16]] = 1
    res = propagate(image_for(truth), prompt, ISO, TwoSided(truth, window=4))
    np.testing.assert_array_equal(res.mask[9] > 0, truth[9])
    np.testing.assert_array_equal(res.mask[15] > 0, shifted[15])


@pytest.mark.parametrize("answer, phrase", [
    (lambda q, shape: np.zeros((len(q),) + shape, np.float32),
     "returned a ndarray; it must return a SlicePrediction(prob, presence)"),
    (lambda q, shape: SlicePrediction(np.zeros((len(q) + 1,) + shape, np.float32)),
     "returned probabilities of shape"),
    (lambda q, shape: SlicePrediction(np.full((len(q),) + shape, np.nan, np.float32)),
     "returned probabilities that are not finite numbers (NaN or inf)"),
    (lambda q, shape: SlicePrediction(np.full((len(q),) + shape, 255.0, np.float32)),
     "returned values from 255 to 255; probabilities must lie within [0, 1] (a mask of 0 and 255: divide it by 255)"),
    (lambda q, shape: SlicePrediction(np.zeros((len(q),) + shape, np.float32), np.zeros(len(q) + 2)),
     "returned 16 presence value(s) for 14 query slice(s)"),
])
def test_a_custom_predictors_answer_is_checked(answer, phrase):
    """A review of the Python API: a custom SlicePredictor's wrong answer gave an IndexError deep in
    the engine, NaN a result of the drawn slice alone, 0/255 a "confidence" of 255. Now one
    InputError names the predictor and what it must return."""
    truth = tube(3, 25)

    class Custom(SlicePredictor):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            return answer(query_indices, tuple(volume.shape[1:]))

    with pytest.raises(InputError, match=r"^Custom\.predict " + re.escape(phrase)):
        propagate(image_for(truth), prompt_from(truth, 14), ISO, Custom())


def test_a_custom_predictor_indexes_an_interpolated_volume_as_an_array():
    """A review of the Python API: with thick slices (through_plane_mm) the engine hands predictors
    an interpolated view that took only a slice number or a list: ``volume[g, r0:r1, c0:c1]`` or
    ``volume[a:b]`` raised a bare TypeError. Now it is indexed as an array: a predictor that
    thresholds a cropped window reads the same values with and without interpolation where the
    slices are originals, and the result equals the list-indexing one."""
    truth = tube(3, 25)
    image = truth.astype(np.float32)

    class Cropping(SlicePredictor):
        through_plane_mm = 0.5  # 1 mm slices: one interpolated slice between neighbours

        def __init__(self, use_slices):
            self.use_slices, self.window_mm, self.max_window = use_slices, 4.0, 4

        def predict(self, volume, guide_index, guide_mask, query_indices):
            if self.use_slices:
                lo, hi = min(query_indices), max(query_indices)
                block = volume[lo:hi + 1]  # a slice of slices
                rows = np.stack([block[q - lo] for q in query_indices])
                assert np.array_equal(volume[query_indices[0], 2:10, 2:10], rows[0, 2:10, 2:10])
            else:
                rows = volume[list(query_indices)]
            return SlicePrediction((rows >= 0.5).astype(np.float32))

    by_slices = propagate(image, prompt_from(truth, 14), ISO, Cropping(True))
    by_lists = propagate(image, prompt_from(truth, 14), ISO, Cropping(False))
    np.testing.assert_array_equal(by_slices.mask, by_lists.mask)
    np.testing.assert_array_equal(by_slices.mask > 0, truth)


def test_a_damaged_record_is_an_input_error():
    """A review of the Python API: ``from_record`` raised a plain ValueError, which code catching
    PAMError missed."""
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.propagate import PropagationResult

    truth = tube(3, 25)
    result = propagate(image_for(truth), prompt_from(truth, 14), ISO, OracleModel(truth))
    record = result.to_record()
    record["axis"] = 7
    with pytest.raises(PAMError, match="^its axis is not 0, 1 or 2$"):
        PropagationResult.from_record(result.mask, record)


def test_review_first_and_get_predictor_refuse_bad_arguments_in_one_line():
    """A review of the Python API: ``review_first(n=-1)`` returned all candidates but one and
    ``n=2.5`` raised a TypeError; ``get_predictor("pam-memory", bogus=1)`` a TypeError."""
    from PAMSegmentLib.baselines import get_predictor

    truth = tube(3, 25)
    result = propagate(image_for(truth), prompt_from(truth, 14), ISO, OracleModel(truth))
    assert len(result.review_first(1, n=5)) == 5 and result.review_first(1, n=0) == []
    for n in (-1, 2.5, True):
        with pytest.raises(InputError, match=r"^n must be a whole number of slices, 0 or more, got "):
            result.review_first(1, n=n)
    with pytest.raises(InputError, match=r"^bad option for method 'pam-memory': bogus \(it takes memory and "
                                         r"current_weight\)$"):
        get_predictor("pam-memory", bogus=1)


def test_find_prompt_slices_takes_a_short_line_beside_a_keyframe_for_the_objects_tip():
    """A reproducibility review: the evaluation's simulated user drew the gallbladder's reference on
    slices 2, 3 and 8; slice 2 holds its tip, 3 voxels in one column, and the prompt was refused as
    "a stroke drawn in another view". A line of fewer than 5 voxels is an object's tip; a longer
    one is still refused as a stroke (test above)."""
    prompt = np.zeros((12, 40, 40), np.uint8)
    prompt[3, 14:22, 12:20] = 1
    prompt[8, 12:24, 10:22] = 1
    prompt[2, 16:19, 15] = 1  # the tip: 3 voxels in one column, under the drawing on slice 3
    assert find_prompt_slices(prompt) == (0, {1: [2, 3, 8]})
    prompt[2, 14:22, 15] = 1  # 8 voxels: a stroke's line
    with pytest.raises(InputError, match="drawn on more than one plane"):
        find_prompt_slices(prompt)
    # A review of that rule: a stroke drawn in another view with a small brush (lines of 2-4 voxels on
    # several slices in a row) must still be refused, not taken as keyframes cutting the object.
    prompt[2] = 0
    prompt[9:12, 20, 12:16] = 1  # 4 voxels on slices 9-11, beyond the drawn slice 8
    with pytest.raises(InputError, match="drawn on more than one plane"):
        find_prompt_slices(prompt)
    # A second review: a short mark crossing the drawn slice 3 leaves a short line on each side
    # (slices 2 and 4): two "tips" cut the object to the mark. A stroke, refused.
    one = np.zeros((12, 40, 40), np.uint8)
    one[3, 14:22, 12:20] = 1
    one[2:5, 16:19, 15] = 1
    with pytest.raises(InputError, match="drawn on more than one plane"):
        find_prompt_slices(one)
