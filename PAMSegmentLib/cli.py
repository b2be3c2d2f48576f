"""The ``pamsegment`` command: propagate a one-slice prompt through a volume from files.

    pamsegment propagate IMAGE PROMPT -o OUT [--checkpoint CKPT] [--label N ...] ...
    pamsegment serve [--host H] [--port P] [--token T]
    pamsegment batch MANIFEST.csv -o DIR [--skip-existing] [--shard K/N]
    pamsegment label-images PROMPT_IMAGE PROMPT_MASK IMAGE... -o DIR
    pamsegment label-cells IMAGE EXAMPLES -o OUT
    pamsegment info [CKPT]

Exit status: 0 on success; 2 with a one-line ``pamsegment: error: ...`` message for bad input
(an unreadable or inconsistent image/prompt, a bad checkpoint, a bad option) or not enough
memory; 130 when interrupted (nothing is written); 143 when stopped by SIGTERM (cleaned up as
after Ctrl-C); 141 when the reader of the output stopped early (``pamsegment info | head -1``;
what was written stays); 1 for an unexpected internal error (with its traceback, which is a bug
worth reporting). ``serve`` exits 0 when Ctrl-C or SIGTERM stops it.

Adding a subcommand: write ``add_<name>_arguments(parser)`` and ``cmd_<name>(args) -> int`` in
any module and add one ``Subcommand`` entry to ``SUBCOMMANDS`` below, e.g.::

    "demo": Subcommand("run the bundled demo", "PAMSegmentLib.demo:add_demo_arguments",
                       "PAMSegmentLib.demo:cmd_demo"),

Entries name their functions as "module:function" strings so that only the chosen subcommand's
module is imported: ``pamsegment info`` does not pay for SimpleITK, and an unreadable image is
reported before torch is even imported.

Propagation methods follow the same pattern: ``METHODS`` maps a ``--method`` name to a factory
``(args) -> PAMModel | SlicePredictor``; a baseline (``copy``, ``track``) is one more entry.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckpointError, DrawnIn3D, InputError, PAMError, PropagationCancelled, out_of_memory

__all__ = ["main", "build_parser", "Subcommand", "SUBCOMMANDS", "METHODS", "parse_slice_range"]

PROG = "pamsegment"
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as `yes | head -1` ends: the reader of stdout went away
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by kill or a scheduler, cleaned up as after Ctrl-C


# ----------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Subcommand:
    """One ``pamsegment NAME`` subcommand.

    add_arguments / run: a callable, or a "module:function" string imported only when this
    subcommand is used. ``run(args) -> int`` returns the exit status and signals bad input by
    raising a PAMError (the CLI turns it into exit 2 and a one-line message).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | str
    run: Callable[[argparse.Namespace], int] | str


def _resolve(ref: Callable | str) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module, package=__package__), name)


def _pam_method(args: argparse.Namespace) -> Any:
    """PAM's network from --checkpoint, or the shipped default weights (with --registration-weight
    overriding the checkpoint's)."""
    model = _load_pam(args)
    weight = getattr(args, "registration_weight", None)
    if weight is not None:
        model.inference = replace(model.inference, registration_weight=weight)
    gate = getattr(args, "intensity_gate", None)
    if gate is not None:
        model.inference = model.inference.with_gate(gate)
    through_plane = getattr(args, "through_plane_mm", None)
    if through_plane is not None:
        model.inference = replace(model.inference, through_plane_mm=through_plane)
    walk = getattr(args, "walk", None)
    if walk is not None:
        model.inference = replace(model.inference, published_scheme=walk == "published")
    return model


def _checkpoint_is_file(path) -> bool:
    """``Path(path).is_file()``, or CheckpointError where a folder on the way may not be entered (a
    PermissionError traceback, exit 1, for the file PAMSEGMENT_MODEL names: a re-review, session 47)."""
    try:
        return Path(path).is_file()
    except PermissionError as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({error.strerror or error}), the file PAMSEGMENT_MODEL "
                              "names; check the permissions of it and of its folders, or point the variable at a "
                              "checkpoint you can read") from None


def _load_pam(args: argparse.Namespace) -> Any:
    from . import checkpoints

    if args.checkpoint is not None:
        return checkpoints.load_model(args.checkpoint, device=args.device)
    path = checkpoints.default_checkpoint_path()
    env = os.environ.get("PAMSEGMENT_MODEL")
    if env and (path is None or not _checkpoint_is_file(path)):
        raise CheckpointError(
            f"PAMSEGMENT_MODEL is set to {env}, which is not a file; point it at a checkpoint, unset it, "
            "or pass --checkpoint CKPT"
        )
    if path is None or not Path(path).is_file():
        raise CheckpointError(
            "no default PAM weights are installed; pass --checkpoint CKPT (a PAMSegment checkpoint or the "
            "official propmask.pth from the PAM authors)"
        )
    model = checkpoints.load_model(path, device=args.device)
    if env:  # other weights than the shipped ones, chosen outside the command line: said once they load
        print(f"note: using the weights PAMSEGMENT_MODEL names ({env})", flush=True)
    return model


# --method name -> factory(args) returning what ``propagate`` accepts as ``model``.
def _pam_memory_method(args: argparse.Namespace) -> Any:
    from .pam_predictor import MemoryPAMPredictor

    return MemoryPAMPredictor(_pam_method(args))


CLASSICAL_METHODS = ("track", "copy")  # need no network, so no checkpoint


def _classical_method(name: str) -> Callable[[argparse.Namespace], Any]:
    def factory(args: argparse.Namespace) -> Any:
        from .baselines import get_predictor

        return get_predictor(name)  # cmd_propagate has refused --checkpoint for it

    return factory


METHODS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "pam": _pam_method,
    "pam-memory": _pam_memory_method,
    "track": _classical_method("track"),  # slice-to-slice demons registration; needs no torch
    "copy": _classical_method("copy"),
}


# ----------------------------------------------------------------------------- argument types


def parse_slice_range(text: str) -> tuple[int, int]:
    """"K0:K1" -> (K0, K1): two non-negative integers with K0 <= K1, both slices included."""
    parts = text.strip().split(":")
    hint = "expected K0:K1, two slice numbers with 0 <= K0 <= K1 (both included), e.g. 10:40"
    if len(parts) != 2 or not all(p.strip().isdecimal() for p in parts):
        raise argparse.ArgumentTypeError(f"{hint}; got {text!r}")
    k0, k1 = (int(p) for p in parts)
    if k0 > k1:
        raise argparse.ArgumentTypeError(f"{hint}; got {text!r} (K0 > K1)")
    return k0, k1


MAX_SLICE_RUN = 100_000  # a run K0-K1 longer than any volume's slices is a typo, not a list to build


