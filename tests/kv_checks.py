"""Shared checks of the KV-compression tests."""

import jax.numpy as jnp
import numpy as np

import ssm_llm


def assert_decode_matches(params, config, dense, compressed, tokens, atol):
    """Feed the same `tokens` (ints, batch 1) to a dense and a compressed cache, one decode step each,
    and assert the logits agree within `atol`."""
    for token in tokens:
        want, dense = ssm_llm.forward(params, config, jnp.asarray([[token]]), dense)
        got, compressed = ssm_llm.forward(params, config, jnp.asarray([[token]]), compressed)
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, repeats: int = 8) -> list[int]:
    """The passkey 71432 between `repeats` fillers on each side, then the question (419 tokens at 8)."""
    text = (
        FILLER * repeats
        + "The pass key is 71432. Remember it. 71432 is the pass key. "
        + FILLER * repeats
        + "What is the pass key? The pass key is"
    )
    return tokenizer(text).input_ids


def passkey_answer(smollm2, policy, prompt=None) -> str:
    """SmolLM2's 8 greedy tokens after `passkey_prompt` (or `prompt`), with the KV policy `policy`."""
    config, params, tokenizer, _ = smollm2
    gen = ssm_llm.GenerationConfig(max_new_tokens=8, kv_compression=policy)
    tokens = prompt if prompt is not None else passkey_prompt(tokenizer)
    return tokenizer.decode(ssm_llm.generate(params, config, [tokens], gen).tokens[0])
