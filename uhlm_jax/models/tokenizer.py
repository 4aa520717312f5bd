"""Byte-level BPE tokenizers and ChatML chat templates.

A `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` together with the ids the
decoding loop needs (BOS, EOS, padding, stop ids) and the model's chat template. There are
three ways to build one, and all of them end in the same `tokenizers` object, so encoding
and decoding run through one code path:

- `Tokenizer.from_file`: a Hugging Face `tokenizer.json` (plus its `tokenizer_config.json`
  when present, for the special tokens and the chat template);
- `Tokenizer.from_gguf`: rebuilt from a GGUF file's metadata: `tokenizer.ggml.tokens`,
  `merges`, `token_type`, the special-token ids and `tokenizer.ggml.pre`, the name of the
  pre-tokenizer llama.cpp applies (see `PreTokenizer`);
- `toy_tokenizer`: 256 single-byte tokens plus four specials, for the toy models.

Chat templates are implemented in Python, not by running the Jinja source: ChatML
(`<|im_start|>role\\ncontent<|im_end|>\\n`) with an optional default system prompt, which
is what SmolLM2-Instruct and Qwen2-Instruct ship. `ChatTemplate.from_jinja` recognises
such a template and extracts its default system prompt; other templates are rejected with
a clear error when used.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from uhlm_jax.models.toy import (
    TOY_BOS_ID,
    TOY_EOS_ID,
    TOY_PAD_ID,
    TOY_RESERVED_ID,
    TOY_VOCAB_SIZE,
)

if TYPE_CHECKING:
    from gguf import GGUFReader


class PreTokenizer(enum.Enum):
    """How text is split into words before BPE, named as GGUF's `tokenizer.ggml.pre`.

    Each member carries the regular expressions llama.cpp applies in sequence
    (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`): every expression splits the pieces
    left by the previous one, keeping both the matches and the text between them. The
    bytes of each piece are then mapped to GPT-2's printable byte alphabet, and BPE runs
    within a piece.
    """

    GPT2 = "gpt2"
    SMOLLM = "smollm"
    QWEN2 = "qwen2"
    LLAMA3 = "llama-bpe"

    @property
    def regexes(self) -> tuple[str, ...]:
        """The split expressions, applied in order (Oniguruma syntax)."""
        return _PRE_TOKENIZER_REGEXES[self]

    @classmethod
    def from_gguf_name(cls, name: str) -> PreTokenizer:
        """The pre-tokenizer a GGUF file names in `tokenizer.ggml.pre`.

        Raises:
            ValueError: naming the unknown value and the supported ones.
        """
        try:
            return cls(name)
        except ValueError:
            supported = ", ".join(repr(p.value) for p in cls)
            raise ValueError(
                f"Unsupported GGUF pre-tokenizer tokenizer.ggml.pre={name!r}; supported: "
                f"{supported}. Load the model from a Hugging Face folder with its "
                "tokenizer.json instead."
            ) from None


# GPT-2's word regex as llama.cpp writes it (its trailing `|\s+` alternative is implied:
# text a pattern does not match stays a piece of its own).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_REGEXES: dict[PreTokenizer, tuple[str, ...]] = {
    PreTokenizer.GPT2: (_GPT2_REGEX,),
    # SmolLM2's tokenizer.json: Digits(individual_digits=True), then GPT-2's ByteLevel.
    PreTokenizer.SMOLLM: (r"\p{N}", _GPT2_REGEX),
    PreTokenizer.QWEN2: (_QWEN2_REGEX,),
    PreTokenizer.LLAMA3: (_LLAMA3_REGEX,),
}


class TokenType(enum.IntEnum):
    """GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts of control tokens that end a turn in the chat models this package loads; a
# decoding loop stops at any of them, as llama.cpp does with its end-of-generation set.
END_OF_GENERATION_TEXTS = frozenset(
    {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>"}
)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A ChatML chat template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    Attributes:
        default_system_prompt: inserted as a first system message when the conversation
            does not start with one (SmolLM2-Instruct: "You are a helpful AI assistant
            named SmolLM, trained by Hugging Face"); None inserts nothing.
    """

    default_system_prompt: str | None = None

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Formats a conversation.

        Args:
            messages: dicts with string `role` and `content`, in order.
            add_generation_prompt: end with `<|im_start|>assistant\\n`, the prefix of the
                model's reply.

        Returns:
            The prompt text; it contains the special tokens as text, which `encode` maps
            to their ids.

        Raises:
            ValueError: if a message is not a mapping with string `role` and `content`.
        """
        parts = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not all(
                isinstance(message.get(key), str) for key in ("role", "content")
            ):
                raise ValueError(
                    f"Chat message {i} must be a mapping with string 'role' and 'content', "
                    f"got {message!r}."
                )
            if i == 0 and message["role"] != "system" and self.default_system_prompt is not None:
                parts.append(_chatml_turn("system", self.default_system_prompt))
            parts.append(_chatml_turn(message["role"], message["content"]))
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    @classmethod
    def from_jinja(cls, source: str) -> ChatTemplate:
        """Recognises a ChatML Jinja template and extracts its default system prompt.

        Args:
            source: the Jinja template text (GGUF `tokenizer.chat_template` or
                `tokenizer_config.json`'s `chat_template`).

        Returns:
            The equivalent `ChatTemplate`.

        Raises:
            ValueError: if the template is not ChatML.
        """
        if "<|im_start|>" not in source or "<|im_end|>" not in source:
            raise ValueError(
                "Only ChatML chat templates (<|im_start|>role ... <|im_end|>) are supported; "
                f"this template starts {source[:120]!r}. Prompt the model without the chat "
                "template instead (generate --no-chat)."
            )
        match = _DEFAULT_SYSTEM_PROMPT.search(source)
        if match is None:
            return cls(default_system_prompt=None)
        prompt = match.group(1).replace("\\n", "\n").replace("\\'", "'")
        return cls(default_system_prompt=prompt)


# A literal system turn inside a Jinja string: the newline after the role is either a
# real newline or the escape `\n`, and the content is a literal (no quote, no `+`).
_DEFAULT_SYSTEM_PROMPT = re.compile(
    r"<\|im_start\|>system(?:\n|\\n)((?:[^'\"+<\\]|\\n|\\')+?)<\|im_end\|>"
)


def _chatml_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A byte-level BPE tokenizer and the special ids a decoding loop needs.

    Attributes:
        backend: the `tokenizers.Tokenizer` that encodes and decodes.
        vocab_size: number of ids, `max id + 1` over the vocabulary and added tokens.
        bos_id: beginning-of-sequence id, or None if the model has none.
        eos_id: end-of-sequence id.
        pad_id: id placed in padding positions (its value never affects results).
        stop_ids: ids that end generation: `eos_id` and the model's other end-of-turn
            tokens.
        add_bos: whether `encode` prepends `bos_id` (False for SmolLM2 and Qwen2).
        chat_template: the model's chat format, or None if it has none.
    """

    backend: tokenizers.Tokenizer
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]
    add_bos: bool = False
    chat_template: ChatTemplate | None = None

    def __post_init__(self):
        named = {"eos_id": self.eos_id, "pad_id": self.pad_id}
        if self.bos_id is not None:
            named["bos_id"] = self.bos_id
        named.update({f"stop_ids[{i}]": s for i, s in enumerate(self.stop_ids)})
        for name, value in named.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Tokenizer.{name} must be an int, got {value!r}.")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"Tokenizer.{name}={value} is outside the vocabulary [0, {self.vocab_size})."
                )
        if self.eos_id not in self.stop_ids:
            raise ValueError(f"Tokenizer.stop_ids {self.stop_ids} must include eos_id.")
        if self.add_bos and self.bos_id is None:
            raise ValueError("Tokenizer.add_bos is True but the tokenizer has no bos_id.")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with `bos_id` first if `add_bos`.

        Special tokens written as text (e.g. `<|im_start|>`) map to their ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else list(ids)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of token ids; bytes that do not form valid UTF-8 become U+FFFD.

        Args:
            ids: token ids (any integer sequence or 1-D array).
            skip_special_tokens: drop control tokens such as BOS and `<|im_end|>`.
        """
        return self.backend.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Formats a conversation with the model's chat template.

        Args:
            messages: dicts with `role` ("system", "user", "assistant") and `content`.
            add_generation_prompt: end with the prefix of the assistant's reply.

        Returns:
            The prompt text, to be passed to `encode`.

        Raises:
            ValueError: if the tokenizer has no chat template.
        """
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no ChatML chat template; prompt the model with plain "
                "text instead (generate --no-chat)."
            )
        return self.chat_template.render(messages, add_generation_prompt)

    def prompt_text(self, prompt: str, chat: bool = True) -> str:
        """The text to encode for one prompt.

        Args:
            prompt: the user's message.
            chat: wrap it as one user message in the chat template, followed by the
                prefix of the assistant's reply. Without a template (base and toy models)
                the prompt is used as is.

        Returns:
            The text to pass to `encode`.
        """
        if not chat or self.chat_template is None:
            return prompt
        return self.apply_chat_template([{"role": "user", "content": prompt}])

    def check_fits(self, num_embeddings: int, where: str) -> None:
        """Checks that every token id has a row in a model's embedding table.

        A tokenizer may have fewer ids than the table has rows: checkpoints pad the table
        to a round size (Qwen2: 151,665 ids, 151,936 rows), and the extra rows are never
        produced by `encode`. Generation must then not sample them; see
        `uhlm_jax.sampling.mask_unused_ids`, which masks ids `>= vocab_size`.

        Args:
            num_embeddings: rows of the model's embedding table (`ModelConfig.vocab_size`).
            where: the checkpoint, for the message.

        Raises:
            ValueError: naming both sizes, if the tokenizer has more ids than rows.
        """
        if self.vocab_size > num_embeddings:
            raise ValueError(
                f"{where}: the tokenizer has {self.vocab_size} ids but the model's embedding "
                f"table has only {num_embeddings} rows; the tokenizer belongs to a different "
                "model. Use the tokenizer shipped with these weights."
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face `tokenizer.json`.

        The special tokens, `add_bos_token` and the chat template come from the
        `tokenizer_config.json` beside it when there is one. Without it, EOS is the first
        of the known end-of-turn tokens the vocabulary contains.

        Args:
            path: the `tokenizer.json` file.

        Returns:
            The `Tokenizer`.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if the file cannot be parsed or no EOS token can be determined.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"Cannot parse tokenizer file {path}: {err}") from err
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config: dict[str, Any] = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        vocab = backend.get_vocab(with_added_tokens=True)

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, Mapping):  # {"content": "<|im_end|>", ...}
                token = token.get("content")
            if token is None:
                return None
            if token not in vocab:
                raise ValueError(
                    f"{config_path}: {key}={token!r} is not in the vocabulary of {path}."
                )
            return vocab[token]

        eos_id = token_id("eos_token")
        if eos_id is None:
            eos_id = next(
                (vocab[t] for t in sorted(END_OF_GENERATION_TEXTS) if t in vocab), None
            )
        if eos_id is None:
            raise ValueError(
                f"Cannot determine the EOS token of {path}: add a tokenizer_config.json "
                "with eos_token beside it."
            )
        bos_id = token_id("bos_token")
        pad_id = token_id("pad_token")
        template = config.get("chat_template")
        return cls(
            backend=backend,
            vocab_size=max(vocab.values()) + 1,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=eos_id if pad_id is None else pad_id,
            stop_ids=_stop_ids(eos_id, vocab),
            add_bos=bool(config.get("add_bos_token", False)) and bos_id is not None,
            chat_template=_chat_template_or_none(template),
        )

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | GGUFReader) -> Tokenizer:
        """Rebuilds the tokenizer stored in a GGUF file's metadata.

        Supports byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) with the
        pre-tokenizers of `PreTokenizer`. Control and user-defined tokens become added
        tokens, so their text in a prompt maps to their id.

        Args:
            source: a GGUF path or an open `gguf.GGUFReader`.

        Returns:
            The `Tokenizer`.

        Raises:
            ValueError: for a missing or unsupported tokenizer model or pre-tokenizer, or
                inconsistent metadata; naming the file and key.
        """
        # gguf.py imports this module for `load_gguf`, so the reader helpers are imported
        # here rather than at the top.
        from uhlm_jax.models.gguf import gguf_path, metadata_value, open_gguf

        reader = open_gguf(source) if isinstance(source, str | os.PathLike) else source
        where = gguf_path(reader)

        def value(key: str, default: Any = dataclasses.MISSING) -> Any:
            return metadata_value(reader, key, default)

        model = value("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{where}: tokenizer.ggml.model={model!r} is not supported; only byte-level "
                "BPE ('gpt2') vocabularies can be rebuilt. Load the model from a Hugging "
                "Face folder with its tokenizer.json instead."
            )
        pre = PreTokenizer.from_gguf_name(value("tokenizer.ggml.pre", "gpt2"))
        tokens = list(value("tokenizer.ggml.tokens"))
        types = list(value("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
        if len(types) != len(tokens):
            raise ValueError(
                f"{where}: {len(tokens)} tokens but {len(types)} token types in the metadata."
            )
        merges = []
        for merge in value("tokenizer.ggml.merges", []):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{where}: malformed BPE merge {merge!r}.")
            merges.append((pair[0], pair[1]))
        eos_id = int(value("tokenizer.ggml.eos_token_id"))
        bos_id = value("tokenizer.ggml.bos_token_id", None)
        bos_id = None if bos_id is None else int(bos_id)
        pad_id = value("tokenizer.ggml.padding_token_id", None)
        specials = {
            i: TokenType(t)
            for i, t in enumerate(types)
            if t in (TokenType.CONTROL, TokenType.USER_DEFINED)
        }
        backend = _byte_level_bpe(tokens, merges, pre, specials)
        template = value("tokenizer.chat_template", None)
        vocab = {t: i for i, t in enumerate(tokens) if specials.get(i) is TokenType.CONTROL}
        return cls(
            backend=backend,
            vocab_size=len(tokens),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=eos_id if pad_id is None else int(pad_id),
            stop_ids=_stop_ids(eos_id, vocab),
            add_bos=bool(value("tokenizer.ggml.add_bos_token", False)) and bos_id is not None,
            chat_template=_chat_template_or_none(template),
        )


def _chat_template_or_none(source: str | None) -> ChatTemplate | None:
    """The ChatML template of `source`; None if absent or not ChatML (used only on demand)."""
    if not source:
        return None
    try:
        return ChatTemplate.from_jinja(source)
    except ValueError:
        return None


def _stop_ids(eos_id: int, control_vocab: Mapping[str, int]) -> tuple[int, ...]:
    others = sorted(
        i for t, i in control_vocab.items() if t in END_OF_GENERATION_TEXTS and i != eos_id
    )
    return (eos_id, *others)


def _byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[tuple[str, str]],
    pre: PreTokenizer,
    specials: Mapping[int, TokenType],
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` over GPT-2's printable byte alphabet.

    Args:
        tokens: the vocabulary; token `i` has id `i`.
        merges: BPE merges in priority order.
        pre: the split expressions applied before BPE.
        specials: id -> CONTROL (special, skipped when decoding) or USER_DEFINED
            (matched in text, kept when decoding).
    """
    backend = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges))
    )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(
            tokens[i],
            special=kind is TokenType.CONTROL,
            normalized=False,
            lstrip=False,
            rstrip=False,
            single_word=False,
        )
        for i, kind in sorted(specials.items())
    ]
    backend.add_special_tokens([a for a in added if a.special])
    backend.add_tokens([a for a in added if not a.special])
    return backend


# Texts of the toy vocabulary's specials, ids TOY_BOS_ID..TOY_RESERVED_ID in order.
TOY_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<reserved>")


def toy_tokenizer() -> Tokenizer:
    """The toy models' tokenizer: byte `i` is id `i`, then BOS 256, EOS 257, PAD 258 and a
    reserved id 259; 260 ids in all.

    It is a byte-level BPE without merges, so each UTF-8 byte of the text is one token.
    `encode` prepends BOS; there is no chat template.
    """
    alphabet = _gpt2_byte_alphabet()
    tokens = [*alphabet, *TOY_SPECIAL_TOKENS]
    assert len(tokens) == TOY_VOCAB_SIZE and TOY_RESERVED_ID == TOY_VOCAB_SIZE - 1
    specials = {TOY_BOS_ID + i: TokenType.CONTROL for i in range(len(TOY_SPECIAL_TOKENS))}
    backend = _byte_level_bpe(tokens, [], PreTokenizer.GPT2, specials)
    return Tokenizer(
        backend=backend,
        vocab_size=len(tokens),
        bos_id=TOY_BOS_ID,
        eos_id=TOY_EOS_ID,
        pad_id=TOY_PAD_ID,
        stop_ids=(TOY_EOS_ID,),
        add_bos=True,
        chat_template=None,
    )


def _gpt2_byte_alphabet() -> list[str]:
    """The printable character GPT-2's byte-level encoding assigns to each byte 0..255.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to
    U+0100 onwards (Radford et al. 2019, `bytes_to_unicode` in GPT-2's encoder.py).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    alphabet = {}
    extra = 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]
