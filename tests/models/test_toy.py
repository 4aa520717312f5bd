"""Tests of the toy SLM/LLM pair: vocabulary, determinism, and that it behaves like a
real draft/target pair (peaked distributions that partly agree)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models import forward
from uhlm_jax.models.toy import (
    TOY_BOS_ID,
    TOY_EOS_ID,
    TOY_PAD_ID,
    TOY_RESERVED_ID,
    TOY_SLM_LAYERS,
    TOY_VOCAB_SIZE,
    toy_pair,
)

CONTEXTS = 48
CONTEXT_LENGTH = 16
# Standard errors of the means below are ~0.01; the bounds are far from the measured
# values (acceptance ~0.6, entropy ~2.7 nats).
ACCEPTANCE_RANGE = (0.3, 0.9)
MAX_MEAN_ENTROPY = 0.75 * math.log(TOY_VOCAB_SIZE)


@pytest.fixture(scope="module")
def pair():
    return toy_pair()


@pytest.fixture(scope="module")
def distributions(pair):
    """Log-probabilities of both models at every position of random byte contexts."""
    slm, llm = pair
    tokens = jax.random.randint(jax.random.key(11), (CONTEXTS, CONTEXT_LENGTH), 0, 256)
    tokens = tokens.at[:, 0].set(TOY_BOS_ID)
    lengths = jnp.full((CONTEXTS,), CONTEXT_LENGTH)
    score = jax.jit(forward)
    log_q = jax.nn.log_softmax(score(slm, tokens, lengths), axis=-1)
    log_p = jax.nn.log_softmax(score(llm, tokens, lengths), axis=-1)
    return np.asarray(log_q).reshape(-1, TOY_VOCAB_SIZE), np.asarray(log_p).reshape(
        -1, TOY_VOCAB_SIZE
    )


def test_vocabulary_is_bytes_plus_four_specials(pair):
    slm, llm = pair
    assert TOY_VOCAB_SIZE == 260
    assert (TOY_BOS_ID, TOY_EOS_ID, TOY_PAD_ID, TOY_RESERVED_ID) == (256, 257, 258, 259)
    assert slm.config.vocab_size == llm.config.vocab_size == TOY_VOCAB_SIZE


def test_pair_is_deterministic_and_the_slm_is_an_early_exit_of_the_llm(pair):
    slm, llm = pair
    again_slm, again_llm = toy_pair()
    chex.assert_trees_all_equal(slm.weights, again_slm.weights)
    chex.assert_trees_all_equal(llm.weights, again_llm.weights)
    assert slm.config.num_layers == TOY_SLM_LAYERS < llm.config.num_layers
    for name in ("embed_tokens", "norm", "lm_head", "layers_0", "layers_1"):
        chex.assert_trees_all_equal(slm.weights[name], llm.weights[name])


def test_llm_distributions_are_peaked(distributions):
    _, log_p = distributions
    entropy = -(np.exp(log_p) * log_p).sum(-1)
    assert entropy.mean() < MAX_MEAN_ENTROPY


def test_expected_acceptance_is_partial_and_varies_with_context(distributions):
    log_q, log_p = distributions
    tv = 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(-1)
    acceptance = 1.0 - tv
    low, high = ACCEPTANCE_RANGE
    assert low < acceptance.mean() < high
    # Some contexts are easy, others hard: the spread is what uncertainty must predict.
    assert np.quantile(acceptance, 0.9) - np.quantile(acceptance, 0.1) > 0.2


def test_bfloat16_pair_runs(pair):
    slm16, _ = toy_pair(jnp.bfloat16)
    assert slm16.dtype == jnp.bfloat16
    tokens = jnp.asarray([[TOY_BOS_ID, 72, 105]])
    logits = forward(slm16, tokens, jnp.asarray([3]))
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
