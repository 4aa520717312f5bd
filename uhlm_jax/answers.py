"""Whether a response gives a short reference answer, and the rate of correct responses.

Text is compared as a sequence of normalised tokens (`answer_tokens`), in the spirit of
SQuAD's answer normalisation (Rajpurkar et al., 2016) with numbers and yes/no handled:

- unicode: NFKD, accents dropped, case folded ("Café" = "cafe"; ligatures and
  full-width letters and digits read as their ASCII forms);
- punctuation and whitespace separate tokens and are otherwise ignored; apostrophes
  inside words are dropped ("don't" = "dont");
- the articles "a", "an" and "the" are dropped;
- numbers are compared as numbers: "100.0" = "100", "1,000" = "1000", "0.50" = "0.5",
  and spelled-out numbers up to the millions read as digits ("one hundred and five" =
  "105", "twenty-one" = "21"). A number is one token, so "10" never matches inside "100"
  or "1.05", and a word never matches inside a longer word ("cat" is not in "category").

Two checks (`AnswerMatch`):

- CONTAINS: the reference's tokens occur contiguously in the response's tokens. For a
  yes/no reference ("Yes", "no.") the response's own yes/no answer (`yes_no_answer`) must
  equal it instead, so "No, ..." does not contain "yes", "I don't know" answers neither,
  and a reply that says both is wrong.
- EXACT: the two token sequences are equal.

`correctness(responses, references, match)` scores many prompts and reports the rate with
its standard error over prompts. The functions are host-side Python (string work), pure
and deterministic.

Reference: Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of
Text", EMNLP 2016 (normalised exact match and containment of short answers).
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

import numpy as np

__all__ = [
    "AnswerMatch",
    "Correctness",
    "answer_tokens",
    "contains_answer",
    "correctness",
    "exact_match",
    "is_correct",
    "yes_no_answer",
]

ARTICLES = frozenset({"a", "an", "the"})
YES_WORDS = frozenset({"yes", "yeah", "yep"})
NO_WORDS = frozenset({"no", "nope"})

_UNITS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    word: 10 * (i + 2)
    for i, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())
}
_SCALES = {"thousand": 1_000, "million": 1_000_000}

# A number in digits: thousands separators only in groups of three, an optional
# fraction, and a minus sign only where it cannot be a hyphen between words.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
_TOKEN = re.compile(rf"{_NUMBER}|\d+|[^\W\d_]+")
_APOSTROPHE_IN_WORD = re.compile(r"(?<=[^\W\d_])['’ʼ](?=[^\W\d_])")

# Yes/no detection: where a yes/no word stands as the answer of a clause.
_YES_NO = re.compile(r"\b(" + "|".join(sorted(YES_WORDS | NO_WORDS)) + r")\b")
_OPENING = re.compile(r"^[\W_]*$")  # only punctuation, quotes or markup before the word
_CLAUSE_BEFORE = re.compile(r"(?:[.!?:;,(\"'*—–-]|\b(?:is|was|be|and|or))\s*$")
_CLAUSE_AFTER = re.compile(r"^(?:\s*(?:$|[.!?:;,)\"'*—–\n])|\s+(?:and|or|but)\b)")


class AnswerMatch(enum.Enum):
    """How a response is compared with a short reference answer.

    CONTAINS: the reference's normalised tokens occur contiguously in the response's
        (yes/no references: the response answers the same yes or no).
    EXACT: the normalised token sequences are equal.
    """

    CONTAINS = "contains"
    EXACT = "exact"


def _fold(text: str) -> str:
    """NFKD-decomposed, accents dropped, case folded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _canonical_number(text: str) -> str:
    """Digits of a number without separators, trailing zeros or a trailing point."""
    value = Decimal(text.replace(",", ""))
    if value == 0:
        return "0"
    value = value.normalize()
    return format(value.quantize(Decimal(1)) if value == value.to_integral() else value, "f")


def _read_number(words: Sequence[str], start: int) -> tuple[int, int]:
    """Reads spelled-out number words from `words[start]` on.

    Grammar: groups of `[unit] hundred [and] [tens] [unit]`, each closed by a scale
    ("thousand", "million") of decreasing size; "and" is read only after "hundred" or a
    scale and before tens or units. A lone "hundred" or scale counts one of it.

    Returns:
        The value and the index after the last number word (`start` when there is none).
    """
    total, hundreds, small = 0, 0, None  # closed groups; the open group's hundreds, 0..99
    last_scale = math.inf
    i = end = start
    while i < len(words):
        word = words[i]
        if word in _UNITS:
            unit = _UNITS[word]
            if small is None:
                small = unit
            elif small >= 20 and small % 10 == 0 and 0 < unit < 10:
                small += unit
            else:
                break
        elif word in _TENS:
            if small is not None:
                break
            small = _TENS[word]
        elif word == "hundred":
            if hundreds or (small is not None and not 0 < small < 10):
                break
            hundreds, small = (small or 1) * 100, None
        elif word in _SCALES:
            scale = _SCALES[word]
            if scale >= last_scale:
                break
            total += max(hundreds + (small or 0), 1) * scale
            hundreds, small, last_scale = 0, None, scale
        elif word == "and" and (hundreds or total) and small is None:
            if i + 1 < len(words) and (words[i + 1] in _UNITS or words[i + 1] in _TENS):
                i += 1
                continue
            break
        else:
            break
        i += 1
        end = i
    return total + hundreds + (small or 0), end


