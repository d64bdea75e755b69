"""RoPE's cos and sin tables are computed once per forward on one CPU device (not again inside every layer's fused q
and k products), and hold the same values as computed plainly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_hf_model

import converters
import ssm_llm
from ssm_llm.config import RopeConfig
from ssm_llm.rope import _cos_sin, inverse_frequencies, rope_tables

pytestmark = pytest.mark.optimized_xla  # the property is about XLA's fusion, which runs optimized


def _cosines(params, config, tokens, cache) -> int:
    text = jax.jit(lambda t, c: ssm_llm.forward(params, config, t, c)).lower(tokens, cache).compile().as_text()
    return sum(" cosine(" in line for line in text.splitlines())


@pytest.mark.skipif(jax.default_backend() != "cpu" or jax.device_count() > 1, reason="one CPU device")
@pytest.mark.parametrize("layers", [3, 6])
def test_a_decode_step_computes_cos_once_whatever_the_depth(layers):
    """Once in each branch of the conditional that computes the tables apart (fused, it was twice a layer)."""
    config, params = converters.load(tiny_hf_model("llama", num_hidden_layers=layers))
    cache = ssm_llm.init_cache(config, batch=2, max_len=16)
    assert _cosines(params, config, jnp.ones((2, 1), jnp.int32), cache) == 2
    assert _cosines(ssm_llm.unstack_layers(params), config, jnp.ones((2, 1), jnp.int32), cache) == 2


def test_the_tables_are_cos_and_sin():
    positions = jnp.asarray([[0, 1, 2, 70000], [5, 6, 7, 8]], jnp.int32)
    inv = inverse_frequencies(RopeConfig(), 16)
    got = jax.jit(lambda p: rope_tables(p, inv))(positions)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    for a, b in zip(got, jax.jit(_cos_sin)(angles), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
