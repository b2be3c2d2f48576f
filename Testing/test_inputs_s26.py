"""Inputs found unsafe or unclear in session 26's reviews."""

from __future__ import annotations

import csv
import gzip
import struct
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from PAMSegmentLib import cli, volumes
from PAMSegmentLib.errors import InputError


def _nifti_declaring(tmp_path, name: str, shape_kji: tuple[int, int, int], full_data: bool) -> str:
    """A gzipped NIfTI whose header declares ``shape_kji`` uint8 voxels; with ``full_data`` the
    stream holds them all (zeros compress to almost nothing), else only a 4 x 4 x 4 block."""
    small = tmp_path / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(small))
    data = bytearray(small.read_bytes())
    k, j, i = shape_kji
    struct.pack_into("<4h", data, 40, 3, i, j, k)
    if full_data:
        data = data[:352] + bytes(i * j * k)
    path = tmp_path / name
    with gzip.open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


def test_a_file_declaring_more_voxels_than_memory_holds_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A small .nii.gz whose header declares 64 x 64 x 64 voxels, all of them in the stream: ITK
    allocated them (a file of 8 MB declaring 2000^3 took 8 GB, then 32 GB as float32: the OS
    killed the process). Now the header is compared with the machine's memory first; here the
    memory is made 512 KB (1 MB would be needed as float32), then 2 MB (read as usual)."""
    path = _nifti_declaring(tmp_path, "bomb.nii.gz", (64, 64, 64), full_data=True)
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 512 * 1024)
    with pytest.raises(InputError, match=r"bomb.nii.gz's header declares 64 x 64 x 64 = 262,144 voxels, 0 GB as "
                                         r"float32, more than this machine's 0 GB of memory: if the file is what it "
                                         r"should be, crop or downsample it"):
        volumes.read_volume(path)
    with pytest.raises(InputError, match="header declares 64 x 64 x 64"):
        volumes.read_labelmap(path)
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 2 * 1024 * 1024)
    assert volumes.read_volume(path).shape == (64, 64, 64)


def test_the_command_line_refuses_a_bomb_with_one_line(tmp_path, capsys):
    """30000^3 voxels declared (about 100 TB as float32: more than any machine holds) in 89 bytes."""
    bomb = _nifti_declaring(tmp_path, "bomb.nii.gz", (30000, 30000, 30000), full_data=False)
    prompt = _nifti_declaring(tmp_path, "prompt.nii.gz", (30000, 30000, 30000), full_data=False)  # its grid
    assert cli.main(["propagate", bomb, prompt, "-o", str(tmp_path / "out.nii.gz"), "--method", "copy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bomb.nii.gz's header declares 30000 x 30000 x 30000 = 27,000,000,000,000 voxels" in err[0]
    assert not (tmp_path / "out.nii.gz").exists()


def _tilted_prompt(tmp_path, degrees: float, slices=(20,)):
    """A 40 x 160 x 160 image (1 x 0.8 x 0.8 mm) holding an ellipsoid 112 mm wide, and a prompt
    drawn on ``slices`` of the same grid rotated ``degrees`` about x around its centre."""
    k, j, i = np.mgrid[:40, :160, :160]
    obj = ((k - 20) / 15.0) ** 2 + ((j - 80) / 70.0) ** 2 + ((i - 80) / 70.0) ** 2 <= 1
    image = sitk.GetImageFromArray(obj.astype(np.uint8))
    image.SetSpacing((0.8, 0.8, 1.0))
    t = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    grid = sitk.Image([160, 160, 40], sitk.sitkUInt8)
    grid.SetSpacing((0.8, 0.8, 1.0))
    grid.SetDirection(rot.ravel().tolist())
    centre_index = np.array([79.5, 79.5, 19.5])
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    grid.SetOrigin((centre - rot @ (centre_index * np.array([0.8, 0.8, 1.0]))).tolist())
    on_grid = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    drawing = np.zeros_like(on_grid)
    for s in slices:
        drawing[s] = on_grid[s]
    prompt = sitk.GetImageFromArray(drawing)
    prompt.CopyInformation(grid)
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    sitk.WriteImage(prompt, str(tmp_path / f"prompt_{degrees}.nrrd"))
    return volumes.read_volume(tmp_path / "image.nrrd"), str(tmp_path / f"prompt_{degrees}.nrrd"), obj


@pytest.mark.parametrize("degrees, crossed", [(1.0, "19-21"), (1.9, "18-22"), (4.0, "16-24")])
def test_a_drawing_on_a_slightly_tilted_grid_is_put_back_on_one_slice(tmp_path, degrees, crossed):
    """A review: drawn on a grid tilted 1 degree (another series of the study), the outline crossed
    image slices 19-21 as strips (2801, 9608 and 2920 voxels), each then a drawn slice; the result
    was the strips (Dice 0.33 at 1 degree, 0.14 at 1.9, exit 0; 0.99 drawn on the image). Now each
    drawn slice's strips are one slice again (with a note), close to the object's cross-section."""
    image, prompt, obj = _tilted_prompt(tmp_path, degrees)
    with pytest.warns(UserWarning, match=rf"label 1 was drawn on a grid tilted {degrees:.1f} degrees from the "
                                         rf"image's; its outline crossed the image's slices along axis 0 in strips "
                                         rf"\(slices {crossed} onto slice 20\)"):
        got = volumes.read_labelmap(prompt, reference=image, resample=True).array
    assert np.flatnonzero(got.any(axis=(1, 2))).tolist() == [20]
    overlap = np.count_nonzero(got[20] & obj[20]) / np.count_nonzero(got[20] | obj[20])
    assert overlap > 0.95, overlap  # IoU on slice 20: 0.997, 0.992, 0.966


def test_two_drawn_slices_of_a_tilted_grid_stay_two_and_a_parallel_coarse_slice_is_untouched(tmp_path):
    image, prompt, obj = _tilted_prompt(tmp_path, 1.0, slices=(12, 28))
    with pytest.warns(UserWarning, match=r"slices 11-13 onto slice 12, slices 27-29 onto slice 28"):
        got = volumes.read_labelmap(prompt, reference=image, resample=True).array
    assert np.flatnonzero(got.any(axis=(1, 2))).tolist() == [12, 28]
    # a 3 mm slice of a parallel grid covers three 1 mm slices with the same outline: kept as it is
    coarse = sitk.GetImageFromArray(np.repeat(obj[19:22].any(axis=0, keepdims=True), 1, axis=0).astype(np.uint8))
    coarse.SetSpacing((0.8, 0.8, 3.0))
    coarse.SetOrigin((0.0, 0.0, 19.0))
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    got = volumes.read_labelmap(tmp_path / "coarse.nrrd", reference=image, resample=True).array
    assert np.flatnonzero(got.any(axis=(1, 2))).tolist() == [18, 19, 20]


@pytest.mark.parametrize("order, flips", [((0, 2, 1), (False, False, False)), ((2, 1, 0), (False, False, False)),
                                          ((0, 1, 2), (False, True, True))])
def test_a_nifti_written_by_itk_in_any_orientation_holds_one_grid(tmp_path, order, flips):
    """ITK writes the same grid as qform and sform. Sagittal and coronal storage (and 10 of 26
    tilted axials) got the note "its NIfTI header holds two different grids (qform and sform up to
    0.0163 mm apart)": the quaternion's a of a 180-degree rotation, 0 up to float32 rounding, was
    read as about 2e-4. Read as niftilib reads it, the two grids agree."""
    image = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.25, 7.125))
    stored = sitk.Flip(sitk.PermuteAxes(image, order), flips)
    path = tmp_path / "stored.nii.gz"
    sitk.WriteImage(stored, str(path))
    header = volumes._nifti_header(path)
    qform, sform = volumes._nifti_affines(header)
    assert np.abs(qform - sform).max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note
        volumes.read_volume(path)


def test_grid_differences_print_no_minus_zero():
    flipped = volumes.Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), (-1, 0, 0, 0, 1, -0.0, 0, 0, 1))
    image = volumes.Volume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), (1, -0.0, -0.0, -0.0, 1, -0.0, 0, 0, 1))
    assert volumes._describe_difference("direction", flipped, image) == (
        "direction (LPS) (-1, 0, 0, 0, 1, 0, 0, 0, 1) in it vs the image's (1, 0, 0, 0, 1, 0, 0, 0, 1)")


def test_a_reader_that_stops_early_ends_the_command_quietly(ct_case):
    """`pamsegment info | head -1`, `propagate ... | head -1`: a BrokenPipeError traceback and exit 1
    (about half the runs), for propagate after OUT was written. Now exit 141 (as `yes | head -1`),
    no traceback or error on stderr (only the progress bar), OUT written. The reader here closes the
    pipe before anything is printed."""
    import os
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    out = ct_case.directory / "piped.nii.gz"
    for args in (["info", "--json"], ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                                      "--method", "copy"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line
        proc = subprocess.run([sys.executable, "-m", "PAMSegmentLib", *args], cwd=REPO, env=_cli_env(None),
                              stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        os.close(write_end)
        err = proc.stderr.decode()
        assert proc.returncode == 141 and "Traceback" not in err and "error" not in err, err[-400:]
    assert volumes.read_volume(out).array.any()


@pytest.mark.parametrize("args, line", [
    (["propagate", "a.nii.gz", "p.nii.gz", "-o", "x.nii.gz", "--range", "10:20", "25:29"],
     "unrecognized arguments: 25:29 (see pamsegment propagate --help)"),
    (["batch", "m.csv", "-o", "r", "--axis", "1"],
     "unrecognized arguments: --axis 1; --axis is an option of propagate, not batch: in a batch, give such a case "
     "its own run of propagate, or each label its own row (its axis is then found from its drawing) (see pamsegment "
     "batch --help)"),
    (["label-images", "a.png", "b.png", "c.png", "-o", "d", "--tile", "3:4"],
     "unrecognized arguments: --tile 3:4; --tile is an option of label-cells, not label-images (see pamsegment "
     "label-images --help)"),
    (["batch", "m.csv", "-o", "r", "--bogus"], "unrecognized arguments: --bogus (see pamsegment batch --help)"),
    # a diff review: the hint where the option does not exist, the batch advice for other commands' options, and
    # the --empty-slices=1:20 form that had lost its hint
    (["batch", "m.csv", "-o", "r", "--empty-slices", "1:20"],
     "unrecognized arguments: --empty-slices 1:20; --empty-slices is an option of propagate, not batch: in a batch, "
     "give such a case its own run of propagate, or each label its own row (its axis is then found from its "
     "drawing) (see pamsegment batch --help)"),
    (["batch", "m.csv", "-o", "r", "--order", "similar"],
     "unrecognized arguments: --order similar; --order is an option of label-images, not batch (see pamsegment "
     "batch --help)"),
    (["propagate", "a.nii.gz", "p.nii.gz", "-o", "x.nii.gz", "--empty-slices=1:20", "2:4"],
     "unrecognized arguments: 2:4; --empty-slices takes one value: repeat it for each label (--empty-slices 1:20 "
     "--empty-slices 2:4) (see pamsegment propagate --help)"),
])
def test_an_unknown_argument_names_the_subcommands_help_and_where_the_option_is(args, line, capsys):
    """A review: every unknown N:M got the --empty-slices hint (also `--range 10:20 25:29`, and in
    commands without --empty-slices), and every unknown argument pointed to `pamsegment --help`."""
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"pamsegment: error: {line}\n"


def test_demo_and_benchmark_take_o_and_output_as_the_other_commands_do():
    parser = cli.build_parser(None)
    for command, flag in (("demo", "--output"), ("benchmark", "-o"), ("benchmark", "--output")):
        args = parser.parse_args([command, flag, "somewhere"])
        assert args.out == "somewhere", (command, flag)


def test_a_file_declaring_4_gib_more_than_it_holds_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A review: an 80-byte .nii.gz declaring 16384 x 16384 x 16 voxels (4 GiB) passed the
    truncation check (the gzip trailer holds the length mod 4 GiB, which matched) and ITK took
    8.5 GB over 55 s; a 195-byte NRRD declaring as much took 4.3 GB (NRRD had no such check). Both
    are now refused at once as ending early (the memory is made large, so that the declared size
    alone does not refuse them first)."""
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 2**40)
    nifti = _nifti_declaring(tmp_path, "four.nii.gz", (16, 16384, 16384), full_data=False)
    with pytest.raises(InputError, match=r"four.nii.gz is truncated: its header needs 4294967648 bytes, the file "
                                         r"has 416"):
        volumes.read_volume(nifti)
    head = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16384 16384 16\nencoding: %s\n\n"
    raw = tmp_path / "four_raw.nrrd"
    raw.write_bytes(head % b"raw" + bytes(1000))
    with pytest.raises(InputError, match=r"four_raw.nrrd: its voxel data ends early or is damaged \(its header "
                                         r"declares 4294967296 bytes, the file holds 1000\)"):
        volumes.read_volume(raw)
    packed = tmp_path / "four_gz.nrrd"
    packed.write_bytes(head % b"gzip" + gzip.compress(b""))  # the trailer's length, 0, is 4 GiB mod 4 GiB
    with pytest.raises(InputError, match=r"four_gz.nrrd: its voxel data ends early or is damaged \(its header "
                                         r"declares 4294967296 bytes, the file holds 0\)"):
        volumes.read_volume(packed)
    # a whole NRRD, raw and gzip, reads as before
    for encoding, data in ((b"raw", bytes(range(24))), (b"gzip", gzip.compress(bytes(range(24))))):
        whole = tmp_path / f"whole_{encoding.decode()}.nrrd"
        whole.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nencoding: %s\n\n" % encoding + data)
        assert volumes.read_volume(whole).array.ravel().tolist() == list(range(24))


