"""Findings of session 32, each reproduced here on the code before its fix."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene) for the Slicer test below
from test_review_s30 import _slow_server, _tiny_case


def _interrupt_main_when(log, entry, delay=0.2) -> threading.Event:
    """Ctrl-C (SIGINT to the main thread, as a terminal sends it) ``delay`` s after ``entry`` is in
    ``log``; returns an event the test sets when it ends. Nothing is sent if the entry never came
    within 20 s or the test has ended meanwhile (a SIGINT landing in a later test stopped the whole run)."""
    main = threading.main_thread().ident
    done = threading.Event()

    def later():
        deadline = time.monotonic() + 20
        while entry not in log and time.monotonic() < deadline and not done.is_set():
            time.sleep(0.01)
        if entry not in log or done.wait(delay):
            return
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=later, daemon=True).start()
    return done


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
    done = threading.Event()
    try:
        image, prompt = _tiny_case()
        done = _interrupt_main_when(log, "POST received" if upload else "GET /jobs/J1")
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            RemoteModel(url, timeout=120, poll_interval=0.05, method="copy").propagate(image, prompt, (1, 1, 1))
        assert time.monotonic() - t0 < 20  # a guard, not a benchmark: the silent server answers after 30 s
        deadline = time.monotonic() + 10
        while "DELETE /jobs/J1" not in log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "DELETE /jobs/J1" in log  # the job the upload made is deleted
    finally:
        done.set()
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

    from PAMSegmentLib.propagate import PropagationResult, propagate

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
    # an update of the walled run reuses its walk towards the wall (a re-review: it was predicted
    # again on every update, and Slicer forgot the review marks there) ...
    assert walled.outward_wall_test and walled.to_record()["outward_wall_test"] is True
    model = _AgreementOracle(truth, window=4)
    again = propagate(image, prompt, ISO, model, empty_slices={1: [wall]}, previous=walled)
    assert predicted(model) == [] and again.recomputed == {1: []}
    np.testing.assert_array_equal(again.mask, walled.mask)
    np.testing.assert_array_equal(again.confidence[1], walled.confidence[1])
    # ... unless an earlier version made it (walked there without the test): then it is predicted again
    old = PropagationResult.from_record(walled.mask, {**walled.to_record(), "outward_wall_test": False})
    model = _AgreementOracle(truth, window=4)
    again = propagate(image, prompt, ISO, model, empty_slices={1: [wall]}, previous=old)
    assert again.recomputed == {1: [(3, 7)] if wall < 8 else [(17, 23)]}  # the walk towards the wall
    assert predicted(model) == ([4, 5, 6, 7] if wall < 8 else list(range(17, 24)))  # windows of 4 slices
    np.testing.assert_array_equal(again.mask, walled.mask)
    np.testing.assert_array_equal(again.confidence[1], walled.confidence[1])


GIB = 2**30


def _declared_only(path, columns, rows, kind="MET_UCHAR", channels=1):
    """A MetaImage header declaring an image of that size whose pixels are not there: what the
    memory check reads (the header) is real, the pixels are never needed when it refuses."""
    path.write_text(f"ObjectType = Image\nNDims = 2\nDimSize = {columns} {rows}\nElementType = {kind}\n"
                    f"ElementNumberOfChannels = {channels}\nElementDataFile = {path.stem}.raw\n")
    return path


def test_label_cells_refuses_an_image_its_memory_cannot_hold_before_reading_it(tmp_path, monkeypatch, capsys):
    """A review (session 32): the one check before `label-cells` compared 4 bytes a pixel with all
    of the machine's memory, while the run needs about 62-74 bytes a pixel at its peak (54-66 until session 41) (the
    instance split, at the end): a 20000 x 20000 grey region passed on a 24 GB machine, needed about
    22 GB, and ran for a long time before it died. Now it is refused before a pixel is read, naming
    the largest region that fits; --no-memory-check runs it anyway; a run that fits the limit but
    not what is free now is warned about."""
    from test_cells import disc_image

    import SimpleITK as sitk
    from PAMSegmentLib import cli, volumes
    from PAMSegmentLib.cells import cells_memory_bytes

    # 400 MiB + 20000^2 x 62 bytes (54 until session 41) + a 1088 px tile's 16 grey features (16 bytes each since
    # session 36) = 25.5 GB
    assert cells_memory_bytes(20000, 20000, 1, 1024) == 400 * 2**20 + 400_000_000 * 62 + 1088**2 * 16 * 16
    monkeypatch.setattr(volumes, "memory_budget", lambda: (8 * GIB, 6 * GIB))
    image = _declared_only(tmp_path / "slide.mhd", 20000, 20000)
    examples = tmp_path / "examples.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(examples))
    run = ["label-cells", str(image), str(examples), "-o", str(tmp_path / "out.tif")]
    assert cli.main(run) == 2
    err = capsys.readouterr().err
    # the largest square that fits: sqrt((0.9 x 8 GiB - 400 MiB - the tile's 303 MB) / 62) = 10 632 px
    assert ("error: labelling the cells of slide.mhd (20,000 x 20,000 px grey, about 62 bytes a pixel) needs about "
            "24 GB of memory at its peak, more than 90 % of the 8.0 GB this process may use: nothing was done. Crop "
            "the region to label to at most about 10,600 x 10,600 px grey, or run again with --no-memory-check "
            "(with enough swap, say)"
            ) in err
    assert not (tmp_path / "out.tif").exists()
    assert cli.main([*run, "--no-memory-check"]) == 2  # past the check: the pixels are missing
    assert "needs about" not in capsys.readouterr().err
    # a region that fits the limit but not what is free now: a warning, and the run goes on
    small, ref = disc_image()
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(small, 0, 255).astype(np.uint8)), str(tmp_path / "cells.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.where(np.isin(ref, [1, 4, 16]), ref, 0).astype(np.uint8)),
                    str(examples))
    monkeypatch.setattr(volumes, "memory_budget", lambda: (8 * GIB, 100 * 2**20))
    assert cli.main(["label-cells", str(tmp_path / "cells.png"), str(examples), "-o", str(tmp_path / "out.tif")]) == 0
    assert ("warning: labelling the cells of cells.png (160 x 160 px grey, about 62 bytes a pixel) needs about "
            "0.4 GB of memory at its peak and 0.1 GB is free now: close other programs, or the system may stop it "
            "without a message") in capsys.readouterr().out
    assert (tmp_path / "out.tif").exists()


def test_label_images_refuses_a_set_its_memory_cannot_hold_before_reading_it(tmp_path, monkeypatch, capsys):
    """Each image of a set passed the per-file check alone, but the whole set is held in memory:
    a hundred large images died while being read, before any progress. The set is now totalled
    from the files' headers first."""
    import SimpleITK as sitk
    from PAMSegmentLib import cli, volumes

    monkeypatch.setattr(volumes, "memory_budget", lambda: (4 * GIB, 4 * GIB))
    (tmp_path / "set").mkdir()
    for k in range(3):  # 3 x 15000 x 10000 colour: 450 Mpx x 24 bytes + 512 MiB = 10.6 GiB
        _declared_only(tmp_path / "set" / f"img_{k}.mhd", 15000, 10000, channels=3)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(tmp_path / "mask.png"))
    assert cli.main(["label-images", str(tmp_path / "set" / "img_0.mhd"), str(tmp_path / "mask.png"),
                     str(tmp_path / "set"), "--method", "copy", "-o", str(tmp_path / "out")]) == 2
    assert ("error: labelling these 3 images (450 megapixels in all, about 20-24 bytes a pixel) needs about 11 GB of "
            "memory at its peak, more than 90 % of the 4.0 GB this process may use: nothing was done. Label fewer or "
            "smaller images per "
            "run, or run again with --no-memory-check (with enough swap, say)") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_memory_budget_takes_the_least_of_the_machine_a_container_and_ulimit(monkeypatch):
    """A container's limit (cgroup) or `ulimit -v` below the machine's memory is what a run may use."""
    import resource

    from PAMSegmentLib import volumes

    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 64 * GIB)
    real = volumes.Path.read_text

    def cgroup(path, *args, **kwargs):
        if str(path) == "/sys/fs/cgroup/memory.max":
            return "8589934592\n"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(volumes.Path, "read_text", cgroup)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert volumes.memory_budget()[0] == 8 * GIB
    monkeypatch.setattr(resource, "getrlimit", lambda what: (2 * GIB, resource.RLIM_INFINITY))
    limit, free = volumes.memory_budget()
    assert limit == 2 * GIB and (free is None or free <= 2 * GIB)


