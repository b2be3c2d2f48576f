"""Session 36: carried findings of session 35's trials, and this session's trials."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)


def _png(path, array) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8)), str(path))
    return str(path)


def _grey_set(tmp_path) -> np.ndarray:
    """Three grey 48 x 48 PNGs a, b, c holding a bright box, and a_mask.png marking it: the mask back."""
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48), np.uint8)
    mask[14:30, 16:34] = 1
    for n in "abc":
        _png(tmp_path / f"{n}.png", rng.integers(0, 255, (48, 48)) // 2 + 100 * mask)
    _png(tmp_path / "a_mask.png", mask)
    return mask


@pytest.fixture
def image_set(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48), np.uint8)
    mask[14:30, 16:34] = 1
    files = {n: _png(tmp_path / f"{n}.png", rng.integers(0, 255, (48, 48)) // 2 + 100 * mask) for n in "abce"}
    for n in "ae":
        files[f"{n}_mask"] = _png(tmp_path / f"{n}_mask.png", mask)
    return files


@pytest.mark.parametrize("labelled", [True, False])
def test_an_image_and_its_mask_given_as_images_to_label_are_refused(tmp_path, image_set, labelled, capsys):
    """Session 35's trial: two pairs given to one --labelled (`--labelled a a_mask e e_mask b b_mask c`)
    made the second pair the prompt and labelled b_mask.png as an image, exit 0."""
    from PAMSegmentLib import cli

    f = image_set
    front = ["--labelled", f["b"], f["b"].replace("b.png", "b_mask.png")] if labelled else []
    if labelled:
        _png(tmp_path / "b_mask.png", np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(f["a_mask"]))))
    out = tmp_path / "out"
    code = cli.main(["label-images", *front, f["e"], f["e_mask"], f["a"], f["a_mask"], f["c"], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "a_mask.png looks like the mask of a.png (2 values)" in err
    assert ("one --labelled takes one pair: repeat it for each" in err) == labelled
    assert (f"give it as --labelled {f['a']} {f['a_mask']}" in err) == (not labelled)


def test_a_grey_image_named_like_a_mask_is_still_labelled(tmp_path, image_set):
    """The refusal needs a few label values: a real image named x_mask beside x is labelled as asked."""
    from PAMSegmentLib import cli

    f = image_set
    grey = _png(tmp_path / "c_mask.png", np.random.default_rng(1).integers(0, 255, (48, 48)))
    out = tmp_path / "out"
    assert cli.main(["label-images", f["e"], f["e_mask"], f["c"], grey, "-o", str(out), "--method", "copy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c_mask.png", "c_mask_mask.png", "e_mask.png", "labels.csv"]


@pytest.mark.parametrize("error, device, says", [
    (MemoryError(), "cpu", "not enough memory for the job (MemoryError); close other programs"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 4.00 GiB total capacity)"), "cuda",
     "not enough memory on the GPU for the job (CUDA out of memory."),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8589934592 bytes"), "cpu", "not enough memory for the job ([enforce fail"),
])
def test_a_slicer_job_that_runs_out_of_memory_says_what_to_do(request, monkeypatch, error, device, says):
    """A trial (session 36): the panel said "Failed (nothing was changed): MemoryError" (or PyTorch's
    raw CUDA text) with a traceback in the Error Log; it now says what ran out and what to do."""
    request.getfixturevalue("mrml_scene")
    import logging

    import PAMSegmentLib.mrml as mrml
    from conftest_mrml import assert_same_labelmap, internal_labelmap_state, make_segmentation, make_volume_node
    from test_mrml_corrections import CENTER, GuideCopy, one_slice, synthetic

    truth, image = synthetic()
    vol = make_volume_node(image)
    seg, ids = make_segmentation(vol, {"tumor": one_slice(truth, CENTER[0])})
    before = internal_labelmap_state(seg, ids["tumor"])

    def runs_out(*args, **kwargs):
        raise error

    monkeypatch.setattr(mrml, "_run_engine", runs_out)
    monkeypatch.setattr(mrml, "_load_model", lambda checkpoint, device: GuideCopy(truth))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    mrml.log.addHandler(handler)
    try:
        job = mrml.SegmentPropagation(vol, seg, ids["tumor"], checkpoint="x.pt", device=device).start()
        assert job.wait(30) and job.state == "failed"
        job.log_failure()
    finally:
        mrml.log.removeHandler(handler)
    assert says in job.error and job.error.count("not enough") == 1
    assert ("choose device cpu" in job.error) == (device == "cuda")
    assert ("close other programs" in job.error) == (device == "cpu")
    assert records == []  # it says itself: no traceback
    assert_same_labelmap(internal_labelmap_state(seg, ids["tumor"]), before)


def _square_with_rim(rim_values):
    """A 20 x 20 square of 255 whose outer rings are rim_values[0], rim_values[1] ... (an anti-aliased edge)."""
    from scipy import ndimage

    m = np.zeros((64, 64), np.uint8)
    inside = np.zeros((64, 64), bool)
    inside[22:42, 22:42] = True
    m[inside] = 255
    for value in rim_values:
        ring = ndimage.binary_dilation(inside) & ~inside
        m[ring] = value
        inside |= ring
    return m


@pytest.mark.parametrize("mask, says", [
    (_square_with_rim([127]), "label 127 lies only along the edges of another label"),
    (_square_with_rim([191, 64]), "labels 64, 191 lie only along the edges of another label"),
    (_square_with_rim([]), None),
    (np.repeat(np.repeat(np.array([[0, 0, 0, 0], [0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 0, 0]], np.uint8), 16, 0), 16, 1),
     None),  # two structures side by side
])
def test_a_few_grey_steps_along_an_edge_are_noted(tmp_path, mask, says):
    """Session 35's trial: a mask saved anti-aliased with 2-4 grey steps (0/127/255) was labelled as
    several structures without a word (the refusal of such masks starts at 5 grey values, where a
    drawn rim cannot be one of them)."""
    from PAMSegmentLib.volumes import read_labelmap_2d

    notes = []
    arr = read_labelmap_2d(_png(tmp_path / "m_mask.png", mask), say=notes.append)
    assert np.array_equal(arr, mask)  # read as drawn
    if says is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(f"m_mask.png: {says}; if the mask was resized")


def test_label_images_prints_the_grey_step_note(tmp_path, image_set, capsys):
    from PAMSegmentLib import cli

    f = image_set
    mask = _png(tmp_path / "rim_mask.png", _square_with_rim([127])[8:56, 8:56])
    assert cli.main(["label-images", f["e"], mask, f["c"], "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    assert "note: rim_mask.png: label 127 lies only along the edges" in capsys.readouterr().out


def test_a_png_result_falling_back_to_tiff_says_the_earlier_png_is_not_this_runs(tmp_path, monkeypatch, capsys):
    """A trial (session 36): when a .png run found more than 65535 cells it wrote res.tif, and an
    earlier run's res.png and res.png.csv stayed beside it without a word."""
    from PAMSegmentLib import cli
    from test_cells import _more_cells_than_a_png_holds, disc_image

    image, ref = disc_image()
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(tmp_path / "slide.tif"))
    sitk.WriteImage(sitk.GetImageFromArray(np.where(np.isin(ref, [1, 4, 16]), ref, 0).astype(np.uint8)),
                    str(tmp_path / "ex.png"))
    run = ["label-cells", str(tmp_path / "slide.tif"), str(tmp_path / "ex.png"), "-o", str(tmp_path / "res.png")]
    assert cli.main(run) == 0  # a first run that fits a PNG
    assert "do not fit" not in capsys.readouterr().out
    earlier = (tmp_path / "res.png").read_bytes(), (tmp_path / "res.png.csv").read_bytes()
    _more_cells_than_a_png_holds(monkeypatch)
    assert cli.main(run) == 0
    assert ("writing res.tif instead; res.png and res.png.csv, from an earlier run, are left as they were: not this "
            "run's result") in capsys.readouterr().out
    assert ((tmp_path / "res.png").read_bytes(), (tmp_path / "res.png.csv").read_bytes()) == earlier