def parse_slice_list(text: str) -> list[int]:
    """"K[,K...]" -> sorted slice numbers (non-negative integers); an item may be a run "K0-K1"
    (both included), as the command prints slices (``changed beside your edits: label 5: 0-2, 4-9``)."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        if not first.strip().isdecimal() or (dash and not last.strip().isdecimal()):
            raise argparse.ArgumentTypeError(f"expected slice numbers or runs separated by commas, e.g. 12,30 or "
                                             f"12,25-28 (no spaces, or the list in quotes); got {text!r}")
        k0, k1 = int(first), int(last) if dash else int(first)
        if k1 < k0:
            raise argparse.ArgumentTypeError(f"the run {part} in {text!r} ends before it starts; write it K0-K1 with "
                                             "K0 <= K1")
        if k1 - k0 >= MAX_SLICE_RUN:
            raise argparse.ArgumentTypeError(f"the run {part} in {text!r} spans more than {MAX_SLICE_RUN:,} slices")
        out.update(range(k0, k1 + 1))
    return sorted(out)


def parse_empty_slices(text: str) -> tuple[int | None, list[int]]:
    """One ``--empty-slices`` value: "K[,K...]" (absent for every label) or "LABEL:K[,K...]"
    (absent for that label) -> (label or None, sorted slices)."""
    label, sep, rest = text.partition(":")
    if not sep:
        return None, parse_slice_list(text)
    if not label.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"expected slice numbers (12,30) or a label and its slices (3:12,30); "
                                         f"got {text!r}")
    if not 1 <= int(label) <= 65535:
        raise argparse.ArgumentTypeError(f"label {int(label)} in {text!r}: labels are 1-65535 (0 is the background)")
    try:
        return int(label), parse_slice_list(rest)
    except argparse.ArgumentTypeError as error:  # (the part after the colon alone was quoted: "got '-2'")
        raise argparse.ArgumentTypeError(f"{error} (in {text!r})") from None


def walls_option(values) -> list[int] | dict[int, list[int]] | None:
    """The ``--empty-slices`` values together: one list for every label, or {label: slices}."""
    if not values:
        return None
    plain = [slices for label, slices in values if label is None]
    if plain and len(plain) < len(values):
        raise InputError("--empty-slices takes slices for every label (12,30) or per label (3:12,30, the option "
                         "repeated for each label), not both; give the slices for every label with each label")
    if plain:
        return sorted(set().union(*map(set, plain)))
    out: dict[int, set[int]] = {}
    for label, slices in values:
        out.setdefault(label, set()).update(slices)
    return {label: sorted(s) for label, s in sorted(out.items())}


def number_type(kind, accepted, expected: str):
    """An argparse ``type``: ``kind(text)`` (int or float) when ``accepted(value)``, else the one
    message "expected <expected>, got '<text>'" (also for text that is not a number)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accepted(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_unit_interval = number_type(float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")
_positive_int = number_type(int, lambda v: v >= 1, "a positive integer")


# --threads' help, the same in every command that takes it.
THREADS_HELP = ("CPU threads of the network (torch) and of the registrations (SimpleITK); 1 keeps the run to "
                "one core (default: the libraries' choice, the registrations in two threads beside the network)")


def _thread_count(text: str) -> int:
    """A ``--threads`` value: 1 to ``checks.max_threads()`` (4 per core, at least 64)."""
    from .checks import max_threads

    return number_type(int, lambda v: 1 <= v <= max_threads(),
                       f"a thread count from 1 to {max_threads()} ({os.cpu_count()} CPU cores here)")(text)


def _through_plane_mm(text: str) -> float:
    from .checkpoints import THROUGH_PLANE_RANGE_MM, valid_through_plane_mm

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not valid_through_plane_mm(value):
        lo, hi = THROUGH_PLANE_RANGE_MM
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a slice spacing in mm from {lo:g} to {hi:g}, got {text!r}")
    return value


def _label_number(text: str) -> int:
    """A ``--label`` value. ``--label`` takes several numbers, so written before the file names it
    takes them too: say so when a value is not a number."""
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        if text.lstrip("+-").isdigit():
            raise
        raise argparse.ArgumentTypeError(f"{exc}: --label takes one or more numbers, so put it after the file "
                                         "names") from None


# ----------------------------------------------------------------------------- propagate


def add_propagate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="3D image: NIfTI, NRRD, MHA or a DICOM series folder")
    p.add_argument("prompt", metavar="PROMPT",
                   help="label map on the image grid with the object drawn on one slice (or a few keyframes)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output label map (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha); written only on success")
    p.add_argument("--report", metavar="CSV",
                   help="also write a table of every slice of the result: label, slice, voxels, drawn, the "
                        "engine's confidence and what ended each walk (written with OUT)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="PAMSegment checkpoint or the official PAM propmask.pth (default: $PAMSEGMENT_MODEL if set, "
                        "else the shipped weights)")
    p.add_argument("--method", choices=sorted(METHODS), default="pam", help=METHOD_HELP)
    p.add_argument("--registration-weight", type=_unit_interval, metavar="W",
                   help="pam: weight of the demons-registration fusion, 0 = the network alone as in the official "
                        "PAM (default: the checkpoint's; 0.5 for the shipped weights, 0 for the official checkpoint; "
                        "a prior-channel network with query_prior=carried still registers, for its prior)")
    p.add_argument("--walk", choices=("engine", "published"), help=WALK_HELP)
    p.add_argument("--intensity-gate", choices=("off", "prompt", "guide", "both"),
                   help="pam: also end the walk where the predicted region's intensity drifts from the drawn "
                        "slice's region (prompt), from the region of the slice it was predicted from (guide), or "
                        "from either (both) (default: the checkpoint's; both for the shipped weights, off for the "
                        "official checkpoint)")
    p.add_argument("--through-plane-mm", type=_through_plane_mm, metavar="T",
                   help="pam: on scans whose slices are more than T mm apart, walk through slices interpolated "
                        "between them (ceil(spacing / T) steps per slice; the result stays on the scan's slices). "
                        "1.5 helped single-slice prompts on thick-slice validation scans; 0 = off (default: the "
                        "checkpoint's, off for the shipped weights)")
    p.add_argument("--label", type=_label_number, nargs="+", action="extend", metavar="N",
                   help="propagate only these prompt labels, in this order, which decides overlaps: the label "
                        "propagated first keeps the voxels (default: every label in the prompt, in ascending order)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2),
                   help="array axis to propagate along, (k, j, i) order (default: the axis the prompt is drawn across)")
    p.add_argument("--range", type=parse_slice_range, metavar="K0:K1", dest="slice_range",
                   help="propagate only within slices K0..K1 along the axis, both included")
    p.add_argument("--empty-slices", type=parse_empty_slices, action="append", metavar="[LABEL:]K[,K...]",
                   help="slices along the axis where the object is absent (e.g. erased after a first run), "
                        "each K a slice or a run K0-K1: propagation never crosses them; LABEL:K,K for one label "
                        "only, the option repeated for "
                        "others (e.g. --empty-slices 3:12,20 --empty-slices 5:40)")
    p.add_argument("--previous", metavar="PREV",
                   help="with --edited: an earlier result of this command for PROMPT (its OUT); propagate again "
                        "keeping your corrections (see --edited)")
    p.add_argument("--edited", metavar="EDITED",
                   help="with --previous: PREV corrected by hand (e.g. in ITK-SNAP or 3D Slicer). The slices where it "
                        "differs from PREV become keyframes beside PROMPT's, kept exactly; a slice you erased "
                        "entirely is one where the object is absent. The walks PREV's record (PREV.keyframes.json, "
                        "which every run writes beside its OUT) shows unchanged are reused, the rest predicted; "
                        "OUT's record carries this round's keyframes to the next (--previous OUT)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="predict every slice in the range, also past slices where the object vanished")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the volume looks too large for the memory this process may use (the check "
                        "before the walks refuses it; with enough swap it may still finish)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_thread_count, metavar="N", help=THREADS_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="query slices per network call; bounds memory (default: 16)")
    p.add_argument("--resample-prompt", action="store_true",
                   help="resample a prompt on another grid onto the image grid (nearest neighbour)")
    p.add_argument("--series", metavar="UID",
                   help="for a DICOM folder holding several series: the SeriesInstanceUID to use (default: the "
                        "series with the most files)")
    p.add_argument("--server", metavar="URL",
                   help="propagate on a `pamsegment serve` server (e.g. http://gpu-box:8765) instead of here; its "
                        "model and device are used")
    p.add_argument("--token", help="the server's token (default: the PAMSEGMENT_TOKEN environment variable)")


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def _check_output_path(out: str, inputs: Sequence[str]) -> None:
    """Fail before any work if OUT would overwrite an input or cannot be written."""
    from . import volumes

    for given in inputs:
        if _same_path(out, given):
            raise InputError(f"the output {out} is the input {given}; choose another -o path")
    volumes.check_output_path(out)  # the writer's own checks: format, folder, not a folder itself


PROGRESS_MODES = ("auto", "bar", "lines", "off")
_PROGRESS_SAID: list[str] = []  # an unknown PAMSEGMENT_PROGRESS value, once said


def progress_mode(stream=None) -> str:
    """How progress is shown on ``stream`` (stderr): $PAMSEGMENT_PROGRESS if it is one of "bar"
    (tqdm's bar, redrawn with carriage returns), "lines" (a plain line every 10 %, for logs) or
    "off"; by default ("auto") a bar on a terminal and lines otherwise (a log of a 30 s run held
    11 KB of redrawn bars on one line)."""
    mode = os.environ.get("PAMSEGMENT_PROGRESS", "auto").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    if mode != "auto" and not _PROGRESS_SAID:  # a typo (line, quiet) said once, not taken as the default quietly
        _PROGRESS_SAID.append(mode)
        print(f"note: PAMSEGMENT_PROGRESS={mode!r} is not one of bar, lines, off or auto: auto is used",
              file=sys.stderr, flush=True)
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "lines"


class _ProgressBar:
    """Progress on stderr (0..100 %), fed by the engine's ``progress(fraction, message)``: a tqdm
    bar on a terminal, plain lines every 10 % in a log (``progress_mode``). It appears with the
    first progress call, so input refused before any work is one line alone. show_message: the
    message follows the bar (a server's state and queue position, which a bar standing at 0 % does
    not tell)."""

    def __init__(self, description: str, show_message: bool = False):
        self.description, self.bar, self.show_message, self.message = description, None, show_message, None
        self.mode, self.said, self.last_text, self.last_time = progress_mode(), -1, None, 0.0

    def _line(self, fraction: float, message: str) -> None:
        """The log form: a line at each new 10 % step, where the label changes, and, with
        ``show_message``, where the message's kind changes (its words without the numbers:
        "queued (queue position 2)" to "running", not slice 31 to slice 32 or tile 7 to tile 8,
        which made a line per poll or tile: 29 lines in 14 s) or, its numbers only, a minute on."""
        import re

        percent = int(100 * min(max(fraction, 0.0), 1.0))
        label = message.split(": ", 1)[0] if message.startswith("label ") and ": " in message else None
        now = time.monotonic()
        if self.show_message:
            kind = re.sub(r"\d+", "#", message)
            changed = kind != self.message or (message != self.last_text and now - self.last_time >= 60)
            if changed:
                self.message = kind
        else:
            changed = label is not None and label != self.message
            if changed:
                self.message = label
        if changed or percent // 10 > self.said // 10:
            self.said, self.last_text, self.last_time = percent, message, now
            what = self.description + (f" {label}" if label is not None and not self.show_message else "")
            print(f"{what}: {percent}%" + (f", {message}" if self.show_message and message else ""),
                  file=sys.stderr, flush=True)

    def __call__(self, fraction: float, message: str) -> None:
        if self.mode == "off":
            return
        if self.mode == "lines":
            self._line(fraction, message)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.description, file=sys.stderr, leave=True, dynamic_ncols=False,
                            ncols=80, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"
                            + ("{postfix}" if self.show_message else ""), mininterval=0.2)
        if self.show_message and message != self.message:
            self.message = message
            self.bar.set_postfix_str(message)
        elif not self.show_message and message.startswith("label ") and ": " in message:
            # several labels: the bar says which one ("propagating label 17 (5/39)")
            label = message.split(": ", 1)[0]
            if label != self.message:
                self.message = label
                self.bar.set_description_str(f"{self.description} {label}")
        target = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def ctrl_c_ignored(keep: bool = False, defer: bool = False):
    """Ctrl-C (and SIGTERM) is ignored inside: for moving finished files into place together (an
    interrupt between two renames would leave a new file beside an old one, after "nothing was
    written"). keep: it stays ignored after the block (a command's last step, when the process ends
    with the command). defer: a signal that comes meanwhile is raised once the block is done, for
    work that goes on after it (a batch's next cases: dropped, the batch ran every remaining case
    and exited 0). Outside the main thread, where Ctrl-C raises nothing, it changes nothing."""
    pending: list[int] = []

    def later(signum, frame):  # noqa: ARG001 - signal handler signature
        pending.append(signum)

    handler = later if defer else signal.SIG_IGN
    try:
        previous = signal.signal(signal.SIGINT, handler)
        previous_term, caught = signal.signal(signal.SIGTERM, handler), True
    except ValueError:  # not the main thread
        previous, previous_term, caught = None, None, False
    try:
        yield
    finally:
        if caught:
            if keep:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            else:
                signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_term is None else previous_term)
        if pending and not keep:  # also when the block failed (a move refused): the stop is what was asked
            raise Terminated() if signal.SIGTERM in pending else KeyboardInterrupt()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler stopping the run): handled as Ctrl-C is, so
    that temporaries are removed and nothing half-done is left (it ended the process at once, exit
    143 without a word, leaving hidden partial files in the output folder)."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


METHOD_HELP = ("what predicts the slices: pam (default; the network, fused with demons registration for the "
               "shipped weights), pam-memory (the network from the current guide, the drawn slice and the previous "
               "guide), track (demons registration slice to slice, no network) or copy (the drawn mask copied until "
               "the tissue inside it changes)")
PAM_ONLY_OPTIONS = ("registration_weight", "intensity_gate", "through_plane_mm", "walk")  # the network's options
WALK_HELP = ("pam: how the walk goes on from the drawn slices: 'published', the authors' (overlapping windows whose "
             "votes are united, a side ending only where a window's last slice is empty), or 'engine', ours (each "
             "slice predicted once, a side ending at its first empty slice) (default: the checkpoint's; engine for "
             "the shipped weights, published for the official checkpoint)")


