"""The state-space cache: fixed-size recurrent states per layer, updated functionally by `forward`."""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from ssm_llm.memory import check_fits
from ssm_llm.ssm_config import Mamba2Config, MambaConfig
from ssm_llm.validation import as_int


@flax.struct.dataclass
class SSMCache:
    """Convolution and SSM states of every layer, plus each sequence's number of processed tokens.

    conv_state: [L, B, C, K-1] (the last K-1 inputs of the short convolution, oldest first);
    ssm_state: [L, B, D, N] (Mamba-1) or [L, B, H, P, N] (Mamba-2), float32;
    lengths: [B] int32. The size does not grow with the sequence, so there is no `max_len` limit.
    """

    conv_state: jax.Array
    ssm_state: jax.Array
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.ssm_state.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the cache buffers."""
        return sum(x.size * x.dtype.itemsize for x in (self.conv_state, self.ssm_state, self.lengths))

    def rows(self, index: jax.Array) -> SSMCache:
        """The states of sequences `index` [B'] of this one, in that order (rows may repeat): beam search's
        copying and reordering of beams."""
        return SSMCache(
            conv_state=self.conv_state[:, index], ssm_state=self.ssm_state[:, index], lengths=self.lengths[index]
        )


def init_ssm_cache(config: MambaConfig | Mamba2Config, batch: int, dtype=jnp.float32) -> SSMCache:
    """Zero states for `batch` sequences. The SSM state is always float32 (it accumulates over the
    whole sequence); `dtype` applies to the convolution state."""
    batch = as_int("batch", batch, 1)
    L, K = config.num_layers, config.conv_kernel
    if isinstance(config, Mamba2Config):
        conv = (L, batch, config.conv_dim, K - 1)
        ssm = (L, batch, config.num_heads, config.head_dim, config.state_size)
    else:
        conv = (L, batch, config.intermediate_size, K - 1)
        ssm = (L, batch, config.intermediate_size, config.state_size)
    check_fits(f"an SSM cache of batch={batch}", math.prod(conv) * jnp.dtype(dtype).itemsize + math.prod(ssm) * 4)
    return SSMCache(
        conv_state=jnp.zeros(conv, dtype), ssm_state=jnp.zeros(ssm, jnp.float32), lengths=jnp.zeros((batch,), jnp.int32)
    )
