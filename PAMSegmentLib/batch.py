"""``pamsegment batch``: propagate many (image, prompt) pairs listed in a manifest, loading the
model once, going on past cases that fail, and able to resume and to split the work between
machines.

The manifest is a CSV file with a header row and the columns ``image``, ``prompt`` and, optionally,
``output`` (default ``<output folder>/<image path>_pam.nii.gz``, the image's path as the manifest
gives it with folders joined by ``_``: ``p01/ct.nii.gz`` -> ``p01_ct_pam.nii.gz``), ``label``
(prompt labels to propagate, separated by spaces; default all) and ``series`` (for an image that is
a DICOM folder holding several series: the SeriesInstanceUID to read; default the series with the
most files), and ``previous`` with ``edited`` (an earlier result of the row's prompt and a copy of it
corrected by hand: the row is updated from the corrections, as ``propagate --previous --edited``
does, and its output gets ``<output>.keyframes.json`` for the next round). Relative paths are read from the manifest's folder. Every row is checked before any
work (files exist, series are in their DICOM folders, outputs are writable and unique), so a typo
in row 37 does not surface after an hour. Rows are numbered by the file's lines, as a spreadsheet
numbers them: the header is row 1, the first case usually row 2. Each output is written atomically
when its case is done; ``batch_report.csv`` in the output folder records per row ``ok``, ``error``
(with the one-line message, after what reading the case noted), ``skipped`` (``--skip-existing``:
the output exists; the row keeps the seconds, slices, check_first and message that the earlier
report in the folder gave the case, unless the output is newer than that report or that report has
it from another image or prompt; a row whose inputs are not what its output was made from, by the
fingerprints the report's ``inputs`` column keeps, runs again) or ``not run`` (interrupted), with
absolute paths, and is
rewritten after every case, so it is current even when the run is cut. A rewrite that fails once
the work has started (the file open in a spreadsheet that locks it) is a warning, given once, and
the batch goes on, writing it again after the next case and at the end (exit status 2 if it still
cannot be written then).

``--shard K/N`` runs the manifest's cases K, K+N, K+2N ... (counting cases from 1, not lines):
N machines given the same manifest and output folder each take their share and write their own
``batch_report.shardK-of-N.csv``.

``--server URL`` runs every case on a ``pamsegment serve`` server (its model, device and settings):
cases are read and checked here and uploaded one at a time; a full queue (other users) is waited
out, up to an hour per case; a server that cannot be reached stops the batch (every later case
would fail the same way), leaving the rest ``not run`` for ``--skip-existing``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .checks import shown
from .errors import InputError, PAMError, PropagationCancelled

__all__ = ["BatchRow", "read_manifest", "parse_shard", "add_batch_arguments", "cmd_batch"]

COLUMNS = ("image", "prompt", "output", "label", "series", "previous", "edited")
COLUMNS_TEXT = "image,prompt[,output][,label][,series][,previous,edited]"
REPORT_NAME = re.compile(r"batch_report(\.shard\d+-of-\d+)?\.csv")
SKIPPED = "output exists (--skip-existing)"
BUSY_WAIT_SECONDS = 3600.0  # with --server, a full queue is waited out this long per case
CARRIED = "done in an earlier run (--skip-existing)"  # a skipped row's columns are from the report of that run
REPORT_FIELDS = ("row", "image", "prompt", "output", "status", "seconds", "slices", "check_first", "message", "method",
                 "manifest", "output_in_folder", "inputs")


@dataclass
class BatchRow:
    number: int  # the manifest's line the row is on (the header is row 1), as a spreadsheet numbers it
    image: Path
    prompt: Path
    output: Path
    labels: list[int] | None = None
    series: str | None = None  # the SeriesInstanceUID to read from a DICOM folder (default: the largest series)
    previous: Path | None = None  # with ``edited``: an earlier result of the prompt and its corrected copy
    edited: Path | None = None
    status: str = "not run"
    message: str = ""
    seconds: float = 0.0
    slices: str = ""
    check_first: str = ""  # per label, its least confident predicted slices (PropagationResult.review_first)
    method: str = ""  # what made the output: --method, with the checkpoint for pam (``made_with``)
    rerun: str = ""  # why --skip-existing runs an existing output again (the first note of its message)
    inputs: str = ""  # what its output was made from (``_fingerprints``), for a later --skip-existing
    reading: str = ""  # the inputs' fingerprints as this run reads them (``inputs`` once its output is in)
    notes: list[str] = field(default_factory=list)  # what reading the case noted (e.g. which DICOM series)
    info: list[str] = field(default_factory=list)  # an update's "update:" and "changed beside the edits:" lines
    noted: str = ""  # a finished case's notes (not ``info``), printed and counted in the summary
    written: bool = False  # its output and record are in place (an interrupt after that: the row is done)
    _paths: tuple[str, str, str] | None = field(default=None, repr=False, compare=False)

    def absolute(self) -> tuple[str, str, str]:
        """The image, prompt and output from the root, as the report names them; resolved once
        (the report is rewritten after every case, and resolving is a file-system walk)."""
        if self._paths is None:
            self._paths = (str(_absolute(self.image)), str(_absolute(self.prompt)), str(_absolute(self.output)))
        return self._paths


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) -> (K, N)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"K/N expected (e.g. 2/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def _labels(text: str, where: str) -> list[int] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:  # (pandas writes a label column with empty cells as floats: 2.0)
        out = [int(float(v)) if re.fullmatch(r"\d+\.0*", v) else int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{where}: label must be whole numbers separated by spaces, got {text!r}") from None
    if any(not 1 <= v <= 65535 for v in out):
        raise InputError(f"{where}: labels must be 1-65535, got {text!r}")
    return out


def _default_name(image: str, resolved: Path) -> str:
    """``p01/ct.nii.gz`` -> ``p01_ct``: the image's path as the manifest gives it, without its
    extension, folders joined by ``_`` (patients often keep same-named files in their own folders).
    A path without a name of its own (``.``, ``..``: a DICOM folder holding the manifest) gives the
    name of the folder it is, ``resolved``."""
    from .volumes import without_extension

    parts = [q for q in Path(image).parts if q not in ("/", "..", ".", "~")]
    if not parts:
        name = resolved.resolve().name
        if not name:  # the root folder
            raise InputError(f"cannot name an output after the image {image!r}; give this row an output")
        return name
    last = without_extension(parts[-1], (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd"))
    return "_".join([*parts[:-1], last])


def _called(path: Path) -> str:
    """The manifest's name in messages: its file name, "stdin" for /dev/stdin, and for a pipe of the
    shell's (``<(grep ... all.csv)``: /dev/fd/63) "the piped manifest", not "63" (a trial, session 47)."""
    if path.name.isdigit() and str(path.parent) in ("/dev/fd", "/proc/self/fd") or str(path.parent).startswith(
            "/proc/") and path.parent.name == "fd":
        return "the piped manifest"
    return path.name


def _manifest_text(path: Path) -> tuple[str, bool]:
    """The manifest's text: UTF-8 (with or without the byte-order mark Excel's "CSV UTF-8" writes)
    or UTF-16 with its byte-order mark (Excel's "Unicode Text"); a workbook or another encoding is
    named, with the line of the first byte that is not UTF-8. Returns (text, whether it was UTF-16)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read manifest {path} ({error.strerror or error})") from None
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):  # .xlsx / .ods (zip), .xls (OLE)
        raise InputError(f"{_called(path)} is a spreadsheet workbook, not a CSV file: save it as CSV (in Excel: File > "
                         "Save As > CSV UTF-8 (Comma delimited)) and give that")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), True
        except UnicodeDecodeError:
            raise InputError(f"cannot read {_called(path)}: it starts as UTF-16 text but is damaged; save it as CSV "
                             "UTF-8") from None
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"cannot read {_called(path)} as a CSV file: line {line} holds a character that is not UTF-8 "
                         f"(byte 0x{data[error.start]:02x}; Excel's plain \"CSV (Comma delimited)\" writes accents "
                         "in another encoding): save it as \"CSV UTF-8 (Comma delimited)\"") from None


def _other_unicode_form(p: Path) -> Path | None:
    """``p`` with its name's accents in the other Unicode form (NFC / NFD) where only that exists."""
    import unicodedata

    for form in ("NFC", "NFD"):
        other = Path(unicodedata.normalize(form, str(p)))
        if other != p:
            try:
                if other.exists():
                    return other
            except OSError:
                return None
    return None


def _read_records(path: Path) -> list[tuple[int, list[str]]]:
    """The manifest's records as (the file line each starts on, its fields)."""
    import io

    text, utf16 = _manifest_text(path)
    header = next((line for line in text.splitlines() if line.strip()), "")
    # Excel's "Unicode Text" (UTF-16, the README says it is read) separates its columns with tabs: read with
    # commas, its header was one unknown column (a trial, session 47)
    utf16_tabs = utf16 and "\t" in header  # (commas in its cells are theirs)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if utf16_tabs else ",")
    records, line = [], 1
    try:
        for fields in reader:
            records.append((line, fields))
            line = reader.line_num + 1  # a quoted field may span lines
    except csv.Error as error:
        raise InputError(f"cannot read {_called(path)} as a CSV file (line {reader.line_num}: {error})") from None
    return records


