"""Volume I/O: geometry round trips, label maps on the image grid, and one-line input errors."""

import errno
import locale
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PAMSegmentLib.errors import InputError
from PAMSegmentLib.volumes import (SeriesChoiceWarning, Volume, check_output_path, read_labelmap, read_volume,
                                    same_grid, write_labelmap, write_volume)

COS, SIN = math.cos(math.radians(30)), math.sin(math.radians(30))
ROT_X_30 = (1.0, 0.0, 0.0, 0.0, COS, -SIN, 0.0, SIN, COS)  # 30 degrees about x (ITK row-major)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def make_volume(shape=(4, 5, 6), dtype=np.int16, spacing=(2.5, 0.9, 0.7), direction=ROT_X_30) -> Volume:
    """Anisotropic, rotated test volume; every voxel a different value. Shape and spacing (k, j, i)."""
    array = (np.arange(np.prod(shape)).reshape(shape) - 40).astype(dtype)
    return Volume(array, spacing, (-12.5, 30.25, 7.125), direction)


def assert_geometry(got: Volume, want: Volume, tol: float) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=0, atol=tol)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=tol)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=tol)


def write_dicom_series(folder: Path, volume: Volume, series_uid: str, prefix: str = "slice",
                       instance_prefix: str = "") -> None:
    """One CT file per k-slice, with the tags GDCM needs to rebuild the 3D geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk()
    d = volume.direction

    def ds(values):  # DICOM decimal strings are at most 16 characters
        return "\\".join(f"{v:.10g}" for v in values)

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{instance_prefix}{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": ds(image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": ds((d[0], d[3], d[6], d[1], d[4], d[7])),  # row (i) then column (j) cosines
            "0028|0030": ds((volume.spacing[1], volume.spacing[2])),  # row spacing \ column spacing
            "0018|0050": ds((volume.spacing[0],)),
        }
        plane = image[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(plane)
        finally:  # GDCM's writer leaves the C locale set: later open() calls would default to ASCII
            locale.setlocale(locale.LC_ALL, saved)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_files(tmp_path, ext):
    vol = make_volume()
    path = write_volume(vol, tmp_path / f"image{ext}")
    got = read_volume(path)
    assert got.array.dtype == np.int16
    np.testing.assert_array_equal(got.array, vol.array)
    assert_geometry(got, vol, 1e-5)
    assert same_grid(got, vol) == []


def test_round_trip_float_volume(tmp_path):
    vol = make_volume(dtype=np.float32, direction=IDENTITY)
    got = read_volume(write_volume(vol, tmp_path / "f.nrrd"))
    np.testing.assert_array_equal(got.array, vol.array)
    assert got.spacing == vol.spacing and got.spacing_kji == (2.5, 0.9, 0.7)
    assert got.spacing_ijk == (0.7, 0.9, 2.5) and got.size_ijk == (6, 5, 4)


def test_round_trip_dicom_series(tmp_path):
    vol = make_volume()
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.2")
    got = read_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(got.array, vol.array)
    assert_geometry(got, vol, 1e-3)


def test_dicom_folder_with_two_series(tmp_path):
    small, large = make_volume(shape=(3, 5, 6)), make_volume(shape=(5, 5, 6))
    folder = tmp_path / "mixed"
    write_dicom_series(folder, small, "1.2.826.0.1.3680043.2.1125.7.3", prefix="a")
    write_dicom_series(folder, large, "1.2.826.0.1.3680043.2.1125.7.4", prefix="b")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        got = read_volume(folder)
    assert got.shape == (5, 5, 6)
    assert read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.7.3").shape == (3, 5, 6)
    with pytest.raises(InputError, match="available series"):
        read_volume(folder, series_uid="1.2.3")


def test_a_one_slice_drawing_on_an_oblique_grid_is_refused_when_resampled(tmp_path):
    """A prompt drawn on one slice of a grid tilted 30 degrees crossed many of the image's slices as
    thin strips, each then a drawn keyframe (27 on a head CT: the result was the strips). A drawing
    on one slice of a coarser parallel grid is resampled as before."""
    image = Volume(np.zeros((40, 40, 40), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    drawing = np.zeros((9, 40, 40), np.uint8)
    drawing[4, 8:32, 8:32] = 1  # one slice
    tilted = write_volume(Volume(drawing, (3.0, 1.0, 1.0), (0.0, 0.0, 8.0), ROT_X_30), tmp_path / "tilted.nrrd")
    with pytest.raises(InputError, match=r"^tilted.nrrd: label 1 was drawn on one slice of a grid oblique to the "
                                         r"image's; on the image it crosses \d+ slices along every axis"):
        read_labelmap(tilted, reference=image, resample=True)
    drawing[7, 10:30, 10:30] = 1  # a second drawn slice of the same grid: strips as well (accepted before)
    two = write_volume(Volume(drawing, (3.0, 1.0, 1.0), (0.0, 0.0, 8.0), ROT_X_30), tmp_path / "two.nrrd")
    with pytest.raises(InputError, match=r"^two.nrrd: label 1 was drawn on 2 slices of a grid oblique to the image's"):
        read_labelmap(two, reference=image, resample=True)
    drawing[7] = 0
    coarse = write_volume(Volume(drawing, (3.0, 1.0, 1.0), (0.0, 0.0, 8.0), IDENTITY), tmp_path / "coarse.nrrd")
    got = read_labelmap(coarse, reference=image, resample=True).array
    assert np.count_nonzero(got.any(axis=(1, 2))) == 3  # the 3 mm slice covers three 1 mm slices


@pytest.mark.parametrize("size", [(6, 5), (9, 7)])
def test_a_localizer_in_the_series_is_left_out_with_a_note(tmp_path, size):
    """A scout of another orientation saved under the series' UID was refused as "echoes or phases"
    (same size) or with a bare ITK size (another size). It is left out, as dcm2niix and Slicer do."""
    from PAMSegmentLib.volumes import SeriesChoiceWarning

    vol = make_volume(shape=(8, 5, 6), spacing=(2.0, 0.9, 0.7), direction=IDENTITY)
    folder = tmp_path / "ct"
    uid = "1.2.826.0.1.3680043.2.1125.7.13"
    write_dicom_series(folder, vol, uid)
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    scout = Volume(np.ones((1, size[1], size[0]), np.int16), (1.0, 1.2, 1.2), (-5.0, 3.0, 4.0), coronal)
    write_dicom_series(folder, scout, uid, prefix="scout", instance_prefix="99.")
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) of series .* whose orientation, size, colour or "
                                         r"position information differs from the other 8 \(scout000.dcm: a localizer "
                                         r"or a screenshot\?\)") as caught:
        got = read_volume(folder)
    # not a choice of series (a review, s29: the command line added "Choose another with --series UID.")
    assert not any(issubclass(w.category, SeriesChoiceWarning) for w in caught)
    assert got.shape == (8, 5, 6) and np.array_equal(got.array, vol.array)


def test_one_dicom_file_without_extension_asks_for_its_folder(tmp_path):
    """Most scanner files have no .dcm extension; the hint to pass the folder keyed on the name."""
    folder = tmp_path / "series"
    write_dicom_series(folder, make_volume(shape=(3, 5, 6), direction=IDENTITY), "1.2.826.0.1.3680043.2.1125.7.14")
    bare = folder / "CT.1.3.12.2.1107"
    (folder / "slice000.dcm").rename(bare)
    where = re.escape(str(folder))
    with pytest.raises(InputError, match=rf"has a single slice .*\(for DICOM pass the series folder, {where}, "
                                         r"not one file\)"):
        read_volume(bare)


def test_an_nrrd_key_value_pair_named_data_file_is_no_data_file(tmp_path):
    """NRRD's key/value pairs ("DataFile:=y") are not the "data file:" field: such a file, which ITK
    reads, was refused once every NRRD header was scanned."""
    vol = make_volume(shape=(4, 5, 6), direction=IDENTITY)
    image = vol.to_sitk()
    image.SetMetaData("DataFile", "y")
    image.SetMetaData("data file", "x")
    path = tmp_path / "kv.nrrd"
    sitk.WriteImage(image, str(path))
    assert np.array_equal(read_volume(path).array, vol.array)


@pytest.mark.parametrize("kind", ["nhdr", "mhd"])
def test_a_detached_header_whose_data_is_a_pipe_or_device_is_refused(tmp_path, kind):
    """check_regular_file looked at the header only: one naming a FIFO hung the run, one naming
    /dev/urandom segmented noise (exit 0). A header with an ordinary data file reads."""
    data = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    (tmp_path / "ok.raw").write_bytes(data.tobytes())
    if kind == "nhdr":
        text = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 6 5 4\nspace: left-posterior-superior\n" \
               "space directions: (1,0,0) (0,1,0) (0,0,2)\nspace origin: (0,0,0)\nencoding: raw\ndata file: {}\n"
    else:
        text = "ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementSpacing = 1 1 2\nElementType = MET_UCHAR\n" \
               "ElementDataFile = {}\n"
    good = tmp_path / f"ok.{kind}"
    good.write_text(text.format("ok.raw"))
    assert np.array_equal(read_volume(good).array, data)
    os.mkfifo(tmp_path / "pipe raw.dat")  # a space in its name too
    # the field is allowed in any header of the format, not only the detached kind's
    attached = {"nhdr": "nrrd", "mhd": "mha"}[kind]
    for target in ("pipe raw.dat", "/dev/urandom"):
        for ext in (kind, attached):
            bad = tmp_path / f"bad.{ext}"
            bad.write_text(text.format(target))
            with pytest.raises(InputError, match=rf"bad.{ext} names .* as its voxel data, which is not a regular file"):
                read_volume(bad)
    # a folder as the data file: named
    (tmp_path / "adir.raw").mkdir()
    folder = tmp_path / f"folder.{kind}"
    folder.write_text(text.format("adir.raw"))
    with pytest.raises(InputError, match=rf"folder.{kind} names .*adir.raw as its voxel data, which is a folder"):
        read_volume(folder)
    # copied without its data file: named, not called damaged
    lost = tmp_path / f"lost.{kind}"
    lost.write_text(text.format("nothere.raw"))
    with pytest.raises(InputError, match=rf"lost.{kind} names .*nothere.raw as its voxel data, which does not exist; "
                                         r"copy the data file beside its header too"):
        read_volume(lost)


def test_dicom_series_whose_spacing_changes_part_way_is_refused(tmp_path):
    """Each step within 10 % of the median, but 1.5 mm steps then 1.38 mm ones: ITK stacked it on a
    1.44 mm grid, slices up to 0.57 mm (here; 3.2 mm on a 108-slice series) from where they were
    acquired, and only warned (hidden). Refused like a missing slice."""
    first = make_volume(shape=(10, 5, 6), spacing=(1.5, 0.9, 0.7), direction=IDENTITY)
    start = (first.origin[0], first.origin[1], first.origin[2] + 9 * 1.5 + 1.38)
    second = Volume(first.array + 1, (1.38, 0.9, 0.7), start, first.direction)
    folder = tmp_path / "zones"
    write_dicom_series(folder, first, "1.2.826.0.1.3680043.2.1125.7.11", prefix="a_")
    write_dicom_series(folder, second, "1.2.826.0.1.3680043.2.1125.7.11", prefix="b_", instance_prefix="9.")
    with pytest.raises(InputError, match=r"is not evenly spaced: its slice spacing varies from 1.38 to 1.5 mm, so on "
                                         r"one uniform grid its slices would lie up to 0.568 mm from where they were"):
        read_volume(folder)
    even = tmp_path / "even"
    write_dicom_series(even, make_volume(shape=(20, 5, 6), spacing=(1.5, 0.9, 0.7), direction=IDENTITY),
                       "1.2.826.0.1.3680043.2.1125.7.12")
    assert read_volume(even).shape == (20, 5, 6)


def test_dicom_series_with_a_missing_slice_or_repeated_positions_is_refused(tmp_path):
    # ITK would stack them on one uniform grid (a missing slice: 2.11 mm instead of 2 with a gap;
    # two echoes: 2 x the slices at half the spacing) and only warn.
    vol = make_volume(shape=(8, 5, 6), spacing=(2.0, 0.9, 0.7))
    gap = tmp_path / "gap"
    write_dicom_series(gap, vol, "1.2.826.0.1.3680043.2.1125.7.5")
    assert read_volume(gap).shape == (8, 5, 6)  # complete: fine
    (gap / "slice003.dcm").unlink()
    with pytest.raises(InputError, match=r"is not evenly spaced: 1 gap\(s\) of up to 4 mm between slices 2 mm apart"):
        read_volume(gap)
    echoes = tmp_path / "echoes"
    write_dicom_series(echoes, vol, "1.2.826.0.1.3680043.2.1125.7.6", prefix="e1_")
    # A second echo: same series, same positions, other instance UIDs.
    second = Volume(vol.array + 1, vol.spacing, vol.origin, vol.direction)
    write_dicom_series(echoes, second, "1.2.826.0.1.3680043.2.1125.7.6", prefix="e2_", instance_prefix="9.")
    with pytest.raises(InputError, match=r"has 8 slice position\(s\) occupied more than once"):
        read_volume(echoes)


def test_cli_series_option_and_note(tmp_path, run_cli):
    small, large = make_volume(shape=(3, 5, 6)), make_volume(shape=(5, 5, 6))
    folder = tmp_path / "mixed"
    write_dicom_series(folder, small, "1.2.826.0.1.3680043.2.1125.7.3", prefix="a")
    write_dicom_series(folder, large, "1.2.826.0.1.3680043.2.1125.7.4", prefix="b")
    prompt = np.zeros(small.shape, np.uint8)
    prompt[1, 1:4, 2:5] = 1
    prompt_path = write_labelmap(prompt, small, tmp_path / "prompt.nrrd")  # drawn on the smaller series
    out = tmp_path / "out.nrrd"
    proc = run_cli("propagate", folder, prompt_path, "-o", out, "--method", "copy")
    assert proc.returncode == 2
    assert "mixed holds 2 DICOM series; using 1.2.826.0.1.3680043.2.1125.7.4 (5 files), the largest; the other: " \
           "1.2.826.0.1.3680043.2.1125.7.3 (3 files). Choose another with --series UID." in proc.stdout \
        and proc.stdout.startswith("note: ")
    assert "series_uid" not in proc.stdout  # the command line's message, not the Python argument
    assert "UserWarning" not in proc.stderr
    proc = run_cli("propagate", folder, prompt_path, "-o", out, "--method", "copy",
                   "--series", "1.2.826.0.1.3680043.2.1125.7.3")
    assert proc.returncode == 0, proc.stderr
    assert read_labelmap(out, reference=read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.7.3")).shape == (3, 5, 6)
    proc = run_cli("propagate", prompt_path, prompt_path.with_name("p2.nrrd"), "-o", out, "--series", "1.2")
    assert proc.returncode == 2 and "--series applies to a DICOM folder" in proc.stderr
    # The folder given as PROMPT: --series chooses the image's series, so its note does not name it.
    with pytest.warns(SeriesChoiceWarning, match=r"the largest; the other: 1\.2\.826\.0\.1\.3680043\.2\.1125\.7\.3 "
                                                 r"\(3 files\)\.$"):
        image_path = write_volume(read_volume(folder), tmp_path / "image.nrrd")
    proc = run_cli("propagate", image_path, folder, "-o", out, "--method", "copy")
    assert [line for line in proc.stdout.splitlines() if line.startswith("note: ")] == [
        f"note: {folder} holds 2 DICOM series; using 1.2.826.0.1.3680043.2.1125.7.4 (5 files), the largest; the "
        "other: 1.2.826.0.1.3680043.2.1125.7.3 (3 files)."]


# ----------------------------------------------------------------------------- label maps


@pytest.mark.parametrize("ref_ext, out_ext", [(".nii.gz", ".nii.gz"), (".nrrd", ".nrrd"), (".nrrd", ".seg.nrrd"), (".mha", ".mha")])
def test_write_labelmap_keeps_reference_geometry(tmp_path, ref_ext, out_ext):
    ref = read_volume(write_volume(make_volume(), tmp_path / f"ref{ref_ext}"))
    mask = np.zeros(ref.shape, bool)
    mask[1:3, 2:4, 1:5] = True
    out = write_labelmap(mask, ref, tmp_path / f"out{out_ext}")
    raw = Volume.from_sitk(sitk.ReadImage(str(out)))
    assert raw.array.dtype == np.uint8
    np.testing.assert_array_equal(raw.array, mask)
    # Exact up to the file format's float representation (NRRD stores spacing x direction).
    assert_geometry(raw, ref, 1e-9)
    labels = read_labelmap(out, reference=ref)  # no grid error
    np.testing.assert_array_equal(labels.array, mask)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_labelmap_image_carries_reference_geometry_exactly():
    ref = make_volume()
    image = ref.to_sitk(np.zeros(ref.shape, bool))
    assert image.GetSpacing() == (0.7, 0.9, 2.5) and image.GetOrigin() == ref.origin
    assert image.GetDirection() == ref.direction and image.GetPixelID() == sitk.sitkUInt8
    assert ref.reference_image().GetSize() == (6, 5, 4)


def test_seg_nrrd_has_segment_fields_for_slicer(tmp_path):
    ref = make_volume()
    labels = np.zeros(ref.shape, np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 1, 3
    image = sitk.ReadImage(str(write_labelmap(labels, ref, tmp_path / "out.seg.nrrd")))
    assert image.GetMetaData("Segment0_LabelValue") == "1"
    assert image.GetMetaData("Segment1_LabelValue") == "3"
    assert image.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"


def test_write_labelmap_uint16_for_large_labels(tmp_path):
    ref = make_volume()
    labels = np.zeros(ref.shape, np.int64)
    labels[0, 0, 0] = 300
    got = read_labelmap(write_labelmap(labels, ref, tmp_path / "big.nii.gz"))
    assert got.array.dtype == np.uint16 and got.array.max() == 300


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    ref = make_volume()
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"previous result")

    def broken_write(*args, **kwargs):
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(InputError, match="cannot write"):
        write_labelmap(np.ones(ref.shape, bool), ref, target)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]


def test_writing_through_a_symbolic_link_keeps_the_link(tmp_path):
    # the atomic write (a temporary moved in) lands on the link's target; the link stays a link
    ref = make_volume()
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "result.nrrd"
    real.write_bytes(b"previous result")
    link = tmp_path / "result.nrrd"
    link.symlink_to(real)
    assert write_labelmap(np.ones(ref.shape, bool), ref, link) == link
    assert link.is_symlink() and read_labelmap(real).array.all()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["result.nrrd"]


def test_write_errors(tmp_path):
    ref = make_volume()
    with pytest.raises(InputError, match="does not exist"):
        write_labelmap(np.ones(ref.shape, bool), ref, tmp_path / "missing" / "out.nii.gz")
    with pytest.raises(InputError, match="does not match the image"):
        write_labelmap(np.ones((1, 2, 3), bool), ref, tmp_path / "out.nii.gz")
    with pytest.raises(InputError, match="output format"):
        write_labelmap(np.ones(ref.shape, bool), ref, tmp_path / "out.png")
    with pytest.raises(InputError, match="non-integer"):
        write_labelmap(np.full(ref.shape, 0.5), ref, tmp_path / "out.nii.gz")


TILT_S, TILT_C = math.sin(math.radians(16.7)), math.cos(math.radians(16.7))
SHEARED = (1.0, 0.0, 0.0, 0.0, 1.0, TILT_S, 0.0, 0.0, TILT_C)  # k axis tilted 16.7 degrees in y (gantry tilt)


def test_sheared_grid_is_refused_for_nifti_and_kept_by_nrrd(tmp_path):
    # ITK would coerce the direction to an orthogonal one (about 8 degrees off) and only warn.
    ref = make_volume(direction=SHEARED)
    for name in ("out.nii.gz", "out.nii"):
        with pytest.raises(InputError, match=r"sheared .* NIfTI cannot store; write out.nrrd or .mha instead"):
            write_labelmap(np.ones(ref.shape, bool), ref, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    for name in ("out.nrrd", "out.mha"):
        back = read_labelmap(write_labelmap(np.ones(ref.shape, bool), ref, tmp_path / name))
        assert_geometry(back, ref, 1e-9)


def test_output_path_that_is_a_folder_and_long_names(tmp_path):
    ref = make_volume()
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(InputError, match="dir.nii.gz is a folder; give a file name"):
        write_labelmap(np.ones(ref.shape, bool), ref, tmp_path / "dir.nii.gz")
    # A folder without an extension (`-o results/`) is a folder too, not a file of unknown format.
    (tmp_path / "results").mkdir()
    for given in (tmp_path / "results", f"{tmp_path / 'results'}/"):
        with pytest.raises(InputError) as err:
            check_output_path(given)
        assert str(err.value) == (f"{tmp_path / 'results'} is a folder; give a file name "
                                  f"(e.g. {tmp_path / 'results' / 'result.nii.gz'})")
    # 240 characters is a valid name; the temporary file beside it must not make it too long.
    long = tmp_path / ("b" * 233 + ".nii.gz")
    assert read_labelmap(write_labelmap(np.ones(ref.shape, bool), ref, long)).array.all()
    with pytest.raises(InputError, match="cannot use the path .*File name too long"):
        read_volume(tmp_path / ("a" * 300 + ".nii.gz"))


def test_nifti_with_disagreeing_qform_and_sform_is_noted(tmp_path):
    # ITK uses one of the two grids silently; the output then stores only that one, and FSL or
    # nibabel (which prefer the sform) would place input and output 50 mm apart.
    import struct

    vol = make_volume(shape=(6, 5, 4), direction=IDENTITY)
    path = write_volume(vol, tmp_path / "two_grids.nii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(path)  # as written: both grids agree, nothing to say
    data = bytearray(path.read_bytes())
    z = struct.unpack_from("<f", data, 324)[0]  # srow_z's translation
    struct.pack_into("<f", data, 324, z + 50.0)
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"two_grids.nii: its NIfTI header holds two different grids \(qform and "
                                         r"sform are up to 50 mm apart\); like ITK and Slicer, PAMSegment uses the "
                                         r"(q|s)form") as record:
        got = read_volume(path)
    used = "sform" if "uses the sform" in str(record[0].message) else "qform"
    assert got.origin[2] == pytest.approx(vol.origin[2] + (50.0 if used == "sform" else 0.0))


def test_a_prompt_off_the_grid_of_an_image_with_two_grids_names_them(tmp_path):
    """The image's header holds two grids 30 mm apart and the prompt was saved on the other one: the
    refusal suggested --resample-prompt, which moved the prompt by 30 mm (exit 0). It now says
    the image holds two grids and how to make them one, and does not suggest resampling."""
    import struct

    from PAMSegmentLib.volumes import check_grids_from_headers

    vol = make_volume(shape=(6, 5, 4), direction=IDENTITY)
    image = write_volume(vol, tmp_path / "two_grids.nii")
    prompt = write_volume(make_volume(shape=(6, 5, 4), direction=IDENTITY), tmp_path / "prompt.nii")
    check_grids_from_headers(image, prompt)  # one grid each, the same: nothing to say
    data = bytearray(image.read_bytes())
    struct.pack_into("<2h", data, 252, 1, 1)  # both codes set
    z = struct.unpack_from("<f", data, 324)[0]  # srow_z's translation
    struct.pack_into("<f", data, 324, z + 30.0)  # the sform 30 mm off the qform, where the prompt is
    image.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_volume(image).origin[2] == pytest.approx(vol.origin[2] + 30.0)  # ITK uses the sform
    with pytest.raises(InputError) as err:
        check_grids_from_headers(image, prompt)
    text = str(err.value)
    assert text.startswith("prompt.nii is not on the image grid (origin") and "to resample it onto" not in text
    assert "the NIfTI header of two_grids.nii (qform and sform up to 30 mm apart) holds two different grids" in text
    assert "resample=True would move it by their difference" in text  # the Python API's words for it
    with pytest.raises(InputError, match="so --resample-prompt would move it by their difference"):
        check_grids_from_headers(image, prompt, resample_option="--resample-prompt")
    # a prompt on a grid of its own (coarser) is not about the two grids: resampling is the way
    coarse = write_volume(make_volume(shape=(3, 5, 4), spacing=(5.0, 0.9, 0.7), direction=IDENTITY),
                          tmp_path / "coarse.nii")
    with pytest.raises(InputError, match=r"^coarse.nii is not on the image grid: size, spacing, origin differ") as err:
        check_grids_from_headers(image, coarse)
    assert "qform" not in str(err.value)


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_truncated_metaimage_and_nrrd_are_named_as_such(tmp_path, capfd, ext):
    """ITK's own reason was "No such file or directory" (MetaImage), about a file that is there, and
    MetaIO printed two lines of its own; a truncated NRRD was told the formats it could be."""
    path = write_volume(make_volume(shape=(20, 30, 40)), tmp_path / f"ct{ext}")
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    capfd.readouterr()
    with pytest.raises(InputError, match="its voxel data ends early or is damaged( .*)?; copy or download it "
                                         "again$") as err:
        read_volume(cut)
    assert "expected NIfTI" not in str(err.value)
    assert "No such file" not in str(err.value)  # MetaIO's errno text about a file that is there (session 37)
    assert capfd.readouterr().err == ""  # nothing of ITK's own on stderr


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, ext):
    # ITK's NIfTI reader fills what is missing with zeros without a word.
    vol = make_volume(shape=(20, 30, 40))
    path = write_volume(vol, tmp_path / f"ct{ext}")
    np.testing.assert_array_equal(read_volume(path).array, vol.array)  # intact: read as written
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    phrase = "is incomplete or damaged" if ext == ".nii.gz" else r"is truncated: its header needs 48352 bytes"
    with pytest.raises(InputError, match=phrase):
        read_volume(cut)
    with pytest.raises(InputError, match=phrase):
        read_labelmap(cut)


@pytest.mark.parametrize(
    "change, phrase",
    [
        (dict(shape=(4, 5, 7)), "size"),
        (dict(spacing=(2.0, 0.9, 0.7)), "spacing"),
        (dict(origin=(-12.5, 31.25, 7.125)), "origin"),
        (dict(direction=IDENTITY), "direction"),
    ],
)
def test_labelmap_on_other_grid_is_refused(tmp_path, change, phrase):
    ref = make_volume()
    other = make_volume(shape=change.get("shape", ref.shape), dtype=np.uint8)
    other.spacing = change.get("spacing", ref.spacing)
    other.origin = change.get("origin", ref.origin)
    other.direction = change.get("direction", ref.direction)
    path = write_volume(other, tmp_path / "prompt.nii.gz")
    # (the image's size with another voxel size: its header is more likely wrong than the drawing on another grid)
    advice = "resample=True only if it was drawn on a grid of that" if phrase == "spacing" else "use resample=True"
    with pytest.raises(InputError, match=rf"not on the image grid: {phrase} differs .*{advice}") as info:
        read_labelmap(path, reference=ref)
    assert "\n" not in str(info.value)
    assert same_grid(read_labelmap(path), ref) == [phrase]


def test_resample_fixes_prompt_with_other_spacing(tmp_path):
    # Image: 10 slices of 2 mm. Prompt drawn on a 1 mm grid with the same origin, so prompt
    # slice 8 lies at 8 mm = image slice 4.
    image = Volume(np.zeros((10, 12, 14), np.int16), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    prompt = np.zeros((20, 12, 14), np.uint8)
    prompt[8, 3:7, 4:10] = 1
    path = write_labelmap(prompt, Volume(prompt, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY), tmp_path / "p.nrrd")
    with pytest.raises(InputError, match="size, spacing differ"):
        read_labelmap(path, reference=image)
    got = read_labelmap(path, reference=image, resample=True)
    expected = np.zeros(image.shape, np.uint8)
    expected[4, 3:7, 4:10] = 1
    np.testing.assert_array_equal(got.array, expected)
    assert same_grid(got, image) == []


def test_resampled_prompt_that_misses_the_image_says_so(tmp_path):
    ref = make_volume(direction=IDENTITY)
    prompt = np.zeros(ref.shape, np.uint8)
    prompt[2, 1:4, 1:4] = 1
    far = Volume(prompt, ref.spacing, (500.0, 500.0, 500.0), ref.direction)  # same size, 500 mm away
    path = write_labelmap(prompt, far, tmp_path / "far.nrrd")
    with pytest.raises(InputError, match="far.nrrd holds labels, but none of them is left on the image grid after "
                                         "resampling: the drawing lies outside the image"):
        read_labelmap(path, reference=ref, resample=True)


def test_single_slice_prompt_resamples_into_volume(tmp_path):
    image = make_volume(shape=(6, 5, 6))
    one = Volume(np.zeros((1, 5, 6), np.uint8), image.spacing, image.origin, image.direction)
    one.array[0, 1:4, 2:5] = 1
    # Put the single slice where image slice 3 is.
    one.origin = image.to_sitk().TransformIndexToPhysicalPoint((0, 0, 3))
    got = read_labelmap(write_volume(one, tmp_path / "slice.nrrd"), reference=image, resample=True)
    expected = np.zeros(image.shape, np.uint8)
    expected[3] = one.array[0]
    np.testing.assert_array_equal(got.array, expected)


def test_float_labelmap(tmp_path):
    ref = make_volume(direction=IDENTITY)
    ok = Volume(np.where(ref.array > 0, 2.0, 0.0).astype(np.float32), ref.spacing, ref.origin, ref.direction)
    got = read_labelmap(write_volume(ok, tmp_path / "ok.nii.gz"))
    assert got.array.dtype.kind in "iu" and set(np.unique(got.array)) == {0, 2}
    bad = Volume(np.full(ref.shape, 0.5, np.float32), ref.spacing, ref.origin, ref.direction)
    with pytest.raises(InputError, match="bad.nii.gz holds the values 0.5, not whole numbers"):
        read_labelmap(write_volume(bad, tmp_path / "bad.nii.gz"))


def test_multilayer_seg_nrrd_is_refused(tmp_path):
    # What Slicer writes for overlapping segments: a leading "list" axis of 2 layers.
    header = (
        "NRRD0004\ntype: uint8\ndimension: 4\nspace: left-posterior-superior\nsizes: 2 6 5 4\n"
        "space directions: none (0.7,0,0) (0,0.9,0) (0,0,2.5)\nkinds: list domain domain domain\n"
        "encoding: raw\nspace origin: (0,0,0)\nSegment0_Layer:=0\nSegment1_Layer:=1\n\n"
    )
    path = tmp_path / "overlap.seg.nrrd"
    path.write_bytes(header.encode() + bytes(2 * 6 * 5 * 4))
    with pytest.raises(InputError, match="2 overlapping segment layers; export a label map.* to keep the overlaps, save"):
        read_labelmap(path)


# ----------------------------------------------------------------------------- bad images


def test_2d_image(tmp_path):
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 16), np.int16)), str(path))
    with pytest.raises(InputError, match=r"image.nii.gz is 2D \(16 x 12\); PAMSegment needs a 3D volume"):
        read_volume(path)


def test_single_slice_3d_image(tmp_path):
    path = write_volume(make_volume(shape=(1, 5, 6)), tmp_path / "one.nrrd")
    with pytest.raises(InputError, match="single slice"):
        read_volume(path)


def test_4d_image(tmp_path):
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    path = tmp_path / "time.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    with pytest.raises(InputError, match=r"time.nii.gz is 4D \(5 x 4 x 3 x 2\)"):
        read_volume(path)
    # A single time point is simply a 3D volume.
    one = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.JoinSeries(frames[:1]), str(one))
    assert read_volume(one).shape == (3, 4, 5)


def test_multicomponent_image(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_volume(path)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_nan_voxels(tmp_path, ext):
    vol = make_volume(dtype=np.float32)
    vol.array[0, 0, 0], vol.array[1, 1, 1] = np.nan, np.inf
    with pytest.raises(InputError, match="contains 2 NaN/inf voxels"):
        read_volume(write_volume(vol, tmp_path / f"nan{ext}"))


def test_nifti_reader_zeroes_nan_voxels(tmp_path):
    # ITK's NIfTI library replaces non-finite floats by 0 while reading, so there is nothing
    # left to refuse; pinned here so a change in that behaviour is noticed.
    vol = make_volume(dtype=np.float32)
    vol.array[0, 0, 0] = np.nan
    assert read_volume(write_volume(vol, tmp_path / "nan.nii.gz")).array[0, 0, 0] == 0.0


def test_a_folder_without_dicom_is_one_message_without_itk_warnings(tmp_path, capfd):
    # ITK prints "No Series were found" on the process's stderr (C++, not Python's sys.stderr)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image")
    capfd.readouterr()
    with pytest.raises(InputError, match="without a DICOM series"):
        read_volume(folder)
    assert capfd.readouterr().err == ""


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputError, match="does not exist; check the path"):
        read_volume(tmp_path / "nope.nii.gz")
    garbage = tmp_path / "x.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(InputError, match=r"cannot read .*x.nii.gz as an image") as info:
        read_volume(garbage)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without a DICOM series"):
        read_volume(tmp_path / "empty")
    with pytest.raises(InputError, match="DICOM folders only"):
        read_volume(write_volume(make_volume(), tmp_path / "v.mha"), series_uid="1.2.3")


def test_errors_are_value_errors_with_one_line():
    with pytest.raises(ValueError) as info:
        read_volume(os.path.join("no", "such", "file.nrrd"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [40, 100])
def test_a_nifti_cut_inside_its_header_is_refused(tmp_path, keep):
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(img, str(tmp_path / "whole.nii.gz"))
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "whole.nii.gz").read_bytes()[:keep])
    with pytest.raises(InputError, match="cut.nii.gz is truncated inside its header"):
        read_volume(tmp_path / "cut.nii.gz")
    raw = tmp_path / "cut.nii"
    sitk.WriteImage(img, str(tmp_path / "whole.nii"))
    raw.write_bytes((tmp_path / "whole.nii").read_bytes()[:keep])
    with pytest.raises(InputError, match=r"cut.nii is truncated inside its header \(\d+ bytes\)"):
        read_volume(raw)


# ----------------------------------------------------------------------------- files written together


def test_replace_together_moves_all_in_or_names_what_was_not(tmp_path, monkeypatch):
    """label-images and label-cells write their outputs with ``replace_together``: temporaries beside
    the outputs, then moved in in order; a failure is one InputError naming the output (never the
    hidden temporary), and no temporary stays behind."""
    from PAMSegmentLib.volumes import replace_together

    a, b, c = (tmp_path / n for n in ("a.csv", "b.txt", "c.txt"))
    for p in (a, b, c):
        p.write_text("old")
    said = []

    def text(value):
        return lambda tmp: tmp.write_text(value)

    replace_together([(a, ".csv", text("new a")), (b, ".txt", text("new b"))], after=lambda: said.append("done"))
    assert (a.read_text(), b.read_text(), said) == ("new a", "new b", ["done"])

    def oserror(tmp):
        raise PermissionError(13, "Permission denied")

    def input_error(tmp):
        raise InputError(f"cannot write {tmp} (disk full); check the folder is writable")

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    for write, message in ((oserror, f"cannot write {b} (Permission denied); nothing was replaced; check that the "
                                     f"folder {tmp_path} exists and can be written"),
                           (disk_full, f"cannot write {b} (no space left on the disk); nothing was replaced"),
                           (input_error, f"cannot write {b} (disk full); check the folder is writable")):
        with pytest.raises(InputError) as err:
            replace_together([(a, ".csv", text("newer a")), (b, ".txt", write)])
        assert str(err.value) == message
        assert a.read_text() == "new a"  # nothing was moved in
    replace = os.replace

    def refuse_c(src, dst):
        if Path(dst) == c:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_c)
    # a move that fails puts back the files moved in before it (they mixed two runs before: "3", "3", "old")
    with pytest.raises(InputError, match=r"c.txt \(Permission denied\): nothing was replaced \(a.csv, b.txt put back "
                                         r"as they were\); fix that and run again"):
        replace_together([(a, ".csv", text("3")), (b, ".txt", text("3")), (c, ".txt", text("3"))])
    assert (a.read_text(), b.read_text(), c.read_text()) == ("new a", "new b", "old")
    d = tmp_path / "d.txt"  # a new output moved in before the failure is removed again
    with pytest.raises(InputError, match=r"c.txt \(Permission denied\): nothing was replaced \(d.txt put back as it "
                                         r"was\)"):
        replace_together([(d, ".txt", text("new d")), (c, ".txt", text("3"))])
    assert not d.exists()

    def refuse_c_and_putting_back_a(src, dst):
        if Path(dst) == c or (Path(dst) == a and ".old" in Path(src).name):
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_c_and_putting_back_a)
    with pytest.raises(InputError, match=r"c.txt \(Permission denied\): replaced: a.csv, which could not be put back "
                                         r"\(the earlier files are kept beside them as "
                                         r"(\.pamsegment-\w+-0\.old\.csv)\); not replaced: this one \(the outputs now "
                                         r"mix two runs\)") as info:
        replace_together([(a, ".csv", text("4")), (b, ".txt", text("4")), (c, ".txt", text("4"))])
    assert (a.read_text(), b.read_text(), c.read_text()) == ("4", "new b", "old")
    # the earlier a.csv, which could not go back, is kept where the message says (it was deleted before)
    aside = tmp_path / re.search(r"kept beside them as (\S+)\)", str(info.value)).group(1)
    assert aside.read_text() == "new a"
    aside.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.txt", "c.txt"]  # no temporaries left


def test_an_output_link_into_a_missing_folder_is_refused_before_any_work(tmp_path):
    from PAMSegmentLib.volumes import check_link_target

    link = tmp_path / "labels.csv"
    link.symlink_to(tmp_path / "gone" / "labels.csv")
    with pytest.raises(InputError, match=r"labels.csv is a symbolic link to .*gone/labels.csv, whose folder does not "
                                         r"exist; remove the link or choose another output"):
        check_link_target(link)
    (tmp_path / "gone").mkdir()
    check_link_target(link)  # a link to a file not made yet, in a folder that takes files: fine
    check_link_target(tmp_path / "plain.csv")  # not a link: nothing to check here


def test_a_path_that_is_not_utf8_is_refused_not_a_crash(tmp_path):
    """ITK's C++ aborted the whole process (std::logic_error, exit 134) on a name holding bytes that
    are not UTF-8 (a Latin-1 folder of an old archive). Reading and writing refuse it in one line."""
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/M\xfcller")
    os.makedirs(folder)
    volume = make_volume()
    message = r"holds bytes that are not UTF-8 text, which ITK cannot open; rename the file or folder"
    with pytest.raises(InputError, match=message) as err:
        write_volume(volume, os.path.join(folder, "ct.nii.gz"))
    assert "M\\xfcller" in str(err.value)  # shown as the escaped byte
    assert os.listdir(folder) == []
    plain = tmp_path / "ct.nii.gz"
    write_volume(volume, plain)
    os.replace(plain, os.path.join(folder, "ct.nii.gz"))
    with pytest.raises(InputError, match=message):
        read_volume(os.path.join(folder, "ct.nii.gz"))
    with pytest.raises(InputError, match=message):
        read_volume(folder)  # a folder: read as a DICOM series


def test_make_writable_folder_makes_it_or_says_why_not(tmp_path):
    from PAMSegmentLib.volumes import make_writable_folder

    make_writable_folder(tmp_path / "a" / "b", "the results")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # no probe left
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"^cannot make folder .*file/x for the results \(Not a directory\); "
                                         r"choose another folder$"):
        make_writable_folder(tmp_path / "file" / "x", "the results")


def test_a_dicom_series_without_a_series_uid_is_named_as_such(tmp_path):
    """GDCM groups files without a SeriesInstanceUID (TotalSegmentator's sample series) under an
    empty ID: the messages said "DICOM series  in ..." and "available series: " with nothing after."""
    vol = make_volume(shape=(8, 5, 6), spacing=(2.0, 0.9, 0.7))
    folder = tmp_path / "nouid"
    write_dicom_series(folder, vol, "")
    assert read_volume(folder).shape == (8, 5, 6)
    with pytest.raises(InputError, match=r"^series 1\.2\.3 is not in .*nouid; available series: \(files without a "
                                         r"SeriesInstanceUID\) \(choose it with --series=\)$"):
        read_volume(folder, series_uid="1.2.3")
    (folder / "slice003.dcm").unlink()
    with pytest.raises(InputError, match=r"^DICOM series \(files without a SeriesInstanceUID\) in .*nouid is not "
                                         r"evenly spaced"):
        read_volume(folder)


def test_a_prompt_off_the_grid_is_told_to_resample_unless_it_misses_the_image_entirely(tmp_path):
    """--resample-prompt was suggested even for a label map that does not overlap the image at all
    (a prompt drawn on another scan), which resampling turns into an empty prompt."""
    image = make_volume(shape=(6, 8, 10))
    shifted = Volume(np.ones((6, 8, 10), np.uint8), image.spacing, image.origin, image.direction)
    near, far = tmp_path / "near.nii.gz", tmp_path / "far.nii.gz"
    write_volume(Volume(shifted.array, shifted.spacing, (-12.0, 30.25, 7.125), shifted.direction), near)  # 0.5 mm off
    write_volume(Volume(shifted.array, shifted.spacing, (500.0, 30.25, 7.125), shifted.direction), far)
    with pytest.raises(InputError, match=r"near.nii.gz is not on the image grid: origin differs .*; use "
                                         r"resample=True to resample it onto the image grid$"):
        read_labelmap(near, reference=image)
    with pytest.raises(InputError, match=r"far.nii.gz is not on the image grid: origin differs .*; it does not even "
                                         r"overlap the image in space \(drawn on another scan\?\): draw the prompt on "
                                         r"this image$"):
        read_labelmap(far, reference=image)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
@pytest.mark.parametrize("cut", ["empty", "half", "last byte", "in the header"])
def test_a_write_cut_short_replaces_nothing(tmp_path, monkeypatch, ext, cut):
    """ITK's NIfTI, NRRD and PNG writers do not fail on a full disk: they leave an empty or cut
    file, which was then moved over the previous output with exit 0 ("wrote ...")."""
    from PAMSegmentLib import volumes

    vol = make_volume(shape=(6, 20, 24), dtype=np.uint8)
    vol = Volume((vol.array % 3).astype(np.uint8), vol.spacing, vol.origin, vol.direction)
    out = tmp_path / f"result{ext}"
    write_labelmap(vol.array, vol, out)
    before = out.read_bytes()
    real = sitk.WriteImage

    def write_cut_short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        header_end = data.find(b"ElementDataFile = LOCAL") + 10 if ext == ".mha" else min(200, len(data) // 3)
        Path(path).write_bytes({"empty": b"", "half": data[: len(data) // 2], "last byte": data[:-1],
                                "in the header": data[:header_end]}[cut])

    monkeypatch.setattr(volumes.sitk, "WriteImage", write_cut_short)
    changed = Volume((vol.array + 1).astype(np.uint8), vol.spacing, vol.origin, vol.direction)
    with pytest.raises(InputError, match=rf"^cannot write {re.escape(str(out))} \(the file written is incomplete: is "
                                         r"the disk full\?\); nothing was replaced$"):
        write_labelmap(changed.array, vol, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left
    monkeypatch.setattr(volumes.sitk, "WriteImage", real)
    write_labelmap(changed.array, vol, out)  # a whole write passes the check
    np.testing.assert_array_equal(read_labelmap(out).array, changed.array)


@pytest.mark.parametrize("ext", [".png", ".nii.gz", ".mha"])
def test_a_2d_mask_cut_short_replaces_nothing(tmp_path, monkeypatch, ext):
    """label-images' and label-cells' masks: a full disk left every mask empty, with exit 0."""
    from PAMSegmentLib import volumes
    from PAMSegmentLib.volumes import write_labelmap_2d

    mask = (np.arange(30 * 40).reshape(30, 40) % 5).astype(np.uint8)
    reference = sitk.Image(40, 30, sitk.sitkUInt8)
    out = tmp_path / f"mask{ext}"
    write_labelmap_2d(mask, reference, out)
    before = out.read_bytes()
    real = sitk.WriteImage

    def write_empty(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        Path(path).write_bytes(b"")

    monkeypatch.setattr(volumes.sitk, "WriteImage", write_empty)
    with pytest.raises(InputError, match=r"the file written is incomplete: is the disk full\?\); nothing was replaced$"):
        write_labelmap_2d(mask + 1, reference, out)
    assert out.read_bytes() == before


def test_name_length_is_counted_as_the_file_system_counts_it(monkeypatch):
    """POSIX file systems count a name's bytes (255), NTFS its UTF-16 units (255): 100 CJK
    characters are 300 UTF-8 bytes, too long on Linux, legal on Windows."""
    from PAMSegmentLib.volumes import check_name_length

    cjk = "\u8111" * 100 + ".nii.gz"
    check_name_length(Path("/data") / ("a" * 255))
    with pytest.raises(InputError, match=r"^the name a{40}\.\.\. in /data is 256 bytes long; file systems take at "
                                         r"most 255: choose a shorter name$"):  # the folder, not the name again
        check_name_length(Path("/data") / ("a" * 256))
    with pytest.raises(InputError, match=r"is 270 bytes long as aaaaaaaaaaaa\.\.\.\.keyframes\.json, the name of the "
                                         r"record; file systems"):
        check_name_length(Path("/data") / ("a" * 255), suffix=".keyframes.json", whose="the record")
    with pytest.raises(InputError, match=r"is 307 bytes long"):
        check_name_length(Path("/data") / cjk)
    from types import SimpleNamespace

    from PAMSegmentLib import volumes

    monkeypatch.setattr(volumes, "os", SimpleNamespace(name="nt", fsencode=os.fsencode))  # as on Windows
    check_name_length(Path("/data") / cjk)  # 107 UTF-16 units
    with pytest.raises(InputError, match=r"is 256 characters long"):
        check_name_length(Path("/data") / ("\u8111" * 256))


def test_a_native_writers_own_complaint_on_a_full_disk_is_not_printed(tmp_path, monkeypatch, capfd):
    """NIfTI's C library printed "** ERROR: NWAD: wrote only ..." on descriptor 2 before the one
    error line; what a writer prints there during the write is now discarded (the check after it
    says what went wrong), and descriptor 2 works again afterwards."""
    from PAMSegmentLib import volumes

    vol = make_volume(shape=(4, 6, 8), dtype=np.uint8)
    out = tmp_path / "result.nii.gz"
    real = sitk.WriteImage

    def write_and_complain(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        os.write(2, b"** ERROR: NWAD: wrote only 3744 of 163840 bytes\n")
        Path(path).write_bytes(b"")

    monkeypatch.setattr(volumes.sitk, "WriteImage", write_and_complain)
    with pytest.raises(InputError, match=r"incomplete: is the disk full"):
        write_labelmap(vol.array, vol, out)
    os.write(2, b"descriptor 2 is back\n")
    err = capfd.readouterr().err
    assert "NWAD" not in err and "descriptor 2 is back" in err


def _with_scaling(path: Path, slope: float, inter: float) -> None:
    """Set a NIfTI-1 file's scl_slope and scl_inter (header bytes 112-119, little endian)."""
    import gzip
    import struct

    data = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack_from("<i", data, 0)[0] == 348
    struct.pack_into("<2f", data, 112, slope, inter)
    path.write_bytes(gzip.compress(bytes(data)))


def test_a_label_map_whose_nifti_header_scales_its_values_is_refused_or_noted(tmp_path):
    """A label map with scl_inter 10 read every voxel, background included, as a label (10 for 0)
    and was refused as "a 3D mask"; a slope of 0.5 made fractions, refused as a float mask to
    round. Now the header's scaling is named, for a slope other than 1 too."""
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[1, 2:4, 2:4] = 3
    path = tmp_path / "prompt.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    assert read_labelmap(path).array.max() == 3
    _with_scaling(path, 1.0, 10.0)
    with pytest.raises(InputError, match=re.escape(
            "prompt.nii.gz: its NIfTI header scales the stored values (scl_slope 1, scl_inter 10), so every label v "
            "reads as 1 x v + 10 and the background 0 as 10: save the label map without scaling (scl_slope 1, "
            "scl_inter 0)")):
        read_labelmap(path)
    for slope in (2.0, 0.5, -1.0):
        _with_scaling(path, slope, 0.0)
        with pytest.raises(InputError, match=re.escape(
                f"prompt.nii.gz: its NIfTI header scales the stored values (scl_slope {slope:g}, scl_inter 0), so "
                f"every label v reads as {slope:g} x v + 0: save the label map without scaling")):
            read_labelmap(path)
    _with_scaling(path, 0.0, 10.0)  # ITK reads a slope of 0 as 1 and still adds the intercept
    with pytest.raises(InputError, match=re.escape("(scl_slope 1, scl_inter 10)")):
        read_labelmap(path)
    _with_scaling(path, 0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(np.unique(read_labelmap(path).array).tolist()) == [0, 3]


@pytest.mark.parametrize("field, index, delta, expected", [
    # direction cosines: within 1e-4 absolute
    ("direction", 4, 5e-5, []),
    ("direction", 4, 2e-4, ["direction"]),
    ("direction", 5, -1e-3, ["direction"]),
    # spacing: within 1e-4 relative; slice spacing 2.5 mm -> 0.25 um allowed
    ("spacing", 0, 1e-4, []),            # 4e-5 relative
    ("spacing", 0, 1e-3, ["spacing"]),   # 4e-4 relative
    # origin: within 1e-4 relative to max(1 mm, |coordinate|); x = -12.5 mm -> 1.25 um allowed
    ("origin", 0, 5e-4, []),
    ("origin", 0, 5e-3, ["origin"]),
    # ... and near 0 mm the 1 mm floor applies: z = 0.25 mm -> 0.1 um allowed, not 0.025 um
    ("origin", 2, 5e-5, []),
    ("origin", 2, 2e-4, ["origin"]),
])
def test_same_grid_tolerances_at_their_boundaries(field, index, delta, expected):
    """Pins same_grid's tolerances (tol = 1e-4): direction cosines 1e-4 absolute, spacing 1e-4
    relative, origin 1e-4 relative to max(1 mm, |coordinate|). A change just inside each is the
    same grid; one a few times outside is named. The existing grid tests change a rotation to the
    identity, far outside any tolerance: a direction tolerance 100x looser (0.01, about 0.57
    degrees) took a prompt on a slightly rotated grid as on the image grid, placed without
    resampling, up to mm off at the edge of the field of view."""
    ref = Volume(np.zeros((4, 5, 6), np.int16), (2.5, 0.9, 0.7), (-12.5, 30.25, 0.25), ROT_X_30)
    values = list(getattr(ref, field))
    values[index] += delta
    other = Volume(ref.array.copy(), ref.spacing, ref.origin, ref.direction)
    setattr(other, field, tuple(values))
    assert same_grid(other, ref) == expected
    assert same_grid(ref, other) == expected


@pytest.mark.parametrize("which", [0, 2, 4])  # the first, a middle and the last slice's file
def test_a_cut_file_of_a_dicom_series_is_named_not_left_out(tmp_path, which):
    """A review: GDCM leaves out a file it cannot parse without a word: a cut end slice gave a
    series one slice shorter (exit 0), a cut middle one "not evenly spaced ... missing files?"."""
    vol = make_volume(shape=(5, 5, 6))
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.9")
    files = sorted((tmp_path / "dcm").iterdir())
    data = files[which].read_bytes()
    files[which].write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^1 DICOM file in .*dcm cannot be read \(truncated or damaged: "
                                         rf"{files[which].name}\), so the series would lack it; copy the series "
                                         r"again$"):
        read_volume(tmp_path / "dcm")


def _dicom_object(path: Path, sop_class: str) -> None:
    """A DICOM file holding only its meta header (group 0002: the storage class), as a structure
    set, a dose report or a presentation state beside the slices looks to an image reader."""
    import struct

    def element(elem: int, vr: bytes, value: bytes) -> bytes:
        value += b"\x00" * (len(value) % 2)
        return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value

    body = element(0x0002, b"UI", sop_class.encode()) + element(0x0003, b"UI", b"1.2.3.4.5.6.7")
    body += element(0x0010, b"UI", b"1.2.840.10008.1.2.1")
    path.write_bytes(b"\x00" * 128 + b"DICM" + struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body))
                     + body + b"\x08\x00\x16\x00UI\x1e\x00")


