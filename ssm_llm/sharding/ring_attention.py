"""RingAttention (Liu et al., 2023): causal attention over a sequence split across the devices of one mesh
axis. Each device keeps its block of queries; the key / value blocks travel around the ring
(`lax.ppermute`), one hop per step, and each device folds every block it receives into an online softmax,
so no device ever holds more than two key / value blocks and the result is exact.

With `zigzag=True` (load-balanced causal ordering, as in striped / zigzag ring attention) the sequence is
cut into 2n chunks and device i holds chunks i and 2n-1-i: under the causal mask every device then has
the same amount of work, where the contiguous split leaves the last device with n times the first's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssm_llm.sharding.place import auto_mesh, check_axes

NEG_INF = -jnp.inf


def zigzag_order(steps: int, devices: int) -> np.ndarray:
    """The permutation of `steps` positions that gives device i chunks i and 2n-1-i (of 2n equal chunks)."""
    if steps % (2 * devices):
        raise ValueError(f"zigzag ring attention splits the sequence into {2 * devices} equal chunks; {steps} does not")
    chunks = np.arange(steps).reshape(2 * devices, steps // (2 * devices))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)])


def _fold(carry, q, k, v, q_pos, k_pos, lengths, window, scale):
    """Fold one key / value block into the running (max, sum, output) of the online softmax.
    q: [B, t, Hkv, G, D]; k, v: [B, s, Hkv, D]; q_pos [t], k_pos [s] global positions; lengths [B];
    window: a scalar (0: none; else query t sees keys s > t - window)."""
    m, total, acc = carry  # [B, Hkv, G, t], [B, Hkv, G, t], [B, Hkv, G, t, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    causal = (k_pos[None, :] <= q_pos[:, None]) & ((window <= 0) | (k_pos[None, :] > q_pos[:, None] - window))
    visible = causal[None] & (k_pos[None, None, :] < lengths[:, None, None])  # [B, t, s]
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    m_new = jnp.maximum(m, scores.max(-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet stay at zero
    weights = jnp.exp(scores - safe[..., None])
    correction = jnp.exp(m - safe)
    total_new = total * correction + weights.sum(-1)
    acc_new = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", weights, v.astype(jnp.float32))
    return m_new, total_new, acc_new


def _ring_block(q, k, v, q_pos, k_pos, lengths, window, *, axis: str, devices: int, scale: float):
    """One device's part: its queries against every key / value block as the blocks go round the ring."""
    batch, steps, heads, dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    shape = (batch, kv_heads, heads // kv_heads, steps)
    carry = (
        jnp.full(shape, NEG_INF, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, dim), jnp.float32),
    )
    ring = [(i, (i + 1) % devices) for i in range(devices)]
    for hop in range(devices):
        carry = _fold(carry, qg, k, v, q_pos, k_pos, lengths, window, scale)
        if hop + 1 < devices:  # pass this block on and receive the previous device's
            k, v, k_pos = (jax.lax.ppermute(x, axis, ring) for x in (k, v, k_pos))
    _, total, acc = carry
    out = jnp.where(total[..., None] > 0, acc / jnp.where(total > 0, total, 1.0)[..., None], 0.0)  # [B,Hkv,G,t,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, heads, dim).astype(q.dtype)


def ring_attention(
    q,
    k,
    v,
    mesh,
    *,
    axis: str = "seq",
    head_axis: str | None = None,
    batch_axis: str | None = None,
    lengths=None,
    window=0,
    zigzag: bool = True,
    scale=None,
):
    """Causal attention of q: [B, T, H, D] over k, v: [B, T, H_kv, D] (GQA: H a multiple of H_kv), the
    sequence split over `mesh`'s axis `axis`; `lengths` [B] masks keys at positions >= lengths[b] (right
    padding; None: T); `window` > 0 limits query t to keys s > t - window (sliding window; may be traced).
    The same result as `pallas_kernels.flash_attention_ref(q, k, v, window, lengths=lengths)` (rows
    t >= lengths[b] see only the real keys; a row that sees none is zero). T is padded inside to n equal
    blocks (2n with `zigzag`) for the n devices of the axis. `head_axis`: a second mesh axis the heads are
    split over (tensor parallelism; it must divide H_kv); `batch_axis`: a third the batch is split over."""
    check_axes(mesh, axis=axis)
    devices = mesh.shape[axis]
    batch, steps, heads, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, steps) or heads % k.shape[2] or k.shape[3] != dim:
        raise ValueError(f"q {q.shape} and k, v {k.shape}, {v.shape}: expected [B, T, H, D] and [B, T, H_kv, D]")
    sizes = {"head_axis": (k.shape[2], "kv heads"), "batch_axis": (batch, "sequences")}
    check_axes(mesh, sizes, head_axis=head_axis, batch_axis=batch_axis)
    scale = dim**-0.5 if scale is None else scale
    lengths = jnp.full((batch,), steps, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    blocks = 2 * devices if zigzag else devices
    padded = -(-steps // blocks) * blocks  # padded keys sit at positions >= lengths: never seen
    if padded != steps:
        q, k, v = (jnp.pad(x, ((0, 0), (0, padded - steps), (0, 0), (0, 0))) for x in (q, k, v))
    order = zigzag_order(padded, devices) if zigzag else np.arange(padded)
    positions = jnp.asarray(order, jnp.int32)
    q, k, v = (x[:, order] for x in (q, k, v)) if zigzag else (q, k, v)
    seq = P(batch_axis, axis, head_axis)
    block = functools.partial(_ring_block, axis=axis, devices=devices, scale=scale)
    out = jax.shard_map(
        block,
        mesh=auto_mesh(mesh),
        in_specs=(seq, seq, seq, P(axis), P(axis), P(batch_axis), P()),
        out_specs=seq,
        check_vma=False,
    )(q, k, v, positions, positions, lengths, jnp.asarray(window, jnp.int32))
    out = out[:, np.argsort(order)] if zigzag else out
    return out[:, :steps]