def read_manifest(path: str | Path, out_dir: str | Path) -> list[BatchRow]:
    """The manifest's rows, every one checked (InputError naming the row for the first problem).
    A row's number is the line of the file it is on (the header is row 1), as a spreadsheet
    numbers it."""
    from .volumes import _series_label, _write_extension, check_name_length, dicom_series_ids

    path = Path(path)
    if path.is_dir():
        raise InputError(f"manifest {path} is a folder; give the CSV file that lists the cases")
    if not path.exists():
        stdin = " (to read it from a pipe, give /dev/stdin)" if str(path) == "-" else ""
        raise InputError(f"manifest {path} does not exist{stdin}; give a CSV file with columns {COLUMNS_TEXT}")
    # relative paths from the manifest's folder; from the working folder for a pipe (<(grep ... all.csv), which
    # was told it does not exist)
    piped = not path.is_file() or str(path).startswith(("/dev/", "/proc/"))  # (/dev/stdin < m.csv is a file)
    base, out_dir = (Path.cwd() if piped else path.parent), Path(out_dir)
    records = _read_records(path)
    while records and not any(f.strip() for f in records[0][1]):  # blank lines before the header
        records.pop(0)
    first = records[0][1] if records else []
    if first and first[0].strip().lower().startswith("sep=") and not any(f.strip() for f in first[1:]):
        records.pop(0)  # Excel's "sep=," line, which names the separator before the header
    if not records:  # (an empty file or /dev/null: "null has no image or prompt column (found: nothing)")
        raise InputError(f"manifest {path} is empty; give a CSV file whose first line names the columns "
                         f"{COLUMNS_TEXT}")
    header = records.pop(0)[1]
    fields = [f.strip().lower() for f in header]
    unknown = [f for f in fields if f and f not in COLUMNS]
    if unknown:
        hint = " (did you mean label?)" if "labels" in unknown else ""
        if any("/" in f or "\\" in f or f.endswith((".gz", ".nrrd", ".mha", ".nii", ".dcm")) for f in unknown):
            hint += " (it looks like a path: the first line must be the header naming the columns)"
        other = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs"))
                      if any(sep in f for f in fields)), None)
        raise InputError(f"{_called(path)} has a column {shown(unknown[0], 80)} this command does not know{hint}; the "
                         f"columns are {COLUMNS_TEXT}" + (f"; separate them with commas, not {other}" if other else ""))
    twice = next((f for n, f in enumerate(fields) if f and f in fields[:n]), None)
    if twice:
        raise InputError(f"{_called(path)} has the column {twice} twice; keep one")
    missing = [c for c in ("image", "prompt") if c not in fields]
    if missing:
        raise InputError(f"{_called(path)} has no {' or '.join(missing)} column; its header must name {COLUMNS_TEXT} "
                         "(found: " + (", ".join(f for f in fields if f) or "nothing") + ")")
    # A column without a name (a trailing comma, as spreadsheets export) is ignored while it is empty.
    for line, values in records:
        if any("\n" in v or "\r" in v for v in values):  # paths hold no line breaks: a quote left open
            raise InputError(f"{_called(path)} row {line}: a field runs over several lines: a double quote (\") opened "
                             "there is not closed, or a cell holds a line break (Alt+Enter in Excel); close the "
                             "quote or remove the line break")
        if any(v.strip() for v in values[len(fields):]):
            extra = [v.strip() for v in values[len(fields) - 1:] if v.strip()]
            labels_split = "label" in fields and fields[-1] == "label" and all(v.isdigit() for v in extra)
            raise InputError(f"{_called(path)} row {line} has more fields than the header; " + (
                'separate several labels with spaces ("2 4"), not commas' if labels_split else
                'put paths that contain commas in double quotes ("a,b.nii.gz")'))
        unnamed = next((n for n, v in enumerate(values[:len(fields)]) if not fields[n] and v.strip()), None)
        if unnamed is not None:
            raise InputError(f"{_called(path)}: column {unnamed + 1} has no name in the header but row {line} fills "
                             f"it; name it ({COLUMNS_TEXT}) or remove it")
    # {resolved output, lower case: (its row, what it names)}, {row: that key}
    rows, outputs, outputs_key = [], {}, {}
    series_in: dict[str, list[str]] = {}  # {DICOM folder: its series}, read once per folder
    for line, values in records:
        rec = {f: v.strip() for f, v in zip(fields, values) if f}
        if not any(rec.values()):
            continue  # blank line
        where = f"{_called(path)} row {line}"
        if [v.strip().lower() for v in values[:len(fields)]] == fields:  # two manifests joined with cat
            raise InputError(f"{where} repeats the header (two manifests joined?); remove it")

        def resolve(value: str, what: str) -> Path:
            windows = os.name != "nt" and ("\\" in value or re.match(r"^[A-Za-z]:[\\/]", value))
            odd = not value.isprintable()
            if (windows or odd) and what != "output":  # (one more stat, only for such names)
                try:  # a name that exists as written is taken as it is (a POSIX name may hold a backslash)
                    there = (base / Path(value).expanduser()).exists()
                except (OSError, RuntimeError):
                    there = False
                windows, odd = windows and not there, odd and not there
            if windows:
                # a manifest made on Windows: an output was written as one file named "res\p01.nii.gz", exit 0
                raise InputError(f"{where}: {what} {value[:120]} is a Windows path; on this system write it "
                                 "with / (relative to the manifest's folder, e.g. res/p01.nii.gz, or absolute)")
            elif odd:
                raise InputError(f"{where}: {what} {ascii(value)[:160]} holds invisible or control characters; "
                                 "remove them")
            try:
                p = Path(value).expanduser()
            except RuntimeError:  # ~name of no such user
                raise InputError(f"{where}: {value}: no such user's home folder") from None
            return p if p.is_absolute() else base / p

        if not rec.get("image") or not rec.get("prompt"):
            raise InputError(f"{where}: image and prompt are both needed")
        image, prompt = resolve(rec["image"], "image"), resolve(rec["prompt"], "prompt")
        from .cli import check_image_is_not_prompt

        check_image_is_not_prompt(image, prompt, f"{where}: its image and prompt are")
        if bool(rec.get("previous")) != bool(rec.get("edited")):
            raise InputError(f"{where}: previous and edited go together (an earlier result and your corrected copy "
                             "of it); fill both or neither")
        previous = resolve(rec["previous"], "previous") if rec.get("previous") else None
        edited = resolve(rec["edited"], "edited") if rec.get("edited") else None
        for what, p in (("image", image), ("prompt", prompt), ("previous", previous), ("edited", edited)):
            try:
                found = p is None or p.exists()
            except OSError as error:  # a name over the system's limit: without the row before
                raise InputError(f"{where}: {what} {shown(str(p), 120)}: {error.strerror or error}") from None
            if not found:
                given = rec.get(what, "")
                other = _other_unicode_form(p)
                if other is not None:  # pasted from macOS (decomposed accents) onto Linux (composed), or back
                    raise InputError(f"{where}: {what} {p} does not exist as written, but {other} does (the same "
                                     "name with its accents encoded the other way, as macOS and Linux differ): "
                                     "copy the name from the file itself")
                # written from the working folder rather than the manifest's (a trial, session 36)
                here = (f" (relative paths are read from the manifest's folder, {base}; {given} exists from the "
                        "current folder: write it relative to the manifest's folder, or absolute)"
                        if given and not Path(given).is_absolute() and Path(given).exists() else "")
                raise InputError(f"{where}: {what} {p} does not exist{here}")
        if previous is not None:
            from .cli import check_previous_is_not_edited, check_previous_is_not_prompt

            check_previous_is_not_prompt(previous, prompt, f"{where}: previous is the row's prompt itself")
            try:
                check_previous_is_not_edited(previous, edited, ("previous", "edited"), "to another output")
            except InputError as error:
                raise InputError(f"{where}: {error}") from None
        if rec.get("series"):
            if not image.is_dir():
                raise InputError(f"{where}: series applies to a DICOM folder, but {image} is a file; leave it empty")
            if str(image) not in series_in:
                series_in[str(image)] = dicom_series_ids(image)
            ids = series_in[str(image)]
            if rec["series"] not in ids:
                raise InputError(f"{where}: series {rec['series']} is not in {image}; "
                                 + (f"available series: {', '.join(_series_label(i) for i in ids)}" if ids
                                    else "it holds no DICOM series")
                                 + ("; files without a SeriesInstanceUID cannot be chosen in a manifest (its empty "
                                    "series cell reads the largest series): give them a folder of their own"
                                    if any(not i.strip() for i in ids) else ""))
        output = resolve(rec["output"], "output") if rec.get("output") else None  # (its refusals name the row)
        try:
            output = output or out_dir / f"{_default_name(rec['image'], image)}_pam.nii.gz"
            try:
                check_name_length(output)
            except InputError as error:  # default names join every folder of the image's path
                if rec.get("output"):
                    raise
                raise InputError(f"{error} (this default name joins the folders of the image's path: give the row "
                                 "an output)") from None
            if output.is_dir():
                raise InputError(f"the output {output} is a folder; give a file name")
            _write_extension(output)
            from .cli import check_keyframes_record_path

            # an update's next round reads its record; a plain case of a name too long for one goes without
            check_keyframes_record_path(output, required=edited is not None)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        labels = _labels(rec.get("label", ""), where)
        # (image, prompt, output resolved; the label set, None for every label; the series): what tells
        # a repeated row from two rows of one scan
        this = (str(image.resolve()), str(prompt.resolve()), str(output.resolve()),
                None if labels is None else frozenset(labels), rec.get("series", ""))
        key = this[2].lower()  # by case too: P01_ct and p01_ct are one file on macOS and Windows
        if key in outputs:
            first, before = outputs[key]
            same_image = before[2] == this[2] and before[0] == this[0]
            if same_image and before[1:] == this[1:]:
                raise InputError(f"{where} repeats row {first} (the same image, prompt, output, labels and series); "
                                 "remove one")
            if same_image and not rec.get("output"):  # (a trial, session 36: said only of names that differ in case)
                # two labels of one prompt go in one row; two series of one folder, or two prompts, need names
                one_row = before[1] == this[1] and before[4] == this[4]
                every = one_row and None in (before[3], this[3])  # a row without labels takes every label
                hint = (f", or drop row {line if this[3] is not None else first}: a row without a label column takes "
                        "every label of its prompt" if every else
                        ", or list both rows' labels in one row's label column (1 2)" if one_row else "")
                raise InputError(f"{where}: its image is row {first}'s too, so it gets the same default output "
                                 f"name ({output.name}); give the rows output names (an output column){hint}")
            case = "" if before[2] == this[2] else " (names that differ only in case are one file on macOS and Windows)"
            raise InputError(f"{where}: output {output} is also row {first}'s{case}; give each row its own output")
        outputs[key], outputs_key[line] = (line, this), key
        rows.append(BatchRow(line, image, prompt, output, labels,
                             series=rec.get("series") or None, previous=previous, edited=edited))
    if not rows:
        raise InputError(f"{_called(path)} lists no cases")
    # No output may be any row's input: writing it would replace a scan or prompt another row reads.
    inputs = {str(path.resolve()).lower(): (0, path)} if path.is_file() else {}  # (0: the manifest itself)
    for r in rows:
        for p in (r.image, r.prompt, r.previous, r.edited):
            if p is not None:
                inputs.setdefault(str(p.resolve()).lower(), (r.number, p))
    manifest_key = str(path.resolve()).lower() if not piped else None
    for r in rows:
        record = str(r.output.resolve()).lower() + ".keyframes.json"  # (the output's record beside it)
        if manifest_key is not None and record == manifest_key:
            raise InputError(f"{_called(path)} row {r.number}: the record {r.output}.keyframes.json written beside its "
                             "output would replace the manifest itself; give the row another output")
        other = inputs.get(outputs_key[r.number])
        if other is not None:
            case = ("" if str(other[1].resolve()) == str(r.output.resolve()) else
                    f" ({other[1]}: names that differ only in case are one file on macOS and Windows)")
            what = "the manifest itself" if other[0] == 0 else f"an input of row {other[0]}"
            raise InputError(f"{_called(path)} row {r.number}: the output {r.output} is {what}{case}; "
                             "choose another output")
    return rows


