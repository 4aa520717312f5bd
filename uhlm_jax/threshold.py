"""Skip thresholds for U-HLM and the rejection risk of skipping.

A U-HLM device skips the uplink and the LLM for a drafted token when its
uncertainty `u` is at or below a threshold `u_th`; the skipped token would have
been rejected with probability `β`. This module holds the maths that turns the
rejection model (`uhlm_jax.rejection`) into thresholds and risks:

* analytic thresholds of the paper's linear model `β ≈ a·u + b`
  (`risk_averse`, `risk_prone`, with `rejection_share` for `Δ`);
* the expected rejection risk of skipping, empirical and under the linear model,
  per generated token and conditional on skipping (`Risk`);
* risk curves over an ordered grid of thresholds, per token and per prompt;
* Learn-then-Test: Hoeffding–Bentkus p-values and fixed-sequence testing, for a
  distribution-free threshold with `P(R ≤ ε) ≥ 1 − δ`;
* the posterior risk-bounded threshold, the largest `u_th` with
  `P(R(u_th) ≤ ε | data) ≥ 1 − δ` over posterior draws of `(a, b)`.

Every function is pure `jnp`, written for one example (scalars `slope`,
`intercept`, `delta`, `u_th`; one sample of tokens) and batched by the caller
with `jax.vmap`. Nothing here is jitted; jit at the entry point. Inputs are not
validated inside traced code: jobs validate their configs, and
`check_linear_model` is the Python-level check for a fitted rejection model.

Shapes (see `uhlm_jax.types`): `n` tokens, `p` grid points (thresholds),
`m` posterior draws; `P` below is the number of prompts.

References:
  [U-HLM] S. Oh, J. Kim, J. Park, S.-W. Ko, T. Q. S. Quek, S.-L. Kim,
    "Uncertainty-Aware Hybrid Inference with On-Device Small and Remote Large
    Language Models", IEEE ICMLCN 2025, arXiv 2412.12687.
  [LTT] A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan, L. Lei,
    "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
    Control", arXiv 2110.01052 (2021).
  [RCPS] S. Bates, A. N. Angelopoulos, L. Lei, J. Malik, M. I. Jordan,
    "Distribution-Free, Risk-Controlling Prediction Sets", J. ACM 68(6), 2021
    (arXiv 2101.02703), for the Hoeffding–Bentkus bound.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import betainc, xlogy

from uhlm_jax.types import Array, ArrayLike, Float, Int
from uhlm_jax.uncertainty import exact_fractions

__all__ = [
    "BETA_POSITIVE_TOL",
    "NO_SKIP",
    "LTTResult",
    "PaperRule",
    "PaperThreshold",
    "Risk",
    "WeightedSample",
    "check_linear_model",
    "empirical_risk",
    "fixed_sequence_index",
    "grid_threshold",
    "hoeffding_bentkus_pvalue",
    "hurdle_mean",
    "linear_mean",
    "linear_model_risk",
    "linear_risk_curve",
    "ltt_prompts_needed",
    "ltt_threshold",
    "paper_threshold",
    "prompt_risk_curves",
    "rejection_share",
    "risk_averse",
    "risk_bounded_index",
    "risk_bounded_threshold",
    "risk_curve",
    "risk_prone",
    "skip_rate",
    "threshold_grid",
    "weighted_sample",
]

# β is computed as 1 − exp(min(0, log p_d − log q_d)) in float32, which is exactly
# 0 when p_d ≥ q_d; anything at or below this counts as "no rejection".
BETA_POSITIVE_TOL = 1e-6

# Calibration sizes tested together by `ltt_prompts_needed` (bounds memory to this many
# p-value vectors).
PLAN_BATCH = 1024

# The threshold that skips nothing: `u ≤ NO_SKIP` is false for every finite u.
# Returned when no grid threshold is certified.
NO_SKIP = -math.inf


class Risk(NamedTuple):
    """Rejection risk of skipping every token with `u ≤ u_th`.

    Attributes:
      per_token: `E[β · 1{u ≤ u_th}]`, the expected rejection probability of a
        skipped token per generated token (skipped or not).
      given_skip: `E[β | u ≤ u_th]`, the same conditional on skipping; 0 when
        nothing is skipped.
      skip_rate: `P(u ≤ u_th)`, the share of tokens skipped.
    """

    per_token: Float[Array, ""]
    given_skip: Float[Array, ""]
    skip_rate: Float[Array, ""]


class LTTResult(NamedTuple):
    """Outcome of Learn-then-Test over an ordered threshold grid.

    Attributes:
      threshold: the certified threshold, or `NO_SKIP` when none is.
      index: its grid index, −1 when none is certified.
      pvalues: `(p,)` Hoeffding–Bentkus p-values of `H0: R(grid[k]) > ε`.
      risk_hat: `(p,)` mean per-prompt risk at each grid threshold.
      num_prompts: the number of prompts the test used.
    """

    threshold: Float[Array, ""]
    index: Int[Array, ""]
    pvalues: Float[Array, " p"]
    risk_hat: Float[Array, " p"]
    num_prompts: Float[Array, ""]


def check_linear_model(slope: float, intercept: float) -> None:
    """Checks that a fitted linear rejection model `β ≈ a·u + b` can give a threshold.

    The analytic thresholds assume rejection grows with uncertainty, `a > 0`.

    Args:
      slope: `a`, rejection probability per unit uncertainty.
      intercept: `b`, rejection probability at `u = 0`.

    Raises:
      ValueError: if `a ≤ 0` or either value is not finite, naming the value.
    """
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(
            f"slope {slope} and intercept {intercept} must be finite numbers; "
            "pass the fitted values of β ≈ a·u + b"
        )
    if slope <= 0:
        raise ValueError(
            f"slope {slope} must be > 0: the thresholds assume rejection grows with "
            "uncertainty (β ≈ a·u + b with a > 0); check the fit or the uncertainty measure"
        )


def _largest_below(slope: Array, intercept: Array, level: Array) -> Array:
    """`sup{t ∈ [0, 1] : a·u + b ≤ level for all u ∈ [0, t]}`."""
    positive = slope > 0
    safe_slope = jnp.where(positive, slope, 1.0)
    crossing = jnp.clip((level - intercept) / safe_slope, 0.0, 1.0)
    # With a ≤ 0 the line never rises: every u ∈ [0, 1] qualifies iff u = 0 does.
    flat = jnp.where(intercept <= level, 1.0, 0.0)
    return jnp.where(positive, crossing, flat)


def risk_averse(slope: Float[Array, ""], intercept: Float[Array, ""]) -> Float[Array, ""]:
    """Risk-averse threshold: skip only where the predicted rejection is zero.

    `u_th = −b / a`, clipped to `[0, 1]` ([U-HLM] §III). For `a = 0.82`,
    `b = −0.06` this is `0.0732`. It is the supremum of `t ∈ [0, 1]` with
    `a·u + b ≤ 0` on `[0, t]`, so draws with `a ≤ 0` give 1 if `b ≤ 0` else 0
    instead of dividing by zero.

    Args:
      slope: `a`, scalar.
      intercept: `b`, scalar.

    Returns:
      The threshold, a scalar in `[0, 1]`.
    """
    chex.assert_rank([slope, intercept], 0)
    return _largest_below(slope, intercept, jnp.zeros_like(intercept))


def risk_prone(
    slope: Float[Array, ""], intercept: Float[Array, ""], delta: Float[Array, ""]
) -> Float[Array, ""]:
    """Risk-prone threshold: skip where predicted rejection is at most `Δ`.

    `u_th = (Δ − b) / a`, clipped to `[0, 1]` ([U-HLM] §III), where
    `Δ = P(β > 0)` is the share of tokens the LLM might reject
    (`rejection_share`). For `a = 0.82`, `b = −0.06`, `Δ = 0.29` this is
    `0.4268`. Draws with `a ≤ 0` give 1 if `b ≤ Δ` else 0.

    Args:
      slope: `a`, scalar.
      intercept: `b`, scalar.
      delta: `Δ`, scalar in `[0, 1]`.

    Returns:
      The threshold, a scalar in `[0, 1]`.
    """
    chex.assert_rank([slope, intercept, delta], 0)
    return _largest_below(slope, intercept, delta)


class PaperRule(enum.Enum):
    """The paper's two threshold rules, `u_th = (level − b)/a` clipped to `[0, 1]`."""

    RISK_AVERSE = "risk_averse"  # level 0: skip where no rejection is predicted
    RISK_PRONE = "risk_prone"  # level Δ: skip where predicted rejection is at most Δ

    @property
    def label(self) -> str:
        return self.value.replace("_", "-")

    @property
    def formula(self) -> str:
        return "−b/a" if self is PaperRule.RISK_AVERSE else "(Δ − b)/a"


