"""Calibrated quantization of attention models: the layer-by-layer calibration pass computes the model's own
hidden states, SmoothQuant leaves the float model unchanged (exactly, up to float rounding) while flattening
the activations' outlier channels, and quantize_weights(calibration=..., smoothing=..., gptq=...) lowers the
error of the quantized model against float32 on a model with planted outlier channels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm.layer_layout import stack_layers, unstack_layers
from ssm_llm.models.lm_head import logits_from_hidden
from ssm_llm.norm import rms_norm
from ssm_llm.quant.attention_calibration import SITES, layer_statistics
from ssm_llm.quant.smoothquant import smooth_layer

CONFIGS = {
    "gqa": ssm_llm.ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    ),
    "bias+window": ssm_llm.ModelConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        qkv_bias=True,
        mlp_bias=True,
        layer_windows=(4, 0),
    ),
}
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 97)


def outlier_params(config, seed=0):
    """Random params whose residual stream has a few large channels (as trained LLMs have): big norm
    weights on two channels and a large embedding column, so per-token int8 rounding hurts."""
    params = ssm_llm.init_params(config, jax.random.PRNGKey(seed))
    layers = dict(params["layers"])
    for norm in ("attn_norm", "mlp_norm"):
        layers[norm] = layers[norm].at[:, :2].mul(30.0)
    layers["w_up"] = layers["w_up"].at[:, :, 5].mul(20.0)  # one large down_in channel
    embed = params["embed"].at[:, 3].mul(25.0)
    return {**params, "embed": embed, "layers": layers}


def calibration_hidden(params, config, tokens):
    x = params["embed"][tokens]
    for i, layer in enumerate(unstack_layers(params)["layers"]):
        x, stats = layer_statistics(config, layer, x, config.layer_windows[i], hessians=True)
    return x, stats


@pytest.mark.parametrize("name", list(CONFIGS))
def test_calibration_pass_computes_the_models_hidden_states(name):
    config = CONFIGS[name]
    params = outlier_params(config)
    x, stats = calibration_hidden(params, config, TOKENS)
    h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    got = logits_from_hidden(params, config, h)
    logits = logits_of(params, config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits), rtol=1e-4, atol=1e-4)
    sizes = {"attn_in": 64, "o_in": 64, "mlp_in": 64, "down_in": 96}
    assert set(stats) == set(SITES)
    for site, v in stats.items():
        assert v["amax"].shape == (sizes[site],) and v["xtx"].shape == (sizes[site],) * 2
        np.testing.assert_allclose(np.diag(np.asarray(v["xtx"])) ** 0.5 >= np.asarray(v["amax"]) - 1e-4, True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smoothing_keeps_the_float_model_and_flattens_outliers(name):
    config = CONFIGS[name]
    params = outlier_params(config)
    x = params["embed"][TOKENS]
    smoothed, before, after = [], [], []
    for i, layer in enumerate(unstack_layers(params)["layers"]):
        _, stats = layer_statistics(config, layer, x, config.layer_windows[i])
        new, scales = smooth_layer(layer, config, {s: v["amax"] for s, v in stats.items()}, 0.5)
        x_new, stats_new = layer_statistics(config, new, x, config.layer_windows[i])
        for site in SITES:  # the smoothed layer reads exactly x / s
            np.testing.assert_allclose(
                np.asarray(stats_new[site]["amax"]),
                np.asarray(stats[site]["amax"] / scales[site]),
                rtol=1e-4,
                atol=1e-6,
            )
        before.append(float(jnp.max(stats["attn_in"]["amax"]) / jnp.median(stats["attn_in"]["amax"])))
        after.append(float(jnp.max(stats_new["attn_in"]["amax"]) / jnp.median(stats_new["attn_in"]["amax"])))
        x, _ = layer_statistics(config, layer, x, config.layer_windows[i])
        smoothed.append(new)
    logits, logits_s = logits_of(params, config), logits_of(stack_layers({**params, "layers": smoothed}), config)
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), rtol=1e-4, atol=1e-4)
    assert max(after) < 0.5 * min(before), (before, after)  # the outlier channels are tamed


def logits_of(params, config, tokens=TOKENS):
    return ssm_llm.forward(params, config, tokens, ssm_llm.init_cache(config, tokens.shape[0], tokens.shape[1]))[0]


def _error(params, config, qparams, qconfig):
    logits, qlogits = logits_of(params, config), logits_of(qparams, qconfig)
    return float(jnp.mean((qlogits - logits) ** 2))


def test_smoothing_lowers_w8a8_error_on_outliers():
    config = CONFIGS["gqa"]
    params = outlier_params(config)
    plain = _error(params, config, *ssm_llm.quantize_weights(params, config, "w8a8"))
    smooth = _error(
        params,
        config,
        *ssm_llm.quantize_weights(params, config, "w8a8", calibration=TOKENS, smoothing=0.5, progress=False),
    )
    assert smooth < 0.5 * plain, (plain, smooth)


def test_gptq_lowers_w4a16_error():
    config = CONFIGS["bias+window"]
    params = ssm_llm.init_params(config, jax.random.PRNGKey(3))
    rtn = _error(params, config, *ssm_llm.quantize_weights(params, config, "w4a16", group_size=32))
    gptq = _error(
        params,
        config,
        *ssm_llm.quantize_weights(
            params, config, "w4a16", group_size=32, calibration=TOKENS, gptq=True, progress=False
        ),
    )
    assert gptq < rtn, (rtn, gptq)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_calibrated_quantization_keeps_the_layout_and_runs_generate(layout):
    config = CONFIGS["gqa"]
    params = outlier_params(config)
    params = params if layout == "stacked" else unstack_layers(params)
    qparams, qconfig = ssm_llm.quantize_weights(
        params, config, "w8a8", calibration=TOKENS, smoothing=0.8, gptq=True, progress=False
    )
    assert qconfig == dataclasses.replace(config, quantization="w8a8")
    assert isinstance(qparams["layers"], list) == (layout == "unstacked")
    out = ssm_llm.generate(
        qparams, qconfig, TOKENS[:1, :6], ssm_llm.GenerationConfig(max_new_tokens=4, eos_token_ids=())
    )
    assert len(out.tokens) == 1 and len(out.tokens[0]) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing": 0.5}, "need calibration"),
        ({"gptq": True}, "need calibration"),
        ({"calibration": TOKENS}, "used only by smoothing"),
        ({"calibration": TOKENS, "smoothing": 1.5}, "alpha in"),
        ({"calibration": TOKENS, "smoothing": True}, "alpha in"),
        ({"calibration": TOKENS, "gptq": 1}, "gptq must be"),
        ({"calibration": TOKENS, "smoothing": 0.5, "scheme": "w4a16"}, "only when activations"),
        ({"calibration": jnp.full((1, 4), 97), "gptq": True}, r"lie in \[0, 97\)"),
        ({"calibration": jnp.zeros((1, 4), jnp.float32), "gptq": True}, "integer array"),
    ],
)
def test_calibration_errors_are_clear(kwargs, match):
    config = CONFIGS["gqa"]
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    scheme = kwargs.pop("scheme", "w8a8")
    with pytest.raises(ValueError, match=match):
        ssm_llm.quantize_weights(params, config, scheme, progress=False, **kwargs)


def test_rotation_lowers_w8a8_error_and_equals_its_simulation(tmp_path):
    """rotation=True: each linear's input is rotated by the block Hadamard (x Q) and its weight rows hold
    Q w, so one linear equals the fake-quant simulation of the rotated input times the rotated weight;
    on a model with outlier channels the error falls, alone and with smoothing; save / load keeps it."""
    from pallas_kernels.quantized_matmul import dequantize_weights
    from ssm_llm.hadamard import block_hadamard
    from ssm_llm.models.lm_head import linear

    config = CONFIGS["gqa"]
    params = outlier_params(config)
    qparams, qconfig = ssm_llm.quantize_weights(params, config, "w8a8", rotation=True)
    assert qconfig.activation_rotation and qconfig.quantization == "w8a8"
    w = jax.tree_util.tree_map(lambda a: a[0], qparams["layers"]["w_up"])
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 64)) * jnp.arange(1, 65) ** 1.5
    xr = block_hadamard(x)
    scale = jnp.max(jnp.abs(xr), -1, keepdims=True) / 127.0
    simulated = jnp.clip(jnp.round(xr / scale), -127, 127) * scale @ dequantize_weights(w)
    np.testing.assert_allclose(np.asarray(linear(x, w, None, True, True)), np.asarray(simulated), rtol=1e-4, atol=1e-3)
    plain = _error(params, config, *ssm_llm.quantize_weights(params, config, "w8a8"))
    rotated = _error(params, config, qparams, qconfig)
    both = _error(
        params,
        config,
        *ssm_llm.quantize_weights(
            params, config, "w8a8", calibration=TOKENS, smoothing=0.5, gptq=True, rotation=True, progress=False
        ),
    )
    assert rotated < 0.5 * plain and both < plain, (plain, rotated, both)
    import converters

    converters.save(qparams, qconfig, tmp_path / "ckpt")
    config2, params2 = converters.load(tmp_path / "ckpt")
    assert config2 == qconfig
    np.testing.assert_array_equal(np.asarray(logits_of(params2, config2)), np.asarray(logits_of(qparams, qconfig)))


def test_rotation_needs_w8a8():
    config = CONFIGS["gqa"]
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="scheme 'w8a8' only"):
        ssm_llm.quantize_weights(params, config, "w8a16", rotation=True)
    with pytest.raises(ValueError, match="needs quantization 'w8a8'"):
        dataclasses.replace(config, activation_rotation=True)
    with pytest.raises(ValueError, match="must be True or False"):
        dataclasses.replace(config, quantization="w8a8", activation_rotation=1)
