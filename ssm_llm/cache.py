"""The attention KV cache: an explicit pytree, updated functionally by `forward`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.config import ModelConfig
from ssm_llm.memory import check_fits
from ssm_llm.validation import as_int


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

    def rows(self, index: jax.Array) -> KVCache:
        """The cache of sequences `index` [B'] of this one, in that order (rows may repeat): beam search's
        copying and reordering of beams."""
        return KVCache(k=self.k[:, index], v=self.v[:, index], lengths=self.lengths[index])


def cache_shapes(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """The cache `init_cache` would make, as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
    batch, max_len = as_int("batch", batch, 1), as_int("max_len", max_len, 1)
    shape = jax.ShapeDtypeStruct((config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim), dtype)
    return KVCache(k=shape, v=shape, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens each."""
    shapes = cache_shapes(config, batch, max_len, dtype)
    check_fits(f"a KV cache of batch={batch}, max_len={max_len}", shapes.k.size * shapes.k.dtype.itemsize * 2)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
