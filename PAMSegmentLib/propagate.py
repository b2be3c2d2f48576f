"""The propagation engine: walk a mask drawn on one or more slices through a volume.

Everything works on arrays in (k, j, i) order after moving the propagation axis to the front.
The engine talks to a *slice predictor* (``SlicePredictor``): given a guiding slice and its mask
it returns the foreground probability of some query slices on the full slice grid. The PAM
network (``PAMPredictor``), the classical baselines (``PAMSegmentLib.baselines``) and the test
doubles all implement it, so the walk, the stopping rule, batching, cancellation and the
post-processing are one piece of code whatever predicts the slices.

The engine's walk (``_walk``; PAM's windows, its own stopping): from the outermost prompt slice
on each side, predict the next window of Z = min(int(window_mm / slice spacing), max_window)
slices from the current guide, in bounded batches; the outermost slice of the window becomes the
next guide. A side stops at the first slice predicted empty (for networks with an object-present
head: presence below its threshold). Between two prompt slices (keyframes) each slice is
predicted from both sides and the two probabilities are fused with weights by distance. Finally
3D components that do not touch the prompt are removed and the prompt slices are restored
exactly.

The authors' published walk (``_walk_published``, PAM-SPEC's "Propagation"; the default of their
checkpoint, ``InferenceParams.published_scheme``) differs: each guide predicts every slice within
+-Z of itself, so consecutive windows overlap and a slice gets several votes; a side ends only
where a window's outermost slice is empty; a slice holds what any vote gave it (the union), and
the components kept are 6-connected to the prompt. The prompt slices are still kept as drawn.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import cc3d
import numpy as np

from .checks import check_flag, empty_between_drawn, is_number, runs_text, slice_runs, state_from_json, state_to_json
from .checks import as_array, max_threads, shown
from .errors import DrawnIn3D, InputError, PropagationCancelled
from .metrics import dice

__all__ = [
    "propagate",
    "PropagationResult",
    "CancelToken",
    "SlicePrediction",
    "SlicePredictor",
    "PAMPredictor",
    "find_prompt_slices",
    "keyframes_from_edits",
    "EditPlan",
    "too_many_keyframes",
    "keyframe_limit",
    "review_order",
    "window_slices",
]

ProgressCallback = Callable[[float, str], None]

MAX_PROMPT_SLICES = 32  # more drawn slices than this along the axis is a 3D mask, not a prompt


class CancelToken:
    """Thread-safe cancel flag, checked by the engine between batches."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def is_cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class SlicePrediction:
    prob: np.ndarray  # (n, H, W) float32 foreground probability on the slice grid
    presence: np.ndarray | None = None  # (n,) object-present probability, if the predictor has one
    # (n,) intensity-drift score in [0, 1] (PAMPredictor's drift test), if it is on: below the
    # presence threshold the walk ends there as for the presence; unlike the presence it does not
    # enter the slice's confidence (on training-case structures it ranked the worst slices less well).
    drift: np.ndarray | None = None
    # (n,) Dice between the network's own mask and the registration's warped mask (PAMPredictor with
    # registration fusion), if computed: outward walks beyond the outermost of several keyframes end
    # where it falls below the predictor's ``keyframe_outward_min_agreement``.
    agreement: np.ndarray | None = None


class SlicePredictor(abc.ABC):
    """Interface of what predicts slices. ``begin`` is called once per label with the prompt."""

    window_mm: float = 20.0
    max_window: int = 40
    min_window: int = 1
    threshold: float = 0.5
    presence_threshold: float = 0.5
    min_area_fraction: float = 0.0
    min_area_px: int = 1
    consistency_min_dice: float = 0.0  # forward-backward check of each window (see _walk); 0 = off
    # With >= 2 drawn keyframes, walks beyond the outermost ones also end below this agreement
    # (SlicePrediction.agreement); 0 = off.
    keyframe_outward_min_agreement: float = 0.0
    # Thick slices: walk through interpolated slices where the spacing exceeds this (mm); 0 = off.
    through_plane_mm: float = 0.0
    # The authors' published walk (``_walk_published``) instead of the engine's (``_walk``) on the
    # walks outward from the drawn slices; set from InferenceParams.published_scheme.
    published_scheme: bool = False

    def begin(self, volume: np.ndarray, prompt_index: int, prompt_mask: np.ndarray) -> None:
        pass

    def forget_walk(self) -> None:
        """The next ``predict`` starts from its guide alone, not continuing a walk it may carry
        state for (PAM's registration chain). Nothing to forget by default."""

    @abc.abstractmethod
    def predict(self, volume: np.ndarray, guide_index: int, guide_mask: np.ndarray,
                query_indices: Sequence[int]) -> SlicePrediction:
        """Probability of the guide's object on each query slice, on the full slice grid."""


@dataclass
class PropagationResult:
    mask: np.ndarray  # label map on the input grid (k, j, i), prompt labels' values
    axis: int
    confidence: dict[int, np.ndarray]  # per label, per slice along the axis; NaN where not predicted
    slice_range: dict[int, tuple[int, int]]  # per label, first and last slice with the object
    prompt_slices: dict[int, list[int]]
    timings: dict[str, float] = field(default_factory=dict)
    n_predicted: int = 0  # slices the predictor was run on (all labels)
    # What an update (``propagate(..., previous=result)``) needs to reuse unchanged regions.
    keyframes: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # label -> slice -> 2D mask
    range: tuple[int, int] | None = None
    early_stop: bool = True
    recomputed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # label -> slice intervals
    # label -> what ended each walk run in this call: {"start", "direction" (+1/-1), "last" (last
    # slice with the object), "reason"}; reason "presence" (the network: object gone; copy and track:
    # their own tissue test), "drift"
    # (the intensity drift test), "area" (the mask vanished), "consistency" (forward-backward
    # check), "agreement" (beyond the outermost of several keyframes: the network and the
    # registration parted ways) or "end" (the range's end was reached).
    stops: dict[int, list[dict]] = field(default_factory=dict)
    # label -> per slice, the network-vs-registration agreement recorded by the one-sided walks
    # (NaN elsewhere): lets an update apply the keyframe agreement test to a walk it reuses.
    agreement: dict[int, np.ndarray] = field(default_factory=dict)
    remove_disconnected: bool = True  # the component filter the reused regions went through
    # Labels that lost voxels to an earlier label where they overlapped: ``mask`` does not hold all
    # of their own prediction, so an update recomputes them rather than reusing ``mask``.
    overlapped: frozenset = frozenset()
    # label -> voxels it lost to labels propagated before it ({other label: voxels}) and its own
    # prediction's voxels, as (lost, own): for the note that says so (this call only). Voxels taken
    # by a later label's drawn slices are not counted: the drawing is the user's word, no order helps.
    lost: dict = field(default_factory=dict)
    # label -> slices between two of its drawn slices left empty (the walks from both sides found
    # nothing there, ``_gaps_between``; this call only): said in a note and first for review, since
    # the object may go on there (or be really absent: a structure in several parts).
    gaps: dict[int, list[int]] = field(default_factory=dict)
    # label -> slices between two of its drawn slices holding less than a third of the area the two
    # suggest (``_thin_between``; this call only): the propagation shrank there; said in a note and
    # first for review.
    thin: dict[int, list[int]] = field(default_factory=dict)
    # label -> (slices between two of its drawn slices where it predicted the object but holds none
    # of it in ``mask``, the labels that took it: earlier ones, or later ones' drawings); said in a
    # note whatever share of its voxels that is (the label is cut in two there), first for review.
    cut: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    # label -> (a, b, overlap) for neighbouring drawn slices a < b whose walks towards each other both
    # hold the object somewhere between them but overlap on no slice by KEYFRAME_DISAGREE_OVERLAP or
    # more of the smaller mask (the best slice's): the result between them is split, and one drawing
    # may be of another structure; said in a note (an update says again what the result it updates
    # said of a pair it reuses: the pairs are in the command line's record and in Slicer's history and
    # saved record).
    disagree: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)
    # label -> its drawn slices this call added or changed against ``previous`` (an update; this call
    # only): the notes' default ``edited`` (a tip the user just drew is no stray click, and a walk
    # from it that ends at once no drift stop; a review, session 31: Python's notes() said both)
    edited: dict[int, list[int]] = field(default_factory=dict)
    # label -> slices beyond its outermost drawn slices that held it in ``previous`` (the result an
    # update corrects) and are empty now (this call only): a walk from a new outermost drawn slice
    # ended sooner (with two or more drawn slices, also where the network and the registration
    # disagree); said in a note and first for review (a review on training cases, session 31:
    # correct slices on the far side vanished without a word)
    dropped: dict[int, list[int]] = field(default_factory=dict)
    # label -> the predictor's class and its state after it began on the label's drawn slice
    # (``begin_state``, e.g. PAM's intensity window): an update by another predictor, or one that
    # begins differently, recomputes the label.
    begin_state: dict = field(default_factory=dict)
    # ``image_digest`` of the image (and spacing) it was computed on: an update on another image
    # recomputes everything. None where unknown (a result read back from a saved record).
    image_digest: str | None = None
    # label -> the voxels of its own prediction (and drawing) that ``mask`` gives to another label
    # (an earlier label's, or a later label's drawing), as sorted flat indices into the label map
    # with ``axis`` moved first: with them an update rebuilds an overlapped label's own mask and
    # reuses its walks like any other label's (without them it recomputes the label).
    lost_voxels: dict = field(default_factory=dict)
    # Made by a version whose walks beyond the outermost drawn slice towards a wall keep the agreement
    # test (session 32 on): an update reuses such walks. False for results of earlier versions (their
    # records, older servers' answers), whose walks there are predicted again.
    outward_wall_test: bool = False
    # Whether "presence" stops came from a network's object-present output ("network": PAMPredictor)
    # or from a baseline's drift test (copy, track: ""); the "nothing" note speaks of the network.
    presence_by: str = ""
    # The image's distinct values when it looks like a label map rather than a scan (``flat_levels``:
    # at most LABEL_MAP_LEVELS whole values in flat regions), else None: said in a note (a trial, session
    # 45: a segmentation given as the image was propagated without a word).
    image_levels: tuple | None = None

    def to_record(self) -> dict:
        """What a later update needs of this result besides its mask, as JSON (the command line
        keeps it in OUT.keyframes.json): per label the keyframes and walls it ran with (as
        ``EditPlan.record()``), its confidence and walk agreement per slice and what the predictor
        began with (its class, ``begin_state`` and settings); the range, stopping, component
        filter and image digest. ``from_record(mask, record)`` rebuilds a result to pass as
        ``previous=``: only the walks it can vouch for are reused, the rest recomputed."""
        earlier = _earlier_from_result(self, self.axis)
        labels, total_runs = {}, 0
        for lab in sorted(self.confidence):
            agreement = self.agreement.get(lab)
            try:
                begin = state_to_json(self.begin_state.get(lab))
            except TypeError:
                begin = None  # an update then recomputes the label: correct, only slower
            labels[str(lab)] = {**earlier.get(str(lab), {"keyframes": [], "walls": []}),
                                "confidence": _json_floats(self.confidence[lab]),
                                "agreement": None if agreement is None else _json_floats(agreement),
                                "begin": begin, "overlapped": lab in self.overlapped,
                                # how its walks ended: an update that reuses a walk reports its ending too
                                "stops": stops_to_json(self.stops.get(lab, [])),
                                # (session 48) what an update reusing a pair's walks says of it again
                                "disagree": disagree_to_json(self.disagree.get(lab, []))}
            runs = _index_runs(self.lost_voxels.get(lab)) if lab in self.overlapped else None
            if runs is not None and total_runs + len(runs) <= MAX_LOST_RUNS_ALL:  # the record stays far under 64 MB
                labels[str(lab)]["lost_voxels"] = runs
                total_runs += len(runs)
        return {"axis": int(self.axis), "range": None if self.range is None else [int(v) for v in self.range],
                "early_stop": bool(self.early_stop), "remove_disconnected": bool(self.remove_disconnected),
                "image_digest": self.image_digest, "outward_wall_test": bool(self.outward_wall_test),
                "labels": labels}

    @classmethod
    def from_record(cls, mask: np.ndarray, record: dict) -> "PropagationResult":
        """The result ``to_record`` described, rebuilt around ``mask`` (its label map, read back from
        OUT): its keyframes are the mask's slices there. The record comes from a file, so it is
        checked whole; InputError (a ValueError) says what is wrong."""
        try:
            return cls._from_record(mask, record)
        except InputError:
            raise
        except (ValueError, TypeError, KeyError) as error:  # a damaged record is bad input, one PAMError
            raise InputError(str(error)) from None

    @classmethod
    def _from_record(cls, mask: np.ndarray, record: dict) -> "PropagationResult":
        mask = np.asarray(mask)
        if mask.ndim != 3 or not isinstance(record, dict):
            raise ValueError("not a 3D label map and a record")
        axis = record.get("axis")
        if axis not in (0, 1, 2) or isinstance(axis, bool):
            raise ValueError("its axis is not 0, 1 or 2")
        n = mask.shape[axis]
        lo_hi = record.get("range")
        if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(_whole_in(v, 0, n - 1) for v in lo_hi)
                and lo_hi[0] <= lo_hi[1]):
            raise ValueError(f"its range is not two slices within 0-{n - 1}")
        flags = [record.get(k) for k in ("early_stop", "remove_disconnected")]
        digest = record.get("image_digest")
        # the digest is required: without it a record could be reused on another image (Slicer's
        # records, which have none, are rebuilt by PAMSegmentLib.mrml, not here)
        if not all(isinstance(f, bool) for f in flags) or not (isinstance(digest, str) and 0 < len(digest) <= 128):
            raise ValueError("its early_stop, remove_disconnected or image_digest entry is malformed")
        labels = record.get("labels")
        if not isinstance(labels, dict) or len(labels) > 1024:
            raise ValueError("its labels are not a mapping")
        moved = np.moveaxis(mask, axis, 0)
        boxes = _LabelBoxes(moved, [int(k) for k in labels if isinstance(k, str) and k.isascii() and k.isdigit()
                                    and 1 <= int(k) <= MAX_LABEL])
        out = dict(confidence={}, prompt_slices={}, keyframes={}, agreement={}, begin_state={}, slice_range={},
                   gaps={}, stops={}, disagree={})
        overlapped, lost_voxels = set(), {}
        for key, entry in labels.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and 1 <= int(key) <= MAX_LABEL
                    and isinstance(entry, dict)):
                raise ValueError(f"label {key!r} is malformed")
            lab = int(key)
            merged = own = boxes.mask(lab)  # the label in the result; ``own``: before the merge (lost voxels back)
            keys, walls = entry.get("keyframes"), entry.get("walls")
            if not all(isinstance(v, list) and all(_whole_in(s, 0, n - 1) for s in v) for v in (keys, walls)) \
                    or set(keys) & set(walls):
                raise ValueError(f"label {lab}'s keyframes or walls are not slices within 0-{n - 1}")
            out["confidence"][lab] = _floats_from_json(entry.get("confidence"), n, f"label {lab}'s confidence")
            if entry.get("agreement") is not None:
                out["agreement"][lab] = _floats_from_json(entry["agreement"], n, f"label {lab}'s agreement")
            out["begin_state"][lab] = state_from_json(entry.get("begin"))
            out["stops"][lab] = _stops_from_json(entry.get("stops", []), n, lab)
            if entry.get("overlapped") is True:
                overlapped.add(lab)
                if entry.get("lost_voxels") is not None:
                    lost_voxels[lab] = _runs_to_index(entry["lost_voxels"], moved, lab)
                    own = merged.copy()
                    own.flat[lost_voxels[lab]] = True
            out["prompt_slices"][lab] = sorted(keys)
            pairs = disagree_from_json(entry.get("disagree", []), keys, f"label {lab}'s keyframe disagreement")
            if pairs:
                out["disagree"][lab] = pairs
            frames = {s: own[s].copy() for s in keys}
            frames.update({s: np.zeros(moved.shape[1:], dtype=bool) for s in walls})
            out["keyframes"][lab] = dict(sorted(frames.items()))
            # what the result said of the label: its extent, and the empty slices between two of its
            # drawn slices (a wall between them is not one), as the run that wrote the record had them
            held = np.flatnonzero(boxes.rows(lab))
            if held.size:
                out["slice_range"][lab] = (int(held[0]), int(held[-1]))
            out["gaps"][lab] = empty_between_drawn(set(keys) | set(walls), keys, held.tolist())
        return cls(mask=mask, axis=axis, range=(lo_hi[0], lo_hi[1]), early_stop=flags[0],
                   remove_disconnected=flags[1], overlapped=frozenset(overlapped), image_digest=digest,
                   lost_voxels=lost_voxels, outward_wall_test=record.get("outward_wall_test") is True, **out)

    def notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        """Hints for the user: how walks ended (``drift_notes``), empty slices between drawn
        slices, voxels a label lost to labels propagated before it, slices between its drawn slices
        all taken by other labels."""
        return [text for _, text in self.kinds_of_notes(edited)]

    def kinds_of_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[tuple[str, str]]:
        """``notes()`` with what each is about: ``("drift", text)`` (the drift test ended a walk at
        a drawn slice: each front end names its own way to turn the test off), ``("gap", text)``,
        ``("thin", text)`` (slices between drawn slices holding far less than they suggest),
        ``("dropped", text)`` (an update: slices beyond the outermost drawn ones emptied),
        ``("lost", text)``, ``("cut", text)`` (slices between a label's drawn slices all taken by
        other labels), ``("disagree", text)`` (the walks between two drawn slices overlap nowhere:
        the result there is split, one drawing may be of another structure), ``("speck", text)``
        (a drawn slice holding a few voxels against the label's largest one: a stray click?),
        ``("whole", text)`` (drawn on every slice of its
        extent and found on no other: the result is the drawing), ``("nothing", text)`` (every walk
        ended at once on the network's word)."""
        out = [("labelmap", text) for text in self.label_map_notes()]
        out += [("point", text) for text in self.point_notes(edited)]
        out += [("speck", text) for text in self.speck_notes(edited)]
        out += [("drift", text) for text in self.drift_notes(edited)]
        out += [("whole", text) for text in self.whole_notes(edited)]
        out += [("nothing", text) for text in self.nothing_notes(edited)]
        def per_label(kind: str, lists: dict, say) -> None:  # a note per label with slices in ``lists``
            out.extend((kind, f"label {lab}: {say(_slice_list_text(sl), len(sl) == 1)}")
                       for lab, sl in sorted(lists.items()) if sl)

        per_label("gap", self.gaps, lambda where, one: f"between its drawn slices nothing was found on {where}; if "
                  "the object goes on there, draw it on one of them and update")
        per_label("thin", self.thin, lambda where, one: f"between its drawn slices, {where} hold{'s' if one else ''} "
                  "less than a third of what the drawn slices on either side suggest (the propagation shrank there); "
                  f"check {'it' if one else 'them'}, and if the object is larger there, draw it on one and update")
        per_label("dropped", self.dropped, lambda where, one: f"{where}, beyond its outermost drawn slices, held it "
                  f"in the result this update corrects and {'is' if one else 'are'} empty now (the walk from the "
                  "nearest drawn slice ended sooner); if the object goes on there, draw it on "
                  f"{'it' if one else 'one of them'} and update")
        for lab, pairs in sorted(self.disagree.items()):
            if not pairs:
                continue
            named = [f"{a} and {b}" for a, b, _ in pairs]
            where = named[0] if len(named) == 1 else ", ".join(named[:-1]) + ", and " + named[-1]
            out.append(("disagree", f"label {lab}: the walks between its drawn slices {where} do not meet (on no "
                                    "slice between do they overlap by a tenth), so halfway there the result "
                                    "switches from the object followed from one drawing to the one followed from the "
                                    "other; check that those drawings are of the same structure, and the slices "
                                    "between (draw one of them and update)"))
        for lab, (slices, by) in sorted(self.cut.items()):
            who = f"label {by[0]}" if len(by) == 1 else "labels " + ", ".join(map(str, by))
            out.append(("cut", f"label {lab}: between its drawn slices, {_slice_list_text(slices)} "
                               f"hold{'s' if len(slices) == 1 else ''} none of it ({who} took all of it there), so "
                               "it is cut in two; if it goes on there, draw it on one of them (labels propagated "
                               "earlier keep their voxels: --label, a manifest's label column or labels= in Python "
                               "sets the order)"))
        for lab, (by, own) in sorted(self.lost.items()):
            total = sum(by.values())
            if own and total >= max(0.05 * own, 1):
                who = ", ".join(f"{v} voxels to label {o}" for o, v in sorted(by.items(), key=lambda x: -x[1]))
                if total >= LEAK_FRACTION * own:  # not a border shared: one walk ran into the other's object
                    how = ("so much overlap means a walk ran on into a neighbouring label's object: find the first "
                           "slice where a label goes wrong, erase it there (or give it as an empty slice) and update")
                else:
                    how = ("labels propagated earlier keep such voxels: to change that, list this label first "
                           "(--label, a manifest's label column, labels= in Python)")
                out.append(("lost", f"label {lab} lost {total} of its {own} voxels ({100 * total / own:.0f} %) "
                                    f"where it overlapped labels propagated before it ({who}); {how}"))
        return out

    def label_map_notes(self) -> list[str]:
        """One note when the image looks like a label map (``image_levels``): PAM follows a scan's
        intensities and edges, so a segmentation given as the image (the two files swapped, or the
        label map exported in the scan's place) gives a result that follows its labels' borders."""
        if not self.image_levels:
            return []
        levels = self.image_levels
        shown_levels = ", ".join(f"{v:g}" for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
        return [f"the image holds only {len(levels)} distinct values ({shown_levels}), in flat regions: it looks like "
                "a label map, not a scan; PAM follows a scan's intensities and edges, so if the label map was given "
                "in the scan's place, run again with the scan as the image (in Slicer, the volume)"]

    def nothing_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        """One note when every walk of every label ended at once because the network said the object
        is not there (``presence``): the result is the drawn slices alone. A checkpoint whose
        object-present output always says "absent" gave exactly that with exit 0 and no word (a
        fuzzing trial, session 37); a structure on one slice only can give it too, hence "if".
        Not after an update (its walks are corrections')."""
        if self.edited if edited is None else edited:
            return []
        walks = [w for stops in self.stops.values() for w in stops if w["reason"] != "end"]
        if self.presence_by != "network" or len(walks) < 2 or not all(
                w["reason"] == "presence" and w["last"] == w["start"] for w in walks):
            return []
        walked = {lab for lab, stops in self.stops.items() if any(w["reason"] != "end" for w in stops)}
        if walked <= set(self._whole_labels(edited)):  # every label a finished segmentation: the "whole" notes say
            return []  # it (the network was right that each object ends there)
        return ["the network found no object on any slice next to the drawn ones (every walk ended at once), so the "
                "result is the drawing alone; if the structure goes on there, the weights may not suit this image: "
                "try the registration tracker (--method track; in Slicer, Registration tracking) or other weights"]

    def whole_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        """A note per label drawn on three or more slices in one unbroken run and found on no other
        slice: the result is the drawing itself, which a finished segmentation given as the prompt
        leaves (a trial, session 36: a kidney's reference segment on 22 of 118 sagittal slices was
        taken as keyframes and came back unchanged, with only the drift test's hint). Not after an
        update (``edited``, None: ``self.edited``): its keyframes are corrections."""
        return [f"label {lab}: drawn on every slice from {first} to {last} and found on no other, so the result is "
                "the drawing itself (a finished segmentation given as the prompt?); to propagate, give one drawn "
                "slice or a few apart" for lab, (first, last) in self._whole_labels(edited).items()]

    def _whole_labels(self, edited: dict[int, Sequence[int]] | None = None) -> dict[int, tuple[int, int]]:
        """``whole_notes``' labels: {label: (first, last drawn slice)}."""
        if self.edited if edited is None else edited:
            return {}
        out, voxels = {}, None
        for lab, frames in sorted(self.keyframes.items()):
            drawn = sorted(int(k) for k, m in frames.items() if np.any(m))
            if len(drawn) < 3 or drawn[-1] - drawn[0] + 1 != len(drawn):
                continue
            # both ways a walk went out and found nothing: not where --range, a wall or the image's edge
            # stopped it (then the drawing is all there was to find; a re-review, session 36)
            walks = {(int(w["start"]), int(w["direction"])) for w in self.stops.get(lab, []) if w["reason"] != "end"}
            if not {(drawn[0], -1), (drawn[-1], 1)} <= walks:
                continue
            voxels = self.slice_voxels() if voxels is None else voxels
            if lab in voxels and set(np.flatnonzero(voxels[lab]).tolist()) <= set(drawn):
                out[lab] = (drawn[0], drawn[-1])
        return out

    def specks(self, edited: dict[int, Sequence[int]] | None = None) -> dict[int, list[tuple[int, int, int, int]]]:
        """Per label, its drawn slices holding at most SPECK_VOXELS voxels and at most SPECK_FRACTION
        of its largest drawn slice's, as (slice, voxels, largest slice, its voxels): a stray click or
        a speck of the brush, which the walks take as a drawn slice of the object (one voxel beside a
        drawn liver cut it at that slice). ``edited``: slices drawn in an update (an organ's tip there
        is what the user meant), left out (None: ``self.edited``, what this update's call found)."""
        edited = self.edited if edited is None else edited
        out = {}
        for lab, frames in self.keyframes.items():
            counts = {int(k): int(np.count_nonzero(m)) for k, m in frames.items()}
            counts = {k: v for k, v in counts.items() if v}  # walls (empty slices) are not drawings
            if len(counts) < 2:
                continue
            top = max(counts, key=counts.get)
            quiet = set((edited or {}).get(lab, ()))
            small = [(k, v, top, counts[top]) for k, v in sorted(counts.items())
                     if k not in quiet and v <= SPECK_VOXELS and v <= SPECK_FRACTION * counts[top]]
            if small:
                out[lab] = small
        return out

    def points(self, edited: dict[int, Sequence[int]] | None = None) -> dict[int, tuple[int, int]]:
        """Labels drawn on one slice only, as at most POINT_VOXELS voxels, as {label: (the slice, its
        voxels)}: a click, as point-prompt tools take (a trial, session 46: one voxel in a liver came
        back as 3 voxels, with a note to turn the drift test off, which changed nothing). A structure
        drawn whole on several slices, or 3 voxels or more, is not one (a review: a 4-voxel vessel's
        drift notes were right). Not after an update (``edited``, None: ``self.edited``): a tip drawn
        there is the user's word."""
        if self.edited if edited is None else edited:
            return {}
        out = {}
        for lab, frames in self.keyframes.items():
            counts = {int(k): int(np.count_nonzero(m)) for k, m in frames.items() if np.any(m)}
            if len(counts) == 1 and next(iter(counts.values())) <= POINT_VOXELS:
                out[lab] = next(iter(counts.items()))
        return out

    def point_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        return [f"label {lab}: drawn as {n} voxel{'s' if n != 1 else ''} (slice {k}): PAM follows the outline "
                "drawn, it does not grow a region from a point as click-based tools do; if the object is larger, "
                "paint its whole cross-section on the slice and run again"
                for lab, (k, n) in sorted(self.points(edited).items())]

    def speck_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        out = []
        for lab, small in sorted(self.specks(edited).items()):
            what = "; ".join(f"slice {k} holds {v} voxel{'s' if v != 1 else ''} against {n} on slice {top}"
                             for k, v, top, n in small)
            which = "it" if len(small) == 1 else "them"
            out.append(f"label {lab}: {what}, and the walks took {which} as drawn: a stray click, or the "
                       f"object's tip? If a stray click, erase {which} and run again")
        return out

    def drift_notes(self, edited: dict[int, Sequence[int]] | None = None) -> list[str]:
        """The notes of walks the intensity drift test ended right beside a drawn slice: turning
        the test off is the remedy (the command line adds its option, Slicer its checkbox).
        ``edited``: per label, slices the user just drew in an update; a walk from one of them that
        ends at once is what the drawing says (an organ's last slice), not a hint (None:
        ``self.edited``, what this update's call found)."""
        edited = self.edited if edited is None else edited
        out = []
        specks = self.specks(edited)
        points = self.points(edited)  # (the point note says what to do: the drift test is not the cause)
        voxels = None
        for lab, stops in self.stops.items():
            if lab in points:
                continue
            # a walk from a speck that ends at once: the speck, not the tissue, is what to look at
            quiet = set((edited or {}).get(lab, ())) | {k for k, *_ in specks.get(lab, [])}
            drift = [s for s in stops if s["reason"] == "drift" and s["start"] not in quiet]
            at_once = [s for s in drift if s["last"] == s["start"]]
            if at_once:
                sides = " and ".join("after" if s["direction"] > 0 else "before" for s in at_once)
                out.append(f"label {lab}: the intensity drift test ended the propagation right {sides} the drawn "
                           "slice (the next slice looked like different tissue); if the structure goes on there, "
                           "run again with the drift test off")
            near = [s for s in drift if 0 < abs(s["last"] - s["start"]) <= DRIFT_NOTE_SLICES]
            if near:  # a few slices on, while the object was still large: cut off, not tapering to its end
                voxels = self.slice_voxels() if voxels is None else voxels
                v = voxels.get(lab)
                for s in near:
                    share = v[s["last"]] / max(int(v[s["start"]]), 1) if v is not None else 0.0
                    if share < DRIFT_NOTE_AREA:
                        continue
                    n = abs(s["last"] - s["start"])
                    side = "after" if s["direction"] > 0 else "before"
                    out.append(f"label {lab}: the intensity drift test ended the propagation {n} slice"
                               f"{'s' if n > 1 else ''} {side} the drawn slice {s['start']}, where the object still "
                               f"covered {100 * share:.0f} % of its drawn area (the next slice looked like different "
                               "tissue: a neighbour, or a thinner part of the object where stopping may be right, as "
                               "at a vertebra's spinous process); if the structure goes on there, run again with the "
                               "drift test off")
        return out

    def slice_voxels(self) -> dict[int, np.ndarray]:
        """Per label, its voxels on each slice along ``axis`` (one pass over the slices)."""
        labels = sorted(self.confidence)
        n = self.mask.shape[self.axis]
        out = {lab: np.zeros(n, dtype=np.int64) for lab in labels}
        top = int(self.mask.max()) if self.mask.size else 0
        for k in range(n):
            counts = np.bincount(np.take(self.mask, k, axis=self.axis).ravel().astype(np.int64), minlength=top + 1)
            for lab in labels:
                if lab <= top:
                    out[lab][k] = counts[lab]
        return out

    def slice_table(self, voxels: dict[int, np.ndarray] | None = None) -> list[dict]:
        """One row per label and slice that holds the label or was predicted for it, in slice
        order: ``label``, ``slice`` (along ``axis``), ``voxels`` (of the label on that slice),
        ``drawn`` (a drawn slice, kept as drawn), ``confidence`` (the engine's confidence in a
        predicted slice; None where drawn; review ranks the thin and dropped slices first beside it,
        ``review_confidence``) and ``walk_end`` (on the last
        slice holding the object of a walk that ended there: what ended it, a ``stops`` reason;
        blank with ``early_stop=False``, and between keyframes, where no walk ends).
        ``voxels``: ``slice_voxels()``, if already computed."""
        voxels = self.slice_voxels() if voxels is None else voxels
        rows = []
        for lab in sorted(self.confidence):
            conf = np.asarray(self.confidence[lab], dtype=np.float64)
            area = voxels[lab]
            drawn = set(self.prompt_slices.get(lab, []))
            ends: dict[int, list[str]] = {}
            for stop in self.stops.get(lab, []):
                if stop.get("last") is not None:
                    last = int(stop["last"])
                    # The component filter may have emptied the walk's last slices (one touching its
                    # neighbour only diagonally, under the published walk's 6-connectivity): the end
                    # is marked on the last slice that still holds the object on that side.
                    step = -1 if int(stop.get("direction", 1)) > 0 else 1
                    start = int(stop.get("start", last))
                    while last != start and 0 <= last < len(area) and not area[last]:
                        last += step
                    ends.setdefault(last, []).append(str(stop["reason"]))
            for k in range(len(conf)):
                if not area[k] and not np.isfinite(conf[k]) and k not in drawn and k not in ends:
                    continue
                rows.append({"label": int(lab), "slice": k, "voxels": int(area[k]), "drawn": k in drawn,
                             "confidence": None if k in drawn or not np.isfinite(conf[k]) else float(conf[k]),
                             "walk_end": "+".join(ends.get(k, []))})
        return rows

    def review_first(self, label: int, n: int = 3, voxels: dict[int, np.ndarray] | None = None) -> list[int]:
        """The ``n`` predicted slices holding ``label`` with the lowest confidence (``review_order``,
        as Slicer's *Next slice to review* steps through them): the ones to check first.
        ``voxels``: ``slice_voxels()``, if already computed."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"n must be a whole number of slices, 0 or more, got {n!r}")
        lab = int(label)
        if lab not in self.confidence:
            raise InputError(f"label {lab} was not propagated in this result (its labels: "
                             f"{', '.join(map(str, sorted(self.confidence))) or 'none'})")
        area = self.slice_voxels()[lab] if voxels is None else voxels[lab]
        # the slices holding it, and the empty ones between two of its drawn slices (where it may go on)
        candidates = sorted(set(np.flatnonzero(area).tolist()) | set(self.gaps.get(lab, ()))
                            | set(self.cut.get(lab, ((), ()))[0]))
        return review_order(self.review_confidence(lab), keyframes=self.prompt_slices.get(lab, []),
                            candidates=sorted(set(candidates) | set(self.dropped.get(lab, ()))))[:n]

    def review_confidence(self, label: int) -> np.ndarray:
        """``confidence[label]`` as review ranks the slices: 0 on the slices the thin and dropped
        notes name (the result's own confidence stays as the walks gave it, so that an update and a
        fresh run of the same keyframes agree)."""
        return flagged_first(self.confidence[int(label)],
                             (*self.thin.get(int(label), ()), *self.dropped.get(int(label), ())))

    def review_summary(self, voxels: dict[int, np.ndarray] | None = None, names: dict[int, str] | None = None) -> str:
        """``label 1: 28, 2, 29; label 2: ...``: each label's slices to check first ("" if none);
        ``names``: labels' names (a .seg.nrrd's segments), said beside their numbers."""
        voxels = self.slice_voxels() if voxels is None else voxels
        parts = []
        for lab in self.confidence:  # in the order they were propagated, as ``summary`` lists them
            first = self.review_first(lab, voxels=voxels)
            if first:
                parts.append(f"{_label_text(lab, names)}: {', '.join(map(str, first))}")
        return "; ".join(parts)

    def summary(self, plane: str | None = None, names: dict[int, str] | None = None) -> str:
        """``label 1: slices 4-20; ... (axis 0); 17 slices predicted in 0.3 s``; ``plane``: what the
        slices are called (``volumes.plane_name``: "axial" ...), said after the axis; ``names``:
        labels' names (``label 1 (liver): ...``)."""
        parts = [f"{_label_text(lab, names)}: slices {a}-{b}" for lab, (a, b) in self.slice_range.items()]
        where = f"axis {self.axis}" + (f", {plane} slices" if plane else "")
        return (f"{'; '.join(parts)} ({where}); {self.n_predicted} slices predicted in "
                f"{self.timings.get('total', 0):.1f} s")


