"""Per-mode latency and token throughput under a wireless link and cost profile.

`uhlm link --preset poor --skip-rate 0.46` prices one generated token in every mode
(LLM-only, SLM-only, HLM, U-HLM, Rand-HLM) for a named link preset (optionally with
another mean SNR or bandwidth), an SLM and an LLM on named devices, and an uplink
payload (the full distribution, or CU-HLM top-k with `--top-k`). It prints the expected
latency per token, the token throughput and the speedup over HLM, then U-HLM's speedup
with its `1/(1 − s)` bound. `--json` prints one JSON object instead.

Cost profiles (`--cost-profile`, `uhlm_jax.pricing.COST_PROFILES`): `named` prices the
named model profiles `--slm-model` and `--llm-model` (by default the paper's TinyLlama-1.1B
and Llama-2-7B, V = 32 000, float16); `pair` prices a pair's own models (`--pair NAME`), at
the dtype they run in, with the pair's V on the uplink. `uhlm evaluate`, `sweep` and
`report` take the same names, `pair` being the pair recorded in the run directory
(`calibration.run_dir.RunConfig.pair_profile`).

Expectations are analytic (`uhlm_jax.channel`): fading and outage are averaged in closed
form or by quadrature, and throughput is `1 / E[latency]`. Rand-HLM skips the same share
as U-HLM.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from uhlm_jax import channel as ch
from uhlm_jax import cli_config, console
from uhlm_jax.modes import Mode
from uhlm_jax.pricing import (
    COST_PROFILES,
    NAMED_COSTS,
    PAIR_COSTS,
    Pricing,
    cost_caption,
    pair_profile,
)

# `uhlm link` prices what a `Pricing` describes.
Config = Pricing


@dataclasses.dataclass(frozen=True)
class ModeRow:
    """One mode's expected cost per generated token."""

    mode: Mode
    latency_ms: float
    tokens_per_s: float
    speedup_vs_hlm: float


