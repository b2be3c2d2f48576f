"""PAM-style training samples: a guiding slice with its mask and several query slices.

A sample is built exactly as inference sees it (``PAMSegmentLib.preprocess``): intensity window
from the guide's mask region, square crop around the guide's mask, resize. On top of that:

* queries at distances 1..Z from the guide along a random axis (volumes are resliced along all
  three axes), with slices beyond the object's end oversampled, so the network (and its
  object-present head) learns where an object stops;
* SAM2-ProMem's stochastic propagation: when the object has several 2D parts on the guide, keep
  one part and, on the queries, only what is 3D-connected to it between guide and query;
* imperfect guides (eroded, dilated, shifted masks) and *rollouts* (the trainer predicts a relay
  slice from the guide and uses its own prediction as the next guide) so the network learns to
  recover from drift instead of only copying perfect guides;
* crop jitter, window jitter, flips/rotations and intensity augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cc3d
import numpy as np
import scipy.ndimage as ndi
import torch

from ..preprocess import CropBox, PreprocessingParams, crop_box_for_mask, crop_slices, intensity_window

__all__ = ["Case", "SampleConfig", "SampleBatch", "make_batch", "sample_guide_queries"]


@dataclass
class Case:
    """One training volume: image, label map, spacing (k, j, i) and the label ids to train on."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    train_labels: list[int]
    weight: float = 1.0

    def __post_init__(self):
        objs = ndi.find_objects(self.labels.astype(np.int32))
        self.boxes = {}
        for lab in self.train_labels:
            if lab - 1 < len(objs) and objs[lab - 1] is not None:
                box = objs[lab - 1]
                extents = [s.stop - s.start for s in box]
                if min(extents) >= 2:
                    self.boxes[lab] = box
        self.usable = sorted(self.boxes)


@dataclass(frozen=True)
class SampleConfig:
    preprocessing: PreprocessingParams
    n_queries: int = 4
    window_mm: float = 20.0
    max_window: int = 12
    p_beyond_end: float = 0.25  # a query placed past the object's end (empty target)
    p_keep_one_part: float = 0.5  # SAM2-ProMem: keep one 2D part of a split guide mask
    p_guide_noise: float = 0.3  # erode / dilate / shift the guide mask
    crop_scale_range: tuple[float, float] = (1.25, 2.2)
    crop_shift: float = 0.15  # fraction of the crop side
    window_jitter: float = 0.1  # fraction of the window width
    # Modality randomisation: with this probability the windowed intensities go through a random
    # non-monotone piecewise-linear transfer function (the same for guide and queries), so a
    # CT-trained boundary follower also meets MR-like contrast orders (bright fluid, dark bone).
    p_remap: float = 0.0
    # For networks with a prior channel (``PAMConfig.mask_prior``): each query (and the relay)
    # also gets a simulated *carried* mask, the origin's mask as a slice-to-slice registration
    # might have moved it onto that slice (see ``carried_prior``). Off: no priors (the network
    # then uses the guide mask itself as every query's prior).
    simulate_priors: bool = False
    p_prior_unmoved: float = 0.2  # the carried mask is the origin's mask, not moved at all
    p_prior_noise: float = 0.3  # erode / dilate / shift the carried mask as well


@dataclass
class SampleBatch:
    guide_image: torch.Tensor  # (G, 1, S, S)
    guide_mask: torch.Tensor  # (G, 1, S, S)
    relay_image: torch.Tensor | None  # (G, 1, S, S) slice predicted first in a rollout
    query_images: torch.Tensor  # (G, N, 1, S, S)
    query_masks: torch.Tensor  # (G, N, S, S) float {0, 1}
    present: torch.Tensor  # (G, N) float {0, 1}
    query_priors: torch.Tensor | None = None  # (G, N, 1, S, S) simulated carried masks
    relay_prior: torch.Tensor | None = None  # (G, 1, S, S) the relay slice's carried mask


