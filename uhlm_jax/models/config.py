"""Configuration of a Llama-family decoder (llama and qwen2 checkpoints).

`ModelConfig` is the static description of the network: sizes, RoPE base, norm epsilon,
head tying and q/k/v bias. It is hashable, so it can be static data of a jitted function
(`ModelParams` carries it as pytree aux data), and it is validated on construction.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any


class Architecture(enum.Enum):
    """Decoder families this package runs. Both are the same network up to q/k/v bias."""

    LLAMA = "llama"
    QWEN2 = "qwen2"


# HF `architectures` entries and `model_type` values accepted for each family.
_HF_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture.LLAMA,
    "Qwen2ForCausalLM": Architecture.QWEN2,
}
_HF_MODEL_TYPES: dict[str, Architecture] = {a.value: a for a in Architecture}

# Defaults of transformers' LlamaConfig / Qwen2Config for keys a config.json may omit.
_HF_DEFAULT_ROPE_THETA = 10_000.0
_HF_DEFAULT_RMS_NORM_EPS = 1e-6


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")


def _require_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"ModelConfig.{name} must be finite, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and hyperparameters of a Llama-family decoder.

    Attributes:
        architecture: decoder family (`Architecture.LLAMA` or `Architecture.QWEN2`).
        vocab_size: number of token ids `v`.
        hidden_size: residual width `h`.
        intermediate_size: SwiGLU inner width.
        num_layers: number of decoder layers.
        num_heads: query heads; a multiple of `num_kv_heads`.
        num_kv_heads: key/value heads `k` (grouped-query attention when < `num_heads`).
        head_dim: per-head width `d`; even, because RoPE rotates pairs.
        rope_theta: RoPE base.
        rms_norm_eps: epsilon inside every RMSNorm.
        tie_word_embeddings: whether the output head is the transposed embedding table.
        qkv_bias: whether the q, k and v projections carry a bias (qwen2).
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool

    def __post_init__(self):
        if not isinstance(self.architecture, Architecture):
            supported = ", ".join(a.name for a in Architecture)
            raise ValueError(
                f"ModelConfig.architecture must be an Architecture ({supported}), "
                f"got {self.architecture!r}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            _require_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        _require_positive_float("rope_theta", self.rope_theta)
        _require_positive_float("rms_norm_eps", self.rms_norm_eps)
        for name in ("tie_word_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}.")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head `g`."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        """Number of parameters, counting a tied embedding/head matrix once."""
        h, d = self.hidden_size, self.head_dim
        q_width, kv_width = self.num_heads * d, self.num_kv_heads * d
        attention = h * q_width + 2 * h * kv_width + q_width * h
        if self.qkv_bias:
            attention += q_width + 2 * kv_width
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h  # two RMSNorm scales
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + head + h  # + final norm

    def weight_bytes(self, bytes_per_param: int = 4) -> int:
        """Bytes of weights read from memory by one decode step.

        Every parameter is read once per step except the rows of an untied embedding
        table, of which a step reads only one per sequence (negligible).

        Args:
            bytes_per_param: storage size of one parameter (4 for float32, 2 for bfloat16).

        Returns:
            Bytes read per decode step; divided by memory bandwidth it is the batch-1
            latency floor.
        """
        read = self.num_params
        if not self.tie_word_embeddings:
            read -= self.vocab_size * self.hidden_size
        return read * bytes_per_param

    def flops_per_token(self, context_length: int = 0) -> float:
        """Floating-point operations to process one token (2 per multiply-add).

        Counts the matrix products of the projections, the MLP and the output head, plus
        the attention scores and weighted sum over `context_length` cached positions.

        Args:
            context_length: number of positions attended to.

        Returns:
            FLOPs per token.
        """
        matmul_params = self.num_params - self.hidden_size * (2 * self.num_layers + 1)
        if self.qkv_bias:
            matmul_params -= (
                self.num_layers * (self.num_heads + 2 * self.num_kv_heads) * (self.head_dim)
            )
        if self.tie_word_embeddings:
            head_params = 0  # the embedding table is counted once, as the head
        else:
            head_params = -self.vocab_size * self.hidden_size  # lookup, not a product
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context_length
        return float(2 * (matmul_params + head_params) + attention)

    @classmethod
    def from_fields(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The config of a mapping of its fields, the architecture by value.

        The inverse of writing `dataclasses.asdict(config)` with the enum by value, as
        run directories' `config.json` and the weight cache record configs.

        Raises:
            ValueError: for a missing or unknown field, or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(
                f"A ModelConfig needs the fields {sorted(names)}; got {sorted(d)}."
            )
        return cls(**{**d, "architecture": Architecture(d["architecture"])})

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a Hugging Face `config.json` dictionary.

        Args:
            d: the parsed `config.json` of a LlamaForCausalLM or Qwen2ForCausalLM.

        Returns:
            The equivalent `ModelConfig`.

        Raises:
            ValueError: for an unsupported model type or architecture, a missing key, or a
                feature this decoder does not implement (RoPE scaling, sliding window,
                output or MLP biases).
        """
        architecture = _architecture_from_hf(d)
        try:
            hidden_size = int(d["hidden_size"])
            num_heads = int(d["num_attention_heads"])
            head_dim = d.get("head_dim") or hidden_size // num_heads
            config_kwargs = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
            )
        except KeyError as err:
            raise ValueError(f"HF config.json lacks the required key {err.args[0]!r}.") from None
        rope_theta = _hf_rope_theta(d)
        layer_types = set(d.get("layer_types") or ["full_attention"])
        if d.get("use_sliding_window") or layer_types != {"full_attention"}:
            raise ValueError(
                f"HF config.json asks for sliding-window attention (use_sliding_window="
                f"{d.get('use_sliding_window')!r}, layer_types {sorted(layer_types)}); only "
                "full attention is supported."
            )
        if d.get("mlp_bias"):
            raise ValueError("HF config.json sets mlp_bias=true; MLP biases are not supported.")
        if architecture is Architecture.QWEN2:
            qkv_bias = True
        elif d.get("attention_bias"):
            raise ValueError(
                "HF config.json sets attention_bias=true (bias on o_proj too); only q/k/v "
                "bias (qwen2) is supported."
            )
        else:
            qkv_bias = False
        return cls(
            architecture=architecture,
            rope_theta=rope_theta,
            rms_norm_eps=float(d.get("rms_norm_eps", _HF_DEFAULT_RMS_NORM_EPS)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            **config_kwargs,
        )


def _architecture_from_hf(d: Mapping[str, Any]) -> Architecture:
    supported = (
        f"model_type in {sorted(_HF_MODEL_TYPES)} / architectures in {sorted(_HF_ARCHITECTURES)}"
    )
    model_type = d.get("model_type")
    architectures = d.get("architectures") or []
    if model_type is not None:
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"Unsupported HF model_type {model_type!r}; supported: {supported}.")
        architecture = _HF_MODEL_TYPES[model_type]
    elif architectures:
        architecture = None
    else:
        raise ValueError(
            f"HF config.json has neither model_type nor architectures; supported: {supported}."
        )
    for name in architectures:
        if name not in _HF_ARCHITECTURES:
            raise ValueError(f"Unsupported HF architecture {name!r}; supported: {supported}.")
        if architecture is None:
            architecture = _HF_ARCHITECTURES[name]
        elif _HF_ARCHITECTURES[name] is not architecture:
            raise ValueError(
                f"HF config.json model_type {model_type!r} disagrees with architecture {name!r}."
            )
    return architecture


def _hf_rope_theta(d: Mapping[str, Any]) -> float:
    """RoPE base from `rope_theta` (transformers < 5) or `rope_parameters` (>= 5).

    Raises:
        ValueError: for any RoPE scaling (linear, dynamic, yarn, llama3, ...).
    """
    parameters = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = parameters.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ValueError(
            f"HF config.json sets RoPE scaling (rope_scaling={scaling!r}, "
            f"rope_type={rope_type!r}); only plain RoPE (rope_type 'default') is supported."
        )
    return float(parameters.get("rope_theta", d.get("rope_theta", _HF_DEFAULT_ROPE_THETA)))


# SmolLM2-135M(-Instruct), as in its Hugging Face config.json. Random weights of this
# config time exactly like the real model (benchmarks) and size real-scale tests; the
# real weights come from the GGUF (`uhlm_jax.models.registry`).
SMOLLM2_135M = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    qkv_bias=False,
)
