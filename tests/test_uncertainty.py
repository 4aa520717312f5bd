"""Tests for uhlm_jax.uncertainty: hand cases, quadrature accuracy, sampling, validation."""

from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tests.helpers import example_logits, tempered_log_probs
from uhlm_jax import speculative
from uhlm_jax.uncertainty import (
    DEFAULT_MEASURES,
    Entropy,
    ExpectedTemperaturePerturbation,
    OneMinusMaxProbability,
    TemperaturePerturbation,
    TopTwoMargin,
    disagreement_share,
    exact_fractions,
    quadrature_rule,
)

# Size of the two-sample goodness-of-fit test (chance that equal laws fail it).
GOODNESS_OF_FIT_SIZE = 1e-3
QUADRATURE_ATOL = 1e-4  # stated accuracy of ExpectedTemperaturePerturbation's default rule
FLOAT32_ATOL = 1e-6  # float32 rounding of sums of probabilities
MEAN_NUM_SE = 4.0  # Monte Carlo tolerance in standard errors (two-sided size ≈ 6e-5)
NUM_KEYS = 2000  # keys for Monte Carlo means; NUM_KEYS · K Bernoulli draws
REFERENCE_POINTS = 40_001  # Simpson points in log θ for the float64 reference integral
REFERENCE_DECADES = 45.0  # the reference integrates θ over [θ_max e^-45, θ_max]
VOCAB = 16

MEASURE_IDS = [m.name for m in DEFAULT_MEASURES]


def _log_q(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None):
    return speculative.draft_log_probs(jnp.asarray(logits), jnp.float32(temperature), top_k)


