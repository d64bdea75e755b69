"""The DFloat11 exponent decoder as a Pallas kernel for the Triton lowering (GPU).

One program decodes `block_lanes` lanes (blocks of the tensor) for `steps` steps: each step gathers the two
stream words under every lane's bit position and its table entry, writes one exponent per lane and moves the
lanes on by their code lengths. The stream and tables stay in global memory (the table is 2 ** code_bits
uint16 entries; at the default 12 bits, 8 KiB, which the L1 cache holds). The same maths as
`reference.decode_exponents_ref`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.dfloat11.reference import join_words
from pallas_kernels.lowering import triton_params


@dataclasses.dataclass(frozen=True)
class DFloat11BlockSizes(BlockSizes):
    """Lanes (tensor blocks) per program, a power of two; untuned. Then the Triton launch parameters."""

    block_lanes: int = 128
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._powers_of_two("block_lanes")


def _kernel(stream_ref, table_ref, starts_ref, base_ref, out_ref, *, lanes, words, tables, code_bits, steps, tile):
    lane = pl.program_id(0) * tile + jnp.arange(tile)
    ok = lane < lanes
    pos = plgpu.load(starts_ref.at[lane], mask=ok, other=0)
    base = plgpu.load(base_ref.at[lane], mask=ok, other=0)

    def step(s, pos):
        word = pos >> 5
        first = plgpu.load(stream_ref.at[jnp.clip(word, 0, words - 1)], mask=ok, other=0)
        second = plgpu.load(stream_ref.at[jnp.clip(word + 1, 0, words - 1)], mask=ok, other=0)
        index = join_words(first, second, pos, code_bits)
        entry = plgpu.load(table_ref.at[jnp.clip(index + base, 0, tables - 1)], mask=ok, other=0)
        entry = entry.astype(jnp.int32)
        plgpu.store(out_ref.at[s, lane], (entry & 0xFF).astype(jnp.uint8), mask=ok)
        return pos + (entry >> 8)

    jax.lax.fori_loop(0, steps, step, pos)


@functools.partial(jax.jit, static_argnames=("code_bits", "steps", "block_sizes", "interpret"))
def decode_exponents_pallas(
    stream: jax.Array,
    starts: jax.Array,
    table: jax.Array,
    table_base: jax.Array,
    code_bits: int,
    steps: int,
    block_sizes: DFloat11BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`decode_exponents_ref` as a Pallas kernel: uint8 [lanes, steps]."""
    blocks = DFloat11BlockSizes.resolve(block_sizes, "decode_exponents_pallas")
    lanes = starts.shape[0]
    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)  # noqa: E731
    kernel = functools.partial(
        _kernel,
        lanes=lanes,
        words=stream.shape[0],
        tables=table.shape[0],
        code_bits=code_bits,
        steps=steps,
        tile=blocks.block_lanes,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((steps, lanes), jnp.uint8),
        grid=(pl.cdiv(lanes, blocks.block_lanes),),
        in_specs=[whole(stream), whole(table), whole(starts), whole(table_base)],
        out_specs=pl.BlockSpec((steps, lanes), lambda i: (0, 0)),
        compiler_params=triton_params(interpret, blocks.num_warps, blocks.num_stages),
        interpret=interpret,
    )(stream, table, starts.astype(jnp.int32), table_base.astype(jnp.int32))
    return out.T
