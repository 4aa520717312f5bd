"""Tests for CU-HLM top-k truncation (uhlm_jax.truncation)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax import channel, speculative
from uhlm_jax import truncation as tr

# float32 sums over at most a few hundred entries.
FLOAT32_ATOL = 1e-6
# Monte Carlo agreement: |frequency − probability| within this many standard errors.
MC_STANDARD_ERRORS = 4.0


def _log(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def _random_log_q(seed, v=200, scale=3.0):
    return jax.nn.log_softmax(scale * jax.random.normal(jax.random.key(seed), (v,)))


Q5 = _log([0.4, 0.3, 0.15, 0.1, 0.05])


def test_truncate_hand_computed():
    # Given q = (.4, .3, .15, .1, .05) and k = 2, the omitted .3 is spread over 3 entries.
    x_hat = jnp.exp(tr.truncate(Q5, 2))
    np.testing.assert_allclose(x_hat, [0.4, 0.3, 0.1, 0.1, 0.1], atol=FLOAT32_ATOL)
    # k = 1: the omitted .6 over 4 entries.
    np.testing.assert_allclose(
        jnp.exp(tr.truncate(Q5, 1)), [0.4, 0.15, 0.15, 0.15, 0.15], atol=FLOAT32_ATOL
    )


def test_truncate_keeps_top_entries_wherever_they_are_and_normalises():
    log_q = _random_log_q(0)
    k = 17
    log_x_hat = tr.truncate(log_q, k)
    top = np.argsort(-np.asarray(log_q))[:k]
    np.testing.assert_array_equal(log_x_hat[top], log_q[top])
    rest = np.setdiff1d(np.arange(log_q.shape[0]), top)
    assert np.ptp(np.asarray(log_x_hat[rest])) < 1e-5  # uniform tail
    assert abs(float(jax.nn.logsumexp(log_x_hat))) < 1e-5


def test_truncate_at_full_vocabulary_is_identity():
    log_q = _random_log_q(1)
    np.testing.assert_array_equal(tr.truncate(log_q, log_q.shape[0]), log_q)


def test_distortion_hand_computed_and_curve():
    # TV(k) = ½ Σ_tail |q − mean(tail)|:
    #   k=1: tail (.3,.15,.1,.05), mean .15 -> ½(.15 + 0 + .05 + .1) = .15
    #   k=2: tail (.15,.1,.05), mean .1     -> ½(.05 + 0 + .05)      = .05
    #   k=3: tail (.1,.05), mean .075       -> ½(.025 + .025)        = .025
    #   k=4, 5: 0
    want = [0.15, 0.05, 0.025, 0.0, 0.0]
    direct = [float(tr.distortion_tv(Q5, k)) for k in range(1, 6)]
    np.testing.assert_allclose(direct, want, atol=FLOAT32_ATOL)
    np.testing.assert_allclose(tr.distortion_curve(Q5), want, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_distortion_is_monotone_in_k_and_curve_matches_direct(seed):
    log_q = _random_log_q(seed, v=300, scale=1.0 + seed)
    ks = jnp.arange(1, 301)
    direct = jax.jit(jax.vmap(tr.distortion_tv, in_axes=(None, 0)))(log_q, ks)
    assert bool(jnp.all(jnp.diff(direct) <= FLOAT32_ATOL))
    np.testing.assert_allclose(tr.distortion_curve(log_q), direct, atol=FLOAT32_ATOL)


def test_distortion_curve_with_ties_and_zeros():
    log_q = _log([0.25, 0.25, 0.25, 0.25, 0.0, 0.0])
    direct = [float(tr.distortion_tv(log_q, k)) for k in range(1, 7)]
    np.testing.assert_allclose(tr.distortion_curve(log_q), direct, atol=FLOAT32_ATOL)


def test_smallest_k_hand_computed():
    assert int(tr.smallest_k(Q5, 0.2)) == 1
    assert int(tr.smallest_k(Q5, 0.05)) == 2
    assert int(tr.smallest_k(Q5, 0.04)) == 3
    assert int(tr.smallest_k(Q5, 0.0)) == 4


def test_smallest_k_is_the_first_k_within_tolerance():
    log_q = _random_log_q(5, v=300)
    direct = np.asarray(jax.vmap(tr.distortion_tv, in_axes=(None, 0))(log_q, jnp.arange(1, 301)))
    for tol in [0.3, 0.1, 0.01, 1e-3]:
        k = int(tr.smallest_k(log_q, tol))
        assert direct[k - 1] <= tol + FLOAT32_ATOL
        assert k == 1 or direct[k - 2] > tol - FLOAT32_ATOL


def test_smallest_k_vmap_equals_loop_and_compiles_once():
    log_q = jax.vmap(lambda s: _random_log_q(s, v=100))(jnp.arange(6))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def choose(log_q, tol):
        return jax.vmap(tr.smallest_k, in_axes=(0, None))(log_q, tol)

    for tol in [0.2, 0.05, 0.01]:
        batched = choose(log_q, jnp.float32(tol))
        looped = [int(tr.smallest_k(row, tol)) for row in log_q]
        np.testing.assert_array_equal(batched, looped)


def test_offline_k_uses_mean_distortion_of_valid_rows():
    # Rows: Q5 (curve .15,.05,.025,0,0) and uniform (curve 0); padding row ignored.
    uniform = jnp.full((5,), -math.log(5.0))
    rows = jnp.stack([Q5, uniform, Q5])
    valid = jnp.array([True, True, False])
    # Mean curve (.075, .025, .0125, 0, 0).
    assert int(tr.offline_k(rows, valid, 0.03)) == 2
    assert int(tr.offline_k(rows, valid, 0.01)) == 4
    assert int(tr.offline_k(rows, jnp.array([True, False, False]), 0.03)) == 3


def test_compress_rules_and_payload():
    fixed = tr.compress(tr.FixedK(2), Q5)
    assert int(fixed.k) == 2
    np.testing.assert_allclose(float(fixed.distortion_tv), 0.05, atol=FLOAT32_ATOL)
    online = tr.compress(tr.ToleranceK(0.04), Q5)
    assert int(online.k) == 3
    np.testing.assert_allclose(float(online.distortion_tv), 0.025, atol=FLOAT32_ATOL)
    # k = 3 of V = 5 with 8-bit probabilities: 3 · (8 + 3) bits.
    assert float(channel.top_k_bits(online.k, 5, 8.0)) == 33.0


def test_emitted_distribution_hand_computed():
    # q = (.6,.3,.1), k = 1 -> x̂ = (.6,.2,.2); p = (.2,.5,.3).
    # a = min(1, p/x̂) = (1/3, 1, 1); Σ q a = .6; (p − x̂)_+ = (0,.3,.1) -> r̂ = (0,.75,.25).
    # e = q a + .4 r̂ = (.2,.3,.1) + (0,.3,.1) = (.2,.6,.2); TV(e, p) = .1.
    log_q, log_p = _log([0.6, 0.3, 0.1]), _log([0.2, 0.5, 0.3])
    log_x_hat = tr.truncate(log_q, 1)
    np.testing.assert_allclose(jnp.exp(log_x_hat), [0.6, 0.2, 0.2], atol=FLOAT32_ATOL)
    e = tr.emitted_distribution(log_q, log_x_hat, log_p)
    np.testing.assert_allclose(e, [0.2, 0.6, 0.2], atol=FLOAT32_ATOL)
    np.testing.assert_allclose(
        float(tr.exactness_loss_tv(log_q, log_x_hat, log_p)), 0.1, atol=FLOAT32_ATOL
    )


@pytest.mark.parametrize("seed", range(3))
def test_emitted_distribution_is_p_without_truncation(seed):
    log_q = _random_log_q(seed, v=50)
    log_p = _random_log_q(seed + 100, v=50)
    e = tr.emitted_distribution(log_q, tr.truncate(log_q, 50), log_p)
    np.testing.assert_allclose(e, jnp.exp(log_p), atol=FLOAT32_ATOL)
    # Adversarial pairs: p = q, and disjoint supports.
    np.testing.assert_allclose(tr.emitted_distribution(log_q, log_q, log_q), jnp.exp(log_q),
                               atol=FLOAT32_ATOL)
    disjoint_q, disjoint_p = _log([0.5, 0.5, 0.0, 0.0]), _log([0.0, 0.0, 0.3, 0.7])
    np.testing.assert_allclose(
        tr.emitted_distribution(disjoint_q, disjoint_q, disjoint_p), [0, 0, 0.3, 0.7],
        atol=FLOAT32_ATOL,
    )


def _verify_many(log_q, rule, log_p, key, n):
    def one(key):
        draft_key, verify_key = jax.random.split(key)
        draft = jax.random.categorical(draft_key, log_q)
        return tr.verify_compressed(verify_key, rule, log_q, log_p, draft)[0]

    return jax.jit(jax.vmap(one))(jax.random.split(key, n))


def test_full_vocabulary_truncation_reproduces_untruncated_verification_exactly():
    log_q = _random_log_q(3, v=40)
    log_p = _random_log_q(4, v=40)
    keys = jax.random.split(jax.random.key(0), 256)
    drafts = jax.vmap(jax.random.categorical, in_axes=(0, None))(keys, log_q)
    verify = jax.jit(jax.vmap(speculative.verify, in_axes=(0, None, None, 0)))
    plain = verify(keys, log_q, log_p, drafts)
    truncated = verify(keys, tr.truncate(log_q, 40), log_p, drafts)
    for a, b in zip(plain, truncated, strict=True):
        np.testing.assert_array_equal(a, b)
    # The same through the rule-based entry point with k = V.
    compressed = jax.jit(
        jax.vmap(tr.verify_compressed, in_axes=(0, None, None, None, 0))
    )(keys, tr.FixedK(40), log_q, log_p, drafts)
    for a, b in zip(plain, compressed[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_verification_against_truncation_emits_the_predicted_distribution():
    # Given d ~ q verified against x̂ (k = 2), When sampling many tokens,
    # Then token frequencies match emitted_distribution, which differs from p.
    log_q = _log([0.45, 0.25, 0.15, 0.1, 0.05])
    log_p = _log([0.1, 0.2, 0.3, 0.25, 0.15])
    log_x_hat = tr.truncate(log_q, 2)
    n = 100_000
    result = _verify_many(log_q, tr.FixedK(2), log_p, jax.random.key(42), n)
    freq = np.bincount(np.asarray(result.token), minlength=5) / n
    e = np.asarray(tr.emitted_distribution(log_q, log_x_hat, log_p))
    standard_error = np.sqrt(e * (1 - e) / n)
    assert np.all(np.abs(freq - e) < MC_STANDARD_ERRORS * standard_error)
    assert float(tr.exactness_loss_tv(log_q, log_x_hat, log_p)) > 0.01


@pytest.mark.without_type_checks
@pytest.mark.parametrize("k", [0, 6, 2.5])
def test_k_outside_vocabulary_is_rejected(k):
    with pytest.raises(ValueError, match=rf"top_k={k}.*\[1, vocab_size=5\]"):
        tr.truncate(Q5, k)


def test_bad_rules_are_rejected():
    with pytest.raises(ValueError, match=r"tolerance_tv=1.5"):
        tr.ToleranceK(1.5)
    with pytest.raises(ValueError, match=r"k=0"):
        tr.FixedK(0)
    with pytest.raises(ValueError, match=r"top_k=9"):
        tr.compress(tr.FixedK(9), Q5)
