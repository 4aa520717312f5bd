"""Wireless link, compute latency and token throughput of hybrid LM inference.

Everything a deployment costs per generated token, as pure functions of frozen
configs. Values one sweeps (SNR, bandwidth, bits per probability, top-k, skip share)
are pytree leaves, so a grid over them is a ``vmap`` that compiles once; what changes
control flow (fading model, models, devices, vocabulary size) is static.

Shape legend (see `uhlm_jax.types`): ``n`` generated steps.

Model, term by term (DESIGN.md §2, "Link and latency model"):

* **Payload.** Full distribution ``V · b`` bits; CU-HLM top-k truncation
  ``k · (b + ⌈log2 V⌉)`` bits (value and index of each kept entry); a token id
  ``⌈log2 V⌉`` bits; the downlink carries one token id per verified token.
* **Link.** Shannon rate ``W log2(1 + SNR·g)`` with the mean SNR from a link budget
  (transmit power, log-distance path loss, thermal noise × bandwidth × noise figure)
  and a Rayleigh block-fading power gain ``g ~ Exp(1)`` drawn per token and direction.
  Outage: a block whose rate would fall below ``η_min · W`` is not used; the
  transmitter waits ``retry_delay_s`` and tries again on a fresh block.
* **Compute.** A roofline per model and device, ``max(FLOPs / peak, bytes / bandwidth)``
  per decoded token, plus the cost of the temperature-perturbation uncertainty
  (``K`` samples over ``V``).
* **Per token**, for each `Mode`: HLM costs ``τ_SLM + τ_unc + τ_UL + τ_LLM + τ_DL``;
  U-HLM pays the last three only on transmitted tokens. Under this model a skip share
  ``s`` bounds U-HLM's speedup over HLM by ``1 / (1 − s)`` (`speedup_bound`).

References:
  S. Oh et al., "Uncertainty-Aware Hybrid Inference with On-Device Small and Remote
  Large Language Models", ICMLCN 2025, arXiv 2412.12687 (U-HLM).
  S. Oh et al., "Communication-Efficient Hybrid Language Model via Uncertainty-Aware
  Opportunistic and Compressed Transmission", arXiv 2505.11788 (CU-HLM).
  3GPP TR 38.901 v17 (path loss), TS 38.214 (CQI tables), TS 38.101-1 (UE power).
"""

# ruff: noqa: F722  (jaxtyping shape strings are not forward references)

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from uhlm_jax.modes import Mode
from uhlm_jax.types import Array, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "mode_latency_s",
    "SNR_DB_RANGE",
    "CostProfile",
    "Deployment",
    "Device",
    "DeviceProfile",
    "Fading",
    "LatencyBreakdown",
    "Link",
    "LinkBudget",
    "LinkPreset",
    "ModelProfile",
    "ModelSize",
    "Precision",
    "compute_latency_s",
    "db_to_linear",
    "decode_bytes",
    "decode_flops",
    "downlink_bits",
    "ergodic_rate_bits_per_s",
    "exp1",
    "exp1_scaled",
    "expected_breakdown",
    "expected_speedup",
    "expected_throughput_tokens_per_s",
    "expected_token_latency_s",
    "expected_transmission_latency_s",
    "full_distribution_bits",
    "latency_from_mask",
    "link_from_budget",
    "mean_snr_db",
    "outage_probability",
    "parameter_count",
    "sample_transmission_latency_s",
    "shannon_rate_bits_per_s",
    "speedup_bound",
    "throughput_from_mask",
    "token_id_bits",
    "token_latencies_s",
    "top_k_bits",
    "uncertainty_latency_s",
    "uplink_bits",
]

# Mean SNRs outside this range are almost surely a unit mistake (linear vs dB, or dBm).
SNR_DB_RANGE = (-50.0, 80.0)
# Thermal noise power spectral density at 290 K.
THERMAL_NOISE_DBM_PER_HZ = -174.0
# FLOPs charged per (sample, vocabulary entry) of the temperature-perturbation
# uncertainty: Gumbel noise -log(-log U) (two logs, one FLOP each by convention),
# scale by θ, add to the logit, compare for the argmax.
UNCERTAINTY_FLOPS_PER_ENTRY = 5
# Bytes read per (sample, vocabulary entry): one float32 logit, re-read for each sample.
UNCERTAINTY_BYTES_PER_ENTRY = 4
# Bytes per cached key or value element (float16 KV cache).
KV_BYTES_PER_VALUE = 2

_EULER_GAMMA = 0.5772156649015329
_LOG2_E = 1.0 / math.log(2.0)
# exp1: power series below this argument, continued fraction above it. At the switch
# both are accurate to ~1e-9 in float64 (float32 rounding dominates).
_EXP1_SWITCH = 1.0
_EXP1_SERIES_TERMS = 30
_EXP1_FRACTION_DEPTH = 40
# Expectations over g ~ Exp(1) use the trapezoid rule in t = log g on [lo, hi]: the
# integrand exp(t - e^t)·f(e^t) is analytic in a strip of half-width π/2 and decays
# double-exponentially to the right, exponentially to the left, so the rule converges
# geometrically (error ~ exp(-π² / Δt) ≈ 1e-8 here). The left end covers the
# transition of f at log(2^η / SNR) for SNRs up to SNR_DB_RANGE's top.
_FADING_LOG_GAIN_LO = -30.0
_FADING_LOG_GAIN_HI = 4.0
_FADING_NODES = 64


# ----------------------------------------------------------------------------- checks


def _concrete(value: Any) -> np.ndarray | None:
    """Returns ``value`` as a float64 array if it is concrete, else None.

    Config validation runs on construction, but JAX rebuilds pytrees with tracers and
    placeholder leaves; those are skipped, concrete numbers are checked.
    """
    if value is None or isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _check(name: str, value: Any, ok, requirement: str) -> None:
    arr = _concrete(value)
    if arr is not None and not np.all(ok(arr)):
        raise ValueError(f"{name}={value!r} is invalid: {requirement}")


