"""`uhlm sweep`: the tidy table, its config input, bad input, and replay against rollouts."""

import argparse
import itertools

import numpy as np
import pandas as pd
import pytest

from analysis import sweep as sw
from analysis.cli import main as cli_main
from calibration import records
from calibration import run_dir as rd
from tests.helpers import collect_toy_run, write_synthetic_run
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, pricing
from uhlm_jax import replay_table as rt
from uhlm_jax.modes import Mode

# Replay and rollout agree when |difference| ≤ Z_MAX · SE (SE: jackknife over prompts).
Z_MAX = 3.0
# Float32 replay against a float64 NumPy oracle.
ORACLE_RTOL = 1e-5


def _parse(argv):
    parser = argparse.ArgumentParser()
    sw.add_arguments(parser)
    return parser.parse_args(argv)


def _config(argv):
    return cli_config.config_from_args(sw.Config, _parse(argv))


@pytest.fixture
def synthetic(tmp_path):
    return tmp_path, write_synthetic_run(tmp_path)


def test_smoke_run_writes_one_row_per_point_and_metric(synthetic, capsys):
    run_dir, df = synthetic
    code = sw.main(
        _parse(
            [
                str(run_dir),
                "--thresholds",
                "0:1:5",
                "--snr-db",
                "0,20",
                "--presets",
                "good,poor",
                "--quiet",
                "--json",
            ]
        )
    )
    assert code == 0, capsys.readouterr().err
    table = pd.read_parquet(run_dir / rd.SWEEP_FILE)
    assert set(table["mode"]) == {m.value for m in Mode}
    assert not table.duplicated(["point", "metric"]).any()
    metrics = set(table["metric"])
    assert {"transmission_rate", "throughput_tokens_per_s", "speedup_vs_hlm"} <= metrics
    # 5 thresholds × 2 measures × 4 links U-HLM points, each with every metric.
    uhlm = table[table["mode"] == "uhlm"]
    assert uhlm["point"].nunique() == 5 * 2 * 4
    assert len(uhlm) == 5 * 2 * 4 * len(metrics)
    assert (run_dir / rd.SWEEP_SUMMARY_FILE).is_file()


def test_table_matches_a_numpy_oracle(synthetic):
    # Given a sweep over thresholds and both measures
    run_dir, df = synthetic
    thresholds = (0.0, 0.15, 0.4, 0.95)
    result = sw.run(
        sw.Config(
            run_dir=str(run_dir),
            thresholds=thresholds,
            snr_db=(),
            presets=(rt.SNR_BASE_PRESET,),
            modes=(Mode.UHLM,),
        ),
        progress=False,
    )
    table = result.table.set_index(["measure", "threshold", "metric"])["value"]
    beta = df["beta"].to_numpy(np.float64)
    accepted = df["accepted"].to_numpy(bool)
    # Then each point's metrics equal the definitions computed with NumPy masks
    for measure, t in itertools.product(("temperature_perturbation", "entropy"), thresholds):
        sent = df["u_" + measure].to_numpy(np.float32) > np.float32(t)
        expected = {
            "transmission_rate": sent.mean(),
            "acceptance_rate": (accepted & sent).sum() / sent.sum() if sent.any() else np.nan,
            "risk_per_token": (beta * ~sent).sum() / beta.size,
            "llm_agreement": 1 - (beta * ~sent).sum() / beta.size,
        }
        for metric, value in expected.items():
            np.testing.assert_allclose(
                table[(measure, t, metric)],
                value,
                rtol=ORACLE_RTOL,
                err_msg=f"{measure} {t} {metric}",
            )


