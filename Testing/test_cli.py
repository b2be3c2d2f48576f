"""The ``pamsegment`` command, mostly as a subprocess (``python -m PAMSegmentLib``): what a user
sees, including exit codes and the absence of tracebacks for bad input."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, free_port, write_image
from doubles import OracleModel

from PAMSegmentLib import cli
from PAMSegmentLib.errors import PropagationCancelled
from PAMSegmentLib.volumes import read_volume


def assert_clean_error(proc, phrase: str) -> None:
    """Exit 2, one line on stderr with the CLI's prefix and ``phrase``, nothing on stdout."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pamsegment: error: "), lines[0]
    assert phrase in lines[0], lines[0]
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- success


def test_propagate_writes_label_map_on_the_input_grid(ct_case, small_checkpoint, run_cli):
    out = ct_case.directory / "result.mha"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out,
                   "--checkpoint", small_checkpoint.path, "--threads", "1", "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "100%" in proc.stderr  # the progress bar
    summary = proc.stdout.strip().splitlines()
    # random weights find nothing beyond the drawn slice: no slice to check first, and a note that says so
    assert len(summary) == 2 and summary[1].startswith("note: the network found no object on any slice next to")
    assert summary[0].startswith(f"wrote {out} and {out}.keyframes.json: label 1: slices ")
    assert "(axis 0, axial slices)" in summary[0]
    assert "slices predicted in" in summary[0] and summary[0].endswith(" s in all")

    image, result = read_volume(ct_case.image_path), read_volume(out)
    assert image.direction != (1, 0, 0, 0, 1, 0, 0, 0, 1)
    # MetaImage stores the geometry as read from the NIfTI input bit for bit.
    assert (result.spacing, result.origin, result.direction) == (image.spacing, image.origin, image.direction)
    assert result.array.shape == image.array.shape and result.array.dtype == np.uint8
    np.testing.assert_array_equal(result.array[ct_case.prompt_slice], ct_case.prompt[ct_case.prompt_slice])
    assert set(np.unique(result.array)) <= {0, 1}


def test_report_lists_every_slice_of_the_result(ct_case, capsys):
    import csv

    out, report = ct_case.directory / "result.nii.gz", ct_case.directory / "slices.csv"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "track", "--report", str(report), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out}, {report} and {out}.keyframes.json: label 1: slices ")
    result = read_volume(out).array
    with open(report, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["label", "slice", "voxels", "drawn", "confidence", "walk_end"]
    # the table's voxels are the written result's, slice by slice, and every slice holding it is listed
    voxels = {int(r["slice"]): int(r["voxels"]) for r in rows}
    assert {k for k in range(result.shape[0]) if result[k].any()} <= set(voxels)
    assert all(voxels[k] == int((result[k] == 1).sum()) for k in voxels)
    (drawn,) = [r for r in rows if r["drawn"] == "yes"]
    assert int(drawn["slice"]) == ct_case.prompt_slice and drawn["confidence"] == ""
    scored = {int(r["slice"]): float(r["confidence"]) for r in rows if r["confidence"] and int(r["voxels"])}
    check = [int(k) for k in printed[1].split("label 1: ")[1].split(", ")]
    assert check == sorted(scored, key=lambda k: (scored[k], k))[:3]  # the least confident, lowest first
    assert all(r["walk_end"] in ("", "presence", "drift", "area", "end", "consistency", "agreement") for r in rows)
    assert sum(bool(r["walk_end"]) for r in rows) >= 1


@pytest.mark.parametrize("report, phrase", [
    ("slices.txt", "--report writes a CSV table: give it a file name ending in .csv (got "),
    (".csv", "--report writes a CSV table: give it a file name ending in .csv (got "),
    ("missing/slices.csv", "of --report does not exist"),
])
def test_report_path_refused_before_any_work(ct_case, run_cli, report, phrase):
    out = ct_case.directory / "result.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "copy",
                   "--report", ct_case.directory / report)
    assert_clean_error(proc, phrase)
    assert not out.exists()


def test_an_output_that_is_a_symbolic_link_stays_one(ct_case, tmp_path, capsys):
    # OUT and the table are written to a temporary and moved in: through the link, onto its target
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    out, report = tmp_path / "out.nii.gz", tmp_path / "slices.csv"
    out.symlink_to(target_dir / "real.nii.gz")
    report.symlink_to(target_dir / "real.csv")
    (target_dir / "real.nii.gz").write_bytes(b"old")
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--report", str(report)]) == 0
    assert out.is_symlink() and report.is_symlink()
    assert read_volume(target_dir / "real.nii.gz").array.shape == ct_case.image.shape
    assert (target_dir / "real.csv").read_text().startswith("label,slice,voxels")
    assert not [p for p in (*tmp_path.iterdir(), *target_dir.iterdir()) if p.name.startswith(".pamsegment-")]


@pytest.mark.parametrize("failing", ["report", "out"])
def test_a_failed_move_is_one_line_and_the_table_never_stands_alone(ct_case, tmp_path, monkeypatch, capsys, failing):
    """The table is moved in first: if that fails, OUT is still the old file; if moving OUT fails,
    the table and the record moved in before it are put back (it said the table was written: a new
    table beside the old OUT). Either way one line, exit 2, nothing replaced, no temporaries left."""
    import os

    out, report = tmp_path / "out.nii.gz", tmp_path / "slices.csv"
    out.write_bytes(b"old result")
    replace = os.replace

    def refusing(src, dst):
        if Path(dst) == (report if failing == "report" else out):
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refusing)
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("pamsegment: error:") == 1, err
    err = err.strip().splitlines()[-1]  # after the progress bar: the work was done
    assert out.read_bytes() == b"old result"  # OUT untouched in both cases
    if failing == "report":
        assert err.endswith(f"cannot write {report} (Permission denied): nothing was replaced; fix that and run again")
    else:
        assert err.endswith(f"cannot write {out} (Permission denied): nothing was replaced (slices.csv, "
                            "out.nii.gz.keyframes.json put back as they were); fix that and run again")
    assert not report.exists()  # no table beside the old OUT
    # the old OUT keeps its own record (here: none; another test keeps an update's)
    assert not (tmp_path / "out.nii.gz.keyframes.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pamsegment-")]


