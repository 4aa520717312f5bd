"""BERT encoder and sentence embeddings as pure functions over an explicit params pytree.

`hidden_states(params, token_ids, mask)` runs the encoder; `embed(params, token_ids,
mask)` turns its output into sentence embeddings the way sentence-transformers does for
all-MiniLM-L6-v2: the mean of the last hidden states over the row's real tokens, scaled
to unit L2 norm. Params are a `BertParams` pytree passed as an argument; nothing is closed
over. Apply `jax.jit` at the call site:

    vectors = jax.jit(embed)(params, token_ids, mask)   # [b, h], unit rows

Shapes (see `uhlm_jax.types`): `b` batch, `t` tokens per row, `h` hidden, `v` vocabulary.
Rows hold their real tokens where `mask` is true, usually first (right padding). Position
ids count a row's real tokens (`0, 1, ...` in order), so a row's embedding does not
depend on where its padding sits or on what else is in the batch: masked keys get
attention weight exactly 0, and every other operation is per token.

The network (Devlin et al. 2019; HF transformers' `BertModel`): word + absolute position +
token-type embeddings, LayerNorm; then per layer, post-LayerNorm residual blocks
`x = LN(x + attn(x))`, `x = LN(x + W2 gelu(W1 x))`, with biases everywhere and the exact
(erf) GELU. LayerNorm, attention scores and softmax run in float32.

References:
    Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding", NAACL 2019.
    Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    EMNLP 2019 (mean pooling of the token embeddings).
    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020 (the 6-layer, 384-wide encoder).
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uhlm_jax.models import hf_layout
from uhlm_jax.types import Array, Bool, Float, Int

__all__ = [
    "MINILM_L6_H384",
    "BertConfig",
    "BertParams",
    "embed",
    "hidden_states",
    "init_params",
    "l2_normalize",
    "mean_pool",
    "params_from_hf",
]

# Standard deviation of the normal initialiser of `init_params` (HF `initializer_range`).
INIT_STD = 0.02

# Score given to masked keys: finite, so an all-masked row (batch padding) gets a uniform
# average instead of NaN, and exp(_MASKED - max) underflows to exactly 0 otherwise.
_MASKED = float(np.finfo(np.float32).min)

# Floor of the norm in `l2_normalize`, as torch.nn.functional.normalize's `eps`.
NORM_EPS = 1e-12

# Floor of the token count in `mean_pool`, as sentence-transformers' Pooling clamps it.
COUNT_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static sizes of a BERT encoder; hashable, so `BertParams` carries it as aux data.

    Attributes:
        vocab_size: word-piece ids `v`.
        hidden_size: residual width `h`; a multiple of `num_heads`.
        num_layers: encoder layers.
        num_heads: attention heads.
        intermediate_size: inner width of the feed-forward block.
        max_positions: rows may hold at most this many tokens (absolute positions).
        type_vocab_size: token types (segment ids).
        layer_norm_eps: added to the variance in every LayerNorm.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "layer_norm_eps":
                ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
            else:
                ok = isinstance(value, int) and value > 0
            if isinstance(value, bool) or not ok:
                raise ValueError(
                    f"BertConfig.{field.name} must be a positive {field.type}, got {value!r}."
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `hidden_size / num_heads`."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> BertConfig:
        """Converts a Hugging Face `BertConfig` (`config.json`).

        Raises:
            ValueError: naming the key, for a model that is not a BERT with absolute
                positions and the exact GELU, or a missing size.
        """
        expected = {"model_type": "bert", "hidden_act": "gelu"}
        for key, value in expected.items():
            if hf.get(key) != value:
                raise ValueError(
                    f"Only BERT encoders with {key}={value!r} are supported, got "
                    f"{key}={hf.get(key)!r}."
                )
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "Only absolute position embeddings are supported, got "
                f"position_embedding_type={hf['position_embedding_type']!r}."
            )
        keys = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_positions": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps",
        }
        missing = sorted(hf_key for hf_key in keys.values() if hf_key not in hf)
        if missing:
            raise ValueError(f"BERT config.json lacks {missing}.")
        return cls(**{name: hf[hf_key] for name, hf_key in keys.items()})


# all-MiniLM-L6-v2 (and nreimers/MiniLM-L6-H384-uncased, which it was trained from).
MINILM_L6_H384 = BertConfig(
    vocab_size=30522,
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_positions=512,
)


@flax.struct.dataclass
class BertParams:
    """Weights of a BERT encoder, as a pytree whose config is static aux data.

    Attributes:
        config: the sizes; part of the treedef, so `jit` specialises on it.
        weights: float32 arrays. `embeddings`: `word [v, h]`, `position [max_positions, h]`,
            `token_type [type_vocab_size, h]`, `norm/{scale, bias} [h]`. `layers`: a tuple
            of `num_layers` dicts, each with `qkv/{kernel [h, 3h], bias [3h]}` (query, key
            and value side by side), `attention_out/{kernel [h, h], bias [h]}`,
            `attention_norm/{scale, bias}`, `up/{kernel [h, i], bias [i]}`,
            `down/{kernel [i, h], bias [h]}` and `mlp_norm/{scale, bias}`. Kernels are
            `[in, out]` (transposed relative to HF); `params_from_hf` converts.
    """

    config: BertConfig = flax.struct.field(pytree_node=False)
    weights: dict


def layer_norm(
    x: Float[Array, "... h"], norm: Mapping[str, Float[Array, " h"]], eps: float
) -> Float[Array, "... h"]:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, in float32.

    Ba, Kiros & Hinton, "Layer Normalization" (2016).
    """
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
    lead = tuple(range(x.ndim - 1))
    scale, bias = jnp.expand_dims(norm["scale"], lead), jnp.expand_dims(norm["bias"], lead)
    return centred * jax.lax.rsqrt(variance + eps) * scale + bias


