"""``pamsegment batch``: many cases from a manifest, checked first, resumable, splittable."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_case
from PAMSegmentLib import batch as batch_module
from PAMSegmentLib.cli import main
from PAMSegmentLib.metrics import dice


def _report(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def cases(tmp_path):
    """Three synthetic CT cases (different seeds) in tmp_path/data."""
    return [make_ct_case(tmp_path / "data" / f"c{n}", seed=n) for n in range(3)]


def _manifest(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_writes_what_propagate_writes_and_goes_on_past_a_failing_case(tmp_path, cases, run_cli):
    import shutil

    # a copy of an image as its prompt: refused when its turn comes (the very same file is refused before
    # any work since session 37, with every row's other checks)
    shutil.copy(tmp_path / "data" / "c1" / "image.nii.gz", tmp_path / "data" / "c1" / "copy.nii.gz")
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt,output",
        "c0/image.nii.gz,c0/prompt.nii.gz,",
        "c1/image.nii.gz,c1/copy.nii.gz,",
        "c2/image.nii.gz,c2/prompt.nii.gz,../out/third.nrrd",
    ])
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "track")
    assert proc.returncode == 2, proc.stderr
    assert "1 of 3 cases failed" in proc.stderr
    rows = _report(tmp_path / "out" / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "labels must be whole numbers from 1 to 65535" in rows[1]["message"]
    assert not (tmp_path / "out" / "c1_image_pam.nii.gz").exists()
    # The same as one `pamsegment propagate` per case.
    single = run_cli("propagate", cases[2].image_path, cases[2].prompt_path, "-o", tmp_path / "single.nrrd",
                     "--method", "track")
    assert single.returncode == 0, single.stderr
    assert np.array_equal(_arr(tmp_path / "out" / "third.nrrd"), _arr(tmp_path / "single.nrrd"))
    # and the slices to check first are the ones propagate prints
    check = single.stdout.split("least confident slices, to check first: label 1: ")[1].splitlines()[0]
    assert rows[2]["check_first"] == "label 1: " + check and rows[1]["check_first"] == ""
    out0 = tmp_path / "out" / "c0_image_pam.nii.gz"  # default name: <image path>_pam.nii.gz
    assert out0.exists() and dice(_arr(out0) > 0, cases[0].truth) > 0.9


def test_every_row_is_checked_before_any_work(tmp_path, cases, run_cli):
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt",
        "c0/image.nii.gz,c0/prompt.nii.gz",
        "c1/image.nii.gz,c1/prompt.nii.gz",
        "c2/image.nii.gz,c2/typo.nii.gz",
    ])
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2
    assert "cases.csv row 4: prompt" in proc.stderr and "typo.nii.gz does not exist" in proc.stderr  # the file's line 4
    assert not (tmp_path / "out").exists()  # nothing was run or written


@pytest.mark.parametrize("lines, message", [
    (["prompt,output", "c0/prompt.nii.gz,x.nii.gz"], "has no image column"),
    (["img,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"], "a column .img. this command does not know"),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,x.nii.gz",
      "c1/image.nii.gz,c1/prompt.nii.gz,x.nii.gz"], "row 3: output .*x.nii.gz is also row 2's"),
    # one file on macOS and Windows (s29)
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,x.nii.gz",
      "c1/image.nii.gz,c1/prompt.nii.gz,X.nii.gz"], "row 3: output .*X.nii.gz is also row 2's .names that differ only"),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,x.png"], "row 2: cannot tell the output format"),
    (["image,prompt,label", "c0/image.nii.gz,c0/prompt.nii.gz,1 two"], "row 2: label must be whole numbers"),
    (["image,prompt"], "lists no cases"),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,nowhere/x.nii.gz"],
     "cases.csv row 2: the output folder .*nowhere does not exist"),
    (["image,prompt,labels", "c0/image.nii.gz,c0/prompt.nii.gz,2"], "column 'labels' .*did you mean label"),
    (["image;prompt", "c0/image.nii.gz;c0/prompt.nii.gz"], "not semicolons"),
    (["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz,extra"], "row 2 has more fields than the header; put paths"),
    (["image,prompt,label", "c0/image.nii.gz,c0/prompt.nii.gz,2,4"],
     r'row 2 has more fields than the header; separate several labels with spaces \("2 4"\), not commas'),
    (["c0/image.nii.gz,c0/prompt.nii.gz"], "it looks like a path: the first line must be the header naming the columns"),
    (["image,prompt", '"c0/image.nii.gz,c0/prompt.nii.gz', "c1/image.nii.gz,c1/prompt.nii.gz"],
     'cases.csv row 2: a field runs over several lines: a double quote \\("\\) opened there is not closed'),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,c1/image.nii.gz",
      "c1/image.nii.gz,c1/prompt.nii.gz,"], "row 2: the output .*c1/image.nii.gz is an input of row 3"),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,c1/IMAGE.nii.gz",
      "c1/image.nii.gz,c1/prompt.nii.gz,"],
     "row 2: the output .*c1/IMAGE.nii.gz is an input of row 3 .*c1/image.nii.gz: names that differ only in case"),
    # csv.DictReader kept the last of two same-named columns: c0's prompt ran on c1's scan
    (["image,prompt,image", "c0/image.nii.gz,c0/prompt.nii.gz,c1/image.nii.gz"], "has the column image twice; keep one"),
    (["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,c1"], "row 2: the output .*c1 is a folder; give a file"),
    (["image,prompt,", "c0/image.nii.gz,c0/prompt.nii.gz,x.nii.gz"],
     "cases.csv: column 3 has no name in the header but row 2 fills it; name it"),
    (["image,prompt,series", "c0/image.nii.gz,c0/prompt.nii.gz,1.2.3"],
     "row 2: series applies to a DICOM folder, but .*image.nii.gz is a file"),
])
def test_bad_manifests_get_one_clear_message(tmp_path, cases, lines, message, capsys):
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # a refused batch leaves nothing behind


def test_skip_existing_resumes_and_shards_split_the_rows(tmp_path, cases, capsys):
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(3)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--shard", "2/2"]) == 0
    assert sorted(p.name for p in out.glob("r*.nii.gz")) == ["r1.nii.gz"]  # the second case (K=2, N=2)
    assert [r["row"] for r in _report(out / "batch_report.shard2-of-2.csv")] == ["3"]  # on line 3
    before = (out / "r1.nii.gz").stat().st_mtime_ns
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok"]
    assert (out / "r1.nii.gz").stat().st_mtime_ns == before  # not rewritten
    assert "2 ok, 1 skipped of 3 rows" in capsys.readouterr().out


def test_an_interrupted_batch_keeps_finished_cases_and_says_what_did_not_run(tmp_path, cases, monkeypatch, capsys):
    lines = ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz" for n in range(3)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    real = batch_module._run_row
    calls = []

    def run_row(row, model, args, progress=None):
        calls.append(row.number)
        if row.number == 3:
            raise KeyboardInterrupt  # Ctrl-C during the second case (line 3)
        real(row, model, args, progress)

    monkeypatch.setattr(batch_module, "_run_row", run_row)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 130
    assert calls == [2, 3]
    report = _report(out / "batch_report.csv")
    assert [r["status"] for r in report] == ["ok", "not run", "not run"]
    # The case under way says it was interrupted; the one never started says nothing.
    assert [r["message"] for r in report[1:]] == ["interrupted while running; nothing was written for it", ""]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c0_image_pam.nii.gz"]
    assert "--skip-existing to resume" in capsys.readouterr().err


def test_a_case_that_runs_out_of_memory_fails_alone(tmp_path, cases, monkeypatch, capsys):
    """A MemoryError on one case ended the whole batch (the rows after it never ran) with the
    command's 'nothing was written', although earlier outputs were; another RuntimeError is a bug
    and still stops it."""
    lines = ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz" for n in range(3)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    real = batch_module._run_row

    def run_row(row, model, args, progress=None):
        if row.number == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
        real(row, model, args, progress)

    monkeypatch.setattr(batch_module, "_run_row", run_row)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) != 0  # a failed case
    report = _report(out / "batch_report.csv")
    assert [r["status"] for r in report] == ["ok", "error", "ok"]
    assert report[1]["message"].startswith("not enough memory (DefaultCPUAllocator: can't allocate memory")
    assert "fewer labels in the row's label column" in report[1]["message"] and "--range" not in report[1]["message"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c0_image_pam.nii.gz", "c2_image_pam.nii.gz"]


def test_rows_are_numbered_by_the_files_lines_and_shards_count_cases(tmp_path, cases, capsys):
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt,output",                       # line 1
        "c0/image.nii.gz,c0/prompt.nii.gz,r0.nii.gz",  # line 2
        ",,",                                        # line 3: an empty row, as spreadsheets save one
        "c1/image.nii.gz,c1/prompt.nii.gz,r1.nii.gz",  # line 4
        "",                                          # line 5
        "c2/image.nii.gz,c2/prompt.nii.gz,r2.nii.gz",  # line 6
    ])
    assert [r.number for r in batch_module.read_manifest(m, tmp_path / "out")] == [2, 4, 6]
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--shard", "2/2"]) == 0
    assert [r["row"] for r in _report(out / "batch_report.shard2-of-2.csv")] == ["4"]  # the second case
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--shard", "1/2"]) == 0
    assert [r["row"] for r in _report(out / "batch_report.shard1-of-2.csv")] == ["2", "6"]  # the first and third
    (tmp_path / "data" / "c2" / "prompt.nii.gz").unlink()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 2
    assert "cases.csv row 6: prompt" in capsys.readouterr().err


def test_a_trailing_comma_in_the_header_is_ignored_while_its_column_is_empty(tmp_path, cases):
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,", "c0/image.nii.gz,c0/prompt.nii.gz,",
                                                     "c1/image.nii.gz,c1/prompt.nii.gz"])
    rows = batch_module.read_manifest(m, tmp_path / "out")
    assert [r.output.name for r in rows] == ["c0_image_pam.nii.gz", "c1_image_pam.nii.gz"]


def test_an_image_named_dot_or_dot_dot_names_its_output_after_the_folder(tmp_path, cases):
    # A DICOM folder holding the manifest ("."), or the folder above it (".."): parts[-1] was an IndexError.
    m = _manifest(tmp_path / "data" / "c0" / "cases.csv", ["image,prompt", ".,prompt.nii.gz", "..,prompt.nii.gz"])
    rows = batch_module.read_manifest(m, tmp_path / "out")
    assert [r.output for r in rows] == [tmp_path / "out" / "c0_pam.nii.gz", tmp_path / "out" / "data_pam.nii.gz"]


@pytest.mark.parametrize("name, message", [
    ("", "manifest .*data is a folder; give the CSV file"),
    ("latin.csv", "cannot read latin.csv as a CSV file: line 2 holds a character that is not UTF-8 .*: save it "
                  "as \"CSV UTF-8 \\(Comma delimited\\)\""),
])
def test_a_manifest_that_is_a_folder_or_not_utf8_says_so(tmp_path, cases, name, message, capsys):
    manifest = tmp_path / "data" / name
    if name:  # "Büro" saved as Latin-1, as older spreadsheet programs do
        manifest.write_bytes("image,prompt\nc0/B\xfcro.nii.gz,c0/prompt.nii.gz\n".encode("latin-1"))
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, cases, monkeypatch, capsys, unwritable_folder):
    # -o that cannot be written was a traceback (PermissionError on batch_report.csv.tmp), and an
    # output column into such a folder failed only after its case was computed.
    def not_reached(*args, **kwargs):
        raise AssertionError("a case ran before the output folders were checked")

    monkeypatch.setattr(batch_module, "_run_row", not_reached)
    folder = unwritable_folder
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(folder), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pamsegment: error: cannot write the report and outputs in folder {folder} (")
    assert len(err.splitlines()) == 1
    assert main(["batch", str(m), "-o", str(folder / "results"), "--method", "copy"]) == 2
    assert f"cannot write the -o folder results in folder {folder} (" in capsys.readouterr().err
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,",
                                                    f"c1/image.nii.gz,c1/prompt.nii.gz,{folder / 'r1.nii.gz'}"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert f"cannot write cases.csv row 3's output in folder {folder} (" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_load_leaves_nothing_behind(tmp_path, cases, monkeypatch, capsys):
    # The model was loaded after -o was made and a report of 'not run' rows written.
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--checkpoint", str(m)]) == 2  # a CSV, not weights
    assert capsys.readouterr().err.startswith("pamsegment: error: ")
    assert not (tmp_path / "out").exists()

    def ctrl_c_while_loading(args):
        raise KeyboardInterrupt

    from PAMSegmentLib import cli

    monkeypatch.setitem(cli.METHODS, "copy", ctrl_c_while_loading)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_series_column_chooses_the_dicom_series_and_a_failed_case_keeps_the_note_on_it(tmp_path, capsys):
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.volumes import Volume, write_volume

    small, large = make_volume(shape=(3, 5, 6)), make_volume(shape=(5, 5, 6))
    uid_small, uid_large = "1.2.826.0.1.3680043.2.1125.7.3", "1.2.826.0.1.3680043.2.1125.7.4"
    write_dicom_series(tmp_path / "dcm", small, uid_small, prefix="a")
    write_dicom_series(tmp_path / "dcm", large, uid_large, prefix="b")
    drawn = np.zeros(small.shape, np.uint8)
    drawn[1, 1:4, 2:5] = 1
    write_volume(Volume(drawn, small.spacing, small.origin, small.direction), tmp_path / "prompt.nrrd")  # small's grid
    m = _manifest(tmp_path / "cases.csv", ["image,prompt,output,series", "dcm,prompt.nrrd,largest.nii.gz,",
                                           f"dcm,prompt.nrrd,small.nii.gz,{uid_small}"])
    # batch's pre-flight (session 27) reads the folder's grid from two files' headers, but leaves a slice
    # count a localizer or two could explain (3 of 5 here) to the full read: the row fails at its turn.
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    rows = _report(tmp_path / "out" / "batch_report.csv")
    assert [r["status"] for r in rows] == ["error", "ok"]
    # The largest series was read, so the prompt is not on its grid: the report says both.
    note, error = rows[0]["message"].split(" | ")
    assert note.startswith(f"{tmp_path / 'dcm'} holds 2 DICOM series; using {uid_large} (5 files), the largest; the "
                           "other: ") and note.endswith(" (3 files). Choose another with the manifest's series column.")
    # (since session 41 the refusal names the series the prompt lies on, and how to choose it)
    assert f"prompt.nrrd is not on the grid of the series read from dcm, but on that of its series {uid_small}" in error
    assert f"row 2 (dcm): error: {note} | {error}" in capsys.readouterr().err
    assert _arr(tmp_path / "small.nii.gz").shape == (3, 5, 6) and not (tmp_path / "largest.nii.gz").exists()


def test_the_report_is_utf8_whatever_the_process_locale(tmp_path, cases):
    """A folder name with a non-ASCII letter, in a process whose C library locale is "C" (GDCM's
    DICOM writer leaves it so; some servers start that way): open() without an encoding would use
    ASCII and the report write failed. Reports and tables are written as UTF-8."""
    import locale

    folder = tmp_path / "data" / "Müller"
    (tmp_path / "data" / "c0").rename(folder)
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "Müller/image.nii.gz,Müller/prompt.nii.gz"])
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, "C")
        assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    with open(tmp_path / "out" / "batch_report.csv", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert row["status"] == "ok" and "Müller" in row["image"]


def test_the_report_gives_absolute_paths(tmp_path, cases, monkeypatch):
    # They were relative to the folder batch ran in, which the report does not say.
    _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,",
                                                 "c1/image.nii.gz,c1/prompt.nii.gz,../elsewhere/c1.nii.gz"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "data/cases.csv", "-o", "out", "--method", "copy"]) == 0
    root = tmp_path.resolve()
    assert [(r["image"], r["prompt"], r["output"]) for r in _report(root / "out" / "batch_report.csv")] == [
        (str(root / "data/c0/image.nii.gz"), str(root / "data/c0/prompt.nii.gz"), str(root / "out/c0_image_pam.nii.gz")),
        (str(root / "data/c1/image.nii.gz"), str(root / "data/c1/prompt.nii.gz"), str(root / "elsewhere/c1.nii.gz")),
    ]


def test_a_resumed_report_keeps_what_the_earlier_run_said_of_the_cases_it_skips(tmp_path, cases, monkeypatch):
    import os

    lines = ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz" for n in range(3)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    real = batch_module._run_row

    def cut_at_the_second_case(row, model, args, progress=None):
        if row.number == 3:
            raise KeyboardInterrupt
        real(row, model, args, progress)

    monkeypatch.setattr(batch_module, "_run_row", cut_at_the_second_case)
    assert main(["batch", str(m), "-o", str(out), "--method", "track"]) == 130
    first = _report(out / "batch_report.csv")
    assert [r["status"] for r in first] == ["ok", "not run", "not run"] and first[0]["check_first"].startswith("label 1: ")
    monkeypatch.setattr(batch_module, "_run_row", real)
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    second = _report(out / "batch_report.csv")
    assert [r["status"] for r in second] == ["skipped", "ok", "ok"]
    # the first case's columns were blank in the resumed report; they are what the cut run found
    assert {k: second[0][k] for k in ("seconds", "slices", "check_first")} == {
        k: first[0][k] for k in ("seconds", "slices", "check_first")}
    assert second[0]["message"] == "done in an earlier run (--skip-existing)"
    # resumed again: every row is carried over, the first from the report that carried it
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    third = _report(out / "batch_report.csv")
    assert [r["status"] for r in third] == ["skipped"] * 3
    assert [r["check_first"] for r in third] == [r["check_first"] for r in (first[0], *second[1:])]
    assert [r["message"] for r in third] == ["done in an earlier run (--skip-existing)"] * 3
    # an output written after the report (by something else) does not take the report's word
    report_time = (out / "batch_report.csv").stat().st_mtime_ns
    os.utime(out / "c1_image_pam.nii.gz", ns=(report_time + 10**9, report_time + 10**9))
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    fourth = _report(out / "batch_report.csv")
    assert (fourth[1]["check_first"], fourth[1]["message"]) == ("", "output exists (--skip-existing); it changed after "
                                                                 "the earlier report was written, which does not "
                                                                 "describe it")
    assert fourth[0]["check_first"] == first[0]["check_first"]


def test_paths_are_resolved_once_per_row_not_at_every_report_rewrite(tmp_path, monkeypatch):
    """The report, rewritten after every case, resolved every row's three paths each time (a
    2000-case run spent minutes on it), and the output folders were resolved in two loops."""
    from collections import Counter

    for n in range(4):
        make_ct_case(tmp_path / "data" / f"c{n}", seed=n)
    (tmp_path / "elsewhere").mkdir()
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,output"] + [
        f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../elsewhere/r{n}.nii.gz" for n in range(4)])
    calls, real = Counter(), Path.resolve

    def counting(self, strict=False):
        calls[str(self)] += 1
        return real(self, strict)

    monkeypatch.setattr(Path, "resolve", counting)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0  # 5 report writes
    # each case's folder: its image's and its prompt's, once; the outputs' folder: checked and named, once per row
    assert [calls[str(tmp_path / "data" / f"c{n}")] for n in range(4)] == [2] * 4
    assert calls[str(tmp_path / "data" / ".." / "elsewhere")] == 2 * 4
    rows = batch_module.read_manifest(m, tmp_path / "out")
    batch_module.write_report(rows, tmp_path / "report.csv")
    calls.clear()
    batch_module.write_report(rows, tmp_path / "report.csv")
    assert not calls


def test_a_folder_name_that_is_not_utf8_is_written_to_the_report_as_its_bytes(tmp_path, monkeypatch):
    """Run from a folder named in Latin-1 ('M\\xfcller', from an old archive): the report's absolute
    paths hold it as a lone surrogate, which strict UTF-8 cannot write, and the UnicodeEncodeError
    (not an OSError) was a traceback that left batch_report.csv.tmp behind."""
    import os

    folder = os.path.join(os.fsencode(tmp_path), b"M\xfcller")
    try:
        os.mkdir(folder)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    monkeypatch.chdir(folder)
    make_ct_case(Path("c0"))
    _manifest(Path("cases.csv"), ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])
    assert main(["batch", "cases.csv", "-o", "out", "--method", "copy"]) == 0
    assert sorted(os.listdir("out")) == ["batch_report.csv", "c0_image_pam.nii.gz",  # no .tmp left
                                         "c0_image_pam.nii.gz.keyframes.json"]
    with open("out/batch_report.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        row = next(csv.DictReader(fh))
    assert os.fsencode(row["image"]) == os.path.join(os.path.realpath(folder), b"c0", b"image.nii.gz")  # the bytes
    # and a resumed run reads it back: the case is carried over
    assert main(["batch", "cases.csv", "-o", "out", "--method", "copy", "--skip-existing"]) == 0
    assert _report_bytes("out/batch_report.csv")[0]["message"] == "done in an earlier run (--skip-existing)"


def _report_bytes(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("refused, status", [({2, 3}, 0), ({2, 3, 4, 5}, 2)])
def test_a_report_that_cannot_be_rewritten_mid_run_is_a_warning_and_the_batch_goes_on(tmp_path, cases, monkeypatch,
                                                                                      capsys, refused, status):
    """batch_report.csv open in a spreadsheet that locks it (Windows: the rename is refused) made
    the whole batch stop after the first case, blaming the folder, without the summary. The
    writes are: 1 before any work, 2-4 after each case, 5 at the end."""
    m = _manifest(tmp_path / "data" / "cases.csv",
                  ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz" for n in range(3)])
    out, real, writes = tmp_path / "out", Path.replace, []

    def replace(self, target):
        if Path(target).name == "batch_report.csv":
            writes.append(target)
            if len(writes) in refused:
                raise PermissionError(13, "Permission denied")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == status
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["batch_report.csv"] + sorted(
        f"c{n}_image_pam.nii.gz{record}" for n in range(3) for record in ("", ".keyframes.json"))
    assert "batch: 3 ok of 3 rows in " in captured.out
    warning = (f"pamsegment: warning: cannot write the report {out / 'batch_report.csv'} (Permission denied); it may "
               "be open in another program")
    assert captured.err.count(warning) == 1  # once, however many rewrites fail
    rows = _report(out / "batch_report.csv")
    if status == 0:  # written again after the third case
        assert len(writes) == 4 and [r["status"] for r in rows] == ["ok"] * 3
    else:  # still refused at the end: the report is out of date, and the exit status says so
        assert len(writes) == 5 and [r["status"] for r in rows] == ["not run"] * 3  # as written before the work
        assert captured.err.strip().endswith("; it does not show the cases run since it was last written (their "
                                             "outputs are written)")


def test_a_report_that_cannot_be_written_before_any_work_stops_the_batch(tmp_path, cases, monkeypatch, capsys):
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])

    def locked(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(batch_module, "_run_row", lambda *a, **k: pytest.fail("a case ran"))
    monkeypatch.setattr(Path, "replace", locked)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert capsys.readouterr().err == (
        f"pamsegment: error: cannot write the report {tmp_path / 'out' / 'batch_report.csv'} (Permission denied); it "
        "may be open in another program, which keeps it from being replaced (close it there), or its folder may not "
        "take files\n")
    assert not (tmp_path / "out").exists()  # the folder it made is removed again, and no .tmp is left


def test_a_skipped_row_keeps_the_earlier_report_only_for_the_same_image_and_prompt(tmp_path, cases):
    """The carry-over was keyed on the output alone: a row that now names another image or prompt
    showed them beside the slices and check_first of the case that wrote the file. (Since session
    31 a row naming another file runs again; files moved elsewhere, the same as they were, are
    skipped without the earlier run's figures.)"""
    import shutil

    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,r.nii.gz"])
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "track"]) == 0
    assert _report(out / "batch_report.csv")[0]["check_first"].startswith("label 1: ")
    shutil.copytree(tmp_path / "data" / "c0", tmp_path / "data" / "moved")  # copy2: sizes and times kept
    _manifest(m, ["image,prompt,output", "moved/image.nii.gz,moved/prompt.nii.gz,r.nii.gz"])
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    row = _report(out / "batch_report.csv")[0]
    assert (row["status"], row["seconds"], row["slices"], row["check_first"]) == ("skipped", "0.0", "", "")
    assert row["message"] == "output exists (--skip-existing); the earlier report has it from another image or prompt"
    assert (row["image"], row["prompt"]) == tuple(str(tmp_path.resolve() / "data" / "moved" / p)
                                                  for p in ("image.nii.gz", "prompt.nii.gz"))
    other = sitk.ReadImage(str(tmp_path / "data" / "c1" / "prompt.nii.gz"))  # (the cases' prompts are alike)
    redrawn = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(other), 1, axis=0))
    redrawn.CopyInformation(other)
    sitk.WriteImage(redrawn, str(tmp_path / "data" / "c1" / "prompt2.nii.gz"))
    for now, what in (("c1/image.nii.gz,moved/prompt.nii.gz", "image"),
                      ("moved/image.nii.gz,c1/prompt2.nii.gz", "prompt")):
        _manifest(m, ["image,prompt,output", f"{now},r.nii.gz"])
        assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
        row = _report(out / "batch_report.csv")[0]
        assert row["status"] == "ok"
        assert row["message"].startswith(f"run again: its {what} is not the one its output was made from")
        _manifest(m, ["image,prompt,output", "moved/image.nii.gz,moved/prompt.nii.gz,r.nii.gz"])
        assert main(["batch", str(m), "-o", str(out), "--method", "track"]) == 0


