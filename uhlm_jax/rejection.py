"""The rejection model: the LLM's rejection probability `β` of a draft given the SLM's
uncertainty `u`.

A U-HLM device skips a drafted token when `u` is at or below a threshold; how safe that
is depends on how `β` grows with `u`. This module holds the statistics of that relation,
as pure functions of arrays (files are the jobs' business, `uhlm fit` and
`uhlm threshold`):

* **models** (NumPyro, written as plain functions `model(u, beta=None)`):
  - `linear_gaussian`, the paper's linear-Gaussian model (U-HLM, arXiv 2412.12687,
    §III), `β ~ Normal(a·u + b, σ)` with the conjugate prior `LinearPrior`, and
    `linear_gaussian_stats`, the same likelihood in six sufficient statistics;
  - `hurdle`, a bounded model that respects `β ∈ [0, 1]` and its mass at 0,
    `P(β > 0 | u) = σ(c·u + e)` and `β | β > 0 ~ Beta(m·κ, (1 − m)·κ)` with
    `m = σ(f·u + g)`, and `hurdle_grouped`, the same likelihood summed over tokens of
    equal `u`;
* **model checks**: pointwise log likelihoods on the observed scale
  (`pointwise_log_likelihood`), PSIS-LOO and WAIC by ArviZ (`compare_models`), and
  posterior predictive checks in `u` bins (`predictive_checks`);
* **the exact posterior** of the linear model (Normal-inverse-gamma,
  `conjugate_posterior`) and **least squares** (`least_squares`), with the paper's
  thresholds of a least-squares line (`plug_in_thresholds`);
* **correlations** of `u` and `β` (`pearson`, `spearman`, and `correlations` with
  prompt-bootstrap intervals) and the **AUROC** of `u` for `β > 0` (`auroc`).

The thresholds and risks that a fitted model implies are in `uhlm_jax.threshold`.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import numpyro
import numpyro.distributions as dist
from jax.scipy.stats import norm

from uhlm_jax import threshold
from uhlm_jax.threshold import BETA_POSITIVE_TOL
from uhlm_jax.types import Array, ArrayLike, Float, Int

__all__ = [
    "BETA_CLIP",
    "BOOTSTRAP_LEVEL",
    "HURDLE_PROMPT_SITES",
    "HURDLE_SITES",
    "LINEAR_PROMPT_SITES",
    "LINEAR_SITES",
    "PPC_DRAWS",
    "PROMPT_EFFECTS",
    "QUADRATURE_NODES",
    "ConjugatePosterior",
    "HurdleGroups",
    "HurdlePrior",
    "LinearPrior",
    "LinearStats",
    "ModelScore",
    "PlugInThresholds",
    "auroc",
    "average_ranks",
    "compare_models",
    "conjugate_posterior",
    "correlations",
    "hurdle",
    "hurdle_grouped",
    "hurdle_groups",
    "hurdle_pointwise_loglik",
    "hurdle_positive_loglik",
    "hurdle_prompt_groups",
    "hurdle_prompt_loglik",
    "hurdle_prompts",
    "hurdle_value_loglik",
    "least_squares",
    "linear_gaussian",
    "linear_gaussian_prompts",
    "linear_gaussian_stats",
    "linear_pointwise_loglik",
    "linear_prompt_loglik",
    "linear_stats",
    "log_marginal_over_effect",
    "new_prompt_draws",
    "pearson",
    "plug_in_thresholds",
    "pointwise_log_likelihood",
    "predictive_checks",
    "prompt_linear_stats",
    "prompt_log_likelihood",
    "replicate_hurdle",
    "replicate_linear",
    "sample_conjugate",
    "spearman",
    "thin_draws",
]

# Sample sites of the posterior draws of each model.
LINEAR_SITES = ("slope", "intercept", "sigma")
HURDLE_SITES = (
    "positive_slope",
    "positive_intercept",
    "mean_slope",
    "mean_intercept",
    "concentration",
)
# ... and of the models with prompt effects (their per-prompt `z` are not kept).
LINEAR_PROMPT_SITES = (*LINEAR_SITES, "prompt_sd")
HURDLE_PROMPT_SITES = (*HURDLE_SITES, "positive_prompt_sd", "mean_prompt_sd")

# Positive β are clipped into (0, 1) before the Beta log density, which is infinite at
# β = 1 (an LLM probability that underflowed to 0) for concentrations below 1.
BETA_CLIP = 1e-6
# Posterior draws used for the predictive checks and tokens per log-likelihood chunk.
PPC_DRAWS = 100
LOGLIK_CHUNK = 4096
# Central mass of the bootstrap intervals of the correlations.
BOOTSTRAP_LEVEL = 0.95
# Bootstrap replicates computed together (bounds memory to this many copies of the tokens).
BOOTSTRAP_BATCH = 32


@dataclasses.dataclass(frozen=True)
class LinearPrior:
    """Conjugate prior of the linear-Gaussian model.

    `σ² ~ InvGamma(shape, rate)`; `a, b | σ ~ Normal(0, scale·σ)` independently.
    The defaults put the prior median of `σ` near 0.2 with a heavy right tail and
    the prior sd of `a` and `b` near 2 for that `σ`: weak for `β, u ∈ [0, 1]`.
    With prompt effects (`linear_gaussian_prompts`) the between-prompt sd of the
    intercept is `τ ~ HalfNormal(prompt_scale)`.
    """

    scale: float = 10.0
    shape: float = 2.0
    rate: float = 0.05
    prompt_scale: float = 0.5

    def __post_init__(self):
        for name in ("scale", "shape", "rate", "prompt_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"LinearPrior.{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class HurdlePrior:
    """Weakly informative prior of the hurdle model.

    Logistic slopes and intercepts `c, e, f, g ~ Normal(0, logit_scale)`;
    the Beta concentration `κ ~ LogNormal(log(concentration_median),
    concentration_log_sd)`. With prompt effects (`hurdle_prompts`) the between-prompt
    sds of the two logit intercepts are `~ HalfNormal(prompt_scale)`.
    """

    logit_scale: float = 5.0
    concentration_median: float = 5.0
    concentration_log_sd: float = 1.5
    prompt_scale: float = 1.0

    def __post_init__(self):
        for name in ("logit_scale", "concentration_median", "concentration_log_sd",
                     "prompt_scale"):
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


def prompt_linear_stats(
    u: np.ndarray, beta: np.ndarray, prompt: np.ndarray, num_prompts: int
) -> LinearStats:
    """`LinearStats` of each prompt's tokens, `(P,)` per field, centred per prompt
    (float64 sums, float32 storage; a prompt without tokens has all zeros)."""
    u = np.asarray(u, np.float64)
    beta = np.asarray(beta, np.float64)

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(prompt, weights=w, minlength=num_prompts)

    n = total(np.ones_like(u))
    safe_n = np.maximum(n, 1.0)
    u_mean, beta_mean = total(u) / safe_n, total(beta) / safe_n
    uc, bc = u - u_mean[prompt], beta - beta_mean[prompt]
    fields = (n, u_mean, beta_mean, total(uc * uc), total(uc * bc), total(bc * bc))
    return LinearStats(*(x.astype(np.float32) for x in fields))


def linear_gaussian_prompts(stats: LinearStats, prior: LinearPrior = LinearPrior()) -> None:
    """The linear-Gaussian model with a random intercept per prompt (non-centred).

    Prompt `j`'s tokens have `β ~ Normal(a·u + b + τ·z_j, σ)`, `z_j ~ Normal(0, 1)`,
    with the between-prompt sd `τ ~ HalfNormal(prior.prompt_scale)` and the prior of
    `linear_gaussian` on `a, b, σ`. The likelihood is written in each prompt's
    sufficient statistics (`prompt_linear_stats`), as in `linear_gaussian_stats`.

    Args:
      stats: `LinearStats` with `(P,)` fields, one entry per prompt.
      prior: the prior.
    """
    sigma_sq = numpyro.sample("sigma_sq", dist.InverseGamma(prior.shape, prior.rate))
    sigma = numpyro.deterministic("sigma", jnp.sqrt(sigma_sq))
    slope = numpyro.sample("slope", dist.Normal(0.0, prior.scale * sigma))
    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior.scale * sigma))
    prompt_sd = numpyro.sample("prompt_sd", dist.HalfNormal(prior.prompt_scale))
    with numpyro.plate("prompts", stats.n.shape[0]):
        z = numpyro.sample("prompt_z", dist.Normal(0.0, 1.0))
    offset = intercept + prompt_sd * z
    rss = (
        stats.sbb
        - 2.0 * slope * stats.sub
        + slope**2 * stats.suu
        + stats.n * (stats.beta_mean - slope * stats.u_mean - offset) ** 2
    )
    log_norm = -0.5 * jnp.sum(stats.n) * jnp.log(2 * jnp.pi * sigma_sq)
    numpyro.factor("beta", -0.5 * jnp.sum(rss) / sigma_sq + log_norm)


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


def _grouped(key: np.ndarray, u: np.ndarray, beta: np.ndarray) -> tuple[HurdleGroups, np.ndarray]:
    """`HurdleGroups` of the tokens sharing each value of `key`, and each group's first
    token (float64 sums, float32 storage)."""
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    beta = np.asarray(beta, np.float64)
    positive = beta > BETA_POSITIVE_TOL
    clipped = np.clip(beta, BETA_CLIP, 1 - BETA_CLIP)
    g = first.size

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=w, minlength=g).astype(np.float32)

    groups = HurdleGroups(
        u=np.asarray(u, np.float32)[first],
        count=total(np.ones_like(beta)),
        positive=total(positive.astype(np.float64)),
        sum_log_beta=total(np.where(positive, np.log(clipped), 0.0)),
        sum_log1m_beta=total(np.where(positive, np.log1p(-clipped), 0.0)),
    )
    return groups, first


def hurdle_groups(u: np.ndarray, beta: np.ndarray) -> HurdleGroups:
    """`HurdleGroups` of a sample, summed in float64, stored as float32."""
    return _grouped(np.asarray(u, np.float32), u, beta)[0]


def hurdle_prompt_groups(
    u: np.ndarray, beta: np.ndarray, prompt: np.ndarray
) -> tuple[HurdleGroups, np.ndarray]:
    """Tokens grouped by prompt and value of `u` (`hurdle_prompts`' exact statistics).

    Args:
      u, beta: `(n,)` tokens.
      prompt: `(n,)` prompt index of each token.

    Returns:
      The `(g,)` groups and the `(g,)` int32 prompt of each group.
    """
    _, u_index = np.unique(np.asarray(u, np.float32), return_inverse=True)
    prompt = np.asarray(prompt, np.int64)
    groups, first = _grouped(prompt * (int(u_index.max()) + 1) + u_index, u, beta)
    return groups, prompt[first].astype(np.int32)


def _hurdle_group_factors(
    groups: HurdleGroups, logits: Array, mean_logits: Array, kappa: Array
) -> None:
    """The hurdle likelihood of `groups`, given each group's two logits."""
    numpyro.factor(
        "positive",
        jnp.sum(
            groups.positive * jax.nn.log_sigmoid(logits)
            + (groups.count - groups.positive) * jax.nn.log_sigmoid(-logits)
        ),
    )
    mean = jax.nn.sigmoid(mean_logits)
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


def hurdle_grouped(groups: HurdleGroups, prior: HurdlePrior = HurdlePrior()) -> None:
    """`hurdle` with its likelihood summed within groups of equal `u` (same density)."""
    c, e, f, g, kappa = _hurdle_params(prior)
    _hurdle_group_factors(groups, c * groups.u + e, f * groups.u + g, kappa)


def hurdle_prompts(
    groups: HurdleGroups,
    group_prompt: Int[Array, " g"],
    num_prompts: int,
    prior: HurdlePrior = HurdlePrior(),
) -> None:
    """The hurdle model with a random intercept per prompt in each logit (non-centred).

    Prompt `j` has `P(β > 0 | u) = σ(c·u + e + s_p·z_j)` and Beta mean
    `σ(f·u + g + s_m·w_j)`, with `z_j, w_j ~ Normal(0, 1)` and the between-prompt sds
    `s_p, s_m ~ HalfNormal(prior.prompt_scale)`; the likelihood is summed within groups
    of one prompt and one value of `u` (`hurdle_prompt_groups`), which is exact.

    Args:
      groups: `(g,)` groups of equal prompt and `u`.
      group_prompt: `(g,)` prompt of each group, in `[0, num_prompts)`.
      num_prompts: `P`, static.
      prior: the prior.
    """
    c, e, f, g, kappa = _hurdle_params(prior)
    positive_sd = numpyro.sample("positive_prompt_sd", dist.HalfNormal(prior.prompt_scale))
    mean_sd = numpyro.sample("mean_prompt_sd", dist.HalfNormal(prior.prompt_scale))
    with numpyro.plate("prompts", num_prompts):
        z = numpyro.sample("positive_prompt_z", dist.Normal(0.0, 1.0))
        w = numpyro.sample("mean_prompt_z", dist.Normal(0.0, 1.0))
    _hurdle_group_factors(
        groups,
        c * groups.u + e + positive_sd * z[group_prompt],
        f * groups.u + g + mean_sd * w[group_prompt],
        kappa,
    )


# --- pointwise likelihoods and model comparison -------------------------------


def _beta_log_density(a: Array, b: Array, total: Array, x: Array) -> Array:
    """`log Beta(x; a, b)` with `total = a + b`, written out in `gammaln`."""
    gammaln = jax.scipy.special.gammaln
    return gammaln(total) - gammaln(a) - gammaln(b) + (a - 1) * jnp.log(x) + (b - 1) * jnp.log1p(-x)


def linear_pointwise_loglik(
    params: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    offset: Float[ArrayLike, "*n"] = 0.0,
) -> Float[Array, " n"]:
    """Per-token log likelihood of the linear model on the observed scale, one draw.

    The observed `β = clip(β*, 0, 1)` of the latent `β* ~ Normal(a·u + b + offset, σ)`:
    `log Φ(−μ/σ)` at `β = 0`, `log Φ((μ − 1)/σ)` at `β = 1`, the Normal log
    density in between. `offset` is a prompt's intercept effect (0 for the pooled model).
    """
    mu = params["slope"] * u + params["intercept"] + offset
    sigma = params["sigma"]
    at_zero = beta <= BETA_POSITIVE_TOL
    at_one = beta >= 1 - BETA_CLIP
    inside = norm.logpdf(beta, mu, sigma)
    return jnp.where(
        at_zero, norm.logcdf(-mu / sigma), jnp.where(at_one, norm.logcdf((mu - 1) / sigma), inside)
    )


def hurdle_positive_loglik(
    params: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    offset: Float[ArrayLike, "*n"] = 0.0,
) -> Float[Array, " n"]:
    """Per-token log likelihood of the hurdle's first part, whether `β > 0`, one draw;
    `offset` shifts the logit (a prompt's effect)."""
    logits = params["positive_slope"] * u + params["positive_intercept"] + offset
    return jnp.where(
        beta > BETA_POSITIVE_TOL, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    )


def hurdle_value_loglik(
    params: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    offset: Float[ArrayLike, "*n"] = 0.0,
) -> Float[Array, " n"]:
    """Per-token log likelihood of the hurdle's second part, the Beta law of a positive
    `β` (0 where `β = 0`), one draw; `offset` shifts the mean's logit."""
    mean = jax.nn.sigmoid(params["mean_slope"] * u + params["mean_intercept"] + offset)
    kappa = params["concentration"]
    positive = beta > BETA_POSITIVE_TOL
    value = jnp.where(positive, jnp.clip(beta, BETA_CLIP, 1 - BETA_CLIP), 0.5)
    return jnp.where(
        positive, _beta_log_density(mean * kappa, (1 - mean) * kappa, kappa, value), 0.0
    )


def hurdle_pointwise_loglik(
    params: dict[str, Array], u: Float[Array, " n"], beta: Float[Array, " n"]
) -> Float[Array, " n"]:
    """Per-token log likelihood of the hurdle model, one draw (as `hurdle` scores it)."""
    return hurdle_positive_loglik(params, u, beta) + hurdle_value_loglik(params, u, beta)


# Gauss-Hermite nodes of the integral over a prompt's effect, and Newton steps that
# centre them on each prompt's mode (adaptive quadrature).
QUADRATURE_NODES = 20
NEWTON_STEPS = 8


def log_marginal_over_effect(
    token_loglik: Callable[[Array], Array],
    prompt: Int[Array, " n"],
    num_prompts: int,
) -> Float[Array, " P"]:
    """`log ∫ Π_{t ∈ j} p(β_t | x) φ(x) dx` for every prompt `j`, by adaptive
    Gauss-Hermite quadrature.

    A prompt's standardised effect `x ~ Normal(0, 1)` enters its tokens' likelihood
    only through `token_loglik`. Newton steps find each prompt's mode `m` and curvature
    `h` of `f(x) = Σ_t log p(β_t | x) − x²/2`; the nodes `m + t_q/√(−h)` then carry
    `log ∫ e^f dx/√(2π) ≈ log s + logsumexp_q(log w_q + f(m + s t_q) + t_q²/2)`
    (Liu & Pierce 1994), exact for a Gaussian `f` with `QUADRATURE_NODES ≥ 1`.

    Args:
      token_loglik: `(P,)` standardised effects -> `(n,)` per-token log likelihood,
        each token reading its own prompt's effect.
      prompt: `(n,)` prompt of each token.
      num_prompts: `P`, static.

    Returns:
      `(P,)` log marginal likelihood of each prompt's tokens (0 for a prompt without
      tokens).
    """

    def f(x: Array) -> Array:
        per_prompt = jax.ops.segment_sum(token_loglik(x), prompt, num_segments=num_prompts)
        return per_prompt - 0.5 * x**2

    grad = jax.grad(lambda x: jnp.sum(f(x)))

    def curvature(x: Array) -> tuple[Array, Array]:
        # f is separable in the prompts, so its Hessian is diagonal: H·1 = diag(H).
        g, h = jax.jvp(grad, (x,), (jnp.ones_like(x),))
        return g, jnp.minimum(h, -1.0)  # the prior alone gives −1; guard non-concavity

    def newton(x: Array, _) -> tuple[Array, None]:
        g, h = curvature(x)
        return x - jnp.clip(g / h, -2.0, 2.0), None

    mode, _ = jax.lax.scan(newton, jnp.zeros(num_prompts), None, length=NEWTON_STEPS)
    _, h = curvature(mode)
    scale = 1.0 / jnp.sqrt(-h)
    nodes, weights = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    log_w = jnp.asarray(np.log(weights / math.sqrt(2 * math.pi)) + nodes**2 / 2, jnp.float32)
    at_nodes = jax.vmap(lambda t: f(mode + scale * t))(jnp.asarray(nodes, jnp.float32))
    return jnp.log(scale) + jax.nn.logsumexp(at_nodes + log_w[:, None], axis=0)


def linear_prompt_loglik(
    params: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    prompt: Int[Array, " n"],
    num_prompts: int,
) -> Float[Array, " P"]:
    """Per-prompt log likelihood of a linear model, one draw, on the observed scale.

    With a `prompt_sd` in `params` (`linear_gaussian_prompts`) the prompt's intercept
    effect is integrated out (`log_marginal_over_effect`): the likelihood of a prompt
    left out. Without it (`linear_gaussian`), the sum of its tokens' log likelihoods.
    """
    if "prompt_sd" not in params:
        ll = linear_pointwise_loglik(params, u, beta)
        return jax.ops.segment_sum(ll, prompt, num_segments=num_prompts)
    return log_marginal_over_effect(
        lambda x: linear_pointwise_loglik(params, u, beta, params["prompt_sd"] * x[prompt]),
        prompt,
        num_prompts,
    )


def hurdle_prompt_loglik(
    params: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    prompt: Int[Array, " n"],
    num_prompts: int,
) -> Float[Array, " P"]:
    """Per-prompt log likelihood of a hurdle model, one draw.

    With prompt sds in `params` (`hurdle_prompts`) each of the two independent
    effects is integrated out of its own part of the likelihood; without them, the sum
    of the tokens' log likelihoods.
    """
    if "positive_prompt_sd" not in params:
        ll = hurdle_pointwise_loglik(params, u, beta)
        return jax.ops.segment_sum(ll, prompt, num_segments=num_prompts)
    positive = log_marginal_over_effect(
        lambda x: hurdle_positive_loglik(
            params, u, beta, params["positive_prompt_sd"] * x[prompt]
        ),
        prompt,
        num_prompts,
    )
    value = log_marginal_over_effect(
        lambda x: hurdle_value_loglik(params, u, beta, params["mean_prompt_sd"] * x[prompt]),
        prompt,
        num_prompts,
    )
    return positive + value


def prompt_log_likelihood(
    loglik,
    draws: dict[str, Array],
    u: Float[Array, " n"],
    beta: Float[Array, " n"],
    prompt: Int[Array, " n"],
    num_prompts: int,
) -> np.ndarray:
    """Every draw's per-prompt log likelihood: the `log_likelihood` group of a
    leave-one-prompt-out PSIS-LOO.

    Args:
      loglik: `(params, u, beta, prompt, num_prompts) -> (P,)` for one draw, e.g.
        `linear_prompt_loglik`.
      draws: site -> `(chains, draws)` posterior draws.
      u, beta: `(n,)` data; prompt: `(n,)` prompt of each token.
      num_prompts: `P`.

    Returns:
      `(chains, draws, P)` float32.
    """
    chains, num_draws = np.shape(next(iter(draws.values())))
    flat = {k: jnp.asarray(v, jnp.float32).reshape(-1) for k, v in draws.items()}
    data = (
        jnp.asarray(u, jnp.float32),
        jnp.asarray(beta, jnp.float32),
        jnp.asarray(prompt, jnp.int32),
    )

    def per_prompt(flat, data):
        return jax.lax.map(lambda d: loglik(d, *data, num_prompts), flat)

    # Draws are arguments, not closed-over constants, which XLA would try to fold.
    ll = np.asarray(jax.jit(per_prompt)(flat, data))
    return ll.reshape(chains, num_draws, num_prompts)


def pointwise_log_likelihood(
    loglik, draws: dict[str, Array], u: Float[Array, " n"], beta: Float[Array, " n"]
) -> np.ndarray:
    """Every draw's per-token log likelihood, in token chunks.

    Args:
      loglik: `(params, u, beta) -> (n,)` for one draw, e.g. `linear_pointwise_loglik`.
      draws: site -> `(chains, draws)` posterior draws.
      u, beta: `(n,)` data.

    Returns:
      `(chains, draws, n)` float32, the `log_likelihood` group ArviZ's LOO and WAIC read.
    """
    n = u.shape[0]
    pad = (-n) % LOGLIK_CHUNK
    u_chunks = jnp.pad(jnp.asarray(u, jnp.float32), (0, pad)).reshape(-1, LOGLIK_CHUNK)
    beta_chunks = jnp.pad(jnp.asarray(beta, jnp.float32), (0, pad)).reshape(-1, LOGLIK_CHUNK)
    chains, num_draws = np.shape(next(iter(draws.values())))
    flat = {k: jnp.asarray(v, jnp.float32).reshape(-1) for k, v in draws.items()}

    def pointwise(flat, xs):
        per_draw = jax.vmap(loglik, in_axes=(0, None, None))
        return jax.lax.map(lambda c: per_draw(flat, *c), xs)  # (chunks, S, chunk)

    # Draws are arguments, not closed-over constants, which XLA would try to fold.
    ll = np.asarray(jax.jit(pointwise)(flat, (u_chunks, beta_chunks)))
    ll = np.moveaxis(ll, 0, 1).reshape(chains * num_draws, -1)[:, :n]
    return ll.reshape(chains, num_draws, n)


class ModelScore(NamedTuple):
    """One model's predictive accuracy, as ranked by `compare_models`.

    Attributes:
      name: the model.
      rank: 0 for the model that predicts best (highest `elpd_loo`).
      elpd_loo: PSIS-LOO expected log predictive density (Vehtari, Gelman, Gabry 2017).
      se: its standard error.
      p_loo: effective number of parameters.
      elpd_diff: `elpd_loo` of the best model minus this one's (0 for the best).
      dse: standard error of `elpd_diff`, from the pointwise differences.
      weight: stacking weight.
      warning: whether PSIS was unreliable (a Pareto `k` above ArviZ's bound).
      max_pareto_k: the largest Pareto `k` over the observations.
      elpd_waic, waic_se, p_waic: WAIC (Watanabe 2010) on the same log likelihood.
      waic_warning: whether a pointwise variance of the log density exceeded 0.4.
    """

    name: str
    rank: int
    elpd_loo: float
    se: float
    p_loo: float
    elpd_diff: float
    dse: float
    weight: float
    warning: bool
    max_pareto_k: float
    elpd_waic: float
    waic_se: float
    p_waic: float
    waic_warning: bool


# InferenceData is annotated as Any: it subclasses typing.Mapping, which the test-time
# annotation checks reject as a deprecated hint.
def compare_models(models: dict[str, Any]) -> tuple[ModelScore, ...]:
    """PSIS-LOO and WAIC of each model, ranked by `elpd_loo` (`az.loo`, `az.waic`,
    `az.compare` with stacking weights).

    Every model's `log_likelihood` group must score the same observations (one variable,
    `(chain, draw, observation)`). ArviZ's warnings about unreliable estimates are
    returned as the `warning` flags rather than raised; its others are about its own use
    of pandas (`sort_values(inplace=True)`, deprecated in pandas 3.1).

    Args:
      models: name -> `az.InferenceData` with `posterior` and `log_likelihood` groups.

    Returns:
      The `ModelScore`s, best first.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = {name: az.loo(data, pointwise=True) for name, data in models.items()}
        waic = {name: az.waic(data) for name, data in models.items()}
        table = az.compare(loo, ic="loo", method="stacking")
    return tuple(
        ModelScore(
            name=str(name),
            rank=int(row["rank"]),
            elpd_loo=float(row["elpd_loo"]),
            se=float(row["se"]),
            p_loo=float(row["p_loo"]),
            elpd_diff=float(row["elpd_diff"]),
            dse=float(row["dse"]),
            weight=float(row["weight"]),
            warning=bool(row["warning"]),
            max_pareto_k=float(np.max(loo[name].pareto_k)),
            elpd_waic=float(waic[name].elpd_waic),
            waic_se=float(waic[name].se),
            p_waic=float(waic[name].p_waic),
            waic_warning=bool(waic[name].warning),
        )
        for name, row in table.iterrows()
    )


# --- posterior draws and predictive checks ---------------------------------------------


def thin_draws(draws: dict[str, np.ndarray], num: int | None = None) -> dict[str, jnp.ndarray]:
    """Draws flattened over chains and thinned evenly to at most `num` (all if None).

    Args:
      draws: site -> draws of any shape, e.g. `(chains, draws)`.
      num: most draws kept per site; all if None.

    Returns:
      site -> `(m,)` float32 draws, `m = min(num, total)`.
    """
    flat = {k: v.reshape(-1) for k, v in draws.items()}
    total = next(iter(flat.values())).size
    index = np.linspace(0, total - 1, total if num is None else min(num, total)).astype(int)
    return {k: jnp.asarray(v[index], jnp.float32) for k, v in flat.items()}


# The intercept site each prompt-effect sd shifts.
PROMPT_EFFECTS = {
    "prompt_sd": "intercept",
    "positive_prompt_sd": "positive_intercept",
    "mean_prompt_sd": "mean_intercept",
}


def new_prompt_draws(rng: np.random.Generator, draws: dict[str, Any]) -> dict[str, Any]:
    """Posterior draws of the intercepts of a new prompt.

    Each draw's intercepts are shifted by a fresh prompt effect from the population,
    `sd_i · z_i` with `z_i ~ Normal(0, 1)` independently per draw and per effect, so a
    risk computed per draw carries between-prompt variation as well as the uncertainty
    about the population. Draws without prompt sds come back unchanged.

    Args:
      rng: the generator of the effects.
      draws: site -> `(m,)` posterior draws (NumPy or JAX arrays).

    Returns:
      site -> `(m,)` draws, intercepts shifted (float32 NumPy).
    """
    out = dict(draws)
    for sd, intercept in PROMPT_EFFECTS.items():
        if sd in draws:
            sd_draws = np.asarray(draws[sd], np.float32)
            z = rng.standard_normal(sd_draws.shape).astype(np.float32)
            out[intercept] = np.asarray(draws[intercept], np.float32) + sd_draws * z
    return out


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
    u: np.ndarray,
    beta: np.ndarray,
    linear_draws: dict[str, np.ndarray],
    hurdle_draws: dict[str, np.ndarray],
    num_bins: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Observed vs replicated share of `β > 0` and mean `β` in equal-width `u` bins.

    Replicates come from `PPC_DRAWS` posterior draws of each model, on the same
    `u`; each bin reports the replicated statistic's 5%, 50% and 95% quantiles
    and whether the observed value lies in that range.

    Args:
      u, beta: `(n,)` observed tokens.
      linear_draws, hurdle_draws: site -> posterior draws of each model.
      num_bins: equal-width `u` bins between the smallest and largest `u`.
      rng: the generator of the replicates.

    Returns:
      One dict per non-empty bin.
    """
    edges = np.linspace(float(u.min()), float(u.max()), num_bins + 1)
    bins = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
    thin = lambda d: {k: np.asarray(v) for k, v in thin_draws(d, PPC_DRAWS).items()}  # noqa: E731
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
    n: npt.ArrayLike,
    sum_u: npt.ArrayLike,
    sum_beta: npt.ArrayLike,
    sum_uu: npt.ArrayLike,
    sum_ubeta: npt.ArrayLike,
    sum_betabeta: npt.ArrayLike,
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


class PlugInThresholds(NamedTuple):
    """The paper's thresholds of a least-squares line, with the empirical `Δ` plugged in.

    Attributes:
      slope, intercept: least-squares `a, b` of `β ≈ a·u + b`.
      rejection_share: `Δ = P(β > 0)` (`threshold.rejection_share`).
      risk_averse: `−b/a`, raw and clipped to `[0, 1]` (`threshold.paper_threshold`);
        NaN with a reason when `a ≤ 0`, where rejection does not grow with `u`.
      risk_prone: `(Δ − b)/a`, likewise.
    """

    slope: float
    intercept: float
    rejection_share: float
    risk_averse: threshold.PaperThreshold
    risk_prone: threshold.PaperThreshold


def plug_in_thresholds(u: np.ndarray, beta: np.ndarray) -> PlugInThresholds:
    """Least-squares `a, b` and the empirical `Δ` pushed through the paper's formulas.

    Args:
      u, beta: `(n,)` uncertainties and rejection probabilities of the same tokens.

    Returns:
      The `PlugInThresholds` (U-HLM §III).
    """
    ls = least_squares(u, beta)
    share = float(threshold.rejection_share(jnp.asarray(beta, jnp.float32)))
    a, b = ls["slope"], ls["intercept"]
    return PlugInThresholds(
        slope=a,
        intercept=b,
        rejection_share=share,
        risk_averse=threshold.paper_threshold(threshold.PaperRule.RISK_AVERSE, a, b),
        risk_prone=threshold.paper_threshold(threshold.PaperRule.RISK_PRONE, a, b, share),
    )


# --- correlations and AUROC ------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Pearson's correlation of `x` and `y`, token `j` counting `weight_j` times (float64).

    Args:
      x, y: `(n,)` samples.
      weight: `(n,)` non-negative token weights; all ones if omitted.

    Returns:
      The correlation; NaN when either sample has no spread.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(x) if weight is None else np.asarray(weight, np.float64)
    total = w.sum()
    mx, my = (w @ x) / total, (w @ y) / total
    dx, dy = x - mx, y - my
    cov = w @ (dx * dy)
    denom = math.sqrt(float(w @ (dx * dx)) * float(w @ (dy * dy)))
    return float(cov / denom) if denom > 0 else float("nan")


def average_ranks(x: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Ranks of `x`, ties sharing their average (mid-) rank, token `j` counting `weight_j`
    times.

    With unit weights these are the ranks `1 … n`, e.g. `[3, 1, 3, 2] -> [3.5, 1, 3.5, 2]`;
    with integer weights, the ranks each token's value has in the sample with token `j`
    repeated `weight_j` times.

    Args:
      x: `(n,)` sample.
      weight: `(n,)` non-negative token weights; all ones if omitted.

    Returns:
      `(n,)` float64 mid-ranks.
    """
    _, group = np.unique(np.asarray(x), return_inverse=True)
    w = np.ones(group.size) if weight is None else np.asarray(weight, np.float64)
    group_weight = np.bincount(group, weights=w, minlength=int(group.max()) + 1)
    mid = np.cumsum(group_weight) - (group_weight - 1) / 2
    return mid[group]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: `pearson` of the `average_ranks` of `x` and `y`."""
    return pearson(average_ranks(x), average_ranks(y))


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for a binary `label` (Mann–Whitney U).

    `AUROC = (R₁ − n₁(n₁ + 1)/2) / (n₁ n₀)` with `R₁` the sum of the positives' average
    ranks: the probability that a random positive scores above a random negative, ties
    counting one half. NaN when a class is empty.
    """
    label = np.asarray(label, bool)
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


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
        linear = _weighted_pearson_jnp(u32, beta32, w)
        ranked = _weighted_pearson_jnp(
            _weighted_midranks(w, u_groups), _weighted_midranks(w, beta_groups), w
        )
        return jnp.stack([linear, ranked])

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
    counts = rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), num_bootstrap)
    boot = _bootstrap_correlations(u, beta, prompt, counts)
    tail = (1 - BOOTSTRAP_LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
    return {
        "pearson": {"estimate": pearson(u, beta), "interval": [float(lo[0]), float(hi[0])]},
        "spearman": {"estimate": spearman(u, beta), "interval": [float(lo[1]), float(hi[1])]},
        "level": BOOTSTRAP_LEVEL,
        "num_bootstrap": num_bootstrap,
        "resampled_unit": "prompt",
    }
