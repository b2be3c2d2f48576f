"""``pamsegment serve`` (PAMSegmentLib.server) and its client (PAMSegmentLib.remote)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
from doubles import OracleModel

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import ellipsoid, free_port, serving  # noqa: E402
from PAMSegmentLib.errors import InputError, PAMError, PropagationCancelled  # noqa: E402
from PAMSegmentLib.propagate import CancelToken, propagate  # noqa: E402
from PAMSegmentLib.remote import RemoteModel, decode_result  # noqa: E402
from PAMSegmentLib.server import QueueFull, create_app  # noqa: E402

SHAPE = (16, 24, 24)


def case():
    truth = ellipsoid(SHAPE, (8, 12, 12), (5, 6, 6))
    image = truth.astype(np.float32) * 100
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[8][truth[8]] = 1
    return image, prompt, truth


def npz(compressed=False, **arrays):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def wait_for(client, job_id, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.02)
    raise AssertionError("job did not end")


@pytest.fixture
def oracle_app():
    image, prompt, truth = case()
    app = create_app(lambda method: OracleModel(truth), model_info={"sha256": "abc"})
    return TestClient(app), image, prompt, truth


def test_a_job_runs_and_its_result_is_what_propagate_returns(oracle_app):
    client, image, prompt, truth = oracle_app
    assert client.get("/info").json()["model"] == {"sha256": "abc"}
    r = client.post("/jobs", params={"options": json.dumps({"range": [2, 13]})},
                    content=npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0])))
    assert r.status_code == 202, r.text
    status = wait_for(client, r.json()["id"])
    assert status["state"] == "finished" and status["progress"] == 1.0
    got = decode_result(client.get(f"/jobs/{r.json()['id']}/result").content)
    local = propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth), range=(2, 13))
    assert np.array_equal(got.mask, local.mask)
    assert got.slice_range == {1: (3, 13)} and got.range == (2, 13)  # the object spans 3-13
    assert np.allclose(got.confidence[1], local.confidence[1], equal_nan=True)
    assert list(got.keyframes[1]) == [8] and np.array_equal(got.keyframes[1][8], local.keyframes[1][8])


@pytest.mark.parametrize("body, params, message", [
    (b"not a zip", None, "not an .npz file"),
    ("compressed", None, "stored uncompressed"),
    ("extra", None, "exactly the arrays image, prompt and spacing; it holds 'extra', 'image', 'prompt', 'spacing'"),
    ("objects", None, "holds Python objects"),
    ("good", {"options": "{bad json"}, "options must be a JSON object"),
    ("good", {"options": json.dumps({"device": "cuda"})}, "unknown option 'device'"),
    ("good", {"options": json.dumps({"method": "magic"})}, "method must be one of pam, track, copy"),
    ("empty", None, "the prompt is empty"),
    ("spacing", None, "spacing must be 3 numbers"),
    ("complex", None, "the upload's image.npy is complex128; send boolean, integer or floating-point numbers"),
    ("good", {"options": json.dumps({"labels": "abc"})}, "labels must be a list of label numbers"),
    ("good", {"options": json.dumps({"range": [9, 2]})}, "range 9:2 is reversed"),
    ("good", {"options": json.dumps({"early_stop": "no"})}, "early_stop must be true or false"),
    ("good", {"options": json.dumps({"axis": 5})}, "axis must be 0, 1 or 2"),
    ("half", None, "the prompt must be an integer label map"),
    # found before the job is queued, not when it runs (they needed the volume's shape)
    ("good", {"options": json.dumps({"range": [0, 1000]})}, "range 0:1000 is outside the 16 slices along axis 0"),
    ("good", {"options": json.dumps({"empty_slices": [99]})}, "empty slice 99 lies outside the range 0:15 along axis 0"),
    # a RecursionError in json.loads: 500 with a traceback in the server's log before
    ("good", {"options": "[" * 3000 + "]" * 3000}, "options must be a JSON object (nested too deeply)"),
])
def test_bad_uploads_are_refused_with_the_reason(oracle_app, body, params, message):
    client, image, prompt, _ = oracle_app
    spacing = np.array([2.0, 1.0, 1.0])
    bodies = {
        "compressed": lambda: npz(True, image=image, prompt=prompt, spacing=spacing),
        "extra": lambda: npz(image=image, prompt=prompt, spacing=spacing, extra=spacing),
        "good": lambda: npz(image=image, prompt=prompt, spacing=spacing),
        "empty": lambda: npz(image=image, prompt=np.zeros_like(prompt), spacing=spacing),
        "spacing": lambda: npz(image=image, prompt=prompt, spacing=np.ones(2)),
        "complex": lambda: npz(image=image.astype(complex), prompt=prompt, spacing=spacing),
        "half": lambda: npz(image=image, prompt=prompt * 0.5, spacing=spacing),
    }
    if body == "objects":  # a pickled object array, written by hand (savez would pickle it)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, arr in (("image", np.array([object()], dtype=object)), ("prompt", prompt), ("spacing", spacing)):
                one = io.BytesIO()
                np.lib.format.write_array(one, arr, allow_pickle=True)
                z.writestr(f"{name}.npy", one.getvalue())
        data = buf.getvalue()
    else:
        data = bodies[body]() if body in bodies else body
    r = client.post("/jobs", params=params, content=data)
    assert r.status_code == 400
    assert message in r.json()["detail"]


def test_size_limits(oracle_app):
    _, image, prompt, truth = oracle_app
    client = TestClient(create_app(lambda m: OracleModel(truth), max_upload_mb=0.01, max_voxels=1000))
    big = npz(image=image, prompt=prompt, spacing=np.ones(3))
    r = client.post("/jobs", content=big)
    assert r.status_code == 413 and "at most 0.01 MB" in r.json()["detail"]
    client = TestClient(create_app(lambda m: OracleModel(truth), max_voxels=1000))
    r = client.post("/jobs", content=big)
    assert r.status_code == 400 and "has shape (16, 24, 24); this server takes at most 1,000" in r.json()["detail"]


def test_finished_results_expire(oracle_app):
    _, image, prompt, truth = oracle_app
    # aged, not waited for: with a 1 s time to live a loaded machine let the result expire between two polls
    # of wait_for (a flake, sessions 45 and 48; with 0.2 s before)
    client = TestClient(create_app(lambda m: OracleModel(truth), result_ttl=60.0))
    job = client.post("/jobs", content=npz(image=image, prompt=prompt, spacing=np.ones(3))).json()
    assert wait_for(client, job["id"])["state"] == "finished"
    assert client.get(f"/jobs/{job['id']}/result").status_code == 200
    queue = client.app.state.queue
    queue.jobs[job["id"]].finished_at -= 61.0
    r = client.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 404 and "results are kept 60 s" in r.json()["detail"]


def test_a_token_is_required_when_set(oracle_app):
    _, image, prompt, truth = oracle_app
    client = TestClient(create_app(lambda m: OracleModel(truth), token="s3cret"))
    assert client.get("/info").status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/info", headers={"Authorization": "bearer s3cret"}).status_code == 200  # scheme: any case
    assert client.get("/info", headers={"Authorization": "Basic s3cret"}).status_code == 401


class Blocking(OracleModel):
    """The oracle, but each prediction waits until ``release`` is set (a slow job)."""

    def __init__(self, truth):
        super().__init__(truth)
        self.release = threading.Event()
        self.started = threading.Event()

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.started.set()
        self.release.wait(10)
        return super().predict(volume, guide_index, guide_mask, query_indices)


def test_the_queue_is_bounded_and_a_running_job_can_be_cancelled():
    image, prompt, truth = case()
    model = Blocking(truth)
    client = TestClient(create_app(lambda m: model, max_jobs=2))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    first = client.post("/jobs", content=body).json()
    assert model.started.wait(10)
    assert client.get(f"/jobs/{first['id']}").json()["state"] == "running"
    second = client.post("/jobs", content=body).json()
    third = client.post("/jobs", content=body).json()
    assert (second["queue_position"], third["queue_position"]) == (1, 2)
    r = client.post("/jobs", content=body)  # two wait besides the running one: full
    assert r.status_code == 503 and "2 jobs are waiting already" in r.json()["detail"]
    # refused before the upload is read (a refused 1 GB upload was received and parsed first): a body
    # that is no volume at all gets the same 503, not a 400 about its bytes
    r = client.post("/jobs", content=b"not a volume")
    assert (r.status_code, r.json()["detail"]) == (503, "2 jobs are waiting already; try again later")
    info = client.get("/info").json()
    assert (info["queued"], info["max_jobs"], info["waiting"]) == (2, 2, 3)
    assert client.get(f"/jobs/{first['id']}/result").status_code == 409
    assert client.delete(f"/jobs/{first['id']}").status_code == 200
    assert client.get(f"/jobs/{first['id']}").status_code == 404
    model.release.set()
    assert wait_for(client, second["id"])["state"] == "finished"
    assert wait_for(client, third["id"])["state"] == "finished"


# ----------------------------------------------------------------------------- over a real socket


@pytest.fixture
def live_server():
    """A server in a thread whose model the test sets: yields (url, holder); holder["model"] = ..."""
    holder = {}
    with serving(create_app(lambda method: holder["model"], token="tok")) as url:
        yield url, holder


def test_the_client_propagates_remotely_with_progress(live_server):
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    seen = []
    result = RemoteModel(url, token="tok", poll_interval=0.01).propagate(
        image, prompt, (2.0, 1.0, 1.0), progress=lambda f, m: seen.append((f, m)), labels=[1])
    local = propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth))
    assert np.array_equal(result.mask, local.mask) and result.axis == 0
    assert seen and all(m.startswith("server: ") for _, m in seen)


def test_the_engine_checks_the_inputs_here_then_hands_a_remote_model_to_its_server(live_server):
    """``propagate(..., model=RemoteModel(...))`` (what the command line and Slicer call): bad input
    is refused here, before any upload (an unreachable server is never asked); good input is
    propagated by the server, with the result a local run gives."""
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    free = free_port()
    unreachable = RemoteModel(f"http://127.0.0.1:{free}", timeout=2)
    with pytest.raises(InputError, match="the prompt is empty"):
        propagate(image, np.zeros_like(prompt), (2.0, 1.0, 1.0), unreachable)
    with pytest.raises(InputError, match="range"):
        propagate(image, prompt, (2.0, 1.0, 1.0), unreachable, range=(5, 2))
    seen = []
    result = propagate(image, prompt, (2.0, 1.0, 1.0), RemoteModel(url, token="tok", poll_interval=0.01),
                       progress=lambda f, m: seen.append(m))
    local = propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth))
    assert np.array_equal(result.mask, local.mask) and result.mask.any()
    assert seen and all(m.startswith("server: ") for m in seen)  # the server's progress, not a local walk


def test_client_cancel_cancels_the_server_job(live_server):
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = model = Blocking(truth)
    token = CancelToken()

    def progress(fraction, message):
        if model.started.is_set():
            token.cancel()

    with pytest.raises(PropagationCancelled):
        RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (1, 1, 1), progress=progress,
                                                                     cancel=token)
    info = RemoteModel(url, token="tok").info()  # the job was deleted on the server: nothing waits
    model.release.set()
    assert info["waiting"] == 0


def test_client_sends_whole_number_float_volumes_as_int16():
    from PAMSegmentLib.remote import _compact

    ct = np.array([[[-1024.0, 0.0, 3071.0]]], np.float32)
    assert _compact(ct).dtype == np.int16 and np.array_equal(_compact(ct), ct)
    assert _compact(ct + 0.5).dtype == np.float32  # not whole numbers: sent as they are
    assert _compact(ct * 20).dtype == np.float32  # beyond int16


def test_client_sends_empty_slices_per_label(live_server):
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    result = RemoteModel(url, token="tok").propagate(image, prompt, (1, 1, 1), empty_slices={1: [5]})
    assert not result.mask[5].any() and not result.mask[:5].any() and result.mask[6:12].any()


def test_client_against_another_kind_of_server():
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    other = FastAPI()

    @other.get("/info")
    def login_page():
        return HTMLResponse("<html>please log in</html>")

    with serving(other) as url:
        with pytest.raises(PAMError, match="answered, but not as a PAMSegment server does"):
            RemoteModel(url).propagate(*case()[:2], (1, 1, 1))


def test_an_update_with_a_thin_tip_runs_on_the_server(live_server):
    """An edited result whose end slice is a thin line next to a keyframe: a stroke from another
    view for a fresh prompt, the object's tip for an update, also when a server runs it."""
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    edited = prompt.copy()
    edited[8] = truth[8]
    edited[9, 12, 8:16] = 1  # a one-voxel-thin row beside slice 8
    with pytest.raises(InputError, match="drawn on more than one plane"):
        propagate(image, edited, (1, 1, 1), OracleModel(truth))
    local = propagate(image, edited, (1, 1, 1), OracleModel(truth), update=True)
    first = propagate(image, prompt, (1, 1, 1), OracleModel(truth))
    remote = RemoteModel(url, token="tok").propagate(image, edited, (1, 1, 1), previous=first)
    assert np.array_equal(remote.mask, local.mask)


