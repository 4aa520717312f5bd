"""Run a model pair on prompts in one mode and print the texts and a short summary.

`uhlm rollout --mode uhlm --prompt "hello"`. Acceptance is undefined where no draft is
verified (LLM-only, SLM-only, or U-HLM skipping every token): it prints as "—" and is
`null` in `--json`.
"""

from __future__ import annotations

import argparse
import dataclasses

from calibration.prompts import read_prompts
from uhlm_jax import cli_config, console
from uhlm_jax.metrics import metrics_from_sums, token_sums
from uhlm_jax.models.registry import DType
from uhlm_jax.modes import Mode
from uhlm_jax.pair import DEFAULT_PAIR, load_pair
from uhlm_jax.rollout import RolloutConfig, RolloutOutput, RolloutParams, run_rollout


@dataclasses.dataclass(frozen=True)
class Config:
    """A rollout of a pair over a few prompts.

    Attributes:
        pair: a named pair (`uhlm_jax.pair.known_pairs()`) or `"SLM,LLM"` (two models by
            name or path, see `uhlm_jax.pair.load_pair`).
        prompts: the prompt texts.
        mode: how tokens are produced.
        threshold: U-HLM skip threshold on the temperature-perturbation uncertainty.
        transmit_probability: Rand-HLM transmit probability.
        max_new_tokens: tokens generated per prompt at most.
        draft_temperature: SLM draft temperature.
        llm_temperature: LLM temperature.
        seed: base seed.
        chat: apply the chat template of instruct models.
        dtype: parameter dtype of both models.
    """

    pair: str = DEFAULT_PAIR
    prompts: tuple[str, ...] = ("hello",)
    mode: Mode = Mode.UHLM
    threshold: float = 0.3
    transmit_probability: float = 0.5
    max_new_tokens: int = 32
    draft_temperature: float = 1.0
    llm_temperature: float = 1.0
    seed: int = 0
    chat: bool = True
    dtype: DType = "float32"

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("No prompts; pass --prompt TEXT or --prompts FILE.")
        if not 0.0 <= self.transmit_probability <= 1.0:
            raise ValueError(
                f"--transmit-probability must be in [0, 1], got {self.transmit_probability}."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclasses.dataclass(frozen=True)
class Result:
    """Texts and summary of a rollout."""

    output: RolloutOutput
    summary: dict


def run(cfg: Config) -> Result:
    pair = load_pair(cfg.pair, dtype=cfg.dtype)
    config = RolloutConfig(mode=cfg.mode, max_new_tokens=cfg.max_new_tokens)
    params = RolloutParams.create(
        threshold=cfg.threshold,
        transmit_probability=cfg.transmit_probability,
        draft_temperature=cfg.draft_temperature,
        llm_temperature=cfg.llm_temperature,
    )
    output = run_rollout(pair, list(cfg.prompts), config, params, seed=cfg.seed, chat=cfg.chat)
    rec = output.records
    metrics = metrics_from_sums(
        cfg.mode, token_sums(rec.transmitted.ravel(), rec.beta.ravel(), rec.accepted.ravel(),
                             rec.valid.ravel())
    )
    gate = config.measures[config.gate_measure].name
    summary = {
        "pair": cfg.pair,
        "mode": cfg.mode.value,
        "tokens": int(metrics.tokens),
        "transmission_rate": float(metrics.transmission_rate),
        "acceptance_rate": float(metrics.acceptance_rate),
        f"mean_u_{gate}": float(rec.uncertainty[..., config.gate_measure][rec.valid].mean()),
        "mean_beta": float(metrics.mean_beta),
    }
    return Result(output=output, summary=summary)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, Config, cli_config.Flags(hidden=("prompts",)))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts", metavar="FILE", help="JSON Lines prompt file")
    cli_config.add_output_flags(parser)


def main(args: argparse.Namespace) -> int:
    prompts = (
        tuple(p.text for p in read_prompts(args.prompts)) if args.prompts
        else tuple(args.prompt or Config.prompts)
    )
    cfg = cli_config.config_from_args(Config, args, prompts=prompts)
    result = run(cfg)
    if args.json:
        print(console.json_text({"texts": result.output.texts, "summary": result.summary}, 2))
        return 0
    for prompt, text in zip(cfg.prompts, result.output.texts, strict=True):
        print(f"> {prompt}\n{text}\n")
    s = result.summary
    print(
        f"{s['mode']}: {s['tokens']} tokens, transmission rate {s['transmission_rate']:.3f}, "
        f"acceptance {console.number(s['acceptance_rate'])}, "
        + ", ".join(f"{k} {console.number(v)}" for k, v in s.items() if k.startswith("mean_"))
    )
    return 0
