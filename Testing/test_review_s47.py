"""Session 47: faults carried from session 46's trials and found by this session's."""

from __future__ import annotations

import http.server
import json

import numpy as np
import pytest
from doubles import OracleModel, local_http_server

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from PAMSegmentLib.errors import PAMError  # noqa: E402
from PAMSegmentLib.remote import RemoteModel  # noqa: E402
from PAMSegmentLib.server import create_app  # noqa: E402
from test_server import case, npz, wait_for  # noqa: E402


def test_deleting_a_finished_job_says_it_was_only_forgotten_not_cancelled():
    """A trial (session 46): DELETE of a job that had finished answered state "cancelled"; nothing
    was cancelled. The answer now gives the state the job had; a running one is still cancelled."""
    image, prompt, truth = case()
    client = TestClient(create_app(lambda method: OracleModel(truth)))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    job = client.post("/jobs", content=body).json()
    assert wait_for(client, job["id"])["state"] == "finished"
    answer = client.delete(f"/jobs/{job['id']}")
    assert answer.status_code == 200
    assert answer.json() == {"id": job["id"], "state": "finished", "deleted": True}
    assert client.get(f"/jobs/{job['id']}").status_code == 404  # forgotten all the same
    assert client.delete(f"/jobs/{job['id']}").status_code == 404
    # a job whose result expired is no job for DELETE either, as for GET (a review: "finished" was answered)
    job = client.post("/jobs", content=body).json()
    assert wait_for(client, job["id"])["state"] == "finished"
    queue = client.app.state.queue
    queue.jobs[job["id"]].finished_at -= queue.result_ttl + 1  # (aged, not waited for: a loaded machine polled late)
    assert client.delete(f"/jobs/{job['id']}").status_code == 404


def test_a_form_upload_is_refused_as_a_form_not_as_a_broken_npz():
    """A trial (session 46): `curl -F file=@case.npz` was read as the .npz itself and refused as "not
    an .npz file", which sent the user looking at a good file. A form is a 415 that says what to send."""
    image, prompt, truth = case()
    client = TestClient(create_app(lambda method: OracleModel(truth)))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    r = client.post("/jobs", files={"file": ("case.npz", body, "application/octet-stream")})
    assert r.status_code == 415
    assert r.json()["detail"] == ("the upload is a form (multipart/form-data); send the .npz itself as the request's "
                                  "body (curl --data-binary @case.npz, not -F)")
    # the .npz as the body is taken as before, whatever its type says: none, octet-stream, or the urlencoded
    # type curl --data-binary gives it unless told otherwise (a review: refused at first)
    for kind in (None, "application/octet-stream", "application/x-www-form-urlencoded"):
        assert client.post("/jobs", content=body, headers={"Content-Type": kind} if kind else {}).status_code == 202
    # curl -d sends the file as form text without its line breaks: said so (a re-review)
    cut = body.replace(b"\r", b"").replace(b"\n", b"")
    r = client.post("/jobs", content=cut, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["detail"].endswith(
        "(sent as form text, application/x-www-form-urlencoded: curl -d removes the file's line breaks; send it with "
        "curl --data-binary @case.npz)")


def test_a_server_that_takes_the_upload_and_never_answers_is_not_called_unreachable():
    """A trial (session 46): a server that read the upload and then hung was reported as "cannot
    reach the PAMSegment server ... is `pamsegment serve` running there?" after the client's timeout,
    while it was reachable and running. The message says it took the request and did not answer."""
    posted = []

    class Stuck(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # /info as pamsegment serve answers it
            body = json.dumps({"server": "pamsegment", "version": "x", "queued": 0, "max_jobs": 8,
                               "max_upload_mb": 1024}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            posted.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            self.server.stopping.wait(30)  # never answers

        def log_message(self, *args):
            pass

    server = local_http_server(Stuck)
    image, prompt, _ = case()
    try:
        model = RemoteModel(f"http://127.0.0.1:{server.server_address[1]}", timeout=1.0)
        with pytest.raises(PAMError) as info:
            model.propagate(image, prompt, (1.0, 1.0, 1.0))
    finally:
        server.shutdown()
    assert len(posted) == 1 and posted[0] > 0  # the upload arrived whole
    message = str(info.value)
    assert "took the request but did not answer within 1 s" in message
    assert "cannot reach" not in message and "running there" not in message


def _colour_png(path, rgb) -> str:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(rgb, np.uint8), isVector=True), str(path))
    return str(path)


def test_label_images_names_a_colour_label_map_among_the_images(tmp_path, capsys):
    """A trial (session 46): a colour label map in the set (red and green regions, read as greys of
    76.245 and 149.685: not whole values) was labelled as an image without the note grey ones get."""
    from PAMSegmentLib import cli
    from test_review_s36 import _grey_set

    mask = _grey_set(tmp_path)
    colour = np.zeros((48, 48, 3), np.uint8)
    colour[mask > 0] = (255, 0, 0)
    colour[34:44, 4:20] = (0, 255, 0)
    _colour_png(tmp_path / "b_labels.png", colour)
    photo = np.random.default_rng(1).integers(0, 256, (48, 48, 3))  # a colour image: no note
    _colour_png(tmp_path / "c_photo.png", photo)
    files = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "b_labels.png", "c_photo.png")]
    assert cli.main(["label-images", files[0], str(tmp_path / "a_mask.png"), *files[1:], "-o",
                     str(tmp_path / "out"), "--method", "copy"]) == 0
    out = capsys.readouterr().out
    assert "note: b_labels.png holds only a few values (or colours) in flat regions: label maps rather than " \
           "images?" in out
    assert out.count("flat regions") == 1  # the photo and the grey images are not named


