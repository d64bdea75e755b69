"""The serving engine against `generate` of each request alone: random arrival schedules (requests joining
mid-flight, ragged prompts, shared prefixes, a cancellation, preemption under a small page pool) on tiny
Llama, Qwen2 with a sliding-window layer, Mamba-1 and Mamba-2, and SmolLM2; bounded compilations; sampled
requests reproducible whatever else runs; bad requests refused alone."""

import dataclasses

import jax
import numpy as np
import pytest

import ssm_llm
from ssm_llm.serving import COMPILATIONS, Engine

MODELS = {
    "llama": ssm_llm.ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8
    ),
    "qwen2-window": ssm_llm.ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qkv_bias=True,
        model_type="qwen2",
        layer_windows=(0, 5),
    ),
    "mamba1": ssm_llm.MambaConfig(
        vocab_size=128, hidden_size=64, num_layers=2, state_size=16, intermediate_size=128, time_step_rank=8
    ),
    "mamba2": ssm_llm.Mamba2Config(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        state_size=16,
        intermediate_size=128,
        num_heads=8,
        head_dim=16,
        n_groups=2,
        chunk_size=8,
    ),
}


def workload(rng, vocab: int, count: int):
    """Ragged prompts, a third of them extending an earlier prompt's first 9-20 tokens (shared prefixes)."""
    prompts = []
    for i in range(count):
        prompt = rng.integers(0, vocab, rng.integers(1, 36)).tolist()
        if i >= 2 and rng.random() < 0.35:
            base = prompts[rng.integers(0, i)]
            prompt = base[: rng.integers(9, 21)] + prompt[:6]
        prompts.append(prompt)
    return prompts


def alone(params, config, prompt, gen_config):
    return ssm_llm.generate(params, config, [prompt], gen_config).tokens[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_random_schedules_give_each_request_its_own_output(name):
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    prompts = workload(rng, config.vocab_size, 12)
    configs = [ssm_llm.GenerationConfig(max_new_tokens=int(rng.integers(1, 12)), eos_token_ids=()) for _ in prompts]
    # One request stops at an EOS: the token `generate` would give third.
    third = alone(params, config, prompts[3], ssm_llm.GenerationConfig(max_new_tokens=3, eos_token_ids=()))[2]
    configs[3] = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=(third,))
    engine = Engine(params, config, max_slots=4, page_size=4, num_pages=20, max_len=64, chunk=8)
    outputs, reasons, rids = {}, {}, []
    cancel_at = None
    for i, (prompt, gen_config) in enumerate(zip(prompts, configs, strict=True)):
        rids.append(engine.submit(prompt, gen_config))
        for _ in range(int(rng.integers(0, 3))):  # requests join while others run
            for event in engine.step():
                outputs.setdefault(event.rid, []).extend(event.new_token_ids)
                if event.finished:
                    reasons[event.rid] = event.finish_reason
        if i == 6:
            cancel_at = rids[5]
            engine.cancel(cancel_at)
    steps = 0
    while engine.has_work():
        for event in engine.step():
            outputs.setdefault(event.rid, []).extend(event.new_token_ids)
            if event.finished:
                reasons[event.rid] = event.finish_reason
        steps += 1
        assert steps < 500
    assert reasons[cancel_at] == "cancelled"
    for rid, prompt, gen_config in zip(rids, prompts, configs, strict=True):
        if rid == cancel_at:
            continue
        assert outputs.get(rid, []) == alone(params, config, prompt, gen_config), rid
        assert reasons[rid] == ("eos" if rid == rids[3] else "length")
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["prefix_cache_hit_tokens"] > 0  # shared pages, or Mamba states snapshotted at page boundaries
    if isinstance(config, ssm_llm.ModelConfig):
        assert stats["pages_used"] == 0  # every page released (cached prefix pages count as free)
        assert stats["preemptions"] > 0  # 20 pages of 4 tokens for 4 slots: the pool runs out