def test_ctrl_c_in_the_client_cancels_the_server_job(live_server):
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = model = Blocking(truth)

    def progress(fraction, message):
        if model.started.is_set():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (1, 1, 1), progress=progress)
    info = RemoteModel(url, token="tok").info()
    model.release.set()
    assert info["waiting"] == 0


def test_client_errors_are_one_clear_message(live_server):
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    with pytest.raises(PAMError, match="^the server at .* refused the token given; check --token or PAMSEGMENT_TOKEN"):
        RemoteModel(url, token="nope").info()
    with pytest.raises(PAMError, match="^the server at .* needs a token: give it with --token T or PAMSEGMENT_TOKEN"):
        RemoteModel(url).info()  # it "refused the token (missing or wrong token (send Authorization: Bearer ...))"
    with pytest.raises(InputError, match="the prompt is empty"):
        RemoteModel(url, token="tok").propagate(image, np.zeros_like(prompt), (1, 1, 1))
    with pytest.raises(InputError, match="not an http"):
        RemoteModel("gpu-box:8765")
    free = free_port()
    with pytest.raises(PAMError, match="cannot reach the PAMSegment server"):
        RemoteModel(f"http://127.0.0.1:{free}", timeout=2).info()


def test_a_job_that_fails_on_the_server_reports_why(live_server):
    url, holder = live_server
    image, prompt, truth = case()

    class Broken(OracleModel):
        def predict(self, *a, **k):
            raise InputError("the model broke on purpose")

    holder["model"] = Broken(truth)
    with pytest.raises(InputError, match="could not propagate: the model broke on purpose"):
        RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (1, 1, 1))


def test_serve_refuses_to_listen_beyond_this_machine_without_a_token(run_cli):
    proc = run_cli("serve", "--host", "0.0.0.0", env={"PAMSEGMENT_TOKEN": ""})
    assert proc.returncode == 2
    assert "exposes the server beyond this machine: set a token" in proc.stderr


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("LOCALHOST.", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
    ("127.0.0.1.example.org", False), ("localhost..", False),
])
def test_only_loopback_addresses_count_as_this_machine(host, local):
    from PAMSegmentLib.server import is_loopback

    assert is_loopback(host) is local


