"""Tests for the top-M partition functions of the temperature-perturbation measure.

Given adversarial logits, when the log-probability of the draft is bracketed from the top-M
logits, then the float64 full-sum value lies inside the bracket; and given a batch, when
`u` is computed from the top-M logits, then it equals the full sums' `u` wherever every
re-draw is certain, and the batch falls back to the full sums where one is not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from uhlm_jax.uncertainty import (
    TOP_M_ROUNDING_MARGIN,
    TemperaturePerturbation,
    disagreement_share,
    top_m_log_prob_bracket,
)

TIGHTNESS_RTOL = 1e-3  # float32 rounding of a bracket width that equals the true tail
NUM_ROWS = 64  # rows of the batch comparisons


def _adversarial_cases():
    rng = np.random.default_rng(0)
    ties = rng.integers(0, 4, 4096).astype(np.float32)
    spike = np.zeros(4096, np.float32)
    spike[7] = 40.0
    masked = (3.0 * rng.standard_normal(4096)).astype(np.float32)
    masked[::2] = -np.inf
    return {
        # name: (logits, top_m, drafts)
        "flat": (np.zeros(4096, np.float32), 16, (0, 4095)),
        "one spike": (spike, 4, (7, 0, 4095)),
        "many ties": (ties, 100, (int(np.argmax(ties)), int(np.argmin(ties)))),
        "huge V tiny M": ((3.0 * rng.standard_normal(151_936)).astype(np.float32), 2, (0, 1)),
        "near flat": ((1e-3 * rng.standard_normal(4096)).astype(np.float32), 64, (0, 1)),
        "wide": ((50.0 * rng.standard_normal(4096)).astype(np.float32), 8, (0, 1)),
        "masked half": (masked, 32, (1, 3)),
        "all but M masked": (np.where(np.arange(4096) < 16, masked, -np.inf), 16, (1, 3)),
    }


ADVERSARIAL = _adversarial_cases()
# Temperature sets, each one call: the reference temperature is the set's largest.
TEMPERATURE_SETS = {
    "very low": [1e-30, 1e-6, 1e-3],
    "low to high": [1e-3, 0.05, 0.5, 1.0, 2.0],
    "very high": [10.0, 1e3, 1e6],
    "one": [2.0],
}


def _float64_log_prob(logits: np.ndarray, draft: int, theta: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    scaled = shifted[None, :] / theta[:, None]
    return scaled[:, draft] - logsumexp(scaled, axis=1)


@pytest.mark.parametrize("temperatures", TEMPERATURE_SETS.values(), ids=TEMPERATURE_SETS.keys())
@pytest.mark.parametrize("case", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_bracket_contains_the_full_sum(case, temperatures):
    logits, top_m, drafts = case
    theta = np.asarray(temperatures, np.float32)
    for draft in drafts:
        lower, upper = top_m_log_prob_bracket(
            jnp.asarray(logits), jnp.int32(draft), jnp.asarray(theta), top_m
        )
        lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
        truth = _float64_log_prob(logits, draft, theta.astype(np.float64))
        margin = TOP_M_ROUNDING_MARGIN * (1.0 + np.abs(upper))
        assert np.all(lower - margin <= truth), (draft, lower, truth)
        assert np.all(truth <= upper + margin), (draft, upper, truth)


def test_flat_bound_is_tight_on_flat_logits():
    # V equal logits: the tail is exactly (V − M) exp(0), the flat bound, so the bracket's
    # lower end is the true log(1/V) and its upper end log(1/M).
    vocab, top_m = 1000, 10
    lower, upper = top_m_log_prob_bracket(
        jnp.zeros(vocab), jnp.int32(3), jnp.asarray([0.5, 2.0]), top_m
    )
    np.testing.assert_allclose(lower, -np.log(vocab), rtol=TOP_M_ROUNDING_MARGIN)
    np.testing.assert_allclose(upper, -np.log(top_m), rtol=TOP_M_ROUNDING_MARGIN)


def test_bracket_is_as_narrow_as_the_tail_on_a_spike():
    # One logit 40 above V − 1 zeros: the omitted tail is (V − M) exp(−40/θ), and the
    # bracket's width should be log(1 + tail), not wider.
    logits, top_m, _ = ADVERSARIAL["one spike"]
    theta = np.asarray([1e-3, 0.5, 2.0])
    lower, upper = top_m_log_prob_bracket(
        jnp.asarray(logits), jnp.int32(7), jnp.asarray(theta, jnp.float32), top_m
    )
    tail = (logits.shape[0] - top_m) * np.exp(-40.0 / theta)
    np.testing.assert_allclose(upper - lower, np.log1p(tail), rtol=TIGHTNESS_RTOL, atol=0.0)


@pytest.mark.parametrize("top_m", [0, 16])
def test_top_m_outside_the_vocabulary_is_rejected(top_m):
    with pytest.raises(ValueError, match=f"top_m={top_m}"):
        top_m_log_prob_bracket(jnp.zeros(16), jnp.int32(0), jnp.ones(2), top_m)


def _rows(scale: float, spike: float, vocab: int = 2048, seed: int = 0):
    """`NUM_ROWS` rows of `scale`-normal logits with one token raised by `spike`."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((NUM_ROWS, vocab))
    logits[np.arange(NUM_ROWS), rng.integers(0, vocab, NUM_ROWS)] += spike
    drafts = np.where(
        rng.random(NUM_ROWS) < 0.7, np.argmax(logits, axis=1), rng.integers(0, vocab, NUM_ROWS)
    )
    keys = jax.random.split(jax.random.key(seed), NUM_ROWS)
    return keys, jnp.asarray(logits, jnp.float32), jnp.asarray(drafts, jnp.int32)


