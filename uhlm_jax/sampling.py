"""Token sampling, row padding and reply generation for one model.

- `mask_unused_ids`: checkpoints pad the embedding table past the tokenizer's ids
  (Qwen2: 151,665 ids, 151,936 rows); those ids must never be sampled.
- `sample_token`: one token from tempered, optionally top-k truncated logits, greedy at
  temperature 0, by inverse CDF. The draft of the hybrid rollout, its LLM-only token and
  the residual resample of verification are `sample_token(key, log_probs)` at the default
  settings.
- `pad_rows`, `padded_length`: variable-length rows right-padded into one array, with
  widths rounded up so that nearby lengths share a compile.
- `generate_replies`: replies of one model to a batch of prompts, as `lax.scan` over
  `reply_step` with the decode state in a `ReplyState`.

Shapes (see `uhlm_jax.types`): `b` rows, `t` prompt tokens, `n` steps, `v` vocabulary.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uhlm_jax.models.cache import KVCache, init_cache
from uhlm_jax.models.llama import ModelParams, decode, prefill
from uhlm_jax.top_k import top_k_values
from uhlm_jax.types import Array, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "ReplyConfig",
    "ReplyRecord",
    "ReplyState",
    "Replies",
    "generate_replies",
    "mask_unused_ids",
    "pad_rows",
    "padded_length",
    "reply_step",
    "sample_token",
    "start_replies",
]


def mask_unused_ids(logits: Float[Array, "*b v"], num_ids: int | None) -> Float[Array, "*b v"]:
    """Sets the logits of ids `>= num_ids` to `-inf`, so they are never sampled.

    Args:
        logits: `[..., v]` logits or log-probabilities.
        num_ids: static; the tokenizer's vocabulary size. None (or `>= v`) keeps all ids.

    Returns:
        `logits` with the unused ids masked; unchanged when none are unused.
    """
    vocab = logits.shape[-1]
    if num_ids is None or num_ids >= vocab:
        return logits
    return jnp.where(jnp.arange(vocab) < num_ids, logits, -jnp.inf)


def _sampling_logits(
    logits: Float[Array, "*b v"],
    temperature: Float[Array, ""] | float,
    top_k: int,
    num_ids: int | None,
) -> tuple[Float[Array, "*b v"], Float[Array, "*b v"], Bool[Array, ""]]:
    """The masked logits, their tempered form and whether to sample (`τ > 0`)."""
    logits = mask_unused_ids(jnp.asarray(logits, jnp.float32), num_ids)
    if top_k > 0:
        kth_largest = top_k_values(logits, top_k)[..., -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    temperature = jnp.asarray(temperature, jnp.float32)
    # Guard the division: the sampled branch is discarded when temperature == 0.
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    return logits, logits / safe_temperature, temperature > 0


def _block_size(vocab: int) -> int:
    """Ids per block of the two-level inverse CDF: about `√v`, so both scans are short."""
    return max(1, math.isqrt(vocab))


def _first_above(cumulative: Float[Array, " n"], target: Float[Array, ""]) -> Int[Array, ""]:
    """The first `i` with `cumulative[i] > target`, for a non-decreasing `cumulative`.

    If rounding put `target` at or above the last entry, returns the first index of the
    maximum, the last entry with positive mass: never one of probability zero.
    """
    return jnp.minimum(jnp.sum(cumulative <= target), jnp.argmax(cumulative))


def _inverse_cdf_one(uniforms: Float[Array, " 2"], scaled: Float[Array, " v"]) -> Int[Array, ""]:
    """One draw from `softmax(scaled)` by inverse CDF, in two levels.

    The weights `exp(scaled − max)` are cut into blocks of `_block_size(v)` ids: the first
    uniform picks a block by the cumulative block sums, the second an id inside it by the
    cumulative sum of that block. `P(id) = (block sum / total) · (weight / block sum)`, the
    softmax, up to float32 rounding: a few ulps of the sums, and the uniforms' resolution
    of `2^-23` (the Gumbel form has a like floor, as its noise is bounded).
    """
    vocab = scaled.shape[0]
    block = _block_size(vocab)
    num_blocks = -(-vocab // block)
    weights = jnp.exp(scaled - jnp.max(scaled))
    blocks = jnp.pad(weights, (0, num_blocks * block - vocab)).reshape(num_blocks, block)
    block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1))
    chosen = _first_above(block_cdf, uniforms[0] * block_cdf[-1])
    inner_cdf = jnp.cumsum(blocks[chosen])
    inner = _first_above(inner_cdf, uniforms[1] * inner_cdf[-1])
    return (chosen * block + inner).astype(jnp.int32)


def sample_token(
    key: PRNGKeyArray,
    logits: Float[Array, "*b v"],
    temperature: Float[Array, ""] | float = 1.0,
    top_k: int = 0,
    num_ids: int | None = None,
) -> Int[Array, "*b"]:
    """Samples a token id from `softmax(z / τ)` by inverse CDF; `-inf` is never drawn.

    Two uniforms and two cumulative sums of about `√v` entries per row (`_inverse_cdf_one`)
    replace the `v` Gumbel variates of the Gumbel-max trick, `argmax(z / τ + G)`, which
    costs several times more at a real vocabulary; the law is the same, the ids drawn for
    a given key are not.

    Ids `>= num_ids` are never chosen. With `top_k > 0`, ids whose logit is below the
    `top_k`-th largest are dropped (ties at the boundary are kept). `τ = 0` returns the
    argmax. At the defaults this is a plain draw from the distribution `logits` are the
    log-probabilities of.

    Args:
        key: PRNG key. Leading axes of `logits` are rows drawn independently with this one
            key; for per-row keys, `vmap` instead.
        logits: `[..., v]` logits (computed in float32).
        temperature: `[]` temperature `τ >= 0`, may be traced (changing it does not
            recompile).
        top_k: static; 0 keeps all ids.
        num_ids: static; the tokenizer's vocabulary size, or None to use all `v` ids.

    Returns:
        int32 `[...]` ids.
    """
    logits, scaled, sampled = _sampling_logits(logits, temperature, top_k, num_ids)
    rows = scaled.reshape(-1, scaled.shape[-1])
    uniforms = jax.random.uniform(key, (rows.shape[0], 2), jnp.float32)
    drawn = jax.vmap(_inverse_cdf_one)(uniforms, rows).reshape(scaled.shape[:-1])
    return jnp.where(sampled, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (so nearby lengths share a compile)."""
    if multiple < 1:
        raise ValueError(f"padded_length: multiple must be >= 1, got {multiple}.")
    return -(-length // multiple) * multiple


def pad_rows(
    rows: Sequence[np.ndarray | Sequence[int]], length: int, value=0, dtype=None
) -> np.ndarray:
    """Stacks rows `[t_i, ...]` into `[b, length, ...]`, right-padded with `value`.

    Args:
        rows: arrays (or lists of ids) with equal trailing shapes.
        length: the padded width, at least the longest row.
        value: the fill.
        dtype: of the result; None takes the first row's.

    Raises:
        ValueError: if there are no rows or a row is longer than `length`.
    """
    if not rows:
        raise ValueError("pad_rows: no rows given; pass at least one row.")
    arrays = [np.asarray(row) for row in rows]
    longest = max(len(row) for row in arrays)
    if longest > length:
        raise ValueError(f"pad_rows: a row has {longest} entries, more than length {length}.")
    first = arrays[0]
    out = np.full((len(arrays), length, *first.shape[1:]), value, dtype or first.dtype)
    for i, row in enumerate(arrays):
        out[i, : len(row)] = row
    return out


@dataclasses.dataclass(frozen=True)
class ReplyConfig:
    """Static settings of how replies are sampled and where they end.

    Attributes:
        top_k: sample among the `top_k` most likely ids; 0 keeps all.
        num_ids: the tokenizer's vocabulary size (ids at or above are never sampled);
            None uses all ids.
        stop_ids: ids that end a reply; the stop id itself belongs to the reply.
    """

    top_k: int = 0
    num_ids: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 keeps all ids), got {self.top_k!r}.")
        if self.num_ids is not None and self.num_ids < 1:
            raise ValueError(f"num_ids must be None or >= 1, got {self.num_ids!r}.")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


