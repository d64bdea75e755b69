"""Bad and hostile option values for the extensions (issue 18): draft trees, KV policies, text specs and
Quamba quantization. Each case checks the error type and that the message names the offending value;
everything here fails before compiling anything, so the file runs in seconds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm.kv import GEAR, KIVI, XKV, MiniCache, MixedPrecisionKV, RotateKV, SnapKV, StreamingLLM, TokenSelect
from ssm_llm.kv.policy import compress_cache, resolve_budget
from ssm_llm.kv.snapkv import window_scores
from ssm_llm.kv.spec import parse_policy
from ssm_llm.quant import QuantizedSSMConfig, QuantScheme, quantize_model
from ssm_llm.speculative import RSD, DraftModel, DySpec, PromptLookup, TokenRecycling, bfs_template
from ssm_llm.speculative.spec import parse_drafter
from ssm_llm.speculative.tree import MAX_TREE_NODES, UNUSED, ancestor_mask, depths

LLAMA = ssm_llm.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
MAMBA1 = ssm_llm.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_layers=2, intermediate_size=64)
QUAMBA = QuantizedSSMConfig(MAMBA1, QuantScheme.quamba("W8A8"))
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def llama_params():
    return ssm_llm.init_params(LLAMA, jax.random.PRNGKey(0))


def raises(error, value, call):
    """`call()` raises `error` and its one-line message names `value` (a string found verbatim)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert value in message, message
    assert "\n" not in message and len(message) < 400, message
    return message


# -- draft trees are bounded --------------------------------------------------------------------------


def test_prompt_lookup_tree_is_bounded():
    message = raises(ValueError, "1000000", lambda: PromptLookup(num_tokens=1000000))
    assert "PromptLookup: num_tokens must be an int <= 1023" in message and "MAX_TREE_NODES = 1024" in message
    raises(ValueError, "1000000", lambda: parse_drafter("prompt_lookup:num_tokens=1000000"))
    assert PromptLookup(num_tokens=MAX_TREE_NODES - 1).tree_size == MAX_TREE_NODES


@pytest.mark.parametrize(
    "make, value",
    [
        (lambda: PromptLookup(max_ngram=100000), "max_ngram must be an int <= 64, got 100000"),
        (lambda: PromptLookup(min_ngram=2.0), "min_ngram must be an int >= 1, got 2.0"),
        (lambda: PromptLookup(num_tokens=-3), "num_tokens must be an int >= 1, got -3"),
        (
            lambda: TokenRecycling(candidates=2000, template=tuple((0, r) for r in range(1100))),
            "template has 1100 nodes",
        ),
        (lambda: TokenRecycling(template=((0, 0.5),)), "got ((0, 0.5),)"),
        (lambda: TokenRecycling(template=((True, 0),)), "got ((True, 0),)"),
        (lambda: TokenRecycling(candidates=True), "candidates must be an int >= 1, got True"),
        (lambda: bfs_template(((10**9,),)), "child count of node 0 must be an int <= 1023, got 1000000000"),
        (lambda: bfs_template((3,)), "level 0 must be a sequence of child counts, got 3"),
        (lambda: DraftModel(None, LLAMA, num_tokens=5000), "num_tokens must be an int <= 1023, got 5000"),
        (
            lambda: DraftModel(None, LLAMA, num_tokens=np.float64(4)),
            "num_tokens must be an int >= 1, got np.float64(4.0)",
        ),
        (
            lambda: RSD(None, LLAMA, branching=(10, 10, 10, 10)),
            "branching (10, 10, 10, 10) makes a tree of more than 1024",
        ),
        (lambda: RSD(None, LLAMA, branching=(10**30, 10**30)), "more than 1024 nodes"),
        (lambda: RSD(None, LLAMA, branching=(2.0, 1)), "got (2.0, 1)"),
        (lambda: RSD(None, LLAMA, branching=()), "got ()"),
        (lambda: DySpec(None, LLAMA, tree_size=5000), "tree_size must be an int <= 1024, got 5000"),
        (lambda: DySpec(None, LLAMA, max_depth=10**9), "max_depth must be an int <= 1023, got 1000000000"),
        (lambda: DySpec(None, LLAMA, per_step=False), "per_step must be an int >= 1, got False"),
    ],
)
def test_bad_drafter_options_name_the_value(make, value):
    raises(ValueError, value, make)