class PaperThreshold(NamedTuple):
    """One of the paper's thresholds before and after clipping to `[0, 1]`.

    Attributes:
      raw: `(level − b)/a` in float64; NaN when `a ≤ 0`.
      threshold: the threshold used, `raw` clipped to `[0, 1]` (as `risk_averse` and
        `risk_prone` compute it, in float32); NaN when `a ≤ 0`.
      reason: why the formula's value is not used as is, e.g. "(Δ − b)/a = 1.04 > 1:
        risk-prone skips everything (SLM-only)"; None when `raw` lies in `[0, 1]`.
    """

    raw: float
    threshold: float
    reason: str | None


def paper_threshold(
    rule: PaperRule, slope: float, intercept: float, delta: float | None = None
) -> PaperThreshold:
    """A paper threshold of a fitted line `β ≈ a·u + b`, with what clipping did to it.

    Python-level, for reporting one fitted line; `risk_averse` and `risk_prone` are the
    traceable forms for posterior draws. A threshold of 0 still skips tokens with
    `u = 0`; one of 1 skips every token.

    Args:
      rule: which threshold.
      slope: `a`.
      intercept: `b`.
      delta: `Δ = P(β > 0)`, needed by `PaperRule.RISK_PRONE`.

    Returns:
      The `PaperThreshold`.

    Raises:
      ValueError: if the risk-prone rule is given no `delta`.
    """
    if rule is PaperRule.RISK_PRONE and delta is None:
        raise ValueError("the risk-prone threshold (Δ − b)/a needs delta = P(beta > 0)")
    if not slope > 0:
        reason = (
            f"slope a = {slope:.4g} ≤ 0: rejection does not grow with u, so {rule.formula} "
            "does not apply"
        )
        return PaperThreshold(raw=math.nan, threshold=math.nan, reason=reason)
    level = 0.0 if rule is PaperRule.RISK_AVERSE else float(delta)
    raw = (level - float(intercept)) / float(slope)
    a, b = jnp.float32(slope), jnp.float32(intercept)
    clipped = float(
        risk_averse(a, b) if rule is PaperRule.RISK_AVERSE else risk_prone(a, b, jnp.float32(level))
    )
    reason = None
    if raw > 1:
        reason = f"{rule.formula} = {raw:.4g} > 1: {rule.label} skips everything (SLM-only)"
    elif raw < 0:
        reason = f"{rule.formula} = {raw:.4g} < 0: {rule.label} skips only tokens with u = 0"
    return PaperThreshold(raw=raw, threshold=clipped, reason=reason)


