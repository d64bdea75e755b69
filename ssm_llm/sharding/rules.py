"""The one table of sharding rules: the logical axes of every parameter and cache leaf, and the mesh axis
each logical axis is laid out on.

Attention models follow Megatron: q / k / v / gate / up column-parallel (their output features over
"model"), o / down row-parallel (their input features over "model"), the embedding and lm_head over the
vocabulary. Mamba shards its inner channels (Mamba-1) or heads (Mamba-2) and their states over "model";
the fused input projection (Mamba-1 [x | z], Mamba-2 [z | x B C | dt]) and Mamba-2's convolution over
x B C are replicated, because a contiguous split of a fused axis would not give each device whole heads.
Caches put the batch over "data" and their heads (or channels) over "model". Layer axes are never
sharded. XLA's SPMD partitioner adds the communication the layout implies.
"""

from __future__ import annotations

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None: replicated). A mesh without one of these axes replicates over it.
AXIS_RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,  # query heads x head_dim, split by whole heads
    "kv_heads": MODEL,
    "mlp": MODEL,
    "inner": MODEL,  # Mamba-1 inner channels; Mamba-2 inner (heads x head_dim) features
    "ssm_heads": MODEL,  # Mamba-2 heads
    "embed": None,
    "embed_rows": MODEL,  # the input rows of a fused projection (row-parallel)
    "fused": None,  # a fused projection's concatenated outputs
    "state": None,
    "seq": None,
    "conv": None,
    "rank": None,
}

# Per-layer logical axes (no layer axis: stacked layers get a leading None).
ATTENTION_LAYER = {
    "attn_norm": ("embed",),
    "mlp_norm": ("embed",),
    "wq": ("embed", "heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "wo": ("heads", "embed"),
    "bq": ("heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "bo": ("embed",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "b_gate": ("mlp",),
    "b_up": ("mlp",),
    "b_down": ("embed",),
}
MAMBA1_LAYER = {
    "norm": ("embed",),
    "in_proj": ("embed_rows", "fused"),
    "in_proj_b": ("fused",),
    "conv_w": ("inner", "conv"),
    "conv_b": ("inner",),
    "x_proj": ("inner", "fused"),
    "dt_proj": ("rank", "inner"),
    "dt_proj_b": ("inner",),
    "A_log": ("inner", "state"),
    "D": ("inner",),
    "out_proj": ("inner", "embed"),
    "out_proj_b": ("embed",),
}
MAMBA2_LAYER = {
    "norm": ("embed",),
    "in_proj": ("embed_rows", "fused"),
    "in_proj_b": ("fused",),
    "conv_w": ("fused", "conv"),
    "conv_b": ("fused",),
    "dt_bias": ("ssm_heads",),
    "A_log": ("ssm_heads",),
    "D": ("ssm_heads",),
    "gated_norm": ("inner",),
    "out_proj": ("inner", "embed"),
    "out_proj_b": ("embed",),
}
REPLICATED = "replicated"  # a rule for a whole subtree of small leaves, each kept whole on every device
GLOBAL = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "head_residual": ("embed", "vocab"),
    "final_norm": ("embed",),
}

# Cache leaves, with their layer axis.
KV_CACHE = {"k": (None, "batch", "kv_heads", "seq", None), "v": (None, "batch", "kv_heads", "seq", None)}
MAMBA1_CACHE = {"conv_state": (None, "batch", "inner", None), "ssm_state": (None, "batch", "inner", "state")}
MAMBA2_CACHE = {"conv_state": (None, "batch", "fused", None), "ssm_state": (None, "batch", "ssm_heads", None, "state")}
LENGTHS = ("batch",)
