"""State-space model configurations (Mamba-1, Mamba-2): frozen, hashable dataclasses like `ModelConfig`.

Field names follow Hugging Face's `MambaConfig` / `Mamba2Config` where they exist.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ssm_llm.config import MAX_LAYERS, check_token_fields
from ssm_llm.validation import as_float, as_int

MAMBA1_FAMILY = "mamba"
MAMBA2_FAMILY = "mamba2"
_ACTIVATIONS = ("silu", "swish")


def _positive_ints(config, names):
    for name in names:
        object.__setattr__(config, name, as_int(f"config.{name}", getattr(config, name), 1))


@dataclasses.dataclass(frozen=True)
class _SSMBase:
    """Fields shared by both SSM families. `max_position_embeddings` is None: no context limit."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    state_size: int
    intermediate_size: int
    conv_kernel: int = 4
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int | None = None

    def _validate_common(self, extra_ints=()):
        _positive_ints(
            self, ("vocab_size", "hidden_size", "state_size", "intermediate_size", "conv_kernel", *extra_ints)
        )
        object.__setattr__(self, "num_layers", as_int("config.num_layers", self.num_layers, 1, MAX_LAYERS))
        object.__setattr__(
            self,
            "layer_norm_epsilon",
            as_float("config.layer_norm_epsilon", self.layer_norm_epsilon, 0.0, open_min=True),
        )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported by Mamba blocks (only silu)")
        if self.max_position_embeddings is not None:
            _positive_ints(self, ("max_position_embeddings",))
        check_token_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `ssm_llm.config_io.config_from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["family"] = self.family
        return d


@dataclasses.dataclass(frozen=True)
class MambaConfig(_SSMBase):
    """Mamba-1: selective SSM with a per-channel diagonal A `[intermediate, state]` and a low-rank dt."""

    time_step_rank: int = 0  # 0: ceil(hidden_size / 16), as Hugging Face's "auto"

    family = MAMBA1_FAMILY

    def __post_init__(self):
        if self.time_step_rank == 0:
            object.__setattr__(self, "time_step_rank", math.ceil(self.hidden_size / 16))
        self._validate_common(("time_step_rank",))


@dataclasses.dataclass(frozen=True)
class Mamba2Config(_SSMBase):
    """Mamba-2 (SSD): scalar A per head, `n_groups` shared B/C groups, chunked prefill of `chunk_size`.

    `time_step_limit = (lo, hi)` clamps dt after softplus (in prefill and, unlike Hugging Face's
    decode path, in decode too, so cached decode equals the full forward).

    `state_decay` (in (0, 1]) and `state_input_scale` (> 0): Stuffed Mamba's train-free fix for state collapse
    past the training length, "forget more, remember less": every step's state decay exp(dt A) is multiplied
    by `state_decay` and its input dt x B by `state_input_scale` (1 and 1: the model as trained). A decay c
    bounds the state's memory to about 1 / (1 - c) tokens. Set them with `dataclasses.replace(config, ...)`.
    """

    num_heads: int = 1
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False
    state_decay: float = 1.0
    state_input_scale: float = 1.0

    family = MAMBA2_FAMILY

    def __post_init__(self):
        self._validate_common(("num_heads", "head_dim", "n_groups", "chunk_size"))
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(
                f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal intermediate_size "
                f"({self.intermediate_size})"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        lo, hi = (float(v) for v in self.time_step_limit)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"time_step_limit must be (lo, hi) with 0 <= lo <= hi, got {self.time_step_limit}")
        object.__setattr__(self, "time_step_limit", (lo, hi))
        # below ~1e-38 float32's log(decay) / A under- or overflows: 1e-30 already forgets everything
        object.__setattr__(self, "state_decay", as_float("config.state_decay", self.state_decay, 1e-30, 1.0))
        object.__setattr__(
            self,
            "state_input_scale",
            as_float("config.state_input_scale", self.state_input_scale, 0.0, open_min=True),
        )

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: x, B and C together."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size


SSM_CONFIGS = {MAMBA1_FAMILY: MambaConfig, MAMBA2_FAMILY: Mamba2Config}