def test_propagate_nifti_output_keeps_geometry(ct_case, small_checkpoint, capsys):
    out = ct_case.directory / "result.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--checkpoint", str(small_checkpoint.path), "--label", "1", "--axis", "0", "--range", "6:14"])
    assert code == 0
    assert "label 1: slices" in capsys.readouterr().out
    image, result = read_volume(ct_case.image_path), read_volume(out)
    assert result.spacing == image.spacing and result.origin == image.origin
    # NIfTI keeps the rotation as a float32 quaternion: equal to ~1e-10, the format's precision.
    np.testing.assert_allclose(result.direction, image.direction, atol=1e-8)
    assert not result.array[:6].any() and not result.array[15:].any()


def test_resample_prompt_fixes_a_prompt_on_another_grid(ct_case, small_checkpoint, capsys):
    finer = ct_case.directory / "prompt_other_grid.nii.gz"
    write_image(ct_case.prompt, finer, spacing_kji=(2.5, 0.8, 0.7), origin=(-12.0, 40.25, -80.0))
    out = ct_case.directory / "out.nii.gz"
    argv = ["propagate", str(ct_case.image_path), str(finer), "-o", str(out), "--checkpoint", str(small_checkpoint.path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not on the image grid: origin differs" in err and "--resample-prompt" in err
    assert "resample=True" not in err  # the command line's message, not the Python argument
    assert not out.exists()
    assert cli.main(argv + ["--resample-prompt"]) == 0
    assert out.exists()


# ----------------------------------------------------------------------------- info


def test_info_on_a_good_checkpoint(small_checkpoint, run_cli):
    proc = run_cli("info", small_checkpoint.path)
    assert proc.returncode == 0, proc.stderr
    assert "kind: pamsegment" in proc.stdout
    assert "network: small: 128 px input, 5 stages (16, 32, 64, 128, 128 features)" in proc.stdout
    assert f"sha256 (weights): {small_checkpoint.sha256}" in proc.stdout
    assert '"seed": 1234' in proc.stdout
    assert proc.stdout.strip().endswith("loads: yes")


def test_info_names_the_prior_channel_and_the_query_prior(tmp_path, capsys):
    from PAMSegmentLib.checkpoints import InferenceParams, save_checkpoint
    from PAMSegmentLib.network import PAMNetwork
    from PAMSegmentLib.preprocess import PreprocessingParams

    path = tmp_path / "prior.pt"
    save_checkpoint(path, PAMNetwork("small-prior"), PreprocessingParams(input_size=128),
                    InferenceParams(query_prior="carried"), {})
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "object-present head: yes, prior-mask input channel: yes" in out
    assert "query_prior=carried" in out


def test_info_on_the_official_layout(official_checkpoint, capsys):
    assert cli.main(["info", str(official_checkpoint.path)]) == 0
    out = capsys.readouterr().out
    assert "kind: official" in out and "network: official: 224 px input, 6 stages" in out
    assert "loads: yes" in out


def test_info_on_a_bad_file(tmp_path, run_cli):
    bad = tmp_path / "download.pth"
    bad.write_bytes(b"<html>404 Not Found</html>" * 100)
    assert_clean_error(run_cli("info", bad), f"cannot load checkpoint {bad}")


# ----------------------------------------------------------------------------- bad input


def _bad_image(case, directory):
    """Write an unusable image for ``case``; returns its path."""
    if case == "2D image":
        return write_image(np.zeros((40, 48), np.int16), directory / "slice.nii.gz", (0.8, 0.7), (0.0, 0.0),
                           (1.0, 0.0, 0.0, 1.0))
    if case == "4D image":
        path = directory / "series.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 6, 8, 8), np.int16), isVector=False), str(path))
        return path
    if case == "unreadable file":
        path = directory / "broken.nii.gz"
        path.write_text("this is not an image")
        return path
    if case == "NaN voxels":
        arr = np.zeros((20, 40, 48), np.float32)
        arr[4, 5, 6] = np.nan
        # NRRD: ITK's NIfTI reader silently turns NaN into 0, so a NIfTI cannot carry the case.
        return write_image(arr, directory / "nan.nrrd")
    raise AssertionError(case)


@pytest.mark.parametrize("case, phrase", [
    ("2D image", "slice.nii.gz is 2D (48 x 40); PAMSegment needs a 3D volume"),
    ("4D image", "series.nii.gz is 4D (8 x 8 x 6 x 3)"),
    ("unreadable file", "cannot read"),
    ("NaN voxels", "nan.nrrd contains 1 NaN/inf voxels"),
])
def test_bad_image(ct_case, small_checkpoint, run_cli, case, phrase):
    out = ct_case.directory / "out.nii.gz"
    image = _bad_image(case, ct_case.directory)
    proc = run_cli("propagate", image, ct_case.prompt_path, "-o", out, "--checkpoint", small_checkpoint.path)
    assert_clean_error(proc, phrase)
    assert not out.exists()


@pytest.mark.parametrize("case, phrase", [
    ("empty prompt", "the prompt is empty"),
    ("label not present", "label 7 is not in the prompt; labels present: 1"),
    ("too many slices", "label 1 is drawn on 11 of 20 slices along axis 0: that is a 3D mask"),
    ("geometry mismatch", "prompt.nii.gz is not on the image grid: spacing differs"),
    # a first-user review: a PNG of the drawn slice got "is 2D; PAMSegment needs a 3D volume",
    # which reads as if the scan were wrong
    ("2D mask", "slice.png is a 2D mask (48 x 40), which does not say which slice of the image it was drawn on"),
])
def test_bad_prompt(ct_case, small_checkpoint, run_cli, case, phrase):
    out = ct_case.directory / "out.nii.gz"
    extra: list[str] = []
    prompt = ct_case.prompt
    spacing = ct_case.spacing
    if case == "empty prompt":
        prompt = np.zeros_like(prompt)
    elif case == "label not present":
        extra = ["--label", "7"]
    elif case == "too many slices":
        prompt = ct_case.truth.astype(np.uint8)  # the whole 3D object
    elif case == "geometry mismatch":
        spacing = (3.0, 0.8, 0.7)
    write_image(prompt, ct_case.prompt_path, spacing)
    if case == "2D mask":
        from PIL import Image

        Image.fromarray((ct_case.prompt.max(axis=0) * 255).astype(np.uint8)).save(ct_case.directory / "slice.png")
        ct_case.prompt_path = ct_case.directory / "slice.png"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out,
                   "--checkpoint", small_checkpoint.path, *extra)
    assert_clean_error(proc, phrase)
    assert not out.exists()


def test_image_and_prompt_swapped_get_a_hint(ct_case, capsys):
    # The CT given as PROMPT was told to renumber its labels.
    out = ct_case.directory / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.prompt_path), str(ct_case.image_path), "-o", str(out),
                     "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [err.strip()]
    assert err.startswith(f"pamsegment: error: the prompt has label {ct_case.image.min()}: labels must be whole "
                          "numbers from 1 to 65535 (0 = background); the prompt holds negative values")
    assert err.strip().endswith(", as an image does: are the image and the prompt swapped?")
    assert not out.exists()