def test_a_series_uid_the_folder_does_not_hold_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    """A wrong series column was found only when its row's turn came (after an hour of cases),
    although the README says every row is checked before any work."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.volumes import write_volume

    volume = make_volume(shape=(3, 5, 6))
    uid = "1.2.826.0.1.3680043.2.1125.7.3"
    write_dicom_series(tmp_path / "dcm", volume, uid)
    (tmp_path / "empty").mkdir()
    write_volume(volume, tmp_path / "prompt.nrrd")
    monkeypatch.setattr(batch_module, "_run_row", lambda *a, **k: pytest.fail("a case ran"))
    for series, folder, message in [(uid[:-1] + "9", "dcm", f"series {uid[:-1]}9 is not in {tmp_path / 'dcm'}; "
                                                            f"available series: {uid}"),
                                    (uid, "empty", f"series {uid} is not in {tmp_path / 'empty'}; it holds no "
                                                   "DICOM series")]:
        m = _manifest(tmp_path / "cases.csv", ["image,prompt,output,series", f"dcm,prompt.nrrd,a.nii.gz,{uid}",
                                               f"{folder},prompt.nrrd,b.nii.gz,{series}"])
        assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
        assert capsys.readouterr().err == f"pamsegment: error: cases.csv row 3: {message}\n"
        assert not (tmp_path / "out").exists()


def test_batch_updates_rows_from_corrected_copies_as_propagate_does(tmp_path, cases, run_cli):
    """previous/edited columns: a row is updated from the corrections (what `propagate --previous
    --edited` writes), its output gets the round's keyframes record, and a plain row replacing an
    update's output replaces that record with its own."""
    from conftest import write_image

    c = cases[0]
    first = tmp_path / "data" / "first.nii.gz"
    assert main(["propagate", str(c.image_path), str(c.prompt_path), "-o", str(first), "--method", "copy"]) == 0
    edited = _arr(first)
    edited[13] = c.truth[13]
    edited[6] = 0
    write_image(edited.astype(np.uint8), tmp_path / "data" / "fixed.nii.gz", c.spacing)
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt,previous,edited,output",
        "c0/image.nii.gz,c0/prompt.nii.gz,first.nii.gz,fixed.nii.gz,../out/c0.nii.gz",
        "c1/image.nii.gz,c1/prompt.nii.gz,,,../out/c1.nii.gz",
    ])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c1.nii.gz.keyframes.json").write_text("{}")  # of an earlier update of that output
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    rows = _report(tmp_path / "out" / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["message"].startswith("update: label 1: keyframes 10 (prompt), 13 (edited); the object is absent "
                                         "on 6")
    single = tmp_path / "single.nii.gz"
    assert main(["propagate", str(c.image_path), str(c.prompt_path), "-o", str(single), "--method", "copy",
                 "--previous", str(first), "--edited", str(tmp_path / "data" / "fixed.nii.gz")]) == 0
    np.testing.assert_array_equal(_arr(tmp_path / "out" / "c0.nii.gz"), _arr(single))
    assert (tmp_path / "out" / "c0.nii.gz.keyframes.json").read_text() == \
        (tmp_path / "single.nii.gz.keyframes.json").read_text()
    # the plain row's own record replaced the earlier update's
    assert json.loads((tmp_path / "out" / "c1.nii.gz.keyframes.json").read_text())["labels"] == \
        {"1": {"keyframes": [10], "walls": []}}
    # --skip-existing: an update row counts as done only with its keyframes record beside its output
    record = (tmp_path / "out" / "c0.nii.gz.keyframes.json")
    kept = record.read_text()
    record.unlink()
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "copy", "--skip-existing")
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in _report(tmp_path / "out" / "batch_report.csv")] == ["ok", "skipped"]
    assert record.read_text() == kept
    # a second round, from the batch's output, keeps the first round's keyframes and walls
    fixed2 = _arr(tmp_path / "out" / "c0.nii.gz")
    fixed2[8] = c.truth[8]
    write_image(fixed2.astype(np.uint8), tmp_path / "data" / "fixed2.nii.gz", c.spacing)
    m = _manifest(tmp_path / "data" / "round2.csv", [
        "image,prompt,previous,edited,output",
        "c0/image.nii.gz,c0/prompt.nii.gz,../out/c0.nii.gz,fixed2.nii.gz,../out/c0_round2.nii.gz"])
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    rows = _report(tmp_path / "out" / "batch_report.csv")
    assert rows[0]["message"].startswith("update: label 1: keyframes 10 (prompt), 13 (earlier rounds), 8 (edited); "
                                         "the object is absent on 6")
    # one of the two columns alone is refused before any work, naming the row
    m = _manifest(tmp_path / "data" / "half.csv", ["image,prompt,previous,edited",
                                                     "c0/image.nii.gz,c0/prompt.nii.gz,first.nii.gz,"])
    proc = run_cli("batch", m, "-o", tmp_path / "out2", "--method", "copy")
    assert proc.returncode == 2 and "half.csv row 2: previous and edited go together" in proc.stderr


