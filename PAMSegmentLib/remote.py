"""Client of ``pamsegment serve``: propagate on another machine, with progress and cancel.

Standard library only (urllib), so it runs in Slicer's Python and without torch::

    from PAMSegmentLib.remote import RemoteModel
    server = RemoteModel("http://gpu-box:8765", token="...")
    result = server.propagate(image, prompt, spacing, progress=print)

``propagate`` takes the engine's arguments and returns a ``PropagationResult`` with the mask,
axis, per-slice confidence, slice ranges, keyframes, walk stops and timings. An update
(``previous=``) is run on the server as a fresh propagation: the result is the same (the local
update is exact), only the server predicts every slice again.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from .errors import InputError, PAMError, PropagationCancelled
from .propagate import PropagationResult

# What a `pamsegment serve` server runs (its /info lists them too).
SERVER_METHODS = ("pam", "track", "copy")

__all__ = ["RemoteModel", "ServerBusy", "ServerChanged", "ServerUnreachable", "decode_result"]


def job_failure(status: dict) -> PAMError:
    """The error of a job the server failed: InputError where it refused these inputs, PAMError
    where the failure is the server's own (its checkpoint, memory, a fault: the same for every job;
    Slicer's "Propagate all drawn" stops on it). A server that does not say ("failure", since
    session 42) is read from its message."""
    failure = status.get("failure")
    if failure not in ("input", "error", "internal"):
        failure = "internal" if str(status.get("message", "")).startswith("internal error:") else "input"
    return (InputError if failure == "input" else PAMError)(f"the server could not propagate: {status['message']}")


class _Unreachable(PAMError):
    """No answer from the server (refused, reset, timed out)."""


ServerUnreachable = _Unreachable  # public name: a batch stops on it (every later case would fail too)


class ServerChanged(PAMError):
    """The server a batch runs on now runs another model than when the batch started: the batch stops
    (its report names every output with the model it saw first)."""


class ServerBusy(PAMError):
    """The server's queue is full (``RemoteModel(wait_when_busy=0)``, or still full after that long)."""


RETRY_SECONDS = 30.0  # a job's status and result are asked again this long when the network drops
RETRY_CODES = (502, 503, 504)  # a proxy's "cannot reach the server now": asked again too


class _Answered(PAMError):
    """The server answered with an HTTP error ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Redirected(Exception):
    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect with the request's headers, the token among them, to wherever it
    points (another host too): not followed here, the client says where it pointed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(newurl)


_OPENER = urllib.request.build_opener(_NoRedirects)


def _base_of(url: str, path: str) -> str:
    """The server address a redirect of the request for ``path`` (/info, /jobs?...) points to: the
    redirect's URL without that request's path and query (giving the whole URL asked for
    /info/info)."""
    parts = urllib.parse.urlsplit(url)
    asked = urllib.parse.urlsplit(path).path.rstrip("/")
    here = parts.path.rstrip("/")  # (a redirect to .../info/ as well)
    base = here[: -len(asked)] if asked and here.endswith(asked) else here
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, base.rstrip("/"), "", ""))
UPLOAD_PIECE_BYTES = 1 << 20


def _pieces(view: memoryview, cancel):
    """``view`` in UPLOAD_PIECE_BYTES pieces; PropagationCancelled before a piece once ``cancel`` is
    set (the connection is then closed mid-upload: the server makes no job of it)."""
    view = view.cast("B")
    for start in range(0, view.nbytes, UPLOAD_PIECE_BYTES):
        if cancel.is_cancelled:
            raise PropagationCancelled("cancelled")
        yield view[start:start + UPLOAD_PIECE_BYTES]


DELETE_AFTER_CANCEL_SECONDS = 3.0  # how long a Cancel waits for the server to take its job's deletion


class _Watch:
    """What a request looks at to stop: the caller's CancelToken (None: only Ctrl-C) or a Ctrl-C
    (``interrupt``) that came while the request's answer was awaited."""

    def __init__(self, cancel=None):
        self.cancel, self._interrupted = cancel, threading.Event()

    def interrupt(self) -> None:
        self._interrupted.set()

    @property
    def is_cancelled(self) -> bool:
        return self._interrupted.is_set() or (self.cancel is not None and self.cancel.is_cancelled)


def _job_id_ok(job_id) -> bool:
    """A job id as `pamsegment serve` makes them (hex): it goes into request paths."""
    return isinstance(job_id, str) and 0 < len(job_id) <= 64 and job_id.isascii() and job_id.isalnum()


