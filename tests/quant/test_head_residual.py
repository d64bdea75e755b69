"""quantize_weights(..., embedding=True, head_residual=True): the int8 output projection keeps its rounding residual
in 4 bits, and `refine_logits` recomputes each row's top logits against the finer weights (a tied embedding reads
its rows from them too). The residual is within its grid's half step, the refined logits equal a numpy int64
reference and lie several times nearer the float product than the int8 ones, they keep the same bits in one-row and
many-row programs (cached decode, speculative verification, the serving engine), save, load and shard like the
head, and bad uses are clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
import ssm_llm
from pallas_kernels.quantized_matmul import QuantizedWeight
from pallas_kernels.quantized_matmul.weights import int_values
from ssm_llm.hadamard import block_hadamard
from ssm_llm.int8_blocks import for_cpu_kernel, unblock_int8_weights
from ssm_llm.models.lm_head import (
    _REFINE_CHUNK,
    HEAD_CANDIDATES,
    HEAD_RESIDUAL_STEPS,
    _int8_terms,
    embed_tokens,
    logits_from_hidden,
    refine_logits,
)
from ssm_llm.quant.presets import preset, preset_of
from ssm_llm.speculative import PromptLookup

CONFIG = ssm_llm.ModelConfig(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
IDS = jnp.asarray([[5, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
GREEDY = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=())


@pytest.fixture(scope="module")
def params():
    return ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))


def numpy_refined(x: np.ndarray, head: QuantizedWeight, residual: QuantizedWeight, top: np.ndarray):
    """The refined logits of `top` [M, k] in numpy: int64 sums of x's two int8 terms against 14 q + q_r, then
    float64; and the bound of the library's float32 combination. The terms are the library's own (`_int8_terms`,
    tested against the float product in test_attention_weight_quant.py): XLA's float32 division may round
    differently from numpy's in the last bit, which moves a code across a rounding boundary now and then."""
    x_scale, q1, q2 = (np.asarray(a) for a in _int8_terms(jnp.asarray(x), 2))
    w = np.asarray(int_values(head)).astype(np.int64) * HEAD_RESIDUAL_STEPS + np.asarray(int_values(residual))
    cols = w.T[top]  # [M, k, H]
    a1 = np.einsum("mh,mkh->mk", q1.astype(np.int64), cols)
    a2 = np.einsum("mh,mkh->mk", q2.astype(np.int64), cols)
    scale = np.asarray(residual.scales[0], np.float64)[top]
    want = (a1 + a2 / 256.0) * x_scale.astype(np.float64) * scale
    # Each chunk's int32 sum is exact, then rounded to float32 (`_REFINE_CHUNK` rows of the hidden size each).
    chunk = _REFINE_CHUNK if w.shape[0] > _REFINE_CHUNK else w.shape[0]
    magnitude = sum(
        np.abs(np.einsum("mh,mkh->mk", q[:, c : c + chunk].astype(np.int64), cols[..., c : c + chunk])) / d
        for q, d in ((q1, 1.0), (q2, 256.0))
        for c in range(0, w.shape[0], chunk)
    )
    return want, 4 * np.finfo(np.float32).eps * magnitude * x_scale * scale


@pytest.mark.parametrize("rotation", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_residual_is_within_its_half_step_and_refines_the_top_logits(rotation, tie):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tie)
    fparams = ssm_llm.init_params(config, jax.random.PRNGKey(1))
    qparams, qconfig = ssm_llm.quantize_weights(fparams, config, "w8a8", embedding=True, rotation=rotation)
    rparams, rconfig = ssm_llm.quantize_weights(
        fparams, config, "w8a8", embedding=True, rotation=rotation, head_residual=True
    )
    name = "embed" if tie else "lm_head"
    head, residual = rparams[name], rparams["head_residual"]
    assert rconfig.head_residual and not qconfig.head_residual
    np.testing.assert_array_equal(np.asarray(head.values), np.asarray(qparams[name].values))  # the same int8 codes
    assert residual.values.nbytes == 64 * 101 // 2 and (residual.bits, residual.group_size) == (4, 64)
    codes = np.asarray(int_values(residual))
    assert np.abs(codes).max() <= HEAD_RESIDUAL_STEPS // 2
    w = np.asarray(fparams["embed"]).T if tie else np.asarray(fparams["lm_head"])
    w = np.asarray(block_hadamard(jnp.asarray(w), axis=0)) if rotation else w
    s = np.asarray(head.scales[0], np.float64)
    r = np.asarray(residual.scales[0], np.float64)
    np.testing.assert_allclose(r, s / HEAD_RESIDUAL_STEPS, rtol=1e-6)
    fine = np.asarray(int_values(head)) * s + codes * r
    assert (np.abs(w - fine) <= r / 2 * (1 + 1e-5) + 1e-7).all()  # vs s / 2 for the int8 codes alone
    if tie:  # a tied embedding reads the finer rows too: elementwise within r / 2, or in norm after the rotation
        rows = np.asarray(embed_tokens(rparams, rconfig, IDS))[0]
        ids = np.asarray(IDS)[0]
        want = np.asarray(fparams["embed"])[ids]
        err = np.linalg.norm(rows - want, axis=-1) if rotation else np.abs(rows - want).max(-1)
        assert (err <= r[ids] / 2 * (np.sqrt(64) if rotation else 1) * (1 + 1e-5) + 1e-6).all()
    h = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (6, 64)))
    x = np.asarray(block_hadamard(jnp.asarray(h))) if rotation else h
    coarse = np.asarray(logits_from_hidden(qparams, qconfig, jnp.asarray(h)))
    got = np.asarray(logits_from_hidden(rparams, rconfig, jnp.asarray(h)), np.float64)
    top = np.argsort(-coarse, axis=-1, kind="stable")[:, :HEAD_CANDIDATES]
    want, bound = numpy_refined(x.astype(np.float32), head, residual, top)
    rows = np.arange(6)[:, None]
    assert (np.abs(got[rows, top] - want) <= bound).all()
    others = np.ones_like(coarse, bool)
    others[rows, top] = False
    np.testing.assert_array_equal(got[others], coarse[others])  # the other logits keep their int8 values
    exact = h @ (np.asarray(fparams["embed"]).T if tie else np.asarray(fparams["lm_head"]))
    err_fine, err_int8 = np.abs(got[rows, top] - exact[rows, top]), np.abs(coarse[rows, top] - exact[rows, top])
    assert err_fine.max() < err_int8.max() / 4 and err_fine.mean() < err_int8.mean() / 8
    blocked = for_cpu_kernel(rparams, rconfig)  # the CPU kernel's layout (where it runs): the same numbers
    np.testing.assert_array_equal(np.asarray(logits_from_hidden(blocked, rconfig, jnp.asarray(h))), got)


