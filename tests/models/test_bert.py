"""Tests of the BERT encoder, its sentence embeddings and the all-MiniLM-L6-v2 loader.

Oracles: a plain NumPy BERT, one row at a time, over Hugging Face-named tensors (checks
the weight mapping and the network); each row alone against the padded batch, in either
padding position; eager against jit; hand-computed pooling. Agreement with
sentence-transformers uses the fixture in tests/fixtures/minilm_reference, written by
make_minilm_reference.py (torch is not needed here).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models import bert, sentence_encoder
from uhlm_jax.models.bert import BertConfig, embed, hidden_states, init_params, params_from_hf
from uhlm_jax.models.sentence_encoder import (
    MINILM_INSTALL_COMMAND,
    embed_texts,
    load_minilm,
    pad_rows,
    read_sentence_encoder,
    sentence_similarity,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "minilm_reference"
# The bar for agreement with sentence-transformers, per sentence.
REFERENCE_MIN_COSINE = 0.9999
# Different paths (batch vs alone, jit vs eager, NumPy vs JAX) agree to float32 rounding.
PATH_ATOL = 2e-5
# Weights of order one, so hidden states vary a lot and a bug shows.
WEIGHT_STD = 0.3

TINY = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=24,
    max_positions=20,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def _random_hf_tensors(config: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i = config.hidden_size, config.intermediate_size

    def w(*shape):
        return (WEIGHT_STD * rng.standard_normal(shape)).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": w(config.vocab_size, h),
        "embeddings.position_embeddings.weight": w(config.max_positions, h),
        "embeddings.token_type_embeddings.weight": w(config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": 1 + w(h),
        "embeddings.LayerNorm.bias": w(h),
        "embeddings.position_ids": np.arange(config.max_positions)[None],
        "pooler.dense.weight": w(h, h),
        "pooler.dense.bias": w(h),
    }
    for n in range(config.num_layers):
        p = f"encoder.layer.{n}"
        for name, shape in (
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("intermediate.dense", (i, h)),
            ("output.dense", (h, i)),
        ):
            tensors[f"{p}.{name}.weight"] = w(*shape)
            tensors[f"{p}.{name}.bias"] = w(shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{p}.{name}.weight"] = 1 + w(h)
            tensors[f"{p}.{name}.bias"] = w(h)
    return tensors


def _numpy_embedding(config: BertConfig, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """BertModel on one unpadded sentence, then mean pooling and L2 normalisation."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps = config.layer_norm_eps

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    n_tokens, heads, d = len(ids), config.num_heads, config.head_dim
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n_tokens]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "embeddings.LayerNorm")
    for n in range(config.num_layers):
        p = f"encoder.layer.{n}"
        q, k, v = (
            linear(x, f"{p}.attention.self.{m}").reshape(n_tokens, heads, d)
            for m in ("query", "key", "value")
        )
        scores = np.einsum("qnd,knd->nqk", q, k) / math.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("nqk,knd->qnd", probs, v).reshape(n_tokens, -1)
        x = ln(
            x + linear(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
        )
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1 + np.vectorize(math.erf)(inner / math.sqrt(2)))
        x = ln(x + linear(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


SENTENCES = ([3, 7, 9, 4], [3, 11], [3, 5, 6, 7, 8, 9, 10, 12, 4], [3, 4])


def _right_padded(rows, width, pad_id=0):
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        tokens[r, : len(row)], mask[r, : len(row)] = row, True
    return tokens, mask


# --- Given tiny random weights in Hugging Face's layout ---------------------------------


def test_embedding_matches_a_numpy_bert_row_by_row():
    tensors = _random_hf_tensors(TINY)
    params = params_from_hf(TINY, tensors)
    tokens, mask = _right_padded(SENTENCES, 12)
    actual = np.asarray(jax.jit(embed)(params, tokens, mask))
    for r, row in enumerate(SENTENCES):
        np.testing.assert_allclose(actual[r], _numpy_embedding(TINY, tensors, row), atol=PATH_ATOL)


def test_padded_batch_equals_each_row_alone_whatever_the_padding():
    params = params_from_hf(TINY, _random_hf_tensors(TINY, seed=1))
    run = jax.jit(embed)
    alone = np.stack(
        [np.asarray(run(params, *_right_padded([row], len(row))))[0] for row in SENTENCES]
    )
    tokens, mask = _right_padded(SENTENCES, 16, pad_id=7)
    np.testing.assert_allclose(run(params, tokens, mask), alone, atol=PATH_ATOL)
    # Left padding: positions count real tokens, so moving the padding changes nothing.
    left_tokens, left_mask = tokens[:, ::-1].copy(), mask[:, ::-1].copy()
    for r, row in enumerate(SENTENCES):
        left_tokens[r, 16 - len(row) :] = row
    np.testing.assert_allclose(run(params, left_tokens, left_mask), alone, atol=PATH_ATOL)


def test_jit_equals_eager_and_an_all_padding_row_is_finite_zero():
    params = init_params(TINY, jax.random.key(0))
    tokens, mask = _right_padded([*SENTENCES, []], 10)
    eager = embed(params, jnp.asarray(tokens), jnp.asarray(mask))
    jitted = jax.jit(embed)(params, tokens, mask)
    np.testing.assert_allclose(jitted, eager, atol=PATH_ATOL)
    assert np.all(np.isfinite(jitted))
    np.testing.assert_array_equal(np.asarray(jitted)[-1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(jitted)[:-1], axis=-1), 1.0, atol=1e-6)


def test_token_types_enter_the_embedding():
    params = params_from_hf(TINY, _random_hf_tensors(TINY))
    tokens, mask = _right_padded(SENTENCES[:1], 4)
    zero = hidden_states(params, tokens, mask)
    same = hidden_states(params, tokens, mask, token_type_ids=np.zeros_like(tokens))
    other = hidden_states(params, tokens, mask, token_type_ids=np.ones_like(tokens))
    np.testing.assert_array_equal(zero, same)
    assert not np.allclose(zero, other)


def test_mean_pool_and_normalize_by_hand():
    hidden = jnp.array([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    pooled = bert.mean_pool(hidden, jnp.array([[True, True, False]]))
    np.testing.assert_allclose(pooled, [[2.0, 4.0]])
    np.testing.assert_allclose(bert.l2_normalize(pooled), [[1 / math.sqrt(5), 2 / math.sqrt(5)]])
    np.testing.assert_array_equal(bert.l2_normalize(jnp.zeros((1, 2))), 0.0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 18}, "not a multiple of num_heads"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a positive float"),
        ({"vocab_size": True}, "vocab_size must be a positive int"),
    ],
)
def test_config_rejects_bad_values(change, message):
    fields = {**TINY.__dict__, **change}
    with pytest.raises(ValueError, match=message):
        BertConfig(**fields)


MINILM_HF_CONFIG = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}


def test_hf_config_conversion_and_rejections():
    hf = MINILM_HF_CONFIG
    assert BertConfig.from_hf_config(hf) == bert.MINILM_L6_H384
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        BertConfig.from_hf_config({**hf, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="absolute position"):
        BertConfig.from_hf_config({**hf, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="lacks"):
        BertConfig.from_hf_config({k: v for k, v in hf.items() if k != "vocab_size"})


def test_params_from_hf_names_missing_and_misshapen_tensors():
    tensors = _random_hf_tensors(TINY)
    prefixed = {f"bert.{k}": v for k, v in tensors.items()}
    np.testing.assert_array_equal(
        params_from_hf(TINY, prefixed).weights["layers"][1]["down"]["kernel"],
        tensors["encoder.layer.1.output.dense.weight"].T,
    )
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"Missing tensors .*layer\.1\.output\.dense\.bias"):
        params_from_hf(TINY, missing)
    with pytest.raises(ValueError, match="Tensors not part of a BERT encoder with 2 layers"):
        params_from_hf(
            TINY, {**tensors, "encoder.layer.2.output.dense.bias": tensors["pooler.dense.bias"]}
        )
    bad = {**tensors, "embeddings.word_embeddings.weight": np.zeros((49, 16), np.float32)}
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \(49, 16\)"):
        params_from_hf(TINY, bad)


def test_rows_longer_than_the_positions_are_rejected():
    params = init_params(TINY, jax.random.key(0))
    tokens, mask = _right_padded([[3] * 21], 21)
    with pytest.raises(ValueError, match="exceed the model's 20 positions"):
        embed(params, tokens, mask)


# --- Batching of texts -----------------------------------------------------------------


def test_pad_rows_rounds_the_width_and_adds_padding_rows():
    tokens, mask = pad_rows([[5, 6, 7], [8]], rows=4, length_multiple=4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(mask.sum(1), [3, 1, 0, 0])
    assert pad_rows([[1] * 5], rows=1, length_multiple=4, pad_id=0)[0].shape == (1, 8)
    with pytest.raises(ValueError, match="need len\\(ids\\) <= rows"):
        pad_rows([[1], [2]], rows=1, length_multiple=4, pad_id=0)


# --- The installed all-MiniLM-L6-v2 wheel --------------------------------------------------


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sentence_encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as err:
        sentence_encoder.minilm_zip_path()
    assert MINILM_INSTALL_COMMAND in str(err.value)
    assert "\n" not in str(err.value)


def test_incomplete_or_foreign_zips_are_rejected_naming_the_zip(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(MINILM_HF_CONFIG))
    with pytest.raises(ValueError, match=r"not a sentence-transformers model zip.*1_Pooling"):
        read_sentence_encoder(path)
    members = {
        "config.json": json.dumps(MINILM_HF_CONFIG),
        "sentence_bert_config.json": json.dumps({"max_seq_length": 256}),
        "1_Pooling/config.json": json.dumps({"pooling_mode_cls_token": True}),
        "tokenizer.json": "{}",
        "model.safetensors": b"",
    }
    for change, message in (
        ({}, r"only mean pooling is supported, the model uses \['pooling_mode_cls_token'\]"),
        ({"config.json": json.dumps({**MINILM_HF_CONFIG, "hidden_act": "relu"})}, "hidden_act"),
    ):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in {**members, **change}.items():
                archive.writestr(name, data)
        with pytest.raises(ValueError, match=rf"model\.zip: .*{message}"):
            read_sentence_encoder(path)


@pytest.fixture(scope="module")
def reference():
    return (
        json.loads((FIXTURES / "reference.json").read_text()),
        np.load(FIXTURES / "embeddings.npy"),
    )


@pytest.mark.slow
def test_minilm_tokenizes_as_sentence_transformers(reference):
    texts, expected = reference[0]["texts"], reference[0]["token_ids"]
    encoder = load_minilm()
    assert encoder.max_tokens == reference[0]["max_seq_length"] == 256
    assert encoder.tokenize(texts) == expected


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers(reference):
    (meta, expected) = reference
    actual = embed_texts(load_minilm(), meta["texts"])
    assert actual.shape == expected.shape == (len(meta["texts"]), 384)
    cosines = np.sum(actual * expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosines.min() >= REFERENCE_MIN_COSINE, dict(zip(meta["texts"], cosines, strict=True))


@pytest.mark.slow
def test_minilm_batch_equals_one_at_a_time_and_similarity_is_the_dot_product(reference):
    texts = reference[0]["texts"]
    encoder = load_minilm()
    batched = embed_texts(encoder, texts, batch_size=8, length_multiple=16)
    alone = np.concatenate([embed_texts(encoder, [text]) for text in texts])
    np.testing.assert_allclose(batched, alone, atol=PATH_ATOL)
    similarity = sentence_similarity(encoder, texts[:3], texts[1:4])
    np.testing.assert_allclose(similarity, np.sum(alone[:3] * alone[1:4], -1), atol=PATH_ATOL)
    # Two definitions of CPU are closer than a definition and "Yes.".
    assert similarity[1] > similarity[2]
    assert embed_texts(encoder, []).shape == (0, 384)
