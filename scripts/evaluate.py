#!/usr/bin/env python
"""Evaluate propagation methods on the held-out structures of scripts/split.json.

Protocol (issue 3 item 7, issue 6 item 4): for every evaluation structure the prompt is the
reference mask on one slice of the structure's extent along array axis 0 (50 % = the middle;
``--positions`` adds others), and the whole case volume is propagated along axis 0 with each
method through the same engine (``--axis 1`` / ``2``: along another array axis instead, as for
a prompt drawn on one of the other two planes). Scores: 3D Dice, normalized surface Dice at 2 mm,
HD95, seconds and slices predicted. Optional: ``--keyframes`` (reference drawn at 25 % and 75 %: the engine
with two keyframes vs ITK morphological contour interpolation of the same two slices) and
``--correction-rounds N`` (simulated correction session, see PAMSegmentLib.evaluation) and
``--prompt-variants`` (the 50 % prompt drawn imperfectly: eroded, dilated or roughened by a few mm,
as a user's outline may be).

Outputs in --out (default runs/eval in this repository): results.csv, summary.md, figure.png and
provenance.json (the command, commit and, per method, the weights' sha256 and its settings, whose
digests are also in every row: weights_sha256, settings_sha256), written when the run finishes
(its rows go to results.partial.csv meanwhile: an interrupted run leaves the earlier results.csv as
it was).

Examples:
    python scripts/evaluate.py --methods track,copy --limit 6
    python scripts/evaluate.py --checkpoint Resources/Models/pam_small.pt --keyframes --correction-rounds 3
    python scripts/evaluate.py --methods pam --checkpoint a=runs/a.pt --checkpoint b=runs/b.pt
    python scripts/evaluate.py --axis 1 --groups "abdominal CT" --out runs/eval_axis1
    python scripts/evaluate.py --methods pam,track --prompt-variants erode:2,dilate:2,rough:2 --out runs/eval_noisy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PAMSegmentLib import evaluation as ev  # noqa: E402
from PAMSegmentLib.cli import number_type  # noqa: E402
from PAMSegmentLib.errors import PAMError  # noqa: E402
from PAMSegmentLib.metrics import dice  # noqa: E402
from PAMSegmentLib.volumes import make_writable_folder  # noqa: E402
from PAMSegmentLib.metrics import evaluate as score_masks  # noqa: E402


_positive = number_type(int, lambda v: v >= 1, "a positive integer")


_non_negative_int = number_type(int, lambda v: v >= 0, "a whole number of at least 0")
_positive_mm = number_type(float, lambda v: np.isfinite(v) and v > 0, "a distance in mm above 0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples:")[1] if "Examples:" in __doc__ else None)
    p.add_argument("--split", default=str(ROOT / "scripts" / "split.json"), help="split file (default scripts/split.json)")
    p.add_argument("--cache", default=os.environ.get("PAMSEGMENT_CACHE", str(ROOT / "cache")),
                   help="data cache holding cases/<case>.npz (default $PAMSEGMENT_CACHE or ./cache)")
    p.add_argument("--methods", default="pam,track,copy",
                   help="comma-separated: pam, pam-memory, track, copy (default pam,track,copy)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="PAM weights for the pam methods, repeatable; LABEL=PATH names them pam:LABEL in the tables "
                        "(default: the shipped weights)")
    p.add_argument("--positions", default="0.5", help="prompt positions along the extent, e.g. 0.3,0.5,0.7 (default 0.5)")
    p.add_argument("--keyframes", action="store_true", help="also evaluate 2 keyframes at 25 %% and 75 %% vs contour interpolation")
    p.add_argument("--prompt-variants", default="",
                   help="also propagate imperfect drawings of the 50 %% prompt, e.g. erode:2,dilate:2,rough:2 (mm; "
                        "see PAMSegmentLib.evaluation.perturb_prompt)")
    p.add_argument("--correction-rounds", type=_non_negative_int, default=0,
                   help="simulated correction rounds (0 = off)")
    p.add_argument("--groups", default="", help="comma-separated group names or substrings to evaluate (default all)")
    p.add_argument("--cases", default="", help="comma-separated case ids to evaluate (default all)")
    p.add_argument("--limit", type=_non_negative_int, default=0,
                   help="evaluate only the first N structures (quick runs)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=0,
                   help="propagation axis of the arrays (default 0; 1 and 2: prompts drawn on the other two planes)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch and SimpleITK threads (default 1; ITK's contour interpolation runs on one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--tolerance", type=_positive_mm, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--figure-structure", default="", help="CASE:NAME shown in the qualitative panel (default: the first structure)")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--out", default=str(ROOT / "runs" / "eval"), help="output directory (default runs/eval in this "
                   "repository, beside train.py's runs/)")
    p.add_argument("--from-csv", action="store_true",
                   help="only rebuild summary.md and figure.png from an existing OUT/results.csv")
    return p.parse_args(argv)


def rebuild(args) -> int:
    out = Path(args.out)
    if not (out / "results.csv").is_file():
        raise SystemExit(f"error: --from-csv rebuilds from {out / 'results.csv'}, which does not exist: give the --out of "
                         "an earlier run")
    rows = ev.read_csv(out / "results.csv")
    header = f"## Evaluation\n\n(rebuilt from {out / 'results.csv'}, {len(rows)} rows)"
    old = out / "summary.md"
    if old.exists() and old.read_text().startswith("## Evaluation") and "(rebuilt from " not in old.read_text()[:200]:
        header = old.read_text().split("\n\n### ")[0]  # keep the command line of the run (not a stale row count)
    (out / "summary.md").write_text(ev.summary_markdown(rows, header=header))
    if not args.no_figure:
        make_figure(rows, None, out / "figure.png")
    print((out / "summary.md").read_text())
    return 0


def build_methods(args):
    """[(label, predictor)] in the order asked."""
    from PAMSegmentLib.baselines import METHOD_NAMES, get_predictor

    out = []
    for name in [m.strip().lower() for m in args.methods.split(",") if m.strip()]:
        if name not in METHOD_NAMES:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
        if not name.startswith("pam"):
            out.append((name, get_predictor(name, threads=args.threads) if name == "track" else get_predictor(name)))
            continue
        # PAM variants (pam, pam-memory): one entry per checkpoint.
        ckpts = args.checkpoint or [None]
        for c in ckpts:
            label, path = name, c
            if c is not None and "=" in c and not Path(c).exists():
                tag, path = c.split("=", 1)
                label = f"{name}:{tag}"
            elif c is not None and len(ckpts) > 1:
                label = f"{name}:{Path(c).stem}"
            out.append((label, get_predictor(name, checkpoint=path, device=args.device)))
    if not out:
        raise SystemExit("no methods given")
    labels = [m for m, _ in out]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"method labels must be unique, got {labels}; name checkpoints with LABEL=PATH")
    return out


def method_stamps(methods) -> dict:
    """What made each method's rows, written into them and into provenance.json: the weights'
    sha256 (pam methods) and a digest of the predictor's settings (propagate.predictor_settings:
    its options, the checkpoint's preprocessing and inference parameters), so that figures can be
    tied to the weights and parameters that produced them."""
    import hashlib

    from PAMSegmentLib.propagate import predictor_settings

    stamps = {}
    for label, predictor in methods:
        settings = list(predictor_settings(predictor))
        model = getattr(predictor, "model", None)
        stamps[label] = {
            "weights_sha256": getattr(model, "sha256", "") if model is not None else "",
            "settings_sha256": hashlib.sha256("\n".join(settings).encode()).hexdigest()[:16],
            "checkpoint": getattr(model, "source", "") if model is not None else "",
            "settings": settings,
        }
    return stamps


def stamp_rows(rows, stamps) -> None:
    """Each row gets its method's weights_sha256 and settings_sha256 (a row of method "ci@pam" its
    pam's; contour interpolation ("ci") none)."""
    for r in rows:
        s = stamps.get(r["method"].split("@")[-1])
        r["weights_sha256"] = s["weights_sha256"] if s else ""
        r["settings_sha256"] = s["settings_sha256"] if s else ""