def test_non_image_dicom_objects_beside_a_series_are_not_called_damaged(tmp_path):
    """A review of the damaged-file check: an RT structure set, a dose report (SR) or a presentation
    state beside the slices, which ITK cannot read either, made the series refused as "truncated or
    damaged". Only files whose meta header names an image storage class are checked."""
    vol = make_volume(shape=(5, 5, 6))
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.10")
    for name, sop in (("RS.dcm", "1.2.840.10008.5.1.4.1.1.481.3"), ("SR.dcm", "1.2.840.10008.5.1.4.1.1.88.67"),
                      ("PR.dcm", "1.2.840.10008.5.1.4.1.1.11.1")):
        _dicom_object(tmp_path / "dcm" / name, sop)
    _dicom_object(tmp_path / "dcm" / "MRS.dcm", "1.2.840.10008.5.1.4.1.1.4.2")  # spectroscopy: no image either
    assert read_volume(tmp_path / "dcm").shape == (5, 5, 6)
    # a second review: a file whose meta header cannot be read (empty, cut inside it) passed as "not an image"
    (tmp_path / "dcm" / "IM9.dcm").write_bytes(b"")
    with pytest.raises(InputError, match=r"1 DICOM file in .* cannot be read \(truncated or damaged: IM9.dcm\)"):
        read_volume(tmp_path / "dcm")
    (tmp_path / "dcm" / "IM9.dcm").write_bytes(b"\x00" * 128 + b"DICM\x02\x00")  # cut inside its meta header
    with pytest.raises(InputError, match=r"\(truncated or damaged: IM9.dcm\)"):
        read_volume(tmp_path / "dcm")
    (tmp_path / "dcm" / "IM9.dcm").unlink()
    _dicom_object(tmp_path / "dcm" / "CT.cut", "1.2.840.10008.5.1.4.1.1.2")  # a CT slice cut after its header
    with pytest.raises(InputError, match=r"1 DICOM file in .* cannot be read \(truncated or damaged: CT.cut\)"):
        read_volume(tmp_path / "dcm")


