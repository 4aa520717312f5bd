"""`uhlm study`: stages in order, resumed from the run directory's files, on the toy pair."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import pytest

from analysis import study
from analysis.cli import main as cli_main
from calibration import collect
from calibration import run_dir as rd
from calibration.prompts import embedded_prompts_path

# The toy study's size, as the study's flags and as the individual commands'.
SHARED = ["--pair", "toy", "--max-new-tokens", "6", "--batch-size", "4",
          "--num-warmup", "50", "--num-samples", "50", "--refit-splits", "2"]
STUDY = ["study", *SHARED, "--calibration-prompts", "4", "--evaluation-prompts", "3"]
STAGES = ("collect", "fit", "thresholds", "evaluate", "sweep", "report")
# The files each stage writes, as the run directory's module names them.
EARLY_FILES = (rd.CONFIG_FILE, f"{rd.RECORDS_DIR}/{rd.shard_name(0)}", rd.FIT_FILE,
               rd.LINEAR_POSTERIOR_FILE, rd.HURDLE_POSTERIOR_FILE, rd.THRESHOLDS_FILE,
               rd.EVALUATION_FILE, rd.EVALUATION_SUMMARY_FILE)
LATE_FILES = (rd.SWEEP_FILE, rd.SWEEP_SUMMARY_FILE, rd.REPORT_MARKDOWN_FILE,
              rd.REPORT_HTML_FILE)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(argv)
    return status, out.getvalue(), err.getvalue()


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _snapshot(run_dir, names) -> dict[str, tuple[int, bytes]]:
    return {n: ((run_dir / n).stat().st_mtime_ns, (run_dir / n).read_bytes()) for n in names}


def _stage_lines(err: str) -> list[str]:
    """The study's stage lines ('[i/n] ...'), in order."""
    return [line for line in err.splitlines() if re.search(r"\[\d/\d\] ", line)]


@pytest.fixture(scope="module")
def by_commands(tmp_path_factory):
    """A run directory made by `uhlm calibrate` and `uhlm evaluate`, then continued by the
    study; with a copy of it from before the study."""
    run_dir = tmp_path_factory.mktemp("study") / "run"
    status, _, err = _cli(["calibrate", *SHARED, "--num-prompts", "4", "--out", str(run_dir),
                           "--quiet"])
    assert status == 0, err
    status, _, err = _cli(["evaluate", str(run_dir), "--num-prompts", "3", "--quiet"])
    assert status == 0, err
    before = run_dir.with_name("before_study")
    shutil.copytree(run_dir, before)
    snapshot = _snapshot(run_dir, EARLY_FILES)
    status, out, err = _cli([*STUDY, "--out", str(run_dir), "--json"])
    assert status == 0, err
    return run_dir, before, snapshot, _strict_json(out), err


@pytest.mark.slow
def test_a_run_directory_of_the_individual_commands_is_continued(by_commands):
    run_dir, _, snapshot, summary, err = by_commands
    # Then what calibrate and evaluate wrote is kept as it was
    assert _snapshot(run_dir, EARLY_FILES) == snapshot
    assert summary["stages"] == {"collect": "done already", "fit": "done already",
                                 "thresholds": "done already", "evaluate": "done already",
                                 "sweep": "ran", "report": "ran"}
    # And the stages come in order, each skipped or started and ended with the time left
    lines = _stage_lines(err)
    assert [line.split("] ")[0][-4:] for line in lines] == [
        "[1/6", "[2/6", "[3/6", "[4/6", "[5/6", "[5/6", "[6/6", "[6/6"]
    assert all("skipped" in line for line in lines[:4])
    assert all("left)" in line for line in lines[4:])
    assert "replay" in err  # the sweep's own progress shows between its lines
    for name in LATE_FILES:
        assert (run_dir / name).is_file(), name
    # And the summary holds the headline numbers, strict JSON throughout
    assert summary["pair"] == "toy" and summary["evaluation_prompts"] == 3
    assert summary["calibration_tokens"] == 4 * 6
    assert summary["operating_threshold"] in summary["thresholds"]
    assert summary["thresholds"] == _strict_json(
        (run_dir / rd.EVALUATION_SUMMARY_FILE).read_text())["thresholds"]


@pytest.mark.slow
def test_a_deleted_late_file_redoes_only_its_stage(by_commands, tmp_path):
    # Given a finished study whose report.html is then deleted
    run_dir = tmp_path / "run"
    shutil.copytree(by_commands[0], run_dir)
    kept = _snapshot(run_dir, EARLY_FILES + LATE_FILES[:2])
    (run_dir / rd.REPORT_HTML_FILE).unlink()
    # When the same study runs again
    status, out, err = _cli([*STUDY, "--out", str(run_dir), "--json"])
    assert status == 0, err
    # Then only the report is written again; every earlier stage's file is untouched
    summary = _strict_json(out)
    assert [s for s, how in summary["stages"].items() if how == "ran"] == ["report"]
    assert (run_dir / rd.REPORT_HTML_FILE).is_file()
    assert _snapshot(run_dir, EARLY_FILES + LATE_FILES[:2]) == kept


@pytest.mark.slow
def test_a_finished_study_reruns_nothing_and_prints_the_table(by_commands):
    run_dir = by_commands[0]
    status, out, err = _cli([*STUDY, "--out", str(run_dir)])
    assert status == 0, err
    assert sum("skipped" in line for line in _stage_lines(err)) == len(STAGES)
    assert "Rand-HLM" in out and "Report:" in out and "Draft acceptance under HLM" in out


