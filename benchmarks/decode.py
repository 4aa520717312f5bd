"""Decode and prefill throughput of the SmolLM2-135M architecture on this machine.

Measures, for the SmolLM2-135M config (llama architecture, 30 layers, hidden 576,
vocabulary 49152, tied head) in float32:
- the machine's memory bandwidth (a jitted sum over a 512 MiB array) and float32 matrix
  product rate, and from them the batch-1 bandwidth floor (weight bytes per step /
  bandwidth) and the batch-32 compute floor (FLOPs per step / matmul rate);
- decode tokens/s at batch 1 and 32, with caches of 256 and 512 slots, under `jax.jit`
  with the cache donated, and the compile time of the step;
- prefill tokens/s;
- decode with the model split over a `model=3` mesh on 3 emulated CPU devices (a fresh
  process: the device count is fixed when JAX starts), and the peak memory of one device
  during a decode step, next to the same on one device;
- the GQA attention step alone in its two formulations (matrix products vs
  multiply-reduce over the cache), which decided the one `llama.py` uses for decode.

The weights are random (`init_params`): a decode step reads and multiplies the same
arrays whatever their values, so the timings are those of the real checkpoint.

Writes the "## Decode" section of benchmarks/RESULTS.md and prints it.

    .venv/bin/python -m benchmarks.decode [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.results import machine, write_section
from uhlm_jax.models import decode, init_cache, init_params, prefill
from uhlm_jax.models.config import SMOLLM2_135M, ModelConfig
from uhlm_jax.sharding import MeshShape, constrain_cache, make_mesh, split_model

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "Decode"

# DESIGN.md §5.
TARGET_BATCH1_TOK_S = 36.0
TARGET_BATCH32_TOK_S = 250.0
TRANSFORMERS_BATCH1_TOK_S = 13.0
TRANSFORMERS_BATCH32_TOK_S = 140.0
PROMPT_LENGTH = 16
# The mesh rows: the model split over this many emulated CPU devices. SmolLM2-135M has 3
# kv heads, so 3 is the smallest model axis that splits it on head boundaries (2 does not).
MESH_MODEL = 3


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of `fn()` (which must block) over `repeats` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(repeats: int) -> float:
    """Bytes/s read by a jitted float32 sum over a 512 MiB array."""
    x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / best_of(lambda: total(x).block_until_ready(), repeats)


def matmul_flops(repeats: int) -> dict[str, float]:
    """float32 matrix-product rate in FLOP/s: a large square one and decode's shapes."""
    rates = {}
    for m, k, n in ((2048, 2048, 2048), (32, 576, 1536), (32, 576, 49152)):
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        product = jax.jit(jnp.matmul)
        product(a, b).block_until_ready()
        seconds = best_of(lambda a=a, b=b, p=product: p(a, b).block_until_ready(), repeats)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds
    return rates


