"""The batched rollout: exactness, limits, reference loop, batch independence, compiles.

All on the `toy` pair (tiny random models over a 260-id byte vocabulary).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from uhlm_jax import speculative
from uhlm_jax.models.cache import init_cache
from uhlm_jax.models.llama import Padding, decode, forward, init_params, prefill
from uhlm_jax.modes import Mode
from uhlm_jax.pair import ModelPair, load_pair
from uhlm_jax.rollout import (
    Records,
    RolloutConfig,
    RolloutParams,
    encode_prompts,
    hybrid_position,
    rollout,
    run_rollout,
    step_keys,
)
from uhlm_jax.truncation import FixedK, ToleranceK
from uhlm_jax.uncertainty import Entropy, TemperaturePerturbation

# Size of each goodness-of-fit test: the chance a correct implementation fails it.
TEST_SIZE = 1e-3
# Float tolerance for records recomputed along another code path (same maths, other order).
RECORD_ATOL = 1e-5
PROMPTS = ("hello", "the quick brown fox", "a", "jax is fast", "xyz", "1 2 3", "ok", "end")


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    return load_pair("toy")


def _first_step_distributions(pair, prompt, draft_temperature=1.0, llm_temperature=1.0, top_k=None):
    """Closed-form q and p of the first new token, from `forward` (no cache)."""
    ids = encode_prompts(pair, [prompt])[0]
    tokens = jnp.asarray([ids], jnp.int32)
    lengths = jnp.asarray([len(ids)], jnp.int32)
    z_slm = forward(pair.slm, tokens, lengths)[0, -1]
    z_llm = forward(pair.llm, tokens, lengths)[0, -1]
    log_q = speculative.draft_log_probs(z_slm, jnp.float32(draft_temperature), top_k)
    log_p = jax.nn.log_softmax(z_llm / llm_temperature)
    return np.exp(np.asarray(log_q, np.float64)), np.exp(np.asarray(log_p, np.float64))


def _first_tokens(pair, prompt, mode, num_samples, params, top_k=None):
    """First emitted token of `num_samples` rows of one prompt, each with its own key."""
    config = RolloutConfig(mode=mode, max_new_tokens=1, top_k=top_k)
    ids = encode_prompts(pair, [prompt])[0]
    tokens = jnp.tile(jnp.asarray([ids], jnp.int32), (num_samples, 1))
    lengths = jnp.full((num_samples,), len(ids), jnp.int32)
    run = jax.jit(rollout, static_argnames=("config", "cache_length"))
    records = run(
        pair.slm,
        pair.llm,
        tokens,
        lengths,
        jnp.arange(num_samples),
        lengths * 0 + 1,
        jax.random.key(7),
        params,
        config=config,
        cache_length=len(ids) + 1,
    )
    return np.asarray(records.token[0])


def _chi_square_pvalue(samples, probs, min_expected=5.0):
    """Goodness of fit of `samples` to `probs`, merging cells with few expected counts."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    big = expected >= min_expected
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    # Mass outside the expected support must never be hit.
    assert counts[probs == 0].sum() == 0
    return stats.chisquare(
        observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()
    ).pvalue


NUM_SAMPLES = 4000


@pytest.mark.parametrize(
    ("mode", "draft_temperature", "top_k", "target"),
    [
        (Mode.HLM, 1.0, None, "p"),
        (Mode.HLM, 0.7, None, "p"),
        (Mode.HLM, 1.3, 5, "p"),
        (Mode.LLM_ONLY, 1.0, None, "p"),
        (Mode.SLM_ONLY, 0.7, None, "q"),
    ],
)
def test_emitted_distribution_is_exact(pair, mode, draft_temperature, top_k, target):
    # Given: one prompt, many rows with independent keys, one new token each.
    prompt = "the quick brown fox"
    q, p = _first_step_distributions(pair, prompt, draft_temperature, 1.0, top_k)
    params = RolloutParams.create(draft_temperature=draft_temperature)
    # When: the pair generates the first token.
    tokens = _first_tokens(pair, prompt, mode, NUM_SAMPLES, params, top_k)
    # Then: HLM and LLM-only emit p exactly; SLM-only emits q.
    expected = p if target == "p" else q
    assert _chi_square_pvalue(tokens, expected) > TEST_SIZE


def test_goodness_of_fit_has_power(pair):
    # A sample from q is rejected as a sample from p (q and p differ on the toy pair).
    prompt = "the quick brown fox"
    q, p = _first_step_distributions(pair, prompt)
    tokens = _first_tokens(pair, prompt, Mode.SLM_ONLY, NUM_SAMPLES, RolloutParams.create())
    assert _chi_square_pvalue(tokens, p) < TEST_SIZE


