"""Payload of hybrid LM inference: the bits sent per token in each direction.

Full distribution ``V · b`` bits; CU-HLM top-k truncation ``k · (b + ⌈log2 V⌉)`` bits
(value and index of each kept entry); a token id ``⌈log2 V⌉`` bits; the downlink carries
one token id per verified token.

References:
  S. Oh et al., "Communication-Efficient Hybrid Language Model via Uncertainty-Aware
  Opportunistic and Compressed Transmission", arXiv 2505.11788 (CU-HLM).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import jax.numpy as jnp

from uhlm_jax.channel.checks import check, positive
from uhlm_jax.types import Array, Float, Int


def token_id_bits(vocab_size: int) -> int:
    """Bits to address one of ``V`` tokens, ``⌈log2 V⌉`` (15 for V = 32000)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} is invalid: a vocabulary needs >= 2 tokens")
    return int(vocab_size - 1).bit_length()


def full_distribution_bits(vocab_size: int, bits_per_prob: Float[Array, ""] | float):
    """Uplink payload of HLM: every probability, ``V · b`` bits (256000 for 32000 × 8)."""
    positive("bits_per_prob", bits_per_prob)
    token_id_bits(vocab_size)
    return vocab_size * jnp.asarray(bits_per_prob, jnp.float32)


def top_k_bits(
    top_k: Int[Array, " ..."] | int,
    vocab_size: int,
    bits_per_prob: Float[Array, ""] | float,
) -> Float[Array, " ..."]:
    """CU-HLM truncated uplink payload, ``k · (b + ⌈log2 V⌉)`` bits.

    Each kept entry carries its probability (``b`` bits) and its index; the receiver
    spreads the omitted mass uniformly (see `uhlm_jax.truncation`). 690 bits for
    k = 30, b = 8, V = 32000.

    Raises:
      ValueError: if a concrete ``top_k`` is outside [1, V] or ``b <= 0``.
    """
    check(
        "top_k",
        top_k,
        lambda a: (a >= 1) & (a <= vocab_size),
        f"k must lie in [1, vocab_size={vocab_size}]",
    )
    positive("bits_per_prob", bits_per_prob)
    k = jnp.asarray(top_k, jnp.float32)
    return k * (jnp.asarray(bits_per_prob, jnp.float32) + token_id_bits(vocab_size))


def downlink_bits(vocab_size: int) -> int:
    """Downlink payload per verified token: the emitted token's id, ``⌈log2 V⌉`` bits.

    The acceptance decision is implied by the id (equal to the draft or not).
    """
    return token_id_bits(vocab_size)
