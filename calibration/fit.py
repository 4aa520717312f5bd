"""Fit the uncertainty -> rejection link of a calibration run with NumPyro.

`uhlm fit RUN_DIR` reads the run's per-token records (`calibration.records`) and
models the rejection probability `β` of a draft given the SLM's uncertainty `u`
(the `u_<measure>` column chosen by `--measure`) two ways:

* **linear** -- the paper's linear-Gaussian model (U-HLM, arXiv 2412.12687, §III),
  `β ~ Normal(a·u + b, σ)`, with the conjugate, weakly informative prior
  `σ² ~ InvGamma(α0, β0)`, `a, b | σ ~ Normal(0, s0·σ)`. It is fitted by NUTS
  and by SVI (a full-rank Gaussian guide), and its exact posterior (Normal-
  inverse-gamma, `conjugate_posterior`) is reported next to both as a check.
  NUTS runs on six sufficient statistics, which is exact and makes its cost
  independent of the number of tokens.
* **hurdle** -- a bounded model that respects `β ∈ [0, 1]` and its mass at 0:
  `P(β > 0 | u) = σ(c·u + e)` and `β | β > 0 ~ Beta(m·κ, (1 − m)·κ)` with
  `m = σ(f·u + g)`. NUTS runs on tokens grouped by their value of `u`, which is
  exact and cheap for discrete measures such as temperature perturbation
  (`K + 1` distinct values).

It reports r-hat, effective sample sizes and divergences (numpyro.diagnostics);
posterior predictive checks in `u` bins (share of `β > 0` and mean `β`, observed
against the 5-95% range of replicated data); a WAIC comparison of the two models
on the observed scale (the linear model scored as the law of `clip(β*, 0, 1)`,
with point masses at 0 and 1, so both models give likelihoods with respect to the
same measure); and Pearson and Spearman correlations of `u` and `β` with 95%
bootstrap intervals that resample prompts.

Outputs, written atomically into RUN_DIR: `posterior_linear.npz` (NUTS draws
`slope`, `intercept`, `sigma` shaped `(chains, draws)`, and SVI draws
`svi_slope`, `svi_intercept`, `svi_sigma`), `posterior_hurdle.npz`
(`positive_slope`, `positive_intercept`, `mean_slope`, `mean_intercept`,
`concentration`) and the summary `fit.json`.

Subsampling: with more than `max_tokens` tokens, whole prompts are drawn at
random (seeded) until the budget is reached, so per-prompt structure is kept.

Caveat: both models treat tokens as conditionally independent given `u`. Tokens
of one prompt are dependent, so posterior intervals can be too narrow; the
bootstrap intervals (over prompts) and the prompt-split validation of
`uhlm threshold --run` do not share this assumption.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from jax.scipy.stats import norm
from numpyro.diagnostics import summary as numpyro_summary
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

import uhlm_jax
from calibration import records
from uhlm_jax.threshold import BETA_POSITIVE_TOL
from uhlm_jax.types import Array, Float

__all__ = [
    "BETA_CLIP",
    "FIT_FILE",
    "HURDLE_FILE",
    "HURDLE_SITES",
    "LINEAR_FILE",
    "LINEAR_SITES",
    "ChainMethod",
    "Config",
    "ConjugatePosterior",
    "FitData",
    "HurdleGroups",
    "HurdlePrior",
    "LinearPrior",
    "LinearStats",
    "Posterior",
    "Result",
    "add_arguments",
    "conjugate_posterior",
    "correlations",
    "hurdle",
    "hurdle_grouped",
    "hurdle_groups",
    "hurdle_pointwise_loglik",
    "least_squares",
    "linear_gaussian",
    "linear_gaussian_stats",
    "linear_pointwise_loglik",
    "linear_stats",
    "load_fit_data",
    "load_posterior",
    "main",
    "run",
    "predictive_checks",
    "replicate_hurdle",
    "replicate_linear",
    "sample_conjugate",
    "waic",
]

FIT_FILE = "fit.json"
LINEAR_FILE = "posterior_linear.npz"
HURDLE_FILE = "posterior_hurdle.npz"
LINEAR_SITES = ("slope", "intercept", "sigma")
HURDLE_SITES = (
    "positive_slope",
    "positive_intercept",
    "mean_slope",
    "mean_intercept",
    "concentration",
)

# Positive β are clipped into (0, 1) before the Beta log density, which is infinite at
# β = 1 (an LLM probability that underflowed to 0) for concentrations below 1.
BETA_CLIP = 1e-6
# Observed β outside [0, 1] by more than float32 rounding is a broken record.
BETA_RANGE_TOL = 1e-5
# Fewest tokens and prompts a fit accepts.
MIN_TOKENS = 10
MIN_PROMPTS = 2
# Posterior draws used for the predictive checks and tokens per WAIC chunk.
PPC_DRAWS = 100
WAIC_CHUNK = 4096
# Central mass of reported intervals.
INTERVAL_MASS = 0.9
BOOTSTRAP_LEVEL = 0.95
# Bootstrap replicates computed together (bounds memory to this many copies of the tokens).
BOOTSTRAP_BATCH = 32
# SVI learning rate: starts here, decays tenfold over the run.
SVI_LEARNING_RATE = 0.01


class ChainMethod(enum.Enum):
    """How NUTS runs several chains (numpyro's `chain_method`)."""

    PARALLEL = "parallel"  # one chain per device (pmap); needs `device_count ≥ num_chains`
    VECTORIZED = "vectorized"  # chains batched with vmap on one device
    SEQUENTIAL = "sequential"  # chains one after another


def default_chain_method(num_chains: int) -> ChainMethod:
    """`PARALLEL` when every chain gets a device, else `VECTORIZED`.

    On the 2-core CPU (benchmarks/fit.py, 2 chains × 2000 iterations of the linear
    model) vectorized chains took about 10 s against 15 s for sequential ones, and
    two emulated host devices in parallel about 4 s. `parallel` needs
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` set before JAX starts.
    """
    if jax.local_device_count() >= num_chains:
        return ChainMethod.PARALLEL
    return ChainMethod.VECTORIZED


@dataclasses.dataclass(frozen=True)
class LinearPrior:
    """Conjugate prior of the linear-Gaussian model.

    `σ² ~ InvGamma(shape, rate)`; `a, b | σ ~ Normal(0, scale·σ)` independently.
    The defaults put the prior median of `σ` near 0.2 with a heavy right tail and
    the prior sd of `a` and `b` near 2 for that `σ`: weak for `β, u ∈ [0, 1]`.
    """

    scale: float = 10.0
    shape: float = 2.0
    rate: float = 0.05

    def __post_init__(self):
        for name in ("scale", "shape", "rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"LinearPrior.{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class HurdlePrior:
    """Weakly informative prior of the hurdle model.

    Logistic slopes and intercepts `c, e, f, g ~ Normal(0, logit_scale)`;
    the Beta concentration `κ ~ LogNormal(log(concentration_median),
    concentration_log_sd)`.
    """

    logit_scale: float = 5.0
    concentration_median: float = 5.0
    concentration_log_sd: float = 1.5

    def __post_init__(self):
        for name in ("logit_scale", "concentration_median", "concentration_log_sd"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"HurdlePrior.{name} must be a finite number > 0, got {value!r}")


# --- models ----------------------------------------------------------------------------


def linear_gaussian(
    u: Float[Array, " n"],
    beta: Float[Array, " n"] | None = None,
    prior: LinearPrior = LinearPrior(),
) -> None:
    """The paper's model, one observation per token: `β ~ Normal(a·u + b, σ)`."""
    sigma_sq = numpyro.sample("sigma_sq", dist.InverseGamma(prior.shape, prior.rate))
    sigma = numpyro.deterministic("sigma", jnp.sqrt(sigma_sq))
    slope = numpyro.sample("slope", dist.Normal(0.0, prior.scale * sigma))
    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior.scale * sigma))
    with numpyro.plate("tokens", u.shape[0]):
        numpyro.sample("beta", dist.Normal(slope * u + intercept, sigma), obs=beta)


class LinearStats(NamedTuple):
    """Sufficient statistics of the linear-Gaussian likelihood, centred for precision.

    Attributes:
      n: number of tokens.
      u_mean, beta_mean: sample means.
      suu, sub, sbb: centred sums `Σ(u−ū)²`, `Σ(u−ū)(β−β̄)`, `Σ(β−β̄)²`.
    """

    n: Any
    u_mean: Any
    beta_mean: Any
    suu: Any
    sub: Any
    sbb: Any


def linear_stats(u: np.ndarray, beta: np.ndarray) -> LinearStats:
    """`LinearStats` of a sample, computed in float64."""
    u = np.asarray(u, np.float64)
    beta = np.asarray(beta, np.float64)
    uc, bc = u - u.mean(), beta - beta.mean()
    return LinearStats(
        n=float(u.size),
        u_mean=float(u.mean()),
        beta_mean=float(beta.mean()),
        suu=float(uc @ uc),
        sub=float(uc @ bc),
        sbb=float(bc @ bc),
    )


def linear_gaussian_stats(stats: LinearStats, prior: LinearPrior = LinearPrior()) -> None:
    """`linear_gaussian` with its likelihood written in sufficient statistics.

    `Σ_i (β_i − a·u_i − b)² = sbb − 2a·sub + a²·suu + n·(β̄ − a·ū − b)²`, so the
    log density equals `linear_gaussian`'s on the tokens the stats came from.
    """
    sigma_sq = numpyro.sample("sigma_sq", dist.InverseGamma(prior.shape, prior.rate))
    sigma = numpyro.deterministic("sigma", jnp.sqrt(sigma_sq))
    slope = numpyro.sample("slope", dist.Normal(0.0, prior.scale * sigma))
    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior.scale * sigma))
    rss = (
        stats.sbb
        - 2.0 * slope * stats.sub
        + slope**2 * stats.suu
        + stats.n * (stats.beta_mean - slope * stats.u_mean - intercept) ** 2
    )
    numpyro.factor("beta", -0.5 * rss / sigma_sq - 0.5 * stats.n * jnp.log(2 * jnp.pi * sigma_sq))


