"""ShadowKV: low-rank pre-RoPE keys, chunk landmarks and static outliers, sparse top-k chunks per step.

Sun et al., 2024, "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference". After
the prompt is prefilled with full attention:

  low-rank keys   the prompt's keys before RoPE, [T, H_kv * D] per sequence and layer, are kept as a rank-r
                  SVD (U [T, r] and S V^T [r, H_kv * D]); a selected key is rebuilt from them and rotated at
                  its position when it is needed; values are kept whole (with `offload_values`, in host
                  memory, as the paper does: see below);
  landmarks       the prompt (less its last `local_chunks` chunks and the remainder) is cut into chunks of
                  `chunk_size` tokens; each chunk's landmark, per kv head, is the mean of its rotated keys;
  outliers        per kv head, the `outlier_chunks` chunks whose keys are least like their landmark (lowest
                  minimum cosine similarity) are kept exact, with the local chunks and every decoded token;
  selection       each step, per query head, softmax(q . landmarks / sqrt(D)) over the other chunks, the max
                  over the query heads of a kv head, and the top `budget / chunk_size` chunks per kv head
                  are rebuilt and attended, with the exact keys above.
With `budget` covering every chunk and `rank=None` (exact keys instead of the SVD) ShadowKV is full attention.

Value offload (`offload_values=True`): the value cache lives in the platform's `pinned_host` memory (JAX
memory kinds): each step writes the new token's values and gathers the attended ones on the host
(`compute_on("device_host")`), and only the gathered values [B, H_kv, E + N, D] move to the accelerator.
On a CPU both memories are the same RAM (the code path is the same, and its outputs equal the on-device
cache's); on a GPU it frees the values' device memory at the cost of one small transfer per layer and step.
`cache_bytes` counts what is stored: U and S V^T (or the exact pre-RoPE keys), landmarks, the exact keys
(outliers, local, decoded), and every value.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from pallas_kernels.cache_attention import masked_attention
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, group_mass, rope_frequencies
from ssm_llm.rope import rotate


@flax.struct.dataclass
class ShadowKVCache:
    """u: [L, B, T, r] and sv: [L, B, r, H_kv * D] the prompt's pre-RoPE keys (rank r); landmarks: [L, B, H_kv,
    C, D] each chunk's mean rotated key, with `eligible` [L, B, H_kv, C] (a real chunk, not an outlier);
    exact_k: [L, B, H_kv, E, D] rotated keys kept exact at positions exact_pos [L, B, H_kv, E] (-1: empty):
    outlier chunks, the prompt's local tail, then decoded tokens; v: [L, B, H_kv, S, D] every value;
    prompt_lengths: [B]."""

    u: jax.Array
    sv: jax.Array
    landmarks: jax.Array
    eligible: jax.Array
    exact_k: jax.Array
    exact_pos: jax.Array
    v: jax.Array
    prompt_lengths: jax.Array


_WRITE = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1, 2), inserted_window_dims=(0, 1, 3), scatter_dims_to_operand_dims=(0, 1, 3)
)


def write_and_gather(values, where, new, gather):
    """values [L, B, H_kv, S, D]: write new [B, H_kv, D] at where [B, 3] = (layer, row, position) (out of
    range: dropped) and return (values, values[layer] gathered at gather [B, H_kv, N] (clipped) -> [B, H_kv,
    N, D]). Written with no constant index arrays, so it runs on the host as it is (`compute_on`)."""
    values = jax.lax.scatter(values, where, new, _WRITE, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
    layer = jax.lax.dynamic_index_in_dim(values, where[0, 0], keepdims=False)
    return values, jnp.take_along_axis(layer, gather[..., None], axis=2, mode="clip")


write_and_gather_on_host = compute_on("device_host")(jax.jit(write_and_gather))


def has_host_memory() -> bool:
    """Whether the default device can address `pinned_host` memory (JAX memory kinds)."""
    return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())


@dataclasses.dataclass(frozen=True)
class ShadowKV(KVPolicy):
    """Low-rank keys, chunk landmarks, static outlier chunks and a per-step sparse budget (see the module
    docstring). budget: tokens of rebuilt chunks attended per step (a multiple of chunk_size); chunk_size
    (paper: 8); rank: of the pre-RoPE key SVD (paper: 160 of 1024; None: exact keys); local_chunks: the
    prompt's last chunks kept exact (4); outlier_chunks: per kv head (paper: 48); offload_values: keep the
    values in `pinned_host` memory and gather the attended ones per step."""

    budget: int
    chunk_size: int = 8
    rank: int | None = 160
    local_chunks: int = 4
    outlier_chunks: int = 48
    offload_values: bool = False

    def __post_init__(self):
        check_positive_int("ShadowKV", "budget", self.budget)
        check_positive_int("ShadowKV", "chunk_size", self.chunk_size)
        if self.rank is not None:
            check_positive_int("ShadowKV", "rank", self.rank)
        check_positive_int("ShadowKV", "local_chunks", self.local_chunks, minimum=0)
        check_positive_int("ShadowKV", "outlier_chunks", self.outlier_chunks, minimum=0)
        if self.budget % self.chunk_size:
            raise ValueError(f"ShadowKV: budget ({self.budget}) must be a multiple of chunk_size ({self.chunk_size})")

    def check(self, config, prompt_lengths):
        width = config.num_kv_heads * config.head_dim
        if self.rank is not None and self.rank > width:
            raise ValueError(f"ShadowKV: rank ({self.rank}) exceeds the keys' width H_kv * D = {width}")
        if self.offload_values and not has_host_memory():
            raise ValueError(
                f"ShadowKV: offload_values needs pinned_host memory, which {jax.devices()[0].platform} devices here"
                " do not address; use offload_values=False"
            )

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def work_bytes(self, config, batch: int, prompt_len: int, max_len: int) -> int:
        """The pre-RoPE keys of every layer and their SVD factors (float32), while `compress` runs."""
        width = config.num_kv_heads * config.head_dim
        return 3 * config.num_layers * batch * prompt_len * width * 4

    def exact_slots(self, prompt_len: int, capacity: int) -> int:
        """Exact keys per kv head: outlier chunks, the local tail (< local_chunks + 1 chunks), decoded tokens."""
        return (self.outlier_chunks + self.local_chunks + 1) * self.chunk_size + capacity - prompt_len

    def compress(self, config, cache, observation, capacity):
        L, B, kv_heads, prompt_len, dim = cache.k.shape
        cs, inv_freq = self.chunk_size, rope_frequencies(config)
        n = cache.lengths
        positions = jnp.arange(prompt_len)
        chunks = prompt_len // cs  # static; row b has max(n_b // cs - local_chunks, 0) real ones
        real = jnp.arange(chunks)[None, :] < (n // cs - self.local_chunks)[:, None]  # [B, C]
        k_chunks = cache.k[:, :, :, : chunks * cs].reshape(L, B, kv_heads, chunks, cs, dim).astype(jnp.float32)
        landmarks = k_chunks.mean(4)
        cos = jnp.sum(k_chunks * landmarks[..., None, :], -1) / jnp.maximum(
            jnp.linalg.norm(k_chunks, axis=-1) * jnp.linalg.norm(landmarks, axis=-1)[..., None], 1e-30
        )
        least = jnp.where(real[None, :, None], cos.min(-1), jnp.inf)  # [L, B, H_kv, C]
        outliers = min(self.outlier_chunks, chunks)
        worst, picked = jax.lax.top_k(-least, outliers)
        picked = jnp.where(jnp.isfinite(worst), picked, -1)  # [L, B, H_kv, O]
        is_outlier = (jnp.arange(chunks)[None, None, None, :, None] == picked[..., None, :]).any(-1)
        eligible = real[None, :, None] & ~is_outlier

        # Exact keys: outlier chunks, then the prompt's local tail, then room for decoded tokens.
        exact = self.exact_slots(prompt_len, capacity)
        outlier_pos = jnp.where(picked[..., None] >= 0, picked[..., None] * cs + jnp.arange(cs), -1).reshape(
            L, B, kv_heads, -1
        )
        tail_start = jnp.maximum(n // cs - self.local_chunks, 0) * cs  # [B]
        tail_pos = tail_start[:, None] + jnp.arange((self.local_chunks + 1) * cs)
        tail_pos = jnp.where(tail_pos < n[:, None], tail_pos, -1)
        tail_pos = jnp.broadcast_to(tail_pos[None, :, None], (L, B, kv_heads, tail_pos.shape[1]))
        exact_pos = jnp.concatenate([outlier_pos, tail_pos], -1)
        exact_pos = jnp.pad(exact_pos, [(0, 0)] * 3 + [(0, exact - exact_pos.shape[-1])], constant_values=-1)
        exact_k = jnp.take_along_axis(cache.k, jnp.maximum(exact_pos, 0)[..., None], axis=3)

        pre_rope = rotate(cache.k, -positions, inv_freq)  # [L, B, H_kv, T, D]
        pre_rope = jnp.where((positions[None, :] < n[:, None])[None, :, None, :, None], pre_rope, 0.0)
        flat = pre_rope.transpose(0, 1, 3, 2, 4).reshape(L, B, prompt_len, kv_heads * dim).astype(jnp.float32)
        if self.rank is None:
            u, sv = flat, jnp.broadcast_to(jnp.eye(kv_heads * dim), (L, B, kv_heads * dim, kv_heads * dim))
        else:
            rank = min(self.rank, prompt_len)
            left, s, right = jnp.linalg.svd(flat, full_matrices=False)
            u, sv = left[..., :rank], s[..., :rank, None] * right[..., :rank, :]
        pad = [(0, 0)] * 3 + [(0, capacity - prompt_len), (0, 0)]
        values = jnp.pad(cache.v, pad)
        if self.offload_values:
            values = jax.device_put(values, jax.memory.Space.Host)
        data = ShadowKVCache(
            u=u,
            sv=sv,
            landmarks=landmarks.astype(cache.k.dtype),
            eligible=eligible,
            exact_k=exact_k,
            exact_pos=exact_pos,
            v=values,
            prompt_lengths=n,
        )
        return data, n

    def attend(self, config, data: ShadowKVCache, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        if q.shape[1] != 1:
            raise ValueError(f"ShadowKV decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        batch, _, heads, dim = q.shape
        kv_heads = k.shape[2]
        cs = self.chunk_size
        p, rows = positions[:, 0], jnp.arange(batch)
        new_k = rotate(k[:, 0], p[:, None], inv_freq).astype(data.exact_k.dtype)  # [B, H_kv, D]
        slot = (self.outlier_chunks + self.local_chunks + 1) * cs + p - data.prompt_lengths  # decoded token's slot
        exact_k = data.exact_k.at[index, rows, :, slot].set(new_k, mode="drop")
        exact_pos = data.exact_pos.at[index, rows, :, slot].set(p[:, None], mode="drop")
        data = data.replace(exact_k=exact_k, exact_pos=exact_pos)
        q_rot = rotate(q, p[:, None, None], inv_freq)[:, 0]  # [B, H_q, D]

        # Chunk selection per kv head: softmax over its landmarks per query head, max over the group.
        landmarks, eligible = data.landmarks[index].astype(jnp.float32), data.eligible[index]
        grouped = q_rot.reshape(batch, kv_heads, heads // kv_heads, dim).astype(jnp.float32) * dim**-0.5
        score = jnp.where(eligible, jnp.nan_to_num(group_mass(grouped, landmarks, eligible)), -1.0)  # [B, H_kv, C]
        best, top = jax.lax.top_k(score, min(self.budget // cs, score.shape[-1]))
        chunk_pos = jnp.where(best[..., None] >= 0, top[..., None] * cs + jnp.arange(cs), -1).reshape(
            batch, kv_heads, -1
        )  # [B, H_kv, N]

        # Rebuild the chosen keys from the low-rank factors and rotate them at their positions.
        u, sv = data.u[index], data.sv[index]  # [B, T, r], [B, r, H_kv * D]
        rows_u = jnp.take_along_axis(u[:, None], jnp.maximum(chunk_pos, 0)[..., None], axis=2)  # [B, H_kv, N, r]
        sv_heads = sv.reshape(batch, sv.shape[1], kv_heads, dim).transpose(0, 2, 1, 3)  # [B, H_kv, r, D]
        rebuilt = rotate(jnp.einsum("bknr,bkrd->bknd", rows_u, sv_heads), jnp.maximum(chunk_pos, 0), inv_freq)

        keys = jnp.concatenate([data.exact_k[index].astype(jnp.float32), rebuilt], axis=2)
        pos = jnp.concatenate([data.exact_pos[index], chunk_pos], axis=2)  # [B, H_kv, E + N]
        where = jnp.stack([jnp.full_like(rows, index), rows, p], axis=1)  # [B, 3]: (layer, row, position)
        step_args = (where, v[:, 0].astype(data.v.dtype), jnp.maximum(pos, 0))
        if self.offload_values:
            values, vals = write_and_gather_on_host(data.v, *jax.device_put(step_args, jax.memory.Space.Host))
            vals = jax.device_put(vals, jax.memory.Space.Device)
        else:
            values, vals = write_and_gather(data.v, *step_args)
        data = data.replace(v=values)
        visible = (pos >= 0) & (pos <= p[:, None, None])
        visible &= jnp.where(window > 0, pos > (p - window)[:, None, None], True)
        out = masked_attention(q_rot[:, None].astype(q.dtype), keys.astype(q.dtype), vals, visible[:, :, None, :])
        return out, data
