"""GGUF checkpoints: metadata, dequantized weights and the tokenizer, as `ModelParams`.

`load_gguf` reads a llama- or qwen2-architecture GGUF file with the `gguf` package,
maps llama.cpp's tensor names to Hugging Face names, and builds the params with
`params_from_hf`. Tensors are read lazily (`GGUFTensor`): a few megabytes of rows at a
time are read with `os.pread` and dequantized (`gguf.quants.dequantize`) straight into the
target dtype, so loading never holds a second copy of the model (`uhlm_jax.models.transfer`).

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
import hashlib
import mmap
import os
import re
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.llama import ModelParams, params_from_hf
from uhlm_jax.models.tokenizer import Tokenizer
from uhlm_jax.models.transfer import read_into

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
    path, size = _check_magic(path)
    try:
        return GGUFReader(path)
    except Exception as err:  # the reader fails in many ways on cut-off or garbled bytes
        raise _corrupt(path, size, err) from err


def _check_magic(path: str | os.PathLike) -> tuple[str, int]:
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
    return path, size


def _corrupt(path: str, size: int, err: Exception) -> GGUFFormatError:
    return GGUFFormatError(
        f"{path} ({size} bytes) is truncated or corrupt ({type(err).__name__}: {err}). "
        "Copy or download the file again."
    )


# Byte size of each fixed-size GGUF metadata value type (gguf.GGUFValueType).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# Data blocks hashed into the fingerprint besides the header: evenly spaced, small.
_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_SAMPLE_BYTES = 4096


def gguf_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a GGUF file's content that is cheap to compute, for cache keys.

    It covers the file size, the header, all metadata (tokenizer included) and the
    tensor table (names, shapes, types, offsets), plus 16 blocks of 4 KiB spread over
    the tensor data, so that two files with the same layout but other weights differ.
    The same file at another path or with another modification time has the same
    fingerprint. About two megabytes are read for SmolLM2-135M, not the whole file.

    Raises:
        FileNotFoundError: if `path` does not exist.
        GGUFFormatError: if the file is not GGUF, truncated or corrupt.
    """
    path, size = _check_magic(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            table_end = _tensor_table_end(data)
        except (struct.error, ValueError, IndexError) as err:
            raise _corrupt(path, size, err) from err
        digest.update(data[:table_end])
        stride = max(1, (size - table_end) // _FINGERPRINT_SAMPLES)
        for start in range(table_end, size, stride):
            digest.update(data[start : start + _FINGERPRINT_SAMPLE_BYTES])
    return digest.hexdigest()


def _tensor_table_end(data: mmap.mmap) -> int:
    """Byte offset where a (little-endian) GGUF file's tensor table ends."""
    offset = len(GGUF_MAGIC) + 4  # magic, version
    tensor_count, kv_count = struct.unpack_from("<QQ", data, offset)
    offset += 16

    def string(at: int) -> int:
        (length,) = struct.unpack_from("<Q", data, at)
        return at + 8 + length

    def value(at: int, kind: int) -> int:
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item_kind in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[item_kind]
            for _ in range(count):
                at = value(at, item_kind)
            return at
        return at + _SCALAR_BYTES[kind]

    for _ in range(kv_count):
        offset = string(offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        offset = value(offset + 4, kind)
    for _ in range(tensor_count):
        offset = string(offset)
        (n_dims,) = struct.unpack_from("<I", data, offset)
        offset += 4 + 8 * n_dims + 4 + 8  # dims, type, data offset
    if offset > len(data):
        raise ValueError(f"the tensor table ends at byte {offset}, after the end of the file")
    return offset


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


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, read and dequantized to float32 on demand, in HF layout.

    Indexing with a slice of rows (`tensor[a:b]`) reads just those rows (whole heads for
    a permuted q/k projection) with `os.pread`, so a tensor is never loaded whole.

    Attributes:
        file: the GGUF file.
        name: llama.cpp's tensor name, for messages.
        qtype: its storage type (F32, F16, Q8_0, Q4_1, ...).
        shape: HF shape (`[out, in]` for linear weights; NumPy order).
        offset: byte offset of its data in the file.
        rope_heads: for a llama q/k projection, its head count (rows are un-permuted from
            llama.cpp's order, `unpermute_rope_rows`); else 0.
    """

    file: str
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    rope_heads: int = 0

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one row (of the last axis)."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_size * type_size

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows `[start, stop)` of the leading axis as float32 (a 1-D tensor: elements)."""
        start, stop, _ = rows.indices(self.shape[0])
        if len(self.shape) == 1:
            array = self._dequantize(0, 1).reshape(self.shape)
            if self.rope_heads:
                array = unpermute_rope_rows(array, self.rope_heads)
            return array[start:stop]
        head = self.shape[0] // self.rope_heads if self.rope_heads else 1
        first, last = start // head * head, -(-stop // head) * head
        array = self._dequantize(first, last)
        if self.rope_heads:
            array = unpermute_rope_rows(array, (last - first) // head)
        return array[start - first : stop - first]

    def _dequantize(self, first: int, last: int) -> np.ndarray:
        """Rows `[first, last)` as stored (llama.cpp's row order), as float32."""
        raw = np.empty((last - first, self.row_bytes), np.uint8)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            read_into(fd, raw, self.offset + first * self.row_bytes, self.file)
        finally:
            os.close(fd)
        try:
            array = dequantize(raw, self.qtype)
        except NotImplementedError as err:
            raise ValueError(
                f"{self.file}: tensor {self.name} uses {self.qtype.name}, which gguf cannot "
                f"dequantize ({err})."
            ) from err
        return np.asarray(array, np.float32).reshape(last - first, -1)


def hf_tensors_from_gguf(reader: GGUFReader, config: ModelConfig) -> dict[str, GGUFTensor]:
    """All tensors of a GGUF file under their HF names and layout, read lazily.

    Args:
        reader: the open file.
        config: its configuration (`config_from_gguf`), for the q/k un-permutation.

    Returns:
        HF name -> `GGUFTensor` (float32 rows in HF layout, `[out, in]` for linear
        weights, on demand).

    Raises:
        ValueError: for an unknown tensor.
    """
    tensors = {}
    for tensor in reader.tensors:
        rope_heads = 0
        if config.architecture is Architecture.LLAMA and tensor.name.startswith("blk."):
            if ".attn_q." in tensor.name:
                rope_heads = config.num_heads
            elif ".attn_k." in tensor.name:
                rope_heads = config.num_kv_heads
        tensors[hf_name(tensor.name)] = GGUFTensor(
            file=gguf_path(reader),
            name=tensor.name,
            qtype=tensor.tensor_type,
            shape=tuple(int(n) for n in reversed(tensor.shape)),  # GGUF lists ne0 first
            offset=int(tensor.data_offset),
            rope_heads=rope_heads,
        )
    return tensors


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file's configuration and tokenizer, and its tensors to be read lazily.

    Attributes:
        config: the model configuration (`config_from_gguf`).
        tokenizer: the tokenizer, checked to fit the embedding.
        tensors: HF name -> `GGUFTensor`.
    """

    config: ModelConfig
    tokenizer: Tokenizer
    tensors: dict[str, GGUFTensor]


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Reads a GGUF file's metadata and tokenizer; its tensors are read when used.

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
    return GGUFModel(config, tokenizer, hf_tensors_from_gguf(reader, config))


def load_gguf(
    path: str | os.PathLike, dtype: Any = jnp.float32
) -> tuple[ModelParams, Tokenizer]:
    """Loads a llama- or qwen2-architecture GGUF file: weights and tokenizer.

    Each tensor is dequantized a few rows at a time straight into `dtype` and placed on
    the device before the next is read (peak memory: the params plus a few megabytes).

    Args:
        path: the `.gguf` file.
        dtype: storage dtype of the params.

    Returns:
        `(params, tokenizer)`.

    Raises:
        FileNotFoundError: if the file does not exist.
        GGUFFormatError: if it is truncated or corrupt.
        ValueError: for unsupported contents, or a tokenizer with more ids than the
            embedding has rows.
    """
    model = read_gguf(path)
    return params_from_hf(model.config, model.tensors, dtype), model.tokenizer
