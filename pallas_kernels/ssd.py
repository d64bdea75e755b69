"""Mamba-2 state-space duality (SSD): the chunked scan (prefill) and its single-step update (decode).

Per head h (scalar A[h] < 0), head channel p and state index n, with dt_t[h] already softplus'ed:
    S_t[h] = exp(dt_t[h] * A[h]) * S_{t-1}[h] + dt_t[h] * x_t[h] (outer) B_t[g(h)]
    y_t[h] = S_t[h] @ C_t[g(h)] + D[h] * x_t[h]
where the G groups of B/C are shared by H / G consecutive heads. A step with dt = 0 leaves the
state unchanged (how right-padded steps are masked).

The chunked reference is the SSD "segsum" formulation: inside each chunk of L steps the output is an
attention-like product (C B^T masked by the decays exp(segsum(dt A))) plus the entering state read out
by C, and the chunk's end state is contracted from B, x and the decays to the chunk's end; a
`lax.scan` over chunks passes states between them, so time grows linearly with T and intermediates
stay chunk-sized. B and C are never repeated per head.

The Pallas kernel fuses the four Mamba-2 GPU passes (chunk cumsum, chunk state, state passing, chunk
scan) into one: each program owns one (sequence, head, block of head channels) and walks the chunks
in order with its state on chip, so the state never goes through memory between chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.gpu_params import SSD_CHUNKED_BLOCKS, compiler_params, is_power_of_two
from pallas_kernels.tpu_params import SSD_CHUNKED_TPU_CHUNK, tpu_compiler_params, tpu_interpret

CHUNKED_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
STEP_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")


def _check(x, dt, A, B, C, D, state):
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if groups == 0 or heads % groups:
        raise ValueError(f"ssd: heads ({heads}) must be a multiple of the B/C groups ({groups})")
    expected = {"dt": (dt.shape, (batch, steps, heads)), "A": (A.shape, (heads,)),
                "B": (B.shape, (batch, steps, groups, n)), "C": (C.shape, (batch, steps, groups, n))}
    if D is not None:
        expected["D"] = (D.shape, (heads,))
    if state is not None:
        expected["state"] = (state.shape, (batch, heads, head_dim, n))
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"ssd: {name} must have shape {want}, got {tuple(got)}")


def _check_chunk_size(chunk_size):
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
    _check(x, dt, A, B, C, D, state)
    _check_chunk_size(chunk_size)
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
    h0 = (jnp.zeros((batch, heads, head_dim, n), jnp.float32) if state is None
          else state.astype(jnp.float32)).reshape(batch, groups, rep, head_dim, n)

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
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state)
    rep = x.shape[1] // B.shape[1]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    B_h, C_h = jnp.repeat(f32(B), rep, axis=1), jnp.repeat(f32(C), rep, axis=1)  # [Bt, H, N]
    decay = jnp.exp(f32(dt) * f32(A))  # [Bt, H]
    h = f32(state) * decay[..., None, None] + (f32(dt)[..., None] * f32(x))[..., None] * B_h[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", h, C_h)
    if D is not None:
        y = y + f32(x) * f32(D)[:, None]
    return y.astype(x.dtype), h.astype(state.dtype)


def _ssd_step_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, y_ref, new_state_ref):
    """One (sequence, head) program: state [P, N], x [P], dt/A/D [1], B/C [N] of the head's group."""
    f32 = jnp.float32
    dt, x = dt_ref[...].astype(f32), x_ref[...].astype(f32)
    decay = jnp.exp(dt * A_ref[...].astype(f32))  # [1]
    h = state_ref[...].astype(f32) * decay[:, None] + (dt * x)[:, None] * B_ref[...].astype(f32)[None, :]
    y = jnp.sum(h * C_ref[...].astype(f32)[None, :], axis=1) + D_ref[...].astype(f32) * x
    y_ref[...] = y.astype(y_ref.dtype)
    new_state_ref[...] = h.astype(new_state_ref.dtype)


