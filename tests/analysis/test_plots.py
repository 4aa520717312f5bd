"""Every plot function writes a real PNG of the stated size from a small run's data."""

import struct

import numpy as np
import pandas as pd
import pytest

from analysis import plots, report
from analysis import sweep as sw
from calibration import records
from tests.helpers import write_synthetic_run

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plots_run")
    df = write_synthetic_run(run_dir)
    measures = tuple(records.measure_names(df.columns))
    cfg = sw.Config(
        run_dir=str(run_dir), thresholds=tuple(np.linspace(0, 1, 11)), snr_db=(0.0, 10.0, 20.0)
    )
    table = sw.replay_frame(cfg, sw.load_records(df, measures), measures, progress=False)
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
            "threshold": [0.2, 0.5],
            "metric": ["transmission_rate"] * 2,
            "value": [0.8, 0.5],
            "se": [0.02, 0.03],
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
