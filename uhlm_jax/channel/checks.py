"""Validation of the channel model's configs and arguments.

Checks run on concrete values only: JAX rebuilds pytrees with tracers and placeholder
leaves, which pass unchecked, so validated configs still sweep under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
    """Returns ``value`` as a float64 array if it is concrete, else None.

    Config validation runs on construction, but JAX rebuilds pytrees with tracers and
    placeholder leaves; those are skipped, concrete numbers are checked.
    """
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def check(
    name: str, value: Any, ok: Callable[[np.ndarray], Any], requirement: str
) -> None:
    """Raises unless ``ok`` holds for every element of a concrete ``value``.

    Args:
      name: the argument's name, for the message.
      value: the value to check; tracers and None pass.
      ok: elementwise predicate on the value as a float64 array.
      requirement: what a valid value is, for the message.

    Raises:
      ValueError: naming ``name``, ``value`` and ``requirement``.
    """
    arr = concrete(value)
    if arr is not None and not np.all(ok(arr)):
        raise ValueError(f"{name}={value!r} is invalid: {requirement}")


def positive(name: str, value: Any) -> None:
    """Raises unless a concrete ``value`` is finite and > 0 (see `check`)."""
    check(name, value, lambda a: np.isfinite(a) & (a > 0), "it must be finite and > 0")


def non_negative(name: str, value: Any) -> None:
    """Raises unless a concrete ``value`` is finite and >= 0 (see `check`)."""
    check(name, value, lambda a: np.isfinite(a) & (a >= 0), "it must be finite and >= 0")


def parse_enum(cls: type[enum.Enum], name: str, what: str) -> Any:
    """The member of ``cls`` named ``name``: its lower-case name or its value's name.

    Raises:
      ValueError: naming the unknown ``what`` and the valid names.
    """
    for member in cls:
        if name in (member.name.lower(), getattr(member.value, "name", member.value)):
            return member
    valid = ", ".join(getattr(m.value, "name", m.name.lower()) for m in cls)
    raise ValueError(f"unknown {what} {name!r}; use one of: {valid}")
