"""Model configurations: frozen, hashable dataclasses (static arguments under `jax.jit`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ssm_llm.validation import as_float, as_int, as_token_ids

ATTENTION_FAMILY = "attention"
ROPE_TYPES = ("default", "linear", "llama3")
# Over 30x the deepest published decoders (Llama 3.1 405B: 126 layers; Mamba-2 2.7B: 64): a larger count is a
# corrupt config, refused before anything allocates one entry per layer.
MAX_LAYERS = 4096
# How an attention model's linear layers are stored and multiplied (`ssm_llm.quantize_weights`): "none"
# (float), "w8a8" (int8 weights per output channel or group, activations rounded to int8 per token at each
# product, integer accumulation), "w8a16" / "w4a16" (int8 / int4 weights, float activations), "wxa16" (float
# activations, 2- to 8-bit weights whose width may differ from layer to layer: `ssm_llm.compress.quantize_layers`).
WEIGHT_BITS = {"w8a8": 8, "w8a16": 8, "w4a16": 4}  # scheme -> bits of its weight codes
MIXED_WEIGHT_ONLY = "wxa16"
WEIGHT_QUANTIZATIONS = ("none", *WEIGHT_BITS, MIXED_WEIGHT_ONLY)
# How W8A8's int8 x int8 products run on CPU (`ssm_llm.models.lm_head.int8_matmul`): "auto" takes the compiled
# kernel (`pallas_kernels.cpu_int8_dot`) for products of few rows where it is built, XLA's dot otherwise;
# "xla" always XLA's dot. Both give the same int32 sums.
INT8_DOTS = ("auto", "xla")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (the `rope_parameters` of Hugging Face configs).

    `rope_type` is "default", "linear" (positions divided by `factor`) or "llama3" (Llama 3.1's
    frequency-dependent scaling with `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings`).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"llama3 rope needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


def check_token_fields(config) -> None:
    """Validate a config's `bos_token_id` and `eos_token_ids` against its vocabulary (in place)."""
    top = config.vocab_size - 1
    if config.bos_token_id is not None:
        object.__setattr__(config, "bos_token_id", as_int("config.bos_token_id", config.bos_token_id, 0, top))
    object.__setattr__(
        config, "eos_token_ids", as_token_ids("config.eos_token_ids", config.eos_token_ids, config.vocab_size)
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only attention model (Llama, Qwen2, Mistral, SmolLM2 share this shape).

    `layer_windows[i]` is layer i's sliding-window size (0: full causal attention); a key at position
    `s` is visible from a query at `p` when `p - window < s <= p`, as in Hugging Face. `quantization`
    says how the linear layers are stored and multiplied (one of `WEIGHT_QUANTIZATIONS`; set by
    `ssm_llm.quantize_weights`); with `activation_rotation` ("w8a8" only) every linear's input is rotated
    by a block Hadamard matrix (`ssm_llm.hadamard.block_hadamard`) before it is rounded to int8, the
    weights holding the same rotation. `int8_embedding` ("w8a8" only): the embedding (and an untied
    lm_head) is int8 with one scale per vocabulary row, stored as the tied output projection's
    `QuantizedWeight` [hidden, vocab], and the logits are a W8A8 product. `head_residual` (with
    `int8_embedding`): params also hold the int8 head's rounding residual in 4 bits ("head_residual"), and each
    row's top logits are recomputed against the finer weights (`ssm_llm.models.lm_head.refine_logits`), from
    which a tied embedding reads its rows too.
    `int8_dot` picks how W8A8 products run on CPU (one of `INT8_DOTS`; the same numbers either way).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"
    family: str = ATTENTION_FAMILY
    quantization: str = "none"
    activation_rotation: bool = False
    int8_embedding: bool = False
    head_residual: bool = False
    int8_dot: str = "auto"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            object.__setattr__(self, name, as_int(f"config.{name}", getattr(self, name), 1))
        object.__setattr__(self, "num_layers", as_int("config.num_layers", self.num_layers, 1, MAX_LAYERS))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        object.__setattr__(self, "rms_norm_eps", as_float("config.rms_norm_eps", self.rms_norm_eps, 0.0, open_min=True))
        windows = tuple(self.layer_windows) or (0,) * self.num_layers
        if len(windows) != self.num_layers:
            raise ValueError(
                f"layer_windows must hold {self.num_layers} sizes >= 0 (0 = full attention), got {self.layer_windows}"
            )
        object.__setattr__(
            self, "layer_windows", tuple(as_int(f"config.layer_windows[{i}]", w, 0) for i, w in enumerate(windows))
        )
        check_token_fields(self)
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"config.model_type must be a non-empty string (a label), got {self.model_type!r}")
        if self.family != ATTENTION_FAMILY:
            raise ValueError(f"ModelConfig.family must be {ATTENTION_FAMILY!r}, got {self.family!r}")
        if self.quantization not in WEIGHT_QUANTIZATIONS:
            raise ValueError(
                f"config.quantization must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if not isinstance(self.activation_rotation, bool):
            raise ValueError(f"config.activation_rotation must be True or False, got {self.activation_rotation!r}")
        if self.int8_dot not in INT8_DOTS:
            raise ValueError(f"config.int8_dot must be one of {', '.join(INT8_DOTS)}, got {self.int8_dot!r}")
        if not isinstance(self.int8_embedding, bool):
            raise ValueError(f"config.int8_embedding must be True or False, got {self.int8_embedding!r}")
        if self.int8_embedding and self.quantization != "w8a8":
            raise ValueError(
                "config.int8_embedding makes the logits a W8A8 product: it needs quantization 'w8a8', "
                f"got {self.quantization!r}"
            )
        if not isinstance(self.head_residual, bool):
            raise ValueError(f"config.head_residual must be True or False, got {self.head_residual!r}")
        if self.head_residual and not self.int8_embedding:
            raise ValueError("config.head_residual refines an int8 output projection: it needs int8_embedding=True")
        if self.activation_rotation and self.quantization != "w8a8":
            raise ValueError(
                "config.activation_rotation rotates int8 activations: it needs quantization 'w8a8', "
                f"got {self.quantization!r}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `ssm_llm.config_io.config_from_dict` inverts it."""
        return dataclasses.asdict(self)
