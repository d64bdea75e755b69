"""Stuffed Mamba's "forget more, remember less" (`Mamba2Config(state_decay=..., state_input_scale=...)`): the
reformulated scan equals a step-by-step recurrence with the decay and the input scaled directly; cached decode,
ragged batches and speculative decoding still equal the full forward; a decay near 0 forgets everything past the
convolutions' reach; bad values are refused by name and the fields survive a config round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from pallas_kernels.ssd import ssd_chunked
from ssm_llm.models.mamba_mixers import _conv, mamba2_block
from ssm_llm.speculative import PromptLookup

BASE = ssm_llm.Mamba2Config(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    state_size=8,
    intermediate_size=64,
    num_heads=4,
    head_dim=16,
    n_groups=2,
    chunk_size=8,
)
FIXED = dataclasses.replace(BASE, state_decay=0.9, state_input_scale=0.6)


@pytest.fixture(scope="module")
def params():
    """Random weights with a long memory (a random init's small dt and D skip keep almost none): dt about 0.7,
    A = -0.05, so a step keeps 97% of the state, and no D skip."""
    params = ssm_llm.init_params(BASE, jax.random.PRNGKey(0))
    layers = dict(params["layers"])
    layers["dt_bias"] = jnp.full_like(layers["dt_bias"], 0.2)
    layers["A_log"] = jnp.full_like(layers["A_log"], np.log(0.05))
    layers["D"] = jnp.zeros_like(layers["D"])
    return {**params, "layers": layers}


def _naive_scan(decay, input_scale):
    """The Stuffed Mamba recurrence written out: h = decay exp(dt A) h + input_scale dt x B^T; y = h C + D x."""

    def scan(x, dt, A, B, C, D):
        x, dt, A, B, C, D = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D))
        batch, steps, heads, _ = x.shape
        group = heads // B.shape[2]
        h = np.zeros((batch, heads, x.shape[-1], B.shape[-1]))
        ys = []
        for t in range(steps):
            Bt, Ct = np.repeat(B[:, t], group, axis=1), np.repeat(C[:, t], group, axis=1)  # [b, heads, n]
            alpha = decay * np.exp(dt[:, t] * A)  # [b, heads]
            h = alpha[..., None, None] * h + input_scale * (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
            ys.append(np.einsum("bhpn,bhn->bhp", h, Ct) + D[:, None] * x[:, t])
        return jnp.asarray(np.stack(ys, 1), jnp.float32), None

    return scan


def test_reformulated_scan_equals_the_recurrence_written_out(params):
    """mamba2_block with the fields set (dt shifted, x rescaled, the real chunked SSD) against the plain block
    whose scan is the recurrence with the decay and input scale applied directly."""
    p = jax.tree_util.tree_map(lambda x: x[0], params["layers"])  # the first layer's weights
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 21, BASE.hidden_size)) * 0.5
    counts = jnp.asarray([21, 21], jnp.int32)
    conv_state = jnp.zeros((2, BASE.conv_dim, BASE.conv_kernel - 1))

    def conv(xbc):
        return _conv(p, xbc, conv_state, counts, "xla")

    def real_scan(x, dt, A, B, C, D):
        return ssd_chunked(x, dt, A, B, C, D, jnp.zeros((2, 4, 16, 8)), 8, impl="xla")

    for skip in (0.0, 1.0):  # the fixture's weights have no D skip; with one, it must see the unscaled input
        layer = {**p, "D": jnp.full_like(p["D"], skip)}
        got, _, _ = mamba2_block(FIXED, layer, h, conv, real_scan)
        want, _, _ = mamba2_block(BASE, layer, h, conv, _naive_scan(0.9, 0.6))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-4)
        if not skip:  # the fix changes the output
            plain, _, _ = mamba2_block(BASE, layer, h, conv, real_scan)
            assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 0.05 * np.abs(np.asarray(plain)).max()


def test_cached_decode_and_ragged_rows_equal_the_full_forward(params):
    ids = np.random.default_rng(0).integers(0, 97, 19).tolist()
    full, full_cache = ssm_llm.forward(params, FIXED, jnp.asarray([ids]), ssm_llm.init_cache(FIXED, 1, 32))
    cache, pieces = ssm_llm.init_cache(FIXED, 1, 32), []
    for start, stop in [(0, 6), (6, 15)] + [(t, t + 1) for t in range(15, 19)]:
        logits, cache = ssm_llm.forward(params, FIXED, jnp.asarray([ids[start:stop]]), cache)
        pieces.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(pieces), np.asarray(full[0]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.ssm_state), np.asarray(full_cache.ssm_state), atol=2e-5)
    # a padded row: the padding's steps must stay identities although dt is shifted (the state after them is
    # the state after the row's own 7 tokens), and the next step continues from there
    padded = jnp.asarray([ids[:7] + [5] * 12, ids])
    _, cache = ssm_llm.forward(
        params, FIXED, padded, ssm_llm.init_cache(FIXED, 2, 32), token_counts=jnp.asarray([7, 19], jnp.int32)
    )
    _, alone = ssm_llm.forward(params, FIXED, jnp.asarray([ids[:7]]), ssm_llm.init_cache(FIXED, 1, 32))
    np.testing.assert_allclose(np.asarray(cache.ssm_state[:, 0]), np.asarray(alone.ssm_state[:, 0]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(cache.conv_state[:, 0]), np.asarray(alone.conv_state[:, 0]), atol=2e-6)
    nxt, _ = ssm_llm.forward(params, FIXED, jnp.asarray([[3], [3]]), cache)
    solo, _ = ssm_llm.forward(params, FIXED, jnp.asarray([[3]]), alone)
    np.testing.assert_allclose(np.asarray(nxt[0]), np.asarray(solo[0]), atol=2e-5)


def test_generate_and_speculative_decoding(params):
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5]]
    gen = ssm_llm.GenerationConfig(max_new_tokens=12)
    plain = ssm_llm.generate(params, FIXED, prompts, gen)
    fast = ssm_llm.generate(params, FIXED, prompts, dataclasses.replace(gen, speculative=PromptLookup()))
    assert fast.tokens == plain.tokens
    for row, prompt in enumerate(prompts):  # greedy tokens are the full forward's argmax, teacher-forced
        seq = prompt + plain.tokens[row]
        logits, _ = ssm_llm.forward(params, FIXED, jnp.asarray([seq]), ssm_llm.init_cache(FIXED, 1, 64))
        assert np.argmax(np.asarray(logits[0, len(prompt) - 1 : -1]), -1).tolist() == plain.tokens[row]


def test_a_tiny_decay_forgets_what_the_convolutions_cannot_reach(params):
    """With decay ~0 the state holds one step: the last logits depend on the last few tokens only (the short
    convolutions reach 3 steps back per layer); with the model as trained a token 12 steps back still counts."""
    ids = np.random.default_rng(1).integers(0, 97, 20)
    changed = ids.copy()
    changed[7] = (changed[7] + 1) % 97  # 12 steps before the last token

    def last(config, seq):
        logits, _ = ssm_llm.forward(params, config, jnp.asarray([seq]), ssm_llm.init_cache(config, 1, 32))
        return np.asarray(logits[0, -1])

    forgetful = dataclasses.replace(BASE, state_decay=1e-30)
    kept = np.abs(last(BASE, ids) - last(BASE, changed)).max()
    forgotten = np.abs(last(forgetful, ids) - last(forgetful, changed)).max()
    assert forgotten == 0.0 and kept > 1e-5  # measured: 0.0 and 6.8e-5 (a random model's logits are small)


def test_bad_values_and_round_trip():
    bad_values = (dict(state_decay=1e-31), dict(state_decay=1.5), dict(state_input_scale=0.0), dict(state_decay="x"))
    for bad in bad_values:
        with pytest.raises(ValueError, match="config.state_"):
            dataclasses.replace(BASE, **bad)
    assert ssm_llm.config_from_dict(FIXED.to_dict()) == FIXED