def test_replace_together_keeps_an_earlier_file_it_cannot_link(tmp_path, monkeypatch):
    """A third review: where an earlier file could be neither hard-linked nor copied aside, the
    put-back deleted it while saying it was "put back as it was". Without hard links it is now
    renamed aside (and renamed back); where even that fails, nothing is moved in."""
    from PAMSegmentLib.volumes import replace_together

    a, c = tmp_path / "a.csv", tmp_path / "c.txt"
    a.write_text("old a")
    c.write_text("old c")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    replace = os.replace

    def refuse_c(src, dst):
        if Path(dst) == c and ".tmp" in Path(src).name:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_c)
    with pytest.raises(InputError, match=r"c.txt \(Permission denied\): nothing was replaced \(a.csv put back as it "
                                         r"was\)"):
        replace_together([(a, ".csv", lambda tmp: tmp.write_text("new a")), (c, ".txt", lambda t: t.write_text("x"))])
    assert (a.read_text(), c.read_text()) == ("old a", "old c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "c.txt"]

    def refuse_aside(src, dst):
        if ".old" in Path(dst).name:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_aside)
    with pytest.raises(InputError, match=r"a.csv \(Permission denied\): nothing was replaced; fix that"):
        replace_together([(a, ".csv", lambda tmp: tmp.write_text("new a"))])
    assert a.read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "c.txt"]


