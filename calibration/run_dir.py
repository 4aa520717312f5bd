"""The run directory: its file names, atomic writers, readers and typed views.

A run directory holds, by the command that writes each file:

    config.json                   collect    how the records were made (pair, seeds, versions)
    records/shard-*.parquet       collect    one row per generated token (`calibration.records`)
    checkpoints/                  collect    where an interrupted collection resumes
    fit.json                      fit        the fit's summary and diagnostics
    posterior_linear.npz          fit        NUTS and SVI draws of the linear model
    posterior_hurdle.npz          fit        NUTS draws of the hurdle model
    thresholds.json               threshold  the thresholds, their risk bounds and validation
    evaluation.parquet, .json     evaluate   the modes' real rollouts, per prompt and summed
    sweep.parquet, sweep.json     sweep      the replay grid and its settings
    sweep_comparison.parquet      sweep      replay against real rollouts
    report.md, report.html        report     the report
    plots/*.png                   report     its figures
    demo.json, .uhlm-demo         demo       the demo's headline numbers, and its marker

Every file is written atomically (`uhlm_jax.files.AtomicFile`): a reader sees the old file
or the new one, never a partial write, and files are 0666 less the umask (0644 under the
usual umask). `config.json`, `fit.json` and `thresholds.json` are read through frozen
views (`RunConfig`, `Fit`, `Thresholds`); `operating_threshold` is the one rule that picks
the threshold evaluate, report and demo operate at.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from uhlm_jax import channel as ch
from uhlm_jax import pricing, rejection
from uhlm_jax import threshold as T
from uhlm_jax.files import TMP_SUFFIX, AtomicFile
from uhlm_jax.models.config import ModelConfig

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "DEFAULT_DTYPE",
    "DEMO_FILE",
    "DEMO_MARKER",
    "EVALUATION_FILE",
    "EVALUATION_SUMMARY_FILE",
    "FIT_FILE",
    "HURDLE_POSTERIOR_FILE",
    "LINEAR_POSTERIOR_FILE",
    "OPERATING_ORDER",
    "PLOTS_DIR",
    "RECORDS_DIR",
    "REPORT_HTML_FILE",
    "REPORT_MARKDOWN_FILE",
    "SHARD_GLOB",
    "SWEEP_COMPARISON_FILE",
    "SWEEP_FILE",
    "SWEEP_SUMMARY_FILE",
    "THRESHOLDS_FILE",
    "Correlation",
    "Empirical",
    "Fit",
    "MethodValidation",
    "ModelComparison",
    "NamedThreshold",
    "NutsSummary",
    "OperatingThreshold",
    "ParamSummary",
    "RunConfig",
    "ThresholdName",
    "Thresholds",
    "Validation",
    "foreign_files",
    "operating_threshold",
    "pair_profile",
    "read_evaluation_summary",
    "read_json",
    "require_file",
    "require_run_dir",
    "shard_name",
    "write_json",
    "write_npz",
    "write_parquet",
    "write_text",
]

CONFIG_FILE = "config.json"
RECORDS_DIR = "records"
SHARD_GLOB = "shard-*.parquet"
CHECKPOINT_DIR = "checkpoints"
FIT_FILE = "fit.json"
LINEAR_POSTERIOR_FILE = "posterior_linear.npz"
HURDLE_POSTERIOR_FILE = "posterior_hurdle.npz"
THRESHOLDS_FILE = "thresholds.json"
EVALUATION_FILE = "evaluation.parquet"
EVALUATION_SUMMARY_FILE = "evaluation.json"
SWEEP_FILE = "sweep.parquet"
SWEEP_COMPARISON_FILE = "sweep_comparison.parquet"
SWEEP_SUMMARY_FILE = "sweep.json"
REPORT_MARKDOWN_FILE = "report.md"
REPORT_HTML_FILE = "report.html"
PLOTS_DIR = "plots"
DEMO_FILE = "demo.json"
DEMO_MARKER = ".uhlm-demo"
# The dtype of a run whose config.json records none (runs from before it was an option).
DEFAULT_DTYPE = "float32"

# The command that writes each file, for the error when it is missing.
_MADE_BY = {
    CONFIG_FILE: "uhlm calibrate --out {run_dir}",
    RECORDS_DIR: "uhlm calibrate --out {run_dir}",
    FIT_FILE: "uhlm fit {run_dir}",
    LINEAR_POSTERIOR_FILE: "uhlm fit {run_dir}",
    HURDLE_POSTERIOR_FILE: "uhlm fit {run_dir}",
    THRESHOLDS_FILE: "uhlm threshold --run {run_dir}",
    EVALUATION_FILE: "uhlm evaluate {run_dir}",
    EVALUATION_SUMMARY_FILE: "uhlm evaluate {run_dir}",
    SWEEP_FILE: "uhlm sweep {run_dir}",
    SWEEP_COMPARISON_FILE: "uhlm sweep {run_dir} --rollout-thresholds ...",
    SWEEP_SUMMARY_FILE: "uhlm sweep {run_dir}",
    REPORT_MARKDOWN_FILE: "uhlm report {run_dir}",
    REPORT_HTML_FILE: "uhlm report {run_dir}",
    DEMO_FILE: "uhlm demo --out {run_dir}",
}

# Every path (relative, '/'-separated, fnmatch patterns) a job writes into a run directory,
# temporary files of an interrupted write included.
_RUN_PATHS = (
    *_MADE_BY,
    f"{RECORDS_DIR}/{SHARD_GLOB}",
    CHECKPOINT_DIR,
    f"{CHECKPOINT_DIR}/*",
    PLOTS_DIR,
    f"{PLOTS_DIR}/*.png",
    DEMO_MARKER,
    f".*{TMP_SUFFIX}",
    f"*/.*{TMP_SUFFIX}",
)


def shard_name(index: int) -> str:
    """The file name of record shard `index` (inside `RECORDS_DIR`)."""
    return f"shard-{index:06d}.parquet"


# ----------------------------------------------------------------------- paths


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Returns `run_dir` as a Path, or raises ValueError if it is not a directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(
            f"run directory {str(path)!r} does not exist; collect records into it first "
            f"(`uhlm calibrate --out {path}`) or pass an existing run directory"
        )
    return path


def require_file(run_dir: str | os.PathLike, name: str) -> Path:
    """`run_dir/name`, or ValueError naming the file and the command that writes it."""
    path = Path(run_dir) / name
    if not path.exists():
        command = _MADE_BY[name].format(run_dir=run_dir)
        raise ValueError(f"{str(path)!r} is missing; write it with `{command}`")
    return path


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Paths inside `folder` (relative, sorted) that no job writes into a run directory."""
    root = Path(folder)
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not any(fnmatch.fnmatchcase(relative, p) for p in _RUN_PATHS):
            found.append(relative)
    return found


