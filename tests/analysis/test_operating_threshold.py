"""Evaluate, report and demo name the same operating threshold for one run directory, and
flag it when it failed its own validation (toy pair)."""

from pathlib import Path

import pytest

from analysis import evaluate, report, study
from calibration import run_dir as rd
from tests.helpers import write_synthetic_run

# A run whose Learn-then-Test threshold is not certified: the linear posterior's
# risk-bounded threshold operates, and exceeds ε in 45% of the validation splits per token
# (δ = 10%), while the analytic risk-averse threshold exceeds it in 2%.
THRESHOLDS = {
    "measure": "temperature_perturbation", "risk": 0.05, "confidence": 0.9,
    "analytic": {"slope": 0.8, "intercept": -0.06, "rejection_share": 0.4,
                 "risk_averse": {"threshold": 0.075}, "risk_prone": {"threshold": 0.575}},
    "posterior": {"linear": {"risk_bounded": {"threshold": 0.25}},
                  "risk_bounded": {"threshold": 0.25, "model": "linear"}},
    "ltt": {"threshold": None, "certified": False},
    "validation": {
        "num_splits": 100, "calibration_prompts": 6, "test_prompts": 6,
        "allowed_exceed_frequency": 0.1,
        "methods": {
            "ltt": {"exceed_frequency_per_token": 0.0, "exceed_frequency_per_prompt": 0.0},
            "posterior_linear": {"exceed_frequency_per_token": 0.45,
                                 "exceed_frequency_per_prompt": 0.3},
            "analytic_risk_averse": {"exceed_frequency_per_token": 0.02,
                                     "exceed_frequency_per_prompt": 0.01},
            "analytic_risk_prone": {"exceed_frequency_per_token": 0.9,
                                    "exceed_frequency_per_prompt": 0.8},
        },
    },
}
FIT = {"measure": "temperature_perturbation",
       "correlation": {"pearson": {"estimate": 0.7, "interval": [0.6, 0.8]}}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("operating")
    write_synthetic_run(path)
    rd.write_json(path / rd.THRESHOLDS_FILE, THRESHOLDS)
    rd.write_json(path / rd.FIT_FILE, FIT)
    return path


def test_evaluate_report_and_demo_name_the_same_operating_threshold(run_dir: Path):
    # Given the rule's choice for this run
    expected = rd.operating_threshold(rd.Thresholds.read(run_dir))
    assert (expected.name, expected.value, expected.failed) == ("risk-bounded", 0.25, True)
    # When evaluate runs, it operates there, and says it failed its validation
    evaluation = evaluate.run(
        evaluate.Config(run_dir=str(run_dir), num_prompts=2, max_new_tokens=4), progress=False)
    assert evaluation.operating == expected
    data, summary = rd.read_evaluation_summary(run_dir)
    assert data["operating"] == "risk-bounded"
    assert data["operating_threshold"]["passed_validation"] is False
    labels = list(summary.loc[summary["mode"] == "uhlm", "label"])
    assert "U-HLM, risk-bounded (u_th = 0.250, failed validation)" in labels
    assert "U-HLM, risk-averse (u_th = 0.075)" in labels
    # And the report operates at the same threshold, flags it and names the one that passed
    markdown = report.run(report.Config(run_dir=str(run_dir))).markdown.read_text()
    assert ("operating threshold u_th = 0.2500 (the risk-bounded threshold of "
            "thresholds.json") in markdown
    assert "Warning: the risk-bounded threshold FAILED its validation" in markdown
    assert "Thresholds that passed: risk-averse (u_th = 0.075)." in markdown
    assert "U-HLM, risk-bounded (u_th = 0.250, failed validation)" in markdown
    # And the study's (and so the demo's) summary names it too, with the warning
    summary = study.headline(run_dir, "toy")
    assert summary["operating_threshold"] == "risk-bounded"
    assert summary["operating_threshold_passed_validation"] is False
    result = study.Result(run_dir=run_dir, summary={**summary, "total_seconds": 1.0},
                          table=None, report_html=run_dir / rd.REPORT_HTML_FILE,
                          report_markdown=run_dir / rd.REPORT_MARKDOWN_FILE, stage_seconds={})
    text = study.describe(result)
    assert "U-HLM at the risk-bounded threshold" in text
    assert "Warning: the risk-bounded threshold FAILED its validation" in text
