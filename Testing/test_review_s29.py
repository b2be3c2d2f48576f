"""Fixes from session 29's work (each test failed on the code before its fix)."""
from __future__ import annotations

import numpy as np
from test_engine import ISO, image_for, prompt_from, tube

from PAMSegmentLib.baselines import CopyPredictor
from PAMSegmentLib.propagate import predictor_settings, propagate


class _StricterCopy(CopyPredictor):
    """The copy baseline with another class-level default, as a subclass or a new release sets it."""

    presence_threshold = 0.999


def test_settings_name_inherited_class_defaults():
    """Carried from s28: predictor_settings named the instance's attributes and three chosen class
    options, so a class-level default (PAM's gate_k, the engine's thresholds a subclass changes)
    was in neither the evaluation's settings digest nor an update's reuse check."""
    from PAMSegmentLib.pam_predictor import PAMPredictor

    assert "presence_threshold=0.5" in predictor_settings(CopyPredictor())
    assert "presence_threshold=0.999" in predictor_settings(_StricterCopy())
    assert "gate_k=2.0" in {s for s in predictor_settings(PAMPredictor.__new__(PAMPredictor))}


def test_an_update_with_another_class_default_recomputes_but_an_older_record_is_reused():
    truth = tube(3, 25)
    image = image_for(truth) + 5 * truth
    first = propagate(image, prompt_from(truth, 12), ISO, CopyPredictor())
    fresh = propagate(image, prompt_from(truth, [12, 20]), ISO, _StricterCopy())
    update = propagate(image, prompt_from(truth, [12, 20]), ISO, _StricterCopy(), previous=first)
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.n_predicted == fresh.n_predicted > 0  # nothing of the first run's walks kept
    # A record written before class defaults were recorded names only the instance's settings: its
    # walks are still reused by the same predictor (an upgrade alone does not recompute everything).
    own = set(f"{k}=" for k in vars(CopyPredictor()))
    old_state = {lab: (key[0], key[1], tuple(s for s in key[2] if any(s.startswith(o) for o in own)))
                 for lab, key in first.begin_state.items()}
    assert all(len(v[2]) < len(first.begin_state[lab][2]) for lab, v in old_state.items())
    first.begin_state = old_state
    again = propagate(image, prompt_from(truth, [12, 20]), ISO, CopyPredictor(), previous=first)
    scratch = propagate(image, prompt_from(truth, [12, 20]), ISO, CopyPredictor())
    assert 0 < again.n_predicted < scratch.n_predicted
    np.testing.assert_array_equal(again.mask, scratch.mask)


def test_walk_end_sits_on_the_last_slice_the_component_filter_kept():
    """A review (s29): under the authors' walk (6-connected components) slices that touch the
    object only diagonally are removed after the walk, but the report's walk_end stayed on the
    walk's last slice, now empty (`1,10,0,no,0.251,area` in the review's CSV)."""
    from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor

    truth = np.zeros((20, 32, 32), bool)
    truth[11:16, 10:20, 10:20] = True  # the drawn side, slices 11-15
    truth[8:11, 10:20, 20:24] = True  # slices 8-10 touch slice 11 only along an edge

    class Oracle(SlicePredictor):
        published_scheme = True

        def predict(self, volume, guide_index, guide_mask, query_indices):
            return SlicePrediction(truth[list(query_indices)].astype(np.float32), None)

    prompt = np.zeros(truth.shape, np.uint8)
    prompt[13] = truth[13]
    result = propagate(truth.astype(np.float32), prompt, (5.0, 1.0, 1.0), Oracle())
    assert result.slice_range == {1: (11, 15)}
    assert any(s["direction"] == -1 and s["last"] == 8 for s in result.stops[1])  # where the walk ended
    ends = {row["slice"]: row for row in result.slice_table() if row["walk_end"]}
    assert sorted(ends) == [11, 15] and all(row["voxels"] > 0 for row in ends.values())


def test_a_state_dict_with_an_extra_number_names_that_entry(tmp_path):
    """A review (s29): a state dict with `epoch` added was refused as "holds no state dict",
    listing six weight names and never the entry that was wrong."""
    import pytest
    import torch

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    sd = {f"layer{i}.weight": torch.zeros(2, 2) for i in range(4)}
    torch.save({**sd, "epoch": 5}, tmp_path / "with_epoch.pth")
    with pytest.raises(CheckpointError, match=r"holds weights and 1 entry that is not a tensor: 'epoch' \(int\); "
                                              r"save the weights alone"):
        load_checkpoint_file(tmp_path / "with_epoch.pth")


