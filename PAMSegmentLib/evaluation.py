"""Evaluation helpers for ``scripts/evaluate.py``: the protocol's pieces, testable on their own.

Protocol (issues 3 and 6): every evaluation structure of ``scripts/split.json`` is propagated
along array axis 0 from the reference mask drawn on one slice (at 30/50/70 % of the structure's
extent), or on two keyframes (25 % and 75 %), or in a simulated correction session; the result
is scored against the reference in 3D (Dice, normalized surface Dice at 2 mm, HD95).

Nothing here needs pandas: results are lists of flat dicts (one per case/structure/method/
protocol/position/round), written with the csv module and aggregated by ``aggregate``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import shown
from .errors import InputError

__all__ = [
    "EvalStructure", "EvalCase", "load_split", "load_case", "along_axis", "validation_items", "validation_prompt_slices",
    "extent", "slice_at", "prompt_from_reference", "PROMPT_VARIANTS", "parse_prompt_variants", "perturb_prompt",
    "slice_dice", "worst_slices", "confidence_hit", "contour_interpolation", "correction_slice",
    "simulate_corrections", "aggregate", "mean", "paired_difference", "write_csv", "read_csv", "summary_markdown",
    "CSV_FIELDS",
]


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class EvalStructure:
    case: str
    group: str
    modality: str
    label: int
    name: str


@dataclass
class EvalCase:
    case_id: str
    image: np.ndarray  # float32 (k, j, i)
    labels: np.ndarray  # integer (k, j, i)
    spacing: tuple[float, float, float]  # mm, (k, j, i)
    label_names: dict[int, str]
    modality: str = ""


def load_split(path: str | os.PathLike, groups: Sequence[str] | None = None,
               cases: Sequence[str] | None = None) -> list[EvalStructure]:
    """The evaluation structures of a split file (``{"eval": [{"case", "group", "modality",
    "structures": [{"id", "name"}, ...]}, ...]}``), optionally filtered by group (exact name or
    case-insensitive substring) and case id."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"split file {path} does not exist; run scripts/prepare_data.py first")
    data = json.loads(path.read_text(encoding="utf-8"))
    if "eval" not in data:
        raise InputError(f"split file {path} has no 'eval' list")
    def selects(name: str, group: str) -> bool:  # an exact name or a case-insensitive substring
        return name.lower() in group.lower()

    # A name that selects nothing is a typo, not an empty selection: say what there is.
    all_cases = [str(e["case"]) for e in data["eval"]]
    all_groups = sorted({str(e.get("group", e["case"])) for e in data["eval"]})
    unknown = [c for c in (cases or ()) if c not in all_cases]
    if unknown:
        raise InputError(f"no evaluation case {unknown[0]!r} in {path}; evaluation cases: {', '.join(all_cases)}")
    unknown = [g for g in (groups or ()) if not any(selects(g, a) for a in all_groups)]
    if unknown:
        raise InputError(f"no evaluation group matches {unknown[0]!r} in {path}; groups: {', '.join(all_groups)}")
    out = []
    for entry in data["eval"]:
        group = str(entry.get("group", entry["case"]))
        if groups and not any(selects(g, group) for g in groups):
            continue
        if cases and entry["case"] not in cases:
            continue
        for s in entry["structures"]:
            out.append(EvalStructure(str(entry["case"]), group, str(entry.get("modality", "")), int(s["id"]),
                                     str(s.get("name", s["id"]))))
    return out


def load_case(cache_dir: str | os.PathLike, case_id: str) -> EvalCase:
    """``<cache>/cases/<case_id>.npz`` (image float32, labels int, spacing, label_names JSON)."""
    path = Path(cache_dir) / "cases" / f"{case_id}.npz"
    if not path.exists():
        raise InputError(f"case file {path} does not exist; run scripts/prepare_data.py (cache {cache_dir})")
    with np.load(path, allow_pickle=False) as z:
        image = z["image"].astype(np.float32, copy=False)
        labels = z["labels"]
        spacing = tuple(float(s) for s in z["spacing"])
        names = json.loads(str(z["label_names"])) if "label_names" in z.files else {}
        modality = str(z["modality"]) if "modality" in z.files else ""
    return EvalCase(case_id, image, labels, spacing, {int(k): str(v) for k, v in names.items()}, modality)


def along_axis(case: EvalCase, axis: int) -> EvalCase:
    """``case`` with array axis ``axis`` moved first (spacing permuted alike), as the engine does
    for a prompt drawn on that axis's slices (``np.moveaxis``): evaluating the transposed case
    along axis 0 is propagating the original along ``axis``."""
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {shown(axis)}")
    if axis == 0:
        return case
    order = [axis] + [a for a in range(3) if a != axis]
    return EvalCase(case.case_id, np.moveaxis(case.image, axis, 0), np.moveaxis(case.labels, axis, 0),
                    tuple(case.spacing[a] for a in order), case.label_names, case.modality)