def test_batch_update_messages_name_the_manifest_columns(tmp_path, cases, run_cli):
    """A batch row's update refusal names its columns (previous), not the command line's options."""
    from conftest import write_image

    c = cases[0]
    first = tmp_path / "data" / "first.nii.gz"
    assert main(["propagate", str(c.image_path), str(c.prompt_path), "-o", str(first), "--method", "copy"]) == 0
    edited = _arr(first)
    edited[13] = c.truth[13]
    write_image(edited.astype(np.uint8), tmp_path / "data" / "fixed.nii.gz", c.spacing)
    (tmp_path / "data" / "first.nii.gz.keyframes.json").write_text("not json")
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt,previous,edited,output",
        "c0/image.nii.gz,c0/prompt.nii.gz,first.nii.gz,fixed.nii.gz,../out/c0.nii.gz"])
    proc = run_cli("batch", m, "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2
    (row,) = _report(tmp_path / "out" / "batch_report.csv")
    assert row["status"] == "error"
    assert "first.nii.gz.keyframes.json (the record of the run that wrote previous) cannot be read" in \
        row["message"] and "--previous" not in row["message"]


def test_the_cases_bar_follows_the_case_under_way(tmp_path, cases, capsys, monkeypatch):
    """The bar moved once per case only: on full-size scans nothing moved for minutes."""
    monkeypatch.setenv("PAMSEGMENT_PROGRESS", "bar")  # as on a terminal (captured stderr is not one)
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    err = capsys.readouterr().err
    assert "this case 100%" in err
    # Drawn at most once a second and at the end: a fast case shows its end only, not every percent.
    shown = [int(p.split("%")[0]) for p in err.split("this case ")[1:]]
    assert shown[-1] == 100 and len(shown) <= 4, shown
    # The throttle itself: with no interval every step is drawn, in order.
    from tqdm import tqdm

    with tqdm(total=1, file=io.StringIO()) as bar:
        drawn = []
        bar.set_postfix_str = lambda text, refresh=True: drawn.append((text, refresh))
        progress = batch_module._case_progress(bar, every=0.0)
        for f in (0.25, 0.5, 1.0):
            progress(f, "")
        # on a server (batch --server) its waits are said: the bar stands at 0 % meanwhile
        progress(0.0, "server: busy, 8 jobs waiting already (it queues at most 8); asking again in 5 s")
        progress(0.0, "server: waiting (queue position 2)")
        progress(0.5, "server: slice 9 (50%)")
    assert drawn == [("this case 0%", False), ("this case 25%", True), ("this case 50%", True),
                     ("this case 100%", True),
                     ("this case 0%, server: busy, 8 jobs waiting already (it queues at most 8); asking again in 5 s",
                      True), ("this case 0%, server: waiting (queue position 2)", True), ("this case 50%", True)]


def test_a_default_output_name_too_long_is_refused_with_its_row_before_any_work(tmp_path, cases):
    """Default names join every folder of the image's path: nested patient folders passed 255
    bytes, and the OSError came after the case was computed, as a traceback that ended the batch."""
    import shutil

    deep = tmp_path / "data" / "/".join(f"patient_folder_with_a_long_name_{n:02d}" for n in range(8))
    deep.mkdir(parents=True)
    for name in ("image.nii.gz", "prompt.nii.gz"):
        shutil.copyfile(tmp_path / "data" / "c0" / name, deep / name)
    rel = deep.relative_to(tmp_path / "data")
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", f"{rel}/image.nii.gz,{rel}/prompt.nii.gz"])
    from PAMSegmentLib.errors import InputError

    with pytest.raises(InputError, match=r"^cases.csv row 2: the name patient_folder_with_a_long_name_00_patie\.\.\. "
                                         r"in .* is \d+ bytes long; file systems take at most 255: choose a shorter "
                                         r"name \(this default name joins the folders of the image's path: give the "
                                         r"row an output\)$"):
        batch_module.read_manifest(m, tmp_path / "out")
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert not (tmp_path / "out").exists()
    # A default name of 241-255 bytes is legal (its keyframes record's name would not be): written.
    short = tmp_path / "data" / "/".join(f"patient_folder_with_a_long_name_{n:02d}" for n in range(6)) / ("s" * 22)
    short.mkdir(parents=True)
    for name in ("image.nii.gz", "prompt.nii.gz"):
        shutil.copyfile(tmp_path / "data" / "c0" / name, short / name)
    rel = short.relative_to(tmp_path / "data")
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", f"{rel}/image.nii.gz,{rel}/prompt.nii.gz",
                                                   "c1/image.nii.gz,c1/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert len(written) == 2 and 241 <= max(len(n.encode()) for n in written) <= 255, [len(n) for n in written]


def test_a_report_that_cannot_be_written_leaves_no_folder_behind(tmp_path, cases, monkeypatch, capsys):
    """-o DIR on a full disk: the report failed correctly (exit 2) but the empty DIR stayed."""
    from PAMSegmentLib.errors import InputError

    def full(rows, path, *args):
        raise InputError(f"cannot write the report {path} (No space left on device); check that its folder is "
                         "writable and has space")

    monkeypatch.setattr(batch_module, "write_report", full)
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    assert "cannot write the report" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    assert main(["batch", str(m), "-o", str(tmp_path / "kept"), "--method", "copy"]) == 2
    assert (tmp_path / "kept").is_dir()


def test_skip_existing_runs_again_what_another_method_made(tmp_path, cases, capsys):
    """A trial with --method copy, then the real run with --skip-existing: every output counted as
    done ("done in an earlier run") and the copy results stayed. The report names what made each
    output, and --skip-existing runs again the rows made with something else."""
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    assert [r["method"] for r in _report(out / "batch_report.csv")] == ["copy", "copy"]
    copied = (out / "r0.nii.gz").read_bytes()
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "track"), ("ok", "track")]
    assert rows[0]["message"].startswith("run again: its output was made with copy, this run uses track")
    assert (out / "r0.nii.gz").read_bytes() != copied
    # The same method again: skipped, and the report still says what made them.
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    assert [(r["status"], r["method"]) for r in _report(out / "batch_report.csv")] == [("skipped", "track")] * 2


