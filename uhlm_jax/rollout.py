"""Batched rollout of an SLM/LLM pair in every mode, as one `lax.scan`.

Prefill both models on the prompts, then scan one step per new token. A step maps
`(state, keys) -> (state, record)`: for every row it drafts a token from the SLM, measures
the SLM's uncertainty, decides whether to transmit, verifies transmitted drafts against
the LLM, and feeds the emitted token to both models.

The LLM runs on every token in every mode. That keeps both caches in step and records the
counterfactual rejection probability `beta` of tokens that were not transmitted; the
latency model (`uhlm_jax.channel`) charges LLM work only for transmitted tokens.

What is swept (threshold, transmit probability, temperatures) lives in `RolloutParams`,
whose leaves are traced arrays: `vmap` over them runs a sweep, and changing them never
recompiles. What changes shapes or control flow (mode, measures, top-k, steps) lives in the
static, hashable `RolloutConfig`.

Keys are `fold_in(fold_in(seed_key, prompt_id), step)`, so a row's tokens do not depend on
the other rows of its batch, and every mode and threshold sees the same random numbers for
the same prompt and step (common random numbers make sweeps less noisy).

Shapes (see `uhlm_jax.types`): `b` rows, `n` steps, `v` vocabulary, `m` measures.
"""
# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from uhlm_jax import sharding, speculative
from uhlm_jax.models.cache import KVCache, init_cache
from uhlm_jax.models.llama import ModelParams, Padding, decode, prefill
from uhlm_jax.modes import Mode, transmit_decision
from uhlm_jax.pair import ModelPair
from uhlm_jax.sampling import mask_unused_ids, pad_rows, padded_length, sample_token
from uhlm_jax.truncation import FixedK, ToleranceK, verify_compressed
from uhlm_jax.types import Array, ArrayLike, Bool, Float, Int
from uhlm_jax.uncertainty import DEFAULT_MEASURES, UncertaintyMeasure

