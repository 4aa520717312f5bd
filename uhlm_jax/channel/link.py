"""Wireless link: mean SNR from a link budget, Shannon rate, fading and outage.

The Shannon rate ``W log2(1 + SNR·g)`` with the mean SNR from a link budget (transmit
power, log-distance path loss, thermal noise × bandwidth × noise figure) and a Rayleigh
block-fading power gain ``g ~ Exp(1)`` drawn per token and direction. Outage: a block
whose rate would fall below ``η_min · W`` is not used; the transmitter waits
``retry_delay_s`` and tries again on a fresh block. SNR, bandwidth and the other `Link`
fields are pytree leaves, so a grid over them is a ``vmap`` that compiles once; the
fading model is static.

References:
  S. Oh et al., "Uncertainty-Aware Hybrid Inference with On-Device Small and Remote
  Large Language Models", ICMLCN 2025, arXiv 2412.12687 (U-HLM).
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

from uhlm_jax.channel.checks import check, non_negative, parse_enum, positive
from uhlm_jax.types import Array, ArrayLike, Float, PRNGKeyArray

# Mean SNRs outside this range are almost surely a unit mistake (linear vs dB, or dBm).
SNR_DB_RANGE = (-50.0, 80.0)
# Thermal noise power spectral density at 290 K.
THERMAL_NOISE_DBM_PER_HZ = -174.0

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


def _snr_in_range(name: str, value: Any) -> None:
    lo, hi = SNR_DB_RANGE
    check(
        name,
        value,
        lambda a: (a >= lo) & (a <= hi),
        f"a mean SNR must lie in [{lo:g}, {hi:g}] dB (did you pass a linear SNR or dBm?)",
    )


def db_to_linear(value_db: Float[Array, " ..."] | float) -> Float[Array, " ..."]:
    """``10^(x/10)``: a power ratio in dB to linear."""
    return jnp.power(10.0, jnp.asarray(value_db, jnp.float32) / 10.0)


# ------------------------------------------------------------------- exponential integral


def exp1_scaled(x: Float[ArrayLike, " ..."]) -> Float[Array, " ..."]:
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


def exp1(x: Float[ArrayLike, " ..."]) -> Float[Array, " ..."]:
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
        positive("distance_m", self.distance_m)
        positive("bandwidth_hz", self.bandwidth_hz)
        positive("path_loss_exponent", self.path_loss_exponent)
        non_negative("noise_figure_db", self.noise_figure_db)
        positive("min_efficiency_bits_per_s_hz", self.min_efficiency_bits_per_s_hz)
        non_negative("retry_delay_s", self.retry_delay_s)


def mean_snr_db(budget: LinkBudget, bandwidth_hz: float | None = None) -> float:
    """Mean SNR of a link budget in dB, optionally at another bandwidth.

    Noise power grows with bandwidth, so widening the band lowers the SNR.
    """
    w_hz = budget.bandwidth_hz if bandwidth_hz is None else bandwidth_hz
    positive("bandwidth_hz", w_hz)
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


def _uma_budget(distance_m: float, *, line_of_sight: bool) -> LinkBudget:
    """The 3GPP UMa uplink above at ``distance_m``, with or without line of sight."""
    return LinkBudget(
        tx_power_dbm=23.0,
        distance_m=distance_m,
        reference_loss_db=_UMA_LOS_LOSS_DB if line_of_sight else _UMA_NLOS_LOSS_DB,
        path_loss_exponent=2.2 if line_of_sight else 3.908,
        bandwidth_hz=20e6,
        noise_figure_db=5.0,
        description=(
            f"3GPP TR 38.901 UMa {'LOS' if line_of_sight else 'NLOS'}, 3.5 GHz, "
            f"{distance_m:g} m"
        ),
    )


class LinkPreset(enum.Enum):
    """Named uplink conditions (3GPP UMa at 3.5 GHz, 20 MHz, 23 dBm UE, NF 5 dB).

    Mean SNRs (from `mean_snr_db`): GOOD ≈ 36.1 dB, MEDIUM ≈ 9.5 dB, POOR ≈ −7.1 dB.

    Attributes:
      GOOD: line of sight at 100 m.
      MEDIUM: non-line of sight at 150 m.
      POOR: non-line of sight at 400 m (cell edge).
    """

    GOOD = _uma_budget(100.0, line_of_sight=True)
    MEDIUM = _uma_budget(150.0, line_of_sight=False)
    POOR = _uma_budget(400.0, line_of_sight=False)

    @classmethod
    def from_name(cls, name: str) -> LinkPreset:
        """Parses ``"good"``, ``"medium"`` or ``"poor"``.

        Raises:
          ValueError: naming the unknown value and the valid ones.
        """
        return parse_enum(cls, name, "link preset")


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
        positive("bandwidth_hz", self.bandwidth_hz)
        _snr_in_range("mean_snr_db", self.mean_snr_db)
        positive("min_efficiency_bits_per_s_hz", self.min_efficiency_bits_per_s_hz)
        non_negative("retry_delay_s", self.retry_delay_s)
        non_negative("overhead_s", self.overhead_s)
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
    positive("bandwidth_hz", w_hz)
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
    positive("bandwidth_hz", bandwidth_hz)
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
    positive("bandwidth_hz", bandwidth_hz)
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
