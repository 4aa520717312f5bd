"""Figures of a calibration run and its sweep (matplotlib, Agg backend, PNG files).

Every function draws one figure from arrays or tables, writes it to `path` as a PNG of
`FIGSIZE_IN × DPI` pixels (layout is constrained, never cropped, so sizes are fixed), and
returns the path. None reads files: `analysis.report` gathers the data of a run directory
and calls them.

* `u_beta` — uncertainty against rejection probability, with binned means, the fitted
  line, its posterior band and the thresholds;
* `threshold_posteriors` — posterior draws of the analytic thresholds;
* `threshold_curves` — transmission rate, LLM agreement and acceptance, realised risk and
  throughput against the threshold (replay lines, rollout points with error bars);
* `throughput_vs_snr` — every mode's token throughput against the link's mean SNR;
* `pareto` — LLM agreement against throughput, per mode and threshold;
* `evaluated_modes` — accuracy (MiniLM cosine), correct answers and the LLM's NLL against
  throughput of real rollouts on held-out prompts;
* `risk_histograms` — realised risk on held-out prompts over random splits, with `ε`;
* `measure_comparison` — uncertainty measures by correlation with `β` and AUROC of `β > 0`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from uhlm_jax.modes import Mode  # noqa: E402

__all__ = [
    "DPI",
    "evaluated_modes",
    "FIGSIZE_IN",
    "HEXBIN_MIN_POINTS",
    "MODE_STYLE",
    "measure_comparison",
    "pareto",
    "risk_histograms",
    "threshold_curves",
    "threshold_posteriors",
    "throughput_vs_snr",
    "u_beta",
]

FIGSIZE_IN = (8.0, 6.0)
DPI = 100
# Above this many tokens the u-β plot is a hexbin (a scatter would be a solid blob).
HEXBIN_MIN_POINTS = 5000
# Credible band of the fitted line.
BAND_MASS = 0.9
# Mode value -> (label, colour, marker), one style per mode in every figure.
MODE_STYLE = {
    mode.value: (mode.policy.label, colour, marker)
    for mode, colour, marker in (
        (Mode.LLM_ONLY, "tab:purple", "*"),
        (Mode.SLM_ONLY, "tab:gray", "X"),
        (Mode.HLM, "tab:blue", "s"),
        (Mode.UHLM, "tab:red", "o"),
        (Mode.RAND_HLM, "tab:green", "^"),
    )
}
# U-HLM rows at several thresholds: shades no other mode uses.
_UHLM_ROW_COLOURS = ("tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_THRESHOLD_COLOURS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def _figure(nrows: int = 1, ncols: int = 1):
    fig, axes = plt.subplots(nrows, ncols, figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    return fig, axes


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _plain_log_axis(axis) -> None:
    """Log-scale axis with plain numbers (20, 30, 100) instead of powers of ten."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(plt.NullFormatter())


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def u_beta(
    u: np.ndarray,
    beta: np.ndarray,
    path: str | os.PathLike,
    *,
    measure: str,
    slope: float | None = None,
    intercept: float | None = None,
    slope_draws: np.ndarray | None = None,
    intercept_draws: np.ndarray | None = None,
    thresholds: Mapping[str, float] | None = None,
    num_bins: int = 20,
) -> Path:
    """Uncertainty `u` against rejection probability `β` of every token.

    Args:
        u, beta: `(n,)` per-token values.
        path: the PNG to write.
        measure: the measure's name (axis label).
        slope, intercept: the fitted line `β = a·u + b` (e.g. least squares).
        slope_draws, intercept_draws: posterior draws of `(a, b)` for a `BAND_MASS` band.
        thresholds: name -> threshold, drawn as vertical lines.
        num_bins: equal-width `u` bins of the binned means.
    """
    u = np.asarray(u, np.float64)
    beta = np.asarray(beta, np.float64)
    fig, ax = _figure()
    if u.size >= HEXBIN_MIN_POINTS:
        hb = ax.hexbin(u, beta, gridsize=40, bins="log", cmap="Greys", mincnt=1)
        fig.colorbar(hb, ax=ax, label="tokens per cell (log scale)")
    else:
        ax.scatter(u, beta, s=8, alpha=0.25, color="0.4", edgecolors="none",
                   label=f"tokens (n = {u.size})")
    lo, hi = float(np.min(u)), float(np.max(u))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, num_bins + 1)
    which = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
    counts = np.bincount(which, minlength=num_bins)
    means = np.bincount(which, weights=beta, minlength=num_bins) / np.maximum(counts, 1)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.plot(centres[counts > 0], means[counts > 0], "o", color="black", ms=5,
            label="mean β per u bin")
    grid = np.linspace(lo, hi if hi > lo else lo + 1.0, 200)
    if slope_draws is not None and intercept_draws is not None:
        lines = np.outer(np.asarray(slope_draws), grid) + np.asarray(intercept_draws)[:, None]
        tail = (1 - BAND_MASS) / 2
        band_lo, band_hi = np.quantile(lines, [tail, 1 - tail], axis=0)
        ax.fill_between(grid, band_lo, band_hi, color="tab:red", alpha=0.25,
                        label=f"posterior {BAND_MASS:.0%} band of a·u + b")
    if slope is not None and intercept is not None:
        ax.plot(grid, slope * grid + intercept, color="tab:red", lw=2,
                label=f"fit β = {slope:.3f}·u {'−' if intercept < 0 else '+'} {abs(intercept):.3f}")
    for (name, t), colour in zip((thresholds or {}).items(), _THRESHOLD_COLOURS, strict=False):
        if t is not None and np.isfinite(t):
            ax.axvline(t, color=colour, ls="--", lw=1.5, label=f"{name}: u_th = {t:.3f}")
    ax.set_xlabel(f"uncertainty u ({_pretty(measure)})")
    ax.set_ylabel("rejection probability β = max(0, 1 − p_d / q_d)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("SLM uncertainty against LLM rejection")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def threshold_posteriors(
    draws: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    point_estimates: Mapping[str, float] | None = None,
) -> Path:
    """Histograms of posterior draws of thresholds (e.g. risk-averse `−b/a`).

    Args:
        draws: name -> `(m,)` draws of a threshold.
        path: the PNG to write.
        point_estimates: name -> value drawn as a dashed line (e.g. least squares).
    """
    fig, ax = _figure()
    for (name, values), colour in zip(draws.items(), _THRESHOLD_COLOURS, strict=False):
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            continue
        lo, hi = np.quantile(values, [0.05, 0.95])
        ax.hist(values, bins=50, density=True, alpha=0.5, color=colour,
                label=f"{name}: mean {values.mean():.3f}, 90% [{lo:.3f}, {hi:.3f}]")
    for (name, t), colour in zip((point_estimates or {}).items(), _THRESHOLD_COLOURS,
                                 strict=False):
        if t is not None and np.isfinite(t):
            ax.axvline(t, color=colour, ls="--", lw=1.5, label=f"{name} (point) = {t:.3f}")
    ax.set_xlabel("threshold u_th (unclipped: < 0 skips nothing, > 1 skips every token)")
    ax.set_ylabel("posterior density")
    ax.set_title("Posterior of the skip thresholds")
    ax.legend(fontsize=8)
    return _save(fig, path)


