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

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "new_file_mode"]


def new_file_mode(path: str | Path | None = None) -> int:
    """The permission bits a new file gets: those of ``path`` when it exists (a replaced
    file keeps its mode), else ``0o666`` less the process's umask, as ``open()`` would."""
    if path is not None:
        with contextlib.suppress(OSError):
            return os.stat(path).st_mode & 0o7777
    mask = _umask()
    return 0o666 & ~mask


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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

    The new file gets the mode of the file it replaces, or ``0o666`` less the umask
    (:func:`new_file_mode`), not the ``0o600`` of a bare temporary file.

    On an exception the temporary file is removed and ``path`` is untouched; a killed
    process may leave a ``.<name>.*.tmp`` file beside it. An ``OSError`` that names no file
    (a full disk's ``ENOSPC`` on write or fsync) is raised again naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    fsync_dir(path.parent)


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` itself when it names a file, else the same error naming ``path`` ("[Errno 28]
    No space left on device: 'runs/x/checkpoints/iter_0000500.pt'")."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, f"{exc.strerror} while writing", str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
