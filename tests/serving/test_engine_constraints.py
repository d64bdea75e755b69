"""Structured output in the serving engine: constrained requests (regex, JSON schema, a grammar without EOS
ids; masks and rejection sampling), mixed with a plain one in fewer slots than requests, each give what
`generate` gives for that request alone, finish reasons included; sampled requests draw the same tokens by
masks and by rejection."""

import json

import jax
import jsonschema
import pytest

import converters
import ssm_llm
from ssm_llm import constraints
from ssm_llm.serving import Engine

VOCAB = 49152  # SmolLM2's tokenizer: random models over it, so only the constraints make outputs valid


@pytest.fixture(scope="module")
def bound():
    return constraints.tokenizer(converters.load_tokenizer(ssm_llm.default_model_path()))


MODELS = {
    "llama": ssm_llm.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    ),
    "mamba2": ssm_llm.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        state_size=8,
        intermediate_size=64,
        num_heads=4,
        head_dim=16,
        chunk_size=8,
    ),
}
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


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
def test_constrained_requests_give_generates_output_alone(bound, name):
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
    schema_text = converters.load_tokenizer(ssm_llm.default_model_path()).decode(got[rids[2]][0])
    jsonschema.validate(json.loads(schema_text), SCHEMA)
    assert got[rids[4]][1] == "constraint"
    assert got[rids[5]] == got[rids[6]]  # sampled: masks and rejection draw the same tokens with one key