def _absolute(path: Path) -> Path:
    """``path`` from the root (the report is read later, from anywhere): its folder resolved, its
    own name kept (an output that is a symbolic link is named as the manifest names it)."""
    path = Path(path)
    return path.resolve() if path.name in ("", ".", "..") else path.parent.resolve() / path.name


@functools.lru_cache(maxsize=65536)  # (called for every row at every rewrite of the report: a third of a run)
def _in_folder(output: str, folder: Path) -> str:
    """``output`` relative to the report's ``folder`` (absolute, as ``_absolute`` gives it) when it
    lies in it (POSIX form), else ""."""
    try:
        return Path(output).relative_to(folder).as_posix()
    except ValueError:
        return ""


def _earlier_results(out_dir: Path) -> dict[str, tuple[dict, int]]:
    """What the reports already in ``out_dir`` (``batch_report.csv`` and the shards') say of the
    cases that ran: {absolute output path: (its report row, the report's mtime in ns)} for rows
    ``ok`` or ``skipped``, and rows that say what made their output (a failed re-run's), a newer
    report's word over an older one's."""
    found: dict[str, tuple[dict, int]] = {}
    if not out_dir.is_dir():
        return found
    try:
        reports = [p for p in out_dir.iterdir() if REPORT_NAME.fullmatch(p.name) and p.is_file()]
    except OSError as error:  # a folder that cannot be listed: a traceback before
        raise InputError(f"cannot read the folder {out_dir} ({error.strerror or error}); check its permissions or "
                         "choose another -o") from None
    for report in sorted(reports, key=lambda p: p.stat().st_mtime_ns):
        claimed: dict[str, tuple[dict, int]] = {}
        try:
            stamp = report.stat().st_mtime_ns
            with open(report, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:  # (or re-saved by Excel)
                for row in csv.DictReader(fh):
                    # ok / skipped rows carry their columns over; any row says what made its output
                    if not (row.get("output") and (row.get("status") in ("ok", "skipped") or row.get("method"))):
                        continue
                    keys = [str(_absolute(Path(row["output"])))]
                    inside = row.get("output_in_folder") or ""
                    if inside and not Path(inside).is_absolute() and ".." not in Path(inside).parts:
                        # the folder moved, copied or mounted elsewhere since: its outputs are found by
                        # where they lie in it
                        keys.append(str(_absolute(out_dir / inside)))
                    for key in keys:
                        # within a report the first row for an output is the newest: the run that wrote it
                        # puts its own rows first and other manifests' kept rows after (a review, session
                        # 31: a kept row of the folder's earlier mount point had the last word)
                        claimed.setdefault(key, (row, stamp))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue  # a damaged report carries nothing over
        found.update(claimed)  # a newer report's word over an older one's
    return found


def made_with(args, server_info: dict | None = None, model=None) -> str:
    """What a batch's outputs are made with, for the report and --skip-existing: the method, and
    for the network's methods the weights (--checkpoint, else PAMSEGMENT_MODEL, else the shipped
    weights; a copy of the shipped file counts as them) with their sha256 (16 hex digits) and a
    digest of the settings they run with (``checkpoints.settings_digest``: the network, the
    preprocessing and the inference parameters with --registration-weight, --intensity-gate,
    --through-plane-mm and --walk applied). ``model``: the method object loaded here (a PAMModel, or
    a predictor wrapping one). With ``--server`` (``server_info``: its ``/info``) the server's weights
    and settings as its /info names them, and a drift test asked for per job (which its digest does
    not hold) named apart. ``_same_making`` compares by the weights and settings: weights replaced
    under one path, re-saved with another threshold, or the shipped ones of another release are
    others; a copy of the same file elsewhere, or the same on a server, is the same."""
    if not args.method.startswith("pam"):
        return args.method
    from .checkpoints import shipped_checkpoint_path, shipped_weights_sha256

    if server_info is not None:
        served = server_info.get("model") if isinstance(server_info.get("model"), dict) else {}
        sha, settings = str(served.get("sha256") or ""), str(served.get("settings") or "")
        gate = getattr(args, "intensity_gate", None)
        asked = f", drift test {gate}" if gate is not None else ""
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            return f"{args.method} (the server's weights, sha256 unknown{asked})"
        if not re.fullmatch(r"[0-9a-f]{8}", settings):  # a server from before session 44: its weights only
            return f"{args.method} (the server's weights, sha256 {sha[:16]}{asked})"
        name = "shipped weights" if sha == shipped_weights_sha256() else "the server's weights"
        return f"{args.method} ({name}, weights sha256 {sha[:16]}, settings {settings}{asked})"

    given = args.checkpoint or os.environ.get("PAMSEGMENT_MODEL") or None
    key = _model_key(model)
    shipped = shipped_checkpoint_path()
    is_shipped = given is None or (shipped is not None and _absolute(Path(given)) == _absolute(Path(shipped)))
    if key is None:  # (nothing loaded here: as before session 44)
        return f"{args.method} (shipped weights)" if is_shipped else f"{args.method} ({_absolute(Path(given))})"
    # (a copy of the shipped file elsewhere: the shipped weights, loaded for their settings only then)
    is_shipped = is_shipped or ((shipped_weights_sha256() or "")[:16] == key[0] and key == _shipped_key())
    name = "shipped weights" if is_shipped else str(_absolute(Path(given)))
    return f"{args.method} ({name}, weights sha256 {key[0]}, settings {key[1]})"


_KEY = re.compile(r"weights sha256 ([0-9a-f]{16}), settings ([0-9a-f]{8})\)$")


def _model_key(model) -> tuple[str, str] | None:
    """(the weights' sha256, 16 hex digits; a digest of the settings they run with, 8) of a method
    object (a PAMModel, or a predictor wrapping one: its ``model``), None for anything else."""
    from .checkpoints import settings_digest

    for obj in (model, getattr(model, "model", None)):
        sha = getattr(obj, "sha256", None)
        settings = settings_digest(obj)
        if isinstance(sha, str) and sha and settings:
            return sha[:16], settings
    return None


@functools.lru_cache(maxsize=1)
def _shipped_key() -> tuple[str, str] | None:
    """``_model_key`` of the shipped weights as they load (their own settings), None where they are
    missing or do not load; loaded once per process."""
    from .checkpoints import load_model, shipped_checkpoint_path

    path = shipped_checkpoint_path()
    try:
        return _model_key(load_model(path)) if path is not None else None
    except Exception:  # noqa: BLE001 - a damaged install: every run names its weights by path then
        return None


def _same_making(before: str, now: str) -> bool:
    """Whether an output made with ``before`` (a report's method column) is what ``now`` makes: the
    same text, or the same method with the same weights and settings (a checkpoint copied
    elsewhere, the same on a server). A column from before session 44 names the shipped weights as
    such, a checkpoint by its path only, a server's weights by their sha256 only: such an output is
    made again where the text differs."""
    if before == now:
        return True

    def key(text: str) -> tuple[str, tuple[str, str] | None]:
        # (a report from before session 44 said "(shipped weights)" whatever the release, the drift test or the
        # walk: unknown, so such a row is made again, not kept as done: a review found one 7116 voxels off)
        found = _KEY.search(text)
        return text.split(" ", 1)[0], (found.group(1), found.group(2)) if found else None

    (a, key_a), (b, key_b) = key(before), key(now)
    return a == b and key_a is not None and key_a == key_b


def _made_before(row: BatchRow, earlier: dict[str, tuple[dict, int]]) -> str:
    """What made ``row``'s existing output by the earlier report that names it ("" when no report
    does, the output is newer than it, or it is from before the column existed)."""
    found = earlier.get(row.absolute()[2])
    if found is None or row.output.stat().st_mtime_ns > found[1]:
        return ""
    return found[0].get("method") or ""


def _made_otherwise(row: BatchRow, earlier: dict[str, tuple[dict, int]], method: str) -> str | None:
    """What made ``row``'s existing output, when an earlier report says it was something else than
    ``method`` (a trial with --method copy, say): then --skip-existing runs it again. None if the
    same, or unknown (no report, or one from before the column existed)."""
    before = _made_before(row, earlier)
    return before if before and not _same_making(before, method) else None


INPUT_COLUMNS = (("image", "image"), ("prompt", "prompt"), ("previous", "previous result"),
                 ("edited", "edited result"))


HASHED_UP_TO = 32 * 2**20  # files up to this size are fingerprinted by their content, larger ones by size and time
TIME_SLACK_NS = 2 * 10**9  # file systems keep times to 2 s (FAT), 1 s (HFS+), 10 ms (exFAT), 100 ns (NTFS)


def _data_file(path: Path) -> Path | None:
    """The voxel file a MetaImage (.mhd) or detached NRRD (.nhdr) header names, if one file."""
    if path.suffix.lower() not in (".mhd", ".nhdr"):
        return None
    try:
        with open(path, "rb") as fh:
            text = fh.read(65536).decode("latin-1")
    except OSError:
        return None
    key = r"ElementDataFile\s*=" if path.suffix.lower() == ".mhd" else r"data\s*file\s*:"
    found = re.search(rf"^\s*{key}\s*(.+?)\s*$", text, re.MULTILINE | re.IGNORECASE)
    name = found.group(1) if found else ""
    if not name or name.upper() in ("LOCAL", "LIST") or "%" in name:
        return None  # in the header itself, or several files (they change the header's own time when written)
    data = path.parent / name
    return data if data.is_file() else None  # (a name with spaces is one file; "a%03d.raw 1 9 1" is not)


SAMPLE_BYTES = 2**20  # a large file's content sample: its first and last MiB
DICOM_SAMPLE_BYTES = 4096  # a DICOM file's: its first 4 KiB (the header, with the instance's UIDs)
_fingerprinted: dict = {}  # (path, size, mtime, ctime) -> fingerprint, within one process (rows sharing an image)


def _file_fingerprint(part: Path, found: os.stat_result) -> str:
    """One file's part of ``_fingerprint``."""
    key = (str(part), found.st_size, found.st_mtime_ns, found.st_ctime_ns)
    if key in _fingerprinted:
        return _fingerprinted[key]
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        if found.st_size <= HASHED_UP_TO:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            value = f"h{digest.hexdigest()[:16]}"
        else:
            digest.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(found.st_size - SAMPLE_BYTES, 0))
            digest.update(fh.read(SAMPLE_BYTES))
            value = f"s{found.st_size}t{found.st_mtime_ns}c{digest.hexdigest()[:16]}"
    if len(_fingerprinted) > 4096:
        _fingerprinted.clear()
    _fingerprinted[key] = value
    return value


