"""Skip thresholds with a stated risk, analytically or from a calibration run.

Analytic (no files): `uhlm threshold --slope A --intercept B [--delta D]` prints the
risk-averse threshold `−b/a` and, given `Δ = P(β > 0)`, the risk-prone threshold
`(Δ − b)/a` of the paper's linear rejection model `β ≈ a·u + b` (U-HLM, arXiv
2412.12687).

From a run: `uhlm threshold --run RUN_DIR --risk ε --confidence 1−δ` reads the
records and the fit (running `uhlm fit` first if `fit.json` is missing) and
writes `thresholds.json` with, on a grid of thresholds `u_th ∈ [0, 1]`:

* **analytic**: least-squares `a, b` and the empirical `Δ` pushed through the
  paper's formulas, with the realised risk of each threshold on the records;
* **posterior**: credible intervals of the risk-averse and risk-prone thresholds
  (every NUTS draw of `(a, b)`, with `Δ` drawn by a Bayesian bootstrap over
  prompts), and the risk-bounded threshold, the largest `u_th` with
  `P(R(u_th) ≤ ε | data) ≥ 1 − δ`, for the linear and the hurdle model;
  `posterior.risk_bounded` is that of the model that predicts best (highest
  PSIS-LOO elpd in `fit.json`), and `posterior.model_choice` records which and why;
* **ltt**: the distribution-free Learn-then-Test threshold (Hoeffding–Bentkus
  p-values, fixed-sequence testing, prompts as the exchangeable unit), for which
  `P(R(û_th) ≤ ε) ≥ 1 − δ` over the draw of calibration prompts, where `R` is
  the per-prompt risk `E_prompt[(1/T) Σ_t β_t 1{u_t ≤ u_th}]`;
* **validation**: over `num_splits` random prompt splits, each method is
  calibrated on one part and its realised risk measured on the other, per token
  (pooled) and per prompt; the share of splits whose realised risk exceeds `ε`
  is reported with every realised value. Per split, the linear posterior is the
  exact conjugate posterior of the NUTS model (`rejection.conjugate_posterior`), and
  the analytic thresholds are refitted by least squares.

When Learn-then-Test certifies nothing, `ltt.reason` says why and
`ltt.prompts_needed` how many calibration prompts the observed risk curve would
need. `uhlm threshold --run RUN_DIR --plan-prompts` answers that question for every
threshold, taking the run as a pilot: it reads only the records, needs no fit and
writes nothing.

Risk means the expected rejection probability of skipped tokens per generated
token, `E[β · 1{u ≤ u_th}]`. A threshold of `null` in the output means "skip
nothing": no grid point met the requirement.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS

import uhlm_jax
from calibration import fit, records
from calibration import run_dir as rd
from uhlm_jax import cli_config, console, rejection
from uhlm_jax import threshold as T

__all__ = [
    "METHODS",
    "MODELS",
    "Config",
    "Result",
    "RunData",
    "ThresholdSource",
    "add_arguments",
    "from_run",
    "main",
    "prompt_plan",
    "run",
    "split_masks",
]

# Uncertainties may exceed [0, 1] by float32 rounding only.
U_RANGE_TOL = 1e-5
# Splits evaluated per batch inside `lax.map` (bounds memory to a few splits' tokens).
SPLIT_BATCH = 8
# Posterior draws per batch for hurdle risk curves.
DRAW_BATCH = 64
METHODS = (
    "ltt", "posterior_linear", "risk_bounded", "analytic_risk_averse", "analytic_risk_prone"
)
# The posterior models, as `uhlm fit` names them.
MODELS = tuple(fit.MODEL_SITES)
# NUTS settings of the per-split refits of the model behind the risk-bounded threshold:
# one short chain with a capped tree (the split-to-split spread of the realised risk
# dwarfs the Monte Carlo error of 100 draws in P(R <= eps)).
REFIT_WARMUP = 100
REFIT_SAMPLES = 100
REFIT_TREE_DEPTH = 6


class ThresholdSource(enum.Enum):
    """Where `uhlm threshold` takes the rejection model from (the `mode` of its output)."""

    ANALYTIC = "analytic"  # a given slope and intercept
    RUN = "run"  # a run directory's records and fit
    PLAN = "plan"  # a run's records as a pilot: prompts Learn-then-Test needs


def _in_open_unit(name: str, value: Any, fix: str) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}; {fix}")


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm threshold`.

    Attributes:
      slope, intercept: `a, b` of `β ≈ a·u + b` (analytic mode; both or neither).
      delta: `Δ = P(β > 0)` for the risk-prone threshold (analytic mode, optional).
      run_dir: a run directory (run mode).
      risk: `ε`, the risk level, in (0, 1).
      confidence: `1 − δ`, in (0, 1).
      measure: the uncertainty measure; `None` takes the fit's (or the fit default).
      grid_size: thresholds `k / (grid_size − 1)` (`threshold_grid`).
      num_splits: prompt splits of the validation (at least 100).
      calibration_share: share of prompts calibrating in each split.
      num_posterior_draws: most posterior draws used (thinned evenly).
      credible_mass: central mass of the credible intervals.
      refit_splits: splits (the first ones) on which a risk-bounded threshold from a
        NUTS-fitted model is refitted and validated; the pooled linear model's exact
        posterior is refitted on every split.
      seed: seed of the splits, the bootstrap and the per-split posterior draws.
      plan_prompts: treat the run as a pilot and report, for each threshold, how many
        calibration prompts Learn-then-Test needs to certify it at `risk` and
        `confidence` if the per-prompt risk stays as observed; writes nothing.
      max_plan_prompts: the largest calibration size the plan considers.
    """

    slope: float | None = None
    intercept: float | None = None
    delta: float | None = None
    run_dir: str | None = None
    risk: float = 0.05
    confidence: float = 0.9
    measure: str | None = None
    grid_size: int = 101
    num_splits: int = 200
    calibration_share: float = 0.5
    num_posterior_draws: int = 1000
    credible_mass: float = 0.9
    refit_splits: int = 20
    seed: int = 0
    plan_prompts: bool = False
    max_plan_prompts: int = 10_000

    def __post_init__(self):
        analytic = self.slope is not None or self.intercept is not None
        if analytic and self.run_dir is not None:
            raise ValueError(
                "give either --slope/--intercept (analytic) or --run RUN_DIR, not both"
            )
        if not analytic and self.run_dir is None:
            raise ValueError("give --slope A --intercept B, or --run RUN_DIR")
        if analytic:
            if self.slope is None or self.intercept is None:
                raise ValueError(
                    f"analytic thresholds need both slope and intercept, got slope "
                    f"{self.slope!r} and intercept {self.intercept!r}"
                )
            T.check_linear_model(float(self.slope), float(self.intercept))
            if self.delta is not None and not (
                isinstance(self.delta, int | float) and 0 <= self.delta <= 1
            ):
                raise ValueError(
                    f"delta (the rejection share P(beta > 0)) must lie in [0, 1], "
                    f"got {self.delta!r}"
                )
        elif self.delta is not None:
            raise ValueError("--delta goes with --slope/--intercept; a run estimates it")
        _in_open_unit("risk", self.risk, "pass --risk EPS with 0 < EPS < 1 (e.g. 0.05)")
        _in_open_unit(
            "confidence",
            self.confidence,
            "pass --confidence 1-DELTA with 0 < 1-DELTA < 1 (e.g. 0.9)",
        )
        _in_open_unit("calibration_share", self.calibration_share, "e.g. 0.5")
        _in_open_unit("credible_mass", self.credible_mass, "e.g. 0.9")
        if self.measure is not None and not (
            isinstance(self.measure, str) and self.measure.isidentifier()
        ):
            raise ValueError(f"measure must be a measure name, got {self.measure!r}")
        _int_at_least("grid_size", self.grid_size, 2)
        _int_at_least("num_splits", self.num_splits, 100)
        _int_at_least("num_posterior_draws", self.num_posterior_draws, 10)
        _int_at_least("refit_splits", self.refit_splits, 1)
        _int_at_least("seed", self.seed, 0)
        _int_at_least("max_plan_prompts", self.max_plan_prompts, 1)
        if self.plan_prompts and self.run_dir is None:
            raise ValueError("--plan-prompts needs a pilot run: pass --run RUN_DIR")

    @property
    def source(self) -> ThresholdSource:
        if self.run_dir is None:
            return ThresholdSource.ANALYTIC
        return ThresholdSource.PLAN if self.plan_prompts else ThresholdSource.RUN

    @property
    def error_level(self) -> float:
        """`δ = 1 − confidence`."""
        return 1.0 - self.confidence


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of `uhlm threshold`: the summary, and where it was written (run mode)."""

    summary: dict[str, Any]
    path: Path | None


def _json_threshold(t: float) -> float | None:
    return None if not math.isfinite(t) else float(t)


def _interval(x: np.ndarray, mass: float) -> list[float]:
    tail = (1 - mass) / 2
    return [float(v) for v in np.quantile(x, [tail, 1 - tail])]


def _paper_block(paper: T.PaperThreshold) -> dict[str, Any]:
    """A paper threshold as JSON: the value used, the formula's raw value, and why they
    differ (`reason` is null when the formula's value lies in [0, 1])."""
    return {
        "threshold": _json_threshold(paper.threshold),
        "raw": _json_threshold(paper.raw),
        "reason": paper.reason,
    }


def analytic(cfg: Config) -> dict[str, Any]:
    """The paper's thresholds for a given linear rejection model."""
    a, b = float(cfg.slope), float(cfg.intercept)
    out = {
        "mode": ThresholdSource.ANALYTIC.value,
        "slope": a,
        "intercept": b,
        "risk_averse": _paper_block(T.paper_threshold(T.PaperRule.RISK_AVERSE, a, b)),
    }
    if cfg.delta is not None:
        out["delta"] = float(cfg.delta)
        out["risk_prone"] = _paper_block(
            T.paper_threshold(T.PaperRule.RISK_PRONE, a, b, float(cfg.delta))
        )
    return out


@dataclasses.dataclass(frozen=True)
class RunData:
    """All tokens of a run for one measure.

    Attributes:
      u, beta: `(n,)` float32.
      prompt: `(n,)` prompt index `0 … P−1`.
      num_prompts: `P`.
    """

    u: np.ndarray
    beta: np.ndarray
    prompt: np.ndarray
    num_prompts: int


def _load_data(df, measure: str) -> RunData:
    column = records.MEASURE_PREFIX + measure
    if column not in df.columns:
        raise ValueError(
            f"measure {measure!r} is not in the records (no column {column!r}); "
            f"recorded measures: {records.measure_names(df.columns)}"
        )
    u = df[column].to_numpy(np.float32)
    beta = df["beta"].to_numpy(np.float32)
    if not (np.isfinite(u).all() and np.isfinite(beta).all()):
        raise ValueError(f"records have non-finite {column} or beta; fix or re-collect them")
    if u.min() < -U_RANGE_TOL or u.max() > 1 + U_RANGE_TOL:
        raise ValueError(
            f"measure {measure!r} ranges over [{u.min():.4g}, {u.max():.4g}]; thresholds "
            "need an uncertainty in [0, 1]: pick a normalised measure with --measure"
        )
    _, prompt = np.unique(df["prompt_id"].to_numpy(), return_inverse=True)
    num_prompts = int(prompt.max()) + 1
    if num_prompts < 2:
        raise ValueError(
            f"the run has {num_prompts} prompt; split validation needs at least 2, collect more"
        )
    return RunData(
        u=np.clip(u, 0.0, 1.0),
        beta=np.clip(beta, 0.0, 1.0),
        prompt=prompt.astype(np.int32),
        num_prompts=num_prompts,
    )


def _ensure_fit(cfg: Config, run_dir: Path) -> tuple[fit.Posterior, str]:
    """The run's posterior, fitting it first if `fit.json` is missing."""
    fit_path = run_dir / rd.FIT_FILE
    if not fit_path.exists():
        measure = cfg.measure or fit.Config(run_dir=str(run_dir)).measure
        fit.run(fit.Config(run_dir=str(run_dir), measure=measure, seed=cfg.seed))
    posterior = fit.load_posterior(run_dir)
    fitted = posterior.fit.measure
    if cfg.measure is not None and cfg.measure != fitted:
        raise ValueError(
            f"{fit_path} was fitted for measure {fitted!r}, not {cfg.measure!r}; run "
            f"`uhlm fit {run_dir} --measure {cfg.measure}` first"
        )
    return posterior, fitted


def _empirical(u: jnp.ndarray, beta: jnp.ndarray, t: float) -> dict[str, float]:
    risk = T.empirical_risk(u, beta, jnp.float32(t))
    return {
        "per_token": float(risk.per_token),
        "given_skip": float(risk.given_skip),
        "skip_rate": float(risk.skip_rate),
    }


def _bounded_summary(
    curves: jnp.ndarray, grid: jnp.ndarray, cfg: Config, u: jnp.ndarray, beta: jnp.ndarray
) -> dict[str, Any]:
    index = int(T.risk_bounded_index(curves, jnp.float32(cfg.risk), jnp.float32(cfg.error_level)))
    out: dict[str, Any] = {"threshold": None, "probability_within_risk": None}
    if index >= 0:
        t = float(grid[index])
        at = np.asarray(curves[:, index])
        out = {
            "threshold": t,
            "probability_within_risk": float(np.mean(at <= cfg.risk)),
            "posterior_risk": {
                "mean": float(at.mean()),
                "interval": _interval(at, cfg.credible_mass),
            },
            "empirical": _empirical(u, beta, t),
        }
    return out


_PROMPT_MODELS = ("linear_prompt", "hurdle_prompt")
_LINEAR_FAMILY = ("linear", "linear_prompt")


@jax.jit
def _linear_curves(
    slope: jnp.ndarray, intercept: jnp.ndarray, sample: T.WeightedSample, grid: jnp.ndarray
) -> jnp.ndarray:
    return jax.vmap(T.linear_risk_curve, in_axes=(0, 0, None, None))(
        slope, intercept, sample, grid
    )


@jax.jit
def _hurdle_curves(
    draws: dict[str, jnp.ndarray], values: jnp.ndarray, counts: jnp.ndarray, grid: jnp.ndarray
) -> jnp.ndarray:
    def curve(d):
        mean = T.hurdle_mean(
            d["positive_slope"],
            d["positive_intercept"],
            d["mean_slope"],
            d["mean_intercept"],
            values,
        )
        return T.risk_curve(mean, values, grid, counts)

    return jax.lax.map(curve, draws, batch_size=DRAW_BATCH)


def _risk_curves(
    model: str,
    draws: dict[str, Any],
    u: np.ndarray,
    grid: jnp.ndarray,
    weight: np.ndarray | None = None,
) -> jnp.ndarray:
    """`(m, p)` risk curves of a model's draws over the (weighted) law of `u`.

    Linear models: the exact `T.linear_risk_curve`. Hurdle models: `E[β | u]` on the
    distinct values of `u`, weighted by their token counts (exact). Draws of a model with
    prompt effects should carry a new prompt's intercepts (`rejection.new_prompt_draws`).
    """
    draws = {k: jnp.asarray(v, jnp.float32) for k, v in draws.items()}
    weight = np.ones_like(u) if weight is None else weight
    if model in _LINEAR_FAMILY:
        sample = T.weighted_sample(jnp.asarray(u), jnp.asarray(weight, jnp.float32))
        return _linear_curves(draws["slope"], draws["intercept"], sample, grid)
    values, index = np.unique(u, return_inverse=True)
    counts = np.bincount(index, weights=weight, minlength=values.size)
    return _hurdle_curves(
        {k: draws[k] for k in rejection.HURDLE_SITES},
        jnp.asarray(values, jnp.float32),
        jnp.asarray(counts, jnp.float32),
        grid,
    )


def _masked_model(model: str, data: RunData, fitted: rd.Fit) -> tuple[Any, Any]:
    """A NUTS-fitted model of `uhlm fit` on the prompts of a 0/1 mask:
    `(model_fn, mask -> its statistics)`.

    The likelihoods are sums of statistics linear in the token weights, so zeroing a
    prompt's statistics removes its tokens exactly, at fixed shapes (each split refits
    without recompiling). A masked prompt's effect keeps its prior.
    """
    hurdle_prior = fitted.hurdle_prior or rejection.HurdlePrior()
    if model == "linear_prompt":
        stats = rejection.prompt_linear_stats(data.u, data.beta, data.prompt, data.num_prompts)
        weighted = ("n", "suu", "sub", "sbb")
        return functools.partial(
            rejection.linear_gaussian_prompts, prior=fitted.linear_prior or rejection.LinearPrior()
        ), lambda mask: stats._replace(**{f: getattr(stats, f) * mask for f in weighted})
    groups, group_prompt = rejection.hurdle_prompt_groups(data.u, data.beta, data.prompt)
    summed = ("count", "positive", "sum_log_beta", "sum_log1m_beta")

    def masked(mask: np.ndarray) -> rejection.HurdleGroups:
        w = mask[group_prompt].astype(np.float32)
        return groups._replace(**{f: getattr(groups, f) * w for f in summed})

    if model == "hurdle_prompt":
        return functools.partial(
            rejection.hurdle_prompts,
            group_prompt=jnp.asarray(group_prompt),
            num_prompts=data.num_prompts,
            prior=hurdle_prior,
        ), masked
    # The pooled hurdle needs only groups of equal u: the masked prompt groups summed.
    values, u_group = np.unique(groups.u, return_inverse=True)

    def masked_pooled(mask: np.ndarray) -> rejection.HurdleGroups:
        per_prompt = masked(mask)
        return rejection.HurdleGroups(
            u=values,
            **{f: np.bincount(u_group, weights=getattr(per_prompt, f), minlength=values.size)
               .astype(np.float32) for f in summed},
        )  # fmt: skip

    return functools.partial(rejection.hurdle_grouped, prior=hurdle_prior), masked_pooled


def _refit_thresholds(
    cfg: Config, data: RunData, model: str, fitted: rd.Fit, masks: np.ndarray, grid: jnp.ndarray,
    quiet: bool,
) -> np.ndarray:
    """`(S,)` risk-bounded thresholds of `model` refitted by NUTS on each split's
    calibration prompts (`REFIT_WARMUP` + `REFIT_SAMPLES`, one chain), with progress
    unless `quiet`."""
    model_fn, masked = _masked_model(model, data, fitted)
    mcmc = MCMC(
        NUTS(model_fn, max_tree_depth=REFIT_TREE_DEPTH),
        num_warmup=REFIT_WARMUP,
        num_samples=REFIT_SAMPLES,
        num_chains=1,
        progress_bar=False,
        jit_model_args=True,
    )
    key = jax.random.key(cfg.seed)
    rng = np.random.default_rng((cfg.seed, 8))
    eps, delta = jnp.float32(cfg.risk), jnp.float32(cfg.error_level)
    out = np.empty(len(masks))
    splits = console.progress(masks, desc=f"threshold: refit {model} by NUTS", unit="split",
                              quiet=quiet)
    for k, mask in enumerate(splits):
        stats = jax.tree.map(jnp.asarray, masked(mask.astype(np.float32)))
        mcmc.run(jax.random.fold_in(key, k), stats)
        samples = mcmc.get_samples()
        draws = rejection.new_prompt_draws(
            rng, {s: np.asarray(samples[s]) for s in fit.MODEL_SITES[model]}
        )
        curves = _risk_curves(model, draws, data.u, grid, weight=mask[data.prompt])
        out[k] = float(T.grid_threshold(grid, T.risk_bounded_index(curves, eps, delta)))
    return out


def _posterior(
    cfg: Config, posterior: fit.Posterior, data: RunData, grid: jnp.ndarray
) -> dict[str, Any]:
    best = _best_model(posterior.fit)
    u, beta = jnp.asarray(data.u), jnp.asarray(data.beta)
    linear = rejection.thin_draws(posterior.linear, cfg.num_posterior_draws)
    num_draws = linear["slope"].shape[0]
    # Bayesian bootstrap of Δ over prompts, one Dirichlet weight vector per draw.
    tokens = np.bincount(data.prompt, minlength=data.num_prompts)
    positives = np.bincount(
        data.prompt, weights=data.beta > T.BETA_POSITIVE_TOL, minlength=data.num_prompts
    )
    dirichlet = np.random.default_rng((cfg.seed, 4)).dirichlet(np.ones(data.num_prompts), num_draws)
    delta_draws = jnp.asarray(dirichlet @ positives / (dirichlet @ tokens), jnp.float32)
    averse = np.asarray(jax.vmap(T.risk_averse)(linear["slope"], linear["intercept"]))
    prone = np.asarray(jax.vmap(T.risk_prone)(linear["slope"], linear["intercept"], delta_draws))
    slope_draws = np.asarray(linear["slope"], np.float64)
    intercept_draws = np.asarray(linear["intercept"], np.float64)
    new_prompt_rng = np.random.default_rng((cfg.seed, 7))
    curves = {
        model: _risk_curves(
            model,
            rejection.new_prompt_draws(
                new_prompt_rng,
                rejection.thin_draws(posterior.draws(model), cfg.num_posterior_draws),
            ),
            data.u,
            grid,
        )
        for model in MODELS
    }
    out = {
        "num_draws": num_draws,
        "credible_mass": cfg.credible_mass,
        "linear": {
            "risk_averse": {
                "mean": float(averse.mean()),
                "interval": _interval(averse, cfg.credible_mass),
                "clipped": _clipped_shares(slope_draws, intercept_draws, 0.0),
            },
            "risk_prone": {
                "mean": float(prone.mean()),
                "interval": _interval(prone, cfg.credible_mass),
                "clipped": _clipped_shares(
                    slope_draws, intercept_draws, np.asarray(delta_draws, np.float64)
                ),
            },
            "rejection_share": {
                "mean": float(delta_draws.mean()),
                "interval": _interval(np.asarray(delta_draws), cfg.credible_mass),
                "method": "Bayesian bootstrap over prompts",
            },
            "risk_bounded": _bounded_summary(curves["linear"], grid, cfg, u, beta),
            "curve": _curve_summary(curves["linear"], cfg),
        },
        **{
            model: {
                "risk_bounded": _bounded_summary(curves[model], grid, cfg, u, beta),
                "curve": _curve_summary(curves[model], cfg),
            }
            for model in MODELS
            if model != "linear"
        },
        "risk": {
            model: "risk of a new prompt's tokens: a fresh prompt effect per posterior draw"
            if model in _PROMPT_MODELS
            else "risk per token, prompts pooled"
            for model in MODELS
        },
    }
    out["model_choice"] = {
        "model": best,
        "rule": "highest elpd_loo (PSIS-LOO) in fit.json's comparison",
        "comparison": [score._asdict() for score in posterior.fit.comparison.table],
    }
    out["risk_bounded"] = {**out[best]["risk_bounded"], "model": best}
    return out


def _best_model(fitted: rd.Fit) -> str:
    """The model of `fit.json` that predicts best (its comparison's `best`)."""
    if fitted.comparison is None:
        raise ValueError(
            f"{rd.FIT_FILE} has no PSIS-LOO model comparison (an older uhlm fit wrote it); "
            "rerun `uhlm fit RUN_DIR`"
        )
    return fitted.comparison.best


def _clipped_shares(slope: np.ndarray, intercept: np.ndarray, level) -> dict[str, float]:
    """Shares of posterior draws whose `(level − b)/a` leaves [0, 1] (or has `a ≤ 0`)."""
    rising = slope > 0
    raw = (level - intercept) / np.where(rising, slope, 1.0)
    return {
        "below_0": float(np.mean(rising & (raw < 0))),
        "above_1": float(np.mean(rising & (raw > 1))),
        "slope_not_positive": float(np.mean(~rising)),
    }


def _curve_summary(curves: jnp.ndarray, cfg: Config) -> dict[str, list[float]]:
    """Posterior mean risk and `P(R ≤ ε | data)` at every grid threshold, for plots."""
    curves = np.asarray(curves)
    return {
        "risk_mean": [float(x) for x in curves.mean(0)],
        "probability_within_risk": [float(x) for x in (curves <= cfg.risk).mean(0)],
    }


def _ltt_plan(
    cfg: Config, ltt: T.LTTResult, grid: jnp.ndarray, skip_rate: jnp.ndarray
) -> dict[str, Any]:
    """Prompts Learn-then-Test needs for each threshold at the observed risk curve.

    `steps` is the staircase of `T.ltt_prompts_needed`: for each calibration size at
    which the certified threshold grows, that size and the threshold it reaches.
    """
    needed = np.asarray(
        jax.jit(T.ltt_prompts_needed, static_argnums=3)(
            ltt.risk_hat, jnp.float32(cfg.risk), jnp.float32(cfg.error_level),
            cfg.max_plan_prompts,
        )
    )  # fmt: skip
    steps = []
    for k in range(needed.size):
        last_at_size = k + 1 == needed.size or needed[k + 1] != needed[k]
        if needed[k] > 0 and last_at_size:
            steps.append(
                {
                    "prompts": int(needed[k]),
                    "threshold": float(grid[k]),
                    "skip_rate": float(skip_rate[k]),
                    "risk_hat": float(ltt.risk_hat[k]),
                }
            )
    return {
        "pilot_prompts": int(ltt.num_prompts),
        "max_prompts": cfg.max_plan_prompts,
        "prompts_to_certify_any": int(needed[0]) if needed[0] > 0 else None,
        "assumption": "the mean per-prompt risk of the calibration prompts equals the "
        "pilot's at every threshold; a new sample scatters around it, so at the stated "
        "size certification succeeds about half the time",
        "steps": steps,
        "prompts_needed": [int(x) if x > 0 else None for x in needed],
    }


def _ltt_reason(cfg: Config, ltt: T.LTTResult, grid: jnp.ndarray, plan: dict) -> str:
    """Why Learn-then-Test certified nothing, and what would certify."""
    first, risk0, pvalue0 = float(grid[0]), float(ltt.risk_hat[0]), float(ltt.pvalues[0])
    n = int(ltt.num_prompts)
    if risk0 >= cfg.risk:
        return (
            f"the observed risk at the smallest threshold u_th = {first:.4g} is {risk0:.4f} "
            f">= eps = {cfg.risk:g}: no number of prompts certifies a threshold at this eps"
        )
    needed = plan["prompts_to_certify_any"]
    would = (
        f"the observed risk curve would certify with {needed} prompts"
        if needed is not None
        else f"even {plan['max_prompts']} prompts would not certify it"
    )
    return (
        f"with {n} prompts the p-value of the smallest threshold u_th = {first:.4g} "
        f"(observed risk {risk0:.4f}) is {pvalue0:.3f} > delta = {cfg.error_level:g}; {would}"
    )


def _ltt(
    cfg: Config, prompt_risks: jnp.ndarray, grid: jnp.ndarray, u, beta
) -> dict[str, Any]:
    result = T.ltt_threshold(
        prompt_risks, grid, jnp.float32(cfg.risk), jnp.float32(cfg.error_level)
    )
    index = int(result.index)
    plan = _ltt_plan(cfg, result, grid, T.risk_curve(jnp.ones_like(u), u, grid))
    out: dict[str, Any] = {
        "threshold": _json_threshold(float(result.threshold)),
        "certified": index >= 0,
        "num_prompts": int(result.num_prompts),
        "estimand": "per-prompt risk E_prompt[(1/T) sum_t beta_t 1{u_t <= u_th}]",
        "pvalue_first": float(result.pvalues[0]),
        "prompts_needed": plan["prompts_to_certify_any"],
        "reason": None if index >= 0 else _ltt_reason(cfg, result, grid, plan),
        "plan": plan,
        "curve": {
            "risk_hat": [float(x) for x in result.risk_hat],
            "pvalues": [float(x) for x in result.pvalues],
        },
    }
    if index >= 0:
        out["pvalue"] = float(result.pvalues[index])
        out["risk_hat_at_threshold"] = float(result.risk_hat[index])
        out["empirical"] = _empirical(u, beta, float(result.threshold))
    return out


def _per_prompt_sums(data: RunData) -> np.ndarray:
    """`(P, 6)` per-prompt `n, Σu, Σβ, Σu², Σuβ, Σβ²` in float64."""
    u, beta = data.u.astype(np.float64), data.beta.astype(np.float64)
    columns = [np.ones_like(u), u, beta, u * u, u * beta, beta * beta]
    return np.stack(
        [np.bincount(data.prompt, weights=c, minlength=data.num_prompts) for c in columns], 1
    )


def split_masks(cfg: Config, num_prompts: int) -> np.ndarray:
    """`(num_splits, P)` 0/1 masks of the calibration prompts of each split (seeded)."""
    rng = np.random.default_rng((cfg.seed, 5))
    num_cal = int(np.clip(round(cfg.calibration_share * num_prompts), 1, num_prompts - 1))
    order = np.argsort(rng.uniform(size=(cfg.num_splits, num_prompts)), axis=1)
    masks = np.zeros((cfg.num_splits, num_prompts))
    np.put_along_axis(masks, order[:, :num_cal], 1.0, axis=1)
    return masks


class _Tokens(NamedTuple):
    """Token data the split validation reads: `(n,)` u, beta, prompt; `(P,)` token
    counts; `(P, p)` per-prompt risk curves; `(p,)` grid."""

    u: jnp.ndarray
    beta: jnp.ndarray
    prompt: jnp.ndarray
    tokens_per_prompt: jnp.ndarray
    prompt_risks: jnp.ndarray
    grid: jnp.ndarray


def _split_outcomes(xs, tokens: _Tokens, eps, delta):
    """Per split: thresholds of `METHODS` and their realised risks on the test prompts.

    `xs` holds per split the `(P,)` calibration mask, `(m,)` posterior draws of slope
    and intercept, the refitted risk-bounded threshold of the model in use (NaN when
    that model is the pooled linear one, whose exact posterior is computed here), and
    the plug-in risk-averse and risk-prone thresholds.
    """
    u, beta, prompt, grid = tokens.u, tokens.beta, tokens.prompt, tokens.grid
    num_prompts = tokens.tokens_per_prompt.shape[0]

    def one_split(args):
        mask, a, b, t_refit, t_averse, t_prone = args
        cal_tokens = mask[prompt]
        test_tokens = 1.0 - cal_tokens
        test_prompts = 1.0 - mask
        t_posterior = T.risk_bounded_threshold(a, b, u, grid, eps, delta, cal_tokens)
        t_ltt = T.ltt_threshold(tokens.prompt_risks, grid, eps, delta, mask).threshold
        t_bounded = jnp.where(jnp.isnan(t_refit), t_posterior, t_refit)
        thresholds = jnp.stack([t_ltt, t_posterior, t_bounded, t_averse, t_prone])

        def realised(t):
            skipped = (u <= t).astype(beta.dtype)
            per_token = jnp.sum(test_tokens * beta * skipped) / jnp.sum(test_tokens)
            per_prompt_sum = jax.ops.segment_sum(beta * skipped, prompt, num_segments=num_prompts)
            per_prompt = per_prompt_sum / jnp.maximum(tokens.tokens_per_prompt, 1.0)
            prompt_mean = jnp.sum(test_prompts * per_prompt) / jnp.sum(test_prompts)
            skip = jnp.sum(test_tokens * skipped) / jnp.sum(test_tokens)
            return per_token, prompt_mean, skip

        per_token, per_prompt, skip = jax.vmap(realised)(thresholds)
        return thresholds, per_token, per_prompt, skip

    return jax.lax.map(one_split, xs, batch_size=SPLIT_BATCH)


def _validation(
    cfg: Config,
    data: RunData,
    prompt_risks: jnp.ndarray,
    grid: jnp.ndarray,
    fitted: rd.Fit,
    quiet: bool,
) -> dict[str, Any]:
    p = data.num_prompts
    prior = fitted.linear_prior or rejection.LinearPrior()
    model = _best_model(fitted)
    masks = split_masks(cfg, p)
    num_refit = len(masks) if model == "linear" else min(cfg.refit_splits, len(masks))
    refit = np.full(len(masks), np.nan)
    if model != "linear":
        refit[:num_refit] = _refit_thresholds(cfg, data, model, fitted, masks[:num_refit], grid,
                                              quiet)
    num_cal = int(masks[0].sum())
    rng = np.random.default_rng((cfg.seed, 6))
    sums = masks @ _per_prompt_sums(data)  # (S, 6) over calibration prompts
    post = rejection.conjugate_posterior(*sums.T, prior=prior)
    slope, intercept, _ = rejection.sample_conjugate(rng, post, min(cfg.num_posterior_draws, 500))
    ls_slope, ls_intercept = post.mean[:, 0], post.mean[:, 1]
    positives = np.bincount(data.prompt, weights=data.beta > T.BETA_POSITIVE_TOL, minlength=p)
    delta_cal = masks @ positives / sums[:, 0]
    averse = jax.vmap(T.risk_averse)(
        jnp.asarray(ls_slope, jnp.float32), jnp.asarray(ls_intercept, jnp.float32)
    )
    prone = jax.vmap(T.risk_prone)(
        jnp.asarray(ls_slope, jnp.float32),
        jnp.asarray(ls_intercept, jnp.float32),
        jnp.asarray(delta_cal, jnp.float32),
    )

    u, beta, prompt = jnp.asarray(data.u), jnp.asarray(data.beta), jnp.asarray(data.prompt)
    tokens = _Tokens(
        u=u,
        beta=beta,
        prompt=prompt,
        tokens_per_prompt=jax.ops.segment_sum(jnp.ones_like(beta), prompt, num_segments=p),
        prompt_risks=prompt_risks,
        grid=grid,
    )
    xs = (
        jnp.asarray(masks, jnp.float32),
        jnp.asarray(slope, jnp.float32),
        jnp.asarray(intercept, jnp.float32),
        jnp.asarray(refit, jnp.float32),
        averse,
        prone,
    )
    eps, delta = jnp.float32(cfg.risk), jnp.float32(cfg.error_level)
    thresholds, per_token, per_prompt, skip = (
        np.asarray(x) for x in jax.jit(_split_outcomes)(xs, tokens, eps, delta)
    )
    methods = {}
    for k, name in enumerate(METHODS):
        # The refitted risk-bounded threshold exists on the first `num_refit` splits.
        rows = slice(num_refit) if name == "risk_bounded" else slice(None)
        t, token, prompt_mean = thresholds[rows, k], per_token[rows, k], per_prompt[rows, k]
        methods[name] = {
            "num_splits": int(t.size),
            "exceed_frequency_per_token": float(np.mean(token > cfg.risk)),
            "exceed_frequency_per_prompt": float(np.mean(prompt_mean > cfg.risk)),
            "no_skip_frequency": float(np.mean(~np.isfinite(t))),
            "mean_skip_rate": float(skip[rows, k].mean()),
            "thresholds": [_json_threshold(x) for x in t],
            "realised_risk_per_token": [float(x) for x in token],
            "realised_risk_per_prompt": [float(x) for x in prompt_mean],
            "skip_rate": [float(x) for x in skip[rows, k]],
        }
    return {
        "num_splits": cfg.num_splits,
        "calibration_prompts": num_cal,
        "test_prompts": p - num_cal,
        "allowed_exceed_frequency": cfg.error_level,
        "posterior_per_split": "exact conjugate posterior of the linear-Gaussian model",
        "risk_bounded_model": model,
        "risk_bounded_per_split": "exact conjugate posterior"
        if model == "linear"
        else f"NUTS, 1 chain x ({REFIT_WARMUP} warmup + {REFIT_SAMPLES} draws), tree depth "
        f"<= {REFIT_TREE_DEPTH}, on the first {num_refit} splits",
        "guarantee": {
            "ltt": "P(R <= eps) >= 1 - delta for the per-prompt risk of new prompts",
            "posterior_linear": "none beyond the model: linear link, independent tokens",
            "risk_bounded": f"none beyond the {model} model (the one in use), refitted "
            "per split",
            "analytic_risk_averse": "none (plug-in)",
            "analytic_risk_prone": "none (plug-in)",
        },
        "methods": methods,
    }


def _prompt_risks(data: RunData, grid: jnp.ndarray) -> jnp.ndarray:
    return jax.jit(T.prompt_risk_curves, static_argnums=3)(
        jnp.asarray(data.u), jnp.asarray(data.beta), jnp.asarray(data.prompt),
        data.num_prompts, grid,
    )  # fmt: skip


def prompt_plan(cfg: Config) -> dict[str, Any]:
    """The Learn-then-Test sample-size plan of a pilot run (`--plan-prompts`)."""
    run_dir = rd.require_run_dir(cfg.run_dir)
    measure = cfg.measure or fit.Config(run_dir=str(run_dir)).measure
    data = _load_data(records.read_records(run_dir), measure)
    grid = T.threshold_grid(cfg.grid_size)
    u, beta = jnp.asarray(data.u), jnp.asarray(data.beta)
    ltt = _ltt(cfg, _prompt_risks(data, grid), grid, u, beta)
    return {
        "mode": ThresholdSource.PLAN.value,
        "run_dir": str(run_dir),
        "measure": measure,
        "risk": cfg.risk,
        "confidence": cfg.confidence,
        "data": {"num_tokens": int(data.u.size), "num_prompts": data.num_prompts},
        "ltt": ltt,
    }


def from_run(cfg: Config, quiet: bool = True) -> dict[str, Any]:
    """Everything `thresholds.json` holds, computed from a run directory (progress lines
    of the longest step unless `quiet`)."""
    run_dir = rd.require_run_dir(cfg.run_dir)
    df = records.read_records(run_dir)
    posterior, measure = _ensure_fit(cfg, run_dir)
    data = _load_data(df, measure)
    grid = T.threshold_grid(cfg.grid_size)
    u, beta = jnp.asarray(data.u), jnp.asarray(data.beta)

    plug_in = rejection.plug_in_thresholds(data.u, data.beta)
    analytic_section: dict[str, Any] = {
        "slope": plug_in.slope,
        "intercept": plug_in.intercept,
        "rejection_share": plug_in.rejection_share,
        "fit": "least squares on all records",
    }
    for rule in T.PaperRule:
        paper = getattr(plug_in, rule.value)
        block = _paper_block(paper)
        if math.isfinite(paper.threshold):
            block["empirical"] = _empirical(u, beta, paper.threshold)
        analytic_section[rule.value] = block

    prompt_risks = _prompt_risks(data, grid)
    return {
        "mode": ThresholdSource.RUN.value,
        "run_dir": str(run_dir),
        "measure": measure,
        "risk": cfg.risk,
        "confidence": cfg.confidence,
        "versions": {"uhlm_jax": uhlm_jax.__version__, "jax": jax.__version__},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None},
        "grid": {"size": cfg.grid_size, "values": [float(x) for x in grid]},
        "empirical_curve": {
            "per_token": [float(x) for x in T.risk_curve(beta, u, grid)],
            "skip_rate": [float(x) for x in T.risk_curve(jnp.ones_like(u), u, grid)],
        },
        "data": {
            "num_tokens": int(data.u.size),
            "num_prompts": data.num_prompts,
            "mean_beta": float(data.beta.mean()),
        },
        "records_warning": records.coverage_warning(run_dir, data.num_prompts),
        "analytic": analytic_section,
        "posterior": _posterior(cfg, posterior, data, grid),
        "ltt": _ltt(cfg, prompt_risks, grid, u, beta),
        "validation": _validation(
            cfg,
            data,
            prompt_risks,
            grid,
            posterior.fit,
            quiet,
        ),
    }


