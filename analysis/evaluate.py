"""Compare the five modes with real rollouts on held-out prompts: `uhlm evaluate RUN_DIR`.

The job reads a calibration run directory: the pair and decoding settings from
`config.json`, the thresholds from `thresholds.json` (written by `uhlm calibrate` or
`uhlm threshold`). It runs every mode on prompts the calibration did not see (by default
the shipped prompts' evaluation split), with the same seed and per-prompt keys in every mode,
and writes into the run directory

* `evaluation.parquet`: one row per mode (U-HLM once per threshold) and prompt: token
  counts, the response text and token ids, its sentence similarity to the reference,
  whether it gives the short answer, and the LLM's NLL of it;
* `evaluation.json`: the settings and one summary row per mode (`analysis.tables.
  SUMMARY_COLUMNS`).

SLM-only, HLM and the U-HLM thresholds run as one vmapped U-HLM sweep (SLM-only and HLM
are its limits), LLM-only and Rand-HLM as one rollout each: three compiled rollouts.

Definitions:

* Accuracy (MiniLM cosine) of a response is the cosine similarity of the all-MiniLM-L6-v2
  sentence embeddings of the response and of the prompt's reference, as the U-HLM paper
  reports accuracy (`uhlm_jax.accuracy`). A mode's accuracy is the mean over the prompts
  that have a reference (prompts without one are left out, and the count is stated), and
  "% of LLM" divides it by LLM-only's: this is the paper's "% of LLM accuracy".
* Correct answers: the share of replies that contain the prompt's short answer
  (`answer` field; `uhlm_jax.answers`, containment), over the prompts that have one.
* The LLM's NLL of a response is the mean negative log-probability (nats per token,
  temperature 1) the LLM gives its tokens, recorded during the rollout; a mode's NLL is
  the mean over prompts. Each mean carries its standard error over prompts.
* A prompt file with neither references nor short answers cannot be scored for accuracy:
  evaluate stops with an error unless `--skip-accuracy` is passed.
* Throughput and speedup cost the recorded transmissions under a link preset and a cost
  profile (`--cost-profile`, as `uhlm link`): by default `named`, the paper's
  TinyLlama-1.1B on a phone and Llama-2-7B on a data-centre GPU with V = 32 000; `pair`
  prices the run's own pair at its dtype and V. `evaluation.json` and the printed table
  state which; the speedup over HLM is bounded by `1/(1 − s)` for skip rate `s`.
* Rand-HLM transmits each token with probability equal to the transmission rate U-HLM
  reached on these prompts at the operating threshold (`calibration.run_dir.
  operating_threshold`). A U-HLM threshold that failed its own prompt-split validation
  in `thresholds.json` is labelled so, and the operating threshold's validation is
  printed and written to `evaluation.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis import tables
from calibration import run_dir as rd
from calibration.prompts import embedded_prompts_path, select_prompts
from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console, metrics, pricing
from uhlm_jax.accuracy import has_text, mean_estimate, score_responses
from uhlm_jax.models.registry import DType
from uhlm_jax.models.sentence_encoder import load_minilm
from uhlm_jax.modes import Mode, Transmission
from uhlm_jax.pair import load_pair
from uhlm_jax.rollout import Records, RolloutConfig, RolloutParams, run_rollout
from uhlm_jax.uncertainty import DEFAULT_MEASURES, OneMinusMaxProbability

__all__ = [
    "Config",
    "Result",
    "add_arguments",
    "main",
    "run",
]

EVALUATION_SPLIT = "evaluation"
# `--split all` evaluates every prompt of the file.
ALL_SPLITS = "all"
# Rollout keys are derived from prompt ids; evaluation ids start here, far past any
# calibration prompt's, so the two never share keys.
_FIRST_PROMPT_ID = 1_000_000
# U-HLM thresholds that make it SLM-only (u never exceeds 1) and HLM (u is never negative).
_SKIP_ALL = 1.0
_SEND_ALL = -1.0
@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of `uhlm evaluate`.

    Attributes:
        run_dir: a calibration run directory (`config.json` and `thresholds.json`).
        prompts: JSON Lines prompts with reference answers; None: the shipped prompts.
        split: use only prompts of this split ("all" or None: all).
        num_prompts: use the first this many prompts (None: all).
        max_new_tokens: tokens per response at most (None: the calibration's).
        link: link preset of the throughput columns.
        seed: base seed of the rollouts (None: the calibration's).
        cost_profile_name: the models the throughput columns price, one of
            `uhlm_jax.pricing.COST_PROFILES` (`pair`: the run's pair).
        skip_accuracy: score no accuracy (MiniLM cosine to the reference, correct
            answers), for prompts without references or short answers; NLL, TR and
            throughput are still reported.
        dtype: parameter dtype of the pair; None: the run's.
    """

    run_dir: str
    prompts: str | None = None
    split: str | None = EVALUATION_SPLIT
    num_prompts: int | None = None
    max_new_tokens: int | None = None
    link: ch.LinkPreset = ch.LinkPreset.MEDIUM
    seed: int | None = None
    cost_profile_name: str = pricing.NAMED_COSTS
    skip_accuracy: bool = False
    dtype: DType | None = None

    def __post_init__(self):
        if self.split == ALL_SPLITS:
            object.__setattr__(self, "split", None)
        for name in ("num_prompts", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if not isinstance(self.link, ch.LinkPreset):
            raise ValueError(f"link={self.link!r} must be a LinkPreset ('good', 'medium', 'poor')")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"prompts={self.prompts!r}: no such file; pass a JSON Lines file")
        pricing.check_cost_profile(self.cost_profile_name)


