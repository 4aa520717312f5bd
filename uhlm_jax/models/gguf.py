"""GGUF checkpoints: metadata, dequantized weights and the tokenizer, as `ModelParams`.

`load_gguf` reads a llama- or qwen2-architecture GGUF file with the `gguf` package,
dequantizes every tensor to float32 (`gguf.quants.dequantize`), maps llama.cpp's tensor
names to Hugging Face names, and builds the params with `params_from_hf`.

Two layout differences from a Hugging Face checkpoint are undone here:

- GGUF lists dimensions fastest-first (`ne0, ne1`), the reverse of NumPy; the reader's
  arrays are already in NumPy order, so a linear layer's weight is `[out, in]` as in HF.
- For the llama architecture, llama.cpp's converter (`convert_hf_to_gguf.py`,
  `LlamaModel.permute`) reorders the rows of `q_proj` and `k_proj` within each head, from
  HF's rotate-half RoPE layout (pairs `(j, j + d/2)`) to llama.cpp's interleaved one
  (pairs `(2j, 2j + 1)`). `unpermute_rope_rows` inverts it. qwen2 files are not permuted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.llama import ModelParams, params_from_hf
from uhlm_jax.models.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"


class GGUFFormatError(ValueError):
    """A file that is not a readable GGUF file (wrong magic, truncated, corrupt)."""


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Opens a GGUF file (memory-mapped; tensors are read lazily).

    Args:
        path: the `.gguf` file.

    Returns:
        The `gguf.GGUFReader`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        GGUFFormatError: if the file is not GGUF or is truncated or corrupt; the message
            names the path, its size and the fix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{path} ({size} bytes) is not a GGUF file: it starts with {magic!r}, not "
            f"{GGUF_MAGIC!r}. Pass a .gguf file or a Hugging Face checkpoint folder."
        )
    try:
        return GGUFReader(path)
    except Exception as err:  # the reader fails in many ways on cut-off or garbled bytes
        raise GGUFFormatError(
            f"{path} ({size} bytes) is truncated or corrupt ({type(err).__name__}: {err}). "
            "Copy or download the file again."
        ) from err


def gguf_path(reader: GGUFReader) -> str:
    """The file a reader has open, for messages."""
    return str(getattr(reader.data, "filename", None) or "<GGUF file>")


def metadata_value(reader: GGUFReader, key: str, default: Any = dataclasses.MISSING) -> Any:
    """One metadata value: a Python scalar, string or list.

    Args:
        reader: the open file.
        key: the metadata key, e.g. `"llama.block_count"`.
        default: returned when the key is absent; without it a missing key raises.

    Raises:
        ValueError: naming the file and key, if the key is absent and there is no default.
    """
    field = reader.fields.get(key)
    if field is None:
        if default is dataclasses.MISSING:
            raise ValueError(f"{gguf_path(reader)}: the GGUF metadata has no {key!r} entry.")
        return default
    return field.contents()


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """The model configuration stored in a GGUF file's metadata.

    The vocabulary size is the number of rows of `token_embd.weight`; the output head is
    tied when the file has no `output.weight`; q/k/v bias when `blk.0.attn_q.bias` exists.

    Raises:
        ValueError: for an unsupported architecture or RoPE variant, or missing metadata.
    """
    architecture = _architecture(reader)
    arch = architecture.value

    def value(key: str, default: Any = dataclasses.MISSING) -> Any:
        return metadata_value(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path(reader)}: no token_embd.weight tensor.")
    hidden_size = int(value("embedding_length"))
    num_heads = int(value("attention.head_count"))
    head_dim = int(value("attention.key_length", hidden_size // num_heads))
    rope_dim = int(value("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"{gguf_path(reader)}: {arch}.rope.dimension_count={rope_dim} differs from the head "
            f"dimension {head_dim}; partial RoPE is not supported."
        )
    scaling = value("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(
            f"{gguf_path(reader)}: {arch}.rope.scaling.type={scaling!r}; only plain RoPE is "
            "supported."
        )
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF order: (h, v)
    declared = value("vocab_size", vocab_size)
    if int(declared) != vocab_size:
        raise ValueError(
            f"{gguf_path(reader)}: {arch}.vocab_size={declared} but token_embd.weight has "
            f"{vocab_size} rows; the file is inconsistent."
        )
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(value("feed_forward_length")),
        num_layers=int(value("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(value("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=_float32_as_written(value("rope.freq_base", 10_000.0)),
        rms_norm_eps=_float32_as_written(value("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
    )


def _float32_as_written(value: float) -> float:
    """The decimal a float32 metadata value was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _architecture(reader: GGUFReader) -> Architecture:
    name = metadata_value(reader, "general.architecture")
    try:
        return Architecture(name)
    except ValueError:
        supported = ", ".join(repr(a.value) for a in Architecture)
        raise ValueError(
            f"{gguf_path(reader)}: general.architecture={name!r} is not supported; supported: "
            f"{supported}."
        ) from None


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order from HF's: per head, rows `(j, j + d/2)` become `(2j, 2j+1)`.

    This is `LlamaModel.permute` of llama.cpp's `convert_hf_to_gguf.py`.

    Args:
        w: `[num_heads * d, ...]` q or k projection weight (or bias), HF row order.
        num_heads: heads of this projection (query heads for q, kv heads for k).

    Returns:
        The rows in llama.cpp's order, same shape.
    """
    d = _head_dim(w, num_heads)
    return w.reshape(num_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of `permute_rope_rows`: llama.cpp's q/k row order back to HF's.

    Args:
        w: `[num_heads * d, ...]` q or k projection weight (or bias) from a llama GGUF.
        num_heads: heads of this projection (query heads for q, kv heads for k).

    Returns:
        The rows in HF's rotate-half order, same shape.
    """
    d = _head_dim(w, num_heads)
    return w.reshape(num_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_dim(w: np.ndarray, num_heads: int) -> int:
    rows = w.shape[0]
    if num_heads <= 0 or rows % num_heads or (rows // num_heads) % 2:
        raise ValueError(
            f"Cannot split {rows} rows into {num_heads} heads of even size for RoPE."
        )
    return rows // num_heads


# llama.cpp tensor name -> HF name; `{i}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name.

    Raises:
        ValueError: for a tensor this decoder does not use (e.g. `rope_freqs.weight`).
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in this decoder.")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{kind}"


def hf_tensors_from_gguf(reader: GGUFReader, config: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors of a GGUF file, dequantized to float32, under their HF names and layout.

    Args:
        reader: the open file.
        config: its configuration (`config_from_gguf`), for the q/k un-permutation.

    Returns:
        HF name -> float32 array in HF layout (`[out, in]` for linear weights).

    Raises:
        ValueError: for an unknown tensor or a quantization type `gguf` cannot dequantize.
    """
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise ValueError(
                f"{gguf_path(reader)}: tensor {tensor.name} uses {tensor.tensor_type.name}, which "
                f"gguf cannot dequantize ({err})."
            ) from err
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 first
        array = np.asarray(array, np.float32).reshape(shape)
        if config.architecture is Architecture.LLAMA:
            if tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
                array = unpermute_rope_rows(array, config.num_heads)
            elif tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
                array = unpermute_rope_rows(array, config.num_kv_heads)
        tensors[name] = array
    return tensors


def load_gguf(
    path: str | os.PathLike, dtype: Any = jnp.float32
) -> tuple[ModelParams, Tokenizer]:
    """Loads a llama- or qwen2-architecture GGUF file: weights and tokenizer.

    Args:
        path: the `.gguf` file.
        dtype: storage dtype of the params (weights are dequantized to float32 first).

    Returns:
        `(params, tokenizer)`.

    Raises:
        FileNotFoundError: if the file does not exist.
        GGUFFormatError: if it is truncated or corrupt.
        ValueError: for unsupported contents, or a tokenizer with more ids than the
            embedding has rows.
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    tokenizer.check_fits(config.vocab_size, where=os.fspath(path))
    params = params_from_hf(config, hf_tensors_from_gguf(reader, config), dtype)
    return params, tokenizer

