"""Per-token record shards of a run directory (`RUN_DIR/records/shard-*.parquet`).

One row per generated token: `RECORD_COLUMNS` plus one `u_<measure>` column per
uncertainty measure. Shards are written atomically (`calibration.run_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd

from calibration import run_dir as rd
from uhlm_jax import replay as rp

__all__ = [
    "MEASURE_PREFIX",
    "RECORD_COLUMNS",
    "measure_names",
    "read_records",
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


def read_records(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Reads every record shard of a run, sorted by `(prompt_id, position)`.

    Args:
      run_dir: the run directory.

    Returns:
      One row per generated token, index reset.

    Raises:
      ValueError: if the directory or its shards are missing, or a column is.
    """
    path = rd.require_run_dir(run_dir)
    shards = sorted((path / rd.RECORDS_DIR).glob(rd.SHARD_GLOB))
    if not shards:
        raise ValueError(
            f"no record shards {rd.RECORDS_DIR}/{rd.SHARD_GLOB} in run directory {str(path)!r}; "
            f"collect them first (`uhlm calibrate --out {path}`, or `--resume` an "
            "interrupted run)"
        )
    df = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
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
