"""Kernels for the hot loops: a pure-jnp reference beside each Pallas kernel, and a dispatcher.

Every module `pallas_kernels/<name>.py` holds `<name>_ref` (the reference) and `<name>(..., impl)`;
models call only the dispatchers.
"""

from pallas_kernels.attention import attention, attention_ref
from pallas_kernels.dispatch import IMPLS, resolve_impl

__all__ = ["IMPLS", "attention", "attention_ref", "resolve_impl"]