def check_pam_only_options(args: argparse.Namespace) -> None:
    """Options of the network (``--method pam``) given with another method: one clear error."""
    for opt in PAM_ONLY_OPTIONS:
        if getattr(args, opt) is not None and args.method != "pam":
            raise InputError(f"--{opt.replace('_', '-')} is an option of --method pam, not {args.method}; drop it")


def check_server_options(args: argparse.Namespace) -> None:
    """``--server`` (propagate, batch): options that set up a local model are refused, the local
    device, threads and batch size noted as the server's to set; ``--token`` without it refused."""
    if args.server is not None and not args.server.strip():  # `--server "$GPU"` with the variable unset ran the job
        raise InputError("--server is empty (an unset variable?); give the server's address, e.g. "  # here, exit 0
                         "http://gpu-box:8765, or leave --server out to run here")
    if args.server is not None:
        from .remote import SERVER_METHODS

        given = [f"--{o.replace('_', '-')}" for o in ("checkpoint", *PAM_ONLY_OPTIONS)
                 if o != "intensity_gate" and getattr(args, o) is not None]  # the drift test is set per job
        if given:
            raise InputError(f"{given[0]} sets up a local model; with --server the server's model is used, drop it")
        if args.method not in SERVER_METHODS:
            raise InputError(f"--method {args.method} does not run on a server; use {', '.join(SERVER_METHODS[:-1])} "
                             f"or {SERVER_METHODS[-1]}")
        local = [o for o, used in (("--device", args.device != "cpu"), ("--threads", args.threads is not None),
                                   ("--batch-size", args.batch_size != 16)) if used]
        if local:  # the server's own settings decide (pamsegment serve --device/--threads/--batch-size)
            listed = local[0] if len(local) == 1 else f"{', '.join(local[:-1])} and {local[-1]}"
            print(f"note: {listed} {'is' if len(local) == 1 else 'are'} set by the server (pamsegment serve "
                  f"{' '.join(o + ' N' if o != '--device' else o + ' D' for o in local)}); ignored here", flush=True)
    elif args.token:
        raise InputError("--token is for --server; drop it")


def check_no_checkpoint_for_classical(args: argparse.Namespace) -> None:
    if args.checkpoint is not None and args.method in CLASSICAL_METHODS:
        raise InputError(f"--method {args.method} does not use a checkpoint; drop --checkpoint or use --method pam")
    note_network_only_options(args)


def note_network_only_options(args: argparse.Namespace) -> None:
    """A note when --device or --batch-size, the network's, are given with a classical method, which
    ignores them (--device cuda ran on a machine without CUDA, exit 0, without a word). With
    --server the server's settings note says it."""
    if args.method not in CLASSICAL_METHODS or getattr(args, "server", None):
        return
    given = [o for o, used in (("--device", getattr(args, "device", "cpu") != "cpu"),
                               ("--batch-size", getattr(args, "batch_size", 16) != 16)) if used]
    if given:
        print(f"note: {' and '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the network, "
              f"which --method {args.method} does not use (it runs on the processor); ignored", flush=True)


def read_case(image_path, prompt_path, output, resample: bool, note: Callable[[str], None],
              series: str | None = None, series_option: str | None = None, labels=None):
    """The image and its prompt (on the image's grid), checked against the output's format. What
    the readers warn about (which of several DICOM series was used, a NIfTI header with two
    different grids) goes to ``note``, also when a read fails: the note may explain the failure.
    ``series_option``: the option choosing another of the image's DICOM series, named in its note.
    ``labels``: the prompt labels to be propagated (a resampled prompt's notes leave others out)."""
    from .volumes import (SeriesChoiceWarning, check_geometry_fits, check_grids_from_headers, read_labelmap,
                          read_volume)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        from_image = None  # how many of the warnings came from reading the image
        try:
            if not resample:  # a prompt on another grid is refused before a large image is read
                check_grids_from_headers(image_path, prompt_path, resample_option="--resample-prompt")
            image = read_volume(image_path, series_uid=series)
            from_image = len(caught)
            check_geometry_fits(image.direction, output)
            prompt = read_labelmap(prompt_path, reference=image, resample=resample, resample_option="--resample-prompt",
                                   only_labels=labels, reference_path=image_path)
        finally:
            for n, w in enumerate(caught):
                if issubclass(w.category, UserWarning):
                    of_image = from_image is None or n < from_image
                    chooser = series_option and of_image and issubclass(w.category, SeriesChoiceWarning)
                    note(str(w.message) + (f" Choose another with {series_option}." if chooser else ""))
    return image, prompt


PROPAGATION_FIXED_BYTES = {True: 500 * 2**20, False: 200 * 2**20}  # the process with torch and a network / without
PROPAGATION_BYTES_PER_VOXEL = 6  # beyond the image's own: the prompt, the result, the masks of a label's walks
# An update (--previous/--edited) also holds the earlier result and the edited label map (1 byte a
# voxel each, held through the walks): a scale trial (session 40) measured 151 MB more than a fresh
# run from the same drawn slices on 512 x 512 x 300.
UPDATE_BYTES_PER_VOXEL = 2


def propagation_memory_bytes(shape, itemsize: int, axis: int, slices: dict, network: bool, update: bool = False) -> int:
    """The peak memory of propagating a volume of ``shape`` (``itemsize`` bytes a voxel) along
    ``axis`` from the drawn ``slices`` (per label; ``find_prompt_slices``), measured (session 33):
    the process (about 0.2 GB, 0.5 GB with torch and a network) + the image + 6 bytes a voxel
    (all told, int16, copy: 512 x 512 x 100 1 label 6.3 measured, 4 labels 8.2; a 186-slice object
    of 512 x 512 x 200 7.5; a 296-slice object drawn on 9 of 300 slices 5.8), and between two
    neighbouring drawn slices both walks' float32 probabilities until they are fused (8 bytes a
    voxel of the largest such gap: one gap is held at a time); an ``update`` also its two label maps
    (``UPDATE_BYTES_PER_VOXEL``), its ``slices`` being the update's own (the edits drawn slices too)."""
    import math

    voxels = math.prod(int(n) for n in shape)
    return PROPAGATION_FIXED_BYTES[bool(network)] + int(voxels * _bytes_per_voxel(shape, itemsize, axis, slices,
                                                                                  update))


def _bytes_per_voxel(shape, itemsize: int, axis: int, slices: dict, update: bool = False) -> float:
    """``propagation_memory_bytes`` per voxel of the volume, the fixed part aside."""
    from .checks import largest_gap

    gap = largest_gap(slices.values())
    return (int(itemsize) + PROPAGATION_BYTES_PER_VOXEL + (UPDATE_BYTES_PER_VOXEL if update else 0)
            + 8 * max(gap, 0) / max(int(shape[axis]), 1))


def check_propagation_memory(image, axis: int, slices: dict, method: str, skip: bool, what: str = "",
                             update: bool = False) -> None:
    """Refuse (``volumes.check_memory``) a propagation whose peak memory would not fit what this
    process may use, before the walks: it ended in a MemoryError after every slice was predicted
    (or in the system killing the process). ``update``: a correction run, ``slices`` its own drawn
    slices (``plan_update``'s prompt: the edited slices are drawn slices of the update)."""
    from .volumes import check_memory

    network = method.startswith("pam")
    need = propagation_memory_bytes(image.array.shape, image.array.dtype.itemsize, axis, slices, network, update)
    per_voxel = _bytes_per_voxel(image.array.shape, image.array.dtype.itemsize, axis, slices, update)
    size = " x ".join(str(n) for n in image.array.shape[::-1])

    def advice(limit: int) -> str:
        fits = (0.9 * limit - PROPAGATION_FIXED_BYTES[network]) / per_voxel
        return (f"Crop the volume around the object first (at most about {max(fits, 0) / 1e6:,.0f} million voxels "
                "fit; Slicer's Crop Volume module, or any tool) or resample it to coarser voxels")

    check_memory(need, f"propagating {what or 'this volume'} ({size} voxels of {image.array.dtype})", advice,
                 skip=skip)


def check_update_memory(image, plan, method: str, skip: bool, what: str = "") -> None:
    """``check_propagation_memory`` for an update (``plan_update``'s ``plan``), again once its edits are
    read: with the update's own drawn slices (the edits are drawn slices of it) and its two label
    maps. Checked on PROMPT's slices alone, a scale trial's updates with edits far from the drawing
    peaked 28-37 % above the figure (session 40)."""
    from .propagate import find_prompt_slices

    axis, drawn = find_prompt_slices(plan.prompt, axis=plan.axis, labels=plan.labels)
    check_propagation_memory(image, axis, drawn, method, skip, what, update=True)


def check_not_empty(*named) -> None:
    """Path arguments given as '' (an unset variable: `-o "$OUT"`) are refused: they were read as '.'
    (the working folder), where a batch then wrote its outputs and report. Each of ``named`` is
    (option, value) or (option, value, what it takes: "the output file"), the message's advice."""
    for option, value, *what in named:
        if value is not None and not str(value).strip():
            raise InputError(f"{option} is empty (an unset variable?); give {what[0] if what else 'a path'}")
    for option, value, *_ in named:  # `-o "res "`: a folder whose name ends in a space, unseen in the messages
        text = str(value) if value is not None else ""
        if text != text.strip() and not os.path.lexists(text):
            print(f"note: {option} {text!r} begins or ends with a space, and is used so", file=sys.stderr, flush=True)


def check_image_is_not_prompt(image, prompt, what: str = "IMAGE and PROMPT are") -> None:
    """The image given as its own prompt (the drawn slices came back alone, exit 0, no word)."""
    if _same_path(image, prompt):
        raise InputError(f"{what} the same file ({prompt}); give the scan and the label map drawn on it")