def test_steady_state_compiles_nothing_new():
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    engine = Engine(params, config, max_slots=3, page_size=4, max_len=48, chunk=8)
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=4, eos_token_ids=())

    def workload(seed):
        rng = np.random.default_rng(seed)
        for _ in range(6):
            engine.submit(rng.integers(0, 128, rng.integers(1, 40)).tolist(), gen_config)
        engine.run()

    start = COMPILATIONS["step"]
    for seed in range(2, 7):
        workload(seed)
    compiled = COMPILATIONS["step"] - start
    # decode pass or not x prefill rows none / 1 / 2 x attended pages 1, 2, 4, 8, 12 (less both absent)
    assert engine.programs() == 25
    assert 2 <= compiled <= engine.programs()
    workload(2)  # the same traffic again: every shape is compiled already
    workload(5)
    assert COMPILATIONS["step"] - start == compiled


def test_sampled_requests_do_not_depend_on_other_traffic():
    config = MODELS["qwen2-window"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    sampled = ssm_llm.GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, eos_token_ids=())
    prompt = list(range(3, 20))

    def run(others: int, seed: int = 7):
        engine = Engine(params, config, max_slots=4, page_size=4, max_len=48, chunk=8)
        rng = np.random.default_rng(others)
        for _ in range(others):
            engine.submit(rng.integers(0, 128, 9).tolist(), ssm_llm.GenerationConfig(max_new_tokens=5, temperature=0.7))
        rid = engine.submit(prompt, sampled.__class__(**{**sampled.__dict__, "seed": seed}))
        return engine.run()[rid]

    alone_tokens = run(0)
    assert run(3) == alone_tokens and run(5) == alone_tokens
    assert run(0, seed=8) != alone_tokens


def test_bad_requests_fail_alone_and_the_engine_keeps_serving():
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    engine = Engine(params, config, max_slots=2, page_size=4, num_pages=6, max_len=32, chunk=8)
    good = ssm_llm.GenerationConfig(max_new_tokens=3, eos_token_ids=())
    rid = engine.submit([1, 2, 3], good)
    with pytest.raises(ValueError, match="exceeds the engine's max_len of 32"):
        engine.submit(list(range(40)), good)
    with pytest.raises(ValueError, match="need 7 pages; the pool holds 6"):
        engine.submit(list(range(25)), good)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 500], good)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], good)
    with pytest.raises(TypeError, match="GenerationConfig"):
        engine.submit([1, 2], {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="needs positions='original'"):
        engine.submit([1, 2], ssm_llm.GenerationConfig(kv_compression=ssm_llm.kv.StreamingLLM(budget=8)))
    assert engine.run() == {rid: alone(params, config, [1, 2, 3], good)}
    assert not engine.cancel(rid)  # finished: nothing to cancel
    with pytest.raises(ValueError, match="max_len 4096 exceeds the model's context"):
        Engine(params, ssm_llm.ModelConfig(**{**config.__dict__, "max_position_embeddings": 64}), max_len=4096)


@pytest.mark.parametrize("name", ["llama", "mamba2"])
@pytest.mark.parametrize("how", ["raises", "consumes the cache"])
def test_a_request_that_breaks_the_step_fails_alone(monkeypatch, name, how):
    """A step that fails whenever one request's token is fed (before running, or after its donated cache is
    gone): that request fails with "error" by itself; the others still give `generate`'s tokens."""
    import ssm_llm.serving.engine as engine_module

    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(5)
    good = [rng.integers(0, 128, rng.integers(3, 20)).tolist() for _ in range(5)]
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=5, eos_token_ids=())
    expected = [alone(params, config, p, gen_config) for p in good]
    poison = min(set(range(1, 128)) - {t for seq in good + expected for t in seq})  # fed by one request only
    real = engine_module._step

    def broken(params, config, state, decode, prefill, *rest):
        fed = [np.asarray(r.tokens) for r in (decode, prefill) if r is not None]
        if any((t == poison).any() for t in fed):
            if how == "consumes the cache":
                jax.tree.map(lambda x: x.delete(), state)
            raise FloatingPointError("poisoned")
        return real(params, config, state, decode, prefill, *rest)

    monkeypatch.setattr(engine_module, "_step", broken)
    engine = Engine(params, config, max_slots=3, page_size=4, max_len=48, chunk=8)
    rids = [engine.submit(p, gen_config) for p in good[:2]]
    bad = engine.submit(good[2][:2] + [poison] + good[2][2:], gen_config)
    rids += [engine.submit(p, gen_config) for p in good[2:]]
    out = engine.run()
    assert [out[rid] for rid in rids] == expected
    assert bad not in out and engine.errors[bad] == "FloatingPointError: poisoned"
    assert engine.stats()["failed_steps"] >= 2  # with the others, then alone
    assert engine.stats()["running"] == engine.stats()["waiting"] == engine.stats()["pages_used"] == 0


