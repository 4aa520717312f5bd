"""Tests of the Hugging Face loader against logits computed by transformers.

The fixtures in tests/fixtures/hf_reference were written by make_hf_reference.py with
torch and transformers (versions in its header); these tests need neither.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from uhlm_jax.models import (
    Architecture,
    ModelConfig,
    Padding,
    init_cache,
    load_hf_checkpoint,
    read_safetensors,
)
from uhlm_jax.models import decode as eager_decode
from uhlm_jax.models import forward as eager_forward
from uhlm_jax.models import prefill as eager_prefill

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf_reference"
# Agreement with transformers: absolute error below this fraction of the largest |logit|.
HF_RTOL = 1e-4

prefill = jax.jit(eager_prefill, static_argnames="padding")
decode = jax.jit(eager_decode)
forward = jax.jit(eager_forward, static_argnames="padding")


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "reference.npz") as data:
        return dict(data)


def _case(reference, name):
    return (
        reference[f"{name}_tokens"],
        reference[f"{name}_lengths"],
        reference[f"{name}_logits"],
    )


def assert_matches_hf(actual, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=HF_RTOL * scale)


def test_fixture_configs_convert_to_the_expected_model_configs():
    llama = load_hf_checkpoint(FIXTURES / "llama").config
    assert llama == ModelConfig(
        architecture=Architecture.LLAMA,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        qkv_bias=False,
    )
    qwen2 = load_hf_checkpoint(FIXTURES / "qwen2").config
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.tie_word_embeddings) == (
        Architecture.QWEN2,
        True,
        True,
    )
    assert (qwen2.num_heads, qwen2.num_kv_heads, qwen2.head_dim) == (4, 1, 8)
    assert qwen2.rope_theta == 1_000_000.0


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_forward_logits_match_transformers(reference, name):
    # llama: sharded float32; qwen2: single bfloat16 file, tied head, q/k/v bias.
    params = load_hf_checkpoint(FIXTURES / name)
    tokens, lengths, expected = _case(reference, name)
    logits = forward(params, jnp.asarray(tokens), jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        assert_matches_hf(logits[row, :n], expected[row, :n])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", [Padding.RIGHT, Padding.LEFT])
def test_prefill_and_decode_logits_match_transformers(reference, name, padding):
    # Given each row's first tokens as a prompt, the rest fed one at a time.
    params = load_hf_checkpoint(FIXTURES / name)
    tokens, lengths, expected = _case(reference, name)
    prompt_lengths = np.maximum(lengths - 3, 1)
    t = int(prompt_lengths.max())
    prompts = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(prompt_lengths):
        if padding is Padding.RIGHT:
            prompts[row, :n] = tokens[row, :n]
        else:
            prompts[row, t - n :] = tokens[row, :n]

    cache = init_cache(params.config, len(lengths), max_length=int(lengths.max()))
    logits, cache = prefill(
        params, jnp.asarray(prompts), jnp.asarray(prompt_lengths), cache, padding=padding
    )
    rows = np.arange(len(lengths))
    assert_matches_hf(logits, expected[rows, prompt_lengths - 1])
    for step in range(2):
        position = np.minimum(prompt_lengths + step, lengths - 1)
        logits, cache = decode(params, jnp.asarray(tokens[rows, position]), cache)
        live = prompt_lengths + step < lengths  # rows whose reference goes this far
        assert_matches_hf(np.asarray(logits)[live], expected[rows, position][live])


def test_bfloat16_loading_keeps_the_stored_values(reference):
    stored = read_safetensors(FIXTURES / "qwen2" / "model.safetensors")
    table = stored["model.embed_tokens.weight"]
    assert table.dtype.name == "bfloat16"
    params = load_hf_checkpoint(FIXTURES / "qwen2", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(params.weights["embed_tokens"]["embedding"]), table)


def test_read_safetensors_round_trips_numpy_arrays(tmp_path):
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.asarray([-1, 7], np.int32),
        "c": np.float16(2.5) * np.ones((2, 1, 2), np.float16),
    }
    safetensors.numpy.save_file(arrays, tmp_path / "x.safetensors")
    loaded = read_safetensors(tmp_path / "x.safetensors")
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


# ---------------------------------------------------------------------------------------
# Errors.


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def test_truncated_weights_file_is_reported_with_sizes(tmp_path):
    folder = _copy("qwen2", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"{path.name} is truncated: .* needs {len(data)} bytes"):
        load_hf_checkpoint(folder)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="too short for a header"):
        load_hf_checkpoint(folder)


def test_missing_files_are_named(tmp_path):
    folder = _copy("llama", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"Shard .*{shard.name}.* does not exist"):
        load_hf_checkpoint(folder)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_hf_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_hf_checkpoint(folder)


def test_config_that_disagrees_with_the_tensors_names_the_tensor(tmp_path):
    folder = _copy("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(48, 32\).*\(40, 32\)",
    ):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
            r"Unsupported HF model_type 'gpt2'; supported: .*llama.*qwen2",
        ),
        (dict(architectures=["MistralForCausalLM"]), "Unsupported HF architecture"),
        (dict(model_type="qwen2"), "disagrees with architecture 'LlamaForCausalLM'"),
        (
            dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
            "only plain RoPE",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "only plain RoPE"),
        (dict(use_sliding_window=True), "sliding-window"),
        (dict(attention_bias=True), "attention_bias=true"),
        (dict(mlp_bias=True), "mlp_bias=true"),
        (dict(hidden_size=None), "hidden_size"),
    ],
)
def test_unsupported_hf_configs_are_rejected_with_the_reason(change, message):
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(config)


def test_transformers_4_style_config_keys_are_read():
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    del config["rope_parameters"], config["head_dim"]
    config["rope_theta"] = 1234.0
    converted = ModelConfig.from_hf_config(config)
    assert converted.rope_theta == 1234.0
    assert converted.head_dim == 32 // 4
