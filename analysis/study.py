"""The whole method on a pair, resumable: `uhlm study --pair qwen-coder --out runs/qwen`.

A study runs, into one run directory, the stages the individual commands run:

1. collect per-token records on the calibration prompts (`uhlm collect`);
2. fit uncertainty → rejection probability (`uhlm fit`);
3. derive the thresholds (`uhlm threshold --run`);
4. evaluate the five modes with real rollouts on held-out prompts (`uhlm evaluate`);
5. sweep thresholds, links and modes by trace replay (`uhlm sweep`);
6. write the report and its plots (`uhlm report`),

then prints the paper-style table and the headline numbers. Its sizes are the jobs' own
settings (`--calibration-prompts` is collect's `--num-prompts`, `--evaluation-prompts`
evaluate's), and the later stages take the defaults `uhlm calibrate` gives them.

Resuming: a stage counts as done when the files it writes (`calibration.run_dir`) are all
there, no older than those of the stage before, and made with the study's settings; a
rerun of the same command runs only the stages that are not done, and every stage after
the first one it runs. An unfinished collection continues from its last checkpoint, as
`uhlm collect --resume` does. So a run directory made by the individual commands with the
same settings is continued, not redone. A setting that differs from the one a stage's
file records is an error naming it, before anything runs. A fresh study first loads the
pair, so that a missing model fails before anything is written.

Each stage prints one line when it starts and one when it ends, with the time so far and
an estimate of the time left, on stderr, the same in a terminal and in a log file; the
stages' own progress shows between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
import pandas as pd

from analysis import evaluate, report, sweep, tables
from calibration import calibrate, collect, derive_thresholds, fit, records
from calibration import run_dir as rd
from calibration.prompts import embedded_prompts_path, read_prompts
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console, pricing
from uhlm_jax.console import TextStream
from uhlm_jax.pair import load_pair

__all__ = [
    "PACE_PRIOR_S",
    "Config",
    "Result",
    "SettingMismatch",
    "Stages",
    "Work",
    "add_arguments",
    "describe",
    "headline",
    "main",
    "run",
]

HOW_TO_CONTINUE = "run the same command again to continue where it stopped"
# Prior weight, in seconds, of the expected pace in the time-left estimate.
PACE_PRIOR_S = 60.0


class Work(enum.Enum):
    """What a stage's time depends on: the pair's speed, or statistics on the CPU."""

    MODELS = "models"
    STATISTICS = "statistics"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm study` beyond those of `uhlm calibrate`.

    Attributes:
        calibrate: collection, fit and thresholds (`calibration.calibrate.Config`).
        evaluation_prompts: evaluate on the first this many prompts of the evaluation
            split (None: all).
        evaluation_split: the prompts' split that evaluation uses ("all": every prompt).
        link: link preset of the evaluation's throughput and of the report.
        cost_profile_name: the models the throughput columns price.
        skip_accuracy: score no accuracy in the evaluation (prompts without references).
    """

    calibrate: calibrate.Config
    evaluation_prompts: int | None = None
    evaluation_split: str = evaluate.EVALUATION_SPLIT
    link: ch.LinkPreset = ch.LinkPreset.MEDIUM
    cost_profile_name: str = pricing.NAMED_COSTS
    skip_accuracy: bool = False

    def __post_init__(self):
        # Validate the later stages now, before hours of collection.
        self.evaluate_config()
        self.sweep_config()
        self.report_config()

    @property
    def collection(self) -> collect.Config:
        return self.calibrate.collect

    @property
    def out(self) -> Path:
        return Path(self.collection.out)

    def collect_config(self, resume: bool) -> collect.Config:
        return dataclasses.replace(self.collection, resume=resume)

    def evaluate_config(self) -> evaluate.Config:
        return evaluate.Config(
            run_dir=str(self.out), prompts=self.collection.prompts, split=self.evaluation_split,
            num_prompts=self.evaluation_prompts, link=self.link,
            cost_profile_name=self.cost_profile_name, skip_accuracy=self.skip_accuracy,
        )

    def sweep_config(self) -> sweep.Config:
        return sweep.Config(run_dir=str(self.out), cost_profile_name=self.cost_profile_name)

    def report_config(self) -> report.Config:
        return report.Config(run_dir=str(self.out), link=self.link,
                             cost_profile_name=self.cost_profile_name)


