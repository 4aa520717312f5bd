"""Fit the rejection model of a calibration run with NumPyro.

`uhlm fit RUN_DIR` reads the run's per-token records (`calibration.records`) and
models the rejection probability `β` of a draft given the SLM's uncertainty `u`
(the `u_<measure>` column chosen by `--measure`) two ways (`uhlm_jax.rejection`):

* **linear** -- the paper's linear-Gaussian model (U-HLM, arXiv 2412.12687, §III),
  `β ~ Normal(a·u + b, σ)`, with the conjugate, weakly informative prior
  `σ² ~ InvGamma(α0, β0)`, `a, b | σ ~ Normal(0, s0·σ)`. It is fitted by NUTS
  and by SVI (a full-rank Gaussian guide), and its exact posterior (Normal-
  inverse-gamma, `rejection.conjugate_posterior`) is reported next to both as a
  check. NUTS runs on six sufficient statistics, which is exact and makes its cost
  independent of the number of tokens.
* **hurdle** -- a bounded model that respects `β ∈ [0, 1]` and its mass at 0:
  `P(β > 0 | u) = σ(c·u + e)` and `β | β > 0 ~ Beta(m·κ, (1 − m)·κ)` with
  `m = σ(f·u + g)`. NUTS runs on tokens grouped by their value of `u`, which is
  exact and cheap for discrete measures such as temperature perturbation
  (`K + 1` distinct values).
* **linear_prompt**, **hurdle_prompt** -- the same two models with a random intercept
  per prompt (in both logits of the hurdle), non-centred, with half-normal priors on
  the between-prompt sds. Tokens of one prompt are dependent; these models let the
  posterior say so, and a new prompt's risk (`uhlm threshold`) draws a fresh prompt
  effect from the fitted population. NUTS runs on per-prompt sufficient statistics
  (linear) and on tokens grouped by prompt and `u` (hurdle), both exact.

It reports r-hat, bulk and tail effective sample sizes (ArviZ) and divergences;
posterior predictive checks in `u` bins (share of `β > 0` and mean `β`, observed
against the 5-95% range of replicated data); a comparison of the two models by
PSIS-LOO, with WAIC beside it (ArviZ `az.loo`, `az.waic`, `az.compare`), leaving out
whole prompts by default (`--loo-unit`; `fit.json`'s `comparison.unit` and `grouping`
say which), on the observed scale (the linear model scored as the law of
`clip(β*, 0, 1)`, with point masses at 0 and 1, so all models give likelihoods with
respect to the same measure); and Pearson and Spearman correlations of `u` and `β` with 95%
bootstrap intervals that resample prompts.

Outputs, written atomically into RUN_DIR: `posterior_linear.npz` (NUTS draws
`slope`, `intercept`, `sigma` shaped `(chains, draws)`, SVI draws
`svi_slope`, `svi_intercept`, `svi_sigma`, and the prompt-effect model's draws
prefixed `prompt_model_`, with `prompt_model_prompt_sd`), `posterior_hurdle.npz`
(`positive_slope`, `positive_intercept`, `mean_slope`, `mean_intercept`,
`concentration`, and `prompt_model_...` with the two prompt sds) and the summary
`fit.json`.

Subsampling: with more than `max_tokens` tokens, whole prompts are drawn at
random (seeded) until the budget is reached, so per-prompt structure is kept.

Caveat: the pooled models treat tokens as conditionally independent given `u`, so
their posterior intervals are too narrow when prompts differ; the prompt-effect
models, the bootstrap intervals (over prompts) and the prompt-split validation of
`uhlm threshold --run` do not share this assumption.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pandas as pd
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.initialization import init_to_value

import uhlm_jax
from calibration import records
from calibration import run_dir as rd
from uhlm_jax import cli_config, console, rejection
from uhlm_jax.threshold import BETA_POSITIVE_TOL
from uhlm_jax.types import Array

__all__ = [
    "MODEL_SITES",
    "ChainMethod",
    "Config",
    "LooUnit",
    "FitData",
    "NutsFit",
    "Posterior",
    "Result",
    "add_arguments",
    "compare",
    "default_chain_method",
    "fit_data",
    "format_comparison",
    "format_summary",
    "load_fit_data",
    "load_posterior",
    "main",
    "prepare_data",
    "run",
    "run_nuts",
    "run_svi",
    "subsample_prompts",
]

# Observed β outside [0, 1] by more than float32 rounding is a broken record.
BETA_RANGE_TOL = 1e-5
# Fewest tokens and prompts a fit accepts.
MIN_TOKENS = 10
MIN_PROMPTS = 2
# Fewest posterior draws PSIS-LOO may use (its Pareto fit needs a tail of draws).
MIN_LOO_DRAWS = 100
# Central mass of reported intervals.
INTERVAL_MASS = 0.9
# SVI learning rate: starts here, decays tenfold over the run.
SVI_LEARNING_RATE = 0.01
# The models `uhlm fit` compares, their sites, and the key prefix of the models with
# prompt effects in the pooled model's npz file.
MODEL_SITES = {
    "linear": rejection.LINEAR_SITES,
    "hurdle": rejection.HURDLE_SITES,
    "linear_prompt": rejection.LINEAR_PROMPT_SITES,
    "hurdle_prompt": rejection.HURDLE_PROMPT_SITES,
}
PROMPT_PREFIX = "prompt_model_"


class LooUnit(enum.Enum):
    """What PSIS-LOO leaves out when it compares the models."""

    PROMPT = "prompt"  # a whole prompt: its tokens' log likelihoods summed (prompt effect
    # integrated out for the models with prompt effects); tokens of a prompt are dependent
    TOKEN = "token"  # one token; compares the pooled models only


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
      loo_draws: most posterior draws (over all chains, thinned evenly per chain) that
        score each token in PSIS-LOO and WAIC; the pointwise log likelihood takes
        `8 · tokens · loo_draws` bytes per model.
      loo_unit: what PSIS-LOO leaves out (`LooUnit`): whole prompts (default, all four
        models) or single tokens (the pooled models only).
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
    loo_draws: int = 500
    loo_unit: LooUnit = LooUnit.PROMPT
    seed: int = 0
    linear_prior: rejection.LinearPrior = rejection.LinearPrior()
    hurdle_prior: rejection.HurdlePrior = rejection.HurdlePrior()

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
        _positive_int("loo_draws", self.loo_draws, MIN_LOO_DRAWS)
        _positive_int("seed", self.seed, 0)
        if not isinstance(self.loo_unit, LooUnit):
            raise ValueError(
                f"loo_unit must be a LooUnit ({[m.value for m in LooUnit]}), got {self.loo_unit!r}"
            )
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


def _site_summary(inference: az.InferenceData, sites: tuple[str, ...]) -> dict[str, Any]:
    """Per-site mean, sd, median, central interval, ESS and r-hat (ArviZ: rank-normalised
    split r-hat and bulk and tail ESS, Vehtari et al. 2021)."""
    table = az.summary(inference, var_names=list(sites), round_to="none", stat_focus="mean")
    tail = (1 - INTERVAL_MASS) / 2
    out = {}
    for s in sites:
        draws = inference.posterior[s].values
        lo, median, hi = np.quantile(draws, [tail, 0.5, 1 - tail])
        out[s] = {
            "mean": float(table.loc[s, "mean"]),
            "sd": float(table.loc[s, "sd"]),
            "median": float(median),
            "interval": [float(lo), float(hi)],
            "ess": float(table.loc[s, "ess_bulk"]),
            "ess_tail": float(table.loc[s, "ess_tail"]),
            "r_hat": float(table.loc[s, "r_hat"]),
        }
    return out


class NutsFit(NamedTuple):
    """A NUTS run: draws, a JSON summary, and the ArviZ InferenceData.

    Attributes:
      draws: site -> `(chains, draws)` NumPy draws of the model's `sites`.
      diagnostics: chain settings, divergences, mean leapfrog steps, seconds, and the
        per-site `_site_summary`.
      inference: `az.from_numpyro` of the run (posterior and sample stats).
    """

    draws: dict[str, np.ndarray]
    diagnostics: dict[str, Any]
    inference: az.InferenceData


def _global_latent_sites(model, model_args: tuple) -> tuple[str, ...]:
    """The model's latent sites outside every plate: the block NUTS adapts a dense mass
    matrix over. Per-prompt effects stay diagonal, because a dense matrix over hundreds of
    them, estimated from a few hundred warmup draws, adapts badly and deepens every tree."""
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(*model_args)
    return tuple(
        name for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["cond_indep_stack"]
    )


def run_nuts(
    model, model_args: tuple, sites: tuple[str, ...], cfg: Config, key: Array, init: dict | None
) -> NutsFit:
    """Runs NUTS (dense mass matrix); returns its draws, diagnostics and InferenceData."""
    method = cfg.chain_method or default_chain_method(cfg.num_chains)
    kernel = NUTS(
        model,
        dense_mass=[_global_latent_sites(model, model_args)],
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
    # The pointwise log likelihood is added on the observed scale by `_compare`.
    inference = az.from_numpyro(mcmc, log_likelihood=False)
    extra = mcmc.get_extra_fields()
    diagnostics = {
        "chain_method": method.value,
        "num_chains": cfg.num_chains,
        "num_warmup": cfg.num_warmup,
        "num_samples": cfg.num_samples,
        "divergences": int(np.asarray(extra["diverging"]).sum()),
        "mean_leapfrog_steps": float(np.asarray(extra["num_steps"]).mean()),
        "seconds": seconds,
        "params": _site_summary(inference, sites),
    }
    return NutsFit({s: samples[s] for s in sites}, diagnostics, inference)


def run_svi(
    stats: rejection.LinearStats, cfg: Config, key: Array, init: dict[str, float], num_draws: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SVI of the linear model with a full-rank Gaussian guide; returns draws and summary."""
    fit_key, draw_key = jax.random.split(key)
    guide = AutoMultivariateNormal(
        rejection.linear_gaussian_stats, init_loc_fn=init_to_value(values=init), init_scale=0.01
    )
    schedule = optax.exponential_decay(SVI_LEARNING_RATE, cfg.svi_steps, 0.1)
    optimizer = numpyro.optim.optax_to_numpyro(optax.adam(schedule))
    svi = SVI(rejection.linear_gaussian_stats, guide, optimizer, Trace_ELBO(num_particles=4))
    start = time.perf_counter()
    result = svi.run(fit_key, cfg.svi_steps, stats, cfg.linear_prior, progress_bar=False)
    # AutoMultivariateNormal adds its [3] mean to [num_draws, 3] draws by rank promotion.
    with jax.numpy_rank_promotion("allow"):
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


