"""Layer-wise mixed bit widths: the scores (LIM against its definition written out in numpy, ZD on planted
outliers), the allocation (exactly the asked average, the most important layers get the high width, averages no
layer count reaches refused with the nearest ones), the stored codes (each layer at its width, round-to-nearest
against numpy, GPTQ against `gptq_quantize` on the inputs through the quantized layers before), the bits counted
from the bytes held, and the quantized model's `forward` equal to the float model holding its dequantized weights,
cached decode included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
import ssm_llm
from pallas_kernels.quantized_matmul import QuantizedWeight, dequantize_weights
from ssm_llm.compress import allocate_bits, bits_per_weight, layer_scores, quantize_layers
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.models.lm_head import embed_tokens
from ssm_llm.quant import gptq_quantize
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


def _dequantized(params, config):
    """The float model holding the quantized linears' dequantized weights (the reference forward)."""
    layers = [
        {n: dequantize_weights(w) if isinstance(w, QuantizedWeight) else w for n, w in layer.items()}
        for layer in params["layers"]
    ]
    return {**params, "layers": layers}


def test_mamba1_quantizes_its_projections_only():
    """Quamba's list: in_proj, x_proj, dt_proj, out_proj; A_log, D and the conv taps stay. dt_proj reads
    time_step_rank (here 8) rows, which a group of 64 does not divide: it takes groups of 8."""
    config = ssm_llm.MambaConfig(
        vocab_size=64, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128, time_step_rank=8
    )
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    quantized, same_config = quantize_layers(params, config, (4, 3), group=64, progress=False)
    assert same_config is config
    names = ("in_proj", "x_proj", "dt_proj", "out_proj")
    for i, layer in enumerate(quantized["layers"]):
        for name, x in layer.items():
            assert isinstance(x, QuantizedWeight) == (name in names), name
            if name in names:
                assert x.bits == (4, 3)[i] and x.group_size == np.gcd(x.shape[0], 64)
    tokens = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
    got, _ = ssm_llm.forward(quantized, config, tokens, ssm_llm.init_cache(config, 1, 8))
    want, _ = ssm_llm.forward(_dequantized(quantized, config), config, tokens, ssm_llm.init_cache(config, 1, 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert len(layer_scores(params, config, "zd")) == 2


def test_round_to_nearest_codes_against_numpy(params):
    bits = (3, 5, 2, 8)
    quantized, config = quantize_layers(params, LLAMA, bits, group=16, progress=False)
    assert config.quantization == "wxa16" and isinstance(quantized["layers"], list)
    for i, layer in enumerate(unstack_layers(params)["layers"]):
        w = np.asarray(layer["wq"], np.float32)
        qw = quantized["layers"][i]["wq"]
        assert qw.bits == bits[i] and qw.scales.dtype == jnp.float16 and qw.values.size * 8 == w.size * bits[i]
        groups = w.reshape(4, 16, -1)
        scale = (np.abs(groups).max(1, keepdims=True) / (127 if bits[i] == 8 else 2 ** (bits[i] - 1) - 1)).astype(
            np.float16
        )
        want = (np.round(groups / scale.astype(np.float32)) * scale.astype(np.float32)).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(dequantize_weights(qw)), want, rtol=1e-6, atol=1e-7)


def test_mixed_model_equals_its_dequantized_float_model_and_counts_its_bits(params):
    bits = allocate_bits(layer_scores(params, LLAMA, "zd"), 3.5, (3, 4))
    quantized, config = quantize_layers(params, LLAMA, bits, group=16, progress=False)
    assert np.isclose(bits_per_weight(quantized, config), 3.5 + 1.0)  # codes plus a 16-bit scale per 16 rows
    assert np.isclose(bits_per_weight(params, LLAMA), 32.0)
    minmax, _ = quantize_layers(params, LLAMA, bits, group=16, symmetric=False, progress=False)
    assert np.isclose(bits_per_weight(minmax, config), 3.5 + 2.0)  # and a 16-bit offset
    reference = _dequantized(quantized, config)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
    got, cache = ssm_llm.forward(quantized, config, tokens[:, :5], ssm_llm.init_cache(config, 1, 8))
    step, _ = ssm_llm.forward(quantized, config, tokens[:, 5:], cache)
    want, _ = ssm_llm.forward(reference, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 1, 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :5]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), np.asarray(want[:, 5:]), rtol=1e-5, atol=1e-5)
    float_logits, _ = ssm_llm.forward(params, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 1, 8))
    assert 0 < np.abs(np.asarray(want) - np.asarray(float_logits)).max() < 0.5


