"""Draft-tree attention on the Pallas (Triton) split-K kernel in interpret mode against its jnp reference,
on hypothesis-drawn ragged prefixes and random ancestor masks; a chain of drafts is causal cache
attention; errors, and the Triton lowering for GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import IMPL, assert_close, assert_lowers_to_triton, random_attention_inputs

from pallas_kernels.cache_attention import cache_attention_ref
from pallas_kernels.tree_attention import tree_attention, tree_attention_pallas, tree_attention_ref


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 2),
    steps=st.integers(1, 9),
    prefix=st.integers(0, 70),
    heads=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    data=st.data(),
)
def test_tree_attention_kernel_matches_reference(batch, steps, prefix, heads, dtype, data):
    kv_heads, group = heads
    cache = prefix + steps + data.draw(st.integers(0, 20))
    prefixes = jnp.array([data.draw(st.integers(0, prefix)) for _ in range(batch)])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    q, k, v, _, _ = random_attention_inputs(rng, batch, steps, kv_heads * group, kv_heads, cache, 16, dtype, False)
    mask = jnp.asarray((rng.random((batch, steps, steps)) < 0.4) | np.eye(steps, dtype=bool))
    got = tree_attention(q, k, v, prefixes, mask, impl=IMPL)
    assert_close(got, tree_attention_ref(q, k, v, prefixes, mask), dtype)


def test_tree_attention_of_a_chain_is_causal_cache_attention():
    q, k, v, _, _ = random_attention_inputs(np.random.default_rng(2), 2, 5, 6, 2, 40, 16, jnp.float32, False)
    prefix = jnp.array([30, 0])
    chain = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
    want = cache_attention_ref(q, k, v, prefix[:, None] + jnp.arange(5), prefix + 5)
    assert_close(tree_attention_ref(q, k, v, prefix, chain), want, jnp.float32)
    assert_close(tree_attention(q, k, v, prefix, chain, impl=IMPL), want, jnp.float32)


def test_tree_attention_errors():
    cache = jnp.ones((1, 1, 4, 16))
    with pytest.raises(ValueError, match=r"tree_mask must be \[B, T_q, T_q\]"):
        tree_attention(jnp.ones((1, 2, 2, 16)), cache, cache, jnp.array([1]), jnp.ones((1, 2, 3), bool))


def test_tree_attention_lowers_to_triton_for_gpu():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    # SmolLM2-135M shapes (9 heads, 3 kv heads, head_dim 64): 16 drafts against a 2000-token cache.
    assert_lowers_to_triton(
        tree_attention_pallas,
        bf16(1, 16, 9, 64),
        bf16(1, 3, 2000, 64),
        bf16(1, 3, 2000, 64),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((1, 16, 16), jnp.bool_),
    )
