"""GPTQ and AWQ checkpoints, built here from the formats' documentation (converters/packed_hf.py): the test
picks integer codes, zeros and float16 scales, packs them as AutoGPTQ / GPTQModel / AutoAWQ store them,
and checks that the float load equals scales * (q - zeros) computed from its own integers, that
`quantize="w4a16"` keeps those codes exactly (same logits), act-order groups fall back to re-quantizing,
and unsupported formats are clear errors."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import tiny_hf_model
from safetensors.numpy import save_file

import converters
import ssm_llm
from pallas_kernels.quantized_matmul import QuantizedWeight, dequantize_weights

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] unsigned codes -> int32 [K * bits / 32, N]: row k in word k // per at bits (k % per) * bits."""
    per = 32 // bits
    words = np.zeros((q.shape[0] // per, q.shape[1]), np.uint32)
    for k in range(q.shape[0]):
        words[k // per] |= q[k].astype(np.uint32) << np.uint32(bits * (k % per))
    return words.view(np.int32)


def pack_columns(q: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, N] unsigned codes -> int32 [R, N * bits / 32] along N; slot i of word j holds column
    per * j + order[i] (GPTQ: order = identity; AWQ: AWQ_ORDER)."""
    per = 32 // bits
    order = order or tuple(range(per))
    words = np.zeros((q.shape[0], q.shape[1] // per), np.uint32)
    for j in range(words.shape[1]):
        for i in range(per):
            words[:, j] |= q[:, per * j + order[i]].astype(np.uint32) << np.uint32(bits * i)
    return words.view(np.int32)


def write_packed(tmp_path, method, bits=4, group=16, fmt="gptq", act_order=False, seed=0):
    """A tiny llama whose linears are packed; returns (directory, the float weights they stand for)."""
    model = tiny_hf_model("llama")
    rng = np.random.default_rng(seed)
    tensors, expected = {}, {}
    for name, tensor in model.state_dict().items():
        layer = name.rsplit(".", 2)
        if len(layer) == 3 and layer[1] in LINEARS and layer[2] == "weight":
            prefix = name[: -len(".weight")]
            n, k = tensor.shape
            groups = k // group
            q = rng.integers(0, 2**bits, (k, n))
            z = rng.integers(1 if fmt == "gptq" else 0, 2**bits, (groups, n))  # v1 stores z - 1 >= 0
            s = rng.uniform(0.002, 0.02, (groups, n)).astype(np.float16)
            g_idx = np.arange(k) // group
            if act_order:
                g_idx = rng.permutation(g_idx)
            expected[name] = (s.astype(np.float32)[g_idx] * (q - z[g_idx])).T  # [out, in]
            if method == "gptq":
                tensors[prefix + ".qweight"] = pack_rows(q, bits)
                tensors[prefix + ".qzeros"] = pack_columns(z - (1 if fmt == "gptq" else 0), bits)
                tensors[prefix + ".g_idx"] = g_idx.astype(np.int32)
            else:
                tensors[prefix + ".qweight"] = pack_columns(q, 4, AWQ_ORDER)
                tensors[prefix + ".qzeros"] = pack_columns(z, 4, AWQ_ORDER)
            tensors[prefix + ".scales"] = s
        else:
            tensors[name] = tensor.numpy()
    directory = tmp_path / f"{method}{bits}"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    quant = {"quant_method": method, "bits": bits, "group_size": group}
    if method == "gptq":
        quant.update(checkpoint_format=fmt, desc_act=act_order, sym=False)
    else:
        quant.update(version="gemm", zero_point=True)
    config["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        for name, w in expected.items():
            model.state_dict()[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return directory, model


def logits(config, params, ids):
    return np.asarray(ssm_llm.forward(params, config, ids, ssm_llm.init_cache(config, *ids.shape))[0])


IDS = np.asarray([[3, 17, 42, 9, 77, 5]])


@pytest.mark.parametrize(
    ("method", "bits", "fmt"),
    [("gptq", 4, "gptq"), ("gptq", 4, "gptq_v2"), ("gptq", 8, "gptq"), ("awq", 4, None)],
    ids=["gptq4", "gptq4-v2", "gptq8", "awq"],
)
def test_packed_checkpoint_loads_float_and_native(method, bits, fmt, tmp_path):
    directory, reference = write_packed(tmp_path, method, bits, fmt=fmt or "gptq")
    config, params = converters.load(directory)
    ref_config, ref_params = converters.load(reference)  # the weights the test's own integers stand for
    for name in ("wq", "wo", "w_down"):
        np.testing.assert_allclose(
            np.asarray(params["layers"][name]), np.asarray(ref_params["layers"][name]), rtol=1e-6, atol=1e-7
        )
    scheme = "w4a16" if bits == 4 else "w8a16"
    qconfig, qparams = converters.load(directory, quantize=scheme)
    w = qparams["layers"]["w_up"]
    assert isinstance(w, QuantizedWeight) and (w.bits, w.group_size) == (bits, 16) and w.offsets is not None
    np.testing.assert_allclose(
        np.asarray(jax.vmap(dequantize_weights)(w)), np.asarray(ref_params["layers"]["w_up"]), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(logits(qconfig, qparams, IDS), logits(ref_config, ref_params, IDS), atol=1e-4)


def test_act_order_groups_load_float_and_requantize(tmp_path):
    directory, reference = write_packed(tmp_path, "gptq", act_order=True)
    config, params = converters.load(directory)
    ref_config, ref_params = converters.load(reference)
    np.testing.assert_allclose(np.asarray(params["layers"]["wk"]), np.asarray(ref_params["layers"]["wk"]), atol=1e-7)
    qconfig, qparams = converters.load(directory, quantize="w8a16")
    want, _ = ssm_llm.quantize_weights(params, config, "w8a16")  # no block layout: per output channel
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(dequantize_weights)(qparams["layers"]["wk"])),
        np.asarray(jax.vmap(dequantize_weights)(want["layers"]["wk"])),
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
        ({"quant_method": "awq", "version": "gemv"}, "AWQ version 'gemv'"),
        ({"bits": 3}, "gptq with 3 bits"),
        ({"group_size": -1}, "group_size must be a positive int"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ],
)
def test_unsupported_packed_formats_are_clear_errors(change, match, tmp_path):
    directory, _ = write_packed(tmp_path, "gptq")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        converters.load(directory)