def test_a_row_run_again_that_fails_keeps_what_made_its_output(tmp_path, cases):
    """A re-run of copy-made outputs rewrote the report; a row it did not finish lost its "made with
    copy", so the next --skip-existing counted the copy output as done."""
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    image = tmp_path / "data" / "c1" / "image.nii.gz"
    kept = image.read_bytes()
    image.write_bytes(b"not an image")  # row 3 fails on the re-run, while running: its output stays the copy one
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 2
    rows = _report(out / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "track"), ("error", "copy")]
    image.write_bytes(kept)
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("skipped", "track"), ("ok", "track")]


def test_a_run_without_skip_existing_that_stops_early_keeps_what_made_the_outputs_it_did_not_replace(tmp_path, cases):
    """A review (s28): a copy trial, then a run without --skip-existing stopped at its first row
    (--stop-on-error; Ctrl-C or a lost server alike). The earlier report was read only with
    --skip-existing, so the rewritten report had an empty method for the rows not reached, and the
    advised resume with --skip-existing kept the copy outputs as done (exit 0)."""
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(3)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    copied = [(out / f"r{n}.nii.gz").read_bytes() for n in range(3)]
    image = tmp_path / "data" / "c0" / "image.nii.gz"
    kept = image.read_bytes()
    image.write_bytes(b"not an image")
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--stop-on-error"]) == 2
    rows = _report(out / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("error", "copy"), ("not run", "copy"), ("not run", "copy")]
    image.write_bytes(kept)
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "track")] * 3
    assert all((out / f"r{n}.nii.gz").read_bytes() != copied[n] for n in range(3))


