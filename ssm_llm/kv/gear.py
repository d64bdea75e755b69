"""GEAR: a quantized KV cache whose error is repaired by a low-rank matrix and sparse outliers.

Kang, Zhang, Kundu, Jeong, Liu, Krishna and Zhao, 2024, "GEAR: An Efficient KV Cache Compression
Recipe for Near-Lossless Generative Inference of LLM". Each (layer, sequence, kv head) prompt matrix
X [S, D] (keys rotated at their positions, or values) is stored as X_hat = Q + L + S:
  S  sparse outliers: the `outlier_fraction` largest-magnitude entries of X (the paper takes the
     largest and the smallest s/2 each), kept in the cache dtype with an int32 flat index; a fixed
     count per matrix, round(outlier_fraction * S * D), so shapes are static;
  Q  the rest, X - S, quantized to `bits` with the group-wise asymmetric quantizers of
     `ssm_llm.kv.quantization` - keys per channel (groups of `group_size` tokens), values per token
     (groups of min(group_size, D) channels), the KIVI/KCVT layout GEAR builds on;
  L  a rank-`rank` approximation of the residual R = X - Q - S, kept as two factors [S, r] @ [r, D]
     (the paper's per-head low-rank, found by power iteration; here exactly, from the eigenvectors of
     R^T R, the optimum that iteration approaches).
Parameters: bits in {2, 4, 8} (16: no compression - the prompt is stored as it is and rank and
outliers are unused); rank >= 0 per head (0: no low-rank part, rank >= D: R is kept exactly; the
paper picks a few percent of the dimensions);
outlier_fraction in [0, 1) (0: no sparse part; the paper uses 0.02); group_size (tokens per key group).
The prompt is compressed once after prefill and reconstructed one layer at a time inside `attend`, so
the stored bytes are the compressed ones. Decoded tokens go to a full-precision tail (the paper
re-compresses them every n_b steps from a small streaming buffer; here the tail is never compressed).
Ragged batches: prompt rows past a sequence's length are masked from the outliers and the residual,
edge-padded (so they never widen a quantization group) and never attended to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, check_within_context, layer_slice
from ssm_llm.kv.quantization import QuantizedTensor, check_channel_groups, check_policy_bits, dequantize, quantize
from ssm_llm.kv.slots import SlotKV, empty_slots, prompt_and_tail_attention
from ssm_llm.option_spec import is_real, shown

HIGHEST = jax.lax.Precision.HIGHEST  # float32 factors, not TF32, on GPUs


@flax.struct.dataclass
class GEARTensor:
    """X [..., length, D] as backbone + left @ right + sparse outliers.

    backbone: QuantizedTensor of X - sparse over [..., P, D] (P: length padded to whole token groups),
    or the raw X [..., length, D] (16 bits); outlier_index, outlier_value: [..., n] flat indices into
    P * D and the values there; left: [..., P, r], right: [..., r, D]; length (static): rows of X.
    """

    backbone: Any
    outlier_index: jax.Array
    outlier_value: jax.Array
    left: jax.Array
    right: jax.Array
    length: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class GEARCache:
    """k, v: GEARTensor [L, B, H_kv, S, D] of the prompt; tail: SlotKV [L, B, H_kv, T, D] of the decoded
    tokens (full precision, keys rotated); prompt_lengths: [B] int32 real prompt tokens per sequence."""

    k: GEARTensor
    v: GEARTensor
    tail: SlotKV
    prompt_lengths: jax.Array


def _scatter_add(x, index, value):
    """x: [..., P, D] plus `value: [..., n]` at flat indices `index: [..., n]` into each P * D matrix."""
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    flat = flat.at[rows, index.reshape(flat.shape[0], -1)].add(value.reshape(flat.shape[0], -1).astype(flat.dtype))
    return flat.reshape(x.shape)


def compress_tensor(
    x, axis: str, bits: int, rank: int, outliers: int, group_size: int, lengths=None, dtype=None
) -> GEARTensor:
    """GEAR-compress x: [..., S, D] (see the module docstring).

    axis: "tokens" (keys: per-channel groups of `group_size` tokens) or "channels" (values: per-token
    groups of `group_size` channels); outliers: sparse entries kept per matrix; lengths: real rows of
    each matrix, broadcastable to x.shape[:-2] (None: all S); dtype: of the stored outliers and
    factors (default x's).
    """
    dtype = x.dtype if dtype is None else dtype
    batch, (S, D) = x.shape[:-2], x.shape[-2:]
    if bits == 16:
        return GEARTensor(
            x,
            jnp.zeros(batch + (0,), jnp.int32),
            jnp.zeros(batch + (0,), dtype),
            jnp.zeros(batch + (S, 0), dtype),
            jnp.zeros(batch + (0, D), dtype),
            S,
        )
    P = -(-S // group_size) * group_size if axis == "tokens" else S
    lengths = jnp.broadcast_to(jnp.asarray(S if lengths is None else lengths, jnp.int32), batch)[..., None]
    rows = jnp.arange(P)
    real = (rows < lengths)[..., None]  # [..., P, 1]
    # Edge padding: rows past the length repeat the last real row, inside its own group's range.
    source = jnp.clip(jnp.minimum(rows, lengths - 1), 0, S - 1)
    x = jnp.take_along_axis(x.astype(jnp.float32), source[..., None], axis=-2)

    # (1) the largest-magnitude real entries, kept exactly
    score = jnp.where(real, jnp.abs(x), -1.0).reshape(*batch, P * D)
    _, index = jax.lax.top_k(score, outliers)
    value = jnp.take_along_axis(x.reshape(*batch, P * D), index, axis=-1)
    value = jnp.where(jnp.take_along_axis(score, index, axis=-1) >= 0, value, 0.0).astype(dtype)
    sparse = _scatter_add(jnp.zeros_like(x), index, value)
    # (2) the rest, quantized; (3) its residual on the real rows, low-rank
    backbone = quantize(x - sparse, bits, group_size, axis)
    residual = jnp.where(real, x - sparse - dequantize(backbone), 0.0)
    # The top right singular vectors of R are the top eigenvectors of its D x D Gram matrix: one matmul
    # and a small eigh, whatever the prompt length.
    r = min(rank, P, D)
    _, vectors = jnp.linalg.eigh(jnp.einsum("...pd,...pe->...de", residual, residual, precision=HIGHEST))
    right = vectors[..., D - r :]  # [..., D, r] (eigenvalues ascend)
    left = jnp.einsum("...pd,...dr->...pr", residual, right, precision=HIGHEST)
    right = jnp.swapaxes(right, -1, -2)
    return GEARTensor(backbone, index.astype(jnp.int32), value, left.astype(dtype), right.astype(dtype), S)


def reconstruct(t: GEARTensor, dtype=jnp.float32):
    """X_hat [..., length, D] = dequantized backbone + left @ right + outliers."""
    if not isinstance(t.backbone, QuantizedTensor):
        return t.backbone.astype(dtype)
    low_rank = jnp.matmul(t.left.astype(jnp.float32), t.right.astype(jnp.float32), precision=HIGHEST)
    x = dequantize(t.backbone) + low_rank
    return _scatter_add(x, t.outlier_index, t.outlier_value)[..., : t.length, :].astype(dtype)


@dataclasses.dataclass(frozen=True)
class GEAR(KVPolicy):
    """Quantized prompt K/V + low-rank residual + sparse outliers (see the module docstring)."""

    bits: int = 4
    rank: int = 4
    outlier_fraction: float = 0.01
    group_size: int = 32

    def __post_init__(self):
        check_policy_bits("GEAR", "bits", self.bits)
        check_positive_int("GEAR", "rank", self.rank, minimum=0)
        f = self.outlier_fraction
        if not is_real(f) or not 0 <= f < 1:
            raise ValueError(f"GEAR: outlier_fraction must be a number in [0, 1), got {shown(f)}")
        check_positive_int("GEAR", "group_size", self.group_size)

    def check(self, config, prompt_lengths):
        check_channel_groups("GEAR", self.bits, self.group_size, config.head_dim)
        check_within_context(
            "GEAR", "group_size", self.group_size, config, "keys are quantized in groups of that many tokens"
        )

    def outlier_count(self, tokens: int, head_dim: int) -> int:
        """Sparse entries kept per [tokens, head_dim] matrix (at least 1 for any fraction > 0)."""
        return max(1, round(self.outlier_fraction * tokens * head_dim)) if self.outlier_fraction else 0

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def compress(self, config, cache, observation, capacity):
        L, B, H, S, D = cache.k.shape
        lengths = cache.lengths[None, :, None]
        n = self.outlier_count(S, D)
        common = {"bits": self.bits, "rank": self.rank, "outliers": n, "lengths": lengths}
        k = compress_tensor(cache.k, "tokens", group_size=self.group_size, **common)
        v = compress_tensor(cache.v, "channels", group_size=min(self.group_size, D), **common)
        tail = empty_slots(L, B, H, capacity - S, D, cache.k.dtype)
        # The prompt occupies all S slots of every row (padding included), so `used` counts the tail's room.
        return GEARCache(k, v, tail, cache.lengths.astype(jnp.int32)), jnp.full_like(cache.lengths, S)

    def attend(self, config, data: GEARCache, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window

        dtype = data.tail.k.dtype
        out, tail = prompt_and_tail_attention(
            config,
            data.tail,
            index,
            q,
            k,
            v,
            positions,
            reconstruct(layer_slice(data.k, index), dtype),
            reconstruct(layer_slice(data.v, index), dtype),
            data.prompt_lengths,
            window,
        )
        return out, data.replace(tail=tail)
