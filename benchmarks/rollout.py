"""Rollout throughput, and the U-HLM step against a bare SLM step plus LLM step.

Pairs: the `toy` pair, and a SmolLM2-sized pair with random weights (LLM: the
SmolLM2-135M architecture; SLM: its first 10 of 30 layers). Random weights time exactly
like trained ones.

The per-step time is measured as the difference between a scan of `N` steps and a scan of
one step, divided by `N − 1`, which removes prefill and dispatch. The bare step decodes
both models and takes the argmax of each; the U-HLM step adds drafting, the uncertainty
measure (temperature perturbation, K = 20), verification, the skip decision and records.

Target (DESIGN.md §5): U-HLM step ≤ 1.2 × (bare SLM step + LLM step).

Usage: .venv/bin/python -m benchmarks.rollout [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.results import best_seconds, machine, write_section
from uhlm_jax.models.cache import init_cache
from uhlm_jax.models.config import SMOLLM2_135M
from uhlm_jax.models.llama import Padding, decode, init_params, prefill
from uhlm_jax.models.toy import toy_pair
from uhlm_jax.modes import Mode
from uhlm_jax.rollout import RolloutConfig, RolloutParams, rollout
from uhlm_jax.uncertainty import TemperaturePerturbation

PROMPT_LENGTH = 32
TARGET_OVERHEAD = 1.2


def smollm2_sized_pair():
    llm = init_params(SMOLLM2_135M, jax.random.key(0))
    slm = init_params(dataclasses.replace(SMOLLM2_135M, num_layers=10), jax.random.key(1))
    return slm, llm


def _inputs(batch: int, vocab: int):
    tokens = jax.random.randint(jax.random.key(2), (batch, PROMPT_LENGTH), 0, vocab)
    lengths = jnp.full((batch,), PROMPT_LENGTH, jnp.int32)
    return tokens, lengths


def uhlm_seconds(slm, llm, batch: int, steps: int) -> float:
    """Wall time of a U-HLM rollout of `steps` tokens (prefill included)."""
    tokens, lengths = _inputs(batch, llm.config.vocab_size)
    config = RolloutConfig(
        mode=Mode.UHLM, max_new_tokens=steps, measures=(TemperaturePerturbation(),)
    )
    run = jax.jit(rollout, static_argnames=("config", "cache_length"))
    args = (
        slm,
        llm,
        tokens,
        lengths,
        jnp.arange(batch),
        jnp.full((batch,), steps),
        jax.random.key(0),
        RolloutParams.create(threshold=0.3),
    )
    call = lambda: run(*args, config=config, cache_length=PROMPT_LENGTH + steps).token  # noqa: E731
    call().block_until_ready()
    return best_seconds(call, repeats=3)


def bare_seconds(slm, llm, batch: int, steps: int) -> float:
    """Wall time of prefill plus `steps` greedy decode steps of both models."""
    tokens, lengths = _inputs(batch, llm.config.vocab_size)
    size = PROMPT_LENGTH + steps

    def run(slm, llm, tokens, lengths):
        zs, cs = prefill(slm, tokens, lengths, init_cache(slm.config, batch, size), Padding.RIGHT)
        zl, cl = prefill(llm, tokens, lengths, init_cache(llm.config, batch, size), Padding.RIGHT)

        def body(carry, _):
            zs, cs, zl, cl = carry
            token = jnp.argmax(zl, axis=-1).astype(jnp.int32)
            draft = jnp.argmax(zs, axis=-1).astype(jnp.int32)
            zs, cs = decode(slm, token, cs)
            zl, cl = decode(llm, token, cl)
            return (zs, cs, zl, cl), (token, draft)

        return jax.lax.scan(body, (zs, cs, zl, cl), None, length=steps)[1][0]

    jitted = jax.jit(run)
    call = lambda: jitted(slm, llm, tokens, lengths)  # noqa: E731
    call().block_until_ready()
    return best_seconds(call, repeats=3)


def per_step(measure, slm, llm, batch: int, steps: int) -> float:
    return (measure(slm, llm, batch, steps) - measure(slm, llm, batch, 1)) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, batch 1 only")
    args = parser.parse_args()
    steps = 9 if args.quick else 33
    batches = (1,) if args.quick else (1, 32)
    pairs = {"toy": toy_pair(), "SmolLM2-sized (10/30 layers)": smollm2_sized_pair()}
    rows = []
    for name, (slm, llm) in pairs.items():
        for batch in batches:
            uhlm = per_step(uhlm_seconds, slm, llm, batch, steps)
            bare = per_step(bare_seconds, slm, llm, batch, steps)
            rows.append((name, batch, batch / uhlm, uhlm * 1e3, bare * 1e3, uhlm / bare))
            print(rows[-1], flush=True)
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Prompt length {PROMPT_LENGTH}, {steps - 1} timed steps per row, U-HLM mode with the "
        "temperature-perturbation measure (K = 20, θ_max = 2) at threshold 0.3; float32.",
        "",
        "| pair | batch | U-HLM tok/s | U-HLM step ms | bare SLM+LLM step ms | ratio | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, batch, tps, uhlm_ms, bare_ms, ratio in rows:
        verdict = "met" if ratio <= TARGET_OVERHEAD else "missed"
        lines.append(
            f"| {name} | {batch} | {tps:.1f} | {uhlm_ms:.2f} | {bare_ms:.2f} | {ratio:.2f}× | "
            f"≤ {TARGET_OVERHEAD}× ({verdict}) |"
        )
    write_section("Rollout", "\n".join(lines))


if __name__ == "__main__":
    main()
