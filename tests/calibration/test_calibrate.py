"""Smoke run of `uhlm calibrate` on the toy pair: a complete run directory."""

import json

import pytest

from analysis.cli import main as cli_main


@pytest.mark.slow
def test_calibrate_writes_records_fit_and_thresholds(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli_main(
        [
            "calibrate", "--pair", "toy", "--num-prompts", "4", "--max-new-tokens", "6",
            "--batch-size", "4", "--num-warmup", "50", "--num-samples", "50", "--refit-splits", "2",
            "--out", str(out), "--json",
        ]
    )  # fmt: skip
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_tokens"] == 24
    for name in ("config.json", "fit.json", "thresholds.json"):
        assert (out / name).is_file()
    assert list((out / "records").glob("shard-*.parquet"))
    # The threshold job reads the run directory back.
    assert cli_main(["threshold", "--run", str(out), "--json", "--refit-splits", "2"]) == 0
    thresholds = json.loads(capsys.readouterr().out)
    assert thresholds["mode"] == "run" and thresholds["measure"] == "temperature_perturbation"
