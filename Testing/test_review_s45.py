"""Session 45."""

from __future__ import annotations

import re

import pytest


def _norm_pair(channels: int):
    import torch
    from torch import nn

    from PAMSegmentLib.network import InstanceNorm

    ours, ref = InstanceNorm(channels), nn.InstanceNorm2d(channels, eps=1e-5, affine=True)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(channels) + 0.5)
        ours.bias.copy_(torch.randn(channels))
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("shape", [(1, 128, 16, 16), (3, 64, 8, 12), (1, 512, 7, 7), (2, 1, 31, 33)])
def test_small_channels_last_maps_are_normalised_without_the_strided_group_norm(monkeypatch, shape):
    """Session 45: below 1024 pixels a map torch's channels-last group norm walks each channel at a
    stride of C floats (4-10 times as slow as reading it in order); in eval mode those maps are now
    normalised as a batch norm over each sample's (H*W, C) view. Same function as InstanceNorm2d:
    per sample and channel (a constant channel gives its bias), channels-last out, group norm unused."""
    import torch

    torch.manual_seed(0)
    n, c, h, w = shape
    ours, ref = _norm_pair(c)
    x = torch.randn(shape) * torch.arange(1, c + 1).view(1, c, 1, 1) + 5 * torch.arange(n).view(n, 1, 1, 1)
    x[-1, c // 2] = 4.0
    x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    group_norm = torch.group_norm
    monkeypatch.setattr(torch, "group_norm", lambda *a, **k: calls.append(a[0].shape) or group_norm(*a, **k))
    with torch.inference_mode():
        got = ours(x)
        want = ref(x.contiguous())
    assert calls == []
    assert got.shape == shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[-1, c // 2], ours.bias[c // 2].expand(h, w), atol=1e-4)


def test_other_maps_keep_torchs_group_norm_and_training_is_unchanged(monkeypatch):
    """Maps of 1024 pixels or more, plain-order maps and training keep torch's group norm; a map
    of one value per channel is refused as before (nn.GroupNorm's own error)."""
    import torch

    torch.manual_seed(1)
    ours, ref = _norm_pair(16)
    calls = []
    group_norm = torch.group_norm
    monkeypatch.setattr(torch, "group_norm", lambda *a, **k: calls.append(tuple(a[0].shape)) or group_norm(*a, **k))
    big = torch.randn(2, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    plain = torch.randn(1, 16, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(ours(big), ref(big.contiguous()), atol=1e-5)
        assert torch.allclose(ours(plain), ref(plain), atol=1e-5)
    assert calls == [(2, 16, 32, 32), (1, 16, 8, 8)]
    calls.clear()
    ours.train()
    small = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours(small).sum().backward()
    assert calls == [(1, 16, 8, 8)] and small.grad is not None
    ours.eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 16, 1, 1).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("preset", ["small", "small-prior"])
def test_network_output_is_unchanged_by_the_norm_path(monkeypatch, preset):
    """The whole network for inference (channels-last weights, batches of 1 and 5 queries) gives the
    probabilities it gave with torch's group norm everywhere, within 1e-5."""
    import torch

    from PAMSegmentLib import network
    from PAMSegmentLib.checkpoints import _for_inference
    from PAMSegmentLib.network import build_network

    monkeypatch.delenv("PAMSEGMENT_CHANNELS_LAST", raising=False)
    torch.manual_seed(0)
    net = _for_inference(build_network(preset), "cpu")
    guide, mask = torch.rand(1, 1, 128, 128) * 2 - 1, torch.zeros(1, 1, 128, 128)
    mask[..., 40:90, 30:100] = 1
    outs = {}
    for path in ("new", "old"):
        if path == "old":
            monkeypatch.setattr(network.InstanceNorm, "forward", torch.nn.GroupNorm.forward)
        for n in (1, 5):
            queries = torch.rand(1, n, 1, 128, 128, generator=torch.Generator().manual_seed(n)) * 2 - 1
            prob, presence = net.predict(guide, mask, queries)
            outs[path, n] = (prob, presence)
    for n in (1, 5):
        assert outs["new", n][0].shape == (n, 128, 128)
        assert torch.allclose(outs["new", n][0], outs["old", n][0], atol=1e-5)
        assert torch.allclose(outs["new", n][1], outs["old", n][1], atol=1e-5)


def _tar_gz_with_bad_crc(folder, name="pkg-1.0"):
    import os
    import tarfile

    src = folder / "src" / name
    src.mkdir(parents=True)
    (src / "a.txt").write_bytes(os.urandom(50000))
    archive = folder / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname=name)
    data = bytearray(archive.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32 of the data: every block still inflates
    archive.write_bytes(bytes(data))
    return archive


def test_a_tar_gz_whose_crc_fails_is_not_unpacked(tmp_path):
    """Carried since session 44: tarfile stops at the tar's end blocks, before gzip's trailer, so a
    .tar.gz whose CRC failed unpacked as if whole. It is read through first now: refused, nothing in raw/."""
    import gzip

    from PAMSegmentLib.training.data import ensure_unpacked

    archive = _tar_gz_with_bad_crc(tmp_path)
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        ensure_unpacked(tmp_path / "cache", archive)
    assert not (tmp_path / "cache" / "raw" / "pkg-1.0").exists()
    assert not (tmp_path / "cache" / "raw" / "pkg-1.0.partial").exists()


def test_prepare_data_names_a_source_archive_whose_crc_fails(tmp_path, monkeypatch):
    from test_synthetic import _prepare_data_with_source

    prep, dl, run = _prepare_data_with_source(tmp_path, monkeypatch, "ts", "totalsegmentator==2.18.0",
                                              "totalsegmentator-2.18.0", "sdist")
    archive = _tar_gz_with_bad_crc(tmp_path, "totalsegmentator-2.18.0")
    archive.rename(dl / archive.name)
    with pytest.raises(SystemExit) as caught:
        prep.main(run)
    assert re.fullmatch(rf"error: {re.escape(str(dl / archive.name))} is damaged \(CRC check failed 0x[0-9a-f]+ != "
                        r"0x[0-9a-f]+\); delete it and run again \(it is downloaded again\), or put a whole copy there",
                        str(caught.value)), str(caught.value)
    assert not (tmp_path / "cache" / "raw" / "totalsegmentator-2.18.0").exists()


def _dicom_series(folder, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)):
    import numpy as np
    from test_volumes import write_dicom_series

    from PAMSegmentLib import volumes

    array = (np.arange(8 * 12 * 14).reshape(8, 12, 14) % 97).astype(np.int16)
    vol = volumes.Volume(array, (3.0, 0.8, 0.8), (10.0, -20.0, 30.0), direction)
    write_dicom_series(folder, vol, "1.2.826.0.1.3680043.2.1125.45.1")
    return sorted(folder.iterdir())


def _set_tag(path, keyword, value):
    import pydicom

    ds = pydicom.dcmread(path)
    setattr(ds, keyword, value)
    ds.save_as(path)


def test_a_dicom_series_whose_orientation_itk_would_replace_is_refused(tmp_path):
    """A newcomer's trial (session 45): ImageOrientationPatient row and column directions more than
    1e-3 from right angles are replaced by the identity axes in ITK's DICOM reader without a word; the
    series (axes -x, -y) was read and its result written mirrored, exit 0. Refused, with what to do;
    a skew within GDCM's tolerance reads on the files' axes as before."""
    import numpy as np

    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    files = _dicom_series(tmp_path / "skewed")
    for f in files:
        _set_tag(f, "ImageOrientationPatient", [-1.0, 0.002, 0.0, 0.0, -1.0, 0.0])
    with pytest.raises(InputError, match=r"skewed: its ImageOrientationPatient \(-1\.0\\0\.002\\0\.0\\0\.0\\-1\.0\\"
                                         r"0\.0\) gives row and column directions that are not at right angles "
                                         r"\(cosine -0\.002\), "
                                         r"which ITK's DICOM reader replaces by the identity axes without a word .*"
                                         r"convert the series with a tool that corrects its orientation"):
        volumes.read_volume(tmp_path / "skewed")
    files = _dicom_series(tmp_path / "slight")
    for f in files:
        _set_tag(f, "ImageOrientationPatient", [-1.0, 0.0002, 0.0, 0.0, -1.0, 0.0])
    got = volumes.read_volume(tmp_path / "slight")
    assert np.allclose(np.asarray(got.direction).reshape(3, 3)[:, :2], [[-1, 0], [0, -1], [0, 0]], atol=1e-3)


@pytest.mark.parametrize("odd", [0, 4])
def test_a_dicom_file_of_another_pixel_spacing_is_named(tmp_path, odd):
    """A newcomer's trial (session 45): ITK stacks a series on one file's PixelSpacing; a file of
    another (first: the whole volume scaled; in the middle: read at the others' scale) passed, exit 0."""
    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    files = _dicom_series(tmp_path / "mixed")
    _set_tag(files[odd], "PixelSpacing", [0.5, 0.5])
    with pytest.raises(InputError) as caught:
        volumes.read_volume(tmp_path / "mixed")
    assert str(caught.value).endswith(
        f"mixed: 1 of its 8 files has another pixel size (PixelSpacing) than the rest's 0.8 x 0.8 mm: "
        f"{files[odd].name} (0.5 x 0.5 mm); ITK would stack them all at one file's scale. Remove those files "
        "(another reconstruction or field of view?), or convert the series with a tool that resamples (e.g. "
        "dcm2niix or Slicer's DICOM module)")
    files[odd].unlink()
    if odd == 0:  # without it the series reads, at its own spacing
        assert volumes.read_volume(tmp_path / "mixed").spacing == pytest.approx((3.0, 0.8, 0.8))


def test_an_image_whose_data_is_missing_or_cut_is_named_before_the_prompt_grid(tmp_path):
    """A newcomer's trial (session 45): the header pre-check compared grids first, so a .mhd without
    its .raw, or an NRRD whose data ends early, was reported as a prompt on another grid (resample it;
    then the real fault was named). The image's own data fault comes first now."""
    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    prompt = sitk.GetImageFromArray(np.zeros((30, 101, 122), np.uint8))
    prompt.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nrrd"))
    (tmp_path / "miss.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 122 101 30\nElementType = MET_SHORT\n"
                                       "ElementSpacing = 3 3 3\nElementDataFile = nothere.raw\n")
    with pytest.raises(InputError, match=r"miss\.mhd names .*nothere\.raw as its voxel data, which does not exist"):
        volumes.check_grids_from_headers(tmp_path / "miss.mhd", tmp_path / "prompt.nrrd")
    image = sitk.GetImageFromArray(np.arange(30 * 101 * 122, dtype=np.int16).reshape(30, 101, 122))
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "whole.nrrd"))  # raw, uncompressed
    (tmp_path / "cut.nrrd").write_bytes((tmp_path / "whole.nrrd").read_bytes()[:5000])  # a copy cut short
    with pytest.raises(InputError, match=r"cut\.nrrd: its voxel data ends early or is damaged"):
        volumes.check_grids_from_headers(tmp_path / "cut.nrrd", tmp_path / "prompt.nrrd")
    # a whole image on another grid is still the prompt's mismatch
    with pytest.raises(InputError, match=r"prompt\.nrrd .*resample"):
        volumes.check_grids_from_headers(tmp_path / "whole.nrrd", tmp_path / "prompt.nrrd")


