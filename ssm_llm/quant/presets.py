"""Named recipes of `quantize_weights` for attention models: the names `converters.load(quantize=...)` and the
CLI's `--quantize` take, each a scheme and its options."""

from __future__ import annotations

PRESETS: dict[str, tuple[str, dict]] = {
    "w8a8": ("w8a8", {}),
    "w8a8-rot": ("w8a8", {"rotation": True}),
    "w8a8-rot-emb": ("w8a8", {"rotation": True, "embedding": True, "head_residual": True}),
    "w8a16": ("w8a16", {}),
    "w4a16": ("w4a16", {}),
}
# What quantize="auto" picks where int8 products pay (`ssm_llm.int8_choice`): on SmolLM2-135M the rotated W8A8
# model with the int8 embedding is within 0.5% of float32's perplexity (plain W8A8: +2.9%), 0.25x its bytes, and
# decodes 1.8-2.1x faster than the float32 default on the VNNI EPYC (experiments/results/quantization_eval_emb.json,
# bench_decode_w8a8_vnni.json). The head residual (0.28x the bytes) takes its greedy agreement with float32 from
# 0.63 to 0.89 (quantization_eval_head_residual.json).
AUTO_PRESET = "w8a8-rot-emb"


def preset(name: str) -> tuple[str, dict]:
    """The (scheme, options) of a preset name; ValueError naming the choices for another."""
    if name not in PRESETS:
        raise ValueError(f"quantize must be None, 'auto' or one of {', '.join(PRESETS)}, got {name!r}")
    scheme, options = PRESETS[name]
    return scheme, dict(options)


def preset_of(config) -> str | None:
    """The preset name a quantized attention config was made with (None: float, or no preset matches). The head
    residual is not told apart: a rotated int8-embedding model saved before `w8a8-rot-emb` added it still names
    that preset (and a checkpoint of it loads as it is)."""
    for name, (scheme, options) in PRESETS.items():
        if config.quantization == scheme and all(
            getattr(config, field) == bool(options.get(option))
            for option, field in (("rotation", "activation_rotation"), ("embedding", "int8_embedding"))
        ):
            return name
    return None
