"""Fixes from session 28's reviews (each test failed on the code before its fix)."""
from __future__ import annotations

import numpy as np


def _edited_copy(src, dst, change):
    """A copy of the label map ``src`` at ``dst``, its array changed in place by ``change``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(src))
    array = sitk.GetArrayFromImage(image)
    change(array)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(dst))


def test_bands_whose_two_end_pieces_overlap_are_still_one_tilted_outline():
    """One outline painted across thin slices of an oblique volume leaves disjoint bands, but the
    small pieces at its rounded ends may overlap their neighbour by more than half: one such pair
    made the whole drawing count as deliberate keyframes (11-17 slivers, Dice 0.10-0.12 in a review's
    Slicer scene at 20-45 degrees). Most pairs decide now."""
    from PAMSegmentLib.propagate import tilted_drawing

    bands = np.zeros((20, 40, 60), np.uint8)
    for n, s in enumerate(range(5, 12)):  # seven adjacent slices, a band 3 px wide moving 4 px per slice
        bands[s, 10:30, 10 + 4 * n:13 + 4 * n] = 1
    bands[5] = 0
    bands[5, 18:21, 14:16] = 1  # the end piece: 6 px, inside the next slice's band (overlap 1.0)
    assert tilted_drawing(bands, 0, list(range(5, 12))) == (5, 11)  # None before: one pair of six overlapped
    # Keyframes drawn on purpose on adjacent slices overlap on most pairs: not bands.
    keyframes = np.zeros_like(bands)
    keyframes[5:12, 10:30, 20:40] = 1
    keyframes[8, 10:30, 20:40] = 0
    keyframes[8, 10:30, 40:55] = 1  # one pair of sections apart (a sharp turn) does not make it bands
    assert tilted_drawing(keyframes, 0, list(range(5, 12))) is None


def test_whole_number_floats_in_a_checkpoint_header_are_taken_as_whole_numbers(tmp_path):
    """A header holding input_size 128.0 or max_window 6.0 (written from JSON by another tool) passed
    every load check, but each propagation then crashed with torch's raw TypeError (review s28)."""
    import torch

    from PAMSegmentLib.checkpoints import InferenceParams, load_model, save_checkpoint
    from PAMSegmentLib.network import PAMConfig, build_network
    from PAMSegmentLib.preprocess import PreprocessingParams
    from PAMSegmentLib.propagate import propagate

    path = tmp_path / "floats.pt"
    config = PAMConfig(name="tiny", input_size=32, n_stages=3, base_features=4, max_features=8, n_attention_stages=1)
    save_checkpoint(path, build_network(config), PreprocessingParams(input_size=32), InferenceParams(max_window=4))
    header = torch.load(path, weights_only=True)
    header["preprocessing"]["input_size"] = 32.0
    header["preprocessing"]["min_crop"] = 16.0
    header["inference"]["max_window"] = 4.0
    header["inference"]["registration_iterations"] = 10.0
    torch.save(header, path)
    model = load_model(path)
    assert type(model.preprocessing.input_size) is int and type(model.inference.max_window) is int
    image = np.random.default_rng(0).normal(size=(12, 40, 40)).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[6, 12:28, 12:28] = 1
    image[3:10, 12:28, 12:28] += 4
    result = propagate(image, prompt, (2.0, 1.0, 1.0), model, threads=1)
    assert result.mask[6].sum() == 256  # the drawn slice kept as drawn; it ran


def test_a_zip_archive_holding_the_weights_is_named_so(tmp_path):
    """Official weights downloaded from a cloud drive arrive as a .zip holding propmask.pth: the
    message said to "re-save the weights with torch.save" (compressed entry) or was torch's
    "[enforce fail at inline_container.cc:180]" (stored entry). Review s28."""
    import zipfile

    import pytest
    import torch

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    weights = tmp_path / "propmask.pth"
    torch.save({"w": torch.zeros(3)}, weights)
    for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        archive = tmp_path / f"download{compression}.zip"
        with zipfile.ZipFile(archive, "w", compression) as z:
            z.write(weights, "PAM/propmask.pth")
        with pytest.raises(CheckpointError, match="is a zip archive, not a PyTorch checkpoint; it holds "
                                                  "'PAM/propmask.pth': extract that file"):
            load_model(archive)


