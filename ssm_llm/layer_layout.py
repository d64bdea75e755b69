"""Two layouts for the per-layer weights in `params["layers"]`, and conversion between them.

- stacked (the default, what converters return and checkpoints store): one dict of arrays with a
  leading layer axis `[L, ...]`; the layers run under `lax.scan`, so compile time does not grow with
  depth.
- unstacked: a list of L per-layer dicts; the layers run as an unrolled loop. XLA on CPU copies
  every dynamically indexed weight slice inside a scan, so this layout decodes faster there
  (measured on SmolLM2, 2-core CPU: ~15% at batch 1, ~30% at batch 16) at the price of a
  compile time that grows with depth (~3 s instead of ~1 s for 30 layers).

Both give the same results; pick per use (one-shot CLI runs: stacked; long runs on CPU: unstacked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dfloat11 import decompress_tree


def is_stacked(params: dict) -> bool:
    """True if `params["layers"]` is the stacked layout."""
    return not isinstance(params["layers"], (list, tuple))


def unstack_layers(params: dict) -> dict:
    """A copy of `params` with `layers` as a list of per-layer dicts (no-op if already unstacked)."""
    if not is_stacked(params):
        return params
    layers = params["layers"]
    count = jax.tree_util.tree_leaves(layers)[0].shape[0]
    per_layer = [jax.tree_util.tree_map(lambda x, i=i: x[i], layers) for i in range(count)]
    return {**params, "layers": per_layer}


def stack_layers(params: dict) -> dict:
    """A copy of `params` with `layers` stacked on a leading axis (no-op if already stacked)."""
    if is_stacked(params):
        return params
    return {**params, "layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params["layers"])}


def run_layers(layer_fn, carry, layers, per_layer: tuple = ()):
    """Apply `layer_fn(carry, (layer_params, index, *values)) -> carry` for every layer, in order.

    Stacked `layers` run under `lax.scan` (index and the `per_layer` values arrive as traced scalars);
    a list of per-layer dicts runs as an unrolled loop (index and values are Python numbers).
    `per_layer`: tuples holding one value per layer (e.g. sliding-window sizes).
    DFloat11 weights (`ssm_llm.compress.dfloat11`) are decoded as their layer starts.
    """
    if isinstance(layers, (list, tuple)):
        for index, layer in enumerate(layers):
            carry = layer_fn(carry, (decompress_tree(layer), index, *(values[index] for values in per_layer)))
        return carry
    count = jax.tree_util.tree_leaves(layers)[0].shape[0]
    xs = (layers, jnp.arange(count, dtype=jnp.int32), *(jnp.asarray(values) for values in per_layer))

    def step(c, x):
        return layer_fn(c, (decompress_tree(x[0]), *x[1:])), None

    carry, _ = jax.lax.scan(step, carry, xs)
    return carry


def run_layers_with_states(layer_fn, carry, states, layers):
    """Like `run_layers`, threading a per-layer state pytree `states` (leading axis L) through the layers.

    `layer_fn(carry, (layer_params, index), state) -> (carry, new_state)`. Returns `(carry, new_states)`
    with `new_states` stacked again. Layer i's state is read as input and written as output (scan
    `xs`/`ys`, or slices then one `stack` when unrolled) rather than updated inside a carried `[L, ...]`
    buffer: XLA copies the whole buffer for such a read-then-overwrite of a slice, which for state-space
    models (whose per-layer state is replaced wholesale each step) costs more than the weights' traffic.
    """
    if isinstance(layers, (list, tuple)):
        outputs = []
        for index, layer in enumerate(layers):
            state = jax.tree_util.tree_map(lambda s, i=index: s[i], states)
            carry, new = layer_fn(carry, (decompress_tree(layer), index), state)
            outputs.append(new)
        return carry, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)
    count = jax.tree_util.tree_leaves(layers)[0].shape[0]

    def step(c, x):
        layer, index, state = x
        return layer_fn(c, (decompress_tree(layer), index), state)

    return jax.lax.scan(step, carry, (layers, jnp.arange(count, dtype=jnp.int32), states))
