"""Shared pytest configuration.

Runtime checking of the jaxtyping annotations of `uhlm_jax` needs a type checker
(beartype or typeguard) that the dev dependencies do not include yet; with one installed,
`jaxtyping.install_import_hook("uhlm_jax", "beartype.beartype")` here, before anything
imports `uhlm_jax`, would enable it for the tests only.
"""
