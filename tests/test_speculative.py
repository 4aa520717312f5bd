"""Tests for uhlm_jax.speculative: verification is exact, β and TV are right.

Statistical tests are chi-square goodness-of-fit tests at size ALPHA each, on NUM_DRAWS
simulated positions, with rare cells merged. Seeds are fixed, so each test either always
passes or always fails; with ~30 such tests the chance that a correct implementation
fails one of them for an unlucky seed is below 3%.
"""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (
    DistributionPair,
    distribution_pairs,
    example_logits,
    tempered_log_probs,
)
from uhlm_jax import speculative
from uhlm_jax.sampling import sample_token

ALPHA = 1e-3
# Upper-tail critical values χ²_{df, 1−ALPHA} (α = 0.001), from the NIST/SEMATECH
# e-Handbook of Statistical Methods, §1.3.6.7.4 "Critical Values of the Chi-Square
# Distribution"; cross-checked against the regularised incomplete gamma function below.
CHI2_CRITICAL = {
    1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
    8: 26.125, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.910, 13: 34.528, 14: 36.123,
    15: 37.697, 16: 39.252, 17: 40.790, 18: 42.312, 19: 43.820, 20: 45.315,
}  # fmt: skip
CRITICAL_TABLE_RTOL = 2e-3  # the table is rounded to 5 significant digits
MIN_EXPECTED_COUNT = 5.0  # cells with fewer expected counts are merged (Cochran's rule)
NUM_DRAWS = 40_000
RATE_NUM_SE = 4.0  # acceptance-rate tolerance in standard errors (two-sided size ≈ 6e-5)
FLOAT32_ATOL = 1e-6  # float32 rounding of sums of at most 16 probabilities
DRAFT_PROB_ATOL = 1e-6  # float32 softmax against the float64 oracle
RESIDUAL_RTOL = 1e-5  # relative error of log(p − q) in float32, also for p ≈ q
VERIFIER_VOCAB = 16

PAIRS = distribution_pairs()
PAIR_IDS = [pair.name for pair in PAIRS]


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


