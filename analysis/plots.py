"""Figures of a calibration run and its sweep (matplotlib, Agg backend, PNG files).

Every function draws one figure from arrays or tables, writes it to `path` as a PNG of
`FIGSIZE_IN × DPI` pixels (layout is constrained, never cropped, so sizes are fixed), and
returns the path. None reads files: `analysis.report` gathers the data of a run directory
and calls them.

* `u_beta` — uncertainty against rejection probability, with the mean `β` at each `u`
  value, the fitted line, its posterior band, the hurdle fit and the thresholds;
* `threshold_posteriors` — posterior draws of the analytic thresholds;
* `threshold_curves` — each measure's threshold, LLM agreement and acceptance, realised
  risk and throughput against the share of tokens skipped (replay lines, rollout points
  with error bars);
* `throughput_vs_snr` — every mode's token throughput against the link's mean SNR;
* `pareto` — LLM agreement `1 − R` against throughput, per mode and threshold;
* `evaluated_modes` — accuracy (MiniLM cosine), correct answers and the LLM's NLL against
  throughput of real rollouts on held-out prompts;
* `risk_histograms` — realised risk on held-out prompts over random splits, with `ε`;
* `measure_comparison` — uncertainty measures by correlation with `β` and AUROC of `β > 0`.

Figures with a risk axis mark `ε`, and figures with a place for it mark the operating
point (`Operating`) in one style. Modes whose markers or lines would cover each other are
drawn apart or said to coincide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from uhlm_jax import rejection  # noqa: E402
from uhlm_jax import threshold as T  # noqa: E402
from uhlm_jax.modes import Mode  # noqa: E402

__all__ = [
    "DPI",
    "evaluated_modes",
    "FIGSIZE_IN",
    "HEXBIN_MIN_POINTS",
    "MAX_DISCRETE_VALUES",
    "MIN_MARKER_GAP_PT",
    "MODE_STYLE",
    "Operating",
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
# A measure with at most this many distinct values (`u = j/K`) gets one mean β per value.
MAX_DISCRETE_VALUES = 64
# Markers of evaluated modes closer than this (display points) are set side by side.
MIN_MARKER_GAP_PT = 9.0
# Risk-histogram bins per ε, so the region around ε is resolved, and a cap on the count.
RISK_BINS_PER_EPS = 20
MAX_RISK_BINS = 240
# ε and the operating point look the same in every figure.
EPS_LINE = {"color": "black", "ls": "--", "lw": 1.5}
OPERATING_LINE = {"color": "goldenrod", "ls": "-", "lw": 2.5, "alpha": 0.9}
OPERATING_MARKER = {"marker": "*", "color": "goldenrod", "ms": 18, "mec": "black",
                    "mew": 1.0, "ls": "none", "zorder": 6}


class Operating(NamedTuple):
    """U-HLM's operating point, marked in every figure it has a place in.

    Attributes:
        name: where its threshold comes from (e.g. "risk-bounded").
        threshold: `u_th`, clipped to [0, 1].
        skip_rate: share of tokens it skips (trace replay); NaN if unknown.
        throughput_tokens_per_s: its trace-replay throughput; NaN if unknown.
        llm_agreement: its trace-replay `1 − R`; NaN if unknown.
    """

    name: str
    threshold: float
    skip_rate: float = math.nan
    throughput_tokens_per_s: float = math.nan
    llm_agreement: float = math.nan

    @property
    def label(self) -> str:
        return f"operating point: {self.name}, u_th = {self.threshold:.3f}"


def _eps_label(eps: float) -> str:
    return f"risk level ε = {eps:g}"


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


def _binned_means(
    u: np.ndarray, beta: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Mean `β` at each distinct `u`, or per equal-width `u` bin when `u` takes many values.

    A discrete measure (`u = j/K`, `uhlm_jax.uncertainty.exact_fractions`) gets one mean
    at each of its values, so the means sit on the values themselves. A continuous one
    gets `num_bins` bins, each mean drawn at the mean `u` of its tokens (not the bin's
    centre, which no token need be near).

    Returns:
        `(x, mean β, discrete)` for the non-empty groups, `x` increasing.
    """
    values, which = np.unique(u, return_inverse=True)
    discrete = values.size <= MAX_DISCRETE_VALUES
    if not discrete:
        edges = np.linspace(values[0], values[-1], num_bins + 1)
        which = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
    counts = np.bincount(which)
    full = counts > 0
    x = values if discrete else np.bincount(which, weights=u)[full] / counts[full]
    means = np.bincount(which, weights=beta)[full] / counts[full]
    return x, means, discrete