def rejection_share(beta: Float[Array, " n"]) -> Float[Array, ""]:
    """`Δ = P(β > 0)`: the share of drafts with `p_d < q_d`.

    A token counts as possibly rejected when `β > BETA_POSITIVE_TOL`.

    Args:
      beta: `(n,)` rejection probabilities of the drafts.

    Returns:
      `Δ`, a scalar in `[0, 1]`.
    """
    chex.assert_rank(beta, 1)
    return jnp.mean((beta > BETA_POSITIVE_TOL).astype(jnp.float32))


def skip_rate(u: Float[Array, " n"], u_th: Float[Array, ""]) -> Float[Array, ""]:
    """`P(u ≤ u_th)`: the share of tokens a threshold skips.

    Args:
      u: `(n,)` uncertainties.
      u_th: scalar threshold.

    Returns:
      The skip rate, a scalar in `[0, 1]`.
    """
    chex.assert_rank([u, u_th], [1, 0])
    return jnp.mean((u <= u_th).astype(jnp.float32))


def _risk(mean_beta: Array, skipped: Array) -> Risk:
    skipped = skipped.astype(mean_beta.dtype)
    per_token = jnp.mean(mean_beta * skipped)
    share = jnp.mean(skipped)
    given_skip = jnp.where(share > 0, per_token / jnp.where(share > 0, share, 1.0), 0.0)
    return Risk(per_token=per_token, given_skip=given_skip, skip_rate=share)


