"""Run directories that never lose work: refuse, lock, resume checks, stale-file cleanup.

A training run owns its directory (``config.yaml``, ``train.log``, ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/``, ``eval/``). :class:`RunDirectory` guards it:

- **not empty, not resuming**: refused with :class:`RunDirError` (nothing is touched),
  unless ``overwrite``, which first deletes the outputs of the earlier run listed in
  :data:`RUN_OUTPUTS` (other files of the folder are left alone), so old and new
  checkpoints never sit side by side;
- **a lock** ``.mapdet.lock`` (JSON: pid, host, start time, command line), created with
  ``O_CREAT | O_EXCL`` so that of two runs started into the same folder exactly one gets
  it; the other is refused with a message naming the holder. A lock whose process is gone
  (same host, no such pid) is *stale*: it is reported in the log and taken over. A lock
  from another host cannot be checked and is refused with the way out (delete the file);
- **stale temporary files** (``.<name>.*.tmp`` left by :func:`mapdet.io.atomic_file` when a
  process is killed mid-write) are removed once the lock is held.

:func:`resume_differences` compares the configuration given on resume with the
checkpoint's: keys that change the run are refused by :func:`mapdet.engine.train.train`,
while :data:`RESUME_FREE_KEYS` (length, logging, workers, output, evaluation) may change.

Under ``torchrun`` only rank 0 (environment ``RANK``) checks and locks; it alone writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "RESUME_FREE_KEYS",
    "RUN_OUTPUTS",
    "RunDirError",
    "RunDirectory",
    "remove_stale_tmp",
    "resume_differences",
]

log = logging.getLogger(__name__)

#: The lock file's name inside the run directory.
LOCK_NAME = ".mapdet.lock"
#: What a training run writes into its directory (removed by ``overwrite``).
RUN_OUTPUTS = ("config.yaml", "train.log", "metrics.jsonl", "tensorboard", "checkpoints",
               "eval")
#: Keys that may differ on resume: they change neither the weights nor the data order.
#: A section name stands for all of its keys.
RESUME_FREE_KEYS = frozenset({
    "train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.threads", "train.device", "data.num_workers", "proposals.num_workers",
    "proposals.cache_dir", "loss.num_threads", "output", "eval",
})


class RunDirError(FileExistsError):
    """The run directory cannot be used as asked (not empty, locked); the message says why
    and what to do."""


def _is_free(key: str) -> bool:
    return key in RESUME_FREE_KEYS or key.split(".", 1)[0] in RESUME_FREE_KEYS


def resume_differences(given: dict[str, dict[str, Any]],
                       saved: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """``[(key, given value, saved value)]`` for every ``section.key`` outside
    :data:`RESUME_FREE_KEYS` whose value differs (both are ``Config.to_dict()``)."""
    out = []
    for section in sorted(set(given) | set(saved)):
        g, s = given.get(section) or {}, saved.get(section) or {}
        for key in sorted(set(g) | set(s)):
            name = f"{section}.{key}"
            if not _is_free(name) and g.get(key) != s.get(key):
                out.append((name, g.get(key), s.get(key)))
    return out


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files under ``directory`` (temporary files of
    :func:`mapdet.io.atomic_file` whose writer was killed); returns what was removed. Call it
    only while holding the directory's lock (a live writer's file would go too)."""
    removed = []
    for p in Path(directory).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) in %s, e.g. %s", len(removed), directory,
                 removed[0].name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')!r}, started "
            f"{info.get('started', '?')}")


class RunDirectory:
    """Context manager that takes a run directory for one run (see the module docstring).

    Args:
        path: the run directory (created when missing).
        resume: the run continues a checkpoint: the directory may hold its earlier outputs.
        overwrite: a non-empty directory is accepted; the earlier run's outputs are deleted.
        main: this process writes (rank 0); other ranks only create the directory.

    Raises:
        RunDirError: not empty (without ``resume``/``overwrite``), or locked by a live run or
            by a run on another host.
    """

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 main: bool | None = None) -> None:
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.main = int(os.environ.get("RANK", "0")) == 0 if main is None else main
        self.lock_path = self.path / LOCK_NAME
        self._held = False

    # -- the lock ---------------------------------------------------------------------------

    def _try_create_lock(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)}
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def _read_lock(self) -> dict[str, Any]:
        try:
            info = json.loads(self.lock_path.read_text())
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; :class:`RunDirError` when another run
        holds it."""
        for _ in range(3):
            if self._try_create_lock():
                self._held = True
                return
            info = self._read_lock()
            pid, host = info.get("pid"), info.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() \
                    and not _pid_alive(pid):
                log.warning("%s: stale lock of a run that is gone (%s); taking it over",
                            self.lock_path, _describe(info))
                stale = self.lock_path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                try:
                    os.replace(self.lock_path, stale)
                    stale.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass  # another process took it over first; try again
                continue
            if not info:
                raise RunDirError(
                    f"{self.path} is locked by {self.lock_path}, which is unreadable; if no "
                    "run is writing there, delete that file")
            where = ("still running" if host == socket.gethostname()
                     else "on another host, which cannot be checked from here")
            raise RunDirError(
                f"{self.path} is in use by another mapdet run ({_describe(info)}, {where}); "
                f"wait for it, choose another --out, or, if that run is over, delete "
                f"{self.lock_path}")
        raise RunDirError(f"{self.path}: could not take the lock {self.lock_path}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._held:
            info = self._read_lock()
            if info.get("pid") == os.getpid():
                self.lock_path.unlink(missing_ok=True)
            self._held = False

    # -- the checks -------------------------------------------------------------------------

    def _contents(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)

    def __enter__(self) -> RunDirectory:
        if not self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a directory")
        existed = self.path.is_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        self.acquire()
        try:
            contents = self._contents() if existed else []
            if contents and not self.resume:
                if not self.overwrite:
                    shown = ", ".join(contents[:6]) + (", ..." if len(contents) > 6 else "")
                    raise RunDirError(
                        f"--out {self.path} is not empty (it holds {shown}); pass --resume to "
                        "continue the run there, --overwrite to replace its outputs, or "
                        "choose a new folder")
                for name in RUN_OUTPUTS:
                    p = self.path / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                log.info("--overwrite: removed the earlier run's outputs from %s", self.path)
            remove_stale_tmp(self.path)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
