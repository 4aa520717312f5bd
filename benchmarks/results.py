"""Shared by every benchmark: the machine's description and `RESULTS.md` sections.

Each benchmark owns one `## <title>` section of `benchmarks/RESULTS.md` and rewrites only
that section, so benchmarks can be rerun in any order.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
_HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in this folder; each owns one section. Targets are from "
    "DESIGN.md §5.\n"
)


def machine() -> str:
    """CPU model, core count, JAX backend and version, today's date and the load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.default_backend()} "
        f"({devices}); {datetime.date.today().isoformat()}; load average "
        f"{os.getloadavg()[0]:.1f} (timings on a loaded machine are upper bounds)"
    )


def write_section(title: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Replaces (or appends) the `## title` section of RESULTS.md with `body`."""
    text = path.read_text() if path.exists() else _HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Best wall time of `fn()` over `repeats` calls (call it once before, to compile)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)
