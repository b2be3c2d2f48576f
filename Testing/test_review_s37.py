"""Session 37: what hostile-input trials (fuzzed checkpoints, files, HTTP requests, engine properties) found."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import ellipsoid
from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
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
    ({"empty_slices": [10 ** 308]},
     "empty slice 1000000000000000000000000000...00000000000000000000000000000 lies outside the range 0:15"),
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
    assert shown("x" * 100) == "'" + "x" * 27 + "..." + "x" * 28 + "'"  # reprlib keeps both ends
    assert shown(list(range(1000))) == "[0, 1, 2, 3, 4, 5, ...]"
    assert shown({"a": [[[[1]]]]}) == "{'a': [[[...]]]}"
    assert shown(10 ** 5000) == "<a number of about 5000 digits>"  # repr refuses ints over 4300 digits


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


# --- checkpoints: a fuzzing trial of about 600 mutated files (session 37) ---

def _shipped_checkpoint():
    import torch

    from PAMSegmentLib.checkpoints import default_checkpoint_path

    return torch.load(default_checkpoint_path(), weights_only=True)


def _bomb(levels: int):
    x = [0, 0]
    for _ in range(levels):
        x = [x, x]  # one list shared: a few bytes a level in a pickle, 2 ** levels leaves unfolded
    return x


def test_a_provenance_that_unfolds_into_a_billion_values_is_cut(tmp_path):
    """30 levels of one shared two-item list (1 KB in the file) made every load copy 2**30 values:
    `pamsegment info` took 5.5 GB and 74 s before running out of memory."""
    import torch

    from PAMSegmentLib.checkpoints import PROVENANCE_ITEMS, _plain_provenance, load_checkpoint_file

    ckpt = _shipped_checkpoint()
    ckpt["provenance"] = {"name": "x" * 50000, "bomb": _bomb(30)}
    path = tmp_path / "bomb.pt"
    torch.save(ckpt, path)
    assert path.stat().st_size < 20 * 2**20
    prov = load_checkpoint_file(path).provenance

    def count(v):
        return 1 + (sum(count(x) for x in v.values()) if isinstance(v, dict) else
                    sum(count(x) for x in v) if isinstance(v, list) else 0)

    assert count(prov) <= PROVENANCE_ITEMS + 40 and len(prov["name"]) == 10000
    assert _plain_provenance({"a": [1, 2], 3: "b"}) == {"a": [1, 2], "3": "b"}  # small ones as they are


def test_header_values_in_messages_are_short_even_when_huge(tmp_path):
    import torch

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    for field, value in (("threshold", _bomb(30)), ("threshold", "x" * 5_000_000)):
        ckpt = _shipped_checkpoint()
        ckpt["inference"][field] = value
        torch.save(ckpt, tmp_path / "h.pt")
        with pytest.raises(CheckpointError, match="threshold must be a number within") as refused:
            load_model(tmp_path / "h.pt")
        assert len(str(refused.value)) < 400  # was 5 MB of text, or no end for the shared list


@pytest.mark.parametrize("value", ["19", [True, 50], 5, None])
def test_window_percentiles_of_the_wrong_kind_are_named(tmp_path, value):
    """'19' was read as (1, 9), [True, 50] was accepted, 5 / None gave "'int' object is not iterable"."""
    import torch

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    ckpt = _shipped_checkpoint()
    ckpt["preprocessing"]["window_percentiles"] = value
    ckpt["config"][7] = 1  # a key of another type beside it: named, not "sequence item 0: expected str"
    torch.save(ckpt, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"unknown network config field\(s\): 7|window_percentiles must be"):
        load_model(tmp_path / "w.pt")
    del ckpt["config"][7]
    torch.save(ckpt, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="window_percentiles must be a list of two increasing numbers"):
        load_model(tmp_path / "w.pt")


def test_window_percentiles_as_an_array_or_tensor_still_load():
    import torch

    from PAMSegmentLib.preprocess import PreprocessingParams

    for pct in (np.array([0.5, 99.5]), torch.tensor([0.5, 99.5]), (0.5, 99.5), [np.float32(0.5), 99.5]):
        assert PreprocessingParams.from_dict({"window_percentiles": pct}).window_percentiles == (0.5, 99.5)


def test_a_gzip_or_safetensors_file_is_named_as_such(tmp_path):
    import gzip

    from PAMSegmentLib.checkpoints import check_checkpoint_header, default_checkpoint_path
    from PAMSegmentLib.errors import CheckpointError

    (tmp_path / "m.pt.gz").write_bytes(gzip.compress(default_checkpoint_path().read_bytes()[:100000]))
    with pytest.raises(CheckpointError, match="it is gzip-compressed; decompress it first"):
        check_checkpoint_header(tmp_path / "m.pt.gz")
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(CheckpointError, match="it is a safetensors file"):
        check_checkpoint_header(tmp_path / "m.safetensors")


def test_a_checkpoint_that_cannot_be_read_is_one_message(tmp_path, monkeypatch):
    """As another user than root: PermissionError with a traceback and exit 1 (`info`, `propagate`)."""
    import builtins

    from PAMSegmentLib import checkpoints
    from PAMSegmentLib.errors import CheckpointError

    path = tmp_path / "noread.pt"
    path.write_bytes(checkpoints.default_checkpoint_path().read_bytes()[:4096])
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*noread.pt \(Permission denied\); check its "
                                              r"permissions"):
        checkpoints.check_checkpoint_header(path)


def test_a_file_path_given_as_the_model_says_how_to_load_it():
    image, prompt, _ = _case()
    with pytest.raises(InputError, match=r"got str \(for a checkpoint file pass PAMSegmentLib.checkpoints.load_model"):
        propagate(image, prompt, (2.0, 1.0, 1.0), "weights.pt")


class _NeverThere(OracleModel):
    """A predictor whose object-present output always says absent (weights that load but are useless)."""

    presence_by = "network"  # as PAMPredictor's (copy's and track's "presence" is their drift test)

    def __init__(self, truth):
        super().__init__(truth, presence=True)

    def predict(self, volume, guide_index, guide_mask, query_indices):
        out = super().predict(volume, guide_index, guide_mask, query_indices)
        out.presence[:] = 0.0
        return out


def test_a_result_of_drawn_slices_alone_because_the_network_saw_nothing_is_said():
    """Weights whose presence head always says absent returned only the drawn slices, exit 0, no note."""
    image, prompt, truth = _case()
    result = propagate(image, prompt, (2.0, 1.0, 1.0), _NeverThere(truth))
    assert result.slice_range == {1: (8, 8)}
    assert [k for k, _ in result.kinds_of_notes()] == ["labelmap", "nothing"]  # (a phantom of flat values)
    assert "the network found no object on any slice next to the drawn ones" in result.nothing_notes()[0]
    pytest.importorskip("fastapi")
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result

    # (a server's result says it too; the label-map note is the client's: RemoteModel.propagate)
    assert decode_result(encode_result(result)).notes() == result.nothing_notes()
    fine = propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth))
    assert fine.slice_range == {1: (3, 13)} and not [k for k, _ in fine.kinds_of_notes() if k == "nothing"]
    from PAMSegmentLib.pam_predictor import PAMPredictor

    assert PAMPredictor.presence_by == "network"
    never = _NeverThere(truth)
    never.presence_by = ""  # copy and track: their stops are the drift test's, which its own note covers
    assert [k for k, _ in propagate(image, prompt, (2.0, 1.0, 1.0), never).kinds_of_notes()] == ["labelmap"]


# --- the engine's properties (hypothesis, about 1800 generated cases; session 37) ---

def test_copy_keeps_an_object_that_touches_the_slices_edge():
    """scipy's closing erodes from outside the array: copy took the edge row off every predicted slice
    of an object touching the slice's edge, and a drawing on edge pixels only came back empty."""
    from PAMSegmentLib.baselines import get_predictor

    image = np.zeros((12, 40, 40), np.float32)
    image[:, :20, :20] = 100.0  # one object, the same on every slice, in the corner
    image += np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[6][:20, :20] = 1
    result = propagate(image, prompt, (1.0, 1.0, 1.0), get_predictor("copy"), threads=1)
    for k in range(12):  # the rows and columns along the slice's edge kept (358 of 400 a slice before)
        assert result.mask[k][0, :20].all() and result.mask[k][:20, 0].all(), k
        assert np.count_nonzero(result.mask[k]) >= 397  # the smoothing trims the object's inner corner only
    flat = np.round(image / 100) * 100  # without noise (copy's drift test ends walks from a speck of noisy tissue)
    for pixel in ((5, 5), (0, 0)):  # a drawing on one edge pixel came back alone (the walks ended at once)
        prompt = np.zeros(image.shape, np.uint8)
        prompt[6][pixel] = 1
        result = propagate(flat, prompt, (1.0, 1.0, 1.0), get_predictor("copy"), threads=1)
        assert [int(np.count_nonzero(result.mask[k])) for k in range(12)] == [1] * 12, pixel