def empirical_risk(u: Float[Array, " n"], beta: Float[Array, " n"], u_th: Float[Array, ""]) -> Risk:
    """Realised rejection risk of skipping `u ≤ u_th` on observed tokens.

    `R = (1/n) Σ_j β_j · 1{u_j ≤ u_th}` per token, and `R / skip_rate`
    conditional on skipping (0 when nothing is skipped).

    Args:
      u: `(n,)` uncertainties.
      beta: `(n,)` rejection probabilities of the same tokens.
      u_th: scalar threshold.

    Returns:
      The `Risk` at `u_th`.
    """
    chex.assert_rank([u, beta, u_th], [1, 1, 0])
    return _risk(beta, u <= u_th)


def linear_mean(
    slope: Float[Array, ""], intercept: Float[Array, ""], u: Float[Array, "*n"]
) -> Float[Array, "*n"]:
    """Predicted rejection of the linear model, `clip(a·u + b, 0, 1)`.

    The paper's rejection model is `max(0, a·u + b)` ([U-HLM] §III); the upper clip only
    matters when `a·u + b > 1`, since `β` is a probability.
    """
    chex.assert_rank([slope, intercept], 0)
    return jnp.clip(slope * u + intercept, 0.0, 1.0)


def hurdle_mean(
    positive_slope: Float[Array, ""],
    positive_intercept: Float[Array, ""],
    mean_slope: Float[Array, ""],
    mean_intercept: Float[Array, ""],
    u: Float[Array, "*n"],
) -> Float[Array, "*n"]:
    """`E[β | u]` of the hurdle model: `σ(c·u + e) · σ(f·u + g)`.

    The hurdle model has `P(β > 0 | u) = σ(c·u + e)` and, given `β > 0`, a
    Beta law with mean `σ(f·u + g)` (σ is the logistic function).
    """
    chex.assert_rank([positive_slope, positive_intercept, mean_slope, mean_intercept], 0)
    return jax.nn.sigmoid(positive_slope * u + positive_intercept) * jax.nn.sigmoid(
        mean_slope * u + mean_intercept
    )


def linear_model_risk(
    slope: Float[Array, ""],
    intercept: Float[Array, ""],
    u_samples: Float[Array, " n"],
    u_th: Float[Array, ""],
) -> Risk:
    """Risk of skipping under the linear model, over an empirical law of `u`.

    `R(u_th) = (1/n) Σ_j max(0, a·u_j + b) · 1{u_j ≤ u_th}`, the Monte Carlo
    form of `∫_0^{u_th} max(0, a·u + b) f(u) du` ([U-HLM] §III) with `f` the
    empirical law of `u_samples` (see `linear_mean` for the clip at 1).

    Args:
      slope: `a`, scalar.
      intercept: `b`, scalar.
      u_samples: `(n,)` uncertainties drawn from the law of `u`.
      u_th: scalar threshold.

    Returns:
      The `Risk` at `u_th`.
    """
    chex.assert_rank([u_samples, u_th], [1, 0])
    return _risk(linear_mean(slope, intercept, u_samples), u_samples <= u_th)


def threshold_grid(size: int) -> Float[Array, " p"]:
    """`size` thresholds `k / (size − 1)`, `k = 0 … size − 1`, each correctly rounded.

    The table of `uncertainty.exact_fractions`, so a grid point equals the float32
    value of the same fraction stored elsewhere (a perturbation uncertainty
    `u = j/K` is stored from that table too) and `u ≤ u_th` includes it;
    `linspace` and XLA's float32 division can land one ulp off.
    """
    return exact_fractions(size - 1)


def _grid_bins(u: Array, grid: Array) -> Array:
    """Smallest `k` with `u ≤ grid[k]` (`p` when `u > grid[-1]` or is NaN)."""
    return jnp.searchsorted(grid, u, side="left")