__all__ = [
    "RolloutConfig",
    "RolloutParams",
    "RolloutState",
    "Records",
    "rollout",
    "step_keys",
    "check_prompt_fits",
    "RolloutOutput",
    "run_rollout",
    "sweep",
    "encode_prompts",
]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Static settings of a rollout: they fix shapes and control flow.

    Attributes:
        mode: how tokens are produced (`Mode`).
        max_new_tokens: scan steps `n`; a row stops earlier at a stop token.
        measures: uncertainty measures recorded for every token, in record column order.
        gate_measure: index into `measures` of the one U-HLM compares to the threshold.
        top_k: optional top-k truncation of the draft distribution (static: it is a shape).
        stop_tokens: ids that end a row (EOS, end of turn). The stop token itself is
            emitted and valid; the steps after it are not.
        pad_token: id fed to a finished row's models, and written as its token (None: 0, or
            the tokenizer's pad id in `run_rollout`).
        num_token_ids: ids at or above this are never drafted nor emitted (checkpoints
            pad the embedding table past the tokenizer's ids); None uses all ids.
        record_tv: compute `Records.tv` (one pass over the vocabulary per row and step);
            False leaves it NaN.
        record_llm_log_prob: compute `Records.llm_log_prob` (a log-sum-exp over the
            vocabulary per row and step); False leaves it NaN.

    Only the measures in `measures` are computed, so record just those a caller needs:
    the gate measure is one of them.
    """

    mode: Mode = Mode.UHLM
    max_new_tokens: int = 32
    measures: tuple[UncertaintyMeasure, ...] = DEFAULT_MEASURES
    gate_measure: int = 0
    top_k: int | None = None
    stop_tokens: tuple[int, ...] = ()
    pad_token: int | None = None
    num_token_ids: int | None = None
    record_tv: bool = True
    record_llm_log_prob: bool = True

    def __post_init__(self):
        if not isinstance(self.mode, Mode):
            raise ValueError(f"RolloutConfig.mode must be a Mode, got {self.mode!r}.")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.measures:
            raise ValueError("RolloutConfig.measures is empty; give at least one measure.")
        if not 0 <= self.gate_measure < len(self.measures):
            raise ValueError(
                f"gate_measure {self.gate_measure} is not an index into the "
                f"{len(self.measures)} measures."
            )
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {self.top_k!r}.")

    @property
    def measure_names(self) -> tuple[str, ...]:
        """Names of the recorded measures, in column order."""
        return tuple(m.name for m in self.measures)


@flax.struct.dataclass
class RolloutParams:
    """Swept settings of a rollout; every leaf is a traced float32 array.

    Each leaf is a scalar for one rollout, or has leading sweep axes (`[p]`) before a
    `vmap` over them.

    Attributes:
        threshold: U-HLM skips a token when its uncertainty `u <= threshold`. A threshold
            below 0 transmits every token; 1 or more skips every token.
        transmit_probability: Rand-HLM transmits each token with this probability.
        draft_temperature: temperature `τ_s > 0` of the SLM draft distribution `q`.
        llm_temperature: temperature `τ_L > 0` of the LLM distribution `p`.
        truncation: CU-HLM uplink compression (`FixedK` or `ToleranceK`, whose values are
            traced), or None to upload the full distribution. Verifying against the
            compressed `x̂` is not exact: see `uhlm_jax.truncation`.
    """

    threshold: Float[Array, " ..."]
    transmit_probability: Float[Array, " ..."]
    draft_temperature: Float[Array, " ..."]
    llm_temperature: Float[Array, " ..."]
    truncation: FixedK | ToleranceK | None = None

    @classmethod
    def create(
        cls,
        threshold: Float[ArrayLike, " ..."] = 0.3,
        transmit_probability: Float[ArrayLike, " ..."] = 0.5,
        draft_temperature: Float[ArrayLike, " ..."] = 1.0,
        llm_temperature: Float[ArrayLike, " ..."] = 1.0,
        truncation: FixedK | ToleranceK | None = None,
    ) -> RolloutParams:
        """Validated constructor from Python scalars or arrays (arrays allow sweeps).

        Raises:
            ValueError: naming the value, for a probability outside [0, 1] or a
                temperature that is not positive.
        """
        values = {
            "threshold": threshold,
            "transmit_probability": transmit_probability,
            "draft_temperature": draft_temperature,
            "llm_temperature": llm_temperature,
        }
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
        if not bool(jnp.all(jnp.isfinite(arrays["threshold"]))):
            raise ValueError(f"threshold must be finite, got {threshold!r}.")
        p = arrays["transmit_probability"]
        if not bool(jnp.all((p >= 0) & (p <= 1))):
            raise ValueError(
                f"transmit_probability must be in [0, 1], got {transmit_probability!r}."
            )
        for name in ("draft_temperature", "llm_temperature"):
            if not bool(jnp.all(arrays[name] > 0)):
                raise ValueError(
                    f"{name} must be > 0 (use a small value such as 1e-3 for near-greedy), "
                    f"got {values[name]!r}."
                )
        if truncation is not None and not isinstance(truncation, FixedK | ToleranceK):
            raise ValueError(f"truncation must be FixedK, ToleranceK or None, got {truncation!r}.")
        return cls(**arrays, truncation=truncation)


class Records(NamedTuple):
    """Per-step records of a rollout, each `[n, b]` (uncertainty `[n, b, m]`).

    Attributes:
        uncertainty: every configured measure of the draft, in `RolloutConfig.measures`
            order.
        beta: rejection probability of the draft, `max(0, 1 - p_d / q_d)`, computed for
            every token (counterfactual when not transmitted).
        tv: expected rejection `TV(p, q)` (NaN unless `RolloutConfig.record_tv`).
        transmitted: the token went to the base station: the draft's distribution was
            uploaded and verified, or (LLM-only, which drafts nothing) the LLM produced it.
        accepted: a transmitted draft the LLM accepted.
        resampled: a transmitted draft the LLM rejected and replaced by a residual sample.
        token: the emitted token.
        draft: the SLM's draft token.
        uplink_k: probabilities uploaded for verification (`v` without truncation).
        llm_log_prob: the LLM's log-probability (temperature 1, nats) of the emitted token,
            so the LLM's NLL of any mode's text comes without another forward pass (NaN
            unless `RolloutConfig.record_llm_log_prob`).
        valid: the step produced a real token (false after a stop token or the row's end).
        finite: both models' logits were finite at this step.
    """

    uncertainty: Float[Array, "n b m"]
    beta: Float[Array, "n b"]
    tv: Float[Array, "n b"]
    transmitted: Bool[Array, "n b"]
    accepted: Bool[Array, "n b"]
    resampled: Bool[Array, "n b"]
    token: Int[Array, "n b"]
    draft: Int[Array, "n b"]
    uplink_k: Int[Array, "n b"]
    llm_log_prob: Float[Array, "n b"]
    valid: Bool[Array, "n b"]
    finite: Bool[Array, "n b"]


@flax.struct.dataclass
class RolloutState:
    """Decode state carried by the scan.

    Attributes:
        slm_cache, llm_cache: the two models' KV caches.
        slm_logits, llm_logits: `[b, v]` next-token logits of each model.
        done: `[b]` the row has finished; its later steps are invalid.
        num_generated: `[b]` valid tokens emitted so far.
        max_new_tokens: `[b]` each row's own limit (at most the scan length).
    """

    slm_cache: KVCache
    llm_cache: KVCache
    slm_logits: Float[Array, "b v"]
    llm_logits: Float[Array, "b v"]
    done: Bool[Array, " b"]
    num_generated: Int[Array, " b"]
    max_new_tokens: Int[Array, " b"]


class _Position(NamedTuple):
    """What one row produces at one step (before masking by `valid`)."""

    uncertainty: Float[Array, " m"]
    beta: Float[Array, ""]
    tv: Float[Array, ""]
    transmitted: Bool[Array, ""]
    accepted: Bool[Array, ""]
    token: Int[Array, ""]
    draft: Int[Array, ""]
    uplink_k: Int[Array, ""]
    llm_log_prob: Float[Array, ""]
    finite: Bool[Array, ""]


def _measure_id(measure: UncertaintyMeasure) -> int:
    """A stable 31-bit id of a measure's name: what its key is folded with."""
    return zlib.crc32(measure.name.encode()) & 0x7FFFFFFF


def hybrid_position(
    key: Array,
    slm_logits: Float[Array, " v"],
    llm_logits: Float[Array, " v"],
    params: RolloutParams,
    config: RolloutConfig,
) -> _Position:
    """One row at one step: draft, measure, decide, verify.

    Args:
        key: this row's key for this step.
        slm_logits: `[v]` SLM logits `z`.
        llm_logits: `[v]` LLM logits `z_L`.
        params: traced settings.
        config: static settings.

    Returns:
        The position's outcome; `token` is what the row emits in `config.mode`.
    """
    draft_key, measure_key, transmit_key, verify_key, llm_key = jax.random.split(key, 5)
    slm_logits = mask_unused_ids(slm_logits, config.num_token_ids)
    llm_logits = mask_unused_ids(llm_logits, config.num_token_ids)
    log_q = speculative.draft_log_probs(slm_logits, params.draft_temperature, config.top_k)
    log_p = jax.nn.log_softmax(llm_logits / params.llm_temperature)
    draft = sample_token(draft_key, log_q)
    # Each measure's key depends on its name only, so a measure gives the same values
    # whichever other measures are recorded beside it.
    uncertainty = jnp.stack(
        [
            jnp.asarray(
                measure(
                    jax.random.fold_in(measure_key, _measure_id(measure)), slm_logits, log_q, draft
                ),
                jnp.float32,
            )
            for measure in config.measures
        ]
    )
    beta = speculative.rejection_probability(log_q, log_p, draft)
    not_recorded = jnp.float32(jnp.nan)
    tv = speculative.total_variation(log_q, log_p) if config.record_tv else not_recorded
    if params.truncation is None:
        # Modes that never upload a draft never use a verification (nor its residual sample).
        verification = (
            speculative.verify(verify_key, log_q, log_p, draft)
            if config.mode.policy.uploads_drafts
            else speculative.Verification(token=draft, accepted=jnp.bool_(False), beta=beta)
        )
        uplink_k = jnp.int32(log_q.shape[-1])
    else:
        verification, truncated = verify_compressed(
            verify_key, params.truncation, log_q, log_p, draft
        )
        uplink_k = truncated.k.astype(jnp.int32)

    transmitted = transmit_decision(
        config.mode,
        transmit_key,
        uncertainty[config.gate_measure],
        params.threshold,
        params.transmit_probability,
    )
    if config.mode.policy.drafts:
        token = jnp.where(transmitted, verification.token, draft).astype(jnp.int32)
        accepted = transmitted & verification.accepted
    else:
        # The LLM samples the token itself: nothing is drafted, so nothing is accepted.
        token = sample_token(llm_key, log_p)
        accepted = jnp.bool_(False)
    finite = ~(
        jnp.any(jnp.isnan(slm_logits) | (slm_logits == jnp.inf))
        | jnp.any(jnp.isnan(llm_logits) | (llm_logits == jnp.inf))
    )
    return _Position(
        uncertainty=uncertainty,
        beta=beta,
        tv=tv,
        transmitted=transmitted,
        accepted=accepted,
        token=token,
        draft=draft.astype(jnp.int32),
        uplink_k=uplink_k,
        llm_log_prob=(
            llm_logits[token] - jax.nn.logsumexp(llm_logits)
            if config.record_llm_log_prob
            else not_recorded
        ),
        finite=finite,
    )


def _step(
    slm: ModelParams,
    llm: ModelParams,
    params: RolloutParams,
    config: RolloutConfig,
    state: RolloutState,
    keys: Array,
) -> tuple[RolloutState, Records]:
    """One scan step for all rows: `(state, keys[b]) -> (state, record)`."""
    position = jax.vmap(hybrid_position, in_axes=(0, 0, 0, None, None))(
        keys, state.slm_logits, state.llm_logits, params, config
    )
    valid = ~state.done
    token = jnp.where(valid, position.token, config.pad_token or 0)
    slm_logits, slm_cache = decode(slm, token, state.slm_cache)
    llm_logits, llm_cache = decode(llm, token, state.llm_cache)
    num_generated = state.num_generated + valid.astype(jnp.int32)
    stopped = (
        jnp.isin(token, jnp.asarray(config.stop_tokens, jnp.int32)) if config.stop_tokens else False
    )
    done = state.done | stopped | (num_generated >= state.max_new_tokens)
    transmitted = valid & position.transmitted
    accepted = valid & position.accepted
    # A transmitted draft is accepted or resampled; an undrafted token is neither.
    resampled = transmitted & ~accepted if config.mode.policy.drafts else jnp.zeros_like(valid)
    record = Records(
        uncertainty=position.uncertainty,
        beta=position.beta,
        tv=position.tv,
        transmitted=transmitted,
        accepted=accepted,
        resampled=resampled,
        token=token,
        draft=position.draft,
        uplink_k=position.uplink_k,
        llm_log_prob=position.llm_log_prob,
        valid=valid,
        finite=position.finite,
    )
    new_state = RolloutState(
        slm_cache=slm_cache,
        llm_cache=llm_cache,
        slm_logits=slm_logits,
        llm_logits=llm_logits,
        done=done,
        num_generated=num_generated,
        max_new_tokens=state.max_new_tokens,
    )
    return new_state, record


def step_keys(seed_key: Array, prompt_ids: Int[Array, " b"], num_steps: int) -> Array:
    """Keys `[n, b]`: `fold_in(fold_in(seed_key, prompt_id), step)`."""
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key, prompt_ids)
    steps = jnp.arange(num_steps)
    return jax.vmap(lambda step: jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step))(
        steps
    )


