"""Causal depthwise 1-D convolution (the short convolution of Mamba / Mamba-2 blocks), and its decode step.

Each channel c is convolved with its own K taps; the output at step t sees inputs t-K+1..t. The
previous K-1 inputs of a sequence are its "conv state" `[B, C, K-1]` (oldest first), so a prefill
can continue a cached sequence and a decode step needs only the state and one new input.

`reference.py` holds the references, `triton.py` the GPU kernels and `tpu.py` the Mosaic TPU ones;
the Pallas kernels take any C and T (and K >= 2), bias + SiLU fused, the new conv state written by
the kernel, in place for the decode step.
"""

from __future__ import annotations

import jax

from pallas_kernels.causal_conv1d.reference import (
    ACTIVATIONS,
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    kernel_takes,
)
from pallas_kernels.causal_conv1d.tpu import (
    CausalConv1dTPUBlockSizes,
    CausalConv1dUpdateTPUBlockSizes,
    causal_conv1d_pallas_tpu,
    causal_conv1d_update_pallas_tpu,
)
from pallas_kernels.causal_conv1d.triton import (
    CausalConv1dBlockSizes,
    CausalConv1dUpdateBlockSizes,
    causal_conv1d_pallas,
    causal_conv1d_update_pallas,
)
from pallas_kernels.dispatch import resolve_impl

__all__ = [
    "ACTIVATIONS",
    "CausalConv1dBlockSizes",
    "CausalConv1dTPUBlockSizes",
    "CausalConv1dUpdateBlockSizes",
    "CausalConv1dUpdateTPUBlockSizes",
    "causal_conv1d",
    "causal_conv1d_pallas",
    "causal_conv1d_pallas_tpu",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_pallas",
    "causal_conv1d_update_pallas_tpu",
    "causal_conv1d_update_ref",
]

PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")
UPDATE_PALLAS_BACKENDS: tuple[str, ...] = ("gpu", "tpu")


def causal_conv1d(
    x,
    weight,
    bias=None,
    state=None,
    counts=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dBlockSizes | CausalConv1dTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `causal_conv1d_ref`'s contract (see there); `impl` as in `pallas_kernels.dispatch`.
    The Pallas kernel needs K >= 2 and T >= 1: otherwise "auto" uses the reference and the others raise. On TPU
    "pallas" runs `causal_conv1d_pallas_tpu`. `block_sizes` are those of the kernel that runs (None: its
    defaults)."""
    kind = resolve_impl(impl, "causal_conv1d", PALLAS_BACKENDS)
    if kind == "xla" or (impl == "auto" and not kernel_takes(weight.shape[1], x.shape[1])):
        return causal_conv1d_ref(x, weight, bias, state, counts, activation)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return causal_conv1d_pallas_tpu(x, weight, bias, state, counts, activation, block_sizes=block_sizes)
    return causal_conv1d_pallas(
        x, weight, bias, state, counts, activation, block_sizes=block_sizes, interpret=kind == "interpret"
    )


def causal_conv1d_update(
    x,
    weight,
    bias=None,
    state=None,
    activation="silu",
    *,
    block_sizes: CausalConv1dUpdateBlockSizes | CausalConv1dUpdateTPUBlockSizes | None = None,
    impl="auto",
):
    """Dispatcher for `causal_conv1d_update_ref`'s contract (see there); K = 1 as in `causal_conv1d`. On TPU
    "pallas" runs `causal_conv1d_update_pallas_tpu`. `block_sizes` as in `causal_conv1d`."""
    kind = resolve_impl(impl, "causal_conv1d_update", UPDATE_PALLAS_BACKENDS)
    if kind == "xla" or (impl == "auto" and not kernel_takes(weight.shape[1], 1)):
        return causal_conv1d_update_ref(x, weight, bias, state, activation)
    if kind == "pallas" and jax.default_backend() == "tpu":
        return causal_conv1d_update_pallas_tpu(x, weight, bias, state, activation, block_sizes=block_sizes)
    return causal_conv1d_update_pallas(
        x, weight, bias, state, activation, block_sizes=block_sizes, interpret=kind == "interpret"
    )
