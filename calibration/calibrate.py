"""Calibrate a model pair end to end: collect records, fit, derive thresholds.

`uhlm calibrate` runs the three jobs in order into one run directory: `collect` (resumable
with `--resume`), `fit` (NumPyro; writes `fit.json` and posterior draws) and `threshold`
(analytic, posterior and distribution-free thresholds; writes `thresholds.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from calibration import collect, derive_thresholds, fit


@dataclasses.dataclass(frozen=True)
class Config:
    """The three stages' settings.

    Attributes:
        collect: record collection.
        num_warmup: NUTS warmup iterations per chain.
        num_samples: NUTS draws per chain.
        risk: `ε`, the tolerated expected rejection risk of skipping, in (0, 1).
        confidence: `1 − δ`, in (0, 1).
    """

    collect: collect.Config
    num_warmup: int = 500
    num_samples: int = 500
    risk: float = 0.05
    confidence: float = 0.9

    def fit_config(self) -> fit.Config:
        return fit.Config(
            run_dir=self.collect.out,
            num_warmup=self.num_warmup,
            num_samples=self.num_samples,
            seed=self.collect.seed,
        )

    def thresholds_config(self) -> derive_thresholds.Config:
        return derive_thresholds.Config(
            run_dir=self.collect.out,
            risk=self.risk,
            confidence=self.confidence,
            seed=self.collect.seed,
        )

    def __post_init__(self):
        # Validate the later stages now, before minutes of collection.
        self.fit_config()
        self.thresholds_config()


@dataclasses.dataclass(frozen=True)
class Result:
    collect: collect.Result
    fit: fit.Result
    thresholds: derive_thresholds.Result


def run(cfg: Config) -> Result:
    collected = collect.run(cfg.collect)
    fitted = fit.run(cfg.fit_config())
    derived = derive_thresholds.run(cfg.thresholds_config())
    return Result(collect=collected, fit=fitted, thresholds=derived)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    collect.add_arguments(parser)
    parser.add_argument("--num-warmup", type=int, default=500, help="NUTS warmup per chain")
    parser.add_argument("--num-samples", type=int, default=500, help="NUTS draws per chain")
    parser.add_argument("--risk", type=float, default=0.05, help="tolerated risk ε in (0, 1)")
    parser.add_argument("--confidence", type=float, default=0.9, help="confidence 1 − δ in (0, 1)")


def main(args: argparse.Namespace) -> int:
    try:
        result = run(
            Config(
                collect=collect.config_from_args(args),
                num_warmup=args.num_warmup,
                num_samples=args.num_samples,
                risk=args.risk,
                confidence=args.confidence,
            )
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"uhlm calibrate: error: {err}", file=sys.stderr)
        return 2
    summary = {
        "run_dir": str(result.collect.run_dir),
        "num_tokens": result.collect.num_tokens,
        "thresholds": result.thresholds.summary,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(derive_thresholds.format_summary(result.thresholds.summary))
        print(f"run directory: {result.collect.run_dir}")
    return 0