def cmd_propagate(args: argparse.Namespace) -> int:
    """Read IMAGE and PROMPT, propagate, write OUT on the image's grid, print a summary."""
    t0 = time.perf_counter()
    check_pam_only_options(args)
    args.empty_slices = walls_option(args.empty_slices)
    check_server_options(args)
    if (args.previous is None) != (args.edited is None):
        given, missing = ("--previous", "--edited") if args.edited is None else ("--edited", "--previous")
        raise InputError(f"{given} needs {missing}: give the earlier result (--previous) and your corrected copy "
                         "of it (--edited)")
    check_not_empty(("IMAGE", args.image, "the image (a file, or a DICOM series' folder)"),
                    ("PROMPT", args.prompt, "the prompt file"), ("-o", args.output, "the output file (a folder is no "
                    "output)"), ("--previous", args.previous, "the earlier result"),
                    ("--edited", args.edited, "your corrected copy of it"))
    check_image_is_not_prompt(args.image, args.prompt)
    if args.previous is not None:
        check_previous_is_not_prompt(args.previous, args.prompt)
    inputs = [args.image, args.prompt] + [a for a in (args.previous, args.edited) if a is not None]
    _check_output_path(args.output, inputs)
    if args.previous is not None:
        check_previous_is_not_edited(args.previous, args.edited)
    # Every run writes its record beside OUT; an update needs one (its next round reads it), a plain
    # run of a name too long for one goes without (a correction round then predicts every slice).
    with_record = check_keyframes_record_path(args.output, required=args.edited is not None)
    if with_record:
        check_record_replaceable(args.output)
    if args.report is not None:
        _check_report_path(args.report, [*inputs, args.output])

    from .volumes import check_output_path, through_link, write_labelmap

    check_no_checkpoint_for_classical(args)
    if args.checkpoint:  # before reading a possibly large image
        from .checkpoints import check_checkpoint_file

        check_checkpoint_file(args.checkpoint)
    if args.series is not None and not Path(args.image).is_dir():
        raise InputError(f"--series applies to a DICOM folder, but {args.image} is a file; drop it")
    image, prompt = read_case(args.image, args.prompt, args.output, args.resample_prompt,
                              note=lambda text: print(f"note: {text}", flush=True), series=args.series,
                              series_option="--series UID", labels=args.label)

    from .propagate import find_prompt_slices, propagate

    # Check the prompt before loading a network (which can take seconds for the official one).
    try:
        drawn_axis, drawn = find_prompt_slices(prompt.array, axis=args.axis, labels=args.label)
    except DrawnIn3D as exc:
        if args.previous is not None:
            raise
        # a result corrected by hand given as the prompt (a trial, session 45): the update is the way
        raise InputError(f"{exc}. If it is a result you corrected, update that result instead: give the prompt it was "
                         "propagated from, --previous that result and --edited your corrected copy") from None
    if not args.server:  # (a server's work is the server's memory)
        check_propagation_memory(image, drawn_axis, drawn, args.method, args.no_memory_check, Path(args.image).name)
    keyframes, empty_slices, axis, plan, earlier = prompt.array, args.empty_slices, args.axis, None, None
    slice_range = args.slice_range
    if args.edited is not None:
        plan, earlier = plan_update(image, prompt, args.previous, args.edited, axis=args.axis, labels=args.label,
                                    slice_range=args.slice_range, empty_slices=args.empty_slices,
                                    resample=args.resample_prompt, say=lambda text: print(text, flush=True))
        keyframes, empty_slices, axis = plan.prompt, plan.empty_slices, plan.axis
        slice_range = plan.slice_range  # the earlier run's range, from its record, unless --range was given
        if not args.server:
            check_update_memory(image, plan, args.method, args.no_memory_check, Path(args.image).name)
    if args.server:  # propagate checks the inputs here, then the server does the work
        from .remote import RemoteModel

        model = RemoteModel(args.server, token=args.token or os.environ.get("PAMSEGMENT_TOKEN"), method=args.method,
                            intensity_gate=args.intensity_gate)
    else:
        model = METHODS[args.method](args)

    with _ProgressBar("propagating", show_message=bool(args.server)) as bar:
        result = propagate(
            image.array,
            keyframes,
            image.spacing,
            model,
            axis=axis,
            labels=args.label if plan is None else plan.labels,
            range=slice_range,
            early_stop=not args.no_early_stop,
            empty_slices=empty_slices,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
            progress=bar,
            update=args.edited is not None,
            # walks the earlier run made that still hold are reused (a server runs it afresh; the client
            # then works out from it what the update changed: annotate_update)
            previous=earlier,
        )
    how = "--intensity-gate off"
    # OUT, its record and the --report table are written to temporaries beside them, then moved in
    # together (replace_together: a move that fails puts back those moved before it) and reported
    # with Ctrl-C ignored (left ignored when the process ends with this command): an interrupt once
    # OUT is in place would say "nothing was written".
    out = through_link(Path(args.output))
    ext = check_output_path(out, probe=False)  # OUT's format, for the temporary's name
    sidecar = keyframes_record_path(out) if with_record else None
    voxels = result.slice_voxels()  # once, for the table and the slices to check first
    from .volumes import empty_segments_of, plane_name, replace_together, seg_nrrd_segments

    segments = seg_nrrd_segments(args.prompt)
    empty = empty_segments_of(segments, result.slice_range, args.label)
    names = {lab: seg.get("Name") for lab, seg in segments.items() if seg.get("Name")}  # a .seg.nrrd's
    check = result.review_summary(voxels, names)
    files = []  # the table first, then the record, then OUT (as they are moved in)
    if args.report is not None:
        files.append((args.report, ".csv", lambda tmp: write_slice_report(result, tmp, voxels)))
    if sidecar is not None:
        files.append((sidecar, ".json", lambda tmp: _write_keyframes_record(tmp, result, plan)))
    files.append((args.output, ext, lambda tmp: write_labelmap(result.mask, image, tmp, segments=segments,
                                                               empty_segments=empty)))

    def report_written() -> None:
        wrote = [args.output] + ([args.report] if args.report is not None else []) + (
            [str(sidecar)] if sidecar is not None else [])
        listing = wrote[0] if len(wrote) == 1 else f"{', '.join(wrote[:-1])} and {wrote[-1]}"
        plane = plane_name(image.direction, result.axis)
        if len(result.slice_range) <= MANY_LABELS:
            print(f"wrote {listing}: {result.summary(plane, names)}; {time.perf_counter() - t0:.1f} s in all",
                  flush=True)
            if check:
                print(f"least confident slices, to check first: {check}", flush=True)
        else:  # one line per label (41 labels made a 1.3 KB summary line and a 1 KB "check first" one)
            print(f"wrote {listing}: {len(result.slice_range)} labels (axis {result.axis}, {plane} slices); "
                  f"{result.n_predicted} slices predicted in {result.timings.get('total', 0):.1f} s; "
                  f"{time.perf_counter() - t0:.1f} s in all; per label its slices and those to check first:",
                  flush=True)
            for lab, (a, b) in result.slice_range.items():
                name = segments.get(lab, {}).get("Name")
                first = result.review_first(lab, voxels=voxels)
                print(f"  label {lab}" + (f" ({name})" if name else "") + f": slices {a}-{b}"
                      + (f"; check {', '.join(map(str, first))}" if first else ""), flush=True)
        if plan is not None:
            for line in plan.changes(result.mask):
                print(f"changed beside your edits: {line}", flush=True)
            for line in _made_otherwise_notes(earlier, result):
                print(f"note: {line}", flush=True)
        for kind, note in result.kinds_of_notes(edited=None if plan is None else plan.users_own()):
            print(f"note: {note}" + (f" ({how})" if kind == "drift" else ""), flush=True)
        if sidecar is None:
            print(f"note: no record was written beside {args.output} (its name is too long for "
                  f"{KEYFRAMES_SUFFIX} to be added): a correction round from it predicts every slice", flush=True)

    replace_together(files, keep_ctrl_c_ignored=getattr(args, "_ends_process", False), after=report_written)
    from .volumes import say_leftovers

    say_leftovers([path for path, _, _ in files])
    return EXIT_OK


_METHOD_OF = {"PAMPredictor": "pam", "MemoryPAMPredictor": "pam-memory", "TrackPredictor": "track",
              "CopyPredictor": "copy"}


def _made_otherwise_notes(earlier, result) -> list[str]:
    """A correction round run with another method, or other settings (weights, registration
    weight, drift test), than the round it corrects predicts every slice again: its "changed
    beside your edits" lines then show what the method changed, not the edits (a run with
    --method track after pam listed nearly every slice, without a word why)."""
    if earlier is None:
        return []
    from .checks import state_to_json
    from .propagate import settings_kept

    if earlier.image_digest is not None and result.image_digest is not None \
            and earlier.image_digest != result.image_digest:  # (a helper's trial, session 42: no word of it)
        return ["the round you corrected ran on another image (or voxel size) than this one: every slice was "
                "predicted again, so the changes beside your edits include what the other image makes"]
    whats: dict[str, list[int]] = {}
    for lab, now in sorted(result.begin_state.items()):
        try:  # both as JSON holds them (a record read back gives tuples)
            before, now_json = state_to_json(earlier.begin_state.get(lab)), state_to_json(now)
        except TypeError:
            continue
        if not (isinstance(before, list) and len(before) == 3 and isinstance(now_json, list) and len(now_json) == 3):
            continue
        if before[0] != now_json[0]:
            what = (f"--method {_METHOD_OF.get(before[0], before[0])} and this one --method "
                    f"{_METHOD_OF.get(now_json[0], now_json[0])}")
        elif not settings_kept(before[2], now_json[2]):
            what = ("other settings than this one (other weights, registration weight or drift test, or the drawn "
                    "slice PAM begins from)")
        else:
            continue
        whats.setdefault(what, []).append(lab)
    lines = []  # one line for the labels that share it (41 labels made 41 lines)
    for what, labs in whats.items():
        who = f"label {labs[0]}" if len(labs) == 1 else f"labels {', '.join(map(str, labs[:-1]))} and {labs[-1]}"
        lines.append(f"{who}: the round you corrected ran {what}: every slice was predicted again, so the changes "
                     "beside your edits include what that difference makes")
    return lines


MANY_LABELS = 4  # more labels than this: the summary gives each its own line
KEYFRAMES_SUFFIX = ".keyframes.json"  # beside every OUT: its keyframes, walls and walks, for a correction round
_KEYFRAMES_FORMAT = "pamsegment-keyframes"


def keyframes_record_path(out: str | os.PathLike) -> Path:
    """Where a run's record sits beside its OUT: ``OUT.keyframes.json`` beside the file OUT is (a
    symbolic link's target, where writing OUT lands), for every writer and reader."""
    from .volumes import through_link

    at = through_link(Path(out))
    return at.with_name(at.name + KEYFRAMES_SUFFIX)


