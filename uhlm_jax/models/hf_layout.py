"""Checking Hugging Face tensors against a layout table, before any of them is read.

A layout maps each leaf path of a params tree to the HF tensors it is made of: their
names, joined along the last axis (fused projections), whether each is transposed from
HF's `[out, in]` to the `[in, out]` kernels used here, and the HF shape of each. The
decoder (`llama`) and the encoder (`bert`) each build one from their config and `check` a
checkpoint against it before assembling their params.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Layout = Mapping[tuple[Any, ...], tuple[Sequence[str], bool, Sequence[tuple[int, ...]]]]
"""Leaf path -> (HF names joined along the last axis, transposed?, HF shape of each)."""


def _listed(names: Sequence[str]) -> str:
    return f"{list(names[:8])}{' ...' if len(names) > 8 else ''}"


def check(
    layout: Layout,
    tensors: Mapping[str, Any],
    model: str,
    ignored: Callable[[str], bool] = lambda name: False,
) -> None:
    """Checks that a checkpoint has exactly the layout's tensors, in its shapes.

    Only names and `.shape` are read, so lazy tensors stay unread.

    Args:
        layout: the table (see `Layout`).
        tensors: HF name -> array (or anything with a `.shape`).
        model: what the layout describes, for error messages ("a llama model with ...").
        ignored: names a checkpoint may carry that the model does not use.

    Raises:
        ValueError: naming the tensors, if some are unexpected or missing, or one has a
            shape the layout does not give it.
    """
    expected = {name for names, _, _ in layout.values() for name in names}
    unexpected = sorted(name for name in tensors if name not in expected and not ignored(name))
    if unexpected:
        raise ValueError(f"Tensors not part of {model}: {_listed(unexpected)}")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"Missing tensors for {model}: {_listed(missing)}")
    for names, _, shapes in layout.values():
        for name, shape in zip(names, shapes, strict=True):
            if tuple(tensors[name].shape) != tuple(shape):
                raise ValueError(
                    f"Tensor {name} has shape {tuple(tensors[name].shape)}, but the config "
                    f"implies {tuple(shape)}."
                )
