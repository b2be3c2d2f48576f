"""Findings of session 30's reviews (engine, command line, server), each with the figures a
reader can check."""

from __future__ import annotations

import numpy as np
import pytest

from PAMSegmentLib.baselines import get_predictor
from PAMSegmentLib.propagate import propagate


def _tube_with_a_neck(n=40, h=96):
    """A bright tube of radius 25 px along axis 0, narrowed to 4 px on slices 17-23."""
    yy, xx = np.mgrid[:h, :h]
    r2 = (yy - 48) ** 2 + (xx - 48) ** 2
    image = np.random.default_rng(0).normal(0, 5, (n, h, h)).astype(np.float32)
    for s in range(n):
        image[s][r2 <= (4 if 17 <= s <= 23 else 25) ** 2] += 200
    return image, r2


def _neck_case():
    """The tube, label 2 drawn on slices 2 and 37, label 1 on its narrow neck (slice 20), propagated
    with copy: (image, prompt, result)."""
    image, r2 = _tube_with_a_neck()
    prompt = np.zeros(image.shape, np.int32)
    prompt[2][r2 <= 25 ** 2] = 2
    prompt[37][r2 <= 25 ** 2] = 2
    prompt[20][r2 <= 4 ** 2] = 1
    return image, prompt, propagate(image, prompt, (2.0, 1.0, 1.0), get_predictor("copy"), threads=1)


def test_slices_between_a_labels_drawn_slices_taken_whole_by_another_label_are_said():
    """A review: label 2 drawn on slices 2 and 37 of a tube, label 1 (propagated first) on its
    narrow neck: label 2 held nothing on slices 17-23, between its own drawn slices, without a
    word (it lost 2.8 % of its voxels, under the 5 % of the overlap note, and no gap is listed
    where its walks found the object)."""
    image, prompt, result = _neck_case()
    assert [s for s in range(3, 37) if not (result.mask[s] == 2).any()] == list(range(17, 24))
    lost, own = result.lost[2][0][1], result.lost[2][1]
    assert lost / own < 0.05 and result.gaps[2] == []
    assert result.cut == {2: (list(range(17, 24)), [1])}
    assert result.notes() == [
        "label 2: between its drawn slices, slices 17-23 hold none of it (label 1 took all of it there), so it is cut "
        "in two; if it goes on there, draw it on one of them (labels propagated earlier keep their voxels: --label, a "
        "manifest's label column or labels= in Python sets the order)"]
    assert set(result.review_first(2)) <= set(range(17, 24))  # the empty slices come first for review
    # listed first, label 2 keeps the neck but on slice 20, where label 1's drawing (always its own) lies
    first = propagate(image, prompt, (2.0, 1.0, 1.0), get_predictor("copy"), labels=[2, 1], threads=1)
    assert first.cut == {2: ([20], [1])} and [s for s in range(2, 38) if not (first.mask[s] == 2).any()] == [20]
    assert any("label 2: between its drawn slices, slice 20 holds none of it (label 1 took all of it there)" in note
               for note in first.notes())  # (beside session 31's note on the neck's thin slices, 17-19 and 21-23)


def test_a_servers_answer_carries_the_cut_slices():
    import pytest

    pytest.importorskip("fastapi")
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result

    result = _neck_case()[2]
    back = decode_result(encode_result(result))
    assert back.cut == result.cut == {2: (list(range(17, 24)), [1])} and back.notes() == result.notes()


