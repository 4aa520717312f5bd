"""Benchmark: analytic U-HLM throughput over a 10^6-point grid (SNR × skip rate × bandwidth).

DESIGN.md §5 target: an analytic threshold/throughput sweep of 10^6 grid points in under
1 s on the project's CPU, with no recompilation when a swept value changes.

Two layouts of the same 10^6 evaluations of `expected_throughput_tokens_per_s(UHLM, ...)`
under the poor-link preset with Rayleigh fading (TinyLlama-1.1B on the phone profile,
Llama-2-7B on the A100 profile, full 32000 × 16-bit uplink):

* **nested**: `vmap` over SNR, then bandwidth, then skip rate (100 each). The link terms
  do not depend on the skip rate, so `vmap` leaves them unbatched on the inner axis and
  they are computed 10^4 times rather than 10^6: one example, then vmap.
* **flat**: 10^6 independent (SNR, bandwidth, skip) triples, one `vmap`; every point pays
  for its own fading quadrature.

Compile time is measured separately (`lower().compile()`); run times are the median of
`--repeats` calls after a warm-up. The floor is the bytes the grid must touch (inputs and
the float32 output) over the ~29 GB/s a jitted reduction reads on this machine (§5).

Writes (replaces) the "## Link grid" section of benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.link_grid [--points-per-axis 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.results import RESULTS_PATH as RESULTS
from benchmarks.results import machine, write_section
from uhlm_jax import channel as ch
from uhlm_jax.modes import Mode

SECTION = "Link grid"
TARGET_S = 1.0
MEMORY_BYTES_PER_S = 29e9  # DESIGN.md §5, jitted reduction on the 2-core machine
SNR_DB = (-20.0, 40.0)
BANDWIDTH_HZ = (1e6, 100e6)
SKIP_RATE = (0.0, 0.9)


def _profile() -> ch.CostProfile:
    return ch.CostProfile(
        slm=ch.Deployment(ch.ModelSize.TINYLLAMA_1_1B, ch.Device.PHONE_SOC),
        llm=ch.Deployment(ch.ModelSize.LLAMA_2_7B, ch.Device.DATACENTER_GPU),
        link=ch.link_from_budget(ch.LinkPreset.POOR),
        vocab_size=32000,
    )


def throughput(profile: ch.CostProfile, snr_db, bandwidth_hz, skip_rate):
    """U-HLM expected tokens/s at one grid point."""
    link = profile.link.replace(mean_snr_db=snr_db, bandwidth_hz=bandwidth_hz)
    return ch.expected_throughput_tokens_per_s(Mode.UHLM, profile.replace(link=link), skip_rate)


def nested_grid(profile, snr_db, bandwidth_hz, skip_rate):
    """[snr, bandwidth, skip] grid by nested vmap."""
    f = jax.vmap(throughput, in_axes=(None, None, None, 0))
    f = jax.vmap(f, in_axes=(None, None, 0, None))
    f = jax.vmap(f, in_axes=(None, 0, None, None))
    return f(profile, snr_db, bandwidth_hz, skip_rate)


def flat_grid(profile, snr_db, bandwidth_hz, skip_rate):
    """Independent points by one vmap."""
    return jax.vmap(throughput, in_axes=(None, 0, 0, 0))(profile, snr_db, bandwidth_hz, skip_rate)


def _time(fn, args, repeats: int) -> tuple[float, float, jax.Array]:
    """(compile_s, median run_s, output) of jit(fn)(*args)."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*args).block_until_ready()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = compiled(*args).block_until_ready()
        runs.append(time.perf_counter() - start)
    return compile_s, statistics.median(runs), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-axis", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()
    n = args.points_per_axis
    points = n**3
    profile = _profile()
    snr = jnp.linspace(*SNR_DB, n, dtype=jnp.float32)
    width = jnp.geomspace(*BANDWIDTH_HZ, n, dtype=jnp.float32)
    skip = jnp.linspace(*SKIP_RATE, n, dtype=jnp.float32)

    nested_compile_s, nested_s, nested = _time(
        nested_grid, (profile, snr, width, skip), args.repeats
    )
    s3, w3, k3 = (a.reshape(-1) for a in jnp.meshgrid(snr, width, skip, indexing="ij"))
    flat_compile_s, flat_s, flat = _time(flat_grid, (profile, s3, w3, k3), args.repeats)
    max_rel_diff = float(jnp.max(jnp.abs(flat.reshape(nested.shape) / nested - 1.0)))

    out_bytes = points * 4
    nested_floor_s = (out_bytes + 3 * n * 4) / MEMORY_BYTES_PER_S
    flat_floor_s = (out_bytes + 3 * points * 4) / MEMORY_BYTES_PER_S
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")

    def verdict(run_s: float) -> str:
        if run_s < TARGET_S:
            return f"meets ({TARGET_S / run_s:.1f}× under)"
        return f"MISSES ({run_s / TARGET_S:.1f}× over)"

    def row(name, compile_s, run_s, floor_s):
        return (
            f"| {name} | {compile_s:.2f} s | {run_s * 1e3:.1f} ms | "
            f"{run_s / points * 1e9:.1f} ns | {floor_s * 1e3:.2f} ms | {verdict(run_s)} |"
        )

    rows = "\n".join(
        [
            row(
                "nested vmap (link terms shared across skip rates)",
                nested_compile_s,
                nested_s,
                nested_floor_s,
            ),
            row(
                "flat vmap (every point pays its quadrature)", flat_compile_s, flat_s, flat_floor_s
            ),
        ]
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"""
`benchmarks/link_grid.py`, {today}; {machine()}; load average {load}
(the machine is shared, so times are upper bounds).

Analytic U-HLM throughput (`expected_throughput_tokens_per_s`: Rayleigh fading with
outage, 64-node quadrature per link evaluation), float32, on a {n} × {n} × {n} =
{points:,}-point grid: SNR {SNR_DB[0]:g}..{SNR_DB[1]:g} dB × bandwidth
{BANDWIDTH_HZ[0] / 1e6:g}..{BANDWIDTH_HZ[1] / 1e6:g} MHz × skip rate
{SKIP_RATE[0]:g}..{SKIP_RATE[1]:g}. Run time is the median of {args.repeats} calls after a
warm-up; compilation is timed separately. Target (DESIGN.md §5): 10^6 points in < {TARGET_S:g} s.

| layout | compile | run | per point | floor (bytes / 29 GB/s) | vs target |
| --- | --- | --- | --- | --- | --- |
{rows}

Both layouts agree to {max_rel_diff:.1e} (largest relative difference). The flat layout is
compute-bound (64 log2 per point), far above its memory floor; the nested one evaluates the
link terms {n * n:,} times instead of {points:,}, since they do not depend on the skip rate.
"""
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote {SECTION!r} in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
