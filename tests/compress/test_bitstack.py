"""BitStack: each residual block is sign(R) times the best rank-r approximation of |R| (checked against numpy's
SVD written out), the rebuilt weight's activation-weighted error is the one the decomposition recorded and
shrinks with every block; the per-budget loader never exceeds its budget, grows with it, gives every matrix a
block and all blocks at the full size; the loaded model runs through `forward` (attention with activation-aware
scaling, Mamba-2 without); bad arguments are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import converters
import ssm_llm
from ssm_llm.bitstack_weight import BitStackWeight, reconstruct, stored_bytes
from ssm_llm.compress import bitstack, load_budget
from ssm_llm.compress.bitstack import decompose, rank_for

LLAMA = ssm_llm.ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
MAMBA2 = ssm_llm.Mamba2Config(
    vocab_size=256,
    hidden_size=32,
    num_layers=2,
    state_size=8,
    intermediate_size=64,
    num_heads=4,
    head_dim=16,
    n_groups=1,
    chunk_size=8,
)


@pytest.fixture(scope="module")
def llama():
    params = ssm_llm.init_params(LLAMA, jax.random.PRNGKey(0))
    calibration = np.random.default_rng(0).integers(0, LLAMA.vocab_size, (2, 24))
    return params, bitstack(params, LLAMA, calibration, blocks=6, rank=2, progress=False)


def test_a_block_is_the_sign_times_a_low_rank_magnitude():
    rng = np.random.default_rng(1)
    w, s = rng.standard_normal((12, 9)).astype(np.float32), rng.uniform(0.5, 2.0, 12).astype(np.float32)
    m = decompose(w, s, blocks=3, rank=2)
    scaled = w.astype(np.float64) * s[:, None]
    left, sigma, right = np.linalg.svd(np.abs(scaled))
    first = np.sign(scaled) * ((left[:, :2] * sigma[:2]) @ right[:2])
    np.testing.assert_allclose(m.weight(1) * s[:, None], first, rtol=2e-3, atol=2e-3)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 20), cols=st.integers(2, 20), rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_rebuilt_error_is_the_recorded_one_and_shrinks(rows, cols, rank, seed):
    rng = np.random.default_rng(seed)
    w, s = rng.standard_normal((rows, cols)).astype(np.float32), rng.uniform(0.5, 2.0, rows).astype(np.float32)
    m = decompose(w, s, blocks=5, rank=rank)
    assert (np.diff(m.errors) <= 1e-9 * m.errors[0]).all()  # every block removes error
    for k in range(6):
        err = np.sum(((w - m.weight(k)) * s[:, None]).astype(np.float64) ** 2)
        np.testing.assert_allclose(err, m.errors[k], rtol=1e-3, atol=1e-6 * m.errors[0])


def test_order_is_level_by_level(llama):
    _, stack = llama
    levels = [level for _, level in stack.order]
    assert levels == sorted(levels) and set(levels) == set(range(2, 7))
    assert len(stack.order) == 5 * len(stack.matrices)


@settings(max_examples=20, deadline=None)
@given(fraction=st.floats(0.0, 1.2))
def test_load_budget_stays_within_its_budget(llama, fraction):
    params, stack = llama
    low, high = stack.bytes_for(0), stack.bytes_for(len(stack.order))
    budget = int(low + fraction * (high - low))
    _, info = load_budget(stack, params, budget)
    assert info["bytes"] <= budget
    assert min(info["blocks"].values()) >= 1 and max(info["blocks"].values()) <= 6
    _, more = load_budget(stack, params, budget + stack.bytes_for(1) - stack.bytes_for(0))
    assert all(more["blocks"][k] >= c for k, c in info["blocks"].items())


def test_budget_extremes(llama):
    params, stack = llama
    _, full = load_budget(stack, params, stack.bytes_for(len(stack.order)) + 10**6)
    assert set(full["blocks"].values()) == {6}
    _, least = load_budget(stack, params, stack.bytes_for(0))
    assert set(least["blocks"].values()) == {1}
    with pytest.raises(ValueError, match="below one block per matrix"):
        load_budget(stack, params, stack.bytes_for(0) - 1)


def test_loaded_models_run_through_forward(llama):
    params, stack = llama
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 10)), jnp.int32)

    def logits(p, config):
        return np.asarray(ssm_llm.forward(p, config, tokens, ssm_llm.init_cache(config, 1, 16))[0])

    want = logits(params, LLAMA)
    errors = []
    for steps in (0, len(stack.order) // 2, len(stack.order)):
        loaded, _ = load_budget(stack, params, stack.bytes_for(steps))
        errors.append(np.abs(logits(loaded, LLAMA) - want).mean())
    # random Gaussian weights are full rank, the hardest case: 6 blocks leave ~3% of the weights' norm
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.15 * np.abs(want).mean()

    mamba = ssm_llm.init_params(MAMBA2, jax.random.PRNGKey(3))
    mstack = bitstack(mamba, MAMBA2, None, blocks=8, rank=4, progress=False)
    assert {name for _, name in mstack.matrices} == {"in_proj", "out_proj"}  # Quamba's list
    loaded, _ = load_budget(mstack, mamba, mstack.bytes_for(len(mstack.order)))
    np.testing.assert_allclose(logits(loaded, MAMBA2), logits(mamba, MAMBA2), atol=2e-2)
    packed, _ = load_budget(mstack, mamba, mstack.bytes_for(len(mstack.order)), packed=True)
    np.testing.assert_allclose(logits(packed, MAMBA2), logits(loaded, MAMBA2), rtol=1e-4, atol=1e-4)


def _numpy_weight(matrix, blocks: int) -> np.ndarray:
    """W rebuilt in numpy from the stored arrays: numpy's own bit order, sum of sign * (u v), divided by the scale."""
    rows, cols = matrix.shape
    total = np.zeros(matrix.shape, np.float64)
    for k in range(blocks):
        negative = np.unpackbits(matrix.signs[k], count=rows * cols).reshape(rows, cols).astype(bool)
        magnitude = matrix.u[k].astype(np.float64) @ matrix.v[k].astype(np.float64)
        total += np.where(negative, -magnitude, magnitude)
    return total / matrix.scale.astype(np.float64)[:, None]