class Runner:
    def __init__(self, args, case: ev.EvalCase):
        self.args, self.case = args, case

    def propagate(self, predictor, prompt, previous=None):
        from PAMSegmentLib.propagate import propagate

        t0 = time.perf_counter()
        res = propagate(self.case.image, prompt, self.case.spacing, predictor, axis=0, batch_size=self.args.batch_size,
                        device=self.args.device, threads=self.args.threads, previous=previous)
        return res, time.perf_counter() - t0

    def score(self, mask, ref):
        m = score_masks(mask, ref, self.case.spacing, tolerance_mm=self.args.tolerance)
        ext = ev.extent(mask)
        return {**m, "pred_first": ext[0] if ext else None, "pred_last": ext[1] if ext else None}


def evaluate_structure(args, runner: Runner, st: ev.EvalStructure, methods, positions, keep_masks=False):
    case = runner.case
    ref = case.labels == st.label
    ext = ev.extent(ref)
    # The propagation axis and the NSD tolerance go into every row: rows of other values must not be
    # averaged into one table (merge_eval.py refuses them; the summary names the tolerance).
    base = {"case": st.case, "group": st.group, "modality": st.modality, "structure_id": st.label,
            "structure": st.name, "ref_first": ext[0], "ref_last": ext[1], "axis": args.axis,
            "nsd_tolerance_mm": args.tolerance}
    rows, masks = [], {}

    def fail(row, exc):
        row.update({"error": f"{type(exc).__name__}: {exc}"[:300]})
        return row

    # The imperfect drawings of the 50 % slice, the same for every method: (name, drawn prompt, its 2D Dice).
    mid = ev.slice_at(ref, 0.5)
    variants = []
    for kind, mm in args.variants:
        drawn = ev.perturb_prompt(ref[mid], case.spacing[1:], kind, mm, seed=zlib.crc32(f"{st.case}:{st.name}".encode()))
        prompt = np.zeros(ref.shape, dtype=np.uint8)
        prompt[mid][drawn] = 1
        variants.append((f"{kind}:{mm:g}", prompt, dice(drawn, ref[mid])))

    for label, predictor in methods:
        for pos in positions:
            s = ev.slice_at(ref, pos)
            row = {**base, "method": label, "protocol": "single", "position": pos, "round": 0, "prompt_slices": [s]}
            try:
                res, sec = runner.propagate(predictor, ev.prompt_from_reference(ref, [s]))
                mask = res.mask > 0
                row.update(runner.score(mask, ref))
                row.update({"seconds": sec, "n_predicted": res.n_predicted})
                hit = ev.confidence_hit(res.confidence[1], mask, ref, exclude=[s])
                if hit is not None:
                    row.update({"conf_hit": hit[0], "conf_chance": hit[1]})
                if keep_masks and abs(pos - 0.5) < 1e-9:
                    masks[label] = mask
            except PAMError as exc:
                fail(row, exc)
            rows.append(row)

        for name, prompt, prompt_dice in variants:
            row = {**base, "method": label, "protocol": "prompt-variant", "position": 0.5, "round": 0,
                   "prompt_slices": [mid], "prompt_variant": name, "prompt_dice": prompt_dice}
            try:
                res, sec = runner.propagate(predictor, prompt)
                row.update(runner.score(res.mask > 0, ref))
                row.update({"seconds": sec, "n_predicted": res.n_predicted})
            except PAMError as exc:
                fail(row, exc)
            rows.append(row)

        if args.keyframes:
            kfs = sorted({ev.slice_at(ref, 0.25), ev.slice_at(ref, 0.75)})
            row = {**base, "method": label, "protocol": "keyframes", "position": None, "round": 0, "prompt_slices": kfs}
            try:
                res, sec = runner.propagate(predictor, ev.prompt_from_reference(ref, kfs))
                mask = res.mask > 0
                row.update(runner.score(mask, ref))
                row.update({"seconds": sec, "n_predicted": res.n_predicted,
                            "keyframes_kept": all(np.array_equal(mask[k], ref[k]) for k in kfs)})
            except PAMError as exc:
                fail(row, exc)
            rows.append(row)

        if args.correction_rounds > 0:
            # Ours: each round updates the previous result (only regions whose keyframes changed
            # are recomputed); "scratch@" re-runs the method from scratch with all drawn slices.
            state = {"previous": None}

            def update(drawn, p=predictor, state=state):
                res, sec = runner.propagate(p, ev.prompt_from_reference(ref, drawn), previous=state["previous"])
                state["previous"] = res
                return res, sec

            rows += correction_rows(args, runner, base, ref, label, update,
                                    scratch=lambda drawn, p=predictor: runner.propagate(p, ev.prompt_from_reference(ref, drawn)))

    if args.keyframes:
        kfs = sorted({ev.slice_at(ref, 0.25), ev.slice_at(ref, 0.75)})
        row = {**base, "method": "ci", "protocol": "keyframes", "position": None, "round": 0, "prompt_slices": kfs}
        t0 = time.perf_counter()
        mask = ev.contour_interpolation(ev.prompt_from_reference(ref, kfs) > 0, axis=0)
        row.update(runner.score(mask, ref))
        row.update({"seconds": time.perf_counter() - t0, "n_predicted": 0,
                    "keyframes_kept": all(np.array_equal(mask[k], ref[k]) for k in kfs)})
        rows.append(row)

    return rows, masks