def ndimage_erode(mask):
    """The border pixels of ``mask`` (removing them redraws it a pixel smaller)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def test_a_drawn_slice_corrected_in_one_round_does_not_block_the_next():
    """A review (s29): after a round that corrected the drawn slice itself, every later round with
    the same prompt was refused ("the earlier result is not a result of this prompt: on slice 12
    ... differs from the drawing"), on the CLI, in Python and in batch. The record of that round
    names the slice among its keyframes (or walls, if erased): it holds the correction."""
    import pytest
    from test_edits import first_run

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import _drawing_digest, keyframes_from_edits

    one, _, prompt, previous = first_run()
    round2 = previous.copy()
    half = (round2[12] == 1) & (np.arange(round2.shape[2])[None, :] < np.flatnonzero(one[12].any(0)).mean())
    round2[12][half] = 0  # the drawn slice corrected: its left half erased
    plan2 = keyframes_from_edits(prompt, previous, round2)
    assert plan2.edited[1] == [12] and plan2.record()["1"] == {
        "keyframes": [12], "walls": [], "corrected": [12], "drawn_sha256": {"12": _drawing_digest(prompt[12] == 1)}}
    round3 = round2.copy()
    round3[16][round3[16] == 1] = 0  # the next round: label 1 erased on slice 16
    plan3 = keyframes_from_edits(prompt, round2, round3, earlier=plan2.record())
    np.testing.assert_array_equal(plan3.prompt[12] == 1, round2[12] == 1)  # the correction stays a keyframe
    # the prompt redrawn on that corrected slice since is not the one the rounds ran with (a second
    # re-review, s29: any drawing there passed, replaced by the old correction)
    smaller = prompt.copy()
    smaller[12][ndimage_erode(prompt[12] == 1)] = 0
    with pytest.raises(InputError, match="label 1's drawing on slice 12 .* is not the one the earlier rounds were "
                                         "run with"):
        keyframes_from_edits(smaller, round2, round3, earlier=plan2.record())
    assert plan3.edited[1] == [16] and plan3.empty_slices[1] == [16]
    assert plan3.corrected == {1: [12]}
    assert plan3.describe()[0] == "label 1: keyframes 12 (earlier rounds); the object is absent on 16"
    # erased altogether on its drawn slice in round 2: a wall there, and round 3 still runs
    gone = previous.copy()
    gone[12][gone[12] == 1] = 0
    gone[16][(gone[16] == 1) & half] = 0  # and corrected on slice 16, which becomes a keyframe
    plan2 = keyframes_from_edits(prompt, previous, gone)
    assert {k: v for k, v in plan2.record()["1"].items() if k != "drawn_sha256"} == {
        "keyframes": [16], "walls": [12], "corrected": [12]}
    again = gone.copy()
    again[18][again[18] == 1] = 0
    plan3 = keyframes_from_edits(prompt, gone, again, earlier=plan2.record())
    assert 12 in plan3.empty_slices[1] and 18 in plan3.empty_slices[1]
    # without a record naming the slice, an earlier result that differs on a drawn slice is refused
    with pytest.raises(InputError, match="is not a result of this prompt: on slice 12"):
        keyframes_from_edits(prompt, round2, round3)
    # A prompt redrawn on its slice is not a correction (a re-review, s29: every drawn slice is among
    # a record's keyframes, so the first fix took any redrawing for one and kept the old drawing):
    # only the slices a round corrected are let through
    redrawn = prompt.copy()
    redrawn[12][half] = 0  # the same slice, drawn smaller
    first_round = {"1": {"keyframes": [12], "walls": []}, "2": {"keyframes": [8], "walls": []}}
    with pytest.raises(InputError, match="is not a result of this prompt: on slice 12"):
        keyframes_from_edits(redrawn, previous, round2, earlier=first_round)
    from PAMSegmentLib.propagate import PropagationResult

    as_result = PropagationResult(mask=previous, axis=0, confidence={}, slice_range={}, prompt_slices={},
                                  keyframes={1: {12: prompt[12] == 1}, 2: {8: prompt[8] == 2}})
    with pytest.raises(InputError, match=r"on slice 12 .*pass that round's plan.record\(\) as earlier="):
        keyframes_from_edits(redrawn, as_result, round2)


def test_an_update_with_a_label_subset_says_what_it_leaves_out(ct_case, capsys):
    """A review (s29): an update with --label 1 of a two-label result wrote label 1 only, the other
    label gone without a word."""
    from conftest import write_image
    from test_edits import _update

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    prompt = ct_case.prompt.copy()
    prompt[10, 30:34, 6:10] = 2  # a second label drawn on the same slice, in the body beside the object
    write_image(prompt, ct_case.prompt_path, ct_case.spacing)
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy"]) == 0
    previous = read_volume(first).array
    assert (previous == 2).any()
    edited = previous.copy()
    edited[13][edited[13] == 1] = 0
    edited[13][ct_case.truth[13]] = 1
    edited[12][edited[12] == 1] = 0  # label 1 corrected: erased on slice 12
    edited_path = write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, edited_path, d / "second.nii.gz", "--label", "1") == 0
    out = capsys.readouterr().out
    assert ("note: label 2 of first.nii.gz is not among the labels chosen (--label): left out of the result; leave "
            "out --label to keep it (labels you did not edit are reused, not predicted again)") in out
    assert not (read_volume(d / "second.nii.gz").array == 2).any()
    assert _update(ct_case, first, edited_path, d / "third.nii.gz") == 0  # all labels: both kept
    assert (read_volume(d / "third.nii.gz").array == 2).any()


def test_a_result_corrected_in_place_gets_advice_that_works(ct_case, capsys):
    """A review (s29): OUT corrected in place and saved under a second name too was told to delete
    its record, which only led to "nothing to update". It is said what happened and what to run."""
    from conftest import write_image
    from test_edits import _first_run, _update

    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    first = _first_run(ct_case)
    corrected = read_volume(first).array
    assert corrected[13].any()
    corrected[13] = 0  # erased
    write_image(corrected.astype(np.uint8), first, ct_case.spacing)  # in place
    copy = write_image(corrected.astype(np.uint8), d / "copy.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, copy, d / "second.nii.gz") == 2
    err = capsys.readouterr().err
    assert ("--previous has changed since its record was written, and --edited is the same label map: it looks like "
            "first.nii.gz was corrected in place. Run the earlier command again with another -o") in err


def test_an_update_keeps_the_range_of_the_run_it_corrects(ct_case, capsys):
    """A review (s29): round 1 ran with --range; round 2 without it recomputed every label over the
    whole volume (unedited labels grew past the range, without a word). The record's range carries
    over as its axis does, said in an update line; --range still changes it."""
    from test_edits import _update

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy", "--range", "8:12"]) == 0
    previous = read_volume(first).array
    assert [k for k in range(previous.shape[0]) if previous[k].any()] == [8, 9, 10, 11, 12]
    edited = previous.copy()
    edited[11][edited[11] == 1] = 0
    edited[11][ct_case.truth[11]] = 1
    edited[11][15:18, 15:18] = 0  # label 1 corrected on slice 11
    edited_path = ct_case.directory / "edited.nii.gz"
    from conftest import write_image

    write_image(edited.astype(np.uint8), edited_path, ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, edited_path, d / "second.nii.gz") == 0
    out = capsys.readouterr().out
    assert ("update: within slices 8-12 along axis 0, as the run that made first.nii.gz (--range 8:12, from its "
            "record; give --range to change it)") in out
    second = read_volume(d / "second.nii.gz").array
    assert [k for k in range(second.shape[0]) if second[k].any()] == [8, 9, 10, 11, 12]
    np.testing.assert_array_equal(second[11], edited[11])
    assert _update(ct_case, first, edited_path, d / "third.nii.gz", "--range", "0:19") == 0  # widened on purpose
    third = read_volume(d / "third.nii.gz").array
    assert any(third[k].any() for k in (5, 6, 7, 13, 14, 15))
    edited[14][ct_case.truth[14]] = 1  # an edit outside the recorded range
    write_image(edited.astype(np.uint8), edited_path, ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, edited_path, d / "fourth.nii.gz") == 2
    assert ("label 1 was edited on slice 14, outside the range 8:12 the run that made first.nii.gz was limited to "
            "(its record says so): give --range to widen it") in capsys.readouterr().err
    edited[14] = previous[14]  # (that edit undone) an --empty-slices outside the recorded range: said so too
    write_image(edited.astype(np.uint8), edited_path, ct_case.spacing)
    assert _update(ct_case, first, edited_path, d / "fourth.nii.gz", "--empty-slices", "14") == 2
    assert ("empty slice 14 lies outside slices 8-12, the range the run that made first.nii.gz was limited to (its "
            "record says so): give --range to widen it") in capsys.readouterr().err


def test_an_empty_background_mask_counts_as_none():
    """A review (s29): an all-zero --background mask (a layer saved before anything was drawn on
    it) turned off the background learnt from pixels unlike the examples: F1 0.99 -> 0.67 on the
    H&E-like image, 73 % of it labelled as cells."""
    from test_cells import he_like_image

    from PAMSegmentLib.cells import label_cells, match_instances

    image, gt = he_like_image()
    picked = [int(v) for v in np.unique(gt)[1:6]]
    examples = np.where(np.isin(gt, picked), gt, 0)
    result = label_cells(image, examples, background=np.zeros(gt.shape, np.uint8))
    assert match_instances(result.labels, gt, exclude=picked)["f1"] > 0.95
    assert result.warnings == ["the background mask marks no pixels, so it was taken as no background marks; mark "
                               "some background in it (or leave it out)"]


def test_a_16_bit_grey_alpha_png_is_named_not_called_damaged(tmp_path):
    """A review (s29): a valid 16-bit grey + alpha PNG (Pillow opens it as 8-bit RGBA, ITK not at
    all) was refused by label-images and label-cells as "is the file damaged?"."""
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d

    grey = (np.arange(64 * 64).reshape(64, 64) % 4000 + 100).astype(np.uint16)
    path = tmp_path / "la16.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.dstack([grey, np.full_like(grey, 65535)]), isVector=True), str(path))
    head = path.read_bytes()[:26]
    assert (head[24], head[25]) == (16, 4)  # bit depth 16, grey + alpha
    with pytest.raises(InputError, match=r"la16.png is a 16-bit grey PNG with an alpha channel, which cannot be read "
                                         r"here at its full depth: save it without the alpha channel"):
        read_image_2d(path)
    eight = tmp_path / "la8.png"  # 8-bit grey + alpha is read as before: its grey channel
    grey8 = (grey % 256).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(np.dstack([grey8] * 2), isVector=True), str(eight))
    np.testing.assert_array_equal(read_image_2d(eight)[0], grey8)


def test_an_overlapped_label_is_reused_and_its_record_is_checked():
    """A review (s29): a label that lost voxels to another where they overlapped was never reused by
    an update (the merged map does not hold its own mask): on the demo CT, correcting the spleen
    predicted all 29 liver slices again (48 slices; 19 now, the same result). The voxels it lost
    travel in the record as runs; a record whose runs are damaged or point at the label's own
    voxels is refused."""
    import json

    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import PropagationResult, _index_runs
    from test_engine import TwoOracles

    one, two = tube(4, 20), tube(14, 26, center=(8, 11))
    prompt = prompt_from(one, 8)
    prompt[prompt_from(two, 18) > 0] = 2
    image = image_for(one | two)
    first = propagate(image, prompt, ISO, TwoOracles([one, two]))
    assert first.overlapped == {1, 2} and set(first.lost_voxels) == {1, 2}
    assert _index_runs([3, 4, 5, 9, 11, 12]) == [[3, 3], [9, 1], [11, 2]]
    record = json.loads(json.dumps(first.to_record()))
    rebuilt = PropagationResult.from_record(first.mask, record)
    for lab in (1, 2):
        np.testing.assert_array_equal(rebuilt.lost_voxels[lab], first.lost_voxels[lab])
    # label 2 edited above its drawn slice (a keyframe at 24): label 1's walks are reused as they were
    edited = prompt.copy()
    edited[24][two[24]] = 2
    update = propagate(image, edited, ISO, TwoOracles([one, two]), previous=rebuilt)
    fresh = propagate(image, edited, ISO, TwoOracles([one, two]))
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.recomputed[1] == [] and update.n_predicted < fresh.n_predicted
    runs = record["labels"]["2"]["lost_voxels"]
    for bad, why in ((runs[::-1] if len(runs) > 1 else [[runs[0][0], 0]], "not ascending runs"),
                     ([[first.mask.size - 1, 2]], "not ascending runs within the label map"),
                     ([[int(np.flatnonzero(np.moveaxis(first.mask, first.axis, 0) == 2)[0]), 1]],
                      "not all held by another label"),
                     ("1,2", "not runs of")):
        damaged = json.loads(json.dumps(record))
        damaged["labels"]["2"]["lost_voxels"] = bad
        with pytest.raises(InputError, match=why):
            PropagationResult.from_record(first.mask, damaged)


def test_keep_connected_keeps_the_components_touching_the_seeds():
    """_keep_connected now takes its box from projections and keeps components through a lookup
    table (a review, s29: np.nonzero and np.isin set the run's memory peak on large organs); the same
    components as cc3d's labels filtered by np.isin, on 100 random masks at both connectivities."""
    import cc3d

    from PAMSegmentLib.propagate import _keep_connected

    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((10, 16, 18)) < rng.uniform(0.05, 0.5)
        mask[:, :, :2] = False  # a box smaller than the volume
        seeds = np.zeros_like(mask)
        seeds[rng.integers(0, 10), rng.integers(0, 16):, :rng.integers(1, 18)] = True
        for connectivity in (6, 26):
            labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity)
            ids = np.unique(labels[seeds & mask])
            expected = np.isin(labels, ids[ids != 0])
            np.testing.assert_array_equal(_keep_connected(mask.copy(), seeds, connectivity), expected)
    assert not _keep_connected(np.zeros((3, 4, 5), bool), np.ones((3, 4, 5), bool)).any()


def test_a_png_cut_inside_its_header_is_called_damaged(tmp_path):
    """A re-review (s29): the 16-bit grey + alpha check read header bytes 24-25 of a PNG cut before
    them (IndexError, a traceback and exit 1; before it, "is the file damaged?", exit 2)."""
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d

    whole = tmp_path / "whole.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.uint16)), str(whole))
    for n in (16, 20, 24, 25):
        cut = tmp_path / f"cut{n}.png"
        cut.write_bytes(whole.read_bytes()[:n])
        with pytest.raises(InputError, match="damaged"):
            read_image_2d(cut)


def test_names_that_differ_only_by_unicode_folding_are_not_refused(tmp_path, run_cli):
    """A re-review (s29): casefold() folded "ß" to "ss", so Straße.png and Strasse.png (two files on
    every file system) were refused as sharing a mask name."""
    from test_imageset import _write_set, moving_disc_set

    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Straße.png").write_bytes((tmp_path / "set" / "img_1.png").read_bytes())
    (tmp_path / "b" / "Strasse.png").write_bytes((tmp_path / "set" / "img_1.png").read_bytes())
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "b",
                   "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "out").glob("Stra*")} == {"Straße_mask.png", "Strasse_mask.png"}


def test_a_stray_entry_inside_model_state_dict_gets_advice_that_runs(tmp_path):
    """A re-review (s29): the advice said del obj[NAME] for an entry inside 'model_state_dict'."""
    import pytest
    import torch

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    sd = {f"layer{i}.weight": torch.zeros(2, 2) for i in range(4)}
    torch.save({"model_state_dict": {**sd, "step": 7}, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match=r"'step' \(int\); save the weights alone once in Python \(sd = "
                                              r"torch.load\(FILE, weights_only=True\)\['model_state_dict'\], then "
                                              r"del sd\[NAME\]"):
        load_checkpoint_file(tmp_path / "nested.pth")


def test_a_batch_row_edited_outside_the_recorded_range_gets_advice_it_can_follow(ct_case, capsys):
    """A re-review (s29): a batch row whose earlier run had --range, edited outside it, was told to
    "give --range", which batch does not have."""
    from conftest import write_image

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy", "--range", "8:12"]) == 0
    edited = read_volume(first).array
    edited[14][ct_case.truth[14]] = 1
    write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    (d / "cases.csv").write_text("image,prompt,previous,edited,output\n"
                                 f"{ct_case.image_path},{ct_case.prompt_path},{first},{d / 'edited.nii.gz'},"
                                 f"{d / 'second.nii.gz'}\n")
    capsys.readouterr()
    assert cli.main(["batch", str(d / "cases.csv"), "-o", str(d / "out"), "--method", "copy"]) != 0
    said = capsys.readouterr()
    assert ("outside the range 8:12 the run that made first.nii.gz was limited to (its record says so): run that "
            "case with pamsegment propagate and a wider --range") in said.out + said.err


def test_an_update_keeps_the_label_order_of_the_run_it_corrects(ct_case, capsys):
    """A re-review (s29): a first run with --label 2 1 (label 2 keeps the voxels where they overlap),
    then an update without --label, ran them in ascending order: unedited slices changed owner
    without a word. The record's order carries over, said in an update line."""
    from conftest import write_image
    from test_edits import _update

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    prompt = ct_case.prompt.copy()
    prompt[12][np.roll(ct_case.truth[12], 4, axis=1) & ~ct_case.truth[12]] = 2  # beside label 1, overlapping its walk
    write_image(prompt, ct_case.prompt_path, ct_case.spacing)
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy", "--label", "2", "1"]) == 0
    previous = read_volume(first).array
    edited = previous.copy()
    edited[6][edited[6] == 1] = 0  # label 1 erased on slice 6
    write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, d / "edited.nii.gz", d / "second.nii.gz") == 0
    assert ("update: labels in the order 2, 1, as the run that made first.nii.gz (--label 2 1, from its record: "
            "where labels overlap, earlier ones keep the voxels; give --label to change it)") in capsys.readouterr().out
    assert _update(ct_case, first, d / "edited.nii.gz", d / "explicit.nii.gz", "--label", "2", "1") == 0
    second, explicit = read_volume(d / "second.nii.gz").array, read_volume(d / "explicit.nii.gz").array
    np.testing.assert_array_equal(second, explicit)
    # above the wall nothing changes (below it label 1 is gone: the wall ends its walk there)
    np.testing.assert_array_equal(second[7:], previous[7:])
    assert not (second[:7] == 1).any()


def test_the_record_keeps_lost_voxels_of_all_labels_within_a_bound(monkeypatch):
    """A re-review's suspicion (s29): up to 100,000 runs per label, with many labels, could make a
    record over the 64 MB the reader accepts, blocking the next update. All labels together keep at
    most MAX_LOST_RUNS_ALL runs; a label past it goes without (an update then recomputes it)."""
    from PAMSegmentLib import propagate as engine

    result = engine.PropagationResult(mask=np.zeros((4, 4, 4), np.uint8), axis=0,
                                      confidence={1: np.zeros(4), 2: np.zeros(4)}, slice_range={}, prompt_slices={},
                                      overlapped=frozenset({1, 2}), range=(0, 3),
                                      lost_voxels={1: np.array([0, 2]), 2: np.array([5])})
    monkeypatch.setattr(engine, "MAX_LOST_RUNS_ALL", 2)
    labels = result.to_record()["labels"]
    assert labels["1"]["lost_voxels"] == [[0, 1], [2, 1]] and "lost_voxels" not in labels["2"]


def test_an_overlapped_label_is_reused_along_every_axis():
    """A re-review (s29): the reused label's own mask was rebuilt with reshape(-1), which copies a
    view along axis 1 or 2, so the voxels it had lost were not put back: a label walled off another
    left them empty (156 voxels off a fresh run). Along every axis, in memory and through a record."""
    import json

    from test_engine import TwoOracles

    from PAMSegmentLib.propagate import PropagationResult

    one, two = tube(4, 20), tube(14, 26, center=(8, 11))
    prompt = prompt_from(one, 8)
    prompt[prompt_from(two, 18) > 0] = 2
    image = image_for(one | two)
    for axis in (0, 1, 2):
        def stored(a, axis=axis):  # the same volume stored with the walk along ``axis``
            return np.moveaxis(a, 0, axis)

        first = propagate(stored(image), stored(prompt), ISO, TwoOracles([one, two]), axis=axis)
        rebuilt = PropagationResult.from_record(np.ascontiguousarray(first.mask),
                                                json.loads(json.dumps(first.to_record())))
        fresh = propagate(stored(image), stored(prompt), ISO, TwoOracles([one, two]), axis=axis,
                          empty_slices={1: [12]})
        for previous in (first, rebuilt):
            update = propagate(stored(image), stored(prompt), ISO, TwoOracles([one, two]), axis=axis,
                               empty_slices={1: [12]}, previous=previous)
            np.testing.assert_array_equal(update.mask, fresh.mask)
            assert update.recomputed[2] == []


def test_the_range_carries_over_without_a_reusable_part_and_bad_values_are_refused(ct_case, capsys):
    """A second re-review (s29): the range came only from the record's reusable part, which a
    server's result does not have ("result": null), so an update of a --server --range run grew past
    it; and a hand-edited label_order that made no sense was ignored without a word."""
    import json

    from conftest import write_image
    from test_edits import _update

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy", "--range", "8:12"]) == 0
    record_path = d / "first.nii.gz.keyframes.json"
    record = json.loads(record_path.read_text())
    assert record["range"] == [8, 12] and record["label_order"] == [1]
    record["result"] = None  # as a server's result writes it
    record.pop("labels_sha256")  # as a record written before session 38 (its digest refuses any edit of labels)
    record_path.write_text(json.dumps(record))
    edited = read_volume(first).array
    edited[11][edited[11] == 1] = 0
    edited[11][ct_case.truth[11]] = 1
    edited[11][15:18, 15:18] = 0
    write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, d / "edited.nii.gz", d / "second.nii.gz") == 0
    assert "update: within slices 8-12 along axis 0" in capsys.readouterr().out
    second = read_volume(d / "second.nii.gz").array
    assert [k for k in range(second.shape[0]) if second[k].any()] == [8, 9, 10, 11, 12]
    for bad in ([2, 2], [1.0], "1", [0]):
        record["label_order"] = bad
        record_path.write_text(json.dumps(record))
        assert _update(ct_case, first, d / "edited.nii.gz", d / "third.nii.gz") == 2
        assert "cannot be read (its label_order is not distinct labels from 1 to 65535)" in capsys.readouterr().err
    record["label_order"] = [1]
    for bad in (None, {"\u00b9\u2074": "abc"}):  # (re-reviews, s29: "earlier's label" with no way out; a traceback)
        record["labels"]["1"]["drawn_sha256"] = bad
        record_path.write_text(json.dumps(record))
        assert _update(ct_case, first, d / "edited.nii.gz", d / "third.nii.gz") == 2
        assert "cannot be read (ValueError: label '1' is malformed); delete it" in capsys.readouterr().err