def test_track_on_a_drawing_over_flat_zero_gives_no_runtime_warning():
    import warnings

    from PAMSegmentLib.baselines import get_predictor

    image = np.zeros((6, 40, 40), np.float32)
    image[:, 30:38, 30:38] = 6.0
    prompt = np.zeros(image.shape, np.uint8)
    prompt[3, 5:15, 5:15] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning: invalid value encountered in divide
        result = propagate(image, prompt, (1.0, 1.0, 1.0), get_predictor("track"), threads=1)
    assert result.mask[3].sum() == 100


def test_one_nan_voxel_is_one_voxel():
    image, prompt, truth = _case()
    image[0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"the image has 1 NaN/inf voxel; fix"):
        propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth))


# --- Slicer's Logic on hostile scene contents (real slicer-core nodes; session 37) ---

@pytest.fixture
def drawn_volume(request):
    request.getfixturevalue("mrml_scene")
    from conftest_mrml import make_segmentation, make_volume_node

    truth = ellipsoid((20, 30, 30), (10, 15, 15), (6, 7, 7))
    image = (truth * 100.0).astype(np.float32) + np.random.default_rng(0).normal(0, 2, truth.shape).astype(np.float32)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[10] = truth[10]
    vol = make_volume_node(image, name="ct")
    seg, ids = make_segmentation(vol, {"ball": prompt})
    return vol, seg, ids["ball"]


