"""One-prompt labelling of a set of 2D images: the user labels one image, every other image of the
set gets the same structure(s).

Medical SAM 2 treats an unordered set of 2D images as a sequence and propagates through it. Here
the set is brought onto the prompt image's pixel grid (``to_common_grid``) and stacked, so that
any ``SlicePredictor`` of the 3D engine predicts an image from a labelled "guide" image exactly as
it predicts a slice from its guide slice (PAM: the network's prediction fused with the demons
registration of the guide onto the image). What differs from a volume is which image guides
which (``order``):

* ``"similar"`` (default): images are labelled nearest first. At every step the unlabelled image
  most similar to any image already labelled with the object (1 - normalised correlation of
  small thumbnails of the region around the prompt) is predicted from that image: a tree grown
  from the prompt (Prim's algorithm), so a chain of small steps reaches images that differ much
  from the prompt, and an image where the object came out absent never guides another.
* ``"prompt"``: every image is predicted from the prompt image itself (no error is carried
  over, but every step is as large as the set's differences).
* ``"given"``: the set's own order is a sequence (serial sections, frames): each image is
  predicted from its neighbour on the prompt's side, walking out from the prompt both ways.

Further labelled images (``more_prompts``, the command's ``--labelled``: e.g. masks corrected after a
first run) keep their masks and guide like the prompt image; a drawn mask without a label says
the object is absent there (it guides nothing for that label, and the "given" walks stop at it).

An image where the network's object-present output falls below its threshold, or where the mask
is smaller than the predictor's minimum area, is left empty for that label (some images of a set
may not hold the structure). Images are normalised one by one (0.5-99.5 percentiles to 0..1,
``normalize=True``) before stacking, because a set's images may come from different scanners or
exports whose grey values do not share a scale.

What this does not do: objects far from where the prompt's object lies (the network looks at a
crop around the guide's mask), and images whose aspect ratio differs much from the prompt's
(they are resized onto its grid, which distorts them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .checks import check_flag
from .errors import InputError, PropagationCancelled
from .propagate import (MAX_LABEL, CancelToken, _as_predictor, _check_prediction, _is_empty, _slice_confidence,
                        _stop_presence, _stop_reason, _walk_lock, check_progress_and_cancel, label_list,
                        torch_threads)

__all__ = ["ORDERS", "ImageSetResult", "label_images", "to_common_grid", "thumbnail_distances"]

ORDERS = ("similar", "prompt", "given")
THUMB = 32  # thumbnail side for the similarity of images


@dataclass
class ImageSetResult:
    masks: list[np.ndarray]  # per image, a label map on the image's own grid (prompt labels' values)
    labels: list[int]
    # label -> per image: the image that guided it (-1: the prompt itself / not predicted)
    guides: dict[int, np.ndarray] = field(default_factory=dict)
    # label -> per image: confidence in [0, 1] (mean probability inside the mask x the network's
    # object-present output; 1 on the prompt image; 0 where the object was found absent)
    confidence: dict[int, np.ndarray] = field(default_factory=dict)
    prompt_index: int = 0
    order: str = "similar"
    n_predicted: int = 0
    seconds: float = 0.0
    drawn: tuple[int, ...] = ()  # every image whose mask was given: the prompt and ``more_prompts``
    # label -> images found empty by the drift test alone (the network's object-present output said
    # present): most often images saved with another grey scale, window or size than their guide
    drift_emptied: dict[int, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        drawn = set(self.drawn) | {self.prompt_index}
        parts = []
        for lab in self.labels:
            found = sum(1 for i, m in enumerate(self.masks) if i not in drawn and (m == lab).any())
            parts.append(f"label {lab} found in {found} of {len(self.masks) - len(drawn)} images")
        return f"{'; '.join(parts)}; {self.n_predicted} predictions in {self.seconds:.1f} s"

    def check_first(self, n: int = 3) -> dict[int, list[int]]:
        """Per label, the ``n`` predicted images holding it with the lowest confidence (ties: the
        earlier image first): the masks to look at first, as propagate's least confident slices."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:  # (-1 gave all but the last one)
            raise InputError(f"n must be a whole number of images, 0 or more, got {n!r}")
        drawn = set(self.drawn) | {self.prompt_index}
        out = {}
        for lab in self.labels:
            conf = self.confidence.get(lab)
            held = [i for i, m in enumerate(self.masks) if i not in drawn and (m == lab).any()]
            if conf is not None and held:
                out[lab] = sorted(held, key=lambda i: (float(conf[i]), i))[:n]
        return out


def _as_2d(image, what: str) -> np.ndarray:
    from .checks import as_array

    arr = as_array(image, what, "PAMSegmentLib.volumes.read_image_2d(path)[0]")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2D image (rows, columns), got shape {arr.shape}; "
                         "a colour image must be converted to grey values first")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise InputError(f"{what} is {arr.shape[1]} x {arr.shape[0]} pixels (width x height); images need at least "
                         "8 x 8")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} must hold real grey values, got {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        # as propagate and label_cells refuse them (they were set to the image's minimum without a word:
        # an all-NaN image came back "not found"; a Python API trial, session 36)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"{what} holds {bad} NaN/inf pixel{'s' if bad != 1 else ''}; replace "
                         f"{'them' if bad != 1 else 'it'} with finite values (or leave the image out)")
    return arr


def _normalised(arr: np.ndarray) -> np.ndarray:
    from .volumes import float32_values

    a = float32_values(arr)[0]  # (float64 beyond float32's range: inf, numpy's warnings, the image "not found")
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.nanmin(np.where(finite, a, np.nan)) if finite.any() else 0.0)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    width = float(hi - lo)  # 0 only for an image of one value; any unit of the values otherwise (x 1e-12 too)
    return np.clip((a - lo) / (width if width > 0 else 1.0), 0.0, 1.0).astype(np.float32)


def orientation_to(reference, image, name: str = "", say=None, say_turn: bool = True) -> tuple[bool, bool, bool] | None:
    """(transpose, flip rows, flip columns) that put the pixels of ``image`` (a SimpleITK image as
    read: 2D, or a one-slice volume such as a DICOM file) in the orientation of ``reference``, when
    both files place themselves in space (NIfTI, NRRD, MetaImage, DICOM; ``volumes.has_position``)
    and their axes are parallel; None otherwise (PNG, TIFF ...: matched as stored). An image oblique
    to the reference is matched as stored too, said to ``say``; so is a turn, unless ``say_turn`` is
    False (a set says its turns together: ``turns_note``)."""
    from .volumes import has_position, in_plane_geometry

    if image is reference or not (has_position(image) and has_position(reference)):
        return None

    def axes(im) -> np.ndarray:  # its slice's two axes in space (a 2D file's x-y axes with z 0)
        a = in_plane_geometry(im)[1]
        return a if a.shape[0] == 3 else np.vstack([a, np.zeros((1, 2))])

    m = axes(reference).T @ axes(image)  # [reference axis, image axis]
    if image.GetDimension() != reference.GetDimension():
        normal = in_plane_geometry(image if image.GetDimension() == 3 else reference)[3]
        if abs(abs(float(normal[2])) - 1.0) > 1e-3:
            return None  # a 2D file (its x-y plane) and a slice of another plane: nothing to compare them by
    if not np.allclose(np.abs(m), np.round(np.abs(m)), atol=1e-3):
        if say is not None:
            say(f"{name} is stored obliquely to the prompt image (its axes are not parallel to the prompt image's): "
                "its pixels are matched as stored")
        return None
    transpose = abs(m[0, 1]) > 0.5
    if transpose:
        m = m[:, ::-1]  # the transposed array's columns run along the image's j axis
    turn = (bool(transpose), bool(m[1, 1] < 0), bool(m[0, 0] < 0))
    if not any(turn):
        return None
    if say is not None and say_turn:
        say(f"{name} is stored {_turn_words(turn)} against the prompt image: labelled in the prompt image's "
            "orientation, its mask written as the image is stored")
    return turn