def test_propagate_with_server_refuses_local_model_options(run_cli, ct_case):
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", ct_case.directory / "o.nii.gz",
                   "--server", "http://127.0.0.1:9", "--registration-weight", "0.3")
    assert proc.returncode == 2 and "--registration-weight sets up a local model" in proc.stderr


def test_propagate_with_server_says_the_local_run_options_are_ignored(run_cli, ct_case):
    """--device, --threads and --batch-size with --server were ignored without a word (a user could
    think the GPU flag took effect)."""
    proc = run_cli("propagate", ct_case.image_path, ct_case.prompt_path, "-o", ct_case.directory / "o.nii.gz",
                   "--server", "http://127.0.0.1:9", "--threads", "2", "--batch-size", "4")
    assert "note: --threads and --batch-size are set by the server (pamsegment serve --threads N --batch-size N); " \
           "ignored here" in proc.stdout
    assert proc.returncode == 2 and "cannot reach the PAMSegment server" in proc.stderr  # nothing listens there



def test_serve_without_the_server_extra_says_what_to_install(monkeypatch, capsys):
    import sys

    from PAMSegmentLib.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve"]) == 2
    # from the checkout, as the Quick start installs (no PAMSegmentLib distribution is published)
    assert 'pip install ".[server]" in the PAMSegment source folder (or pip install fastapi uvicorn)' in (
        capsys.readouterr().err)


def test_one_waiting_job_is_one_job():
    release, started = threading.Event(), threading.Event()

    def run(job):
        started.set()
        release.wait(10)
        return b""

    from PAMSegmentLib.server import JobQueue

    queue = JobQueue(run, max_jobs=1)
    queue.submit(None, None, None, {})
    assert started.wait(10)  # the first runs
    queue.submit(None, None, None, {})  # the second waits
    with pytest.raises(QueueFull, match="^1 job is waiting already; try again later$"):
        queue.submit(None, None, None, {})
    release.set()


def test_the_server_runs_jobs_with_its_batch_size():
    image, prompt, truth = case()
    models = []

    def factory(method):
        models.append(OracleModel(truth))
        return models[-1]

    client = TestClient(create_app(factory, batch_size=3))
    assert client.get("/info").json()["batch_size"] == 3
    job = client.post("/jobs", content=npz(image=image, prompt=prompt, spacing=np.ones(3))).json()
    assert wait_for(client, job["id"])["state"] == "finished"
    # at most 3 query slices per call (the engine's default, 16, gives calls of 4: the oracle's window)
    assert max(len(q) for _, q in models[0].calls) == 3