class Posterior(NamedTuple):
    """What `uhlm fit` saved: the summary (`fit.json`) and flattened posterior draws of
    each model (`MODEL_SITES`)."""

    fit: rd.Fit
    linear: dict[str, np.ndarray]
    hurdle: dict[str, np.ndarray]
    linear_prompt: dict[str, np.ndarray]
    hurdle_prompt: dict[str, np.ndarray]

    def draws(self, model: str) -> dict[str, np.ndarray]:
        """The draws of the model `fit.json` names `model`."""
        return getattr(self, model)


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of `uhlm fit`.

    Attributes:
      summary: the content of `fit.json`.
      draws: model -> NUTS draws, `(chains, draws)` per site (`MODEL_SITES`).
      svi: SVI draws of the linear model, `(draws,)` per site.
      fit_path: where `fit.json` was written.
    """

    summary: dict[str, Any]
    draws: dict[str, dict[str, np.ndarray]]
    svi: dict[str, np.ndarray]
    fit_path: Path


# Per-token and per-prompt log likelihood of each model's draws.
_TOKEN_LOGLIK = {
    "linear": rejection.linear_pointwise_loglik,
    "hurdle": rejection.hurdle_pointwise_loglik,
}
_PROMPT_LOGLIK = {
    "linear": rejection.linear_prompt_loglik,
    "hurdle": rejection.hurdle_prompt_loglik,
    "linear_prompt": rejection.linear_prompt_loglik,
    "hurdle_prompt": rejection.hurdle_prompt_loglik,
}


def compare(cfg: Config, data: FitData, fits: dict[str, NutsFit]) -> dict[str, Any]:
    """PSIS-LOO and WAIC of each model, ranked (`fit.json`'s `comparison`).

    Each model's draws are thinned evenly per chain to at most `cfg.loo_draws` and
    scored on the observed scale per `cfg.loo_unit`: per prompt (leave one prompt out:
    the log likelihoods of a prompt's tokens summed, the prompt effect of the models that
    have one integrated out by adaptive Gauss-Hermite quadrature) or per token (pooled
    models only). Then `rejection.compare_models` ranks them.

    Args:
      cfg: the fit's settings (`loo_draws`, `loo_unit`).
      data: the fitted tokens.
      fits: model name -> its `NutsFit`.

    Returns:
      The criterion, the unit and grouping, the draws used, `table` (one row per model,
      best first: elpd_loo, se, p_loo, elpd_diff, dse, weight, warning and WAIC) and
      `best`.
    """
    start = time.perf_counter()
    by_prompt = cfg.loo_unit is LooUnit.PROMPT
    scored = {}
    for name, nuts in fits.items():
        if not by_prompt and name not in _TOKEN_LOGLIK:
            continue
        sites = MODEL_SITES[name]
        chains, draws = nuts.draws[sites[0]].shape
        step = max(1, math.ceil(chains * draws / cfg.loo_draws))
        thinned = nuts.inference.isel(draw=slice(None, None, step))
        kept = {s: thinned.posterior[s].values for s in sites}
        if by_prompt:
            ll = rejection.prompt_log_likelihood(
                _PROMPT_LOGLIK[name], kept, data.u, data.beta, data.prompt, data.num_prompts
            )
        else:
            ll = rejection.pointwise_log_likelihood(_TOKEN_LOGLIK[name], kept, data.u, data.beta)
        thinned.add_groups(log_likelihood={"beta": ll})
        scored[name] = thinned
    table = rejection.compare_models(scored)
    grouping = (
        "leave one prompt out: each prompt's token log likelihoods summed; the prompt "
        f"effects integrated out by adaptive Gauss-Hermite ({rejection.QUADRATURE_NODES} "
        "nodes)"
        if by_prompt
        else "leave one token out; pooled models only"
    )
    return {
        "criterion": "PSIS-LOO",
        "scale": "observed beta in [0, 1]: the linear model is scored as the law of "
        "clip(beta*, 0, 1) (point masses at 0 and 1), the hurdle model as fitted",
        "unit": cfg.loo_unit.value,
        "grouping": grouping,
        "num_observations": data.num_prompts if by_prompt else int(data.u.size),
        "num_draws": int(next(iter(scored.values())).posterior.sizes["draw"]) * cfg.num_chains,
        "table": [score._asdict() for score in table],
        "best": table[0].name,
        "seconds": time.perf_counter() - start,
    }


_PROMPT_MODELS = {
    "linear_prompt": "beta ~ Normal(slope*u + intercept + prompt_sd*z_prompt, sigma), "
    "z_prompt ~ Normal(0, 1)",
    "hurdle_prompt": "the hurdle model with positive_intercept + positive_prompt_sd*z_prompt "
    "and mean_intercept + mean_prompt_sd*w_prompt, z_prompt, w_prompt ~ Normal(0, 1)",
}


# The steps of `fit_data`, in order, as its progress lines name them.
FIT_STEPS = ("linear NUTS", "linear SVI", "hurdle NUTS", "linear_prompt NUTS",
             "hurdle_prompt NUTS", "PSIS-LOO comparison", "checks and bootstrap")


def fit_data(
    cfg: Config, data: FitData, quiet: bool = True
) -> tuple[dict[str, Any], dict, dict]:
    """Fits the four models to prepared data, with a progress line per step (`FIT_STEPS`)
    unless `quiet`.

    Returns:
      The summary, NUTS draws per model (`MODEL_SITES`, `(chains, draws)` each) and the
      SVI draws of the linear model.
    """
    keys = dict(
        zip(("linear", "svi", "hurdle", "linear_prompt", "hurdle_prompt"),
            jax.random.split(jax.random.key(cfg.seed), 5), strict=True)
    )  # fmt: skip
    u, beta = data.u, data.beta
    ls = rejection.least_squares(u, beta)
    init = {
        "slope": ls["slope"],
        "intercept": ls["intercept"],
        "sigma_sq": max(ls["sigma"], 1e-3) ** 2,
    }
    stats = rejection.linear_stats(u, beta)
    stats32 = rejection.LinearStats(*(jnp.float32(x) for x in stats))
    bar = console.progress(total=len(FIT_STEPS), desc="fit", unit="step", quiet=quiet)
    steps = iter(FIT_STEPS)

    def done() -> None:
        bar.set_postfix(done=next(steps))
        bar.update()

    fits = {}
    fits["linear"] = run_nuts(
        rejection.linear_gaussian_stats,
        (stats32, cfg.linear_prior),
        rejection.LINEAR_SITES,
        cfg,
        keys["linear"],
        init,
    )
    done()
    svi_draws, svi_summary = run_svi(
        stats32, cfg, keys["svi"], init, cfg.num_chains * cfg.num_samples
    )
    done()
    u64, beta64 = u.astype(np.float64), beta.astype(np.float64)
    exact = rejection.conjugate_posterior(
        u64.size,
        u64.sum(),
        beta64.sum(),
        u64 @ u64,
        u64 @ beta64,
        beta64 @ beta64,
        cfg.linear_prior,
    )
    groups = rejection.HurdleGroups(*(jnp.asarray(x) for x in rejection.hurdle_groups(u, beta)))
    fits["hurdle"] = run_nuts(
        rejection.hurdle_grouped,
        (groups, cfg.hurdle_prior),
        rejection.HURDLE_SITES,
        cfg,
        keys["hurdle"],
        None,
    )
    done()
    prompt_stats = rejection.LinearStats(
        *(jnp.asarray(x) for x in
          rejection.prompt_linear_stats(u, beta, data.prompt, data.num_prompts))
    )  # fmt: skip
    fits["linear_prompt"] = run_nuts(
        rejection.linear_gaussian_prompts,
        (prompt_stats, cfg.linear_prior),
        rejection.LINEAR_PROMPT_SITES,
        cfg,
        keys["linear_prompt"],
        init,
    )
    done()
    prompt_groups, group_prompt = rejection.hurdle_prompt_groups(u, beta, data.prompt)
    fits["hurdle_prompt"] = run_nuts(
        rejection.hurdle_prompts,
        (
            rejection.HurdleGroups(*(jnp.asarray(x) for x in prompt_groups)),
            jnp.asarray(group_prompt),
            data.num_prompts,
            cfg.hurdle_prior,
        ),
        rejection.HURDLE_PROMPT_SITES,
        cfg,
        keys["hurdle_prompt"],
        None,
    )
    done()
    comparison = compare(cfg, data, fits)
    done()
    draws = {name: nuts.draws for name, nuts in fits.items()}
    ppc = rejection.predictive_checks(
        u, beta, draws["linear"], draws["hurdle"], cfg.num_bins,
        np.random.default_rng((cfg.seed, 3)),
    )  # fmt: skip
    correlation = rejection.correlations(
        u,
        beta,
        data.prompt,
        data.num_prompts,
        cfg.num_bootstrap,
        np.random.default_rng((cfg.seed, 2)),
    )
    done()
    bar.close()
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
            "nuts": fits["linear"].diagnostics,
            "svi": svi_summary,
            "exact": exact.moments(),
        },
        "hurdle": {
            "model": "P(beta>0|u) = sigmoid(positive_slope*u + positive_intercept); "
            "beta|beta>0 ~ Beta(m*concentration, (1-m)*concentration), "
            "m = sigmoid(mean_slope*u + mean_intercept)",
            "prior": dataclasses.asdict(cfg.hurdle_prior),
            "nuts": fits["hurdle"].diagnostics,
        },
        **{
            name: {
                "model": text,
                "prior": dataclasses.asdict(
                    cfg.linear_prior if name == "linear_prompt" else cfg.hurdle_prior
                ),
                "nuts": fits[name].diagnostics,
            }
            for name, text in _PROMPT_MODELS.items()
        },
        "comparison": comparison,
        "predictive_checks": ppc,
    }
    return summary, draws, svi_draws


def run(cfg: Config, quiet: bool = True) -> Result:
    """Fits the models to the run's records and writes the draws and `fit.json`; prints
    a progress line per step unless `quiet`."""
    data = load_fit_data(cfg)
    summary, draws, svi_draws = fit_data(cfg, data, quiet)
    run_dir = Path(cfg.run_dir)
    summary = {
        "run_dir": str(run_dir),
        "versions": {
            "uhlm_jax": uhlm_jax.__version__,
            "jax": jax.__version__,
            "numpyro": numpyro.__version__,
        },
        "config": {
            **{k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("chain_method", "loo_unit")},
            "chain_method": summary["linear"]["nuts"]["chain_method"],
            "loo_unit": cfg.loo_unit.value,
            "run_dir": str(run_dir),
        },
        "files": {"linear": rd.LINEAR_POSTERIOR_FILE, "hurdle": rd.HURDLE_POSTERIOR_FILE},
        "records_warning": records.coverage_warning(run_dir, data.num_prompts_total),
        **summary,
    }
    rd.write_npz(
        run_dir / rd.LINEAR_POSTERIOR_FILE,
        **draws["linear"],
        **{f"svi_{k}": v for k, v in svi_draws.items()},
        **{PROMPT_PREFIX + k: v for k, v in draws["linear_prompt"].items()},
    )
    rd.write_npz(
        run_dir / rd.HURDLE_POSTERIOR_FILE,
        **draws["hurdle"],
        **{PROMPT_PREFIX + k: v for k, v in draws["hurdle_prompt"].items()},
    )
    rd.write_json(run_dir / rd.FIT_FILE, summary)
    return Result(summary=summary, draws=draws, svi=svi_draws, fit_path=run_dir / rd.FIT_FILE)


def load_posterior(run_dir: str | Path) -> Posterior:
    """Reads `fit.json` and the saved draws (flattened over chains) of a run."""
    run_dir = rd.require_run_dir(run_dir)
    paths = [rd.require_file(run_dir, name) for name in
             (rd.FIT_FILE, rd.LINEAR_POSTERIOR_FILE, rd.HURDLE_POSTERIOR_FILE)]
    fitted = rd.Fit.from_json(rd.read_json(paths[0]))
    draws = {}
    for path, pooled in ((paths[1], "linear"), (paths[2], "hurdle")):
        with np.load(path) as f:
            for name, prefix in ((pooled, ""), (f"{pooled}_prompt", PROMPT_PREFIX)):
                missing = [s for s in MODEL_SITES[name] if prefix + s not in f]
                if missing:
                    raise ValueError(
                        f"{path} lacks the {name} model's draws {missing} (an older uhlm fit "
                        "wrote it); rerun `uhlm fit RUN_DIR`"
                    )
                draws[name] = {s: f[prefix + s].reshape(-1) for s in MODEL_SITES[name]}
    return Posterior(fit=fitted, **draws)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm fit` options."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        positional=("run_dir",), hidden=("linear_prior", "hurdle_prior"),
        help={"chain_method": "how chains run (default: parallel if there is a device per "
              "chain, else vectorized)"},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def format_comparison(comparison: dict[str, Any]) -> list[str]:
    """The model comparison of `fit.json` as text lines, best model first."""
    lines = [
        f"{comparison['criterion']} over {comparison['unit']}s "
        f"({comparison['num_draws']} draws per model); best: {comparison['best']}",
        f"  {'model':<14}{'elpd_loo':>10}{'se':>8}{'elpd_diff':>11}{'dse':>8}{'weight':>8}"
        f"{'p_loo':>8}{'elpd_waic':>11}  warning",
    ]
    for r in comparison["table"]:
        warning = "Pareto k > bound" if r["warning"] else "-"
        lines.append(
            f"  {r['name']:<14}{r['elpd_loo']:>10.1f}{r['se']:>8.1f}{r['elpd_diff']:>11.1f}"
            f"{r['dse']:>8.1f}{r['weight']:>8.2f}{r['p_loo']:>8.1f}{r['elpd_waic']:>11.1f}  "
            f"{warning}"
        )
    return lines


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
    for name in MODEL_SITES:
        model, block = f"{name} NUTS", summary[name]["nuts"]
        params = ", ".join(
            f"{k} {v['mean']:.4f}±{v['sd']:.4f} (r-hat {v['r_hat']:.3f}, ESS {v['ess']:.0f})"
            for k, v in block["params"].items()
        )
        lines.append(f"{model}: {params}; divergences {block['divergences']}")
    svi = summary["linear"]["svi"]["params"]
    lines.append(
        "linear SVI: " + ", ".join(f"{k} {v['mean']:.4f}±{v['sd']:.4f}" for k, v in svi.items())
    )
    lines += format_comparison(summary["comparison"])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm fit`; returns the exit status."""
    result = run(cli_config.config_from_args(Config, args), quiet=args.quiet)
    if args.json:
        print(console.json_text(result.summary))
    else:
        print(format_summary(result.summary))
        print(f"wrote {result.fit_path}")
    return 0
