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

`Array` is a JAX array. `ArrayLike` (JAX or NumPy arrays and scalars, as
`jax.typing.ArrayLike`) annotates inputs that are converted with `jnp.asarray` and may
come from the host, e.g. record tables.
"""

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "PRNGKeyArray"]
