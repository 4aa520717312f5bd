"""Tests of uhlm_jax.rejection: exact likelihood rewrites, pointwise log likelihood and
ArviZ model comparison, correlation and AUROC oracles, and the conjugate posterior."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import log_likelihood
from numpyro.infer.util import log_density
from scipy import stats as scipy_stats

from tests.helpers import TRUE_HURDLE, hurdle_beta, hurdle_data, linear_data, synthetic_records
from uhlm_jax import rejection

# float32 log densities of a few hundred tokens, relative.
LOG_DENSITY_RTOL = 1e-5
# ArviZ sums float32 log densities of hundreds of tokens; the oracle sums them in float64.
FLOAT32_SUM_RTOL = 1e-4
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


def test_pointwise_log_likelihood_matches_a_loop_over_draws():
    # Given 2 chains x 3 draws of the linear model and tokens spanning two chunks
    rng = np.random.default_rng(0)
    draws = {
        "slope": rng.uniform(0.5, 1.0, (2, 3)),
        "intercept": rng.uniform(-0.1, 0.1, (2, 3)),
        "sigma": rng.uniform(0.1, 0.3, (2, 3)),
    }
    u, beta = linear_data(rejection.LOGLIK_CHUNK + 7)
    beta = np.clip(beta, 0, 1)
    # When scored at once
    ll = rejection.pointwise_log_likelihood(rejection.linear_pointwise_loglik, draws, u, beta)
    # Then each (chain, draw) row is the one-draw function on that draw
    assert ll.shape == (2, 3, u.size)
    for c in range(2):
        for d in range(3):
            one = {k: jnp.float32(v[c, d]) for k, v in draws.items()}
            expected = rejection.linear_pointwise_loglik(one, jnp.asarray(u), jnp.asarray(beta))
            np.testing.assert_allclose(ll[c, d], expected, rtol=1e-6, atol=1e-6)


def _waic_by_hand(ll: np.ndarray) -> tuple[float, float, float]:
    """WAIC's elpd, its SE and p_waic from an `(S, n)` log likelihood (Vehtari et al. 2017,
    eqs. 11-13, 23; the variance over draws without Bessel's correction, as ArviZ has it)."""
    lppd = np.log(np.exp(ll).mean(0))
    p = ll.var(0)
    elpd_i = lppd - p
    return float(elpd_i.sum()), float(np.sqrt(elpd_i.size * elpd_i.var())), float(p.sum())


def test_compare_models_matches_waic_by_hand_and_ranks_the_true_model_first():
    # Given hurdle data and posterior-like draws of the two models near their least-squares
    # and true values
    import arviz as az

    u, beta = hurdle_data(600, seed=3)
    rng = np.random.default_rng(1)
    ls = rejection.least_squares(u, beta)
    linear = {k: ls[k] * (1 + 0.02 * rng.standard_normal((2, 200))) for k in ls}
    hurdle = {k: v * (1 + 0.02 * rng.standard_normal((2, 200))) for k, v in TRUE_HURDLE.items()}
    models = {}
    for name, draws, loglik in (
        ("linear", linear, rejection.linear_pointwise_loglik),
        ("hurdle", hurdle, rejection.hurdle_pointwise_loglik),
    ):
        ll = rejection.pointwise_log_likelihood(loglik, draws, u, beta)
        models[name] = az.from_dict(posterior=draws, log_likelihood={"beta": ll})
    # When ArviZ compares them
    table = rejection.compare_models(models)
    # Then the hurdle model, which made the data, ranks first with most stacking weight ...
    assert [r.name for r in table] == ["hurdle", "linear"]
    assert table[0].elpd_diff == 0 and table[1].elpd_diff > 3 * table[1].dse
    assert table[0].weight > 0.5 and sum(r.weight for r in table) == pytest.approx(1.0)
    # ... and each model's WAIC is the textbook formula on the same log likelihood
    for row in table:
        ll = np.asarray(models[row.name].log_likelihood["beta"], np.float64).reshape(400, -1)
        elpd, se, p = _waic_by_hand(ll)
        assert row.elpd_waic == pytest.approx(elpd, rel=FLOAT32_SUM_RTOL)
        assert row.waic_se == pytest.approx(se, rel=FLOAT32_SUM_RTOL)
        assert row.p_waic == pytest.approx(p, rel=FLOAT32_SUM_RTOL)
        # PSIS-LOO and WAIC agree to well within the SE when no draw dominates.
        assert abs(row.elpd_loo - row.elpd_waic) < 0.1 * row.se


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