def _turn_words(turn: tuple[bool, bool, bool]) -> str:
    return " and ".join(w for w, on in (("transposed", turn[0]), ("flipped vertically", turn[1]),
                                        ("flipped horizontally", turn[2])) if on)


def turns_note(names: Sequence[str], turns: Sequence[tuple[bool, bool, bool] | None]) -> list[str]:
    """What to say of the images of a set stored turned against the prompt image (``orientation_to``):
    a sentence each for up to three, else one for all (a set of 23 such NIfTI slices printed 23 notes
    before its summary)."""
    turned = [(name, t) for name, t in zip(names, turns) if t is not None and any(t)]
    if len(turned) <= 3:
        return [f"{name} is stored {_turn_words(t)} against the prompt image: labelled in the prompt image's "
                "orientation, its mask written as the image is stored" for name, t in turned]
    kinds = Counter(_turn_words(t) for _, t in turned)
    listed = ", ".join(name for name, _ in turned[:3]) + f" ... {turned[-1][0]}"
    how = "; ".join(f"{words} {n}" for words, n in kinds.items())
    return [f"{len(turned)} images are stored turned against the prompt image ({listed}; {how}): labelled in the "
            "prompt image's orientation, their masks written as each image is stored"]


def reorient(arr: np.ndarray, turn: tuple[bool, bool, bool] | None, undo: bool = False) -> np.ndarray:
    """``arr`` (rows, columns) turned by ``orientation_to``'s (transpose, flip rows, flip columns),
    or back with ``undo``."""
    if turn is None:
        return arr
    transpose, rows, cols = turn
    if not undo and transpose:
        arr = arr.T
    if rows:
        arr = arr[::-1]
    if cols:
        arr = arr[:, ::-1]
    if undo and transpose:
        arr = arr.T
    return np.ascontiguousarray(arr)


