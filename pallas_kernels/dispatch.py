"""Choosing an implementation: `impl` is "auto", "xla" (pure-jnp reference), "pallas" or "interpret"."""

from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")


def resolve_impl(impl: str, kernel: str, pallas_backends: tuple[str, ...] = ()) -> str:
    """Map `impl` to "xla", "pallas" or "interpret" for `kernel`.

    `pallas_backends` lists the JAX backends ("gpu", "tpu") where `kernel` has a compiled Pallas
    version; "auto" picks Pallas there and the reference elsewhere. Asking for "pallas" or "interpret"
    where no Pallas version exists raises a ValueError naming the kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"{kernel}: unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if backend in pallas_backends else "xla"
    if impl == "pallas" and backend not in pallas_backends:
        raise ValueError(
            f"{kernel}: no compiled Pallas kernel for backend {backend!r} "
            f"(available on: {', '.join(pallas_backends) or 'none yet'}); use impl='xla'"
        )
    if impl == "interpret" and not pallas_backends:
        raise ValueError(f"{kernel}: has no Pallas kernel yet, so impl='interpret' cannot run; use impl='xla'")
    return impl