@pytest.mark.parametrize("args, phrase", [
    (["propagate", "a.nii.gz", "b.nii.gz", "-o", "c.nii.gz", "--batch-size", "0"],
     "pamsegment: error: argument --batch-size: expected a positive integer, got '0' "
     "(see pamsegment propagate --help)"),
    (["propagate", "a.nii.gz"], "pamsegment: error: the following arguments are required: PROMPT, "
                                "-o/--output (see pamsegment propagate --help)"),
    # --label takes several numbers: before the file names it swallows them, and says so
    (["propagate", "-o", "c.nii.gz", "--label", "1", "a.nii.gz", "b.nii.gz"],
     "pamsegment: error: argument --label: expected a positive integer, got 'a.nii.gz': --label takes one or more "
     "numbers, so put it after the file names (see"),
    (["label-images", "--label", "0", "a.png"], "pamsegment: error: argument --label: expected a positive integer, "
                                                "got '0' (see pamsegment label-images --help)"),
    (["segment"], "pamsegment: error: argument COMMAND: invalid choice: 'segment'"),
])
def test_option_errors_are_one_line(run_cli, args, phrase):
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(phrase), proc.stderr


def test_outputs_refused_before_any_work(ct_case, run_cli, tmp_path):
    # A folder named like the output, and a sheared (gantry-tilt) grid that NIfTI cannot store: both
    # refused before propagating (with --method copy the run itself would take well under a second,
    # so "before" is shown by the message, which the writer alone would give only after the run).
    folder = tmp_path / "result.nii.gz"
    folder.mkdir()
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", folder, "--method", "copy")
    assert_clean_error(proc, "result.nii.gz is a folder; give a file name")
    tilt = np.deg2rad(16.7)
    sheared = (1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt)))
    image = write_image(ct_case.image, tmp_path / "tilted.nrrd", ct_case.spacing, direction=sheared)
    prompt = write_image(ct_case.prompt, tmp_path / "tilted_prompt.nrrd", ct_case.spacing, direction=sheared)
    out = tmp_path / "tilted_out.nii.gz"
    proc = run_cli("propagate", image, prompt, "-o", out, "--method", "copy")
    assert_clean_error(proc, "the image's grid is sheared")
    assert "write tilted_out.nrrd or .mha instead" in proc.stderr and "propagating" not in proc.stderr
    assert not out.exists()
    proc = run_cli("propagate", image, prompt, "-o", tmp_path / "tilted_out.nrrd", "--method", "copy")
    assert proc.returncode == 0, proc.stderr


def test_an_unwritable_output_folder_is_refused_before_any_work(ct_case, tmp_path, monkeypatch, capfd,
                                                                 unwritable_folder):
    # It was found only by the writer, after the whole propagation, in two lines (the NIfTI
    # library's own "** ERROR ..." on stderr, then ours).
    from PAMSegmentLib import propagate as engine

    def not_reached(*args, **kwargs):
        raise AssertionError("propagated before the output folder was checked")

    monkeypatch.setattr(engine, "propagate", not_reached)
    folder = unwritable_folder
    out = folder / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"])
    err = capfd.readouterr().err
    assert code == 2
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"pamsegment: error: cannot write the output in folder {folder} (") and err.strip().endswith(
        "files must be made, renamed and removed there; choose another folder")
    assert not out.exists()
    # the same for the --report table's folder, also before any work
    report = folder / "slices.csv"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(tmp_path / "o.nii.gz"),
                     "--method", "copy", "--report", str(report)])
    err = capfd.readouterr().err
    assert code == 2 and err.startswith(f"pamsegment: error: cannot write --report in folder {folder} (")
    assert not (tmp_path / "o.nii.gz").exists() and not report.exists()


def test_checkpoint_path_is_checked_before_the_image_is_read(ct_case, tmp_path, run_cli):
    # A 300 MB scan was read (3 s, 800 MB) before a mistyped checkpoint path was reported.
    missing = tmp_path / "propmask.pth"
    proc = run_cli("propagate", tmp_path / "not_read.nii.gz", ct_case.prompt_path, "-o", tmp_path / "o.nii.gz",
                   "--checkpoint", missing)
    assert_clean_error(proc, f"checkpoint {missing} does not exist; check the path")


def test_bad_checkpoint(ct_case, tmp_path, run_cli):
    truncated = tmp_path / "propmask.pth"
    truncated.write_bytes(b"PK\x03\x04" + b"\x00" * 2000)
    out = ct_case.directory / "out.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--checkpoint", truncated)
    assert_clean_error(proc, f"cannot load checkpoint {truncated}")
    assert not out.exists()


def test_bad_default_weights_via_environment_name_the_variable_and_demo_writes_nothing(tmp_path, run_cli):
    bad = tmp_path / "pam_small.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "demo_out"
    proc = run_cli("demo", "--out", out, env={"PAMSEGMENT_MODEL": str(bad)})
    assert_clean_error(proc, f"cannot load checkpoint {bad}: it is not a PyTorch file")  # one line: no bar yet
    assert proc.stderr.strip().endswith("(the file PAMSEGMENT_MODEL names; point it at a good checkpoint, unset "
                                        "it, or pass --checkpoint CKPT)")
    assert not out.exists()  # the output folder was made before the model loaded


