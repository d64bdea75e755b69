"""Sequence-parallel Mamba-2 SSD: a long sequence split over the devices of one mesh axis.

Each device scans its own block from a zero state (`ssd_chunked_ref`, the same chunked algorithm), which
gives its block's outputs, the state its block alone leaves behind, and the block's total decay per head.
The states are then passed along the devices: an all-gather of those per-block states and decays (small:
one [H, P, N] state per device) lets every device compute the state entering its block, which adds
`exp(cumsum(dt A)) C . state_in` to its outputs - the inter-chunk step of the SSD algorithm, applied
across devices instead of across chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.ssd import ssd_chunked_ref
from pallas_kernels.ssd.reference import check_chunk_size, check_inputs
from ssm_llm.sharding.place import auto_mesh, check_axes


def _block(x, dt, A, B, C, D, state, *, axis: str, devices: int, chunk_size: int):
    """One device's block: x [b, t, H, P], dt [b, t, H], B, C [b, t, G, N]; state [b, H, P, N] before the
    whole sequence. Returns (y [b, t, H, P] float32, the final state of the whole sequence)."""
    y, local_end = ssd_chunked_ref(x, dt, A, B, C, D, None, chunk_size)  # from a zero state
    a_cum = jnp.cumsum(dt.astype(jnp.float32) * A.astype(jnp.float32), axis=1)  # [b, t, H]
    decay = jnp.exp(a_cum[:, -1])  # the block's total decay per head [b, H]
    ends = jax.lax.all_gather(local_end, axis)  # [n, b, H, P, N]
    decays = jax.lax.all_gather(decay, axis)  # [n, b, H]
    me = jax.lax.axis_index(axis)
    incoming = state.astype(jnp.float32)
    final = incoming
    for j in range(devices):  # the state entering block j+1 is block j's end plus the decayed state entering j
        final = final * decays[j][..., None, None] + ends[j]
        incoming = jnp.where(j < me, final, incoming)
    groups = B.shape[2]
    rep = x.shape[2] // groups
    C_h = jnp.repeat(C.astype(jnp.float32), rep, axis=2)  # [b, t, H, N]
    y = y.astype(jnp.float32) + jnp.einsum("bthn,bhpn->bthp", C_h, incoming) * jnp.exp(a_cum)[..., None]
    return y.astype(x.dtype), final


def ssd_sequence_parallel(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    state=None,
    *,
    mesh,
    axis: str = "seq",
    head_axis: str | None = None,
    batch_axis: str | None = None,
    chunk_size: int = 256,
):
    """`pallas_kernels.ssd.ssd_chunked_ref`'s contract (x: [Bt, T, H, P]; dt: [Bt, T, H]; A: [H]; B, C:
    [Bt, T, G, N]; D: [H] or None; state: [Bt, H, P, N] or None) with the sequence split over `mesh`'s axis
    `axis`: returns `(y [Bt, T, H, P], final state [Bt, H, P, N] float32)`. T is padded inside to equal
    blocks for the axis's devices (padded steps get dt = 0, which leaves the state as it is). `head_axis`: a
    mesh axis the heads and groups are split over (it must divide G); `batch_axis`: one the batch is split
    over."""
    check_inputs(x, dt, A, B, C, D, state)
    check_chunk_size(chunk_size)
    check_axes(mesh, axis=axis)
    devices = mesh.shape[axis]
    batch, steps, heads, head_dim = x.shape
    sizes = {"head_axis": (B.shape[2], "groups"), "batch_axis": (batch, "sequences")}
    check_axes(mesh, sizes, head_axis=head_axis, batch_axis=batch_axis)
    pad = -steps % devices
    if pad:
        x, dt, B, C = (jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in (x, dt, B, C))
    state = jnp.zeros((batch, heads, head_dim, B.shape[3]), jnp.float32) if state is None else state
    D = jnp.zeros((heads,), jnp.float32) if D is None else D
    seq, heads_only, states = P(batch_axis, axis, head_axis), P(head_axis), P(batch_axis, head_axis)
    block = functools.partial(_block, axis=axis, devices=devices, chunk_size=chunk_size)
    y, final = jax.shard_map(
        block,
        mesh=auto_mesh(mesh),
        in_specs=(seq, seq, heads_only, seq, seq, heads_only, states),
        out_specs=(seq, states),
        check_vma=False,
    )(x, dt, A, B, C, D, state)
    return y[:, :steps], final
