"""Collect per-token calibration records of a model pair (HLM mode, every token verified).

The job runs the pair over a prompt file in batches. Each batch's records go to one
Parquet shard, written atomically; after each shard the job state (the next batch) is
saved as an orbax checkpoint. `--resume` continues from the last checkpoint: a batch whose
shard was written but not checkpointed is run again and its shard replaced, so no record
is lost or duplicated. Keys depend only on the seed, the prompt id and the step, so a
resumed run writes the same records as an uninterrupted one.

Scale-out: every batch is placed on a `jax.sharding.Mesh` over all visible devices (one
`data` axis), so the rows of a batch run in parallel on several GPUs or TPU cores. For a
multi-host TPU pod slice, start the same command on every host with `--distributed`
(which calls `jax.distributed.initialize()`); only process 0 writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pyarrow.parquet as pq
from jax.sharding import Mesh
from tqdm import tqdm

from calibration.prompts import embedded_prompts_path, read_prompts
from calibration.records import (
    CONFIG_FILE,
    MEASURE_PREFIX,
    RECORDS_DIR,
    read_json,
    write_json,
    write_shard,
)
from uhlm_jax.modes import Mode
from uhlm_jax.pair import DEFAULT_PAIR, known_pairs, load_pair
from uhlm_jax.rollout import Records, RolloutConfig, RolloutParams, run_rollout

CHECKPOINT_DIR = "checkpoints"
_VERSIONED_PACKAGES = ("uhlm-jax", "jax", "jaxlib", "flax", "numpyro", "orbax-checkpoint")


@dataclasses.dataclass(frozen=True)
class Config:
    """A calibration collection run.

    Attributes:
        pair: a named pair (`uhlm_jax.pair.known_pairs()`) or `"SLM,LLM"` (two models by
            name or path, see `uhlm_jax.pair.load_pair`).
        prompts: JSON Lines prompt file; None uses the shipped prompts.
        split: use only prompts of this split; None uses all. The shipped prompts default
            to their "calibration" split.
        out: the run directory.
        num_prompts: use the first this many prompts (None: all).
        first_prompt: skip this many prompts first (to keep calibration and evaluation
            prompts disjoint).
        max_new_tokens: tokens generated per prompt at most.
        batch_size: prompts per batch; a multiple of the device count.
        seed: base seed of all keys.
        draft_temperature: SLM draft temperature.
        llm_temperature: LLM temperature.
        resume: continue an interrupted run in `out`.
    """

    pair: str
    prompts: str | None
    out: str
    split: str | None = None
    num_prompts: int | None = None
    first_prompt: int = 0
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0
    draft_temperature: float = 1.0
    llm_temperature: float = 1.0
    resume: bool = False

    def __post_init__(self):
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}.")
        if self.first_prompt < 0:
            raise ValueError(f"first_prompt must be >= 0, got {self.first_prompt}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        for name in ("draft_temperature", "llm_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")

    def prompts_path(self) -> str:
        return embedded_prompts_path() if self.prompts is None else self.prompts

    def settings(self) -> dict:
        """What determines the records (everything but `out` and `resume`)."""
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if k not in ("out", "resume")}


@dataclasses.dataclass(frozen=True)
class Result:
    """Where the records went and how many there are."""

    run_dir: Path
    num_shards: int
    num_tokens: int


def records_frame(
    records: Records, prompt_ids: np.ndarray, measure_names: tuple[str, ...], rows: int
) -> pd.DataFrame:
    """One row per valid token of the first `rows` columns of `records` (`[n, b]`)."""
    valid = records.valid[:, :rows]
    steps, columns = np.nonzero(valid)
    frame = {
        "prompt_id": prompt_ids[:rows][columns].astype(np.int64),
        "position": steps.astype(np.int32),
        "token": records.token[steps, columns],
        "draft": records.draft[steps, columns],
        "beta": records.beta[steps, columns],
        "tv": records.tv[steps, columns],
        "accepted": records.accepted[steps, columns],
    }
    for m, name in enumerate(measure_names):
        frame[MEASURE_PREFIX + name] = records.uncertainty[steps, columns, m]
    return pd.DataFrame(frame).sort_values(["prompt_id", "position"], kind="stable")


def _versions() -> dict:
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _describe(config) -> dict:
    """A model config as JSON-ready fields (enums by value)."""
    return {
        k: v.value if isinstance(v, enum.Enum) else v for k, v in dataclasses.asdict(config).items()
    }


def _check_resumable(run_dir: Path, cfg: Config) -> None:
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise ValueError(
            f"Cannot resume: run directory {str(run_dir)!r} does not exist; drop --resume "
            "to start a new run."
        )
    if not config_path.is_file():
        raise ValueError(
            f"Cannot resume: {str(config_path)!r} is missing, so {str(run_dir)!r} is not a "
            "collection run; start a new run in another directory."
        )
    old = read_json(config_path).get("settings", {})
    new = json.loads(json.dumps(cfg.settings()))
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"Cannot resume {str(run_dir)!r}: it was made with different settings ({detail}). "
            "Resume with the original settings, or start a new run in another directory."
        )


def run(cfg: Config) -> Result:
    """Collects records into `cfg.out`; see the module docstring."""
    run_dir = Path(cfg.out).absolute()
    prompts = read_prompts(cfg.prompts_path(), cfg.split)[cfg.first_prompt :]
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    if not prompts:
        raise ValueError(
            f"No prompts left in {cfg.prompts_path()} after skipping {cfg.first_prompt}; lower "
            "--first-prompt."
        )
    num_devices = jax.device_count()
    if cfg.batch_size % num_devices:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not a multiple of the {num_devices} devices; "
            f"use --batch-size {num_devices * max(1, cfg.batch_size // num_devices)}."
        )
    if cfg.resume:
        _check_resumable(run_dir, cfg)
    elif (run_dir / CONFIG_FILE).exists():
        raise ValueError(
            f"{str(run_dir)!r} already holds a run; pass --resume to continue it, or choose "
            "another --out."
        )

    pair = load_pair(cfg.pair)
    config = RolloutConfig(mode=Mode.HLM, max_new_tokens=cfg.max_new_tokens)
    params = RolloutParams.create(
        draft_temperature=cfg.draft_temperature, llm_temperature=cfg.llm_temperature
    )
    writer = jax.process_index() == 0
    if writer and not cfg.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / CONFIG_FILE,
            {
                "job": "collect",
                "settings": cfg.settings(),
                "pair": {
                    "name": pair.name,
                    "slm": _describe(pair.slm.config),
                    "llm": _describe(pair.llm.config),
                },
                "measures": list(config.measure_names),
                "num_devices": num_devices,
                "versions": _versions(),
            },
        )
    manager = ocp.CheckpointManager(
        run_dir / CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    next_batch = 0
    if cfg.resume and manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.JsonRestore())
        next_batch = int(state["next_batch"])

    mesh = Mesh(np.array(jax.devices()), ("data",))
    starts = range(0, len(prompts), cfg.batch_size)
    num_tokens = 0
    progress = tqdm(
        total=len(starts), initial=next_batch, unit="batch", desc="collect", disable=None
    )
    for batch, start in enumerate(starts):
        if batch < next_batch:
            continue
        chunk = prompts[start : start + cfg.batch_size]
        rows = len(chunk)
        # Pad a short last batch with copies so every batch has one shape; drop them after.
        texts = [p.text for p in chunk] + [chunk[-1].text] * (cfg.batch_size - rows)
        ids = np.arange(start + cfg.first_prompt, start + cfg.first_prompt + cfg.batch_size)
        output = run_rollout(pair, texts, config, params, seed=cfg.seed, prompt_ids=ids, mesh=mesh)
        frame = records_frame(output.records, output.prompt_ids, config.measure_names, rows)
        num_tokens += len(frame)
        if writer:
            write_shard(frame, run_dir / RECORDS_DIR / f"shard-{batch:06d}.parquet")
            manager.save(batch + 1, args=ocp.args.JsonSave({"next_batch": batch + 1}))
            manager.wait_until_finished()
        progress.update(1)
        progress.set_postfix(tokens=num_tokens)
    progress.close()
    manager.close()
    shards = sorted((run_dir / RECORDS_DIR).glob("shard-*.parquet"))
    total = sum(pq.read_metadata(s).num_rows for s in shards)
    return Result(run_dir=run_dir, num_shards=len(shards), num_tokens=total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pair", default=DEFAULT_PAIR,
        help=f"named pair ({', '.join(known_pairs())}; default {DEFAULT_PAIR}) or 'SLM,LLM': "
        "two model names, .gguf files or Hugging Face folders",
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="JSON Lines prompt file (default: the shipped prompts, calibration split)",
    )
    parser.add_argument("--split", help="use only prompts of this split (train, calibration, ...)")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--num-prompts", type=int, default=None, help="use this many prompts")
    parser.add_argument("--first-prompt", type=int, default=0, help="skip this many first")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-temperature", type=float, default=1.0)
    parser.add_argument("--llm-temperature", type=float, default=1.0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host run: call jax.distributed.initialize() first (TPU pods, GPU clusters)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        pair=args.pair,
        prompts=args.prompts,
        split=args.split if args.split or args.prompts else "calibration",
        out=args.out,
        num_prompts=args.num_prompts,
        first_prompt=args.first_prompt,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        draft_temperature=args.draft_temperature,
        llm_temperature=args.llm_temperature,
        resume=args.resume,
    )


def main(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", False):
        jax.distributed.initialize()
    try:
        result = run(config_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"uhlm collect: error: {err}", file=sys.stderr)
        return 2
    summary = {
        "run_dir": os.fspath(result.run_dir),
        "num_shards": result.num_shards,
        "num_tokens": result.num_tokens,
    }
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {result.num_tokens} token records in {result.num_shards} shards to "
        f"{result.run_dir}"
    )
    return 0
