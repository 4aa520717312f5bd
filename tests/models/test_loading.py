"""Loading in bounded memory and in lower-precision dtypes.

The memory tests write a ~200 MB model with random weights (a GGUF file with the `gguf`
package's writer, and the same tensors as a sharded safetensors folder), load it in a
fresh subprocess and compare the subprocess's peak resident memory with what it held
before loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from tests.models.test_gguf import write_gguf
from uhlm_jax.models import registry
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.gguf import load_gguf
from uhlm_jax.models.llama import forward, params_to_hf
from uhlm_jax.models.toy import TOY_LLM_CONFIG, toy_pair

REPO = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(),
    reason="peak memory is read from /proc/self/status (Linux)",
)

# The bound of lean loading: peak resident memory while loading, above what the process
# held before, at most this multiple of the loaded params' bytes (one copy of the model
# plus a quarter for chunks, the allocator and the runtime's own buffers).
PEAK_RATIO = 1.25

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

# Run in a fresh interpreter: load one model, print peak resident bytes above the
# resident bytes held after importing jax and the loaders and starting the CPU backend.
# The peak is the process's VmHWM, not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries
# ru_maxrss across exec, so a child started by a large process (pytest holding the
# fixture) would report its parent's peak.
_CHILD = """
import json, sys
import jax, numpy as np
from uhlm_jax.models.hf import load_hf_checkpoint
from uhlm_jax.models.registry import load_model

def status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

jax.device_put(np.zeros(1)).block_until_ready()
baseline = status_bytes("VmRSS")
kind, path, dtype = sys.argv[1:]
if kind == "hf":
    params = load_hf_checkpoint(path, dtype)
else:
    params = load_model(path, dtype).params
jax.block_until_ready(params)
peak = status_bytes("VmHWM")
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"increase": peak - baseline, "param_bytes": param_bytes}))
"""


def _hf_config(config: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
    }


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, Path]:
    """A ~200 MB random model as a GGUF file and as a 4-shard safetensors folder."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    tensors = {}
    config = MEMORY_CONFIG
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    tensors["model.embed_tokens.weight"] = rng.standard_normal((config.vocab_size, h), np.float32)
    tensors["model.norm.weight"] = np.ones(h, np.float32)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        for name, shape in {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }.items():
            tensors[p + name] = rng.standard_normal(shape, np.float32) * 0.02
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    # One tensor per layer quantized, so chunked dequantization is measured too.
    q8_0 = tuple(name for name in tensors if name.endswith("o_proj.weight"))
    gguf_file = write_gguf(folder / "big.gguf", config, tensors, q8_0=q8_0)

    hf = folder / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(_hf_config(config)))
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


def _peak(kind: str, path: Path, dtype: str, cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "UHLM_CACHE_DIR": cache}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(path), dtype],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


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
        measured = _peak("gguf", gguf_file, dtype, cache="")
        assert measured["param_bytes"] > 100e6
        _assert_lean(measured, f"GGUF, no cache, {dtype}")
    # When it is loaded writing the cache, then from the cache
    _assert_lean(_peak("gguf", gguf_file, "float32", cache), "GGUF writing the cache")
    assert len(list(Path(cache).glob("*.safetensors"))) == 1
    _assert_lean(_peak("gguf", gguf_file, "float32", cache), "GGUF from the cache")


@pytest.mark.slow
@linux_only
def test_sharded_safetensors_load_within_the_peak_bound(big_model):
    _, hf = big_model
    measured = _peak("hf", hf, "float32", cache="")
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