def _png_header_only(path, width: int, height: int, color_type: int = 0) -> None:
    """A PNG that declares ``width`` x ``height`` 8-bit pixels and holds no image data (a copy cut
    after its header)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)))


@pytest.mark.parametrize("color_type", [0, 4])  # grey, grey + alpha
def test_a_cut_png_of_a_large_slide_is_one_line_not_pillows_traceback(tmp_path, color_type):
    """A review: a PNG over Pillow's 179 Mpx guard that ITK failed to read (an interrupted copy of a
    slide export) ended in Pillow's DecompressionBombError: a traceback and exit 1 (label-cells,
    label-images). Now ITK's reason, in one line."""
    path = tmp_path / "slide.png"
    _png_header_only(path, 20000, 20000, color_type)
    with pytest.raises(InputError, match=r"cannot read .*slide.png as an image .*; is the file damaged\? copy or "
                                         r"export it again"):
        volumes.read_image_2d(path)


def test_protected_report_record_and_batch_report_are_kept(ct_case, tmp_path, capsys):
    """A review: a read-only --report table, OUT.keyframes.json or batch_report.csv was replaced
    (exit 0), while a read-only OUT is refused ("a result you protected is kept"). All are
    refused now, before any work, and left as they were."""
    import os
    import stat

    def protect(path, text):
        path.write_text(text)
        os.chmod(path, stat.S_IRUSR | stat.S_IRGRP)

    base = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "--method", "copy"]
    protect(tmp_path / "r.csv", "precious table\n")
    assert cli.main(base + ["-o", str(tmp_path / "a.nii.gz"), "--report", str(tmp_path / "r.csv")]) == 2
    assert "r.csv exists and is read-only" in capsys.readouterr().err
    protect(tmp_path / "b.nii.gz.keyframes.json", '{"precious": 1}')
    assert cli.main(base + ["-o", str(tmp_path / "b.nii.gz")]) == 2
    assert "b.nii.gz.keyframes.json exists and is read-only" in capsys.readouterr().err
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()
    assert (tmp_path / "r.csv").read_text() == "precious table\n"
    assert (tmp_path / "b.nii.gz.keyframes.json").read_text() == '{"precious": 1}'
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    (tmp_path / "res").mkdir()
    protect(tmp_path / "res" / "batch_report.csv", "precious report\n")
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2
    assert "batch_report.csv exists and is read-only" in capsys.readouterr().err
    assert (tmp_path / "res" / "batch_report.csv").read_text() == "precious report\n"