# --- prompt effects ----------------------------------------------------------------------


def _prompt_data(num_prompts: int, tokens: int, prompt_sd: float, seed: int = 0):
    """Linear data whose intercept varies by prompt with sd `prompt_sd`, β kept in (0, 1)."""
    rng = np.random.default_rng(seed)
    prompt = np.repeat(np.arange(num_prompts), tokens)
    u = rng.uniform(0.3, 0.7, prompt.size).astype(np.float32)
    effect = prompt_sd * rng.standard_normal(num_prompts)
    beta = 0.5 * u + 0.25 + effect[prompt] + 0.05 * rng.standard_normal(prompt.size)
    return u, beta.astype(np.float32), prompt


def test_linear_prompt_marginal_is_the_compound_symmetric_normal():
    # Given tokens strictly inside (0, 1), where the observed-scale likelihood is Gaussian
    u, beta, prompt = _prompt_data(4, 6, 0.05)
    assert 0 < beta.min() and beta.max() < 1
    params = {k: jnp.float32(v) for k, v in
              {"slope": 0.45, "intercept": 0.3, "sigma": 0.06, "prompt_sd": 0.08}.items()}
    # When the prompt effect is integrated out by adaptive quadrature
    got = rejection.linear_prompt_loglik(
        params, jnp.asarray(u), jnp.asarray(beta), jnp.asarray(prompt), 4
    )
    # Then each prompt's log likelihood is the multivariate normal with covariance
    # σ² I + τ² 11ᵀ (a random intercept shared by the prompt's tokens)
    for j in range(4):
        sel = prompt == j
        mean = 0.45 * u[sel] + 0.3
        cov = 0.06**2 * np.eye(sel.sum()) + 0.08**2 * np.ones((sel.sum(),) * 2)
        expected = scipy_stats.multivariate_normal(mean, cov).logpdf(beta[sel])
        assert float(got[j]) == pytest.approx(expected, rel=LOG_DENSITY_RTOL)


def test_hurdle_prompt_marginal_matches_brute_force_integration():
    # Given hurdle tokens of three prompts and one draw with both prompt effects
    rng = np.random.default_rng(5)
    u = (rng.integers(0, 21, 60) / 20).astype(np.float32)
    beta = hurdle_beta(rng, u, *TRUE_HURDLE.values()).astype(np.float32)
    prompt = np.repeat(np.arange(3), 20)
    params = {k: jnp.float32(v) for k, v in TRUE_HURDLE.items()}
    params |= {"positive_prompt_sd": jnp.float32(0.7), "mean_prompt_sd": jnp.float32(0.4)}
    # When the effects are integrated out by adaptive quadrature
    got = rejection.hurdle_prompt_loglik(
        params, jnp.asarray(u), jnp.asarray(beta), jnp.asarray(prompt), 3
    )
    # Then each part matches a fine Riemann sum over the standardised effect
    x = np.linspace(-8, 8, 1601)
    log_phi = scipy_stats.norm.logpdf(x)
    for j in range(3):
        sel = prompt == j
        uj, bj = jnp.asarray(u[sel]), jnp.asarray(beta[sel])
        total = 0.0
        for part, sd in ((rejection.hurdle_positive_loglik, 0.7),
                         (rejection.hurdle_value_loglik, 0.4)):
            ll = np.array([float(jnp.sum(part(params, uj, bj, sd * xi))) for xi in x[::4]])
            total += scipy_special_logsumexp(ll + log_phi[::4]) + np.log(x[4] - x[0])
        assert float(got[j]) == pytest.approx(total, rel=LOG_DENSITY_RTOL)


def scipy_special_logsumexp(x):
    from scipy.special import logsumexp

    return float(logsumexp(x))


def test_pooled_prompt_loglik_is_the_sum_of_its_tokens():
    # Given pooled draws (no prompt sd)
    u, beta, prompt = _prompt_data(5, 7, 0.1)
    draws = {"slope": np.full((1, 2), 0.5), "intercept": np.full((1, 2), 0.2),
             "sigma": np.full((1, 2), 0.1)}
    # When scored per prompt and per token
    per_prompt = rejection.prompt_log_likelihood(
        rejection.linear_prompt_loglik, draws, u, beta, prompt, 5
    )
    per_token = rejection.pointwise_log_likelihood(
        rejection.linear_pointwise_loglik, draws, u, beta
    )
    # Then a prompt's value is the sum over its tokens
    expected = np.stack([per_token[..., prompt == j].sum(-1) for j in range(5)], -1)
    np.testing.assert_allclose(per_prompt, expected, rtol=LOG_DENSITY_RTOL)


