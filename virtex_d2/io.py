"""Crash-safe file writes: the one helper every writer of the package uses.

A file is written to a temporary name in its own directory, flushed, ``fsync``-ed and renamed
over the final name (``os.replace``, atomic on POSIX), then the directory entry is synced. A
reader therefore sees the old file or the new one, never half of one, and a failed write (a
full disk, an exception in the writer) leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import IO, Callable

__all__ = ["AtomicWriteError", "atomic_write", "atomic_write_text"]


class AtomicWriteError(OSError):
    """A file could not be written; whatever was at its path before is unchanged."""


def _fsync_dir(directory: str) -> None:
    # The rename is only durable once the directory entry is on disk (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    *,
    error: type[AtomicWriteError] = AtomicWriteError,
    advice: str = "",
) -> None:
    """Write ``path`` by calling ``write(binary file)`` on a temporary file, then renaming it.

    Missing parent directories are created. ``error`` (a subclass of :class:`AtomicWriteError`)
    is raised with the errno of the failure, naming the file; ``advice`` is appended to its
    message (what to do next).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt etc.: nothing to explain
        code = getattr(e, "errno", None) or errno.EIO
        reason = getattr(e, "strerror", None) or str(e)
        raise error(
            code,
            f"could not write {path}: {reason}. Nothing on disk was changed."
            + (f" {advice}" if advice else ""),
        ) from e
    _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), **kwargs)
