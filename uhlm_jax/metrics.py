"""Metrics of a rollout, computed from its per-token records.

Every function takes arrays shaped like the fields of `uhlm_jax.rollout.Records` (any
leading shape, usually `[n, b]`) and counts only `valid` tokens. Ratios whose denominator
is zero are NaN (e.g. the acceptance rate of a run that transmitted nothing), never a
division error.

Definitions (U-HLM, arXiv 2412.12687, §V):
  transmission rate  TR = transmitted / valid tokens; skip rate = 1 − TR.
  acceptance rate    accepted / transmitted.
  true skip rate     among skipped tokens, the share the LLM would have accepted. The
                     acceptance of a skipped draft is counterfactual; its probability is
                     `1 − β`, which the rollout records for every token, so the rate is the
                     mean of `1 − β` over skipped tokens (an unbiased, lower-variance
                     estimate of the share).
  realised risk      the mean of `β` over skipped tokens, per generated token
                     (`E[β · 1{skip}]`) and conditional on skipping (`E[β | skip]`).
"""
# ruff: noqa: F722

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from uhlm_jax import channel
from uhlm_jax.modes import Mode
from uhlm_jax.types import Array, ArrayLike, Bool, Float, Int

__all__ = [
    "LinkMetrics",
    "TokenMetrics",
    "link_metrics",
    "response_nll",
    "safe_ratio",
    "token_metrics",
]


def safe_ratio(numerator: Float[Array, ...], denominator: Float[Array, ...]) -> Array:
    """`numerator / denominator`, NaN where the denominator is zero."""
    denominator = jnp.asarray(denominator, jnp.float32)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, jnp.nan)


class TokenMetrics(NamedTuple):
    """Counts and rates of one rollout (or one grid point of a sweep).

    Attributes:
        tokens: valid generated tokens.
        transmitted: tokens whose draft was uploaded and verified (LLM calls).
        skipped: tokens emitted without uplink (`tokens − transmitted`).
        transmission_rate: `transmitted / tokens`.
        skip_rate: `skipped / tokens`.
        acceptance_rate: accepted drafts over transmitted ones.
        true_skip_rate: mean `1 − β` over skipped tokens.
        risk_per_token: `Σ β · skip / tokens`.
        risk_conditional: `Σ β · skip / skipped`.
        mean_beta: mean `β` over all valid tokens.
    """

    tokens: Array
    transmitted: Array
    skipped: Array
    transmission_rate: Array
    skip_rate: Array
    acceptance_rate: Array
    true_skip_rate: Array
    risk_per_token: Array
    risk_conditional: Array
    mean_beta: Array


def token_metrics(
    beta: Float[Array, ...],
    transmitted: Bool[Array, ...],
    accepted: Bool[Array, ...],
    valid: Bool[Array, ...],
) -> TokenMetrics:
    """Rates of a rollout from its records (reduces over all axes).

    Args:
        beta: rejection probability of each draft.
        transmitted: the draft was verified.
        accepted: the draft was verified and accepted.
        valid: the token is real (not after a stop token or the row's end).

    Returns:
        `TokenMetrics` of float32 scalars.
    """
    valid = jnp.asarray(valid, bool)
    sent = transmitted & valid
    skip = ~transmitted & valid
    beta = jnp.where(valid, jnp.asarray(beta, jnp.float32), 0.0)
    tokens = jnp.sum(valid, dtype=jnp.float32)
    num_sent = jnp.sum(sent, dtype=jnp.float32)
    num_skip = jnp.sum(skip, dtype=jnp.float32)
    skipped_beta = jnp.sum(jnp.where(skip, beta, 0.0))
    return TokenMetrics(
        tokens=tokens,
        transmitted=num_sent,
        skipped=num_skip,
        transmission_rate=safe_ratio(num_sent, tokens),
        skip_rate=safe_ratio(num_skip, tokens),
        acceptance_rate=safe_ratio(jnp.sum(accepted & sent, dtype=jnp.float32), num_sent),
        true_skip_rate=safe_ratio(num_skip - skipped_beta, num_skip),
        risk_per_token=safe_ratio(skipped_beta, tokens),
        risk_conditional=safe_ratio(skipped_beta, num_skip),
        mean_beta=safe_ratio(jnp.sum(beta), tokens),
    )


