"""Llama-family decoders (llama, qwen2): config, params, KV cache and inference."""

from uhlm_jax.models.cache import KVCache, cache_bytes, init_cache
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.hf import load_hf_checkpoint, load_hf_config, read_hf_tensors, read_safetensors
from uhlm_jax.models.llama import (
    ModelParams,
    Padding,
    decode,
    forward,
    init_params,
    params_from_hf,
    params_to_hf,
    prefill,
)
from uhlm_jax.models.toy import TOY_VOCAB_SIZE, toy_pair

__all__ = [
    "TOY_VOCAB_SIZE",
    "Architecture",
    "KVCache",
    "ModelConfig",
    "ModelParams",
    "Padding",
    "cache_bytes",
    "decode",
    "forward",
    "init_cache",
    "init_params",
    "load_hf_checkpoint",
    "load_hf_config",
    "params_from_hf",
    "params_to_hf",
    "prefill",
    "read_hf_tensors",
    "read_safetensors",
    "toy_pair",
]
