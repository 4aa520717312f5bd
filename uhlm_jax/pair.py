"""An SLM/LLM pair: two decoders that share one tokenizer and vocabulary.

A pair is named (`toy`, the default `smollm2-exit`, `qwen-coder`) or made from two models
(names or checkpoint paths, see `uhlm_jax.models.registry.load_model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from uhlm_jax.models.llama import ModelParams
from uhlm_jax.models.registry import (
    QWEN_CODER_05B,
    QWEN_CODER_15B,
    TOY_LLM,
    TOY_SLM,
    LoadedModel,
    load_model,
)
from uhlm_jax.models.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_PAIR",
    "PAIR_SEPARATOR",
    "PAIRS",
    "ModelPair",
    "known_pairs",
    "load_pair",
    "pair_from_models",
]

# Named pairs: name -> (SLM, LLM) model names understood by `load_model`.
PAIRS: dict[str, tuple[str, str]] = {
    "toy": (TOY_SLM, TOY_LLM),
    "smollm2-exit": ("smollm2-exit-draft", "smollm2-135m-instruct"),
    # Two independently trained models over one tokenizer: 0.5B drafts, 1.5B verifies
    # (`make qwen` installs them).
    "qwen-coder": (QWEN_CODER_05B, QWEN_CODER_15B),
}
# The default pair: SmolLM2-135M-Instruct verifying its early-exit draft (both offline).
DEFAULT_PAIR = "smollm2-exit"
# `load_pair("SLM,LLM")` makes a pair of two models given by name or path.
PAIR_SEPARATOR = ","


@dataclasses.dataclass(frozen=True)
class ModelPair:
    """A small and a large model over one vocabulary.

    Attributes:
        name: the pair's name, or "SLM+LLM" for a pair made from two models.
        slm: the on-device draft model.
        llm: the remote verifier.
        tokenizer: the shared tokenizer.
    """

    name: str
    slm: ModelParams
    llm: ModelParams
    tokenizer: Tokenizer

    def __post_init__(self):
        slm_v, llm_v = self.slm.config.vocab_size, self.llm.config.vocab_size
        if slm_v != llm_v:
            raise ValueError(
                f"Pair {self.name!r}: the SLM's vocabulary has {slm_v} ids and the LLM's "
                f"{llm_v}; speculative verification needs one shared vocabulary. Pick two "
                "models trained with the same tokenizer."
            )
        self.tokenizer.check_fits(slm_v, where=self.name)


def known_pairs() -> tuple[str, ...]:
    """Names `load_pair` resolves."""
    return tuple(PAIRS)


def pair_from_models(slm: LoadedModel, llm: LoadedModel, name: str | None = None) -> ModelPair:
    """Makes a pair of two loaded models, checking that their tokenizers agree.

    Raises:
        ValueError: naming both models, if their vocabularies or tokenizers differ.
    """
    name = name or f"{slm.name}+{llm.name}"
    a, b = slm.tokenizer, llm.tokenizer
    if a.vocab_size != b.vocab_size or a.backend.get_vocab() != b.backend.get_vocab():
        raise ValueError(
            f"Pair {name!r}: {slm.name} and {llm.name} have different tokenizers "
            f"({a.vocab_size} and {b.vocab_size} ids); a pair must share one tokenizer."
        )
    return ModelPair(name=name, slm=slm.params, llm=llm.params, tokenizer=llm.tokenizer)


def load_pair(name_or_slm: str, llm: str | None = None, dtype: Any = jnp.float32) -> ModelPair:
    """Loads a named pair, or a pair of two models.

    Args:
        name_or_slm: a name from `known_pairs()`; `"SLM,LLM"`, two models by name or path
            (e.g. `"tinyllama.gguf,llama-2-7b-hf/"`); or the SLM's name or path when `llm`
            is given.
        llm: the LLM's name or path, for a pair made from two models.
        dtype: parameter dtype.

    Raises:
        ValueError: for an unknown pair name (listing the known ones) or mismatched models.
    """
    if llm is None and PAIR_SEPARATOR in name_or_slm:
        slm_spec, llm_spec = name_or_slm.split(PAIR_SEPARATOR, 1)
        return pair_from_models(
            load_model(slm_spec, dtype), load_model(llm_spec, dtype), name=name_or_slm
        )
    if llm is None:
        if name_or_slm not in PAIRS:
            raise ValueError(
                f"Unknown pair {name_or_slm!r}. Known pairs: {', '.join(known_pairs())}; or "
                f"give two models as 'SLM{PAIR_SEPARATOR}LLM' (each a model name, a .gguf "
                "file or a Hugging Face folder)."
            )
        slm_name, llm_name = PAIRS[name_or_slm]
        return pair_from_models(
            load_model(slm_name, dtype), load_model(llm_name, dtype), name=name_or_slm
        )
    return pair_from_models(load_model(name_or_slm, dtype), load_model(llm, dtype))