def ssd_step_pallas(state, x, dt, A, B, C, D=None, *, interpret: bool = False):
    """Pallas version of `ssd_step_ref` (same contract): one program per (sequence, head) keeps that
    head's [P, N] state on chip; the state is updated in place (its buffer is aliased to the output)."""
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state)
    batch, heads, head_dim, n = state.shape
    rep = heads // B.shape[1]
    D = jnp.zeros((heads,), jnp.float32) if D is None else D
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, h: (b, h) + (0,) * len(block))  # noqa: E731
    per_group = pl.BlockSpec((None, None, n), lambda b, h: (b, h // rep, 0))
    head_scalar = pl.BlockSpec((None, 1), lambda b, h: (h, 0))
    return pl.pallas_call(
        _ssd_step_kernel,
        grid=(batch, heads),
        in_specs=[per_head(head_dim, n), per_head(head_dim), per_head(1), head_scalar, per_group, per_group,
                  head_scalar],
        out_specs=[per_head(head_dim), per_head(head_dim, n)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=compiler_params("ssd_step", interpret),
        interpret=interpret,
        name="ssd_step",
    )(state, x, dt[..., None], A[:, None], B, C, D[:, None])


def _ssd_step_tpu_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, has_d: bool):
    """One (sequence, head) program: state [P, N]; x and y [P, 1] columns (broadcast against the state
    with no transpose); dt, A, D [1, 1]; B, C [1, N] of the head's group."""
    D_ref, y_ref, new_state_ref = refs if has_d else (None, *refs)
    f32 = jnp.float32
    dt, x = dt_ref[...].astype(f32), x_ref[...].astype(f32)
    h = state_ref[...].astype(f32) * jnp.exp(dt * A_ref[...].astype(f32)) + (dt * x) * B_ref[...].astype(f32)
    y = jnp.sum(h * C_ref[...].astype(f32), axis=1, keepdims=True)
    if has_d:
        y = y + D_ref[...].astype(f32) * x
    y_ref[...] = y.astype(y_ref.dtype)
    new_state_ref[...] = h.astype(new_state_ref.dtype)


def ssd_step_pallas_tpu(state, x, dt, A, B, C, D=None, *, interpret: bool = False):
    """Mosaic TPU version of `ssd_step_ref` (same contract, any sizes): grid (sequence, head), each
    program's blocks span full trailing array dims (the [P, N] state; x, dt, A, B, C, D viewed with
    trailing unit dims, free reshapes), so no padding is needed. The state is updated in place."""
    _check(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, state)
    batch, heads, head_dim, n = state.shape
    rep = heads // B.shape[1]
    per_head = lambda *block: pl.BlockSpec((None, None, *block), lambda b, h: (b, h, 0, 0))  # noqa: E731
    # lax.div, not //: floor division's sign fix-up needs the TPU generation to lower (h >= 0 anyway).
    per_group = pl.BlockSpec((None, None, 1, n), lambda b, h: (b, jax.lax.div(h, rep), 0, 0))
    head_scalar = pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0))
    in_specs = [per_head(head_dim, n), per_head(head_dim, 1), per_head(1, 1), head_scalar, per_group, per_group]
    args = [state, x[..., None], dt[..., None, None], A[:, None, None], B[:, :, None], C[:, :, None]]
    if D is not None:
        in_specs.append(head_scalar)
        args.append(D[:, None, None])
    y, new_state = pl.pallas_call(
        functools.partial(_ssd_step_tpu_kernel, has_d=D is not None),
        grid=(batch, heads),
        in_specs=in_specs,
        out_specs=[per_head(head_dim, 1), per_head(head_dim, n)],
        out_shape=[jax.ShapeDtypeStruct((*x.shape, 1), x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={0: 1},
        compiler_params=tpu_compiler_params("ssd_step", interpret),
        interpret=tpu_interpret(interpret),
        name="ssd_step",
    )(*args)
    return y[..., 0], new_state


def _ssd_chunked_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, *refs, steps: int, head_dim: int, n: int,
                        chunk: int, has_state: bool):
    """One (sequence, head, channel block) program. Refs: x/y [T, BP], dt [T], A/D [1], B/C [T, BN] of the
    head's group, state/final [BP, BN], with BP, BN powers of two >= 16 (masked beyond P, N and T)."""
    state_ref, y_ref, final_ref = refs if has_state else (None, *refs)
    f32 = jnp.float32
    block_p, block_n = final_ref.shape
    p_ok = pl.program_id(2) * block_p + jnp.arange(block_p) < head_dim
    n_ok = jnp.arange(block_n) < n
    state_mask = p_ok[:, None] & n_ok[None, :]
    step = jnp.arange(chunk)
    causal = step[:, None] >= step[None, :]
    A, D = A_ref[...].astype(f32), D_ref[...].astype(f32)
    # Default precision, as the reference's einsums: TF32 for float32 on recent GPUs unless
    # `jax_default_matmul_precision` asks for more.
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=f32)
    state = (plgpu.load(state_ref, mask=state_mask, other=0.0).astype(f32) if has_state
             else jnp.zeros((block_p, block_n), f32))

    def one_chunk(c, state):  # state: [BP, BN] entering chunk c
        rows = pl.ds(c * chunk, chunk)
        t_ok = c * chunk + step < steps
        # Steps beyond T load dt = 0 and x = B = C = 0, so they leave the state unchanged.
        x = plgpu.load(x_ref.at[rows, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0).astype(f32)
        dt = plgpu.load(dt_ref.at[rows], mask=t_ok, other=0.0).astype(f32)
        B = plgpu.load(B_ref.at[rows, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        C = plgpu.load(C_ref.at[rows, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        a = dt * A
        cum = jnp.cumsum(a)  # [L], inclusive
        total = jnp.sum(a)
        # Within the chunk: y[l] = sum_{s <= l} (C[l] . B[s]) exp(cum[l] - cum[s]) dt[s] x[s]; the -inf above
        # the diagonal keeps exp from overflowing there. Differences of prefix sums (as Mamba's GPU kernels),
        # not the reference's direct segment sums: an [L, L, L] sum would not fit on chip.
        # C B^T in the input dtype: its products are exact.
        decay = jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))
        scores = dot(C, B, (((1,), (1,)), ((), ())))  # [L, L]
        y = dot(scores * decay * dt[None, :], x, (((1,), (0,)), ((), ())))
        # The entering state read out by C, decayed to each step; plus the skip connection.
        y += dot(C.astype(f32), state, (((1,), (1,)), ((), ()))) * jnp.exp(cum)[:, None] + D * x
        plgpu.store(y_ref.at[rows, :], y.astype(y_ref.dtype), mask=t_ok[:, None] & p_ok[None, :])
        # The state at the chunk's end: decayed entering state plus each step's input decayed to the end.
        to_end = dt * jnp.exp(total - cum)  # [L]
        return state * jnp.exp(total) + dot(x, B.astype(f32) * to_end[:, None], (((0,), (0,)), ((), ())))

    state = jax.lax.fori_loop(0, pl.cdiv(steps, chunk), one_chunk, state)
    plgpu.store(final_ref, state, mask=state_mask)


def ssd_chunked_pallas(x, dt, A, B, C, D=None, state=None, chunk_size: int = 256, *, interpret: bool = False):
    """Pallas version of `ssd_chunked_ref` (same contract, any sizes). Grid (sequence, head, blocks of BP
    head channels); each program loops over chunks of L steps keeping its [BP, N] state on chip, reading
    its head group's B/C rows. `chunk_size` is validated but, as the result does not depend on it, the
    kernel uses its own L: the next power of two >= T, between 16 and SSD_CHUNKED_BLOCKS[0]. P and N are
    padded on chip to powers of two >= 16 (Triton's dot minimum) by masked loads and stores."""
    _check(x, dt, A, B, C, D, state)
    _check_chunk_size(chunk_size)
    batch, steps, heads, head_dim = x.shape
    n = B.shape[3]
    rep = heads // B.shape[2]
    max_chunk, max_block_p = SSD_CHUNKED_BLOCKS
    chunk = min(max_chunk, max(16, pl.next_power_of_2(steps)))
    block_p = min(max_block_p, max(16, pl.next_power_of_2(head_dim)))
    block_n = max(16, pl.next_power_of_2(n))
    D = jnp.zeros((heads,), jnp.float32) if D is None else D
    head_scalar = pl.BlockSpec((None, 1), lambda b, h, p: (h, 0))
    group_rows = pl.BlockSpec((None, steps, None, block_n), lambda b, h, p: (b, 0, h // rep, 0))
    head_rows = pl.BlockSpec((None, steps, None, block_p), lambda b, h, p: (b, 0, h, p))
    state_block = pl.BlockSpec((None, None, block_p, block_n), lambda b, h, p: (b, h, p, 0))
    in_specs = [head_rows, pl.BlockSpec((None, steps, None), lambda b, h, p: (b, 0, h)), head_scalar, group_rows,
                group_rows, head_scalar]
    args = [x, dt, A[:, None], B, C, D[:, None]]
    if state is not None:  # no zero state is read from memory when there is none
        in_specs.append(state_block)
        args.append(state)
    kernel = functools.partial(_ssd_chunked_kernel, steps=steps, head_dim=head_dim, n=n, chunk=chunk,
                               has_state=state is not None)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, pl.cdiv(head_dim, block_p)),
        in_specs=in_specs,
        out_specs=[head_rows, state_block],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((batch, heads, head_dim, n), jnp.float32)],
        compiler_params=compiler_params("ssd_chunked", interpret),
        interpret=interpret,
        name="ssd_chunked",
    )(*args)


def _ssd_chunked_tpu_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, steps: int, has_d: bool, has_state: bool):
    """One (sequence, head, chunk) program, chunks in order. Refs: x/y [L, P]; dt [L, 1]; A/D [1, 1]; B/C [L, N]
    of the head's group; state/final [P, N]; scratch: the [P, N] float32 state entering the chunk."""
    refs = list(refs)
    D_ref = refs.pop(0) if has_d else None
    state_ref = refs.pop(0) if has_state else None
    y_ref, final_ref, h_ref = refs
    f32 = jnp.float32
    c = pl.program_id(2)
    chunk = x_ref.shape[0]

    @pl.when(c == 0)
    def _():
        h_ref[...] = state_ref[...].astype(f32) if has_state else jnp.zeros(h_ref.shape, f32)

    # The last chunk may overhang T: its rows beyond T hold garbage (maybe NaN, which 0 * would keep), so
    # dt, x and B are zeroed there (those steps then leave the state unchanged); C's rows only reach
    # output rows beyond T, which are not written back.
    t_ok = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) < steps
    dt = jnp.where(t_ok, dt_ref[...], 0.0)  # [L, 1]
    x = jnp.where(t_ok, x_ref[...].astype(f32), 0.0)
    B = jnp.where(t_ok, B_ref[...], jnp.zeros((), B_ref.dtype))
    C = C_ref[...]
    a = dt * A_ref[...].astype(f32)  # [L, 1]
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    causal = row >= col
    # Column [L, 1] -> row [1, L] orientations by masked reductions (no vector transposes); the inclusive
    # cumsum of dt * A in both orientations likewise (a[k] summed over k <= l).
    to_row = lambda v: jnp.sum(jnp.where(row == col, v, 0.0), axis=0, keepdims=True)  # noqa: E731
    cum = jnp.sum(jnp.where(causal, to_row(a), 0.0), axis=1, keepdims=True)  # [L, 1]
    cum_row = jnp.sum(jnp.where(row <= col, a, 0.0), axis=0, keepdims=True)  # [1, L]
    total = jnp.sum(a, axis=0, keepdims=True)  # [1, 1]
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=f32)
    # Within the chunk: y[l] = sum_{s <= l} (C[l] . B[s]) exp(cum[l] - cum[s]) dt[s] x[s], masked before exp
    # so nothing overflows above the diagonal. C B^T in the input dtype: its products are exact in float32.
    decay = jnp.exp(jnp.where(causal, cum - cum_row, -jnp.inf))
    scores = dot(C, B, (((1,), (1,)), ((), ())))  # [L, L]
    y = jnp.dot(scores * decay * to_row(dt), x, preferred_element_type=f32)
    # The entering state read out by C, decayed to each step; plus the skip connection.
    h = h_ref[...]
    y += dot(C.astype(f32), h, (((1,), (1,)), ((), ()))) * jnp.exp(cum)
    if has_d:
        y += D_ref[...].astype(f32) * x
    y_ref[...] = y.astype(y_ref.dtype)
    # The state at the chunk's end: decayed entering state plus each step's input decayed to the end.
    h_ref[...] = h * jnp.exp(total) + jnp.dot(x.T, B.astype(f32) * (dt * jnp.exp(total - cum)),
                                               preferred_element_type=f32)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = h_ref[...]