def _fingerprint(path: Path, ours: frozenset = frozenset()) -> str:
    """What ``path`` is now, as far as --skip-existing asks ("" if it cannot be read): a file up to
    32 MiB by its content (``h`` and 16 hex digits), a larger one by its size, modification time
    and a sample of its content, its first and last MiB (``s<size>t<ns>c<16 hex>``), with the voxel
    file a .mhd or .nhdr header names; a folder (a DICOM series) by its files' names, sizes and
    first 4 KiB (their UIDs) and its newest file's time (``d<16 hex>t<ns>``), leaving out hidden
    files (.DS_Store) and ``ours`` (absolute paths of what batches write there). Times match
    within 2 s (``_same_input``: a copy onto FAT, exFAT or HFS+ keeps them only that closely).
    Any other change counts, not only a newer time: a file replaced by one with an older time
    (``cp -p``, ``unzip -o``, ``mv``), a slice file taken out, another scan of the same size; a
    chmod, a backup or the inputs moved elsewhere (``mv``, ``cp -a``) do not. A file's value is
    kept for the rest of the process while it stays as it was (rows sharing an image)."""
    try:
        info = path.stat()
        if not path.is_dir():
            parts = []
            for part in (path, _data_file(path)):
                if part is not None:
                    parts.append(_file_fingerprint(part, part.stat() if part is not path else info))
            return "+".join(parts)
        items, newest = [], 0
        for name, e in _series_files(path, ours):
            try:
                with open(path / name, "rb") as fh:
                    head = hashlib.sha256(fh.read(DICOM_SAMPLE_BYTES)).hexdigest()[:16]
            except OSError:
                continue
            items.append(f"{name}:{e.st_size}:{head}")
            newest = max(newest, e.st_mtime_ns)
        items.sort()
    except OSError:
        return ""
    listed = hashlib.sha256("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"d{listed}t{newest}"


def _same_input(recorded: str, now: str) -> bool:
    """Whether two ``_fingerprint`` values name the same input: contents (or content samples) and
    sizes alike, times within ``TIME_SLACK_NS``."""
    def split(value):
        out = []
        for part in value.split("+"):
            found = re.fullmatch(r"([hsd])([0-9a-f]+)(?:t(\d+))?(?:c([0-9a-f]+))?", part)
            if found is None:
                return None
            out.append((found.group(1), found.group(2), found.group(4),
                        int(found.group(3)) if found.group(3) else None))
        return out

    a, b = split(recorded), split(now)
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x[:3] == y[:3] and (x[3] is None or y[3] is not None and abs(x[3] - y[3]) <= TIME_SLACK_NS)
               for x, y in zip(a, b))


def _fingerprints(row: BatchRow, ours: frozenset = frozenset()) -> str:
    """The report's ``inputs`` cell: ``image:<fingerprint> prompt:<...>`` and, for an update row,
    ``previous:`` and ``edited:``."""
    return " ".join(f"{key}:{_fingerprint(Path(path), ours)}" for key, _ in INPUT_COLUMNS
                    if (path := getattr(row, key)) is not None)


def _recorded_inputs(row: BatchRow, earlier: dict[str, tuple[dict, int]]) -> str:
    """The ``inputs`` cell of the earlier report's row that describes ``row``'s existing output
    ("" when none does: no report, the output is newer than it, or a report from before the
    column)."""
    found = earlier.get(row.absolute()[2])
    if found is None or row.output.stat().st_mtime_ns > found[1]:
        return ""
    return found[0].get("inputs") or ""


def _stale(row: BatchRow, earlier: dict[str, tuple[dict, int]], ours: frozenset = frozenset()) -> str | None:
    """Why --skip-existing runs a row whose output exists again (a review, session 30): the last
    report says the row failed (its output is then an earlier run's, from inputs the user has
    since changed), or its image, prompt, previous or edited result is not what its output was
    made from. That is judged by the fingerprints the report recorded when the output was made
    (``_fingerprint``; session 31: modification times missed a file replaced by an older one and
    reran on a .DS_Store); for an output no report describes so, by modification times, as make
    does (``_changed_at``). An input that is gone does not rerun the row. ``ours``: the files this
    batch writes (every row's output and record, its report, the manifest), which a DICOM folder
    may hold. None if the output is up to date."""
    found = earlier.get(row.absolute()[2])
    out_time = row.output.stat().st_mtime_ns
    if found is not None and out_time <= found[1] and found[0].get("status") == "error":
        return "run again: it failed in the last run, so its output is from an earlier one"
    recorded = dict(item.split(":", 1) for item in _recorded_inputs(row, earlier).split() if ":" in item)
    for key, what in INPUT_COLUMNS:
        path = getattr(row, key)
        if path is None:
            continue
        if recorded:
            now = _fingerprint(Path(path), ours)
            if now and not _same_input(recorded.get(key, ""), now):
                # another file named in the manifest now, or the same file changed (a trial, session 36:
                # "it changed since" of an image that had not)
                then = (found[0].get(key) or "") if found is not None else ""
                since = (f"it was made from {then}" if then and key in ("image", "prompt")
                         and then != str(_absolute(Path(path))) else "it changed since")
                return f"run again: its {what} is not the one its output was made from ({since})"
            continue
        try:
            newer = _changed_at(Path(path), ours) > out_time
        except OSError:
            continue  # gone: the output is kept
        if newer:
            return f"run again: its {what} changed after its output was written"
    return None


