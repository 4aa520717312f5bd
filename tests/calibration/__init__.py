"""Tests of the calibration jobs, and the synthetic record tables they share."""

import numpy as np
import pandas as pd

from calibration import records
from calibration import run_dir as rd

# Temperature perturbation with K draws takes the values k/K.
NUM_PERTURBATIONS = 20


def hurdle_beta(
    rng: np.random.Generator,
    u: np.ndarray,
    positive_slope: float,
    positive_intercept: float,
    mean_slope: float,
    mean_intercept: float,
    concentration: float,
) -> np.ndarray:
    """β from the hurdle model: Bernoulli(σ(c·u + e)) times Beta with mean σ(f·u + g)."""
    p = 1 / (1 + np.exp(-(positive_slope * u + positive_intercept)))
    m = 1 / (1 + np.exp(-(mean_slope * u + mean_intercept)))
    positive = rng.uniform(size=u.shape) < p
    value = rng.beta(m * concentration, (1 - m) * concentration)
    return np.where(positive, np.clip(value, 1e-6, 1.0), 0.0)


def synthetic_records(
    rng: np.random.Generator,
    num_prompts: int,
    tokens_per_prompt: int,
    hurdle_params: tuple[float, float, float, float, float] = (4.0, -2.0, 2.0, -1.5, 8.0),
) -> pd.DataFrame:
    """A record table whose β follows the hurdle model in u = k/K, k ~ Binomial(K, ·).

    Each prompt has its own typical uncertainty (a Beta(1, 3) draw) so prompts
    differ, as real prompts do.
    """
    n = num_prompts * tokens_per_prompt
    prompt_level = rng.beta(1.0, 3.0, num_prompts)
    prompt_id = np.repeat(np.arange(num_prompts, dtype=np.int64) * 3 + 7, tokens_per_prompt)
    k = rng.binomial(NUM_PERTURBATIONS, np.repeat(prompt_level, tokens_per_prompt))
    u = k / NUM_PERTURBATIONS
    beta = hurdle_beta(rng, u, *hurdle_params)
    return pd.DataFrame(
        {
            "prompt_id": prompt_id,
            "position": np.tile(np.arange(tokens_per_prompt, dtype=np.int32), num_prompts),
            "token": rng.integers(0, 100, n).astype(np.int32),
            "draft": rng.integers(0, 100, n).astype(np.int32),
            "beta": beta.astype(np.float32),
            "tv": np.clip(beta + 0.05, 0, 1).astype(np.float32),
            "accepted": rng.uniform(size=n) >= beta,
            "u_temperature_perturbation": u.astype(np.float32),
            "u_entropy": (3.0 * u + rng.uniform(0, 0.1, n)).astype(np.float32),
        }
    )


def write_run(run_dir, df: pd.DataFrame, num_shards: int = 2) -> None:
    """Writes a run directory: `config.json` and `num_shards` shuffled record shards."""
    rd.write_json(run_dir / rd.CONFIG_FILE, {"synthetic": True})
    order = np.random.default_rng(0).permutation(len(df))
    for i, part in enumerate(np.array_split(order, num_shards)):
        records.write_shard(df.iloc[part], run_dir / rd.RECORDS_DIR / f"shard-{i:05d}.parquet")
