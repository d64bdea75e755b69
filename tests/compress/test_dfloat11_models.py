"""DFloat11 models give identical outputs (not close: identical) to their bfloat16 originals: logits of prefill
and cached decode for tiny Llama (stacked and unstacked layers), Mamba and Mamba-2, and SmolLM2; greedy
generation, speculative decoding, beam search and the serving engine for Llama and Mamba-2; the compressed form
survives an orbax checkpoint; sizes and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
import ssm_llm
from pallas_kernels.dfloat11 import DFloat11Weight
from ssm_llm.compress import compressed_bytes, dfloat11
from ssm_llm.layer_layout import unstack_layers
from ssm_llm.serving import Engine
from ssm_llm.speculative import PromptLookup

CONFIGS = {
    "llama": ssm_llm.ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "mamba2": ssm_llm.Mamba2Config(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        state_size=8,
        intermediate_size=128,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        chunk_size=8,
    ),
    "mamba": ssm_llm.MambaConfig(vocab_size=512, hidden_size=64, num_layers=2, state_size=8, intermediate_size=128),
}


def _bf16(params):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)


def _model(name):
    config = CONFIGS[name]
    params = _bf16(ssm_llm.init_params(config, jax.random.PRNGKey(1)))
    return name, config, params, dfloat11(params, min_size=256)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _model(request.param)


# The generation paths on top of `forward` (speculation, beam search, the serving engine, sharding) decode DFloat11
# weights the same way for every family (as each layer starts, `run_layers`): checked on one attention model and
# one state-space model, every family's weights by the tests above (logits, checkpoints).
@pytest.fixture(scope="module", params=["llama", "mamba2"])
def two_families(request):
    return _model(request.param)


def _logits(params, config, tokens):
    cache = ssm_llm.init_cache(config, tokens.shape[0], 32, dtype=jnp.bfloat16)
    prefill, cache = ssm_llm.forward(params, config, tokens[:, :-1], cache)
    step, _ = ssm_llm.forward(params, config, tokens[:, -1:], cache)
    return np.asarray(prefill.astype(jnp.float32)), np.asarray(step.astype(jnp.float32))


def test_logits_are_identical(model):
    _, config, params, packed = model
    assert any(
        isinstance(leaf, DFloat11Weight)
        for leaf in jax.tree_util.tree_leaves(packed, is_leaf=lambda x: isinstance(x, DFloat11Weight))
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)), jnp.int32)
    for want, got in zip(_logits(params, config, tokens), _logits(packed, config, tokens), strict=True):
        np.testing.assert_array_equal(got, want)
    if isinstance(config, ssm_llm.ModelConfig):  # the unrolled layout (its own rounding) decodes per layer too
        unrolled = _logits(unstack_layers(params), config, tokens)
        for want, got in zip(unrolled, _logits(unstack_layers(packed), config, tokens), strict=True):
            np.testing.assert_array_equal(got, want)


def test_generation_and_speculation_are_identical(two_families):
    _, config, params, packed = two_families
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11]]
    for gen in (
        ssm_llm.GenerationConfig(max_new_tokens=6, max_len=32),
        ssm_llm.GenerationConfig(max_new_tokens=6, max_len=32, speculative=PromptLookup()),
    ):
        want = ssm_llm.generate(params, config, prompts, gen).tokens
        assert ssm_llm.generate(packed, config, prompts, gen).tokens == want


def test_beam_search_and_the_serving_engine_are_identical(two_families):
    _, config, params, packed = two_families
    beams = ssm_llm.GenerationConfig(max_new_tokens=5, max_len=32, num_beams=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    assert (
        ssm_llm.generate(packed, config, prompts, beams).tokens
        == ssm_llm.generate(params, config, prompts, beams).tokens
    )

    def served(p):
        engine = Engine(p, config, max_slots=2, page_size=8, max_len=48)
        gen = ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=())
        rids = [engine.submit(prompt, gen) for prompt in [*prompts, [4, 4, 4, 4, 4]]]
        tokens = {rid: [] for rid in rids}
        for _ in range(200):
            if not engine.has_work():
                break
            for event in engine.step():
                tokens[event.rid].extend(event.new_token_ids)
        return [tokens[rid] for rid in rids]

    assert served(packed) == served(params)


def test_sharded_on_a_one_device_mesh_gives_the_same_logits(two_families):
    """The streams are replicated (a Huffman stream cannot be cut along the weight's axes)."""
    from jax.sharding import Mesh

    from ssm_llm.sharding import param_specs, shard_params

    _, config, params, packed = two_families
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    specs = param_specs(packed, config, mesh)
    weights = [x for x in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, DFloat11Weight))]
    assert any(isinstance(x, DFloat11Weight) for x in weights)
    tokens = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    want = _logits(packed, config, tokens)
    for a, b in zip(want, _logits(shard_params(packed, config, mesh), config, tokens), strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantized_weights_are_left_as_they_are():
    config = CONFIGS["llama"]
    params = _bf16(ssm_llm.init_params(config, jax.random.PRNGKey(2)))
    quantized, qconfig = ssm_llm.quantize_weights(params, config, "w8a16", progress=False)
    packed = dfloat11(quantized, min_size=256)
    for name in ("wq", "w_up"):
        assert packed["layers"][name] is quantized["layers"][name]
    assert isinstance(packed["embed"], DFloat11Weight)
    tokens = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    for a, b in zip(_logits(quantized, qconfig, tokens), _logits(packed, qconfig, tokens), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip(model, tmp_path):
    _, config, params, packed = model
    converters.save(packed, config, tmp_path / "ckpt")
    loaded_config, loaded = converters.load(tmp_path / "ckpt")
    assert loaded_config == config
    leaves = jax.tree_util.tree_leaves(loaded, is_leaf=lambda x: isinstance(x, DFloat11Weight))
    assert any(isinstance(x, DFloat11Weight) for x in leaves)
    for a, b in zip(jax.tree_util.tree_leaves(packed), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sizes_and_errors(model):
    _, config, params, packed = model
    stored, original = compressed_bytes(packed)
    assert original == sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert stored == sum(x.nbytes for x in jax.tree_util.tree_leaves(packed))  # tables included (8 KiB each)
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        dfloat11(ssm_llm.init_params(config, jax.random.PRNGKey(0)), min_size=256)
    with pytest.raises(ValueError, match="no bfloat16 matrix"):
        dfloat11(params, min_size=10**9)


def test_smollm2_bfloat16_logits_are_identical(smollm2):
    config, params, tokenizer, _ = smollm2
    params = _bf16(params)
    packed = dfloat11(params)
    stored, original = compressed_bytes(packed)
    assert stored / original < 0.72  # measured 0.684
    ids = jnp.asarray([tokenizer.encode("The capital of France is")], jnp.int32)
    config = dataclasses.replace(config)
    for want, got in zip(_logits(params, config, ids), _logits(packed, config, ids), strict=True):
        np.testing.assert_array_equal(got, want)
