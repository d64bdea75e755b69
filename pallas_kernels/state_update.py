"""What the decode-step kernels share: the SSM state update of Mamba-1's `selective_state_update` and
Mamba-2's `ssd_step` (one body each for Triton and Mosaic TPU), and the TPU launch of an in-place
decode step (also used by `causal_conv1d_update`).

Per row r of a program's state block (a channel for Mamba-1, a head channel for Mamba-2):
    h[r] = h[r] * exp(dt[r] * A[r]) + dt[r] * x[r] * B,   y[r] = h[r] . C (+ D[r] x[r]) (* silu(z[r]))
where Mamba-2's dt, A and D are one value per head, broadcast over its rows, and A of Mamba-1 is a
[rows, N] block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.lowering import tpu_interpret, tpu_params


def _update(state, x, dt, A, B, C, D, z, y_ref, new_state_ref, *, x_out):
    """The step on float32 values broadcast against the [R, N] state; x_out is x laid out as y ([R] for
    Triton, [R, 1] for TPU). Stores y and the new state."""
    h = state * jnp.exp(dt * A) + (dt * x) * B
    y = jnp.sum(h * C, axis=1, keepdims=x_out.ndim == 2)
    if D is not None:
        y = y + D * x_out
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    y_ref[...] = y.astype(y_ref.dtype)
    new_state_ref[...] = h.astype(new_state_ref.dtype)


def state_update_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, *refs, gate: bool):
    """Triton body of one (sequence, block) program: state [R, N]; x, and z when `gate`, [R]; dt and D
    [R] or [1] (one head); A [R, N] or [1]; B, C [N]. Outputs y [R] and the new state [R, N]."""
    z_ref, y_ref, new_state_ref = refs if gate else (None, *refs)
    f32 = lambda ref: ref[...].astype(jnp.float32)  # noqa: E731
    x, dt = f32(x_ref), f32(dt_ref)
    _update(
        f32(state_ref),
        x[:, None],
        dt[:, None],
        f32(A_ref),
        f32(B_ref)[None, :],
        f32(C_ref)[None, :],
        f32(D_ref),
        None if z_ref is None else f32(z_ref),
        y_ref,
        new_state_ref,
        x_out=x,
    )


def state_update_tpu_kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, *refs, has_d: bool, has_z: bool):
    """Mosaic TPU body of one (sequence, block) program, with no transposes: state [R, N]; x, z and y [R, 1]
    columns; dt and D [R, 1] or [1, 1] (one head); A [R, N] or [1, 1]; B, C [1, N]."""
    refs = list(refs)
    D_ref = refs.pop(0) if has_d else None
    z_ref = refs.pop(0) if has_z else None
    y_ref, new_state_ref = refs
    f32 = lambda ref: None if ref is None else ref[...].astype(jnp.float32)  # noqa: E731
    x = f32(x_ref)
    _update(
        f32(state_ref),
        x,
        f32(dt_ref),
        f32(A_ref),
        f32(B_ref),
        f32(C_ref),
        f32(D_ref),
        f32(z_ref),
        y_ref,
        new_state_ref,
        x_out=x,
    )


def decode_step_tpu(kernel, grid, inputs, y_spec, state_spec, x, state, state_input: int, name: str, interpret: bool):
    """Launches a TPU decode step: `inputs` are (array, BlockSpec) pairs (None arrays left out), `grid`
    (sequence, block) has independent programs; the outputs are y, blocked by `y_spec` as [*x.shape, 1]
    columns in x's dtype, and the new state, written in place over input `state_input`.
    Returns `(y [*x.shape], new state)`."""
    inputs = [(array, spec) for array, spec in inputs if array is not None]
    y, new_state = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec for _, spec in inputs],
        out_specs=[y_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct((*x.shape, 1), x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)],
        input_output_aliases={state_input: 1},
        compiler_params=tpu_params(("parallel", "parallel"), interpret),
        interpret=tpu_interpret(interpret),
        name=name,
    )(*(array for array, _ in inputs))
    return y[..., 0], new_state
