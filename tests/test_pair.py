"""Model pairs: named pairs and pairs of two models given by name or path."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.helpers import TINY_LLAMA, random_hf_tensors, write_gguf
from uhlm_jax.pair import PAIR_SEPARATOR, load_pair


def _same_params(a, b):
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_model_spec_equals_the_named_pair():
    named = load_pair("toy")
    spec = load_pair(f"toy-slm{PAIR_SEPARATOR}toy-llm")
    assert spec.name == "toy-slm,toy-llm"
    _same_params(spec.slm, named.slm)
    _same_params(spec.llm, named.llm)


def test_two_model_spec_loads_files(tmp_path):
    slm = write_gguf(tmp_path / "slm.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA, seed=1))
    llm = write_gguf(tmp_path / "llm.gguf", TINY_LLAMA, random_hf_tensors(TINY_LLAMA, seed=2))
    pair = load_pair(f"{slm},{llm}")
    assert pair.slm.config == pair.llm.config == TINY_LLAMA
    assert pair.tokenizer.vocab_size == 260
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_pair(f"{slm},{tmp_path / 'missing.gguf'}")


def test_unknown_pair_names_both_ways_to_give_one():
    with pytest.raises(ValueError, match=r"Known pairs: toy, smollm2-exit.*'SLM,LLM'"):
        load_pair("tiny")
