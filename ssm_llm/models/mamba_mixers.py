"""The token mixers of Mamba-1 and Mamba-2 blocks, for prefill (T > 1) and decode (T = 1).

Each takes the normed block input `h: [B, T, H]`, this layer's conv / SSM states and the number of
real tokens per row, and returns `(output [B, T, H], new conv state, new SSM state)`. Right-padded
steps (t >= counts[b]) get dt = 0, which leaves the SSM state untouched, and the conv state is taken
at each row's own last real step, so ragged batches give every row its own exact states.

`mamba1_block` / `mamba2_block` hold the projections and gating, with the conv and the scan passed
in, so other ways of walking the tokens (a draft tree's per-node states) reuse them. Their `ops`
argument supplies the linears and marks the activations a quantized model rounds (`ssm_llm.quant`);
the default `FLOAT_OPS` is the plain float block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from pallas_kernels.selective_scan import selective_scan, selective_state_update
from pallas_kernels.ssd import ssd_chunked, ssd_step
from ssm_llm.models.lm_head import linear
from ssm_llm.ssm_config import Mamba2Config, MambaConfig


class FloatOps:
    """The unquantized block's linears and activations: `linear(name, x, p)` applies `p[name]` (and the
    bias `p[name + "_b"]` if present); `act(name, x, p)` marks a named activation and returns it as is."""

    @staticmethod
    def linear(name: str, x, p: dict):
        return linear(x, p[name], p.get(f"{name}_b"))

    @staticmethod
    def act(name: str, x, p: dict):
        del name, p
        return x


FLOAT_OPS = FloatOps()


def _conv(p, x, conv_state, counts, impl):
    """Short causal conv + SiLU over `x: [B, T, C]`; a row with no real token keeps its state."""
    if x.shape[1] == 1:
        y, new_state = causal_conv1d_update(x[:, 0], p["conv_w"], p.get("conv_b"), conv_state, impl=impl)
        return y[:, None], jnp.where((counts > 0)[:, None, None], new_state, conv_state)
    return causal_conv1d(x, p["conv_w"], p.get("conv_b"), conv_state, counts, impl=impl)


def _mask_dt(dt, counts):
    """Zero dt (so the state does not move) at right-padded steps. dt: [B, T, ...]."""
    valid = jnp.arange(dt.shape[1])[None, :] < counts[:, None]
    return jnp.where(valid.reshape(valid.shape + (1,) * (dt.ndim - 2)), dt, 0.0)


def mamba1_block(config: MambaConfig, p: dict, h, conv, scan, ops=FLOAT_OPS):
    """Mamba-1's mixer with the parts that walk the sequence supplied by the caller: in_proj -> conv ->
    x_proj (dt, B, C) -> dt_proj + softplus -> scan (D skip, SiLU(z) gate) -> out_proj.

    h: [B, T, H]. `conv(x [B, T, I]) -> (conv + SiLU output [B, T, I], conv_aux)`;
    `scan(x, dt [B, T, I], A [I, N], B, C [B, T, N], D [I], z [B, T, I]) -> (y [B, T, I], ssm_aux)`.
    Returns `(output [B, T, H], conv_aux, ssm_aux)`, the aux values being whatever state the parts keep.
    Named activations (`ops.act`): conv_in, x (conv output), dt_low (dt_proj input), B, C, z.
    """
    inner, n, rank = config.intermediate_size, config.state_size, config.time_step_rank
    xz = ops.linear("in_proj", h, p)
    x, z = ops.act("conv_in", xz[..., :inner], p), ops.act("z", xz[..., inner:], p)
    x, conv_aux = conv(x)
    x = ops.act("x", x, p)
    dbc = ops.linear("x_proj", x, p)
    dt_low = ops.act("dt_low", dbc[..., :rank], p)
    dt = jax.nn.softplus(ops.linear("dt_proj", dt_low, p).astype(jnp.float32))
    B, C = ops.act("B", dbc[..., rank : rank + n], p), ops.act("C", dbc[..., rank + n :], p)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    y, ssm_aux = scan(x, dt, A, B, C, p["D"], z)
    return ops.linear("out_proj", y, p), conv_aux, ssm_aux


def mamba1_mixer(config: MambaConfig, impl: str, p: dict, h, conv_state, ssm_state, counts, ops=FLOAT_OPS):
    """Mamba-1 over a block of steps (`mamba1_block` with the causal conv and the selective scan, or
    their single-step updates when T = 1). conv_state: [B, I, K-1]; ssm_state: [B, I, N]."""

    def scan(x, dt, A, B, C, D, z):
        dt = _mask_dt(dt, counts)
        if x.shape[1] == 1:
            y, state = selective_state_update(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], impl=impl)
            return y[:, None], state
        return selective_scan(x, dt, A, B, C, D, z, ssm_state, impl=impl)

    return mamba1_block(config, p, h, lambda x: _conv(p, x, conv_state, counts, impl), scan, ops)


def gated_rms_norm(y, z, weight, eps: float, groups: int):
    """Hugging Face's `MambaRMSNormGated`: `y * silu(z)`, RMS-normalised within each of `groups`
    equal slices of the last axis, times `weight`. Computed in float32."""
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    parts = g.reshape(*g.shape[:-1], groups, g.shape[-1] // groups)
    parts = parts * jax.lax.rsqrt(jnp.mean(parts * parts, axis=-1, keepdims=True) + eps)
    return weight * parts.reshape(g.shape).astype(y.dtype)


# The SSD result does not depend on the chunk size (up to float rounding); the chunk only trades
# intra-chunk work (quadratic in its length) against sequential state passing. On the jnp path, short
# chunks are fastest (measured on 2 CPU cores, Mamba-2 130M shapes, per layer at T=4096: chunk 32
# 102 ms, 64 138 ms, 256 347 ms), so the config's chunk_size is used as an upper bound.
_JNP_MAX_CHUNK = 32


def _effective_chunk(chunk_size: int, steps: int) -> int:
    """The chunk length the SSD prefill runs with: the config's, capped at `_JNP_MAX_CHUNK` and, for
    prompts shorter than that, at the prompt rounded up to 16 steps (no padding to a whole chunk)."""
    return min(chunk_size, _JNP_MAX_CHUNK, -(-steps // 16) * 16)


def forget_more(dt, A, x, decay: float, input_scale: float):
    """Stuffed Mamba's train-free fix for state collapse, "forget more, remember less" (Chen et al. 2024): each
    step's state decay exp(dt A) multiplied by `decay` (<= 1) and its input dt x B by `input_scale`, expressed as
    the inputs of an unchanged scan: dt' = dt + log(decay) / A (A < 0, so dt' >= dt and exp(dt' A) = decay *
    exp(dt A)) and x' = x * input_scale * dt / dt' (so dt' x' B = input_scale * dt x B). The caller runs the scan
    without its D skip and adds D x itself. dt: [B, T, Hh], A: [Hh], x: [B, T, Hh, P] -> (dt', x')."""
    shifted = dt + jnp.log(jnp.float32(decay)) / A
    ratio = jnp.where(shifted > 0, dt / jnp.where(shifted > 0, shifted, 1.0), 1.0)
    return shifted, (x.astype(jnp.float32) * (input_scale * ratio)[..., None]).astype(x.dtype)


def mamba2_block(config: Mamba2Config, p: dict, h, conv, scan, ops=FLOAT_OPS):
    """Mamba-2's mixer with the parts that walk the sequence supplied by the caller: in_proj ->
    [z, xBC, dt] -> conv over xBC -> scan (dt_bias, softplus, time_step_limit applied before it; D skip
    inside it) -> gated RMSNorm with z -> out_proj.

    h: [B, T, H]. `conv(xBC [B, T, conv_dim]) -> (conv + SiLU output, conv_aux)`;
    `scan(x [B, T, Hh, P], dt [B, T, Hh], A [Hh], B, C [B, T, G, N], D [Hh]) -> (y [B, T, Hh, P], ssm_aux)`.
    Returns `(output [B, T, H], conv_aux, ssm_aux)`.
    Named activations (`ops.act`): z, conv_in (xBC), dt (before dt_bias), x, B, C (conv outputs).
    `config.state_decay` / `state_input_scale` other than 1 apply `forget_more` before the scan.
    """
    batch, steps, _ = h.shape
    inner, heads, hd = config.intermediate_size, config.num_heads, config.head_dim
    groups, n = config.n_groups, config.state_size
    zxbcdt = ops.linear("in_proj", h, p)
    z, xbc, dt = zxbcdt[..., :inner], zxbcdt[..., inner : inner + config.conv_dim], zxbcdt[..., -heads:]
    z, dt = ops.act("z", z, p), ops.act("dt", dt, p)
    xbc, conv_aux = conv(ops.act("conv_in", xbc, p))
    x, B, C = xbc[..., :inner], xbc[..., inner : inner + groups * n], xbc[..., inner + groups * n :]
    x, B, C = ops.act("x", x, p), ops.act("B", B, p), ops.act("C", C, p)
    dt = jnp.clip(jax.nn.softplus((dt + p["dt_bias"]).astype(jnp.float32)), *config.time_step_limit)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    x = x.reshape(batch, steps, heads, hd)
    fixed = config.state_decay != 1.0 or config.state_input_scale != 1.0
    dt_scan, x_scan = forget_more(dt, A, x, config.state_decay, config.state_input_scale) if fixed else (dt, x)
    y, ssm_aux = scan(
        x_scan,
        dt_scan,
        A,
        B.reshape(batch, steps, groups, n),
        C.reshape(batch, steps, groups, n),
        jnp.zeros_like(p["D"]) if fixed else p["D"],
    )
    if fixed:  # the D skip on the unscaled input
        y = y + (p["D"].astype(jnp.float32)[:, None] * x.astype(jnp.float32)).astype(y.dtype)
    y = gated_rms_norm(y.reshape(batch, steps, inner), z, p["gated_norm"], config.layer_norm_epsilon, groups)
    return ops.linear("out_proj", y, p), conv_aux, ssm_aux


def mamba2_mixer(
    config: Mamba2Config, impl: str, p: dict, h, conv_state, ssm_state, counts, ops=FLOAT_OPS, sequence_parallel=None
):
    """Mamba-2 over a block of steps (`mamba2_block` with the causal conv and the chunked SSD, or their
    single-step updates when T = 1). conv_state: [B, conv_dim, K-1]; ssm_state: [B, H, P, N].
    `sequence_parallel` (a `SequenceParallel`): the SSD of a multi-step block split over its mesh axis."""

    def scan(x, dt, A, B, C, D):
        dt = _mask_dt(dt, counts)
        steps = x.shape[1]
        if steps == 1:
            y, state = ssd_step(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, impl=impl)
            return y[:, None], state
        if sequence_parallel is not None:
            chunk = _effective_chunk(config.chunk_size, -(-steps // sequence_parallel.devices))
            return sequence_parallel.ssd(x, dt, A, B, C, D, ssm_state, chunk)
        return ssd_chunked(x, dt, A, B, C, D, ssm_state, _effective_chunk(config.chunk_size, steps), impl=impl)

    return mamba2_block(config, p, h, lambda xbc: _conv(p, xbc, conv_state, counts, impl), scan, ops)