def _label_text(lab: int, names: dict[int, str] | None) -> str:
    name = (names or {}).get(lab)
    if name and len(name) > 60:  # a summary line, not the whole name (a .seg.nrrd may hold 999 characters)
        name = name[:57] + "..."
    return f"label {lab}" + (f" ({name})" if name else "")


def _json_floats(values) -> list:
    """Per-slice values as JSON: NaN (not predicted) as null, float32 exactly."""
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float32)]


def _floats_from_json(values, n: int, what: str) -> np.ndarray:
    """A record's per-slice confidence or agreement: ``n`` numbers from 0 to 1 or nulls (1e308 passed
    as finite and became inf, with numpy's overflow warning, review s28)."""
    if not (isinstance(values, list) and len(values) == n
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and -1e-5 <= v <= 1 + 1e-5)
                    for v in values)):
        raise ValueError(f"{what} is not {n} numbers from 0 to 1 (or nulls)")
    # (the engine accepts a predictor's probability up to 1 + 1e-6, so a record may hold 1.0000004)
    return np.clip(np.array([np.nan if v is None else v for v in values], dtype=np.float32), 0.0, 1.0)


_STOP_REASONS = ("presence", "drift", "area", "consistency", "agreement", "end")


def stops_to_json(stops) -> list[dict]:
    """A label's ``PropagationResult.stops`` as records keep them (the command line's and the one
    Slicer saves with a segment); ``_stops_from_json`` reads them back."""
    return [{"start": int(s["start"]), "direction": int(s["direction"]), "last": int(s["last"]),
             "reason": str(s["reason"])} for s in stops]


def _stops_from_json(stops, n: int, lab: int) -> list[dict]:
    """A record's ``stops`` of one label, checked (from an untrusted file): start and last slices
    within 0..n-1, direction +1 or -1, a known reason."""
    if not isinstance(stops, list) or len(stops) > 4 * n + 8 or not all(
            isinstance(s, dict) and _whole_in(s.get("start"), 0, n - 1) and _whole_in(s.get("last"), 0, n - 1)
            and s.get("direction") in (-1, 1) and not isinstance(s.get("direction"), bool)
            and (s["last"] - s["start"]) * s["direction"] >= 0  # a walk ends on its own side
            and s.get("reason") in _STOP_REASONS for s in stops):
        raise ValueError(f"label {lab}'s stops are not walk endings within 0-{n - 1}")
    return [{"start": s["start"], "direction": s["direction"], "last": s["last"], "reason": s["reason"]}
            for s in stops]


MAX_LOST_RUNS = 100_000  # a record keeps at most this many runs of a label's lost voxels (else it recomputes)
MAX_LOST_RUNS_ALL = 1_000_000  # and of all labels together (about 17 MB of JSON; records over 64 MB are refused)


def _index_runs(index) -> list[list[int]] | None:
    """Sorted flat indices as runs ``[[start, length], ...]`` (JSON), None if there are none or too many."""
    if index is None:
        return None
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    if starts.size > MAX_LOST_RUNS:
        return None
    lengths = np.diff(np.concatenate([starts, [index.size]]))
    return [[int(index[a]), int(n)] for a, n in zip(starts, lengths)]


def _runs_to_index(runs, moved: np.ndarray, lab: int) -> np.ndarray:
    """``_index_runs`` read back from an untrusted record and checked against the label map (axis
    first): ascending, disjoint runs within it, on voxels that now hold another label (lost ones)."""
    if not isinstance(runs, list) or len(runs) > MAX_LOST_RUNS or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            for r in runs):
        raise ValueError(f"label {lab}'s lost voxels are not runs of [start, length]")
    end = -1
    for start, length in runs:
        if start <= end or length < 1 or start + length > moved.size:
            raise ValueError(f"label {lab}'s lost voxels are not ascending runs within the label map")
        end = start + length - 1
    index = (np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in runs]) if runs
             else np.zeros(0, dtype=np.int64))
    held = moved.reshape(-1)[index]
    if ((held == 0) | (held == lab)).any():
        raise ValueError(f"label {lab}'s lost voxels are not all held by another label in the result")
    return index


def _whole_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def review_order(confidence, reviewed=(), keyframes=(), candidates=None) -> list[int]:
    """Slices to review, least confident first (ties: lower slice first).

    Skips slices without a confidence (NaN: not predicted), the user's own slices (``keyframes``)
    and slices already ``reviewed``; with ``candidates`` (slice indices) only those are ranked -
    the module passes the slices that hold the object, so the views never jump to an empty slice."""
    conf = np.asarray(confidence, dtype=float)
    skip = {int(s) for s in reviewed} | {int(s) for s in keyframes}
    pool = range(conf.size) if candidates is None else sorted({int(s) for s in candidates if 0 <= int(s) < conf.size})
    ranked = [s for s in pool if s not in skip and np.isfinite(conf[s])]
    return sorted(ranked, key=lambda s: (conf[s], s))


# Labels a result can hold (it is written as uint8 or uint16).
MAX_LABEL = 65535
# A prompt holding negative values, or more different values than this, looks like an image.
IMAGE_LIKE_VALUES = 1000


def _not_whole(what: str, values: np.ndarray) -> str:
    """The refusal of a float label map holding a value that is not a whole number (a probability
    map or a resampled mask), naming one (a Python API trial, session 36: only "must be an integer
    label map")."""
    if not np.all(np.isfinite(values)):  # not a probability: thresholding would make them 0 silently
        return f"{what} holds NaN or infinite values; replace them (a label map holds 0 = background, 1, 2 ...)"
    odd = values[np.mod(values, 1) != 0].flat[0]
    return (f"{what} must be an integer label map, but it holds {float(odd):.4g}: a probability or a mask "
            "resampled with interpolation? Threshold it (mask > 0.5) or resample it with nearest neighbour, then "
            "give it as integers (.astype(np.uint16))")


def _image_like(present: Sequence[int]) -> str:
    """Why a prompt holding the (sorted) values ``present`` looks like an image, as a hint; "" if not."""
    why = (["negative values"] if present[0] < 0 else []) + (
        [f"{len(present)} different values"] if len(present) > IMAGE_LIKE_VALUES else [])
    if not why:
        return ""
    return f"the prompt holds {' and '.join(why)}, as an image does: are the image and the prompt swapped?"


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``mask`` cropped to the bounding box of its non-zero values (all of it if none), and the box's
    first index per axis. One pass over the whole array, then one over the slices it found (four passes
    over the whole array before: 0.04 s a prompt at 512 x 512 x 300)."""
    if mask.ndim == 0 or mask.size == 0:
        return mask, (0,) * mask.ndim
    nz = np.flatnonzero(mask.any(axis=tuple(range(1, mask.ndim))))
    if not nz.size:
        return mask, (0,) * mask.ndim
    sl = [slice(int(nz[0]), int(nz[-1]) + 1)]
    if mask.ndim > 1:
        across = mask[sl[0]].any(axis=0)  # one pass over those slices: a boolean of the other axes' shape
        for ax in range(1, mask.ndim):
            nz = np.flatnonzero(across.any(axis=tuple(a for a in range(mask.ndim - 1) if a != ax - 1)))
            sl.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return mask[tuple(sl)], tuple(s.start for s in sl)


def _label_boxes(prompt: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[np.ndarray, tuple[int, ...]]]:
    """Per label of ``labels`` (each present in ``prompt``): its mask cropped to its bounding box and
    the box's first index per axis, as ``_bounding_box(prompt == label)`` gives them (a copy of the
    box: a view would keep each label's whole mask). ``_sparse_label_boxes`` where it applies."""
    boxes = _sparse_label_boxes(prompt, labels)
    if boxes is not None:
        return boxes
    boxes = {}
    for lab in labels:
        box, start = _bounding_box(prompt == int(lab))
        boxes[int(lab)] = (box.copy() if box.size < prompt.size else box, start)
    return boxes


def _sparse_label_boxes(prompt: np.ndarray,
                        labels: Sequence[int]) -> dict[int, tuple[np.ndarray, tuple[int, ...]]] | None:
    """``_label_boxes`` from ``_sparse_label_extents`` (None where that is None)."""
    extents = _sparse_label_extents(prompt, labels)
    if extents is None:
        return None
    boxes = {}
    for lab, box in extents.items():
        if box is None:  # (as _bounding_box gives an empty mask)
            boxes[lab] = (np.zeros(prompt.shape, dtype=bool), (0,) * prompt.ndim)
        else:
            boxes[lab] = (prompt[box] == lab, tuple(b.start for b in box))
    return boxes


