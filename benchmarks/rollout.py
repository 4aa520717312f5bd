"""Rollout throughput, and the U-HLM step against a bare SLM step plus LLM step.

Pairs: the `toy` pair, and a SmolLM2-sized pair with random weights (LLM: the
SmolLM2-135M architecture; SLM: its first 10 of 30 layers). Random weights time exactly
like trained ones.

The per-step time is measured as the difference between a scan of `N` steps and a scan of
one step, divided by `N − 1`, which removes prefill and dispatch. The bare step decodes
both models and takes the argmax of each; the U-HLM step adds drafting, the uncertainty
measure (temperature perturbation, K = 20), verification, the skip decision and records.

By default the U-HLM step records the gate measure only (no TV, no LLM log-probability),
as a U-HLM run needs; `--records all` also computes those, as collection does.

End to end, `run_rollout` on the default pair (text in, records and texts out) is timed
whole and by stage: tokenising and padding, both prefills, the scan (the jitted rollout
less its prefills), the transfer of the records to the host and detokenising.

Targets (DESIGN.md §5): U-HLM step ≤ 1.2 × (bare SLM step + LLM step); `run_rollout` end
to end within 1.3 × its scan alone.

Usage: .venv/bin/python -m benchmarks.rollout [--quick] [--records all] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import best_seconds, machine, write_section
from calibration.prompts import embedded_prompts_path, read_prompts
from uhlm_jax.models.cache import init_cache
from uhlm_jax.models.config import SMOLLM2_135M
from uhlm_jax.models.llama import Padding, decode, init_params, prefill
from uhlm_jax.models.toy import toy_pair
from uhlm_jax.modes import Mode
from uhlm_jax.pair import DEFAULT_PAIR, load_pair
from uhlm_jax.rollout import (
    Records,
    RolloutConfig,
    RolloutParams,
    cache_length_for,
    encode_prompts,
    rollout,
    run_rollout,
)
from uhlm_jax.sampling import pad_rows, padded_length
from uhlm_jax.uncertainty import TemperaturePerturbation

PROMPT_LENGTH = 32
TARGET_OVERHEAD = 1.2
TARGET_END_TO_END = 1.3
# End to end: this many shipped calibration prompts, one batch, this many new tokens.
END_TO_END_PROMPTS = 32
END_TO_END_TOKENS = 32
PROMPT_LENGTH_MULTIPLE = 16  # as run_rollout pads


def smollm2_sized_pair():
    llm = init_params(SMOLLM2_135M, jax.random.key(0))
    slm = init_params(dataclasses.replace(SMOLLM2_135M, num_layers=10), jax.random.key(1))
    return slm, llm


def _inputs(batch: int, vocab: int):
    tokens = jax.random.randint(jax.random.key(2), (batch, PROMPT_LENGTH), 0, vocab)
    lengths = jnp.full((batch,), PROMPT_LENGTH, jnp.int32)
    return tokens, lengths


def uhlm_config(steps: int, records: str) -> RolloutConfig:
    """U-HLM with the temperature-perturbation gate; `records` "gate" skips TV and the LLM
    log-probability, "all" computes them (the defaults)."""
    config = RolloutConfig(
        mode=Mode.UHLM, max_new_tokens=steps, measures=(TemperaturePerturbation(),)
    )
    if records == "gate":
        config = dataclasses.replace(config, record_tv=False, record_llm_log_prob=False)
    return config


def uhlm_seconds(slm, llm, batch: int, steps: int, records: str) -> float:
    """Wall time of a U-HLM rollout of `steps` tokens (prefill included)."""
    tokens, lengths = _inputs(batch, llm.config.vocab_size)
    config = uhlm_config(steps, records)
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


def bare_seconds(slm, llm, batch: int, steps: int, records: str = "") -> float:
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


def per_step(measure, slm, llm, batch: int, steps: int, records: str) -> float:
    long, short = measure(slm, llm, batch, steps, records), measure(slm, llm, batch, 1, records)
    return (long - short) / (steps - 1)


def end_to_end(records: str, repeats: int = 3) -> dict[str, float]:
    """Best seconds of `run_rollout` on the default pair, whole and by stage."""
    pair = load_pair(DEFAULT_PAIR)
    texts = [p.text for p in read_prompts(embedded_prompts_path(), "calibration")]
    texts = texts[:END_TO_END_PROMPTS]
    params = RolloutParams.create(threshold=0.3)
    config = uhlm_config(END_TO_END_TOKENS, records)
    # As run_rollout fills them in from the tokenizer.
    tokenizer = pair.tokenizer
    config = dataclasses.replace(
        config,
        stop_tokens=tokenizer.stop_ids,
        pad_token=tokenizer.pad_id,
        num_token_ids=tokenizer.vocab_size,
    )

    def whole():
        return run_rollout(pair, texts, config, params).records.token

    def tokenise():
        encoded = encode_prompts(pair, texts)
        width = padded_length(max(map(len, encoded)), PROMPT_LENGTH_MULTIPLE)
        lengths = np.array([len(ids) for ids in encoded], np.int32)
        return pad_rows(encoded, width, tokenizer.pad_id, np.int32), lengths

    tokens, lengths = tokenise()
    cache_length = cache_length_for(tokens.shape[1], END_TO_END_TOKENS)
    rows = len(texts)
    device_rows = (
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.arange(rows, dtype=jnp.int32),
        jnp.full((rows,), END_TO_END_TOKENS, jnp.int32),
    )
    jitted = jax.jit(rollout, static_argnames=("config", "cache_length"))

    def device():
        return jitted(
            pair.slm,
            pair.llm,
            *device_rows,
            jax.random.key(0),
            params,
            config=config,
            cache_length=cache_length,
        )

    def prefills(slm, llm, tokens, lengths):
        zs = prefill(
            slm, tokens, lengths, init_cache(slm.config, rows, cache_length), Padding.RIGHT
        )
        zl = prefill(
            llm, tokens, lengths, init_cache(llm.config, rows, cache_length), Padding.RIGHT
        )
        return zs[0], zl[0]

    prefill_jit = jax.jit(prefills)
    on_device = device()
    jax.block_until_ready((whole(), prefill_jit(pair.slm, pair.llm, *device_rows[:2])))

    def host():
        return Records(*(np.asarray(x) for x in on_device))

    on_host = host()

    def detokenise():
        return [
            tokenizer.decode(on_host.token[:, row][on_host.valid[:, row]]) for row in range(rows)
        ]

    times = {
        "run_rollout": best_seconds(whole, repeats),
        "tokenise": best_seconds(tokenise, repeats),
        "prefill": best_seconds(lambda: prefill_jit(pair.slm, pair.llm, *device_rows[:2]), repeats),
        "jitted rollout": best_seconds(device, repeats),
        "host transfer": _host_seconds(device, repeats),
        "detokenise": best_seconds(detokenise, repeats),
    }
    times["scan"] = times["jitted rollout"] - times["prefill"]
    return times


def _host_seconds(device, repeats: int) -> float:
    """Best time of copying fresh device records to NumPy (each copy of new arrays)."""
    best = float("inf")
    for _ in range(repeats):
        records = jax.block_until_ready(device())
        start = time.perf_counter()
        Records(*(np.asarray(x) for x in records))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, batch 1 only")
    parser.add_argument(
        "--records",
        choices=("gate", "all"),
        default="gate",
        help="gate: the U-HLM step records its gate measure only; all: also TV and the LLM "
        "log-probability",
    )
    parser.add_argument("--skip-toy", action="store_true", help="time the SmolLM2-sized pair only")
    parser.add_argument(
        "--dry-run", action="store_true", help="print JSON lines, leave RESULTS.md alone"
    )
    args = parser.parse_args()
    steps = 9 if args.quick else 33
    batches = (1,) if args.quick else (1, 32)
    pairs = {"SmolLM2-sized (10/30 layers)": smollm2_sized_pair()}
    if not args.skip_toy:
        pairs = {"toy": toy_pair(), **pairs}
    load = [f"{x:.1f}" for x in os.getloadavg()]
    rows = []
    for name, (slm, llm) in pairs.items():
        for batch in batches:
            uhlm = per_step(uhlm_seconds, slm, llm, batch, steps, args.records)
            bare = per_step(bare_seconds, slm, llm, batch, steps, args.records)
            rows.append((name, batch, batch / uhlm, uhlm * 1e3, bare * 1e3, uhlm / bare))
            print(json.dumps({"step": rows[-1]}), flush=True)
    stages = end_to_end(args.records)
    print(json.dumps({"end_to_end": stages}), flush=True)
    load_after = [f"{x:.1f}" for x in os.getloadavg()]
    print(json.dumps({"load": [load, load_after]}), flush=True)
    if args.dry_run:
        return
    records_text = (
        "records its gate measure only (no TV, no LLM log-probability)"
        if args.records == "gate"
        else "also records TV and the LLM log-probability"
    )
    lines = [
        f"Machine: {machine()}; load average {', '.join(load)} at the start, "
        f"{', '.join(load_after)} at the end (1, 5, 15 min).",
        "",
        f"Prompt length {PROMPT_LENGTH}, {steps - 1} timed steps per row, U-HLM mode with the "
        "temperature-perturbation measure (K = 20, θ_max = 2) at threshold 0.3, which it "
        f"{records_text}; float32.",
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
    ratio = stages["run_rollout"] / stages["scan"]
    verdict = "met" if ratio <= TARGET_END_TO_END else "missed"
    lines += [
        "",
        f"`run_rollout` end to end on the `{DEFAULT_PAIR}` pair: {END_TO_END_PROMPTS} shipped "
        f"calibration prompts in one batch, {END_TO_END_TOKENS} new tokens, U-HLM as above; "
        "best of 3 after compiling. The scan is the jitted rollout less its two prefills.",
        "",
        "| stage | seconds | share of run_rollout |",
        "| --- | --- | --- |",
    ]
    stage_names = ("tokenise", "prefill", "scan", "host transfer", "detokenise", "run_rollout")
    for stage in stage_names:
        lines.append(
            f"| {stage} | {stages[stage]:.3f} | {stages[stage] / stages['run_rollout']:.0%} |"
        )
    device_ratio = stages["run_rollout"] / stages["jitted rollout"]
    lines += [
        "",
        f"run_rollout / scan = {ratio:.2f}× (target ≤ {TARGET_END_TO_END}×, {verdict}); "
        f"run_rollout / jitted rollout (prefills and scan) = {device_ratio:.2f}×.",
    ]
    write_section("Rollout", "\n".join(lines))


if __name__ == "__main__":
    main()