# ---------------------------------------------------------------------- writers


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically; NaN and ±inf are not allowed."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with AtomicFile(path) as f:
        f.write(text.encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` as UTF-8, atomically."""
    with AtomicFile(path) as f:
        f.write(text.encode())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes arrays to an `.npz` file, atomically."""
    with AtomicFile(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Writes a table as Parquet (without its index), atomically."""
    with AtomicFile(path) as f:
        df.to_parquet(f, index=False)


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, raising ValueError naming the file if it is corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({err}); delete it and rerun the job that writes it"
        ) from err


def read_evaluation_summary(
    run_dir: str | os.PathLike,
) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """`evaluation.json` of a run directory: its contents and the summary frame, or None."""
    path = Path(run_dir) / EVALUATION_SUMMARY_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    summary = pd.DataFrame(data["summary"])
    for column in summary.columns:
        if column not in ("label", "mode", "threshold_name"):
            summary[column] = pd.to_numeric(summary[column], errors="coerce").astype(float)
    return data, summary


class _FileView:
    """A typed view of the run directory's JSON file `FILE`, built by `from_json`."""

    FILE: ClassVar[str]

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> Self:
        """Reads `run_dir/FILE`; ValueError naming the file if it is missing."""
        return cls.from_json(read_json(require_file(require_run_dir(run_dir), cls.FILE)))

    @classmethod
    def read_optional(cls, run_dir: str | os.PathLike) -> Self | None:
        """Reads `run_dir/FILE`, or None where there is none."""
        path = Path(run_dir) / cls.FILE
        return cls.from_json(read_json(path)) if path.is_file() else None


# ------------------------------------------------------------------------ views


def _get(data: Any, *keys: str) -> Any:
    """`data[k0][k1]…`, or None where a level is missing or null."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values or ())


@dataclasses.dataclass(frozen=True)
class RunConfig(_FileView):
    """`config.json`: how the records were made (written by `uhlm collect`).

    Attributes:
        pair: the pair's name ("" when not recorded).
        settings: the collection's settings (`collect.Config.settings()`).
        max_new_tokens, seed, draft_temperature, llm_temperature: the decoding settings,
            with collect's defaults where not recorded.
        dtype: the models' dtype name (`DEFAULT_DTYPE` where not recorded).
        slm_config, llm_config: the models' recorded `ModelConfig` fields, if recorded.
        measures: the recorded uncertainty measures.
        num_prompts: the prompts the collection covers, if recorded (else its
            `--num-prompts`, if given).
        versions: package versions of the collection.
    """

    FILE: ClassVar[str] = CONFIG_FILE

    pair: str = ""
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_new_tokens: int = 64
    seed: int = 0
    draft_temperature: float = 1.0
    llm_temperature: float = 1.0
    dtype: str = DEFAULT_DTYPE
    slm_config: Mapping[str, Any] | None = None
    llm_config: Mapping[str, Any] | None = None
    measures: tuple[str, ...] = ()
    num_prompts: int | None = None
    versions: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunConfig:
        settings = dict(data.get("settings") or {})
        d = cls()
        return cls(
            pair=settings.get("pair") or _get(data, "pair", "name") or "",
            settings=settings,
            max_new_tokens=int(settings.get("max_new_tokens", d.max_new_tokens)),
            seed=int(settings.get("seed", d.seed)),
            draft_temperature=float(settings.get("draft_temperature", d.draft_temperature)),
            llm_temperature=float(settings.get("llm_temperature", d.llm_temperature)),
            dtype=settings.get("dtype") or DEFAULT_DTYPE,
            slm_config=_get(data, "pair", "slm"),
            llm_config=_get(data, "pair", "llm"),
            measures=tuple(data.get("measures") or ()),
            num_prompts=_int(data.get("num_prompts", settings.get("num_prompts"))),
            versions=dict(data.get("versions") or {}),
        )


    def pair_profile(self, cost_profile: str) -> ch.PairProfile | None:
        """The pair `cost_profile` prices for this run (`uhlm_jax.pricing.pair_profile`).

        The recorded models' configs at the run's dtype; a run that records only the
        pair's name loads the pair.
        """
        configs = None
        if self.slm_config and self.llm_config:
            configs = (ModelConfig.from_fields(self.slm_config),
                       ModelConfig.from_fields(self.llm_config))
        return pricing.pair_profile(cost_profile, self.pair, configs, self.dtype)


def pair_profile(run_dir: str | os.PathLike, cost_profile: str) -> ch.PairProfile | None:
    """The pair `cost_profile` prices for the run in `run_dir` (`RunConfig.pair_profile`).

    Raises:
        ValueError: for an unknown profile name, or `pair` where `run_dir` has no
            `config.json` that names a pair.
    """
    run_config = RunConfig.read_optional(run_dir) if cost_profile == pricing.PAIR_COSTS else None
    if run_config is None:
        return pricing.pair_profile(cost_profile)
    return run_config.pair_profile(cost_profile)


@dataclasses.dataclass(frozen=True)
class Correlation:
    """A correlation of `u` and `β` with its bootstrap interval."""

    estimate: float
    interval: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    """Posterior summary of one parameter (ArviZ: bulk ESS and rank-normalised r-hat)."""

    mean: float | None
    sd: float | None
    interval: tuple[float | None, float | None]
    r_hat: float | None
    ess: float | None


@dataclasses.dataclass(frozen=True)
class NutsSummary:
    """One model's NUTS run: divergences and each parameter's summary."""

    divergences: int | None
    params: Mapping[str, ParamSummary]


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """The models ranked by predictive accuracy (`calibration.fit.compare`).

    Attributes:
        criterion: how they are ranked (`PSIS-LOO`).
        unit: what one pointwise observation is (`token`).
        num_draws: posterior draws each model was scored with.
        best: the model that predicts best.
        table: one `rejection.ModelScore` per model, best first.
    """

    criterion: str
    unit: str
    num_draws: int
    best: str
    table: tuple[rejection.ModelScore, ...]


@dataclasses.dataclass(frozen=True)
class Fit(_FileView):
    """`fit.json`: the rejection model's fit (written by `uhlm fit`).

    Attributes:
        measure: the uncertainty measure fitted.
        seed: the fit's seed, if recorded.
        correlations: `pearson`, `spearman` of `u` and `β`.
        linear_prior, hurdle_prior: the models' priors, if recorded.
        nuts: `linear`, `hurdle` NUTS summaries.
        comparison: the models ranked by PSIS-LOO, if recorded.
        predictive_mean_covered: per model, whether each `u` bin's replicated range covers
            the observed mean `β`.
    """

    FILE: ClassVar[str] = FIT_FILE

    measure: str | None = None
    seed: int | None = None
    correlations: Mapping[str, Correlation] = dataclasses.field(default_factory=dict)
    linear_prior: rejection.LinearPrior | None = None
    hurdle_prior: rejection.HurdlePrior | None = None
    nuts: Mapping[str, NutsSummary] = dataclasses.field(default_factory=dict)
    comparison: ModelComparison | None = None
    predictive_mean_covered: Mapping[str, tuple[bool, ...]] = dataclasses.field(
        default_factory=dict
    )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fit:
        correlation = data.get("correlation") or {}
        correlations = {
            name: Correlation(float(c["estimate"]), tuple(float(x) for x in c["interval"]))
            for name in ("pearson", "spearman") if (c := correlation.get(name)) is not None
        }
        nuts = {}
        for model in ("linear", "hurdle"):
            block = _get(data, model, "nuts")
            if block is None:
                continue
            params = {
                name: ParamSummary(
                    mean=_float(p.get("mean")),
                    sd=_float(p.get("sd")),
                    interval=tuple(_float(x) for x in p.get("interval", (None, None))),
                    r_hat=_float(p.get("r_hat")),
                    ess=_float(p.get("ess")),
                )
                for name, p in (block.get("params") or {}).items()
            }
            nuts[model] = NutsSummary(divergences=block.get("divergences"), params=params)
        comp = data.get("comparison") or {}
        # A fit.json without a ranked table predates the PSIS-LOO comparison.
        comparison = None if "table" not in comp else ModelComparison(
            criterion=comp["criterion"],
            unit=comp["unit"],
            num_draws=int(comp["num_draws"]),
            best=comp["best"],
            table=tuple(rejection.ModelScore(**row) for row in comp["table"]),
        )
        checks = data.get("predictive_checks") or []
        prior = _get(data, "linear", "prior")
        seed = _get(data, "config", "seed")
        return cls(
            measure=data.get("measure"),
            seed=None if seed is None else int(seed),
            correlations=correlations,
            linear_prior=None if prior is None else rejection.LinearPrior(**prior),
            hurdle_prior=None if (hp := _get(data, "hurdle", "prior")) is None
            else rejection.HurdlePrior(**hp),
            nuts=nuts,
            comparison=comparison,
            predictive_mean_covered={
                model: tuple(bool(_get(c, model, "mean_covered")) for c in checks)
                for model in ("linear", "hurdle")
            } if checks else {},
        )



class ThresholdName(enum.StrEnum):
    """The named U-HLM thresholds of `thresholds.json`, as tables and files label them."""

    RISK_AVERSE = "risk-averse"
    RISK_PRONE = "risk-prone"
    RISK_BOUNDED = "risk-bounded"
    LEARN_THEN_TEST = "Learn-then-Test"


@dataclasses.dataclass(frozen=True)
class Empirical:
    """A threshold's realised risk on all records: per token, given a skip, skip rate."""

    per_token: float | None
    given_skip: float | None
    skip_rate: float | None


@dataclasses.dataclass(frozen=True)
class NamedThreshold:
    """One threshold of `thresholds.json`.

    Attributes:
        threshold: `u_th` as written; None means "skip nothing" (no grid point qualified).
        empirical: its realised risk on the records, when written.
        raw: a paper threshold's formula value before clipping to [0, 1], when written.
        reason: why the threshold is not the formula's value (or skips nothing), if so.
    """

    threshold: float | None
    empirical: Empirical | None = None
    raw: float | None = None
    reason: str | None = None

    @classmethod
    def from_json(cls, block: Any) -> NamedThreshold | None:
        if not block:
            return None
        emp = block.get("empirical")
        return cls(
            threshold=_float(block.get("threshold")),
            raw=_float(block.get("raw")),
            reason=block.get("reason"),
            empirical=None if emp is None else Empirical(
                per_token=_float(emp.get("per_token")),
                given_skip=_float(emp.get("given_skip")),
                skip_rate=_float(emp.get("skip_rate")),
            ),
        )


@dataclasses.dataclass(frozen=True)
class MethodValidation:
    """One method's prompt-split validation (`uhlm threshold`).

    Attributes:
        exceed_frequency_per_token, exceed_frequency_per_prompt: share of splits whose
            realised risk on the test prompts exceeds `ε` (pooled over tokens; mean of
            per-prompt risks).
        mean_skip_rate: mean share of test tokens skipped.
        no_skip_frequency: share of splits where the method skipped nothing.
        realised_risk_per_token: each split's realised risk per token.
    """

    exceed_frequency_per_token: float | None = None
    exceed_frequency_per_prompt: float | None = None
    mean_skip_rate: float | None = None
    no_skip_frequency: float | None = None
    realised_risk_per_token: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Validation:
    """The prompt-split validation of `thresholds.json`.

    Attributes:
        num_splits: random prompt splits.
        calibration_prompts, test_prompts: prompts per part of each split.
        allowed_exceed_frequency: `δ`, the share of splits allowed to exceed `ε`.
        methods: by method key (`ltt`, `posterior_linear`, `analytic_risk_averse`,
            `analytic_risk_prone`).
    """

    num_splits: int | None
    calibration_prompts: int | None
    test_prompts: int | None
    allowed_exceed_frequency: float | None
    methods: Mapping[str, MethodValidation]


# Tolerance of comparing an exceedance share k/n with δ.
_SHARE_MARGIN = 1e-9

# The validation method of each named threshold, and the risk its guarantee is about:
# Learn-then-Test bounds the per-prompt risk, the others the risk per token.
_VALIDATED_AS = {
    ThresholdName.LEARN_THEN_TEST: ("ltt", "exceed_frequency_per_prompt"),
    ThresholdName.RISK_BOUNDED: ("posterior_linear", "exceed_frequency_per_token"),
    ThresholdName.RISK_PRONE: ("analytic_risk_prone", "exceed_frequency_per_token"),
    ThresholdName.RISK_AVERSE: ("analytic_risk_averse", "exceed_frequency_per_token"),
}


@dataclasses.dataclass(frozen=True)
class Thresholds(_FileView):
    """`thresholds.json`: the thresholds of a run (written by `uhlm threshold --run`).

    Attributes:
        measure: the uncertainty measure they gate on.
        risk: `ε`; confidence: `1 − δ`.
        seed: the job's seed, if recorded.
        plug_in: the least-squares line and the paper's thresholds, if written.
        risk_averse, risk_prone: the analytic thresholds `−b/a`, `(Δ − b)/a`.
        risk_bounded: the posterior risk-bounded threshold in use, that of the model
            that predicts best (highest PSIS-LOO elpd); `risk_bounded_model` names it.
        risk_bounded_by_model: every posterior model's risk-bounded threshold.
        ltt: the Learn-then-Test threshold; `ltt_certified`: whether it is certified;
            `ltt_num_prompts`: the calibration prompts it used.
        validation: the prompt-split validation, if written.
    """

    FILE: ClassVar[str] = THRESHOLDS_FILE

    measure: str | None = None
    risk: float | None = None
    confidence: float | None = None
    seed: int | None = None
    plug_in: rejection.PlugInThresholds | None = None
    risk_averse: NamedThreshold | None = None
    risk_prone: NamedThreshold | None = None
    risk_bounded: NamedThreshold | None = None
    risk_bounded_model: str | None = None
    risk_bounded_by_model: Mapping[str, NamedThreshold] = dataclasses.field(
        default_factory=dict
    )
    ltt: NamedThreshold | None = None
    ltt_certified: bool = False
    ltt_num_prompts: int | None = None
    validation: Validation | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Thresholds:
        analytic = data.get("analytic") or {}
        plug_in = None
        if "slope" in analytic:

            def paper(rule: T.PaperRule) -> T.PaperThreshold:
                block = analytic.get(rule.value) or {}
                value = block.get("threshold")
                raw = block.get("raw", value)
                return T.PaperThreshold(
                    raw=math.nan if raw is None else float(raw),
                    threshold=math.nan if value is None else float(value),
                    reason=block.get("reason"),
                )

            plug_in = rejection.PlugInThresholds(
                slope=float(analytic["slope"]),
                intercept=float(analytic["intercept"]),
                rejection_share=float(analytic["rejection_share"]),
                risk_averse=paper(T.PaperRule.RISK_AVERSE),
                risk_prone=paper(T.PaperRule.RISK_PRONE),
            )
        val = data.get("validation")
        validation = None
        if val:
            methods = {
                name: MethodValidation(
                    exceed_frequency_per_token=_float(m.get("exceed_frequency_per_token")),
                    exceed_frequency_per_prompt=_float(m.get("exceed_frequency_per_prompt")),
                    mean_skip_rate=_float(m.get("mean_skip_rate")),
                    no_skip_frequency=_float(m.get("no_skip_frequency")),
                    realised_risk_per_token=_floats(m.get("realised_risk_per_token")),
                )
                for name, m in (val.get("methods") or {}).items()
            }
            validation = Validation(
                num_splits=val.get("num_splits"),
                calibration_prompts=val.get("calibration_prompts"),
                test_prompts=val.get("test_prompts"),
                allowed_exceed_frequency=_float(val.get("allowed_exceed_frequency")),
                methods=methods,
            )
        seed = _get(data, "config", "seed")
        return cls(
            measure=data.get("measure"),
            risk=_float(data.get("risk")),
            confidence=_float(data.get("confidence")),
            seed=None if seed is None else int(seed),
            plug_in=plug_in,
            risk_averse=NamedThreshold.from_json(analytic.get("risk_averse")),
            risk_prone=NamedThreshold.from_json(analytic.get("risk_prone")),
            risk_bounded=NamedThreshold.from_json(_get(data, "posterior", "risk_bounded")),
            risk_bounded_model=_get(data, "posterior", "risk_bounded", "model"),
            risk_bounded_by_model={
                model: block
                for model in ("linear", "hurdle", "linear_prompt", "hurdle_prompt")
                if (block := NamedThreshold.from_json(
                    _get(data, "posterior", model, "risk_bounded"))) is not None
            },
            ltt=NamedThreshold.from_json(data.get("ltt")),
            ltt_certified=bool(_get(data, "ltt", "certified")),
            ltt_num_prompts=_get(data, "ltt", "num_prompts"),
            validation=validation,
        )


    def named(self) -> dict[ThresholdName, float]:
        """The finite U-HLM thresholds, clipped to [0, 1], in `ThresholdName` order.

        Learn-then-Test counts only when certified.
        """
        found = {
            ThresholdName.RISK_AVERSE: self.risk_averse,
            ThresholdName.RISK_PRONE: self.risk_prone,
            ThresholdName.RISK_BOUNDED: self.risk_bounded,
            ThresholdName.LEARN_THEN_TEST: self.ltt if self.ltt_certified else None,
        }
        return {
            name: float(np.clip(block.threshold, 0.0, 1.0))
            for name, block in found.items()
            if block is not None and block.threshold is not None
            and math.isfinite(block.threshold)
        }

    def exceed_frequency(self, name: ThresholdName) -> float | None:
        """The share of validation splits in which threshold `name` exceeded `ε` (None
        without a validation of it): per prompt for Learn-then-Test, whose guarantee is
        about the per-prompt risk, per token for the others. The risk-bounded threshold
        in use is validated by refitting its model per split (`risk_bounded`); files
        without that method validated only the linear posterior, so a risk-bounded
        threshold of another model has none there."""
        found = self._validation_of(name)
        return None if found is None else getattr(found, _VALIDATED_AS[name][1])

    def validated_splits(self, name: ThresholdName) -> int | None:
        """How many splits threshold `name` was validated on (None without a validation):
        a model refitted per split is validated on the first few only."""
        found = self._validation_of(name)
        if found is None:
            return None
        return len(found.realised_risk_per_token) or self.validation.num_splits

    def _validation_of(self, name: ThresholdName) -> MethodValidation | None:
        method = _VALIDATED_AS[name][0]
        methods = {} if self.validation is None else self.validation.methods
        if name is ThresholdName.RISK_BOUNDED and "risk_bounded" in methods:
            method = "risk_bounded"
        elif name is ThresholdName.RISK_BOUNDED and self.risk_bounded_model not in (
            None, "linear"
        ):
            return None
        return methods.get(method)

    def passed_validation(self, name: ThresholdName) -> bool | None:
        """Whether threshold `name` held its risk level out of sample: it exceeded `ε` in
        at most a share `δ` of the validation splits. None without a validation."""
        exceed = self.exceed_frequency(name)
        allowed = None if self.validation is None else self.validation.allowed_exceed_frequency
        if exceed is None or allowed is None:
            return None
        # δ = 1 − confidence carries rounding error (1 − 0.9 = 0.0999…) and the share is
        # k/n: a margin far below 1/n keeps "exactly δ" a pass.
        return exceed <= allowed + _SHARE_MARGIN

    def failed_validation(self, name: ThresholdName) -> bool:
        """True when threshold `name` exceeded `ε` in more validation splits than `δ`."""
        return self.passed_validation(name) is False

    def validation_note(self, name: ThresholdName) -> str:
        """One sentence on how threshold `name` fared in validation ("" without one)."""
        passed = self.passed_validation(name)
        if passed is None:
            return ""
        val = self.validation
        per = "per prompt" if name is ThresholdName.LEARN_THEN_TEST else "per token"
        outcome = "passed" if passed else "FAILED"
        eps = "ε" if self.risk is None else f"ε = {self.risk:g}"
        return (
            f"the {name} threshold {outcome} its validation: realised risk {per} exceeded "
            f"{eps} in {self.exceed_frequency(name):.0%} of {self.validated_splits(name)} "
            f"prompt splits (allowed: δ = {val.allowed_exceed_frequency:.0%})"
        )


# The operating threshold: the first of these that thresholds.json gives (see
# `operating_threshold`).
OPERATING_ORDER = (
    ThresholdName.LEARN_THEN_TEST,
    ThresholdName.RISK_BOUNDED,
    ThresholdName.RISK_PRONE,
    ThresholdName.RISK_AVERSE,
)


@dataclasses.dataclass(frozen=True)
class OperatingThreshold:
    """The threshold a run operates at.

    Attributes:
        name: which of the run's thresholds it is.
        value: `u_th`, clipped to [0, 1].
        passed_validation: whether it held `ε` in its prompt-split validation (None
            without one).
        note: one sentence on its validation ("" without one).
    """

    name: ThresholdName
    value: float
    passed_validation: bool | None
    note: str

    @property
    def failed(self) -> bool:
        """True when it exceeded `ε` in more validation splits than `δ` allows."""
        return self.passed_validation is False

    def describe(self) -> str:
        """One line: which threshold, its value and how it fared in validation."""
        text = f"{self.name} (u_th = {self.value:.3f})"
        return f"{text}; {self.note}" if self.note else text


def operating_threshold(thresholds: Thresholds) -> OperatingThreshold | None:
    """The one rule that picks the operating threshold of a run (evaluate, report, demo).

    The operating threshold is the first of `OPERATING_ORDER` that `thresholds.json` gives
    as a finite number (`Thresholds.named`):

    1. Learn-then-Test, when certified: distribution-free, `P(R ≤ ε) ≥ 1 − δ` over the
       draw of calibration prompts;
    2. the linear posterior's risk-bounded threshold: `P(R ≤ ε | data) ≥ 1 − δ` under the
       model;
    3. the analytic risk-prone threshold `(Δ − b)/a`: no stated risk;
    4. the analytic risk-averse threshold `−b/a`: no stated risk.

    That is, the strongest stated risk guarantee first. The value is clipped to [0, 1].
    The choice does not depend on the validation, which is reported with it
    (`OperatingThreshold.passed_validation`) so that a threshold that failed its own
    validation is flagged wherever it is shown.

    Args:
        thresholds: the run's `thresholds.json`.

    Returns:
        The operating threshold, or None when the run has no finite threshold.
    """
    named = thresholds.named()
    name = next((n for n in OPERATING_ORDER if n in named), None)
    if name is None:
        return None
    return OperatingThreshold(
        name=name,
        value=named[name],
        passed_validation=thresholds.passed_validation(name),
        note=thresholds.validation_note(name),
    )
