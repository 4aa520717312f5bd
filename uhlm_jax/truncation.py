"""CU-HLM compressed uplink: top-k truncation of the draft distribution.

Instead of all ``V`` probabilities, the device uploads the ``k`` largest, with their
indices (``k · (b + ⌈log2 V⌉)`` bits, `uhlm_jax.channel.top_k_bits`). The base station
rebuilds

    x̂_v = q_v                          if v is among the top k,
    x̂_v = (1 − Σ_top-k q) / (V − k)    otherwise,

and verifies the draft against ``x̂`` instead of ``q``: accept ``d`` with probability
``min(1, p_d / x̂_d)``, else resample from ``(p − x̂)_+``.

**This breaks exactness.** Speculative verification emits ``p`` only if the ratio uses
the distribution the draft was drawn from. With ``d ~ q`` and ``x̂ ≠ q`` the emitted
token is distributed as

    e_v = q_v · min(1, p_v / x̂_v) + (1 − Σ_d q_d · min(1, p_d / x̂_d)) · r̂_v,
    r̂_v = (p_v − x̂_v)_+ / Σ_u (p_u − x̂_u)_+,

which `emitted_distribution` computes exactly; ``TV(e, p)`` (`exactness_loss_tv`)
measures the loss. For ``k = V``, ``x̂ = q`` and ``e = p``. (Drawing the draft from ``x̂``
instead would restore ``e = p``, at the price of drafting from the flattened tail.)
The probabilities' quantisation to ``b`` bits is not modelled: ``x̂`` keeps exact values.

The truncation distortion ``TV(q, x̂)`` is non-increasing in ``k``: moving the tail's
largest entry ``a`` out of a tail ``T`` with mean ``μ`` changes the tail's mean to ``μ'``
with ``|T'| (μ − μ') = a − μ``, so ``Σ_T |q − μ| >= |a − μ| + Σ_T' |q − μ'| − (a − μ)``.
That makes the online rule, the smallest ``k`` with ``TV(q, x̂_k) <= ε``, a first-crossing
search over one sorted pass (`distortion_curve`).

Reference: S. Oh et al., "Communication-Efficient Hybrid Language Model via
Uncertainty-Aware Opportunistic and Compressed Transmission", arXiv 2505.11788.

Shapes (see `uhlm_jax.types`): ``v`` vocabulary, ``n`` generated steps.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from uhlm_jax import speculative
from uhlm_jax.channel.checks import concrete
from uhlm_jax.types import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "FixedK",
    "ToleranceK",
    "Truncated",
    "choose_k",
    "compress",
    "distortion_curve",
    "distortion_tv",
    "emitted_distribution",
    "exactness_loss_tv",
    "offline_k",
    "smallest_k",
    "truncate",
    "verify_compressed",
]


def _check_k(k: Any, vocab_size: int) -> None:
    arr = concrete(k)
    if arr is not None and not np.all((arr >= 1) & (arr <= vocab_size) & (arr == np.round(arr))):
        raise ValueError(
            f"top_k={k!r} is invalid: k must be an integer in [1, vocab_size={vocab_size}]"
        )


def _check_tolerance(tolerance_tv: Any) -> None:
    arr = concrete(tolerance_tv)
    if arr is not None and not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(
            f"tolerance_tv={tolerance_tv!r} is invalid: a total-variation tolerance lies in [0, 1]"
        )


def truncate(log_q: Float[Array, " v"], k: Int[Array, ""] | int) -> Float[Array, " v"]:
    """Top-k truncation with the omitted mass spread uniformly: ``log x̂``.

    Ties are broken towards the lower token id. A traced ``k`` is clipped to [1, V].

    Args:
      log_q: log-probabilities of the draft distribution.
      k: entries kept.

    Returns:
      log x̂[v], a normalised log-distribution equal to ``log_q`` on the kept entries.

    Raises:
      ValueError: if a concrete ``k`` is outside [1, V].
    """
    chex.assert_rank(log_q, 1)
    v = log_q.shape[0]
    _check_k(k, v)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, v)
    order = jnp.argsort(-log_q, stable=True)
    rank = jnp.zeros((v,), jnp.int32).at[order].set(jnp.arange(v, dtype=jnp.int32))
    kept = rank < k
    log_omitted_mass = jax.nn.logsumexp(jnp.where(kept, -jnp.inf, log_q))
    log_fill = log_omitted_mass - jnp.log(jnp.maximum(v - k, 1).astype(jnp.float32))
    return jnp.where(kept, log_q, log_fill)


def distortion_tv(log_q: Float[Array, " v"], k: Int[Array, ""] | int) -> Float[Array, ""]:
    """Total variation ``½ Σ_v |q_v − x̂_v|`` introduced by top-k truncation."""
    log_x_hat = truncate(log_q, k)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_q) - jnp.exp(log_x_hat)))


def distortion_curve(log_q: Float[Array, " v"]) -> Float[Array, " v"]:
    """``TV(q, x̂_k)`` for every ``k = 1..V`` at once (entry ``k − 1``), O(V log V).

    With ``q`` sorted descending, tail masses ``T_k = Σ_{i>k} q_(i)`` and fill
    ``c_k = T_k / (V − k)``, only tail entries above ``c_k`` count (the tail sums to
    ``(V − k) c_k``), so ``TV_k = Σ_{k<i<=J_k} q_(i) − (J_k − k) c_k`` with
    ``J_k = #{i : q_(i) > c_k}``, found by binary search.
    """
    chex.assert_rank(log_q, 1)
    v = log_q.shape[0]
    q_desc = jnp.exp(jnp.sort(log_q)[::-1])
    # Tail sums accumulated from the smallest entry up, so small tails stay accurate.
    tail = jnp.concatenate([jnp.cumsum(q_desc[::-1])[::-1], jnp.zeros((1,), q_desc.dtype)])
    k = jnp.arange(1, v + 1)
    fill = tail[k] / jnp.maximum(v - k, 1).astype(q_desc.dtype)
    above = v - jnp.searchsorted(q_desc[::-1], fill, side="right")
    above = jnp.maximum(above, k)
    tv = (tail[k] - tail[above]) - (above - k).astype(q_desc.dtype) * fill
    return jnp.maximum(tv, 0.0)


def smallest_k(log_q: Float[Array, " v"], tolerance_tv: Float[Array, ""] | float) -> Int[Array, ""]:
    """Online rule: the smallest ``k`` with ``TV(q, x̂_k) <= tolerance_tv``.

    Args:
      log_q: log-probabilities of this token's draft distribution.
      tolerance_tv: total-variation tolerance ``ε`` in [0, 1] (traced: sweeps compile once).

    Returns:
      k in [1, V] (int32); V always qualifies since ``TV(q, x̂_V) = 0``.
    """
    _check_tolerance(tolerance_tv)
    curve = distortion_curve(log_q)
    ok = curve <= jnp.asarray(tolerance_tv, curve.dtype)
    ok = ok.at[-1].set(True)
    return (jnp.argmax(ok) + 1).astype(jnp.int32)


def offline_k(
    log_q: Float[Array, "n v"],
    valid: Bool[Array, " n"],
    tolerance_tv: Float[Array, ""] | float,
) -> Int[Array, ""]:
    """Offline rule: one ``k`` for all tokens, the smallest with mean distortion <= ``ε``.

    Args:
      log_q: calibration tokens' draft log-distributions.
      valid: which rows count (False for padding).
      tolerance_tv: tolerance ``ε`` on the mean ``TV(q, x̂_k)`` over valid rows.

    Returns:
      k in [1, V] (int32). Memory is O(n · V).
    """
    chex.assert_rank(log_q, 2)
    _check_tolerance(tolerance_tv)
    curves = jax.vmap(distortion_curve)(log_q)
    weight = valid.astype(curves.dtype)
    mean_curve = jnp.sum(curves * weight[:, None], axis=0) / jnp.maximum(jnp.sum(weight), 1.0)
    ok = (mean_curve <= jnp.asarray(tolerance_tv, mean_curve.dtype)).at[-1].set(True)
    return (jnp.argmax(ok) + 1).astype(jnp.int32)


@struct.dataclass
class FixedK:
    """Keep a fixed number of entries (e.g. from `offline_k`).

    Attributes:
      k: entries kept, in [1, V] (traced).
    """

    k: Int[Array, ""] | int

    def __post_init__(self):
        arr = concrete(self.k)
        if arr is not None and not np.all((arr >= 1) & (arr == np.round(arr))):
            raise ValueError(f"k={self.k!r} is invalid: k must be an integer >= 1")


@struct.dataclass
class ToleranceK:
    """Keep the fewest entries whose truncation distortion is within a tolerance.

    Attributes:
      tolerance_tv: ``ε``, bound on ``TV(q, x̂)`` per token, in [0, 1] (traced).
    """

    tolerance_tv: Float[Array, ""] | float

    def __post_init__(self):
        _check_tolerance(self.tolerance_tv)


class Truncated(NamedTuple):
    """One token's compressed uplink.

    Attributes:
      log_x_hat: the receiver's reconstruction, log x̂[v].
      k: entries sent.
      distortion_tv: ``TV(q, x̂)``.
    """

    log_x_hat: Float[Array, " v"]
    k: Int[Array, ""]
    distortion_tv: Float[Array, ""]


def choose_k(rule: FixedK | ToleranceK, log_q: Float[Array, " v"]) -> Int[Array, ""]:
    """The ``k`` a truncation rule picks for one token."""
    if isinstance(rule, FixedK):
        _check_k(rule.k, log_q.shape[-1])
        return jnp.asarray(rule.k, jnp.int32)
    if isinstance(rule, ToleranceK):
        return smallest_k(log_q, rule.tolerance_tv)
    raise ValueError(f"rule={rule!r} is invalid: use truncation.FixedK or truncation.ToleranceK")


def compress(rule: FixedK | ToleranceK, log_q: Float[Array, " v"]) -> Truncated:
    """Applies a truncation rule to one token's draft distribution."""
    k = choose_k(rule, log_q)
    log_x_hat = truncate(log_q, k)
    tv = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_q) - jnp.exp(log_x_hat)))
    return Truncated(log_x_hat=log_x_hat, k=k, distortion_tv=tv)


