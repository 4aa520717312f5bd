"""Shared pytest configuration: the checks STYLE.md promises, on for every test.

* The jaxtyping annotations of `uhlm_jax` are checked at runtime with beartype. The
  import hook instruments a module only when it is imported after the hook is in place,
  so it is installed here, at the top of the root conftest, which pytest imports before
  any test module; a `uhlm_jax` module already imported by then would go unchecked, so
  that case fails loudly instead.
* Implicit rank promotion (`x[:, None] + y` written as `x + y`) raises.

A test that must pass ill-typed input to reach a library error message is marked
`without_type_checks`; the typechecker is then switched off for that test alone.
"""

import sys

from jaxtyping import install_import_hook

_CHECKED_PACKAGE = "uhlm_jax"

_already_imported = sorted(name for name in sys.modules if name.split(".")[0] == _CHECKED_PACKAGE)
if _already_imported:
    raise RuntimeError(
        f"{', '.join(_already_imported)} imported before tests/conftest.py, so their "
        "jaxtyping annotations would go unchecked; import them after the hook instead."
    )
# PEP 484's numeric tower: an `int` is a valid `float` (as for static type checkers).
install_import_hook(
    _CHECKED_PACKAGE, "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
)

import jax  # noqa: E402  (after the hook, as is everything that imports uhlm_jax)
import jaxtyping  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _type_checks(request):
    """Turns the runtime type checks off for tests marked `without_type_checks`."""
    if request.node.get_closest_marker("without_type_checks") is None:
        yield
        return
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """Drops JAX's compiled programs after each test module. An xdist worker that kept
    every program of a thousand tests grew past 7 GB, and XLA then crashed (segfault)
    inside a later compilation; with this, workers stay near 4 GB. Modules share almost
    no programs, so little is recompiled."""
    yield
    jax.clear_caches()