@pytest.mark.parametrize("max_temperature", [0.5, 2.0])
def test_certain_rows_equal_the_full_sums(max_temperature):
    # Moderate spikes: some rows are decided by their top-M logits, some are not.
    measure = TemperaturePerturbation(max_temperature=max_temperature)
    keys, logits, drafts = _rows(scale=1.0, spike=12.0)
    top_m = 32
    disagree, certain = jax.vmap(measure.top_m_decisions, in_axes=(0, 0, 0, None))(
        keys, logits, drafts, top_m
    )
    full = jax.vmap(measure)(keys, logits, logits, drafts)
    row_certain = np.asarray(jnp.all(certain, axis=1))
    assert 0 < row_certain.sum(), "no row was decided by its top-M logits"
    top_m_u = jax.vmap(disagreement_share)(disagree)
    np.testing.assert_array_equal(np.asarray(top_m_u)[row_certain], np.asarray(full)[row_certain])


def test_batch_uses_top_m_where_all_rows_are_certain():
    measure = TemperaturePerturbation()
    keys, logits, drafts = _rows(scale=1.0, spike=60.0)
    _, certain = jax.vmap(measure.top_m_decisions, in_axes=(0, 0, 0, None))(keys, logits, drafts, 8)
    assert bool(jnp.all(certain))
    rows = jax.jit(measure.top_m_rows, static_argnames="top_m")(keys, logits, drafts, top_m=8)
    np.testing.assert_array_equal(rows, jax.vmap(measure)(keys, logits, logits, drafts))


def test_batch_falls_back_where_a_row_is_uncertain():
    # Flat rows: the top-M logits cannot decide, and deciding from them anyway (upper end
    # of the bracket) would give another u; the batch must give the full sums' u.
    measure = TemperaturePerturbation()
    keys, logits, drafts = _rows(scale=0.1, spike=0.0)
    disagree, certain = jax.vmap(measure.top_m_decisions, in_axes=(0, 0, 0, None))(
        keys, logits, drafts, 8
    )
    full = jax.vmap(measure)(keys, logits, logits, drafts)
    assert not bool(jnp.all(certain))
    assert np.any(np.asarray(jax.vmap(disagreement_share)(disagree)) != np.asarray(full))
    rows = jax.jit(measure.top_m_rows, static_argnames="top_m")(keys, logits, drafts, top_m=8)
    np.testing.assert_array_equal(rows, full)


def test_nan_logits_are_never_certain():
    measure = TemperaturePerturbation()
    logits = jnp.zeros(64).at[5].set(jnp.nan)
    _, certain = measure.top_m_decisions(jax.random.key(0), logits, jnp.int32(0), 4)
    assert not bool(jnp.any(certain))