def test_demo_out_naming_a_file_is_one_line(tmp_path, capsys):
    # It was a FileExistsError traceback (exit 1).
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert cli.main(["demo", "--out", str(out), "--method", "copy"]) == 2
    assert capsys.readouterr().err == (f"pamsegment: error: {out} is a file; --out takes a folder (the demo writes "
                                       "two files into it)\n")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("where", ["under a file", "/proc", "a dangling link", "under a dangling link"])
def test_demo_out_that_cannot_be_made_is_refused_before_propagating(tmp_path, capsys, monkeypatch, where):
    """A review (session 30): demo --out /proc/x failed only after the whole propagation."""
    import PAMSegmentLib.propagate as propagate_module

    monkeypatch.setattr(propagate_module, "propagate", lambda *a, **k: pytest.fail("propagated"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    out = {"under a file": a_file / "demo", "/proc": Path("/proc/pamsegment-demo"), "a dangling link": link,
           "under a dangling link": link / "demo"}[where]
    assert cli.main(["demo", "--out", str(out), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pamsegment: error: ")
    assert {"under a file": f"{a_file} is a file", "/proc": "in folder /proc",
            "a dangling link": f"--out {link} is a symbolic link to nothing",
            "under a dangling link": f"--out {out}: its folder {link} is a symbolic link to nothing"}[where] in err
    assert a_file.read_text() == "kept"


def test_a_failed_demo_leaves_no_output_folder(tmp_path, capsys):
    # The folder was made before the run, and left empty when the run failed.
    out = tmp_path / "demo_out"
    assert cli.main(["demo", "--out", str(out), "--method", "copy", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not out.exists()


def test_demo_figure_shows_axial_slices_as_radiologists_do():
    # Anterior up and the patient's right on the left: with the demo CT's grid (LPS direction
    # diag(-1, -1, 1)) the array's first row is the most posterior one, so it was upside down.
    from PAMSegmentLib.demo import _radiological

    rows, cols = _radiological((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    j, i = np.arange(5), np.arange(4)
    y, x = -1.0 * j, -1.0 * i  # physical y (posterior +) and x (patient's left +) of rows and columns
    assert (np.diff(y[rows]) > 0).all() and (np.diff(x[cols]) > 0).all()
    assert _radiological((1, 0, 0, 0, 1, 0, 0, 0, 1)) == (slice(None, None, 1), slice(None, None, 1))


def test_missing_default_weights_via_environment(ct_case, tmp_path, run_cli):
    missing = tmp_path / "nowhere" / "pam_small.pt"
    out = ct_case.directory / "out.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out,
                   env={"PAMSEGMENT_MODEL": str(missing)})
    assert_clean_error(proc, f"PAMSEGMENT_MODEL is set to {missing}, which is not a file")
    assert "--checkpoint" in proc.stderr
    assert not out.exists()


def test_default_weights_that_do_not_match_their_model_card_are_refused(ct_case, small_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    weights = tmp_path / "pam_small.pt"
    weights.write_bytes(small_checkpoint.path.read_bytes())
    (tmp_path / "pam_small.json").write_text('{"file": "pam_small.pt", "sha256_weights": "%s"}' % ("0" * 64))
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(weights))
    out = ct_case.directory / "out.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pamsegment: error: checkpoint {weights} does not match its model card pam_small.json: "
                          f"its weights' sha256 is {small_checkpoint.sha256[:16]}..., the card's 0000000000000000...")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_no_default_weights_installed(ct_case, monkeypatch, capsys):
    from PAMSegmentLib import checkpoints

    monkeypatch.delenv("PAMSEGMENT_MODEL", raising=False)
    monkeypatch.setattr(checkpoints, "default_checkpoint_path", lambda: None)
    out = ct_case.directory / "out.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pamsegment: error: no default PAM weights are installed; pass --checkpoint CKPT")
    assert not out.exists()


@pytest.mark.parametrize("text", ["5", "3:1", "a:b", "1:2:3", "-1:4", "1.5:4", ":4"])
def test_bad_range_syntax(ct_case, run_cli, text):
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", ct_case.directory / "o.nii.gz",
                   f"--range={text}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "argument --range: expected K0:K1, two slice numbers with 0 <= K0 <= K1" in proc.stderr


def test_range_past_the_volume(ct_case, small_checkpoint, capsys):
    out = ct_case.directory / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--checkpoint", str(small_checkpoint.path), "--range", "4:20"])
    assert code == 2
    assert "range 4:20 is outside the 20 slices along axis 0 (valid 0:19)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("options, phrase", [
    (["--range", "0:100"], "range 0:100 is outside the 20 slices along axis 0 (valid 0:19)"),
    (["--range", "0:5"], "label 1's prompt slice 10 lies outside the range 0:5; widen the range to include it\n"),
    (["--empty-slices", "10"], "slice 10 is both drawn (label 1) and marked empty"),
    (["--empty-slices", "44"], "empty slice 44 lies outside the range 0:19 along axis 0"),
    (["--server", "http://127.0.0.1:PORT"], "cannot reach the PAMSegment server at http://127.0.0.1:PORT"),
])
def test_errors_the_engine_finds_are_one_line_without_a_progress_bar(ct_case, capsys, options, phrase):
    # These were printed after a "propagating:   0%" bar line: the bar now appears with the first progress.
    port = str(free_port())  # nothing listens there
    out = ct_case.directory / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", *[o.replace("PORT", port) for o in options]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("pamsegment: error: "), err
    assert phrase.replace("PORT", port) in err and "propagating" not in err
    assert not out.exists()


def test_output_equal_to_an_input_is_refused(ct_case, run_cli):
    before = ct_case.image_path.read_bytes()
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", ct_case.image_path)
    assert_clean_error(proc, "is the input")
    assert ct_case.image_path.read_bytes() == before
    relative = ct_case.directory / "." / "prompt.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(relative)]) == 2


def test_unknown_output_format(ct_case, capsys):
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o",
                     str(ct_case.directory / "out.png")])
    assert code == 2
    assert "cannot tell the output format of out.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------- interruption, registries


@pytest.mark.parametrize("interruption", [PropagationCancelled("cancelled"), KeyboardInterrupt()])
def test_interrupted_run_exits_130_and_writes_nothing(ct_case, small_checkpoint, monkeypatch, capsys, interruption):
    from PAMSegmentLib import propagate as engine

    def interrupted(*args, **kwargs):
        kwargs["progress"](0.3, "slice 3")
        raise interruption

    monkeypatch.setattr(engine, "propagate", interrupted)
    out = ct_case.directory / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--checkpoint", str(small_checkpoint.path)])
    assert code == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 1.32 GiB for an array with shape (600, 1536, 1536) and data type bool"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 10000000000000 bytes."),  # PyTorch's allocator raises a RuntimeError
])
def test_running_out_of_memory_is_one_line_and_writes_nothing(ct_case, monkeypatch, capsys, error):
    """numpy's MemoryError (and PyTorch's allocation RuntimeError) on a volume too large for the
    machine was a traceback and exit 1 (which the README keeps for bugs) after a minute of work."""
    from PAMSegmentLib import propagate as engine

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine, "propagate", too_big)
    out = ct_case.directory / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith(f"pamsegment: error: not enough memory ({str(error)[:40]}") and err.count("\n") == 1
    assert ("; what was being computed was not written. A propagation needs about 0.2 GB (0.5 GB with a network) + "
            "the image + 6 bytes a voxel") in err


