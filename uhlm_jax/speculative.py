"""Exact speculative verification of one draft token, and its rejection probability.

Every function here is written for ONE position (arrays of shape `[v]`, scalars `[]`)
and checks ranks first; callers batch with `jax.vmap`. Everything is float32 and in
log space: probabilities that are exactly zero are `-inf` log-probabilities.

The HLM step (one draft token per round):

1. the SLM samples `d ~ q` (`draft_log_probs`, then `uhlm_jax.sampling.sample_token`);
2. the LLM accepts `d` with probability `min(1, p_d / q_d)`;
3. on rejection it samples from the residual `r ∝ max(0, p − q)` (`verify`).

The emitted token is then distributed exactly as `p`:

    P(emit v) = q_v min(1, p_v / q_v) + TV(p, q) · max(0, p_v − q_v) / TV(p, q)
              = min(q_v, p_v) + max(0, p_v − q_v) = p_v,

with `TV(p, q) = Σ_v max(0, q_v − p_v)`, the probability of rejection. This holds only
if `q` is exactly the distribution `d` was sampled from (after temperature and top-k, in
the same dtype), which is why `draft_log_probs` is the single place that defines it.

References:
  Y. Leviathan, M. Kalman, Y. Matias, "Fast Inference from Transformers via Speculative
  Decoding", ICML 2023 (arXiv 2211.17192).
  C. Chen, S. Borgeaud, G. Irving, J.-B. Lespiau, L. Sifre, J. Jumper, "Accelerating Large
  Language Model Decoding with Speculative Sampling", arXiv 2302.01318, 2023.
  S. Oh, J. Kim, J. Park, S.-W. Ko, T. Q. S. Quek, S.-L. Kim, "Uncertainty-Aware Hybrid
  Inference with On-Device Small and Remote Large Language Models", IEEE ICMLCN 2025
  (arXiv 2412.12687).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from uhlm_jax.sampling import sample_token
from uhlm_jax.types import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "MIN_TEMPERATURE",
    "Verification",
    "draft_log_probs",
    "rejection_probability",
    "residual_log_weights",
    "total_variation",
    "verify",
]

MIN_TEMPERATURE = 1e-4
"""Smallest draft temperature; smaller values (including 0) are clamped to it.

