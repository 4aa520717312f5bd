"""Record shards: the check a resumed collection makes, and errors naming a bad shard."""

import numpy as np
import pytest

from calibration import records
from calibration import run_dir as rd
from tests.helpers import synthetic_records

MEASURES = ("temperature_perturbation", "entropy")


def _shard(tmp_path, prompts=3):
    """A shard of prompts 7, 10, ... (the synthetic ids), and those ids."""
    df = synthetic_records(np.random.default_rng(0), prompts, 4)
    path = tmp_path / rd.RECORDS_DIR / rd.shard_name(0)
    records.write_shard(df, path)
    return path, df


def test_a_sound_shard_has_no_problem(tmp_path):
    path, df = _shard(tmp_path)
    assert records.shard_problem(path, set(df.prompt_id), MEASURES) is None


def test_each_kind_of_damage_is_named(tmp_path):
    path, df = _shard(tmp_path)
    ids = set(df.prompt_id)
    # Given a shard for prompts 7, 10, 13:
    assert records.shard_problem(path, ids | {16}, MEASURES) == "lacks prompts 16"
    assert records.shard_problem(path, ids - {13}, MEASURES) == "holds other prompts (13)"
    assert records.shard_problem(path, ids, (*MEASURES, "top_two_margin")) == (
        "lacks columns ['u_top_two_margin']"
    )
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    assert records.shard_problem(path, ids, MEASURES).startswith("is not readable Parquet (")
    path.unlink()
    assert records.shard_problem(path, ids, MEASURES) == "is missing"


def test_reading_a_truncated_shard_names_it_and_the_fix(tmp_path):
    path, _ = _shard(tmp_path)
    rd.write_json(tmp_path / rd.CONFIG_FILE, {})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError) as err:
        records.read_records(tmp_path)
    message = str(err.value)
    assert str(path) in message and "--resume" in message and "\n" not in message


def test_coverage_warning_when_records_miss_prompts(tmp_path, capsys):
    # Given a run whose config.json says it collected 16 prompts,
    rd.write_json(tmp_path / rd.CONFIG_FILE, {"num_prompts": 16})
    # then records of 8 prompts are one line on stderr, returned for the JSON output,
    line = records.coverage_warning(tmp_path, 8)
    assert "cover 8 of the 16 prompts" in line and "--resume" in line
    assert capsys.readouterr().err == line + "\n"
    # and records of all 16 say nothing.
    assert records.coverage_warning(tmp_path, 16) is None
    assert capsys.readouterr().err == ""


def test_coverage_of_older_runs_counts_their_num_prompts_setting(tmp_path, capsys):
    rd.write_json(tmp_path / rd.CONFIG_FILE, {"settings": {"num_prompts": 4}})
    assert "cover 3 of the 4 prompts" in records.coverage_warning(tmp_path, 3)
    # A run that records no count (all of its split) is not checked.
    rd.write_json(tmp_path / rd.CONFIG_FILE, {"settings": {"num_prompts": None}})
    assert records.coverage_warning(tmp_path, 3) is None
