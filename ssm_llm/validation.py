"""Validators for the values users pass to the public API: each returns the value as a plain Python type
or raises a ValueError that names the argument, the value and what was expected.

NumPy integers and floats are accepted where Python ones are (sizes often come out of arrays); bools are
not numbers here (`max_new_tokens=True` is a mistake, not 1); NaN and infinities are refused unless a
bound says otherwise.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def as_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum] (either bound optional)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        expected = "a positive int" if (minimum, maximum) == (1, None) else f"an int {_interval(minimum, maximum)}"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def as_float(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
) -> float:
    """`value` as a finite float within the bounds (closed unless `open_min` / `open_max`)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if open_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if open_max else value > maximum)
    if not math.isfinite(value) or low_bad or high_bad:
        low = "(-inf" if minimum is None else f"{'(' if open_min else '['}{minimum}"
        high = "inf)" if maximum is None else f"{maximum}{')' if open_max else ']'}"
        interval = f"{low}, {high}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def as_token_ids(name: str, value, vocab_size: int | None = None) -> tuple[int, ...]:
    """A sequence of token ids (an int alone is one id) as a tuple, each in [0, vocab_size)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be token ids (ints), got the string {value!r}")
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = (value,)
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of token ids, got {value!r}") from None
    top = None if vocab_size is None else vocab_size - 1
    return tuple(as_int(f"{name}[{i}]", v, 0, top) for i, v in enumerate(items))


def _interval(minimum, maximum) -> str:
    if maximum is None and minimum is not None:
        return f">= {minimum}"
    low = "(-inf" if minimum is None else f"[{minimum}"
    high = "inf)" if maximum is None else f"{maximum}]"
    return f"in {low}, {high}"
