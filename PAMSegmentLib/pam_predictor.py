"""PAM's network as a slice predictor for the engine (``PAMSegmentLib.propagate``).

Kept apart from the engine so that the engine and the classical predictors import without torch.
"""

from __future__ import annotations

import torch

from .network import fuse_scales
from .preprocess import IntensityWindow, crop_box_for_mask, crop_slices, intensity_window, uncrop_probability
from .propagate import SlicePrediction, SlicePredictor

__all__ = ["PAMPredictor"]


class PAMPredictor(SlicePredictor):
    """PAM's network as a slice predictor: window from the prompt, ROI crop, resize, inverse."""

    def __init__(self, model):
        self.model = model
        inf = model.inference
        self.window_mm, self.max_window, self.min_window = inf.window_mm, inf.max_window, inf.min_window
        self.threshold, self.presence_threshold = inf.threshold, inf.presence_threshold
        self.min_area_fraction, self.min_area_px = inf.min_area_fraction, inf.min_area_px
        self.window: IntensityWindow | None = None
        self._guide_cache: tuple | None = None

    def begin(self, volume, prompt_index, prompt_mask):
        self.window = intensity_window(volume[prompt_index], prompt_mask, self.model.preprocessing)
        self._guide_cache = None

    @torch.inference_mode()
    def predict(self, volume, guide_index, guide_mask, query_indices):
        pre = self.model.preprocessing
        size, device = pre.input_size, self.model.device
        box = crop_box_for_mask(guide_mask, pre)
        stage = self.model.network.proposing_stage
        # Successive batches of a window share their guide: encode it once.
        key = (guide_index, box, guide_mask.tobytes().__hash__())
        if self._guide_cache is None or self._guide_cache[0] != key:
            g_img = crop_slices(volume[guide_index][None], box, size, self.window).to(device)
            g_mask = crop_slices(guide_mask[None], box, size, is_mask=True).to(device)
            self._guide_cache = (key, stage.encode_guide(g_img, g_mask))
        keys, values = self._guide_cache[1]
        queries = crop_slices(volume[list(query_indices)], box, size, self.window).to(device)
        out = stage.decode_queries(queries[None], keys, values)
        prob = fuse_scales(out.logits, size).float().cpu()
        presence = torch.sigmoid(out.presence).float().cpu().numpy() if out.presence is not None else None
        return SlicePrediction(uncrop_probability(prob, box, volume.shape[1:]), presence)