def test_numpy_ints_are_ints_for_drafters():
    assert PromptLookup(num_tokens=np.int64(4), max_ngram=np.int32(2)).tree_size == 5
    assert DySpec(None, LLAMA, tree_size=np.int64(8)).tree_size == 8
    assert RSD(None, LLAMA, branching=[np.int64(2), 1]).branching == (2, 1)
    assert TokenRecycling(template=((np.int64(0), np.int64(1)),)).template == ((0, 1),)


@pytest.mark.parametrize("n", [1, 2, 7, 64, MAX_TREE_NODES])
def test_ancestor_mask_matches_a_walk_up_the_tree(n):
    """Pointer jumping (log N traced steps, so a 1024-node tree compiles fast) against walking each node's
    parents, on random trees with unused nodes."""
    rng = np.random.default_rng(n)
    parents = np.full((2, n), UNUSED)
    parents[:, 0] = -1
    for i in range(1, n):
        parents[:, i] = np.where(rng.random(2) < 0.1, UNUSED, rng.integers(0, i, 2))
    parents[1, 1:] = np.arange(n - 1)  # a chain: the deepest tree
    expected = np.zeros((2, n, n), bool)
    for b in range(2):
        for i in range(n):
            j = i
            while j >= 0:
                expected[b, i, j] = True
                j = parents[b, j] if j > 0 else -1
    mask = np.asarray(ancestor_mask(jnp.asarray(parents, jnp.int32)))
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(np.asarray(depths(jnp.asarray(parents, jnp.int32))), expected.sum(-1) - 1)


# -- draft models: quantized or another vocabulary ----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: DraftModel(None, QUAMBA),
        lambda: RSD(None, QUAMBA),
        lambda: DySpec(None, QUAMBA),
        lambda: DraftModel.skip_layers({}, QUAMBA, [0]),
    ],
)
def test_quantized_draft_model_is_refused_at_construction(make):
    raises(ValueError, "quantized (Quamba) draft model is not supported", make)


def test_draft_model_config_must_be_a_model_config():
    raises(TypeError, "got dict", lambda: DraftModel(None, {"vocab_size": 64}))


def test_draft_vocabulary_must_be_the_targets():
    target = dataclasses.replace(LLAMA, vocab_size=65)
    tokens, lengths = jnp.ones((1, 4), jnp.int32), jnp.asarray([4], jnp.int32)
    raises(
        ValueError,
        "vocabulary (64 tokens) must be the target's (65 tokens)",
        lambda: DraftModel(None, MAMBA1).init(None, target, tokens, lengths, 16),
    )


# -- KV policies: fractions, floats, ints, and options checked against the model ----------------------


def test_tiny_fractional_budget_is_an_error_not_one_token(llama_params):
    message = raises(ValueError, "budget=1e-09", lambda: resolve_budget("SnapKV", 1e-9, 5))
    assert "round(1e-09 * 5) = 0 tokens of a 5-token prompt" in message
    assert resolve_budget("SnapKV", 0.5, 5) == 2  # round half to even
    raises(ValueError, "round(0.1 * 5) = 0 tokens", lambda: resolve_budget("SnapKV", 0.1, 5))
    policy = SnapKV(budget=1e-9)  # a fraction in (0, 1]: only a prompt length decides
    raises(
        ValueError,
        "SnapKV: budget=1e-09 keeps round(1e-09 * ",
        lambda: ssm_llm.generate(
            llama_params, LLAMA, [[1, 2, 3, 4, 5]], ssm_llm.GenerationConfig(max_new_tokens=2, kv_compression=policy)
        ),
    )
    # Each row counts: 0.1 of a 20-token prompt keeps 2, of the 4-token row nothing.
    tokens = np.ones((2, 20), np.int32)
    raises(
        ValueError,
        "of a 4-token prompt",
        lambda: ssm_llm.kv.prefill(llama_params, LLAMA, tokens, SnapKV(budget=0.1, window=2), 40, token_counts=[20, 4]),
    )
    cache = ssm_llm.init_cache(LLAMA, 1, 8).replace(lengths=jnp.asarray([8], jnp.int32))
    raises(
        ValueError,
        "MixedPrecisionKV: important=0.01",
        lambda: compress_cache(LLAMA, cache, MixedPrecisionKV(important=0.01, window=2), 16, observation=object()),
    )