@pytest.mark.parametrize("args, phrase", [
    (["--port", "70000"], "argument --port: expected a port number from 1 to 65535, got '70000'"),
    (["--port", "0"], "argument --port: expected a port number from 1 to 65535, got '0'"),
    (["--max-upload-mb", "nan"], "argument --max-upload-mb: expected a size in MB greater than 0, got 'nan'"),
    (["--max-upload-mb", "-5"], "argument --max-upload-mb: expected a size in MB greater than 0, got '-5'"),
    (["--max-upload-mb", "0"], "argument --max-upload-mb: expected a size in MB greater than 0, got '0'"),
    (["--max-voxels", "0"], "argument --max-voxels: expected a positive integer, got '0'"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
])
def test_serve_options_are_checked_by_the_parser(args, phrase, capsys):
    from PAMSegmentLib.cli import build_parser

    with pytest.raises(SystemExit) as exit_:  # the parser alone: an option let through would start a server
        build_parser(["serve"]).parse_args(["serve", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and phrase in err


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(monkeypatch, capsys):
    from PAMSegmentLib import checkpoints
    from PAMSegmentLib.cli import main

    def not_reached(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was taken")

    monkeypatch.setattr(checkpoints, "load_model", not_reached)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (f"pamsegment: error: port {port} is in use on 127.0.0.1 (another pamsegment serve?); stop that "
                   "program or choose another --port\n")


def _no_model(monkeypatch):
    from PAMSegmentLib import checkpoints

    def not_reached(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(checkpoints, "load_model", not_reached)


def test_serve_on_a_machine_without_ipv6_is_one_line(monkeypatch, capsys):
    """The socket was made before the try: `--host ::1` where IPv6 is off (a container) was an
    OSError traceback (Address family not supported)."""
    import errno

    from PAMSegmentLib.cli import main

    real = socket.socket

    class NoIPv6(real):
        def __init__(self, family=-1, *args, **kwargs):
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    _no_model(monkeypatch)
    monkeypatch.setattr(socket, "socket", NoIPv6)
    assert main(["serve", "--host", "::1", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == ("pamsegment: error: this machine has no address ::1; give --host one of its "
                                       "addresses, 127.0.0.1 (this machine only) or 0.0.0.0 (every network)\n")


def test_serve_listens_on_a_name_that_has_only_ipv6_addresses(monkeypatch):
    # The family was chosen by ":" in the host: a name was always IPv4, so "this machine has no address".
    from PAMSegmentLib import server

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host == "v6only.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with server._listen_socket("v6only.test", 0) as sock:
        assert (sock.family, sock.getsockname()[0]) == (socket.AF_INET6, "::1")


@pytest.mark.parametrize("system, reused", [("posix", True), ("nt", False)])
def test_serve_lets_a_just_freed_port_be_reused_on_posix_only(monkeypatch, system, reused):
    """On Windows SO_REUSEADDR lets a second socket bind a port another server is using, so the
    port-in-use message would not come and two servers would share the port (asyncio sets it on
    POSIX only)."""
    import types

    from PAMSegmentLib import server

    options, real = [], socket.socket

    class Recording(real):
        def setsockopt(self, level, name, value):
            options.append((level, name))
            return super().setsockopt(level, name, value)

    monkeypatch.setattr(socket, "socket", Recording)
    monkeypatch.setattr(server, "os", types.SimpleNamespace(name=system), raising=False)
    with server._listen_socket("127.0.0.1", 0):
        pass
    assert ((socket.SOL_SOCKET, socket.SO_REUSEADDR) in options) == reused


def test_serve_checks_the_checkpoint_before_listening_and_closes_the_socket_when_the_model_fails(
        tmp_path, monkeypatch, capsys):
    from PAMSegmentLib import checkpoints, server
    from PAMSegmentLib.cli import main

    opened, real = [], server._listen_socket

    def listen(host, port):
        opened.append(real(host, port))
        return opened[-1]

    monkeypatch.setattr(server, "_listen_socket", listen)
    assert main(["serve", "--port", str(free_port()), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert f"checkpoint {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err
    assert opened == []  # refused before a port was taken

    def broken(*args, **kwargs):
        raise InputError("the weights do not load")

    monkeypatch.setattr(checkpoints, "load_model", broken)
    assert main(["serve", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == "pamsegment: error: the weights do not load\n"
    assert len(opened) == 1 and opened[0].fileno() == -1  # closed: it was left open (a ResourceWarning)


def test_the_address_printed_is_one_other_machines_can_use(monkeypatch):
    from PAMSegmentLib import server

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box")
    assert server._address("0.0.0.0", 8765) == "http://gpu-box:8765"  # not http://0.0.0.0:8765
    assert server._address("::", 8765) == "http://gpu-box:8765"
    assert server._address("::1", 8765) == "http://[::1]:8765"
    assert server._address("127.0.0.1", 8765) == "http://127.0.0.1:8765"


def test_serve_names_the_weights_pamsegment_model_points_at(monkeypatch):
    from PAMSegmentLib import server

    monkeypatch.setenv("PAMSEGMENT_MODEL", "/models/pam_small.pt")
    assert server._checkpoint_label(None) == "/models/pam_small.pt (PAMSEGMENT_MODEL)"
    assert server._checkpoint_label("mine.pt") == "mine.pt"
    monkeypatch.delenv("PAMSEGMENT_MODEL")
    assert server._checkpoint_label(None) == "shipped default weights"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_serve_prints_its_address_once_listening_and_stops_on_ctrl_c(small_checkpoint, stop):
    """The command itself: the line comes once the server answers at the address it gives, with
    the limits and batch size asked for; Ctrl-C stops it with exit status 0. So does SIGTERM (it
    ended the process with 143 and no word, the running job not cancelled), here with a client's
    upload stalled halfway, which kept the server from ending at all: it gets 10 s, then is closed."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from conftest import REPO, _cli_env

    port = free_port()
    walk = ["--walk", "published"] if stop == "SIGTERM" else []  # the network's walk for every job
    proc = subprocess.Popen([sys.executable, "-m", "PAMSegmentLib", "serve", "--port", str(port), "--checkpoint",
                             str(small_checkpoint.path), "--max-voxels", "1000", "--max-upload-mb", "2",
                             "--batch-size", "4", *walk], cwd=REPO, env=_cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)  # a guard against a hung server, not a timing assertion
        assert lines and lines[0], proc.stderr.read() if proc.poll() is not None else "no line"
        assert lines[0] == (f"pamsegment server on http://127.0.0.1:{port} ({small_checkpoint.path}); "
                            "Ctrl-C stops it\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30) as resp:  # answers already
            info = json.loads(resp.read())
        assert info["model"]["checkpoint"] == small_checkpoint.path.name  # (the path stays the server's own)
        assert info["model"]["walk"] == ("published" if walk else "engine")
        assert (info["max_voxels"], info["max_upload_mb"], info["batch_size"]) == (1000, 2.0, 4)
        rebound = urllib.request.Request(f"http://127.0.0.1:{port}/info", headers={"Host": f"evil.example:{port}"})
        with pytest.raises(urllib.error.HTTPError, match="403"):  # no token: this machine's names only
            urllib.request.urlopen(rebound, timeout=30)
        stalled = None
        if stop == "SIGTERM":
            stalled = socket.create_connection(("127.0.0.1", port))
            stalled.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=30):  # the upload has begun
                pass
        proc.send_signal(getattr(signal, stop))
        out, err = proc.communicate(timeout=60)
        if stalled is not None:
            stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ERROR" not in err, err
    if stop == "SIGINT":
        assert out == "pamsegment server stopped\n"
    else:
        assert out.splitlines() == ["stopping: 1 open connection (uploads, status requests) get up to 10 s to finish",
                                    "closed 1 connection that did not finish", "pamsegment server stopped"]


def _requests_of(monkeypatch):
    """The (method, path) of every request RemoteModel sends from now on."""
    sent = []
    real = RemoteModel._request

    def recording(self, method, path, body=None, **kw):
        sent.append((method, path.split("?")[0]))
        return real(self, method, path, body, **kw)

    monkeypatch.setattr(RemoteModel, "_request", recording)
    return sent


def test_the_client_refuses_a_volume_over_the_servers_voxel_limit_before_uploading(monkeypatch):
    image, prompt, truth = case()  # 16 x 24 x 24 = 9,216 voxels
    with serving(create_app(lambda m: OracleModel(truth), max_voxels=1000)) as url:
        sent = _requests_of(monkeypatch)
        with pytest.raises(InputError) as refused:
            RemoteModel(url).propagate(image, prompt, (1, 1, 1))
    assert str(refused.value) == (f"the volume has 9,216 voxels; the server at {url} takes at most 1,000 (crop the "
                                  "volume around the object)")
    assert sent == [("GET", "/info")]  # nothing uploaded


def test_the_upload_size_message_rounds_up():
    # 2 x 1024 x 107 float32 voxels that are not whole numbers (sent as they are) and a uint8 prompt:
    # 219,136 x 5 bytes = 1.045 MB with the .npz headers, which "1 MB ... at most 1 MB" misreported.
    rng = np.random.default_rng(0)
    image = rng.random((2, 1024, 107), dtype=np.float32)
    prompt = np.zeros(image.shape, np.uint8)
    prompt[0, 10:20, 10:20] = 1  # (an empty prompt is refused first, here, since session 30)
    with serving(create_app(lambda m: None, max_upload_mb=1)) as url:
        with pytest.raises(InputError) as refused:
            RemoteModel(url).propagate(image, prompt, (1, 1, 1))
    assert str(refused.value).startswith(f"the volume and prompt are 1.1 MB; the server at {url} takes at most 1 MB")


def test_an_address_without_a_pamsegment_server_says_so():
    from fastapi import FastAPI

    image, prompt, truth = case()
    with serving(FastAPI()) as other:  # answers 404 to /info, as any other web server would
        with pytest.raises(PAMError, match="answered, but not as a PAMSegment server does; check the address"):
            RemoteModel(other).info()
    with serving(create_app(lambda m: OracleModel(truth))) as url:  # a path after the server's address
        with pytest.raises(PAMError, match="answered, but not as a PAMSegment server does; check the address"):
            RemoteModel(url + "/foo").info()


def test_the_client_deletes_its_job_once_the_result_is_downloaded():
    image, prompt, truth = case()
    app = create_app(lambda m: OracleModel(truth))
    with serving(app) as url:
        result = RemoteModel(url, poll_interval=0.01).propagate(image, prompt, (1, 1, 1))
        assert result.mask.any()
        assert list(app.state.queue.jobs) == []  # not kept for result_ttl (an hour) after the download


def test_the_command_line_shows_the_servers_state_and_queue_position(live_server, ct_case, capsys, monkeypatch):
    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.cli import _ProgressBar, main

    monkeypatch.setenv("PAMSEGMENT_PROGRESS", "bar")  # as on a terminal (captured stderr is not one)
    bar = _ProgressBar("propagating", show_message=True)
    bar(0.0, "server: waiting (queue position 2)")  # the bar stands at 0 %: the message says why
    bar.close()
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("propagating:   0%") and last.rstrip().endswith(", server: waiting (queue position 2)")
    url, holder = live_server
    holder["model"] = get_predictor("copy")
    out = ct_case.directory / "out.nii.gz"
    assert main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--server", url,
                 "--token", "tok", "--method", "copy"]) == 0
    assert "server: done" in capsys.readouterr().err  # the last state the bar showed


def test_a_connection_that_sends_no_whole_request_head_is_dropped():
    """uvicorn kept a connection sending part of a request head open for ever, before any token
    check: enough of them locked every client out (a review: 300 timed all clients out). The
    server's protocol drops one after its deadline; whole requests are served as before."""
    from PAMSegmentLib.server import header_timeout_protocol

    protocol = header_timeout_protocol(0.5)
    assert protocol is not None
    app = create_app(lambda method: OracleModel(np.zeros((4, 4, 4), bool)), token="secret")
    with serving(app, http=protocol) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n")  # never finished
            assert slow.recv(100) == b""  # closed by the server (the timeout guards against a hang)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            assert silent.recv(100) == b""  # nothing sent at all: closed too
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:  # a kept-alive client
            for _ in range(2):
                kept.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer:  # the head, then as many body bytes as it announces
                    answer += kept.recv(4096)
                head, body = answer.split(b"\r\n\r\n", 1)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += kept.recv(4096)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["server"] == "pamsegment"
        assert RemoteModel(f"http://127.0.0.1:{port}", token="secret\r\n").info()["server"] == "pamsegment"


def test_a_client_is_refused_before_its_upload_when_the_servers_queue_is_full(monkeypatch):
    """/info says how many jobs are queued and how many the server queues: a client refuses at once
    instead of uploading a volume to be turned away."""
    image, prompt, truth = case()
    model = RemoteModel("http://127.0.0.1:9")
    monkeypatch.setattr(model, "info", lambda cancel=None: {"queued": 8, "max_jobs": 8, "max_voxels": 10**9})
    monkeypatch.setattr(model, "_request", lambda *a, **k: pytest.fail("nothing is sent"))
    with pytest.raises(PAMError, match=r"^the server at http://127.0.0.1:9 has 8 jobs waiting already \(it queues at "
                                       r"most 8\); try again later$"):
        model.propagate(image, prompt, (1.0, 1.0, 1.0))


def test_serve_refuses_a_token_no_client_can_send(run_cli):
    proc = run_cli("serve", "--port", "1", "--token", "s\u20accret")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "pamsegment: error: the token must be printable ASCII (letters, digits, punctuation): an HTTP header cannot "
        "carry other characters, so no client could send it; choose another")


def test_a_token_with_a_line_break_inside_is_one_message():
    with pytest.raises(InputError, match="the token holds control characters"):
        RemoteModel("http://127.0.0.1:9", token="sec\nret")


def test_stopping_the_queue_cancels_the_running_job_and_ends_the_worker():
    """Ctrl-C on serve during a job ended the process under a running network (SIGABRT in 3 of 6
    tries): the queue now cancels its jobs and waits for the worker."""
    from PAMSegmentLib.server import JobQueue

    started = threading.Event()

    def run(job):
        started.set()
        while not job.cancel.is_cancelled:  # a long job that stops between batches
            time.sleep(0.01)
        raise PropagationCancelled("cancelled")

    queue = JobQueue(run)
    job = queue.submit(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0), {})
    assert started.wait(10)
    assert queue.close(timeout=10) is True
    assert job.state == "cancelled" and not queue._thread.is_alive()


def _propagate_with_first_job_gets_failing(live_server, monkeypatch, errors):
    """The remote propagation of ``case()`` when the client's first GETs of /jobs/... raise
    ``errors`` (one each); returns (result, the paths that failed, the same propagation run here)."""
    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    real, failed = RemoteModel._request, []

    def flaky(self, method, path, body=None, **kw):
        if method == "GET" and path.startswith("/jobs/") and len(failed) < len(errors):
            failed.append(path)
            raise errors[len(failed) - 1]
        return real(self, method, path, body, **kw)

    monkeypatch.setattr(RemoteModel, "_request", flaky)
    result = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    return result, failed, propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth))


def test_the_client_asks_again_when_the_network_drops_during_a_job(live_server, monkeypatch):
    """A one-second network cut lost the whole job (the client failed at once while the server ran
    it for nobody): status and result are asked again for up to 30 s."""
    from PAMSegmentLib import remote

    drop = remote._Unreachable("cannot reach the PAMSegment server (connection reset)")
    result, dropped, here = _propagate_with_first_job_gets_failing(live_server, monkeypatch, [drop, drop])
    assert len(dropped) == 2 and np.array_equal(result.mask, here.mask)


def test_a_result_download_cut_short_is_asked_again(live_server, monkeypatch):
    import http.client

    import PAMSegmentLib.remote as remote

    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)
    real, cut = remote._OPENER.open, []

    def flaky(req, *args, **kwargs):
        if req.full_url.endswith("/result") and not cut:
            cut.append(req.full_url)
            raise http.client.IncompleteRead(b"partial", 100)
        return real(req, *args, **kwargs)

    monkeypatch.setattr(remote._OPENER, "open", flaky)
    result = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    assert cut and result.mask.any()


def test_stopping_serve_says_when_it_waits_for_a_job_that_does_not_stop(capsys):
    from PAMSegmentLib.server import JobQueue, _stop_queue

    release = threading.Event()
    started = threading.Event()

    def run(job):  # ignores its cancel token until released
        started.set()
        release.wait(10)
        raise PropagationCancelled("cancelled")

    queue = JobQueue(run)
    queue.submit(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0), {})
    assert started.wait(10)
    assert _stop_queue(queue, wait=0.3) is True  # (the process is left with the job running: serve then ends it)
    out = capsys.readouterr().out
    assert out.startswith("stopping: cancelling the running job, which ends between two batches (Ctrl-C again to "
                          "quit at once)\n")
    assert "the running job did not stop within 0 s; quitting anyway" in out
    release.set()


class Slow(OracleModel):
    """The oracle, ``delay`` s per prediction (0.2 s: a job of about 1 s on ``case()``)."""

    delay = 0.2

    def predict(self, volume, guide_index, guide_mask, query_indices):
        time.sleep(self.delay)
        return super().predict(volume, guide_index, guide_mask, query_indices)


def test_a_job_whose_client_is_gone_is_cancelled_and_one_asked_about_runs_to_the_end():
    """A client killed right after its upload left its job running (and the jobs queued behind it
    waiting) for nobody: a job no client asked about for abandon_after seconds is cancelled."""
    image, prompt, truth = case()
    client = TestClient(create_app(lambda m: Slow(truth), abandon_after=0.6))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    gone = client.post("/jobs", content=body).json()["id"]  # runs; nobody asks about it
    also_gone = client.post("/jobs", content=body).json()["id"]  # waits behind it; nobody asks either
    time.sleep(2.5)
    first = client.get(f"/jobs/{gone}").json()
    assert first["state"] == "cancelled" and first["message"] == "cancelled: no client asked about it for 1 s"
    assert first["progress"] < 1.0
    assert client.get(f"/jobs/{also_gone}").json()["state"] == "cancelled"
    # A job whose client keeps asking (as RemoteModel does while it waits) runs past abandon_after.
    kept = client.post("/jobs", content=body).json()["id"]
    t0 = time.monotonic()
    status = wait_for(client, kept)
    assert status["state"] == "finished" and time.monotonic() - t0 > 0.6
    assert np.array_equal(decode_result(client.get(f"/jobs/{kept}/result").content).mask,
                          propagate(image, prompt, (1.0, 1.0, 1.0), OracleModel(truth)).mask)


def test_a_proxys_bad_gateway_during_a_job_is_asked_again(live_server, monkeypatch):
    """A proxy in front of the server answering 502/504 for a moment failed the job at once."""
    from PAMSegmentLib import remote

    url, _ = live_server
    errors = [remote._Answered(f"the server at {url} answered {code}: Bad Gateway", code) for code in (502, 504)]
    result, answered, here = _propagate_with_first_job_gets_failing(live_server, monkeypatch, errors)
    assert len(answered) == 2 and np.array_equal(result.mask, here.mask)
    # Other answers are not asked again: a 500 is the server's own error, said at once.
    monkeypatch.setattr(RemoteModel, "_request", lambda self, method, path, body=None, cancel=None: (_ for _ in ()).throw(
        remote._Answered("the server answered 500: Internal Server Error", 500)))
    t0 = time.monotonic()
    with pytest.raises(remote._Answered, match="500"):
        RemoteModel(url, token="tok")._get_retrying("/jobs/x")
    assert time.monotonic() - t0 < 1.0


def test_a_job_the_server_cancelled_is_an_error_with_its_reason_not_an_interrupt():
    """A client stalled past abandon_after (a laptop asleep) was told "interrupted" (batch then
    stopped every remaining case): the server's reason is an error of that job alone."""
    image, prompt, truth = case()
    stalled = []

    def progress(fraction, message):
        if not stalled:
            stalled.append(message)
            time.sleep(2.0)  # no status asked meanwhile

    slower = Slow(truth)
    slower.delay = 0.6  # a job of about 3 s: still running when abandoned
    with serving(create_app(lambda m: slower, abandon_after=1.0)) as url:
        with pytest.raises(PAMError, match=r"the server cancelled the job \(cancelled: no client asked about it for "
                                           r"1 s\); run it again") as caught:
            RemoteModel(url, poll_interval=0.05).propagate(image, prompt, (1.0, 1.0, 1.0), progress=progress)
    assert not isinstance(caught.value, PropagationCancelled)


def test_queued_jobs_nobody_asks_about_give_their_place_up():
    from PAMSegmentLib.server import JobQueue

    release = threading.Event()
    queue = JobQueue(lambda job: release.wait(10) and b"", max_jobs=2, abandon_after=0.2)
    args = (np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0), {})
    running = queue.submit(*args)
    time.sleep(0.1)
    waiting = [queue.submit(*args), queue.submit(*args)]
    with pytest.raises(QueueFull):
        queue.submit(*args)  # two wait already
    time.sleep(0.3)  # nobody asked about the two waiting ones
    fresh = queue.submit(*args)  # their places are free again
    assert [j.state for j in waiting] == ["cancelled", "cancelled"] and fresh.state == "queued"
    assert waiting[0].message == "cancelled: no client asked about it for 0 s" and running.state == "running"
    release.set()
    queue.close(timeout=10)


@pytest.mark.parametrize("header", ["Bearer ", "Bearer s3cre", "Bearer s3cretX"])
def test_only_the_whole_token_is_accepted(oracle_app, header):
    """Pins that the token is compared whole: an empty token, a prefix of it ("s3cre" of "s3cret")
    and the token with a character more each get 401. A check by prefix (``token.startswith``)
    would let "Authorization: Bearer " (nothing at all) through."""
    _, image, prompt, truth = oracle_app
    client = TestClient(create_app(lambda m: OracleModel(truth), token="s3cret"))
    assert client.get("/info", headers={"Authorization": header}).status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_bug_in_the_model_fails_its_job_and_the_server_goes_on():
    """Pins the worker's catch-all: an exception that is not a PAMError (here ValueError, as a bug
    or a numpy error would raise) fails that job with "internal error: ValueError: boom", and the
    worker thread lives on: a job submitted afterwards runs to "finished". Without the catch-all
    the worker thread died, and every later job stayed queued forever."""
    image, prompt, truth = case()
    models = {"first": True}

    class BrokenOnce(OracleModel):
        def predict(self, *a, **k):
            if models["first"]:
                models["first"] = False
                raise ValueError("boom")
            return super().predict(*a, **k)

    client = TestClient(create_app(lambda m: BrokenOnce(truth)))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    first = client.post("/jobs", content=body).json()
    status = wait_for(client, first["id"], timeout=10)
    assert status["state"] == "failed"
    assert status["message"].startswith("internal error: ValueError: boom"), status["message"]
    second = client.post("/jobs", content=body).json()
    assert wait_for(client, second["id"], timeout=10)["state"] == "finished"
    got = decode_result(client.get(f"/jobs/{second['id']}/result").content)
    assert np.array_equal(got.mask, propagate(image, prompt, (1, 1, 1), OracleModel(truth)).mask)



def test_an_idle_server_gives_freed_memory_back(monkeypatch):
    """An idle server was seen holding about 3 GB after a burst of large uploads (glibc keeps freed
    heap pages). Once the queue is empty the worker calls ``release_memory`` (malloc_trim): here
    once, after the second of two jobs (the second waited while the first ran). On four
    120 x 512 x 512 uploads (a scratch measurement) the idle RSS fell from 357 to 263 MB."""
    from PAMSegmentLib import server

    calls = []
    monkeypatch.setattr(server, "release_memory", lambda: calls.append(1))
    image, prompt, truth = case()
    model = Blocking(truth)
    client = TestClient(create_app(lambda m: model))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    first = client.post("/jobs", content=body).json()["id"]
    assert model.started.wait(10)
    second = client.post("/jobs", content=body).json()["id"]
    model.release.set()
    assert wait_for(client, first)["state"] == wait_for(client, second)["state"] == "finished"
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert calls == [1]


def test_the_server_says_what_it_does_one_line_per_event(caplog):
    """A review: after its start line serve printed nothing (not a job received, finished or
    refused, not a wrong token): an operator could not see what it did."""
    import logging

    caplog.set_level(logging.INFO, logger="pamsegment.server")
    image, prompt, truth = case()
    client = TestClient(create_app(lambda m: OracleModel(truth), token="tok"))
    assert client.get("/info").status_code == 401
    auth = {"Authorization": "Bearer tok"}
    job = client.post("/jobs", content=npz(image=image, prompt=prompt, spacing=np.ones(3)), headers=auth).json()
    t0 = time.monotonic()
    while client.get(f"/jobs/{job['id']}", headers=auth).json()["state"] != "finished" and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    bad = client.post("/jobs", content=npz(image=image, prompt=np.zeros_like(prompt), spacing=np.ones(3)),
                      headers=auth)
    assert bad.status_code == 400
    deadline = time.monotonic() + 5
    while not any("finished after" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "pamsegment.server"]
    short = job["id"][:8]
    assert "refused GET /info from testclient: no token" in lines
    # alone on the server: it runs at once (the line said "queue position 1" when the worker had not taken it yet)
    assert f"job {short} from testclient: 16 x 24 x 24 voxels (0 MB), method pam; runs now" in lines, lines
    assert any(line.startswith(f"job {short} finished after ") for line in lines)
    assert any(line.startswith("refused a job from testclient: the prompt is empty") for line in lines), lines


def test_a_server_lost_while_it_has_the_job_is_said_as_such(live_server, monkeypatch):
    """A review: a server stopped during a job left the client asking "is `pamsegment serve` running
    there?" after its 30 s of retries, as if it had never been reached. Once the job was taken,
    the message says the server was lost while it had the job."""
    from PAMSegmentLib import remote

    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = OracleModel(truth)

    def gone(self, path, cancel=None, seconds=remote.RETRY_SECONDS):
        raise remote._Unreachable(f"cannot reach the PAMSegment server at {self.url} ([Errno 111] Connection "
                                  "refused); is `pamsegment serve` running there? (asked again until 30 s had passed)")

    monkeypatch.setattr(RemoteModel, "_get_retrying", gone)
    with pytest.raises(remote.ServerUnreachable, match=r"^lost the PAMSegment server at .* while it had the job "
                                                       r"\(\[Errno 111\] Connection refused, asked again for 30 s\): "
                                                       r"it stopped or the network failed; nothing was written"):
        RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (1.0, 1.0, 1.0))


def test_damaged_uploads_and_huge_numbers_are_a_400_with_a_reason(oracle_app):
    """A review (s28): a bad CRC, an entry flagged encrypted, a cut .npy header and a dimension of
    2**70 were answered 500 (a traceback in the log) or 503 ("queue full"); a 5000-digit number in
    the options a 500."""
    client, image, prompt, _ = oracle_app
    good = npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0]))
    data = io.BytesIO()
    np.save(data, image)
    at = good.index(data.getvalue()[200:216])
    bad_crc = bytearray(good)
    bad_crc[at] ^= 0xFF
    encrypted = bytearray(good)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        j = 0
        while (j := encrypted.find(signature, j)) >= 0:
            encrypted[j + offset] |= 1
            j += 4

    def with_image(raw):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("image.npy", raw)
            z.writestr("prompt.npy", npz_member(prompt))
            z.writestr("spacing.npy", npz_member(np.array([2.0, 1.0, 1.0])))
        return buf.getvalue()

    cut = b"\x93NUMPY\x01\x00\x30\x00" + b"{'descr':'<f4','fortran_order':False,'shape':(-1,2,3)}".ljust(48)
    head = ("{'descr':'<f4','fortran_order':False,'shape':(%d,0,3)}" % 2**70).ljust(118) + "\n"
    huge = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode()
    for body, reason in ((bytes(bad_crc), "BadZipFile: Bad CRC-32"), (bytes(encrypted), "is encrypted"),
                         (with_image(cut), "TokenError"), (with_image(huge), "OverflowError")):
        r = client.post("/jobs", content=body)
        assert r.status_code == 400 and r.json()["detail"].startswith("the upload is damaged (")
        assert reason in r.json()["detail"]
    r = client.post("/jobs", params={"options": '{"axis": ' + "9" * 5000 + "}"}, content=good)
    assert r.status_code == 400 and r.json()["detail"].startswith("options must be a JSON object of plain values")


