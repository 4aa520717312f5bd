"""One mode policy: a rollout and the replay of its own records agree, mode by mode.

Given a rollout of the toy pair in a mode, trace replay of its records (the recorded
uncertainty, β and acceptances) with the same transmit rule must give the rollout's own
transmission rate, skip rate and token metrics, and, on a link without fading, its
throughput, speedup and speedup bound. LLM-only transmits every token in both.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from uhlm_jax import channel as ch
from uhlm_jax import replay as rp
from uhlm_jax.metrics import link_metrics
from uhlm_jax.modes import Mode, Transmission, transmit_decision, transmit_weight
from uhlm_jax.pair import load_pair
from uhlm_jax.rollout import RolloutConfig, RolloutParams, run_rollout

PROMPTS = ("hello", "the quick brown fox", "a", "jax is fast", "xyz", "1 2 3", "ok", "end")
MAX_NEW_TOKENS = 32
THRESHOLD = 0.3
# Float32 sums of the same tokens in another order (replay sums them in one pass, the
# link model per row) agree to a few ulps of the total.
SUM_ORDER_RTOL = 1e-5
# Size of the statistical test: the chance a correct implementation fails it.
TEST_SIZE = 1e-3

# Every mode, with the settings of its transmit rule; Rand-HLM at its deterministic ends.
EXACT_CASES = [
    (Mode.LLM_ONLY, 0.5),
    (Mode.SLM_ONLY, 0.5),
    (Mode.HLM, 0.5),
    (Mode.UHLM, 0.5),
    (Mode.RAND_HLM, 0.0),
    (Mode.RAND_HLM, 1.0),
]


@pytest.fixture(scope="module")
def pair():
    return load_pair("toy")


@pytest.fixture(scope="module")
def profile() -> ch.CostProfile:
    """A cost profile whose link does not fade, so record costs equal expected costs."""
    slm = ch.Deployment(ch.ModelSize.TINYLLAMA_1_1B, ch.Device.PHONE_SOC)
    llm = ch.Deployment(ch.ModelSize.LLAMA_2_7B, ch.Device.DATACENTER_GPU)
    link = ch.Link(bandwidth_hz=10e6, mean_snr_db=10.0, fading=ch.Fading.NONE)
    return ch.CostProfile(slm=slm, llm=llm, link=link, vocab_size=32000, bits_per_prob=8.0)


def _rollout(pair, mode, transmit_probability):
    config = RolloutConfig(mode=mode, max_new_tokens=MAX_NEW_TOKENS)
    params = RolloutParams.create(threshold=THRESHOLD, transmit_probability=transmit_probability)
    return run_rollout(pair, list(PROMPTS), config, params, seed=0).records


def _expected(mode, records):
    """The rollout's own metrics, from its valid records in float64."""
    valid = records.valid
    sent = records.transmitted[valid].astype(np.float64)
    beta = records.beta[valid].astype(np.float64)
    accepted = records.accepted[valid].astype(np.float64)
    n, t = sent.size, sent.sum()
    skipped = n - t
    risk = ((1 - sent) * beta).sum()
    return {
        "transmission_rate": t / n,
        "skip_rate": skipped / n,
        # LLM-only drafts nothing, so nothing is accepted or rejected.
        "acceptance_rate": accepted.sum() / t if t and mode is not Mode.LLM_ONLY else math.nan,
        "true_skip_rate": ((1 - sent) * (1 - beta)).sum() / skipped if skipped else math.nan,
        "risk_per_token": risk / n,
        "risk_conditional": risk / skipped if skipped else math.nan,
        "mean_beta": beta.mean(),
        "llm_agreement": 1 - risk / n,
    }


def _replay(mode, records, transmit_probability, profile):
    """Replay of the rollout's own records, on the direct and the sorted path."""
    valid = records.valid
    tokens = rp.TokenRecords(
        u=jnp.asarray(records.uncertainty[..., 0][valid][None]),
        beta=jnp.asarray(records.beta[valid]),
        accepted=jnp.asarray(records.accepted[valid]),
    )
    point = rp.GridPoints.create(
        threshold=THRESHOLD, measure=0, transmit_probability=transmit_probability,
        snr_db=profile.link.mean_snr_db, bandwidth_hz=profile.link.bandwidth_hz,
        bits_per_prob=profile.bits_per_prob,
    )
    direct = rp.replay_point_direct(mode, tokens, profile, point)
    fast = rp.replay_point(mode, rp.sort_tokens(tokens), profile, point)
    return jax.device_get(direct), jax.device_get(fast)


