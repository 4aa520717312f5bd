"""Calibrate a model pair end to end: collect records, fit, derive thresholds.

`uhlm calibrate` runs the three jobs in order into one run directory: `collect` (resumable
with `--resume`), `fit` (NumPyro; writes `fit.json` and posterior draws) and `threshold`
(analytic, posterior and distribution-free thresholds; writes `thresholds.json`).
"""

from __future__ import annotations

import argparse
import dataclasses

from calibration import collect, derive_thresholds, fit
from uhlm_jax import cli_config, console


@dataclasses.dataclass(frozen=True)
class Config:
    """The three stages' settings.

    Attributes:
        collect: record collection.
        num_warmup: NUTS warmup iterations per chain.
        num_samples: NUTS draws per chain.
        risk: `ε`, the tolerated expected rejection risk of skipping, in (0, 1).
        confidence: `1 − δ`, in (0, 1).
        refit_splits: validation splits on which the risk-bounded threshold of a NUTS
            model is refitted.
    """

    collect: collect.Config
    num_warmup: int = 500
    num_samples: int = 500
    risk: float = 0.05
    confidence: float = 0.9
    refit_splits: int = derive_thresholds.Config.refit_splits

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
            refit_splits=self.refit_splits,
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


def run(cfg: Config, progress: bool = True) -> Result:
    collected = collect.run(cfg.collect, progress)
    fitted = fit.run(cfg.fit_config(), quiet=not progress)
    derived = derive_thresholds.run(cfg.thresholds_config(), quiet=not progress)
    return Result(collect=collected, fit=fitted, thresholds=derived)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, collect.Config, collect.FLAGS)
    cli_config.add_arguments(parser, Config, cli_config.Flags(hidden=("collect",)))
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    collect_cfg = cli_config.config_from_args(collect.Config, args)
    result = run(cli_config.config_from_args(Config, args, collect=collect_cfg),
                 progress=not args.quiet)
    summary = {
        "run_dir": str(result.collect.run_dir),
        "num_tokens": result.collect.num_tokens,
        "thresholds": result.thresholds.summary,
    }
    if args.json:
        print(console.json_text(summary))
    else:
        print(derive_thresholds.format_summary(result.thresholds.summary))
        print(f"run directory: {result.collect.run_dir}")
    return 0
