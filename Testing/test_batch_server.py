"""``pamsegment batch --server``: a lab's batch run on its inference server (batch had no
``--server``; only ``propagate`` had). Cases are read and checked here, run there; a full queue is
waited out; a server that cannot be reached stops the batch."""

from __future__ import annotations


import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import free_port, make_ct_case, serving  # noqa: E402
from PAMSegmentLib import remote  # noqa: E402
from PAMSegmentLib.baselines import get_predictor  # noqa: E402
from PAMSegmentLib.cli import main  # noqa: E402
from PAMSegmentLib.errors import InputError, PAMError  # noqa: E402
from PAMSegmentLib.remote import RemoteModel, ServerBusy  # noqa: E402
from PAMSegmentLib.server import create_app  # noqa: E402
from test_batch import _arr, _report  # noqa: E402  (the batch tests' readers of outputs and reports)


@pytest.fixture
def three_cases(tmp_path):
    for n in range(3):
        make_ct_case(tmp_path / "data" / f"c{n}", seed=n)
    manifest = tmp_path / "data" / "cases.csv"
    manifest.write_text("image,prompt\n" + "".join(f"c{n}/image.nii.gz,c{n}/prompt.nii.gz\n" for n in range(3)))
    return manifest


@pytest.fixture
def copy_server():
    with serving(create_app(lambda method: get_predictor(method), token="tok")) as url:
        yield url


def test_a_batch_on_a_server_writes_what_a_local_batch_writes(tmp_path, three_cases, copy_server, capsys):
    assert main(["batch", str(three_cases), "-o", str(tmp_path / "here"), "--method", "copy"]) == 0
    assert main(["batch", str(three_cases), "-o", str(tmp_path / "there"), "--method", "copy",
                 "--server", copy_server, "--token", "tok"]) == 0
    for n in range(3):
        here, there = (_arr(tmp_path / d / f"c{n}_image_pam.nii.gz") for d in ("here", "there"))
        assert here.any() and np.array_equal(here, there)
    rows = _report(tmp_path / "there" / "batch_report.csv")
    assert [(r["status"], r["method"]) for r in rows] == [("ok", "copy")] * 3
    assert all(r["slices"] == h["slices"] for r, h in zip(rows, _report(tmp_path / "here" / "batch_report.csv")))


