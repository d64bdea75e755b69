"""Every KV-compression policy through `generate`: lossless settings reproduce the full cache's tokens on
a ragged batch whose padded prompt leaves the tightest room for decoding, and compressing settings really
shrink `cache_bytes`."""

import jax
import jax.numpy as jnp
import pytest

import ssm_llm
from ssm_llm import kv

CONFIG = ssm_llm.ModelConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
PARAMS = ssm_llm.init_params(CONFIG, jax.random.PRNGKey(1))
# 17 tokens pad to 32 positions; 47 new tokens make 64: the decoded-token room is exactly max_new_tokens.
PROMPTS = [[(7 * i + 3) % 97 for i in range(17)], [5, 61, 8]]
NEW = 47

LOSSLESS = {
    "StreamingLLM": kv.StreamingLLM(budget=96),
    "StreamingLLM-original": kv.StreamingLLM(budget=96, positions="original"),
    "SnapKV": kv.SnapKV(budget=1.0, window=4),
    "PyramidKV": kv.SnapKV(budget=1000, window=4, pyramid=True),  # the top layer keeps ~50
    "TokenSelect": kv.TokenSelect(k=64, sinks=4, local=16),
    "InfLLM": kv.InfLLM(blocks=16, block_size=4, sinks=4, local=16),
    "SqueezedAttention": kv.SqueezedAttention(budget=64, clusters=4, local=4),
    "ShadowKV": kv.ShadowKV(budget=64, chunk_size=4, rank=None, local_chunks=1, outlier_chunks=1),
    "KIVI": kv.KIVI(bits=16, group_size=8, residual=16),
    "RotateKV": kv.RotateKV(bits=16, group_size=16),
    "MixedPrecisionKV": kv.MixedPrecisionKV(high_bits=16, low_bits=2, important=1.0, window=4, group_size=8),
    "GEAR": kv.GEAR(bits=16),
    "MiniCache": kv.MiniCache(start_layer=4),
    "XKV": kv.XKV(rank=128),
}
COMPRESSING = {
    "StreamingLLM": kv.StreamingLLM(budget=16),
    "SnapKV": kv.SnapKV(budget=16, window=4),
    "KIVI": kv.KIVI(bits=2, group_size=16, residual=32),
    "RotateKV": kv.RotateKV(bits=2, group_size=16),
    "MixedPrecisionKV": kv.MixedPrecisionKV(high_bits=8, low_bits=2, important=0.1, window=4, group_size=16),
    "GEAR": kv.GEAR(bits=2, rank=2),
    "MiniCache": kv.MiniCache(start_layer=0),
    "XKV": kv.XKV(rank=4),
}
# stored prompt bytes / full cache bytes that each setting must beat (MiniCache keeps a direction per layer
# pair plus per-layer norms and retained tokens: at most ~2x, here with 16-dim heads)
MAX_RATIO = {"MiniCache": 0.75}


@pytest.fixture(scope="module")
def full():
    return ssm_llm.generate(PARAMS, CONFIG, PROMPTS, ssm_llm.GenerationConfig(max_new_tokens=NEW, eos_token_ids=()))


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_settings_reproduce_the_full_cache(name, full):
    out = ssm_llm.generate(
        PARAMS,
        CONFIG,
        PROMPTS,
        ssm_llm.GenerationConfig(max_new_tokens=NEW, eos_token_ids=(), kv_compression=LOSSLESS[name]),
    )
    assert out.tokens == full.tokens


@pytest.mark.parametrize("name", sorted(COMPRESSING))
def test_compressing_settings_store_fewer_bytes(name):
    prompt = jnp.asarray([[(5 * i + 1) % 97 for i in range(128)]])
    _, compressed = kv.prefill(PARAMS, CONFIG, prompt, COMPRESSING[name], max_len=136)
    full = kv.cache_bytes(ssm_llm.init_cache(CONFIG, 1, 136))
    assert kv.cache_bytes(compressed) < MAX_RATIO.get(name, 0.6) * full
    # and it decodes: the room it promised is there, then forward refuses to overflow
    logits, compressed = ssm_llm.forward(PARAMS, CONFIG, jnp.asarray([[3]]), compressed)
    assert bool(jnp.isfinite(logits).all())
