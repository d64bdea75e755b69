"""The block Walsh-Hadamard transform of float32 rows on CPU: a compiled kernel called from XLA (`fwht.cc`).

`block_fwht(x, block)`: every `block` consecutive channels of x's last axis multiplied by the normalized
Hadamard matrix H_block / sqrt(block), bit-identical to `ssm_llm.hadamard.fwht_reference` on the same input (the
same additions in the same order), in one pass where XLA makes one per butterfly stage. `runs_here()` says
whether `ssm_llm.hadamard` takes it: the CPU backend with one device (XLA cannot partition a custom call over a
mesh) and the kernel built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_build import FWHT_TARGET, available, unavailable_reason

__all__ = ["block_fwht", "runs_here"]


def runs_here() -> bool:
    """Whether `ssm_llm.hadamard` transforms through the kernel on this host and setup (see the module doc)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def block_fwht(x: jax.Array, block: int) -> jax.Array:
    """x: float32 [..., n], `block` a power of two dividing n -> x with every block of `block` channels times
    H_block / sqrt(block) (float32). CPU only, through the compiled kernel. Reverse-mode differentiable (the
    transform is symmetric: its transpose is itself)."""
    n = x.shape[-1] if x.ndim else 0
    if x.ndim < 1 or block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"block_fwht: x [..., n] with n a multiple of a power-of-two block, got {x.shape}, {block}")
    if x.dtype != jnp.float32:
        raise ValueError(f"block_fwht: float32 x expected, got {x.dtype}")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"block_fwht: the CPU kernel is unavailable here: {reason}")
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    # scale as `ssm_llm.hadamard.fwht` writes it (a Python float, which XLA rounds to float32)
    call = jax.ffi.ffi_call(FWHT_TARGET, out, vmap_method="broadcast_all")
    return call(x, block=np.int64(block), scale=np.float32(1.0 / block**0.5))


def _block_fwht_fwd(x, block):
    return block_fwht(x, block), None


def _block_fwht_bwd(block, _, g):
    return (block_fwht(g.astype(jnp.float32), block),)


block_fwht.defvjp(_block_fwht_fwd, _block_fwht_bwd)
