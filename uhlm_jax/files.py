"""Atomic file writes: a reader sees the old file or the new one, never a partial write.

`AtomicFile(path)` opens a temporary sibling of `path` (`.<name>.<random>.tmp`, in the same
folder so the final rename never crosses file systems). `commit()` flushes it, fsyncs it,
renames it over `path` and fsyncs the folder; `discard()` deletes it. As a context manager
it commits on a clean exit and discards on an exception, so a failed write leaves the
previous file untouched and no temporary file behind:

    with AtomicFile(path) as f:
        f.write(data)

The temporary file is created with mode 0666 less the umask (0644 under the usual 022),
like any file the user writes; `tempfile.mkstemp` would make it 0600.
"""

from __future__ import annotations

import os
import pathlib
import secrets
from typing import BinaryIO

__all__ = ["TMP_SUFFIX", "AtomicFile"]

TMP_SUFFIX = ".tmp"


class AtomicFile:
    """A temporary sibling of `path`, renamed over `path` once complete.

    Attributes:
        path: the file to write.
        tmp: the temporary file being written.
        file: `tmp`, open for binary writing until `commit` or `discard`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        # "x": never follow or reuse an existing file; the mode is 0666 less the umask.
        self.file: BinaryIO = open(self.tmp, "xb")  # noqa: SIM115 - closed by commit/discard
        self._open = True

    def commit(self) -> None:
        """Flushes and fsyncs the file, renames it over `path` and fsyncs the folder.

        Raises:
            OSError: if any step fails; the temporary file is then deleted.
        """
        if not self._open:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._open = False
        _fsync_folder(self.path.parent)

    def discard(self) -> None:
        """Closes and deletes the temporary file; `path` is left as it was."""
        self._open = False
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _fsync_folder(folder: pathlib.Path) -> None:
    """Makes a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
