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

`Array` is a JAX or NumPy array: JAX functions take either, and callers pass NumPy
arrays read from record tables. `ArrayLike` (`jax.typing.ArrayLike`: arrays and Python
or NumPy scalars) annotates inputs that may also be scalars; `DTypeLike` a NumPy or JAX
dtype.
"""

import jax
import numpy as np
from jaxtyping import ArrayLike, Bool, DTypeLike, Float, Int, PRNGKeyArray

Array = jax.Array | np.ndarray

__all__ = ["Array", "ArrayLike", "Bool", "DTypeLike", "Float", "Int", "PRNGKeyArray"]