@dataclasses.dataclass(frozen=True)
class Result:
    """What `uhlm evaluate` wrote.

    Attributes:
        summary: one row per mode (`tables.SUMMARY_COLUMNS` plus raw numeric columns).
        per_prompt: one row per mode and prompt.
        thresholds: the U-HLM thresholds evaluated, by name.
        operating: the operating threshold and its validation.
        seconds: wall-clock time of the job.
        costs: which models and devices the throughput columns price
            (`uhlm_jax.pricing.cost_caption`).
    """

    summary: pd.DataFrame
    per_prompt: pd.DataFrame
    thresholds: dict[str, float]
    operating: rd.OperatingThreshold
    seconds: float
    costs: str


def _response_rows(out_records: Records) -> list[np.ndarray]:
    """Each row's emitted tokens (valid steps only)."""
    return [
        out_records.token[out_records.valid[:, b], b].astype(np.int32)
        for b in range(out_records.token.shape[1])
    ]


def _job_frame(
    label: str, mode: Mode, threshold_name: str | None, threshold: float,
    probability: float, out_records: Records, texts: list[str], prompt_ids: np.ndarray,
) -> pd.DataFrame:
    valid = out_records.valid
    sums = jax.device_get(metrics.token_sums(
        out_records.transmitted, out_records.beta, out_records.accepted, valid
    ))
    # Rollout weights are 0 or 1, so the token sums are whole counts.
    count = lambda x: np.asarray(x).astype(np.int64)
    tokens = valid.sum(0)
    log_prob = np.where(valid, out_records.llm_log_prob, 0.0).sum(0)
    return pd.DataFrame(
        {
            "mode": mode.value,
            "label": label,
            "threshold_name": threshold_name,
            "threshold": threshold,
            "transmit_probability": probability,
            "prompt_id": prompt_ids,
            "tokens": tokens,
            "transmitted": count(sums.transmitted),
            "accepted": count(sums.accepted),
            "skipped": count(sums.tokens - sums.transmitted),
            "skipped_beta": sums.skipped_beta,
            "llm_nll": np.where(tokens > 0, -log_prob / np.maximum(tokens, 1), np.nan),
            "text": texts,
            "response_tokens": [r.tolist() for r in _response_rows(out_records)],
        }
    )


def _summary_row(
    frame: pd.DataFrame, out_records: Records, mode: Mode, profile: ch.CostProfile,
    seed: int,
) -> dict[str, Any]:
    valid = jnp.asarray(out_records.valid)
    transmitted = jnp.asarray(out_records.transmitted)
    rows = metrics.token_sums(transmitted, out_records.beta, out_records.accepted, valid)
    tm = metrics.metrics_from_sums(mode, metrics.TokenSums(*(jnp.sum(x) for x in rows)))
    lm = metrics.link_metrics(mode, transmitted, valid, profile, jax.random.key(seed))
    tm, lm = jax.device_get((tm, lm))
    n = len(frame)
    return {
        "label": frame["label"].iloc[0],
        "mode": mode.value,
        "threshold_name": frame["threshold_name"].iloc[0],
        "threshold": float(frame["threshold"].iloc[0]),
        "transmit_probability": float(frame["transmit_probability"].iloc[0]),
        "prompts": n,
        "tokens": int(tm.tokens),
        "transmission_rate": float(tm.transmission_rate),
        "skip_rate": float(tm.skip_rate),
        "acceptance_rate": float(tm.acceptance_rate),
        "true_skip_rate": float(tm.true_skip_rate),
        "risk_per_token": float(tm.risk_per_token),
        "llm_nll": float(frame["llm_nll"].mean()),
        "llm_nll_se": float(frame["llm_nll"].std(ddof=1) / math.sqrt(n)) if n > 1
        else float("nan"),
        "throughput_tokens_per_s": float(lm.throughput_tokens_per_s),
        "speedup_vs_hlm": float(lm.speedup_vs_hlm),
        "speedup_bound": float(lm.speedup_bound),
        "llm_calls_saved": float(lm.llm_calls_saved),
        "uplink_bits_saved": float(lm.uplink_bits_saved),
    }


