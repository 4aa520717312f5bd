"""`make demo` from a fresh clone: wall time, per stage, and the numbers it computed.

Clones this repository into a temporary folder and runs `make demo` there twice with an
empty weight cache (`UHLM_CACHE_DIR` in the temporary folder): the first run includes
making the virtual environment (pip, from its local cache of wheels when it has one) and
dequantizing SmolLM2; the second reuses both. Each run's `demo.json` gives the stage times
and the headline numbers, which are written to RESULTS.md as computed.

Usage: .venv/bin/python -m benchmarks.demo [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.results import machine, write_section

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 600.0
GOAL_S = 300.0


def _make_demo(clone: Path, env: dict[str, str], quick: bool) -> tuple[float, dict]:
    command = ["make", "demo"] + (["ARGS=--quick"] if quick else [])
    start = time.perf_counter()
    subprocess.run(command, cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, json.loads((clone / "runs" / "demo" / "demo.json").read_text())


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time `uhlm demo --quick`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "uhlm_jax"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        env = {**os.environ, "UHLM_CACHE_DIR": str(Path(tmp) / "weights")}
        env.pop("VIRTUAL_ENV", None)
        first_s, first = _make_demo(clone, env, args.quick)
        second_s, second = _make_demo(clone, env, args.quick)
    stages = "\n".join(
        f"| {name} | {first['stage_seconds'][name]:.1f} s | {second['stage_seconds'][name]:.1f} s |"
        for name in first["stage_seconds"]
    )
    s = second
    pearson = s["u_beta_pearson_interval"] or [float("nan")] * 2
    body = f"""Machine: {machine()}.

`make demo`{" ARGS=--quick" if args.quick else ""} in a fresh clone (`git clone` of this
repository), with an empty weight cache. First run: making `.venv` and installing the
project (pip), dequantizing SmolLM2 and the demo; second run: the demo alone, reusing the
environment and the cached weights. Target: under {TARGET_S / 60:.0f} min end to end,
goal {GOAL_S / 60:.0f} min (DESIGN.md §5).

| run | wall time | of which the demo (`total_seconds` in demo.json) |
| --- | --- | --- |
| first (fresh clone: install + demo) | {_minutes(first_s)} | {_minutes(first['total_seconds'])} |
| second (demo only) | {_minutes(second_s)} | {_minutes(second['total_seconds'])} |

| stage | first run | second run |
| --- | --- | --- |
{stages}

Numbers the second run computed (`runs/demo/demo.json`; pair `{s['pair']}`, {s['link']}
link, {s['calibration_tokens']} calibration tokens, {s['evaluation_prompts']} evaluation
prompts):

- draft acceptance under HLM: {s['draft_acceptance_hlm']:.3f};
- Pearson r(u, β): {s['u_beta_pearson']:.3f} [{pearson[0]:.3f}, {pearson[1]:.3f}];
- thresholds: {", ".join(f"{k} {v:.3f}" for k, v in s['thresholds'].items())} (ε = {s['risk']},
  confidence {s['confidence']});
- U-HLM at the {s['operating_threshold']} threshold: skip rate {s['uhlm_skip_rate']:.3f},
  realised risk per token {s['uhlm_realised_risk_per_token']:.3f}, accuracy
  (MiniLM cosine) {s['uhlm_accuracy_pct_of_llm']:.1f}% of the LLM's (SLM only
  {s['slm_only_accuracy_pct_of_llm']:.1f}%), throughput {s['uhlm_speedup_vs_hlm']:.3f}× HLM's
  (bound 1/(1 − s) = {s['uhlm_speedup_bound']:.3f}×).
"""
    write_section("uhlm demo" + (" --quick" if args.quick else ""), body)
    print(body)


if __name__ == "__main__":
    main()