def ssd_chunked_pallas_tpu(x, dt, A, B, C, D=None, state=None, chunk_size: int = 256, *,
                           chunk: int = SSD_CHUNKED_TPU_CHUNK, interpret: bool = False):
    """Mosaic TPU version of `ssd_chunked_ref` (same contract, any sizes; `chunk_size` is validated but, as
    the result does not depend on it, the kernel's chunk is `chunk`, a multiple of 16, or T when shorter).

    Grid (sequence, head, chunk), the chunk axis sequential with the head's [P, N] float32 state in VMEM
    scratch (loaded from `state` or zeroed at the first chunk, written to the final state at the last).
    Heads move before time (x, y: [Bt, H, T, P]; dt: [Bt, H, T, 1]), so blocks are [L, P] tiles; B/C are
    read in place as [Bt, T, G * N] when N is a multiple of 128 or G = 1 (else also moved to [Bt, G, T, N]),
    never repeated per head. T is not padded: the last chunk is masked in the kernel.
    """
    _check(x, dt, A, B, C, D, state)
    _check_chunk_size(chunk_size)
    if not isinstance(chunk, int) or chunk <= 0 or chunk % 16:
        raise ValueError(f"ssd: the TPU chunk must be a positive multiple of 16, got {chunk!r}")
    batch, steps, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    chunk = min(chunk, steps)
    per_head = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, c: (b, h, c, 0))  # noqa: E731
    head_scalar = pl.BlockSpec((None, 1, 1), lambda b, h, c: (h, 0, 0))
    # lax.div, not //: floor division's sign fix-up needs the TPU generation to lower (h >= 0 anyway).
    if groups == 1 or n % 128 == 0:  # a lane-aligned [L, N] block of the [Bt, T, G * N] view: no copy
        B, C = B.reshape(batch, steps, groups * n), C.reshape(batch, steps, groups * n)
        group_rows = pl.BlockSpec((None, chunk, n), lambda b, h, c: (b, c, jax.lax.div(h, rep)))
    else:
        B, C = B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3)
        group_rows = pl.BlockSpec((None, None, chunk, n), lambda b, h, c: (b, jax.lax.div(h, rep), c, 0))
    state_block = pl.BlockSpec((None, None, head_dim, n), lambda b, h, c: (b, h, 0, 0))
    in_specs = [per_head(head_dim), per_head(1), head_scalar, group_rows, group_rows]
    args = [x.transpose(0, 2, 1, 3), dt.astype(jnp.float32).transpose(0, 2, 1)[..., None], A[:, None, None], B, C]
    if D is not None:
        in_specs.append(head_scalar)
        args.append(D[:, None, None])
    if state is not None:  # no zero state is read from memory when there is none
        in_specs.append(state_block)
        args.append(state)
    y, final = pl.pallas_call(
        functools.partial(_ssd_chunked_tpu_kernel, steps=steps, has_d=D is not None, has_state=state is not None),
        grid=(batch, heads, pl.cdiv(steps, chunk)),
        in_specs=in_specs,
        out_specs=[per_head(head_dim), state_block],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, steps, head_dim), x.dtype),
                   jax.ShapeDtypeStruct((batch, heads, head_dim, n), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((head_dim, n), jnp.float32)],
        compiler_params=tpu_compiler_params("ssd_chunked", interpret),
        interpret=tpu_interpret(interpret),
        name="ssd_chunked",
    )(*args)
    return y.transpose(0, 2, 1, 3), final


