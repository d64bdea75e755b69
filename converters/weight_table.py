"""Strict conversion of named checkpoint tensors into a params pytree, driven by a mapping table.

A table maps each of our parameter names to `(source name, layout)`; per-layer names hold `{i}`.
Layouts: "same" (stored as ours), "linear" (stored `[out, in]`, ours `[in, out]`), "conv" (a
depthwise conv weight stored `[C, 1, K]`, ours `[C, K]`). A source is any mapping `name -> array`
(a dict, or a lazy reader over a file); tensors are fetched one at a time so a lazy source never
holds the whole checkpoint twice. Every parameter must be filled, every source tensor consumed and
every shape match, else ValueError naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

LAYOUTS = ("same", "linear", "conv")


def _stored_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return shape[::-1]
    if layout == "conv":
        return (shape[0], 1, shape[1])
    return shape


def fetch(source: Mapping, name: str, expected: tuple[int, ...], layout: str, dtype) -> np.ndarray:
    """Read tensor `name`, check it has the stored shape for our `expected` shape, convert to ours."""
    if name not in source:
        raise ValueError(f"checkpoint is missing tensor {name!r}")
    array = np.asarray(source[name])
    stored = _stored_shape(expected, layout)
    if array.shape != stored:
        raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {stored} for this config")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "V":
        raise ValueError(f"tensor {name!r} has non-float dtype {array.dtype}")
    array = array.T if layout == "linear" else array.reshape(expected)
    return np.ascontiguousarray(array.astype(dtype))


class TensorView(Mapping):
    """A view of `source` in which some tensors are reachable under new names only (`renames`: old name ->
    new name) and some not at all (`hidden`: names of the view that are converted elsewhere)."""

    def __init__(self, source: Mapping, renames: dict[str, str] | None = None, hidden=frozenset()):
        self._source, self._hidden = source, frozenset(hidden)
        self._to_source = {new: old for old, new in (renames or {}).items() if old in source}
        self._from_source = {old: new for new, old in self._to_source.items()}

    def __getitem__(self, name: str):
        if name in self._hidden or (name in self._from_source and name not in self._to_source):
            raise KeyError(name)
        return self._source[self._to_source.get(name, name)]

    def __contains__(self, name) -> bool:
        if name in self._hidden:
            return False
        return name in self._to_source or (name not in self._from_source and name in self._source)

    def __iter__(self) -> Iterator[str]:
        names = (self._from_source.get(name, name) for name in self._source)
        return (name for name in names if name not in self._hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def convert_weights(
    shapes: dict,
    global_table: dict,
    layer_table: dict,
    num_layers: int,
    source: Mapping,
    dtype=jnp.float32,
    progress: bool = False,
    *,
    tied: bool = False,
    ignored_suffixes: tuple[str, ...] = (),
    on_host: bool = False,
) -> dict:
    """Build params of `shapes` (with a stacked `layers` sub-dict) from `source` using the tables.

    tied: the output head is the embedding; a source tensor for the head (`global_table["lm_head"]`)
    is then accepted only if it equals the embedding. Source names ending in `ignored_suffixes` are
    non-parameter buffers and may be left unused. on_host: leave each param a numpy array in host memory
    (for placing it straight onto a mesh's devices) instead of a JAX array on the default device.
    """
    place = np.asarray if on_host else jnp.asarray
    np_dtype = np.dtype(jnp.dtype(dtype))
    consumed: set[str] = set()
    total = len(shapes) - 1 + len(shapes["layers"]) * num_layers
    bar = tqdm(total=total, desc="converting tensors", unit="tensor", disable=not progress)

    params: dict = {}
    for ours, shape in shapes.items():
        if ours == "layers":
            continue
        name, layout = global_table[ours]
        params[ours] = place(fetch(source, name, shape, layout, np_dtype))
        consumed.add(name)
        bar.update()

    layers = {}
    for ours, shape in shapes["layers"].items():
        template, layout = layer_table[ours]
        stacked = np.empty(shape, np_dtype)
        for i in range(num_layers):
            name = template.format(i=i)
            stacked[i] = fetch(source, name, shape[1:], layout, np_dtype)
            consumed.add(name)
            bar.update()
        layers[ours] = place(stacked)
    params["layers"] = layers
    bar.close()

    head = global_table["lm_head"][0]
    if tied and head in source:
        # transformers' state_dict() lists the tied head; accept it only if it really is the embedding.
        if not np.array_equal(np.asarray(source[head]).astype(np_dtype), np.asarray(params["embed"])):
            raise ValueError(f"tie_word_embeddings is set but tensor {head!r} differs from the embedding")
        consumed.add(head)
    unused = sorted(n for n in source.keys() if n not in consumed and not n.endswith(ignored_suffixes))
    if unused:
        shown = ", ".join(repr(n) for n in unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ValueError(f"checkpoint has {len(unused)} unused tensor(s) for this config: {shown}")
    return params