def _ctrl_c_when_moved_to(monkeypatch, wanted) -> None:
    """Ctrl-C (a real SIGINT to this process) right after os.replace moves a file to a path for
    which ``wanted(path)`` is true."""
    import os

    replace = os.replace

    def replace_then_ctrl_c(src, dst):
        replace(src, dst)
        if wanted(Path(dst)):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)


def test_ctrl_c_once_the_output_is_in_place_is_ignored(ct_case, monkeypatch, capsys):
    # It gave exit 130 and "nothing was written" with OUT already replaced.
    out = ct_case.directory / "out.nii.gz"
    out.write_bytes(b"old")
    _ctrl_c_when_moved_to(monkeypatch, lambda dst: dst == out)
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"wrote {out} and {out}.keyframes.json: label 1: slices") and \
        "interrupted" not in captured.err
    assert read_volume(out).array.any()
    assert sorted(p.name for p in ct_case.directory.iterdir()) == ["image.nii.gz", "out.nii.gz",
                                                                   "out.nii.gz.keyframes.json", "prompt.nii.gz"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # called from Python: Ctrl-C works again


def test_as_the_command_ctrl_c_stays_ignored_once_the_output_is_in_place(ct_case, monkeypatch, capsys):
    # __main__.run ends the process when main returns: there is nothing left to interrupt, and the
    # handler restored before main returned let a Ctrl-C in that moment end the finished run as
    # interrupted (exit 130) or print a traceback from an object's __del__.
    out = ct_case.directory / "out.nii.gz"
    term = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                         "--method", "copy"], ends_process=True) == 0
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:  # (SIGTERM too: ignored, it stayed so for the rest of the run and every process it started)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, term)
    assert capsys.readouterr().out.startswith(f"wrote {out}")


def test_ctrl_c_while_the_output_is_written_keeps_the_old_file(ct_case, monkeypatch, capsys):
    out = ct_case.directory / "out.nii.gz"
    out.write_bytes(b"old")
    _ctrl_c_when_moved_to(monkeypatch, lambda dst: dst != out)  # the temporary is written, OUT not yet replaced
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"])
    assert code == 130
    assert capsys.readouterr().err.endswith("pamsegment: interrupted; nothing was written\n")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in ct_case.directory.iterdir()) == ["image.nii.gz", "out.nii.gz", "prompt.nii.gz"]


def test_the_entry_point_ignores_ctrl_c_once_the_command_has_returned(monkeypatch):
    # Python's shutdown takes ~0.5 s with torch loaded; a Ctrl-C then gave exit 130 with no message
    # (or a traceback from an object's __del__) after a successful run.
    import os

    from PAMSegmentLib.__main__ import run

    monkeypatch.setattr(cli, "main", lambda argv=None, ends_process=False: 0)
    term = signal.getsignal(signal.SIGTERM)
    try:
        assert run() == 0
        os.kill(os.getpid(), signal.SIGINT)  # raised KeyboardInterrupt here
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, term)


