"""Tokens streamed from inside a compiled decode loop to a Python callback.

The loop calls one fixed host function with a stream id (a traced operand), which looks the caller's
callback up in the table of open streams. So the compiled loop does not depend on which callback is
passed (no recompilation per callback), and an exception raised by the callback is kept and re-raised
to the caller of `generate` when the loop ends, instead of surfacing as an opaque XLA runtime error.
After a callback has raised once, the rest of that call's tokens are not delivered.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import jax
import numpy as np

_ids = itertools.count(1)
_open: dict[int, TokenStream] = {}
_lock = threading.Lock()


class TokenStream:
    """A context manager that registers `callback(step, tokens)` for one generate call; `id` goes into
    the compiled loop, `deliver` is the function the loop calls."""

    def __init__(self, callback: Callable[[int, np.ndarray], None]):
        self.callback = callback
        self.error: BaseException | None = None
        with _lock:
            self.id = next(_ids) % (2**31 - 1)

    def __enter__(self) -> TokenStream:
        with _lock:
            _open[self.id] = self
        return self

    def __exit__(self, *exc) -> None:
        jax.effects_barrier()  # every token of this call has been delivered (or skipped)
        with _lock:
            _open.pop(self.id, None)
        if self.error is not None and exc[0] is None:
            raise self.error

    def _call(self, step, tokens) -> None:
        if self.error is not None:
            return
        try:
            self.callback(int(step), np.asarray(tokens))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller of generate
            self.error = e


def deliver(stream_id, step, tokens) -> None:
    """Host side of `emit`: pass one step's tokens to the open stream `stream_id`."""
    with _lock:
        stream = _open.get(int(stream_id))
    if stream is not None:
        stream._call(step, tokens)


def emit(stream_id: jax.Array, step: jax.Array, tokens: jax.Array) -> None:
    """Inside a compiled loop: send `tokens: [B]` of `step` to the stream `stream_id` (ordered)."""
    jax.debug.callback(deliver, stream_id, step, tokens, ordered=True)
