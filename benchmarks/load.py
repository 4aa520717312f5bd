"""Benchmark: time and peak memory of loading a model, cold and from the weight cache.

Each load runs in a fresh interpreter (`load_model(name, dtype)`), in three states:

* **cold**: the cache off (`UHLM_CACHE_DIR=""`): the GGUF file is read, dequantized and
  converted tensor by tensor, and the tokenizer is rebuilt;
* **writing the cache**: the same, into an empty cache folder, writing the entry on the way;
* **from the cache**: the entry just written is read back.

Peak memory is the child's peak resident set (VmHWM) above its resident set after
importing jax and the loader and starting the backend, divided by the loaded params' bytes
(the bound of lean loading is 1.25×). Linux's `ru_maxrss` is not used: it carries the
launching process's peak across exec. Times are wall-clock seconds of the load call on a
machine shared with other work, so they are upper bounds; the memory ratios do not depend
on the load. `--compare PATH` adds the same rows for the loader of another checkout (e.g.
the code before lean loading).

Writes (replaces) the "## Model loading" section of benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.load [--model smollm2-135m-instruct] [--compare ../old]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.results import machine, write_section

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
# The bound of lean loading: peak resident memory while loading, above what the process
# held before, at most this multiple of the loaded params' bytes (one copy of the model
# plus a quarter for chunks, the allocator and the runtime's own buffers).
PEAK_RATIO = 1.25

# Runs in a fresh interpreter: `load_model(path, dtype)`, or with `--weights-only` the
# weights of a Hugging Face folder without a tokenizer (`load_hf_checkpoint`).
_CHILD = """
import json, sys, time
import jax, numpy as np
from uhlm_jax.models.hf import load_hf_checkpoint
from uhlm_jax.models.registry import load_model

def status_bytes(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

jax.device_put(np.zeros(1)).block_until_ready()
baseline = status_bytes("VmRSS")
path, dtype, weights_only = sys.argv[1], sys.argv[2], sys.argv[3:] == ["--weights-only"]
start = time.perf_counter()
if weights_only:
    params = load_hf_checkpoint(path, dtype)
else:
    params = load_model(path, dtype).params
jax.block_until_ready(params)
seconds = time.perf_counter() - start
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
increase = status_bytes("VmHWM") - baseline
print(json.dumps({"seconds": seconds, "increase": increase, "param_bytes": param_bytes}))
"""


def load_in_child(
    model: str | os.PathLike,
    dtype: str,
    cache: str,
    repo: Path = REPO,
    weights_only: bool = False,
) -> dict:
    """Loads a model in a fresh interpreter and reports its time and peak memory.

    Args:
        model: name or path for `load_model` (or a Hugging Face folder, `weights_only`).
        dtype: parameter dtype name.
        cache: `UHLM_CACHE_DIR` of the child ("" turns the cache off).
        repo: the checkout whose loader runs.
        weights_only: load only the weights of a Hugging Face folder.

    Returns:
        `{"seconds", "increase", "param_bytes"}`: the load's wall time, the peak resident
        bytes above those held before it, and the loaded params' bytes.

    Raises:
        RuntimeError: with the child's error output, if it fails.
    """
    env = {**os.environ, "PYTHONPATH": str(repo), "UHLM_CACHE_DIR": cache}
    argv = [sys.executable, "-c", _CHILD, os.fspath(model), dtype]
    done = subprocess.run(
        argv + ["--weights-only"] * weights_only,
        env=env, capture_output=True, text=True, check=False, cwd=repo, timeout=1200,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loading {model} {dtype} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(repo: Path, model: str, dtype: str) -> dict[str, dict]:
    """The three loads of `model` in `dtype` with `repo`'s loader."""
    with tempfile.TemporaryDirectory() as cache:
        return {
            "cold": load_in_child(model, dtype, "", repo),
            "writing the cache": load_in_child(model, dtype, cache, repo),
            "from the cache": load_in_child(model, dtype, cache, repo),
        }


def _rows(label: str, model: str, dtype: str, runs: dict[str, dict]) -> list[str]:
    rows = []
    for state, run in runs.items():
        ratio = run["increase"] / run["param_bytes"]
        verdict = "meets" if ratio <= PEAK_RATIO else "misses"
        rows.append(
            f"| {label} | {model} | {dtype} | {state} | {run['seconds']:.2f} s | "
            f"{run['param_bytes'] / 1e6:.0f} MB | {run['increase'] / 1e6:.0f} MB | "
            f"{ratio:.2f}× | {verdict} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="name or path (repeatable)")
    parser.add_argument("--compare", type=Path, help="another checkout whose loader to add")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    models = args.model or ["smollm2-135m-instruct"]
    load_before = os.getloadavg()
    lines = []
    for model in models:
        for dtype in DTYPES:
            lines += _rows("this loader", model, dtype, measure(REPO, model, dtype))
            if args.compare is not None:
                label = f"`{args.compare.name}` (compare)"
                lines += _rows(label, model, dtype, measure(args.compare.resolve(), model, dtype))
    load_after = os.getloadavg()
    body = "\n".join(
        [
            f"`python -m benchmarks.load`, {machine()}.",
            f"Load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end: "
            "the machine is shared with other work, so the times are upper bounds; the memory "
            "ratios do not depend on the load.",
            "",
            "Each load runs in a fresh interpreter: `load_model(model, dtype)` cold (cache "
            "off), writing the weight cache into an empty folder, then from that cache. "
            "*Peak growth* is the process's peak resident set (VmHWM) above its resident "
            "set after importing jax and the loader; the ratio divides it by the loaded "
            f"params' bytes. Target (lean loading): at most {PEAK_RATIO}×.",
            "",
            "| loader | model | dtype | load | time | params | peak growth | ratio | "
            f"≤ {PEAK_RATIO}× |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("Model loading", body)


if __name__ == "__main__":
    main()