def _hurdle_params(prior: HurdlePrior) -> tuple[Array, Array, Array, Array, Array]:
    s = prior.logit_scale
    c = numpyro.sample("positive_slope", dist.Normal(0.0, s))
    e = numpyro.sample("positive_intercept", dist.Normal(0.0, s))
    f = numpyro.sample("mean_slope", dist.Normal(0.0, s))
    g = numpyro.sample("mean_intercept", dist.Normal(0.0, s))
    kappa = numpyro.sample(
        "concentration",
        dist.LogNormal(math.log(prior.concentration_median), prior.concentration_log_sd),
    )
    return c, e, f, g, kappa


def hurdle(
    u: Float[Array, " n"],
    beta: Float[Array, " n"] | None = None,
    prior: HurdlePrior = HurdlePrior(),
) -> None:
    """Hurdle model, one observation per token.

    `positive ~ Bernoulli(σ(c·u + e))` with `positive = β > BETA_POSITIVE_TOL`;
    where positive, `β ~ Beta(m·κ, (1 − m)·κ)`, `m = σ(f·u + g)`; else `β = 0`.
    Without `beta` it samples replicated data (the `beta` deterministic site).
    """
    c, e, f, g, kappa = _hurdle_params(prior)
    mean = jax.nn.sigmoid(f * u + g)
    with numpyro.plate("tokens", u.shape[0]):
        observed_positive = None if beta is None else beta > BETA_POSITIVE_TOL
        positive = numpyro.sample(
            "positive", dist.Bernoulli(logits=c * u + e), obs=observed_positive
        ).astype(bool)
        # Masked-out entries still enter the Beta density; 0.5 keeps it finite.
        observed_value = (
            None
            if beta is None
            else jnp.where(positive, jnp.clip(beta, BETA_CLIP, 1 - BETA_CLIP), 0.5)
        )
        with numpyro.handlers.mask(mask=positive):
            value = numpyro.sample(
                "positive_beta", dist.Beta(mean * kappa, (1 - mean) * kappa), obs=observed_value
            )
        numpyro.deterministic("beta", jnp.where(positive, value, 0.0))


class HurdleGroups(NamedTuple):
    """Tokens grouped by their value of `u`: the hurdle likelihood's exact statistics.

    Attributes:
      u: `(g,)` distinct uncertainties.
      count: `(g,)` tokens per group.
      positive: `(g,)` tokens with `β > BETA_POSITIVE_TOL`.
      sum_log_beta, sum_log1m_beta: `(g,)` `Σ log β` and `Σ log(1 − β)` over the
        positive tokens, `β` clipped to `[BETA_CLIP, 1 − BETA_CLIP]`.
    """

    u: Any
    count: Any
    positive: Any
    sum_log_beta: Any
    sum_log1m_beta: Any


