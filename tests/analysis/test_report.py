"""`uhlm report`: the table parses and is right, the figures are embedded, files may be absent."""

import argparse
import re

import numpy as np
import pytest

from analysis import report
from analysis.cli import main as cli_main
from calibration import records
from calibration import run_dir as rd
from tests.helpers import collect_toy_run, write_synthetic_run
from uhlm_jax import rejection
from uhlm_jax import threshold as T

# The table prints rates with 3 decimals and percentages with 1 or 2.
TABLE_ATOL = 5e-4


def _parse(argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(argv)


def parse_mode_table(markdown: str) -> dict[str, dict[str, str]]:
    """The per-mode table of report.md as {mode label: {column: cell}}."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(report.MODE_TABLE_COLUMNS) + " |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(report.MODE_TABLE_COLUMNS, cells, strict=True))
    return rows


def _value(cell: str) -> float:
    return float("nan") if cell == "—" else float(cell)


def _check_table(run_dir, df):
    rows = parse_mode_table((run_dir / rd.REPORT_MARKDOWN_FILE).read_text())
    assert {"LLM only", "SLM only", "HLM"} <= set(rows)
    hlm = rows["HLM"]
    assert _value(hlm["TR"]) == 1.0 and _value(hlm["Skip %"]) == 0.0
    assert _value(hlm["Speedup vs HLM"]) == 1.0
    assert _value(rows["LLM only"]["LLM agreement (% of LLM)"]) == 100.0
    beta = np.clip(df["beta"].to_numpy(np.float64), 0, 1)
    u = df["u_temperature_perturbation"].to_numpy(np.float32)
    # SLM-only emits every draft: its agreement is 1 − mean β.
    np.testing.assert_allclose(
        _value(rows["SLM only"]["LLM agreement (% of LLM)"]),
        100 * (1 - beta.mean()),
        atol=100 * TABLE_ATOL,
    )
    uhlm_rows = [k for k in rows if k.startswith("U-HLM")]
    assert uhlm_rows
    for label in uhlm_rows:
        t = float(re.search(r"u_th = ([0-9.]+)", label).group(1))
        row = rows[label]
        sent = u > np.float32(t)
        # The label rounds the threshold to 3 decimals; no token may lie in that rounding.
        assert not np.any((np.abs(u - t) < 5e-4) & (u != np.float32(t))), label
        np.testing.assert_allclose(_value(row["TR"]), sent.mean(), atol=TABLE_ATOL)
        skipped_risk = (beta * ~sent).sum() / beta.size
        np.testing.assert_allclose(
            _value(row["LLM agreement (% of LLM)"]), 100 * (1 - skipped_risk), atol=100 * TABLE_ATOL
        )
        s = 1 - sent.mean()
        if s < 1:
            assert _value(row["Speedup vs HLM"]) <= _value(row["Bound 1/(1−s)"]) + TABLE_ATOL
            np.testing.assert_allclose(_value(row["Bound 1/(1−s)"]), 1 / (1 - s), atol=2e-3)
    return rows


def _check_html(run_dir, num_plots):
    text = (run_dir / rd.REPORT_HTML_FILE).read_text()
    assert text.count("data:image/png;base64,") == num_plots >= 5
    assert "<img" in text and 'src="plots' not in text and "src='plots" not in text
    assert "<table>" in text and "HLM" in text


def test_report_from_records_alone(tmp_path, capsys):
    # Given a run directory with records only
    df = write_synthetic_run(tmp_path)
    # When the report is written
    assert report.main(_parse([str(tmp_path), "--json"])) == 0
    out = capsys.readouterr().out
    # Then the table is right, the figures are embedded and the absent files are noted
    plots = sorted((tmp_path / rd.PLOTS_DIR).glob("*.png"))
    _check_table(tmp_path, df)
    _check_html(tmp_path, len(plots))
    assert "fit.json" in out and "thresholds.json" in out
    assert all(p.stat().st_size > 0 for p in plots)
    markdown = (tmp_path / rd.REPORT_MARKDOWN_FILE).read_text()
    assert "No fit.json" in markdown and "No thresholds.json" in markdown


def test_report_with_fit_and_thresholds(tmp_path):
    # Given a run with a posterior and thresholds (in the formats `uhlm fit` and
    # `uhlm threshold` write)
    df = write_synthetic_run(tmp_path)
    rng = np.random.default_rng(0)
    rd.write_npz(
        tmp_path / rd.LINEAR_POSTERIOR_FILE,
        slope=rng.normal(0.8, 0.02, (2, 100)),
        intercept=rng.normal(-0.06, 0.01, (2, 100)),
        sigma=np.full((2, 100), 0.1),
    )
    params = {
        "mean": 0.8,
        "sd": 0.02,
        "median": 0.8,
        "interval": [0.77, 0.83],
        "ess": 180.0,
        "r_hat": 1.001,
    }
    rd.write_json(
        tmp_path / rd.FIT_FILE,
        {
            "measure": "temperature_perturbation",
            "config": {"seed": 7},
            "correlation": {"pearson": {"estimate": 0.8, "interval": [0.75, 0.85]}},
            "linear": {"nuts": {"divergences": 0, "params": {"slope": params}}},
            "hurdle": {"nuts": {"divergences": 1, "params": {"positive_slope": params}}},
            "comparison": {
                "criterion": "PSIS-LOO",
                "unit": "token",
                "num_draws": 200,
                "best": "hurdle",
                "table": [
                    rejection.ModelScore(
                        name="hurdle", rank=0, elpd_loo=-120.04, se=7.2, p_loo=4.3,
                        elpd_diff=0.0, dse=0.0, weight=0.96, warning=False, max_pareto_k=0.2,
                        elpd_waic=-120.0, waic_se=7.2, p_waic=4.2, waic_warning=False,
                    )._asdict(),
                    rejection.ModelScore(
                        name="linear", rank=1, elpd_loo=-290.0, se=17.3, p_loo=6.1,
                        elpd_diff=169.96, dse=15.6, weight=0.04, warning=True,
                        max_pareto_k=0.81, elpd_waic=-289.8, waic_se=17.3, p_waic=6.0,
                        waic_warning=False,
                    )._asdict(),
                ],
            },
        },
    )
    rd.write_json(
        tmp_path / rd.THRESHOLDS_FILE,
        {
            "measure": "temperature_perturbation",
            "risk": 0.05,
            "confidence": 0.9,
            "config": {"seed": 3},
            "analytic": {
                "risk_averse": {
                    "threshold": 0.075,
                    "empirical": {"per_token": 0.001, "given_skip": 0.01, "skip_rate": 0.1},
                }
            },
            "posterior": {
                "linear": {
                    "risk_bounded": {
                        "threshold": 0.3,
                        "empirical": {"per_token": 0.03, "given_skip": 0.06, "skip_rate": 0.5},
                    }
                },
                "hurdle": {
                    "risk_bounded": {
                        "threshold": 0.2,
                        "empirical": {"per_token": 0.02, "given_skip": 0.05, "skip_rate": 0.4},
                    }
                },
                "model_choice": {"model": "hurdle"},
                "risk_bounded": {
                    "threshold": 0.2,
                    "model": "hurdle",
                    "empirical": {"per_token": 0.02, "given_skip": 0.05, "skip_rate": 0.4},
                },
            },
            "ltt": {"threshold": 0.15, "certified": True},
            "validation": {
                "num_splits": 100,
                "allowed_exceed_frequency": 0.1,
                "methods": {
                    "ltt": {
                        "exceed_frequency_per_token": 0.02,
                        "realised_risk_per_token": list(rng.uniform(0, 0.06, 100)),
                    }
                },
            },
        },
    )
    # When the report is written
    result = report.run(report.Config(run_dir=str(tmp_path)))
    markdown = result.markdown.read_text()
    # Then the certified threshold is the operating point, and every section is there
    rows = _check_table(tmp_path, df)
    assert "U-HLM, Learn-then-Test (u_th = 0.150)" in rows
    assert "U-HLM, risk-bounded (u_th = 0.200)" in rows
    assert "| Learn-then-Test | 0.150 |" in markdown
    # The risk-bounded threshold in use is the best-predicting (hurdle) model's
    assert "| posterior risk-bounded (hurdle — best by PSIS-LOO, the one used) | 0.200 |" in (
        markdown
    )
    assert "| posterior risk-bounded (linear) | 0.300 |" in markdown
    assert "| linear | slope | 0.8000 |" in markdown
    assert "the best predictor is the hurdle model" in markdown
    assert "| hurdle | -120.0 | 7.2 | 0.0 | 0.0 | 0.960 | 4.3 | -120.0 | none |" in markdown
    assert (
        "| linear | -290.0 | 17.3 | 170.0 | 15.6 | 0.040 | 6.1 | -289.8 | Pareto k up to 0.81 |"
        in markdown
    )
    assert "Seeds: calibration 0, fit 7, thresholds 3." in markdown
    names = {p.name for p in result.plots}
    assert {"threshold_posteriors.png", "risk_histograms.png", "u_beta.png"} <= names
    _check_html(tmp_path, len(result.plots))


def test_plug_in_thresholds_are_read_from_thresholds_json_when_it_has_them(tmp_path):
    df = write_synthetic_run(tmp_path)
    u = df["u_temperature_perturbation"].to_numpy(np.float64)
    beta = np.clip(df["beta"].to_numpy(np.float64), 0, 1)
    computed = rejection.plug_in_thresholds(u, beta)
    # Without an analytic section, or with one lacking the fit, they come from the records
    def plug_in(analytic):
        return report.plug_in_thresholds(rd.Thresholds.from_json({"analytic": analytic}), u, beta)

    assert report.plug_in_thresholds(None, u, beta) == computed
    assert plug_in({}) == computed
    assert plug_in({"risk_averse": {"threshold": 0.075}}) == computed
    # and otherwise from the section.
    analytic = {
        "slope": 0.5,
        "intercept": -0.1,
        "rejection_share": 0.3,
        "risk_averse": {"threshold": 0.2},
        "risk_prone": {"threshold": 0.8},
    }
    plug = plug_in(analytic)
    assert tuple(plug[:3]) == (0.5, -0.1, 0.3)
    assert (plug.risk_averse.threshold, plug.risk_prone.threshold) == (0.2, 0.8)
    # A clipped threshold keeps its raw value and reason.
    analytic["risk_prone"] = {"threshold": 1.0, "raw": 1.04, "reason": "(Δ − b)/a = 1.04 > 1"}
    assert plug_in(analytic).risk_prone == T.PaperThreshold(
        raw=1.04, threshold=1.0, reason="(Δ − b)/a = 1.04 > 1"
    )


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "no record shards" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown measure 'entropyy'"):
        report.Config(run_dir=str(tmp_path), measure="entropyy")
    assert cli_main(["report", str(tmp_path), "--link", "bad"]) == 2
    assert "unknown link preset 'bad'" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_from_a_calibration_run(tmp_path):
    run_dir = collect_toy_run(tmp_path / "run", max_new_tokens=12)
    result = report.run(report.Config(run_dir=str(run_dir)))
    _check_table(run_dir, records.read_records(run_dir))
    _check_html(run_dir, len(result.plots))
    assert "pair `toy`" in result.markdown.read_text()


def test_report_states_the_cost_profile(tmp_path, capsys):
    # Given a run of the toy pair with records only
    write_synthetic_run(tmp_path)
    # When the report prices the pair itself
    assert report.main(_parse([str(tmp_path), "--cost-profile", "pair"])) == 0
    capsys.readouterr()
    # Then its caption says so, with the pair's V
    markdown = (tmp_path / rd.REPORT_MARKDOWN_FILE).read_text()
    assert ("Costs: cost profile 'pair' (pair toy): toy-slm float32 on phone-soc, toy-llm "
            "float32 on datacenter-gpu, V = 260;") in markdown
    # And by default the paper's models
    assert report.main(_parse([str(tmp_path)])) == 0
    markdown = (tmp_path / rd.REPORT_MARKDOWN_FILE).read_text()
    assert "Costs: cost profile 'named': tinyllama-1.1b float16 on phone-soc" in markdown
    assert "V = 32000;" in markdown
