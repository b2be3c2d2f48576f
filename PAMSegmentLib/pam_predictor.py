"""PAM's network as a slice predictor for the engine (``PAMSegmentLib.propagate``).

Kept apart from the engine so that the engine and the classical predictors import without torch.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

import numpy as np
from scipy import ndimage

from .checkpoints import GATE_REFERENCES, QUERY_PRIORS
from .checks import is_flag, is_number
from .errors import CheckpointError, InputError
from .network import fuse_scales
from .preprocess import IntensityWindow, crop_box_for_mask, crop_slices, intensity_window, uncrop_probability
from .propagate import SlicePrediction, SlicePredictor

__all__ = ["PAMPredictor", "MemoryPAMPredictor"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 0 when both are empty (nothing followed in common)."""
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _smoothed(image_slice: np.ndarray) -> np.ndarray:
    # The same light smoothing as the classical predictors' gate statistics.
    return ndimage.gaussian_filter(np.asarray(image_slice, dtype=np.float32), 1.0)


class _InlineExecutor(Executor):
    """An executor that runs each task at once in the calling thread: the registrations of a run
    limited to one CPU thread (``--threads 1``) do not run beside the network."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered by result(), as a pool would
            future.set_exception(exc)
        return future


def registration_pool(workers: int) -> Executor:
    """Where a window's registrations run: ``workers`` threads beside the network, but none when
    torch was limited to one thread (the command line's ``--threads 1``, ``torch.set_num_threads(1)``):
    then they run in turn in the calling thread, so that the whole run keeps to one core."""
    workers = min(max(int(workers), 1), torch.get_num_threads())
    return _InlineExecutor() if workers <= 1 else ThreadPoolExecutor(max_workers=workers)


# At most this many sub-pixels in a supersampled carried mask (InferenceParams.registration_carry_supersample).
CARRY_MAX_PIXELS = 512 * 512


def carry_factor(supersample: int, crop_shape) -> int:
    """The carried mask's supersampling factor for a crop: ``supersample``, lowered until the crop's
    sub-pixels fit in ``CARRY_MAX_PIXELS`` (1 for crops of that many pixels or more)."""
    n = max(int(crop_shape[0]) * int(crop_shape[1]), 1)
    return max(1, min(int(supersample), math.isqrt(CARRY_MAX_PIXELS // n)))


def _upsample(a: np.ndarray, s: int) -> np.ndarray:
    """Each pixel as s x s sub-pixels."""
    return np.repeat(np.repeat(a, s, axis=0), s, axis=1)


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    """The mean of each s x s block (inverse of ``_upsample`` for block-constant arrays)."""
    # s^2 strided adds: about 10x faster than a reshaped mean on the fusion's hot path.
    out = np.array(a[0::s, 0::s], dtype=np.float32)
    for i in range(s):
        for j in range(s):
            if i or j:
                out += a[i::s, j::s]
    out *= np.float32(1.0 / (s * s))
    return out


@dataclass
class _RegistrationPlan:
    crop: tuple[slice, slice]  # region of the slices registered (around the window's guide mask)
    pairs: list[tuple[int, int]]  # (fixed, moving) slice indices, one per query
    chained: bool  # each query's moving slice is the previous query (else the guide)
    # Crop of the mask carried onto the first query (bool; on the fine grid when it continues a chain).
    start_mask: np.ndarray


class PAMPredictor(SlicePredictor):
    """PAM's network as a slice predictor: window from the prompt, ROI crop, resize, inverse.

    ``registration_weight`` w > 0 (default: the checkpoint's inference parameter) fuses the
    network with demons registration (``TrackPredictor.register``/``warp`` on a grid of at most
    ``registration_max_side`` px, ``registration_iterations`` iterations, after
    ``registration_coarse_iterations`` on a grid half as fine when that is > 0). Within a window
    the guide's mask is carried slice by slice (guide -> first query -> next query ...) and each
    query's probability is ``(1 - w) * network + w * warped``, the fused mask of one slice being
    what is warped onto the next; that carried mask is kept binary on a grid
    ``registration_carry_supersample`` times finer (``carry_factor``), so that boundary motion
    below half a pixel per slice adds up (the prior-channel path, ``_predict_carried``, carries
    on the slice grid). The registrations depend on the images only, so they run in
    ``registration_workers`` threads while the network predicts the same window (in turn, before
    it, when torch is limited to one thread: ``registration_pool``). They cover a
    crop around the window guide's mask (padded by half its size, like ``track``); outside it
    the probability is ``(1 - w) * network``. Queries that are not a run of consecutive slices
    walked away from the guide (a forward-backward check) are registered to the guide directly.
    A network with a prior channel gets each query's carried mask as its prior when
    ``query_prior`` is "carried" (``_predict_carried``), else the guide's mask.

    Where the object ends is decided by the network's object-present output and, with
    ``intensity_gate`` on, by the drift test of each fused region against the reference region
    (``gate_reference``: "prompt", "guide" or "both", the lower score of the two counting),
    reported as ``SlicePrediction.drift``: at w = 0.5
    the fused mask keeps the warped interior whatever the network says, so without it a walk
    that slipped into similar-looking tissue could only be ended by the presence output.
    """

    presence_by = "network"  # its "presence" stops are the network's object-present output

    # TrackPredictor options overriding the checkpoint's registration_max_side/_iterations.
    registration_options: dict = {}
    registration_workers: int = 2
    # The drift test's smallest robust SD, as a fraction of the slice's 1-99 % range
    # (IntensityGate.from_prompt); label_images widens it for images normalised one by one.
    gate_sd_floor: float = 0.02
    # The drift test's window: the reference region's 1-99 % range widened by gate_k / 2 robust SDs.
    gate_k: float = 2.0

    def __init__(self, model, intensity_gate: bool | None = None, registration_weight: float | None = None,
                 gate_reference: str | None = None, query_prior: str | None = None):
        self.model = model
        if not hasattr(model, "inference") or not hasattr(model, "preprocessing"):
            raise InputError(f"PAMPredictor needs a PAMModel (load_model()), got {type(model).__name__}")
        inf = model.inference
        # A prior-channel network's prior for each query (checkpoints.QUERY_PRIORS); "carried" runs
        # the registration even at registration_weight 0 and predicts a window's slices in turn.
        self.query_prior = inf.query_prior if query_prior is None else query_prior
        if self.query_prior not in QUERY_PRIORS:
            raise InputError(f"query_prior must be one of {', '.join(QUERY_PRIORS)}, got {self.query_prior!r}")
        # The classical drift test (PAMSegmentLib.baselines.IntensityGate) on top of the network's
        # own presence: a slice whose predicted (fused) region no longer looks like the reference
        # region's intensity ends the walk. The reference is the drawn slice's region ("prompt": the
        # walk's own drawn slice), the window's guide region ("guide") or both ("both": ends where
        # either fails). Default: what the checkpoint's inference parameters say.
        if not (intensity_gate is None or is_flag(intensity_gate)):  # text: "off" would be True
            raise InputError(f"intensity_gate must be True, False or None (the checkpoint's setting), got "
                             f"{intensity_gate!r}; the command line's 'off' is False")
        self.intensity_gate = inf.intensity_gate if intensity_gate is None else bool(intensity_gate)
        self.gate_reference = inf.intensity_gate_reference if gate_reference is None else gate_reference
        self._gate_reference_given = gate_reference is not None  # (label_images keeps a reference asked for)
        if self.gate_reference not in GATE_REFERENCES:
            raise InputError(f"gate_reference must be one of {', '.join(GATE_REFERENCES)}, got {self.gate_reference!r}")
        self.gate = None
        self._guide_gates: dict = {}
        self.window_mm, self.max_window, self.min_window = inf.window_mm, inf.max_window, inf.min_window
        self.threshold, self.presence_threshold = inf.threshold, inf.presence_threshold
        self.min_area_fraction, self.min_area_px = inf.min_area_fraction, inf.min_area_px
        self.consistency_min_dice = inf.consistency_min_dice
        self.through_plane_mm = float(inf.through_plane_mm)
        self.keyframe_outward_min_agreement = inf.keyframe_outward_min_agreement
        self.window_outlier_share = float(inf.window_outlier_share)  # (an attribute: validate.py's pam+outN)
        self.published_scheme = bool(inf.published_scheme)  # the walk (the engine reads it)
        # ... and the authors' crop resizing and scale fusion, which a predictor that walks as the
        # engine does (MemoryPAMPredictor) keeps for their network
        self.authors_preprocessing = bool(inf.published_scheme)
        # InferenceParams.registration_carry_supersample (an attribute: validate.py may override it).
        self.carry_supersample = int(inf.registration_carry_supersample)
        # The network crop's side as a multiple of the guide mask's larger extent (None: the
        # checkpoint's PreprocessingParams.crop_scale; an attribute: validate.py may override it).
        self.crop_scale: float | None = None
        # Where the network's intensity window comes from: "prompt" (the first drawn slice's region,
        # for every walk), "origin" (the drawn slice each walk started from: with several keyframes
        # of different brightness each walk keeps its own) or "guide" (each window's guide slice
        # and mask, as training samples are built). The registration keeps the first drawn slice's.
        # An attribute: validate.py may override it.
        self.network_window: str = "prompt"
        # Which drawn slice ``begin`` takes (the window above, the drift test's first statistics) when
        # there are several: "lowest-sizable", the first along the axis that holds at least a quarter of
        # the largest drawn slice's voxels (since session 45: a correction of an object's 2-voxel tip
        # below the drawn slice gave every walk a window from 2 voxels, Dice 0.798 -> 0.418, 0.795 with
        # the volume flipped; validation unchanged, README ablations), "lowest" (before) or "largest".
        # An attribute: validate.py may override it.
        self.begin_keyframe: str = "lowest-sizable"
        w = inf.registration_weight if registration_weight is None else registration_weight
        if isinstance(w, (str, bytes, bool)) or not is_number(w, 0.0, 1.0):
            raise InputError(f"registration_weight must be within [0, 1], got {w!r}"
                             + (" (text or a bool: give a number)" if isinstance(w, (str, bytes, bool)) else ""))
        self.registration_weight = float(w)
        self.registration = None
        self.window: IntensityWindow | None = None
        self._guide_cache: dict | None = None
        self._chain: tuple | None = None  # (guide, last query, its fused mask crop, crop) of the last window

    def forget_walk(self) -> None:
        self._chain = None

    def begin(self, volume, prompt_index, prompt_mask):
        self.window = intensity_window(volume[prompt_index], prompt_mask, self.model.preprocessing,
                                       self.window_outlier_share)
        self._drawn_windows = {int(prompt_index): self.window}  # drawn slice -> its window
        self._walk_origins: dict[int, int] = {}  # predicted slice -> the drawn slice its walk started from
        self._guide_cache = None
        self._chain = None
        self.registration = None
        if self.registration_weight > 0 or self._carried_prior:
            from .baselines import TrackPredictor

            inf = self.model.inference
            options = {"max_side": inf.registration_max_side, "iterations": inf.registration_iterations,
                       "coarse_iterations": inf.registration_coarse_iterations}
            self.registration = TrackPredictor(**{**options, **self.registration_options})
        self._guide_gates = {}
        self.gate = None
        if self.intensity_gate:
            from .baselines import IntensityGate

            self.gate = IntensityGate.from_prompt(_smoothed(volume[prompt_index]), prompt_mask,
                                                  k=self.gate_k, sd_floor=self.gate_sd_floor, raw=volume[prompt_index])
        self._origin_gates = {int(prompt_index): self.gate}  # drawn slice -> its drift-test statistics

    @property
    def begin_state(self):
        """What ``begin`` took from the drawn slice (intensity window, drift-test statistics): an
        update may reuse walks only when it begins the same (``propagate``'s ``previous=``)."""
        window = None if self.window is None else (float(self.window.low), float(self.window.high))
        gate = None if self.gate is None else (self.gate.median, self.gate.sd, self.gate.low, self.gate.high)
        return window, gate

    @property
    def _carried_prior(self) -> bool:
        return bool(self.model.config.mask_prior) and self.query_prior == "carried"

    def _reference_gate(self, volume, guide_index, guide_mask):
        """The drift test's reference statistics: the prompt's, or the guide region's (cached per guide)."""
        if self.gate_reference == "prompt":
            return self.gate
        from .baselines import IntensityGate

        mask = np.asarray(guide_mask, dtype=bool)
        key = (int(guide_index), hash(mask.tobytes()))
        if key not in self._guide_gates:
            if len(self._guide_gates) >= 4:  # a walk uses at most a few guides at a time
                self._guide_gates.pop(next(iter(self._guide_gates)))
            self._guide_gates[key] = IntensityGate.from_prompt(_smoothed(volume[guide_index]), mask, k=self.gate_k,
                                                               sd_floor=self.gate_sd_floor, raw=volume[guide_index]) \
                if mask.any() else self.gate
        return self._guide_gates[key]

    def _walk_origin(self, guide_index, query_indices) -> int:
        """The drawn slice the walk predicting ``query_indices`` from ``guide_index`` started from
        (a guide no walk predicted is a drawn slice: a walk starts there), recorded for the queries."""
        origin = self._walk_origins.get(int(guide_index), int(guide_index))
        for q in query_indices:
            self._walk_origins[int(q)] = origin
        return origin

    def _origin_gate(self, volume, guide_index, guide_mask, query_indices):
        """The drift test's statistics of the drawn slice the walk predicting ``query_indices``
        started from (a guide no walk predicted is a drawn slice: with several keyframes, each
        walk is tested against its own)."""
        from .baselines import IntensityGate

        origin = self._walk_origin(guide_index, query_indices)
        if origin not in self._origin_gates:
            mask = np.asarray(guide_mask, dtype=bool)
            self._origin_gates[origin] = IntensityGate.from_prompt(
                _smoothed(volume[origin]), mask, k=self.gate_k, sd_floor=self.gate_sd_floor, raw=volume[origin]) \
                if origin == int(guide_index) and mask.any() else self.gate
        return self._origin_gates[origin]

    def _gated(self, volume, guide_index, guide_mask, query_indices, out: SlicePrediction) -> SlicePrediction:
        """``out`` with the drift test's scores (``SlicePrediction.drift``: the engine ends the walk
        where they fall below the presence threshold, as for the presence itself)."""
        if self.gate is None:
            return out
        references = [self._reference_gate(volume, guide_index, guide_mask)]
        if self.gate_reference == "both":  # and against the drawn slice: a slow slide the guide follows
            references.append(self._origin_gate(volume, guide_index, guide_mask, query_indices))
        drift = self._gate_scores(volume, list(query_indices), out.prob, references)
        return SlicePrediction(out.prob, out.presence, drift, out.agreement)

    def _gate_scores(self, volume, query_indices, prob, references) -> np.ndarray:
        """Per query, the lowest drift score of its region against ``references`` (the region's
        smoothed values taken once)."""
        scores = np.zeros(len(query_indices), dtype=np.float32)
        for n, q in enumerate(query_indices):
            region = prob[n] >= self.threshold
            if region.any():
                rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
                sl = (slice(max(rows[0] - 2, 0), rows[-1] + 3), slice(max(cols[0] - 2, 0), cols[-1] + 3))
                values = _smoothed(volume[q][sl])[region[sl]]
                scores[n] = min(reference.score(values) for reference in references)
        return scores

    def predict(self, volume, guide_index, guide_mask, query_indices):
        queries = [int(q) for q in query_indices]
        plan = self._registration_plan(int(guide_index), guide_mask, queries) if self.registration else None
        if plan is None:
            return self._gated(volume, guide_index, guide_mask, queries,
                               self._predict_network(volume, guide_index, guide_mask, queries))
        # Each slice is smoothed, windowed and put on the registration's grids once, though a chain
        # uses it as fixed and as moving (the grids in whichever registration thread needs them first).
        prepared = {k: self._prepared(volume, plan.crop, k) for pair in plan.pairs for k in pair}
        pyramids: dict[int, list] = {}
        locks = {k: threading.Lock() for k in prepared}

        def pyramid(k):
            with locks[k]:
                if k not in pyramids:
                    pyramids[k] = self.registration.pyramid(prepared[k])
                return pyramids[k]

        def register(f, m):
            return self.registration.register_pyramids(pyramid(f), pyramid(m))

        with registration_pool(self.registration_workers) as pool:
            futures = [pool.submit(register, f, m) for f, m in plan.pairs]
            if self._carried_prior:
                # The network needs each slice's carried mask: the slices in turn, each as soon as its
                # registration is done (the later ones keep running in the pool meanwhile).
                return self._gated(volume, guide_index, guide_mask, queries,
                                   self._predict_carried(volume, plan, [f.result for f in futures], int(guide_index),
                                                         guide_mask, queries))
            out = self._predict_network(volume, guide_index, guide_mask, queries)
            transforms = [f.result() for f in futures]
        # The drift test looks at the fused region: the mask the walk actually carries on.
        return self._gated(volume, guide_index, guide_mask, queries,
                           self._fuse(out, plan, transforms, int(guide_index), queries))

    def _registration_plan(self, guide_index, guide_mask, queries) -> _RegistrationPlan | None:
        from .baselines import _crop_around

        def walks(start: int) -> bool:  # queries = start+d, start+2d, ... for d = +1 or -1
            d = queries[0] - start
            return abs(d) == 1 and all(b - a == d for a, b in zip(queries, queries[1:]))

        chain = self._chain
        if walks(guide_index):
            crop = _crop_around(np.asarray(guide_mask, dtype=bool), self.registration.pad, 8)
            if crop is None:
                return None
            start_index, start = guide_index, np.asarray(guide_mask, dtype=bool)[crop]
        elif (chain is not None and chain[0] == guide_index and walks(chain[1])
              and (queries[0] - chain[1]) * (chain[1] - guide_index) > 0):
            # The next batch of the same window: carry on from its last fused slice.
            start_index, start, crop = chain[1], chain[2], chain[3]
        else:
            crop = _crop_around(np.asarray(guide_mask, dtype=bool), self.registration.pad, 8)
            if crop is None:
                return None
            return _RegistrationPlan(crop, [(q, guide_index) for q in queries], False,
                                     np.asarray(guide_mask, dtype=bool)[crop])
        previous = [start_index] + queries[:-1]
        return _RegistrationPlan(crop, list(zip(queries, previous)), True, start)

    def _prepared(self, volume, crop, index) -> np.ndarray:
        """A slice's crop as the registration sees it: smoothed, in PAM's window, scaled to [0, 1]."""
        low, high = self.window.low, self.window.high
        arr = _smoothed(volume[index][crop])
        width = high - low  # never 0 (intensity_window widens a flat region), at any scale of the image's values
        return np.clip((arr - low) / (width if width > 0 else 1.0), 0.0, 1.0).astype(np.float32)

    def _fuse(self, out: SlicePrediction, plan: _RegistrationPlan, transforms, guide_index, queries) -> SlicePrediction:
        w = self.registration_weight
        warp = self.registration.warp
        prob = np.asarray(out.prob, dtype=np.float32)  # the network's fresh output: scaled in place
        # Where the network and the registration follow the same object (Dice of their masks; a
        # slice with nothing left to carry agrees 0).
        agreement = np.zeros(len(queries), dtype=np.float32)
        net_area = (prob >= self.threshold).sum(axis=(1, 2))
        crop_net = prob[(slice(None), *plan.crop)] >= self.threshold
        prob *= 1.0 - w
        s = carry_factor(self.carry_supersample, crop_net.shape[1:])
        carried = plan.start_mask
        if s > 1 and carried.shape == crop_net.shape[1:]:
            carried = _upsample(carried, s)
        for n, transform in enumerate(transforms):
            if not carried.any():  # nothing left to carry: the rest is the network's share alone
                break
            if s > 1:
                # The fine warp where the carried mask can reach (0 elsewhere), its edges on whole pixels.
                fine, (r0, c0) = self.registration.warp_region(transform, carried, s)
                part = (slice(r0 // s, (r0 + fine.shape[0]) // s), slice(c0 // s, (c0 + fine.shape[1]) // s))
                warped = np.zeros(crop_net.shape[1:], np.float32)
                warped[part] = _block_mean(fine, s)
            else:
                warped = warp(transform, carried)
            wm = warped >= 0.5
            agreement[n] = 2.0 * np.count_nonzero(crop_net[n] & wm) / max(int(net_area[n]) + np.count_nonzero(wm), 1)
            if plan.chained and s > 1:
                # The fused decision on the fine grid: the network's share repeated onto the sub-pixels
                # plus the fine warp (outside the warped part, the network's share alone).
                base = prob[n][plan.crop]
                carried = _upsample(base >= self.threshold, s)
                carried[r0:r0 + fine.shape[0], c0:c0 + fine.shape[1]] = \
                    (_upsample(base[part], s) + w * fine) >= self.threshold
            prob[n][plan.crop] += w * warped
            if plan.chained and s == 1:
                carried = prob[n][plan.crop] >= self.threshold
        if plan.chained:
            self._chain = (guide_index, queries[-1], carried, plan.crop)
        return SlicePrediction(prob, out.presence, agreement=agreement)

    def _predict_carried(self, volume, plan: _RegistrationPlan, transforms, guide_index, guide_mask,
                         queries) -> SlicePrediction:
        """A prior-channel network fed each query's carried mask: the previous slice's final (fused)
        mask warped onto it (or, for queries that are not a walk, the guide's mask warped onto it),
        then fused with that warp at ``registration_weight`` as in ``_fuse``. ``transforms``: one
        zero-argument callable per query returning its registration (a future's ``result``)."""
        w = self.registration_weight
        n_q = len(queries)
        shape = volume.shape[1:]
        prob = np.zeros((n_q, *shape), dtype=np.float32)
        presence = np.zeros(n_q, dtype=np.float32) if self.model.config.presence_head else None
        agreement = np.zeros(n_q, dtype=np.float32)
        carried = plan.start_mask
        for n, (q, transform) in enumerate(zip(queries, transforms)):
            source = carried if plan.chained else plan.start_mask
            warped = self.registration.warp(transform(), source) if source.any() else np.zeros(source.shape, np.float32)
            prior = np.zeros((1, *shape), dtype=np.float32)
            prior[0][plan.crop] = warped >= 0.5
            out = self._predict_network(volume, guide_index, guide_mask, [q], prior)
            p = np.asarray(out.prob[0], dtype=np.float32) * (1.0 - w)
            agreement[n] = _dice(out.prob[0] >= self.threshold, prior[0] > 0)
            p[plan.crop] += w * warped
            prob[n] = p
            if presence is not None:
                presence[n] = out.presence[0]
            carried = p[plan.crop] >= self.threshold
        if plan.chained:
            self._chain = (guide_index, queries[-1], carried, plan.crop)
        return SlicePrediction(prob, presence, agreement=agreement)

    @torch.inference_mode()
    def _predict_network(self, volume, guide_index, guide_mask, query_indices, priors=None):
        """The network's probabilities for ``query_indices``; ``priors`` (N, H, W) are the queries'
        prior masks for a prior-channel network (default: the guide's mask)."""
        pre = self.model.preprocessing
        size, device = pre.input_size, self.model.device
        box = crop_box_for_mask(guide_mask, pre if self.crop_scale is None else replace(pre, crop_scale=self.crop_scale))
        stage = self.model.network.proposing_stage
        antialias = not self.authors_preprocessing  # the authors resize crops without antialiasing
        # Successive batches of a window share their guide: encode it once.
        origin = None
        if self.network_window == "origin":
            origin = self._walk_origin(guide_index, query_indices)
            if origin not in self._drawn_windows and np.any(guide_mask):
                self._drawn_windows[origin] = intensity_window(volume[guide_index], guide_mask, pre,
                                                               self.window_outlier_share)
        key = (guide_index, box, guide_mask.tobytes().__hash__(), origin)
        cache = self._guide_cache if self._guide_cache is not None else {}
        if key not in cache:
            window = self.window
            if self.network_window == "guide" and np.any(guide_mask):
                window = intensity_window(volume[guide_index], guide_mask, pre, self.window_outlier_share)
            elif origin is not None:
                window = self._drawn_windows.get(origin, self.window)
            g_img = crop_slices(volume[guide_index][None], box, size, window, antialias=antialias).to(device)
            g_mask = crop_slices(guide_mask[None], box, size, is_mask=True).to(device)
            if len(cache) >= 4:  # a walk uses at most a few guides at a time
                cache.pop(next(iter(cache)))
            cache[key] = (stage.encode_guide(g_img, g_mask), g_mask, window)
        self._guide_cache = cache
        (keys, values), g_mask, window = cache[key]
        queries = crop_slices(volume[list(query_indices)], box, size, window, antialias=antialias).to(device)
        prior = None
        if priors is not None and self.model.config.mask_prior:
            prior = crop_slices(np.asarray(priors, dtype=np.float32), box, size, is_mask=True).to(device)[None]
        out = stage.decode_queries(queries[None], keys, values, g_mask, prior)
        prob = fuse_scales(out.logits, size, align_corners=self.authors_preprocessing).float().cpu()
        presence = torch.sigmoid(out.presence).float().cpu().numpy() if out.presence is not None else None
        if not bool(torch.isfinite(prob).all()) or (presence is not None and not np.isfinite(presence).all()):
            # The inputs are finite and windowed to [-1, 1]: finite weights whose values overflow.
            raise CheckpointError(f"the network's output is not finite (NaN or inf) on slice {query_indices[0]}: the "
                                  f"checkpoint {self.model.source} holds weights that overflow; use another checkpoint")
        return SlicePrediction(uncrop_probability(prob, box, volume.shape[1:]), presence)


class MemoryPAMPredictor(PAMPredictor):
    """PAM with a small memory bank (in the spirit of Medical SAM 2 and SAM2-ProMem).

    Each query slice is predicted from the current guide *and* from earlier guides of the same
    walk: the drawn slice the walk started from and the ``memory - 1`` most recent guides before
    the current one. The probabilities (and presence) are fused with weight ``current_weight``
    for the current guide and the rest shared equally, so a guide that drifted is pulled back
    towards what earlier, more trustworthy slices say. Costs up to ``memory + 1`` network passes
    per slice. Selected with ``get_predictor("pam-memory")``; see the README's ablation.
    """

    def __init__(self, model, memory: int = 2, current_weight: float = 0.5):
        # The memory bank fuses several guides' network predictions; no registration fusion.
        super().__init__(model, registration_weight=0.0)
        # Back-predictions would enter the memory bank as guides: the check is for the plain walk.
        self.consistency_min_dice = 0.0
        # The bank keeps the guides of a one-way walk: the authors' walk, whose guides also vote
        # behind them, would feed it slices out of order; it walks as the engine does (the network
        # still sees its input as the checkpoint's scheme says: authors_preprocessing).
        self.published_scheme = False
        self.memory = memory
        self.current_weight = current_weight
        self._predicted: set[int] = set()
        self._history: list[tuple[int, "object"]] = []

    def begin(self, volume, prompt_index, prompt_mask):
        super().begin(volume, prompt_index, prompt_mask)
        self._predicted = set()
        self._history = []

    def _predict_from(self, volume, guide_index, guide_mask, query_indices):
        return PAMPredictor._predict_network(self, volume, guide_index, guide_mask, query_indices)

    def predict(self, volume, guide_index, guide_mask, query_indices):
        if guide_index not in self._predicted:  # a drawn slice: a new walk starts here
            self._history = [(guide_index, guide_mask.copy())]
        elif self._history[-1][0] != guide_index:
            self._history.append((guide_index, guide_mask.copy()))
        current = self._history[-1]
        others = [self._history[0]] + self._history[-self.memory:-1]
        seen, guides = {current[0]}, []
        for idx, mask in others:
            if idx not in seen:
                seen.add(idx)
                guides.append((idx, mask))
        out = self._predict_from(volume, current[0], current[1], query_indices)
        if guides:
            w_other = (1.0 - self.current_weight) / len(guides)
            prob = out.prob * self.current_weight
            pres = None if out.presence is None else out.presence * self.current_weight
            for idx, mask in guides:
                o = self._predict_from(volume, idx, mask, query_indices)
                prob = prob + w_other * o.prob
                if pres is not None:
                    pres = pres + w_other * o.presence
            out = SlicePrediction(prob, pres)
        self._predicted.update(int(q) for q in query_indices)
        return self._gated(volume, current[0], current[1], query_indices, out)
