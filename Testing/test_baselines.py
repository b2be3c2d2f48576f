"""Classical baselines (copy, track) run through the real propagation engine."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from PAMSegmentLib.baselines import CopyPredictor, IntensityGate, TrackPredictor, get_predictor
from PAMSegmentLib.errors import InputError
from PAMSegmentLib.metrics import dice
from PAMSegmentLib.propagate import SlicePredictor, propagate


def moving_ellipsoid(seed: int = 0, n: int = 40, size: int = 80, noise: float = 0.12):
    """A bright ellipsoid in noise whose centre drifts (0.4 px/slice in j, 0.3 in i) and whose
    cross-section grows then shrinks, plus a dimmer neighbour it must not spill into.
    Object extent along axis 0: slices 9..31."""
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:n, :size, :size].astype(np.float32)
    cj, ci = 38 + 0.4 * (k - 20), 36 + 0.3 * (k - 20)
    truth = ((k - 20) / 11.5) ** 2 + ((j - cj) / 18) ** 2 + ((i - ci) / 13) ** 2 <= 1
    neighbour = (((j - 40) / 10) ** 2 + ((i - 66) / 6) ** 2 <= 1) & ~truth
    img = 0.2 + 0.6 * truth + 0.25 * neighbour + rng.normal(0, noise, truth.shape)
    return img.astype(np.float32), truth


@pytest.fixture(scope="module")
def ellipsoid_case():
    img, truth = moving_ellipsoid()
    occ = np.flatnonzero(truth.any(axis=(1, 2)))
    assert (occ[0], occ[-1]) == (9, 31)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[20] = truth[20]
    return img, truth, prompt


# Measured on this case (seed 0): copy Dice 0.986 (slices 9..31), track Dice 0.973 (slices
# 10..30); the true extent is 9..31. Thresholds leave a small margin for platform differences.
@pytest.mark.parametrize("method, least, ends", [("copy", 0.96, (9, 31)), ("track", 0.95, (10, 30))])
def test_baseline_follows_moving_ellipsoid_and_stops_at_its_ends(ellipsoid_case, method, least, ends):
    img, truth, prompt = ellipsoid_case
    res = propagate(img, prompt, (2.0, 1.0, 1.0), get_predictor(method), axis=0)
    mask = res.mask > 0
    assert dice(mask, truth) > least
    first, last = res.slice_range[1]
    assert abs(first - ends[0]) <= 1 and abs(last - ends[1]) <= 1
    assert np.array_equal(mask[20], truth[20])  # the prompt slice is kept exactly
    conf = res.confidence[1]
    assert np.isfinite(conf[first:last + 1]).all() and (conf[first:last + 1] > 0).all()


def drift_volume(noise: float = 0.05):
    """A cylinder through slices 5..34 that is bright (0.8) up to slice 19 and replaced by a
    dimmer object (0.45) of the same shape from slice 20 on; background 0.2."""
    rng = np.random.default_rng(1)
    n, size = 40, 64
    _, j, i = np.mgrid[:n, :size, :size]
    disk = (j - 32) ** 2 + (i - 30) ** 2 <= 12 ** 2
    img = np.full((n, size, size), 0.2, np.float32)
    truth = np.zeros((n, size, size), bool)
    for s in range(5, 35):
        img[s][disk[s]] = 0.8 if s < 20 else 0.45
        truth[s] = disk[s]
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return img, truth


@pytest.mark.parametrize("method", ["copy", "track"])
def test_baseline_stops_where_the_intensity_drifts(method):
    img, truth = drift_volume()
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[12] = truth[12]
    res = propagate(img, prompt, (1.0, 1.0, 1.0), get_predictor(method), axis=0)
    first, last = res.slice_range[1]
    assert first == 5  # the bright part is followed to its end
    assert last == 19  # ... and the dim object that replaces it is not entered (measured: 19)


def test_copy_keyframe_on_the_dim_part_gates_its_own_walk():
    """A keyframe drawn on the dim object is judged against its own intensity, not the first one's."""
    img, truth = drift_volume()
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[12] = truth[12]
    prompt[27] = truth[27]
    res = propagate(img, prompt, (1.0, 1.0, 1.0), CopyPredictor(), axis=0)
    mask = res.mask > 0
    assert res.slice_range[1] == (5, 34)
    assert np.array_equal(mask[12], truth[12]) and np.array_equal(mask[27], truth[27])
    assert dice(mask, truth) > 0.9