def _positive(name: str, value: Any) -> None:
    _check(name, value, lambda a: np.isfinite(a) & (a > 0), "it must be finite and > 0")


def _non_negative(name: str, value: Any) -> None:
    _check(name, value, lambda a: np.isfinite(a) & (a >= 0), "it must be finite and >= 0")


def _snr_in_range(name: str, value: Any) -> None:
    lo, hi = SNR_DB_RANGE
    _check(
        name,
        value,
        lambda a: (a >= lo) & (a <= hi),
        f"a mean SNR must lie in [{lo:g}, {hi:g}] dB (did you pass a linear SNR or dBm?)",
    )


def _parse_enum(cls: type[enum.Enum], name: str, what: str) -> Any:
    for member in cls:
        if name in (member.name.lower(), getattr(member.value, "name", member.value)):
            return member
    valid = ", ".join(getattr(m.value, "name", m.name.lower()) for m in cls)
    raise ValueError(f"unknown {what} {name!r}; use one of: {valid}")


def db_to_linear(value_db: Float[Array, " ..."] | float) -> Float[Array, " ..."]:
    """``10^(x/10)``: a power ratio in dB to linear."""
    return jnp.power(10.0, jnp.asarray(value_db, jnp.float32) / 10.0)


# ---------------------------------------------------------------------------- payload