def test_chunk_size_does_not_change_the_table(synthetic):
    run_dir, df = synthetic
    measures = ("temperature_perturbation", "entropy")
    tokens = records.token_records(df, measures)
    grid = rt.ReplayGrid(thresholds=tuple(np.linspace(0, 1, 7)), snr_db=(5.0,))
    base = pricing.Pricing().cost_profile()
    big = rt.replay_table(grid, tokens, measures, base, progress=False)
    small = rt.replay_table(grid, tokens, measures, base, chunk_size=4, progress=False)
    pd.testing.assert_frame_equal(big, small)


def test_toml_config_and_flag_override(synthetic, tmp_path_factory):
    run_dir, _ = synthetic
    path = tmp_path_factory.mktemp("cfg") / "sweep.toml"
    path.write_text(
        'thresholds = [0.1, 0.2]\nmodes = ["uhlm", "hlm"]\npresets = ["poor"]\n'
        "snr_db = []\ntop_k = [0, 30]\n"
    )
    cfg = _config([str(run_dir), "--config", str(path)])
    assert cfg.thresholds == (0.1, 0.2) and cfg.modes == (Mode.UHLM, Mode.HLM)
    assert cfg.top_k == (0, 30)
    assert _config([str(run_dir), "--config", str(path), "--thresholds", "0.5"]).thresholds == (
        0.5,
    )