def correction_rows(args, runner, base, ref, label, run, scratch=None):
    """Rows of a simulated correction session of ``label`` (one per round), plus contour
    interpolation of the same drawn slices (method ``ci@label``) and, given ``scratch``, the
    method re-run from scratch on them (``scratch@label``)."""
    info = {}

    def scratch_mask(drawn):
        res, sec = scratch(drawn)
        info[("scratch", tuple(drawn))] = (sec, res.n_predicted)
        return res.mask > 0

    def run_mask(drawn):
        res, sec = run(drawn)
        info[(label, tuple(drawn))] = (sec, res.n_predicted)
        return res.mask > 0

    def ci_mask(drawn):
        t0 = time.perf_counter()
        m = ev.contour_interpolation(ev.prompt_from_reference(ref, drawn) > 0, axis=0)
        info[("ci", tuple(drawn))] = (time.perf_counter() - t0, 0)
        return m

    start = [ev.slice_at(ref, 0.5)]
    try:
        companions = {f"ci@{label}": ci_mask}
        if scratch is not None:
            companions[f"scratch@{label}"] = scratch_mask
        session = ev.simulate_corrections(run_mask, ref, start, args.correction_rounds, lambda m: runner.score(m, ref),
                                          companions=companions)
    except PAMError as exc:
        return [{**base, "method": label, "protocol": "correction", "round": 0, "prompt_slices": start,
                 "error": f"{type(exc).__name__}: {exc}"[:300]}]
    rows = []
    keys = ("dice", "nsd", "hd95", "pred_first", "pred_last", "keyframes_kept")
    for r in session:
        common = {**base, "protocol": "correction", "position": 0.5, "round": r["round"], "prompt_slices": r["drawn"],
                  "added_slice": r["added"]}
        sec, npred = info.get((label, tuple(r["drawn"])), (None, None))
        rows.append({**common, "method": label, **{k: r[k] for k in keys}, "seconds": sec, "n_predicted": npred})
        for name, comp in r["companions"].items():
            kind = name.split("@")[0]
            sec, npred = info.get((kind, tuple(r["drawn"])), (None, 0))
            rows.append({**common, "method": name, **{k: comp[k] for k in keys}, "seconds": sec, "n_predicted": npred})
    return rows


