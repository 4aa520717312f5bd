"""Sweep every mode over a grid of thresholds, measures, links and payloads.

`uhlm sweep RUN_DIR [--config sweep.toml] [flags]` evaluates, from a calibration run's
records, the product of

    thresholds × uncertainty measures          (U-HLM)
    transmit probabilities                     (Rand-HLM)
    links (presets, and custom mean SNRs) × bandwidths × top-k × bits per probability

for every mode, by **trace replay** (`uhlm_jax.replay`): per-token independence, as in the
paper's analysis, vectorized over the grid in fixed-size chunks compiled once, so grids of
millions of points run in seconds with bounded memory.

With `rollout_thresholds` (and `rollout_modes`, `rollout_draft_temperatures`,
`rollout_uncertainty_samples`, `rollout_max_temperatures`) it also runs **real rollouts** of the
run's pair on the run's calibration prompts, with the same seed and prompt ids, at those
points (U-HLM thresholds as one vmapped rollout, compiled once), and reports, per metric,
replay against rollout: the difference and its Monte Carlo error, a jackknife standard
error over prompts (prompts are paired, so the error is that of the difference). They
differ where a skip changes what follows: replay keeps the recorded trajectory, a rollout
that skips a draft the LLM would have rejected continues from another token, with other
uncertainties and rejection probabilities.

Outputs, written atomically into RUN_DIR:

* `sweep.parquet`: the tidy table, one row per grid point and metric, with columns
  `source` (replay or rollout), `point`, `mode`, `measure`, `threshold`,
  `transmit_probability`, `link`, `snr_db`, `bandwidth_hz`, `top_k` (0: full
  distribution), `bits_per_prob`, `metric`, `value`, `se` (NaN for replay); rollout
  rows add `draft_temperature`, `num_samples` and `max_temperature` (`K` and `θ_max` of
  the temperature perturbation), axes that replay cannot vary: the records hold one;
* `sweep_comparison.parquet` (with rollouts): per rollout point and metric, `replay`,
  `rollout`, `difference`, `se`, `z`;
* `sweep.json`: the configuration, grid sizes and timings.

The TOML file holds the `Config` fields (lists for the axes); flags override it. Example:

    thresholds = [0.0, 0.1, 0.2, 0.3]
    measures = ["temperature_perturbation", "entropy"]
    presets = ["good", "poor"]
    snr_db = [0, 10, 20]
    rollout_thresholds = [0.2, 0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import uhlm_jax
from calibration import records
from calibration import run_dir as rd
from calibration.prompts import collection_source, read_prompts
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console, metrics, pricing
from uhlm_jax import replay as rp
from uhlm_jax import replay_table as rt
from uhlm_jax.models.registry import DType
from uhlm_jax.modes import Mode, Transmission, transmit_weight
from uhlm_jax.uncertainty import (
    DEFAULT_MEASURE_NAMES,
    DEFAULT_MEASURES,
    DEFAULT_TEMPERATURE_PERTURBATION,
    TemperaturePerturbation,
)

__all__ = [
    "Config",
    "Result",
    "add_arguments",
    "main",
    "run",
]

# The calibration job records the default measures; their temperature perturbation is the
# paper's (K = 20, θ_max = 2).
DEFAULT_TP = DEFAULT_TEMPERATURE_PERTURBATION
# Metrics compared between replay and rollout (costs follow from the transmission rate).
COMPARED_METRICS = (
    "transmission_rate",
    "acceptance_rate",
    "true_skip_rate",
    "risk_per_token",
    "risk_conditional",
    "mean_beta",
    "llm_agreement",
    "throughput_tokens_per_s",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """A sweep of a calibration run.

    Attributes:
        run_dir: the calibration run directory (records, `config.json`).
        thresholds: U-HLM thresholds (skip when `u ≤ threshold`).
        measures: uncertainty measures U-HLM gates on (record columns `u_<measure>`);
            empty: every recorded measure.
        modes: modes to evaluate.
        transmit_probabilities: Rand-HLM transmit probabilities.
        presets: named links.
        snr_db: custom mean SNRs in dB, each a link with `rt.SNR_BASE_PRESET`'s other
            parameters (links are the presets followed by these).
        bandwidths_hz: link bandwidths; empty keeps each link's own (the presets' SNR
            then follows the bandwidth; a custom SNR stays).
        top_k: CU-HLM uplink truncation `k`; 0 uploads the full distribution.
        bits_per_prob: bits per uploaded probability.
        slm_model, slm_device, llm_model, llm_device: the cost profile (independent of
            the models that made the records).
        cost_profile_name: `named` prices `slm_model` and `llm_model`; `pair` prices the
            pair recorded in the run's `config.json`, with its V on the uplink.
        chunk_size: grid points per vectorized chunk (bounds memory).
        rollout_thresholds: U-HLM thresholds to also run as real rollouts.
        rollout_modes: other modes to run as real rollouts.
        rollout_measure: the measure real U-HLM rollouts gate on.
        rollout_draft_temperatures: SLM draft temperatures of the U-HLM rollouts (a
            product with `rollout_thresholds`, one vmapped rollout); empty: the
            calibration's. Records hold one temperature, so replay compares only there.
        rollout_uncertainty_samples: temperature-perturbation `K` of the U-HLM rollouts
            (one compiled rollout per value); empty: the calibration's (20).
        rollout_max_temperatures: temperature-perturbation `θ_max` (one rollout per
            value); empty: the calibration's (2).
        rollout_transmit_probability: Rand-HLM's probability in rollouts.
        rollout_link: the link whose costs the comparison reports.
        max_rollout_prompts: run rollouts on the first this many calibration prompts.
        prompts: the prompt file, if not where `config.json` says.
        dtype: parameter dtype of the rollouts' models; None: the run's.
    """

    run_dir: str
    thresholds: tuple[float, ...] = rt.DEFAULT_THRESHOLDS
    measures: tuple[str, ...] = ()
    modes: tuple[Mode, ...] = tuple(Mode)
    transmit_probabilities: tuple[float, ...] = rt.DEFAULT_TRANSMIT_PROBABILITIES
    presets: tuple[ch.LinkPreset, ...] = tuple(ch.LinkPreset)
    snr_db: tuple[float, ...] = rt.DEFAULT_SNR_DB
    bandwidths_hz: tuple[float, ...] = ()
    top_k: tuple[int, ...] = (rp.FULL_DISTRIBUTION,)
    bits_per_prob: tuple[float, ...] = (16.0,)
    slm_model: ch.ModelSize = ch.ModelSize.TINYLLAMA_1_1B
    slm_device: ch.Device = ch.Device.PHONE_SOC
    llm_model: ch.ModelSize = ch.ModelSize.LLAMA_2_7B
    llm_device: ch.Device = ch.Device.DATACENTER_GPU
    cost_profile_name: str = pricing.NAMED_COSTS
    chunk_size: int = 4096
    rollout_thresholds: tuple[float, ...] = ()
    rollout_modes: tuple[Mode, ...] = ()
    rollout_measure: str = "temperature_perturbation"
    rollout_draft_temperatures: tuple[float, ...] = ()
    rollout_uncertainty_samples: tuple[int, ...] = ()
    rollout_max_temperatures: tuple[float, ...] = ()
    rollout_transmit_probability: float = 0.5
    rollout_link: ch.LinkPreset = ch.LinkPreset.MEDIUM
    max_rollout_prompts: int | None = None
    prompts: str | None = None
    dtype: DType | None = None

    def __post_init__(self):
        self.grid()  # validates the grid's axes
        check_rollout(self)
        if self.cost_profile_name != pricing.NAMED_COSTS and (
            self.slm_model is not Config.slm_model or self.llm_model is not Config.llm_model
        ):
            raise ValueError(
                "slm_model and llm_model choose the models of the 'named' cost profile; the "
                f"{self.cost_profile_name!r} cost profile takes them from the run's pair"
            )
        profile = self.cost_profile()
        vocab = profile.vocab_size
        if any(k < 0 or k > vocab for k in self.top_k):
            raise ValueError(
                f"top_k={self.top_k!r}: each k must lie in [1, {vocab}] (the vocabulary of "
                f"{profile.llm.model_profile.name}), or be 0 for no truncation"
            )
        if any(not d > 0 for d in self.rollout_draft_temperatures + self.rollout_max_temperatures):
            raise ValueError(
                "rollout_draft_temperatures and rollout_max_temperatures must be > 0, got "
                f"{self.rollout_draft_temperatures!r} and {self.rollout_max_temperatures!r}"
            )
        if any(k < 1 for k in self.rollout_uncertainty_samples):
            raise ValueError(
                f"rollout_uncertainty_samples={self.rollout_uncertainty_samples!r}: K must be >= 1"
            )
        if (self.rollout_uncertainty_samples or self.rollout_max_temperatures) and (
            self.rollout_measure != DEFAULT_TP.name
        ):
            raise ValueError(
                "rollout_uncertainty_samples and rollout_max_temperatures set the "
                f"'{DEFAULT_TP.name}' measure; use rollout_measure = '{DEFAULT_TP.name}'"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1")
        if self.max_rollout_prompts is not None and self.max_rollout_prompts < 2:
            raise ValueError(
                f"max_rollout_prompts={self.max_rollout_prompts} must be >= 2 (the Monte "
                "Carlo error is estimated across prompts)"
            )

    def grid(self) -> rt.ReplayGrid:
        """The replayed grid."""
        return rt.ReplayGrid(
            thresholds=self.thresholds,
            measures=self.measures,
            modes=self.modes,
            transmit_probabilities=self.transmit_probabilities,
            presets=self.presets,
            snr_db=self.snr_db,
            bandwidths_hz=self.bandwidths_hz,
            top_k=self.top_k,
            bits_per_prob=self.bits_per_prob,
        )

    def cost_profile(self, preset: ch.LinkPreset = ch.LinkPreset.MEDIUM) -> ch.CostProfile:
        """The cost profile (the grid point replaces its link and payload)."""
        return pricing.Pricing(
            preset=preset,
            slm_model=self.slm_model,
            slm_device=self.slm_device,
            llm_model=self.llm_model,
            llm_device=self.llm_device,
            pair=self.pair_profile(),
        ).cost_profile()

    def pair_profile(self) -> ch.PairProfile | None:
        """The run's pair if `cost_profile_name` is `pair`, else None."""
        return rd.pair_profile(self.run_dir, self.cost_profile_name)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields (enums by value)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [v.value if isinstance(v, Mode) else _enum_name(v) for v in value]
            else:
                value = _enum_name(value)
            out[f.name] = value
        return out


