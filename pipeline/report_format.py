"""Numbers as the report shows them: table cells, chart ticks and captions."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def fmt(x, digits: int = 4) -> str:
    """A number for a table cell: ints as ints, floats with `digits` significant digits; text
    is returned as it is (the page escapes and redacts it)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "—"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    if abs(f) >= 1e5 or abs(f) < 1e-3:
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}" if abs(f) < 10 ** digits else f"{f:.1f}"


def to_float(x) -> float | None:
    """A scalar as float, or None (None, NaN, lists, text)."""
    if x is None or isinstance(x, (list, tuple, dict, str, bytes)):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def finite(values: Iterable) -> np.ndarray:
    """The finite numbers among `values`, as float64."""
    out = np.array([f for f in (to_float(v) for v in values) if f is not None], dtype=np.float64)
    return out[np.isfinite(out)]