@pytest.mark.parametrize("reader", ["tifffile", "Pillow"])
@pytest.mark.parametrize("order", ["full resolution first", "thumbnail first"])
def test_a_whole_slide_tiff_is_named_so_with_what_to_do(tmp_path, monkeypatch, capsys, reader, order):
    """A review (session 32): a pyramidal TIFF (levels as pages, as Aperio's SVS and `vips tiffsave
    --pyramid` store them) was "damaged? copy or export it again" with level 0 first, and "a 3D
    image (100 x 100 x 3)", the thumbnail's size, with the thumbnail first."""
    import sys

    import tifffile

    from PAMSegmentLib import cli

    if reader == "Pillow":
        monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile: ImportError
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 255, (n, n, 3), dtype=np.uint8) for n in (400, 200, 100)]
    if order == "thumbnail first":
        levels = [levels[2], levels[0], levels[1]]
    with tifffile.TiffWriter(tmp_path / "slide.tif") as tif:
        for level in levels:
            tif.write(level, photometric="rgb", tile=(64, 64))
    (tmp_path / "ex.png").write_bytes(b"")
    assert cli.main(["label-cells", str(tmp_path / "slide.tif"), str(tmp_path / "ex.png"), "-o",
                     str(tmp_path / "out.tif")]) == 2
    sizes = "400 x 400, 200 x 200, 100 x 100" if order == "full resolution first" else "100 x 100, 400 x 400, 200 x 200"
    assert (f"error: slide.tif is a whole-slide (pyramidal) image: its pages are images of different sizes ({sizes} "
            "px), the largest 400 x 400 px; PAMSegment reads one plain 2D image, so export the region to label from "
            "the full-resolution level as a TIFF or PNG (QuPath: File > Export images; or OpenSlide, `vips crop`)"
            ) in capsys.readouterr().err
    # a stack of pages of one size is still what it was (channels or a stack), and one page reads
    with tifffile.TiffWriter(tmp_path / "one.tif") as tif:
        tif.write(levels[0], photometric="rgb")
    from PAMSegmentLib.volumes import read_image_2d

    assert read_image_2d(tmp_path / "one.tif", keep_colour=True)[0].shape == levels[0].shape