def check_prompt_fits(prompt_length: int, max_new_tokens: int, max_length: int) -> None:
    """Raises a ValueError naming the numbers when prompt plus new tokens exceed the cache."""
    if prompt_length + max_new_tokens > max_length:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = "
            f"{prompt_length + max_new_tokens} exceeds the cache length {max_length}; "
            f"shorten the prompt, lower max_new_tokens, or allocate a longer cache."
        )


def rollout(
    slm: ModelParams,
    llm: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    prompt_ids: Int[Array, " b"],
    max_new_tokens: Int[Array, " b"],
    seed_key: Array,
    params: RolloutParams,
    config: RolloutConfig,
    cache_length: int,
    mesh: Mesh | None = None,
) -> Records:
    """Runs a batch of prompts through the pair in `config.mode`.

    Pure: apply `jax.jit` at the call site with `config`, `cache_length` and `mesh`
    static. `vmap` over `params` (e.g. a vector of thresholds) runs a sweep on the same
    prompts.

    Args:
        slm: the small model.
        llm: the large model; same vocabulary as `slm`.
        tokens: `[b, t]` right-padded prompt ids.
        lengths: `[b]` prompt lengths.
        prompt_ids: `[b]` ids that, with the step, determine each row's keys.
        max_new_tokens: `[b]` per-row limits, each at most `config.max_new_tokens`.
        seed_key: the rollout's base key.
        params: traced settings.
        config: static settings.
        cache_length: slots per cache; at least `t + config.max_new_tokens`.
        mesh: the mesh the models and rows were placed on (`uhlm_jax.sharding`); the
            caches are laid out to match. None: no layout is imposed.

    Returns:
        `Records` with leaves `[n, b]` (`n = config.max_new_tokens`).
    """
    b, t = tokens.shape
    check_prompt_fits(t, config.max_new_tokens, cache_length)
    if slm.config.vocab_size != llm.config.vocab_size:
        raise ValueError(
            f"SLM vocabulary size {slm.config.vocab_size} differs from the LLM's "
            f"{llm.config.vocab_size}; a pair must share one tokenizer and vocabulary."
        )
    slm_cache = init_cache(slm.config, b, cache_length, slm.dtype)
    llm_cache = init_cache(llm.config, b, cache_length, llm.dtype)
    if mesh is not None:
        slm_cache = sharding.constrain_cache(slm_cache, mesh, split_heads=False)
        llm_cache = sharding.constrain_cache(llm_cache, mesh, split_heads=True)
    slm_logits, slm_cache = prefill(slm, tokens, lengths, slm_cache, Padding.RIGHT)
    llm_logits, llm_cache = prefill(llm, tokens, lengths, llm_cache, Padding.RIGHT)
    state = RolloutState(
        slm_cache=slm_cache,
        llm_cache=llm_cache,
        slm_logits=slm_logits,
        llm_logits=llm_logits,
        done=jnp.zeros((b,), bool),
        num_generated=jnp.zeros((b,), jnp.int32),
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
    )
    keys = step_keys(seed_key, jnp.asarray(prompt_ids, jnp.int32), config.max_new_tokens)

    def body(state, keys):
        return _step(slm, llm, params, config, state, keys)

    _, records = jax.lax.scan(body, state, keys)
    return records


