"""Closed-form fakes for tests: distributions whose exact behaviour is known.

Everything here is deterministic NumPy (no RNG, no files), so tests can use it as an
independent oracle for the JAX code.

Sections:
  * Distribution pairs: named `(p, q)` pairs of log-probabilities on a small vocabulary,
    including adversarial ones, for speculative verification.
  * Logits: closed-form logits and a float64 NumPy oracle for tempered/top-k distributions.
"""

from typing import NamedTuple

import numpy as np

__all__ = [
    "FAKE_VOCAB",
    "DistributionPair",
    "distribution_pair",
    "distribution_pairs",
    "example_logits",
    "tempered_log_probs",
]

# ---------------------------------------------------------------------------------------
# Distribution pairs
# ---------------------------------------------------------------------------------------

FAKE_VOCAB = 8
"""Vocabulary size of every pair in `distribution_pairs`."""


class DistributionPair(NamedTuple):
    """A verifier distribution `p` and a draft distribution `q` on the same vocabulary.

    Attributes:
      name: identifier, used as a pytest id.
      log_p: float32 `[v]` verifier log-probabilities (`-inf` where `p_v = 0`).
      log_q: float32 `[v]` draft log-probabilities (`-inf` where `q_v = 0`).
    """

    name: str
    log_p: np.ndarray
    log_q: np.ndarray

    @property
    def p(self) -> np.ndarray:
        """float64 `[v]` probabilities `exp(log_p)`."""
        return np.exp(self.log_p.astype(np.float64))

    @property
    def q(self) -> np.ndarray:
        """float64 `[v]` probabilities `exp(log_q)`."""
        return np.exp(self.log_q.astype(np.float64))

    @property
    def total_variation(self) -> float:
        """`Σ_v max(0, q_v − p_v)` in float64 from the float32 log-probabilities."""
        return float(np.sum(np.maximum(0.0, self.q - self.p)))


def _log_normalised(weights: list[float] | np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(weights / weights.sum()).astype(np.float32)


def distribution_pair(
    name: str, p: list[float] | np.ndarray, q: list[float] | np.ndarray
) -> DistributionPair:
    """Builds a pair from non-negative weights (normalised here, in float64).

    Args:
      name: identifier.
      p: `[v]` non-negative verifier weights, not all zero.
      q: `[v]` non-negative draft weights, not all zero.

    Returns:
      The `DistributionPair`.

    Raises:
      ValueError: on negative weights, all-zero weights or mismatched lengths.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"{name}: p{p.shape} and q{q.shape} must be 1-d of equal length.")
    for label, weights in (("p", p), ("q", q)):
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"{name}: {label}={weights} must be >= 0 and not all zero.")
    return DistributionPair(name, _log_normalised(p), _log_normalised(q))


def distribution_pairs() -> tuple[DistributionPair, ...]:
    """The named pairs on `FAKE_VOCAB` tokens, generic and adversarial.

    * `equal`: `p = q`; TV = 0, every draft accepted.
    * `partial_overlap`: generic, TV ≈ 0.45.
    * `disjoint_supports`: no common support; TV = 1, every draft rejected.
    * `one_hot_q`: the draft is certain; accepted with probability `p_2`.
    * `one_hot_p`: the verifier is certain; the output is always token 5.
    * `near_zero_q_draft`: `q_3 = 1e-6` but `p_3 = 0.3`: rare drafts, always accepted,
      and most of `p_3` comes through the residual.
    * `near_zero_p`: `p_0 = 1e-7` with `q_0 = 0.5`: β(0) ≈ 1.
    * `zero_cells`: zeros in `p` where `q > 0` and in `q` where `p > 0`.
    * `nearly_equal`: `p` and `q` differ by about one float32 ulp, so rejections are
      rare and the residual is mostly rounding.
    """
    generic_p = [0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.05, 0.05]
    generic_q = [0.05, 0.05, 0.10, 0.10, 0.20, 0.20, 0.10, 0.20]
    base = np.array([0.21, 0.17, 0.15, 0.13, 0.11, 0.09, 0.08, 0.06])
    nearly = base * (1.0 + 2e-7 * np.array([1, -1, 2, -2, 1, -1, 3, -3]))
    return (
        distribution_pair("equal", generic_p, generic_p),
        distribution_pair("partial_overlap", generic_p, generic_q),
        distribution_pair(
            "disjoint_supports", [0, 0, 0, 0, 0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.2, 0, 0, 0, 0, 0]
        ),
        distribution_pair("one_hot_q", generic_p, [0, 0, 1, 0, 0, 0, 0, 0]),
        distribution_pair("one_hot_p", [0, 0, 0, 0, 0, 1, 0, 0], generic_q),
        distribution_pair(
            "near_zero_q_draft",
            [0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1],
            [0.2, 0.2, 0.2, 1e-6, 0.1, 0.1, 0.1, 0.1],
        ),
        distribution_pair(
            "near_zero_p",
            [1e-7, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],
            [0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05],
        ),
        distribution_pair(
            "zero_cells",
            [0.0, 0.3, 0.3, 0.0, 0.2, 0.2, 0.0, 0.0],
            [0.25, 0.25, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0],
        ),
        distribution_pair("nearly_equal", nearly, base),
    )


# ---------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------


def example_logits(vocab: int, phase: float = 0.0) -> np.ndarray:
    """Deterministic, tie-free float32 logits `z_v = 3 sin(1.7 v + phase) − 0.05 v`.

    Args:
      vocab: number of entries.
      phase: shifts the pattern, so two calls give two different models.

    Returns:
      float32 `[vocab]`.
    """
    v = np.arange(vocab, dtype=np.float64)
    return (3.0 * np.sin(1.7 * v + phase) - 0.05 * v).astype(np.float32)


def tempered_log_probs(
    logits: np.ndarray, temperature: float, top_k: int | None = None
) -> np.ndarray:
    """float64 oracle for `speculative.draft_log_probs` (same top-k tie rule).

    `log softmax(mask_k(z / τ))`, keeping exactly the `top_k` largest entries, ties broken
    towards the lower index.

    Args:
      logits: `[v]` logits.
      temperature: `τ > 0`.
      top_k: entries kept, or None for all.

    Returns:
      float64 `[v]` log-probabilities, `-inf` outside the top-k.
    """
    scaled = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        kept = np.argsort(-scaled, kind="stable")[:top_k]
        masked = np.full_like(scaled, -np.inf)
        masked[kept] = scaled[kept]
        scaled = masked
    shifted = scaled - np.max(scaled)
    return shifted - np.log(np.sum(np.exp(shifted)))
