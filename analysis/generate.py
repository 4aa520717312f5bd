"""Continue a prompt with a named model or a checkpoint path.

`uhlm generate --prompt "What is the capital of France?"` loads SmolLM2-135M-Instruct
(`--model` takes any name or path `uhlm_jax.models.registry.load_model` accepts), wraps the
prompt in the model's chat template (skip it with `--no-chat`), prefills it, and decodes
one token per jitted step until a stop token or `--max-new-tokens`. Tokens are sampled at
`--temperature` (0 is greedy) from the `--top-k` most likely ids (0 keeps all), with keys
`fold_in(PRNGKey(seed), step)`. The reply is printed as it is produced, followed by the
decode rate; `--json` prints one JSON object instead.

Shapes: `b` = 1 row, `t` prompt tokens, `v` vocabulary (see `uhlm_jax.types`).
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from uhlm_jax import cli_config, console
from uhlm_jax.models.cache import init_cache
from uhlm_jax.models.registry import SMOLLM2_135M_INSTRUCT, DType, LoadedModel, load_model
from uhlm_jax.sampling import ReplyConfig, reply_step, start_replies

DEFAULT_PROMPT = "What is the capital of France?"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one generation.

    Attributes:
        model: a known model name or a path (`.gguf` file or Hugging Face folder).
        prompt: the user's message (or the raw text with `chat=False`).
        max_new_tokens: most tokens to generate.
        temperature: softmax temperature; 0 picks the most likely token.
        top_k: sample among the `top_k` most likely ids; 0 keeps all.
        seed: seed of the sampling keys.
        chat: wrap the prompt in the model's chat template as one user message.
        dtype: parameter dtype of the model.
    """

    model: str = SMOLLM2_135M_INSTRUCT
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    chat: bool = True
    dtype: DType = "float32"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty name or path, got {self.model!r}.")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {self.prompt!r}.")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or (
            self.max_new_tokens < 1
        ):
            raise ValueError(
                f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}."
            )
        if not isinstance(self.temperature, int | float) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 is greedy), got "
                f"{self.temperature!r}."
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 keeps all ids), got {self.top_k!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")


@dataclasses.dataclass(frozen=True)
class Result:
    """One generation.

    Attributes:
        model: the model's name or path.
        prompt_text: the text that was tokenized (after the chat template).
        prompt_ids: its token ids.
        token_ids: the generated ids, including the stop token if one was produced.
        text: the generated text, special tokens removed.
        stopped: whether generation ended at a stop token (else at `max_new_tokens`).
        prefill_s: seconds to run the prompt, compilation included.
        first_step_s: seconds of the first decode step, compilation included.
        decode_s: seconds of the other decode steps (0 if there were none).
    """

    model: str
    prompt_text: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    stopped: bool
    prefill_s: float
    first_step_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first (compiling) step; NaN with fewer than two tokens."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        d = dataclasses.asdict(self)
        d["prompt_ids"] = list(self.prompt_ids)
        d["token_ids"] = list(self.token_ids)
        d["tokens_per_s"] = self.tokens_per_s
        return d


# Jitted at the job boundary; shapes and the static reply settings key the compile cache.
_start_replies = jax.jit(start_replies)
_reply_step = jax.jit(reply_step, static_argnames=("config",), donate_argnames=("state",))


def generate(
    cfg: Config, model: LoadedModel, on_token: Callable[[int], None] | None = None
) -> Result:
    """Generates from an already loaded model.

    Args:
        cfg: the settings (`cfg.model` is only reported).
        model: params and tokenizer.
        on_token: called with each new id as soon as it is sampled (for streaming).

    Returns:
        The `Result`.

    Raises:
        ValueError: if the prompt encodes to no tokens or the model has no chat template
            and `cfg.chat` is set.
    """
    params, tokenizer = model.params, model.tokenizer
    if cfg.chat and tokenizer.chat_template is None:
        raise ValueError(
            f"Model {cfg.model!r} has no ChatML chat template; prompt it with plain text "
            "instead (generate --no-chat)."
        )
    text = tokenizer.prompt_text(cfg.prompt, cfg.chat)
    prompt_ids = tokenizer.encode(text)
    if not prompt_ids:
        raise ValueError("The prompt encodes to no tokens; pass a non-empty prompt.")
    t = len(prompt_ids)
    cache = init_cache(params.config, 1, t + cfg.max_new_tokens)
    start = time.perf_counter()
    state = _start_replies(
        params, jnp.asarray([prompt_ids], jnp.int32), jnp.asarray([t], jnp.int32), cache
    )
    state = jax.block_until_ready(state)
    prefill_s = time.perf_counter() - start

    reply_config = ReplyConfig(
        top_k=cfg.top_k, num_ids=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids
    )
    temperature = jnp.asarray(cfg.temperature, jnp.float32)
    base_key = jax.random.PRNGKey(cfg.seed)
    token_ids: list[int] = []
    first_step_s = decode_s = 0.0
    start = time.perf_counter()
    for i in range(cfg.max_new_tokens):
        state, record = _reply_step(
            params, state, jax.random.fold_in(base_key, i), temperature, config=reply_config
        )
        token_id = int(record.token[0])
        token_ids.append(token_id)
        if i == 0:  # the first step compiles; the decode rate excludes it
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
        if on_token is not None:
            on_token(token_id)
        if bool(state.done[0]):
            break
    if len(token_ids) > 1:
        decode_s = time.perf_counter() - start
    return Result(
        model=cfg.model,
        prompt_text=text,
        prompt_ids=tuple(prompt_ids),
        token_ids=tuple(token_ids),
        text=tokenizer.decode(token_ids),
        stopped=bool(state.done[0]),
        prefill_s=prefill_s,
        first_step_s=first_step_s,
        decode_s=decode_s,
    )


def run(cfg: Config, on_token: Callable[[int], None] | None = None) -> Result:
    """Loads `cfg.model` (cached per process) and generates."""
    return generate(cfg, load_model(cfg.model, cfg.dtype), on_token)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm generate` options."""
    cli_config.add_arguments(parser, Config)
    cli_config.add_output_flags(parser)


class _StreamPrinter:
    """Prints the decoded text as ids arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, model: LoadedModel, out):
        self._tokenizer = model.tokenizer
        self._out = out
        self._ids: list[int] = []
        self._printed = 0

    def __call__(self, token_id: int) -> None:
        self._ids.append(token_id)
        self._write(final=False)

    def finish(self) -> None:
        """Prints what was held back (bytes that never completed a character)."""
        self._write(final=True)

    def _write(self, final: bool) -> None:
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd") and not final:
            return
        self._out.write(text[self._printed :])
        self._out.flush()
        self._printed = len(text)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm generate`; returns the exit status."""
    cfg = cli_config.config_from_args(Config, args)
    model = load_model(cfg.model, cfg.dtype)
    if args.json:
        print(console.json_text(generate(cfg, model).to_json()))
        return 0
    printer = _StreamPrinter(model, sys.stdout)
    result = generate(cfg, model, printer)
    printer.finish()
    print()
    print(
        f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s decode; prompt "
        f"{len(result.prompt_ids)} tokens in {result.prefill_s:.2f} s; first step "
        f"{result.first_step_s:.2f} s]",
        file=sys.stderr,
    )
    return 0