def npz_member(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_server_short_of_memory_says_so_not_that_the_upload_is_damaged(oracle_app, monkeypatch):
    """The review of s28's fix: its catch-all turned the server's MemoryError while reading a valid
    upload into "the upload is damaged; send it again" (a 400 that blames the user's file)."""
    import PAMSegmentLib.server as server

    client, image, prompt, _ = oracle_app

    def short(body, max_voxels):
        raise MemoryError("Unable to allocate 100. MiB")

    monkeypatch.setattr(server, "read_arrays", short)
    r = client.post("/jobs", content=npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0])))
    assert r.status_code == 503 and r.json()["detail"].startswith("the server has not enough free memory")


def test_an_old_format_answer_with_a_bad_axis_is_not_a_result():
    import json as _json

    from PAMSegmentLib.errors import PAMError

    meta = {"axis": 7, "labels": [1], "slice_range": {"1": [0, 1]}, "prompt_slices": {"1": [0]}, "timings": {},
            "n_predicted": 1, "stops": {}, "range": None, "early_stop": True, "remove_disconnected": True}
    body = npz(mask=np.zeros((2, 3, 3), np.uint8), confidence_1=np.zeros(2, np.float32),
               meta=np.frombuffer(_json.dumps(meta).encode(), dtype=np.uint8))
    with pytest.raises(PAMError, match="the server's answer is not a PAMSegment result"):
        decode_result(body)