def _made_for_another_manifest(row: BatchRow, earlier: dict[str, tuple[dict, int]], manifest: Path,
                               ours: frozenset = frozenset()) -> tuple[str, str] | None:
    """(the other manifest, its row's image) when the report in -o says ``row``'s existing output
    was made by another manifest's row from another image: two manifests whose images share a
    relative path (``p01/ct.nii.gz`` at two sites) get the same default output name, and the
    second run replaced the first's result without a word (a trial, session 36). The same image
    (a manifest of redrawn prompts, say), or an image moved with the project (the same
    fingerprint), is not. None otherwise."""
    found = earlier.get(row.absolute()[2])
    if found is None or not row.output.is_file() or row.output.stat().st_mtime_ns > found[1]:
        return None
    before = found[0]
    if not before.get("manifest") or before["manifest"] == str(_absolute(manifest)):
        return None
    image = row.absolute()[0]
    if before.get("image") == image:
        return None
    recorded = dict(item.split(":", 1) for item in (before.get("inputs") or "").split() if ":" in item)
    if recorded and _same_input(recorded.get("image", ""), _fingerprint(Path(image), ours)):
        return None
    recorded_as = Path(before["manifest"])  # (a piped one's /proc/PID/fd/N, of a process long gone: a re-review)
    called = _called(recorded_as)
    return called if called != recorded_as.name else before["manifest"], before.get("image") or "?"


def _changed_at(path: Path, ours: frozenset = frozenset()) -> int:
    """When ``path`` last changed (ns), by modification times (inode change times moved with every
    chmod, cp -a or backup, which reran whole batches): a file's own; for a folder (a DICOM series)
    the latest of its files' (leaving out hidden ones and ``ours``, absolute paths of what this
    batch writes) and, when none of ``ours`` lies in it, its own (a file taken out of the series
    shows only there). Not seen: a file moved in with an old time (as make does not)."""
    info = path.stat()
    if not path.is_dir():
        return info.st_mtime_ns
    folder = path.resolve()  # as ``ours`` names its files (a folder reached through a link, too)
    newest = 0 if any(Path(p).parent == folder for p in ours) else info.st_mtime_ns
    for _, e in _series_files(path, ours):
        newest = max(newest, e.st_mtime_ns)
    return newest


def _series_files(path: Path, ours: frozenset):
    """(name, stat) of the files in the folder ``path`` (a DICOM series), leaving out hidden ones
    (.DS_Store; GDCM skips them too) and ``ours`` (absolute paths, resolved, of what batches write);
    files that vanish meanwhile are left out. OSError if the folder cannot be listed."""
    folder = path.resolve()  # as ``ours`` names its files (a folder reached through a link, too)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith(".") or str(folder / entry.name) in ours:
                continue
            try:
                if entry.is_file():
                    yield entry.name, entry.stat()
            except OSError:
                continue


def _carry_over(row: BatchRow, earlier: dict[str, tuple[dict, int]]) -> None:
    """A skipped row keeps what the report of the run that wrote its output said (seconds, slices,
    check_first, message), as long as the output is not newer than that report and that run read
    the image and prompt this row names."""
    image, prompt, output = row.absolute()
    found = earlier.get(output)
    if found is None:
        return
    before, stamp = found
    if row.output.stat().st_mtime_ns > stamp:  # written again since: that report does not describe it
        row.message = f"{SKIPPED}; it changed after the earlier report was written, which does not describe it"
        return
    if before.get("status") not in ("ok", "skipped"):  # it failed in that run: only its method tells
        row.method = before.get("method") or ""
        return
    if (before.get("image"), before.get("prompt")) != (image, prompt):  # the manifest changed since
        row.message = f"{SKIPPED}; the earlier report has it from another image or prompt"
        return
    row.slices, row.check_first = before.get("slices") or "", before.get("check_first") or ""
    row.method = before.get("method") or ""
    try:
        row.seconds = float(before.get("seconds") or 0.0)
    except ValueError:
        pass
    if before["status"] == "ok":
        # (what made that run run the row again is no word on this one: it was "run again: ..." then)
        kept = [part for part in (before.get("message") or "").split(" | ")
                if part and not part.startswith(("run again:", "not in the manifest since"))]
        row.message = " | ".join([CARRIED, *kept])
    elif before.get("message"):  # skipped then too: its message already says where the columns come from
        # (a row kept while it was out of the manifest is in it again)
        row.message = " | ".join(part for part in before["message"].split(" | ")
                                 if not part.startswith("not in the manifest since"))


def _rows_of_other_manifests(report: Path, manifest: Path, rows: list[BatchRow]) -> list[dict]:
    """The rows of ``report`` (in -o, about to be rewritten) that other manifests' runs wrote (a
    second round of corrections into the same folder, say), except those for outputs this run
    writes: the rewritten report keeps them after this run's rows, so that it still records every
    batch that wrote into the folder. Rows without a ``manifest`` (versions before the column) or
    a report that cannot be read are not kept, as before."""
    ours = str(_absolute(manifest))
    outputs = {r.absolute()[2] for r in rows}
    folder = _report_folder(str(report.parent), os.getcwd())
    inside = {name for r in rows if (name := _in_folder(r.absolute()[2], folder))}
    try:
        with open(report, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:  # (or re-saved by Excel)
            found = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    # a row of the same output by where it lies in the folder is this run's output too (the folder
    # reached by another path: moved, or its disk mounted elsewhere; a review, session 31). This
    # manifest's own rows for outputs it no longer lists are kept while their output exists: a row left
    # out for one run and put back later lost what had made its output, and --skip-existing kept a
    # result of another method (a trial, session 38)
    # Not in a shard's report (a shard's rows move to another shard as the manifest changes: kept, they
    # went stale beside the other shard's rewrite), and only a row that says what made its output (any
    # status: a failed re-run's row says the output is still the earlier method's) for an output not
    # written since the report was.
    try:
        written = report.stat().st_mtime_ns
    except OSError:
        written = 0

    def own_kept(row) -> bool:
        if ".shard" in report.name or not row.get("method") or not row.get("output"):
            return False
        try:
            return os.stat(row["output"]).st_mtime_ns <= written
        except OSError:
            return False

    kept = [{k: row.get(k) or "" for k in REPORT_FIELDS} for row in found
            if row.get("manifest") and row.get("output") not in outputs
            and (row.get("output_in_folder") or "") not in inside
            and (row["manifest"] != ours or own_kept(row))]
    for row in kept:  # its row number is another row's now: said instead
        if row["manifest"] == ours and row["row"]:
            row["message"] = " | ".join(part for part in (f"not in the manifest since (was row {row['row']})",
                                                          row["message"]) if part)
            row["row"] = ""
    return kept


@contextlib.contextmanager
def _report_lock(path: Path):
    """An exclusive lock on the report's folder (flock on the folder itself: no lock file is left)
    for one rewrite: two batches writing into one folder at once (two people's overnight runs)
    read each other's rows and write in turn, instead of dropping each other's rows. Where it
    cannot be locked (no fcntl, a file system without flock) the rewrite goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # not lockable here: unlocked, as before
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_report(rows: list[BatchRow], path: Path, manifest: Path | None = None,
                 kept: list[dict] | None = None) -> None:
    """The report, written atomically (a temporary of its own moved in); InputError when it cannot
    be. ``kept``: other manifests' rows to keep after this run's (None: read from the report as it
    is now, under a lock on it, so that batches running into one folder at once keep each other's
    rows). UTF-8; a path's name that is not (a folder named in Latin-1 bytes, which Python holds
    as lone surrogates) is written as the bytes it has, so the report still names the file."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with _report_lock(path):
        if kept is None:
            kept = (_rows_of_other_manifests(path, manifest, rows) if manifest is not None and path.is_file()
                    else [])
        _write_report(rows, path, manifest, kept, tmp)


@functools.lru_cache(maxsize=64)
def _report_folder(folder: str, cwd: str) -> Path:
    """The report's folder from the root, resolved once (the report is rewritten after every case)."""
    return _absolute(Path(cwd) / folder)


def _write_report(rows, path: Path, manifest, kept: list[dict], tmp: Path) -> None:
    folder = _report_folder(str(path.parent), os.getcwd())
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
            w.writeheader()
            for r in rows:
                image, prompt, output = r.absolute()
                w.writerow({"row": r.number, "image": image, "prompt": prompt, "output": output, "status": r.status,
                            "seconds": f"{r.seconds:.1f}", "slices": r.slices, "check_first": r.check_first,
                            "message": r.message, "method": r.method,
                            "manifest": "" if manifest is None else str(_absolute(manifest)),
                            "output_in_folder": _in_folder(output, folder), "inputs": r.inputs})
            w.writerows(kept)  # other manifests' rows, as they were
        tmp.replace(path)
    except BaseException as error:  # UnicodeError: a message holding a character no bytes stand for
        try:  # also on Ctrl-C or SIGTERM during the rewrite (a review, session 31: the .tmp stayed behind)
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if not isinstance(error, (OSError, UnicodeError)):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        hint = ("it may be open in another program, which keeps it from being replaced (close it there), or its "
                "folder may not take files" if isinstance(error, PermissionError)
                else "check that its folder is writable and has space")
        raise InputError(f"cannot write the report {path} ({reason}); {hint}") from None


