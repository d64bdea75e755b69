"""`speculative.in_place.cond_in_place`: the same values as `lax.cond`, and no copy of the carried buffer where a
branch writes into it — neither in a plain loop nor in the compiled speculative round, whose cache it carries."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_checks import LLAMA, ragged_prompts, wide_params

import ssm_llm
from ssm_llm.speculative import DraftModel, PromptLookup, decode, draft_model, self_speculative
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
    """Copies of f32[shape] outside the entry computation (which may copy an argument once, before any loop)."""
    inner = [block for block in hlo.split("\n\n") if not block.lstrip().startswith("ENTRY")]
    return sum(len(re.findall(rf"= f32\[{shape}\]\{{[^}}]*\}} copy\(", block)) for block in inner)


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


def _compiled_round(monkeypatch, drafter, cond=None) -> tuple[str, list[str]]:
    """The optimized HLO of the speculative loop `generate` runs, and the shapes of the caches it carries
    (the target's; a draft model's too). `cond` replaces `cond_in_place` in the round and the draft's commit."""
    if cond is not None:
        monkeypatch.setattr(decode, "cond_in_place", cond)
        monkeypatch.setattr(draft_model, "cond_in_place", cond)
    calls = []
    original = decode.speculative_decode

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ssm_llm.generation, "speculative_decode", spy)
    jax.clear_caches()  # trace anew: the loop's trace is cached, with whichever cond it saw
    prompts = ragged_prompts(np.random.default_rng(0), LLAMA.vocab_size)[:2]
    gen = ssm_llm.GenerationConfig(max_new_tokens=6, max_len=48, speculative=drafter)
    ssm_llm.generate(wide_params(LLAMA), LLAMA, prompts, gen)
    ((args, kwargs),) = calls
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, args)
    hlo = original.lower(*args, **kwargs).compile().as_text()  # (the cache was donated: lower from its shapes)
    caches = [c for c in (args[4], getattr(args[3], "cache", None)) if c is not None]  # target, draft model
    return hlo, [",".join(map(str, c.k.shape)) for c in caches]


def _draft_model():
    params, config = self_speculative(wide_params(LLAMA), LLAMA, layers=[0])
    return DraftModel(params, config, num_tokens=3)


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_model"])
def test_the_compiled_speculative_round_never_copies_a_cache(monkeypatch, drafter):
    # The round chooses between scoring the whole tree and the root alone (a draft model's commit between
    # computing a missing leaf or not); with lax.cond XLA copied the cache [L, B, H_kv, S, D] in and out of the
    # conditional, four copies per round (measured: ~4 ms of a 15 ms W8A8 round on SmolLM2).
    made = PromptLookup(num_tokens=3) if drafter == "prompt_lookup" else _draft_model()
    hlo, shapes = _compiled_round(monkeypatch, made)
    for shape in shapes:
        assert re.search(rf"f32\[{shape}\]", hlo), "the cache's shape should appear in the program"
        assert _copies_of(hlo, shape) == 0, shape


def test_with_lax_cond_the_same_check_finds_the_copies(monkeypatch):
    # The control: the check above would see the target cache's copies if they came back (6 here). (The draft
    # cache's commit, whose other branch returns its input, was not copied with lax.cond either.)
    hlo, (target, _) = _compiled_round(monkeypatch, _draft_model(), cond=jax.lax.cond)
    assert _copies_of(hlo, target) > 0
