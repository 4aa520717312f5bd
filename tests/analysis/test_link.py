"""Tests for the `uhlm link` job (analysis.link)."""

import argparse
import json
import math
import re

import pytest

from analysis import link
from analysis.cli import main as cli_main
from uhlm_jax import channel as ch
from uhlm_jax import pricing

# float32 arithmetic inside the job.
FLOAT32_RTOL = 1e-5


def _parse(argv):
    parser = argparse.ArgumentParser()
    link.add_arguments(parser)
    return parser.parse_args(argv)


def test_poor_preset_json_smoke(capsys):
    # Given the command of the acceptance criterion, When it runs,
    # Then it prints one JSON object with every mode, HLM as the unit, and the bound.
    assert link.main(_parse(["--preset", "poor", "--skip-rate", "0.46", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    modes = {row["mode"]: row for row in out["modes"]}
    assert set(modes) == {"llm_only", "slm_only", "hlm", "uhlm", "rand_hlm"}
    assert modes["hlm"]["speedup_vs_hlm"] == 1.0
    assert out["speedup_bound"] == pytest.approx(1 / 0.54)
    assert 1.0 < out["uhlm_speedup_vs_hlm"] <= out["speedup_bound"]
    assert out["uhlm_speedup_vs_hlm"] == modes["uhlm"]["speedup_vs_hlm"]
    for row in out["modes"]:
        assert row["tokens_per_s"] == pytest.approx(1e3 / row["latency_ms_per_token"])
    assert out["config"]["preset"] == "poor"
    assert out["link"]["mean_snr_db"] == pytest.approx(ch.mean_snr_db(ch.LinkPreset.POOR.value))


def test_table_output_states_the_bound(capsys):
    assert link.main(_parse(["--preset", "good", "--top-k", "30", "--bits-per-prob", "8"])) == 0
    out = capsys.readouterr().out
    assert "CU-HLM top-30 = 690 bits" in out
    assert "bound 1/(1-s) = 1.849x" in out
    for mode in ("llm_only", "slm_only", "hlm", "uhlm", "rand_hlm"):
        assert f"\n{mode} " in out


def test_run_reproduces_the_worked_example():
    # Static 10 MHz link at 10 dB, V = 32000, b = 8: HLM costs 41.134 ms per token and
    # U-HLM at 46% skipped 34.688 ms (worked out in tests/test_channel.py).
    cfg = link.Config(
        snr_db=10.0,
        bandwidth_hz=10e6,
        fading=ch.Fading.NONE,
        skip_rate=0.46,
        bits_per_prob=8.0,
    )
    result = link.run(cfg)
    rows = {row.mode.value: row for row in result.rows}
    assert rows["hlm"].latency_ms == pytest.approx(41.134, abs=1e-3)
    assert rows["uhlm"].latency_ms == pytest.approx(34.688, abs=1e-3)
    assert result.uplink_bits == 256000.0
    assert result.downlink_bits == 15
    assert result.outage_probability == 0.0
    rate = 10e6 * math.log2(11.0)
    assert result.breakdown_ms["uplink"] == pytest.approx(256000 / rate * 1e3, rel=FLOAT32_RTOL)


def test_bandwidth_override_moves_the_snr():
    wide = link.run(link.Config(preset=ch.LinkPreset.MEDIUM, bandwidth_hz=40e6))
    base = link.run(link.Config(preset=ch.LinkPreset.MEDIUM))
    assert base.mean_snr_db - wide.mean_snr_db == pytest.approx(10 * math.log10(2))


def test_unknown_preset_is_rejected_with_its_name(capsys):
    assert cli_main(["link", "--preset", "awful"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--preset: .*'awful'.*good, medium, poor", err) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slm-device", "toaster"], r"--slm-device: .*'toaster'"),
        (["--llm-model", "gpt-5"], r"--llm-model: .*'gpt-5'"),
        (["--fading", "rician"], r"--fading: .*'rician'"),
        (["--snr-db", "120"], r"mean_snr_db=120"),
        (["--bandwidth-hz=-1e6"], r"--bandwidth-hz=-1000000"),
        (["--top-k", "0"], r"--top-k=0"),
        (["--skip-rate", "1.0"], r"--skip-rate=1.0"),
    ],
)
def test_bad_values_are_rejected_by_flag(argv, message, capsys):
    assert cli_main(["link", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


@pytest.mark.without_type_checks
def test_config_rejects_strings_for_enums():
    with pytest.raises(ValueError, match=r"preset='poor'.*LinkPreset"):
        link.Config(preset="poor")


def test_pair_cost_profile_prices_the_toy_pair_with_its_own_vocabulary(capsys):
    # Given the toy pair (V = 260, float32), When `uhlm link --cost-profile pair` prices it
    argv = ["--cost-profile", "pair", "--pair", "toy", "--bits-per-prob", "16"]
    assert link.main(_parse([*argv, "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    # Then the uplink carries 260 probabilities and the downlink ⌈log2 260⌉ = 9 bits
    assert out["uplink_bits"] == 260 * 16
    assert out["downlink_bits"] == 9
    cfg = out["config"]
    assert (cfg["cost_profile"], cfg["pair"], cfg["vocab_size"]) == ("pair", "toy", 260)
    assert (cfg["slm_model"], cfg["llm_model"]) == ("toy-slm", "toy-llm")
    assert cfg["slm_precision"] == cfg["llm_precision"] == "float32"
    # And the models' compute is the toy configs' roofline, far below TinyLlama's
    pair = pricing.pair_profile("pair", pair="toy")
    slm_s = ch.compute_latency_s(ch.Deployment(pair.slm, ch.Device.PHONE_SOC, ch.Precision.FLOAT32))
    assert out["breakdown_ms"]["slm"] == pytest.approx(slm_s * 1e3, rel=FLOAT32_RTOL)
    assert link.main(_parse(argv)) == 0
    table = capsys.readouterr().out
    assert "cost profile 'pair' (pair toy): toy-slm float32 on phone-soc" in table
    assert "full distribution, 260 x 16 bits = 4160 bits" in table


def test_named_cost_profile_is_the_default_and_says_so(capsys):
    assert link.main(_parse(["--json"])) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert (cfg["cost_profile"], cfg["pair"], cfg["vocab_size"]) == ("named", None, 32000)
    assert (cfg["slm_model"], cfg["slm_precision"]) == ("tinyllama-1.1b", "float16")
    assert link.main(_parse(["--llm-precision", "float32"])) == 0
    table = capsys.readouterr().out
    assert table.startswith("costs    cost profile 'named': tinyllama-1.1b float16 on phone-soc")
    assert "llama-2-7b float32 on datacenter-gpu, V = 32000" in table


def test_a_precision_flag_overrides_the_pairs_dtype():
    cfg = link.config_from_args(
        _parse(["--cost-profile", "pair", "--pair", "toy", "--slm-precision", "int8"])
    )
    profile = cfg.cost_profile()
    assert profile.slm.precision is ch.Precision.INT8
    assert profile.llm.precision is ch.Precision.FLOAT32


def test_pair_profile_from_a_run_record_equals_the_loaded_pair():
    # config.json records each model's config (calibration.collect); no model is loaded
    from calibration.collect import _describe
    from calibration.run_dir import RunConfig
    from uhlm_jax.pair import load_pair

    pair = load_pair("toy")
    recorded = {"settings": {"pair": "toy"},
                "pair": {"name": "toy", "slm": _describe(pair.slm.config),
                         "llm": _describe(pair.llm.config)}}
    run_config = RunConfig.from_json(recorded)
    assert run_config.pair_profile("pair") == pricing.pair_profile("pair", pair="toy")
    assert run_config.pair_profile("named") is None
    bf16 = RunConfig.from_json({**recorded, "settings": {"pair": "toy", "dtype": "bfloat16"}})
    assert bf16.pair_profile("pair").precision is ch.Precision.FLOAT16
    two = pricing.pair_profile("pair", pair="toy-slm,toy-llm")
    assert (two.name, two.slm.name, two.llm.name) == ("toy-slm,toy-llm", "toy-slm", "toy-llm")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cost-profile", "pair"], r"needs a pair"),
        (["--pair", "toy"], r"--pair is the pair that --cost-profile pair prices"),
        (["--cost-profile", "pair", "--pair", "toy", "--slm-model", "llama-2-7b"],
         r"--slm-model and --llm-model choose the models of --cost-profile named"),
        (["--cost-profile", "pair", "--pair", "nope"], r"Unknown pair 'nope'"),
    ],
)
def test_bad_cost_profile_input_is_one_line(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        link.config_from_args(_parse(argv))
    assert cli_main(["link", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_unknown_cost_profile_name_is_rejected():
    with pytest.raises(ValueError, match=r"'paper'.*named, pair"):
        pricing.pair_profile("paper")