def test_the_prompt_line_refuses_a_read_that_would_not_fit(drawn_volume, monkeypatch):
    """describe_prompt (the panel's prompt line, on every selection or edit) exported the segment without a
    memory check: under a limit VTK's std::bad_alloc ended the whole process (exit 134), Slicer and all."""
    import PAMSegmentLib.mrml as mrml
    from PAMSegmentLib.errors import NotEnoughMemory

    vol, seg, sid = drawn_volume
    mrml.describe_prompt(vol, seg, sid)  # what is free is enough: no refusal
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 2**20)
    with pytest.raises(NotEnoughMemory, match=r'reading "ball" on "ct"'):
        mrml.describe_prompt(vol, seg, sid)
    with pytest.raises(NotEnoughMemory, match="reading the segment"):
        mrml.segment_mask(seg, sid, vol, check_memory="reading the segment")
    assert mrml.segment_mask(seg, sid, vol).sum() > 0  # the job's own reads (already checked) are not refused


def test_a_volume_without_scalars_or_with_too_few_is_named(drawn_volume):
    import vtk

    import PAMSegmentLib.mrml as mrml

    vol, seg, sid = drawn_volume
    image = vtk.vtkImageData()
    image.SetDimensions(30, 30, 20)  # an extent and no voxel values (a tensors-only image has none either)
    vol.SetAndObserveImageData(image)
    for call in (lambda: mrml.describe_prompt(vol, seg, sid), lambda: mrml.volume_array(vol)):
        with pytest.raises(InputError, match=r'volume "ct" has no voxels loaded \(its image holds no scalar values\)'):
            call()  # was: AttributeError: 'NoneType' object has no attribute 'GetDataType'
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    image.SetDimensions(30, 30, 21)  # one slice more than the voxels: "cannot reshape array of size ..."
    with pytest.raises(InputError, match=r'volume "ct" is damaged: its voxels \(18,000\) do not fill its extent '
                                         r'\(30 x 30 x 21\)'):
        mrml.volume_array(vol)


@pytest.mark.parametrize("broken, says", [
    (lambda v: v.SetOrigin(float("nan"), 30, 7.5), "has no usable position: its IJK-to-RAS matrix"),
    (lambda v: v.SetSpacing(0.8, 0.9, 0.0), "has a degenerate grid (a voxel size of 0, or two axes parallel)"),
])
def test_a_volume_with_a_broken_grid_is_named_not_the_drawing(drawn_volume, broken, says):
    """The drawing was blamed: 'none lies inside volume ...: draw it on this volume'."""
    import PAMSegmentLib.mrml as mrml

    vol, seg, sid = drawn_volume
    broken(vol)
    with pytest.raises(InputError) as refused:
        mrml.describe_prompt(vol, seg, sid)
    assert says in str(refused.value) and "draw it on this volume" not in str(refused.value)


def test_a_negative_spacing_runs_as_a_flipped_axis(mrml_scene):
    """The job failed in the worker: 'spacing must be three positive numbers, got (-2.0, 0.9, 0.8)'."""
    import PAMSegmentLib.mrml as mrml
    from conftest_mrml import make_segmentation, make_volume_node
    from PAMSegmentLib.baselines import get_predictor

    truth = ellipsoid((20, 30, 30), (10, 15, 15), (6, 7, 7))
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[10] = truth[10]
    vol = make_volume_node((truth * 100.0).astype(np.float32), spacing_ijk=(0.8, 0.9, -2.0), name="ct")
    seg, ids = make_segmentation(vol, {"ball": prompt})
    job = mrml.SegmentPropagation(vol, seg, ids["ball"], model=get_predictor("copy"), threads=1).run()
    assert job.state == "finished", job.error
    assert job.grid.spacing == (2.0, 0.9, 0.8)
    job.apply()
    written = mrml.segment_mask(seg, ids["ball"], vol)
    np.testing.assert_array_equal(written[10], prompt[10])  # the drawn slice where it was drawn
    assert written[[9, 11]].sum() > 0.8 * truth[[9, 11]].sum() and not written[0].any()


def test_nan_voxels_in_a_slicer_volume_are_refused_before_the_job_starts(drawn_volume):
    import PAMSegmentLib.mrml as mrml
    from PAMSegmentLib.baselines import get_predictor

    vol, seg, sid = drawn_volume
    import slicer

    slicer.util.arrayFromVolume(vol)[0, 0, :3] = np.nan
    slicer.util.arrayFromVolumeModified(vol)
    with pytest.raises(InputError, match=r'volume "ct" has 3 NaN/inf voxels; replace them first \(Python console'):
        mrml.SegmentPropagation(vol, seg, sid, model=get_predictor("copy"))