def test_a_queue_that_fills_between_info_and_a_large_upload_is_waited_for():
    """A review (s28): when the queue filled after the client's /info, the server refused the large
    upload early (a reset connection) and the client said "cannot reach the PAMSegment server ... is
    `pamsegment serve` running there?". It asks /info again and waits its turn as for a full queue."""
    from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor
    from PAMSegmentLib.remote import ServerBusy

    gate = threading.Event()

    class Blocking(SlicePredictor):
        window_mm, max_window, min_window = 4.0, 4, 1

        def predict(self, volume, guide_index, guide_mask, query_indices):
            gate.wait(60)
            return SlicePrediction(np.repeat(guide_mask[None].astype(np.float32), len(query_indices), 0))

    small = np.random.default_rng(1).normal(0, 1, (6, 16, 16)).astype(np.float32)
    small_prompt = np.zeros(small.shape, np.uint8)
    small_prompt[3, 4:8, 4:8] = 1
    big = np.random.default_rng(0).normal(0, 100, (40, 256, 256)).astype(np.float32)
    big_prompt = np.zeros(big.shape, np.uint8)
    big_prompt[20, 100:150, 100:150] = 1
    with serving(create_app(lambda method: Blocking(), max_jobs=1)) as url:
        def occupy():  # ends with the server (its error then is not this test's business)
            try:
                RemoteModel(url, poll_interval=0.05).propagate(small, small_prompt, (1, 1, 1))
            except Exception:  # noqa: BLE001
                pass

        for _ in range(2):  # one job runs (blocked), one waits: the queue is full
            threading.Thread(target=occupy, daemon=True).start()
            time.sleep(1.0)
        client = RemoteModel(url, poll_interval=0.05, wait_when_busy=0.5, busy_interval=0.2)
        real_info, asked = client.info, []

        def info(cancel=None):  # the first answer from before the queue filled
            asked.append(1)
            return {**real_info(), "queued": 0} if len(asked) == 1 else real_info()

        client.info = info
        with pytest.raises(ServerBusy, match="has a full queue"):
            client.propagate(big, big_prompt, (1, 1, 1))
        assert len(asked) >= 2
        gate.set()