@dataclasses.dataclass(frozen=True)
class Result:
    """What the study holds when it ends.

    Attributes:
        run_dir: the run directory.
        summary: the headline numbers (`headline`) and each stage's status and seconds.
        table: the paper-style table of the five modes (formatted strings).
        report_html, report_markdown: the report files.
        stage_seconds: wall-clock seconds of each stage that ran, by title.
    """

    run_dir: Path
    summary: dict[str, Any]
    table: pd.DataFrame
    report_html: Path
    report_markdown: Path
    stage_seconds: dict[str, float]


class SettingMismatch(ValueError):
    """A study's setting differs from the one a stage's file in the run directory records."""


# ------------------------------------------------------------------ the stages


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One stage: its title, the files it writes, what its time depends on, its job."""

    name: str
    title: str
    work: Work
    outputs: Callable[[Path], list[Path]]
    run: Callable[[bool], Any]  # progress -> result


def _files(*names: str) -> Callable[[Path], list[Path]]:
    return lambda out: [out / name for name in names]


def _collected(out: Path) -> list[Path]:
    return [out / rd.CONFIG_FILE, *sorted((out / rd.RECORDS_DIR).glob(rd.SHARD_GLOB))]


def _stages(cfg: Config, resume: bool) -> list[_Stage]:
    calib = cfg.calibrate
    return [
        _Stage("collect", "calibrate: collect per-token records on the calibration prompts",
               Work.MODELS, _collected,
               lambda progress: collect.run(cfg.collect_config(resume), progress)),
        _Stage("fit", "fit uncertainty -> rejection probability (NumPyro NUTS, SVI, hurdle)",
               Work.STATISTICS,
               _files(rd.FIT_FILE, rd.LINEAR_POSTERIOR_FILE, rd.HURDLE_POSTERIOR_FILE),
               lambda progress: fit.run(calib.fit_config(), quiet=not progress)),
        _Stage("thresholds", "derive the risk-averse, risk-prone and risk-bounded thresholds",
               Work.STATISTICS, _files(rd.THRESHOLDS_FILE),
               lambda progress: derive_thresholds.run(calib.thresholds_config(),
                                                       quiet=not progress)),
        _Stage("evaluate", "evaluate the five modes with real rollouts on held-out prompts",
               Work.MODELS, _files(rd.EVALUATION_FILE, rd.EVALUATION_SUMMARY_FILE),
               lambda progress: evaluate.run(cfg.evaluate_config(), progress)),
        _Stage("sweep", "sweep thresholds, links and modes by trace replay", Work.STATISTICS,
               _files(rd.SWEEP_FILE, rd.SWEEP_SUMMARY_FILE),
               lambda progress: sweep.run(cfg.sweep_config(), progress)),
        _Stage("report", "write the report and plots", Work.STATISTICS,
               _files(rd.REPORT_MARKDOWN_FILE, rd.REPORT_HTML_FILE),
               lambda progress: report.run(cfg.report_config())),
    ]


# Seconds of each stage on the embedded pair on two idle cores: (fixed, per token) where
# the stage generates tokens (calibration tokens for collect, evaluation prompts times
# reply length for evaluate), fitted to the demo's two sizes (fit and thresholds: the full
# demo's, with its 10 NUTS refits). The estimate follows the
# measured pace as stages end (`Stages`), so another pair's speed is learnt from its own.
_LOAD_SECONDS = 5.0
_SECONDS = {
    "collect": (11.0, 0.0095),
    "fit": (57.0, 0.0),
    "thresholds": (54.0, 0.0),
    "evaluate": (47.0, 0.034),
    "sweep": (4.0, 0.0),
    "report": (5.0, 0.0),
}


def _calibration_prompts(cfg: collect.Config) -> int:
    """How many prompts collection runs on (as `collect.run` selects them)."""
    prompts = read_prompts(cfg.prompts_path(), cfg.split)[cfg.first_prompt :]
    return len(prompts if cfg.num_prompts is None else prompts[: cfg.num_prompts])


def _evaluation_prompts(cfg: evaluate.Config) -> int:
    """How many prompts evaluation runs on (as `evaluate.run` selects them)."""
    return len(read_prompts(cfg.prompts or embedded_prompts_path(), cfg.split)[
        : cfg.num_prompts])


def _expected_seconds(cfg: Config, share_left: float) -> dict[str, float]:
    """Each stage's expected seconds; collection's scaled by the share of batches left."""
    max_new = cfg.collection.max_new_tokens
    tokens = {
        "collect": _calibration_prompts(cfg.collection) * max_new,
        "evaluate": _evaluation_prompts(cfg.evaluate_config()) * max_new,
    }
    expected = {name: fixed + per_token * tokens.get(name, 0)
                for name, (fixed, per_token) in _SECONDS.items()}
    expected["collect"] *= share_left
    return expected


# ------------------------------------------------------------ what is done


def _batches(cfg: collect.Config) -> tuple[int, int]:
    """Collection batches finished (checkpointed) and needed (at least one: with no
    prompts, collection runs to say so)."""
    steps = ocp.utils.checkpoint_steps(Path(cfg.out) / rd.CHECKPOINT_DIR)
    needed = max(1, math.ceil(_calibration_prompts(cfg) / cfg.batch_size))
    return max(steps, default=0), needed


def _json(value: Any) -> Any:
    """`value` as it reads back from a JSON file (tuples as lists)."""
    return json.loads(console.json_text(value))


def _mismatch(out: Path, name: str, recorded: Mapping[str, Any], wanted: Mapping[str, Any],
              fields: Mapping[str, str], hint: str) -> None:
    """Raises SettingMismatch naming the first key whose recorded value differs.

    `fields` renames a file's keys to the study's fields (which `main` shows as flags).
    """
    for key, value in wanted.items():
        old = recorded.get(key)
        if old != _json(value):
            field = fields.get(key, key)
            raise SettingMismatch(
                f"{str(out / name)!r} was made with {field}={old!r}, not {_json(value)!r}; "
                f"run the study with {field}={old!r}, {hint}"
            )


def _check_settings(cfg: Config) -> None:
    """Raises SettingMismatch if a stage's file records a setting other than the study's."""
    out = cfg.out
    another = "or choose another --out"
    redo = "or delete it to redo that stage with these settings, " + another
    run_config = rd.RunConfig.read(out)
    settings = json.loads(json.dumps(cfg.collection.settings()))
    _mismatch(out, rd.CONFIG_FILE, {"dtype": collect.DEFAULT_DTYPE, **run_config.settings},
              settings, {}, another)
    path = out / rd.FIT_FILE
    if path.is_file():
        wanted = {k: v for k, v in dataclasses.asdict(cfg.calibrate.fit_config()).items()
                  if k not in ("run_dir", "chain_method")}
        _mismatch(out, rd.FIT_FILE, rd.read_json(path).get("config", {}), wanted, {}, redo)
    path = out / rd.THRESHOLDS_FILE
    if path.is_file():
        wanted = {k: v for k, v in dataclasses.asdict(cfg.calibrate.thresholds_config()).items()
                  if k != "run_dir" and v is not None}
        _mismatch(out, rd.THRESHOLDS_FILE, rd.read_json(path).get("config", {}), wanted, {},
                  redo)
    path = out / rd.EVALUATION_SUMMARY_FILE
    if path.is_file():
        ev = cfg.evaluate_config()
        pair_costs = run_config.pair_profile(ev.cost_profile_name)
        costs = pricing.cost_caption(
            pricing.Pricing(preset=ev.link, pair=pair_costs).cost_profile(), pair_costs)
        wanted = {
            "prompts": str(ev.prompts or embedded_prompts_path()),
            "split": ev.split,
            "num_prompts": _evaluation_prompts(ev),
            "max_new_tokens": run_config.max_new_tokens,
            "seed": run_config.seed,
            "link": ev.link.name.lower(),
            "costs": costs,
        }
        _mismatch(out, rd.EVALUATION_SUMMARY_FILE, rd.read_json(path).get("settings", {}),
                  wanted, {"split": "evaluation_split", "num_prompts": "evaluation_prompts",
                           "costs": "cost_profile_name"}, redo)
    path = out / rd.SWEEP_SUMMARY_FILE
    if path.is_file():
        wanted = {k: v for k, v in cfg.sweep_config().as_json().items() if k != "run_dir"}
        _mismatch(out, rd.SWEEP_SUMMARY_FILE, rd.read_json(path).get("config", {}), wanted,
                  {}, redo)


def _newest(paths: list[Path]) -> float:
    return max(p.stat().st_mtime for p in paths)


def _done(stages: list[_Stage], out: Path, collected: bool) -> list[bool]:
    """Whether each stage is done: its files are there and no older than the files of the
    stage before it, which is done too (`collected`: collection finished)."""
    done = [collected]
    for before, stage in zip(stages, stages[1:], strict=False):
        files = stage.outputs(out)
        done.append(done[-1] and all(p.is_file() for p in files)
                    and min(p.stat().st_mtime for p in files) >= _newest(before.outputs(out)))
    return done


# ------------------------------------------------------------ progress


class Stages:
    """Prints each stage's start and end with the time so far and an estimate of the time
    left, as one timestamped line each.

    The estimate is each stage's expected seconds scaled by the pace (measured over
    expected seconds) of the stages already run whose time depends on the same thing
    (`Work`), with `PACE_PRIOR_S` seconds of prior weight on the expected pace, so one
    short stage does not swing it.

    Args:
        titles: the stages' titles, in order.
        expected: each stage's expected seconds; 0 for a stage that will be skipped.
        work: what each stage's time depends on.
        progress: print the lines (False: time the stages only).
        stream: where the lines go (default stderr).
        clock: seconds since some fixed point.
    """

    def __init__(self, titles: list[str], expected: list[float], work: list[Work],
                 progress: bool = True, stream: TextStream | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.titles, self.expected, self.work = titles, expected, work
        self.progress, self.stream, self.clock = progress, stream, clock
        self.start = clock()
        self.seconds: dict[str, float] = {}
        self._measured = {w: 0.0 for w in Work}
        self._expected_done = {w: 0.0 for w in Work}

    def _left(self, first: int) -> float:
        pace = {w: (self._measured[w] + PACE_PRIOR_S) / (self._expected_done[w] + PACE_PRIOR_S)
                for w in Work}
        return sum(pace[w] * e for w, e in zip(self.work[first:], self.expected[first:],
                                                strict=True))

    def _print(self, index: int, text: str) -> None:
        if self.progress:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{stamp} [{index + 1}/{len(self.titles)}] {text}",
                  file=self.stream or sys.stderr, flush=True)

    def skip(self, index: int, why: str) -> None:
        """Prints that stage `index` is skipped, and why."""
        self._print(index, f"{self.titles[index]}: {why}, skipped")

    def run(self, index: int, fn: Callable[[], Any]) -> Any:
        """Runs stage `index` (`fn`) between its start and end lines; returns its result."""
        began = self.clock()
        self._print(index, f"{self.titles[index]} (elapsed {console.clock(began - self.start)}"
                           f", about {console.clock(self._left(index))} left)")
        out = fn()
        ended = self.clock()
        seconds = ended - began
        self.seconds[self.titles[index]] = seconds
        self._measured[self.work[index]] += seconds
        self._expected_done[self.work[index]] += self.expected[index]
        self._print(index, f"done in {console.clock(seconds)} (elapsed "
                           f"{console.clock(ended - self.start)}, about "
                           f"{console.clock(self._left(index + 1))} left)")
        return out


# ------------------------------------------------------------ the run


def run(cfg: Config, progress: bool = True, stream: TextStream | None = None,
        restart: Callable[[Path], None] | None = None) -> Result:
    """Runs the stages that are not done into `cfg.out`; see the module docstring.

    Args:
        cfg: the study.
        progress: print the stage lines and the stages' own progress.
        stream: where the stage lines go (default stderr).
        restart: start afresh: after the pair loads, `restart(out)` must leave `out`
            without run files; every stage then runs.

    Raises:
        SettingMismatch: naming the setting, if a stage's file records another one.
    """
    out = cfg.out
    fresh = restart is not None or not (out / rd.CONFIG_FILE).is_file()
    if fresh:
        finished, needed = 0, 1
    else:
        _check_settings(cfg)
        finished, needed = _batches(cfg.collection)
    stages = _stages(cfg, resume=not fresh)
    expected = _expected_seconds(cfg, share_left=1 - min(finished, needed) / needed)
    done = [False] * len(stages) if fresh else _done(stages, out, finished >= needed)
    # A later stage reruns once an earlier one has run (`_done` says so by file times).
    titles = [s.title for s in stages]
    works = [s.work for s in stages]
    seconds = [0.0 if d else expected[s.name] for s, d in zip(stages, done, strict=True)]
    if fresh:
        titles.insert(0, f"load the {cfg.collection.pair} pair")
        works.insert(0, Work.MODELS)
        seconds.insert(0, _LOAD_SECONDS)
    timer = Stages(titles, seconds, works, progress, stream)
    first = 0
    if fresh:
        # Load first: a missing model fails before anything is written.
        timer.run(0, lambda: load_pair(cfg.collection.pair, dtype=cfg.collection.dtype))
        if restart is not None:
            restart(out)
        first = 1
    status = {}
    for i, (stage, is_done) in enumerate(zip(stages, done, strict=True)):
        if is_done:
            timer.skip(first + i, "done already")
            status[stage.name] = "done already"
            continue
        timer.run(first + i, lambda stage=stage: stage.run(progress))
        status[stage.name] = "ran"
    summary = headline(out, cfg.collection.pair)
    summary.update(run_dir=str(out), stages=status, stage_seconds=timer.seconds,
                   total_seconds=timer.clock() - timer.start)
    _, frame = rd.read_evaluation_summary(out)
    return Result(
        run_dir=out, summary=summary, table=tables.summary_table(frame),
        report_html=out / rd.REPORT_HTML_FILE, report_markdown=out / rd.REPORT_MARKDOWN_FILE,
        stage_seconds=timer.seconds,
    )


def headline(run_dir: Path, pair: str) -> dict[str, Any]:
    """The headline numbers of a run directory with every stage's files."""
    data, summary = rd.read_evaluation_summary(run_dir)
    rows = summary.to_dict(orient="records")
    by_mode = {row["mode"]: row for row in rows if row["mode"] != "uhlm"}
    uhlm = {row["threshold_name"]: row for row in rows if row["mode"] == "uhlm"}
    thresholds = rd.Thresholds.read(run_dir)
    operating = rd.operating_threshold(thresholds)
    op = uhlm[operating.name]
    pearson = rd.Fit.read(run_dir).correlations.get("pearson")
    return {
        "pair": pair,
        "link": data["settings"]["link"],
        "calibration_tokens": int(len(records.read_records(run_dir))),
        "evaluation_prompts": int(op["prompts"]),
        "draft_acceptance_hlm": by_mode["hlm"]["acceptance_rate"],
        "u_beta_pearson": None if pearson is None else pearson.estimate,
        "u_beta_pearson_interval": None if pearson is None else list(pearson.interval),
        "risk": thresholds.risk,
        "confidence": thresholds.confidence,
        "thresholds": data["thresholds"],
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
        "accuracy": tables.accuracy_caption(summary),
    }