def _cancellable(ask, cancel: _Watch, on_late=None):
    """``ask()`` on a helper thread, waited for while ``cancel`` is not set: PropagationCancelled at
    once when it is (a server that accepts the connection but never answers held Cancel for the
    whole 60 s timeout); the helper ends on its own when the request does. An answer that comes
    after all is handed to ``on_late`` exactly once: by the helper, or here when it came just as
    Cancel was seen (decided under one lock)."""
    outcome, lock = {"given_up": False}, threading.Lock()
    # Waited on instead of Thread.join: a Ctrl-C inside join() can leave the thread marked as ended
    # while it still runs (CPython 3.11), and a later join() then returned at once.
    done = threading.Event()

    def run():
        try:
            value = ask()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            with lock:
                outcome["error"] = error
            done.set()
            return
        with lock:
            outcome["value"] = value
            late = outcome["given_up"]
        try:
            if late and on_late is not None:
                on_late(value)
        except Exception:  # noqa: BLE001 - best effort: nobody waits for it any more
            pass
        finally:
            done.set()

    def give_up() -> None:
        with lock:
            outcome["given_up"] = True
            arrived = "value" in outcome
        if arrived and on_late is not None:
            on_late(outcome["value"])  # it came just now: the helper will not hand it on

    helper = threading.Thread(target=run, name="pamsegment-request", daemon=True)
    helper.start()
    try:
        while not done.is_set():
            done.wait(0.1)
            if cancel.is_cancelled and not done.is_set():
                give_up()
                raise PropagationCancelled("cancelled")
    except BaseException as error:
        if isinstance(error, PropagationCancelled):
            raise
        # Ctrl-C (or SIGTERM) while the answer was awaited: an upload stops at its next piece; an
        # answer that comes within a few seconds is handed to ``on_late`` (the job it made is
        # deleted) before the process ends, which would take a helper thread down with it. A
        # second Ctrl-C ends the wait at once.
        cancel.interrupt()
        give_up()
        if not done.wait(DELETE_AFTER_CANCEL_SECONDS):  # the answer, and the helper deleting its job
            with lock:
                handed_on = "value" in outcome
            if handed_on and on_late is not None:
                done.wait(DELETE_AFTER_CANCEL_SECONDS)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _sleep(seconds: float, cancel=None) -> None:
    """Wait ``seconds``, looking at ``cancel`` every 0.1 s (PropagationCancelled once it is set)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cancel is not None and cancel.is_cancelled:
            raise PropagationCancelled("cancelled")
        time.sleep(min(0.1, seconds))


def _begin_state(value):
    """A label's begin state as the server sent it (servers before session 30 send none), read as
    untrusted: None, so that no later round reuses that label's walks, if it is not one."""
    from .checks import state_from_json  # noqa: PLC0415

    try:
        return state_from_json(value)
    except ValueError:
        return None


JOB_STATES = ("queued", "running", "finished", "failed", "cancelled")  # what GET /jobs/{id} answers


def _slice_numbers(values, n: int) -> list[int]:
    """Slice numbers from a server's answer (untrusted): a list of whole numbers from 0 to ``n - 1``
    (a string "12" was read as slices 1 and 2, -7 and 99999 were named in notes); ValueError else."""
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n
                                               for v in values):
        raise ValueError(f"slice numbers {str(values)[:60]} are not whole numbers from 0 to {n - 1}")
    return [int(v) for v in values]


def _check_unpacked_size(payload: bytes, max_bytes: int) -> None:
    """A server's answer is a compressed .npz: what it unpacks to is bounded before any of it is
    read (a small answer from a wrong or hostile server could otherwise unpack to gigabytes)."""
    import zipfile  # noqa: PLC0415

    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise PAMError(f"the server's answer is not a PAMSegment result ({error})") from None
    if total > max_bytes:
        raise PAMError(f"the server's answer unpacks to {total / 2**20:.0f} MB, more than a result of this volume "
                       f"takes (at most {max_bytes / 2**20:.0f} MB): it is not a PAMSegment result")