class _Report:
    """The report of a running batch. A rewrite that fails once the work has started (the file
    open in a spreadsheet that locks it, a full disk) is a warning, given once: the batch goes on
    and writes it again after the next case and at the end. ``failure`` is the last rewrite's
    error while the file is out of date."""

    def __init__(self, rows: list[BatchRow], path: Path, manifest: Path, warn) -> None:
        self.rows, self.path, self.manifest, self.warn = rows, path, manifest, warn
        self.failure: InputError | None = None
        self.warned = False

    def write(self) -> None:
        try:
            write_report(self.rows, self.path, self.manifest)  # other manifests' rows as they are now
        except InputError as error:
            self.failure = error
            if not self.warned:
                self.warned = True
                self.warn(f"pamsegment: warning: {error}; the batch goes on and writes the report again after the "
                          "next case")
        else:
            self.failure = None


def _check_output_folders(out_dir: Path, todo: list[BatchRow], manifest: str) -> None:
    """Before any work: files can be made in -o (or -o can be made), and every other folder an
    output of ``todo`` goes to exists and takes files (InputError naming the first row that fails).
    A skipped row's output exists, so its folder does too."""
    from .cli import check_record_replaceable
    from .volumes import check_folder_writable, check_not_read_only

    for r in todo:  # a result protected with chmod a-w is kept (--skip-existing has left such rows out), and
        try:  # so is its record
            check_not_read_only(r.output)
            check_record_replaceable(r.output)
        except InputError as error:
            raise InputError(f"{manifest} row {r.number}: {error}") from None
    if out_dir.is_dir():
        check_folder_writable(out_dir, "the report and outputs")
    else:
        check_folder_writable(out_dir.parent if str(out_dir.parent) else Path("."), f"the -o folder {out_dir.name}")
    seen = {str(out_dir.resolve())}
    for r in todo:
        folder = r.output.parent
        key = str(folder.resolve())
        if key in seen:
            continue
        seen.add(key)
        if not folder.is_dir():
            raise InputError(f"{manifest} row {r.number}: the output folder {folder} does not exist; create it first")
        check_folder_writable(folder, f"{manifest} row {r.number}'s output")


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import (METHOD_HELP, METHODS, THREADS_HELP, _positive_int, _thread_count, _through_plane_mm,
                      _unit_interval)

    p.epilog = ("Per case, the axis is found from each prompt's drawing and the whole volume is searched: "
                "propagate's --axis, --range, --no-early-stop, --empty-slices and --report have no batch form "
                "(give a label drawn on another plane its own row with a label column, or run such a case with "
                "propagate). Example: pamsegment batch cases.csv -o results/ --skip-existing")

    p.add_argument("manifest", metavar="MANIFEST", help="CSV with columns " + COLUMNS_TEXT)
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for outputs without an output column and for the report, batch_report.csv "
                        "(batch_report.shardK-of-N.csv with --shard K/N); created if missing")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint for every case (default: $PAMSEGMENT_MODEL if set, else the shipped weights)")
    p.add_argument("--method", choices=sorted(METHODS), default="pam", help=METHOD_HELP)
    p.add_argument("--registration-weight", type=_unit_interval, metavar="W", help="as for propagate")
    p.add_argument("--intensity-gate", choices=("off", "prompt", "guide", "both"), help="as for propagate")
    p.add_argument("--through-plane-mm", type=_through_plane_mm, metavar="T", help="as for propagate")
    p.add_argument("--walk", choices=("engine", "published"), help="as for propagate")
    p.add_argument("--skip-existing", action="store_true", help="skip rows whose output exists (resume a cut run)")
    p.add_argument("--shard", type=parse_shard, metavar="K/N",
                   help="run only the manifest's cases K, K+N, K+2N ... (counting cases, not lines; split one "
                        "manifest between N machines)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first case that fails (default: go on)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run a case even when its volume looks too large for the memory this process may use")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_thread_count, metavar="N", help=THREADS_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="query slices per network call (default 16)")
    p.add_argument("--resample-prompt", action="store_true",
                   help="resample prompts on another grid onto their image's grid (nearest neighbour)")
    p.add_argument("--server", metavar="URL",
                   help="propagate every case on a `pamsegment serve` server (e.g. http://gpu-box:8765); its model "
                        "and device are used, a full queue is waited out (up to an hour per case), and the batch "
                        "stops if the server cannot be reached or stays busy that long (resume with --skip-existing)")
    p.add_argument("--token", help="the server's token (default: the PAMSEGMENT_TOKEN environment variable)")


def _run_row(row: BatchRow, model, args, progress=None) -> None:
    """Read, propagate and write one case; ``progress(fraction, message)`` follows its propagation.
    Its ``reading`` (input fingerprints taken before it was read) becomes its ``inputs`` once its
    output is in place (a row that fails or stops before that keeps the earlier output's)."""
    from .cli import read_case
    from .propagate import propagate
    from .volumes import write_labelmap

    row.notes = [row.rerun] if row.rerun else []  # then what reading notes (kept when the case fails: a note
    # may explain the failure)
    row.info = []
    image, prompt = read_case(row.image, row.prompt, row.output, args.resample_prompt, note=row.notes.append,
                              series=row.series, series_option="the manifest's series column", labels=row.labels)
    plan, earlier = None, None
    keyframes, axis, walls = prompt.array, None, None
    if getattr(args, "server", None) is None:  # (a server's work is the server's memory)
        from .cli import check_propagation_memory
        from .propagate import find_prompt_slices

        drawn_axis, drawn = find_prompt_slices(prompt.array, labels=row.labels)
        check_propagation_memory(image, drawn_axis, drawn, args.method, getattr(args, "no_memory_check", False),
                                 Path(row.image).name)
    if row.edited is not None:
        from .cli import plan_update

        def say(text: str) -> None:  # "update: ..." lines inform; other lines are notes
            (row.info if text.startswith("update:") else row.notes).append(text)

        plan, earlier = plan_update(image, prompt, row.previous, row.edited, labels=row.labels,
                                    resample=args.resample_prompt, names=("previous", "edited"), say=say)
        keyframes, axis, walls = plan.prompt, plan.axis, plan.empty_slices
        if getattr(args, "server", None) is None:
            from .cli import check_update_memory

            check_update_memory(image, plan, args.method, getattr(args, "no_memory_check", False),
                                Path(row.image).name)
    result = propagate(image.array, keyframes, image.spacing, model, labels=row.labels if plan is None else plan.labels,
                       axis=axis, empty_slices=walls,
                       range=None if plan is None else plan.slice_range,  # an update: the corrected run's range
                       batch_size=args.batch_size, device=args.device, threads=args.threads,
                       update=plan is not None, progress=progress, previous=earlier)  # (a server: not uploaded)
    from .cli import check_keyframes_record_path, keyframes_record_path, keyframes_record_writer
    from .volumes import _write_extension, empty_segments_of, replace_together, seg_nrrd_segments

    segments = seg_nrrd_segments(row.prompt)  # a Slicer prompt's segment names and colours, for a .seg.nrrd output
    empty = empty_segments_of(segments, result.slice_range, row.labels)
    # the output and the record a correction round reads (its keyframes and walks), put in place together
    files = [(row.output, _write_extension(row.output),
              lambda tmp: write_labelmap(result.mask, image, tmp, segments, empty_segments=empty))]
    if check_keyframes_record_path(row.output, required=plan is not None):
        files.insert(0, (keyframes_record_path(row.output), ".json", keyframes_record_writer(result, plan)))
    else:
        row.notes.append("no record was written beside the output (its name is too long for one): a correction "
                         "round from it predicts every slice")
    # what the report says of the case, computed before its files are put in place: a Ctrl-C during
    # these whole-volume passes after the move left the case "not run; nothing was written for it"
    # with its output on disk
    if plan is not None:
        from .cli import _made_otherwise_notes

        row.info.extend(f"changed beside the edits: {line}" for line in plan.changes(result.mask))
        row.notes.extend(_made_otherwise_notes(earlier, result))  # another method than the round it corrects
    row.slices = "; ".join(f"{lab}: {a}-{b}" for lab, (a, b) in result.slice_range.items())
    row.check_first = result.review_summary()
    how = "--intensity-gate off"  # the drift test's remedy, as propagate says it
    notes = [note + (f" ({how})" if kind == "drift" else "")
             for kind, note in result.kinds_of_notes(edited=None if plan is None else plan.users_own())]
    # (plan_update's lines say "note: ..." themselves: "note: note: ..." in the row's line before)
    row.noted = " | ".join(n[len("note: "):] if n.startswith("note: ") else n for n in row.notes + notes)
    row.message = " | ".join(row.info + row.notes + notes)
    # a Ctrl-C or SIGTERM while the files go in is raised once they are in: the row is then written
    def written() -> None:
        row.written, row.inputs = True, row.reading

    replace_together(files, after=written, defer_interrupt=True)


LONG_CASE_S = 10.0  # in a log, a case running longer says its progress (``_case_progress``)


