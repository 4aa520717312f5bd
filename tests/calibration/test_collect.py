"""The collection job: run directory, resume after SIGKILL, device-count invariance, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration.collect import Config, run
from calibration.records import read_records

REPO = Path(__file__).resolve().parents[2]
# Float32 rounding differences between batch layouts (a few ulps of values in [0, 1]).
FLOAT_ATOL = 1e-5


def _prompts(path: Path, count: int) -> Path:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    lines = [
        json.dumps({"prompt": f"{words[i % 8]} {i} {words[(3 * i) % 8]}"}) for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, out="run", **overrides):
    settings = dict(
        pair="toy",
        prompts=str(_prompts(tmp_path / "p.jsonl", 6)),
        out=str(tmp_path / out),
        max_new_tokens=6,
        batch_size=2,
        seed=5,
    )
    settings.update(overrides)
    return Config(**settings)


def test_collect_writes_a_complete_run_directory(tmp_path):
    result = run(_config(tmp_path))
    assert result.num_shards == 3
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["settings"]["seed"] == 5 and config["versions"]["jax"]
    assert config["measures"][0] == "temperature_perturbation"
    df = read_records(result.run_dir)
    assert len(df) == result.num_tokens > 0
    assert sorted(df.prompt_id.unique()) == list(range(6))
    assert {"u_temperature_perturbation", "u_entropy", "beta", "tv", "accepted"} <= set(df.columns)
    assert df.groupby("prompt_id").position.max().le(5).all()
    assert df.beta.between(0, 1).all()
    floats = df.select_dtypes("floating").to_numpy()
    assert not np.signbit(floats).any()  # no −0.0 (nor any negative) in any record
    assert (df.beta == 0).any()  # the toy pair accepts some drafts outright


def test_fewer_measures_record_the_same_values_for_those_kept(tmp_path):
    # Given a run of all measures and a run asked for two of them, same seed and prompts,
    everything = read_records(run(_config(tmp_path, out="all")).run_dir)
    fewer_dir = run(
        _config(tmp_path, out="fewer", measures=("entropy", "temperature_perturbation"))
    ).run_dir
    fewer = read_records(fewer_dir)
    # then only the two are recorded, in the order asked,
    config = json.loads((fewer_dir / "config.json").read_text())
    assert config["measures"] == ["entropy", "temperature_perturbation"]
    assert not {"u_expected_temperature_perturbation", "u_top_two_margin"} & set(fewer.columns)
    # with the values, tokens and tv the full run records.
    for column in ("token", "draft", "accepted", "u_entropy", "u_temperature_perturbation"):
        np.testing.assert_array_equal(fewer[column], everything[column])
    np.testing.assert_allclose(fewer.tv, everything.tv, atol=FLOAT_ATOL)


def test_unknown_or_repeated_measures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="measures must be distinct names among"):
        _config(tmp_path, measures=("entropi",))
    with pytest.raises(ValueError, match="measures must be distinct names among"):
        _config(tmp_path, measures=("entropy", "entropy"))


def test_resume_refuses_other_settings_and_existing_runs(tmp_path):
    run(_config(tmp_path, num_prompts=2))
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"different settings \(seed: 5 -> 6"):
        run(_config(tmp_path, num_prompts=2, seed=6, resume=True))
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        run(_config(tmp_path, num_prompts=2))
    with pytest.raises(ValueError, match="does not exist; drop --resume"):
        run(_config(tmp_path, out="missing", resume=True))
    # Nothing already written was touched.
    assert (tmp_path / "run" / "config.json").read_text() == before
    assert len(read_records(tmp_path / "run")) > 0


def test_empty_prompt_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        run(_config(tmp_path, prompts=str(empty)))
    assert not (tmp_path / "run").exists()


def _collect_command(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "analysis.cli",
        "collect",
        "--pair",
        "toy",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        "--seed",
        "3",
        *extra,
    ]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_duplicating_records(tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", 24)
    # Given: an uninterrupted run.
    subprocess.run(_collect_command(prompts, tmp_path / "full"), check=True, env=_env(), cwd=REPO)
    # When: another run is SIGKILLed after its first shard, then resumed.
    process = subprocess.Popen(
        _collect_command(prompts, tmp_path / "killed"),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = tmp_path / "killed" / "records"
    deadline = time.time() + 300
    while time.time() < deadline and not list(shards.glob("shard-*.parquet")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(shards.glob("shard-*.parquet")))
    assert 1 <= written < 6, "the run must be killed part-way"
    subprocess.run(
        _collect_command(prompts, tmp_path / "killed", "--resume"), check=True, env=_env(), cwd=REPO
    )
    # Then: the records equal the uninterrupted run's, row for row.
    pd.testing.assert_frame_equal(
        read_records(tmp_path / "killed"), read_records(tmp_path / "full")
    )


@pytest.mark.slow
def test_four_devices_give_the_same_records_as_one(tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", 8)
    for devices in (1, 4):
        subprocess.run(
            _collect_command(prompts, tmp_path / f"d{devices}"),
            check=True,
            env=_env(devices),
            cwd=REPO,
        )
    config = json.loads((tmp_path / "d4" / "config.json").read_text())
    assert config["num_devices"] == 4
    one, four = read_records(tmp_path / "d1"), read_records(tmp_path / "d4")
    # Token ids, drafts, positions and decisions are identical. Floats agree to float32
    # rounding: a device holding 1 row instead of 4 runs matrix products with other
    # kernels, which may round the last bit differently.
    exact = ["prompt_id", "position", "token", "draft", "accepted"]
    pd.testing.assert_frame_equal(one[exact], four[exact])
    floats = [c for c in one.columns if c not in exact]
    np.testing.assert_allclose(one[floats].to_numpy(), four[floats].to_numpy(), atol=FLOAT_ATOL)
