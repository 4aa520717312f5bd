"""Train the exit head of an early-exit draft by distilling the full model (`uhlm train-draft`).

The draft is the full model's first L layers, one trainable decoder layer (the exit
block) and a trainable final RMSNorm in front of the shared output head
(`uhlm_jax.models.early_exit`). Training data are offline:

1. the full model's own replies to the `train` prompts of the prompt file (chat template
   applied, `samples_per_prompt` replies each, sampled at `temperature`, at most
   `max_new_tokens` tokens), together with the prompts;
2. since the first L layers are frozen, one pass of the full model per sequence gives the
   layer-L hidden states (the exit block's input) and the final-normed hidden states (the
   teacher; its logits are recomputed per batch instead of stored).

The adapter in front of the shared output head starts as the least-squares map from the
draft's normed exit-block output to the teacher's final hidden state (closed form; see
`least_squares_adapter`). The loss is the mean over reply positions (those the draft is
used on) of a divergence of teacher `p` and draft `q` at temperature 1 (`Divergence`:
forward KL, TV or their sum), minimised with AdamW (warm-up, cosine decay, gradient
clipping); the output head runs only on those positions.
Orbax checkpoints in `workdir` let an interrupted run continue where it stopped
(`--resume`) to the same head as an uninterrupted run; the sampled sequences and their
hidden states are cached there too.

Acceptance is measured on the full model's replies to the held-out prompts (splits other
than `train`): the mean over reply positions of `1 − TV(p, q)`, the expected acceptance of
speculative verification, with a standard error clustered by reply. It is measured for
the initial head and for the trained head as written to `output` (float16), and stored
next to it in a JSON file, together with how well the draft's uncertainty predicts the
full model's rejection on the same replies (`Link`: r(u, β), the line `β ≈ a·u + b` and
the skip shares of two thresholds), the statistics a calibration run of the pair fits.

Reproduce the embedded head with
`uhlm train-draft --output uhlm_jax/data/smollm2_exit_head.safetensors`.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from calibration.prompts import Prompt, embedded_prompts_path, read_prompts
from calibration.run_dir import write_json
from uhlm_jax import cli_config, console
from uhlm_jax.files import AtomicFile
from uhlm_jax.models.early_exit import (
    ExitHead,
    draft_flops_fraction,
    exit_hidden,
    exit_logits,
    init_exit_head,
    layer_hidden_states,
    load_exit_head,
    save_exit_head,
)
from uhlm_jax.models.llama import ModelParams, output_logits
from uhlm_jax.models.registry import DType
from uhlm_jax.models.tokenizer import Tokenizer
from uhlm_jax.sampling import ReplyConfig, generate_replies, pad_rows, padded_length
from uhlm_jax.speculative import rejection_probability, total_variation
from uhlm_jax.threshold import (
    PaperRule,
    paper_threshold,
    risk_bounded_index,
    risk_curve,
    threshold_grid,
)
from uhlm_jax.uncertainty import TemperaturePerturbation

DEFAULT_MODEL = "smollm2-135m-instruct"
TRAIN_SPLIT = "train"
# Sequences are padded to a multiple of this, so few shapes are compiled.
_PAD_MULTIPLE = 32
# Rows per batch of the sampling and feature passes.
_SAMPLE_BATCH = 36
_FEATURE_BATCH = 4
# The loss positions of a training batch are padded to a multiple of this.
_COLUMN_MULTIPLE = 128
# Next to a run's checkpoints: optimiser seconds spent up to each checkpointed step.
_SECONDS_FILE = "train_seconds.json"


class AdapterInit(enum.Enum):
    """How the exit head's adapter is initialised before distillation.

    IDENTITY: the identity (with the exit block copied from layer L, the plain early exit).
    LEAST_SQUARES: ridge regression of the teacher's final-normed hidden state on the
        draft's normed exit-block output over the training positions (a tuned lens,
        closed form; see `least_squares_adapter`).
    """

    IDENTITY = "identity"
    LEAST_SQUARES = "least-squares"

    def __str__(self) -> str:
        return self.value


class Divergence(enum.Enum):
    """The distillation loss per position, teacher `p`, draft `q`.

    KL: `KL(p || q) = Σ_v p_v (log p_v − log q_v)` (forward KL, mass-covering: the draft
        is pushed to be uncertain where the full model is).
    TV: `TV(p, q) = ½ Σ_v |p_v − q_v|`, one minus the acceptance that is measured; it
        rewards matching the mode and leaves the draft's confidence elsewhere free.
    KL_TV: `KL(p || q) + TV(p, q)`.
    """

    KL = "kl"
    TV = "tv"
    KL_TV = "kl+tv"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one training run.

    Attributes:
        model: the full model (a name or path `load_model` accepts).
        prompts: prompt file (`calibration.prompts`); the `train` split trains, the
            others measure acceptance.
        exit_layer: L, the full model's layers kept by the draft.
        source_layer: the full model's layer that initialises the exit block (default L).
        adapter_init: how the adapter starts (see `AdapterInit`).
        divergence: the distillation loss (see `Divergence`).
        ridge: ridge penalty of the least-squares adapter, relative to the mean squared
            norm of its inputs (`λ = ridge · tr(XᵀX) / h`).
        samples_per_prompt: replies sampled per training prompt.
        max_new_tokens: most reply tokens per sample.
        temperature: sampling temperature of the replies (> 0).
        epochs: passes over the training sequences.
        batch_size: sequences per optimiser step.
        learning_rate: peak AdamW learning rate.
        norm_lr_multiplier: learning-rate factor of the final norm's scale.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        seed: seed of sampling and shuffling.
        workdir: folder for the cached sequences and the orbax checkpoints.
        output: the exit-head safetensors file to write (a JSON sidecar goes next to it).
        checkpoint_every: optimiser steps between checkpoints.
        max_steps: stop after this many steps in total (None: all epochs); a later run with
            the same workdir resumes.
        max_heldout: use at most this many held-out prompts (None: all).
        max_train_prompts: use at most this many training prompts (None: all).
        dtype: parameter dtype of the full model (and so of the draft).
        resume: continue the interrupted (or finished) run of these settings from its
            last checkpoint in `workdir`; without it, a run whose checkpoints exist stops
            with a message instead of silently continuing.
    """

    model: str = DEFAULT_MODEL
    prompts: str = dataclasses.field(default_factory=embedded_prompts_path)
    exit_layer: int = 19
    source_layer: int | None = None
    adapter_init: AdapterInit = AdapterInit.LEAST_SQUARES
    ridge: float = 1e-4
    divergence: Divergence = Divergence.KL
    samples_per_prompt: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.8
    epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 5e-4
    norm_lr_multiplier: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    workdir: str = "runs/train-draft"
    output: str = "runs/train-draft/exit_head.safetensors"
    checkpoint_every: int = 25
    max_steps: int | None = None
    max_heldout: int | None = None
    max_train_prompts: int | None = None
    dtype: DType = "float32"
    resume: bool = False

    def __post_init__(self):
        positive = (
            "samples_per_prompt",
            "max_new_tokens",
            "epochs",
            "batch_size",
            "checkpoint_every",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}.")
        if not isinstance(self.exit_layer, int) or self.exit_layer < 0:
            raise ValueError(
                f"Config.exit_layer must be a non-negative int, got {self.exit_layer!r}."
            )
        if not isinstance(self.adapter_init, AdapterInit):
            raise ValueError(
                f"Config.adapter_init must be an AdapterInit, got {self.adapter_init!r}; "
                f"one of {[m.value for m in AdapterInit]}."
            )
        if not isinstance(self.divergence, Divergence):
            raise ValueError(
                f"Config.divergence must be a Divergence, got {self.divergence!r}; "
                f"one of {[m.value for m in Divergence]}."
            )
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"Config.ridge must be a finite number >= 0, got {self.ridge!r}.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"Config.temperature must be a positive number, got {self.temperature!r}."
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"Config.learning_rate must be positive, got {self.learning_rate!r}.")
        if not (self.norm_lr_multiplier > 0 and math.isfinite(self.norm_lr_multiplier)):
            raise ValueError(
                f"Config.norm_lr_multiplier must be positive, got {self.norm_lr_multiplier!r}."
            )
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"Config.weight_decay ({self.weight_decay!r}) and warmup_steps "
                f"({self.warmup_steps!r}) must be >= 0."
            )
        for name in ("max_steps", "max_heldout", "max_train_prompts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"Config.{name} must be a positive int or None, got {value!r}.")
        if not os.path.isfile(self.prompts):
            raise ValueError(f"Config.prompts: no such file {self.prompts!r}; pass a JSONL file.")


class Sequences(NamedTuple):
    """Token sequences: prompt (chat template applied) followed by a sampled reply.

    Attributes:
        tokens: per sequence, int32 ids `[t_i]`.
        prompt_lengths: per sequence, the number of prompt ids.
    """

    tokens: list[np.ndarray]
    prompt_lengths: list[int]


class Features(NamedTuple):
    """Per sequence: layer-L hidden states `[t_i, h]` and teacher hidden states `[t_i, h]`."""

    hidden: list[np.ndarray]
    final: list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Mean `1 − TV(p, q)` over reply positions of held-out sequences.

    Attributes:
        mean: the acceptance.
        se: its standard error, clustered by sequence.
        tokens: number of positions averaged.
        sequences: number of sequences.
    """

    mean: float
    se: float
    tokens: int
    sequences: int


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of a run."""

    exit_layer: int
    steps: int
    final_loss: float
    acceptance_initial: Acceptance
    acceptance_least_squares: Acceptance | None
    acceptance_trained: Acceptance
    link: Link
    flops_fraction: float
    train_tokens: int
    data_s: float
    train_s: float
    output: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Data.


def train_and_heldout(path: str) -> tuple[list[Prompt], list[Prompt]]:
    """The prompts of a prompt file in the `train` split, and all the others (held out).

    Raises:
        ValueError: naming the file, if either part is empty.
    """
    prompts = read_prompts(path)
    train = [p for p in prompts if p.split == TRAIN_SPLIT]
    heldout = [p for p in prompts if p.split != TRAIN_SPLIT]
    for name, part in (("train", train), ("held-out", heldout)):
        if not part:
            raise ValueError(
                f"{path} has no {name} prompts; give the training prompts split "
                f"{TRAIN_SPLIT!r} and the held-out prompts another split."
            )
    return train, heldout


def subset(sequences: Sequences, features: Features, index: Sequence[int]):
    """The sequences and features at `index`."""
    return (
        Sequences(
            tokens=[sequences.tokens[i] for i in index],
            prompt_lengths=[sequences.prompt_lengths[i] for i in index],
        ),
        Features(
            hidden=[features.hidden[i] for i in index],
            final=[features.final[i] for i in index],
        ),
    )


_generate_replies_jit = jax.jit(generate_replies, static_argnames=("config", "max_new_tokens"))


def sample_sequences(
    params: ModelParams,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    progress: bool = True,
) -> Sequences:
    """The full model's replies to `prompts` (as chat messages, see
    `Tokenizer.prompt_text`), with the prompts.

    Batch `j` of sample round `r` uses the key `fold_in(fold_in(key(seed), r), j)`.
    """
    encoded = [np.asarray(tokenizer.encode(tokenizer.prompt_text(p)), np.int32) for p in prompts]
    config = ReplyConfig(num_ids=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids)
    base = jax.random.key(seed)
    tokens, prompt_lengths = [], []
    batches = [
        (r, j, encoded[j * _SAMPLE_BATCH : (j + 1) * _SAMPLE_BATCH])
        for r in range(samples_per_prompt)
        for j in range(-(-len(encoded) // _SAMPLE_BATCH))
    ]
    for r, j, rows in console.progress(
        batches, desc="sampling replies", unit="batch", quiet=not progress
    ):
        length = padded_length(max(len(x) for x in rows), _PAD_MULTIPLE)
        key = jax.random.fold_in(jax.random.fold_in(base, r), j)
        new, reply_lengths = _generate_replies_jit(
            params,
            jnp.asarray(pad_rows(rows, length)),
            jnp.asarray([len(x) for x in rows], jnp.int32),
            key,
            jnp.asarray(temperature, jnp.float32),
            config=config,
            max_new_tokens=max_new_tokens,
        )
        new, reply_lengths = np.asarray(new), np.asarray(reply_lengths)
        for row, reply, n in zip(rows, new, reply_lengths, strict=True):
            tokens.append(np.concatenate([row, reply[:n]]).astype(np.int32))
            prompt_lengths.append(len(row))
    return Sequences(tokens=tokens, prompt_lengths=prompt_lengths)


def cached_sequences(workdir: str, name: str, fingerprint: dict, make) -> Sequences:
    """Loads sequences from `workdir/name.npz` if made with the same settings, else makes them."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(workdir, f"{name}-{digest}.npz")
    if os.path.isfile(path):
        with np.load(path) as data:
            flat, offsets, prompt_lengths = data["tokens"], data["offsets"], data["prompt_lengths"]
        tokens = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return Sequences(tokens=tokens, prompt_lengths=[int(n) for n in prompt_lengths])
    sequences = make()
    offsets = np.cumsum([0] + [len(x) for x in sequences.tokens])
    with AtomicFile(path) as f:
        np.savez(
            f,
            tokens=np.concatenate(sequences.tokens),
            offsets=offsets,
            prompt_lengths=np.asarray(sequences.prompt_lengths),
        )
    return sequences


_hidden_states_jit = jax.jit(layer_hidden_states, static_argnames=("exit_layers",))


def compute_features(
    params: ModelParams,
    sequences: Sequences,
    exit_layers: Sequence[int],
    progress: bool = True,
) -> dict[int, Features]:
    """Layer-L and final-normed hidden states of every sequence, for each L (one pass)."""
    exit_layers = tuple(sorted(set(exit_layers)))
    hidden = {layer: [] for layer in exit_layers}
    final = []
    order = np.argsort([len(x) for x in sequences.tokens])
    rows_of = {}
    for start in console.progress(
        range(0, len(order), _FEATURE_BATCH), desc="hidden states", unit="batch",
        quiet=not progress,
    ):
        index = order[start : start + _FEATURE_BATCH]
        rows = [sequences.tokens[i] for i in index]
        lengths = np.asarray([len(x) for x in rows], np.int32)
        states = _hidden_states_jit(
            params,
            jnp.asarray(pad_rows(rows, padded_length(int(lengths.max()), _PAD_MULTIPLE))),
            jnp.asarray(lengths),
            exit_layers=exit_layers,
        )
        exits, last = np.asarray(states.exits), np.asarray(states.final)
        for r, (i, n) in enumerate(zip(index, lengths, strict=True)):
            rows_of[int(i)] = (exits[:, r, :n], last[r, :n])
    for i in range(len(sequences.tokens)):
        exits, last = rows_of[i]
        final.append(last)
        for k, layer in enumerate(exit_layers):
            hidden[layer].append(exits[k])
    return {layer: Features(hidden=hidden[layer], final=final) for layer in exit_layers}


def cached_features(
    workdir: str,
    name: str,
    fingerprint: dict,
    params: ModelParams,
    sequences: Sequences,
    exit_layer: int,
    progress: bool = True,
) -> Features:
    """`compute_features` for one L, stored in `workdir/name-features-L<L>-<hash>.npz` and
    reused when the sequences' settings (`fingerprint`) and the dtype are the same."""
    key = {**fingerprint, "exit_layer": exit_layer, "dtype": str(params.dtype)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(workdir, f"{name}-features-L{exit_layer}-{digest}.npz")
    offsets = np.cumsum([0] + [len(x) for x in sequences.tokens])
    if os.path.isfile(path):
        with np.load(path) as data:
            hidden, final = data["hidden"], data["final"]
        if len(hidden) == offsets[-1]:
            pieces = list(zip(offsets[:-1], offsets[1:], strict=True))
            return Features(
                hidden=[hidden[a:b] for a, b in pieces], final=[final[a:b] for a, b in pieces]
            )
    features = compute_features(params, sequences, [exit_layer], progress)[exit_layer]
    with AtomicFile(path) as f:
        np.savez(f, hidden=np.concatenate(features.hidden), final=np.concatenate(features.final))
    return features


# ---------------------------------------------------------------------------------------
# Loss, acceptance and training.


def _draft_states_at(
    params: ModelParams,
    head: ExitHead,
    hidden: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
    index: Int[Array, " n"],
) -> Float[Array, "n h"]:
    """The draft's final hidden states at the flat columns `index` of `b · t`: the exit
    block runs on every column (attention needs them), the output head need not."""
    draft = exit_hidden(params, head, hidden, lengths)
    return draft.reshape(-1, draft.shape[-1])[index]


def distillation_loss(
    head: ExitHead,
    params: ModelParams,
    hidden: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
    index: Int[Array, " n"],
    final: Float[Array, "n h"],
    weights: Float[Array, " n"],
    divergence: Divergence = Divergence.KL,
) -> Float[Array, ""]:
    """Weighted mean over positions of a divergence of teacher `p` and draft `q`
    (temperature 1; see `Divergence`), from log-softmaxed float32 logits. The exit block
    runs on every column (attention needs them); the output head only on the `n` columns
    the loss uses, which is most of the cost.

    Args:
        head: the exit head (differentiated).
        params: the full model.
        hidden: `[b, t, h]` layer-L states of right-padded rows.
        lengths: `[b]` real tokens per row.
        index: `[n]` flat column indices into `b · t` (row-major) of the loss positions.
        final: `[n, h]` the teacher's final-normed hidden states at those columns.
        weights: `[n]` position weights (0 for padding entries of `index`).
        divergence: the loss per position (static).
    """
    draft = _draft_states_at(params, head, hidden, lengths, index)
    log_q = jax.nn.log_softmax(output_logits(params, draft), axis=-1)
    log_p = jax.nn.log_softmax(output_logits(params, final), axis=-1)
    tv = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    loss = {Divergence.TV: tv, Divergence.KL: kl, Divergence.KL_TV: kl + tv}[divergence]
    return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _acceptance_batch(
    head: ExitHead,
    params: ModelParams,
    hidden: Float[Array, "b t h"],
    final: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
) -> Float[Array, "b t"]:
    log_q = jax.nn.log_softmax(exit_logits(params, head, hidden, lengths), axis=-1)
    log_p = jax.nn.log_softmax(output_logits(params, final), axis=-1)
    tv = jax.vmap(jax.vmap(total_variation))(log_q, log_p)
    return 1.0 - tv


_acceptance_batch_jit = jax.jit(_acceptance_batch)


def _reply_weights(lengths: Sequence[int], prompt_lengths: Sequence[int], t: int) -> np.ndarray:
    """`[b, t]`: 1 where column j predicts a reply token (prompt_len − 1 <= j < len − 1)."""
    columns = np.arange(t)[None, :]
    start = np.asarray(prompt_lengths)[:, None] - 1
    stop = np.asarray(lengths)[:, None] - 1
    return ((columns >= start) & (columns < stop)).astype(np.float32)


def _batch_starts(n: int, desc: str, progress: bool):
    """Start indices of the measurement batches, with a progress line when asked."""
    return console.progress(
        range(0, n, _FEATURE_BATCH), desc=desc, unit="batch", quiet=not progress
    )


def measure_acceptance(
    params: ModelParams,
    head: ExitHead,
    sequences: Sequences,
    features: Features,
    progress: bool = False,
    desc: str = "acceptance",
) -> Acceptance:
    """Mean `1 − TV(p, q)` over the reply positions of `sequences`.

    The standard error treats sequences as clusters (see `clustered_mean`).
    """
    sums, counts = [], []
    n = len(sequences.tokens)
    for start in _batch_starts(n, desc, progress):
        index = range(start, min(n, start + _FEATURE_BATCH))
        lengths = [len(sequences.tokens[i]) for i in index]
        t = padded_length(max(lengths), _PAD_MULTIPLE)
        values = np.asarray(
            _acceptance_batch_jit(
                head,
                params,
                jnp.asarray(pad_rows([features.hidden[i] for i in index], t)),
                jnp.asarray(pad_rows([features.final[i] for i in index], t)),
                jnp.asarray(lengths, jnp.int32),
            )
        )
        weights = _reply_weights(lengths, [sequences.prompt_lengths[i] for i in index], t)
        sums.extend((values * weights).sum(axis=1).tolist())
        counts.extend(weights.sum(axis=1).tolist())
    mean, se = clustered_mean(np.asarray(sums), np.asarray(counts))
    return Acceptance(mean=mean, se=se, tokens=int(np.sum(counts)), sequences=len(sums))


@dataclasses.dataclass(frozen=True)
class Link:
    """How well the draft's uncertainty predicts rejection, on held-out sequences.

    At every reply position the draft drafts `d ~ q` (temperature 1), the full model's
    rejection probability of it is `β = max(0, 1 − p_d/q_d)` and `u` is U-HLM's
    temperature-perturbation uncertainty of the draft (`K = 20`, `θ_max = 2`), the
    quantities a calibration run records, here on the full model's replies (teacher
    forcing) instead of the hybrid's own. Intervals are percentile intervals of a
    bootstrap over sequences (tokens of one reply are not independent).

    Attributes:
        r, r_se, r_interval: Pearson correlation of `u` and `β`, its bootstrap standard
            error and 90% interval.
        slope, slope_se, slope_interval, intercept, intercept_se, intercept_interval:
            least squares `β ≈ a·u + b`, likewise.
        risk_averse: the paper's risk-averse threshold `−b/a`, clipped to [0, 1]
            (NaN if `a ≤ 0`).
        risk_averse_skip: the share of tokens with `u` at or below it.
        risk_bounded: the largest grid threshold whose per-token risk is at most
            `risk` in a share ≥ `confidence` of the bootstrap draws (−1: none).
        risk_bounded_skip: the share of tokens it skips.
        tokens, sequences: what was measured.
    """

    r: float
    r_se: float
    r_interval: tuple[float, float]
    slope: float
    slope_se: float
    slope_interval: tuple[float, float]
    intercept: float
    intercept_se: float
    intercept_interval: tuple[float, float]
    risk_averse: float
    risk_averse_skip: float
    risk_bounded: float
    risk_bounded_skip: float
    tokens: int
    sequences: int


def _link_batch(
    head: ExitHead,
    params: ModelParams,
    hidden: Float[Array, "b t h"],
    lengths: Int[Array, " b"],
    index: Int[Array, " n"],
    final: Float[Array, "n h"],
    key: Array,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """`(u, β)` at the `n` flat columns `index` of a batch (see `Link`); `final` holds the
    teacher's hidden states at those columns."""
    draft = _draft_states_at(params, head, hidden, lengths, index)
    keys = jax.random.split(key, index.shape[0])
    measure = TemperaturePerturbation()

    def one(inputs):
        key, draft, final = inputs
        logits = output_logits(params, draft)
        log_q = jax.nn.log_softmax(logits)
        log_p = jax.nn.log_softmax(output_logits(params, final))
        draft_key, measure_key = jax.random.split(key)
        token = jax.random.categorical(draft_key, log_q)
        u = measure(measure_key, logits, log_q, token)
        return u, rejection_probability(log_q, log_p, token)

    # In slices of positions: the K tempered sums over the vocabulary of every position
    # at once would not fit in memory.
    return jax.lax.map(one, (keys, draft, final), batch_size=64)


_link_batch_jit = jax.jit(_link_batch)


def _weighted_line(
    u: np.ndarray, beta: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares slope, intercept and Pearson r; one per row of `weight`."""
    total = weight.sum(axis=-1)
    mu, mb = weight @ u / total, weight @ beta / total
    cuu = weight @ (u * u) / total - mu**2
    cub = weight @ (u * beta) / total - mu * mb
    cbb = weight @ (beta * beta) / total - mb**2
    with np.errstate(divide="ignore", invalid="ignore"):  # constant u or β: NaN
        slope = cub / cuu
        return slope, mb - slope * mu, cub / np.sqrt(cuu * cbb)


def link_samples(
    params: ModelParams,
    head: ExitHead,
    sequences: Sequences,
    features: Features,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(u, β, sequence index)` at every reply position of `sequences` (see `Link`)."""
    u, beta, owner = [], [], []
    n = len(sequences.tokens)
    for start in _batch_starts(n, "uncertainty and rejection", progress):
        index = range(start, min(n, start + _FEATURE_BATCH))
        lengths = [len(sequences.tokens[i]) for i in index]
        t = padded_length(max(lengths), _PAD_MULTIPLE)
        reply = _reply_weights(lengths, [sequences.prompt_lengths[i] for i in index], t)
        columns, weights = _loss_columns(reply)
        final = pad_rows([features.final[i] for i in index], t)
        batch_u, batch_beta = _link_batch_jit(
            head,
            params,
            jnp.asarray(pad_rows([features.hidden[i] for i in index], t)),
            jnp.asarray(lengths, jnp.int32),
            jnp.asarray(columns),
            jnp.asarray(final.reshape(-1, final.shape[-1])[columns]),
            jax.random.fold_in(jax.random.key(seed), start),
        )
        keep = weights > 0
        u.append(np.asarray(batch_u)[keep])
        beta.append(np.asarray(batch_beta)[keep])
        owner.append(start + columns[keep] // t)
    return tuple(np.concatenate(x) for x in (u, beta, owner))


def measure_link(
    params: ModelParams,
    head: ExitHead,
    sequences: Sequences,
    features: Features,
    seed: int = 0,
) -> Link:
    """The `Link` of `head` over the reply positions of `sequences`."""
    return summarize_link(*link_samples(params, head, sequences, features, seed), seed=seed)


def summarize_link(
    u: np.ndarray,
    beta: np.ndarray,
    owner: np.ndarray,
    seed: int = 0,
    risk: float = 0.05,
    confidence: float = 0.9,
    num_bootstrap: int = 1000,
    grid_size: int = 101,
) -> Link:
    """The `Link` of `link_samples`' output (`owner`: each token's sequence)."""
    _, owner = np.unique(owner, return_inverse=True)
    n = int(owner.max()) + 1
    u64, beta64 = u.astype(np.float64), beta.astype(np.float64)

    slope, intercept, r = _weighted_line(u64, beta64, np.ones((1, len(u))))
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), num_bootstrap)
    weight = counts[:, owner].astype(np.float64)
    draws = np.stack(_weighted_line(u64, beta64, weight))
    (slope_lo, intercept_lo, r_lo), (slope_hi, intercept_hi, r_hi) = (
        np.percentile(draws, q, axis=1) for q in (5.0, 95.0)
    )
    slope_se, intercept_se, r_se = np.std(draws, axis=1, ddof=1)

    paper = paper_threshold(PaperRule.RISK_AVERSE, float(slope[0]), float(intercept[0]))
    grid = threshold_grid(grid_size)
    curves = jax.vmap(risk_curve, in_axes=(None, None, None, 0))(
        jnp.asarray(beta), jnp.asarray(u), grid, jnp.asarray(weight, jnp.float32)
    )
    index = int(risk_bounded_index(curves, jnp.float32(risk), jnp.float32(1.0 - confidence)))
    bounded = float(grid[index]) if index >= 0 else -1.0
    return Link(
        r=float(r[0]),
        r_se=float(r_se),
        r_interval=(float(r_lo), float(r_hi)),
        slope=float(slope[0]),
        slope_se=float(slope_se),
        slope_interval=(float(slope_lo), float(slope_hi)),
        intercept=float(intercept[0]),
        intercept_se=float(intercept_se),
        intercept_interval=(float(intercept_lo), float(intercept_hi)),
        risk_averse=paper.threshold,
        risk_averse_skip=float(np.mean(u <= paper.threshold)),
        risk_bounded=bounded,
        risk_bounded_skip=float(np.mean(u <= bounded)),
        tokens=len(u),
        sequences=n,
    )


_exit_hidden_jit = jax.jit(exit_hidden)


def least_squares_adapter(
    params: ModelParams,
    head: ExitHead,
    sequences: Sequences,
    features: Features,
    ridge: float,
) -> ExitHead:
    """`head` with its adapter fitted by ridge regression (closed form).

    With `X [n, h]` the draft's normed exit-block output (`exit_hidden` with the identity
    adapter) and `Y [n, h]` the teacher's final-normed hidden state at the `n` training
    positions, the adapter is `A = (XᵀX + λ I)⁻¹ XᵀY` with `λ = ridge · tr(XᵀX) / h`,
    accumulated and solved in float64. It minimises the squared error of the output
    head's input, a cheap stand-in for the KL that training then minimises.

    Args:
        params: the full model.
        head: the exit head (its adapter is replaced).
        sequences: the training sequences.
        features: their hidden states.
        ridge: relative ridge penalty (>= 0).

    Returns:
        The head with the fitted adapter, in the parameter dtype.
    """
    h = params.config.hidden_size
    identity = head.replace(adapter={"kernel": jnp.eye(h, dtype=params.dtype)})
    xtx, xty = np.zeros((h, h)), np.zeros((h, h))
    n = len(sequences.tokens)
    for start in range(0, n, _FEATURE_BATCH):
        index = range(start, min(n, start + _FEATURE_BATCH))
        lengths = [len(sequences.tokens[i]) for i in index]
        t = padded_length(max(lengths), _PAD_MULTIPLE)
        x = _exit_hidden_jit(
            params,
            identity,
            jnp.asarray(pad_rows([features.hidden[i] for i in index], t)),
            jnp.asarray(lengths, jnp.int32),
        )
        mask = _reply_weights(lengths, [sequences.prompt_lengths[i] for i in index], t) > 0
        x = np.asarray(x, np.float64)[mask]
        y = pad_rows([features.final[i] for i in index], t).astype(np.float64)[mask]
        xtx += x.T @ x
        xty += x.T @ y
    penalty = ridge * np.trace(xtx) / h
    kernel = np.linalg.solve(xtx + penalty * np.eye(h), xty)
    return head.replace(adapter={"kernel": jnp.asarray(kernel, params.dtype)})


def clustered_mean(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Ratio estimate `Σ a_i / Σ n_i` and its standard error with clusters `i`.

    `se² = m/(m−1) Σ_i (a_i − ā n_i)² / (Σ_i n_i)²` for `m` clusters (sequences).
    """
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    total = max(counts.sum(), 1.0)
    mean = sums.sum() / total
    m = len(sums)
    se = math.sqrt(m / max(m - 1, 1) * np.sum((sums - mean * counts) ** 2)) / total
    return float(mean), float(se)


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay to 10% of the peak, and clipping at norm 1;
    the final norm's steps are `cfg.norm_lr_multiplier` times larger."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, 1),
        end_value=0.1 * cfg.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
        _scale_norm_updates(cfg.norm_lr_multiplier),
    )


def _scale_norm_updates(multiplier: float) -> optax.GradientTransformation:
    """Multiplies the final norm's updates: its scale (about 1.8 for SmolLM2) sets the
    draft's confidence and moves by only about one learning rate per Adam step."""

    def update(updates: ExitHead, state, params=None):
        del params
        norm = jax.tree.map(lambda u: u * multiplier, updates.norm)
        return updates.replace(norm=norm), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _loss_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the nonzero entries of `weights [b, t]` and their weights, padded
    with index 0 and weight 0 to a multiple of `_COLUMN_MULTIPLE` (few compiled shapes)."""
    flat = np.flatnonzero(weights.reshape(-1))
    n = max(-(-len(flat) // _COLUMN_MULTIPLE), 1) * _COLUMN_MULTIPLE
    columns = np.zeros(n, np.int32)
    columns[: len(flat)] = flat
    values = np.zeros(n, np.float32)
    values[: len(flat)] = weights.reshape(-1)[flat]
    return columns, values


def _batches(cfg: Config, n: int) -> list[np.ndarray]:
    """Sequence indices of every step: one seeded permutation per epoch."""
    out = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        out.extend(order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    return out


def train_head(
    cfg: Config,
    params: ModelParams,
    head: ExitHead,
    sequences: Sequences,
    features: Features | None,
    checkpoint_dir: str,
    progress: bool = True,
) -> tuple[ExitHead, int, float]:
    """Trains `head` by distillation; resumes from the latest checkpoint in `checkpoint_dir`.

    `features` may be None when that checkpoint already holds the last step.

    Returns:
        The trained head, the number of steps done in total, the last step's loss, and
        the seconds spent in optimiser steps over all sessions of the run (an
        interrupted run's earlier sessions are read from `checkpoint_dir`).
    """
    import orbax.checkpoint as ocp
    batches = _batches(cfg, len(sequences.tokens))
    total = len(batches)
    optimizer = make_optimizer(cfg, total)
    opt_state = optimizer.init(head)

    def step_fn(head, opt_state, hidden, lengths, columns, final, weights):
        loss, grads = jax.value_and_grad(distillation_loss)(
            head, params, hidden, lengths, columns, final, weights, cfg.divergence
        )
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    step_jit = jax.jit(step_fn, donate_argnums=(0, 1))
    manager = ocp.CheckpointManager(
        os.path.abspath(checkpoint_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    done = 0
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(
            latest, args=ocp.args.StandardRestore({"head": head, "opt_state": opt_state})
        )
        head, opt_state, done = state["head"], state["opt_state"], int(latest)
    seconds_path = os.path.join(checkpoint_dir, _SECONDS_FILE)
    seconds = _training_seconds(seconds_path, done)
    started = time.perf_counter()
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    loss = float("nan")
    bar = console.progress(
        total=total, initial=done, desc=f"training L={head.exit_layer}", unit="step",
        quiet=not progress,
    )
    for step in range(done, stop):
        index = batches[step]
        lengths = [len(sequences.tokens[i]) for i in index]
        t = padded_length(max(lengths), _PAD_MULTIPLE)
        reply = _reply_weights(lengths, [sequences.prompt_lengths[i] for i in index], t)
        columns, weights = _loss_columns(reply)
        final = pad_rows([features.final[i] for i in index], t)
        final = final.reshape(len(index) * t, final.shape[-1])[columns]
        head, opt_state, loss_value = step_jit(
            head,
            opt_state,
            jnp.asarray(pad_rows([features.hidden[i] for i in index], t)),
            jnp.asarray(lengths, jnp.int32),
            jnp.asarray(columns),
            jnp.asarray(final),
            jnp.asarray(weights),
        )
        loss = float(loss_value)
        bar.set_postfix(**{cfg.divergence.value: f"{loss:.3f}"})
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
            manager.save(
                step + 1, args=ocp.args.StandardSave({"head": head, "opt_state": opt_state})
            )
            _record_seconds(seconds_path, step + 1, seconds + time.perf_counter() - started)
    bar.close()
    manager.wait_until_finished()
    manager.close()
    return head, stop, loss, seconds + time.perf_counter() - started


def _training_seconds(path: str, step: int) -> float:
    """Optimiser seconds spent up to checkpoint `step` by earlier sessions (0 if unknown)."""
    if step == 0 or not os.path.isfile(path):
        return 0.0
    with open(path) as f:
        return float(json.load(f).get(str(step), 0.0))


def _record_seconds(path: str, step: int, seconds: float) -> None:
    recorded = {}
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
    recorded[str(step)] = round(seconds, 1)
    write_json(path, recorded)


# ---------------------------------------------------------------------------------------
# The job.


def sequence_settings(cfg: Config) -> dict[str, Any]:
    """What determines the sampled sequences (the key of every cache in `workdir`)."""
    settings = {
        "model": cfg.model,
        "prompts": os.path.abspath(cfg.prompts),
        "samples_per_prompt": cfg.samples_per_prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "max_heldout": cfg.max_heldout,
        "max_train_prompts": cfg.max_train_prompts,
    }
    if cfg.dtype != "float32":  # keeps the caches of earlier float32 runs
        settings["dtype"] = cfg.dtype
    return settings


def heldout_settings(cfg: Config) -> dict[str, Any]:
    """What determines the held-out sequences: not the training data's size, so runs with
    more training replies are measured on the same held-out replies."""
    settings = sequence_settings(cfg)
    for name in ("samples_per_prompt", "max_train_prompts"):
        settings.pop(name)
    return {**settings, "part": "heldout"}


def load_sequences(cfg: Config, params: ModelParams, tokenizer: Tokenizer, progress: bool = True):
    """Training and held-out sequences, sampled once and cached in `cfg.workdir`.

    Held-out replies: one per prompt outside the `train` split, with seed `seed + 1`.
    """
    settings = sequence_settings(cfg)
    train_prompts, heldout_prompts = train_and_heldout(cfg.prompts)
    train_prompts = [p.text for p in train_prompts[: cfg.max_train_prompts]]
    heldout_prompts = [p.text for p in heldout_prompts[: cfg.max_heldout]]
    train = cached_sequences(
        cfg.workdir,
        "train",
        {**settings, "part": "train"},
        lambda: sample_sequences(
            params,
            tokenizer,
            train_prompts,
            cfg.samples_per_prompt,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.seed,
            progress,
        ),
    )
    heldout = cached_sequences(
        cfg.workdir,
        "heldout",
        heldout_settings(cfg),
        lambda: sample_sequences(
            params,
            tokenizer,
            heldout_prompts,
            1,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.seed + 1,
            progress,
        ),
    )
    return train, heldout


def checkpoint_dir(cfg: Config) -> str:
    """Orbax folder of a run: `workdir/checkpoints-L<L>-<hash of the training settings>`.

    Runs that differ in anything that changes the trained head use different folders, so
    only a rerun of the same settings resumes.
    """
    settings = {
        **sequence_settings(cfg),
        **{
            name: getattr(cfg, name)
            for name in (
                "exit_layer", "source_layer", "epochs", "batch_size", "learning_rate",
                "weight_decay", "warmup_steps",
            )
        },
    }  # fmt: skip
    if cfg.norm_lr_multiplier != 1.0:
        settings["norm_lr_multiplier"] = cfg.norm_lr_multiplier
    settings["adapter_init"] = cfg.adapter_init.value
    if cfg.divergence is not Divergence.KL:  # keeps the folders of earlier KL runs
        settings["divergence"] = cfg.divergence.value
    if cfg.adapter_init is AdapterInit.LEAST_SQUARES:
        settings["ridge"] = cfg.ridge
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cfg.workdir, f"checkpoints-L{cfg.exit_layer}-{digest}")


def _finished(cfg: Config, directory: str, num_sequences: int) -> bool:
    """Whether `directory` holds the checkpoint of the last step of `cfg`'s schedule."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return False
    total = len(_batches(cfg, num_sequences))
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        latest = manager.latest_step()
    return latest is not None and latest >= stop


def _check_resume(cfg: Config, directory: str) -> None:
    """Raises ValueError unless `--resume` matches whether `directory` holds checkpoints."""
    import orbax.checkpoint as ocp

    latest = None
    if os.path.isdir(directory):
        with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
            latest = manager.latest_step()
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{directory} holds a run with these settings, stopped at step {latest}; pass "
            "--resume to continue it, or delete that folder to start over."
        )
    if latest is None and cfg.resume:
        raise ValueError(
            f"Cannot resume: {directory} holds no checkpoint of a run with these settings; "
            "drop --resume."
        )


def sidecar_path(output: str) -> str:
    """The JSON file written next to an exit-head file."""
    return os.path.splitext(output)[0] + ".json"


def run(cfg: Config, progress: bool = True) -> Result:
    """Samples (or reuses) the data, trains, writes the head and its JSON, and measures."""
    from uhlm_jax.models.registry import load_model

    model = load_model(cfg.model, cfg.dtype)
    params = model.params
    if cfg.exit_layer >= params.config.num_layers:
        raise ValueError(
            f"Config.exit_layer={cfg.exit_layer} must be below the model's "
            f"{params.config.num_layers} layers."
        )
    checkpoints = checkpoint_dir(cfg)
    _check_resume(cfg, checkpoints)
    start = time.perf_counter()
    train, heldout = load_sequences(cfg, params, model.tokenizer, progress)
    least_squares = cfg.adapter_init is AdapterInit.LEAST_SQUARES
    settings = sequence_settings(cfg)
    if _finished(cfg, checkpoints, len(train.tokens)) and not least_squares:
        train_features = None  # nothing left to train
    else:
        train_features = cached_features(
            cfg.workdir, "train", {**settings, "part": "train"}, params, train, cfg.exit_layer,
            progress,
        )  # fmt: skip
    heldout_features = cached_features(
        cfg.workdir, "heldout", heldout_settings(cfg), params, heldout, cfg.exit_layer,
        progress,
    )  # fmt: skip
    data_s = time.perf_counter() - start

    head = init_exit_head(params, cfg.exit_layer, cfg.source_layer)
    initial = measure_acceptance(
        params, head, heldout, heldout_features, progress, "acceptance, untrained"
    )
    start = time.perf_counter()
    fitted = None
    if least_squares:
        head = least_squares_adapter(params, head, train, train_features, cfg.ridge)
        fitted = measure_acceptance(
            params, head, heldout, heldout_features, progress, "acceptance, least squares"
        )
    fit_s = time.perf_counter() - start
    head, steps, loss, optimiser_s = train_head(
        cfg, params, head, train, train_features, checkpoints, progress
    )
    train_s = fit_s + optimiser_s

    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    save_exit_head(cfg.output, head, params.config, metadata={"base_model": cfg.model})
    stored, _ = load_exit_head(cfg.output, params.config, params.dtype)
    trained = measure_acceptance(
        params, stored, heldout, heldout_features, progress, "acceptance, trained"
    )
    heldout_splits = [p.split for p in train_and_heldout(cfg.prompts)[1][: cfg.max_heldout]]
    u, beta, owner = link_samples(
        params, stored, heldout, heldout_features, cfg.seed, progress
    )
    link = summarize_link(u, beta, owner, cfg.seed)
    by_split, link_by_split = {}, {}
    for split in sorted(set(heldout_splits)):
        index = [i for i, s in enumerate(heldout_splits) if s == split]
        part = subset(heldout, heldout_features, index)
        by_split[split] = dataclasses.asdict(measure_acceptance(params, stored, *part))
        tokens = np.isin(owner, index)
        link_by_split[split] = dataclasses.asdict(
            summarize_link(u[tokens], beta[tokens], owner[tokens], cfg.seed)
        )
    result = Result(
        exit_layer=cfg.exit_layer,
        steps=steps,
        final_loss=loss,
        acceptance_initial=initial,
        acceptance_least_squares=fitted,
        acceptance_trained=trained,
        link=link,
        flops_fraction=draft_flops_fraction(params.config, cfg.exit_layer),
        train_tokens=int(sum(len(x) for x in train.tokens)),
        data_s=data_s,
        train_s=train_s,
        output=cfg.output,
    )
    config = dataclasses.asdict(cfg)
    config["adapter_init"] = cfg.adapter_init.value
    config["divergence"] = cfg.divergence.value
    config["prompts"] = os.path.basename(cfg.prompts)
    for name in ("workdir", "output", "resume"):
        config.pop(name)
    sidecar = {
        "exit_layer": cfg.exit_layer,
        "storage_dtype": "float16",
        "acceptance": trained.mean,
        "acceptance_se": trained.se,
        "heldout_tokens": trained.tokens,
        "heldout_sequences": trained.sequences,
        "acceptance_by_split": by_split,
        "acceptance_untrained": initial.mean,
        "acceptance_least_squares": None if fitted is None else fitted.mean,
        "link": dataclasses.asdict(link),
        "link_by_split": link_by_split,
        "flops_fraction": result.flops_fraction,
        "measurement": (
            "mean of 1 - TV(p, q) over the reply positions of the full model's replies to the "
            "prompts outside the train split (temperature-1 distributions; replies sampled at "
            "`temperature` with seed + 1); link: u (temperature perturbation, K = 20) and "
            "beta of a token drafted from q at each of those positions, with a bootstrap "
            "over replies (calibration.train_draft.Link)"
        ),
        "train_config": config,
        "steps": steps,
        "train_tokens": result.train_tokens,
        "final_loss": loss if math.isfinite(loss) else None,
        "train_s": round(train_s, 1),
    }
    write_json(sidecar_path(cfg.output), console.json_ready(sidecar))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `uhlm train-draft`; defaults are those of `Config`."""
    cli_config.add_arguments(parser, Config)
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    """Runs the job and prints the result."""
    cfg = cli_config.config_from_args(Config, args)
    result = run(cfg, progress=not args.quiet)
    if args.json:
        print(console.json_text(result.to_json(), indent=2))
        return 0
    a0, a1 = result.acceptance_initial, result.acceptance_trained
    fitted = result.acceptance_least_squares
    fitted_text = "" if fitted is None else f"least squares {fitted.mean:.3f} ± {fitted.se:.3f}, "
    print(
        f"exit layer {result.exit_layer}: {result.flops_fraction:.1%} of the full model's FLOPs\n"
        f"acceptance 1-TV on {a1.tokens} held-out tokens: untrained {a0.mean:.3f} ± {a0.se:.3f}, "
        f"{fitted_text}trained {a1.mean:.3f} ± {a1.se:.3f}\n"
        f"{_link_text(result.link)}\n"
        f"{result.steps} steps on {result.train_tokens} tokens in {result.train_s:.0f} s "
        f"(data {result.data_s:.0f} s); final {cfg.divergence.value} loss "
        f"{console.number(result.final_loss)}\n"
        f"wrote {result.output} and {sidecar_path(result.output)}"
    )
    return 0


def _link_text(link: Link) -> str:
    def bounded(t: float) -> str:
        return "none" if t < 0 else f"{t:.2f}"

    return (
        f"uncertainty vs rejection: r = {link.r:.2f} ± {link.r_se:.2f}, "
        f"beta ≈ {link.slope:.2f}·u {'+' if link.intercept >= 0 else '−'} "
        f"{abs(link.intercept):.2f} (intercept 90% interval "
        f"[{link.intercept_interval[0]:.2f}, {link.intercept_interval[1]:.2f}]); "
        f"risk-averse threshold {console.number(link.risk_averse, '.2f')} skips "
        f"{link.risk_averse_skip:.0%}, risk-bounded {bounded(link.risk_bounded)} skips "
        f"{link.risk_bounded_skip:.0%}"
    )