def _take(arr: np.ndarray, axis: int, idx) -> np.ndarray:
    return np.take(arr, idx, axis=axis)


def _perturb_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3)
    r = int(rng.integers(1, 4))
    if kind == 0:
        out = ndi.binary_erosion(mask, iterations=r)
        return out if out.any() else mask
    if kind == 1:
        return ndi.binary_dilation(mask, iterations=r)
    return np.roll(mask, (int(rng.integers(-r, r + 1)), int(rng.integers(-r, r + 1))), axis=(0, 1))


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean signed distance in px: negative inside ``mask``, positive outside."""
    return (ndi.distance_transform_edt(~mask) - ndi.distance_transform_edt(mask)).astype(np.float32)


def carried_prior(origin: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                  p_unmoved: float = 0.2, p_noise: float = 0.3) -> np.ndarray:
    """A mask as slice-to-slice registration might carry ``origin`` onto a slice whose object is
    ``target``: moved only part of the way (the signed-distance morph ``(1 - a) * d_target + a *
    d_origin`` with a lag ``a`` drawn uniformly in [0, 1]), or not at all (probability
    ``p_unmoved``, and always where the slice holds no object: the network must learn to end the
    object whatever the carried mask says), then with probability ``p_noise`` eroded, dilated or
    shifted by 1-3 px. Both masks are 2D bool arrays of the same shape."""
    origin = np.asarray(origin, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if not target.any() or not origin.any() or rng.random() < p_unmoved:
        prior = origin.copy()
    else:
        lag = float(rng.uniform(0.0, 1.0))
        prior = (1.0 - lag) * _signed_distance(target) + lag * _signed_distance(origin) < 0
    if prior.any() and rng.random() < p_noise:
        prior = _perturb_mask(prior, rng)
    return prior


def _window_size(spacing_axis: float, cfg: SampleConfig) -> int:
    return int(max(1, min(int(cfg.window_mm / max(spacing_axis, 1e-3)), cfg.max_window)))


def sample_guide_queries(case: Case, rng: np.random.Generator, cfg: SampleConfig, rollout: bool):
    """One guide + N queries (+ a relay slice for rollouts) as cropped, resized tensors."""
    lab = int(rng.choice(case.usable))
    box3 = case.boxes[lab]
    axis = int(rng.integers(3))
    a, b = box3[axis].start, box3[axis].stop - 1  # object's extent along the axis
    n_axis = case.image.shape[axis]
    z = _window_size(case.spacing[axis], cfg)
    guide = int(rng.integers(a, b + 1))
    direction = int(rng.choice([-1, 1]))
    if (b - guide if direction > 0 else guide - a) == 0:
        direction = -direction  # the guide sits on the object's end: propagate inwards

    relay = None
    origin = guide
    if rollout:
        # The relay slice lies inside the object; queries are placed relative to it.
        d1 = int(rng.integers(1, z + 1))
        relay = int(np.clip(guide + direction * d1, a, b))
        if relay == guide:
            relay = None
        else:
            origin = relay
    queries = []
    for _ in range(cfg.n_queries):
        if rng.random() < cfg.p_beyond_end:
            end = b if direction > 0 else a
            q = end + direction * int(rng.integers(1, max(2, z // 2 + 1)))
        else:
            # Inside the object (the window's natural overshoot past the end is covered above).
            room = (b - origin) if direction > 0 else (origin - a)
            q = origin + direction * int(rng.integers(1, max(1, min(z, room)) + 1))
        queries.append(int(np.clip(q, 0, n_axis - 1)))
    queries.sort(key=lambda q: abs(q - origin))

    # Work on the object's in-plane bounding region only (plus margin for the crop).
    in_plane = [ax for ax in range(3) if ax != axis]
    guide_lab = _take(case.labels, axis, guide)
    guide_mask = guide_lab == lab
    if not guide_mask.any():
        return None
    parts, n_parts = ndi.label(guide_mask)
    keep_one = n_parts > 1 and rng.random() < cfg.p_keep_one_part
    if keep_one:
        sizes = ndi.sum(guide_mask, parts, index=range(1, n_parts + 1))
        choice = int(rng.choice(n_parts, p=sizes / sizes.sum())) + 1
        guide_mask = parts == choice

    params = cfg.preprocessing
    scale = float(rng.uniform(*cfg.crop_scale_range))
    box = crop_box_for_mask(guide_mask, replace(params, crop_scale=scale))
    shift = cfg.crop_shift * box.side
    box = CropBox(box.row0 + int(rng.uniform(-shift, shift)), box.col0 + int(rng.integers(-shift, shift + 1)), box.side)

    slice_ids = [guide] + ([relay] if relay is not None else []) + queries
    lo_s, hi_s = min(slice_ids), max(slice_ids)
    # The slab between the extreme slices, restricted to the crop region, in (axis, row, col) order.
    r0, c0 = max(box.row0, 0), max(box.col0, 0)
    r1 = min(box.row0 + box.side, case.image.shape[in_plane[0]])
    c1 = min(box.col0 + box.side, case.image.shape[in_plane[1]])
    index = [slice(None)] * 3
    index[axis] = slice(lo_s, hi_s + 1)
    index[in_plane[0]] = slice(r0, r1)
    index[in_plane[1]] = slice(c0, c1)
    slab_lab = np.moveaxis(case.labels[tuple(index)], axis, 0)
    slab_img = np.moveaxis(case.image[tuple(index)], axis, 0).astype(np.float32)
    slab_mask = slab_lab == lab
    if keep_one:
        # Only what is 3D-connected to the kept part counts as the object on the queries.
        seed = np.zeros_like(slab_mask)
        seed[guide - lo_s] = guide_mask[r0:r1, c0:c1]
        slab_mask[guide - lo_s] = seed[guide - lo_s]
        cc = cc3d.connected_components(slab_mask.astype(np.uint8), connectivity=26)
        ids = np.unique(cc[seed])
        slab_mask = np.isin(cc, ids[ids != 0])

    # Back to full-slice coordinates for the crop functions: place the region in a box-sized frame.
    local = CropBox(box.row0 - r0, box.col0 - c0, box.side)
    g_mask_local = guide_mask[r0:r1, c0:c1]
    if rng.random() < cfg.p_guide_noise:
        g_mask_local = _perturb_mask(g_mask_local, rng)
        if not g_mask_local.any():
            g_mask_local = guide_mask[r0:r1, c0:c1]
    window = intensity_window(slab_img[guide - lo_s], g_mask_local, params)
    width = window.high - window.low
    window = type(window)(window.low + rng.uniform(-1, 1) * cfg.window_jitter * width,
                          window.high + rng.uniform(-1, 1) * cfg.window_jitter * width)
    if window.high - window.low < 1e-6:
        return None

    size = params.input_size
    g_img = crop_slices(slab_img[[guide - lo_s]], local, size, window)
    g_msk = crop_slices(g_mask_local[None], local, size, is_mask=True)
    q_idx = [q - lo_s for q in queries]
    q_img = crop_slices(slab_img[q_idx], local, size, window)
    q_msk = crop_slices(slab_mask[q_idx], local, size, is_mask=True)[:, 0]
    r_img = crop_slices(slab_img[[relay - lo_s]], local, size, window) if relay is not None else None
    if not cfg.simulate_priors:
        return g_img, g_msk, r_img, q_img, q_msk, None, None
    # Carried masks: from the guide's (possibly perturbed) mask onto the relay, and from the relay's
    # mask (or the guide's) onto each query. The relay's true mask stands in for the network's
    # prediction of it, which the trainer makes later.
    origin = slab_mask[relay - lo_s] if relay is not None else g_mask_local
    if not origin.any():
        origin = g_mask_local
    q_pri = np.stack([carried_prior(origin, slab_mask[i], rng, cfg.p_prior_unmoved, cfg.p_prior_noise)
                      for i in q_idx])
    q_pri = crop_slices(q_pri, local, size, is_mask=True)
    r_pri = None
    if relay is not None:
        r_pri = crop_slices(carried_prior(g_mask_local, slab_mask[relay - lo_s], rng, cfg.p_prior_unmoved,
                                          cfg.p_prior_noise)[None], local, size, is_mask=True)
    return g_img, g_msk, r_img, q_img, q_msk, q_pri, r_pri


def _augment(tensors: list[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """Same flip/rot90 for every tensor of a sample (spatial dims last two)."""
    k = int(rng.integers(4))
    flip = rng.random() < 0.5
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return out


def random_transfer(u: torch.Tensor, rng: np.random.Generator, n_knots: tuple[int, int] = (3, 6)) -> torch.Tensor:
    """A random piecewise-linear map [0, 1] -> [0, 1] through 3-6 random knots (non-monotone in
    general, so contrast order between tissues can flip), applied elementwise to ``u``."""
    n = int(rng.integers(n_knots[0], n_knots[1] + 1))
    xs = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, n - 2)), [1.0]])
    ys = rng.uniform(0, 1, n)
    flat = np.interp(u.clamp(0, 1).numpy().ravel(), xs, ys)
    return torch.from_numpy(flat.astype(np.float32)).reshape(u.shape)


def _intensity_aug(x: torch.Tensor, rng: np.random.Generator, p_remap: float = 0.0) -> torch.Tensor:
    """Optional random transfer function, then gamma, contrast and noise in the windowed [-1, 1]
    space. ``rng`` is seeded per sample, so guide and queries get the same transform."""
    u = (x + 1) / 2
    if p_remap > 0 and rng.random() < p_remap:
        u = random_transfer(u, rng)
    u = u.clamp(0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
    x = u * 2 - 1
    x = x * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
    if rng.random() < 0.5:
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * float(rng.uniform(0, 0.1))
    return x


def make_batch(cases: list[Case], case_weights: np.ndarray, rng: np.random.Generator, cfg: SampleConfig,
               n_guides: int, rollout: bool) -> SampleBatch:
    """G guides, each with N queries, from cases drawn with ``case_weights``."""
    g_imgs, g_msks, r_imgs, q_imgs, q_msks, q_pris, r_pris = [], [], [], [], [], [], []
    while len(g_imgs) < n_guides:
        case = cases[int(rng.choice(len(cases), p=case_weights))]
        if not case.usable:
            continue
        s = sample_guide_queries(case, rng, cfg, rollout)
        if s is None or (rollout and s[2] is None):
            continue
        g_img, g_msk, r_img, q_img, q_msk, q_pri, r_pri = _augment(list(s), rng)
        shared = rng.integers(2**31)
        # One intensity augmentation per sample, applied identically to guide, relay and queries.
        g_img = _intensity_aug(g_img, np.random.default_rng(shared), cfg.p_remap)
        q_img = _intensity_aug(q_img, np.random.default_rng(shared), cfg.p_remap)
        if r_img is not None:
            r_img = _intensity_aug(r_img, np.random.default_rng(shared), cfg.p_remap)
        g_imgs.append(g_img)
        g_msks.append(g_msk)
        r_imgs.append(r_img)
        q_imgs.append(q_img)
        q_msks.append(q_msk)
        q_pris.append(q_pri)
        r_pris.append(r_pri)
    q_masks = torch.stack(q_msks)
    return SampleBatch(
        guide_image=torch.cat(g_imgs),
        guide_mask=torch.cat(g_msks),
        relay_image=torch.cat(r_imgs) if rollout else None,
        query_images=torch.stack(q_imgs),
        query_masks=q_masks,
        present=(q_masks.flatten(2).amax(dim=2) > 0).float(),
        query_priors=torch.stack(q_pris) if cfg.simulate_priors else None,
        relay_prior=torch.cat(r_pris) if cfg.simulate_priors and rollout else None,
    )
