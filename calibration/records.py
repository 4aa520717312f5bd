"""Per-token record shards of a run directory (`RUN_DIR/records/shard-*.parquet`).

One row per generated token: `RECORD_COLUMNS` plus one `u_<measure>` column per
uncertainty measure. Shards are written atomically (`calibration.run_dir`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from calibration import run_dir as rd
from uhlm_jax import replay as rp

__all__ = [
    "MEASURE_PREFIX",
    "RECORD_COLUMNS",
    "coverage_warning",
    "measure_names",
    "read_records",
    "shard_problem",
    "token_records",
    "write_shard",
]

MEASURE_PREFIX = "u_"

# Column -> dtype of every record table; uncertainty columns `u_<measure>` are float32.
RECORD_COLUMNS: dict[str, str] = {
    "prompt_id": "int64",
    "position": "int32",
    "token": "int32",
    "draft": "int32",
    "beta": "float32",
    "tv": "float32",
    "accepted": "bool",
}


def measure_names(columns: Any) -> list[str]:
    """Uncertainty measures recorded in a table: the `u_<measure>` column names, unprefixed."""
    return [c[len(MEASURE_PREFIX) :] for c in columns if str(c).startswith(MEASURE_PREFIX)]


def _check_columns(df: pd.DataFrame, where: str) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where} lacks record columns {missing}; a record table needs "
            f"{list(RECORD_COLUMNS)} and at least one '{MEASURE_PREFIX}<measure>' column"
        )
    if not measure_names(df.columns):
        raise ValueError(
            f"{where} has no uncertainty column; add at least one '{MEASURE_PREFIX}<measure>' "
            "column (e.g. u_temperature_perturbation)"
        )


def write_shard(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Writes one record shard as Parquet, atomically, with the record dtypes.

    Args:
      df: one row per generated token, with `RECORD_COLUMNS` and `u_<measure>` columns.
      path: the shard file, conventionally `RUN_DIR/records/shard-00000.parquet`.

    Raises:
      ValueError: if a record column is missing.
    """
    path = Path(path)
    _check_columns(df, f"shard {str(path)!r}")
    dtypes = dict(RECORD_COLUMNS)
    dtypes.update({c: "float32" for c in df.columns if str(c).startswith(MEASURE_PREFIX)})
    table = df.astype(dtypes).reset_index(drop=True)
    rd.write_parquet(table, path)


def _reason(err: Exception) -> str:
    """The first line of an error, to keep messages to one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_table(path: Path) -> pa.Table:
    """A shard's table (OSError or `pa.ArrowException` if it cannot be read)."""
    with pq.ParquetFile(path) as f:
        return f.read()


def _ids(ids: Collection[int]) -> str:
    """Prompt ids, short: `3`, `2-5` when consecutive, else the first few."""
    ids = sorted(ids)
    if len(ids) > 1 and ids[-1] - ids[0] == len(ids) - 1:
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")


def shard_problem(
    path: str | os.PathLike, prompt_ids: Collection[int], measures: Sequence[str]
) -> str | None:
    """Why a shard cannot stand for its prompts' records, or None if it can.

    It can when it is readable Parquet, has `RECORD_COLUMNS` and a `u_<measure>` column per
    measure, and holds records of exactly `prompt_ids` (a collection records at least the
    first token of every prompt).

    Args:
      path: the shard file.
      prompt_ids: the prompts the shard should hold.
      measures: the recorded measures, unprefixed.

    Returns:
      A phrase that completes "shard ... ": "is missing", "is not readable Parquet (...)",
      "lacks columns [...]", "lacks prompts ...", "holds other prompts ...".
    """
    path = Path(path)
    if not path.is_file():
        return "is missing"
    try:
        table = _read_table(path)
    except (OSError, pa.ArrowException) as err:
        return f"is not readable Parquet ({_reason(err)})"
    wanted = [*RECORD_COLUMNS, *(MEASURE_PREFIX + m for m in measures)]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        return f"lacks columns {missing}"
    found = set(table.column("prompt_id").to_pylist())
    if lacking := set(prompt_ids) - found:
        return f"lacks prompts {_ids(lacking)}"
    if other := found - set(prompt_ids):
        return f"holds other prompts ({_ids(other)})"
    return None


def coverage_warning(run_dir: str | os.PathLike, num_prompts: int) -> str | None:
    """Warns, on stderr, when records cover fewer prompts than `config.json` says were collected.

    Args:
      run_dir: the run directory.
      num_prompts: distinct prompts in its records.

    Returns:
      The warning line (for the job's JSON output), or None when the records cover every
      prompt, or `config.json` does not count them.
    """
    config = rd.RunConfig.read_optional(run_dir)
    expected = None if config is None else config.num_prompts
    if expected is None or num_prompts >= expected:
        return None
    line = (
        f"warning: the records of {str(run_dir)!r} cover {num_prompts} of the {expected} "
        f"prompts in its {rd.CONFIG_FILE}; resume the collection (its `uhlm collect` "
        "command with --resume) to collect the rest"
    )
    print(line, file=sys.stderr)
    return line


def _read_shard(path: Path) -> pd.DataFrame:
    try:
        return _read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as err:
        raise ValueError(
            f"record shard {str(path)!r} cannot be read ({_reason(err)}); rerun the run's "
            "`uhlm collect` command with --resume to collect its prompts again"
        ) from None


def read_records(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Reads every record shard of a run, sorted by `(prompt_id, position)`.

    Args:
      run_dir: the run directory.

    Returns:
      One row per generated token, index reset.

    Raises:
      ValueError: if the directory or its shards are missing, a shard cannot be read
        (naming it), or a column is missing.
    """
    path = rd.require_run_dir(run_dir)
    shards = sorted((path / rd.RECORDS_DIR).glob(rd.SHARD_GLOB))
    if not shards:
        raise ValueError(
            f"no record shards {rd.RECORDS_DIR}/{rd.SHARD_GLOB} in run directory {str(path)!r}; "
            f"collect them first (`uhlm calibrate --out {path}`, or `--resume` an "
            "interrupted run)"
        )
    df = pd.concat([_read_shard(s) for s in shards], ignore_index=True)
    _check_columns(df, f"records of {str(path)!r}")
    return df.sort_values(["prompt_id", "position"], kind="stable").reset_index(drop=True)


def token_records(df: pd.DataFrame, measures: tuple[str, ...]) -> rp.TokenRecords:
    """Replay inputs (`uhlm_jax.replay.TokenRecords`) from a record table.

    Raises:
        ValueError: naming a measure that is not recorded.
    """
    recorded = measure_names(df.columns)
    for name in measures:
        if name not in recorded:
            raise ValueError(
                f"measure {name!r} is not in the records (no column "
                f"{MEASURE_PREFIX}{name}); recorded measures: {recorded}"
            )
    u = np.stack([df[MEASURE_PREFIX + m].to_numpy(np.float32) for m in measures])
    beta = df["beta"].to_numpy(np.float32)
    if not (np.isfinite(u).all() and np.isfinite(beta).all()):
        raise ValueError(
            "the records hold non-finite uncertainties or beta; re-collect them (NaN logits?)"
        )
    return rp.TokenRecords(
        u=jnp.asarray(u),
        beta=jnp.asarray(np.clip(beta, 0.0, 1.0)),
        accepted=jnp.asarray(df["accepted"].to_numpy(bool)),
    )
