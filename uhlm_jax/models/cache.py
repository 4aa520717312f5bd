"""Key/value cache of a Llama-family decoder.

Layout. Every layer holds keys and values as `[b, k, s, d]` arrays (batch, kv heads,
slots, head dim). All rows share one write slot `index`, so a decode step writes the new
key and value of every row with a single `lax.dynamic_update_slice` per layer, which XLA
performs in place when the cache is donated at the jit boundary. Prompts are stored
right-aligned: a row whose prompt is shorter than the batch's longest starts at slot
`start[b] > 0`, its leading slots are masked out, and its RoPE position at slot `j` is
`j - start[b]`. A row's logits therefore do not depend on the other rows.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from uhlm_jax.models.config import ModelConfig
from uhlm_jax.types import Array, DTypeLike, Float, Int


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values of all layers, with the shared write slot.

    Attributes:
        keys: one `[b, k, s, d]` array per layer.
        values: one `[b, k, s, d]` array per layer.
        index: int32 scalar, the next slot to write; shared by all rows. Equals the number
            of slots in use.
        start: int32 `[b]`, the first valid slot of each row; slots before it are padding.
    """

    keys: tuple[Float[Array, "b k s d"], ...]
    values: tuple[Float[Array, "b k s d"], ...]
    index: Int[Array, ""]
    start: Int[Array, " b"]

    @property
    def batch_size(self) -> int:
        """Rows `b`."""
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        """Slots `s`: the most tokens (prompt plus generated) a row can hold."""
        return self.keys[0].shape[2]

    @property
    def lengths(self) -> Int[Array, " b"]:
        """Valid tokens per row (prompt plus decoded so far)."""
        return self.index - self.start


def init_cache(
    config: ModelConfig, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32
) -> KVCache:
    """Allocates an empty cache.

    Args:
        config: the model the cache belongs to.
        batch_size: rows `b`.
        max_length: slots `s`; must cover the longest prompt plus all decoded tokens.
        dtype: storage dtype of keys and values.

    Returns:
        A zero-filled `KVCache` with `index = 0` and `start = 0`.

    Raises:
        ValueError: if `batch_size` or `max_length` is not a positive int.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}.")
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        index=jnp.zeros((), jnp.int32),
        start=jnp.zeros((batch_size,), jnp.int32),
    )


def cache_bytes(cache: KVCache) -> int:
    """Total bytes held by the keys and values of `cache`."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.keys, cache.values)))
