"""Shape legend and array aliases shared by the whole library.

Dimension names used in jaxtyping annotations and docstrings:

  b  batch (rows, one prompt each)
  t  tokens of a prompt (prefill length)
  s  KV-cache slots (fixed maximum sequence length)
  n  generated steps (new tokens)
  v  vocabulary
  h  hidden size
  k  kv heads; g query heads per kv head; d head dimension
  m  Monte Carlo samples (e.g. perturbed temperatures)
  p  grid points of a sweep

Annotations are checked at runtime in tests only (see tests/conftest.py).
"""

from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = ["Array", "Bool", "Float", "Int", "PRNGKeyArray"]
