"""Token-level cascades: threshold 0 is the large model's greedy output and a threshold above the score's range
the small model's (each equal to `generate`); at any threshold every token is the argmax of the model that wrote
it given the text so far (both models teacher-forced on the final text), deferred exactly when the small model's
uncertainty reached the threshold; the lazy large model reads in few forwards; mixed families; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm import cascade

VOCAB = 96
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]


def llama(layers, hidden, seed):
    config = ssm_llm.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        eos_token_ids=(0,),
    )
    return ssm_llm.init_params(config, jax.random.PRNGKey(seed)), config


@pytest.fixture(scope="module")
def models():
    mamba = ssm_llm.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, state_size=8, num_layers=2, eos_token_ids=(0,)
    )
    return {
        "small": llama(1, 32, 0),
        "large": llama(2, 64, 1),
        "mamba": (ssm_llm.init_params(mamba, jax.random.PRNGKey(2)), mamba),
    }


def greedy(model, n):
    return ssm_llm.generate(model[0], model[1], PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=n)).tokens


def scores(model, prompt, new, how):
    """Teacher-forced argmax and uncertainty before each new token (and one past the last)."""
    params, config = model
    ids = jnp.asarray([prompt + new])
    logits, _ = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, ids.shape[1]))
    last = logits[0, len(prompt) - 1 :]
    return np.asarray(jnp.argmax(last, -1)), np.asarray(cascade.uncertainty(last, how))


@pytest.mark.parametrize(("small", "large"), [("small", "large"), ("mamba", "large"), ("small", "mamba")])
@pytest.mark.parametrize("n", [1, 12])
def test_threshold_zero_is_the_large_model_and_above_the_range_the_small_one(models, small, large, n):
    pair = models[small], models[large]
    everything = cascade.generate(*pair, PROMPTS, cascade.TokenCascade(0.0), max_new_tokens=n)
    assert everything.tokens == greedy(models[large], n) and everything.deferral_rate == 1.0
    assert everything.large_forwards <= n - 1  # at most a catch-up of one token per step after the first
    nothing = cascade.generate(*pair, PROMPTS, cascade.TokenCascade(1.5), max_new_tokens=n)
    assert nothing.tokens == greedy(models[small], n) and nothing.deferral_rate == 0.0
    assert nothing.large_forwards == 0


@pytest.mark.parametrize("how", cascade.UNCERTAINTIES)
@pytest.mark.parametrize("small", ["small", "mamba"])
def test_every_token_is_its_writers_argmax_and_deferred_exactly_past_the_threshold(models, small, how):
    n = 16
    alone = cascade.generate(models[small], models["large"], PROMPTS, cascade.TokenCascade(1e9, how), max_new_tokens=n)
    seen = np.concatenate([scores(models[small], p, t, how)[1] for p, t in zip(PROMPTS, alone.tokens, strict=True)])
    mixed = []
    levels = np.unique(seen)
    middles = (levels[1:] + levels[:-1]) / 2  # between two scores: no threshold sits on a rounding edge
    for threshold in middles[[len(middles) * 3 // 10, len(middles) * 7 // 10]].tolist():
        out = cascade.generate(
            models[small], models["large"], PROMPTS, cascade.TokenCascade(threshold, how), max_new_tokens=n
        )
        for prompt, new, flags, why in zip(PROMPTS, out.tokens, out.deferred, out.finish_reasons, strict=True):
            written = new + ([0] if why == "eos" else [])
            small_best, small_u = scores(models[small], prompt, new, how)
            large_best, _ = scores(models["large"], prompt, new, "chow")
            assert flags == (small_u[: len(written)] >= threshold).tolist()
            writer = np.where(flags, large_best[: len(written)], small_best[: len(written)])
            assert writer.tolist() == written
        mixed.append(0 < out.deferral_rate < 1)
        assert out.large_forwards <= sum(map(sum, out.deferred))
    assert any(mixed)


def test_bad_cascades_are_refused_by_name(models):
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        cascade.TokenCascade(0.5, "variance")
    with pytest.raises(ValueError, match="threshold"):
        cascade.TokenCascade(-0.1)
    small_vocab = ssm_llm.ModelConfig(
        vocab_size=50, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
    )
    with pytest.raises(ValueError, match="must share a vocabulary: the small model has 50 tokens, the large one 96"):
        cascade.generate(
            (ssm_llm.init_params(small_vocab, jax.random.PRNGKey(0)), small_vocab),
            models["large"],
            PROMPTS,
            cascade.TokenCascade(0.5),
        )
    with pytest.raises(TypeError, match="cascade must be a TokenCascade"):
        cascade.generate(models["small"], models["large"], PROMPTS, 0.5)
    with pytest.raises(ValueError, match="exceeds a model's context of 128 positions"):
        cascade.generate(models["small"], models["large"], PROMPTS, cascade.TokenCascade(0.5), max_new_tokens=125)
    with pytest.raises(ValueError, match="eos_token_ids"):
        cascade.generate(models["small"], models["large"], PROMPTS, cascade.TokenCascade(0.5), eos_token_ids=[VOCAB])
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        cascade.uncertainty(jnp.zeros((1, VOCAB)), "variance")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        cascade.generate(models["small"], models["large"], [[1], []], cascade.TokenCascade(0.5))