def _edit_case():
    import numpy as np

    prompt = np.zeros((12, 20, 20), np.uint8)
    prompt[5, 5:15, 5:15] = 1
    previous = np.zeros_like(prompt)
    previous[2:10, 5:15, 5:15] = 1
    return prompt, previous


def test_the_prompt_given_as_the_edited_result_is_refused():
    """A trial (session 45): the prompt itself given as the corrected result made every predicted
    slice a wall: a one-slice result, exit 0 (a file of fixed slices alone was refused already)."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import keyframes_from_edits

    prompt, previous = _edit_case()
    with pytest.raises(InputError) as caught:
        keyframes_from_edits(prompt, previous, prompt.copy())
    assert str(caught.value) == (
        "the edited result holds label 1 on its drawn slice 5 only and erases it on the 7 other slices the earlier "
        "result holds it on (2-4, 6-9): is it the prompt? Give the corrected copy of the earlier result (your fixes "
        "in a copy of the whole result) as the edited one (if every predicted slice was wrong, the drawing alone is "
        "the result)")
    trimmed = previous.copy()
    trimmed[8:10] = 0  # the object's end erased: a correction, taken
    plan = keyframes_from_edits(prompt, previous, trimmed)
    assert plan.empty_slices[1] == [8, 9] and plan.edited[1] == [8, 9]


def test_a_correction_painted_with_another_label_value_is_refused():
    """A trial (session 45): a slice of a label-1 result set to label 2 (the correction painted with
    another value) became a wall of label 1 (the slices beyond it emptied too) with only a note that
    label 2 was left out, exit 0; a whole file saved with other values is refused already. A new label
    painted beside label 1 (label 1 still there) stays a note."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import keyframes_from_edits

    prompt, previous = _edit_case()
    edited = previous.copy()
    edited[8][edited[8] == 1] = 2
    with pytest.raises(InputError) as caught:
        keyframes_from_edits(prompt, previous, edited)
    assert str(caught.value) == (
        "on slice 8 (axis 0) the edited result holds label 2 where the earlier result holds label 1, and no label 1: "
        "save your corrections with the result's label values (label 1 there); a new structure is drawn in the "
        "prompt, not in the edited result")
    beside = previous.copy()
    beside[8, 5:15, 5:8] = 2  # part of the slice relabelled, label 1 kept there
    plan = keyframes_from_edits(prompt, previous, beside)
    assert plan.ignored == [2] and plan.edited[1] == [8] and plan.empty_slices[1] == []