def reference_expected_perturbation(logits: np.ndarray, draft: int, max_temperature: float):
    """`1 − (1/θ_max) ∫_0^θ_max softmax(z/θ)_d dθ` in float64, by Simpson's rule in log θ.

    With `θ = e^s`, `dθ = θ ds`; the integrand is smooth in `s`, and the part below
    `θ_max e^-45` contributes less than `e^-45`.
    """
    logits = np.asarray(logits, np.float64)
    s = np.linspace(np.log(max_temperature) - REFERENCE_DECADES, np.log(max_temperature),
                    REFERENCE_POINTS)  # fmt: skip
    theta = np.exp(s)
    scaled = logits[None, :] / theta[:, None]
    scaled = scaled - np.max(scaled, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        weights = np.exp(scaled)
    prob = np.nan_to_num(weights[:, draft]) / np.nansum(weights, axis=1)
    values = prob * theta
    h = s[1] - s[0]
    integral = h / 3 * (values[0] + values[-1] + 4 * values[1:-1:2].sum()
                        + 2 * values[2:-1:2].sum())  # fmt: skip
    return 1.0 - integral / max_temperature


# ---------------------------------------------------------------------------------------
# Hand cases
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", DEFAULT_MEASURES, ids=MEASURE_IDS)
def test_one_hot_logits_give_zero_uncertainty_for_the_hot_draft(measure):
    logits = np.full(VOCAB, -np.inf, np.float32)
    logits[3] = 0.0
    u = measure(jax.random.key(0), logits, _log_q(logits), jnp.int32(3))
    assert float(u) == 0.0


@pytest.mark.parametrize("measure", DEFAULT_MEASURES, ids=MEASURE_IDS)
def test_dominant_logit_gives_near_zero_uncertainty(measure):
    # A 40-nat gap: even at θ = 2 the other tokens have softmax mass ~ 15 e^-20 ≈ 3e-8.
    logits = np.zeros(VOCAB, np.float32)
    logits[5] = 40.0
    u = measure(jax.random.key(1), logits, _log_q(logits), jnp.int32(5))
    assert 0.0 <= float(u) <= FLOAT32_ATOL


@pytest.mark.parametrize("measure_type", [TemperaturePerturbation, ExpectedTemperaturePerturbation])
def test_perturbation_of_a_token_outside_the_support_is_one(measure_type):
    logits = np.full(VOCAB, -np.inf, np.float32)
    logits[3] = 0.0
    u = measure_type()(jax.random.key(0), logits, _log_q(logits), jnp.int32(4))
    assert float(u) == 1.0


def test_uniform_logits():
    logits = np.zeros(VOCAB, np.float32)
    log_q, key, draft = _log_q(logits), jax.random.key(0), jnp.int32(2)
    np.testing.assert_allclose(float(Entropy()(key, logits, log_q, draft)), 1.0, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(
        float(OneMinusMaxProbability()(key, logits, log_q, draft)), 1 - 1 / VOCAB, atol=FLOAT32_ATOL
    )
    np.testing.assert_allclose(
        float(TopTwoMargin()(key, logits, log_q, draft)), 1.0, atol=FLOAT32_ATOL
    )
    np.testing.assert_allclose(
        float(ExpectedTemperaturePerturbation()(key, logits, log_q, draft)),
        1 - 1 / VOCAB,
        atol=FLOAT32_ATOL,
    )


def test_two_token_hand_case():
    # q = (0.75, 0.25): entropy H = −(¾ log ¾ + ¼ log ¼), normalised by log 2;
    # 1 − max q = 0.25; 1 − (0.75 − 0.25) = 0.5.
    logits = np.log(np.array([0.75, 0.25], np.float32))
    log_q, key, draft = _log_q(logits), jax.random.key(0), jnp.int32(0)
    entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(2)
    np.testing.assert_allclose(
        float(Entropy()(key, logits, log_q, draft)), entropy, atol=FLOAT32_ATOL
    )
    np.testing.assert_allclose(
        float(OneMinusMaxProbability()(key, logits, log_q, draft)), 0.25, atol=FLOAT32_ATOL
    )
    np.testing.assert_allclose(
        float(TopTwoMargin()(key, logits, log_q, draft)), 0.5, atol=FLOAT32_ATOL
    )


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("temperature", [0.7, 1.4])
def test_deterministic_measures_match_float64_oracles(temperature, top_k):
    logits = example_logits(VOCAB, phase=0.3)
    log_q = _log_q(logits, temperature, top_k)
    q = np.exp(tempered_log_probs(logits, temperature, top_k))
    key, draft = jax.random.key(0), jnp.int32(0)
    nonzero = q[q > 0]
    top_two = np.sort(q)[-2:]
    np.testing.assert_allclose(
        float(Entropy()(key, logits, log_q, draft)),
        -np.sum(nonzero * np.log(nonzero)) / np.log(VOCAB),
        atol=FLOAT32_ATOL,
    )
    np.testing.assert_allclose(
        float(OneMinusMaxProbability()(key, logits, log_q, draft)), 1 - q.max(), atol=FLOAT32_ATOL
    )
    np.testing.assert_allclose(
        float(TopTwoMargin()(key, logits, log_q, draft)),
        1 - (top_two[1] - top_two[0]),
        atol=FLOAT32_ATOL,
    )


@pytest.mark.parametrize("measure", DEFAULT_MEASURES[2:], ids=MEASURE_IDS[2:])
def test_deterministic_measures_ignore_the_key(measure):
    logits = example_logits(VOCAB)
    args = (logits, _log_q(logits), jnp.int32(1))
    assert float(measure(jax.random.key(0), *args)) == float(measure(jax.random.key(99), *args))


def test_names_are_stable_and_unique():
    assert [m.name for m in DEFAULT_MEASURES] == [
        "temperature_perturbation",
        "expected_temperature_perturbation",
        "entropy",
        "one_minus_max_probability",
        "top_two_margin",
    ]
    assert TemperaturePerturbation(num_samples=5, max_temperature=1.0).name == (
        "temperature_perturbation"
    )


def test_measures_are_hashable_and_compare_by_value():
    # Static configs hold measures, so they must hash.
    assert hash(TemperaturePerturbation()) == hash(TemperaturePerturbation())
    assert TemperaturePerturbation(max_temperature=1.0) != TemperaturePerturbation()
    assert len(set(DEFAULT_MEASURES)) == len(DEFAULT_MEASURES)


# ---------------------------------------------------------------------------------------
# Adversarial inputs
# ---------------------------------------------------------------------------------------


def _adversarial_positions():
    ties = np.zeros(VOCAB, np.float32)
    ties[:3] = 2.0
    masked = example_logits(VOCAB).copy()
    masked[::2] = -np.inf
    huge = example_logits(VOCAB) * 1e4
    near_tie = np.zeros(VOCAB, np.float32) - 10.0
    near_tie[[4, 9]] = [1.0, 1.0 + 1e-6]
    return {
        "ties": (ties, 1.0, None, 0),
        "masked": (masked, 1.0, None, 1),
        "huge": (huge, 1.0, None, 3),
        "near_tie": (near_tie, 0.5, None, 4),
        "top_k_draft_outside": (example_logits(VOCAB), 1.0, 3, 2),
        "zero_temperature": (example_logits(VOCAB), 0.0, None, 7),
    }


ADVERSARIAL = _adversarial_positions()


@pytest.mark.parametrize("measure", DEFAULT_MEASURES, ids=MEASURE_IDS)
@pytest.mark.parametrize("position", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_measures_are_finite_probabilities(measure, position):
    logits, temperature, top_k, draft = position
    u = float(measure(jax.random.key(2), logits, _log_q(logits, temperature, top_k), draft))
    assert np.isfinite(u) and 0.0 <= u <= 1.0


# ---------------------------------------------------------------------------------------
# Expected temperature perturbation: quadrature accuracy
# ---------------------------------------------------------------------------------------


def _quadrature_cases():
    rng = np.random.default_rng(20241216)
    cases = {}
    for gap in (3e-5, 1e-3, 1e-1, 1.0, 10.0):
        for draft in (0, 1):
            cases[f"two_tokens_gap{gap:g}_d{draft}"] = (np.array([gap, 0.0]), draft, 2.0)
    wide = rng.normal(size=200) * 2.0
    order = np.argsort(wide)
    for rank, label in ((-1, "top"), (-2, "second"), (-100, "median")):
        cases[f"v200_{label}"] = (wide, int(order[rank]), 2.0)
        cases[f"v200_{label}_cold"] = (wide, int(order[rank]), 0.3)
    near = np.concatenate([[3.0, 3.0 - 3e-4], rng.normal(size=50) - 2.0])
    cases["near_tie_second"] = (near, 1, 2.0)
    masked = example_logits(VOCAB).astype(np.float64)
    masked[::3] = -np.inf
    cases["masked"] = (masked, 1, 2.0)
    return cases


QUADRATURE_CASES = _quadrature_cases()


@pytest.mark.parametrize("case", QUADRATURE_CASES.values(), ids=QUADRATURE_CASES.keys())
def test_expected_perturbation_matches_float64_integral(case):
    logits, draft, max_temperature = case
    logits32 = logits.astype(np.float32)
    measure = ExpectedTemperaturePerturbation(max_temperature=max_temperature)
    got = float(measure(jax.random.key(0), logits32, _log_q(logits32), jnp.int32(draft)))
    want = reference_expected_perturbation(logits32, draft, max_temperature)
    np.testing.assert_allclose(got, want, atol=QUADRATURE_ATOL)


def test_quadrature_rule_integrates_polynomials_on_each_panel():
    nodes, weights = quadrature_rule(num_panels=8, nodes_per_panel=6)
    assert np.all((nodes > 0) & (nodes < 1))
    for power in range(12):  # Gauss–Legendre with 6 nodes is exact to degree 11
        np.testing.assert_allclose(np.sum(weights * nodes**power), 1 / (power + 1), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Temperature perturbation: sampling
# ---------------------------------------------------------------------------------------

SAMPLING_CASES = {
    # name: (logits, rank of the draft in decreasing logit order, θ_max)
    "argmax": (example_logits(VOCAB), 0, 2.0),
    "second": (example_logits(VOCAB), 1, 2.0),
    "argmax_cold": (example_logits(VOCAB), 0, 0.5),
    "third_cold": (example_logits(VOCAB), 2, 0.5),
    "uniform": (np.zeros(VOCAB, np.float32), 0, 2.0),
}


@pytest.mark.parametrize("case", SAMPLING_CASES.values(), ids=SAMPLING_CASES.keys())
def test_sampled_perturbation_converges_to_expected(case):
    logits, rank, max_temperature = case
    draft = jnp.int32(np.argsort(-logits, kind="stable")[rank])
    log_q = _log_q(logits)
    sampled = TemperaturePerturbation(num_samples=20, max_temperature=max_temperature)
    expected = ExpectedTemperaturePerturbation(max_temperature=max_temperature)
    keys = jax.random.split(jax.random.key(5), NUM_KEYS)
    u = jax.jit(jax.vmap(sampled, in_axes=(0, None, None, None)))(keys, logits, log_q, draft)
    u_star = float(expected(keys[0], logits, log_q, draft))
    # Each of the NUM_KEYS · K indicators is an independent Bernoulli(u*).
    standard_error = np.sqrt(u_star * (1 - u_star) / (NUM_KEYS * sampled.num_samples))
    assert abs(float(jnp.mean(u)) - u_star) <= MEAN_NUM_SE * standard_error + QUADRATURE_ATOL
    assert 0.01 < u_star < 0.99  # a non-degenerate case, so the check has power


def test_zero_temperature_limit_is_exact_argmax():
    # Gumbel noise is at most ~30 in float32 and θ ≤ 1e-7 here, far below the smallest
    # logit gap of example_logits (> 1e-3), so every re-draw is the argmax.
    logits = example_logits(VOCAB)
    gaps = np.diff(np.sort(logits))
    assert gaps.min() > 1e-3
    log_q, top = _log_q(logits), int(np.argmax(logits))
    keys = jax.random.split(jax.random.key(6), 200)
    sampled = TemperaturePerturbation(max_temperature=1e-7)
    expected = ExpectedTemperaturePerturbation(max_temperature=1e-7)
    for draft in (top, (top + 1) % VOCAB):
        u = jax.jit(jax.vmap(sampled, in_axes=(0, None, None, None)))(keys, logits, log_q, draft)
        np.testing.assert_array_equal(u, float(draft != top))
        assert float(expected(keys[0], logits, log_q, draft)) == float(draft != top)


MAX_DENOMINATOR = 64


def correctly_rounded_float32(fraction: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to even), by exact comparison."""
    guess = np.float32(float(fraction))
    neighbours = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]  # fmt: skip
    errors = [abs(Fraction(float(x)) - fraction) for x in neighbours]
    best = min(errors)
    ties = [x for x, e in zip(neighbours, errors, strict=True) if e == best]
    return min(ties, key=lambda x: int(np.asarray(x).view(np.int32)) & 1)


def test_disagreement_share_is_the_correctly_rounded_fraction_for_every_k():
    # Given: every K ≤ 64 and every count j ≤ K of disagreeing re-draws, eager and jitted.
    share = jax.jit(disagreement_share)
    for k in range(1, MAX_DENOMINATOR + 1):
        table = np.asarray(exact_fractions(k))
        for j in range(k + 1):
            disagree = jnp.arange(k) < j
            expected = correctly_rounded_float32(Fraction(j, k))
            # Then: u is bit-identical to the float32 nearest to j/K.
            assert table[j] == expected, (j, k)
            assert np.asarray(disagreement_share(disagree)) == expected, (j, k)
            assert np.asarray(share(disagree)) == expected, (j, k)


@pytest.mark.parametrize("num_samples", [7, 20])
def test_sampled_perturbation_is_exactly_j_over_k(num_samples):
    logits = example_logits(VOCAB)
    keys = jax.random.split(jax.random.key(8), 200)
    measure = TemperaturePerturbation(num_samples=num_samples)
    batched = jax.jit(jax.vmap(measure, in_axes=(0, None, None, None)))
    u = np.asarray(batched(keys, logits, _log_q(logits), 2))
    counts = np.round(u * num_samples).astype(int)
    exact = np.array([correctly_rounded_float32(Fraction(int(j), num_samples)) for j in counts])
    np.testing.assert_array_equal(u, exact)
    assert len(np.unique(u)) > 2  # the keys matter
    assert not np.any(np.signbit(u))


# ---------------------------------------------------------------------------------------
# Traced versus static, transformations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure_type", [TemperaturePerturbation, ExpectedTemperaturePerturbation])
def test_sweeping_max_temperature_compiles_once(measure_type):
    chex.clear_trace_counter()  # the counter is keyed on the code, shared by parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def measure_position(measure, key, logits, log_q, draft):
        return measure(key, logits, log_q, draft)

    logits = example_logits(VOCAB)
    log_q, key = _log_q(logits), jax.random.key(3)
    for max_temperature in (0.5, 1.0, 2.0, 3.0):
        measure = measure_type(max_temperature=max_temperature)
        np.testing.assert_allclose(
            float(measure_position(measure, key, logits, log_q, 4)),
            float(measure(key, logits, log_q, 4)),
            atol=FLOAT32_ATOL,
        )


@pytest.mark.parametrize("measure_type", [TemperaturePerturbation, ExpectedTemperaturePerturbation])
def test_vmap_over_max_temperature_equals_loop(measure_type):
    logits = example_logits(VOCAB)
    log_q, key = _log_q(logits), jax.random.key(4)
    temperatures = jnp.array([0.25, 0.5, 1.0, 2.0, 4.0], jnp.float32)
    swept = jax.vmap(lambda th: measure_type(max_temperature=th)(key, logits, log_q, 6))(
        temperatures
    )
    looped = [
        float(measure_type(max_temperature=float(th))(key, logits, log_q, 6)) for th in temperatures
    ]
    np.testing.assert_allclose(swept, looped, atol=FLOAT32_ATOL)


def _positions(num: int = 6):
    logits = np.stack([example_logits(VOCAB, phase=0.4 * i) for i in range(num)])
    log_q = jax.vmap(lambda z: speculative.draft_log_probs(z, jnp.float32(1.0)))(logits)
    drafts = jnp.arange(num, dtype=jnp.int32) * 3 % VOCAB
    keys = jax.random.split(jax.random.key(9), num)
    return keys, jnp.asarray(logits), log_q, drafts


@pytest.mark.parametrize("measure", DEFAULT_MEASURES, ids=MEASURE_IDS)
def test_vmap_equals_loop_and_jit_equals_eager(measure):
    keys, logits, log_q, drafts = _positions()
    batched = jax.vmap(measure)(keys, logits, log_q, drafts)
    jitted = jax.jit(jax.vmap(measure))(keys, logits, log_q, drafts)
    looped = [float(measure(keys[i], logits[i], log_q[i], drafts[i])) for i in range(len(drafts))]
    np.testing.assert_allclose(batched, looped, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(jitted, looped, atol=FLOAT32_ATOL)
    assert np.all(np.asarray(batched) >= 0) and np.all(np.asarray(batched) <= 1)


@pytest.mark.without_type_checks
def test_wrong_ranks_are_rejected():
    logits = example_logits(VOCAB)
    log_q = _log_q(logits)
    for measure in DEFAULT_MEASURES:
        with pytest.raises(AssertionError):
            measure(jax.random.key(0), logits[None], log_q[None], 0)
        with pytest.raises(AssertionError):
            measure(jax.random.key(0), logits, log_q, jnp.array([0]))


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.without_type_checks
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TemperaturePerturbation(num_samples=0), "num_samples=0"),
        (lambda: TemperaturePerturbation(num_samples=2.5), "num_samples=2.5"),
        (lambda: TemperaturePerturbation(num_samples=True), "num_samples=True"),
        (lambda: TemperaturePerturbation(max_temperature=0.0), "max_temperature=0.0"),
        (lambda: TemperaturePerturbation(max_temperature=-1), "max_temperature=-1"),
        (lambda: TemperaturePerturbation(max_temperature=float("nan")), "max_temperature=nan"),
        (lambda: TemperaturePerturbation(max_temperature=float("inf")), "max_temperature=inf"),
        (lambda: TemperaturePerturbation(max_temperature="2"), "max_temperature='2'"),
        (
            lambda: TemperaturePerturbation(max_temperature=np.array([1.0, 0.0])),
            r"max_temperature=array\(\[1., 0.\]\)",
        ),
        (lambda: ExpectedTemperaturePerturbation(max_temperature=0), "max_temperature=0"),
        (lambda: ExpectedTemperaturePerturbation(num_panels=-1), "num_panels=-1"),
        (lambda: ExpectedTemperaturePerturbation(nodes_per_panel=0), "nodes_per_panel=0"),
    ],
)
def test_bad_settings_raise_naming_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_vocabulary_of_one_is_rejected():
    logits = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="vocabulary size 1"):
        Entropy()(jax.random.key(0), logits, _log_q(logits), 0)


def test_bernoulli_redraws_equal_the_gumbel_argmax_form_in_distribution():
    # Given: the paper's Gumbel-argmax re-draws and the Bernoulli form the measure uses.
    logits = example_logits(VOCAB)
    log_q = _log_q(logits)
    measure = TemperaturePerturbation(num_samples=5)
    keys = jax.random.split(jax.random.key(11), 20_000)
    draft = int(np.argsort(logits)[-2])
    fast = jax.jit(jax.vmap(measure, in_axes=(0, None, None, None)))(keys, logits, log_q, draft)
    reference = jax.jit(jax.vmap(measure.redraws_disagree_gumbel, in_axes=(0, None, None)))(
        keys, logits, draft
    )
    # Then: the histograms of u over {0, 1/5, ..., 1} agree (two-sample chi-square).
    a = np.bincount(np.round(np.asarray(fast) * 5).astype(int), minlength=6)
    b = np.bincount(np.round(np.asarray(reference) * 5).astype(int), minlength=6)
    keep = (a + b) > 0
    table = np.stack([a[keep], b[keep]])
    statistic, pvalue, _, _ = stats.chi2_contingency(table)
    assert pvalue > GOODNESS_OF_FIT_SIZE, (a, b, statistic)
    # Same temperatures from the same key: the two forms share θ_k.
    assert np.asarray(fast).std() > 0