class ReplyState(NamedTuple):
    """Decode state of reply generation, carried by the scan.

    Attributes:
        cache: the model's KV cache.
        logits: `[b, v]` float32 logits of each row's next token.
        done: `[b]` the row has emitted a stop id; its later tokens are not in the reply.
    """

    cache: KVCache
    logits: Float[Array, "b v"]
    done: Bool[Array, " b"]


class ReplyRecord(NamedTuple):
    """What one step emits, `[b]` per step (`[n, b]` after the scan).

    Attributes:
        token: the sampled token (sampled, and meaningless, after the row is done).
        valid: the token belongs to the reply (the row was not done before this step).
    """

    token: Int[Array, "*n b"]
    valid: Bool[Array, "*n b"]


class Replies(NamedTuple):
    """Sampled replies.

    Attributes:
        tokens: `[b, n]` ids; those past a row's length mean nothing.
        lengths: `[b]` reply tokens per row, its stop id included.
    """

    tokens: Int[Array, "b n"]
    lengths: Int[Array, " b"]


def start_replies(
    params: ModelParams, tokens: Int[Array, "b t"], lengths: Int[Array, " b"], cache: KVCache
) -> ReplyState:
    """Prefills right-padded prompts into `cache`: the state before the first reply token."""
    logits, cache = prefill(params, tokens, lengths, cache)
    return ReplyState(cache=cache, logits=logits, done=jnp.zeros(lengths.shape, bool))


