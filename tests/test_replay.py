"""Trace replay: sorted prefix sums and chunked grids against brute-force loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax import channel as ch
from uhlm_jax import replay as rp
from uhlm_jax.metrics import TokenSums, metrics_from_sums, token_sums
from uhlm_jax.modes import Mode
from uhlm_jax.pricing import Pricing

# Float32 sums of the same numbers in another order (prefix sums vs masked sums) agree to
# a few ulps of the total; the brute-force comparison uses dyadic data, where they agree
# exactly.
SUM_ORDER_RTOL = 1e-5


def _profile() -> ch.CostProfile:
    return Pricing().cost_profile()


def _dyadic_tokens(n: int = 64, m: int = 3, seed: int = 0) -> rp.TokenRecords:
    """Tokens whose u and β are multiples of 1/16: every float32 sum of them is exact."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 17, (m, n)).astype(np.float32) / 16
    beta = rng.integers(0, 17, n).astype(np.float32) / 16
    accepted = rng.random(n) > beta
    return rp.TokenRecords(jnp.asarray(u), jnp.asarray(beta), jnp.asarray(accepted))


def _brute_force(mode, tokens, threshold, measure, probability):
    """Python loop over tokens in float64, the metrics as defined in the module doc."""
    u, beta, acc = (np.asarray(x, np.float64) for x in tokens)
    n = beta.size
    w = np.empty(n)
    for j in range(n):
        if mode is Mode.UHLM:
            w[j] = 1.0 if u[measure, j] > threshold else 0.0
        elif mode is Mode.RAND_HLM:
            w[j] = probability
        elif mode is Mode.SLM_ONLY:
            w[j] = 0.0
        else:
            w[j] = 1.0
    sent, skip = w.sum(), (1 - w).sum()
    risk = ((1 - w) * beta).sum()
    return {
        "transmission_rate": sent / n,
        "acceptance_rate": (w * acc).sum() / sent if sent else np.nan,
        "true_skip_rate": ((1 - w) * (1 - beta)).sum() / skip if skip else np.nan,
        "risk_per_token": risk / n,
        "risk_conditional": risk / skip if skip else np.nan,
        "mean_beta": beta.mean(),
    }


@pytest.mark.parametrize("mode", [Mode.UHLM, Mode.HLM, Mode.RAND_HLM, Mode.SLM_ONLY])
def test_grid_equals_python_loop_over_points_exactly(mode):
    # Given dyadic tokens and a small grid over threshold, measure and probability
    tokens = _dyadic_tokens()
    thresholds = np.array([-0.5, 0.0, 0.25, 0.3125, 0.5, 0.75, 1.0, 2.0], np.float32)
    grid = [(t, m, p) for t in thresholds for m in range(3) for p in (0.25, 0.5)]
    points = rp.GridPoints.create(
        threshold=[g[0] for g in grid], measure=[g[1] for g in grid],
        transmit_probability=[g[2] for g in grid],
    )
    # When replayed on the sorted path in chunks of 5 (the grid is not a multiple)
    fast = jax.jit(lambda t, b, p: rp.replay_grid(mode, rp.sort_tokens(t), b, p, 5))(
        tokens, _profile(), points
    )
    # Then every point equals the brute-force loop exactly
    for i, (t, m, p) in enumerate(grid):
        expected = _brute_force(mode, tokens, float(t), m, p)
        for name, value in expected.items():
            np.testing.assert_array_equal(
                np.float32(getattr(fast, name)[i]), np.float32(value), err_msg=f"{name} at {i}"
            )


def test_sorted_path_matches_direct_path_and_token_metrics():
    # Given real-valued tokens (sums in another order differ in the last bits)
    rng = np.random.default_rng(1)
    n = 2000
    u = rng.random((2, n)).astype(np.float32)
    beta = np.clip(0.8 * u[0] - 0.06 + rng.normal(0, 0.1, n), 0, 1).astype(np.float32)
    accepted = rng.random(n) > beta
    tokens = rp.TokenRecords(jnp.asarray(u), jnp.asarray(beta), jnp.asarray(accepted))
    points = rp.GridPoints.create(
        threshold=np.linspace(-0.1, 1.1, 37), measure=np.arange(37) % 2,
        snr_db=np.linspace(-5, 30, 37), top_k=np.arange(37) % 3 * 16,
    )
    profile = _profile()
    # When replayed both ways
    sorted_out = jax.jit(lambda t, p: rp.replay_grid(Mode.UHLM, rp.sort_tokens(t), profile, p, 8))(
        tokens, points
    )
    direct_out = jax.jit(lambda t, p: rp.replay_grid(Mode.UHLM, t, profile, p, 8))(tokens, points)
    # Then they agree up to summation order
    for name in rp.ReplayMetrics._fields:
        np.testing.assert_allclose(
            getattr(sorted_out, name), getattr(direct_out, name), rtol=SUM_ORDER_RTOL,
            atol=SUM_ORDER_RTOL, err_msg=name,
        )
    # And the token metrics equal those of the same transmit mask, summed directly
    for i in (0, 10, 20, 36):
        sent = u[i % 2] > points.threshold[i]
        ref = metrics_from_sums(Mode.UHLM, token_sums(sent, beta, accepted & sent))
        for name in ("transmission_rate", "acceptance_rate", "true_skip_rate", "risk_per_token"):
            np.testing.assert_allclose(
                getattr(sorted_out, name)[i], getattr(ref, name), rtol=SUM_ORDER_RTOL,
                err_msg=name,
            )