def validation_items(cache_dir: str | os.PathLike, split_path: str | os.PathLike, case_names: Sequence[str],
                     n: int, seed: int = 0) -> tuple[dict[str, EvalCase], list[tuple[str, int]]]:
    """The structures ``scripts/validate.py`` (and ``scripts/stop_signals.py``) choose inference
    options on: training labels of ``case_names`` in the split with >= 500 voxels over >= 5
    slices along axis 0, ``n`` of them drawn with ``seed``. Returns (cases by id, [(case, label)]).
    Only training cases are accepted: evaluation structures are never used to choose."""
    split = json.loads(Path(split_path).read_text(encoding="utf-8"))
    train = {e["case"]: e["labels"] for e in split["train"]}
    unknown = [c for c in case_names if c not in train]
    if unknown:
        raise InputError(f"{', '.join(unknown)} not training cases in {Path(split_path).name}; "
                         "validation uses training cases only")
    cases = {cid: load_case(cache_dir, cid) for cid in case_names}
    items = []
    for cid in case_names:
        for lab in train[cid]:
            ref = cases[cid].labels == lab
            if ref.sum() >= 500 and ref.any(axis=(1, 2)).sum() >= 5:
                items.append((cid, int(lab)))
    pick = np.random.default_rng(seed).choice(len(items), size=min(n, len(items)), replace=False)
    return cases, [items[i] for i in sorted(pick)]