@settings(max_examples=10, deadline=None)
@given(
    lead=st.sampled_from([(1,), (3,), (2, 3)]),
    hidden=st.sampled_from([8, 64]),
    vocab=st.integers(2, 40),
    candidates=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_refine_logits_matches_numpy_on_any_shape(lead, hidden, vocab, candidates, seed):
    """Any leading shape, vocabularies smaller than the candidates, all-zero rows (scale 0: logits 0)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((vocab, hidden)), jnp.float32)
    config = ssm_llm.ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    fparams = {**ssm_llm.init_params(config, jax.random.PRNGKey(0)), "embed": w}
    rparams, _ = ssm_llm.quantize_weights(fparams, config, "w8a8", embedding=True, head_residual=True)
    x = rng.standard_normal((*lead, hidden)).astype(np.float32)
    x.reshape(-1, hidden)[0] = 0.0
    coarse = jnp.asarray(rng.standard_normal((*lead, vocab)), jnp.float32)  # any logits pick the candidates
    got = np.asarray(refine_logits(coarse, jnp.asarray(x), rparams["embed"], rparams["head_residual"], candidates))
    flat_x, flat_c, flat_g = x.reshape(-1, hidden), np.asarray(coarse).reshape(-1, vocab), got.reshape(-1, vocab)
    k = min(candidates, vocab)
    top = np.argsort(-flat_c, axis=-1, kind="stable")[:, :k]
    want, bound = numpy_refined(flat_x, rparams["embed"], rparams["head_residual"], top)
    rows = np.arange(flat_x.shape[0])[:, None]
    assert (np.abs(flat_g[rows, top] - want) <= bound).all()
    assert (flat_g[0, top[0]] == 0).all()
    mask = np.ones_like(flat_c, bool)
    mask[rows, top] = False
    np.testing.assert_array_equal(flat_g[mask], flat_c[mask])


def test_refined_model_decodes_the_same_in_every_program(params):
    """Cached decode equals the full forward; generate equals the serving engine, speculative decoding and KV
    compression with room to spare, in both layer layouts."""
    from ssm_llm.kv import StreamingLLM
    from ssm_llm.serving import Engine

    scheme, options = preset("w8a8-rot-emb")
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, scheme, **options)
    assert qconfig.head_residual and preset_of(qconfig) == "w8a8-rot-emb"
    qparams = for_cpu_kernel(qparams, qconfig)
    full, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, :4], ssm_llm.init_cache(qconfig, 1, 16))
    steps = [logits]
    for t in range(4, IDS.shape[1]):
        logits, cache = ssm_llm.forward(qparams, qconfig, IDS[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4)
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], [7, 8]]
    plain = ssm_llm.generate(qparams, qconfig, prompts, GREEDY).tokens
    spec = ssm_llm.generate(qparams, qconfig, prompts, dataclasses.replace(GREEDY, speculative=PromptLookup())).tokens
    roomy = dataclasses.replace(GREEDY, kv_compression=StreamingLLM(budget=64))
    assert spec == plain and ssm_llm.generate(qparams, qconfig, prompts, roomy).tokens == plain
    assert ssm_llm.generate(ssm_llm.unstack_layers(qparams), qconfig, prompts, GREEDY).tokens == plain
    engine = Engine(qparams, qconfig, max_slots=2, page_size=4, max_len=32, chunk=8)
    assert engine.run_batch(prompts, GREEDY) == plain


def test_residual_saves_loads_and_shards_like_the_head(params, tmp_path):
    from jax.sharding import Mesh, PartitionSpec

    from ssm_llm.sharding import param_specs

    qparams, qconfig = ssm_llm.quantize_weights(
        params, CONFIG, "w8a8", rotation=True, embedding=True, head_residual=True
    )
    converters.save(qparams, qconfig, tmp_path / "ckpt")
    config, loaded = converters.load(tmp_path / "ckpt")
    assert config == qconfig
    plain = unblock_int8_weights(loaded)
    stored = plain["head_residual"].values
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(qparams["head_residual"].values))
    a, _ = ssm_llm.forward(loaded, config, IDS, ssm_llm.init_cache(config, 1, 16))
    b, _ = ssm_llm.forward(qparams, qconfig, IDS, ssm_llm.init_cache(qconfig, 1, 16))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = param_specs(qparams, qconfig, mesh)
    assert specs["head_residual"].values == specs["embed"].values == PartitionSpec(None, "model")


def test_bad_uses_are_clear_errors(params):
    with pytest.raises(ValueError, match="head_residual \\(True or False\\) refines the int8 output projection"):
        ssm_llm.quantize_weights(params, CONFIG, "w8a8", head_residual=True)
    with pytest.raises(ValueError, match="config.head_residual refines an int8 output projection"):
        dataclasses.replace(CONFIG, quantization="w8a8", head_residual=True)
    with pytest.raises(ValueError, match="config.head_residual must be True or False"):
        dataclasses.replace(CONFIG, head_residual=1)
    odd = dataclasses.replace(CONFIG, hidden_size=63)
    with pytest.raises(ValueError, match="hidden size, which must be even, got 63"):
        ssm_llm.quantize_weights(params, odd, "w8a8", embedding=True, head_residual=True)
    qparams, qconfig = ssm_llm.quantize_weights(params, CONFIG, "w8a8", embedding=True, head_residual=True)
    cache = ssm_llm.init_cache(qconfig, 1, 16)
    missing = {k: v for k, v in qparams.items() if k != "head_residual"}
    with pytest.raises(ValueError, match="missing \\['head_residual'\\]"):
        ssm_llm.forward(missing, qconfig, IDS, cache)
    with pytest.raises(ValueError, match="unexpected \\['head_residual'\\]"):
        ssm_llm.forward(qparams, dataclasses.replace(qconfig, head_residual=False), IDS, cache)
    wrong = {**qparams, "head_residual": dataclasses.replace(qparams["head_residual"], group_size=32)}
    with pytest.raises(ValueError, match="must be a symmetric 4-bit QuantizedWeight with one scale per vocabulary"):
        ssm_llm.forward(wrong, qconfig, IDS, cache)


@pytest.mark.parametrize("k", [1, 8, 20])
def test_top_columns_are_top_k_as_a_set(k):
    """The block-maxima search finds `jax.lax.top_k`'s columns: a vocabulary not a multiple of the block, ties
    (lower columns first), -inf logits, one block holding every winner."""
    from ssm_llm.models.lm_head import _top_columns

    rng = np.random.default_rng(k)
    logits = np.round(rng.standard_normal((4, 5000)), 1).astype(np.float32)  # many ties
    logits[1, 4990:] = 9.0  # the winners in the last, partial block
    logits[2, ::7] = -np.inf
    logits[3, 100:140] = 5.0  # more tied winners than k, across a block boundary
    got = np.asarray(_top_columns(jnp.asarray(logits), k))
    want = np.asarray(jax.lax.top_k(jnp.asarray(logits), k)[1])
    assert [set(r) for r in got] == [set(r) for r in want]


def test_refine_logits_past_one_int32_sum():
    """Hidden sizes past _REFINE_CHUNK rows sum in several int32 chunks: still the numpy int64 product."""
    from pallas_kernels.quantized_matmul import quantize_weights as quantize_matrix
    from ssm_llm.quant.attention_weights import _residual_rows

    hidden, vocab = 8200, 5
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((hidden, vocab)), jnp.float32)
    head = quantize_matrix(w, bits=8, group_size=hidden)
    residual = _residual_rows(w, head, False)
    x = (rng.standard_normal((2, hidden)) * 3).astype(np.float32)
    coarse = jnp.asarray(rng.standard_normal((2, vocab)), jnp.float32)
    got = np.asarray(refine_logits(coarse, jnp.asarray(x), head, residual, 3), np.float64)
    top = np.argsort(-np.asarray(coarse), axis=-1, kind="stable")[:, :3]
    want, bound = numpy_refined(x, head, residual, top)
    assert (np.abs(got[np.arange(2)[:, None], top] - want) <= bound).all()
    exact = (x @ np.asarray(w))[np.arange(2)[:, None], top]
    norms = np.linalg.norm(x, axis=-1)[:, None] * np.linalg.norm(np.asarray(w), axis=0)[top]
    assert (np.abs(want - exact) <= 1e-3 * norms).all()  # 12-bit weights, ~16-bit inputs
