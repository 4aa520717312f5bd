"""What jobs print: progress, strict JSON, and numbers in tables.

* `progress` is a bar in a terminal and, when its stream is not a terminal (a log file, a
  CI job), one timestamped line per step or per 10% of the work with the time elapsed and
  left; `quiet` turns both off.
* `json_text` writes strict JSON: an undefined number (NaN, ±inf) is `null`, never the
  `NaN`/`Infinity` that strict parsers reject.
* `number` shows a number in a table: "—" when it is undefined (None, NaN) and "∞" only
  when it is unbounded (+inf).
"""

from __future__ import annotations

import enum
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

__all__ = [
    "INFINITE",
    "UNDEFINED",
    "LogProgress",
    "clock",
    "json_ready",
    "json_text",
    "number",
    "progress",
]

UNDEFINED = "—"
INFINITE = "∞"


@runtime_checkable
class TextStream(Protocol):
    """Where text goes: a file, `sys.stderr`, or a test's captured stream."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


# A log line is written each time this share of the total more is done.
_LOG_SHARE = 0.1


def number(x: float | None, fmt: str = ".3f") -> str:
    """`x` formatted with `fmt`; "—" if undefined (None or NaN), "∞" if +inf, "−∞" if −inf."""
    if x is None or (isinstance(x, float | np.floating) and math.isnan(x)):
        return UNDEFINED
    if isinstance(x, float | np.floating) and math.isinf(x):
        return INFINITE if x > 0 else "−" + INFINITE
    return format(x, fmt)


def json_ready(obj: Any) -> Any:
    """`obj` with NumPy values as Python ones, enum members as their values and
    non-finite floats as None."""
    if isinstance(obj, enum.Enum):
        return json_ready(obj.value)
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """`obj` as strict JSON (undefined numbers as `null`; non-ASCII text kept)."""
    return json.dumps(json_ready(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    quiet: bool = False,
    stream: TextStream | None = None,
) -> tqdm | LogProgress:
    """A progress display: a tqdm bar in a terminal, log lines otherwise, nothing if `quiet`.

    Both kinds iterate over `iterable` (if given) and have `update(n)`, `set_postfix(**kw)`
    and `close()`.
    """
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not quiet and _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                       stream=stream, quiet=quiet)


def _is_terminal(stream: TextStream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LogProgress:
    """Progress as timestamped lines: one per step, or per 10% of the total when it is long.

    A line reads `2025-01-01 12:00:00 collect: 3/10 batch (30%), 0:12 elapsed, about 0:28
    left, tokens=1234`. The time left is the pace since the start (of the steps done in
    this process) times the steps to go.
    """

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str,
                 initial: int, stream: TextStream, quiet: bool):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start = self._logged = initial
        self.stream, self.quiet = stream, quiet
        self.postfix: dict[str, Any] = {}
        self._began = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        step = 1 if not self.total else max(1, math.ceil(_LOG_SHARE * self.total))
        if self.n - self._logged >= step or (self.total and self.n >= self.total):
            self._log()

    def close(self) -> None:
        if self.n != self._logged:
            self._log()

    def _log(self) -> None:
        self._logged = self.n
        if self.quiet:
            return
        elapsed = time.monotonic() - self._began
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{clock(elapsed)} elapsed")
        ran = self.n - self._start
        if self.total and ran > 0 and self.n < self.total:
            parts.append(f"about {clock(elapsed / ran * (self.total - self.n))} left")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {self.desc}: {', '.join(parts)}", file=self.stream, flush=True)


def clock(seconds: float) -> str:
    """`seconds` as m:ss, or h:mm:ss from an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