def decode_rate(
    params, batch: int, max_length: int, steps: int, repeats: int, mesh=None
) -> dict:
    """Decode tokens/s (all rows) after a `PROMPT_LENGTH`-token prefill, compile time, and
    the peak bytes of one device during a step (arguments plus temporaries; the new cache
    reuses the donated one). With a `mesh`, `params` are split over it and so is the cache.
    """
    config = params.config
    tokens = jnp.ones((batch, PROMPT_LENGTH), jnp.int32)
    lengths = jnp.full((batch,), PROMPT_LENGTH, jnp.int32)
    run_prefill = jax.jit(prefill)
    step = jax.jit(decode, donate_argnums=2)

    def empty_cache():
        cache = init_cache(config, batch, max_length)
        return cache if mesh is None else constrain_cache(cache, mesh, split_heads=True)

    new_cache = jax.jit(empty_cache)
    start = time.perf_counter()
    compiled = step.lower(params, tokens[:, 0], new_cache()).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    device_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    del compiled

    def fresh_cache():
        logits, cache = run_prefill(params, tokens, lengths, new_cache())
        return logits.argmax(-1), cache

    next_tokens, cache = fresh_cache()
    step(params, next_tokens, cache)[0].block_until_ready()  # compile (cache is donated)
    best = cpu = float("inf")
    for _ in range(repeats):
        next_tokens, cache = fresh_cache()
        jax.block_until_ready(cache)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logits, cache = step(params, next_tokens, cache)
        logits.block_until_ready()
        best = min(best, (time.perf_counter() - start) / steps)
        cpu = min(cpu, (time.process_time() - start_cpu) / steps)
    return {
        "tok_s": batch / best,
        "ms_per_step": 1e3 * best,
        "cpu_ms_per_step": 1e3 * cpu,
        "compile_s": compile_s,
        "device_bytes": device_bytes,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def mesh_decode(quick: bool) -> dict:
    """Decode rows with the model split over `MESH_MODEL` devices (run in the child)."""
    repeats = 3 if quick else 7
    mesh = make_mesh(MeshShape(data=1, model=MESH_MODEL))
    params = split_model(init_params(SMOLLM2_135M, jax.random.key(0)), mesh)
    jax.block_until_ready(params)
    results = {}
    for batch in (1, 32):
        steps = (8 if quick else 32) if batch == 1 else (4 if quick else 12)
        results[batch] = decode_rate(params, batch, 256, steps, repeats, mesh)
    return {"decode": results, "peak_rss_bytes": peak_rss_bytes()}


def mesh_decode_in_child(quick: bool) -> dict:
    """`mesh_decode` in a fresh process with `MESH_MODEL` emulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={MESH_MODEL}"
    env["JAX_PLATFORMS"] = "cpu"
    argv = [sys.executable, "-m", "benchmarks.decode", "--mesh-child"] + ["--quick"] * quick
    done = subprocess.run(
        argv, env=env, check=True, capture_output=True, text=True, cwd=RESULTS.parents[1]
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["decode"] = {int(k): v for k, v in result["decode"].items()}
    return result


def prefill_rate(params, batch: int, length: int, repeats: int) -> dict:
    """Prompt tokens/s of `prefill` for `batch` prompts of `length` tokens."""
    tokens = jnp.ones((batch, length), jnp.int32)
    lengths = jnp.full((batch,), length, jnp.int32)
    cache = init_cache(params.config, batch, length)
    run = jax.jit(prefill)
    start = time.perf_counter()
    run(params, tokens, lengths, cache)[0].block_until_ready()
    compile_s = time.perf_counter() - start
    seconds = best_of(lambda: run(params, tokens, lengths, cache)[0].block_until_ready(), repeats)
    return {"tok_s": batch * length / seconds, "compile_s": compile_s}


def _visible_probs(scores, index, start):
    slots = jnp.arange(scores.shape[-1])
    visible = (slots >= start[:, None]) & (slots <= index)
    return jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)


def _attention_einsum(q, keys, values, k, v, index, start):
    """One decode step of GQA attention as the textbook einsum (query on the left)."""
    keys = lax.dynamic_update_slice(keys, k, (0, 0, index, 0))
    values = lax.dynamic_update_slice(values, v, (0, 0, index, 0))
    probs = _visible_probs(jnp.einsum("bkgd,bksd->bkgs", q, keys), index, start)
    return jnp.einsum("bkgs,bksd->bkgd", probs, values), keys, values


def _attention_keys_left(q, keys, values, k, v, index, start):
    """The same step as matrix products with the cache as the left operand."""
    keys = lax.dynamic_update_slice(keys, k, (0, 0, index, 0))
    values = lax.dynamic_update_slice(values, v, (0, 0, index, 0))
    probs = _visible_probs(jnp.einsum("bksd,bkgd->bkgs", keys, q), index, start)
    return jnp.einsum("bkgs,bksd->bkgd", probs, values), keys, values


def _attention_multiply_reduce(q, keys, values, k, v, index, start):
    """The same step as elementwise products summed over the head / slot axis."""
    keys = lax.dynamic_update_slice(keys, k, (0, 0, index, 0))
    values = lax.dynamic_update_slice(values, v, (0, 0, index, 0))
    scores = (q[:, :, :, None, :] * keys[:, :, None, :, :]).sum(-1)
    probs = _visible_probs(scores, index, start)
    return (probs[..., None] * values[:, :, None]).sum(3), keys, values


ATTENTION_FORMULATIONS = {
    "einsum, query left": _attention_einsum,
    "matrix products, cache left": _attention_keys_left,
    "multiply-reduce (used)": _attention_multiply_reduce,
}


def attention_step_ms(step_fn, config: ModelConfig, batch: int, max_length: int, repeats: int):
    """Milliseconds for one decode step of attention over all layers' caches (donated)."""
    kh, g, d = config.num_kv_heads, config.num_groups, config.head_dim
    shape = (batch, kh, max_length, d)

    def all_layers(q, caches, k, index, start):
        new = []
        for keys, values in caches:
            out, keys, values = step_fn(q, keys, values, k, k, index, start)
            q = q + 0.01 * out  # each layer waits for the previous one, as in the network
            new.append((keys, values))
        return q.sum(), new

    run = jax.jit(all_layers, donate_argnums=1)
    q = jnp.ones((batch, kh, g, d), jnp.float32) * 0.01
    k = jnp.ones((batch, kh, 1, d), jnp.float32)
    start = jnp.zeros((batch,), jnp.int32)
    caches = [
        (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        for _ in range(config.num_layers)
    ]
    index = jnp.int32(max_length // 2)
    total, caches = run(q, caches, k, index, start)
    best = float("inf")
    steps = 10
    for _ in range(repeats):
        begin = time.perf_counter()
        for _ in range(steps):
            total, caches = run(q, caches, k, index, start)
        total.block_until_ready()
        best = min(best, (time.perf_counter() - begin) / steps)
    return 1e3 * best


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def verdict(value: float, target: float) -> str:
    ratio = value / target
    return f"meets ({ratio:.2f}× target)" if ratio >= 1 else f"misses ({ratio:.2f}× target)"


def step_times(result: dict) -> str:
    return f"{result['ms_per_step']:.1f} ms/step wall, {result['cpu_ms_per_step']:.1f} ms CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--mesh-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mesh_child:
        print(json.dumps(mesh_decode(args.quick)))
        return 0
    repeats = 3 if args.quick else 7
    config = SMOLLM2_135M
    load_before = load_average()

    bandwidth = memory_bandwidth(repeats)
    flops = matmul_flops(repeats)
    params = init_params(config, jax.random.key(0))
    jax.block_until_ready(params)

    decode_results = {}
    for batch, max_length in ((1, 256), (1, 512), (32, 256), (32, 512)):
        steps = (8 if args.quick else 32) if batch == 1 else (4 if args.quick else 12)
        decode_results[batch, max_length] = decode_rate(params, batch, max_length, steps, repeats)
    # bfloat16 weights and cache halve the bytes a step reads; compute stays float32 where
    # the model asks for it (norms, softmax, RoPE).
    params_bf16 = init_params(config, jax.random.key(0), jnp.bfloat16)
    bf16_results = {}
    for batch in (1, 32):
        steps = (8 if args.quick else 32) if batch == 1 else (4 if args.quick else 12)
        bf16_results[batch] = decode_rate(params_bf16, batch, 256, steps, repeats)
    del params_bf16
    prefills = {
        (batch, length): prefill_rate(params, batch, length, max(2, repeats // 2))
        for batch, length in ((1, 128), (8, 128))
    }
    attention = {
        (name, batch): attention_step_ms(fn, config, batch, 256, repeats)
        for name, fn in ATTENTION_FORMULATIONS.items()
        for batch in (1, 32)
    }
    split = mesh_decode_in_child(args.quick)
    load_after = load_average()

    weight_bytes = config.weight_bytes(4)
    floor_batch1 = bandwidth / weight_bytes
    matmul_rate = flops["2048x2048x2048"]
    flops_b32 = config.flops_per_token(256)
    floor_batch32 = matmul_rate / flops_b32
    b1, b32 = decode_results[1, 256], decode_results[32, 256]

    lines = [
        f"`benchmarks/decode.py`, {datetime.date.today().isoformat()}; {machine()}.",
        f"Load average {load_before} at the start, {load_after} at the end "
        "(1, 5, 15 min; the machine is shared with other work, so a load above ~2 "
        "slows these numbers and they are then lower bounds on what the code does).",
        "",
        "SmolLM2-135M architecture in float32 with random weights (`init_params`; a step "
        "reads and multiplies the same arrays whatever their values, so the real "
        f"checkpoint times the same). {config.num_params / 1e6:.1f} M parameters, "
        f"{weight_bytes / 1e6:.0f} MB of weights read per decode step; decode jitted "
        f"with the cache donated, after a {PROMPT_LENGTH}-token prefill; best of "
        f"{repeats} repeats. CPU time is summed over this process's threads: with 2 "
        "cores it can reach twice the wall time; less than the wall time means other "
        "processes held the cores.",
        "",
        "| what | measured | floor | target (DESIGN §5) | verdict |",
        "| --- | --- | --- | --- | --- |",
        f"| memory bandwidth (jitted sum, 512 MiB) | {bandwidth / 1e9:.1f} GB/s | | "
        "~29 GB/s reference | |",
        f"| float32 matmul 2048³ | {matmul_rate / 1e9:.0f} GFLOP/s | | ~130 GFLOP/s reference | |",
        f"| float32 matmul 32×576×1536 / 32×576×49152 | "
        f"{flops['32x576x1536'] / 1e9:.0f} / {flops['32x576x49152'] / 1e9:.0f} GFLOP/s | | | |",
        f"| decode, batch 1, cache 256 | {b1['tok_s']:.1f} tok/s ({step_times(b1)}) "
        f"| {floor_batch1:.1f} tok/s (bandwidth) | ≥ {TARGET_BATCH1_TOK_S:.0f} tok/s | "
        f"{verdict(b1['tok_s'], TARGET_BATCH1_TOK_S)}; "
        f"{b1['tok_s'] / floor_batch1:.2f}× floor |",
    ]
    b1_512 = decode_results[1, 512]
    lines.append(
        f"| decode, batch 1, cache 512 | {b1_512['tok_s']:.1f} tok/s "
        f"({step_times(b1_512)}) | {floor_batch1:.1f} tok/s | | |"
    )
    lines.append(
        f"| decode, batch 32, cache 256 | {b32['tok_s']:.0f} tok/s "
        f"({step_times(b32)}) | {floor_batch32:.0f} tok/s (compute) | "
        f"≥ {TARGET_BATCH32_TOK_S:.0f} tok/s | {verdict(b32['tok_s'], TARGET_BATCH32_TOK_S)}; "
        f"{b32['tok_s'] / TRANSFORMERS_BATCH32_TOK_S:.1f}× transformers |"
    )
    b32_512 = decode_results[32, 512]
    lines.append(
        f"| decode, batch 32, cache 512 | {b32_512['tok_s']:.0f} tok/s "
        f"({step_times(b32_512)}) | | | |"
    )
    for batch in (1, 32):
        one, half = decode_results[batch, 256], bf16_results[batch]
        lines.append(
            f"| decode, batch {batch}, cache 256, bfloat16 | {half['tok_s']:.1f} tok/s "
            f"({step_times(half)}); peak {half['device_bytes'] / 1e6:.0f} MB (float32: "
            f"{one['device_bytes'] / 1e6:.0f} MB) | "
            + (f"{2 * floor_batch1:.1f} tok/s (bandwidth) " if batch == 1 else "")
            + "| | |"
        )
    for batch in (1, 32):
        one, two = decode_results[batch, 256], split["decode"][batch]
        lines.append(
            f"| decode, batch {batch}, cache 256, model={MESH_MODEL} mesh on {MESH_MODEL} "
            f"emulated devices | {two['tok_s']:.1f} tok/s ({step_times(two)}); peak "
            f"{two['device_bytes'] / 1e6:.0f} MB per device (1 device: "
            f"{one['device_bytes'] / 1e6:.0f} MB) | | | |"
        )
    for (batch, length), result in prefills.items():
        lines.append(f"| prefill, {batch} × {length} tokens | {result['tok_s']:.0f} tok/s | | | |")
    lines.append(
        f"| compile, decode step (batch 1 / 32, cache 256) | {b1['compile_s']:.1f} s / "
        f"{b32['compile_s']:.1f} s | | | |"
    )
    lines += [
        "",
        f"The model={MESH_MODEL} rows split heads and MLP columns over {MESH_MODEL} emulated "
        "CPU devices in one process (`uhlm_jax.sharding`; embedding and tied head "
        "replicated), which share this machine's cores and memory: they show that the "
        "split runs and what one device holds, not a speed-up. Peak per device = the step's "
        "arguments (weights and cache) plus temporaries, from XLA's memory analysis; the "
        f"{MESH_MODEL}-device process peaked at {split['peak_rss_bytes'] / 1e6:.0f} MB "
        "resident.",
        "",
        "The bfloat16 rows store weights and KV cache in bfloat16 (half the bytes per "
        "step, so twice the batch-1 bandwidth floor); the batch-32 rows show whether "
        "bfloat16 also pays in compute on this CPU.",
        "",
        f"Floors: batch 1 = bandwidth / weight bytes; batch 32 = matmul rate / "
        f"({flops_b32 / 1e6:.0f} MFLOP per token at 256 cached positions). Transformers "
        f"(PyTorch, float32) reference from DESIGN §5: {TRANSFORMERS_BATCH1_TOK_S:.0f} tok/s "
        f"at batch 1, {TRANSFORMERS_BATCH32_TOK_S:.0f} tok/s at batch 32.",
        "",
        "GQA attention alone, one decode step over all 30 layers' caches (256 slots, "
        "in-place update, donated):",
        "",
        "| formulation | batch 1 | batch 32 |",
        "| --- | --- | --- |",
    ]
    for name in ATTENTION_FORMULATIONS:
        lines.append(f"| {name} | {attention[name, 1]:.2f} ms | {attention[name, 32]:.1f} ms |")
    lines += [
        "",
        "`llama.py` decodes with multiply-reduce over the cache in its stored "
        "[b, kv_heads, s, head_dim] layout and uses matrix products with the cache on the "
        "left for prefill (many queries, compute-bound). The textbook einsum makes XLA:CPU "
        "copy a transposed cache in every layer; with the cache on the left there is no "
        "transpose, but at batch 1 (where XLA drops the size-1 batch dimension) the "
        "decoder's updated cache was copied again per layer; multiply-reduce streams the "
        "cache once and updates it in place. Other choices measured while writing the "
        "decoder: the tied head as `einsum('vh,bth->btv')` (table first) avoids a 113 MB "
        "transposed copy of the embedding per step, and fusing q/k/v and gate/up into one "
        "product each gained about 10% at batch 1.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
