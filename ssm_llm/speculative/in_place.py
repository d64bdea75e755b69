"""`cond_in_place`: a `lax.cond` whose branches write into a large carried value (a KV cache) without copying it.

XLA gives a conditional's result buffers of its own: a branch that updates an operand in place (a scatter into
the cache) ends with a copy of the whole operand, and whatever the caller then writes into that result is copied
back into a loop's carried buffer. In the speculative round that was four copies of the cache per round (k and v,
each twice: 4 x 10 MB for SmolLM2 at 430 slots, ~4 ms of a ~15 ms W8A8 round on the 2-core EPYC). A while loop's
carried buffers are updated in place, so the same choice made as two while loops of at most one step each
copies nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

Carry = TypeVar("Carry")


def _at_most_once(run: jax.Array, fn: Callable[[Carry], Carry], carry: Carry) -> Carry:
    """`fn(carry)` if `run` else `carry`, as a while loop of zero or one step."""
    return jax.lax.while_loop(lambda s: s[0], lambda s: (jnp.bool_(False), fn(s[1])), (run, carry))[1]


def cond_in_place(
    pred: jax.Array, true_fn: Callable[[Carry], Carry], false_fn: Callable[[Carry], Carry], carry: Carry
) -> Carry:
    """`lax.cond(pred, true_fn, false_fn, carry)` for branches that return a value of `carry`'s structure,
    shapes and dtypes (e.g. a cache they write into, with buffers for their other results): on CPU the buffers
    of `carry` are updated in place instead of copied. Elsewhere a plain `lax.cond`: on a GPU a while loop reads
    its predicate back to the host every step, and copies run at the memory's full speed (not measured). Both
    branches are traced; one runs. Not reverse-differentiable on CPU (while loops), which inference never asks."""
    if jax.default_backend() != "cpu":
        return jax.lax.cond(pred, true_fn, false_fn, carry)
    pred = jnp.asarray(pred, bool)
    return _at_most_once(~pred, false_fn, _at_most_once(pred, true_fn, carry))