def token_id_bits(vocab_size: int) -> int:
    """Bits to address one of ``V`` tokens, ``⌈log2 V⌉`` (15 for V = 32000)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} is invalid: a vocabulary needs >= 2 tokens")
    return int(vocab_size - 1).bit_length()


def full_distribution_bits(vocab_size: int, bits_per_prob: Float[Array, ""] | float):
    """Uplink payload of HLM: every probability, ``V · b`` bits (256000 for 32000 × 8)."""
    _positive("bits_per_prob", bits_per_prob)
    token_id_bits(vocab_size)
    return vocab_size * jnp.asarray(bits_per_prob, jnp.float32)


def top_k_bits(
    top_k: Int[Array, " ..."] | int,
    vocab_size: int,
    bits_per_prob: Float[Array, ""] | float,
) -> Float[Array, " ..."]:
    """CU-HLM truncated uplink payload, ``k · (b + ⌈log2 V⌉)`` bits.

    Each kept entry carries its probability (``b`` bits) and its index; the receiver
    spreads the omitted mass uniformly (see `uhlm_jax.truncation`). 690 bits for
    k = 30, b = 8, V = 32000.

    Raises:
      ValueError: if a concrete ``top_k`` is outside [1, V] or ``b <= 0``.
    """
    _check(
        "top_k",
        top_k,
        lambda a: (a >= 1) & (a <= vocab_size),
        f"k must lie in [1, vocab_size={vocab_size}]",
    )
    _positive("bits_per_prob", bits_per_prob)
    k = jnp.asarray(top_k, jnp.float32)
    return k * (jnp.asarray(bits_per_prob, jnp.float32) + token_id_bits(vocab_size))


def downlink_bits(vocab_size: int) -> int:
    """Downlink payload per verified token: the emitted token's id, ``⌈log2 V⌉`` bits.

    The acceptance decision is implied by the id (equal to the draft or not).
    """
    return token_id_bits(vocab_size)


# ------------------------------------------------------------------- exponential integral


def exp1_scaled(x: Float[Array, " ..."]) -> Float[Array, " ..."]:
    """``e^x · E1(x)`` for ``x > 0``, without overflow for large ``x``.

    ``E1(x) = ∫_x^∞ e^{-t}/t dt``. For ``x <= 1`` the power series
    ``E1(x) = -γ - ln x - Σ_{k>=1} (-x)^k / (k · k!)``; above, the continued fraction
    ``e^x E1(x) = 1 / (x + 1 - 1² / (x + 3 - 2² / (x + 5 - ...)))`` evaluated backwards
    at a fixed depth (Abramowitz & Stegun 5.1.11 and 5.1.22; Numerical Recipes §6.3).
    """
    x = jnp.asarray(x, jnp.float32)
    xs = jnp.minimum(x, _EXP1_SWITCH)
    term = jnp.ones_like(xs)
    series = jnp.zeros_like(xs)
    for k in range(1, _EXP1_SERIES_TERMS + 1):
        term = term * (-xs) / k
        series = series + term / k
    small = (-_EULER_GAMMA - jnp.log(xs) - series) * jnp.exp(xs)
    xf = jnp.maximum(x, _EXP1_SWITCH)
    f = xf + 2 * _EXP1_FRACTION_DEPTH + 1
    for n in range(_EXP1_FRACTION_DEPTH, 0, -1):
        f = xf + 2 * n - 1 - n * n / f
    large = 1.0 / f
    return jnp.where(x <= _EXP1_SWITCH, small, large)


def exp1(x: Float[Array, " ..."]) -> Float[Array, " ..."]:
    """The exponential integral ``E1(x) = ∫_x^∞ e^{-t}/t dt`` for ``x > 0``."""
    x = jnp.asarray(x, jnp.float32)
    return exp1_scaled(x) * jnp.exp(-x)


# ------------------------------------------------------------------------------- link


class Fading(enum.Enum):
    """Small-scale fading of the link.

    Attributes:
      NONE: a static (AWGN) link at the mean SNR; no outage.
      RAYLEIGH: Rayleigh block fading, power gain ``g ~ Exp(1)`` drawn independently per
        token and direction, with outage below ``min_efficiency_bits_per_s_hz``.
    """

    NONE = "none"
    RAYLEIGH = "rayleigh"


@dataclasses.dataclass(frozen=True)
class LinkBudget:
    """Physical parameters from which a link's mean SNR follows.

    ``SNR_dB = P_tx − PL(d) − (N0 + 10 log10 W + NF)``, with log-distance path loss
    ``PL(d) = PL_1m + 10 n log10(d / 1 m)`` (no shadowing, no antenna gain).

    Attributes:
      tx_power_dbm: transmit power.
      distance_m: transmitter–receiver distance (3-D).
      reference_loss_db: path loss at 1 m, ``PL_1m``.
      path_loss_exponent: ``n``; 10·n dB per decade of distance.
      bandwidth_hz: occupied bandwidth ``W``.
      noise_figure_db: receiver noise figure ``NF``.
      noise_psd_dbm_per_hz: noise spectral density ``N0`` (thermal, −174 dBm/Hz).
      min_efficiency_bits_per_s_hz: outage threshold ``η_min``: the lowest spectral
        efficiency the link can use.
      retry_delay_s: time lost per outage before a fresh fading block.
      description: where the numbers come from.
    """

    tx_power_dbm: float
    distance_m: float
    reference_loss_db: float
    path_loss_exponent: float
    bandwidth_hz: float
    noise_figure_db: float
    noise_psd_dbm_per_hz: float = THERMAL_NOISE_DBM_PER_HZ
    min_efficiency_bits_per_s_hz: float = 0.1523
    retry_delay_s: float = 1e-3
    description: str = ""

    def __post_init__(self):
        _positive("distance_m", self.distance_m)
        _positive("bandwidth_hz", self.bandwidth_hz)
        _positive("path_loss_exponent", self.path_loss_exponent)
        _non_negative("noise_figure_db", self.noise_figure_db)
        _positive("min_efficiency_bits_per_s_hz", self.min_efficiency_bits_per_s_hz)
        _non_negative("retry_delay_s", self.retry_delay_s)


def mean_snr_db(budget: LinkBudget, bandwidth_hz: float | None = None) -> float:
    """Mean SNR of a link budget in dB, optionally at another bandwidth.

    Noise power grows with bandwidth, so widening the band lowers the SNR.
    """
    w_hz = budget.bandwidth_hz if bandwidth_hz is None else bandwidth_hz
    _positive("bandwidth_hz", w_hz)
    path_loss_db = budget.reference_loss_db + 10.0 * budget.path_loss_exponent * math.log10(
        budget.distance_m
    )
    noise_dbm = budget.noise_psd_dbm_per_hz + 10.0 * math.log10(w_hz) + budget.noise_figure_db
    return budget.tx_power_dbm - path_loss_db - noise_dbm


# 3GPP TR 38.901 Table 7.4.1-1, UMa at f_c = 3.5 GHz (20·log10 3.5 = 10.88 dB):
#   LOS:  PL = 28.0 + 22.0 log10(d) + 20 log10(f_c)   -> PL_1m 38.88 dB, n = 2.2
#   NLOS: PL = 13.54 + 39.08 log10(d) + 20 log10(f_c) -> PL_1m 24.42 dB, n = 3.908
# (UE height term dropped, UE at 1.5 m). UE transmit power 23 dBm (TS 38.101-1 power
# class 3), gNB noise figure 5 dB (TR 38.802 evaluation assumptions), 20 MHz carrier.
# Outage below 0.1523 bit/s/Hz, the lowest CQI of TS 38.214 Table 5.2.2.1-2 (QPSK,
# code rate 78/1024); 1 ms retry (one 15 kHz-numerology subframe).
_UMA_LOS_LOSS_DB = 28.0 + 20.0 * math.log10(3.5)
_UMA_NLOS_LOSS_DB = 13.54 + 20.0 * math.log10(3.5)


class LinkPreset(enum.Enum):
    """Named uplink conditions (3GPP UMa at 3.5 GHz, 20 MHz, 23 dBm UE, NF 5 dB).

    Mean SNRs (from `mean_snr_db`): GOOD ≈ 36.1 dB, MEDIUM ≈ 9.5 dB, POOR ≈ −7.1 dB.

    Attributes:
      GOOD: line of sight at 100 m.
      MEDIUM: non-line of sight at 150 m.
      POOR: non-line of sight at 400 m (cell edge).
    """

    GOOD = LinkBudget(
        tx_power_dbm=23.0,
        distance_m=100.0,
        reference_loss_db=_UMA_LOS_LOSS_DB,
        path_loss_exponent=2.2,
        bandwidth_hz=20e6,
        noise_figure_db=5.0,
        description="3GPP TR 38.901 UMa LOS, 3.5 GHz, 100 m",
    )
    MEDIUM = LinkBudget(
        tx_power_dbm=23.0,
        distance_m=150.0,
        reference_loss_db=_UMA_NLOS_LOSS_DB,
        path_loss_exponent=3.908,
        bandwidth_hz=20e6,
        noise_figure_db=5.0,
        description="3GPP TR 38.901 UMa NLOS, 3.5 GHz, 150 m",
    )
    POOR = LinkBudget(
        tx_power_dbm=23.0,
        distance_m=400.0,
        reference_loss_db=_UMA_NLOS_LOSS_DB,
        path_loss_exponent=3.908,
        bandwidth_hz=20e6,
        noise_figure_db=5.0,
        description="3GPP TR 38.901 UMa NLOS, 3.5 GHz, 400 m",
    )

    @classmethod
    def from_name(cls, name: str) -> LinkPreset:
        """Parses ``"good"``, ``"medium"`` or ``"poor"``.

        Raises:
          ValueError: naming the unknown value and the valid ones.
        """
        return _parse_enum(cls, name, "link preset")


@struct.dataclass
class Link:
    """A wireless link as the latency model sees it; both directions share it.

    Array fields sweep without recompiling; ``fading`` is static. The downlink reuses
    the uplink's link, a conservative choice (a base station transmits with more power)
    that hardly matters: it carries ``⌈log2 V⌉`` bits per token.

    Attributes:
      bandwidth_hz: ``W``.
      mean_snr_db: mean received SNR in dB, within `SNR_DB_RANGE`.
      min_efficiency_bits_per_s_hz: outage threshold ``η_min`` (> 0).
      retry_delay_s: time lost per outage.
      overhead_s: fixed delay per transmission (scheduling, propagation); 0 reproduces
        the paper's model.
      fading: the fading model (static).
    """

    bandwidth_hz: Float[Array, ""] | float
    mean_snr_db: Float[Array, ""] | float
    min_efficiency_bits_per_s_hz: Float[Array, ""] | float = 0.1523
    retry_delay_s: Float[Array, ""] | float = 1e-3
    overhead_s: Float[Array, ""] | float = 0.0
    fading: Fading = struct.field(pytree_node=False, default=Fading.RAYLEIGH)

    def __post_init__(self):
        _positive("bandwidth_hz", self.bandwidth_hz)
        _snr_in_range("mean_snr_db", self.mean_snr_db)
        _positive("min_efficiency_bits_per_s_hz", self.min_efficiency_bits_per_s_hz)
        _non_negative("retry_delay_s", self.retry_delay_s)
        _non_negative("overhead_s", self.overhead_s)
        if not isinstance(self.fading, Fading):
            raise ValueError(f"fading={self.fading!r} is invalid: use a uhlm_jax.channel.Fading")


def link_from_budget(
    budget: LinkBudget | LinkPreset,
    *,
    bandwidth_hz: float | None = None,
    snr_db: float | None = None,
    fading: Fading = Fading.RAYLEIGH,
) -> Link:
    """Builds a `Link` from a budget or preset, with optional overrides.

    Args:
      budget: physical parameters, or a named preset.
      bandwidth_hz: another bandwidth; unless ``snr_db`` is given, the SNR is recomputed
        (noise grows with bandwidth).
      snr_db: a mean SNR that replaces the budget's.
      fading: fading model.
    """
    if isinstance(budget, LinkPreset):
        budget = budget.value
    w_hz = budget.bandwidth_hz if bandwidth_hz is None else bandwidth_hz
    _positive("bandwidth_hz", w_hz)
    snr = mean_snr_db(budget, w_hz) if snr_db is None else snr_db
    return Link(
        bandwidth_hz=float(w_hz),
        mean_snr_db=float(snr),
        min_efficiency_bits_per_s_hz=budget.min_efficiency_bits_per_s_hz,
        retry_delay_s=budget.retry_delay_s,
        fading=fading,
    )


def shannon_rate_bits_per_s(
    bandwidth_hz: Float[Array, " ..."] | float,
    snr_db: Float[Array, " ..."] | float,
    gain: Float[Array, " ..."] | float = 1.0,
) -> Float[Array, " ..."]:
    """Shannon rate ``W log2(1 + SNR · g)`` in bit/s (34.59 Mbit/s at 10 dB, 10 MHz).

    Args:
      bandwidth_hz: ``W``.
      snr_db: mean SNR in dB.
      gain: fading power gain ``g`` (1 for a static link).
    """
    _positive("bandwidth_hz", bandwidth_hz)
    _snr_in_range("snr_db", snr_db)
    snr = db_to_linear(snr_db) * jnp.asarray(gain, jnp.float32)
    return jnp.asarray(bandwidth_hz, jnp.float32) * jnp.log1p(snr) * _LOG2_E


def ergodic_rate_bits_per_s(
    bandwidth_hz: Float[Array, " ..."] | float, snr_db: Float[Array, " ..."] | float
) -> Float[Array, " ..."]:
    """Mean Shannon rate under Rayleigh fading, in closed form.

    ``E[W log2(1 + SNR·g)] = W · log2(e) · e^{1/SNR} · E1(1/SNR)`` for ``g ~ Exp(1)``
    (e.g. Goldsmith, *Wireless Communications*, §4.2.4). Ignores outage.
    """
    _positive("bandwidth_hz", bandwidth_hz)
    _snr_in_range("snr_db", snr_db)
    inv_snr = 1.0 / db_to_linear(snr_db)
    return jnp.asarray(bandwidth_hz, jnp.float32) * _LOG2_E * exp1_scaled(inv_snr)


def _outage_gain(link: Link) -> Float[Array, ""]:
    """Fading gain below which the link is in outage, ``(2^η_min − 1) / SNR``."""
    eta = jnp.asarray(link.min_efficiency_bits_per_s_hz, jnp.float32)
    return jnp.expm1(eta * math.log(2.0)) / db_to_linear(link.mean_snr_db)


def outage_probability(link: Link) -> Float[Array, ""]:
    """Probability that a fading block is in outage, ``1 − exp(−g_th)`` (0 without fading).

    ``g_th = (2^η_min − 1) / SNR`` is the gain at which ``W log2(1 + SNR·g) = η_min·W``.
    """
    if link.fading is Fading.NONE:
        return jnp.zeros((), jnp.float32)
    return -jnp.expm1(-_outage_gain(link))


def _fading_nodes() -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``g_j`` and weights ``w_j`` with ``Σ_j w_j f(g_j) ≈ E[f(g)], g ~ Exp(1)``."""
    t = np.linspace(_FADING_LOG_GAIN_LO, _FADING_LOG_GAIN_HI, _FADING_NODES)
    dt = t[1] - t[0]
    gain = np.exp(t)
    weight = dt * np.exp(t - gain)
    return gain.astype(np.float32), weight.astype(np.float32)


