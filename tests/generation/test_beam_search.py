"""Beam search against transformers' `num_beams`, diverse beam search against a plain-Python loop over candidates
(the paper's groups and Hamming penalty, transformers' finishing rules, driven by transformers' logits), cache
reordering, and clear errors."""

import numpy as np
import pytest
import torch
from conftest import tiny_hf_model, tiny_hf_ssm_model

import converters
import ssm_llm

MODELS = {"llama": lambda: tiny_hf_model("llama"), "mamba": lambda: tiny_hf_ssm_model("mamba")}
MODELS["mamba2"] = lambda: tiny_hf_ssm_model("mamba2")
NEW = 10


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    model = MODELS[request.param]()
    config, params = converters.load(model)
    return model, config, params


def prompts(vocab):
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).tolist() for n in (9, 5, 3)]  # ragged: one batch, three lengths


def cut(row, eos):
    """A hypothesis' tokens up to its first EOS."""
    out = []
    for t in row:
        if t in eos:
            break
        out.append(t)
    return out


def hf_beams(model, ids, beams, eos, **kw):
    """transformers' `num_beams` hypotheses (best first, EOS cut) and scores for one prompt."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW,
            num_beams=beams,
            num_return_sequences=beams,
            do_sample=False,
            eos_token_id=list(eos) or None,
            pad_token_id=eos[0] if eos else 0,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    return [cut(r, eos) for r in out.sequences[:, len(ids) :].tolist()], out.sequences_scores.numpy()


def beam(params, config, batch, **kw):
    return ssm_llm.generate(params, config, batch, ssm_llm.GenerationConfig(**{"max_new_tokens": NEW, **kw}))


def test_beam_search_matches_transformers(pair):
    model, config, params = pair
    batch = prompts(config.vocab_size)
    free = beam(params, config, batch, num_beams=3, eos_token_ids=()).beams.sequences
    # EOS ids taken from the hypotheses themselves, so that beams do end on them mid-search.
    settings = [
        dict(eos_token_ids=(), length_penalty=1.0, early_stopping=False),
        dict(eos_token_ids=(free[0][0][3],), length_penalty=1.0, early_stopping=False),
        dict(eos_token_ids=(free[1][1][2], free[0][2][5]), length_penalty=2.0, early_stopping="never"),
        dict(eos_token_ids=(free[0][1][2],), length_penalty=-0.5, early_stopping=True),
    ]
    reasons = set()
    for kw in settings:
        out = beam(params, config, batch, num_beams=3, **kw)
        eos, hf_kw = kw["eos_token_ids"], {k: v for k, v in kw.items() if k != "eos_token_ids"}
        for i, ids in enumerate(batch):
            expected, scores = hf_beams(model, ids, 3, eos, **hf_kw)
            assert out.beams.sequences[i] == expected, (kw, i)
            np.testing.assert_allclose(out.beams.scores[i], scores, atol=1e-4, rtol=1e-5)
            assert out.tokens[i] == expected[0] and out.finish_reasons[i] == out.beams.finish_reasons[i][0]
            reasons.update(out.beams.finish_reasons[i])
    assert reasons == {"eos", "length"}  # both ways of finishing were exercised


NEG = -1.0e9


def reference_diverse_beam_search(logp_of, n, beams, groups, penalty, length_penalty, eos):
    """Diverse beam search (Vijayakumar et al.) in plain Python, with transformers' rules for finishing
    hypotheses (early_stopping=False). logp_of(tokens) -> the next-token log-probabilities [V]."""
    k = beams // groups
    keep = max(2, 1 + len(eos)) * k
    running = [[([], 0.0 if j == 0 else NEG) for j in range(k)] for _ in range(groups)]
    finished = [[] for _ in range(groups)]  # (score, tokens) of real finished hypotheses, best first
    open_ = [True] * groups
    for t in range(n):
        chosen = np.zeros(0)
        for g in range(groups):
            cands = []
            for j, (tokens, score) in enumerate(running[g]):
                logp = logp_of(tokens)
                if not chosen.size:
                    chosen = np.zeros_like(logp)
                for v in range(logp.size):
                    cands.append((score + logp[v] - penalty * chosen[v], j * logp.size + v, tokens + [v]))
            cands = sorted(cands, key=lambda c: (-c[0], c[1]))[:keep]
            ended = [tokens[-1] in eos or t + 1 == n for _, _, tokens in cands]
            runs = [(score + NEG * ended[i], i, tokens) for i, (score, _, tokens) in enumerate(cands)]
            runs = sorted(runs, key=lambda c: (-c[0], c[1]))[:k]
            if open_[g]:  # the best k candidates that ended are finished hypotheses
                new = [
                    (score / (t + 1) ** length_penalty, tokens)
                    for i, (score, _, tokens) in enumerate(cands[:k])
                    if ended[i]
                ]
                finished[g] = sorted(finished[g] + new, key=lambda c: -c[0])[:k]
            running[g] = [(c[2], c[0]) for c in runs]
            for tokens, _ in running[g]:
                chosen[tokens[-1]] += 1
            best = running[g][0][1] / (t + 1) ** length_penalty
            open_[g] = open_[g] and (len(finished[g]) < k or best > min(s for s, _ in finished[g]))
        if not any(open_):
            break
    merged = sorted([h for group in finished for h in group], key=lambda c: -c[0])
    return [cut(tokens, eos) for _, tokens in merged], [s for s, _ in merged]


@pytest.mark.parametrize("beams, groups, penalty", [(4, 2, 0.7), (4, 4, 1.5), (6, 3, 0.3)])
def test_diverse_beam_search_matches_the_reference(beams, groups, penalty):
    model = tiny_hf_model("llama", seed=1)
    config, params = converters.load(model)
    ids = prompts(config.vocab_size)[1]
    plain = beam(params, config, [ids], num_beams=beams, eos_token_ids=()).beams.sequences[0]
    eos = (plain[1][2],)

    def logp_of(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, -1].double()
        return torch.log_softmax(logits, -1).numpy()

    expected, scores = reference_diverse_beam_search(logp_of, NEW, beams, groups, penalty, 1.0, eos)
    out = beam(
        params, config, [ids], num_beams=beams, num_beam_groups=groups, diversity_penalty=penalty, eos_token_ids=eos
    )
    assert out.beams.sequences[0] == expected
    np.testing.assert_allclose(out.beams.scores[0], scores, atol=1e-4, rtol=1e-5)
    assert out.beams.sequences[0] != plain  # the penalty changed the search


def test_max_new_tokens_one_and_the_unstacked_layout():
    model = tiny_hf_model("llama")
    config, params = converters.load(model)
    batch = prompts(config.vocab_size)
    one = beam(params, config, batch, num_beams=4, eos_token_ids=(), max_new_tokens=1)
    for i, ids in enumerate(batch):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        assert one.beams.sequences[i] == [[t] for t in torch.topk(logp, 4).indices.tolist()]
    stacked = beam(params, config, batch, num_beams=3, eos_token_ids=())
    unstacked = beam(ssm_llm.unstack_layers(params), config, batch, num_beams=3, eos_token_ids=())
    assert unstacked.beams.sequences == stacked.beams.sequences


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=0), "num_beams must be a positive int"),
        (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "must divide num_beams"),
        (dict(num_beams=4, num_beam_groups=2), "needs diversity_penalty > 0"),
        (dict(num_beams=4, diversity_penalty=1.0), "set num_beam_groups > 1"),
        (dict(num_beams=2, num_beam_groups=3, diversity_penalty=1.0), "num_beam_groups must be an int in"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(num_beams=2, early_stopping=1), "early_stopping must be True, False or 'never'"),
        (dict(length_penalty=2.0), "act in beam search only"),
        (dict(early_stopping=True), "act in beam search only"),
        (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(num_beams=2, temperature=0.7), "does not combine with temperature > 0"),
        (dict(num_beams=2, speculative=ssm_llm.speculative.PromptLookup()), "does not combine with speculative"),
        (dict(num_beams=2, kv_compression=ssm_llm.kv.StreamingLLM(budget=8)), "does not combine with kv_compression"),
    ],
)
def test_bad_beam_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ssm_llm.GenerationConfig(**kwargs)


def test_beam_search_refuses_streaming():
    config = ssm_llm.ModelConfig(
        vocab_size=20, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
    )
    params = ssm_llm.init_params(config, __import__("jax").random.PRNGKey(0))
    with pytest.raises(ValueError, match="not supported with beam search"):
        ssm_llm.generate(
            params, config, [[1, 2]], ssm_llm.GenerationConfig(num_beams=2), on_token=lambda step, tokens: None
        )