@pytest.mark.parametrize("method", ["copy", "track"])
def test_baselines_leave_no_gap_between_keyframes_where_the_intensity_changes(method):
    """Between two drawn slices the object is there. With keyframes at 14 and 34 (the brightness
    changes at 20, near the first) both baselines left 20-23 empty, where the far keyframe's weight
    is below one half: the tracker because it emptied slices on its drift test itself (it reports
    it as presence now, which the engine ignores between keyframes), copy because its refinement
    loses the object on the other part and the walk that lost it still voted (it no longer does)."""
    img, truth = drift_volume()
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[14] = truth[14]
    prompt[34] = truth[34]
    mask = propagate(img, prompt, (1.0, 1.0, 1.0), get_predictor(method), axis=0).mask > 0
    assert [s for s in range(14, 35) if not mask[s].any()] == []
    assert dice(mask[14:35], truth[14:35]) > 0.9
    # the rule before (validate.py's pam+kfvotes): copy's gap is back
    if method == "copy":
        old = get_predictor("copy")
        old.keyframe_empty_side_votes = True
        mask = propagate(img, prompt, (1.0, 1.0, 1.0), old, axis=0).mask > 0
        assert [s for s in range(14, 35) if not mask[s].any()] == [20, 21, 22, 23]


def test_track_warps_a_shifted_square():
    """One registration step: a square shifted by 3 px is followed (IoU of the warped mask)."""
    img = np.zeros((2, 64, 64), np.float32)
    img[0, 20:40, 20:40] = 1.0
    img[1, 23:43, 21:41] = 1.0
    img += np.random.default_rng(0).normal(0, 0.02, img.shape).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    p = TrackPredictor()
    p.begin(img, 0, mask)
    pred = p.predict(img, 0, mask, [1])
    got = pred.prob[0] >= 0.5
    want = np.zeros_like(mask)
    want[23:43, 21:41] = True
    assert (got & want).sum() / (got | want).sum() > 0.8
    assert pred.presence[0] > 0.5


def test_track_pyramid_level_follows_a_larger_shift_than_the_same_fine_iterations():
    """``coarse_iterations``: demons on a half-resolution grid first, its field starting the finer
    grid. A blurred disk moved 8 px down and 4 px right: 5 iterations on the 64 px grid alone
    reach Dice 0.706 (the unmoved disk scores 0.599); 10 coarse iterations first reach 0.837,
    more than 10 fine iterations alone (0.793) at about 3/4 of their cost (a coarse iteration
    covers a quarter of the pixels)."""
    yy, xx = np.ogrid[:96, :96]
    before = (yy - 40) ** 2 + (xx - 40) ** 2 <= 14 ** 2
    after = (yy - 48) ** 2 + (xx - 44) ** 2 <= 14 ** 2
    img = np.stack([before, after]).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 0.02, img.shape).astype(np.float32)
    img = ndimage.gaussian_filter(img, (0, 2, 2))

    def warped_dice(iterations, coarse):
        t = TrackPredictor(max_side=64, iterations=iterations, coarse_iterations=coarse)
        return dice(t.warp(t.register(img[1], img[0]), before.astype(np.float32)) >= 0.5, after)

    single, pyramid, longer = warped_dice(5, 0), warped_dice(5, 10), warped_dice(10, 0)
    assert dice(before, after) < 0.61
    assert single < 0.75 and pyramid > 0.8 and pyramid > longer + 0.02
    with pytest.raises(ValueError, match="coarse_iterations >= 0"):
        TrackPredictor(coarse_iterations=-1)
    # Pyramids are made once per slice and registered together: the same transform as ``register``.
    t = TrackPredictor(max_side=64, iterations=5, coarse_iterations=10)
    fixed, moving = t.pyramid(img[1]), t.pyramid(img[0])
    assert [f for f, _ in fixed] == [1.5, 3.0]  # 96 px crop: the 64 px grid, then half as fine
    a = t.warp(t.register_pyramids(fixed, moving), before.astype(np.float32))
    np.testing.assert_array_equal(a, t.warp(t.register(img[1], img[0]), before.astype(np.float32)))
    with pytest.raises(ValueError, match="same crop shape"):
        t.register_pyramids(fixed, t.pyramid(img[0][:80]))


def test_track_step_limit_in_grid_pixels_follows_large_motion_on_a_downsampled_crop():
    """``max_step``: SimpleITK limits each demons update to 0.5 in physical units, which here are
    full-resolution px; on a 300 px crop put on a 128 px grid (2.3 full-res px per grid px) and a
    64 px coarse level a step was therefore 0.2 / 0.1 of a grid px, and 10 + 10 iterations do not
    reach a disk (radius 80 px) moved 20 px: Dice 0.905 (0.842 unmoved). With the limit in grid
    px (0.5, Thirion's value) the same iterations reach 0.986; a disk grown by 20 px in radius
    0.848 -> 0.984."""
    yy, xx = np.ogrid[:300, :300]
    disk = lambda r, cx: ((yy - 150) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)  # noqa: E731
    rng = np.random.default_rng(0)

    def image(mask):
        return (ndimage.gaussian_filter(mask * 0.6 + 0.2, 2) + rng.normal(0, 0.02, mask.shape)).astype(np.float32)

    def warped_dice(moved, step):
        t = TrackPredictor(max_side=128, iterations=10, coarse_iterations=10, max_step=step)
        return dice(t.warp(t.register(image(moved), image(disk(80, 150))), disk(80, 150)) >= 0.5, moved > 0)

    shifted, grown = disk(80, 170), disk(100, 150)
    assert dice(disk(80, 150) > 0, shifted > 0) < 0.85
    assert warped_dice(shifted, 0.0) < 0.93 < 0.97 < warped_dice(shifted, 0.5)
    assert warped_dice(grown, 0.0) < 0.9 < 0.97 < warped_dice(grown, 0.5)
    # a crop that needs no downsampling, one level (f = 1): 0.5 grid px is SimpleITK's own limit
    small, moved = image(disk(30, 150))[100:200, 100:200], image(disk(30, 156))[100:200, 100:200]
    a, b = (TrackPredictor(iterations=10, max_step=s) for s in (0.0, 0.5))
    np.testing.assert_array_equal(a.warp(a.register(moved, small), disk(30, 150)[100:200, 100:200]),
                                  b.warp(b.register(moved, small), disk(30, 150)[100:200, 100:200]))
    with pytest.raises(ValueError, match="max_step must be >= 0"):
        TrackPredictor(max_step=-1)