def make_figure(rows, panel, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in rows if r.get("protocol") == "single"]
    methods = list(dict.fromkeys(r["method"] for r in single))
    groups = list(dict.fromkeys(r["group"] for r in single))
    agg = ev.aggregate(single, ("group", "method"), "dice", {"position": 0.5})
    n_panel = 3 if panel else 0
    fig = plt.figure(figsize=(max(7, 1.6 * len(groups) + 3) + 3 * n_panel * 0.8, 4.2))
    gs = fig.add_gridspec(1, 1 + n_panel, width_ratios=[max(2.5, 0.9 * len(groups))] + [1] * n_panel)
    ax = fig.add_subplot(gs[0, 0])
    width = 0.8 / max(len(methods), 1)
    colors = plt.cm.tab10.colors
    for mi, m in enumerate(methods):
        xs = np.arange(len(groups)) + (mi - (len(methods) - 1) / 2) * width
        vals = [agg.get((g, m), (np.nan, 0))[0] for g in groups]
        ax.bar(xs, vals, width, label=m, color=colors[mi % 10])
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([g.replace(" (", "\n(") for g in groups], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean 3D Dice (prompt at 50 %)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    if panel:
        image, ref, masks, title = panel
        ext = ev.extent(ref)
        for pi, frac in enumerate((0.15, 0.5, 0.85)):
            s = ext[0] + int(round(frac * (ext[1] - ext[0])))
            a = fig.add_subplot(gs[0, 1 + pi])
            rows_, cols_ = np.nonzero(ref.any(axis=0))
            pad = 15
            r0, r1 = max(rows_.min() - pad, 0), min(rows_.max() + pad, ref.shape[1])
            c0, c1 = max(cols_.min() - pad, 0), min(cols_.max() + pad, ref.shape[2])
            img = image[s, r0:r1, c0:c1]
            lo, hi = np.percentile(image[ext[0]:ext[1] + 1, r0:r1, c0:c1], [1, 99])
            a.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if ref[s, r0:r1, c0:c1].any():
                a.contour(ref[s, r0:r1, c0:c1], levels=[0.5], colors=["lime"], linewidths=1.2)
            for mi, (m, mk) in enumerate(masks.items()):
                if mk[s, r0:r1, c0:c1].any():
                    a.contour(mk[s, r0:r1, c0:c1], levels=[0.5], colors=[colors[mi % 10]], linewidths=0.9)
            a.set_title(f"{title}\nslice {s}" if pi == 1 else f"slice {s}", fontsize=7)
            a.axis("off")
    fig.suptitle("Evaluation structures (scripts/split.json): mean 3D Dice per group"
                 + ("; right: one structure, lime = reference" if panel else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.from_csv:
        return rebuild(args)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    try:  # torch is needed only by the pam methods
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    try:
        args.variants = ev.parse_prompt_variants(args.prompt_variants)
    except PAMError as exc:
        raise SystemExit(str(exc)) from None
    try:
        positions = [float(p) for p in args.positions.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"error: --positions expects fractions of the extent such as 0.3,0.5,0.7; got "
                         f"{args.positions!r}") from None
    if not all(0 <= p <= 1 for p in positions):
        raise SystemExit(f"error: --positions must lie within [0, 1]; got {args.positions!r}")
    if 0.5 not in positions:
        positions.append(0.5)  # the reference protocol is always run
    positions = sorted(positions)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    structures = ev.load_split(args.split, groups=groups or None, cases=cases or None)
    if args.limit:
        structures = structures[: args.limit]
    if not structures:
        raise SystemExit("error: no evaluation structures match the filters")
    out = Path(args.out)
    try:  # before the methods load and any case is read
        make_writable_folder(out, "the results (--out)")
    except PAMError as exc:
        raise SystemExit(f"error: {exc}") from None
    methods = build_methods(args)
    stamps = method_stamps(methods)
    fig_key = tuple(args.figure_structure.split(":", 1)) if args.figure_structure else (structures[0].case, structures[0].name)

    print(f"evaluating {len(structures)} structures x {len(methods)} methods ({', '.join(m for m, _ in methods)}), "
          f"positions {positions}{', keyframes' if args.keyframes else ''}"
          f"{f', {args.correction_rounds} correction rounds' if args.correction_rounds else ''}", flush=True)
    rows, panel = [], None
    partial = out / "results.partial.csv"
    if (out / "results.csv").is_file():
        print(f"note: {out / 'results.csv'} ({len(ev.read_csv(out / 'results.csv'))} rows) is replaced when this run "
              f"finishes; until then the rows go to {partial.name}", flush=True)
    t_all = time.perf_counter()
    from PAMSegmentLib.training.provenance import git_changes, git_revision

    # the code this run imported: the tree as it starts (a commit made while it runs is not its code)
    commit, changes = git_revision(short=True), git_changes()
    case, runner = None, None
    for n, st in enumerate(structures, 1):
        if case is None or case.case_id != st.case:
            case = ev.along_axis(ev.load_case(args.cache, st.case), args.axis)
            runner = Runner(args, case)
        if not (case.labels == st.label).any():
            print(f"[{n}/{len(structures)}] {st.case}:{st.name} has no voxels in the case file; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        keep = (not args.no_figure) and panel is None and (st.case, st.name) == fig_key
        new, masks = evaluate_structure(args, runner, st, methods, positions, keep_masks=keep)
        stamp_rows(new, stamps)
        rows += new
        if keep:
            panel = (case.image, case.labels == st.label, masks, f"{st.case}: {st.name}")
        mid = {r["method"]: r for r in new if r["protocol"] == "single" and r["position"] == 0.5}
        parts = [f"{m} {mid[m]['dice']:.3f}" if mid.get(m, {}).get("dice") is not None else f"{m} ERR" for m, _ in methods]
        print(f"[{n}/{len(structures)}] {st.case}:{st.name} ({st.group}) Dice@50%: {', '.join(parts)} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        ev.write_csv(rows, partial)  # an interrupted run keeps its rows there; results.csv stays as it was

    ev.write_csv(rows, out / "results.csv")
    partial.unlink(missing_ok=True)
    command = f"python scripts/evaluate.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    (out / "provenance.json").write_text(json.dumps(
        {"command": command, "commit": commit, "git_changes": changes, "threads": args.threads, "axis": args.axis,
         "nsd_tolerance_mm": args.tolerance, "methods": stamps},
        indent=1) + "\n")
    header = (f"## Evaluation\n\n`{command}` "
              f"(commit {commit}{' with changes' if changes else ''}; {len(structures)} structures, "
              f"{args.threads} thread(s), "
              f"{time.perf_counter() - t_all:.0f} s)")
    (out / "summary.md").write_text(ev.summary_markdown(rows, header=header))
    if not args.no_figure:
        make_figure(rows, panel, out / "figure.png")
    print(f"wrote {out / 'results.csv'}, {out / 'summary.md'}" + ("" if args.no_figure else f", {out / 'figure.png'}"))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("evaluate: interrupted; the rows done are in OUT/results.partial.csv, and OUT/results.csv, summary.md "
              "and figure.png are as they were", file=sys.stderr)
        sys.exit(130)
    except PAMError as exc:  # bad checkpoint, missing case file, ...: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