@pytest.mark.parametrize(
    "make, value",
    [
        (lambda: SnapKV(budget=NAN), "fractional budget must lie in (0, 1], got nan"),
        (lambda: SnapKV(budget=INF), "got inf"),
        (lambda: SnapKV(budget=-0.5), "got -0.5"),
        (lambda: SnapKV(budget=True), "budget must be an int >= 1, got True"),
        (lambda: SnapKV(budget=64, beta=INF), "beta must be a number >= 1 (and finite), got inf"),
        (lambda: SnapKV(budget=64, beta=NAN), "got nan"),
        (lambda: SnapKV(budget=0.5, kernel_size=3.0), "kernel_size must be an int >= 1, got 3.0"),
        (lambda: SnapKV(budget=0.5, pyramid="yes"), "pyramid must be True or False, got 'yes'"),
        (lambda: StreamingLLM(budget=8.0), "budget must be an int >= 1, got 8.0"),
        (lambda: StreamingLLM(budget=8, sinks=True), "sinks must be an int >= 0, got True"),
        (lambda: StreamingLLM(budget=8, distance_ceiling=-1), "distance_ceiling must be an int >= 1, got -1"),
        (lambda: TokenSelect(k=4, threshold=NAN), "got nan"),
        (lambda: TokenSelect(k=4, local=1.5), "local must be an int >= 0, got 1.5"),
        (lambda: KIVI(bits=True), "got True"),
        (lambda: KIVI(residual=-128), "residual must be an int >= 1, got -128"),
        (lambda: RotateKV(head_group=np.float32(2)), "head_group must be an int >= 1"),
        (lambda: MixedPrecisionKV(important=NAN), "fractional important must lie in (0, 1], got nan"),
        (lambda: MixedPrecisionKV(important=True), "important must be an int >= 1, got True"),
        (lambda: GEAR(outlier_fraction=NAN), "outlier_fraction must be a number in [0, 1), got nan"),
        (lambda: GEAR(rank=1.5), "rank must be an int >= 0, got 1.5"),
        (lambda: MiniCache(t=INF), "t must be a number in [0, 1], got inf"),
        (lambda: MiniCache(retention_threshold=True), "got True"),
        (lambda: MiniCache(max_retained=-0.1), "got -0.1"),
        (lambda: XKV(rank=True), "rank must be an int >= 1, got True"),
        (lambda: XKV(rank=4, value_rank=2.5), "value_rank must be an int >= 1, got 2.5"),
    ],
)
def test_bad_policy_options_name_the_value(make, value):
    raises(ValueError, value, make)


def test_numpy_ints_are_ints_for_policies():
    for policy in (
        StreamingLLM(budget=np.int64(8), sinks=np.int64(2)),
        TokenSelect(k=np.int64(4)),
        KIVI(group_size=np.int64(16), residual=np.int64(32)),
        XKV(rank=np.int64(4)),
        SnapKV(budget=np.int64(64), window=np.int32(8)),
        MiniCache(start_layer=np.int64(1)),
    ):
        policy.check(LLAMA, (8,))


