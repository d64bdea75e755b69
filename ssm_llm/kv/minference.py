"""MInference: a long prompt's prefill attention on a sparse pattern per head, its indices estimated online.

Jiang et al., 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention". Each head has one of three patterns, found offline (`ssm_llm.kv.minference_search`):

- "a_shape": the first `columns` tokens (attention sinks) and the last `blocks` key blocks (local window);
- "vertical_slash": `columns` vertical lines (keys every query attends to) and slash lines (fixed distances
  query - key). The last `last_queries` queries of the prompt attend to every key; their softmax summed over
  the queries ranks the columns (the first 30 always kept, as in the paper's code), and summed along each
  diagonal ranks the distances. Slash lines are attended a block at a time, as the paper's kernel does: the
  `blocks` relative key-block offsets r (key block = query block - r) with the most diagonal mass
  (offsets within ((r - 1) * block, (r + 1) * block)), r = 0 and 1 always kept (the paper keeps the 100
  nearest diagonals);
- "block_sparse": queries and keys mean-pooled per block; each query block keeps the `blocks` key blocks of
  highest pooled score (its own block always).

Every head therefore attends to at most `blocks` key blocks plus `columns` key columns per query block, whatever
its pattern, and `pallas_kernels.block_sparse_attention` computes exactly that (with the causal mask, ragged
lengths and a sliding window). Prompts of at most `blocks` blocks run dense flash attention: every block fits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.flash_attention import flash_attention
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.config import ModelConfig
from ssm_llm.kv.policy import check_positive_int
from ssm_llm.sparse_prefill import SparsePrefill

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
# Columns every vertical-slash head keeps whatever the estimate (MInference's `vertical[..., :30] = inf`).
FIRST_COLUMNS = 30
NEG = jnp.finfo(jnp.float32).min
FITTED = Path(__file__).with_name("minference_patterns")  # patterns fitted offline for known models


@dataclasses.dataclass(frozen=True)
class MInference(SparsePrefill):
    """MInference sparse prefill: `GenerationConfig(sparse_prefill=MInference(...))`.

    patterns: one pattern name per query head per layer (`PATTERNS`), as fitted by
    `ssm_llm.kv.minference_search.fit_patterns` and loaded with `MInference.load`; None: every head
    "vertical_slash" (the paper's default). block: tokens per query / key block; blocks: key blocks per query
    block; columns: key columns per head (vertical lines, or the A-shape's sinks); last_queries: the queries
    that estimate the vertical-slash indices; dense_layers: layers that keep dense attention (like the
    paper's code's `starting_layer`: early layers attend broadly, see `fit_patterns(min_recall=...)`).
    """

    patterns: tuple[tuple[str, ...], ...] | None = None
    block: int = 64
    blocks: int = 8
    columns: int = 256
    last_queries: int = 64
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("block", "blocks", "last_queries"):
            check_positive_int("MInference", name, getattr(self, name))
        check_positive_int("MInference", "columns", self.columns, minimum=0)
        for layer in self.dense_layers:
            check_positive_int("MInference", "dense_layers entry", layer, minimum=0)
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        if self.patterns is not None:
            patterns = tuple(tuple(layer) for layer in self.patterns)
            unknown = sorted({p for layer in patterns for p in layer} - set(PATTERNS))
            if unknown:
                raise ValueError(f"MInference patterns: unknown pattern(s) {unknown}; expected one of {PATTERNS}")
            object.__setattr__(self, "patterns", patterns)

    def check(self, config: ModelConfig) -> None:
        if self.dense_layers and self.dense_layers[-1] >= config.num_layers:
            raise ValueError(
                f"MInference dense_layers {self.dense_layers} name a layer past the model's {config.num_layers}"
            )
        if self.patterns is None:
            return
        heads = sorted({len(layer) for layer in self.patterns})
        if (len(self.patterns), heads) != (config.num_layers, [config.num_heads]):
            raise ValueError(
                f"MInference patterns are given for {len(self.patterns)} layers x {'/'.join(map(str, heads))} "
                f"heads; this model has "
                f"{config.num_layers} layers x {config.num_heads} heads (fit them with "
                "ssm_llm.kv.minference_search.fit_patterns)"
            )

    def kinds(self, config: ModelConfig) -> jax.Array:
        """[L, H_q] int32: each head's pattern as its index in `PATTERNS`."""
        if self.patterns is None:
            return jnp.full((config.num_layers, config.num_heads), PATTERNS.index("vertical_slash"), jnp.int32)
        return jnp.asarray([[PATTERNS.index(p) for p in layer] for layer in self.patterns], jnp.int32)

    def used_patterns(self) -> tuple[str, ...]:
        """The patterns some head uses, in `PATTERNS` order."""
        if self.patterns is None:
            return ("vertical_slash",)
        return tuple(p for p in PATTERNS if any(p in layer for layer in self.patterns))

    def indices(self, config: ModelConfig, q, k, counts, layer) -> tuple[jax.Array, jax.Array]:
        """The estimated sparse pattern of one layer: (blocks [B, H, N, K] key-block ids per query block,
        columns [B, H, C] key positions), -1 where unused; q [B, T, H, D], k [B, T, H_kv, D] rotated."""
        kinds = self.kinds(config)[layer]  # [H]
        steps = q.shape[1]
        n_blocks = -(-steps // self.block)
        width = min(self.blocks, n_blocks)
        blocks = jnp.full((q.shape[0], q.shape[2], n_blocks, width), -1, jnp.int32)
        columns = jnp.full((q.shape[0], q.shape[2], min(self.columns, steps)), -1, jnp.int32)
        for name in self.used_patterns():
            here = (kinds == PATTERNS.index(name))[None, :, None]
            if name == "a_shape":
                b, c = a_shape_indices(q.shape[0], q.shape[2], steps, self.block, width, columns.shape[2])
            elif name == "vertical_slash":
                b, c = vertical_slash_indices(q, k, counts, self.block, width, columns.shape[2], self.last_queries)
            else:
                b, c = block_sparse_indices(q, k, counts, self.block, width), None
            blocks = jnp.where(here[..., None], b, blocks)
            if c is not None:
                columns = jnp.where(here, c, columns)
        return blocks, columns

    def attend(self, config: ModelConfig, q, k, v, step: AttentionStep, impl: str):
        def dense():
            return flash_attention(q, k, v, step.window, lengths=step.token_counts, impl=impl)

        def sparse():
            blocks, columns = self.indices(config, q, k, step.token_counts, step.layer)
            return block_sparse_attention(
                q, k, v, blocks, columns, step.token_counts, step.window, block=self.block, impl=impl
            )

        if -(-q.shape[1] // self.block) <= self.blocks:  # every key block fits the budget: dense is exact
            return dense()
        if not self.dense_layers:
            return sparse()
        if isinstance(step.layer, int):  # unrolled layers: a Python choice
            return dense() if step.layer in self.dense_layers else sparse()
        is_dense = jnp.isin(jnp.arange(config.num_layers), jnp.asarray(self.dense_layers))[step.layer]
        return jax.lax.cond(is_dense, dense, sparse)

    def save(self, path, **about) -> None:
        """Write the patterns and settings as JSON (with `about`: the model, the fitting text, recalls)."""
        Path(path).write_text(json.dumps({**about, **dataclasses.asdict(self)}, indent=1) + "\n")

    @classmethod
    def fitted(cls, model: str, **overrides) -> MInference:
        """The patterns shipped with ssm_llm for `model` (e.g. "SmolLM2-135M-Instruct", fitted by
        experiments/minference_patterns.py), with `overrides` applied (e.g. another budget)."""
        path = FITTED / f"{model}.json"
        if not path.exists():
            shipped = sorted(p.stem for p in FITTED.glob("*.json"))
            raise ValueError(
                f"no MInference patterns shipped for {model!r} (shipped: {shipped}); fit them with "
                "ssm_llm.kv.minference_search.fit_patterns and use MInference.load"
            )
        return cls.load(path, **overrides)

    @classmethod
    def load(cls, path, **overrides) -> MInference:
        """The `MInference` saved at `path` (its patterns and settings), with `overrides` applied."""
        saved = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        settings = {name: value for name, value in saved.items() if name in fields}
        if settings.get("patterns") is not None:
            settings["patterns"] = tuple(tuple(layer) for layer in settings["patterns"])
        settings["dense_layers"] = tuple(settings.get("dense_layers", ()))
        return cls(**{**settings, **overrides})


def a_shape_indices(batch: int, heads: int, steps: int, block: int, width: int, n_columns: int):
    """The A-shape pattern: the last `width` key blocks of each query block and the first `n_columns` keys."""
    n_blocks = -(-steps // block)
    ids = jnp.arange(n_blocks)[:, None] - jnp.arange(width)[None, :]
    ids = jnp.where(ids >= 0, ids, -1)
    blocks = jnp.broadcast_to(ids, (batch, heads, n_blocks, width)).astype(jnp.int32)
    return blocks, jnp.broadcast_to(jnp.arange(n_columns, dtype=jnp.int32), (batch, heads, n_columns))


def last_query_probs(q, k, counts, last: int):
    """Softmax attention [B, H, W, T] of each row's last W = min(last, T) real queries over every key (the
    rows before a short prompt's start are zero), and their positions [B, W] (-1 for those)."""
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    window = min(last, steps)
    pos = counts[:, None] - window + jnp.arange(window)[None, :]  # [B, W]
    ql = jnp.take_along_axis(q, jnp.maximum(pos, 0)[:, :, None, None], axis=1)  # [B, W, H, D]
    ql = ql.reshape(batch, window, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bwkgd,bskd->bkgws", ql, k, preferred_element_type=jnp.float32) * dim**-0.5
    scores = scores.reshape(batch, heads, window, steps)
    s = jnp.arange(steps)
    seen = (s[None, None, :] <= pos[:, :, None]) & (pos[:, :, None] >= 0)  # [B, W, T]
    scores = jnp.where(seen[:, None], scores, NEG)
    probs = jnp.where(seen[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
    return probs, jnp.where(pos >= 0, pos, -1)


def vertical_slash_indices(q, k, counts, block: int, width: int, n_columns: int, last: int):
    """The vertical-slash pattern estimated from the last `last` queries: (blocks [B, H, N, width], columns
    [B, H, n_columns]); see the module docstring."""
    steps = q.shape[1]
    n_blocks = -(-steps // block)
    probs, pos = last_query_probs(q, k, counts, last)
    vertical = jnp.sum(probs, axis=2)  # [B, H, T]
    s = jnp.arange(steps)
    vertical = jnp.where(s < FIRST_COLUMNS, jnp.inf, vertical)
    vertical = jnp.where(s[None, None] < counts[:, None, None], vertical, -jnp.inf)
    score, columns = jax.lax.top_k(vertical, n_columns)
    columns = jnp.where(score > -jnp.inf, columns, -1).astype(jnp.int32)
    # Diagonal mass at distance o = query - key: sum over the last queries of probs[w, pos[w] - o].
    offsets = pos[:, :, None] - s[None, None, :]  # [B, W, T] key of query w at distance s
    along = jnp.take_along_axis(probs, jnp.maximum(offsets, 0)[:, None], axis=-1)
    slash = jnp.sum(jnp.where((offsets >= 0)[:, None], along, 0.0), axis=2)  # [B, H, T] mass at distance o
    # Relative block r covers the distances in ((r - 1) * block, (r + 1) * block).
    total = jnp.concatenate([jnp.zeros_like(slash[..., :1]), jnp.cumsum(slash, axis=-1)], axis=-1)  # [B, H, T + 1]
    r = jnp.arange(n_blocks)
    hi = jnp.minimum((r + 1) * block, steps)  # distances lo <= o < hi
    lo = jnp.clip((r - 1) * block + 1, 0, steps)
    mass = total[..., hi] - total[..., lo]  # [B, H, N]
    mass = jnp.where(r < 2, jnp.inf, mass)
    _, offsets = jax.lax.top_k(mass, width)  # [B, H, width]
    ids = jnp.arange(n_blocks)[None, None, :, None] - offsets[:, :, None, :]
    return jnp.where(ids >= 0, ids, -1).astype(jnp.int32), columns


def block_sparse_indices(q, k, counts, block: int, width: int):
    """The block-sparse pattern: per query block the `width` key blocks of highest mean-pooled score, its own
    block always; [B, H, N, width]."""
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    n_blocks = -(-steps // block)
    real = (jnp.arange(n_blocks * block)[None, :] < counts[:, None]).astype(jnp.float32)  # [B, T_pad]

    def pooled(x):
        x = (
            jnp.pad(x, ((0, 0), (0, n_blocks * block - steps), (0, 0), (0, 0))).astype(jnp.float32)
            * real[..., None, None]
        )
        n = jnp.maximum(real.reshape(batch, n_blocks, block).sum(-1), 1.0)
        return x.reshape(batch, n_blocks, block, *x.shape[2:]).sum(2) / n[:, :, None, None]  # [B, N, H, D]

    pq = pooled(q).reshape(batch, n_blocks, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bikgd,bjkd->bkgij", pq, pooled(k)).reshape(batch, heads, n_blocks, n_blocks)
    i, j = jnp.arange(n_blocks)[:, None], jnp.arange(n_blocks)[None, :]
    scores = jnp.where(j == i, jnp.inf, scores)
    scores = jnp.where((j <= i)[None, None] & (j * block < counts[:, None, None, None]), scores, -jnp.inf)
    score, ids = jax.lax.top_k(scores, width)
    return jnp.where(score > -jnp.inf, ids, -1).astype(jnp.int32)
