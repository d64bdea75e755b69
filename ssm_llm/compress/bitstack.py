"""BitStack (Wang et al. 2024): one decomposition of the weights that serves any memory budget.

Each linear weight W [in, out] is scaled by its input activations' magnitudes (AWQ-style: W' = diag(s) W,
s_j the RMS of input channel j on calibration text, so errors on loud channels cost more), then peeled into
K residual blocks: with R_0 = W',

    block_k = sign(R_{k-1}) * (U_k V_k),   U_k V_k = the best rank-r approximation of |R_{k-1}|,
    R_k = R_{k-1} - block_k,

one sign bit per weight plus r (in + out) float16 numbers per block (about 1 bit per weight each). Loading the
first n blocks gives W ~ diag(1/s) sum_{k<=n} block_k. The blocks of all matrices form one sorted stack and a
memory budget loads its longest prefix: every matrix has its first block, then the paper's level-by-level order
(every matrix's second block before any third), within a level by the activation-weighted error the block
removes, ||diag(s) dW||_F^2 (the paper measures each block's effect on calibration perplexity instead, one
evaluation per matrix and level: 16 x 210 forwards for SmolLM2, out of reach on a CPU).

`bitstack(params, config, calibration)` decomposes; `load_budget(stack, params, bytes)` returns params with the
loaded weights (float, or with `packed=True` the blocks themselves, `ssm_llm.bitstack_weight.BitStackWeight`,
rebuilt inside each product) and the bytes they occupy in packed form, never above the budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ssm_llm.bitstack_weight import BitStackWeight, reconstruct
from ssm_llm.config import ModelConfig
from ssm_llm.layer_layout import stack_layers, unstack_layers
from ssm_llm.quant.attention_calibration import SITES, check_calibration, walk_layers
from ssm_llm.quant.quamba import linear_names as quamba_linears

TARGET_OVERHEAD_BITS = 0.125  # rank "auto": r (in + out) 16 bits ~ this many bits per weight (the paper: r=16 at 4096)


# Jitted once per (matrix shape, block count): called eagerly, `reconstruct`'s loop compiled anew at every call
# (~0.1 s each; `load_budget` of a 2-layer model took 1.7 s, of SmolLM2's 210 matrices minutes).
_rebuild = jax.jit(reconstruct)


@dataclasses.dataclass(frozen=True)
class MatrixStack:
    """One weight's residual blocks: signs uint8 [K, ceil(in * out / 8)] (bit-packed, 1 = negative), u float16
    [K, in, r], v float16 [K, r, out], scale float32 [in] (the activation scaling), the weight's shape, and the
    activation-weighted squared error left after each number of blocks, errors [K + 1] (errors[0]: no block)."""

    signs: np.ndarray
    u: np.ndarray
    v: np.ndarray
    scale: np.ndarray
    shape: tuple[int, int]
    errors: np.ndarray

    @property
    def blocks(self) -> int:
        return self.signs.shape[0]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: its packed signs and its float16 factors."""
        return int(self.signs[0].nbytes + self.u[0].nbytes + self.v[0].nbytes)

    @property
    def fixed_bytes(self) -> int:
        """Bytes stored once per matrix: the float16 scale."""
        return 2 * self.shape[0]

    def packed(self, blocks: int) -> BitStackWeight:
        """The first `blocks` blocks as they are stored, for `forward` to rebuild at each product."""
        return BitStackWeight(
            jnp.asarray(self.signs[:blocks]),
            jnp.asarray(self.u[:blocks]),
            jnp.asarray(self.v[:blocks]),
            jnp.asarray(self.scale, jnp.float16),
            self.shape,
        )

    def weight(self, blocks: int) -> np.ndarray:
        """W rebuilt from its first `blocks` blocks, float32 [in, out] (what `forward` rebuilds from `packed`)."""
        return np.asarray(_rebuild(self.packed(blocks)))


@dataclasses.dataclass(frozen=True)
class BitStack:
    """A decomposed model: {key: MatrixStack} (key = (layer, name)), and `order`, the (key, block count) steps
    a growing budget takes after every matrix's first block."""

    matrices: dict
    order: tuple

    def bytes_for(self, steps: int) -> int:
        """Packed bytes with every matrix's first block and the first `steps` steps of `order`."""
        base = sum(m.fixed_bytes + m.block_bytes for m in self.matrices.values())
        return base + sum(self.matrices[key].block_bytes for key, _ in self.order[:steps])

    @property
    def weights(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.matrices.values())


def rank_for(shape: tuple[int, int]) -> int:
    """The "auto" rank: r (in + out) 16 bits closest to TARGET_OVERHEAD_BITS per weight, at least 1."""
    rows, cols = shape
    return max(1, round(TARGET_OVERHEAD_BITS * rows * cols / (16 * (rows + cols))))


def decompose(w, scale, blocks: int, rank: int) -> MatrixStack:
    """`blocks` residual blocks of rank `rank` for w [in, out] scaled by `scale` [in] (see the module doc)."""
    w = np.asarray(w, np.float32)
    scale = np.asarray(scale, np.float16).astype(np.float32)  # stored (and counted) as float16
    residual = w.astype(np.float64) * scale[:, None]
    signs, us, vs, errors = [], [], [], [float(np.sum(residual**2))]
    for _ in range(blocks):
        negative = residual < 0
        left, sigma, right = np.linalg.svd(np.abs(residual), full_matrices=False)
        root = np.sqrt(sigma[:rank])
        u = (left[:, :rank] * root).astype(np.float16)
        v = (root[:, None] * right[:rank]).astype(np.float16)
        magnitude = u.astype(np.float64) @ v.astype(np.float64)  # what loading will rebuild
        residual = residual - np.where(negative, -magnitude, magnitude)
        signs.append(np.packbits(negative.reshape(-1)))
        us.append(u)
        vs.append(v)
        errors.append(float(np.sum(residual**2)))
    return MatrixStack(np.stack(signs), np.stack(us), np.stack(vs), scale, tuple(w.shape), np.array(errors))