def _expected_seconds_per_bit(link: Link) -> Float[Array, ""]:
    """``E[1 / R]`` in s/bit over the blocks that are not in outage.

    The gain of the first usable block is ``g_th + X`` with ``X ~ Exp(1)`` (memoryless),
    so ``E[1/R] = ∫ e^{-x} / (W log2(2^η_min + SNR·x)) dx``, finite because ``η_min > 0``.
    """
    w_hz = jnp.asarray(link.bandwidth_hz, jnp.float32)
    snr = db_to_linear(link.mean_snr_db)
    if link.fading is Fading.NONE:
        return 1.0 / (w_hz * jnp.log1p(snr) * _LOG2_E)
    eta = jnp.asarray(link.min_efficiency_bits_per_s_hz, jnp.float32)
    gain, weight = _fading_nodes()
    efficiency = jnp.log2(jnp.exp2(eta) + snr * gain)
    return jnp.sum(weight / efficiency) / w_hz


def expected_transmission_latency_s(
    bits: Float[Array, ""] | float, link: Link
) -> Float[Array, ""]:
    """Expected time to deliver ``bits`` over ``link``, in seconds.

    Static link: ``bits / R + overhead``. Rayleigh: the number of outage blocks before a
    usable one is geometric with mean ``p_out / (1 − p_out) = e^{g_th} − 1``, so
    ``E[τ] = (e^{g_th} − 1) · retry_delay + bits · E[1/R | usable] + overhead``, the
    second term by quadrature (`_expected_seconds_per_bit`).
    """
    bits = jnp.asarray(bits, jnp.float32)
    overhead_s = jnp.asarray(link.overhead_s, jnp.float32)
    transfer_s = bits * _expected_seconds_per_bit(link)
    if link.fading is Fading.NONE:
        return transfer_s + overhead_s
    retries = jnp.expm1(_outage_gain(link))
    return retries * jnp.asarray(link.retry_delay_s, jnp.float32) + transfer_s + overhead_s