def threshold_curves(
    replay: pd.DataFrame,
    path: str | os.PathLike,
    *,
    rollout: pd.DataFrame | None = None,
    references: pd.DataFrame | None = None,
    link: str = "",
) -> Path:
    """Transmission rate, agreement/acceptance, realised risk and throughput vs threshold.

    Args:
        replay: tidy U-HLM rows of one link and payload (`threshold`, `measure`,
            `metric`, `value`), one line per measure.
        path: the PNG to write.
        rollout: tidy U-HLM rollout rows (`value`, `se`) drawn as points with ±2 SE.
        references: tidy rows of the other modes at the same link, drawn as
            horizontal lines in the throughput panel.
        link: the link's label, for the title.
    """
    panels = [
        ("transmission_rate", "transmission rate TR", None),
        ("llm_agreement", "share of tokens", "acceptance_rate"),
        ("risk_per_token", "realised risk R per token", None),
        ("throughput_tokens_per_s", "throughput (tokens/s)", None),
    ]
    fig, axes = _figure(2, 2)
    measures = list(dict.fromkeys(replay["measure"].dropna()))
    colours = dict(zip(measures, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for ax, (metric, label, extra) in zip(axes.ravel(), panels, strict=True):
        for measure in measures:
            rows = replay[(replay["measure"] == measure) & (replay["metric"] == metric)]
            rows = rows.sort_values("threshold")
            ax.plot(rows["threshold"], rows["value"], lw=1.5, color=colours.get(measure),
                    label=_pretty(measure) if metric == "transmission_rate" else None)
        if extra is not None and measures:
            acc = replay[(replay["measure"] == measures[0]) & (replay["metric"] == extra)]
            acc = acc.sort_values("threshold")
            ax.plot(acc["threshold"], acc["value"], lw=1.2, ls=":", color="black",
                    label=f"acceptance of verified drafts ({_pretty(measures[0])})")
            ax.plot([], [], color="0.5", label="solid: LLM agreement 1 − R")
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        if rollout is not None and len(rollout):
            rows = rollout[rollout["metric"] == metric]
            ax.errorbar(rows["threshold"], rows["value"], yerr=2 * rows["se"], fmt="D",
                        color="black", ms=4, capsize=3,
                        label="real rollouts ± 2 SE" if metric == "transmission_rate" else None)
        if metric == "throughput_tokens_per_s" and references is not None:
            for mode, (name, colour, _) in MODE_STYLE.items():
                rows = references[(references["mode"] == mode) & (references["metric"] == metric)]
                if mode != "uhlm" and len(rows) == 1:
                    ax.axhline(float(rows["value"].iloc[0]), color=colour, ls="--", lw=1,
                               label=name)
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
            ax.legend(fontsize=7, loc="center right")
        ax.set_xlabel("threshold u_th (skip when u ≤ u_th)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8,
               title="gate measure (trace replay)", title_fontsize=8)
    fig.suptitle(f"U-HLM against the threshold{' (' + link + ')' if link else ''}")
    return _save(fig, path)


def throughput_vs_snr(
    table: pd.DataFrame,
    path: str | os.PathLike,
    *,
    threshold_label: str = "",
) -> Path:
    """Token throughput of every mode against the link's mean SNR.

    Args:
        table: tidy rows of one payload with `mode`, `snr_db` and metric
            `throughput_tokens_per_s`; U-HLM and Rand-HLM rows of one operating point.
        path: the PNG to write.
        threshold_label: U-HLM's operating point, for the legend.
    """
    fig, ax = _figure()
    rows = table[table["metric"] == "throughput_tokens_per_s"]
    for mode, (name, colour, marker) in MODE_STYLE.items():
        mode_rows = rows[rows["mode"] == mode].sort_values("snr_db")
        if not len(mode_rows):
            continue
        label = name + (f" ({threshold_label})" if mode == "uhlm" and threshold_label else "")
        ax.plot(mode_rows["snr_db"], mode_rows["value"], marker=marker, color=colour,
                label=label)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("mean uplink SNR (dB)")
    ax.set_ylabel("token throughput (tokens/s, log scale)")
    ax.set_title("Throughput against link quality (Rayleigh fading, expected latency)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _frontier(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats in both x and y (higher is better)."""
    order = np.argsort(-x, kind="stable")
    best, keep = -np.inf, []
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, int)


def pareto(table: pd.DataFrame, path: str | os.PathLike, *, link: str = "") -> Path:
    """LLM agreement against throughput, per mode (and U-HLM threshold).

    Args:
        table: tidy rows of one link and payload with metrics `llm_agreement` and
            `throughput_tokens_per_s` (U-HLM rows of one measure).
        path: the PNG to write.
        link: the link's label, for the title.
    """
    wide = table.pivot_table(index=["point", "mode"], columns="metric", values="value")
    wide = wide.reset_index()
    fig, ax = _figure()
    for mode, (name, colour, marker) in MODE_STYLE.items():
        rows = wide[wide["mode"] == mode].sort_values("throughput_tokens_per_s")
        if not len(rows):
            continue
        ax.plot(rows["throughput_tokens_per_s"], 100 * rows["llm_agreement"], marker=marker,
                color=colour, ls="-" if len(rows) > 1 else "none", ms=6 if len(rows) > 1 else 11,
                label=name)
    # The front of the modes that draft on the device; LLM-only is a reference point.
    hybrid = wide[[Mode(m).policy.drafts for m in wide["mode"]]]
    x = hybrid["throughput_tokens_per_s"].to_numpy()
    y = hybrid["llm_agreement"].to_numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    front = _frontier(x[ok], y[ok])
    if front.size:
        fx, fy = x[ok][front], y[ok][front]
        order = np.argsort(fx)
        ax.plot(fx[order], 100 * fy[order], color="black", lw=1.2, ls=":", zorder=5,
                label="Pareto front of the hybrid modes")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("token throughput (tokens/s, log scale)")
    ax.set_ylabel("LLM agreement 1 − R (% of LLM)")
    ax.set_title(f"Accuracy against throughput{' (' + link + ')' if link else ''}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def evaluated_modes(summary: pd.DataFrame, path: str | os.PathLike, *, link: str = "") -> Path:
    """Accuracy, correct answers and the LLM's NLL (± 2 SE) against throughput, per row.

    Args:
        summary: rows of `analysis.evaluate` (`mode`, `label`, `accuracy` (MiniLM cosine
            to the reference), `accuracy_se`, `correct_rate`, `correct_rate_se`, `llm_nll`,
            `llm_nll_se`, `throughput_tokens_per_s`).
        path: the PNG to write.
        link: the link's label, for the title.
    """
    fig, (acc_ax, correct_ax, nll_ax) = _figure(1, 3)
    uhlm_rows = 0
    for row in summary.itertuples():
        _, colour, marker = MODE_STYLE[row.mode]
        if row.mode == "uhlm":
            colour = _UHLM_ROW_COLOURS[uhlm_rows % len(_UHLM_ROW_COLOURS)]
            uhlm_rows += 1
        style = dict(fmt=marker, color=colour, ms=8, capsize=3, mfc="none", mew=1.6)
        acc_ax.errorbar(row.throughput_tokens_per_s, row.accuracy, yerr=2 * row.accuracy_se,
                        label=row.label, **style)
        correct_ax.errorbar(row.throughput_tokens_per_s, row.correct_rate,
                            yerr=2 * row.correct_rate_se, **style)
        nll_ax.errorbar(row.throughput_tokens_per_s, row.llm_nll, yerr=2 * row.llm_nll_se,
                        **style)
    for ax in (acc_ax, correct_ax, nll_ax):
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel("throughput (tokens/s, log)")
        ax.grid(alpha=0.3, which="both")
    acc_ax.set_ylabel("accuracy: MiniLM cosine to the reference")
    correct_ax.set_ylabel("correct answers (share of replies)")
    nll_ax.set_ylabel("LLM NLL of the response (nats/token; lower is better)")
    fig.suptitle("Modes on held-out prompts (real rollouts, ± 2 SE)"
                 + (f", {link}" if link else ""))
    fig.legend(loc="outside lower center", ncols=2, fontsize=7)
    return _save(fig, path)


def risk_legend_label(name: str, exceed: float, no_skip: float = 0.0) -> str:
    """Legend entry of one method in `risk_histograms`.

    A split where the method skipped nothing has realised risk 0, which is not a success
    of risk control but the absence of any saving; the label says how often that happened.

    Args:
        name: the method.
        exceed: share of splits whose realised risk exceeds `ε`.
        no_skip: share of splits in which the method skipped nothing.
    """
    if no_skip >= 1.0:
        return f"{_pretty(name)}: skipped nothing in every split (no risk taken, no saving)"
    label = f"{_pretty(name)}: exceeds ε in {exceed:.0%} of splits"
    return label + (f"; skipped nothing in {no_skip:.0%}" if no_skip > 0 else "")


def risk_histograms(
    realised: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    eps: float,
    delta: float | None = None,
    no_skip: Mapping[str, float] | None = None,
) -> Path:
    """Realised risk on held-out prompts over random splits, one histogram per method.

    Args:
        realised: method -> `(splits,)` realised risk per token on the held-out prompts.
        path: the PNG to write.
        eps: the risk level `ε`.
        delta: the allowed exceedance share `δ` (for the legend).
        no_skip: method -> share of splits in which it skipped nothing (for the legend,
            `risk_legend_label`); 0 for methods not named.
    """
    no_skip = no_skip or {}
    fig, ax = _figure()
    values = [np.asarray(v, np.float64) for v in realised.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.array([eps])])
    bins = np.linspace(0.0, max(float(finite.max()), eps) * 1.05 + 1e-12, 40)
    styles = ("-", "--", "-.", ":", (0, (5, 1)))
    for k, ((name, v), colour) in enumerate(
        zip(realised.items(), _THRESHOLD_COLOURS, strict=False)
    ):
        v = np.asarray(v, np.float64)
        exceed = float(np.mean(v > eps)) if v.size else float("nan")
        label = risk_legend_label(name, exceed, float(no_skip.get(name, 0.0)))
        # Step outlines, so methods piled on the same bin stay visible.
        ax.hist(v, bins=bins, histtype="step", lw=2.2 - 0.3 * k, ls=styles[k % len(styles)],
                color=colour, label=label)
    ax.axvline(eps, color="black", ls="--", lw=1.5,
               label=f"ε = {eps:g}" + (f" (allowed share δ = {delta:g})" if delta else ""))
    ax.set_xlabel("realised risk per token on held-out prompts")
    ax.set_ylabel("splits")
    ax.set_title("Risk control over random prompt splits")
    ax.legend(fontsize=8)
    return _save(fig, path)


def measure_comparison(scores: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Uncertainty measures by Pearson and Spearman correlation with `β` and AUROC.

    Args:
        scores: one row per measure with columns `measure`, `pearson`, `spearman`,
            `auroc` (AUROC of `u` for `β > 0`).
        path: the PNG to write.
    """
    fig, ax = _figure()
    x = np.arange(len(scores))
    width = 0.27
    columns = [("pearson", "Pearson r(u, β)"), ("spearman", "Spearman ρ(u, β)"),
               ("auroc", "AUROC of u for β > 0")]
    for k, (column, label) in enumerate(columns):
        values = scores[column].to_numpy(np.float64)
        bars = ax.bar(x + (k - 1) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(0.5, color="black", ls=":", lw=1, label="AUROC of a random score")
    ax.set_xticks(x, [_pretty(m) for m in scores["measure"]], rotation=15, fontsize=8)
    ax.set_ylabel("score (higher predicts rejection better)")
    ax.set_ylim(min(0.0, float(np.nanmin(scores[["pearson", "spearman"]].to_numpy())) - 0.05),
                1.3)
    ax.set_title("Which uncertainty measure predicts rejection?")
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    return _save(fig, path)
