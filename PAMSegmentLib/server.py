"""``pamsegment serve``: a propagation server, for users whose own machine is too slow (a laptop
running Slicer, a GPU box in the lab).

The HTTP API (FastAPI, served by uvicorn; ``pip install ".[server]"`` in the source folder):

* ``GET /info``: the server's version, its model (checkpoint, sha256, device, walk, and ``settings``:
  ``checkpoints.settings_digest``), how many jobs wait, its limits (``max_upload_mb``,
  ``max_voxels``) and the ``batch_size`` every job runs with.
* ``POST /jobs?options=JSON``: the body (not a multipart form: 415) is an uncompressed ``.npz``
  (``numpy.savez``) holding ``image`` (k, j, i), ``prompt`` (the same shape, integer labels) and
  ``spacing`` (3 floats, mm, k, j, i). ``options`` (JSON object, optional): ``axis``, ``labels``,
  ``range``, ``early_stop``, ``empty_slices``, ``remove_disconnected``, ``update`` (the prompt is an edited earlier result),
  ``method`` (``pam``, ``track``, ``copy``), ``intensity_gate`` (``pam``: the drift test for this
  job, ``off``, ``on``, ``prompt`` (also written ``both``, the command line's word) or ``guide``;
  default the server model's setting). The
  arrays and options are checked at once (400 with the engine's one-line message); then 202 with
  the job's ``id``. One job runs at a time, in arrival order; at most ``max_jobs`` wait besides
  the running one (503).
* ``GET /jobs/{id}``: ``state`` (queued, running, finished, failed, cancelled), ``progress``
  0-1, ``message``, ``queue_position``; a failed job's ``failure``: ``input`` (its inputs were
  refused), ``error`` (the server's own: its checkpoint, memory) or ``internal`` (a fault; its
  message starts "internal error:"). A queued or running job that no client asks about (this
  or its result) for ``ABANDON_SECONDS`` (120 s) is cancelled: its client is gone.
* ``GET /jobs/{id}/result``: the finished result as ``.npz`` (``PAMSegmentLib.remote`` reads
  it); 409 while it is not finished. Results are kept for ``result_ttl`` seconds.
* ``DELETE /jobs/{id}``: cancel a queued or running job (a running job stops between batches) and
  forget it; the answer's ``state`` is ``cancelled`` then, or the state a finished, failed or
  cancelled job had (only forgotten), with ``deleted`` true.

Uploads are untrusted: the body size is bounded before it is read (413), the ``.npz`` must hold
exactly those three arrays, stored uncompressed (no decompression bombs) and without pickled
objects, and the image at most ``max_voxels`` voxels. A server listening beyond this machine
(``--host`` other than localhost or a loopback address such as 127.0.0.1 or ::1) requires a token (``--token`` or the
PAMSEGMENT_TOKEN environment variable) that clients send as ``Authorization: Bearer TOKEN``;
use HTTPS through a reverse proxy or an SSH tunnel for anything but a trusted network.
"""


import contextlib
import errno
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import __version__
from .checks import shown
from .errors import InputError, PAMError, PropagationCancelled
from .propagate import CancelToken, disagree_to_json
from .remote import SERVER_METHODS

__all__ = ["create_app", "JobQueue", "encode_result", "read_arrays", "add_serve_arguments", "cmd_serve", "is_loopback"]

logger = logging.getLogger("pamsegment.server")

# A queued or running job no client asked about for this long lost its client and is cancelled
# (the client asks every 0.3 s while it waits, and again for 30 s when the network drops).
ABANDON_SECONDS = 120.0
HEADER_SECONDS = 20.0  # a connection must send a whole request head within this (slow or silent clients are dropped)


# On Ctrl-C or SIGTERM, open connections (a stalled upload) get this long before they are closed.
SHUTDOWN_GRACE = 10.0


class QueueFull(Exception):
    """The server's queue holds ``max_jobs`` waiting jobs (a 503; an OverflowError before, which a
    client's 401-digit option value raised too and was answered as "busy")."""


def _stop_queue(queue: "JobQueue", wait: float = 60.0) -> bool:
    """On Ctrl-C: cancel the jobs and wait for the running one to stop between two batches, saying
    so; a second Ctrl-C stops waiting (the process may then end under the job). True when the
    process is left with a job still running (not waited for, or not stopped in time)."""
    running = any(j.state == "running" for j in queue.waiting())
    if running:
        print("stopping: cancelling the running job, which ends between two batches (Ctrl-C again to quit at once)",
              flush=True)
    try:
        if not queue.close(timeout=wait) and running:
            print(f"the running job did not stop within {wait:.0f} s; quitting anyway", flush=True)
            return True
    except KeyboardInterrupt:
        print("quitting without waiting for the running job", flush=True)
        return running
    return False


