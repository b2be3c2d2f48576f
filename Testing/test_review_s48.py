"""Session 48: faults found by this session's trials and reviews."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from PAMSegmentLib.checkpoints import CheckpointError, load_checkpoint_file
from PAMSegmentLib.errors import PAMError
from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor


def test_a_torchscript_archive_is_named_with_how_to_save_its_weights(tmp_path):
    """A TorchScript file (torch.jit.save) was told "its entry ts/code/... is compressed ... re-save the
    weights with torch.save", which says nothing of what it is. It is named, with the one line that
    saves its weights as a state dict (checked here to give the tensors a state dict holds)."""
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    with pytest.raises(CheckpointError, match=r"it is a TorchScript archive \(torch\.jit\.save\)") as error:
        load_checkpoint_file(path)
    assert "torch.save(torch.jit.load(PATH).state_dict(), 'weights.pth')" in str(error.value)
    saved = torch.jit.load(str(path)).state_dict()  # the advice, run
    assert sorted(saved) == ["0.bias", "0.weight"] and torch.equal(saved["0.weight"], module[0].weight)


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_tar_archive_is_told_to_be_extracted_not_called_an_error_page(tmp_path):
    """A checkpoint packed in a .tar was "not a PyTorch file (it begins './PaxHeader'...) ... the download
    may have saved an error page". It is named as a tar archive to extract; torch's own tar format from
    before 0.4 (its first member sys_info) is named as that."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    _tar(tmp_path / "weights.tar", [("pam.pth", buffer.getvalue())])
    with pytest.raises(CheckpointError, match=r"it is a tar archive, not a PyTorch checkpoint; extract it "
                                              r"\(tar -xf 'weights.tar'"):
        load_checkpoint_file(tmp_path / "weights.tar")
    _tar(tmp_path / "old.pt", [("sys_info", b"\x80\x02}q\x00."), ("pickle", b"\x80\x02}q\x00."),
                               ("storages", b"\x80\x02K\x00."), ("tensors", b"\x80\x02K\x00.")])
    with pytest.raises(CheckpointError, match=r"it is in torch's first file format \(a tar archive\)"):
        load_checkpoint_file(tmp_path / "old.pt")


def test_the_checkpoint_checked_is_the_checkpoint_loaded(tmp_path, small_checkpoint, monkeypatch):
    """The file was opened for its checks (zip directory, CRC-32 of every entry) and opened again by
    torch.load: a file put in its place in between escaped the CRC check (ours also carry a sha256, the
    official file nothing). It is opened once now; here a damaged copy replaces it right after the
    checks, and the weights loaded are the checked file's (the code before refused the copy's sha256)."""
    import os
    import shutil

    from PAMSegmentLib import checkpoints

    path = tmp_path / "weights.pt"
    shutil.copyfile(small_checkpoint.path, path)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # a byte in a weight: caught by the CRC check when checked
    (tmp_path / "other.pt").write_bytes(bytes(damaged))
    checked = checkpoints._check_zip_entries

    def check_then_swap(*args):
        checked(*args)
        os.replace(tmp_path / "other.pt", path)

    monkeypatch.setattr(checkpoints, "_check_zip_entries", check_then_swap)
    model = load_checkpoint_file(path)
    assert not (tmp_path / "other.pt").exists()  # the swap happened
    assert model.sha256 == small_checkpoint.sha256
    assert all(torch.equal(a, b) for a, b in zip(model.network.state_dict().values(),
                                                 small_checkpoint.network.state_dict().values()))


class _FollowsTheDrawnObject(SlicePredictor):
    """A predictor that follows whichever of ``objects``' labels the guide mask covers most: each
    walk keeps to the object it was started on (as the network does on a real scan)."""

    def __init__(self, objects):
        self.objects, self.prediction = objects, SlicePrediction
        self.window_mm, self.max_window = 4.0, 4

    def predict(self, volume, guide_index, guide_mask, query_indices):
        import numpy as np

        values, counts = np.unique(self.objects[guide_index][guide_mask > 0], return_counts=True)
        followed = values[np.argmax(counts)] if len(values) else 0
        return self.prediction((self.objects[list(query_indices)] == followed).astype(np.float32))


def _two_objects():
    import numpy as np

    j, i = np.ogrid[:40, :40]
    objects = np.zeros((20, 40, 40), np.uint8)
    objects[:, ((j - 12) ** 2 + (i - 12) ** 2) <= 36] = 1  # a tube on one side
    objects[:, ((j - 28) ** 2 + (i - 28) ** 2) <= 36] = 2  # another on the other side
    image = np.random.default_rng(0).normal(size=objects.shape).astype(np.float32)
    return objects, image