def test_a_second_manifest_into_the_same_folder_keeps_the_first_ones_rows_in_the_report(tmp_path, cases, capsys):
    first = _manifest(tmp_path / "data" / "first.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz",
                                                        "c2/image.nii.gz,c2/prompt.nii.gz"])
    second = _manifest(tmp_path / "data" / "second.csv", ["image,prompt", "c1/image.nii.gz,c1/prompt.nii.gz",
                                                          "c2/image.nii.gz,c2/prompt.nii.gz"])
    out = tmp_path / "out"
    assert main(["batch", str(first), "-o", str(out), "--method", "copy"]) == 0
    report = out / "batch_report.csv"
    assert {r["manifest"] for r in _report(report)} == {str(first.resolve())}
    assert main(["batch", str(second), "-o", str(out), "--method", "track"]) == 0
    rows = _report(report)
    # this run's rows first, then the first manifest's row for c0 (its c2 row: written again by this run)
    assert [(Path(r["manifest"]).name, r["row"], Path(r["output"]).name, r["method"]) for r in rows] == [
        ("second.csv", "2", "c1_image_pam.nii.gz", "track"),
        ("second.csv", "3", "c2_image_pam.nii.gz", "track"),
        ("first.csv", "2", "c0_image_pam.nii.gz", "copy")]
    # The first manifest again: its own rows rewritten, the second's kept; --skip-existing sees c2 made by track
    capsys.readouterr()
    assert main(["batch", str(first), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(report)
    assert [(Path(r["manifest"]).name, r["status"], Path(r["output"]).name) for r in rows] == [
        ("first.csv", "skipped", "c0_image_pam.nii.gz"), ("first.csv", "ok", "c2_image_pam.nii.gz"),
        ("second.csv", "ok", "c1_image_pam.nii.gz")]
    assert rows[1]["message"].startswith("run again: its output was made with track") and rows[1]["method"] == "copy"


def test_two_batches_rewriting_one_folders_report_at_once_keep_each_others_rows(tmp_path):
    """Two batches into one folder at once (two people's overnight runs) shared the temporary
    batch_report.csv.tmp (a rewrite failed: "No such file or directory") and each rewrote the
    report from the other manifest's rows read at its start, so one manifest's rows vanished. Two
    processes rewrite the report 40 times each: no rewrite fails and the report ends with both
    manifests' rows."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from PAMSegmentLib.batch import BatchRow, write_report
        out, name = Path(sys.argv[1]), sys.argv[2]
        rows = [BatchRow(n + 2, out / f"{name}{n}.nii.gz", out / f"{name}{n}_p.nii.gz", out / f"{name}{n}_o.nii.gz",
                         status="ok") for n in range(3)]
        for _ in range(40):
            write_report(rows, out / "batch_report.csv", out / f"{name}.csv")
        """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], env=env, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with open(tmp_path / "batch_report.csv", newline="") as fh:
        manifests = sorted(Path(r["manifest"]).name for r in csv.DictReader(fh))
    assert manifests == ["a.csv"] * 3 + ["b.csv"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_report.csv"]  # no temporaries, no lock file


def _three_cases(tmp_path):
    return _manifest(tmp_path / "data" / "cases.csv",
                     ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz" for n in range(3)])


def test_a_runtime_error_that_is_not_about_memory_stops_the_batch(tmp_path, cases, monkeypatch):
    """Pins the rule in test_a_case_that_runs_out_of_memory_fails_alone's docstring that it does not
    check: a RuntimeError that is not about memory is a bug, not a failing case, so it stops the
    batch and reaches the caller. Row 3 (the second case) raises one: the first case is ok, the
    second and third are reported "not run", and the third is never started."""
    m = _three_cases(tmp_path)
    real, calls = batch_module._run_row, []

    def run_row(row, model, args, progress=None):
        calls.append(row.number)
        if row.number == 3:
            raise RuntimeError("index out of range")
        real(row, model, args, progress)

    monkeypatch.setattr(batch_module, "_run_row", run_row)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="index out of range"):
        main(["batch", str(m), "-o", str(out), "--method", "copy"])
    assert calls == [2, 3]
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["ok", "not run", "not run"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c0_image_pam.nii.gz"]


def test_a_file_error_no_check_foresaw_fails_that_case_alone(tmp_path, cases, monkeypatch):
    """Pins that an OSError while running one case (here a full disk, errno 28, which no pre-check
    can foresee) fails that case only: statuses ok, error, ok, the message names the cause, and
    the third case is written."""
    m = _three_cases(tmp_path)
    real = batch_module._run_row

    def run_row(row, model, args, progress=None):
        if row.number == 3:
            raise OSError(28, "No space left on device")
        real(row, model, args, progress)

    monkeypatch.setattr(batch_module, "_run_row", run_row)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 2
    report = _report(out / "batch_report.csv")
    assert [r["status"] for r in report] == ["ok", "error", "ok"]
    assert "No space left on device" in report[1]["message"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c0_image_pam.nii.gz", "c2_image_pam.nii.gz"]


def test_stop_on_error_stops_after_the_first_failing_case(tmp_path, cases):
    """Pins --stop-on-error: the manifest of the first test (its second row uses an image as its own
    prompt, refused when its turn comes) gives ok, error and then "not run" for the third row,
    which is not written; without the option the third row runs (ok)."""
    import shutil

    shutil.copy(tmp_path / "data" / "c1" / "image.nii.gz", tmp_path / "data" / "c1" / "copy.nii.gz")  # a bad prompt
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt,output",
        "c0/image.nii.gz,c0/prompt.nii.gz,",
        "c1/image.nii.gz,c1/copy.nii.gz,",
        "c2/image.nii.gz,c2/prompt.nii.gz,../out/third.nrrd",
    ])
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--stop-on-error"]) == 2
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["ok", "error", "not run"]
    assert not (out / "third.nrrd").exists()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 2
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["ok", "error", "ok"]
    assert (out / "third.nrrd").exists()


@pytest.mark.parametrize("image", ["c1/image.nii.gz", "dcm"])
def test_a_prompt_of_another_case_is_found_before_any_work(tmp_path, cases, capsys, image):
    """A review: a row whose prompt belongs to another scan (another grid) failed only at its turn,
    after the earlier cases had run. Every row's grids are now compared from the headers first; a
    DICOM folder's (a first-user review: it was skipped) from its first two files' headers."""
    if image == "dcm":
        from test_volumes import write_dicom_series

        from PAMSegmentLib.volumes import read_volume

        ct = read_volume(cases[1].image_path)
        write_dicom_series(tmp_path / "data" / "dcm", ct, "1.2.826.0.1.3680043.2.1125.7.41")
    other = make_ct_case(tmp_path / "data" / "big", shape=(22, 40, 48), seed=9)
    m = _manifest(tmp_path / "data" / "cases.csv", [
        "image,prompt",
        "c0/image.nii.gz,c0/prompt.nii.gz",
        f"{image},{other.prompt_path}",
    ])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pamsegment: error: cases.csv row 3: prompt.nii.gz is not on the image grid: size differs")
    assert "use --resample-prompt to resample it" in err
    assert not (tmp_path / "out").exists()
    m.write_text(f"image,prompt\n{image},{cases[1].prompt_path}\n")  # the image's own prompt: runs
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0

def test_a_cases_notes_are_said_on_the_console_and_counted_in_the_summary(tmp_path, cases, capsys, monkeypatch):
    """A review: the console said "2 ok" while a row's drift stop and lost voxels sat only in the
    report's message column (and the drift note lacked the option propagate names)."""
    from PAMSegmentLib.propagate import PropagationResult

    monkeypatch.setattr(PropagationResult, "kinds_of_notes", lambda self, edited=None: [
        ("drift", "label 1: stopped at once"), ("lost", "label 1 lost 3 voxels")])
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz",
                                                    "c1/image.nii.gz,c1/prompt.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    out, err = capsys.readouterr()
    assert ("row 2 (c0/image.nii.gz): note: label 1: stopped at once (--intensity-gate off) | label 1 lost 3 voxels"
            in err)
    assert "batch: 2 ok (with notes: rows 2, 3) of 2 rows" in out
    rows = _report(tmp_path / "out" / "batch_report.csv")
    assert rows[0]["message"] == "label 1: stopped at once (--intensity-gate off) | label 1 lost 3 voxels"


def test_a_batch_in_a_log_says_each_finished_case_on_a_line(tmp_path, cases, capsys, monkeypatch):
    """Off a terminal (a log) the cases bar is not drawn (redrawn bars fill a log with carriage
    returns); a line per finished case says how far the batch is."""
    monkeypatch.delenv("PAMSEGMENT_PROGRESS", raising=False)
    import shutil

    shutil.copy(tmp_path / "data" / "c1" / "image.nii.gz", tmp_path / "data" / "c1" / "copy.nii.gz")  # a bad prompt
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz",
                                                    "c1/image.nii.gz,c1/copy.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("cases: ")]
    assert [line.split(",")[0] for line in lines] == ["cases: 1/2 (row 2: ok", "cases: 2/2 (row 3: error"]


def test_a_sheared_image_whose_default_output_cannot_hold_it_is_found_before_any_work(tmp_path, cases, capsys):
    """A review: a sheared image (gantry tilt) with the default .nii.gz output failed at its turn,
    after the earlier cases had run, with an output name the tool itself had chosen."""
    sheared = sitk.ReadImage(str(tmp_path / "data" / "c1" / "image.nii.gz"))
    sheared.SetDirection((1, 0, 0, 0, 1, 0.2588, 0, 0, 0.9659))  # k tilted 15 degrees towards j
    sitk.WriteImage(sheared, str(tmp_path / "data" / "sheared.nrrd"))
    prompt = sitk.ReadImage(str(tmp_path / "data" / "c1" / "prompt.nii.gz"))
    prompt.CopyInformation(sheared)
    sitk.WriteImage(prompt, str(tmp_path / "data" / "sheared_prompt.nrrd"))
    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt", "c0/image.nii.gz,c0/prompt.nii.gz",
                                                    "sheared.nrrd,sheared_prompt.nrrd"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pamsegment: error: cases.csv row 3: the image's grid is sheared") and \
        "write sheared_pam.nrrd or .mha instead (give the row an output column)" in err
    assert not (tmp_path / "out").exists()


def test_a_batch_in_a_log_says_a_servers_wait_once_a_minute(capsys, monkeypatch):
    """A review: off a terminal the cases bar is not drawn, and with it went the server's "busy"
    and queue messages: a batch waiting on a full queue said nothing for as long as it waited."""
    from tqdm import tqdm

    clock = [1000.0]
    monkeypatch.setattr(batch_module.time, "monotonic", lambda: clock[0])
    with tqdm(total=1, file=io.StringIO(), disable=True) as bar:
        progress = batch_module._case_progress(bar, lines=True, row=batch_module.BatchRow(
            number=4, image=Path("a.nii.gz"), prompt=Path("p.nii.gz"), output=Path("o.nii.gz")))
        for n in range(3):
            progress(0.0, "server: busy, 8 jobs waiting already (it queues at most 8); asking again in 5 s")
            clock[0] += 30
        progress(0.2, "server: label 1: slice 3")
    assert capsys.readouterr().err.splitlines() == [
        "row 4: server: busy, 8 jobs waiting already (it queues at most 8); asking again in 5 s"] * 2 + [
        "row 4: 20%"]  # (90 s into the case: a long case says its progress, test_review_s40)


def test_a_batch_correction_round_with_another_method_says_so_and_plain_updates_are_no_notes(tmp_path, cases,
                                                                                              capsys):
    """A diff review: batch update rows lacked propagate's note that the round corrected ran another
    method, and every update row counted as "with notes" (its "update:" lines)."""
    from PAMSegmentLib.volumes import read_volume, write_volume

    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt,output", "c0/image.nii.gz,c0/prompt.nii.gz,"
                                                    "../r1/first.nii.gz"])
    (tmp_path / "r1").mkdir()
    assert main(["batch", str(m), "-o", str(tmp_path / "r1"), "--method", "copy"]) == 0
    first = read_volume(tmp_path / "r1" / "first.nii.gz")
    edited = first.array.copy()
    edited[12] = 0
    first.array = edited
    write_volume(first, tmp_path / "r1" / "edited.nii.gz")
    upd = _manifest(tmp_path / "data" / "upd.csv", [
        "image,prompt,output,previous,edited",
        "c0/image.nii.gz,c0/prompt.nii.gz,../r2/same.nii.gz,../r1/first.nii.gz,../r1/edited.nii.gz"])
    (tmp_path / "r2").mkdir()
    capsys.readouterr()
    assert main(["batch", str(upd), "-o", str(tmp_path / "r2"), "--method", "copy"]) == 0
    assert "batch: 1 ok of 1 row" in capsys.readouterr().out  # not "with notes": its update lines are no notes
    assert _report(tmp_path / "r2" / "batch_report.csv")[0]["message"].startswith("update: label 1: keyframes")
    other = _manifest(tmp_path / "data" / "other.csv", [
        "image,prompt,output,previous,edited",
        "c0/image.nii.gz,c0/prompt.nii.gz,../r2/track.nii.gz,../r1/first.nii.gz,../r1/edited.nii.gz"])
    assert main(["batch", str(other), "-o", str(tmp_path / "r2"), "--method", "track"]) == 0
    out, err = capsys.readouterr()
    assert "with notes: row 2" in out
    assert "label 1: the round you corrected ran --method copy and this one --method track" in err