def _dense(x: Float[Array, "... i"], layer: Mapping[str, Array]) -> Float[Array, "... o"]:
    return x @ layer["kernel"] + jnp.expand_dims(layer["bias"], tuple(range(x.ndim - 1)))


def _attention(
    x: Float[Array, "b t h"], mask: Bool[Array, "b t"], layer: Mapping, config: BertConfig
) -> Float[Array, "b t h"]:
    """Multi-head self-attention over the row's real tokens (every query sees every key)."""
    b, t, h = x.shape
    heads, d = config.num_heads, config.head_dim
    q, k, v = jnp.split(_dense(x, layer["qkv"]).reshape(b, t, 3, heads, d), 3, axis=2)
    scores = jnp.einsum("bqnd,bknd->bnqk", q[:, :, 0], k[:, :, 0]) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v[:, :, 0]).reshape(b, t, h)
    return _dense(out, layer["attention_out"])


def _encoder_layer(
    x: Float[Array, "b t h"], mask: Bool[Array, "b t"], layer: Mapping, config: BertConfig
) -> Float[Array, "b t h"]:
    """Post-norm layer: `LN(x + attn(x))`, then `LN(x + down(gelu(up(x))))`."""
    eps = config.layer_norm_eps
    x = layer_norm(x + _attention(x, mask, layer, config), layer["attention_norm"], eps)
    inner = jax.nn.gelu(_dense(x, layer["up"]), approximate=False)
    return layer_norm(x + _dense(inner, layer["down"]), layer["mlp_norm"], eps)


def _check_rows(name: str, token_ids: Array, mask: Array, config: BertConfig) -> None:
    if token_ids.ndim != 2 or mask.shape != token_ids.shape:
        raise ValueError(
            f"{name}: token_ids and mask must both be [b, t], got {token_ids.shape} and "
            f"{mask.shape}."
        )
    if token_ids.shape[1] > config.max_positions:
        raise ValueError(
            f"{name}: rows of {token_ids.shape[1]} tokens exceed the model's "
            f"{config.max_positions} positions; truncate them."
        )


