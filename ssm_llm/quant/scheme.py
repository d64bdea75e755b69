"""What a quantized Mamba / Mamba-2 model is: the scheme (bits, which Quamba2 ingredients) and its config.

Supported bit pairs (weights / activations): W8A8, W4A8 and W4A16 as in Quamba2, plus W16A16 — a float
model with only the mathematically neutral transforms (Hadamard rotation, channel reordering) applied,
which is the reference those transforms are tested against.
"""

from __future__ import annotations

import dataclasses

from ssm_llm.option_spec import check_bool, check_int, is_int, is_real, shown
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

SUPPORTED_BITS = ((8, 8), (4, 8), (4, 16), (16, 16))
OBSERVERS = ("minmax", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A post-training quantization recipe.

    weight_bits / act_bits: one of `SUPPORTED_BITS` (16 = kept in float).
    group_size: rows of K per scale for 4-bit weights (8-bit weights are per output channel).
    hadamard: rotate the residual stream offline (norm weights folded into the next linear, lm_head
      untied) and the out_proj input online, so outlier channels are spread before rounding.
    cluster: Mamba-2 only — sort-and-cluster the SSM input x (`head_groups` x `dim_groups` scales per
      SSD group) instead of one per-tensor scale.
    bc_groups: Mamba-2 only — one scale per B/C state group instead of one per tensor.
    gptq: quantize weights with GPTQ (`gptq_damp` of the mean Hessian diagonal as damping) instead of
      round-to-nearest.
    observer: how activation ranges are taken from calibration: "minmax" (absmax) or "percentile"
      (the `percentile_alpha` quantile of |x|, used for x, the SSM state and per-tensor points).
    quantize_state: with 8-bit activations, keep the SSM and conv states in the cache as int8 codes.
    """

    weight_bits: int = 8
    act_bits: int = 8
    group_size: int = 128
    hadamard: bool = True
    cluster: bool = True
    head_groups: int = 4
    dim_groups: int = 4
    bc_groups: bool = True
    gptq: bool = True
    gptq_damp: float = 0.01
    observer: str = "minmax"
    percentile_alpha: float = 0.9995
    quantize_state: bool = True

    def __post_init__(self):
        names = ", ".join(f"W{w}A{a}" for w, a in SUPPORTED_BITS)
        if not (is_int(self.weight_bits) and is_int(self.act_bits)):
            raise ValueError(
                f"QuantScheme: weight_bits and act_bits must be ints (supported: {names}), got "
                f"{shown(self.weight_bits)} and {shown(self.act_bits)}"
            )
        if (self.weight_bits, self.act_bits) not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit pair W{self.weight_bits}A{self.act_bits}; supported: {names}")
        for name in ("group_size", "head_groups", "dim_groups"):
            check_int("QuantScheme", name, getattr(self, name))
        for name in ("hadamard", "cluster", "bc_groups", "gptq", "quantize_state"):
            check_bool("QuantScheme", name, getattr(self, name))
        if not isinstance(self.observer, str) or self.observer not in OBSERVERS:
            raise ValueError(f"QuantScheme: unknown observer {shown(self.observer)}; expected one of {OBSERVERS}")
        if not is_real(self.percentile_alpha) or not 0.0 < self.percentile_alpha <= 1.0:
            raise ValueError(f"QuantScheme: percentile_alpha must lie in (0, 1], got {shown(self.percentile_alpha)}")
        if not is_real(self.gptq_damp) or self.gptq_damp < 0.0:
            raise ValueError(f"QuantScheme: gptq_damp must be a finite number >= 0, got {shown(self.gptq_damp)}")

    @property
    def name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits == 8

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits < 16

    def check_model(self, config: MambaConfig | Mamba2Config) -> None:
        """Raise ValueError if this scheme cannot apply to `config`."""
        if not isinstance(config, (MambaConfig, Mamba2Config)):
            already = " (the model is already quantized)" if isinstance(config, QuantizedSSMConfig) else ""
            raise TypeError(
                f"Quamba quantization applies to float Mamba / Mamba-2 configs (MambaConfig, "
                f"Mamba2Config), not {type(config).__name__}{already}"
            )
        if isinstance(config, MambaConfig) and (self.cluster or self.bc_groups):
            raise ValueError(
                "Mamba-1 has no heads or state groups: use cluster=False, bc_groups=False "
                "(QuantScheme.quamba(...) gives Quamba's per-tensor recipe)"
            )
        if isinstance(config, Mamba2Config) and self.cluster:
            per_group = config.num_heads // config.n_groups
            if per_group < self.head_groups or config.head_dim < self.dim_groups:
                raise ValueError(
                    f"sort-and-cluster needs at least {self.head_groups} heads per SSD group and "
                    f"head_dim >= {self.dim_groups}; the model has {per_group} heads per group and "
                    f"head_dim {config.head_dim} (lower head_groups / dim_groups)"
                )

    @classmethod
    def quamba2(cls, bits: str = "W8A8", **overrides) -> QuantScheme:
        """Quamba2's full recipe for Mamba-2 at `bits` ("W8A8", "W4A8" or "W4A16")."""
        return cls(**_parse_bits(bits), **overrides)

    @classmethod
    def quamba(cls, bits: str = "W8A8", **overrides) -> QuantScheme:
        """Quamba's recipe for Mamba-1: per-tensor scales, percentile observer for x and the state,
        Hadamard rotations; no heads to cluster, no state groups."""
        options = {"cluster": False, "bc_groups": False, "observer": "percentile"}
        return cls(**_parse_bits(bits), **{**options, **overrides})

    @classmethod
    def naive(cls, bits: str = "W8A8", **overrides) -> QuantScheme:
        """The baseline: per-tensor min-max activation scales, round-to-nearest weights, no rotation."""
        options = {"hadamard": False, "cluster": False, "bc_groups": False, "gptq": False}
        return cls(**_parse_bits(bits), **{**options, **overrides})


def _parse_bits(bits: str) -> dict:
    text = str(bits).upper()
    if not (text.startswith("W") and "A" in text):
        raise ValueError(f"bits must look like 'W8A8', got {bits!r}")
    w, a = text[1:].split("A", 1)
    try:
        return {"weight_bits": int(w), "act_bits": int(a)}
    except ValueError:
        raise ValueError(f"bits must look like 'W8A8', got {bits!r}") from None


@dataclasses.dataclass(frozen=True)
class QuantizedSSMConfig:
    """A quantized Mamba / Mamba-2 model: the float model's config plus the scheme it was quantized with.

    Every other attribute (vocab size, EOS ids, ...) is the base config's, so `forward` / `generate`
    treat it like the float model. The lm_head is always untied (the final norm is folded into it).
    `simulated=True` runs the same scheme as fake quantization in float (the reference the integer path
    is tested against).
    """

    base: MambaConfig | Mamba2Config
    scheme: QuantScheme
    simulated: bool = False

    family = "quamba"
    tie_word_embeddings = False

    def __post_init__(self):
        self.scheme.check_model(self.base)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "scheme", "simulated"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (`ssm_llm.config_io.config_from_dict` inverts it)."""
        return {
            "family": self.family,
            "base": self.base.to_dict(),
            "scheme": dataclasses.asdict(self.scheme),
            "simulated": self.simulated,
        }
