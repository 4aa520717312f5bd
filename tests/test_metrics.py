"""Metrics on hand-built records with known answers."""

import jax
import jax.numpy as jnp
import numpy as np

from uhlm_jax import channel as ch
from uhlm_jax.metrics import (
    link_metrics,
    metrics_from_sums,
    safe_ratio,
    token_sums,
)
from uhlm_jax.models.llama import final_hidden_states, forward
from uhlm_jax.models.toy import toy_pair
from uhlm_jax.modes import Mode

EXACT = 1e-6

# Given: five steps of one row; the last is invalid (after EOS) and must be ignored.
BETA = np.array([0.0, 0.5, 0.2, 0.1, 0.9], np.float32)
TRANSMITTED = np.array([True, True, False, False, True])
ACCEPTED = np.array([True, False, False, False, True])
VALID = np.array([True, True, True, True, False])


def token_metrics(beta, transmitted, accepted, valid):
    """U-HLM's metrics of records, pooled over every axis."""
    sums = token_sums(*(jnp.ravel(x) for x in (transmitted, beta, accepted, valid)))
    return metrics_from_sums(Mode.UHLM, sums)


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




def _static_profile():
    slm = ch.Deployment(ch.ModelSize.TINYLLAMA_1_1B, ch.Device.PHONE_SOC)
    llm = ch.Deployment(ch.ModelSize.LLAMA_2_7B, ch.Device.DATACENTER_GPU)
    link = ch.Link(bandwidth_hz=10e6, mean_snr_db=10.0, fading=ch.Fading.NONE)
    return ch.CostProfile(slm=slm, llm=llm, link=link, vocab_size=32000, bits_per_prob=8.0)


def test_link_metrics_match_the_per_token_latency_terms():
    # Given: 2 rows x 4 steps, 5 valid tokens, 2 of them transmitted; a link without fading.
    profile = _static_profile()
    valid = np.array([[1, 1], [1, 1], [1, 0], [0, 0]], bool)
    transmitted = np.array([[1, 0], [0, 1], [0, 0], [0, 0]], bool)
    terms = ch.expected_breakdown(profile)
    local = float(terms.slm_s + terms.uncertainty_s)
    remote = float(terms.uplink_s + terms.llm_s + terms.downlink_s)
    m = link_metrics(Mode.UHLM, transmitted, valid, profile, jax.random.key(0))
    # Then: U-HLM pays the remote terms on 2 tokens, HLM on all 5.
    np.testing.assert_allclose(m.latency_s, 5 * local + 2 * remote, rtol=1e-5)
    np.testing.assert_allclose(m.hlm_latency_s, 5 * (local + remote), rtol=1e-5)
    np.testing.assert_allclose(m.throughput_tokens_per_s, 5 / (5 * local + 2 * remote), rtol=1e-5)
    assert float(m.speedup_vs_hlm) <= float(m.speedup_bound)
    np.testing.assert_allclose(m.speedup_bound, 1 / (1 - 3 / 5), rtol=1e-6)
    assert float(m.llm_calls_saved) == 3
    np.testing.assert_allclose(m.uplink_bits_saved, 3 * 32000 * 8, rtol=1e-6)
    # HLM costed as HLM has speedup 1; SLM-only saves every call.
    hlm = link_metrics(Mode.HLM, valid, valid, profile, jax.random.key(0))
    np.testing.assert_allclose(hlm.speedup_vs_hlm, 1.0, rtol=1e-6)
    slm = link_metrics(Mode.SLM_ONLY, np.zeros_like(valid), valid, profile, jax.random.key(0))
    assert float(slm.llm_calls_saved) == 5 and np.isinf(slm.speedup_bound)


def test_final_hidden_states_feed_the_lm_head():
    # Logits from forward equal the tied head applied to the final hidden states.
    _, llm = toy_pair()
    tokens, lengths = jnp.asarray([[1, 2, 3, 4]]), jnp.asarray([4])
    hidden = final_hidden_states(llm, tokens, lengths)
    logits = forward(llm, tokens, lengths)
    weights = llm.weights
    head = (
        weights["embed_tokens"]["embedding"].T
        if llm.config.tie_word_embeddings
        else weights["lm_head"]["kernel"]
    )
    np.testing.assert_allclose(hidden @ head, logits, rtol=1e-4, atol=1e-4)
