"""Quamba2's sort-and-cluster of the Mamba-2 SSM input x, and the offline channel reordering it needs.

The SSM input x [.., Hh, P] (the conv output) has a few large channels whose positions barely change
between inputs. Quamba2 groups channels of similar range so each group gets its own 8-bit scale:
  1. inside each SSD group (the heads sharing one B/C group), heads are sorted by their largest channel
     statistic and split into `head_groups` clusters;
  2. inside each head, the P channels are sorted by their statistic; the sorted positions of a head
     cluster are split into `dim_groups` clusters.
Splits are optimal 1-D k-segmentations (least squares on log statistics, by dynamic programming), so
cluster sizes follow the data. The model is then permuted so every cluster is contiguous — heads move
only inside their SSD group, channels only inside their head, so the SSM is unchanged:
  in_proj columns of z and x (channel order) and of dt (head order), conv rows of x, dt_bias / A_log / D
  (heads), gated-norm weight and out_proj rows (channels).
The permuted model computes exactly the same logits (`tests/quant/test_quant_transforms.py`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ssm_llm.ssm_config import Mamba2Config


@dataclasses.dataclass(frozen=True)
class XClusters:
    """Per layer: `channel_perm [L, I]` (new channel i is old channel channel_perm[i]), `head_perm [L, Hh]`
    and `cluster [L, I]`, each (new-order) channel's cluster id in [0, n_clusters), ids laid out as
    (ssd group, head group, dim group)."""

    channel_perm: np.ndarray
    head_perm: np.ndarray
    cluster: np.ndarray
    n_clusters: int


def segment_1d(values: np.ndarray, k: int) -> np.ndarray:
    """Split sorted `values [n]` into k contiguous segments minimising the within-segment sum of squared
    deviations; returns each value's segment id [n] (non-decreasing, all k ids used when n >= k)."""
    n = len(values)
    k = min(k, n)
    v = np.asarray(values, np.float64)
    s1, s2 = np.concatenate([[0], np.cumsum(v)]), np.concatenate([[0], np.cumsum(v * v)])

    def cost(i, j):  # segment v[i:j]
        m = j - i
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m

    best = np.full((k + 1, n + 1), np.inf)
    split = np.zeros((k + 1, n + 1), np.int64)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            options = [best[c - 1, i] + cost(i, j) for i in range(c - 1, j)]
            i = int(np.argmin(options))
            best[c, j], split[c, j] = options[i], i + c - 1
    ids, j = np.zeros(n, np.int64), n
    for c in range(k, 0, -1):
        i = split[c, j]
        ids[i:j] = c - 1
        j = i
    return ids


def sort_and_cluster(stats: np.ndarray, config: Mamba2Config, head_groups: int = 4, dim_groups: int = 4) -> XClusters:
    """stats: [L, I] per-channel statistic of x (Quamba2: mean |x| over calibration tokens) -> XClusters."""
    stats = np.asarray(stats, np.float64)
    L, heads, P, G = stats.shape[0], config.num_heads, config.head_dim, config.n_groups
    if stats.shape != (L, heads * P):
        raise ValueError(f"sort_and_cluster: stats must be [L, {heads * P}], got {stats.shape}")
    per_group = heads // G
    log = np.log(np.maximum(stats, 1e-12)).reshape(L, heads, P)
    channel_perm = np.zeros((L, heads * P), np.int64)
    head_perm = np.zeros((L, heads), np.int64)
    cluster = np.zeros((L, heads * P), np.int64)
    for layer in range(L):
        dim_order = np.argsort(log[layer], axis=1, kind="stable")  # [Hh, P], per head
        sorted_dims = np.take_along_axis(log[layer], dim_order, axis=1)
        for g in range(G):
            members = np.arange(g * per_group, (g + 1) * per_group)
            order = members[np.argsort(sorted_dims[members, -1], kind="stable")]  # by largest channel
            head_ids = segment_1d(sorted_dims[order, -1], head_groups)
            for j, h in enumerate(order):
                slot = g * per_group + j
                head_perm[layer, slot] = h
                channel_perm[layer, slot * P : (slot + 1) * P] = h * P + dim_order[h]
            for hg in range(head_groups):
                group_heads = order[head_ids == hg]
                if not len(group_heads):
                    continue
                dim_ids = segment_1d(sorted_dims[group_heads].max(axis=0), dim_groups)
                for j in np.flatnonzero(head_ids == hg):
                    slot = g * per_group + j
                    cluster[layer, slot * P : (slot + 1) * P] = (g * head_groups + hg) * dim_groups + dim_ids
    return XClusters(channel_perm, head_perm, cluster, G * head_groups * dim_groups)


def _take(x, index, axis):
    """Per-layer gather: x [L, ...], index [L, n] along `axis` (>= 1)."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index.shape
    return jnp.take_along_axis(x, jnp.asarray(index).reshape(shape), axis=axis)


def permute_mamba2(params: dict, config: Mamba2Config, clusters: XClusters) -> dict:
    """Reorder a Mamba-2 model's channels and heads as `clusters` says (stacked layout); exact."""
    inner, conv_dim = config.intermediate_size, config.conv_dim
    layers = dict(params["layers"])
    perm, hperm = np.asarray(clusters.channel_perm), np.asarray(clusters.head_perm)
    L = perm.shape[0]
    rest = np.broadcast_to(np.arange(inner + inner, inner + conv_dim), (L, conv_dim - inner))
    columns = np.concatenate([perm, inner + perm, rest, inner + conv_dim + hperm], axis=1)
    layers["in_proj"] = _take(layers["in_proj"], columns, 2)
    if "in_proj_b" in layers:
        layers["in_proj_b"] = _take(layers["in_proj_b"], columns, 1)
    conv_rows = np.concatenate([perm, rest - inner], axis=1)
    layers["conv_w"] = _take(layers["conv_w"], conv_rows, 1)
    if "conv_b" in layers:
        layers["conv_b"] = _take(layers["conv_b"], conv_rows, 1)
    for name in ("dt_bias", "A_log", "D"):
        layers[name] = _take(layers[name], hperm, 1)
    layers["gated_norm"] = _take(layers["gated_norm"], perm, 1)
    layers["out_proj"] = _take(layers["out_proj"], perm, 1)
    return {**params, "layers": layers}
