"""The `k` largest values along the last axis, by XLA's partial top-k.

When only the values of `lax.top_k` are used and they fuse into their consumers, XLA:CPU
replaces the partial top-k (about V comparisons per row) by a sort of the whole row: over
100× slower at V = 49 152 and batch 32 (`benchmarks/RESULTS.md`, "Per-row work"). An
optimization barrier on the values keeps the partial top-k; the values are unchanged.
"""

# ruff: noqa: F722

from __future__ import annotations

from jax import lax

from uhlm_jax.types import Array, Float

__all__ = ["top_k_values"]


def top_k_values(x: Float[Array, "*b v"], k: int) -> Float[Array, "*b k"]:
    """The `k` largest entries of each row of `x`, in descending order."""
    return lax.optimization_barrier(lax.top_k(x, k)[0])