def test_a_keyframe_drawn_on_another_structure_is_said_in_a_note():
    """A trial (session 48): the left kidney drawn on slices 6 and 16 and, by mistake, the spleen on
    slice 11 (same label) was followed without a word (Dice 0.95 -> 0.63). The walks between two drawn
    slices now say when they do not meet (best Dice on any slice between under 0.1): here the walks
    from 3 and 10 follow one tube, those from 10 and 16 meet nowhere."""
    import numpy as np

    from PAMSegmentLib.propagate import propagate

    objects, image = _two_objects()
    prompt = np.zeros(objects.shape, np.uint8)
    prompt[3], prompt[10], prompt[16] = objects[3] == 1, objects[10] == 1, objects[16] == 2  # 16: the other
    result = propagate(image, prompt, (1.0, 1.0, 1.0), _FollowsTheDrawnObject(objects))
    assert result.disagree == {1: [(10, 16, 0.0)]}
    assert [n for n in result.notes() if "do not meet" in n] == [
        "label 1: the walks between its drawn slices 10 and 16 do not meet (on no slice between do they overlap by "
        "a tenth), so halfway there the result switches from the object followed from one drawing to the one "
        "followed from the other; check that those drawings are of the same structure, and the slices between "
        "(draw one of them and update)"]
    prompt[16] = objects[16] == 1  # drawn right: the walks agree (Dice 1 between), nothing said
    right = propagate(image, prompt, (1.0, 1.0, 1.0), _FollowsTheDrawnObject(objects))
    assert right.disagree == {} and not [n for n in right.notes() if "do not meet" in n]
    np.testing.assert_array_equal(right.mask[3:17] > 0, objects[3:17] == 1)


def test_a_server_answer_carries_the_keyframe_disagreement_and_checks_it():
    import io
    import json

    import numpy as np

    from PAMSegmentLib.propagate import propagate
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result

    objects, image = _two_objects()
    prompt = np.zeros(objects.shape, np.uint8)
    prompt[4], prompt[12] = objects[4] == 1, objects[12] == 2
    result = propagate(image, prompt, (1.0, 1.0, 1.0), _FollowsTheDrawnObject(objects))
    back = decode_result(encode_result(result))
    assert back.disagree == result.disagree == {1: [(4, 12, 0.0)]} and back.notes() == result.notes()
    with np.load(io.BytesIO(encode_result(result))) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    for bad in ([[12, 4, 0.0]], [[4, 99, 0.0]], [[4, 12, "0"]], [[4, 12, 7.0]], [[4, 12]], [[4, 12, 0.0]] * 2,
                [[4, 5, 0.0]]):  # ... twice; 5 is no drawn slice (a hostile answer's 20 000 copies: a 660 kB note)
        meta["disagree"] = {"1": bad}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        with pytest.raises(PAMError, match="keyframe disagreement|slice numbers"):
            decode_result(buffer.getvalue())


@pytest.fixture
def signal_handlers():
    import signal

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield signal
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


def test_a_second_ctrl_c_while_the_first_ends_the_run_is_ignored(signal_handlers, monkeypatch, capsys):
    """A trial (session 48): Ctrl-C pressed three times within milliseconds printed the "interrupted"
    line, then a traceback (a KeyboardInterrupt in __main__.run), and the process died of the signal
    instead of exiting 130 (4 of 12 tries). Once a run is ending on Ctrl-C or SIGTERM, further ones are
    ignored (where the process ends with the command), and one that still escapes is one line."""
    signal = signal_handlers
    from PAMSegmentLib import __main__ as entry
    from PAMSegmentLib import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_resolve", lambda ref: interrupted)
    assert cli.main(["info"], ends_process=True) == 130
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert cli.main(["info"], ends_process=False) == 130  # a caller's own process: its handler left alone
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    capsys.readouterr()

    def escapes(**kwargs):  # the second Ctrl-C landing before main's handler could ignore it
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", escapes)
    assert entry.run() == 130
    assert capsys.readouterr().err == "pamsegment: interrupted; nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_values_close_to_whole_are_printed_as_they_are(tmp_path):
    """A trial (session 48): a float prompt of labels x 1.0000001 was refused as holding "the values 0,
    1, 2, 3, 5, not whole numbers", which look whole. Each value is printed to its own precision."""
    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap

    labels = np.zeros((4, 6, 6), np.float32)
    labels[1, 1:3, 1:3], labels[2, 3:5, 3:5], labels[3, 0, 0] = 1, 2, 5e7
    image = sitk.GetImageFromArray(labels * np.float32(1.0000001))
    sitk.WriteImage(image, str(tmp_path / "m.nii.gz"))
    with pytest.raises(InputError, match=r"m.nii.gz holds the values 0, 1.0000001, 2.0000002, 5.0000004e\+07, not "
                                         r"whole numbers"):
        read_labelmap(tmp_path / "m.nii.gz")


