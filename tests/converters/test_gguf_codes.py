"""GGUF block-quantized tensors read straight into integer layouts (`converters.load(..., quantize=...)`):
every format's codes rebuild the `gguf` package's own dequantized values, a quantized load of a file
computes what its float load computes, mixed formats re-block into one stacked array, orbax keeps the
offsets, and bad requests are clear errors. Q8_0 / Q4_0 / Q4_1 tensors are written with the `gguf`
package's quantizer; Q4_K / Q6_K blocks (which it cannot quantize) are built here from the format's
layout: random codes and sub-scales under finite float16 super-scales."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_hf_model, tiny_hf_ssm_model
from test_converters import write_gguf

import converters
import ssm_llm
from converters.gguf_codes import NATIVE, as_quantized, block_codes, stack
from pallas_kernels.quantized_matmul import QuantizedWeight, dequantize_weights
from ssm_llm.int8_blocks import unblock_int8_weights

T = gguf.GGMLQuantizationType


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw bytes [rows, row_bytes] of a tensor of `qtype`: quantized floats, or random K-quant blocks."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.1, qtype)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    d_at = {T.Q4_K: (0, 2), T.Q6_K: (208,)}[qtype]  # f16 super-scales (Q4_K: d and dmin) must be finite
    for at in d_at:
        raw[:, at : at + 2] = (rng.uniform(1e-4, 1e-2, len(raw)).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def reader_tensor(tmp_path, qtype, rows=8, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / f"{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("w", random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path).tensors[0]


@pytest.mark.parametrize("type_name", list(NATIVE))
def test_block_codes_rebuild_the_dequantized_tensor(type_name, tmp_path):
    tensor = reader_tensor(tmp_path, T[type_name])
    want = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(8, 512)
    codes = block_codes(tensor)
    group, bits = NATIVE[type_name]
    assert (codes.group, codes.bits) == (group, bits)
    assert codes.codes.dtype == np.int8 and codes.scales.shape == (8, 512 // group)
    assert (codes.offsets is not None) == (type_name in ("Q4_1", "Q4_K"))
    for store_bits in {bits, 8}:  # 4-bit codes also fit 8-bit weights
        qw = as_quantized(codes, store_bits)
        got = np.asarray(dequantize_weights(qw)).T
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    if bits == 8:
        with pytest.raises(ValueError, match="need 8 bits"):
            as_quantized(codes, 4)


def test_stack_reblocks_mixed_group_sizes_and_offsets():
    rng = np.random.default_rng(0)
    k, n = 64, 8

    def weight(group, offsets):
        values = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        scales = jnp.asarray(rng.uniform(0.1, 1, (k // group, n)), jnp.float32)
        off = jnp.asarray(rng.standard_normal((k // group, n)), jnp.float32) if offsets else None
        return QuantizedWeight(values, scales, 8, group, off)

    parts = [weight(32, True), weight(16, False), weight(64, False)]
    stacked = stack(parts)
    assert stacked.group_size == 16 and stacked.offsets.shape == (3, 4, n)
    for i, part in enumerate(parts):
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
        np.testing.assert_array_equal(np.asarray(dequantize_weights(one)), np.asarray(dequantize_weights(part)))


LINEAR_SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def quantized_gguf(tmp_path, arch, types_of_layer):
    """A tiny model written as GGUF with its linears stored in block formats: `types_of_layer(i, name)`
    gives the GGUF type of layer i's linear `name`. The linears' values are the format's own (quantized
    from the model's weights, or random K-quant blocks): both loads below read the same file."""
    model = tiny_hf_model(arch, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "model.gguf"
    rng = np.random.default_rng(1)

    def tensor_hook(gguf_name, array):
        for i in range(model.config.num_hidden_layers):
            for suffix in LINEAR_SUFFIXES:
                if gguf_name == f"blk.{i}.{suffix}.weight":
                    qtype = types_of_layer(i, suffix)
                    if qtype in (T.Q4_K, T.Q6_K):
                        return random_blocks(qtype, *array.shape, rng), qtype
                    return gguf.quants.quantize(array, qtype), qtype
        return None

    write_gguf(path, model, arch, tensor_hook=tensor_hook)
    return path


def logits(config, params, ids):
    return ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, *ids.shape))[0]