def _resize(arr: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``arr`` resampled onto ``shape`` covering the same field of view (SimpleITK: linear for
    images, nearest neighbour for label maps)."""
    if tuple(arr.shape) == tuple(shape):
        return arr
    import SimpleITK as sitk

    src = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    # Pixel centres of both grids span the same field of view [0, 1] x [0, 1] (unit pixels on src).
    ref = sitk.Image([int(shape[1]), int(shape[0])], src.GetPixelID())
    ref.SetSpacing((arr.shape[1] / shape[1], arr.shape[0] / shape[0]))
    ref.SetOrigin((-0.5 + 0.5 * arr.shape[1] / shape[1], -0.5 + 0.5 * arr.shape[0] / shape[0]))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, src.GetPixelID())
    return sitk.GetArrayFromImage(out)


# The drift test's smallest robust SD (IntensityGate.from_prompt's sd_floor) for images normalised
# one by one: each image's own percentiles move an organ's normalised brightness by 10-15 %
# between exports of one scan (another window, a resized copy), which the engine's 0.02 took for
# drift (the liver of 30 slices exported with two windows: 6 of 29 images left empty, Dice 0.661).
# Chosen on the validation sets (training-case structures; scripts/evaluate_image_sets.py
# --sets validation): 0.02 0.661 with 29 of 46 images without the structure labelled, 0.05 0.665
# and 29, 0.1 0.665 and 34.
NORMALISED_DRIFT_FLOOR = 0.05


# The drift test's reference for image sets: the guide image's region. The shipped checkpoint's
# "both" (also the drawn image's, chosen on volumes in session 27) scored lower on the image-set
# validation sets (scripts/evaluate_image_sets.py --sets validation --configs
# pam-guide:similar,pam-both:similar: 0.665 vs 0.662, 29 of 46 images without the structure
# labelled either way), so a set is tested against its guides as before.
IMAGE_SET_GATE_REFERENCE = "guide"


@contextlib.contextmanager
def _drift_floor(predictor, normalize: bool):
    """With ``normalize``, the predictor's drift test (when it has one, at its class default) widened
    to NORMALISED_DRIFT_FLOOR for the run, then as it was; a floor set on the predictor is used as
    given. A drift test against "both" references that comes from the checkpoint is run against
    IMAGE_SET_GATE_REFERENCE (one set on the predictor otherwise is used as given)."""
    inference = getattr(getattr(predictor, "model", None), "inference", None)
    reference = getattr(predictor, "gate_reference", None)
    from_checkpoint = (reference == "both" and getattr(inference, "intensity_gate_reference", None) == "both"
                       and not getattr(predictor, "_gate_reference_given", False))
    widen = normalize and hasattr(predictor, "gate_sd_floor") and "gate_sd_floor" not in vars(predictor)
    if widen:
        predictor.gate_sd_floor = NORMALISED_DRIFT_FLOOR
    if from_checkpoint:
        predictor.gate_reference = IMAGE_SET_GATE_REFERENCE
    try:
        yield
    finally:
        if widen:
            del predictor.gate_sd_floor  # the class default again
        if from_checkpoint:
            predictor.gate_reference = reference


def to_common_grid(images: Sequence[np.ndarray], shape: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """The images as one float32 stack (n, rows, cols) on ``shape``, each resampled over its whole
    field of view and, with ``normalize``, scaled by its own 0.5-99.5 percentiles to 0..1."""
    out = np.empty((len(images), *shape), dtype=np.float32)
    for n, img in enumerate(images):
        a = _normalised(img) if normalize else np.asarray(img, dtype=np.float32)
        out[n] = _resize(a, shape)
    return out


def thumbnail_distances(stack: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """(n, n) dissimilarity of the images: 1 - normalised correlation of THUMB x THUMB thumbnails
    of the region ``box`` (0 = the same up to brightness and contrast, up to 2)."""
    region = stack[(slice(None), *box)]
    thumbs = np.stack([_resize(r, (THUMB, THUMB)) for r in region]).reshape(len(stack), -1).astype(np.float64)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(thumbs, axis=1, keepdims=True)
    thumbs = np.divide(thumbs, norm, out=np.zeros_like(thumbs), where=norm > 1e-9)
    return 1.0 - thumbs @ thumbs.T


def _similarity_box(mask: np.ndarray, scale: float = 2.0) -> tuple[slice, slice]:
    """The region whose look decides similarity: the prompt's bounding box grown to ``scale`` x
    its size (at least 16 px), clipped to the image."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    out = []
    for idx, n in ((rows, mask.shape[0]), (cols, mask.shape[1])):
        centre, size = (idx[0] + idx[-1]) / 2.0, max((idx[-1] - idx[0] + 1) * scale, 16)
        a, b = int(max(np.floor(centre - size / 2), 0)), int(min(np.ceil(centre + size / 2) + 1, n))
        out.append(slice(a, b))
    return tuple(out)


def _checked_mask(mask, image: np.ndarray, what: str, image_what: str) -> tuple[np.ndarray, list[int]]:
    """A label map drawn on ``image``: (int64 array, the labels it holds), or InputError naming
    ``what`` (e.g. "the prompt mask") for another size, non-integer values or labels out of range."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != image.shape:
        raise InputError(f"{what} is {'x'.join(map(str, mask.shape))} but {image_what} is "
                         f"{'x'.join(map(str, image.shape))}; draw the mask on that image")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        if not np.issubdtype(mask.dtype, np.floating):
            raise InputError(f"{what} must be an integer label map, got values of type {mask.dtype}")
        if not np.all(np.isfinite(mask)) or not np.all(np.mod(mask, 1) == 0):
            from .propagate import _not_whole

            raise InputError(_not_whole(what, mask))
    mask = mask.astype(np.int64)
    held = [int(v) for v in np.unique(mask) if v != 0]
    bad = [v for v in held if not 1 <= v <= MAX_LABEL]
    if bad:
        raise InputError(f"{what} holds label {bad[0]}; labels must be 1-{MAX_LABEL}")
    return mask, held


def _levels_as_ranks(image: np.ndarray) -> np.ndarray:
    """``image``, or, where it holds values that are not whole and at most LABEL_MAP_LEVELS of them,
    each value's rank (0, 1, 2 ... in order): a colour label map read as grey (red 76.245, green
    149.685) then holds whole values, as a grey one does, for the label-map test (``flat_levels``
    asks for whole values: colour label maps among a set's images went unnamed, session 46)."""
    from .propagate import LABEL_MAP_LEVELS

    if image.dtype.kind != "f" or len(np.unique(image[::7, ::7])) > LABEL_MAP_LEVELS:  # (a photo: at once)
        return image
    if np.all(np.mod(image, 1) == 0):
        return image
    values, ranks = np.unique(image, return_inverse=True)
    return ranks.reshape(image.shape).astype(np.int32) if len(values) <= LABEL_MAP_LEVELS else image


def _validate(images, prompt_index, prompt_mask, labels, order, names=None):
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = list(images)
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise InputError("images must be a list of 2D arrays")
    if len(images) < 2:
        raise InputError(f"a set needs at least 2 images (the labelled one and one to label), got {len(images)}")
    if isinstance(prompt_index, (bool, np.bool_)) or not isinstance(prompt_index, (int, np.integer)):
        raise InputError(f"prompt_index must be an image number, got {prompt_index!r}")
    if not 0 <= int(prompt_index) < len(images):
        raise InputError(f"prompt_index {prompt_index} is outside the {len(images)} images (0-{len(images) - 1})")
    if order not in ORDERS:
        raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if names is not None and len(names) != len(images):
        raise InputError(f"names must name each of the {len(images)} images, got {len(names)}")
    imgs = [_as_2d(im, str(names[n]) if names is not None else f"image {n}") for n, im in enumerate(images)]
    mask, present = _checked_mask(prompt_mask, imgs[prompt_index], "the prompt mask",
                                  f"its image (image {prompt_index})")
    if not present:
        raise InputError("the prompt mask is empty: label the object on the prompt image")
    low, high = float(np.min(imgs[prompt_index])), float(np.max(imgs[prompt_index]))
    if low == high:  # (a trial, session 46: every image came back empty, blamed on its brightness)
        name = str(names[prompt_index]) if names is not None else f"image {prompt_index}"
        raise InputError(f"the prompt image ({name}) holds one value everywhere ({low:g}): there is nothing to follow; "
                         "check that it is the image the mask was drawn on")
    if labels is None:
        labels = present
    else:
        labels = list(dict.fromkeys(label_list(labels)))  # each once, in the order given
        missing = [v for v in labels if v not in present]
        if missing:
            raise InputError(f"label {missing[0]} is not in the prompt mask (it holds {', '.join(map(str, present))})")
    return imgs, int(prompt_index), mask, labels


def _validate_more(more_prompts, imgs, p: int, prompt_labels, names) -> dict[int, np.ndarray]:
    """``more_prompts`` {image number: label map on that image} -> the same, checked, int64."""
    if more_prompts is None:
        return {}
    if not isinstance(more_prompts, dict):
        raise InputError("more_prompts must be a dict {image number: its label map}")
    out = {}
    for index, mask in more_prompts.items():
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) \
                or not 0 <= int(index) < len(imgs):
            raise InputError(f"more_prompts: {index!r} is not one of the {len(imgs)} images' numbers "
                             f"(0-{len(imgs) - 1})")
        index = int(index)
        name = str(names[index]) if names is not None else f"image {index}"
        if index == p:
            raise InputError(f"more_prompts: {name} is the prompt image itself")
        mask, held = _checked_mask(mask, imgs[index], f"the mask given for {name}", "the image")
        foreign = [v for v in held if v not in prompt_labels]
        if foreign:
            raise InputError(f"the mask given for {name} holds label {foreign[0]}, which the prompt mask does not (it "
                             f"holds {', '.join(map(str, sorted(prompt_labels)))}): use the prompt's label values")
        out[index] = mask
    if len(out) + 1 >= len(imgs):
        raise InputError("every image has a mask already: nothing to label")
    return out


