"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Used wherever mapdet writes something a crash must not corrupt: checkpoints, proposal
caches, result files, metrics, plots. A leaf module: it imports nothing of mapdet, so every
layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not possible on every OS)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing atomically: a temporary file beside it, then flush, fsync
    and ``os.replace`` on success. The parent folder is created if needed.

    On an exception the temporary file is removed and ``path`` is untouched; a killed
    process may leave a ``.<name>.*.tmp`` file beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