def _sparse_label_extents(prompt: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...] | None] | None:
    """Each label's bounding box in ``prompt`` (None where it is absent), in one pass: a drawing is
    sparse (a few slices of a volume), so the boxes come from the drawn voxels' positions, not from
    passes over the whole volume a label (100 labels drawn along a 512 x 512 x 1000 volume took 400
    such passes, and held a whole-box mask a label). None for a prompt of non-integer values, of one
    label, or dense (more than 1/40 of it drawn: the positions take up to 40 bytes a drawn voxel
    where one label's mask takes 1 byte a voxel)."""
    labels = [int(v) for v in labels]
    if prompt.dtype.kind not in "iu" or not prompt.size or len(labels) < 2:
        return None
    drawn = prompt != 0
    if int(np.count_nonzero(drawn)) * 40 > prompt.size:
        return None
    where = np.flatnonzero(drawn)  # (C order, as prompt[drawn] lists the values)
    values = prompt[drawn]
    del drawn
    order = np.argsort(values, kind="stable")
    values, where = values[order], where[order]
    del order
    extents: dict[int, tuple[slice, ...] | None] = {}
    for lab in labels:
        first, last = np.searchsorted(values, lab, side="left"), np.searchsorted(values, lab, side="right")
        if first == last:
            extents[lab] = None
            continue
        coords = np.unravel_index(where[first:last], prompt.shape)
        extents[lab] = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return extents


LABEL_BOXES_FROM = 8  # labels from which _LabelBoxes finds their boxes in one pass (~7 per-label passes' time)


class _LabelBoxes:
    """Each label's voxels in a dense label map (an earlier result, its corrected copy) read within
    the label's bounding box: with ``LABEL_BOXES_FROM`` or more labels of an integer map the boxes
    come from one pass (scipy's ``find_objects``), not from passes over the whole volume a label
    (an update of 49 labels on 256 x 256 x 600 spent about 5 s so); with fewer labels, or a map of
    other values, every question is one such pass, as before."""

    def __init__(self, labelmap: np.ndarray, labels) -> None:
        self.map = labelmap
        labels = sorted({int(v) for v in labels})
        self.boxes: dict[int, tuple[slice, ...] | None] | None = None
        if labelmap.dtype.kind in "iu" and len(labels) >= LABEL_BOXES_FROM and labels[0] >= 1 and labelmap.size:
            from scipy import ndimage  # noqa: PLC0415

            found = ndimage.find_objects(labelmap, max_label=labels[-1])
            self.boxes = {lab: found[lab - 1] for lab in labels}

    def _box(self, lab: int):
        """(True, box or None) where known, (False, None) where a whole-map comparison answers."""
        if self.boxes is None or int(lab) not in self.boxes:
            return False, None
        return True, self.boxes[int(lab)]

    def mask(self, lab: int) -> np.ndarray:
        """``labelmap == lab``."""
        known, box = self._box(lab)
        if not known:
            return self.map == lab
        out = np.zeros(self.map.shape, dtype=bool)
        if box is not None:
            out[box] = self.map[box] == lab
        return out

    def rows(self, lab: int) -> np.ndarray:
        """Per slice along axis 0, whether it holds ``lab``: ``(labelmap == lab).any(axis=(1, 2))``."""
        known, box = self._box(lab)
        if not known:
            return (self.map == lab).any(axis=tuple(range(1, self.map.ndim)))
        out = np.zeros(self.map.shape[0], dtype=bool)
        if box is not None:
            out[box[0]] = (self.map[box] == lab).any(axis=tuple(range(1, self.map.ndim)))
        return out

    def holds(self, lab: int) -> bool:
        """``(labelmap == lab).any()``."""
        known, box = self._box(lab)
        return bool((self.map == lab).any()) if not known else box is not None


def _thickness(mask: np.ndarray, ax: int) -> int:
    """The longest run of consecutive True voxels along axis ``ax``, capped at 3 (0 if empty)."""
    m = np.moveaxis(mask, ax, 0)
    if m.shape[0] >= 3 and (m[:-2] & m[1:-1] & m[2:]).any():
        return 3
    if m.shape[0] >= 2 and (m[:-1] & m[1:]).any():
        return 2
    return int(m.any())


def _slice_list_text(slices: Sequence[int]) -> str:
    """``slice 4`` or ``slices 4-11, 13``."""
    return f"slice{'s' if len(slices) > 1 else ''} {runs_text(slices)}"


def _on(ax: int, slices: Sequence[int], plane_names: Sequence[str] | None) -> str:
    """``axial slices 11, 13`` with plane names, else ``slices 11, 13 along axis 0``."""
    word = "slice" if len(slices) == 1 else "slices"
    if plane_names is not None:
        return f"{plane_names[ax]} {word} {runs_text(slices)}"
    return f"{word} {runs_text(slices)} along axis {ax}"


# A drawn slice holding only a line (two or more voxels in one row) of at most this fraction of
# the largest drawn slice's voxels, beside a slice that reaches the same row, is the trace of a
# stroke drawn in a perpendicular view, not a keyframe (find_prompt_slices).
STROKE_FRACTION = 0.25
STROKE_MIN_VOXELS = 5  # a shorter lone line beyond the outermost drawn slice is the object's tip
# A drawn slice with at most SPECK_VOXELS voxels and at most SPECK_FRACTION of the label's largest
# drawn slice's is named in a note (PropagationResult.specks): a stray click, kept as drawn.
SPECK_VOXELS = 30
POINT_VOXELS = 2  # a label drawn on one slice with no more voxels: a click (``PropagationResult.points``)
SPECK_FRACTION = 0.02
# A label that lost at least this share of its voxels to labels propagated before it ran into a
# neighbour's object (a note says so, not "list it first", which would only move the error).
LEAK_FRACTION = 0.3


def _stroke_lines(box: np.ndarray, start: Sequence[int], ax: int) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """The drawn slices along ``ax`` (volume indices) that hold nothing but a line one voxel thin
    (two voxels or more, all in one row) lying in a plane of another axis, a plane the next or
    previous drawn slice also reaches: what a stroke drawn in a perpendicular view leaves on the
    slices it crosses. A single voxel counts only as the end of such a line (a sphere brush leaves
    one at each pole). Returns {slice: (that axis, the plane's index along it)} and every drawn
    slice's voxel count. ``box``: the label's mask cropped to its bounding box, which starts at
    ``start``."""
    m = np.moveaxis(box, ax, 0)
    in_plane = [a for a in range(3) if a != ax]
    counts = m.sum(axis=(1, 2))
    rows = (m.any(axis=2), m.any(axis=1))  # per slice, the indices it reaches along each in-plane axis
    lines: dict[int, tuple[int, int]] = {}  # box slice -> (which in-plane axis, box index along it)
    for s in np.flatnonzero(counts > 1):
        for which, reached in enumerate(rows):
            idx = np.flatnonzero(reached[s])
            if len(idx) == 1 and any(0 <= t < len(m) and reached[t, idx[0]] for t in (s - 1, s + 1)):
                lines[int(s)] = (which, int(idx[0]))
                break
    dots = [int(s) for s in np.flatnonzero(counts == 1)]
    while dots:  # single voxels continuing a line in its plane
        found = [(s, lines[t]) for s in dots for t in (s - 1, s + 1) if t in lines and rows[lines[t][0]][s, lines[t][1]]]
        if not found:
            break
        lines.update(found)
        dots = [s for s in dots if s not in lines]
    return ({s + start[ax]: (in_plane[w], r + start[in_plane[w]]) for s, (w, r) in lines.items()},
            {int(s) + start[ax]: int(counts[s]) for s in np.flatnonzero(counts)})


def _mixed_planes_error(lab: int, ax: int, lines: dict[int, tuple[int, int]], drawn: Sequence[int],
                        plane_names: Sequence[str] | None, max_slices: int | None = None) -> InputError:
    """The refusal of a label drawn on slices along ``ax`` and on the planes ``lines`` cross them
    in: a stroke to erase, or with ``max_slices`` (too many slices for keyframes) two drawings."""
    main = [s for s in drawn if s not in lines]
    planes = " and ".join(_on(b, [r], plane_names) for b, r in sorted(set(lines.values())))
    only = plane_names[ax] + " slices" if plane_names is not None else f"slices along axis {ax}"
    verb = "holds" if len(lines) == 1 else "hold"
    found = (f"label {lab} is drawn on more than one plane: {_on(ax, main, plane_names)} and {planes} "
             f"({_on(ax, sorted(lines), plane_names)} {verb} nothing but its line, one voxel thin")
    if max_slices is not None:
        return InputError(f"{found}); that is not a slice prompt: draw it on slices of one plane only (one slice, "
                          f"or a few keyframes, at most {max_slices}), then try again")
    return InputError(f"{found}: a stroke drawn in another view?); erase what is drawn on {planes} and draw on "
                      f"{only} only, then try again")