def test_starting_a_job_cancelled_before_it_ran_says_so(drawn_volume):
    import PAMSegmentLib.mrml as mrml
    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.errors import PAMError

    vol, seg, sid = drawn_volume
    job = mrml.SegmentPropagation(vol, seg, sid, model=get_predictor("copy"))
    job.cancel()
    with pytest.raises(PAMError, match="was cancelled before it started; make a new one"):
        job.start()


# --- batch manifests as spreadsheets and pandas save them (63 variants, session 37) ---

@pytest.fixture
def one_case(tmp_path):
    from conftest import make_ct_case

    make_ct_case(tmp_path / "data" / "c0", seed=0)
    return tmp_path / "data"


def _run_batch(manifest, out, capsys):
    from PAMSegmentLib.cli import main

    code = main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--threads", "1"])
    return code, capsys.readouterr().err


def test_a_windows_output_path_is_refused_not_written_as_one_file_name(one_case, tmp_path, capsys):
    """`res\\p01.nii.gz` (a manifest made on Windows) was written on Linux as one file named so, exit 0."""
    import os

    if os.name == "nt":
        pytest.skip("a Windows path is a path there")
    m = one_case / "m.csv"
    m.write_text("image,prompt,output\nc0/image.nii.gz,c0/prompt.nii.gz,res\\p01.nii.gz\n")
    code, err = _run_batch(m, tmp_path / "out", capsys)
    assert code == 2 and "m.csv row 2: output res\\p01.nii.gz is a Windows path; on this system write it with /" in err
    assert err.count("m.csv row 2") == 1
    assert not list(one_case.glob("res*")) and not (tmp_path / "out").exists()
    m.write_text("image,prompt\nC:\\data\\c0\\image.nii.gz,c0/prompt.nii.gz\n")
    assert "image C:\\data\\c0\\image.nii.gz is a Windows path" in _run_batch(m, tmp_path / "out", capsys)[1]
    (one_case / "c0" / "image.nii.gz").rename(one_case / "c0" / "scan\\1.nii.gz")  # a POSIX name may hold one
    m.write_text("image,prompt\nc0/scan\\1.nii.gz,c0/prompt.nii.gz\n")
    assert _run_batch(m, tmp_path / "out", capsys)[0] == 0


@pytest.mark.parametrize("data, says", [
    # cp1252 (Excel's plain "CSV (Comma delimited)"): the byte position was counted in an 8 KB chunk, no line
    ("image,prompt\n" + "c0/image.nii.gz,c0/prompt.nii.gz\n" * 300 + "c0/B\xfcro.nii.gz,c0/prompt.nii.gz\n",
     "line 302 holds a character that is not UTF-8 (byte 0xfc"),
    (b"PK\x03\x04" + bytes(60), "m.csv is a spreadsheet workbook, not a CSV file: save it as CSV"),
    ("image\tprompt\nc0/image.nii.gz\tc0/prompt.nii.gz\n", "separate them with commas, not tabs"),
    ("image,prompt\nc0/image.nii.gz,c0/prompt.nii.gz\nimage,prompt\nc0/image.nii.gz,c0/prompt.nii.gz\n",
     "m.csv row 3 repeats the header (two manifests joined?)"),
    ('image,prompt\n"c0/image.nii.gz\nx",c0/prompt.nii.gz\n', "or a cell holds a line break (Alt+Enter in Excel)"),
    ("image,prompt\n\u200bc0/image.nii.gz,c0/prompt.nii.gz\n",
     "image '\\u200bc0/image.nii.gz' holds invisible or control characters"),
])
def test_manifests_that_cannot_be_read_as_meant_say_why(one_case, tmp_path, capsys, data, says):
    m = one_case / "m.csv"
    if isinstance(data, str) and "\xfc" in data:
        m.write_bytes(data.encode("cp1252"))
    elif isinstance(data, bytes):
        m.write_bytes(data)
    else:
        m.write_text(data, encoding="utf-8")
    code, err = _run_batch(m, tmp_path / "out", capsys)
    assert code == 2 and says in err, err


@pytest.mark.parametrize("data, encoding", [
    ("image,prompt\nc0/image.nii.gz,c0/prompt.nii.gz\n", "utf-16"),  # Excel's "Unicode Text" (with its mark)
    ("sep=,\nimage,prompt\nc0/image.nii.gz,c0/prompt.nii.gz\n", "utf-8"),  # Excel's separator line
    ("image,prompt,label\nc0/image.nii.gz,c0/prompt.nii.gz,1.0\n", "utf-8"),  # pandas' float label column
])
def test_manifests_saved_by_excel_or_pandas_are_read_as_meant(one_case, tmp_path, capsys, data, encoding):
    m = one_case / "m.csv"
    m.write_bytes(data.encode(encoding))
    code, err = _run_batch(m, tmp_path / "out", capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "c0_image_pam.nii.gz").exists()


