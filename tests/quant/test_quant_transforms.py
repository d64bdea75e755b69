"""Quamba2's mathematically neutral transforms: Hadamard rotation with folded norms, and the Mamba-2
sort-and-cluster reordering, leave the float logits unchanged."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_llm import forward, init_cache
from ssm_llm.models.mamba_lm import init_params
from ssm_llm.quant.reorder import permute_mamba2, segment_1d, sort_and_cluster
from ssm_llm.quant.rotation import fold_norms, hadamard, hadamard_block, rotate_model
from ssm_llm.quant.scheme import QuantizedSSMConfig, QuantScheme
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

MAMBA2 = Mamba2Config(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    state_size=16,
    intermediate_size=128,
    num_heads=8,
    head_dim=16,
    n_groups=2,
    chunk_size=16,
    tie_word_embeddings=True,
)
MAMBA1 = MambaConfig(vocab_size=96, hidden_size=48, num_layers=2, state_size=8, intermediate_size=96)
FLOAT = QuantScheme(weight_bits=16, act_bits=16, cluster=False, bc_groups=False, gptq=False)


def _params(config, seed=0):
    params = init_params(config, jax.random.PRNGKey(seed))
    # Larger out_proj / in_proj weights than the init's, so errors would show in the logits.
    layers = dict(params["layers"])
    layers["out_proj"] = layers["out_proj"] * 10
    return {**params, "layers": layers}


def _logits(params, config, tokens):
    return forward(params, config, tokens, init_cache(config, tokens.shape[0], tokens.shape[1]))[0]


def _tokens(config, batch=2, steps=24, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, steps), 0, config.vocab_size)


def _random_clusters(config, seed=0):
    stats = np.exp(np.random.default_rng(seed).normal(size=(config.num_layers, config.intermediate_size)) * 2)
    return sort_and_cluster(stats, config, head_groups=2, dim_groups=4)


@pytest.mark.parametrize("config", [MAMBA2, MAMBA1], ids=["mamba2", "mamba1"])
def test_rotation_and_folding_keep_logits(config):
    params, tokens = _params(config), _tokens(config)
    ref = _logits(params, config, tokens)
    folded = fold_norms(params, config)
    np.testing.assert_allclose(
        _logits(folded, QuantizedSSMConfig(config, dataclasses.replace(FLOAT, hadamard=False)), tokens),
        ref,
        atol=1e-4,
        rtol=1e-4,
    )
    rotated = rotate_model(params, config)
    assert "lm_head" in rotated and np.allclose(rotated["layers"]["norm"], 1.0)
    np.testing.assert_allclose(_logits(rotated, QuantizedSSMConfig(config, FLOAT), tokens), ref, atol=1e-4, rtol=1e-4)


def test_reordering_keeps_logits_and_composes_with_rotation():
    params, tokens = _params(MAMBA2), _tokens(MAMBA2)
    ref = _logits(params, MAMBA2, tokens)
    clusters = _random_clusters(MAMBA2)
    permuted = permute_mamba2(params, MAMBA2, clusters)
    assert not np.allclose(permuted["layers"]["out_proj"], params["layers"]["out_proj"])
    np.testing.assert_allclose(_logits(permuted, MAMBA2, tokens), ref, atol=1e-4, rtol=1e-4)
    both = rotate_model(permuted, MAMBA2)
    np.testing.assert_allclose(_logits(both, QuantizedSSMConfig(MAMBA2, FLOAT), tokens), ref, atol=1e-4, rtol=1e-4)


def test_transformed_model_cached_decode_equals_full_forward():
    params, tokens = _params(MAMBA2), _tokens(MAMBA2, steps=12)
    config = QuantizedSSMConfig(MAMBA2, FLOAT)
    model = rotate_model(permute_mamba2(params, MAMBA2, _random_clusters(MAMBA2)), MAMBA2)
    full = _logits(model, config, tokens)
    cache = init_cache(config, 2, 12)
    logits, cache = forward(model, config, tokens[:, :8], cache)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = forward(model, config, tokens[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 96, 7])
def test_hadamard_is_symmetric_orthogonal_for_any_size(n):
    x = np.random.default_rng(n).normal(size=(3, n)).astype(np.float32)
    q = np.asarray(hadamard(np.eye(n, dtype=np.float32)))
    np.testing.assert_allclose(q, q.T, atol=1e-6)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(hadamard(x), x @ q, atol=1e-5)
    block = hadamard_block(n)
    assert n % block == 0 and block & (block - 1) == 0 and (n // block) % 2 == 1
    if block > 1:  # every channel of a block is mixed into every output of the block
        assert np.all(np.abs(q[:block, :block]) > 0)


def test_segment_1d_is_optimal():
    rng = np.random.default_rng(3)
    for _ in range(20):
        values = np.sort(rng.normal(size=7))
        ids = segment_1d(values, 3)
        assert list(np.unique(ids)) == [0, 1, 2] and np.all(np.diff(ids) >= 0)

        def sse(cuts, values=values):
            parts = np.split(values, cuts)
            return sum(((p - p.mean()) ** 2).sum() for p in parts)

        best = min(sse(c) for c in itertools.combinations(range(1, 7), 2))
        got = sse(np.flatnonzero(np.diff(ids)) + 1)
        assert got == pytest.approx(best, abs=1e-9)


def test_sort_and_cluster_structure():
    config, clusters = MAMBA2, _random_clusters(MAMBA2, seed=5)
    P, per_group = config.head_dim, config.num_heads // config.n_groups
    for layer in range(config.num_layers):
        perm, hperm, cl = clusters.channel_perm[layer], clusters.head_perm[layer], clusters.cluster[layer]
        assert sorted(perm) == list(range(config.intermediate_size)) and sorted(hperm) == list(range(8))
        assert np.all(hperm // per_group == np.arange(8) // per_group)  # heads stay in their SSD group
        assert np.all(perm // P == np.repeat(hperm, P))  # channels stay in their head
        assert cl.min() >= 0 and cl.max() < clusters.n_clusters
        ssd_group = cl // (2 * 4)
        assert np.all(ssd_group == np.arange(config.intermediate_size) // (P * per_group))


def test_scheme_errors():
    with pytest.raises(ValueError, match="unsupported bit pair W4A4"):
        QuantScheme(weight_bits=4, act_bits=4)
    with pytest.raises(ValueError, match="unsupported bit pair W8A16"):
        QuantScheme.quamba2("W8A16")
    with pytest.raises(ValueError, match="look like"):
        QuantScheme.quamba2("int8")
    with pytest.raises(ValueError, match="observer"):
        QuantScheme(observer="mse")
    with pytest.raises(ValueError, match="Mamba-1 has no heads"):
        QuantizedSSMConfig(MAMBA1, QuantScheme.quamba2("W8A8"))
    with pytest.raises(ValueError, match="heads per SSD group"):
        QuantizedSSMConfig(MAMBA2, QuantScheme.quamba2("W8A8", head_groups=8))
    QuantizedSSMConfig(MAMBA1, QuantScheme.quamba("W4A8"))
