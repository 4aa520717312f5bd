"""Write a run's report: `report.md` and a self-contained `report.html`, from RUN_DIR alone.

`uhlm report RUN_DIR` reads what the run directory holds and writes, with the figures in
`RUN_DIR/plots/*.png` (embedded in the HTML as base64):

* if `uhlm evaluate` ran, the five modes compared with real rollouts on held-out prompts
  (`evaluation.json`): TR, skip rate, acceptance, true skip rate, accuracy (MiniLM
  cosine to the reference) and its % of LLM-only's, correct answers, the LLM's NLL,
  throughput and the speedup over HLM next to its `1/(1 − s)` bound, with a figure;
* the paper-style replay table, one row per mode, at an operating threshold: transmission rate,
  skip rate, acceptance of verified drafts, true skip rate, LLM agreement as a % of the
  LLM (`1 − R`: the expected share of emitted tokens the LLM would accept; verified
  tokens are exactly the LLM's), expected throughput, and the speedup over HLM next to
  its `1/(1 − s)` bound. Rand-HLM transmits the same share as U-HLM. Numbers are trace
  replays of the calibration records (`uhlm_jax.replay`);
* replay against real rollouts, if `uhlm sweep` ran rollouts;
* the thresholds with their risk bounds (`thresholds.json`, from `uhlm threshold`);
* the fit with its diagnostics (`fit.json`, from `uhlm fit`);
* the uncertainty measures compared (correlation with `β`, AUROC for `β > 0`);
* the configuration, versions and seeds.

Only the records (`records/shard-*.parquet`) are required. A missing `fit.json`,
`thresholds.json` or `sweep.parquet` drops its section with a note (a missing sweep is
replaced by a default replay computed on the fly, not written).

Operating threshold: `--threshold` if given; else, with a `thresholds.json` for the gate
measure, the one `uhlm evaluate` and `uhlm demo` use (`calibration.run_dir.
operating_threshold`), flagged when it failed its own prompt-split validation, with the
thresholds that passed; else the risk-prone threshold `(Δ − b)/a` of a least-squares fit
of the records (clipped to [0, 1]); else the largest threshold whose realised risk per
token on the records is at most `FALLBACK_RISK`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import math
from collections.abc import Collection
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
    "Result",
    "add_arguments",
    "ltt_note",
    "main",
    "measure_scores",
    "mode_table",
    "model_comparison_table",
    "plug_in_thresholds",
    "run",
]

# Without a positive slope, the operating threshold is the largest on this grid whose
# realised risk per token on the records is at most this.
FALLBACK_GRID = 101
FALLBACK_RISK = 0.05
# The threshold posterior is drawn when at least this share of slope draws is positive.
MIN_POSITIVE_SLOPE_SHARE = 0.5
# Posterior draws drawn in the u-β band and threshold histograms.
MAX_DRAWS = 4000
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


# ----------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class _Block:
    """One piece of the report: a heading, a paragraph, a table or an image."""

    kind: str
    text: str = ""
    table: pd.DataFrame | None = None
    path: Path | None = None


def _heading(text: str) -> _Block:
    return _Block("heading", text)


def _para(text: str) -> _Block:
    return _Block("para", text)


def _table(df: pd.DataFrame) -> _Block:
    return _Block("table", table=df)


def _image(path: Path, caption: str) -> _Block:
    return _Block("image", caption, path=path)


def _cell(value: Any) -> str:
    if value is None or isinstance(value, float):
        return console.number(value, "")
    return str(value)


def _markdown(blocks: list[_Block], run_dir: Path) -> str:
    lines = []
    for b in blocks:
        if b.kind == "heading":
            lines += [b.text, ""]
        elif b.kind == "para":
            lines += [b.text, ""]
        elif b.kind == "table":
            cols = [str(c) for c in b.table.columns]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "|".join(" --- " for _ in cols) + "|")
            for row in b.table.itertuples(index=False):
                lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
            lines.append("")
        elif b.kind == "image":
            target = b.path.relative_to(run_dir).as_posix()
            lines += [f"![{b.text}]({target})", "", f"*{b.text}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escapes text and renders `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(blocks: list[_Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:.25em .6em;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "img{max-width:100%}figcaption{font-style:italic;color:#444}</style>",
        "</head><body>",
    ]
    for b in blocks:
        if b.kind == "heading":
            level = len(b.text) - len(b.text.lstrip("#"))
            out.append(f"<h{level}>{_inline(b.text.lstrip('#').strip())}</h{level}>")
        elif b.kind == "para":
            out.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b.table.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                for row in b.table.itertuples(index=False)
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


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


# ----------------------------------------------------------------------- sections


def _threshold_rows(th: rd.Thresholds) -> pd.DataFrame:
    rows = []

    def add(name: str, block: rd.NamedThreshold | None, guarantee: str,
            note: str | None = None):
        if block is None:
            return
        emp = block.empirical or rd.Empirical(None, None, None)
        rows.append([name, _fmt(block.threshold), _fmt(emp.skip_rate), _fmt(emp.per_token, 4),
                     _fmt(emp.given_skip, 4), guarantee,
                     note if note is not None else block.reason])

    add("analytic risk-averse −b/a", th.risk_averse, "none (plug-in)")
    add("analytic risk-prone (Δ−b)/a", th.risk_prone, "none (plug-in)")
    bound = f"P(R ≤ {th.risk} | data) ≥ {th.confidence}"
    for model, block in th.risk_bounded_by_model.items():
        chosen = " — best by PSIS-LOO, the one used" if model == th.risk_bounded_model else ""
        add(f"posterior risk-bounded ({model}{chosen})", block,
            bound + f" under the {model} model")
    add("Learn-then-Test", th.ltt, f"P(R ≤ {th.risk}) ≥ {th.confidence}, distribution-free",
        ltt_note(th))
    return pd.DataFrame(
        rows,
        columns=["Threshold", "u_th", "Skip rate", "Risk per token", "Risk given skip",
                 "Guarantee", "Note"],
    )


def ltt_note(th: rd.Thresholds) -> str:
    """What Learn-then-Test needed: the prompts it certified with, or why it certified
    nothing and how many prompts would do."""
    if th.ltt_certified:
        return f"certified with {th.ltt_num_prompts} prompts"
    if th.ltt is not None and th.ltt.reason:
        return f"skips nothing: {th.ltt.reason}"
    return "skips nothing: no threshold certified"


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


def _evaluation_blocks(evaluation: tuple[dict[str, Any], pd.DataFrame] | None) -> list[_Block]:
    heading = _heading("## Modes on held-out prompts (real rollouts)")
    if evaluation is None:
        return [heading, _para(f"No {rd.EVALUATION_SUMMARY_FILE}: run `uhlm evaluate RUN_DIR` "
                               "to compare the modes with real rollouts on held-out prompts.")]
    data, summary = evaluation
    s = data["settings"]
    validation = (data.get("operating_threshold") or {}).get("validation")
    return [
        heading,
        _table(tables.summary_table(summary)),
        _para(
            f"Real rollouts of every mode on {s['num_prompts']} `{s['split']}` prompts "
            f"(≤ {s['max_new_tokens']} new tokens, seed {s['seed']}, gate measure "
            f"`{s['measure']}`), {s['link']} link"
            + (f", throughput priced with {s['costs']}" if s.get("costs") else "")
            + f". {tables.accuracy_caption(summary)} LLM NLL "
            "= the LLM's mean negative log-likelihood of the emitted tokens. Rand-HLM "
            f"transmits with U-HLM's transmission rate at the {data['operating']} threshold"
            + (f" ({validation})" if validation else "") + ". "
            "The speedup over HLM is bounded by 1/(1 − s) under this latency model."
        ),
    ]


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("uhlm-jax", "jax", "jaxlib", "flax", "numpyro", "numpy", "pandas", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _sweep_table(run_dir: Path, measure: str, measures: tuple[str, ...], tokens: rp.TokenRecords,
                 notes: list[str], cost_profile_name: str) -> pd.DataFrame:
    path = run_dir / rd.SWEEP_FILE
    if path.is_file():
        summary_path = run_dir / rd.SWEEP_SUMMARY_FILE
        summary = rd.read_json(summary_path) if summary_path.is_file() else {}
        swept = (summary.get("config") or {}).get("cost_profile_name", NAMED_COSTS)
        if swept != cost_profile_name:
            notes.append(
                f"{rd.SWEEP_FILE} prices the '{swept}' cost profile: the threshold and "
                f"Pareto figures use it, the replay table and the SNR figure the "
                f"'{cost_profile_name}' one."
            )
        return pd.read_parquet(path)
    notes.append(
        f"No {rd.SWEEP_FILE}: the threshold and Pareto figures use a default replay "
        "computed for this report (run `uhlm sweep` to choose the grid and add rollouts)."
    )
    grid = rt.ReplayGrid(measures=measures, snr_db=())
    base = Pricing(pair=rd.pair_profile(run_dir, cost_profile_name)).cost_profile()
    return rt.replay_table(grid, tokens, measures, base, progress=False)


def run(cfg: Config) -> Result:
    """Writes `report.md`, `report.html` and the figures; see the module docstring."""
    run_dir = rd.require_run_dir(cfg.run_dir).absolute()
    df = records.read_records(run_dir)
    measures = tuple(records.measure_names(df.columns))
    if cfg.measure not in measures:
        raise ValueError(
            f"measure {cfg.measure!r} is not in the records of {str(run_dir)!r}; recorded: "
            f"{list(measures)}"
        )
    notes: list[str] = []
    run_config = rd.RunConfig.read_optional(run_dir) or rd.RunConfig()
    fit = rd.Fit.read_optional(run_dir)
    th = rd.Thresholds.read_optional(run_dir)
    sweep_summary_path = run_dir / rd.SWEEP_SUMMARY_FILE
    sweep_summary = rd.read_json(sweep_summary_path) if sweep_summary_path.is_file() else None
    tokens = records.token_records(df, measures)
    gate = measures.index(cfg.measure)
    u = df[records.MEASURE_PREFIX + cfg.measure].to_numpy(np.float64)
    beta = np.clip(df["beta"].to_numpy(np.float64), 0, 1)
    # Thresholds of the gate measure (a file without a measure is taken to be of it).
    gate_th = th if th is not None and th.measure in (None, cfg.measure) else None
    slope, intercept, share, averse, prone = plug_in_thresholds(gate_th, u, beta)
    if not slope > 0:
        notes.append(
            f"The least-squares slope a = {slope:.4f} is not positive: u does not predict "
            "rejection linearly, so the analytic thresholds −b/a and (Δ − b)/a are undefined."
        )
    else:
        notes += [f"Analytic threshold: {p.reason}." for p in (averse, prone) if p.reason]
    from_file = gate_th.named() if gate_th is not None else {}
    operating = rd.operating_threshold(gate_th) if gate_th is not None else None
    validation_text = ""
    if cfg.threshold is not None:
        chosen = (cfg.threshold, "given with --threshold", "given")
    elif operating is not None:
        chosen = (operating.value, f"the {operating.name} threshold of {rd.THRESHOLDS_FILE}, "
                  "the one `uhlm evaluate` and `uhlm demo` operate at", operating.name)
        validation_text = _validation_text(gate_th, operating)
        if operating.failed:
            notes.append(validation_text)
    elif np.isfinite(prone.threshold):
        chosen = (prone.threshold,
                  "the risk-prone threshold (Δ − b)/a of a least-squares fit of the records",
                  rd.ThresholdName.RISK_PRONE)
    else:
        grid = jnp.linspace(0.0, 1.0, FALLBACK_GRID)
        curve = np.asarray(T.risk_curve(jnp.asarray(beta, jnp.float32),
                                        jnp.asarray(u, jnp.float32), grid))
        within = np.nonzero(curve <= FALLBACK_RISK)[0]
        chosen = (
            float(grid[within[-1]]) if within.size else 0.0,
            f"the largest threshold whose realised risk per token on the records is at most "
            f"{FALLBACK_RISK} (no analytic or certified threshold)",
            f"empirical R ≤ {FALLBACK_RISK}",
        )
    threshold, source, op_name = chosen
    pair_costs = rd.pair_profile(run_dir, cfg.cost_profile_name)
    profile = Pricing(preset=cfg.link, pair=pair_costs).cost_profile()
    named = {op_name: threshold}
    plug_ins = {rd.ThresholdName.RISK_AVERSE: averse.threshold,
                rd.ThresholdName.RISK_PRONE: prone.threshold}
    for name, t in [*plug_ins.items(), *from_file.items()]:
        if name not in named and np.isfinite(t):
            named[name] = float(np.clip(t, 0.0, 1.0))
    failed = {name for name in from_file if gate_th.failed_validation(name)}
    table, metrics = mode_table(tokens, gate, named, profile, failed)
    uh = metrics[f"uhlm:{op_name}"]
    operating_point = plots.Operating(str(op_name), threshold, float(uh.skip_rate),
                                      float(uh.throughput_tokens_per_s), float(uh.llm_agreement))
    eps = th.risk if th is not None else None
    plot_dir = run_dir / rd.PLOTS_DIR
    figures: list[tuple[Path, str]] = []

    # u-β figure.
    marks = {"risk-averse −b/a": averse.threshold, "risk-prone (Δ−b)/a": prone.threshold}
    for name in (rd.ThresholdName.LEARN_THEN_TEST, rd.ThresholdName.RISK_BOUNDED):
        if name in from_file:
            marks[str(name)] = from_file[name]
    draws = _posterior_draws(run_dir) if fit and fit.measure == cfg.measure else None
    figures.append(
        (
            plots.u_beta(
                u, beta, plot_dir / "u_beta.png", measure=cfg.measure, slope=slope,
                intercept=intercept,
                slope_draws=None if draws is None else draws["slope"],
                intercept_draws=None if draws is None else draws["intercept"],
                thresholds=marks,
                raw_thresholds={"risk-averse −b/a": averse.raw, "risk-prone (Δ−b)/a": prone.raw},
                hurdle={k: p.mean for k, p in fit.nuts["hurdle"].params.items()}
                if fit and fit.measure == cfg.measure and "hurdle" in fit.nuts else None,
                operating=operating_point,
            ),
            "Uncertainty against rejection probability: tokens, mean β at each u value (or "
            "per u bin), the least-squares line" + (", its posterior band" if draws else "") +
            ", the hurdle fit when fitted, and the thresholds (raw values of clipped ones).",
        )
    )
    positive_share = 0.0 if draws is None else float(np.mean(draws["slope"] > 0))
    if draws is not None and positive_share < MIN_POSITIVE_SLOPE_SHARE:
        notes.append(
            f"Only {positive_share:.1%} of the posterior slope draws are positive: the "
            "analytic thresholds have no posterior to draw."
        )
    elif draws is not None:
        a, b = draws["slope"], draws["intercept"]
        safe = np.where(a > 0, a, np.nan)
        figures.append(
            (
                plots.threshold_posteriors(
                    {"risk-averse −b/a": -b / safe, "risk-prone (Δ−b)/a": (share - b) / safe},
                    plot_dir / "threshold_posteriors.png",
                    point_estimates={"risk-averse −b/a": -intercept / slope,
                                     "risk-prone (Δ−b)/a": (share - intercept) / slope}
                    if slope > 0 else None,
                    operating=operating_point,
                ),
                "Posterior of the analytic thresholds (linear-model NUTS draws; Δ at its "
                "empirical value; dashed: least squares), before clipping to [0, 1]: below "
                "0 skips nothing, above 1 skips every token.",
            )
        )
    if draws is None:
        notes.append(f"No {rd.FIT_FILE}/{rd.LINEAR_POSTERIOR_FILE} for this measure: no "
                     "posterior band or threshold posterior (run `uhlm fit`).")

    # Sweep figures.
    sweep_table = _sweep_table(run_dir, cfg.measure, measures, tokens, notes,
                               cfg.cost_profile_name)
    replay = sweep_table[sweep_table["source"] == "replay"]
    link_label = cfg.link.name.lower()
    at_link = replay[(replay["link"] == link_label) & (replay["top_k"] == rp.FULL_DISTRIBUTION)]
    if len(at_link):
        bits = at_link["bits_per_prob"].dropna()
        if len(bits):
            at_link = at_link[at_link["bits_per_prob"].isna() |
                              (at_link["bits_per_prob"] == bits.iloc[0])]
        rollout_rows = sweep_table[(sweep_table["source"] == "rollout") &
                                   (sweep_table["mode"] == "uhlm") &
                                   (sweep_table["measure"] == cfg.measure)]
        # Only rollouts at the calibration's draft temperature, K and θ_max match replay.
        calibration = {
            "draft_temperature": run_config.draft_temperature,
            "num_samples": float(DEFAULT_TEMPERATURE_PERTURBATION.num_samples),
            "max_temperature": float(DEFAULT_TEMPERATURE_PERTURBATION.max_temperature),
        }
        for column, value in calibration.items():
            if column in rollout_rows:
                rollout_rows = rollout_rows[rollout_rows[column].isna() |
                                            (rollout_rows[column] == value)]
        figures.append(
            (
                plots.threshold_curves(
                    at_link[at_link["mode"] == "uhlm"], plot_dir / "threshold_curves.png",
                    rollout=rollout_rows if len(rollout_rows) else None,
                    references=at_link[at_link["mode"] != "uhlm"], link=f"{link_label} link",
                    eps=eps, operating=operating_point,
                ),
                "Each measure's threshold, LLM agreement and acceptance, realised risk and "
                "throughput against the share of tokens skipped (measures compared at equal "
                "skip share; ε and the operating point marked)" +
                (", with real rollouts (± 2 SE)." if len(rollout_rows) else "."),
            )
        )
        pareto_rows = at_link[(at_link["mode"] != "uhlm") | (at_link["measure"] == cfg.measure)]
        figures.append(
            (
                plots.pareto(pareto_rows, plot_dir / "pareto.png", link=f"{link_label} link",
                             eps=eps, operating=operating_point),
                f"LLM agreement against throughput: U-HLM over its thresholds ({cfg.measure}), "
                "Rand-HLM over its transmit probabilities, and the fixed modes.",
            )
        )
    else:
        notes.append(f"The sweep has no {link_label} link with the full distribution: no "
                     "threshold or Pareto figure.")
    snr_grid = rt.ReplayGrid(
        thresholds=(threshold,), measures=(cfg.measure,), presets=(),
        snr_db=rt.DEFAULT_SNR_DB,
        transmit_probabilities=(float(uh.transmission_rate),),
    )
    snr_table = rt.replay_table(snr_grid, tokens, measures,
                                Pricing(pair=pair_costs).cost_profile(), progress=False)
    figures.append(
        (
            plots.throughput_vs_snr(snr_table, plot_dir / "throughput_vs_snr.png",
                                    threshold_label=f"u_th = {threshold:.3f}"),
            "Expected token throughput of every mode against the mean uplink SNR "
            "(Rand-HLM at U-HLM's transmission rate).",
        )
    )
    scores = measure_scores(df)
    figures.append(
        (
            plots.measure_comparison(scores, plot_dir / "measure_comparison.png"),
            "Uncertainty measures: correlation with β and AUROC for β > 0.",
        )
    )
    validation = th.validation if th is not None else None
    if validation is not None and validation.methods:
        realised = {
            name: np.array(m.realised_risk_per_token, np.float64)
            for name, m in validation.methods.items()
        }
        figures.append(
            (
                plots.risk_histograms(
                    realised, plot_dir / "risk_histograms.png", eps=th.risk,
                    delta=validation.allowed_exceed_frequency,
                    no_skip={name: m.no_skip_frequency or 0.0
                             for name, m in validation.methods.items()},
                ),
                f"Realised risk per token on held-out prompts over "
                f"{validation.num_splits} random splits; a split in which a method "
                "skipped nothing has risk 0 and saves nothing.",
            )
        )

    evaluation = rd.read_evaluation_summary(run_dir)
    if evaluation is not None:
        figures.insert(0, (
            plots.evaluated_modes(evaluation[1], plot_dir / "evaluated_modes.png",
                                  link=f"{evaluation[0]['settings']['link']} link",
                                  operating=operating_point),
            "Accuracy (MiniLM cosine to the reference), correct answers and the LLM's NLL "
            "of the responses against token throughput, for each mode's real rollouts on "
            "the held-out prompts (± 2 SE over prompts).",
        ))

    # Text.
    hlm = metrics["hlm"]
    bound_text = (f"bounded by 1/(1 − s) = {float(uh.speedup_bound):.3f}×"
                  if np.isfinite(float(uh.speedup_bound)) else "not bounded (s = 1)")
    blocks = [
        _heading(f"# U-HLM report: {run_dir.name}"),
        _para(
            f"{len(df)} generated tokens from {df['prompt_id'].nunique()} prompts; pair "
            f"`{run_config.pair or 'unknown'}`. Gate measure "
            f"`{cfg.measure}`; operating threshold u_th = {threshold:.4f} ({source}). "
            + (f"{validation_text} " if validation_text else "") +
            f"Costs: {cost_caption(profile, pair_costs)}; "
            f"{link_label} link ({float(profile.link.mean_snr_db):.1f} dB mean SNR, "
            f"{float(profile.link.bandwidth_hz) / 1e6:g} MHz, Rayleigh fading), "
            f"{float(profile.bits_per_prob):g} bits per probability."
        ),
        *_evaluation_blocks(evaluation),
        _heading("## Modes by trace replay of the calibration records"),
        _table(table),
        _para(
            f"Trace replay of the calibration records (per-token independence). At the "
            f"operating threshold U-HLM skips {100 * float(uh.skip_rate):.1f}% of tokens; "
            f"its speedup over HLM, {float(uh.speedup_vs_hlm):.3f}×, is {bound_text} under "
            "this latency model. Risk-averse and risk-prone rows use the least-squares "
            "plug-ins −b/a and (Δ − b)/a (clipped to [0, 1]); Learn-then-Test and posterior "
            f"risk-bounded rows use {rd.THRESHOLDS_FILE}. LLM agreement is "
            "1 − R, the expected share of emitted tokens the LLM would accept (R: realised "
            "rejection risk of skipped drafts per token), a token-level stand-in for "
            "accuracy relative to the LLM. HLM's expected latency per token is "
            f"{1e3 * float(hlm.latency_s):.2f} ms."
        ),
    ]
    comparison_path = run_dir / rd.SWEEP_COMPARISON_FILE
    blocks.append(_heading("## Replay against real rollouts"))
    if comparison_path.is_file():
        comparison = pd.read_parquet(comparison_path)
        blocks += [
            _table(_comparison_table(comparison)),
            _para(
                "Difference = rollout − replay on the same prompts and seeds; SE is its "
                "jackknife standard error over prompts. Replay keeps the recorded "
                "trajectory: it ignores how a skipped draft the LLM would have rejected "
                "changes the later tokens, their uncertainty and their β; a rollout "
                "continues from the skipped draft. |z| well above 2 marks that effect."
            ),
        ]
    else:
        blocks.append(_para(f"No {rd.SWEEP_COMPARISON_FILE}: run `uhlm sweep --rollout-thresholds "
                            "...` to compare replay with real rollouts."))
    blocks.append(_heading("## Thresholds"))
    if th is not None:
        blocks += [
            _para(
                f"From {rd.THRESHOLDS_FILE} (measure `{th.measure}`): risk level ε = "
                f"{_fmt(th.risk)}, confidence 1 − δ = {_fmt(th.confidence)}. "
                "Risk is the rejection probability of skipped drafts per generated token; "
                "empirical columns are realised on all records."
            ),
            _table(_threshold_rows(th)),
        ]
        if th.ltt is not None:
            blocks.append(_para(f"Learn-then-Test: {ltt_note(th)}."))
        if validation is not None and validation.methods:
            rows = [
                [name.replace("_", " "), _fmt(m.exceed_frequency_per_token),
                 _fmt(m.exceed_frequency_per_prompt), _fmt(m.mean_skip_rate),
                 _fmt(m.no_skip_frequency)]
                for name, m in validation.methods.items()
            ]
            blocks += [
                _para(
                    f"Validation over {validation.num_splits} random prompt splits "
                    f"({validation.calibration_prompts} calibration / "
                    f"{validation.test_prompts} test prompts); allowed exceedance "
                    f"share δ = {_fmt(validation.allowed_exceed_frequency)}."
                    + (f" {validation_text}" if validation_text else "")
                ),
                _table(pd.DataFrame(rows, columns=[
                    "Method", "Exceeds ε (per token)", "Exceeds ε (per prompt)",
                    "Mean skip rate", "Skips nothing"])),
            ]
    else:
        notes.append(f"No {rd.THRESHOLDS_FILE}: thresholds are least-squares plug-ins only "
                     "(run `uhlm threshold --run RUN_DIR`).")
        blocks.append(_para(
            f"No {rd.THRESHOLDS_FILE} (run `uhlm threshold --run RUN_DIR`). Least-squares "
            f"plug-ins: a = {slope:.4f}, b = {intercept:.4f}, Δ = P(β > 0) = {share:.4f}; "
            f"risk-averse −b/a = {averse.threshold:.4f}, risk-prone (Δ − b)/a = "
            f"{prone.threshold:.4f}; no risk bound."
        ))
    blocks.append(_heading("## Fit"))
    if fit is not None:
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
        blocks += [_para(" ".join(text))]
        if comp is not None:
            blocks.append(_table(model_comparison_table(comp)))
        blocks.append(_table(_fit_rows(fit)))
    else:
        notes.append(f"No {rd.FIT_FILE}: the fit section is empty (run `uhlm fit RUN_DIR`).")
        blocks.append(_para(f"No {rd.FIT_FILE} (run `uhlm fit RUN_DIR`). Least squares on the "
                            f"records: β ≈ {slope:.4f}·u {intercept:+.4f}."))
    blocks += [
        _heading("## Uncertainty measures"),
        _table(scores.assign(**{c: scores[c].round(4) for c in ("pearson", "spearman",
                                                                 "auroc", "share_positive")})),
        _heading("## Figures"),
    ]
    blocks += [_image(path, caption) for path, caption in figures]
    settings = run_config.settings
    blocks += [
        _heading("## Configuration"),
        _para(f"Calibration settings ({rd.CONFIG_FILE}): `" + json.dumps(settings) + "`."),
        _para("Seeds: calibration " + str(settings.get("seed")) +
              (f", fit {fit.seed}" if fit is not None and fit.seed is not None else "") +
              (f", thresholds {th.seed}" if th is not None and th.seed is not None else "") +
              "."),
        _para("Versions (collection): `" + json.dumps(dict(run_config.versions)) +
              "`; (report): `" + json.dumps(_versions()) + "`."),
    ]
    if sweep_summary:
        blocks.append(_para(f"Sweep configuration ({rd.SWEEP_SUMMARY_FILE}): `" +
                            json.dumps(sweep_summary.get("config")) + "`."))
    if notes:
        blocks += [_heading("## Notes"), *(_para(n) for n in notes)]
    markdown_path = run_dir / rd.REPORT_MARKDOWN_FILE
    html_path = run_dir / rd.REPORT_HTML_FILE
    rd.write_text(markdown_path, _markdown(blocks, run_dir))
    rd.write_text(html_path, _html(blocks, f"U-HLM report: {run_dir.name}"))
    return Result(markdown=markdown_path, html=html_path,
                  plots=tuple(p for p, _ in figures), notes=tuple(notes))


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