def _enhanced_ct(path, frames, zs, sop="1.2.840.10008.5.1.4.1.1.2.1", groups=True, turned=(),
                 orientation=(1, 0, 0, 0, 1, 0), series_uid=None):
    """A multi-frame (enhanced CT) DICOM file written with pydicom: frames at z positions ``zs``
    (``groups=False``: no functional groups, as an NM file; ``turned``: frames whose own
    orientation is rotated 90 degrees in plane)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), series_uid or generate_uid(), 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    orient, measures, shared = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(orientation)
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], 2
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    per = []
    for i, z in enumerate(zs):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [-10.0, -20.0, float(z)]
        item.PlanePositionSequence = Sequence([position])
        if i in turned:
            own = Dataset()
            own.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]
            item.PlaneOrientationSequence = Sequence([own])
        per.append(item)
    if groups:
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    else:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.0, -20.0, 0.0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SpacingBetweenSlices = [0.8, 0.8], 2.0
    ds.PixelData = frames.astype("<i2").tobytes()
    from conftest import save_dicom_file

    save_dicom_file(ds, str(path))


def test_multi_frame_dicom_is_read_only_where_its_frames_agree_with_the_grid(tmp_path):
    """A review (s29): ITK stacks a multi-frame DICOM's frames in stored order on a grid from the
    first ones: frames 10 mm apart half-way were read 1 x 1 x 1 mm (frame 15 25 mm off) and two
    phases at the same positions 2 mm apart, exit 0; a folder holding one such file crashed
    (a 4D image). Frames are checked with pydicom now."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    frames = (np.arange(12 * 16 * 20).reshape(12, 16, 20) % 300).astype(np.int16)
    _enhanced_ct(tmp_path / "even.dcm", frames, [2.0 * k for k in range(12)])
    volume = read_volume(tmp_path / "even.dcm")
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.8)) and volume.origin == pytest.approx((-10, -20, 0))
    np.testing.assert_array_equal(volume.array, frames)
    (tmp_path / "folder").mkdir()
    _enhanced_ct(tmp_path / "folder" / "only.dcm", frames, [2.0 * k for k in range(12)])
    assert read_volume(tmp_path / "folder").spacing == pytest.approx((2.0, 0.8, 0.8))
    _enhanced_ct(tmp_path / "uneven.dcm", frames, [2.0 * k + (6 if k >= 6 else 0) for k in range(12)])
    with pytest.raises(InputError, match="uneven.dcm is not evenly spaced"):
        read_volume(tmp_path / "uneven.dcm")
    _enhanced_ct(tmp_path / "repeat.dcm", frames, [2.0 * (k % 6) for k in range(12)])
    with pytest.raises(InputError, match="repeat.dcm is a multi-frame DICOM file whose frames are not stored in "
                                         "order of position, or repeat positions"):
        read_volume(tmp_path / "repeat.dcm")
    # a re-review (s29): one frame turned was read on the first frame's grid; an NM-style file
    # without functional groups (its geometry elsewhere) was refused, though GDCM reads it right
    _enhanced_ct(tmp_path / "turned.dcm", frames, [2.0 * k for k in range(12)], turned=(4,))
    with pytest.raises(InputError, match="turned.dcm is a multi-frame DICOM file whose frame 4 has another "
                                         "orientation than the grid it is read on"):
        read_volume(tmp_path / "turned.dcm")
    _enhanced_ct(tmp_path / "nm.dcm", frames, [2.0 * k for k in range(12)], sop="1.2.840.10008.5.1.4.1.1.20",
                 groups=False)
    assert read_volume(tmp_path / "nm.dcm").array.shape == frames.shape
    # an oblique file whose header rounds its orientation to 2 decimals (a third re-review: frame 0
    # was called "another orientation than the grid", the grid being its own)
    _enhanced_ct(tmp_path / "oblique.dcm", frames, [0.0] * 12, orientation=(0.96, 0.29, 0.0, -0.29, 0.94, 0.19))
    frames_at = [[-10.0 + k * 0.0, -20.0, 0.0] for k in range(12)]  # (positions set below along the normal)
    import pydicom

    ds = pydicom.dcmread(str(tmp_path / "oblique.dcm"))
    row, col = np.array([0.96, 0.29, 0.0]), np.array([-0.29, 0.94, 0.19])
    normal = np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlanePositionSequence[0].ImagePositionPatient = [round(float(v), 4) for v in
                                                              np.array(frames_at[k]) + 2.0 * k * normal]
    ds.save_as(str(tmp_path / "oblique.dcm"))
    assert read_volume(tmp_path / "oblique.dcm").spacing[0] == pytest.approx(2.0, abs=0.01)