def test_an_empty_output_path_is_not_told_a_folder_will_do(tmp_path, capsys):
    """A trial (session 48): propagate's `-o ""` was told "give a file or folder", and `-o FOLDER` then
    "FOLDER is a folder; give a file name". The empty-path message asks for the path the option takes."""
    from PAMSegmentLib.cli import main

    assert main(["propagate", str(tmp_path / "i.nii.gz"), str(tmp_path / "p.nii.gz"), "-o", ""]) == 2
    err = capsys.readouterr().err
    assert "-o is empty (an unset variable?); give the output file (a folder is no output)" in err


def test_an_update_says_again_what_the_result_said_of_a_pair_it_reuses():
    """A review (session 48): an update reuses the walks between unchanged drawn slices and did not judge
    them again, so a keyframe pair still wrong lost its note once another slice was drawn (a server, which
    runs an update from scratch, still said it). The reused pair is said again, as a fresh run says it."""
    import numpy as np

    from PAMSegmentLib.propagate import propagate

    objects, image = _two_objects()
    prompt = np.zeros(objects.shape, np.uint8)
    prompt[4], prompt[12] = objects[4] == 1, objects[12] == 2
    model = _FollowsTheDrawnObject(objects)
    first = propagate(image, prompt, (1.0, 1.0, 1.0), model)
    assert first.disagree == {1: [(4, 12, 0.0)]}
    prompt[18] = objects[18] == 1
    update = propagate(image, prompt, (1.0, 1.0, 1.0), model, previous=first)
    fresh = propagate(image, prompt, (1.0, 1.0, 1.0), model)
    assert update.recomputed[1] == [(13, 17), (19, 19)]  # slices 5-11, between 4 and 12, were reused
    assert update.disagree == fresh.disagree == {1: [(4, 12, 0.0), (12, 18, 0.0)]}
    assert [n for n in update.notes() if "do not meet" in n][0].startswith(
        "label 1: the walks between its drawn slices 4 and 12, and 12 and 18 do not meet")
    # the same from the record the command line keeps beside OUT (--previous OUT; a re-review: the record did
    # not hold it, so the command line's updates still dropped the note)
    back = first.from_record(first.mask, json.loads(json.dumps(first.to_record())))
    assert back.disagree == first.disagree
    assert propagate(image, prompt, (1.0, 1.0, 1.0), model, previous=back).disagree == fresh.disagree
    record = first.to_record()
    for bad in ([[4, 12, 0.0], [4, 12, 0.0]], [[4, 13, 0.0]], [[4, 12, 2.0]], "x"):
        record["labels"]["1"]["disagree"] = bad
        with pytest.raises(ValueError, match="keyframe disagreement"):
            first.from_record(first.mask, record)


def test_a_few_far_out_voxels_of_a_drawing_are_left_out_of_its_window_when_asked():
    """A trial (session 48): a kidney's drawn slice held 3 voxels of bone (401-610 HU among -54..59), so
    its window (0.5-99.5 percentiles of 180 voxels: nearly min and max) was ten times the kidney's own
    range and every walk from it ended at once (Dice 0.09). With ``outlier_share`` such voxels (beyond
    3 interquartile ranges, at most that share, widening the window twofold or more) are left out;
    a second population (a tenth of the voxels) or values within the fences stay."""
    import numpy as np

    from PAMSegmentLib.checkpoints import InferenceParams
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.preprocess import PreprocessingParams, intensity_window

    params = PreprocessingParams(window_margin=0.0)
    values = np.linspace(-50.0, 60.0, 177)
    mask = np.ones(180, bool)
    spilled = np.concatenate([values, [401.0, 470.0, 610.0]])
    wide, kept = intensity_window(spilled, mask, params), intensity_window(spilled, mask, params, 0.02)
    assert wide.high > 450 and kept.low == pytest.approx(np.percentile(values, 0.5))
    assert kept.high == pytest.approx(np.percentile(values, 99.5))
    two_kinds = np.concatenate([values[:160], np.full(20, 500.0)])  # 11 %: a structure of two tissues
    assert intensity_window(two_kinds, mask, params, 0.02) == intensity_window(two_kinds, mask, params)
    inside = np.concatenate([values, [160.0, 170.0, 190.0]])  # within the fences (IQR 55: up to 197.5)
    assert intensity_window(inside, mask, params, 0.02) == intensity_window(inside, mask, params)
    flat = np.concatenate([np.full(96, 40.0), np.full(4, 60.0)])  # quartiles equal: no fences to speak of
    everywhere = np.ones(100, bool)
    assert intensity_window(flat, everywhere, params, 0.05) == intensity_window(flat, everywhere, params)
    for bad in (0.5, float("nan"), -0.01, "0.02"):
        with pytest.raises(InputError, match="window_outlier_share must be a number within"):
            InferenceParams(window_outlier_share=bad)
    # off, it is not written (a checkpoint saved so loads in earlier releases, and keeps its settings digest:
    # a re-review found the shipped weights' digest changed by the new field, so batch redid every output)
    assert "window_outlier_share" not in InferenceParams().to_dict()
    assert InferenceParams.from_dict(InferenceParams(window_outlier_share=0.02).to_dict()).window_outlier_share == 0.02