def decode_result(payload: bytes, max_bytes: int | None = None) -> PropagationResult:
    """The ``PropagationResult`` in a server's answer (``encode_result``); ``max_bytes``: the most
    its arrays may unpack to (a bound from the volume sent), checked first."""
    if max_bytes is not None:
        _check_unpacked_size(payload, max_bytes)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            mask = z["mask"]
            confidence = {int(lab): z[f"confidence_{lab}"] for lab in meta["labels"]}
            agreement = {int(lab): z[f"agreement_{lab}"] for lab in meta["labels"] if f"agreement_{lab}" in z.files}
            keyframes = {int(lab): {int(k): z[f"keyframe_{lab}_{k}"] for k in ks}
                         for lab, ks in meta.get("keyframes", {}).items()}
            # (servers before session 25 send neither)
            n_along = int(mask.shape[int(meta["axis"])]) if mask.ndim == 3 and int(meta["axis"]) in (0, 1, 2) else 0
            gaps = {int(lab): _slice_numbers(v, n_along) for lab, v in meta.get("gaps", {}).items()}
            thin = {int(lab): _slice_numbers(v, n_along)  # (since session 31)
                    for lab, v in meta.get("thin", {}).items()}
            cut = {int(lab): (_slice_numbers(v[0], n_along), [int(o) for o in v[1]])  # (servers since session 30)
                   for lab, v in meta.get("cut", {}).items()}
            lost = {int(lab): ({int(o): int(n) for o, n in by.items()}, int(own))
                    for lab, (by, own) in meta.get("lost", {}).items()}
            disagree = meta.get("disagree", {})  # (servers since session 48; checked with the drawn slices below)
            # servers before session 28 do not send it: every slice along the axis counts as recomputed
            # then (a server always runs from scratch), so no review mark outlives a change
            recomputed = ({int(lab): [(int(a), int(b)) for a, b in v] for lab, v in meta["recomputed"].items()}
                          if "recomputed" in meta else
                          {int(lab): [(0, int(mask.shape[int(meta["axis"])]) - 1)] for lab in meta["labels"]})
            begin_state = {int(lab): _begin_state(v) for lab, v in meta.get("begin_state", {}).items()}
        if int(meta["axis"]) not in (0, 1, 2):
            raise ValueError(f"axis {meta['axis']!r}")
        # checked as the rest (a trial, session 46: a malformed one raised in the summary, after OUT was written,
        # and slices 0-1000000000 were printed and recorded)
        from .propagate import _stops_from_json  # noqa: PLC0415

        slice_range = {}
        for k, v in meta["slice_range"].items():
            first, last = _slice_numbers(v, n_along)  # (a ValueError unless two)
            if first > last:
                raise ValueError(f"slice range {v} is reversed")
            slice_range[int(k)] = (first, last)
        prompt_slices = {int(k): _slice_numbers(v, n_along) for k, v in meta["prompt_slices"].items()}
        from .propagate import disagree_from_json  # noqa: PLC0415

        if not isinstance(disagree, dict):
            raise ValueError("its keyframe disagreement is not a mapping")
        disagree = {int(lab): disagree_from_json(v, prompt_slices.get(int(lab), []), "keyframe disagreement")
                    for lab, v in disagree.items()}
        timings = meta["timings"]
        if not (isinstance(timings, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in timings.values())):
            raise ValueError("its timings are not numbers of seconds")
        return PropagationResult(
            mask=mask, axis=int(meta["axis"]), confidence=confidence, slice_range=slice_range,
            prompt_slices=prompt_slices,
            timings={str(k): float(v) for k, v in timings.items()}, n_predicted=int(meta["n_predicted"]),
            range=tuple(meta["range"]) if meta.get("range") else None, early_stop=bool(meta["early_stop"]),
            stops={int(k): _stops_from_json(v, n_along, int(k)) for k, v in meta["stops"].items()},
            keyframes=keyframes, agreement=agreement,
            remove_disconnected=bool(meta["remove_disconnected"]), gaps=gaps, thin=thin, lost=lost,
            recomputed=recomputed,
            begin_state=begin_state, cut=cut, disagree=disagree,
            # servers before session 30 send neither this nor the begin state, so nothing is reused
            overlapped=frozenset(int(lab) for lab in meta.get("overlapped", [])),
            outward_wall_test=meta.get("outward_wall_test") is True,  # servers before session 32: False
            presence_by="network" if meta.get("presence_by") == "network" else "",
        )
    except (ValueError, KeyError, OSError, TypeError, AttributeError, IndexError, OverflowError) as error:
        # (OverflowError: int() of a JSON Infinity; a traceback before, a re-review of session 31)
        raise PAMError(f"the server's answer is not a PAMSegment result ({error})") from None