class _InterruptedImport:
    """A meta path finder under which importing module ``name`` raises KeyboardInterrupt: Ctrl-C
    pressed while that module loads."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def _interrupt_import(monkeypatch, name: str) -> None:
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(name), *sys.meta_path])


def test_ctrl_c_while_the_subcommands_module_loads_exits_130_in_one_line(monkeypatch, capsys):
    # `pamsegment demo` imports PAMSegmentLib.demo while building the parser, which ran outside
    # main's try: Ctrl-C there printed a KeyboardInterrupt traceback.
    _interrupt_import(monkeypatch, "PAMSegmentLib.demo")
    try:
        code = cli.main(["demo"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while the subcommand's module loaded escaped main()")
    assert code == 130
    assert capsys.readouterr().err == "pamsegment: interrupted; nothing was written\n"


def test_ctrl_c_while_the_command_itself_loads_exits_130_in_one_line(monkeypatch, capsys):
    # The entry point (pyproject's `pamsegment`, and `python -m PAMSegmentLib`) imports cli
    # (~20 ms) before cli.main can catch anything.
    from PAMSegmentLib.__main__ import run

    _interrupt_import(monkeypatch, "PAMSegmentLib.cli")
    try:
        code = run()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while PAMSegmentLib.cli loaded escaped the entry point")
    assert code == 130
    assert capsys.readouterr().err == "pamsegment: interrupted; nothing was written\n"


def test_the_command_runs_main_through_its_entry_point(monkeypatch, capsys):
    from PAMSegmentLib import __version__
    from PAMSegmentLib.__main__ import run

    monkeypatch.setattr(sys, "argv", ["pamsegment", "--version"])
    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            run()
    finally:  # (the command's own handlers: it ends the process)
        for sig, handler in found.items():
            signal.signal(sig, handler)
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"pamsegment {__version__}"


def test_a_method_is_one_registry_entry(ct_case, monkeypatch, capsys):
    """--method NAME picks a factory from cli.METHODS; here an oracle stands in for a baseline."""
    monkeypatch.setitem(cli.METHODS, "oracle", lambda args: OracleModel(ct_case.truth, window=4))
    out = ct_case.directory / "oracle.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "oracle"]) == 0
    np.testing.assert_array_equal(read_volume(out).array, ct_case.truth.astype(np.uint8))
    assert "label 1: slices 5-15" in capsys.readouterr().out


def test_a_subcommand_is_one_registry_entry(monkeypatch, capsys):
    def add_arguments(parser):
        parser.add_argument("--times", type=int, default=1)

    def run(args):
        print("demo " * args.times)
        return 0

    monkeypatch.setitem(cli.SUBCOMMANDS, "demo", cli.Subcommand("run the demo", add_arguments, run))
    assert cli.main(["demo", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "demo demo"


def test_parse_slice_range():
    assert cli.parse_slice_range("10:40") == (10, 40)
    assert cli.parse_slice_range("7:7") == (7, 7)


def test_classical_methods_run_without_a_checkpoint_and_refuse_one(ct_case, capsys):
    out = ct_case.directory / "tracked.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method", "track"])
    assert code == 0
    assert "label 1: slices" in capsys.readouterr().out
    result = read_volume(out)
    np.testing.assert_array_equal(result.array[ct_case.prompt_slice], ct_case.prompt[ct_case.prompt_slice])
    assert result.array.any(axis=(1, 2)).sum() > 1  # it propagated beyond the drawn slice
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--checkpoint", "weights.pt"])
    assert code == 2
    assert "--method copy does not use a checkpoint" in capsys.readouterr().err


def test_empty_slices_bound_the_result(ct_case, capsys):
    """--empty-slices: the object is absent on those slices, and nothing crosses them."""
    out = ct_case.directory / "walled.nii.gz"
    k = ct_case.prompt_slice
    argv = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method", "copy",
            "--axis", "0"]
    assert cli.main(argv) == 0
    free = read_volume(out).array.any(axis=(1, 2))
    assert free[k + 2] and free[k - 2]  # without walls the copied mask reaches two slices either side
    assert cli.main(argv + ["--empty-slices", f"{k - 2},{k + 2}"]) == 0
    occupied = np.flatnonzero(read_volume(out).array.any(axis=(1, 2))).tolist()
    assert occupied[0] >= k - 1 and occupied[-1] <= k + 1 and k in occupied
    capsys.readouterr()
    assert cli.main(argv + ["--empty-slices", str(k)]) == 2
    assert f"slice {k} is both drawn (label 1) and marked empty" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "a", "1,,2", "-3", "1.5"])
def test_bad_empty_slices_syntax(ct_case, run_cli, text):
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", ct_case.directory / "o.nii.gz",
                   f"--empty-slices={text}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --empty-slices: expected slice numbers or runs separated by commas" in proc.stderr


def test_empty_slices_per_label(tmp_path, capsys):
    """--empty-slices LABEL:K marks a slice empty for one label only (a review: a radiologist who drew
    every structure on a slice could not say that one of them is absent there; only the Python API
    took {label: slices}). Two squares copied along axis 0 from slice 10: a wall on slice 13 for
    label 2 ends label 2 at 12 and leaves label 1 to the end of the volume."""
    import SimpleITK as sitk

    image = np.zeros((20, 24, 24), np.float32)
    image[:, 2:8, 2:8] = 100
    image[:, 12:18, 12:18] = 200
    prompt = np.zeros(image.shape, np.uint8)
    prompt[10, 2:8, 2:8] = 1
    prompt[10, 12:18, 12:18] = 2
    for name, arr in (("img.nii.gz", image), ("prompt.nii.gz", prompt)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    out = tmp_path / "out.nii.gz"
    argv = ["propagate", str(tmp_path / "img.nii.gz"), str(tmp_path / "prompt.nii.gz"), "-o", str(out),
            "--method", "copy"]
    assert cli.main(argv + ["--empty-slices", "2:13", "--empty-slices", "2:4,5"]) == 0
    got = read_volume(out).array
    assert np.flatnonzero((got == 1).any(axis=(1, 2))).tolist() == list(range(20))
    assert np.flatnonzero((got == 2).any(axis=(1, 2))).tolist() == list(range(6, 13))
    capsys.readouterr()
    assert cli.main(argv + ["--empty-slices", "13", "--empty-slices", "2:4"]) == 2
    assert capsys.readouterr().err == ("pamsegment: error: --empty-slices takes slices for every label (12,30) or per "
                                       "label (3:12,30, the option repeated for each label), not both; give the "
                                       "slices for every label with each label\n")
    # one value per option: written before the file names it takes only its own (a review: with
    # several values it swallowed IMAGE and PROMPT)
    assert cli.main(["propagate", "--empty-slices", "2:13", *argv[1:]]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # several values after one option: told to repeat it
        cli.main(argv + ["--empty-slices", "2:13", "2:4"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("pamsegment: error: unrecognized arguments: 2:4; --empty-slices takes one "
                                       "value: repeat it for each label (--empty-slices 1:20 --empty-slices 2:4) "
                                       "(see pamsegment propagate --help)\n")
    assert cli.main(argv + ["--empty-slices", "7:13"]) == 2
    assert "empty slices given for label 7, which is not among the labels propagated (1, 2)" in capsys.readouterr().err
    assert cli.parse_empty_slices("3:12, 4") == (3, [4, 12]) and cli.parse_empty_slices("5") == (None, [5])
    assert cli.walls_option([(2, [4]), (1, [3]), (2, [9])]) == {1: [3], 2: [4, 9]}


def test_parse_slice_list():
    assert cli.parse_slice_list("12") == [12]
    assert cli.parse_slice_list("30, 12,12") == [12, 30]


def _spy_on_engine(monkeypatch, read) -> list:
    """Let the CLI's propagation run as usual, recording ``read(model)`` of the model it gets."""
    from PAMSegmentLib import propagate as engine

    seen = []
    real = engine.propagate

    def spy(image, prompt, spacing, model, **kwargs):
        seen.append(read(model))
        return real(image, prompt, spacing, model, **kwargs)

    monkeypatch.setattr(engine, "propagate", spy)
    return seen


