"""The DFloat11 weight format (Zhang et al. 2025, "70% Size, 100% Accuracy"): a bfloat16 tensor whose 8-bit
exponents are Huffman-coded and whose sign and 7 mantissa bits are kept raw, one byte per weight.

A bfloat16 is `sign (1) | exponent (8) | mantissa (7)`. Trained weights use few exponents (about 2.6 bits of
entropy), so coding them by frequency and storing `sign | mantissa` as a byte gives about 10.6 of 16 bits,
losslessly. Decoding the exponent stream is sequential, so the encoder records where each block of `block`
consecutive elements starts in the stream: blocks decode in parallel (the paper's kernel records byte-aligned
chunk starts and a per-thread gap instead; element-aligned blocks cost 32 bits per block, 0.125 bit per weight
at the default 256, and let a reader decode only the blocks it needs, such as a few embedding rows).

The code is canonical and at most `max_code_bits` long, so one table of `2 ** max_code_bits` entries maps the
next `max_code_bits` bits of the stream to `(length << 8) | exponent` (the paper splits 32-bit codes over
several 256-entry tables to fit GPU shared memory; a length-limited code keeps one small table instead).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

MAX_CODE_BITS = 25  # the table has 2 ** code_bits entries: 25 bits is already 64 MiB of it


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["sign_mantissa", "stream", "block_starts", "table"],
    meta_fields=["block", "code_bits"],
)
@dataclasses.dataclass(frozen=True)
class DFloat11Weight:
    """A bfloat16 tensor of shape `sign_mantissa.shape`, stored losslessly in DFloat11 form. Leading axes
    (a stack of layers) are independent tensors: every array below has them, and `x[i]` on every leaf
    gives layer i's weight.

    sign_mantissa: uint8 [..., *shape]: each weight's sign bit (bit 7) and its 7 mantissa bits;
    stream: uint32 [..., words]: the exponents' codes, most significant bit first, zero padded;
    block_starts: int32 [..., ceil(size / block)]: the bit where each block of `block` elements starts;
    table: uint16 [..., 2 ** code_bits]: the next `code_bits` bits -> (code length << 8) | exponent.
    """

    sign_mantissa: jax.Array
    stream: jax.Array
    block_starts: jax.Array
    table: jax.Array
    block: int
    code_bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded tensor's shape (leading stacked axes included)."""
        return tuple(self.sign_mantissa.shape)

    @property
    def dtype(self):
        """Always bfloat16: what decoding returns."""
        return jnp.dtype(jnp.bfloat16)

    @property
    def ndim(self) -> int:
        return len(self.shape)


DFloat11Weight.__module__ = "pallas_kernels.dfloat11"


def check_weight(w: DFloat11Weight, where: str) -> None:
    """Raise ValueError naming what is malformed in `w`'s arrays or layout."""
    if not 1 <= w.code_bits <= MAX_CODE_BITS:
        raise ValueError(f"{where}: code_bits must be in [1, {MAX_CODE_BITS}], got {w.code_bits}")
    if w.block < 1:
        raise ValueError(f"{where}: block must be a positive int, got {w.block}")
    expected = {"sign_mantissa": jnp.uint8, "stream": jnp.uint32, "block_starts": jnp.int32, "table": jnp.uint16}
    for name, dtype in expected.items():
        if getattr(w, name).dtype != dtype:
            raise ValueError(f"{where}: {name} must be {jnp.dtype(dtype).name}, got {getattr(w, name).dtype}")
    lead = w.stream.shape[:-1]
    size = math.prod(w.shape[len(lead) :])
    if w.block_starts.shape != (*lead, -(-size // w.block)):
        raise ValueError(
            f"{where}: block_starts has shape {w.block_starts.shape}, expected {(*lead, -(-size // w.block))}"
        )
    if w.table.shape != (*lead, 1 << w.code_bits):
        raise ValueError(f"{where}: table has shape {w.table.shape}, expected {(*lead, 1 << w.code_bits)}")
    if w.stream.shape[-1] < 2:
        raise ValueError(f"{where}: the stream needs at least 2 words (zero padding), got {w.stream.shape[-1]}")


def assemble(sign_mantissa: jax.Array, exponents: jax.Array) -> jax.Array:
    """bfloat16 weights from their sign-and-mantissa bytes and exponents (both uint8, same shape)."""
    sm = sign_mantissa.astype(jnp.uint16)
    bits = ((sm & 0x80) << 8) | (exponents.astype(jnp.uint16) << 7) | (sm & 0x7F)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