def label_images(
    images: Sequence[np.ndarray],
    prompt_index: int,
    prompt_mask: np.ndarray,
    model=None,
    *,
    order: str = "similar",
    labels: Sequence[int] | None = None,
    normalize: bool = True,
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: CancelToken | None = None,
    names: Sequence[str] | None = None,
    more_prompts: dict[int, np.ndarray] | None = None,
) -> ImageSetResult:
    """Label every image of ``images`` (2D arrays, any sizes) with the structure(s) that
    ``prompt_mask`` (an integer label map on ``images[prompt_index]``) marks.

    ``model``: a ``PAMModel``, any ``SlicePredictor`` (e.g. ``get_predictor("track")``), or None
    for the shipped default weights. ``order``: which image guides which (module docstring).
    Returns per image a label map on its own grid; the prompt image's map is the prompt itself.
    ``names`` (e.g. file names) name the images in error messages.
    ``more_prompts``: {image number: label map on that image} of further labelled images (e.g.
    masks corrected after a first run): they keep their masks and guide like the prompt image (an
    image whose mask lacks a label holds that object nowhere and guides nothing for it); the
    prompt image still sets what the predictor takes from a drawn slice (``begin``).
    Raises InputError for bad input and PropagationCancelled when ``cancel`` is set (nothing is
    returned then)."""
    t0 = time.perf_counter()
    check_progress_and_cancel(progress, cancel)
    check_flag("normalize", normalize)
    imgs, p, mask, labels = _validate(images, prompt_index, prompt_mask, labels, order, names)
    more = _validate_more(more_prompts, imgs, p, {int(v) for v in np.unique(mask)} - {0}, names)
    predictor = _as_predictor(model, device)
    shape = imgs[p].shape
    stack = to_common_grid(imgs, shape, normalize=normalize)
    n = len(imgs)
    drawn = sorted({p, *more})
    results = np.zeros((n, *shape), dtype=np.uint16 if max(labels) > 255 else np.uint8)
    guides_all, conf_all, drift_emptied = {}, {}, {}
    total = max((n - len(drawn)) * len(labels), 1)
    done = 0

    with _walk_lock(predictor), torch_threads(threads), _drift_floor(predictor, normalize):
        for lab in labels:
            lab_mask = mask == lab
            predictor.begin(stack, p, lab_mask)
            found = {p: lab_mask}  # image -> its mask for this label (None: found absent)
            for index, other in more.items():  # on the common grid, as the images are
                on_grid = _resize((other == lab).astype(np.uint8), shape, nearest=True) > 0
                found[index] = on_grid if on_grid.any() else None
            guides = np.full(n, -1, dtype=np.int64)
            conf = np.zeros(n, dtype=np.float32)
            conf[drawn] = [1.0 if found[d] is not None else 0.0 for d in drawn]
            need_dist = order == "similar" or (order == "prompt" and more)
            dist = thumbnail_distances(stack, _similarity_box(lab_mask)) if need_dist else None
            for q, g in _schedule(order, drawn, n, dist, found):
                if cancel is not None and cancel.is_cancelled:
                    raise PropagationCancelled("cancelled")
                if hasattr(predictor, "forget_walk"):  # each image from its guide alone, never a carried walk
                    predictor.forget_walk()
                pred = predictor.predict(stack, g, found[g], [q])
                _check_prediction(predictor, pred, 1, stack.shape[1:])  # a custom predictor may return anything
                prob = np.asarray(pred.prob[0])
                presence = _stop_presence(pred, 0)  # the presence, or the drift test where lower
                guides[q] = g
                if _is_empty(prob, presence, int(found[g].sum()), predictor):  # the engine's own "object gone" test
                    found[q] = None
                    if _stop_reason(pred, 0, predictor) == "drift":
                        drift_emptied.setdefault(lab, []).append(int(q))
                else:
                    m = prob >= predictor.threshold
                    found[q] = m
                    conf[q] = _slice_confidence(prob, presence, predictor.threshold)
                done += 1
                if progress is not None:
                    progress(done / total, f"label {lab}: image {q}")
            for q, m in found.items():
                if m is not None and q not in drawn:
                    results[q][m & (results[q] == 0)] = lab
            guides_all[lab], conf_all[lab] = guides, conf
    masks = []
    given = {p: mask, **more}
    for q in range(n):
        if q in given:  # a drawn mask is kept as drawn (the labels labelled)
            masks.append(np.where(np.isin(given[q], labels), given[q], 0).astype(results.dtype))
        else:
            masks.append(_resize(results[q], imgs[q].shape, nearest=True))
    if progress is not None and done < total:  # (the last image's call said 1.0 already: said twice)
        progress(1.0, "done")
    return ImageSetResult(masks, labels, guides_all, conf_all, p, order, done, time.perf_counter() - t0,
                          tuple(drawn), drift_emptied)


def _schedule(order: str, drawn: Sequence[int], n: int, dist: np.ndarray | None, found: dict):
    """(image, guide) pairs in prediction order, from the drawn images ``drawn`` (the prompt and
    any further labelled ones). Reads ``found`` as it is filled: an image found absent (None),
    drawn without the object included, never guides another."""
    roots = [d for d in drawn if found.get(d) is not None]
    todo_all = [q for q in range(n) if q not in drawn]
    if not roots:  # no drawn image holds this label: nothing guides
        return
    if order == "prompt":  # each image from the most similar drawn image holding the object
        for q in todo_all:
            yield q, roots[0] if len(roots) == 1 else min(roots, key=lambda r: (dist[r, q], r))
        return
    if order == "given":
        # Between two drawn images each image comes from the nearer one (the earlier on a tie),
        # walking out from it as from a single prompt; beyond the outermost ones, from them. A
        # drawn image without the object is a wall: the walks from its other side cover the gap.
        ordered = sorted(drawn)
        for left, right in zip([None, *ordered], [*ordered, None]):
            lo = 0 if left is None else left + 1
            hi = n - 1 if right is None else right - 1
            has_left = left is not None and found.get(left) is not None
            has_right = right is not None and found.get(right) is not None
            if has_left and has_right:
                split = (lo + hi) // 2 + 1 if (hi - lo) % 2 == 0 else (lo + hi + 1) // 2
                parts = [(left, range(lo, split)), (right, range(hi, split - 1, -1))]
            elif has_left:
                parts = [(left, range(lo, hi + 1))]
            elif has_right:
                parts = [(right, range(hi, lo - 1, -1))]
            else:
                parts = []
            for guide, walk in parts:
                for q in walk:
                    yield q, guide
                    if found.get(q) is not None:
                        guide = q
        return
    # "similar": Prim's algorithm over the dissimilarities, grown from labelled images only.
    best = np.min(dist[roots], axis=0)  # each image's distance to its nearest labelled guide
    parent = np.asarray(roots, dtype=np.int64)[np.argmin(dist[roots], axis=0)]
    todo = np.zeros(n, dtype=bool)
    todo[todo_all] = True
    while todo.any():
        cand = np.flatnonzero(todo)
        q = int(cand[np.argmin(best[cand])])
        yield q, int(parent[q])
        todo[q] = False
        if found.get(q) is not None:  # q now guides the images it is nearer to
            closer = todo & (dist[q] < best)
            best[closer] = dist[q][closer]
            parent[closer] = q


# ----------------------------------------------------------------------------- the command


def _expand(inputs: Sequence[str], left_out: list | None = None) -> list:
    """Files as given (each must exist); a folder contributes its image files (by extension,
    ``IMAGE_2D_EXTENSIONS``), sorted by name with numbers compared as numbers (``_natural``),
    but not those named ``*_mask.*``: masks, as this command writes them (labelled as images they
    made ``x_mask_mask.png`` and could guide real images), added to ``left_out``."""
    from pathlib import Path

    import itertools

    from .volumes import IMAGE_2D_EXTENSIONS, _is_dicom_file

    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            entries = [f for f in p.iterdir() if not f.name.startswith(".")]  # (listed once: sets of thousands)
            images = [f for f in entries if f.name.lower().endswith(IMAGE_2D_EXTENSIONS)]
            found = sorted((f for f in images if f.is_file()), key=_natural)
            # an image that is a link to nothing (an unmounted share) was left out without a word
            broken = sorted((f for f in images if f.is_symlink() and not f.exists()
                             and not _stem(f).lower().endswith("_mask")), key=_natural)
            unread = sorted((f.name for f in entries if f.name.lower().endswith((".gif", ".webp")) and f.is_file()),
                            key=str.lower)
            if unread:  # (left out without a word: "found in 6 of 6 images" beside 2 GIF/WebP frames)
                more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
                print(f"note: left out {len(unread)} GIF/WebP file{'s' if len(unread) != 1 else ''} of folder {p} "
                      f"({', '.join(unread[:3])}{more}), which SimpleITK cannot read; save them as PNG to label them",
                      flush=True)
            # subfolders holding images are not looked into: said (a trial, session 46: left out without a word)
            nested = [f.name for f in sorted((f for f in entries[:10_000] if _holds_images(f)), key=_natural)]
            if nested:
                more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
                print(f"note: left out {len(nested)} subfolder{'s' if len(nested) != 1 else ''} of folder {p} holding "
                      f"images ({', '.join(nested[:3])}{more}): a folder's own image files are labelled, not those "
                      "below it; give the subfolders too to label theirs", flush=True)
            if broken:
                raise InputError(f"folder {p}: {_links_to_nothing(broken)}; mount or copy what "
                                 f"{'they point' if len(broken) > 1 else 'it points'} to, or remove the "
                                 f"link{'s' if len(broken) > 1 else ''}")
            masks = [f for f in found if _stem(f).lower().endswith("_mask")]
            if masks and len(masks) < len(found):
                found = [f for f in found if f not in masks]
                if left_out is not None:
                    left_out.extend(masks)
            if not found:
                dicom = sum(1 for f in itertools.islice(p.iterdir(), 2000)
                            if f.is_file() and not f.name.startswith(".") and _is_dicom_file(f))
                its = "their names" if dicom != 1 else "its name"
                raise InputError(f"folder {p} holds no image files ({', '.join(IMAGE_2D_EXTENSIONS)})" + (
                    f"; it holds {dicom} DICOM file{'s' if dicom != 1 else ''} without .dcm in {its}, left out of "
                    f"a folder: name them on the command line ({p}/*)" if dicom else ""))
            out.extend(found)
        elif not p.exists():
            if p.is_symlink():
                raise InputError(f"{_links_to_nothing([p])}; mount or copy what it points to")
            raise InputError(f"{p} does not exist; check the path")
        elif not p.is_file():
            raise InputError(f"{p} is not a file or a folder; give image files or folders of them")
        else:
            out.append(p)
    return out