def _compact(image: np.ndarray) -> np.ndarray:
    """A float image whose voxels are all whole numbers within int16 (a CT in HU, most MR as
    Slicer hands them over) as int16: half the upload, the same values; any other float64 image
    as float32, the type the engine computes in (Slicer's job keeps a volume in its own type since
    session 33: a float64 volume was twice the upload, over the server's limit sooner)."""
    if image.dtype.kind == "f" and image.size:
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        # whole numbers, checked a slice at a time (a rounded copy of a float64 volume and its
        # comparison were 9 bytes a voxel on top of the image, session 34)
        if -32768 <= lo and hi <= 32767 and all(np.array_equal(part, np.round(part)) for part in image):
            return image.astype(np.int16)
        if image.dtype.itemsize > 4:
            return image.astype(np.float32)
    return image


class RemoteModel:
    """A ``pamsegment serve`` server at ``url``."""

    runs_remotely = True  # propagate() checks the inputs, then hands the whole job to ``propagate`` here

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, poll_interval: float = 0.3,
                 method: str = "pam", wait_when_busy: float = 0.0, busy_interval: float = 5.0,
                 intensity_gate: str | None = None):
        """``wait_when_busy``: for this many seconds a full queue is waited out (asked again every
        ``busy_interval`` seconds, said in the progress) instead of raising ServerBusy at once:
        a batch shares the server with other users. ``intensity_gate`` (method pam): the drift test
        for the jobs, "off", "on", "prompt", "guide" or "both" (None: the server's setting)."""
        if intensity_gate not in (None, "off", "on", "prompt", "guide", "both"):
            raise InputError(f"intensity_gate must be off, on, prompt, guide or both, got {intensity_gate!r}")
        self.intensity_gate = intensity_gate
        # a server from before per-job drift tests refuses the option: an error if the user asked for it
        # (--intensity-gate), left out with a word where it is only a front end's setting (Slicer's checkbox)
        self.gate_required = True
        url = str(url).strip()  # (a pasted address's trailing space or line break is no part of it)
        try:
            parsed = urllib.parse.urlparse(url)
        except ValueError:  # "Invalid IPv6 URL": a bracket not closed (a traceback before)
            raise InputError(f"server address {url!r} is not a valid URL (an IPv6 address goes in square brackets, "
                             "both of them: http://[::1]:8765)") from None
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InputError(f"server address {url!r} is not an http(s) URL (e.g. http://gpu-box:8765)")
        if "@" in parsed.netloc:  # user:password@: urllib tried to reach a host named so; never echoed
            shown = urllib.parse.urlunparse(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[1]))
            raise InputError(f"the server address holds a user name or password before '@'; give it as {shown} and "
                             "the token with --token or PAMSEGMENT_TOKEN (Slicer: the token field)")
        try:  # (a port beyond 65535, or not a number, was "Connection refused ... is serve running?")
            port_ok = parsed.port != 0
        except ValueError:
            port_ok = False
        if not port_ok and parsed.netloc.count(":") > 1 and "[" not in parsed.netloc:
            raise InputError(f"server address {url!r}: an IPv6 address goes in square brackets, e.g. "
                             "http://[::1]:8765")
        if not port_ok:
            port = parsed.netloc.rsplit(":", 1)[-1]
            raise InputError(f"server address {url!r} has the port {port!r}, which no server can listen on (ports are "
                             "1-65535; `pamsegment serve` prints its address when it starts, e.g. "
                             "http://gpu-box:8765)")
        self.url = url.rstrip("/")
        # Surrounding white space is no part of a token (a token file saved on Windows ends in "\r\n",
        # which made urllib raise with the token in its message).
        token = str(token).strip() if token is not None else None
        if token and any(ord(c) < 32 or ord(c) == 127 for c in token):
            raise InputError("the token holds control characters (a line break inside it?); give it on one line")
        self.token, self.timeout, self.poll_interval, self.method = token, float(timeout), float(poll_interval), method
        self.wait_when_busy, self.busy_interval = float(wait_when_busy), float(busy_interval)
        # the server's model as a batch first saw it (its /info "model": sha256, settings, walk), or None: a job
        # is refused once the server there runs another (restarted otherwise behind one address), since the
        # batch's report names every output with the model it saw first
        self.expect_model: dict | None = None

    def _request(self, method: str, path: str, body: bytes | memoryview | None = None, cancel=None,
                 on_late=None, timeout: float | None = None) -> bytes:
        """``cancel``: an upload is sent in pieces, looking at it between them (PropagationCancelled),
        so that Cancel does not wait for a large volume to finish uploading over a slow link, and the
        answer is waited for while Cancel is looked at (``_cancellable``); ``on_late(answer)`` is
        called with an answer that came after Cancel (a job made meanwhile is deleted so)."""
        # An upload whose answer makes a job (``on_late``) is always sent and awaited on a helper
        # thread, so that a Ctrl-C while the server reads it still deletes the job it made.
        watch = _Watch(cancel) if cancel is not None or on_late is not None else None
        data = body if body is None or watch is None else _pieces(memoryview(body), watch)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not body:
            req.add_header("Content-Length", str(memoryview(body).nbytes))
        if self.token:
            try:
                str(self.token).encode("latin-1")
            except UnicodeEncodeError:
                raise InputError("the token holds characters HTTP headers cannot carry; use letters, digits and "
                                 "punctuation") from None
            req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")

        def ask() -> bytes:
            with _OPENER.open(req, timeout=timeout or self.timeout) as resp:  # http(s) checked above
                return resp.read()

        try:
            return ask() if watch is None else _cancellable(ask, watch, on_late)
        except _Redirected as redirect:
            raise InputError(f"the server at {self.url} redirects to {_base_of(redirect.url, path)}: give that address "
                             "instead (a redirect is not followed, so that the token goes only to the address "
                             "given)") from None
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read().decode()).get("detail", "")
            except (ValueError, AttributeError):
                detail = ""
            if error.code == 400:
                raise InputError(str(detail) or "the server refused the input") from None
            if error.code == 401:
                if self.token:
                    raise PAMError(f"the server at {self.url} refused the token given; check --token or "
                                   "PAMSEGMENT_TOKEN (in Slicer, the Token field)") from None
                raise PAMError(f"the server at {self.url} needs a token: give it with --token T or PAMSEGMENT_TOKEN "
                               "(in Slicer, the Token field)") from None
            raise _Answered(f"the server at {self.url} answered {error.code}: {detail or error.reason}",
                            error.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # IncompleteRead: a cut download
            reason = getattr(error, "reason", error)
            # (OpenSSL 3.2 and later say "record layer failure"; a re-review, session 36)
            if self.url.startswith("https:") and any(t in str(reason).upper() for t in (
                    "WRONG_VERSION_NUMBER", "RECORD LAYER FAILURE", "RECORD_LAYER_FAILURE", "UNKNOWN PROTOCOL")):
                # TLS spoken to a plain-HTTP server: it runs, the scheme is wrong (a trial, session 36)
                raise _Unreachable(f"the server at {self.url} does not speak HTTPS ({reason}): `pamsegment serve` "
                                   f"answers plain HTTP, so use {'http:' + self.url[len('https:'):]} (or put an "
                                   "HTTPS proxy in front of it)") from None
            if isinstance(error, TimeoutError):  # (urllib wraps a timeout while connecting or sending in URLError)
                # the request went out whole and the answer did not come: the server is there but stuck or
                # overloaded ("cannot reach ... is it running?" was said; a trial, session 46)
                raise _Unreachable(f"the PAMSegment server at {self.url} took the request but did not answer within "
                                   f"{timeout or self.timeout:g} s (timed out): it is busy or stuck; try again later, "
                                   "or ask its operator to look at its log") from None
            raise _Unreachable(f"cannot reach the PAMSegment server at {self.url} ({reason}); is `pamsegment serve` "
                               "running there?") from None

    def _get_retrying(self, path: str, cancel=None, seconds: float = RETRY_SECONDS) -> bytes:
        """GET ``path``, asking again for up to ``seconds`` while the server cannot be reached (a
        network blip lost the whole job before, which the server then ran for nobody) or a proxy in
        front of it answers that it cannot reach it now (502, 503, 504)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self._request("GET", path, cancel=cancel)
            except (_Unreachable, _Answered) as error:
                if isinstance(error, _Answered) and error.code not in RETRY_CODES:
                    raise
                if time.monotonic() >= deadline:
                    raise type(error)(f"{error} (asked again until {seconds:.0f} s had passed)",
                                      *([error.code] if isinstance(error, _Answered) else [])) from None
            _sleep(1.0, cancel)

    def _without_gate(self, options: dict, progress) -> None:
        """A server from before per-job drift tests: InputError if the user asked for one
        (--intensity-gate), else (Slicer's checkbox) the option left out, said in the progress."""
        if self.gate_required:
            raise InputError(f"the server at {self.url} is older than this client: it cannot set the drift test per "
                             "job; update PAMSegment there, or leave --intensity-gate out (the server's own setting "
                             "is used)")
        del options["intensity_gate"]
        if progress is not None:
            progress(0.0, "server: an older server, which keeps its own drift-test setting")

    def _lost_while_running(self, ask):
        """``ask()``, its "cannot reach ... is `pamsegment serve` running there?" said as what it is
        once the server has taken the job: it stopped (or the network failed) while the job ran."""
        try:
            return ask()
        except _Unreachable as error:
            reason = str(error).split(" (", 1)[-1].split(")", 1)[0] if " (" in str(error) else str(error)
            raise _Unreachable(f"lost the PAMSegment server at {self.url} while it had the job ({reason}, asked "
                               f"again for {RETRY_SECONDS:.0f} s): it stopped or the network failed; nothing was "
                               "written, run again once it is back") from None

    def _wait_busy(self, until: float, why: str, progress, cancel) -> None:
        """The queue is full: ServerBusy once ``until`` has passed, else a wait of ``busy_interval``
        seconds (cancellable), said in the progress."""
        if time.monotonic() >= until:
            waited = f" for {self.wait_when_busy:.0f} s" if self.wait_when_busy > 0 else ""
            raise ServerBusy(f"the server at {self.url} has {why}{' still' if waited else ''}; try again later"
                             + (f" (waited{waited})" if waited else ""))
        if progress is not None:
            progress(0.0, f"server: busy, {why}; asking again in {self.busy_interval:.0f} s")
        _sleep(self.busy_interval, cancel)

    def _json(self, payload: bytes, keys: tuple = ()) -> dict:
        """A JSON answer holding ``keys``; anything else means this is not a PAMSegment server."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise self._not_a_server()
        return data

    def _not_a_server(self) -> PAMError:
        return PAMError(f"{self.url} answered, but not as a PAMSegment server does; check the address (as "
                        "`pamsegment serve` prints it)")

    def _delete_job(self, job_id: str, timeout: float | None = None) -> None:
        """Ask the server to forget the job; ``timeout``: seconds to wait for its answer (after a
        Cancel a few, on the caller's thread: a helper thread would die with a process that ends
        right after, and the server would run the job for nobody)."""
        try:
            self._request("DELETE", f"/jobs/{job_id}", timeout=timeout)
        except (PAMError, OSError):
            pass  # the server may be gone (or the job already over); nothing local to undo

    def _delete_late_job(self, answer: bytes) -> None:
        """The answer to an upload that came after Cancel: the job it made is deleted (it held a place
        in the queue and the server's GPU for nobody)."""
        try:
            job_id = json.loads(answer)["id"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return
        if _job_id_ok(job_id):
            self._delete_job(job_id, timeout=min(self.timeout, DELETE_AFTER_CANCEL_SECONDS))

    def _check_same_model(self, info: dict) -> None:
        """PAMError where the server's model (``info``'s weights sha256, settings digest and walk) is not
        the one ``expect_model`` holds (a review, session 44: a server restarted with another walk
        behind the same address made a batch's later rows otherwise than its report said)."""
        if self.expect_model is None:
            return
        now = info.get("model") if isinstance(info.get("model"), dict) else {}
        keys = ("sha256", "settings", "walk")
        if any(now.get(k) != self.expect_model.get(k) for k in keys):
            def shown(m):
                return ", ".join(f"{k} {str(m.get(k))[:16]}" for k in keys if m.get(k) is not None) or "unknown"
            raise ServerChanged(f"the server at {self.url} now runs another model ({shown(now)}) than when this batch "
                           f"started ({shown(self.expect_model)}): restarted otherwise? Run the batch again "
                           "(--skip-existing keeps what is done)")

    def info(self, cancel=None) -> dict:
        """The server's version, model and limits (``GET /info``); ``cancel``: PropagationCancelled
        as soon as it is set, not once a server that does not answer has timed out."""
        try:
            payload = self._request("GET", "/info", cancel=cancel)
        except _Answered as error:
            if error.code in (404, 405):  # no /info there: another server, or a path after the address
                raise self._not_a_server() from None
            raise
        data = self._json(payload, ("server", "version"))
        if data.get("server") != "pamsegment":
            raise PAMError(f"{self.url} is not a PAMSegment server; check the address")
        return data

    def propagate(self, image, prompt, spacing, model=None, *, axis=None, labels=None, range=None,  # noqa: A002
                  early_stop=True, remove_disconnected=None, empty_slices=None, progress=None, cancel=None,
                  previous=None, update=None, **local_only) -> PropagationResult:
        """Run ``propagate`` on the server (the engine's arguments; device, threads and batch size
        are the server's: given here they are not used). Raises InputError for input the server
        refuses or an argument ``propagate`` does not take, PropagationCancelled when ``cancel`` is
        set (the server's job is cancelled too), PAMError when it fails."""
        checked = local_only.pop("_checked", False)  # by the engine's propagate(), which hands its work here
        if empty_slices is not None:  # read more than once here (the upload, then annotate_update): a generator once
            empty_slices = ({k: list(v) for k, v in empty_slices.items()} if isinstance(empty_slices, dict)
                            else list(empty_slices))
        unknown = sorted(set(local_only) - {"device", "threads", "batch_size"})
        if unknown:  # a typo (early_stopping=False) would otherwise be dropped without a word
            raise InputError(f"propagate() got an unexpected argument {unknown[0]!r}")
        if not checked:  # called directly (the module's example): the engine's checks, here, before the upload
            from .propagate import _validate_inputs, _validate_options, check_request  # noqa: PLC0415

            spacing = _validate_inputs(np.asarray(image), np.asarray(prompt), spacing)
            axis, labels, range = _validate_options(  # noqa: A001
                axis, labels, range, local_only.get("batch_size", 16), local_only.get("threads"), cancel, previous,
                progress, early_stop, remove_disconnected, update)
            check_request(np.asarray(prompt), axis, labels, range, empty_slices,
                          bool(update) if update is not None else previous is not None)  # as the engine
        options = {"axis": axis, "labels": None if labels is None else [int(v) for v in labels],
                   "range": None if range is None else [int(v) for v in range], "early_stop": bool(early_stop),
                   "remove_disconnected": remove_disconnected, "method": self.method,
                   # an update runs as a fresh propagation there, of a prompt that is an edited result
                   "update": True if previous is not None or update else None,
                   "intensity_gate": self.intensity_gate}
        if empty_slices is not None:
            options["empty_slices"] = ({str(k): [int(s) for s in v] for k, v in empty_slices.items()}
                                       if isinstance(empty_slices, dict) else [int(s) for s in empty_slices])
        options = {k: v for k, v in options.items() if v is not None}
        # Ask first: a wrong token, another kind of server or an upload over the limits is then one
        # clear message (a server refusing a large upload early looks like a broken connection).
        busy_until = time.monotonic() + self.wait_when_busy
        while True:
            limits = self.info(cancel)
            self._check_same_model(limits)
            queued, max_jobs = limits.get("queued"), limits.get("max_jobs")  # (servers before session 25 send neither)
            if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (queued, max_jobs))
                    and queued >= max_jobs):
                break
            self._wait_busy(busy_until, f"{queued} job{'' if queued == 1 else 's'} waiting already (it queues at "
                                        f"most {max_jobs})", progress, cancel)
        listed = limits.get("options")  # servers before the list may or may not take the option: asked below
        if "intensity_gate" in options and isinstance(listed, list) and "intensity_gate" not in listed:
            self._without_gate(options, progress)
        voxels, max_voxels = math.prod(np.shape(image)), limits.get("max_voxels")
        if isinstance(max_voxels, int) and not isinstance(max_voxels, bool) and voxels > max_voxels:
            raise InputError(f"the volume has {voxels:,} voxels; the server at {self.url} takes at most {max_voxels:,} "
                             "(crop the volume around the object)")
        buf = io.BytesIO()
        np.savez(buf, image=_compact(np.asarray(image)), prompt=np.asarray(prompt),
                 spacing=np.asarray([float(s) for s in spacing], dtype=np.float64))
        size_mb = buf.getbuffer().nbytes / 2**20
        if isinstance(limits.get("max_upload_mb"), (int, float)) and size_mb > limits["max_upload_mb"]:
            # rounded up: "1.0 MB ... at most 1 MB" would not say what is wrong
            raise InputError(f"the volume and prompt are {math.ceil(size_mb * 10) / 10:.1f} MB; the server at "
                             f"{self.url} takes at most {limits['max_upload_mb']:g} MB (crop the volume around the "
                             "object)")
        while True:
            query = urllib.parse.urlencode({"options": json.dumps(options)})
            try:  # getbuffer: the upload is sent from the buffer, not from a second full copy (getvalue)
                job_id = self._json(self._request("POST", f"/jobs?{query}", buf.getbuffer(), cancel=cancel,
                                                  on_late=self._delete_late_job), ("id",))["id"]
                if not _job_id_ok(job_id):  # it goes into the paths asked next ("../info", "J1?x=1")
                    raise self._not_a_server()
                break
            except InputError as error:  # a server from before per-job drift tests, which lists no options
                if "intensity_gate" not in options or "unknown option 'intensity_gate'" not in str(error):
                    raise
                self._without_gate(options, progress)
            except _Answered as error:  # filled up since /info was asked
                if error.code != 503 or "waiting already" not in str(error):
                    raise
                detail = str(error).split(": ", 1)[-1].split(";")[0]  # "2 jobs are waiting already"
                self._wait_busy(busy_until, f"a full queue ({detail})", progress, cancel)
            except _Unreachable:  # a server refusing a large upload early (its queue filled since /info) resets it
                try:
                    now = self.info(cancel)
                except PAMError:
                    now = {}
                queued, max_jobs = now.get("queued"), now.get("max_jobs")
                if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (queued, max_jobs))
                        and queued >= max_jobs):
                    raise
                self._wait_busy(busy_until, f"a full queue ({queued} jobs waiting already)", progress, cancel)
        interrupted = False
        try:
            while True:
                if cancel is not None and cancel.is_cancelled:
                    raise PropagationCancelled("cancelled")
                status = self._json(self._lost_while_running(lambda: self._get_retrying(f"/jobs/{job_id}", cancel)),
                                    ("state", "progress", "message"))
                state, done = status["state"], status["progress"]
                # a state this client does not know (it polled for ever) or a progress that is no fraction (a
                # traceback from the bar): no answer of a PAMSegment server (a trial, session 46)
                if state not in JOB_STATES or isinstance(done, bool) or not isinstance(done, (int, float)) \
                        or not 0.0 <= done <= 1.0:
                    raise self._not_a_server()
                if progress is not None:
                    where = f" (queue position {status['queue_position']})" if status.get("queue_position") else ""
                    progress(float(done), f"server: {status['message']}{where}")
                if state == "finished":
                    break
                if state == "failed":
                    raise job_failure(status)
                if state == "cancelled":  # not by this client (its cancel deletes the job): the server stopped it
                    raise PAMError(f"the server cancelled the job ({status['message']}); run it again")
                time.sleep(self.poll_interval)
            # the mask (at most 8 bytes a voxel), a slice (1 byte a voxel) per label and drawn or empty
            # slice (at most every slice of every label) and per-slice figures, plus 64 MB
            n_labels = len(labels) if labels is not None else int(np.count_nonzero(np.unique(prompt)))
            bound = (9 + n_labels) * int(np.prod(np.shape(image))) + 2**26
            result = decode_result(self._lost_while_running(lambda: self._get_retrying(f"/jobs/{job_id}/result",
                                                                                       cancel)), max_bytes=bound)
        except BaseException as error:  # Ctrl-C or SIGTERM too: the job is deleted on the way out, briefly
            interrupted = not isinstance(error, Exception)
            raise
        finally:  # downloaded, cancelled, Ctrl-C or failed: the server need not keep the job any more
            # a silent server held Cancel 60 s, and Ctrl-C as long
            cancelled = interrupted or (cancel is not None and cancel.is_cancelled)
            self._delete_job(job_id, timeout=min(self.timeout, DELETE_AFTER_CANCEL_SECONDS) if cancelled else None)
        if tuple(result.mask.shape) != tuple(np.shape(image)):
            raise PAMError(f"the server returned a {result.mask.shape} mask for a {np.shape(image)} image")
        # Which image the result is of, as a local run records it: a later update (previous=) reuses
        # its walks only on that image (without it, a server's result was reused on any image).
        from .propagate import flat_levels, image_digest  # noqa: PLC0415

        result.image_digest = image_digest(np.asarray(image), spacing)
        result.image_levels = flat_levels(np.asarray(image))  # the label-map note, as a local run says it
        if previous is not None:  # the server ran a fresh propagation: what an update says, worked out here
            from .propagate import annotate_update  # noqa: PLC0415

            annotate_update(result, previous, np.asarray(prompt), empty_slices)
        return result