def test_gptq_quantizes_each_layer_on_the_inputs_of_the_quantized_layers_before(params):
    tokens = np.random.default_rng(0).integers(0, 128, (2, 24))
    bits = (3, 4, 3, 4)
    quantized, config = quantize_layers(
        params, LLAMA, bits, group=16, method="gptq", symmetric=False, calibration=tokens, progress=False
    )
    x = embed_tokens(params, LLAMA, jnp.asarray(tokens, jnp.int32))
    for i, layer in enumerate(unstack_layers(params)["layers"]):
        _, stats = layer_statistics(LLAMA, layer, x, LLAMA.layer_windows[i], True)
        want = gptq_quantize(
            np.asarray(layer["w_up"]), np.asarray(stats["mlp_in"]["xtx"], np.float64), bits[i], 16,
            symmetric=False, scale_dtype=jnp.float16,
        )  # fmt: skip
        got = quantized["layers"][i]["w_up"]
        np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
        np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
        np.testing.assert_array_equal(np.asarray(got.offsets), np.asarray(want.offsets))
        x, _ = layer_statistics(config, quantized["layers"][i], x, LLAMA.layer_windows[i])


def test_quantize_layers_refuses_bad_requests_by_name(params):
    mamba = ssm_llm.MambaConfig(vocab_size=64, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128)
    cases = [
        (lambda: quantize_layers(params, LLAMA, (3, 4, 9, 3)), "widths must be ints in"),
        (lambda: quantize_layers(params, LLAMA, (3, 4)), "2 widths for 4 layers"),
        (lambda: quantize_layers(params, LLAMA, (4,) * 4, group=0), "group must be a positive int"),
        (lambda: quantize_layers(params, LLAMA, (4,) * 4, method="awq"), "method must be one of"),
        (lambda: quantize_layers(params, LLAMA, (4,) * 4, method="gptq"), "needs calibration="),
        (lambda: quantize_layers(params, LLAMA, (4,) * 4, calibration=np.ones((1, 4), int)), "used by method 'gptq'"),
        (lambda: quantize_layers({}, mamba, (4, 4), method="gptq", calibration=[[1]]), "use 'rtn' for Mamba"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    quantized, config = quantize_layers(params, LLAMA, (4,) * 4, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_layers(quantized, config, (4,) * 4)
    floats = [dict(layer) for layer in quantized["layers"]]
    floats[1]["wo"] = unstack_layers(params)["layers"][1]["wo"]
    with pytest.raises(
        ValueError, match=r"\['layers'\]\[1\]\['wo'\] holds float weights, but config.quantization is 'wxa16'"
    ):
        ssm_llm.forward(
            {**quantized, "layers": floats}, config, jnp.ones((1, 2), jnp.int32), ssm_llm.init_cache(config, 1, 4)
        )


def test_mixed_checkpoint_round_trip(params, tmp_path):
    """converters.save / load keep every width's codes (bit planes included) and the per-layer list."""
    quantized, config = quantize_layers(params, LLAMA, (2, 3, 5, 6), group=16, symmetric=False, progress=False)
    converters.save(quantized, config, tmp_path / "ckpt")
    loaded_config, loaded = converters.load(tmp_path / "ckpt")
    assert loaded_config == config and [layer["wq"].bits for layer in loaded["layers"]] == [2, 3, 5, 6]
    for a, b in zip(jax.tree_util.tree_leaves(quantized), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