@pytest.mark.parametrize("name", ["llama", "mamba1"])
def test_logprobs_are_the_models_log_softmax(name):
    """Each token's log-probability and its top alternatives equal the log-softmax of a plain forward over
    prompt + output, for greedy and sampled requests running together."""
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    prompts = [[5, 9, 14, 2], [7, 7, 1, 30, 31, 32, 3, 8, 9]]
    configs = [
        ssm_llm.GenerationConfig(max_new_tokens=5, eos_token_ids=()),
        ssm_llm.GenerationConfig(max_new_tokens=5, eos_token_ids=(), temperature=1.5, seed=3),
    ]
    engine = Engine(params, config, max_slots=2, page_size=4, max_len=32, chunk=8)
    rids = [engine.submit(p, c, logprobs=k) for p, c, k in zip(prompts, configs, (3, 0), strict=True)]
    plain = engine.submit(prompts[0], configs[0])
    scored = {}
    while engine.has_work():
        for event in engine.step():
            rid, new_ids, _, _ = event  # an event still unpacks as its four fields
            assert (event.logprobs is None) == (rid == plain or not new_ids)
            if event.logprobs is not None:
                scored.setdefault(event.rid, []).extend(zip(event.new_token_ids, event.logprobs, strict=True))
    for rid, prompt, k in zip(rids, prompts, (3, 0), strict=True):
        tokens = prompt + [t for t, _ in scored[rid]]
        cache = ssm_llm.init_cache(config, 1, len(tokens))
        logits, _ = ssm_llm.forward(params, config, jax.numpy.asarray([tokens]), cache)
        table = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1 : -1]))
        for row, (token, lp) in zip(table, scored[rid], strict=True):
            np.testing.assert_allclose(lp.logprob, row[token], atol=2e-5)
            assert [i for i, _ in lp.top] == np.argsort(-row)[:k].tolist()
            np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:k], atol=2e-5)
    with pytest.raises(ValueError, match="at most 5 alternatives"):
        engine.submit([1], configs[0], logprobs=6)


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_mamba_prompts_start_from_snapshotted_prefix_states(name):
    """A shared 21-token prefix: later requests start from the state after its 20 first tokens (the last page
    boundary), kept while other prompts' snapshots push older ones out of a store of three (least recently
    used first), and give `generate`'s tokens."""
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(11)
    system = rng.integers(0, 128, 21).tolist()
    prompts = [system + rng.integers(0, 128, k).tolist() for k in (0, 3, 1, 6)]
    others = [rng.integers(0, 128, 9).tolist() for _ in range(3)]  # one snapshot each, between them
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=4, eos_token_ids=())
    engine = Engine(params, config, max_slots=2, page_size=4, max_len=64, chunk=8, num_snapshots=3)
    outputs = {}
    for prompt, other in zip(prompts, others + [None], strict=True):
        rid = engine.submit(prompt, gen_config)
        outputs.update(engine.run())
        assert outputs[rid] == alone(params, config, prompt, gen_config)
        if other is not None:
            engine.run_batch([other], gen_config)  # its snapshot at 8 evicts the least recently used one
    assert engine.stats()["prefix_cache_hit_tokens"] == 3 * 20
    assert engine.stats()["state_snapshots"] == 3


def test_int8_pages_keep_each_request_independent_of_the_others():
    """With int8 pages, a random schedule (shared prefixes, preemption) gives every request what the same
    engine gives it alone; the pool takes under a third of float32's bytes."""
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(4)
    prompts = workload(rng, config.vocab_size, 8)
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=())
    options = dict(max_slots=3, page_size=4, num_pages=12, max_len=48, chunk=8)
    engine = Engine(params, config, page_dtype="int8", **options)
    rids = [engine.submit(p, gen_config) for p in prompts]
    out = engine.run()
    assert engine.stats()["preemptions"] > 0 and engine.stats()["prefix_cache_hit_tokens"] > 0, engine.stats()
    for rid, prompt in zip(rids, prompts, strict=True):
        assert out[rid] == Engine(params, config, page_dtype="int8", **options).run_batch([prompt], gen_config)[0]
    float_bytes = Engine(params, config, **options).stats()["cache_bytes"]
    assert engine.stats()["cache_bytes"] < float_bytes / 2.5  # head_dim 8: 8 int8 + one float32 scale vs 32
    with pytest.raises(ValueError, match="page_dtype is for attention models"):
        Engine(ssm_llm.init_params(MODELS["mamba1"], jax.random.key(0)), MODELS["mamba1"], page_dtype="int8")


