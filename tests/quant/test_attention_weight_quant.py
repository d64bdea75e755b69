"""ssm_llm.quantize_weights on attention models: the W8A8 product is exact against numpy int64, each
quantized linear equals its fake-quant simulation, the quantized model runs through forward / generate /
KV compression / speculative decoding consistently, saves and loads its integer codes, and bad uses are
clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
import ssm_llm
from pallas_kernels.quantized_matmul import QuantizedWeight, dequantize_weights, quantize_weights
from pallas_kernels.quantized_matmul.weights import int_values
from ssm_llm.int8_blocks import unblock_int8_weights
from ssm_llm.kv import StreamingLLM
from ssm_llm.models.lm_head import HEAD_TERMS, int8_matmul, linear
from ssm_llm.speculative import PromptLookup

CONFIG = ssm_llm.ModelConfig(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)
IDS = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
GREEDY = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=())


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))


def numpy_w8a8(x: np.ndarray, qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The W8A8 product in numpy: rows rounded to int8 (float32, as the library), int64 group sums, then
    float64; and the float32 rounding bound of combining the groups (eps times the sum of |terms|)."""
    x_scale = np.abs(x).max(-1, keepdims=True) / np.float32(127.0)
    xq = np.clip(np.round(x / np.where(x_scale > 0, x_scale, np.float32(1.0))), -127, 127).astype(np.int64)
    q = np.asarray(int_values(qw)).astype(np.int64)
    k, n = q.shape
    gs = qw.group_size
    acc = np.einsum("mgk,gkn->gmn", xq.reshape(-1, k // gs, gs), q.reshape(k // gs, gs, n))
    terms = acc * np.asarray(qw.scales, np.float64)[:, None, :] * x_scale.reshape(-1, 1).astype(np.float64)
    bound = 4 * (k // gs + 1) * np.finfo(np.float32).eps * np.abs(terms).sum(0)
    return terms.sum(0).reshape(*x.shape[:-1], n), bound.reshape(*x.shape[:-1], n)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([4, 8, 32]),
    n=st.integers(1, 9),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 2**16),
)
def test_int8_matmul_is_exact_against_numpy_int64(rows, groups, group_size, n, bits, seed):
    rng = np.random.default_rng(seed)
    k = groups * group_size
    x = (rng.standard_normal((rows, k)) * rng.choice([0.0, 1e-3, 1.0, 50.0], size=(rows, 1))).astype(np.float32)
    qw = quantize_weights(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), bits=bits, group_size=group_size)
    got = np.asarray(int8_matmul(jnp.asarray(x), qw))
    expected, bound = numpy_w8a8(x, qw)  # the int32 sums are exact; only combining groups in float rounds
    assert (np.abs(got - expected) <= bound).all(), np.abs(got - expected) / np.maximum(bound, 1e-45)
    assert not np.asarray(got)[np.abs(x).max(-1) == 0].any()  # an all-zero row gives exactly 0