@pytest.mark.slow
def test_a_fresh_study_runs_every_stage_in_order(tmp_path):
    # Given an empty folder, when the study runs
    run_dir = tmp_path / "run"
    status, out, err = _cli([*STUDY, "--out", str(run_dir), "--json"])
    assert status == 0, err
    # Then it loads the pair, then runs the six stages in order, each one started and ended
    lines = _stage_lines(err)
    assert [line.split("] ")[0][-4:] for line in lines] == [
        f"[{i}/7" for i in range(1, 8) for _ in range(2)]
    assert "load the toy pair" in lines[0]
    assert all("left)" in line for line in lines)
    assert list(_strict_json(out)["stages"].values()) == ["ran"] * len(STAGES)
    for name in EARLY_FILES + LATE_FILES:
        assert (run_dir / name).is_file(), name
    # And each stage's files are no older than those of the stage before
    order = [rd.CONFIG_FILE, rd.FIT_FILE, rd.THRESHOLDS_FILE, rd.EVALUATION_SUMMARY_FILE,
             rd.SWEEP_SUMMARY_FILE, rd.REPORT_HTML_FILE]
    times = [(run_dir / n).stat().st_mtime_ns for n in order]
    assert times == sorted(times)


# ------------------------------------------------------------ fast: settings


def _recorded_run(run_dir, **fit_config):
    """A run directory whose files record the toy study's settings (no records needed:
    the settings are checked before anything runs)."""
    settings = collect.Config(out=str(run_dir), pair="toy", num_prompts=4, max_new_tokens=6,
                              batch_size=4).settings()
    run_dir.mkdir()
    rd.write_json(run_dir / rd.CONFIG_FILE, {"settings": settings})
    return run_dir


def _error(argv) -> str:
    status, _, err = _cli(argv)
    assert status == 2
    assert err.startswith("uhlm study: error:") and err.count("\n") == 1
    return err


def test_a_different_collection_setting_is_named(tmp_path):
    run_dir = _recorded_run(tmp_path / "run")
    err = _error([*STUDY, "--max-new-tokens", "7", "--out", str(run_dir)])
    assert "--max-new-tokens=6, not 7" in err and rd.CONFIG_FILE in err
    err = _error([*STUDY, "--calibration-prompts", "5", "--out", str(run_dir)])
    assert "--calibration-prompts=4, not 5" in err


def test_a_different_fit_setting_is_named(tmp_path):
    run_dir = _recorded_run(tmp_path / "run")
    rd.write_json(run_dir / rd.FIT_FILE, {"config": {"measure": "temperature_perturbation",
                                                     "num_chains": 2, "num_warmup": 50}})
    err = _error([*STUDY, "--num-warmup", "60", "--out", str(run_dir)])
    assert "--num-warmup=50, not 60" in err and "delete it to redo that stage" in err


def test_a_different_evaluation_setting_is_named(tmp_path):
    run_dir = _recorded_run(tmp_path / "run")
    rd.write_json(run_dir / rd.EVALUATION_SUMMARY_FILE, {"settings": {
        "prompts": embedded_prompts_path(), "split": "evaluation", "num_prompts": 3}})
    err = _error([*STUDY, "--evaluation-prompts", "2", "--out", str(run_dir)])
    assert "--evaluation-prompts=3, not 2" in err and rd.EVALUATION_SUMMARY_FILE in err


def test_help_explains_resuming():
    status, out, _ = _cli(["study", "--help"])
    assert status == 0
    text = " ".join(out.split())
    assert "--calibration-prompts" in text and "--evaluation-prompts" in text
    assert "Rerun the same command to continue" in text


# ------------------------------------------------------------ fast: time left


def test_stage_estimates_follow_the_pace_of_their_kind():
    # Given model stages expected to take 10 and 20 s, taking 20 and 10 s, and a statistics
    # stage expected to take 10 s between them, taking 10 s
    clock = iter([0.0, 0.0, 20.0, 20.0, 30.0, 30.0, 40.0]).__next__
    lines = io.StringIO()
    models, stats = study.Work.MODELS, study.Work.STATISTICS
    stages = study.Stages(["a", "b", "c"], [10.0, 10.0, 20.0], [models, stats, models],
                          stream=lines, clock=clock)
    for i in range(3):
        stages.run(i, lambda: None)
    out = lines.getvalue().splitlines()
    assert len(out) == 6
    # Then the estimate starts at the expected total, and each stage's share follows the
    # pace of its kind, which starts from 1 with the prior's weight
    assert study.PACE_PRIOR_S == 60.0
    assert "[1/3] a (elapsed 0:00, about 0:40 left)" in out[0]
    # After a: models at (20 + 60) / (10 + 60); statistics still at 1: 10 + 20 x 80/70
    assert "[1/3] done in 0:20 (elapsed 0:20, about 0:33 left)" in out[1]
    assert "(elapsed 0:30, about 0:23 left)" in out[3]  # 20 x 80/70
    assert "[3/3] done in 0:10 (elapsed 0:40, about 0:00 left)" in out[5]
    assert stages.seconds == {"a": 20.0, "b": 10.0, "c": 10.0}
