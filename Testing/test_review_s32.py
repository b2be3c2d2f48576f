"""Findings of session 32, each reproduced here on the code before its fix."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from test_review_s30 import _slow_server


def _interrupt_main_when(log, entry, delay=0.2):
    """Ctrl-C (SIGINT to the main thread, as a terminal sends it) ``delay`` s after ``entry`` is in ``log``."""
    main = threading.main_thread().ident

    def later():
        deadline = time.monotonic() + 20
        while entry not in log and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=later, daemon=True).start()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
@pytest.mark.parametrize("when", ["while the server reads the upload", "while a silent server has the job"])
def test_ctrl_c_at_the_command_line_leaves_no_job_on_the_server_and_does_not_wait_for_it(when):
    """The command line runs a server's job without a CancelToken: a Ctrl-C after the upload was
    sent, while the server was still answering it, left the job there for 120 s (nobody read its id
    to delete it), and a Ctrl-C while the server had stopped answering waited the whole timeout
    (here 30 s) for the delete."""
    from PAMSegmentLib.remote import RemoteModel

    upload = when == "while the server reads the upload"
    server, url, log = _slow_server(post_delay=1.0 if upload else 0.0, status_hang=0.0 if upload else 30.0)
    try:
        image = np.random.default_rng(0).normal(0, 1, (8, 32, 32)).astype(np.float32)
        prompt = np.zeros(image.shape, np.uint8)
        prompt[3, 5:10, 5:10] = 1
        _interrupt_main_when(log, "POST received" if upload else "GET /jobs/J1")
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            RemoteModel(url, timeout=120, poll_interval=0.05, method="copy").propagate(image, prompt, (1, 1, 1))
        assert time.monotonic() - t0 < 20  # a guard, not a benchmark: the silent server answers after 30 s
        deadline = time.monotonic() + 10
        while "DELETE /jobs/J1" not in log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "DELETE /jobs/J1" in log  # the job the upload made is deleted
    finally:
        server.shutdown()


def test_runs_overlapping_in_two_threads_give_back_the_thread_counts_they_found():
    """torch's and SimpleITK's thread counts are process-wide: two runs overlapping (Slicer's worker
    beside a script, a pool of Python API calls), the first ending first, left the counts at the
    second run's 1 for good (each block restored what it had found when it began)."""
    import SimpleITK as sitk
    import torch

    from PAMSegmentLib.propagate import torch_threads

    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        torch.set_num_threads(2)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
        first, second = torch_threads(1), torch_threads(1)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == (1, 1)  # 2nd runs
        second.__exit__(None, None, None)
        assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == (2, 3)
        with torch_threads(2):  # nested in one thread: the inner block's end gives the outer's count back
            with torch_threads(1):
                assert torch.get_num_threads() == 1
            assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == (2, 2)
        assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == (2, 3)
    finally:
        torch.set_num_threads(before[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])


@pytest.mark.parametrize("wall", [2, 24])
def test_a_wall_beyond_where_the_agreement_test_ended_a_walk_does_not_let_it_grow_back(wall):
    """A review (session 32, a simulated correction loop on training cases): with two drawn slices,
    the walk outward from the outermost one had the network-vs-registration agreement test, but a
    walk towards a wall had not, so erasing a leaked slice beyond where the test had ended the walk
    made the result run on up to the wall (a spinous process 0.690 -> 0.581). Here the test ends
    the walks at 6 and 20 (_AgreementOracle); a wall at 2 or 24 changes nothing, fresh or as an
    update, which matches a fresh run."""
    from test_engine import ISO, _AgreementOracle, image_for, predicted, prompt_from, tube

    from PAMSegmentLib.propagate import propagate

    truth = tube(3, 25)
    image, prompt = image_for(truth), prompt_from(truth, [8, 16])
    plain = propagate(image, prompt, ISO, _AgreementOracle(truth, window=4))
    assert plain.slice_range == {1: (6, 20)}
    walled = propagate(image, prompt, ISO, _AgreementOracle(truth, window=4), empty_slices={1: [wall]})
    assert walled.slice_range == {1: (6, 20)}  # (3, 20) / (6, 24) before: the walk ran on to the wall
    np.testing.assert_array_equal(walled.mask, plain.mask)
    assert {"start": 8 if wall < 8 else 16, "direction": -1 if wall < 8 else 1, "last": 6 if wall < 8 else 20,
            "reason": "agreement"} in walled.stops[1]
    # The same as an update of the run without the wall: every walk is reused, nothing predicted
    model = _AgreementOracle(truth, window=4)
    update = propagate(image, prompt, ISO, model, empty_slices={1: [wall]}, previous=plain)
    np.testing.assert_array_equal(update.mask, walled.mask)
    np.testing.assert_array_equal(update.confidence[1], walled.confidence[1])
    assert predicted(model) == []
    # and an update of the walled run (a result that may come from an older version) agrees too
    again = propagate(image, prompt, ISO, _AgreementOracle(truth, window=4), empty_slices={1: [wall]},
                      previous=walled)
    np.testing.assert_array_equal(again.mask, walled.mask)
    np.testing.assert_array_equal(again.confidence[1], walled.confidence[1])
