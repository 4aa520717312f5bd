"""Tests of answer correctness on hand-written cases.

Oracles: hand-judged replies (numbers, yes/no, casing, punctuation, unicode, partial
words, empty replies), the shipped prompts' written references (each gives its own short
answer), and the standard error of a Bernoulli rate computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.prompts import embedded_prompts_path, read_prompts
from uhlm_jax.answers import (
    AnswerMatch,
    answer_tokens,
    contains_answer,
    correctness,
    exact_match,
    is_correct,
    yes_no_answer,
)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("The Eiffel Tower!", ("eiffel", "tower")),
        ("  an   apple,\ta pear\n", ("apple", "pear")),
        ("CAFÉ Zürich", ("cafe", "zurich")),
        ("Don’t stop", ("dont", "stop")),
        ("100.0 or 1,000 or 0.50 or .5", ("100", "or", "1000", "or", "0.5", "or", "0.5")),
        ("-3 and 1-2", ("-3", "and", "1", "2")),
        ("one hundred and five", ("105",)),
        ("Twenty-one; nine thousand three hundred and twelve", ("21", "9312")),
        ("a hundred", ("100",)),
        ("one two three", ("1", "2", "3")),
        ("two and three", ("2", "and", "3")),
        ("ｆｕｌｌ ０７", ("full", "7")),
        ("", ()),
        ("?!... --", ()),
    ],
)
def test_answer_tokens(text, tokens):
    assert answer_tokens(text) == tokens


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        # Casing, punctuation, articles, whitespace, unicode.
        ("The capital of Australia is Canberra.", "Canberra", True),
        ("CANBERRA!!!", "canberra.", True),
        ("It is the Eiffel   Tower, in Paris.", "Eiffel Tower", True),
        ("It is the tower Eiffel.", "Eiffel Tower", False),
        ("Le café de Zürich", "cafe de zurich", True),
        ("Jane Austen wrote it.", "Jane Austen", True),
        # Whole words only.
        ("Cats are in the category of mammals.", "cat", False),
        ("The answer is Canberra", "Canberr", False),
        # Numbers as numbers.
        ("Water boils at 100 degrees.", "100", True),
        ("Water boils at 100.0 degrees.", "100", True),
        ("It is 100.", "100.00", True),
        ("Water boils at one hundred degrees.", "100", True),
        ("A spider has eight legs.", "8", True),
        ("About 1,000 people came.", "1000", True),
        ("It costs 100 dollars.", "10", False),
        ("It is 1.05 metres.", "10", False),
        ("It is 1.05 metres.", "1.05", True),
        ("There are 7 continents.", "seven", True),
        ("Pi is about 3.14159.", "3.14", False),
        # Empty replies.
        ("", "Canberra", False),
        ("   ", "100", False),
    ],
)
def test_contains_answer(response, reference, expected):
    assert contains_answer(response, reference) is expected


@pytest.mark.parametrize(
    "response, answer",
    [
        ("Yes, it is.", True),
        ("yes", True),
        ("Yeah, definitely", True),
        ("**Yes** — plants need light.", True),
        ("No.", False),
        ("No, it does not.", False),
        ("Nope", False),
        ("Answer: yes.", True),
        ("The answer is no.", False),
        ("I don't know.", None),
        ("I do not know; it depends.", None),
        ("Yes and no.", None),
        ("Yes. No, wait.", None),
        ("It could be yes or no", None),
        ("There is no way to tell.", None),
        ("Say yes to the dress", None),
        ("Nobody knows", None),
        ("", None),
    ],
)
def test_yes_no_answer(response, answer):
    assert yes_no_answer(response) is answer


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("Yes, because water is wet.", "Yes", True),
        ("Yes, because water is wet.", "no", False),
        ("No. Fish cannot climb trees.", "No.", True),
        ("There is no doubt: yes.", "yes", True),
        ("I don't know.", "no", False),
        ("I don't know.", "yes", False),
        ("Yes and no.", "yes", False),
        ("Yes and no.", "no", False),
        ("", "yes", False),
    ],
)
def test_yes_no_references_need_the_reply_to_answer_the_same(response, reference, expected):
    assert contains_answer(response, reference) is expected


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("Canberra.", "canberra", True),
        ("The Canberra", "Canberra", True),
        ("It is Canberra.", "Canberra", False),
        ("100.0", "one hundred", True),
        ("Yes!", "yes", True),
        ("", "yes", False),
    ],
)
def test_exact_match(response, reference, expected):
    assert exact_match(response, reference) is expected
    assert is_correct(response, reference, AnswerMatch.EXACT) is expected


def test_every_shipped_reference_gives_its_own_short_answer():
    prompts = [p for p in read_prompts(embedded_prompts_path()) if p.answer]
    assert len(prompts) >= 100
    result = correctness([p.reference for p in prompts], [p.answer for p in prompts],
                         AnswerMatch.CONTAINS)
    wrong = [(p.answer, p.reference) for p, ok in zip(prompts, result.correct, strict=True)
             if not ok]
    assert not wrong


@pytest.mark.parametrize("reference", ["", "  ", "The.", "?!"])
def test_a_reference_without_words_is_rejected(reference):
    with pytest.raises(ValueError, match="give each prompt a short reference answer"):
        contains_answer("anything", reference)


def test_correctness_rate_and_its_standard_error_by_hand():
    responses = ["Canberra.", "It is Sydney.", "Yes, sure.", "one hundred"]
    references = ["Canberra", "Canberra", "yes", "100"]
    result = correctness(responses, references, AnswerMatch.CONTAINS)
    np.testing.assert_array_equal(result.correct, [True, False, True, True])
    assert result.rate == 0.75
    # Sample variance of (1, 0, 1, 1) is 0.25; its mean's standard error is sqrt(0.25 / 4).
    assert result.standard_error == pytest.approx(math.sqrt(0.25 / 4))
    exact = correctness(responses, references, AnswerMatch.EXACT)
    np.testing.assert_array_equal(exact.correct, [True, False, False, True])


def test_correctness_edge_cases_and_errors():
    empty = correctness([], [], AnswerMatch.CONTAINS)
    assert empty.correct.shape == (0,) and math.isnan(empty.rate)
    one = correctness(["yes"], ["yes"], AnswerMatch.CONTAINS)
    assert one.rate == 1.0 and math.isnan(one.standard_error)
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        correctness(["x", "y"], ["x"], AnswerMatch.CONTAINS)
    with pytest.raises(ValueError, match="Prompt 1: Reference answer '' has no words"):
        correctness(["x", "y"], ["x", ""], AnswerMatch.CONTAINS)


def test_answer_match_is_an_enum_so_typos_fail():
    with pytest.raises(ValueError):
        AnswerMatch("contain")
