"""Inputs and outputs a user can bring that the readers took silently: a NIfTI header without a
voxel size, a named pipe, a protected result, a link to a device, a prompt on another grid than a
huge image (refused before the image is read), and images in other units (x 1e-12)."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct_case, write_image

from PAMSegmentLib import cli, volumes
from PAMSegmentLib.baselines import CopyPredictor, TrackPredictor
from PAMSegmentLib.errors import InputError
from PAMSegmentLib.propagate import propagate


def _pixdim_zero(path: Path, axis: int = 1) -> None:
    """Set pixdim[axis] of a NIfTI-1 file to 0 (and its sform code to 0, so the qform rules)."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * axis, 0.0)
    struct.pack_into("<h", data, 254, 0)
    path.write_bytes(bytes(data))


def test_nifti_without_a_voxel_size_is_read_as_1_mm_with_a_note(tmp_path, run_cli):
    case = make_ct_case(tmp_path / "case")
    image = write_image(case.image, tmp_path / "image.nii", case.spacing)
    prompt = write_image(case.prompt, tmp_path / "prompt.nii", case.spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert volumes.read_volume(image).spacing == pytest.approx(case.spacing)  # a sound header: nothing said
    _pixdim_zero(image, 1)  # the i axis (0.7 mm) loses its size
    with pytest.warns(UserWarning, match=r"image.nii: its NIfTI header gives no voxel size along i \(pixdim\[1\] = 0\); "
                                         r"like ITK and Slicer, PAMSegment reads that as 1 mm"):
        assert volumes.read_volume(image).spacing == pytest.approx((2.5, 0.8, 1.0))
    # The command line: the note explains why the prompt (on the true grid) is refused, before
    # the image is read.
    proc = run_cli("propagate", image, prompt, "-o", tmp_path / "out.nii.gz", "--method", "copy")
    assert proc.returncode == 2
    assert "note: image.nii: its NIfTI header gives no voxel size along i (pixdim[1] = 0)" in proc.stdout
    assert "prompt.nii is not on the image grid: spacing differs" in proc.stderr
    # Both without it: the walk runs, with the note.
    _pixdim_zero(prompt, 1)
    proc = run_cli("propagate", image, prompt, "-o", tmp_path / "out.nii.gz", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("gives no voxel size along i (pixdim[1] = 0)") == 2  # image and prompt


def test_nifti2_pixdims_are_read():
    header = bytearray(540)
    struct.pack_into("<i", header, 0, 540)
    struct.pack_into("<8q", header, 16, 3, 4, 5, 6, 1, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1.0, 0.5, 0.0, float("nan"), 1, 1, 1, 1)
    assert volumes._nifti_pixdims(bytes(header))[:2] == (0.5, 0.0)
    assert np.isnan(volumes._nifti_pixdims(bytes(header))[2])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_named_pipe_as_image_prompt_or_checkpoint_is_refused_not_waited_on(tmp_path, run_cli, ct_case):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    for args in [(fifo, ct_case.prompt_path), (ct_case.image_path, fifo)]:
        proc = run_cli("propagate", *args, "-o", tmp_path / "out.nii.gz", "--method", "copy", timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"pamsegment: error: {fifo} is a named pipe (FIFO), not an image file; save the " \
                                      "image to a file and give that"
    proc = run_cli("info", fifo, timeout=60)
    assert proc.returncode == 2 and "is not a regular file (a named pipe or a device)" in proc.stderr


def test_read_only_result_is_kept(tmp_path, run_cli, ct_case):
    out = tmp_path / "kept.nii.gz"
    assert run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "copy").returncode == 0
    before = out.read_bytes()
    out.chmod(0o444)
    try:
        proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "track")
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"pamsegment: error: {out} exists and is read-only (mode 0444), so it is kept as " \
                                      "it is; make it writable (chmod u+w) to replace it, or choose another output name"
        assert "propagating" not in proc.stderr  # refused before any work
        assert out.read_bytes() == before
        # Batch: the row is named, nothing runs.
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},{out}\n")
        proc = run_cli("batch", manifest, "-o", tmp_path / "runs", "--method", "copy")
        assert proc.returncode == 2 and "m.csv row 2: " in proc.stderr and "is read-only (mode 0444)" in proc.stderr
        assert not (tmp_path / "runs").exists() and out.read_bytes() == before
        # With --skip-existing the row is skipped, so the protected file does not matter.
        proc = run_cli("batch", manifest, "-o", tmp_path / "runs", "--method", "copy", "--skip-existing")
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == before
    finally:
        out.chmod(0o644)
    out.chmod(0o200)  # the owner may write: replaced as before
    assert run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "track").returncode == 0
    out.chmod(0o644)
    assert out.read_bytes() != before