def ssd_chunked(x, dt, A, B, C, D=None, state=None, chunk_size: int = 256, *, impl="auto"):
    """Dispatcher for `ssd_chunked_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The Pallas kernels take any sizes and ignore `chunk_size` beyond validating it (see `ssd_chunked_pallas`);
    on TPU "pallas" runs `ssd_chunked_pallas_tpu`."""
    kind = resolve_impl(impl, "ssd_chunked", CHUNKED_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return ssd_chunked_pallas_tpu(x, dt, A, B, C, D, state, chunk_size)
    if kind == "xla":
        return ssd_chunked_ref(x, dt, A, B, C, D, state, chunk_size)
    return ssd_chunked_pallas(x, dt, A, B, C, D, state, chunk_size, interpret=kind == "interpret")


def ssd_step(state, x, dt, A, B, C, D=None, *, impl="auto"):
    """Dispatcher for `ssd_step_ref`'s contract (see there). On TPU "pallas" runs `ssd_step_pallas_tpu` (any
    sizes). The compiled GPU (Triton) kernel needs head_dim and state_size to be powers of two: otherwise
    "auto" falls back to the reference and "pallas" raises."""
    kind = resolve_impl(impl, "ssd_step", STEP_PALLAS_BACKENDS)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return ssd_step_pallas_tpu(state, x, dt, A, B, C, D)
    if kind == "pallas" and not (is_power_of_two(state.shape[2]) and is_power_of_two(state.shape[3])):
        if impl != "auto":
            raise ValueError(f"ssd_step: the Pallas GPU kernel needs power-of-two head_dim and state_size, got "
                             f"{state.shape[2]} and {state.shape[3]}; use impl='xla'")
        kind = "xla"
    if kind == "xla":
        return ssd_step_ref(state, x, dt, A, B, C, D)
    return ssd_step_pallas(state, x, dt, A, B, C, D, interpret=kind == "interpret")
