"""Masked attention for a few query rows on CPU: a compiled AVX2 kernel called from XLA (`attention.cc`).

`masked_attention(q, k, v, visible, scale)` has the contract of `cache_attention.masked_attention` with a
[B, T, S] mask and float32 operands, and two properties XLA's dots lack (see `attention.cc`): each query row's
result is bit-identical whatever the other rows, and whatever slots its visible keys sit in (only their order
counts). So a draft-tree node and the same token decoded alone get the same bits: with int8 activations (W8A8,
where every linear is an exact integer product, and with `ssm_llm.norm.halving_sum` and `int8_matmul`'s
materialised input) draft-tree verification reproduces plain decoding bit for bit. With `layer` it reads one
layer of the stacked cache in place, where XLA's dot copied the layer out first, and splits its (row, head) units
over the CPU kernels' helper threads (`cpu_workers.h`): query rows over 300 of 430 cached keys in 30 layers (2-core
EPYC, `impl="auto"` vs the reference in one process) took 0.71 / 2.23 / 3.83 ms at 1 / 4 / 9 rows against XLA's
1.68 / 3.3-4.1 / 6.3-6.8 ms.

`applies(q, k, k_scale)` says whether the dispatchers (`cache_attention`, `tree_attention`,
`cache_attention.masked`) take it under `impl="auto"`: CPU backend with one device, kernel built
(`pallas_kernels.cpu_build`), float32 q/k/v, no int8 cache, head_dim a multiple of 8, a [B, T, S] mask and at
most `MAX_ROWS` query rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import ATTENTION_TARGET, available, unavailable_reason

__all__ = ["MAX_ROWS", "applies", "masked_attention", "runs_here"]

# Query rows per call up to which "auto" takes the kernel: decode (1 row) and draft-tree verification (the
# library's trees hold up to ~64 nodes; every verified row must take it for the exactness above). Longer
# prompts continued into a cache stay on XLA's batched dot, which reuses each key across many rows.
MAX_ROWS = 64


def runs_here(rows: int) -> bool:
    """Whether `impl="auto"` attention of `rows` query rows per call runs through the kernel on this host and setup:
    the CPU backend with one device (XLA cannot partition a custom call over a mesh: sharded programs keep XLA),
    the kernel built, rows <= `MAX_ROWS`. Where it does, draft-tree verification is bit-exact on W8A8 models."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and rows <= MAX_ROWS and available()


def applies(q: jax.Array, k: jax.Array, k_scale=None) -> bool:
    """Whether `impl="auto"` attention with a [B, T, S] mask takes the kernel for q [B, T, H, D] and k (see the
    module doc)."""
    return k_scale is None and q.dtype == k.dtype == jnp.float32 and q.shape[-1] % 8 == 0 and runs_here(q.shape[1])


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float | None = None, layer=None
):
    """q: [B, T, H, D]; k, v: [B, H_kv, S, D] float32; visible: [B, T, S] bool -> [B, T, H, D] float32:
    softmax(scale q k^T) v over each row's visible keys (scale default D ** -0.5), zeros for a row that sees
    none. With `layer` (an int32 scalar, may be traced), k and v are every layer's cache [L, B, H_kv, S, D] and
    layer `layer` is read: the stacked cache goes to the kernel as it is, not copied a layer at a time.
    CPU only, through the compiled kernel."""
    if layer is None:
        k, v, layer = k[None], v[None], 0
    elif k.ndim != 5:
        raise ValueError(f"cpu masked_attention: with a layer index k and v are [L, B, H_kv, S, D], got {k.shape}")
    layer = jnp.asarray(layer, jnp.int32)
    k1 = k[0]  # one layer's shape
    if q.ndim != 4 or k1.ndim != 4 or v.shape != k.shape or visible.shape != (q.shape[0], q.shape[1], k1.shape[2]):
        raise ValueError(
            f"cpu masked_attention: q [B, T, H, D], k = v [B, H_kv, S, D], visible [B, T, S] expected, got "
            f"{tuple(q.shape)}, {tuple(k1.shape)}, {tuple(v.shape[-4:])}, {tuple(visible.shape)}"
        )
    if q.shape[0] != k1.shape[0] or q.shape[3] != k1.shape[3] or q.shape[2] % k1.shape[1] or q.shape[3] % 8:
        raise ValueError(
            f"cpu masked_attention: batch and head_dim must agree, H a multiple of H_kv and D of 8; got q "
            f"{tuple(q.shape)} and k {tuple(k1.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype == jnp.float32:
        raise ValueError(f"cpu masked_attention: float32 q, k, v expected, got {q.dtype}, {k.dtype}, {v.dtype}")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cpu masked_attention: the CPU kernel is unavailable here: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")
    return call(q, k, v, visible.astype(jnp.uint8), layer, scale=np.float32(scale))
