"""A grid of thresholds, measures, links and payloads, replayed into one tidy table.

`ReplayGrid` names the axes; `replay_table` replays every mode over their product
(`uhlm_jax.replay.replay_grid`) in fixed-size chunks compiled once per mode, and returns one
row per grid point and metric, with columns `source` (`replay`), `point`, `mode`,
`measure`, `threshold`, `transmit_probability`, `link`, `snr_db`, `bandwidth_hz`, `top_k`
(0: the full distribution), `bits_per_prob`, `metric`, `value` and `se` (NaN: replay has
no Monte Carlo error). Axes that do not affect a mode are dropped from its points: HLM has
no threshold, SLM-only and LLM-only upload no draft distribution.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from uhlm_jax import channel as ch
from uhlm_jax import console
from uhlm_jax import replay as rp
from uhlm_jax.modes import Mode, Transmission
from uhlm_jax.uncertainty import DEFAULT_MEASURE_NAMES

__all__ = [
    "DEFAULT_SNR_DB",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_TRANSMIT_PROBABILITIES",
    "SNR_BASE_PRESET",
    "LinkPoint",
    "ReplayGrid",
    "check_measure",
    "check_mode",
    "check_preset",
    "check_threshold",
    "check_transmit_probability",
    "replay_table",
]

DEFAULT_THRESHOLDS = tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, 41), 6))
DEFAULT_TRANSMIT_PROBABILITIES = tuple(float(x) for x in np.linspace(0, 1, 11))
DEFAULT_SNR_DB = tuple(float(x) for x in range(-10, 45, 5))
# Custom-SNR links take every other parameter (bandwidth, outage) from this preset.
SNR_BASE_PRESET = ch.LinkPreset.MEDIUM

# A link of the grid: (label, budget preset, SNR override, bandwidth override).
LinkPoint = tuple[str, ch.LinkPreset, float | None, float | None]


def check_measure(name: str) -> None:
    """Raises ValueError unless `name` is a known uncertainty measure."""
    if name not in DEFAULT_MEASURE_NAMES:
        raise ValueError(
            f"unknown measure {name!r}; use one of: {', '.join(DEFAULT_MEASURE_NAMES)}"
        )


def check_mode(mode: Any) -> None:
    """Raises ValueError unless `mode` is a `Mode`."""
    if not isinstance(mode, Mode):
        raise ValueError(f"mode {mode!r} is not a Mode; parse names with Mode.from_name")


def check_preset(preset: Any) -> None:
    """Raises ValueError unless `preset` is a `LinkPreset`."""
    if not isinstance(preset, ch.LinkPreset):
        raise ValueError(
            f"preset {preset!r} is not a LinkPreset; parse names with "
            "LinkPreset.from_name ('good', 'medium', 'poor')"
        )


def check_threshold(threshold: float) -> None:
    """Raises ValueError unless `threshold` is finite."""
    if not math.isfinite(threshold):
        raise ValueError(f"threshold {threshold!r} must be finite")


def check_transmit_probability(probability: float) -> None:
    """Raises ValueError unless `probability` lies in [0, 1]."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"transmit probability {probability!r} must lie in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ReplayGrid:
    """The axes of a replay grid; every mode is replayed over their product.

    Attributes:
        thresholds: U-HLM thresholds (skip when `u ≤ threshold`).
        measures: uncertainty measures U-HLM gates on; empty: every replayed measure.
        modes: modes to replay.
        transmit_probabilities: Rand-HLM transmit probabilities.
        presets: named links.
        snr_db: custom mean SNRs in dB, each a link with `SNR_BASE_PRESET`'s other
            parameters (links are the presets followed by these).
        bandwidths_hz: link bandwidths; empty keeps each link's own (the presets' SNR
            then follows the bandwidth; a custom SNR stays).
        top_k: CU-HLM uplink truncation `k`; 0 uploads the full distribution.
        bits_per_prob: bits per uploaded probability.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    measures: tuple[str, ...] = ()
    modes: tuple[Mode, ...] = tuple(Mode)
    transmit_probabilities: tuple[float, ...] = DEFAULT_TRANSMIT_PROBABILITIES
    presets: tuple[ch.LinkPreset, ...] = tuple(ch.LinkPreset)
    snr_db: tuple[float, ...] = DEFAULT_SNR_DB
    bandwidths_hz: tuple[float, ...] = ()
    top_k: tuple[int, ...] = (rp.FULL_DISTRIBUTION,)
    bits_per_prob: tuple[float, ...] = (16.0,)

    def __post_init__(self):
        axes = {
            "thresholds": self.thresholds,
            "modes": self.modes,
            "transmit_probabilities": self.transmit_probabilities,
            "top_k": self.top_k,
            "bits_per_prob": self.bits_per_prob,
        }
        for name, values in axes.items():
            if not isinstance(values, tuple) or not values:
                raise ValueError(
                    f"{name}={values!r} is an empty grid axis; give at least one value "
                    "(a tuple, or a TOML list)"
                )
        if not self.presets and not self.snr_db:
            raise ValueError("no link: give at least one preset or one snr_db value")
        for name in self.measures:
            check_measure(name)
        for mode in self.modes:
            check_mode(mode)
        for preset in self.presets:
            check_preset(preset)
        for t in self.thresholds:
            check_threshold(t)
        for p in self.transmit_probabilities:
            check_transmit_probability(p)
        # Builds every link, validating SNRs and bandwidths.
        for _, preset, snr, bandwidth in self.links():
            ch.link_from_budget(preset, bandwidth_hz=bandwidth, snr_db=snr)

    def links(self) -> list[LinkPoint]:
        """The links of the grid, presets first, each at every bandwidth."""
        bandwidths = self.bandwidths_hz or (None,)
        links = [(p.name.lower(), p, None) for p in self.presets]
        links += [(f"snr {s:g} dB", SNR_BASE_PRESET, float(s)) for s in self.snr_db]
        return [(label, preset, snr, w) for (label, preset, snr) in links for w in bandwidths]


def _mode_axes(grid: ReplayGrid, mode: Mode, measures: tuple[str, ...]) -> list[dict[str, Any]]:
    """Grid points of one mode as dicts; axes that do not affect the mode are dropped.

    U-HLM gates on `grid.measures`, or on every measure of `measures` (the rows of the
    replay tokens) when that is empty.
    """
    links = grid.links()
    nan = float("nan")
    policy = mode.policy
    if policy.transmission is Transmission.UNCERTAIN:
        gate = [(t, m, nan) for t in grid.thresholds for m in (grid.measures or measures)]
    elif policy.transmission is Transmission.RANDOM:
        gate = [(nan, None, p) for p in grid.transmit_probabilities]
    else:
        gate = [(nan, None, nan)]
    payload = (
        list(itertools.product(grid.top_k, grid.bits_per_prob))
        if policy.uploads_drafts
        else [(0, nan)]
    )
    points = []
    for (t, m, p), (label, preset, snr, w), (k, b) in itertools.product(gate, links, payload):
        link = ch.link_from_budget(preset, bandwidth_hz=w, snr_db=snr)
        points.append(
            {
                "mode": mode.value,
                "measure": m,
                "threshold": t,
                "transmit_probability": p,
                "link": label,
                "snr_db": float(link.mean_snr_db),
                "bandwidth_hz": float(link.bandwidth_hz),
                "top_k": int(k),
                "bits_per_prob": float(b),
            }
        )
    return points


def _grid_points(points: pd.DataFrame, measures: tuple[str, ...]) -> rp.GridPoints:
    index = {m: i for i, m in enumerate(measures)}
    return rp.GridPoints.create(
        threshold=np.nan_to_num(points["threshold"].to_numpy(np.float32), nan=0.0),
        measure=np.array([index.get(m, 0) for m in points["measure"]], np.int32),
        transmit_probability=np.nan_to_num(
            points["transmit_probability"].to_numpy(np.float32), nan=0.0
        ),
        snr_db=points["snr_db"].to_numpy(np.float32),
        bandwidth_hz=points["bandwidth_hz"].to_numpy(np.float32),
        top_k=points["top_k"].to_numpy(np.int32),
        bits_per_prob=np.where(points["bits_per_prob"].isna(), 16.0, points["bits_per_prob"]),
    )


_REPLAY_JIT = jax.jit(rp.replay_grid, static_argnames=("mode", "chunk_size"))


def _tidy(points: pd.DataFrame, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per point and metric."""
    frames = []
    for metric, value in values.items():
        frame = points.copy()
        frame["metric"] = metric
        frame["value"] = np.asarray(value, np.float64)
        frame["se"] = np.nan
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def replay_table(
    grid: ReplayGrid,
    tokens: rp.TokenRecords,
    measures: tuple[str, ...],
    base: ch.CostProfile,
    chunk_size: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Replays every mode of `grid`; returns the tidy table (see the module doc).

    Args:
        grid: the axes.
        tokens: the replayed records, one row of `u` per name of `measures`.
        measures: the measures of `tokens`' rows.
        base: the cost profile; each grid point replaces its link's SNR and bandwidth and
            its payload.
        chunk_size: grid points per vectorized chunk (bounds memory).
        progress: show a progress display per mode.
    """
    sorted_tokens = jax.jit(rp.sort_tokens)(tokens)
    frames = []
    offset = 0
    for mode in grid.modes:
        points = pd.DataFrame(_mode_axes(grid, mode, measures))
        grid_points = _grid_points(points, measures)
        size = len(points)
        # Always whole chunks of `chunk_size`: one compiled shape per mode, whatever the grid.
        padded = -(-size // chunk_size) * chunk_size
        # Pad to whole chunks (repeating the last point) so every chunk has one shape.
        extra = padded - size
        grid_points = jax.tree.map(
            lambda x, e=extra: jnp.concatenate([x, jnp.repeat(x[-1:], e)]), grid_points
        )
        parts = []
        for start in console.progress(
            range(0, padded, chunk_size), desc=f"replay {mode.value}", unit="chunk",
            quiet=not progress,
        ):
            block = jax.tree.map(lambda x, s=start: x[s : s + chunk_size], grid_points)
            parts.append(jax.device_get(
                _REPLAY_JIT(mode, sorted_tokens, base, block, chunk_size=chunk_size)
            ))
        values = {
            name: np.concatenate([getattr(p, name) for p in parts])[:size]
            for name in rp.ReplayMetrics._fields
        }
        points.insert(0, "point", np.arange(offset, offset + size))
        offset += size
        frames.append(_tidy(points, values))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "source", "replay")
    return table