def test_label_images_refuses_a_blank_prompt_image(tmp_path, capsys):
    """A trial (session 46): a prompt image of one value everywhere found the object in none of the
    images, and the note blamed their brightness ("exported with another window?")."""
    from PAMSegmentLib import cli
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.imageset import label_images
    from test_review_s36 import _grey_set, _png

    mask = _grey_set(tmp_path)
    _png(tmp_path / "blank.png", np.full((48, 48), 120, np.uint8))
    code = cli.main(["label-images", str(tmp_path / "blank.png"), str(tmp_path / "a_mask.png"),
                     str(tmp_path / "b.png"), str(tmp_path / "c.png"), "-o", str(tmp_path / "out"), "--method", "copy"])
    err = capsys.readouterr().err
    assert code == 2
    assert "the prompt image (blank.png) holds one value everywhere (120): there is nothing to follow" in err
    assert not (tmp_path / "out").exists()
    rng = np.random.default_rng(2)
    with pytest.raises(InputError, match=r"^the prompt image \(image 1\) holds one value everywhere \(0\)"):
        label_images([rng.random((48, 48)), np.zeros((48, 48)), rng.random((48, 48))], 1, mask, model="copy")


# ----------------------------------------------------------------------------- pamsegment batch (a trial)


def _batch_cases(tmp_path, n=2):
    from conftest import make_ct_case

    return [make_ct_case(tmp_path / "data" / f"c{k}", seed=k) for k in range(n)]


