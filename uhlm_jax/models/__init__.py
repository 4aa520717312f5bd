"""Llama-family decoders (llama, qwen2): config, params, KV cache, inference, loaders,
tokenizers, the named-model registry and early-exit drafts; and a BERT encoder for
all-MiniLM-L6-v2 sentence embeddings (`bert`, `sentence_encoder`)."""

from uhlm_jax.models.bert import BertConfig, BertParams
from uhlm_jax.models.cache import KVCache, cache_bytes, init_cache
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.early_exit import ExitHead, build_draft, load_exit_head, save_exit_head
from uhlm_jax.models.gguf import GGUFFormatError, config_from_gguf, load_gguf
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
from uhlm_jax.models.registry import LoadedModel, known_models, load_model
from uhlm_jax.models.sentence_encoder import (
    SentenceEncoder,
    embed_texts,
    load_minilm,
    read_sentence_encoder,
    sentence_similarity,
)
from uhlm_jax.models.tokenizer import ChatTemplate, PreTokenizer, Tokenizer, toy_tokenizer
from uhlm_jax.models.toy import TOY_VOCAB_SIZE, toy_pair

__all__ = [
    "BertConfig",
    "BertParams",
    "ChatTemplate",
    "ExitHead",
    "GGUFFormatError",
    "LoadedModel",
    "PreTokenizer",
    "SentenceEncoder",
    "Tokenizer",
    "build_draft",
    "config_from_gguf",
    "embed_texts",
    "known_models",
    "load_exit_head",
    "load_gguf",
    "load_minilm",
    "load_model",
    "save_exit_head",
    "toy_tokenizer",
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
    "read_sentence_encoder",
    "sentence_similarity",
    "toy_pair",
]
