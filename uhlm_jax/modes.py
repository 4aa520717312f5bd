"""Inference modes compared throughout the library.

One enum, shared by the rollout (which decides what each mode transmits) and the
link model (which decides what each mode costs).
"""

from __future__ import annotations

import enum

__all__ = ["Mode"]


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
