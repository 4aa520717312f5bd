"""Metrics of a rollout or a replay, from per-token sums.

Every metric is a ratio of a few sums over tokens (`TokenSums`), so there is one way to
get them: `token_sums` reduces per-token records (a rollout's `Records`, or replay's
transmit weights over calibration records), and `metrics_from_sums` turns the sums into
rates. Sums add, so per-prompt sums give the pooled metrics and their leave-one-out
(jackknife) values too. Ratios whose denominator is zero are NaN (e.g. the acceptance
rate of a run that transmitted nothing), never a division error; so is a rate a mode does
not have (see `uhlm_jax.modes`).

Definitions (U-HLM, arXiv 2412.12687, §V), with transmit weight `w ∈ [0, 1]` per token
(the transmitted flag of a rollout, or replay's expected weight) and `N` valid tokens:
  transmission rate  TR = Σ w / N; skip rate s = 1 − TR.
  acceptance rate    Σ w · acc / Σ w (NaN for a mode that drafts nothing).
  true skip rate     among skipped tokens, the share the LLM would have accepted. The
                     acceptance of a skipped draft is counterfactual; its probability is
                     `1 − β`, which the rollout records for every token, so the rate is
                     `Σ (1 − w)(1 − β) / Σ (1 − w)` (an unbiased, lower-variance estimate
                     of the share).
  realised risk      `R = Σ (1 − w) β / N` per generated token (`E[β · 1{skip}]`), and
                     `Σ (1 − w) β / Σ (1 − w)` given a skip (`E[β | skip]`).
  LLM agreement      `1 − R`, the expected share of emitted tokens the LLM would accept
                     (verified tokens are exactly LLM-distributed).
  speedup bound      `1 / (1 − s)` (`speedup_bound`).
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
    "TokenSums",
    "link_metrics",
    "metrics_from_sums",
    "safe_ratio",
    "speedup_bound",
    "token_sums",
]


def safe_ratio(numerator: Float[Array, ...], denominator: Float[Array, ...]) -> Array:
    """`numerator / denominator`, NaN where the denominator is zero."""
    denominator = jnp.asarray(denominator, jnp.float32)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, jnp.nan)


class TokenSums(NamedTuple):
    """Sums over tokens that determine every token metric (float32, any shape).

    Attributes:
        tokens: `N`, valid tokens.
        transmitted: `Σ w`.
        accepted: `Σ w · acc`.
        skipped_beta: `Σ (1 − w) β`.
        beta: `Σ β`.
    """

    tokens: Array
    transmitted: Array
    accepted: Array
    skipped_beta: Array
    beta: Array


def token_sums(
    weight: Float[Array, "n ..."] | Bool[Array, "n ..."],
    beta: Float[Array, "n ..."],
    accepted: Bool[Array, "n ..."],
    valid: Bool[Array, "n ..."] | None = None,
    segment_ids: Int[Array, " n"] | None = None,
    num_segments: int | None = None,
) -> TokenSums:
    """`TokenSums` over the leading (token) axis.

    A rollout's `Records` (`[n, b]`) give one sum per row (prompt); replay's weights over
    calibration records (`[n]`) give one sum, or one per segment (e.g. per prompt).

    Args:
        weight: transmit weight `w` of each token (a rollout's `transmitted` flags).
        beta: rejection probability of each draft.
        accepted: the LLM accepts the draft when it is verified (a rollout's `accepted`,
            which already implies `transmitted`, gives the same sums).
        valid: the token is real (None: every token); invalid tokens count nowhere, whatever
            their values (NaN included).
        segment_ids: `[n]` segment of each token, in `[0, num_segments)`; None sums all.
        num_segments: number of segments (static), with `segment_ids`.

    Returns:
        `TokenSums` with the leading axis summed away, or replaced by `num_segments`.
    """
    weight = jnp.asarray(weight, jnp.float32)
    valid = jnp.ones(weight.shape, bool) if valid is None else jnp.asarray(valid, bool)
    zero = jnp.float32(0.0)
    beta = jnp.where(valid, jnp.asarray(beta, jnp.float32), zero)
    weight = jnp.where(valid, weight, zero)
    skipped = jnp.where(valid, 1.0 - weight, zero)
    terms = TokenSums(
        tokens=valid.astype(jnp.float32),
        transmitted=weight,
        accepted=jnp.where(jnp.asarray(accepted, bool), weight, zero),
        skipped_beta=skipped * beta,
        beta=beta,
    )
    if segment_ids is None:
        return TokenSums(*(jnp.sum(x, axis=0) for x in terms))
    return TokenSums(
        *(jax.ops.segment_sum(x, segment_ids, num_segments=num_segments) for x in terms)
    )


class TokenMetrics(NamedTuple):
    """Counts and rates of one rollout or grid point (see the module doc).

    Attributes:
        tokens: valid generated tokens `N`.
        transmitted: tokens sent to the base station, `Σ w`.
        skipped: tokens emitted without uplink, `N − Σ w`.
        transmission_rate: `TR`.
        skip_rate: `s = 1 − TR`.
        acceptance_rate: accepted drafts over transmitted ones (NaN without drafts).
        true_skip_rate: mean `1 − β` over skipped tokens (NaN without skips).
        risk_per_token: `R`.
        risk_conditional: `R` given a skip.
        mean_beta: mean `β` over all valid tokens.
        llm_agreement: `1 − R`.
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
    llm_agreement: Array


def metrics_from_sums(mode: Mode, sums: TokenSums) -> TokenMetrics:
    """The token metrics of `mode` (static) from its `TokenSums` (any leaf shape)."""
    skipped = sums.tokens - sums.transmitted
    risk = safe_ratio(sums.skipped_beta, sums.tokens)
    acceptance = safe_ratio(sums.accepted, sums.transmitted)
    tr = safe_ratio(sums.transmitted, sums.tokens)
    return TokenMetrics(
        tokens=sums.tokens,
        transmitted=sums.transmitted,
        skipped=skipped,
        transmission_rate=tr,
        skip_rate=1.0 - tr,
        acceptance_rate=acceptance if mode.policy.drafts else jnp.full_like(acceptance, jnp.nan),
        true_skip_rate=safe_ratio(skipped - sums.skipped_beta, skipped),
        risk_per_token=risk,
        risk_conditional=safe_ratio(sums.skipped_beta, skipped),
        mean_beta=safe_ratio(sums.beta, sums.tokens),
        llm_agreement=1.0 - risk,
    )


def speedup_bound(mode: Mode, skip_rate: Float[Array, ...]) -> Float[Array, ...]:
    """The bound `1 / (1 − s)` on the speedup over HLM from skipping (`channel.speedup_bound`).

    Extended to `s = 1` (SLM-only), where it is infinite; NaN for a mode that drafts
    nothing (LLM-only), whose speedup does not come from skipping drafts.
    """
    skip_rate = jnp.asarray(skip_rate, jnp.float32)
    if not mode.policy.drafts:
        return jnp.full_like(skip_rate, jnp.nan)
    below = skip_rate < 1
    return jnp.where(below, channel.speedup_bound(jnp.where(below, skip_rate, 0.0)), jnp.inf)


class LinkMetrics(NamedTuple):
    """What a rollout costs under a link and cost profile, and what skipping saved.

    Attributes:
        latency_s: total latency of all valid tokens.
        throughput_tokens_per_s: valid tokens over `latency_s`.
        hlm_latency_s: the same tokens costed as HLM (every token transmitted), with the
            same fading draws.
        speedup_vs_hlm: `hlm_latency_s / latency_s`.
        speedup_bound: `speedup_bound` at the skip rate `s`: under this latency model no
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
        per_token = jax.vmap(channel.token_latencies_s, in_axes=(None, 1, 1, None, 0))(
            mode, sent, valid, profile, row_keys
        )
        return jnp.sum(per_token)

    latency_s = total_s(mode, sent)
    hlm_latency_s = total_s(Mode.HLM, valid)
    tokens = jnp.sum(valid, dtype=jnp.float32)
    skipped = tokens - jnp.sum(sent, dtype=jnp.float32)
    return LinkMetrics(
        latency_s=latency_s,
        throughput_tokens_per_s=safe_ratio(tokens, latency_s),
        hlm_latency_s=hlm_latency_s,
        speedup_vs_hlm=safe_ratio(hlm_latency_s, latency_s),
        speedup_bound=speedup_bound(mode, safe_ratio(skipped, tokens)),
        llm_calls_saved=skipped,
        uplink_bits_saved=skipped * channel.uplink_bits(profile),
    )