def test_network_options_given_with_a_classical_method_are_noted(tmp_path, capsys):
    """A review (session 30): --device cuda and --batch-size were ignored without a word by track
    and copy (exit 0 on a machine without CUDA), where --checkpoint or --walk are refused."""
    from conftest import make_ct_case

    from PAMSegmentLib import cli

    case = make_ct_case(tmp_path / "c")
    out = tmp_path / "out.nii.gz"
    assert cli.main(["propagate", str(case.image_path), str(case.prompt_path), "-o", str(out), "--method", "copy",
                     "--device", "cuda", "--batch-size", "4"]) == 0
    assert ("note: --device and --batch-size are options of the network, which --method copy does not use (it runs "
            "on the processor); ignored") in capsys.readouterr().out
    assert cli.main(["propagate", str(case.image_path), str(case.prompt_path), "-o", str(out), "--method", "track",
                     "--batch-size", "4"]) == 0
    assert ("note: --batch-size is an option of the network, which --method track does not use (it runs on the "
            "processor); ignored") in capsys.readouterr().out
    assert cli.main(["propagate", str(case.image_path), str(case.prompt_path), "-o", str(out), "--method",
                     "copy"]) == 0
    assert "of the network" not in capsys.readouterr().out  # the defaults say nothing


def test_a_volume_one_voxel_thick_is_refused_by_the_engine_and_named_by_the_reader(tmp_path):
    """A review (session 30): the Python API took slices one pixel thick (shape (20, 1, 48)), where
    demons registration gave another field each call, so pam and track gave another mask each
    run; the reader refused such a file as "a single slice", pointing to label-images."""
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    image = np.random.default_rng(0).normal(0, 1, (20, 1, 48)).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[10, 0, 10:20] = 1
    with pytest.raises(InputError, match=r"^the image is one voxel thick along array axis 1 \(shape \(20, 1, 48\)\); "
                                         "PAMSegment needs a 3D volume of at least 2 voxels along every axis$"):
        propagate(image, prompt, (1.0, 1.0, 1.0), get_predictor("track"))
    path = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    with pytest.raises(InputError, match=r"thin.nii.gz is one voxel thick along j \(48 x 1 x 20\); PAMSegment needs"):
        read_volume(path)


