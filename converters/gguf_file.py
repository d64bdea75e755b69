"""GGUF files (llama.cpp) as `(Hugging Face config dict, tensor mapping with Hugging Face names)`.

Tensors are dequantized lazily to float32 with the `gguf` package, or read as the integer codes of their
blocks (`GGUFTensors.codes`, see `converters.gguf_codes`). llama.cpp stores the q/k
projection rows of "llama" models in an interleaved rotary order; they are permuted back here so the
rest of the converter sees exactly the Hugging Face layout.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_ARCHITECTURES = ("llama", "qwen2")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def unpermute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (head, pair, 2) -> Hugging Face's (head, 2, pair)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (unknown names pass through unchanged, so the strict
    converter reports them as unused)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return gguf_name


class GGUFTensors(Mapping):
    """Lazily dequantized float32 tensors of a GGUF file, keyed by Hugging Face names."""

    def __init__(self, reader, rotary_heads: dict[str, int]):
        self._tensors = {hf_tensor_name(t.name): t for t in reader.tensors}
        self._rotary_heads = rotary_heads  # HF name suffix -> number of heads to un-permute with

    def __getitem__(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise ValueError(
                f"cannot dequantize GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}"
            ) from None
        array = np.asarray(array, np.float32).reshape(tuple(int(s) for s in reversed(tensor.shape)))
        for suffix, heads in self._rotary_heads.items():
            if name.endswith(suffix):
                if array.ndim not in (1, 2) or array.shape[0] % (2 * heads):
                    raise ValueError(
                        f"GGUF tensor {tensor.name!r} has shape {array.shape}; a rotary projection "
                        f"needs [rows(, columns)] with rows a multiple of 2 x {heads} heads"
                    )
                array = unpermute_rotary_rows(array, heads)
        return array

    def native_bits(self, name: str) -> int | None:
        """Bits the integer codes of tensor `name` need (`codes`), or None for a float or other type."""
        from converters.gguf_codes import NATIVE

        return NATIVE.get(self._tensors[name].tensor_type.name, (None, None))[1]

    def codes(self, name: str):
        """Tensor `name` as the integer codes of its blocks (`converters.gguf_codes.BlockCodes`), rows in
        the Hugging Face order like `self[name]`."""
        from converters.gguf_codes import block_codes

        codes = block_codes(self._tensors[name])
        for suffix, heads in self._rotary_heads.items():
            if name.endswith(suffix):
                codes = codes.take_rows(lambda a, heads=heads: unpermute_rotary_rows(a, heads))
        return codes

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


@functools.cache
def _reader_class():
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        """`gguf.GGUFReader` over a plain ndarray view of its memory map (the same pages, read lazily): every
        slice of an `np.memmap` runs two Python methods, and the reader slices it ~1.5 million times for
        SmolLM2's metadata and blocks (7.4 s of a 9 s `converters.load` went there on the 2-core EPYC)."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return PlainArrayReader


def open_reader(path: str | Path):
    """A `gguf.GGUFReader` of `path` that slices its memory map as a plain ndarray (see `_reader_class`)."""
    return _reader_class()(path)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], GGUFTensors]:
    """Open a GGUF file; returns a Hugging Face-style config dict and the lazy tensor mapping."""
    reader_class = _reader_class()  # imports gguf (a missing package is its own error, not a bad file)
    path = Path(path)
    try:
        reader = reader_class(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError ... on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unknown architecture {arch!r}; supported GGUF architectures: {', '.join(_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF rope frequency factors (rope_freqs.weight) are not supported")
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")

    def arch_field(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = arch_field("attention.head_count")
    kv_heads = arch_field("attention.head_count_kv", heads)
    hidden = arch_field("embedding_length")
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(embed.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": arch_field("feed_forward_length"),
        "num_hidden_layers": arch_field("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": arch_field("attention.key_length")
        or arch_field("rope.dimension_count")
        or (hidden // heads if hidden and heads else None),
        "rms_norm_eps": arch_field("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": arch_field("rope.freq_base", 10000.0),
        "max_position_embeddings": arch_field("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    missing = [k for k, v in config.items() if v is None and k not in ("bos_token_id", "eos_token_id")]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {missing} for architecture {arch!r}")
    scaling = arch_field("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{path}: GGUF rope scaling {scaling!r} is not supported (only 'linear')")
        config["rope_scaling"] = {"rope_type": "linear", "factor": arch_field("rope.scaling.factor")}
    rotary_heads = {}
    if arch == "llama":
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads)):
            rotary_heads[f"self_attn.{proj}.weight"] = n
            rotary_heads[f"self_attn.{proj}.bias"] = n
    return config, GGUFTensors(reader, rotary_heads)