def reply_step(
    params: ModelParams,
    state: ReplyState,
    key: PRNGKeyArray,
    temperature: Float[Array, ""],
    config: ReplyConfig,
) -> tuple[ReplyState, ReplyRecord]:
    """Samples every row's next token (one key for the batch) and feeds it to the model."""
    token = sample_token(key, state.logits, temperature, config.top_k, config.num_ids)
    logits, cache = decode(params, token, state.cache)
    stopped = jnp.isin(token, jnp.asarray(config.stop_ids, jnp.int32))
    new_state = ReplyState(cache=cache, logits=logits, done=state.done | stopped)
    return new_state, ReplyRecord(token=token, valid=~state.done)


def generate_replies(
    params: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key: PRNGKeyArray,
    temperature: Float[Array, ""],
    config: ReplyConfig,
    max_new_tokens: int,
) -> Replies:
    """Samples one reply per right-padded prompt, step `i` with key `split(key, n)[i]`.

    Pure: apply `jax.jit` at the call site with `config` and `max_new_tokens` static. The
    cache has `t + max_new_tokens` slots in the parameter dtype.

    Args:
        params: the model.
        tokens: `[b, t]` right-padded prompt ids.
        lengths: `[b]` prompt lengths.
        key: the replies' key.
        temperature: `[]` sampling temperature (0 is greedy), traced.
        config: static settings.
        max_new_tokens: scan steps `n`; a reply ends earlier at a stop id.

    Returns:
        `Replies`: `[b, n]` ids and each reply's length (up to its first stop id).
    """
    b, t = tokens.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    cache = init_cache(params.config, b, t + max_new_tokens, params.dtype)
    state = start_replies(params, tokens, lengths, cache)

    def body(state: ReplyState, step_key: PRNGKeyArray) -> tuple[ReplyState, ReplyRecord]:
        return reply_step(params, state, step_key, temperature, config)

    _, records = lax.scan(body, state, jax.random.split(key, max_new_tokens))
    return Replies(tokens=records.token.T, lengths=jnp.sum(records.valid, axis=0))
