"""The checks tests/conftest.py promises are on: annotations and rank promotion."""

import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from uhlm_jax.models.llama import rms_norm

HIDDEN = 4


def test_a_shape_that_contradicts_the_annotation_raises():
    # Given: rms_norm annotates x as `[..., h]` and scale as `[h]`.
    x = jnp.ones((2, HIDDEN))
    # When/Then: a scale of another size fails the annotation before any arithmetic.
    with pytest.raises(jaxtyping.TypeCheckError, match="scale"):
        rms_norm(x, jnp.ones(HIDDEN + 1), 1e-6)


def test_a_dtype_that_contradicts_the_annotation_raises():
    with pytest.raises(jaxtyping.TypeCheckError, match="x"):
        rms_norm(jnp.ones((2, HIDDEN), jnp.int32), jnp.ones(HIDDEN), 1e-6)


def test_numpy_arrays_satisfy_the_annotations():
    # NumPy inputs are legitimate (uhlm_jax.types.Array), and give the JAX result.
    x = np.arange(2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
    scale = np.linspace(0.5, 2.0, HIDDEN, dtype=np.float32)
    np.testing.assert_array_equal(
        rms_norm(x, scale, 1e-6), rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6)
    )


@pytest.mark.without_type_checks
def test_the_marker_turns_the_checks_off():
    # The integer input that fails above is computed on (in float32) without the checks.
    out = rms_norm(jnp.ones((2, HIDDEN), jnp.int32), jnp.ones(HIDDEN), 1e-6)
    np.testing.assert_allclose(out, np.ones((2, HIDDEN)), rtol=1e-6)


def test_implicit_rank_promotion_raises():
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones(HIDDEN) + jnp.ones((2, HIDDEN))