def test_registration_weight_option_overrides_the_checkpoint(ct_case, small_checkpoint, monkeypatch, capsys):
    """--registration-weight W reaches the predictor the engine builds; only --method pam takes it;
    a value outside [0, 1] is a usage error before any work."""
    seen = _spy_on_engine(monkeypatch, lambda model: model.inference.registration_weight)
    out = ct_case.directory / "fused.nii.gz"
    base = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out)]
    assert cli.main(base + ["--checkpoint", str(small_checkpoint.path), "--registration-weight", "0.7"]) == 0
    assert cli.main(base + ["--checkpoint", str(small_checkpoint.path)]) == 0
    assert seen == [0.7, 0.0]  # the test checkpoint's own value is the default 0
    capsys.readouterr()
    assert cli.main(base + ["--method", "track", "--registration-weight", "0.5"]) == 2
    assert "--registration-weight is an option of --method pam, not track" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(base + ["--registration-weight", "1.5"])
    assert exc.value.code == 2
    assert "expected a number from 0 to 1, got '1.5'" in capsys.readouterr().err


def test_intensity_gate_option_overrides_the_checkpoint(ct_case, small_checkpoint, monkeypatch, capsys):
    """--intensity-gate off|prompt|guide reaches the model the engine gets; only --method pam takes it."""
    seen = _spy_on_engine(monkeypatch, lambda model: (model.inference.intensity_gate, model.inference.intensity_gate_reference))
    out = ct_case.directory / "gated.nii.gz"
    base = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
            "--checkpoint", str(small_checkpoint.path)]
    assert cli.main(base + ["--intensity-gate", "guide"]) == 0
    assert cli.main(base + ["--intensity-gate", "prompt"]) == 0
    assert cli.main(base) == 0  # the test checkpoint's own: off
    assert seen == [(True, "guide"), (True, "prompt"), (False, "prompt")]
    capsys.readouterr()
    assert cli.main(base + ["--method", "copy", "--intensity-gate", "off"]) == 2
    assert "--intensity-gate is an option of --method pam, not copy" in capsys.readouterr().err


def test_through_plane_option_overrides_the_checkpoint(ct_case, small_checkpoint, monkeypatch, capsys):
    """--through-plane-mm T reaches the model the engine gets; only --method pam takes it; a value
    that is neither 0 nor a spacing from 0.25 to 20 mm is a usage error before any work."""
    seen = _spy_on_engine(monkeypatch, lambda model: model.inference.through_plane_mm)
    out = ct_case.directory / "thin.nii.gz"
    base = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
            "--checkpoint", str(small_checkpoint.path)]
    assert cli.main(base + ["--through-plane-mm", "1.5"]) == 0
    assert cli.main(base) == 0
    assert seen == [1.5, 0.0]  # the test checkpoint's own value: off
    capsys.readouterr()
    assert cli.main(base + ["--method", "track", "--through-plane-mm", "1.5"]) == 2
    assert "--through-plane-mm is an option of --method pam, not track" in capsys.readouterr().err
    for bad in ("0.1", "x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(base + ["--through-plane-mm", bad])
        assert exc.value.code == 2
        assert f"expected 0 (off) or a slice spacing in mm from 0.25 to 20, got '{bad}'" in capsys.readouterr().err


def test_propagate_prints_the_results_notes(ct_case, small_checkpoint, monkeypatch, capsys):
    """What the engine says about how walks ended (PropagationResult.notes) reaches the user,
    with the option that changes it."""
    from PAMSegmentLib.propagate import PropagationResult

    monkeypatch.setattr(PropagationResult, "kinds_of_notes", lambda self, edited=None: [
        ("drift", "label 1: stopped at once"), ("gap", "label 1: something else")])
    out = ct_case.directory / "noted.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--checkpoint", str(small_checkpoint.path)]) == 0
    printed = capsys.readouterr().out
    assert "note: label 1: stopped at once (--intensity-gate off)\n" in printed
    assert "note: label 1: something else\n" in printed  # other notes without the drift test's option


def test_label_given_twice_on_the_command_line_adds_up():
    from PAMSegmentLib.cli import build_parser

    argv = ["propagate", "a.nii.gz", "p.nii.gz", "-o", "o.nii.gz", "--label", "2", "--label", "3", "4"]
    assert build_parser(argv).parse_args(argv).label == [2, 3, 4]  # the last --label used to win


def test_without_pytorch_the_network_commands_say_so_in_one_line(ct_case, tmp_path, run_cli):
    """A torch-less install (the README's client for a server) crashed with a ModuleNotFoundError
    traceback on `propagate` and `info`; `--method track` needs no torch and still runs."""
    import os

    stub = tmp_path / "notorch" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    env = {"PYTHONPATH": os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "pamsegment: error: PAM's network needs PyTorch, which is not installed: pip install torch (see the README's "
        "Quick start); without it, --method track or copy, or --server URL (a machine running pamsegment serve), "
        "still work"]
    assert not out.exists()
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "track", env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_info_without_a_checkpoint_describes_the_shipped_weights(run_cli):
    """After `pip install` the shipped weights are not under Resources/Models, so the README's path
    did not work with `info`; without CKPT it describes them wherever they are installed."""
    from PAMSegmentLib.checkpoints import shipped_checkpoint_path

    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"file: {shipped_checkpoint_path()} (")
    card = json.loads(shipped_checkpoint_path().with_suffix(".json").read_text())
    assert f"sha256 (weights): {card['sha256_weights']}" in proc.stdout and lines[-1] == "loads: yes"