def _end_under_running_job(args) -> None:
    """End the ``pamsegment serve`` process now, with status 0, where a job still runs in it (a second
    Ctrl-C): Python's shutdown under a thread that is inside torch aborted the process (status 134,
    "terminate called without an active exception", a crashed service to systemd or docker) or printed
    tracebacks. Only where the process is the command's own (``__main__.run``), not a caller's."""
    if not getattr(args, "_ends_process", False):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def header_timeout_protocol(seconds: float = HEADER_SECONDS):
    """uvicorn's h11 HTTP protocol with a deadline for each request's head: uvicorn keeps a
    connection that sends part of a request (or nothing) open for ever, and the token is checked
    only once the head is complete, so anyone could hold every connection the process can open and
    lock out the users with the token (a slow-loris attack; 300 such connections timed every client
    out in a review). None when this uvicorn's protocol does not have the parts used (its default
    protocol is then kept)."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        return None
    if not all(hasattr(H11Protocol, n) for n in ("connection_made", "connection_lost", "data_received",
                                                 "handle_events")):
        return None

    class HeaderTimeoutH11Protocol(H11Protocol):
        _deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _waiting_for_head(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or bool(getattr(cycle, "response_complete", False))

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._waiting_for_head():
                self._arm()  # the next request of a kept-alive connection starts
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_head():
                self._disarm()  # the head is in: the request is being served

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


OPTION_KEYS = {"axis", "labels", "range", "early_stop", "empty_slices", "remove_disconnected", "method", "update",
               "intensity_gate"}
# intensity_gate (method pam): the drift test for this job, as propagate's --intensity-gate (off, prompt,
# guide, both) or "on" (the checkpoint's reference, guide if it has the test off): the remedy the README
# gives for a walk the test ended at once must work through a server too
GATE_CHOICES = ("off", "on", "prompt", "guide", "both")
METHODS = SERVER_METHODS
MAX_VOXELS = 512 * 512 * 1024  # default largest image (and prompt) a job may hold
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """True for an address that only this machine reaches: ``localhost`` or a loopback address
    (127.0.0.0/8, ``::1``), written in any form ``ipaddress`` reads."""
    name = host.strip().lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{0,5}))?")


def _local_host_header(host: str, names: tuple[str, ...]) -> bool:
    """Whether a request's Host header names this machine: the whole header must be ``name``,
    ``name:port``, ``[v6]`` or ``[v6]:port``, the port possibly empty as URLs allow (RFC 9110;
    a form browsers never send, such as
    ``[::1]evil.example`` or ``localhost:80@evil``, is refused), the name a loopback address (also
    IPv4-mapped), ``localhost`` and its usual aliases, or one of ``names``; a trailing dot (a
    fully qualified name) is allowed."""
    host = host.strip().lower()
    found = HOST_HEADER.fullmatch(host)
    if found is None:
        return False
    name = found["v6"] or found["name"].rstrip(".")
    if not name:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if found["v6"]:
            return False  # brackets hold an IPv6 address or nothing
        address = None
    mapped = getattr(address, "ipv4_mapped", None)
    return (is_loopback(name) or name in LOOPBACK_NAMES or (mapped is not None and mapped.is_loopback)
            or name in {n.strip().lower().strip("[]").rstrip(".") for n in names})


def read_arrays(body: bytes, max_voxels: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The upload's image, prompt and spacing; InputError for anything else."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        infos = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError):  # (a flipped byte in the
        # directory: "compression type 99", a 500 before)
        raise InputError("the upload is not an .npz file (numpy.savez of image, prompt and spacing)") from None
    want = {"image.npy", "prompt.npy", "spacing.npy"}
    if set(infos) != want:
        # the names quoted and cut (shown): a name holding a line break wrote a forged line into the log (a trial,
        # session 46)
        held = sorted(infos, key=str)
        raise InputError(f"the upload must hold exactly the arrays image, prompt and spacing; it holds "
                         f"{', '.join(shown(n.removesuffix('.npy'), 40) for n in held[:8]) or 'nothing'}"
                         f"{f' and {len(held) - 8} more' if len(held) > 8 else ''}")
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos.values()):
        raise InputError("the upload's arrays must be stored uncompressed (numpy.savez, not savez_compressed)")
    import tokenize

    try:
        return _read_arrays(archive, want, max_voxels)
    except (zipfile.BadZipFile, RuntimeError, ValueError, EOFError, OverflowError, SyntaxError, tokenize.TokenError,
            zlib.error, OSError) as error:
        # untrusted bytes: a bad CRC, an "encrypted" entry (RuntimeError), a cut header (tokenize's error),
        # a dimension of 2**70 (OverflowError): each was a 500 or a 503 before. Not MemoryError (the
        # server's own state, a 503) nor anything else (a bug: a 500)
        if isinstance(error, InputError):
            raise
        raise InputError(f"the upload is damaged ({type(error).__name__}: {_numpy_error_text(error)}); send it "
                         "again") from None


def _numpy_error_text(error: Exception) -> str:
    """A reader's error about untrusted bytes, for a client: one line of at most 160 characters, without
    the address of a Python object numpy names for a hostile array header, and without its advice to
    load with allow_pickle=True (a trial, session 46)."""
    text = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "an expression", " ".join(str(error).split()))
    return (text if "allow_pickle" not in text else "its array header is not one numpy writes")[:160]


def _read_arrays(archive, want: set, max_voxels: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    arrays = {}
    for name in sorted(want):
        with archive.open(name) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(fh))
            except ValueError as error:
                raise InputError(f"the upload's {name} is not a numpy array ({_numpy_error_text(error)})") from None
            if dtype.hasobject:
                raise InputError(f"the upload's {name} holds Python objects; send numeric arrays")
            if dtype.kind not in "biuf" or dtype.fields is not None:
                raise InputError(f"the upload's {name} is {dtype}; send boolean, integer or floating-point numbers")
            if any(int(d) < 0 for d in shape) or math.prod(int(d) for d in shape) > max_voxels:
                raise InputError(f"the upload's {name} has shape {shape}; this server takes at most {max_voxels:,} "
                                 "elements (crop the volume around the object)")
        with archive.open(name) as fh:
            try:
                arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:  # e.g. less data than the header declares
                raise InputError(f"the upload's {name} is damaged ({error})") from None
    spacing = arrays["spacing.npy"]
    if spacing.shape != (3,):
        raise InputError(f"spacing must be 3 numbers (k, j, i), got shape {spacing.shape}")
    if spacing.dtype.kind == "b":  # True would be read as 1 mm, which the engine refuses from Python
        raise InputError("spacing must be 3 numbers of millimetres (k, j, i), got true/false values")
    return arrays["image.npy"], arrays["prompt.npy"], tuple(float(s) for s in spacing)


def parse_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"options must be a JSON object ({error.msg})") from None
    except ValueError as error:  # a number of thousands of digits (Python's int limit)
        raise InputError(f"options must be a JSON object of plain values ({str(error)[:120]})") from None
    except RecursionError:  # '[' * 3000: a 500 and a traceback in the server's log before
        raise InputError("options must be a JSON object (nested too deeply)") from None
    if not isinstance(options, dict):
        raise InputError("options must be a JSON object")
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise InputError(f"unknown option {shown(unknown[0])}; known: {', '.join(sorted(OPTION_KEYS))}")
    if options.get("method", "pam") not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {shown(options['method'])}")
    if "intensity_gate" in options:
        if options["intensity_gate"] not in GATE_CHOICES:
            raise InputError(f"intensity_gate must be one of {', '.join(GATE_CHOICES)}, got "
                             f"{shown(options['intensity_gate'])}")
        if options.get("method", "pam") != "pam":
            raise InputError(f"intensity_gate is an option of method pam, not {options['method']}")
    for key in ("early_stop", "remove_disconnected", "update"):
        if key in options and not (isinstance(options[key], bool) or (key == "remove_disconnected"
                                                                       and options[key] is None)):
            raise InputError(f"{key} must be true or false, got {shown(options[key])}")
    if options.get("axis") is not None and (isinstance(options["axis"], bool) or options["axis"] not in (0, 1, 2)):
        raise InputError(f"axis must be 0, 1 or 2, got {shown(options['axis'])}")
    if isinstance(options.get("range"), list):
        options["range"] = tuple(options["range"])
    empty = options.get("empty_slices")
    if isinstance(empty, dict):  # JSON object keys are strings: the labels are numbers
        try:
            options["empty_slices"] = {int(k): v for k, v in empty.items()}
        except ValueError:
            raise InputError(f"empty_slices' keys must be label numbers, got {shown(list(empty))}") from None
    from .propagate import _validate_options

    axis, labels, rng = _validate_options(options.get("axis"), options.get("labels"), options.get("range"), 16, None,
                                          None, None)
    if rng is not None and rng[0] > rng[1]:
        raise InputError(f"range {shown(rng[0])}:{shown(rng[1])} is reversed; give the first slice first")
    options.update({k: v for k, v in (("axis", axis), ("labels", labels), ("range", rng)) if k in options})
    return options


def encode_result(result) -> bytes:
    """A ``PropagationResult`` as ``.npz`` bytes (what ``PAMSegmentLib.remote`` decodes)."""
    labels = list(result.confidence)
    meta = {
        "axis": result.axis, "labels": labels,
        "slice_range": {str(k): list(v) for k, v in result.slice_range.items()},
        "prompt_slices": {str(k): list(v) for k, v in result.prompt_slices.items()},
        "timings": result.timings, "n_predicted": result.n_predicted,
        "stops": {str(k): v for k, v in result.stops.items()}, "notes": result.notes(),
        "range": list(result.range) if result.range else None, "early_stop": result.early_stop,
        "remove_disconnected": result.remove_disconnected,
        "outward_wall_test": bool(result.outward_wall_test),  # (since session 32)
        "presence_by": str(result.presence_by),  # (since session 37)
        "gaps": {str(k): [int(s) for s in v] for k, v in result.gaps.items()},
        "thin": {str(k): [int(s) for s in v] for k, v in result.thin.items()},
        "cut": {str(k): [[int(s) for s in v[0]], [int(o) for o in v[1]]] for k, v in result.cut.items()},
        "disagree": {str(k): disagree_to_json(v) for k, v in result.disagree.items()},
        # labels whose own prediction lost voxels to another label: the merged mask is not all of it,
        # so a later update recomputes them (their lost voxels are not sent)
        "overlapped": sorted(int(lab) for lab in result.overlapped),
        "lost": {str(k): [{str(o): int(n) for o, n in by.items()}, int(own)] for k, (by, own) in result.lost.items()},
        # the slice intervals this run walked (all of them: a server runs an update from scratch), which
        # Slicer's review marks and update summary go by
        "recomputed": {str(k): [[int(a), int(b)] for a, b in v] for k, v in result.recomputed.items()},
    }
    from .checks import state_to_json  # noqa: PLC0415

    begin = {}  # which predictor ran each label, with which settings: a later round compares its own
    for lab, state in result.begin_state.items():
        try:
            begin[str(lab)] = state_to_json(state)
        except TypeError:
            begin[str(lab)] = None  # a state JSON cannot hold: that label's walks are not reused
    meta["begin_state"] = begin
    arrays = {"mask": result.mask}
    meta["keyframes"] = {str(lab): sorted(int(k) for k in kf) for lab, kf in result.keyframes.items()}
    for lab in labels:
        arrays[f"confidence_{lab}"] = np.asarray(result.confidence[lab], dtype=np.float32)
        if result.agreement.get(lab) is not None:
            arrays[f"agreement_{lab}"] = np.asarray(result.agreement[lab], dtype=np.float32)
        for k, m in result.keyframes.get(lab, {}).items():  # drawn slices and walls, as the engine kept them
            arrays[f"keyframe_{lab}_{int(k)}"] = np.asarray(m, dtype=bool)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@dataclass
class Job:
    id: str
    image: np.ndarray | None
    prompt: np.ndarray | None
    spacing: tuple
    options: dict
    state: str = "queued"
    progress: float = 0.0
    message: str = "waiting"
    result: bytes | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    finished_at: float | None = None
    position_at_submit: int = 0  # its place in the queue when submitted (0: it ran at once), for the log
    # a failed job's kind of failure: "input" (the inputs were refused: InputError), "error" (another
    # PAMError: the server's checkpoint, memory...) or "internal" (a fault); its client's words differ
    failure: str = ""
    # When a client last asked about the job (submitted it, its status or result): a job nobody
    # asks about for JobQueue.abandon_after seconds lost its client and is cancelled.
    last_seen: float = field(default_factory=time.monotonic)


class JobQueue:
    """Jobs run one at a time on one worker thread, in arrival order."""

    def __init__(self, run: Callable[[Job], bytes], max_jobs: int = 8, result_ttl: float = 3600.0,
                 abandon_after: float = ABANDON_SECONDS):
        self._run = run
        self.max_jobs, self.result_ttl, self.abandon_after = int(max_jobs), float(result_ttl), float(abandon_after)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # Re-entrant: request threads read the jobs while the worker and other requests change them.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name="pamsegment-server-worker", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> bool:
        """Stop the worker: every job is cancelled (a running one between two batches) and the worker
        joined, so that the process does not end under a running network (it aborted 3 times in 6
        when stopped with Ctrl-C during a job). Returns whether the worker ended in ``timeout``."""
        with self._lock:
            self._stopping = True
            for job in self.jobs.values():
                job.cancel.cancel()
            self._wake.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def waiting(self) -> list[Job]:
        with self._lock:
            return [j for j in self.jobs.values() if j.state in ("queued", "running")]

    def queued(self) -> int:
        """Jobs waiting to run (the running one aside)."""
        with self._lock:
            return sum(1 for j in self.jobs.values() if j.state == "queued")

    def full(self) -> str | None:
        """Why no job can be queued now (``max_jobs`` wait already), else None."""
        queued = self.queued()
        return (f"{queued} job{' is' if queued == 1 else 's are'} waiting already; try again later"
                if queued >= self.max_jobs else None)

    def submit(self, image, prompt, spacing, options) -> Job:
        with self._lock:
            self._expire()
            full = self.full()  # checked again: another upload may have been queued meanwhile
            if full:
                raise QueueFull(full)
            job = Job(uuid.uuid4().hex, image, prompt, spacing, options)
            self.jobs[job.id] = job
            job.position_at_submit = self.position(job)  # before the worker can take it (0: it runs at once)
            self._wake.notify()
        return job

    def position(self, job: Job) -> int:
        """How many jobs run before ``job`` starts: 0 once it runs, or while it is first in line and
        none runs (the worker is about to take it: a client polling then showed "queue position 1"
        while the log said it ran at once; a trial, session 36)."""
        with self._lock:
            queued = [j for j in self.jobs.values() if j.state == "queued"]
            running = any(j.state == "running" for j in self.jobs.values())
        return queued.index(job) + (1 if running else 0) if job in queued else 0

    def cancel(self, job_id: str) -> str | None:
        """Forget the job, cancelling it if it is queued or running. Returns the state it had then
        (None: no such job), so that the answer says whether anything was cancelled."""
        with self._lock:
            self._expire()  # (a result expired is no job any more, as GET says: a review, session 47)
            job = self.jobs.pop(job_id, None)
            state = None if job is None else job.state
        if job is None:
            return None
        job.cancel.cancel()
        if state == "queued":  # the worker never sees it: its end is said here (a running one's by the worker)
            logger.info("job %s cancelled by its client while queued", job.id[:8])
        return state

    def get(self, job_id: str) -> Job | None:
        """The job, unless it is unknown or its result expired (finished jobs older than ``result_ttl``
        are forgotten here); a client asked about it (``last_seen``)."""
        with self._lock:
            self._expire()
            job = self.jobs.get(job_id)
            if job is not None:
                job.last_seen = time.monotonic()
            return job

    def abandoned(self, job: Job) -> bool:
        """Whether no client asked about ``job`` for ``abandon_after`` seconds (its client is gone:
        killed after its upload, say; the client asks every fraction of a second while it waits)."""
        return time.monotonic() - job.last_seen > self.abandon_after

    def _expire(self) -> None:
        now = time.monotonic()
        for job in self.jobs.values():  # queued jobs whose client is gone give their place up
            if job.state == "queued" and self.abandoned(job):
                job.state = "cancelled"
                job.message = f"cancelled: no client asked about it for {self.abandon_after:.0f} s"
                job.image = job.prompt = None
                job.finished_at = now
                logger.warning("job %s cancelled while queued: no client asked about it for %.0f s (its client is "
                               "gone)", job.id[:8], self.abandon_after)
        for jid in [j.id for j in self.jobs.values() if j.finished_at and now - j.finished_at > self.result_ttl]:
            del self.jobs[jid]

    def _worker(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                job = next((j for j in self.jobs.values() if j.state == "queued"), None)
                if job is None:
                    self._wake.wait(timeout=5.0)
                    continue
                job.state, job.message = "running", "starting"
            started = time.monotonic()
            try:
                if self.abandoned(job):  # waited in the queue while its client went away
                    raise PropagationCancelled("abandoned")
                payload = self._run(job)
            except PropagationCancelled:
                if self.abandoned(job):
                    job.message = f"cancelled: no client asked about it for {self.abandon_after:.0f} s"
                    logger.warning("job %s cancelled: no client asked about it for %.0f s (its client is gone)",
                                   job.id[:8], self.abandon_after)
                else:
                    job.message = "cancelled"
                job.state = "cancelled"
            except PAMError as error:
                job.state, job.message = "failed", str(error)
                job.failure = "input" if isinstance(error, InputError) else "error"
            except Exception as error:  # noqa: BLE001 - a bug must fail the job, not the worker
                job.state, job.message = "failed", f"internal error: {type(error).__name__}: {error}"
                job.failure = "internal"
            else:
                job.result, job.progress, job.state, job.message = payload, 1.0, "finished", "done"
            job.image = job.prompt = None  # the inputs are not needed any more
            job.finished_at = time.monotonic()
            # finished in its last batch as the server was stopping: not sent, as the cancel said (a trial,
            # session 36: "cancelling the running job", then "finished" without a word on its result)
            gone = "; the server is stopping: its result is not sent (its client may run it again)" \
                if job.state == "finished" and self._stopping else ""
            logger.info("job %s %s after %.1f s%s%s", job.id[:8], job.state, job.finished_at - started,
                        "" if job.state == "finished" else f": {job.message}", gone)
            with self._lock:
                idle = not any(j.state == "queued" for j in self.jobs.values())
            if idle:
                release_memory()


def release_memory() -> None:
    """Give freed memory back to the OS once the queue is empty. Python frees a job's arrays, but
    glibc keeps freed heap pages for reuse: after a burst of large uploads an idle server was seen
    holding about 3 GB. ``malloc_trim`` returns them (Linux with glibc; elsewhere nothing to do)."""
    import gc

    from .volumes import trim_heap

    gc.collect()
    trim_heap()


def with_gate(model, gate: str | None):
    """``model`` (a PAMModel) with its drift test set for one job (``GATE_CHOICES``; None: as it
    is): a copy sharing the network, so the server's model stays as started."""
    if gate is None or not hasattr(model, "inference"):  # a predictor without the network's drift test
        return model
    from dataclasses import replace

    return replace(model, inference=model.inference.with_gate(gate))


