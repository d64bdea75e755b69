"""Speculative decoding on the real SmolLM2 quantized to W8A8 (the CLI's `--quantize auto` choice, in the CPU
kernel's blocked layout) reproduces plain greedy decoding token for token, for a chain drafter and a tree drafter.

With int8 activations every linear is an exact integer product, so a verified draft-tree node can differ from the
same token decoded alone only through float noise elsewhere, which rounding the next layer's activations turns into
whole steps (before the fixes below, 1 token in ~10 moved and the outputs parted within ~30 tokens). The CPU
attention kernel (`pallas_kernels.cpu_attention`: each row alone, keys in visible order), the norm's `halving_sum`
and the materialised input of `int8_matmul` give a node exactly the decoded token's bits."""

import pydoc_data.topics

import pytest
from spec_checks import assert_same_greedy

import ssm_llm
from pallas_kernels import cpu_attention
from ssm_llm import speculative
from ssm_llm.int8_blocks import for_cpu_kernel
from ssm_llm.quant.presets import preset

pytestmark = [
    pytest.mark.optimized_xla,  # long runs of the real model: run time, not compiling, dominates
    pytest.mark.skipif(not cpu_attention.runs_here(7), reason="the CPU attention kernel (one CPU device, x86-64 AVX2)"),
]

MESSAGES = [
    pydoc_data.topics.topics["for"][:700] + "\n\nQuote the first two sentences of the text above exactly.",
    "What is the capital of France, and what is it famous for?",
    "Give me three tips for sleeping better.",
]


@pytest.fixture(scope="module")
def w8a8(smollm2):
    config, params, tokenizer, _ = smollm2
    scheme, options = preset("w8a8-rot-emb")
    qparams, qconfig = ssm_llm.quantize_weights(params, config, scheme, **options)
    ids = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        ).input_ids
        for m in MESSAGES
    ]
    return for_cpu_kernel(qparams, qconfig), qconfig, ids


@pytest.mark.parametrize(
    "drafter", [speculative.PromptLookup(num_tokens=3), speculative.TokenRecycling()], ids=["chain", "tree"]
)
def test_w8a8_speculative_decoding_is_plain_greedy_exactly(w8a8, drafter):
    params, config, ids = w8a8
    result = assert_same_greedy(params, config, ids, drafter, max_new_tokens=48, eos_token_ids=())
    assert result.speculative.tokens_per_round > 1.0  # drafts were accepted: trees were really verified