def test_output_link_to_a_device_is_refused_before_the_work(tmp_path, run_cli, ct_case):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    link = tmp_path / "out.nii.gz"
    link.symlink_to("/dev/null")
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", link, "--method", "copy")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"pamsegment: error: {link} is a symbolic link to /dev/null, which is not a "
                                          "file of an output format")
    assert "propagating" not in proc.stderr
    # A link to a file of an output format is written through, as before.
    target = tmp_path / "real.nrrd"
    other = tmp_path / "other.nrrd"
    other.symlink_to(target)
    assert run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", other, "--method", "copy").returncode == 0
    assert other.is_symlink() and target.is_file()


def test_folder_that_takes_no_files_is_named_so():
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    with pytest.raises(InputError, match=r"cannot write the output in folder /proc \(the folder takes no new files\)"):
        volumes.check_output_path("/proc/out.nii.gz")


def test_prompt_on_another_grid_is_refused_from_the_headers(tmp_path, ct_case, monkeypatch):
    """The image is not read when the prompt's header already puts it on another grid (before, a
    3.5 MB .nii.gz declaring 3000 x 3000 x 400 voxels was read, 67 s and 7 GB, then refused)."""
    other = write_image(ct_case.prompt, tmp_path / "finer.nii.gz", (2.5, 0.8, 0.75))

    def no_read(*args, **kwargs):
        raise AssertionError("the image was read")

    monkeypatch.setattr(volumes, "read_volume", no_read)
    with pytest.raises(InputError) as caught:
        cli.read_case(ct_case.image_path, other, "out.nii.gz", False, note=print)
    assert str(caught.value) == ("finer.nii.gz is not on the image grid: spacing differs (spacing (k, j, i) (2.5, 0.8, "
                                 "0.75) in it vs the image's (2.5, 0.8, 0.7)); it has the image's number of voxels, "
                                 "origin and axes, so if it was drawn on this image's voxels its header's voxel size "
                                 "is wrong: save it with the image's geometry (SimpleITK: mask.CopyInformation(image)); "
                                 "--resample-prompt only if it was drawn on a grid of that voxel size (it would move "
                                 "the drawing)")
    monkeypatch.undo()
    # The same words as after a full read; with --resample-prompt both are read and it goes on.
    with pytest.raises(InputError) as full:
        volumes.read_labelmap(other, reference=volumes.read_volume(ct_case.image_path))
    # the Python API names its own way to resample
    assert str(full.value) == str(caught.value).replace("--resample-prompt", "resample=True")
    image, prompt = cli.read_case(ct_case.image_path, other, "out.nii.gz", True, note=print)
    assert prompt.shape == image.shape == (20, 40, 48)
    # Headers that match, or one that cannot be compared (a DICOM folder, a 2D file): nothing said.
    volumes.check_grids_from_headers(ct_case.image_path, ct_case.prompt_path)
    volumes.check_grids_from_headers(tmp_path, ct_case.prompt_path)
    flat = tmp_path / "flat.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(flat))
    volumes.check_grids_from_headers(ct_case.image_path, flat)


