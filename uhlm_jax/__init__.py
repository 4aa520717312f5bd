"""uhlm_jax: uncertainty-aware hybrid language-model inference in JAX.

The library is pure functions and frozen dataclasses; jobs live in
`calibration/` and `analysis/`, and the `uhlm` command dispatches to them.
"""

__version__ = "0.1.0"