def test_a_wrong_address_or_token_is_one_line_before_anything_is_written(tmp_path, three_cases, copy_server, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(three_cases), "-o", str(out), "--server", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the PAMSegment server at http://127.0.0.1:" in capsys.readouterr().err
    assert main(["batch", str(three_cases), "-o", str(out), "--server", copy_server, "--token", "wrong"]) == 2
    assert "refused the token given" in capsys.readouterr().err
    assert main(["batch", str(three_cases), "-o", str(out), "--server", copy_server, "--checkpoint", "x.pt"]) == 2
    assert "--checkpoint sets up a local model; with --server the server's model is used" in capsys.readouterr().err
    assert main(["batch", str(three_cases), "-o", str(out), "--token", "tok"]) == 2
    assert "--token is for --server" in capsys.readouterr().err
    assert not out.exists()


def test_a_server_lost_mid_batch_stops_it_and_the_rest_is_resumable(tmp_path, three_cases, copy_server, capsys,
                                                                    monkeypatch):
    """Before, each later case would have failed in turn (after its own connection timeout)."""
    real, calls = RemoteModel.propagate, []

    def goes_away(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise remote.ServerUnreachable(f"cannot reach the PAMSegment server at {self.url} (Connection refused)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RemoteModel, "propagate", goes_away)
    out = tmp_path / "out"
    args = ["batch", str(three_cases), "-o", str(out), "--method", "copy", "--server", copy_server, "--token", "tok"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the batch stopped there" in err and "--skip-existing to resume" in err
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["ok", "error", "not run"]
    assert len(calls) == 2 and not (out / "c1_image_pam.nii.gz").exists()
    assert main(args + ["--skip-existing"]) == 0
    assert [r["status"] for r in _report(out / "batch_report.csv")] == ["skipped", "ok", "ok"]


def test_a_full_queue_is_waited_out_when_asked_and_said_in_the_progress(copy_server, monkeypatch):
    """RemoteModel(wait_when_busy=S): the queue is asked again every busy_interval seconds (batch
    waits up to an hour); with the default 0 a full queue is refused at once, as before."""
    image = np.zeros((6, 8, 8), np.float32)
    image[1:5, 2:6, 2:6] = 100
    prompt = np.zeros((6, 8, 8), np.uint8)
    prompt[3, 2:6, 2:6] = 1
    model = RemoteModel(copy_server, token="tok", poll_interval=0.01, method="copy", wait_when_busy=5,
                        busy_interval=0.01)
    real_info, asked = model.info, []

    def full_twice(cancel=None):
        info = real_info()
        asked.append(1)
        return {**info, "queued": info["max_jobs"]} if len(asked) <= 2 else info

    monkeypatch.setattr(model, "info", full_twice)
    seen = []
    result = model.propagate(image, prompt, (1.0, 1.0, 1.0), progress=lambda f, m: seen.append(m))
    assert len(asked) == 3 and result.mask[1:5].any()
    busy = [m for m in seen if "busy" in m]
    assert busy == ["server: busy, 8 jobs waiting already (it queues at most 8); asking again in 0 s"] * 2
    model.wait_when_busy, asked[:] = 0.0, []
    with pytest.raises(ServerBusy, match=r"has 8 jobs waiting already \(it queues at most 8\); try again later$"):
        model.propagate(image, prompt, (1.0, 1.0, 1.0))
    assert isinstance(ServerBusy("x"), PAMError)


def test_a_servers_weights_are_named_in_the_report_as_local_ones_are():
    """The report's method column decides what --skip-existing runs again: the shipped weights on a
    server count as the shipped weights here (same results) where the server names the same settings
    (since session 44: its /info's settings digest; a server that does not name them could run the
    same weights otherwise, so its rows are told by the text alone), other weights by their sha256."""
    import argparse

    from PAMSegmentLib.batch import _same_making, made_with
    from PAMSegmentLib.checkpoints import load_model, shipped_checkpoint_path
    from PAMSegmentLib.checkpoints import shipped_weights_sha256 as _shipped_sha256

    shipped = _shipped_sha256()
    assert isinstance(shipped, str) and len(shipped) == 64
    args = argparse.Namespace(method="pam", checkpoint=None)
    here = made_with(args, None, load_model(shipped_checkpoint_path()))
    settings = here.rsplit("settings ", 1)[1][:-1]
    assert made_with(args, {"model": {"sha256": shipped, "settings": settings}}) == here
    assert here == f"pam (shipped weights, weights sha256 {shipped[:16]}, settings {settings})"
    assert made_with(args) == "pam (shipped weights)"  # (nothing loaded: the text before session 44)
    older = made_with(args, {"model": {"sha256": shipped}})  # a server from before session 44
    assert older == f"pam (the server's weights, sha256 {shipped[:16]})" and not _same_making(older, here)
    assert made_with(args, {"model": {"sha256": "ab" * 32}}) == "pam (the server's weights, sha256 abababababababab)"
    assert made_with(argparse.Namespace(method="copy", checkpoint=None), {"model": {}}) == "copy"


def test_the_drift_test_is_set_per_job_on_a_server(copy_server, monkeypatch):
    """A review: the README's remedy for a walk the drift test ended at once (--intensity-gate off,
    Slicer's checkbox) could not be applied through a server (refused, and serve had no such
    option). It is now a job option: the server runs that job with its model's test set so, and
    its model stays as started."""
    from PAMSegmentLib.checkpoints import InferenceParams, PAMModel
    from PAMSegmentLib.server import parse_options, with_gate

    model = PAMModel(network=None, preprocessing=None, kind="pamsegment",
                     inference=InferenceParams(intensity_gate=True, intensity_gate_reference="guide"))
    off = with_gate(model, "off")
    assert off.inference.intensity_gate is False and model.inference.intensity_gate is True
    assert with_gate(model, "prompt").inference.intensity_gate_reference == "prompt"
    assert with_gate(model, "both").inference.intensity_gate_reference == "both"
    assert with_gate(model, None) is model
    assert with_gate(PAMModel(None, None, InferenceParams(intensity_gate=False), "official"),
                     "on").inference.intensity_gate_reference == "guide"
    assert parse_options('{"intensity_gate": "off"}') == {"intensity_gate": "off"}
    with pytest.raises(InputError, match="intensity_gate must be one of off, on, prompt, guide"):
        parse_options('{"intensity_gate": "maybe"}')
    with pytest.raises(InputError, match="intensity_gate is an option of method pam, not track"):
        parse_options('{"intensity_gate": "off", "method": "track"}')
    sent = []
    real = RemoteModel._request

    def spy(self, method, path, body=None, **kw):
        if method == "POST":
            sent.append(path)
        return real(self, method, path, body, **kw)

    monkeypatch.setattr(RemoteModel, "_request", spy)
    image = np.zeros((6, 8, 8), np.float32)
    image[1:5, 2:6, 2:6] = 100
    prompt = np.zeros((6, 8, 8), np.uint8)
    prompt[3, 2:6, 2:6] = 1
    RemoteModel(copy_server, token="tok", poll_interval=0.01, intensity_gate="off").propagate(
        image, prompt, (1.0, 1.0, 1.0))
    assert "intensity_gate" in sent[0] and "off" in sent[0]


def test_an_older_server_without_per_job_drift_tests_is_named_or_left_its_setting(copy_server, monkeypatch):
    """A review: a server from before this option refused every job that carried it ("unknown
    option"), so an updated Slicer (whose checkbox is always sent) failed every job there. /info
    lists the job options now: asked for on the command line, the client says the server is older;
    from Slicer's checkbox (gate_required False), the server's own setting is used, said in the
    progress."""
    image = np.zeros((6, 8, 8), np.float32)
    image[1:5, 2:6, 2:6] = 100
    prompt = np.zeros((6, 8, 8), np.uint8)
    prompt[3, 2:6, 2:6] = 1
    model = RemoteModel(copy_server, token="tok", poll_interval=0.01, method="copy", intensity_gate="off")
    real_info = model.info
    assert "intensity_gate" in real_info()["options"]
    monkeypatch.setattr(model, "info", lambda cancel=None: {**real_info(), "options": ["axis", "labels", "method"]})  # older
    with pytest.raises(InputError, match=r"the server at .* is older than this client: it cannot set the drift test "
                                         r"per job"):
        model.propagate(image, prompt, (1.0, 1.0, 1.0))
    model.gate_required = False
    seen = []
    result = model.propagate(image, prompt, (1.0, 1.0, 1.0), progress=lambda f, m: seen.append(m))
    assert result.mask.any() and "server: an older server, which keeps its own drift-test setting" in seen


def test_a_server_that_lists_no_options_is_asked_and_answered_by_what_it_does(copy_server, monkeypatch):
    """A third review: servers between the per-job drift test and the /info options list take the
    option but list nothing, and the client called them older. The option is sent; only a server
    that answers "unknown option 'intensity_gate'" is older."""
    from PAMSegmentLib import server

    image = np.zeros((6, 8, 8), np.float32)
    image[1:5, 2:6, 2:6] = 100
    prompt = np.zeros((6, 8, 8), np.uint8)
    prompt[3, 2:6, 2:6] = 1
    model = RemoteModel(copy_server, token="tok", poll_interval=0.01, intensity_gate="off")
    real_info = model.info
    monkeypatch.setattr(model, "info", lambda cancel=None: {k: v for k, v in real_info().items() if k != "options"})
    assert model.propagate(image, prompt, (1.0, 1.0, 1.0)).mask.any()  # taken: it does the drift test per job
    monkeypatch.setattr(server, "OPTION_KEYS", server.OPTION_KEYS - {"intensity_gate"})  # an older one
    with pytest.raises(InputError, match="is older than this client: it cannot set the drift test per job"):
        model.propagate(image, prompt, (1.0, 1.0, 1.0))
    model.gate_required = False
    assert model.propagate(image, prompt, (1.0, 1.0, 1.0)).mask.any()


def test_a_batch_stops_where_the_server_runs_another_model_than_at_its_start(tmp_path, three_cases, copy_server,
                                                                             monkeypatch, capsys):
    """A review (session 44): a server restarted otherwise behind the same address mid-batch made the
    later rows with another model than the report named. The batch stops at the first such row, the
    rest not run (resume with --skip-existing)."""
    seen = []
    real = RemoteModel.info

    def info(self, cancel=None):
        data = real(self, cancel)
        seen.append(1)
        if len(seen) >= 3:  # (the batch's first look, row 2's job; from row 3 on the server "restarted")
            data = dict(data, model=dict(data.get("model") or {}, walk="published"))
        return data

    monkeypatch.setattr(RemoteModel, "info", info)
    code = main(["batch", str(three_cases), "-o", str(tmp_path / "there"), "--method", "copy",
                 "--server", copy_server, "--token", "tok"])
    assert code == 2
    rows = _report(tmp_path / "there" / "batch_report.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "not run"]
    assert rows[1]["message"].startswith(f"the server at {copy_server} now runs another model (")
    assert rows[2]["message"] == "the batch stopped at row 3, where the server runs another model; resume with " \
                                 "--skip-existing"
