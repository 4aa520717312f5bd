"""The run directory: atomic writes, file modes, typed views, missing-file errors and the
operating-threshold rule, on hand-written files."""

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from calibration import collect, records
from calibration import run_dir as rd
from tests.helpers import synthetic_records
from uhlm_jax import files, rejection
from uhlm_jax import threshold as T

# File mode of a new file under the usual umask 022.
UMASK = 0o022
EXPECTED_MODE = 0o644


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(files.TMP_SUFFIX)]


# --- atomic writes ---------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    with files.AtomicFile(path) as f:
        f.write(b"one")
    with files.AtomicFile(path) as f:
        f.write(b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    # Given a file, when a new write raises after writing part of its content
    path = tmp_path / "a.json"
    rd.write_json(path, {"old": 1})
    with pytest.raises(RuntimeError, match="disk on fire"), files.AtomicFile(path) as f:
        f.write(b'{"new": ')
        raise RuntimeError("disk on fire")
    # Then the old file is intact and no temporary file is left
    assert rd.read_json(path) == {"old": 1}
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    rd.write_parquet(pd.DataFrame({"x": [1]}), path)

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        rd.write_parquet(pd.DataFrame({"x": [2]}), path)
    assert list(pd.read_parquet(path)["x"]) == [1]
    assert _leftovers(tmp_path) == []


def test_discard_leaves_the_target_untouched(tmp_path):
    path = tmp_path / "a.txt"
    out = files.AtomicFile(path)
    out.file.write(b"never")
    out.discard()
    assert not path.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def usual_umask():
    previous = os.umask(UMASK)
    yield
    os.umask(previous)


def test_run_files_are_0644_under_the_usual_umask(tmp_path, usual_umask):
    # Given every writer of the run directory
    rd.write_json(tmp_path / rd.FIT_FILE, {"a": 1})
    rd.write_text(tmp_path / rd.REPORT_MARKDOWN_FILE, "# report\n")
    rd.write_npz(tmp_path / rd.LINEAR_POSTERIOR_FILE, slope=np.zeros(3))
    rd.write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / rd.SWEEP_FILE)
    records.write_shard(synthetic_records(np.random.default_rng(0), 2, 3),
                        tmp_path / rd.RECORDS_DIR / rd.shard_name(0))
    # Then each file is readable by others, like any file the user writes
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 5
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == EXPECTED_MODE, path.name


def test_writers_read_back(tmp_path):
    rd.write_npz(tmp_path / "a.npz", x=np.arange(3))
    with np.load(tmp_path / "a.npz") as f:
        np.testing.assert_array_equal(f["x"], [0, 1, 2])
    rd.write_text(tmp_path / "a.md", "héllo")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "héllo"


# --- missing files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "name", "command"),
    [
        (rd.RunConfig, rd.CONFIG_FILE, "uhlm calibrate --out"),
        (rd.Fit, rd.FIT_FILE, "uhlm fit"),
        (rd.Thresholds, rd.THRESHOLDS_FILE, "uhlm threshold --run"),
    ],
)
def test_a_missing_file_names_itself_and_the_command_that_writes_it(tmp_path, view, name,
                                                                    command):
    with pytest.raises(ValueError) as err:
        view.read(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / name) in message and f"`{command} {tmp_path}" in message
    assert view.read_optional(tmp_path) is None
    with pytest.raises(ValueError, match="does not exist"):
        view.read(tmp_path / "absent")


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path / rd.FIT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"fit\.json' is not valid JSON"):
        rd.Fit.read(tmp_path)


# --- typed views -----------------------------------------------------------------------


def test_run_config_reads_what_collect_writes(tmp_path):
    cfg = collect.Config(pair="toy", prompts=None, out=str(tmp_path), max_new_tokens=9,
                         seed=4, draft_temperature=0.7)
    rd.write_json(tmp_path / rd.CONFIG_FILE, {
        "job": "collect", "settings": cfg.settings(),
        "pair": {"name": "toy", "slm": {"hidden": 8}, "llm": {"hidden": 16}},
        "measures": ["entropy"], "versions": {"jax": "0.0"},
    })
    view = rd.RunConfig.read(tmp_path)
    assert view == rd.RunConfig(
        pair="toy", settings=json.loads(json.dumps(cfg.settings())), max_new_tokens=9, seed=4,
        draft_temperature=0.7,
        llm_temperature=1.0, dtype="float32", slm_config={"hidden": 8},
        llm_config={"hidden": 16},
        measures=("entropy",), versions={"jax": "0.0"},
    )
    # A config of settings alone keeps collect's defaults
    assert rd.RunConfig.from_json({"settings": {"pair": "toy"}}).max_new_tokens == (
        collect.Config(pair="toy", prompts=None, out="").max_new_tokens)


