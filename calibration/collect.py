"""Collect per-token calibration records of a model pair (HLM mode, every token verified).

The job runs the pair over a prompt file in batches. Each batch's records go to one
Parquet shard, written atomically; after each shard the job state (the next batch) is
saved as an orbax checkpoint. `--resume` continues from the last checkpoint: a batch whose
shard was written but not checkpointed is run again and its shard replaced, so no record
is lost or duplicated. It first checks every shard the checkpoint counts as done (readable
Parquet, the record columns, the batch's prompts) and runs again, with a warning naming
the file, each batch whose shard is missing or damaged. Keys depend only on the seed, the
prompt id and the step, so a resumed run writes the same records as an uninterrupted one.

Scale-out: every batch runs on a `data` x `model` mesh over all devices
(`uhlm_jax.sharding`; `--mesh data=D,model=M`, default every device on `data`). Rows are
split over `data`; the LLM's heads and MLP columns over `model`. For several processes
(hosts of a TPU pod or a GPU cluster), start the same command in every process with
`--distributed`, which calls `jax.distributed.initialize()` (with `--coordinator-address`,
`--num-processes` and `--process-id`, or what the cluster provides). The processes first
check that they run the same config. The run directory must be visible to every process;
only process 0 writes to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
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
from jax.experimental import multihost_utils

from calibration.prompts import Prompt, collection_source, select_prompts
from calibration.records import MEASURE_PREFIX, shard_problem, write_shard
from calibration.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DEFAULT_DTYPE,
    RECORDS_DIR,
    SHARD_GLOB,
    RunConfig,
    shard_name,
    write_json,
)
from uhlm_jax import cli_config, console
from uhlm_jax.models.registry import DType
from uhlm_jax.modes import Mode
from uhlm_jax.pair import DEFAULT_PAIR, load_pair
from uhlm_jax.rollout import Records, RolloutConfig, RolloutParams, run_rollout
from uhlm_jax.sharding import MeshShape, make_mesh, place_pair
from uhlm_jax.uncertainty import DEFAULT_MEASURE_NAMES, DEFAULT_MEASURES, UncertaintyMeasure

_VERSIONED_PACKAGES = ("uhlm-jax", "jax", "jaxlib", "flax", "numpyro", "orbax-checkpoint")


@dataclasses.dataclass(frozen=True)
class Config:
    """A calibration collection run.

    Attributes:
        out: the run directory.
        pair: a named pair (`uhlm_jax.pair.known_pairs()`) or `"SLM,LLM"` (two models by
            name or path, see `uhlm_jax.pair.load_pair`).
        prompts: JSON Lines prompt file; None uses the shipped prompts.
        split: use only prompts of this split; None uses all, except of the shipped
            prompts, where it is their "calibration" split.
        num_prompts: use the first this many prompts (None: all); more than there are
            is an error.
        first_prompt: skip this many prompts first (to keep calibration and evaluation
            prompts disjoint).
        max_new_tokens: tokens generated per prompt at most.
        batch_size: prompts per batch; a multiple of the mesh's `data` axis.
        seed: base seed of all keys.
        draft_temperature: SLM draft temperature.
        llm_temperature: LLM temperature.
        measures: names of the uncertainty measures to record (`uhlm_jax.uncertainty`),
            in column order; all five by default. Fewer cost less: only these are computed.
        resume: continue an interrupted run in `out`.
        mesh: device mesh `"data=D,model=M"` (`uhlm_jax.sharding.MeshShape.parse`); the
            LLM is split over `model`. None puts every device on `data`.
        distributed: join the other processes of a multi-process run
            (`jax.distributed.initialize`) before anything else; process 0 writes.
        coordinator_address: `host:port` of process 0's coordinator; None lets JAX
            detect it on a cluster it knows (TPU pods, Slurm).
        num_processes: processes in the run; None: detected, as above.
        process_id: this process's index in `[0, num_processes)`; None: detected.
        dtype: parameter dtype of both models.
    """

    out: str
    pair: str = DEFAULT_PAIR
    prompts: str | None = None
    split: str | None = None
    num_prompts: int | None = None
    first_prompt: int = 0
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0
    draft_temperature: float = 1.0
    llm_temperature: float = 1.0
    measures: tuple[str, ...] = DEFAULT_MEASURE_NAMES
    resume: bool = False
    mesh: str | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    dtype: DType = DEFAULT_DTYPE

    def __post_init__(self):
        object.__setattr__(self, "split", collection_source(self.prompts, self.split)[1])
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
        object.__setattr__(self, "measures", tuple(self.measures))
        unknown = [m for m in self.measures if m not in DEFAULT_MEASURE_NAMES]
        if unknown or not self.measures or len(set(self.measures)) < len(self.measures):
            raise ValueError(
                f"measures must be distinct names among {', '.join(DEFAULT_MEASURE_NAMES)}; got "
                f"{list(self.measures)!r}."
            )
        if self.mesh is not None:
            MeshShape.parse(self.mesh)
        process = {k: getattr(self, k) for k in _PROCESS_FIELDS}
        if not self.distributed and any(v is not None for v in process.values()):
            given = ", ".join(f"{k}={v!r}" for k, v in process.items() if v is not None)
            raise ValueError(f"{given} needs distributed=True (--distributed).")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}.")
        if self.process_id is not None and not (
            0 <= self.process_id < (self.num_processes or self.process_id + 1)
        ):
            raise ValueError(
                f"process_id {self.process_id} must be in [0, num_processes="
                f"{self.num_processes})."
            )

    def mesh_shape(self) -> MeshShape:
        return MeshShape() if self.mesh is None else MeshShape.parse(self.mesh)

    def rollout_measures(self) -> tuple[UncertaintyMeasure, ...]:
        """The measures to record, with the paper's defaults, in `measures` order."""
        by_name = {m.name: m for m in DEFAULT_MEASURES}
        return tuple(by_name[name] for name in self.measures)

    def prompts_path(self) -> str:
        return collection_source(self.prompts, self.split)[0]

    def settings(self) -> dict:
        """What determines the records (not `out`, `resume`, nor where the run runs)."""
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if k not in _PLACEMENT_FIELDS}