class _FollowsOneOf(SlicePredictor):
    """Follows whichever of ``objects`` (3D masks, which may overlap) the guide mask covers most."""

    def __init__(self, objects):
        self.objects = objects
        self.window_mm, self.max_window = 4.0, 4

    def predict(self, volume, guide_index, guide_mask, query_indices):
        import numpy as np

        covered = [np.count_nonzero(o[guide_index] & (guide_mask > 0)) for o in self.objects]
        followed = self.objects[int(np.argmax(covered))]
        return SlicePrediction(followed[list(query_indices)].astype(np.float32))


def _discs(shift: int, n: int = 20, size: int = 48):
    """Two tubes of radius 8 whose centres lie ``shift`` columns apart, and their overlap on a slice (the
    share of either, as large as the other)."""
    import numpy as np

    j, i = np.ogrid[:size, :size]
    one = np.broadcast_to(((j - 24) ** 2 + (i - 14) ** 2) <= 64, (n, size, size))
    two = np.broadcast_to(((j - 24) ** 2 + (i - 14 - shift) ** 2) <= 64, (n, size, size))
    overlap = 2 * np.count_nonzero(one[0] & two[0]) / (np.count_nonzero(one[0]) + np.count_nonzero(two[0]))
    return one, two, overlap


def test_the_walks_meeting_rule_holds_at_its_threshold_and_when_they_never_share_a_slice():
    """A re-review (session 48): the tests gave only Dice 0 or 1, so the 0.1 was not pinned; and two
    walks that each found the object between the drawn slices but never on one slice (one object on
    slices 0-7, another on 8-19, drawn on 4 and 12) said nothing, the result switching at slice 8."""
    import numpy as np

    from PAMSegmentLib.propagate import KEYFRAME_DISAGREE_OVERLAP, propagate

    image = np.random.default_rng(0).normal(size=(20, 48, 48)).astype(np.float32)
    for shift, said in ((14, True), (12, False)):
        one, two, overlap = _discs(shift)
        assert (overlap < KEYFRAME_DISAGREE_OVERLAP) == said, overlap  # 14 columns: 0.06; 12: 0.15
        prompt = np.zeros(one.shape, np.uint8)
        prompt[4], prompt[12] = one[4], two[12]
        result = propagate(image, prompt, (1.0, 1.0, 1.0), _FollowsOneOf([one, two]))
        assert result.disagree == ({1: [(4, 12, round(overlap, 3))]} if said else {}), (shift, result.disagree)
    one, two, _ = _discs(20)
    first, second = one.copy(), two.copy()
    first[8:], second[:8] = False, False  # one object on slices 0-7, another (elsewhere) on 8-19
    prompt = np.zeros(one.shape, np.uint8)
    prompt[4], prompt[12] = first[4], second[12]
    result = propagate(image, prompt, (1.0, 1.0, 1.0), _FollowsOneOf([first, second]))
    assert result.disagree == {1: [(4, 12, 0.0)]} and result.gaps == {1: []}
    np.testing.assert_array_equal(result.mask > 0, first | second)  # (the result itself as before)


def test_an_empty_previous_or_edited_is_refused_as_empty(tmp_path, capsys):
    """A re-review (session 48): `--previous ""` was read as '.' ("is a folder without a DICOM series")."""
    from PAMSegmentLib.cli import main

    image, prompt, out = (str(tmp_path / n) for n in ("i.nii.gz", "p.nii.gz", "o.nii.gz"))
    assert main(["propagate", image, prompt, "-o", out, "--previous", "", "--edited", prompt]) == 2
    assert "--previous is empty (an unset variable?); give the earlier result" in capsys.readouterr().err
