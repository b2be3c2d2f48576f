"""Preprocessing: the crop/resize round trip and the intensity window, against hand numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from PAMSegmentLib.preprocess import (
    CropBox,
    IntensityWindow,
    PreprocessingParams,
    crop_box_for_mask,
    crop_slices,
    intensity_window,
    uncrop_probability,
)

SLICE = (96, 112)  # (rows, columns)


def ellipse(center, radii, shape=SLICE) -> np.ndarray:
    j, i = np.ogrid[: shape[0], : shape[1]]
    return ((j - center[0]) / radii[0]) ** 2 + ((i - center[1]) / radii[1]) ** 2 <= 1


MASKS = {
    "tiny disc (crop upsampled)": ellipse((40, 50), (3, 3)),
    "small ellipse": ellipse((30, 60), (9, 14)),
    "medium ellipse": ellipse((48, 56), (25, 35)),
    "large ellipse (crop downsampled)": ellipse((48, 56), (45, 54)),
    "disc at the top-left edge": ellipse((2, 4), (12, 12)),
    "ellipse at the right edge": ellipse((60, 108), (15, 20)),
}


def round_trip(mask: np.ndarray, size: int) -> tuple[np.ndarray, CropBox]:
    params = PreprocessingParams(input_size=size)
    box = crop_box_for_mask(mask, params)
    crop = crop_slices(mask[None], box, size, is_mask=True)  # (1, 1, size, size)
    assert crop.shape == (1, 1, size, size)
    back = uncrop_probability(crop[:, 0], box, mask.shape)  # (1, H, W)
    return back[0] >= 0.5, box


@pytest.mark.parametrize("size", [128, 224])
@pytest.mark.parametrize("name", list(MASKS))
def test_crop_resize_uncrop_recovers_mask_within_one_voxel_of_its_boundary(name, size):
    mask = MASKS[name]
    recovered, box = round_trip(mask, size)
    boundary = mask & ~ndimage.binary_erosion(mask)
    near_boundary = ndimage.binary_dilation(boundary, structure=np.ones((3, 3), bool))
    wrong = recovered ^ mask
    assert not (wrong & ~near_boundary).any(), f"{int((wrong & ~near_boundary).sum())} voxels off, box {box}"
    # ...and it is close overall: the error is a thin rim at most.
    assert wrong.sum() <= boundary.sum()


def test_crop_box_is_a_square_around_the_mask_hand_numbers():
    mask = np.zeros(SLICE, bool)
    mask[10:30, 5:15] = True  # 20 rows x 10 columns, centre (20, 10)
    box = crop_box_for_mask(mask, PreprocessingParams())
    assert box == CropBox(row0=5, col0=-5, side=30)  # side 1.5 x 20; reaches past the left edge

    dot = np.zeros(SLICE, bool)
    dot[50, 60] = True  # a 1-voxel mask still gets the minimum crop
    box = crop_box_for_mask(dot, PreprocessingParams())
    assert box.side == 16 and box.row0 <= 50 < box.row0 + 16 and box.col0 <= 60 < box.col0 + 16

    with pytest.raises(ValueError, match="empty mask"):
        crop_box_for_mask(np.zeros(SLICE, bool), PreprocessingParams())


def test_image_crop_pads_outside_the_slice_with_the_window_low_end():
    image = np.full((2, *SLICE), 100.0, np.float32)
    window = IntensityWindow(0.0, 200.0)
    box = CropBox(row0=-8, col0=-8, side=16)  # a quarter of it lies on the slice
    crop = crop_slices(image, box, 16, window)  # no resize: exact values
    assert crop.shape == (2, 1, 16, 16)
    assert torch.all(crop[:, 0, :8, :] == -1) and torch.all(crop[:, 0, :, :8] == -1)
    assert torch.all(crop[:, 0, 8:, 8:] == 0)  # 100 is the middle of [0, 200]


def test_intensity_window_maps_prompt_percentiles_to_minus_one_and_one():
    image = np.full((40, 40), -1000.0)
    mask = np.zeros((40, 40), bool)
    mask[5:36, 5:36] = True  # 961 voxels holding 0, 1, ..., 960 HU
    image[mask] = np.arange(961, dtype=float)
    w = intensity_window(image, mask, PreprocessingParams(window_percentiles=(0.5, 99.5)))
    assert w.low == pytest.approx(4.8) and w.high == pytest.approx(955.2)  # 0.5 % and 99.5 % of 0..960
    values = np.array([-1000.0, w.low, (w.low + w.high) / 2, w.high, 5000.0])
    np.testing.assert_allclose(w.apply(values), [-1, -1, 0, 1, 1], atol=1e-6)
    assert w.apply(values).dtype == np.float32
    # The torch path agrees with the numpy path.
    np.testing.assert_allclose(w.apply(torch.tensor(values)).numpy(), w.apply(values), atol=1e-6)
    # Voxels outside the prompt (the -1000 HU air) do not move the window.
    image[~mask] = 3000.0
    assert intensity_window(image, mask, PreprocessingParams()) == w


def test_intensity_window_margin_and_uniform_region():
    image = np.zeros((20, 20))
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    image[mask] = np.linspace(100.0, 200.0, 100)
    params = PreprocessingParams(window_percentiles=(0.0, 100.0), window_margin=0.1)
    w = intensity_window(image, mask, params)
    assert (w.low, w.high) == pytest.approx((90.0, 210.0))  # 10 % of the 100-wide window each side

    flat = np.full((20, 20), 50.0)
    flat[0, 0] = 0.0
    w = intensity_window(flat, mask, PreprocessingParams())  # the prompt region is uniform
    assert w.high > w.low and w.low < 50.0 < w.high


def test_preprocessing_params_round_trip():
    p = PreprocessingParams(input_size=128, window_percentiles=(1.0, 99.0), window_margin=0.05)
    assert PreprocessingParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown preprocessing field"):
        PreprocessingParams.from_dict({"input_size": 128, "gamma": 2})