def test_an_unknown_device_name_with_a_loaded_model_gets_the_unknown_device_message():
    """propagate(..., model, device="gpu") advised load_model(..., device='gpu'), which itself
    fails with "unknown device" (review s28)."""
    import pytest

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import propagate

    image = np.random.default_rng(0).normal(size=(6, 20, 20)).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[3, 5:10, 5:10] = 1
    with pytest.raises(InputError, match="^unknown device 'gpu'; use cpu or cuda$"):
        propagate(image, prompt, (1.0, 1.0, 1.0), load_model(), device="gpu")


def test_a_window_over_values_near_the_float32_limit_stays_finite():
    """An image with values near 3e38 (float32's limit) overflowed in the window (x - low) and the
    run failed blaming the shipped checkpoint's weights (review s28)."""
    from PAMSegmentLib.preprocess import IntensityWindow

    x = np.array([-3e38, 0.0, 1e38, 3e38], dtype=np.float32)
    out = IntensityWindow(-3e38, 3e38).apply(x)
    assert np.all(np.isfinite(out)) and out.dtype == np.float32
    assert np.allclose(out, [-1.0, 0.0, 1.0 / 3.0, 1.0], atol=1e-6)


def test_a_server_result_says_which_slices_it_recomputed():
    """A review (s28): the server's answer left out ``recomputed``, so Slicer's "Update from my edits"
    through a server said "0 of 24 slices recomputed (none)" and kept the review marks of slices
    the update changed. A server runs from scratch: every walked interval is recomputed; an answer
    from an older server (without the field) counts every slice along the axis."""
    import json
    import io

    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.propagate import propagate
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result

    image = np.random.default_rng(0).normal(size=(20, 30, 30)).astype(np.float32)
    image[4:16, 8:22, 8:22] += 5
    prompt = np.zeros(image.shape, np.uint8)
    prompt[7, 8:22, 8:22] = prompt[12, 8:22, 8:22] = 1
    result = propagate(image, prompt, (1.0, 1.0, 1.0), get_predictor("copy"))
    assert result.recomputed[1]  # the walks outward and between the two drawn slices
    assert decode_result(encode_result(result)).recomputed == result.recomputed
    # an older server's answer: no "recomputed" in its meta
    with np.load(io.BytesIO(encode_result(result))) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["recomputed"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    assert decode_result(buffer.getvalue()).recomputed == {1: [(0, 19)]}


def test_a_crop_too_large_for_this_machines_memory_is_refused_before_it_is_allocated(monkeypatch):
    """A review (s28): the network's square crop is 1.5 x the object's longer extent, so a thin
    3 x 1 x N volume drawn along its row (a 0.3 MB upload to a server at N = 20000) took 3 GB, and
    N = 60000 would have taken all of this machine's memory. Refused above a quarter of it."""
    import pytest

    import PAMSegmentLib.volumes as volumes
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.preprocess import CropBox, IntensityWindow, crop_slices

    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 8 * 1024**3)  # an 8 GB machine
    thin = np.zeros((1, 1, 40000), np.float32)
    with pytest.raises(InputError, match=r"square crop around the object, here 60000 x 60000 px on slices of 1 x 40000 "
                                         r"px: 67\.1 GB for 1 slice, more than a quarter of this machine's 8 GB"):
        crop_slices(thin, CropBox(-30000, -10000, 60000), 128, IntensityWindow(0.0, 1.0))
    # 1000 px crops of 8 slices (160 MB) go through
    assert crop_slices(np.zeros((8, 600, 600), np.float32), CropBox(-200, -200, 1000), 128,
                       IntensityWindow(0.0, 1.0)).shape == (8, 1, 128, 128)


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else():
    """A review (s28): urllib followed a server's redirect with the Authorization header, so the
    token reached whatever host the redirect named. Now the client stops and names the address."""
    import http.server

    import pytest
    from doubles import local_http_server

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.remote import RemoteModel

    seen = []

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    other = local_http_server(Other, threaded=False)

    class Redirector(Other):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirector = local_http_server(Redirector, threaded=False)
    try:
        with pytest.raises(InputError, match=rf"redirects to http://localhost:{other.server_port}: give that "
                                             "address instead"):
            RemoteModel(f"http://127.0.0.1:{redirector.server_port}", token="s3cret-token").info()
    finally:
        for server in (other, redirector):
            server.shutdown()
    assert seen == []


