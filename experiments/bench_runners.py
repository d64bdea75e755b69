"""What the benchmark scripts share: the machine description for their JSON, and the two runners
timed side by side (ssm_llm's `generate` and transformers' `generate`), each returning
`(wall seconds, new tokens per sequence)` for a batch of equal-length prompts, greedy, no EOS stop."""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import torch

import ssm_llm
from ssm_llm.cpu_features import host_cpu


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of `tree` (a QuantizedWeight's leaves: its integer values, scales, offsets)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def machine_info() -> dict:
    """CPU model and its int8-dot / bfloat16 flags, core count and library versions, for the results JSON."""
    import transformers

    return {
        **host_cpu().as_json(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


class Ours:
    """ssm_llm end to end; `last_split` keeps the last call's own prefill / decode seconds."""

    def __init__(self, params, config, name):
        self.params, self.config, self.name = params, config, name

    def generate(self, prompts, n):
        gen = ssm_llm.GenerationConfig(max_new_tokens=n, eos_token_ids=())
        start = time.perf_counter()
        out = ssm_llm.generate(self.params, self.config, prompts, gen)
        elapsed = time.perf_counter() - start
        assert all(len(t) == n for t in out.tokens)
        self.last_split = {"prefill_s": out.prefill_seconds, "decode_s": out.decode_seconds}
        return elapsed, out.tokens


class Peer:
    """transformers' `generate` on a torch model."""

    name = "transformers"

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def generate(self, prompts, n):
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        start = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - start
        tokens = out[:, ids.shape[1] :].tolist()
        assert all(len(t) == n for t in tokens)
        return elapsed, tokens


def speedup_bars(ax, summary: dict, labels: list[str]) -> None:
    """Horizontal bars on `ax`: for each case label, every runner's `<name>_speedup` over transformers."""
    names = [k[: -len("_speedup")] for k in summary[labels[0]] if k.endswith("_speedup")]
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        ratios = [summary[k][f"{name}_speedup"] for k in labels]
        ys = [i + j * height for i in range(len(labels))]
        ax.barh(ys, ratios, height=height, label=name)
        for y, r in zip(ys, ratios, strict=True):
            ax.text(r, y, f" {r:.2f}x", va="center", fontsize=8)
    ax.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(labels))], labels)
    ax.axvline(1.0, color="gray", linestyle="--")
    ax.set_xlabel("speed-up over transformers (x)")
