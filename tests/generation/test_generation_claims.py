"""Claims of the README that no other test checks end to end: the CLI's `--kv-compression`,
`generate(impl=...)`, and StreamingLLM generating past the model's context with original positions and a
distance ceiling, against a numpy model."""

import jax
import numpy as np
from spec_checks import wide_params

import ssm_llm
from ssm_llm.kv import StreamingLLM
from ssm_llm.kv.policy import rope_frequencies


def spy_cli_generate(smollm2, monkeypatch, record):
    """The CLI module with the session's SmolLM2 as its load and `generate` wrapped: each call appends
    `record(params, gen_config)` to the returned list, then generates."""
    import ssm_llm_cli as cli
    from ssm_llm import generation

    config, params, _, _ = smollm2
    monkeypatch.setattr(cli, "_load", lambda *args, **options: (config, params))
    seen, real = [], generation.generate

    def spy(params, config, prompts, gen_config, **kw):
        seen.append(record(params, gen_config))
        return real(params, config, prompts, gen_config, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    return cli, seen


def test_cli_generate_with_kv_compression(smollm2, monkeypatch, capsys):
    """`ssm-llm generate --kv-compression SPEC` in-process on SmolLM2: the spec is parsed, the policy reaches
    `generate`, text comes out. The load is the session's (the CLI's own load is covered in test_smollm2.py)."""
    cli, policies = spy_cli_generate(smollm2, monkeypatch, lambda params, gen: gen.kv_compression)
    code = cli.main(
        [
            "generate",
            "--prompt",
            "The history of the printing press",
            "--max-new-tokens",
            "4",
            "--kv-compression",
            "streamingllm:budget=32",
            "--no-stream",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() and "4 new (length)" in err
    assert policies == [StreamingLLM(budget=32)]


def test_cli_generate_with_sparse_prefill(smollm2, monkeypatch, capsys):
    """`ssm-llm generate --sparse-prefill SPEC`: the spec is parsed into an MInference that reaches `generate`;
    an unknown method is refused by name."""
    from ssm_llm.kv import MInference

    cli, seen = spy_cli_generate(smollm2, monkeypatch, lambda params, gen: gen.sparse_prefill)
    argv = ["generate", "--prompt", "The history of the printing press", "--max-new-tokens", "4", "--no-stream"]
    code = cli.main([*argv, "--sparse-prefill", "minference:block=16,blocks=1,columns=4,dense_layers=(0,)"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() and seen == [MInference(block=16, blocks=1, columns=4, dense_layers=(0,))]
    assert cli.main([*argv, "--sparse-prefill", "flashprefill"]) != 0
    assert "unknown sparse prefill method 'flashprefill'; choose one of ['minference']" in capsys.readouterr().err


def test_cli_generate_with_unrolled_layers(smollm2, monkeypatch, capsys):
    """`--layers unrolled` hands `generate` one dict per layer (`unstack_layers`) and prints the same greedy
    text as the stacked layout."""
    cli, layouts = spy_cli_generate(smollm2, monkeypatch, lambda params, gen: type(params["layers"]).__name__)
    texts = []
    for layout in ("stacked", "unrolled"):
        argv = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--no-stream"]
        assert cli.main([*argv, "--layers", layout]) == 0
        texts.append(capsys.readouterr().out)
    assert layouts == ["dict", "list"] and texts[0] == texts[1] and texts[0].strip()


def test_cli_generate_with_a_constraint_and_with_beams(smollm2, monkeypatch, capsys, tmp_path):
    """`--regex` / `--json-schema FILE` reach `generate` as compiled constraints and the printed text follows them,
    also with `--speculative forced_tokens`; `--num-beams` runs beam search; two kinds of constraint at once, and
    forced tokens without a constraint, are refused before the model loads."""
    import json
    import re

    cli, seen = spy_cli_generate(smollm2, monkeypatch, lambda params, gen: (gen.constraint, gen.num_beams))
    argv = ["generate", "--prompt", "The phone number is", "--max-new-tokens", "12", "--no-stream"]
    assert cli.main([*argv, "--regex", "[0-9]{3}-[0-9]{4}"]) == 0
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", capsys.readouterr().out.strip())
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
        )
    )
    assert cli.main([*argv, "--json-schema", str(schema)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) in ({"ok": True}, {"ok": False}), printed
    assert cli.main([*argv, "--json-schema", str(schema), "--speculative", "forced_tokens"]) == 0
    assert capsys.readouterr().out == printed  # the grammar's forced tokens as drafts: the same text
    assert cli.main([*argv, "--num-beams", "3"]) == 0 and capsys.readouterr().out.strip()
    assert [type(c).__name__ for c, _ in seen] == ["Regex", "JSONSchema", "JSONSchema", "NoneType"]
    assert seen[3][1] == 3
    assert cli.main([*argv, "--speculative", "forced_tokens"]) != 0
    assert "drafts what a constraint forces" in capsys.readouterr().err
    assert cli.main([*argv, "--regex", "a", "--grammar", 'start: "a"']) != 0
    assert "three kinds of constraint: give one" in capsys.readouterr().err
    assert cli.main([*argv, "--json-schema", str(tmp_path / "missing.json")]) != 0
    assert "is neither a file nor a JSON schema's text" in capsys.readouterr().err


TINY = ssm_llm.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=32,
)


def test_generate_impl_interpret_equals_xla():
    """The Pallas kernels (interpreted) and the XLA references give the same greedy tokens through
    `generate`: ragged prefill (flash attention) and decode steps (cache attention)."""
    params = wide_params(TINY, seed=1)
    prompts = [[3, 14, 15, 9, 26, 5], [35, 8]]
    gen = ssm_llm.GenerationConfig(max_new_tokens=3)
    xla = ssm_llm.generate(params, TINY, prompts, gen, impl="xla")
    interpret = ssm_llm.generate(params, TINY, prompts, gen, impl="interpret")
    assert interpret.tokens == xla.tokens and [len(t) for t in xla.tokens] == [3, 3]


def numpy_logits(params, config, tokens, visible, key_position):
    """float64 logits [T, V] of a Llama model over one sequence, token t attending to the earlier tokens
    `visible(t)` (an index array, itself included), each key rotated at `key_position(t, s)`."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    inv_freq = rope_frequencies(config).astype(np.float64)
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.rms_norm_eps)

    def rope(x, pos):  # x: [..., D] at integer position(s) pos
        angles = np.asarray(pos, np.float64)[..., None] * inv_freq
        x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
        cos, sin = np.cos(angles), np.sin(angles)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = p["embed"][np.asarray(tokens)]
    for i in range(config.num_layers):
        w = {k: v[i] for k, v in p["layers"].items()}
        x = norm(h, w["attn_norm"])
        q = (x @ w["wq"]).reshape(len(tokens), heads, dim)
        k = (x @ w["wk"]).reshape(len(tokens), kv_heads, dim)
        v = (x @ w["wv"]).reshape(len(tokens), kv_heads, dim)
        out = np.zeros_like(q)
        for t in range(len(tokens)):
            seen = visible(t)
            keys = rope(k[seen].transpose(1, 0, 2), [key_position(t, s) for s in seen])  # [Hkv, S, D]
            for head in range(heads):
                scores = keys[head * kv_heads // heads] @ rope(q[t, head], t) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[t, head] = weights / weights.sum() @ v[seen, head * kv_heads // heads]
        h = h + out.reshape(len(tokens), -1) @ w["wo"]
        x = norm(h, w["mlp_norm"])
        gate = x @ w["w_gate"]
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w["w_up"])) @ w["w_down"]
    return norm(h, p["final_norm"]) @ p["lm_head"]


def test_streaming_original_positions_with_a_distance_ceiling_past_the_context():
    """A 32-position model writes 48 tokens per row (to position 57) with StreamingLLM(positions="original",
    distance_ceiling=8): every token equals a numpy model's greedy choice, where the prompt attends fully
    and each decoded token to the sinks and the latest window, keys at most 8 positions away."""
    budget, sinks, ceiling = 12, 2, 8
    params = wide_params(TINY, seed=0)
    prompts = [[7, 1, 40, 22, 9, 13, 60, 2, 31, 5], [44, 12, 3, 18, 50]]
    policy = StreamingLLM(budget=budget, sinks=sinks, positions="original", distance_ceiling=ceiling)
    out = ssm_llm.generate(params, TINY, prompts, ssm_llm.GenerationConfig(max_new_tokens=48, kv_compression=policy))
    for prompt, new in zip(prompts, out.tokens, strict=True):
        assert len(new) == 48
        n = len(prompt)

        def visible(t, n=n):  # the prompt: causal; decoded tokens: the sinks and the latest budget - sinks tokens
            return np.arange(t + 1) if t < n else np.r_[0:sinks, max(sinks, t - (budget - sinks) + 1) : t + 1]

        def capped(t, s, n=n):
            return t - min(t - s, ceiling) if t >= n else s

        # Greedy choices are >= 2.8e-3 apart in logits (float32 errors are ~1e-5).
        want = numpy_logits(params, TINY, prompt + new, visible, capped)[n - 1 : -1].argmax(-1)
        np.testing.assert_array_equal(new, want)
        # The ceiling matters: uncapped distances would choose other tokens.
        uncapped = numpy_logits(params, TINY, prompt + new, visible, lambda t, s: s)[n - 1 : -1].argmax(-1)
        assert (uncapped != new).any()


def test_cli_generate_reads_the_context_twice(smollm2, monkeypatch, capsys, tmp_path):
    """`--read-twice FILE_OR_TEXT`: `generate` receives the tokens of `jrt.read_twice(context, prompt)`, from a
    file or from the text itself; an empty context is refused before the model loads."""
    from ssm_llm import generation, jrt

    cli, _ = spy_cli_generate(smollm2, monkeypatch, lambda params, gen: None)
    prompts, inner = [], generation.generate

    def record(params, config, batch, gen_config, **kw):
        prompts.append(list(batch[0]))
        return inner(params, config, batch, gen_config, **kw)

    monkeypatch.setattr(generation, "generate", record)
    context, question = "Ann lives in Oslo. Bob lives in Rome.", "Where does Bob live?"
    path = tmp_path / "context.txt"
    path.write_text(context)
    argv = ["generate", "--prompt", question, "--max-new-tokens", "2", "--no-stream"]
    assert cli.main([*argv, "--read-twice", str(path)]) == 0
    assert cli.main([*argv, "--read-twice", context]) == 0
    expected = smollm2[2](jrt.read_twice(context, question)).input_ids
    assert prompts == [expected, expected], capsys.readouterr().err
    assert cli.main([*argv, "--read-twice", " "]) != 0
    assert "--read-twice: the context is empty" in capsys.readouterr().err