def _accuracy_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Accuracy columns of one mode's summary row from its per-prompt rows."""
    similarity = mean_estimate(frame["similarity"])
    correct = mean_estimate(frame["correct"])
    return {
        "accuracy": similarity.mean,
        "accuracy_se": similarity.standard_error,
        "accuracy_prompts": similarity.count,
        "correct_rate": correct.mean,
        "correct_rate_se": correct.standard_error,
        "correct_prompts": correct.count,
    }


def _json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows for strict JSON: NaN (a metric a mode lacks) as null, ±inf as "inf"/"-inf"."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return value

    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def run(cfg: Config, progress: bool = True) -> Result:
    """Runs every mode on the prompts and writes the two files; see the module doc."""
    start = time.perf_counter()
    run_config = rd.RunConfig.read(cfg.run_dir)
    th = rd.Thresholds.read(cfg.run_dir)
    thresholds = th.named()
    operating = rd.operating_threshold(th)
    if operating is None:
        raise ValueError(
            f"{rd.THRESHOLDS_FILE} in {cfg.run_dir!r} gives no finite threshold; rerun "
            f"`uhlm threshold --run {cfg.run_dir}` on more calibration records"
        )
    measure_name = th.measure or DEFAULT_MEASURES[0].name
    measure = next((m for m in DEFAULT_MEASURES if m.name == measure_name), None)
    if measure is None:
        raise ValueError(f"unknown measure {measure_name!r} in {rd.THRESHOLDS_FILE}")
    prompts_path = cfg.prompts or embedded_prompts_path()
    prompts = select_prompts(prompts_path, cfg.split, count=cfg.num_prompts)
    if not cfg.skip_accuracy and not any(
        has_text(p.reference) or has_text(p.answer) for p in prompts
    ):
        raise ValueError(
            f"none of the {len(prompts)} prompts in {prompts_path!r} has a reference "
            "('reference' or 'output' field) or a short answer ('answer' field) to score "
            "accuracy against; add them, or pass --skip-accuracy"
        )
    # Loaded before the rollouts, so a missing wheel stops the job before its slow part.
    encoder = None if cfg.skip_accuracy else load_minilm()
    pair = load_pair(run_config.pair, dtype=cfg.dtype or run_config.dtype)
    max_new = cfg.max_new_tokens or run_config.max_new_tokens
    seed = run_config.seed if cfg.seed is None else cfg.seed
    temperatures = {
        "draft_temperature": run_config.draft_temperature,
        "llm_temperature": run_config.llm_temperature,
    }
    texts = [p.text for p in prompts]
    prompt_ids = np.arange(len(prompts)) + _FIRST_PROMPT_ID
    pair_costs = run_config.pair_profile(cfg.cost_profile_name)
    profile = pricing.Pricing(preset=cfg.link, pair=pair_costs).cost_profile()
    costs = pricing.cost_caption(profile, pair_costs)

    def rollout(mode: Mode, **params):
        # Only U-HLM gates on u; the other modes record the cheapest measure (one max over
        # the vocabulary) instead of paying for the gate measure's work on every token.
        gated = mode.policy.transmission is Transmission.UNCERTAIN
        recorded = measure if gated else OneMinusMaxProbability()
        return run_rollout(
            pair, texts,
            RolloutConfig(mode=mode, max_new_tokens=max_new, measures=(recorded,),
                          gate_measure=0, record_tv=False),
            RolloutParams.create(**temperatures, **params), seed=seed, prompt_ids=prompt_ids,
        )

    # SLM-only and HLM are U-HLM's limits (u <= 1 skips every token at threshold 1; every
    # token is sent below 0), so they run as points of the one vmapped U-HLM sweep: the same
    # keys give the same tokens as the dedicated modes (tests/test_rollout.py checks it),
    # in one compiled rollout instead of three.
    sweep_points = [(Mode.SLM_ONLY, Mode.SLM_ONLY.policy.label, None, _SKIP_ALL),
                    (Mode.HLM, Mode.HLM.policy.label, None, _SEND_ALL)]
    sweep_points += [(Mode.UHLM, tables.uhlm_label(n, t, th.failed_validation(n)), n, t)
                     for n, t in thresholds.items()]
    frames, rows = [], []
    matched = float("nan")
    # Progress counts decode steps of the rows (every row runs all max_new steps), so the
    # batched sweep counts as its points' rollouts and the time left stays steady.
    steps = len(texts) * max_new
    bar = console.progress(total=(len(sweep_points) + 2) * steps, desc="evaluating modes",
                           unit="step", quiet=not progress)

    def add(mode, label, name, threshold, probability, recs, generated):
        frame = _job_frame(label, mode, name, threshold, probability, recs, generated,
                           prompt_ids)
        frames.append(frame)
        rows.append(_summary_row(frame, recs, mode, profile, seed))
        return rows[-1]

    nan = float("nan")
    bar.set_postfix(mode=Mode.LLM_ONLY.policy.label)
    out = rollout(Mode.LLM_ONLY)
    bar.update(steps)
    add(Mode.LLM_ONLY, Mode.LLM_ONLY.policy.label, None, nan, nan, out.records, out.texts)
    bar.set_postfix(mode="SLM only, HLM and U-HLM")
    out = rollout(Mode.UHLM, threshold=np.asarray([p[3] for p in sweep_points], np.float32))
    bar.update(len(sweep_points) * steps)
    for i, (mode, label, name, t) in enumerate(sweep_points):
        row = add(mode, label, name, t if mode is Mode.UHLM else nan, nan,
                  jax.tree.map(lambda x, i=i: x[i], out.records), out.texts[i])
        if name == operating.name:
            matched = row["transmission_rate"]
    bar.set_postfix(mode=Mode.RAND_HLM.policy.label)
    out = rollout(Mode.RAND_HLM, transmit_probability=matched)
    bar.update(steps)
    add(Mode.RAND_HLM, f"{Mode.RAND_HLM.policy.label} (p = {matched:.3f})", None, nan, matched,
        out.records, out.texts)
    per_prompt = pd.concat(frames, ignore_index=True)
    position = per_prompt["prompt_id"] - _FIRST_PROMPT_ID
    per_prompt["prompt"] = [texts[i] for i in position]
    per_prompt["reference"] = [prompts[i].reference for i in position]
    per_prompt["answer"] = [prompts[i].answer for i in position]
    # Every mode's replies are scored in one batched embedding call.
    bar.set_postfix(mode="scoring accuracy")
    if encoder is None:
        per_prompt["similarity"] = per_prompt["correct"] = np.nan
    else:
        scores = score_responses(encoder, list(per_prompt["text"]),
                                 list(per_prompt["reference"]), list(per_prompt["answer"]))
        per_prompt["similarity"], per_prompt["correct"] = scores.similarity, scores.correct
    bar.close()
    for row, block in zip(rows, np.split(np.arange(len(per_prompt)), len(rows)), strict=True):
        row.update(_accuracy_summary(per_prompt.iloc[block]))
    summary = pd.DataFrame(rows)
    llm_accuracy = float(summary.loc[summary["mode"] == Mode.LLM_ONLY.value, "accuracy"].iloc[0])
    summary["accuracy_pct_of_llm"] = (100 * summary["accuracy"] / llm_accuracy
                                      if llm_accuracy > 0 else np.nan)
    run_dir = Path(cfg.run_dir)
    rd.write_parquet(per_prompt, run_dir / rd.EVALUATION_FILE)
    seconds = time.perf_counter() - start
    rd.write_json(
        run_dir / rd.EVALUATION_SUMMARY_FILE,
        {
            "settings": {
                "prompts": str(prompts_path), "split": cfg.split, "num_prompts": len(prompts),
                "max_new_tokens": max_new, "seed": seed, "link": cfg.link.name.lower(),
                "measure": measure_name, **temperatures,
                "pair": pair.name, "costs": costs,
            },
            "thresholds": thresholds,
            "operating": operating.name,
            "operating_threshold": {
                "name": operating.name,
                "value": operating.value,
                "passed_validation": operating.passed_validation,
                "validation": operating.note,
            },
            "accuracy": tables.accuracy_caption(summary),
            "summary": _json_rows(summary),
            "seconds": seconds,
        },
    )
    return Result(summary=summary, per_prompt=per_prompt, thresholds=thresholds,
                  operating=operating, seconds=seconds, costs=costs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `uhlm evaluate`'s arguments."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        positional=("run_dir",), names={"cost_profile_name": "cost_profile"},
        help={"cost_profile_name": pricing.COST_PROFILE_HELP},
    ))
    cli_config.add_output_flags(parser, quiet=True)


def main(args: argparse.Namespace) -> int:
    cfg = cli_config.config_from_args(Config, args)
    result = run(cfg, progress=not args.quiet)
    if args.json:
        print(console.json_text(_json_rows(result.summary), indent=2))
    else:
        print(tables.format_table(tables.summary_table(result.summary)))
        print(f"\n{tables.accuracy_caption(result.summary)}")
        print(f"\nThroughput and speedup: {cfg.link.name.lower()} link, {result.costs}.")
        print(f"Operating threshold: {result.operating.describe()}.")
        print(f"\nWrote {Path(cfg.run_dir) / rd.EVALUATION_SUMMARY_FILE} and "
              f"{rd.EVALUATION_FILE} ({result.seconds:.0f} s).")
    return 0