def test_a_tiff_of_pages_of_different_sizes_given_as_a_volume_is_refused_not_a_crash(tmp_path):
    """Found with the review above: ITK read a TIFF whose first page is smaller than the next as
    one volume and crashed the process (a segmentation fault) in `pamsegment propagate`."""
    import tifffile

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    with tifffile.TiffWriter(tmp_path / "scan.tif") as tif:
        for n in (50, 200):
            tif.write(np.zeros((n, n), np.uint8))
    with pytest.raises(InputError, match=r"^scan.tif is no volume: its pages are images of different sizes \(50 x 50, "
                                         r"200 x 200 px\), the largest 200 x 200 px \(a whole-slide image\?\)"):
        read_volume(tmp_path / "scan.tif")


def test_label_cells_shows_progress_while_it_learns_from_the_tiles():
    """A review (session 32): without background marks every tile is learnt from, and those tiles'
    features took about half the run (27 s of 59 on a 4000 px image) before the first progress
    line; now each tile learnt from moves the bar (0 to 0.3), then each tile classified (to 0.89)."""
    from test_cells import disc_image

    from PAMSegmentLib.cells import label_cells

    image, ref = disc_image()
    seen = []
    label_cells(image, np.where(np.isin(ref, [1, 2]), ref, 0), tile=64,
                progress=lambda fraction, message: seen.append((round(fraction, 3), message)))
    assert seen[:2] == [(0.033, "learning from tile 1 of 9"), (0.067, "learning from tile 2 of 9")]
    assert seen[8:10] == [(0.3, "learning from tile 9 of 9"), (0.366, "classified tile 1 of 9")]
    # (to 0.89 since session 46: the split's first step says 0.9, and the fractions keep rising)
    assert seen[17:19] == [(0.89, "classified tile 9 of 9"), (0.9, "splitting touching cells: filling gaps")]
    assert seen[-2:] == [(0.95, "measuring the cells"), (1.0, "done")]