@pytest.mark.parametrize(("mode", "transmit_probability"), EXACT_CASES)
def test_replay_of_a_rollout_gives_its_own_metrics(pair, profile, mode, transmit_probability):
    # Given a rollout in `mode`
    records = _rollout(pair, mode, transmit_probability)
    assert records.valid.sum() > len(PROMPTS)
    # When its records are replayed with the same transmit rule
    direct, fast = _replay(mode, records, transmit_probability, profile)
    # Then replay gives the rollout's TR, skip rate and token metrics
    for name, value in _expected(mode, records).items():
        for out in (direct, fast):
            np.testing.assert_allclose(
                getattr(out, name), value, rtol=SUM_ORDER_RTOL, atol=SUM_ORDER_RTOL,
                equal_nan=True, err_msg=f"{mode.value}: {name}",
            )
    # And, on a link without fading, the rollout's costs
    costs = jax.device_get(
        link_metrics(mode, records.transmitted, records.valid, profile, jax.random.key(0))
    )
    for out in (direct, fast):
        np.testing.assert_allclose(
            out.throughput_tokens_per_s, costs.throughput_tokens_per_s, rtol=SUM_ORDER_RTOL
        )
        np.testing.assert_allclose(out.speedup_vs_hlm, costs.speedup_vs_hlm, rtol=SUM_ORDER_RTOL)
        np.testing.assert_allclose(
            out.speedup_bound, costs.speedup_bound, rtol=SUM_ORDER_RTOL, equal_nan=True
        )


def test_llm_only_transmits_every_token_and_has_no_draft_metrics(pair, profile):
    records = _rollout(pair, Mode.LLM_ONLY, 0.5)
    # The rollout records every LLM-only token as transmitted, none as a verified draft.
    np.testing.assert_array_equal(records.transmitted, records.valid)
    assert not records.accepted.any() and not records.resampled.any()
    direct, _ = _replay(Mode.LLM_ONLY, records, 0.5, profile)
    assert direct.transmission_rate == 1 and direct.skip_rate == 0
    assert math.isnan(direct.acceptance_rate) and math.isnan(direct.speedup_bound)
    assert direct.uplink_bits_per_token == 0 and direct.llm_calls_per_token == 1


def test_rand_hlm_transmits_at_its_probability(pair, profile):
    # Given a Rand-HLM rollout at p = 0.5, whose replay weight is p for every token
    p = 0.5
    records = _rollout(pair, Mode.RAND_HLM, p)
    direct, _ = _replay(Mode.RAND_HLM, records, p, profile)
    assert direct.transmission_rate == p and direct.skip_rate == 1 - p
    # Then the rollout's transmission rate is a Binomial(n, p) share around it
    n = int(records.valid.sum())
    transmitted = int(records.transmitted[records.valid].sum())
    assert stats.binomtest(transmitted, n, p).pvalue > TEST_SIZE


@pytest.mark.parametrize("mode", list(Mode))
def test_transmit_weight_is_the_expected_decision(mode):
    # Given uncertainties on both sides of the threshold and many keys
    u = jnp.asarray([0.1, 0.3, 0.5], jnp.float32)
    threshold, probability = jnp.float32(THRESHOLD), jnp.float32(0.25)
    keys = jax.random.split(jax.random.key(1), 4000)
    decide = jax.vmap(
        jax.vmap(transmit_decision, in_axes=(None, None, 0, None, None)),
        in_axes=(None, 0, None, None, None),
    )
    share = np.asarray(decide(mode, keys, u, threshold, probability), np.float64).mean(0)
    weight = np.asarray(
        jax.vmap(transmit_weight, in_axes=(None, 0, None, None))(mode, u, threshold, probability)
    )
    if mode.policy.transmission is Transmission.RANDOM:
        # A Bernoulli(p) share over the keys: within its standard error.
        se = math.sqrt(0.25 * 0.75 / len(keys))
        z = stats.norm.isf(TEST_SIZE / 2)
        np.testing.assert_allclose(share, weight, atol=z * se)
    else:
        np.testing.assert_array_equal(share, weight)
