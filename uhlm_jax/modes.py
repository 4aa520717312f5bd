"""Inference modes and what each one means, in one place.

A `Mode` names how tokens are produced; its `ModePolicy` says everything the rest of the
library needs to know about it: its label, whether the SLM drafts, whether the device
computes an uncertainty, and when a token is transmitted. The rollout (what a mode
emits), replay (what it would have transmitted), the metrics (which rates it has) and the
channel model (what it costs) all read the policy; none of them compares modes.

Convention: LLM-only transmits every token (the LLM at the base station produces it), so
its transmission rate is 1 and its skip rate 0. It drafts nothing, so the rates that
describe drafts (acceptance, true skip rate, the skip speedup bound) are undefined (NaN).
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import enum

import chex
import jax
import jax.numpy as jnp

from uhlm_jax.types import Array, Bool, Float

__all__ = ["Mode", "ModePolicy", "Transmission", "transmit_decision", "transmit_weight"]


class Transmission(enum.Enum):
    """When a mode sends a token to the base station.

    Attributes:
      ALWAYS: every token.
      NEVER: no token.
      UNCERTAIN: when the token's uncertainty exceeds the threshold (`u > u_th`).
      RANDOM: with a fixed probability, independently per token.
    """

    ALWAYS = "always"
    NEVER = "never"
    UNCERTAIN = "uncertain"
    RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class ModePolicy:
    """What a mode does with each token.

    Attributes:
      label: the mode's name in tables and figures.
      drafts: the on-device SLM drafts the token (it pays `τ_SLM`, and a transmitted
        token uploads the draft distribution for verification). Acceptance, the true
        skip rate and the skip speedup bound describe drafts: they are NaN without them.
      uses_uncertainty: the device computes the draft's uncertainty (it pays `τ_unc`).
      transmission: when the token goes to the base station.
    """

    label: str
    drafts: bool
    uses_uncertainty: bool
    transmission: Transmission

    def __post_init__(self):
        if self.uses_uncertainty and not self.drafts:
            raise ValueError(
                f"ModePolicy {self.label!r} uses an uncertainty but drafts nothing; the "
                "uncertainty is the draft's, so set drafts=True"
            )

    @property
    def uploads_drafts(self) -> bool:
        """Some tokens upload a draft distribution (the uplink payload matters)."""
        return self.drafts and self.transmission is not Transmission.NEVER


class Mode(enum.Enum):
    """How a generated token is produced.

    Attributes:
      LLM_ONLY: the remote LLM generates every token; nothing is drafted on the device.
      SLM_ONLY: the on-device SLM generates every token; nothing is transmitted.
      HLM: the SLM drafts every token, uploads its distribution, and the LLM verifies it
        (speculative inference, one draft token per round).
      UHLM: as HLM, but a token whose SLM uncertainty is at or below the threshold is
        emitted without uplink or LLM work (U-HLM, arXiv 2412.12687).
      RAND_HLM: as HLM, but each token is transmitted with a fixed probability, regardless
        of uncertainty (the random-skipping baseline).
    """

    LLM_ONLY = "llm_only"
    SLM_ONLY = "slm_only"
    HLM = "hlm"
    UHLM = "uhlm"
    RAND_HLM = "rand_hlm"

    @classmethod
    def from_name(cls, name: str) -> Mode:
        """Parses a mode from its value, e.g. ``"uhlm"``.

        Raises:
          ValueError: naming the unknown value and the valid ones.
        """
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown mode {name!r}; use one of: {valid}") from None

    @property
    def policy(self) -> ModePolicy:
        """This mode's `ModePolicy`."""
        return _POLICIES[self]


_POLICIES = {
    Mode.LLM_ONLY: ModePolicy("LLM only", False, False, Transmission.ALWAYS),
    Mode.SLM_ONLY: ModePolicy("SLM only", True, False, Transmission.NEVER),
    # HLM computes the uncertainty it does not use (DESIGN.md §2), so HLM and U-HLM differ
    # only by skipping.
    Mode.HLM: ModePolicy("HLM", True, True, Transmission.ALWAYS),
    Mode.UHLM: ModePolicy("U-HLM", True, True, Transmission.UNCERTAIN),
    Mode.RAND_HLM: ModePolicy("Rand-HLM", True, False, Transmission.RANDOM),
}


def transmit_decision(
    mode: Mode,
    key: Array,
    u: Float[Array, ""],
    threshold: Float[Array, ""],
    transmit_probability: Float[Array, ""],
) -> Bool[Array, ""]:
    """Whether one token is transmitted in `mode` (static).

    Args:
      mode: the inference mode.
      key: the token's transmit key (read by `Transmission.RANDOM` only).
      u: the token's uncertainty under the gate measure.
      threshold: U-HLM skips a token when `u <= threshold`.
      transmit_probability: Rand-HLM's probability of transmitting.
    """
    rule = mode.policy.transmission
    if rule is Transmission.ALWAYS:
        return jnp.bool_(True)
    if rule is Transmission.NEVER:
        return jnp.bool_(False)
    if rule is Transmission.UNCERTAIN:
        return u > threshold
    return jax.random.uniform(key) < transmit_probability


def transmit_weight(
    mode: Mode,
    u: Float[Array, ""],
    threshold: Float[Array, ""],
    transmit_probability: Float[Array, ""],
) -> Float[Array, ""]:
    """The expectation of `transmit_decision` over its key, `w ∈ [0, 1]`.

    `1` (always), `0` (never), `1{u > threshold}` (U-HLM) or `transmit_probability`
    (Rand-HLM): the weight trace replay gives each recorded token. Arguments as in
    `transmit_decision`.
    """
    chex.assert_rank([u, threshold, transmit_probability], 0)
    rule = mode.policy.transmission
    if rule is Transmission.ALWAYS:
        return jnp.float32(1.0)
    if rule is Transmission.NEVER:
        return jnp.float32(0.0)
    if rule is Transmission.UNCERTAIN:
        return (u > threshold).astype(jnp.float32)
    return jnp.asarray(transmit_probability, jnp.float32)
