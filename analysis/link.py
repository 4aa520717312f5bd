"""Per-mode latency and token throughput under a wireless link and cost profile.

`uhlm link --preset poor --skip-share 0.46` prices one generated token in every mode
(LLM-only, SLM-only, HLM, U-HLM, Rand-HLM) for a named link preset (optionally with
another mean SNR or bandwidth), an SLM and an LLM on named devices, and an uplink
payload (the full distribution, or CU-HLM top-k with `--top-k`). It prints the expected
latency per token, the token throughput and the speedup over HLM, then U-HLM's speedup
with its `1/(1 − s)` bound. `--json` prints one JSON object instead.

Expectations are analytic (`uhlm_jax.channel`): fading and outage are averaged in closed
form or by quadrature, and throughput is `1 / E[latency]`. Rand-HLM skips the same share
as U-HLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp

from uhlm_jax import channel as ch
from uhlm_jax.modes import Mode

# Skip share reported for U-HLM with TinyLlama-1.1B / Llama-2-7B (arXiv 2412.12687).
PAPER_SKIP_SHARE = 0.4593


@dataclasses.dataclass(frozen=True)
class Config:
    """What to price.

    Attributes:
        preset: named link conditions.
        snr_db: mean SNR in dB replacing the preset's; None keeps it.
        bandwidth_hz: bandwidth replacing the preset's (the SNR follows, unless `snr_db`).
        fading: fading model of the link.
        skip_share: share of tokens U-HLM (and Rand-HLM) do not transmit, in [0, 1).
        slm_model, slm_device, slm_precision: the drafting model and where it runs.
        llm_model, llm_device, llm_precision: the verifying model and where it runs.
        context_tokens: cached tokens attended to per step, for both models.
        bits_per_prob: bits per uplinked probability.
        top_k: CU-HLM truncation k; None sends the full distribution.
        uncertainty_samples: K of the temperature-perturbation uncertainty.
    """

    preset: ch.LinkPreset = ch.LinkPreset.MEDIUM
    snr_db: float | None = None
    bandwidth_hz: float | None = None
    fading: ch.Fading = ch.Fading.RAYLEIGH
    skip_share: float = PAPER_SKIP_SHARE
    slm_model: ch.ModelSize = ch.ModelSize.TINYLLAMA_1_1B
    slm_device: ch.Device = ch.Device.PHONE_SOC
    slm_precision: ch.Precision = ch.Precision.FLOAT16
    llm_model: ch.ModelSize = ch.ModelSize.LLAMA_2_7B
    llm_device: ch.Device = ch.Device.DATACENTER_GPU
    llm_precision: ch.Precision = ch.Precision.FLOAT16
    context_tokens: int = 512
    bits_per_prob: float = 16.0
    top_k: int | None = None
    uncertainty_samples: int = 20

    def __post_init__(self):
        for name, kind in [
            ("preset", ch.LinkPreset),
            ("fading", ch.Fading),
            ("slm_model", ch.ModelSize),
            ("slm_device", ch.Device),
            ("slm_precision", ch.Precision),
            ("llm_model", ch.ModelSize),
            ("llm_device", ch.Device),
            ("llm_precision", ch.Precision),
        ]:
            if not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: use a {kind.__qualname__} "
                    f"(parse names with {kind.__qualname__}.from_name)"
                )
        if not (isinstance(self.skip_share, int | float) and 0 <= self.skip_share < 1):
            raise ValueError(
                f"skip_share={self.skip_share!r} is invalid: it must lie in [0, 1)"
            )
        # Building the profile validates SNR, bandwidth, top_k and the rest.
        self.cost_profile()

    def link(self) -> ch.Link:
        """The link this configuration describes."""
        return ch.link_from_budget(
            self.preset, bandwidth_hz=self.bandwidth_hz, snr_db=self.snr_db, fading=self.fading
        )

    def cost_profile(self) -> ch.CostProfile:
        """The cost profile this configuration describes."""
        return ch.CostProfile(
            slm=ch.Deployment(
                self.slm_model, self.slm_device, self.slm_precision, self.context_tokens
            ),
            llm=ch.Deployment(
                self.llm_model, self.llm_device, self.llm_precision, self.context_tokens
            ),
            link=self.link(),
            vocab_size=self.llm_model.value.vocab_size,
            bits_per_prob=self.bits_per_prob,
            top_k=self.top_k,
            uncertainty_samples=self.uncertainty_samples,
        )


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
        uhlm_speedup: U-HLM's throughput over HLM's at `skip_share`.
        speedup_bound: `1 / (1 − skip_share)`.
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
        cfg = {
            f.name: _json_value(getattr(self.config, f.name))
            for f in dataclasses.fields(self.config)
        }
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
            "speedup_bound_formula": "1/(1-skip_share)",
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
def _evaluate(profile: ch.CostProfile, skip_share: jax.Array) -> dict[str, jax.Array]:
    breakdown = ch.expected_breakdown(profile)
    latency_s = jnp.stack(
        [ch.expected_token_latency_s(mode, profile, skip_share) for mode in Mode]
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
    out = jax.device_get(_evaluate(profile, jnp.float32(cfg.skip_share)))
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
        speedup_bound=1.0 / (1.0 - cfg.skip_share),
    )


def _names(kind) -> str:
    return ", ".join(_json_value(m) for m in kind)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm link` options."""
    d = Config()
    parser.add_argument(
        "--preset", default=_json_value(d.preset),
        help=f"link conditions: {_names(ch.LinkPreset)} (default: {_json_value(d.preset)})",
    )
    parser.add_argument(
        "--snr-db", type=float, default=None, help="mean SNR in dB, replacing the preset's"
    )
    parser.add_argument(
        "--bandwidth-hz", type=float, default=None,
        help="bandwidth in Hz, replacing the preset's (the SNR follows unless --snr-db)",
    )
    parser.add_argument(
        "--fading", default=_json_value(d.fading),
        help=f"fading model: {_names(ch.Fading)} (default: {_json_value(d.fading)})",
    )
    parser.add_argument(
        "--skip-share", type=float, default=d.skip_share,
        help=f"share of tokens U-HLM does not transmit, in [0, 1) (default: {d.skip_share})",
    )
    for role in ("slm", "llm"):
        model, device = getattr(d, f"{role}_model"), getattr(d, f"{role}_device")
        precision = getattr(d, f"{role}_precision")
        parser.add_argument(
            f"--{role}-model", default=_json_value(model),
            help=f"{role.upper()} size profile: {_names(ch.ModelSize)} "
            f"(default: {_json_value(model)})",
        )
        parser.add_argument(
            f"--{role}-device", default=_json_value(device),
            help=f"{role.upper()} device profile: {_names(ch.Device)} "
            f"(default: {_json_value(device)})",
        )
        parser.add_argument(
            f"--{role}-precision", default=_json_value(precision),
            help=f"{role.upper()} weight precision: {_names(ch.Precision)} "
            f"(default: {_json_value(precision)})",
        )
    parser.add_argument(
        "--context-tokens", type=int, default=d.context_tokens,
        help=f"cached tokens attended per step (default: {d.context_tokens})",
    )
    parser.add_argument(
        "--bits-per-prob", type=float, default=d.bits_per_prob,
        help=f"bits per uplinked probability (default: {d.bits_per_prob:g})",
    )
    parser.add_argument(
        "--top-k", type=int, default=None,
        help="CU-HLM: uplink only the k largest probabilities (default: the full distribution)",
    )
    parser.add_argument(
        "--uncertainty-samples", type=int, default=d.uncertainty_samples,
        help=f"K of the uncertainty measure (default: {d.uncertainty_samples})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` the parsed command line describes.

    Raises:
        ValueError: naming an unknown preset, model, device or precision, or a bad value.
    """
    fading_names = {f.value: f for f in ch.Fading}
    if args.fading not in fading_names:
        raise ValueError(f"unknown fading {args.fading!r}; use one of: {_names(ch.Fading)}")
    return Config(
        preset=ch.LinkPreset.from_name(args.preset),
        snr_db=args.snr_db,
        bandwidth_hz=args.bandwidth_hz,
        fading=fading_names[args.fading],
        skip_share=args.skip_share,
        slm_model=ch.ModelSize.from_name(args.slm_model),
        slm_device=ch.Device.from_name(args.slm_device),
        slm_precision=ch.Precision.from_name(args.slm_precision),
        llm_model=ch.ModelSize.from_name(args.llm_model),
        llm_device=ch.Device.from_name(args.llm_device),
        llm_precision=ch.Precision.from_name(args.llm_precision),
        context_tokens=args.context_tokens,
        bits_per_prob=args.bits_per_prob,
        top_k=args.top_k,
        uncertainty_samples=args.uncertainty_samples,
    )


def format_table(result: Result) -> str:
    """The human-readable report."""
    cfg = result.config
    payload = (
        f"full distribution, {cfg.llm_model.value.vocab_size} x {cfg.bits_per_prob:g} bits"
        if cfg.top_k is None
        else f"CU-HLM top-{cfg.top_k}"
    )
    b = result.breakdown_ms
    lines = [
        f"link     {cfg.preset.name.lower()} ({cfg.preset.value.description}), "
        f"{cfg.fading.value} fading",
        f"         {result.bandwidth_hz / 1e6:g} MHz, mean SNR {result.mean_snr_db:.2f} dB, "
        f"outage {100 * result.outage_probability:.2f}%, "
        f"ergodic rate {result.ergodic_rate_bits_per_s / 1e6:.3f} Mbit/s",
        f"uplink   {payload} = {result.uplink_bits:g} bits, {b['uplink']:.4g} ms expected",
        f"downlink {result.downlink_bits} bits, {b['downlink']:.4g} ms expected",
        f"SLM      {_json_value(cfg.slm_model)} {_json_value(cfg.slm_precision)} on "
        f"{_json_value(cfg.slm_device)}: {b['slm']:.3f} ms/token, uncertainty "
        f"(K={cfg.uncertainty_samples}) {b['uncertainty']:.4g} ms",
        f"LLM      {_json_value(cfg.llm_model)} {_json_value(cfg.llm_precision)} on "
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
        f"U-HLM vs HLM at skip share {100 * cfg.skip_share:.2f}%: {result.uhlm_speedup:.3f}x "
        f"(bound 1/(1-s) = {result.speedup_bound:.3f}x)",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm link`; returns the exit status."""
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        print(f"uhlm link: error: {error}", file=sys.stderr)
        return 2
    result = run(cfg)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result))
    return 0
