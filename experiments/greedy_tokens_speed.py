"""Time of `ssm_llm.sampling.greedy_tokens` against `jnp.argmax` over SmolLM2's 49152 logits, at 1 and 16 rows,
each fused after an elementwise producer as in a decode step (best of 5 x 300 calls, one process).

    python experiments/greedy_tokens_speed.py   # -> results/greedy_tokens_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_runners import machine_info

from ssm_llm.sampling import greedy_tokens

RESULTS = Path(__file__).parent / "results"


def best_ms(fn, x, calls: int = 300) -> float:
    fn(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(x)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / calls)
    return min(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--out", type=Path, default=RESULTS / "greedy_tokens_speed.json")
    args = parser.parse_args()
    rows = {}
    for batch in (1, 16):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, args.vocab)), jnp.float32)
        ours = jax.jit(lambda x: greedy_tokens(x * 1.5 + 0.25))
        argmax = jax.jit(lambda x: jnp.argmax(x * 1.5 + 0.25, axis=-1).astype(jnp.int32))
        assert (np.asarray(ours(x)) == np.asarray(argmax(x))).all()
        rows[f"{batch} rows"] = {"greedy_tokens_ms": best_ms(ours, x), "argmax_ms": best_ms(argmax, x)}
        print(
            f"{batch:>2} rows: greedy_tokens {rows[f'{batch} rows']['greedy_tokens_ms']:.3f} ms, "
            f"jnp.argmax {rows[f'{batch} rows']['argmax_ms']:.3f} ms"
        )
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "vocab": args.vocab, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
