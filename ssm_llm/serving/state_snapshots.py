"""Prefix caching for state-space models: copies of a slot's conv + SSM state taken where a prompt prefix
ends on a multiple of `interval` tokens, keyed like `PageTable`'s pages (the previous boundary's key and the
tokens since), kept in a device store of fixed size and evicted least recently used first.

A Mamba request has no pages to share: its whole past is the state. A new request whose prompt starts with a
snapshotted prefix gets that state copied into its slot and computes only the rest.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import jax

from ssm_llm.ssm_cache import SSMCache


class SnapshotTable:
    """The host side: which store entry holds the state after which prefix, and which entry goes next."""

    def __init__(self, capacity: int, interval: int):
        self.capacity, self.interval = capacity, interval
        self._entry: OrderedDict[tuple, int] = OrderedDict()  # prefix key -> store entry, least recent first
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._entry)

    def keys(self, tokens: list[int], limit: int, key: tuple | None = None, start: int = 0):
        """(boundary, key) for every multiple of `interval` in (start, limit], continuing from `key`."""
        size = self.interval
        for end in range(start + size, limit + 1, size):
            key = (key, tuple(tokens[end - size : end]))
            yield end, key

    def match(self, tokens: list[int], limit: int) -> tuple[int, tuple | None, int | None]:
        """The longest snapshotted prefix of `tokens` within its first `limit` tokens: (its length, its key,
        its store entry), or (0, None, None)."""
        found = (0, None, None)
        for end, key in self.keys(tokens, limit):
            entry = self._entry.get(key)
            if entry is not None:
                found = (end, key, entry)
        if found[1] is not None:
            self._entry.move_to_end(found[1])
        return found

    def claim(self, key: tuple) -> int | None:
        """A store entry to write the state after prefix `key` into (the least recently used one when full),
        or None if that prefix is held already."""
        if key in self._entry or not self.capacity:
            return None
        entry = self._free.pop() if self._free else self._entry.popitem(last=False)[1]
        self._entry[key] = entry
        return entry


def init_store(state: SSMCache, capacity: int) -> SSMCache:
    """A zeroed store of `capacity` states shaped like one slot of `state`."""

    def rows(x, axis):
        shape = list(x.shape)
        shape[axis] = capacity
        return jax.numpy.zeros(shape, x.dtype)

    return SSMCache(
        conv_state=rows(state.conv_state, 1), ssm_state=rows(state.ssm_state, 1), lengths=rows(state.lengths, 0)
    )


@functools.partial(jax.jit, donate_argnames=("store",))
def save(store: SSMCache, state: SSMCache, slot, entry) -> SSMCache:
    """`store` with entry `entry` set to slot `slot` of `state`."""
    return SSMCache(
        conv_state=store.conv_state.at[:, entry].set(state.conv_state[:, slot]),
        ssm_state=store.ssm_state.at[:, entry].set(state.ssm_state[:, slot]),
        lengths=store.lengths.at[entry].set(state.lengths[slot]),
    )


@functools.partial(jax.jit, donate_argnames=("state",))
def load(state: SSMCache, store: SSMCache, slot, entry) -> SSMCache:
    """`state` with slot `slot` set to entry `entry` of `store`."""
    return SSMCache(
        conv_state=state.conv_state.at[:, slot].set(store.conv_state[:, entry]),
        ssm_state=state.ssm_state.at[:, slot].set(store.ssm_state[:, entry]),
        lengths=state.lengths.at[slot].set(store.lengths[entry]),
    )