def test_the_memory_budget_finds_a_batch_jobs_limit_deep_in_the_cgroup_tree(tmp_path):
    """A re-review (session 32): only the root's limit files were read, but a v2 root has none, and
    a Slurm job or a systemd unit sits deep in the tree: the job's 4 GiB was taken for the machine's
    23.5 GiB. The process's own group and every group above it count, v2 and v1."""
    from PAMSegmentLib.volumes import _cgroup_limits

    root = tmp_path / "cgroup"
    (root / "system.slice" / "job.scope").mkdir(parents=True)
    (root / "system.slice" / "memory.max").write_text(f"{4 * GIB}\n")
    (root / "system.slice" / "job.scope" / "memory.max").write_text("max\n")
    own = tmp_path / "self_cgroup"
    own.write_text("0::/system.slice/job.scope\n")
    assert _cgroup_limits(str(root), str(own)) == [4 * GIB]
    v1 = root / "memory" / "slurm" / "uid_1" / "job_2"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    own.write_text("12:pids:/slurm/uid_1/job_2\n5:memory:/slurm/uid_1/job_2\n")
    assert _cgroup_limits(str(root), str(own)) == [2 * GIB]
    own.write_text("")  # no groups said: the roots alone (here v2's has no file, v1's says no limit)
    assert _cgroup_limits(str(root), str(own)) == []