def _pct(x: float | None) -> str:
    text = console.number(None if x is None else 100 * x, ".1f")
    return text if text == console.UNDEFINED else text + "%"


def describe(result: Result) -> str:
    """The text printed after the table: the headline numbers and where the report is."""
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
        f"{console.number(s['uhlm_accuracy_pct_of_llm'], '.1f')}% of the LLM's (SLM only: "
        f"{console.number(s['slm_only_accuracy_pct_of_llm'], '.1f')}%), correct answers "
        f"{_pct(s['uhlm_correct_rate'])} (LLM only: {_pct(s['llm_only_correct_rate'])}), "
        f"{s['uhlm_speedup_vs_hlm']:.2f}x HLM's "
        f"throughput ({s['link']} link; bound 1/(1 - s) = {s['uhlm_speedup_bound']:.2f}x).",
        s["accuracy"],
        f"Report: {result.report_html} (and {result.report_markdown.name}, plots/).",
        f"Done in {console.clock(s['total_seconds'])}.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `uhlm study`'s arguments: collection's, calibration's and the study's own."""
    parser.description = (
        "Run the whole method on a pair into one run directory: collect records on the "
        "calibration prompts, fit, derive thresholds, evaluate the five modes on held-out "
        "prompts, sweep and report. Rerun the same command to continue an interrupted "
        "study, or a run directory made by the individual commands with the same settings: "
        "stages whose files are there are skipped. Example: uhlm study --pair qwen-coder "
        "--calibration-prompts 100 --max-new-tokens 64 --evaluation-prompts 48 --out "
        "runs/qwen"
    )
    cli_config.add_arguments(parser, collect.Config, cli_config.Flags(
        required=("out",), names={"num_prompts": "calibration_prompts"},
        hidden=("resume", "distributed", "coordinator_address", "num_processes",
                "process_id"),
        help={"out": "the run directory; rerunning into it continues the study",
              "num_prompts": "collect records on the first this many calibration prompts "
              "(default: all)",
              "mesh": collect.FLAGS.help["mesh"]},
    ))
    cli_config.add_arguments(parser, calibrate.Config, cli_config.Flags(hidden=("collect",)))
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        hidden=("calibrate",), names={"cost_profile_name": "cost_profile"},
        help={"cost_profile_name": pricing.COST_PROFILE_HELP},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    collect_cfg = cli_config.config_from_args(collect.Config, args)
    calibrate_cfg = cli_config.config_from_args(calibrate.Config, args, collect=collect_cfg)
    cfg = cli_config.config_from_args(Config, args, calibrate=calibrate_cfg)
    try:
        result = run(cfg, progress=not args.quiet)
    except SettingMismatch as err:
        raise ValueError(cli_config.flag_message(str(err), getattr(
            args, cli_config.CONFIG_KEY))) from None
    if args.json:
        print(console.json_text(result.summary, indent=2))
        return 0
    print(tables.format_table(result.table))
    print()
    print(describe(result))
    return 0
