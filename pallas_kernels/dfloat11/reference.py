"""The pure-jnp DFloat11 decoder: every lane walks its block of the exponent stream one code per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def window(stream: jax.Array, pos: jax.Array, code_bits: int) -> jax.Array:
    """The `code_bits` bits of `stream` (uint32 words, most significant bit first) starting at bit `pos`
    (int32, any shape), as int32. Reads two words; positions past the end read the last word (only lanes
    decoding past their tensor's end get there, and their values are discarded)."""
    last = stream.shape[0] - 1
    word = pos >> 5
    first = jnp.take(stream, jnp.clip(word, 0, last))
    second = jnp.take(stream, jnp.clip(word + 1, 0, last))
    return join_words(first, second, pos, code_bits)


def join_words(first: jax.Array, second: jax.Array, pos: jax.Array, code_bits: int) -> jax.Array:
    """The `code_bits` bits starting at bit `pos % 32` of the 64 bits `first | second` (uint32 words holding
    bit `pos`, and the next), as int32."""
    bit = (pos & 31).astype(jnp.uint32)
    # A shift by 32 is not defined for 32-bit lanes everywhere: at bit 0 the second word adds nothing.
    spill = jnp.where(bit == 0, jnp.uint32(0), second >> jnp.where(bit == 0, jnp.uint32(1), jnp.uint32(32) - bit))
    return (((first << bit) | spill) >> jnp.uint32(32 - code_bits)).astype(jnp.int32)


def decode_exponents_ref(
    stream: jax.Array, starts: jax.Array, table: jax.Array, table_base: jax.Array, code_bits: int, steps: int
) -> jax.Array:
    """Decode `steps` codes in each lane. stream: uint32 [W]; starts: int32 [lanes] each lane's first bit;
    table: uint16 [T] (several tensors' tables side by side); table_base: int32 [lanes] where each lane's
    table begins. Returns uint8 [lanes, steps], the exponents in order."""

    def step(pos, _):
        entry = jnp.take(table, window(stream, pos, code_bits) + table_base, mode="clip").astype(jnp.int32)
        return pos + (entry >> 8), (entry & 0xFF).astype(jnp.uint8)

    _, exponents = jax.lax.scan(step, starts, None, length=steps)
    return exponents.T