def risk_curve(
    mean_beta: Float[Array, " n"],
    u: Float[Array, " n"],
    grid: Float[Array, " p"],
    weight: Float[Array, " n"] | None = None,
) -> Float[Array, " p"]:
    """Per-token risk of skipping at every threshold of an increasing grid.

    `R(grid[k]) = Σ_j w_j m_j 1{u_j ≤ grid[k]} / Σ_j w_j`, in `O(n + p)`: one
    `segment_sum` into grid cells and a cumulative sum. With `m = β` it is the
    empirical risk (`empirical_risk` at each grid point), with
    `m = linear_mean(a, b, u)` the linear-model risk. Weights select or
    reweight tokens (a split's mask, a bootstrap's counts).

    Args:
      mean_beta: `(n,)` rejection probability, observed or predicted, per token.
      u: `(n,)` uncertainties.
      grid: `(p,)` increasing thresholds.
      weight: `(n,)` non-negative token weights; all ones if omitted.

    Returns:
      `(p,)` risk per generated token at each threshold, non-decreasing when
      `mean_beta ≥ 0`; 0 if every weight is 0.
    """
    chex.assert_rank([mean_beta, u, grid], 1)
    if weight is None:
        weight = jnp.ones_like(mean_beta)
    num_grid = grid.shape[0]
    per_cell = jax.ops.segment_sum(
        weight * mean_beta, _grid_bins(u, grid), num_segments=num_grid + 1
    )[:num_grid]
    total = jnp.sum(weight)
    return jnp.cumsum(per_cell) / jnp.where(total > 0, total, 1.0)


def prompt_risk_curves(
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    prompt_index: Int[Array, " n"],
    num_prompts: int,
    grid: Float[Array, " p"],
) -> Float[Array, "P p"]:
    """Each prompt's realised risk at every threshold of an increasing grid.

    `r_i(grid[k]) = (1/T_i) Σ_{t ∈ prompt i} β_t · 1{u_t ≤ grid[k]}`, the mean
    over the prompt's `T_i` generated tokens. Prompts are the exchangeable unit
    of Learn-then-Test ([LTT] §2): tokens of one prompt are dependent, prompts
    drawn independently from a prompt distribution are not. Each `r_i` lies in
    `[0, 1]` because `β` does.

    Args:
      u: `(n,)` uncertainties.
      beta: `(n,)` rejection probabilities.
      prompt_index: `(n,)` prompt of each token, in `[0, num_prompts)`.
      num_prompts: `P`, static.
      grid: `(p,)` increasing thresholds.

    Returns:
      `(P, p)` per-prompt risks; a prompt without tokens has risk 0.
    """
    chex.assert_rank([u, beta, prompt_index, grid], 1)
    num_grid = grid.shape[0]
    cell = prompt_index * (num_grid + 1) + _grid_bins(u, grid)
    per_cell = jax.ops.segment_sum(beta, cell, num_segments=num_prompts * (num_grid + 1))
    per_cell = per_cell.reshape(num_prompts, num_grid + 1)[:, :num_grid]
    tokens = jax.ops.segment_sum(jnp.ones_like(beta), prompt_index, num_segments=num_prompts)
    safe_tokens = jnp.where(tokens > 0, tokens, 1.0)
    return jnp.cumsum(per_cell, axis=1) / safe_tokens[:, None]


def hoeffding_bentkus_pvalue(
    risk_hat: Float[Array, ""], n: Float[Array, ""], eps: Float[Array, ""]
) -> Float[Array, ""]:
    """Hoeffding–Bentkus p-value for `H0: R > ε` from a mean of `n` losses.

    For `n` i.i.d. losses in `[0, 1]` with mean `R` and sample mean `R̂`
    ([RCPS] Prop. 5, [LTT] §3):

        p = min( exp(−n · h(min(R̂, ε), ε)),  e · P(Binomial(n, ε) ≤ ⌈n R̂⌉) ),
        h(r, ε) = r log(r/ε) + (1 − r) log((1 − r)/(1 − ε)).

    The first term is Hoeffding's bound in its KL form, the second Bentkus's
    bound; under `H0`, `P(p ≤ δ) ≤ δ`. The binomial CDF is the regularised
    incomplete beta `I_{1−ε}(n − k, k + 1)`, and equals 1 for `k ≥ n`.

    Args:
      risk_hat: `R̂`, scalar in `[0, 1]`.
      n: number of losses (prompts), scalar `≥ 1`, float.
      eps: `ε`, the risk level, scalar in `(0, 1)`.

    Returns:
      The p-value, a scalar in `(0, 1]`.
    """
    chex.assert_rank([risk_hat, n, eps], 0)
    r = jnp.minimum(risk_hat, eps)
    kl = xlogy(r, r) - r * jnp.log(eps) + xlogy(1.0 - r, 1.0 - r) - (1.0 - r) * jnp.log1p(-eps)
    hoeffding = jnp.exp(-n * kl)
    k = jnp.ceil(n * risk_hat)
    below_n = k < n
    tail = betainc(jnp.where(below_n, n - k, 1.0), k + 1.0, 1.0 - eps)
    bentkus = math.e * jnp.where(below_n, tail, 1.0)
    return jnp.minimum(jnp.minimum(hoeffding, bentkus), 1.0)