def _enum_name(value: Any) -> Any:
    if isinstance(value, Mode):
        return value.value
    if isinstance(value, ch.LinkPreset):
        return value.name.lower()
    if isinstance(value, ch.ModelSize | ch.Device):
        return value.value.name
    return value


def check_rollout(cfg: Config) -> None:
    """Validates the rollout points of `cfg` as its grid validates the replayed ones."""
    rt.check_measure(cfg.rollout_measure)
    for mode in cfg.rollout_modes:
        rt.check_mode(mode)
    rt.check_preset(cfg.rollout_link)
    for t in cfg.rollout_thresholds:
        rt.check_threshold(t)
    rt.check_transmit_probability(cfg.rollout_transmit_probability)


@dataclasses.dataclass(frozen=True)
class Result:
    """What a sweep wrote.

    Attributes:
        table: the tidy table (`sweep.parquet`).
        comparison: replay against rollout (empty without rollouts).
        num_points: replayed grid points.
        replay_seconds: wall time of the replay (including compilation).
        paths: files written.
    """

    table: pd.DataFrame
    comparison: pd.DataFrame
    num_points: int
    replay_seconds: float
    paths: tuple[Path, ...]


# ------------------------------------------------------------------- real rollouts


def _prompt_sums_replay(
    df: pd.DataFrame, prompt_ids: np.ndarray, mode: Mode, u_column: str, threshold: float,
    probability: float,
) -> metrics.TokenSums:
    """Per-prompt replay sums of the calibration records, `[P]` leaves in `prompt_ids` order."""
    sub = df[df["prompt_id"].isin(prompt_ids)]
    weight = jax.vmap(transmit_weight, in_axes=(None, 0, None, None))(
        mode, jnp.asarray(sub[u_column].to_numpy(np.float32)), jnp.float32(threshold),
        jnp.float32(probability),
    )
    segment = pd.Index(prompt_ids).get_indexer(sub["prompt_id"])
    return metrics.token_sums(
        weight, np.clip(sub["beta"].to_numpy(np.float32), 0, 1), sub["accepted"].to_numpy(bool),
        segment_ids=jnp.asarray(segment), num_segments=len(prompt_ids),
    )


