"""Squeezed Attention: k-means clusters of the prompt's keys, looked up by centroid per step; against numpy,
through `generate`, and on SmolLM2."""

import jax.numpy as jnp
import numpy as np
import pytest
from kv_checks import passkey_answer
from test_kv_token_select import CONFIG, attend_step, numpy_rope, random_step

import ssm_llm
from ssm_llm.kv import SqueezedAttention, StreamingLLM
from ssm_llm.kv.squeezed_attention import spherical_kmeans, tree_kmeans


def test_kmeans_finds_separated_directions():
    """Keys around 4 well-separated directions (with lengths that vary) fall into 4 clusters of the right
    members; invalid keys get -1; each centroid is its members' mean key."""
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 4)))[0].T  # 4 orthonormal directions
    truth = rng.integers(0, 4, 60)
    keys = directions[truth] * rng.uniform(0.5, 3, (60, 1)) + 0.05 * rng.normal(size=(60, 16))
    valid = np.arange(60) < 50
    cluster, centroids, sizes = map(np.asarray, spherical_kmeans(jnp.asarray(keys), jnp.asarray(valid), 4, 8))
    assert (cluster[50:] == -1).all()
    pairs = {(t, c) for t, c in zip(truth[:50], cluster[:50], strict=True)}
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # one cluster per direction
    for c in range(4):
        np.testing.assert_allclose(centroids[c], keys[:50][cluster[:50] == c].mean(0), rtol=1e-4, atol=1e-5)
        assert sizes[c] == (cluster == c).sum()


