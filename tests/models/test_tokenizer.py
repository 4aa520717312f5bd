"""Tokenizers: the toy byte vocabulary, GGUF and tokenizer.json construction, ChatML.

The SmolLM2 tests (slow) compare token ids with a committed fixture written by an
independent tokenizer implementation (tests/fixtures/make_tokenizer_reference.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import pytest

from tests.helpers import TINY_LLAMA, random_hf_tensors, toy_vocab, write_gguf
from uhlm_jax.models.gguf import open_gguf
from uhlm_jax.models.registry import embedded_gguf_path
from uhlm_jax.models.tokenizer import (
    ChatTemplate,
    PreTokenizer,
    Tokenizer,
    TokenType,
    toy_tokenizer,
)

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "tokenizer_reference" / "smollm2.json"

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2-Instruct's template (abridged): Jinja escapes \n inside its strings.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
    "Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
)

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語, 中文, العربية",
    "emoji 🌍🚀👩‍💻 and symbols ©®™ ∑∫√",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "12345 67 8.9e-10",
]


# ---------------------------------------------------------------------------------------
# Toy tokenizer.


def test_toy_tokenizer_has_260_ids_bytes_first_then_specials():
    tok = toy_tokenizer()
    assert tok.vocab_size == 260
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.stop_ids == (257,)
    # Each UTF-8 byte is its own id, after BOS.
    assert tok.encode("A") == [256, 65]
    assert tok.encode("é\n") == [256, 0xC3, 0xA9, 0x0A]
    assert tok.encode("<eos><pad><reserved>") == [256, 257, 258, 259]
    assert tok.decode(list(range(256, 260))) == ""
    assert tok.decode([104, 105, 257]) == "hi"


def test_toy_tokenizer_maps_every_byte_to_its_value():
    tok = toy_tokenizer()
    vocab = tok.backend.get_vocab()
    text_of = {i: t for t, i in vocab.items()}
    # Decoding id b alone gives byte b (invalid UTF-8 on its own for b >= 128).
    for b in range(128):
        assert tok.decode([b]) == chr(b)
    assert sorted(text_of) == list(range(260))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_toy_tokenizer_round_trips(text):
    tok = toy_tokenizer()
    ids = tok.encode(text)
    assert ids == [256, *text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_toy_tokenizer_has_no_chat_template():
    with pytest.raises(ValueError, match="no ChatML chat template.*--no-chat"):
        toy_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_validates_its_ids():
    tok = toy_tokenizer()
    with pytest.raises(ValueError, match="eos_id=260 is outside the vocabulary"):
        dataclasses.replace(tok, eos_id=260, stop_ids=(260,))
    with pytest.raises(ValueError, match="must include eos_id"):
        dataclasses.replace(tok, stop_ids=(258,))


def test_check_fits_allows_padding_rows_but_not_missing_rows():
    tok = toy_tokenizer()
    tok.check_fits(260, where="m")
    tok.check_fits(320, where="m")  # a padded embedding table
    with pytest.raises(ValueError, match="m: the tokenizer has 260 ids but .* only 259 rows"):
        tok.check_fits(259, where="m")


# ---------------------------------------------------------------------------------------
# Chat template.


def test_chatml_with_default_system_prompt_matches_hand_written_prompt():
    template = ChatTemplate(default_system_prompt=SMOLLM2_SYSTEM_PROMPT)
    text = template.render([{"role": "user", "content": "What is the capital of France?"}])
    assert text == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
        "What is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_keeps_a_given_system_prompt_and_whole_conversations():
    template = ChatTemplate(default_system_prompt=SMOLLM2_SYSTEM_PROMPT)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert template.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert ChatTemplate().render([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_rejects_malformed_messages():
    with pytest.raises(ValueError, match="Chat message 1 must be a mapping"):
        ChatTemplate().render([{"role": "user", "content": "a"}, {"role": "user"}])


def test_chat_template_is_recognised_from_jinja():
    assert ChatTemplate.from_jinja(SMOLLM2_TEMPLATE).default_system_prompt == (
        SMOLLM2_SYSTEM_PROMPT
    )
    assert ChatTemplate.from_jinja(QWEN2_TEMPLATE).default_system_prompt == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    no_default = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
    no_default += "'<|im_end|>\n'}}{% endfor %}"
    assert ChatTemplate.from_jinja(no_default).default_system_prompt is None
    with pytest.raises(ValueError, match="Only ChatML"):
        ChatTemplate.from_jinja("{{ bos_token }}[INST] {{ m['content'] }} [/INST]")


# ---------------------------------------------------------------------------------------
# Construction from GGUF metadata and from tokenizer.json.


def _bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """Byte tokens, specials, and three merges: 'h'+'e', 'l'+'l', 'he'+'ll'; ' '+'1'."""
    tokens, types = toy_vocab()
    merges = ["h e", "l l", "he ll", "Ġ 1"]
    tokens = tokens + ["he", "ll", "hell", "Ġ1", "<|im_start|>", "<|im_end|>"]
    types = types + [int(TokenType.NORMAL)] * 4 + [int(TokenType.CONTROL)] * 2
    return tokens, types, merges


@pytest.fixture
def small_gguf(tmp_path):
    def write(pre: str = "gpt2", tokenizer_model: str = "gpt2", chat_template=None):
        tokens, types, merges = _bpe_vocab()
        config = dataclasses.replace(TINY_LLAMA, vocab_size=len(tokens))
        return write_gguf(
            tmp_path / f"{pre}.gguf",
            config,
            random_hf_tensors(config),
            tokens=tokens,
            token_types=types,
            merges=merges,
            pre=pre,
            tokenizer_model=tokenizer_model,
            chat_template=chat_template,
        )

    return write


def test_from_gguf_applies_merges_specials_and_pre_tokenizer(small_gguf):
    tok = Tokenizer.from_gguf(small_gguf("gpt2", chat_template=SMOLLM2_TEMPLATE))
    assert tok.vocab_size == 266
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (256, 257, 258, False)
    # 'hello' -> 'hell' + 'o'; the control token in text maps to its id.
    assert tok.encode("hello<|im_end|>") == [262, ord("o"), 265]
    # GPT-2 pre-tokenization keeps ' 1' together, so the 'Ġ 1' merge applies...
    assert tok.encode("a 1") == [ord("a"), 263]
    # ...SmolLM2's splits digits off first, so it cannot.
    smollm = Tokenizer.from_gguf(small_gguf("smollm"))
    assert smollm.encode("a 1") == [ord("a"), ord(" "), ord("1")]
    assert tok.stop_ids == (257, 265)  # EOS and <|im_end|>
    assert tok.chat_template == ChatTemplate(SMOLLM2_SYSTEM_PROMPT)
    assert smollm.chat_template is None


def test_qwen2_pre_tokenizer_splits_digits_and_keeps_leading_punctuation(small_gguf):
    tok = Tokenizer.from_gguf(small_gguf("qwen2"))
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("I'M 123 ,hello\n\n")]
    # Case-insensitive contractions, single digits, punctuation joined to the next word,
    # newline runs as one piece (in GPT-2's byte alphabet: Ġ is ' ', Ċ is '\n').
    assert pieces == ["I", "'M", "Ġ", "1", "2", "3", "Ġ,", "hello", "ĊĊ"]
    # GPT-2's contractions are lower-case only.
    gpt2 = Tokenizer.from_gguf(small_gguf("gpt2")).backend.pre_tokenizer
    assert [p for p, _ in gpt2.pre_tokenize_str("I'M")] == ["I", "'", "M"]


def test_unknown_pre_tokenizer_and_tokenizer_model_are_rejected(small_gguf):
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='falcon'.*'smollm', 'qwen2'"):
        Tokenizer.from_gguf(small_gguf("falcon"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama' is not supported"):
        Tokenizer.from_gguf(small_gguf(tokenizer_model="llama"))
    with pytest.raises(ValueError, match="Unsupported GGUF pre-tokenizer"):
        PreTokenizer.from_gguf_name("deepseek-llm")


def test_from_file_reads_tokenizer_json_and_config(small_gguf, tmp_path):
    # Given a GGUF tokenizer saved as tokenizer.json with a tokenizer_config.json
    original = Tokenizer.from_gguf(small_gguf("smollm", chat_template=SMOLLM2_TEMPLATE))
    folder = tmp_path / "hf"
    folder.mkdir()
    original.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": {"content": "<eos>"},
                "pad_token": "<pad>",
                "chat_template": SMOLLM2_TEMPLATE,
            }
        )
    )
    # When it is loaded from the file
    loaded = Tokenizer.from_file(folder / "tokenizer.json")
    # Then it encodes, decodes and formats chats as the original
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (266, 256, 257, 258)
    assert loaded.stop_ids == original.stop_ids
    assert loaded.chat_template == original.chat_template
    for text in [*ROUND_TRIP_TEXTS, "hello<|im_start|>a 1"]:
        assert loaded.encode(text) == original.encode(text)


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="Cannot parse tokenizer file"):
        Tokenizer.from_file(bad)


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (slow: reading the GGUF vocabulary takes seconds).


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(embedded_gguf_path()))


@pytest.mark.slow
def test_smollm2_ids_match_llama_cpp(smollm2):
    reference = json.loads(FIXTURE.read_text(encoding="utf-8"))
    digest = hashlib.sha256(embedded_gguf_path().read_bytes()).hexdigest()
    assert reference["model_sha256"] == digest  # the fixture was made from this file
    assert len(reference["cases"]) >= 20
    for case in reference["cases"]:
        assert smollm2.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.slow
def test_smollm2_differs_from_transformers_only_where_it_drops_the_digit_split(smollm2):
    # transformers' GGUF converter omits SmolLM2's Digits pre-tokenizer, which matters
    # only when a run of spaces precedes a digit.
    reference = json.loads(FIXTURE.read_text(encoding="utf-8"))
    for case in reference["cases"]:
        agrees = smollm2.encode(case["text"]) == case["transformers_ids"]
        assert agrees == (case["text"] not in reference["disagreements"]), case["text"]


@pytest.mark.slow
def test_smollm2_round_trips_text(smollm2):
    reference = json.loads(FIXTURE.read_text(encoding="utf-8"))
    for text in [*ROUND_TRIP_TEXTS, *(c["text"] for c in reference["cases"])]:
        special = "<|" in text or "<jupyter" in text
        assert smollm2.decode(smollm2.encode(text), skip_special_tokens=not special) == text


@pytest.mark.slow
def test_smollm2_special_ids_and_chat_template(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.add_bos) == (1, 2, 2, False)
    assert set(smollm2.stop_ids) == {0, 2}  # <|im_end|> and <|endoftext|>
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm2.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
