"""`TextTokenizer` (tokenizers + jinja2, no transformers import) against the transformers tokenizer saved in
the same directory: the embedded SmolLM2's tokenizer, built from its GGUF file."""

import json

import pytest

import converters
import ssm_llm
from converters.text_tokenizer import TextTokenizer, TransformersText, piece_bytes
from converters.tokenizer import _gguf_tokenizer_dir

TEXTS = [
    "What is the capital of France? Answer in one sentence.",
    "",
    " leading and trailing spaces ",
    "tabs\tand\nnewlines\n\n",
    "Ünïcödé, 日本語, emoji 🚀 and \u200b zero width",
    "code: def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "don't , isn't . we're ! they've ?",
    "1234567890 3.14159 -42",
]
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke. 🎭"},
    ],
]


@pytest.fixture(scope="module")
def pair():
    """(TextTokenizer, transformers PreTrainedTokenizerFast) read from the same cached directory."""
    path = ssm_llm.default_model_path()
    light = converters.load_text_tokenizer(path)
    assert isinstance(light, TextTokenizer)
    return light, converters.load_tokenizer(path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    light, reference = pair
    for special in (True, False):
        ids = light.encode(text, add_special_tokens=special)
        assert ids == reference(text, add_special_tokens=special).input_ids
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(pair, messages):
    light, reference = pair
    for prompt in (True, False):
        assert light.apply_chat_template(messages, add_generation_prompt=prompt) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )


def test_eos_and_wrapper(pair):
    light, reference = pair
    assert light.eos_token_id == reference.eos_token_id is not None
    wrapped = TransformersText(reference)
    text = TEXTS[0]
    assert wrapped.encode(text) == light.encode(text)
    assert wrapped.decode(light.encode(text)) == light.decode(light.encode(text))
    assert wrapped.apply_chat_template(CHATS[1]) == light.apply_chat_template(CHATS[1])


def _copy_tokenizer(tmp_path, template=None, **config):
    """The SmolLM2 tokenizer directory copied to tmp_path, with `config` merged into its tokenizer_config.json
    and its chat template replaced by `template` (kept when None)."""
    source = _gguf_tokenizer_dir(ssm_llm.default_model_path())
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return tmp_path


def test_template_sandbox_and_helpers(tmp_path):
    # A template is untrusted input: it cannot reach Python internals; tojson keeps non-ASCII text; the
    # special tokens are visible as transformers passes them.
    tok = TextTokenizer.from_dir(_copy_tokenizer(tmp_path, "{{ messages | tojson }}|{{ eos_token }}"))
    rendered = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert rendered == '[{"role": "user", "content": "é"}]|<|im_end|>'
    bad = TextTokenizer.from_dir(_copy_tokenizer(tmp_path, "{{ ''.__class__.__mro__ }}"))
    with pytest.raises(Exception, match="unsafe|SecurityError|__class__"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])
    raising = TextTokenizer.from_dir(_copy_tokenizer(tmp_path, "{{ raise_exception('no system role') }}"))
    with pytest.raises(Exception, match="no system role"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_from_config_and_missing(tmp_path):
    (tmp_path / "a").mkdir()
    in_config = TextTokenizer.from_dir(_copy_tokenizer(tmp_path / "a", chat_template="<{{ messages[0].content }}>"))
    assert in_config.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<x>"
    (tmp_path / "b").mkdir()
    none = TextTokenizer.from_dir(_copy_tokenizer(tmp_path / "b"))
    with pytest.raises(ValueError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path / "c")


def write_tiny_gguf(path, tokenizer=True):
    """A GGUF file with one tensor and (if `tokenizer`) a byte-level BPE ("gpt2") vocabulary of 8 tokens."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "c", "ab", "abc", "Ġ", "Ġa", "<|endoftext|>"])
        writer.add_token_types([1] * 7 + [3])
        writer.add_token_merges(["a b", "ab c", "Ġ a"])
        writer.add_bos_token_id(7)
        writer.add_eos_token_id(7)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_tokenizer_is_built_aside_by_a_child_process(tmp_path, monkeypatch):
    import subprocess

    from converters.tokenizer import _gguf_cache_dir

    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    with converters.tokenizer_built_aside(path):
        pass  # the model's conversion runs here; the child builds the tokenizer meanwhile
    assert _gguf_cache_dir(path).is_dir()  # built by the child: nothing here built it
    light, reference = converters.load_text_tokenizer(path), converters.load_tokenizer(path)
    assert light.encode("abc ab a") == reference("abc ab a").input_ids == [4, 5, 3, 6]
    assert light.eos_token_id == 7

    def no_child(*args, **kwargs):
        raise AssertionError("a cached tokenizer needs no child process")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    with converters.tokenizer_built_aside(path):
        pass


def test_a_failed_aside_build_reports_its_error_on_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SSM_LLM_CACHE", str(tmp_path / "cache"))
    bare = write_tiny_gguf(tmp_path / "bare.gguf", tokenizer=False)
    with converters.tokenizer_built_aside(bare):
        pass
    with pytest.raises(ValueError, match="holds no tokenizer"):
        converters.load_text_tokenizer(bare)
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(KeyboardInterrupt), converters.tokenizer_built_aside(path):
        raise KeyboardInterrupt  # the child is killed, not waited for to the end


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text(pair, text):
    """Each token's own bytes (the server's chat logprobs "bytes"), joined, are the text's UTF-8 bytes, also
    where a token holds only part of a character (the emoji and CJK texts)."""
    light, reference = pair
    ids = light.encode(text, add_special_tokens=False)
    for tokenizer in (light, TransformersText(reference)):
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()


def test_sentencepiece_pieces_give_their_bytes():
    assert piece_bytes("<0xE6>", byte_level=False) == b"\xe6"
    assert piece_bytes("\u2581hello", byte_level=False) == b" hello"
    assert piece_bytes("<0xZZ>", byte_level=False) == b"<0xZZ>"
    assert piece_bytes("\u0120hi\u010a", byte_level=True) == b" hi\n"  # GPT-2's stand-ins for space and newline