def _run(pair, mode, max_new_tokens=12, seed=0, prompts=PROMPTS, **params):
    config = RolloutConfig(mode=mode, max_new_tokens=max_new_tokens)
    return run_rollout(pair, list(prompts), config, RolloutParams.create(**params), seed=seed)


def test_threshold_limits(pair):
    slm_only = _run(pair, Mode.SLM_ONLY).records
    hlm = _run(pair, Mode.HLM).records
    limits = _run(pair, Mode.UHLM, threshold=np.array([1.0, -0.5], np.float32)).records
    skip_all = Records(*(x[0] for x in limits))
    send_all = Records(*(x[1] for x in limits))
    # Uncertainty never exceeds 1, so threshold 1 skips everything, like SLM-only.
    assert not skip_all.transmitted.any()
    np.testing.assert_array_equal(skip_all.token, slm_only.token)
    # Below 0 every token is transmitted, like HLM, with the same keys hence same tokens.
    np.testing.assert_array_equal(send_all.transmitted, hlm.valid)
    np.testing.assert_array_equal(send_all.token, hlm.token)
    assert hlm.transmitted[hlm.valid].all() and not slm_only.transmitted.any()


def _reference_loop(pair, prompts, config, params, seed):
    """A plain Python loop over rows and steps with the same keys (per-step pieces jitted)."""
    position_fn = jax.jit(hybrid_position, static_argnames="config")
    decode_fn = jax.jit(decode)
    out = []
    for row, ids in enumerate(encode_prompts(pair, prompts)):
        tokens = jnp.asarray([ids], jnp.int32)
        lengths = jnp.asarray([len(ids)], jnp.int32)
        size = len(ids) + config.max_new_tokens
        z_s, c_s = prefill(
            pair.slm, tokens, lengths, init_cache(pair.slm.config, 1, size), Padding.RIGHT
        )
        z_l, c_l = prefill(
            pair.llm, tokens, lengths, init_cache(pair.llm.config, 1, size), Padding.RIGHT
        )
        keys = step_keys(jax.random.key(seed), jnp.asarray([row]), config.max_new_tokens)
        emitted = []
        for step in range(config.max_new_tokens):
            position = position_fn(keys[step, 0], z_s[0], z_l[0], params, config=config)
            token = int(position.token)
            emitted.append((token, float(position.beta), bool(position.transmitted)))
            if token in config.stop_tokens:
                break
            z_s, c_s = decode_fn(pair.slm, jnp.asarray([token]), c_s)
            z_l, c_l = decode_fn(pair.llm, jnp.asarray([token]), c_l)
        out.append(emitted)
    return out


def test_scan_equals_python_loop_reference(pair):
    prompts = list(PROMPTS[:3])
    tok = pair.tokenizer
    config = RolloutConfig(
        measures=(TemperaturePerturbation(), Entropy()),
        mode=Mode.UHLM,
        max_new_tokens=10,
        stop_tokens=tok.stop_ids,
        pad_token=tok.pad_id,
        num_token_ids=tok.vocab_size,
    )
    params = RolloutParams.create(threshold=0.2)
    records = run_rollout(pair, prompts, config, params, seed=3).records
    reference = _reference_loop(pair, prompts, config, params, seed=3)
    for row, emitted in enumerate(reference):
        n = len(emitted)
        assert records.valid[:n, row].all() and not records.valid[n:, row].any()
        np.testing.assert_array_equal(records.token[:n, row], [e[0] for e in emitted])
        np.testing.assert_allclose(records.beta[:n, row], [e[1] for e in emitted], atol=RECORD_ATOL)
        np.testing.assert_array_equal(records.transmitted[:n, row], [e[2] for e in emitted])


def test_jit_equals_eager(pair):
    # One position of the step, on the toy pair's first-token logits.
    ids = encode_prompts(pair, ["hello"])[0]
    tokens, lengths = jnp.asarray([ids]), jnp.asarray([len(ids)])
    z_slm = forward(pair.slm, tokens, lengths)[0, -1]
    z_llm = forward(pair.llm, tokens, lengths)[0, -1]
    config = RolloutConfig(mode=Mode.UHLM)
    params = RolloutParams.create(threshold=0.1)
    for seed in range(3):
        key = jax.random.key(seed)
        jitted = jax.jit(hybrid_position, static_argnames="config")(
            key, z_slm, z_llm, params, config=config
        )
        with jax.disable_jit():
            eager = hybrid_position(key, z_slm, z_llm, params, config)
        for name in ("token", "draft", "transmitted", "accepted", "uplink_k"):
            np.testing.assert_array_equal(getattr(jitted, name), getattr(eager, name))
        np.testing.assert_allclose(jitted.beta, eager.beta, atol=RECORD_ATOL)
        np.testing.assert_allclose(jitted.uncertainty, eager.uncertainty, atol=RECORD_ATOL)


