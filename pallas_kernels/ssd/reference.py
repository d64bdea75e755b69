"""Mamba-2 SSD references: the chunked scan in its "segsum" formulation, and the single decode step;
with the shape checks that the kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(x, dt, A, B, C, D, state):
    """The contract's shapes (see `ssd_chunked_ref`); a ValueError naming the first bad one."""
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if groups == 0 or heads % groups:
        raise ValueError(f"ssd: heads ({heads}) must be a multiple of the B/C groups ({groups})")
    expected = {
        "dt": (dt.shape, (batch, steps, heads)),
        "A": (A.shape, (heads,)),
        "B": (B.shape, (batch, steps, groups, n)),
        "C": (C.shape, (batch, steps, groups, n)),
    }
    if D is not None:
        expected["D"] = (D.shape, (heads,))
    if state is not None:
        expected["state"] = (state.shape, (batch, heads, head_dim, n))
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"ssd: {name} must have shape {want}, got {tuple(got)}")


def check_step_inputs(state, x, dt, A, B, C, D):
    """`check_inputs` for one decode step (see `ssd_step_ref`)."""
    check_inputs(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state)


def check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")


def segsum(a):
    """`a: [..., L]` -> `[..., L, L]` with out[l, s] = sum(a[s+1..l]) for s <= l, -inf above the diagonal.

    Summed directly (masked cumulative sum), not as a difference of prefix sums, for precision.
    """
    length = a.shape[-1]
    idx = jnp.arange(length)
    terms = jnp.where(idx[:, None] > idx[None, :], a[..., :, None], 0.0)  # [..., k, s]: a[k] for k > s
    sums = jnp.cumsum(terms, axis=-2)  # [..., l, s]
    return jnp.where(idx[:, None] >= idx[None, :], sums, -jnp.inf)


def ssd_chunked_ref(x, dt, A, B, C, D=None, state=None, chunk_size: int = 256):
    """x: [Bt, T, H, P]; dt: [Bt, T, H]; A: [H]; B, C: [Bt, T, G, N]; D: [H] or None;
    state: [Bt, H, P, N] before x (None: zeros). Returns `(y [Bt, T, H, P] in x's dtype, final state
    [Bt, H, P, N] float32)`. Computed in float32.
    """
    check_inputs(x, dt, A, B, C, D, state)
    check_chunk_size(chunk_size)
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    pad = -steps % chunk_size

    def chunked(a):  # [Bt, T, ...] -> float32, zero-padded, [c, Bt, L, ...] (chunks leading, for the scan)
        a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(batch, -1, chunk_size, *a.shape[2:]), 1, 0)

    xs = chunked(x).reshape(-1, batch, chunk_size, groups, rep, head_dim)  # [c, b, l, g, r, p]
    dts = chunked(dt).reshape(-1, batch, chunk_size, groups, rep)  # [c, b, l, g, r]
    A_gr = A.astype(jnp.float32).reshape(groups, rep)
    h0 = (jnp.zeros((batch, heads, head_dim, n), jnp.float32) if state is None else state.astype(jnp.float32)).reshape(
        batch, groups, rep, head_dim, n
    )

    def one_chunk(h, inputs):  # h: the state entering the chunk [b, g, r, p, n]
        x_c, dt_c, B_c, C_c = inputs  # [b, l, g, r, p], [b, l, g, r], [b, l, g, n] x2
        a = dt_c * A_gr  # dt * A
        a_cum = jnp.cumsum(a, axis=1)
        x_dt = x_c * dt_c[..., None]
        # 1. Within the chunk: y[l] = sum_{s <= l} (C[l] . B[s]) exp(a[s+1..l]) dt[s] x[s].
        decay = jnp.exp(segsum(jnp.moveaxis(a, 1, -1)))  # [b, g, r, l, s]
        scores = jnp.einsum("blgn,bsgn->bgls", C_c, B_c)
        y = jnp.einsum("bgrls,bsgrp->blgrp", scores[:, :, None] * decay, x_dt)
        # 2. The entering state's contribution to every step of the chunk.
        y = y + jnp.einsum("blgn,bgrpn->blgrp", C_c, h) * jnp.exp(a_cum)[..., None]
        # 3. The state at the chunk's end: the entering state decayed, plus the chunk's own inputs.
        to_end = jnp.exp(a_cum[:, -1:] - a_cum)  # [b, l, g, r]
        h = h * jnp.exp(a_cum[:, -1])[..., None, None] + jnp.einsum("blgn,blgrp->bgrpn", B_c, x_dt * to_end[..., None])
        return h, y

    # A scan over chunks: time grows linearly with T and intermediates stay chunk-sized.
    final, ys = jax.lax.scan(one_chunk, h0, (xs, dts, chunked(B), chunked(C)))
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, -1, heads, head_dim)[:, :steps]
    if D is not None:
        y = y + x.astype(jnp.float32) * D.astype(jnp.float32)[:, None]
    return y.astype(x.dtype), final.reshape(batch, heads, head_dim, n)


def ssd_step_ref(state, x, dt, A, B, C, D=None):
    """One decode step. state: [Bt, H, P, N]; x: [Bt, H, P]; dt: [Bt, H]; A: [H]; B, C: [Bt, G, N].
    Returns `(y [Bt, H, P] in x's dtype, new state [Bt, H, P, N] in state's dtype)`."""
    check_step_inputs(state, x, dt, A, B, C, D)
    rep = x.shape[1] // B.shape[1]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    B_h, C_h = jnp.repeat(f32(B), rep, axis=1), jnp.repeat(f32(C), rep, axis=1)  # [Bt, H, N]
    decay = jnp.exp(f32(dt) * f32(A))  # [Bt, H]
    h = f32(state) * decay[..., None, None] + (f32(dt)[..., None] * f32(x))[..., None] * B_h[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", h, C_h)
    if D is not None:
        y = y + f32(x) * f32(D)[:, None]
    return y.astype(x.dtype), h.astype(state.dtype)