def hidden_states(
    params: BertParams,
    token_ids: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    token_type_ids: Int[Array, "b t"] | None = None,
) -> Float[Array, "b t h"]:
    """The last layer's hidden states of each row's real tokens.

    Args:
        params: the encoder.
        token_ids: `[b, t]` word-piece ids (with `[CLS]` first and `[SEP]` last, as the
            tokenizer makes them); ids under `~mask` must be valid but are ignored.
        mask: `[b, t]` true at a row's real tokens; it may be all false for a padding row.
        token_type_ids: `[b, t]` segment ids, all 0 (one sentence) when None.

    Returns:
        Float32 `[b, t, h]`; columns where `mask` is false hold values that mean nothing.

    Raises:
        ValueError: if the shapes disagree or `t > config.max_positions`.
    """
    config = params.config
    _check_rows("hidden_states", token_ids, mask, config)
    mask = jnp.asarray(mask, bool)
    embeddings = params.weights["embeddings"]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    types = jnp.zeros_like(token_ids) if token_type_ids is None else token_type_ids
    x = (
        embeddings["word"][token_ids]
        + embeddings["position"][positions]
        + embeddings["token_type"][types]
    )
    x = layer_norm(x, embeddings["norm"], config.layer_norm_eps)
    for layer in params.weights["layers"]:
        x = _encoder_layer(x, mask, layer, config)
    return x


def mean_pool(hidden: Float[Array, "b t h"], mask: Bool[Array, "b t"]) -> Float[Array, "b h"]:
    """Mean of each row's hidden states over its real tokens (sentence-BERT's MEAN pooling).

    Reimers & Gurevych (2019), §3. An all-false row gives 0 (the count is floored at
    `COUNT_EPS`, as sentence-transformers does).
    """
    weights = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(hidden * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), COUNT_EPS)