def test_a_corrected_result_given_as_the_prompt_is_pointed_to_the_update(tmp_path, capsys):
    """A trial (session 45): a corrected result given as the prompt was refused as a 3D mask with
    "draw it on one slice" only; the message now says how to update that result."""
    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib.cli import main

    image = sitk.GetImageFromArray((np.arange(12 * 20 * 20) % 50).reshape(12, 20, 20).astype(np.int16))
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    result = np.zeros((12, 20, 20), np.uint8)
    result[1:11, 5:15, 5:15] = 1
    mask = sitk.GetImageFromArray(result)
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(tmp_path / "corrected.nrrd"))
    code = main(["propagate", str(tmp_path / "image.nrrd"), str(tmp_path / "corrected.nrrd"), "-o",
                 str(tmp_path / "out.nrrd"), "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2 and "that is a 3D mask, not a slice prompt" in err
    assert err.rstrip().endswith("If it is a result you corrected, update that result instead: give the prompt it "
                                 "was propagated from, --previous that result and --edited your corrected copy")
    assert not (tmp_path / "out.nrrd").exists()


def test_pam_begins_from_a_drawn_slice_large_enough_for_its_window():
    """A trial (session 45): a correction of an object's 2-voxel tip below the drawn slice made that
    tip the lowest drawn slice, and PAM took its intensity window (and first drift statistics) from
    those 2 voxels for every walk: a vertebra's Dice 0.798 -> 0.418, 0.795 with the volume flipped.
    It begins now from the lowest drawn slice holding at least a quarter of the largest one's voxels."""
    import numpy as np

    from PAMSegmentLib import propagate as engine
    from PAMSegmentLib.pam_predictor import PAMPredictor
    from PAMSegmentLib.propagate import _begin_keyframe

    mask = np.zeros((10, 8, 8), bool)
    mask[2, 0, :2] = True  # a 2-voxel tip
    mask[5, :5, :5] = True  # 25 voxels
    mask[7, :3, :3] = True  # 9 voxels: over a quarter of 25
    assert _begin_keyframe(mask, [2, 5, 7], "lowest") == 2
    assert _begin_keyframe(mask, [2, 5, 7], "lowest-sizable") == 5
    assert _begin_keyframe(mask, [5, 7], "lowest-sizable") == 5
    assert _begin_keyframe(mask, [2, 7], "lowest-sizable") == 7
    assert _begin_keyframe(mask, [2, 5, 7], "largest") == 5
    mask[7, :5, :5] = True  # a tie: the lowest of the largest
    assert _begin_keyframe(mask, [2, 5, 7], "largest") == 5
    assert _begin_keyframe(mask, [2], "lowest-sizable") == 2
    from PAMSegmentLib.checkpoints import load_model

    assert PAMPredictor(load_model()).begin_keyframe == "lowest-sizable"  # the shipped default

    began = []

    class Spy(engine.SlicePredictor):
        begin_keyframe = "lowest-sizable"

        def begin(self, volume, prompt_index, prompt_mask):
            began.append((int(prompt_index), int(np.count_nonzero(prompt_mask))))

        def predict(self, volume, guide_index, guide_mask, query_indices):
            return engine.SlicePrediction(np.stack([guide_mask.astype(np.float32)] * len(query_indices)))

    prompt = mask.astype(np.uint8)
    engine.propagate(np.random.default_rng(0).random((10, 8, 8)), prompt, (1.0, 1.0, 1.0), Spy())
    assert began == [(5, 25)]
    Spy.begin_keyframe = "lowest"
    engine.propagate(np.random.default_rng(0).random((10, 8, 8)), prompt, (1.0, 1.0, 1.0), Spy())
    assert began[-1] == (2, 2)


def test_one_pixel_spacing_written_with_other_decimals_is_one(tmp_path):
    """A review (session 45): 0.78125 mm (400 mm / 512) saved as 0.7813 by another tool in half the
    files was refused as another pixel size; within 0.1 % it is the same."""
    from PAMSegmentLib import volumes

    files = _dicom_series(tmp_path / "decimals")
    for f in files:
        _set_tag(f, "PixelSpacing", ["0.78125", "0.78125"])
    for f in files[::2]:
        _set_tag(f, "PixelSpacing", ["0.7813", "0.7813"])
    assert volumes.read_volume(tmp_path / "decimals").spacing[1:] == pytest.approx((0.78125, 0.78125), rel=1e-4)


def test_an_erase_only_leak_fix_keeping_predicted_slices_is_taken():
    """A review (session 45): the refusal of the prompt given as the edited result also refused a
    leak fix erasing most slices while predicted ones stayed as they were."""
    import numpy as np

    from PAMSegmentLib.propagate import keyframes_from_edits

    prompt = np.zeros((40, 12, 12), np.uint8)
    prompt[20, 3:9, 3:9] = 1
    previous = np.zeros_like(prompt)
    previous[:, 3:9, 3:9] = 1  # leaked along the whole volume
    edited = previous.copy()
    edited[:15] = 0
    edited[26:] = 0  # slices 15-25 kept as predicted
    plan = keyframes_from_edits(prompt, previous, edited)
    assert plan.empty_slices[1] == list(range(15)) + list(range(26, 40))


def test_instance_norm_of_one_pixel_maps_in_a_batch_is_torchs():
    import torch

    from PAMSegmentLib.network import InstanceNorm

    norm = InstanceNorm(8).eval()
    x = torch.randn(2, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(norm(x), torch.nn.GroupNorm.forward(norm, x))


def test_contour_interpolation_runs_itk_on_one_thread():
    """Session 45: evaluate.py's correction rounds with --threads 2 ended in "corrupted double-linked
    list" (exit 134) after writing their results: ITK's contour interpolation on two threads corrupts
    the heap (on one, the same figures and no crash). It runs on one whatever ITK was set to."""
    import numpy as np

    itk = pytest.importorskip("itk")
    from PAMSegmentLib import evaluation as ev

    drawn = np.zeros((9, 12, 12), bool)
    drawn[1, 3:9, 3:9] = drawn[7, 4:8, 4:8] = True
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(2)
    out = ev.contour_interpolation(drawn, axis=0)
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
    assert out[1:8].any(axis=(1, 2)).all() and not out[0].any() and not out[8].any()
    assert np.array_equal(out[1], drawn[1]) and np.array_equal(out[7], drawn[7])


@pytest.mark.parametrize("spacings, odd", [
    ([["0.8", "0.8"], ["1.0", "1.0"]] * 4, 4),  # two spacings in equal numbers (a StopIteration: a re-review)
    ([["0.0005", "0.0005"]] * 7 + [["0.0006", "0.0006"]], 1),  # fine spacings: 20 % apart is another
    ([["0.5", "0.5"]] * 3 + [["0.6", "0.6"]] * 2 + [["0.7", "0.7"]] * 3, 5),  # the most common named, not the median
    ([["1.004", "1.004"]] + [["1.0", "1.0"]] * 7, 1),  # the odd one first (it was the reference: 7 named)
    ([["1.0", "1.0"]] * 4 + [["1.0006", "1.0006"]] + [["1.0012", "1.0012"]] * 3, 3),  # "the same" chained
    ([["0.6835", "0.6835"]] * 2 + [["0.68359375", "0.68359375"]] * 2 + [["0.7", "0.7"]] * 3 + [["0.8", "0.8"]], 4),
])
def test_pixel_spacings_split_evenly_or_fine_are_refused(tmp_path, spacings, odd):
    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    files = _dicom_series(tmp_path / "split")
    for f, value in zip(files, spacings):
        _set_tag(f, "PixelSpacing", value)
    with pytest.raises(InputError, match=rf"split: {odd} of its 8 files ha(s|ve) another pixel size"):
        volumes.read_volume(tmp_path / "split")


def test_an_unknown_begin_rule_is_refused():
    import numpy as np

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import _begin_keyframe

    with pytest.raises(InputError, match="begin_keyframe must be lowest, largest or lowest-sizable, got 'smallest'"):
        _begin_keyframe(np.ones((3, 2, 2), bool), [0, 2], "smallest")