def hurdle_groups(u: np.ndarray, beta: np.ndarray) -> HurdleGroups:
    """`HurdleGroups` of a sample, summed in float64, stored as float32."""
    values, group = np.unique(np.asarray(u, np.float32), return_inverse=True)
    beta = np.asarray(beta, np.float64)
    positive = beta > BETA_POSITIVE_TOL
    clipped = np.clip(beta, BETA_CLIP, 1 - BETA_CLIP)
    g = values.size

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=w, minlength=g).astype(np.float32)

    return HurdleGroups(
        u=values.astype(np.float32),
        count=total(np.ones_like(beta)),
        positive=total(positive.astype(np.float64)),
        sum_log_beta=total(np.where(positive, np.log(clipped), 0.0)),
        sum_log1m_beta=total(np.where(positive, np.log1p(-clipped), 0.0)),
    )


def hurdle_grouped(groups: HurdleGroups, prior: HurdlePrior = HurdlePrior()) -> None:
    """`hurdle` with its likelihood summed within groups of equal `u` (same density)."""
    c, e, f, g, kappa = _hurdle_params(prior)
    logits = c * groups.u + e
    numpyro.factor(
        "positive",
        jnp.sum(
            groups.positive * jax.nn.log_sigmoid(logits)
            + (groups.count - groups.positive) * jax.nn.log_sigmoid(-logits)
        ),
    )
    mean = jax.nn.sigmoid(f * groups.u + g)
    a, b = mean * kappa, (1 - mean) * kappa
    log_norm = (
        jax.scipy.special.gammaln(kappa)
        - jax.scipy.special.gammaln(a)
        - jax.scipy.special.gammaln(b)
    )
    numpyro.factor(
        "positive_beta",
        jnp.sum(
            groups.positive * log_norm
            + (a - 1) * groups.sum_log_beta
            + (b - 1) * groups.sum_log1m_beta
        ),
    )


# --- pointwise likelihoods and WAIC ----------------------------------------------------


def _beta_log_density(a: Array, b: Array, total: Array, x: Array) -> Array:
    """`log Beta(x; a, b)` with `total = a + b`, written out in `gammaln`.

    XX
    """
    gammaln = jax.scipy.special.gammaln
    return gammaln(total) - gammaln(a) - gammaln(b) + (a - 1) * jnp.log(x) + (b - 1) * jnp.log1p(-x)


def linear_pointwise_loglik(
    params: dict[str, Array], u: Float[Array, " n"], beta: Float[Array, " n"]
) -> Float[Array, " n"]:
    """Per-token log likelihood of the linear model on the observed scale, one draw.

    The observed `β = clip(β*, 0, 1)` of the latent `β* ~ Normal(a·u + b, σ)`:
    `log Φ(−μ/σ)` at `β = 0`, `log Φ((μ − 1)/σ)` at `β = 1`, the Normal log
    density in between.
    """
    mu = params["slope"] * u + params["intercept"]
    sigma = params["sigma"]
    at_zero = beta <= BETA_POSITIVE_TOL
    at_one = beta >= 1 - BETA_CLIP
    inside = norm.logpdf(beta, mu, sigma)
    return jnp.where(
        at_zero, norm.logcdf(-mu / sigma), jnp.where(at_one, norm.logcdf((mu - 1) / sigma), inside)
    )


def hurdle_pointwise_loglik(
    params: dict[str, Array], u: Float[Array, " n"], beta: Float[Array, " n"]
) -> Float[Array, " n"]:
    """Per-token log likelihood of the hurdle model, one draw (as `hurdle` scores it)."""
    logits = params["positive_slope"] * u + params["positive_intercept"]
    mean = jax.nn.sigmoid(params["mean_slope"] * u + params["mean_intercept"])
    kappa = params["concentration"]
    positive = beta > BETA_POSITIVE_TOL
    value = jnp.where(positive, jnp.clip(beta, BETA_CLIP, 1 - BETA_CLIP), 0.5)
    beta_density = _beta_log_density(mean * kappa, (1 - mean) * kappa, kappa, value)
    return jnp.where(
        positive, jax.nn.log_sigmoid(logits) + beta_density, jax.nn.log_sigmoid(-logits)
    )


class Waic(NamedTuple):
    """WAIC (Watanabe 2010; Vehtari, Gelman, Gabry 2017), per token and in total.

    Attributes:
      elpd_i: `(n,)` pointwise `lppd_i − p_i`.
      p_i: `(n,)` pointwise effective parameters, the variance over draws of the
        log likelihood.
    """

    elpd_i: np.ndarray
    p_i: np.ndarray

    def summary(self) -> dict[str, float]:
        n = self.elpd_i.size
        elpd = float(self.elpd_i.sum())
        return {
            "elpd": elpd,
            "p_waic": float(self.p_i.sum()),
            "waic": -2.0 * elpd,
            "se": 2.0 * float(np.sqrt(n * np.var(self.elpd_i))),
        }


def waic(loglik, draws: dict[str, Array], u: np.ndarray, beta: np.ndarray) -> Waic:
    """WAIC of a model from its pointwise log likelihood, in token chunks.

    `elpd_i = log mean_s p(β_i | θ_s) − var_s log p(β_i | θ_s)`.

    Args:
      loglik: `(params, u, beta) -> (n,)` for one draw.
      draws: site -> `(S,)` posterior draws.
      u, beta: `(n,)` data.

    Returns:
      The pointwise `Waic`.
    """
    n = u.shape[0]
    pad = (-n) % WAIC_CHUNK
    u_chunks = jnp.pad(jnp.asarray(u, jnp.float32), (0, pad)).reshape(-1, WAIC_CHUNK)
    beta_chunks = jnp.pad(jnp.asarray(beta, jnp.float32), (0, pad)).reshape(-1, WAIC_CHUNK)
    num_draws = next(iter(draws.values())).shape[0]

    def pointwise(draws, xs):
        def chunk(args):
            u_c, beta_c = args
            ll = jax.vmap(loglik, in_axes=(0, None, None))(draws, u_c, beta_c)  # (S, chunk)
            lppd = jax.nn.logsumexp(ll, axis=0) - jnp.log(num_draws)
            return lppd, jnp.var(ll, axis=0)

        return jax.lax.map(chunk, xs)

    # Draws are arguments, not closed-over constants, which XLA would try to fold.
    lppd, p = jax.jit(pointwise)(draws, (u_chunks, beta_chunks))
    lppd, p = np.asarray(lppd).reshape(-1)[:n], np.asarray(p).reshape(-1)[:n]
    return Waic(elpd_i=lppd - p, p_i=p)


# --- exact posterior and least squares -------------------------------------------------