def cache_length_for(prompt_length: int, max_new_tokens: int, multiple: int = 64) -> int:
    """Cache slots for a batch, rounded up so nearby prompt lengths share one compile."""
    return padded_length(prompt_length + max_new_tokens, multiple)


class RolloutOutput(NamedTuple):
    """What `run_rollout` returns, as host (NumPy) arrays.

    Attributes:
        records: `Records` with leaves `[n, b]` (with a leading grid axis `[p, n, b]` for a
            sweep), one column per prompt in input order.
        texts: decoded generations per prompt (`[p][b]` for a sweep).
        prompt_ids: `[b]` the ids that seeded each row.
        prompt_lengths: `[b]` prompt tokens per row.
    """

    records: Records
    texts: list
    prompt_ids: np.ndarray
    prompt_lengths: np.ndarray


# The jit boundary of the library's entry point: config and cache length are static, the
# caches are created inside, and everything swept is traced.
_rollout_jit = jax.jit(rollout, static_argnames=("config", "cache_length", "mesh"))


def grid_size(params: RolloutParams) -> int | None:
    """Points of a sweep (the length of the vector leaves), or None for scalar params.

    Raises:
        ValueError: if vector leaves have different lengths or a leaf has rank > 1.
    """
    sizes = set()
    for leaf in jax.tree.leaves(params):
        if jnp.ndim(leaf) > 1:
            raise ValueError(
                f"RolloutParams leaves must be scalars or vectors, got {jnp.shape(leaf)}."
            )
        if jnp.ndim(leaf) == 1:
            sizes.add(jnp.shape(leaf)[0])
    if len(sizes) > 1:
        raise ValueError(f"RolloutParams vectors have different lengths {sorted(sizes)}.")
    return sizes.pop() if sizes else None