def test_a_results_folder_copied_elsewhere_still_knows_what_made_its_outputs(tmp_path, cases):
    """A review (s28): the reports named outputs by absolute path only, so in a copy of the results
    folder (or one mounted at another path on another shard machine) a --method copy trial's
    outputs were skipped as done. The report also says where each output lies within the folder."""
    import shutil

    m = _manifest(tmp_path / "data" / "cases.csv", ["image,prompt"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz"
                                                                        for n in range(2)])
    trial, moved = tmp_path / "trial", tmp_path / "elsewhere" / "results"
    assert main(["batch", str(m), "-o", str(trial), "--method", "copy"]) == 0
    assert [r["output_in_folder"] for r in _report(trial / "batch_report.csv")] == ["c0_image_pam.nii.gz",
                                                                                     "c1_image_pam.nii.gz"]
    shutil.copytree(trial, moved)  # copy2: the files keep their times
    assert main(["batch", str(m), "-o", str(moved), "--method", "track", "--skip-existing"]) == 0
    rows = _report(moved / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "track")] * 2
    assert rows[0]["message"].startswith("run again: its output was made with copy")


def test_skip_existing_runs_again_a_row_that_failed_last_time_or_whose_inputs_changed(tmp_path, cases, capsys):
    """A review (session 30): run 1 wrote a row's output; its prompt was then redrawn (here emptied
    by mistake) and run 2 failed on it, leaving the old output (as it should); a resume with
    --skip-existing then counted the row as done, exit 0: a result of the old prompt accepted."""
    import os

    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    prompt = tmp_path / "data" / "c0" / "prompt.nii.gz"
    image = sitk.ReadImage(str(prompt))
    empty = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 0)
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(prompt))
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 2
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["error", "ok"]
    capsys.readouterr()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 2
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["error", "skipped"]
    assert rows[0]["message"].startswith("run again: it failed in the last run, so its output is from an earlier one")

    sitk.WriteImage(image, str(prompt))  # drawn again: newer than the output of run 1
    other = tmp_path / "data" / "c1" / "image.nii.gz"
    old_time = other.stat().st_mtime_ns
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "data" / "c2" / "image.nii.gz")), str(other))
    os.utime(other, ns=(old_time - 10**9, old_time - 10**9))  # the second row's image replaced by an older-dated one
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["message"].startswith("run again: its image is not the one its output was made from")