def fixed_sequence_index(
    pvalues: Float[Array, " p"], delta: Float[ArrayLike, ""]
) -> Int[Array, ""]:
    """Last hypothesis rejected by fixed-sequence testing at level `δ`.

    Tests `H0_0, H0_1, …` in order and stops at the first `p_k > δ`; this
    controls the family-wise error rate at `δ` with no multiplicity correction
    ([LTT] §4). Order the grid so that early hypotheses are the likeliest to be
    rejected: for skip thresholds, increasing `u_th` (risk non-decreasing).

    Args:
      pvalues: `(p,)` p-values in testing order.
      delta: `δ`, scalar.

    Returns:
      The index of the last rejected hypothesis, −1 if the first is kept.
    """
    chex.assert_rank([pvalues, delta], [1, 0])
    kept = pvalues > delta
    first_kept = jnp.where(jnp.any(kept), jnp.argmax(kept), pvalues.shape[0])
    return (first_kept - 1).astype(jnp.int32)


def grid_threshold(grid: Float[Array, " p"], index: Int[Array, ""]) -> Float[Array, ""]:
    """`grid[index]`, or `NO_SKIP` when `index` is −1."""
    chex.assert_rank([grid, index], [1, 0])
    return jnp.where(index >= 0, grid[jnp.maximum(index, 0)], NO_SKIP)


def ltt_threshold(
    prompt_risks: Float[Array, "P p"],
    grid: Float[Array, " p"],
    eps: Float[Array, ""],
    delta: Float[Array, ""],
    prompt_weight: Float[Array, " P"] | None = None,
) -> LTTResult:
    """Learn-then-Test threshold with `P(R(û_th) ≤ ε) ≥ 1 − δ`.

    The estimand is the per-prompt risk of a new prompt drawn from the same
    prompt distribution as the calibration prompts:

        R(u_th) = E_prompt[ (1/T) Σ_{t=1}^{T} β_t · 1{u_t ≤ u_th} ],

    the expected share-weighted rejection probability of skipped tokens,
    averaged over a prompt's `T` generated tokens, then over prompts. It equals
    the pooled per-token risk when every prompt generates the same number of
    tokens. For each grid point the test rejects `H0_k: R(grid[k]) > ε` with a
    Hoeffding–Bentkus p-value over the calibration prompts' risks, and
    fixed-sequence testing along the increasing grid returns the largest
    threshold whose null (and every earlier one) is rejected ([LTT] Thm. 1).
    The guarantee is over the draw of the calibration prompts and needs them
    exchangeable with the prompts the threshold is used on.

    Args:
      prompt_risks: `(P, p)` per-prompt risks (`prompt_risk_curves`).
      grid: `(p,)` increasing thresholds.
      eps: `ε`, the risk level, scalar in `(0, 1)`.
      delta: `δ`, the error level, scalar in `(0, 1)`.
      prompt_weight: `(P,)` 0/1 mask of calibration prompts; all if omitted.

    Returns:
      The `LTTResult`; its threshold is `NO_SKIP` when nothing is certified.
    """
    chex.assert_rank([prompt_risks, grid, eps, delta], [2, 1, 0, 0])
    if prompt_weight is None:
        prompt_weight = jnp.ones(prompt_risks.shape[:1], prompt_risks.dtype)
    n = jnp.sum(prompt_weight)
    safe_n = jnp.maximum(n, 1.0)
    risk_hat = prompt_weight @ prompt_risks / safe_n
    pvalues = jax.vmap(hoeffding_bentkus_pvalue, in_axes=(0, None, None))(risk_hat, safe_n, eps)
    pvalues = jnp.where(n > 0, pvalues, 1.0)
    index = fixed_sequence_index(pvalues, delta)
    return LTTResult(
        threshold=grid_threshold(grid, index),
        index=index,
        pvalues=pvalues,
        risk_hat=risk_hat,
        num_prompts=n,
    )


