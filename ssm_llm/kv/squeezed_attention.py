"""Squeezed Attention: the prompt's keys clustered offline, the clusters a query needs looked up by centroid.

Hooper et al., 2024, "Squeezed Attention: Accelerating Long Context Length LLM Inference". After the prompt
is prefilled with full attention, its keys (all but the last `local`, the "fixed context") are grouped per
kv head by k-means on their directions (`iterations` Lloyd steps of spherical k-means from evenly spaced
keys), each cluster represented by the mean of its keys. Each decode step estimates, per query head, the
attention mass of every cluster as its size times exp(q . centroid / sqrt(D)), normalised over clusters;
takes the max over the query heads of a kv head; and attends exactly to the `budget` fixed-context tokens of
the best clusters (whole clusters in order of their estimate, the last one cut), plus the last `local`
prompt tokens and every decoded token. The paper keeps the clusters above a calibrated threshold; a fixed
budget keeps the shapes static here.

Hierarchical lookup (`coarse`, `coarse_keep`; the paper's centroids of centroids, HiP's tree search over key
groups): the fixed context is first split into `coarse` k-means clusters, and each of them into
`clusters // coarse` clusters of its own members, a tree with a fixed branching. Each step scores the coarse
centroids the same way, keeps the `coarse_keep` coarse clusters of highest mass, and scores only their
children (softmax over them): coarse + coarse_keep * clusters / coarse centroid products instead of
`clusters`. The paper builds its coarse level bottom-up (k-means over the fine centroids) and keeps the
centroids above thresholds; a top-down tree with fixed branching keeps the shapes static here. With
`coarse_keep == coarse` the ranking is the flat lookup's over the same clusters.

The whole cache is kept (it saves attention work, not memory): `cache_bytes` is the full cache's plus the
centroids and each token's cluster. With a budget covering the fixed context it is full attention.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.cache_attention import masked_attention
from ssm_llm.compressed_cache import AttentionStep
from ssm_llm.kv.policy import KVPolicy, check_positive_int, group_mass, rope_frequencies
from ssm_llm.rope import rotate


@flax.struct.dataclass
class SqueezedCache:
    """k, v: [L, B, H_kv, S, D] every token (keys rotated); cluster: [L, B, H_kv, T] each fixed-context
    token's cluster (-1: not clustered); centroids: [L, B, H_kv, C, D] float32 the mean key of each cluster
    and sizes [L, B, H_kv, C] its members; prompt_lengths: [B]. With a hierarchy, coarse_centroids [L, B,
    H_kv, C1, D] and coarse_sizes [L, B, H_kv, C1] (cluster c's parent is c // (C / C1)); else None."""

    k: jax.Array
    v: jax.Array
    cluster: jax.Array
    centroids: jax.Array
    sizes: jax.Array
    prompt_lengths: jax.Array
    coarse_centroids: jax.Array | None = None
    coarse_sizes: jax.Array | None = None


def spherical_kmeans(keys, valid, clusters: int, iterations: int):
    """keys [N, D], valid [N] -> (cluster of each key [N] (-1 where not valid), mean key [C, D], sizes [C]):
    Lloyd steps on the keys' directions from evenly spaced valid keys."""
    unit = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-30)
    count = jnp.maximum(valid.sum(), 1)
    order = jnp.argsort(~valid, stable=True)  # the valid keys first, in position order
    centres = unit[order[(jnp.arange(clusters) * count) // clusters]]

    def assign(centres):
        return jnp.where(valid, jnp.argmax(unit @ centres.T, axis=-1), -1)

    def step(centres, _):
        members = jax.nn.one_hot(assign(centres), clusters, dtype=keys.dtype)  # [N, C]; -1 rows are zero
        total = members.T @ unit
        norm = jnp.linalg.norm(total, axis=-1, keepdims=True)
        return jnp.where(norm > 0, total / jnp.maximum(norm, 1e-30), centres), None

    centres, _ = jax.lax.scan(step, centres, None, length=iterations)
    cluster = assign(centres)
    members = jax.nn.one_hot(cluster, clusters, dtype=keys.dtype)
    sizes = members.sum(0)
    return cluster, (members.T @ keys) / jnp.maximum(sizes, 1)[:, None], sizes


def tree_kmeans(keys, valid, coarse: int, branch: int, iterations: int):
    """keys [N, D], valid [N] -> (fine cluster of each key [N] (-1: not valid), fine mean keys [coarse * branch,
    D] and sizes, coarse mean keys [coarse, D] and sizes): spherical k-means into `coarse` clusters, then
    each of them into `branch` clusters of its own members (fine cluster c * branch + j)."""
    parent, coarse_centroids, coarse_sizes = spherical_kmeans(keys, valid, coarse, iterations)
    split = lambda c: spherical_kmeans(keys, parent == c, branch, iterations)  # noqa: E731
    child, centroids, sizes = jax.vmap(split)(jnp.arange(coarse))  # [C1, N], [C1, b, D], [C1, b]
    own = jnp.take_along_axis(child, jnp.maximum(parent, 0)[None], axis=0)[0]
    cluster = jnp.where(parent >= 0, parent * branch + own, -1)
    return cluster, centroids.reshape(coarse * branch, -1), sizes.reshape(-1), coarse_centroids, coarse_sizes


@dataclasses.dataclass(frozen=True)
class SqueezedAttention(KVPolicy):
    """K-means clusters of the prompt's keys, looked up by centroid each step (see the module docstring).
    budget: fixed-context tokens attended per step; clusters: per kv head; local: the prompt's last tokens,
    always attended; iterations: k-means steps; coarse: clusters of the hierarchy's first level (None: flat;
    must divide `clusters`); coarse_keep: coarse clusters whose children are scored per step."""

    budget: int
    clusters: int
    local: int = 64
    iterations: int = 8
    coarse: int | None = None
    coarse_keep: int | None = None

    def __post_init__(self):
        for name in ("budget", "clusters", "iterations"):
            check_positive_int("SqueezedAttention", name, getattr(self, name))
        check_positive_int("SqueezedAttention", "local", self.local, minimum=0)
        if (self.coarse is None) != (self.coarse_keep is None):
            raise ValueError("SqueezedAttention: coarse and coarse_keep go together (a hierarchy needs both)")
        if self.coarse is not None:
            check_positive_int("SqueezedAttention", "coarse", self.coarse)
            check_positive_int("SqueezedAttention", "coarse_keep", self.coarse_keep)
            if self.clusters % self.coarse:
                raise ValueError(
                    f"SqueezedAttention: coarse ({self.coarse}) must divide clusters ({self.clusters}): each coarse"
                    " cluster splits into clusters // coarse"
                )
            if self.coarse_keep > self.coarse:
                raise ValueError(f"SqueezedAttention: coarse_keep ({self.coarse_keep}) exceeds coarse ({self.coarse})")

    def capacity(self, prompt_len: int, max_len: int) -> int:
        return max_len

    def compress(self, config, cache, observation, capacity):
        L, B, kv_heads, prompt_len, dim = cache.k.shape
        n = cache.lengths
        fixed = jnp.arange(prompt_len)[None, :] < (n - self.local)[:, None]  # [B, T]
        keys = cache.k.astype(jnp.float32)
        valid = jnp.broadcast_to(fixed[None, :, None], (L, B, kv_heads, prompt_len))
        if self.coarse is None:
            cluster_fn = lambda k, ok: spherical_kmeans(k, ok, self.clusters, self.iterations) + (None, None)  # noqa: E731
        else:
            branch = self.clusters // self.coarse
            cluster_fn = lambda k, ok: tree_kmeans(k, ok, self.coarse, branch, self.iterations)  # noqa: E731
        for _ in range(3):  # over kv heads, rows, layers
            cluster_fn = jax.vmap(cluster_fn)
        cluster, centroids, sizes, coarse_centroids, coarse_sizes = cluster_fn(keys, valid)
        pad = [(0, 0)] * 3 + [(0, capacity - prompt_len), (0, 0)]
        data = SqueezedCache(
            k=jnp.pad(cache.k, pad),
            v=jnp.pad(cache.v, pad),
            cluster=cluster.astype(jnp.int32),
            centroids=centroids,
            sizes=sizes,
            prompt_lengths=n,
            coarse_centroids=coarse_centroids,
            coarse_sizes=coarse_sizes,
        )
        return data, n

    def masses(self, data: SqueezedCache, index, grouped):
        """grouped [B, H_kv, G, D] scaled queries -> [B, H_kv, C] each cluster's estimated mass (flat), or, with
        a hierarchy, that of the kept coarse clusters' children among themselves and -1 elsewhere."""
        centroids, sizes = data.centroids[index], data.sizes[index]  # [B, H_kv, C, D], [B, H_kv, C]
        if self.coarse is None:
            return group_mass(grouped, centroids, sizes)
        batch, kv_heads, clusters, dim = centroids.shape
        branch = clusters // self.coarse
        coarse_mass = group_mass(grouped, data.coarse_centroids[index], data.coarse_sizes[index])
        _, kept = jax.lax.top_k(coarse_mass, self.coarse_keep)  # [B, H_kv, K]
        children = (kept[..., None] * branch + jnp.arange(branch)).reshape(batch, kv_heads, -1)  # [B, H_kv, K*b]
        child_centroids = jnp.take_along_axis(centroids, children[..., None], axis=2)
        child_mass = group_mass(grouped, child_centroids, jnp.take_along_axis(sizes, children, axis=2))
        rows, heads = jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None]
        return jnp.full((batch, kv_heads, clusters), -1.0).at[rows, heads, children].set(child_mass)

    def attend(self, config, data: SqueezedCache, step: AttentionStep, q, k, v, impl):
        index, positions, window = step.layer, step.positions, step.window
        if q.shape[1] != 1:
            raise ValueError(f"SqueezedAttention decodes one token per step, got {q.shape[1]}")
        inv_freq = rope_frequencies(config)
        batch, _, heads, dim = q.shape
        kv_heads, slots = data.k.shape[2], data.k.shape[3]
        prompt_len = data.cluster.shape[-1]
        p, rows = positions[:, 0], jnp.arange(batch)
        new_k = rotate(k[:, 0], p[:, None], inv_freq).astype(data.k.dtype)
        data = data.replace(
            k=data.k.at[index, rows, :, p].set(new_k), v=data.v.at[index, rows, :, p].set(v[:, 0].astype(data.v.dtype))
        )
        keys, values = data.k[index], data.v[index]
        q_rot = rotate(q, p[:, None, None], inv_freq)

        # Each cluster's estimated attention mass per query head, max over each kv head's query heads.
        grouped = q_rot[:, 0].reshape(batch, kv_heads, heads // kv_heads, dim).astype(jnp.float32) * dim**-0.5
        mass = self.masses(data, index, grouped)  # [B, H_kv, C]

        # The fixed context's tokens ranked by their cluster's mass (whole clusters first, ties by position).
        cluster = data.cluster[index]  # [B, H_kv, T]
        rank = jnp.where(cluster >= 0, jnp.take_along_axis(mass, jnp.maximum(cluster, 0), axis=2), -1.0)
        best, chosen = jax.lax.top_k(rank, min(self.budget, prompt_len))
        chosen = jnp.where(best >= 0, chosen, -1)  # [B, H_kv, N]

        tail = (data.prompt_lengths - self.local)[:, None] + jnp.arange(self.local + slots - prompt_len)
        tail = jnp.broadcast_to(tail[:, None], (batch, kv_heads, tail.shape[1]))
        pos = jnp.concatenate([chosen, jnp.where(tail >= 0, tail, -1)], axis=2)  # [B, H_kv, N + tail]
        gather = jnp.clip(pos, 0, slots - 1)[..., None]
        visible = (pos >= 0) & (pos <= p[:, None, None])
        visible &= jnp.where(window > 0, pos > (p - window)[:, None, None], True)
        out = masked_attention(
            q_rot,
            jnp.take_along_axis(keys, gather, axis=2),
            jnp.take_along_axis(values, gather, axis=2),
            visible[:, :, None, :],
        )
        return out, data