def test_costs_follow_the_channel_model():
    # Given a U-HLM point skipping half of the tokens
    tokens = rp.TokenRecords(
        u=jnp.array([[0.1, 0.2, 0.8, 0.9]]), beta=jnp.zeros(4), accepted=jnp.ones(4, bool)
    )
    profile = _profile()
    point = rp.GridPoints.create(threshold=0.5, snr_db=profile.link.mean_snr_db,
                                 bandwidth_hz=profile.link.bandwidth_hz)
    out = rp.replay_point(Mode.UHLM, rp.sort_tokens(tokens), profile, point)
    # Then latency, throughput and speedup equal the channel model's at skip rate 0.5
    np.testing.assert_allclose(
        out.latency_s, ch.expected_token_latency_s(Mode.UHLM, profile, 0.5), rtol=1e-6
    )
    np.testing.assert_allclose(out.speedup_vs_hlm, ch.expected_speedup(profile, 0.5), rtol=1e-6)
    np.testing.assert_allclose(out.speedup_bound, 2.0)
    assert out.speedup_vs_hlm <= out.speedup_bound
    np.testing.assert_allclose(out.uplink_bits_per_token, 0.5 * ch.uplink_bits(profile))
    # And a top-k point pays k (b + ⌈log2 V⌉) bits per transmitted token
    topk = rp.replay_point(
        Mode.HLM, rp.sort_tokens(tokens), profile, rp.GridPoints.create(top_k=30, bits_per_prob=8)
    )
    np.testing.assert_allclose(topk.uplink_bits_per_token, 30 * (8 + 15))


def test_llm_only_transmits_everything_and_has_no_drafting_metrics():
    tokens = _dyadic_tokens()
    out = rp.replay_point(Mode.LLM_ONLY, rp.sort_tokens(tokens), _profile(), rp.GridPoints.create())
    assert out.transmission_rate == 1 and out.skip_rate == 0
    assert np.isnan(out.acceptance_rate) and np.isnan(out.true_skip_rate)
    assert np.isnan(out.speedup_bound) and out.uplink_bits_per_token == 0
    assert out.risk_per_token == 0 and out.llm_agreement == 1 and out.llm_calls_per_token == 1


def test_threshold_sweep_compiles_once():
    tokens = _dyadic_tokens()
    profile = _profile()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(points):
        return rp.replay_grid(Mode.UHLM, rp.sort_tokens(tokens), profile, points, 4)

    for t in (0.1, 0.5, 0.9):
        run(rp.GridPoints.create(threshold=np.full(8, t), snr_db=np.full(8, 10 * t)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transmit_probability": 1.5},
        {"threshold": float("nan")},
        {"top_k": -1},
        {"bandwidth_hz": 0.0},
        {"threshold": [0.1, 0.2], "measure": [0, 1, 2]},
    ],
)
def test_bad_grid_points_raise(kwargs):
    with pytest.raises(ValueError, match="grid point"):
        rp.GridPoints.create(**kwargs)


def test_jackknife_of_a_mean_is_the_standard_error():
    # Given per-prompt sums with one token each, the ratio is a plain mean
    rng = np.random.default_rng(3)
    beta = rng.random(50).astype(np.float32)
    ones = np.ones(50, np.float32)
    sums = TokenSums(tokens=ones, transmitted=ones, accepted=ones, skipped_beta=beta,
                        beta=beta)
    loo = rp.leave_one_out(sums)
    estimates = loo.skipped_beta / loo.tokens
    # Then the jackknife SE equals s / sqrt(n) exactly (up to float32)
    expected = beta.std(ddof=1) / np.sqrt(50)
    np.testing.assert_allclose(rp.jackknife_se(estimates), expected, rtol=1e-4)


def test_count_at_most_equals_searchsorted():
    rng = np.random.default_rng(4)
    thresholds = np.array([-1.0, 0.0, 0.25, 0.3, 1.0, 2.0], np.float32)
    count = jax.jit(jax.vmap(rp.count_at_most, in_axes=(None, None, 0)))
    for n in (1, 2, 7, 64, 1000):
        u = np.sort(rng.integers(0, 5, (2, n)).astype(np.float32) / 4, axis=1)
        for measure in (0, 1):
            expected = np.searchsorted(u[measure], thresholds, side="right")
            got = count(jnp.asarray(u), jnp.int32(measure), jnp.asarray(thresholds))
            np.testing.assert_array_equal(got, expected, err_msg=f"n={n}, measure={measure}")