@pytest.mark.parametrize("method", ["pam", "track", "copy"])
def test_same_result_whatever_the_unit_of_the_values(method, ct_case):
    """An image in other units (x 1e-12, say a quantity in SI units) gave other results: the
    flat-region tests of the intensity window and the drift test were absolute (1e-6), and the
    registration divided by at least 1e-6: at x 1e-12 the demo's organs fell from 0.92-0.94 to
    0.52-0.71 Dice. Now scale-free."""
    image = ct_case.image.astype(np.float64) + 1000.0  # positive values, as most units
    model = {"pam": None, "track": TrackPredictor(), "copy": CopyPredictor()}[method]
    results = [propagate(image * s, ct_case.prompt, ct_case.spacing, model, threads=1).mask for s in (1.0, 1e-12)]
    assert results[0].sum() > 1.5 * ct_case.prompt.sum()  # the walk went somewhere
    assert np.array_equal(results[0], results[1])


def test_gantry_tilted_dicom_series_is_refused(tmp_path):
    """A tilted CT's slices step obliquely (each shifted within its plane); ITK stacked them on an
    orthogonal grid at the oblique distance (3.106 mm for 3 mm slices at 15 degrees), placing
    slice k about 0.8 k mm from where it was scanned, and nothing was said."""
    from test_volumes import write_dicom_series

    tilt = np.radians(15)
    array = (np.arange(12 * 16 * 16).reshape(12, 16, 16) % 200).astype(np.int16)
    # Columns i, j, k of ITK's direction: k steps 3 mm along z and 0.8 mm along y per slice.
    sheared = (1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt)))
    tilted = volumes.Volume(array, (3.0 / np.cos(tilt), 1.0, 1.0), (0.0, 0.0, 0.0), sheared)
    write_dicom_series(tmp_path / "tilted", tilted, "1.2.826.0.1.3680043.2.1125.9.1")
    with pytest.raises(InputError, match=r"was acquired with a gantry tilt of 15 degrees \(each slice is shifted "
                                         r"0\.804 mm within its plane .*up to 8\.84 mm from where they were scanned\. "
                                         r"Convert it with a tool that corrects the tilt"):
        volumes.read_volume(tmp_path / "tilted")
    # Positions rounded in their last digits are no tilt: the same series untilted reads.
    straight = volumes.Volume(array, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 1e-5, 0, 0, 1.0))
    write_dicom_series(tmp_path / "straight", straight, "1.2.826.0.1.3680043.2.1125.9.2")
    assert volumes.read_volume(tmp_path / "straight").spacing == pytest.approx((3.0, 1.0, 1.0))


def test_prompt_without_a_position_is_told_so_not_sent_to_resample(tmp_path, ct_case):
    """A mask saved by a script without geometry (NIfTI qform and sform codes 0) has ITK's made-up
    origin and axes: --resample-prompt was advised, which places it wrongly or nowhere."""
    path = tmp_path / "bare.nii"
    sitk.WriteImage(sitk.GetImageFromArray(ct_case.prompt), str(path))
    data = bytearray(path.read_bytes())
    struct.pack_into("<2h", data, 252, 0, 0)  # qform_code, sform_code
    path.write_bytes(bytes(data))
    image = volumes.read_volume(ct_case.image_path)
    with pytest.raises(InputError) as caught:
        volumes.read_labelmap(path, reference=image)
    assert str(caught.value).startswith("bare.nii has the image's size but no position in space in its header (NIfTI "
                                        "qform and sform codes 0), so it cannot be placed on the image (resample=True "
                                        "would put it in the wrong place)")
    with pytest.raises(InputError, match="has the image's size but no position"):
        volumes.check_grids_from_headers(ct_case.image_path, path)
    # --resample-prompt placed it by ITK's made-up coordinates (a drawing on slice 60 on slice 93, exit 0)
    with pytest.raises(InputError, match="has the image's size but no position"):
        volumes.read_labelmap(path, reference=image, resample=True)
    # An NRRD without space fields likewise; one with them is placed (or refused) as usual.
    nrrd = tmp_path / "bare.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 48 40 20\nspacings: 0.7 0.8 2.5\n"
                     b"encoding: raw\n\n" + ct_case.prompt.tobytes())
    with pytest.raises(InputError, match=r"no position in space in its header \(an NRRD without space fields\)"):
        volumes.read_labelmap(nrrd, reference=image)


