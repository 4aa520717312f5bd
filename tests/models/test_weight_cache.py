"""The on-disk cache of dequantized GGUF models."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize

from tests.helpers import TINY_LLAMA, random_hf_tensors, write_gguf
from uhlm_jax.models import weight_cache
from uhlm_jax.models.gguf import load_gguf, read_gguf
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


@pytest.fixture
def calls(monkeypatch):
    """The GGUF files read (not served from the cache), in order."""
    read = []

    def counting(path):
        read.append(path)
        return read_gguf(path)

    monkeypatch.setattr(weight_cache, "read_gguf", counting)
    return read


def _assert_same(a, b):
    assert a.config == b.config
    leaves_a, tree_a = jax.tree.flatten(a.weights)
    leaves_b, tree_b = jax.tree.flatten(b.weights)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_load_reads_the_cache_and_returns_the_same_model(gguf_file, calls):
    # Given a GGUF file loaded once through the cache
    params, tokenizer = weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    assert weight_cache.entry_path(gguf_file).is_file()
    # When it is loaded again
    again, tokenizer_again = weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # Then the file is not dequantized again, and weights, config and tokenizer are equal
    assert len(calls) == 1
    _assert_same(params, again)
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])
    for field in ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "add_bos"):
        assert getattr(tokenizer_again, field) == getattr(tokenizer, field)
    assert tokenizer_again.chat_template == tokenizer.chat_template == ChatTemplate()
    text = "Hello, world 123!"
    assert tokenizer_again.encode(text) == tokenizer.encode(text)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_each_dtype_has_its_own_entry_holding_that_dtype(gguf_file, calls, dtype):
    # Given a float32 entry
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # When the file is loaded in another dtype, twice
    params, _ = weight_cache.cached_gguf_load(gguf_file, dtype)
    again, _ = weight_cache.cached_gguf_load(gguf_file, dtype)
    # Then it is read once more and stored in that dtype, equal to a direct load
    assert len(calls) == 2
    entry = weight_cache.entry_path(gguf_file, dtype)
    assert entry != weight_cache.entry_path(gguf_file, jnp.float32)
    assert {e.dtype for e in weight_cache.entries()} == {"float32", jnp.dtype(dtype).name}
    _assert_same(params, load_gguf(gguf_file, dtype)[0])
    _assert_same(again, params)


def test_a_copy_elsewhere_shares_the_entry(gguf_file, calls, tmp_path):
    # Given a cached file
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # When a byte-identical copy at another path, with another mtime, is loaded
    copy = tmp_path / "clone" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copyfile(gguf_file, copy)
    os.utime(copy, ns=(0, 10**18))
    weight_cache.cached_gguf_load(copy, jnp.float32)
    # Then it is served from the same entry
    assert weight_cache.entry_path(copy) == weight_cache.entry_path(gguf_file)
    assert len(calls) == 1
    assert len(weight_cache.entries()) == 1


def test_a_changed_file_is_read_again(gguf_file, calls):
    # Given a cached file
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # When the file is rewritten with other weights of the same shapes (same size)
    size = os.path.getsize(gguf_file)
    write_gguf(
        gguf_file, TINY_LLAMA, random_hf_tensors(TINY_LLAMA, seed=1), chat_template=CHATML
    )
    assert os.path.getsize(gguf_file) == size
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # Then it is dequantized again and the new weights are returned
    assert len(calls) == 2
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])


def test_a_damaged_entry_is_rebuilt(gguf_file, calls):
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    entry = weight_cache.entry_path(gguf_file)
    entry.write_bytes(b"not a safetensors file")
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    assert len(calls) == 2
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])
    assert entry.stat().st_size > 1000


def test_entries_are_written_with_the_umask_mode(gguf_file):
    # Given a umask of 022 (the usual) or 027
    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            weight_cache.clear()
            weight_cache.cached_gguf_load(gguf_file, jnp.float32)
        finally:
            os.umask(old)
        # Then the entry is readable as any file the user writes: 0666 less the umask
        mode = weight_cache.entry_path(gguf_file).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask


def test_an_unwritable_cache_folder_only_costs_the_speed_up(gguf_file, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(weight_cache.CACHE_ENV, str(blocker / "cache"))
    params, _ = weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    _assert_same(params, load_gguf(gguf_file, jnp.float32)[0])
    assert weight_cache.entries() == []


def test_a_failed_load_leaves_no_file(gguf_file, monkeypatch):
    # Given a file whose third tensor cannot be read
    reads = []

    def failing(data, qtype):
        reads.append(qtype)
        if len(reads) == 3:
            raise OSError("read error")
        return dequantize(data, qtype)

    monkeypatch.setattr("uhlm_jax.models.gguf.dequantize", failing)
    # When loading it fails half way
    with pytest.raises(OSError, match="read error"):
        weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    # Then neither an entry nor a temporary file is left behind
    assert list(weight_cache.cache_dir().iterdir()) == []


def test_entries_list_and_clear(gguf_file):
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    weight_cache.cached_gguf_load(gguf_file, jnp.bfloat16)
    listed = weight_cache.entries()
    assert {(e.source, e.dtype) for e in listed} == {
        ("tiny.gguf", "float32"),
        ("tiny.gguf", "bfloat16"),
    }
    assert all(e.size_bytes == e.path.stat().st_size for e in listed)
    assert weight_cache.clear() == listed
    assert weight_cache.entries() == []


def test_empty_cache_dir_turns_the_cache_off(gguf_file, monkeypatch, calls):
    monkeypatch.setenv(weight_cache.CACHE_ENV, "")
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    weight_cache.cached_gguf_load(gguf_file, jnp.float32)
    assert weight_cache.cache_dir() is None
    assert weight_cache.entries() == []
    assert len(calls) == 2