@pytest.mark.parametrize("name", ["llama", "qwen2-window"])
def test_streaming_llm_requests_get_generates_output_in_a_few_pages(name):
    """StreamingLLM(positions="original") requests among plain ones, under a small pool (preemption) with
    shared prefixes: each gets what `generate` with the same policy gives it alone (the policy changes their
    output), and once its prompt is in, a streaming request holds only the pages of its sinks and window."""
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(3)
    prompts = workload(rng, config.vocab_size, 10)
    policy = ssm_llm.kv.StreamingLLM(budget=10, sinks=3, positions="original")  # a window of 7
    configs = [
        ssm_llm.GenerationConfig(
            max_new_tokens=int(rng.integers(10, 28)), eos_token_ids=(), kv_compression=policy if i % 2 == 0 else None
        )
        for i in range(len(prompts))
    ]
    engine = Engine(params, config, max_slots=4, page_size=4, num_pages=24, max_len=64, chunk=8)
    rids = [engine.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
    outputs, most_held, longest = {}, 0, 0
    for _ in range(500):
        if not engine.has_work():
            break
        for event in engine.step():
            outputs.setdefault(event.rid, []).extend(event.new_token_ids)
        for request in engine.requests.values():
            if request.streaming is not None and request.slot is not None and request.computed > len(request.prompt):
                most_held = max(most_held, sum(page >= 0 for page in request.pages))
                longest = max(longest, request.computed)
    changed = 0
    for rid, prompt, gen_config in zip(rids, prompts, configs, strict=True):
        assert outputs[rid] == alone(params, config, prompt, gen_config), rid
        if gen_config.kv_compression is not None:
            plain = dataclasses.replace(gen_config, kv_compression=None)
            changed += outputs[rid] != alone(params, config, prompt, plain)
    assert changed > 0
    # One page for the 3 sinks, at most 3 for the 6 positions before the next one (window 7); 40+ positions held.
    assert most_held <= 4 and longest >= 40, (most_held, longest)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0 and stats["pages_used"] == 0, stats


def test_a_preempted_streaming_request_comes_back_and_ignores_full_attention_pages():
    """A preempted StreamingLLM request is readmitted by the chunk it will feed (up to its prompt's end), not by
    its whole prompt + output, which may pass the pool (it used to wait forever with every page free); and its
    prefix match stops at its prompt: another request's pages computed with full attention over the same
    prompt + output must not stand in for tokens it computed with its mask."""
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    policy = ssm_llm.kv.StreamingLLM(8, sinks=2, positions="original")
    streaming = ssm_llm.GenerationConfig(max_new_tokens=30, eos_token_ids=(), kv_compression=policy)
    plain = ssm_llm.GenerationConfig(max_new_tokens=25, eos_token_ids=())
    prompt = list(range(3, 27))
    engine = Engine(params, config, max_slots=2, page_size=4, num_pages=8, max_len=64)
    first, second = engine.submit([1], plain), engine.submit(prompt, streaming)
    out = engine.run(max_steps=300)
    assert engine.stats()["preemptions"] > 0 and not engine.has_work()
    assert out[first] == alone(params, config, [1], plain)
    assert out[second] == alone(params, config, prompt, streaming)

    # The older request's prompt is the streaming one's prompt and first 16 outputs: when the streaming one is
    # preempted (after ~20 outputs) and readmitted, those 10 full-attention pages are in the prefix cache.
    want = out[second]
    engine = Engine(params, config, max_slots=2, page_size=4, num_pages=18, max_len=80)
    older = ssm_llm.GenerationConfig(max_new_tokens=30, eos_token_ids=())
    first, second = engine.submit(prompt + want[:16], older), engine.submit(prompt, streaming)
    out = engine.run(max_steps=300)
    assert engine.stats()["preemptions"] > 0
    assert out[first] == alone(params, config, prompt + want[:16], older)
    assert out[second] == want


def test_kv_policies_the_pages_cannot_run_are_refused():
    config = MODELS["llama"]
    engine = Engine(ssm_llm.init_params(config, jax.random.key(0)), config, max_len=64)
    with pytest.raises(ValueError, match="runs one KV policy, StreamingLLM"):
        engine.submit([1, 2, 3], ssm_llm.GenerationConfig(kv_compression=ssm_llm.kv.SnapKV(budget=16, window=4)))
    with pytest.raises(ValueError, match="needs positions='original'"):
        engine.submit([1, 2, 3], ssm_llm.GenerationConfig(kv_compression=ssm_llm.kv.StreamingLLM(budget=16)))
    with pytest.raises(ValueError, match="sparse_prefill \\(MInference\\) needs the whole prompt at once"):
        engine.submit([1, 2, 3], ssm_llm.GenerationConfig(sparse_prefill=ssm_llm.kv.MInference()))
    with pytest.raises(ValueError, match="does not run num_beams > 1 requests yet"):
        engine.submit([1, 2, 3], ssm_llm.GenerationConfig(num_beams=2))
    mamba = MODELS["mamba2"]
    with pytest.raises(ValueError, match="kv_compression is for attention models"):
        Engine(ssm_llm.init_params(mamba, jax.random.key(0)), mamba, max_len=64).submit(
            [1, 2], ssm_llm.GenerationConfig(kv_compression=ssm_llm.kv.StreamingLLM(16, positions="original"))
        )
    # A streaming request's peak is its prompt's pages, or its sinks' and window's, not all its tokens'.
    small = Engine(ssm_llm.init_params(config, jax.random.key(0)), config, page_size=4, num_pages=6, max_len=64)
    streaming = ssm_llm.GenerationConfig(
        max_new_tokens=40, kv_compression=ssm_llm.kv.StreamingLLM(8, sinks=2, positions="original")
    )
    rid = small.submit(list(range(10)), streaming)
    with pytest.raises(ValueError, match="need 13 pages; the pool holds 6"):
        small.submit(list(range(10)), dataclasses.replace(streaming, kv_compression=None))
    assert small.run(max_steps=100)[rid] == alone(small.params, config, list(range(10)), streaming)


def test_smollm2_with_int8_pages_keeps_float_pages_next_tokens(smollm2):
    """Teacher-forced over three chats and their 32-token float continuations, the step with int8 pages picks
    float pages' next token at >= 95% of positions (99%: 1 near-tie of 96 flips), mean KL < 1e-3 (3.4e-4)."""
    from ssm_llm.models.lm_head import logits_from_hidden
    from ssm_llm.serving.model_step import _paged_hidden, init_pages

    config, params, tokenizer, _ = smollm2
    questions = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?"]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        ).input_ids
        for q in questions
    ]
    # (any float continuation serves as teacher-forced text: one batched generate, one compile)
    replies = ssm_llm.generate(
        params, config, prompts, ssm_llm.GenerationConfig(max_new_tokens=32, eos_token_ids=())
    ).tokens
    sequences = [prompt + reply for prompt, reply in zip(prompts, replies, strict=True)]
    pages = -(-max(map(len, sequences)) // 16)  # every sequence padded to the same pages: one compile per dtype
    table, start = np.arange(pages)[None], np.zeros(1, np.int32)
    agree, kl = [], []
    for prompt, tokens in zip(prompts, sequences, strict=True):
        padded, count = np.asarray([tokens + [0] * (pages * 16 - len(tokens))]), np.asarray([len(tokens)], np.int32)
        logits = []
        for dtype in ("float32", "int8"):  # one prefill pass over everything: every position's logits
            pool = init_pages(config, pages, 16, dtype)
            h, _ = _paged_hidden(params, config, padded, pool, table, start, count, "xla")
            logits.append(
                jax.nn.log_softmax(logits_from_hidden(params, config, h[0, len(prompt) - 1 : len(tokens) - 1]))
            )
        full, int8 = (np.asarray(x, np.float64) for x in logits)
        agree += (full.argmax(-1) == int8.argmax(-1)).tolist()
        kl += (np.exp(full) * (full - int8)).sum(-1).tolist()
    assert np.mean(agree) >= 0.95 and np.mean(kl) < 1e-3, (np.mean(agree), np.mean(kl))


@pytest.mark.parametrize("name", ["llama", "qwen2-window"])
def test_prompt_lookup_requests_give_plain_greedy_tokens(name):
    """Greedy requests with `speculative=PromptLookup(...)` among plain and sampled ones, under a small pool
    (preemption) with shared prefixes: each gets `generate`'s plain greedy tokens, and drafts are accepted."""
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(8)
    motif = rng.integers(0, 128, 5).tolist()
    prompts = [(motif * 6)[: int(rng.integers(8, 30))] + rng.integers(0, 128, 3).tolist() for _ in range(6)]
    prompts += workload(rng, config.vocab_size, 4)
    spec = ssm_llm.speculative.PromptLookup(num_tokens=3, max_ngram=3)
    configs = [
        ssm_llm.GenerationConfig(max_new_tokens=int(rng.integers(6, 16)), eos_token_ids=(), speculative=spec)
        for _ in prompts
    ]
    configs[7] = ssm_llm.GenerationConfig(max_new_tokens=9, eos_token_ids=())
    configs[8] = ssm_llm.GenerationConfig(max_new_tokens=9, eos_token_ids=(), temperature=1.0, seed=2)
    # Two slots: drafts ride along while at most 8 tokens are fed in all (2 requests x (1 + 3)).
    engine = Engine(params, config, max_slots=2, page_size=4, num_pages=12, max_len=64, chunk=8)
    rids = [engine.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
    out = engine.run()
    for rid, prompt, gen_config in zip(rids, prompts, configs, strict=True):
        plain = dataclasses.replace(gen_config, speculative=None)
        if gen_config.temperature > 0:  # sampled: what the engine draws for it alone
            assert out[rid] == Engine(params, config, max_len=64).run_batch([prompt], gen_config)[0]
        else:
            assert out[rid] == alone(params, config, prompt, plain), rid
    stats = engine.stats()
    assert stats["accepted_draft_tokens"] > 0 and stats["draft_tokens"] >= stats["accepted_draft_tokens"], stats
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    assert stats["pages_used"] == 0
    with pytest.raises(ValueError, match="speculates only with PromptLookup, for greedy requests"):
        engine.submit([1, 2], ssm_llm.GenerationConfig(temperature=0.5, speculative=spec))
    with pytest.raises(ValueError, match="logprobs are not reported for speculative requests"):
        engine.submit([1, 2], configs[0], logprobs=1)


def test_a_long_draft_is_cut_to_the_share_instead_of_turning_speculation_off():
    """A drafter asking for more tokens than a step lets ride (12 > 8 - 1) still speculates, cut to 7 drafts a
    step for one request (the gate used to count the asked-for tokens and never drafted), with plain output."""
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    prompt = list(range(3, 11)) * 4
    gen_config = ssm_llm.GenerationConfig(
        max_new_tokens=24, eos_token_ids=(), speculative=ssm_llm.speculative.PromptLookup(num_tokens=12)
    )
    engine = Engine(params, config, max_slots=2, page_size=4, max_len=64, chunk=8)
    rid = engine.submit(prompt, gen_config)
    tokens, drafted = [], 0
    while engine.stats()["running"] or engine.stats()["waiting"]:
        before = engine.stats()["draft_tokens"]
        tokens += [t for event in engine.step() if event.rid == rid for t in event.new_token_ids]
        drafted = max(drafted, engine.stats()["draft_tokens"] - before)
    assert 0 < drafted <= 7, drafted
    assert tokens == alone(params, config, prompt, dataclasses.replace(gen_config, speculative=None))


def test_cancelling_frees_the_pages():
    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    engine = Engine(params, config, max_slots=2, page_size=4, max_len=48, chunk=8, prefix_caching=False)
    rid = engine.submit(list(range(1, 30)), ssm_llm.GenerationConfig(max_new_tokens=10, eos_token_ids=()))
    engine.step()
    engine.step()
    assert engine.stats()["pages_used"] > 0
    assert engine.cancel(rid)
    assert engine.stats()["pages_used"] == 0 and engine.has_work()  # the cancellation is still to be reported
    assert [e.finish_reason for e in engine.step()] == ["cancelled"]
    assert not engine.has_work()


def test_smollm2_requests_with_a_shared_chat_prefix(smollm2):
    config, params, tokenizer, _ = smollm2
    questions = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=6)
    engine = Engine(params, config, max_slots=2, page_size=16, max_len=128, chunk=32)
    rids = [engine.submit(p, gen_config) for p in prompts]
    out = engine.run()
    for rid, prompt in zip(rids, prompts, strict=True):
        assert out[rid] == alone(params, config, prompt, gen_config)
    assert engine.stats()["prefix_cache_hit_tokens"] >= 16  # the system prompt's first page, at least


@pytest.mark.parametrize("name", ["qwen2-window", "mamba2"])
def test_run_batch_shares_prefixes_and_keeps_the_order(name):
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(3)
    systems = [rng.integers(0, 128, 20).tolist() for _ in range(3)]
    prompts = [systems[i % 3] + rng.integers(0, 128, rng.integers(1, 6)).tolist() for i in range(10)]
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=4, eos_token_ids=())
    engine = Engine(params, config, max_slots=4, page_size=4, max_len=48, chunk=8)
    out = engine.run_batch(prompts, gen_config)
    assert out == [alone(params, config, p, gen_config) for p in prompts]
    # 3 leaders compute their 20-token prefixes; the 7 followers find all 5 pages of it cached (attention),
    # or the state after its 16 or 20 first tokens (Mamba: snapshots where a chunk ends on a page boundary,
    # and at the prompt's last one).
    hits = engine.stats()["prefix_cache_hit_tokens"]
    assert hits == 7 * 20 if name == "qwen2-window" else 7 * 16 <= hits <= 7 * 20
    engine.abort()  # a rebuilt cache: the hits counter (a Prometheus counter on the server) does not go back
    assert engine.stats()["prefix_cache_hit_tokens"] == hits


