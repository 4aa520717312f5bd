"""Loading Hugging Face checkpoint folders (LlamaForCausalLM, Qwen2ForCausalLM).

A folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. The safetensors format (8-byte little-endian header
length, a JSON header of name -> dtype/shape/byte range, then raw little-endian data) is
read directly with NumPy memory maps, so bfloat16 checkpoints load without torch, and a
truncated file is reported with the sizes that disagree.

Reference: https://github.com/huggingface/safetensors (format description).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.llama import ModelParams, params_from_hf

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


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a `.safetensors` file as a read-only memory-mapped array.

    Args:
        path: the file.

    Returns:
        Tensor name -> array (metadata entry `__metadata__` excluded).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is truncated or its header is corrupt, naming the file.
    """
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
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + data_len > size:
        raise ValueError(
            f"{path} is truncated: its header needs {data_start + data_len} bytes, the file "
            f"has {size}. Re-download or re-save the checkpoint."
        )
    if data_len == 0:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
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
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def read_hf_tensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads all weight tensors of a checkpoint folder, single file or sharded.

    Args:
        folder: directory with `model.safetensors`, or with `model.safetensors.index.json`
            and the shards its `weight_map` names.

    Returns:
        HF tensor name -> array.

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