def test_a_cut_file_of_another_series_does_not_refuse_the_one_read(tmp_path):
    """A carried review finding: a damaged file refused the whole folder, even when the series read
    (chosen with --series, or the largest) was whole. A cut file whose SeriesInstanceUID can still
    be read is refused only when it belongs to the series read."""
    whole, other = "1.2.826.0.1.3680043.2.1125.7.21", "1.2.826.0.1.3680043.2.1125.7.22"
    write_dicom_series(tmp_path / "dcm", make_volume(shape=(5, 5, 6)), whole, prefix="a")
    write_dicom_series(tmp_path / "dcm", make_volume(shape=(3, 5, 6)), other, prefix="b")
    cut = tmp_path / "dcm" / "b001.dcm"
    data = cut.read_bytes()
    cut.write_bytes(data[:-30])  # its header (and UID) kept, half its pixel data (60 bytes) cut
    from PAMSegmentLib.volumes import _raw_series_uid

    assert _raw_series_uid(cut) == other
    assert read_volume(tmp_path / "dcm", series_uid=whole).shape == (5, 5, 6)
    with pytest.warns(UserWarning, match="using 1.2.826.0.1.3680043.2.1125.7.21 .5 files., the largest"):
        assert read_volume(tmp_path / "dcm").shape == (5, 5, 6)
    with pytest.raises(InputError, match=r"1 DICOM file in .* cannot be read \(truncated or damaged: b001.dcm\)"):
        read_volume(tmp_path / "dcm", series_uid=other)
    cut.write_bytes(data[:100])  # cut before its UID: which series it was is unknown, so it is refused
    with pytest.raises(InputError, match=r"\(truncated or damaged: b001.dcm\)"):
        read_volume(tmp_path / "dcm", series_uid=whole)


