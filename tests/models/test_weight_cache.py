"""The on-disk cache of dequantized GGUF models."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_gguf import TINY_LLAMA, random_hf_tensors, write_gguf
from uhlm_jax.models import weight_cache
from uhlm_jax.models.gguf import load_gguf
from uhlm_jax.models.tokenizer import ChatTemplate

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
)


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv(weight_cache.CACHE_ENV, str(tmp_path / "cache"))
    return write_gguf(
        tmp_path / "tiny.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA), chat_template=CHATML
    )


def _counting_loader():
    calls = []

    def load(path, dtype):
        calls.append(path)
        return load_gguf(path, dtype)

    return load, calls


def _assert_same(a, b):
    assert a.config == b.config
    leaves_a, tree_a = jax.tree.flatten(a.weights)
    leaves_b, tree_b = jax.tree.flatten(b.weights)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_load_reads_the_cache_and_returns_the_same_model(gguf_file):
    # Given a GGUF file loaded once through the cache
    load, calls = _counting_loader()
    params, tokenizer = weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    assert weight_cache.entry_path(gguf_file).is_file()
    # When it is loaded again
    again, tokenizer_again = weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    # Then the file is not dequantized again, and weights, config and tokenizer are equal
    assert len(calls) == 1
    _assert_same(params, again)
    for field in ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "add_bos"):
        assert getattr(tokenizer_again, field) == getattr(tokenizer, field)
    assert tokenizer_again.chat_template == tokenizer.chat_template == ChatTemplate()
    text = "Hello, world 123!"
    assert tokenizer_again.encode(text) == tokenizer.encode(text)


def test_cached_load_casts_to_the_requested_dtype(gguf_file):
    load, _ = _counting_loader()
    weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.bfloat16, load)
    direct, _ = load_gguf(gguf_file, jnp.bfloat16)
    _assert_same(params, direct)


def test_a_changed_file_is_read_again(gguf_file):
    # Given a cached file
    load, calls = _counting_loader()
    weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    # When the file is rewritten with other weights (a new modification time)
    write_gguf(gguf_file, TINY_LLAMA, random_hf_tensors(TINY_LLAMA, seed=1))
    stat = os.stat(gguf_file)
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    # Then it is dequantized again and the new weights are returned
    assert len(calls) == 2
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])


def test_a_damaged_entry_is_rebuilt(gguf_file):
    load, calls = _counting_loader()
    weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    entry = weight_cache.entry_path(gguf_file)
    entry.write_bytes(b"not a safetensors file")
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    assert len(calls) == 2
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])
    assert entry.stat().st_size > 1000


def test_empty_cache_dir_turns_the_cache_off(gguf_file, monkeypatch):
    monkeypatch.setenv(weight_cache.CACHE_ENV, "")
    load, calls = _counting_loader()
    weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    weight_cache.cached_gguf_load(gguf_file, jnp.float32, load)
    assert weight_cache.cache_dir() is None
    assert len(calls) == 2
