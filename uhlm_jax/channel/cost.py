"""Cost of a generated token in each mode: latency, throughput and speedup.

A `CostProfile` joins the models and devices (`uhlm_jax.channel.compute`), the link
(`uhlm_jax.channel.link`) and the uplink payload (`uhlm_jax.channel.payload`). Per token,
for each `Mode`: HLM costs ``τ_SLM + τ_unc + τ_UL + τ_LLM + τ_DL``; U-HLM pays the last
three only on transmitted tokens. Under this model a skip rate ``s`` bounds U-HLM's
speedup over HLM by ``1 / (1 − s)`` (`speedup_bound`). Expected costs average the link
over fading; costs from records draw it per token.

Shape legend (see `uhlm_jax.types`): ``n`` generated steps.

References:
  S. Oh et al., "Uncertainty-Aware Hybrid Inference with On-Device Small and Remote
  Large Language Models", ICMLCN 2025, arXiv 2412.12687 (U-HLM).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from uhlm_jax.channel.checks import check, positive
from uhlm_jax.channel.compute import Deployment, compute_latency_s, uncertainty_latency_s
from uhlm_jax.channel.link import (
    Link,
    expected_transmission_latency_s,
    sample_transmission_latency_s,
)
from uhlm_jax.channel.payload import (
    downlink_bits,
    full_distribution_bits,
    token_id_bits,
    top_k_bits,
)
from uhlm_jax.modes import Mode, Transmission
from uhlm_jax.types import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray


@struct.dataclass
class CostProfile:
    """What a generated token costs: models, devices, link and uplink payload.

    Independent of the models that produced any records, so token statistics from a
    small pair can be costed as, e.g., TinyLlama on a phone with Llama-2-7B on a server.
    ``link``, ``bits_per_prob`` and ``top_k`` are pytree leaves (sweepable); the rest
    is static.

    Attributes:
      slm: the drafting model and its device.
      llm: the verifying model and its device.
      link: the wireless link (both directions).
      vocab_size: ``V`` of the uplinked distribution (static).
      bits_per_prob: bits per transmitted probability ``b``.
      top_k: None for the full distribution, else the CU-HLM truncation ``k`` in [1, V].
      uncertainty_samples: ``K`` of the temperature-perturbation uncertainty (static).
    """

    slm: Deployment = struct.field(pytree_node=False)
    llm: Deployment = struct.field(pytree_node=False)
    link: Link
    vocab_size: int = struct.field(pytree_node=False)
    bits_per_prob: Float[Array, ""] | float = 16.0
    top_k: Int[Array, ""] | int | None = None
    uncertainty_samples: int = struct.field(pytree_node=False, default=20)

    def __post_init__(self):
        token_id_bits(self.vocab_size)
        positive("bits_per_prob", self.bits_per_prob)
        check(
            "top_k",
            self.top_k,
            lambda a: (a >= 1) & (a <= self.vocab_size),
            f"k must lie in [1, vocab_size={self.vocab_size}] (or None for the full "
            "distribution)",
        )
        if self.uncertainty_samples < 1:
            raise ValueError(
                f"uncertainty_samples={self.uncertainty_samples} is invalid: it must be >= 1"
            )


def uplink_bits(profile: CostProfile) -> Float[Array, ""]:
    """Uplink payload per transmitted token under ``profile``, in bits."""
    if profile.top_k is None:
        return full_distribution_bits(profile.vocab_size, profile.bits_per_prob)
    return top_k_bits(profile.top_k, profile.vocab_size, profile.bits_per_prob)


@struct.dataclass
class LatencyBreakdown:
    """Expected per-token latency terms, in seconds.

    Attributes:
      slm_s: ``τ_SLM``, one SLM decode step on the device.
      uncertainty_s: ``τ_unc``, the uncertainty on the device.
      uplink_s: ``E[τ_UL]``, the distribution upload.
      llm_s: ``τ_LLM``, one LLM decode (verification) step at the base station.
      downlink_s: ``E[τ_DL]``, the emitted token's id.
    """

    slm_s: Float[Array, ""]
    uncertainty_s: Float[Array, ""]
    uplink_s: Float[Array, ""]
    llm_s: Float[Array, ""]
    downlink_s: Float[Array, ""]


def _compute_terms_s(profile: CostProfile) -> tuple[float, float, float]:
    return (
        compute_latency_s(profile.slm),
        uncertainty_latency_s(
            profile.slm.device, profile.vocab_size, profile.uncertainty_samples
        ),
        compute_latency_s(profile.llm),
    )


def expected_breakdown(
    profile: CostProfile, uplink_bits_per_token: Float[Array, ""] | None = None
) -> LatencyBreakdown:
    """Expected latency terms of one transmitted token (link terms averaged over fading)."""
    slm_s, unc_s, llm_s = _compute_terms_s(profile)
    ul_bits = uplink_bits(profile) if uplink_bits_per_token is None else uplink_bits_per_token
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)
    return LatencyBreakdown(
        slm_s=as_f32(slm_s),
        uncertainty_s=as_f32(unc_s),
        uplink_s=expected_transmission_latency_s(ul_bits, profile.link),
        llm_s=as_f32(llm_s),
        downlink_s=expected_transmission_latency_s(
            float(downlink_bits(profile.vocab_size)), profile.link
        ),
    )


def mode_latency_s(
    mode: Mode, terms: LatencyBreakdown, transmitted: Bool[ArrayLike, ""] | Float[ArrayLike, ""]
) -> Float[Array, ""]:
    """Per-token latency of ``mode`` from its terms; ``transmitted`` may be a share.

    The mode's policy (`uhlm_jax.modes.ModePolicy`) picks the terms: a drafting mode pays
    ``τ_SLM``, one that uses the uncertainty ``τ_unc``, and a transmitted token pays
    ``τ_LLM + τ_DL``, plus ``τ_UL`` when it uploads a draft. ``transmitted`` is read only
    where the policy leaves the decision open (U-HLM, Rand-HLM). Hence

    * LLM-only: ``τ_LLM + τ_DL``, tokens streamed to the device. The prompt upload is a
      one-off cost shared by every mode that uses the LLM, left out of per-token terms.
    * SLM-only: ``τ_SLM``.
    * HLM: ``τ_SLM + τ_unc + τ_UL + τ_LLM + τ_DL`` (τ_unc is charged as in DESIGN.md §2,
      so HLM and U-HLM differ only by skipping; it is microseconds on every profile).
    * U-HLM: ``τ_SLM + τ_unc + m · (τ_UL + τ_LLM + τ_DL)``, ``m`` transmitted.
    * Rand-HLM: ``τ_SLM + m · (τ_UL + τ_LLM + τ_DL)``; it needs no uncertainty.
    """
    policy = mode.policy
    remote_s = (terms.uplink_s + terms.llm_s if policy.drafts else terms.llm_s) + terms.downlink_s
    device_s = None
    if policy.drafts:
        device_s = terms.slm_s
        if policy.uses_uncertainty:
            device_s = device_s + terms.uncertainty_s
    if policy.transmission is Transmission.NEVER:
        return device_s
    if policy.transmission is not Transmission.ALWAYS:
        remote_s = jnp.asarray(transmitted, jnp.float32) * remote_s
    return remote_s if device_s is None else device_s + remote_s


def _check_share(name: str, value: Any) -> None:
    check(name, value, lambda a: (a >= 0) & (a <= 1), "a share must lie in [0, 1]")


def expected_token_latency_s(
    mode: Mode, profile: CostProfile, skip_rate: Float[Array, ""] | float = 0.0
) -> Float[Array, ""]:
    """Expected latency per generated token, in seconds.

    Args:
      mode: inference mode (static).
      profile: cost profile.
      skip_rate: share ``s`` of tokens not transmitted; used by U-HLM and Rand-HLM only.
    """
    _check_share("skip_rate", skip_rate)
    terms = expected_breakdown(profile)
    return mode_latency_s(mode, terms, 1.0 - jnp.asarray(skip_rate, jnp.float32))


def expected_throughput_tokens_per_s(
    mode: Mode, profile: CostProfile, skip_rate: Float[Array, ""] | float = 0.0
) -> Float[Array, ""]:
    """Long-run token throughput, ``1 / E[τ]`` tokens per second (ratio of expectations)."""
    return 1.0 / expected_token_latency_s(mode, profile, skip_rate)


def speedup_bound(skip_rate: Float[Array, " ..."] | float) -> Float[Array, " ..."]:
    """Upper bound ``1 / (1 − s)`` on U-HLM's speedup over HLM at skip rate ``s``.

    With ``a = τ_SLM + τ_unc`` and ``c = τ_UL + τ_LLM + τ_DL``,
    ``(a + c) / (a + (1 − s) c) <= 1 / (1 − s)``, approached as ``a → 0``
    (1.85× at s = 45.93%).
    """
    check(
        "skip_rate", skip_rate, lambda a: (a >= 0) & (a < 1), "it must lie in [0, 1)"
    )
    return 1.0 / (1.0 - jnp.asarray(skip_rate, jnp.float32))


def expected_speedup(
    profile: CostProfile, skip_rate: Float[Array, ""] | float
) -> Float[Array, ""]:
    """U-HLM's expected throughput over HLM's at skip rate ``s``; ``<= 1 / (1 − s)``."""
    hlm_s = expected_token_latency_s(Mode.HLM, profile)
    return hlm_s / expected_token_latency_s(Mode.UHLM, profile, skip_rate)


# ------------------------------------------------------------------- from records


def token_latencies_s(
    mode: Mode,
    transmitted: Bool[Array, " n"],
    valid: Bool[Array, " n"],
    profile: CostProfile,
    key: PRNGKeyArray,
    uplink_bits_per_token: Float[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Random per-token latencies of one generated sequence, in seconds.

    Fading is drawn per token and direction from ``fold_in(key, step)``, so two modes
    costed with the same key see the same channel on the same step (common random
    numbers), and a step's draw does not depend on the sequence length.

    Args:
      mode: inference mode (static). ``transmitted`` is read by U-HLM and Rand-HLM only:
        HLM transmits every token, LLM-only and SLM-only none.
      transmitted: whether each step's draft was uploaded and verified.
      valid: whether each step produced a token (False after the end of sequence);
        invalid steps cost 0.
      profile: cost profile.
      key: fading key of this sequence (derive per sequence with ``fold_in``).
      uplink_bits_per_token: per-step payloads, e.g. from an online top-k rule;
        defaults to the profile's payload.

    Returns:
      latency_s[n].
    """
    chex.assert_rank([transmitted, valid], 1)
    chex.assert_equal_shape([transmitted, valid])
    slm_s, unc_s, llm_s = _compute_terms_s(profile)
    n = transmitted.shape[0]
    ul_bits = (
        jnp.broadcast_to(uplink_bits(profile), (n,))
        if uplink_bits_per_token is None
        else jnp.asarray(uplink_bits_per_token, jnp.float32)
    )
    chex.assert_shape(ul_bits, (n,))
    dl_bits = float(downlink_bits(profile.vocab_size))

    def one(step, sent, bits):
        ul_key, dl_key = jax.random.split(jax.random.fold_in(key, step))
        terms = LatencyBreakdown(
            slm_s=jnp.float32(slm_s),
            uncertainty_s=jnp.float32(unc_s),
            uplink_s=sample_transmission_latency_s(bits, profile.link, ul_key),
            llm_s=jnp.float32(llm_s),
            downlink_s=sample_transmission_latency_s(dl_bits, profile.link, dl_key),
        )
        return mode_latency_s(mode, terms, sent)

    latency_s = jax.vmap(one)(jnp.arange(n), transmitted, ul_bits)
    return jnp.where(valid, latency_s, 0.0)