def test_a_path_with_accents_in_the_other_unicode_form_is_named(one_case, tmp_path, capsys):
    import unicodedata

    folder = one_case / unicodedata.normalize("NFC", "pätient")
    (one_case / "c0").rename(folder)
    m = one_case / "m.csv"
    decomposed = unicodedata.normalize("NFD", "pätient")  # as pasted from macOS's Finder
    m.write_text(f"image,prompt\n{decomposed}/image.nii.gz,{decomposed}/prompt.nii.gz\n", encoding="utf-8")
    code, err = _run_batch(m, tmp_path / "out", capsys)
    assert code == 2 and "does not exist as written, but" in err and "accents encoded the other way" in err


def test_a_header_is_read_once_per_file_for_many_rows(one_case, monkeypatch):
    """The pre-flight read one image's header once a row: 518 s for 100 000 rows before the first case."""
    import SimpleITK as sitk_module

    from PAMSegmentLib import volumes

    volumes._grid_from_header_of.cache_clear()
    reads = []
    real = sitk_module.ImageFileReader.ReadImageInformation
    monkeypatch.setattr(sitk_module.ImageFileReader, "ReadImageInformation",
                        lambda self: reads.append(self.GetFileName()) or real(self))
    image = one_case / "c0" / "image.nii.gz"
    grids = [volumes._grid_from_header(image) for _ in range(50)]
    assert len(reads) == 1 and all(g is grids[0] for g in grids)
    image.touch()  # changed since: read again
    import os
    import time

    os.utime(image, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    volumes._grid_from_header(image)
    assert len(reads) == 2
    # replaced by a file of the same size and time (cp -p, rsync -t, tar): read again too
    before = image.stat()
    copy = image.with_name("copy.nii.gz")
    copy.write_bytes(image.read_bytes())
    os.replace(copy, image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    volumes._grid_from_header(image)
    assert len(reads) == 3


# --- the re-review's findings (session 37) ---

def test_numbers_of_hundreds_of_digits_are_input_errors_not_overflows():
    """math.isfinite(10**400) raised OverflowError: a raw traceback from Python, and a server answered
    it as "busy" (503: it took OverflowError for a full queue)."""
    from PAMSegmentLib.checks import is_number, shown

    assert is_number(10**400, 0, math.inf) and not is_number(10**400, 0, 65535)
    assert shown([10**5000]) == "[<a number of about 5000 digits>]"  # (reprlib's own int repr refuses it)
    image, prompt, truth = _case()
    for options in ({"labels": [10**400]}, {"empty_slices": [10**400]}, {"range": [0, 10**5000]}):
        with pytest.raises(InputError):
            propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth), **options)
    client, image, prompt = _server_client()
    body = _npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0]))
    r = client.post("/jobs", params={"options": json.dumps({"labels": [10**400]})}, content=body)
    assert r.status_code == 400 and len(r.json()["detail"]) < 300
    r = client.post("/jobs", params={"options": json.dumps({"method": "x" * 20000})}, content=body)
    assert r.status_code == 400 and len(r.json()["detail"]) < 300  # (a 20 KB message before)


def test_plain_nifti_data_named_nii_gz_is_still_read(tmp_path):
    """The new rename check refused a file ITK reads (uncompressed data named .nii.gz)."""
    plain = _nii(tmp_path / "ct.nii")
    plain.rename(tmp_path / "ct.nii.gz")
    assert read_volume(tmp_path / "ct.nii.gz").shape == (4, 5, 6)


def test_a_2d_header_whose_data_file_is_missing_is_not_told_to_rename(tmp_path):
    path = tmp_path / "two.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.uint8)), str(path))
    (tmp_path / "two.raw").unlink()
    with pytest.raises(InputError) as refused:
        read_image_2d(path)
    assert "rename" not in str(refused.value)


