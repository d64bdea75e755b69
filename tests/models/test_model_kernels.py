"""Whole-model parity of the Pallas kernels: the same logits with impl="interpret" (every dispatcher
runs its Pallas kernel in the interpreter) as with impl="xla" (the references), through a ragged
prefill and cached decode steps. Kept small: interpret mode is slow on CPU."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_hf_ssm_model

import converters
import ssm_llm


def _prefill_then_decode(params, config, impl, prompts, steps=2):
    """Logits of a right-padded prefill and `steps` greedy decode steps (the xla path picks the tokens)."""
    width = max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts])
    counts = jnp.asarray([len(p) for p in prompts])
    cache = ssm_llm.init_cache(config, len(prompts), width + steps)
    logits, cache = ssm_llm.forward(params, config, tokens, cache, token_counts=counts, impl=impl)
    out = [np.asarray(logits)[np.arange(len(prompts)), counts - 1]]
    for _ in range(steps):
        nxt = jnp.asarray(out[-1].argmax(-1))[:, None]
        logits, cache = ssm_llm.forward(params, config, nxt, cache, impl=impl)
        out.append(np.asarray(logits[:, 0]))
    return out


def _assert_same(params, config, prompts, atol):
    got = _prefill_then_decode(params, config, "interpret", prompts)
    want = _prefill_then_decode(params, config, "xla", prompts)
    for g, w in zip(got, want, strict=True):
        print("max |interpret - xla| logits:", np.abs(g - w).max())
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)
        assert (g.argmax(-1) == w.argmax(-1)).all()


def test_smollm2_interpret_matches_xla(smollm2):
    config, params, tokenizer, _ = smollm2
    prompts = [tokenizer("The capital of France is").input_ids, tokenizer("Hi").input_ids]
    _assert_same(params, config, prompts, atol=1e-4)  # measured 4.6e-5 (README quotes both)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_tiny_ssm_interpret_matches_xla(kind):
    # state_size 16: the SSD kernel's dots need every dimension >= 16.
    config, params = converters.load(tiny_hf_ssm_model(kind, state_size=16))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (19, 6)]
    _assert_same(params, config, prompts, atol=1e-5)  # measured 1.2e-6
