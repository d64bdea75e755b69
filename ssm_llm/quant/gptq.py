"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for a linear y = x @ w, w: [K, N] (in x out, our layout), offline in numpy float64.

GPTQ quantizes w one input row k at a time and spreads each row's rounding error over the rows not yet
quantized, weighted by the inverse Hessian of the layer's squared output error, H = 2 X^T X / n: this
minimizes ||X w - X w_q||^2 far better than rounding each weight to nearest (RTN) when inputs are
correlated. With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), quantizing row k (scale s, offset o = 0
unless min-max) gives
    err = (w[k] - (q[k] * s + o)) / U[k, k],    w[j] -= U[k, j] * err  for every later row j > k,
applied at once inside a block of rows and lazily (one matmul per block) to the rows after the block.

The result is the `QuantizedWeight` that `pallas_kernels.quantized_matmul` consumes: scales per group of
`group_size` rows along K (as `quantize_weights`), 2- to 8-bit codes in its packed layouts; symmetric
(absmax) or, with symmetric=False, min-max with an offset per group (GPTQ's own default, far better at 2-3
bits). Without act_order a group's scales are absmax / q_max (or its range) of its rows as the sweep enters
the group, i.e. of the weights already updated for every earlier row (blocks are cut at group starts so that no lazy
update is pending then). With act_order rows are swept by decreasing H_kk, and since a group's rows are
then spread over the sweep, its scales are fixed before the sweep from the original weights ("static
groups"), so the stored layout stays the plain per-group one.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import QuantizedWeight, pack_codes
from pallas_kernels.quantized_matmul.weights import check_layout, group_grid
from ssm_llm.quant.quantizers import qrange


def _quantize_row(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """`quantizers.quantize` of one row in numpy float32 (same IEEE division and half-to-even rounding): a jitted
    call per row cost ~1 ms of dispatch, most of SmolLM2's 229 s GPTQ."""
    q_min, q_max = qrange(bits)
    live = scale > 0
    q = np.round(x / np.where(live, scale, np.float32(1.0)))
    return np.where(live, np.clip(q, q_min, q_max), 0).astype(np.int8)


def _group_grid(rows: np.ndarray, bits: int, symmetric: bool, scale_dtype):
    """rows [..., g, N] float64 -> (scales, offsets) [..., N] float32, `group_grid` of the rows in float32 as
    stored in `scale_dtype` (zero offsets when symmetric)."""
    scales, offsets = group_grid(jnp.asarray(rows, jnp.float32), bits, symmetric, scale_dtype)
    scales = np.asarray(scales, np.float32)
    return scales, np.zeros_like(scales) if offsets is None else np.asarray(offsets, np.float32)


def hessian(x_batches) -> np.ndarray:
    """x_batches: an iterable (a list, or a generator, so activations need not all be kept) of inputs
    [..., K] to the layer, or one such array -> H = 2 X^T X / n: float64 [K, K], with X [n, K] all
    rows of all batches."""
    if hasattr(x_batches, "shape"):
        x_batches = [x_batches]
    total, rows = None, 0
    for i, x in enumerate(x_batches):
        x = np.asarray(x, np.float64)
        if x.ndim < 1 or (total is not None and x.shape[-1] != total.shape[0]):
            want = "[..., K]" if total is None else f"[..., {total.shape[0]}] like the first batch"
            raise ValueError(f"hessian: batch {i} has shape {x.shape}, expected {want}")
        x = x.reshape(-1, x.shape[-1])
        total = x.T @ x if total is None else total + x.T @ x
        rows += x.shape[0]
    if total is None or rows == 0:
        raise ValueError("hessian: no calibration data: x_batches held no rows")
    return 2.0 * total / rows


def _check(w: np.ndarray, h: np.ndarray, bits, group_size, damp, block_size):
    qrange(bits)
    if w.ndim != 2:
        raise ValueError(f"gptq_quantize: w must be 2-D [K, N], got shape {w.shape}")
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"gptq_quantize: H must have shape {(k, k)} (w is {w.shape}), got {h.shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or k % group_size:
        raise ValueError(f"gptq_quantize: group_size must be a positive int dividing K ({k}), got {group_size!r}")
    check_layout(bits, group_size, k, "gptq_quantize")  # the packing's own conditions on K
    if not np.isfinite(damp) or damp < 0:
        raise ValueError(f"gptq_quantize: damp must be a finite number >= 0, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be a positive int, got {block_size!r}")
    if not (np.isfinite(w).all() and np.isfinite(h).all()):
        raise ValueError("gptq_quantize: w and H must be finite")


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = H^-1 (float64 [K, K])."""
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.inv(lower)
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T
    except np.linalg.LinAlgError:
        raise ValueError(
            f"gptq_quantize: the damped Hessian is not positive definite (damp={damp}); "
            f"raise damp or calibrate on more rows than K"
        ) from None


def gptq_quantize(
    w,
    H,
    bits: int = 4,
    group_size: int = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    symmetric: bool = True,
    scale_dtype=jnp.float32,
) -> QuantizedWeight:
    """w: float [K, N], H: [K, K] (from `hessian`) -> QuantizedWeight (bits in 2..8, group_size, scales in
    `scale_dtype`, and offsets in it too when not `symmetric`; codes rounded against the stored values).

    damp: damp * mean(diag H) is added to H's diagonal (after dead inputs are fixed). Dead inputs
    (H_kk == 0: the input was always exactly 0, so its weights never matter) get H_kk = 1 and their w
    rows zeroed (codes 0). block_size: rows per lazy-update block (a speed knob only: the result does
    not depend on it beyond float rounding). act_order: see the module docstring.
    """
    w = np.array(w, np.float64)  # a copy: the sweep updates it in place
    h = np.array(H, np.float64)
    _check(w, h, bits, group_size, damp, block_size)
    if not isinstance(symmetric, bool):
        raise ValueError(f"gptq_quantize: symmetric must be True or False, got {symmetric!r}")
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))

    scales = np.zeros((k // group_size, n), np.float32)
    offsets = np.zeros_like(scales)
    if act_order:
        order = np.argsort(-np.diag(h), kind="stable")
        scales[:], offsets[:] = _group_grid(w.reshape(-1, group_size, n), bits, symmetric, scale_dtype)
        w, h = w[order], h[np.ix_(order, order)]
        starts = range(0, k, block_size)
    else:
        order = np.arange(k)
        starts = sorted(set(range(0, k, block_size)) | set(range(0, k, group_size)))
    group = order // group_size
    u = _inverse_cholesky(h, damp)

    codes = np.zeros((k, n), np.int8)
    for i1, i2 in zip(starts, [*starts[1:], k], strict=True):
        block = w[i1:i2]  # a view: in-block updates land in w
        errors = np.zeros_like(block)
        for i in range(i2 - i1):
            row = i1 + i
            if not act_order and row % group_size == 0:  # a block start: w[row:] has every update so far
                grid = _group_grid(w[row : row + group_size], bits, symmetric, scale_dtype)
                scales[group[row]], offsets[group[row]] = grid
            s, o = scales[group[row]], offsets[group[row]].astype(np.float64)
            codes[row] = _quantize_row((block[i] - o).astype(np.float32), s, bits)
            errors[i] = (block[i] - codes[row] * s.astype(np.float64) - o) / u[row, row]
            block[i + 1 :] -= np.outer(u[row, row + 1 : i2], errors[i])
        w[i2:] -= u[i1:i2, i2:].T @ errors

    codes[order] = codes.copy()
    return QuantizedWeight(
        pack_codes(jnp.asarray(codes), bits),
        jnp.asarray(scales, scale_dtype),
        bits,
        group_size,
        None if symmetric else jnp.asarray(offsets, scale_dtype),
    )
