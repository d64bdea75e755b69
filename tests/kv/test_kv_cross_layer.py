"""Cross-layer KV compression: MiniCache (SLERP-merged layer pairs) and xKV (grouped cross-layer SVD)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm_llm
from ssm_llm.cache import KVCache
from ssm_llm.kv import CompressedCache, cache_bytes, compress_cache
from ssm_llm.kv.minicache import MiniCache, slerp_merge
from ssm_llm.kv.policy import rope_frequencies
from ssm_llm.kv.xkv import XKV

CONFIG = ssm_llm.ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
PARAMS = ssm_llm.init_params(CONFIG, jax.random.PRNGKey(0))
PROMPTS = [[5, 9, 13, 2, 77, 31, 8, 40, 3, 61, 12], [7, 70, 4]]


def similar_layer_params():
    """The tiny model with each layer pair (0, 1), (2, 3) sharing its K/V projections and with small residual
    branches, so paired layers' K/V are nearly parallel (~10 degrees apart), as MiniCache assumes."""
    layers = dict(PARAMS["layers"])
    for name in ("wk", "wv", "attn_norm"):
        layers[name] = layers[name].at[1].set(layers[name][0]).at[3].set(layers[name][2])
    for name in ("wo", "w_down"):
        layers[name] = layers[name] * 0.25
    return {**PARAMS, "layers": layers}


@functools.lru_cache(maxsize=None)
def full_tokens(similar: bool):
    params = similar_layer_params() if similar else PARAMS
    return ssm_llm.generate(params, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=12)).tokens


compress = jax.jit(compress_cache, static_argnums=(0, 2, 3))


def generated(policy, params=PARAMS):
    config = ssm_llm.GenerationConfig(max_new_tokens=12, kv_compression=policy)
    return ssm_llm.generate(params, CONFIG, PROMPTS, config).tokens


def random_cache(layers=4, lengths=(12, 7), prompt_len=12, seed=0, spread=True):
    """A random prompt cache [L, B = len(lengths), H=2, S, D=16] and a tiny config with L layers.

    With `spread`, odd layers are the previous layer plus noise of a per-token scale, so adjacent layers'
    angular distances vary from token to token."""
    rng = np.random.default_rng(seed)
    shape = (layers, len(lengths), 2, prompt_len, 16)
    k, v = rng.normal(size=shape), rng.normal(size=shape)
    if spread:
        scale = rng.uniform(0.05, 1.5, size=shape[:-1] + (1,))
        k[1::2] = k[0::2][: layers // 2] + scale[1::2] * rng.normal(size=k[1::2].shape)
        v[1::2] = v[0::2][: layers // 2] + scale[1::2] * rng.normal(size=v[1::2].shape)
    config = dataclasses.replace(CONFIG, num_layers=layers, layer_windows=())
    return config, KVCache(
        k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32), lengths=jnp.asarray(lengths, jnp.int32)
    )


def numpy_rope(x, positions, inv_freq):
    angles = positions[..., None].astype(np.float64) * inv_freq
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


@functools.lru_cache(maxsize=None)
def ragged_prefill():
    """(first greedy tokens [2], the prompt cache [L, 2, H, 11, D]) of the ragged batch PROMPTS."""
    tokens = np.zeros((2, 11), np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, : len(prompt)] = prompt
    counts = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    logits, cache = ssm_llm.forward(
        PARAMS, CONFIG, jnp.asarray(tokens), ssm_llm.init_cache(CONFIG, 2, 11), token_counts=counts
    )
    return jnp.take_along_axis(logits, (counts - 1)[:, None, None], axis=1)[:, 0].argmax(-1), cache


@pytest.mark.parametrize(
    "policy", [MiniCache(start_layer=4), XKV(rank=64, group_size=3)], ids=["minicache-nothing-merged", "xkv-full-rank"]
)
def test_no_compression_gives_the_full_cache_logits(policy):
    """Nothing merged / full rank: on a ragged batch (11 and 3 prompt tokens) every greedy decode step's logits
    equal the dense cache's, hence so do the tokens (xKV's last group of 3 over 4 layers is zero-padded)."""
    token, prefill = ragged_prefill()
    pad = [(0, 0)] * 3 + [(0, 21), (0, 0)]
    dense = KVCache(k=jnp.pad(prefill.k, pad), v=jnp.pad(prefill.v, pad), lengths=prefill.lengths)
    compressed = compress(CONFIG, prefill, policy, 32)
    assert isinstance(compressed, CompressedCache) and compressed.capacity == 32
    for _ in range(6):
        want, dense = ssm_llm.forward(PARAMS, CONFIG, token[:, None], dense)
        got, compressed = ssm_llm.forward(PARAMS, CONFIG, token[:, None], compressed)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        token = want[:, 0].argmax(-1)
        np.testing.assert_array_equal(got[:, 0].argmax(-1), token)


@pytest.mark.parametrize("t", [0.0, 0.6, 1.0])
def test_slerp_merge_matches_numpy(t):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    b[0] = 2.5 * a[0]  # parallel: the linear fallback, still a's direction
    direction, norm_a, norm_b, distance = slerp_merge(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), t)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    ua, ub = a / na[:, None], b / nb[:, None]
    omega = np.arccos(np.clip((ua * ub).sum(-1), -1, 1))
    omega[0] = np.pi / 2  # any angle: row 0's SLERP is replaced below
    want = (np.sin((1 - t) * omega)[:, None] * ua + np.sin(t * omega)[:, None] * ub) / np.sin(omega)[:, None]
    want[0], omega[0] = ua[0], 0.0
    np.testing.assert_allclose(direction, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(direction), axis=-1), 1.0, atol=2e-5)  # on the sphere
    np.testing.assert_allclose(norm_a, na, rtol=1e-5)
    np.testing.assert_allclose(norm_b, nb, rtol=1e-5)
    np.testing.assert_allclose(distance, omega / np.pi, atol=2e-4)
    if t in (0.0, 1.0):  # the endpoints are the two layers' own directions
        np.testing.assert_allclose(direction, ua if t == 0 else ub, atol=2e-5)


