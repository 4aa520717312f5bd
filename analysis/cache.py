"""The machine's cache of dequantized GGUF models: list it, or clear it.

`uhlm cache` lists every entry of the weight cache (`uhlm_jax.models.weight_cache`): the
GGUF file it was made from, the dtype of its params, its size and when it was last used;
then the files assembled from wheel parts (`uhlm_jax.models.split_file`), with their part
set as the source; then the total. `uhlm cache --clear` deletes them all (and temporary
files left by killed loads); the next load of each model assembles and dequantizes it
again. `--json` prints one JSON object instead: the folder, the entries and the total
bytes (and whether they were cleared).

The folder is `$UHLM_CACHE_DIR` if set, else `$XDG_CACHE_HOME/uhlm_jax`, else
`~/.cache/uhlm_jax`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib

from uhlm_jax import cli_config, console
from uhlm_jax.models import split_file, weight_cache


@dataclasses.dataclass(frozen=True)
class Config:
    """What to do with the cache.

    Attributes:
        clear: delete every entry instead of only listing them (default: list them).
    """

    clear: bool = False


@dataclasses.dataclass(frozen=True)
class Result:
    """The cache's entries, before any clearing.

    Attributes:
        folder: the cache folder; None when the cache is turned off.
        entries: the entries, most recently used first.
        cleared: whether they were deleted.
    """

    folder: pathlib.Path | None
    entries: tuple[weight_cache.CacheEntry, ...]
    cleared: bool

    @property
    def total_bytes(self) -> int:
        """Bytes of all entries together."""
        return sum(entry.size_bytes for entry in self.entries)

    def to_json(self) -> dict:
        """A JSON-ready dict (times as ISO 8601 in UTC)."""
        return {
            "folder": None if self.folder is None else str(self.folder),
            "entries": [
                {
                    "file": entry.path.name,
                    "source": entry.source or None,
                    "dtype": entry.dtype or None,
                    "size_bytes": entry.size_bytes,
                    "last_used": _iso(entry.last_used),
                }
                for entry in self.entries
            ],
            "total_bytes": self.total_bytes,
            "cleared": self.cleared,
        }


def run(cfg: Config) -> Result:
    """Lists the cache, and clears it when `cfg.clear`."""
    if cfg.clear:
        entries = weight_cache.clear() + split_file.clear()
    else:
        entries = weight_cache.entries() + split_file.entries()
    return Result(folder=weight_cache.cache_dir(), entries=tuple(entries), cleared=cfg.clear)


def format_table(result: Result) -> str:
    """The human-readable listing."""
    if result.folder is None:
        return f"The weight cache is off ({weight_cache.CACHE_ENV} is set to the empty string)."
    if not result.entries:
        return f"{result.folder}: empty"
    lines = [f"{'source':<40} {'dtype':<9} {'size':>10}  last used (UTC)"]
    for entry in result.entries:
        source = entry.source or f"({entry.path.name}: older format or unfinished)"
        lines.append(
            f"{source:<40} {entry.dtype or '-':<9} {_megabytes(entry.size_bytes):>10}  "
            f"{_iso(entry.last_used)[:16].replace('T', ' ')}"
        )
    verb = "deleted" if result.cleared else "in"
    lines.append(
        f"{len(result.entries)} entries, {_megabytes(result.total_bytes)} {verb} {result.folder}"
    )
    return "\n".join(lines)


def _megabytes(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `uhlm cache` options."""
    cli_config.add_arguments(parser, Config, toml=False)
    cli_config.add_output_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Runs `uhlm cache`; returns the exit status."""
    result = run(cli_config.config_from_args(Config, args))
    print(console.json_text(result.to_json()) if args.json else format_table(result))
    return 0