Greedy drafting is approximated by this floor rather than special-cased: the draft is
still sampled from, and verified against, the returned `q`, so verification stays exact
whatever the floor; only the draft is "near-greedy" (logits closer than about
`16 · MIN_TEMPERATURE` nats to the maximum keep non-negligible mass).
"""


class Verification(NamedTuple):
    """Outcome of verifying one draft token.

    Attributes:
      token: int32 `[]`, the emitted token (the draft if accepted, else the resample).
      accepted: bool `[]`, whether the draft was accepted.
      beta: float32 `[]`, the rejection probability `β = max(0, 1 − p_d / q_d)` of the
        draft, i.e. the probability (over the verifier's randomness) that it is rejected.
    """

    token: Int[Array, ""]
    accepted: Bool[Array, ""]
    beta: Float[Array, ""]


def _as_log_probs(x: Array) -> Float[Array, " v"]:
    x = jnp.asarray(x, jnp.float32)
    chex.assert_rank(x, 1)
    return x


def _as_token(draft: Array) -> Int[Array, ""]:
    draft = jnp.asarray(draft)
    chex.assert_rank(draft, 0)
    chex.assert_type(draft, int)
    return draft.astype(jnp.int32)


def draft_log_probs(
    logits: Float[Array, " v"],
    temperature: Float[Array, ""] | float,
    top_k: int | None = None,
) -> Float[Array, " v"]:
    """Log-probabilities `log q` of the distribution a draft is sampled from.

    `q = softmax(mask_k(z / τ))`, where `mask_k` keeps the `top_k` largest entries (exactly
    `top_k` of them; ties at the boundary are broken towards the lower index, as
    `jax.lax.top_k` does) and sets the others to `-inf`.

    Args:
      logits: `[v]` SLM logits `z` (any float dtype; computed in float32).
      temperature: `[]` draft temperature `τ > 0`, may be traced. Values below
        `MIN_TEMPERATURE` (including 0) are clamped to it: near-greedy drafting, see
        `MIN_TEMPERATURE`. Validate user-facing temperatures in configs.
      top_k: static number of tokens kept, `1 ≤ top_k ≤ v`, or None for no truncation.

    Returns:
      float32 `[v]` log-probabilities, `-inf` outside the top-k, normalised in log space.

    Raises:
      ValueError: if `top_k` is not in `[1, v]`.
    """
    logits = _as_log_probs(logits)
    temperature = jnp.asarray(temperature, jnp.float32)
    chex.assert_rank(temperature, 0)
    scaled = logits / jnp.maximum(temperature, MIN_TEMPERATURE)
    if top_k is not None:
        vocab = logits.shape[0]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise ValueError(
                f"top_k={top_k!r} must be an int in [1, {vocab}] (the vocabulary size), "
                "or None for no truncation."
            )
        _, kept = jax.lax.top_k(scaled, top_k)
        keep = jnp.zeros(scaled.shape, bool).at[kept].set(True)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.nn.log_softmax(scaled)


def _log_ratio(log_q_d: Float[Array, "*v"], log_p_d: Float[Array, "*v"]) -> Float[Array, "*v"]:
    """`log p_d − log q_d`, never forming `-inf − -inf`.

    Where `p_d = 0` the result is `-inf` (rejected for sure), even if `q_d = 0`; where
    `q_d = 0 < p_d` it is `+inf` (accepted for sure).
    """
    p_is_zero = jnp.isneginf(log_p_d)
    q_is_zero = jnp.isneginf(log_q_d)
    safe_log_q_d = jnp.where(q_is_zero, 0.0, log_q_d)
    return jnp.where(p_is_zero, -jnp.inf, jnp.where(q_is_zero, jnp.inf, log_p_d - safe_log_q_d))


def rejection_probability(
    log_q: Float[Array, " v"], log_p: Float[Array, " v"], draft: Int[ArrayLike, ""]
) -> Float[Array, ""]:
    """Rejection probability of the draft, `β = max(0, 1 − p_d / q_d)`.

    Computed as `β = |expm1(min(0, log p_d − log q_d))|`, never as a ratio; the absolute
    value (of a non-positive number) makes a zero `+0.0`, where `−expm1(0)` is `−0.0`. Conventions
    at zero probabilities:
      * `p_d = 0`: `β = 1`, the verifier never emits a token it gives probability zero
        (this takes precedence, also for the undraftable `q_d = 0`);
      * `q_d = 0 < p_d`: `β = 0`. Such a token cannot be drafted; either way the
        conventions keep `E_{d~q}[β(d)] = Σ_v q_v β(v) = TV(p, q)`, as `q_d = 0` has no
        weight there.

    Args:
      log_q: `[v]` draft log-probabilities.
      log_p: `[v]` verifier (LLM) log-probabilities.
      draft: int `[]` drafted token id.

    Returns:
      float32 `[]` in `[0, 1]`.
    """
    log_q, log_p, draft = _as_log_probs(log_q), _as_log_probs(log_p), _as_token(draft)
    chex.assert_equal_shape([log_q, log_p])
    log_ratio = _log_ratio(log_q[draft], log_p[draft])
    return jnp.abs(jnp.expm1(jnp.minimum(0.0, log_ratio)))


def total_variation(log_q: Float[Array, " v"], log_p: Float[Array, " v"]) -> Float[Array, ""]:
    """Total variation `TV(p, q) = Σ_v max(0, q_v − p_v)`: the expected rejection rate.

    Computed as `Σ_v q_v β(v)`, with `β` as in `rejection_probability`, which avoids the
    cancellation in `q_v − p_v` when `p ≈ q`; the result is clipped to `[0, 1]` against
    float32 rounding of the sum.

    Args:
      log_q: `[v]` draft log-probabilities.
      log_p: `[v]` verifier log-probabilities.

    Returns:
      float32 `[]` in `[0, 1]`.
    """
    log_q, log_p = _as_log_probs(log_q), _as_log_probs(log_p)
    chex.assert_equal_shape([log_q, log_p])
    # `min(0, log p − log q)` already follows `_log_ratio`'s conventions wherever `q_v > 0`
    # (`p_v = 0` gives `-inf`, so `β = 1`); entries with `q_v = 0` weigh nothing and are
    # dropped by one select. Without the per-entry selects of `_log_ratio` the whole sum is
    # one fused pass, about 2× faster when batched on XLA:CPU.
    beta = jnp.abs(jnp.expm1(jnp.minimum(0.0, log_p - log_q)))
    weighted = jnp.where(jnp.isneginf(log_q), 0.0, jnp.exp(log_q) * beta)
    return jnp.clip(jnp.sum(weighted), 0.0, 1.0)


def residual_log_weights(
    log_q: Float[Array, " v"], log_p: Float[Array, " v"]
) -> Float[Array, " v"]:
    """Unnormalised log residual `log max(0, p_v − q_v)`, `-inf` where `p_v ≤ q_v`.

    Uses `log(p − q) = log p + log(1 − exp(x))` with `x = log q − log p < 0` where `p > q`,
    and `log(1 − e^x)` evaluated as `log(−expm1(x))`. `−expm1(x)` is correct to float32
    rounding for every `x < 0`, so `r = p · (−expm1(x))` keeps full relative precision,
    when `p ≈ q` (tiny `|x|`) and at `q = 0` alike. (For `x < −log 2` the form
    `log1p(−e^x)` of Mächler 2012 is more accurate in `log(1 − e^x)` itself, but its gain,
    under 1e-7 absolute, is below the rounding of `log p` that it is added to. One
    transcendental pair instead of two is about 3× faster when batched on XLA:CPU.)

    Args:
      log_q: `[v]` draft log-probabilities.
      log_p: `[v]` verifier log-probabilities.

    Returns:
      float32 `[v]` log-weights; their log-sum-exp is `log TV(p, q)` (up to rounding).
    """
    log_q, log_p = _as_log_probs(log_q), _as_log_probs(log_p)
    chex.assert_equal_shape([log_q, log_p])
    positive = log_p > log_q
    safe_log_p = jnp.where(positive, log_p, 0.0)
    safe_log_q = jnp.where(positive, log_q, -1.0)
    log_residual = safe_log_p + jnp.log(-jnp.expm1(safe_log_q - safe_log_p))
    return jnp.where(positive, log_residual, -jnp.inf)


def verify(
    key: PRNGKeyArray,
    log_q: Float[Array, " v"],
    log_p: Float[Array, " v"],
    draft: Int[ArrayLike, ""],
) -> Verification:
    """Verifies one draft token with speculative sampling; the output is distributed as p.

    Accepts iff `log U < log p_d − log q_d` with `U ~ Uniform[0, 1)`, i.e. with probability
    `min(1, p_d / q_d)`. Otherwise emits `argmax_v(log r_v + G_v)` with Gumbel noise `G`
    and `log r = residual_log_weights(log_q, log_p)`: a sample from
    `r ∝ max(0, p − q)` without normalising it.

    If `p = q`, rejection has probability zero. When `p` and `q` differ only by float32
    rounding, a rejection may still happen while no `p_v > q_v`; the resample then falls
    back to `p` itself, which is the correct law up to that rounding (and never emits an
    arbitrary index).

    Args:
      key: PRNG key; split as `accept_key, residual_key`.
      log_q: `[v]` log-probabilities the draft was sampled from (`draft_log_probs`).
      log_p: `[v]` verifier (LLM) log-probabilities.
      draft: int `[]` drafted token id.

    Returns:
      `Verification(token, accepted, beta)`, see there.

    References:
      Leviathan et al. 2023 (Algorithm 1); Chen et al. 2023 (Algorithm 2);
      U-HLM, arXiv 2412.12687 (Section II).
    """
    log_q, log_p, draft = _as_log_probs(log_q), _as_log_probs(log_p), _as_token(draft)
    chex.assert_equal_shape([log_q, log_p])
    accept_key, residual_key = jax.random.split(key)

    log_ratio = _log_ratio(log_q[draft], log_p[draft])
    beta = jnp.abs(jnp.expm1(jnp.minimum(0.0, log_ratio)))
    # U ∈ [0, 1): log U < 0 ≤ log_ratio whenever p_d ≥ q_d, and log U ≥ -inf = log_ratio
    # whenever p_d = 0, so both extremes are decided exactly.
    log_u = jnp.log(jax.random.uniform(accept_key, dtype=jnp.float32))
    accepted = log_u < log_ratio

    log_r = residual_log_weights(log_q, log_p)
    residual_is_empty = jnp.all(jnp.isneginf(log_r))
    resample_logits = jnp.where(residual_is_empty, log_p, log_r)
    resampled = sample_token(residual_key, resample_logits)

    token = jnp.where(accepted, draft, resampled)
    return Verification(token=token, accepted=accepted, beta=beta)
