"""Shared fixtures: a small synthetic CT with a one-slice prompt, random checkpoints, the CLI.

Torch runs on one thread: the machine is shared and every array here is small.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TESTING = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTING))  # `from doubles import ...`
# The checkout's package, as the commands the tests start get it (PYTHONPATH, below): started from
# Testing/ beside a non-editable install, the tests imported the installed copy and compared its
# paths with the command's (a trial of the lowest versions, session 45).
sys.path.insert(1, str(REPO))


def save_dicom_file(ds, path) -> None:
    """A pydicom dataset written as a DICOM file with its preamble and meta header: pydicom 3's
    ``enforce_file_format``, pydicom 2.4's ``write_like_original=False`` (a trial of the lowest
    versions, session 45: the fixtures called only the first)."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:
        ds.save_as(path, write_like_original=False)


def rotation_direction(yaw_deg: float = 20.0, tilt_deg: float = 10.0) -> tuple[float, ...]:
    """A non-identity ITK direction matrix (row-major 3x3): rotation about z, then about x."""
    a, b = math.radians(yaw_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(x) for x in (rz @ rx).ravel())


def ellipsoid(shape: tuple[int, int, int], center: tuple[float, float, float],
              radii: tuple[float, float, float]) -> np.ndarray:
    """Boolean ellipsoid on a (k, j, i) grid; centre and radii in voxels."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((k - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2 + ((i - center[2]) / radii[2]) ** 2 <= 1


def write_image(array: np.ndarray, path: Path, spacing_kji=(2.5, 0.8, 0.7), origin=(-12.5, 40.25, -80.0),
                direction=None) -> Path:
    """Write a (k, j, i) array with the given geometry (spacing in (k, j, i) order)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_kji)))
    img.SetOrigin(origin)
    img.SetDirection(direction or rotation_direction())
    sitk.WriteImage(img, str(path))
    return path


@dataclass
class CTCase:
    """Synthetic CT-like case written to disk. Arrays are (k, j, i)."""

    image_path: Path
    prompt_path: Path
    image: np.ndarray  # int16 HU-like
    truth: np.ndarray  # bool, the object
    prompt: np.ndarray  # uint8, label 1 on slice ``prompt_slice`` only
    prompt_slice: int
    spacing: tuple[float, float, float]  # (k, j, i) mm
    directory: Path


def make_ct_case(directory: Path, shape=(20, 40, 48), seed: int = 0) -> CTCase:
    """Air around a soft-tissue body ellipse (40 HU) holding a brighter ellipsoid object (150 HU)
    that spans slices 5..15; the prompt is the object on slice 10."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((j - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((i - shape[2] / 2) / (0.45 * shape[2])) ** 2 <= 1
    body = np.broadcast_to(body, shape)
    truth = ellipsoid(shape, (10, 18, 22), (5.5, 7, 9))
    image = np.full(shape, -1000.0)
    image[body] = 40.0
    image[truth] = 150.0
    image += rng.normal(0, 10, shape)
    image = image.astype(np.int16)
    prompt = np.zeros(shape, np.uint8)
    prompt[10][truth[10]] = 1
    spacing = (2.5, 0.8, 0.7)
    directory.mkdir(parents=True, exist_ok=True)
    image_path = write_image(image, directory / "image.nii.gz", spacing)
    prompt_path = write_image(prompt, directory / "prompt.nii.gz", spacing)
    return CTCase(image_path, prompt_path, image, truth, prompt, 10, spacing, directory)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_in_a_terminal():
    """A test run started in the background by a non-interactive shell (``cmd &``) inherits SIGINT
    ignored, and Python then keeps it ignored; the Ctrl-C tests need Python's usual handler, as a
    run from a terminal has. Restored after the session."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


_TOOL_CACHES = {"__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".git", ".ci-venv"}


def _ignored_patterns() -> tuple[tuple[str, bool, bool], ...]:
    """The checkout's .gitignore patterns as (name pattern, only at the root, only for folders): a
    training run writing into runs/, a local .venv: not the tests' doing (walking a venv twice a test
    cost minutes)."""
    try:
        lines = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ()
    return tuple((line.strip().strip("/"), line.strip().startswith("/"), line.strip().endswith("/"))
                 for line in lines if line.strip() and not line.startswith("#"))


_IGNORED = _ignored_patterns()


def _skipped(top: str, name: str, folder: bool) -> bool:
    import fnmatch

    at_root = os.path.abspath(top) == str(REPO)
    return (name in _TOOL_CACHES or (folder and os.path.isfile(os.path.join(top, name, "pyvenv.cfg")))
            or any(fnmatch.fnmatch(name, pattern) and (at_root or not rooted) and (folder or not folders_only)
                   for pattern, rooted, folders_only in _IGNORED))


def _files_in(folder: Path, recursive: bool) -> dict:
    """path -> (size, mtime) of the files under ``folder`` (only its own entries unless
    ``recursive``), tool caches, what .gitignore names and virtual environments left out."""
    out = {}
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _skipped(top, d, True)] if recursive else []
        files = [f for f in files if not _skipped(top, f, False)] if recursive else files
        for name in files + ([] if recursive else dirs):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            out[path] = (st.st_size, st.st_mtime_ns)
        if not recursive:
            break
    return out