def _report_rows(path):
    import csv

    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_batch_reads_excels_unicode_text_with_its_tabs(tmp_path, capsys):
    """A trial (session 47): the README says Excel's "Unicode Text" is read, but that export is UTF-16
    with tabs between the columns, and the tabs were refused ("separate them with commas")."""
    from PAMSegmentLib.cli import main

    _batch_cases(tmp_path)
    text = "image\tprompt\toutput\r\n" + "".join(f"c{k}/image.nii.gz\tc{k}/prompt.nii.gz\tr{k}.nii.gz\r\n"
                                                 for k in range(2))
    (tmp_path / "data" / "cases.txt").write_bytes(text.encode("utf-16"))  # (with its byte-order mark)
    assert main(["batch", str(tmp_path / "data" / "cases.txt"), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    rows = _report_rows(tmp_path / "out" / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"] and (tmp_path / "data" / "r1.nii.gz").exists()  # (beside it)
    # a comma in a cell of the header does not make it comma-separated (a review: refused so at first)
    (tmp_path / "data" / "commas.txt").write_bytes(text.replace("output", "output\tnote, reader", 1).encode("utf-16"))
    assert main(["batch", str(tmp_path / "data" / "commas.txt"), "-o", str(tmp_path / "out2"), "--method",
                 "copy"]) == 2
    assert "has a column 'note, reader' this command does not know" in capsys.readouterr().err
    # tabs in a UTF-8 file are still refused with the hint
    (tmp_path / "data" / "cases8.txt").write_text(text)
    assert main(["batch", str(tmp_path / "data" / "cases8.txt"), "-o", str(tmp_path / "out8"), "--method",
                 "copy"]) == 2


def test_a_piped_manifest_is_not_called_by_its_file_descriptor(tmp_path, capsys):
    """A trial (session 47): `pamsegment batch <(printf ...)` named the manifest "63" (/dev/fd/63)."""
    import os

    from PAMSegmentLib.cli import main

    read, write = os.pipe()
    os.write(write, b"image,prompt\nnope.nii.gz,x.nii.gz\n")
    os.close(write)
    try:
        assert main(["batch", f"/dev/fd/{read}", "-o", str(tmp_path / "out")]) == 2
    finally:
        os.close(read)
    err = capsys.readouterr().err
    assert err.startswith("pamsegment: error: the piped manifest row 2: image ") and "does not exist" in err
    assert f"{read} row 2" not in err
    # the other refusals that name the manifest too (a review: an output that is an input, a prompt on another grid)
    _batch_cases(tmp_path, 1)
    here = tmp_path / "data"
    for line, said in ((f"{here}/c0/image.nii.gz,{here}/c0/prompt.nii.gz,{here}/c0/prompt.nii.gz",
                        "the piped manifest row 2: the output "),
                       (f"{here}/c0/image.nii.gz,{here}/small.nii.gz,{here}/r.nii.gz",
                        "the piped manifest row 2: ")):
        import SimpleITK as sitk

        sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8) + 1, str(here / "small.nii.gz"))
        read, write = os.pipe()
        os.write(write, f"image,prompt,output\n{line}\n".encode())
        os.close(write)
        try:
            assert main(["batch", f"/dev/fd/{read}", "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
        finally:
            os.close(read)
        err = capsys.readouterr().err
        assert err.startswith(f"pamsegment: error: {said}"), err


def test_skip_existing_says_why_an_output_newer_than_the_report_lost_its_figures(tmp_path):
    """A trial (session 47): the README says a skipped row whose output is newer than the earlier
    report drops that report's figures "(the message then says so)"; it said only "output exists"."""
    import os

    from PAMSegmentLib.cli import main

    _batch_cases(tmp_path)
    m = tmp_path / "data" / "cases.csv"
    m.write_text("image,prompt,output\n" + "".join(f"c{k}/image.nii.gz,c{k}/prompt.nii.gz,r{k}.nii.gz\n"
                                                    for k in range(2)))
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 0
    later = (out / "batch_report.csv").stat().st_mtime + 3600
    os.utime(tmp_path / "data" / "r0.nii.gz", (later, later))  # edited by hand after the report
    assert main(["batch", str(m), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = _report_rows(out / "batch_report.csv")
    assert rows[0]["status"] == "skipped" and rows[0]["slices"] == ""
    assert rows[0]["message"] == ("output exists (--skip-existing); it changed after the earlier report was written, "
                                  "which does not describe it")
    assert rows[1]["status"] == "skipped" and rows[1]["message"].startswith("done in an earlier run")


def test_the_summary_does_not_name_a_report_that_could_not_be_written(tmp_path, monkeypatch, capsys):
    """A trial (session 47): with the report unwritable at the end, the summary line still ended
    "; report DIR/batch_report.csv", right above the error saying it could not be written."""
    from pathlib import Path

    from PAMSegmentLib.cli import main

    _batch_cases(tmp_path, 1)
    m = tmp_path / "data" / "cases.csv"
    m.write_text("image,prompt\nc0/image.nii.gz,c0/prompt.nii.gz\n")
    real, writes = Path.replace, []

    def replace(self, target):
        if Path(target).name == "batch_report.csv":
            writes.append(target)
            if len(writes) > 1:
                raise PermissionError(13, "Permission denied")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    out = tmp_path / "out"
    assert main(["batch", str(m), "-o", str(out), "--method", "copy"]) == 2
    captured = capsys.readouterr()
    assert "batch: 1 ok of 1 row in " in captured.out
    assert f"; report {out / 'batch_report.csv'} not written at the end (below)" in captured.out
    assert "cannot write the report" in captured.err


# ----------------------------------------------------------------------------- corrections (a trial)


def test_an_update_says_which_labels_of_the_earlier_result_its_prompt_leaves_out(tmp_path, capsys):
    """A trial (session 47): a five-label result corrected on one label and updated with a prompt of
    that label alone lost the other four (and a --range run's second label), exit 0, no word."""
    from conftest import make_ct_case, write_image
    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    case = make_ct_case(tmp_path / "c")
    both = case.prompt.copy()
    both[10, :3, :3] = 2  # a second, small structure drawn on the same slice
    write_image(both, tmp_path / "both.nii.gz", case.spacing)
    first = tmp_path / "first.nii.gz"
    assert cli.main(["propagate", str(case.image_path), str(tmp_path / "both.nii.gz"), "-o", str(first), "--method",
                     "copy"]) == 0
    edited = read_volume(first).array.copy()
    assert (edited[14] == 1).any() and (edited == 2).any()
    edited[14][edited[14] == 1] = 0  # label 1 erased on slice 14
    write_image(edited.astype(np.uint8), tmp_path / "edited.nii.gz", case.spacing)
    capsys.readouterr()
    out = tmp_path / "second.nii.gz"
    assert cli.main(["propagate", str(case.image_path), str(case.prompt_path), "-o", str(out), "--method", "copy",
                     "--previous", str(first), "--edited", str(tmp_path / "edited.nii.gz")]) == 0
    printed = capsys.readouterr().out
    assert ("note: label 2 of first.nii.gz is not in the prompt: left out of the result (was first.nii.gz made from "
            "another prompt? Give the prompt it was made from to keep it)") in printed
    assert set(np.unique(read_volume(out).array)) == {0, 1}  # as said
    # with the prompt the result was made from: no such note
    assert cli.main(["propagate", str(case.image_path), str(tmp_path / "both.nii.gz"), "-o", str(tmp_path / "t.nii.gz"),
                     "--method", "copy", "--previous", str(first), "--edited", str(tmp_path / "edited.nii.gz")]) == 0
    assert "not in the prompt" not in capsys.readouterr().out


def test_an_edit_plan_names_labels_changed_but_not_propagated_in_its_notes(tmp_path):
    """A trial (session 47): a structure newly drawn in the corrected result, beside a correction of
    the prompt's label, was named by the command line only; Python's ``plan.notes()`` was empty."""
    from PAMSegmentLib.propagate import keyframes_from_edits

    prompt = np.zeros((12, 20, 20), np.uint8)
    prompt[6, 5:15, 5:15] = 1
    previous = np.zeros_like(prompt)
    previous[3:10, 5:15, 5:15] = 1
    edited = previous.copy()
    edited[8, 5:15, 5:10] = 0  # a correction of label 1
    edited[4, 1:3, 1:3] = 7  # and a new structure, not in the prompt
    plan = keyframes_from_edits(prompt, previous, edited)
    assert plan.ignored == [7]
    assert plan.notes() == ["label 7 changed in the edited result but not propagated (not in the prompt or not among "
                            "the labels chosen): left out of the result"]


def test_label_cells_says_many_like_warnings_about_single_examples_once(tmp_path):
    """A trial (session 47): an anti-aliased mask read with --as-drawn gave 1663 one- to nine-pixel
    examples and a warning line for each of about 200 of them ("... is 5.0 times the other examples'
    median area"). Three are shown, and one line for the rest."""
    pytest.importorskip("sklearn")
    from PAMSegmentLib.cells import label_cells

    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (96, 96))
    examples = np.zeros((96, 96), np.int32)
    n = 0
    for r in range(4, 92, 8):
        for c in range(4, 92, 8):
            n += 1
            size = 3 if n % 3 == 0 else 1  # every third example 9 px, the rest 1 px: 40 of them "large"
            examples[r:r + size, c:c + size] = n
            image[r:r + size, c:c + size] += 60
    result = label_cells(image, examples)
    large = [w for w in result.warnings if w.startswith("the example at row ") and "median area" in w]
    assert len(large) == 3
    summary = [w for w in result.warnings if w.startswith("and ")]
    assert summary == ["and 37 more examples over 1.75 times the other examples' median area: are the examples "
                       "whole cells, each drawn with a label of its own?"]


# ----------------------------------------------------------------------------- checkpoints (a hostile trial)


def test_a_checkpoint_in_a_folder_that_may_not_be_entered_is_one_message(tmp_path, small_checkpoint, monkeypatch):
    """A hostile trial (session 47): Path.exists() raised PermissionError for a file in a folder
    without search permission (a traceback, exit 1); an unreadable file itself was already said."""
    import pathlib

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    target = tmp_path / "locked" / "w.pt"
    real = pathlib.Path.exists

    def exists(self, *args, **kwargs):
        if str(self) == str(target):
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", exists)
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*w\.pt \(Permission denied\); check the "
                                              r"permissions of it and of its folders"):
        load_checkpoint_file(target)


def test_a_damaged_checkpoint_is_not_told_to_load_with_weights_only_false(tmp_path):
    """A hostile trial (session 47): every file torch's safe loader could not read was said to hold
    "Python objects", with advice to load it with weights_only=False; for a damaged file that
    advice fails too (and turns off the safety). A whole saved module gets advice that works."""
    import torch

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02\x00" + b"x" * 2000)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(bad)
    assert "damaged, truncated or not a PyTorch checkpoint" in str(info.value)
    assert "weights_only=False" not in str(info.value) and "Python objects" not in str(info.value)
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(whole)
    text = str(info.value)
    assert "(here torch.nn.modules.linear.Linear)" in text
    assert "sd = obj.state_dict() if hasattr(obj, 'state_dict') else next((obj[k] for k in" in text


def test_weight_names_from_a_checkpoint_are_cut_and_escaped(tmp_path, small_checkpoint):
    """A hostile trial (session 47): an unexpected weight named with terminal escapes and 20,000
    characters was printed whole (it cleared the screen)."""
    import torch

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    obj = torch.load(small_checkpoint.path, weights_only=True)
    obj["state_dict"]["\x1b[2J" + "A" * 20000] = torch.zeros(1)
    path = tmp_path / "esc.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    text = str(info.value)
    assert "1 unexpected key(s): '\\x1b[2JAAAA" in text and "\x1b" not in text and len(text) < 400


def test_a_flipped_byte_in_a_checkpoint_entry_is_found_by_its_checksum(tmp_path, small_checkpoint):
    """A hostile trial (session 47): torch does not check a zip entry's CRC-32, and the official file
    carries no other checksum: a byte flipped in a weight loaded and ran (-3.2e36 for -0.0093)."""
    import zipfile

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    data = bytearray(small_checkpoint.path.read_bytes())
    with zipfile.ZipFile(small_checkpoint.path) as archive:
        entry = next(e for e in archive.infolist() if "/data/" in e.filename and e.file_size > 64)
    name_len, extra_len = int.from_bytes(data[entry.header_offset + 26:entry.header_offset + 28], "little"), \
        int.from_bytes(data[entry.header_offset + 28:entry.header_offset + 30], "little")
    start = entry.header_offset + 30 + name_len + extra_len
    data[start + 13] ^= 0x40
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"the file is damaged \(its entry '{entry.filename}': Bad CRC-32"):
        load_checkpoint_file(path)


def test_a_damaged_model_card_beside_the_default_weights_is_not_skipped(tmp_path, small_checkpoint, monkeypatch):
    """A hostile trial (session 47): a model card beside the PAMSEGMENT_MODEL weights that could not
    be read was skipped without a word, the weights left unchecked (the shipped weights' was refused)."""
    import shutil

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    path = tmp_path / "w.pt"
    shutil.copy(small_checkpoint.path, path)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(path))
    assert load_model().sha256  # no card: not checked
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"w\.json, where its model card would be, cannot be read "
                                              r"\(JSONDecodeError\)"):
        load_model()
    # (a re-review) a nested-JSON bomb is refused, not a RecursionError traceback; a card saved with a byte-order
    # mark (Notepad) is read; weights whose name is too long to have a card beside them load
    (tmp_path / "w.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"cannot be read \(RecursionError\)"):
        load_model()
    import json

    card = {"file": "w.pt", "sha256_weights": "0" * 64}
    (tmp_path / "w.json").write_text("\ufeff" + json.dumps(card), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"does not match its model card w\.json"):  # read, and held to it
        load_model()
    (tmp_path / "w.json").unlink()
    (tmp_path / "w.json").mkdir()  # a folder where the card would be is refused too (a re-review: skipped)
    with pytest.raises(CheckpointError, match=r"w\.json, where its model card would be, cannot be read"):
        load_model()
    long = tmp_path / ("w" * 251 + ".pt")
    shutil.copy(small_checkpoint.path, long)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(long))
    assert load_model().sha256


