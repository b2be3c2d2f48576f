"""The one range check of untrusted numbers (checkpoint headers, API options)."""

from __future__ import annotations

import math
import numbers


def is_number(value, lo: float, hi: float, whole: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool, not a string) within [lo, hi], finite, and a
    whole number if ``whole`` (an integral float such as 4.0 counts)."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            and lo <= value <= hi and (not whole or float(value).is_integer()))