_TERM_DRIVER = """
import os, signal, sys
from PAMSegmentLib import volumes, __main__
real = volumes.write_labelmap
def write_then_terminated(*args, **kwargs):
    real(*args, **kwargs)  # the temporary is on disk: a scheduler stops the run now
    os.kill(os.getpid(), signal.SIGTERM)
volumes.write_labelmap = write_then_terminated
sys.argv = ["pamsegment"] + sys.argv[1:]
sys.exit(__main__.run())
"""


def test_sigterm_stops_a_run_as_ctrl_c_does(ct_case, tmp_path):
    """A review: SIGTERM (kill, timeout, a scheduler) ended the run at once, exit 143 without a word,
    leaving hidden partial files (.pamsegment-*.tmp.nii.gz) in the output folder for ever. Now it
    is handled as Ctrl-C: temporaries removed, the earlier OUT kept, one line, exit 143."""
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    folder = tmp_path / "results"
    folder.mkdir()
    out = folder / "out.nii.gz"
    out.write_bytes(b"earlier result")
    proc = subprocess.run([sys.executable, "-c", _TERM_DRIVER, "propagate", str(ct_case.image_path),
                           str(ct_case.prompt_path), "-o", str(out), "--method", "copy", "--report",
                           str(folder / "r.csv")], cwd=REPO, env=_cli_env(None), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1] == "pamsegment: terminated (SIGTERM); nothing was written"
    assert sorted(p.name for p in folder.iterdir()) == ["out.nii.gz"]
    assert out.read_bytes() == b"earlier result"


