"""The collection job: run directory, resume after SIGKILL, device-count invariance, errors."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from analysis import cli
from calibration.collect import Config, run, summary_line
from calibration.records import read_records
from tests.helpers import FLOAT_ATOL, REPO, collect_command, cpu_env, write_prompts


def _config(tmp_path, out="run", **overrides):
    settings = dict(
        pair="toy",
        prompts=str(write_prompts(tmp_path / "p.jsonl", 6)),
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


def test_resume_collects_missing_and_damaged_shards_again(tmp_path, capsys):
    # Given a finished run of 3 shards (prompts 0-1, 2-3, 4-5), and a copy of it where
    # shard 0 is truncated, shard 1 holds shard 2's prompts, and shard 2 is gone,
    full = run(_config(tmp_path, out="full"))
    shards = shutil.copytree(full.run_dir, tmp_path / "run") / "records"
    (shards / "shard-000000.parquet").write_bytes(
        (shards / "shard-000000.parquet").read_bytes()[:-16]
    )
    (shards / "shard-000002.parquet").replace(shards / "shard-000001.parquet")
    capsys.readouterr()
    # when it is resumed,
    resumed = run(_config(tmp_path, resume=True), progress=False)
    # then each damaged shard is named on one line of stderr and its prompts collected again,
    warnings = capsys.readouterr().err.splitlines()
    assert [w.split("'")[1] for w in warnings] == [
        str(shards / f"shard-00000{i}.parquet") for i in range(3)
    ]
    assert "is not readable Parquet" in warnings[0]
    assert "lacks prompts 2-3" in warnings[1]
    assert "is missing" in warnings[2]
    # so the records equal the uninterrupted run's, and it says it wrote all three again.
    pd.testing.assert_frame_equal(read_records(resumed.run_dir), read_records(full.run_dir))
    assert (resumed.written_shards, resumed.written_tokens) == (3, full.num_tokens)
    assert summary_line(resumed) == (
        f"wrote {full.num_tokens} token records in 3 shards to {resumed.run_dir}"
    )


def test_resuming_a_complete_run_writes_nothing_and_says_so(tmp_path, capsys):
    argv = ["collect", "--pair", "toy", "--prompts", str(write_prompts(tmp_path / "p.jsonl", 4)),
            "--out", str(tmp_path / "run"), "--max-new-tokens", "4", "--batch-size", "2",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("wrote ") and "in 2 shards" in first
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "records").iterdir()}
    assert cli.main([*argv, "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written_shards"], summary["written_tokens"]) == (0, 0)
    assert summary["num_shards"] == 2 and summary["num_tokens"] > 0
    assert cli.main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.startswith("wrote nothing: ")
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "records").iterdir()}


def test_num_prompts_beyond_the_prompts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=(
        r"^--num-prompts 7 is more than the 6 prompts in .*p\.jsonl; pass --num-prompts 6 or "
        "fewer"
    )):
        run(_config(tmp_path, num_prompts=7))
    with pytest.raises(ValueError, match=(
        r"^--num-prompts 6 is more than the 4 prompts in .* after --first-prompt 2;"
    )):
        run(_config(tmp_path, num_prompts=6, first_prompt=2))
    assert not (tmp_path / "run").exists()
    # All of them is fine, and config.json counts them.
    result = run(_config(tmp_path, num_prompts=4, first_prompt=2), progress=False)
    assert json.loads((result.run_dir / "config.json").read_text())["num_prompts"] == 4


def test_empty_prompt_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="contains no prompts"):
        run(_config(tmp_path, prompts=str(empty)))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_duplicating_records(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 24)
    # Given: an uninterrupted run.
    subprocess.run(collect_command(prompts, tmp_path / "full"), check=True, env=cpu_env(), cwd=REPO)
    # When: another run is SIGKILLed after its first shard, then resumed.
    process = subprocess.Popen(
        collect_command(prompts, tmp_path / "killed"),
        env=cpu_env(),
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
    resume = collect_command(prompts, tmp_path / "killed", "--resume")
    subprocess.run(resume, check=True, env=cpu_env(), cwd=REPO)
    # Then: the records equal the uninterrupted run's, row for row.
    pd.testing.assert_frame_equal(
        read_records(tmp_path / "killed"), read_records(tmp_path / "full")
    )


@pytest.mark.slow
def test_four_devices_give_the_same_records_as_one(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    for devices in (1, 4):
        subprocess.run(
            collect_command(prompts, tmp_path / f"d{devices}"),
            check=True,
            env=cpu_env(devices),
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
