"""Attention of T new query tokens against a KV cache (decode: T = 1; continued prefill: T > 1).

GQA without repeating K/V in memory, ragged per-sequence lengths, optional sliding window, optional
int8 K/V with per-token scales. Every key is visible to a query row inside a per-row range [lo, hi),
optionally plus the draft-tree keys that `tree_attention` allows, so the same kernels serve both:
`triton.py` (GPU) is a split-K ("flash decoding") attention whose partials `merge_partials` combines;
`tpu.py` (Mosaic TPU) walks the cache in key blocks with the online softmax in VMEM scratch.
`reference.py` holds the pure-jnp reference and `masked_attention`.
"""

from __future__ import annotations

import jax

from pallas_kernels import cpu_attention
from pallas_kernels.cache_attention.reference import (
    cache_attention_ref,
    cache_visible,
    check_cache_inputs,
    dequantize_cache,
    key_ranges,
    layer_of,
    masked_attention,
)
from pallas_kernels.cache_attention.tpu import (
    CacheAttentionTPUBlockSizes,
    attention_pallas_tpu,
    cache_attention_pallas_tpu,
)
from pallas_kernels.cache_attention.triton import (
    CacheAttentionBlockSizes,
    attention_partials_pallas,
    cache_attention_pallas,
    merge_partials,
)
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.lowering import is_power_of_two

__all__ = [
    "CacheAttentionBlockSizes",
    "CacheAttentionTPUBlockSizes",
    "attention_pallas_tpu",
    "attention_partials_pallas",
    "cache_attention",
    "cache_attention_pallas",
    "cache_attention_pallas_tpu",
    "cache_attention_ref",
    "check_cache_inputs",
    "dequantize_cache",
    "key_ranges",
    "masked",
    "masked_attention",
    "merge_partials",
    "use_pallas",
]

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")  # of both cache_attention and tree_attention


def use_pallas(impl: str, kernel: str, dim: int) -> str:
    """The dispatch decision shared with `tree_attention`: "xla", "pallas" or "interpret". The split-K
    kernel needs a power-of-two head_dim >= 16; "auto" falls back to the reference otherwise on GPU."""
    kind = resolve_impl(impl, kernel, PALLAS_BACKENDS)
    if (
        kind == "pallas"
        and impl == "auto"
        and jax.default_backend() == "gpu"
        and not (is_power_of_two(dim) and dim >= 16)
    ):
        return "xla"
    return kind


def cache_attention(
    q,
    k,
    v,
    q_positions,
    kv_lengths,
    window=0,
    scale=None,
    k_scale=None,
    v_scale=None,
    *,
    block_sizes: CacheAttentionBlockSizes | CacheAttentionTPUBlockSizes | None = None,
    layer=None,
    impl="auto",
):
    """Dispatcher for `cache_attention_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    `block_sizes` are those of the kernel that runs (None: its defaults). With `layer` (an int32 scalar), k and v
    (and the scales) are every layer's cache [L, ...] and layer `layer` is attended: the CPU kernel
    (`pallas_kernels.cpu_attention`, which "auto" takes on CPU where it applies) reads it in place."""
    if impl == "auto" and cpu_attention.applies(q, k, k_scale):
        visible = cache_visible(q_positions, kv_lengths, window, k.shape[-2])
        return cpu_attention.masked_attention(q, k, v, visible, scale, layer=layer).astype(q.dtype)
    k, v, k_scale, v_scale = layer_of(layer, k, v, k_scale, v_scale)
    kind = use_pallas(impl, "cache_attention", q.shape[-1])
    if kind == "xla":
        return cache_attention_ref(q, k, v, q_positions, kv_lengths, window, scale, k_scale, v_scale)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return cache_attention_pallas_tpu(
            q, k, v, q_positions, kv_lengths, window, scale, k_scale, v_scale, block_sizes=block_sizes
        )
    return cache_attention_pallas(
        q,
        k,
        v,
        q_positions,
        kv_lengths,
        window,
        scale,
        k_scale,
        v_scale,
        block_sizes=block_sizes,
        interpret=kind == "interpret",
    )


def masked(q, k, v, visible, scale=None, *, layer=None, impl="auto"):
    """`masked_attention` (visible [B, T, S], or [B, H_kv, T, S]) through the CPU kernel where "auto" takes it
    (`cpu_attention.applies`, a [B, T, S] mask), else the reference. With `layer`, k and v are every layer's
    cache [L, B, H_kv, S, D] and layer `layer` is attended."""
    if impl == "auto" and visible.ndim == 3 and cpu_attention.applies(q, k):
        return cpu_attention.masked_attention(q, k, v, visible, scale, layer=layer).astype(q.dtype)
    k, v = layer_of(layer, k, v)
    return masked_attention(q, k, v, visible, scale)
