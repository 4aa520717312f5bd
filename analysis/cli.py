"""The `uhlm` command: dispatches each subcommand to a job module.

Every job module exposes `add_arguments(parser)` (its flags, built from its `Config` by
`uhlm_jax.cli_config`) and `main(args) -> int`, and may say how an interrupted run goes
on (`HOW_TO_CONTINUE`). Modules are imported only when their
subcommand runs, so `uhlm --help` stays fast.

Failures end in one line on stderr, here and nowhere else: bad input (`ValueError`, a
missing file) exits 2, a folder that cannot be written exits 1, and Ctrl-C exits 130 with
how to continue.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

from uhlm_jax.cli_config import CONFIG_KEY

# ArviZ 0.23 announces its coming 1.0 refactor once a day, on first import: noise for a
# user of this tool, which pins arviz<1. Set before any job module imports arviz.
warnings.filterwarnings(
    "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
)

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
    "study": (
        "analysis.study",
        "calibrate, evaluate, sweep and report a pair into one run directory (resumable)",
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
    "rollout": (
        "analysis.run_mode", "run an SLM/LLM pair on prompts in one mode (U-HLM, HLM, ...)"
    ),
}


# Errors of a folder or file that cannot be written (read-only mount, no permission, full).
_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag, then a hint."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="uhlm",
        description="Uncertainty-aware hybrid LM inference (U-HLM) in JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag (already reported in one line)
        return exit_.code
    if args.command is None:
        build_parser().print_help()
        return 2
    prog = f"uhlm {args.command}"
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.main(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(module, "HOW_TO_CONTINUE", None) or _how_to_continue(args)
        print(f"\n{prog}: interrupted; {hint}", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        where = err.filename or "the output folder"
        print(f"{prog}: error: cannot write {where}: {err.strerror}; choose a writable "
              "folder", file=sys.stderr)
        return 1


def _how_to_continue(args: argparse.Namespace) -> str:
    """How to pick up an interrupted job, from the flags it has."""
    flags = getattr(args, CONFIG_KEY, {})
    if "resume" in flags:
        return "run the same command with --resume to continue where it stopped"
    if "workdir" in flags:
        return "run the same command again to continue from the last checkpoint in --workdir"
    return "run the command again to start over"


if __name__ == "__main__":
    sys.exit(main())
