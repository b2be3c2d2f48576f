"""The registration chain's carried mask on a finer grid (``InferenceParams.registration_carry_supersample``).

Within a window the fused mask of one slice is warped onto the next. On the slices' own grid it is
binarised at every slice, so a boundary moving less than half a pixel per slice is rounded back
at every step and the walk lags a slowly growing or shrinking object. Kept binary on an s-times
finer grid, the motion adds up. The network is the ``StaleNetwork`` double of the fusion tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from PAMSegmentLib.baselines import TrackPredictor
from PAMSegmentLib.checkpoints import InferenceParams
from PAMSegmentLib.metrics import dice
from PAMSegmentLib.pam_predictor import CARRY_MAX_PIXELS, _block_mean, _upsample, carry_factor
from PAMSegmentLib.propagate import propagate

from test_registration_fusion import StaleNetwork, assert_round_trips_and_old_headers_mean, sliding_square


def growing_disk(n: int = 31, size: int = 64, r0: float = 6.0, step: float = 0.3, seed: int = 0):
    """A bright disk in noise whose radius grows ``step`` px per slice (r0 on slice 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.stack([np.hypot(yy - 31.5, xx - 31.5) <= r0 + step * k for k in range(n)])
    img = 0.2 + 0.6 * truth + rng.normal(0, 0.03, truth.shape)
    return img.astype(np.float32), truth


def _walk(img, truth, supersample: int, w: float = 1.0):
    p = StaleNetwork(w, window=40)
    p.carry_supersample = supersample
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[0] = truth[0]
    return propagate(img, prompt, (1.0, 1.0, 1.0), p, axis=0, early_stop=False).mask > 0


def test_a_finer_carried_mask_follows_slow_growth_the_slice_grid_rounds_away():
    """A disk growing 0.3 px per slice over 30 slices (radius 6 -> 15 px), the registration
    alone (w = 1): on the slice grid the walk lags (measured Dice 0.752, last slice 420 of 716
    px); carried on a 4x grid it follows further (0.839, 532 px)."""
    img, truth = growing_disk()
    coarse, fine = _walk(img, truth, 1), _walk(img, truth, 4)
    assert dice(fine, truth) > dice(coarse, truth) + 0.05
    assert fine[-1].sum() > coarse[-1].sum() + 60
    assert fine[-1].sum() <= truth[-1].sum()  # it still lags, it does not overshoot


def test_factor_one_is_the_slice_grid_chain_exactly():
    img, truth = growing_disk(n=12)
    p, q = StaleNetwork(0.5), StaleNetwork(0.5)
    q.carry_supersample = 1
    for x in (p, q):
        x.begin(img, 0, truth[0])
    assert p.carry_supersample == 1  # the format's default
    np.testing.assert_array_equal(p.predict(img, 0, truth[0], [1, 2, 3, 4]).prob,
                                  q.predict(img, 0, truth[0], [1, 2, 3, 4]).prob)


def test_a_window_split_into_batches_carries_the_fine_mask_on():
    """The second batch of a window continues from the first batch's fine carried mask, so a
    window predicted in two batches equals the window predicted at once."""
    img, truth = sliding_square()
    whole, split = StaleNetwork(0.6), StaleNetwork(0.6)
    for p in (whole, split):
        p.carry_supersample = 4
        p.begin(img, 0, truth[0])
    a = whole.predict(img, 0, truth[0], [1, 2, 3, 4, 5, 6]).prob
    b = np.concatenate([split.predict(img, 0, truth[0], [1, 2, 3]).prob,
                        split.predict(img, 0, truth[0], [4, 5, 6]).prob])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert split._chain[2].shape == tuple(4 * n for n in (s.stop - s.start for s in split._chain[3]))


def test_fine_warp_moves_by_sub_pixels():
    """``TrackPredictor.warp(..., supersample=s)``: the mask's sub-pixels sit at the crop's pixel
    coordinates, so a translation of 1/4 px moves a 4x mask by exactly one sub-pixel."""
    mask = np.zeros((40, 40), np.float32)
    mask[12:28, 8:20] = 1
    same = TrackPredictor.warp(sitk.TranslationTransform(2, (0.0, 0.0)), mask, supersample=4)
    np.testing.assert_allclose(same, mask, atol=1e-6)
    moved = TrackPredictor.warp(sitk.TranslationTransform(2, (0.25, 0.0)), mask, supersample=4)
    np.testing.assert_allclose(moved, np.roll(mask, -1, axis=1), atol=1e-6)  # output(x) = mask(x + 1/4 px)
    # On the slice grid the same quarter-pixel shift gives a soft edge, not a moved one.
    soft = TrackPredictor.warp(sitk.TranslationTransform(2, (0.25, 0.0)), mask)
    assert np.isclose(soft[20, 19], 0.75) and np.isclose(soft[20, 7], 0.25)


def test_block_helpers_and_factor_for_large_crops():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    up = _upsample(a, 3)
    assert up.shape == (9, 12) and up[4, 5] == a[1, 1]
    np.testing.assert_array_equal(_block_mean(up, 3), a)
    assert _block_mean(np.array([[1, 0], [1, 1]], np.float32), 2)[0, 0] == 0.75
    # The factor drops so that a crop's sub-pixels stay within CARRY_MAX_PIXELS (512 x 512).
    assert CARRY_MAX_PIXELS == 512 * 512
    assert carry_factor(4, (128, 128)) == 4
    assert carry_factor(4, (200, 200)) == 2  # 3 x 3 x 40000 > 262144
    assert carry_factor(4, (300, 300)) == 1
    assert carry_factor(1, (16, 16)) == 1


@pytest.mark.parametrize("value", [0, 9])
def test_supersample_setting_is_validated_and_old_headers_mean_one(value):
    with pytest.raises(ValueError, match="registration_carry_supersample must be within 1..8"):
        InferenceParams(registration_carry_supersample=value)
    assert_round_trips_and_old_headers_mean("registration_carry_supersample", 4, 1)


def test_fine_warp_resamples_only_what_the_mask_can_reach_and_gives_the_whole_grid_values():
    """On the fine grid ``warp`` resamples only the mask's bounding box widened by the field's
    largest displacement: the values equal resampling the whole fine grid exactly."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random((90, 90)).astype(np.float32), 3)
    reg = TrackPredictor(max_side=64, iterations=10, coarse_iterations=10)
    transform = reg.register(fixed, np.roll(fixed, 5, axis=1))
    reach = np.abs(sitk.GetArrayViewFromImage(transform.GetDisplacementField())).max()
    assert reach > 2.0  # the field moves things by several px, so the margin matters
    mask = np.zeros((90, 90), bool)
    mask[30:60, 25:55] = rng.random((30, 30)) > 0.3
    for s in (2, 4):
        fine = _upsample(mask, s).astype(np.float32)
        whole = sitk.GetImageFromArray(fine)
        whole.SetSpacing((1.0 / s,) * 2)
        whole.SetOrigin((0.5 / s - 0.5,) * 2)
        expected = sitk.GetArrayFromImage(
            sitk.Resample(whole, whole, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        got = TrackPredictor.warp(transform, fine, supersample=s)
        np.testing.assert_array_equal(got, expected)
        assert expected.sum() > 0.9 * fine.sum()
    assert not TrackPredictor.warp(transform, np.zeros((180, 180), np.float32), supersample=2).any()