@pytest.mark.parametrize(
    "policy, value",
    [
        (StreamingLLM(budget=10**9), "budget (1000000000) exceeds the model's context of 256 positions"),
        (StreamingLLM(budget=300, positions="original"), "budget (300) exceeds the model's context"),
        (
            StreamingLLM(budget=64, distance_ceiling=256),
            "distance_ceiling (256) must be below the model's context of 256",
        ),
        (KIVI(group_size=12, residual=12), "KIVI: group_size (12) does not fit head_dim (16)"),
        (KIVI(group_size=512, residual=512), "KIVI: group_size (512) exceeds the model's context of 256"),
        (KIVI(group_size=16, residual=4096), "KIVI: residual (4096) exceeds the model's context"),
        (RotateKV(group_size=12), "RotateKV: group_size (12) does not fit head_group * head_dim (16)"),
        (RotateKV(head_group=3), "head_group (3) must divide the model's 2 kv heads"),
        (MixedPrecisionKV(group_size=6), "MixedPrecisionKV: group_size (6) does not fit head_dim (16)"),
        (MixedPrecisionKV(group_size=10**6), "MixedPrecisionKV: group_size (1000000) exceeds the model's context"),
        (GEAR(group_size=10), "GEAR: group_size (10) does not fit head_dim (16)"),
        (GEAR(group_size=2**20), "GEAR: group_size (1048576) exceeds the model's context"),
        (MiniCache(start_layer=5), "start_layer must lie in [0, num_layers = 2], got 5"),
        (XKV(rank=4, group_size=3), "XKV: group_size (3) must not exceed the model's 2 layers"),
    ],
)
def test_options_that_do_not_fit_the_model_fail_before_any_array(policy, value):
    raises(ValueError, value, lambda: policy.check(LLAMA, (8,)))
    cache = ssm_llm.init_cache(LLAMA, 1, 8).replace(lengths=jnp.asarray([8], jnp.int32))
    raises(ValueError, value, lambda: compress_cache(LLAMA, cache, policy, 16, observation=object()))


@pytest.mark.parametrize(
    "policy, value",
    [(XKV(rank=4, group_size=3), "group_size (3)"), (KIVI(group_size=12, residual=12), "group_size (12) does not fit")],
)
def test_generate_refuses_them_before_the_prefill_compiles(policy, value, llama_params):
    raises(
        ValueError,
        value,
        lambda: ssm_llm.generate(
            llama_params, LLAMA, [[1, 2, 3]], ssm_llm.GenerationConfig(max_new_tokens=2, kv_compression=policy)
        ),
    )


def test_streaming_budget_within_the_context_is_fine():
    StreamingLLM(budget=256, distance_ceiling=255).check(LLAMA, (8,))


def test_token_select_state_is_bounded_by_the_capacity():
    cache = ssm_llm.init_cache(LLAMA, 1, 8).replace(lengths=jnp.asarray([8], jnp.int32))
    data = compress_cache(LLAMA, cache, TokenSelect(k=10**9, sinks=0, local=0), 16).data
    assert data.selected.shape == (2, 1, 16)


def test_snapkv_wide_pooling_kernel_pools_the_same_values():
    """A kernel wider than 2 S - 1 covers every key from every position already: it is capped (no huge
    padding) and pools the same values."""
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(1, 2, 6, 16)), jnp.float32)
    queries = jnp.asarray(rng.normal(size=(1, 2, 4, 16)), jnp.float32)
    positions, lengths = jnp.asarray([[4, 5]], jnp.int32), jnp.asarray([6], jnp.int32)
    for pooling in ("max", "avg"):
        huge = window_scores(keys, queries, positions, lengths, 2, 10**9 + 1, pooling)
        exact = window_scores(keys, queries, positions, lengths, 2, 11, pooling)
        scale = 11 / (10**9 + 1) if pooling == "avg" else 1.0  # avg divides by the kernel size
        np.testing.assert_allclose(np.asarray(huge), np.asarray(exact) * scale, rtol=1e-6)


# -- text specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, value",
    [
        ("prompt_lookup:num_tokens=1000000", "num_tokens must be an int <= 1023, got 1000000"),
        ("prompt_lookup:num_tokens=" + "9" * 5000, "cannot read num_tokens="),
        ("prompt_lookup:num_tokens=" + "-" * 100000 + "1", "cannot read num_tokens="),
        ("prompt_lookup:num_tokens=True", "num_tokens must be an int >= 1, got True"),
        ("prompt_lookup:num_tokens=-3", "got -3"),
        ("prompt_lookup:num_tokens=3.0", "got 3.0"),
        ("token_recycling:template=((0, 0.5),)", "got ((0, 0.5),)"),
        ("token_recycling:candidates=1e9", "got 1000000000.0"),
        ("snapkv:budget=1e400", "fractional budget must lie in (0, 1], got inf"),
        ("snapkv:budget=nan", "got 'nan'"),
        ("snapkv:budget=-1", "budget must be an int >= 1, got -1"),
        ("snapkv:budget=0.5,beta=inf", "beta must be a number >= 1 (and finite), got 'inf'"),
        ("streamingllm:budget=True", "got True"),
        ("streamingllm:budget=10**9", "cannot read budget='10**9'"),
        ("tokenselect:k=4,threshold=2", "threshold must be None or a cosine similarity in [-1, 1], got 2"),
        ("gear:outlier_fraction=nan", "got 'nan'"),
        ("kivi:bits=2.0", "bits must be one of (2, 4, 8, 16) (16: no quantization), got 2.0"),
        ("minicache:t=-1", "t must be a number in [0, 1], got -1"),
        ("xkv:rank=99999999999999999999999,group_size=0", "group_size must be an int >= 1, got 0"),
        ("bogus:budget=1", "unknown KV compression method 'bogus'"),
    ],
)
def test_text_specs_give_one_line_errors_naming_the_value(spec, value):
    parse = parse_drafter if spec.startswith(("prompt_lookup", "token_recycling")) else parse_policy
    raises(ValueError, value, lambda: parse(spec))


