"""The attention KV cache: an explicit pytree, updated functionally by `forward`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, plus each sequence's number of cached tokens.

    k, v: [L, B, H_kv, S_max, D]; lengths: [B] int32 (an array, so it can change inside jit and
    `lax.while_loop`). Entries at positions >= lengths[b] are unused and never attended to.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        """Bytes held by the cache buffers."""
        return sum(x.size * x.dtype.itemsize for x in (self.k, self.v, self.lengths))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens each."""
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32)
    )
