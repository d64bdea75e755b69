"""Structured output in the serving engine: constrained requests (regex, JSON schema, a grammar without EOS
ids; masks and rejection sampling), mixed with a plain one in fewer slots than requests, each give what
`generate` gives for that request alone, finish reasons included; sampled requests draw the same tokens by
masks and by rejection."""

import json

import jax
import jsonschema
import pytest
from conftest import tiny_over_smollm2_vocab

import ssm_llm
from ssm_llm import constraints
from ssm_llm.serving import Engine


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_tokenizers):
    return smollm2_tokenizers[0]


@pytest.fixture(scope="module")
def bound(smollm2_tokenizers):
    return smollm2_tokenizers[1]


# Random models over SmolLM2's vocabulary, so only the constraints make outputs valid.
MODELS = {name: tiny_over_smollm2_vocab(name) for name in ("llama", "mamba2")}
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_constrained_drafts_are_refused(bound):
    """The engine's speculative rounds do not check drafts against a grammar yet: refused, not ignored."""
    config = MODELS["llama"]
    engine = Engine(ssm_llm.init_params(config, jax.random.PRNGKey(0)), config, max_slots=2, page_size=8, max_len=64)
    gen = ssm_llm.GenerationConfig(
        constraint=constraints.Regex("[a-z]+", bound), speculative=ssm_llm.speculative.PromptLookup()
    )
    with pytest.raises(ValueError, match="does not check drafts against a constraint"):
        engine.submit([1, 2, 3], gen)


def drain(engine):
    """Step until idle: {rid: (tokens, finish reason)}."""
    tokens, reasons = {}, {}
    for _ in range(2000):
        if not engine.has_work():
            return {rid: (tokens.get(rid, []), reasons[rid]) for rid in reasons}
        for event in engine.step():
            tokens.setdefault(event.rid, []).extend(event.new_token_ids)
            if event.finished:
                reasons[event.rid] = event.finish_reason
    raise AssertionError("the engine did not finish in 2000 steps")


@pytest.mark.parametrize("name", list(MODELS))
def test_constrained_requests_give_generates_output_alone(bound, hf_tokenizer, name):
    config = MODELS[name]
    params = ssm_llm.init_params(config, jax.random.PRNGKey(0))
    eos = (0,)
    regex = constraints.Regex("[a-z]{2,5}-[0-9]{3}", bound)
    requests = [
        ([5, 6, 7, 8], dict(constraint=regex)),
        ([9, 10], dict(constraint=regex, constrained_sampling="awrs")),
        ([11, 12, 13], dict(constraint=constraints.JSONSchema(SCHEMA, bound), max_new_tokens=40)),
        ([14, 15], {}),  # plain, beside the constrained ones
        ([16], dict(constraint=constraints.Grammar('start: "yes" | "no"', bound), eos_token_ids=())),
        ([17, 18], dict(constraint=regex, temperature=1.0, seed=3)),
        ([17, 18], dict(constraint=regex, temperature=1.0, seed=3, constrained_sampling="awrs")),
    ]
    engine = Engine(params, config, max_slots=3, page_size=8, max_len=96)
    configs = [ssm_llm.GenerationConfig(**{"max_new_tokens": 16, "eos_token_ids": eos, **kw}) for _, kw in requests]
    rids = [engine.submit(prompt, gen) for (prompt, _), gen in zip(requests, configs, strict=True)]
    got = drain(engine)
    for rid, (prompt, kw), gen in zip(rids[:5], requests[:5], configs[:5], strict=True):
        out = ssm_llm.generate(params, config, [prompt], gen)
        assert got[rid] == (out.tokens[0], out.finish_reasons[0]), (name, kw)
    schema_text = hf_tokenizer.decode(got[rids[2]][0])
    jsonschema.validate(json.loads(schema_text), SCHEMA)
    assert got[rids[4]][1] == "constraint"
    assert got[rids[5]] == got[rids[6]]  # sampled: masks and rejection draw the same tokens with one key
