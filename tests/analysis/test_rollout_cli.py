"""`uhlm rollout` on the toy pair: texts, summary, JSON, and errors."""

import json

from analysis.cli import main as cli_main


def test_rollout_json_summary(capsys):
    status = cli_main(
        ["rollout", "--pair", "toy", "--mode", "uhlm", "--threshold", "0.3", "--prompt", "hello",
         "--prompt", "world", "--max-new-tokens", "8", "--json"]
    )  # fmt: skip
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["texts"]) == 2
    summary = out["summary"]
    assert summary["mode"] == "uhlm" and 0 < summary["tokens"] <= 16
    assert 0.0 <= summary["transmission_rate"] <= 1.0
    assert 0.0 <= summary["mean_u_temperature_perturbation"] <= 1.0


def test_rollout_text_output_and_bad_values(capsys):
    assert cli_main(["rollout", "--pair", "toy", "--mode", "hlm", "--max-new-tokens", "4"]) == 0
    assert "transmission rate 1.000" in capsys.readouterr().out
    assert cli_main(["rollout", "--pair", "nope"]) == 2
    assert "Unknown pair 'nope'" in capsys.readouterr().err
    assert cli_main(["rollout", "--mode", "rand_hlm", "--transmit-probability", "1.5"]) == 2
    assert "--transmit-probability must be in [0, 1], got 1.5" in capsys.readouterr().err