def _prompt_sums_rollout(records_: Any) -> metrics.TokenSums:
    """Per-prompt sums of a rollout's `Records` (`[n, b]` leaves) in row order."""
    return metrics.token_sums(
        records_.transmitted, records_.beta, records_.accepted, records_.valid
    )


def _estimate(mode: Mode, sums: metrics.TokenSums, base: ch.CostProfile, point: rp.GridPoints):
    """Pooled metrics and their leave-one-prompt-out values."""
    total = metrics.TokenSums(*(jnp.sum(x) for x in sums))
    loo = rp.leave_one_out(sums)
    pooled = rp.point_metrics(mode, total, base, point)
    jack = jax.vmap(rp.point_metrics, in_axes=(None, 0, None, None))(mode, loo, base, point)
    return pooled, jack


def _z_score(difference: float, se: float) -> float:
    """`difference / se`; 0 for an exact match, NaN when undefined, ±inf for a certain gap."""
    if not math.isfinite(difference) or math.isnan(se):
        return float("nan")
    if se > 0:
        return difference / se
    return 0.0 if difference == 0 else math.copysign(math.inf, difference)


def _rollout_prompts(cfg: Config, settings: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    # The collection's own settings say which file and split it read.
    recorded_path, split = collection_source(settings.get("prompts"), settings.get("split"))
    path = cfg.prompts or recorded_path
    if not Path(path).is_file():
        raise ValueError(
            f"the calibration prompt file {path!r} (from config.json) is not found; pass "
            "--prompts FILE with the prompts the run was collected on"
        )
    first = int(settings.get("first_prompt", 0))
    prompts = read_prompts(path, split)[first:]
    if settings.get("num_prompts") is not None:
        prompts = prompts[: int(settings["num_prompts"])]
    if cfg.max_rollout_prompts is not None:
        prompts = prompts[: cfg.max_rollout_prompts]
    if len(prompts) < 2:
        raise ValueError("rollouts need at least 2 prompts to estimate a Monte Carlo error")
    ids = np.arange(first, first + len(prompts))
    return [p.text for p in prompts], ids


def rollout_frames(
    cfg: Config, df: pd.DataFrame, run_config: rd.RunConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Real rollouts at the chosen points, and their comparison with replay."""
    from uhlm_jax.pair import load_pair
    from uhlm_jax.rollout import RolloutConfig, RolloutParams, run_rollout

    texts, ids = _rollout_prompts(cfg, run_config.settings)
    pair = load_pair(run_config.pair, dtype=cfg.dtype or run_config.dtype)
    gate = DEFAULT_MEASURE_NAMES.index(cfg.rollout_measure)
    temperatures = {
        "draft_temperature": run_config.draft_temperature,
        "llm_temperature": run_config.llm_temperature,
    }
    max_new = run_config.max_new_tokens
    seed = run_config.seed
    base = cfg.cost_profile(cfg.rollout_link)
    link = base.link
    calibration_temperature = temperatures["draft_temperature"]
    draft_temperatures = cfg.rollout_draft_temperatures or (calibration_temperature,)
    samples = cfg.rollout_uncertainty_samples or (DEFAULT_TP.num_samples,)
    max_temperatures = cfg.rollout_max_temperatures or (float(DEFAULT_TP.max_temperature),)
    jobs: list[dict[str, Any]] = []
    nan = float("nan")
    if cfg.rollout_thresholds:
        grid = list(itertools.product(cfg.rollout_thresholds, draft_temperatures))
        for k_samples, theta in itertools.product(samples, max_temperatures):
            # The gate measure's slot keeps its index, so its keys (and, at the
            # calibration's K and θ_max, its values) are those of the calibration run.
            measures = tuple(
                TemperaturePerturbation(num_samples=k_samples, max_temperature=theta)
                if i == gate and (cfg.rollout_uncertainty_samples or
                                  cfg.rollout_max_temperatures) else m
                for i, m in enumerate(DEFAULT_MEASURES)
            )
            out = run_rollout(
                pair, texts,
                RolloutConfig(mode=Mode.UHLM, max_new_tokens=max_new, gate_measure=gate,
                              measures=measures),
                # Every leaf carries the grid axis (the sweep maps over all of them).
                RolloutParams.create(
                    threshold=np.array([t for t, _ in grid]),
                    draft_temperature=np.array([d for _, d in grid]),
                    llm_temperature=np.full(len(grid), temperatures["llm_temperature"]),
                    transmit_probability=np.full(len(grid), cfg.rollout_transmit_probability),
                ),
                seed=seed, prompt_ids=ids,
            )
            for i, (t, d) in enumerate(grid):
                jobs.append({
                    "mode": Mode.UHLM, "threshold": t, "transmit_probability": nan,
                    "draft_temperature": d, "num_samples": k_samples, "max_temperature": theta,
                    "records": jax.tree.map(lambda x, i=i: x[i], out.records),
                    "comparable": d == calibration_temperature
                    and k_samples == DEFAULT_TP.num_samples
                    and theta == float(DEFAULT_TP.max_temperature),
                })
    for mode in cfg.rollout_modes:
        if mode is Mode.UHLM:
            continue
        out = run_rollout(
            pair, texts, RolloutConfig(mode=mode, max_new_tokens=max_new),
            RolloutParams.create(
                transmit_probability=cfg.rollout_transmit_probability, **temperatures
            ),
            seed=seed, prompt_ids=ids,
        )
        jobs.append({
            "mode": mode, "threshold": nan,
            "transmit_probability": cfg.rollout_transmit_probability
            if mode.policy.transmission is Transmission.RANDOM else nan,
            "draft_temperature": calibration_temperature, "num_samples": nan,
            "max_temperature": nan, "records": out.records, "comparable": True,
        })

    rows, comparison = [], []
    u_column = records.MEASURE_PREFIX + cfg.rollout_measure
    for k, job in enumerate(jobs):
        mode, t, p = job["mode"], job["threshold"], job["transmit_probability"]
        point = rp.GridPoints.create(
            threshold=0.0 if math.isnan(t) else t,
            transmit_probability=0.0 if math.isnan(p) else p,
            snr_db=link.mean_snr_db, bandwidth_hz=link.bandwidth_hz,
        )
        ro_value, ro_loo = _estimate(mode, _prompt_sums_rollout(job["records"]), base, point)
        info = {
            "point": k,
            "mode": mode.value,
            "measure": cfg.rollout_measure
            if mode.policy.transmission is Transmission.UNCERTAIN else None,
            "threshold": t,
            "transmit_probability": p,
            "link": cfg.rollout_link.name.lower(),
            "snr_db": float(link.mean_snr_db),
            "bandwidth_hz": float(link.bandwidth_hz),
            "top_k": rp.FULL_DISTRIBUTION,
            "bits_per_prob": float(base.bits_per_prob),
            "draft_temperature": job["draft_temperature"],
            "num_samples": job["num_samples"],
            "max_temperature": job["max_temperature"],
        }
        for metric in rp.ReplayMetrics._fields:
            value = float(getattr(ro_value, metric))
            se = float(rp.jackknife_se(getattr(ro_loo, metric)))
            rows.append({**info, "metric": metric, "value": value, "se": se})
        if not job["comparable"]:
            continue
        rp_value, rp_loo = _estimate(
            mode,
            _prompt_sums_replay(df, ids, mode, u_column, 0.0 if math.isnan(t) else t,
                                0.0 if math.isnan(p) else p),
            base, point,
        )
        for metric in COMPARED_METRICS:
            value = float(getattr(ro_value, metric))
            replay_value = float(getattr(rp_value, metric))
            diff_se = float(rp.jackknife_se(getattr(ro_loo, metric) - getattr(rp_loo, metric)))
            difference = value - replay_value
            comparison.append(
                {
                    **info,
                    "metric": metric,
                    "replay": replay_value,
                    "rollout": value,
                    "difference": difference,
                    "se": diff_se,
                    "z": _z_score(difference, diff_se),
                    "num_prompts": len(ids),
                }
            )
    table = pd.DataFrame(rows)
    table.insert(0, "source", "rollout")
    return table, pd.DataFrame(comparison)


# ------------------------------------------------------------------------- the job


def run(cfg: Config, progress: bool = True) -> Result:
    """Replays the grid (and runs the chosen rollouts) and writes the tables."""
    run_dir = rd.require_run_dir(cfg.run_dir)
    df = records.read_records(run_dir)
    measures = cfg.measures or tuple(records.measure_names(df.columns))
    tokens = records.token_records(df, measures)
    start = time.perf_counter()
    table = rt.replay_table(
        cfg.grid(), tokens, measures, cfg.cost_profile(), cfg.chunk_size, progress
    )
    replay_seconds = time.perf_counter() - start
    comparison = pd.DataFrame()
    if cfg.rollout_thresholds or cfg.rollout_modes:
        if cfg.rollout_measure not in records.measure_names(df.columns):
            raise ValueError(
                f"rollout measure {cfg.rollout_measure!r} is not in the records; recorded: "
                f"{records.measure_names(df.columns)}"
            )
        rollout_table, comparison = rollout_frames(cfg, df, rd.RunConfig.read(run_dir))
        rollout_table["point"] += int(table["point"].max()) + 1
        table = pd.concat([table, rollout_table], ignore_index=True)
    paths = [run_dir / rd.SWEEP_FILE]
    rd.write_parquet(table, paths[0])
    if len(comparison):
        paths.append(run_dir / rd.SWEEP_COMPARISON_FILE)
        rd.write_parquet(comparison, paths[-1])
    num_points = int(table.loc[table["source"] == "replay", "point"].nunique())
    rd.write_json(
        run_dir / rd.SWEEP_SUMMARY_FILE,
        {
            "job": "sweep",
            "config": cfg.as_json(),
            "measures": list(measures),
            "num_tokens": len(df),
            "num_prompts": int(df["prompt_id"].nunique()),
            "num_replay_points": num_points,
            "replay_seconds": replay_seconds,
            "versions": {"uhlm_jax": uhlm_jax.__version__, "jax": jax.__version__},
            "files": [p.name for p in paths],
        },
    )
    paths.append(run_dir / rd.SWEEP_SUMMARY_FILE)
    return Result(
        table=table,
        comparison=comparison,
        num_points=num_points,
        replay_seconds=replay_seconds,
        paths=tuple(paths),
    )


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm sweep` options (lists: comma-separated, or START:STOP:NUM)."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        positional=("run_dir",), names={"cost_profile_name": "cost_profile"},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm sweep`; returns the exit status."""
    cfg = cli_config.config_from_args(Config, args)
    result = run(cfg, progress=not args.quiet)
    summary = {
        "num_points": result.num_points,
        "replay_seconds": round(result.replay_seconds, 3),
        "rows": len(result.table),
        "files": [str(p) for p in result.paths],
    }
    if len(result.comparison):
        summary["max_abs_z"] = float(np.nanmax(np.abs(result.comparison["z"])))
    if args.json:
        print(console.json_text(summary))
    else:
        print(
            f"replayed {result.num_points} grid points in {result.replay_seconds:.2f} s; "
            f"wrote {', '.join(p.name for p in result.paths)} to {cfg.run_dir}"
        )
        if len(result.comparison):
            cols = ["mode", "threshold", "metric", "replay", "rollout", "difference", "se", "z"]
            print(result.comparison[cols].to_string(
                index=False, float_format=lambda x: console.number(x, ".4f")))
    return 0