def test_a_dicom_seg_or_rt_structure_set_is_named(tmp_path):
    """A review (s29): a DICOM SEG given as the prompt had all its segments read as one label 255
    (exit 0 with two segments on adjacent slices); an RT structure set got "cannot determine ImageIO
    reader". Both are named, with how to convert them, as a file and as a folder."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap

    frames = np.zeros((2, 16, 20), np.int16)
    _enhanced_ct(tmp_path / "seg.dcm", frames, [0.0, 2.0], sop="1.2.840.10008.5.1.4.1.1.66.4")
    with pytest.raises(InputError, match=r"seg.dcm is a DICOM SEG \(segmentation object\), which PAMSegment does "
                                         r"not read: load it in 3D Slicer"):
        read_labelmap(tmp_path / "seg.dcm")
    (tmp_path / "rt").mkdir()
    _enhanced_ct(tmp_path / "rt" / "rt.dcm", frames, [0.0, 2.0], sop="1.2.840.10008.5.1.4.1.1.481.3")
    with pytest.raises(InputError, match=r"rt.dcm is a DICOM RT structure set \(contours\)"):
        read_labelmap(tmp_path / "rt")
    # a folder holding a SEG: GDCM lists it as a series of images (a re-review, s29: read as label 255)
    (tmp_path / "segfolder").mkdir()
    _enhanced_ct(tmp_path / "segfolder" / "seg.dcm", frames, [0.0, 2.0], sop="1.2.840.10008.5.1.4.1.1.66.4")
    with pytest.raises(InputError, match=r"seg.dcm is a DICOM SEG"):
        read_labelmap(tmp_path / "segfolder")
    # beside an image series of as many files it is not the one chosen (a third re-review: chosen by
    # GDCM's order, then refused); and the header pre-check leaves it to the full read, so batch's
    # pre-flight does not stop every row for one
    from PAMSegmentLib.volumes import _grid_from_header, read_volume

    _enhanced_ct(tmp_path / "segfolder" / "ct.dcm", np.ones((2, 16, 20), np.int16), [0.0, 2.0])
    with pytest.warns(UserWarning, match="holds 2 DICOM series; using .* the largest"):
        assert read_volume(tmp_path / "segfolder").array.min() == 1
    assert _grid_from_header(tmp_path / "seg.dcm") is None


def test_a_negative_nifti_pixdim_is_one_grid_for_the_header_and_the_full_read(tmp_path):
    """A review (s29): with pixdim[1] < 0 the header read gave spacing -0.8 along +x and the full
    read +0.8 along -x, the same grid, compared field by field: a prompt saved on the image's own
    grid was refused ("spacing, direction differ"). Also noted: FSL and nibabel ignore the sign."""
    import struct
    import warnings

    import SimpleITK as sitk

    from PAMSegmentLib.volumes import _grid_from_header, read_volume, same_grid

    image = sitk.GetImageFromArray((np.arange(12 * 16 * 20).reshape(12, 16, 20) % 300).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    header = bytearray((tmp_path / "plain.nii").read_bytes())
    struct.pack_into("<h", header, 254, 0)  # no sform: the qform and pixdim decide
    struct.pack_into("<f", header, 80, -0.8)  # pixdim[1] negative
    (tmp_path / "negative.nii").write_bytes(bytes(header))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = read_volume(tmp_path / "negative.nii")
    assert full.spacing[2] > 0 and same_grid(_grid_from_header(tmp_path / "negative.nii"), full) == []
    assert any("negative voxel size (pixdim[1] = -0.8)" in str(w.message) for w in caught)


def test_label_keys_of_non_ascii_digits_are_refused():
    """A fourth re-review (s29): earlier={"¹": ...} raised a bare ValueError from int(), and "١"
    (Arabic-Indic one) was taken as label 1."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import _earlier_record

    for key in ("\u00b9", "\u0661"):
        with pytest.raises(InputError, match="keys are label numbers"):
            _earlier_record({key: {"keyframes": [1], "walls": []}})