def sample_transmission_latency_s(
    bits: Float[Array, ""] | float, link: Link, key: PRNGKeyArray
) -> Float[Array, ""]:
    """One random draw of the time to deliver ``bits`` over ``link``, in seconds.

    Rayleigh: outage blocks ``F ~ Geometric`` with ``P(F >= f) = p_out^f``, each costing
    ``retry_delay_s``; the usable block has gain ``g_th + Exp(1)`` and rate
    ``W log2(1 + SNR·g)``; the payload fits in that one block (block fading per token).
    Static link: deterministic, ``key`` unused.
    """
    chex.assert_rank(jnp.asarray(bits), 0)
    if link.fading is Fading.NONE:
        return expected_transmission_latency_s(bits, link)
    retry_key, gain_key = jax.random.split(key)
    w_hz = jnp.asarray(link.bandwidth_hz, jnp.float32)
    snr = db_to_linear(link.mean_snr_db)
    g_th = _outage_gain(link)
    # log p_out = log(1 − e^{−g}); log1p(−e^{−g}) is exact for large g, log(−expm1(−g))
    # for small g.
    log_p_out = jnp.where(
        g_th > 1.0, jnp.log1p(-jnp.exp(-g_th)), jnp.log(-jnp.expm1(-jnp.minimum(g_th, 1.0)))
    )
    uniform = 1.0 - jax.random.uniform(retry_key, (), jnp.float32)  # in (0, 1]
    # Certain outage (p_out rounds to 1) gives infinitely many failures, never 0/0.
    log_p_out = jnp.minimum(log_p_out, -jnp.finfo(jnp.float32).tiny)
    failures = jnp.floor(jnp.log(uniform) / log_p_out)
    gain = g_th + jax.random.exponential(gain_key, (), jnp.float32)
    rate = w_hz * jnp.log1p(snr * gain) * _LOG2_E
    return (
        failures * jnp.asarray(link.retry_delay_s, jnp.float32)
        + jnp.asarray(bits, jnp.float32) / rate
        + jnp.asarray(link.overhead_s, jnp.float32)
    )


# ---------------------------------------------------------------------------- compute


class Precision(enum.Enum):
    """Storage precision of weights; the value is bytes per parameter."""

    FLOAT32 = 4.0
    FLOAT16 = 2.0
    INT8 = 1.0
    INT4 = 0.5

    @classmethod
    def from_name(cls, name: str) -> Precision:
        """Parses ``"float32"``, ``"float16"``, ``"int8"`` or ``"int4"``."""
        return _parse_enum(cls, name, "precision")


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of a Llama-family decoder, enough to cost a decode step.

    Attributes:
      name: command-line name.
      n_layers: transformer blocks ``L``.
      d_model: hidden size ``h``.
      n_heads: query heads.
      n_kv_heads: key/value heads (GQA).
      head_dim: per-head size.
      d_ff: SwiGLU intermediate size.
      vocab_size: ``V``.
      tied_embeddings: whether the output head reuses the input embedding.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    tied_embeddings: bool

    def __post_init__(self):
        for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} is invalid: it must be >= 1")
        token_id_bits(self.vocab_size)


def _layer_matmul_parameters(model: ModelProfile) -> int:
    attention = model.d_model * (2 * model.n_heads + 2 * model.n_kv_heads) * model.head_dim
    mlp = 3 * model.d_model * model.d_ff
    return attention + mlp


def parameter_count(model: ModelProfile) -> int:
    """All parameters: blocks, RMSNorm gains, embedding and (untied) output head."""
    blocks = model.n_layers * (_layer_matmul_parameters(model) + 2 * model.d_model)
    embeddings = model.vocab_size * model.d_model * (1 if model.tied_embeddings else 2)
    return blocks + embeddings + model.d_model


def _decode_matmul_parameters(model: ModelProfile) -> int:
    """Parameters a decode step multiplies with: blocks and output head.

    The input embedding is a row lookup, not a matrix product.
    """
    return model.n_layers * _layer_matmul_parameters(model) + model.vocab_size * model.d_model


def decode_flops(model: ModelProfile, context_tokens: int) -> int:
    """FLOPs to decode one token after ``context_tokens`` cached ones.

    ``2 · N_matmul + 4 · L · n_heads · head_dim · context`` (weights, then ``q·Kᵀ`` and
    ``attn·V``; Kaplan et al. 2020, arXiv 2001.08361, Table 1).
    """
    attention = 4 * model.n_layers * model.n_heads * model.head_dim * context_tokens
    return 2 * _decode_matmul_parameters(model) + attention


