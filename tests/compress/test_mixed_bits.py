"""Layer-wise mixed bit widths: the scores (LIM against its definition written out in numpy, ZD on planted
outliers), the allocation (exactly the asked average, the most important layers get the high width, averages no
layer count reaches refused with the nearest ones), rounding against a numpy round-to-nearest, and the rounded
model runs through `forward`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_llm
from ssm_llm.compress import allocate_bits, layer_scores, quantize_layers
from ssm_llm.compress.mixed_bits import round_to_nearest
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.quant.attention_calibration import layer_statistics

LLAMA = ssm_llm.ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(LLAMA, jax.random.PRNGKey(0))


def test_lim_is_one_minus_the_cosine_of_each_layers_input_and_output(params):
    tokens = np.random.default_rng(0).integers(0, 128, (2, 12))
    scores = layer_scores(params, LLAMA, "lim", tokens)
    x = np.asarray(params["embed"])[tokens].astype(np.float64)
    for i, layer in enumerate(unstack_layers(params)["layers"]):  # each layer's output, from its input
        y = np.asarray(layer_statistics(LLAMA, layer, jnp.asarray(x, jnp.float32), LLAMA.layer_windows[i])[0])
        y = y.astype(np.float64)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        np.testing.assert_allclose(scores[i], 1 - cos.mean(), rtol=1e-4, atol=1e-6)
        x = y


def test_zd_is_the_share_of_weights_past_one_standard_deviation(params):
    """Normal weights put 31.7% past one standard deviation, uniform ones 42.3%: a layer made uniform ranks first."""
    rng = np.random.default_rng(0)
    layers = {k: np.array(v) for k, v in params["layers"].items()}
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        layers[name][2] = rng.uniform(-0.03, 0.03, layers[name][2].shape)
    scores = layer_scores({**params, "layers": jax.tree_util.tree_map(jnp.asarray, layers)}, LLAMA, "zd")
    for i in range(4):
        w = np.concatenate([layers[n][i].reshape(-1) for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")])
        assert np.isclose(scores[i], np.mean(np.abs(w - w.mean()) > w.std()))
    assert (
        np.argmax(scores) == 2
        and abs(scores[2] - 0.423) < 0.01
        and all(abs(scores[i] - 0.317) < 0.01 for i in (0, 1, 3))
    )


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 40), low=st.integers(2, 7), span=st.integers(1, 4), seed=st.integers(0, 100))
def test_allocation_hits_the_average_exactly(layers, low, span, seed):
    high = min(low + span, 8)
    if high == low:
        return
    scores = np.random.default_rng(seed).random(layers)
    for n_high in range(layers + 1):
        target = low + n_high * (high - low) / layers
        bits = allocate_bits(scores, target, (low, high))
        assert np.isclose(np.mean(bits), target)
        if 0 < n_high < layers:  # the high width goes to the highest scores
            assert scores[np.array(bits) == high].min() >= scores[np.array(bits) == low].max()


def test_unreachable_averages_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="nearest are 3.33333 and 3.66667"):
        allocate_bits(np.arange(3.0), 3.5, (3, 4))
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(np.arange(4.0), 5, (3, 4))
    with pytest.raises(ValueError, match="widths"):
        allocate_bits(np.arange(4.0), 3, (4, 3))
    with pytest.raises(ValueError, match="score"):
        layer_scores({}, LLAMA, "hessian")


def test_mamba1_rounds_its_projections_only():
    """Quamba's list: in_proj, x_proj, dt_proj, out_proj; A_log, D and the conv taps stay. dt_proj reads
    time_step_rank (here 4) rows, which a group of 64 does not divide: it takes groups of 4."""
    config = ssm_llm.MambaConfig(vocab_size=64, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128)
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    rounded, average = quantize_layers(params, config, (4, 4), group=64)
    for name, x in params["layers"].items():
        same = np.array_equal(np.asarray(rounded["layers"][name]), np.asarray(x))
        assert same == (name not in ("in_proj", "x_proj", "dt_proj", "out_proj")), name
    sizes = {n: int(np.prod(params["layers"][n].shape[1:])) for n in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    rows = {n: params["layers"][n].shape[1] for n in sizes}
    want = sum(sizes[n] * (4 + 16 / np.gcd(rows[n], 64)) for n in sizes) / sum(sizes.values())
    assert np.isclose(average, want)
    assert len(layer_scores(params, config, "zd")) == 2


def test_rounding_against_numpy(params):
    w = np.asarray(params["layers"]["wq"][0])
    got = np.asarray(round_to_nearest(jnp.asarray(w), 3, 16))
    groups = w.reshape(4, 16, -1)
    scale = np.abs(groups).max(1, keepdims=True) / 3
    want = (np.clip(np.round(groups / scale), -3, 3) * scale).reshape(w.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert len(np.unique(got[:16, 0])) <= 7


def test_mixed_model_runs_and_counts_its_bits(params):
    bits = allocate_bits(layer_scores(params, LLAMA, "zd"), 3.5, (3, 4))
    rounded, average = quantize_layers(params, LLAMA, bits, group=16)
    assert np.isclose(average, 3.5 + 1.0)  # codes plus a 16-bit scale per 16 rows
    tokens = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
    logits, _ = ssm_llm.forward(rounded, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 1, 8))
    want, _ = ssm_llm.forward(params, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 1, 8))
    assert np.isfinite(logits).all() and 0 < np.abs(np.asarray(logits) - np.asarray(want)).max() < 0.5
    with pytest.raises(ValueError, match="widths"):
        quantize_layers(params, LLAMA, (3, 4, 9, 3))
    with pytest.raises(ValueError, match="4 layers"):
        quantize_layers(params, LLAMA, (3, 4))