def test_intensity_gate_scores():
    rng = np.random.default_rng(0)
    sl = rng.normal(100, 10, (32, 32))
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    gate = IntensityGate.from_prompt(sl, mask, k=2.5)
    assert gate.score(sl[mask]) > 0.9
    assert gate.score(sl[mask] + 2.6 * gate.sd * 2) < 0.5  # far beyond k robust SDs
    assert gate.score(np.array([])) == 0.0


def test_get_predictor_methods_and_errors():
    assert isinstance(get_predictor("copy"), CopyPredictor)
    assert isinstance(get_predictor("Track"), TrackPredictor)
    assert get_predictor("track", iterations=10).iterations == 10
    for p in (get_predictor("copy"), get_predictor("track")):
        assert isinstance(p, SlicePredictor) and p.max_window == 1
    with pytest.raises(InputError, match="unknown method 'magic'.*pam, pam-memory, track, copy"):
        get_predictor("magic")
    with pytest.raises(InputError, match="does not use a checkpoint"):
        get_predictor("copy", checkpoint="x.pt")
    with pytest.raises(InputError, match="bad option"):
        get_predictor("copy", nonsense=1)


def test_predict_before_begin_is_an_error():
    with pytest.raises(RuntimeError, match="begin"):
        CopyPredictor().predict(np.zeros((2, 8, 8), np.float32), 0, np.ones((8, 8), bool), [1])


def test_registration_of_a_large_crop_stays_finite_and_the_shipped_fusion_propagates_it(monkeypatch):
    """SimpleITK's demons returned displacement fields of NaN on grids coarser than about 17.8x
    (a 1150 px crop with the shipped 128 px grid and its half-resolution level): the warp was
    empty and a large object in a large slice was not propagated at all, without a word."""
    import SimpleITK as sitk

    from PAMSegmentLib import baselines
    from PAMSegmentLib.baselines import MAX_FACTOR
    from PAMSegmentLib.propagate import propagate

    reg = TrackPredictor(max_side=128, iterations=10, coarse_iterations=10)  # the shipped weights' grid
    assert reg._factors((1000, 1000)) == [7.8125, 15.625]  # below the cap: as before
    assert reg._factors((1200, 1200)) == [9.375]  # the coarse level would be 18.75
    assert reg._factors((4000, 4000)) == [MAX_FACTOR]  # the finest grid: 250 px instead of 128
    n = 1200
    yy, xx = np.mgrid[:n, :n]
    disc = (((yy - n / 2) ** 2 + (xx - n / 2) ** 2) < 300 ** 2).astype(np.float32)
    moved = (((yy - n / 2 - 40) ** 2 + (xx - n / 2) ** 2) < 300 ** 2).astype(np.float32)
    field = sitk.GetArrayFromImage(reg.register(moved, disc).GetDisplacementField())
    assert np.isfinite(field).all() and np.abs(field).max() > 1.0  # demons ran and moved the boundary
    # Without the cap the coarse level's field is NaN; the safety net turns it into no motion.
    monkeypatch.setattr(baselines, "MAX_FACTOR", 1e9)
    assert reg._factors((n, n)) == [9.375, 18.75]
    field = sitk.GetArrayFromImage(reg.register(moved, disc).GetDisplacementField())
    assert np.isfinite(field).all() and not field.any()
    monkeypatch.setattr(baselines, "MAX_FACTOR", MAX_FACTOR)
    volume = np.repeat(disc[None] * 200, 3, axis=0)
    prompt = np.zeros(volume.shape, np.uint8)
    prompt[1] = disc > 0
    result = propagate(volume, prompt, (1.0, 1.0, 1.0), None, threads=1)
    assert result.slice_range[1] == (0, 2)  # was (1, 1): the drawn slice alone
    inside = result.mask[[0, 2]] > 0
    assert 2 * (inside & (disc > 0)).sum() / (inside.sum() + 2 * disc.sum()) > 0.97