# Two models' scores as `rejection.compare_models` ranks them.
SCORES = (
    rejection.ModelScore("hurdle", 0, -120.0, 7.0, 4.0, 0.0, 0.0, 0.9, False, 0.2, -119.9,
                         7.0, 3.9, False),
    rejection.ModelScore("linear", 1, -290.0, 17.0, 6.0, 170.0, 15.0, 0.1, True, 0.8,
                         -289.8, 17.0, 5.8, False),
)


def test_fit_view_reads_a_hand_written_fit(tmp_path):
    param = {"mean": 0.8, "sd": 0.02, "interval": [0.77, 0.83], "r_hat": 1.001, "ess": 180.0}
    rd.write_json(tmp_path / rd.FIT_FILE, {
        "measure": "entropy",
        "config": {"seed": 7},
        "correlation": {"pearson": {"estimate": 0.5, "interval": [0.4, 0.6]}, "level": 0.95},
        "linear": {"prior": {"scale": 5.0, "shape": 2.0, "rate": 0.1},
                   "nuts": {"divergences": 0, "params": {"slope": param}}},
        "comparison": {"criterion": "PSIS-LOO", "unit": "token", "num_draws": 400,
                       "best": "hurdle", "seconds": 1.0,
                       "table": [score._asdict() for score in SCORES]},
        "predictive_checks": [{"linear": {"mean_covered": True},
                               "hurdle": {"mean_covered": False}}] * 2,
    })
    view = rd.Fit.read(tmp_path)
    assert view.measure == "entropy" and view.seed == 7
    assert view.correlations == {"pearson": rd.Correlation(0.5, (0.4, 0.6))}
    assert view.linear_prior == rejection.LinearPrior(scale=5.0, shape=2.0, rate=0.1)
    assert view.nuts["linear"] == rd.NutsSummary(
        divergences=0, params={"slope": rd.ParamSummary(0.8, 0.02, (0.77, 0.83), 1.001, 180.0)})
    assert view.comparison == rd.ModelComparison("PSIS-LOO", "token", 400, "hurdle", SCORES)
    assert view.predictive_mean_covered == {"linear": (True, True), "hurdle": (False, False)}


def _thresholds(ltt=None, bounded=0.45, prone=0.8, averse=0.1, exceed=None, delta=0.1,
                model="linear"):
    """A thresholds.json in `uhlm threshold --run`'s format; `exceed` maps a validation
    method to its (per token, per prompt) exceedance frequencies; `model` is the posterior
    model that predicts best."""
    def block(t):
        return {"threshold": t, "empirical": {"per_token": 0.01, "given_skip": 0.02,
                                              "skip_rate": 0.5}}

    data = {
        "measure": "temperature_perturbation", "risk": 0.05, "confidence": 1 - delta,
        "config": {"seed": 3},
        "analytic": {"slope": 0.5, "intercept": -0.05, "rejection_share": 0.35,
                     "risk_averse": block(averse), "risk_prone": block(prone)},
        "posterior": {"linear": {"risk_bounded": block(bounded)},
                      "hurdle": {"risk_bounded": {"threshold": None,
                                                  "probability_within_risk": None}},
                      "model_choice": {"model": model},
                      "risk_bounded": {**block(bounded), "model": model}},
        "ltt": {"threshold": ltt, "certified": ltt is not None},
    }
    if exceed is not None:
        data["validation"] = {
            "num_splits": 200, "calibration_prompts": 10, "test_prompts": 10,
            "allowed_exceed_frequency": delta,
            "methods": {m: {"exceed_frequency_per_token": t, "exceed_frequency_per_prompt": p,
                            # a refitted model is validated on the first few splits only
                            "realised_risk_per_token": [0.01, 0.07] * (
                                2 if m == "risk_bounded" else 100)}
                        for m, (t, p) in exceed.items()},
        }
    return data


def test_thresholds_view_reads_every_threshold(tmp_path):
    rd.write_json(tmp_path / rd.THRESHOLDS_FILE,
                  _thresholds(ltt=0.3, exceed={"ltt": (0.2, 0.05)}))
    view = rd.Thresholds.read(tmp_path)
    assert (view.measure, view.risk, view.confidence, view.seed) == (
        "temperature_perturbation", 0.05, 0.9, 3)
    assert view.plug_in == rejection.PlugInThresholds(
        0.5, -0.05, 0.35, T.PaperThreshold(0.1, 0.1, None), T.PaperThreshold(0.8, 0.8, None))
    assert view.risk_bounded == rd.NamedThreshold(0.45, rd.Empirical(0.01, 0.02, 0.5))
    assert view.risk_bounded_model == "linear"
    assert view.risk_bounded_by_model == {
        "linear": view.risk_bounded, "hurdle": rd.NamedThreshold(None, None)}
    assert view.ltt.threshold == 0.3 and view.ltt_certified
    assert view.validation.methods["ltt"].realised_risk_per_token == (0.01, 0.07) * 100
    assert view.named() == {"risk-averse": 0.1, "risk-prone": 0.8, "risk-bounded": 0.45,
                            "Learn-then-Test": 0.3}
    # Missing sections read as absent
    empty = rd.Thresholds.from_json({})
    assert empty.named() == {} and empty.validation is None and empty.plug_in is None