def test_a_plain_tiff_with_a_thumbnail_page_still_reads_and_a_tiff_is_known_by_its_content(tmp_path):
    """A re-review (session 32) of the whole-slide check: an image whose second page is a small
    thumbnail read as before (page 0) and must go on doing so; and ITK reads a TIFF named .dat or
    .qptiff as one too, so a smaller first page there cropped every larger page to its size."""
    import tifffile

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    rng = np.random.default_rng(1)
    photo = rng.integers(0, 255, (120, 160), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "photo.tif") as tif:
        tif.write(photo)
        tif.write(photo[::4, ::4].copy(), subfiletype=1)  # marked as a reduced image, as thumbnails are
    np.testing.assert_array_equal(read_image_2d(tmp_path / "photo.tif")[0], photo)
    # a volume with a flagged preview page reads as its slices (ITK skips the preview; a re-review:
    # it was refused), every page is looked at (a larger 20th page was cropped to the first's size)
    stack = rng.integers(0, 255, (20, 32, 32), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for plane in stack:
            tif.write(plane)
        tif.write(stack[0, ::4, ::4].copy(), subfiletype=1)
    np.testing.assert_array_equal(read_volume(tmp_path / "stack.tif").array, stack)
    with tifffile.TiffWriter(tmp_path / "bigger.tif") as tif:
        for plane in stack:
            tif.write(plane)
        tif.write(np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match=r"bigger.tif is no volume: its pages are images of different sizes "
                                         r"\(32 x 32, 64 x 64 px\), the largest 64 x 64 px"):
        read_volume(tmp_path / "bigger.tif")
    with tifffile.TiffWriter(tmp_path / "scan.dat") as tif:
        tif.write(photo[:40, :40].copy())
        tif.write(photo)
    with pytest.raises(InputError, match=r"scan.dat is a whole-slide \(pyramidal\) image: its pages are images of "
                                         r"different sizes \(40 x 40, 160 x 120 px\)"):
        read_image_2d(tmp_path / "scan.dat")


def test_a_large_tile_is_named_in_the_refusal(tmp_path, monkeypatch, capsys):
    from PAMSegmentLib import cli, volumes

    monkeypatch.setattr(volumes, "memory_budget", lambda: (GIB, GIB))
    image = _declared_only(tmp_path / "region.mhd", 3000, 3000)
    assert cli.main(["label-cells", str(image), str(image), "-o", str(tmp_path / "out.tif"), "--tile", "4096"]) == 2
    assert "(or give a smaller --tile than 4096: the default 1024 needs less), or run again" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_on_the_command_line_process_deletes_the_job_before_it_exits(tmp_path, sig):
    """A re-review (session 32): in a real `pamsegment` process a Ctrl-C (or SIGTERM) inside the
    wait for the upload's answer left the helper thread marked as ended while it still ran
    (Thread.join interrupted, CPython 3.11), so the process exited at once and the job the upload
    made stayed on the server; the in-process test above lives on in pytest, so it did not see it."""
    import subprocess
    import sys

    import SimpleITK as sitk
    from conftest import REPO, _cli_env

    image, prompt = _tiny_case()
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(prompt), str(tmp_path / "prompt.nii.gz"))
    server, url, log = _slow_server(post_delay=1.0)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "PAMSegmentLib", "propagate", str(tmp_path / "img.nii.gz"),
                                 str(tmp_path / "prompt.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "--server", url,
                                 "--method", "copy"], cwd=REPO, env=_cli_env(None), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "POST received" not in log and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        proc.send_signal(sig)
        proc.communicate(timeout=30)
        assert proc.returncode != 0 and not (tmp_path / "out.nii.gz").exists()
        assert "DELETE /jobs/J1" in log  # sent before the process ended: nothing in this test sends it later
    finally:
        server.shutdown()


def test_slicer_records_and_server_answers_say_whether_walks_towards_walls_had_the_test(mrml_scene):
    """A re-review (session 32): results of earlier versions walked towards a wall without the
    agreement test, so such walks were predicted again on every update; a result now says that it
    had the test, in Slicer's record and in a server's answer, and its walks are reused."""
    import PAMSegmentLib.mrml as mrml
    from PAMSegmentLib.mrml import PropagationHistory
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result
    from test_mrml_corrections import _run_of
    from test_review_s31 import _finished_job

    job, seg, sid, vol, truth = _finished_job(mrml_scene)
    assert job.result.outward_wall_test
    history = PropagationHistory()
    job.apply(history=history)
    entry = history.get(seg, sid)
    text = mrml.encode_record(entry)
    back = mrml.decode_record(text, seg, sid, _run_of(text))
    assert back.outward_wall_test and back.previous_result().outward_wall_test
    entry.outward_wall_test = False  # as a record of an earlier version reads
    older = mrml.encode_record(entry)
    assert not mrml.decode_record(older, seg, sid, _run_of(older)).previous_result().outward_wall_test
    assert decode_result(encode_result(job.result)).outward_wall_test


def test_a_thread_count_is_given_back_when_torch_was_imported_during_an_overlapping_run(monkeypatch):
    """A re-review (session 32): a `copy` run began before torch was imported, a `pam` run beside it
    imported torch; torch's count, saved by neither, stayed at 1 once both had ended."""
    import sys

    import torch

    from PAMSegmentLib.propagate import torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delitem(sys.modules, "torch")  # not imported yet
        first = torch_threads(1)
        first.__enter__()
        monkeypatch.setitem(sys.modules, "torch", torch)  # the second run imports it
        second = torch_threads(1)
        second.__enter__()
        assert torch.get_num_threads() == 1
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_files_itk_cannot_read_the_header_of_are_checked_too(tmp_path, monkeypatch, capsys):
    """A re-review (session 32): a grey + alpha PNG and a TIFF of 64-bit floats (which ITK cannot
    read; tifffile or Pillow do) skipped the memory check, and label-images counted their pixels
    as none."""
    import tifffile
    from PIL import Image

    from PAMSegmentLib import cli, volumes

    grey_alpha = np.zeros((300, 200, 2), np.uint8)
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "f64.tif", np.zeros((150, 100), np.float64))
    assert volumes.image_pixels_2d(tmp_path / "la.png") == (300, 200, 1)
    assert volumes.image_pixels_2d(tmp_path / "f64.tif") == (150, 100, 1)
    monkeypatch.setattr(volumes, "memory_budget", lambda: (2**28, 2**28))  # 256 MiB: below the fixed share
    assert cli.main(["label-cells", str(tmp_path / "la.png"), str(tmp_path / "la.png"), "-o",
                     str(tmp_path / "out.tif")]) == 2
    assert "labelling the cells of la.png (200 x 300 px grey" in capsys.readouterr().err


