"""`uhlm collect --distributed` and `--mesh`: two processes of 2 emulated CPU devices each,
joined by `jax.distributed.initialize` on a localhost coordinator, write the records of one
process, resume after one of them is killed, and refuse to run different configs; bad
meshes and process flags are one-line errors."""

import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration.collect import Config, run
from calibration.records import read_records
from tests.helpers import FLOAT_ATOL, REPO, collect_command, cpu_env, write_prompts

PROCESSES = 2
DEVICES_PER_PROCESS = 2
# Prompts: three batches of 4, one row per device.
NUM_PROMPTS = 12
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(
    prompts: Path, out: Path, logs: Path, tag: str, *extra: str, last: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """Starts the processes of one distributed run, the last with `last` added to its
    flags; process `i` writes its output to `logs/<tag>-<i>.log`."""
    address = f"localhost:{_free_port()}"
    processes = []
    for rank in range(PROCESSES):
        command = collect_command(
            prompts,
            out,
            "--distributed",
            "--coordinator-address",
            address,
            "--num-processes",
            str(PROCESSES),
            "--process-id",
            str(rank),
            *extra,
            *(last if rank == PROCESSES - 1 else ()),
        )
        # The child holds its own copy of the descriptor, so the parent's closes here.
        with open(logs / f"{tag}-{rank}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env=cpu_env(DEVICES_PER_PROCESS),
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return processes


def _wait(processes: list[subprocess.Popen], logs: Path) -> list[int]:
    """Exit codes of all processes; kills them all if one overruns."""
    try:
        return [p.wait(timeout=TIMEOUT_S) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        tails = "\n".join(f.read_text()[-2000:] for f in sorted(logs.iterdir()))
        pytest.fail(f"distributed collect ran past {TIMEOUT_S} s:\n{tails}")


def _assert_same_records(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    exact = ["prompt_id", "position", "token", "draft", "accepted"]
    pd.testing.assert_frame_equal(got[exact], expected[exact])
    floats = [c for c in expected.columns if c not in exact]
    np.testing.assert_allclose(got[floats].to_numpy(), expected[floats].to_numpy(), atol=FLOAT_ATOL)


def _config(tmp_path: Path, **overrides) -> Config:
    return Config(
        pair="toy",
        prompts=str(write_prompts(tmp_path / "p.jsonl", 2)),
        out=str(tmp_path / "run"),
        **overrides,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mesh="data=2,model=x"), r"^mesh 'data=2,model=x': model='x' must be a positive int"),
        (dict(process_id=1), r"^process_id=1 needs distributed=True \(--distributed\)\.$"),
        (dict(distributed=True, num_processes=2, process_id=2), r"process_id 2 must be in \[0, "),
    ],
)
def test_bad_mesh_and_process_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        _config(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_mesh_that_does_not_fit_the_devices_stops_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"^--mesh: mesh model=2 does not divide the 1 devices"):
        run(_config(tmp_path, mesh="model=2"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mesh_that_does_not_divide_the_heads_is_a_one_line_cli_error(tmp_path):
    # Given: 4 devices and the toy LLM, which has 2 kv heads.
    command = collect_command(
        write_prompts(tmp_path / "p.jsonl", 4), tmp_path / "run", "--mesh", "model=4"
    )
    done = subprocess.run(command, env=cpu_env(4), cwd=REPO, capture_output=True, text=True)
    # Then: exit code 2 and one line naming the value; nothing is written.
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "uhlm collect: error: --mesh: mesh model=4 does not divide the LLM's 2 key/value "
        "heads (num_kv_heads); use a model axis in [1, 2]."
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_write_the_records_of_one_and_resume_after_a_kill(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", NUM_PROMPTS)
    logs = tmp_path / "logs"
    logs.mkdir()
    # Given: the records of one process with one device.
    subprocess.run(collect_command(prompts, tmp_path / "one"), check=True, env=cpu_env(1), cwd=REPO)
    expected = read_records(tmp_path / "one")

    # When: two processes run the same collection.
    assert _wait(_start(prompts, tmp_path / "two", logs, "two"), logs) == [0] * PROCESSES
    # Then: they wrote the same records, and said how they ran.
    _assert_same_records(read_records(tmp_path / "two"), expected)
    config = (tmp_path / "two" / "config.json").read_text()
    assert '"num_processes": 2' in config and '"mesh": "data=4,model=1"' in config

    # When: process 1 is killed after the first shard, process 0 with it, and both restart.
    processes = _start(prompts, tmp_path / "killed", logs, "killed")
    shards = tmp_path / "killed" / "records"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and not list(shards.glob("shard-*.parquet")):
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait()
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait()
    written = len(list(shards.glob("shard-*.parquet")))
    assert 1 <= written < NUM_PROMPTS // 4, "the run must be killed part-way"
    resumed = _start(prompts, tmp_path / "killed", logs, "resumed", "--resume")
    assert _wait(resumed, logs) == [0] * PROCESSES
    # Then: the records are those of one process, none lost or duplicated.
    _assert_same_records(read_records(tmp_path / "killed"), expected)


@pytest.mark.slow
def test_processes_with_different_configs_stop_with_a_one_line_error(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    logs = tmp_path / "logs"
    logs.mkdir()
    # Given: two processes, the last started with another seed.
    processes = _start(prompts, tmp_path / "run", logs, "run", last=("--seed", "4"))
    # When: they join.
    codes = _wait(processes, logs)
    # Then: both stop with exit code 2 and one line naming the field; nothing is written.
    assert codes == [2] * PROCESSES
    for rank in range(PROCESSES):
        lines = (logs / f"run-{rank}.log").read_text().splitlines()
        errors = [line for line in lines if line.startswith("uhlm collect: error:")]
        assert errors == [
            f"uhlm collect: error: process {rank} and process {1 - rank} run different collect "
            "configs (they differ in seed); start every process with the same flags."
        ]
    assert not (tmp_path / "run").exists()
