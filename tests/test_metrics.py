"""Metrics on hand-built records with known answers."""

import jax
import jax.numpy as jnp
import numpy as np

from uhlm_jax.metrics import cosine_similarity, response_nll, safe_ratio, token_metrics

EXACT = 1e-6

# Given: five steps of one row; the last is invalid (after EOS) and must be ignored.
BETA = np.array([0.0, 0.5, 0.2, 0.1, 0.9], np.float32)
TRANSMITTED = np.array([True, True, False, False, True])
ACCEPTED = np.array([True, False, False, False, True])
VALID = np.array([True, True, True, True, False])


def test_hand_built_records():
    m = token_metrics(BETA, TRANSMITTED, ACCEPTED, VALID)
    # 4 valid tokens: 2 transmitted (1 accepted), 2 skipped with beta 0.2 and 0.1.
    assert float(m.tokens) == 4
    assert float(m.transmitted) == 2 and float(m.skipped) == 2
    np.testing.assert_allclose(m.transmission_rate, 0.5, atol=EXACT)
    np.testing.assert_allclose(m.skip_rate, 0.5, atol=EXACT)
    np.testing.assert_allclose(m.acceptance_rate, 0.5, atol=EXACT)
    np.testing.assert_allclose(m.true_skip_rate, (0.8 + 0.9) / 2, atol=EXACT)
    np.testing.assert_allclose(m.risk_per_token, (0.2 + 0.1) / 4, atol=EXACT)
    np.testing.assert_allclose(m.risk_conditional, (0.2 + 0.1) / 2, atol=EXACT)
    np.testing.assert_allclose(m.mean_beta, (0.0 + 0.5 + 0.2 + 0.1) / 4, atol=EXACT)


def test_nothing_transmitted_gives_nan_acceptance_not_error():
    m = token_metrics(BETA, np.zeros(5, bool), np.zeros(5, bool), VALID)
    assert np.isnan(m.acceptance_rate)
    np.testing.assert_allclose(m.skip_rate, 1.0, atol=EXACT)


def test_safe_ratio_zero_denominator():
    assert np.isnan(safe_ratio(1.0, 0.0))
    np.testing.assert_allclose(safe_ratio(1.0, 4.0), 0.25)


def test_vmap_over_grid_equals_loop():
    # Given: three grid points (e.g. thresholds) with different transmit masks.
    rng = np.random.default_rng(0)
    beta = rng.uniform(size=(3, 6, 2)).astype(np.float32)
    transmitted = rng.uniform(size=(3, 6, 2)) < 0.5
    accepted = transmitted & (rng.uniform(size=(3, 6, 2)) < 0.7)
    valid = np.ones((3, 6, 2), bool)
    batched = jax.vmap(token_metrics)(beta, transmitted, accepted, valid)
    for i in range(3):
        single = token_metrics(beta[i], transmitted[i], accepted[i], valid[i])
        for name in single._fields:
            np.testing.assert_allclose(
                getattr(batched, name)[i], getattr(single, name), rtol=1e-6, equal_nan=True
            )
    assert jnp.all(batched.tokens == 12)


def test_response_nll_hand_computed():
    # Given: vocabulary 2, uniform logits except a confident prediction at column 1.
    logits = np.zeros((1, 4, 2), np.float32)
    logits[0, 1] = [np.log(3.0), 0.0]  # P(token 0 | column 1) = 3/4
    tokens = np.array([[1, 1, 0, 1]])
    # Response = columns 2..3 (predicted by columns 1 and 2).
    nll = response_nll(jnp.asarray(logits), tokens, np.array([2]), np.array([4]))
    np.testing.assert_allclose(nll, [(-np.log(0.75) + np.log(2.0)) / 2], rtol=1e-6)
    # An empty response is NaN, not an error.
    assert np.isnan(response_nll(jnp.asarray(logits), tokens, np.array([4]), np.array([4]))[0])


def test_cosine_similarity_cases():
    np.testing.assert_allclose(cosine_similarity([1.0, 0.0], [2.0, 0.0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cosine_similarity([1.0, 0.0], [0.0, 3.0]), 0.0, atol=1e-7)
    np.testing.assert_allclose(cosine_similarity([1.0, 1.0], [-1.0, -1.0]), -1.0, rtol=1e-6)
    assert float(cosine_similarity([0.0, 0.0], [1.0, 0.0])) == 0.0