def decode_bytes(model: ModelProfile, precision: Precision, context_tokens: int) -> float:
    """Bytes read from memory to decode one token at batch 1.

    Every multiplied weight once at ``precision``, plus the KV cache
    (``2 · L · context · n_kv_heads · head_dim`` values of `KV_BYTES_PER_VALUE`).
    """
    weights = _decode_matmul_parameters(model) * precision.value
    cache = 2 * model.n_layers * context_tokens * model.n_kv_heads * model.head_dim
    return weights + cache * KV_BYTES_PER_VALUE


class ModelSize(enum.Enum):
    """Named model-size profiles (numbers from each model's Hugging Face config.json).

    Parameter counts from `parameter_count`: TinyLlama-1.1B 1.100e9, Llama-2-7B 6.738e9,
    SmolLM2-135M 1.345e8.
    """

    TINYLLAMA_1_1B = ModelProfile(
        name="tinyllama-1.1b",  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
        n_layers=22,
        d_model=2048,
        n_heads=32,
        n_kv_heads=4,
        head_dim=64,
        d_ff=5632,
        vocab_size=32000,
        tied_embeddings=False,
    )
    LLAMA_2_7B = ModelProfile(
        name="llama-2-7b",  # meta-llama/Llama-2-7b-hf
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
        vocab_size=32000,
        tied_embeddings=False,
    )
    SMOLLM2_135M = ModelProfile(
        name="smollm2-135m",  # HuggingFaceTB/SmolLM2-135M-Instruct
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        vocab_size=49152,
        tied_embeddings=True,
    )

    @classmethod
    def from_name(cls, name: str) -> ModelSize:
        """Parses ``"tinyllama-1.1b"``, ``"llama-2-7b"`` or ``"smollm2-135m"``."""
        return _parse_enum(cls, name, "model")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Roofline of a device: peak arithmetic and memory bandwidth.

    Attributes:
      name: command-line name.
      peak_flops_per_s: dense peak at the deployment's compute precision.
      memory_bytes_per_s: peak memory bandwidth.
      description: the hardware and where the numbers come from.
    """

    name: str
    peak_flops_per_s: float
    memory_bytes_per_s: float
    description: str = ""

    def __post_init__(self):
        _positive("peak_flops_per_s", self.peak_flops_per_s)
        _positive("memory_bytes_per_s", self.memory_bytes_per_s)


class Device(enum.Enum):
    """Named device profiles. Decode at batch 1 is bandwidth-bound on all of them."""

    PHONE_SOC = DeviceProfile(
        name="phone-soc",
        peak_flops_per_s=4.0e12,
        memory_bytes_per_s=76.8e9,
        description=(
            "Snapdragon 8 Gen 3 class: LPDDR5X-9600 on a 64-bit bus = 76.8 GB/s (Qualcomm "
            "product brief); ~4 TFLOP/s FP16 is an order-of-magnitude GPU/NPU figure"
        ),
    )
    EDGE_GPU = DeviceProfile(
        name="edge-gpu",
        peak_flops_per_s=42.5e12,
        memory_bytes_per_s=204.8e9,
        description=(
            "NVIDIA Jetson AGX Orin 64GB: 204.8 GB/s LPDDR5 (datasheet); FP16 dense "
            "~42.5 TFLOP/s, a quarter of the GPU's 170 sparse INT8 TOPS"
        ),
    )
    DATACENTER_GPU = DeviceProfile(
        name="datacenter-gpu",
        peak_flops_per_s=312e12,
        memory_bytes_per_s=2.039e12,
        description="NVIDIA A100 80GB SXM: 312 TFLOP/s dense FP16, 2.039 TB/s HBM2e (datasheet)",
    )
    REFERENCE_CPU = DeviceProfile(
        name="reference-cpu",
        peak_flops_per_s=130e9,
        memory_bytes_per_s=29e9,
        description="the project's 2-core CPU, as measured in DESIGN.md §5",
    )

    @classmethod
    def from_name(cls, name: str) -> Device:
        """Parses ``"phone-soc"``, ``"edge-gpu"``, ``"datacenter-gpu"``, ``"reference-cpu"``."""
        return _parse_enum(cls, name, "device")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A model on a device.

    Attributes:
      model: architecture numbers.
      device: roofline numbers.
      precision: weight storage precision.
      context_tokens: cached tokens attended to per step (a typical mid-generation length).
    """

    model: ModelSize | ModelProfile
    device: Device | DeviceProfile
    precision: Precision = Precision.FLOAT16
    context_tokens: int = 512

    def __post_init__(self):
        if self.context_tokens < 0:
            raise ValueError(
                f"context_tokens={self.context_tokens} is invalid: it must be >= 0"
            )

    @property
    def model_profile(self) -> ModelProfile:
        return self.model.value if isinstance(self.model, ModelSize) else self.model

    @property
    def device_profile(self) -> DeviceProfile:
        return self.device.value if isinstance(self.device, Device) else self.device


def _roofline_s(flops: float, bytes_: float, device: DeviceProfile) -> float:
    return max(flops / device.peak_flops_per_s, bytes_ / device.memory_bytes_per_s)


def compute_latency_s(deployment: Deployment) -> float:
    """Roofline latency of one decode step, ``max(FLOPs / peak, bytes / bandwidth)``.

    A lower bound: it assumes peak throughput and no kernel overheads. E.g.
    Llama-2-7B in float16 on the A100 profile: 13.5 GB / 2.039 TB/s ≈ 6.6 ms.
    """
    model = deployment.model_profile
    return _roofline_s(
        decode_flops(model, deployment.context_tokens),
        decode_bytes(model, deployment.precision, deployment.context_tokens),
        deployment.device_profile,
    )