def test_cropped_seg_nrrd_is_put_back_on_the_image_grid(tmp_path, ct_case):
    """Slicer saves a .seg.nrrd cropped to its segments' extent, on the volume's own lattice: it is
    placed exactly (with a note), as Slicer would; other files on another extent stay refused."""
    image = volumes.read_volume(ct_case.image_path)
    full = sitk.ReadImage(str(ct_case.prompt_path))
    crop = full[10:35, 5:30, 9:12]  # SimpleITK slicing keeps the physical position (x, y, z = i, j, k)
    seg = tmp_path / "drawn.seg.nrrd"
    sitk.WriteImage(crop, str(seg))
    with pytest.warns(UserWarning, match=r"drawn.seg.nrrd \(3 x 25 x 25 voxels\) lies on the image's own voxel grid, "
                                         r"from voxel \(9, 5, 10\) in k, j, i; placed there as it is"):
        got = volumes.read_labelmap(seg, reference=image)
    assert np.array_equal(got.array, ct_case.prompt) and volumes.same_grid(got, image) == []
    volumes.check_grids_from_headers(ct_case.image_path, seg)  # no refusal from the headers either
    plain = tmp_path / "drawn.nrrd"
    sitk.WriteImage(crop, str(plain))
    with pytest.raises(InputError, match="drawn.nrrd is not on the image grid: size, origin differ"):
        volumes.read_labelmap(plain, reference=image)
    # A crop whose labels reach beyond the image is no crop of it.
    beyond = sitk.ConstantPad(crop, [0, 0, 0], [30, 0, 0])
    beyond[54, 3, 1] = 1
    sitk.WriteImage(beyond, str(tmp_path / "beyond.seg.nrrd"))
    with pytest.raises(InputError, match="beyond.seg.nrrd is not on the image grid"):
        volumes.read_labelmap(tmp_path / "beyond.seg.nrrd", reference=image)


def test_prompt_with_x_and_y_signs_flipped_is_named_so(tmp_path, ct_case):
    """A label map written with RAS numbers where the image's are LPS (a tool that mixed them up)
    was called "drawn on another scan?"."""
    image = volumes.read_volume(ct_case.image_path)
    flip = np.diag([-1.0, -1.0, 1.0])
    mirrored = volumes.Volume(ct_case.prompt, image.spacing, tuple(flip @ np.asarray(image.origin)),
                              tuple((flip @ np.asarray(image.direction).reshape(3, 3)).ravel()))
    path = volumes.write_volume(mirrored, tmp_path / "ras.nrrd")
    with pytest.raises(InputError, match=r"ras.nrrd is the image's grid with the x and y axes' signs flipped .*RAS "
                                         r"coordinates where the image's are LPS"):
        volumes.read_labelmap(path, reference=image)
    with pytest.raises(InputError, match=r"resample=True would mirror it"):  # it did, exit 0
        volumes.read_labelmap(path, reference=image, resample=True)


