"""Fixes from session 28's reviews (each test failed on the code before its fix)."""
from __future__ import annotations

import numpy as np


def test_bands_whose_two_end_pieces_overlap_are_still_one_tilted_outline():
    """One outline painted across thin slices of an oblique volume leaves disjoint bands, but the
    small pieces at its rounded ends may overlap their neighbour by more than half: one such pair
    made the whole drawing count as deliberate keyframes (11-17 slivers, Dice 0.10-0.12 in a review's
    Slicer scene at 20-45 degrees). Most pairs decide now."""
    from PAMSegmentLib.propagate import tilted_drawing

    bands = np.zeros((20, 40, 60), np.uint8)
    for n, s in enumerate(range(5, 12)):  # seven adjacent slices, a band 3 px wide moving 4 px per slice
        bands[s, 10:30, 10 + 4 * n:13 + 4 * n] = 1
    bands[5] = 0
    bands[5, 18:21, 14:16] = 1  # the end piece: 6 px, inside the next slice's band (overlap 1.0)
    assert tilted_drawing(bands, 0, list(range(5, 12))) == (5, 11)  # None before: one pair of six overlapped
    # Keyframes drawn on purpose on adjacent slices overlap on most pairs: not bands.
    keyframes = np.zeros_like(bands)
    keyframes[5:12, 10:30, 20:40] = 1
    keyframes[8, 10:30, 20:40] = 0
    keyframes[8, 10:30, 40:55] = 1  # one pair of sections apart (a sharp turn) does not make it bands
    assert tilted_drawing(keyframes, 0, list(range(5, 12))) is None