def _case_progress(bar, every: float = 1.0, lines: bool = False, row=None):
    """A propagation's progress shown after the cases bar (a full-size scan takes minutes), drawn
    at most once a ``every`` seconds (a log of a long batch stays small) and at the case's end.
    ``lines`` (a log, no bar): a server's waits are said on a line of their own, at most once a
    minute (a batch waiting on a full queue said nothing for as long as it waited), and a case that
    runs longer than ``LONG_CASE_S`` says each new 10 % of its progress as propagate does (a 2-minute
    case of a thin-slice whole-body scan left its log silent for 110 s, a trial, session 40); shorter
    cases add no line."""
    bar.set_postfix_str("this case 0%", refresh=False)
    started = time.monotonic()
    last, said, step = [started], [0.0], [0]
    name = f"row {row.number if row is not None else '?'}"

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        # a server's waits are said (the bar would stand still at 0 % without a word)
        waiting = message.startswith("server: busy") or "queue position" in message
        if lines:
            if waiting and now - said[0] >= 60:
                said[0] = now
                print(f"{name}: {message}", file=sys.stderr, flush=True)
            tenth = int(10 * min(max(fraction, 0.0), 1.0))
            if tenth > step[0] and now - started >= LONG_CASE_S:
                step[0] = tenth
                print(f"{name}: {10 * tenth}%", file=sys.stderr, flush=True)
            return
        if now - last[0] >= every or fraction >= 1.0:
            last[0] = now
            bar.set_postfix_str(f"this case {int(100 * fraction)}%" + (f", {message}" if waiting else ""),
                                refresh=True)

    return progress


