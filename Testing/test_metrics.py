"""Metrics against values a reader can check by hand."""

import math

import numpy as np
import pytest

from PAMSegmentLib.errors import InputError
from PAMSegmentLib.metrics import dice, evaluate, hd95, normalized_surface_dice, surface_distances

ISO = (1.0, 1.0, 1.0)


def cube(shape=(16, 14, 14), k0=0, size=10, offset=(2, 2)):
    """A size^3 cube whose first slice is k0 (rows/columns start at ``offset``)."""
    m = np.zeros(shape, bool)
    j0, i0 = offset
    m[k0 : k0 + size, j0 : j0 + size, i0 : i0 + size] = True
    return m


def voxel(shape, at):
    m = np.zeros(shape, bool)
    m[at] = True
    return m


# Two 10^3 cubes, B shifted by 2 slices along k: A spans k = 1..10, B spans k = 3..12.
A, B = cube(k0=1), cube(k0=3)


def test_dice_shifted_cubes():
    # Overlap 8 x 10 x 10 = 800 voxels, each cube 1000: 2 * 800 / 2000.
    assert dice(A, B) == pytest.approx(0.8, abs=1e-12)


def test_dice_identical_empty_and_one_empty():
    assert dice(A, A) == 1.0
    empty = np.zeros_like(A)
    assert dice(empty, empty) == 1.0
    assert dice(A, empty) == 0.0 and dice(empty, A) == 0.0


def test_single_voxels_three_apart_with_2mm_slices():
    shape = (8, 3, 3)
    p, r = voxel(shape, (1, 1, 1)), voxel(shape, (4, 1, 1))
    # 3 slices apart x 2 mm per slice = 6 mm, both directions.
    assert hd95(p, r, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    # The same voxels with 1 mm slices (2 mm in-plane does not matter along k): 3 mm.
    assert hd95(p, r, (1.0, 2.0, 2.0)) == pytest.approx(3.0)
    d_pr, d_rp = surface_distances(p, r, (2.0, 1.0, 1.0))
    np.testing.assert_allclose(d_pr, [6.0])
    np.testing.assert_allclose(d_rp, [6.0])


def test_border_voxels_touching_array_edge():
    # Outside the array is background: a full 3^3 array has 26 border voxels (all but the centre).
    full = np.ones((3, 3, 3), bool)
    d_pr, d_rp = surface_distances(full, full, ISO)
    assert d_pr.size == d_rp.size == 26
    assert not d_pr.any() and not d_rp.any()


def test_nsd_all_within_tolerance():
    # Shift of 1 slice: every border voxel of one cube is at distance 0 or 1 mm from the other's border.
    assert normalized_surface_dice(cube(k0=1), cube(k0=2), ISO, tolerance_mm=1.0) == 1.0
    assert normalized_surface_dice(A, A, ISO, tolerance_mm=0.0) == 1.0


def test_nsd_tolerance_below_shift():
    # A 10^3 cube has 1000 - 8^3 = 488 border voxels. Distances from A's border to B's border
    # (B = A shifted 2 slices up; in A's own slice numbering 0..9, B covers 2..11):
    #   slice 0 face          100 voxels  2 mm (B's bottom face)
    #   slice 1 ring           36 voxels  1 mm (B's bottom face)
    #   slices 2..8 rings  7 x 36 voxels  0 mm (B's side faces)
    #   slice 9 face: outer ring 36 at 0 mm, next ring 8^2 - 6^2 = 28 at 1 mm (in-plane to B's
    #                 side face), inner 6 x 6 = 36 at 2 mm (B's top face or side face)
    # With tolerance 1.5 mm: 36 + 252 + 36 + 28 = 352 of 488 are within; B is A mirrored, so
    # NSD = (352 + 352) / (488 + 488) = 44 / 61.
    assert normalized_surface_dice(A, B, ISO, tolerance_mm=1.5) == pytest.approx(44 / 61)
    # Tolerance 2 mm covers the whole shift.
    assert normalized_surface_dice(A, B, ISO, tolerance_mm=2.0) == 1.0


def test_hd95_shifted_cubes_and_anisotropy():
    # From the table above, pooled over both directions (976 distances): 576 at 0, 128 at 1,
    # 272 at 2 mm. The 95th percentile (rank 0.95 * 975 = 926.25) falls among the 2 mm ones.
    assert hd95(A, B, ISO) == pytest.approx(2.0)
    # 2 mm slices: the 200 face voxels 2 slices away are now 4 mm away (> 776 smaller values).
    assert hd95(A, B, (2.0, 1.0, 1.0)) == pytest.approx(4.0)
    # 2 mm in-plane only: the shift is along k, so still 2 mm.
    assert hd95(A, B, (1.0, 2.0, 2.0)) == pytest.approx(2.0)


def test_hd95_ignores_a_single_outlier_voxel():
    pred = A.copy()
    pred[15, 13, 13] = True  # far from the cube; 1 of 977 distances
    assert hd95(pred, A, ISO) == 0.0
    d_pr, _ = surface_distances(pred, A, ISO)
    assert d_pr.max() == pytest.approx(math.sqrt(5**2 + 2**2 + 2**2))  # to the cube corner (10, 11, 11)


def test_empty_cases():
    empty = np.zeros_like(A)
    assert evaluate(empty, empty, ISO) == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}
    for p, r in ((A, empty), (empty, A)):
        assert evaluate(p, r, ISO) == {"dice": 0.0, "nsd": 0.0, "hd95": math.inf}
    d_pr, d_rp = surface_distances(A, empty, ISO)
    assert d_pr.size == 488 and np.isinf(d_pr).all() and d_rp.size == 0