class ConjugatePosterior(NamedTuple):
    """Normal-inverse-gamma posterior of `(a, b, σ²)` under `LinearPrior`.

    `σ² ~ InvGamma(shape, rate)`, `(a, b) | σ² ~ Normal(mean, σ²·precision⁻¹)`;
    marginally `(a, b)` is Student-t with `2·shape` degrees of freedom.
    Arrays may carry leading batch axes (one posterior per split).
    """

    mean: np.ndarray  # (..., 2): slope, intercept
    precision: np.ndarray  # (..., 2, 2)
    shape: np.ndarray  # (...)
    rate: np.ndarray  # (...)

    def moments(self) -> dict[str, dict[str, float]]:
        """Posterior means and sds of slope, intercept and σ (σ's by Monte Carlo)."""
        dof = 2 * self.shape
        cov = self.rate / self.shape * np.linalg.inv(self.precision) * dof / (dof - 2)
        draws = sample_conjugate(np.random.default_rng(0), self, 20_000)
        return {
            "slope": {"mean": float(self.mean[0]), "sd": float(np.sqrt(cov[0, 0]))},
            "intercept": {"mean": float(self.mean[1]), "sd": float(np.sqrt(cov[1, 1]))},
            "sigma": {"mean": float(draws[2].mean()), "sd": float(draws[2].std())},
        }


def conjugate_posterior(
    n: np.ndarray,
    sum_u: np.ndarray,
    sum_beta: np.ndarray,
    sum_uu: np.ndarray,
    sum_ubeta: np.ndarray,
    sum_betabeta: np.ndarray,
    prior: LinearPrior = LinearPrior(),
) -> ConjugatePosterior:
    """Exact posterior of the linear-Gaussian model from raw sums (float64).

    With `X = [u, 1]` and prior precision `I / scale²`:
    `Λ = XᵀX + I/scale²`, `mean = Λ⁻¹Xᵀβ`, `shape = α0 + n/2`,
    `rate = β0 + (βᵀβ − meanᵀΛ mean)/2`. Inputs may be batched (leading axes).
    """
    n, sum_u, sum_beta, sum_uu, sum_ubeta, sum_betabeta = (
        np.asarray(x, np.float64) for x in (n, sum_u, sum_beta, sum_uu, sum_ubeta, sum_betabeta)
    )
    ridge = 1.0 / prior.scale**2
    precision = np.stack(
        [np.stack([sum_uu + ridge, sum_u], -1), np.stack([sum_u, n + ridge], -1)], -2
    )
    xty = np.stack([sum_ubeta, sum_beta], -1)
    mean = np.linalg.solve(precision, xty[..., None])[..., 0]
    quad = np.einsum("...i,...i->...", mean, xty)
    return ConjugatePosterior(
        mean=mean,
        precision=precision,
        shape=prior.shape + n / 2,
        rate=prior.rate + np.maximum(sum_betabeta - quad, 0.0) / 2,
    )


