"""Tests for the `uhlm cache` job (analysis.cache)."""

import argparse
import json

import jax.numpy as jnp
import pytest

from analysis import cache, cli
from tests.helpers import (
    TINY_LLAMA,
    fake_parts,
    install_parts,
    random_hf_tensors,
    split_of,
    write_gguf,
)
from uhlm_jax.models import split_file, weight_cache


def _parse(argv):
    parser = argparse.ArgumentParser()
    cache.add_arguments(parser)
    return parser.parse_args(argv)


def _strict(text):
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A temporary cache holding one GGUF file in float32 and bfloat16."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(weight_cache.CACHE_ENV, str(folder))
    gguf_file = write_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA))
    for dtype in (jnp.float32, jnp.bfloat16):
        weight_cache.cached_gguf_load(gguf_file, dtype)
    return folder


def test_lists_entries_and_the_total(cache_dir, capsys):
    assert cache.main(_parse([])) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["source", "dtype", "size"]
    assert sorted(line.split()[1] for line in lines[1:3]) == ["bfloat16", "float32"]
    assert all(line.startswith("tiny.gguf") for line in lines[1:3])
    total = sum(p.stat().st_size for p in cache_dir.iterdir())
    assert lines[3] == f"2 entries, {total / 1e6:.1f} MB in {cache_dir}"


def test_json_lists_then_clear_deletes(cache_dir, capsys):
    # Given a cache with two entries, When it is listed as JSON
    assert cli.main(["cache", "--json"]) == 0
    listed = _strict(capsys.readouterr().out)
    # Then each entry is described, with the total
    assert listed["folder"] == str(cache_dir) and listed["cleared"] is False
    assert {(e["source"], e["dtype"]) for e in listed["entries"]} == {
        ("tiny.gguf", "float32"),
        ("tiny.gguf", "bfloat16"),
    }
    assert listed["total_bytes"] == sum(e["size_bytes"] for e in listed["entries"]) > 0
    # When it is cleared
    assert cli.main(["cache", "--clear", "--json"]) == 0
    cleared = _strict(capsys.readouterr().out)
    # Then the same entries are reported deleted, and the folder is empty
    assert cleared["cleared"] is True and cleared["entries"] == listed["entries"]
    assert list(cache_dir.iterdir()) == []
    assert cache.main(_parse([])) == 0
    assert capsys.readouterr().out.strip() == f"{cache_dir}: empty"


def test_older_entries_and_leftovers_are_listed_and_cleared(cache_dir, capsys):
    (cache_dir / "old-0123.safetensors").write_bytes(b"\0" * 16)
    (cache_dir / ".tiny-float32-ab.safetensors.1234.tmp").write_bytes(b"x")
    (cache_dir / "notes.txt").write_text("kept")
    result = cache.run(cache.Config(clear=True))
    assert len(result.entries) == 4
    assert sorted(p.name for p in cache_dir.iterdir()) == ["notes.txt"]
    assert "older format or unfinished" in cache.format_table(result)


def test_a_cache_turned_off_says_so(monkeypatch, capsys):
    monkeypatch.setenv(weight_cache.CACHE_ENV, "")
    assert cache.main(_parse(["--json"])) == 0
    assert _strict(capsys.readouterr().out) == {
        "folder": None, "entries": [], "total_bytes": 0, "cleared": False
    }
    assert cache.main(_parse([])) == 0
    assert "cache is off" in capsys.readouterr().out


def test_assembled_files_are_listed_and_cleared(cache_dir, tmp_path, monkeypatch, capsys):
    # Given a file assembled from wheel parts next to the two dequantized entries
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    parts = fake_parts()
    install_parts(site, parts)
    split = split_of(parts)
    with split_file.assembled(split):
        pass
    # When the cache is listed, Then the assembled file is an entry, its part set the source
    assert cache.main(_parse([])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == [*split.description.split(), "-"] for line in lines)
    assert lines[-1].startswith("3 entries")
    # When it is cleared, Then nothing is left
    assert len(cache.run(cache.Config(clear=True)).entries) == 3
    assert list(cache_dir.iterdir()) == []