@pytest.mark.parametrize(
    "text, match",
    [
        ("threshold = [0.1]\n", "unknown key.*'threshold'"),
        ("thresholds = []\n", "empty grid axis"),
        ('measures = ["entropyy"]\n', "unknown measure 'entropyy'"),
        ('modes = ["uhml"]\n', "unknown mode 'uhml'"),
        ("thresholds = [0.1\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(synthetic, tmp_path_factory, text, match):
    run_dir, _ = synthetic
    path = tmp_path_factory.mktemp("bad") / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        _config([str(run_dir), "--config", str(path)])


def test_run_dir_without_records_is_a_clear_error(tmp_path, capsys):
    code = cli_main(["sweep", str(tmp_path), "--quiet"])
    assert code == 2
    assert "no record shards" in capsys.readouterr().err


def test_unrecorded_measure_is_a_clear_error(synthetic):
    run_dir, _ = synthetic
    with pytest.raises(ValueError, match="'top_two_margin' is not in the records"):
        sw.run(sw.Config(run_dir=str(run_dir), measures=("top_two_margin",)), progress=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return collect_toy_run(tmp_path_factory.mktemp("toy") / "run", max_new_tokens=16, seed=3)


@pytest.mark.slow
def test_replay_agrees_with_real_rollouts_on_the_toy_pair(toy_run):
    # Given a toy calibration run, when U-HLM rollouts run at a few thresholds (and HLM)
    result = sw.run(
        sw.Config(
            run_dir=str(toy_run),
            thresholds=(0.2,),
            snr_db=(0.0,),
            modes=(Mode.HLM,),
            rollout_thresholds=(0.05, 0.3, 0.6),
            rollout_modes=(Mode.HLM,),
            rollout_draft_temperatures=(1.0, 0.5),
            rollout_uncertainty_samples=(20, 4),
        ),
        progress=False,
    )
    c = result.comparison
    assert len(c) and set(c["mode"]) == {"uhlm", "hlm"}
    # Only points at the calibration's draft temperature and K have a replay twin
    uhlm = c[c["mode"] == "uhlm"]
    assert set(uhlm["draft_temperature"]) == {1.0} and set(uhlm["num_samples"]) == {20}
    rollouts = result.table[
        (result.table["source"] == "rollout") & (result.table["mode"] == "uhlm")
    ]
    assert rollouts["point"].nunique() == 3 * 2 * 2
    assert set(rollouts["draft_temperature"]) == {1.0, 0.5}
    finite = c[np.isfinite(c["difference"])]
    # Then every metric agrees within the Monte Carlo error of the paired difference (a
    # zero difference agrees even where every prompt's value is equal and the SE is NaN)
    agrees = (finite["difference"] == 0) | (finite["difference"].abs() <= Z_MAX * finite["se"])
    assert agrees.all(), finite.to_string()
    # And HLM, which emits the recorded trajectory, matches replay exactly
    hlm = finite[finite["mode"] == "hlm"].set_index("metric")
    for metric in ("transmission_rate", "acceptance_rate", "risk_per_token"):
        assert hlm.loc[metric, "difference"] == 0.0
    assert (result.table["source"] == "rollout").any()


def test_rollout_prompts_follow_the_collection_settings_for_shipped_prompts(tmp_path):
    # Given: a run collected from the shipped prompts' calibration split (no --prompts).
    from calibration import collect
    from calibration.prompts import embedded_prompts_path, read_prompts

    settings = collect.Config(
        pair="toy", prompts=None, split="calibration", out=str(tmp_path), num_prompts=3,
        first_prompt=1,
    ).settings()  # fmt: skip
    # When: the sweep picks the prompts to roll out.
    texts, ids = sw._rollout_prompts(sw.Config(run_dir=str(tmp_path)), settings)
    # Then: they are the same prompts, with the same ids, as the collection used.
    expected = read_prompts(embedded_prompts_path(), "calibration")[1:4]
    assert texts == [p.text for p in expected]
    np.testing.assert_array_equal(ids, [1, 2, 3])


def test_pair_cost_profile_prices_the_runs_pair(toy_run, capsys):
    # Given a calibration run of the toy pair (its config.json records both configs)
    argv = [str(toy_run), "--modes", "hlm,slm_only", "--thresholds", "0.5", "--presets",
            "medium", "--snr-db", "", "--quiet"]
    tables = {}
    for name in ("named", "pair"):
        # When it is swept under each cost profile
        assert sw.main(_parse([*argv, "--cost-profile", name])) == 0
        table = pd.read_parquet(toy_run / rd.SWEEP_FILE)
        tables[name] = table.set_index(["mode", "metric"])["value"]
        summary = rd.read_json(toy_run / rd.SWEEP_SUMMARY_FILE)
        assert summary["config"]["cost_profile_name"] == name
    capsys.readouterr()
    # Then HLM uploads the pair's 260 probabilities, not the paper's 32 000
    assert tables["pair"]["hlm", "uplink_bits_per_token"] == 260 * 16
    assert tables["named"]["hlm", "uplink_bits_per_token"] == 32000 * 16
    # And SLM-only costs the toy SLM's roofline (it computes no uncertainty)
    profile = sw.Config(run_dir=str(toy_run), cost_profile_name="pair").cost_profile()
    assert profile.slm.model_profile == pricing.pair_profile("pair", pair="toy").slm
    expected_s = ch.compute_latency_s(profile.slm)
    np.testing.assert_allclose(
        tables["pair"]["slm_only", "throughput_tokens_per_s"], 1 / expected_s, rtol=ORACLE_RTOL
    )


def test_pair_cost_profile_bad_input(synthetic, tmp_path):
    run_dir, _ = synthetic
    with pytest.raises(ValueError, match=r"slm_model and llm_model choose the models"):
        sw.Config(run_dir=str(run_dir), cost_profile_name="pair",
                  slm_model=ch.ModelSize.SMOLLM2_135M)
    with pytest.raises(ValueError, match=r"'paper'.*named, pair"):
        sw.Config(run_dir=str(run_dir), cost_profile_name="paper")
    with pytest.raises(ValueError, match=r"needs a pair"):
        sw.Config(run_dir=str(tmp_path / "elsewhere"), cost_profile_name="pair")
    # A run that records only the pair's name: the pair is loaded for its configs.
    cfg = sw.Config(run_dir=str(run_dir), cost_profile_name="pair", top_k=(260,))
    assert cfg.cost_profile().vocab_size == 260
    with pytest.raises(ValueError, match=r"each k must lie in \[1, 260\].*toy-llm"):
        sw.Config(run_dir=str(run_dir), cost_profile_name="pair", top_k=(261,))
