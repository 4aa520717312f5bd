"""The `uhlm` command: dispatches each subcommand to a job module.

Every job module exposes `add_arguments(parser)` and `main(args) -> int`; its
docstring's first line is the subcommand's help. Modules are imported only when
their subcommand runs, so `uhlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (job module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("analysis.cache", "list or clear the machine's cache of dequantized GGUF models"),
    "calibrate": (
        "calibration.calibrate",
        "collect records, fit the uncertainty-to-rejection model and derive thresholds",
    ),
    "collect": (
        "calibration.collect",
        "collect per-token calibration records of a model pair (sharded, resumable)",
    ),
    "demo": (
        "analysis.demo",
        "the whole method on the default pair: calibrate, fit, thresholds, five modes, report",
    ),
    "evaluate": (
        "analysis.evaluate",
        "compare the five modes with real rollouts on held-out prompts (accuracy, TR, speed)",
    ),
    "fit": (
        "calibration.fit",
        "fit the uncertainty-to-rejection models (NumPyro) to a run's records",
    ),
    "generate": ("analysis.generate", "continue a prompt with a named model or a checkpoint path"),
    "link": (
        "analysis.link",
        "per-mode latency, token throughput and U-HLM speedup under a wireless link",
    ),
    "sweep": (
        "analysis.sweep",
        "replay (and roll out) every mode over a grid of thresholds, measures, links, payloads",
    ),
    "threshold": (
        "calibration.derive_thresholds",
        "skip thresholds: analytic from a slope and intercept, or with risk bounds from a run",
    ),
    "report": (
        "analysis.report",
        "write report.md and a self-contained report.html of a run directory",
    ),
    "train-draft": (
        "calibration.train_draft",
        "train the early-exit draft's exit head by distillation (optax, resumable)",
    ),
    "rollout": ("analysis.rollout", "run an SLM/LLM pair on prompts in one mode (U-HLM, HLM, ...)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uhlm",
        description="Uncertainty-aware hybrid LM inference (U-HLM) in JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