def two_term_bound(x: np.ndarray, qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The float64 product of x with the dequantized weight, and how far `int8_matmul(..., terms=2)` may be from
    it: each activation is off by at most its int8 step / 256 (the residual, at most half a step, rounded on a grid
    256 times finer and clipped at 127), plus float32 rounding (a few eps of amax per element; the groups' sums),
    times sum_k |w[k, n]|."""
    w = np.asarray(dequantize_weights(qw), np.float64)
    amax = np.abs(x).max(-1, keepdims=True).astype(np.float64)
    groups = qw.shape[0] // qw.group_size
    per_element = amax / 127 / 256 + 4 * (groups + 2) * np.finfo(np.float32).eps * amax
    return x.astype(np.float64) @ w, per_element * np.abs(w).sum(0)


def head_product(x: np.ndarray, qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """What an int8 output projection gives for x, and its bound: in `HEAD_TERMS` int8 terms."""
    return numpy_w8a8(x, qw) if HEAD_TERMS == 1 else two_term_bound(x, qw)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 5),
    k=st.sampled_from([8, 32, 96]),
    n=st.integers(1, 9),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_two_int8_terms_round_activations_to_about_16_bits(rows, k, n, per_channel, seed):
    """terms=2 (the int8 output projection's product): x ~ s (q1 + q2 / 256) in one int8 dot of twice the rows,
    within the second rounding's error of the float product with the dequantized weight (per-channel weights take
    the CPU int8 dot, grouped ones the quantized matmul); one term is ~128x coarser."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * rng.choice([0.0, 1e-3, 1.0, 50.0], size=(rows, 1))).astype(np.float32)
    qw = quantize_weights(
        jnp.asarray(rng.standard_normal((k, n)), jnp.float32), bits=8, group_size=k if per_channel else 8
    )
    got = np.asarray(int8_matmul(jnp.asarray(x), qw, terms=2), np.float64)
    want, bound = two_term_bound(x, qw)
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want) / np.maximum(bound, 1e-45)
    assert not got[np.abs(x).max(-1) == 0].any()
    with pytest.raises(ValueError, match="terms is 1 or 2 int8 roundings"):
        int8_matmul(jnp.asarray(x), qw, terms=3)


@pytest.mark.parametrize("int8_acts", [True, False], ids=["w8a8", "weight-only"])
def test_quantized_linear_equals_its_fake_quant_simulation(int8_acts):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    w, b = rng.standard_normal((64, 24)).astype(np.float32), jnp.asarray(rng.standard_normal(24), jnp.float32)
    qw = quantize_weights(jnp.asarray(w), bits=8, group_size=32)
    x_sim = x
    if int8_acts:  # the simulation: round each row to its int8 grid in float, then a float product
        scale = jnp.max(jnp.abs(x), -1, keepdims=True) / 127.0
        x_sim = jnp.clip(jnp.round(x / scale), -127, 127) * scale
    expected = jnp.matmul(x_sim, dequantize_weights(qw), precision=jax.lax.Precision.HIGHEST) + b
    np.testing.assert_allclose(np.asarray(linear(x, qw, b, int8_acts)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def _dequantized(qparams):
    """The float model a weight-only quantized model simulates: every QuantizedWeight dequantized."""
    deq = jax.vmap(dequantize_weights)
    layers = {k: deq(v) if isinstance(v, QuantizedWeight) else v for k, v in qparams["layers"].items()}
    return {**qparams, "layers": layers}


@pytest.mark.parametrize("scheme,group_size", [("w8a16", None), ("w4a16", 32)])
def test_weight_only_model_equals_the_dequantized_float_model(params, scheme, group_size):
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, scheme, group_size=group_size)
    assert qconfig.quantization == scheme and isinstance(qparams["layers"]["wq"], QuantizedWeight)
    assert qparams["embed"] is params["embed"]  # embedding, norms and biases stay float
    got, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    want, _ = ssm_llm.forward(_dequantized(qparams), CONFIG, IDS, ssm_llm.init_cache(CONFIG, 1, 16))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16", "w4a16"])
def test_quantized_model_decodes_consistently(params, scheme):
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, scheme)
    full, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    float_logits, _ = ssm_llm.forward(params, CONFIG, IDS, ssm_llm.init_cache(CONFIG, 1, 16))
    bound = {"w8a8": 0.05, "w8a16": 0.05, "w4a16": 0.3}[scheme]  # of the float logits' range
    assert np.abs(np.asarray(full - float_logits)).max() < bound * np.abs(np.asarray(float_logits)).max()
    # Cached decode (a prefill, then one token at a time) equals the full forward: per-token scales.
    logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, :4], ssm_llm.init_cache(qconfig, 1, 16))
    steps = [logits]
    for t in range(4, IDS.shape[1]):
        logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4)
    # Both layer layouts give the same model.
    unstacked, _ = ssm_llm.forward(ssm_llm.unstack_layers(qparams), qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    np.testing.assert_allclose(np.asarray(unstacked), np.asarray(full), atol=1e-5)


def test_w8a8_with_kv_compression_and_speculative_decoding(params):
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w8a8")
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], [7, 8]]
    plain = ssm_llm.generate(qparams, qconfig, prompts, GREEDY).tokens
    roomy = StreamingLLM(budget=64)  # more room than the sequences need: nothing is evicted
    with_kv = ssm_llm.generate(qparams, qconfig, prompts, dataclasses.replace(GREEDY, kv_compression=roomy)).tokens
    spec = ssm_llm.generate(qparams, qconfig, prompts, dataclasses.replace(GREEDY, speculative=PromptLookup())).tokens
    assert with_kv == plain and spec == plain