def test_a_reoriented_prompt_on_an_image_centred_on_0_is_still_resampled(tmp_path):
    """On an image whose x and y extent is centred on 0 (a field of view centred on the isocentre) a
    copy reoriented to RAS (voxels flipped with the axes, as nibabel's as_closest_canonical saves
    it) has the grid of one written with the signs mixed up: the refusal under --resample-prompt
    (session 24) refused it, and its CopyInformation advice mirrored it. It is resampled as before;
    without the flag the message names both readings."""
    array = np.zeros((6, 8, 10), np.int16)
    image = volumes.Volume(array, (2.0, 1.0, 1.0), (-4.5, -3.5, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    prompt = np.zeros((6, 8, 10), np.uint8)
    prompt[3, 1:4, 2:7] = 1
    drawn = volumes.Volume(prompt, image.spacing, image.origin, image.direction).to_sitk()
    path = tmp_path / "canonical.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(drawn, "RAS"), str(path))
    with pytest.warns(UserWarning, match=r"is what a copy reoriented to RAS has: resampled as such; if a tool wrote it "
                                         r"with RAS numbers where the image's are LPS, the result is mirrored"):
        got = volumes.read_labelmap(path, reference=image, resample=True)
    assert np.array_equal(got.array, prompt)
    with pytest.raises(InputError, match=r"if it is a reoriented copy of a drawing on this image .* use "
                                         r"resample=True; if a tool wrote RAS numbers"):
        volumes.read_labelmap(path, reference=image)


def test_dicom_series_of_equal_size_are_not_called_the_largest(tmp_path):
    from test_volumes import make_volume, write_dicom_series

    one, two = make_volume(shape=(3, 5, 6)), make_volume(shape=(3, 5, 6))
    write_dicom_series(tmp_path / "two", one, "1.2.826.0.1.3680043.2.1125.8.1", prefix="a")
    write_dicom_series(tmp_path / "two", two, "1.2.826.0.1.3680043.2.1125.8.2", prefix="b")
    said = (r"\(3 files\), the first of 2 series of that size; the other: "
            r"1\.2\.826\.0\.1\.3680043\.2\.1125\.8\.2 \(3 files\)\.$")
    with pytest.warns(volumes.SeriesChoiceWarning, match=said):
        volumes.read_volume(tmp_path / "two")


def test_a_folder_whose_subfolders_hold_the_series_names_them(tmp_path):
    from test_volumes import make_volume, write_dicom_series

    write_dicom_series(tmp_path / "export" / "PATIENT1" / "SERIES2", make_volume(shape=(3, 5, 6)),
                       "1.2.826.0.1.3680043.2.1125.8.3")
    with pytest.raises(InputError, match=r"export holds no DICOM series itself, but its subfolders do \(.*PATIENT1."
                                         r"SERIES2\): pass the folder of the series"):
        volumes.read_volume(tmp_path / "export")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty is a folder without a DICOM series"):
        volumes.read_volume(tmp_path / "empty")


def test_seg_nrrd_result_keeps_the_prompts_segment_names_and_colours(tmp_path, ct_case, run_cli):
    image = volumes.read_volume(ct_case.image_path)
    prompt = sitk.ReadImage(str(ct_case.prompt_path))
    for key, value in {"Segment0_ID": "Segment_kidney", "Segment0_Name": "left kidney", "Segment0_Color": "0.9 0.1 0.2",
                       "Segment0_LabelValue": "1", "Segment0_Layer": "0"}.items():
        prompt.SetMetaData(key, value)
    seg = tmp_path / "drawn.seg.nrrd"
    sitk.WriteImage(prompt, str(seg))
    assert volumes.seg_nrrd_segments(seg) == {1: {"ID": "Segment_kidney", "Name": "left kidney", "Color": "0.9 0.1 0.2"}}
    out = tmp_path / "result.seg.nrrd"
    assert run_cli("propagate", ct_case.image_path, seg, "-o", out, "--method", "copy").returncode == 0
    written = sitk.ImageFileReader()
    written.SetFileName(str(out))
    written.ReadImageInformation()
    assert [written.GetMetaData(f"Segment0_{k}") for k in ("ID", "Name", "Color", "NameAutoGenerated")] == [
        "Segment_kidney", "left kidney", "0.9 0.1 0.2", "0"]
    # From a prompt without names (or not a .seg.nrrd) the segments are named by label, as before.
    plain = tmp_path / "plain.seg.nrrd"
    volumes.write_labelmap(ct_case.prompt, image, plain)
    assert volumes.seg_nrrd_segments(plain) == {1: {"ID": "Segment_1", "Name": "Segment_1", "Color": "0.5 0.68 0.5"}}
    assert volumes.seg_nrrd_segments(ct_case.prompt_path) == {}


def test_a_single_slice_image_is_named_so_before_the_prompt_grid(tmp_path, ct_case, run_cli):
    one = write_image(ct_case.image[10:11], tmp_path / "one.nii.gz", ct_case.spacing)
    proc = run_cli("propagate", one, ct_case.prompt_path, "-o", tmp_path / "out.nii.gz", "--method", "copy")
    assert proc.returncode == 2 and "one.nii.gz has a single slice" in proc.stderr, proc.stderr


def test_bands_of_one_outline_across_adjacent_slices_are_recognised_but_not_refused_by_the_engine():
    """One outline painted on a plane tilted against the slices lands on several adjacent slices as
    bands (Slicer refuses that on an oblique volume, test_mrml_corrections); the engine takes them
    as drawn, since small structures on thick slices overlap their neighbours that little too."""
    from conftest import ellipsoid

    from PAMSegmentLib.propagate import find_prompt_slices, tilted_drawing

    shape = (24, 40, 44)
    truth = ellipsoid(shape, (12, 20, 22), (8, 12, 14))
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")

    def painted(tilt_deg):  # voxels within 1 mm of a plane through the centre, tilted about the i axis
        t = np.radians(tilt_deg)
        height = (j - 20) * 0.9 * np.sin(t) + (k - 12) * 2.0 * np.cos(t)  # mm along the plane's normal
        return ((np.abs(height) <= 1.0) & truth).astype(np.uint8)

    assert find_prompt_slices(painted(3)) == (0, {1: [12]})  # nearly aligned: one slice
    assert find_prompt_slices(painted(10)) == (0, {1: [11, 12, 13]})
    assert tilted_drawing(painted(10), 0, [11, 12, 13]) == (11, 13)
    assert tilted_drawing(painted(20), 0, [10, 11, 12, 13, 14]) == (10, 14)
    # Not bands: adjacent sections of one object (overlapping), two slices only, or slices apart.
    three = np.zeros(shape, np.uint8)
    three[11:14][truth[11:14]] = 1
    assert tilted_drawing(three, 0, [11, 12, 13]) is None
    small = np.zeros(shape, np.uint8)
    small[6, 10:16, 10:16] = 1
    small[7, 10:16, 14:20] = 1  # overlap 12 of 36 px: a small structure on thick slices
    assert tilted_drawing(small, 0, [6, 7]) is None and find_prompt_slices(small) == (0, {1: [6, 7]})


def test_odd_segment_fields_of_a_seg_nrrd_are_not_copied(tmp_path, ct_case):
    prompt = sitk.ReadImage(str(ct_case.prompt_path))
    fields = {"Segment0_ID": "same", "Segment0_Name": "one", "Segment0_Color": "red", "Segment0_LabelValue": "1",
              "Segment1_ID": "same", "Segment1_Name": "two", "Segment1_Color": "0.1 0.2", "Segment1_LabelValue": "2",
              "Segment2_ID": "x", "Segment2_Name": "three", "Segment2_Color": "0 0 1", "Segment2_LabelValue": "three"}
    for key, value in fields.items():
        prompt.SetMetaData(key, value)
    seg = tmp_path / "odd.seg.nrrd"
    sitk.WriteImage(prompt, str(seg))
    # Colours Slicer cannot read, a repeated ID and a segment with a label that is no number are left out.
    assert volumes.seg_nrrd_segments(seg) == {1: {"ID": "same", "Name": "one"}, 2: {"Name": "two"}}


@pytest.mark.parametrize("total_mm, refused", [(2.0, True), (0.5, False)])
def test_a_gantry_tilt_is_refused_from_a_shift_of_more_than_a_pixel_over_the_series(tmp_path, total_mm, refused):
    """A mutation review: the tilt's tolerance (the slices' in-plane shift over the whole series
    within one pixel, here 1 mm) could be 5 times looser unseen; only 15 degrees was tried. 12
    slices 3 mm apart shifted 2 mm in all (3.5 degrees) are refused; 0.5 mm (0.9 degrees) read."""
    from test_volumes import write_dicom_series

    tilt = np.arctan(total_mm / 11 / 3.0)
    array = (np.arange(12 * 16 * 16).reshape(12, 16, 16) % 200).astype(np.int16)
    sheared = (1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt)))
    write_dicom_series(tmp_path / "s", volumes.Volume(array, (3.0 / np.cos(tilt), 1.0, 1.0), (0.0, 0.0, 0.0), sheared),
                       "1.2.826.0.1.3680043.2.1125.9.3")
    if refused:
        with pytest.raises(InputError,
                           match=r"gantry tilt of 3\.47 degrees .* up to 2 mm from where they were scanned"):
            volumes.read_volume(tmp_path / "s")
    else:
        assert volumes.read_volume(tmp_path / "s").shape == (12, 16, 16)
