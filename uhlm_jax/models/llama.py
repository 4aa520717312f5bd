"""Llama-family decoder (llama, qwen2) as pure functions over explicit pytrees.

The network is defined with Flax linen modules, but callers only see pure functions:
`prefill`, `decode` and `forward` take a `ModelParams` pytree (and a `KVCache`) as
arguments and return new values; nothing is closed over or mutated. Apply `jax.jit` at
the call site, donating the cache:

    step = jax.jit(decode, donate_argnums=2)
    logits, cache = step(params, tokens, cache)

Shapes (see `uhlm_jax.types`): `b` batch, `t` prompt tokens, `s` cache slots, `v`
vocabulary, `h` hidden, `k` kv heads, `g` query heads per kv head, `d` head dim.

Numerics: weights, activations and the cache use the parameter dtype (float32 or
bfloat16); RMSNorm, RoPE, attention scores and softmax run in float32. Masked keys get
weight exactly zero, so padding never leaks into a row's logits.

Reference: Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (2023);
the parameterisation follows Hugging Face transformers' LlamaForCausalLM and
Qwen2ForCausalLM.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uhlm_jax.models import hf_layout
from uhlm_jax.models.cache import KVCache
from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.transfer import RowSource, host_buffer, row_chunks, to_device
from uhlm_jax.types import Array, Bool, Float, Int

# Standard deviation of the normal initialiser of all matrices (HF `initializer_range`).
INIT_STD = 0.02

# Score given to masked keys: finite, so an all-masked (padding) query yields a uniform
# average instead of NaN, and exp(_MASKED - max) underflows to exactly 0 otherwise.
_MASKED = float(np.finfo(np.float32).min)


class Padding(enum.Enum):
    """Where the padding of a batch of prompts sits.

    RIGHT: row `b` holds its prompt in columns `[0, lengths[b])`.
    LEFT: row `b` holds its prompt in columns `[t - lengths[b], t)`.
    """

    LEFT = "left"
    RIGHT = "right"


@flax.struct.dataclass
class ModelParams:
    """Weights of a decoder, as a pytree whose config is static aux data.

    Attributes:
        config: the architecture; part of the treedef, so `jit` specialises on it.
        weights: the Flax `params` collection, one subtree per layer (`layers_0`, ...):
            `embed_tokens/embedding [v, h]`; per layer `input_layernorm/scale [h]`,
            `self_attn/qkv_proj/kernel [h, (q + 2k) d]` (q, k and v projections side by
            side, plus `bias` when `config.qkv_bias`), `self_attn/o_proj/kernel [q d, h]`,
            `post_attention_layernorm/scale [h]`, `mlp/gate_up_proj/kernel [h, 2 i]`,
            `mlp/down_proj/kernel [i, h]`; then `norm/scale [h]` and, unless the head is
            tied to the embedding, `lm_head/kernel [h, v]`. Kernels are `[in, out]`
            (transposed relative to HF); `params_from_hf`/`params_to_hf` convert.
        fused_blocks: the fused kernels (and the qkv bias) hold their output columns as
            this many equal blocks, block `j` being `[q_j | k_j | v_j]` (resp.
            `[gate_j | up_j]`) with the `j`-th share of the kv heads (resp. MLP columns).
            A mesh's `model` axis of this size then splits them on head boundaries
            (`uhlm_jax.sharding`). 1 is the plain layout `[q | k | v]`.
    """

    config: ModelConfig = flax.struct.field(pytree_node=False)
    weights: dict
    fused_blocks: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def dtype(self) -> jnp.dtype:
        """Storage and compute dtype of the weights."""
        return self.weights["embed_tokens"]["embedding"].dtype


# ---------------------------------------------------------------------------------------
# Network definition.


def rms_norm(x: Float[Array, "... h"], scale: Float[Array, " h"], eps: float) -> Array:
    """RMSNorm `x / sqrt(mean(x²) + eps) * scale`, normalised in float32.

    Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019).

    Args:
        x: `[..., h]` hidden states.
        scale: `[h]` learned scale; its dtype is the dtype of the result.
        eps: added to the mean square (the config's `rms_norm_eps`).

    Returns:
        `[..., h]` in `scale`'s dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(scale.dtype) * jnp.expand_dims(scale, tuple(range(x.ndim - 1)))


class _RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the compute dtype (as in HF)."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Float[Array, "... h"]) -> Float[Array, "... h"]:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        return rms_norm(x, scale, self.eps)


def _rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_tables(
    positions: Int[Array, "b t"], head_dim: int, theta: float
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
    """cos and sin of the RoPE angles `position / theta^(2i/d)`, halves concatenated.

    This is the non-interleaved layout of HF Llama (`rotate_half`), not the interleaved
    pairs of the RoFormer paper (Su et al., 2021, arXiv 2104.09864).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates the last axis of `x` by angles `cos, sin` broadcast to it (float32 maths)."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


def _attend(
    q: Float[Array, "b t k g d"],
    keys: Float[Array, "b k s d"],
    values: Float[Array, "b k s d"],
    mask: Bool[Array, "b t s"],
) -> Float[Array, "b t k g d"]:
    """Grouped-query attention of queries over the keys where `mask` is true.

    Query head `k * g + j` uses kv head `k` (HF's `repeat_kv`). Scores and softmax are
    float32; masked keys get probability exactly 0.

    Two formulations with equal results, chosen by the static query length:
    - one query (decode, memory-bound): multiply-reduce over the cache in its stored
      layout. XLA:CPU then streams the cache once and updates it in place; the dot
      formulation made it copy the cache (twice per layer at batch 1, where degenerate
      dims are dropped).
    - several queries (prefill, compute-bound): batched matrix products, with the keys
      as the left operand so they are contracted over their minor axis without a
      transposed copy.
    """
    b, t, kh, g, d = q.shape
    s = keys.shape[2]
    scale = 1.0 / math.sqrt(d)
    queries = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    batch = ((0, 1), (0, 1))
    if t == 1:
        q32, k32 = queries.astype(jnp.float32), keys.astype(jnp.float32)
        scores = (q32[:, :, :, None, :] * k32[:, :, None, :, :]).sum(-1)
    else:
        scores = lax.dot_general(
            keys, queries, (((3,), (3,)), batch), preferred_element_type=jnp.float32
        ).transpose(0, 1, 3, 2)
    scores = scores.reshape(b, kh, g, t, s)
    scores = jnp.where(mask[:, None, None], scores * scale, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kh, g * t, s)
    if t == 1:
        out = (probs[..., None] * values[:, :, None].astype(jnp.float32)).sum(3)
    else:
        out = lax.dot_general(
            probs.astype(values.dtype),
            values,
            (((3,), (2,)), batch),
            preferred_element_type=jnp.float32,
        )
    return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).astype(q.dtype)


def split_fused(
    x: Float[Array, "... w"], widths: Sequence[int], blocks: int
) -> list[Array]:
    """Splits the output columns of a fused projection into its parts.

    Args:
        x: `[..., w]` with `w = sum(widths)`, held as `blocks` equal blocks that each put
            their share `width / blocks` of every part side by side.
        widths: the full width of each part (e.g. `q, k, v` widths).
        blocks: the layout's block count (`ModelParams.fused_blocks`).

    Returns:
        The parts `[..., width]`, in the order of `widths`.
    """
    *lead, w = x.shape
    shares = [width // blocks for width in widths]
    parts = jnp.split(x.reshape(*lead, blocks, w // blocks), np.cumsum(shares)[:-1], axis=-1)
    return [part.reshape(*lead, width) for part, width in zip(parts, widths, strict=True)]


def _dense(features: int, use_bias: bool, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nn.initializers.normal(INIT_STD),
        name=name,
    )


class _Attention(nn.Module):
    """Self-attention with fused q/k/v projection (one matrix product instead of three)."""

    config: ModelConfig
    dtype: Any
    fused_blocks: int = 1

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index):
        """Attends the new tokens over the cache (or over themselves).

        Args:
            x: `[b, t, h]` normalised hidden states of the new tokens.
            cos, sin: `[b, t, d]` RoPE tables of the new tokens.
            mask: `[b, t, s]` which keys each new token may attend to (`s = t` without a
                cache).
            kv: `(keys, values)` of this layer's cache, each `[b, k, s, d]`, or None to
                attend only among the new tokens.
            index: int32 slot where the new keys are written (unused without a cache).

        Returns:
            The attention output `[b, t, h]` and `(keys, values)`: the updated cache, or
            the new tokens' own keys and values `[b, k, t, d]` without one.
        """
        cfg = self.config
        b, t, _ = x.shape
        kh, g, d = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        q_width, kv_width = cfg.num_heads * d, kh * d
        qkv = _dense(q_width + 2 * kv_width, cfg.qkv_bias, self.dtype, "qkv_proj")(x)
        q, k, v = split_fused(qkv, (q_width, kv_width, kv_width), self.fused_blocks)
        q = _apply_rope(q.reshape(b, t, kh, g, d), cos[:, :, None, None], sin[:, :, None, None])
        k = _apply_rope(k.reshape(b, t, kh, d), cos[:, :, None], sin[:, :, None])
        k = k.transpose(0, 2, 1, 3)
        v = v.reshape(b, t, kh, d).transpose(0, 2, 1, 3)
        if kv is None:
            keys, values = k, v
        else:
            start = (0, 0, index, 0)
            keys = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            values = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        out = _attend(q, keys, values, mask).reshape(b, t, q_width)
        return _dense(cfg.hidden_size, False, self.dtype, "o_proj")(out), (keys, values)


class _MLP(nn.Module):
    """SwiGLU MLP `down(silu(gate(x)) * up(x))`, gate and up fused in one product."""

    config: ModelConfig
    dtype: Any
    fused_blocks: int = 1

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate_up = _dense(2 * cfg.intermediate_size, False, self.dtype, "gate_up_proj")(x)
        gate, up = split_fused(gate_up, (cfg.intermediate_size,) * 2, self.fused_blocks)
        return _dense(cfg.hidden_size, False, self.dtype, "down_proj")(nn.silu(gate) * up)


class _DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    fused_blocks: int = 1

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index):
        """Pre-norm layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""
        eps = self.config.rms_norm_eps
        y = _RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        att, kv = _Attention(self.config, self.dtype, self.fused_blocks, name="self_attn")(
            y, cos, sin, mask, kv, index
        )
        x = x + att
        y = _RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        return x + _MLP(self.config, self.dtype, self.fused_blocks, name="mlp")(y), kv


class _Decoder(nn.Module):
    config: ModelConfig
    dtype: Any
    fused_blocks: int = 1

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.initializers.normal(INIT_STD),
        )
        # Separate per-layer parameters (layers_0, layers_1, ...), not a stacked array:
        # on XLA:CPU slicing a stacked array inside the unrolled loop is slower.
        self.layers = [
            _DecoderLayer(cfg, self.dtype, self.fused_blocks) for _ in range(cfg.num_layers)
        ]
        self.norm = _RMSNorm(cfg.rms_norm_eps, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, tokens, positions, mask, kvs, index, last_only, hidden_only=False):
        """Runs the new tokens through all layers.

        Args:
            tokens: `[b, t]` token ids.
            positions: `[b, t]` RoPE positions.
            mask: `[b, t, s]` attention mask.
            kvs: per-layer `(keys, values)` caches, or None (attend among new tokens).
            index: int32 write slot of the new tokens in the cache.
            last_only: compute logits for the last column only (prefill).
            hidden_only: return the final normalised hidden states `[b, t, h]` instead
                of logits.

        Returns:
            Float32 logits `[b, t, v]` (`[b, 1, v]` if `last_only`) and the per-layer
            `(keys, values)`.
        """
        cfg = self.config
        cos, sin = _rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(tokens)
        new_kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if kvs is None else kvs[i], index)
            new_kvs.append(kv)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if hidden_only:
            return x.astype(jnp.float32), new_kvs
        if cfg.tie_word_embeddings:
            return _tied_head(self.embed_tokens.embedding, x), new_kvs
        return self.lm_head(x).astype(jnp.float32), new_kvs

    def residual_stream(self, tokens, positions, mask, layers):
        """Runs whole sequences through all layers, keeping the inputs of `layers`.

        Args:
            tokens, positions, mask: as in `__call__`, without a cache (`s = t`).
            layers: static layer indices.

        Returns:
            `[n, b, t, h]` the inputs of `layers` (in that order) and `[b, t, h]` the final
            normalised hidden states, both in the compute dtype.
        """
        cfg = self.config
        cos, sin = _rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(tokens)
        inputs = {}
        for i, layer in enumerate(self.layers):
            inputs[i] = x
            x, _ = layer(x, cos, sin, mask, None, 0)
        kept = [inputs[i] for i in layers]
        stacked = jnp.stack(kept) if kept else jnp.zeros((0, *x.shape), x.dtype)
        return stacked, self.norm(x)


# ---------------------------------------------------------------------------------------
# Parameters.


def _module(params_or_config: ModelParams | ModelConfig, dtype=None) -> _Decoder:
    if isinstance(params_or_config, ModelParams):
        params = params_or_config
        return _Decoder(params.config, params.dtype, params.fused_blocks)
    return _Decoder(params_or_config, dtype)


def _abstract_weights(config: ModelConfig, dtype) -> dict:
    """Shapes and dtypes of the weights of `config`, without allocating them."""
    module = _module(config, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    variables = jax.eval_shape(
        lambda key: module.init(key, tokens, tokens, mask, None, 0, False), jax.random.key(0)
    )
    return variables["params"]


def init_params(config: ModelConfig, key: Array, dtype=jnp.float32) -> ModelParams:
    """Random weights: matrices ~ Normal(0, INIT_STD²), norm scales 1, biases 0.

    All matrix entries are one normal draw from `key`, split over the matrices in
    sorted path order, so initialisation runs one random-number kernel and never the
    network (a 135M-parameter config takes seconds).

    Args:
        config: the architecture.
        key: PRNG key.
        dtype: storage and compute dtype (float32 or bfloat16).

    Returns:
        The `ModelParams`.
    """
    flat = sorted(flax.traverse_util.flatten_dict(_abstract_weights(config, dtype)).items())
    random = [(path, leaf.shape) for path, leaf in flat if path[-1] in ("kernel", "embedding")]
    total = sum(math.prod(shape) for _, shape in random)
    normal = np.asarray(jax.random.normal(key, (total,), jnp.float32))
    weights = {}
    offset = 0
    for path, shape in random:
        size = math.prod(shape)
        block = INIT_STD * normal[offset : offset + size].reshape(shape)
        weights[path] = jnp.asarray(block, dtype=dtype)
        offset += size
    for path, leaf in flat:
        if path[-1] == "scale":
            weights[path] = jnp.asarray(np.ones(leaf.shape), dtype=dtype)
        elif path[-1] == "bias":
            weights[path] = jnp.asarray(np.zeros(leaf.shape), dtype=dtype)
    return ModelParams(config=config, weights=flax.traverse_util.unflatten_dict(weights))


def _hf_layout(config: ModelConfig) -> dict[tuple[str, ...], tuple[list[str], bool, list[tuple]]]:
    """Flax path -> (HF tensor names concatenated along the output axis, transposed, HF
    shapes). HF stores matrices as `[out, in]`; Flax kernels are `[in, out]`."""
    h, d = config.hidden_size, config.head_dim
    q_width, kv_width = config.num_heads * d, config.num_kv_heads * d
    layout: dict = {
        ("embed_tokens", "embedding"): (
            ["model.embed_tokens.weight"],
            False,
            [(config.vocab_size, h)],
        )
    }
    for i in range(config.num_layers):
        hf, fx = f"model.layers.{i}", f"layers_{i}"
        attn = f"{hf}.self_attn"
        qkv = [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
        layout[(fx, "self_attn", "qkv_proj", "kernel")] = (
            [f"{n}.weight" for n in qkv],
            True,
            [(q_width, h), (kv_width, h), (kv_width, h)],
        )
        if config.qkv_bias:
            layout[(fx, "self_attn", "qkv_proj", "bias")] = (
                [f"{n}.bias" for n in qkv],
                False,
                [(q_width,), (kv_width,), (kv_width,)],
            )
        layout[(fx, "self_attn", "o_proj", "kernel")] = (
            [f"{attn}.o_proj.weight"],
            True,
            [(h, q_width)],
        )
        layout[(fx, "mlp", "gate_up_proj", "kernel")] = (
            [f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"],
            True,
            [(config.intermediate_size, h)] * 2,
        )
        layout[(fx, "mlp", "down_proj", "kernel")] = (
            [f"{hf}.mlp.down_proj.weight"],
            True,
            [(h, config.intermediate_size)],
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout[(fx, norm, "scale")] = ([f"{hf}.{norm}.weight"], False, [(h,)])
    layout[("norm", "scale")] = (["model.norm.weight"], False, [(h,)])
    if not config.tie_word_embeddings:
        layout[("lm_head", "kernel")] = (["lm_head.weight"], True, [(config.vocab_size, h)])
    return layout


def _fused_layout(layer: Mapping) -> dict:
    """A layer's weights with fused `qkv_proj` and `gate_up_proj` (as `_DecoderLayer`
    reads them), from fused or separate projections (concatenated along the output)."""

    def fuse(tree: Mapping, names: tuple[str, ...], fused: str) -> dict:
        tree = dict(tree)
        if fused in tree:
            return tree
        parts = [tree.pop(name) for name in names]
        tree[fused] = {
            leaf: jnp.concatenate([part[leaf] for part in parts], axis=-1) for leaf in parts[0]
        }
        return tree

    return {
        **layer,
        "self_attn": fuse(layer["self_attn"], ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
        "mlp": fuse(layer["mlp"], ("gate_proj", "up_proj"), "gate_up_proj"),
    }


# Tensors some HF checkpoints carry that the decoder does not need.
_IGNORED_HF_TENSOR = re.compile(r".*\.rotary_emb\.inv_freq")


def params_from_hf(
    config: ModelConfig, tensors: Mapping[str, RowSource], dtype=jnp.float32
) -> ModelParams:
    """Builds params from Hugging Face tensors (names as in LlamaForCausalLM).

    Each parameter is converted into the target dtype and layout a few rows at a time and
    placed on the device before the next is read, so a lazy `tensors` mapping (the
    loaders' file tensors) is never held in memory whole (`hf_param_arrays`).

    Args:
        config: the architecture the tensors belong to.
        tensors: HF name -> array or lazy `RowSource`, e.g.
            `model.layers.0.self_attn.q_proj.weight` of shape `[out, in]`. A tied
            checkpoint may include or omit `lm_head.weight`.
        dtype: storage and compute dtype of the result.

    Returns:
        The `ModelParams`.

    Raises:
        ValueError: naming the tensor, if one is missing, unexpected, or has a shape that
            does not match `config`.
    """
    return params_from_arrays(config, hf_param_arrays(config, tensors, dtype))


def params_from_arrays(
    config: ModelConfig, arrays: Iterable[tuple[tuple[str, ...], np.ndarray]]
) -> ModelParams:
    """Params from host arrays in their final layout, each moved to the device in turn.

    Args:
        config: the architecture.
        arrays: `(Flax path, host array)` pairs, e.g. from `hf_param_arrays`; each array
            is handed to the device before the next is produced.

    Returns:
        The `ModelParams`.
    """
    weights = {path: to_device(host) for path, host in arrays}
    return ModelParams(config=config, weights=flax.traverse_util.unflatten_dict(weights))


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> shape of every parameter, in the order `hf_param_arrays` yields them."""
    shapes = {}
    for path, (_, transpose, hf_shapes) in _hf_layout(config).items():
        first = hf_shapes[0][::-1] if transpose else hf_shapes[0]
        width = sum(shape[0] if transpose else shape[-1] for shape in hf_shapes)
        shapes[path] = (*first[:-1], width)
    return shapes


def hf_param_arrays(
    config: ModelConfig, tensors: Mapping[str, RowSource], dtype=jnp.float32
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Converts Hugging Face tensors into the params' layout, one parameter at a time.

    Every name and shape is checked before any tensor is read. Each parameter is then
    filled, `transfer.CHUNK_BYTES` of source rows at a time, into a fresh aligned host
    buffer of `dtype` (q, k and v side by side, gate and up side by side, matrices
    transposed to `[in, out]`), so the transient memory is one chunk.

    Args:
        config: the architecture the tensors belong to.
        tensors: HF name -> array or lazy `RowSource` (see `params_from_hf`).
        dtype: dtype of the yielded arrays.

    Yields:
        `(Flax path, host array)` in the order of `param_shapes(config)`.

    Raises:
        ValueError: naming the tensor, if one is missing, unexpected, or has a shape that
            does not match `config` (raised before the first array is yielded).
    """
    layout = _hf_layout(config)
    model = (
        f"a {config.architecture.value} model with {config.num_layers} layers, "
        f"qkv_bias={config.qkv_bias}, tie_word_embeddings={config.tie_word_embeddings}"
    )

    def ignored(name: str) -> bool:
        tied_head = name == "lm_head.weight" and config.tie_word_embeddings
        return tied_head or _IGNORED_HF_TENSOR.fullmatch(name) is not None

    hf_layout.check(layout, tensors, model, ignored)
    return _fill_params(layout, param_shapes(config), tensors, jnp.dtype(dtype))


def _fill_params(
    layout: Mapping[tuple[str, ...], tuple[list[str], bool, list[tuple]]],
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    tensors: Mapping[str, RowSource],
    dtype: np.dtype,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for path, (names, transpose, _) in layout.items():
        out = host_buffer(shapes[path], dtype)
        column = 0
        for name in names:
            source = tensors[name]
            for rows in row_chunks(tuple(source.shape)):
                block = np.asarray(source[rows])
                if transpose:  # HF [out, in] rows are the kernel's output columns
                    out[:, column + rows.start : column + rows.stop] = block.T
                elif out.ndim == 1:
                    out[column + rows.start : column + rows.stop] = block
                else:
                    out[rows, column : column + block.shape[-1]] = block
            column += source.shape[0] if transpose or out.ndim == 1 else source.shape[-1]
        yield path, out


def params_to_hf(params: ModelParams) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: HF tensor name -> `[out, in]` array.

    Args:
        params: the model, in any `fused_blocks` layout.

    Returns:
        A dict of NumPy arrays in the params' dtype, without `lm_head.weight` for a tied
        head.
    """
    flat = flax.traverse_util.flatten_dict(params.weights)
    tensors = {}
    for path, (names, transpose, shapes) in _hf_layout(params.config).items():
        parts = [flat[path]]
        if len(names) > 1:  # fused: split the output columns into the HF tensors
            parts = split_fused(parts[0], [shape[0] for shape in shapes], params.fused_blocks)
        for name, part in zip(names, parts, strict=True):
            part = np.asarray(part)
            tensors[name] = np.ascontiguousarray(part.T if transpose else part)
    return tensors


# ---------------------------------------------------------------------------------------
# Inference.


def _check_batch(name: str, tokens: Array, rank: int) -> None:
    if tokens.ndim != rank:
        raise ValueError(f"{name}: tokens must have rank {rank}, got shape {tokens.shape}.")


def _left_aligned(tokens: Int[Array, "b t"], lengths: Int[Array, " b"]) -> Int[Array, "b t"]:
    """Moves right-padded prompts to the end of their rows (padding first)."""
    t = tokens.shape[1]
    shift = t - lengths
    columns = (jnp.arange(t)[None, :] - shift[:, None]) % t
    return jnp.take_along_axis(tokens, columns, axis=1)


def _block_mask(start: Int[Array, " b"], t: int) -> Array:
    """`[b, t, t]`: query i sees key j iff start[b] <= j <= i."""
    slots = jnp.arange(t)
    causal = slots[None, :] <= slots[:, None]
    return causal[None] & (slots[None, None, :] >= start[:, None, None])


def _whole_sequences(
    lengths: Int[Array, " b"], t: int, padding: Padding
) -> tuple[Int[Array, "b t"], Bool[Array, "b t t"]]:
    """RoPE positions and causal mask of `t`-column padded rows run without a cache."""
    lengths = jnp.asarray(lengths, jnp.int32)
    start = t - lengths if padding is Padding.LEFT else jnp.zeros_like(lengths)
    positions = jnp.arange(t)[None, :] - start[:, None]
    return positions, _block_mask(start, t)


def _tied_head(table: Float[Array, "v h"], x: Float[Array, "... h"]) -> Float[Array, "... v"]:
    """Float32 logits through the embedding table used as the output head.

    Table first, contracted over its minor axis: `x @ table.T` would make XLA:CPU copy
    the transposed table (113 MB for SmolLM2) on every call.
    """
    return jnp.einsum("vh,...h->...v", table, x, preferred_element_type=jnp.float32)


def output_logits(params: ModelParams, hidden: Float[Array, "... h"]) -> Float[Array, "... v"]:
    """Float32 logits of final-normed hidden states through the model's output head.

    Args:
        params: the model.
        hidden: `[..., h]` final-normed hidden states (e.g. from `final_hidden_states`).

    Returns:
        `[..., v]` float32 logits, as `forward` computes them.
    """
    if params.config.tie_word_embeddings:
        return _tied_head(params.weights["embed_tokens"]["embedding"], hidden)
    return (hidden @ params.weights["lm_head"]["kernel"]).astype(jnp.float32)


def forward(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    padding: Padding = Padding.RIGHT,
) -> Float[Array, "b t v"]:
    """Scores whole sequences without a cache (for NLL and tests).

    Args:
        params: the model.
        tokens: `[b, t]` token ids; row `b` holds `lengths[b]` real tokens placed as
            `padding` says.
        lengths: `[b]` real tokens per row, in `[1, t]`.
        padding: where each row's padding sits.

    Returns:
        Float32 logits `[b, t, v]`; column `j` predicts the token after column `j`.
        Columns of padding hold finite values that mean nothing.
    """
    _check_batch("forward", tokens, 2)
    positions, mask = _whole_sequences(lengths, tokens.shape[1], padding)
    logits, _ = _module(params).apply(
        {"params": params.weights}, tokens, positions, mask, None, 0, False
    )
    return logits


def final_hidden_states(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    padding: Padding = Padding.RIGHT,
) -> Float[Array, "b t h"]:
    """The final normalised hidden states of whole sequences, without a cache.

    These are what the LM head reads.

    Args:
        params: the model.
        tokens: `[b, t]` token ids; row `b` holds `lengths[b]` real tokens placed as
            `padding` says.
        lengths: `[b]` real tokens per row, in `[1, t]`.
        padding: where each row's padding sits.

    Returns:
        Float32 `[b, t, h]`; columns of padding hold values that mean nothing.
    """
    _check_batch("final_hidden_states", tokens, 2)
    positions, mask = _whole_sequences(lengths, tokens.shape[1], padding)
    hidden, _ = _module(params).apply(
        {"params": params.weights}, tokens, positions, mask, None, 0, False, True
    )
    return hidden


def residual_stream(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    layers: Sequence[int],
    padding: Padding = Padding.RIGHT,
) -> tuple[Float[Array, "n b t h"], Float[Array, "b t h"]]:
    """The residual stream of whole sequences entering chosen layers, without a cache.

    Args:
        params: the model.
        tokens: `[b, t]` token ids; row `b` holds `lengths[b]` real tokens placed as
            `padding` says.
        lengths: `[b]` real tokens per row, in `[1, t]`.
        layers: static layer indices, each in `[0, num_layers)`; entry `i` of the first
            result is the input of layer `layers[i]` (the embedding for layer 0).
        padding: where each row's padding sits.

    Returns:
        `[n, b, t, h]` the inputs of `layers` and `[b, t, h]` the final normalised hidden
        states (those of `final_hidden_states`), both in the parameter dtype. Columns of
        padding hold values that mean nothing.

    Raises:
        ValueError: naming the layer, if one is out of range.
    """
    _check_batch("residual_stream", tokens, 2)
    n = params.config.num_layers
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(
                f"residual_stream: layer {layer!r} must be an int in [0, {n - 1}] for a "
                f"model with {n} layers."
            )
    positions, mask = _whole_sequences(lengths, tokens.shape[1], padding)
    return _module(params).apply(
        {"params": params.weights},
        tokens,
        positions,
        mask,
        tuple(layers),
        method=_Decoder.residual_stream,
    )


def decoder_layer(
    config: ModelConfig,
    layer: Mapping,
    x: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
    padding: Padding = Padding.RIGHT,
) -> Float[Array, "b t h"]:
    """One decoder layer over whole sequences, without a cache.

    Args:
        config: the architecture.
        layer: the layer's weights, as `weights["layers_i"]` of a `ModelParams`, or with
            separate `self_attn/{q,k,v}_proj` and `mlp/{gate,up}_proj` (HF's layout with
            `[in, out]` kernels); their dtype is the compute dtype.
        x: `[b, t, h]` the layer's input (the residual stream).
        lengths: `[b]` real tokens per row, in `[1, t]`.
        padding: where each row's padding sits.

    Returns:
        `[b, t, h]` the layer's output, in the weights' dtype. Columns of padding hold
        values that mean nothing.
    """
    positions, mask = _whole_sequences(lengths, x.shape[1], padding)
    cos, sin = _rope_tables(positions, config.head_dim, config.rope_theta)
    module = _DecoderLayer(config, layer["input_layernorm"]["scale"].dtype)
    out, _ = module.apply({"params": _fused_layout(layer)}, x, cos, sin, mask, None, 0)
    return out


def prefill(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    cache: KVCache,
    padding: Padding = Padding.RIGHT,
) -> tuple[Float[Array, "b v"], KVCache]:
    """Runs the prompts and fills the cache from slot 0 (earlier contents are dropped).

    Rows are stored right-aligned in slots `[t - lengths[b], t)`; the cache's next write
    slot becomes `t`.

    Args:
        params: the model.
        tokens: `[b, t]` prompt ids; row `b` holds `lengths[b]` real tokens placed as
            `padding` says. Padding ids must be valid ids (their values do not matter).
        lengths: `[b]` prompt lengths, in `[1, t]`.
        cache: a cache with `b` rows and at least `t` slots.
        padding: where each row's padding sits.

    Returns:
        Float32 logits `[b, v]` at each row's last prompt token, and the filled cache.

    Raises:
        ValueError: if the prompts are longer than the cache or the batch sizes differ.
    """
    _check_batch("prefill", tokens, 2)
    b, t = tokens.shape
    if t > cache.max_length:
        raise ValueError(
            f"prefill: prompt length {t} exceeds the cache's max_length "
            f"{cache.max_length}; allocate the cache with init_cache(..., max_length>={t})."
        )
    if b != cache.batch_size:
        raise ValueError(
            f"prefill: {b} prompts but the cache has {cache.batch_size} rows; allocate it "
            f"with init_cache(..., batch_size={b})."
        )
    lengths = jnp.asarray(lengths, jnp.int32)
    if padding is Padding.RIGHT:
        tokens = _left_aligned(tokens, lengths)
    start = t - lengths
    positions = jnp.arange(t)[None, :] - start[:, None]
    logits, kvs = _module(params).apply(
        {"params": params.weights}, tokens, positions, _block_mask(start, t), None, 0, True
    )
    zero = (0, 0, 0, 0)
    keys = tuple(
        lax.dynamic_update_slice(c, k.astype(c.dtype), zero)
        for c, (k, _) in zip(cache.keys, kvs, strict=True)
    )
    values = tuple(
        lax.dynamic_update_slice(c, v.astype(c.dtype), zero)
        for c, (_, v) in zip(cache.values, kvs, strict=True)
    )
    cache = KVCache(keys=keys, values=values, index=jnp.asarray(t, jnp.int32), start=start)
    return logits[:, 0], cache


def decode(
    params: ModelParams, tokens: Int[Array, " b"], cache: KVCache
) -> tuple[Float[Array, "b v"], KVCache]:
    """Appends one token per row and returns the next-token logits.

    Args:
        params: the model.
        tokens: `[b]` the newest token of each row.
        cache: the cache after `prefill` (and earlier `decode` steps).

    Returns:
        Float32 logits `[b, v]` and the cache with the new keys and values written at
        slot `cache.index`, which advances by one. If the cache was already full
        (`index == max_length`), the logits are NaN instead of silently wrong.
    """
    _check_batch("decode", tokens, 1)
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(
            f"decode: {tokens.shape[0]} tokens but the cache has {cache.batch_size} rows."
        )
    index, start, s = cache.index, cache.start, cache.max_length
    positions = (index - start)[:, None]
    slots = jnp.arange(s)
    mask = ((slots[None, :] >= start[:, None]) & (slots[None, :] <= index))[:, None, :]
    kvs = list(zip(cache.keys, cache.values, strict=True))
    logits, kvs = _module(params).apply(
        {"params": params.weights}, tokens[:, None], positions, mask, kvs, index, False
    )
    logits = jnp.where(index < s, logits[:, 0], jnp.nan)
    cache = KVCache(
        keys=tuple(k for k, _ in kvs),
        values=tuple(v for _, v in kvs),
        index=index + 1,
        start=start,
    )
    return logits, cache