# ----------------------------------------------------------------------------- a re-review of the mends


def test_zip_entries_torch_save_never_writes_are_damage_not_a_traceback(tmp_path, small_checkpoint):
    """A re-review (session 47): the CRC check met an entry flagged encrypted (RuntimeError, a
    traceback) and checked a name held twice on its last copy only (torch reads the first)."""
    import zipfile

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    data = bytearray(small_checkpoint.path.read_bytes())
    at = data.find(b"PK\x01\x02")  # the first central-directory record: its flags at +8 (its local header's too)
    data[at + 8] |= 0x01
    local = int.from_bytes(data[at + 42:at + 46], "little")
    data[local + 6] |= 0x01
    path = tmp_path / "flagged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"the file is damaged \(its entry .* is encrypted"):
        load_checkpoint_file(path)
    twice = tmp_path / "twice.pt"
    with zipfile.ZipFile(small_checkpoint.path) as src, zipfile.ZipFile(twice, "w", zipfile.ZIP_STORED) as out:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (zipfile warns of the duplicate name)
            names = src.namelist()
            for name in names:
                out.writestr(name, src.read(name))
            data_entry = next(n for n in names if "/data/" in n)
            out.writestr(data_entry, src.read(data_entry))
    with pytest.raises(CheckpointError, match=r"holds the entry '.*/data/.*' twice"):
        load_checkpoint_file(twice)
    # an entry marked as a folder (zipfile reads it, torch reads zeros), a version byte zipfile does not know
    # (a traceback): damage (a re-review)
    data = bytearray(small_checkpoint.path.read_bytes())
    records = [k for k in range(len(data)) if data[k:k + 4] == b"PK\x01\x02"]
    folder = bytearray(data)
    folder[records[-2] + 38] |= 0x10
    (tmp_path / "folder.pt").write_bytes(bytes(folder))
    with pytest.raises(CheckpointError, match=r"is marked as a folder, which torch\.save never writes"):
        load_checkpoint_file(tmp_path / "folder.pt")
    version = bytearray(data)
    version[records[0] + 6] = 0xFF
    (tmp_path / "version.pt").write_bytes(bytes(version))
    with pytest.raises(CheckpointError, match=r"its zip directory cannot be read: zip file version"):
        load_checkpoint_file(tmp_path / "version.pt")


def test_an_intact_checkpoint_of_another_pickle_protocol_is_not_called_damaged(tmp_path, small_checkpoint):
    """A re-review (session 47): a file saved with pickle protocol 5 (its checksums intact) was told
    it was damaged and to download it again; torch's safe loader cannot read it."""
    import torch

    from PAMSegmentLib.checkpoints import load_checkpoint_file
    from PAMSegmentLib.errors import CheckpointError

    path = tmp_path / "p5.pt"
    torch.save(torch.load(small_checkpoint.path, weights_only=True), path, pickle_protocol=5)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    text = str(info.value)
    assert "torch's safe loader cannot read its contents ('Unsupported operand 149'): it was saved with pickle " \
           "protocol 5" in text and "torch.save(torch.load(PATH, weights_only=False), 'weights.pt')" in text
    assert "damaged" not in text and "download" not in text
    # the advice, followed literally, gives a file that loads (a re-review: advice keeping the state dict alone
    # lost a PAMSegment checkpoint's header)
    resaved = tmp_path / "weights.pt"
    torch.save(torch.load(path, weights_only=False), resaved)
    assert load_checkpoint_file(resaved).sha256
    # a pickle declaring no such protocol, checksums intact: no protocol advice (a re-review)
    data = bytearray(small_checkpoint.path.read_bytes())
    import zipfile
    import zlib

    with zipfile.ZipFile(small_checkpoint.path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pickled = archive.read(name)
    odd = b"\xfe" + pickled[1:]
    at = data.find(pickled)
    data[at:at + len(odd)] = odd
    crc_old, crc_new = zlib.crc32(pickled).to_bytes(4, "little"), zlib.crc32(odd).to_bytes(4, "little")
    data = bytearray(bytes(data).replace(crc_old, crc_new))
    (tmp_path / "odd.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(tmp_path / "odd.pt")
    assert "pickle protocol" not in str(info.value) and "damaged" in str(info.value)


def test_the_pamsegment_model_file_in_a_folder_that_may_not_be_entered_is_one_message(tmp_path, monkeypatch, capsys):
    """A re-review (session 47): `pamsegment info` and `propagate` asked Path.is_file() of the file
    PAMSEGMENT_MODEL names before any check, and a PermissionError was a traceback (exit 1)."""
    import pathlib

    from PAMSegmentLib import cli

    target = tmp_path / "locked" / "w.pt"
    real = pathlib.Path.is_file

    def is_file(self):
        if str(self) == str(target):
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "is_file", is_file)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(target))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.startswith(f"pamsegment: error: cannot read checkpoint {target} (Permission "
                                              "denied), the file PAMSEGMENT_MODEL names")


def test_curl_hint_only_where_the_upload_did_not_read(tmp_path):
    """A re-review (session 47): the curl -d hint was added to every refusal of a urlencoded upload,
    also to an intact .npz without a prompt sent with --data-binary (curl's own type for it)."""
    image, prompt, truth = case()
    client = TestClient(create_app(lambda method: OracleModel(truth)))
    r = client.post("/jobs", content=npz(image=image, spacing=np.ones(3)),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "curl" not in r.json()["detail"] and "exactly the arrays" in r.json()["detail"]


def test_a_recorded_piped_manifest_is_named_as_one(tmp_path):
    """A re-review (session 47): the report records a piped manifest as /proc/PID/fd/N of a process
    long gone, and a later run's refusal quoted that path."""
    from pathlib import Path

    from PAMSegmentLib.batch import BatchRow, _made_for_another_manifest

    out = tmp_path / "r.nii.gz"
    out.write_bytes(b"x")
    row = BatchRow(2, tmp_path / "site2" / "image.nii.gz", tmp_path / "p.nii.gz", out)
    earlier = {str(out.resolve()): ({"manifest": "/proc/23066/fd/63", "image": str(tmp_path / "site1" / "image.nii.gz"),
                                     "inputs": ""}, out.stat().st_mtime_ns + 1)}
    assert _made_for_another_manifest(row, earlier, Path("m.csv")) == ("the piped manifest",
                                                                       str(tmp_path / "site1" / "image.nii.gz"))
