"""Accuracy of responses against their prompts' references, per prompt and over prompts.

Two measures, each defined only where the prompt carries what it needs:

- *Sentence similarity*: the cosine of the sentence embeddings (all-MiniLM-L6-v2,
  `uhlm_jax.models.sentence_encoder`) of a response and of the prompt's written
  reference. This is how the U-HLM paper reports accuracy (Oh et al., arXiv 2412.12687).
  A prompt without a reference (empty or only whitespace) has none: it is NaN, never a
  similarity to "".
- *Answer correctness*: whether the response gives the prompt's short answer
  (`uhlm_jax.answers.is_correct`), 1 or 0; NaN for a prompt without a short answer.

`score_responses` scores many responses in one batched embedding call, embedding each
distinct text once (a reference shared by many responses, as when every mode answers the
same prompts, costs one embedding). `mean_estimate` summarises a per-prompt measure over
the prompts that have it, with its standard error over prompts.

    encoder = load_minilm()
    scores = score_responses(encoder, responses, references, answers)
    similarity = mean_estimate(scores.similarity)  # .mean, .standard_error, .count
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from uhlm_jax.answers import AnswerMatch, is_correct
from uhlm_jax.models.sentence_encoder import SentenceEncoder, embed_texts

__all__ = ["MeanEstimate", "ResponseScores", "has_text", "mean_estimate", "score_responses"]


def has_text(text: str) -> bool:
    """Whether a reference or short answer is given (not empty or only whitespace)."""
    return bool(text.strip())


class ResponseScores(NamedTuple):
    """Per-prompt accuracy of `n` responses.

    Attributes:
        similarity: float32 `[n]` cosine in `[-1, 1]` of the response's and the
            reference's sentence embeddings; NaN where the reference is empty.
        correct: float32 `[n]`, 1 where the response gives the short answer and 0 where
            it does not; NaN where the short answer is empty.
    """

    similarity: np.ndarray
    correct: np.ndarray


def score_responses(
    encoder: SentenceEncoder,
    responses: Sequence[str],
    references: Sequence[str],
    answers: Sequence[str],
    match: AnswerMatch = AnswerMatch.CONTAINS,
) -> ResponseScores:
    """Scores each response against its prompt's reference and short answer.

    An entry point (it runs `embed_texts`): every distinct response and non-empty
    reference is embedded once, in one batched call.

    Args:
        encoder: the sentence embedder (e.g. `load_minilm()`).
        responses: `n` replies.
        references: `n` written references, "" where a prompt has none.
        answers: `n` short answers, "" where a prompt has none.
        match: how a short answer is looked for in a reply.

    Returns:
        The per-prompt `ResponseScores`.

    Raises:
        ValueError: if the lengths differ, or a non-empty short answer has no words or
            numbers to look for (naming its index).
    """
    n = len(responses)
    if len(references) != n or len(answers) != n:
        raise ValueError(
            f"score_responses: {n} responses, {len(references)} references and "
            f"{len(answers)} answers; give one reference and one answer per response."
        )
    correct = np.full(n, np.nan, np.float32)
    for i in range(n):
        if has_text(answers[i]):
            try:
                correct[i] = is_correct(responses[i], answers[i], match)
            except ValueError as err:
                raise ValueError(f"Prompt {i}: {err}") from None
    scored = [i for i in range(n) if has_text(references[i])]
    texts = sorted({*(responses[i] for i in scored), *(references[i] for i in scored)})
    row = {text: r for r, text in enumerate(texts)}
    vectors = embed_texts(encoder, texts)
    similarity = np.full(n, np.nan, np.float32)
    for i in scored:
        similarity[i] = vectors[row[responses[i]]] @ vectors[row[references[i]]]
    return ResponseScores(similarity=similarity, correct=correct)


class MeanEstimate(NamedTuple):
    """The mean of a per-prompt measure over the prompts that have it.

    Attributes:
        mean: mean of the finite values (NaN when there are none).
        standard_error: `std(ddof=1) / sqrt(count)`, the standard error of `mean` over
            prompts (NaN below two values).
        count: how many prompts have the measure (finite values).
    """

    mean: float
    standard_error: float
    count: int


def mean_estimate(values: np.ndarray | Iterable[float]) -> MeanEstimate:
    """Mean and standard error over prompts of a per-prompt measure, NaN entries left out.

    Args:
        values: `[n]` per-prompt values (an array, a list or a pandas column); NaN where
            a prompt has no value.

    Returns:
        The `MeanEstimate` over the finite values.
    """
    values = np.asarray(values, np.float64)
    kept = values[np.isfinite(values)]
    count = int(kept.size)
    mean = float(kept.mean()) if count else math.nan
    standard_error = float(kept.std(ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    return MeanEstimate(mean=mean, standard_error=standard_error, count=count)