def _nuclei():
    from pathlib import Path

    data = np.load(Path(__file__).parent / "data" / "stardist_nuclei_crop.npz")
    image, labels = data["image"].astype(np.float32), data["labels"].astype(np.int32)
    ids, areas = np.unique(labels, return_counts=True)
    whole = [int(i) for i, a in zip(ids[1:], areas[1:]) if a > 150]  # not cut by the crop's edge
    return image, labels, whole


@pytest.mark.parametrize("flip", [None, "left-right", "up-down"])
def test_examples_drawn_on_a_flipped_copy_are_warned_about(flip):
    """A trial (session 36): examples outlined on a flipped copy of the image found 212 cells, F1
    0.01, with only the usual note; now a warning asks whether they lie on this image's cells."""
    from PAMSegmentLib.cells import label_cells

    image, labels, whole = _nuclei()
    examples = np.where(np.isin(labels, whole[:4]), labels, 0)
    examples = {None: examples, "left-right": examples[:, ::-1], "up-down": examples[::-1]}[flip]
    said = [w for w in label_cells(image, examples).warnings if "were they drawn on a flipped copy?" in w]
    assert len(said) == (0 if flip is None else 1)
    if flip is not None:
        assert f"only when mirrored {'left-right' if flip == 'left-right' else 'upside down'}" in said[0]


def _touching_pairs_image():
    """A 200 x 200 noisy image with 12 pairs of touching bright discs (radius 7, centres 13 px
    apart), each pair labelled as one cell."""
    rng = np.random.default_rng(0)
    r, c = np.ogrid[:200, :200]
    pairs = np.zeros((200, 200), np.int32)
    for n, (cy, cx) in enumerate([(25 + 50 * i, 20 + 60 * j) for i in range(4) for j in range(3)], 1):
        pairs[((r - cy) ** 2 + (c - cx) ** 2 <= 49) | ((r - cy) ** 2 + (c - cx - 13) ** 2 <= 49)] = n
    return (np.where(pairs > 0, 120.0, 30.0) + rng.normal(0, 8, pairs.shape)).astype(np.float32), pairs