def _dicom_case(tmp_path, uid, output=None):
    """A 12-slice DICOM series in tmp_path/p01, a prompt beside it and a one-row manifest (its
    output column ``output`` if given): the manifest's path."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.volumes import Volume, write_volume

    vol = make_volume(shape=(12, 20, 22))
    write_dicom_series(tmp_path / "p01", vol, uid)
    prompt = np.zeros(vol.array.shape, np.uint8)
    prompt[6, 5:15, 5:15] = 1
    write_volume(Volume(prompt, vol.spacing, vol.origin, vol.direction), tmp_path / "p01_prompt.nrrd")
    row = "p01,p01_prompt.nrrd" + (f",{output}" if output else "")
    return _manifest(tmp_path / "cases.csv", ["image,prompt" + (",output" if output else ""), row])


def test_skip_existing_judges_a_dicom_folder_by_its_files_not_its_own_time(tmp_path, capsys):
    """A re-review (session 30): a row whose output lies inside its DICOM folder was run again by
    every --skip-existing (putting the output in changed the folder's own time); a file of the
    series rewritten in place was missed."""
    import os

    m = _dicom_case(tmp_path, "1.2.826.0.1.3680043.2.1125.7.99", output="p01/seg.nii.gz")
    out = tmp_path / "out"
    for expected in ("ok", "skipped", "skipped"):
        assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
        assert _report(out / "batch_report.csv")[0]["status"] == expected
    a_file = sorted((tmp_path / "p01").glob("*.dcm"))[0]
    later = (tmp_path / "p01" / "seg.nii.gz").stat().st_mtime_ns + 10 * 10**9
    os.utime(a_file, ns=(later, later))  # one file of the series written again
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    row = _report(out / "batch_report.csv")[0]
    assert row["status"] == "ok"
    assert row["message"].startswith("run again: its image is not the one its output was made from")


def test_skip_existing_sees_a_file_taken_out_of_a_dicom_series(tmp_path, capsys):
    """A re-review (session 30): judging a DICOM folder by its newest file missed a slice file
    removed from the series (no file is newer then): the row was skipped as done, its output from
    the 12-slice series kept for the 11-slice one."""
    m = _dicom_case(tmp_path, "1.2.826.0.1.3680043.2.1125.7.98")
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    sorted((tmp_path / "p01").glob("*.dcm"))[-1].unlink()
    capsys.readouterr()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 2
    assert "not on the image grid: size differs" in capsys.readouterr().err  # run again: the series changed


def test_skip_existing_is_not_fooled_by_metadata_changes_or_a_linked_folder(tmp_path, capsys):
    """A re-review (session 30): judging inputs by their inode change time too reran every row
    after a chmod, a backup tool or cp -a; a DICOM folder reached through a symbolic link, with the
    output inside it, ran again every time."""
    import os

    m = _dicom_case(tmp_path, "1.2.826.0.1.3680043.2.1125.7.97", output="p01/seg.nii.gz")
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    for path in [tmp_path / "p01_prompt.nrrd", *(tmp_path / "p01").glob("*.dcm")]:
        os.chmod(path, 0o640)  # the content is the same: only the inode change time moves
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert _report(out / "batch_report.csv")[0]["status"] == "skipped"
    os.symlink(tmp_path / "p01", tmp_path / "linked")
    linked = _manifest(tmp_path / "linked.csv", ["image,prompt,output", "linked,p01_prompt.nrrd,linked/seg2.nii.gz"])
    for expected in ("ok", "skipped", "skipped"):
        assert main(["batch", str(linked), "-o", str(tmp_path / "out2"), "--method", "copy", "--skip-existing"]) == 0
        assert _report(tmp_path / "out2" / "batch_report.csv")[0]["status"] == expected


def test_skip_existing_judges_inputs_by_what_the_output_was_made_from(tmp_path, cases, monkeypatch, capsys):
    """Session 31 (carried from the session-30 review): judging inputs by modification times
    missed an image replaced by a file with an older time (cp -p, unzip -o, mv): the row was
    skipped, its output of the old image kept. The report now records each row's inputs as they
    were read (size and time per file), and any difference reruns the row; a chmod does not."""
    import os
    import shutil

    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    recorded = [r["inputs"] for r in _report(out / "batch_report.csv")]
    assert all(re.fullmatch(r"image:h[0-9a-f]{16} prompt:h[0-9a-f]{16}", v) for v in recorded), recorded
    image = tmp_path / "data" / "c0" / "image.nii.gz"
    os.chmod(image, 0o600)
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert [r["inputs"] for r in rows] == recorded  # carried over with the output it describes

    # the image replaced by another with a time older than the output's (as cp -p leaves it)
    backup = tmp_path / "c2_image_from_last_week.nii.gz"
    shutil.copyfile(tmp_path / "data" / "c2" / "image.nii.gz", backup)
    os.utime(backup, ns=(10**18, 10**18))  # 2001
    shutil.copy2(backup, image)
    assert image.stat().st_mtime_ns < (out / "r0.nii.gz").stat().st_mtime_ns
    # a run without --skip-existing that stops before the row is in keeps what its output was made from
    real = batch_module._run_row

    def interrupted(row, model, args, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_run_row", interrupted)
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 130
    assert [r["inputs"] for r in _report(out / "batch_report.csv")] == recorded
    monkeypatch.setattr(batch_module, "_run_row", real)
    capsys.readouterr()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[0]["message"].startswith("run again: its image is not the one its output was made from")
    assert rows[0]["inputs"] != recorded[0] and rows[1]["inputs"] == recorded[1]
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["skipped", "skipped"]


def test_skip_existing_leaves_hidden_files_in_a_dicom_folder_out_and_reads_old_reports_by_times(tmp_path, capsys):
    """Session 31: a .DS_Store (a Mac's Finder) appearing in a DICOM folder reran its row (the
    folder's own time moved); a report written before the ``inputs`` column is still judged by
    modification times."""
    import os

    m = _dicom_case(tmp_path, "1.2.826.0.1.3680043.2.1125.7.96")
    out = tmp_path / "out"
    report = out / "batch_report.csv"

    def as_an_earlier_version_wrote_it():
        rows = _report(report)
        with open(report, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=[f for f in rows[0] if f != "inputs"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    as_an_earlier_version_wrote_it()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert _report(report)[0]["status"] == "skipped" and _report(report)[0]["inputs"].startswith("image:")
    as_an_earlier_version_wrote_it()
    a_file = sorted((tmp_path / "p01").glob("*.dcm"))[0]
    later = (out / "p01_pam.nii.gz").stat().st_mtime_ns + 10**9
    os.utime(a_file, ns=(later, later))
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    row = _report(report)[0]
    assert row["status"] == "ok" and row["message"].startswith("run again: its image changed after its output was")

    (tmp_path / "p01" / ".DS_Store").write_bytes(b"\0" * 64)  # the report now records the inputs
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert _report(report)[0]["status"] == "skipped"


def test_a_folder_reached_by_another_path_and_back_keeps_what_made_its_outputs(tmp_path, cases, capsys):
    """A review (session 31): a project run at one path, then at another (moved, or its disk mounted
    elsewhere) with a --method copy trial, kept the first path's rows as another manifest's; back
    at the first path, --skip-existing found those stale rows by their absolute paths and skipped
    the copy trial's outputs as the other method's."""
    import shutil

    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    _manifest(tmp_path / "data" / "cases.csv", lines)
    first, second = tmp_path / "mount1", tmp_path / "mount2"
    first.mkdir()
    shutil.move(str(tmp_path / "data"), str(first / "data"))
    assert main(["batch", str(first / "data" / "cases.csv"), "-o", str(first / "out"), "--method", "track"]) == 0
    shutil.move(str(first), str(second))
    assert main(["batch", str(second / "data" / "cases.csv"), "-o", str(second / "out"), "--method", "copy"]) == 0
    rows = _report(second / "out" / "batch_report.csv")
    assert [r["method"] for r in rows] == ["copy", "copy"]  # the first path's rows of the same outputs are gone
    shutil.move(str(second), str(first))
    capsys.readouterr()
    assert main(["batch", str(first / "data" / "cases.csv"), "-o", str(first / "out"), "--method", "track",
                 "--skip-existing"]) == 0
    rows = _report(first / "out" / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "track"), ("ok", "track")]
    assert all(r["message"].startswith("run again: its output was made with copy, this run uses track") for r in rows)


def test_an_earlier_report_with_a_stale_kept_row_gives_the_rows_this_run_wrote_the_last_word(tmp_path, cases):
    """A report written before session 31 may hold, after a run's own rows, another mount point's
    stale row of the same output (kept as another manifest's): the run's own row, first in the
    report, is what made the output."""
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    report = out / "batch_report.csv"
    rows = _report(report)
    stale = [dict(r, method="track", manifest="/elsewhere/cases.csv") for r in rows]
    with open(report, "a", newline="", encoding="utf-8") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerows(stale)
    assert main(["batch", str(m), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    assert [r["status"] for r in _report(report)[:2]] == ["ok", "ok"]  # made with copy: run again


def test_an_interrupt_while_the_report_is_written_leaves_no_temporary_and_no_new_folder(tmp_path, cases,
                                                                                         monkeypatch, capsys):
    """A review (session 31): the report's temporary was removed only on a file error; a Ctrl-C or
    SIGTERM during a rewrite (often, in a batch of quick cases) left batch_report.csv.<id>.tmp, and
    on the first write the new -o folder stayed with it ("leaves nothing behind")."""
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)

    class Interrupted(csv.DictWriter):
        def writerows(self, rows):
            raise KeyboardInterrupt

    monkeypatch.setattr(batch_module.csv, "DictWriter", Interrupted)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 130
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    calls = []
    real = csv.DictWriter.writerow

    def cut_at_the_second_rewrite(self, row):
        calls.append(1)
        if len(calls) == 5:  # header, then two rows per rewrite: the second rewrite's first row
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", cut_at_the_second_rewrite)
    assert main(["batch", str(m), "-o", str(tmp_path / "out"), "--method", "copy"]) == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "batch_report.csv", "r0.nii.gz", "r0.nii.gz.keyframes.json", "r1.nii.gz", "r1.nii.gz.keyframes.json"]


def test_skip_existing_takes_times_a_copy_rounded_and_sees_a_mhd_files_voxels(tmp_path, cases, monkeypatch, capsys):
    """A re-review (session 31): fingerprints held times to the nanosecond, so inputs copied onto a
    disk that keeps times to 10 ms (exFAT), 1 s (HFS+) or 2 s (FAT) reran every row; a MetaImage's
    voxels, in the .raw file its .mhd header names, were not fingerprinted at all."""
    import os

    monkeypatch.setattr(batch_module, "HASHED_UP_TO", 0)  # every file by its size and time, as large images are
    lines = ["image,prompt,output"] + [f"c{n}/image.nii.gz,c{n}/prompt.nii.gz,../out/r{n}.nii.gz" for n in range(2)]
    m = _manifest(tmp_path / "data" / "cases.csv", lines)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    for n in range(2):  # copied onto FAT: times to 2 s
        for name in ("image.nii.gz", "prompt.nii.gz"):
            path = tmp_path / "data" / f"c{n}" / name
            t = path.stat().st_mtime_ns // (2 * 10**9) * (2 * 10**9)
            os.utime(path, ns=(t, t))
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["skipped", "skipped"]
    image = tmp_path / "data" / "c0" / "image.nii.gz"  # replaced by an older file of the same size
    t = image.stat().st_mtime_ns - 5 * 10**9
    image.write_bytes(image.read_bytes()[::-1][::-1])
    os.utime(image, ns=(t, t))
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report(out / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[0]["message"].startswith("run again: its image is not the one its output was made from")

    vol = sitk.ReadImage(str(tmp_path / "data" / "c1" / "image.nii.gz"))
    sitk.WriteImage(vol, str(tmp_path / "data" / "c1" / "image.mhd"), False)  # image.mhd + image.raw
    _manifest(m, ["image,prompt,output", "c1/image.mhd,c1/prompt.nii.gz,../out/mhd.nii.gz"])
    monkeypatch.undo()
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    raw = tmp_path / "data" / "c1" / "image.raw"
    voxels = np.fromfile(raw, dtype=np.int16)
    voxels[::7] += 100  # another scan's voxels, the header as it was
    voxels.tofile(raw)
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    row = _report(out / "batch_report.csv")[0]
    assert row["status"] == "ok" and row["message"].startswith("run again: its image is not the one")


def test_two_manifests_with_outputs_in_one_dicom_folder_do_not_rerun_each_other(tmp_path, capsys):
    """A re-review (session 31): each manifest's output (and record) inside a DICOM folder counted as
    a file of the other's series, so the two reran each other at every --skip-existing."""
    m = _dicom_case(tmp_path, "1.2.826.0.1.3680043.2.1125.7.95", output="p01/first.nii.gz")
    second = _manifest(tmp_path / "second.csv", ["image,prompt,output", "p01,p01_prompt.nrrd,p01/second.nii.gz"])
    out = tmp_path / "out"
    for expected in ("ok", "skipped", "skipped"):
        for manifest in (m, second):
            assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
            rows = {r["output"]: r["status"] for r in _report(out / "batch_report.csv")}
            assert rows[str((tmp_path / "p01" / ("first" if manifest == m else "second")).resolve()) + ".nii.gz"] \
                == expected, rows


def test_skip_existing_tells_apart_inputs_of_one_size_and_time(tmp_path, cases, monkeypatch, capsys):
    """A re-review (session 31): with large files judged by size and time (within 2 s) and DICOM
    folders by names and sizes, a row corrected to name another patient's image of the same grid,
    converted a second later, or another series exported with the same file names, was skipped:
    its output of the wrong image kept. Content samples (a large file's first and last MiB, each
    DICOM file's first 4 KiB) tell them apart; a .mhd whose voxel file's name has a space is
    fingerprinted by its voxels; a skipped row's message no longer repeats why it last ran."""
    import os

    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.volumes import Volume, write_volume

    monkeypatch.setattr(batch_module, "HASHED_UP_TO", 0)  # as files over 32 MiB are
    data = tmp_path / "data"
    first, second = data / "c0" / "image.nii", data / "c1" / "image.nii"  # uncompressed: one size
    for n, path in enumerate((first, second)):
        sitk.WriteImage(sitk.ReadImage(str(data / f"c{n}" / "image.nii.gz")), str(path), False)
    os.utime(second, ns=(first.stat().st_mtime_ns, first.stat().st_mtime_ns))
    assert first.stat().st_size == second.stat().st_size
    m = _manifest(data / "cases.csv", ["image,prompt,output", "c0/image.nii,c0/prompt.nii.gz,../out/r.nii.gz"])
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    _manifest(m, ["image,prompt,output", "c1/image.nii,c0/prompt.nii.gz,../out/r.nii.gz"])
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    row = _report(out / "batch_report.csv")[0]
    assert row["status"] == "ok" and row["message"].startswith("run again: its image is not the one")
    monkeypatch.undo()

    for n, uid in enumerate(("1.2.826.0.1.3680043.2.1125.7.61", "1.2.826.0.1.3680043.2.1125.7.62")):
        vol = make_volume(shape=(12, 20, 22))
        write_dicom_series(tmp_path / f"s{n}", vol, uid)
    assert sorted((f.name, f.stat().st_size) for f in (tmp_path / "s0").iterdir()) == \
        sorted((f.name, f.stat().st_size) for f in (tmp_path / "s1").iterdir())
    prompt = np.zeros(vol.array.shape, np.uint8)
    prompt[6, 5:15, 5:15] = 1
    write_volume(Volume(prompt, vol.spacing, vol.origin, vol.direction), tmp_path / "p.nrrd")
    m = _manifest(tmp_path / "series.csv", ["image,prompt,output", "s0,p.nrrd,out/s.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out2"), "--method", "copy"]) == 0
    _manifest(m, ["image,prompt,output", "s1,p.nrrd,out/s.nii.gz"])
    assert main(["batch", str(m), "-o", str(tmp_path / "out2"), "--method", "copy", "--skip-existing"]) == 0
    row = _report(tmp_path / "out2" / "batch_report.csv")[0]
    assert row["status"] == "ok" and row["message"].startswith("run again: its image is not the one")
    assert main(["batch", str(m), "-o", str(tmp_path / "out2"), "--method", "copy", "--skip-existing"]) == 0
    row = _report(tmp_path / "out2" / "batch_report.csv")[0]
    assert row["status"] == "skipped" and row["message"] == "done in an earlier run (--skip-existing)"

    scan = sitk.ReadImage(str(first))
    sitk.WriteImage(scan, str(data / "c0" / "CT scan.mhd"), False)  # its voxels in "CT scan.raw"
    m = _manifest(data / "mhd.csv", ["image,prompt,output", "c0/CT scan.mhd,c0/prompt.nii.gz,../out/mhd.nii.gz"])
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    raw = data / "c0" / "CT scan.raw"
    voxels = np.fromfile(raw, dtype=np.int16)
    voxels[::5] += 50
    stamp = raw.stat().st_mtime_ns
    voxels.tofile(raw)
    os.utime(raw, ns=(stamp, stamp))
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    assert _report(out / "batch_report.csv")[0]["status"] == "ok"
