"""Compute latency: roofline of a decode step per model and device.

``max(FLOPs / peak, bytes / bandwidth)`` per decoded token, plus the cost of the
temperature-perturbation uncertainty (``K`` samples over ``V``). Models, devices and
precisions are static: they change which numbers enter, not the traced computation.

References:
  J. Kaplan et al., "Scaling Laws for Neural Language Models", arXiv 2001.08361
  (FLOPs per token).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

import numpy as np

from uhlm_jax.channel.checks import parse_enum, positive
from uhlm_jax.channel.payload import token_id_bits

if TYPE_CHECKING:
    from uhlm_jax.models.config import ModelConfig

# FLOPs charged per (sample, vocabulary entry) of the temperature-perturbation
# uncertainty: Gumbel noise -log(-log U) (two logs, one FLOP each by convention),
# scale by θ, add to the logit, compare for the argmax.
UNCERTAINTY_FLOPS_PER_ENTRY = 5
# Bytes read per (sample, vocabulary entry): one float32 logit, re-read for each sample.
UNCERTAINTY_BYTES_PER_ENTRY = 4
# Bytes per cached key or value element (float16 KV cache).
KV_BYTES_PER_VALUE = 2


class Precision(enum.Enum):
    """Storage precision of weights; the value is bytes per parameter."""

    FLOAT32 = 4.0
    FLOAT16 = 2.0
    INT8 = 1.0
    INT4 = 0.5

    @classmethod
    def from_name(cls, name: str) -> Precision:
        """Parses ``"float32"``, ``"float16"``, ``"int8"`` or ``"int4"``."""
        return parse_enum(cls, name, "precision")

    @classmethod
    def from_dtype(cls, dtype: Any) -> Precision:
        """The precision of parameters stored in ``dtype``, by bytes per parameter.

        ``float32`` is `FLOAT32`; ``float16`` and ``bfloat16`` (2 bytes each) are `FLOAT16`.

        Raises:
          ValueError: for a dtype of another size or kind, naming it.
        """
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        by_name = {"float32": cls.FLOAT32, "float16": cls.FLOAT16, "bfloat16": cls.FLOAT16}
        if name not in by_name:
            raise ValueError(
                f"dtype {dtype!r} has no precision profile; use one of: {', '.join(by_name)}"
            )
        return by_name[name]


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of a Llama-family decoder, enough to cost a decode step.

    Attributes:
      name: command-line name.
      n_layers: transformer blocks ``L``.
      d_model: hidden size ``h``.
      n_heads: query heads.
      n_kv_heads: key/value heads (GQA).
      head_dim: per-head size.
      d_ff: SwiGLU intermediate size.
      vocab_size: ``V``.
      tied_embeddings: whether the output head reuses the input embedding.
      qkv_bias: whether the q, k and v projections carry a bias (qwen2). Biases count as
        parameters, not as multiplied or read weights of a decode step (they are
        ``(n_heads + 2 · n_kv_heads) · head_dim`` per layer, under 0.1% of a layer).
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False

    def __post_init__(self):
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} is invalid: it must be >= 1")
        token_id_bits(self.vocab_size)

    @classmethod
    def from_config(cls, config: ModelConfig, name: str) -> ModelProfile:
        """The architecture numbers of a decoder the package runs.

        A model costs what its config describes: an early-exit draft
        (`uhlm_jax.models.early_exit.build_draft`) has ``L + 1`` layers (the shared ones
        and the exit block) and an untied head, and is costed as such.

        Args:
          config: the decoder's `ModelConfig`.
          name: the name the profile is shown under.

        Returns:
          The profile; `parameter_count` of it equals ``config.num_params``.
        """
        return cls(
            name=name,
            n_layers=config.num_layers,
            d_model=config.hidden_size,
            n_heads=config.num_heads,
            n_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            d_ff=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied_embeddings=config.tie_word_embeddings,
            qkv_bias=config.qkv_bias,
        )


def _layer_matmul_parameters(model: ModelProfile) -> int:
    attention = model.d_model * (2 * model.n_heads + 2 * model.n_kv_heads) * model.head_dim
    mlp = 3 * model.d_model * model.d_ff
    return attention + mlp


def parameter_count(model: ModelProfile) -> int:
    """All parameters: blocks (with q/k/v biases), RMSNorm gains, embedding and (untied)
    output head."""
    bias = (model.n_heads + 2 * model.n_kv_heads) * model.head_dim if model.qkv_bias else 0
    blocks = model.n_layers * (_layer_matmul_parameters(model) + bias + 2 * model.d_model)
    embeddings = model.vocab_size * model.d_model * (1 if model.tied_embeddings else 2)
    return blocks + embeddings + model.d_model


def _decode_matmul_parameters(model: ModelProfile) -> int:
    """Parameters a decode step multiplies with: blocks and output head.

    The input embedding is a row lookup, not a matrix product.
    """
    return model.n_layers * _layer_matmul_parameters(model) + model.vocab_size * model.d_model


def decode_flops(model: ModelProfile, context_tokens: int) -> int:
    """FLOPs to decode one token after ``context_tokens`` cached ones.

    ``2 · N_matmul + 4 · L · n_heads · head_dim · context`` (weights, then ``q·Kᵀ`` and
    ``attn·V``; Kaplan et al. 2020, arXiv 2001.08361, Table 1).
    """
    attention = 4 * model.n_layers * model.n_heads * model.head_dim * context_tokens
    return 2 * _decode_matmul_parameters(model) + attention


def decode_bytes(model: ModelProfile, precision: Precision, context_tokens: int) -> float:
    """Bytes read from memory to decode one token at batch 1.

    Every multiplied weight once at ``precision``, plus the KV cache
    (``2 · L · context · n_kv_heads · head_dim`` values of `KV_BYTES_PER_VALUE`).
    """
    weights = _decode_matmul_parameters(model) * precision.value
    cache = 2 * model.n_layers * context_tokens * model.n_kv_heads * model.head_dim
    return weights + cache * KV_BYTES_PER_VALUE


class ModelSize(enum.Enum):
    """Named model-size profiles (numbers from each model's Hugging Face config.json).

    Parameter counts from `parameter_count`: TinyLlama-1.1B 1.100e9, Llama-2-7B 6.738e9,
    SmolLM2-135M 1.345e8.
    """

    TINYLLAMA_1_1B = ModelProfile(
        name="tinyllama-1.1b",  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        n_layers=22,
        d_model=2048,
        n_heads=32,
        n_kv_heads=4,
        head_dim=64,
        d_ff=5632,
        vocab_size=32000,
        tied_embeddings=False,
    )
    LLAMA_2_7B = ModelProfile(
        name="llama-2-7b",  # meta-llama/Llama-2-7b-hf
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
        vocab_size=32000,
        tied_embeddings=False,
    )
    SMOLLM2_135M = ModelProfile(
        name="smollm2-135m",  # HuggingFaceTB/SmolLM2-135M-Instruct
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        vocab_size=49152,
        tied_embeddings=True,
    )

    @classmethod
    def from_name(cls, name: str) -> ModelSize:
        """Parses ``"tinyllama-1.1b"``, ``"llama-2-7b"`` or ``"smollm2-135m"``."""
        return parse_enum(cls, name, "model")


@dataclasses.dataclass(frozen=True)
class PairProfile:
    """An SLM/LLM pair as the cost model sees it: the pair's own models, not named ones.

    Attributes:
      name: the pair's name.
      slm: the drafting model's numbers (`ModelProfile.from_config` of its config).
      llm: the verifying model's numbers.
      precision: bytes per parameter of both, from the dtype the pair ran in.
    """

    name: str
    slm: ModelProfile
    llm: ModelProfile
    precision: Precision

    def __post_init__(self):
        if self.slm.vocab_size != self.llm.vocab_size:
            raise ValueError(
                f"pair {self.name!r}: the SLM has V = {self.slm.vocab_size} and the LLM "
                f"V = {self.llm.vocab_size}; a pair shares one vocabulary"
            )

    @property
    def vocab_size(self) -> int:
        """``V`` of the pair's distributions, the uplinked one included."""
        return self.llm.vocab_size


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Roofline of a device: peak arithmetic and memory bandwidth.

    Attributes:
      name: command-line name.
      peak_flops_per_s: dense peak at the deployment's compute precision.
      memory_bytes_per_s: peak memory bandwidth.
      description: the hardware and where the numbers come from.
    """

    name: str
    peak_flops_per_s: float
    memory_bytes_per_s: float
    description: str = ""

    def __post_init__(self):
        positive("peak_flops_per_s", self.peak_flops_per_s)
        positive("memory_bytes_per_s", self.memory_bytes_per_s)


class Device(enum.Enum):
    """Named device profiles. Decode at batch 1 is bandwidth-bound on all of them."""

    PHONE_SOC = DeviceProfile(
        name="phone-soc",
        peak_flops_per_s=4.0e12,
        memory_bytes_per_s=76.8e9,
        description=(
            "Snapdragon 8 Gen 3 class: LPDDR5X-9600 on a 64-bit bus = 76.8 GB/s (Qualcomm "
            "product brief); ~4 TFLOP/s FP16 is an order-of-magnitude GPU/NPU figure"
        ),
    )
    EDGE_GPU = DeviceProfile(
        name="edge-gpu",
        peak_flops_per_s=42.5e12,
        memory_bytes_per_s=204.8e9,
        description=(
            "NVIDIA Jetson AGX Orin 64GB: 204.8 GB/s LPDDR5 (datasheet); FP16 dense "
            "~42.5 TFLOP/s, a quarter of the GPU's 170 sparse INT8 TOPS"
        ),
    )
    DATACENTER_GPU = DeviceProfile(
        name="datacenter-gpu",
        peak_flops_per_s=312e12,
        memory_bytes_per_s=2.039e12,
        description="NVIDIA A100 80GB SXM: 312 TFLOP/s dense FP16, 2.039 TB/s HBM2e (datasheet)",
    )
    REFERENCE_CPU = DeviceProfile(
        name="reference-cpu",
        peak_flops_per_s=130e9,
        memory_bytes_per_s=29e9,
        description="the project's 2-core CPU, as measured in DESIGN.md §5",
    )

    @classmethod
    def from_name(cls, name: str) -> Device:
        """Parses ``"phone-soc"``, ``"edge-gpu"``, ``"datacenter-gpu"``, ``"reference-cpu"``."""
        return parse_enum(cls, name, "device")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A model on a device.

    Attributes:
      model: architecture numbers.
      device: roofline numbers.
      precision: weight storage precision.
      context_tokens: cached tokens attended to per step (a typical mid-generation length).
    """

    model: ModelSize | ModelProfile
    device: Device | DeviceProfile
    precision: Precision = Precision.FLOAT16
    context_tokens: int = 512

    def __post_init__(self):
        if self.context_tokens < 0:
            raise ValueError(
                f"context_tokens={self.context_tokens} is invalid: it must be >= 0"
            )

    @property
    def model_profile(self) -> ModelProfile:
        return self.model.value if isinstance(self.model, ModelSize) else self.model

    @property
    def device_profile(self) -> DeviceProfile:
        return self.device.value if isinstance(self.device, Device) else self.device


def _roofline_s(flops: float, bytes_: float, device: DeviceProfile) -> float:
    return max(flops / device.peak_flops_per_s, bytes_ / device.memory_bytes_per_s)


def compute_latency_s(deployment: Deployment) -> float:
    """Roofline latency of one decode step, ``max(FLOPs / peak, bytes / bandwidth)``.

    A lower bound: it assumes peak throughput and no kernel overheads. E.g.
    Llama-2-7B in float16 on the A100 profile: 13.5 GB / 2.039 TB/s ≈ 6.6 ms.
    """
    model = deployment.model_profile
    return _roofline_s(
        decode_flops(model, deployment.context_tokens),
        decode_bytes(model, deployment.precision, deployment.context_tokens),
        deployment.device_profile,
    )


def uncertainty_latency_s(device: Device | DeviceProfile, vocab_size: int, samples: int) -> float:
    """Roofline latency of the temperature-perturbation uncertainty on the device.

    ``K`` Gumbel-max samples over ``V`` logits: `UNCERTAINTY_FLOPS_PER_ENTRY` FLOPs and
    `UNCERTAINTY_BYTES_PER_ENTRY` bytes per (sample, entry).
    """
    if samples < 1:
        raise ValueError(f"samples={samples} is invalid: it must be >= 1")
    token_id_bits(vocab_size)
    profile = device.value if isinstance(device, Device) else device
    entries = samples * vocab_size
    return _roofline_s(
        entries * UNCERTAINTY_FLOPS_PER_ENTRY, entries * UNCERTAINTY_BYTES_PER_ENTRY, profile
    )