def sample_conjugate(
    rng: np.random.Generator, post: ConjugatePosterior, num_draws: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws `(slope, intercept, sigma)`, each `(..., num_draws)`, from the exact posterior."""
    batch = post.shape.shape
    sigma_sq = post.rate[..., None] / rng.gamma(post.shape[..., None], size=batch + (num_draws,))
    chol = np.linalg.cholesky(np.linalg.inv(post.precision))  # (..., 2, 2)
    z = rng.standard_normal(batch + (num_draws, 2))
    ab = post.mean[..., None, :] + np.sqrt(sigma_sq)[..., None] * np.einsum(
        "...ij,...mj->...mi", chol, z
    )
    return ab[..., 0], ab[..., 1], np.sqrt(sigma_sq)


def least_squares(u: np.ndarray, beta: np.ndarray) -> dict[str, float]:
    """Ordinary least squares `β ≈ a·u + b` (numpy `lstsq`), σ with `n − 2` dof."""
    x = np.stack([np.asarray(u, np.float64), np.ones(len(u))], axis=1)
    y = np.asarray(beta, np.float64)
    (slope, intercept), *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ np.array([slope, intercept])
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "sigma": float(np.sqrt(residual @ residual / max(len(y) - 2, 1))),
    }


# --- correlations ----------------------------------------------------------------------


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    total = w.sum()
    mx, my = (w @ x) / total, (w @ y) / total
    dx, dy = x - mx, y - my
    cov = w @ (dx * dy)
    denom = math.sqrt(float(w @ (dx * dx)) * float(w @ (dy * dy)))
    return float(cov / denom) if denom > 0 else float("nan")


class _Ranker:
    """Mid-ranks of a sample under integer token weights (tied values share a rank)."""

    def __init__(self, x: np.ndarray):
        _, self.group = np.unique(x, return_inverse=True)
        self.num_groups = int(self.group.max()) + 1

    def __call__(self, w: np.ndarray) -> np.ndarray:
        group_weight = np.bincount(self.group, weights=w, minlength=self.num_groups)
        mid = np.cumsum(group_weight) - (group_weight - 1) / 2
        return mid[self.group]


class _RankGroups(NamedTuple):
    """Tied values of a sample in sorted order, for mid-ranks under any token weights.

    Attributes:
      order: `(n,)` argsort of the sample.
      last: `(G,)` sorted position of the last token of each group of equal values.
      group: `(n,)` group of each token (groups numbered in increasing value).
    """

    order: np.ndarray
    last: np.ndarray
    group: np.ndarray


def _rank_groups(x: np.ndarray) -> _RankGroups:
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group_sorted = np.cumsum(starts) - 1
    group = np.empty_like(group_sorted)
    group[order] = group_sorted
    last = np.concatenate([np.nonzero(starts)[0][1:] - 1, [x.size - 1]])
    return _RankGroups(order=order, last=last, group=group)


def _weighted_midranks(w: Array, groups: _RankGroups) -> Array:
    """Mid-ranks / total weight of every token when token j counts `w_j` times."""
    cumulative = jnp.cumsum(w[groups.order])
    end = cumulative[groups.last]
    before = jnp.concatenate([jnp.zeros((1,), end.dtype), end[:-1]])
    mid = (before + 1.0 + end) / 2.0
    return mid[groups.group] / cumulative[-1]


def _weighted_pearson_jnp(x: Array, y: Array, w: Array) -> Array:
    total = jnp.sum(w)
    dx = x - jnp.sum(w * x) / total
    dy = y - jnp.sum(w * y) / total
    return jnp.sum(w * dx * dy) / jnp.sqrt(jnp.sum(w * dx * dx) * jnp.sum(w * dy * dy))


def _bootstrap_correlations(
    u: np.ndarray, beta: np.ndarray, prompt: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """`(B, 2)` Pearson and Spearman correlations of prompt-bootstrap replicates.

    Replicate `i` weights token `j` by `counts[i, prompt_j]`, its prompt's number of
    copies; Spearman's ρ uses that replicate's own weighted mid-ranks. float32, with
    ranks scaled to (0, 1] and moments centred.
    """
    u_groups, beta_groups = _rank_groups(u), _rank_groups(beta)
    u32, beta32 = jnp.asarray(u, jnp.float32), jnp.asarray(beta, jnp.float32)

    def one(c: Array) -> Array:
        w = c[prompt]
        pearson = _weighted_pearson_jnp(u32, beta32, w)
        spearman = _weighted_pearson_jnp(
            _weighted_midranks(w, u_groups), _weighted_midranks(w, beta_groups), w
        )
        return jnp.stack([pearson, spearman])

    compute = jax.jit(lambda cs: jax.lax.map(one, cs, batch_size=BOOTSTRAP_BATCH))
    return np.asarray(compute(jnp.asarray(counts, jnp.float32)))


def correlations(
    u: np.ndarray,
    beta: np.ndarray,
    prompt: np.ndarray,
    num_prompts: int,
    num_bootstrap: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Pearson and Spearman correlation of `u` and `β` with prompt-bootstrap intervals.

    Each bootstrap replicate draws `num_prompts` prompts with replacement and
    weights every token by its prompt's count; Spearman's ρ is recomputed from
    the replicate's own (weighted, mid-) ranks. Intervals are percentile
    intervals at `BOOTSTRAP_LEVEL`. Point estimates are float64.
    """
    u = np.asarray(u, np.float64)
    beta = np.asarray(beta, np.float64)
    ones = np.ones_like(u)
    pearson = _weighted_pearson(u, beta, ones)
    spearman = _weighted_pearson(_Ranker(u)(ones), _Ranker(beta)(ones), ones)
    counts = rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), num_bootstrap)
    boot = _bootstrap_correlations(u, beta, prompt, counts)
    tail = (1 - BOOTSTRAP_LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
    return {
        "pearson": {"estimate": pearson, "interval": [float(lo[0]), float(hi[0])]},
        "spearman": {"estimate": spearman, "interval": [float(lo[1]), float(hi[1])]},
        "level": BOOTSTRAP_LEVEL,
        "num_bootstrap": num_bootstrap,
        "resampled_unit": "prompt",
    }


# --- the job ---------------------------------------------------------------------------


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm fit`.

    Attributes:
      run_dir: the run directory with `records/shard-*.parquet`.
      measure: the uncertainty measure, i.e. the record column `u_<measure>`.
      num_chains: NUTS chains (at least 2, for r-hat).
      num_warmup: NUTS warmup iterations per chain.
      num_samples: NUTS draws kept per chain.
      chain_method: how chains run; `None` picks `default_chain_method`.
      svi_steps: optimisation steps of SVI.
      max_tokens: most tokens used; above it, whole prompts are subsampled.
      num_bins: `u` bins of the posterior predictive checks.
      num_bootstrap: prompt-bootstrap replicates of the correlations.
      seed: seed of every random choice (NUTS, SVI, subsampling, bootstrap).
      linear_prior, hurdle_prior: the priors.
    """

    run_dir: str
    measure: str = "temperature_perturbation"
    num_chains: int = 2
    num_warmup: int = 1000
    num_samples: int = 1000
    chain_method: ChainMethod | None = None
    svi_steps: int = 5000
    max_tokens: int = 100_000
    num_bins: int = 10
    num_bootstrap: int = 1000
    seed: int = 0
    linear_prior: LinearPrior = LinearPrior()
    hurdle_prior: HurdlePrior = HurdlePrior()

    def __post_init__(self):
        if not isinstance(self.run_dir, str | Path) or not str(self.run_dir):
            raise ValueError(f"run_dir must be a path, got {self.run_dir!r}")
        if not isinstance(self.measure, str) or not self.measure.isidentifier():
            raise ValueError(
                f"measure must be a measure name such as 'temperature_perturbation' "
                f"(the record column without its 'u_' prefix), got {self.measure!r}"
            )
        _positive_int("num_chains", self.num_chains, 2)
        _positive_int("num_warmup", self.num_warmup)
        _positive_int("num_samples", self.num_samples)
        _positive_int("svi_steps", self.svi_steps)
        _positive_int("max_tokens", self.max_tokens, MIN_TOKENS)
        _positive_int("num_bins", self.num_bins)
        _positive_int("num_bootstrap", self.num_bootstrap)
        _positive_int("seed", self.seed, 0)
        if self.chain_method is not None and not isinstance(self.chain_method, ChainMethod):
            raise ValueError(
                f"chain_method must be a ChainMethod ({[m.value for m in ChainMethod]}) or "
                f"None, got {self.chain_method!r}"
            )
        if self.chain_method is ChainMethod.PARALLEL and jax.local_device_count() < self.num_chains:
            raise ValueError(
                f"chain_method 'parallel' needs {self.num_chains} devices, found "
                f"{jax.local_device_count()}; use 'sequential' or 'vectorized', or set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before starting"
            )


@dataclasses.dataclass(frozen=True)
class FitData:
    """The tokens a fit uses.

    Attributes:
      u, beta: `(n,)` float32 uncertainty and rejection probability.
      prompt: `(n,)` prompt of each token, renumbered `0 … P−1`.
      num_prompts: `P`.
      num_tokens_total, num_prompts_total: before subsampling.
    """

    u: np.ndarray
    beta: np.ndarray
    prompt: np.ndarray
    num_prompts: int
    num_tokens_total: int
    num_prompts_total: int


def subsample_prompts(df: pd.DataFrame, max_tokens: int, rng: np.random.Generator) -> pd.DataFrame:
    """Whole prompts in random order while their tokens fit in `max_tokens` (at least one)."""
    if len(df) <= max_tokens:
        return df
    sizes = df.groupby("prompt_id").size()
    order = rng.permutation(sizes.index.to_numpy())
    cumulative = np.cumsum(sizes.loc[order].to_numpy())
    keep = order[: max(1, int(np.searchsorted(cumulative, max_tokens, side="right")))]
    return df[df["prompt_id"].isin(keep)].reset_index(drop=True)


def prepare_data(df: pd.DataFrame, measure: str, max_tokens: int, seed: int) -> FitData:
    """Checks a record table and selects the tokens to fit.

    Raises:
      ValueError: unknown measure, non-finite values, `β` outside `[0, 1]`, or too
        few tokens or prompts.
    """
    column = records.MEASURE_PREFIX + measure
    if column not in df.columns:
        raise ValueError(
            f"measure {measure!r} is not in the records (no column {column!r}); "
            f"recorded measures: {records.measure_names(df.columns)}"
        )
    u_all = df[column].to_numpy(np.float64)
    beta_all = df["beta"].to_numpy(np.float64)
    bad = ~(np.isfinite(u_all) & np.isfinite(beta_all))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} records have non-finite {column} or beta; fix or re-collect them"
        )
    if (beta_all < -BETA_RANGE_TOL).any() or (beta_all > 1 + BETA_RANGE_TOL).any():
        raise ValueError(
            f"beta must lie in [0, 1], found values in [{beta_all.min()}, {beta_all.max()}]; "
            "the records are not rejection probabilities"
        )
    subset = subsample_prompts(df, max_tokens, np.random.default_rng((seed, 1)))
    prompt_ids, prompt = np.unique(subset["prompt_id"].to_numpy(), return_inverse=True)
    if len(subset) < MIN_TOKENS or prompt_ids.size < MIN_PROMPTS:
        raise ValueError(
            f"a fit needs at least {MIN_TOKENS} tokens from {MIN_PROMPTS} prompts, got "
            f"{len(subset)} tokens from {prompt_ids.size} prompts; collect more records"
        )
    return FitData(
        u=subset[column].to_numpy(np.float32),
        beta=np.clip(subset["beta"].to_numpy(np.float32), 0.0, 1.0),
        prompt=prompt.astype(np.int64),
        num_prompts=int(prompt_ids.size),
        num_tokens_total=len(df),
        num_prompts_total=int(df["prompt_id"].nunique()),
    )


def load_fit_data(cfg: Config) -> FitData:
    """Reads the run's records and prepares them for `cfg`."""
    return prepare_data(records.read_records(cfg.run_dir), cfg.measure, cfg.max_tokens, cfg.seed)


def _site_summary(samples: dict[str, np.ndarray], sites: tuple[str, ...]) -> dict[str, Any]:
    """Per-site mean, sd, interval, ESS and r-hat of draws shaped `(chains, draws)`."""
    table = numpyro_summary({s: samples[s] for s in sites}, prob=INTERVAL_MASS)
    lo_key, hi_key = [k for k in next(iter(table.values())) if k.endswith("%")]
    return {
        s: {
            "mean": float(table[s]["mean"]),
            "sd": float(table[s]["std"]),
            "median": float(table[s]["median"]),
            "interval": [float(table[s][lo_key]), float(table[s][hi_key])],
            "ess": float(table[s]["n_eff"]),
            "r_hat": float(table[s]["r_hat"]),
        }
        for s in sites
    }


def run_nuts(
    model, model_args: tuple, sites: tuple[str, ...], cfg: Config, key: Array, init: dict | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Runs NUTS (dense mass matrix) and returns draws `(chains, draws)` and diagnostics."""
    method = cfg.chain_method or default_chain_method(cfg.num_chains)
    kernel = NUTS(
        model,
        dense_mass=True,
        init_strategy=init_to_value(values=init) if init else numpyro.infer.init_to_median,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=cfg.num_warmup,
        num_samples=cfg.num_samples,
        num_chains=cfg.num_chains,
        chain_method=method.value,
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(key, *model_args, extra_fields=("diverging", "num_steps"))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    diagnostics = {
        "chain_method": method.value,
        "num_chains": cfg.num_chains,
        "num_warmup": cfg.num_warmup,
        "num_samples": cfg.num_samples,
        "divergences": int(np.asarray(extra["diverging"]).sum()),
        "mean_leapfrog_steps": float(np.asarray(extra["num_steps"]).mean()),
        "seconds": seconds,
        "params": _site_summary(samples, sites),
    }
    return {s: samples[s] for s in sites}, diagnostics


def run_svi(
    stats: LinearStats, cfg: Config, key: Array, init: dict[str, float], num_draws: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SVI of the linear model with a full-rank Gaussian guide; returns draws and summary."""
    fit_key, draw_key = jax.random.split(key)
    guide = AutoMultivariateNormal(
        linear_gaussian_stats, init_loc_fn=init_to_value(values=init), init_scale=0.01
    )
    schedule = optax.exponential_decay(SVI_LEARNING_RATE, cfg.svi_steps, 0.1)
    optimizer = numpyro.optim.optax_to_numpyro(optax.adam(schedule))
    svi = SVI(linear_gaussian_stats, guide, optimizer, Trace_ELBO(num_particles=4))
    start = time.perf_counter()
    result = svi.run(fit_key, cfg.svi_steps, stats, cfg.linear_prior, progress_bar=False)
    draws = guide.sample_posterior(draw_key, result.params, sample_shape=(num_draws,))
    draws = {
        "slope": np.asarray(draws["slope"]),
        "intercept": np.asarray(draws["intercept"]),
        "sigma": np.sqrt(np.asarray(draws["sigma_sq"])),
    }
    seconds = time.perf_counter() - start
    losses = np.asarray(result.losses)
    summary = {
        "guide": "AutoMultivariateNormal",
        "steps": cfg.svi_steps,
        "final_loss": float(losses[-100:].mean()),
        "seconds": seconds,
        "params": {
            s: {
                "mean": float(v.mean()),
                "sd": float(v.std()),
                "interval": [float(x) for x in np.quantile(v, [0.05, 0.95])],
            }
            for s, v in draws.items()
        },
    }
    return draws, summary


def _flatten(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(-1) for k, v in draws.items()}


def _thin(draws: dict[str, np.ndarray], num: int | None = None) -> dict[str, jnp.ndarray]:
    """Draws flattened over chains and thinned evenly to at most `num` (all if None)."""
    flat = _flatten(draws)
    total = next(iter(flat.values())).size
    index = np.linspace(0, total - 1, total if num is None else min(num, total)).astype(int)
    return {k: jnp.asarray(v[index], jnp.float32) for k, v in flat.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def replicate_linear(
    rng: np.random.Generator, draws: dict[str, np.ndarray], u: np.ndarray
) -> np.ndarray:
    """`(S, n)` replicated `β ~ Normal(a·u + b, σ)`, one row per draw (`linear_gaussian`)."""
    a, b, sigma = (np.asarray(draws[k], np.float32)[:, None] for k in LINEAR_SITES)
    noise = rng.standard_normal((a.shape[0], u.shape[0]), dtype=np.float32)
    return a * u + b + sigma * noise


def replicate_hurdle(
    rng: np.random.Generator, draws: dict[str, np.ndarray], u: np.ndarray
) -> np.ndarray:
    """`(S, n)` replicated `β` of the hurdle model, one row per draw (`hurdle`).

    NumPy's Beta sampler, not `jax.random.beta`, whose rejection loop took tens
    of seconds for 10^7 draws on the 2-core CPU.
    """
    c, e, f, g, kappa = (np.asarray(draws[k], np.float64)[:, None] for k in HURDLE_SITES)
    u = np.asarray(u, np.float64)[None, :]
    positive = rng.random((c.shape[0], u.shape[1])) < _sigmoid(c * u + e)
    mean = _sigmoid(f * u + g)
    rows, cols = np.nonzero(positive)
    m, k = mean[rows, cols], kappa[rows, 0]
    out = np.zeros(positive.shape, np.float32)
    out[rows, cols] = rng.beta(m * k, (1 - m) * k)
    return out


def predictive_checks(
    data: FitData,
    linear_draws: dict[str, np.ndarray],
    hurdle_draws: dict[str, np.ndarray],
    num_bins: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Observed vs replicated share of `β > 0` and mean `β` in equal-width `u` bins.

    Replicates come from `PPC_DRAWS` posterior draws of each model, on the same
    `u`; each bin reports the replicated statistic's 5%, 50% and 95% quantiles
    and whether the observed value lies in that range.
    """
    u, beta = data.u, data.beta
    edges = np.linspace(float(u.min()), float(u.max()), num_bins + 1)
    bins = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
    thin = lambda d: {k: np.asarray(v) for k, v in _thin(d, PPC_DRAWS).items()}  # noqa: E731
    replicated = {
        "linear": replicate_linear(rng, thin(linear_draws), u),
        "hurdle": replicate_hurdle(rng, thin(hurdle_draws), u),
    }
    one_hot = np.eye(num_bins, dtype=np.float32)[bins]  # (n, bins)
    count = np.maximum(one_hot.sum(0), 1)
    stats_rep = {
        name: (((rep > BETA_POSITIVE_TOL) @ one_hot) / count, (rep @ one_hot) / count)
        for name, rep in replicated.items()
    }
    observed_share = ((beta > BETA_POSITIVE_TOL).astype(np.float32) @ one_hot) / count
    observed_mean = (beta @ one_hot) / count
    out = []
    for k in range(num_bins):
        if one_hot[:, k].sum() == 0:
            continue
        row = {
            "u_low": float(edges[k]),
            "u_high": float(edges[k + 1]),
            "num_tokens": int(one_hot[:, k].sum()),
            "observed_share_positive": float(observed_share[k]),
            "observed_mean_beta": float(observed_mean[k]),
        }
        for name, (share, mean) in stats_rep.items():
            qs = np.quantile(share[:, k], [0.05, 0.5, 0.95])
            qm = np.quantile(mean[:, k], [0.05, 0.5, 0.95])
            row[name] = {
                "share_positive": [float(x) for x in qs],
                "mean_beta": [float(x) for x in qm],
                "share_covered": bool(qs[0] <= observed_share[k] <= qs[2]),
                "mean_covered": bool(qm[0] <= observed_mean[k] <= qm[2]),
            }
        out.append(row)
    return out


class Posterior(NamedTuple):
    """What `uhlm fit` saved: the summary and flattened posterior draws."""

    summary: dict[str, Any]
    linear: dict[str, np.ndarray]
    hurdle: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of `uhlm fit`.

    Attributes:
      summary: the content of `fit.json`.
      linear: NUTS draws of the linear model, `(chains, draws)` per site.
      svi: SVI draws of the linear model, `(draws,)` per site.
      hurdle: NUTS draws of the hurdle model, `(chains, draws)` per site.
      fit_path: where `fit.json` was written.
    """

    summary: dict[str, Any]
    linear: dict[str, np.ndarray]
    svi: dict[str, np.ndarray]
    hurdle: dict[str, np.ndarray]
    fit_path: Path


def fit_data(cfg: Config, data: FitData) -> tuple[dict[str, Any], dict, dict, dict]:
    """Fits both models to prepared data; returns the summary and the three draw sets."""
    linear_key, svi_key, hurdle_key = jax.random.split(jax.random.key(cfg.seed), 3)
    u, beta = data.u, data.beta
    ls = least_squares(u, beta)
    init = {
        "slope": ls["slope"],
        "intercept": ls["intercept"],
        "sigma_sq": max(ls["sigma"], 1e-3) ** 2,
    }
    stats = linear_stats(u, beta)
    stats32 = LinearStats(*(jnp.float32(x) for x in stats))
    linear_draws, linear_nuts = run_nuts(
        linear_gaussian_stats, (stats32, cfg.linear_prior), LINEAR_SITES, cfg, linear_key, init
    )
    svi_draws, svi_summary = run_svi(stats32, cfg, svi_key, init, cfg.num_chains * cfg.num_samples)
    u64, beta64 = u.astype(np.float64), beta.astype(np.float64)
    exact = conjugate_posterior(
        u64.size,
        u64.sum(),
        beta64.sum(),
        u64 @ u64,
        u64 @ beta64,
        beta64 @ beta64,
        cfg.linear_prior,
    )
    groups = HurdleGroups(*(jnp.asarray(x) for x in hurdle_groups(u, beta)))
    hurdle_draws, hurdle_nuts = run_nuts(
        hurdle_grouped, (groups, cfg.hurdle_prior), HURDLE_SITES, cfg, hurdle_key, None
    )
    start = time.perf_counter()
    waic_linear = waic(linear_pointwise_loglik, _thin(linear_draws), u, beta)
    waic_hurdle = waic(hurdle_pointwise_loglik, _thin(hurdle_draws), u, beta)
    diff = waic_hurdle.elpd_i - waic_linear.elpd_i
    comparison = {
        "criterion": "WAIC",
        "scale": "observed beta in [0, 1]: the linear model is scored as the law of "
        "clip(beta*, 0, 1) (point masses at 0 and 1), the hurdle model as fitted",
        "linear": waic_linear.summary(),
        "hurdle": waic_hurdle.summary(),
        "elpd_difference_hurdle_minus_linear": float(diff.sum()),
        "elpd_difference_se": float(np.sqrt(diff.size * np.var(diff))),
        "preferred": "hurdle" if diff.sum() > 0 else "linear",
        "seconds": time.perf_counter() - start,
    }
    ppc = predictive_checks(
        data, linear_draws, hurdle_draws, cfg.num_bins, np.random.default_rng((cfg.seed, 3))
    )
    correlation = correlations(
        u,
        beta,
        data.prompt,
        data.num_prompts,
        cfg.num_bootstrap,
        np.random.default_rng((cfg.seed, 2)),
    )
    summary = {
        "measure": cfg.measure,
        "data": {
            "num_tokens": int(u.size),
            "num_prompts": data.num_prompts,
            "num_tokens_total": data.num_tokens_total,
            "num_prompts_total": data.num_prompts_total,
            "subsampled": bool(u.size < data.num_tokens_total),
            "u_range": [float(u.min()), float(u.max())],
            "mean_beta": float(beta.mean()),
            "rejection_share": float(np.mean(beta > BETA_POSITIVE_TOL)),
            "distinct_u": int(groups.u.shape[0]),
        },
        "correlation": correlation,
        "least_squares": ls,
        "linear": {
            "model": "beta ~ Normal(slope*u + intercept, sigma)",
            "prior": dataclasses.asdict(cfg.linear_prior),
            "nuts": linear_nuts,
            "svi": svi_summary,
            "exact": exact.moments(),
        },
        "hurdle": {
            "model": "P(beta>0|u) = sigmoid(positive_slope*u + positive_intercept); "
            "beta|beta>0 ~ Beta(m*concentration, (1-m)*concentration), "
            "m = sigmoid(mean_slope*u + mean_intercept)",
            "prior": dataclasses.asdict(cfg.hurdle_prior),
            "nuts": hurdle_nuts,
        },
        "comparison": comparison,
        "predictive_checks": ppc,
    }
    return summary, linear_draws, svi_draws, hurdle_draws


def run(cfg: Config) -> Result:
    """Fits both models to the run's records and writes the draws and `fit.json`."""
    data = load_fit_data(cfg)
    summary, linear_draws, svi_draws, hurdle_draws = fit_data(cfg, data)
    run_dir = Path(cfg.run_dir)
    summary = {
        "run_dir": str(run_dir),
        "versions": {
            "uhlm_jax": uhlm_jax.__version__,
            "jax": jax.__version__,
            "numpyro": numpyro.__version__,
        },
        "config": {
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("chain_method",)},
            "chain_method": summary["linear"]["nuts"]["chain_method"],
            "run_dir": str(run_dir),
        },
        "files": {"linear": LINEAR_FILE, "hurdle": HURDLE_FILE},
        **summary,
    }
    records.write_npz(
        run_dir / LINEAR_FILE,
        **linear_draws,
        **{f"svi_{k}": v for k, v in svi_draws.items()},
    )
    records.write_npz(run_dir / HURDLE_FILE, **hurdle_draws)
    records.write_json(run_dir / FIT_FILE, summary)
    return Result(
        summary=summary,
        linear=linear_draws,
        svi=svi_draws,
        hurdle=hurdle_draws,
        fit_path=run_dir / FIT_FILE,
    )


def load_posterior(run_dir: str | Path) -> Posterior:
    """Reads `fit.json` and the saved draws (flattened over chains) of a run."""
    run_dir = records.require_run_dir(run_dir)
    for name in (FIT_FILE, LINEAR_FILE, HURDLE_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(
                f"{str(run_dir / name)!r} is missing; run `uhlm fit {run_dir}` to write the fit"
            )
    summary = records.read_json(run_dir / FIT_FILE)
    with np.load(run_dir / LINEAR_FILE) as f:
        linear = {s: f[s].reshape(-1) for s in LINEAR_SITES}
    with np.load(run_dir / HURDLE_FILE) as f:
        hurdle_draws = {s: f[s].reshape(-1) for s in HURDLE_SITES}
    return Posterior(summary=summary, linear=linear, hurdle=hurdle_draws)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm fit` options."""
    d = Config(run_dir=".")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory with record shards")
    parser.add_argument(
        "--measure",
        default=d.measure,
        help=f"uncertainty measure, the record column u_<measure> (default: {d.measure})",
    )
    parser.add_argument("--num-chains", type=int, default=d.num_chains, help="NUTS chains (>= 2)")
    parser.add_argument("--num-warmup", type=int, default=d.num_warmup, help="warmup per chain")
    parser.add_argument("--num-samples", type=int, default=d.num_samples, help="draws per chain")
    parser.add_argument(
        "--chain-method",
        choices=[m.value for m in ChainMethod],
        default=None,
        help="how chains run (default: parallel if there is a device per chain, else vectorized)",
    )
    parser.add_argument("--svi-steps", type=int, default=d.svi_steps, help="SVI steps")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help=f"subsample whole prompts above this many tokens (default: {d.max_tokens})",
    )
    parser.add_argument(
        "--num-bootstrap",
        type=int,
        default=d.num_bootstrap,
        help="prompt-bootstrap replicates of the correlations",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed")
    parser.add_argument("--json", action="store_true", help="print fit.json instead of a summary")


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` the parsed command line describes."""
    return Config(
        run_dir=args.run_dir,
        measure=args.measure,
        num_chains=args.num_chains,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        chain_method=None if args.chain_method is None else ChainMethod(args.chain_method),
        svi_steps=args.svi_steps,
        max_tokens=args.max_tokens,
        num_bootstrap=args.num_bootstrap,
        seed=args.seed,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable report of `fit.json`."""
    lines = []
    data = summary["data"]
    lines.append(
        f"{data['num_tokens']} tokens from {data['num_prompts']} prompts "
        f"(measure {summary['measure']}); P(beta > 0) = {data['rejection_share']:.3f}"
    )
    c = summary["correlation"]
    for name in ("pearson", "spearman"):
        lo, hi = c[name]["interval"]
        lines.append(f"{name:>9}: {c[name]['estimate']:.3f}  [{lo:.3f}, {hi:.3f}]")
    ls = summary["least_squares"]
    lines.append(f"least squares: slope {ls['slope']:.4f}  intercept {ls['intercept']:.4f}")
    for model, block in (
        ("linear NUTS", summary["linear"]["nuts"]),
        ("hurdle NUTS", summary["hurdle"]["nuts"]),
    ):
        params = ", ".join(
            f"{k} {v['mean']:.4f}±{v['sd']:.4f} (r-hat {v['r_hat']:.3f}, ESS {v['ess']:.0f})"
            for k, v in block["params"].items()
        )
        lines.append(f"{model}: {params}; divergences {block['divergences']}")
    svi = summary["linear"]["svi"]["params"]
    lines.append(
        "linear SVI: " + ", ".join(f"{k} {v['mean']:.4f}±{v['sd']:.4f}" for k, v in svi.items())
    )
    comp = summary["comparison"]
    lines.append(
        f"WAIC: linear {comp['linear']['waic']:.1f}, hurdle {comp['hurdle']['waic']:.1f}; "
        f"elpd(hurdle) - elpd(linear) = {comp['elpd_difference_hurdle_minus_linear']:.1f} "
        f"± {comp['elpd_difference_se']:.1f} -> {comp['preferred']}"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm fit`; returns the exit status (2 on bad input)."""
    try:
        result = run(config_from_args(args))
    except ValueError as err:
        print(f"uhlm fit: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(result.summary))
    else:
        print(format_summary(result.summary))
        print(f"wrote {result.fit_path}")
    return 0