def ltt_prompts_needed(
    risk_hat: Float[Array, " p"],
    eps: Float[Array, ""],
    delta: Float[Array, ""],
    max_prompts: int,
) -> Int[Array, " p"]:
    """Fewest prompts at which an observed risk curve would certify each grid threshold.

    `N_k = min{n ≤ max_prompts : fixed-sequence testing of the Hoeffding–Bentkus
    p-values `p_j(n) = hoeffding_bentkus_pvalue(risk_hat[j], n, ε)` rejects `H0_0 … H0_k`
    at level `δ`}`: the calibration size at which `ltt_threshold` would certify
    `grid[k]` if the mean per-prompt risk came out as `risk_hat` again. It is a
    sample-size line for planning, not a power guarantee: a new sample's mean risk
    scatters around the pilot's, and near `N_k` it certifies roughly half the time.
    The Bentkus term makes `p_j(n)` non-monotone in `n`, so every `n` is tested; for
    a grid that starts at a threshold skipping nothing risky (`risk_hat[0] = 0`),
    `N_0 = ⌈log δ / log(1 − ε)⌉`, the `n` with `(1 − ε)^n ≤ δ`.

    Args:
      risk_hat: `(p,)` observed mean per-prompt risk along an increasing grid
        (`LTTResult.risk_hat`).
      eps: `ε`, scalar.
      delta: `δ`, scalar.
      max_prompts: static, the largest calibration size considered.

    Returns:
      `(p,)` int32 `N_k`, or −1 where even `max_prompts` prompts would not certify.
    """
    chex.assert_rank([risk_hat, eps, delta], [1, 0, 0])
    num_grid = risk_hat.shape[0]
    sizes = jnp.arange(1, max_prompts + 1, dtype=jnp.float32)

    def certified_index(n: Array) -> Array:
        pvalues = jax.vmap(hoeffding_bentkus_pvalue, in_axes=(0, None, None))(risk_hat, n, eps)
        return fixed_sequence_index(pvalues, delta)

    index = jax.lax.map(certified_index, sizes, batch_size=PLAN_BATCH)  # (max_prompts,)
    reached = index[:, None] >= jnp.arange(num_grid)[None, :]  # (max_prompts, p)
    first = jnp.argmax(reached, axis=0)
    return jnp.where(jnp.any(reached, axis=0), first + 1, -1).astype(jnp.int32)


def risk_bounded_index(
    risk_curves: Float[Array, "m p"], eps: Float[ArrayLike, ""], delta: Float[ArrayLike, ""]
) -> Int[Array, ""]:
    """Largest grid index with `P(R(grid[k]) ≤ ε | data) ≥ 1 − δ`.

    The posterior probability is the share of draws whose risk curve is at
    most `ε`. Risk curves are non-decreasing in `u_th`, so that share is
    non-increasing and the qualifying indices form a prefix; the index
    returned is the end of that prefix.

    Args:
      risk_curves: `(m, p)` risk at each grid threshold, one row per draw.
      eps: `ε`, the risk level, scalar.
      delta: `δ`, scalar; the posterior probability must be at least `1 − δ`.

    Returns:
      The grid index, −1 if even the first threshold fails.
    """
    chex.assert_rank([risk_curves, eps, delta], [2, 0, 0])
    within = jnp.mean((risk_curves <= eps).astype(jnp.float32), axis=0)
    return fixed_sequence_index(1.0 - within, delta)


class WeightedSample(NamedTuple):
    """An empirical law of `u` in cumulative form, for exact linear-model risk curves.

    Attributes:
      u: `(n,)` uncertainties, sorted increasingly.
      weight: `(n + 1,)` `W[j] = Σ_{i<j} w_i` over the sorted sample.
      weighted_u: `(n + 1,)` `U[j] = Σ_{i<j} w_i u_i`.
      total: `Σ_i w_i`.
    """

    u: Float[Array, " n"]
    weight: Float[Array, " n1"]
    weighted_u: Float[Array, " n1"]
    total: Float[Array, ""]


def weighted_sample(
    u: Float[Array, " n"], weight: Float[Array, " n"] | None = None
) -> WeightedSample:
    """Sorts a sample of `u` and accumulates its weights (all ones if omitted)."""
    chex.assert_rank(u, 1)
    if weight is None:
        weight = jnp.ones_like(u)
    order = jnp.argsort(u)
    sorted_u, sorted_w = u[order], weight[order]
    zero = jnp.zeros((1,), u.dtype)
    return WeightedSample(
        u=sorted_u,
        weight=jnp.concatenate([zero, jnp.cumsum(sorted_w)]),
        weighted_u=jnp.concatenate([zero, jnp.cumsum(sorted_w * sorted_u)]),
        total=jnp.sum(weight),
    )