@pytest.mark.parametrize("direction", [ROT_X_30, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)])
def test_a_dicom_series_grid_from_two_headers_is_the_full_reads(tmp_path, direction):
    """batch's pre-flight places a DICOM folder from its first two files' headers: the grid the
    full read gives (a rotated and a flipped series), and the prompt's grid compared with it."""
    from PAMSegmentLib.volumes import _grid_from_dicom_headers, check_grids_from_headers, same_grid

    vol = make_volume(shape=(6, 5, 7), direction=direction)
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.31")
    header = _grid_from_dicom_headers(tmp_path / "dcm")
    full = read_volume(tmp_path / "dcm")
    assert header.shape == full.shape == (6, 5, 7)
    assert same_grid(header, full, tol=1e-4) == []
    on_grid = Volume(np.zeros(full.shape, np.uint8), full.spacing, full.origin, full.direction)
    on_grid.array[3, 2, 2] = 1
    write_volume(on_grid, tmp_path / "prompt.nii.gz")
    assert check_grids_from_headers(tmp_path / "dcm", tmp_path / "prompt.nii.gz", dicom_series=None).shape == (6, 5, 7)
    assert check_grids_from_headers(tmp_path / "dcm", tmp_path / "prompt.nii.gz") is None  # not asked: not scanned
    shifted = Volume(on_grid.array, full.spacing, tuple(v + 2.0 for v in full.origin), full.direction)
    write_volume(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(InputError, match="shifted.nii.gz is not on the image grid"):
        check_grids_from_headers(tmp_path / "dcm", tmp_path / "shifted.nii.gz", dicom_series=None)
    # a series that does not say its grid plainly in two files is left to the full read
    one = tmp_path / "one"
    write_dicom_series(one, make_volume(shape=(1, 5, 7), direction=direction), "1.2.826.0.1.3680043.2.1125.7.32")
    assert _grid_from_dicom_headers(one) is None and _grid_from_dicom_headers(tmp_path / "prompt.nii.gz") is None
    assert _grid_from_dicom_headers(tmp_path / "dcm", "1.2.3.4") is None


def _round_positions(folder: Path, decimals: int = 2) -> None:
    """Rewrite each DICOM file's ImagePositionPatient rounded, as many scanners store it."""
    for f in sorted(folder.iterdir()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        image = reader.Execute()
        position = [float(v) for v in image.GetMetaData("0020|0032").split("\\")]
        image.SetMetaData("0020|0032", "\\".join(f"{v:.{decimals}f}" for v in position))
        write_dicom_file(image, f)


def write_dicom_file(image: sitk.Image, path: Path) -> None:
    """``image`` as one DICOM file with the UIDs its metadata gives, the process's locale kept."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    saved = locale.setlocale(locale.LC_ALL)
    try:
        writer.Execute(image)
    finally:  # GDCM's writer leaves the C locale set (as in write_dicom_series)
        locale.setlocale(locale.LC_ALL, saved)


def test_the_dicom_pre_flight_leaves_the_spacing_across_and_localizers_to_the_full_read(tmp_path):
    """A review of the DICOM pre-flight: two headers gave a spacing across of 0.63 where the full
    read (ITK's mean step) gives 0.6253 for 0.625 mm slices stored to 2 decimals, and counted a
    localizer the full read leaves out: valid batches were refused before any work. Both are left
    to the full read; a prompt with more slices than files, or another plane's grid, is still refused."""
    from PAMSegmentLib.volumes import check_grids_from_headers

    vol = make_volume(shape=(20, 8, 9), spacing=(0.625, 0.7, 0.7), direction=IDENTITY)
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.71")
    _round_positions(tmp_path / "dcm")
    full = read_volume(tmp_path / "dcm")
    write_labelmap(np.zeros(full.shape, np.uint8), full, tmp_path / "on_grid.nrrd")
    assert check_grids_from_headers(tmp_path / "dcm", tmp_path / "on_grid.nrrd", dicom_series=None) is not None
    # a localizer among the files (the full read leaves it out): the prompt on the 20 slices passes
    localizer = Volume(np.zeros((1, 8, 9), np.int16), (0.625, 0.7, 0.7), (-12.5, 30.25, 10.0),
                       (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0))
    write_dicom_series(tmp_path / "dcm", localizer, "1.2.826.0.1.3680043.2.1125.7.71", prefix="loc",
                       instance_prefix="9")
    assert check_grids_from_headers(tmp_path / "dcm", tmp_path / "on_grid.nrrd", dicom_series=None) is not None
    write_volume(Volume(np.zeros((24, 8, 9), np.uint8), full.spacing, full.origin, full.direction),
                 tmp_path / "more.nrrd")
    with pytest.raises(InputError, match="more.nrrd is not on the image grid: size differs"):
        check_grids_from_headers(tmp_path / "dcm", tmp_path / "more.nrrd", dicom_series=None)


@pytest.mark.parametrize("undefined", [False, True])
def test_a_cut_file_referring_to_another_series_is_still_the_series_own(tmp_path, undefined):
    """A review of the damaged-file check: the SeriesInstanceUID was the first one in the raw bytes,
    which may sit in a sequence referring to another series (Related Series, 0008,1250): a cut
    slice of the series read was skipped as another series', and the series read one slice short
    (exit 0). Only the top-level element counts (sequences of defined or undefined length skipped)."""
    import struct

    from PAMSegmentLib.volumes import _raw_series_uid

    uid, other = "1.2.826.0.1.3680043.2.1125.7.81", "1.2.826.0.1.3680043.2.1125.7.82"
    write_dicom_series(tmp_path / "dcm", make_volume(shape=(5, 5, 6), direction=IDENTITY), uid)
    f = sorted((tmp_path / "dcm").iterdir())[-1]
    data = f.read_bytes()
    at = 144 + struct.unpack_from("<I", data, 140)[0]  # the data set (implicit VR little endian)
    while struct.unpack_from("<HH", data, at) <= (0x0008, 0x1250):
        at += 8 + struct.unpack_from("<I", data, at + 4)[0]
    value = other.encode() + b"\x00" * (len(other) % 2)
    inner = struct.pack("<HHI", 0x0020, 0x000E, len(value)) + value
    if undefined:
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        sequence = (struct.pack("<HHI", 0x0008, 0x1250, 0xFFFFFFFF) + item
                    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    else:
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        sequence = struct.pack("<HHI", 0x0008, 0x1250, len(item)) + item
    data = data[:at] + sequence + data[at:]
    f.write_bytes(data)
    assert _raw_series_uid(f) == uid and read_volume(tmp_path / "dcm").shape == (5, 5, 6)
    f.write_bytes(data[:-20])  # cut in its pixel data
    with pytest.raises(InputError, match=rf"\(truncated or damaged: {f.name}\)"):
        read_volume(tmp_path / "dcm")
