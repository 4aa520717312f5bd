"""Calibration collection time per 1000 tokens, for the toy pair and the SmolLM2 pair.

Runs `calibration.collect` twice on the shipped calibration prompts: the first run
includes loading and compiling, the second (same shapes, new run directory) measures the
steady state. The SmolLM2 pair is `smollm2-exit`: SmolLM2-135M-Instruct verifying its
early-exit draft (all five uncertainty measures recorded, as `uhlm collect` does).

Usage: .venv/bin/python -m benchmarks.collect [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.results import machine, write_section
from calibration import collect

CASES = {"toy": (32, 32, 16), "smollm2-exit": (16, 32, 16)}  # prompts, tokens, batch


def seconds_per_1000_tokens(pair: str, prompts: int, tokens: int, batch: int) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        timings = []
        for attempt in range(2):
            cfg = collect.Config(
                pair=pair, prompts=None, split="calibration", out=str(Path(tmp) / f"r{attempt}"),
                num_prompts=prompts, max_new_tokens=tokens, batch_size=batch,
            )  # fmt: skip
            start = time.perf_counter()
            result = collect.run(cfg)
            timings.append(time.perf_counter() - start)
    return result.num_tokens, timings[0], 1000 * timings[1] / result.num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy pair only")
    args = parser.parse_args()
    cases = {"toy": CASES["toy"]} if args.quick else CASES
    rows = []
    for pair, (prompts, tokens, batch) in cases.items():
        num_tokens, first_s, per_1000_s = seconds_per_1000_tokens(pair, prompts, tokens, batch)
        rows.append(
            f"| {pair} | {prompts} × {tokens} (batch {batch}) | {num_tokens} | {first_s:.1f} s | "
            f"{per_1000_s:.2f} s |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            "`uhlm collect` in HLM mode with all five uncertainty measures; the first run "
            "includes loading and compiling, the per-1000-token time is from a second run.",
            "",
            "| pair | prompts × max new tokens | tokens | first run | per 1000 tokens |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_section("Calibration collection", body)


if __name__ == "__main__":
    main()