def test_a_server_round_says_which_method_and_settings_it_ran(live_server):
    """Session 30 (carried from 29): a server's answer carried no begin state, so a correction
    round run locally with another method after a server round (or the other way round) gave no
    "the round you corrected ran --method ..." note. The answer now says what ran each label."""
    from PAMSegmentLib.baselines import CopyPredictor, TrackPredictor
    from PAMSegmentLib.cli import _made_otherwise_notes
    from PAMSegmentLib.checks import state_to_json

    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = CopyPredictor()
    remote = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    local = propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor())
    assert remote.begin_state[1][0] == "CopyPredictor"
    assert state_to_json(remote.begin_state[1]) == state_to_json(local.begin_state[1])
    track = propagate(image, prompt, (2.0, 1.0, 1.0), TrackPredictor())
    assert _made_otherwise_notes(remote, track) == [
        "label 1: the round you corrected ran --method copy and this one --method track: every slice was predicted "
        "again, so the changes beside your edits include what that difference makes"]
    assert _made_otherwise_notes(remote, local) == []


@pytest.mark.parametrize("sent, read", [
    (None, None),  # a label whose state the server could not write
    ({"not": "a state"}, None),  # nonsense from a foreign server: no reuse, no note
    ([[[[[["too deep"]]]]]], None),
    (["CopyPredictor", None, ["k=1"]], ("CopyPredictor", None, ("k=1",))),
])
def test_a_servers_begin_state_is_read_as_untrusted(sent, read):
    meta = {"axis": 0, "labels": [1], "slice_range": {"1": [0, 1]}, "prompt_slices": {"1": [0]}, "timings": {},
            "n_predicted": 1, "stops": {}, "range": None, "early_stop": True, "remove_disconnected": True,
            "begin_state": {"1": sent}}
    body = npz(mask=np.zeros((2, 3, 3), np.uint8), confidence_1=np.zeros(2, np.float32),
               meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    assert decode_result(body).begin_state == {1: read}
    del meta["begin_state"]  # servers before session 30
    body = npz(mask=np.zeros((2, 3, 3), np.uint8), confidence_1=np.zeros(2, np.float32),
               meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    assert decode_result(body).begin_state == {}


def test_a_local_round_after_a_server_round_reuses_its_walks_and_matches_a_fresh_run(live_server):
    from PAMSegmentLib.baselines import CopyPredictor

    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = CopyPredictor()
    remote = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    edited = prompt.copy()
    edited[11] = truth[11]  # a second drawn slice above the first
    update = propagate(image, edited, (2.0, 1.0, 1.0), CopyPredictor(), previous=remote)
    fresh = propagate(image, edited, (2.0, 1.0, 1.0), CopyPredictor())
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.n_predicted < fresh.n_predicted  # the walk down from slice 8 was the server's
    assert update.recomputed[1] and all(a > 8 for a, _ in update.recomputed[1])


def test_requests_from_web_pages_are_refused(oracle_app):
    """A review (session 30): a page open in a browser on the server's machine could queue jobs on a
    server without a token (a cross-site POST with Content-Type text/plain needs no preflight)."""
    client, image, prompt, _ = oracle_app
    body = npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0]))
    r = client.post("/jobs", content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "requests from web pages are refused" in r.json()["detail"]
    assert client.get("/info", headers={"Origin": "null"}).status_code == 403
    assert client.post("/jobs", content=body).status_code == 202  # a program's request (no Origin) goes on


@pytest.mark.parametrize("host, answered", [
    ("localhost:8765", True), ("127.0.0.1:8765", True), ("127.0.0.2", True), ("[::1]:8765", True),
    ("LOCALHOST", True), ("gpu-box.lan:8765", True),  # the server's own --host
    ("rebind.evil.example:8765", False), ("evil.example", False), ("", False), ("[::1", False),
    # found by a re-review: other ways of writing this machine
    ("127.0.0.1.:8765", True), ("[::ffff:127.0.0.1]:8765", True), ("localhost.localdomain", True),
    ("ip6-localhost:8765", True), ("gpu-box.lan.", True), ("[::ffff:10.0.0.1]", False),
    ("localhost.evil.example", False),
    # session 31 (carried from the session-30 review): forms browsers never send, taken before
    ("[::1]evil.example", False), ("[::1]:80evil", False), ("localhost:80@evil.example", False),
    ("[localhost]", False), ("localhost:8765:1", False), ("local host", False),
    ("[::1]:", True), ("127.0.0.1:", True),  # an empty port, as URLs allow (urllib sends it for http://127.0.0.1:)
])
def test_a_server_without_a_token_answers_only_to_this_machines_names(host, answered):
    """A review (session 30): by DNS rebinding, a web page could read /info and its jobs' results
    from a server without a token (its own name turned to 127.0.0.1: the Host header is its name)."""
    image, prompt, truth = case()
    client = TestClient(create_app(lambda method: OracleModel(truth), local_names=("gpu-box.lan",)))
    r = client.get("/info", headers={"Host": host})
    assert (r.status_code == 200) == answered, r.text
    if not answered:
        assert r.status_code == 403 and "answers only requests addressed to this machine" in r.json()["detail"]


def test_the_log_says_where_a_job_waits_and_when_a_waiting_one_is_cancelled(caplog):
    """A review (session 30): a queued job cancelled by its client (or abandoned) got a "received"
    line and never an end line, and a job that ran at once was often logged at queue position 1."""
    import logging

    caplog.set_level(logging.INFO, logger="pamsegment.server")
    image, prompt, truth = case()
    model = Blocking(truth)
    client = TestClient(create_app(lambda m: model))
    body = npz(image=image, prompt=prompt, spacing=np.ones(3))
    first = client.post("/jobs", content=body).json()
    assert model.started.wait(10)
    second = client.post("/jobs", content=body).json()
    assert client.delete(f"/jobs/{second['id']}").status_code == 200
    model.release.set()
    assert wait_for(client, first["id"])["state"] == "finished"
    lines = [r.getMessage() for r in caplog.records if r.name == "pamsegment.server"]
    a, b = first["id"][:8], second["id"][:8]
    assert any(line.startswith(f"job {a} from ") and line.endswith("; runs now") for line in lines), lines
    assert any(line.startswith(f"job {b} from ") and line.endswith("; queue position 1") for line in lines), lines
    assert f"job {b} cancelled by its client while queued" in lines


def test_a_waiting_job_whose_client_is_gone_is_logged_when_given_up():
    import logging

    from PAMSegmentLib.server import JobQueue

    release = threading.Event()
    queue = JobQueue(lambda job: release.wait(10) and b"", abandon_after=0.05)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("pamsegment.server")
    logger.addHandler(handler)
    try:
        running = queue.submit(None, None, (1.0, 1.0, 1.0), {})
        waiting = queue.submit(None, None, (1.0, 1.0, 1.0), {})
        time.sleep(0.1)
        queue.get(running.id)  # asks about the running one; expires the waiting one
        assert waiting.state == "cancelled"
        assert f"job {waiting.id[:8]} cancelled while queued: no client asked about it for 0 s (its client is gone)" \
            in records
    finally:
        release.set()
        queue.close()
        logger.removeHandler(handler)


def test_a_server_result_is_not_reused_on_another_image(live_server):
    """A re-review (session 30): a server's result had no image digest, which the engine took for a
    record that needs none, and (once answers carried the begin state) an update on another image
    reused every walk and returned the old image's mask."""
    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.propagate import PropagationResult

    url, holder = live_server
    image, prompt, truth = case()
    holder["model"] = CopyPredictor()
    remote = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    local = propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor())
    assert remote.image_digest == local.image_digest is not None
    other = image.copy()
    other[9:] = other[9:, ::-1]  # another image beyond the drawn slice
    update = propagate(other, prompt, (2.0, 1.0, 1.0), CopyPredictor(), previous=remote)
    fresh = propagate(other, prompt, (2.0, 1.0, 1.0), CopyPredictor())
    assert update.n_predicted == fresh.n_predicted > 0 and np.array_equal(update.mask, fresh.mask)
    back = PropagationResult.from_record(remote.mask, remote.to_record())  # what the command line keeps
    assert back.image_digest == remote.image_digest