def test_benchmark_refuses_counts_that_measure_nothing(capsys):
    """A review (s28): --repeats 0 (or -1), --warmup -3 and --size 0 were accepted; every network
    figure then failed with a StatisticsError, the tables were written anyway, exit 0."""
    import pytest

    from PAMSegmentLib.cli import main

    for option, value in (("--repeats", "0"), ("--repeats", "-1"), ("--warmup", "-3"), ("--size", "0")):
        with pytest.raises(SystemExit) as stop:
            main(["benchmark", "--quick", option, value, "--out", "unused"])
        assert stop.value.code == 2
        assert f"argument {option}: expected" in capsys.readouterr().err


def test_info_says_when_it_describes_the_weights_pamsegment_model_names(small_checkpoint, run_cli):
    """A review (s28): propagate, batch, label-images and demo say they use $PAMSEGMENT_MODEL's
    weights; info described them silently, its help saying the shipped weights."""
    proc = run_cli("info", env={"PAMSEGMENT_MODEL": str(small_checkpoint.path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"note: describing the weights PAMSEGMENT_MODEL names ({small_checkpoint.path})\n")


def test_a_mask_saved_by_a_script_without_geometry_is_refused_even_with_resample_prompt(tmp_path, ct_case):
    """A review (s28): a same-size mask saved as sitk.GetImageFromArray(mask) (voxel size 1, origin
    0) or with nibabel's np.eye(4) affine was refused with "use --resample-prompt", and doing so put
    the prompt elsewhere (Dice 0.00-0.10 on a real CT, exit 0). Its header places it nowhere."""
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap, read_volume

    image = read_volume(ct_case.image_path)
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct_case.prompt), str(plain))
    eye = tmp_path / "eye.nii.gz"
    as_nibabel = sitk.GetImageFromArray(ct_case.prompt)  # nibabel's np.eye(4) (RAS) as ITK reads it (LPS)
    as_nibabel.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(as_nibabel, str(eye))
    for path in (plain, eye):
        for resample in (False, True):
            with pytest.raises(InputError, match=r"has the image's size but only a script's default position in its "
                                                 r"header "
                                                 r"\(voxel size 1, origin 0 and plain axes: what SimpleITK's "
                                                 r"GetImageFromArray or nibabel's np.eye\(4\) affine writes"):
                read_labelmap(path, reference=image, resample=resample, resample_option="--resample-prompt")
    # A mask of another size on such a grid is judged as before (it is not the image's voxels).
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct_case.prompt[:, :20, :20]), str(small))
    with pytest.raises(InputError, match=r"^small.nii.gz is not on the image grid: size, spacing, origin"):
        read_labelmap(small, reference=image, resample_option="--resample-prompt")


def test_the_same_file_as_previous_and_edited_is_named_so(tmp_path, ct_case, run_cli):
    """A review (s28): a result corrected in place and given as both --previous and --edited got
    advice to delete its record, then "nothing to update; correct the slices that are wrong
    first", though the user had."""
    out = tmp_path / "out.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "out2.nii.gz",
                   "--method", "copy", "--previous", out, "--edited", out)
    assert proc.returncode == 2
    assert proc.stderr == ("pamsegment: error: --previous and --edited are the same file: --previous is the result as "
                           "PAMSegment wrote it, --edited your corrected copy of it. If you corrected the result in "
                           "place, run the first propagation again with another -o to get it back, and give that as "
                           "--previous\n")


