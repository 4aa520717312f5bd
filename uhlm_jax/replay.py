"""Trace replay: every mode's metrics over a grid, from calibration records alone.

A calibration run verifies every token, so it records, per generated token, the SLM's
uncertainty under each measure, the rejection probability `β` of the draft and whether
the LLM accepted it. Replay re-decides, for every grid point, which of those tokens each
mode would have transmitted, and reduces the records to the metrics of `uhlm_jax.metrics`
and the costs of `uhlm_jax.channel`. It assumes per-token independence, as the paper's
analysis does: the recorded trajectory is taken as given, so replay ignores how skipping
a token (emitting a draft the LLM might have rejected) changes the later tokens, their
uncertainties and their `β`. Real rollouts (`uhlm_jax.rollout`) do not.

Transmit weight `w_j ∈ [0, 1]` of token `j` is the expectation of the rollout's
transmit decision (`uhlm_jax.modes.transmit_weight`):

    U-HLM      1{u_j > u_th}        (the rollout skips when u ≤ u_th)
    HLM        1
    Rand-HLM   p                    (the expected share of a Bernoulli(p) decision)
    SLM-only   0
    LLM-only   1                    (every token is the LLM's; drafting metrics are NaN)

and the metrics are those of `uhlm_jax.metrics` on the sums `Σ w`, `Σ w·acc`,
`Σ (1−w) β`, `Σ β` over the `N` tokens (`uhlm_jax.metrics.TokenSums`).

A threshold grid is cheap: sort each measure's `u` once, keep cumulative sums of `1`, `β`
and `acc` in sorted order, and a threshold's sums are one `searchsorted` away, so `P`
thresholds cost `O(P log N)` after an `O(N log N)` sort (`sort_tokens`, `replay_point`).
`replay_point_direct` computes the same sums from per-token masks, in `O(N)` per point: the
brute-force oracle. `replay_grid` maps either over a grid in fixed-size chunks
(`jax.lax.map` with `batch_size`), so memory is bounded whatever the grid size.

Costs: the expected latency per token of each mode under a `CostProfile`
(`uhlm_jax.channel`), with the link's mean SNR and bandwidth and the uplink payload (full
distribution, or CU-HLM top-k) taken from the grid point. Replay prices truncation's
payload only: the records do not hold the draft distributions needed to re-verify against
a truncated one, so a truncated uplink's effect on acceptance is not replayed.

Shapes (see `uhlm_jax.types`): `n` tokens, `m` measures, `p` grid points.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

from typing import NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp

from uhlm_jax import channel as ch
from uhlm_jax import metrics
from uhlm_jax.metrics import TokenSums, token_sums
from uhlm_jax.modes import Mode, Transmission, transmit_weight
from uhlm_jax.types import Array, Bool, Float, Int

__all__ = [
    "FULL_DISTRIBUTION",
    "GridPoints",
    "ReplayMetrics",
    "SortedTokens",
    "TokenRecords",
    "count_at_most",
    "grid_size",
    "jackknife_se",
    "leave_one_out",
    "point_metrics",
    "replay_grid",
    "replay_point",
    "replay_point_direct",
    "sort_tokens",
    "threshold_sums",
]

# `GridPoints.top_k` value meaning "upload the full distribution" (no truncation).
FULL_DISTRIBUTION = 0


class TokenRecords(NamedTuple):
    """Per-token calibration records, as arrays.

    Attributes:
        u: `[m, n]` uncertainty of each token under each measure.
        beta: `[n]` rejection probability of the draft.
        accepted: `[n]` the LLM accepted the draft when it was verified.
    """

    u: Float[Array, "m n"]
    beta: Float[Array, " n"]
    accepted: Bool[Array, " n"]


@flax.struct.dataclass
class SortedTokens:
    """Tokens sorted by each measure, with cumulative sums in that order.

    Attributes:
        u_sorted: `[m, n]` each measure's uncertainties, ascending.
        cum_beta: `[m, n + 1]` `Σ β` over the `k` least uncertain tokens, at index `k`.
        cum_accepted: `[m, n + 1]` accepted drafts among them.
        tokens: `N`.
        beta_total: `Σ β`.
        accepted_total: accepted drafts.
    """

    u_sorted: Float[Array, "m n"]
    cum_beta: Float[Array, "m n1"]
    cum_accepted: Float[Array, "m n1"]
    tokens: Float[Array, ""]
    beta_total: Float[Array, ""]
    accepted_total: Float[Array, ""]


@flax.struct.dataclass
class GridPoints:
    """Traced settings of replay grid points (every leaf `[p]`, or `[]` for one point).

    Attributes:
        threshold: U-HLM skips a token when `u ≤ threshold`.
        measure: index into `TokenRecords.u` of the measure U-HLM gates on.
        transmit_probability: Rand-HLM's transmit probability.
        snr_db: the link's mean SNR in dB.
        bandwidth_hz: the link's bandwidth.
        top_k: CU-HLM uplink truncation `k`, or `FULL_DISTRIBUTION` (0) for none.
        bits_per_prob: bits per uploaded probability.
    """

    threshold: Float[Array, "*p"]
    measure: Int[Array, "*p"]
    transmit_probability: Float[Array, "*p"]
    snr_db: Float[Array, "*p"]
    bandwidth_hz: Float[Array, "*p"]
    top_k: Int[Array, "*p"]
    bits_per_prob: Float[Array, "*p"]

    @classmethod
    def create(
        cls,
        threshold=0.5,
        measure=0,
        transmit_probability=0.5,
        snr_db=10.0,
        bandwidth_hz=20e6,
        top_k=FULL_DISTRIBUTION,
        bits_per_prob=16.0,
    ) -> GridPoints:
        """Grid points from scalars or equal-length 1-D arrays (scalars are broadcast).

        Raises:
            ValueError: naming the value, for arrays of different lengths, a probability
                outside [0, 1], a non-finite threshold, a negative measure index or
                `top_k`, or a non-positive bandwidth or bits per probability.
        """
        floats = {
            "threshold": threshold,
            "transmit_probability": transmit_probability,
            "snr_db": snr_db,
            "bandwidth_hz": bandwidth_hz,
            "bits_per_prob": bits_per_prob,
        }
        ints = {"measure": measure, "top_k": top_k}
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in floats.items()}
        arrays |= {k: jnp.asarray(v, jnp.int32) for k, v in ints.items()}
        shapes = {a.shape for a in arrays.values() if a.ndim}
        if len(shapes) > 1 or any(a.ndim > 1 for a in arrays.values()):
            raise ValueError(
                f"grid point arrays must be scalars or 1-D of one length, got shapes "
                f"{ {k: tuple(a.shape) for k, a in arrays.items()} }."
            )
        shape = shapes.pop() if shapes else ()
        arrays = {k: jnp.broadcast_to(a, shape) for k, a in arrays.items()}
        probability = arrays["transmit_probability"]
        checks = [
            ("threshold", jnp.all(jnp.isfinite(arrays["threshold"])), "finite"),
            ("transmit_probability", jnp.all((probability >= 0) & (probability <= 1)), "in [0, 1]"),
            ("measure", jnp.all(arrays["measure"] >= 0), ">= 0"),
            ("top_k", jnp.all(arrays["top_k"] >= 0), f">= 0 ({FULL_DISTRIBUTION} for none)"),
            ("bandwidth_hz", jnp.all(arrays["bandwidth_hz"] > 0), "> 0"),
            ("bits_per_prob", jnp.all(arrays["bits_per_prob"] > 0), "> 0"),
        ]
        for name, ok, requirement in checks:
            if not bool(ok):
                raise ValueError(f"grid point {name} must be {requirement}, got {arrays[name]}.")
        return cls(**arrays)


def grid_size(points: GridPoints) -> int:
    """Number of grid points `p` (1 for scalar leaves)."""
    shape = points.threshold.shape
    return int(shape[0]) if shape else 1


class ReplayMetrics(NamedTuple):
    """Metrics of grid points (each field `[p]`, or `[]` for one point).

    Attributes:
        transmission_rate: transmitted share of tokens `TR` (1 for LLM-only).
        skip_rate: `1 − TR`.
        acceptance_rate: accepted share of verified drafts (NaN without verified drafts).
        true_skip_rate: mean `1 − β` over skipped tokens (NaN without skips).
        risk_per_token: `R`, expected rejections of skipped drafts per generated token.
        risk_conditional: `R` given a skip.
        mean_beta: mean `β` of all tokens.
        llm_agreement: `1 − R`, the share of emitted tokens the LLM would accept.
        llm_calls_per_token: LLM verification (or generation) steps per token.
        uplink_bits_per_token: uplink payload per generated token, in bits.
        latency_s: expected latency per generated token, in seconds.
        throughput_tokens_per_s: `1 / latency_s`.
        speedup_vs_hlm: HLM's expected latency over this mode's.
        speedup_bound: `uhlm_jax.metrics.speedup_bound` at this point's skip rate.
    """

    transmission_rate: Array
    skip_rate: Array
    acceptance_rate: Array
    true_skip_rate: Array
    risk_per_token: Array
    risk_conditional: Array
    mean_beta: Array
    llm_agreement: Array
    llm_calls_per_token: Array
    uplink_bits_per_token: Array
    latency_s: Array
    throughput_tokens_per_s: Array
    speedup_vs_hlm: Array
    speedup_bound: Array


def sort_tokens(tokens: TokenRecords) -> SortedTokens:
    """Sorts every measure's tokens by `u` and accumulates `β` and acceptances."""
    chex.assert_rank([tokens.u, tokens.beta, tokens.accepted], [2, 1, 1])
    order = jnp.argsort(tokens.u, axis=1, stable=True)
    beta = jnp.asarray(tokens.beta, jnp.float32)[order]
    accepted = jnp.asarray(tokens.accepted, jnp.float32)[order]
    zero = jnp.zeros((tokens.u.shape[0], 1), jnp.float32)
    return SortedTokens(
        u_sorted=jnp.take_along_axis(tokens.u, order, axis=1),
        cum_beta=jnp.concatenate([zero, jnp.cumsum(beta, axis=1)], axis=1),
        cum_accepted=jnp.concatenate([zero, jnp.cumsum(accepted, axis=1)], axis=1),
        tokens=jnp.float32(tokens.beta.shape[0]),
        beta_total=jnp.sum(jnp.asarray(tokens.beta, jnp.float32)),
        accepted_total=jnp.sum(jnp.asarray(tokens.accepted, jnp.float32)),
    )