@dataclasses.dataclass(frozen=True)
class Result:
    """Per-mode table and the terms behind it.

    Attributes:
        config: what was priced.
        mean_snr_db: the link's mean SNR.
        bandwidth_hz: the link's bandwidth.
        outage_probability: share of fading blocks in outage.
        ergodic_rate_bits_per_s: mean Shannon rate under fading (ignoring outage).
        uplink_bits: payload per transmitted token.
        downlink_bits: payload per verified token.
        breakdown_ms: expected per-token terms (slm, uncertainty, uplink, llm, downlink).
        rows: one per mode.
        uhlm_speedup: U-HLM's throughput over HLM's at `skip_rate`.
        speedup_bound: `1 / (1 − skip_rate)`.
    """

    config: Config
    mean_snr_db: float
    bandwidth_hz: float
    outage_probability: float
    ergodic_rate_bits_per_s: float
    uplink_bits: float
    downlink_bits: int
    breakdown_ms: dict[str, float]
    rows: tuple[ModeRow, ...]
    uhlm_speedup: float
    speedup_bound: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (enums by name)."""
        profile = self.config.cost_profile()
        cfg = {
            f.name: _json_value(getattr(self.config, f.name))
            for f in dataclasses.fields(self.config)
        }
        pair = self.config.pair
        cfg.update(
            pair=None if pair is None else pair.name,
            cost_profile=NAMED_COSTS if pair is None else PAIR_COSTS,
            slm_model=profile.slm.model_profile.name,
            slm_precision=_json_value(profile.slm.precision),
            llm_model=profile.llm.model_profile.name,
            llm_precision=_json_value(profile.llm.precision),
            vocab_size=profile.vocab_size,
        )
        return {
            "config": cfg,
            "link": {
                "description": self.config.preset.value.description,
                "mean_snr_db": self.mean_snr_db,
                "bandwidth_hz": self.bandwidth_hz,
                "outage_probability": self.outage_probability,
                "ergodic_rate_bits_per_s": self.ergodic_rate_bits_per_s,
            },
            "uplink_bits": self.uplink_bits,
            "downlink_bits": self.downlink_bits,
            "breakdown_ms": self.breakdown_ms,
            "modes": [
                {
                    "mode": row.mode.value,
                    "latency_ms_per_token": row.latency_ms,
                    "tokens_per_s": row.tokens_per_s,
                    "speedup_vs_hlm": row.speedup_vs_hlm,
                }
                for row in self.rows
            ],
            "uhlm_speedup_vs_hlm": self.uhlm_speedup,
            "speedup_bound": self.speedup_bound,
            "speedup_bound_formula": "1/(1-skip_rate)",
        }


def _json_value(value: Any) -> Any:
    if isinstance(value, ch.LinkPreset | ch.Fading):
        return value.name.lower()
    if isinstance(value, ch.ModelSize | ch.Device):
        return value.value.name
    if isinstance(value, ch.Precision):
        return value.name.lower()
    return value


@jax.jit
def _evaluate(profile: ch.CostProfile, skip_rate: jax.Array) -> dict[str, jax.Array]:
    breakdown = ch.expected_breakdown(profile)
    latency_s = jnp.stack(
        [ch.expected_token_latency_s(mode, profile, skip_rate) for mode in Mode]
    )
    return {
        "breakdown": breakdown,
        "latency_s": latency_s,
        "outage": ch.outage_probability(profile.link),
        "ergodic": ch.ergodic_rate_bits_per_s(profile.link.bandwidth_hz, profile.link.mean_snr_db),
        "uplink_bits": ch.uplink_bits(profile),
    }


def run(cfg: Config) -> Result:
    """Prices one token in every mode under `cfg`."""
    profile = cfg.cost_profile()
    out = jax.device_get(_evaluate(profile, jnp.float32(cfg.skip_rate)))
    latency_s = dict(zip(Mode, (float(x) for x in out["latency_s"]), strict=True))
    hlm_s = latency_s[Mode.HLM]
    rows = tuple(
        ModeRow(
            mode=mode,
            latency_ms=latency_s[mode] * 1e3,
            tokens_per_s=1.0 / latency_s[mode],
            speedup_vs_hlm=hlm_s / latency_s[mode],
        )
        for mode in Mode
    )
    b = out["breakdown"]
    return Result(
        config=cfg,
        mean_snr_db=float(profile.link.mean_snr_db),
        bandwidth_hz=float(profile.link.bandwidth_hz),
        outage_probability=float(out["outage"]),
        ergodic_rate_bits_per_s=float(out["ergodic"]),
        uplink_bits=float(out["uplink_bits"]),
        downlink_bits=ch.downlink_bits(profile.vocab_size),
        breakdown_ms={
            "slm": float(b.slm_s) * 1e3,
            "uncertainty": float(b.uncertainty_s) * 1e3,
            "uplink": float(b.uplink_s) * 1e3,
            "llm": float(b.llm_s) * 1e3,
            "downlink": float(b.downlink_s) * 1e3,
        },
        rows=rows,
        uhlm_speedup=hlm_s / latency_s[Mode.UHLM],
        speedup_bound=float(ch.speedup_bound(cfg.skip_rate)),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm link` options."""
    cli_config.add_arguments(parser, Config, cli_config.Flags(
        hidden=("pair",),
        help={
            "slm_precision": "SLM weight precision (default: float16 for named models, the "
            f"pair's dtype for --cost-profile {PAIR_COSTS})",
            "llm_precision": "LLM weight precision (default: as --slm-precision)",
        },
    ))
    parser.add_argument(
        "--cost-profile", default=NAMED_COSTS, choices=COST_PROFILES,
        help=f"models to price: '{NAMED_COSTS}', the model profiles --slm-model and "
        f"--llm-model (default), or '{PAIR_COSTS}', the models of --pair at their dtype, "
        "with the pair's V on the uplink",
    )
    parser.add_argument(
        "--pair", default=None,
        help=f"the pair --cost-profile {PAIR_COSTS} prices: a named pair or 'SLM,LLM'",
    )
    cli_config.add_output_flags(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` the parsed command line describes (`--cost-profile` and `--pair` give
    its `pair`).

    Raises:
        ValueError: naming the flags that do not go together, or a bad value.
    """
    named = args.cost_profile == NAMED_COSTS
    if named and args.pair is not None:
        raise ValueError(
            f"--pair is the pair that --cost-profile {PAIR_COSTS} prices; pass that too"
        )
    if not named and (hasattr(args, "slm_model") or hasattr(args, "llm_model")):
        raise ValueError(
            f"--slm-model and --llm-model choose the models of --cost-profile {NAMED_COSTS}; "
            f"--cost-profile {PAIR_COSTS} takes them from --pair"
        )
    pair = pair_profile(args.cost_profile, pair=args.pair)
    return cli_config.config_from_args(Config, args, pair=pair)


def format_table(result: Result) -> str:
    """The human-readable report."""
    cfg = result.config
    profile = cfg.cost_profile()
    payload = (
        f"full distribution, {profile.vocab_size} x {cfg.bits_per_prob:g} bits"
        if cfg.top_k is None
        else f"CU-HLM top-{cfg.top_k}"
    )
    b = result.breakdown_ms
    lines = [
        f"costs    {cost_caption(profile, cfg.pair)}",
        f"link     {cfg.preset.name.lower()} ({cfg.preset.value.description}), "
        f"{cfg.fading.value} fading",
        f"         {result.bandwidth_hz / 1e6:g} MHz, mean SNR {result.mean_snr_db:.2f} dB, "
        f"outage {100 * result.outage_probability:.2f}%, "
        f"ergodic rate {result.ergodic_rate_bits_per_s / 1e6:.3f} Mbit/s",
        f"uplink   {payload} = {result.uplink_bits:g} bits, {b['uplink']:.4g} ms expected",
        f"downlink {result.downlink_bits} bits, {b['downlink']:.4g} ms expected",
        f"SLM      {profile.slm.model_profile.name} {_json_value(profile.slm.precision)} on "
        f"{_json_value(cfg.slm_device)}: {b['slm']:.3f} ms/token, uncertainty "
        f"(K={cfg.uncertainty_samples}) {b['uncertainty']:.4g} ms",
        f"LLM      {profile.llm.model_profile.name} {_json_value(profile.llm.precision)} on "
        f"{_json_value(cfg.llm_device)}: {b['llm']:.3f} ms/token",
        "",
        f"{'mode':<10} {'ms/token':>10} {'tokens/s':>10} {'vs HLM':>8}",
    ]
    for row in result.rows:
        lines.append(
            f"{row.mode.value:<10} {row.latency_ms:>10.3f} {row.tokens_per_s:>10.2f} "
            f"{row.speedup_vs_hlm:>7.3f}x"
        )
    lines += [
        "",
        f"U-HLM vs HLM at skip rate {100 * cfg.skip_rate:.2f}%: {result.uhlm_speedup:.3f}x "
        f"(bound 1/(1-s) = {result.speedup_bound:.3f}x)",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm link`; returns the exit status."""
    result = run(config_from_args(args))
    print(console.json_text(result.to_json()) if args.json else format_table(result))
    return 0