def l2_normalize(x: Float[Array, "... h"]) -> Float[Array, "... h"]:
    """`x / max(‖x‖₂, NORM_EPS)` along the last axis (torch's `F.normalize`)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, NORM_EPS)


def embed(
    params: BertParams, token_ids: Int[Array, "b t"], mask: Bool[Array, "b t"]
) -> Float[Array, "b h"]:
    """Unit-norm sentence embeddings: mean pooling of `hidden_states`, then L2 normalisation.

    This is sentence-transformers' `Transformer -> Pooling(mean) -> Normalize` pipeline,
    so the cosine of two sentences is the dot product of their rows.

    Args:
        params: the encoder.
        token_ids: `[b, t]` word-piece ids, one sentence per row.
        mask: `[b, t]` true at a row's real tokens.

    Returns:
        Float32 `[b, h]` with unit rows (zero rows for all-false masks).
    """
    return l2_normalize(mean_pool(hidden_states(params, token_ids, mask), mask))


def init_params(config: BertConfig, key: Array) -> BertParams:
    """Random float32 weights: normal(0, INIT_STD) matrices, unit scales, zero biases.

    Args:
        config: the sizes.
        key: the initialisation key.
    """
    h, i = config.hidden_size, config.intermediate_size
    keys = iter(jax.random.split(key, 3 + 4 * config.num_layers))

    def normal(*shape):
        return INIT_STD * jax.random.normal(next(keys), shape, jnp.float32)

    def dense(n_in, n_out):
        return {"kernel": normal(n_in, n_out), "bias": jnp.zeros((n_out,), jnp.float32)}

    def norm():
        return {"scale": jnp.ones((h,), jnp.float32), "bias": jnp.zeros((h,), jnp.float32)}

    embeddings = {
        "word": normal(config.vocab_size, h),
        "position": normal(config.max_positions, h),
        "token_type": normal(config.type_vocab_size, h),
        "norm": norm(),
    }
    layers = tuple(
        {
            "qkv": dense(h, 3 * h),
            "attention_out": dense(h, h),
            "attention_norm": norm(),
            "up": dense(h, i),
            "down": dense(i, h),
            "mlp_norm": norm(),
        }
        for _ in range(config.num_layers)
    )
    return BertParams(config=config, weights={"embeddings": embeddings, "layers": layers})


def _hf_layout(config: BertConfig) -> hf_layout.Layout:
    """The `hf_layout.Layout` of `BertParams.weights` in an HF `BertModel` checkpoint."""
    h, i = config.hidden_size, config.intermediate_size
    vector = [(h,)]
    layout = {
        ("embeddings", "word"): (
            ["embeddings.word_embeddings.weight"],
            False,
            [(config.vocab_size, h)],
        ),
        ("embeddings", "position"): (
            ["embeddings.position_embeddings.weight"],
            False,
            [(config.max_positions, h)],
        ),
        ("embeddings", "token_type"): (
            ["embeddings.token_type_embeddings.weight"],
            False,
            [(config.type_vocab_size, h)],
        ),
        ("embeddings", "norm", "scale"): (["embeddings.LayerNorm.weight"], False, vector),
        ("embeddings", "norm", "bias"): (["embeddings.LayerNorm.bias"], False, vector),
    }
    for n in range(config.num_layers):
        hf = f"encoder.layer.{n}"
        blocks = {
            "qkv": ([f"{hf}.attention.self.{x}" for x in ("query", "key", "value")], (h, h)),
            "attention_out": ([f"{hf}.attention.output.dense"], (h, h)),
            "up": ([f"{hf}.intermediate.dense"], (i, h)),
            "down": ([f"{hf}.output.dense"], (h, i)),
        }
        for block, (names, shape) in blocks.items():
            kernels = ([f"{x}.weight" for x in names], True, [shape] * len(names))
            biases = ([f"{x}.bias" for x in names], False, [shape[:1]] * len(names))
            layout[("layers", n, block, "kernel")] = kernels
            layout[("layers", n, block, "bias")] = biases
        for block, prefix in (("attention_norm", "attention.output"), ("mlp_norm", "output")):
            norm = f"{hf}.{prefix}.LayerNorm"
            layout[("layers", n, block, "scale")] = ([f"{norm}.weight"], False, vector)
            layout[("layers", n, block, "bias")] = ([f"{norm}.bias"], False, vector)
    return layout


# Tensors of an HF BertModel checkpoint that sentence embeddings do not use: the [CLS]
# pooler head and the position-id buffer.
_UNUSED_HF_PREFIXES = ("pooler.", "embeddings.position_ids")


def params_from_hf(config: BertConfig, tensors: Mapping[str, np.ndarray]) -> BertParams:
    """Builds float32 params from the tensors of an HF `BertModel` checkpoint.

    Args:
        config: the sizes the tensors belong to.
        tensors: HF name -> array, e.g. `encoder.layer.0.attention.self.query.weight` of
            shape `[out, in]`; a `bert.` prefix on every name is accepted.

    Returns:
        The `BertParams`.

    Raises:
        ValueError: naming the tensor, if one is missing, unexpected, or has a shape that
            does not match `config`.
    """
    if tensors and all(name.startswith("bert.") for name in tensors):
        tensors = {name.removeprefix("bert."): array for name, array in tensors.items()}
    layout = _hf_layout(config)
    model = f"a BERT encoder with {config.num_layers} layers"
    hf_layout.check(layout, tensors, model, lambda name: name.startswith(_UNUSED_HF_PREFIXES))
    flat = {}
    for path, (names, transpose, _) in layout.items():
        parts = [np.asarray(tensors[name], np.float32) for name in names]
        flat[path] = jnp.asarray(np.concatenate([p.T if transpose else p for p in parts], -1))
    weights = traverse_util.unflatten_dict(flat)
    weights["layers"] = tuple(weights["layers"][n] for n in range(config.num_layers))
    return BertParams(config=config, weights=weights)
