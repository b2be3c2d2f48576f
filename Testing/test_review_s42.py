"""Session 42: a helper correcting results as a user would (command line and Python), finding what
an update accepted without a word: a corrected copy of another round's result, a cropped corrected
file, a file of the fixed slices alone, another image; and two messages."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import ellipsoid, write_image

from PAMSegmentLib import cli
from PAMSegmentLib.errors import InputError
from PAMSegmentLib.propagate import keyframes_from_edits
from PAMSegmentLib.volumes import read_volume

SHAPE = (24, 30, 32)


def _first():
    one = ellipsoid(SHAPE, (12, 12, 12), (9, 7, 7))
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[12][one[12]] = 1
    previous = np.zeros(SHAPE, np.uint8)
    previous[4:21][np.broadcast_to(one[12], (17,) + one[12].shape)] = 1  # the drawn slice copied on 4..20
    return one, prompt, previous


def test_a_file_of_the_fixed_slices_alone_is_refused():
    """The liver drawn on slice 15, an edited file holding only the fixed slice 20 (a "correction
    layer"): the drawn slice and every other slice became walls, a one-slice result, exit 0."""
    one, prompt, previous = _first()
    edited = np.zeros_like(previous)
    edited[16][one[16]] = 1
    with pytest.raises(InputError, match=r"holds label 1 on 1 of its keyframe slices but not on its drawn slice 12, "
                                         r"and not on 16 of the 17 slices the earlier result holds it on: give the "
                                         r"whole corrected result as the edited one"):
        keyframes_from_edits(prompt, previous, edited)
    # erasing a leak at an end, or one slice, is an edit as before
    fixed = previous.copy()
    fixed[17:21] = 0
    plan = keyframes_from_edits(prompt, previous, fixed)
    assert plan.empty_slices[1] == [17, 18, 19, 20] and plan.notes() == []


def test_slices_erased_between_two_keyframes_are_named():
    """A corrected copy of a later round's result given with an earlier round's: the slices the
    later round left empty became walls between keyframes, a hole in a vertebra, exit 0 and no word.
    A gap between two keyframes is now said (it may be meant: the plan is unchanged)."""
    one, prompt, previous = _first()
    edited = previous.copy()
    edited[6] = 0
    edited[6][one[6]] = 1  # slice 6 corrected: a keyframe
    edited[8] = 0  # erased between keyframes 6 and 12
    edited[9] = 0
    plan = keyframes_from_edits(prompt, previous, edited)
    assert plan.empty_slices[1] == [8, 9]
    assert plan.notes() == [
        "label 1: erased on slices 8, 9, between its keyframes 6 and 12: the object is absent there, a gap in the result; if "
        "you did not erase them, the corrected file is not a copy of the earlier result given (a later round's "
        "result, corrected?): give that round's result as the earlier one"]


def _round(ct_case, previous, edited, out, image=None):
    return cli.main(["propagate", str(image or ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--previous", str(previous), "--edited", str(edited)])


def _first_run(ct_case):
    first = ct_case.directory / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy"]) == 0
    return first


def test_the_command_line_says_a_gap_between_keyframes(ct_case, capsys):
    first = _first_run(ct_case)
    edited = read_volume(first).array.copy()
    edited[7] = ct_case.truth[7]
    edited[8] = 0
    write_image(edited.astype(np.uint8), ct_case.directory / "fixed.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _round(ct_case, first, ct_case.directory / "fixed.nii.gz", ct_case.directory / "second.nii.gz") == 0
    out = capsys.readouterr().out
    assert "note: label 1: erased on slice 8, between its keyframes 7 and 10: the object is absent there, a gap" in out, out


def test_an_update_on_another_image_says_why_everything_changed(ct_case, capsys):
    """The round corrected was made on image A, the update runs on image B of the same grid: every
    slice was listed as changed beside the edits without a word why."""
    first = _first_run(ct_case)
    other = ct_case.directory / "other.nii.gz"
    write_image((ct_case.image.astype(np.int32) + 60).astype(np.int16), other, ct_case.spacing)
    edited = read_volume(first).array.copy()
    edited[13] = ct_case.truth[13]
    write_image(edited.astype(np.uint8), ct_case.directory / "fixed.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _round(ct_case, first, ct_case.directory / "fixed.nii.gz", ct_case.directory / "b.nii.gz", other) == 0
    out = capsys.readouterr().out
    assert ("note: the round you corrected ran on another image (or voxel size) than this one: every slice was "
            "predicted again") in out, out
    capsys.readouterr()
    assert _round(ct_case, first, ct_case.directory / "fixed.nii.gz", ct_case.directory / "a.nii.gz") == 0
    assert "another image" not in capsys.readouterr().out  # the same image: no such note


def test_a_lost_record_is_named_when_a_corrected_drawn_slice_is_refused(ct_case, capsys):
    """Round 2 corrected the drawn slice; its output copied without its record: the refusal said the
    file is not a result of this prompt (it is), the "no record" note came after it, unseen."""
    first = _first_run(ct_case)
    edited = read_volume(first).array.copy()
    edited[10][:, :14] = 0  # the drawn slice itself corrected
    write_image(edited.astype(np.uint8), ct_case.directory / "fixed.nii.gz", ct_case.spacing)
    second = ct_case.directory / "second.nii.gz"
    assert _round(ct_case, first, ct_case.directory / "fixed.nii.gz", second) == 0
    copied = ct_case.directory / "copied.nii.gz"
    shutil.copy(second, copied)  # without its record
    again = read_volume(copied).array.copy()
    again[12] = ct_case.truth[12]
    write_image(again.astype(np.uint8), ct_case.directory / "fixed2.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _round(ct_case, copied, ct_case.directory / "fixed2.nii.gz", ct_case.directory / "third.nii.gz") == 2
    err = capsys.readouterr().err
    assert "is not a result of this prompt: on slice 10" in err
    assert ("copied.nii.gz has no record beside it: if an earlier round corrected that drawn slice, its record said "
            "so; put the record (copied.nii.gz.keyframes.json) beside it") in err, err


def test_a_cropped_corrected_seg_nrrd_says_what_it_takes_as_erased(ct_case, capsys):
    """A corrected .seg.nrrd cropped to slices 8-12 (by hand) as --edited: every slice beyond it
    became a wall, of every label, exit 0 and a note only of where it was placed. Slicer saves a
    segmentation cropped to what it holds (a part erased at an end falls outside), so the crop is
    taken as erased still, and said with what to do: in an update: line, as every Slicer correction
    erasing an end gets it (a re-review: a five-line note on the commonest correction)."""
    import SimpleITK as sitk

    first = _first_run(ct_case)
    edited = read_volume(first).array.copy()
    edited[9] = ct_case.truth[9]
    crop = sitk.GetImageFromArray(edited[8:13].astype(np.uint8))
    crop.SetSpacing(tuple(reversed(ct_case.spacing)))
    crop.SetOrigin((0.0, 0.0, 8 * ct_case.spacing[0]))
    reference = sitk.ReadImage(str(ct_case.image_path))
    crop.SetDirection(reference.GetDirection())
    crop.SetOrigin(reference.TransformIndexToPhysicalPoint((0, 0, 8)))
    sitk.WriteImage(crop, str(ct_case.directory / "fixed.seg.nrrd"))
    capsys.readouterr()
    assert _round(ct_case, first, ct_case.directory / "fixed.seg.nrrd", ct_case.directory / "second.nii.gz") == 0
    out = capsys.readouterr().out
    assert ("update: fixed.seg.nrrd covers part of the image: label 1 of first.nii.gz beyond it (slices 5-7, 13-15 "
            "along axis 0) taken as erased, as Slicer saves a segmentation cropped to what it holds (give a file you "
            "cropped yourself uncropped)") in out, out


def test_a_batch_row_s_notes_say_note_once(ct_case, run_cli):
    """A batch row's line read "note: note: previous has no record beside it" (plan_update's lines
    say "note:" themselves)."""
    first = _first_run(ct_case)
    copied = ct_case.directory / "copied.nii.gz"
    shutil.copy(first, copied)  # without its record
    edited = read_volume(first).array.copy()
    edited[13] = ct_case.truth[13]
    write_image(edited.astype(np.uint8), ct_case.directory / "fixed.nii.gz", ct_case.spacing)
    manifest = ct_case.directory / "cases.csv"
    manifest.write_text("image,prompt,previous,edited,output\n"
                        "image.nii.gz,prompt.nii.gz,copied.nii.gz,fixed.nii.gz,out.nii.gz\n")
    proc = run_cli("batch", manifest, "-o", ct_case.directory / "out", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    assert "): note: previous has no record beside it" in proc.stderr, proc.stderr
    assert "note: note:" not in proc.stderr


def test_a_smaller_corrected_file_resampled_says_what_it_takes_as_erased(ct_case, capsys):
    """The same with a cropped NIfTI given with --resample-prompt: resampled, its outside is 0."""
    import SimpleITK as sitk

    first = _first_run(ct_case)
    edited = read_volume(first).array.copy()
    edited[9] = ct_case.truth[9]
    reference = sitk.ReadImage(str(ct_case.image_path))
    crop = sitk.GetImageFromArray(edited[8:13].astype(np.uint8))
    crop.SetSpacing(reference.GetSpacing())
    crop.SetDirection(reference.GetDirection())
    crop.SetOrigin(reference.TransformIndexToPhysicalPoint((0, 0, 8)))
    sitk.WriteImage(crop, str(ct_case.directory / "fixed.nii.gz"))
    capsys.readouterr()
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o",
                     str(ct_case.directory / "second.nii.gz"), "--method", "copy", "--previous", str(first),
                     "--edited", str(ct_case.directory / "fixed.nii.gz"), "--resample-prompt"]) == 0
    out = capsys.readouterr().out
    assert ("update: fixed.nii.gz covers part of the image: label 1 of first.nii.gz beyond it (slices 5-7, 13-15 "
            "along axis 0) taken as erased") in out, out


def test_files_of_the_drawn_and_fixed_slices_are_refused_in_their_other_forms():
    """A second review: the refusal of a file of the fixed slices alone needed the drawn slice erased
    and most slices erased; a "keyframes file" (the drawn slice kept, slices 6 and 18 fixed, the rest
    erased) gave a three-slice result, and fixing half the slices without the drawn one emptied it."""
    one, prompt, previous = _first()
    keyframes_file = np.zeros_like(previous)
    keyframes_file[12] = previous[12]
    keyframes_file[6][one[6]] = 1
    keyframes_file[18][one[18]] = 1
    with pytest.raises(InputError, match=r"keeps none of the 16 slices the earlier result predicted label 1 on as they "
                                         r"were: it holds the label on slices 6, 12, 18 only and erases it on the 14 "
                                         r"others \(4, 5, 7-11, 13-17, 19, 20\)\. If it holds only the slices you "
                                         r"fixed, give the whole corrected result"):
        keyframes_from_edits(prompt, previous, keyframes_file)
    half = np.zeros_like(previous)
    for s in (*range(4, 12), 13):
        half[s][one[s]] = 1  # slices 4-11 and 13 fixed, the drawn slice 12 and 14-20 not given
    with pytest.raises(InputError, match=r"keeps none of the 16 slices"):
        keyframes_from_edits(prompt, previous, half)
    # a small result corrected on every predicted slice (none kept as it was, none erased): taken
    tiny_previous = np.zeros_like(previous)
    tiny_previous[10:15][np.broadcast_to(one[12], (5,) + one[12].shape)] = 1
    redone = tiny_previous.copy()
    for s in (10, 11, 13, 14):
        redone[s] = 0
        redone[s][one[s]] = 1
    assert sorted(keyframes_from_edits(prompt, tiny_previous, redone).edited[1]) == [10, 11, 13, 14]


def test_gaps_on_either_side_of_a_keyframe_are_named_pair_by_pair():
    one, prompt, previous = _first()
    edited = previous.copy()
    for s in (6, 18):
        edited[s] = 0
        edited[s][one[s]] = 1
    edited[[8, 9, 15, 16]] = 0
    plan = keyframes_from_edits(prompt, previous, edited)
    assert plan.notes() == [
        "label 1: erased on slices 8, 9, between its keyframes 6 and 12, and slices 15, 16, between its keyframes 12 "
        "and 18: the object is absent there, a gap in the result; if you did not erase them, the corrected file is not "
        "a copy of the earlier result given (a later round's result, corrected?): give that round's result as the "
        "earlier one"]


def test_a_whole_correction_of_a_small_object_trimming_every_slice_is_taken():
    """A third review: a small result (slices 12-18, drawn on 15) whose leak was erased at both ends
    and whose every other predicted slice was trimmed was refused as "a file of the fixed slices":
    erased ends are what a leak fix does; only slices erased between kept ones mark a file of fixes."""
    one, prompt, previous = _first()
    small = np.zeros_like(previous)
    small[9:16][np.broadcast_to(one[12], (7,) + one[12].shape)] = 1  # slices 9-15, drawn on 12
    fixed = small.copy()
    fixed[[9, 15]] = 0
    for s in (10, 11, 13, 14):
        fixed[s][:, :6] = 0  # a boundary column trimmed on each
    plan = keyframes_from_edits(prompt, small, fixed)
    assert plan.empty_slices[1] == [9, 15] and sorted(plan.edited[1]) == [9, 10, 11, 13, 14, 15]


def test_a_file_of_the_drawn_slice_and_fixes_beside_it_is_refused():
    """A fourth review: needing slices erased between kept ones let a file of the drawn slice and the
    slices fixed next to it through (a two-slice result, exit 0)."""
    one, prompt, previous = _first()
    beside = np.zeros_like(previous)
    beside[12] = previous[12]
    beside[13][one[13]] = 1
    with pytest.raises(InputError, match=r"keeps none of the 16 slices .* erases it on the 15 others"):
        keyframes_from_edits(prompt, previous, beside)


def test_a_running_batch_holds_its_manifest_so_its_inode_is_not_reused(tmp_path):
    """A CI run (session 42) failed once: while a run's claim was held, its manifest was re-saved (a
    new inode) and another manifest made then got the old inode, whose lock the run held: "another run
    of other.csv is writing". The run now keeps its manifest open, so a deleted manifest's inode stays
    taken until the run ends."""
    import os

    from PAMSegmentLib import batch

    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\na.nii.gz,b.nii.gz\n")
    out = tmp_path / "res"
    out.mkdir()
    claims = []
    batch._claim_the_report(out / "batch_report.csv", manifest, claims)
    try:
        held = [fd for fd, path in claims if path is None]
        assert len(held) == 1 and os.fstat(held[0]).st_ino == manifest.stat().st_ino
        manifest.unlink()
        assert os.fstat(held[0]).st_nlink == 0  # deleted, still held: its inode cannot be given to a new file
    finally:
        batch._release(claims)
    assert claims == [] and sorted(p.name for p in out.iterdir()) == []
    with pytest.raises(OSError):  # the manifest's descriptor closed with the claim
        os.fstat(held[0])
