"""Session 37: what hostile-input trials (fuzzed checkpoints, files, HTTP requests, engine properties) found."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ellipsoid
from doubles import OracleModel

from PAMSegmentLib.errors import InputError
from PAMSegmentLib.propagate import propagate

SHAPE = (16, 24, 24)


def _case():
    truth = ellipsoid(SHAPE, (8, 12, 12), (5, 6, 6))
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[8][truth[8]] = 1
    return truth.astype(np.float32) * 100, prompt, truth


@pytest.mark.parametrize("options, says", [
    # a dict of two keys passed the length test, then range[0] was KeyError: 0 (a 500 from the server)
    ({"range": {"a": 1, "b": 2}}, "range must be (first, last) slice numbers, got {'a': 1, 'b': 2}"),
    ({"range": {1, 2}}, "range must be (first, last) slice numbers, got {1, 2}"),
    # a dict's keys were taken as the labels: "a label must be a whole number, got '1'"
    ({"labels": {"1": 2}}, "labels must be a list of label numbers, got {'1': 2}"),
    # a client's 309-digit number filled the message and the server's log
    ({"empty_slices": [10 ** 308]}, "empty slice 1" + "0" * 56 + "... lies outside the range 0:15"),
    ({"labels": [0.5] * 40}, "a label must be a whole number, got 0.5"),
])
def test_option_values_of_the_wrong_kind_are_one_short_message(options, says):
    image, prompt, truth = _case()
    with pytest.raises(InputError) as err:
        propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth), **options)
    assert says in str(err.value)
    assert len(str(err.value)) < 200


def test_shown_cuts_long_values_and_names_huge_numbers():
    from PAMSegmentLib.checks import shown

    assert shown([1, 2]) == "[1, 2]"
    assert shown("x" * 100) == "'" + "x" * 56 + "..."
    assert len(shown(list(range(1000)))) == 60
    assert shown(10 ** 5000) == "a number of about 5000 digits"  # repr refuses ints over 4300 digits


def _server_client(token=None):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from PAMSegmentLib.server import create_app

    image, prompt, truth = _case()
    return TestClient(create_app(lambda method: OracleModel(truth), token=token)), image, prompt


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_the_server_refuses_a_range_dict_and_a_true_false_spacing_with_a_400():
    client, image, prompt = _server_client()
    body = _npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0]))
    r = client.post("/jobs", params={"options": json.dumps({"range": {"a": 1, "b": 2}})}, content=body)
    assert r.status_code == 400 and "range must be (first, last) slice numbers" in r.json()["detail"]
    # [True, True, True] was read as 1 mm (the engine refuses True as a spacing from Python)
    r = client.post("/jobs", content=_npz(image=image, prompt=prompt, spacing=np.ones(3, bool)))
    assert r.status_code == 400 and "got true/false values" in r.json()["detail"]


def test_the_server_has_no_docs_pages_and_no_slash_redirects():
    client, _, _ = _server_client(token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    for path in ("/docs", "/redoc", "/jobs/"):  # Swagger/ReDoc load scripts from a CDN; /jobs/ was a 307
        r = client.get(path, headers=auth, follow_redirects=False)
        assert r.status_code == 404, (path, r.status_code)
    r = client.get("/openapi.json", headers=auth)
    assert r.status_code == 200 and "/jobs/{job_id}/result" in r.json()["paths"]
    assert client.get("/openapi.json").status_code == 401  # behind the token like the rest


# --- files: headers that were read wrong or explained wrong (a fuzzing trial of 203 inputs, session 37) ---

import struct  # noqa: E402
import warnings  # noqa: E402

import SimpleITK as sitk  # noqa: E402

from PAMSegmentLib.volumes import read_image_2d, read_volume  # noqa: E402


def _nii(path, array=None, spacing=(1.0, 1.0, 2.0), origin=(-90.0, -126.0, -72.0), patch=None):
    """An uncompressed NIfTI-1 written by SimpleITK, then ``patch(bytearray)`` applied to the file."""
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) if array is None else array
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    if patch is not None:
        data = bytearray(path.read_bytes())
        patch(data)
        path.write_bytes(bytes(data))
    return path


def test_the_qform_sform_note_names_the_grid_itk_used_when_only_the_axes_differ(tmp_path):
    """The note chose by origin alone: a qform whose k axis is flipped (qfac -1) against an sform of the
    same origin was named as used, while ITK (and Slicer) used the sform."""
    path = _nii(tmp_path / "q.nii", patch=lambda d: struct.pack_into("<f", d, 76, -1.0))  # pixdim[0]: qfac -1
    assert sitk.ReadImage(str(path)).GetDirection()[8] == 1.0  # k runs as the sform's (+2 mm), not the qform's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_volume(path)
    said = [str(w.message) for w in caught if "two different grids" in str(w.message)]
    assert len(said) == 1 and "PAMSegment uses the sform" in said[0] and "use the qform would" in said[0]


def test_a_nan_grid_is_refused_when_read(tmp_path):
    """An sform of NaN (no qform) was read as a NaN grid: a .nrrd result was written at origin 0 with plain
    axes, exit 0, and a .nii.gz one was told the grid is 'sheared'."""
    def nan_sform(d):
        struct.pack_into("<hh", d, 252, 0, 2)
        struct.pack_into("<4f", d, 280, float("nan"), 0.0, 0.0, 90.0)

    with pytest.raises(InputError, match=r"q.nii's NIfTI header holds NaN or infinity in its sform \(srow_x/y/z\): "
                                         r"the file has no usable position") as refused:
        read_volume(_nii(tmp_path / "q.nii", patch=nan_sform))
    assert "sheared" not in str(refused.value)
    # what a header check does not cover (NIfTI-2, other readers): the grid as ITK read it
    from pathlib import Path

    from PAMSegmentLib.volumes import _check_finite_grid

    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    image.SetOrigin((float("nan"), 0.0, 0.0))
    with pytest.raises(InputError, match=r"n.nii's header gives its origin as NaN or infinity \(in a NIfTI file: "
                                         r"its sform srow_x/y/z or its qform"):
        _check_finite_grid(Path("n.nii"), image)


def test_a_datatype_wider_than_bitpix_with_data_for_bitpix_is_refused(tmp_path):
    """The completeness check counted bitpix, ITK reads by datatype: a float32 header with bitpix 16 and
    16-bit data passed, and ITK filled the missing half with zeros (slices 2-3 all 0 here), exit 0."""
    def float32_bitpix16(d):
        struct.pack_into("<hh", d, 70, 16, 16)  # datatype FLOAT32, bitpix 16 (the data are 16-bit)

    with pytest.raises(InputError, match=r"header is inconsistent: its datatype \(16\) has 32-bit voxels but its "
                                         r"bitpix says 16"):
        read_volume(_nii(tmp_path / "b.nii", patch=float32_bitpix16))
    # a wrong bitpix beside complete data is read as ITK and nibabel read it (by the datatype)
    ok = read_volume(_nii(tmp_path / "ok.nii", patch=lambda d: struct.pack_into("<h", d, 72, 8)))
    assert np.array_equal(ok.array, np.arange(120, dtype=np.int16).reshape(4, 5, 6))


@pytest.mark.parametrize("offset", [0.0, 348.0, -100.0])
def test_a_single_file_nifti_with_its_data_inside_the_header_is_refused(tmp_path, offset):
    """vox_offset 0 in a .nii: ITK read from byte 348 (every voxel 2 places on), nibabel from byte 0."""
    path = _nii(tmp_path / "v.nii", patch=lambda d: struct.pack_into("<f", d, 108, offset))
    with pytest.raises(InputError, match=rf"puts its voxel data at byte {offset:g} \(vox_offset\), inside the header "
                                         r"\(a .nii file's data starts at byte 352 or later\)"):
        read_volume(path)


def test_a_degenerate_direction_is_named_not_a_matrix_row(tmp_path):
    path = tmp_path / "s.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(path))
    text = path.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 1 0 0 0 0 0 0 1")
    path.write_bytes(text)
    with pytest.raises(InputError) as refused:  # was: "cannot read s.mha as an image (0 0 1); is the file damaged?"
        read_volume(path)
    assert "axes (direction) are degenerate, two of them parallel or one of length zero (Bad direction, " \
           "determinant is 0)" in str(refused.value)


def test_a_file_named_as_another_format_is_told_to_be_renamed(tmp_path):
    import gzip

    nii = _nii(tmp_path / "ct.nii")
    (tmp_path / "ct2.nii").write_bytes(gzip.compress(nii.read_bytes()))  # a gzip stream named .nii
    with pytest.raises(InputError, match=r"ct2.nii is gzip-compressed but its name ends in .nii: if it is a "
                                         r"compressed NIfTI image, rename it to ct2.nii.gz"):
        read_volume(tmp_path / "ct2.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "m.mha"))
    (tmp_path / "m.mha").rename(tmp_path / "m.nrrd")
    with pytest.raises(InputError, match=r"m.nrrd is a MetaImage but its name ends in .nrrd: rename it to m.mha"):
        read_volume(tmp_path / "m.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16), 99, np.uint8)), str(tmp_path / "photo.jpg"))
    (tmp_path / "photo.jpg").rename(tmp_path / "photo.png")  # was: "is the file damaged? copy or export it again"
    with pytest.raises(InputError, match=r"photo.png is a JPEG image but its name ends in .png: rename it to "
                                         r"photo.jpg"):
        read_image_2d(tmp_path / "photo.png")


def test_a_truncated_image_is_named_before_the_prompt_is_blamed(tmp_path):
    """An image cut short (31 slices declared, 30 held) beside a 30-slice prompt: the prompt was told to
    be resampled (--resample-prompt); only a second run said the image is truncated."""
    from PAMSegmentLib.volumes import check_grids_from_headers

    image = _nii(tmp_path / "ct.nii", np.zeros((31, 5, 6), np.int16))
    image.write_bytes(image.read_bytes()[:-60])  # the last slice's 60 bytes missing
    prompt = _nii(tmp_path / "p.nii", np.zeros((30, 5, 6), np.uint8))
    with pytest.raises(InputError, match=r"ct.nii is truncated: its header needs"):
        check_grids_from_headers(image, prompt, "--resample-prompt")


def test_an_image_without_a_position_is_named_not_the_prompt(tmp_path):
    """An image whose qform and sform codes are 0 beside a placed prompt of its size: "it does not even
    overlap the image in space (drawn on another scan?)", which blamed the prompt."""
    image = _nii(tmp_path / "ct.nii", patch=lambda d: struct.pack_into("<hh", d, 252, 0, 0))
    prompt = _nii(tmp_path / "p.nii", np.zeros((4, 5, 6), np.uint8))
    from PAMSegmentLib.volumes import check_grids_from_headers

    with pytest.raises(InputError) as refused:
        check_grids_from_headers(image, prompt, "--resample-prompt")
    text = str(refused.value)
    assert "because the image, ct.nii, has no position in space in its header (NIfTI qform and sform codes 0" in text
    assert "another scan" not in text