def linear_risk_curve(
    slope: Float[Array, ""],
    intercept: Float[Array, ""],
    sample: WeightedSample,
    grid: Float[Array, " p"],
) -> Float[Array, " p"]:
    """Exact linear-model risk at every grid threshold, in `O(p log n)`.

    `R(t) = Σ_j w_j clip(a·u_j + b, 0, 1) 1{u_j ≤ t} / Σ_j w_j`, the weighted
    form of `linear_model_risk`. The line lies strictly between 0 and 1 on an
    interval `(l, h]`, is 1 on one side of it and 0 on the other, so with the
    cumulative sums `W(x) = Σ_{u_j ≤ x} w_j` and `U(x) = Σ_{u_j ≤ x} w_j u_j`

        R(t)·Σw = a·(U(min(t, h)) − U(min(t, l))) + b·(W(min(t, h)) − W(min(t, l)))
                  + [tokens where the line is ≥ 1 and u ≤ t].

    Identical to `risk_curve(linear_mean(a, b, u), u, grid, w)` up to rounding,
    but its cost does not grow with the number of draws times tokens.

    Args:
      slope: `a`, scalar (any sign).
      intercept: `b`, scalar.
      sample: the law of `u` (`weighted_sample`).
      grid: `(p,)` thresholds (any order).

    Returns:
      `(p,)` risk per token at each threshold; 0 if the total weight is 0.
    """
    chex.assert_rank([slope, intercept, grid], [0, 0, 1])

    def cumulative(cum: Array, x: Array) -> Array:
        return cum[jnp.searchsorted(sample.u, x, side="right")]

    rising = slope > 0
    safe_slope = jnp.where(slope != 0, slope, 1.0)
    at_zero, at_one = -intercept / safe_slope, (1.0 - intercept) / safe_slope
    low = jnp.where(rising, at_zero, at_one)
    high = jnp.where(rising, at_one, at_zero)

    def at(t: Array) -> Array:
        lo, hi = jnp.minimum(t, low), jnp.minimum(t, high)
        inside = slope * (cumulative(sample.weighted_u, hi) - cumulative(sample.weighted_u, lo))
        inside += intercept * (cumulative(sample.weight, hi) - cumulative(sample.weight, lo))
        ones = jnp.where(
            rising,
            cumulative(sample.weight, t) - cumulative(sample.weight, hi),
            cumulative(sample.weight, lo),
        )
        sloped = inside + ones
        flat = jnp.clip(intercept, 0.0, 1.0) * cumulative(sample.weight, t)
        return jnp.where(slope != 0, sloped, flat)

    total = sample.total
    return jax.vmap(at)(grid) / jnp.where(total > 0, total, 1.0)


def risk_bounded_threshold(
    slope: Float[Array, " m"],
    intercept: Float[Array, " m"],
    u_samples: Float[Array, " n"],
    grid: Float[Array, " p"],
    eps: Float[Array, ""],
    delta: Float[Array, ""],
    weight: Float[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Posterior risk-bounded threshold of the linear model.

    The largest `u_th` on the grid with `P(R(u_th) ≤ ε | data) ≥ 1 − δ`, where
    `R` is `linear_model_risk(a_i, b_i, u_samples, ·).per_token` and the
    probability is over posterior draws `(a_i, b_i)`. The uncertainty covered
    is that of `(a, b)` given the data; the law of `u` is taken as known (the
    empirical law of `u_samples`, weighted by `weight`) and the linear model as
    correct.

    Args:
      slope: `(m,)` posterior draws of `a`.
      intercept: `(m,)` posterior draws of `b`.
      u_samples: `(n,)` uncertainties drawn from the law of `u`.
      grid: `(p,)` increasing thresholds.
      eps: `ε`, scalar.
      delta: `δ`, scalar.
      weight: `(n,)` non-negative weights of `u_samples` (e.g. a split's 0/1 mask of
        calibration tokens); all ones if omitted.

    Returns:
      The threshold, or `NO_SKIP` if no grid point qualifies.
    """
    chex.assert_rank([slope, intercept, u_samples, grid], 1)
    sample = weighted_sample(u_samples, weight)
    curves = jax.vmap(linear_risk_curve, in_axes=(0, 0, None, None))(slope, intercept, sample, grid)
    return grid_threshold(grid, risk_bounded_index(curves, eps, delta))
