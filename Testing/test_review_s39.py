"""Session 39: what a CI run and this session's trials found."""

from __future__ import annotations

import http.server
import threading
import urllib.request

from doubles import local_http_server


def test_a_stand_in_server_s_late_errors_reach_no_later_test_s_output(capfd):
    """CI (session 38's stop): a stand-in server's handler, still sleeping when its test ended,
    failed on the closed connection 30 s later and socketserver printed "Exception occurred during
    processing of request" into the stderr pytest captured for another test, which compared it.
    Handlers now wait on the server's ``stopping`` event and their errors stay on the server."""
    reached = threading.Event()

    class Hanging(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            reached.set()
            self.server.stopping.wait(30)
            raise ConnectionResetError("the client went away")

        def log_message(self, *args):
            pass

    before = set(threading.enumerate())
    server = local_http_server(Hanging)
    client = threading.Thread(target=lambda: _get_ignoring_errors(f"http://127.0.0.1:{server.server_port}/"),
                              daemon=True)
    client.start()
    assert reached.wait(10)
    handlers = [t for t in threading.enumerate() if t not in before and t is not client]  # this server's
    server.shutdown()  # sets `stopping`: the handler ends now, not 30 s later in another test
    for t in handlers:
        t.join(10)
    client.join(10)
    assert [type(e).__name__ for e in server.errors] == ["ConnectionResetError"]
    assert "Exception occurred" not in capfd.readouterr().err


def _get_ignoring_errors(url):
    try:
        urllib.request.urlopen(url, timeout=10).read()
    except Exception:
        pass


def test_single_channel_convolutions_keep_the_plain_weight_order_on_the_cpu():
    """Session 39: in channels-last order a one-input-channel convolution's weights (the image
    encoders' first layer, run on every query slice) sent torch to its own kernel at 4 times the
    time. They keep the plain order; every other convolution stays channels-last; outputs as before."""
    import torch

    from PAMSegmentLib.checkpoints import _for_inference
    from PAMSegmentLib.network import build_network

    torch.manual_seed(0)
    plain = build_network("small").eval()
    net = _for_inference(build_network("small"), "cpu")
    net.load_state_dict(plain.state_dict())  # (values copied into the tensors; their strides stay)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    single = [m for m in convs if m.in_channels == 1]
    assert len(single) == 2  # the image encoder's and the mask encoder's first layer
    assert all(m.weight.is_contiguous() and m.weight.stride() == (9, 9, 3, 1) for m in single)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs if m.in_channels > 1)
    guide, mask = torch.rand(1, 1, 128, 128), (torch.rand(1, 1, 128, 128) > 0.5).float()
    queries = torch.rand(1, 3, 1, 128, 128)
    with torch.inference_mode():
        got, _ = net.predict(guide, mask, queries)
        want, _ = plain.predict(guide, mask, queries)
    assert torch.allclose(got, want, atol=1e-5)


def test_fuse_scales_of_channels_last_logits_is_the_same_arithmetic():
    """Session 39: the fusion now puts the network's channels-last logits in plain order before
    upsampling them (3.5 times faster there; benchmark, not asserted here). A guard that the result
    stays the average of the upsampled scales' logits, softmaxed, for both orders and align_corners."""
    import torch
    import torch.nn.functional as F

    from PAMSegmentLib.network import fuse_scales

    torch.manual_seed(0)
    logits = [torch.randn(2, 2, s, s) for s in (64, 32, 16, 8)]
    want = torch.softmax(sum(F.interpolate(lg, size=(64, 64), mode="bilinear") if lg.shape[-1] != 64 else lg
                             for lg in logits) / 4, dim=1)[:, 1]
    for order in (torch.channels_last, torch.contiguous_format):
        got = fuse_scales([lg.contiguous(memory_format=order) for lg in logits], 64)
        assert got.shape == (2, 64, 64) and torch.allclose(got, want, atol=1e-6)
    aligned = torch.softmax(sum(F.interpolate(lg, size=(64, 64), mode="bilinear", align_corners=True)
                                if lg.shape[-1] != 64 else lg for lg in logits) / 4, dim=1)[:, 1]
    assert not torch.allclose(aligned, want, atol=1e-3)  # the two upsamplings differ: the option is used
    assert torch.allclose(fuse_scales(logits, 64, align_corners=True), aligned, atol=1e-6)


def test_serve_run_inside_a_program_leaves_the_server_logger_as_it_found_it(monkeypatch, capsys):
    """An audit (session 39): `serve` called in-process (tests, a notebook) left its stderr handler
    on the server's logger, with propagate off: later log lines went into a closed capture
    ("--- Logging error ---" in other tests' output) and pytest 8's caplog saw none of them (two
    tests of test_server.py failed after this one)."""
    import logging
    import socket

    from PAMSegmentLib import checkpoints
    from PAMSegmentLib.cli import main

    log = logging.getLogger("pamsegment.server")
    found = (list(log.handlers), log.level, log.propagate)
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    assert "is in use" in capsys.readouterr().err
    assert (list(log.handlers), log.level, log.propagate) == found