def test_async_streams_with_a_client_that_leaves():
    import asyncio

    from ssm_llm.serving import AsyncEngine

    config = MODELS["llama"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 128, rng.integers(2, 30)).tolist() for _ in range(8)]
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=8, eos_token_ids=())
    front = AsyncEngine(Engine(params, config, max_slots=3, page_size=4, max_len=48, chunk=8))

    async def leave_early():
        async for tokens in front.stream(
            list(range(5, 25)), ssm_llm.GenerationConfig(max_new_tokens=20, eos_token_ids=())
        ):
            return tokens  # the client goes away after its first tokens

    async def bad():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await front.generate([1, 999], gen_config)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(front.generate(p, gen_config) for p in prompts), leave_early(), bad()), timeout=300
        )

    try:
        results = asyncio.run(main())
        assert results[:8] == [alone(params, config, p, gen_config) for p in prompts]
        assert len(results[8]) == 1
        stats = front.stats()
        assert stats["running"] == stats["waiting"] == stats["pages_used"] == 0  # the leaver's pages came back
    finally:
        front.close()


def test_async_front_survives_callers_that_give_up_and_closes_cleanly():
    import asyncio

    from ssm_llm.serving import AsyncEngine

    config = MODELS["mamba2"]
    params = ssm_llm.init_params(config, jax.random.key(0))
    gen_config = ssm_llm.GenerationConfig(max_new_tokens=6, eos_token_ids=())
    front = AsyncEngine(Engine(params, config, max_slots=2, max_len=64, chunk=8))
    prompt = list(range(1, 15))

    async def main():
        for _ in range(3):  # callers that time out at once, while submitting or streaming
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(front.generate(prompt, ssm_llm.GenerationConfig(max_new_tokens=40)), 0.001)
        answer = await asyncio.wait_for(front.generate(prompt, gen_config), 300)  # the thread is still alive
        rid, queue = await front.submit(prompt, ssm_llm.GenerationConfig(max_new_tokens=40, eos_token_ids=()))
        front.cancel(rid)  # the only live request: its cancellation is still reported
        while not (event := await asyncio.wait_for(queue.get(), 300)).finished:
            pass
        return answer, event.finish_reason

    answer, reason = asyncio.run(main())
    assert answer == alone(params, config, prompt, gen_config) and reason == "cancelled"

    async def closed_mid_stream():
        tokens = []
        async for new_ids in front.stream(prompt, ssm_llm.GenerationConfig(max_new_tokens=40, eos_token_ids=())):
            tokens += new_ids
            if len(tokens) == 2:
                await asyncio.get_running_loop().run_in_executor(None, front.close)
        return tokens  # the stream ended instead of waiting forever

    assert 2 <= len(asyncio.run(asyncio.wait_for(closed_mid_stream(), 300))) < 40
