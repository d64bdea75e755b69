"""What every kernel's tunables share: a frozen dataclass, checked when built.

Each Pallas kernel takes `block_sizes=` (a subclass of `BlockSizes` defined beside it, `None` for its
defaults), as JAX's own Pallas ops do. Frozen dataclasses are hashable, so the block sizes are a
static argument of the jitted kernels (`static_argnames`) and of any caller's `jax.jit`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Base of the kernels' block sizes: every field is a positive int; subclasses add their own rules."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(field.name, "a positive int")

    def _fail(self, name: str, expected: str):
        raise ValueError(f"{type(self).__name__}: {name} must be {expected}, got {getattr(self, name)!r}")

    def _powers_of_two(self, *names: str, least: int = 1):
        """Triton block dims must be powers of two (its dots need >= 16)."""
        for name in names:
            value = getattr(self, name)
            if value < least or value & (value - 1):
                self._fail(name, f"a power of two >= {least}")

    def _multiples(self, of: int, *names: str):
        """Mosaic TPU tiles: sublane dims a multiple of 8 / 16 / 32 (by dtype), lane dims of 128."""
        for name in names:
            if getattr(self, name) % of:
                self._fail(name, f"a positive multiple of {of}")

    @classmethod
    def resolve(cls, block_sizes: BlockSizes | None, kernel: str):
        """`block_sizes`, or the defaults when None; a ValueError naming `kernel` for another class."""
        if block_sizes is None:
            return cls()
        if type(block_sizes) is not cls:
            raise ValueError(f"{kernel}: block_sizes must be a {cls.__name__} for this kernel, got {block_sizes!r}")
        return block_sizes