def _threshold_label(name: str, value: float, raw: float | None) -> str:
    """`name: u_th = 1.000 (raw 1.734, clipped)` when clipping moved it, else the value."""
    if raw is None or not np.isfinite(raw) or np.isclose(raw, value):
        return f"{name}: u_th = {value:.3f}"
    return f"{name}: u_th = {value:.3f} (raw {raw:.3g}, clipped to [0, 1])"


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
    raw_thresholds: Mapping[str, float] | None = None,
    hurdle: Mapping[str, float] | None = None,
    operating: Operating | None = None,
    num_bins: int = 20,
) -> Path:
    """Uncertainty `u` against rejection probability `β` of every token.

    `ε` has no place here: it bounds the risk per token, an integral over `u`, not `β`.

    Args:
        u, beta: `(n,)` per-token values.
        path: the PNG to write.
        measure: the measure's name (axis label).
        slope, intercept: the fitted line `β = a·u + b` (e.g. least squares).
        slope_draws, intercept_draws: posterior draws of `(a, b)` for a `BAND_MASS` band.
        thresholds: name -> threshold (clipped to [0, 1]), drawn as vertical lines;
            a NaN one is listed as undefined.
        raw_thresholds: name -> the threshold before clipping, shown beside the clipped
            value where they differ.
        hurdle: the hurdle model's parameters (`uhlm_jax.rejection.HURDLE_SITES`, e.g.
            posterior means), drawn as its mean curve `E[β | u]`.
        operating: the operating point, drawn as a solid vertical line.
        num_bins: equal-width `u` bins of the means when `u` takes more than
            `MAX_DISCRETE_VALUES` values.
    """
    u = np.asarray(u, np.float64)
    beta = np.asarray(beta, np.float64)
    raw_thresholds = raw_thresholds or {}
    fig, ax = _figure()
    if u.size >= HEXBIN_MIN_POINTS:
        hb = ax.hexbin(u, beta, gridsize=40, bins="log", cmap="Greys", mincnt=1)
        fig.colorbar(hb, ax=ax, label="tokens per cell (log scale)")
    else:
        ax.scatter(u, beta, s=8, alpha=0.25, color="0.4", edgecolors="none",
                   label=f"tokens (n = {u.size})")
    x, means, discrete = _binned_means(u, beta, num_bins)
    ax.plot(x, means, "o", color="black", ms=5,
            label="mean β at each value of u" if discrete
            else "mean β per u bin (at the bin's mean u)")
    lo, hi = float(np.min(u)), float(np.max(u))
    grid = np.linspace(lo, hi if hi > lo else lo + 1.0, 200)
    if slope_draws is not None and intercept_draws is not None:
        lines = np.outer(np.asarray(slope_draws), grid) + np.asarray(intercept_draws)[:, None]
        tail = (1 - BAND_MASS) / 2
        band_lo, band_hi = np.quantile(lines, [tail, 1 - tail], axis=0)
        ax.fill_between(grid, band_lo, band_hi, color="tab:red", alpha=0.25,
                        label=f"posterior {BAND_MASS:.0%} band of a·u + b")
    if slope is not None and intercept is not None:
        ax.plot(grid, slope * grid + intercept, color="tab:red", lw=2,
                label=f"linear fit β = {slope:.3f}·u "
                      f"{'−' if intercept < 0 else '+'} {abs(intercept):.3f}")
    # The mean needs the four logistic parameters; the concentration only shapes the spread.
    mean_sites = rejection.HURDLE_SITES[:4]
    values = [None if hurdle is None else hurdle.get(site) for site in mean_sites]
    if all(v is not None and np.isfinite(v) for v in values):
        params = [jnp.float32(v) for v in values]
        curve = np.asarray(T.hurdle_mean(*params, jnp.asarray(grid, jnp.float32)))
        ax.plot(grid, curve, color="tab:blue", lw=2, ls="-.",
                label="hurdle fit E[β | u] = σ(c·u + e)·σ(f·u + g)")
    for (name, t), colour in zip((thresholds or {}).items(), _THRESHOLD_COLOURS, strict=False):
        if t is not None and np.isfinite(t):
            ax.axvline(t, color=colour, ls="--", lw=1.5,
                       label=_threshold_label(name, t, raw_thresholds.get(name)))
        else:
            ax.plot([], [], ls="none", label=f"{name}: undefined")
    if operating is not None:
        ax.axvline(operating.threshold, **OPERATING_LINE, label=operating.label)
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
    operating: Operating | None = None,
) -> Path:
    """Histograms of posterior draws of thresholds (e.g. risk-averse `−b/a`).

    Args:
        draws: name -> `(m,)` draws of a threshold.
        path: the PNG to write.
        point_estimates: name -> value drawn as a dashed line (e.g. least squares).
        operating: the operating point, drawn as a solid vertical line.
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
    if operating is not None:
        ax.axvline(operating.threshold, **OPERATING_LINE, label=operating.label)
    ax.set_xlabel("threshold u_th (unclipped: < 0 skips nothing, > 1 skips every token)")
    ax.set_ylabel("posterior density")
    ax.set_title("Posterior of the skip thresholds")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _by_threshold(rows: pd.DataFrame, metric: str) -> pd.Series:
    """`threshold -> value` of one metric (the first row of each threshold)."""
    picked = rows[rows["metric"] == metric].drop_duplicates("threshold")
    return picked.set_index("threshold")["value"].sort_index()


def threshold_curves(
    replay: pd.DataFrame,
    path: str | os.PathLike,
    *,
    rollout: pd.DataFrame | None = None,
    references: pd.DataFrame | None = None,
    link: str = "",
    eps: float | None = None,
    operating: Operating | None = None,
) -> Path:
    """U-HLM's threshold, agreement/acceptance, realised risk and throughput against the
    share of tokens it skips.

    Measures differ in scale (an entropy in nats, a share in [0, 1]), so they are compared
    at equal skip rate, which is what a threshold buys; the first panel maps each
    measure's skip rate back to its threshold.

    Args:
        replay: tidy U-HLM rows of one link and payload (`threshold`, `measure`,
            `metric`, `value`; metrics include `skip_rate`), one line per measure.
        path: the PNG to write.
        rollout: tidy U-HLM rollout rows (`threshold`, `metric`, `value`, `se`, with
            `skip_rate` among the metrics) drawn as points with ±2 SE both ways.
        references: tidy rows of the other modes at the same link, drawn as
            horizontal lines in the throughput panel.
        link: the link's label, for the title.
        eps: the risk level, drawn in the risk panel.
        operating: the operating point, drawn at its skip rate in every panel.
    """
    panels = [
        ("threshold", "threshold u_th of the measure", None),
        ("llm_agreement", "share of tokens", "acceptance_rate"),
        ("risk_per_token", "realised risk R per token", None),
        ("throughput_tokens_per_s", "throughput (tokens/s)", None),
    ]
    fig, axes = _figure(2, 2)
    measures = list(dict.fromkeys(replay["measure"].dropna()))
    colours = dict(zip(measures, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    skip = {m: _by_threshold(replay[replay["measure"] == m], "skip_rate") for m in measures}
    if rollout is not None and len(rollout):
        if not (rollout["metric"] == "skip_rate").any():
            raise ValueError("rollout rows have no 'skip_rate' metric to place them on the "
                             "skip-share axis; pass the sweep's rollout rows unfiltered by metric")
        ro_skip = _by_threshold(rollout, "skip_rate")
        ro_skip_se = rollout[rollout["metric"] == "skip_rate"].drop_duplicates(
            "threshold").set_index("threshold")["se"].reindex(ro_skip.index)
    for ax, (metric, label, extra) in zip(axes.ravel(), panels, strict=True):
        for measure in measures:
            x = skip[measure]
            y = (pd.Series(x.index, x.index) if metric == "threshold" else
                 _by_threshold(replay[replay["measure"] == measure], metric).reindex(x.index))
            order = np.argsort(x.to_numpy(), kind="stable")
            ax.plot(x.to_numpy()[order], y.to_numpy()[order], lw=1.5,
                    color=colours.get(measure),
                    label=_pretty(measure) if metric == "threshold" else None)
        if extra is not None and measures:
            acc = _by_threshold(replay[replay["measure"] == measures[0]], extra)
            x = skip[measures[0]].reindex(acc.index)
            order = np.argsort(x.to_numpy(), kind="stable")
            ax.plot(x.to_numpy()[order], acc.to_numpy()[order], lw=1.2, ls=":",
                    color="black",
                    label=f"acceptance of verified drafts ({_pretty(measures[0])})")
            ax.plot([], [], color="0.5", label="solid: LLM agreement 1 − R")
        if rollout is not None and len(rollout):
            ys = (pd.Series(ro_skip.index, ro_skip.index) if metric == "threshold"
                  else _by_threshold(rollout, metric).reindex(ro_skip.index))
            yerr = None
            if metric != "threshold":
                yerr = 2 * rollout[rollout["metric"] == metric].drop_duplicates(
                    "threshold").set_index("threshold")["se"].reindex(ro_skip.index)
            ax.errorbar(ro_skip, ys, xerr=2 * ro_skip_se, yerr=yerr, fmt="D", color="black",
                        ms=4, capsize=3,
                        label="real rollouts ± 2 SE" if metric == "threshold" else None)
        if metric == "risk_per_token" and eps is not None:
            ax.axhline(eps, **EPS_LINE, label=_eps_label(eps))
        if operating is not None and np.isfinite(operating.skip_rate):
            ax.axvline(operating.skip_rate, **OPERATING_LINE,
                       label=f"{operating.label} (skips {operating.skip_rate:.1%})"
                       if metric == "threshold" else None)
        if metric == "throughput_tokens_per_s" and references is not None:
            for mode, (name, colour, _) in MODE_STYLE.items():
                rows = references[(references["mode"] == mode) & (references["metric"] == metric)]
                if mode != "uhlm" and len(rows) == 1:
                    ax.axhline(float(rows["value"].iloc[0]), color=colour, ls="--", lw=1,
                               label=name)
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
        if metric != "threshold" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        ax.set_xlabel("share of tokens skipped 1 − TR")
        ax.set_ylabel(label)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8,
               title="gate measure (trace replay)", title_fontsize=8)
    fig.suptitle("U-HLM against the share of tokens it skips"
                 + (f" ({link})" if link else ""))
    return _save(fig, path)


# Line style and marker size per mode in line plots, so that coinciding lines stay visible:
# U-HLM solid with filled markers on top, Rand-HLM dashed with larger hollow markers.
_MODE_LINES = {
    "uhlm": {"ls": "-", "lw": 2.0, "ms": 6, "zorder": 4},
    "rand_hlm": {"ls": "--", "lw": 1.5, "ms": 11, "mfc": "none", "mew": 1.5, "zorder": 3},
}
# Relative gap below which two modes' lines look like one on a log axis of decades.
COINCIDE_RTOL = 0.05


def throughput_vs_snr(
    table: pd.DataFrame,
    path: str | os.PathLike,
    *,
    threshold_label: str = "",
) -> Path:
    """Token throughput of every mode against the link's mean SNR.

    U-HLM is U-HLM's operating point (its legend entry says which threshold); `ε` has
    no place in a throughput figure.

    Args:
        table: tidy rows of one payload with `mode`, `snr_db` and metric
            `throughput_tokens_per_s`; U-HLM and Rand-HLM rows of one operating point.
        path: the PNG to write.
        threshold_label: U-HLM's operating point, for the legend.
    """
    fig, ax = _figure()
    rows = table[table["metric"] == "throughput_tokens_per_s"]
    curves = {mode: rows[rows["mode"] == mode].sort_values("snr_db") for mode in MODE_STYLE}
    labels = {mode: name for mode, (name, _, _) in MODE_STYLE.items()}
    if threshold_label:
        labels["uhlm"] += f" (operating point, {threshold_label})"
    if len(curves["uhlm"]) and len(curves["rand_hlm"]):
        a, b = (curves[m].set_index("snr_db")["value"] for m in ("uhlm", "rand_hlm"))
        a, b = a.align(b, join="inner")
        gap = float(np.max(np.abs(b.to_numpy() / a.to_numpy() - 1))) if len(a) else math.inf
        if gap < COINCIDE_RTOL:
            labels["rand_hlm"] += (f" (dashed, hollow): within {gap:.1%} of U-HLM,\n"
                                   "as it transmits the same share of tokens")
    for mode, (_, colour, marker) in MODE_STYLE.items():
        if len(curves[mode]):
            style = {"ls": "-", "lw": 1.5, "ms": 6, **_MODE_LINES.get(mode, {})}
            ax.plot(curves[mode]["snr_db"], curves[mode]["value"], marker=marker,
                    color=colour, label=labels[mode], **style)
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


def pareto(
    table: pd.DataFrame,
    path: str | os.PathLike,
    *,
    link: str = "",
    eps: float | None = None,
    operating: Operating | None = None,
) -> Path:
    """LLM agreement `1 − R` against throughput, per mode (and U-HLM threshold).

    Args:
        table: tidy rows of one link and payload with metrics `llm_agreement` and
            `throughput_tokens_per_s` (U-HLM rows of one measure).
        path: the PNG to write.
        link: the link's label, for the title.
        eps: the risk level; agreement `1 − ε` is drawn as the floor a risk-controlled
            threshold keeps.
        operating: the operating point, drawn at its throughput and agreement.
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
    if eps is not None:
        ax.axhline(100 * (1 - eps), **EPS_LINE, label=f"agreement 1 − ε ({_eps_label(eps)})")
    if operating is not None and np.isfinite(operating.throughput_tokens_per_s):
        ax.plot(operating.throughput_tokens_per_s, 100 * operating.llm_agreement,
                **OPERATING_MARKER, label=operating.label)
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("token throughput (tokens/s, log scale)")
    ax.set_ylabel("LLM agreement 1 − R (% of tokens the LLM would accept)")
    ax.set_title(f"LLM agreement against throughput{' (' + link + ')' if link else ''}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _spread_overlapping(fig, ax, artists: list) -> int:
    """Sets markers closer than `MIN_MARKER_GAP_PT` side by side, in display space.

    Each entry of `artists` is the list of artists of one point (marker, error bars);
    they move together by a horizontal offset in points, so data values are unchanged;
    the x limits widen where a moved marker would leave the axes. Returns how many
    points were moved.
    """
    fig.canvas.draw()
    points_per_px = 72.0 / fig.dpi
    xy = np.array([a[0].get_transform().transform(np.column_stack(a[0].get_data()).astype(float))[0]
                   for a in artists]) * points_per_px
    group = np.arange(len(artists))
    for i in range(len(artists)):
        for j in range(i):
            if np.hypot(*(xy[i] - xy[j])) < MIN_MARKER_GAP_PT:
                group[group == group[i]] = group[j]
    moved = 0
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        if members.size < 2:
            continue
        for rank, k in enumerate(members):
            shift = (rank - (members.size - 1) / 2) * MIN_MARKER_GAP_PT * 1.2
            offset = offset_copy(ax.transData, fig=fig, x=shift, y=0.0, units="points")
            for artist in artists[k]:
                artist.set_transform(offset)
            xy[k, 0] += shift
            moved += 1
    if moved:
        _keep_inside_x(fig, ax, xy[:, 0] / points_per_px)
    return moved


def _keep_inside_x(fig, ax, x_px: np.ndarray) -> None:
    """Widens `ax`'s x limits so that markers at display x `x_px` (pixels, under the
    current limits) stay at least one marker gap inside the axes."""
    box = ax.get_window_extent()
    pad = MIN_MARKER_GAP_PT * fig.dpi / 72.0
    left = max(0.0, box.x0 + pad - float(x_px.min()))
    right = max(0.0, float(x_px.max()) + pad - box.x1)
    if left or right:
        to_data = ax.transData.inverted()
        (x0, _), (x1, _) = to_data.transform([(box.x0 - left, box.y0), (box.x1 + right, box.y0)])
        ax.set_xlim(x0, x1)


def evaluated_modes(
    summary: pd.DataFrame,
    path: str | os.PathLike,
    *,
    link: str = "",
    operating: Operating | None = None,
) -> Path:
    """Accuracy, correct answers and the LLM's NLL (± 2 SE) against throughput, per row.

    Points that would cover each other are set side by side (`_spread_overlapping`) and
    the figure says so. `ε` has no place here (no axis is a risk).

    Args:
        summary: rows of `analysis.evaluate` (`mode`, `label`, `accuracy` (MiniLM cosine
            to the reference), `accuracy_se`, `correct_rate`, `correct_rate_se`, `llm_nll`,
            `llm_nll_se`, `throughput_tokens_per_s`; `threshold_name` marks the operating
            U-HLM row).
        path: the PNG to write.
        link: the link's label, for the title.
        operating: the operating point; the U-HLM row of its name is drawn filled.
    """
    fig, axes = _figure(1, 3)
    panels = [("accuracy", "accuracy: MiniLM cosine to the reference"),
              ("correct_rate", "correct answers (share of replies)"),
              ("llm_nll", "LLM NLL of the response (nats/token; lower is better)")]
    points: dict[int, list] = {k: [] for k in range(len(axes))}
    uhlm_rows = 0
    for row in summary.itertuples():
        label, colour, marker = row.label, *MODE_STYLE[row.mode][1:]
        filled = False
        if row.mode == "uhlm":
            colour = _UHLM_ROW_COLOURS[uhlm_rows % len(_UHLM_ROW_COLOURS)]
            uhlm_rows += 1
            filled = (operating is not None
                      and getattr(row, "threshold_name", None) == operating.name)
            label += " — operating point" if filled else ""
        style = dict(fmt=marker, color=colour, ms=8, capsize=3, mew=1.6,
                     mfc=colour if filled else "none")
        for k, (ax, (column, _)) in enumerate(zip(axes, panels, strict=True)):
            bars = ax.errorbar(row.throughput_tokens_per_s, getattr(row, column),
                               yerr=2 * getattr(row, column + "_se"),
                               label=label if k == 0 else None, **style)
            points[k].append([bars.lines[0], *bars.lines[1], *bars.lines[2]])
    for ax, (_, ylabel) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel("throughput (tokens/s, log)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=2, fontsize=7)
    moved = sum(_spread_overlapping(fig, ax, points[k]) for k, ax in enumerate(axes))
    fig.suptitle("Modes on held-out prompts (real rollouts, ± 2 SE)"
                 + (f", {link}" if link else "")
                 + ("\nmarkers that would overlap are set side by side (values unchanged)"
                    if moved else ""))
    return _save(fig, path)


def risk_legend_label(
    name: str, exceed: float, no_skip: float = 0.0, splits: int | None = None
) -> str:
    """Legend entry of one method in `risk_histograms`.

    A split where the method skipped nothing has realised risk 0, which is not a success
    of risk control but the absence of any saving; the label says how often that happened.

    Args:
        name: the method.
        exceed: share of splits whose realised risk exceeds `ε`.
        no_skip: share of splits in which the method skipped nothing.
        splits: how many splits the method was validated on, when it differs from the
            other methods' (a model refitted on the first few splits only).
    """
    if no_skip >= 1.0:
        return f"{_pretty(name)}: skipped nothing in every split (no risk taken, no saving)"
    of = "splits" if splits is None else f"{splits} splits"
    label = f"{_pretty(name)}: exceeds ε in {exceed:.0%} of {of}"
    return label + (f"; skipped nothing in {no_skip:.0%}" if no_skip > 0 else "")


def risk_bins(values: np.ndarray, eps: float) -> np.ndarray:
    """Equal-width bins from 0 of width `ε / RISK_BINS_PER_EPS` (wider only when that
    would exceed `MAX_RISK_BINS`), covering every finite value and `1.2 ε`."""
    finite = values[np.isfinite(values)]
    top = max(float(finite.max()) if finite.size else 0.0, 1.2 * eps)
    width = max(eps / RISK_BINS_PER_EPS, top / MAX_RISK_BINS)
    return np.arange(0.0, top + width, width)


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
    bins = risk_bins(np.concatenate(values) if values else np.zeros(0), eps)
    most_splits = max((v.size for v in values), default=0)
    styles = ("-", "--", "-.", ":", (0, (5, 1)))
    for k, ((name, v), colour) in enumerate(
        zip(realised.items(), _THRESHOLD_COLOURS, strict=False)
    ):
        v = np.asarray(v, np.float64)
        exceed = float(np.mean(v > eps)) if v.size else float("nan")
        label = risk_legend_label(name, exceed, float(no_skip.get(name, 0.0)),
                                  v.size if v.size < most_splits else None)
        # Step outlines, so methods piled on the same bin stay visible.
        ax.hist(v, bins=bins, histtype="step", lw=2.2 - 0.3 * k, ls=styles[k % len(styles)],
                color=colour, label=label)
    ax.axvline(eps, **EPS_LINE,
               label=_eps_label(eps) + (f" (allowed share δ = {delta:g})" if delta else ""))
    ax.set_xlabel(f"realised risk per token on held-out prompts (bins of {bins[1]:.2g})")
    ax.set_ylabel("splits")
    ax.set_title("Risk control over random prompt splits")
    ax.legend(fontsize=8)
    return _save(fig, path)


# Two-sided 95% normal quantile of the measure-comparison intervals.
_Z95 = 1.959963984540054
# Variance factor of Fisher's z for Spearman's ρ (Fieller, Hartley & Pearson 1957).
_SPEARMAN_Z_VARIANCE = 1.06


def score_intervals(scores: pd.DataFrame) -> dict[str, np.ndarray]:
    """95% intervals `(2, measures)` of each score, treating tokens as independent.

    Pearson's r and Spearman's ρ through Fisher's z (variance `1/(n − 3)`, times 1.06
    for ρ); AUROC by Hanley & McNeil (1982) from the counts of `β > 0` and `β = 0`.
    Tokens of one prompt are dependent, so these are lower bounds on the uncertainty.
    """
    n = scores["num_tokens"].to_numpy(np.float64)
    out = {}
    for column, factor in (("pearson", 1.0), ("spearman", _SPEARMAN_Z_VARIANCE)):
        z = np.arctanh(np.clip(scores[column].to_numpy(np.float64), -0.999999, 0.999999))
        half = _Z95 * np.sqrt(factor / np.maximum(n - 3, 1))
        out[column] = np.tanh(np.stack([z - half, z + half]))
    a = scores["auroc"].to_numpy(np.float64)
    n1 = np.maximum(np.round(n * scores["share_positive"].to_numpy(np.float64)), 1)
    n0 = np.maximum(n - n1, 1)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt(np.maximum(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a),
                            0.0) / (n1 * n0))
    out["auroc"] = np.stack([a - _Z95 * se, a + _Z95 * se])
    return out


def measure_comparison(scores: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Uncertainty measures by Pearson and Spearman correlation with `β` and AUROC,
    with 95% intervals (`score_intervals`).

    Args:
        scores: one row per measure with columns `measure`, `pearson`, `spearman`,
            `auroc` (AUROC of `u` for `β > 0`), `num_tokens` and `share_positive`.
        path: the PNG to write.
    """
    fig, ax = _figure()
    x = np.arange(len(scores))
    width = 0.27
    columns = [("pearson", "Pearson r(u, β)"), ("spearman", "Spearman ρ(u, β)"),
               ("auroc", "AUROC of u for β > 0")]
    intervals = score_intervals(scores)
    for k, (column, label) in enumerate(columns):
        values = scores[column].to_numpy(np.float64)
        lo, hi = intervals[column]
        bars = ax.bar(x + (k - 1) * width, values, width, label=label,
                      yerr=np.stack([values - lo, hi - values]), capsize=3,
                      error_kw={"lw": 1})
        # Inside the bars, where the error bars cannot cover them.
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center", color="white")
    ax.axhline(0.5, color="black", ls=":", lw=1, label="AUROC of a random score")
    ax.set_xticks(x, [_pretty(m) for m in scores["measure"]], rotation=15, fontsize=8)
    ax.set_ylabel("score (higher predicts rejection better)")
    low = np.nanmin(np.concatenate([intervals["pearson"][0], intervals["spearman"][0],
                                    intervals["auroc"][0], [0.0]]))
    high = np.nanmax(np.concatenate([intervals[c][1] for c, _ in columns] + [[0.5]]))
    ax.set_ylim(min(0.0, low - 0.05), min(high, 1.0) + 0.08)
    ax.set_title("Which uncertainty measure predicts rejection?\n"
                 "error bars: 95% intervals with tokens taken as independent\n"
                 "(too narrow when tokens of one prompt are dependent)", fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center", ncols=4)
    return _save(fig, path)