def test_a_batch_row_with_the_same_file_as_previous_and_edited_is_refused_before_any_work(tmp_path, ct_case, capsys):
    from PAMSegmentLib.cli import main

    out = tmp_path / "out.nii.gz"
    assert main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method",
                 "copy"]) == 0
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"image,prompt,previous,edited\n{ct_case.image_path},{ct_case.prompt_path},{out},{out}\n")
    capsys.readouterr()
    assert main(["batch", str(manifest), "-o", str(tmp_path / "batch"), "--method", "copy"]) == 2
    assert "cases.csv row 2: previous and edited are the same file" in capsys.readouterr().err
    assert not (tmp_path / "batch").exists()


def test_a_corrected_copy_saved_as_a_0_1_mask_is_named_so():
    """A review (s28): a three-label result corrected and saved as result > 0 (labels merged into 1)
    was told "label 1 would have 29 keyframes ... correct slices across axis 0 only", which the
    user had done."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import keyframes_from_edits

    shape = (20, 30, 30)
    previous = np.zeros(shape, np.uint8)
    previous[2:18, 2:10, 2:10] = 1
    previous[2:18, 12:20, 12:20] = 2
    prompt = np.zeros(shape, np.uint8)
    prompt[10] = previous[10]
    edited = (previous > 0).astype(np.uint8)
    edited[4][edited[4] == 1] = 0  # the one correction: label 1 erased on slice 4
    with pytest.raises(InputError, match=r"^the edited result holds no label 2: its voxels now hold label 1 \(labels "
                                         r"merged, as when saved as result > 0\?\): save your corrections with the "
                                         r"result's label values$"):
        keyframes_from_edits(prompt, previous, edited)
    # Erasing a whole label (its voxels now 0) is not a merge: that refusal stays as it was.
    erased = previous.copy()
    erased[erased == 2] = 0
    with pytest.raises(InputError, match="label 2 is erased on every slice it was drawn or edited on"):
        keyframes_from_edits(prompt, previous, erased)


def test_cancel_during_a_slow_upload_stops_it():
    """A review (s28): the upload was one blocking request and Cancel was looked at only after it,
    so on a slow link (1 MB/s, 10 MB) Cancel at 1 s returned at 13 s. The upload goes in pieces now,
    and the server makes no job of a cut upload."""
    import http.server
    import threading
    import time

    import pytest
    from doubles import local_http_server

    from PAMSegmentLib.errors import PropagationCancelled
    from PAMSegmentLib.propagate import CancelToken, propagate
    from PAMSegmentLib.remote import RemoteModel

    posted = []

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # /info as pamsegment serve answers it
            body = b'{"server": "pamsegment", "version": "x", "queued": 0, "max_jobs": 8, "max_upload_mb": 1024}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n, got = int(self.headers["Content-Length"]), 0
            while got < n:
                chunk = self.rfile.read(min(64 * 1024, n - got))
                if not chunk:
                    return  # the client went away mid-upload
                got += len(chunk)
                time.sleep(0.064)  # about 1 MB/s
            posted.append(got)

        def log_message(self, *args):
            pass

    server = local_http_server(Slow)
    image = np.random.default_rng(0).normal(0, 100, (40, 256, 256)).astype(np.float32)  # 10 MB, not int16
    prompt = np.zeros(image.shape, np.uint8)
    prompt[20, 100:150, 100:150] = 1
    cancel = CancelToken()
    threading.Timer(0.5, cancel.cancel).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(PropagationCancelled):
            propagate(image, prompt, (2.0, 1.0, 1.0), RemoteModel(f"http://127.0.0.1:{server.server_address[1]}"),
                      cancel=cancel)
        assert time.monotonic() - t0 < 5.0  # about 10 s if the whole upload had to go first
    finally:
        server.shutdown()
    assert posted == []


def test_a_link_planted_at_the_record_or_report_name_is_not_written_through(tmp_path, ct_case, run_cli):
    """A review (s28): OUT is written through a link only onto a file of an output format, but a
    link planted at OUT.keyframes.json (a shared folder) onto ~/.bashrc had that file replaced by
    the record, exit 0; --report's table likewise."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=/usr/bin\n")
    out = tmp_path / "res.nii.gz"
    (tmp_path / "res.nii.gz.keyframes.json").symlink_to(victim)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "copy")
    assert proc.returncode == 2 and "res.nii.gz.keyframes.json is a symbolic link to" in proc.stderr
    assert victim.read_text() == "export PATH=/usr/bin\n" and not out.exists()
    (tmp_path / "table.csv").symlink_to(victim)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "other.nii.gz",
                   "--method", "copy", "--report", tmp_path / "table.csv")
    assert proc.returncode == 2 and "table.csv is a symbolic link to" in proc.stderr
    assert victim.read_text() == "export PATH=/usr/bin\n"
    # a link onto another record is written through, as a link onto an image is for OUT
    elsewhere = tmp_path / "kept"
    elsewhere.mkdir()
    (tmp_path / "two.nii.gz.keyframes.json").symlink_to(elsewhere / "two.nii.gz.keyframes.json")
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "two.nii.gz",
                   "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "two.nii.gz.keyframes.json").read_text().startswith("{")


def test_segment_names_with_control_characters_are_not_printed_or_copied(tmp_path, ct_case):
    """A review (s28): a .seg.nrrd segment name holding ESC sequences cleared the terminal and
    printed fake text in the summary, and was copied into the output's header. Such a field is left
    out (the segment is named by its label); a long name is shortened in summaries."""
    import SimpleITK as sitk

    from PAMSegmentLib import volumes
    from PAMSegmentLib.propagate import _label_text

    prompt = sitk.ReadImage(str(ct_case.prompt_path))
    for key, value in {"Segment0_ID": "s0", "Segment0_Name": "liver\x1b[2J\x1b]0;owned\x07", "Segment0_LabelValue": "1",
                       "Segment1_ID": "s1", "Segment1_Name": "spleen \u202egnp.exe", "Segment1_LabelValue": "2",
                       "Segment2_ID": "s2", "Segment2_Name": "Leber (rechts) \u00e9",
                       "Segment2_LabelValue": "3"}.items():
        prompt.SetMetaData(key, value)
    seg = tmp_path / "odd.seg.nrrd"
    sitk.WriteImage(prompt, str(seg))
    assert volumes.seg_nrrd_segments(seg) == {1: {"ID": "s0"}, 2: {"ID": "s1"},
                                               3: {"ID": "s2", "Name": "Leber (rechts) \u00e9"}}
    assert _label_text(4, {4: "x" * 999}) == "label 4 (" + "x" * 57 + "...)"


def test_a_prompt_drawn_across_another_axis_than_the_earlier_run_is_named_so(tmp_path, ct_case, run_cli):
    """A review (s28): the wrong PROMPT (drawn across axis 0) with --previous from a run along axis
    1 was told to use --axis 0, and then "--axis 0, but the earlier rounds propagated along axis 1:
    drop --axis": a loop, neither message naming the record."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct_case.image_path))
    coronal = np.zeros(ct_case.truth.shape, np.uint8)
    coronal[:, 20, :] = ct_case.truth[:, 20, :]
    across_1 = tmp_path / "coronal.nii.gz"
    written = sitk.GetImageFromArray(coronal)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(across_1))
    out = tmp_path / "out.nii.gz"
    proc = run_cli("propagate", ct_case.image_path, across_1, "-o", out, "--method", "copy")
    assert proc.returncode == 0 and "(axis 1," in proc.stdout, proc.stdout + proc.stderr
    def erase_last_coronal(array):
        array[:, np.flatnonzero(array.any(axis=(0, 2)))[-1], :] = 0

    _edited_copy(out, tmp_path / "edited.nii.gz", erase_last_coronal)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "upd.nii.gz", "--method",
                   "copy", "--previous", out, "--edited", tmp_path / "edited.nii.gz")
    assert proc.returncode == 2
    assert proc.stderr == ("pamsegment: error: PROMPT is drawn across axis 0, but --previous was propagated along "
                           "axis 1 (its record says so): give the prompt of the run that made --previous\n")
    proc = run_cli("propagate", ct_case.image_path, across_1, "-o", tmp_path / "upd.nii.gz", "--method", "copy",
                   "--previous", out, "--edited", tmp_path / "edited.nii.gz")
    assert proc.returncode == 0, proc.stderr


def test_a_record_confidence_outside_0_to_1_is_not_taken():
    """A review (s28): a record's confidence of 1e308 passed as finite, became inf in float32 and
    numpy printed its overflow warning; a confidence or agreement is a number from 0 to 1."""
    import warnings

    import pytest

    from PAMSegmentLib.propagate import _floats_from_json

    assert np.array_equal(_floats_from_json([0.0, None, 1.0, 0.25], 4, "c"), np.array([0, np.nan, 1, 0.25],
                                                                                       np.float32), equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in (1e308, -0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="^c is not 2 numbers from 0 to 1 \\(or nulls\\)$"):
                _floats_from_json([0.5, bad], 2, "c")


def test_a_record_whose_empty_slice_holds_the_label_is_refused(tmp_path, ct_case, run_cli):
    """A review (s28): a record (checksum matching OUT) listing as a wall a slice where OUT holds the
    label made that slice a keyframe of the update without a word."""
    import json

    import SimpleITK as sitk

    out = tmp_path / "out.nii.gz"
    assert run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", out, "--method", "copy").returncode == 0
    result = sitk.ReadImage(str(out))
    array = sitk.GetArrayFromImage(result)
    held = [int(k) for k in np.flatnonzero(array.any(axis=(1, 2))) if k != ct_case.prompt_slice]
    edited = array.copy()
    edited[held[-1]] = 0
    corrected = sitk.GetImageFromArray(edited)
    corrected.CopyInformation(result)
    sitk.WriteImage(corrected, str(tmp_path / "edited.nii.gz"))
    record_path = tmp_path / "out.nii.gz.keyframes.json"
    record = json.loads(record_path.read_text())
    record["labels"]["1"]["walls"] = [held[0]]
    record.pop("labels_sha256")  # as a record written before session 38 (its digest refuses any such edit first)
    record_path.write_text(json.dumps(record))
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "upd.nii.gz", "--method",
                   "copy", "--previous", out, "--edited", tmp_path / "edited.nii.gz")
    assert proc.returncode == 2
    assert f"cannot be read (label 1's empty slice {held[0]} holds that label in --previous)" in proc.stderr


def test_a_thin_object_on_three_adjacent_keyframes_is_taken_along_the_axis_given():
    """A review (s28): a 2 px thin object drawn on slices 7 and 8 was accepted, but correcting slice
    9 of the result (three adjacent keyframes) was refused, "drawn on 2 slices along axis 2 ...
    propagate it along axis 2": nothing was drawn along axis 2. With the axis given (or in an
    update) such a drawing is that axis's keyframes; one slice of another plane is still refused."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import find_prompt_slices

    obj = np.zeros((16, 32, 32), bool)
    obj[3:13, 10:17, 20:22] = True
    prompt = np.zeros(obj.shape, np.uint8)
    for k in (7, 8, 9):
        prompt[k][obj[k]] = 1
    assert find_prompt_slices(prompt, axis=0) == (0, {1: [7, 8, 9]})
    assert find_prompt_slices(prompt, axis=0, update=True) == (0, {1: [7, 8, 9]})
    coronal = np.zeros(obj.shape, np.uint8)
    coronal[2:9, 12, 5:20] = 1  # one coronal slice, with axis 0 given: still refused
    with pytest.raises(InputError, match="label 1 is drawn on 1 slice along axis 1 but crosses 7 slices along axis 0"):
        find_prompt_slices(coronal, axis=0)