# --- the operating threshold -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"ltt": 0.3}, "Learn-then-Test", 0.3),  # certified: the strongest guarantee
        ({}, "risk-bounded", 0.45),  # no certified LTT
        ({"bounded": None}, "risk-prone", 0.8),  # no risk-bounded threshold either
        ({"bounded": None, "prone": 1.7}, "risk-prone", 1.0),  # clipped to [0, 1]
        ({"bounded": None, "prone": None}, "risk-averse", 0.1),
    ],
)
def test_operating_threshold_takes_the_strongest_guarantee(kwargs, name, value):
    op = rd.operating_threshold(rd.Thresholds.from_json(_thresholds(**kwargs)))
    assert (op.name, op.value) == (name, value)
    assert op.passed_validation is None and op.note == "" and not op.failed


def test_no_finite_threshold_gives_no_operating_threshold():
    th = rd.Thresholds.from_json(_thresholds(bounded=None, prone=None, averse=None))
    assert rd.operating_threshold(th) is None


def test_validation_judges_ltt_per_prompt_and_the_others_per_token():
    # δ = 0.1: LTT exceeds ε in 20% of splits per token but 5% per prompt (its estimand);
    # the risk-bounded threshold in 40% per token; risk-prone exactly at δ passes.
    exceed = {"ltt": (0.2, 0.05), "posterior_linear": (0.4, 0.01),
              "analytic_risk_prone": (0.1, 0.9), "analytic_risk_averse": (0.0, 0.0)}
    th = rd.Thresholds.from_json(_thresholds(ltt=0.3, exceed=exceed))
    assert th.passed_validation(rd.ThresholdName.LEARN_THEN_TEST) is True
    assert th.passed_validation(rd.ThresholdName.RISK_BOUNDED) is False
    assert th.passed_validation(rd.ThresholdName.RISK_PRONE) is True
    op = rd.operating_threshold(th)
    assert op.name is rd.ThresholdName.LEARN_THEN_TEST and not op.failed
    # Without a certified LTT, the risk-bounded threshold operates, flagged
    th = rd.Thresholds.from_json(_thresholds(exceed=exceed))
    op = rd.operating_threshold(th)
    assert op.name is rd.ThresholdName.RISK_BOUNDED and op.failed
    assert op.note == ("the risk-bounded threshold FAILED its validation: realised risk per "
                       "token exceeded ε = 0.05 in 40% of 200 prompt splits (allowed: δ = 10%)")
    assert op.describe().startswith("risk-bounded (u_th = 0.450); the risk-bounded threshold")
    # δ = 1 − 0.9 is 0.0999… in floating point; exceeding in exactly 10% of splits passes.
    th = rd.Thresholds.from_json(_thresholds(exceed={"posterior_linear": (0.1, 0.0)},
                                             delta=1 - 0.9))
    assert th.passed_validation(rd.ThresholdName.RISK_BOUNDED) is True
    # A risk-bounded threshold whose model was refitted on 4 splits is judged on those.
    th = rd.Thresholds.from_json(
        _thresholds(exceed={**exceed, "risk_bounded": (0.25, 0.0)}, model="hurdle"))
    assert th.failed_validation(rd.ThresholdName.RISK_BOUNDED)
    assert th.validation_note(rd.ThresholdName.RISK_BOUNDED).endswith(
        "exceeded ε = 0.05 in 25% of 4 prompt splits (allowed: δ = 10%)")
    # The split validation refits only the linear posterior: a risk-bounded threshold from
    # the hurdle model has none.
    th = rd.Thresholds.from_json(_thresholds(exceed=exceed, model="hurdle"))
    assert th.risk_bounded_model == "hurdle"
    assert th.exceed_frequency(rd.ThresholdName.RISK_BOUNDED) is None
    assert th.passed_validation(rd.ThresholdName.RISK_BOUNDED) is None
    assert not rd.operating_threshold(th).failed


def test_foreign_files_are_those_no_job_writes(tmp_path):
    for name in (rd.CONFIG_FILE, rd.THRESHOLDS_FILE, rd.DEMO_MARKER,
                 f"{rd.RECORDS_DIR}/{rd.shard_name(3)}", f"{rd.PLOTS_DIR}/pareto.png",
                 f"{rd.CHECKPOINT_DIR}/2/metadata", f".{rd.FIT_FILE}.ab12cd34.tmp",
                 "notes.txt", f"{rd.RECORDS_DIR}/mine.csv", "extra/deep.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert rd.foreign_files(tmp_path) == ["extra", "extra/deep.txt", "notes.txt",
                                          f"{rd.RECORDS_DIR}/mine.csv"]