def check_keyframes_record_path(out: str | os.PathLike, required: bool = True) -> bool:
    """Before any work: whether OUT's record can be written beside it. A folder in its place is
    refused; a name too long for the record (OUT of 241-255 bytes) is refused when ``required`` (an
    update: its next round reads the record), else False (a plain run goes without one)."""
    from .volumes import check_name_length

    try:
        check_name_length(out, suffix=KEYFRAMES_SUFFIX, whose="the update's keyframes record")
    except InputError:
        if required:
            raise
        return False
    target = keyframes_record_path(out)
    if target.is_dir():
        raise InputError(f"{target} is a folder, where this run would write its record; move it away or choose "
                         "another OUT")
    return True


def check_record_replaceable(out: str | os.PathLike) -> None:
    """Before any work: OUT's record is not a protected file (chmod a-w: kept, as a protected OUT
    is; it was replaced), and, a link, one to a record (another ``*.keyframes.json``: a link planted
    at the record's name onto ~/.bashrc had it replaced by the record) whose folder takes it (it is
    written through)."""
    from .volumes import check_link_target, check_writable_output

    record = keyframes_record_path(out)
    check_writable_output(record, (KEYFRAMES_SUFFIX,))
    check_link_target(record)


def keyframes_record_exists(out: str | os.PathLike) -> bool:
    """Whether OUT has a keyframes record beside it. An OUT of 241-255 bytes is a legal name whose
    record name is not (ENAMETOOLONG): it cannot have one."""
    try:
        return keyframes_record_path(out).is_file()
    except OSError:
        return False


def check_previous_is_not_prompt(previous, prompt, where: str = "--previous is PROMPT itself") -> None:
    if _same_path(previous, prompt):
        raise InputError(f"{where}: give OUT, the result of the run from PROMPT, as the earlier result and your "
                         "corrected copy of it as the edited one")


def check_previous_is_not_edited(previous, edited, names=("--previous", "--edited"), again="with another -o") -> None:
    """The earlier result and its corrected copy must be two files: the same one (a result corrected
    in place) got advice to delete its record, then "nothing to update; correct the slices first"."""
    if _same_path(previous, edited):
        raise InputError(f"{names[0]} and {names[1]} are the same file: {names[0]} is the result as PAMSegment wrote "
                         f"it, {names[1]} your corrected copy of it. If you corrected the result in place, run the "
                         f"first propagation again {again} to get it back, and give that as {names[0]}")


