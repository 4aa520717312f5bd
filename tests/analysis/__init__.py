"""Shared fixtures of the analysis tests."""

import numpy as np
import pandas as pd

from calibration import collect, records
from calibration import run_dir as rd
from calibration.prompts import embedded_prompts_path


def write_synthetic_run(run_dir, prompts=12, tokens=20, seed=0):
    """A run directory whose records have a linear u → β link (β ≈ 0.8 u − 0.06)."""
    rng = np.random.default_rng(seed)
    n = prompts * tokens
    u = rng.binomial(20, rng.beta(1, 3, n)) / 20
    beta = np.clip(0.8 * u - 0.06 + rng.normal(0, 0.1, n), 0, 1)
    df = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(prompts), tokens),
            "position": np.tile(np.arange(tokens), prompts),
            "token": rng.integers(0, 50, n),
            "draft": rng.integers(0, 50, n),
            "beta": beta,
            "tv": beta,
            "accepted": rng.random(n) > beta,
            "u_temperature_perturbation": u,
            "u_entropy": np.clip(u + rng.normal(0, 0.2, n), 0, None),
        }
    )
    records.write_shard(df, run_dir / rd.RECORDS_DIR / "shard-000000.parquet")
    rd.write_json(run_dir / rd.CONFIG_FILE, {"settings": {"pair": "toy", "seed": 0}})
    return records.read_records(run_dir)


def collect_toy_run(run_dir, max_new_tokens, seed=0):
    """A real calibration run of the toy pair: 8 shipped prompts in one batch."""
    collect.run(
        collect.Config(
            pair="toy",
            prompts=embedded_prompts_path(),
            out=str(run_dir),
            num_prompts=8,
            max_new_tokens=max_new_tokens,
            batch_size=8,
            seed=seed,
        )
    )
    return run_dir