def test_the_header_pre_check_compares_the_image_series_not_a_larger_seg(tmp_path):
    """A fourth re-review (s29): the header pre-check chose the largest series counting a DICOM SEG
    series, returned no grid, and a prompt of another grid passed batch's upfront check."""
    from test_volumes import IDENTITY, make_volume, write_dicom_series

    from PAMSegmentLib.volumes import _grid_from_dicom_headers, same_grid

    vol = make_volume(shape=(4, 5, 6), spacing=(2.0, 0.9, 0.7), direction=IDENTITY)
    write_dicom_series(tmp_path / "case", vol, "1.2.826.0.1.3680043.2.1125.7.21")
    for n in range(5):  # a SEG series of more files than the image series
        _enhanced_ct(tmp_path / "case" / f"seg{n}.dcm", np.zeros((1, 16, 20), np.int16), [2.0 * n],
                     sop="1.2.840.10008.5.1.4.1.1.66.4", series_uid="1.2.826.0.1.3680043.2.1125.7.22")
    grid = _grid_from_dicom_headers(tmp_path / "case")
    assert grid is not None and same_grid(grid, vol) == []


def test_an_update_reports_how_the_walks_it_reused_ended():
    """A review with the shipped network (s29): every update was voxel-identical to a fresh run, but
    the walks it reused had no ending: the report's walk_end was blank there and their drift notes
    were gone. Their endings now come from the earlier result (and its record), cut at a new wall
    as a fresh run's would be."""
    import json

    from test_engine import OracleModel

    from PAMSegmentLib.propagate import PropagationResult

    truth = tube(3, 25)
    image = image_for(truth)

    def ends(result):
        return sorted((s["start"], s["direction"], s["last"], s["reason"]) for s in result.stops[1])

    first = propagate(image, prompt_from(truth, 12), ISO, OracleModel(truth, window=4))
    rebuilt = PropagationResult.from_record(first.mask, json.loads(json.dumps(first.to_record())))
    assert ends(rebuilt) == ends(first)
    for previous in (first, rebuilt):
        for edit in ({"prompt": prompt_from(truth, [12, 20])},  # a keyframe above: the walk down is reused
                     {"prompt": prompt_from(truth, 12), "empty_slices": {1: [8]}}):  # a wall cuts it
            update = propagate(image, edit["prompt"], ISO, OracleModel(truth, window=4), previous=previous,
                               empty_slices=edit.get("empty_slices"))
            fresh = propagate(image, edit["prompt"], ISO, OracleModel(truth, window=4),
                              empty_slices=edit.get("empty_slices"))
            assert update.n_predicted < fresh.n_predicted  # something was reused
            np.testing.assert_array_equal(update.mask, fresh.mask)
            assert ends(update) == ends(fresh)
            assert update.slice_table() == fresh.slice_table()


