"""On-disk cache of dequantized GGUF models: weights and tokenizer, ready to load.

Dequantizing SmolLM2-135M's Q4_1 file and rebuilding its BPE tokenizer takes about 10 s on
two CPU cores; reading the cached safetensors file takes well under one. An entry holds
the params in the dtype they were asked for, in their final layout, and the tokenizer in
its metadata.

Entries are keyed by the GGUF file's content (`gguf.gguf_fingerprint`: its size, header,
metadata and tensor table, and samples of its data), the dtype and the cache format, so
copies of one file in several clones or environments share one entry, and a changed file
is read again. They are written while the GGUF file is read, one tensor at a time, to a
temporary file that is renamed into place when complete, so a killed process or two
processes loading at once never leave a half-written entry. Files are created with mode
0666 less the umask, like any other file the user writes. Each use of an entry updates
its modification time, shown as its last use by `entries` (and `uhlm cache`).

The folder is `$UHLM_CACHE_DIR` if set, else `$XDG_CACHE_HOME/uhlm_jax`, else
`~/.cache/uhlm_jax`. Setting `UHLM_CACHE_DIR` to the empty string turns the cache off.
Only dequantized copies of files already on the machine are stored; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers

from uhlm_jax.files import TMP_SUFFIX, AtomicFile
from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.gguf import GGUFModel, gguf_fingerprint, read_gguf
from uhlm_jax.models.hf import SafetensorsWriter, read_safetensors, safetensors_metadata
from uhlm_jax.models.llama import (
    ModelParams,
    hf_param_arrays,
    param_shapes,
    params_from_arrays,
)
from uhlm_jax.models.tokenizer import ChatTemplate, Tokenizer

__all__ = [
    "CACHE_ENV",
    "CacheEntry",
    "cache_dir",
    "cached_gguf_load",
    "clear",
    "entries",
    "entry_path",
    "newest_first",
]

CACHE_ENV = "UHLM_CACHE_DIR"
# Bump when the stored layout or the loader's output changes: old entries are then ignored.
_FORMAT = "uhlm_jax.weight_cache/2"
_SEP = "/"
_SUFFIX = ".safetensors"


def cache_dir() -> pathlib.Path | None:
    """The cache folder, or None when `UHLM_CACHE_DIR` is set to the empty string."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return pathlib.Path(configured).expanduser() if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "uhlm_jax"


def entry_path(gguf_path: str | os.PathLike, dtype: Any = jnp.float32) -> pathlib.Path | None:
    """Where the cached copy of `gguf_path` in `dtype` lives (None when the cache is off).

    Raises:
        FileNotFoundError, GGUFFormatError: if the file is missing or not GGUF.
    """
    folder = cache_dir()
    if folder is None:
        return None
    dtype_name = jnp.dtype(dtype).name
    key = json.dumps([_FORMAT, gguf_fingerprint(gguf_path), dtype_name])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return folder / f"{pathlib.Path(gguf_path).stem}-{dtype_name}-{digest}{_SUFFIX}"


def cached_gguf_load(
    gguf_path: str | os.PathLike, dtype: Any = jnp.float32
) -> tuple[ModelParams, Tokenizer]:
    """`gguf.load_gguf(gguf_path, dtype)` through the cache.

    A missing or unreadable entry is rebuilt from the GGUF file, written tensor by tensor
    while the model loads; a cache folder that cannot be written only costs the speed-up.
    Peak memory is the params plus a few megabytes either way.

    Raises:
        FileNotFoundError, GGUFFormatError, ValueError: as `gguf.load_gguf`.
    """
    entry = entry_path(gguf_path, dtype)
    if entry is not None and entry.is_file():
        try:
            loaded = _read(entry, jnp.dtype(dtype))
        except Exception:  # noqa: BLE001 - any damaged entry is rebuilt from the source
            with contextlib.suppress(OSError):
                entry.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):  # a read-only cache still serves
                os.utime(entry)  # its last use
            return loaded
    model = read_gguf(gguf_path)
    arrays = hf_param_arrays(model.config, model.tensors, dtype)
    if entry is not None:
        arrays = _written(entry, model, pathlib.Path(gguf_path).name, jnp.dtype(dtype), arrays)
    return params_from_arrays(model.config, arrays), model.tokenizer


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One file of the cache folder.

    Attributes:
        path: the entry.
        source: file name of the GGUF it was made from ("" for an entry of an older
            format, or a temporary file left by a killed process).
        dtype: dtype of its params ("" when unknown).
        size_bytes: its size.
        last_used: when it was last written or read (seconds since the epoch).
    """

    path: pathlib.Path
    source: str
    dtype: str
    size_bytes: int
    last_used: float

    @classmethod
    def of(
        cls, path: pathlib.Path, source: str = "", dtype: str = "", last_used: float | None = None
    ) -> CacheEntry:
        """The entry of the file at `path`; its last use defaults to its modification time."""
        stat = path.stat()
        last_used = stat.st_mtime if last_used is None else last_used
        return cls(path, source, dtype, stat.st_size, last_used)


def newest_first(found: list[CacheEntry]) -> list[CacheEntry]:
    """`found`, most recently used first: the order `entries` lists a cache folder in."""
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def entries() -> list[CacheEntry]:
    """The cache's entries, most recently used first (empty when the cache is off)."""
    folder = cache_dir()
    if folder is None or not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.is_file() or not path.name.endswith((_SUFFIX, TMP_SUFFIX)):
            continue
        try:
            meta = safetensors_metadata(path) if path.name.endswith(_SUFFIX) else {}
        except (OSError, ValueError):
            meta = {}
        if meta.get("format") != _FORMAT:
            meta = {}
        found.append(CacheEntry.of(path, meta.get("source", ""), meta.get("dtype", "")))
    return newest_first(found)