def response_nll(
    llm_logits: Float[Array, "b t v"],
    tokens: Int[ArrayLike, "b t"],
    response_start: Int[ArrayLike, " b"],
    lengths: Int[ArrayLike, " b"],
) -> Float[Array, " b"]:
    """The LLM's mean per-token negative log-likelihood of each row's response.

    Row `b` holds a prompt in columns `[0, response_start[b])` and the generated response
    in `[response_start[b], lengths[b])`; `llm_logits[b, j]` predicts `tokens[b, j + 1]`
    (e.g. from `uhlm_jax.models.llama.forward` with right padding).

    Returns:
        `[b]` mean NLL in nats per response token; NaN for an empty response.
    """
    log_probs = jax.nn.log_softmax(llm_logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:]
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    columns = jnp.arange(1, tokens.shape[1])[None, :]
    in_response = (columns >= response_start[:, None]) & (columns < lengths[:, None])
    total = -jnp.sum(jnp.where(in_response, token_log_probs, 0.0), axis=-1)
    return safe_ratio(total, jnp.sum(in_response, axis=-1))


class LinkMetrics(NamedTuple):
    """What a rollout costs under a link and cost profile, and what skipping saved.

    Attributes:
        latency_s: total latency of all valid tokens.
        throughput_tokens_per_s: valid tokens over `latency_s`.
        hlm_latency_s: the same tokens costed as HLM (every token transmitted), with the
            same fading draws.
        speedup_vs_hlm: `hlm_latency_s / latency_s`.
        speedup_bound: `1 / (1 − s)` for the skip share `s`: under this latency model no
            skipping rule can beat it.
        llm_calls_saved: tokens not verified by the LLM (HLM verifies every token).
        uplink_bits_saved: uplink payload not sent, in bits.
    """

    latency_s: Array
    throughput_tokens_per_s: Array
    hlm_latency_s: Array
    speedup_vs_hlm: Array
    speedup_bound: Array
    llm_calls_saved: Array
    uplink_bits_saved: Array


def link_metrics(
    mode: Mode,
    transmitted: Bool[ArrayLike, "n b"],
    valid: Bool[ArrayLike, "n b"],
    profile: channel.CostProfile,
    key: Array,
) -> LinkMetrics:
    """Costs the records of a rollout under `profile` (independent of the models run).

    Fading keys are `fold_in(key, row)` per row (then per step inside the channel model),
    so the mode and its HLM reference see the same channel.

    Args:
        mode: the mode that produced the records (static).
        transmitted: `[n, b]` transmitted flags.
        valid: `[n, b]` valid flags.
        profile: models, devices, link and payload to cost the tokens with.
        key: fading key.

    Returns:
        `LinkMetrics` of float32 scalars.
    """
    valid = jnp.asarray(valid, bool)
    sent = jnp.asarray(transmitted, bool) & valid
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(valid.shape[1]))

    def total_s(mode, sent):
        per_row = jax.vmap(channel.latency_from_mask, in_axes=(None, 1, 1, None, 0))(
            mode, sent, valid, profile, row_keys
        )
        return jnp.sum(per_row)

    latency_s = total_s(mode, sent)
    hlm_latency_s = total_s(Mode.HLM, valid)
    tokens = jnp.sum(valid, dtype=jnp.float32)
    skipped = tokens - jnp.sum(sent, dtype=jnp.float32)
    if mode in (Mode.LLM_ONLY, Mode.SLM_ONLY):
        # Neither mode drafts-and-verifies, so "skipped" does not apply.
        skipped = jnp.where(mode is Mode.SLM_ONLY, tokens, 0.0)
    skip_share = safe_ratio(skipped, tokens)
    return LinkMetrics(
        latency_s=latency_s,
        throughput_tokens_per_s=safe_ratio(tokens, latency_s),
        hlm_latency_s=hlm_latency_s,
        speedup_vs_hlm=safe_ratio(hlm_latency_s, latency_s),
        # channel.speedup_bound, extended to s = 1 (SLM-only), where it is infinite.
        speedup_bound=jnp.where(
            skip_share < 1, 1.0 / jnp.maximum(1.0 - skip_share, 1e-30), jnp.inf
        ),
        llm_calls_saved=skipped,
        uplink_bits_saved=skipped * channel.uplink_bits(profile),
    )
