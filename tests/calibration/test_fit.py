"""Tests of calibration.fit and calibration.records: parameter recovery by NUTS and SVI,
records and their checks, and a smoke run of the job."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from analysis.cli import main as cli_main
from calibration import fit, records
from calibration import run_dir as rd
from tests.helpers import (
    TRUE_HURDLE,
    TRUE_LINEAR,
    hurdle_data,
    linear_data,
    synthetic_records,
    write_run,
)
from uhlm_jax import rejection

# Parameter recovery: |posterior mean − truth| < RECOVERY_SDS posterior sds.
RECOVERY_SDS = 4.0
# NUTS against the exact posterior: mean within this many Monte Carlo standard errors
# (sd / sqrt(ESS)); sd within this relative error.
MCSE_SIGMAS = 4.0
SD_RTOL = 0.2
# SVI's Gaussian guide against the exact posterior (mean in posterior sds; sd ratio).
SVI_MEAN_SDS = 0.5
SVI_SD_RTOL = 0.3
R_HAT_MAX = 1.05
# Divergent transitions tolerated in the short smoke-test chains (hierarchical funnels).
DIVERGENCES_MAX = 20
SMALL = {"num_warmup": 300, "num_samples": 300}
# The pooled linear model's WAIC on the smoke test's fixture run, computed by the
# hand-written WAIC that ArviZ replaced (elpd = lppd - p_waic over every NUTS draw;
# the same records, seed and settings): elpd -289.79, WAIC SE 34.68 on the deviance
# scale, so 17.34 on the elpd scale.
HAND_WAIC_LINEAR_ELPD = -289.79
HAND_WAIC_LINEAR_SE = 17.34


def small_config(run_dir, **kw) -> fit.Config:
    return fit.Config(run_dir=str(run_dir), svi_steps=1500, num_bootstrap=100, **SMALL, **kw)


# --- parameter recovery ----------------------------------------------------------------


def test_nuts_and_svi_recover_the_linear_model():
    # Given 400 tokens from β = 0.82 u − 0.06 + 0.15 ε
    u, beta = linear_data(400, seed=4)
    cfg = fit.Config(run_dir=".", svi_steps=3000, **SMALL)
    ls = rejection.least_squares(u, beta)
    init = {"slope": ls["slope"], "intercept": ls["intercept"], "sigma_sq": ls["sigma"] ** 2}
    stats = rejection.LinearStats(*(jnp.float32(x) for x in rejection.linear_stats(u, beta)))
    # When NUTS and SVI fit the sufficient-statistic model
    draws, nuts, _ = fit.run_nuts(
        rejection.linear_gaussian_stats,
        (stats, cfg.linear_prior),
        rejection.LINEAR_SITES,
        cfg,
        jax.random.key(0),
        init,
    )
    _, svi = fit.run_svi(stats, cfg, jax.random.key(1), init, 4000)
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    exact = rejection.conjugate_posterior(
        400, u64.sum(), b64.sum(), u64 @ u64, u64 @ b64, b64 @ b64
    )
    exact = exact.moments()
    assert draws["slope"].shape == (2, SMALL["num_samples"])
    assert nuts["divergences"] == 0
    for site, truth in TRUE_LINEAR.items():
        p = nuts["params"][site]
        # Then both recover the truth within a few posterior sds ...
        assert abs(p["mean"] - truth) < RECOVERY_SDS * p["sd"], site
        assert abs(svi["params"][site]["mean"] - truth) < RECOVERY_SDS * p["sd"], site
        assert p["r_hat"] < R_HAT_MAX, site
        # ... NUTS agrees with the exact posterior up to Monte Carlo error ...
        mcse = exact[site]["sd"] / math.sqrt(p["ess"])
        assert abs(p["mean"] - exact[site]["mean"]) < MCSE_SIGMAS * mcse, site
        assert p["sd"] == pytest.approx(exact[site]["sd"], rel=SD_RTOL), site
        # ... and SVI's Gaussian guide is close to it.
        assert (
            abs(svi["params"][site]["mean"] - exact[site]["mean"])
            < SVI_MEAN_SDS * exact[site]["sd"]
        )
        assert svi["params"][site]["sd"] == pytest.approx(exact[site]["sd"], rel=SVI_SD_RTOL)
    # Least squares (independent of NumPyro) sits inside the posterior too.
    for site in ("slope", "intercept", "sigma"):
        assert abs(ls[site] - nuts["params"][site]["mean"]) < nuts["params"][site]["sd"]


def test_nuts_recovers_the_hurdle_model():
    u, beta = hurdle_data(3000, seed=5)
    cfg = fit.Config(run_dir=".", **SMALL)
    groups = rejection.HurdleGroups(*(jnp.asarray(x) for x in rejection.hurdle_groups(u, beta)))
    _, nuts, _ = fit.run_nuts(
        rejection.hurdle_grouped,
        (groups, cfg.hurdle_prior),
        rejection.HURDLE_SITES,
        cfg,
        jax.random.key(2),
        None,
    )
    assert nuts["divergences"] == 0
    for site, truth in TRUE_HURDLE.items():
        p = nuts["params"][site]
        assert abs(p["mean"] - truth) < RECOVERY_SDS * p["sd"], site
        assert p["r_hat"] < R_HAT_MAX, site


TRUE_PROMPT_LINEAR = {"slope": 0.6, "intercept": 0.1, "sigma": 0.08, "prompt_sd": 0.12}
# The threshold at which a new prompt's risk is compared, and its central mass.
NEW_PROMPT_THRESHOLD = 0.5
NEW_PROMPT_MASS = 0.9


def prompt_linear_data(num_prompts: int, tokens: int, seed: int):
    """β = a·u + b + α_prompt + σ·ε with α_prompt ~ Normal(0, τ), `TRUE_PROMPT_LINEAR`."""
    rng = np.random.default_rng(seed)
    t = TRUE_PROMPT_LINEAR
    prompt = np.repeat(np.arange(num_prompts), tokens)
    u = rng.uniform(0, 1, prompt.size).astype(np.float32)
    effect = t["prompt_sd"] * rng.standard_normal(num_prompts)
    noise = t["sigma"] * rng.standard_normal(prompt.size)
    beta = t["slope"] * u + t["intercept"] + effect[prompt] + noise
    return u, beta.astype(np.float32), prompt


def _new_prompt_risk(slope, intercept, u, t):
    """`(m,)` risk at threshold t of the linear model per draw, over the sample u."""
    from uhlm_jax import threshold as T

    sample = T.weighted_sample(jnp.asarray(u))
    grid = jnp.asarray([t], jnp.float32)
    curves = jax.vmap(T.linear_risk_curve, in_axes=(0, 0, None, None))(
        jnp.asarray(slope, jnp.float32), jnp.asarray(intercept, jnp.float32), sample, grid
    )
    return np.asarray(curves[:, 0])


def test_prompt_effects_are_recovered_and_widen_a_new_prompts_risk():
    # Given 60 prompts x 10 tokens whose intercept varies by prompt with a known sd
    u, beta, prompt = prompt_linear_data(60, 10, seed=11)
    cfg = fit.Config(run_dir=".", **SMALL)
    stats = rejection.LinearStats(
        *(jnp.asarray(x) for x in rejection.prompt_linear_stats(u, beta, prompt, 60))
    )
    # When NUTS fits the model with prompt effects
    draws, nuts, _ = fit.run_nuts(
        rejection.linear_gaussian_prompts, (stats, cfg.linear_prior),
        rejection.LINEAR_PROMPT_SITES, cfg, jax.random.key(3), None,
    )  # fmt: skip
    # Then every population parameter, the between-prompt sd included, is recovered
    for site, truth in TRUE_PROMPT_LINEAR.items():
        p = nuts["params"][site]
        assert abs(p["mean"] - truth) < RECOVERY_SDS * p["sd"], site
        assert p["r_hat"] < R_HAT_MAX, site
    assert nuts["params"]["prompt_sd"]["interval"][0] > TRUE_PROMPT_LINEAR["prompt_sd"] / 2
    # ... a new prompt's risk, with a fresh prompt effect per draw, spans the true spread
    # of new prompts' risks, while the pooled model's interval is far too narrow for it.
    t = TRUE_PROMPT_LINEAR
    rng = np.random.default_rng(0)
    truth_effects = t["prompt_sd"] * rng.standard_normal(4000)
    true_risks = _new_prompt_risk(
        np.full(4000, t["slope"]), t["intercept"] + truth_effects, u, NEW_PROMPT_THRESHOLD
    )
    tail = (1 - NEW_PROMPT_MASS) / 2
    true_lo, true_hi = np.quantile(true_risks, [tail, 1 - tail])
    new = rejection.new_prompt_draws(rng, {k: v.reshape(-1) for k, v in draws.items()})
    hier = _new_prompt_risk(new["slope"], new["intercept"], u, NEW_PROMPT_THRESHOLD)
    hier_lo, hier_hi = np.quantile(hier, [tail, 1 - tail])
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    exact = rejection.conjugate_posterior(
        u64.size, u64.sum(), b64.sum(), u64 @ u64, u64 @ b64, b64 @ b64
    )
    pooled_slope, pooled_intercept, _ = rejection.sample_conjugate(rng, exact, 4000)
    pooled = _new_prompt_risk(pooled_slope, pooled_intercept, u, NEW_PROMPT_THRESHOLD)
    pooled_lo, pooled_hi = np.quantile(pooled, [tail, 1 - tail])
    true_width = true_hi - true_lo
    # The prompt-effect interval's width matches within the error of τ's posterior
    # (sd/τ ≈ 1/√(2·60) ≈ 0.09; 4 of those) ...
    tau_rel_sd = 1 / math.sqrt(2 * 60)
    assert abs((hier_hi - hier_lo) / true_width - 1) < RECOVERY_SDS * tau_rel_sd
    # ... while the pooled one covers under a fifth of the spread of new prompts' risks.
    assert (pooled_hi - pooled_lo) < 0.2 * true_width


# --- records ---------------------------------------------------------------------------


def test_records_round_trip_sorted_with_dtypes(tmp_path):
    df = synthetic_records(np.random.default_rng(2), 5, 4)
    write_run(tmp_path, df, num_shards=3)
    back = records.read_records(tmp_path)
    expected = df.sort_values(["prompt_id", "position"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["position"].dtype == np.int32 and back["beta"].dtype == np.float32
    assert records.measure_names(back.columns) == ["temperature_perturbation", "entropy"]
    assert not list((tmp_path / rd.RECORDS_DIR).glob(".*"))  # no temporary files left


def test_read_records_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*uhlm calibrate"):
        records.read_records(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no record shards.*uhlm calibrate"):
        records.read_records(tmp_path)
    bad = synthetic_records(np.random.default_rng(2), 2, 3).drop(columns=["beta"])
    with pytest.raises(ValueError, match=r"lacks record columns \['beta'\]"):
        records.write_shard(bad, tmp_path / "records" / "shard-00000.parquet")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "fit.json"
    rd.write_json(path, {"good": 1})
    with pytest.raises(ValueError):
        rd.write_json(path, {"bad": float("nan")})
    with pytest.raises(TypeError):
        rd.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["fit.json"]


def test_subsampling_keeps_whole_prompts():
    df = synthetic_records(np.random.default_rng(3), 50, 10)
    data = fit.prepare_data(df, "temperature_perturbation", max_tokens=95, seed=0)
    assert data.u.size == 90 and data.num_prompts == 9 and data.num_tokens_total == 500
    again = fit.prepare_data(df, "temperature_perturbation", max_tokens=95, seed=0)
    np.testing.assert_array_equal(again.u, data.u)


# --- the job ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_chains": 1}, "num_chains must be an int >= 2"),
        ({"measure": "temperature perturbation"}, "measure must be a measure name"),
        ({"max_tokens": 3}, "max_tokens must be an int >= 10"),
        ({"chain_method": "sequential"}, "chain_method must be a ChainMethod"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit.Config(run_dir="x", **kwargs)


def test_bad_records_are_rejected_with_the_fix():
    df = synthetic_records(np.random.default_rng(3), 5, 10)
    with pytest.raises(ValueError, match=r"measure 'margin' is not in the records.*entropy"):
        fit.prepare_data(df, "margin", 100, 0)
    broken = df.assign(beta=df["beta"].where(df.index != 3, np.nan))
    with pytest.raises(ValueError, match="1 records have non-finite"):
        fit.prepare_data(broken, "temperature_perturbation", 100, 0)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        fit.prepare_data(df.assign(beta=df["beta"] + 1.5), "temperature_perturbation", 100, 0)


@pytest.mark.slow
def test_fit_job_smoke_writes_and_reloads(tmp_path, capsys):
    write_run(tmp_path, synthetic_records(np.random.default_rng(0), 20, 15))
    rd.write_json(tmp_path / rd.CONFIG_FILE, {"num_prompts": 24})  # 4 prompts lost
    parser = argparse.ArgumentParser()
    fit.add_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path),
            "--num-warmup",
            "200",
            "--num-samples",
            "200",
            "--svi-steps",
            "500",
            "--num-bootstrap",
            "50",
            "--loo-unit",
            "token",
            "--json",
        ]
    )
    assert fit.main(args) == 0
    printed, err = capsys.readouterr()
    printed = json.loads(printed)
    on_disk = json.loads((tmp_path / rd.FIT_FILE).read_text())
    assert printed == on_disk
    assert "cover 20 of the 24 prompts" in on_disk["records_warning"]
    assert on_disk["records_warning"] + "\n" in err
    # A progress line per step, each with the time so far (stderr is not a terminal here)
    lines = [line for line in err.splitlines() if " fit: " in line]
    assert [line.split("done=")[1] for line in lines] == list(fit.FIT_STEPS)
    assert all("elapsed" in line for line in lines) and "left" in lines[0]
    assert on_disk["data"]["num_tokens"] == 300 and on_disk["data"]["num_prompts"] == 20
    comparison = on_disk["comparison"]
    assert comparison["best"] == "hurdle"  # the data are hurdle data
    # Leaving out tokens compares the pooled models only, and fit.json says so
    assert comparison["unit"] == "token" and on_disk["config"]["loo_unit"] == "token"
    assert [r["name"] for r in comparison["table"]] == ["hurdle", "linear"]
    # ArviZ's PSIS-LOO of the linear model agrees with the hand-written WAIC it replaced.
    linear = comparison["table"][1]
    assert abs(linear["elpd_loo"] - HAND_WAIC_LINEAR_ELPD) < HAND_WAIC_LINEAR_SE
    assert linear["se"] == pytest.approx(HAND_WAIC_LINEAR_SE, rel=0.1)
    assert len(on_disk["predictive_checks"]) >= 5
    posterior = fit.load_posterior(tmp_path)
    # The typed view of fit.json reads back what was written
    view = posterior.fit
    assert view.measure == on_disk["measure"] and view.seed == on_disk["config"]["seed"]
    pearson = on_disk["correlation"]["pearson"]
    assert view.correlations["pearson"] == rd.Correlation(pearson["estimate"],
                                                          tuple(pearson["interval"]))
    assert view.comparison.best == "hurdle"
    assert [s._asdict() for s in view.comparison.table] == on_disk["comparison"]["table"]
    assert view.nuts["linear"].params["slope"].mean == on_disk["linear"]["nuts"]["params"][
        "slope"]["mean"]
    assert len(view.predictive_mean_covered["hurdle"]) == len(on_disk["predictive_checks"])
    assert posterior.linear["slope"].shape == (400,)
    assert set(posterior.hurdle) == set(rejection.HURDLE_SITES)
    # The prompt-effect models are fitted and saved beside the pooled ones
    for name, sites in fit.MODEL_SITES.items():
        assert set(posterior.draws(name)) == set(sites), name
        assert on_disk[name]["nuts"]["divergences"] <= DIVERGENCES_MAX, name


def test_fit_main_errors_exit_2_and_keep_files(tmp_path, capsys):
    assert cli_main(["fit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_run(tmp_path, synthetic_records(np.random.default_rng(0), 3, 5))
    rd.write_json(tmp_path / rd.FIT_FILE, {"previous": True})
    assert cli_main(["fit", str(tmp_path), "--measure", "margin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measure 'margin'" in err
    assert json.loads((tmp_path / rd.FIT_FILE).read_text()) == {"previous": True}


def test_nuts_adapts_a_dense_mass_matrix_over_the_global_sites_only():
    # Given hurdle records of 5 prompts
    df = synthetic_records(np.random.default_rng(0), 5, 6)
    u = df["u_temperature_perturbation"].to_numpy(np.float32)
    beta = df["beta"].to_numpy(np.float32)
    _, prompt = np.unique(df["prompt_id"], return_inverse=True)
    pooled = rejection.HurdleGroups(*(jnp.asarray(x) for x in rejection.hurdle_groups(u, beta)))
    groups, group_prompt = rejection.hurdle_prompt_groups(u, beta, prompt)
    per_prompt = (rejection.HurdleGroups(*(jnp.asarray(x) for x in groups)),
                  jnp.asarray(group_prompt), 5, rejection.HurdlePrior())
    # Then the pooled model's block holds every latent site, and the prompt-effect model's
    # holds all but the per-prompt effects (which get a diagonal mass matrix)
    block = fit._global_latent_sites
    assert block(rejection.hurdle_grouped, (pooled, rejection.HurdlePrior())) == (
        rejection.HURDLE_SITES)
    assert block(rejection.hurdle_prompts, per_prompt) == rejection.HURDLE_PROMPT_SITES
