"""Loading Hugging Face checkpoint folders (LlamaForCausalLM, Qwen2ForCausalLM).

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. The safetensors format (8-byte little-endian header
length, a JSON header of name -> dtype/shape/byte range, then raw little-endian data) is
read directly, so bfloat16 checkpoints load without torch, and a truncated file is
reported with the sizes that disagree. Tensors are read lazily, rows at a time with
`os.pread` (`SafetensorsTensor`), never memory-mapped, so a load holds one copy of the
model (`uhlm_jax.models.transfer`). `SafetensorsWriter` writes the format one tensor at a
time, for the weight cache.

Reference: https://github.com/huggingface/safetensors (format description).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.llama import ModelParams, params_from_hf
from uhlm_jax.models.transfer import host_buffer, read_into

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Bound on the JSON header, as in the reference implementation, so a corrupt length
# field fails fast instead of allocating gigabytes.
_MAX_HEADER_BYTES = 100_000_000


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file, read on demand.

    `tensor[a:b]` reads rows `[a, b)` of the leading axis; `np.asarray(tensor)` and
    `tensor.read()` read it whole into a fresh aligned buffer.

    Attributes:
        file: the file.
        dtype: its NumPy dtype.
        shape: its shape.
        offset: absolute byte offset of its data.
    """

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not self.shape:
            return self.read()
        start, stop, _ = rows.indices(self.shape[0])
        out = host_buffer((stop - start, *self.shape[1:]), self.dtype)
        row_bytes = out[:1].nbytes if stop > start else 0
        return self._read_into(out, self.offset + start * row_bytes)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def read(self) -> np.ndarray:
        """The whole tensor, in a fresh 64-byte aligned host buffer."""
        return self._read_into(host_buffer(self.shape, self.dtype), self.offset)

    def _read_into(self, out: np.ndarray, offset: int) -> np.ndarray:
        fd = os.open(self.file, os.O_RDONLY)
        try:
            return read_into(fd, out, offset, self.file)
        finally:
            os.close(fd)


def read_safetensors(path: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """The tensors of a `.safetensors` file, to be read on demand.

    Args:
        path: the file.

    Returns:
        Tensor name -> `SafetensorsTensor` (metadata entry `__metadata__` excluded).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is truncated or its header is corrupt, naming the file.
    """
    return _read_header(path)[0]


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` string map of a `.safetensors` file (empty if it has none).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is truncated or its header is corrupt, naming the file.
    """
    return _read_header(path)[1]


def _read_header(path: str | os.PathLike) -> tuple[dict[str, SafetensorsTensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist.")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, too short for a header.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path} is truncated or corrupt: header length {header_len} bytes but the "
                f"file has {size} bytes."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} has a corrupt JSON header: {err}.") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + data_len > size:
        raise ValueError(
            f"{path} is truncated: its header needs {data_start + data_len} bytes, the file "
            f"has {size}. Re-download or re-save the checkpoint."
        )
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {info['dtype']}, not one of {sorted(_DTYPES)}."
            )
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(
                f"{path}: tensor {name} spans {end - begin} bytes but shape {shape} of "
                f"{info['dtype']} needs {dtype.itemsize * int(np.prod(shape))}."
            )
        tensors[name] = SafetensorsTensor(os.fspath(path), dtype, shape, data_start + begin)
    return tensors, metadata


class SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time.

    The header is written first, from the names, shapes and dtypes announced up front;
    then `write` appends each tensor's bytes in that order, so only one tensor is ever in
    memory. Files written here are read back by `read_safetensors` and the reference
    implementation alike.

    Args:
        file: a binary file open for writing, positioned at its start.
        specs: tensor name -> `(shape, dtype)`, in the order they will be written.
        metadata: the `__metadata__` string map.
    """

    def __init__(
        self,
        file: BinaryIO,
        specs: Mapping[str, tuple[tuple[int, ...], Any]],
        metadata: Mapping[str, str],
    ):
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        self._pending = []
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._pending.append((name, tuple(shape), dtype))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file = file
        self._pending.reverse()

    def write(self, name: str, array: np.ndarray) -> None:
        """Appends the next announced tensor.

        Raises:
            ValueError: if `name`, its shape or its dtype is not the one announced next.
        """
        expected = self._pending.pop() if self._pending else None
        if expected != (name, array.shape, array.dtype):
            raise ValueError(
                f"Wrote tensor {name} {array.shape} {array.dtype}, expected {expected}."
            )
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    @property
    def done(self) -> bool:
        """Whether every announced tensor has been written."""
        return not self._pending


def read_hf_tensors(folder: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """The weight tensors of a checkpoint folder, single file or sharded, read on demand.

    Args:
        folder: directory with `model.safetensors`, or with `model.safetensors.index.json`
            and the shards its `weight_map` names.

    Returns:
        HF tensor name -> `SafetensorsTensor`.

    Raises:
        FileNotFoundError: if neither weights file nor a listed shard exists.
        ValueError: if a shard is truncated or lacks a tensor the index assigns to it.
    """
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map: Mapping[str, str] = json.loads(index_path.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"Shard {shard_path} listed in {index_path} does not exist."
                )
            tensors.update(read_safetensors(shard_path))
        absent = sorted(name for name in weight_map if name not in tensors)
        if absent:
            raise ValueError(f"{index_path} lists tensors missing from their shards: {absent[:8]}")
        return tensors
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; pass a Hugging Face "
            "checkpoint folder saved with safetensors."
        )
    return read_safetensors(weights_path)


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
    """Reads and converts the `config.json` of a checkpoint folder.

    Raises:
        FileNotFoundError: if `config.json` is missing.
        ValueError: for an unsupported architecture (see `ModelConfig.from_hf_config`).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a checkpoint folder needs it.")
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


def load_hf_checkpoint(folder: str | os.PathLike, dtype=jnp.float32) -> ModelParams:
    """Loads a LlamaForCausalLM or Qwen2ForCausalLM checkpoint folder.

    Tensors are read a few rows at a time and converted straight into `dtype`, one
    parameter at a time (peak memory: the params plus a few megabytes).

    Args:
        folder: directory with `config.json` and safetensors weights (single or sharded).
        dtype: storage and compute dtype of the returned params.

    Returns:
        The `ModelParams`.

    Raises:
        FileNotFoundError: for a missing config or weights file.
        ValueError: for an unsupported architecture, a truncated file, or tensors that do
            not match the config.
    """
    config = load_hf_config(folder)
    return params_from_hf(config, read_hf_tensors(folder), dtype=dtype)
