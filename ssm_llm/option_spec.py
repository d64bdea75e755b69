"""Options from short text specs, for the command line and experiment scripts:
`parse_spec("snapkv:budget=256,window=32", classes, what)` -> `SnapKV(budget=256, window=32)`."""

from __future__ import annotations

import ast
import dataclasses


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as positions=original


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
    fields a text spec may not set). Raises ValueError naming an unknown name, parameter or a repeat."""
    name, _, args = spec.partition(":")
    cls = classes.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(classes)}")
    fields = {f.name for f in dataclasses.fields(cls)} - set(hidden)
    kwargs = {}
    for item in _items(args):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(f"{cls.__name__}: bad parameter {item!r}; parameters are {sorted(fields)} (as key=value)")
        if key in kwargs:
            raise ValueError(f"{cls.__name__}: parameter {key!r} given twice")
        kwargs[key] = _value(value.strip())
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required parameter is missing
        raise ValueError(f"{cls.__name__}: {err}") from None
