"""Sequence parallelism for long prompts, selectable per call: `forward(..., sequence_parallel=sp)` and
`generate(..., sequence_parallel=sp)` with `sp = SequenceParallel(mesh)` run a prefill's attention as
RingAttention and Mamba-2's SSD scan with the state passed across devices, the prompt split over the mesh
axis `axis`. Everything else in the step (projections, norms, MLPs, the conv) stays with XLA's SPMD
partitioner, which follows the layout these two leave behind.

The mesh may carry the sharding axes too — `jax.make_mesh((dp, sp, tp), ("data", "seq", "model"))`, params
from `shard_params(params, config, mesh)` (replicated over "seq") — and then each block also keeps its batch
over "data" and its heads over "model". The model families call only the two methods below, so they never
import this package.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from ssm_llm.sharding import rules
from ssm_llm.sharding.ring_attention import ring_attention
from ssm_llm.sharding.sequence_ssd import ssd_sequence_parallel


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How a prefill splits its prompt: over `mesh`'s axis `axis`, in RingAttention's load-balanced zigzag
    order unless `zigzag=False`. Hashable, so it is a static argument of the jitted prefill."""

    mesh: Mesh
    axis: str = "seq"
    zigzag: bool = True

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"SequenceParallel needs a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis not in self.mesh.shape:
            raise ValueError(
                f"SequenceParallel: mesh has no axis {self.axis!r} (axes: {', '.join(self.mesh.axis_names)})"
            )
        if self.axis in (rules.DATA, rules.MODEL):
            raise ValueError(
                f"SequenceParallel: axis {self.axis!r} already holds the batch or the heads; add a separate "
                "sequence axis, e.g. jax.make_mesh((dp, sp, tp), ('data', 'seq', 'model'))"
            )

    @property
    def devices(self) -> int:
        """How many pieces the prompt is cut into."""
        return self.mesh.shape[self.axis]

    def _split(self, logical: str, size: int) -> str | None:
        """The mesh axis `size` items of `logical` stay split over inside a block, or None (replicated)."""
        axis = rules.AXIS_RULES[logical]
        n = self.mesh.shape.get(axis, 1)
        return axis if n > 1 and size % n == 0 else None

    def attention(self, q, k, v, lengths, window=0):
        """Causal attention of a fresh prefill: q [B, T, H, D], k, v [B, T, H_kv, D] (rotated); `lengths`
        [B] real tokens per row; `window` a sliding window (0: none). -> [B, T, H, D]."""
        return ring_attention(
            q,
            k,
            v,
            self.mesh,
            axis=self.axis,
            head_axis=self._split("kv_heads", k.shape[2]),
            batch_axis=self._split("batch", q.shape[0]),
            lengths=lengths,
            window=window,
            zigzag=self.zigzag,
        )

    def ssd(self, x, dt, A, B, C, D, state, chunk_size: int):
        """Mamba-2's chunked SSD (`ssd_chunked_ref`'s contract) over the split sequence, continuing from
        `state`. -> (y [B, T, H, P], final state float32)."""
        return ssd_sequence_parallel(
            x,
            dt,
            A,
            B,
            C,
            D,
            state,
            mesh=self.mesh,
            axis=self.axis,
            head_axis=self._split("ssm_heads", B.shape[2]),
            batch_axis=self._split("batch", x.shape[0]),
            chunk_size=chunk_size,
        )