def broadcast_grid(params: RolloutParams) -> RolloutParams:
    """Broadcasts the scalar leaves of a sweep's `params` to the grid's length."""
    size = grid_size(params)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (size,)), params)


def sweep(
    slm: ModelParams,
    llm: ModelParams,
    tokens: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    prompt_ids: Int[Array, " b"],
    max_new_tokens: Int[Array, " b"],
    seed_key: Array,
    params: RolloutParams,
    config: RolloutConfig,
    cache_length: int,
    mesh: Mesh | None = None,
) -> Records:
    """`rollout` vmapped over grid points of `params`.

    Each leaf of `params` is a scalar (shared by all points) or a vector `[p]` (one value
    per point); all vectors have the same length. Every grid point runs the same prompts
    with the same keys. Returns `Records` with leaves `[p, n, b]`.
    """
    params = broadcast_grid(params)

    def one(point: RolloutParams) -> Records:
        return rollout(
            slm,
            llm,
            tokens,
            lengths,
            prompt_ids,
            max_new_tokens,
            seed_key,
            point,
            config,
            cache_length,
            mesh,
        )

    return jax.vmap(one)(params)


_sweep_jit = jax.jit(sweep, static_argnames=("config", "cache_length", "mesh"))

# Prompt lengths are padded up to a multiple of this, so nearby lengths share a compile.
PROMPT_LENGTH_MULTIPLE = 16


