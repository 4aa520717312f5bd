"""Write a run's report: `report.md` and a self-contained `report.html`, from RUN_DIR alone.

`uhlm report RUN_DIR` reads what the run directory holds and writes, with the figures in
`RUN_DIR/plots/*.png` (embedded in the HTML as base64), these sections:

* a summary: the records, the operating threshold and the cost model;
* if `uhlm evaluate` ran, the five modes compared with real rollouts on held-out prompts
  (`evaluation.json`): TR, skip rate, acceptance, true skip rate, accuracy (MiniLM
  cosine to the reference) and its % of LLM-only's, correct answers, the LLM's NLL,
  throughput and the speedup over HLM next to its `1/(1 − s)` bound, with a figure;
  and example responses: a few prompts with each mode's response (`evaluation.parquet`);
* the paper-style replay table, one row per mode, at an operating threshold: transmission rate,
  skip rate, acceptance of verified drafts, true skip rate, LLM agreement as a % of the
  LLM (`1 − R`: the expected share of emitted tokens the LLM would accept; verified
  tokens are exactly the LLM's), expected throughput, and the speedup over HLM next to
  its `1/(1 − s)` bound. Rand-HLM transmits the same share as U-HLM. Numbers are trace
  replays of the calibration records (`uhlm_jax.replay`); figures of the replay sweep;
* replay against real rollouts, if `uhlm sweep` ran rollouts;
* the thresholds with their risk bounds and validation (`thresholds.json`, from
  `uhlm threshold`); a Learn-then-Test threshold that certified nothing says why;
* the fit with its diagnostics (`fit.json`, from `uhlm fit`);
* the uncertainty measures compared (correlation with `β`, AUROC for `β > 0`);
* the configuration, versions and seeds, and notes on what is missing.

Only the records (`records/shard-*.parquet`) are required. A missing `fit.json`,
`thresholds.json` or `sweep.parquet` drops its section with a note (a missing sweep is
replaced by a default replay computed on the fly, not written).

Operating threshold: `--threshold` if given; else, with a `thresholds.json` for the gate
measure, the one `uhlm evaluate` and `uhlm demo` use (`calibration.run_dir.
operating_threshold`), flagged wherever it is shown when it failed its own prompt-split
validation, with the thresholds that passed; else the risk-prone threshold `(Δ − b)/a` of
a least-squares fit of the records (clipped to [0, 1]); else the largest threshold whose
realised risk per token on the records is at most `FALLBACK_RISK`.

The job reads the run directory once (`gather`), builds each section from what it read
(`Section`: title, paragraphs, tables, figures and notes), and renders the sections as
Markdown and HTML.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis import plots, tables
from calibration import records
from calibration import run_dir as rd
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console, rejection
from uhlm_jax import replay as rp
from uhlm_jax import replay_table as rt
from uhlm_jax import threshold as T
from uhlm_jax.modes import Mode
from uhlm_jax.pricing import (
    COST_PROFILE_HELP,
    NAMED_COSTS,
    Pricing,
    check_cost_profile,
    cost_caption,
)
from uhlm_jax.uncertainty import DEFAULT_TEMPERATURE_PERTURBATION

__all__ = [
    "MODE_TABLE_COLUMNS",
    "Config",
    "Figure",
    "Operating",
    "Quote",
    "Result",
    "RunData",
    "Section",
    "Table",
    "add_arguments",
    "gather",
    "ltt_note",
    "main",
    "measure_scores",
    "mode_table",
    "model_comparison_table",
    "plug_in_thresholds",
    "render_html",
    "render_markdown",
    "run",
    "sections",
]

# Without a positive slope, the operating threshold is the largest on this grid whose
# realised risk per token on the records is at most this.
FALLBACK_GRID = 101
FALLBACK_RISK = 0.05
# The threshold posterior is drawn when at least this share of slope draws is positive.
MIN_POSITIVE_SLOPE_SHARE = 0.5
# Posterior draws drawn in the u-β band and threshold histograms.
MAX_DRAWS = 4000
# Prompts of evaluation.parquet shown with every mode's response.
EXAMPLE_PROMPTS = 3
# The largest calibration size searched for the fewest prompts Learn-then-Test needs.
LTT_MAX_PROMPTS = 10_000
MODE_TABLE_COLUMNS = (
    "Mode",
    "TR",
    "Skip %",
    "Acceptance",
    "True skip rate",
    "LLM agreement (% of LLM)",
    "Throughput (tokens/s)",
    "Speedup vs HLM",
    "Bound 1/(1−s)",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm report`.

    Attributes:
        run_dir: the run directory.
        measure: the uncertainty measure U-HLM gates on.
        threshold: the operating threshold; by default (None) the one evaluate and demo
            use: the first of thresholds.json's Learn-then-Test, risk-bounded, risk-prone
            and risk-averse thresholds, else one estimated from the records (see the
            module doc).
        link: the link of the table and the threshold curves.
        cost_profile_name: the models the table's throughput prices, one of
            `uhlm_jax.pricing.COST_PROFILES` (`pair`: the run's pair).
    """

    run_dir: str
    measure: str = "temperature_perturbation"
    threshold: float | None = None
    link: ch.LinkPreset = ch.LinkPreset.MEDIUM
    cost_profile_name: str = NAMED_COSTS

    def __post_init__(self):
        rt.check_measure(self.measure)
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold={self.threshold!r} must be finite")
        if not isinstance(self.link, ch.LinkPreset):
            raise ValueError(f"link={self.link!r} must be a LinkPreset ('good', 'medium', 'poor')")
        check_cost_profile(self.cost_profile_name)


@dataclasses.dataclass(frozen=True)
class Result:
    """Files written by `uhlm report`."""

    markdown: Path
    html: Path
    plots: tuple[Path, ...]
    notes: tuple[str, ...]


# --------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of display cells; its first column labels the rows."""

    frame: pd.DataFrame


@dataclasses.dataclass(frozen=True)
class Figure:
    """A written PNG and its caption."""

    path: Path
    caption: str


@dataclasses.dataclass(frozen=True)
class Quote:
    """Verbatim text under a label (a prompt, a reference): escaped, never formatted."""

    label: str
    text: str