def test_save_and_load_keep_the_integer_codes(params, tmp_path):
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w4a16", group_size=16)
    converters.save(qparams, qconfig, tmp_path / "ckpt")
    config, loaded = converters.load(tmp_path / "ckpt")
    assert config == qconfig
    w = loaded["layers"]["w_down"]
    assert isinstance(w, QuantizedWeight) and (w.bits, w.group_size) == (4, 16) and w.values.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(w.values), np.asarray(qparams["layers"]["w_down"].values))
    a, _ = ssm_llm.forward(loaded, config, IDS, ssm_llm.init_cache(config, 1, 16))
    b, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_uses_are_clear_errors(params):
    with pytest.raises(ValueError, match="scheme must be one of w8a8, w8a16, w4a16, got 'int8'"):
        ssm_llm.quantize_weights(params, CONFIG, "int8")
    with pytest.raises(ValueError, match="group_size 48 does not divide the input size 64"):
        ssm_llm.quantize_weights(params, CONFIG, "w8a8", group_size=48)
    with pytest.raises(ValueError, match="group_size must be a positive int or None"):
        ssm_llm.quantize_weights(params, CONFIG, "w8a8", group_size=0)
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w8a16")
    with pytest.raises(ValueError, match="already quantized \\('w8a16'\\)"):
        ssm_llm.quantize_weights(qparams, qconfig, "w4a16")
    with pytest.raises(ValueError, match="holds 8-bit QuantizedWeight, but config.quantization is 'none'"):
        ssm_llm.quantize_weights(qparams, CONFIG, "w4a16")  # quantized params under the float config
    cache = ssm_llm.init_cache(CONFIG, 1, 16)
    with pytest.raises(ValueError, match="holds 8-bit QuantizedWeight, but config.quantization is 'none'"):
        ssm_llm.forward(qparams, CONFIG, IDS, cache)
    with pytest.raises(ValueError, match="holds float weights, but config.quantization is 'w8a16'"):
        ssm_llm.forward(params, qconfig, IDS, cache)
    with pytest.raises(ValueError, match="config.quantization must be one of none, w8a8"):
        ssm_llm.ModelConfig(**{**CONFIG.to_dict(), "rope": CONFIG.rope, "quantization": "w2"})
    mamba = ssm_llm.MambaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, state_size=4)
    with pytest.raises(TypeError, match="Mamba / Mamba-2 are quantized with ssm_llm.quant.quantize_model"):
        ssm_llm.quantize_weights(ssm_llm.init_params(mamba, jax.random.PRNGKey(0)), mamba, "w8a8")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_int8_embedding_is_its_int8_simulation(tie):
    """embedding=True: the embedding (and an untied lm_head) is int8 per vocabulary row, stored as the output
    projection [H, V]; its rows are the dequantized codes, the logits the W8A8 product with its input rounded in
    `lm_head.HEAD_TERMS` int8 terms (`head_product`), and the model still decodes consistently, in both layer
    layouts, through generate and the serving engine."""
    from ssm_llm.models.lm_head import embed_tokens, logits_from_hidden
    from ssm_llm.serving import Engine

    config = dataclasses.replace(CONFIG, tie_word_embeddings=tie)
    fparams = ssm_llm.init_params(config, jax.random.PRNGKey(1))
    qparams, qconfig = ssm_llm.quantize_weights(fparams, config, "w8a8", embedding=True)
    table = qparams["embed"]
    assert qconfig.int8_embedding and isinstance(table, QuantizedWeight) and table.shape == (64, 101)
    assert table.values.nbytes + table.scales.nbytes == 64 * 101 + 4 * 101  # a quarter of float32, plus scales
    rows = np.asarray(embed_tokens(qparams, qconfig, IDS))
    np.testing.assert_array_equal(rows, np.asarray(dequantize_weights(table)).T[np.asarray(IDS)])
    scale = np.asarray(table.scales[0])[np.asarray(IDS)][..., None]
    assert (np.abs(rows - np.asarray(fparams["embed"])[np.asarray(IDS)]) <= scale / 2 + 1e-7).all()
    h = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, 64)))
    head = table if tie else qparams["lm_head"]
    want, bound = head_product(h, head)
    assert (np.abs(np.asarray(logits_from_hidden(qparams, qconfig, jnp.asarray(h)), np.float64) - want) <= bound).all()
    full, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    float_logits, _ = ssm_llm.forward(fparams, config, IDS, ssm_llm.init_cache(config, 1, 16))
    assert np.abs(np.asarray(full - float_logits)).max() < 0.05 * np.abs(np.asarray(float_logits)).max()
    logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, :4], ssm_llm.init_cache(qconfig, 1, 16))
    steps = [logits]
    for t in range(4, IDS.shape[1]):
        logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4)
    unstacked, _ = ssm_llm.forward(ssm_llm.unstack_layers(qparams), qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    np.testing.assert_allclose(np.asarray(unstacked), np.asarray(full), atol=1e-5)
    prompt = [5, 1, 4, 1, 5, 9]
    tokens = ssm_llm.generate(qparams, qconfig, [prompt], GREEDY).tokens[0]
    assert Engine(qparams, qconfig, max_slots=2, page_size=4, max_len=32, chunk=8).run_batch([prompt], GREEDY) == [
        tokens
    ]


def test_int8_embedding_saves_loads_and_refuses_mismatches(params, tmp_path):
    from ssm_llm.hadamard import block_hadamard
    from ssm_llm.models.lm_head import embed_tokens, logits_from_hidden

    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w8a8", embedding=True, rotation=True)
    # Rotated: the head's rows hold Q w and its input is rotated; the (untied) embedding is not.
    h = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 64)))
    want, bound = head_product(np.asarray(block_hadamard(h)), qparams["lm_head"])
    assert (np.abs(np.asarray(logits_from_hidden(qparams, qconfig, jnp.asarray(h)), np.float64) - want) <= bound).all()
    rows = np.asarray(embed_tokens(qparams, qconfig, IDS))
    np.testing.assert_allclose(rows, np.asarray(params["embed"])[np.asarray(IDS)], atol=0.01)
    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    tparams = {k: v for k, v in params.items() if k != "lm_head"}
    tq, tconfig = ssm_llm.quantize_weights(tparams, tied, "w8a8", embedding=True, rotation=True)
    rows = np.asarray(embed_tokens(tq, tconfig, IDS))  # stored as the rotated head, turned back on lookup
    err = np.linalg.norm(rows - np.asarray(params["embed"])[np.asarray(IDS)], axis=-1)
    scale = np.asarray(tq["embed"].scales[0])[np.asarray(IDS)]
    assert (err <= scale * np.sqrt(64) / 2 + 1e-6).all()
    want, bound = head_product(np.asarray(block_hadamard(h)), tq["embed"])
    assert (np.abs(np.asarray(logits_from_hidden(tq, tconfig, jnp.asarray(h)), np.float64) - want) <= bound).all()
    converters.save(qparams, qconfig, tmp_path / "ckpt")
    config, loaded = converters.load(tmp_path / "ckpt")  # (in the CPU kernel's blocked layout where it runs)
    plain_loaded = unblock_int8_weights(loaded)
    assert config == qconfig and isinstance(plain_loaded["embed"], QuantizedWeight)
    np.testing.assert_array_equal(np.asarray(plain_loaded["embed"].values), np.asarray(qparams["embed"].values))
    a, _ = ssm_llm.forward(loaded, config, IDS, ssm_llm.init_cache(config, 1, 16))
    b, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="embedding \\(True or False\\) makes the logits a W8A8 product"):
        ssm_llm.quantize_weights(params, CONFIG, "w8a16", embedding=True)
    with pytest.raises(ValueError, match="config.int8_embedding makes the logits a W8A8 product"):
        dataclasses.replace(CONFIG, int8_embedding=True)
    plain, plain_config = ssm_llm.quantize_weights(params, CONFIG, "w8a8")
    cache = ssm_llm.init_cache(CONFIG, 1, 16)
    with pytest.raises(ValueError, match="has shape \\(101, 64\\), but the ModelConfig needs \\(64, 101\\)"):
        ssm_llm.forward(plain, qconfig, IDS, cache)  # a float table under an int8-embedding config
    with pytest.raises(ValueError, match="has shape \\(64, 101\\), but the ModelConfig needs \\(101, 64\\)"):
        ssm_llm.forward({**plain, "embed": qparams["embed"]}, plain_config, IDS, cache)


def test_int8_embedding_splits_like_the_output_projection(params):
    from jax.sharding import Mesh, PartitionSpec

    from ssm_llm.sharding import param_specs

    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w8a8", embedding=True)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = param_specs(qparams, qconfig, mesh)
    assert specs["embed"].values == specs["lm_head"].values == PartitionSpec(None, "model")
    assert specs["embed"].scales == PartitionSpec(None, "model")