def _label_digest(array) -> str:
    """sha256 of a label map's values (as 16-bit labels, slice by slice: the same map read from
    any format gives the same digest)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(str(tuple(array.shape)).encode())
    for plane in array:
        h.update(np.ascontiguousarray(plane, dtype="<u2").tobytes())
    return h.hexdigest()


def _result_keyframes(result) -> dict:
    """A plain run's keyframes and walls per label, as ``EditPlan.record()`` writes an update's."""
    from .propagate import _earlier_from_result

    return _earlier_from_result(result, result.axis)


def _write_keyframes_record(path: Path, result, plan=None) -> None:
    """OUT's record: its keyframes and walls per label (an update's ``plan.record()``, else the
    run's own), checked against OUT by a digest of its labels, and (version 2) what a later update
    needs to reuse the walks that still hold (``PropagationResult.to_record``)."""
    # (a result without an image digest, from a server before session 30, has nothing to reuse)
    reuse = result.to_record() if result.image_digest is not None and result.range is not None else None
    labels = plan.record() if plan is not None else _result_keyframes(result)
    record = {"format": _KEYFRAMES_FORMAT, "version": 2, "axis": int(result.axis), "shape": list(result.mask.shape),
              "sha256": _label_digest(result.mask), "labels": labels, "labels_sha256": _labels_part_digest(labels),
              "result": reuse,
              # the order the labels were propagated in (--label): where they overlap, earlier ones keep
              # the voxels, so an update runs them in the same order; and the range (--range), also for an
              # older server's result, which has no part to reuse
              "label_order": [int(lab) for lab in result.confidence],
              "range": None if result.range is None else [int(v) for v in result.range]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, allow_nan=False)


def _labels_part_digest(labels) -> str:
    """sha256 of a record's keyframes and walls (its ``labels`` part) as canonical JSON: the record's
    checksum covers OUT, not itself, and a keyframe moved by one slice by hand or by damage re-predicted
    an earlier correction without a word (session 38's trial)."""
    import hashlib

    text = json.dumps(labels, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _matching_record_kept_aside(path: Path, previous) -> Path | None:
    """The earlier record ``replace_together`` sets aside while it moves a run's files in
    (``.pamsegment-<id>-<n>.old.json`` beside ``path``), when one is left behind (the run was killed
    between the two moves: a new record beside the old output) and it matches ``previous``."""
    digest = None
    for kept in sorted(path.parent.glob(".pamsegment-*.old.json")):
        try:
            record = json.loads(kept.read_text(encoding="utf-8")) if kept.stat().st_size <= 64 * 2**20 else None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("format") == _KEYFRAMES_FORMAT \
                and record.get("shape") == list(previous.shape):
            digest = digest or _label_digest(previous)
            if record.get("sha256") == digest:
                return kept
    return None


class _RecordMismatch(InputError):
    """The record beside the earlier result describes another label map than that file holds."""


def _read_keyframes_record(path: Path, previous, option_axis, name: str = "--previous"):
    """The earlier rounds' keyframes beside the earlier result (``name``: what the user called it),
    checked against it: ({"label": {...}}, axis, its ``result`` part or None), keys as
    ``EditPlan.record()`` writes them; the result part (version 2) as stored, checked by
    ``PropagationResult.from_record`` when used."""
    import numpy as np

    where = f"{path} (the record of the run that wrote {name})"
    try:
        if path.stat().st_size > 64 * 2**20:
            raise ValueError("larger than 64 MB")
        record = json.loads(path.read_text(encoding="utf-8"))
        # whole numbers as ints: an axis of 0.0 (a JSON tool's re-save) passed `in (0, 1, 2)` and ended in a
        # TypeError traceback, which also stopped a batch's later rows
        ok = (isinstance(record, dict) and record.get("format") == _KEYFRAMES_FORMAT
              and type(record.get("version")) is int and record.get("version") in (1, 2)
              and type(record.get("axis")) is int and record.get("axis") in (0, 1, 2)
              and isinstance(record.get("labels"), dict))
        if not ok:
            raise ValueError("not a PAMSegment keyframes record")
        written = record.get("labels_sha256")  # (records before session 38 have none)
        if written is not None and written != _labels_part_digest(record["labels"]):
            raise ValueError("its keyframes and walls were changed since it was written (edited by hand, or damaged)")
        labels = {}
        for key, value in record["labels"].items():
            lists = [value.get(k) for k in ("keyframes", "walls")] + [value.get("corrected", [])] \
                if isinstance(value, dict) else [None]
            sha = value.get("drawn_sha256", {}) if isinstance(value, dict) else None
            if not (key.isascii() and key.isdigit()) or not all(isinstance(v, list) and all(
                    isinstance(s, int) and not isinstance(s, bool) for s in v) for v in lists) \
                    or not (isinstance(sha, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit()
                                                          and isinstance(d, str)
                                                          and 0 < len(d) <= 64 for k, d in sha.items())):
                raise ValueError(f"label {key!r} is malformed")
            labels[str(int(key))] = {"keyframes": lists[0], "walls": lists[1], "corrected": lists[2],
                                     "drawn_sha256": sha}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, TypeError, AttributeError) as exc:
        raise InputError(f"{where} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); delete it to keep only "
                         "the prompt's keyframes") from None
    if record.get("shape") != list(previous.shape) or record.get("sha256") != _label_digest(previous):
        kept = _matching_record_kept_aside(path, previous)
        if kept is not None:  # a run killed between moving its record and its output in (kill -9, power loss)
            raise InputError(f"{where} does not match {name}, but {kept.name} beside it, the record an interrupted "
                             f"run set aside, does: rename {kept.name} to {path.name} and run again")
        raise _RecordMismatch(f"{where} does not match {name}: {name} has changed since it was written, or the "
                              f"record was written for another result: give that update's unchanged output as {name} "
                              f"(and correct a copy of it), or delete {path.name} to keep only the prompt's keyframes")
    # Checked against the result it describes (its checksum matched): slices on its axis, labels it
    # can hold, no slice both a keyframe and a wall; hand-edited values were ignored before.
    n_slices = previous.shape[record["axis"]]

    def refuse(problem: str):
        return InputError(f"{where} cannot be read ({problem}); delete it to keep only the prompt's keyframes")

    for key, value in labels.items():
        if not 1 <= int(key) <= 65535:
            raise refuse(f"label {key} is outside 1-65535")
        for what in ("keyframes", "walls"):  # (a 6-million-entry list was checked entry by entry: 30 s)
            if len(value[what]) > n_slices:
                raise refuse(f"label {key} lists {len(value[what]):,} {what}, more than the {n_slices} slices")
        bad = next((s for s in value["keyframes"] + value["walls"] if not 0 <= s < n_slices), None)
        if bad is not None:
            raise refuse(f"label {key}'s slice {bad} is outside the {n_slices} slices along axis {record['axis']}")
        if set(value["keyframes"]) & set(value["walls"]):
            raise refuse(f"label {key} has slices that are both keyframes and walls")
        # a wall is a slice the run left empty for its label: one holding it in the result is no wall
        # (taken as one, such a slice silently became a keyframe of the update); a keyframe is a slice drawn
        # or corrected with the label, which the result holds exactly: one without it is a damaged record
        # (a keyframe moved by one slice re-predicted an earlier correction without a word)
        held = next((s for s in sorted(set(value["walls"]))
                     if (np.take(previous, s, axis=record["axis"]) == int(key)).any()), None)
        if held is not None:
            raise refuse(f"label {key}'s empty slice {held} holds that label in {name}")
        lacking = next((s for s in sorted(set(value["keyframes"]))
                        if not (np.take(previous, s, axis=record["axis"]) == int(key)).any()), None)
        if lacking is not None:
            raise refuse(f"label {key}'s keyframe {lacking} does not hold that label in {name}")
    if option_axis is not None and option_axis != record["axis"]:
        raise InputError(f"--axis {option_axis}, but the earlier rounds propagated along axis {record['axis']}: drop "
                         "--axis")
    # the order its labels were propagated in and its slice range (records before session 29 say neither)
    from .propagate import _whole_in

    order, lo_hi = record.get("label_order"), record.get("range")
    if order is not None and not (isinstance(order, list) and 0 < len(order) <= 65535
                                  and all(_whole_in(v, 1, 65535) for v in order) and len(set(order)) == len(order)):
        raise refuse("its label_order is not distinct labels from 1 to 65535")
    if lo_hi is not None and not (isinstance(lo_hi, list) and len(lo_hi) == 2
                                  and all(_whole_in(v, 0, n_slices - 1) for v in lo_hi) and lo_hi[0] <= lo_hi[1]):
        raise refuse(f"its range is not two slices within 0-{n_slices - 1}")
    return labels, record["axis"], record.get("result"), order, lo_hi


def _check_prompt_axis(prompt, axis: int, labels, name: str) -> None:
    """InputError when PROMPT is drawn across another axis than the one the run that made the
    earlier result walked along (its record's): it is not that run's prompt. Following the engine's
    own advice (--axis) then met "the earlier rounds propagated along axis B: drop --axis"."""
    from .propagate import find_prompt_slices

    try:
        find_prompt_slices(prompt, axis=axis, labels=labels)
        return  # drawn across that axis (or so it may be read: a line lies in two planes)
    except InputError:
        pass
    try:
        own, _ = find_prompt_slices(prompt, labels=labels)
    except InputError:
        return  # the update's own check names what is wrong with it
    if own != axis:
        what = "PROMPT" if name.startswith("--") else "the row's prompt"
        raise InputError(f"{what} is drawn across axis {own}, but {name} was propagated along axis {axis} (its record "
                         f"says so): give the prompt of the run that made {name}")


def plan_update(image, prompt, previous_path, edited_path, *, axis=None, labels=None, slice_range=None,
                empty_slices=None, resample: bool = False, say: Callable[[str], None] = print,
                names: tuple[str, str] = ("--previous", "--edited")):
    """--previous/--edited (and a batch row's previous/edited columns): read both on the image's
    grid and the keyframes an earlier update wrote beside ``previous_path``, and return the plan
    (``keyframes_from_edits``) with ``empty_slices`` among its walls, and the earlier run rebuilt from
    its record (``PropagationResult.from_record``; None without one) to pass as ``previous``. What
    it took goes to ``say`` (``update: ...`` lines and a ``note:`` for labels left out)."""
    from .checks import runs_text
    from .propagate import _whole_in, check_request, keyframes_from_edits
    from .volumes import read_labelmap

    maps, covered = [], None
    for option, path in zip(names, (previous_path, edited_path)):
        with warnings.catch_warnings(record=True) as caught:  # e.g. a cropped .seg.nrrd put back on the grid
            warnings.simplefilter("always", UserWarning)
            try:
                read = read_labelmap(path, reference=image, resample=resample, resample_option="--resample-prompt",
                                     role="result", coverage=option == names[1])
                maps.append(read.array)
                covered = read.covered  # (the edited file's, read last)
            except InputError as error:
                raise InputError(f"{option}: {error}") from None
            finally:
                for w in caught:
                    if issubclass(w.category, UserWarning):
                        say(f"note: {option}: {w.message}")
    import numpy as np

    earlier, no_record, stored, range_from_record, order_from_record = {}, None, None, False, False
    left_out: list[int] = []  # labels of the prompt the run being corrected did not propagate (its record)
    if keyframes_record_exists(previous_path):  # the earlier run's keyframes and walls, and its walks
        given_axis = axis
        try:
            earlier, axis, stored, recorded_order, top_range = _read_keyframes_record(
                keyframes_record_path(previous_path), maps[0], axis, names[0])
        except _RecordMismatch:
            if not np.array_equal(maps[0], maps[1]):
                raise
            # the result corrected in place and saved under a second name too: deleting the record
            # (the general advice) would only lead to "nothing to update"
            raise InputError(f"{names[0]} has changed since its record was written, and {names[1]} is the same "
                             f"label map: it looks like {Path(previous_path).name} was corrected in place. Run the "
                             f"earlier command again with another -o to get the result back, and give that as "
                             f"{names[0]} and your corrected file as {names[1]}") from None
        if labels is None and recorded_order:
            # as the range, the labels of the run being corrected and their order carry over (its
            # overlaps). A label of the prompt that run left out (--label 5 1 of labels 1, 2, 3, 5) is
            # left out again: added, the update was refused (the earlier result holds no label 2)
            in_prompt = [int(v) for v in np.unique(prompt.array) if v > 0]
            kept = [lab for lab in recorded_order if lab in in_prompt]
            if kept and kept != in_prompt:
                # (said as an order only when it is one: ascending, it may be a run without --label
                # whose prompt got a label since)
                labels, order_from_record = kept, kept != sorted(kept)
                left_out = [lab for lab in in_prompt if lab not in kept]
        recorded_range = top_range if top_range is not None else (
            stored.get("range") if isinstance(stored, dict) else None)
        n_axis = maps[0].shape[axis]
        if slice_range is None and isinstance(recorded_range, list) and len(recorded_range) == 2 \
                and all(_whole_in(v, 0, n_axis - 1) for v in recorded_range) \
                and recorded_range[0] <= recorded_range[1] and recorded_range != [0, n_axis - 1]:
            # As the axis, the range of the run being corrected carries over (forgotten, it let every
            # unedited label grow past it, without a word)
            slice_range, range_from_record = (int(recorded_range[0]), int(recorded_range[1])), True
        if given_axis is None:  # the axis is the record's: a prompt drawn across another is not that run's
            _check_prompt_axis(prompt.array, axis, labels, names[0])
    else:  # made by a version before records, or copied or moved without its record
        no_record = (f"note: {names[0]} has no record beside it ({keyframes_record_path(previous_path).name}, "
                     "which every run writes beside its output): every slice is predicted again, and if "
                     f"{Path(previous_path).name} came from an update, the corrections of its earlier rounds are too "
                     "(put the record beside it to keep them"
                     + (", and give again any --range, --label and --empty-slices of the run that made it)"
                        if names[0].startswith("--") else ")"))
    try:
        plan = keyframes_from_edits(prompt.array, maps[0], maps[1], axis=axis, labels=labels, earlier=earlier)
    except InputError as error:
        if no_record and "is not a result of this prompt" in str(error):  # (said after it, the hint came too late)
            raise InputError(f"{error}. {Path(previous_path).name} has no record beside it: if an earlier round "
                             "corrected that drawn slice, its record said so; put the record "
                             f"({keyframes_record_path(previous_path).name}) beside it") from None
        raise
    # batch has no --range: a case whose earlier run had one is widened on the command line
    widen = ("give --range to widen it" if names[0].startswith("--") else
             "run that case with pamsegment propagate and a wider --range")
    if slice_range is not None:
        lo, hi = slice_range
        for lab in plan.drawn:
            outside = [s for s in plan.edited[lab] if not lo <= s <= hi]
            if outside and range_from_record:
                raise InputError(f"label {lab} was edited on slice {outside[0]}, outside the range {lo}:{hi} the run "
                                 f"that made {Path(previous_path).name} was limited to (its record says so): "
                                 f"{widen}, or leave that slice as it was")
            if outside:
                raise InputError(f"label {lab} was edited on slice {outside[0]}, outside --range {lo}:{hi}; widen "
                                 "--range or leave that slice as it was")
    plan.slice_range = slice_range
    # --empty-slices are walls of this round too: the record for the next round keeps them
    if isinstance(empty_slices, dict):  # per label: one not propagated this round was dropped without a word
        unknown = sorted(set(empty_slices) - set(plan.empty_slices))
        if unknown:
            raise InputError(f"empty slices given for label {unknown[0]}, which is not among the labels propagated "
                             f"({', '.join(map(str, sorted(plan.empty_slices)))})")

    def given(lab):  # --empty-slices for every label, or per label
        return set(empty_slices.get(lab, ())) if isinstance(empty_slices, dict) else set(empty_slices or ())

    plan.empty_slices = {lab: sorted(set(w) | given(lab)) for lab, w in plan.empty_slices.items()}
    if range_from_record:  # --empty-slices outside the range the user did not give this time
        lo, hi = slice_range
        for lab in plan.empty_slices:
            out_of = sorted(s for s in given(lab) if not lo <= s <= hi)
            if out_of:
                raise InputError(f"empty slice {out_of[0]} lies outside slices {lo}-{hi}, the range the run that made "
                                 f"{Path(previous_path).name} was limited to (its record says so): {widen}")
    if slice_range is not None:  # the earlier rounds' own slices (the record's) outside the range, said as such
        lo, hi = slice_range
        record = f"from the record beside {Path(previous_path).name}"
        for lab in plan.empty_slices:
            rounds = earlier.get(str(lab), {"keyframes": [], "walls": []})
            walls = [s for s in rounds["walls"] if not lo <= s <= hi and s in plan.empty_slices[lab]
                     and s not in given(lab)]
            if walls:
                raise InputError(f"empty slice {walls[0]} lies outside the range {lo}:{hi} along axis {plan.axis} (it "
                                 f"is one of the earlier rounds' slices, {record}): widen the range to include it, or "
                                 "drop the range")
            keys = [s for s in rounds["keyframes"] if not lo <= s <= hi and s not in plan.drawn.get(lab, ())]
            if keys:
                raise InputError(f"label {lab}'s prompt slice {keys[0]} lies outside the range {lo}:{hi}; widen the "
                                 f"range to include it (a keyframe of an earlier round, {record}; or drop the range)")
    check_request(plan.prompt, plan.axis, labels, slice_range, plan.empty_slices, True)  # refused before it is said
    for line in plan.describe():
        say(f"update: {line}")
    for line in plan.notes(names[1]):
        say(f"note: {line}")
    if covered is not None:  # a cropped corrected file: what the earlier result holds beyond it is erased
        beyond = maps[0] != 0  # (1 byte a voxel, for an update from a cropped file only)
        if isinstance(covered, tuple):
            beyond[covered] = False
        else:
            beyond &= ~covered
        if beyond.any():
            held = sorted(int(v) for v in np.unique(maps[0][beyond]))
            rows = np.flatnonzero(beyond.any(axis=tuple(a for a in range(3) if a != plan.axis)))
            # an update: line, not a note: Slicer's every correction that erases an end is saved so (a re-review)
            say(f"update: {Path(edited_path).name} covers part of the image: label{'s' if len(held) > 1 else ''} "
                f"{', '.join(map(str, held))} of {Path(previous_path).name} beyond it (slices "
                f"{runs_text(rows.tolist())} along axis {plan.axis}) taken as erased, as Slicer saves a segmentation "
                "cropped to what it holds (give a file you cropped yourself uncropped)")
    if order_from_record:
        given_as = (f"--label {' '.join(map(str, labels))}, from its record" if names[0].startswith("--") else
                    "from its record")
        option = "--label" if names[0].startswith("--") else "a label column"
        say(f"update: labels in the order {', '.join(map(str, labels))}, as the run that made "
            f"{Path(previous_path).name} ({given_as}: where labels overlap, earlier ones keep the voxels; give "
            f"{option} to change it)")
    if left_out:
        several = len(left_out) > 1
        option = "--label" if names[0].startswith("--") else "a label column"
        say(f"note: the prompt's label{'s' if several else ''} {', '.join(map(str, left_out))} "
            f"{'are' if several else 'is'} not among the labels of the run that made {Path(previous_path).name} "
            f"({', '.join(map(str, labels))}, its record says: chosen with {option}, or drawn since): left out; "
            f"propagate {'them' if several else 'it'} in a run of {'their' if several else 'its'} own, or give "
            f"{option} to choose the labels")
    plan.labels = labels  # the labels and their order this update propagates (None: every label, ascending)
    if range_from_record:
        change = ("give --range to change it" if names[0].startswith("--") else
                  "run that case with pamsegment propagate and --range to change it")
        say(f"update: within slices {slice_range[0]}-{slice_range[1]} along axis {plan.axis}, as the run that made "
            f"{Path(previous_path).name} (--range {slice_range[0]}:{slice_range[1]}, from its record; {change})")
    if no_record:
        say(no_record)
    if labels is not None:  # labels of the earlier result left out by the choice: said, never lost unsaid
        left = sorted(int(v) for v in np.unique(prompt.array)
                      if v != 0 and int(v) not in plan.drawn and int(v) not in plan.ignored and (maps[0] == v).any())
        if left:
            option = "--label" if names[0].startswith("--") else "the label column"
            who = f"label{'s' if len(left) > 1 else ''} {', '.join(map(str, left))}"
            are, them = ("are", "them") if len(left) > 1 else ("is", "it")
            say(f"note: {who} of {Path(previous_path).name} {are} not among the labels chosen ({option}): left out "
                f"of the result; leave out {option} to keep {them} (labels you did not edit are reused, not "
                "predicted again)")
    # labels of the earlier result the prompt does not hold (another prompt than the earlier run's, or one of a
    # --range run's labels): left out of the result without a word before (a trial, session 47)
    in_prompt = {int(v) for v in np.unique(prompt.array)} - {0}
    gone = sorted(int(v) for v in np.unique(maps[0]) if v != 0 and int(v) not in in_prompt and int(v) not in
                  plan.ignored)
    if gone:
        who = f"label{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))}"
        are, them = ("are", "them") if len(gone) > 1 else ("is", "it")
        say(f"note: {who} of {Path(previous_path).name} {are} not in the prompt: left out of the result (was "
            f"{Path(previous_path).name} made from another prompt? Give the prompt it was made from to keep {them})")
    previous = None
    if stored is not None:  # the earlier run's walks: those whose keyframes are unchanged are reused
        from .propagate import PropagationResult

        try:
            previous = PropagationResult.from_record(maps[0], stored)
            said = {lab: (sorted(e["keyframes"]), sorted(e["walls"])) for lab, e in earlier.items()}
            walked = {lab: (e["keyframes"], e["walls"]) for lab, e in _result_keyframes(previous).items()}
            if any(said.get(lab, walks) != walks for lab, walks in walked.items()):
                raise ValueError("its walks' keyframes are not the record's")  # edited by hand: not vouched for
        except ValueError as exc:
            previous = None
            say(f"note: the record of {Path(previous_path).name} cannot tell which of its walks still hold "
                f"({str(exc)[:120]}): every slice is predicted again")
    if previous is not None:  # the slices earlier rounds drew: the user's word (no stray clicks; the thin note)
        previous.edited = {lab: sorted(set(v) - set(plan.edited.get(lab, ()))) for lab, v in plan.users_own().items()}
    return plan, previous


def keyframes_record_writer(result, plan=None) -> Callable[[Path], None]:
    """``write(tmp)`` of a run's record (``plan``: an update's), for ``volumes.replace_together``."""
    return lambda tmp: _write_keyframes_record(tmp, result, plan)


def _check_report_path(report: str, others: Sequence[str]) -> None:
    """Fail before any work if the --report table could not be written or would replace a file
    the command reads or writes."""
    from .volumes import check_folder_writable, check_link_target, check_name_length, check_writable_output

    target = Path(report)
    check_name_length(target)
    if target.suffix.lower() != ".csv" or target.stem in ("", "."):
        raise InputError(f"--report writes a CSV table: give it a file name ending in .csv (got {report!r})")
    for given in others:
        if _same_path(report, given):
            raise InputError(f"--report {report} is also {given}; choose another name for the table")
    if target.is_dir():
        raise InputError(f"--report {report} is a folder; give a file name ending in .csv")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"folder {parent} of --report does not exist; create it or choose another path")
    check_folder_writable(parent, "--report")
    check_link_target(target)
    # a protected table (chmod a-w) is kept, as a protected OUT is (it was replaced); a link, only onto a table
    check_writable_output(target, (".csv",))


