"""Test doubles for the propagation engine."""

from __future__ import annotations

import numpy as np

from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor


class OracleModel(SlicePredictor):
    """Returns the true mask of each query slice (axis 0 of the volume the engine walks).

    ``truth`` is given in the engine's walking order (propagation axis first). Records every
    call so tests can check what was predicted and with which guide.
    """

    def __init__(self, truth: np.ndarray, window: int = 4, presence: bool = False):
        self.truth = truth.astype(bool)
        self.window_mm, self.max_window, self.min_window = float(window), window, 1
        self.with_presence = presence
        self.calls: list[tuple[int, list[int]]] = []

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.calls.append((int(guide_index), [int(q) for q in query_indices]))
        prob = self.truth[list(query_indices)].astype(np.float32)
        presence = prob.reshape(len(prob), -1).max(axis=1) if self.with_presence else None
        return SlicePrediction(prob, presence)


class ShiftModel(SlicePredictor):
    """Predicts the guide's mask shifted by ``shift`` columns: a drifting, imperfect model."""

    def __init__(self, shift: int = 0, window: int = 4):
        self.shift = shift
        self.window_mm, self.max_window, self.min_window = float(window), window, 1

    def predict(self, volume, guide_index, guide_mask, query_indices):
        m = np.roll(guide_mask.astype(np.float32), self.shift, axis=1)
        return SlicePrediction(np.repeat(m[None], len(query_indices), axis=0))


class LeakModel(SlicePredictor):
    """Follows ``truth`` but leaks into ``neighbour`` (a look-alike region next to the object)
    when the query is ``leak_distance`` or more slices from its guide, or when the guide mask
    already covers part of the neighbour. Predicting a guide slice back from a leaked slice
    therefore returns the object *plus* the neighbour: what the engine's forward-backward check
    (``consistency_min_dice``) detects."""

    def __init__(self, truth: np.ndarray, neighbour: np.ndarray, leak_distance: int = 3, window: int = 4,
                 consistency_min_dice: float = 0.0):
        self.truth, self.neighbour = truth.astype(bool), neighbour.astype(bool)
        self.leak_distance = leak_distance
        self.window_mm, self.max_window, self.min_window = float(window), window, 1
        self.consistency_min_dice = consistency_min_dice
        self.calls: list[tuple[int, list[int]]] = []

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.calls.append((int(guide_index), [int(q) for q in query_indices]))
        touches = bool((guide_mask & self.neighbour[guide_index]).any())
        out = []
        for q in query_indices:
            m = self.truth[q].copy()
            if touches or abs(q - guide_index) >= self.leak_distance:
                m |= self.neighbour[q]
            out.append(m.astype(np.float32))
        return SlicePrediction(np.stack(out))


def record_ctrl_c_handler(monkeypatch, module) -> dict:
    """While a command runs: the SIGINT handler in force at each file move (key: the target path
    as a string) and at each line ``module`` prints (key: the line's first word, e.g. "wrote").
    What a test reads to show that files are moved in, and reported, with Ctrl-C ignored."""
    import builtins
    import os
    import signal

    handlers: dict = {}
    replace = os.replace

    def noting_move(src, dst):
        handlers[os.fspath(dst)] = signal.getsignal(signal.SIGINT)
        replace(src, dst)

    def noting_print(*args, **kwargs):
        handlers.setdefault(str(args[0]).split(" ")[0], signal.getsignal(signal.SIGINT))
        builtins.print(*args, **kwargs)

    monkeypatch.setattr(os, "replace", noting_move)
    monkeypatch.setattr(module, "print", noting_print, raising=False)
    return handlers


def local_http_server(handler, threaded: bool = True):
    """A stand-in HTTP server for ``handler`` on 127.0.0.1, served from a daemon thread; returns it.

    Its ``shutdown()`` also sets ``server.stopping`` (handlers that stand for a slow server wait on
    it, not on time.sleep, so they end with their test) and closes the socket. Errors a handler
    meets (a write to a client that has gone: the point of many of these tests) go to
    ``server.errors``, never to sys.stderr: socketserver prints them there from the handler's
    thread, which may be seconds later, into the output pytest is capturing for another test (CI
    failed so on test_review_s35, session 39).
    """
    import http.server
    import sys
    import threading

    base = http.server.ThreadingHTTPServer if threaded else http.server.HTTPServer

    class QuietServer(base):
        daemon_threads = True

        def __init__(self):
            self.errors: list[BaseException] = []
            self.stopping = threading.Event()
            super().__init__(("127.0.0.1", 0), handler)

        def handle_error(self, request, client_address):
            self.errors.append(sys.exc_info()[1])

        def shutdown(self):
            self.stopping.set()
            super().shutdown()
            self.server_close()

    server = QuietServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