def test_label_images_says_which_labels_of_the_drawn_masks_label_leaves_out(tmp_path, run_cli):
    """A review (s29): with --label, the drawn masks (the prompt's and --labelled ones) were written
    without the other labels, without a word (propagate says so in a note)."""
    import SimpleITK as sitk
    from test_imageset import _write_set, moving_disc_set

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    mask = truth[0].astype(np.uint8) * 3
    mask[:4, :4] = 5  # a second label in a corner
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.png"))
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy", "--label", "3")
    assert proc.returncode == 0, proc.stderr
    assert ("note: label 5 of the drawn masks is not among --label: left out of every mask written, the drawn ones "
            "too; leave out --label to keep it") in proc.stdout
    refused = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                      "-o", tmp_path / "out2", "--method", "copy", "--label", "4")  # a label the prompt lacks
    assert refused.returncode == 2 and "note:" not in refused.stdout  # no note for a run that is refused


def test_label_images_says_not_reached_beyond_an_image_drawn_without_the_label(tmp_path, run_cli):
    """A review (s29): in the given order, images beyond a corrected image drawn without the label
    are never predicted, but were listed as "not found in" (the object is there: it was not looked for)."""
    import SimpleITK as sitk
    from test_imageset import _write_set, moving_disc_set

    images, truth = moving_disc_set(5)
    _write_set(tmp_path / "set", images, truth[3])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros_like(truth[1], np.uint8)), str(tmp_path / "empty.png"))
    proc = run_cli("label-images", tmp_path / "set" / "img_3.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy", "--order", "given",
                   "--labelled", tmp_path / "set" / "img_1.png", tmp_path / "empty.png")
    assert proc.returncode == 0, proc.stderr
    assert "label 3 not reached (beyond an image drawn without it): img_0.png" in proc.stdout
    assert "not found in: img_0.png" not in proc.stdout


