"""Loading in bounded memory and in lower-precision dtypes.

The memory tests write a ~200 MB model with random weights (a GGUF file with the `gguf`
package's writer, and the same tensors as a sharded safetensors folder), load it in a
fresh subprocess (`benchmarks.load.load_in_child`) and compare the subprocess's peak
resident memory (VmHWM) with what it held before loading. Linux's `ru_maxrss` would
not do: it carries the launching process's peak across exec, so a child of pytest
(holding the fixture) would report pytest's peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from benchmarks.load import PEAK_RATIO, load_in_child
from tests.helpers import hf_config_json, random_hf_tensors, write_gguf
from uhlm_jax.models import registry
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.gguf import load_gguf
from uhlm_jax.models.llama import forward, params_to_hf
from uhlm_jax.models.toy import TOY_LLM_CONFIG, toy_pair

linux_only = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(),
    reason="peak memory is read from /proc/self/status (Linux)",
)

# Logits of a lower-precision load against float32, relative to the largest |logit|.
# bfloat16 keeps 8 significant bits (epsilon 2^-8), float16 11 (2^-11). Weights are
# rounded once when loaded, and activations after each matmul and residual add, so the
# roundings of the toy LLM's 4 layers add up to a few epsilon of the logit scale: we allow
# 4 epsilon. (Measured: 1.7 epsilon in bfloat16, 2.4 in float16.)
LOGIT_RTOL = {"bfloat16": 4 * 2.0**-8, "float16": 4 * 2.0**-11}

# About 200 MB of float32: 16 layers of 12.6 MB. No parameter exceeds 6.3 MB, so the
# bound measures the loader, not one outsized tensor.
MEMORY_CONFIG = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=16,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    rope_theta=10_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    qkv_bias=False,
)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, Path]:
    """A ~200 MB random model as a GGUF file and as a 4-shard safetensors folder."""
    folder = tmp_path_factory.mktemp("big")
    tensors = random_hf_tensors(MEMORY_CONFIG)
    # One tensor per layer quantized, so chunked dequantization is measured too.
    q8_0 = tuple(name for name in tensors if name.endswith("o_proj.weight"))
    gguf_file = write_gguf(folder / "big.gguf", MEMORY_CONFIG, tensors, q8_0=q8_0)

    hf = folder / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_json(MEMORY_CONFIG)))
    names = list(tensors)
    shards = np.array_split(np.arange(len(names)), 4)
    weight_map = {}
    for k, index in enumerate(shards):
        shard = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in index}
        safetensors.numpy.save_file(part, hf / shard)
        weight_map |= dict.fromkeys(part, shard)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return gguf_file, hf


def _assert_lean(measured: dict, what: str) -> None:
    ratio = measured["increase"] / measured["param_bytes"]
    assert ratio <= PEAK_RATIO, (
        f"{what}: peak grew by {measured['increase'] / 1e6:.0f} MB for "
        f"{measured['param_bytes'] / 1e6:.0f} MB of params ({ratio:.2f}x > {PEAK_RATIO}x)"
    )


@pytest.mark.slow
@linux_only
def test_gguf_loads_within_the_peak_bound_cold_writing_and_reading_the_cache(
    big_model, tmp_path
):
    gguf_file, _ = big_model
    cache = str(tmp_path / "cache")
    # Given a ~200 MB GGUF file, loaded without the cache, in float32 and bfloat16
    for dtype in ("float32", "bfloat16"):
        measured = load_in_child(gguf_file, dtype, cache="")
        assert measured["param_bytes"] > 100e6
        _assert_lean(measured, f"GGUF, no cache, {dtype}")
    # When it is loaded writing the cache, then from the cache
    _assert_lean(load_in_child(gguf_file, "float32", cache), "GGUF writing the cache")
    assert len(list(Path(cache).glob("*.safetensors"))) == 1
    _assert_lean(load_in_child(gguf_file, "float32", cache), "GGUF from the cache")


@pytest.mark.slow
@linux_only
def test_sharded_safetensors_load_within_the_peak_bound(big_model):
    _, hf = big_model
    measured = load_in_child(hf, "float32", cache="", weights_only=True)
    assert measured["param_bytes"] > 190e6
    _assert_lean(measured, "sharded safetensors")


@pytest.fixture(scope="module")
def toy_gguf(tmp_path_factory) -> Path:
    """The toy LLM written as a GGUF file."""
    llm = toy_pair()[1]
    folder = tmp_path_factory.mktemp("toy")
    return write_gguf(folder / "toy-llm.gguf", TOY_LLM_CONFIG, params_to_hf(llm))


@pytest.mark.parametrize("dtype", sorted(LOGIT_RTOL))
def test_lower_precision_load_keeps_logits_near_float32(toy_gguf, dtype):
    # Given the toy LLM loaded in float32 and in a lower precision
    reference, _ = load_gguf(toy_gguf, jnp.float32)
    low, _ = load_gguf(toy_gguf, dtype)
    assert low.dtype == jnp.dtype(dtype)
    # When both score the same random byte sequences
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32)), jnp.int32)
    lengths = jnp.full((8,), 32, jnp.int32)
    expected = forward(reference, tokens, lengths)
    logits = forward(low, tokens, lengths)
    # Then the logits come back in float32, within the stated tolerance of float32's,
    # so log-space verification downstream runs in float32
    assert logits.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGIT_RTOL[dtype] * scale)
    assert jax.nn.log_softmax(logits).dtype == jnp.float32


def test_load_model_takes_a_dtype_and_names_the_allowed_ones():
    assert registry.load_model(registry.TOY_LLM, "bfloat16").params.dtype == jnp.bfloat16
    assert registry.dtype_name(jnp.float16) == "float16"
    with pytest.raises(ValueError, match="Unknown dtype 'float8'; use one of float32, bfloat16"):
        registry.load_model(registry.TOY_LLM, "float8")
    with pytest.raises(ValueError, match="Unknown dtype"):
        registry.load_model(registry.TOY_LLM, jnp.int32)