def test_examples_that_are_all_touching_pairs_are_warned_about():
    """A trial (session 36): in a 0/255 mask where every example is two touching cells, none is
    larger than the others, so the size warning never came (180 cells found, radius 18.6 for 13)."""
    from PAMSegmentLib.cells import label_cells

    image, pairs = _touching_pairs_image()
    binary = np.isin(pairs, [1, 5, 9]).astype(np.uint8)  # three pairs, one label
    said = [w for w in label_cells(image, binary).warnings if "rounder parts" in w]
    assert len(said) == 3 and all(w.startswith("the example at row ") for w in said)
    # the same pairs' cells drawn one label each (split down the middle): nothing to say
    split = np.where(binary > 0, 1 + (np.arange(200)[None, :] % 60 >= 27), 0) * binary
    split = split + np.where(binary > 0, 2 * np.isin(pairs, [5]) + 4 * np.isin(pairs, [9]), 0)
    assert not [w for w in label_cells(image, split).warnings if "rounder parts" in w or "times the other" in w]


@pytest.mark.parametrize("given, says", [("folder", "folder is a folder; give a file name (e.g. {}/cells.tif)"),
                                         ("new/", "new/ names a folder (it ends with a slash); give a file name "
                                                  "(e.g. {}/cells.tif)")])
def test_label_cells_given_a_folder_suggests_a_cell_map_name(tmp_path, given, says, capsys):
    """A trial (session 36): `label-cells ... -o folder` suggested folder/result.nii.gz (propagate's
    name), and `-o new/` (not yet made) said only that the format could not be told."""
    from PAMSegmentLib import cli

    image, ref = _nuclei()[:2]
    _png(tmp_path / "img.png", image / image.max() * 255)
    _png(tmp_path / "ex.png", np.isin(ref, _nuclei()[2][:3]) * ref)
    (tmp_path / "folder").mkdir()
    out = f"{tmp_path}/{given}"  # (a Path would drop the slash)
    assert cli.main(["label-cells", str(tmp_path / "img.png"), str(tmp_path / "ex.png"), "-o", out]) == 2
    target = str(tmp_path / given.rstrip("/"))
    assert f"error: {tmp_path}/{says.format(target)}" in capsys.readouterr().err


@pytest.mark.parametrize("opaque", [True, False])
def test_label_cells_says_a_transparency_channel_is_left_out(tmp_path, opaque, capsys):
    """A trial (session 36): a half-transparent RGBA image gave exactly an opaque one's result
    without a word (transparency does not mark background)."""
    from PAMSegmentLib import cli

    image, ref, whole = _nuclei()
    grey = (image / image.max() * 255).astype(np.uint8)
    alpha = np.full(grey.shape, 255, np.uint8)
    if not opaque:
        alpha[:, :64] = 0  # a quarter see-through
    rgba = np.stack([grey, grey, grey, alpha], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "img.png"))
    _png(tmp_path / "ex.png", np.isin(ref, whole[:4]) * ref)
    assert cli.main(["label-cells", str(tmp_path / "img.png"), str(tmp_path / "ex.png"),
                     "-o", str(tmp_path / "cells.tif")]) == 0
    said = "note: img.png: its alpha (transparency) channel is left out (25 % of the pixels are not opaque)"
    assert (said in capsys.readouterr().out) == (not opaque)


@pytest.mark.parametrize("side, channels, peak_gb", [(2048, 3, 1.67), (3072, 3, 2.09), (2560, 1, 1.01),
                                                      (3072, 1, 1.02)])
def test_the_cell_memory_estimate_covers_the_measured_peaks(side, channels, peak_gb):
    """A trial (session 36): the check before label-cells underestimated mid-size colour images
    (a 2048 px colour crop peaked at 1.67 GB, VmHWM, against 1.38 estimated) and passed them where
    they then ran out of memory. The peaks measured that session (/proc VmHWM of `label-cells` on
    crops of a 4000 px H&E-like image, 4 examples, the default tile) are now covered."""
    from PAMSegmentLib.cells import cells_memory_bytes

    assert peak_gb * 1e9 <= cells_memory_bytes(side, side, channels, 1024) <= 1.3 * peak_gb * 1e9


