"""One small real-model check per KV-compression method (the long ones are `-m slow` and
`experiments/kv_compression_eval.py`): SmolLM2-135M, a 64-token prompt compressed at a real setting, then
4 teacher-forced tokens; the mean KL(full || compressed) of the next-token laws lies in a band around the
value measured on a CPU (bounds about 2x the measurement; the lower bound shows the setting really
compresses). They catch a method that breaks on the real model's shapes and outlier channels, which the
tiny-model tests cannot."""

import jax
import jax.numpy as jnp
import pytest

import ssm_llm
from ssm_llm.kv import GEAR, KIVI, XKV, MiniCache, MixedPrecisionKV, RotateKV, TokenSelect, compress_cache
from ssm_llm.models import attention_lm

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith from "
    "Mainz, combined movable metal type, oil-based ink and a wooden screw press into a system that could produce "
    "books quickly and cheaply. Before his invention, books were copied by hand, usually by monks working in "
    "scriptoria, and a single volume could take months to finish."
)
PROMPT, FED, WINDOW = 64, 4, 32  # WINDOW: the last prompt queries observed (MixedPrecisionKV's default window)


@pytest.fixture(scope="module")
def prompt_cache(smollm2):
    """(dense prefill cache, observation, fed tokens, full-cache log-probs [FED, V] after each fed token)."""
    config, params, tokenizer, _ = smollm2
    ids = tokenizer(TEXT).input_ids[: PROMPT + FED]
    full, _ = ssm_llm.forward(params, config, jnp.asarray([ids]), ssm_llm.init_cache(config, 1, PROMPT + FED))
    prefill = jax.jit(
        lambda params, tokens: attention_lm.prefill_observed(
            params, config, tokens, ssm_llm.init_cache(config, 1, PROMPT), jnp.asarray([PROMPT]), WINDOW, "xla"
        )[1:]
    )
    cache, observation = prefill(params, jnp.asarray([ids[:PROMPT]]))
    return cache, observation, jnp.asarray(ids[PROMPT:]), jax.nn.log_softmax(full[0, PROMPT:], axis=-1)


# (policy, KL band); measured mean KL in the comment.
METHODS = {
    "kivi": (KIVI(bits=4, group_size=32, residual=32), 1e-4, 0.02),  # 0.0071
    "rotatekv": (RotateKV(bits=4, group_size=64), 1e-3, 0.1),  # 0.044
    "mixed": (MixedPrecisionKV(high_bits=8, low_bits=2), 1e-3, 0.2),  # 0.095
    "gear": (GEAR(bits=4, rank=4), 1e-4, 0.02),  # 0.0093
    "minicache": (MiniCache(start_layer=20), 0.1, 1.0),  # 0.49 (lossy on SmolLM2, as README says)
    "xkv": (XKV(rank=32), 0.05, 0.7),  # 0.34 (keys rank 32, values 48 of 64)
    "tokenselect": (TokenSelect(k=16, sinks=4, local=16), 1e-4, 0.02),  # 0.0057 (attends to 36 of 64+ tokens)
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compressed_cache_stays_close_to_the_full_cache(smollm2, prompt_cache, name):
    config, params, _, _ = smollm2
    policy, low, high = METHODS[name]
    cache, observation, fed, want = prompt_cache

    @jax.jit
    def teacher_forced(params, cache, observation, fed):
        def step(cache, token):
            logits, cache = ssm_llm.forward(params, config, token[None, None], cache)
            return cache, logits[0, 0]

        return jax.lax.scan(step, compress_cache(config, cache, policy, PROMPT + 32, observation), fed)[1]

    got = jax.nn.log_softmax(teacher_forced(params, cache, observation, fed), axis=-1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(want) * (want - got), axis=-1)))
    print(f"{name}: mean KL {kl:.4f}")
    assert low < kl < high, (policy, kl)
