"""The correction loop from files: ``keyframes_from_edits`` and ``pamsegment propagate --previous
PREV --edited EDITED`` (an earlier result, corrected by hand in another program)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ellipsoid, write_image

from PAMSegmentLib import cli
from PAMSegmentLib.errors import InputError
from PAMSegmentLib.propagate import MAX_PROMPT_SLICES, keyframes_from_edits
from PAMSegmentLib.volumes import read_volume

SHAPE = (24, 30, 32)


def first_run():
    """A prompt on slice 12 (label 1) and slice 8 (label 2), and a plausible earlier result."""
    one = ellipsoid(SHAPE, (12, 10, 10), (8, 6, 6))
    two = ellipsoid(SHAPE, (8, 22, 22), (4, 5, 5))
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[12][one[12]] = 1
    prompt[8][two[8]] = 2
    previous = np.zeros(SHAPE, np.uint8)
    previous[4:21] = np.where(one[12], 1, 0)  # label 1: the drawn slice copied on 4..20
    previous[5:12][np.broadcast_to(two[8], (7,) + two[8].shape)] = 2
    previous[12] = np.where(prompt[12] == 1, 1, previous[12])
    return one, two, prompt, previous


def test_edited_slices_become_keyframes_and_erased_ones_walls():
    one, two, prompt, previous = first_run()
    edited = previous.copy()
    edited[16][edited[16] == 1] = 0
    edited[16][one[16]] = 1  # label 1 redrawn on slice 16
    edited[19][edited[19] == 1] = 0  # and erased on 19: the object is absent there
    plan = keyframes_from_edits(prompt, previous, edited)
    assert plan.axis == 0 and plan.drawn == {1: [12], 2: [8]} and plan.edited == {1: [16, 19], 2: []}
    assert plan.empty_slices == {1: [19], 2: []} and plan.ignored == []
    on_slices = {lab: [s for s in range(SHAPE[0]) if (plan.prompt[s] == lab).any()] for lab in (1, 2)}
    assert on_slices == {1: [12, 16], 2: [8]}  # label 2 keeps only its drawn slice: it was not edited
    np.testing.assert_array_equal(plan.prompt[16] == 1, one[16])
    np.testing.assert_array_equal(plan.prompt[12] == 1, prompt[12] == 1)
    assert plan.describe() == ["label 1: keyframes 12 (prompt), 16 (edited); the object is absent on 19",
                               "label 2: keyframes 8 (prompt); not edited"]  # a review: it read as a change
    assert plan.record() == {"1": {"keyframes": [12, 16], "walls": [19]}, "2": {"keyframes": [8], "walls": []}}


def test_edits_of_an_unprompted_label_are_named_and_left_out():
    _, _, prompt, previous = first_run()
    edited = previous.copy()
    edited[14, 2:5, 2:5] = 3  # a new label painted in the editor, not in the prompt
    edited[10][edited[10] == 1] = 0
    plan = keyframes_from_edits(prompt, previous, edited, labels=[1])
    assert plan.drawn == {1: [12]} and plan.edited == {1: [10]} and plan.empty_slices == {1: [10]}
    assert plan.ignored == [3]


def test_a_result_of_some_labels_asks_for_the_same_labels_again():
    """The first run used --label 2, the update left it out: it was told the earlier result is not a
    result of this prompt (label 1 differs on slice 12), though only --label was missing."""
    _, _, prompt, previous = first_run()
    only_two = np.where(previous == 2, 2, 0).astype(np.uint8)
    edited = only_two.copy()
    edited[10][edited[10] == 2] = 0
    with pytest.raises(InputError, match=r"^the earlier result holds no label 1 of the prompt, only label 2: if it was "
                                         r"made with --label \(labels=\), give the same labels again \(--label 2; a "
                                         r"manifest's label column 2; labels=\[2\] in Python\)$"):
        keyframes_from_edits(prompt, only_two, edited)
    assert keyframes_from_edits(prompt, only_two, edited, labels=[2]).edited == {2: [10]}


@pytest.mark.parametrize("case, message", [
    ("not its result", "the earlier result is not a result of this prompt: on slice 12 (axis 0) label 1 differs"),
    ("unchanged", "the edited result equals the earlier one on every slice of labels 1, 2: nothing to update"),
    ("all erased", "label 2 is erased on every slice it was drawn or edited on"),
    ("too many", f"label 1 would have {SHAPE[0] // 2 + 2} keyframes out of {SHAPE[0]} slices along axis 0"),
    ("shape", "the edited result has shape (24, 30, 31), the prompt (24, 30, 32)"),
])
def test_refusals_say_what_is_wrong(case, message):
    _, _, prompt, previous = first_run()
    edited = previous.copy()
    if case == "not its result":
        previous = previous.copy()
        previous[12, 10, 10] = 0
    elif case == "all erased":
        edited[8][edited[8] == 2] = 0
    elif case == "too many":  # a stroke in a perpendicular view touches most slices
        edited[:SHAPE[0] // 2 + 2, 28, 30] = 1
    elif case == "shape":
        edited = edited[:, :, :31]
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keyframes_from_edits(prompt, previous, edited)
    assert MAX_PROMPT_SLICES >= SHAPE[0] // 2  # the half-the-slices limit is the one reached above


def _changed_runs(was, now, skip):
    """The slices where ``was`` and ``now`` differ (except ``skip``) as runs, written independently of
    EditPlan.changes: consecutive slices of one kind (now empty / new / changed) form a run."""
    kinds = {k: " (now empty)" if not now[k].any() else " (new)" if not was[k].any() else ""
             for k in range(was.shape[0]) if k not in skip and not np.array_equal(was[k], now[k])}
    runs = []
    for k in sorted(kinds):
        if runs and runs[-1][1] == k - 1 and kinds[runs[-1][0]] == kinds[k]:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join((f"{a}" if a == b else f"{a}-{b}") + kinds[a] for a, b in runs)


def test_cli_update_equals_a_run_from_the_same_keyframes(ct_case, capsys):
    """--previous/--edited gives what propagating the drawn and edited slices with the erased one
    as --empty-slices gives, and keeps the edit exactly. The first run's record beside its output
    lets the update reuse the walks its edits left alone (it recomputed every slice)."""
    d = ct_case.directory
    first = _first_run(ct_case)
    previous = read_volume(first).array
    edited = previous.copy()
    edited[13] = ct_case.truth[13]  # redrawn
    edited[6] = 0  # erased: the object is absent below slice 7
    edited_path = write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    capsys.readouterr()
    out = d / "second.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--previous", str(first), "--edited", str(edited_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "update: label 1: keyframes 10 (prompt), 13 (edited); the object is absent on 6"
    assert printed[1].startswith(f"wrote {out} and {out}.keyframes.json: label 1: slices ")
    updated = int(printed[1].split("; ")[1].split(" slices predicted")[0])
    result = read_volume(out).array
    np.testing.assert_array_equal(result[13] > 0, ct_case.truth[13])
    assert not result[:7].any()
    # The slices that changed besides the edited ones (13 and 6) are listed: what to look at again
    expected = _changed_runs(previous == 1, result == 1, skip={6, 13})
    assert expected == "5 (now empty), 12, 14-15"  # 5: below the wall, where the earlier result held the object
    assert f"changed beside your edits: label 1: {expected}" in printed

    keyframes = np.zeros_like(ct_case.prompt)
    keyframes[10], keyframes[13] = ct_case.prompt[10], ct_case.truth[13]
    by_hand = d / "keyframes.nii.gz"
    write_image(keyframes, by_hand, ct_case.spacing)
    same = d / "same.nii.gz"
    capsys.readouterr()
    assert cli.main(["propagate", str(ct_case.image_path), str(by_hand), "-o", str(same), "--method", "copy",
                     "--empty-slices", "6"]) == 0
    np.testing.assert_array_equal(read_volume(same).array, result)
    # the walk from 10 down to the wall at 6 was the first run's (its keyframe unchanged): reused
    scratch = int(capsys.readouterr().out.splitlines()[0].split("; ")[1].split(" slices predicted")[0])
    assert updated == scratch - 3, (updated, scratch)
    # With --report too, the three files written are listed as a list is written.
    capsys.readouterr()
    report = d / "second.csv"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out),
                     "--method", "copy", "--previous", str(first), "--edited", str(edited_path),
                     "--report", str(report)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith(f"wrote {out}, {report} and {out}.keyframes.json: label 1: slices ")


def _without_record(path):
    path.unlink()


def _record_with_damaged_result(path):
    record = json.loads(path.read_text())
    record["result"]["labels"]["1"]["confidence"] = [0.5]
    path.write_text(json.dumps(record))


def _record_whose_walks_disagree(path):
    record = json.loads(path.read_text())
    record["result"]["labels"]["1"]["keyframes"] = [11]  # edited by hand: not the walks' keyframe (10)
    path.write_text(json.dumps(record))


def _record_without_digest(path):
    record = json.loads(path.read_text())
    record["result"]["image_digest"] = None  # could be reused on another image
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage, note", [
    # copied or moved without its record: what is lost is said (earlier rounds' corrections)
    (_without_record, "note: --previous has no record beside it (first.nii.gz.keyframes.json, which every run "
                      "writes beside its output): every slice is predicted again, and if first.nii.gz came from an "
                      "update, the corrections of its earlier rounds are too (put the record beside it to keep them, "
                      "and give again any --range, --label and --empty-slices of the run that made it)"),
    # its keyframes are sound but the part about its walks is damaged
    (_record_with_damaged_result, "note: the record of first.nii.gz cannot tell which of its walks still hold (label "
                                  "1's confidence is not 20 numbers from 0 to 1 (or nulls)): every slice is predicted "
                                  "again"),
    (_record_whose_walks_disagree, "note: the record of first.nii.gz cannot tell which of its walks still hold (its "
                                   "walks' keyframes are not the record's): every slice is predicted again"),
    (_record_without_digest, "note: the record of first.nii.gz cannot tell which of its walks still hold (its "
                             "early_stop, remove_disconnected or image_digest entry is malformed): every slice is "
                             "predicted again"),
])
def test_an_update_without_a_usable_record_says_so_and_recomputes(ct_case, capsys, damage, note):
    """The update goes on from the prompt (and the record's keyframes, if any) and the edits,
    predicting every slice, with a note saying why."""
    d = ct_case.directory
    first = _first_run(ct_case)
    damage(d / "first.nii.gz.keyframes.json")
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, e1, d / "second.nii.gz") == 0
    assert capsys.readouterr().out.splitlines()[1] == note


def test_cli_update_refusals_are_one_line(ct_case, run_cli):
    d = ct_case.directory
    first = write_image(np.where(ct_case.truth, 1, 0).astype(np.uint8), d / "first.nii.gz", ct_case.spacing)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", d / "out.nii.gz", "--method", "copy",
                   "--previous", first)
    assert proc.returncode == 2 and proc.stderr.strip() == ("pamsegment: error: --previous needs --edited: give the "
                                                            "earlier result (--previous) and your corrected copy of it "
                                                            "(--edited)")
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", first, "--method", "copy",
                   "--previous", first, "--edited", first)
    assert proc.returncode == 2 and "the output" in proc.stderr and "is the input" in proc.stderr
    other = write_image(np.zeros((20, 40, 47), np.uint8), d / "other.nii.gz", ct_case.spacing)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", d / "out.nii.gz", "--method", "copy",
                   "--previous", first, "--edited", other)
    assert proc.returncode == 2 and proc.stderr.startswith("pamsegment: error: --edited: other.nii.gz is not on the "
                                                           "image grid: size differs")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (d / "out.nii.gz").exists()
    # The CT itself given as --edited was told it had too many keyframes
    ct = write_image(np.round(ct_case.image).astype(np.int16) - 1000, d / "ct_int.nii.gz", ct_case.spacing)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", d / "out.nii.gz", "--method", "copy",
                   "--previous", first, "--edited", ct)
    assert proc.returncode == 2 and "it looks like an image, not a corrected copy of the earlier result" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (d / "out.nii.gz").exists()


def _first_run(ct_case):
    """The first round: PROMPT propagated with copy into first.nii.gz."""
    first = ct_case.directory / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy"]) == 0
    return first


def _update(ct_case, previous, edited, out, *extra):
    return cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method",
                     "copy", "--previous", str(previous), "--edited", str(edited), *map(str, extra)])


def test_a_second_round_keeps_the_first_rounds_keyframes_and_walls(ct_case, capsys):
    """Round 2 takes round 1's keyframes and walls from OUT.keyframes.json beside --previous: only
    the differences between round 1's output and its corrected copy are new (the object came back
    on the erased slices and slice 13 was recomputed before)."""
    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    edited[5:7] = 0
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    assert _update(ct_case, first, e1, d / "second.nii.gz") == 0
    second = read_volume(d / "second.nii.gz").array
    edited2 = second.copy()
    edited2[8] = ct_case.truth[8]
    e2 = write_image(edited2.astype(np.uint8), d / "e2.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, d / "second.nii.gz", e2, d / "third.nii.gz") == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == (
        "update: label 1: keyframes 10 (prompt), 13 (earlier rounds), 8 (edited); the object is absent on 5, 6")
    assert "has no record beside it" not in printed  # second.nii.gz has its record beside it
    third = read_volume(d / "third.nii.gz").array
    assert not third[5:7].any()
    np.testing.assert_array_equal(third[13] > 0, ct_case.truth[13])
    np.testing.assert_array_equal(third[8] > 0, ct_case.truth[8])
    keyframes = np.zeros_like(ct_case.prompt)
    for k in (8, 10, 13):
        keyframes[k] = edited2[k]
    by_hand = write_image(keyframes, d / "keyframes.nii.gz", ct_case.spacing)
    assert cli.main(["propagate", str(ct_case.image_path), str(by_hand), "-o", str(d / "same.nii.gz"), "--method",
                     "copy", "--empty-slices", "5,6"]) == 0
    np.testing.assert_array_equal(read_volume(d / "same.nii.gz").array, third)
    # the record describes its own output: once that output changes, it is refused, not half used
    changed = second.copy()
    changed[14] = 0
    write_image(changed.astype(np.uint8), d / "second.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, d / "second.nii.gz", e2, d / "fourth.nii.gz") == 2
    err = capsys.readouterr().err
    assert "second.nii.gz.keyframes.json (the record of the run that wrote --previous) does not match " \
           "--previous: --previous has changed since it was written, or the record was written for another " \
           "result" in err
    # a plain run replacing an update's output replaces that output's record with its own
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(d / "second.nii.gz"),
                     "--method", "copy"]) == 0
    record = json.loads((d / "second.nii.gz.keyframes.json").read_text())
    assert record["labels"] == {"1": {"keyframes": [10], "walls": []}} and record["version"] == 2


def test_erased_slices_do_not_count_as_keyframes(ct_case, capsys):
    """Erasing a leak on many slices is walls, not keyframes: only drawn slices count against PAM's
    keyframe limit (a 20-slice scan takes at most 10)."""
    d = ct_case.directory
    previous = np.repeat(ct_case.prompt[10][None], 20, axis=0)  # a result that ran over all 20 slices
    first = write_image(previous, d / "first.nii.gz", ct_case.spacing)
    edited = previous.copy()
    edited[0:5] = 0
    edited[16:20] = 0
    edited[13] = ct_case.truth[13]
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, e, d / "out.nii.gz") == 0
    assert capsys.readouterr().out.splitlines()[0] == ("update: label 1: keyframes 10 (prompt), 13 (edited); the "
                                                        "object is absent on 0, 1, 2, 3, 4, 16, 17, 18, 19")
    result = read_volume(d / "out.nii.gz").array
    assert not result[0:5].any() and not result[16:20].any() and result[5:16].any()


@pytest.mark.parametrize("case, message", [
    ("prompt as previous", "--previous is PROMPT itself"),
    ("label values", "the edited result holds label 255 where the earlier one holds 1: save your corrections with "
                     "the result's label values"),
    ("outside range", "label 1 was edited on slice 15, outside --range 5:14"),
])
def test_cli_update_input_mistakes(ct_case, capsys, case, message):
    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array.astype(np.uint8)
    extra = []
    if case == "label values":
        edited[edited == 1] = 255
    else:
        edited[15] = 0
    e = write_image(edited, d / "e.nii.gz", ct_case.spacing)
    previous = ct_case.prompt_path if case == "prompt as previous" else first
    if case == "outside range":
        extra = ["--range", "5:14"]
    capsys.readouterr()
    assert _update(ct_case, previous, e, d / "out.nii.gz", *extra) == 2
    out = capsys.readouterr()
    assert message in out.err and out.out == "" and not (d / "out.nii.gz").exists()


def test_the_record_sits_beside_the_file_a_linked_out_is(ct_case, capsys):
    """OUT given as a symbolic link is written where the link points, and so is its record; the
    next round, given the link as --previous, finds the record there (it was looked for beside the
    link and silently not found)."""
    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    edited[6] = 0
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    (d / "real").mkdir()
    (d / "real" / "second.nii.gz").write_bytes(b"")
    link = d / "latest.nii.gz"
    link.symlink_to(d / "real" / "second.nii.gz")
    capsys.readouterr()
    assert _update(ct_case, first, e1, link) == 0
    record = d / "real" / "second.nii.gz.keyframes.json"
    assert record.is_file() and not (d / "latest.nii.gz.keyframes.json").exists() and link.is_symlink()
    assert str(record) in capsys.readouterr().out
    edited2 = read_volume(link).array
    edited2[8] = ct_case.truth[8]
    e2 = write_image(edited2.astype(np.uint8), d / "e2.nii.gz", ct_case.spacing)
    assert _update(ct_case, link, e2, d / "third.nii.gz") == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "update: label 1: keyframes 10 (prompt), 13 (earlier rounds), 8 (edited); the object is absent on 6")


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000, "cannot be read (RecursionError"),
    ('{"format": "pamsegment-keyframes", "version": 1, "axis": true, "labels": {}}', "not a PAMSegment keyframes"),
    ("not json", "cannot be read (JSONDecodeError"),
    ('{"format": "pamsegment-keyframes", "version": 1, "axis": 0, "labels": {"1": {"keyframes": [true], "walls": []}}}',
     "label '1' is malformed"),
])
def test_an_unreadable_record_is_one_line(ct_case, capsys, content, message):
    d = ct_case.directory
    first = _first_run(ct_case)
    (d / "first.nii.gz.keyframes.json").write_text(content)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, e, d / "out.nii.gz") == 2
    err = capsys.readouterr().err
    assert "first.nii.gz.keyframes.json (the record of the run that wrote --previous) cannot be read" in err
    assert message in err and "delete it to keep only the prompt's keyframes" in err and "Traceback" not in err


@pytest.mark.parametrize("failing", ["out", "record"])
def test_a_run_whose_out_cannot_be_moved_in_leaves_the_old_outs_record(ct_case, capsys, monkeypatch, failing):
    """The record is moved in before OUT; when OUT's own move failed, the old OUT was left beside the
    new run's record (its next update refused, an update's keyframes lost), and when the record's
    move failed, the old record (set aside first) was deleted. The old record is put back."""
    import os

    first = _first_run(ct_case)
    record = ct_case.directory / "first.nii.gz.keyframes.json"
    kept, result = record.read_bytes(), first.read_bytes()
    replace = os.replace

    def refusing(src, dst):
        if Path(dst) == (first if failing == "out" else record) and ".tmp" in Path(src).name:
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refusing)
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first), "--method",
                     "track"]) == 2
    assert first.read_bytes() == result and record.read_bytes() == kept
    assert not [p for p in ct_case.directory.iterdir() if p.name.startswith(".pamsegment-")]


def test_a_folder_where_the_record_goes_is_refused_before_any_work(ct_case, capsys):
    """For an update and, since every run writes a record, for a plain run too (it did the work and
    then failed to write)."""
    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    (d / "out.nii.gz.keyframes.json").mkdir()
    capsys.readouterr()
    assert _update(ct_case, first, e, d / "out.nii.gz") == 2
    out = capsys.readouterr()
    assert "out.nii.gz.keyframes.json is a folder, where this run would write its record" in out.err
    assert out.out == "" and not (d / "out.nii.gz").exists()
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(d / "out.nii.gz"),
                     "--method", "copy"]) == 2
    out = capsys.readouterr()
    assert "out.nii.gz.keyframes.json is a folder, where this run would write its record" in out.err
    assert "propagating" not in out.err and not (d / "out.nii.gz").exists()  # before any work


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["labels"]["1"]["keyframes"].append(1000), "label 1's slice 1000 is outside the 20 slices along axis 0"),
    (lambda r: r["labels"]["1"]["walls"].append(-1), "label 1's slice -1 is outside the 20 slices along axis 0"),
    (lambda r: r["labels"]["1"]["walls"].append(r["labels"]["1"]["keyframes"][0]),
     "label 1 has slices that are both keyframes and walls"),
    (lambda r: r["labels"].update({"65536": {"keyframes": [3], "walls": []}}), "label 65536 is outside 1-65535"),
])
def test_a_record_edited_by_hand_is_refused_not_half_used(ct_case, capsys, edit, problem):
    """Out-of-range slices, a wall on a keyframe and impossible labels in OUT.keyframes.json were
    ignored and the update went ahead (the record's checksum covers OUT, not itself)."""
    import json

    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    assert _update(ct_case, first, e, d / "second.nii.gz") == 0
    record_path = d / "second.nii.gz.keyframes.json"
    record = json.loads(record_path.read_text())
    edit(record)
    record.pop("labels_sha256")  # as a record written before session 38 (its digest refuses any such edit first)
    record_path.write_text(json.dumps(record))
    edited2 = read_volume(d / "second.nii.gz").array
    edited2[8] = ct_case.truth[8]
    e2 = write_image(edited2.astype(np.uint8), d / "e2.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, d / "second.nii.gz", e2, d / "third.nii.gz") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"pamsegment: error: {record_path} (the record of the run that wrote --previous) cannot "
                           f"be read ({problem}); delete it to keep only the prompt's keyframes")
    assert not (d / "third.nii.gz").exists()


def test_a_previous_result_named_with_241_to_255_bytes_has_no_record_and_updates(ct_case, capsys):
    """Its record's name would pass 255 bytes, so looking for it raised ENAMETOOLONG: it has none."""
    import shutil

    d = ct_case.directory
    first = _first_run(ct_case)
    long_name = d / ("p" * 240 + ".nii.gz")
    shutil.copyfile(first, long_name)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, long_name, e, d / "out.nii.gz") == 0
    assert capsys.readouterr().out.splitlines()[0] == "update: label 1: keyframes 10 (prompt), 13 (edited)"


