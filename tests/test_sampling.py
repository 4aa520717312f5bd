"""Tests for uhlm_jax.sampling: the unused-id mask, the sampler's law, padding, replies.

The sampler's law is checked with Pearson's chi-square test at size ALPHA on NUM_DRAWS
draws, against the exact distribution and (two-sample) against the Gumbel-max reference
`sample_token_gumbel` below; with at least MIN_EXPECTED_COUNT expected draws per cell the
chi-square approximation holds (Cochran's rule). Seeds are fixed, so each test either
always passes or always fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from uhlm_jax.models.llama import forward
from uhlm_jax.models.registry import load_model
from uhlm_jax.sampling import (
    ReplyConfig,
    _first_above,
    generate_replies,
    mask_unused_ids,
    pad_rows,
    padded_length,
    sample_token,
)

ALPHA = 1e-3
NUM_DRAWS = 20_000
MIN_EXPECTED_COUNT = 5.0
# Steps and prompts of the reply comparison on the toy model.
REPLY_STEPS = 6
REPLY_PROMPTS = ("hello", "a much longer prompt", "xy")


def sample_token_gumbel(key, logits, temperature=1.0, top_k=0, num_ids=None):
    """`sample_token`'s law by the Gumbel-max trick, `argmax(z / τ + G)`: its reference.

    Ids `>= num_ids` and those below the `top_k`-th largest logit are dropped; `τ = 0` is
    the argmax.
    """
    z = jnp.asarray(logits, jnp.float32)
    ids = jnp.arange(z.shape[-1])
    if num_ids is not None:
        z = jnp.where(ids < num_ids, z, -jnp.inf)
    if top_k > 0:
        z = jnp.where(z >= jnp.sort(z, axis=-1)[..., -top_k, None], z, -jnp.inf)
    tau = jnp.asarray(temperature, jnp.float32)
    drawn = jax.random.categorical(key, z / jnp.where(tau > 0, tau, 1.0), axis=-1)
    return jnp.where(tau > 0, drawn, jnp.argmax(z, axis=-1)).astype(jnp.int32)


SAMPLERS = (sample_token, sample_token_gumbel)


def _draws(
    logits, temperature=1.0, top_k=0, num_ids=None, seed=0, sampler=sample_token
) -> np.ndarray:
    keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
    sample = jax.vmap(sampler, in_axes=(0, None, None, None, None))
    fn = jax.jit(sample, static_argnums=(3, 4))
    return np.asarray(fn(keys, jnp.asarray(logits), jnp.float32(temperature), top_k, num_ids))


def _assert_distributed_as(draws: np.ndarray, probs: np.ndarray) -> None:
    counts = np.bincount(draws, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"draws outside the support: {counts}"
    expected = NUM_DRAWS * probs[support] / probs[support].sum()
    assert expected.min() >= MIN_EXPECTED_COUNT, "too few draws for the chi-square test"
    p_value = scipy.stats.chisquare(counts[support], expected).pvalue
    assert p_value > ALPHA, (counts, expected, p_value)


def _assert_same_law(first: np.ndarray, second: np.ndarray) -> None:
    """Two-sample chi-square test (a 2 × cells contingency table) of two sets of draws."""
    cells = max(first.max(), second.max()) + 1
    table = np.stack([np.bincount(first, minlength=cells), np.bincount(second, minlength=cells)])
    table = table[:, table.sum(axis=0) > 0]
    expected = scipy.stats.contingency.expected_freq(table)
    assert expected.min() >= MIN_EXPECTED_COUNT, "too few draws for the chi-square test"
    p_value = scipy.stats.chi2_contingency(table, correction=False).pvalue
    assert p_value > ALPHA, (table, p_value)


def _softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------
# The unused-id mask.


def test_mask_unused_ids_by_hand():
    logits = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 5.0, 9.0]])
    np.testing.assert_array_equal(
        mask_unused_ids(logits, 2), [[1.0, 2.0, -np.inf, -np.inf], [0.0, -1.0, -np.inf, -np.inf]]
    )
    # No unused ids: the logits come back untouched.
    assert mask_unused_ids(logits, 4) is logits
    assert mask_unused_ids(logits, None) is logits


def test_masked_ids_are_never_sampled():
    # Given unused ids whose logits are by far the largest,
    logits = jnp.array([0.0, 0.5, -0.5, 30.0, 40.0])
    # when sampling with only the first three ids in the vocabulary, at several temperatures
    # and with top-k larger than the vocabulary's ids,
    for temperature, top_k in ((1.0, 0), (5.0, 0), (1.0, 4), (0.0, 0)):
        draws = _draws(logits, temperature, top_k, num_ids=3)
        # then no draw is an unused id.
        assert draws.max() < 3, (temperature, top_k, np.bincount(draws))


# ---------------------------------------------------------------------------------------
# The sampler's law.


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_matches_the_tempered_softmax(sampler):
    logits = np.array([1.0, 0.0, -1.0, 0.5, 2.0, -0.3, 0.2, 1.4])
    temperature = 0.8
    draws = _draws(logits, temperature, seed=1, sampler=sampler)
    _assert_distributed_as(draws, _softmax(logits / temperature))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_with_top_k_matches_the_renormalised_top_k(sampler):
    logits = np.array([1.0, 0.0, -1.0, 0.5, 2.0, -0.3, 0.2, 1.4])
    top = np.argsort(logits)[-3:]  # ids 4, 7, 0
    probs = np.zeros(len(logits))
    probs[top] = _softmax(logits[top] / 1.5)
    _assert_distributed_as(_draws(logits, 1.5, top_k=3, seed=2, sampler=sampler), probs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_of_log_probs_draws_from_them(sampler):
    # The hybrid rollout samples its draft from log q at the default settings.
    log_q = jax.nn.log_softmax(jnp.array([0.3, -2.0, 1.1, 0.0, -jnp.inf]))
    draws = _draws(log_q, seed=3, sampler=sampler)
    _assert_distributed_as(draws, np.exp(np.asarray(log_q, np.float64)))


def _many_blocks_logits() -> np.ndarray:
    """1000 ids (blocks of 31 in the inverse CDF) with adversarial mass: whole blocks of
    zero probability, ties, a spike, mass in the last, partial block, and a masked tail."""
    logits = np.full(1000, -np.inf)
    logits[40:47] = 0.0  # seven ties inside one block
    logits[61:64] = 0.0  # ties across a block boundary (61 | 62)
    logits[500] = 2.5  # a spike after empty blocks
    logits[993] = -1.0  # the last, partial block (992 on)
    logits[997:] = 9.0  # masked by num_ids = 997
    return logits


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_over_many_blocks_matches_the_softmax(sampler):
    logits = _many_blocks_logits()
    probs = _softmax(np.where(np.arange(1000) < 997, logits, -np.inf))
    draws = _draws(logits, num_ids=997, seed=6, sampler=sampler)
    _assert_distributed_as(draws, probs)


@pytest.mark.parametrize(
    "logits,temperature,top_k,num_ids",
    [
        (np.array([1.0, 0.0, -1.0, 0.5, 2.0, -0.3, 0.2, 1.4]), 0.8, 0, None),
        (np.array([1.0, 0.0, -1.0, 0.5, 2.0, -0.3, 0.2, 1.4]), 1.5, 3, None),
        (_many_blocks_logits(), 1.3, 0, 997),
    ],
)
def test_inverse_cdf_matches_the_gumbel_reference(logits, temperature, top_k, num_ids):
    # Given the same settings and independent keys, when both samplers draw,
    inverse_cdf = _draws(logits, temperature, top_k, num_ids, seed=7)
    gumbel = _draws(logits, temperature, top_k, num_ids, seed=8, sampler=sample_token_gumbel)
    # then their draws are samples of one law.
    _assert_same_law(inverse_cdf, gumbel)


def test_same_law_test_has_power():
    # Draws at two temperatures are told apart.
    logits = np.array([1.0, 0.0, -1.0, 0.5, 2.0, -0.3, 0.2, 1.4])
    with pytest.raises(AssertionError):
        _assert_same_law(_draws(logits, 1.0, seed=9), _draws(logits, 1.2, seed=10))


def test_first_above_by_hand():
    cumulative = jnp.array([0.0, 0.1, 0.5, 0.5, 0.5])
    assert int(_first_above(cumulative, jnp.float32(0.0))) == 1  # skips zero-mass id 0
    assert int(_first_above(cumulative, jnp.float32(0.3))) == 2
    # A target at the total (rounding) gives the last id with mass, not a zero-mass one.
    assert int(_first_above(cumulative, jnp.float32(0.5))) == 2


def test_temperature_zero_is_the_argmax_per_row():
    logits = jnp.array([[0.1, 3.0, 2.9], [5.0, 1.0, 4.99]])
    tokens = sample_token(jax.random.key(0), logits, 0.0)
    np.testing.assert_array_equal(tokens, [1, 0])
    assert tokens.dtype == jnp.int32


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rows_of_one_call_are_independent_draws(sampler):
    # One key for a batch of equal rows draws each row independently from the law.
    logits = np.array([0.3, -2.0, 1.1, 0.0, 0.7])
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (NUM_DRAWS // 4, 4, 5))
    draws = np.asarray(sampler(jax.random.key(5), rows)).ravel()
    counts = np.bincount(draws, minlength=5)
    p_value = scipy.stats.chisquare(counts, len(draws) * _softmax(logits)).pvalue
    assert p_value > ALPHA, counts
    assert draws.shape == (NUM_DRAWS,)


# ---------------------------------------------------------------------------------------
# Padding.


def test_pad_rows_by_hand():
    tokens = pad_rows([[1, 2], [3], [4, 5, 6]], 4, value=9, dtype=np.int32)
    np.testing.assert_array_equal(tokens, [[1, 2, 9, 9], [3, 9, 9, 9], [4, 5, 6, 9]])
    assert tokens.dtype == np.int32


def test_pad_rows_keeps_trailing_axes_and_dtype():
    rows = [np.ones((2, 3), np.float16), np.full((1, 3), 2.0, np.float16)]
    out = pad_rows(rows, 3)
    assert out.shape == (2, 3, 3) and out.dtype == np.float16
    np.testing.assert_array_equal(out[0], [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(out[1], [[2, 2, 2], [0, 0, 0], [0, 0, 0]])


def test_pad_rows_refuses_rows_that_do_not_fit():
    with pytest.raises(ValueError, match="more than length 2"):
        pad_rows([[1, 2, 3]], 2)
    with pytest.raises(ValueError, match="no rows"):
        pad_rows([], 4)


@pytest.mark.parametrize(
    "length,multiple,expected", [(0, 16, 0), (1, 16, 16), (16, 16, 16), (17, 16, 32), (5, 1, 5)]
)
def test_padded_length_by_hand(length, multiple, expected):
    assert padded_length(length, multiple) == expected


# ---------------------------------------------------------------------------------------
# Replies on the toy model.


def _reference_replies(model, prompts, key, temperature, config, steps):
    """Step by step without a cache: rerun the whole sequences, sample, append."""
    rows = [list(p) for p in prompts]
    done = np.zeros(len(rows), bool)
    lengths = np.zeros(len(rows), int)
    tokens = []
    width = max(map(len, rows)) + steps  # one width, so `forward` compiles once
    score = jax.jit(forward)
    for step_key in jax.random.split(key, steps):
        padded = pad_rows(rows, width, model.tokenizer.pad_id, np.int32)
        counts = np.array([len(r) for r in rows])
        logits = score(model.params, jnp.asarray(padded), jnp.asarray(counts))
        last = logits[jnp.arange(len(rows)), counts - 1]
        token = np.asarray(sample_token(step_key, last, temperature, config.top_k, config.num_ids))
        lengths += ~done
        done |= np.isin(token, config.stop_ids)
        tokens.append(token)
        for row, t in zip(rows, token, strict=True):
            row.append(int(t))
    return np.stack(tokens, axis=1), lengths


def test_generate_replies_equals_a_step_by_step_loop():
    # Given the toy model, three prompts of different lengths, and sampling at temperature 1
    model = load_model("toy-llm")
    tokenizer = model.tokenizer
    prompts = [tokenizer.encode(p) for p in REPLY_PROMPTS]
    tokens = pad_rows(prompts, padded_length(max(map(len, prompts)), 8), tokenizer.pad_id)
    lengths = np.array([len(p) for p in prompts], np.int32)
    key, temperature = jax.random.key(7), jnp.float32(1.0)
    run = jax.jit(generate_replies, static_argnames=("config", "max_new_tokens"))
    free = ReplyConfig(num_ids=tokenizer.vocab_size)
    first = run(model.params, tokens, lengths, key, temperature, free, REPLY_STEPS)
    # and a stop id that row 0 emits at step 2 (so at least one reply ends early),
    stop = int(first.tokens[0, 2])
    config = ReplyConfig(top_k=50, num_ids=tokenizer.vocab_size, stop_ids=(stop,))
    # when the scan and a cache-free Python loop sample with the same keys,
    replies = run(model.params, tokens, lengths, key, temperature, config, REPLY_STEPS)
    expected_tokens, expected_lengths = _reference_replies(
        model, prompts, key, temperature, config, REPLY_STEPS
    )
    # then they give the same replies and lengths.
    np.testing.assert_array_equal(replies.lengths, expected_lengths)
    assert int(replies.lengths[0]) <= 3
    for row, n in enumerate(expected_lengths):
        np.testing.assert_array_equal(replies.tokens[row, :n], expected_tokens[row, :n])


def test_reply_settings_are_validated():
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        ReplyConfig(top_k=-1)
    with pytest.raises(ValueError, match="num_ids must be None or >= 1"):
        ReplyConfig(num_ids=0)
