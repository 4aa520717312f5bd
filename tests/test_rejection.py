"""Tests of uhlm_jax.rejection: exact likelihood rewrites, WAIC, correlation and AUROC
oracles, and the conjugate posterior."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import log_likelihood
from numpyro.infer.util import log_density
from scipy import stats as scipy_stats

from tests.helpers import hurdle_beta, synthetic_records
from uhlm_jax import rejection

# float32 log densities of a few hundred tokens, relative.
LOG_DENSITY_RTOL = 1e-5
TRUE_LINEAR = {"slope": 0.82, "intercept": -0.06, "sigma": 0.15}
TRUE_HURDLE = {
    "positive_slope": 4.0,
    "positive_intercept": -2.0,
    "mean_slope": 2.0,
    "mean_intercept": -1.5,
    "concentration": 8.0,
}


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
    stats = rejection.LinearStats(*(jnp.float32(x) for x in rejection.linear_stats(u, beta)))
    for params in (
        {"slope": 0.7, "intercept": -0.03, "sigma_sq": 0.02},
        {"slope": 1.1, "intercept": 0.1, "sigma_sq": 0.05},
    ):
        params = {k: jnp.float32(v) for k, v in params.items()}
        per_token, _ = log_density(
            rejection.linear_gaussian, (jnp.asarray(u), jnp.asarray(beta)), {}, params
        )
        summed, _ = log_density(rejection.linear_gaussian_stats, (stats,), {}, params)
        assert float(summed) == pytest.approx(float(per_token), rel=LOG_DENSITY_RTOL)


def test_grouped_hurdle_gives_the_per_token_log_density():
    u, beta = hurdle_data(400)
    groups = rejection.HurdleGroups(*(jnp.asarray(x) for x in rejection.hurdle_groups(u, beta)))
    assert groups.u.shape[0] <= 21 and float(groups.count.sum()) == 400
    params = {k: jnp.float32(v) for k, v in TRUE_HURDLE.items()}
    per_token, _ = log_density(rejection.hurdle, (jnp.asarray(u), jnp.asarray(beta)), {}, params)
    grouped, _ = log_density(rejection.hurdle_grouped, (groups,), {}, params)
    assert float(grouped) == pytest.approx(float(per_token), rel=LOG_DENSITY_RTOL)


def test_hurdle_pointwise_loglik_matches_numpyro_log_likelihood():
    u, beta = hurdle_data(200)
    draws = {k: jnp.float32(v) + 0.1 * jnp.arange(3.0) for k, v in TRUE_HURDLE.items()}
    sites = log_likelihood(rejection.hurdle, draws, jnp.asarray(u), jnp.asarray(beta))
    expected = sites["positive"] + sites["positive_beta"]
    mine = jax.vmap(rejection.hurdle_pointwise_loglik, in_axes=(0, None, None))(
        draws, jnp.asarray(u), jnp.asarray(beta)
    )
    np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)


def test_linear_pointwise_loglik_is_censored_at_zero_and_one():
    params = {"slope": jnp.float32(0.5), "intercept": jnp.float32(-0.1), "sigma": jnp.float32(0.2)}
    u = jnp.float32([0.4, 0.4, 0.4])
    beta = jnp.float32([0.0, 0.3, 1.0])
    ll = np.asarray(rejection.linear_pointwise_loglik(params, u, beta))
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
    result = rejection.waic(lambda p, u_, b_: -p["theta"] * b_**2 + 0 * u_, draws, u, beta)
    ll = -np.asarray([0.5, 1.0, 2.0])[:, None] * beta.astype(np.float64) ** 2
    lppd = np.log(np.exp(ll).mean(0))
    np.testing.assert_allclose(result.p_i, ll.var(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.elpd_i, lppd - ll.var(0), rtol=1e-4, atol=1e-6)
    assert result.summary()["waic"] == pytest.approx(-2 * (lppd - ll.var(0)).sum(), rel=1e-4)


# --- correlations and AUROC ------------------------------------------------------------


def test_correlations_match_numpy_and_scipy():
    df = synthetic_records(np.random.default_rng(1), 30, 20)
    u = df["u_temperature_perturbation"].to_numpy()
    beta = df["beta"].to_numpy()
    _, prompt = np.unique(df["prompt_id"], return_inverse=True)
    result = rejection.correlations(u, beta, prompt, 30, 200, np.random.default_rng(0))
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
    got = rejection._bootstrap_correlations(u, beta, prompt, counts)
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
        "linear": rejection.replicate_linear(rng, linear, u),
        "hurdle": rejection.replicate_hurdle(rng, hurdle, u),
    }
    samples = {
        "linear": {
            "slope": jnp.asarray(linear["slope"]),
            "intercept": jnp.asarray(linear["intercept"]),
            "sigma_sq": jnp.asarray(linear["sigma"] ** 2),
        },
        "hurdle": {k: jnp.asarray(v) for k, v in hurdle.items()},
    }
    models = {"linear": rejection.linear_gaussian, "hurdle": rejection.hurdle}
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
    got = rejection.average_ranks(x, w)
    scaled = np.asarray(rejection._weighted_midranks(jnp.asarray(w), rejection._rank_groups(x)))
    for value in np.unique(repeated):
        assert got[x == value][0] == expected[repeated == value][0]
        assert scaled[x == value][0] == pytest.approx(expected[repeated == value][0] / w.sum())


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 60).astype(float)
    label = rng.random(60) < 0.4
    pos, neg = score[label], score[~label]
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    assert rejection.auroc(score, label) == pytest.approx(np.mean(pairs), abs=1e-12)
    np.testing.assert_array_equal(
        rejection.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0]
    )
    assert np.isnan(rejection.auroc(score, np.ones(60, bool)))


# --- exact posterior -------------------------------------------------------------------


def test_conjugate_posterior_against_least_squares_and_its_own_draws():
    u, beta = linear_data(2000, seed=3)
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    post = rejection.conjugate_posterior(
        2000, u64.sum(), b64.sum(), u64 @ u64, u64 @ b64, b64 @ b64
    )
    moments = post.moments()
    ls = rejection.least_squares(u, beta)
    # The prior is weak: the posterior mean is least squares up to a tiny ridge.
    assert abs(moments["slope"]["mean"] - ls["slope"]) < 0.01 * moments["slope"]["sd"]
    assert abs(moments["intercept"]["mean"] - ls["intercept"]) < 0.01 * moments["intercept"]["sd"]
    # The ordinary least-squares standard error is the posterior sd, to O(1/n).
    x = np.stack([u64, np.ones_like(u64)], 1)
    se = ls["sigma"] * np.sqrt(np.diag(np.linalg.inv(x.T @ x)))
    assert moments["slope"]["sd"] == pytest.approx(se[0], rel=0.01)
    slope, intercept, sigma = rejection.sample_conjugate(np.random.default_rng(0), post, 20_000)
    assert slope.mean() == pytest.approx(
        moments["slope"]["mean"], abs=4 * se[0] / math.sqrt(20_000)
    )
    assert slope.std() == pytest.approx(moments["slope"]["sd"], rel=0.03)
    assert sigma.mean() == pytest.approx(ls["sigma"], rel=0.01)


def test_batched_conjugate_posterior_matches_one_at_a_time():
    rng = np.random.default_rng(0)
    sums = np.abs(rng.normal(size=(4, 6))) * 50 + np.array([200, 0, 0, 100, 0, 100])
    batched = rejection.conjugate_posterior(*sums.T)
    for k in range(4):
        one = rejection.conjugate_posterior(*sums[k])
        np.testing.assert_allclose(batched.mean[k], one.mean)
        np.testing.assert_allclose(batched.rate[k], one.rate)


def test_plug_in_thresholds_hand_checked():
    # Given tokens exactly on the paper's line β = 0.82 u − 0.06 where it is positive
    u = np.linspace(0.1, 1.0, 10)
    beta = 0.82 * u - 0.06
    # When the least-squares line is pushed through the paper's formulas
    plug_in = rejection.plug_in_thresholds(u, beta)
    # Then a, b are recovered, Δ is the share of β > 0 (all), and the thresholds are
    # −b/a and (Δ − b)/a clipped to [0, 1].
    assert plug_in.slope == pytest.approx(0.82) and plug_in.intercept == pytest.approx(-0.06)
    assert plug_in.rejection_share == 1.0
    assert round(plug_in.risk_averse.threshold, 4) == 0.0732
    assert plug_in.risk_averse.reason is None
    # (Δ − b)/a = 1.06/0.82 leaves [0, 1]: clipped to 1, and it says so.
    assert plug_in.risk_prone.threshold == 1.0
    assert plug_in.risk_prone.raw == pytest.approx(1.06 / 0.82)
    assert plug_in.risk_prone.reason == (
        "(Δ − b)/a = 1.293 > 1: risk-prone skips everything (SLM-only)"
    )
    # A line that does not rise gives no thresholds.
    flat = rejection.plug_in_thresholds(u, 0.5 - 0.2 * u)
    assert flat.slope == pytest.approx(-0.2)
    assert math.isnan(flat.risk_averse.threshold) and math.isnan(flat.risk_prone.threshold)


def test_pearson_and_spearman_match_numpy_and_scipy():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, 200).astype(float)
    y = x + rng.normal(0, 2, 200)
    assert rejection.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert rejection.spearman(x, y) == pytest.approx(
        scipy_stats.spearmanr(x, y).statistic, rel=1e-12
    )
    # Weights count tokens: weight 2 is the token repeated.
    w = rng.integers(0, 3, 200)
    assert rejection.pearson(x, y, w) == pytest.approx(
        np.corrcoef(np.repeat(x, w), np.repeat(y, w))[0, 1], rel=1e-12
    )
    assert math.isnan(rejection.pearson(np.ones(5), np.arange(5.0)))
