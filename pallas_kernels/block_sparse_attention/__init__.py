"""Block-sparse prefill attention: each query block attends to listed key blocks and listed key columns.

The kernel behind MInference's sparse prefill (`ssm_llm.kv.MInference` estimates the indices): `reference.py`
holds the pure-jnp reference, which gathers only the listed keys and is also the CPU fast path; `triton.py`
the GPU kernel, which walks the listed blocks in place; `tpu.py` the Mosaic TPU kernel, which fetches only the
listed blocks through a scalar-prefetched index map.
"""

from __future__ import annotations

import jax

from pallas_kernels.block_sparse_attention.reference import (
    block_sparse_attention_ref,
    canonical_indices,
    check_sparse_inputs,
)
from pallas_kernels.block_sparse_attention.tpu import block_sparse_attention_pallas_tpu
from pallas_kernels.block_sparse_attention.triton import BlockSparseBlockSizes, block_sparse_attention_pallas
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.lowering import is_power_of_two

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")

__all__ = [
    "BlockSparseBlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_pallas",
    "block_sparse_attention_pallas_tpu",
    "block_sparse_attention_ref",
    "canonical_indices",
    "check_sparse_inputs",
]


def block_sparse_attention(
    q,
    k,
    v,
    blocks,
    columns=None,
    lengths=None,
    window=0,
    scale=None,
    *,
    block: int = 64,
    block_sizes: BlockSparseBlockSizes | None = None,
    impl: str = "auto",
):
    """Dispatcher for `block_sparse_attention_ref`'s contract (see there); `impl` as in
    `pallas_kernels.dispatch`. The GPU kernel needs power-of-two head_dim and block >= 16, the TPU kernel a
    block that is a multiple of 16: otherwise "auto" uses the reference there. `block_sizes` tune the GPU
    kernel (the TPU kernel's tiles are the pattern's block and 128 columns)."""
    kind = resolve_impl(impl, "block_sparse_attention", PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        if block % 16 == 0 or impl != "auto":
            return block_sparse_attention_pallas_tpu(q, k, v, blocks, columns, lengths, window, scale, block=block)
        kind = "xla"
    fits = all(is_power_of_two(n) and n >= 16 for n in (q.shape[-1], block))
    if kind == "pallas" and impl == "auto" and not fits:
        kind = "xla"
    if kind == "xla":
        return block_sparse_attention_ref(q, k, v, blocks, columns, lengths, window, scale, block=block)
    return block_sparse_attention_pallas(
        q,
        k,
        v,
        blocks,
        columns,
        lengths,
        window,
        scale,
        block=block,
        block_sizes=block_sizes,
        interpret=kind == "interpret",
    )