IDS = jnp.asarray([[3, 17, 42, 9, 77, 5, 12, 60]])


@pytest.mark.parametrize(
    ("arch", "scheme", "types"),
    [
        ("llama", "w4a16", lambda i, s: [T.Q4_0, T.Q4_1, T.Q4_K][(i + len(s)) % 3]),
        ("qwen2", "w8a16", lambda i, s: T.Q6_K if s == "ffn_down" and i == 1 else T.Q4_K),
        ("llama", "w8a16", lambda i, s: [T.Q8_0, T.Q4_1][i % 2]),
    ],
    ids=["4bit-mixed", "q4k-q6k", "q8-q4_1"],
)
def test_native_quantized_load_computes_the_float_load(arch, scheme, types, tmp_path):
    path = quantized_gguf(tmp_path, arch, types)
    config, params = converters.load(path)
    qconfig, qparams = converters.load(path, quantize=scheme)
    assert qconfig.quantization == scheme
    bits = {"w4a16": 4, "w8a16": 8}[scheme]
    for name in ("wq", "wo", "w_down"):
        w = qparams["layers"][name]
        assert isinstance(w, QuantizedWeight) and w.bits == bits and w.group_size in (16, 32)
        np.testing.assert_allclose(
            np.asarray(jax.vmap(dequantize_weights)(w)), np.asarray(params["layers"][name]), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(
        np.asarray(logits(qconfig, qparams, IDS)), np.asarray(logits(config, params, IDS)), atol=1e-4
    )
    saved = tmp_path / "ckpt"
    converters.save(qparams, qconfig, saved)
    config2, params2 = converters.load(saved)
    assert config2 == qconfig
    np.testing.assert_array_equal(np.asarray(logits(config2, params2, IDS)), np.asarray(logits(qconfig, qparams, IDS)))


def test_requantized_and_w8a8_loads(tmp_path):
    """8-bit formats asked for 4 bits, and W8A8's per-channel default, are rounded to nearest from the
    dequantized tensor: the same as quantize_weights on the float load."""
    path = quantized_gguf(tmp_path, "llama", lambda i, s: T.Q8_0 if i == 0 else T.Q4_1)
    config, params = converters.load(path)
    for scheme, group in (("w4a16", 32), ("w8a8", None)):
        qconfig, qparams = converters.load(path, quantize=scheme)
        qparams = unblock_int8_weights(qparams)  # (W8A8 comes in the CPU kernel's blocked layout where it runs)
        ref_params, ref_config = ssm_llm.quantize_weights(params, config, scheme, group)
        assert qconfig == ref_config
        layer0 = jax.tree_util.tree_map(lambda a: a[0], qparams["layers"]["wq"])
        ref0 = jax.tree_util.tree_map(lambda a: a[0], ref_params["layers"]["wq"])
        np.testing.assert_array_equal(np.asarray(dequantize_weights(layer0)), np.asarray(dequantize_weights(ref0)))
    qconfig, qparams = converters.load(path, quantize="w8a8", group_size="native")
    assert qparams["layers"]["wq"].group_size == 32 and qparams["layers"]["wq"].offsets is not None
    out = ssm_llm.generate(qparams, qconfig, [[3, 4, 5]], ssm_llm.GenerationConfig(max_new_tokens=3, eos_token_ids=()))
    assert len(out.tokens[0]) == 3


def test_quantize_on_other_sources_and_errors(tmp_path):
    model = tiny_hf_model("llama")
    config, params = converters.load(model, quantize="w8a16")
    assert config.quantization == "w8a16" and params["layers"]["wq"].bits == 8
    with pytest.raises(ValueError, match="quantize must be None, .auto. or one of"):
        converters.load(model, quantize="int8")
    with pytest.raises(ValueError, match="group_size must be"):
        converters.load(model, quantize="w8a8", group_size=0)
    with pytest.raises(ValueError, match="quantize= applies to attention models"):
        converters.load(tiny_hf_ssm_model("mamba"), quantize="w8a8")