def create_app(model_factory: Callable[[str], Any], *, token: str | None = None, max_upload_mb: float = 1024,
               max_voxels: int = MAX_VOXELS, max_jobs: int = 8, result_ttl: float = 3600.0,
               model_info: dict | None = None, batch_size: int = 16, abandon_after: float = ABANDON_SECONDS,
               local_names: tuple[str, ...] | None = None):
    """The FastAPI application. ``model_factory(method)`` returns what ``propagate`` takes as
    ``model`` for ``method`` (called on the worker thread; cache the network there).
    ``batch_size``: query slices per network call, for every job. ``abandon_after``: a queued or
    running job no client asked about for this many seconds is cancelled (its client is gone).
    ``local_names``: for a server without a token on this machine only, the names a request may
    give as its Host besides loopback addresses and ``localhost`` (its ``--host``): a web page
    that turns its own name to 127.0.0.1 (DNS rebinding) is refused. A request a browser sends
    from a web page (an ``Origin`` header) is always refused: clients of this server are programs."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from .propagate import _validate_inputs, check_request, propagate

    max_bytes = int(max_upload_mb * 1024 * 1024)

    def run(job: Job) -> bytes:
        options = dict(job.options)
        model = with_gate(model_factory(options.pop("method", "pam")), options.pop("intensity_gate", None))

        def progress(fraction, message):
            job.progress, job.message = float(fraction), message
            if queue.abandoned(job):  # its client is gone: nobody will fetch the result
                job.cancel.cancel()

        result = propagate(job.image, job.prompt, job.spacing, model, progress=progress, cancel=job.cancel,
                           batch_size=batch_size, **options)
        return encode_result(result)

    queue = JobQueue(run, max_jobs=max_jobs, result_ttl=result_ttl, abandon_after=abandon_after)
    # No /docs or /redoc pages: they load their scripts from a CDN into this server's origin, and their
    # "Try it out" would be refused by the Origin check below. /openapi.json describes the API.
    # A trailing slash is a 404 like any other unknown path, not a redirect built from the Host header.
    app = FastAPI(title="PAMSegment server", version=__version__, docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    app.state.queue = queue

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        origin = request.headers.get("origin")
        if origin is not None:  # a page open in a browser here (a plain-text POST needs no preflight)
            logger.info("refused %s %s from a web page (%s)", request.method, request.scope["path"], origin[:100])
            return JSONResponse({"detail": "requests from web pages are refused: use pamsegment, Slicer or another "
                                           "program (which sends no Origin header)"}, 403)
        if local_names is not None and not _local_host_header(request.headers.get("host", ""), local_names):
            logger.info("refused %s %s for host %r: this server answers only to this machine's names",
                        request.method, request.scope["path"], request.headers.get("host", "")[:100])
            return JSONResponse({"detail": "this server answers only requests addressed to this machine (localhost, "
                                           "a loopback address or its --host)"}, 403)
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                logger.info("refused %s %s from %s: %s token", request.method, request.scope["path"],
                            request.client.host if request.client else "?", "a wrong" if given else "no")
                return JSONResponse({"detail": "missing or wrong token (send Authorization: Bearer TOKEN)"}, 401)
        return await call_next(request)

    def get_job(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} here: it was never submitted to this server, was cancelled, its "
                                     f"result expired (results are kept {result_ttl:.0f} s after they finish) or the "
                                     "server was restarted since (jobs are kept in memory only); submit it again")
        return job

    @app.get("/info")
    def info():
        return {"server": "pamsegment", "version": __version__, "model": model_info or {},
                "methods": list(METHODS), "waiting": len(queue.waiting()), "queued": queue.queued(),
                "max_jobs": queue.max_jobs, "max_upload_mb": max_upload_mb, "max_voxels": max_voxels,
                "batch_size": batch_size, "options": sorted(OPTION_KEYS)}  # what a job may set (clients check)

    def refuse(request: Request, status: int, detail: str) -> HTTPException:
        """A refusal the operator's log says too (a trial, session 36: the 413s and the full queue's
        503 left no line, though every other refused request does)."""
        logger.info("refused a job from %s: %s", request.client.host if request.client else "?", detail)
        return HTTPException(status, detail)

    @app.post("/jobs", status_code=202)
    async def submit(request: Request, options: str | None = None):
        full = queue.full()
        if full:  # before the upload is read: a refused client does not send (and this server hold) it all
            raise refuse(request, 503, full)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            # rounded up to 0.01 MB ("1 MB; at most 1 MB" for 1.06 MB, "0 MB" for 5 kB)
            raise refuse(request, 413, f"the upload is {math.ceil(int(length) / 2**20 * 100) / 100:g} MB; this "
                                       f"server takes at most {max_upload_mb:g} MB")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":  # (read as a broken .npz before; curl --data-binary's own urlencoded type
            # is no form: its body is the file as it is)
            raise refuse(request, 415, "the upload is a form (multipart/form-data); send the .npz itself as the "
                                       "request's body (curl --data-binary @case.npz, not -F)")
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise refuse(request, 413, f"the upload exceeds this server's {max_upload_mb:g} MB")
                chunks.append(chunk)
        except ClientDisconnect:  # the client left mid-upload: nothing to answer, nothing to run
            logger.warning("a client disconnected during its upload (%d bytes received); no job was made", size)
            return Response(status_code=400)
        def check():
            opts = parse_options(options)
            try:
                image, prompt, spacing = read_arrays(b"".join(chunks), max_voxels)
            except InputError as error:  # curl -d sends a file as a form's text, its line breaks removed
                if kind != "application/x-www-form-urlencoded" or not any(
                        said in str(error) for said in ("not an .npz file", "is damaged")):
                    raise
                raise InputError(f"{error} (sent as form text, application/x-www-form-urlencoded: curl -d removes "
                                 "the file's line breaks; send it with curl --data-binary @case.npz)") from None
            _validate_inputs(image, prompt, spacing)  # the engine's own checks, the integer prompt among them
            check_request(np.asarray(prompt), opts.get("axis"), opts.get("labels"), opts.get("range"),
                          opts.get("empty_slices"), bool(opts.get("update", False)))  # range and walls too
            return queue.submit(image, prompt, spacing, opts), image.shape

        client = request.client.host if request.client else "?"
        try:
            # Off the event loop: reading and checking a large volume takes seconds, and other
            # clients' status polls must not wait for it.
            job, shape = await run_in_threadpool(check)
        except PAMError as error:
            logger.info("refused a job from %s: %s", client, error)
            raise HTTPException(400, str(error)) from None
        except QueueFull as error:
            raise refuse(request, 503, str(error)) from None
        except MemoryError:
            raise refuse(request, 503, "the server has not enough free memory for this upload now; try again later, "
                                       "or crop the volume around the object") from None
        place = job.position_at_submit
        logger.info("job %s from %s: %s voxels (%.0f MB), method %s; %s", job.id[:8], client,
                    " x ".join(map(str, shape)), size / 2**20, job.options.get("method", "pam"),
                    f"queue position {place}" if place else "runs now")
        return {"id": job.id, "state": job.state, "queue_position": queue.position(job)}

    @app.get("/jobs/{job_id}")
    def status(job_id: str):
        job = get_job(job_id)
        status = {"id": job.id, "state": job.state, "progress": job.progress, "message": job.message,
                  "queue_position": queue.position(job)}
        if job.state == "failed":
            status["failure"] = job.failure
        return status

    @app.get("/jobs/{job_id}/result")
    def result(job_id: str):
        job = get_job(job_id)
        if job.state != "finished":
            raise HTTPException(409, f"job {job_id} is {job.state}" + (f": {job.message}" if job.state == "failed" else ""))
        return Response(job.result, media_type="application/octet-stream")

    @app.delete("/jobs/{job_id}")
    def cancel(job_id: str):
        was = queue.cancel(job_id)
        if was is None:
            raise HTTPException(404, f"no job {job_id}")
        # A queued or running job is cancelled; a finished, failed or cancelled one is only forgotten
        # (it was answered "cancelled" before, for a job that had finished: a trial, session 46).
        if was in ("queued", "running"):
            return {"id": job_id, "state": "cancelled", "deleted": True}
        return {"id": job_id, "state": was, "deleted": True}

    return app


# ----------------------------------------------------------------------------- the command


def add_serve_arguments(p) -> None:
    from .cli import THREADS_HELP, _positive_int, _thread_count, number_type

    _port = number_type(int, lambda v: 1 <= v <= 65535, "a port number from 1 to 65535")
    _megabytes = number_type(float, lambda v: math.isfinite(v) and v > 0, "a size in MB greater than 0")

    p.add_argument("--host", default="127.0.0.1", metavar="H",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every network); "
                        "any address other than localhost or a loopback one (127.x.x.x, ::1) needs a token")
    p.add_argument("--port", type=_port, default=8765, metavar="P", help="port (default: 8765)")
    p.add_argument("--token", help="token clients must send (default: the PAMSEGMENT_TOKEN environment variable, "
                                   "which, unlike --token, other users of this machine cannot see in the process list)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="PAMSegment or official checkpoint (default: $PAMSEGMENT_MODEL if set, else the shipped "
                        "weights)")
    p.add_argument("--walk", choices=("engine", "published"),
                   help="the network's walk for every job, as propagate's --walk (default: the checkpoint's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_thread_count, metavar="N", help=THREADS_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="query slices per network call, for every job; bounds memory (default: 16)")
    p.add_argument("--max-upload-mb", type=_megabytes, default=1024.0, metavar="MB",
                   help="largest upload accepted (default 1024 MB)")
    p.add_argument("--max-voxels", type=_positive_int, default=MAX_VOXELS, metavar="N",
                   help=f"largest image accepted, in voxels (default {MAX_VOXELS:,} = 512 x 512 x 1024)")
    p.add_argument("--max-jobs", type=_positive_int, default=8, metavar="N",
                   help="jobs that may wait besides the one running (default: 8)")


def _address(host: str, port: int) -> str:
    """The URL clients use: with a wildcard host (every network), this machine's name."""
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before the model is loaded: a port in use or a wrong
    address is one InputError, not uvicorn's traceback or exit status 3. ``host`` is an address
    or a name, IPv4 or IPv6 (a name with both: its IPv4 address, as before)."""
    no_address = InputError(f"this machine has no address {host}; give --host one of its addresses, 127.0.0.1 "
                            "(this machine only) or 0.0.0.0 (every network)")
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode
        raise no_address from None
    found.sort(key=lambda info: info[0] != socket.AF_INET)  # stable: the resolver's order within a family
    error: OSError | None = None
    for family, kind, proto, _, address in found:
        sock = None
        try:
            sock = socket.socket(family, kind, proto)  # AF_INET6 is refused where IPv6 is off
            # A port just freed (sockets in TIME_WAIT) is usable; on POSIX only, as asyncio does: on
            # Windows the option lets a second server bind a port another is using.
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = exc
            if exc.errno == errno.EADDRINUSE:
                break  # not on another of the name's addresses: that would be two servers behind one name
    if error is None or error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        raise no_address from None
    if error.errno == errno.EADDRINUSE:
        raise InputError(f"port {port} is in use on {host} (another pamsegment serve?); stop that program or "
                         "choose another --port") from None
    raise InputError(f"cannot listen on {host} port {port} ({error.strerror or error}); choose another --port "
                     "(below 1024 needs administrator rights)") from None


def _checkpoint_label(checkpoint: str | None) -> str:
    """Which weights serve: the --checkpoint file, the file PAMSEGMENT_MODEL names, or the shipped ones."""
    if checkpoint:
        return str(checkpoint)
    if os.environ.get("PAMSEGMENT_MODEL"):
        from .checkpoints import default_checkpoint_path

        return f"{default_checkpoint_path()} (PAMSEGMENT_MODEL)"
    return "shipped default weights"


def _public_checkpoint_label(label: str) -> str:
    """``_checkpoint_label`` as /info tells clients: the file's name, not where it lies on the server
    (clients tell weights by their sha256; a trial, session 46: every client was told the path)."""
    if label == "shipped default weights":
        return label
    path, env = (label[:-len(" (PAMSEGMENT_MODEL)")], " (PAMSEGMENT_MODEL)") if label.endswith(
        " (PAMSEGMENT_MODEL)") else (label, "")
    return os.path.basename(path.rstrip("/\\")) + env


def cmd_serve(args) -> int:
    try:
        import uvicorn  # noqa: F401 - present? (used in _serve)
    except ImportError:
        raise InputError('the server needs FastAPI and uvicorn: pip install ".[server]" in the PAMSegment source '
                         "folder (or pip install fastapi uvicorn)") from None
    if args.token is not None and not args.token.strip():  # `--token "$TOKEN"` of an unset variable: the server
        # ran without a token, unsaid (a trial, session 46; an empty PAMSEGMENT_TOKEN is unset, as shells have it)
        raise InputError("--token is empty (an unset variable?): give the token, or no --token for a server on this "
                         "machine only")
    token = (args.token or os.environ.get("PAMSEGMENT_TOKEN") or "").strip() or None  # as clients send it
    if token is not None and not (token.isascii() and token.isprintable()):
        # an HTTP header carries such a token as other bytes (or not at all): no client could send it
        raise InputError("the token must be printable ASCII (letters, digits, punctuation): an HTTP header cannot "
                         "carry other characters, so no client could send it; choose another")
    with _operator_log():
        return _serve(args, token)


@contextlib.contextmanager
def _operator_log():
    """One line per job, refused request and end of job on stderr, for the operator, while ``serve``
    runs; taken off after it, so a run inside another program (its tests, a notebook) leaves the
    logger as it was (the handler wrote to the stderr of that moment: a later line went into a
    closed stream, or into what a later test captured). A logger set up by the caller is left alone."""
    if logger.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _serve(args, token) -> int:
    import uvicorn  # (cmd_serve has checked that it is installed)

    if not is_loopback(args.host) and not token:
        raise InputError(f"listening on {args.host} exposes the server beyond this machine: set a token with "
                         "--token or PAMSEGMENT_TOKEN (clients send it as Authorization: Bearer TOKEN)")
    from .baselines import get_predictor
    from .checkpoints import check_checkpoint_file, load_model

    if args.checkpoint:  # a missing file: one line before anything is bound
        check_checkpoint_file(args.checkpoint)
    sock = _listen_socket(args.host, args.port)  # before the model: a busy port is found at once
    try:  # closed also when the model does not load
        model = load_model(args.checkpoint, device=args.device)  # fail now, not at the first job
        if args.walk is not None:
            from dataclasses import replace

            model.inference = replace(model.inference, published_scheme=args.walk == "published")
        if args.threads:  # for the server's life: the network's and the registrations' threads
            import SimpleITK as sitk
            import torch

            torch.set_num_threads(args.threads)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

        def factory(method: str):
            return model if method == "pam" else get_predictor(method)

        from .checkpoints import settings_digest

        info = {"sha256": getattr(model, "sha256", ""), "device": args.device,
                "checkpoint": _public_checkpoint_label(_checkpoint_label(args.checkpoint)),
                "walk": "published" if model.inference.published_scheme else "engine",
                "settings": settings_digest(model) or ""}  # (with the sha256: what a batch's report names)
        app = create_app(factory, token=token, max_upload_mb=args.max_upload_mb, max_voxels=args.max_voxels,
                         max_jobs=args.max_jobs, model_info=info, batch_size=args.batch_size,
                         local_names=None if token else (args.host,))  # without a token: this machine's names only
        where = ("; listening on every network, so clients may also use this machine's IP address"
                 if args.host in WILDCARD_HOSTS else "")
        weights = _checkpoint_label(args.checkpoint)  # (its whole path here: /info gives clients the name only)
        line = f"pamsegment server on {_address(args.host, args.port)} ({weights}{where}); Ctrl-C stops it"

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:  # listening: the address printed now answers
                    print(line, flush=True)

            async def shutdown(self, sockets=None):
                open_requests = len(getattr(self.server_state, "connections", ()))
                if open_requests:  # e.g. a client's upload that stalled: it gets SHUTDOWN_GRACE seconds
                    print(f"stopping: {open_requests} open connection{'' if open_requests == 1 else 's'} (uploads, "
                          f"status requests) get up to {SHUTDOWN_GRACE:.0f} s to finish", flush=True)
                    # what is cut off then is said in one line, not as uvicorn's tracebacks of the cancelled request
                    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
                await super().shutdown(sockets=sockets)
                left = len(getattr(self.server_state, "connections", ()))
                if open_requests and left:
                    print(f"closed {left} connection{'' if left == 1 else 's'} that did not finish", flush=True)

        class Terminated(Exception):
            """SIGTERM (kill, systemctl stop, docker stop), after uvicorn's own graceful stop."""

        def terminated(signum, frame):
            raise Terminated

        protocol = header_timeout_protocol()
        # proxy_headers off: uvicorn would otherwise log the address a request's X-Forwarded-For claims
        # when it comes from 127.0.0.1, which every SSH-tunnel user's does
        # lifespan off: the app has no start-up or shutdown handlers, and a second Ctrl-C while uvicorn
        # stopped cancelled its lifespan task, which starlette logged as a traceback (a review, session 44)
        server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE,
                                       proxy_headers=False, lifespan="off",
                                       **({"http": protocol} if protocol else {})))
        # uvicorn stops gracefully on SIGTERM too, then raises it again under the handler found before
        # it ran: this one, so that the running job is cancelled and the stop said, as for Ctrl-C.
        previous_term = (signal.signal(signal.SIGTERM, terminated)
                         if threading.current_thread() is threading.main_thread() else None)
        try:
            server.run(sockets=[sock])
        except (KeyboardInterrupt, Terminated):  # uvicorn stops on the first Ctrl-C, then passes it on
            pass
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            left_running = _stop_queue(app.state.queue)
    finally:
        sock.close()
    print("pamsegment server stopped", flush=True)
    if left_running:
        _end_under_running_job(args)
    return 0