def test_a_server_address_with_a_password_is_refused_without_echoing_it():
    """A review (session 30): http://user:pw@host:port was tried as a host named "user:pw@host"
    ("Name or service not known") and the message printed the password."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.remote import RemoteModel

    with pytest.raises(InputError) as caught:
        RemoteModel("http://alice:s3cret@gpu-box:8765")
    assert str(caught.value) == ("the server address holds a user name or password before '@'; give it as "
                                 "http://gpu-box:8765 and the token with --token or PAMSEGMENT_TOKEN (Slicer: the "
                                 "token field)")
    assert "s3cret" not in str(caught.value)


def test_option_values_written_with_a_minus_get_the_options_own_message(tmp_path, capsys):
    """A review (session 30): --range -1:5 and --shard -1/2 got argparse's "expected one argument"
    (the value taken for an option), and --empty-slices 0:5 was refused later as a label "not
    among the labels propagated" instead of what labels may be."""
    import pytest

    from PAMSegmentLib import cli

    cases = [(["propagate", "a.nii.gz", "b.nii.gz", "-o", "c.nii.gz", "--range", "-1:5"],
              "argument --range: expected K0:K1, two slice numbers with 0 <= K0 <= K1 (both included), e.g. 10:40; "
              "got '-1:5'"),
             (["batch", "cases.csv", "-o", "out", "--shard", "-1/2"],
              "argument --shard: K/N needs 1 <= K <= N, got '-1/2'"),
             (["propagate", "a.nii.gz", "b.nii.gz", "-o", "c.nii.gz", "--empty-slices", "0:5"],
              "argument --empty-slices: label 0 in '0:5': labels are 1-65535 (0 is the background)")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert cli._joined_negative_values(["propagate", "--", "--range", "-1:5"]) == ["propagate", "--", "--range", "-1:5"]


def test_a_servers_answer_that_unpacks_to_far_more_than_a_result_is_refused_before_it_is_read():
    """A suspicion of a review (session 30), confirmed here: the client unpacked a server's
    compressed answer whole before looking at it, so 1 MB could ask for gigabytes."""
    import io
    import zipfile

    import pytest

    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import decode_result

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mask.npy", b"\0" * (200 * 2**20))  # 200 MB of zeros, about 0.2 MB packed
    payload = buf.getvalue()
    assert len(payload) < 2**20
    with pytest.raises(PAMError, match=r"the server's answer unpacks to 200 MB, more than a result of this volume "
                                       r"takes \(at most 1 MB\)"):
        decode_result(payload, max_bytes=2**20)


def test_slices_a_label_never_reached_between_a_drawn_slice_and_a_wall_are_not_called_cut():
    """A re-review (session 30): slices between a drawn slice and a wall where the label's own walk
    found nothing were named as taken by other labels ("(labels  took all of it there)")."""
    from doubles import OracleModel

    _, j, i = np.ogrid[:20, :24, :24]
    disk = ((j - 12) ** 2 + (i - 12) ** 2 <= 25)
    truth = np.zeros((20, 24, 24), bool)
    truth[2:8] = disk
    truth[12:18] = disk  # absent on 8-11
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[5][truth[5]] = 1
    prompt[15][truth[15]] = 1
    part = truth[3].copy()
    part[:, :12] = False
    prompt[3][part] = 2  # label 2 on part of label 1's slice 3: label 1 overlapped
    result = propagate(truth.astype(np.float32) * 100, prompt, (2.0, 1.0, 1.0), OracleModel(truth),
                       empty_slices={1: [10]}, threads=1)
    assert 1 in result.overlapped and result.cut == {}
    assert not any("cut in two" in note for note in result.notes())


def test_a_slicer_segmentation_of_a_left_handed_image_is_placed_on_its_grid(tmp_path):
    """A review (session 30): Slicer saves a segmentation of a left-handed image (FSL's LAS,
    dcm2niix) with k reversed, voxel for voxel still the image's lattice; it was refused as "not
    on the image grid" with advice (set the geometry from the volume) that made just that file."""
    import warnings

    import SimpleITK as sitk

    from PAMSegmentLib.volumes import read_labelmap, read_volume

    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 1, (20, 36, 40)).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # left-handed (determinant -1)
    image.SetOrigin((30.0, -25.0, -20.0))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    drawn = np.zeros((20, 36, 40), np.uint8)
    drawn[9, 10:20, 12:25] = 3
    drawn[9, 15, 30] = 3  # not symmetric: a flip the wrong way would show
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(drawn[::-1, 8:30, 5:35]))  # k reversed, and cropped
    flipped.SetSpacing((1.5, 1.5, 3.0))
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # right-handed, as Slicer keeps it
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((5, 8, 19)))  # its first voxel: the image's last slice
    sitk.WriteImage(flipped, str(tmp_path / "prompt.seg.nrrd"))
    volume = read_volume(tmp_path / "scan.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        placed = read_labelmap(tmp_path / "prompt.seg.nrrd", reference=volume)
    np.testing.assert_array_equal(placed.array, drawn)
    assert any("its k axis reversed, as Slicer saves a segmentation of a left-handed image" in str(w.message)
               for w in caught)


class _Answers:
    """A custom predictor (``SlicePredictor``) giving one kind of wrong answer."""

    threshold, window_mm, max_window, min_window = 0.5, 2.0, 1, 1

    def __init__(self, kind):
        self.kind = kind

    def predict(self, volume, guide_index, guide_mask, query_indices):
        from PAMSegmentLib.propagate import SlicePrediction

        n, (h, w) = len(query_indices), volume.shape[1:]
        prob = np.repeat(guide_mask[None].astype(np.float32), n, axis=0)
        if self.kind == "nan":
            return SlicePrediction(np.full((n, h, w), np.nan, np.float32))
        if self.kind == "small":
            return SlicePrediction(np.zeros((n, 8, 8), np.float32))
        if self.kind == "five":
            return SlicePrediction(np.full((n, h, w), 5.0, np.float32))
        if self.kind == "none":
            return SlicePrediction(np.zeros((0, h, w), np.float32))
        return SlicePrediction(prob, np.full(n, np.nan if self.kind == "nan presence" else 5.0, np.float32))


def test_a_custom_predictors_wrong_answers_are_one_clear_error_in_label_images_and_propagate():
    """A review (session 30): label_images took a custom predictor's NaN or 8 x 8 probabilities for
    "found in 0 of 5 images", 5.0 for the object everywhere, and none at all raised IndexError; a
    NaN presence made every confidence NaN in propagate (5.0 a confidence of 5)."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.imageset import label_images
    from PAMSegmentLib.propagate import SlicePredictor

    images = [np.random.default_rng(s).normal(0, 1, (32, 32)).astype(np.float32) for s in range(4)]
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 10:20] = 1
    messages = {"nan": "probabilities that are not finite numbers", "small": "probabilities of shape (1, 8, 8)",
                "five": "values from 5 to 5; probabilities must lie within [0, 1]",
                "none": "probabilities of shape (0, 32, 32)",
                "nan presence": "presence values nan to nan (NaN or inf among them); they must lie within [0, 1]",
                "five presence": "presence values 5 to 5; they must lie within [0, 1]"}
    for kind, message in messages.items():
        predictor = type("Custom", (_Answers, SlicePredictor), {})(kind)
        if "presence" not in kind:
            with pytest.raises(InputError, match=f"^Custom.predict returned .*{message[:20]}"):
                label_images(images, 0, mask, predictor)
        volume = np.stack(images)
        prompt = np.zeros(volume.shape, np.uint8)
        prompt[1] = mask
        with pytest.raises(InputError) as caught:
            propagate(volume, prompt, (1.0, 1.0, 1.0), predictor)
        assert message in str(caught.value), str(caught.value)


def test_remote_model_propagate_called_directly_checks_its_inputs_before_any_upload():
    """A review (session 30): the module's own example calls RemoteModel.propagate directly, which
    skipped the engine's checks: spacing "333" was sent as (3, 3, 3), range (1.5, 20) cut to 1."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.remote import RemoteModel

    server = RemoteModel("http://127.0.0.1:9")  # nothing listens there: a check that passed would say so
    image = np.zeros((10, 16, 16), np.float32)
    image[:, 4:12, 4:12] = 100
    prompt = np.zeros(image.shape, np.uint8)
    prompt[5, 6:10, 6:10] = 1
    with pytest.raises(InputError, match="spacing"):
        server.propagate(image, prompt, "333")
    with pytest.raises(InputError, match="range"):
        server.propagate(image, prompt, (1.0, 1.0, 1.0), range=(1.5, 20))


def test_a_seg_nrrd_result_keeps_the_prompts_terminology_tags(tmp_path):
    """A review (session 30): the result's segments had no tags ("|"), so Slicer's terminology entry
    of the prompt's segment (its anatomical meaning) was lost."""
    import SimpleITK as sitk

    from PAMSegmentLib import volumes

    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    prompt = sitk.GetImageFromArray(np.pad(np.ones((1, 2, 2), np.uint8), ((1, 2), (3, 3), (3, 3))))
    terminology = ("TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^"
                   "Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    for key, value in {"Segment0_ID": "liver", "Segment0_Name": "liver", "Segment0_LabelValue": "1",
                       "Segment0_Tags": f"{terminology}|PAMSegment.Run:abc|"}.items():
        prompt.SetMetaData(key, value)
    sitk.WriteImage(prompt, str(tmp_path / "prompt.seg.nrrd"))
    segments = volumes.seg_nrrd_segments(tmp_path / "prompt.seg.nrrd")
    assert segments[1]["Tags"] == f"{terminology}|"  # PAMSegment's own run tag is not carried
    volume = volumes.read_volume(tmp_path / "scan.nii.gz")
    volumes.write_labelmap(sitk.GetArrayFromImage(prompt), volume, tmp_path / "out.seg.nrrd", segments=segments)
    written = sitk.ImageFileReader()
    written.SetFileName(str(tmp_path / "out.seg.nrrd"))
    written.ReadImageInformation()
    assert written.GetMetaData("Segment0_Tags") == f"{terminology}|"


def test_cancel_does_not_wait_for_a_server_that_never_answers():
    """A review (session 30): against a server that accepts the connection and never answers,
    Cancel waited for the whole 60 s request timeout (Slicer's buttons stayed off meanwhile)."""
    import socket
    import threading
    import time

    import pytest

    from PAMSegmentLib.errors import PropagationCancelled
    from PAMSegmentLib.propagate import CancelToken
    from PAMSegmentLib.remote import RemoteModel

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts (the kernel does), never answers
    try:
        server = RemoteModel(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=300)
        cancel = CancelToken()
        threading.Timer(0.3, cancel.cancel).start()
        t0 = time.monotonic()
        with pytest.raises(PropagationCancelled):
            server.info(cancel)
        assert time.monotonic() - t0 < 100  # a guard, not a benchmark: the request alone waits 300 s
    finally:
        silent.close()


def test_presence_as_a_tensor_that_requires_grad_and_remote_options_checked_directly():
    """Re-reviews (session 30): the new presence check converted with np.asarray, which a torch
    tensor that requires grad refuses (a raw RuntimeError; it worked before); a direct
    RemoteModel.propagate took early_stop="no" for True and cut range (1.5, 11) to (1, 11)."""
    import pytest
    import torch

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor
    from PAMSegmentLib.remote import RemoteModel

    class WithGrad(SlicePredictor):
        threshold, window_mm, max_window, min_window = 0.5, 2.0, 1, 1

        def predict(self, volume, guide_index, guide_mask, query_indices):
            n = len(query_indices)
            prob = np.repeat(guide_mask[None].astype(np.float32), n, axis=0)
            return SlicePrediction(prob, torch.full((n,), 0.9, requires_grad=True))

    image = np.zeros((10, 16, 16), np.float32)
    image[:, 4:12, 4:12] = 100
    prompt = np.zeros(image.shape, np.uint8)
    prompt[5, 6:10, 6:10] = 1
    assert propagate(image, prompt, (1.0, 1.0, 1.0), WithGrad()).mask.any()
    server = RemoteModel("http://127.0.0.1:9")  # nothing listens: a check that passed would say so
    with pytest.raises(InputError, match="early_stop must be True or False, got 'no'"):
        server.propagate(image, prompt, (1.0, 1.0, 1.0), early_stop="no")
    with pytest.raises(InputError, match="range's first slice must be a whole number, got 1.5"):
        server.propagate(image, prompt, (1.0, 1.0, 1.0), range=(1.5, 11))


def _tiny_case():
    """An 8 x 32 x 32 noise volume and a 5 x 5 square drawn on slice 3: what a stand-in server is sent."""
    image = np.random.default_rng(0).normal(0, 1, (8, 32, 32)).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[3, 5:10, 5:10] = 1
    return image, prompt


def _slow_server(post_delay=0.0, status_hang=0.0, job_id="J1"):
    """A stand-in PAMSegment server in a thread that answers an upload after ``post_delay`` s, a
    job's status and its deletion after ``status_hang`` s; (server, url, log of requests)."""
    import json
    from http.server import BaseHTTPRequestHandler

    from doubles import local_http_server

    log = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, obj, code=200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            log.append(f"GET {self.path}")
            if self.path == "/info":
                return self._send({"server": "pamsegment", "version": "x", "queued": 0, "max_jobs": 8,
                                   "methods": ["copy"], "options": ["axis", "labels", "range", "early_stop", "method",
                                                                    "update", "intensity_gate", "empty_slices",
                                                                    "remove_disconnected"]})
            self.server.stopping.wait(status_hang)
            return self._send({"id": "J1", "state": "running", "progress": 0.0, "message": "running"})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            log.append("POST received")
            self.server.stopping.wait(post_delay)  # the server reading and checking the volume
            self._send({"id": job_id, "state": "queued", "queue_position": 0}, 202)

        def do_DELETE(self):
            log.append(f"DELETE {self.path}")
            self.server.stopping.wait(status_hang)
            self._send({"id": "J1", "state": "cancelled"})

    server = local_http_server(Handler)
    return server, f"http://127.0.0.1:{server.server_address[1]}", log


@pytest.mark.parametrize("when", ["while the upload is answered", "while a silent server has the job"])
def test_cancel_leaves_no_job_on_the_server_and_does_not_wait_for_it(when):
    """A re-review (session 30): with requests waited on a helper thread, a Cancel while the
    server was answering the upload left its job there (nobody read the id to delete it), and a
    Cancel while the server had stopped answering still waited the 60 s timeout for the delete."""
    import threading
    import time

    from PAMSegmentLib.errors import PropagationCancelled
    from PAMSegmentLib.propagate import CancelToken
    from PAMSegmentLib.remote import RemoteModel

    upload = when == "while the upload is answered"
    server, url, log = _slow_server(post_delay=1.0 if upload else 0.0, status_hang=0.0 if upload else 30.0)
    try:
        image, prompt = _tiny_case()
        cancel = CancelToken()

        def cancel_soon():
            while not any(e == ("POST received" if upload else "GET /jobs/J1") for e in log):
                time.sleep(0.01)
            time.sleep(0.2)
            cancel.cancel()

        threading.Thread(target=cancel_soon, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(PropagationCancelled):
            RemoteModel(url, timeout=120, poll_interval=0.05, method="copy").propagate(image, prompt, (1, 1, 1),
                                                                                       cancel=cancel)
        assert time.monotonic() - t0 < 20  # a guard, not a benchmark: the silent server answers after 30 s
        deadline = time.monotonic() + 10
        while "DELETE /jobs/J1" not in log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "DELETE /jobs/J1" in log  # the job made meanwhile is deleted
    finally:
        server.shutdown()


@pytest.mark.parametrize("job_id", ["../info", "J1?x=1", "a b", "\u00e9t\u00e9", 7])
def test_a_job_id_that_is_no_job_id_is_not_put_in_request_paths(job_id):
    """A re-review (session 30): the id in an upload's answer went into the next requests' paths as
    it was ("GET /jobs/../info", "DELETE /jobs/J1?x=1"; "\u00e9t\u00e9" a raw UnicodeEncodeError)."""
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import RemoteModel

    server, url, log = _slow_server(job_id=job_id)
    try:
        image, prompt = _tiny_case()
        with pytest.raises(PAMError, match="answered, but not as a PAMSegment server does"):
            RemoteModel(url, method="copy").propagate(image, prompt, (1, 1, 1))
        assert log == ["GET /info", "POST received"]  # nothing asked with that id
    finally:
        server.shutdown()


def test_an_output_folder_that_cannot_be_listed_is_one_message(tmp_path, monkeypatch, capsys):
    """A re-review (session 30): a -o folder that cannot be listed (permissions) gave a traceback."""
    from pathlib import Path

    from conftest import make_ct_case

    from PAMSegmentLib import cli

    case = make_ct_case(tmp_path / "c")
    (tmp_path / "cases.csv").write_text(f"image,prompt\n{case.image_path},{case.prompt_path}\n")
    out = tmp_path / "out"
    out.mkdir()
    real = Path.iterdir

    def denied(self):
        if self == out:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert cli.main(["batch", str(tmp_path / "cases.csv"), "-o", str(out), "--method", "copy"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"cannot read the folder {out} (Permission denied); check its "
                                                    "permissions or choose another -o")