def test_a_voxel_size_no_scan_has_is_noted(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_volume(_nii(tmp_path / "t.nii", spacing=(1.0, 1.0, 1e-9)))
        read_volume(_nii(tmp_path / "u.nii", spacing=(1.0, 1.0, 4e-6)))  # 4 nm: an electron microscope's voxel
    said = [str(w.message) for w in caught if "far outside" in str(w.message)]
    assert said == ["t.nii: its header gives a voxel size of k 1e-09 mm, far outside what a scan or microscope "
                    "image has: is the header's unit or spacing wrong? PAMSegment's 20 mm walk window and its "
                    "distances count millimetres; fix the header (e.g. in Slicer's Volumes module) if so"]


def test_label_images_says_when_a_transparent_alpha_channel_is_left_out(tmp_path, capsys):
    from PAMSegmentLib import cli

    rng = np.random.default_rng(0)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:26] = 1
    grey = (rng.integers(0, 80, (32, 40)) + 120 * mask).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "a_mask.png"))
    rgba = np.stack([grey, grey, grey, np.where(np.arange(40) < 10, 0, 255).astype(np.uint8)[None].repeat(32, 0)], -1)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "b.png"))
    assert cli.main(["label-images", str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), str(tmp_path / "b.png"),
                     "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    out = capsys.readouterr().out
    assert "note: b.png" in out and "alpha" in out  # as label-cells says it