def test_background_marks_like_cells_are_found_within_their_own_boxes():
    """A review (session 32): each background mark was looked at through a whole-image mask (about
    0.003 s per mark and megapixel: 10.7 s for 200 marks on a 3000 px image, 0.7 s now); the marks
    named and their centres are the same as the whole-image computation's (written out here)."""
    from scipy import ndimage

    from PAMSegmentLib.cells import _marks_like_cells

    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (200, 240)).astype(np.float32)
    examples, marked = np.zeros(image.shape, np.int32), np.zeros(image.shape, bool)
    yy, xx = np.mgrid[-6:7, -6:7]
    disc = yy ** 2 + xx ** 2 <= 36
    for k in range(3):  # bright example cells
        examples[20 + 30 * k - 6:20 + 30 * k + 7, 14:27][disc] = k + 1
        image[20 + 30 * k - 6:20 + 30 * k + 7, 14:27][disc] += 80
    for k, (r, c) in enumerate([(40, 100), (90, 60), (150, 200), (170, 120), (120, 180), (60, 220)]):
        marked[r - 6:r + 7, c - 6:c + 7][disc] = True
        if k % 2:  # every other mark lies on something bright, like a cell
            image[r - 6:r + 7, c - 6:c + 7][disc] += 80
    found = _marks_like_cells(image, examples, marked)
    pieces, n = ndimage.label(marked)
    ex = examples > 0
    cell, ring = image[ex].mean(), image[ndimage.binary_dilation(ex, iterations=3) & ~ex & ~marked].mean()
    expected = [ndimage.center_of_mass(pieces == k) for k in range(1, n + 1)
                if abs(image[pieces == k].mean() - cell) < abs(image[pieces == k].mean() - ring)]
    assert len(found) == 3 and found == [tuple(float(v) for v in e) for e in expected]
    assert sorted(found) == [(60.0, 220.0), (90.0, 60.0), (170.0, 120.0)]


def test_an_aperio_layout_slide_is_refused_before_itk_reads_it(tmp_path):
    """A re-review (session 32): a tiled full-resolution level followed by a thumbnail page that is
    not flagged as reduced (as Aperio's SVS store it) went to ITK, which wrote outside its buffer:
    a segmentation fault of `label-cells` on a 6000 x 4000 slide. Refused from the tags now."""
    import tifffile

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d

    level0 = np.random.default_rng(2).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "biopsy.svs") as tif:
        tif.write(level0, photometric="rgb", tile=(256, 256))
        tif.write(level0[::4, ::4].copy(), photometric="rgb")  # the thumbnail, stripped, not flagged
        tif.write(level0[::2, ::2].copy(), photometric="rgb", tile=(256, 256))
    with pytest.raises(InputError, match=r"biopsy.svs is a whole-slide \(pyramidal\) image: its pages are images of "
                                         r"different sizes \(1,024 x 768, 256 x 192, 512 x 384 px\)"):
        read_image_2d(tmp_path / "biopsy.svs", keep_colour=True)