def run(cfg: Config, quiet: bool = True) -> Result:
    """Computes the thresholds; in run mode writes `RUN_DIR/thresholds.json` atomically
    (with progress lines unless `quiet`)."""
    if cfg.source is ThresholdSource.ANALYTIC:
        return Result(summary=analytic(cfg), path=None)
    if cfg.source is ThresholdSource.PLAN:
        return Result(summary=prompt_plan(cfg), path=None)
    summary = from_run(cfg, quiet)
    path = Path(cfg.run_dir) / rd.THRESHOLDS_FILE
    rd.write_json(path, summary)
    return Result(summary=summary, path=path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm threshold` options."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        names={"run_dir": "run", "num_splits": "splits"},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def _fmt(t: float | None) -> str:
    return "none (skip nothing)" if t is None else f"{t:.4f}"


def format_paper(rule: T.PaperRule, block: dict[str, Any]) -> str:
    """One line for a paper threshold block: the value used and, if clipped, why."""
    text = f"{rule.label} {rule.formula} = "
    text += "undefined" if block["threshold"] is None else f"{block['threshold']:.4f}"
    return text + (f" ({block['reason']})" if block.get("reason") else "")


def format_ltt(ltt: dict[str, Any]) -> str:
    """One line on Learn-then-Test: the certified threshold, or why there is none."""
    if ltt["certified"]:
        return (
            f"Learn-then-Test: {ltt['threshold']:.4f} (certified with {ltt['num_prompts']} "
            "prompts)"
        )
    return f"Learn-then-Test: none (skip nothing): {ltt['reason']}"


# Rows of the plan printed by `format_plan` (the JSON holds them all).
PLAN_ROWS = 12


def format_plan(summary: dict[str, Any]) -> str:
    """The `--plan-prompts` table: calibration prompts against the threshold they certify."""
    ltt = summary["ltt"]
    plan = ltt["plan"]
    lines = [
        f"Learn-then-Test plan at risk {summary['risk']}, confidence {summary['confidence']}, "
        f"from a pilot of {plan['pilot_prompts']} prompts ({summary['data']['num_tokens']} "
        f"tokens, measure {summary['measure']})",
        format_ltt(ltt),
    ]
    steps = plan["steps"]
    if not steps:
        lines.append(f"no threshold certifies with up to {plan['max_prompts']} prompts")
        return "\n".join(lines)
    shown = [steps[int(i)] for i in np.unique(np.linspace(0, len(steps) - 1, PLAN_ROWS).round())]
    lines.append(f"{'prompts':>8}  {'largest u_th':>12}  {'skip rate':>10}  {'risk':>7}")
    lines += [
        f"{s['prompts']:>8}  {s['threshold']:>12.4f}  {s['skip_rate']:>10.3f}  "
        f"{s['risk_hat']:>7.4f}"
        for s in shown
    ]
    lines.append(f"assumes {plan['assumption']}")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable report."""
    if summary["mode"] == ThresholdSource.ANALYTIC.value:
        return "\n".join(
            format_paper(rule, summary[rule.value]) for rule in T.PaperRule if rule.value in summary
        )
    eps, conf = summary["risk"], summary["confidence"]
    if summary["mode"] == ThresholdSource.PLAN.value:
        return format_plan(summary)
    lines = [
        f"{summary['data']['num_tokens']} tokens, {summary['data']['num_prompts']} prompts, "
        f"measure {summary['measure']}; risk {eps}, confidence {conf}"
    ]
    an = summary["analytic"]
    lines.append(
        f"analytic (a={an['slope']:.4f}, b={an['intercept']:.4f}, delta="
        f"{an['rejection_share']:.3f}): "
        + "; ".join(format_paper(rule, an[rule.value]) for rule in T.PaperRule)
    )
    lin = summary["posterior"]["linear"]
    lo, hi = lin["risk_averse"]["interval"]
    lo2, hi2 = lin["risk_prone"]["interval"]
    lines.append(f"posterior risk-averse [{lo:.4f}, {hi:.4f}], risk-prone [{lo2:.4f}, {hi2:.4f}]")
    for rule in T.PaperRule:
        clipped = lin[rule.value].get("clipped") or {}
        if clipped.get("above_1", 0) > 0 or clipped.get("below_0", 0) > 0:
            lines.append(
                f"  {rule.label} {rule.formula}: {clipped['above_1']:.1%} of draws > 1 "
                f"(skip everything), {clipped['below_0']:.1%} < 0 (skip only u = 0)"
            )
    post = summary["posterior"]
    best = post["model_choice"]["model"]
    others = ", ".join(
        f"{m} {_fmt(post[m]['risk_bounded']['threshold'])}" for m in MODELS if m != best
    )
    lines.append(
        f"risk-bounded: {_fmt(post['risk_bounded']['threshold'])} from the {best} model, "
        f"which predicts best (highest elpd_loo); {others}"
    )
    lines.append(format_ltt(summary["ltt"]))
    val = summary["validation"]
    for name, m in val["methods"].items():
        lines.append(
            f"  {name:>22}: realised risk > {eps} in {m['exceed_frequency_per_token']:.3f} "
            f"(per token) / {m['exceed_frequency_per_prompt']:.3f} (per prompt) of "
            f"{m.get('num_splits', val['num_splits'])} splits; mean skip rate "
            f"{m['mean_skip_rate']:.3f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm threshold`; returns the exit status."""
    result = run(cli_config.config_from_args(Config, args), quiet=args.quiet)
    if args.json:
        print(console.json_text(result.summary))
    else:
        print(format_summary(result.summary))
        if result.path is not None:
            print(f"wrote {result.path}")
    return 0