def test_a_nifti2_file_is_named_as_one(tmp_path):
    header = bytearray(544)
    struct.pack_into("<i8s", header, 0, 540, b"n+2\x00\r\n\x1a\n")
    struct.pack_into("<hh", header, 12, 4, 16)  # int16
    struct.pack_into("<8q", header, 16, 3, 6, 5, 4, 1, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1, 1, 1, 2, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    path = tmp_path / "n2.nii"
    path.write_bytes(bytes(header) + bytes(2 * 120))
    with pytest.raises(InputError, match="it is a NIfTI-2 file, which this ITK .* does not read; save it as NIfTI-1"):
        read_volume(path)


def test_a_finished_segmentation_as_the_prompt_gets_the_whole_note_not_the_nothing_note():
    """Both fired: the network was right that the object ends there, and 'nothing' blamed the weights."""
    image, _, truth = _case()
    prompt = truth.astype(np.uint8)
    prompt[:6] = 0
    prompt[11:] = 0  # drawn on slices 6-10, every slice of the (cut) object
    cut = truth.copy()
    cut[:6] = False
    cut[11:] = False
    result = propagate(image, prompt, (2.0, 1.0, 1.0), _NeverThere(cut))
    assert [k for k, _ in result.kinds_of_notes()] == ["labelmap", "whole"]  # (a phantom of flat values)


# --- the third re-review's findings (session 37) ---

def test_window_percentiles_refusals_cover_overflow_dicts_and_numpy_bools():
    from PAMSegmentLib.preprocess import PreprocessingParams

    for pct in ([10**400, 50], {0: 1, 1: 99}, [np.bool_(True), 50], bytearray(b"\x01\x63"), np.arange(1000)):
        with pytest.raises(ValueError, match="window_percentiles must be a list of two"):
            PreprocessingParams.from_dict({"window_percentiles": pct})


def test_the_nothing_note_is_kept_for_a_label_that_is_not_a_finished_segmentation():
    """One label's 'whole' note silenced the 'nothing' note for every label."""
    image, _, truth = _case()
    prompt = np.zeros(SHAPE, np.uint8)
    for k in range(6, 11):
        prompt[k][truth[k]] = 1  # label 1: every slice of its (cut) extent
    prompt[3, 1:3, 1:3] = 2  # label 2: one slice
    cut = truth.copy()
    cut[:6] = False
    cut[11:] = False
    result = propagate(image, prompt, (2.0, 1.0, 1.0), _NeverThere(cut))
    assert sorted(k for k, _ in result.kinds_of_notes()) == ["labelmap", "nothing", "whole"]


def test_huge_negative_numbers_and_a_huge_axis_are_shown_by_their_size():
    from PAMSegmentLib.checks import shown

    assert shown(-10**5000) == "<a negative number of about 5000 digits>"
    image, prompt, truth = _case()
    with pytest.raises(InputError, match="axis must be 0, 1 or 2, got <a number of about 5000 digits>"):
        propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth), axis=10**5000)


def test_the_nifti2_advice_keeps_the_values():
    from PAMSegmentLib.volumes import _read_error

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "n2.nii"
        path.write_bytes(struct.pack("<i8s", 540, b"n+2\x00\r\n\x1a\n") + bytes(600))
        text = str(_read_error(path, "Unable to determine ImageIO reader for n2.nii"))
    assert "nib.Nifti1Image.from_image(img)" in text and "get_fdata" not in text


# --- label-cells on hostile inputs (a fuzzing trial, session 37) ---