def test_a_dicom_file_with_a_tiff_preamble_is_read_as_dicom(tmp_path, capfd):
    """A re-review (session 32): DICOM allows a TIFF header in its 128-byte preamble (a
    "dual-personality" file); the whole-slide check took it for a TIFF whose pages differ in size
    and refused the volume, with tifffile's warnings on stderr."""
    import struct

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from PAMSegmentLib.volumes import read_volume

    def ifd(width, height, following):
        entries = [(256, 3, 1, width), (257, 3, 1, height)]
        return (struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
                + struct.pack("<I", following))

    preamble = (b"II*\x00" + struct.pack("<I", 8) + ifd(64, 64, 38) + ifd(16, 16, 0)).ljust(128, b"\x00")
    volume = np.random.default_rng(0).integers(0, 1000, (6, 64, 64)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, preamble
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = "CT", 64, 64, 6, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 16, 16, 15
    ds.PixelRepresentation, ds.PixelSpacing, ds.SliceThickness = 0, [1, 1], 1
    ds.PixelData = volume.tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "x"
    from conftest import save_dicom_file

    save_dicom_file(ds, tmp_path / "dual.dcm")
    assert pydicom.dcmread(tmp_path / "dual.dcm").preamble[:4] == b"II*\x00"
    np.testing.assert_array_equal(read_volume(tmp_path / "dual.dcm").array, volume)
    assert "tifffile" not in capfd.readouterr().err


def test_a_tiff_whose_preview_page_comes_first_or_between_slices_is_refused(tmp_path):
    """A re-review (session 32): ITK takes a TIFF's size from its first page and places each slice
    by its page number, so a flagged preview first was read instead of the image (a 64 x 48
    preview of a 512 x 384 photo), and a preview after every slice (as a Zeiss LSM stores them)
    crashed a volume read. A single flagged page still reads."""
    import tifffile

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    rng = np.random.default_rng(3)
    photo = rng.integers(0, 255, (96, 128), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "preview_first.tif") as tif:
        tif.write(photo[::8, ::8].copy(), subfiletype=1)
        tif.write(photo)
    with pytest.raises(InputError, match=r"preview_first.tif: the first page is a reduced-resolution preview or a "
                                         r"mask \(NewSubfileType\), which the TIFF reader cannot skip there"):
        read_image_2d(tmp_path / "preview_first.tif")
    with tifffile.TiffWriter(tmp_path / "lsm_like.tif") as tif:
        for plane in rng.integers(0, 255, (4, 32, 32), dtype=np.uint8):
            tif.write(plane)
            tif.write(plane[::4, ::4].copy(), subfiletype=1)
    with pytest.raises(InputError, match="lsm_like.tif: a page between its images is a reduced-resolution preview"):
        read_volume(tmp_path / "lsm_like.tif")
    tifffile.imwrite(tmp_path / "one_flagged.tif", photo, subfiletype=1)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "one_flagged.tif")[0], photo)


@pytest.mark.parametrize("reader", ["tifffile", "Pillow"])
def test_mask_pages_between_slices_are_refused_and_pages_all_flagged_read(tmp_path, monkeypatch, reader):
    """A re-review (session 32): without tifffile (Pillow reads the tags; tifffile is no dependency)
    a mask page Pillow cannot set up made the whole check give up, and ITK crashed on a stack with
    a mask page after each slice; a file whose pages are all flagged was refused, though ITK reads
    its first page right."""
    import sys

    import tifffile

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    rng = np.random.default_rng(4)
    stack = rng.integers(0, 255, (4, 24, 32), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "masked.tif") as tif:
        for plane in stack:
            tif.write(plane)
            tif.write(plane > 128, subfiletype=4)
    with tifffile.TiffWriter(tmp_path / "all_flagged.tif") as tif:
        tif.write(stack[0], subfiletype=1)
        tif.write(stack[0, ::2, ::2].copy(), subfiletype=1)
    if reader == "Pillow":
        monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(InputError, match="masked.tif: a page between its images is a reduced-resolution preview or a "
                                         "mask"):
        read_volume(tmp_path / "masked.tif")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "all_flagged.tif")[0], stack[0])