def linear_names(config) -> tuple[str, ...]:
    """The weights of a layer that BitStack decomposes and mixed bit widths round: attention models' seven
    linears, Mamba families' projections (Quamba's list: A_log, D, conv taps and norms stay)."""
    if isinstance(config, ModelConfig):
        return tuple(name for names in SITES.values() for name in names)
    return quamba_linears(config)


def _input_scales(params, config: ModelConfig, tokens, progress: bool) -> list[dict]:
    """Per layer {linear name: RMS of its input channels} [in] on `tokens`, layer by layer through the original
    model (small floor: a silent channel's weights still decompose)."""
    rows = tokens.shape[0] * tokens.shape[1]
    walk = walk_layers(params, config, tokens, hessians=True)
    out = []
    for _, _, stats in tqdm(walk, total=config.num_layers, desc="bitstack scales", disable=not progress, leave=False):
        scales = {}
        for site, names in SITES.items():
            rms = np.sqrt(np.diag(np.asarray(stats[site]["xtx"], np.float64)) / rows)
            for name in names:
                scales[name] = (rms + 1e-3 * rms.mean() + 1e-12).astype(np.float32)
        out.append(scales)
    return out


def bitstack(params: dict, config, calibration=None, blocks: int = 16, rank="auto", progress: bool = True) -> BitStack:
    """Decompose every linear weight of `params` into `blocks` residual blocks (see the module doc).

    calibration: token ids [B, T] of real text for the activation-aware scaling (attention models); None
    decomposes the weights as they are (the paper's ablation; the only choice for Mamba families so far).
    rank: the rank of each block's magnitude, or "auto" (`rank_for`: about 0.125 bit per weight of factors)."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"bitstack: blocks must be a positive int, got {blocks!r}")
    if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"bitstack: rank must be a positive int or 'auto', got {rank!r}")
    if calibration is not None and not isinstance(config, ModelConfig):
        raise ValueError("bitstack: activation-aware scaling (calibration=) covers attention models; pass None")
    layers = unstack_layers(params)["layers"]
    scales = None
    if calibration is not None:
        scales = _input_scales(params, config, check_calibration(calibration, config.vocab_size), progress)
    matrices = {}
    names = linear_names(config)
    steps = tqdm(total=len(layers) * len(names), desc="bitstack", disable=not progress, leave=False)
    for i, layer in enumerate(layers):
        for name in names:
            w = np.asarray(layer[name], np.float32)
            s = scales[i][name] if scales is not None else np.ones(w.shape[0], np.float32)
            matrices[i, name] = decompose(w, s, blocks, rank_for(w.shape) if rank == "auto" else min(rank, *w.shape))
            steps.update()
    steps.close()
    order = []
    for level in range(2, blocks + 1):  # level by level; within one, the largest error removed first
        gains = [(m.errors[level - 1] - m.errors[level], key) for key, m in matrices.items()]
        order.extend((key, level) for _, key in sorted(gains, key=lambda g: -g[0]))
    return BitStack(matrices, tuple(order))


def load_budget(stack: BitStack, params: dict, budget: int, dtype=None, packed: bool = False) -> tuple[dict, dict]:
    """`params` with every decomposed weight rebuilt from as many blocks as `budget` bytes of packed blocks allow
    (the longest prefix of the stack's order; every matrix has at least one block). Returns (params in the
    stacked layout, {"bytes": bytes used (<= budget), "bits_per_weight", "blocks": {key: count}}). Raises
    ValueError when the budget is below one block per matrix.

    packed: keep the loaded blocks packed (`BitStackWeight`: the memory the budget counts) and rebuild each
    weight inside the product that reads it; the layers then come as a list (block counts differ per matrix)."""
    if not isinstance(packed, bool):
        raise ValueError(f"load_budget: packed must be True or False, got {packed!r}")
    floor = stack.bytes_for(0)
    if budget < floor:
        raise ValueError(f"load_budget: {budget} bytes is below one block per matrix ({floor} bytes)")
    used = floor + np.cumsum([0] + [stack.matrices[key].block_bytes for key, _ in stack.order])
    steps = int(np.searchsorted(used, budget, side="right")) - 1  # the longest prefix that fits
    counts = dict.fromkeys(stack.matrices, 1)
    for key, level in stack.order[:steps]:
        counts[key] = level
    layers = [dict(layer) for layer in unstack_layers(params)["layers"]]
    for (i, name), matrix in stack.matrices.items():
        if packed:
            layers[i][name] = matrix.packed(counts[i, name])
            continue
        target = dtype or layers[i][name].dtype
        layers[i][name] = jnp.asarray(matrix.weight(counts[i, name]), target)
    loaded = {**params, "layers": layers}
    return loaded if packed else stack_layers(loaded), {
        "bytes": int(used[steps]),
        "bits_per_weight": 8 * int(used[steps]) / stack.weights,
        "blocks": counts,
    }