# -- Quamba quantization -----------------------------------------------------------------------------

# quantize_model checks its scheme, model and tokens before it reads a parameter: no params are needed.
MAMBA_PARAMS = {}


def test_quantize_model_scheme_string_says_how_to_build_one():
    message = raises(
        TypeError,
        "got str 'W8A8'",
        lambda: quantize_model(MAMBA_PARAMS, MAMBA1, np.ones((1, 8), np.int32), scheme="W8A8"),
    )
    assert "QuantScheme.quamba2('W8A8')" in message and "QuantScheme.quamba('W8A8')" in message
    assert "QuantScheme.naive('W8A8')" in message


def test_quantize_model_refuses_attention_and_quantized_models(llama_params):
    raises(
        TypeError,
        "not ModelConfig",
        lambda: quantize_model(
            llama_params, LLAMA, np.ones((1, 8), np.int32), QuantScheme.naive("W8A8"), progress=False
        ),
    )
    raises(
        TypeError,
        "not QuantizedSSMConfig (the model is already quantized)",
        lambda: quantize_model(
            MAMBA_PARAMS, QUAMBA, np.ones((1, 8), np.int32), QuantScheme.naive("W8A8"), progress=False
        ),
    )


@pytest.mark.parametrize(
    "tokens, value",
    [
        ([[1, 2, 3], [4, 5]], "got ragged rows"),
        (np.ones((2, 8), np.float32), "integer ids, got dtype float32"),
        (np.full((2, 8), 64), "lie in [0, 64), got range [64, 64]"),
        (np.full((2, 8), -1), "got range [-1, -1]"),
        (np.array([["a", "b"]]), "integer ids, got dtype <U1"),
        (np.ones((8,), np.int32), "non-empty [N, T] array, got shape (8,)"),
    ],
)
def test_calibration_tokens_are_checked(tokens, value):
    raises(
        ValueError,
        value,
        lambda: quantize_model(MAMBA_PARAMS, MAMBA1, tokens, QuantScheme.naive("W8A8", cluster=False), progress=False),
    )


@pytest.mark.parametrize(
    "overrides, value",
    [
        ({"weight_bits": 8.0}, "weight_bits and act_bits must be ints"),
        ({"gptq_damp": NAN}, "gptq_damp must be a finite number >= 0, got nan"),
        ({"percentile_alpha": "high"}, "percentile_alpha must lie in (0, 1], got 'high'"),
        ({"hadamard": "yes"}, "hadamard must be True or False, got 'yes'"),
        ({"group_size": 0}, "group_size must be an int >= 1, got 0"),
        ({"observer": ["minmax"]}, "unknown observer ['minmax']"),
    ],
)
def test_bad_quant_scheme_options_name_the_value(overrides, value):
    raises(ValueError, value, lambda: QuantScheme(**overrides))
    assert QuantScheme(group_size=np.int64(64)).group_size == 64


def test_quantize_model_batch_size():
    raises(
        ValueError,
        "batch_size must be an int >= 1, got 0",
        lambda: quantize_model(
            MAMBA_PARAMS, MAMBA1, np.ones((1, 8), np.int32), QuantScheme.naive("W8A8"), batch_size=0, progress=False
        ),
    )