def _spelled_numbers(words: Sequence[str]) -> list[str]:
    """Replaces each run of spelled-out number words with its value in digits."""
    out: list[str] = []
    i = 0
    while i < len(words):
        value, end = _read_number(words, i)
        if end > i:
            out.append(str(value))
            i = end
        else:
            out.append(words[i])
            i += 1
    return out


def answer_tokens(text: str) -> tuple[str, ...]:
    """The normalised tokens of a text, as the checks compare them.

    Args:
        text: any text.

    Returns:
        Lowercase, accent-free words without articles, and numbers in canonical digits
        (see the module docstring); empty for a text without words or numbers.

    Example:
        >>> answer_tokens("The answer: One hundred (100.0) Cafés!")
        ('answer', '100', '100', 'cafes')
    """
    folded = _APOSTROPHE_IN_WORD.sub("", _fold(text))
    tokens = []
    for token in _TOKEN.findall(folded):
        if token[0].isdigit() or token[0] in "-.":
            try:
                token = _canonical_number(token)
            except InvalidOperation:
                continue
        tokens.append(token)
    return tuple(t for t in _spelled_numbers(tokens) if t not in ARTICLES)


def yes_no_answer(response: str) -> bool | None:
    """The yes or no a reply gives, if it gives exactly one.

    A yes/no word ("yes", "yeah", "yep", "no", "nope") counts where it opens the reply
    ("Yes, ...", "No.", "**No** it is not"; so "No one knows" reads as no), or where it
    stands as a clause's answer: after punctuation or "is", "was", "be", "and", "or", and
    before punctuation, the end, or "and", "or", "but" ("Answer: yes.", "The answer is
    no.", "It could be yes or no"). Inside a phrase ("there is no way", "say yes to it")
    it does not count.

    Args:
        response: the reply.

    Returns:
        True for yes, False for no, None when the reply says neither (e.g. "I don't
        know") or both.
    """
    text = _fold(response)
    said = set()
    for found in _YES_NO.finditer(text):
        before, after = text[: found.start()], text[found.end() :]
        opening = _OPENING.match(before) is not None
        standalone = _CLAUSE_BEFORE.search(before) and _CLAUSE_AFTER.match(after)
        if opening or standalone:
            said.add(found.group(1) in YES_WORDS)
    return said.pop() if len(said) == 1 else None


def exact_match(response: str, reference: str) -> bool:
    """Whether the normalised tokens of `response` equal those of `reference`."""
    return answer_tokens(response) == answer_tokens(reference)


def contains_answer(response: str, reference: str) -> bool:
    """Whether `response` gives the short answer `reference` (see `AnswerMatch.CONTAINS`).

    Args:
        response: the reply to score.
        reference: the short reference answer, e.g. "Canberra", "100", "yes".

    Returns:
        For a yes/no reference, whether the reply's `yes_no_answer` is the same; otherwise
        whether the reference's tokens occur contiguously among the reply's.

    Raises:
        ValueError: if the reference has no tokens (empty, or only punctuation/articles).
    """
    wanted = answer_tokens(reference)
    if not wanted:
        raise ValueError(
            f"Reference answer {reference!r} has no words or numbers to look for; give "
            "each prompt a short reference answer."
        )
    if len(wanted) == 1 and wanted[0] in YES_WORDS | NO_WORDS:
        return yes_no_answer(response) == (wanted[0] in YES_WORDS)
    tokens = answer_tokens(response)
    n = len(wanted)
    return any(tokens[i : i + n] == wanted for i in range(len(tokens) - n + 1))


def is_correct(response: str, reference: str, match: AnswerMatch) -> bool:
    """Whether `response` gives `reference` under `match`."""
    if match is AnswerMatch.CONTAINS:
        return contains_answer(response, reference)
    return exact_match(response, reference)


class Correctness(NamedTuple):
    """Answer correctness over prompts.

    Attributes:
        correct: `[n]` bool, per prompt.
        rate: share of correct responses (NaN without prompts).
        standard_error: `std(correct, ddof=1) / sqrt(n)`, the standard error of `rate`
            over prompts (NaN below two prompts).
    """

    correct: np.ndarray
    rate: float
    standard_error: float


def correctness(
    responses: Sequence[str], references: Sequence[str], match: AnswerMatch
) -> Correctness:
    """Scores each response against its reference and summarises the rate.

    Args:
        responses: `n` replies.
        references: `n` short reference answers, in the same order.
        match: containment or exact match.

    Returns:
        The per-prompt results, their rate and its standard error.

    Raises:
        ValueError: if the lengths differ, or a reference is empty (naming its index).
    """
    if len(responses) != len(references):
        raise ValueError(
            f"correctness: {len(responses)} responses but {len(references)} references."
        )
    correct = []
    for i, (response, reference) in enumerate(zip(responses, references, strict=True)):
        try:
            correct.append(is_correct(response, reference, match))
        except ValueError as err:
            raise ValueError(f"Prompt {i}: {err}") from None
    correct = np.asarray(correct, bool)
    n = correct.size
    rate = float(correct.mean()) if n else math.nan
    standard_error = float(correct.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Correctness(correct=correct, rate=rate, standard_error=standard_error)
