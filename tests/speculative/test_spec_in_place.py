"""`speculative.in_place.cond_in_place`: the same values as `lax.cond`, and no copy of the carried buffer where a
branch writes into it — neither in a plain loop nor in the compiled speculative round, whose cache it carries."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_checks import LLAMA, ragged_prompts, wide_params

import ssm_llm
from ssm_llm.speculative import PromptLookup, decode
from ssm_llm.speculative.in_place import cond_in_place


def _branches():
    def write(c):
        buf, small = c
        return buf.at[3].set(buf[3] + small), small * 2

    def read(c):
        buf, small = c
        return buf, small + buf[0, :4].sum()

    return write, read


@pytest.mark.parametrize("pred", [True, False])
def test_it_gives_what_lax_cond_gives(pred):
    write, read = _branches()
    carry = (jnp.arange(32.0).reshape(8, 4), jnp.ones(4))
    expected = jax.jit(lambda p, c: jax.lax.cond(p, write, read, c))(pred, carry)
    got = jax.jit(lambda p, c: cond_in_place(p, write, read, c))(pred, carry)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copies_of(hlo: str, shape: str) -> int:
    return len(re.findall(rf"= f32\[{shape}\]\{{[^}}]*\}} copy\(", hlo))


def test_a_loop_that_writes_in_one_branch_copies_nothing():
    write, read = _branches()

    def loop(buf, cond=cond_in_place):
        def body(i, c):
            return cond(i % 2 == 0, write, read, c)

        return jax.lax.fori_loop(0, 5, body, (buf, jnp.ones(4)))

    buf = jnp.zeros((256, 4))
    hlo = jax.jit(loop, donate_argnums=0).lower(buf).compile().as_text()
    assert _copies_of(hlo, "256,4") == 0
    got, expected = jax.jit(loop)(buf), jax.jit(lambda b: loop(b, jax.lax.cond))(buf)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_compiled_speculative_round_never_copies_the_cache(monkeypatch):
    # The round chooses between scoring the whole tree and the root alone; with lax.cond XLA copied the cache
    # [L, B, H_kv, S, D] four times per round (measured: ~4 ms of a 15 ms W8A8 round on SmolLM2).
    calls = []
    original = decode.speculative_decode

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ssm_llm.generation, "speculative_decode", spy)
    params = wide_params(LLAMA)
    prompts = ragged_prompts(np.random.default_rng(0), LLAMA.vocab_size)[:2]
    gen = ssm_llm.GenerationConfig(max_new_tokens=6, max_len=48, speculative=PromptLookup(num_tokens=3))
    ssm_llm.generate(params, LLAMA, prompts, gen)
    ((args, kwargs),) = calls
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, args)
    hlo = original.lower(*args, **kwargs).compile().as_text()  # (the cache was donated: lower from its shapes)
    cache = args[4]
    shape = ",".join(map(str, cache.k.shape))
    assert re.search(rf"f32\[{shape}\]", hlo), "the cache's shape should appear in the program"
    assert _copies_of(hlo, shape) == 0