def test_row_does_not_depend_on_its_batch(pair):
    # Given: prompt 3 alone, and in a batch of 8 different prompts, with the same prompt id.
    batch = _run(pair, Mode.UHLM, threshold=0.3).records
    alone = run_rollout(
        pair,
        [PROMPTS[3]],
        RolloutConfig(mode=Mode.UHLM, max_new_tokens=12),
        RolloutParams.create(threshold=0.3),
        prompt_ids=[3],
    ).records
    # Then: its tokens and flags are identical, its floats equal to rounding.
    for name in ("token", "draft", "transmitted", "accepted", "valid"):
        np.testing.assert_array_equal(getattr(alone, name)[:, 0], getattr(batch, name)[:, 3])
    np.testing.assert_allclose(alone.beta[:, 0], batch.beta[:, 3], atol=RECORD_ATOL)
    np.testing.assert_allclose(alone.uncertainty[:, 0], batch.uncertainty[:, 3], atol=RECORD_ATOL)


def test_threshold_sweep_is_a_vmap_of_single_runs(pair):
    thresholds = np.array([-1.0, 0.2, 0.5, 1.0], np.float32)
    config = RolloutConfig(mode=Mode.UHLM, max_new_tokens=8)
    sweep = run_rollout(
        pair, list(PROMPTS[:4]), config, RolloutParams.create(threshold=thresholds)
    ).records
    assert sweep.token.shape == (4, 8, 4)
    for i, threshold in enumerate(thresholds):
        single = run_rollout(
            pair, list(PROMPTS[:4]), config, RolloutParams.create(threshold=float(threshold))
        ).records
        np.testing.assert_array_equal(sweep.token[i], single.token)
        np.testing.assert_array_equal(sweep.transmitted[i], single.transmitted)
    # More skipping as the threshold grows.
    rates = [sweep.transmitted[i][sweep.valid[i]].mean() for i in range(4)]
    assert rates == sorted(rates, reverse=True) and rates[0] == 1.0 and rates[-1] == 0.0


def test_changing_swept_values_does_not_recompile(pair):
    ids = encode_prompts(pair, ["hello", "world"])
    width = max(map(len, ids))
    tokens = jnp.asarray([i + [0] * (width - len(i)) for i in ids])
    lengths = jnp.asarray([len(i) for i in ids])
    config = RolloutConfig(mode=Mode.RAND_HLM, max_new_tokens=4)
    traced = jax.jit(
        chex.assert_max_traces(rollout, n=1), static_argnames=("config", "cache_length")
    )
    for threshold, probability, temperature in [(0.1, 0.2, 1.0), (0.5, 0.9, 0.5), (0.9, 0.0, 2.0)]:
        params = RolloutParams.create(
            threshold=threshold,
            transmit_probability=probability,
            draft_temperature=temperature,
            llm_temperature=temperature,
        )
        traced(
            pair.slm,
            pair.llm,
            tokens,
            lengths,
            jnp.arange(2),
            jnp.asarray([4, 4]),
            jax.random.key(0),
            params,
            config=config,
            cache_length=width + 4,
        )


def test_fewer_records_give_the_same_values_and_compile_once(pair):
    # Given the gate measure alone, without tv or the LLM's log-probability,
    ids = encode_prompts(pair, ["hello", "world"])
    width = max(map(len, ids))
    tokens = jnp.asarray([i + [0] * (width - len(i)) for i in ids])
    lengths = jnp.asarray([len(i) for i in ids])
    lean = RolloutConfig(
        mode=Mode.UHLM,
        max_new_tokens=6,
        measures=(TemperaturePerturbation(),),
        record_tv=False,
        record_llm_log_prob=False,
    )
    full = dataclasses.replace(
        lean, measures=(Entropy(), TemperaturePerturbation()), gate_measure=1
    )
    traced = jax.jit(
        chex.assert_max_traces(rollout, n=2), static_argnames=("config", "cache_length")
    )

    def records(config, threshold):
        return traced(
            pair.slm,
            pair.llm,
            tokens,
            lengths,
            jnp.arange(2),
            jnp.asarray([6, 6]),
            jax.random.key(0),
            RolloutParams.create(threshold=threshold),
            config=config,
            cache_length=width + 6,
        )

    # when thresholds change (two configs: two traces, none per threshold),
    for threshold in (0.1, 0.4, 0.8):
        few, many = records(lean, threshold), records(full, threshold)
        # then the gate measure, decisions and tokens match the run recording more,
        np.testing.assert_array_equal(few.uncertainty[..., 0], many.uncertainty[..., 1])
        for name in ("token", "draft", "transmitted", "accepted", "beta"):
            np.testing.assert_array_equal(getattr(few, name), getattr(many, name))
        # and what was not asked for is not computed.
        assert np.isnan(few.tv).all() and np.isnan(few.llm_log_prob).all()