def test_a_second_manifest_does_not_replace_another_manifests_result_from_another_image(tmp_path, capsys):
    """A trial (session 36): two sites' manifests, both `p01/ct.nii.gz,p01/prompt.nii.gz`, run into
    one -o folder: the same default output name, so the second run replaced the first's result
    from another scan without a word (and the first's --skip-existing then said its image had
    "changed since"). Now refused before any work; the same image in another manifest (redrawn
    prompts) still replaces its output, as before."""
    import shutil

    from conftest import make_ct_case
    from PAMSegmentLib.cli import main

    for site, seed in (("A", 0), ("B", 1)):
        case = make_ct_case(tmp_path / site / "p01", seed=seed)
        shutil.move(case.image_path, tmp_path / site / "p01" / "ct.nii.gz")
        (tmp_path / site / "cases.csv").write_text("image,prompt\np01/ct.nii.gz,p01/prompt.nii.gz\n")
    out = tmp_path / "results"
    result = out / "p01_ct_pam.nii.gz"
    assert main(["batch", str(tmp_path / "A" / "cases.csv"), "-o", str(out), "--method", "copy"]) == 0
    made_by_a = result.read_bytes()
    capsys.readouterr()
    assert main(["batch", str(tmp_path / "B" / "cases.csv"), "-o", str(out), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert (f"error: cases.csv row 2: its output {result} holds another manifest's result ({tmp_path}/A/cases.csv, "
            f"made from {tmp_path}/A/p01/ct.nii.gz), which this run would replace; give the row an output column"
            ) in err
    assert result.read_bytes() == made_by_a
    # a manifest of redrawn prompts for A's image, into the same folder: replaces it as asked
    (tmp_path / "A" / "redrawn.csv").write_text("image,prompt\np01/ct.nii.gz,../B/p01/prompt.nii.gz\n")
    assert main(["batch", str(tmp_path / "A" / "redrawn.csv"), "-o", str(out), "--method", "copy"]) == 0
    # the same manifest with another image in its row: said to be another image, not "changed since"
    capsys.readouterr()
    (tmp_path / "A" / "redrawn.csv").write_text("image,prompt,output\n../B/p01/ct.nii.gz,../B/p01/prompt.nii.gz,"
                                                 f"{result}\n")
    assert main(["batch", str(tmp_path / "A" / "redrawn.csv"), "-o", str(out), "--method", "copy",
                 "--skip-existing"]) == 0
    assert (f"run again: its image is not the one its output was made from (it was made from {tmp_path}/A/p01/"
            "ct.nii.gz)") in capsys.readouterr().err


@pytest.mark.parametrize("rows, says", [
    (["c0/image.nii.gz,c0/prompt.nii.gz", "c0/image.nii.gz,c1/prompt.nii.gz"],
     "cases.csv row 3: its image is row 2's too, so it gets the same default output name (c0_image_pam.nii.gz); "
     "give the rows output names (an output column)\n"),
    (["c0/image.nii.gz,c0/prompt.nii.gz", "c0/image.nii.gz,c0/prompt.nii.gz"],
     "cases.csv row 3 repeats row 2 (the same image, prompt, output, labels and series); remove one"),
    (["c0/image.nii.gz,c0/prompt.nii.gz,,1 2", "c0/image.nii.gz,c0/prompt.nii.gz,,2 1"],  # the same labels
     "cases.csv row 3 repeats row 2 (the same image, prompt, output, labels and series); remove one"),
    (["c0/image.nii.gz,c0/prompt.nii.gz,,", "c0/image.nii.gz,c0/prompt.nii.gz,,2"],
     "give the rows output names (an output column), or drop row 3: a row without a label column takes every "
     "label of its prompt"),
    (["c0/image.nii.gz,c0/prompt.nii.gz,,1", "c0/image.nii.gz,c0/prompt.nii.gz,,2"],  # (a re-review: "remove one")
     "cases.csv row 3: its image is row 2's too, so it gets the same default output name (c0_image_pam.nii.gz); "
     "give the rows output names (an output column), or list both rows' labels in one row's label column (1 2)"),
    (["data/c0/image.nii.gz,data/c0/prompt.nii.gz"],
     "(relative paths are read from the manifest's folder, {base}; data/c0/image.nii.gz exists from the current "
     "folder: write it relative to the manifest's folder, or absolute)"),
])
def test_common_first_manifest_mistakes_are_said_as_they_are(tmp_path, monkeypatch, rows, says, capsys):
    """A trial (session 36): two structures of one scan (or a repeated row) were told "(names that
    differ only in case are one file on macOS and Windows)"; paths written from the working folder
    got only "does not exist"."""
    from conftest import make_ct_case
    from PAMSegmentLib.cli import main

    for n in range(2):
        make_ct_case(tmp_path / "data" / f"c{n}", seed=n)
    manifest = tmp_path / "data" / "cases.csv"
    manifest.write_text("\n".join(["image,prompt,output,label", *rows]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert says.format(base=tmp_path / "data") in err and "only in case" not in err
    assert not (tmp_path / "out").exists()


def test_the_server_log_says_every_refused_job(caplog):
    """A trial (session 36): an upload over --max-upload-mb (413) and a full queue (503) left no
    line in the server's log, though README says it logs every refused request."""
    pytest.importorskip("fastapi")
    import logging

    from doubles import OracleModel
    from fastapi.testclient import TestClient
    from test_server import npz

    from PAMSegmentLib.server import create_app

    truth = np.zeros((16, 24, 24), np.uint8)
    truth[4:12, 8:16, 8:16] = 1
    prompt = np.zeros_like(truth)
    prompt[8] = truth[8]
    body = npz(image=truth.astype(np.float32), prompt=prompt, spacing=np.ones(3))
    client = TestClient(create_app(lambda m: OracleModel(truth), max_upload_mb=0.01))
    with caplog.at_level(logging.INFO, logger="pamsegment.server"):
        assert client.post("/jobs", content=body).status_code == 413
    assert [r.getMessage() for r in caplog.records if r.name == "pamsegment.server"] == [
        "refused a job from testclient: the upload is 0.05 MB; this server takes at most 0.01 MB"]


def test_https_to_the_plain_http_server_says_to_use_http(monkeypatch):
    """A trial (session 36): --server https://... against `pamsegment serve` said "cannot reach ...
    is pamsegment serve running there?" while it ran: the scheme was wrong."""
    import ssl
    import urllib.error
    import urllib.request

    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import RemoteModel

    def tls_to_plain(*args, **kwargs):
        raise urllib.error.URLError(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"))

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", tls_to_plain)
    with pytest.raises(PAMError, match=r"the server at https://127\.0\.0\.1:18765 does not speak HTTPS \(.*WRONG_VERSION"
                                       r".*\): `pamsegment serve` answers plain HTTP, so use http://127\.0\.0\.1:18765"):
        RemoteModel("https://127.0.0.1:18765").info()


def test_a_job_first_in_line_with_none_running_is_not_said_to_wait():
    """A trial (session 36): between its submission and the worker taking it, an idle server's job
    was reported at "queue position 1" to its client while the log said it ran at once."""
    pytest.importorskip("fastapi")
    from PAMSegmentLib.server import Job, JobQueue

    queue = JobQueue(lambda job: b"")
    try:
        with queue._lock:  # the worker cannot take a job meanwhile
            first, second = (Job(name, None, None, (1, 1, 1), {}) for name in ("a", "b"))
            queue.jobs.update(a=first, b=second)
            assert (queue.position(first), queue.position(second)) == (0, 1)  # idle: the first is next
            first.state = "running"
            third = Job("c", None, None, (1, 1, 1), {})
            queue.jobs["c"] = third
            assert (queue.position(first), queue.position(second), queue.position(third)) == (0, 1, 2)
            first.state = second.state = third.state = "cancelled"
    finally:
        queue.close(5)


UID = "1.2.826.0.1.3680043.2.1125.36.1"


def _series(tmp_path, shape=(12, 20, 22), spacing=(2.0, 0.9, 0.7)):
    from test_volumes import make_volume, write_dicom_series

    vol = make_volume(shape=shape, spacing=spacing, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_dicom_series(tmp_path / "series", vol, UID)
    return tmp_path / "series", vol


def _screenshot(path, rows, cols):
    """A colour secondary capture under the series' UID, without a position or orientation."""
    shot = sitk.GetImageFromArray(np.full((rows, cols, 3), 200, np.uint8), isVector=True)
    for tag, value in {"0008|0016": "1.2.840.10008.5.1.4.1.1.7", "0008|0018": f"{UID}.999", "0008|0060": "OT",
                       "0020|000d": "1.2.826.0.1.3680043.2.1125.7.1", "0020|000e": UID}.items():
        shot.SetMetaData(tag, value)
    from test_volumes import write_dicom_file

    write_dicom_file(shot, path)


def test_a_screenshot_filed_with_the_scan_is_left_out_not_stacked_as_a_slice(tmp_path):
    """A trial (session 36): an RGB screenshot of the scan's size under its SeriesInstanceUID was
    stacked as a slice (22 slices 43.67 mm apart, exit 0); the prompt then refused or misplaced."""
    from PAMSegmentLib.volumes import read_volume

    folder, vol = _series(tmp_path)
    _screenshot(folder / "slice999.dcm", 20, 22)
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) of series .* whose orientation, size, colour or "
                                         r"position information differs from the other 12 \(slice999\.dcm"):
        got = read_volume(folder)
    assert got.shape == vol.shape and np.array_equal(got.array, vol.array)
    np.testing.assert_allclose(got.spacing, vol.spacing, atol=1e-3)


def test_a_copy_of_a_slice_file_is_left_out_with_a_note(tmp_path):
    """A trial (session 36): a slice file copied under another name (the same SOPInstanceUID) was
    refused as "several echoes or phases in one series"."""
    import shutil

    from PAMSegmentLib.volumes import read_volume

    folder, vol = _series(tmp_path)
    shutil.copy(folder / "slice005.dcm", folder / "slice005 copy.dcm")
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) of series .* that repeat another file's "
                                         r"SOPInstanceUID \(slice005( copy)?\.dcm \(= slice005( copy)?\.dcm\)"):
        got = read_volume(folder)
    assert np.array_equal(got.array, vol.array)


def test_a_spacing_that_changes_part_way_is_said_so_not_echoes(tmp_path):
    """A trial (session 36): 6 slices 2 mm apart then 6 slices 2.5 mm apart were called "slice
    positions occupied more than once (several echoes or phases)"."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import Volume, read_volume

    first = make_volume(shape=(6, 20, 22), spacing=(2.0, 0.9, 0.7), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    second = Volume(first.array, (2.5, 0.9, 0.7), (first.origin[0], first.origin[1], first.origin[2] + 12.5),
                    first.direction)
    write_dicom_series(tmp_path / "series", first, UID)
    write_dicom_series(tmp_path / "series", second, UID, prefix="later", instance_prefix="2")
    with pytest.raises(InputError, match=r"is not evenly spaced: its slice spacing varies from 2 to 2\.5 mm; convert "
                                         r"it with a tool that resamples") as refused:
        read_volume(tmp_path / "series")
    assert "echoes" not in str(refused.value)


def test_batch_says_a_file_missing_from_a_dicom_folder_not_resample(tmp_path, capsys):
    """A trial (session 36): a series with its middle file gone was refused before a batch's work
    as "size differs ...; use --resample-prompt" (propagate said "missing files?")."""
    from test_batch import _dicom_case

    from PAMSegmentLib.cli import main

    manifest = _dicom_case(tmp_path, UID)
    (tmp_path / "p01" / "slice006.dcm").unlink()
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--method", "copy"]) == 2
    err = capsys.readouterr().err
    assert (f"cases.csv row 2: p01_prompt.nrrd has 12 slices but the DICOM series in {tmp_path}/p01 has 11 files, "
            "with a gap of 1 slice between them: is a file missing from the folder? Put it back (resampling the "
            "prompt would not mend the series)") in err and "--resample-prompt" not in err


def test_a_dicomdir_given_as_the_image_names_the_series_folders(tmp_path):
    """A trial (session 36): the DICOMDIR file itself, the first thing a CD user tries, got "cannot
    read ... (Unable to determine ImageIO reader)"."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    write_dicom_series(tmp_path / "cd" / "PT0" / "ST0" / "SE0", make_volume(shape=(4, 6, 7)), UID)
    (tmp_path / "cd" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(InputError, match=r"^.*cd/DICOMDIR is the index of a DICOM disc, not an image: pass the folder "
                                         r"of one series \(.*cd/PT0/ST0/SE0\)$"):
        read_volume(tmp_path / "cd" / "DICOMDIR")


def test_a_glob_naming_the_prompts_own_mask_among_the_images_still_runs(tmp_path, image_set):
    """A re-review (session 36): `label-images a.png a_mask.png *.png` (the glob names the prompt's
    mask beside its image, which is left out of the images anyway) was refused by the check above."""
    from PAMSegmentLib import cli

    f = image_set
    out = tmp_path / "out"
    glob = sorted(str(p) for p in tmp_path.glob("*.png"))  # a, a_mask, b, c, e, e_mask
    assert cli.main(["label-images", f["a"], f["a_mask"], *[g for g in glob if "e" not in g.rsplit("/", 1)[1]],
                     "-o", str(out), "--method", "copy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "b_mask.png", "c_mask.png", "labels.csv"]


@pytest.mark.parametrize("reason", ["[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
                                    "[SSL] record layer failure (_ssl.c:1000)"])
def test_https_hint_with_old_and_new_openssl(monkeypatch, reason):
    """A re-review (session 36): OpenSSL 3.2 and later report TLS spoken to a plain-HTTP server as
    "record layer failure", which the hint missed."""
    import ssl
    import urllib.error
    import urllib.request

    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import RemoteModel

    def tls_to_plain(*args, **kwargs):
        raise urllib.error.URLError(ssl.SSLError(1, reason))

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", tls_to_plain)
    with pytest.raises(PAMError, match=r"does not speak HTTPS .* so use http://127\.0\.0\.1:18765"):
        RemoteModel("https://127.0.0.1:18765").info()


@pytest.mark.parametrize("share, said", [(1.0, "(no pixel is opaque)"), (0.25, "(25 % of the pixels are not opaque)")])
def test_the_alpha_note_says_its_share_plainly(tmp_path, share, said):
    """A re-review (session 36): an image whose alpha is under 255 everywhere was said as '1e+02 %'."""
    from PAMSegmentLib.volumes import read_image_2d

    rgba = np.full((20, 20, 4), 255, np.uint8)
    rgba[:, : int(20 * share), 3] = 128
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "x.png"))
    notes = []
    read_image_2d(tmp_path / "x.png", keep_colour=True, say=notes.append)
    assert len(notes) == 1 and said in notes[0] and "alpha (transparency) channel" in notes[0]


def test_a_dicomdir_beside_its_series_names_its_own_folder(tmp_path):
    """A re-review (session 36): on a flat disc (the images beside DICOMDIR) the message named no
    folder."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    write_dicom_series(tmp_path / "flat", make_volume(shape=(4, 6, 7)), UID)
    (tmp_path / "flat" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(InputError, match=rf"pass the folder of one series \({tmp_path}/flat\)$"):
        read_volume(tmp_path / "flat" / "DICOMDIR")


def test_a_prompt_on_the_images_voxels_with_an_axis_reversed_is_said_to_resample_exactly(tmp_path):
    """A trial (session 36): a prompt saved by a dcm2niix-like conversion (j reversed: the same
    voxels) was refused as 'origin, direction differ' like any other grid; --resample-prompt puts it
    back exactly, which the refusal now says."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import Volume, read_labelmap

    image = Volume(np.zeros((6, 8, 10), np.int16), (2.0, 0.8, 0.7), (-10.0, 20.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    drawn = np.zeros((6, 8, 10), np.uint8)
    drawn[3, 2:5, 3:7] = 1
    end = 20.0 + 0.8 * 7  # the last row's y: the reversed file's origin
    stored = Volume(drawn[:, ::-1, :].copy(), image.spacing, (-10.0, end, 5.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    from PAMSegmentLib.volumes import write_volume

    path = write_volume(stored, tmp_path / "prompt.nii.gz")
    with pytest.raises(InputError, match=r"it lies on the image's own voxels, stored with its j axis reversed .*so "
                                         r"resample=True puts it back exactly$"):
        read_labelmap(path, reference=image)
    assert np.array_equal(read_labelmap(path, reference=image, resample=True).array, drawn)


def test_a_prompt_drawn_on_every_slice_of_its_extent_is_said_to_be_the_result(tmp_path):
    """A trial (session 36): a finished segment given as the prompt (a kidney on 22 of 118 sagittal
    slices, under both keyframe limits) came back unchanged with only the drift test's hint."""
    from doubles import OracleModel

    from PAMSegmentLib.propagate import propagate

    truth = np.zeros((20, 24, 24), np.uint8)
    truth[6:12, 8:16, 8:16] = 1
    image = np.where(truth > 0, 100.0, 0.0).astype(np.float32)
    whole = propagate(image, truth, spacing=(1.0, 1.0, 1.0), model=OracleModel(truth.astype(bool)), axis=0)
    said = [text for kind, text in whole.kinds_of_notes() if kind == "whole"]
    assert said == ["label 1: drawn on every slice from 6 to 11 and found on no other, so the result is the drawing "
                    "itself (a finished segmentation given as the prompt?); to propagate, give one drawn slice or a "
                    "few apart"]
    one = np.zeros_like(truth)
    one[6:9] = truth[6:9]  # three slices of an object that goes on: found beyond them, nothing said
    grown = propagate(image, one, spacing=(1.0, 1.0, 1.0), model=OracleModel(truth.astype(bool)), axis=0)
    assert [kind for kind, _ in grown.kinds_of_notes()].count("whole") == 0


@pytest.mark.parametrize("given, says", [
    ("scan.nii.gz", "the image is a file path ('scan.nii.gz'); pass an array: read the file with "
                    "PAMSegmentLib.volumes.read_volume"),
    (None, "the image is None; pass an array"),
    ([[[1.0, 2.0], [3.0]]], "the image cannot be read as a numpy array (ValueError: "),
    ("requires_grad", "the image cannot be read as a numpy array (RuntimeError: Can't call numpy() on Tensor that "
                      "requires grad"),
])
def test_what_numpy_cannot_convert_is_one_input_error(given, says):
    """A Python API trial (session 36): a torch tensor that requires grad, a bfloat16 tensor or a
    ragged list raised torch's RuntimeError, a TypeError or numpy's ValueError; a file path said
    'got 0D with shape ()'."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import propagate

    if given == "requires_grad":
        import torch

        given = torch.zeros((6, 10, 10), requires_grad=True)
    prompt = np.zeros((6, 10, 10), np.uint8)
    prompt[3, 2:5, 2:5] = 1
    with pytest.raises(InputError) as refused:
        propagate(given, prompt, (1.0, 1.0, 1.0), model="copy")
    assert str(refused.value).startswith(says)


def test_label_images_refuses_nan_pixels_as_the_other_entry_points_do():
    """A Python API trial (session 36): label_images set NaN/inf pixels to the image's minimum
    without a word (an all-NaN image came back 'not found'); propagate and label_cells refuse them."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.imageset import label_images

    rng = np.random.default_rng(0)
    images = [rng.random((24, 24)).astype(np.float32) for _ in range(3)]
    images[2][5:9, 5:9] = np.nan
    mask = np.zeros((24, 24), np.uint8)
    mask[8:16, 8:16] = 1
    with pytest.raises(InputError, match=r"^image 2 holds 16 NaN/inf pixels; replace them with finite values"):
        label_images(images, 0, mask, model="copy")


def test_label_cells_keeps_the_examples_as_drawn_when_found_foreground_rings_them():
    """A Python API trial (session 36): on a constant image the found foreground filled the examples
    in as holes and one found cell took both ('1 cells (2 drawn as examples, -1 found)')."""
    from PAMSegmentLib.cells import label_cells

    image = np.full((64, 64), 100.0, np.float32)
    examples = np.zeros((64, 64), np.uint8)
    examples[10:16, 10:16] = 1
    examples[40:46, 40:46] = 2
    result = label_cells(image, examples)
    assert np.array_equal(result.labels[examples > 0], examples[examples > 0])  # kept exactly
    drawn = [c for c in result.cells if c["example"]]
    assert len(drawn) == 2 and "-" not in result.summary()


def test_a_four_channel_array_given_to_label_cells_is_said_to_lose_its_fourth():
    from test_cells import disc_image

    from PAMSegmentLib.cells import label_cells

    image, ref = disc_image()
    rgba = np.stack([image, image, image, np.full_like(image, 255)], axis=-1)
    rgba[:10, :, 3] = 0  # partly transparent
    said = label_cells(rgba, np.where(np.isin(ref, [1, 4, 16]), ref, 0)).warnings
    assert said[0].startswith("the image's 4th channel (alpha?) was left out")


def test_bad_inference_settings_are_input_errors_naming_text_as_text():
    """A Python API trial (session 36): dataclasses.replace(model.inference, through_plane_mm="1.5")
    raised a plain ValueError saying 'got 1.5'."""
    import dataclasses

    from PAMSegmentLib.checkpoints import InferenceParams
    from PAMSegmentLib.errors import InputError

    with pytest.raises(InputError, match=r"through_plane_mm must be 0 \(off\) or within .* got '1\.5'$"):
        dataclasses.replace(InferenceParams(), through_plane_mm="1.5")


def test_a_fractional_prompt_names_a_value_and_what_to_do():
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import propagate

    prompt = np.zeros((6, 10, 10))
    prompt[3, 2:5, 2:5] = 0.5
    with pytest.raises(InputError, match=r"^the prompt must be an integer label map, but it holds 0\.5: a probability "
                                         r"or a mask resampled with interpolation\? Threshold it"):
        propagate(np.zeros((6, 10, 10), np.float32), prompt, (1.0, 1.0, 1.0), model="copy")


def test_no_whole_note_where_the_range_or_walls_stopped_the_walks():
    """A re-review (session 36): a drawing limited on purpose by range= or walls got the 'finished
    segmentation?' note; only walks that went out and found nothing say so."""
    from doubles import OracleModel

    from PAMSegmentLib.propagate import propagate

    truth = np.zeros((20, 24, 24), np.uint8)
    truth[4:16, 8:16, 8:16] = 1
    image = np.where(truth > 0, 100.0, 0.0).astype(np.float32)
    drawn = np.zeros_like(truth)
    drawn[7:10] = truth[7:10]
    for options in ({"range": (7, 9)}, {"empty_slices": [6, 10]}):
        result = propagate(image, drawn, (1.0, 1.0, 1.0), model=OracleModel(truth.astype(bool)), axis=0, **options)
        assert "whole" not in [kind for kind, _ in result.kinds_of_notes()], options


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_prompt_holding_nan_is_not_told_to_be_thresholded(bad):
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import propagate

    prompt = np.zeros((6, 10, 10))
    prompt[3, 2:5, 2:5] = 1
    prompt[3, 0, 0] = bad
    with pytest.raises(InputError, match=r"^the prompt holds NaN or infinite values; replace them"):
        propagate(np.zeros((6, 10, 10), np.float32), prompt, (1.0, 1.0, 1.0))


def test_read_image_2ds_pair_given_as_an_image_is_said_so():
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.imageset import label_images

    pair = (np.zeros((24, 24), np.float32), sitk.Image(24, 24, sitk.sitkFloat32))
    with pytest.raises(InputError, match=r"is a pair \(array, image\), as read_image_2d returns it; pass its array"):
        label_images([pair, np.zeros((24, 24), np.float32)], 0, np.ones((24, 24), np.uint8))


def test_an_opaque_fourth_channel_is_not_warned_about():
    from test_cells import disc_image

    from PAMSegmentLib.cells import label_cells

    image, ref = disc_image()
    rgba = np.stack([image, image, image, np.full_like(image, 255)], axis=-1).clip(0, 255).astype(np.uint8)
    said = label_cells(rgba, np.where(np.isin(ref, [1, 4, 16]), ref, 0)).warnings
    assert not [w for w in said if "4th channel" in w]


def _nifti_with_codes(path, codes):
    """A small NIfTI written by SimpleITK, its (qform_code, sform_code) then set in its header."""
    import gzip
    import struct

    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((-90.0, -126.0, -72.0))
    sitk.WriteImage(image, str(path))
    data = bytearray(gzip.open(path).read())
    struct.pack_into("<hh", data, 252, *codes)
    with gzip.open(path, "wb") as fh:
        fh.write(data)
    return path


@pytest.mark.parametrize("codes", [(0, 4), (2, 2), (1, 1)])
def test_a_nifti_label_map_keeps_the_images_space_codes(tmp_path, codes):
    """A trial (session 36): an MNI-template image (sform code 4) gave a result written with code 1
    (scanner): FSLeyes and AFNI then show it in another space than its image. The grid is the same
    either way; the codes now follow the image's."""
    import gzip
    import struct

    from PAMSegmentLib.volumes import read_labelmap, read_volume, write_labelmap

    image = read_volume(_nifti_with_codes(tmp_path / "t1.nii.gz", codes))
    assert image.nifti_codes == codes
    out = write_labelmap(np.ones(image.shape, np.uint8), image, tmp_path / "out.nii.gz")
    assert struct.unpack_from("<hh", gzip.open(out).read(348), 252) == codes
    back = read_labelmap(out, reference=image)  # on the image's grid, as ITK reads it
    assert np.array_equal(back.array, np.ones(image.shape, np.uint8))
    nrrd = write_labelmap(np.ones(image.shape, np.uint8), image, tmp_path / "out.nrrd")  # other formats: as before
    assert read_labelmap(nrrd, reference=image).shape == image.shape


def test_a_sheared_nifti_is_not_called_damaged(tmp_path):
    """A trial (session 36): a NIfTI whose sform is slightly sheared (and no qform), as nibabel or
    SPM write one, was refused as 'is the file damaged? copy or download it again'."""
    import gzip
    import struct

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    path = _nifti_with_codes(tmp_path / "sheared.nii.gz", (0, 2))
    data = bytearray(gzip.open(path).read())
    rows = [(-1.0, 0.05, 0.0, 90.0), (0.0, -1.0, 0.0, 126.0), (0.0, 0.0, 2.0, -72.0)]  # x leans with j
    for n, row in enumerate(rows):
        struct.pack_into("<4f", data, 280 + 16 * n, *row)
    with gzip.open(path, "wb") as fh:
        fh.write(data)
    with pytest.raises(InputError, match=r"its grid is not orthogonal \(a sheared affine.*resample it onto an "
                                         r"orthogonal grid") as refused:
        read_volume(path)
    assert "damaged" not in str(refused.value)