def uncertainty_latency_s(device: Device | DeviceProfile, vocab_size: int, samples: int) -> float:
    """Roofline latency of the temperature-perturbation uncertainty on the device.

    ``K`` Gumbel-max samples over ``V`` logits: `UNCERTAINTY_FLOPS_PER_ENTRY` FLOPs and
    `UNCERTAINTY_BYTES_PER_ENTRY` bytes per (sample, entry).
    """
    if samples < 1:
        raise ValueError(f"samples={samples} is invalid: it must be >= 1")
    token_id_bits(vocab_size)
    profile = device.value if isinstance(device, Device) else device
    entries = samples * vocab_size
    return _roofline_s(
        entries * UNCERTAINTY_FLOPS_PER_ENTRY, entries * UNCERTAINTY_BYTES_PER_ENTRY, profile
    )


# ----------------------------------------------------------------------- cost profile


@struct.dataclass
class CostProfile:
    """What a generated token costs: models, devices, link and uplink payload.

    Independent of the models that produced any records, so token statistics from a
    small pair can be costed as, e.g., TinyLlama on a phone with Llama-2-7B on a server.
    ``link``, ``bits_per_prob`` and ``top_k`` are pytree leaves (sweepable); the rest
    is static.

    Attributes:
      slm: the drafting model and its device.
      llm: the verifying model and its device.
      link: the wireless link (both directions).
      vocab_size: ``V`` of the uplinked distribution (static).
      bits_per_prob: bits per transmitted probability ``b``.
      top_k: None for the full distribution, else the CU-HLM truncation ``k`` in [1, V].
      uncertainty_samples: ``K`` of the temperature-perturbation uncertainty (static).
    """

    slm: Deployment = struct.field(pytree_node=False)
    llm: Deployment = struct.field(pytree_node=False)
    link: Link
    vocab_size: int = struct.field(pytree_node=False)
    bits_per_prob: Float[Array, ""] | float = 16.0
    top_k: Int[Array, ""] | int | None = None
    uncertainty_samples: int = struct.field(pytree_node=False, default=20)

    def __post_init__(self):
        token_id_bits(self.vocab_size)
        _positive("bits_per_prob", self.bits_per_prob)
        _check(
            "top_k",
            self.top_k,
            lambda a: (a >= 1) & (a <= self.vocab_size),
            f"k must lie in [1, vocab_size={self.vocab_size}] (or None for the full "
            "distribution)",
        )
        if self.uncertainty_samples < 1:
            raise ValueError(
                f"uncertainty_samples={self.uncertainty_samples} is invalid: it must be >= 1"
            )


def uplink_bits(profile: CostProfile) -> Float[Array, ""]:
    """Uplink payload per transmitted token under ``profile``, in bits."""
    if profile.top_k is None:
        return full_distribution_bits(profile.vocab_size, profile.bits_per_prob)
    return top_k_bits(profile.top_k, profile.vocab_size, profile.bits_per_prob)


@struct.dataclass
class LatencyBreakdown:
    """Expected per-token latency terms, in seconds.

    Attributes:
      slm_s: ``τ_SLM``, one SLM decode step on the device.
      uncertainty_s: ``τ_unc``, the uncertainty on the device.
      uplink_s: ``E[τ_UL]``, the distribution upload.
      llm_s: ``τ_LLM``, one LLM decode (verification) step at the base station.
      downlink_s: ``E[τ_DL]``, the emitted token's id.
    """

    slm_s: Float[Array, ""]
    uncertainty_s: Float[Array, ""]
    uplink_s: Float[Array, ""]
    llm_s: Float[Array, ""]
    downlink_s: Float[Array, ""]


def _compute_terms_s(profile: CostProfile) -> tuple[float, float, float]:
    return (
        compute_latency_s(profile.slm),
        uncertainty_latency_s(
            profile.slm.device, profile.vocab_size, profile.uncertainty_samples
        ),
        compute_latency_s(profile.llm),
    )


def expected_breakdown(
    profile: CostProfile, uplink_bits_per_token: Float[Array, ""] | None = None
) -> LatencyBreakdown:
    """Expected latency terms of one transmitted token (link terms averaged over fading)."""
    slm_s, unc_s, llm_s = _compute_terms_s(profile)
    ul_bits = uplink_bits(profile) if uplink_bits_per_token is None else uplink_bits_per_token
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)
    return LatencyBreakdown(
        slm_s=as_f32(slm_s),
        uncertainty_s=as_f32(unc_s),
        uplink_s=expected_transmission_latency_s(ul_bits, profile.link),
        llm_s=as_f32(llm_s),
        downlink_s=expected_transmission_latency_s(
            float(downlink_bits(profile.vocab_size)), profile.link
        ),
    )


def mode_latency_s(
    mode: Mode, terms: LatencyBreakdown, transmitted: Bool[Array, ""] | Float[Array, ""]
) -> Float[Array, ""]:
    """Per-token latency of ``mode`` from its terms; ``transmitted`` may be a share.

    * LLM-only: ``τ_LLM + τ_DL``, tokens streamed to the device. The prompt upload is a
      one-off cost shared by every mode that uses the LLM, left out of per-token terms.
    * SLM-only: ``τ_SLM``.
    * HLM: ``τ_SLM + τ_unc + τ_UL + τ_LLM + τ_DL`` (τ_unc is charged as in DESIGN.md §2,
      so HLM and U-HLM differ only by skipping; it is microseconds on every profile).
    * U-HLM: ``τ_SLM + τ_unc + m · (τ_UL + τ_LLM + τ_DL)``, ``m`` transmitted.
    * Rand-HLM: ``τ_SLM + m · (τ_UL + τ_LLM + τ_DL)``; it needs no uncertainty.
    """
    remote_s = terms.uplink_s + terms.llm_s + terms.downlink_s
    m = jnp.asarray(transmitted, jnp.float32)
    if mode is Mode.LLM_ONLY:
        return terms.llm_s + terms.downlink_s
    if mode is Mode.SLM_ONLY:
        return terms.slm_s
    if mode is Mode.HLM:
        return terms.slm_s + terms.uncertainty_s + remote_s
    if mode is Mode.UHLM:
        return terms.slm_s + terms.uncertainty_s + m * remote_s
    if mode is Mode.RAND_HLM:
        return terms.slm_s + m * remote_s
    raise ValueError(f"mode={mode!r} is invalid: use a uhlm_jax.modes.Mode")