# ---------------------------------------------------------------------------------------
# Chi-square goodness of fit
# ---------------------------------------------------------------------------------------


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs`, with rare cells merged.

    Cells with `probs == 0` must be empty (asserted exactly) and are left out. The cells
    with the smallest expected counts are merged until the merged cell expects at least
    MIN_EXPECTED_COUNT.

    Returns:
      `(statistic, degrees of freedom)`; df 0 means a single cell (nothing to test).
    """
    counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, f"impossible tokens emitted: {counts[~support]}"
    observed, expected = counts[support], counts.sum() * probs[support] / probs[support].sum()
    order = np.argsort(expected)
    observed, expected = observed[order], expected[order]
    num_rare = int(np.sum(expected < MIN_EXPECTED_COUNT))
    if num_rare:
        merged = int(np.searchsorted(np.cumsum(expected), MIN_EXPECTED_COUNT)) + 1
        merged = min(max(merged, num_rare), len(expected))
        observed = np.concatenate([[observed[:merged].sum()], observed[merged:]])
        expected = np.concatenate([[expected[:merged].sum()], expected[merged:]])
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return statistic, len(expected) - 1


def assert_distributed_as(tokens: np.ndarray, probs: np.ndarray, what: str) -> None:
    counts = np.bincount(np.asarray(tokens), minlength=len(probs))
    statistic, df = chi_square(counts, probs)
    if df:
        assert statistic <= CHI2_CRITICAL[df], (
            f"{what}: chi-square {statistic:.1f} > {CHI2_CRITICAL[df]} (df {df}, α {ALPHA})"
        )


def assert_acceptance_rate(accepted: np.ndarray, total_variation: float) -> None:
    expected = 1.0 - total_variation
    standard_error = np.sqrt(expected * (1.0 - expected) / accepted.size)
    rate = float(np.mean(accepted))
    assert abs(rate - expected) <= RATE_NUM_SE * standard_error + FLOAT32_ATOL, (
        f"acceptance {rate:.5f} vs 1 − TV = {expected:.5f} (SE {standard_error:.5f})"
    )


@pytest.mark.parametrize("df", sorted(CHI2_CRITICAL))
def test_chi_square_critical_values_have_stated_size(df):
    survival = jax.scipy.special.gammaincc(df / 2.0, CHI2_CRITICAL[df] / 2.0)
    np.testing.assert_allclose(float(survival), ALPHA, rtol=CRITICAL_TABLE_RTOL)


def test_chi_square_merges_rare_cells_and_rejects_impossible_tokens():
    statistic, df = chi_square(np.array([50, 50, 1, 0]), np.array([0.49, 0.49, 0.01, 0.01]))
    # The two rare cells (expected 1.01 each) merge into one expecting 2.02 < 5, so the
    # smallest ordinary cell joins too: cells (51, 50) against (51.51, 49.49)...
    np.testing.assert_allclose(statistic, 0.51**2 / 51.51 + 0.51**2 / 49.49, rtol=1e-12)
    assert df == 1
    with pytest.raises(AssertionError, match="impossible"):
        chi_square(np.array([5, 1]), np.array([1.0, 0.0]))


# ---------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------


def _wrong_resample_from_p(key, log_q, log_p, draft):
    """Accepts correctly but resamples from p instead of the residual: wrong law."""
    accept_key, residual_key = jax.random.split(key)
    log_q, log_p = jnp.asarray(log_q), jnp.asarray(log_p)
    accepted = jnp.log(jax.random.uniform(accept_key)) < log_p[draft] - log_q[draft]
    resampled = jax.random.categorical(residual_key, log_p)
    return speculative.Verification(jnp.where(accepted, draft, resampled), accepted, 0.0)


def _wrong_always_accept(key, log_q, log_p, draft):
    """Emits the draft: the output is distributed as q."""
    del key, log_q, log_p
    return speculative.Verification(draft, jnp.bool_(True), 0.0)


@jax.jit
def _simulate(key, log_q, log_p):
    def one(position_key):
        draft_key, verify_key = jax.random.split(position_key)
        draft = sample_token(draft_key, log_q)
        verification = speculative.verify(verify_key, log_q, log_p, draft)
        return draft, verification.token, verification.accepted

    return jax.vmap(one)(jax.random.split(key, NUM_DRAWS))


def _simulate_with(verifier, key, log_q, log_p):
    def one(position_key):
        draft_key, verify_key = jax.random.split(position_key)
        draft = sample_token(draft_key, log_q)
        return verifier(verify_key, log_q, log_p, draft).token

    return jax.jit(jax.vmap(one))(jax.random.split(key, NUM_DRAWS))


# ---------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_emitted_tokens_are_distributed_as_p(pair: DistributionPair):
    # Given a fake pair, when drafting from q and verifying NUM_DRAWS times,
    drafts, tokens, accepted = _simulate(jax.random.key(_seed(pair.name)), pair.log_q, pair.log_p)
    # then the drafts follow q, the emitted tokens follow p, and drafts are accepted at
    # rate 1 − TV(p, q).
    assert_distributed_as(drafts, pair.q, f"{pair.name} drafts")
    assert_distributed_as(tokens, pair.p, f"{pair.name} tokens")
    assert_acceptance_rate(np.asarray(accepted), pair.total_variation)


DRAFT_CONFIGS = {
    # name: (draft temperature, draft top-k, verifier temperature, verifier top-k)
    "tempered": (0.6, None, 1.0, None),
    "hot_top_k": (1.8, 5, 0.9, None),
    "top_1": (1.0, 1, 1.0, None),
    "zero_temperature": (0.0, None, 1.3, None),
    "both_top_k": (1.3, 6, 0.8, 3),
}


@pytest.mark.parametrize("config", DRAFT_CONFIGS.values(), ids=DRAFT_CONFIGS.keys())
def test_tempered_and_top_k_drafts_verify_exactly(config):
    draft_temperature, draft_top_k, verifier_temperature, verifier_top_k = config
    # Given two different models and a tempered / truncated draft distribution,
    draft_logits = example_logits(VERIFIER_VOCAB)
    log_q = speculative.draft_log_probs(draft_logits, jnp.float32(draft_temperature), draft_top_k)
    oracle_temperature = max(draft_temperature, speculative.MIN_TEMPERATURE)
    np.testing.assert_allclose(
        np.exp(np.asarray(log_q, np.float64)),
        np.exp(tempered_log_probs(draft_logits, oracle_temperature, draft_top_k)),
        atol=DRAFT_PROB_ATOL,
    )
    log_p = tempered_log_probs(
        example_logits(VERIFIER_VOCAB, phase=1.0), verifier_temperature, verifier_top_k
    ).astype(np.float32)
    pair = DistributionPair("config", log_p, np.asarray(log_q))
    # when simulating, then the output is distributed as p.
    drafts, tokens, accepted = _simulate(jax.random.key(_seed(str(config))), log_q, log_p)
    assert_distributed_as(drafts, pair.q, "drafts")
    assert_distributed_as(tokens, pair.p, "tokens")
    assert_acceptance_rate(np.asarray(accepted), pair.total_variation)


@pytest.mark.parametrize("verifier", [_wrong_resample_from_p, _wrong_always_accept])
@pytest.mark.parametrize("name", ["partial_overlap", "one_hot_q", "zero_cells"])
def test_chi_square_rejects_a_wrong_verifier(verifier, name):
    # Power check: the same test, on the same number of draws, rejects a wrong law.
    pair = {pair.name: pair for pair in PAIRS}[name]
    tokens = _simulate_with(verifier, jax.random.key(_seed(name)), pair.log_q, pair.log_p)
    counts = np.bincount(np.asarray(tokens), minlength=len(pair.p))
    impossible_emitted = counts[pair.p == 0].sum() > 0  # rejected outright
    if not impossible_emitted:
        statistic, df = chi_square(counts, pair.p)
        assert statistic > CHI2_CRITICAL[df], f"{verifier.__name__} not rejected on {name}"


def test_equal_distributions_accept_every_draft():
    pair = {pair.name: pair for pair in PAIRS}["equal"]
    drafts, tokens, accepted = _simulate(jax.random.key(3), pair.log_q, pair.log_p)
    assert bool(np.all(accepted))
    np.testing.assert_array_equal(tokens, drafts)


# ---------------------------------------------------------------------------------------
# β, TV and the residual
# ---------------------------------------------------------------------------------------


def _log(probs: list[float]) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.array(probs, np.float32))


HAND_Q = _log([0.5, 0.25, 0.25, 0.0])
HAND_P = _log([0.25, 0.25, 0.5, 0.0])
HAND_Q2 = _log([0.5, 0.5, 0.0])
HAND_P2 = _log([0.0, 0.4, 0.6])


@pytest.mark.parametrize(
    "log_q, log_p, draft, beta",
    [
        (HAND_Q, HAND_P, 0, 0.5),  # 1 − 0.25/0.5
        (HAND_Q, HAND_P, 1, 0.0),  # p_d = q_d
        (HAND_Q, HAND_P, 2, 0.0),  # p_d > q_d
        (HAND_Q, HAND_P, 3, 1.0),  # p_d = q_d = 0: p_d = 0 takes precedence
        (HAND_Q2, HAND_P2, 0, 1.0),  # p_d = 0
        (HAND_Q2, HAND_P2, 1, 0.2),  # 1 − 0.4/0.5
        (HAND_Q2, HAND_P2, 2, 0.0),  # q_d = 0 < p_d: cannot be drafted
    ],
)
def test_rejection_probability_hand_cases(log_q, log_p, draft, beta):
    got = speculative.rejection_probability(log_q, log_p, jnp.int32(draft))
    np.testing.assert_allclose(float(got), beta, atol=FLOAT32_ATOL)


def test_zero_rejection_is_positive_zero():
    # −expm1(0) is −0.0; a stored β must be +0.0 (eager, jitted, and from verify).
    log_q = jnp.asarray(HAND_Q)
    for beta in (
        speculative.rejection_probability(log_q, log_q, jnp.int32(1)),
        jax.jit(speculative.rejection_probability)(log_q, log_q, jnp.int32(1)),
        speculative.total_variation(log_q, log_q),
        speculative.verify(jax.random.key(0), log_q, log_q, jnp.int32(1)).beta,
    ):
        assert float(beta) == 0.0 and not np.signbit(np.asarray(beta))


@pytest.mark.parametrize("log_q, log_p, tv", [(HAND_Q, HAND_P, 0.25), (HAND_Q2, HAND_P2, 0.6)])
def test_total_variation_hand_cases(log_q, log_p, tv):
    np.testing.assert_allclose(
        float(speculative.total_variation(log_q, log_p)), tv, atol=FLOAT32_ATOL
    )


def _betas(pair: DistributionPair) -> jax.Array:
    vocab = jnp.arange(len(pair.p), dtype=jnp.int32)
    return jax.vmap(speculative.rejection_probability, in_axes=(None, None, 0))(
        pair.log_q, pair.log_p, vocab
    )


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_expected_rejection_equals_total_variation(pair: DistributionPair):
    # E_{d~q}[β(d)] = Σ_v q_v β(v) = Σ_v max(0, q_v − p_v) = ½ Σ_v |p_v − q_v|.
    expected_beta = float(np.sum(pair.q * np.asarray(_betas(pair), np.float64)))
    tv = float(speculative.total_variation(pair.log_q, pair.log_p))
    np.testing.assert_allclose(expected_beta, pair.total_variation, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(tv, pair.total_variation, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(tv, 0.5 * np.abs(pair.p - pair.q).sum(), atol=FLOAT32_ATOL)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_beta_and_total_variation_are_probabilities_without_nan(pair: DistributionPair):
    betas = np.asarray(_betas(pair))
    tv = float(speculative.total_variation(pair.log_q, pair.log_p))
    assert np.all(np.isfinite(betas)) and np.all((betas >= 0) & (betas <= 1))
    assert np.isfinite(tv) and 0.0 <= tv <= 1.0
    # β from the ratio, in float64, wherever q_d > 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_beta = np.maximum(0.0, 1.0 - pair.p / pair.q)
    drafted = pair.q > 0
    np.testing.assert_allclose(betas[drafted], ratio_beta[drafted], atol=FLOAT32_ATOL)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_verify_is_finite_for_every_draft_and_never_emits_impossible_tokens(pair):
    # Every draft, including ones q rules out, on many keys.
    vocab = len(pair.p)
    keys = jax.random.split(jax.random.key(_seed(pair.name)), 64)
    drafts = jnp.arange(vocab, dtype=jnp.int32)
    out = jax.vmap(
        jax.vmap(speculative.verify, in_axes=(None, None, None, 0)), in_axes=(0, None, None, None)
    )(keys, pair.log_q, pair.log_p, drafts)
    tokens, betas = np.asarray(out.token), np.asarray(out.beta)
    assert np.all(np.isfinite(betas)) and np.all((betas >= 0) & (betas <= 1))
    assert np.all((tokens >= 0) & (tokens < vocab))
    assert np.all(pair.p[tokens] > 0)
    np.testing.assert_array_equal(np.asarray(out.accepted), tokens == np.asarray(drafts)[None])
    np.testing.assert_allclose(betas, np.broadcast_to(_betas(pair), betas.shape), atol=0)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_residual_log_weights_match_float64(pair: DistributionPair):
    log_r = np.asarray(speculative.residual_log_weights(pair.log_q, pair.log_p))
    residual = pair.p - pair.q
    positive = residual > 0
    np.testing.assert_array_equal(np.isneginf(log_r), ~positive)
    np.testing.assert_allclose(
        np.exp(log_r[positive].astype(np.float64)), residual[positive], rtol=RESIDUAL_RTOL
    )


def test_nearly_equal_pair_has_an_accurate_tiny_residual():
    # p − q is at the float32 rounding level; log1p(−exp(x)) alone would lose it.
    pair = {pair.name: pair for pair in PAIRS}["nearly_equal"]
    residual = pair.p - pair.q
    assert 0 < residual.max() < 1e-6
    log_r = np.asarray(speculative.residual_log_weights(pair.log_q, pair.log_p))
    np.testing.assert_allclose(
        np.exp(log_r[residual > 0].astype(np.float64)), residual[residual > 0], rtol=1e-5
    )


# ---------------------------------------------------------------------------------------
# draft_log_probs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 4, VERIFIER_VOCAB])
def test_draft_log_probs_matches_float64_oracle(temperature, top_k):
    logits = example_logits(VERIFIER_VOCAB)
    log_q = np.asarray(speculative.draft_log_probs(logits, jnp.float32(temperature), top_k))
    oracle = tempered_log_probs(logits, temperature, top_k)
    assert log_q.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(log_q), np.isneginf(oracle))
    finite = np.isfinite(oracle)
    np.testing.assert_allclose(log_q[finite], oracle[finite], atol=1e-5)
    assert np.sum(finite) == (top_k or VERIFIER_VOCAB)


def test_top_k_keeps_exactly_k_with_ties_broken_to_lower_index():
    logits = np.array([1.0, 3.0, 3.0, 3.0, 0.0], np.float32)
    log_q = np.asarray(speculative.draft_log_probs(logits, 1.0, 2))
    np.testing.assert_allclose(np.exp(log_q), [0, 0.5, 0.5, 0, 0], atol=FLOAT32_ATOL)


def test_zero_temperature_is_clamped_to_near_greedy():
    logits = example_logits(VERIFIER_VOCAB)
    log_q = np.asarray(speculative.draft_log_probs(logits, jnp.float32(0.0), None))
    assert np.all(~np.isnan(log_q))
    q = np.exp(log_q.astype(np.float64))
    np.testing.assert_allclose(q[np.argmax(logits)], 1.0, atol=FLOAT32_ATOL)


@pytest.mark.without_type_checks
@pytest.mark.parametrize("top_k", [0, -1, VERIFIER_VOCAB + 1, 2.0, True])
def test_bad_top_k_is_rejected_with_its_value(top_k):
    with pytest.raises(ValueError, match=f"top_k={top_k!r}"):
        speculative.draft_log_probs(example_logits(VERIFIER_VOCAB), 1.0, top_k)


def test_sweeping_draft_temperature_compiles_once():
    chex.clear_trace_counter()  # the counter is keyed on the code, shared by parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def draft(logits, temperature):
        return speculative.draft_log_probs(logits, temperature, 4)

    logits = example_logits(VERIFIER_VOCAB)
    for temperature in (0.5, 1.0, 1.5, 0.0):
        np.testing.assert_allclose(
            draft(logits, jnp.float32(temperature)),
            speculative.draft_log_probs(logits, jnp.float32(temperature), 4),
            atol=FLOAT32_ATOL,
        )


@pytest.mark.without_type_checks
def test_wrong_ranks_are_rejected():
    pair = PAIRS[1]
    with pytest.raises(AssertionError):
        speculative.verify(jax.random.key(0), pair.log_q[None], pair.log_p[None], 0)
    with pytest.raises(AssertionError):
        speculative.rejection_probability(pair.log_q, pair.log_p, jnp.array([0]))
    with pytest.raises(AssertionError):
        speculative.rejection_probability(pair.log_q, pair.log_p, jnp.float32(0))
    with pytest.raises(AssertionError):
        speculative.total_variation(pair.log_q, pair.log_p[:4])


# ---------------------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_jit_equals_eager(pair: DistributionPair):
    key = jax.random.key(7)
    for draft in range(len(pair.p)):
        eager = speculative.verify(key, pair.log_q, pair.log_p, jnp.int32(draft))
        jitted = jax.jit(speculative.verify)(key, pair.log_q, pair.log_p, jnp.int32(draft))
        assert int(eager.token) == int(jitted.token)
        assert bool(eager.accepted) == bool(jitted.accepted)
        np.testing.assert_allclose(float(eager.beta), float(jitted.beta), atol=FLOAT32_ATOL)
    np.testing.assert_allclose(
        float(jax.jit(speculative.total_variation)(pair.log_q, pair.log_p)),
        float(speculative.total_variation(pair.log_q, pair.log_p)),
        atol=FLOAT32_ATOL,
    )


def test_vmap_equals_python_loop():
    # Different distributions, drafts and keys per position.
    positions = [(pair, draft) for pair in PAIRS for draft in (0, 3, 5)]
    log_q = jnp.stack([pair.log_q for pair, _ in positions])
    log_p = jnp.stack([pair.log_p for pair, _ in positions])
    drafts = jnp.array([draft for _, draft in positions], jnp.int32)
    keys = jax.random.split(jax.random.key(11), len(positions))
    batched = jax.vmap(speculative.verify)(keys, log_q, log_p, drafts)
    batched_draft = jax.vmap(sample_token)(keys, log_q)
    for i, (pair, draft) in enumerate(positions):
        single = speculative.verify(keys[i], pair.log_q, pair.log_p, jnp.int32(draft))
        assert int(batched.token[i]) == int(single.token)
        assert bool(batched.accepted[i]) == bool(single.accepted)
        np.testing.assert_allclose(float(batched.beta[i]), float(single.beta), atol=FLOAT32_ATOL)
        assert int(batched_draft[i]) == int(sample_token(keys[i], pair.log_q))
