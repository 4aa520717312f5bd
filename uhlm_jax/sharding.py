"""Device meshes, and how a model pair and its batch are placed on them.

A mesh has two axes. `data` splits the rows of a batch; `model` splits the LLM the way
Megatron-LM does (Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
Models Using Model Parallelism", 2019, arXiv 1909.08053):

- attention: the fused q/k/v kernel (and bias) is split by column, whole kv-head groups
  per device (each kv head with its query heads); `o_proj` is split by row;
- MLP: the fused gate/up kernel is split by column, `down_proj` by row;
- KV cache: kv heads over `model`, rows over `data`.

Every device thus runs its own heads and MLP columns, and XLA inserts the one all-reduce
each row-split product needs, from the `NamedSharding` of the inputs alone. A contiguous
split of the plain fused layout `[q | k | v]` would not fall on head boundaries, so the
LLM's fused kernels are first reordered into `model` head-aligned blocks
(`ModelParams.fused_blocks`), which the decoder reads back as the same q, k and v.

Replicated on every device: the LLM's embedding, LM head and norm scales (the usual
Megatron split also divides the vocabulary; that is not done here), and the whole SLM,
which runs next to the LLM on every device of a row's `model` group.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.traverse_util
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from uhlm_jax.models.cache import KVCache
from uhlm_jax.models.config import ModelConfig
from uhlm_jax.models.llama import ModelParams
from uhlm_jax.pair import ModelPair

__all__ = [
    "DATA",
    "MODEL",
    "MeshShape",
    "check_model_split",
    "constrain_cache",
    "make_mesh",
    "place_pair",
    "reblock",
    "replicate",
    "row_sharding",
    "split_model",
]

DATA = "data"
MODEL = "model"
_AXES = (DATA, MODEL)
_AXIS_ITEM = re.compile(r"\s*(\w+)\s*=\s*(\S+)\s*")

# Weight path (from the layer's module) -> how the model axis splits it. Every other
# weight is replicated.
_SPLIT = {
    ("self_attn", "qkv_proj", "kernel"): PartitionSpec(None, MODEL),
    ("self_attn", "qkv_proj", "bias"): PartitionSpec(MODEL),
    ("self_attn", "o_proj", "kernel"): PartitionSpec(MODEL, None),
    ("mlp", "gate_up_proj", "kernel"): PartitionSpec(None, MODEL),
    ("mlp", "down_proj", "kernel"): PartitionSpec(MODEL, None),
}
# The fused weights among them, and the widths of their parts.
_FUSED = {
    ("self_attn", "qkv_proj"): lambda c: (
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    ),
    ("mlp", "gate_up_proj"): lambda c: (c.intermediate_size,) * 2,
}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes.

    Attributes:
        data: devices the rows of a batch are split over; None takes every device the
            model axis leaves (`device count / model`).
        model: devices the LLM's heads and MLP columns are split over.
    """

    data: int | None = None
    model: int = 1

    def __post_init__(self):
        for axis in _AXES:
            size = getattr(self, axis)
            if size is None and axis == DATA:
                continue
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh {axis}={size!r} must be a positive int.")

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """Reads `"data=D,model=M"`; either item may be left out (`"model=2"`).

        Raises:
            ValueError: naming the item, for an unknown axis, a repeated axis or a size
                that is not a positive int.
        """
        sizes: dict[str, int] = {}
        for item in text.split(","):
            match = _AXIS_ITEM.fullmatch(item)
            if match is None or match[1] not in _AXES or match[1] in sizes:
                raise ValueError(
                    f"mesh {text!r}: cannot read {item.strip()!r}; write 'data=D,model=M' "
                    "with each axis at most once (e.g. 'model=2')."
                )
            try:
                sizes[match[1]] = int(match[2])
            except ValueError:
                raise ValueError(
                    f"mesh {text!r}: {match[1]}={match[2]!r} must be a positive int."
                ) from None
        return cls(**sizes)

    def resolve(self, num_devices: int) -> MeshShape:
        """The shape with `data` filled in for `num_devices` devices.

        Raises:
            ValueError: naming the shape, if it does not use exactly `num_devices`.
        """
        if self.data is not None:
            if self.data * self.model != num_devices:
                raise ValueError(
                    f"mesh {self} uses {self.data * self.model} devices but {num_devices} "
                    f"are visible; make data x model = {num_devices}, or leave data out."
                )
            return self
        if num_devices % self.model:
            raise ValueError(
                f"mesh model={self.model} does not divide the {num_devices} devices; use a "
                f"model axis that divides {num_devices}."
            )
        return MeshShape(data=num_devices // self.model, model=self.model)

    def __str__(self) -> str:
        return ",".join(f"{axis}={getattr(self, axis)}" for axis in _AXES)


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `model` mesh over `devices` (default: every device of every process).

    Devices of one `model` group are neighbours in `jax.make_mesh`'s order, so the
    per-layer all-reduces stay on the fastest links.

    Raises:
        ValueError: if `shape` does not use exactly the given devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = shape.resolve(len(devices))
    return jax.make_mesh(
        (shape.data, shape.model), _AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def check_model_split(config: ModelConfig, model: int, role: str = "LLM") -> None:
    """Raises a one-line ValueError unless `model` devices can split `config` on heads.

    The model axis must divide the kv heads (and so the query heads) and the MLP width.
    """
    for what, count in (
        ("key/value heads (num_kv_heads)", config.num_kv_heads),
        ("MLP columns (intermediate_size)", config.intermediate_size),
    ):
        if count % model:
            fits = [m for m in range(1, config.num_kv_heads + 1) if config.num_kv_heads % m == 0]
            fits = [m for m in fits if config.intermediate_size % m == 0]
            raise ValueError(
                f"mesh model={model} does not divide the {role}'s {count} {what}; use a "
                f"model axis in {fits}."
            )


def _block_order(widths: Sequence[int], blocks: int) -> np.ndarray:
    """Columns of the plain fused layout, in the order of the `blocks`-block layout."""
    offsets = np.cumsum([0, *widths[:-1]])
    return np.concatenate(
        [
            np.arange(offset + j * width // blocks, offset + (j + 1) * width // blocks)
            for j in range(blocks)
            for offset, width in zip(offsets, widths, strict=True)
        ]
    )


def _layer_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """A weight's path below its `layers_i` module (the whole path outside layers)."""
    return path[1:] if path[0].startswith("layers_") else path


def reblock(params: ModelParams, blocks: int) -> ModelParams:
    """The same model with its fused kernels held as `blocks` head-aligned blocks.

    Columns are reordered on the host, one weight at a time; the other weights are
    shared, not copied.

    Raises:
        ValueError: if `blocks` does not split the heads and MLP columns evenly.
    """
    check_model_split(params.config, blocks)
    if blocks == params.fused_blocks:
        return params
    flat = flax.traverse_util.flatten_dict(params.weights)
    for path, leaf in flat.items():
        widths = _FUSED.get(_layer_path(path)[:2])
        if widths is not None:
            widths = widths(params.config)
            # Plain columns in the current order, then in the new one.
            order = np.argsort(_block_order(widths, params.fused_blocks))
            flat[path] = np.take(np.asarray(leaf), order[_block_order(widths, blocks)], axis=-1)
    return ModelParams(
        config=params.config,
        weights=flax.traverse_util.unflatten_dict(flat),
        fused_blocks=blocks,
    )


def _put(params: ModelParams, specs: dict) -> ModelParams:
    flat = flax.traverse_util.flatten_dict(params.weights)
    placed = {path: jax.device_put(leaf, specs[path]) for path, leaf in flat.items()}
    return dataclasses.replace(params, weights=flax.traverse_util.unflatten_dict(placed))


def replicate(params: ModelParams, mesh: Mesh) -> ModelParams:
    """The model with every weight copied to every device of `mesh`."""
    everywhere = NamedSharding(mesh, PartitionSpec())
    return _put(params, dict.fromkeys(flax.traverse_util.flatten_dict(params.weights), everywhere))


def split_model(params: ModelParams, mesh: Mesh) -> ModelParams:
    """The model with its heads and MLP columns split over the `model` axis of `mesh`.

    Cheap when `params` is already split this way (the weights are left in place).

    Raises:
        ValueError: if the `model` axis does not divide the heads or the MLP columns.
    """
    params = reblock(params, mesh.shape[MODEL])
    specs = {
        path: NamedSharding(mesh, _SPLIT.get(_layer_path(path), PartitionSpec()))
        for path in flax.traverse_util.flatten_dict(params.weights)
    }
    return _put(params, specs)


def place_pair(pair: ModelPair, mesh: Mesh) -> ModelPair:
    """The pair with the SLM replicated and the LLM split over `model` (`split_model`)."""
    return dataclasses.replace(pair, slm=replicate(pair.slm, mesh), llm=split_model(pair.llm, mesh))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose leading axis is the batch: rows over `data`, copies over `model`."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def constrain_cache(cache: KVCache, mesh: Mesh, split_heads: bool) -> KVCache:
    """`cache` laid out with rows over `data` and, if `split_heads`, kv heads over `model`.

    Call inside `jit` on a freshly made cache, so XLA allocates each device's share only.
    """
    heads = MODEL if split_heads else None
    slots = NamedSharding(mesh, PartitionSpec(DATA, heads))
    constrain = jax.lax.with_sharding_constraint
    return KVCache(
        keys=constrain(cache.keys, slots),
        values=constrain(cache.values, slots),
        index=constrain(cache.index, NamedSharding(mesh, PartitionSpec())),
        start=constrain(cache.start, row_sharding(mesh)),
    )