def numpy_minicache(a, b, t, gamma, slots):
    """One (sequence, kv head) of a merged pair, real tokens only: a, b [n, D] -> restored a, b and the
    retained token set (the most distant of those above d_max - gamma (d_max - d_min))."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    ua, ub = a / na[:, None], b / nb[:, None]
    omega = np.arccos(np.clip((ua * ub).sum(-1), -1, 1))
    direction = (np.sin((1 - t) * omega)[:, None] * ua + np.sin(t * omega)[:, None] * ub) / np.sin(omega)[:, None]
    d = omega / np.pi
    candidates = [i for i in np.argsort(-d) if d[i] > d.max() - gamma * (d.max() - d.min())]
    kept = sorted(candidates[:slots])
    a_hat, b_hat = na[:, None] * direction, nb[:, None] * direction
    a_hat[kept], b_hat[kept] = a[kept], b[kept]
    return a_hat, b_hat, kept


def test_minicache_restores_layers_like_numpy():
    """Layers 1-2 merged (start_layer=1), 0 and 3 stored as they are; ragged rows (12 and 7 real tokens); the
    traced layer index (under jit, as in lax.scan) gives the same layers as a Python int."""
    config, cache = random_cache()
    policy = MiniCache(start_layer=1, t=0.6, retention_threshold=0.3, max_retained=3)
    assert policy.layout(4) == ([0, 3], [(1, 2)])
    data, used = jax.jit(policy.compress, static_argnums=(0, 2, 3))(config, cache, None, 16)
    np.testing.assert_array_equal(used, [12, 12])  # the tail starts after the padded prompt
    k, v = np.asarray(cache.k, np.float64), np.asarray(cache.v, np.float64)
    traced = jax.jit(lambda i: policy.reconstruct(config, data, i))
    retained = 0
    for layer in range(4):
        got_k, got_v = policy.reconstruct(config, data, layer)
        for got, want in zip(traced(layer), (got_k, got_v), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        for row, n in enumerate([12, 7]):
            for head in range(2):
                for got, x in ((got_k, k), (got_v, v)):
                    if layer in (0, 3):
                        want = x[layer, row, head, :n]
                    else:
                        a_hat, b_hat, kept = numpy_minicache(x[1, row, head, :n], x[2, row, head, :n], 0.6, 0.3, 3)
                        want = a_hat if layer == 1 else b_hat
                        retained += len(kept)
                    np.testing.assert_allclose(got[row, head, :n], want, atol=2e-5)
    assert 0 < retained <= 2 * 2 * 2 * 2 * 3  # some retained, at most 3 per (K/V, layer, row, head)
    kept_index = np.asarray(data.keys.kept_index)
    assert kept_index.shape == (1, 2, 2, 3) and (kept_index[0, 1] < 7).all()  # row 1's padding is never kept


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_xkv_error_is_the_discarded_singular_values(group_size):
    """Eckart-Young: per group and sequence, the squared Frobenius error of the rebuilt (pre-RoPE) keys and
    values is the sum of the discarded squared singular values of the stacked [tokens, layers * H * D]
    matrix, computed here with numpy; padding rows rebuild to zero. 5 layers, so the last group is short."""
    config, cache = random_cache(layers=5, spread=False)
    policy = XKV(rank=5, group_size=group_size, value_rank=7)
    data, _ = jax.jit(policy.compress, static_argnums=(0, 2, 3))(config, cache, None, 16)
    inv_freq = rope_frequencies(config).astype(np.float64)
    positions = np.arange(12)
    k = numpy_rope(np.asarray(cache.k, np.float64), -positions, inv_freq)  # pre-RoPE keys
    v = np.asarray(cache.v, np.float64)
    rebuild = jax.jit(lambda layer: policy.reconstruct(config, data, layer))
    rebuilt = [rebuild(layer) for layer in range(5)]
    rebuilt_k = np.stack([numpy_rope(np.asarray(x, np.float64), -positions, inv_freq) for x, _ in rebuilt])
    rebuilt_v = np.stack([np.asarray(x) for _, x in rebuilt])
    for start in range(0, 5, group_size):
        layers = list(range(start, min(start + group_size, 5)))
        for row, n in enumerate([12, 7]):
            for x, x_hat, rank in ((k, rebuilt_k, 5), (v, rebuilt_v, 7)):
                stacked = x[layers, row, :, :n].transpose(2, 0, 1, 3).reshape(n, -1)  # [tokens, layers * H * D]
                s = np.linalg.svd(stacked, compute_uv=False)
                error = ((x_hat[layers, row, :, :n] - x[layers, row, :, :n]) ** 2).sum()
                np.testing.assert_allclose(error, (s[rank:] ** 2).sum(), rtol=1e-3, atol=1e-6 * (s**2).sum())
                np.testing.assert_allclose(x_hat[layers, row, :, n:], 0, atol=1e-6)


def test_cache_bytes_shrink():
    """A 64-token prompt in a 72-token cache: what is stored really is smaller than the dense cache."""
    _, cache = random_cache(lengths=(64,), prompt_len=64)
    dense = cache_bytes(ssm_llm.init_cache(CONFIG, 1, 72))
    minicache = compress(CONFIG, cache, MiniCache(start_layer=0), 72)
    xkv = compress(CONFIG, cache, XKV(rank=8), 72)
    tail = 4 * 2 * 8 * (2 * 16 + 1) * 4  # decoded tokens: [L, H, 8 slots] K, V and positions
    counters = 3 * 4  # prompt lengths, lengths, used
    # MiniCache: 2 pairs x (K, V) x [H, S] directions (D each) + 2 norms, and ceil(6.4) = 7 retained tokens
    # per (pair, K/V, head), each an index and two layers' vectors
    merged = 2 * 2 * 2 * 64 * (16 + 2) * 4 + 2 * 2 * 2 * 7 * (1 + 2 * 16) * 4
    assert cache_bytes(minicache) == merged + tail + counters
    # xKV: per 2-layer group a [64, r] basis, per layer a [r, H * D] map; r = 8 keys, 12 values
    factors = (2 * 64 + 4 * 2 * 16) * (8 + 12) * 4
    assert cache_bytes(xkv) == factors + tail + counters
    assert dense / cache_bytes(minicache) > 1.35 and dense / cache_bytes(xkv) > 2.5


def test_minicache_generates_like_full_when_layers_are_similar():
    """On a model whose paired layers' K/V are nearly parallel, merging layers 2-3 (the default start, the
    middle; layers 0-1 stay whole, so the scanned layers pick their branch by the traced index) keeps the
    greedy tokens of a ragged batch."""
    assert generated(MiniCache(), similar_layer_params()) == full_tokens(True)


def test_xkv_below_full_rank_generates_like_full():
    """Rank 8 (keys) / 12 (values) of the 11-token prompt's stacked 2-layer matrices: same greedy tokens."""
    assert generated(XKV(rank=8)) == full_tokens(False)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MiniCache(start_layer=-1), "start_layer must be an int >= 0"),
        (lambda: MiniCache(start_layer=1.5), "start_layer"),
        (lambda: MiniCache(t=-0.1), r"t must be a number in \[0, 1\], got -0.1"),
        (lambda: MiniCache(t=1.5), "t must be"),
        (lambda: MiniCache(t=True), "t must be"),
        (lambda: MiniCache(retention_threshold=2.0), "retention_threshold"),
        (lambda: MiniCache(max_retained=-1), "max_retained"),
        (lambda: MiniCache(max_retained=1.5), "max_retained"),
        (lambda: XKV(rank=0), "rank must be an int >= 1, got 0"),
        (lambda: XKV(rank=2.5), "rank"),
        (lambda: XKV(rank=4, group_size=0), "group_size must be an int >= 1"),
        (lambda: XKV(rank=4, value_rank=0), "value_rank"),
    ],
)
def test_bad_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_start_layer_past_the_stack_raises():
    _, cache = random_cache()
    with pytest.raises(ValueError, match=r"start_layer must lie in \[0, num_layers = 4\], got 5"):
        compress_cache(CONFIG, cache, MiniCache(start_layer=5), 16)


TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes. Before his invention, books were copied by hand, mostly in "
    "monasteries, and a single Bible could take a scribe more than a year to finish. Paper had reached Europe "
    "from China through the Islamic world, and by Gutenberg's time paper mills were working in Italy, France "
    "and Germany, so the material for cheap books was already at hand. Gutenberg's press printed about forty "
    "lines on a page, and his workshop produced around one hundred and eighty copies of the Bible by 1455. "
    "Printers soon set up shops in Venice, Paris, Lyon and London, and by the year 1500 more than two hundred "
    "and fifty towns had a press. Historians estimate that some twenty million books were printed in Europe "
    "before 1500. Cheaper books changed how people learned, argued and prayed: scholars could compare identical "
    "copies of a text, reformers spread pamphlets across whole countries within weeks, and the spelling and "
    "grammar of national languages slowly became fixed. Within fifty years"
)


@pytest.mark.slow
def test_smollm2_teacher_forced_agreement(smollm2):
    """SmolLM2-135M, a 246-token prompt, then its own 16 greedy tokens fed back through each compressed cache:
    next-token agreement and KL against the full model. xKV at rank 128 (of 246) stays close; MiniCache is
    lossy on this model (adjacent layers' K/V are ~90 degrees apart per token), and its token retention
    helps."""
    config, params, tokenizer, _ = smollm2
    prompt = tokenizer(TEXT).input_ids
    continuation = ssm_llm.generate(params, config, [prompt], ssm_llm.GenerationConfig(max_new_tokens=16)).tokens[0]
    ids = jnp.asarray([prompt + continuation])
    reference, _ = ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, 1, ids.shape[1]))
    reference = jax.nn.log_softmax(reference[0, len(prompt) :])
    _, prefill = ssm_llm.forward(params, config, jnp.asarray([prompt]), ssm_llm.init_cache(config, 1, len(prompt)))
    step = jax.jit(lambda cache, token: ssm_llm.forward(params, config, token, cache))

    def agreement(policy):
        cache = compress_cache(config, prefill, policy, ids.shape[1])
        logits = []
        for token in continuation:
            out, cache = step(cache, jnp.asarray([[token]]))
            logits.append(out[0, 0])
        logp = jax.nn.log_softmax(jnp.stack(logits))
        top1 = float((logp.argmax(-1) == reference.argmax(-1)).mean())
        return top1, float((jnp.exp(reference) * (reference - logp)).sum(-1).mean())

    xkv_top1, xkv_kl = agreement(XKV(rank=128))
    mini_top1, mini_kl = agreement(MiniCache())
    bare_top1, bare_kl = agreement(MiniCache(max_retained=0))
    print(
        f"xKV r128: top1 {xkv_top1:.2f} KL {xkv_kl:.3f}; MiniCache: top1 {mini_top1:.2f} KL {mini_kl:.3f}; "
        f"without retention: top1 {bare_top1:.2f} KL {bare_kl:.3f}"
    )
    assert xkv_top1 >= 0.85 and xkv_kl < 0.15
    assert math.isfinite(mini_kl) and mini_kl < bare_kl