def _holds_images(folder) -> bool:
    """Whether ``folder`` is a folder holding a 2D image file among its first 2000 entries (an unreadable
    one: no)."""
    import itertools

    from .volumes import IMAGE_2D_EXTENSIONS

    try:
        return folder.is_dir() and any(g.name.lower().endswith(IMAGE_2D_EXTENSIONS) and not g.name.startswith(".")
                                       for g in itertools.islice(folder.iterdir(), 2000))
    except OSError:
        return False


def _links_to_nothing(links) -> str:
    import os

    from .checks import names_shown

    if len(links) == 1:
        return f"{links[0].name} is a link to {os.readlink(links[0])}, which does not exist"
    more = ", ..." if len(links) > 5 else ""
    return f"{len(links)} images are links to files that do not exist ({names_shown([f.name for f in links])}{more})"


def _natural(path) -> tuple:
    """Sort key of a file name: runs of digits compare as numbers, the rest ignoring case
    (frame_2 before frame_10, as a file manager shows them); the name itself breaks ties."""
    import re

    parts = re.split(r"(\d+)", path.name)
    return tuple(int(t) if n % 2 else t.lower() for n, t in enumerate(parts)), path.name


def _stem(path) -> str:
    """The file name without its image extension (``a.nii.gz`` -> ``a``)."""
    from .volumes import IMAGE_2D_EXTENSIONS, without_extension

    # A name without an image extension is kept whole: DICOM files named by their UIDs
    # (CT.1.3.12...16583) all lost their last part and clashed
    return without_extension(path.name, IMAGE_2D_EXTENSIONS)


def _refuse_image_and_mask_as_images(images: Sequence[str], prompt_path, any_labelled: bool,
                                     drawn_masks: Sequence = ()) -> None:
    """Refuse IMAGES that name a file and, next to it, ``<its name>_mask`` holding a few label values:
    an image and its mask given as two images to label. ``--labelled b b_mask e e_mask a a_mask c``
    (two pairs to one option) read e as the prompt and labelled a_mask.png as an image, silently
    (a new user's trial, session 35); the mask would be labelled and could guide real images.
    ``drawn_masks``: the prompt's and --labelled masks, left out of the images anyway (a glob
    ``*.png`` naming them beside their images is fine)."""
    import os
    from pathlib import Path

    from .volumes import read_image_2d

    given = [Path(i) for i in images]
    for first, second in zip(given, given[1:]):
        if not (first.is_file() and second.is_file()) or _stem(second).lower() != _stem(first).lower() + "_mask":
            continue
        if any(os.path.samefile(second, m) for m in drawn_masks):
            continue  # a mask given as drawn: left out of the images later (a re-review, session 36)
        try:
            values = np.unique(read_image_2d(second)[0])
        except InputError:
            continue  # not readable as an image: its own message comes where it is read
        if len(values) > 32 or not np.all(values == np.round(values)):
            continue  # an image that happens to be named *_mask
        how = (f"one --labelled takes one pair: repeat it for each (... --labelled {first.name} {second.name}); "
               f"here {prompt_path} was read as the prompt image" if any_labelled else
               f"give it as --labelled {first} {second} (the prompt image, {prompt_path}, and its mask go first)")
        raise InputError(f"{first} and {second} are given as images to label, but {second.name} looks like the "
                         f"mask of {first.name} ({len(values)} values): it would be labelled as an image; {how}. "
                         "To label a file named *_mask as an image, rename it")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes a cell for a formula by


def table_path(path) -> str:
    """A file's path for a table that is opened in spreadsheets: a relative path that begins as a
    formula does (an image named ``=HYPERLINK(...).png`` in a shared folder, which Excel or
    LibreOffice would run when labels.csv is opened) is written as ``./`` and the path, which names
    the same file for every program that reads paths; absolute paths begin with ``/`` or a drive."""
    text = str(path)
    return f".{os.sep}{text}" if text.startswith(FORMULA_STARTS) else text


def _check_targets(out_dir, names, prompt_path, mask_path, files, more_masks=()) -> None:
    """Before any work, of the files ``names`` in ``out_dir``: none may be a folder (the move at
    the end would fail half-way), and none may be, or be a symbolic link to, one of the inputs (a
    link in -o stays a link and its target gets the new file, which would replace a drawn mask or
    an image). Inputs are compared by device and inode, as ``os.path.samefile`` does."""
    import os

    inputs = {}
    for what, f in (("the prompt image", prompt_path), ("the prompt mask", mask_path),
                    *(("the --labelled mask", m) for m in more_masks), *(("the image", f) for f in files)):
        st = os.stat(f)
        inputs.setdefault((st.st_dev, st.st_ino), f"{what} {f}")
    from .volumes import check_link_target, check_name_length, check_not_read_only

    for name in names:
        target = out_dir / name
        check_name_length(target)  # <image name>_mask.png may pass what the file system takes
        check_link_target(target)  # a link is written onto its target: its folder must take files
        check_not_read_only(target)
        try:
            st = os.stat(target)  # follows a symbolic link
        except OSError:
            continue  # not there, or a link to nothing: no input to write over
        if target.is_dir():
            what = "labels.csv" if name == "labels.csv" else "a mask"
            raise InputError(f"{target} is a folder, where this run would write {what}; move it away or choose "
                             "another -o folder")
        hit = inputs.get((st.st_dev, st.st_ino))
        if hit:
            how = "a symbolic link to" if target.is_symlink() else "the same file as"
            raise InputError(f"{target} is {how} {hit}, which this run would write over; remove "
                             f"{'the link' if target.is_symlink() else 'it'} or choose another -o folder")