def test_tree_kmeans_splits_each_coarse_cluster_among_its_members():
    """Fine cluster c * branch + j holds only members of coarse cluster c; both levels' centroids are their
    members' mean keys and the sizes add up; invalid keys get -1."""
    rng = np.random.default_rng(1)
    keys, valid = rng.normal(size=(90, 8)), np.arange(90) < 80
    cluster, centroids, sizes, coarse_centroids, coarse_sizes = map(
        np.asarray, tree_kmeans(jnp.asarray(keys), jnp.asarray(valid), 3, 4, 6)
    )
    assert (cluster[80:] == -1).all() and (cluster[:80] >= 0).all() and cluster.max() < 12
    parent, _, _ = map(np.asarray, spherical_kmeans(jnp.asarray(keys), jnp.asarray(valid), 3, 6))
    np.testing.assert_array_equal(cluster[:80] // 4, parent[:80])
    for c in range(3):
        members = parent[:80] == c
        np.testing.assert_allclose(coarse_centroids[c], keys[:80][members].mean(0), atol=1e-5)
        assert coarse_sizes[c] == members.sum() == sizes[4 * c : 4 * c + 4].sum()
    for f in np.unique(cluster[:80]):
        np.testing.assert_allclose(centroids[f], keys[:80][cluster[:80] == f].mean(0), atol=1e-5)


def numpy_mass(qr, group, centroids, sizes, dim):
    """The max over a kv head's query heads of softmax(log size + q . centroid / sqrt(D)) over clusters."""
    mass = np.zeros(len(sizes))
    for g in group:
        logits = np.where(sizes > 0, centroids @ qr[g] / np.sqrt(dim), -np.inf)
        e = sizes * np.exp(logits - logits.max())
        mass = np.maximum(mass, e / e.sum())
    return mass


@pytest.mark.parametrize(
    "window,hierarchy", [(0, None), (20, None), (0, dict(coarse=2, coarse_keep=1)), (20, dict(coarse=4, coarse_keep=2))]
)
def test_one_step_matches_numpy(window, hierarchy):
    """Per query head softmax of size x exp(q . centroid / sqrt(D)) over clusters, max over each kv head's
    query heads, the budget's best fixed-context tokens by their cluster's mass (ties by position), attended
    with the prompt's last `local` tokens and the new one (ragged rows, optional sliding window). With a
    hierarchy: the same over the coarse centroids, then over the kept coarse clusters' children only."""
    policy = SqueezedAttention(budget=7, clusters=4, local=3, **(hierarchy or {}))
    rng = np.random.default_rng(6)
    lengths, slots, H, Hkv, D = np.array([29, 17]), 32, 4, 2, 16
    cache, (q, k, v), (keys, values, inv_freq) = random_step(rng, lengths, slots)
    data, _ = policy.compress(CONFIG, cache, None, slots + 4)
    out, _ = attend_step(policy, data, q, k, v, lengths, window)
    cluster, centroids, sizes = (np.asarray(x[0]) for x in (data.cluster, data.centroids, data.sizes))
    if hierarchy:
        coarse_centroids, coarse_sizes = np.asarray(data.coarse_centroids[0]), np.asarray(data.coarse_sizes[0])
        branch = policy.clusters // policy.coarse
    for b, n in enumerate(lengths):
        p = n
        qr = numpy_rope(q[b, 0], np.full(H, p), inv_freq)
        new_k = numpy_rope(k[b, 0], np.full(Hkv, p), inv_freq)
        for kv in range(Hkv):
            fixed = n - policy.local
            assert (cluster[b, kv, :fixed] >= 0).all() and (cluster[b, kv, fixed:] == -1).all()
            for c in range(policy.clusters):
                members = cluster[b, kv] == c
                assert sizes[b, kv, c] == members.sum()
                if members.any():
                    np.testing.assert_allclose(centroids[b, kv, c], keys[b, kv, :slots][members].mean(0), atol=1e-5)
            group = (2 * kv, 2 * kv + 1)
            if hierarchy:
                coarse_mass = numpy_mass(qr, group, coarse_centroids[b, kv], coarse_sizes[b, kv], D)
                kept = np.argsort(-coarse_mass, kind="stable")[: policy.coarse_keep]
                children = (kept[:, None] * branch + np.arange(branch)).ravel()
                mass = np.full(policy.clusters, -1.0)
                mass[children] = numpy_mass(qr, group, centroids[b, kv, children], sizes[b, kv, children], D)
            else:
                mass = numpy_mass(qr, group, centroids[b, kv], sizes[b, kv], D)
            rank = mass[cluster[b, kv, :fixed]]
            chosen = np.argsort(-rank, kind="stable")[: policy.budget]
            chosen = chosen[rank[chosen] >= 0]
            pos = np.concatenate([chosen, np.arange(fixed, n)])
            kk = np.concatenate([keys[b, kv, pos], new_k[kv][None]])
            vv = np.concatenate([values[b, kv, pos], v[b, 0, kv][None]])
            pos = np.append(pos, p)
            seen = pos > p - window if window else np.ones(len(pos), bool)
            for h in (2 * kv, 2 * kv + 1):
                s = kk[seen] @ qr[h] / np.sqrt(D)
                e = np.exp(s - s.max())
                np.testing.assert_allclose(np.asarray(out[b, 0, h]), (e / e.sum()) @ vv[seen], atol=2e-5)


def test_a_budget_over_the_fixed_context_is_full_attention():
    from test_kv_token_select import PARAMS

    prompts = [np.random.default_rng(0).integers(0, 97, 40).tolist(), [7, 70, 4]]

    def run(policy):
        gen = ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=(), kv_compression=policy)
        return ssm_llm.generate(PARAMS, CONFIG, prompts, gen).tokens

    full = run(None)
    assert run(SqueezedAttention(budget=64, clusters=4, local=4)) == full
    assert run(SqueezedAttention(budget=64, clusters=4, local=4, coarse=2, coarse_keep=2)) == full
    assert run(SqueezedAttention(budget=2, clusters=4, local=2)) != full


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0, clusters=4), "budget"),
        (dict(budget=8, clusters=0), "clusters"),
        (dict(budget=8, clusters=4, local=-1), "local"),
        (dict(budget=8, clusters=4, iterations=0), "iterations"),
        (dict(budget=8, clusters=4, coarse=2), "go together"),
        (dict(budget=8, clusters=6, coarse=4, coarse_keep=2), "divide"),
        (dict(budget=8, clusters=4, coarse=2, coarse_keep=3), "exceeds"),
        (dict(budget=8, clusters=4, coarse=0, coarse_keep=0), "coarse"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SqueezedAttention(**kwargs)


def test_smollm2_retrieves_a_passkey_outside_the_window(smollm2):
    """A 419-token prompt with a passkey in the middle: 64 fixed-context tokens per step from 32 clusters per
    kv head (flat, or 4 in each of 8 coarse clusters, 4 of them looked into per step), beside the last 32
    prompt tokens, find the key; a sinks + window cache of the same size cannot. (Looking into 2 of 4 or 2
    of 8 coarse clusters misses it: a coarse centroid averages the passkey's keys away.)"""
    assert "71432" in passkey_answer(smollm2, SqueezedAttention(budget=64, clusters=32, local=32))
    tree = SqueezedAttention(budget=64, clusters=32, local=32, coarse=8, coarse_keep=4)
    assert "71432" in passkey_answer(smollm2, tree)
    assert "71432" not in passkey_answer(smollm2, StreamingLLM(budget=96, sinks=4, positions="original"))


def test_keeping_every_coarse_cluster_ranks_as_the_flat_lookup():
    """With coarse_keep == coarse the children of every coarse cluster are scored together: the same masses
    as a flat lookup over the tree's fine clusters, so the same output."""
    rng = np.random.default_rng(3)
    lengths, slots = np.array([30, 21]), 32
    cache, (q, k, v), _ = random_step(rng, lengths, slots)
    tree = SqueezedAttention(budget=9, clusters=6, local=3, coarse=3, coarse_keep=3)
    data, _ = tree.compress(CONFIG, cache, None, slots + 4)
    flat_data = data.replace(coarse_centroids=None, coarse_sizes=None)
    flat = SqueezedAttention(budget=9, clusters=6, local=3)
    out, _ = attend_step(tree, data, q, k, v, lengths, 0)
    expected, _ = attend_step(flat, flat_data, q, k, v, lengths, 0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