def _disc_cells(n=6, size=96, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(20, 3, (size, size)).astype(np.float32)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        cy, cx = 12 + (k // 3) * 30, 12 + (k % 3) * 30
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        image[disc] += 100
        labels[disc] = k + 1
    return image, labels


def test_examples_covering_the_image_keep_every_label_or_are_refused():
    """With no 0 pixel left the first label was renumbered 0 (lost); covering everything ended in an
    IndexError traceback from the forest (one class learnt)."""
    from PAMSegmentLib.cells import _tidy_examples, label_cells

    full = np.ones((40, 40), np.int32)
    full[:, 13:26], full[:, 26:] = 2, 3
    assert sorted(np.unique(_tidy_examples(full)[0])) == [1, 2, 3]
    image = np.random.default_rng(0).normal(100, 5, (40, 40)).astype(np.float32)
    with pytest.raises(InputError, match="the examples .* cover the whole image: nothing is left to learn the "
                                         "background from"):
        label_cells(image, full)


def test_example_labels_of_billions_are_not_a_memory_error(tmp_path):
    from PAMSegmentLib.volumes import read_labelmap_2d

    image, labels = _disc_cells()
    big = np.where(labels > 0, labels.astype(np.uint32) * 400_000_000 + 1, 0).astype(np.uint32)
    path = tmp_path / "ex.tif"
    sitk.WriteImage(sitk.GetImageFromArray(big), str(path))
    mask = read_labelmap_2d(path)  # find_objects kept a slot per value up to 2.4e9: "not enough memory"
    assert len(np.unique(mask)) == 7


def test_found_cells_do_not_lie_on_marked_background():
    """Marks were learnt from but not held: found cells lay on 903 marked pixels in the trial."""
    from PAMSegmentLib.cells import label_cells

    image, labels = _disc_cells(n=9, size=96)
    examples = np.where(np.isin(labels, [1, 2, 3]), labels, 0)
    marks = ndimage_dilate(np.isin(labels, [7, 8, 9]))  # cell-like blobs the user says are background
    result = label_cells(image, examples, background=marks)
    assert not (result.labels[marks] > 0).any()
    assert all(result.labels[labels == k].max() > 0 for k in (4, 5, 6))  # the unmarked cells are still found


def ndimage_dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2)


def test_a_3d_example_array_and_float64_beyond_float32_are_handled():
    from PAMSegmentLib.cells import label_cells

    image, labels = _disc_cells()
    with pytest.raises(InputError, match=r"the example mask must be 2D \(rows, columns\), got shape \(1, 96, 96\)"):
        label_cells(image, labels[None])
    examples = np.where(np.isin(labels, [1, 2, 3]), labels, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # was: overflow to inf, 0 cells and numpy's warnings
        huge = label_cells(image.astype(np.float64) * 1e300, examples)
    plain = label_cells(image, examples)
    assert huge.labels.max() == plain.labels.max() >= 5


def test_a_grey_tiled_or_one_bit_tiff_is_read_as_grey(tmp_path):
    """ITK decodes tiled 8-bit and 1-bit TIFFs through libtiff's RGBA reader: a grey slide export was
    labelled as colour (3 times the work, costed as colour) and a 1-bit mask refused as a colour image."""
    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.volumes import image_pixels_2d, read_image_2d, read_labelmap_2d

    grey = (np.arange(128 * 128) % 251).astype(np.uint8).reshape(128, 128)
    tifffile.imwrite(tmp_path / "tiled.tif", grey, tile=(64, 64), photometric="minisblack")
    array, _ = read_image_2d(tmp_path / "tiled.tif", keep_colour=True)
    assert array.shape == (128, 128) and np.array_equal(array, grey)
    assert image_pixels_2d(tmp_path / "tiled.tif") == (128, 128, 1)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:40] = True
    tifffile.imwrite(tmp_path / "bits.tif", mask)  # a bool array: written 1 bit a pixel
    read = read_labelmap_2d(tmp_path / "bits.tif")
    assert read.shape == (64, 64) and np.array_equal(read > 0, mask)


# --- command-line options (482 fuzzed runs, session 37) ---

def _demo_copy(tmp_path):
    import shutil

    from PAMSegmentLib.demo import demo_data_dir

    shutil.copy(demo_data_dir() / "abdomen_ct.nii.gz", tmp_path / "ct.nii.gz")
    shutil.copy(demo_data_dir() / "abdomen_prompt.nii.gz", tmp_path / "prompt.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "prompt.nii.gz"


def test_an_empty_server_address_is_refused_not_run_here(tmp_path, capsys):
    from PAMSegmentLib.cli import main

    ct, pr = _demo_copy(tmp_path)
    out = tmp_path / "out.nii.gz"
    assert main(["propagate", str(ct), str(pr), "-o", str(out), "--method", "copy", "--server", ""]) == 2
    assert "--server is empty (an unset variable?)" in capsys.readouterr().err and not out.exists()


def test_image_given_as_its_own_prompt_and_empty_paths_are_refused(tmp_path, capsys):
    from PAMSegmentLib.cli import main

    ct, pr = _demo_copy(tmp_path)
    out = tmp_path / "out.nii.gz"
    assert main(["propagate", str(pr), str(pr), "-o", str(out), "--method", "copy"]) == 2
    assert "IMAGE and PROMPT are the same file" in capsys.readouterr().err and not out.exists()
    assert main(["propagate", "", str(pr), "-o", str(out), "--method", "copy"]) == 2
    assert "IMAGE is empty (an unset variable?)" in capsys.readouterr().err


def test_batch_never_writes_over_its_manifest_or_an_input(tmp_path, capsys):
    from PAMSegmentLib.cli import main

    _demo_copy(tmp_path)
    m = tmp_path / "batch_report.csv"  # a manifest named as the report, in the -o folder
    m.write_text("image,prompt\nct.nii.gz,prompt.nii.gz\n")
    assert main(["batch", str(m), "-o", str(tmp_path), "--method", "copy"]) == 2
    assert "would replace the manifest" in capsys.readouterr().err
    assert m.read_text() == "image,prompt\nct.nii.gz,prompt.nii.gz\n"
    m2 = tmp_path / "m2.nii.gz"  # a manifest named as a row's output
    m2.write_text("image,prompt,output\nct.nii.gz,prompt.nii.gz,m2.nii.gz\n")
    assert main(["batch", str(m2), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2
    assert "the output" in (err := capsys.readouterr().err) and "is the manifest itself" in err
    m3 = tmp_path / "m3.csv"
    m3.write_text("image,prompt\nprompt.nii.gz,prompt.nii.gz\n")
    assert main(["batch", str(m3), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2
    assert "m3.csv row 2: its image and prompt are the same file" in capsys.readouterr().err


@pytest.mark.parametrize("value, says", [("1:-2", "(in '1:-2')"), ("1:", "(in '1:')")])
def test_an_empty_slices_error_quotes_the_whole_value(value, says):
    import argparse

    from PAMSegmentLib.cli import parse_empty_slices

    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse_empty_slices(value)
    assert says in str(refused.value)


# --- the fourth re-review's findings (session 37) ---

@pytest.mark.parametrize("offset, scale", [(1e6, 0.01), (-1e308, 1e308), (0.0, 1e35)])
def test_float64_cell_images_that_float32_cannot_hold_are_rescaled(offset, scale):
    from PAMSegmentLib.cells import label_cells

    image, labels = _disc_cells()
    examples = np.where(np.isin(labels, [1, 2, 3]), labels, 0)
    plain = label_cells(image / image.max(), examples)
    odd = label_cells(offset + scale * (image.astype(np.float64) / image.max()), examples)
    assert odd.labels.max() == plain.labels.max() >= 5  # 0 found before (all one value, or NaN)


def test_labels_beyond_two_to_the_53_keep_their_places(tmp_path):
    from PAMSegmentLib.volumes import _edge_labels

    arr = np.zeros((20, 20), np.uint64)
    for k in range(6):
        arr[2 + 3 * k, 2:6] = 2**60 + k  # int64 against uint64 compared as float64: one slot for all
    assert _edge_labels(arr, np.unique(arr)) == []


def test_grey_tiffs_are_costed_as_grey_whatever_their_bits_or_pages(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.volumes import image_pixels_2d, read_image_2d

    g16 = (np.arange(128 * 128) % 4000).astype(np.uint16).reshape(128, 128)
    tifffile.imwrite(tmp_path / "g16.tif", g16, tile=(64, 64), photometric="minisblack")
    assert image_pixels_2d(tmp_path / "g16.tif") == (128, 128, 1)
    g8 = (np.arange(128 * 128) % 250).astype(np.uint8).reshape(128, 128)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tw:  # a slide export: the image, then a thumbnail
        tw.write(g8, tile=(64, 64), photometric="minisblack")
        tw.write(g8[::4, ::4], photometric="minisblack", subfiletype=1)
    assert image_pixels_2d(tmp_path / "thumb.tif") == (128, 128, 1)
    assert read_image_2d(tmp_path / "thumb.tif", keep_colour=True)[0].shape == (128, 128)
    i8 = np.array(np.arange(-128, 128).reshape(16, 16), np.int8).repeat(8, 0).repeat(8, 1)
    tifffile.imwrite(tmp_path / "i8.tif", i8, tile=(64, 64), photometric="minisblack")
    assert np.array_equal(read_image_2d(tmp_path / "i8.tif")[0], i8.astype(np.float32))  # -125 was 131


def test_shown_stays_short_and_fast_without_pythons_digit_limit():
    import sys

    from PAMSegmentLib.checks import shown

    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("Python before 3.11 has no digit limit")
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # as PYTHONINTMAXSTRDIGITS=0: a million digits took 12 s to text
    try:
        assert shown(10**1_000_000) == "<a number of about 1000000 digits>"
    finally:
        sys.set_int_max_str_digits(before)


def test_window_percentiles_refuse_sets_memoryviews_and_tensor_bools():
    import torch

    from PAMSegmentLib.preprocess import PreprocessingParams

    for pct in ({1.0, 99.0}, memoryview(b"\x01\x63"), torch.tensor([False, True]), np.array([1 + 0j, 99 + 0j])):
        with pytest.raises(ValueError, match="window_percentiles must be a list of two"):
            PreprocessingParams.from_dict({"window_percentiles": pct})


# --- the fifth re-review's findings (session 37) ---

def test_a_png_named_tif_and_a_16_bit_tiled_tiff_with_a_thumbnail_are_read(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.volumes import image_pixels_2d, read_image_2d

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    (tmp_path / "c.png").rename(tmp_path / "c.tif")  # not a TIFF: tiff_pages says None (a TypeError before)
    assert image_pixels_2d(tmp_path / "c.tif") == (32, 32, 3)
    g16 = (np.arange(128 * 128) % 4000).astype(np.uint16).reshape(128, 128)
    with tifffile.TiffWriter(tmp_path / "g16.tif") as tw:
        tw.write(g16, tile=(64, 64), photometric="minisblack")
        tw.write(g16[::4, ::4], photometric="minisblack", subfiletype=1)
    array = read_image_2d(tmp_path / "g16.tif", keep_colour=True)[0]
    assert array.shape == (128, 128) and array.max() == 3999  # colour, 0-15, before


def test_tiny_float64_cell_images_are_rescaled_too():
    from PAMSegmentLib.cells import label_cells

    image, labels = _disc_cells()
    examples = np.where(np.isin(labels, [1, 2, 3]), labels, 0)
    plain = label_cells(image / image.max(), examples)
    tiny = label_cells(1e-46 * image.astype(np.float64) / image.max(), examples)  # 0 in float32
    assert tiny.labels.max() == plain.labels.max() >= 5


def test_other_commands_refuse_empty_paths_and_a_record_over_the_manifest(tmp_path, capsys, monkeypatch):
    from PAMSegmentLib.cli import main

    monkeypatch.chdir(tmp_path)  # on the code before the fix, "-o ''" wrote into the working folder
    _demo_copy(tmp_path)
    m = tmp_path / "m.csv"
    m.write_text("image,prompt\nct.nii.gz,prompt.nii.gz\n")
    assert main(["batch", str(m), "-o", "", "--method", "copy"]) == 2  # wrote into the working folder before
    assert "-o is empty (an unset variable?)" in capsys.readouterr().err
    assert main(["label-cells", "", "ex.png", "-o", "x.tif"]) == 2
    assert "IMAGE is empty" in capsys.readouterr().err
    record = tmp_path / "out" / "r.nii.gz.keyframes.json"
    record.parent.mkdir()
    record.write_text("image,prompt,output\n../ct.nii.gz,../prompt.nii.gz,r.nii.gz\n")
    assert main(["batch", str(record), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2
    assert "would replace the manifest itself" in capsys.readouterr().err
    assert record.read_text().startswith("image,prompt,output")