def encode_prompts(pair: ModelPair, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt, with the chat template applied when the model has one
    (see `Tokenizer.prompt_text`).

    Raises:
        ValueError: for an empty prompt.
    """
    encoded = []
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ValueError(f"Prompt {i} is empty; every prompt needs some text.")
        encoded.append(pair.tokenizer.encode(pair.tokenizer.prompt_text(prompt, chat)))
    return encoded


def run_rollout(
    pair: ModelPair,
    prompts: Sequence[str],
    config: RolloutConfig,
    params: RolloutParams,
    seed: int = 0,
    prompt_ids: Sequence[int] | Int[Array, " b"] | None = None,
    chat: bool = True,
    max_cache_length: int | None = None,
    mesh: Mesh | None = None,
    check_finite: bool = True,
) -> RolloutOutput:
    """Runs text prompts through a pair and returns records and decoded texts.

    With scalar `params` this is one rollout; with `params` leaves of shape `[p]` (e.g.
    `RolloutParams.create(threshold=jnp.linspace(0, 1, 5))`) it is a sweep over `p` grid
    points on the same prompts and keys, compiled once.

    Args:
        pair: the models and tokenizer.
        prompts: prompt texts; all run as one batch.
        config: static settings; unset stop tokens, pad token and id limit take the
            tokenizer's values.
        params: traced settings, scalar or with one leading grid axis.
        seed: the base seed of all keys.
        prompt_ids: ids that seed each row's keys (default: positions in `prompts`); give
            the same id to get the same tokens whatever the batch.
        chat: apply the chat template of instruct models.
        max_cache_length: refuse prompts whose length plus `max_new_tokens` exceeds this.
        mesh: a `data` x `model` mesh (`uhlm_jax.sharding.make_mesh`): rows are split
            over `data`, the LLM over `model` and the SLM replicated
            (`uhlm_jax.sharding.place_pair`; place the pair once beforehand to do it
            once). None runs on the default device.
        check_finite: raise if any valid step saw NaN or +inf logits; otherwise they are
            only flagged in `Records.finite`.

    Returns:
        `RolloutOutput`.

    Raises:
        ValueError: for an empty prompt, a prompt too long for `max_cache_length`, a
            batch the mesh's `data` axis does not divide, an LLM its `model` axis does not
            divide, or non-finite logits when `check_finite`.
    """
    if not prompts:
        raise ValueError("No prompts given; pass at least one prompt.")
    tokenizer = pair.tokenizer
    # Each token setting left unset takes the tokenizer's value.
    config = dataclasses.replace(
        config,
        stop_tokens=config.stop_tokens or tokenizer.stop_ids,
        pad_token=tokenizer.pad_id if config.pad_token is None else config.pad_token,
        num_token_ids=config.num_token_ids or tokenizer.vocab_size,
    )
    encoded = encode_prompts(pair, prompts, chat)
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    width = padded_length(int(lengths.max()), PROMPT_LENGTH_MULTIPLE)
    tokens = pad_rows(encoded, width, tokenizer.pad_id, np.int32)
    if max_cache_length is not None:
        for i, length in enumerate(lengths):
            if length + config.max_new_tokens > max_cache_length:
                raise ValueError(
                    f"Prompt {i} has {length} tokens; with max_new_tokens "
                    f"{config.max_new_tokens} it needs {length + config.max_new_tokens} cache "
                    f"slots but the cache holds {max_cache_length}. Shorten the prompt or "
                    "lower max_new_tokens."
                )
    ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
    limits = np.full(len(prompts), config.max_new_tokens, np.int32)
    cache_length = cache_length_for(tokens.shape[1], config.max_new_tokens)
    is_sweep = grid_size(params) is not None
    fn = _sweep_jit if is_sweep else _rollout_jit
    rows = (tokens, lengths, ids.astype(np.int32), limits)
    if mesh is not None:
        data = mesh.shape[sharding.DATA]
        if len(prompts) % data:
            raise ValueError(
                f"{len(prompts)} prompts cannot be split evenly over the mesh's data axis "
                f"of {data} devices; use a multiple of {data}."
            )
        pair = sharding.place_pair(pair, mesh)
        rows = jax.device_put(rows, sharding.row_sharding(mesh))
    records = fn(
        pair.slm,
        pair.llm,
        *rows,
        jax.random.key(seed),
        params,
        config=config,
        cache_length=cache_length,
        mesh=mesh,
    )
    if jax.process_count() > 1:
        # Multi-host: every process gathers all rows (the inputs were identical everywhere).
        records = multihost_utils.process_allgather(records, tiled=True)
    records = Records(*(np.asarray(x) for x in records))
    if check_finite and not records.finite[records.valid].all():
        raise ValueError(
            "Non-finite (NaN or +inf) logits occurred during the rollout; check the model "
            "weights and dtype (bfloat16 overflow?), or set check_finite=False to record "
            "them in Records.finite instead."
        )

    def texts_of(rec: Records) -> list[str]:
        return [
            tokenizer.decode(rec.token[:, row][rec.valid[:, row]])
            for row in range(rec.token.shape[1])
        ]

    if is_sweep:
        texts = [texts_of(Records(*(x[i] for x in records))) for i in range(records.token.shape[0])]
    else:
        texts = texts_of(records)
    return RolloutOutput(records=records, texts=texts, prompt_ids=ids, prompt_lengths=lengths)