def too_many_keyframes(count: int, n_slices: int, max_slices: int = MAX_PROMPT_SLICES) -> bool:
    """More drawn slices than PAM takes as keyframes: over ``max_slices``, or (beyond two) over half
    the slices along the axis (then it is a 3D mask, not a prompt)."""
    return count > max_slices or (count > 2 and count > n_slices // 2)


def keyframe_limit(n_slices: int, max_slices: int = MAX_PROMPT_SLICES) -> int:
    """The most keyframes ``too_many_keyframes`` allows along an axis of ``n_slices`` (at least 2)."""
    return max(2, min(max_slices, n_slices // 2))


def find_prompt_slices(prompt: np.ndarray, axis: int | None = None, labels: Sequence[int] | None = None,
                       max_slices: int = MAX_PROMPT_SLICES, *, plane_names: Sequence[str] | None = None,
                       update: bool = False) -> tuple[int, dict[int, list[int]]]:
    """Propagation axis and, per label, the slices the prompt is drawn on.

    The axis, unless given, is the one along which the drawing is thinnest (drawn slices are one
    voxel thick along it, two where keyframes are adjacent), then occupies the fewest slices
    (summed over labels). A label drawn on slices of another axis than the chosen one is refused,
    and so is one whose extra slices hold only the thin line a stroke drawn in a perpendicular
    view leaves on them (next to a drawn slice, at most STROKE_FRACTION of the largest one's
    voxels), unless ``update`` (the slices are an earlier result's, edited: a thin slice there is
    the object's tip). ``plane_names``: what the slices perpendicular to each axis are called
    (e.g. axial, coronal, sagittal), for the messages.
    """
    if prompt.ndim != 3:
        raise InputError(f"the prompt must be a 3D label map, got {prompt.ndim}D")
    # Everything below works on the drawing's bounding box (its first index per axis: ``offset``):
    # passes over the whole volume would cost a second at 512 x 512 x 400.
    cropped, offset = _bounding_box(prompt)  # (no boolean copy of the whole prompt)
    drawn = cropped != 0
    box = tuple(slice(o, o + n) for o, n in zip(offset, drawn.shape))
    present = [int(v) for v in np.unique(prompt[box][drawn])]
    if not present:
        raise InputError("the prompt is empty: draw the object on one slice (label > 0) and try again")
    image_like = _image_like(present)
    bad = [v for v in present if not 1 <= v <= MAX_LABEL]
    if bad:
        raise InputError(f"the prompt has label {bad[0]}: labels must be whole numbers from 1 to {MAX_LABEL} "
                         f"(0 = background); {image_like or 'renumber the label map'}")
    try:
        return _drawn_slices(prompt[box], present, axis, labels, max_slices, plane_names, update,
                             offset=offset, full_shape=prompt.shape)
    except InputError as error:
        if not image_like:
            raise
        raise InputError(f"{error}; {image_like}") from None


def _drawn_slices(prompt: np.ndarray, present: list[int], axis: int | None, labels: Sequence[int] | None,
                  max_slices: int, plane_names: Sequence[str] | None, update: bool, *,
                  offset: Sequence[int] = (0, 0, 0), full_shape: Sequence[int] | None = None,
                  ) -> tuple[int, dict[int, list[int]]]:
    """find_prompt_slices past its checks of the prompt's values (``present``: its labels, sorted).
    ``prompt`` may be a box of the whole prompt (``full_shape``) starting at index ``offset``."""
    full_shape = tuple(prompt.shape) if full_shape is None else tuple(full_shape)
    if labels is None:
        labels = present
    else:
        missing = [int(v) for v in labels if int(v) not in present]
        if missing:
            raise InputError(
                f"label {shown(missing[0])} is not in the prompt; labels present: {', '.join(map(str, present[:20]))}"
                + (f" ... ({len(present)} in all)" if len(present) > 20 else "")
            )
        labels = [int(v) for v in labels]
    if axis is not None and axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {shown(axis)}")

    # Each label's mask once, cropped to its bounding box (and where that box starts).
    boxes, starts = {}, {}
    for lab, (box, start) in _label_boxes(prompt, labels).items():
        boxes[lab] = box
        starts[lab] = tuple(int(a) + int(b) for a, b in zip(start, offset))

    def occupied(lab, ax):
        other = tuple(a for a in range(3) if a != ax)
        return (np.flatnonzero(boxes[lab].any(axis=other)) + starts[lab][ax]).tolist()

    # The label's longest run of voxels along each axis (capped at 3): 1 (2 for adjacent keyframes)
    # along the axis whose slices it was drawn on, the object's extent along the others.
    thick = {(lab, ax): _thickness(boxes[lab], ax) for lab in labels for ax in range(3)}

    # The drawn axis: the one along which the drawing is thinnest, then has the fewest slices.
    # Counting slices alone picks the wrong axis for a thin object drawn on several keyframes (a
    # 3-px tube drawn on 4 axial slices crosses only 3 coronal ones).
    axes = [axis] if axis is not None else [0, 1, 2]
    key = {ax: (max(thick[lab, ax] for lab in labels), sum(len(occupied(lab, ax)) for lab in labels), ax)
           for ax in axes}
    best = min(axes, key=key.get)
    slices = {lab: occupied(lab, best) for lab in labels}
    n_axis = full_shape[best]

    def three_d_error(lab, note=""):
        # Mostly slices holding only the line of a drawing on another plane: two drawings (e.g. a
        # whole axial and a whole coronal slice), not a 3D mask.
        lines, _ = _stroke_lines(boxes[lab], starts[lab], best)
        if lines and len(lines) >= len(slices[lab]) - len(lines):
            return _mixed_planes_error(lab, best, lines, slices[lab], plane_names, max_slices)
        where = (f"{len(slices[lab])} of {n_axis} "
                 f"{f'{plane_names[best]} slices' if plane_names is not None else f'slices along axis {best}'}")
        return DrawnIn3D(
            f"label {lab} is drawn on {where}: that is a 3D mask, not a slice prompt{note}; draw it on one slice (or a "
            f"few keyframes: at most {max_slices}, and on at most half the slices)", where=where)

    # Labels that are 3D masks (thick along every axis, so drawn on no plane, and on too many
    # slices of this axis), named before the plane checks below: in a finished segmentation given
    # as the prompt, a thin structure (a rib) would otherwise be reported as drawn on another plane.
    solid = [lab for lab in labels if all(thick[lab, ax] >= 3 for ax in range(3))
             and too_many_keyframes(len(slices[lab]), n_axis, max_slices)]
    if solid:
        note = (f" ({len(solid)} of the {len(labels)} labels are: is the prompt a finished segmentation?)"
                if len(solid) > 1 else "")
        raise three_d_error(solid[0], note)
    for lab, sl in slices.items():
        # A label drawn on slices of another plane crosses the chosen axis's slices as thin lines,
        # which would be taken as keyframes: refuse rather than return little more than the drawing.
        if thick[lab, best] <= 2:
            continue
        planes = [(thick[lab, ax], len(occupied(lab, ax)), ax) for ax in range(3) if ax != best and thick[lab, ax] <= 2]
        if not planes:
            continue  # thick along every axis: a 3D mask (refused below)
        _, n_other, other = min(planes)
        if n_other > max_slices:
            continue
        if update or (axis is not None and n_other == 2 and thick[lab, other] == 2 and len(sl) == 3
                      and sl[-1] - sl[0] == 2):
            # Two adjacent slices of another plane crossing three of this one, or an object 2 px thin
            # drawn on 3 adjacent slices of this one (a correction next to two drawn slices): the
            # axis given decides (a review: the update was refused with advice to propagate along an
            # axis nothing was drawn on). Across more slices it is the other plane's drawing (an
            # outline on two coronal slices crossing 7 axial ones became 7 keyframes of lines). In an
            # update the keyframes are the earlier rounds' and the edits, along the record's axis by
            # construction: whole corrected slices of the result, so an edit made in another view
            # becomes full slices, not lines (a thin object's fourth adjacent correction was refused).
            continue
        others = [v for v in labels if v != lab]
        if not others:
            how = f"propagate it along axis {other} (--axis {other})"
        elif all(thick[v, other] <= 2 and len(occupied(v, other)) <= max_slices for v in others):
            how = f"all labels are drawn on slices along axis {other}: propagate them along it (--axis {other})"
        else:  # only following this advice keeps every label
            how = f"propagate labels drawn on different planes separately (--label {lab} --axis {other})"
        raise InputError(
            f"label {lab} is drawn on {n_other} slice{'s' if n_other != 1 else ''} along axis {other} but crosses "
            f"{len(sl)} slices along axis {best}, the propagation axis: {how}"
        )
    for lab, sl in slices.items():
        three_d = too_many_keyframes(len(sl), n_axis, max_slices)
        if not (update or three_d or len(sl) < 2):
            lines, counts = _stroke_lines(boxes[lab], starts[lab], best)
            # A lone line of a few voxels beyond the outermost drawn slice, beside it, is the object's
            # tip as often (a gallbladder's last 3 mm slice holds 3 voxels in a column): drawn (a
            # stray one gets a speck note). Two or more line slices in a row stay a stroke.
            # A short line on each side of the drawing (a mark crossing the drawn slice) is a stroke.
            others = [k for k in sl if k not in lines]
            lines = {k: v for k, v in lines.items()
                     if not (others and len(lines) == 1 and counts[k] < STROKE_MIN_VOXELS
                             and (k < min(others) or k > max(others)) and (k - 1 in others or k + 1 in others))}
            if (lines and len(lines) < len(sl)
                    and max(counts[s] for s in lines) <= STROKE_FRACTION * max(counts.values())):
                raise _mixed_planes_error(lab, best, lines, sl, plane_names)
        if three_d:
            raise three_d_error(lab)
    return best, slices


# A walk the drift test ended within this many slices of its drawn slice, where the object still
# covered at least this share of its drawn area, gets a note too (a review: vertebra and disc drawn
# as one segment on a spine MR ended 1-3 slices out, Dice 0.39, 0.82 with the test off).
DRIFT_NOTE_SLICES = 3
DRIFT_NOTE_AREA = 0.5


# Tilted bands overlap 0-0.44 (a review's sweep, 10-30 degrees), on thin slices up to 0.5-0.56 (2 px
# bands shifting 1 px, 30-45 degrees: session 28's review); keyframes on purpose mostly ~1.
TILTED_OVERLAP = 0.6


def tilted_drawing(mask: np.ndarray, axis: int, drawn: Sequence[int]) -> tuple[int, int] | None:
    """``_tilted_drawing`` of a whole 3D mask (one label) drawn on slices ``drawn`` along ``axis``."""
    box, start = _bounding_box(np.asarray(mask) != 0)
    return _tilted_drawing(box, int(start[axis]), axis, drawn)


def _tilted_drawing(box: np.ndarray, start: int, ax: int, drawn: Sequence[int]) -> tuple[int, int] | None:
    """(first, last) when a label's drawn slices are one run of three or more adjacent slices and
    fewer than half of the pairs of neighbours overlap by TILTED_OVERLAP of the smaller (in the
    slice plane) or more, the two end pairs of four or more slices left out: the bands one outline drawn on a
    plane tilted against the slices leaves on each slice it crosses (Slicer's views are aligned
    with RAS, not with an oblique volume; 3-7 bands at 10-30 degrees, 11-17 at 20-45 degrees on thin
    slices, where the small pieces at the outline's two rounded ends may overlap their neighbours
    more than half). Inner pairs that mostly overlap well are drawn on purpose (keyframes). Small
    structures on thick slices overlap their neighbours that little too (a third of the
    neighbouring slice pairs in the 3-4 mm brain cases), so the Slicer
    module asks this only of a drawing on an oblique volume; the engine does not refuse on it. None
    otherwise."""
    if len(drawn) < 3 or drawn[-1] - drawn[0] != len(drawn) - 1:
        return None
    planes = np.moveaxis(box, ax, 0)
    overlapping = []
    for a, b in zip(drawn, drawn[1:]):
        pa, pb = planes[a - start], planes[b - start]
        smaller = min(int(pa.sum()), int(pb.sum()))
        if not smaller:
            return None
        overlapping.append(np.count_nonzero(pa & pb) >= TILTED_OVERLAP * smaller)
    # the pairs that decide: all of them for three slices, else all but the two end pairs (where
    # an outline's small rounded end pieces may overlap their neighbours more than half)
    deciding = overlapping if len(overlapping) <= 2 else overlapping[1:-1]
    # fewer than half of them overlapping: at 30 degrees on 0.8 mm slices every 4th band of an outline
    # overlaps its neighbour by 0.50-0.54 (a review's sweep), deliberate keyframes nearly all do
    return (drawn[0], drawn[-1]) if 2 * sum(deciding) < len(deciding) else None


def window_slices(slice_spacing: float, predictor: SlicePredictor) -> int:
    z = int(predictor.window_mm / max(float(slice_spacing), 1e-6))
    return int(max(predictor.min_window, min(z, predictor.max_window)))


MAX_THROUGH_PLANE_FACTOR = 8


def through_plane_factor(slice_spacing: float, predictor: SlicePredictor) -> int:
    """k: the walks step through k - 1 interpolated slices between neighbours (1 = the slices as
    they are): ceil(spacing / ``predictor.through_plane_mm``), at most MAX_THROUGH_PLANE_FACTOR."""
    target = float(getattr(predictor, "through_plane_mm", 0.0) or 0.0)
    if target <= 0 or float(slice_spacing) <= target:
        return 1
    return int(min(math.ceil(float(slice_spacing) / target - 1e-6), MAX_THROUGH_PLANE_FACTOR))


class AxisInterpolated:
    """``volume`` (axis 0 first) seen with k - 1 slices interpolated linearly between each pair of
    neighbours: its slice i is slice i * k here. Slices are computed only when read, as float32,
    so no finer copy of the volume is ever held. It is indexed as an array is (``v[j]``,
    ``v[[j1, j2]]``, ``v[a:b]``, ``v[j, r0:r1, c0:c1]``...): the first index picks slices of this
    finer grid, the rest applies to them, so a custom ``SlicePredictor`` reads it as it reads an
    array."""

    def __init__(self, volume, k: int):
        if int(k) < 1:
            raise ValueError(f"the interpolation factor must be >= 1, got {k}")
        self.base, self.k = volume, int(k)
        self.shape = ((volume.shape[0] - 1) * self.k + 1,) + tuple(volume.shape[1:])
        self.ndim, self.dtype = 3, np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def _slice(self, j: int) -> np.ndarray:
        if not 0 <= j < self.shape[0]:
            raise IndexError(f"slice {j} outside 0..{self.shape[0] - 1}")
        i, r = divmod(j, self.k)
        below = np.asarray(self.base[i], dtype=np.float32)
        if r == 0:
            return below
        f = r / self.k
        return (1.0 - f) * below + f * np.asarray(self.base[i + 1], dtype=np.float32)

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis,) + tuple(rest)
        if isinstance(first, (int, np.integer)):
            j = int(first) + (self.shape[0] if int(first) < 0 else 0)
            return self._slice(j)[rest] if rest else self._slice(j)
        if isinstance(first, slice):
            picked = list(range(self.shape[0]))[first]
        else:
            arr = np.asarray(first)
            if arr.dtype == bool and arr.shape == (self.shape[0],):
                picked = np.flatnonzero(arr).tolist()
            elif arr.ndim == 1 and arr.dtype.kind in "iu":
                picked = [int(j) + (self.shape[0] if int(j) < 0 else 0) for j in arr]
            else:
                raise TypeError(f"AxisInterpolated (a volume with slices interpolated along axis 0) is indexed as an "
                                f"array; {type(first).__name__} is no slice index")
        out = np.stack([self._slice(j) for j in picked]) if picked else np.zeros((0,) + self.shape[1:], np.float32)
        return out[(slice(None),) + tuple(rest)] if rest else out


class _OriginalSlices(dict):
    """A walk's probabilities on an ``AxisInterpolated`` volume: every original slice (multiples of
    k) is kept; of the interpolated ones only those within ``span`` slices of the newest (the next
    guide and the forward-backward check read them), so a long walk through k times as many slices
    does not hold k times as many probability maps."""

    def __init__(self, k: int, span: int):
        super().__init__()
        self.k, self.span = k, span
        self._interpolated: list[int] = []

    def __setitem__(self, j, value):
        super().__setitem__(j, value)
        if j % self.k:
            self._interpolated.append(j)
        while self._interpolated and abs(j - self._interpolated[0]) > self.span:
            self.pop(self._interpolated.pop(0), None)


class _ScaledProgress:
    """Progress of a walk through interpolated slices, counted in original slices."""

    def __init__(self, progress: _Progress, k: int):
        self.progress, self.k = progress, k

    def check_cancel(self):
        self.progress.check_cancel()

    def advance(self, n, message: str):
        self.progress.advance(n / self.k, message)


def _validate_inputs(image: np.ndarray, prompt: np.ndarray, spacing) -> tuple[float, float, float]:
    if image.ndim != 3:
        raise InputError(f"the image must be a 3D volume, got {image.ndim}D with shape {image.shape}")
    if image.size == 0:
        raise InputError(f"the image is empty (shape {image.shape}): it holds no voxels")
    if min(image.shape) < 2:  # a slice one pixel thick: demons registration on it gave another field each call
        raise InputError(f"the image is one voxel thick along array axis {image.shape.index(min(image.shape))} (shape "
                         f"{image.shape}); PAMSegment needs a 3D volume of at least 2 voxels along every axis")
    if prompt.shape != image.shape:
        raise InputError(f"the prompt's shape {prompt.shape} differs from the image's {image.shape}")
    if prompt.dtype.kind not in "biuf":  # complex, text, objects
        raise InputError(f"the prompt must be an integer label map, got values of type {prompt.dtype}")
    if prompt.dtype.kind == "f":
        if not np.all(np.isfinite(prompt)) or not np.all(np.mod(prompt, 1) == 0):  # (no warning from mod(inf))
            raise InputError(_not_whole("the prompt", prompt))
        outside = np.abs(prompt) >= 2.0 ** 31  # checked here: the cast to int32 below would wrap such values
        if outside.any():
            raise InputError(f"the prompt has label {prompt[outside].flat[0]:.10g}: labels must be whole numbers from 1 "
                             f"to {MAX_LABEL} (0 = background); renumber the label map (or are the image and the "
                             "prompt swapped?)")
    if image.dtype.kind not in "biuf":  # complex, object, text: numpy would drop or convert them silently
        raise InputError(f"the image must hold real numbers (integers or floats), got {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        n = int((~np.isfinite(image)).sum())
        raise InputError(f"the image has {n} NaN/inf voxel{'s' if n != 1 else ''}; fix or mask them before "
                         "propagating")
    low, high = (image.min(), image.max()) if image.size else (0, 0)  # one pass each, compared in the image's type
    lo, hi = float(low), float(high)
    big = float(np.finfo(np.float32).max)  # the predictors read slices as float32
    if np.issubdtype(image.dtype, np.floating) and image.itemsize > 4 and (hi > big or lo < -big):
        raise InputError("the image has values beyond float32's range (about 3.4e38); rescale it before propagating")
    if low == high:
        raise InputError(f"the image holds one value everywhere ({lo:g}): there is nothing to follow; check that it "
                         "is the scan")
    if image.itemsize >= 4 and image.dtype.kind in "iuf":
        # Read as float32 (24-bit precision): a small spread on a huge offset (e.g. 2**62 + CT values,
        # or 1e12 + intensities) rounds away.
        magnitude = max(abs(lo), abs(hi))
        if magnitude > 2.0 ** 24 and hi - lo < magnitude * 2.0 ** -20:  # fewer than ~16 float32 levels
            raise InputError(f"the image's values span only {hi - lo:.6g} at an offset of {lo:.10g}: so small a spread "
                             "on so large an offset does not survive the float32 the network and registration read; "
                             "subtract the offset (e.g. the minimum) before propagating")
    try:
        if isinstance(spacing, (str, bytes)) or any(isinstance(s, (bool, np.bool_, str, bytes)) for s in spacing):
            raise TypeError  # "333" was read as (3, 3, 3) and True as 1 mm
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be three positive numbers (k, j, i), got {spacing!r}") from None
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be three positive numbers, got {spacing}")
    return spacing


def _whole(value, what: str) -> int:
    """``value`` as an int if it is a whole number (not a bool), else InputError naming ``what``."""
    if not is_number(value, -math.inf, math.inf, whole=True):
        raise InputError(f"{what} must be a whole number, got {shown(value)}")
    return int(value)


def label_list(labels) -> list[int]:
    """A ``labels=`` option as whole numbers (InputError for text, a single number, an empty list)."""
    if isinstance(labels, (str, bytes, Mapping)) or not hasattr(labels, "__iter__"):  # a dict gave its keys
        raise InputError(f"labels must be a list of label numbers, got {shown(labels)}")
    labels = [_whole(v, "a label") for v in labels]
    if not labels:
        raise InputError("labels is empty: give at least one label of the prompt (or None for all)")
    return labels


def check_progress_and_cancel(progress, cancel) -> None:
    """InputError unless ``progress`` is None or callable and ``cancel`` None or a CancelToken."""
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function progress(fraction, message), got {type(progress).__name__}")
    if cancel is not None and not hasattr(cancel, "is_cancelled"):
        raise InputError(f"cancel must be a CancelToken, got {type(cancel).__name__}")


def _validate_options(axis, labels, range, batch_size, threads, cancel, previous,  # noqa: A002
                      progress=None, early_stop=True, remove_disconnected=None, update=None):
    """Type checks of propagate()'s options, so that a wrong type is one InputError, not a traceback."""
    if axis is not None:
        _whole(axis, "axis")
    if labels is not None:
        labels = label_list(labels)
    if range is not None:
        if (isinstance(range, (str, bytes, Mapping, set, frozenset)) or not hasattr(range, "__len__")
                or len(range) != 2):  # a dict of 2 keys passed the length test, then range[0] was a KeyError
            raise InputError(f"range must be (first, last) slice numbers, got {shown(range)}")
        range = (_whole(range[0], "range's first slice"), _whole(range[1], "range's last slice"))
    if _whole(batch_size, "batch size") < 1:
        raise InputError("batch size must be at least 1")
    check_threads(threads)
    check_progress_and_cancel(progress, cancel)
    if previous is not None and not isinstance(previous, PropagationResult):
        raise InputError(f"previous must be the PropagationResult of an earlier run, got {type(previous).__name__}")
    check_flag("early_stop", early_stop)
    check_flag("remove_disconnected", remove_disconnected, optional=True)
    check_flag("update", update, optional=True)
    return (None if axis is None else int(axis)), labels, range


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None, cancel: CancelToken | None):
        self.total, self.done, self.callback, self.cancel = max(total, 1), 0, callback, cancel
        self.last = -1.0
        self.label = ""  # "label 17 (5/39)" while a run of several labels propagates one of them

    def check_cancel(self):
        if self.cancel is not None and self.cancel.is_cancelled:
            raise PropagationCancelled("propagation cancelled; nothing was changed")

    def advance(self, n: int, message: str):
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        if self.callback is not None and frac > self.last:
            self.last = frac
            self.callback(frac, f"{self.label}: {message}" if self.label else message)


def _is_empty(prob_slice: np.ndarray, presence: float | None, guide_area: int, p: SlicePredictor) -> bool:
    if presence is not None and presence < p.presence_threshold:
        return True
    area = int((prob_slice >= p.threshold).sum())
    return area < max(p.min_area_px, p.min_area_fraction * guide_area)


def _stop_presence(pred: SlicePrediction, q: int) -> float | None:
    """What decides whether slice ``q`` of a prediction still holds the object: its presence and,
    where the predictor tests drift, the lower of the two."""
    presence = None if pred.presence is None else float(pred.presence[q])
    if pred.drift is not None:
        drift = float(pred.drift[q])
        presence = drift if presence is None else min(presence, drift)
    return presence


def _stop_reason(pred: SlicePrediction, q: int, p: SlicePredictor) -> str:
    """Why slice ``q`` counted as empty: the network's presence, the drift test, or the area."""
    if pred.presence is not None and float(pred.presence[q]) < p.presence_threshold:
        return "presence"
    if pred.drift is not None and float(pred.drift[q]) < p.presence_threshold:
        return "drift"
    return "area"


def _slice_confidence(prob_slice: np.ndarray, presence: float | None, threshold: float) -> float:
    fg = prob_slice[prob_slice >= threshold]
    conf = float(fg.mean()) if fg.size else 0.0
    return conf * presence if presence is not None else conf


def _consistent_prefix(volume, predictor, guide_idx, guide_mask, found, out_probs, min_dice, stats) -> int:
    """Forward-backward check of a window (the classic tracking-failure test): predict the guide
    slice back from a predicted slice; if that does not give the guide's mask again (Dice below
    ``min_dice``), the walk drifted before that slice. Tries the farthest predicted slice, then
    halves the distance. Returns how many of ``found`` (walk order) can be kept (0: none)."""
    n = len(found)
    while n > 0:
        idx = found[n - 1]
        t0 = time.perf_counter()
        mask = out_probs[idx] >= predictor.threshold
        back = predictor.predict(volume, idx, mask, [guide_idx])
        stats["predict"] += time.perf_counter() - t0
        stats["n_predicted"] += 1
        presence = _stop_presence(back, 0)
        back_mask = back.prob[0] >= predictor.threshold
        if _is_empty(back.prob[0], presence, int(mask.sum()), predictor):  # the walk's own rule
            back_mask[:] = False
        if dice(back_mask, guide_mask) >= min_dice:
            return n
        n //= 2
    return 0


def _predicted(volume, predictor, guide_idx, guide_mask, indices, batch_size, progress, stats):
    """``indices`` predicted from the guide in batches of ``batch_size``: yields (batch, prediction),
    checking for a cancel before each batch and counting the time and slices in ``stats``."""
    for b in range(0, len(indices), batch_size):
        progress.check_cancel()
        batch = indices[b: b + batch_size]
        t0 = time.perf_counter()
        pred = predictor.predict(volume, guide_idx, guide_mask, batch)
        stats["predict"] += time.perf_counter() - t0
        stats["n_predicted"] += len(batch)
        _check_prediction(predictor, pred, len(batch), tuple(volume.shape[1:]))
        yield batch, pred


def _check_prediction(predictor, pred, n: int, slice_shape: tuple) -> None:
    """A predictor's answer (a custom ``SlicePredictor`` may return anything) is what the walk
    needs: a SlicePrediction whose ``prob`` holds ``n`` slices of ``slice_shape``, finite, within
    [0, 1], and as many presence values if any. InputError naming the predictor otherwise."""
    name = f"{type(predictor).__name__}.predict"
    if not isinstance(pred, SlicePrediction):
        raise InputError(f"{name} returned a {type(pred).__name__}; it must return a SlicePrediction(prob, presence)")
    prob = np.asarray(pred.prob)
    if prob.shape != (n,) + slice_shape:
        raise InputError(f"{name} returned probabilities of shape {prob.shape} for {n} query slice(s) of "
                         f"{slice_shape[0]} x {slice_shape[1]}; it must return ({n}, {slice_shape[0]}, "
                         f"{slice_shape[1]})")
    if prob.dtype != bool and prob.size:
        # one pass each for the lowest and highest value: NaN and inf show in them
        lo, hi = (float(prob.min()), float(prob.max())) if prob.dtype.kind in "fiu" else (np.nan, np.nan)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(f"{name} returned probabilities that are not finite numbers (NaN or inf)")
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(f"{name} returned values from {lo:g} to {hi:g}; "
                             "probabilities must lie within [0, 1] (a mask of 0 and 255: divide it by 255)")
    if not isinstance(pred.prob, np.ndarray):  # a list (or a tensor): read as the array just checked (a list's
        pred.prob = prob  # comparisons in the walk raised a TypeError; a trial, session 46)
    if pred.presence is not None and np.shape(pred.presence) != (n,):
        raise InputError(f"{name} returned {np.size(pred.presence)} presence value(s) for {n} query slice(s)")
    if pred.presence is not None and n:  # a NaN made every confidence NaN, 5.0 a confidence of 5
        try:  # value by value: a torch tensor that requires grad has no numpy view
            values = pred.presence.detach() if hasattr(pred.presence, "detach") else pred.presence
            presence = np.array([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InputError(f"{name} returned presence values that are not numbers ({error})") from None
        if not np.all(np.isfinite(presence)) or presence.min() < -1e-6 or presence.max() > 1.0 + 1e-6:
            raise InputError(f"{name} returned presence values {presence.min():g} to {presence.max():g}"
                             f"{' (NaN or inf among them)' if not np.all(np.isfinite(presence)) else ''}; "
                             "they must lie within [0, 1]")
        pred.presence = presence  # read as numbers from here on (a tensor that requires grad warned at each read)


def _record_stop(stats: dict, start: int, direction: int, last: int, reason: str) -> None:
    """One entry of ``PropagationResult.stops``: what ended the walk from ``start``."""
    stats.setdefault("stops", []).append({"start": int(start), "direction": int(direction), "last": int(last),
                                          "reason": reason})


def _walk(volume, predictor, start, start_mask, direction, end, window, batch_size, early_stop,
          progress, out_probs, out_conf, stats, keep_prob: bool = False, stop_signals: bool = True,
          min_agreement: float = 0.0, out_agree: np.ndarray | None = None, slice_step: int = 1) -> int:
    """Propagate from slice ``start`` towards ``end`` (inclusive) in steps of ``direction``.
    (``slice_step`` k: ``volume`` is an ``AxisInterpolated`` one; progress messages name slice // k.)

    Writes each predicted slice's probability into ``out_probs[s]`` (float32 dict) and its
    confidence into ``out_conf[s]``. Returns the last slice that holds the object (``start`` if none).

    With ``early_stop`` and a predictor whose ``consistency_min_dice`` is above 0, every window is
    checked forward-backward (``_consistent_prefix``): slices past the last consistent one are
    dropped and predicted again from it; if none is consistent, the side ends at the guide.

    ``stop_signals=False`` (walks between two drawn keyframes, both of which hold the object): the
    object-present output and the drift test no longer empty a slice; only an empty mask counts as
    empty. ``min_agreement`` > 0 (walks beyond the outermost of several keyframes): the side also
    ends where ``SlicePrediction.agreement`` falls below it. ``out_agree`` (array per slice) receives
    the agreement of every slice that holds the object, so that an update can later apply a
    stricter agreement test to this walk without predicting it again (``_Reuse.first_below``).
    """
    if getattr(predictor, "published_scheme", False) and stop_signals and not keep_prob:
        return _walk_published(volume, predictor, start, start_mask, direction, end, window, batch_size, early_stop,
                               progress, out_probs, out_conf, stats, min_agreement, out_agree, slice_step)
    fb_min = float(getattr(predictor, "consistency_min_dice", 0.0) or 0.0) if early_stop else 0.0
    reason = "end"

    def record(last: int) -> int:
        if early_stop:
            _record_stop(stats, start, direction, last, reason)
        return last

    guide_idx, guide_mask = start, start_mask
    guide_area = int(start_mask.sum())
    last_with_object = start
    s = start + direction
    n_side = abs(end - start)
    reported: set[int] = set()

    def report(idxs, message):
        fresh = [i for i in idxs if i not in reported]
        reported.update(fresh)
        if fresh:
            progress.advance(len(fresh), message)

    def drop(idx):
        out_probs.pop(idx, None)
        if isinstance(out_conf, dict):
            out_conf.pop(idx, None)
        else:
            out_conf[idx] = np.nan
        if out_agree is not None:
            out_agree[idx] = np.nan

    while (end - s) * direction >= 0:
        stop = s + direction * (window - 1)
        if (end - stop) * direction < 0:
            stop = end
        indices = list(range(s, stop + direction, direction))
        found: list[int] = []  # slices of this window holding the object, in walk order
        ended = False  # an empty slice ended the side (early_stop)
        for batch, pred in _predicted(volume, predictor, guide_idx, guide_mask, indices, batch_size, progress, stats):
            for q, idx in enumerate(batch):
                prob = pred.prob[q]
                stop_presence = _stop_presence(pred, q) if stop_signals else None
                empty = _is_empty(prob, stop_presence, guide_area, predictor)
                # Outward from several keyframes: the network and the registration part ways.
                disagree = (early_stop and not empty and min_agreement > 0 and pred.agreement is not None
                            and float(pred.agreement[q]) < min_agreement)
                if disagree:
                    empty, stop_presence = True, 0.0
                if empty and stop_presence is not None:
                    prob = np.zeros_like(prob)
                # Only keyframe fusion needs probabilities; elsewhere a bool slice is 4x smaller.
                out_probs[idx] = prob if keep_prob else prob >= predictor.threshold
                presence = None if pred.presence is None else float(pred.presence[q])
                out_conf[idx] = _slice_confidence(prob, presence, predictor.threshold)
                if empty:
                    if early_stop:
                        out_probs[idx] = np.zeros(prob.shape, dtype=out_probs[idx].dtype)
                        ended = True
                        reason = "agreement" if disagree else _stop_reason(pred, q, predictor)
                        break
                else:
                    found.append(idx)
                    if out_agree is not None and pred.agreement is not None:
                        out_agree[idx] = float(pred.agreement[q])
            if ended:
                break
            report(batch, f"slice {batch[-1] // slice_step}")
        restart = False
        if fb_min > 0 and found:
            keep = _consistent_prefix(volume, predictor, guide_idx, guide_mask, found, out_probs, fb_min, stats)
            if keep < len(found):
                last_kept = found[keep - 1] if keep else guide_idx
                for idx in indices:
                    if (idx - last_kept) * direction > 0:
                        drop(idx)
                found = found[:keep]
                # Drifted at once: the object ends at the guide. Otherwise walk on from the last
                # consistent slice; the dropped ones are predicted again.
                ended, restart = not found, bool(found)
                if ended:
                    reason = "consistency"
        if found:
            last_with_object = found[-1]
        if ended:
            # The rest of this side counts as done.
            progress.advance(n_side - len(reported), "side finished")
            return record(last_with_object)
        if found:
            guide_idx = found[-1]
            guide_mask = out_probs[guide_idx] >= predictor.threshold
            guide_area = int(guide_mask.sum())
        s = (guide_idx + direction) if restart else stop + direction
    return record(last_with_object)


def _walk_published(volume, predictor, start, start_mask, direction, end, window, batch_size, early_stop,
                    progress, out_probs, out_conf, stats, min_agreement: float = 0.0,
                    out_agree: np.ndarray | None = None, slice_step: int = 1) -> int:
    """The authors' published walk (PAM-SPEC, "Propagation") on one side of ``start``, with
    ``_walk``'s arguments and results. Each guide predicts every slice of this side within
    ``window`` slices of itself: the drawn slice the ``window`` beyond it, every later guide also
    the ``window`` behind it, already predicted (another vote). A slice holds the union of its
    votes. The next guide is the window's outermost slice with its votes' mask; the side ends where
    that slice holds nothing (without ``early_stop`` the last guide that held the object predicts
    the next window, up to ``end``). A slice's confidence is the mean over its votes.

    The network's own stop signals (object-present output, drift test, ``min_agreement``) empty
    the vote they come with; the authors' network has none of them."""
    votes: dict[int, np.ndarray] = {}  # slice -> union of its votes so far
    confidences: dict[int, list[float]] = {}
    why_empty: dict[int, str] = {}  # slice -> what emptied its last vote
    credited: dict[int, float] = {}  # progress given per slice: half at its first vote, half at its second
    guide_idx, guide_mask = start, np.asarray(start_mask, dtype=bool)
    front, last_with_object, reason = start, start, "end"
    # What the result will hold: the object reaches from the drawn slice to the first slice left
    # empty (beyond it the component filter drops what later windows found), and what emptied it.
    first_empty = None

    def finish(indices: list[int]) -> None:
        """Slices that get no more votes, nearest the start first: into ``out_probs``."""
        nonlocal first_empty
        for idx in sorted(indices, key=lambda i: (i - start) * direction):
            vote = votes.pop(idx)
            held = vote.any()
            # (with thick slices only an original slice left empty cuts the object in the result)
            if first_empty is None and not held and idx % slice_step == 0:
                first_empty = idx
            out_probs[idx] = vote
            out_conf[idx] = float(np.mean(confidences.pop(idx))) if held else 0.0

    def inside(idx: int) -> bool:  # on this side of start, up to end
        return (idx - start) * direction > 0 and (end - idx) * direction >= 0

    def vote_for(indices: list[int]) -> None:
        """One vote from the guide for each of ``indices`` (a walk from the guide, either way)."""
        guide_area = int(guide_mask.sum())
        for batch, pred in _predicted(volume, predictor, guide_idx, guide_mask, indices, batch_size, progress, stats):
            for q, idx in enumerate(batch):
                prob = pred.prob[q]
                vote = prob >= predictor.threshold
                agreement = None if pred.agreement is None else float(pred.agreement[q])
                why = None
                if _is_empty(prob, _stop_presence(pred, q), guide_area, predictor):
                    why = _stop_reason(pred, q, predictor)
                elif min_agreement > 0 and agreement is not None and agreement < min_agreement:
                    why = "agreement"
                if why is not None:
                    vote[:] = False
                    why_empty[idx] = why
                elif out_agree is not None and agreement is not None:
                    out_agree[idx] = agreement
                votes[idx] = vote | votes[idx] if idx in votes else vote
                presence = None if pred.presence is None else float(pred.presence[q])
                confidences.setdefault(idx, []).append(_slice_confidence(prob, presence, predictor.threshold))
            # most slices get two votes: each moves the bar half a slice, so re-votes move it too
            gained = 0.0
            for i in batch:
                if credited.get(i, 0.0) < 1.0:
                    credited[i] = credited.get(i, 0.0) + 0.5
                    gained += 0.5
            if gained:
                progress.advance(gained, f"slice {batch[-1] // slice_step}")

    while True:
        ahead = [front + direction * j for j in range(1, window + 1) if inside(front + direction * j)]
        if not ahead:
            break
        behind = [guide_idx - direction * j for j in range(1, window + 1) if inside(guide_idx - direction * j)]
        vote_for(ahead)
        if guide_idx == front:  # a guide the last window ended on re-votes the window behind it
            vote_for(behind)
        last_with_object = next((i for i in reversed(ahead) if votes[i].any()), last_with_object)
        front = ahead[-1]
        if front == end:
            break
        if votes[front].any():
            guide_idx, guide_mask = front, votes[front]
        elif early_stop:
            reason = why_empty.get(front, "area")
            break
        # slices more than a window behind the next guide get no more votes: out of memory now
        # (with thick slices, ``out_probs`` keeps only the original slices)
        finish([i for i in votes if (front - i) * direction > window])
    finish(list(votes))
    if early_stop and first_empty is not None:  # the result ends before it, whatever ended the walk
        last_with_object, reason = first_empty - direction, why_empty.get(first_empty, "area")
    if early_stop:
        _record_stop(stats, start, direction, last_with_object, reason)
    progress.advance(abs(end - start) - sum(credited.values()), "side finished")
    return last_with_object


def _gaps_between(mask: np.ndarray, a: int, b: int, conf: np.ndarray) -> list[int]:
    """Slices strictly between drawn slices ``a`` and ``b`` of ``mask`` (both hold the object) left
    empty: the walks from both sides found nothing there (or nothing connected to the drawing).
    The mask is not changed (filling them by interpolation cut a structure in several parts, the
    discs of a spine, less often than it mended a lost one); their confidence becomes 0 so that
    review shows them first."""
    gaps = [s for s in range(a + 1, b) if not mask[s].any()]
    for s in gaps:
        conf[s] = 0.0
    return gaps


# A slice between two drawn slices holding less than this share of the area the two suggest (linear
# between their areas) is said in a note and reviewed first (session 31; on two-keyframe runs of the
# validation sets' training-case structures, 39 of the 40 slices it flagged held less than half of
# the reference there: the walks from both sides had shrunk, and the fused slice with them).
THIN_FRACTION = 1 / 3
# Two neighbouring drawn slices whose walks towards each other overlap on no slice between them by this
# share of the smaller mask or more (session 48) are said in a note: the result between them is split,
# and one of the two drawings may be of another structure (a trial: a keyframe drawn with another
# organ's outline was followed without a word). Measured on training-case structures (README,
# Troubleshooting).
KEYFRAME_DISAGREE_OVERLAP = 0.1
THIN_MIN_EXPECTED = 12  # voxels: a structure a few voxels across is not judged by its area


def disagree_to_json(pairs) -> list[list]:
    """``PropagationResult.disagree``'s pairs for one label as JSON ([[a, b, overlap], ...]: a record, a
    server's answer, Slicer's saved record); ``disagree_from_json`` reads them back."""
    return [[int(a), int(b), float(d)] for a, b, d in pairs]


def disagree_from_json(value, drawn, what: str = "keyframe disagreement") -> list[tuple[int, int, float]]:
    """``PropagationResult.disagree``'s pairs for one label from JSON (a record, a server's answer:
    untrusted): [[a, b, overlap], ...] with a < b among ``drawn`` (the label's drawn slices), each pair
    once, overlap from 0 to 1; ValueError else (a hostile answer's 20 000 copies made a 660 kB note)."""
    if not isinstance(value, list) or len(value) > max(len(drawn), 1):
        raise ValueError(f"{what} is not a list of at most one pair per drawn slice")
    out, seen = [], set()
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 3 and all(_whole_in(v, 0, 10**9) for v in pair[:2])
                and isinstance(pair[2], (int, float)) and not isinstance(pair[2], bool) and 0.0 <= pair[2] <= 1.0):
            raise ValueError(f"{what} {str(pair)[:60]} is not [slice, slice, overlap]")
        a, b = int(pair[0]), int(pair[1])
        if not (a < b and a in drawn and b in drawn) or (a, b) in seen:
            raise ValueError(f"{what} {str(pair)[:60]} names slices that are not two drawn ones in order, or twice")
        seen.add((a, b))
        out.append((a, b, float(pair[2])))
    return out


def _both_overlap(x: np.ndarray, y: np.ndarray) -> float:
    """How much two masks of one slice overlap, as a share of the smaller (1: one holds the other; not
    Dice, which a walk narrowing to a drawn tip of 3 voxels inside a 437-voxel disc put at 0.014); -1
    where either is empty."""
    nx, ny = int(np.count_nonzero(x)), int(np.count_nonzero(y))
    if nx == 0 or ny == 0:
        return -1.0
    return int(np.count_nonzero(x & y)) / min(nx, ny)


def _thin_between(mask: np.ndarray, a: int, b: int, largest: int, edited=()) -> list[int]:
    """Slices strictly between drawn slices ``a`` and ``b`` of ``mask`` that hold the object, but
    less than THIN_FRACTION of the area the two drawn slices suggest there: the walks from both
    sides shrank (one may have lost the object). Not changed; review ranks them first
    (``PropagationResult.review_confidence``). ``largest``: the label's
    largest drawn slice's area, against which a drawn slice is a speck as ``specks`` judges;
    ``edited``: drawn slices an update added or changed (a tip the user drew is no speck)."""
    area_a, area_b = int(np.count_nonzero(mask[a])), int(np.count_nonzero(mask[b]))
    if any(v <= SPECK_VOXELS and v <= SPECK_FRACTION * largest and k not in edited
           for k, v in ((a, area_a), (b, area_b))):
        return []  # a stray click on one of them: the speck note says so (a re-review, session 31)
    thin = []
    for s in range(a + 1, b):
        expected = ((b - s) * area_a + (s - a) * area_b) / (b - a)
        held = int(np.count_nonzero(mask[s]))
        if 0 < held < THIN_FRACTION * expected and expected >= THIN_MIN_EXPECTED:
            thin.append(s)
    return thin


def _edited_slices(frames: dict, drawn_mask: np.ndarray, slices, carried=()) -> list[int]:
    """Of ``slices`` (a label's drawn slices and walls, along axis 0 of ``drawn_mask``), those an
    update added or changed against ``frames`` (the previous result's keyframes of the label), and
    those of ``carried`` (what earlier update rounds added) it still holds."""
    slices = {int(k) for k in slices}
    return sorted({k for k in slices if k not in frames or np.shape(frames[k]) != drawn_mask[k].shape
                   or not np.array_equal(frames[k], drawn_mask[k])} | (set(carried) & slices))


def _dropped_slices(before: np.ndarray, now: np.ndarray, drawn: Sequence[int], walls, lo: int, hi: int) -> list[int]:
    """Slices beyond the outermost ``drawn`` ones (up to a wall, within ``lo``-``hi``) where the label's
    mask ``before`` (the previous result, axis 0) held it and ``now`` does not (either mask may be
    given as its rows, ``mask.any(axis=(1, 2))``)."""
    first, last = min(drawn), max(drawn)
    below = max((w for w in walls if w < first), default=lo - 1)
    above = min((w for w in walls if w > last), default=hi + 1)
    # (either may be given as its slices' rows already: one bool per slice)
    gone = (before if before.ndim == 1 else before.any(axis=(1, 2))) & ~(now if now.ndim == 1 else now.any(axis=(1, 2)))
    return [int(k) for k in np.flatnonzero(gone) if below < k < first or last < k < above]


def flagged_first(confidence: np.ndarray, slices) -> np.ndarray:
    """A copy of ``confidence`` with 0 on ``slices`` (those in range): what review ranks by, so that
    the slices the thin and dropped notes name come first."""
    conf = np.array(confidence, dtype=np.float32, copy=True)
    conf[[int(s) for s in slices if 0 <= s < conf.size]] = 0.0
    return conf


def annotate_update(result: "PropagationResult", previous: "PropagationResult", prompt: np.ndarray,
                    empty_slices=None) -> None:
    """What the engine says of an update (``edited``, ``dropped``, the thin slices beside drawn
    tips), worked out for a ``result`` computed elsewhere from ``prompt`` as a fresh run (a server:
    a re-review, session 31, found its updates called a tip just drawn a stray click); from the
    merged mask. ``empty_slices``: the update's walls, as ``propagate`` takes them."""
    if previous is None or previous.axis != result.axis or previous.mask.shape != result.mask.shape:
        return
    ax = result.axis
    moved, before = np.moveaxis(np.asarray(prompt), ax, 0), np.moveaxis(previous.mask, ax, 0)
    now = np.moveaxis(result.mask, ax, 0)
    lo, hi = result.range if result.range else (0, moved.shape[0] - 1)
    same_image = previous.image_digest in (None, result.image_digest)
    if empty_slices is None:
        walls_of = {}
    elif isinstance(empty_slices, dict):
        walls_of = {int(k): v for k, v in empty_slices.items()}
    else:
        walls_of = {lab: empty_slices for lab in result.confidence}
    for lab in result.confidence:
        held = moved == lab
        drawn = [int(k) for k in np.flatnonzero(held.any(axis=(1, 2)))]
        listed = walls_of.get(lab)
        walls = set() if listed is None else {int(w) for w in np.asarray(listed).ravel()}
        if not drawn or lab not in previous.keyframes:
            continue
        edited = _edited_slices(previous.keyframes[lab], held, (*drawn, *walls), previous.edited.get(lab, ()))
        result.edited[lab] = edited
        if lab in result.overlapped:  # its own mask is not the merged map's: other labels took voxels of it
            continue
        own = now == lab
        if same_image:  # (a result of another image says nothing of what this one emptied)
            result.dropped[lab] = _dropped_slices(before == lab, own, drawn, walls, lo, hi)
        largest = max(int(np.count_nonzero(held[k])) for k in drawn)
        cut = set(result.cut.get(lab, ((), ()))[0])
        thin = [s for a, b in zip(drawn[:-1], drawn[1:]) if b - a >= 2 and not (walls & set(range(a, b)))
                for s in _thin_between(own, a, b, largest, edited) if s not in cut]
        result.thin[lab] = sorted(thin)


# The component labels of at most this many voxels are held at once: cc3d numbers a large object's
# box with 4-byte labels (its estimate of the labels a box needs passes 65 535 long before the box
# is large), which was the run's peak for an object on most of every slice (a body outline on
# 512 x 512 x 1000: 1 GB of labels, the peak 29 % above the memory check's estimate; session 40).
# 2**24 voxels: 64 slices of 512 x 512 (64 MB), so an organ's box is labelled in one piece.
KEEP_CONNECTED_CHUNK_VOXELS = 2**24


def _keep_connected(mask: np.ndarray, seeds: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Keep the ``connectivity``-connected components of ``mask`` that touch ``seeds`` (computed on
    the bbox; 26, or 6 as the authors' published walk). In place: ``mask`` is changed and returned
    (a second full-volume array was 1 B a voxel of the run's peak). A box of more than
    ``KEEP_CONNECTED_CHUNK_VOXELS`` is labelled in slabs along axis 0 (``_keep_connected_slabs``)."""
    # The box from the projections (np.nonzero took 24 bytes per object voxel: 324 MB for a
    # 14 M-voxel organ, the run's peak), the slices' first, the other axes' within their slab (one
    # pass over the volume, not four), and the kept components through a lookup table (np.isin
    # sorted a copy of the whole box).
    rows = np.flatnonzero(mask.any(axis=tuple(range(1, mask.ndim))))
    if not rows.size:
        return mask
    sl = [slice(int(rows[0]), int(rows[-1]) + 1)]
    slab = mask[sl[0]]
    for axis in range(1, mask.ndim):
        held = np.flatnonzero(slab.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        sl.append(slice(int(held[0]), int(held[-1]) + 1))
    sl = tuple(sl)
    sub = mask[sl]
    seeds = seeds[sl]
    step = max(1, KEEP_CONNECTED_CHUNK_VOXELS // max(1, math.prod(sub.shape[1:])))
    if step < sub.shape[0]:
        _keep_connected_slabs(sub, seeds, connectivity, step)
        return mask
    # Besides the labels, only cc3d's contiguous copy of the box (none when the box is whole slices,
    # read as bytes in place); the seeds and the kept voxels go a slice at a time (two more
    # box-sized temporaries were part of the 9 bytes a voxel of a large object's run, session 34).
    cc = cc3d.connected_components(np.ascontiguousarray(sub).view(np.uint8), connectivity=connectivity)
    keep = np.zeros(int(cc.max()) + 1, dtype=bool)
    for k in range(cc.shape[0]):
        keep[cc[k][seeds[k] & sub[k]]] = True
    keep[0] = False
    for k in range(cc.shape[0]):
        sub[k] = keep[cc[k]]  # (sub is a view of mask; outside its box the mask is empty)
    return mask


def _keep_connected_slabs(sub: np.ndarray, seeds: np.ndarray, connectivity: int, step: int) -> None:
    """``_keep_connected`` on the box ``sub`` (in place) in slabs of ``step`` slices: each slab's
    components are labelled on their own (cc3d), the components of neighbouring slabs that touch
    across the slabs' boundary are joined (scipy's connected components of that graph), and the
    slabs are labelled again to keep the joined components that touch ``seeds``. The same result as
    labelling the whole box at once, holding one slab's labels at a time."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    # A voxel of the slice above touches these in-plane offsets of the slice below: 6-connected the
    # voxel right below, 18 also the four sharing an edge with it, 26 also the four corners.
    offsets = [(0, 0)] + ([(-1, 0), (1, 0), (0, -1), (0, 1)] if connectivity >= 18 else []) + \
        ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 26 else [])
    starts = list(range(0, sub.shape[0], step))

    def labels(start):
        slab = np.ascontiguousarray(sub[start:start + step]).view(np.uint8)
        return cc3d.connected_components(slab, connectivity=connectivity, return_N=True)

    offset, touching, pairs, below = [], [], [], None
    total = 0  # labels of the slabs so far: a slab's label L is L + its offset in the joined graph
    for start in starts:
        cc, n = labels(start)
        offset.append(total)
        for k in range(cc.shape[0]):
            hit = cc[k][seeds[start + k] & sub[start + k]]
            if hit.size:
                touching.append(np.unique(hit).astype(np.int64) + total)
        if below is not None:  # the previous slab's last slice against this slab's first
            first = cc[0]
            h, w = first.shape
            codes, base = [], total + int(n) + 1  # each touching pair (below's, this slab's) as one
            for dj, di in offsets:  # number a * base + b: a 1D unique (pairs' unique took 2 s a box)
                a = below[max(0, -dj):h - max(0, dj), max(0, -di):w - max(0, di)]
                b = first[max(0, dj):h - max(0, -dj), max(0, di):w - max(0, -di)]
                both = (a > 0) & (b > 0)
                codes.append(a[both] * base + (b[both].astype(np.int64) + total))
            code = np.unique(np.concatenate(codes))
            pairs.append(np.stack([code // base, code % base], axis=1))
        below = np.where(cc[-1] > 0, cc[-1].astype(np.int64) + total, 0)
        total += int(n)
        del cc
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(total + 1, total + 1))
    _, component = connected_components(graph, directed=False)
    keep_component = np.zeros(int(component.max()) + 1, dtype=bool)
    if touching:
        keep_component[component[np.concatenate(touching)]] = True
    keep = keep_component[component]
    keep[0] = False  # (the background: label 0 of every slab)
    for start, first_label in zip(starts, offset):
        cc, _ = labels(start)
        lookup = keep[first_label:first_label + int(cc.max()) + 1].copy()
        lookup[0] = False
        for k in range(cc.shape[0]):
            sub[start + k] = lookup[cc[k]]


@dataclass
class _Reuse:
    """What a previous run of the same label left: its mask and confidence (axis 0 first) and
    the keyframes it was computed from. A region is reused when the keyframes it depends on are
    unchanged (same slices, bit-identical masks)."""

    mask: np.ndarray
    confidence: np.ndarray
    keyframes: dict[int, np.ndarray]
    agreement: np.ndarray | None = None  # per slice, where a one-sided walk recorded it (else NaN)
    begin_state: object = None  # the predictor's class and ``begin_state`` in that run
    stops: list = field(default_factory=list)  # how that run's walks ended (``PropagationResult.stops``)
    outward_wall_test: bool = False  # ``PropagationResult.outward_wall_test`` of that run
    # (a, b, overlap) of that run's ``PropagationResult.disagree``: a reused pair between drawn slices is
    # said again as computed (an update dropped the note of a pair still wrong; a review, session 48)
    disagree: list = field(default_factory=list)

    def stop_of(self, start: int, direction: int) -> dict | None:
        """How the earlier run's one-sided walk from ``start`` in ``direction`` ended, if it says."""
        return next((s for s in self.stops if s.get("start") == start and s.get("direction") == direction), None)

    def same(self, s: int, prompt_mask: np.ndarray) -> bool:
        return s in self.keyframes and np.array_equal(self.keyframes[s], prompt_mask[s])

    def take(self, slices, probs, conf, progress, agree: np.ndarray | None = None):
        for s in slices:
            probs[s] = self.mask[s]
            conf[s] = self.confidence[s]
            if agree is not None and self.agreement is not None:
                agree[s] = self.agreement[s]
        progress.advance(len(slices), "reused")

    def first_below(self, span, min_agreement: float) -> int | None:
        """The first slice of a reused walk (in walk order) whose recorded agreement is below
        ``min_agreement``: where that walk would have ended under the stricter test."""
        if self.agreement is None:
            return None
        for s in span:
            if self.agreement[s] < min_agreement:  # NaN (not recorded) never is
                return s
        return None


def _work(keys: list[int], drawn: set[int], lo: int, hi: int) -> int:
    """Slices one label's propagation predicts at most (the progress total): one-sided walks count
    once, intervals between two drawn keyframes twice (both directions)."""
    total = (keys[0] - lo if keys[0] in drawn else 0) + (hi - keys[-1] if keys[-1] in drawn else 0)
    for a, b in zip(keys[:-1], keys[1:]):
        if a in drawn or b in drawn:
            total += max(b - a - 1, 0) * (2 if a in drawn and b in drawn else 1)
    return total


# Public attributes of a predictor that are no setting of its results: what ``begin`` measured
# (in ``begin_state`` when it matters) and how many threads it uses.
_NOT_SETTINGS = frozenset({"begin_state", "prompt_area", "threads", "registration_workers",
                           "gate", "window", "registration"})  # the last three: state set by begin()


def predictor_settings(predictor) -> tuple:
    """A predictor's settings as text (``name=value``): its public attributes of plain types, the
    class-level options an instance may override, and for the network its weights (sha256) and
    preprocessing. Walks made with other settings (another registration weight, other weights) are
    not reused by an update."""
    items = {}
    # Class-level options first, base classes before subclasses (a default a subclass or a new
    # release changes is a setting too: gate_k, inherited thresholds), then the instance's own.
    for cls in reversed(type(predictor).__mro__):
        for name, value in vars(cls).items():
            if not name.startswith("_") and name not in _NOT_SETTINGS and not callable(value) \
                    and not isinstance(value, (property, staticmethod, classmethod)):
                items[name] = value
    state = getattr(predictor, "__dict__", {})
    items.update({name: value for name, value in state.items()
                  if not name.startswith("_") and name not in _NOT_SETTINGS})
    model = items.pop("model", None)
    if model is not None:
        items["model"] = getattr(model, "sha256", "") or f"in memory {id(model)}"
        items["preprocessing"] = getattr(model, "preprocessing", None)
        items["inference"] = getattr(model, "inference", None)  # e.g. the registration's grid and iterations
    out = []
    for name, value in sorted(items.items()):
        if isinstance(value, dict):
            value = sorted(value.items())
        elif not (value is None or isinstance(value, (bool, int, float, str, tuple, np.generic))) \
                and name not in ("preprocessing", "inference"):
            continue  # state objects (the drift test, the registration predictor), not settings
        out.append(f"{name}={value!r}")
    return tuple(out)


def same_begin(before, now) -> bool:
    """Whether a walk recorded with ``before`` (a ``_begin_key``, or its JSON form read back from a
    record) may be reused by a run whose key is ``now``: the same predictor class and begin state,
    and every setting the record names has the same value now. A setting the record does not name
    is not compared: records written before class-level defaults were recorded (session 29) name
    only the instance's settings, and an upgrade alone should not recompute every walk."""
    from .checks import state_to_json

    try:
        before, now = state_to_json(before), state_to_json(now)
    except (TypeError, ValueError):
        return False
    if not (isinstance(before, list) and isinstance(now, list) and len(before) == len(now) == 3):
        return before == now
    return before[:2] == now[:2] and settings_kept(before[2], now[2])


def settings_kept(before, now) -> bool:
    """Every setting (``name=value`` text) of ``before`` is among ``now``'s (see ``same_begin``)."""
    if not isinstance(before, (list, tuple)) or not isinstance(now, (list, tuple)):
        return False
    return set(map(str, before)) <= set(map(str, now))


def _begin_key(predictor) -> tuple:
    """Which predictor ran a label, with which settings, and what it took from the drawn slice
    (``begin_state``)."""
    return type(predictor).__name__, getattr(predictor, "begin_state", None), predictor_settings(predictor)


def _propagate_label(volume, prompt_mask, keyframes, predictor, spacing_axis, lo, hi, batch_size,
                     early_stop, remove_disconnected, progress, stats, reuse: _Reuse | None = None,
                     empty_keyframes=(), edited=()):
    """One label, axis 0. Returns (bool mask, confidence per slice, recomputed intervals, agreement
    per slice of the one-sided walks, the predictor's ``_begin_key`` for this label).

    ``keyframes``: the drawn slices; ``empty_keyframes``: slices the user says do not hold the
    object (walls): no walk crosses one, a walk from a drawn keyframe towards one stops before it
    (earlier if the object ends), and nothing beyond the outermost one is predicted.
    """
    n = volume.shape[0]
    # Thick slices: the walks step through interpolated slices (walk_volume: original slice i is
    # slice i * k there) and keep only the original ones; everything else stays on the original grid.
    k = through_plane_factor(spacing_axis, predictor)
    walk_volume = AxisInterpolated(volume, k) if k > 1 else volume
    window = window_slices(spacing_axis / k, predictor)

    def walk(a, a_mask, d, bound, walk_early_stop, out_p, out_c, **kw):
        if k == 1:
            return _walk(volume, predictor, a, a_mask, d, bound, window, batch_size, walk_early_stop, progress,
                         out_p, out_c, stats, **kw)
        fine_p, fine_c = _OriginalSlices(k, 2 * window), {}
        out_agree = kw.pop("out_agree", None)
        fine_agree = None if out_agree is None else np.full(walk_volume.shape[0], np.nan, dtype=np.float32)
        first_stop = len(stats.get("stops", []))
        last = _walk(walk_volume, predictor, a * k, a_mask, d, bound * k, window, batch_size, walk_early_stop,
                     _ScaledProgress(progress, k), fine_p, fine_c, stats, out_agree=fine_agree, slice_step=k, **kw)
        for j, p in fine_p.items():
            if j % k == 0:
                out_p[j // k] = p
                out_c[j // k] = fine_c[j]
        if out_agree is not None:
            kept = fine_agree[::k]
            out_agree[~np.isnan(kept)] = kept[~np.isnan(kept)]

        def original(j: int) -> int:  # the last original slice a walk in direction d reached by j
            return j // k if d > 0 else -(-j // k)

        for stop in stats.get("stops", [])[first_stop:]:
            stop["start"], stop["last"] = stop["start"] // k, original(stop["last"])
        return original(last)

    conf = np.full(n, np.nan, dtype=np.float32)
    agreement = np.full(n, np.nan, dtype=np.float32)
    probs: dict[int, np.ndarray] = {}
    drawn = set(keyframes)
    keys = sorted(drawn | set(empty_keyframes))
    first = _begin_keyframe(prompt_mask, keyframes, getattr(predictor, "begin_keyframe", "lowest"))
    predictor.begin(walk_volume, first * k, prompt_mask[first])
    begin_key = _begin_key(predictor)  # recorded with the result: what a later update compares
    if reuse is not None and not same_begin(reuse.begin_state, begin_key):
        # Another method, or the same one begun differently (e.g. a keyframe drawn below the first
        # one gave PAM another intensity window): walks of the earlier run are not this run's.
        reuse = None
    for kf in keyframes:
        conf[kf] = 1.0
    old_keys = sorted(reuse.keyframes) if reuse is not None else []
    old_drawn = {k for k in old_keys if reuse.keyframes[k].any()} if reuse is not None else set()
    recomputed: list[tuple[int, int]] = []

    min_agreement = float(getattr(predictor, "keyframe_outward_min_agreement", 0.0) or 0.0)

    def outward_agreement(n_drawn: int) -> float:
        # Beyond the outermost of several drawn keyframes the agreement test applies, as a stop
        # test: not without early stopping (walk() skips it then too).
        return min_agreement if n_drawn >= 2 and early_stop else 0.0

    def outermost(a: int, d: int, drawn_slices) -> bool:
        """No drawn keyframe lies beyond ``a`` in direction ``d``: a walk from it goes outward, to
        the volume's end or to a wall. (Until session 32 a walk towards a wall had no agreement
        test: erasing a leaked slice beyond where the test had ended the walk made the leak grow
        back up to that wall.)"""
        return not any((k - a) * d > 0 for k in drawn_slices)

    def old_walk(a: int, d: int) -> tuple[int, float] | None:
        """How far the previous run walked one-sidedly from drawn keyframe ``a`` in direction ``d``,
        and with which agreement test (None if it did not: ``a`` was not a drawn keyframe with this
        mask, or it was fused)."""
        if reuse is None or a not in old_drawn or not reuse.same(a, prompt_mask):
            return None
        nxt = [k for k in old_keys if (k - a) * d > 0]
        if not nxt:
            return (lo if d < 0 else hi), outward_agreement(len(old_drawn))
        k = nxt[0] if d > 0 else nxt[-1]
        if k in old_drawn:
            return None
        if outward_agreement(len(old_drawn)) > 0 and outermost(a, d, old_drawn):
            # outward to a wall: with the agreement test since session 32; a result of an earlier
            # version walked there without it, and is predicted again
            return (k - d, outward_agreement(len(old_drawn))) if reuse.outward_wall_test else None
        return k - d, 0.0

    def repeat_stop(a: int, d: int, bound: int, span) -> None:
        """How a reused walk ended, as a fresh run records it (the report's walk_end, the drift
        notes): the earlier ending where it lies before the bound, else the bound (a new wall)."""
        ended = reuse.stop_of(a, d) if early_stop else None
        if ended is not None and (bound - int(ended["last"])) * d > 0:
            _record_stop(stats, a, d, int(ended["last"]), str(ended["reason"]))
        elif ended is not None:
            held = [k for k in span if reuse.mask[k].any()]
            _record_stop(stats, a, d, held[-1] if held else a, "end")

    def one_sided(a: int, d: int, bound: int, outward: bool = False):
        """Walk from drawn keyframe ``a`` in direction ``d`` up to ``bound`` (inclusive)."""
        if (bound - a) * d <= 0:
            return
        span = range(a + d, bound + d, d)
        agree = outward_agreement(len(drawn)) if outward or outermost(a, d, drawn) else 0.0
        old = old_walk(a, d)
        # A walk is a function of its start, direction and stopping rule: a truncated earlier walk
        # is reused when it had the same rule. A stricter agreement test only ends it earlier, at
        # the first slice whose recorded agreement is below the new minimum: the rest is the same.
        # Not so the authors' walk: its guides also vote on the slices behind them, so a walk cut
        # short (a new wall) is not the earlier one truncated; only the same walk is reused.
        published = bool(getattr(predictor, "published_scheme", False))
        if old is not None and published and (old[0] != bound or old[1] != agree):
            old = None
        if old is not None and (old[0] - a) * d >= (bound - a) * d:
            if old[1] == agree:
                reuse.take(span, probs, conf, progress, agreement)
                repeat_stop(a, d, bound, span)
                return
            if old[1] < agree:
                cut = reuse.first_below(span, agree)
                kept = list(span) if cut is None else list(range(a + d, cut, d))
                reuse.take(kept, probs, conf, progress, agreement)
                if cut is None:  # the stricter test ends it nowhere sooner: the same walk, the same ending
                    repeat_stop(a, d, bound, span)
                if cut is not None:
                    probs[cut] = np.zeros(volume.shape[1:], dtype=bool)
                    conf[cut] = 0.0
                    held = [k for k in kept if reuse.mask[k].any()]
                    _record_stop(stats, a, d, held[-1] if held else a, "agreement")
                    progress.advance(len(span) - len(kept), "side finished")
                return
        walk(a, prompt_mask[a], d, bound, early_stop, probs, conf, min_agreement=agree, out_agree=agreement)
        recomputed.append((min(a + d, bound), max(a + d, bound)))

    if keys[0] in drawn:
        one_sided(keys[0], -1, lo, outward=True)
    if keys[-1] in drawn:
        one_sided(keys[-1], +1, hi, outward=True)

    # Between keyframes: both sides, fused by distance so each keyframe dominates near itself. Both
    # ends hold the object, so the stop signals (presence, drift) do not empty slices here.
    old_pairs = set(zip(old_keys[:-1], old_keys[1:]))
    for a, b in zip(keys[:-1], keys[1:]):
        if b - a < 2:
            continue
        if a in drawn and b not in drawn:
            one_sided(a, +1, b - 1)
            continue
        if b in drawn and a not in drawn:
            one_sided(b, -1, a + 1)
            continue
        if a not in drawn:  # two walls: the object is absent in between
            continue
        if (a, b) in old_pairs and a in old_drawn and b in old_drawn and reuse.same(a, prompt_mask) \
                and reuse.same(b, prompt_mask):
            reuse.take(range(a + 1, b), probs, conf, progress)
            progress.advance(b - a - 1, "reused")  # both directions' share of the work
            stats.setdefault("meet", []).extend((a, b, d) for pa, pb, d in reuse.disagree if (pa, pb) == (a, b))
            continue
        recomputed.append((a + 1, b - 1))
        fwd_p, fwd_c, bwd_p, bwd_c = {}, {}, {}, {}
        walk(a, prompt_mask[a], +1, b - 1, False, fwd_p, fwd_c, keep_prob=True, stop_signals=False)
        walk(b, prompt_mask[b], -1, a + 1, False, bwd_p, bwd_c, keep_prob=True, stop_signals=False)
        # (session 19, chosen on training-case structures: two keyframes 0.783 -> 0.787 and 0.711 -> 0.711;
        # an attribute so that validate.py's pam+kfvotes can measure the old rule)
        empty_side_votes = bool(getattr(predictor, "keyframe_empty_side_votes", False))
        # (session 31, a candidate measured with validate.py's pam+kfcollapseF: a walk whose area fell
        # below F x the area expected from the two drawn slices lost the object too)
        collapse = float(getattr(predictor, "keyframe_collapse_fraction", 0.0) or 0.0)
        area_a, area_b = int(np.count_nonzero(prompt_mask[a])), int(np.count_nonzero(prompt_mask[b]))
        meet, held = -1.0, [False, False]  # held: each walk found the object on some slice between
        for s in range(a + 1, b):
            w_f, w_b = (b - s) / (b - a), (s - a) / (b - a)
            if not empty_side_votes:
                # Both ends hold the object: a walk that lost it here says nothing about its shape.
                least = collapse * (w_f * area_a + w_b * area_b)
                f_has = int(np.count_nonzero(fwd_p[s] >= predictor.threshold)) > least
                b_has = int(np.count_nonzero(bwd_p[s] >= predictor.threshold)) > least
                if f_has != b_has:
                    w_f, w_b = (1.0, 0.0) if f_has else (0.0, 1.0)
            # each side's probability is dropped once fused, and the fused slice kept as the mask it
            # becomes (a review, s29: three dense float copies per slice between two keyframes)
            f_prob, b_prob = fwd_p.pop(s), bwd_p.pop(s)
            f_mask, b_mask = f_prob >= predictor.threshold, b_prob >= predictor.threshold
            meet = max(meet, _both_overlap(f_mask, b_mask))
            held[0], held[1] = held[0] or bool(f_mask.any()), held[1] or bool(b_mask.any())
            probs[s] = (w_f * f_prob + w_b * b_prob) >= predictor.threshold
            conf[s] = w_f * fwd_c[s] + w_b * bwd_c[s]
        # how far the two walks agree anywhere between the two drawn slices: both found the object there,
        # but never on one slice, is no meeting either (overlap 0; a re-review: one object on 0-7, another on
        # 8-19, drawn on 4 and 12, switched at 8 without a word). (Empty slices between, where neither walk's
        # share of the fused probability reaches the threshold, are said as a gap too.)
        stats.setdefault("meet", []).append((a, b, 0.0 if meet < 0 and all(held) else meet))

    t0 = time.perf_counter()
    mask = np.zeros(volume.shape, dtype=bool)
    for s in list(probs):  # each slice's mask let go once copied: not both held whole (session 34)
        mask[s] = probs.pop(s) >= predictor.threshold
    for kf in keys:
        mask[kf] = prompt_mask[kf]
    if remove_disconnected:  # the authors' published walk keeps 6-connected components (scipy's default)
        mask = _keep_connected(mask, prompt_mask, 6 if getattr(predictor, "published_scheme", False) else 26)
    for kf in keys:  # the user's slices are kept exactly (walls stay empty)
        mask[kf] = prompt_mask[kf]
    largest = max((int(np.count_nonzero(prompt_mask[k])) for k in drawn), default=0)
    for a, b in zip(keys[:-1], keys[1:]):  # empty slices between two drawn ones: said, and reviewed first
        if a in drawn and b in drawn and b - a >= 2:
            stats.setdefault("gaps", []).extend(_gaps_between(mask, a, b, conf))
            stats.setdefault("thin", []).extend(_thin_between(mask, a, b, largest, edited))
    stats["postprocess"] += time.perf_counter() - t0
    return mask, conf, sorted(recomputed), agreement, begin_key


def propagate(
    image: np.ndarray,
    prompt: np.ndarray,
    spacing: Sequence[float],
    model=None,
    *,
    axis: int | None = None,
    labels: Sequence[int] | None = None,
    range: tuple[int, int] | None = None,  # noqa: A002 - the documented option name
    early_stop: bool = True,
    remove_disconnected: bool | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    previous: PropagationResult | None = None,
    empty_slices=None,
    update: bool | None = None,
) -> PropagationResult:
    """Propagate the prompt's label(s) through ``image``.

    image: (k, j, i) array; prompt: integer label map of the same shape drawn on one or more
    slices; spacing: voxel size in mm in (k, j, i) order. ``model`` is a ``PAMModel``, any
    ``SlicePredictor``, None for the shipped default weights, or a ``remote.RemoteModel`` (the
    inputs are checked here, then its server propagates; ``device``, ``threads`` and
    ``batch_size`` are then the server's). ``range`` = (first, last) slice
    along the propagation axis, both included. ``early_stop=False`` predicts every slice in the
    range; by default it also keeps components not connected to the prompt (objects that vanish
    and reappear).

    ``axis``: the propagation axis (None: the one the drawing lies across). ``labels``: the prompt
    labels to propagate (None: all). Where two labels' results overlap, the label propagated
    first keeps the voxel (``labels``' order, else ascending) and a label's own drawn voxels
    always win; the labels that lost voxels are listed in ``result.overlapped``.
    ``remove_disconnected``: drop 3D components not connected to the drawing (default:
    ``early_stop``). ``batch_size``: slices per network call. ``device``: 'cpu', 'cuda' or 'cuda:N'
    (for ``model=None``; a loaded model stays on its device). ``threads``: CPU threads of torch and
    SimpleITK for the call (None: their settings, the registrations in two threads beside the
    network; 1: everything in the calling thread).
    ``progress(fraction, message)``: called on the calling thread with rising fractions up to 1.0;
    an exception raised in it ends the run. ``cancel``: a ``CancelToken`` (one per run) whose
    ``cancel()`` ends the run from another thread.

    A predictor holds the state of the walk it runs: calls sharing one ``SlicePredictor`` from
    several threads take turns (share the ``PAMModel`` instead to run them at once).

    Raises InputError for bad input, CheckpointError when the weights cannot be used (the default
    weights damaged, a network whose output is not finite), PropagationCancelled when cancelled,
    and for a ``remote.RemoteModel`` PAMError when its server cannot be reached. All four are
    importable from ``PAMSegmentLib`` (``from PAMSegmentLib import InputError``).

    ``previous``: the result of an earlier run on the same image whose prompt has since gained or
    changed keyframes (the correction loop). Regions whose keyframes are unchanged are copied
    from it; only the others are recomputed (``result.recomputed``, ``result.n_predicted``). A
    result of another image (or spacing), by its ``image_digest``, is not reused: everything is
    recomputed.

    ``empty_slices``: slices along the propagation axis where the user says the object is absent
    (an erased slice), as a sequence for every label or a dict {label: sequence}. Each is a wall:
    no walk crosses it, it stays empty, and nothing beyond the outermost one is predicted. They
    are returned in ``result.keyframes`` as all-empty masks.

    ``update``: the prompt is an earlier result whose slices the user edited (default: when
    ``previous`` is given). Its thin slices are then the object's tips, not the trace of a stroke
    drawn in another view, so they are not refused (``find_prompt_slices``); a server running an
    update without ``previous`` passes True.
    """
    t_start = time.perf_counter()
    for what, given in (("image", image), ("prompt", prompt)):
        if type(given).__module__.startswith("SimpleITK"):  # np.asarray made it 1D ("got 1D with shape (6065928,)")
            raise InputError(f"the {what} is a SimpleITK image; propagate takes numpy arrays (k, j, i): pass "
                             f"sitk.GetArrayFromImage({what}) and the spacing reversed, "
                             "tuple(reversed(image.GetSpacing())), or read files with "
                             "PAMSegmentLib.volumes.read_volume")
        if hasattr(given, "array") and hasattr(given, "spacing"):  # a Volume ("got 0D with shape ()")
            raise InputError(f"the {what} is a {type(given).__name__}; propagate takes its array: pass {what}.array "
                             "(and image.spacing as the spacing)")
    image = as_array(image, "image")
    prompt = as_array(prompt, "prompt", "PAMSegmentLib.volumes.read_labelmap (with reference=the image)")
    spacing = _validate_inputs(image, prompt, spacing)
    axis, labels, range = _validate_options(axis, labels, range, batch_size, threads, cancel, previous, progress,
                                            early_stop, remove_disconnected, update)
    early_stop = bool(early_stop)
    if not np.issubdtype(prompt.dtype, np.integer):
        prompt = prompt.astype(np.int32)  # bool or integral floats; integer label maps are used as they are
    if update is None:
        update = previous is not None
    ax, slices, (lo, hi), empties = check_request(prompt, axis, labels, range, empty_slices, bool(update))
    if remove_disconnected is None:
        remove_disconnected = early_stop
    vol = np.moveaxis(image, ax, 0)
    prm = np.moveaxis(prompt, ax, 0)
    if getattr(model, "runs_remotely", False) is True:  # a RemoteModel: its server does the work
        return model.propagate(image, prompt, spacing, axis=axis, labels=labels, range=range, early_stop=early_stop,
                               remove_disconnected=remove_disconnected, empty_slices=empty_slices, progress=progress,
                               cancel=cancel, previous=previous, update=update, _checked=True)
    predictor = _as_predictor(model, device)
    digest = image_digest(image, spacing)
    with _walk_lock(predictor):  # a predictor holds its walk's state: concurrent calls sharing one take turns
        result = _propagate_checked(image, prompt, spacing, predictor, ax, slices, lo, hi, empties, vol, prm, labels,
                                    early_stop, remove_disconnected, batch_size, threads, progress, cancel, previous,
                                    digest, t_start)
    result.image_levels = flat_levels(image)
    return result


LABEL_MAP_LEVELS = 128  # at most this many distinct whole values: a label map's (TotalSegmentator's: 118)
# ... and of its object voxels (``flat_levels``) at least these shares equal to the voxel 1 and 3 further
# along a row, and along a column. Measured (session 46) on the public volumes in reach: label maps 0.66-0.99
# at 1 and 0.36-0.97 at 3 (organs, vertebrae, parcellations, single-organ masks; thin ribs fall short);
# scans (8-bit exports, narrow CT windows with the saturated ends left out) at most 0.32 at 1, but scans
# enlarged by nearest neighbour 2 or 3 times reach 0.52-0.77 at 1 while staying at 0.32 or less at 3.
LABEL_MAP_FLAT = (0.5, 0.35)


def flat_levels(image: np.ndarray, sample_slices: int = 16) -> tuple | None:
    """The image's distinct values (sorted) if it looks like a label map, else None: at most
    LABEL_MAP_LEVELS whole values, and of the voxels not holding its commonest value (the
    background) at least the LABEL_MAP_FLAT shares equal to the voxel 1 and 3 further along rows
    and along columns (a scan's noise and texture make them differ: an 8-bit MR of few levels is no
    label map; one enlarged by nearest neighbour repeats each value only over its block; an image of
    two values is a mask whatever its shape: a rib's is not flat over 3 voxels). Where the
    image holds more than 32 values, its lowest and highest are left out too (a CT windowed to 8
    bits saturates whole organs). Judged on ``sample_slices`` slices spread along axis 0 (a large
    scan is not sorted whole), or on the whole image where they hold fewer than 20 object voxels;
    the values are then counted on the whole image."""
    if image.dtype.kind not in "biuf" or image.ndim != 3 or min(image.shape[1:]) < 4:
        return None
    if len(np.unique(image[image.shape[0] // 2])) > LABEL_MAP_LEVELS:  # a scan's middle slice alone (~10 ms)
        return None
    picks = np.unique(np.linspace(0, image.shape[0] - 1, min(sample_slices, image.shape[0])).round().astype(int))
    def labels_like(values) -> bool:  # few enough, and whole
        return len(values) <= LABEL_MAP_LEVELS and (image.dtype.kind != "f" or bool(np.all(np.mod(values, 1) == 0)))

    for sample in (np.asarray(image[picks]), image):
        values, counts = np.unique(sample, return_counts=True)
        if not labels_like(values):
            return None
        objects = sample != values[np.argmax(counts)]
        if len(values) > 32:  # (a label map's highest label is no saturated end: few labels keep it)
            objects &= (sample != values[0]) & (sample != values[-1])
        if objects.sum() >= 20:
            break
    else:
        return None
    for step, least in zip((1, 3), LABEL_MAP_FLAT if len(values) > 2 else ()):  # (two values: a mask, thin or not)
        for here, there, held in ((sample[:, :, :-step], sample[:, :, step:], objects[:, :, :-step]),
                                  (sample[:, :-step], sample[:, step:], objects[:, :-step])):
            if not held.any() or np.mean(here[held] == there[held]) < least:
                return None
    values = values if sample is image else np.unique(image)  # (counted already when the whole image was the sample)
    if not labels_like(values):
        return None
    return tuple(v.item() for v in values)


def image_digest(image: np.ndarray, spacing) -> str:
    """A checksum of an image's values, shape, type, memory order and spacing (CRC-32; about 0.1 s
    per 150 MB on this project's machine): ``previous=`` is reused only on the image it was
    computed on (the same values in another type or order count as another image: recomputed)."""
    import zlib

    fortran = image.flags.f_contiguous and not image.flags.c_contiguous
    h = zlib.crc32(repr((image.shape, image.dtype.str, fortran, tuple(float(v) for v in spacing))).encode())
    # Bytes in memory order where the array is contiguous either way (nibabel gives Fortran order):
    # about 0.3 s per 600 MB; other views are hashed a plane at a time.
    planes = [image] if image.flags.c_contiguous else [image.T] if fortran else image
    for plane in planes:
        h = zlib.crc32(np.ascontiguousarray(plane).reshape(-1).view(np.uint8), h)
    return f"crc32:{h:08x}"


class _WalkLock:
    """One walk at a time on a predictor: other threads wait their turn; the thread already
    running one (a progress callback that propagates again with the same predictor) gets an
    InputError, since waiting would never end and going on would mix the two walks' state."""

    def __init__(self):
        self._lock, self._owner = threading.Lock(), None

    def __enter__(self):
        if self._owner == threading.get_ident():
            raise InputError("propagate was called again with the same predictor while it runs a walk (from its "
                             "progress callback?): give that call a predictor of its own")
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()

    def __reduce__(self):  # a copied or pickled predictor gets a lock of its own
        return (_WalkLock, ())


def _walk_lock(predictor) -> contextlib.AbstractContextManager:
    """The lock of ``predictor``'s walks (made on first use): its ``begin`` state belongs to one
    walk at a time."""
    state = getattr(predictor, "__dict__", None)
    if state is None:
        return contextlib.nullcontext()
    return state.setdefault("_pamsegment_walk_lock", _WalkLock())  # dict.setdefault: atomic under the GIL


def _propagate_checked(image, prompt, spacing, predictor, ax, slices, lo, hi, empties, vol, prm, labels, early_stop,
                       remove_disconnected, batch_size, threads, progress, cancel, previous, digest, t_start):
    """``propagate``'s work once its inputs are checked."""
    # No whole-volume float copy: the predictors cast only the slices they read.
    vol_f = vol
    # Every slice the user gave per label: drawn keyframes and walls.
    user_slices = {lab: sorted(set(sl) | empties[lab]) for lab, sl in slices.items()}
    total = sum(_work(user_slices[lab], set(sl), lo, hi) for lab, sl in slices.items())
    tracker = _Progress(total, progress, cancel)
    stats = {"predict": 0.0, "postprocess": 0.0, "n_predicted": 0}

    with torch_threads(threads):
        out = np.zeros(vol.shape, dtype=np.uint16 if max(slices) > 255 else np.uint8)
        conf_all, ranges = {}, {}
        usable_previous = (
            previous is not None and previous.axis == ax and previous.mask.shape == image.shape
            and previous.image_digest in (None, digest)  # None: a result read back from a record
            and previous.range == (lo, hi) and previous.early_stop == early_stop
            and previous.remove_disconnected == bool(remove_disconnected)
        )
        overlapped, lost_voxels = set(), {}
        keyframes_all, recomputed_all, stops_all, agreement_all, begin_states = {}, {}, {}, {}, {}
        gaps_all, lost_all, thin_all, edited_all, dropped_all, disagree_all = {}, {}, {}, {}, {}, {}
        before_moved = (np.moveaxis(previous.mask, ax, 0) if previous is not None and previous.axis == ax
                        and previous.mask.shape == image.shape and previous.image_digest in (None, digest)
                        else None)  # (a result of another image says nothing of what this one emptied)
        # (usable_previous implies before_moved: the same map, so one set of boxes for both)
        before_boxes = _LabelBoxes(before_moved, slices) if before_moved is not None else None
        # where each label is drawn, from one pass over the prompt where it is sparse (not a pass a label);
        # a label's drawing is read within its box when its turn comes (not all held through the walks)
        extents = _sparse_label_extents(prm, list(slices))
        for n_lab, (lab, keyframes) in enumerate(slices.items(), start=1):
            tracker.check_cancel()
            tracker.label = f"label {lab} ({n_lab}/{len(slices)})" if len(slices) > 1 else ""
            stats["stops"], stats["gaps"], stats["thin"], stats["meet"] = [], [], [], []
            # the previous label's full-volume arrays go before this label's are made (with three or
            # more labels they were the run's peak of memory: 4 B a voxel more than with one)
            mask = taken = clash = drawn_over = label_mask = reuse = None
            if extents is not None:  # (the same array as prm == lab: False outside the drawing's box)
                drawn_box = extents[lab] or (slice(0, 0),) * prm.ndim
                label_mask = np.zeros(prm.shape, dtype=bool)
                label_mask[drawn_box] = prm[drawn_box] == lab
            else:
                label_mask = prm == lab
                drawn_box = None
            if usable_previous and lab in previous.keyframes and (lab not in previous.overlapped
                                                                   or lab in previous.lost_voxels):
                own = before_boxes.mask(lab)
                if lab in previous.overlapped:  # its own mask: the merged map's and the voxels it lost there
                    own.flat[previous.lost_voxels[lab]] = True  # (flat: reshape copies a view along axis 1 or 2)
                reuse = _Reuse(own, previous.confidence[lab], previous.keyframes[lab],
                               previous.agreement.get(lab), previous.begin_state.get(lab),
                               stops=list(previous.stops.get(lab, [])),
                               outward_wall_test=bool(getattr(previous, "outward_wall_test", False)),
                               disagree=list(getattr(previous, "disagree", {}).get(lab, [])))
            if previous is not None and previous.axis == ax and lab in previous.keyframes:
                # drawn in this round, or by an earlier update round (``previous.edited``: a tip drawn in
                # round 1 is no stray click in round 3; a re-review, session 31)
                edited_all[lab] = _edited_slices(previous.keyframes[lab], label_mask, user_slices[lab],
                                                 previous.edited.get(lab, ()))
            mask, conf, recomputed_all[lab], agreement_all[lab], begin_states[lab] = _propagate_label(
                vol_f, label_mask, keyframes, predictor, spacing[ax], lo, hi, batch_size, early_stop,
                remove_disconnected, tracker, stats, reuse, empties[lab], edited=edited_all.get(lab, ()))
            keyframes_all[lab] = {k: label_mask[k].copy() for k in user_slices[lab]}
            held_rows = mask.any(axis=(1, 2))
            if before_moved is not None and lab in previous.keyframes and slices[lab]:
                # up to a wall the user set beyond them (the object is absent there by the user's word)
                dropped_all[lab] = _dropped_slices(before_boxes.rows(lab), held_rows, slices[lab], empties[lab], lo, hi)
            stops_all[lab] = stats.pop("stops")
            gaps_all[lab] = sorted(stats.pop("gaps"))
            thin_all[lab] = sorted(stats.pop("thin"))
            # (-1: one walk found nothing between: the other's prediction stands there)
            disagree_all[lab] = [(int(a), int(b), round(float(d), 3)) for a, b, d in stats.pop("meet")
                                 if 0.0 <= d < KEYFRAME_DISAGREE_OVERLAP]
            # Earlier labels keep their voxels; a label's own prompt voxels always win.
            if lab != next(iter(slices)):  # the first label finds the map empty
                # on the slab of slices this label holds or is drawn on (flat indices shifted to the
                # whole map's): not five more full-volume arrays per label
                drawn_rows = np.zeros_like(held_rows)
                if drawn_box is not None:
                    drawn_rows[drawn_box[0]] = True
                else:
                    drawn_rows = label_mask.any(axis=(1, 2))
                rows = np.flatnonzero(held_rows | drawn_rows)
                z0, z1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
                o, m, drawn_here = out[z0:z1], mask[z0:z1], label_mask[z0:z1]
                shift = z0 * out.shape[1] * out.shape[2]
                taken = o != 0
                clash = m & taken
                if clash.any():
                    overlapped.add(lab)
                    values, counts = np.unique(o[clash & ~drawn_here], return_counts=True)
                    lost_all[lab] = ({int(v): int(c) for v, c in zip(values, counts)}, int(mask.sum()))
                    lost_voxels.setdefault(lab, []).append(np.flatnonzero(clash & ~drawn_here) + shift)
                drawn_over = drawn_here & taken
                if drawn_over.any():  # earlier labels lose these voxels to this label's drawing
                    for v in np.unique(o[drawn_over]):
                        overlapped.add(int(v))
                        lost_voxels.setdefault(int(v), []).append(np.flatnonzero(drawn_over & (o == v)) + shift)
                o[m & ~taken] = lab
            else:
                out[mask] = lab
            if drawn_box is not None:
                out[drawn_box][label_mask[drawn_box]] = lab
            else:
                out[label_mask] = lab
            conf_all[lab] = conf
            occupied = np.flatnonzero(held_rows)
            ranges[lab] = (int(occupied[0]), int(occupied[-1]))
        lost_voxels = {lab: np.unique(np.concatenate(parts)) for lab, parts in lost_voxels.items()}
        cut_all = {}
        for lab in overlapped:  # whole slices between its drawn slices that other labels took
            drawn = sorted(slices[lab])
            lost = lost_voxels.get(lab)
            if len(drawn) >= 2 and lost is not None and len(lost):
                held = (out[drawn[0]:drawn[-1] + 1] == lab).any(axis=(1, 2))
                # only slices where its own prediction was (its lost voxels lie there): not where its
                # walks found nothing, nor the user's walls
                lost_slice = lost // (out.shape[1] * out.shape[2])
                had = set(np.unique(lost_slice).tolist())
                cut = [drawn[0] + int(i) for i in np.flatnonzero(~held) if drawn[0] + int(i) in had]
                if cut:  # who holds its own voxels there
                    there = lost[np.isin(lost_slice, cut)]
                    cut_all[lab] = (cut, sorted(int(v) for v in np.unique(out.flat[there]) if v != 0))
        for lab in overlapped:  # the extent a label that lost voxels still has in the merged map
            occupied = np.flatnonzero((out == lab).any(axis=(1, 2)))
            ranges[lab] = (int(occupied[0]), int(occupied[-1]))
    if progress is not None and tracker.last < 1.0:
        progress(1.0, "done")
    timings = {"predict": stats["predict"], "postprocess": stats["postprocess"],
               "total": time.perf_counter() - t_start}
    return PropagationResult(
        mask=np.moveaxis(out, 0, ax),
        axis=ax,
        confidence=conf_all,
        slice_range=ranges,
        prompt_slices=slices,
        timings=timings,
        n_predicted=stats["n_predicted"],
        keyframes=keyframes_all,
        range=(lo, hi),
        early_stop=early_stop,
        recomputed=recomputed_all,
        stops=stops_all,
        agreement=agreement_all,
        remove_disconnected=bool(remove_disconnected),
        overlapped=frozenset(overlapped),
        lost=lost_all,
        gaps=gaps_all,
        # (slices other labels took whole are said as cut, not as thin)
        thin={lab: sorted(set(v) - set(cut_all.get(lab, ((), ()))[0])) for lab, v in thin_all.items()},
        cut=cut_all,
        disagree={lab: v for lab, v in disagree_all.items() if v},
        edited=edited_all,
        outward_wall_test=True,
        dropped=dropped_all,
        begin_state=begin_states,
        image_digest=digest,
        lost_voxels=lost_voxels,
        presence_by=getattr(predictor, "presence_by", ""),
    )


def check_threads(threads) -> None:
    """InputError unless ``threads`` is None or a whole number from 1 to ``max_threads()``."""
    if threads is None:
        return
    n = _whole(threads, "threads")
    if n < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    if n > max_threads():
        raise InputError(f"threads {n} is more than this machine can use ({os.cpu_count()} CPU cores; the limit is 4 "
                         f"threads per core or 64, whichever is more): give at most {max_threads()}; more threads "
                         "than cores only slow the network down")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's and SimpleITK's CPU thread counts set to ``threads`` (when given) for the block, then
    restored. torch is needed only by the network predictor and SimpleITK by the registrations:
    what nothing imported is left alone. At one thread the network's registrations also run in
    turn rather than beside it (``pam_predictor.registration_pool``): the run keeps to one core."""
    check_threads(threads)
    if not threads:
        yield
        return
    # Both counts are process-wide: runs overlapping in several threads (Slicer's worker beside a
    # script, a pool of Python API calls) restore them once, when the last one ends, and a block
    # that ends while others go on leaves the count of the latest of those. Restoring per block in
    # whatever order the blocks ended left the count of the run that ended last for good. A count
    # is saved when a block first finds its module loaded (torch may be imported by a later run).
    mine = object()
    with _THREADS_LOCK:
        _THREADS_ACTIVE.append((mine, int(threads)))
        _set_thread_counts(int(threads))
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_ACTIVE[:] = [entry for entry in _THREADS_ACTIVE if entry[0] is not mine]
            if _THREADS_ACTIVE:
                _set_thread_counts(_THREADS_ACTIVE[-1][1])
            else:
                _set_thread_counts(None)


def _set_thread_counts(threads: int | None) -> None:
    """torch's and SimpleITK's counts set to ``threads`` (what each had before, saved the first
    time, when None), for the modules loaded; under _THREADS_LOCK."""
    torch, sitk = sys.modules.get("torch"), sys.modules.get("SimpleITK")
    get_set = {"torch": (torch.get_num_threads, torch.set_num_threads) if torch is not None else None,
               "sitk": (sitk.ProcessObject.GetGlobalDefaultNumberOfThreads,
                        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads) if sitk is not None else None}
    for name, pair in get_set.items():
        if pair is None:
            continue
        get, put = pair
        if threads is None:
            if name in _THREADS_SAVED:
                put(_THREADS_SAVED.pop(name))
            continue
        _THREADS_SAVED.setdefault(name, get())
        put(threads)


_THREADS_LOCK = threading.Lock()
_THREADS_ACTIVE: list = []  # (block, threads) of the torch_threads blocks running now, oldest first
_THREADS_SAVED: dict = {}  # module -> its count before the first of overlapping blocks changed it


@dataclass
class EditPlan:
    """What ``keyframes_from_edits`` found: the prompt and walls to propagate again from."""

    prompt: np.ndarray  # the label map of every label's keyframes (drawn, earlier and edited slices)
    empty_slices: dict[int, list[int]]  # per label: slices where it is absent (walls: erased, now or before)
    axis: int
    drawn: dict[int, list[int]]  # per label: the PROMPT's slices
    edited: dict[int, list[int]]  # per label: slices where EDITED differs from PREVIOUS
    ignored: list[int]  # labels edited but not in the prompt (not propagated)
    earlier: dict[int, list[int]] = field(default_factory=dict)  # per label: keyframes of earlier rounds
    previous: np.ndarray | None = field(default=None, repr=False)  # the earlier result (for ``changes``)
    # per label: drawn slices an earlier round corrected (they hold that correction, not the drawing)
    corrected: dict[int, list[int]] = field(default_factory=dict)
    drawn_digest: dict[int, dict[int, str]] = field(default_factory=dict)  # per label and drawn slice: its digest
    slice_range: tuple[int, int] | None = None  # the update's range (--range, or the earlier run's; set by the CLI)
    labels: list[int] | None = None  # the update's labels in order (--label, or the earlier run's; set by the CLI)
    # per label: (slices erased this round between two neighbouring keyframes, those keyframes), per pair
    holes: dict[int, list[tuple[list[int], int, int]]] = field(default_factory=dict)

    def changes(self, mask: np.ndarray) -> list[str]:
        """Per label, the slices along the axis where the update's ``mask`` differs from the earlier
        result other than the ones edited by hand (walls and the keyframe rules move a walk's end,
        also far from an edit), as ``label 1: 65-69 (now empty), 116-166``: what to look at again."""
        if self.previous is None:
            return []
        prev, now = (np.moveaxis(np.asarray(a), self.axis, 0) for a in (self.previous, mask))
        lines = []
        before, after = _LabelBoxes(prev, self.drawn), _LabelBoxes(now, self.drawn)
        for lab in sorted(self.drawn):
            had, has = before.rows(lab), after.rows(lab)
            edited = set(self.edited.get(lab, ()))
            either = np.flatnonzero(had | has)  # (where neither holds the label, nothing differs for it)
            first, last = (int(either[0]), int(either[-1]) + 1) if either.size else (0, 0)
            differ_there = ((prev[first:last] == lab) != (now[first:last] == lab)).any(axis=(1, 2))
            differ = [first + int(s) for s in np.flatnonzero(differ_there) if first + int(s) not in edited]
            if not differ:
                continue
            by_status: dict[str, list[int]] = {}
            for s in differ:
                by_status.setdefault(" (now empty)" if not has[s] else " (new)" if not had[s] else "", []).append(s)
            # runs of consecutive slices of one status, in slice order
            parts = sorted((a, f"{a}-{b}" if b != a else f"{a}", status)
                           for status, slices in by_status.items() for a, b in slice_runs(slices))
            lines.append(f"label {lab}: {', '.join(text + status for _, text, status in parts)}")
        return lines

    def keyframes(self, label: int) -> list[int]:
        """The label's keyframe slices (walls not included)."""
        return self._keyframes_of([label])[int(label)]

    def _keyframes_of(self, labels) -> dict[int, list[int]]:
        """``keyframes`` of each of ``labels``, from one look at each slice the prompt is drawn on (the
        plan's prompt holds keyframe slices only: not a pass over the volume a label)."""
        on_axis = np.moveaxis(self.prompt, self.axis, 0)
        found: dict[int, list[int]] = {int(lab): [] for lab in labels}
        for s in np.flatnonzero(on_axis.any(axis=(1, 2))):
            drawn = on_axis[s]
            for value in np.unique(drawn[drawn != 0]):
                if int(value) in found:
                    found[int(value)].append(int(s))
        return found

    def describe(self) -> list[str]:
        lines = []
        keyframes = self._keyframes_of(self.drawn)
        for lab in sorted(self.drawn):
            keys, walls, edited = keyframes[lab], set(self.empty_slices[lab]), set(self.edited[lab])
            fixed = set(self.corrected.get(lab, ()))
            kinds = [("prompt", [s for s in keys if s in self.drawn[lab] and s not in edited and s not in fixed]),
                     ("earlier rounds", [s for s in keys if s in self.earlier.get(lab, ()) and s not in edited
                                         and (s not in self.drawn[lab] or s in fixed)]),
                     ("edited", [s for s in keys if s in edited])]
            text = f"label {lab}: keyframes " + ", ".join(
                ", ".join(str(s) for s in sl) + f" ({kind})" for kind, sl in kinds if sl)
            if walls:
                text += "; the object is absent on " + ", ".join(str(s) for s in sorted(walls))
            if not self.edited[lab]:  # a label the user did not touch: said so, not read as a change
                text += "; not edited"
            lines.append(text)
        return lines

    def notes(self, edited_name: str = "the edited result") -> list[str]:
        """What to check of the plan: labels changed in the edited result that are not propagated
        (not in the prompt, or left out by ``labels``: the command line said so, Python did not; a
        trial, session 47); slices erased between two keyframes of a label leave a gap in
        the object (walls: no walk crosses them). Meant when a slice of a structure that is really
        absent there was erased; otherwise the corrected file is often a copy of another round's
        result than the earlier one given (a helper's trial, session 42: round 2's result corrected,
        round 1's given: the slices round 2 left empty became walls, a hole in a vertebra, exit 0)."""
        out = []
        if self.ignored:
            out.append(f"label{'s' if len(self.ignored) > 1 else ''} {', '.join(map(str, self.ignored))} changed in "
                       f"{edited_name} but not propagated (not in the prompt or not among the labels chosen): left "
                       "out of the result")
        for lab, gaps in sorted(self.holes.items()):
            where = ", and ".join(f"{_slice_list_text(inner)}, between its keyframes {before} and {after}"
                                  for inner, before, after in gaps)
            one = len(gaps) == 1 and len(gaps[0][0]) == 1
            out.append(f"label {lab}: erased on {where}: the object is absent there, a gap in the result; if you "
                       f"did not erase {'it' if one else 'them'}, the corrected file is not a copy of the earlier "
                       "result given (a later round's result, corrected?): give that round's result as the earlier one")
        return out

    def users_own(self) -> dict[int, list[int]]:
        """Per label, the keyframes this round or earlier rounds drew (edited, earlier, corrected):
        the user's word, which the notes do not take for stray clicks or drift stops."""
        return {lab: sorted(set(self.edited.get(lab, ())) | (set(self.earlier.get(lab, ())) - set(self.drawn[lab]))
                            | set(self.corrected.get(lab, ()))) for lab in self.drawn}

    def record(self) -> dict:
        """What a next round needs beside the result (``keyframes_from_edits(..., earlier=)``): per
        label its keyframes and walls, and (when there are any) the drawn slices a round corrected,
        which then hold that correction, not the drawing."""
        out = {}
        keyframes = self._keyframes_of(self.drawn)
        for lab in sorted(self.drawn):
            out[str(lab)] = {"keyframes": keyframes[lab], "walls": sorted(int(s) for s in self.empty_slices[lab])}
            corrected = sorted(set(self.corrected.get(lab, ()))
                               | (set(self.drawn[lab]) & set(self.edited.get(lab, ()))))
            if corrected:
                out[str(lab)]["corrected"] = [int(s) for s in corrected]
                # the drawing those slices had in the prompt: a prompt redrawn there since is not this one
                out[str(lab)]["drawn_sha256"] = {str(s): self.drawn_digest[lab][s] for s in corrected
                                                 if s in self.drawn_digest.get(lab, {})}
        return out


def _earlier_record(earlier) -> dict:
    """``keyframes_from_edits``'s ``earlier`` checked: {label: {"keyframes": [...], "walls": [...]}}
    with the label as text (as ``EditPlan.record()`` and its JSON write it) or a number."""
    if earlier is None:
        return {}
    if not isinstance(earlier, dict):
        raise InputError(f"earlier must be what EditPlan.record() gave, {{label: {{'keyframes': [...], 'walls': "
                         f"[...]}}}}, got {type(earlier).__name__}")
    out = {}
    for key, value in earlier.items():
        label = str(key).strip()
        if isinstance(key, bool) or not (label.isascii() and label.isdigit()):
            raise InputError(f"earlier has the key {key!r}: keys are label numbers")
        lists = [value.get(k, []) for k in ("keyframes", "walls", "corrected")] if isinstance(value, dict) else None
        if lists is None or not all(isinstance(v, (list, tuple)) and all(
                is_number(s, -math.inf, math.inf, whole=True) for s in v) for v in lists):
            raise InputError(f"earlier's label {key!r} must be {{'keyframes': [slice, ...], 'walls': [slice, ...]}}, "
                             f"got {value!r:.120}")
        sha = value.get("drawn_sha256", {})
        if not (isinstance(sha, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit() and isinstance(v, str)
                                              and 0 < len(v) <= 64 for k, v in sha.items())):
            raise InputError(f"earlier's label {key!r} has a malformed drawn_sha256 (slice: digest of its drawing)")
        out[str(int(label))] = {"keyframes": [int(s) for s in lists[0]], "walls": [int(s) for s in lists[1]],
                                "corrected": [int(s) for s in lists[2]],
                                "drawn_sha256": {int(k): v for k, v in sha.items()}}
    return out


def _drawing_digest(mask: np.ndarray) -> str:
    """A short digest of one drawn slice (a 2D bool mask): which prompt a correction was made with."""
    import hashlib

    mask = np.asarray(mask, dtype=bool)
    return hashlib.sha256(str(mask.shape).encode() + np.packbits(mask).tobytes()).hexdigest()[:16]


def _earlier_from_result(result: "PropagationResult", axis: int) -> dict:
    """``earlier`` from a result: the keyframes (drawn, non-empty) and walls (empty) it ran with,
    every round's until it, on ``axis`` (InputError for a result along another axis)."""
    if result.axis != axis:
        raise InputError(f"the earlier result was propagated along axis {result.axis}, the prompt is drawn across axis "
                         f"{axis}: give axis={result.axis} (or its mask with earlier=...)")
    return {str(lab): {"keyframes": sorted(int(k) for k, m in keys.items() if np.any(m)),
                       "walls": sorted(int(k) for k, m in keys.items() if not np.any(m))}
            for lab, keys in result.keyframes.items()}


def _begin_keyframe(prompt_mask: np.ndarray, keyframes: Sequence[int], rule: str) -> int:
    """The drawn slice a predictor begins from (``begin``: PAM's intensity window, the drift test's
    first statistics): "lowest", the first along the axis; "largest", the one of most drawn voxels;
    "lowest-sizable", the first holding at least a quarter of the largest one's voxels."""
    if rule not in ("lowest", "largest", "lowest-sizable"):
        raise InputError(f"begin_keyframe must be lowest, largest or lowest-sizable, got {shown(rule)}")
    if rule == "lowest" or len(keyframes) == 1:
        return keyframes[0]
    areas = {kf: int(np.count_nonzero(prompt_mask[kf])) for kf in keyframes}
    if rule == "largest":
        return max(keyframes, key=lambda kf: (areas[kf], -kf))
    return next(kf for kf in keyframes if 4 * areas[kf] >= max(areas.values()))


def keyframes_from_edits(prompt: np.ndarray, previous, edited: np.ndarray, *,
                         axis: int | None = None, labels: Sequence[int] | None = None,
                         earlier: dict | None = None) -> EditPlan:
    """The correction loop from files: ``previous`` is an earlier result of ``prompt`` and
    ``edited`` that result corrected by hand (all three label maps on the image's grid). ``previous``
    may be the ``PropagationResult`` itself: then, unless ``earlier`` is given, the keyframes and
    walls it ran with (those of every earlier round) are kept too, as ``earlier`` would. Each
    label's keyframes become its drawn slices, the keyframes of earlier rounds (``earlier``: what
    ``EditPlan.record()`` of the round that wrote ``previous`` gave, {"label": {"keyframes": [...],
    "walls": [...]}}; labels as text or numbers), and the slices along the axis where ``edited`` differs from ``previous`` for
    it, with ``edited``'s masks there; an edited slice where the label is now absent is a wall
    ("the object is absent here"), and so are earlier walls not drawn on since. Propagating the
    plan's prompt with its walls (``update=True``) gives what Slicer's *Update from my edits*
    gives, recomputing every slice. Raises InputError when ``previous`` is not a result of
    ``prompt``, nothing was edited, or the edits are no keyframes PAM can take."""
    result = previous if isinstance(previous, PropagationResult) else None
    prompt, previous, edited = (np.asarray(a) for a in (prompt, previous.mask if result else previous, edited))
    for name, arr in (("the earlier result", previous), ("the edited result", edited)):
        if arr.shape != prompt.shape:
            raise InputError(f"{name} has shape {arr.shape}, the prompt {prompt.shape}: both must be on the "
                             "image's grid")
    ax, drawn = find_prompt_slices(prompt, axis=axis, labels=labels)
    prm, prev, edit = (np.moveaxis(a, ax, 0) for a in (prompt, previous, edited))
    # Every voxel of a label that appears or vanishes differs, so the voxels that differ (and the
    # slices holding them) are all the whole volume is read for.
    differ = prev != edit
    differ_slices = np.flatnonzero(differ.any(axis=(1, 2)))
    was, now = ({int(v) for v in np.unique(a[differ])} - {0} for a in (prev, edit))
    lost = sorted(lab for lab in set(drawn) & was if not (edit == lab).any())
    if len(now) > 16:  # an image as the edited result has thousands of values: sort the earlier result once
        prev_values = {int(v) for v in np.unique(prev)}
        new = sorted(now - prev_values)
    else:  # a few labels (every update): a look per value, not a sort of the whole volume
        new = sorted(v for v in now if not (prev == v).any())
    if len(new) > 16 or (new and new[0] < 0):  # an image, not labels
        shown = ", ".join(map(str, new[:3])) + (", ..." if len(new) > 3 else "")
        raise InputError(f"the edited result holds {len(new)} values the earlier result does not ({shown}): it looks "
                         "like an image, not a corrected copy of the earlier result; give the copy of the result you "
                         "corrected")
    if lost and new:
        raise InputError(f"the edited result holds label {new[0]} where the earlier one holds {lost[0]}: save your "
                         "corrections with the result's label values")
    for lab in lost:  # a label gone whose voxels now hold another one: labels merged (saved as result > 0?)
        taken = edit[prev == lab]
        values, counts = np.unique(taken[taken != 0], return_counts=True)
        if values.size and counts.max() >= 0.5 * taken.size:
            raise InputError(f"the edited result holds no label {lab}: its voxels now hold label "
                             f"{int(values[np.argmax(counts)])} (labels merged, as when saved as result > 0?): save "
                             "your corrections with the result's label values")
    from_result = earlier is None and result is not None  # a result knows its keyframes, not which were corrections
    if from_result:
        earlier = _earlier_from_result(result, ax)
    earlier = _earlier_record(earlier)
    out = np.zeros(prm.shape, dtype=prompt.dtype if np.issubdtype(prompt.dtype, np.integer) else np.int32)
    walls, changed_all, earlier_keys, erased, corrected, digests, holes = {}, {}, {}, [], {}, {}, {}
    n = prm.shape[0]
    prev_boxes = _LabelBoxes(prev, drawn)
    absent = [lab for lab in drawn if not prev_boxes.holds(lab)]
    if absent and len(absent) < len(drawn):  # a result of some of the prompt's labels: a --label run
        present = [lab for lab in drawn if lab not in absent]
        raise InputError(f"the earlier result holds no label {absent[0]} of the prompt, only label"
                         f"{'s' if len(present) > 1 else ''} {', '.join(map(str, present))}: if it was made with "
                         f"--label (labels=), give the same labels again (--label {' '.join(map(str, present))}; a "
                         f"manifest's label column {' '.join(map(str, present))}; labels={present} in Python)")
    for lab, slices in drawn.items():
        before = earlier.get(str(lab), {})
        earlier_keys[lab] = [s for s in before.get("keyframes", []) if 0 <= s < n]
        old_walls = {s for s in before.get("walls", []) if 0 <= s < n}
        for s in slices:
            # A drawn slice may have been corrected in an earlier round (a review, s29: every round
            # after that was refused): then the earlier result holds the correction, and the record of
            # that round says so ("corrected"). Any other difference: the prompt is not that run's.
            drawing = prm[s] == lab
            digests.setdefault(lab, {})[int(s)] = _drawing_digest(drawing)
            if np.array_equal(prev[s] == lab, drawing):
                continue
            if s in before.get("corrected", ()):
                was_drawn = before.get("drawn_sha256", {}).get(int(s))
                if was_drawn is not None and was_drawn != digests[lab][int(s)]:
                    raise InputError(f"label {lab}'s drawing on slice {s} (axis {ax}) is not the one the earlier "
                                     "rounds were run with (they corrected that slice): give the prompt of those "
                                     "rounds, or start again from this prompt without --previous")
                corrected.setdefault(lab, []).append(int(s))
            else:
                hint = (" (if you corrected this drawn slice in an earlier round, pass that round's plan.record() "
                        "as earlier=)" if from_result else "")
                raise InputError(f"the earlier result is not a result of this prompt: on slice {s} (axis {ax}) "
                                 f"label {lab} differs from the drawing; give the output of the run from this "
                                 f"prompt as the earlier result{hint}")
        changed = [int(s) for s in differ_slices if ((prev[s] == lab) != (edit[s] == lab)).any()]
        changed_all[lab] = changed
        keys = sorted(set(slices) | set(earlier_keys[lab]) | set(changed) | old_walls)
        walls[lab] = [s for s in keys if not (edit[s] == lab).any()]
        filled = [s for s in keys if s not in walls[lab]]
        if too_many_keyframes(len(filled), n):
            edits = f", {changed[0]}-{changed[-1]}" if changed else ""
            held = np.count_nonzero(((prev == lab) | (edit == lab)).any(axis=(1, 2)))
            # edits on most of the label's slices: more often a correction of another round's result (a
            # new user's trial, session 35, corrected round 2's and gave round 1's) than so many edits
            other = ("; or is the earlier result not the one that was corrected? If the corrections were made on a "
                     "copy of a later round's result, give that result as the earlier one (--previous)"
                     if len(changed) >= max(0.5 * held, 2) else "")
            raise InputError(f"label {lab} would have {len(filled)} keyframes out of {n} slices along axis {ax} (its "
                             f"drawn and earlier slices and {len(changed)} edited ones{edits}): PAM takes at most "
                             f"{keyframe_limit(n)}; correct slices across axis {ax} only, fewer of them, or draw a "
                             f"new prompt{other}")
        erased_now = [s for s in changed if s in walls[lab]]  # slices that held the label and are empty now
        for s in erased_now if new else ():
            # a correction painted with another value (a trial, session 45: a slice set to label 2 in a label-1
            # result became a wall, the slices beyond it emptied too, exit 0; a whole file of 2 is refused above)
            taken = edit[s][prev[s] == lab]
            values, counts = np.unique(taken[np.isin(taken, new)], return_counts=True)
            if values.size and counts.max() >= 0.5 * taken.size:
                painted = int(values[np.argmax(counts)])
                raise InputError(f"on slice {s} (axis {ax}) the edited result holds label {painted} where the earlier "
                                 f"result holds label {lab}, and no label {lab}: save your "
                                 f"corrections with the result's label values (label {lab} there); a new structure "
                                 "is drawn in the prompt, not in the edited result")
        drawn_erased = [s for s in slices if s in erased_now]
        held_rows = np.flatnonzero(prev_boxes.rows(lab))
        held = int(held_rows.size)
        drawn_set, earlier_set = set(slices), set(earlier_keys[lab])
        predicted = [int(s) for s in held_rows if s not in drawn_set and s not in earlier_set]
        kept = [s for s in predicted if s not in changed]  # as the earlier result had them
        if (filled and not drawn_erased and not kept and predicted and set(filled) <= drawn_set | earlier_set
                and len(erased_now) > max(0.5 * held, 2)):
            # the prompt itself (or the drawn slices alone) as the edited result (a trial, session 45: every
            # predicted slice became a wall, a one-slice result, exit 0)
            raise InputError(f"the edited result holds label {lab} on its drawn slice{'s' if len(filled) > 1 else ''} "
                             f"{runs_text(filled)} only and erases it on the {len(erased_now)} other slices the "
                             f"earlier result holds it on ({runs_text(erased_now)}): is it the prompt? Give the "
                             "corrected copy of the earlier result (your fixes in a copy of the whole result) as the "
                             "edited one (if every predicted slice was wrong, the drawing alone is the result)")
        if filled and drawn_erased and len(erased_now) > max(0.5 * held, 2):
            # an edited file of the fixed slices alone (a helper's trial, session 42: the liver drawn on slice
            # 15, an edited file of slice 20 only: a one-slice result, exit 0)
            raise InputError(f"the edited result holds label {lab} on {len(filled)} of its keyframe slices but not on "
                             f"its drawn slice {drawn_erased[0]}, and not on {len(erased_now)} of the {held} slices "
                             "the earlier result holds it on: give the whole corrected result as the edited one (a "
                             "copy of the earlier result with your fixes), not only the slices you fixed; to start "
                             "again, draw a new prompt and propagate it without the earlier result")
        fixed = [s for s in filled if s in changed and s not in drawn_set]
        # (erased between the filled slices: a file of fixes alone; erased ends are what every leak fix does,
        # with every other slice trimmed too on a small object (a third review: such a file was refused))
        inside = [s for s in erased_now if filled and filled[0] < s < filled[-1]]
        if len(predicted) >= 6 and not kept and fixed and len(erased_now) >= 2 and (
                inside or len(erased_now) > max(0.5 * held, 2)):  # (erased ends alone: the drawn slice's side)
            # the same misreading with the drawn slice kept, or with half the slices fixed (a re-review, session 42:
            # a "keyframes file" of slices 10, 15 and 20 gave a three-slice result, exit 0)
            raise InputError(f"the edited result keeps none of the {len(predicted)} slices the earlier result "
                             f"predicted label {lab} on as they were: it holds the label on slices "
                             f"{runs_text(filled)} only and erases it on the {len(erased_now)} others "
                             f"({runs_text(erased_now)}). If it holds only the slices you fixed, give the whole "
                             "corrected result as the edited one (a copy of the earlier result with your fixes); if "
                             "you redid every slice, propagate a new prompt without the earlier result")
        if filled:  # slices erased between two keyframes: a gap in the object, said (see EditPlan.notes)
            gaps: dict[tuple[int, int], list[int]] = {}
            for s in inside:
                gaps.setdefault((max(k for k in filled if k < s), min(k for k in filled if k > s)), []).append(s)
            if gaps:
                holes[lab] = [(inner, before, after) for (before, after), inner in sorted(gaps.items())]
        for s in filled:
            out[s][edit[s] == lab] = lab
        if not filled:
            erased.append(lab)
    if not any(changed_all.values()):
        others = sorted((was | now) - set(drawn))  # (a new label drawn in the edit alone was not named)
        in_prompt = [lab for lab in others if (prm == lab).any()]  # (left out with --label, not absent)
        absent = [lab for lab in others if lab not in in_prompt]
        also = "".join(
            f" (label{'s' if len(group) > 1 else ''} {', '.join(map(str, group))} changed, but "
            f"{'are' if len(group) > 1 else 'is'} {why})"
            for group, why in ((absent, "not in the prompt: draw " + ("them" if len(absent) > 1 else "it")
                                + " in the prompt to propagate"),
                               (in_prompt, "left out of the labels to propagate (--label, a manifest's label "
                                "column, labels=): add " + ("them" if len(in_prompt) > 1 else "it") + " there"))
            if group)
        raise InputError("the edited result equals the earlier one on every slice of label"
                         f"{'s' if len(drawn) > 1 else ''} {', '.join(map(str, drawn))}: nothing to update{also}; "
                         "correct the slices that are wrong first")
    if erased:
        raise InputError(f"label {erased[0]} is erased on every slice it was drawn or edited on, so there is nothing "
                         "to propagate it from: draw it on a slice, or leave it out with --label")
    ignored = sorted((was | now) - set(drawn))
    return EditPlan(prompt=np.moveaxis(out, 0, ax), empty_slices=walls, axis=ax,
                    drawn={lab: list(sl) for lab, sl in drawn.items()}, edited=changed_all, ignored=ignored,
                    earlier=earlier_keys, previous=np.moveaxis(prev, 0, ax), corrected=corrected,
                    drawn_digest=digests, holes=holes)


def check_request(prompt, axis, labels, range, empty_slices, update: bool):  # noqa: A002
    """The checks of a propagation's prompt and options that need the prompt (``propagate`` runs
    them; a server runs them on an upload before queueing it): -> (axis, {label: drawn slices},
    (first, last) slice of the range, {label: set of empty slices}). ``axis``, ``labels`` and
    ``range`` as ``_validate_options`` returns them. Raises InputError."""
    ax, slices = find_prompt_slices(prompt, axis=axis, labels=labels, update=update)
    n = prompt.shape[ax]
    lo, hi = (0, n - 1) if range is None else (int(range[0]), int(range[1]))
    if lo > hi:
        raise InputError(f"range {shown(lo)}:{shown(hi)} is reversed; give the first slice first (e.g. "
                             f"{shown(hi)}:{shown(lo)})")
    if not (0 <= lo <= hi < n):
        raise InputError(f"range {shown(lo)}:{shown(hi)} is outside the {n} slices along axis {ax} "
                             f"(valid 0:{n - 1})")
    for lab, sl in slices.items():
        outside = [s for s in sl if not lo <= s <= hi]
        if outside:
            others = (f", or leave label {lab} out (the command line's --label names the labels to propagate)"
                      if len(slices) > 1 else "")
            raise InputError(f"label {lab}'s prompt slice {outside[0]} lies outside the range {lo}:{hi}; widen the "
                             f"range to include it{others}")
    return ax, slices, (lo, hi), _empty_slices_per_label(empty_slices, slices, lo, hi, ax)


def _empty_slices_per_label(empty_slices, slices: dict, lo: int, hi: int, axis: int) -> dict[int, set[int]]:
    """Validate ``empty_slices`` (a sequence for all labels or {label: sequence}) -> {label: set}."""
    if empty_slices is None:
        return {lab: set() for lab in slices}
    if isinstance(empty_slices, dict):
        given = {_whole(lab, "an empty_slices label"): seq for lab, seq in empty_slices.items()}
        unknown = [lab for lab in given if lab not in slices]
        if unknown:
            raise InputError(f"empty slices given for label {shown(unknown[0])}, which is not among the labels "
                             f"propagated ({', '.join(map(str, slices))})")
        per = {lab: given.get(lab, ()) for lab in slices}
    else:
        per = {lab: empty_slices for lab in slices}
    out = {}
    for lab, seq in per.items():
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise InputError(f"empty slices must be a list of slice numbers, got {shown(seq)}")
        idx = {_whole(v, "an empty slice") for v in seq}
        bad = sorted(v for v in idx if not lo <= v <= hi)
        if bad:
            raise InputError(f"empty slice {shown(bad[0])} lies outside the range {lo}:{hi} along axis {axis}")
        both = sorted(idx & set(slices[lab]))
        if both:
            others = [other for other in slices if other != lab and both[0] not in slices[other]]
            hint = (f" (to mark it empty for other labels only, propagate them on their own: --label "
                    f"{' '.join(map(str, others))} --empty-slices {both[0]}, or mark it for each of them: "
                    f"{' '.join(f'--empty-slices {o}:{both[0]}' for o in others)}; empty_slices={{label: [...]}} "
                    "in Python)"
                    if others and not isinstance(empty_slices, dict) else "")
            raise InputError(f"slice {both[0]} is both drawn (label {lab}) and marked empty; erase it or unmark it"
                             + hint)
        out[lab] = idx
    return out


def _as_predictor(model, device: str) -> SlicePredictor:
    if isinstance(model, SlicePredictor):
        return model
    if device is not None and not isinstance(device, str):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    from .checkpoints import PAMModel, load_model

    if model is None:
        model = load_model(None, device=device)
    if isinstance(model, PAMModel):
        from .checkpoints import device_name

        asked = device_name(device)  # as load_model reads it (and refuses an unknown name as it does)
        if asked != "cpu" and asked != model.device:  # asked for, but it would not be used
            raise InputError(f"device {device!r} was asked for, but the model given is on {model.device!r}: load it "
                             f"with load_model(..., device={device!r}), or drop device=")
        from .pam_predictor import PAMPredictor

        return PAMPredictor(model)
    hint = (" (for a checkpoint file pass PAMSegmentLib.checkpoints.load_model(path); for a method such as 'track', "
            "PAMSegmentLib.baselines.get_predictor('track'))" if isinstance(model, (str, os.PathLike)) else "")
    raise InputError(f"model must be a PAMModel, a SlicePredictor, a remote.RemoteModel or None, got "
                     f"{type(model).__name__}{hint}")


def __getattr__(name: str):
    # PAMPredictor lives in pam_predictor.py so that importing the engine does not import torch.
    if name == "PAMPredictor":
        from .pam_predictor import PAMPredictor

        return PAMPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
