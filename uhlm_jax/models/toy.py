"""A tiny, deterministic SLM/LLM pair over bytes, for tests and smoke runs.

The vocabulary is the 256 byte values plus four specials (`TOY_BOS_ID`, `TOY_EOS_ID`,
`TOY_PAD_ID`, `TOY_RESERVED_ID` = 256..259), so a byte-level tokenizer fits it.

The LLM is a 4-layer Llama-architecture decoder with random weights. Their scales are
chosen so that it behaves like a language model in the ways the library measures:
its next-token distributions are far from uniform (mean entropy about 2.7 nats, against
log 260 = 5.56), and they depend on the current token more than on the context. The SLM
is an early exit of the LLM, its first two layers with the LLM's final norm and head,
so the two agree partly, like a real pair: the mean expected acceptance 1 - TV(p, q)
over random byte contexts is about 0.6, and it varies from context to context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.llama import INIT_STD, ModelParams, init_params

TOY_BOS_ID = 256
TOY_EOS_ID = 257
TOY_PAD_ID = 258
TOY_RESERVED_ID = 259
TOY_VOCAB_SIZE = 260

TOY_SEED = 0
TOY_SLM_LAYERS = 2
TOY_LLM_CONFIG = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=TOY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    qkv_bias=False,
)
TOY_SLM_CONFIG = dataclasses.replace(TOY_LLM_CONFIG, num_layers=TOY_SLM_LAYERS)

# Standard deviations of the random weights. A large embedding relative to the layers'
# outputs keeps the early exit close to the full model; a large head makes the
# distributions peaked.
_EMBED_STD = 0.2
_LAYER_STD = 0.045
_HEAD_STD = 0.36


def toy_pair(dtype=jnp.float32) -> tuple[ModelParams, ModelParams]:
    """The toy SLM and LLM; the same arrays on every call.

    Args:
        dtype: storage and compute dtype of both models.

    Returns:
        `(slm, llm)`. The SLM shares the LLM's embedding, first `TOY_SLM_LAYERS` layers,
        final norm and head.
    """
    base = init_params(TOY_LLM_CONFIG, jax.random.key(TOY_SEED), jnp.float32)

    def rescale(tree, std):
        return jax.tree.map(lambda x: (x * (std / INIT_STD)).astype(dtype), tree)

    weights = {}
    for name, subtree in base.weights.items():
        if name == "embed_tokens":
            weights[name] = rescale(subtree, _EMBED_STD)
        elif name == "lm_head":
            weights[name] = rescale(subtree, _HEAD_STD)
        elif name.startswith("layers_"):
            weights[name] = {
                module: (
                    jax.tree.map(lambda x: x.astype(dtype), sub)
                    if module.endswith("layernorm")
                    else rescale(sub, _LAYER_STD)
                )
                for module, sub in subtree.items()
            }
        else:
            weights[name] = jax.tree.map(lambda x: x.astype(dtype), subtree)
    llm = ModelParams(config=TOY_LLM_CONFIG, weights=weights)
    kept = {f"layers_{i}" for i in range(TOY_SLM_LAYERS)}
    slm_weights = {
        name: subtree
        for name, subtree in weights.items()
        if not name.startswith("layers_") or name in kept
    }
    return ModelParams(config=TOY_SLM_CONFIG, weights=slm_weights), llm
