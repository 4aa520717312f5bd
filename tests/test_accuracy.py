"""Per-prompt accuracy of responses: sentence similarity, answer correctness, summaries.

Oracles: `sentence_similarity` computed one prompt at a time (one call per row, so no
batching or de-duplication is shared with `score_responses`), `is_correct` per row, and
hand-computed means and standard errors. A tiny random BERT with a word-level tokenizer
stands in for all-MiniLM-L6-v2, except in the one test that checks what the real model
says about right and wrong replies.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import tokenizers

from uhlm_jax.accuracy import mean_estimate, score_responses
from uhlm_jax.answers import AnswerMatch, is_correct
from uhlm_jax.models.bert import BertConfig, init_params
from uhlm_jax.models.sentence_encoder import SentenceEncoder, load_minilm, sentence_similarity

# Batched and de-duplicated against one row at a time: float32 rounding.
PATH_ATOL = 2e-5

WORDS = "the cpu runs programs a processor executes code paris is capital of france yes no"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@pytest.fixture(scope="module")
def tiny_encoder() -> SentenceEncoder:
    vocab = {word: i for i, word in enumerate((*SPECIALS, *WORDS.split()))}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    tokenizer.enable_truncation(max_length=16)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_layers=2, num_heads=4,
                        intermediate_size=24, max_positions=32, type_vocab_size=2,
                        layer_norm_eps=1e-12)
    params = init_params(config, jax.random.key(0))
    return SentenceEncoder(params=params, tokenizer=tokenizer, max_tokens=16,
                           pad_id=vocab["[PAD]"])


RESPONSES = ["The CPU runs programs.", "A processor executes code", "Paris", "",
             "Yes, it is.", "The CPU runs programs."]
REFERENCES = ["A processor executes code.", "A processor executes code.", "", "Paris",
              "   ", "The CPU runs programs."]
ANSWERS = ["", "processor", "Paris", "Paris", "yes", ""]


def test_similarity_equals_one_row_at_a_time_and_skips_empty_references(tiny_encoder):
    # Given responses, some sharing a reference, two prompts without a reference
    scores = score_responses(tiny_encoder, RESPONSES, REFERENCES, ANSWERS)
    # Then each scored prompt's similarity is the one-row sentence_similarity
    for i, (response, reference) in enumerate(zip(RESPONSES, REFERENCES, strict=True)):
        if reference.strip():
            alone = sentence_similarity(tiny_encoder, [response], [reference])[0]
            assert scores.similarity[i] == pytest.approx(alone, abs=PATH_ATOL)
        else:
            # And a prompt without a reference is not scored against ""
            assert math.isnan(scores.similarity[i])
    # A response equal to its reference has similarity 1
    assert scores.similarity[5] == pytest.approx(1.0, abs=PATH_ATOL)
    assert scores.similarity.dtype == np.float32


def test_correctness_is_is_correct_where_there_is_an_answer(tiny_encoder):
    for match in AnswerMatch:
        scores = score_responses(tiny_encoder, RESPONSES, REFERENCES, ANSWERS, match)
        for i, (response, answer) in enumerate(zip(RESPONSES, ANSWERS, strict=True)):
            if answer:
                assert scores.correct[i] == float(is_correct(response, answer, match))
            else:
                assert math.isnan(scores.correct[i])
    contains = score_responses(tiny_encoder, RESPONSES, REFERENCES, ANSWERS).correct
    # Hand-checked: "processor" is in reply 1, "Paris" is reply 2, reply 3 is empty, 4 says yes
    np.testing.assert_array_equal(contains[1:5], [1.0, 1.0, 0.0, 1.0])


def test_bad_input_names_the_problem(tiny_encoder):
    with pytest.raises(ValueError, match="2 responses, 1 references and 2 answers"):
        score_responses(tiny_encoder, ["a", "b"], ["a"], ["", ""])
    with pytest.raises(ValueError, match=r"Prompt 1: Reference answer '\?!'"):
        score_responses(tiny_encoder, ["a", "b"], ["a", "b"], ["", "?!"])


def test_without_references_only_answers_are_scored(tiny_encoder):
    scores = score_responses(tiny_encoder, ["Paris", "no"], ["", ""], ["Paris", "yes"])
    assert np.isnan(scores.similarity).all()
    np.testing.assert_array_equal(scores.correct, [1.0, 0.0])
    empty = score_responses(tiny_encoder, [], [], [])
    assert empty.similarity.shape == empty.correct.shape == (0,)


def test_mean_estimate_by_hand():
    # mean of (1, 2, 4) = 7/3; sample variance = ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
    estimate = mean_estimate([1.0, math.nan, 2.0, 4.0])
    assert estimate.count == 3
    assert estimate.mean == pytest.approx(7 / 3)
    assert estimate.standard_error == pytest.approx(math.sqrt(7 / 3 / 3))
    one = mean_estimate([0.5, math.nan])
    assert (one.mean, one.count) == (0.5, 1) and math.isnan(one.standard_error)
    none = mean_estimate([math.nan])
    assert none.count == 0 and math.isnan(none.mean) and math.isnan(none.standard_error)


@pytest.mark.slow
def test_minilm_similarity_and_correctness_of_a_right_and_a_wrong_reply():
    # Given a question's reference and two replies, one right and one wrong
    reference = "CPU stands for central processing unit."
    replies = ["CPU is short for central processing unit.", "CPU stands for processing unit."]
    scores = score_responses(load_minilm(), replies, [reference] * 2,
                             ["central processing unit"] * 2)
    # Then the right one is correct and the wrong one is not, while both read as close
    # to the reference: similarity alone does not tell them apart
    np.testing.assert_array_equal(scores.correct, [1.0, 0.0])
    assert np.all(scores.similarity > 0.8) and np.all(scores.similarity <= 1 + PATH_ATOL)