def add_label_images_arguments(p) -> None:
    from .cli import THREADS_HELP, _label_number, _thread_count

    p.add_argument("prompt_image", metavar="PROMPT_IMAGE", help="the labelled image (PNG, JPEG, TIFF, BMP, DICOM file, "
                   "2D NIfTI/NRRD/MHA; colour becomes grey)")
    p.add_argument("prompt_mask", metavar="PROMPT_MASK",
                   help="its label map (same size; 0 = background, 1, 2 ... = structures)")
    p.add_argument("images", metavar="IMAGE", nargs="+",
                   help="images to label, or folders of them (their files with an image extension, sorted by name, "
                        "numbers by value: frame_2 before frame_10)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for the masks (<image name>_mask.<format>) and labels.csv; written only on success")
    p.add_argument("--labelled", nargs=2, action="append", metavar=("IMAGE", "MASK"), default=[],
                   help="another image of the set with its mask (e.g. one you corrected after a first run): kept "
                        "as drawn and a guide like the prompt image; repeat for more")
    p.add_argument("--order", choices=ORDERS, default="similar",
                   help="which image guides which: similar = nearest first, each from the most similar labelled "
                        "image (default); prompt = every image from the prompt image; given = the images' order "
                        "as a sequence (frames, serial sections), walked out from the prompt image")
    p.add_argument("--format", choices=("png", "tif", "nii.gz", "nrrd", "mha"), default="png",
                   help="mask file format (default: png)")
    p.add_argument("--label", type=_label_number, nargs="+", action="extend", metavar="N",
                   help="label only these prompt labels, in this order, which decides overlaps: the label "
                        "propagated first keeps the pixels (default: every label in the prompt mask, in ascending "
                        "order)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="PAMSegment checkpoint or the official PAM propmask.pth (default: $PAMSEGMENT_MODEL if set, "
                        "else the shipped weights)")
    p.add_argument("--method", choices=("pam", "track", "copy"), default="pam",
                   help="what predicts an image from its guide (default: pam)")
    p.add_argument("--as-drawn", action="store_true",
                   help="read the masks' values (PROMPT_MASK's, --labelled ones') as the labels drawn, even where "
                        "they look like the grey steps of a smoothed mask (a label map's own thin structures, such as "
                        "a spine's endplates) or like an image (a dense instance mask); no grey-step note either")
    p.add_argument("--no-normalize", action="store_true",
                   help="keep the images' grey values as they are (default: each scaled by its own 0.5-99.5 "
                        "percentiles, for sets whose images do not share a grey scale)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the set looks too large for the memory this process may use (the check "
                        "before the work refuses it; with enough swap it may still finish)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_thread_count, metavar="N", help=THREADS_HELP)


def _grey_range(array) -> tuple[float, float]:
    """An image's robust grey range (0.5-99.5 percentiles of at most about a million pixels)."""
    step = max(1, int(np.ceil(np.sqrt(array.size / 1e6))))
    values = np.asarray(array[::step, ::step], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high)


def _other_scale(ranges: dict, prompt_index: int) -> set:
    """Indices (keys of ``ranges``: index -> ``_grey_range``) of images whose grey values lie on
    another scale than the prompt image's: a range over 4x wider, or a middle outside the prompt's
    range (a 16-bit export of raw CT values beside an 8-bit windowed prompt came back "not found"
    with no word why: the network's presence output, not the drift test, dropped it), or, the other
    way round, an 8-bit range (within 0-255) 4x narrower than a prompt's beyond 1024. Not any narrower
    range: a blank or near-blank slice (beyond the head; noise in air) has one, exported alike."""
    low0, high0 = ranges[prompt_index]
    span0 = high0 - low0
    other = set()
    for n, (low, high) in ranges.items():
        if n == prompt_index or span0 <= 0 or high <= low:
            continue
        if (high - low > 4 * span0 or not low0 <= (low + high) / 2 <= high0
                or (high - low < span0 / 4 and 0 <= low and high <= 255 < 1024 < high0)):
            other.add(n)
    return other


def _say_written(result, files, out_dir, seconds: float, earlier=(), ranges=None) -> None:
    print(f"wrote {len(files)} masks and labels.csv to {out_dir}: {result.summary()}; {seconds:.1f} s in all",
          flush=True)
    first = result.check_first()
    if first:  # the images whose masks to look at first (labels.csv has every confidence)
        print("least confident masks, to check first: " + "; ".join(
            f"label {lab}: {', '.join(files[i].name for i in images)}" for lab, images in first.items()), flush=True)
    drawn = set(result.drawn) | {result.prompt_index}
    missed, explained = set(), set()  # images where a label was not found; those the drift note names
    size0 = result.masks[result.prompt_index].shape  # (the drift note's images of another size or grey scale)
    odd = (set(_other_scale(ranges, result.prompt_index)) if ranges else set()) | {
        i for i, m in enumerate(result.masks) if m.shape != size0}
    for lab in result.labels:  # an image where the object was missed is as worth a look as a doubtful one
        empty = [i for i, m in enumerate(result.masks) if i not in drawn and not (m == lab).any()]
        # never predicted for the label (beyond an image drawn without it, in the given order): not reached
        unreached = [files[i].name for i in empty if int(result.guides[lab][i]) < 0]
        missing = [files[i].name for i in empty if int(result.guides[lab][i]) >= 0]
        for names_, what in ((missing, "not found in"), (unreached, "not reached (beyond an image drawn without it)")):
            if names_:
                shown = ", ".join(names_[:5]) + (f" and {len(names_) - 5} more" if len(names_) > 5 else "")
                print(f"label {lab} {what}: {shown}", flush=True)
        drifted = [files[i].name for i in empty if i in set(result.drift_emptied.get(lab, ()))]
        missed.update(empty)
        explained.update(i for i in empty if i in set(result.drift_emptied.get(lab, ())))
        if drifted:  # (a new user's trial, session 35: resized or otherwise exported copies all came back empty)
            shown = ", ".join(drifted[:5]) + (f" and {len(drifted) - 5} more" if len(drifted) > 5 else "")
            # Of the prompt image's size and grey scale, such images mostly lack the object (a trial, session 46:
            # 22 of 22 named so held at most 2 px of it): said as such, the export hint after
            if any(files[i].name in drifted for i in odd):
                print(f"note: label {lab}: in {shown} the network found something like the object, but its "
                      "brightness there differs from the image it was labelled from, so it was taken as absent. If "
                      "the object is there: images saved with another grey scale, window or size? Export them as the "
                      "prompt image was, or try --no-normalize", flush=True)
            else:
                print(f"note: label {lab}: in {shown} something like the object was found, but brighter or darker "
                      "than where it was labelled, so it was taken as absent (most often rightly: the object ends "
                      "there); if it is there, were they exported with another window? Export them as the prompt "
                      "image was, or try --no-normalize", flush=True)
    scale = sorted(i for i in _other_scale(ranges, result.prompt_index) if i in missed - explained) if ranges else []
    # (ranges: of the prompt image and the images where a label was missed, computed before the writes)
    if scale:
        low0, high0 = ranges[result.prompt_index]
        shown = ", ".join(f"{files[i].name} ({ranges[i][0]:.4g} to {ranges[i][1]:.4g})" for i in scale[:3]) + (
            f" and {len(scale) - 3} more" if len(scale) > 3 else "")
        print(f"note: {shown} hold grey values on another scale than {files[result.prompt_index].name} ({low0:.4g} "
              f"to {high0:.4g}); where an object was not found in them but is there, export them as the prompt image "
              "was (the same window and bit depth)", flush=True)
    if earlier:  # a run into a folder of an earlier run: its masks stay beside this run's labels.csv
        shown = ", ".join(p.name for p in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        print(f"note: {out_dir} also holds {len(earlier)} mask{'s' if len(earlier) != 1 else ''} this run did not "
              f"write ({shown}: an earlier run's?); labels.csv lists only this run's", flush=True)


# Peak memory of `label-images` (session 32, RSS sampled every 20 ms, sets of 2000 and 4000 px
# images): every image is held as float32 grey beside its file's pixels and its mask, about
# 20 bytes a pixel of a grey file and 24 of a colour one, plus the interpreter, torch and the model.
SET_BYTES_PER_PIXEL = {1: 20, 3: 24}
SET_FIXED_BYTES = 512 * 2**20


def _check_set_memory(files, skip: bool) -> None:
    """Before anything is read: refuse a set whose images cannot all be held in this machine's
    memory (each file passed the per-file check, so a hundred large images died while being read,
    before any progress), and warn when it fits but not in what is free now."""
    from .volumes import check_memory, image_pixels_2d

    need, pixels = SET_FIXED_BYTES, 0
    for f in files:
        header = image_pixels_2d(f)
        if header is not None:
            rows, columns, channels = header
            pixels += rows * columns
            need += rows * columns * SET_BYTES_PER_PIXEL[channels]
    check_memory(need, f"labelling these {len(files)} images ({pixels / 1e6:,.0f} megapixels in all, about 20-24 "
                       "bytes a pixel)", lambda limit: "Label fewer or smaller images per run", skip)


def cmd_label_images(args) -> int:
    """Read the set, label it, write one mask per image and labels.csv."""
    import csv
    import os
    from pathlib import Path

    from .cli import EXIT_OK, METHODS, _ProgressBar, check_not_empty
    from .volumes import exif_note, read_image_2d, read_labelmap_2d, replace_together, write_labelmap_2d

    check_not_empty(("PROMPT_IMAGE", args.prompt_image, "the labelled image"), ("PROMPT_MASK", args.prompt_mask,
                    "its label map"), ("-o", args.output, "the output folder"))

    t0 = time.perf_counter()
    out_dir = Path(args.output)
    from .volumes import check_not_a_broken_link

    check_not_a_broken_link(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is {'a file' if out_dir.is_file() else 'a device or pipe'}; -o takes a folder for "
                         "the masks")
    if not out_dir.parent.is_dir():
        raise InputError(f"folder {out_dir.parent} does not exist; create it or choose another -o folder")
    from .volumes import check_folder_writable

    # Before the work: the masks are written only after the whole set is labelled.
    if out_dir.is_dir():
        check_folder_writable(out_dir, "the masks")
    else:
        check_folder_writable(out_dir.parent, f"the masks folder {out_dir.name}")
    if args.checkpoint is not None and args.method != "pam":
        raise InputError(f"--method {args.method} does not use a checkpoint; drop --checkpoint or use --method pam")
    from .cli import note_network_only_options

    note_network_only_options(args)
    if args.checkpoint:
        from .checkpoints import check_checkpoint_file

        check_checkpoint_file(args.checkpoint)
    prompt_path, mask_path = Path(args.prompt_image), Path(args.prompt_mask)
    labelled = [(Path(i), Path(m)) for i, m in args.labelled]
    for what, p in (("prompt image", prompt_path), ("prompt mask", mask_path),
                    *((w, q) for pair in labelled for w, q in zip(("--labelled image", "--labelled mask"), pair))):
        if not p.is_file():
            raise InputError(f"the {what} {p} is not a file; check the path")
    if os.path.samefile(prompt_path, mask_path):
        raise InputError("the prompt image and the prompt mask are the same file; give the mask drawn on the image")
    drawn_images = [prompt_path, *(i for i, _ in labelled)]
    for image_path, its_mask in labelled:
        if os.path.samefile(image_path, its_mask):
            raise InputError(f"--labelled {image_path} {its_mask}: the image and its mask are the same file")
        if os.path.samefile(image_path, prompt_path):
            raise InputError(f"--labelled {image_path} is the prompt image; give its mask as PROMPT_MASK only")
        if any(os.path.samefile(its_mask, i) for i in drawn_images):
            raise InputError(f"--labelled {image_path} {its_mask}: the mask is one of the labelled images; give the "
                             "mask drawn on the image")
        if any(os.path.samefile(image_path, m) for m in (mask_path, *(m for _, m in labelled))):
            raise InputError(f"--labelled {image_path} is a mask given with the prompt or another --labelled image; "
                             "give an image of the set")
    drawn_masks = [mask_path, *(m for _, m in labelled)]
    _refuse_image_and_mask_as_images(args.images, prompt_path, bool(labelled), drawn_masks)
    masks_left_out: list = []
    files = _expand(args.images, masks_left_out)
    masks_left_out = [f for f in masks_left_out if not any(os.path.samefile(f, m) for m in drawn_masks)]
    if masks_left_out:  # (the drawn masks are left out anyway)
        shown = ", ".join(f.name for f in masks_left_out[:3]) + (
            f" and {len(masks_left_out) - 3} more" if len(masks_left_out) > 3 else "")
        print(f"note: left out {len(masks_left_out)} file{'s' if len(masks_left_out) != 1 else ''} named *_mask "
              f"({shown}): masks, not images to label; name one on the command line to label it", flush=True)
    # The same file given twice (a folder and one of its files, or a link to it): labelled once, in
    # its first place (two masks of one image would be written to one name).
    seen, unique, twice = {}, [], []
    for f in files:
        st = os.stat(f)
        first = seen.setdefault((st.st_dev, st.st_ino), f)
        (unique if first is f else twice).append((f, first))
    if twice:
        more = f" (and {len(twice) - 1} more)" if len(twice) > 1 else ""
        f, first = twice[0]
        how = "" if str(f) == str(first) else f" (also as {first})"  # the same path: by itself and in its folder
        print(f"note: {f} is given twice{how}{more}; each image is labelled once", flush=True)
        files = [f for f, _ in unique]
    # Masks written among the images would be read as images next time, and could replace a file
    # the user drew (e.g. the prompt mask itself, kept as masks/img_007_mask.png).
    inputs = [("the prompt image", prompt_path), ("the prompt mask", mask_path),
              *(("the --labelled mask", m) for _, m in labelled), *(("the --labelled image", i) for i, _ in labelled),
              *(("the image to label", f) for f in files)]
    inside = next(((what, p) for what, p in inputs if out_dir.exists() and os.path.samefile(p.parent, out_dir)), None)
    if inside is not None:
        what, p = inside
        hint = (f"copy the corrected mask out of {out_dir} (or write to another -o folder)" if what == "the --labelled mask"
                else "write the masks to a folder of their own")
        raise InputError(f"{what} {p} lies in -o {out_dir}, where this run writes its masks; {hint}")
    same = [f for f in files if os.path.samefile(f, prompt_path)]
    files = [f for f in files if not any(os.path.samefile(f, m) for m in drawn_masks)]
    for image_path, _ in labelled:  # one of the set keeps its place; another joins at the end
        if not any(os.path.samefile(f, image_path) for f in files):
            if args.order == "given":
                raise InputError(f"--labelled {image_path} is not one of the images to label: with --order given it "
                                 "must be (it takes its place in the sequence); add it to the images")
            files.append(image_path)
    if same:  # the prompt image is one of the set: it keeps its place (the "given" order's sequence)
        index = next(n for n, f in enumerate(files) if os.path.samefile(f, prompt_path))
        files = [f for f in files if not os.path.samefile(f, prompt_path)]
        files.insert(index, prompt_path)
    else:
        index = 0
        files.insert(0, prompt_path)
    if len(files) < 2:
        raise InputError("no images to label besides the prompt image; give image files or folders")
    stems = {}
    for f in files:  # by case too: on macOS and Windows A_mask.png and a_mask.png are one file
        stems.setdefault(_stem(f).lower(), []).append(f)
    clash = next((v for v in stems.values() if len(v) > 1), None)
    if clash:
        raise InputError(f"{clash[0]} and {clash[1]} would both be written as {_stem(clash[0])}_mask; "
                         "rename one or label them in separate runs")
    names = [f"{_stem(f)}_mask.{args.format}" for f in files]
    if out_dir.exists():
        _check_targets(out_dir, [*names, "labels.csv"], prompt_path, mask_path, files,
                       [m for _, m in labelled])

    _check_set_memory(files, args.no_memory_check)
    def note(text: str) -> None:
        print(f"note: {text}", flush=True)

    read, unreadable = [], []  # (an alpha channel left out is said, as label-cells says it)
    for f in files:  # every file that cannot be read named at once (it took one run per bad file)
        try:
            image = read_image_2d(f, say=note if not unreadable else None, exif=False)
        except InputError as exc:
            unreadable.append(str(exc))
            read.clear()  # the run stops after the reading: the images read are not kept meanwhile
            continue
        if not unreadable:
            read.append(image)
    if len(unreadable) == 1:
        raise InputError(unreadable[0])
    if unreadable:
        more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise InputError(f"{len(unreadable)} of the images cannot be read: " + "; ".join(unreadable[:3]) + more
                         + ". Mend them or leave them out")

    turned = exif_note(files)  # (said once for the set: a phone's photos all carry one)
    if turned:
        note(turned)
    from .propagate import flat_levels

    # masks among the images (named otherwise than *_mask): labelled as images, they guided real images (a
    # trial, session 46: exit 0 without a word)
    masks_like = [f.name for f, (a, _) in zip(files, read) if a.ndim == 2 and flat_levels(_levels_as_ranks(a)[None])
                  is not None]
    if masks_like:
        them = ", ".join(masks_like[:5]) + (f" and {len(masks_like) - 5} more" if len(masks_like) > 5 else "")
        note(f"{them} hold{'s' if len(masks_like) == 1 else ''} only a few values (or colours) in flat regions: label "
             "maps rather than images? They are labelled as images; move masks out of the set (files named *_mask are "
             "left out)")
    prompt = read_labelmap_2d(mask_path, reference=read[index], say=note, as_drawn=args.as_drawn)
    more = {}
    for image_path, its_mask in labelled:
        at = next(n for n, f in enumerate(files) if os.path.samefile(f, image_path))
        if at in more:
            raise InputError(f"--labelled {image_path} is given twice; give each image's mask once")
        more[at] = read_labelmap_2d(its_mask, reference=read[at], say=note, as_drawn=args.as_drawn)
    # images stored flipped or transposed against the prompt image (their files say so) are labelled
    # in its orientation and their masks written back as stored (they were matched pixel by pixel:
    # a mask mirrored, Dice 0.89, or transposed, 0.82)
    turns = [orientation_to(read[index][1], ref, f.name, say=note, say_turn=False)
             for f, (_, ref) in zip(files, read)]
    for line in turns_note([f.name for f in files], turns):
        note(line)
    arrays = [reorient(a, t) for (a, _), t in zip(read, turns)]
    more = {at: reorient(m, turns[at]) for at, m in more.items()}
    model = METHODS[args.method](args)
    with _ProgressBar("labelling") as bar:
        result = label_images(arrays, index, prompt, model, order=args.order, labels=args.label,
                              normalize=not args.no_normalize, device=args.device, threads=args.threads, progress=bar,
                              names=[f.name for f in files], more_prompts=more)
    if args.label:  # labels of the drawn masks the choice leaves out: said (once the run is accepted)
        drawn_labels = set().union(*({int(v) for v in np.unique(m)} for m in [prompt, *more.values()])) - {0}
        left = sorted(drawn_labels - set(args.label))
        if left:
            who = f"label{'s' if len(left) > 1 else ''} {', '.join(map(str, left))}"
            print(f"note: {who} of the drawn masks {'are' if len(left) > 1 else 'is'} not among --label: left out "
                  "of every mask written, the drawn ones too; leave out --label to keep "
                  f"{'them' if len(left) > 1 else 'it'}", flush=True)
    result.masks = [reorient(m, t, undo=True) for m, t in zip(result.masks, turns)]

    # Everything is computed: now write each file to a temporary beside where it lands, then move
    # them all in, labels.csv first as the other commands move their table first (Ctrl-C ignored
    # while moving; a mask or labels.csv that is a symbolic link stays one). An -o folder this run
    # made is removed again if nothing was moved in.
    def write_table(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "mask", "label", "pixels", "confidence", "guided_by"])
            for n, (f, name, m) in enumerate(zip(files, names, result.masks)):
                for lab in result.labels:
                    g = int(result.guides[lab][n])
                    w.writerow([table_path(f), table_path(name), lab, int((m == lab).sum()),
                                f"{result.confidence[lab][n]:.3f}",
                                "(drawn)" if n in result.drawn else "" if g < 0 else table_path(files[g])])

    def mask_writer(m, ref):
        return lambda tmp: write_labelmap_2d(m, ref, tmp)

    # the grey ranges the "another scale" note compares: of the prompt image and of images where a label
    # was not found only (about 10-50 ms an image: not for every image of every run, and not in the shield)
    missed = {n for n, m in enumerate(result.masks) for lab in result.labels
              if n not in set(result.drawn) | {result.prompt_index} and not (m == lab).any()}
    ranges = {n: _grey_range(arrays[n]) for n in sorted(missed | {result.prompt_index})} if missed else None
    made = not out_dir.exists()
    try:
        out_dir.mkdir(exist_ok=True)
        replace_together(
            [(out_dir / "labels.csv", ".csv", write_table)]
            + [(out_dir / name, f".{args.format}", mask_writer(m, ref))
               for name, (_, ref), m in zip(names, read, result.masks)],
            keep_ctrl_c_ignored=getattr(args, "_ends_process", False),
            after=lambda: _say_written(result, files, out_dir, time.perf_counter() - t0,
                                       sorted(p for p in out_dir.glob("*_mask.*") if p.name not in set(names)),
                                       ranges))
    finally:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    from .volumes import say_leftovers

    say_leftovers([out_dir / "labels.csv"])
    return EXIT_OK