def test_an_update_refuses_empty_slices_of_a_label_it_does_not_propagate(ct_case, capsys):
    """A fresh run refuses --empty-slices 9:K for a label the prompt does not hold; an update kept
    only the walls of its own labels and dropped the others without a word (exit 0)."""
    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, e1, d / "second.nii.gz", "--empty-slices", "9:5") == 2
    assert capsys.readouterr().err.strip() == ("pamsegment: error: empty slices given for label 9, which is not among "
                                               "the labels propagated (1)")
    assert not (d / "second.nii.gz").exists()
    assert _update(ct_case, first, e1, d / "second.nii.gz", "--empty-slices", "1:5") == 0
    assert not read_volume(d / "second.nii.gz").array[5].any()


def test_a_round_run_with_another_method_says_so(ct_case, capsys):
    """A review: a correction round with --method track after a pam (here copy) round listed nearly
    every slice as "changed beside your edits" without a word why: it predicted every slice again
    with the other method. A note says so now; the same method says nothing."""
    d = ct_case.directory
    first = _first_run(ct_case)  # --method copy
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(d / "t.nii.gz"),
                     "--method", "track", "--previous", str(first), "--edited", str(e1)]) == 0
    assert ("note: label 1: the round you corrected ran --method copy and this one --method track: every slice was "
            "predicted again") in capsys.readouterr().out
    assert _update(ct_case, first, e1, d / "c.nii.gz") == 0
    assert "the round you corrected ran" not in capsys.readouterr().out