def _as_written(path: Path, folder: Path) -> str:
    """``path`` as the manifest in ``folder`` wrote it (relative to it), or whole: per-row lines
    named only the image's file name, "row 4 (image.nii.gz)" for seven scans (a trial, session 36)."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _flock(path: Path, mode: int):
    """An fd of ``path`` (made if missing) locked with ``mode`` (fcntl.LOCK_EX or LOCK_SH, never
    waiting: BlockingIOError when another process holds it), or None where files cannot be locked.
    The lock is checked to be on the file the path still names (another run may have removed it
    between the open and the lock)."""
    import fcntl

    for attempt in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file (a shared -o): read-only opens lock too
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return None
        except OSError:
            return None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt >= 10:  # held: by a running batch (not one letting go, which takes microseconds)
                raise
            time.sleep(0.02)
            continue
        except OSError:  # a file system without flock: unlocked, as before
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except OSError:
            pass
        os.close(fd)  # removed or replaced meanwhile: lock the file there now
    return None


def _claim_the_report(report: Path, manifest: Path, claims: list, sharded: bool = False) -> None:
    """Hold, for the whole run, locks beside the report (hidden ``.batch-<manifest id>.lock`` files,
    removed at the end by the last run holding them): a second run of the same manifest (the same
    file, by any path or link) into the same folder while the first runs (each rewrote all its rows,
    the last report written winning whatever output was written last: a report that did not match the
    files, which --skip-existing then trusted) is refused; so is a whole run beside one of its shards,
    and a shard beside the same shard. Shards run beside each other, other manifests (whose rows each
    rewrite keeps) beside any. Not for a piped manifest, nor where files cannot be locked (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    if not manifest.is_file() or str(manifest).startswith(("/dev/", "/proc/")):
        return
    # the manifest by where it is (a re-save by an editor, sed -i or Excel gives it a new inode) and by its
    # file (a hard link names it elsewhere): a lock on each
    # Held open for the run (closed by _release): a manifest deleted meanwhile (an editor's re-save) keeps
    # its inode, which another file made then would reuse and be refused as this run's (a CI run, session 42)
    try:
        held = os.open(manifest, os.O_RDONLY)
    except OSError:
        return
    claims.append((held, None))
    info = os.fstat(held)
    keys = (hashlib.sha1(os.path.realpath(manifest).encode("utf-8", "surrogateescape")).hexdigest()[:12],
            f"{info.st_dev:x}-{info.st_ino:x}")
    locks = [(report.with_name(f".batch-{key}.lock"), fcntl.LOCK_SH if sharded else fcntl.LOCK_EX) for key in keys]
    if sharded:
        locks += [(report.with_name(f".{report.name}-{key}.lock"), fcntl.LOCK_EX) for key in keys]
    for path, mode in locks:
        try:
            fd = _flock(path, mode)
        except BlockingIOError:
            _release(claims)
            which = ("this shard of " + manifest.name if sharded and mode == fcntl.LOCK_EX
                     else manifest.name + " (or of its shards)")
            raise InputError(f"another run of {which} is writing into {report.parent} now; wait for it to finish "
                             "(then --skip-existing), or give this run another -o folder") from None
        if fd is not None:
            claims.append((fd, path))


def _release(claims: list) -> None:
    """Let go of ``_claim_the_report``'s locks; a lock file no other run holds is removed."""
    if not claims:  # (also where fcntl is missing: nothing was claimed)
        return
    import fcntl

    for fd, path in reversed(claims):
        if path is None:  # the manifest, held open
            os.close(fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other run holds it (a shard's shared lock)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still this file (not one made since by another run)
                path.unlink()
        except OSError:
            pass
        os.close(fd)
    claims.clear()


def cmd_batch(args: argparse.Namespace) -> int:
    claims: list = []
    try:
        return _cmd_batch(args, claims)
    finally:
        _release(claims)


def _cmd_batch(args: argparse.Namespace, claims: list) -> int:
    from .cli import (EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, METHODS, _one_line,
                      check_no_checkpoint_for_classical, check_pam_only_options, check_server_options)

    from .cli import check_not_empty

    check_not_empty(("MANIFEST", args.manifest, "the manifest file"), ("-o", args.output, "the output folder"))
    check_pam_only_options(args)
    check_no_checkpoint_for_classical(args)
    check_server_options(args)
    out_dir = Path(args.output)
    from .volumes import check_not_a_broken_link

    check_not_a_broken_link(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; -o takes a folder")
    if not out_dir.parent.is_dir():
        raise InputError(f"folder {out_dir.parent} does not exist; create it or choose another -o folder")
    rows = read_manifest(args.manifest, out_dir)
    manifest_folder = Path(args.manifest).parent  # (read_manifest's base for relative paths)
    report_name = "batch_report.csv"
    every_row = list(rows)  # (what the whole manifest writes: other shards write into the same folders)
    if args.shard:
        k, n = args.shard
        rows = rows[k - 1::n]
        report_name = f"batch_report.shard{k}-of-{n}.csv"
        if not rows:
            print(f"batch: shard {k}/{n} holds no rows of {_called(Path(args.manifest))} (it lists fewer than {k} "
                  "cases); nothing to do")
            return EXIT_OK
    if args.checkpoint:
        from .checkpoints import check_checkpoint_file

        check_checkpoint_file(args.checkpoint)
    # Everything is checked and the model loaded before -o is created: a refused batch leaves nothing behind.
    # Read before the report is rewritten, with or without --skip-existing: an output this run does not
    # replace (stopped before its row, or the row failed) is still what the earlier run made, and the
    # new report must say so, or a later --skip-existing would keep a --method copy trial as done.
    earlier = _earlier_results(out_dir)
    from .cli import KEYFRAMES_SUFFIX, keyframes_record_exists

    server, server_info = None, None
    if args.server:  # asked now: a wrong address or token is one line before anything is written
        from .remote import RemoteModel

        server = RemoteModel(args.server, token=args.token or os.environ.get("PAMSEGMENT_TOKEN"), method=args.method,
                             wait_when_busy=BUSY_WAIT_SECONDS, intensity_gate=args.intensity_gate)
        server_info = server.info()
        if isinstance(server_info.get("model"), dict):  # (every job checks that the server still runs it)
            server.expect_model = dict(server_info["model"])
        if args.method not in server_info.get("methods", [args.method]):
            raise InputError(f"the server at {server.url} does not run --method {args.method}")
    preloaded = None
    if server is None and args.method.startswith("pam"):
        # loaded now, so that the report and --skip-existing know the weights by their sha256 and the settings
        # they run with (by the path alone, weights replaced under it, or re-saved with another threshold, kept
        # the old outputs as done)
        preloaded = METHODS[args.method](args)
    method = made_with(args, server_info, preloaded)
    # what this batch writes (a DICOM folder may hold some of it: not a change of its series)
    reports = [name for name in os.listdir(out_dir) if REPORT_NAME.fullmatch(name)] if out_dir.is_dir() else []
    # (and what other manifests' batches wrote there, by the reports in -o: two manifests with outputs
    # in one DICOM folder reran each other for ever; a re-review, session 31)
    ours = frozenset([*(o for r in every_row for o in (r.absolute()[2], r.absolute()[2] + KEYFRAMES_SUFFIX)),
                      *(o for written in earlier for o in (written, written + KEYFRAMES_SUFFIX)),
                      *(str(_absolute(out_dir / name)) for name in [*reports, report_name]),
                      str(_absolute(Path(args.manifest)))])
    for r in rows:  # an empty file is what an interrupted copy leaves, not a result
        exists = r.output.is_file() and r.output.stat().st_size > 0
        done = args.skip_existing and exists
        if exists:  # what the output is (and was made from) until this run replaces it
            r.method, r.inputs = _made_before(r, earlier), _recorded_inputs(r, earlier)
        if done and r.edited is not None and not keyframes_record_exists(r.output):
            done = False  # an update row is done with its keyframes record (written together with it)
        other = _made_otherwise(r, earlier, method) if done else None
        stale = _stale(r, earlier, ours) if done and other is None else None
        if other is not None:  # made by another method or checkpoint: not what this run asks for
            done = False
            r.method = other  # what the output still is until this run replaces it (interrupted, failed)
            r.rerun = f"run again: its output was made with {other}, this run uses {method}"
        elif stale is not None:  # its inputs changed since, or this row failed last time: not done
            done = False
            r.rerun = stale
        if done:
            r.status, r.message = "skipped", SKIPPED
            r.inputs = r.inputs or _fingerprints(r, ours)  # judged by times: up to date as the inputs are now
            _carry_over(r, earlier)
    todo = [r for r in rows if r.status == "not run"]
    for r in todo:
        other = _made_for_another_manifest(r, earlier, Path(args.manifest), ours)
        if other is not None:
            raise InputError(f"{_called(Path(args.manifest))} row {r.number}: its output {r.output} holds another "
                             f"manifest's result ({other[0]}, made from {other[1]}), which this run would replace; "
                             "give the row an output column (or write to another -o folder; to replace it on "
                             "purpose, delete it first)")
    _check_output_folders(out_dir, todo, _called(Path(args.manifest)))
    from .volumes import _grid_from_header, check_geometry_fits, check_grids_from_headers

    import warnings

    if len(todo) >= 1000:  # (a few milliseconds a row: minutes, silent before, for a very long manifest)
        print(f"checking the images and prompts of {len(todo)} rows before the first case ...", flush=True)
    for r in todo:  # found now, not at the row's turn: a prompt of another case (a copy-paste slip), a
        # sheared image (gantry tilt) whose output, the default .nii.gz say, cannot store its grid
        with warnings.catch_warnings(record=True) as caught:  # what the headers note, as a note (not Python's form)
            warnings.simplefilter("always", UserWarning)
            try:
                grid = (_grid_from_header(r.image) if args.resample_prompt else  # the image's header, read once
                        check_grids_from_headers(r.image, r.prompt, resample_option="--resample-prompt",
                                                 dicom_series=r.series))
                if grid is not None:
                    check_geometry_fits(grid.direction, r.output)
            except InputError as error:
                raise InputError(f"{_called(Path(args.manifest))} row {r.number}: {error}"
                                 + (" (give the row an output column)" if "sheared" in str(error) else "")) from None
            finally:
                for w in caught:
                    if issubclass(w.category, UserWarning):
                        print(f"note: row {r.number}: {w.message}", flush=True)
    report = out_dir / report_name
    manifest_path = Path(args.manifest)
    for r in rows:  # the report must replace no input (a row's prompt named batch_report.csv, or the manifest)
        for p in (manifest_path, r.image, r.prompt, r.previous, r.edited):
            if p is not None and p.is_file() and report.is_file() and os.path.samefile(p, report):
                raise InputError(f"the report {report} would replace {'the manifest' if p is manifest_path else p}, "
                                 "which this batch reads; write to another -o folder")
    from .volumes import check_not_read_only

    if report.is_dir():  # (was "cannot write the report (Is a directory); check that its folder is writable")
        raise InputError(f"{report} is a folder, and the report needs its name; rename or remove that folder, or "
                         "write to another -o folder")
    check_not_read_only(report)  # a protected report is kept, as protected outputs are
    model = server if server is not None else None if not todo else \
        preloaded if preloaded is not None else METHODS[args.method](args)
    made = not out_dir.exists()
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder {out_dir} ({error.strerror or error}); choose another -o "
                         "folder") from None
    try:
        _claim_the_report(report, Path(args.manifest), claims, sharded=bool(args.shard))
        # before any work: a report that cannot be written stops the batch here
        write_report(rows, report, Path(args.manifest))
    except BaseException:
        _release(claims)
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):  # a refused batch leaves nothing behind
            out_dir.rmdir()
        raise

    from tqdm import tqdm

    t_all = time.perf_counter()
    interrupted, unreachable = "", None
    from .remote import ServerBusy, ServerChanged, ServerUnreachable
    from .cli import progress_mode

    mode = progress_mode()  # a bar on a terminal; in a log a line per finished case instead (no redrawn bars)
    bar = tqdm(todo, desc="cases", unit="case", file=sys.stderr, ncols=80, disable=mode != "bar")
    rewrite = _Report(rows, report, Path(args.manifest), lambda text: bar.write(text, file=sys.stderr))
    current = None
    try:
        for r in bar:
            current = r
            t0 = time.perf_counter()
            try:
                r.reading = _fingerprints(r, ours)
                _run_row(r, model, args, progress=_case_progress(bar, lines=mode == "lines", row=r))
                r.status, r.method = "ok", method
                if r.noted:  # what propagate would print as notes (a drift stop, lost voxels): said here too
                    bar.write(f"row {r.number} ({_as_written(r.image, manifest_folder)}): note: {r.noted}",
                              file=sys.stderr)
            except PropagationCancelled:
                raise
            except (ServerUnreachable, ServerBusy, ServerChanged) as error:  # every later case would fail so: stop
                r.status, r.message = "error", " | ".join([*r.notes, _one_line(error)])
                bar.write(f"row {r.number} ({_as_written(r.image, manifest_folder)}): error: {r.message}",
                          file=sys.stderr)
                unreachable = error
                why = ("could not be reached" if isinstance(error, ServerUnreachable) else
                       "runs another model" if isinstance(error, ServerChanged) else "stayed busy")
                for later in todo[todo.index(r) + 1:]:  # said in the report too, not on the console alone
                    later.message = f"the batch stopped at row {r.number}, where the server {why}; resume with " \
                                    "--skip-existing"
                break
            except (PAMError, OSError, MemoryError, RuntimeError) as error:  # the batch goes on
                # OSError: a file problem no check foresaw; running out of memory on one case (numpy's
                # MemoryError, PyTorch's RuntimeError) fails that case, not the batch
                from .cli import memory_message, out_of_memory

                memory = out_of_memory(error)
                if isinstance(error, RuntimeError) and not memory:
                    raise
                text = memory_message(error, batch=True) if memory else _one_line(error)
                r.status, r.message = "error", " | ".join([*r.notes, text])
                bar.write(f"row {r.number} ({_as_written(r.image, manifest_folder)}): error: {r.message}",
                          file=sys.stderr)
            finally:
                r.seconds = time.perf_counter() - t0
                rewrite.write()
                if mode == "lines" and r.status != "not run":
                    print(f"cases: {todo.index(r) + 1}/{len(todo)} (row {r.number}: {r.status}, {r.seconds:.1f} s)",
                          file=sys.stderr, flush=True)
            if r.status == "error" and args.stop_on_error:
                break
    except (KeyboardInterrupt, PropagationCancelled) as stop:
        from .cli import Terminated, _ending

        # the batch ends here: a second Ctrl-C no longer cuts the report's last rewrite short (it left the
        # batch, and "nothing was written" was said of finished cases; a re-review, session 48)
        _ending(bool(getattr(args, "_ends_process", False)))
        interrupted = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        if current is not None and current.status == "not run" and current.written:  # stopped once it was in
            current.status, current.method = "ok", method
        elif current is not None and current.status == "not run":  # it wrote nothing (outputs are atomic)
            current.message = f"{interrupted} while running; nothing was written for it"
        rewrite.write()
    finally:
        bar.close()
    if rewrite.failure is not None:  # the last try failed: once more, now that the work is done
        rewrite.write()
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("ok", "error", "skipped", "not run")}
    parts = [f"{v} {k}" for k, v in counts.items() if v]
    noted = [r.number for r in rows if r.status == "ok" and r.noted]
    if noted:  # "2 ok (with notes: row 3)": the notes are in the report's message column
        parts[0] += (f" (with notes: row{'s' if len(noted) > 1 else ''} {', '.join(map(str, noted[:10]))}"
                     f"{' ...' if len(noted) > 10 else ''})")
    summary = ", ".join(parts)
    from .volumes import say_leftovers

    say_leftovers([report, *(r.output for r in rows if r.status == "ok")])
    # (a report that could not be written is not named as if it were: a trial, session 47)
    where = f"report {report}" if rewrite.failure is None else f"report {report} not written at the end (below)"
    print(f"batch: {summary} of {len(rows)} row{'s' if len(rows) != 1 else ''} in {time.perf_counter() - t_all:.1f} s; "
          f"{where}", flush=True)
    if rewrite.failure is not None:
        print(f"pamsegment: error: {_one_line(rewrite.failure)}; it does not show the cases run since it was last "
              "written (their outputs are written)", file=sys.stderr)
    if interrupted:
        print(f"pamsegment: {interrupted}; finished cases are written, the rest are 'not run' in the report "
              "(run again with --skip-existing to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted == "interrupted" else EXIT_TERMINATED
    if unreachable is not None:
        print(f"pamsegment: error: {_one_line(unreachable)}; the batch stopped there: finished cases are written, "
              "the rest are 'not run' in the report (run again with --skip-existing to resume)", file=sys.stderr)
        return EXIT_USAGE
    if counts["error"]:
        print(f"pamsegment: error: {counts['error']} of {len(rows)} cases failed; see {report}",
              file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE if rewrite.failure is not None else EXIT_OK