def test_a_local_round_after_a_server_round_recomputes_labels_that_overlapped(live_server):
    """A re-review (session 30): the server's answer carried the begin state but not which labels
    lost voxels to others, so a local update reused an overlapped label's walks from the merged map
    (missing the voxels another label took) and kept holes a fresh run fills (306 voxels off)."""
    from PAMSegmentLib.baselines import CopyPredictor

    url, holder = live_server
    shape = (20, 32, 32)
    _, j, i = np.ogrid[:20, :32, :32]
    left, right = ((j - 16) ** 2 + (i - 12) ** 2 <= 36)[0], ((j - 16) ** 2 + (i - 19) ** 2 <= 36)[0]
    image = np.zeros(shape, np.float32)
    image[:, left] += 100
    image[:, right] += 60  # two overlapping tubes
    prompt = np.zeros(shape, np.uint8)
    prompt[3][left] = 1
    prompt[15][right] = 2
    holder["model"] = CopyPredictor()
    remote = RemoteModel(url, token="tok", poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0))
    local = propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor())
    assert remote.overlapped == local.overlapped == {1, 2}  # each lost voxels to the other (its drawing)
    walls = {1: [10]}  # the second round: label 1 ends below slice 10, label 2 gets its voxels there
    update = propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor(), empty_slices=walls, previous=remote)
    fresh = propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor(), empty_slices=walls)
    assert np.array_equal(update.mask, fresh.mask)


def test_refusals_are_logged_without_parsing_the_host_header(monkeypatch, caplog):
    """A trial of the lowest versions (session 45): with starlette before 1.3 a malformed Host header
    ("[::1", "[localhost]") made the refusal's log line (request.url.path, a URL built from that
    header) raise: a 500 with a traceback instead of the 403. The log takes the path from the request
    itself; here request.url is made to fail as that starlette's did."""
    import logging

    from starlette.requests import Request

    def broken(self):
        raise ValueError("Invalid IPv6 URL")

    monkeypatch.setattr(Request, "url", property(broken))
    caplog.set_level(logging.INFO, logger="pamsegment.server")
    image, prompt, truth = case()
    client = TestClient(create_app(lambda method: OracleModel(truth), local_names=("gpu-box.lan",)))
    r = client.get("/info", headers={"Host": "[::1"})
    assert r.status_code == 403 and "answers only requests addressed to this machine" in r.json()["detail"]
    r = client.get("/info", headers={"Host": "localhost", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "requests from web pages are refused" in r.json()["detail"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "pamsegment.server"]
    assert "refused GET /info for host '[::1': this server answers only to this machine's names" in lines
    assert "refused GET /info from a web page (http://evil.example)" in lines