def write_slice_report(result, path: str | os.PathLike, voxels=None) -> None:
    """``result.slice_table()`` as CSV (confidence with 3 decimals, blank on drawn slices);
    ``voxels``: ``result.slice_voxels()``, if already computed."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "slice", "voxels", "drawn", "confidence", "walk_end"])
        for r in result.slice_table(voxels):
            w.writerow([r["label"], r["slice"], r["voxels"], "yes" if r["drawn"] else "no",
                        "" if r["confidence"] is None else f"{r['confidence']:.3f}", r["walk_end"]])


# ----------------------------------------------------------------------------- info


def _provenance_text(provenance) -> str:
    """The checkpoint's provenance: for our training runs (a chain of stages through ``init_from``)
    one line per stage and the inference changes, the whole record being ``--json``'s (it was one
    line of kilobytes); anything else as one JSON line (keys of any type, escaped)."""
    if isinstance(provenance, dict) and ("init_from" in provenance or "command" in provenance):
        from .checks import shown
        from .checkpoints import training_chain

        stages = training_chain(provenance)
        lines = []
        start = stages[0].get("init_from") if stages else None
        cut = start == "..." or (isinstance(start, dict) and "..." in (start.get("provenance"), *start)) or any(
            k == "..." or v == "..." for st in stages for k, v in st.items())
        if cut:  # (_plain_provenance cut it: nested deeper than 32, or more values than it keeps)
            lines.append("\n  (the record was cut where it nests too deep or holds too many values: earlier "
                         "stages or their details may be missing)")
        for n, st in enumerate(stages, start=1):
            seconds = st.get("train_seconds")
            took = (f" in {seconds / 60:.0f} min" if isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                    and 0 <= seconds < 1e9 else "")
            iterations = st.get("iterations")
            if not isinstance(iterations, int) or isinstance(iterations, bool) or abs(iterations) >= 10**12:
                iterations = "?" if iterations is None else shown(iterations, 40)
            # a save made during a run (a partial checkpoint) is not a finished run: said (session 41)
            ended = st.get("stopped_by")  # (None: a periodic save, the run going on; killed or failed later)
            unfinished = (" (unfinished: a save made during the run" + (f", stopped by {shown(ended, 20)})" if ended
                                                                        else ")") if st.get("final") is False else "")
            lines.append(f"\n  stage {n}: {iterations} iterations{took}{unfinished}, git "
                         f"{str(st.get('git_revision', '?'))[:10]}: {str(st.get('command', '?'))[:300]}")
        changes = provenance.get("inference_changes")
        if isinstance(changes, list) and changes:
            lines.append(f"\n  inference parameters changed {len(changes)} time{'s' if len(changes) > 1 else ''} "
                         "after training (--json lists why)")
        return f"{len(stages)} training stage(s) (the whole record: pamsegment info --json)" + "".join(lines)
    try:
        text = json.dumps(provenance, sort_keys=True, default=str)
    except TypeError:  # keys of mixed types cannot be sorted
        text = json.dumps(provenance, default=str)
    # a record of thousands of values (up to PROVENANCE_ITEMS) was one line of up to 190 MB
    return text if len(text) <= 1000 else text[:1000] + f"... ({len(text):,} characters; pamsegment info --json)"


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="checkpoint file (.pt/.pth; default: $PAMSEGMENT_MODEL if set, else the shipped weights, "
                        "wherever they are installed)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def _format_network(cfg: dict) -> str:
    n, base, top = cfg["n_stages"], cfg["base_features"], cfg["max_features"]
    feats = [min(base * 2**i, top) for i in range(n)]
    return (f"{cfg['name']}: {cfg['input_size']} px input, {n} stages ({', '.join(map(str, feats))} features), "
            f"cross-attention at the {cfg['n_attention_stages']} deepest, "
            f"object-present head: {'yes' if cfg.get('presence_head') else 'no'}"
            + (", prior-mask input channel: yes" if cfg.get("mask_prior") else ""))


def cmd_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint is; a file that does not load is a CheckpointError (exit 2)."""
    from .checkpoints import default_checkpoint_path, describe_checkpoint

    path = args.checkpoint
    if path is None:  # the shipped weights: after `pip install` they are not under Resources/Models
        path = default_checkpoint_path()
        env = os.environ.get("PAMSEGMENT_MODEL")
        if env and (path is None or not _checkpoint_is_file(path)):
            raise CheckpointError(f"PAMSEGMENT_MODEL is set to {env}, which is not a file; point it at a checkpoint, "
                                  "unset it, or give a checkpoint file: pamsegment info CKPT")
        if path is None:
            raise CheckpointError("no default PAM weights are installed; give a checkpoint file: pamsegment info CKPT")
        if env and not args.json:  # as propagate says it: other weights than the shipped ones
            print(f"note: describing the weights PAMSEGMENT_MODEL names ({env})", flush=True)
    d = describe_checkpoint(path)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return EXIT_OK
    kind = {"official": "official (the PAM authors' published layout)",
            "pamsegment": "pamsegment (PAMSegment's own format)"}.get(d["kind"], d["kind"])
    pre = d["preprocessing"]
    lines = [
        f"file: {d['file']} ({d['size_mb']:.1f} MB)",
        f"kind: {kind}",
        f"network: {_format_network(d['network'])}",
        f"parameters: {d['parameters']:,} ({d['parameters'] / 1e6:.1f} M)",
        "preprocessing: " + ", ".join(f"{k}={v}" for k, v in pre.items()),
        "inference: " + ", ".join(f"{k}={v}" for k, v in d["inference"].items()),
        f"sha256 (weights): {d['sha256']}",
        f"settings digest: {d['settings']} (with the weights' sha256, how `pamsegment batch` reports name what made "
        "an output; command-line options that change the inference parameters change it)",
        "provenance: " + (_provenance_text(d["provenance"]) if d["provenance"] else "none recorded"),
        "loads: yes",
    ]
    print("\n".join(lines))
    return EXIT_OK