def _check_share(name: str, value: Any) -> None:
    _check(name, value, lambda a: (a >= 0) & (a <= 1), "a share must lie in [0, 1]")


def expected_token_latency_s(
    mode: Mode, profile: CostProfile, skip_share: Float[Array, ""] | float = 0.0
) -> Float[Array, ""]:
    """Expected latency per generated token, in seconds.

    Args:
      mode: inference mode (static).
      profile: cost profile.
      skip_share: share ``s`` of tokens not transmitted; used by U-HLM and Rand-HLM only.
    """
    _check_share("skip_share", skip_share)
    terms = expected_breakdown(profile)
    return mode_latency_s(mode, terms, 1.0 - jnp.asarray(skip_share, jnp.float32))


def expected_throughput_tokens_per_s(
    mode: Mode, profile: CostProfile, skip_share: Float[Array, ""] | float = 0.0
) -> Float[Array, ""]:
    """Long-run token throughput, ``1 / E[τ]`` tokens per second (ratio of expectations)."""
    return 1.0 / expected_token_latency_s(mode, profile, skip_share)


def speedup_bound(skip_share: Float[Array, " ..."] | float) -> Float[Array, " ..."]:
    """Upper bound ``1 / (1 − s)`` on U-HLM's speedup over HLM at skip share ``s``.

    With ``a = τ_SLM + τ_unc`` and ``c = τ_UL + τ_LLM + τ_DL``,
    ``(a + c) / (a + (1 − s) c) <= 1 / (1 − s)``, approached as ``a → 0``
    (1.85× at s = 45.93%).
    """
    _check(
        "skip_share", skip_share, lambda a: (a >= 0) & (a < 1), "it must lie in [0, 1)"
    )
    return 1.0 / (1.0 - jnp.asarray(skip_share, jnp.float32))


def expected_speedup(
    profile: CostProfile, skip_share: Float[Array, ""] | float
) -> Float[Array, ""]:
    """U-HLM's expected throughput over HLM's at skip share ``s``; ``<= 1 / (1 − s)``."""
    hlm_s = expected_token_latency_s(Mode.HLM, profile)
    return hlm_s / expected_token_latency_s(Mode.UHLM, profile, skip_share)


# ------------------------------------------------------------------- from records


def token_latencies_s(
    mode: Mode,
    transmitted: Bool[Array, " n"],
    valid: Bool[Array, " n"],
    profile: CostProfile,
    key: PRNGKeyArray,
    uplink_bits_per_token: Float[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Random per-token latencies of one generated sequence, in seconds.

    Fading is drawn per token and direction from ``fold_in(key, step)``, so two modes
    costed with the same key see the same channel on the same step (common random
    numbers), and a step's draw does not depend on the sequence length.

    Args:
      mode: inference mode (static). ``transmitted`` is read by U-HLM and Rand-HLM only:
        HLM transmits every token, LLM-only and SLM-only none.
      transmitted: whether each step's draft was uploaded and verified.
      valid: whether each step produced a token (False after the end of sequence);
        invalid steps cost 0.
      profile: cost profile.
      key: fading key of this sequence (derive per sequence with ``fold_in``).
      uplink_bits_per_token: per-step payloads, e.g. from an online top-k rule;
        defaults to the profile's payload.

    Returns:
      latency_s[n].
    """
    chex.assert_rank([transmitted, valid], 1)
    chex.assert_equal_shape([transmitted, valid])
    slm_s, unc_s, llm_s = _compute_terms_s(profile)
    n = transmitted.shape[0]
    ul_bits = (
        jnp.broadcast_to(uplink_bits(profile), (n,))
        if uplink_bits_per_token is None
        else jnp.asarray(uplink_bits_per_token, jnp.float32)
    )
    chex.assert_shape(ul_bits, (n,))
    dl_bits = float(downlink_bits(profile.vocab_size))

    def one(step, sent, bits):
        ul_key, dl_key = jax.random.split(jax.random.fold_in(key, step))
        terms = LatencyBreakdown(
            slm_s=jnp.float32(slm_s),
            uncertainty_s=jnp.float32(unc_s),
            uplink_s=sample_transmission_latency_s(bits, profile.link, ul_key),
            llm_s=jnp.float32(llm_s),
            downlink_s=sample_transmission_latency_s(dl_bits, profile.link, dl_key),
        )
        return mode_latency_s(mode, terms, sent)

    latency_s = jax.vmap(one)(jnp.arange(n), transmitted, ul_bits)
    return jnp.where(valid, latency_s, 0.0)


def latency_from_mask(
    mode: Mode,
    transmitted: Bool[Array, " n"],
    valid: Bool[Array, " n"],
    profile: CostProfile,
    key: PRNGKeyArray,
    uplink_bits_per_token: Float[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Total random latency of one generated sequence, in seconds (`token_latencies_s`)."""
    return jnp.sum(
        token_latencies_s(mode, transmitted, valid, profile, key, uplink_bits_per_token)
    )


def throughput_from_mask(
    mode: Mode,
    transmitted: Bool[Array, " n"],
    valid: Bool[Array, " n"],
    profile: CostProfile,
    key: PRNGKeyArray,
    uplink_bits_per_token: Float[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Tokens per second of one sequence: valid steps over total latency."""
    total_s = latency_from_mask(mode, transmitted, valid, profile, key, uplink_bits_per_token)
    tokens = jnp.sum(valid.astype(jnp.float32))
    return jnp.where(total_s > 0, tokens / jnp.where(total_s > 0, total_s, 1.0), 0.0)