def test_a_full_disk_while_writing_the_report_is_one_line_and_replaces_nothing(ct_case, tmp_path, monkeypatch,
                                                                               capsys):
    """write_slice_report's OSError (ENOSPC) escaped as a traceback, exit 1."""
    import errno

    out, report = tmp_path / "out.nii.gz", tmp_path / "r.csv"
    out.write_bytes(b"the previous result")
    report.write_text("the previous table")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "write_slice_report", disk_full)
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method", "copy",
                     "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == f"pamsegment: error: cannot write {report} (no space left on the disk); " \
                                           "nothing was replaced"
    assert out.read_bytes() == b"the previous result" and report.read_text() == "the previous table"
    assert not list(tmp_path.glob(".pamsegment-*"))  # no temporary left


def test_names_too_long_and_link_loops_are_one_line(ct_case, tmp_path, capsys):
    """ENAMETOOLONG and a loop of symbolic links came as tracebacks (exit 1)."""
    long_out = tmp_path / ("a" * 300 + ".nii.gz")
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(long_out),
                     "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2 and "is 307 bytes long; file systems take at most 255: choose a shorter name" in err
    out = tmp_path / "out.nii.gz"
    code = cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--report", str(tmp_path / ("r" * 300 + ".csv"))])
    assert code == 2 and "is 304 bytes long" in capsys.readouterr().err and not out.exists()
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for args in ([str(tmp_path / "loop1"), str(ct_case.prompt_path), "-o", str(out)],
                 [str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(tmp_path / "loop1")]):
        code = cli.main(["propagate", *args, "--method", "copy"])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == [
            f"pamsegment: error: {tmp_path / 'loop1'} is a loop of symbolic links; give another path"], err
    assert not out.exists()


def test_image_and_prompt_swapped_are_named_as_a_possible_cause(ct_case, tmp_path, capsys):
    """A float image (an MR) given as PROMPT said only that it has non-integer values."""
    image = sitk.ReadImage(str(ct_case.image_path))
    mr = sitk.Cast(image, sitk.sitkFloat32) * 0.37 + 100.25
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    code = cli.main(["propagate", str(ct_case.prompt_path), str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                     "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().endswith("(or are the image and the label map swapped?)"), err


def test_an_output_inside_a_file_is_named_as_such(ct_case, tmp_path, capsys):
    """-o image.nii.gz/x.nii.gz said "folder image.nii.gz does not exist"."""
    out = ct_case.image_path / "x.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"]) == 2
    assert capsys.readouterr().err.strip() == (f"pamsegment: error: {ct_case.image_path} is a file, not a folder: {out} "
                                               "cannot be made inside it; choose another output path")


def test_an_output_given_as_a_new_folder_is_told_to_name_a_file(ct_case, tmp_path, capsys):
    """-o newdir/ (a folder that does not exist yet) said "cannot tell the output format of newdir"."""
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", f"{tmp_path}/newdir/",
                     "--method", "copy"]) == 2
    assert capsys.readouterr().err.strip() == (f"pamsegment: error: {tmp_path}/newdir/ names a folder (it ends with a "
                                               f"slash); give a file name (e.g. {tmp_path}/newdir/result.nii.gz)")


def test_an_output_name_of_241_to_255_bytes_is_written_and_reported_as_written(ct_case, tmp_path, capsys):
    """OUT + '.keyframes.json' passes 255 bytes: looking for a stale record beside it raised
    ENAMETOOLONG after OUT was written, and the run said it failed."""
    out = tmp_path / ("b" * 240 + ".nii.gz")  # 247 bytes: legal
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and printed.startswith(f"wrote {out}: label 1: slices ")
    # its record's name would be too long: written without one, said so
    assert f"note: no record was written beside {out} (its name is too long for .keyframes.json to be added)" in printed


@pytest.mark.parametrize("command", [["propagate", "a.nii.gz", "b.nii.gz", "-o", "c.nii.gz"], ["batch", "m.csv", "-o", "d"],
                                     ["serve"], ["benchmark", "--quick"], ["demo"],
                                     ["label-images", "a.png", "b.png", "c.png", "-o", "d"]])
def test_every_command_refuses_a_thread_count_the_machine_cannot_use(command, capsys):
    """serve and benchmark had no bound (serve --threads 100000 reached torch.set_num_threads),
    and batch failed every row on its own instead of refusing once."""
    import os

    from PAMSegmentLib.checks import max_threads

    with pytest.raises(SystemExit) as stop:  # argparse's own exit, before any work
        cli.main([*command, "--threads", "100000"])
    assert stop.value.code == 2
    assert (f"argument --threads: expected a thread count from 1 to {max_threads()} ({os.cpu_count()} CPU cores "
            "here), got '100000'") in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "Resources" / "Models" / "pam_small.pt").is_file(), reason="no shipped weights")
def test_info_summarises_the_training_stages(run_cli):
    """`pamsegment info` printed the provenance as one JSON line of kilobytes; our checkpoints' chain
    of training stages is one line per stage now (the whole record stays in --json)."""
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("provenance: "))
    assert lines[at] == "provenance: 4 training stage(s) (the whole record: pamsegment info --json)"
    assert lines[at + 4].startswith("  stage 4: 8600 iterations in 100 min, git 4b0f849706: python scripts/train.py")
    assert lines[at + 5].startswith("  inference parameters changed ") and max(map(len, lines)) < 500


def test_a_mask_saved_as_floats_is_named_as_such(tmp_path):
    """A mask holding 0 and 0.999 (saved as floats, or resampled) was asked whether the image and
    the label map were swapped; with few values they are listed and rounding is the advice."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap

    mask = np.zeros((4, 6, 6), np.float32)
    mask[1, 2:4, 2:4] = 0.999
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "m.nii.gz"))
    with pytest.raises(InputError) as err:
        read_labelmap(tmp_path / "m.nii.gz")
    assert str(err.value) == ("m.nii.gz holds the values 0, 0.999, not whole numbers: a mask saved as floats (or "
                              "resampled)? Round it to integer labels (e.g. 0 and 1) and save it as an integer "
                              "label map")