# ----------------------------------------------------------------------------- the command


SUBCOMMANDS: dict[str, Subcommand] = {
    "propagate": Subcommand("propagate a mask drawn on one slice through a 3D volume",
                            add_propagate_arguments, cmd_propagate),
    "batch": Subcommand("propagate every (image, prompt) pair of a CSV manifest; resumable, splittable",
                        "PAMSegmentLib.batch:add_batch_arguments", "PAMSegmentLib.batch:cmd_batch"),
    "serve": Subcommand("serve propagation over HTTP to other machines (Slicer, propagate --server)",
                        "PAMSegmentLib.server:add_serve_arguments", "PAMSegmentLib.server:cmd_serve"),
    "label-images": Subcommand("label a set of 2D images from one labelled image",
                               "PAMSegmentLib.imageset:add_label_images_arguments",
                               "PAMSegmentLib.imageset:cmd_label_images"),
    "label-cells": Subcommand("label every cell of a 2D image from a few outlined examples",
                              "PAMSegmentLib.cells:add_label_cells_arguments", "PAMSegmentLib.cells:cmd_label_cells"),
    "demo": Subcommand("propagate one-slice prompts on the bundled abdominal CT and report Dice",
                       "PAMSegmentLib.demo:add_demo_arguments", "PAMSegmentLib.demo:cmd_demo"),
    "info": Subcommand("describe a checkpoint and check that it loads", add_info_arguments, cmd_info),
    "benchmark": Subcommand("time the network, whole propagations and the Slicer path; write tables and a plot",
                            "PAMSegmentLib.benchmark:add_benchmark_arguments", "PAMSegmentLib.benchmark:cmd_benchmark"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong and where the help is), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {self.prog} --help)\n")  # one prefix for all errors


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: list[str], argv: list[str]):
    """Arguments the chosen subcommand does not take: one line from that subcommand's parser (its
    help named), with a hint where one helps: ``--empty-slices 1:20 2:4`` (the option takes one
    value), ``--labelled a.png a_mask.png b.png b_mask.png`` (one pair per option), or an option of
    another subcommand (``batch --axis``: an option of propagate)."""
    import re

    sub = parser._pam_subparsers[command]
    message = f"unrecognized arguments: {' '.join(extra)}"
    given_walls = any(a == "--empty-slices" or a.startswith("--empty-slices=") for a in argv)
    if given_walls and "--empty-slices" in sub._option_string_actions \
            and any(re.fullmatch(r"(\d+:)?\d[\d,-]*", a) for a in extra):
        message += ("; --empty-slices takes one value: repeat it for each label (--empty-slices 1:20 "
                    "--empty-slices 2:4)" if any(":" in a for a in extra) else
                    "; --empty-slices takes one value: its slices separated by commas without spaces "
                    "(--empty-slices 20-25,30-35)")
    elif "--labelled" in argv and "--labelled" in sub._option_string_actions and len(extra) % 2 == 0 \
            and all(not a.startswith("-") for a in extra):
        message += ("; --labelled takes one IMAGE MASK pair: repeat it for each pair (--labelled a.png a_mask.png "
                    "--labelled b.png b_mask.png)")
    else:
        options = [a.split("=", 1)[0] for a in extra if a.startswith("--")]
        if options:
            try:
                full = build_parser(None)._pam_subparsers
            except ImportError:  # a subcommand's module cannot be imported here: no hint, the line stands
                full = {}
            elsewhere = [name for name, p in full.items() if name != command and options[0] in p._option_string_actions]
            if elsewhere:
                names = elsewhere[0] if len(elsewhere) == 1 else f"{', '.join(elsewhere[:-1])} and {elsewhere[-1]}"
                message += (f"; {options[0]} is an option of {names}, not {command}"
                            + (": in a batch, give such a case its own run of propagate, or each label its own "
                               "row (its axis is then found from its drawing)"
                               if command == "batch" and "propagate" in elsewhere else ""))
    sub.error(message)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. Given ``argv``, only the subcommand named in it gets its arguments (so
    only that subcommand's module is imported); the others are listed with their help line."""
    chosen = None if argv is None else next((a for a in argv if a in SUBCOMMANDS), None)
    parser = _Parser(
        prog=PROG,
        description="PAMSegment: one annotated slice to a 3D segmentation with PAM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser._pam_subparsers = {}
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if argv is None or name == chosen:
            _resolve(spec.add_arguments)(p)
        p.set_defaults(_run=spec.run)
        parser._pam_subparsers[name] = p
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def memory_message(exc: BaseException, batch: bool = False, command: str | None = None) -> str:
    """One line for running out of memory: what ran out and what to do (``batch``: for one case of a
    manifest, whose options are the manifest's labels column; ``command``: the 2D commands have
    their own advice, not propagate's options)."""
    detail = f" ({_one_line(exc)[:120]})" if str(exc) else ""
    if command == "label-cells":
        from .cells import CELLS_BYTES_PER_PIXEL, cells_memory_bytes  # noqa: PLC0415

        return (f"not enough memory{detail}; nothing was written. Labelling cells needs about "
                f"{CELLS_BYTES_PER_PIXEL[1]} bytes per pixel of a grey image and {CELLS_BYTES_PER_PIXEL[3]} of a "
                f"colour one at its peak (a 10 000 x 10 000 grey region: about "
                f"{cells_memory_bytes(10_000, 10_000, 1, 1024) / 1e9:.0f} GB): crop the image to the region to label, "
                "close other programs, or use a machine with more memory")
    if command == "label-images":
        return (f"not enough memory{detail}; nothing was written. The whole set is held in memory (about 20 bytes "
                "per pixel of all its images): label fewer or smaller images per run, close other programs, or use "
                "a machine with more memory")
    limit = "fewer labels in the row's label column" if batch else "--range, --label"
    return (f"not enough memory{detail}; what was being computed was not written. A propagation needs about 0.2 GB "
            "(0.5 GB with a network) + the image + 6 bytes a voxel, and 8 more a voxel between two drawn slices "
            "(more with a large --batch-size for the official checkpoint): close other programs, limit the work "
            f"({limit}), crop the image, or use a machine with more memory")


_IMAGE_COMMANDS = {"propagate", "batch", "demo", "label-images", "label-cells", "serve"}

# Options whose values may be written with a leading '-' by mistake (--range -1:5): argparse took
# such a value for an option and said only "expected one argument"; joined as --range=-1:5, the
# option's own check says what is wrong with it.
_SIGNED_VALUE_OPTIONS = ("--range", "--shard", "--empty-slices")


def _joined_negative_values(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":  # positional arguments follow
            return out + argv[i:]
        if argv[i] in _SIGNED_VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"^-\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _ending(ends_process: bool) -> None:
    """A run stopped by Ctrl-C or SIGTERM ends: where the process ends with it, a second Ctrl-C (a
    key pressed twice) is ignored from here, not raised in the middle of the message (a trial,
    session 48: a traceback, and the process killed by the signal instead of exit 130)."""
    if ends_process:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def main(argv: Sequence[str] | None = None, ends_process: bool = False, defaults: dict | None = None) -> int:
    """Run ``pamsegment`` with ``argv`` (default: sys.argv[1:]); returns the exit status.
    ends_process: the process ends when this returns (``__main__.run``), so a command may leave
    Ctrl-C ignored once its output is in place. defaults: attributes set on the parsed arguments
    (a script's own defaults, e.g. scripts/benchmark.py's tables folder)."""
    if ends_process:  # the process is this command's: SIGTERM stops it as Ctrl-C does (serve sets its own)
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread
            pass
    args = None  # (what ran, for the out-of-memory advice)
    try:  # also around the parser: building it imports the chosen subcommand's module
        argv = _joined_negative_values(list(sys.argv[1:] if argv is None else argv))
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)  # usage errors exit 2 through argparse
        if extra:
            _unrecognized(parser, args.command, extra, argv)
        args._ends_process = ends_process
        for name, value in (defaults or {}).items():
            setattr(args, name, value)
        if ends_process and args.command in _IMAGE_COMMANDS:
            # scipy's OpenBLAS loaded while memory is still free: loaded after a large image was read
            # under `ulimit -v`, it retried its buffer for good, deaf to SIGTERM, even with one thread
            # (a re-review, session 33)
            import scipy.ndimage  # noqa: F401
        return int(_resolve(args._run)(args) or EXIT_OK)
    except Terminated:
        _ending(ends_process)
        print(f"{PROG}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return EXIT_TERMINATED
    except (PropagationCancelled, KeyboardInterrupt):
        _ending(ends_process)
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PAMError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:  # numpy's "Unable to allocate 1.32 GiB" (a traceback and exit 1 before)
        print(f"{PROG}: error: {memory_message(exc, command=getattr(args, 'command', None))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout went to a reader that stopped early (`pamsegment info | head -1`): a traceback and exit 1
        # before, also after propagate had written OUT. What was written stays; the rest of the printing
        # goes nowhere (the Python docs' "Note on SIGPIPE": else the interpreter's last flush fails again).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except (OSError, RuntimeError) as exc:
        if out_of_memory(exc):  # torch's "DefaultCPUAllocator: can't allocate memory", ITK's allocation failure
            print(f"{PROG}: error: {memory_message(exc, command=getattr(args, 'command', None))}", file=sys.stderr)
            return EXIT_USAGE
        # Paths no check foresaw: a name too long for the file system, a loop of symbolic links
        # (Python 3.11's Path.resolve raises RuntimeError for it, later versions OSError).
        import errno

        loop = isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop")
        if not (loop or (isinstance(exc, OSError) and exc.errno in (errno.ENAMETOOLONG, errno.ELOOP))):
            raise
        where = str(exc).removeprefix("Symlink loop from ").strip("'\"") if loop else (exc.filename or exc)
        what = ("is a loop of symbolic links" if loop or getattr(exc, "errno", None) == errno.ELOOP
                else "holds a name too long for the file system")
        print(f"{PROG}: error: {where} {what}; give another path", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        # A torch-less install (the README's client for a server): the network cannot run here.
        print(f"{PROG}: error: PAM's network needs PyTorch, which is not installed: pip install torch (see the "
              "README's Quick start); without it, --method track or copy, or --server URL (a machine running "
              "pamsegment serve), still work", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # (python -m PAMSegmentLib.cli: as python -m PAMSegmentLib, which the README gives)
    from .__main__ import run

    sys.exit(run())
