"""Options: the value checks every option dataclass shares (KV policies, drafters, quantization schemes),
and options from short text specs, for the command line and experiment scripts:
`parse_spec("snapkv:budget=256,window=32", classes, what)` -> `SnapKV(budget=256, window=32)`."""

from __future__ import annotations

import ast
import dataclasses
import math

import numpy as np

SHOWN_CHARS = 60  # an echoed value longer than this is cut, so an error stays one readable line


def shown(value) -> str:
    """`repr(value)` for an error message, cut to SHOWN_CHARS."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 3]}..."


def is_int(value) -> bool:
    """An int (numpy's too); bools are not ints here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A finite real number: an int or a float (numpy's too), not a bool, NaN or infinity."""
    return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def check_int(owner: str, name: str, value, minimum: int = 1, maximum: int | None = None, why: str = "") -> None:
    """A clear ValueError unless `value` is an int (`is_int`) in [minimum, maximum] (no maximum: None);
    `why`, if given, says the reason for the maximum."""
    too_big = is_int(value) and maximum is not None and value > maximum
    if is_int(value) and value >= minimum and not too_big:
        return
    if too_big:
        expected, note = f"<= {maximum}", why
    else:
        expected = f">= {minimum}"
        note = "" if maximum is None else f"at most {maximum}" + (f": {why}" if why else "")
    raise ValueError(f"{owner}: {name} must be an int {expected}, got {shown(value)}" + (f" ({note})" if note else ""))


def check_bool(owner: str, name: str, value) -> None:
    """A clear ValueError unless `value` is True or False."""
    if not isinstance(value, (bool, np.bool_)):  # every bad option value is a ValueError here
        raise ValueError(f"{owner}: {name} must be True or False, got {shown(value)}")  # noqa: TRY004


def _value(cls_name: str, key: str, text: str):
    """A Python literal, or a bare word (e.g. positions=original) as a string."""
    if text.isidentifier():
        return text if text not in ("None", "True", "False") else ast.literal_eval(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: absurdly nested input
        raise ValueError(
            f"{cls_name}: cannot read {key}={shown(text)}: expected a Python literal (e.g. 8, 0.5, "
            f"(1, 2), None) or a bare word"
        ) from None


def _items(args: str) -> list[str]:
    """Split `key=value,key=value` at the commas outside brackets, so values may be tuples or lists
    (strings holding commas or brackets are not supported). Raises ValueError on unbalanced brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(args):
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            raise ValueError(f"unbalanced brackets in {args!r}: a closing bracket at character {i} opens nothing")
        if char == "," and depth == 0:
            items.append(args[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {args!r}: {depth} bracket(s) left open")
    items.append(args[start:])
    return [item.strip() for item in items if item.strip()]


def parse_spec(spec: str, classes: dict[str, type], what: str, hidden: tuple[str, ...] = ()):
    """`"name"` or `"name:key=value,key=value"` (values are Python literals or bare words) -> an instance
    of `classes[name]` (names are matched in lower case; `what` names the kind in errors; `hidden`:
    fields a text spec may not set). Raises ValueError naming an unknown name, parameter, a repeat or
    a value that is neither a literal nor a bare word (the class then checks each value)."""
    name, _, args = spec.partition(":")
    cls = classes.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown {what} {shown(name)}; choose one of {sorted(classes)}")
    fields = {f.name for f in dataclasses.fields(cls)} - set(hidden)
    kwargs = {}
    for item in _items(args):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(
                f"{cls.__name__}: bad parameter {shown(item)}; parameters are {sorted(fields)} (as key=value)"
            )
        if key in kwargs:
            raise ValueError(f"{cls.__name__}: parameter {key!r} given twice")
        kwargs[key] = _value(cls.__name__, key, value.strip())
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required parameter is missing
        raise ValueError(f"{cls.__name__}: {err}") from None