def test_evaluate_matches_single_metrics_and_crop_is_exact():
    got = evaluate(A, B, ISO, tolerance_mm=1.5)
    assert got == pytest.approx({"dice": 0.8, "nsd": 44 / 61, "hd95": 2.0})
    # The same masks inside a much larger array give the same numbers (bounding-box crop).
    big_a, big_b = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
    big_a[20:36, 30:44, 5:19], big_b[20:36, 30:44, 5:19] = A, B
    assert evaluate(big_a, big_b, ISO, tolerance_mm=1.5) == pytest.approx(got)


def test_bad_inputs():
    with pytest.raises(InputError, match="shape"):
        dice(A, A[:-1])
    with pytest.raises(InputError, match="spacing"):
        hd95(A, B, (1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        hd95(A, B, (1.0, 0.0, 1.0))


def test_hd95_pools_both_directions_before_taking_the_percentile():
    """Pins HD95 as the 95th percentile of both directed distance sets pooled (medpy's hd95, as
    documented), not MONAI's max of the two directed 95th percentiles: the two differ only when
    the directions are asymmetric, which the mirrored cubes above are not.
    pred = cube A plus a separate 4 x 3 x 3 block (slices 1-4, rows 2-4, columns 24-26); ref = A.
    The block has 36 - 2 interior = 34 border voxels, 13, 14 and 15 mm from A's face at column 11:
    12 at 13 mm (column 24), 10 at 14 mm (column 25, less its 2 interior voxels), 12 at 15 mm.
    pred -> ref: 488 zeros + 34 block distances (522); ref -> pred: 488 zeros.
    Pooled: 1010 distances, rank 0.95 * 1009 = 958.55 < 976 zeros, so HD95 = 0.
    pred -> ref alone: rank 0.95 * 521 = 494.95, the block's 7th and 8th smallest (13 mm), so
    the max of the directed percentiles would be 13 mm."""
    shape = (16, 14, 30)
    ref = np.zeros(shape, bool)
    ref[:, :, :14] = A
    pred = ref.copy()
    pred[1:5, 2:5, 24:27] = True
    d_pr, d_rp = surface_distances(pred, ref, ISO)
    assert d_pr.size == 522 and d_rp.size == 488 and not d_rp.any()
    assert sorted(d_pr[d_pr > 0].tolist()) == [13.0] * 12 + [14.0] * 10 + [15.0] * 12
    assert np.percentile(d_pr, 95) == pytest.approx(13.0)  # what the max of the directed ones gives
    assert hd95(pred, ref, ISO) == 0.0
    assert hd95(ref, pred, ISO) == 0.0  # symmetric


def test_the_border_is_face_connected():
    """Pins the documented surface: border voxels are mask voxels with a face neighbour (6 in
    3D) outside the mask. A 3 x 3 x 3 cube with one corner voxel removed, inside a zero array,
    has 26 voxels; its centre's 6 face neighbours are all in the mask (the removed corner only
    touches it at a vertex), so the centre is interior and 25 voxels are border. With
    26-connectivity the centre would be border too: 26. (A box has the same border under both
    rules, which is why the box-based tests do not see it.)"""
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    m[1, 1, 1] = False
    d_pr, d_rp = surface_distances(m, m, ISO)
    assert d_pr.size == d_rp.size == 25
    assert not d_pr.any() and not d_rp.any()
    # The whole cube has 27 - 1 = 26 border voxels under either rule.
    m[1, 1, 1] = True
    assert surface_distances(m, m, ISO)[0].size == 26