def test_a_batch_interrupted_while_summing_up_a_case_writes_nothing_for_it(ct_case, tmp_path, monkeypatch, capsys):
    """A review: Ctrl-C during the whole-volume passes after a case's output was put in place
    (its slices to check first, its notes) left the output on disk and the report saying "not run;
    nothing was written for it". They now come before the files are put in place."""
    from PAMSegmentLib.propagate import PropagationResult

    def interrupted(self, voxels=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(PropagationResult, "review_summary", interrupted)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},{tmp_path / 'o.nii.gz'}\n")
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 130
    assert not (tmp_path / "o.nii.gz").exists()
    with open(tmp_path / "res" / "batch_report.csv", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert (row["status"], row["message"]) == ("not run", "interrupted while running; nothing was written for it")


def test_demo_interrupted_while_drawing_its_figure_writes_nothing(tmp_path, monkeypatch):
    """A review: Ctrl-C while the figure was drawn left demo_segmentation.nii.gz after "nothing was
    written" (in an earlier run's folder, beside that run's figure)."""
    from PAMSegmentLib import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_figure", interrupted)
    assert cli.main(["demo", "-o", str(tmp_path / "d"), "--method", "copy"]) == 130
    assert not (tmp_path / "d").exists()
    monkeypatch.undo()
    assert cli.main(["demo", "-o", str(tmp_path / "d"), "--method", "copy"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["demo.png", "demo_segmentation.nii.gz"]


def test_a_full_disk_is_said_in_the_same_words_for_every_format(tmp_path, monkeypatch):
    """A review: MetaImage and PNG outputs said ITK's "(... Reason: No space left on device)", the
    others "(no space left on the disk)"."""
    def full(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: x.cxx:12:\nITK ERROR: "
                           "MetaImageIO(0x1): Could not write file. Reason: No space left on device")

    monkeypatch.setattr(volumes.sitk, "WriteImage", full)
    vol = volumes.Volume(np.zeros((3, 4, 5), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError, match=r"^cannot write .*out.mha \(no space left on the disk\); nothing was "
                                         r"replaced$"):
        volumes.write_volume(vol, tmp_path / "out.mha")
    assert list(tmp_path.iterdir()) == []


def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    """A review: with stderr in a file (nohup, CI, 2>log) tqdm's bar was redrawn with carriage
    returns: 11.6 KB on one "line" for a 30 s run. Off a terminal, progress is now a line every
    10 % (and where the label or a server's message changes); PAMSEGMENT_PROGRESS chooses."""
    monkeypatch.delenv("PAMSEGMENT_PROGRESS", raising=False)
    bar = cli._ProgressBar("propagating")
    for n in range(101):
        bar(n / 100, f"label {1 + n // 50} ({1 + n // 50}/3): slice {n}")
    bar.close()
    assert capsys.readouterr().err.splitlines() == (
        [f"propagating label 1 (1/3): {p}%" for p in range(0, 50, 10)]
        + [f"propagating label 2 (2/3): {p}%" for p in range(50, 100, 10)] + ["propagating label 3 (3/3): 100%"])
    served = cli._ProgressBar("propagating", show_message=True)
    for fraction, message in ((0.0, "server: queued (queue position 2)"), (0.0, "server: queued (queue position 2)"),
                              (0.0, "server: queued (queue position 1)"), (0.05, "server: label 1: slice 3"),
                              *((0.05 + n / 100, f"server: label 1: slice {4 + n}") for n in range(20))):
        served(fraction, message)
    # a line where the kind of message changes and every 10 %, not one per slice (a review: 29 lines in 14 s
    # for a server job, one per tile for label-cells)
    assert capsys.readouterr().err.splitlines() == [
        "propagating: 0%, server: queued (queue position 2)", "propagating: 5%, server: label 1: slice 3",
        "propagating: 10%, server: label 1: slice 9", "propagating: 20%, server: label 1: slice 19"]
    monkeypatch.setenv("PAMSEGMENT_PROGRESS", "off")
    quiet = cli._ProgressBar("propagating")
    quiet(0.5, "")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("PAMSEGMENT_PROGRESS", "bar")
    assert cli.progress_mode() == "bar"


def test_weights_chosen_by_the_environment_are_said(ct_case, small_checkpoint, monkeypatch, capsys):
    """A review: PAMSEGMENT_MODEL replaced the default weights without a word (propagate, demo), no
    --help named it, and info's error named a path the user never typed."""
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(small_checkpoint.path))
    out = ct_case.directory / "env.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out)]) == 0
    assert f"note: using the weights PAMSEGMENT_MODEL names ({small_checkpoint.path})" in capsys.readouterr().out
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(ct_case.directory / "nothere.pt"))
    assert cli.main(["info"]) == 2
    assert "PAMSEGMENT_MODEL is set to" in capsys.readouterr().err
    for command in ("propagate", "batch", "demo", "label-images", "serve"):
        parser = cli.build_parser([command])._pam_subparsers[command]
        assert "$PAMSEGMENT_MODEL if set" in parser._option_string_actions["--checkpoint"].help, command


def test_a_2d_mask_placed_otherwise_than_its_image_is_refused(tmp_path):
    """A review: label-images and label-cells took a 2D mask on any grid of the right size, pixel by
    pixel: one stored flipped (the same physical placement) was used mirrored (Dice 0.79 instead of
    1.0), one placed elsewhere without a word. Where both files place themselves in space they must
    agree now; a PNG mask (no position) is still compared by size."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 200, (20, 30)).astype(np.uint8))
    image.SetSpacing((0.8, 0.9))
    image.SetOrigin((10.0, -20.0))
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 3:9] = 1
    on_grid = sitk.GetImageFromArray(mask)
    on_grid.CopyInformation(image)
    sitk.WriteImage(on_grid, str(tmp_path / "mask.nii.gz"))
    sitk.WriteImage(sitk.Flip(on_grid, [True, False]), str(tmp_path / "flipped.nii.gz"))
    elsewhere = sitk.GetImageFromArray(mask)
    elsewhere.SetSpacing((3.0, 3.0))
    elsewhere.SetOrigin((500.0, 500.0))
    sitk.WriteImage(elsewhere, str(tmp_path / "elsewhere.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.png"))
    reference = volumes.read_image_2d(tmp_path / "image.nii.gz")
    assert np.array_equal(volumes.read_labelmap_2d(tmp_path / "mask.nii.gz", reference=reference), mask)
    assert np.array_equal(volumes.read_labelmap_2d(tmp_path / "mask.png", reference=reference), mask)
    with pytest.raises(InputError, match=r"^the mask flipped.nii.gz is not on its image's grid \(axes \(-1, 0, "
                                         r"0, 1\) vs the image's \(1, 0, 0, 1\); origin .*\): it would be used pixel "
                                         r"by pixel, flipped or shifted"):
        volumes.read_labelmap_2d(tmp_path / "flipped.nii.gz", reference=reference)
    with pytest.raises(InputError, match=r"^the mask elsewhere.nrrd is not on its image's grid \(pixel spacing "
                                         r"\(3, 3\) vs the image's \(0.8, 0.9\); origin \(500, 500\)"):
        volumes.read_labelmap_2d(tmp_path / "elsewhere.nrrd", reference=reference)


def test_the_summary_names_the_plane_of_the_slices(ct_case, capsys):
    """A review: slices were named by array axis only ("slices 4-20 (axis 0)"), which is not axial
    for an image stored sagittally (the TPTBox spine MR). The summary says the plane now."""
    out = ct_case.directory / "planes.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"]) == 0
    assert "(axis 0, axial slices)" in capsys.readouterr().out
    sagittal_stored = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # the TPTBox MR's direction: k runs along x
    assert [volumes.plane_name(sagittal_stored, a) for a in range(3)] == ["sagittal", "axial", "coronal"]
    tilted = (1, 0, 0, 0, np.cos(0.7), -np.sin(0.7), 0, np.sin(0.7), np.cos(0.7))  # 40 degrees about x
    assert volumes.plane_name(tilted, 0) == "oblique"


@pytest.mark.parametrize("args, line", [
    (["label-cells", "a.png", "b.png", "-o", "c.tif", "--tile", "10"],
     "argument --tile: expected a whole number of at least 64 px, got '10' (see pamsegment label-cells --help)"),
    (["batch", "m.csv", "-o", "r", "--shard", "3/2"],
     "argument --shard: K/N needs 1 <= K <= N, got '3/2' (see pamsegment batch --help)"),
])
def test_option_errors_name_the_option_once(args, line, capsys):
    """A review: --tile's error did not name the option ("tile must be ..."), --shard's named it twice."""
    with pytest.raises(SystemExit):
        cli.main(args)
    assert capsys.readouterr().err == f"pamsegment: error: {line}\n"


def test_a_summary_of_many_labels_gives_each_its_own_line(tmp_path, capsys):
    """A review: 41 labels made a 1.3 KB "wrote ..." line and a 1 KB "least confident slices"
    line, with a .seg.nrrd prompt's segment names never shown. Past 4 labels each label has a line
    (its name where the prompt has one)."""
    rng = np.random.default_rng(0)
    k, j, i = np.ogrid[:12, :24, :36]
    image = rng.normal(0, 5, (12, 24, 36)).astype(np.float32)
    prompt = np.zeros((12, 24, 36), np.uint8)
    for lab in range(1, 7):  # six boxes along i, each on slices 2-9
        image[2:10, 6:18, 6 * (lab - 1) + 1:6 * lab - 1] += 50 * lab
        prompt[5, 6:18, 6 * (lab - 1) + 1:6 * lab - 1] = lab
    img = sitk.GetImageFromArray(image)
    sitk.WriteImage(img, str(tmp_path / "image.nrrd"))
    seg = sitk.GetImageFromArray(prompt)
    for n in range(6):
        seg.SetMetaData(f"Segment{n}_ID", f"Segment_{n + 1}")
        seg.SetMetaData(f"Segment{n}_Name", f"organ {n + 1}")
        seg.SetMetaData(f"Segment{n}_LabelValue", str(n + 1))
        seg.SetMetaData(f"Segment{n}_Layer", "0")
    sitk.WriteImage(seg, str(tmp_path / "prompt.seg.nrrd"))
    assert cli.main(["propagate", str(tmp_path / "image.nrrd"), str(tmp_path / "prompt.seg.nrrd"), "-o",
                     str(tmp_path / "out.nii.gz"), "--method", "copy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(n for n, line in enumerate(lines) if line.startswith("wrote "))
    assert lines[head].endswith("per label its slices and those to check first:")
    assert ": 6 labels (axis 0, axial slices); " in lines[head]
    per_label = lines[head + 1:head + 7]
    assert [line.split(":")[0] for line in per_label] == [f"  label {n} (organ {n})" for n in range(1, 7)]
    assert all("slices 2-9; check " in line for line in per_label), per_label


def _rotated_grid(image, degrees: float):
    """``image``'s grid rotated ``degrees`` about x around its centre (an empty uint8 image)."""
    t = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(rot.ravel().tolist())
    centre_index = (np.array(image.GetSize()) - 1) / 2.0
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    grid.SetOrigin((centre - rot @ (centre_index * np.array(image.GetSpacing()))).tolist())
    return grid


def test_a_3d_mask_on_a_slightly_tilted_grid_is_resampled_as_it_is(tmp_path):
    """A review of the strip collapse: a registered lesion's mask (8 consecutive slices) on a grid
    tilted 2-4.5 degrees had each of its slices "put back" on one image slice, and later slices
    erased what earlier ones wrote: Dice 0.999 -> 0.65. Consecutive drawn slices are a 3D mask:
    resampled as they are (nearest neighbour), no note."""
    k, j, i = np.mgrid[:40, :100, :100]
    lesion = ((k - 20) / 4.0) ** 2 + ((j - 50) / 30.0) ** 2 + ((i - 50) / 30.0) ** 2 <= 1  # slices 17-23 of 1 mm
    image = sitk.GetImageFromArray(np.zeros((40, 100, 100), np.int16))
    grid = _rotated_grid(image, 3.0)
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    mask.CopyInformation(grid)
    sitk.WriteImage(mask, str(tmp_path / "lesion.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    plain = sitk.GetArrayFromImage(sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no strips note, no loss note
        got = volumes.read_labelmap(tmp_path / "lesion.nrrd", reference=volumes.read_volume(tmp_path / "image.nrrd"),
                                    resample=True).array
    assert np.array_equal(got, plain)


def test_strips_are_put_back_along_any_image_axis(tmp_path):
    """The collapse wrote the drawing through a reshaped view of the target plane, a copy when the
    slices run along j or i: there the drawing was taken out and never put back. A drawing on one
    j-slice of a grid tilted 2 degrees about x lands on one j-slice whole."""
    k, j, i = np.mgrid[:100, :40, :100]
    obj = ((k - 50) / 35.0) ** 2 + ((j - 20) / 15.0) ** 2 + ((i - 50) / 35.0) ** 2 <= 1
    image = sitk.GetImageFromArray(obj.astype(np.uint8))
    grid = _rotated_grid(image, 2.0)
    on_grid = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    drawing = np.zeros_like(on_grid)
    drawing[:, 20] = on_grid[:, 20]  # one coronal (j) slice
    prompt = sitk.GetImageFromArray(drawing)
    prompt.CopyInformation(grid)
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    with pytest.warns(UserWarning, match=r"crossed the image's slices along axis 1 in strips \(slices \d+-\d+ onto "
                                         r"slice 20\)"):
        got = volumes.read_labelmap(tmp_path / "prompt.nrrd", reference=volumes.read_volume(tmp_path / "image.nrrd"),
                                    resample=True).array
    assert np.flatnonzero(got.any(axis=(0, 2))).tolist() == [20]
    overlap = np.count_nonzero(got[:, 20] & obj[:, 20]) / np.count_nonzero(got[:, 20] | obj[:, 20])
    assert overlap > 0.97, overlap


def test_a_drawing_mostly_lost_in_resampling_is_said(tmp_path):
    """A review: three slices drawn on a 1 mm grid over a 5 mm image became 381 voxels on one slice
    (IoU 0.025), without a word. Drawn slices that leave nothing on the image's grid are said."""
    k, j, i = np.mgrid[:12, :60, :60]
    image = sitk.GetImageFromArray(np.zeros((12, 60, 60), np.int16))
    image.SetSpacing((1.0, 1.0, 5.0))
    fine = sitk.Image([60, 60, 60], sitk.sitkUInt8)
    fine.SetSpacing((1.0, 1.0, 1.0))
    fine.SetOrigin((0.0, 0.0, 2.0))  # its slices 0, 5, 10 ... sit 2 mm off the image's slice centres
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    drawing = np.zeros((60, 60, 60), np.uint8)
    drawing[[13, 20, 30], 15:45, 15:45] = 1  # slice 13 (z 15 mm) holds an image slice's centre, 20 and 30 none
    prompt = sitk.GetImageFromArray(drawing)
    prompt.CopyInformation(fine)
    sitk.WriteImage(prompt, str(tmp_path / "fine.nrrd"))
    with pytest.warns(UserWarning, match=r"label 1 was drawn on 3 slices of its grid, and 2 of them \(20, 30\) fell "
                                         r"between the image's slices once resampled"):
        volumes.read_labelmap(tmp_path / "fine.nrrd", reference=volumes.read_volume(tmp_path / "image.nrrd"),
                              resample=True)


def test_a_gzip_nrrd_with_bytes_after_its_data_is_read_as_itk_reads_it(tmp_path):
    """A review of the NRRD check: a gzip NRRD with a newline after the compressed data (ITK reads
    it) was refused as damaged (gzip.GzipFile refuses trailing bytes). Two members, and data cut
    short, are counted as before."""
    head = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nencoding: gzip\n\n"
    data = bytes(range(24))
    for name, body in (("newline", gzip.compress(data) + b"\n"),
                       ("members", gzip.compress(data[:10]) + gzip.compress(data[10:]) + b"\n\n")):
        path = tmp_path / f"{name}.nrrd"
        path.write_bytes(head + body)
        assert volumes.read_volume(path).array.ravel().tolist() == list(range(24)), name
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(head + gzip.compress(data[:12]) + b"\n")
    with pytest.raises(InputError, match=r"cut.nrrd: its voxel data ends early or is damaged \(its header declares "
                                         r"24 bytes, the file holds 12\)"):
        volumes.read_volume(cut)


def test_a_grey_alpha_png_declaring_more_pixels_than_memory_holds_is_refused_before_decoding(tmp_path, monkeypatch):
    """A review: Pillow's bomb guard was turned off for grey + alpha PNGs (which ITK cannot read, so
    its declared-size check never saw them): a 12 MB file declaring 80000^2 pixels started
    decoding 13 GB. Their size is now checked from the header first."""
    path = tmp_path / "la.png"
    _png_header_only(path, 20000, 20000, color_type=4)
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 2**30)
    with pytest.raises(InputError, match=r"la.png's header declares 20000 x 20000 pixels with alpha, more than this "
                                         r"machine's 1 GB"):
        volumes.read_image_2d(path)


def test_sigterm_stops_a_batch_with_its_own_exit_status(ct_case, tmp_path):
    """A review: batch caught SIGTERM as Ctrl-C: exit 130, "interrupted", where the README says 143
    for every command (a scheduler tells the two apart)."""
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    proc = subprocess.run([sys.executable, "-c", _TERM_DRIVER, "batch", str(manifest), "-o", str(tmp_path / "res"),
                           "--method", "copy"], cwd=REPO, env=_cli_env(None), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1].startswith("pamsegment: terminated (SIGTERM); finished cases are "
                                                          "written")
    with open(tmp_path / "res" / "batch_report.csv", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert (row["status"], row["message"]) == ("not run", "terminated (SIGTERM) while running; nothing was written "
                                                           "for it")
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["batch_report.csv"]


def test_a_batch_resumes_past_rows_whose_records_are_protected(ct_case, tmp_path, capsys):
    """A diff review: refusing a read-only record also refused --skip-existing on a finished
    folder whose records were write-protected (rows it skips). Only rows to run are checked."""
    import os
    import stat

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    res = tmp_path / "res"
    assert cli.main(["batch", str(manifest), "-o", str(res), "--method", "copy"]) == 0
    record = next(res.glob("*.keyframes.json"))
    os.chmod(record, stat.S_IRUSR | stat.S_IRGRP)
    assert cli.main(["batch", str(manifest), "-o", str(res), "--method", "copy", "--skip-existing"]) == 0
    assert "1 skipped of 1 row" in capsys.readouterr().out
    assert cli.main(["batch", str(manifest), "-o", str(res), "--method", "copy"]) == 2  # a row to run: kept
    assert f"{record.name} exists and is read-only" in capsys.readouterr().err


def test_a_gzip_nifti_with_bytes_after_its_data_is_read(tmp_path):
    """A second review: the NRRD fix left .nii.gz files with a newline after the compressed data
    refused as damaged (ITK reads them)."""
    small = tmp_path / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.uint8).reshape(3, 4, 5)), str(small))
    path = tmp_path / "trail.nii.gz"
    path.write_bytes(gzip.compress(small.read_bytes()) + b"\n")
    assert volumes.read_volume(path).array.ravel().tolist() == list(range(60))


def test_a_label_lost_whole_in_resampling_is_said_and_left_out(tmp_path):
    """A second review: with two labels drawn on thin slices over a thick-slice image, one vanished
    in resampling and the run went on without a word. A third: refusing it also refused a label
    lying outside a cropped image, which --label could not leave out. It is said and left out."""
    image = sitk.GetImageFromArray(np.zeros((12, 40, 40), np.int16))
    image.SetSpacing((1.0, 1.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    drawing = np.zeros((60, 40, 40), np.uint8)
    drawing[10, 10:30, 10:30] = 1  # z 10: an image slice's centre
    drawing[12, 10:30, 10:30] = 2  # z 12: between two image slices' centres
    prompt = sitk.GetImageFromArray(drawing)
    sitk.WriteImage(prompt, str(tmp_path / "thin.nrrd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = volumes.read_labelmap(tmp_path / "thin.nrrd", reference=volumes.read_volume(tmp_path / "image.nrrd"),
                                    resample=True).array
    assert [str(w.message) for w in caught] == [  # one note, not also "its slice fell between"
        "thin.nrrd: label 2 left nothing on the image grid once resampled (outside the image, or between two of its "
        "slices): it is not propagated; if it should be, draw it on the image itself"]
    assert sorted(np.unique(got).tolist()) == [0, 1]


def test_two_adjacent_drawn_slices_on_a_tilted_grid_are_each_put_back(tmp_path):
    """A second review: collapsing only drawn slices without drawn neighbours left two adjacent drawn
    slices as raw strips on four image slices, each a keyframe (Dice 0.94 -> 0.41 with copy). Runs
    of up to 3 adjacent drawn slices are drawings (longer runs a 3D mask, kept as resampled)."""
    image, prompt, obj = _tilted_prompt(tmp_path, 3.0, slices=(20, 21))
    with pytest.warns(UserWarning, match=r"slices 1\d-2\d onto slice 20, slices 1\d-2\d onto slice 21"):
        got = volumes.read_labelmap(prompt, reference=image, resample=True).array
    assert np.flatnonzero(got.any(axis=(1, 2))).tolist() == [20, 21]


def test_ctrl_c_while_a_batch_moves_a_cases_files_in_stops_after_them(ct_case, tmp_path, monkeypatch, capsys):
    """A third review: Ctrl-C while a case's files went in was ignored, and dropped: the batch ran
    every remaining case and exited 0. It waits for the files, then stops the batch: that case is
    ok (its files are in), the next is not run, exit 130."""
    import os
    import signal

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},{tmp_path / 'a.nii.gz'}\n"
                        f"{ct_case.image_path},{ct_case.prompt_path},{tmp_path / 'b.nii.gz'}\n")
    replace, sent = os.replace, []

    def interrupted_while_moving(src, dst):
        replace(src, dst)
        if not sent and str(dst).endswith("a.nii.gz"):
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C now: after this file, before the batch goes on

    monkeypatch.setattr(os, "replace", interrupted_while_moving)
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 130
    with open(tmp_path / "res" / "batch_report.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "not run"]
    assert (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()


def test_a_record_that_is_a_dangling_link_is_refused_before_any_work(ct_case, tmp_path, capsys, monkeypatch):
    """A third review: OUT.keyframes.json as a link into a missing folder failed after the whole
    propagation (it is written through its link now)."""
    from PAMSegmentLib import propagate as engine

    out = tmp_path / "out.nii.gz"
    (tmp_path / "out.nii.gz.keyframes.json").symlink_to(tmp_path / "missing" / "record.json")
    monkeypatch.setattr(engine, "propagate", lambda *a, **k: pytest.fail("no work before the refusal"))
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy"]) == 2
    assert "missing" in capsys.readouterr().err and not out.exists()



def test_macos_sidecars_beside_a_dicom_series_are_no_damaged_slices(tmp_path):
    """A last review: macOS leaves "._IM0001.dcm" sidecars (AppleDouble) when it copies onto exFAT,
    FAT or SMB drives; checked as slices, they refused a whole series as damaged."""
    from test_volumes import make_volume, write_dicom_series

    write_dicom_series(tmp_path / "dcm", make_volume(shape=(5, 5, 6)), "1.2.826.0.1.3680043.2.1125.7.11")
    for f in sorted((tmp_path / "dcm").iterdir()):
        (tmp_path / "dcm" / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
    assert volumes.read_volume(tmp_path / "dcm").shape == (5, 5, 6)


def test_a_ctrl_c_held_while_a_move_fails_still_stops_the_batch(ct_case, tmp_path, monkeypatch):
    """A last review: a Ctrl-C held while a case's files went in was lost when a move then failed:
    the batch ran every remaining case (exit 2). The held signal stops it (nothing of the case was
    kept: its earlier state was put back)."""
    import os
    import signal

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},{tmp_path / 'a.nii.gz'}\n"
                        f"{ct_case.image_path},{ct_case.prompt_path},{tmp_path / 'b.nii.gz'}\n")
    replace = os.replace

    def interrupted_then_refused(src, dst):
        if str(dst).endswith("a.nii.gz") and ".tmp" in str(src):
            os.kill(os.getpid(), signal.SIGINT)
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_then_refused)
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 130
    with open(tmp_path / "res" / "batch_report.csv", encoding="utf-8") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["not run", "not run"]
    assert not (tmp_path / "b.nii.gz").exists()


def test_a_summary_of_a_few_labels_names_a_seg_nrrds_segments(tmp_path, capsys):
    """A first-user review: with up to 4 labels the summary said "label 1", "label 2" though the
    .seg.nrrd prompt names its segments (Slicer users only see names); past 4 it named them."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 5, (12, 24, 36)).astype(np.float32)
    prompt = np.zeros((12, 24, 36), np.uint8)
    for lab in (1, 2):
        image[2:10, 6:18, 6 * (lab - 1) + 1:6 * lab - 1] += 50 * lab
        prompt[5, 6:18, 6 * (lab - 1) + 1:6 * lab - 1] = lab
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "image.nrrd"))
    seg = sitk.GetImageFromArray(prompt)
    for n, name in enumerate(("spleen", "liver")):
        seg.SetMetaData(f"Segment{n}_ID", f"Segment_{n + 1}")
        seg.SetMetaData(f"Segment{n}_Name", name)
        seg.SetMetaData(f"Segment{n}_LabelValue", str(n + 1))
        seg.SetMetaData(f"Segment{n}_Layer", "0")
    sitk.WriteImage(seg, str(tmp_path / "prompt.seg.nrrd"))
    assert cli.main(["propagate", str(tmp_path / "image.nrrd"), str(tmp_path / "prompt.seg.nrrd"), "-o",
                     str(tmp_path / "out.nii.gz"), "--method", "copy"]) == 0
    out = capsys.readouterr().out
    assert ": label 1 (spleen): slices 2-9; label 2 (liver): slices 2-9 (axis 0, axial slices); " in out
    assert "least confident slices, to check first: label 1 (spleen): " in out and "; label 2 (liver): " in out