def test_prompt_model_likelihoods_are_the_per_token_ones_summed():
    # Given tokens of 6 prompts and one draw of each prompt-effect model, with its z's
    u, beta, prompt = _prompt_data(6, 5, 0.1)
    beta = np.clip(beta, 0.01, 0.99)
    z = np.linspace(-1.5, 1.5, 6).astype(np.float32)
    linear = {"slope": 0.5, "intercept": 0.2, "sigma_sq": 0.01, "prompt_sd": 0.1, "prompt_z": z}
    stats = rejection.LinearStats(
        *(jnp.asarray(x) for x in rejection.prompt_linear_stats(u, beta, prompt, 6))
    )
    # When the sufficient-statistic model scores it
    got, _ = log_density(rejection.linear_gaussian_prompts, (stats,), {}, linear)
    # Then it equals the prior plus the per-token Normal log density with each prompt's
    # intercept
    mu = 0.5 * u + 0.2 + 0.1 * z[prompt]
    expected = scipy_stats.norm.logpdf(beta, mu, 0.1).sum()
    prior = rejection.LinearPrior()
    expected += scipy_stats.invgamma.logpdf(0.01, prior.shape, scale=prior.rate)
    expected += scipy_stats.norm.logpdf([0.5, 0.2], 0, prior.scale * 0.1).sum()
    expected += scipy_stats.halfnorm.logpdf(0.1, scale=prior.prompt_scale)
    expected += scipy_stats.norm.logpdf(z).sum()
    assert float(got) == pytest.approx(expected, rel=LOG_DENSITY_RTOL)
    # ... and the grouped hurdle with prompt effects equals the per-token hurdle
    hb = hurdle_beta(np.random.default_rng(1), u, *TRUE_HURDLE.values()).astype(np.float32)
    groups, group_prompt = rejection.hurdle_prompt_groups(u, hb, prompt)
    hurdle = {k: jnp.float32(v) for k, v in TRUE_HURDLE.items()}
    effects = {"positive_prompt_sd": 0.5, "mean_prompt_sd": 0.3,
               "positive_prompt_z": z, "mean_prompt_z": -z}
    grouped, _ = log_density(
        rejection.hurdle_prompts,
        (rejection.HurdleGroups(*(jnp.asarray(x) for x in groups)), jnp.asarray(group_prompt), 6),
        {},
        hurdle | effects,
    )
    shift_p, shift_m = 0.5 * z[prompt], -0.3 * z[prompt]
    per_token = rejection.hurdle_positive_loglik(hurdle, u, hb, shift_p)
    per_token += rejection.hurdle_value_loglik(hurdle, u, hb, shift_m)
    hp = rejection.HurdlePrior()
    pooled_prior = scipy_stats.norm.logpdf(
        [TRUE_HURDLE[k] for k in rejection.HURDLE_SITES[:4]], 0, hp.logit_scale
    ).sum()
    pooled_prior += scipy_stats.lognorm.logpdf(
        TRUE_HURDLE["concentration"], hp.concentration_log_sd, scale=hp.concentration_median
    )
    effect_prior = scipy_stats.halfnorm.logpdf([0.5, 0.3], scale=1.0).sum()
    effect_prior += 2 * scipy_stats.norm.logpdf(z).sum()
    assert float(grouped) == pytest.approx(
        float(pooled_prior) + float(per_token.sum()) + effect_prior, rel=LOG_DENSITY_RTOL
    )


def test_new_prompt_draws_shift_intercepts_by_the_prompt_sd():
    # Given 20 000 draws with a fixed intercept and prompt sd
    m = 20_000
    draws = {"slope": np.ones(m), "intercept": np.full(m, 0.1), "prompt_sd": np.full(m, 0.2)}
    # When a new prompt's effect is drawn per draw
    out = rejection.new_prompt_draws(np.random.default_rng(0), draws)
    # Then the intercepts scatter with that sd around the population intercept (4 SE) ...
    shifted = out["intercept"]
    assert abs(shifted.mean() - 0.1) < 4 * 0.2 / math.sqrt(m)
    assert abs(shifted.std() - 0.2) < 4 * 0.2 / math.sqrt(2 * m)
    # ... and pooled draws are unchanged
    pooled = {"slope": np.ones(3), "intercept": np.zeros(3)}
    assert rejection.new_prompt_draws(np.random.default_rng(0), pooled) == pooled
