"""Tree verification for state-space targets (Mamba-1, Mamba-2): one recurrent state per tree node.

Node i's state is its parent's state advanced by node i's token; the root continues the cache. Per
layer, the projections and gating run for all scored nodes at once (`mamba1_block` / `mamba2_block`);
the causal conv of a node reads the conv inputs of its K-1 nearest ancestors (past the root, the
cache's conv state), so it is parallel too; only the SSM recurrence walks the nodes in order, one
single-step state update (`selective_state_update` / `ssd_step`) per node, reading the parent's
state. The scratch keeps every node's conv input and SSM state, so `commit` needs no model: it takes
the accepted node's states and the last K-1 conv inputs along the accepted path.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.causal_conv1d import causal_conv1d_update
from pallas_kernels.selective_scan import selective_state_update
from pallas_kernels.ssd import ssd_step
from ssm_llm.layer_layout import run_layers_with_states
from ssm_llm.models.lm_head import embed_tokens, logits_from_hidden
from ssm_llm.models.mamba_mixers import mamba1_block, mamba2_block
from ssm_llm.norm import rms_norm
from ssm_llm.speculative.tree import DraftTree, check_tree
from ssm_llm.ssm_cache import SSMCache
from ssm_llm.ssm_config import Mamba2Config, MambaConfig

# Per family: the mixer with pluggable conv/scan, and the single-step state update serving the scan.
_FAMILIES = {MambaConfig: (mamba1_block, selective_state_update), Mamba2Config: (mamba2_block, ssd_step)}


@flax.struct.dataclass
class SSMTreeScratch:
    """Per-node states of a draft tree, for every layer.

    conv_inputs: [L, B, N, C] each node's input to the short conv (pre-conv x for Mamba-1, xBC for
    Mamba-2), in the cache's conv dtype; ssm_states: [L, B, N, D, Ns] (Mamba-1) or [L, B, N, H, P, Ns]
    (Mamba-2), float32, the SSM state after each node. Entries of nodes not computed yet are zeros.
    """

    conv_inputs: jax.Array
    ssm_states: jax.Array

    @property
    def batch(self) -> int:
        return self.ssm_states.shape[1]

    @property
    def size(self) -> int:
        return self.ssm_states.shape[2]


def init_scratch(cache: SSMCache, tree_size: int) -> SSMTreeScratch:
    """An empty scratch for trees of `tree_size` nodes continuing `cache`."""
    conv, ssm = cache.conv_state, cache.ssm_state
    return SSMTreeScratch(
        conv_inputs=jnp.zeros(conv.shape[:2] + (tree_size, conv.shape[2]), conv.dtype),
        ssm_states=jnp.zeros(ssm.shape[:2] + (tree_size,) + ssm.shape[2:], ssm.dtype),
    )


def _conv_ancestors(parents: jax.Array, taps: int) -> jax.Array:
    """[B, N, K-1] int32: the nodes whose conv inputs precede node i's, oldest first. A value j >= 0 is
    node j; a negative value -d is the d-th last entry of the cache's conv state (the steps before the
    root). Unused nodes are treated as continuing the cache directly (their output is never used)."""
    parent = jnp.where(parents >= 0, parents, -1)
    current, found = parent, []
    for _ in range(taps - 1):  # K is small and static
        found.append(current)
        up = jnp.take_along_axis(parent, jnp.maximum(current, 0), axis=1)
        current = jnp.where(current >= 0, up, current - 1)
    return jnp.stack(found[::-1], axis=-1) if found else jnp.zeros(parents.shape + (0,), jnp.int32)


def _tree_conv(p, impl, conv_state, conv_inputs, nodes, ancestors, x):
    """The causal conv (+ SiLU) of the scored nodes, each over its own ancestors.

    conv_state: [B, C, K-1]; conv_inputs: [B, N, C] earlier nodes' inputs; nodes: [B, M];
    ancestors: [B, M, K-1] (`_conv_ancestors` of the scored nodes); x: [B, M, C] their inputs.
    Returns `(y [B, M, C], conv_inputs with the M nodes' inputs written)`.
    """
    batch, m, channels = x.shape
    width = conv_state.shape[-1]
    rows = jnp.arange(batch)[:, None]
    conv_inputs = conv_inputs.at[rows, nodes].set(x.astype(conv_inputs.dtype))
    from_nodes = conv_inputs[rows[:, :, None], jnp.maximum(ancestors, 0)]  # [B, M, K-1, C]
    before_root = jnp.clip(width + ancestors, 0, max(width - 1, 0))  # [B, M, K-1]
    from_cache = jnp.take_along_axis(conv_state[:, None], before_root[:, :, None, :], axis=-1)  # [B, M, C, K-1]
    window = jnp.where((ancestors >= 0)[:, :, None, :], jnp.swapaxes(from_nodes, -1, -2), from_cache)
    y, _ = causal_conv1d_update(
        x.reshape(batch * m, channels),
        p["conv_w"],
        p.get("conv_b"),
        window.reshape(batch * m, channels, width),
        impl=impl,
    )
    return y.reshape(batch, m, channels), conv_inputs


def _node_recurrence(step, root_state, node_states, nodes, node_parents, inputs):
    """Advance each scored node's state from its parent's, in node order.

    step(state [B, *S], *inputs at one node) -> (y, new state); root_state: [B, *S] (the cache's);
    node_states: [B, N, *S]; nodes, node_parents: [B, M] (parent -1: the root's state); inputs: arrays
    [B, M, ...]. Returns `(y [B, M, ...], node_states with the M nodes' states written)`.
    """
    rows = jnp.arange(nodes.shape[0])
    expand = (slice(None),) + (None,) * (root_state.ndim - 1)

    def body(states, xs):
        node, parent, *node_inputs = xs
        prev = jnp.where((parent >= 0)[expand], states[rows, jnp.maximum(parent, 0)], root_state)
        y, new = step(prev, *node_inputs)
        return states.at[rows, node].set(new.astype(states.dtype)), y

    xs = (nodes.T, node_parents.T, *(jnp.moveaxis(a, 1, 0) for a in inputs))
    node_states, ys = jax.lax.scan(body, node_states, xs)
    return jnp.moveaxis(ys, 0, 1), node_states


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _tree_logits(params, config, cache, tree, scratch, nodes, impl):
    """`tree_logits` on checked inputs (scratch given, nodes: [B, M] int32)."""
    block, update = _FAMILIES[type(config)]
    rows = jnp.arange(tree.batch)[:, None]
    ancestors = _conv_ancestors(tree.parents, config.conv_kernel)[rows, nodes]  # [B, M, K-1]
    node_parents = jnp.where(tree.parents >= 0, tree.parents, -1)[rows, nodes]  # [B, M]

    def layer(x, layer_inputs, state):
        p, _ = layer_inputs
        conv_state, root_state, conv_inputs, node_states = state

        def scan(x, dt, A, B, C, D, *gate):  # gate: (z,) for Mamba-1, () for Mamba-2
            def step(state, x, dt, B, C, *gate):
                return update(state, x, dt, A, B, C, D, *gate, impl=impl)

            return _node_recurrence(step, root_state, node_states, nodes, node_parents, (x, dt, B, C, *gate))

        conv = functools.partial(_tree_conv, p, impl, conv_state, conv_inputs, nodes, ancestors)
        out, conv_inputs, node_states = block(config, p, rms_norm(x, p["norm"], config.layer_norm_epsilon), conv, scan)
        return x + out, (conv_inputs, node_states)

    x = embed_tokens(params, config, tree.tokens[rows, nodes])
    x, (conv_inputs, ssm_states) = run_layers_with_states(
        layer, x, (cache.conv_state, cache.ssm_state, scratch.conv_inputs, scratch.ssm_states), params["layers"]
    )
    h = rms_norm(x, params["final_norm"], config.layer_norm_epsilon)
    return logits_from_hidden(params, config, h), SSMTreeScratch(conv_inputs, ssm_states)


def _check_cache(config, cache) -> None:
    if not isinstance(cache, SSMCache):
        raise TypeError(f"a {type(config).__name__} verifies trees from an SSMCache, got {type(cache).__name__}")
    width = config.conv_kernel - 1
    channels = config.conv_dim if isinstance(config, Mamba2Config) else config.intermediate_size
    expected = (config.num_layers, cache.batch, channels, width)
    if cache.conv_state.shape != expected:
        raise ValueError(f"cache.conv_state must be {expected} for this config, got {cache.conv_state.shape}")


def _check_scratch(scratch, cache: SSMCache, tree_size: int) -> None:
    if not isinstance(scratch, SSMTreeScratch):
        raise TypeError(f"scratch must be an SSMTreeScratch (from ssm_tree.tree_logits), got {type(scratch).__name__}")
    conv, ssm = cache.conv_state, cache.ssm_state
    expected = (conv.shape[:2] + (tree_size, conv.shape[2]), ssm.shape[:2] + (tree_size,) + ssm.shape[2:])
    got = (scratch.conv_inputs.shape, scratch.ssm_states.shape)
    if got != expected:
        raise ValueError(
            f"scratch shapes (conv_inputs, ssm_states) must be {expected} for this cache and a tree of "
            f"{tree_size} nodes, got {got}"
        )


def _check_nodes(nodes, batch: int, size: int) -> None:
    if nodes.ndim != 2 or nodes.shape[0] != batch or not jnp.issubdtype(nodes.dtype, jnp.integer):
        raise ValueError(f"nodes must be integer [B={batch}, M], got {nodes.dtype} {nodes.shape}")
    if isinstance(nodes, jax.core.Tracer):
        return
    values = np.asarray(nodes)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise ValueError(f"nodes must lie in [0, {size}), got {values.tolist()}")
    if (np.diff(values, axis=1) <= 0).any():
        raise ValueError(f"nodes must be increasing along each row, got {values.tolist()}")


def tree_logits(
    params: dict,
    config: MambaConfig | Mamba2Config,
    cache: SSMCache,
    tree: DraftTree,
    scratch: SSMTreeScratch | None = None,
    nodes: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, SSMTreeScratch]:
    """Score tree nodes continuing `cache` (each row's states after its committed tokens but the root).

    tree: [B, N] (`ssm_llm.speculative.tree`); nodes: [B, M] int (default all N) the nodes to compute
    now, increasing along each row; a listed node's parent must be in `scratch` (an earlier call) or
    earlier in `nodes`, so a drafter can grow a tree level by level. Returns `(logits [B, M, V], scratch)`,
    the scratch holding the states of every node computed so far. Jittable with static config and impl.
    """
    if type(config) not in _FAMILIES:
        raise TypeError(f"ssm_tree serves MambaConfig and Mamba2Config, got {type(config).__name__}")
    _check_cache(config, cache)
    check_tree(tree, config.vocab_size)
    if tree.batch != cache.batch:
        raise ValueError(f"tree batch {tree.batch} != cache batch {cache.batch}")
    if scratch is None:
        scratch = init_scratch(cache, tree.size)
    _check_scratch(scratch, cache, tree.size)
    if nodes is None:
        nodes = jnp.broadcast_to(jnp.arange(tree.size, dtype=jnp.int32), (tree.batch, tree.size))
    nodes = jnp.asarray(nodes)
    _check_nodes(nodes, tree.batch, tree.size)
    return _tree_logits(params, config, cache, tree, scratch, nodes.astype(jnp.int32), impl)


def commit(
    cache: SSMCache, scratch: SSMTreeScratch, path: jax.Array, accepted: jax.Array, active: jax.Array | None = None
) -> SSMCache:
    """The cache after acceptance: each row's states after node `path[b, accepted[b]]` (the root when
    accepted is 0); lengths += 1 + accepted. path: [B, N] node indices, root first (entries past
    `accepted[b]` unread); accepted: [B]; active: [B] bool (default all): False rows keep `cache`.
    """
    if not isinstance(cache, SSMCache):
        raise TypeError(f"commit needs the SSMCache the tree was scored from, got {type(cache).__name__}")
    size = path.shape[-1]
    _check_scratch(scratch, cache, size)
    batch = cache.batch
    if path.shape != (batch, size) or accepted.shape != (batch,):
        raise ValueError(f"path must be [{batch}, N] and accepted [{batch}], got {path.shape} and {accepted.shape}")
    if active is not None and active.shape != (batch,):
        raise ValueError(f"active must be [{batch}], got {active.shape}")
    if not isinstance(accepted, jax.core.Tracer):
        values = np.asarray(accepted)
        if ((values < 0) | (values >= size)).any():
            raise ValueError(f"accepted must lie in [0, {size}), got {values.tolist()}")
    rows = jnp.arange(batch)
    ssm = scratch.ssm_states[:, rows, path[rows, accepted]]  # [L, B, ...]
    # The new conv state is the last K-1 of [cache conv state (K-1 steps), path[0..accepted] inputs].
    width = cache.conv_state.shape[-1]
    steps = accepted[:, None] + 1 + jnp.arange(width)  # [B, K-1] positions in that sequence
    path_nodes = jnp.take_along_axis(path, jnp.clip(steps - width, 0, size - 1), axis=1)
    from_nodes = scratch.conv_inputs[:, rows[:, None], path_nodes]  # [L, B, K-1, C]
    from_cache = jnp.take_along_axis(cache.conv_state, jnp.clip(steps, 0, max(width - 1, 0))[None, :, None, :], axis=-1)
    conv = jnp.where((steps >= width)[None, :, None, :], jnp.swapaxes(from_nodes, -1, -2), from_cache)
    keep = jnp.ones((batch,), bool) if active is None else active.astype(bool)

    def select(new, old):  # [L, B, ...]: the new rows where active
        return jnp.where(keep.reshape((1, batch) + (1,) * (new.ndim - 2)), new, old)

    return SSMCache(
        conv_state=select(conv, cache.conv_state),
        ssm_state=select(ssm, cache.ssm_state),
        lengths=cache.lengths + jnp.where(keep, 1 + accepted, 0).astype(cache.lengths.dtype),
    )
