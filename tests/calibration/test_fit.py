"""Tests of calibration.fit and calibration.records: exact likelihood rewrites, WAIC and
correlation oracles, the conjugate posterior, parameter recovery by NUTS and SVI, and a
smoke run of the job."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpyro.infer import log_likelihood
from numpyro.infer.util import log_density
from scipy import stats as scipy_stats

from calibration import fit, records
from tests.calibration import hurdle_beta, synthetic_records, write_run

# float32 log densities of a few hundred tokens, relative.
LOG_DENSITY_RTOL = 1e-5
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
TRUE_LINEAR = {"slope": 0.82, "intercept": -0.06, "sigma": 0.15}
TRUE_HURDLE = {
    "positive_slope": 4.0,
    "positive_intercept": -2.0,
    "mean_slope": 2.0,
    "mean_intercept": -1.5,
    "concentration": 8.0,
}
SMALL = {"num_warmup": 300, "num_samples": 300}


def small_config(run_dir, **kw) -> fit.Config:
    return fit.Config(run_dir=str(run_dir), svi_steps=1500, num_bootstrap=100, **SMALL, **kw)


def linear_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, n).astype(np.float32)
    beta = TRUE_LINEAR["slope"] * u + TRUE_LINEAR["intercept"]
    beta = (beta + TRUE_LINEAR["sigma"] * rng.standard_normal(n)).astype(np.float32)
    return u, beta


def hurdle_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = (rng.integers(0, 21, n) / 20).astype(np.float32)
    return u, hurdle_beta(rng, u, *TRUE_HURDLE.values()).astype(np.float32)


# --- exact rewrites of the likelihoods -------------------------------------------------


def test_sufficient_statistics_give_the_per_token_log_density():
    u, beta = linear_data(300)
    stats = fit.LinearStats(*(jnp.float32(x) for x in fit.linear_stats(u, beta)))
    for params in (
        {"slope": 0.7, "intercept": -0.03, "sigma_sq": 0.02},
        {"slope": 1.1, "intercept": 0.1, "sigma_sq": 0.05},
    ):
        params = {k: jnp.float32(v) for k, v in params.items()}
        per_token, _ = log_density(
            fit.linear_gaussian, (jnp.asarray(u), jnp.asarray(beta)), {}, params
        )
        summed, _ = log_density(fit.linear_gaussian_stats, (stats,), {}, params)
        assert float(summed) == pytest.approx(float(per_token), rel=LOG_DENSITY_RTOL)


def test_grouped_hurdle_gives_the_per_token_log_density():
    u, beta = hurdle_data(400)
    groups = fit.HurdleGroups(*(jnp.asarray(x) for x in fit.hurdle_groups(u, beta)))
    assert groups.u.shape[0] <= 21 and float(groups.count.sum()) == 400
    params = {k: jnp.float32(v) for k, v in TRUE_HURDLE.items()}
    per_token, _ = log_density(fit.hurdle, (jnp.asarray(u), jnp.asarray(beta)), {}, params)
    grouped, _ = log_density(fit.hurdle_grouped, (groups,), {}, params)
    assert float(grouped) == pytest.approx(float(per_token), rel=LOG_DENSITY_RTOL)


def test_hurdle_pointwise_loglik_matches_numpyro_log_likelihood():
    u, beta = hurdle_data(200)
    draws = {k: jnp.float32(v) + 0.1 * jnp.arange(3.0) for k, v in TRUE_HURDLE.items()}
    sites = log_likelihood(fit.hurdle, draws, jnp.asarray(u), jnp.asarray(beta))
    expected = sites["positive"] + sites["positive_beta"]
    mine = jax.vmap(fit.hurdle_pointwise_loglik, in_axes=(0, None, None))(
        draws, jnp.asarray(u), jnp.asarray(beta)
    )
    np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)


def test_linear_pointwise_loglik_is_censored_at_zero_and_one():
    params = {"slope": jnp.float32(0.5), "intercept": jnp.float32(-0.1), "sigma": jnp.float32(0.2)}
    u = jnp.float32([0.4, 0.4, 0.4])
    beta = jnp.float32([0.0, 0.3, 1.0])
    ll = np.asarray(fit.linear_pointwise_loglik(params, u, beta))
    mu, s = 0.1, 0.2
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert ll[0] == pytest.approx(math.log(phi(-mu / s)), rel=1e-5)
    assert ll[1] == pytest.approx(
        -0.5 * ((0.3 - mu) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)), rel=1e-5
    )
    assert ll[2] == pytest.approx(math.log(phi((mu - 1) / s)), rel=1e-4)


def test_waic_matches_direct_formula():
    # Given a model whose pointwise log likelihood is −θ·β² over three draws
    draws = {"theta": jnp.float32([0.5, 1.0, 2.0])}
    u = np.zeros(5000, np.float32)  # spans two chunks
    beta = np.linspace(0, 1, 5000).astype(np.float32)
    result = fit.waic(lambda p, u_, b_: -p["theta"] * b_**2 + 0 * u_, draws, u, beta)
    ll = -np.asarray([0.5, 1.0, 2.0])[:, None] * beta.astype(np.float64) ** 2
    lppd = np.log(np.exp(ll).mean(0))
    np.testing.assert_allclose(result.p_i, ll.var(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.elpd_i, lppd - ll.var(0), rtol=1e-4, atol=1e-6)
    assert result.summary()["waic"] == pytest.approx(-2 * (lppd - ll.var(0)).sum(), rel=1e-4)


# --- correlations ----------------------------------------------------------------------


def test_correlations_match_numpy_and_scipy():
    df = synthetic_records(np.random.default_rng(1), 30, 20)
    u = df["u_temperature_perturbation"].to_numpy()
    beta = df["beta"].to_numpy()
    _, prompt = np.unique(df["prompt_id"], return_inverse=True)
    result = fit.correlations(u, beta, prompt, 30, 200, np.random.default_rng(0))
    assert result["pearson"]["estimate"] == pytest.approx(np.corrcoef(u, beta)[0, 1], rel=1e-9)
    assert result["spearman"]["estimate"] == pytest.approx(
        scipy_stats.spearmanr(u, beta).statistic, rel=1e-9
    )
    for name in ("pearson", "spearman"):
        lo, hi = result[name]["interval"]
        assert lo < result[name]["estimate"] < hi


def test_bootstrap_replicate_equals_correlations_of_the_repeated_sample():
    # Given prompt counts of one bootstrap replicate
    df = synthetic_records(np.random.default_rng(4), 12, 15)
    u = df["u_temperature_perturbation"].to_numpy(np.float64)
    beta = df["beta"].to_numpy(np.float64)
    _, prompt = np.unique(df["prompt_id"], return_inverse=True)
    counts = np.array([[2, 0, 1, 1, 3, 0, 0, 1, 2, 1, 0, 1], [1] * 12])
    got = fit._bootstrap_correlations(u, beta, prompt, counts)
    for row, c in zip(got, counts, strict=True):
        # Then it equals the statistics of the sample with each prompt copied c times.
        repeat = c[prompt]
        u_rep, beta_rep = np.repeat(u, repeat), np.repeat(beta, repeat)
        assert row[0] == pytest.approx(np.corrcoef(u_rep, beta_rep)[0, 1], abs=1e-5)
        assert row[1] == pytest.approx(scipy_stats.spearmanr(u_rep, beta_rep).statistic, abs=1e-5)


def test_replicates_match_numpyro_predictive_in_distribution():
    # The NumPy replicates of the PPC and numpyro's Predictive of the per-token models
    # sample the same law: compare means and shares of β > 0 within Monte Carlo error.
    from numpyro.infer import Predictive

    u = np.linspace(0, 1, 50).astype(np.float32)
    reps = 4000
    linear = {
        "slope": np.full(reps, 0.8),
        "intercept": np.full(reps, -0.1),
        "sigma": np.full(reps, 0.2),
    }
    hurdle = {k: np.full(reps, v) for k, v in TRUE_HURDLE.items()}
    rng = np.random.default_rng(0)
    ours = {
        "linear": fit.replicate_linear(rng, linear, u),
        "hurdle": fit.replicate_hurdle(rng, hurdle, u),
    }
    samples = {
        "linear": {
            "slope": jnp.asarray(linear["slope"]),
            "intercept": jnp.asarray(linear["intercept"]),
            "sigma_sq": jnp.asarray(linear["sigma"] ** 2),
        },
        "hurdle": {k: jnp.asarray(v) for k, v in hurdle.items()},
    }
    models = {"linear": fit.linear_gaussian, "hurdle": fit.hurdle}
    for name, model in models.items():
        theirs = np.asarray(
            Predictive(model, posterior_samples=samples[name], return_sites=["beta"])(
                jax.random.key(1), jnp.asarray(u)
            )["beta"]
        )
        for stat in (lambda x: x, lambda x: (x > 1e-6).astype(np.float64)):
            a, b = stat(ours[name]), stat(theirs)
            se = np.sqrt(a.var(0) / reps + b.var(0) / reps) + 1e-12
            assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4.5 * se), name


def test_weighted_ranks_equal_ranks_of_the_repeated_sample():
    x = np.array([0.3, 0.1, 0.3, 0.0, 0.7])
    w = np.array([2.0, 1.0, 0.0, 3.0, 1.0])
    repeated = np.repeat(x, w.astype(int))
    expected = scipy_stats.rankdata(repeated)
    got = fit._Ranker(x)(w)
    scaled = np.asarray(fit._weighted_midranks(jnp.asarray(w), fit._rank_groups(x)))
    for value in np.unique(repeated):
        assert got[x == value][0] == expected[repeated == value][0]
        assert scaled[x == value][0] == pytest.approx(expected[repeated == value][0] / w.sum())


# --- exact posterior -------------------------------------------------------------------


def test_conjugate_posterior_against_least_squares_and_its_own_draws():
    u, beta = linear_data(2000, seed=3)
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    post = fit.conjugate_posterior(2000, u64.sum(), b64.sum(), u64 @ u64, u64 @ b64, b64 @ b64)
    moments = post.moments()
    ls = fit.least_squares(u, beta)
    # The prior is weak: the posterior mean is least squares up to a tiny ridge.
    assert abs(moments["slope"]["mean"] - ls["slope"]) < 0.01 * moments["slope"]["sd"]
    assert abs(moments["intercept"]["mean"] - ls["intercept"]) < 0.01 * moments["intercept"]["sd"]
    # The ordinary least-squares standard error is the posterior sd, to O(1/n).
    x = np.stack([u64, np.ones_like(u64)], 1)
    se = ls["sigma"] * np.sqrt(np.diag(np.linalg.inv(x.T @ x)))
    assert moments["slope"]["sd"] == pytest.approx(se[0], rel=0.01)
    slope, intercept, sigma = fit.sample_conjugate(np.random.default_rng(0), post, 20_000)
    assert slope.mean() == pytest.approx(
        moments["slope"]["mean"], abs=4 * se[0] / math.sqrt(20_000)
    )
    assert slope.std() == pytest.approx(moments["slope"]["sd"], rel=0.03)
    assert sigma.mean() == pytest.approx(ls["sigma"], rel=0.01)


# --- parameter recovery ----------------------------------------------------------------


def test_nuts_and_svi_recover_the_linear_model():
    # Given 400 tokens from β = 0.82 u − 0.06 + 0.15 ε
    u, beta = linear_data(400, seed=4)
    cfg = fit.Config(run_dir=".", svi_steps=3000, **SMALL)
    ls = fit.least_squares(u, beta)
    init = {"slope": ls["slope"], "intercept": ls["intercept"], "sigma_sq": ls["sigma"] ** 2}
    stats = fit.LinearStats(*(jnp.float32(x) for x in fit.linear_stats(u, beta)))
    # When NUTS and SVI fit the sufficient-statistic model
    draws, nuts = fit.run_nuts(
        fit.linear_gaussian_stats,
        (stats, cfg.linear_prior),
        fit.LINEAR_SITES,
        cfg,
        jax.random.key(0),
        init,
    )
    _, svi = fit.run_svi(stats, cfg, jax.random.key(1), init, 4000)
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    exact = fit.conjugate_posterior(400, u64.sum(), b64.sum(), u64 @ u64, u64 @ b64, b64 @ b64)
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
    groups = fit.HurdleGroups(*(jnp.asarray(x) for x in fit.hurdle_groups(u, beta)))
    _, nuts = fit.run_nuts(
        fit.hurdle_grouped,
        (groups, cfg.hurdle_prior),
        fit.HURDLE_SITES,
        cfg,
        jax.random.key(2),
        None,
    )
    assert nuts["divergences"] == 0
    for site, truth in TRUE_HURDLE.items():
        p = nuts["params"][site]
        assert abs(p["mean"] - truth) < RECOVERY_SDS * p["sd"], site
        assert p["r_hat"] < R_HAT_MAX, site


# --- records ---------------------------------------------------------------------------


def test_records_round_trip_sorted_with_dtypes(tmp_path):
    df = synthetic_records(np.random.default_rng(2), 5, 4)
    write_run(tmp_path, df, num_shards=3)
    back = records.read_records(tmp_path)
    expected = df.sort_values(["prompt_id", "position"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert back["position"].dtype == np.int32 and back["beta"].dtype == np.float32
    assert records.measure_names(back.columns) == ["temperature_perturbation", "entropy"]
    assert not list((tmp_path / records.RECORDS_DIR).glob(".*"))  # no temporary files left


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
    records.write_json(path, {"good": 1})
    with pytest.raises(ValueError):
        records.write_json(path, {"bad": float("nan")})
    with pytest.raises(TypeError):
        records.write_json(path, {"bad": object()})
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
            "--json",
        ]
    )
    assert fit.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((tmp_path / fit.FIT_FILE).read_text())
    assert printed == on_disk
    assert on_disk["data"]["num_tokens"] == 300 and on_disk["data"]["num_prompts"] == 20
    assert on_disk["comparison"]["preferred"] == "hurdle"  # the data are hurdle data
    assert len(on_disk["predictive_checks"]) >= 5
    posterior = fit.load_posterior(tmp_path)
    assert posterior.linear["slope"].shape == (400,)
    assert set(posterior.hurdle) == set(fit.HURDLE_SITES)


def test_fit_main_errors_exit_2_and_keep_files(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    fit.add_arguments(parser)
    assert fit.main(parser.parse_args([str(tmp_path / "missing")])) == 2
    assert "does not exist" in capsys.readouterr().err
    write_run(tmp_path, synthetic_records(np.random.default_rng(0), 3, 5))
    records.write_json(tmp_path / fit.FIT_FILE, {"previous": True})
    assert fit.main(parser.parse_args([str(tmp_path), "--measure", "margin"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measure 'margin'" in err
    assert json.loads((tmp_path / fit.FIT_FILE).read_text()) == {"previous": True}