def test_records_shapes_and_masks(pair):
    records = _run(pair, Mode.HLM, max_new_tokens=40).records
    assert isinstance(records, Records)
    n, b = records.token.shape
    assert (n, b) == (40, len(PROMPTS))
    assert records.uncertainty.shape == (n, b, 5)
    u = records.uncertainty[records.valid]
    assert (u >= 0).all() and (u <= 1).all()
    beta = records.beta[records.valid]
    assert (beta >= 0).all() and (beta <= 1).all()
    # A row is valid up to and including its stop token, never after.
    for row in range(b):
        valid = records.valid[:, row]
        last = np.flatnonzero(valid)[-1]
        assert valid[: last + 1].all()
        if last + 1 < n:
            assert records.token[last, row] in load_pair("toy").tokenizer.stop_ids
    # Resampled and accepted partition the transmitted tokens.
    np.testing.assert_array_equal(records.accepted | records.resampled, records.transmitted)
    assert not (records.accepted & records.resampled).any()


@pytest.mark.parametrize("mode", [Mode.SLM_ONLY, Mode.LLM_ONLY, Mode.UHLM])
def test_llm_log_prob_equals_teacher_forced_forward(pair, mode):
    # Given a rollout with an LLM temperature other than 1
    out = _run(pair, mode, max_new_tokens=10, threshold=0.5, llm_temperature=0.7)
    records = out.records
    encoded = encode_prompts(pair, list(PROMPTS))
    for row, prompt_ids in enumerate(encoded):
        # When the prompt and the emitted tokens are scored by the cacheless forward pass
        emitted = records.token[records.valid[:, row], row]
        ids = np.concatenate([prompt_ids, emitted]).astype(np.int32)
        logits = forward(pair.llm, jnp.asarray(ids[None]), jnp.asarray([len(ids)]))[0]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        start = len(prompt_ids)
        expected = log_probs[np.arange(start - 1, len(ids) - 1), ids[start:]]
        # Then the recorded log-probabilities are the temperature-1 ones of those tokens
        np.testing.assert_allclose(
            records.llm_log_prob[records.valid[:, row], row], expected, atol=RECORD_ATOL
        )


def test_bad_inputs_have_clear_errors(pair):
    with pytest.raises(ValueError, match="transmit_probability must be in"):
        RolloutParams.create(transmit_probability=1.5)
    with pytest.raises(ValueError, match="draft_temperature must be > 0"):
        RolloutParams.create(draft_temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        RolloutConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="needs .* cache slots but the cache holds 20"):
        run_rollout(
            pair,
            ["hello"],
            RolloutConfig(max_new_tokens=16),
            RolloutParams.create(),
            max_cache_length=20,
        )
    larger = dataclasses.replace(pair.llm.config, vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary has 260 ids and the LLM's 300"):
        ModelPair("bad", pair.slm, init_params(larger, jax.random.key(0)), pair.tokenizer)


def test_nan_logits_are_flagged_and_checked_mode_raises(pair):
    broken = jax.tree.map(lambda w: w * jnp.nan, pair.llm)
    bad = ModelPair("nan", pair.slm, broken, pair.tokenizer)
    config = RolloutConfig(mode=Mode.HLM, max_new_tokens=3)
    records = run_rollout(
        bad, ["hello"], config, RolloutParams.create(), check_finite=False
    ).records
    assert not records.finite[records.valid].any()
    with pytest.raises(ValueError, match="Non-finite"):
        run_rollout(
            bad, ["hello"], RolloutConfig(mode=Mode.HLM, max_new_tokens=3), RolloutParams.create()
        )


def test_truncated_uplink_option(pair):
    # k = V reproduces the untruncated rollout exactly; a small k is recorded as the payload.
    config = RolloutConfig(mode=Mode.HLM, max_new_tokens=12)
    prompts = list(PROMPTS[:4])
    full = run_rollout(pair, prompts, config, RolloutParams.create()).records
    vocab = pair.slm.config.vocab_size
    same = run_rollout(
        pair, prompts, config, RolloutParams.create(truncation=FixedK(vocab))
    ).records
    np.testing.assert_array_equal(same.token, full.token)
    np.testing.assert_array_equal(same.accepted, full.accepted)
    assert (full.uplink_k == vocab).all()
    small = run_rollout(
        pair, prompts, config, RolloutParams.create(truncation=ToleranceK(0.05))
    ).records
    k = small.uplink_k[small.valid]
    assert (k >= 1).all() and (k < vocab).all()