# A paragraph (str, with `code` spans), a table, a figure or a quote, in reading order.
Block = str | Table | Figure | Quote


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the report.

    Attributes:
        title: its heading.
        body: its paragraphs, tables, figures and quotes, in reading order.
        notes: what it could not show and why; gathered at the end of the report.
        level: the heading level (1 for the report's title).
    """

    title: str
    body: tuple[Block, ...] = ()
    notes: tuple[str, ...] = ()
    level: int = 2

    @property
    def tables(self) -> tuple[Table, ...]:
        return tuple(b for b in self.body if isinstance(b, Table))

    @property
    def figures(self) -> tuple[Figure, ...]:
        return tuple(b for b in self.body if isinstance(b, Figure))


# ----------------------------------------------------------------------- gather


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a report reads from a run directory, read once.

    Attributes:
        run_dir: the run directory (absolute).
        records: the calibration records (`calibration.records`).
        measures: the recorded uncertainty measures; `gate`: the index of the gate measure.
        tokens: the records as replay inputs.
        u, beta: the gate measure and `β` (clipped to [0, 1]) per token, float64.
        run_config: `config.json` (defaults when missing).
        fit: `fit.json`, if present.
        thresholds: `thresholds.json`, if present (of any measure).
        gate_thresholds: `thresholds` when they are of the gate measure (a file without a
            measure is taken to be of it).
        posterior_draws: thinned linear-posterior draws of `slope` and `intercept`, when
            `fit.json` is of the gate measure.
        sweep, sweep_summary: `sweep.parquet` and `sweep.json`, if present.
        comparison: `sweep_comparison.parquet`, if present.
        evaluation: `evaluation.json`'s contents and summary frame, if present.
        responses: `evaluation.parquet` (one row per mode and prompt), if present.
    """

    run_dir: Path
    records: pd.DataFrame
    measures: tuple[str, ...]
    gate: int
    tokens: rp.TokenRecords
    u: np.ndarray
    beta: np.ndarray
    run_config: rd.RunConfig
    fit: rd.Fit | None
    thresholds: rd.Thresholds | None
    gate_thresholds: rd.Thresholds | None
    posterior_draws: Mapping[str, np.ndarray] | None
    sweep: pd.DataFrame | None
    sweep_summary: Mapping[str, Any] | None
    comparison: pd.DataFrame | None
    evaluation: tuple[dict[str, Any], pd.DataFrame] | None
    responses: pd.DataFrame | None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def _posterior_draws(run_dir: Path) -> dict[str, np.ndarray] | None:
    path = run_dir / rd.LINEAR_POSTERIOR_FILE
    if not path.is_file():
        return None
    with np.load(path) as f:
        if "slope" not in f or "intercept" not in f:
            return None
        draws = {k: f[k].reshape(-1) for k in ("slope", "intercept")}
    index = np.linspace(0, draws["slope"].size - 1, min(MAX_DRAWS, draws["slope"].size))
    return {k: v[index.astype(int)] for k, v in draws.items()}


def gather(cfg: Config) -> RunData:
    """Reads everything the report shows from `cfg.run_dir`; ValueError when the records
    are missing or lack the gate measure."""
    run_dir = rd.require_run_dir(cfg.run_dir).absolute()
    df = records.read_records(run_dir)
    measures = tuple(records.measure_names(df.columns))
    if cfg.measure not in measures:
        raise ValueError(
            f"measure {cfg.measure!r} is not in the records of {str(run_dir)!r}; recorded: "
            f"{list(measures)}"
        )
    fit = rd.Fit.read_optional(run_dir)
    th = rd.Thresholds.read_optional(run_dir)
    sweep_summary_path = run_dir / rd.SWEEP_SUMMARY_FILE
    return RunData(
        run_dir=run_dir,
        records=df,
        measures=measures,
        gate=measures.index(cfg.measure),
        tokens=records.token_records(df, measures),
        u=df[records.MEASURE_PREFIX + cfg.measure].to_numpy(np.float64),
        beta=np.clip(df["beta"].to_numpy(np.float64), 0, 1),
        run_config=rd.RunConfig.read_optional(run_dir) or rd.RunConfig(),
        fit=fit,
        thresholds=th,
        gate_thresholds=th if th is not None and th.measure in (None, cfg.measure) else None,
        posterior_draws=_posterior_draws(run_dir)
        if fit is not None and fit.measure == cfg.measure else None,
        sweep=_read_parquet(run_dir / rd.SWEEP_FILE),
        sweep_summary=rd.read_json(sweep_summary_path) if sweep_summary_path.is_file() else None,
        comparison=_read_parquet(run_dir / rd.SWEEP_COMPARISON_FILE),
        evaluation=rd.read_evaluation_summary(run_dir),
        responses=_read_parquet(run_dir / rd.EVALUATION_FILE),
    )


# ------------------------------------------------------------------------ maths


def _fmt(x: Any, digits: int = 3) -> str | None:
    """`x` with `digits` decimals, or None (shown as —) when missing or not finite."""
    if x is None or not np.isfinite(float(x)):
        return None
    return f"{float(x):.{digits}f}"


def plug_in_thresholds(
    thresholds: rd.Thresholds | None, u: np.ndarray, beta: np.ndarray
) -> rejection.PlugInThresholds:
    """The least-squares plug-in thresholds: those of `thresholds.json` for the gate
    measure, or computed from the records when it has none."""
    if thresholds is None or thresholds.plug_in is None:
        return rejection.plug_in_thresholds(u, beta)
    return thresholds.plug_in


def measure_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Each recorded measure's Pearson and Spearman correlation with `β` and AUROC for
    `β > 0` (`uhlm_jax.threshold.BETA_POSITIVE_TOL`), one row per measure."""
    beta = df["beta"].to_numpy(np.float64)
    positive = beta > T.BETA_POSITIVE_TOL
    rows = []
    for name in records.measure_names(df.columns):
        u = df[records.MEASURE_PREFIX + name].to_numpy(np.float64)
        constant = np.std(u) == 0 or np.std(beta) == 0
        rows.append(
            {
                "measure": name,
                "pearson": float("nan") if constant else rejection.pearson(u, beta),
                "spearman": float("nan") if constant else rejection.spearman(u, beta),
                "auroc": rejection.auroc(u, positive),
                "num_tokens": int(u.size),
                "share_positive": float(positive.mean()),
            }
        )
    return pd.DataFrame(rows)


def mode_table(
    tokens: rp.TokenRecords,
    measure_index: int,
    thresholds: dict[str, float],
    profile: ch.CostProfile,
    failed_validation: Collection[str] = (),
) -> tuple[pd.DataFrame, dict[str, rp.ReplayMetrics]]:
    """The paper-style per-mode table, one U-HLM row per named threshold.

    Rand-HLM transmits the share U-HLM transmits at the first threshold.

    Args:
        tokens: replay inputs.
        measure_index: the gate measure's row of `tokens.u`.
        thresholds: name -> U-HLM threshold (the first is the operating point).
        profile: cost profile (its link and payload are used).
        failed_validation: names of thresholds that failed their validation (flagged).

    Returns:
        The table (`MODE_TABLE_COLUMNS`, formatted strings) and each row's metrics, keyed
        by mode value (`uhlm:<name>` for U-HLM rows).
    """
    sorted_tokens = rp.sort_tokens(tokens)
    link = profile.link

    def point(threshold: float, probability: float) -> rp.GridPoints:
        return rp.GridPoints.create(
            threshold=threshold, measure=measure_index, transmit_probability=probability,
            snr_db=link.mean_snr_db, bandwidth_hz=link.bandwidth_hz,
            bits_per_prob=profile.bits_per_prob,
        )

    def replay(mode: Mode, threshold: float = 0.0, probability: float = 0.0):
        return jax.device_get(
            rp.replay_point(mode, sorted_tokens, profile, point(threshold, probability))
        )

    labels = {m: m.policy.label for m in Mode}
    metrics: dict[str, rp.ReplayMetrics] = {}
    named = list(thresholds.items())
    uhlm = {name: replay(Mode.UHLM, t) for name, t in named}
    matched = float(uhlm[named[0][0]].transmission_rate)
    rows_of = [(labels[Mode.LLM_ONLY], "llm_only", replay(Mode.LLM_ONLY)),
               (labels[Mode.SLM_ONLY], "slm_only", replay(Mode.SLM_ONLY)),
               (labels[Mode.HLM], "hlm", replay(Mode.HLM))]
    rows_of += [(tables.uhlm_label(name, t, name in failed_validation), f"uhlm:{name}",
                 uhlm[name]) for name, t in named]
    rows_of.append((f"{labels[Mode.RAND_HLM]} (p = {matched:.3f})", "rand_hlm",
                    replay(Mode.RAND_HLM, 0.0, matched)))
    rows = []
    for label, key, m in rows_of:
        metrics[key] = m
        rows.append(
            [
                label,
                _fmt(m.transmission_rate),
                _fmt(100 * m.skip_rate, 1),
                _fmt(m.acceptance_rate),
                _fmt(m.true_skip_rate),
                _fmt(100 * m.llm_agreement, 2),
                _fmt(m.throughput_tokens_per_s, 2),
                _fmt(m.speedup_vs_hlm, 3),
                _fmt(m.speedup_bound, 3),
            ]
        )
    return pd.DataFrame(rows, columns=list(MODE_TABLE_COLUMNS)), metrics


def ltt_note(th: rd.Thresholds, num_prompts: int | None = None) -> str:
    """What Learn-then-Test needed: the prompts it certified with, or why it certified
    nothing and how many prompts any certification needs at `ε` and `δ`.

    Args:
        th: the run's thresholds.
        num_prompts: the run's calibration prompts, when `thresholds.json` does not say.
    """
    if th.ltt_certified:
        return f"certified with {th.ltt_num_prompts} prompts"
    reason = th.ltt.reason if th.ltt is not None else None
    has = th.ltt_num_prompts if th.ltt_num_prompts is not None else num_prompts
    if th.risk is None or th.confidence is None:
        return "certified nothing (skips nothing)" + (f": {reason}" if reason else "")
    eps, delta = th.risk, 1.0 - th.confidence
    # With no observed risk at all, certifying needs (1 − ε)^n ≤ δ: the fewest prompts
    # any run needs at this ε and δ.
    fewest = int(jax.jit(T.ltt_prompts_needed, static_argnums=3)(
        jnp.zeros(1, jnp.float32), jnp.float32(eps), jnp.float32(delta), LTT_MAX_PROMPTS
    )[0])
    at = f"ε = {eps:g}, δ = {delta:g}"
    needs = (f"needs ≥ {fewest} prompts at {at}" if fewest > 0
             else f"needs more than {LTT_MAX_PROMPTS} prompts at {at}")
    if has is None or has < fewest or fewest < 0:
        text = f"certified nothing (skips nothing): it {needs}" + (
            f"; the run has {has}" if has is not None else "")
        return text + (f" ({reason})" if reason else "")
    # Enough prompts for a risk-free curve: the observed risk kept the smallest
    # threshold's p-value above δ.
    return f"certified nothing (skips nothing) with {has} prompts at {at}: " + (
        reason or "the observed risk at the smallest threshold is too high to certify it")


def _fit_rows(fit: rd.Fit) -> pd.DataFrame:
    rows = []
    for model, nuts in fit.nuts.items():
        for name, p in nuts.params.items():
            lo, hi = p.interval
            rows.append(
                [model, name, _fmt(p.mean, 4), _fmt(p.sd, 4), f"[{_fmt(lo, 4)}, {_fmt(hi, 4)}]",
                 _fmt(p.r_hat, 3), _fmt(p.ess, 0), nuts.divergences]
            )
    return pd.DataFrame(
        rows, columns=["Model", "Parameter", "Mean", "SD", "Interval", "r-hat", "ESS",
                       "Divergences"],
    )


def model_comparison_table(comparison: rd.ModelComparison) -> pd.DataFrame:
    """The models of `fit.json`'s comparison, best first: PSIS-LOO elpd and its SE, the
    difference to the best and its SE, stacking weight, effective parameters, WAIC, and
    whether PSIS was unreliable."""
    rows = [
        [r.name, _fmt(r.elpd_loo, 1), _fmt(r.se, 1), _fmt(r.elpd_diff, 1), _fmt(r.dse, 1),
         _fmt(r.weight, 3), _fmt(r.p_loo, 1), _fmt(r.elpd_waic, 1),
         f"Pareto k up to {r.max_pareto_k:.2f}" if r.warning else "none"]
        for r in comparison.table
    ]
    return pd.DataFrame(
        rows, columns=["Model", "elpd_loo", "SE", "elpd_diff", "dSE", "Weight", "p_loo",
                       "elpd_waic", "Warning"],
    )


# ---------------------------------------------------------- operating threshold


@dataclasses.dataclass(frozen=True)
class Operating:
    """The threshold the report operates at.

    Attributes:
        value: `u_th`.
        name: which threshold it is (a `ThresholdName`, or how it was found).
        source: how it was chosen, for the summary.
        failed: whether it failed its own prompt-split validation.
        validation_text: what the validation says of it, and, when it failed, which of
            the run's thresholds passed ("" without a validation).
    """

    value: float
    name: str
    source: str
    failed: bool = False
    validation_text: str = ""

    @property
    def flag(self) -> str:
        """", failed validation" when it failed its validation, else ""."""
        return ", failed validation" if self.failed else ""


def _validation_text(th: rd.Thresholds, operating: rd.OperatingThreshold) -> str:
    """What the validation says of the operating threshold, and, when it failed, which
    of the run's thresholds passed."""
    if not operating.failed:
        return operating.note[:1].upper() + operating.note[1:] + "." if operating.note else ""
    passed = [f"{name} (u_th = {value:.3f})" for name, value in th.named().items()
              if th.passed_validation(name)]
    alternative = (f"Thresholds that passed: {', '.join(passed)}." if passed
                   else "None of the run's thresholds passed its validation.")
    return f"Warning: {operating.note}. {alternative}"


def _operating(cfg: Config, data: RunData, plug: rejection.PlugInThresholds) -> Operating:
    """The operating threshold (see the module doc)."""
    th = data.gate_thresholds
    if cfg.threshold is not None:
        return Operating(cfg.threshold, "given", "given with --threshold")
    operating = rd.operating_threshold(th) if th is not None else None
    if operating is not None:
        return Operating(
            operating.value, operating.name,
            f"the {operating.name} threshold of {rd.THRESHOLDS_FILE}, the one "
            "`uhlm evaluate` and `uhlm demo` operate at",
            failed=operating.failed, validation_text=_validation_text(th, operating),
        )
    if np.isfinite(plug.risk_prone.threshold):
        return Operating(
            plug.risk_prone.threshold, rd.ThresholdName.RISK_PRONE,
            "the risk-prone threshold (Δ − b)/a of a least-squares fit of the records",
        )
    grid = jnp.linspace(0.0, 1.0, FALLBACK_GRID)
    curve = np.asarray(T.risk_curve(jnp.asarray(data.beta, jnp.float32),
                                    jnp.asarray(data.u, jnp.float32), grid))
    within = np.nonzero(curve <= FALLBACK_RISK)[0]
    return Operating(
        float(grid[within[-1]]) if within.size else 0.0,
        f"empirical R ≤ {FALLBACK_RISK}",
        f"the largest threshold whose realised risk per token on the records is at most "
        f"{FALLBACK_RISK} (no analytic or certified threshold)",
    )


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every section draws on: the data, the operating point and the replay table."""

    cfg: Config
    data: RunData
    plug_in: rejection.PlugInThresholds
    operating: Operating
    pair_costs: ch.PairProfile | None
    profile: ch.CostProfile
    mode_table: pd.DataFrame
    metrics: Mapping[str, rp.ReplayMetrics]
    plot_dir: Path

    @property
    def operating_metrics(self) -> rp.ReplayMetrics:
        return self.metrics[f"uhlm:{self.operating.name}"]

    @property
    def operating_point(self) -> plots.Operating:
        """The operating point as the figures mark it (flagged when it failed validation)."""
        op, uh = self.operating, self.operating_metrics
        name = f"{op.name} (failed validation)" if op.failed else str(op.name)
        return plots.Operating(name, op.value, float(uh.skip_rate),
                               float(uh.throughput_tokens_per_s), float(uh.llm_agreement))

    @property
    def eps(self) -> float | None:
        """The risk level `ε` of thresholds.json, if any."""
        return self.data.thresholds.risk if self.data.thresholds is not None else None

    @property
    def link_label(self) -> str:
        return self.cfg.link.name.lower()


def _context(cfg: Config, data: RunData) -> _Context:
    th = data.gate_thresholds
    plug = plug_in_thresholds(th, data.u, data.beta)
    operating = _operating(cfg, data, plug)
    from_file = th.named() if th is not None else {}
    named = {operating.name: operating.value}
    plug_ins = {rd.ThresholdName.RISK_AVERSE: plug.risk_averse.threshold,
                rd.ThresholdName.RISK_PRONE: plug.risk_prone.threshold}
    for name, t in [*plug_ins.items(), *from_file.items()]:
        if name not in named and np.isfinite(t):
            named[name] = float(np.clip(t, 0.0, 1.0))
    failed = {name for name in from_file if th.failed_validation(name)}
    pair_costs = rd.pair_profile(data.run_dir, cfg.cost_profile_name)
    profile = Pricing(preset=cfg.link, pair=pair_costs).cost_profile()
    table, metrics = mode_table(data.tokens, data.gate, named, profile, failed)
    return _Context(cfg=cfg, data=data, plug_in=plug, operating=operating, pair_costs=pair_costs,
                    profile=profile, mode_table=table, metrics=metrics,
                    plot_dir=data.run_dir / rd.PLOTS_DIR)


# --------------------------------------------------------------------- sections


def _summary_section(ctx: _Context) -> Section:
    data, op, profile = ctx.data, ctx.operating, ctx.profile
    slope, _, _, averse, prone = ctx.plug_in
    notes = []
    if not slope > 0:
        notes.append(
            f"The least-squares slope a = {slope:.4f} is not positive: u does not predict "
            "rejection linearly, so the analytic thresholds −b/a and (Δ − b)/a are undefined."
        )
    else:
        notes += [f"Analytic threshold: {p.reason}." for p in (averse, prone) if p.reason]
    if op.failed:
        notes.append(op.validation_text)
    df = data.records
    text = (
        f"{len(df)} generated tokens from {df['prompt_id'].nunique()} prompts; pair "
        f"`{data.run_config.pair or 'unknown'}`. Gate measure "
        f"`{ctx.cfg.measure}`; operating threshold u_th = {op.value:.4f} ({op.source}). "
        + (f"{op.validation_text} " if op.validation_text else "") +
        f"Costs: {cost_caption(profile, ctx.pair_costs)}; "
        f"{ctx.link_label} link ({float(profile.link.mean_snr_db):.1f} dB mean SNR, "
        f"{float(profile.link.bandwidth_hz) / 1e6:g} MHz, Rayleigh fading), "
        f"{float(profile.bits_per_prob):g} bits per probability."
    )
    return Section(f"U-HLM report: {data.run_dir.name}", (text,), tuple(notes), level=1)


def _evaluation_section(ctx: _Context) -> Section:
    title = "Modes on held-out prompts (real rollouts)"
    if ctx.data.evaluation is None:
        return Section(title, (
            f"No {rd.EVALUATION_SUMMARY_FILE}: run `uhlm evaluate RUN_DIR` to compare the "
            "modes with real rollouts on held-out prompts.",
        ))
    data, summary = ctx.data.evaluation
    s = data["settings"]
    validation = (data.get("operating_threshold") or {}).get("validation")
    text = (
        f"Real rollouts of every mode on {s['num_prompts']} `{s['split']}` prompts "
        f"(≤ {s['max_new_tokens']} new tokens, seed {s['seed']}, gate measure "
        f"`{s['measure']}`), {s['link']} link"
        + (f", throughput priced with {s['costs']}" if s.get("costs") else "")
        + f". {tables.accuracy_caption(summary)} LLM NLL "
        "= the LLM's mean negative log-likelihood of the emitted tokens. Rand-HLM "
        f"transmits with U-HLM's transmission rate at the {data['operating']} threshold"
        + (f" ({validation})" if validation else "") + ". "
        "The speedup over HLM is bounded by 1/(1 − s) under this latency model."
    )
    figure = Figure(
        plots.evaluated_modes(summary, ctx.plot_dir / "evaluated_modes.png",
                              link=f"{s['link']} link", operating=ctx.operating_point),
        "Accuracy (MiniLM cosine to the reference), correct answers and the LLM's NLL "
        "of the responses against token throughput, for each mode's real rollouts on "
        "the held-out prompts (± 2 SE over prompts).",
    )
    return Section(title, (Table(tables.summary_table(summary)), text, figure))


def _yes_no(value: Any) -> str | None:
    """A reply's correctness as "yes"/"no", None (—) when not scored."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return "yes" if value else "no"


def _examples_section(ctx: _Context) -> Section:
    title = "Example responses"
    responses = ctx.data.responses
    if responses is None:
        return Section(title, (
            f"No {rd.EVALUATION_FILE}: run `uhlm evaluate RUN_DIR` to see each mode's "
            "responses to held-out prompts.",
        ))
    prompt_ids = list(dict.fromkeys(responses["prompt_id"]))[:EXAMPLE_PROMPTS]
    scored = "similarity" in responses and responses["similarity"].notna().any()
    answered = "correct" in responses and responses["correct"].notna().any()
    body: list[Block] = [
        f"The first {len(prompt_ids)} of {len(set(responses['prompt_id']))} held-out "
        f"prompts of {rd.EVALUATION_FILE}, with each mode's response (same seed and "
        "per-prompt key in every mode)"
        + (": accuracy is the MiniLM cosine of the response to the reference, and Correct "
           "whether it contains the short answer." if scored or answered else ".")
    ]
    for k, prompt_id in enumerate(prompt_ids, 1):
        rows = responses[responses["prompt_id"] == prompt_id]
        first = rows.iloc[0]
        if isinstance(first.get("prompt"), str):
            body.append(Quote(f"Prompt {k}", first["prompt"]))
        if isinstance(first.get("reference"), str) and first["reference"]:
            body.append(Quote("Reference", first["reference"]))
        table = pd.DataFrame({"Mode": rows["label"], "Response": rows["text"]})
        if scored:
            table["Accuracy (MiniLM cosine)"] = [_fmt(x) for x in rows["similarity"]]
        if answered:
            table["Correct"] = [_yes_no(x) for x in rows["correct"]]
        body.append(Table(table.reset_index(drop=True)))
    return Section(title, tuple(body))


def _sweep_table(ctx: _Context) -> tuple[pd.DataFrame, list[str]]:
    """The replay sweep: `sweep.parquet`, or a default replay computed here."""
    data, name = ctx.data, ctx.cfg.cost_profile_name
    if data.sweep is not None:
        swept = ((data.sweep_summary or {}).get("config") or {}).get("cost_profile_name",
                                                                       NAMED_COSTS)
        notes = [] if swept == name else [
            f"{rd.SWEEP_FILE} prices the '{swept}' cost profile: the threshold and "
            f"Pareto figures use it, the replay table and the SNR figure the "
            f"'{name}' one."
        ]
        return data.sweep, notes
    grid = rt.ReplayGrid(measures=data.measures, snr_db=())
    base = Pricing(pair=rd.pair_profile(data.run_dir, name)).cost_profile()
    return rt.replay_table(grid, data.tokens, data.measures, base, progress=False), [
        f"No {rd.SWEEP_FILE}: the threshold and Pareto figures use a default replay "
        "computed for this report (run `uhlm sweep` to choose the grid and add rollouts)."
    ]


def _sweep_figures(ctx: _Context) -> tuple[list[Figure], list[str]]:
    """Threshold curves and the Pareto front at the report's link, from the sweep."""
    sweep_table, notes = _sweep_table(ctx)
    measure, link_label = ctx.cfg.measure, ctx.link_label
    replay = sweep_table[sweep_table["source"] == "replay"]
    at_link = replay[(replay["link"] == link_label) & (replay["top_k"] == rp.FULL_DISTRIBUTION)]
    if not len(at_link):
        notes.append(f"The sweep has no {link_label} link with the full distribution: no "
                     "threshold or Pareto figure.")
        return [], notes
    bits = at_link["bits_per_prob"].dropna()
    if len(bits):
        at_link = at_link[at_link["bits_per_prob"].isna() |
                          (at_link["bits_per_prob"] == bits.iloc[0])]
    rollout_rows = sweep_table[(sweep_table["source"] == "rollout") &
                               (sweep_table["mode"] == "uhlm") &
                               (sweep_table["measure"] == measure)]
    # Only rollouts at the calibration's draft temperature, K and θ_max match replay.
    calibration = {
        "draft_temperature": ctx.data.run_config.draft_temperature,
        "num_samples": float(DEFAULT_TEMPERATURE_PERTURBATION.num_samples),
        "max_temperature": float(DEFAULT_TEMPERATURE_PERTURBATION.max_temperature),
    }
    for column, value in calibration.items():
        if column in rollout_rows:
            rollout_rows = rollout_rows[rollout_rows[column].isna() |
                                        (rollout_rows[column] == value)]
    pareto_rows = at_link[(at_link["mode"] != "uhlm") | (at_link["measure"] == measure)]
    figures = [
        Figure(
            plots.threshold_curves(
                at_link[at_link["mode"] == "uhlm"], ctx.plot_dir / "threshold_curves.png",
                rollout=rollout_rows if len(rollout_rows) else None,
                references=at_link[at_link["mode"] != "uhlm"], link=f"{link_label} link",
                eps=ctx.eps, operating=ctx.operating_point,
            ),
            "Each measure's threshold, LLM agreement and acceptance, realised risk and "
            "throughput against the share of tokens skipped (measures compared at equal "
            "skip rate; ε and the operating point marked)" +
            (", with real rollouts (± 2 SE)." if len(rollout_rows) else "."),
        ),
        Figure(
            plots.pareto(pareto_rows, ctx.plot_dir / "pareto.png", link=f"{link_label} link",
                         eps=ctx.eps, operating=ctx.operating_point),
            f"LLM agreement against throughput: U-HLM over its thresholds ({measure}), "
            "Rand-HLM over its transmit probabilities, and the fixed modes.",
        ),
    ]
    return figures, notes


def _replay_section(ctx: _Context) -> Section:
    op, uh, data = ctx.operating, ctx.operating_metrics, ctx.data
    hlm = ctx.metrics["hlm"]
    bound_text = (f"bounded by 1/(1 − s) = {float(uh.speedup_bound):.3f}×"
                  if np.isfinite(float(uh.speedup_bound)) else "not bounded (s = 1)")
    th = data.gate_thresholds
    no_ltt = (f" No Learn-then-Test row: Learn-then-Test {ltt_note(th, _num_prompts(data))}."
              if th is not None and not th.ltt_certified else "")
    text = (
        f"Trace replay of the calibration records (per-token independence). At the "
        f"operating threshold{' (which failed its validation)' if op.failed else ''} U-HLM "
        f"skips {100 * float(uh.skip_rate):.1f}% of tokens; "
        f"its speedup over HLM, {float(uh.speedup_vs_hlm):.3f}×, is {bound_text} under "
        "this latency model. Risk-averse and risk-prone rows use the least-squares "
        "plug-ins −b/a and (Δ − b)/a (clipped to [0, 1]); Learn-then-Test and posterior "
        f"risk-bounded rows use {rd.THRESHOLDS_FILE}. LLM agreement is "
        "1 − R, the expected share of emitted tokens the LLM would accept (R: realised "
        "rejection risk of skipped drafts per token), a token-level stand-in for "
        "accuracy relative to the LLM. HLM's expected latency per token is "
        f"{1e3 * float(hlm.latency_s):.2f} ms." + no_ltt
    )
    figures, notes = _sweep_figures(ctx)
    snr_grid = rt.ReplayGrid(
        thresholds=(op.value,), measures=(ctx.cfg.measure,), presets=(),
        snr_db=rt.DEFAULT_SNR_DB, transmit_probabilities=(float(uh.transmission_rate),),
    )
    snr_table = rt.replay_table(snr_grid, data.tokens, data.measures,
                                Pricing(pair=ctx.pair_costs).cost_profile(), progress=False)
    figures.append(Figure(
        plots.throughput_vs_snr(snr_table, ctx.plot_dir / "throughput_vs_snr.png",
                                threshold_label=f"u_th = {op.value:.3f}{op.flag}"),
        "Expected token throughput of every mode against the mean uplink SNR "
        "(Rand-HLM at U-HLM's transmission rate).",
    ))
    return Section("Modes by trace replay of the calibration records",
                   (Table(ctx.mode_table), text, *figures), tuple(notes))


def _comparison_table(comparison: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in comparison.itertuples(index=False):
        label = Mode(r.mode).policy.label
        if r.mode == "uhlm":
            label += f" (u_th = {r.threshold:.3f})"
        rows.append([label, r.metric.replace("_", " "), _fmt(r.replay, 4), _fmt(r.rollout, 4),
                     _fmt(r.difference, 4), _fmt(r.se, 4), _fmt(r.z, 2)])
    return pd.DataFrame(
        rows, columns=["Point", "Metric", "Replay", "Rollout", "Difference", "SE", "z"]
    )


def _comparison_section(ctx: _Context) -> Section:
    title = "Replay against real rollouts"
    if ctx.data.comparison is None:
        return Section(title, (f"No {rd.SWEEP_COMPARISON_FILE}: run `uhlm sweep "
                               "--rollout-thresholds ...` to compare replay with real "
                               "rollouts.",))
    return Section(title, (
        Table(_comparison_table(ctx.data.comparison)),
        "Difference = rollout − replay on the same prompts and seeds; SE is its "
        "jackknife standard error over prompts. Replay keeps the recorded "
        "trajectory: it ignores how a skipped draft the LLM would have rejected "
        "changes the later tokens, their uncertainty and their β; a rollout "
        "continues from the skipped draft. |z| well above 2 marks that effect.",
    ))


def _num_prompts(data: RunData) -> int:
    return int(data.records["prompt_id"].nunique())


def _validation_cell(th: rd.Thresholds, name: rd.ThresholdName) -> str | None:
    """How threshold `name` fared in its prompt-split validation (None: not validated)."""
    passed = th.passed_validation(name)
    if passed is None:
        return None
    exceed = f"exceeds ε in {th.exceed_frequency(name):.0%} of {th.validated_splits(name)} splits"
    if passed:
        return f"passed ({exceed})"
    return f"FAILED ({exceed}; allowed δ = {th.validation.allowed_exceed_frequency:.0%})"


def _threshold_rows(th: rd.Thresholds, num_prompts: int) -> pd.DataFrame:
    rows = []

    def add(label: str, block: rd.NamedThreshold | None, guarantee: str,
            name: rd.ThresholdName | None, note: str | None = None):
        if block is None:
            return
        emp = block.empirical or rd.Empirical(None, None, None)
        # A threshold that skips nothing (null) has nothing to validate.
        validation = None if name is None or block.threshold is None else _validation_cell(
            th, name)
        rows.append([label, _fmt(block.threshold), _fmt(emp.skip_rate), _fmt(emp.per_token, 4),
                     _fmt(emp.given_skip, 4), guarantee, validation,
                     note if note is not None else block.reason])

    add("analytic risk-averse −b/a", th.risk_averse, "none (plug-in)",
        rd.ThresholdName.RISK_AVERSE)
    add("analytic risk-prone (Δ−b)/a", th.risk_prone, "none (plug-in)",
        rd.ThresholdName.RISK_PRONE)
    bound = f"P(R ≤ {th.risk} | data) ≥ {th.confidence}"
    for model, block in th.risk_bounded_by_model.items():
        used = model == th.risk_bounded_model
        chosen = " — best by PSIS-LOO, the one used" if used else ""
        add(f"posterior risk-bounded ({model}{chosen})", block,
            bound + f" under the {model} model", rd.ThresholdName.RISK_BOUNDED if used else None)
    add("Learn-then-Test", th.ltt, f"P(R ≤ {th.risk}) ≥ {th.confidence}, distribution-free",
        rd.ThresholdName.LEARN_THEN_TEST, ltt_note(th, num_prompts))
    return pd.DataFrame(
        rows,
        columns=["Threshold", "u_th", "Skip rate", "Risk per token", "Risk given skip",
                 "Guarantee", "Validation", "Note"],
    )


def _no_skip_share(method: rd.MethodValidation) -> float:
    """The share of splits in which a method skipped nothing: every split when its mean
    skip rate is 0, whatever its thresholds were."""
    if method.mean_skip_rate == 0.0:
        return 1.0
    return method.no_skip_frequency or 0.0


def _validation_table(validation: rd.Validation) -> pd.DataFrame:
    rows = []
    for name, m in validation.methods.items():
        no_skip = _no_skip_share(m)
        rows.append([
            name.replace("_", " "), _fmt(m.exceed_frequency_per_token),
            _fmt(m.exceed_frequency_per_prompt), _fmt(m.mean_skip_rate),
            _fmt(m.no_skip_frequency),
            "skipped nothing in every split: risk 0 by construction, no saving"
            if no_skip >= 1.0 else None,
        ])
    return pd.DataFrame(rows, columns=["Method", "Exceeds ε (per token)",
                                       "Exceeds ε (per prompt)", "Mean skip rate",
                                       "Skips nothing", "Note"])


def _thresholds_section(ctx: _Context) -> Section:
    title = "Thresholds"
    th, data = ctx.data.thresholds, ctx.data
    if th is None:
        slope, intercept, share, averse, prone = ctx.plug_in
        return Section(title, (
            f"No {rd.THRESHOLDS_FILE} (run `uhlm threshold --run RUN_DIR`). Least-squares "
            f"plug-ins: a = {slope:.4f}, b = {intercept:.4f}, Δ = P(β > 0) = {share:.4f}; "
            f"risk-averse −b/a = {averse.threshold:.4f}, risk-prone (Δ − b)/a = "
            f"{prone.threshold:.4f}; no risk bound.",
        ), (f"No {rd.THRESHOLDS_FILE}: thresholds are least-squares plug-ins only "
            "(run `uhlm threshold --run RUN_DIR`).",))
    body: list[Block] = [
        f"From {rd.THRESHOLDS_FILE} (measure `{th.measure}`): risk level ε = "
        f"{_fmt(th.risk)}, confidence 1 − δ = {_fmt(th.confidence)}. "
        "Risk is the rejection probability of skipped drafts per generated token; "
        "empirical columns are realised on all records. Validation: whether the threshold "
        "held ε out of sample in at least a share 1 − δ of random prompt splits.",
        Table(_threshold_rows(th, _num_prompts(data))),
    ]
    if th.ltt is not None:
        body.append(f"Learn-then-Test: {ltt_note(th, _num_prompts(data))}.")
    validation = th.validation
    if validation is None or not validation.methods:
        return Section(title, tuple(body))
    text = ctx.operating.validation_text if th is data.gate_thresholds else ""
    body += [
        f"Validation over {validation.num_splits} random prompt splits "
        f"({validation.calibration_prompts} calibration / "
        f"{validation.test_prompts} test prompts); allowed exceedance "
        f"share δ = {_fmt(validation.allowed_exceed_frequency)}." + (f" {text}" if text else ""),
        Table(_validation_table(validation)),
        Figure(
            plots.risk_histograms(
                {name: np.array(m.realised_risk_per_token, np.float64)
                 for name, m in validation.methods.items()},
                ctx.plot_dir / "risk_histograms.png", eps=th.risk,
                delta=validation.allowed_exceed_frequency,
                no_skip={name: _no_skip_share(m) for name, m in validation.methods.items()},
            ),
            f"Realised risk per token on held-out prompts over {validation.num_splits} "
            "random splits; a split in which a method skipped nothing has risk 0 and saves "
            "nothing.",
        ),
    ]
    return Section(title, tuple(body))


def _fit_figures(ctx: _Context) -> tuple[list[Figure], list[str]]:
    """The u-β scatter with the fit and thresholds, and the analytic thresholds' posterior."""
    data, notes = ctx.data, []
    slope, intercept, share, averse, prone = ctx.plug_in
    th = data.gate_thresholds
    marks = {"risk-averse −b/a": averse.threshold, "risk-prone (Δ−b)/a": prone.threshold}
    from_file = th.named() if th is not None else {}
    for name in (rd.ThresholdName.LEARN_THEN_TEST, rd.ThresholdName.RISK_BOUNDED):
        if name in from_file:
            flag = " (failed validation)" if th.failed_validation(name) else ""
            marks[f"{name}{flag}"] = from_file[name]
    draws, fit = data.posterior_draws, data.fit
    figures = [Figure(
        plots.u_beta(
            data.u, data.beta, ctx.plot_dir / "u_beta.png", measure=ctx.cfg.measure,
            slope=slope, intercept=intercept,
            slope_draws=None if draws is None else draws["slope"],
            intercept_draws=None if draws is None else draws["intercept"],
            thresholds=marks,
            raw_thresholds={"risk-averse −b/a": averse.raw, "risk-prone (Δ−b)/a": prone.raw},
            hurdle={k: p.mean for k, p in fit.nuts["hurdle"].params.items()}
            if fit is not None and fit.measure == ctx.cfg.measure and "hurdle" in fit.nuts
            else None,
            operating=ctx.operating_point,
        ),
        "Uncertainty against rejection probability: tokens, mean β at each u value (or "
        "per u bin), the least-squares line" + (", its posterior band" if draws else "") +
        ", the hurdle fit when fitted, and the thresholds (raw values of clipped ones).",
    )]
    if draws is None:
        notes.append(f"No {rd.FIT_FILE}/{rd.LINEAR_POSTERIOR_FILE} for this measure: no "
                     "posterior band or threshold posterior (run `uhlm fit`).")
        return figures, notes
    positive_share = float(np.mean(draws["slope"] > 0))
    if positive_share < MIN_POSITIVE_SLOPE_SHARE:
        notes.append(
            f"Only {positive_share:.1%} of the posterior slope draws are positive: the "
            "analytic thresholds have no posterior to draw."
        )
        return figures, notes
    a, b = draws["slope"], draws["intercept"]
    safe = np.where(a > 0, a, np.nan)
    figures.append(Figure(
        plots.threshold_posteriors(
            {"risk-averse −b/a": -b / safe, "risk-prone (Δ−b)/a": (share - b) / safe},
            ctx.plot_dir / "threshold_posteriors.png",
            point_estimates={"risk-averse −b/a": -intercept / slope,
                             "risk-prone (Δ−b)/a": (share - intercept) / slope}
            if slope > 0 else None,
            operating=ctx.operating_point,
        ),
        "Posterior of the analytic thresholds (linear-model NUTS draws; Δ at its "
        "empirical value; dashed: least squares), before clipping to [0, 1]: below "
        "0 skips nothing, above 1 skips every token.",
    ))
    return figures, notes


def _fit_section(ctx: _Context) -> Section:
    fit = ctx.data.fit
    figures, notes = _fit_figures(ctx)
    if fit is None:
        slope, intercept = ctx.plug_in.slope, ctx.plug_in.intercept
        notes.append(f"No {rd.FIT_FILE}: the fit section is empty (run `uhlm fit RUN_DIR`).")
        return Section("Fit", (f"No {rd.FIT_FILE} (run `uhlm fit RUN_DIR`). Least squares on "
                               f"the records: β ≈ {slope:.4f}·u {intercept:+.4f}.", *figures),
                       tuple(notes))
    text = [f"From {rd.FIT_FILE} (measure `{fit.measure}`)."]
    for name, c in fit.correlations.items():
        lo, hi = c.interval
        text.append(f"{name.capitalize()} r(u, β) = {c.estimate:.3f} "
                    f"[{lo:.3f}, {hi:.3f}] (prompt bootstrap).")
    comp = fit.comparison
    if comp is not None:
        text.append(
            f"Models compared by {comp.criterion} over {comp.unit}s ({comp.num_draws} "
            f"posterior draws each, ArviZ); the best predictor is the {comp.best} model "
            "(table below)."
        )
    for model, covered in fit.predictive_mean_covered.items():
        text.append(f"Posterior predictive: the {model} model's 90% range covers "
                    f"the observed mean β in {sum(covered)} of {len(covered)} u bins.")
    body: list[Block] = [" ".join(text)]
    if comp is not None:
        body.append(Table(model_comparison_table(comp)))
    body += [Table(_fit_rows(fit)), *figures]
    return Section("Fit", tuple(body), tuple(notes))


def _measures_section(ctx: _Context) -> Section:
    scores = measure_scores(ctx.data.records)
    rounded = scores.assign(**{c: scores[c].round(4)
                               for c in ("pearson", "spearman", "auroc", "share_positive")})
    return Section("Uncertainty measures", (
        Table(rounded),
        Figure(plots.measure_comparison(scores, ctx.plot_dir / "measure_comparison.png"),
               "Uncertainty measures: correlation with β and AUROC for β > 0."),
    ))


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("uhlm-jax", "jax", "jaxlib", "flax", "numpyro", "numpy", "pandas", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _configuration_section(ctx: _Context) -> Section:
    data = ctx.data
    fit, th, settings = data.fit, data.thresholds, data.run_config.settings
    body = [
        f"Calibration settings ({rd.CONFIG_FILE}): `" + json.dumps(settings) + "`.",
        "Seeds: calibration " + str(settings.get("seed")) +
        (f", fit {fit.seed}" if fit is not None and fit.seed is not None else "") +
        (f", thresholds {th.seed}" if th is not None and th.seed is not None else "") + ".",
        "Versions (collection): `" + json.dumps(dict(data.run_config.versions)) +
        "`; (report): `" + json.dumps(_versions()) + "`.",
    ]
    if data.sweep_summary:
        body.append(f"Sweep configuration ({rd.SWEEP_SUMMARY_FILE}): `" +
                    json.dumps(data.sweep_summary.get("config")) + "`.")
    return Section("Configuration", tuple(body))


# The report's sections, in reading order.
_SECTIONS = (
    _summary_section,
    _evaluation_section,
    _examples_section,
    _replay_section,
    _comparison_section,
    _thresholds_section,
    _fit_section,
    _measures_section,
    _configuration_section,
)


def sections(cfg: Config, data: RunData) -> list[Section]:
    """The report's sections from what `gather` read (writes the figures), ending with
    the notes of every section."""
    ctx = _context(cfg, data)
    out = [make(ctx) for make in _SECTIONS]
    notes = tuple(n for s in out for n in s.notes)
    if notes:
        out.append(Section("Notes", notes))
    return out


# ----------------------------------------------------------------------- render

# A cell that reads as a number (or an undefined, infinite or interval one): right-aligned.
_NUMERIC_CELL = re.compile(r"[-−+]?(\d|\.\d|∞)|\[|—$|$")


def _cell(value: Any) -> str:
    if value is None or isinstance(value, float):
        return console.number(value, "")
    return str(value)


def _cells(table: Table) -> tuple[list[str], list[list[str]], list[str]]:
    """A table's header, its rows of display strings, and each column's kind: `label`
    (the first column: left, never wrapped), `num` (right-aligned) or `text` (left)."""
    header = [str(c) for c in table.frame.columns]
    rows = [[_cell(v) for v in row] for row in table.frame.itertuples(index=False)]
    kinds = ["label"] + [
        "num" if all(_NUMERIC_CELL.match(row[i]) for row in rows) else "text"
        for i in range(1, len(header))
    ]
    return header, rows, kinds


def _markdown_table(table: Table) -> list[str]:
    header, rows, kinds = _cells(table)
    rule = {"label": ":---", "text": ":---", "num": "---:"}

    def line(cells: list[str]) -> str:
        # Pipes would split a cell and newlines would end the row.
        return "| " + " | ".join(" ".join(c.replace("|", "\\|").split()) for c in cells) + " |"

    return [line(header), "|" + "|".join(f" {rule[k]} " for k in kinds) + "|",
            *(line(r) for r in rows), ""]


def render_markdown(sections: list[Section], run_dir: Path) -> str:
    """The report as Markdown; figures are linked relative to `run_dir`."""
    lines = []
    for section in sections:
        lines += ["#" * section.level + " " + section.title, ""]
        for b in section.body:
            if isinstance(b, str):
                lines += [b, ""]
            elif isinstance(b, Table):
                lines += _markdown_table(b)
            elif isinstance(b, Quote):
                lines += [f"{b.label}:", "", *(f"> {t}" for t in b.text.splitlines() or [""]),
                          ""]
            else:
                target = b.path.relative_to(run_dir).as_posix()
                lines += [f"![{b.caption}]({target})", "", f"*{b.caption}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escapes text and renders `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_STYLE = (
    "body{font-family:sans-serif;max-width:64em;margin:2em auto;line-height:1.4}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #bbb;padding:.25em .6em;vertical-align:top}th{background:#eee}"
    ".num{text-align:right}td.num{white-space:nowrap}.text{text-align:left}"
    "td.text{white-space:pre-wrap}.label{text-align:left;white-space:nowrap}"
    "blockquote{white-space:pre-wrap;border-left:3px solid #bbb;margin:.5em 0;padding:0 1em}"
    "img{max-width:100%}figcaption{font-style:italic;color:#444}"
)


def _html_table(table: Table) -> str:
    header, rows, kinds = _cells(table)
    head = "".join(f"<th class='{k}'>{html.escape(c)}</th>"
                   for c, k in zip(header, kinds, strict=True))
    body = "".join(
        "<tr>" + "".join(f"<td class='{k}'>{html.escape(c)}</td>"
                         for c, k in zip(row, kinds, strict=True)) + "</tr>"
        for row in rows
    )
    return (f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def render_html(sections: list[Section], title: str) -> str:
    """The report as one self-contained HTML page (figures embedded as base64)."""
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
    ]
    for section in sections:
        level = section.level
        out.append(f"<h{level}>{_inline(section.title)}</h{level}>")
        for b in section.body:
            if isinstance(b, str):
                out.append(f"<p>{_inline(b)}</p>")
            elif isinstance(b, Table):
                out.append(_html_table(b))
            elif isinstance(b, Quote):
                out.append(f"<p>{html.escape(b.label)}:</p>"
                           f"<blockquote>{html.escape(b.text)}</blockquote>")
            else:
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                out.append(
                    f"<figure><img alt='{html.escape(b.caption)}' "
                    f"src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out)


def run(cfg: Config) -> Result:
    """Writes `report.md`, `report.html` and the figures; see the module docstring."""
    data = gather(cfg)
    parts = sections(cfg, data)
    markdown_path = data.run_dir / rd.REPORT_MARKDOWN_FILE
    html_path = data.run_dir / rd.REPORT_HTML_FILE
    rd.write_text(markdown_path, render_markdown(parts, data.run_dir))
    rd.write_text(html_path, render_html(parts, f"U-HLM report: {data.run_dir.name}"))
    return Result(markdown=markdown_path, html=html_path,
                  plots=tuple(f.path for s in parts for f in s.figures),
                  notes=tuple(n for s in parts for n in s.notes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm report` options."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        positional=("run_dir",), names={"cost_profile_name": "cost_profile"},
        help={"cost_profile_name": COST_PROFILE_HELP},
    ))
    cli_config.add_output_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm report`; returns the exit status."""
    result = run(cli_config.config_from_args(Config, args))
    if args.json:
        print(console.json_text({"markdown": str(result.markdown), "html": str(result.html),
                                 "plots": [str(p) for p in result.plots],
                                 "notes": list(result.notes)}))
    else:
        print(f"wrote {result.markdown} and {result.html} ({len(result.plots)} figures)")
        for note in result.notes:
            print(f"note: {note}")
    return 0
