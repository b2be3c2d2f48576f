"""Checks of numbers the other modules share: the range check of untrusted numbers (checkpoint
headers, API options) and the bound on CPU threads."""

from __future__ import annotations

import math
import numbers
import os
import reprlib
import sys


def as_array(value, what: str, reader: str = "PAMSegmentLib.volumes.read_volume"):
    """``value`` as a numpy array for the Python API, or one InputError: a file path (``reader``
    reads files), None, or what numpy cannot convert (a torch tensor that requires grad or is
    bfloat16, a ragged list: torch's RuntimeError or numpy's ValueError reached the caller; a
    Python API trial, session 36)."""
    import numpy as np

    from .errors import InputError

    if isinstance(value, (str, os.PathLike)):
        raise InputError(f"the {what} is a file path ({os.fspath(value)!r}); pass an array: read the file with "
                         f"{reader}")
    if value is None:
        raise InputError(f"the {what} is None; pass an array")
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray) \
            and not isinstance(value[1], np.ndarray):  # what read_image_2d returns: (array, its SimpleITK image)
        raise InputError(f"the {what} is a pair (array, image), as read_image_2d returns it; pass its array, [0]")
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        text = " ".join(str(error).split())[:160]
        tensor = type(value).__module__.startswith("torch")
        raise InputError(f"the {what} cannot be read as a numpy array ({type(error).__name__}: {text}); pass a "
                         "numpy array" + (" (t.detach().cpu().float().numpy())" if tensor else "")) from None


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x, level):  # Python converts ints of over 4300 digits (its limit) to text only on request
        limit = (sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0) or 4300
        if x.bit_length() * 0.30103 > limit - 2:  # (limit 0, no limit: a million digits took 12 s to text)
            return f"<a {'negative ' if x < 0 else ''}number of about {x.bit_length() * 0.30103:.0f} digits>"
        return super().repr_int(x, level)


def shown(value, limit: int = 60) -> str:
    """``value`` for a message, at most ``limit`` characters: a client's 309-digit number, a 5 MB
    string or a nested list of a billion shared items in a checkpoint's header (built level by level,
    reprlib stops at 3 levels and 6 items each) would otherwise fill the message or never finish."""
    r = _ShortRepr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, limit, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 6
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - an object whose own repr fails: its type is what can be said
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def names_shown(keys, most: int = 5) -> str:
    """Mapping keys for a message: text as it is (cut at 80 characters), other keys by ``shown``."""
    return ", ".join(k[:80] if isinstance(k, str) else shown(k) for k in list(keys)[:most])


def is_number(value, lo: float, hi: float, whole: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool, not a string) within [lo, hi], finite, and a
    whole number if ``whole`` (an integral float such as 4.0 counts)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # (math.isfinite(10**400) overflows)
        return lo <= value <= hi
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            and lo <= value <= hi and (not whole or float(value).is_integer()))


def max_threads() -> int:
    """The most CPU threads a run may ask for: 4 per core, at least 64 (beyond the cores, threads
    only slow torch down; 100000 failed to start and crashed the process)."""
    return max(64, 4 * (os.cpu_count() or 1))


def is_flag(value) -> bool:
    """True, False, a numpy bool, or the whole numbers 0 and 1 (not text: bool("off") is True)."""
    import numpy as np  # here: parsing --threads imports this module and should stay quick

    return isinstance(value, (bool, np.bool_)) or is_number(value, 0, 1, whole=True)


def largest_gap(slice_lists) -> int:
    """The most slices between two neighbouring drawn slices of any one label (each item of
    ``slice_lists`` a label's drawn slices); 0 with fewer than two drawn."""
    return max((b - a - 1 for k in slice_lists for a, b in zip(sorted(k)[:-1], sorted(k)[1:])), default=0)


def slice_runs(slices) -> list[tuple[int, int]]:
    """Sorted slice numbers as runs of consecutive ones: ``[4, 5, 6, 9]`` -> ``[(4, 6), (9, 9)]``."""
    runs: list[tuple[int, int]] = []
    for s in slices:
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def runs_text(slices) -> str:
    """Slice numbers for a message, runs of three or more as ranges: ``[4, 5, 6, 9, 11, 12]`` ->
    ``"4-6, 9, 11, 12"``."""
    return ", ".join(f"{a}-{b}" if b - a > 1 else ", ".join(map(str, range(a, b + 1)))
                     for a, b in slice_runs(sorted(slices)))


def empty_between_drawn(bounds, drawn, occupied) -> list[int]:
    """The slices strictly between two neighbours in ``bounds`` (a label's keyframes and walls) that
    are both ``drawn`` (a wall between them is not) and not ``occupied`` by the result: where the
    walks from both sides found nothing, which the engine reports as gaps."""
    bounds, drawn, occupied = sorted(bounds), set(drawn), set(occupied)
    return [s for a, b in zip(bounds[:-1], bounds[1:]) if a in drawn and b in drawn
            for s in range(a + 1, b) if s not in occupied]


def check_flag(name: str, value, optional: bool = False) -> None:
    """InputError unless ``value`` is a flag (``is_flag``; None too when ``optional``): an option
    given as text ("off", "no") would otherwise count as True."""
    if not (is_flag(value) or (optional and value is None)):
        from .errors import InputError

        raise InputError(f"{name} must be True or False, got {value!r}")


def state_to_json(value):
    """A predictor's ``begin_state`` (nested tuples of numbers, text and None) as JSON can hold it:
    tuples to lists, numpy scalars to Python numbers (exactly). TypeError for anything else."""
    if isinstance(value, (tuple, list)):
        return [state_to_json(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"cannot save {type(value).__name__}")


def state_from_json(value, depth: int = 0):
    """``state_to_json``'s output read back from an untrusted file: nested lists (at most 4 deep,
    64 items) of numbers, text and None, as tuples; ValueError for anything else."""
    if depth > 4:
        raise ValueError("begin_state is nested too deep")
    if isinstance(value, list):
        if len(value) > 64:
            raise ValueError("begin_state is too long")
        return tuple(state_from_json(v, depth + 1) for v in value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError("begin_state holds a value of another kind")