def _checkout_state() -> dict:
    state = _files_in(REPO, recursive=True)  # the whole checkout (docs/benchmark, Resources/Models too)
    cwd = Path.cwd()
    if REPO not in (cwd, *cwd.parents):
        state.update(_files_in(cwd, recursive=False))
    return state


@pytest.fixture(autouse=True)
def _signal_handlers_as_found():
    """A test leaves Ctrl-C's and SIGTERM's handlers as it found them: the command ignores both once
    its output is in place (it ends the process then), and two tests that restored SIGINT alone left
    the test run, and every process it started, ignoring SIGTERM (a `timeout` could no longer stop a
    hung run). Put back, and the test that changed one fails."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    changed = [sig.name for sig, handler in found.items() if signal.getsignal(sig) != handler]
    for sig, handler in found.items():
        signal.signal(sig, handler)
    if changed:
        pytest.fail(f"the test left the handler of {' and '.join(changed)} changed")


@pytest.fixture(autouse=True)
def _no_files_left_in_the_checkout():
    """A test writes into its tmp_path, never into the checkout or the working folder: a command
    given an empty or relative output path once wrote ct_pam.nii.gz and batch_report.csv into the
    repository root on the code before a fix, and they were committed. Fails the test that added or
    changed a file there."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    added = sorted(p for p in after if p not in before)
    # changed: data files only (weights, cards, fixtures, published tables); source and prose may be edited
    # by the developer while the suite runs
    # (in a working folder outside the checkout, added files only: the run's own log may grow there)
    changed = sorted(p for p in after if p in before and after[p] != before[p] and not p.endswith((".py", ".md"))
                     and Path(p).is_relative_to(REPO))
    if added or changed:
        pytest.fail("the test left files behind: " + "; ".join(
            f"{what}: {', '.join(paths[:5])}" for what, paths in (("added", added), ("changed", changed)) if paths))


@pytest.fixture
def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be made in: read-only for a user; for root, who may write anywhere
    permissions say, /proc."""
    import os

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("running as root without /proc: no folder here refuses a new file")
        return Path("/proc")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.fixture
def ct_case(tmp_path: Path) -> CTCase:
    return make_ct_case(tmp_path / "case")


@dataclass
class CheckpointFixture:
    path: Path
    network: torch.nn.Module
    sha256: str = ""


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> CheckpointFixture:
    """A randomly initialised ``small``-preset network saved in our format."""
    from PAMSegmentLib.checkpoints import save_checkpoint
    from PAMSegmentLib.network import PAMNetwork
    from PAMSegmentLib.preprocess import PreprocessingParams

    torch.manual_seed(1234)
    net = PAMNetwork("small").eval()
    path = tmp_path_factory.mktemp("ckpt_small") / "pam_small_random.pt"
    digest = save_checkpoint(path, net, PreprocessingParams(input_size=net.config.input_size),
                             provenance={"note": "random weights for tests", "seed": 1234})
    return CheckpointFixture(path, net, digest)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory) -> CheckpointFixture:
    """A randomly initialised ``official`` network saved the way the authors' training script did:
    ``{"model_state_dict": {"module." + key: tensor}}`` (DistributedDataParallel names).
    32 M parameters, a ~130 MB file: made once per session."""
    from PAMSegmentLib.network import PAMNetwork

    torch.manual_seed(4321)
    net = PAMNetwork("official").eval()
    path = tmp_path_factory.mktemp("ckpt_official") / "propmask_random.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 7}, path)
    return CheckpointFixture(path, net)


def _cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # read back as UTF-8 below: GDCM's DICOM reading resets this process's locale
    env.pop("PAMSEGMENT_MODEL", None)
    env.update(extra or {})
    return env


@pytest.fixture
def run_cli():
    """Run ``python -m PAMSegmentLib ARGS`` in a subprocess -> CompletedProcess (text output)."""

    def run(*args: str | os.PathLike, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "PAMSegmentLib", *map(str, args)], cwd=REPO, env=_cli_env(env),
                              capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                              stdin=subprocess.DEVNULL)

    return run


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, **config):
    """Serve the ASGI ``app`` with uvicorn in a thread on a free local port; yields its URL.
    ``config``: further ``uvicorn.Config`` settings (e.g. ``http=`` a protocol class)."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        queue = getattr(getattr(app, "state", None), "queue", None)
        if queue is not None:  # the app's job worker: ended with its server, not left for the session
            queue.close(timeout=10)