def test_packed_blocks_run_through_forward_hold_the_budget_and_survive_a_checkpoint(llama, tmp_path):
    """load_budget(packed=True): each weight stays as its packed blocks (the bytes the budget counts, floats rebuilt
    only inside the products), with the logits of the float-rebuilt load, cached decode included; orbax keeps it."""
    params, stack = llama
    budget = stack.bytes_for(len(stack.order) // 2)
    rebuilt, info = load_budget(stack, params, budget)
    packed, packed_info = load_budget(stack, params, budget, packed=True)
    assert packed_info == info and isinstance(packed["layers"], list)
    weights = [w for layer in packed["layers"] for w in layer.values() if isinstance(w, BitStackWeight)]
    assert len(weights) == len(stack.matrices)
    assert sum(stored_bytes(w) for w in weights) == info["bytes"]
    for (i, name), matrix in stack.matrices.items():
        w = packed["layers"][i][name]
        assert w.blocks == info["blocks"][i, name]
        np.testing.assert_allclose(np.asarray(reconstruct(w)), _numpy_weight(matrix, w.blocks), rtol=1e-5, atol=1e-6)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (1, 9)), jnp.int32)
    want, _ = ssm_llm.forward(rebuilt, LLAMA, tokens, ssm_llm.init_cache(LLAMA, 1, 16))
    got, cache = ssm_llm.forward(packed, LLAMA, tokens[:, :8], ssm_llm.init_cache(LLAMA, 1, 16))
    step, _ = ssm_llm.forward(packed, LLAMA, tokens[:, 8:], cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :8]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(step), np.asarray(want[:, 8:]), rtol=1e-4, atol=1e-4)
    converters.save(packed, LLAMA, tmp_path / "ckpt")
    config, loaded = converters.load(tmp_path / "ckpt")
    assert config == LLAMA and isinstance(loaded["layers"][0]["wq"], BitStackWeight)
    for a, b in zip(jax.tree_util.tree_leaves(packed), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, cast = converters.load(tmp_path / "ckpt", dtype=jnp.bfloat16)  # plain floats cast, the blocks kept as stored
    assert cast["embed"].dtype == jnp.bfloat16 and cast["layers"][0]["wq"].u.dtype == jnp.float16


def test_bad_arguments_are_refused(llama):
    params, _ = llama
    with pytest.raises(ValueError, match="blocks"):
        bitstack(params, LLAMA, None, blocks=0)
    with pytest.raises(ValueError, match="rank"):
        bitstack(params, LLAMA, None, rank="big")
    with pytest.raises(ValueError, match="attention models"):
        bitstack(ssm_llm.init_params(MAMBA2, jax.random.PRNGKey(0)), MAMBA2, np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="vocabulary|token ids"):
        bitstack(params, LLAMA, np.full((1, 4), 999))
    assert rank_for((4096, 4096)) == 16 and rank_for((8, 8)) == 1
