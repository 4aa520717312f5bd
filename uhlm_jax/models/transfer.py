"""Weights from files to the device one tensor at a time, in bounded host memory.

Loaders read a file's tensors lazily (`RowSource`: a shape plus row slicing), convert a
few megabytes of rows at a time (`row_chunks`) into one host buffer per parameter, in the
target dtype and final layout (`host_buffer`), and hand that buffer to the device
(`to_device`) before reading the next one. Peak host memory while loading is then the
final parameters plus one chunk, plus, on an accelerator, one parameter in flight.

Two details keep it so:

- Files are read with `os.pread` into fresh buffers (`read_into`), not memory-mapped: the
  pages of a mapped file count as resident memory of the process until it unmaps them,
  so mapping a checkpoint doubles the peak.
- Host buffers are 64-byte aligned. XLA's CPU client then adopts the buffer as the
  device array without a copy (`jax.device_put` aliases aligned, immutable host memory),
  so on CPU the buffer *is* the final parameter. Nothing writes a buffer after
  `to_device`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

__all__ = ["CHUNK_BYTES", "RowSource", "host_buffer", "read_into", "row_chunks", "to_device"]

# Rows converted at a time: small against any model (the transient of a load), large
# enough that the per-chunk Python overhead is negligible.
CHUNK_BYTES = 4 << 20
# XLA:CPU adopts host memory aligned to this many bytes without copying it.
_ALIGNMENT = 64


@runtime_checkable
class RowSource(Protocol):
    """A tensor read on demand: its shape, and rows `[start, stop)` as a NumPy array.

    A NumPy array is one; the loaders' lazy file tensors are others.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice) -> np.ndarray: ...


def host_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised, 64-byte aligned, C-contiguous host array.

    Args:
        shape: its shape.
        dtype: its dtype (NumPy or JAX, e.g. `jnp.bfloat16`).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def to_device(host: np.ndarray) -> jax.Array:
    """The array on the default device; on CPU it shares `host`'s memory (no copy)."""
    return jax.device_put(host)


def row_chunks(shape: tuple[int, ...], itemsize: int = 4) -> Iterator[slice]:
    """Slices of leading-axis rows of about `CHUNK_BYTES` each, covering the tensor.

    Args:
        shape: the tensor's shape; a 1-D tensor is one chunk.
        itemsize: bytes per element of the widest intermediate (float32 by default).
    """
    rows = shape[0] if shape else 1
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else 0
    step = rows if row_bytes == 0 else max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def read_into(fd: int, out: np.ndarray, offset: int, name: str) -> np.ndarray:
    """Fills the contiguous array `out` with bytes read from `fd` at `offset`.

    Args:
        fd: an open file descriptor.
        out: the destination; its `nbytes` bytes are read.
        offset: byte offset in the file.
        name: the file, for the error message.

    Returns:
        `out`.

    Raises:
        ValueError: if the file ends first.
    """
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise ValueError(
                f"{name} is truncated: it ends {len(view) - done} bytes short of a tensor at "
                f"offset {offset}."
            )
        done += count
    return out