def validation_prompt_slices(ref: np.ndarray, keyframes: bool = False) -> list[int]:
    """Where validation draws the reference along axis 0: the middle of the extent, or with
    ``keyframes`` the evaluation's two keyframes at 25 % and 75 %."""
    if keyframes:
        return sorted({slice_at(ref, 0.25), slice_at(ref, 0.75)})
    occupied = np.flatnonzero(np.asarray(ref).any(axis=(1, 2)))
    return [int((occupied[0] + occupied[-1]) // 2)]


# ---------------------------------------------------------------------------------------------
# prompt placement


def extent(mask: np.ndarray, axis: int = 0) -> tuple[int, int] | None:
    """(first, last) slice index along ``axis`` holding the mask, both included; None if empty."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    occ = np.flatnonzero(np.asarray(mask).any(axis=other))
    if occ.size == 0:
        return None
    return int(occ[0]), int(occ[-1])


def slice_at(mask: np.ndarray, position: float, axis: int = 0) -> int:
    """The slice at ``position`` (0 = first, 1 = last) of the mask's extent along ``axis``:
    first + round_half_up(position * (last - first)). If that slice happens to be empty (a
    structure with a gap), the nearest slice with the mask is used (the lower one on a tie)."""
    if not 0.0 <= position <= 1.0:
        raise InputError(f"prompt position must be in [0, 1], got {position}")
    ext = extent(mask, axis)
    if ext is None:
        raise InputError("the reference mask is empty")
    first, last = ext
    idx = first + int(math.floor(position * (last - first) + 0.5))
    other = tuple(a for a in range(mask.ndim) if a != axis)
    occ = np.flatnonzero(np.asarray(mask).any(axis=other))
    if idx in occ:
        return idx
    return int(occ[np.argmin(np.abs(occ - idx) * 2 + (occ > idx))])


def prompt_from_reference(ref: np.ndarray, slices: Iterable[int], label: int = 1, axis: int = 0) -> np.ndarray:
    """A uint8 label map holding the reference mask on the given slices only."""
    ref = np.asarray(ref, dtype=bool)
    out = np.zeros(ref.shape, dtype=np.uint8)
    for s in slices:
        idx = [slice(None)] * ref.ndim
        idx[axis] = int(s)
        out[tuple(idx)][ref[tuple(idx)]] = label
    return out


PROMPT_VARIANTS = ("erode", "dilate", "rough")


def parse_prompt_variants(text: str) -> list[tuple[str, float]]:
    """``"erode:2,dilate:2,rough:2"`` -> [("erode", 2.0), ...]; amounts in mm, > 0."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        kind, _, amount = part.partition(":")
        kind = kind.strip().lower()
        try:
            mm = float(amount)
        except ValueError:
            mm = float("nan")
        if kind not in PROMPT_VARIANTS or not (math.isfinite(mm) and mm > 0):
            raise InputError(f"prompt variant {part!r}: write KIND:MM with KIND one of {', '.join(PROMPT_VARIANTS)} "
                             f"and MM > 0, e.g. erode:2")
        if (kind, mm) not in out:
            out.append((kind, mm))
    return out


def _signed_distance(m: np.ndarray, sp: tuple[float, float]) -> np.ndarray:
    """mm from each pixel centre to the drawn boundary (> 0 inside), the boundary lying on the
    pixels' edges, half a pixel beyond the outermost centres. Square pixels: from the distance
    transform, less half a pixel. Anisotropic pixels, where that half pixel differs by direction:
    on a grid supersampled to about a third of the finer spacing (odd factors, so that each
    pixel's centre is a sub-pixel), read at the centres."""
    from scipy import ndimage

    if max(sp) <= 1.01 * min(sp):
        half = 0.5 * min(sp)
        return np.where(m, ndimage.distance_transform_edt(m, sampling=sp) - half,
                        half - ndimage.distance_transform_edt(~m, sampling=sp))
    factors = [int(round(3 * s / min(sp))) | 1 for s in sp]  # odd
    fine = np.repeat(np.repeat(m, factors[0], axis=0), factors[1], axis=1)
    fsp = tuple(s / f for s, f in zip(sp, factors))
    half = 0.5 * min(fsp)
    signed = np.where(fine, ndimage.distance_transform_edt(fine, sampling=fsp) - half,
                      half - ndimage.distance_transform_edt(~fine, sampling=fsp))
    return signed[factors[0] // 2::factors[0], factors[1] // 2::factors[1]]


def perturb_prompt(mask: np.ndarray, spacing: Sequence[float], kind: str, mm: float, seed: int = 0,
                   correlation_mm: float = 4.0) -> np.ndarray:
    """A drawn 2D mask as a user might have drawn it instead of the reference.

    ``erode`` / ``dilate``: the boundary moved ``mm`` inwards / outwards everywhere: a pixel goes
    (or comes) when its centre lies within ``mm`` of the drawn boundary, which runs along the
    pixels' edges (``_signed_distance``), so moves are whole pixels: on 3 mm pixels 1 mm moves
    nothing and 2 mm one pixel (3 mm). ``rough``: the boundary moved by a smooth
    random field (Gaussian noise smoothed over ``correlation_mm``, rescaled to a standard deviation
    of ``mm``), in and out along the contour, as a hurried freehand outline; seeded. Every piece of
    the drawing stays drawn: one that an erosion (or the noise) removes keeps its deepest pixels."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise InputError("perturb_prompt needs a non-empty 2D mask")
    sp = tuple(float(v) for v in spacing)
    signed = _signed_distance(m, sp)
    if kind == "erode":
        out = signed > mm
    elif kind == "dilate":
        out = signed >= -mm
    elif kind == "rough":
        rng = np.random.default_rng(seed)
        field = ndimage.gaussian_filter(rng.standard_normal(m.shape), [correlation_mm / s for s in sp])
        sd = float(field.std())
        field = field / sd * mm if sd > 0 else np.zeros_like(field)
        out = signed + field > 0
        # islands the noise adds away from the drawing are not part of an outline: drop them
        lab, n = ndimage.label(out)
        if n > 1:
            overlap = ndimage.sum(m, lab, index=np.arange(1, n + 1))
            out = np.isin(lab, np.flatnonzero(overlap > 0) + 1)
    else:
        raise InputError(f"unknown prompt variant {kind!r}; choose from {', '.join(PROMPT_VARIANTS)}")
    # every drawn piece stays drawn: one thinner than the change keeps its deepest pixels
    parts, n = ndimage.label(m)
    missing = sorted(set(range(1, n + 1)) - set(np.unique(parts[out]).tolist()))
    if missing:
        inside = ndimage.distance_transform_edt(m, sampling=sp)
        for k in missing:
            depth = np.where(parts == k, inside, 0.0)
            out |= depth >= depth.max() - 1e-6
    return out


# ---------------------------------------------------------------------------------------------
# per-slice scores, confidence ranking, corrections


def slice_dice(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """2D Dice per slice along axis 0; NaN where both slices are empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    inter = (pred & ref).reshape(len(pred), -1).sum(axis=1).astype(np.float64)
    tot = pred.reshape(len(pred), -1).sum(axis=1) + ref.reshape(len(ref), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, 2.0 * inter / np.maximum(tot, 1), np.nan)


def worst_slices(pred: np.ndarray, ref: np.ndarray, k: int = 3, exclude: Iterable[int] = ()) -> list[int]:
    """The ``k`` slices with the lowest 2D Dice among slices where pred or ref has voxels,
    excluding ``exclude``; ties broken by the larger number of wrong voxels, then index."""
    d = slice_dice(pred, ref)
    wrong = (np.asarray(pred, bool) ^ np.asarray(ref, bool)).reshape(len(d), -1).sum(axis=1)
    ex = set(int(e) for e in exclude)
    cand = [s for s in range(len(d)) if np.isfinite(d[s]) and s not in ex]
    cand.sort(key=lambda s: (d[s], -wrong[s], s))
    return cand[:k]


def confidence_hit(confidence: np.ndarray, pred: np.ndarray, ref: np.ndarray, exclude: Iterable[int] = (),
                   k: int = 3) -> tuple[bool, float] | None:
    """Is the least confident slice with a predicted mask among the ``k`` worst slices by 2D Dice?

    Candidates for review are the slices the result has the object on (what a user would scroll
    through), excluding the drawn slices; the worst slices are ranked over slices where the
    prediction or the reference has voxels (so a slice the result missed entirely counts as
    bad, with Dice 0). Ties in Dice are counted as hits when the reviewed slice's Dice is no
    higher than the k-th worst. Returns (hit, chance) where chance is the hit rate of picking a
    candidate at random; None when there is no candidate."""
    conf = np.asarray(confidence, dtype=np.float64)
    pred = np.asarray(pred, bool)
    ex = set(int(e) for e in exclude)
    has = pred.reshape(len(pred), -1).any(axis=1)
    cand = [s for s in range(len(conf)) if has[s] and np.isfinite(conf[s]) and s not in ex]
    if not cand:
        return None
    worst = worst_slices(pred, ref, k=k, exclude=ex)
    if not worst:
        return None
    d = slice_dice(pred, ref)
    kth = d[worst[-1]]
    lowest = min(cand, key=lambda s: (conf[s], s))
    hit = bool(d[lowest] <= kth)
    chance = float(np.mean([d[s] <= kth for s in cand]))
    return hit, chance


def correction_slice(pred: np.ndarray, ref: np.ndarray, drawn: Iterable[int]) -> int | None:
    """Where a simulated user corrects next: the slice inside the reference's extent (along axis
    0) with the lowest 2D Dice, not already drawn; ties go to the slice with more wrong voxels.
    Slices outside the extent cannot become keyframes (an empty keyframe is not a prompt), so
    overshoot is corrected indirectly by keyframes near the ends. None if every slice is drawn
    or already perfect."""
    ext = extent(ref)
    if ext is None:
        return None
    d = slice_dice(pred, ref)
    wrong = (np.asarray(pred, bool) ^ np.asarray(ref, bool)).reshape(len(d), -1).sum(axis=1)
    dr = set(int(s) for s in drawn)
    cand = [s for s in range(ext[0], ext[1] + 1) if s not in dr and ref[s].any() and wrong[s] > 0]
    if not cand:
        return None
    return min(cand, key=lambda s: (d[s], -wrong[s], s))


def simulate_corrections(run: Callable[[list[int]], np.ndarray], ref: np.ndarray, start: Sequence[int],
                         rounds: int, score: Callable[[np.ndarray], dict],
                         companions: dict[str, Callable[[list[int]], np.ndarray]] | None = None) -> list[dict]:
    """A simulated correction session.

    ``run(drawn_slices) -> bool mask`` produces the result from the reference drawn on those
    slices (the method re-run with them as keyframes); after each round the worst slice of that
    result (``correction_slice``) is redrawn from the reference and the method re-run.
    ``companions`` (e.g. contour interpolation) are run on the same drawn slices each round, so
    they are compared at equal user effort. Returns one dict per round 0..rounds: round, drawn
    slices, added slice, the ``score(mask)`` values, whether every drawn voxel came out exactly
    as drawn, and ``companions`` {name: {score values, keyframes_kept}}."""
    drawn = sorted(int(s) for s in start)
    out = []
    added = None

    def kept(mask):
        return all(np.array_equal(mask[s], ref[s]) for s in drawn)

    for r in range(rounds + 1):
        mask = np.asarray(run(list(drawn)), dtype=bool)
        comp = {}
        for name, fn in (companions or {}).items():
            m = np.asarray(fn(list(drawn)), dtype=bool)
            comp[name] = {"keyframes_kept": kept(m), **score(m)}
        out.append({"round": r, "drawn": list(drawn), "added": added, "keyframes_kept": kept(mask), **score(mask),
                    "companions": comp})
        if r == rounds:
            break
        added = correction_slice(mask, ref, drawn)
        if added is None:  # nothing left to fix: later rounds repeat the same result
            for r2 in range(r + 1, rounds + 1):
                out.append({**out[-1], "round": r2, "added": None})
            break
        drawn = sorted(drawn + [added])
    return out


# ---------------------------------------------------------------------------------------------
# contour interpolation (Slicer's "Fill between slices")


def contour_interpolation(drawn: np.ndarray, axis: int = 0) -> np.ndarray:
    """ITK's morphological contour interpolation of a mask drawn on some slices along ``axis``
    (array order), as Slicer's "Fill between slices" does: ITK defaults (distance-transform
    interpolation, heuristic alignment), restricted to the drawing axis. Needs the
    ``itk-morphologicalcontourinterpolation`` package. Returns a bool mask; slices outside
    the outermost drawn slices stay empty; the drawn slices are returned exactly as drawn.
    ITK runs it on one thread: on two, the filter (2.1.2, itk 5.4.7) corrupted the process's heap
    over an evaluation's correction rounds ("corrupted double-linked list" at exit, exit 134;
    session 45), with the same results on one."""
    drawn = np.asarray(drawn, dtype=bool)
    if drawn.ndim != 3:
        raise InputError("contour interpolation needs a 3D mask")
    if not drawn.any():
        return drawn.copy()
    try:
        import itk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("contour interpolation needs the itk-morphologicalcontourinterpolation package "
                         "(pip install itk-morphologicalcontourinterpolation)") from exc
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    other = tuple(a for a in range(3) if a != axis)
    if int(drawn.any(axis=other).sum()) < 2:
        return drawn.copy()  # one slice: nothing to interpolate
    image = itk.image_from_array(np.ascontiguousarray(drawn.astype(np.uint8)))
    # ITK's axis index counts (x, y, z) = (i, j, k): array axis a is ITK axis 2 - a.
    out = itk.array_from_image(itk.morphological_contour_interpolator(image, axis=2 - axis, label=1)).astype(bool)
    # ITK can add voxels to a drawn slice that lies between two other drawn slices (seen on
    # three adjacent drawn slices); the user's slices are restored as drawn, as for our engine.
    drawn_idx = np.flatnonzero(drawn.any(axis=other))
    index = [slice(None)] * 3
    for s in drawn_idx:
        index[axis] = int(s)
        out[tuple(index)] = drawn[tuple(index)]
    return out


# ---------------------------------------------------------------------------------------------
# results: csv and aggregation

CSV_FIELDS = [
    "case", "group", "modality", "structure_id", "structure", "method", "protocol", "position", "round",
    "prompt_slices", "ref_first", "ref_last", "pred_first", "pred_last", "dice", "nsd", "hd95", "seconds",
    "n_predicted", "conf_hit", "conf_chance", "keyframes_kept", "added_slice", "prompt_variant", "prompt_dice", "error",
]


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    if v is None:
        return ""
    return v


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fields = list(CSV_FIELDS) + sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
    os.replace(tmp, path)
    return path


_NUMERIC = {"structure_id", "position", "round", "ref_first", "ref_last", "pred_first", "pred_last", "dice", "nsd",
            "hd95", "seconds", "n_predicted", "conf_chance", "added_slice", "prompt_dice", "axis", "nsd_tolerance_mm"}


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows back with numbers as floats (empty -> None) and booleans as bools."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if k in _NUMERIC:
                    out[k] = float(v) if v not in ("", None) else None
                elif k in ("conf_hit", "keyframes_kept"):
                    out[k] = None if v in ("", None) else v == "True"
                else:
                    out[k] = v
            rows.append(out)
    return rows


def mean(values: Iterable) -> float:
    """Mean of the finite numbers (bools count as 0/1); NaN if there are none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _match(row: dict, where: dict | None) -> bool:
    if not where:
        return True
    for k, v in where.items():
        rv = row.get(k)
        if isinstance(v, float) or isinstance(rv, float):
            try:
                if rv is None or abs(float(rv) - float(v)) > 1e-9:
                    return False
            except (TypeError, ValueError):
                return False
        elif rv != v:
            return False
    return True


def aggregate(rows: Sequence[dict], by: Sequence[str], value: str, where: dict | None = None,
              stat: Callable[[Iterable], float] = mean) -> "OrderedDict[tuple, tuple[float, int]]":
    """{group key tuple: (stat of ``value``, count)} over rows matching ``where`` (equality per
    field; floats compared with tolerance), keys in first-seen order. Rows whose value is
    missing are not counted."""
    buckets: OrderedDict[tuple, list] = OrderedDict()
    for r in rows:
        if not _match(r, where):
            continue
        v = r.get(value)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        buckets.setdefault(tuple(r.get(k) for k in by), []).append(v)
    return OrderedDict((k, (stat(vs), len(vs))) for k, vs in buckets.items())


def paired_difference(rows: Sequence[dict], method: str, reference: str, where: dict | None = None,
                      value: str = "dice", n_boot: int = 10000, seed: int = 0) -> dict | None:
    """``method`` minus ``reference`` over the structures both have (rows matching ``where``,
    paired by case and structure): mean difference, 95 % percentile bootstrap interval of that mean
    (resampling structures, seeded), and how many structures each is ahead on. None if no pairs.

    The interval says how much the mean could move with another draw of structures like these;
    with a handful of structures it is wide, and an interval that contains 0 means the sign of the
    difference is not settled by this evaluation."""
    by: dict[str, dict] = {method: {}, reference: {}}
    for r in rows:
        m = r.get("method")
        v = r.get(value)
        if m in by and _match(r, where) and v is not None and math.isfinite(float(v)):
            by[m][(r["case"], r["structure"])] = float(v)
    keys = [k for k in by[method] if k in by[reference]]
    if not keys:
        return None
    diff = np.array([by[method][k] - by[reference][k] for k in keys])
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, len(diff), size=(int(n_boot), len(diff)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": len(keys), "mean": float(diff.mean()), "lo": float(lo), "hi": float(hi),
            "ahead": int((diff > 0).sum()), "behind": int((diff < 0).sum())}


# ---------------------------------------------------------------------------------------------
# markdown summary


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _methods_in(rows, protocol):
    seen = []
    for r in rows:
        if r.get("protocol") == protocol and r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _tolerance_label(rows: Sequence[dict]) -> str:
    """The NSD tolerance the rows were scored with: their ``nsd_tolerance_mm`` (rows written before
    it was recorded: 2 mm, the only tolerance those runs used); "mixed" names every value."""
    found = sorted({float(r["nsd_tolerance_mm"]) if r.get("nsd_tolerance_mm") not in (None, "") else 2.0
                    for r in rows} or {2.0})
    if len(found) == 1:
        return f"{found[0]:g} mm"
    return "mixed tolerances: " + " / ".join(f"{v:g}" for v in found) + " mm"


def summary_markdown(rows: Sequence[dict], header: str = "", reference_position: float = 0.5) -> str:
    """The README-ready tables: per group, per structure, prompt position, confidence ranking,
    keyframes and correction rounds (the last two only when those rows exist)."""
    rp = float(reference_position)
    single = [r for r in rows if r.get("protocol") == "single"]
    methods = _methods_in(rows, "single")
    groups = list(OrderedDict.fromkeys(r["group"] for r in single))
    lines = [header.rstrip(), ""] if header else []

    if single:
        lines += [f"### Held-out structures: prompt at {int(round(rp * 100))} % of the extent", "",
                  f"Mean 3D Dice / normalized surface Dice ({_tolerance_label(rows)}) per structure group.", ""]
        head = "| group | n | " + " | ".join(f"{m} Dice | {m} NSD" for m in methods) + " |"
        lines += [head, "|" + "---|" * (2 + 2 * len(methods))]
        dice_g = aggregate(single, ("group", "method"), "dice", {"position": rp})
        nsd_g = aggregate(single, ("group", "method"), "nsd", {"position": rp})
        for g in groups + ["all", "groups"]:
            cells, counts = [], []
            n = 0
            for m in methods:
                if g == "groups":  # every group weighs the same, however many structures it has
                    gm = [dice_g[(x, m)] for x in groups if (x, m) in dice_g]
                    sm = [nsd_g[(x, m)] for x in groups if (x, m) in nsd_g]
                    d = (mean(v for v, _ in gm), len(gm))
                    s = (mean(v for v, _ in sm), len(sm))
                elif g == "all":
                    d = aggregate(single, ("method",), "dice", {"position": rp}).get((m,), (float("nan"), 0))
                    s = aggregate(single, ("method",), "nsd", {"position": rp}).get((m,), (float("nan"), 0))
                else:
                    d = dice_g.get((g, m), (float("nan"), 0))
                    s = nsd_g.get((g, m), (float("nan"), 0))
                n = max(n, d[1])
                cells += [_f(d[0]), _f(s[0])]
                counts.append(d[1])
            # a method that failed on some structures is averaged over fewer: said in its cell (a review:
            # the row showed the largest n beside a mean over two of three)
            for k, count in enumerate(counts):
                if 0 < count < n:
                    cells[2 * k] += f" (n={count})"
            name = {"all": "**all (mean over structures)**", "groups": "**all (mean over groups)**"}.get(g, g)
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        lines.append("")

        # paired differences to the classical tracker
        if "track" in methods and len(methods) > 1:
            others = [m for m in methods if m != "track"]
            lines += ["Dice difference to `track` on the same structures: mean, 95 % bootstrap interval of the "
                      "mean (structures resampled, 10000 draws, seed 0) and structures ahead / behind.", "",
                      "| group | " + " | ".join(f"{m} - track" for m in others) + " |", "|" + "---|" * (1 + len(others))]
            for g in groups + ["all"]:
                w = {"position": rp} if g == "all" else {"position": rp, "group": g}
                cells = []
                for m in others:
                    d = paired_difference(single, m, "track", w)
                    cells.append("-" if d is None else
                                 f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({d['ahead']} / {d['behind']})")
                name = "**all (structures)**" if g == "all" else g
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")

        # cost
        lines += ["Mean seconds and slices predicted per structure (one run, this machine).", "",
                  "| method | seconds | slices predicted | HD95 mm (median) |", "|---|---|---|---|"]
        for m in methods:
            sec = aggregate(single, ("method",), "seconds", {"position": rp, "method": m}).get((m,), (float("nan"), 0))[0]
            npred = aggregate(single, ("method",), "n_predicted", {"position": rp, "method": m}).get((m,), (float("nan"), 0))[0]
            hd = aggregate(single, ("method",), "hd95", {"position": rp, "method": m},
                           stat=lambda v: float(np.median([float(x) for x in v]))).get((m,), (float("nan"), 0))[0]
            lines.append(f"| {m} | {_f(sec, 2)} | {_f(npred, 1)} | {_f(hd, 1)} |")
        lines.append("")

        # per structure
        lines += ["### Per structure (Dice / NSD)", "",
                  "| case | structure | group | " + " | ".join(methods) + " |",
                  "|" + "---|" * (3 + len(methods))]
        per = OrderedDict()
        for r in single:
            if abs(float(r["position"]) - rp) > 1e-9:
                continue
            per.setdefault((r["case"], r["structure"], r["group"]), {})[r["method"]] = r
        for (case, name, group), by_m in per.items():
            cells = [f"{_f(by_m[m].get('dice'))} / {_f(by_m[m].get('nsd'))}" if m in by_m else "-" for m in methods]
            lines.append(f"| {case} | {name} | {group} | " + " | ".join(cells) + " |")
        lines.append("")

        # position robustness
        positions = sorted({float(r["position"]) for r in single})
        if len(positions) > 1:
            lines += ["### Prompt-position robustness (mean Dice over structures evaluated at every position)", "",
                      "| method | " + " | ".join(f"{int(round(p * 100))} %" for p in positions) + " | " +
                      " | ".join(f"drop {int(round(p * 100))} % vs {int(round(rp * 100))} %" for p in positions if abs(p - rp) > 1e-9) + " |"]
            lines.append("|" + "---|" * (1 + len(positions) + sum(abs(p - rp) > 1e-9 for p in positions)))
            for m in methods:
                # Only structures with a row at every position, so the means are comparable.
                have = {}
                for r in single:
                    if r["method"] == m and r.get("dice") is not None:
                        have.setdefault((r["case"], r["structure"]), {})[float(r["position"])] = r["dice"]
                full = {k: v for k, v in have.items() if all(any(abs(p - q) < 1e-9 for q in v) for p in positions)}
                means = {p: mean(v[q] for v in full.values() for q in v if abs(q - p) < 1e-9) for p in positions}
                ref_mean = means.get(rp, float("nan"))
                cells = [_f(means[p]) for p in positions]
                drops = [_f(ref_mean - means[p]) for p in positions if abs(p - rp) > 1e-9]
                lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(drops) + " |")
            lines.append("")

        # confidence ranking
        conf_rows = [r for r in single if r.get("conf_hit") is not None and abs(float(r["position"]) - rp) < 1e-9]
        if conf_rows:
            lines += ["### Review by confidence",
                      "",
                      "How often the least confident predicted slice is among the 3 worst slices by 2D Dice "
                      "(chance = picking a predicted slice at random).", "",
                      "| method | structures | hit rate | chance |", "|---|---|---|---|"]
            for m in methods:
                hits = aggregate(conf_rows, ("method",), "conf_hit", {"method": m}).get((m,))
                ch = aggregate(conf_rows, ("method",), "conf_chance", {"method": m}).get((m,))
                if hits:
                    lines.append(f"| {m} | {hits[1]} | {_f(hits[0], 2)} | {_f(ch[0] if ch else None, 2)} |")
            lines.append("")

    kf = [r for r in rows if r.get("protocol") == "keyframes"]
    if kf:
        kf_methods = _methods_in(rows, "keyframes")
        lines += ["### Two keyframes (reference drawn at 25 % and 75 % of the extent)", "",
                  "Mean Dice per group; `single` columns: the same method from one prompt at 50 %.", ""]
        single_methods = [m for m in kf_methods if m in methods]
        # The `single` columns over the structures the keyframe columns cover (the brain has no
        # keyframe runs: over all structures the `all` row compared different sets).
        kf_keys = {(r["case"], r["structure_id"]) for r in kf}
        single_kf = [r for r in single if (r["case"], r["structure_id"]) in kf_keys]
        head = "| group | n | " + " | ".join(kf_methods) + " | " + " | ".join(f"{m} single" for m in single_methods) + " |"
        lines += [head, "|" + "---|" * (2 + len(kf_methods) + len(single_methods))]
        for g in list(OrderedDict.fromkeys(r["group"] for r in kf)) + ["all"]:
            w = {} if g == "all" else {"group": g}
            cells, n = [], 0
            for m in kf_methods:
                v = aggregate(kf, (), "dice", {**w, "method": m}).get((), (float("nan"), 0))
                n = max(n, v[1])
                cells.append(_f(v[0]))
            for m in single_methods:
                cells.append(_f(aggregate(single_kf, (), "dice", {**w, "method": m, "position": rp}).get((), (float("nan"), 0))[0]))
            lines.append(f"| {'**all**' if g == 'all' else g} | {n} | " + " | ".join(cells) + " |")
        lines.append("")

    corr = [r for r in rows if r.get("protocol") == "correction"]
    if corr:
        c_methods = _methods_in(rows, "correction")
        rounds = sorted({int(r["round"]) for r in corr})
        lines += ["### Simulated correction session", "",
                  "Round 0: one prompt at 50 %; each round the simulated user redraws the worst slice "
                  "(lowest 2D Dice inside the reference extent) of the method's result, and the method is "
                  "updated with all drawn slices as keyframes (only regions whose keyframes changed are "
                  "recomputed); `scratch@M` = method M re-run from scratch on the same drawn slices; "
                  "`ci@M` = contour interpolation of the same drawn slices as method M's session (equal "
                  "user effort). Mean Dice over structures (mean slices predicted per run in brackets); "
                  "`kept` = share of runs whose drawn slices came out exactly as drawn.", "",
                  "| method | " + " | ".join(f"round {r}" for r in rounds) + " | kept |",
                  "|" + "---|" * (2 + len(rounds))]
        for m in c_methods:
            cells = []
            for r in rounds:
                where = {"method": m, "round": float(r)}
                d = aggregate(corr, (), "dice", where).get((), (float("nan"), 0))[0]
                npred = aggregate(corr, (), "n_predicted", where).get((), (float("nan"), 0))[0]
                cells.append(_f(d) + (f" ({npred:.0f})" if not m.startswith("ci@") and npred == npred else ""))
            kept = aggregate(corr, (), "keyframes_kept", {"method": m}).get((), (float("nan"), 0))[0]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_f(kept, 2)} |")
        lines.append("")

    pv = [r for r in rows if r.get("protocol") == "prompt-variant"]
    if pv:
        pv_methods = _methods_in(rows, "prompt-variant")
        variants = list(OrderedDict.fromkeys(r["prompt_variant"] for r in pv))
        lines += ["### Imperfect prompts (the 50 % slice drawn eroded, dilated or roughly)", "",
                  "Mean 3D Dice per group; `exact` = the reference drawn on the same slice; in brackets the change "
                  "against `exact` over the same structures. *The drawing*: mean 2D Dice of the imperfect drawing "
                  "against the reference on its slice (how far off the user was).", "",
                  "| group | method | n | exact | " + " | ".join(variants) + " |",
                  "|" + "---|" * (4 + len(variants))]
        for g in list(OrderedDict.fromkeys(r["group"] for r in pv)) + ["all"]:
            w = {} if g == "all" else {"group": g}
            drawn = [aggregate(pv, (), "prompt_dice", {**w, "prompt_variant": v, "method": pv_methods[0]})
                     .get((), (float("nan"), 0)) for v in variants]
            lines.append(f"| {'**all**' if g == 'all' else g} | *the drawing (2D Dice)* | {max(n for _, n in drawn)} | "
                         "1.000 | " + " | ".join(_f(d) for d, _ in drawn) + " |")
            for m in pv_methods:
                exact = {(r["case"], r["structure"]): r.get("dice") for r in single
                         if r["method"] == m and _match(r, {**w, "position": rp})}
                cells, n = [], 0
                for v in variants:
                    got = {(r["case"], r["structure"]): r.get("dice") for r in pv
                           if r["method"] == m and r["prompt_variant"] == v and _match(r, w)}
                    pairs = [(got[k], exact[k]) for k in got if got[k] is not None and exact.get(k) is not None]
                    n = max(n, len(pairs))
                    if pairs:
                        d = mean(a for a, _ in pairs)
                        cells.append(f"{_f(d)} ({mean(a - b for a, b in pairs):+.3f})")
                    else:
                        cells.append("")
                e = mean(v for v in exact.values() if v is not None)
                lines.append(f"| {'**all**' if g == 'all' else g} | {m} | {n} | {_f(e)} | " + " | ".join(cells) + " |")
        lines.append("")

    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += [f"{len(errors)} runs failed (see the `error` column of results.csv).", ""]
    return "\n".join(lines).rstrip() + "\n"