def test_a_run_killed_between_its_two_moves_names_the_record_it_set_aside(tmp_path, ct_case, run_cli):
    """A review (s28): kill -9 between moving the record in and moving OUT in left a new record
    beside the old OUT, and the old record as a hidden .pamsegment-*.old.json; the next round said
    OUT "has changed since it was written" and advised deleting the record (losing earlier rounds)."""
    import shutil

    out, other = tmp_path / "out.nii.gz", tmp_path / "other.nii.gz"
    for target, extra in ((out, []), (other, ["--range", "6:14"])):
        proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", target, "--method", "copy", *extra)
        assert proc.returncode == 0, proc.stderr
    record = tmp_path / "out.nii.gz.keyframes.json"
    shutil.copy(record, tmp_path / ".pamsegment-0123456789ab-0.old.json")  # what the killed run set aside
    shutil.copy(tmp_path / "other.nii.gz.keyframes.json", record)  # and the record it moved in
    _edited_copy(out, tmp_path / "edited.nii.gz", lambda a: a.__setitem__(np.flatnonzero(a.any(axis=(1, 2)))[-1], 0))
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "next.nii.gz", "--method",
                   "copy", "--previous", out, "--edited", tmp_path / "edited.nii.gz")
    assert proc.returncode == 2
    assert ("but .pamsegment-0123456789ab-0.old.json beside it, the record an interrupted run set aside, does: rename "
            ".pamsegment-0123456789ab-0.old.json to out.nii.gz.keyframes.json and run again") in proc.stderr