def verify_compressed(
    key: PRNGKeyArray,
    rule: FixedK | ToleranceK,
    log_q: Float[Array, " v"],
    log_p: Float[Array, " v"],
    draft: Int[ArrayLike, ""],
) -> tuple[speculative.Verification, Truncated]:
    """CU-HLM verification of one draft ``d ~ q``: compress ``q``, verify against ``x̂``.

    The emitted token follows `emitted_distribution`, not ``p`` (see the module
    docstring); the returned ``beta`` is ``max(0, 1 − p_d / x̂_d)``.

    Returns:
      The verification and the compressed uplink (its ``k`` sets the payload).
    """
    truncated = compress(rule, log_q)
    return speculative.verify(key, truncated.log_x_hat, log_p, draft), truncated


def emitted_distribution(
    log_q: Float[Array, " v"], log_x_hat: Float[Array, " v"], log_p: Float[Array, " v"]
) -> Float[Array, " v"]:
    """Exact distribution of the emitted token when ``d ~ q`` is verified against ``x̂``.

    ``e_v = q_v a_v + (1 − Σ_d q_d a_d) r̂_v`` with ``a_v = min(1, p_v / x̂_v)`` and
    ``r̂ ∝ (p − x̂)_+`` (see the module docstring). Equals ``p`` when ``x̂ = q``.

    Args:
      log_q: the distribution the draft is drawn from.
      log_x_hat: the distribution the verifier uses (e.g. `truncate`'s output).
      log_p: the LLM's distribution.

    Returns:
      e[v], probabilities summing to 1.
    """
    chex.assert_rank([log_q, log_x_hat, log_p], 1)
    chex.assert_equal_shape([log_q, log_x_hat, log_p])
    # x̂_v = 0 means the ratio p_v / x̂_v is unbounded: accept (only reachable if q_v = 0).
    accept = jnp.where(
        jnp.isneginf(log_x_hat), 1.0, jnp.exp(jnp.minimum(0.0, log_p - log_x_hat))
    )
    q = jnp.exp(log_q)
    reject_mass = jnp.maximum(1.0 - jnp.sum(q * accept), 0.0)
    excess = jnp.maximum(jnp.exp(log_p) - jnp.exp(log_x_hat), 0.0)
    total_excess = jnp.sum(excess)
    safe_total = jnp.where(total_excess > 0, total_excess, 1.0)
    residual = jnp.where(total_excess > 0, excess / safe_total, 0.0)
    return q * accept + reject_mass * residual


def exactness_loss_tv(
    log_q: Float[Array, " v"], log_x_hat: Float[Array, " v"], log_p: Float[Array, " v"]
) -> Float[Array, ""]:
    """``TV(e, p)``: how far verifying against ``x̂`` moves the output from the LLM's ``p``."""
    e = emitted_distribution(log_q, log_x_hat, log_p)
    return 0.5 * jnp.sum(jnp.abs(e - jnp.exp(log_p)))