def clear() -> list[CacheEntry]:
    """Deletes every entry (and temporary files left by killed processes).

    Returns:
        The entries deleted.
    """
    removed = entries()
    for entry in removed:
        entry.path.unlink(missing_ok=True)
    return removed


def _metadata(model: GGUFModel, source: str, dtype: np.dtype) -> dict[str, str]:
    config = dataclasses.asdict(model.config)
    config["architecture"] = model.config.architecture.value
    tokenizer = model.tokenizer
    template = tokenizer.chat_template
    return {
        "format": _FORMAT,
        "source": source,
        "dtype": dtype.name,
        "config": json.dumps(config),
        "tokenizer": json.dumps(
            {
                "backend": tokenizer.backend.to_str(),
                "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "pad_id": tokenizer.pad_id,
                "stop_ids": list(tokenizer.stop_ids),
                "add_bos": tokenizer.add_bos,
                "chat_template": None if template is None else dataclasses.asdict(template),
            }
        ),
    }


def _written(
    entry: pathlib.Path,
    model: GGUFModel,
    source: str,
    dtype: np.dtype,
    arrays: Iterator[tuple[tuple[str, ...], np.ndarray]],
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Passes `arrays` through, writing each to `entry` on the way.

    The entry appears (by rename) only once every array is written; if writing fails,
    loading goes on without it.
    """
    specs = {
        _SEP.join(path): (shape, dtype) for path, shape in param_shapes(model.config).items()
    }
    try:
        out = AtomicFile(entry)
    except OSError:
        yield from arrays
        return
    with out:  # discarded if loading fails or stops early
        try:
            writer: SafetensorsWriter | None = SafetensorsWriter(
                out.file, specs, _metadata(model, source, dtype)
            )
        except OSError:
            writer = None
        for path, host in arrays:
            if writer is not None:
                try:
                    writer.write(_SEP.join(path), host)
                except OSError:
                    writer = None  # a full or read-only disk only costs the cache
            yield path, host
        if writer is not None and writer.done:
            with contextlib.suppress(OSError):
                out.commit()
        else:
            out.discard()


def _read(entry: pathlib.Path, dtype: np.dtype) -> tuple[ModelParams, Tokenizer]:
    meta = safetensors_metadata(entry)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{entry} has format {meta.get('format')!r}, not {_FORMAT!r}")
    config = ModelConfig.from_fields(json.loads(meta["config"]))
    tensors = read_safetensors(entry)
    expected = {_SEP.join(path): shape for path, shape in param_shapes(config).items()}
    stored = {name: tensor.shape for name, tensor in tensors.items()}
    if stored != expected or any(t.dtype != dtype for t in tensors.values()):
        raise ValueError(f"{entry} does not hold the params of its config in {dtype}")
    info = json.loads(meta["tokenizer"])
    template = info.pop("chat_template")
    tokenizer = Tokenizer(
        backend=tokenizers.Tokenizer.from_str(info.pop("backend")),
        stop_ids=tuple(info.pop("stop_ids")),
        chat_template=None if template is None else ChatTemplate(**template),
        **info,
    )
    arrays = ((tuple(name.split(_SEP)), tensor.read()) for name, tensor in tensors.items())
    return params_from_arrays(config, arrays), tokenizer
