"""Files of a calibration run directory: per-token record shards and JSON/NPZ artifacts.

A run directory holds

    RUN_DIR/config.json                 how the records were made (models, seeds, versions)
    RUN_DIR/records/shard-*.parquet     one row per generated token (`RECORD_COLUMNS`
                                        plus one `u_<measure>` column per measure)
    RUN_DIR/fit.json, posterior_*.npz   written by `uhlm fit`
    RUN_DIR/thresholds.json             written by `uhlm threshold --run`

Every file is written atomically: to a temporary file in the same folder, flushed
to disk, then renamed over the target with `os.replace`. A reader therefore sees
either the old file or the new one, never a partial write, and a failure leaves
the previous file untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CONFIG_FILE",
    "MEASURE_PREFIX",
    "RECORDS_DIR",
    "RECORD_COLUMNS",
    "SHARD_GLOB",
    "measure_names",
    "read_json",
    "read_records",
    "require_run_dir",
    "write_json",
    "write_npz",
    "write_shard",
]

CONFIG_FILE = "config.json"
RECORDS_DIR = "records"
SHARD_GLOB = "shard-*.parquet"
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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary sibling of `path`, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Returns `run_dir` as a Path, or raises ValueError if it is not a directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(
            f"run directory {str(path)!r} does not exist; collect records into it first "
            f"(`uhlm calibrate --out {path}`) or pass an existing run directory"
        )
    return path


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
    _atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


def read_records(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Reads every record shard of a run, sorted by `(prompt_id, position)`.

    Args:
      run_dir: the run directory.

    Returns:
      One row per generated token, index reset.

    Raises:
      ValueError: if the directory or its shards are missing, or a column is.
    """
    path = require_run_dir(run_dir)
    shards = sorted((path / RECORDS_DIR).glob(SHARD_GLOB))
    if not shards:
        raise ValueError(
            f"no record shards {RECORDS_DIR}/{SHARD_GLOB} in run directory {str(path)!r}; "
            f"collect them first (`uhlm calibrate --out {path}`, or `--resume` an "
            "interrupted run)"
        )
    df = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    _check_columns(df, f"records of {str(path)!r}")
    return df.sort_values(["prompt_id", "position"], kind="stable").reset_index(drop=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically; NaN and ±inf are not allowed."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file, raising ValueError naming the file if it is corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({err}); delete it and rerun the job that writes it"
        ) from err


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes arrays to an `.npz` file, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    _atomic_write(Path(path), write)