def count_at_most(
    u_sorted: Float[Array, "m n"], measure: Int[Array, ""], threshold: Float[Array, ""]
) -> Int[Array, ""]:
    """`#{j : u_sorted[measure, j] ≤ threshold}` of an ascending row, by binary search.

    Reads one element per step (`⌈log2(n + 1)⌉` steps) rather than the row: under `vmap`
    over points with different `measure`, indexing the row first would copy `n` values per
    point.
    """
    chex.assert_rank([u_sorted, measure, threshold], [2, 0, 0])
    n = u_sorted.shape[1]
    value = jnp.asarray(threshold, u_sorted.dtype)

    def step(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        mid = (lo + hi) // 2
        below = u_sorted[measure, jnp.minimum(mid, n - 1)] <= value
        active = lo < hi
        return (jnp.where(active & below, mid + 1, lo), jnp.where(active & ~below, mid, hi))

    lo, _ = jax.lax.fori_loop(
        0, max(1, n).bit_length() + 1, step, (jnp.int32(0), jnp.int32(n))
    )
    return lo


def threshold_sums(
    sorted_tokens: SortedTokens, measure: Int[Array, ""], threshold: Float[Array, ""]
) -> TokenSums:
    """U-HLM's `TokenSums` at one threshold, by binary search (`O(log n)`).

    The `k = #{u ≤ u_th}` least uncertain tokens are skipped; the rest are transmitted.
    """
    chex.assert_rank([measure, threshold], 0)
    k = count_at_most(sorted_tokens.u_sorted, measure, threshold)
    skipped_accepted = sorted_tokens.cum_accepted[measure, k]
    return TokenSums(
        tokens=sorted_tokens.tokens,
        transmitted=sorted_tokens.tokens - k.astype(jnp.float32),
        accepted=sorted_tokens.accepted_total - skipped_accepted,
        skipped_beta=sorted_tokens.cum_beta[measure, k],
        beta=sorted_tokens.beta_total,
    )


def _mode_sums(
    mode: Mode, sorted_tokens: SortedTokens, point: GridPoints
) -> TokenSums:
    """A mode's sums at one point from the sorted tokens (weights constant per mode)."""
    if mode.policy.transmission is Transmission.UNCERTAIN:
        return threshold_sums(sorted_tokens, point.measure, point.threshold)
    w = transmit_weight(mode, jnp.float32(0.0), point.threshold, point.transmit_probability)
    return TokenSums(
        tokens=sorted_tokens.tokens,
        transmitted=w * sorted_tokens.tokens,
        accepted=w * sorted_tokens.accepted_total,
        skipped_beta=(1.0 - w) * sorted_tokens.beta_total,
        beta=sorted_tokens.beta_total,
    )


def _profile_at(base: ch.CostProfile, point: GridPoints) -> ch.CostProfile:
    link = ch.Link(
        bandwidth_hz=point.bandwidth_hz,
        mean_snr_db=point.snr_db,
        min_efficiency_bits_per_s_hz=base.link.min_efficiency_bits_per_s_hz,
        retry_delay_s=base.link.retry_delay_s,
        overhead_s=base.link.overhead_s,
        fading=base.link.fading,
    )
    return base.replace(link=link, bits_per_prob=point.bits_per_prob, top_k=None)


def uplink_bits_at(base: ch.CostProfile, point: GridPoints) -> Float[Array, ""]:
    """Uplink payload per transmitted token at one point, in bits."""
    full = ch.full_distribution_bits(base.vocab_size, point.bits_per_prob)
    top_k = ch.top_k_bits(jnp.maximum(point.top_k, 1), base.vocab_size, point.bits_per_prob)
    return jnp.where(point.top_k == FULL_DISTRIBUTION, full, top_k)


# The fields `ReplayMetrics` shares with `metrics.TokenMetrics`.
_TOKEN_RATES = tuple(f for f in ReplayMetrics._fields if f in metrics.TokenMetrics._fields)


def point_metrics(
    mode: Mode, sums: TokenSums, base: ch.CostProfile, point: GridPoints
) -> ReplayMetrics:
    """The token metrics of `mode` (static) from its sums, and its expected costs at one point."""
    chex.assert_rank(point.threshold, 0)
    tm = metrics.metrics_from_sums(mode, sums)
    policy = mode.policy
    tr = tm.transmission_rate
    bits = uplink_bits_at(base, point)
    terms = ch.expected_breakdown(_profile_at(base, point), bits)
    # `mode_latency_s` is the channel model's per-mode formula; it reads the share of
    # transmitted tokens where the mode's policy leaves it open.
    latency_s = ch.mode_latency_s(mode, terms, tr)
    hlm_s = ch.mode_latency_s(Mode.HLM, terms, 1.0)
    # A transmitted token uploads its draft distribution; one that was not drafted does not.
    sent_bits = tr * bits if policy.drafts else jnp.zeros_like(tr)
    # The token rates come from `metrics_from_sums` by name; the rest are this point's costs.
    rates = {name: getattr(tm, name) for name in _TOKEN_RATES}
    return ReplayMetrics(
        **rates,
        llm_calls_per_token=tr,
        uplink_bits_per_token=sent_bits,
        latency_s=latency_s,
        throughput_tokens_per_s=1.0 / latency_s,
        speedup_vs_hlm=hlm_s / latency_s,
        speedup_bound=metrics.speedup_bound(mode, tm.skip_rate),
    )


def replay_point(
    mode: Mode, sorted_tokens: SortedTokens, base: ch.CostProfile, point: GridPoints
) -> ReplayMetrics:
    """Replays one grid point from sorted tokens (`O(log n)`).

    Args:
        mode: the inference mode (static).
        sorted_tokens: from `sort_tokens`.
        base: cost profile; its link's SNR and bandwidth and its payload are replaced by
            the point's.
        point: one grid point (scalar leaves).

    Returns:
        `ReplayMetrics` of scalars.
    """
    return point_metrics(mode, _mode_sums(mode, sorted_tokens, point), base, point)


def replay_point_direct(
    mode: Mode, tokens: TokenRecords, base: ch.CostProfile, point: GridPoints
) -> ReplayMetrics:
    """Replays one grid point from per-token transmit masks (`O(n)`): the oracle."""
    u = tokens.u[point.measure]
    weight = jax.vmap(transmit_weight, in_axes=(None, 0, None, None))(
        mode, u, point.threshold, point.transmit_probability
    )
    sums = token_sums(weight, tokens.beta, tokens.accepted)
    return point_metrics(mode, sums, base, point)


def replay_grid(
    mode: Mode,
    data: SortedTokens | TokenRecords,
    base: ch.CostProfile,
    points: GridPoints,
    chunk_size: int = 4096,
) -> ReplayMetrics:
    """Replays every grid point, `chunk_size` points at a time.

    `jax.lax.map` with `batch_size` evaluates a `vmap` of `chunk_size` points per
    iteration, so memory grows with `chunk_size` (and, for `TokenRecords`, with
    `chunk_size · n`), never with the grid. Pure: jit it at the call site with `mode`
    and `chunk_size` static.

    Args:
        mode: the inference mode (static).
        data: `SortedTokens` (fast path) or `TokenRecords` (direct per-token masks).
        base: cost profile.
        points: grid points, leaves `[p]`.
        chunk_size: grid points per vectorized chunk.

    Returns:
        `ReplayMetrics`, fields `[p]`.
    """
    chex.assert_rank(points.threshold, 1)
    one = replay_point if isinstance(data, SortedTokens) else replay_point_direct
    return jax.lax.map(
        lambda point: one(mode, data, base, point),
        points,
        batch_size=min(chunk_size, grid_size(points)),
    )


def leave_one_out(sums: TokenSums) -> TokenSums:
    """Sums without each unit: from per-prompt sums (leaves `[P]`) to `[P]` leave-one-outs."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0) - x, sums)


def jackknife_se(values: Float[Array, " P"]) -> Float[Array, ""]:
    """Jackknife standard error from leave-one-out estimates `θ_(i)`.

    `SE = sqrt((P − 1)/P · Σ_i (θ_(i) − θ̄)²)` (Efron & Tibshirani, *An Introduction to
    the Bootstrap*, 1993, eq. 11.5). Prompts are the unit: tokens of one prompt are
    dependent, prompts are not. NaN when any `θ_(i)` is NaN or `P < 2`.
    """
    chex.assert_rank(values, 1)
    p = values.shape[0]
    if p < 2:
        return jnp.float32(jnp.nan)
    centred = values - jnp.mean(values)
    return jnp.sqrt((p - 1) / p * jnp.sum(centred**2))
