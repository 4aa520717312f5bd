"""Every plot function writes a real PNG of the stated size from a small run's data."""

import itertools
import math
import struct

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from analysis import plots, report
from calibration import records
from tests.helpers import write_synthetic_run
from uhlm_jax import replay_table as rt
from uhlm_jax.pricing import Pricing

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (int(plots.FIGSIZE_IN[0] * plots.DPI), int(plots.FIGSIZE_IN[1] * plots.DPI))
# A figure with axes, lines and text compresses to well above this; a blank one does not.
MIN_PNG_BYTES = 10_000


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _check(path):
    assert path.is_file()
    assert path.stat().st_size > MIN_PNG_BYTES
    assert _png_size(path) == EXPECTED_SIZE


@pytest.fixture
def figures(monkeypatch):
    """The Figure objects the plot functions save, in order, for inspection."""
    saved = []
    save = plots._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


OPERATING = plots.Operating("risk-bounded", 0.3, 0.55, 25.0, 0.97)
EPS = 0.05


def _vertical_at(ax, x):
    return [line for line in ax.lines if list(line.get_xdata()) == [x, x]]


def _horizontal_at(ax, y):
    return [line for line in ax.lines if list(line.get_ydata()) == [y, y]]


def _legend_texts(holder) -> list[str]:
    legend = holder.get_legend() if hasattr(holder, "get_legend") else None
    legends = [legend] if legend is not None else list(getattr(holder, "legends", []))
    return [t.get_text() for lg in legends for t in lg.get_texts()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plots_run")
    df = write_synthetic_run(run_dir)
    measures = tuple(records.measure_names(df.columns))
    grid = rt.ReplayGrid(thresholds=tuple(np.linspace(0, 1, 11)), snr_db=(0.0, 10.0, 20.0))
    table = rt.replay_table(grid, records.token_records(df, measures), measures,
                            Pricing().cost_profile(), progress=False)
    return run_dir, df, table


def test_u_beta_scatter_and_hexbin(run, tmp_path):
    _, df, _ = run
    u = df["u_temperature_perturbation"].to_numpy()
    beta = df["beta"].to_numpy()
    rng = np.random.default_rng(0)
    _check(
        plots.u_beta(
            u,
            beta,
            tmp_path / "scatter.png",
            measure="temperature_perturbation",
            slope=0.8,
            intercept=-0.06,
            slope_draws=rng.normal(0.8, 0.02, 200),
            intercept_draws=rng.normal(-0.06, 0.01, 200),
            thresholds={"risk-averse": 0.075, "none": float("nan")},
        )
    )
    big = np.resize(u, plots.HEXBIN_MIN_POINTS)
    _check(
        plots.u_beta(
            big,
            np.resize(beta, big.size),
            tmp_path / "hexbin.png",
            measure="temperature_perturbation",
        )
    )


def test_threshold_posteriors(tmp_path):
    rng = np.random.default_rng(1)
    _check(
        plots.threshold_posteriors(
            {"risk-averse": rng.normal(0.07, 0.01, 500), "risk-prone": rng.normal(0.5, 0.05, 500)},
            tmp_path / "post.png",
            point_estimates={"risk-averse": 0.073},
        )
    )


def test_threshold_curves_with_rollouts(run, tmp_path):
    _, _, table = run
    medium = table[(table["link"] == "medium")]
    rollout = pd.DataFrame(
        {
            "threshold": [0.2, 0.5, 0.2, 0.5],
            "metric": ["transmission_rate"] * 2 + ["skip_rate"] * 2,
            "value": [0.8, 0.5, 0.2, 0.5],
            "se": [0.02, 0.03, 0.02, 0.03],
        }
    )
    _check(
        plots.threshold_curves(
            medium[medium["mode"] == "uhlm"],
            tmp_path / "curves.png",
            rollout=rollout,
            references=medium[medium["mode"] != "uhlm"],
            link="medium link",
        )
    )


def test_throughput_vs_snr_and_pareto(run, tmp_path):
    _, _, table = run
    at_threshold = table[
        (table["link"].str.startswith("snr"))
        & (
            (table["mode"] != "uhlm")
            | ((table["threshold"] == 0.5) & (table["measure"] == "entropy"))
        )
        & ((table["mode"] != "rand_hlm") | (table["transmit_probability"] == 0.5))
    ]
    _check(
        plots.throughput_vs_snr(at_threshold, tmp_path / "snr.png", threshold_label="u_th = 0.5")
    )
    medium = table[
        (table["link"] == "medium")
        & ((table["mode"] != "uhlm") | (table["measure"] == "temperature_perturbation"))
    ]
    _check(plots.pareto(medium, tmp_path / "pareto.png", link="medium"))


def test_risk_histograms(tmp_path):
    rng = np.random.default_rng(2)
    _check(
        plots.risk_histograms(
            {"ltt": rng.uniform(0, 0.04, 200), "analytic_risk_prone": rng.uniform(0.02, 0.09, 200)},
            tmp_path / "risk.png",
            eps=0.05,
            delta=0.1,
        )
    )


def test_risk_histogram_legend_marks_methods_that_skipped_nothing(tmp_path):
    # A method that skipped nothing has realised risk 0: the legend says so, not "0%".
    assert plots.risk_legend_label("ltt", 0.0, 1.0) == (
        "ltt: skipped nothing in every split (no risk taken, no saving)"
    )
    assert plots.risk_legend_label("ltt", 0.02, 0.25).endswith(
        "exceeds ε in 2% of splits; skipped nothing in 25%"
    )
    assert plots.risk_legend_label("ltt", 0.02).endswith("exceeds ε in 2% of splits")
    # A model refitted on fewer splits than the others says on how many.
    assert plots.risk_legend_label("risk_bounded", 0.1, 0.0, 10).endswith(
        "exceeds ε in 10% of 10 splits"
    )
    _check(
        plots.risk_histograms(
            {"ltt": np.zeros(100), "analytic_risk_prone": np.full(100, 0.08)},
            tmp_path / "risk.png",
            eps=0.05,
            no_skip={"ltt": 1.0},
        )
    )


def test_measure_comparison(run, tmp_path):
    _, df, _ = run
    _check(plots.measure_comparison(report.measure_scores(df), tmp_path / "measures.png"))


def test_pareto_front_keeps_only_undominated_points():
    x = np.array([1.0, 2.0, 3.0, 2.5, 0.5])
    y = np.array([0.9, 0.8, 0.5, 0.4, 0.95])
    # (2.5, 0.4) is beaten by (3.0, 0.5); the others trade speed for agreement.
    assert sorted(plots._frontier(x, y).tolist()) == [0, 1, 2, 4]


def test_evaluated_modes(tmp_path):
    summary = pd.DataFrame(
        {
            "mode": ["llm_only", "slm_only", "hlm", "uhlm", "uhlm", "rand_hlm"],
            "label": ["LLM only", "SLM only", "HLM", "U-HLM, a", "U-HLM, b", "Rand-HLM"],
            "accuracy": [0.85, 0.79, 0.86, 0.85, 0.83, 0.83],
            "accuracy_se": [0.01, 0.013, 0.01, 0.01, 0.016, 0.016],
            "correct_rate": [0.6, 0.3, 0.62, 0.6, 0.5, 0.45],
            "correct_rate_se": [0.07, 0.065, 0.07, 0.07, 0.07, 0.07],
            "llm_nll": [2.2, 5.1, 2.1, 2.2, 3.0, 2.6],
            "llm_nll_se": [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
            "throughput_tokens_per_s": [150.0, 37.0, 20.8, 22.0, 24.5, 21.9],
        }
    )
    _check(plots.evaluated_modes(summary, tmp_path / "modes.png", link="medium link"))


# ---------------------------------------------------------------------------------------
# What each figure shows
# ---------------------------------------------------------------------------------------


def test_u_beta_means_sit_on_the_discrete_u_values(figures, tmp_path):
    # u = j/K for K = 8: each mean is drawn at its j/K, with the mean of its tokens.
    k = 8
    j = np.array([0, 0, 1, 3, 3, 3, 8])
    beta = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    plots.u_beta(j / k, beta, tmp_path / "u.png", measure="m")
    (means,) = [ln for ln in figures[0].axes[0].lines
                if ln.get_label() == "mean β at each value of u"]
    np.testing.assert_array_equal(means.get_xdata(), np.array([0, 1, 3, 8]) / k)
    np.testing.assert_allclose(means.get_ydata(), [0.05, 0.2, 0.5, 0.9])


def test_u_beta_continuous_means_sit_at_the_mean_u_of_their_bin(figures, tmp_path):
    u = np.linspace(0.0, 1.0, plots.MAX_DISCRETE_VALUES + 1) ** 2
    plots.u_beta(u, u, tmp_path / "u.png", measure="m", num_bins=2)
    (means,) = [ln for ln in figures[0].axes[0].lines if "per u bin" in ln.get_label()]
    # β = u, so each bin's mean β equals its mean u: the points lie on the diagonal.
    np.testing.assert_allclose(means.get_xdata(), [u[u < 0.5].mean(), u[u >= 0.5].mean()])
    np.testing.assert_allclose(means.get_ydata(), means.get_xdata())


def test_u_beta_shows_raw_thresholds_the_hurdle_fit_and_the_operating_point(figures, tmp_path):
    u = np.arange(21) / 20
    hurdle = {"positive_slope": 6.0, "positive_intercept": -1.0, "mean_slope": 3.0,
              "mean_intercept": -2.0, "concentration": 3.0}
    plots.u_beta(u, 0.8 * u, tmp_path / "u.png", measure="m",
                 thresholds={"risk-averse": 0.0, "risk-prone": 0.62, "none": math.nan},
                 raw_thresholds={"risk-averse": -0.075, "risk-prone": 0.62},
                 hurdle=hurdle, operating=OPERATING)
    ax = figures[0].axes[0]
    texts = _legend_texts(ax)
    assert "risk-averse: u_th = 0.000 (raw -0.075, clipped to [0, 1])" in texts
    assert "risk-prone: u_th = 0.620" in texts
    assert "none: undefined" in texts
    assert _vertical_at(ax, 0.0) and _vertical_at(ax, 0.62)
    (operating,) = _vertical_at(ax, OPERATING.threshold)
    assert operating.get_label() == OPERATING.label
    (curve,) = [ln for ln in ax.lines if ln.get_label().startswith("hurdle fit")]
    x = np.asarray(curve.get_xdata())
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(curve.get_ydata(), sigmoid(6 * x - 1) * sigmoid(3 * x - 2),
                               rtol=1e-5)


def test_threshold_posteriors_mark_the_operating_point(figures, tmp_path):
    plots.threshold_posteriors({"risk-averse": np.array([0.1, 0.2, 0.3])},
                               tmp_path / "p.png", operating=OPERATING)
    assert _vertical_at(figures[0].axes[0], OPERATING.threshold)


def test_threshold_curves_compare_measures_at_equal_skip_rate(run, figures, tmp_path):
    _, _, table = run
    medium = table[(table["link"] == "medium") & (table["mode"] == "uhlm")]
    plots.threshold_curves(medium, tmp_path / "c.png", eps=EPS, operating=OPERATING)
    axes = figures[0].axes
    for ax in axes:
        assert ax.get_xlabel() == "share of tokens skipped 1 − TR"
        assert _vertical_at(ax, OPERATING.skip_rate)
    (risk_ax,) = [ax for ax in axes if ax.get_ylabel().startswith("realised risk")]
    assert _horizontal_at(risk_ax, EPS)
    # Oracle: each measure's line runs over 1 − TR of its own replay rows, and the first
    # panel maps that skip rate back to the measure's threshold.
    for measure in medium["measure"].unique():
        rows = medium[(medium["measure"] == measure) &
                      (medium["metric"] == "transmission_rate")].sort_values("threshold")
        (line,) = [ln for ln in axes[0].lines if ln.get_label() == plots._pretty(measure)]
        order = np.argsort(1 - rows["value"].to_numpy(), kind="stable")
        np.testing.assert_allclose(line.get_xdata(), (1 - rows["value"].to_numpy())[order],
                                   atol=1e-6)
        np.testing.assert_allclose(line.get_ydata(), rows["threshold"].to_numpy()[order])


def test_threshold_curves_need_the_rollouts_skip_rate(run, tmp_path):
    _, _, table = run
    medium = table[(table["link"] == "medium") & (table["mode"] == "uhlm")]
    rollout = pd.DataFrame({"threshold": [0.2], "metric": ["transmission_rate"],
                            "value": [0.8], "se": [0.02]})
    with pytest.raises(ValueError, match="skip_rate"):
        plots.threshold_curves(medium, tmp_path / "c.png", rollout=rollout)


def _snr_table(rand_factor: float) -> pd.DataFrame:
    snr = [0.0, 10.0, 20.0]
    uhlm = [20.0, 30.0, 35.0]
    rows = [("uhlm", s, v) for s, v in zip(snr, uhlm, strict=True)]
    rows += [("rand_hlm", s, v * rand_factor) for s, v in zip(snr, uhlm, strict=True)]
    rows += [("hlm", s, v / 2) for s, v in zip(snr, uhlm, strict=True)]
    frame = pd.DataFrame(rows, columns=["mode", "snr_db", "value"])
    frame["metric"] = "throughput_tokens_per_s"
    return frame


def test_throughput_vs_snr_keeps_rand_hlm_visible_under_uhlm(figures, tmp_path):
    plots.throughput_vs_snr(_snr_table(1.0), tmp_path / "s.png", threshold_label="u_th = 0.5")
    ax = figures[0].axes[0]
    lines = {ln.get_label().split(" (")[0]: ln for ln in ax.lines}
    uhlm, rand = lines["U-HLM"], lines["Rand-HLM"]
    assert uhlm.get_linestyle() != rand.get_linestyle()
    assert rand.get_markersize() > uhlm.get_markersize()
    assert rand.get_markerfacecolor() == "none"
    assert "within 0.0% of U-HLM" in rand.get_label()
    assert "operating point, u_th = 0.5" in uhlm.get_label()


def test_throughput_vs_snr_says_nothing_of_lines_that_differ(figures, tmp_path):
    plots.throughput_vs_snr(_snr_table(1.5), tmp_path / "s.png")
    assert all("within" not in t for t in _legend_texts(figures[0].axes[0]))


def test_pareto_is_titled_by_its_axis_and_marks_eps_and_the_operating_point(
    run, figures, tmp_path
):
    _, _, table = run
    medium = table[(table["link"] == "medium")
                   & ((table["mode"] != "uhlm") | (table["measure"] == "entropy"))]
    plots.pareto(medium, tmp_path / "p.png", link="medium", eps=EPS, operating=OPERATING)
    ax = figures[0].axes[0]
    assert ax.get_title().startswith("LLM agreement against throughput")
    assert "1 − R" in ax.get_ylabel()
    assert _horizontal_at(ax, 100 * (1 - EPS))
    (star,) = [ln for ln in ax.lines if ln.get_label() == OPERATING.label]
    assert list(star.get_xdata()) == [OPERATING.throughput_tokens_per_s]
    assert list(star.get_ydata()) == [100 * OPERATING.llm_agreement]


def _marker_points(fig) -> list[np.ndarray]:
    """Display positions (points) of every mode marker, per axes."""
    fig.canvas.draw()
    markers = {marker for _, _, marker in plots.MODE_STYLE.values()}
    out = []
    for ax in fig.axes:
        xy = [ln.get_transform().transform(np.column_stack(ln.get_data()).astype(float))[0]
              for ln in ax.lines if ln.get_marker() in markers]
        out.append(np.array(xy) * 72.0 / fig.dpi)
    return out


def test_evaluated_modes_sets_coinciding_points_apart(figures, tmp_path):
    # Rand-HLM and U-HLM risk-bounded share every coordinate, and so do SLM-only and
    # U-HLM risk-prone (it skipped everything), and HLM and U-HLM risk-averse (it skipped
    # nothing, at the slowest throughput): each pair would draw as one marker.
    summary = pd.DataFrame(
        {
            "mode": ["llm_only", "slm_only", "hlm", "uhlm", "uhlm", "uhlm", "rand_hlm"],
            "label": ["LLM only", "SLM only", "HLM", "U-HLM, ra", "U-HLM, rb", "U-HLM, rp",
                      "Rand-HLM"],
            "threshold_name": [None, None, None, "risk-averse", "risk-bounded", "risk-prone",
                               None],
            "accuracy": [0.85, 0.79, 0.86, 0.86, 0.83, 0.79, 0.83],
            "accuracy_se": [0.01] * 7,
            "correct_rate": [0.6, 0.3, 0.62, 0.62, 0.45, 0.3, 0.45],
            "correct_rate_se": [0.07] * 7,
            "llm_nll": [2.2, 5.1, 2.1, 2.1, 2.6, 5.1, 2.6],
            "llm_nll_se": [0.2] * 7,
            "throughput_tokens_per_s": [150.0, 37.0, 20.8, 20.8, 21.9, 37.0, 21.9],
        }
    )
    plots.evaluated_modes(summary, tmp_path / "m.png", operating=OPERATING)
    fig = figures[0]
    for ax, xy in zip(fig.axes, _marker_points(fig), strict=False):
        assert len(xy) == len(summary)
        for a, b in itertools.combinations(xy, 2):
            assert np.hypot(*(a - b)) >= plots.MIN_MARKER_GAP_PT
        # HLM, the leftmost point, is moved further left, and its whole marker stays inside
        box = ax.get_window_extent().get_points() * 72.0 / fig.dpi
        half = plots.MIN_MARKER_GAP_PT / 2
        assert np.all((xy[:, 0] > box[0, 0] + half) & (xy[:, 0] < box[1, 0] - half))
    assert "set side by side" in fig.get_suptitle()
    texts = _legend_texts(fig)
    assert "U-HLM, rb — operating point" in texts
    (operating,) = [c for c in fig.axes[0].containers
                    if c.get_label() == "U-HLM, rb — operating point"]
    assert operating.lines[0].get_markerfacecolor() != "none"


def test_evaluated_modes_leaves_separate_points_in_place(figures, tmp_path):
    summary = pd.DataFrame(
        {"mode": ["llm_only", "hlm"], "label": ["LLM only", "HLM"],
         "accuracy": [0.85, 0.5], "accuracy_se": [0.01] * 2,
         "correct_rate": [0.6, 0.3], "correct_rate_se": [0.07] * 2,
         "llm_nll": [2.2, 5.1], "llm_nll_se": [0.2] * 2,
         "throughput_tokens_per_s": [150.0, 20.0]}
    )
    plots.evaluated_modes(summary, tmp_path / "m.png")
    fig = figures[0]
    assert "side by side" not in fig.get_suptitle()
    for ax in fig.axes:
        for line in ax.lines:
            assert line.get_transform() == ax.transData


def test_risk_bins_resolve_eps():
    bins = plots.risk_bins(np.array([0.0, 0.03, 0.09]), EPS)
    np.testing.assert_allclose(np.diff(bins), EPS / plots.RISK_BINS_PER_EPS)
    assert bins[0] == 0.0 and bins[-1] >= 0.09
    # A far outlier widens the bins only as far as the cap on their number needs.
    wide = plots.risk_bins(np.array([0.0, 10.0]), EPS)
    assert len(wide) <= plots.MAX_RISK_BINS + 2 and wide[-1] >= 10.0


def test_risk_histograms_use_the_fine_bins_and_mark_eps(figures, tmp_path):
    plots.risk_histograms({"ltt": np.array([0.01, 0.049, 0.051])}, tmp_path / "r.png",
                          eps=EPS)
    ax = figures[0].axes[0]
    assert _vertical_at(ax, EPS)
    (outline,) = ax.patches
    edges = np.unique(np.round(outline.get_xy()[:, 0], 12))
    np.testing.assert_allclose(np.diff(edges), EPS / plots.RISK_BINS_PER_EPS)


def test_score_intervals_match_closed_forms():
    scores = pd.DataFrame({"measure": ["m"], "pearson": [0.0], "spearman": [0.0],
                           "auroc": [0.5], "num_tokens": [103], "share_positive": [0.5]})
    got = plots.score_intervals(scores)
    # Fisher z of r = 0 with n = 103: tanh(±1.96 / 10).
    np.testing.assert_allclose(got["pearson"][:, 0], np.tanh([-0.19599640, 0.19599640]))
    np.testing.assert_allclose(got["spearman"][:, 0],
                               np.tanh(np.array([-1, 1]) * 1.95996398 * math.sqrt(1.06) / 10))
    # At AUROC 0.5, Hanley–McNeil equals the exact null variance of the Mann–Whitney
    # AUROC, (n1 + n0 + 1) / (12 n1 n0), with n1 = 52 (rounded half of 103), n0 = 51.
    se = math.sqrt((52 + 51 + 1) / (12 * 52 * 51))
    np.testing.assert_allclose(got["auroc"][:, 0], [0.5 - 1.95996398 * se,
                                                    0.5 + 1.95996398 * se], rtol=1e-6)


def test_measure_comparison_has_error_bars_and_no_empty_headroom(run, figures, tmp_path):
    _, df, _ = run
    scores = report.measure_scores(df)
    plots.measure_comparison(scores, tmp_path / "m.png")
    ax = figures[0].axes[0]
    bars = [c for c in ax.containers if hasattr(c, "errorbar")]
    assert len(bars) == 3 and all(c.errorbar is not None for c in bars)
    tallest = max(r.get_height() for c in bars for r in c if isinstance(r, Rectangle))
    bottom, top = ax.get_ylim()
    # The highest bar fills most of the axis: no band left empty for a legend.
    assert (tallest - bottom) / (top - bottom) > 0.75