# Fields that say how one process joins a multi-process run.
_PROCESS_FIELDS = ("coordinator_address", "num_processes", "process_id")
# Fields that do not change the records.
_PLACEMENT_FIELDS = ("out", "resume", "mesh", "distributed", *_PROCESS_FIELDS)


@dataclasses.dataclass(frozen=True)
class Result:
    """Where the records went, how many there are, and how many this call wrote.

    Attributes:
        run_dir: the run directory.
        num_shards, num_tokens: shards and token records the run holds.
        written_shards, written_tokens: those this call wrote (0 when a resumed run
            was already complete).
    """

    run_dir: Path
    num_shards: int
    num_tokens: int
    written_shards: int
    written_tokens: int


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
    old = {"dtype": DEFAULT_DTYPE, **RunConfig.read(run_dir).settings}
    new = json.loads(json.dumps(cfg.settings()))
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"Cannot resume {str(run_dir)!r}: it was made with different settings ({detail}). "
            "Resume with the original settings, or start a new run in another directory."
        )


def _join(cfg: Config) -> None:
    """Joins the multi-process run (once per process) and checks every process's config.

    Raises:
        ValueError: naming the fields, if another process runs another config.
    """
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    # One hash per field that every process must share (all but its own id and how it
    # reaches the coordinator).
    fields = [f.name for f in dataclasses.fields(cfg) if f.name not in _PROCESS_FIELDS]
    hashes = np.array(
        [
            int.from_bytes(hashlib.sha256(repr(getattr(cfg, f)).encode()).digest()[:4], "little")
            for f in fields
        ],
        np.uint32,
    )
    every = np.asarray(multihost_utils.process_allgather(hashes))
    for process, theirs in enumerate(every):
        differ = [f for f, a, b in zip(fields, hashes, theirs, strict=True) if a != b]
        if differ:
            raise ValueError(
                f"process {jax.process_index()} and process {process} run different collect "
                f"configs (they differ in {', '.join(differ)}); start every process with the "
                "same flags."
            )


