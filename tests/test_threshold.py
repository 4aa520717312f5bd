"""Tests of uhlm_jax.threshold: hand-computed values, loops vs vmap, jit vs eager,
an exact binomial/Hoeffding oracle for the p-value, and Learn-then-Test coverage."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax import threshold as T

# float32 arithmetic on O(1) quantities.
F32_TOL = 1e-6
# float32 incomplete beta against exact rational arithmetic, relative.
PVALUE_RTOL = 1e-3
# Monte Carlo checks: allowed excess in standard errors.
MC_SIGMAS = 4.0


def f32(x):
    return jnp.asarray(x, jnp.float32)


# --- analytic thresholds ---------------------------------------------------------------


def test_paper_thresholds_hand_checked():
    # Given the paper's TinyLlama/Llama-2 fit a = 0.82, b = −0.06 and Δ = 0.29
    a, b, delta = f32(0.82), f32(-0.06), f32(0.29)
    # Then −b/a = 0.0732 and (Δ − b)/a = 0.4268 to four decimals.
    assert round(float(T.risk_averse(a, b)), 4) == 0.0732
    assert round(float(T.risk_prone(a, b, delta)), 4) == 0.4268
    assert float(T.risk_averse(a, b)) == pytest.approx(0.06 / 0.82, abs=F32_TOL)
    assert float(T.risk_prone(a, b, delta)) == pytest.approx(0.35 / 0.82, abs=F32_TOL)


@pytest.mark.parametrize(
    "slope, intercept, delta, averse, prone",
    [
        (0.5, 0.1, 0.3, 0.0, 0.4),  # b > 0: nothing is predicted rejection-free
        (0.1, -0.2, 0.5, 1.0, 1.0),  # crossing beyond 1 clips
        (0.0, -0.1, 0.2, 1.0, 1.0),  # flat line below 0 and Δ: everything qualifies
        (-0.3, 0.05, 0.2, 0.0, 1.0),  # falling line starting above 0 but below Δ
        (-0.3, 0.25, 0.2, 0.0, 0.0),  # falling line starting above Δ
    ],
)
def test_thresholds_clip_and_handle_flat_lines(slope, intercept, delta, averse, prone):
    assert float(T.risk_averse(f32(slope), f32(intercept))) == pytest.approx(averse, abs=F32_TOL)
    assert float(T.risk_prone(f32(slope), f32(intercept), f32(delta))) == pytest.approx(
        prone, abs=F32_TOL
    )


@pytest.mark.parametrize(
    "rule, slope, intercept, delta, raw, threshold, reason",
    [
        (T.PaperRule.RISK_PRONE, 0.5, 0.02, 0.54, 1.04, 1.0,
         "(Δ − b)/a = 1.04 > 1: risk-prone skips everything (SLM-only)"),
        (T.PaperRule.RISK_AVERSE, 0.5, 0.1, None, -0.2, 0.0,
         "−b/a = -0.2 < 0: risk-averse skips only tokens with u = 0"),
        (T.PaperRule.RISK_AVERSE, 0.82, -0.06, None, 0.06 / 0.82, 0.06 / 0.82, None),
        (T.PaperRule.RISK_PRONE, 0.82, -0.06, 0.29, 0.35 / 0.82, 0.35 / 0.82, None),
    ],
)  # fmt: skip
def test_paper_threshold_states_raw_value_clipped_value_and_reason(
    rule, slope, intercept, delta, raw, threshold, reason
):
    paper = T.paper_threshold(rule, slope, intercept, delta)
    assert paper.raw == pytest.approx(raw, rel=1e-12)
    assert paper.threshold == pytest.approx(threshold, abs=F32_TOL)
    assert paper.reason == reason


def test_paper_threshold_of_a_falling_line_is_undefined_with_its_reason():
    paper = T.paper_threshold(T.PaperRule.RISK_PRONE, -0.2, 0.5, 0.3)
    assert math.isnan(paper.raw) and math.isnan(paper.threshold)
    assert paper.reason.startswith("slope a = -0.2 ≤ 0")
    with pytest.raises(ValueError, match="needs delta"):
        T.paper_threshold(T.PaperRule.RISK_PRONE, 0.5, 0.0)


def test_thresholds_vmap_matches_loop():
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.2, 1.5, 64).astype(np.float32)
    b = rng.uniform(-0.5, 0.3, 64).astype(np.float32)
    d = rng.uniform(0.0, 1.0, 64).astype(np.float32)
    batched_averse = jax.vmap(T.risk_averse)(a, b)
    batched_prone = jax.vmap(T.risk_prone)(a, b, d)
    for i in range(64):
        assert float(batched_averse[i]) == float(T.risk_averse(f32(a[i]), f32(b[i])))
        assert float(batched_prone[i]) == float(T.risk_prone(f32(a[i]), f32(b[i]), f32(d[i])))
        # Independent oracle in Python floats.
        if a[i] > 0:
            expected = min(max((float(d[i]) - float(b[i])) / float(a[i]), 0.0), 1.0)
            assert float(batched_prone[i]) == pytest.approx(expected, abs=1e-5)


def test_check_linear_model_rejects_non_positive_slope():
    T.check_linear_model(0.82, -0.06)
    with pytest.raises(ValueError, match=r"slope -0\.3 must be > 0"):
        T.check_linear_model(-0.3, 0.1)
    with pytest.raises(ValueError, match=r"slope 0\.0 must be > 0"):
        T.check_linear_model(0.0, 0.1)
    with pytest.raises(ValueError, match="finite"):
        T.check_linear_model(float("nan"), 0.1)


def test_rejection_share_uses_tolerance():
    beta = f32([0.0, 1e-7, T.BETA_POSITIVE_TOL, 2e-6, 0.5, 1.0])
    assert float(T.rejection_share(beta)) == pytest.approx(3 / 6)


# --- risk ------------------------------------------------------------------------------


def test_empirical_risk_hand_computed():
    u = f32([0.1, 0.2, 0.5, 0.9])
    beta = f32([0.0, 0.1, 0.3, 0.8])
    risk = T.empirical_risk(u, beta, f32(0.5))  # skips the first three (u = 0.5 included)
    assert float(risk.per_token) == pytest.approx(0.4 / 4, abs=F32_TOL)
    assert float(risk.skip_rate) == pytest.approx(0.75, abs=F32_TOL)
    assert float(risk.given_skip) == pytest.approx(0.4 / 3, abs=F32_TOL)
    assert float(T.skip_rate(u, f32(0.5))) == pytest.approx(0.75, abs=F32_TOL)
    nothing = T.empirical_risk(u, beta, f32(0.05))
    assert (float(nothing.per_token), float(nothing.given_skip), float(nothing.skip_rate)) == (
        0.0,
        0.0,
        0.0,
    )


def test_linear_model_risk_hand_computed():
    # clip(0.5 u − 0.1) at u = 0, 0.4, 0.6, 1.0 is 0, 0.1, 0.2, 0.4.
    u = f32([0.0, 0.4, 0.6, 1.0])
    risk = T.linear_model_risk(f32(0.5), f32(-0.1), u, f32(0.6))
    assert float(risk.per_token) == pytest.approx(0.3 / 4, abs=F32_TOL)
    assert float(risk.skip_rate) == pytest.approx(0.75, abs=F32_TOL)
    assert float(risk.given_skip) == pytest.approx(0.1, abs=F32_TOL)


def test_risk_functions_vmap_over_thresholds_match_loop_and_jit():
    rng = np.random.default_rng(2)
    u = jnp.asarray(rng.uniform(0, 1, 300), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, 300) * (rng.uniform(0, 1, 300) < 0.3), jnp.float32)
    thresholds = jnp.linspace(0.0, 1.0, 17)
    batched = jax.vmap(T.empirical_risk, in_axes=(None, None, 0))(u, beta, thresholds)
    jitted = jax.jit(jax.vmap(T.linear_model_risk, in_axes=(None, None, None, 0)))(
        f32(0.7), f32(-0.05), u, thresholds
    )
    for k, t in enumerate(thresholds):
        one = T.empirical_risk(u, beta, t)
        assert float(batched.per_token[k]) == pytest.approx(float(one.per_token), abs=F32_TOL)
        assert float(batched.given_skip[k]) == pytest.approx(float(one.given_skip), abs=F32_TOL)
        eager = T.linear_model_risk(f32(0.7), f32(-0.05), u, t)
        assert float(jitted.per_token[k]) == pytest.approx(float(eager.per_token), abs=F32_TOL)


def test_threshold_sweep_compiles_once():
    u = jnp.linspace(0.0, 1.0, 50)
    beta = u**2

    @jax.jit
    @chex.assert_max_traces(n=1)
    def per_token(u_th):
        return T.empirical_risk(u, beta, u_th).per_token

    for t in np.linspace(0.0, 1.0, 7):
        per_token(f32(t))


def test_risk_curve_matches_pointwise_risk_including_ties():
    # u values sit exactly on grid points, where `u ≤ u_th` must include them.
    grid = jnp.linspace(0.0, 1.0, 11)
    rng = np.random.default_rng(3)
    u = jnp.asarray(rng.choice(np.asarray(grid), 400), jnp.float32)
    u = u.at[:5].set(1.5)  # beyond the grid: never skipped
    beta = jnp.asarray(rng.uniform(0, 1, 400), jnp.float32)
    weight = jnp.asarray(rng.integers(0, 3, 400), jnp.float32)
    curve = T.risk_curve(beta, u, grid)
    weighted = T.risk_curve(beta, u, grid, weight)
    for k, t in enumerate(np.asarray(grid)):
        skipped = np.asarray(u) <= t
        expected = float(np.mean(np.asarray(beta) * skipped))
        assert float(curve[k]) == pytest.approx(expected, abs=F32_TOL)
        w = np.asarray(weight)
        expected_w = float(np.sum(w * np.asarray(beta) * skipped) / np.sum(w))
        assert float(weighted[k]) == pytest.approx(expected_w, abs=F32_TOL)


def test_prompt_risk_curves_match_loop():
    rng = np.random.default_rng(4)
    num_prompts, n = 7, 120
    prompt = rng.integers(0, num_prompts - 1, n)  # the last prompt gets no tokens
    u = rng.uniform(0, 1, n).astype(np.float32)
    beta = rng.uniform(0, 1, n).astype(np.float32)
    grid = np.linspace(0.0, 1.0, 9).astype(np.float32)
    curves = T.prompt_risk_curves(
        jnp.asarray(u), jnp.asarray(beta), jnp.asarray(prompt), num_prompts, jnp.asarray(grid)
    )
    assert curves.shape == (num_prompts, grid.size)
    for i in range(num_prompts):
        mine = prompt == i
        for k, t in enumerate(grid):
            expected = float(np.mean(beta[mine] * (u[mine] <= t))) if mine.any() else 0.0
            assert float(curves[i, k]) == pytest.approx(expected, abs=F32_TOL)


# --- Learn-then-Test -------------------------------------------------------------------


def _hb_pvalue_exact(risk_hat: float, n: int, eps: float) -> float:
    """Hoeffding–Bentkus in Python floats with an exact binomial tail."""
    r = min(risk_hat, eps)
    kl = (r * math.log(r / eps) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - eps))
    k = math.ceil(n * risk_hat)
    tail = sum(math.comb(n, i) * eps**i * (1 - eps) ** (n - i) for i in range(min(k, n) + 1))
    return min(math.exp(-n * kl), math.e * tail, 1.0)


@pytest.mark.parametrize(
    "risk_hat, n, eps",
    [(0.05, 100, 0.1), (0.0, 20, 0.1), (0.12, 50, 0.1), (0.031, 500, 0.05), (0.02, 2000, 0.05)],
)
def test_hoeffding_bentkus_matches_exact_binomial(risk_hat, n, eps):
    p = float(T.hoeffding_bentkus_pvalue(f32(risk_hat), f32(n), f32(eps)))
    assert p == pytest.approx(_hb_pvalue_exact(risk_hat, n, eps), rel=PVALUE_RTOL)


def test_hoeffding_bentkus_zero_risk_is_hoeffding_term():
    # R̂ = 0: Hoeffding gives (1 − ε)^n, Bentkus e·(1 − ε)^n, so the minimum is (1 − ε)^n.
    p = float(T.hoeffding_bentkus_pvalue(f32(0.0), f32(30), f32(0.1)))
    assert p == pytest.approx(0.9**30, rel=PVALUE_RTOL)


def test_hoeffding_bentkus_is_valid_under_the_null():
    # Given n Bernoulli(ε) losses (the boundary of H0: R > ε), P(p ≤ δ) ≤ δ.
    n, eps, delta, reps = 60, 0.2, 0.1, 20_000
    losses = jax.random.bernoulli(jax.random.key(5), eps, (reps, n)).astype(jnp.float32)
    p = jax.vmap(T.hoeffding_bentkus_pvalue, in_axes=(0, None, None))(
        losses.mean(1), f32(n), f32(eps)
    )
    freq = float(jnp.mean(p <= delta))
    assert freq <= delta + MC_SIGMAS * math.sqrt(delta * (1 - delta) / reps)


@pytest.mark.parametrize(
    "pvalues, expected",
    [([0.01, 0.02, 0.2, 0.01], 1), ([0.01, 0.01, 0.01], 2), ([0.3, 0.01], -1)],
)
def test_fixed_sequence_index(pvalues, expected):
    assert int(T.fixed_sequence_index(f32(pvalues), f32(0.05))) == expected


def test_ltt_threshold_hand_case_and_no_skip():
    grid = f32([0.1, 0.2, 0.3])
    # 100 prompts: risk 0 at 0.1, 0.01 at 0.2, 0.3 at 0.3.
    risks = jnp.tile(f32([[0.0, 0.01, 0.3]]), (100, 1))
    result = T.ltt_threshold(risks, grid, f32(0.1), f32(0.1))
    expected_p = [_hb_pvalue_exact(r, 100, 0.1) for r in (0.0, 0.01, 0.3)]
    np.testing.assert_allclose(result.pvalues, expected_p, rtol=PVALUE_RTOL)
    assert expected_p[0] < 0.1 and expected_p[1] < 0.1 and expected_p[2] > 0.1
    assert int(result.index) == 1 and float(result.threshold) == pytest.approx(0.2)
    # Only 5 calibration prompts cannot certify anything: skip nothing.
    mask = jnp.zeros(100).at[:5].set(1.0)
    few = T.ltt_threshold(risks, grid, f32(0.1), f32(0.1), mask)
    assert int(few.index) == -1 and float(few.threshold) == T.NO_SKIP
    assert float(few.num_prompts) == 5.0


def test_ltt_coverage_on_synthetic_data_with_known_risk():
    # Given prompts of T tokens with u ~ U(0, 1) and β | u ~ Bernoulli(u),
    # the risk is R(t) = E[β 1{u ≤ t}] = t²/2, so R(t) > ε iff t > sqrt(2ε).
    splits, prompts, tokens = 300, 400, 5
    eps, delta = 0.1, 0.1
    grid = jnp.linspace(0.0, 1.0, 101)
    u_key, beta_key = jax.random.split(jax.random.key(6))
    u = jax.random.uniform(u_key, (splits, prompts * tokens))
    beta = jax.random.bernoulli(beta_key, u).astype(jnp.float32)
    prompt_index = jnp.repeat(jnp.arange(prompts), tokens)

    def one_split(u_s, beta_s):
        risks = T.prompt_risk_curves(u_s, beta_s, prompt_index, prompts, grid)
        return T.ltt_threshold(risks, grid, f32(eps), f32(delta)).threshold

    thresholds = jax.jit(jax.vmap(one_split))(u, beta)
    true_risk = jnp.where(thresholds > T.NO_SKIP, jnp.maximum(thresholds, 0.0) ** 2 / 2, 0.0)
    violation = float(jnp.mean(true_risk > eps))
    # Then violations happen in at most δ of the splits (plus Monte Carlo error) ...
    assert violation <= delta + MC_SIGMAS * math.sqrt(delta * (1 - delta) / splits)
    # ... and the test is not vacuous: LTT certifies thresholds with real skipping.
    assert float(jnp.mean(thresholds > 0.3)) > 0.9


# --- posterior risk-bounded threshold --------------------------------------------------


def test_risk_bounded_index_hand_case():
    curves = f32([[0.00, 0.01, 0.05, 0.20], [0.00, 0.02, 0.12, 0.30], [0.0, 0.03, 0.04, 0.06]])
    # P(R ≤ 0.1) per grid point: 1, 1, 2/3, 1/3.
    assert int(T.risk_bounded_index(curves, f32(0.1), f32(0.2))) == 1
    assert int(T.risk_bounded_index(curves, f32(0.1), f32(0.4))) == 2
    assert int(T.risk_bounded_index(curves, f32(0.001), f32(0.4))) == 0
    assert int(T.risk_bounded_index(curves + 0.5, f32(0.1), f32(0.4))) == -1


def test_risk_bounded_threshold_point_mass_posterior_matches_loop():
    # With every draw equal, the threshold is the largest grid point whose risk is ≤ ε.
    u = jax.random.uniform(jax.random.key(7), (500,))
    grid = jnp.linspace(0.0, 1.0, 51)
    a, b, eps = 0.82, -0.06, 0.05
    draws = jnp.full((20,), a), jnp.full((20,), b)
    got = float(T.risk_bounded_threshold(*draws, u, grid, f32(eps), f32(0.1)))
    risk_at = jax.jit(lambda t: T.linear_model_risk(f32(a), f32(b), u, t).per_token)
    risks = [float(risk_at(t)) for t in grid]
    expected = max(float(t) for t, r in zip(grid, risks, strict=True) if r <= eps)
    assert got == pytest.approx(expected)


def test_risk_bounded_threshold_with_0_1_weights_equals_the_subsample():
    # Given posterior draws and a mask that keeps some tokens (a split's calibration part)
    key_u, key_mask, key_a = jax.random.split(jax.random.key(9), 3)
    u = jax.random.uniform(key_u, (400,))
    mask = jax.random.bernoulli(key_mask, 0.5, (400,))
    slope = 0.82 + 0.05 * jax.random.normal(key_a, (30,))
    intercept = jnp.full((30,), -0.06)
    grid = T.threshold_grid(101)
    # When the threshold is computed with 0/1 weights and on the kept tokens alone
    weighted = T.risk_bounded_threshold(
        slope, intercept, u, grid, f32(0.05), f32(0.1), mask.astype(jnp.float32)
    )
    alone = T.risk_bounded_threshold(slope, intercept, u[mask], grid, f32(0.05), f32(0.1))
    # Then both are the same grid point.
    assert float(weighted) == float(alone) and float(alone) > 0


def test_risk_bounded_threshold_is_more_cautious_with_wider_posterior():
    u = jax.random.uniform(jax.random.key(8), (500,))
    grid = jnp.linspace(0.0, 1.0, 101)
    key_a, key_b = jax.random.split(jax.random.key(9))
    narrow = (
        0.82 + 0.01 * jax.random.normal(key_a, (400,)),
        -0.06 + 0.01 * jax.random.normal(key_b, (400,)),
    )
    wide = (
        0.82 + 0.2 * jax.random.normal(key_a, (400,)),
        -0.06 + 0.1 * jax.random.normal(key_b, (400,)),
    )
    t_narrow = float(T.risk_bounded_threshold(*narrow, u, grid, f32(0.05), f32(0.05)))
    t_wide = float(T.risk_bounded_threshold(*wide, u, grid, f32(0.05), f32(0.05)))
    assert 0.0 < t_wide < t_narrow


def test_posterior_draws_map_through_thresholds_with_vmap():
    a = f32([0.8, 0.9, 1.0])
    b = f32([-0.08, -0.09, -0.05])
    np.testing.assert_allclose(jax.vmap(T.risk_averse)(a, b), [0.1, 0.1, 0.05], atol=F32_TOL)
    means = jax.vmap(T.linear_mean, in_axes=(0, 0, None))(a, b, f32([0.0, 0.5]))
    np.testing.assert_allclose(means, [[0.0, 0.32], [0.0, 0.36], [0.0, 0.45]], atol=F32_TOL)


@pytest.mark.parametrize(
    "slope, intercept",
    [(0.82, -0.06), (2.5, -0.5), (-0.7, 0.9), (-0.5, 1.3), (0.0, 0.3), (0.0, -0.2), (4.0, 0.2)],
)
def test_linear_risk_curve_matches_token_sum(slope, intercept):
    # Given u on a coarse lattice (ties at the grid and at the clip points) and weights
    rng = np.random.default_rng(10)
    u = jnp.asarray(rng.integers(0, 21, 500) / 20, jnp.float32)
    weight = jnp.asarray(rng.integers(0, 4, 500), jnp.float32)
    grid = jnp.linspace(0.0, 1.0, 41)
    a, b = f32(slope), f32(intercept)
    # When the curve comes from cumulative sums
    fast = T.linear_risk_curve(a, b, T.weighted_sample(u, weight), grid)
    # Then it equals the token-by-token sum of clip(a u + b, 0, 1).
    slow = T.risk_curve(T.linear_mean(a, b, u), u, grid, weight)
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_threshold_grid_points_equal_stored_fractions():
    grid = np.asarray(T.threshold_grid(101))
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    # u = j/20 stored as float32 sits exactly on the grid point 5j/100.
    for j in range(21):
        assert grid[5 * j] == np.float32(j / 20)


# --- Learn-then-Test sample size -------------------------------------------------------


@pytest.mark.parametrize("eps, delta", [(0.05, 0.1), (0.1, 0.05), (0.02, 0.2)])
def test_prompts_needed_when_the_first_threshold_is_risk_free(eps, delta):
    # Given an observed risk of 0 at the first threshold, its p-value is (1 − ε)^n
    # (Hoeffding; Bentkus is e times larger), so it certifies at n = ⌈log δ / log(1 − ε)⌉:
    # 45 prompts at ε = 0.05, δ = 0.1.
    risk_hat = f32([0.0, 0.5])
    needed = T.ltt_prompts_needed(risk_hat, f32(eps), f32(delta), 1000)
    assert int(needed[0]) == math.ceil(math.log(delta) / math.log1p(-eps))
    assert int(needed[1]) == -1  # a risk above ε never certifies
    assert int(T.ltt_prompts_needed(f32([0.0]), f32(0.05), f32(0.1), 44)[0]) == -1


def test_prompts_needed_equals_a_brute_force_search_over_n():
    # Given an observed risk curve (dyadic values, so n copies average back exactly)
    risk_hat = np.array([0, 1, 3, 8, 16, 24, 30, 40, 60], np.float32) / 1024
    eps, delta, max_prompts = f32(0.05), f32(0.1), 1500
    needed = np.asarray(
        jax.jit(T.ltt_prompts_needed, static_argnums=3)(f32(risk_hat), eps, delta, max_prompts)
    )
    # When Learn-then-Test runs on n prompts that each have that risk curve, n = 1, 2, ...
    prompt_risks = jnp.tile(f32(risk_hat), (max_prompts, 1))
    grid = jnp.linspace(0.0, 1.0, risk_hat.size)
    ltt = jax.jit(lambda w: T.ltt_threshold(prompt_risks, grid, eps, delta, w).index)
    certified = np.array(
        [
            int(ltt((jnp.arange(max_prompts) < n).astype(jnp.float32)))
            for n in range(1, max_prompts + 1)
        ]
    )
    # Then N_k is the first n at which it certifies grid[k] (−1 if none does).
    for k in range(risk_hat.size):
        reached = np.nonzero(certified >= k)[0]
        assert needed[k] == (reached[0] + 1 if reached.size else -1), k
    assert np.all(np.diff(needed[needed > 0]) >= 0) and (needed > 0).sum() >= 5
