"""On-disk cache of dequantized GGUF models: weights and tokenizer, ready to load.

Dequantizing SmolLM2-135M's Q4_1 file and rebuilding its BPE tokenizer takes about 10 s on
two CPU cores; reading the cached float32 safetensors file takes well under one. Entries are
keyed by the GGUF file's absolute path, size and modification time, so a changed file is
read again, and they are written atomically (a temporary file, then a rename), so a killed
process or two processes loading at once never leave a half-written entry.

The folder is `$UHLM_CACHE_DIR` if set, else `$XDG_CACHE_HOME/uhlm_jax`, else
`~/.cache/uhlm_jax`. Setting `UHLM_CACHE_DIR` to the empty string turns the cache off.
Only dequantized copies of files already on the machine are stored; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
import tokenizers

from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.llama import ModelParams
from uhlm_jax.models.tokenizer import ChatTemplate, Tokenizer

__all__ = ["CACHE_ENV", "cache_dir", "cached_gguf_load", "entry_path"]

CACHE_ENV = "UHLM_CACHE_DIR"
# Bump when the stored layout or the loader's output changes: old entries are then ignored.
_FORMAT = "uhlm_jax.weight_cache/1"
_SEP = "/"


def cache_dir() -> pathlib.Path | None:
    """The cache folder, or None when `UHLM_CACHE_DIR` is set to the empty string."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return pathlib.Path(configured).expanduser() if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "uhlm_jax"


def entry_path(gguf_path: str | os.PathLike) -> pathlib.Path | None:
    """Where the cached copy of `gguf_path` lives (None when the cache is off)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = pathlib.Path(gguf_path).resolve()
    stat = path.stat()
    key = json.dumps([_FORMAT, str(path), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return folder / f"{path.stem}-{digest}.safetensors"


def cached_gguf_load(
    gguf_path: str | os.PathLike,
    dtype: Any,
    load: Callable[[str | os.PathLike, Any], tuple[ModelParams, Tokenizer]],
) -> tuple[ModelParams, Tokenizer]:
    """`load(gguf_path, float32)` through the cache, cast to `dtype`.

    A missing or unreadable entry is rebuilt with `load` and written; a cache folder that
    cannot be written only costs the speed-up.
    """
    entry = entry_path(gguf_path)
    if entry is not None and entry.is_file():
        try:
            params, tokenizer = _read(entry)
            return _cast(params, dtype), tokenizer
        except Exception:  # noqa: BLE001 - any damaged entry is rebuilt from the source
            entry.unlink(missing_ok=True)
    params, tokenizer = load(gguf_path, jnp.float32)
    if entry is not None:
        try:
            _write(entry, params, tokenizer)
        except OSError:
            pass
    return _cast(params, dtype), tokenizer


def _cast(params: ModelParams, dtype: Any) -> ModelParams:
    if jnp.dtype(dtype) == params.dtype:
        return params
    weights = flax.traverse_util.unflatten_dict(
        {k: v.astype(dtype) for k, v in flax.traverse_util.flatten_dict(params.weights).items()}
    )
    return ModelParams(config=params.config, weights=weights)


def _write(entry: pathlib.Path, params: ModelParams, tokenizer: Tokenizer) -> None:
    from safetensors.numpy import save_file

    tensors = {
        _SEP.join(key): np.asarray(value)
        for key, value in flax.traverse_util.flatten_dict(params.weights).items()
    }
    config = dataclasses.asdict(params.config)
    config["architecture"] = params.config.architecture.value
    template = tokenizer.chat_template
    meta = {
        "format": _FORMAT,
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
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, entry)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def _read(entry: pathlib.Path) -> tuple[ModelParams, Tokenizer]:
    from safetensors import safe_open

    with safe_open(entry, framework="numpy") as f:
        meta = f.metadata()
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{entry} has format {meta.get('format')!r}, not {_FORMAT!r}")
        flat = {tuple(name.split(_SEP)): jnp.asarray(f.get_tensor(name)) for name in f.keys()}
    config = json.loads(meta["config"])
    config["architecture"] = Architecture(config["architecture"])
    info = json.loads(meta["tokenizer"])
    template = info.pop("chat_template")
    tokenizer = Tokenizer(
        backend=tokenizers.Tokenizer.from_str(info.pop("backend")),
        stop_ids=tuple(info.pop("stop_ids")),
        chat_template=None if template is None else ChatTemplate(**template),
        **info,
    )
    params = ModelParams(
        config=ModelConfig(**config), weights=flax.traverse_util.unflatten_dict(flat)
    )
    return params, tokenizer