def run(cfg: Config, progress: bool = True) -> Result:
    """Collects records into `cfg.out`; see the module docstring.

    `progress` shows a bar in a terminal and progress lines in a log.
    """
    if cfg.distributed:
        _join(cfg)
    run_dir = Path(cfg.out).absolute()
    prompts = _select_prompts(cfg)
    num_devices = jax.device_count()
    try:
        shape = cfg.mesh_shape().resolve(num_devices)
    except ValueError as err:
        raise ValueError(f"--mesh: {err}") from None
    mesh = make_mesh(shape)
    data = shape.data
    if cfg.batch_size % data:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not a multiple of the mesh's data axis of {data} "
            f"devices; use --batch-size {data * max(1, cfg.batch_size // data)}."
        )
    if cfg.resume:
        _check_resumable(run_dir, cfg)
    elif (run_dir / CONFIG_FILE).exists():
        raise ValueError(
            f"{str(run_dir)!r} already holds a run; pass --resume to continue it, or choose "
            "another --out."
        )

    pair = load_pair(cfg.pair, dtype=cfg.dtype)
    try:
        pair = place_pair(pair, mesh)
    except ValueError as err:  # the model axis does not divide the LLM's heads
        raise ValueError(f"--mesh: {err}") from None
    # The records hold tv but not the LLM's log-probability of the token.
    config = RolloutConfig(
        mode=Mode.HLM,
        max_new_tokens=cfg.max_new_tokens,
        measures=cfg.rollout_measures(),
        record_llm_log_prob=False,
    )
    params = RolloutParams.create(
        draft_temperature=cfg.draft_temperature, llm_temperature=cfg.llm_temperature
    )
    writer = jax.process_index() == 0
    if jax.process_count() > 1:
        # Every process has checked the run directory before process 0 writes to it.
        multihost_utils.sync_global_devices("collect: run directory checked")
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
                "num_prompts": len(prompts),
                "num_devices": num_devices,
                "num_processes": jax.process_count(),
                "mesh": str(shape),
                "versions": _versions(),
            },
        )
    starts = range(0, len(prompts), cfg.batch_size)
    # The batches to run: those after the checkpoint, and those before it whose shard fails
    # its check.
    todo = np.ones(len(starts), bool)
    next_batch = 0
    if writer:
        # Only this process saves checkpoints; orbax leaves creating the folder to it.
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        manager = ocp.CheckpointManager(
            run_dir / CHECKPOINT_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2,
                create=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=0, active_processes={0}
                ),
            ),
        )
        if cfg.resume and manager.latest_step() is not None:
            state = manager.restore(manager.latest_step(), args=ocp.args.JsonRestore())
            next_batch = int(state["next_batch"])
        for batch in range(min(next_batch, len(starts))):
            path = run_dir / RECORDS_DIR / shard_name(batch)
            ids = _batch_ids(cfg, starts[batch], len(prompts))
            problem = shard_problem(path, ids, config.measure_names)
            todo[batch] = problem is not None
            if problem is not None:
                print(
                    f"warning: record shard {str(path)!r} {problem}; collecting its "
                    f"{len(ids)} prompts again",
                    file=sys.stderr,
                )
    if jax.process_count() > 1:
        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo.astype(np.int32))) > 0

    written_shards = written_tokens = 0
    bar = console.progress(
        total=len(starts),
        initial=len(starts) - int(todo.sum()),
        unit="batch",
        desc="collect",
        quiet=not progress,
    )
    for batch in np.flatnonzero(todo).tolist():
        start = starts[batch]
        chunk = prompts[start : start + cfg.batch_size]
        rows = len(chunk)
        # Pad a short last batch with copies so every batch has one shape; drop them after.
        texts = [p.text for p in chunk] + [chunk[-1].text] * (cfg.batch_size - rows)
        ids = np.arange(start + cfg.first_prompt, start + cfg.first_prompt + cfg.batch_size)
        output = run_rollout(pair, texts, config, params, seed=cfg.seed, prompt_ids=ids, mesh=mesh)
        frame = records_frame(output.records, output.prompt_ids, config.measure_names, rows)
        if writer:
            write_shard(frame, run_dir / RECORDS_DIR / shard_name(batch))
            # A batch run again before the checkpoint leaves the checkpoint as it is.
            if batch >= next_batch:
                manager.save(batch + 1, args=ocp.args.JsonSave({"next_batch": batch + 1}))
                manager.wait_until_finished()
        written_shards += 1
        written_tokens += len(frame)
        bar.set_postfix(tokens=written_tokens)
        bar.update(1)
    bar.close()
    if writer:
        manager.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("collect: records written")
    shards = sorted((run_dir / RECORDS_DIR).glob(SHARD_GLOB))
    total = sum(pq.read_metadata(s).num_rows for s in shards)
    return Result(
        run_dir=run_dir,
        num_shards=len(shards),
        num_tokens=total,
        written_shards=written_shards,
        written_tokens=written_tokens,
    )


def _select_prompts(cfg: Config) -> list[Prompt]:
    """The prompts `cfg` collects: its split, after `first_prompt`, at most `num_prompts`."""
    return select_prompts(cfg.prompts_path(), cfg.split, cfg.first_prompt, cfg.num_prompts)


def _batch_ids(cfg: Config, start: int, num_prompts: int) -> range:
    """The prompt ids of the batch that starts at prompt `start` (of `num_prompts`)."""
    first = cfg.first_prompt + start
    return range(first, first + min(cfg.batch_size, num_prompts - start))


# The flags of collect's Config; `uhlm calibrate` shares them.
FLAGS = cli_config.Flags(
    required=("out",),
    help={"mesh": "device mesh data=D,model=M; the LLM is split over 'model' (default: every "
          "device on 'data')"},
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, Config, FLAGS)
    cli_config.add_output_flags(parser, quiet=True)


def summary_line(result: Result) -> str:
    """What this call wrote, and what the run holds when that differs."""
    def records(tokens: int, shards: int) -> str:
        return f"{tokens} token records in {shards} shard{'s' * (shards != 1)}"

    held = records(result.num_tokens, result.num_shards)
    if result.written_shards == 0:
        return f"wrote nothing: {result.run_dir} already holds all its {held}"
    wrote = f"wrote {records(result.written_tokens, result.written_shards)} to {result.run_dir}"
    return wrote if result.written_shards == result.num_shards else f"{wrote}; it holds {held}"


def main(args: argparse.Namespace) -> int:
    result = run(cli_config.config_from_args(Config, args), progress=not args.quiet)
    summary = {
        "run_dir": os.fspath(result.run_dir),
        "num_shards": result.num_shards,
        "num_tokens": result.num_tokens,
        "written_shards": result.written_shards,
        "written_tokens": result.written_tokens,
    }
    print(console.json_text(summary) if args.json else summary_line(result))
    return 0