class _AgreeingOracle:
    """The truth of each query slice, a network-registration agreement of 0.9 and a drift at one
    slice: the shipped checkpoint's keyframe agreement test (0.4) in small (a review, s29)."""

    def __new__(cls, truth, drift_at):
        from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor

        class Oracle(SlicePredictor):
            window_mm, max_window, min_window = 4.0, 4, 1
            keyframe_outward_min_agreement = 0.5

            def predict(self, volume, guide_index, guide_mask, query_indices):
                drift = np.array([0.0 if q == drift_at else 1.0 for q in query_indices], np.float32)
                return SlicePrediction(truth[list(query_indices)].astype(np.float32), None, drift=drift,
                                       agreement=np.full(len(query_indices), 0.9, np.float32))

        return Oracle()


def test_a_walk_reused_under_a_stricter_agreement_test_keeps_its_ending():
    """A final review (s29): a keyframe drawn further out reuses the first keyframe's outer walk
    under the stricter agreement test of several keyframes; where no slice falls below it, the walk
    is the same, but its ending (a drift stop right beside the drawn slice) was not repeated."""
    import json

    from PAMSegmentLib.propagate import PropagationResult

    truth = tube(3, 25)
    image = image_for(truth)
    first = propagate(image, prompt_from(truth, 12), ISO, _AgreeingOracle(truth, drift_at=11))
    for previous in (first, PropagationResult.from_record(first.mask, json.loads(json.dumps(first.to_record())))):
        update = propagate(image, prompt_from(truth, [12, 20]), ISO, _AgreeingOracle(truth, 11), previous=previous)
        fresh = propagate(image, prompt_from(truth, [12, 20]), ISO, _AgreeingOracle(truth, 11))
        assert update.n_predicted < fresh.n_predicted
        assert update.stops == fresh.stops and update.slice_table() == fresh.slice_table()
        assert update.notes() == fresh.notes() and any("drift test" in note for note in fresh.notes())


def test_a_record_stop_on_the_wrong_side_of_its_walk_is_refused():
    """A final review (s29): a stop recorded as ending on the other side of its start was accepted."""
    import json

    import pytest

    from test_engine import OracleModel

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import PropagationResult

    truth = tube(3, 25)
    first = propagate(image_for(truth), prompt_from(truth, 12), ISO, OracleModel(truth, window=4))
    record = json.loads(json.dumps(first.to_record()))
    down = next(s for s in record["labels"]["1"]["stops"] if s["direction"] == -1)
    down["last"] = 20
    with pytest.raises(InputError, match="stops are not walk endings"):
        PropagationResult.from_record(first.mask, record)