def test_review_s28_diff_regressions_are_mended():
    """The review of this session's own fixes: (1) with --axis given, an outline on two adjacent
    coronal slices crossing 7 axial ones was taken as 7 keyframes of lines (the thin-object
    exception applies to 3 adjacent slices only); (2) deliberate keyframes on 4 adjacent slices of
    an oblique volume whose inner pair overlaps well were refused as a tilted outline (only the two
    end pairs may overlap); (3) a record's confidence of 1.0000004, which the engine itself writes
    for a predictor's 1 + 1e-6, was refused."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import _floats_from_json, find_prompt_slices, tilted_drawing

    two_coronal = np.zeros((24, 32, 32), np.uint8)
    two_coronal[10:17, 12:14, 5:25] = 1
    with pytest.raises(InputError, match="drawn on 2 slices along axis 1 but crosses 7 slices along axis 0"):
        find_prompt_slices(two_coronal, axis=0)
    keyframes = np.zeros((24, 40, 40), np.uint8)
    keyframes[11:13, 10:20, 20:30] = 1  # the inner pair: the same section on slices 11 and 12
    keyframes[10, 10:20, 5:12] = 1  # overlapping slice 11 not at all
    keyframes[13, 10:20, 28:35] = 1  # overlapping slice 12 by 2 of 7 columns
    assert tilted_drawing(keyframes, 0, [10, 11, 12, 13]) is None  # slices 11 and 12 overlap fully
    assert np.allclose(_floats_from_json([1.0000004, 0.5], 2, "c"), [1.0, 0.5])


def test_a_script_mask_beside_a_1mm_origin_0_image_in_permuted_axes_is_refused_too(tmp_path):
    """A mask saved without geometry beside an image of 1 mm voxels at origin 0 in permuted axes:
    an exemption for "a drawing on its reformat" (same grid) transposed a script's mask silently
    (exit 0, the third review); the two cannot be told apart, so it is refused as well."""
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap, read_volume

    array = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # axes permuted, 1 mm, origin 0
    sitk.WriteImage(image, str(tmp_path / "sagittal.nii.gz"))
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[8, 4:9, 5:11] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "axial_mask.nii.gz"))  # plain axes, 1 mm, 0
    with pytest.raises(InputError, match="only a script's default position in its header"):
        read_labelmap(tmp_path / "axial_mask.nii.gz", reference=read_volume(tmp_path / "sagittal.nii.gz"),
                      resample=True)


def test_an_earlier_rounds_slice_outside_range_is_said_to_come_from_the_record(tmp_path, ct_case, run_cli):
    """A review (s28): an empty slice of an earlier round outside --range refused every later update
    with --range: "empty slice N lies outside the range", though the user never gave slice N."""
    import SimpleITK as sitk

    base = ["--method", "copy"]
    r1, r2 = tmp_path / "r1.nii.gz", tmp_path / "r2.nii.gz"
    assert run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", r1, *base).returncode == 0
    last = int(np.flatnonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(r1))).any(axis=(1, 2)))[-1])
    _edited_copy(r1, tmp_path / "e1.nii.gz", lambda a: a.__setitem__(last, 0))
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", r2, *base, "--previous", r1,
                   "--edited", tmp_path / "e1.nii.gz")
    assert proc.returncode == 0, proc.stderr
    k = ct_case.prompt_slice

    def trim(a):  # the first row of the object on the slice after the drawn one, erased
        a[k + 1][np.flatnonzero(a[k + 1].any(axis=1))[0]] = 0

    _edited_copy(r2, tmp_path / "e2.nii.gz", trim)
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", tmp_path / "r3.nii.gz", *base,
                   "--previous", r2, "--edited", tmp_path / "e2.nii.gz", "--range", f"{k - 2}:{k + 2}")
    assert proc.returncode == 2
    assert proc.stderr == (f"pamsegment: error: empty slice {last} lies outside the range {k - 2}:{k + 2} along axis 0 "
                           "(it is one of the earlier rounds' slices, from the record beside r2.nii.gz): widen the "
                           "range to include it, or drop the range\n")


def test_review_s28_second_round_regressions_are_mended():
    """The second review of this session's fixes: (1) an outline's 19 bands at 30 degrees on
    0.8 mm slices, every 4th pair overlapping a little over half, were taken as keyframes (one
    overlapping inner pair was enough); (2) a thin object's fourth adjacent correction in an update
    was refused, advising an axis nothing was drawn on."""
    from PAMSegmentLib.propagate import find_prompt_slices, tilted_drawing

    bands = np.zeros((40, 40, 120), np.uint8)
    for n, k in enumerate(range(10, 29)):  # 19 bands, 4 px wide, moving 4 px a slice
        bands[k, 10:30, 10 + 4 * n:14 + 4 * n] = 1
        if n % 4 == 1:  # every 4th band reaches 2 px back into its neighbour's: overlap 0.5
            bands[k, 10:30, 8 + 4 * n:10 + 4 * n] = 1
    assert tilted_drawing(bands, 0, list(range(10, 29))) == (10, 28)
    obj = np.zeros((16, 32, 32), bool)
    obj[3:13, 10:17, 20:22] = True
    thin = np.zeros(obj.shape, np.uint8)
    for k in (7, 8, 9, 10):
        thin[k][obj[k]] = 1
    assert find_prompt_slices(thin, axis=0, update=True) == (0, {1: [7, 8, 9, 10]})


def test_a_script_mask_beside_a_rotated_1mm_origin_0_image_is_refused(tmp_path):
    """The second review: the 1 mm / origin-0 exemption let a GetImageFromArray mask beside such an
    image in rotated axes be resampled elsewhere (zero overlap with the drawing, exit 0)."""
    import math

    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap, read_volume

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32))
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "rotated.nii.gz"))
    mask = np.zeros((20, 24, 28), np.uint8)
    mask[10, 5:15, 5:15] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.nii.gz"))
    with pytest.raises(InputError, match="only a script's default position in its header"):
        read_labelmap(tmp_path / "mask.nii.gz", reference=read_volume(tmp_path / "rotated.nii.gz"), resample=True)


def test_bands_of_an_outline_on_thin_slices_overlapping_half_are_tilted():
    """The third review: on thin slices an outline's bands are 2 px wide and shift 1 px a slice, so
    neighbours overlap exactly half (0.50-0.56 at 30-45 degrees) and counted as deliberate
    keyframes; such pairs count as bands now (TILTED_OVERLAP 0.6)."""
    from PAMSegmentLib.propagate import tilted_drawing

    bands = np.zeros((30, 40, 60), np.uint8)
    for n, k in enumerate(range(10, 16)):  # six bands 2 px wide, shifting 1 px a slice
        bands[k, 10:30, 20 + n:22 + n] = 1
    assert tilted_drawing(bands, 0, list(range(10, 16))) == (10, 15)
    keyframes = np.zeros_like(bands)
    keyframes[10:16, 10:30, 20:32] = 1  # the same object drawn on six adjacent slices
    assert tilted_drawing(keyframes, 0, list(range(10, 16))) is None
