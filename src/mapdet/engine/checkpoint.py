"""Checkpoints: atomic writes, safe loading, and finding the latest one of a run.

A checkpoint is a dict saved with :func:`torch.save`::

    {"format": 1, "iteration": int, "model": state_dict, "optimizer": ..., "scheduler": ...,
     "config": nested dict, "rng": seeding.get_rng_state(), "data_position": int,
     "num_classes": int, "class_names": [...], "metrics": {...}}

plus, when they apply, ``"rng_per_rank"`` (DDP: every rank's generator states, rank order)
and ``"loss_memory"`` (the mAP loss's AP memory).

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and
fsynced, and the file is renamed over the target with :func:`os.replace` (then the directory
is fsynced). A crash during the write leaves the previous checkpoint as it was; a leftover
temporary file is ignored by :func:`find_last_checkpoint`. Checkpoints hold only tensors and
plain Python values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from mapdet.io import atomic_write_bytes

__all__ = [
    "load_model_state",
    "CheckpointError",
    "checkpoint_path",
    "find_last_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^iter_(\d+)\.pt$")
LAST_FILE = "last_checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a mapdet checkpoint (names the file)."""


def load_model_state(model: torch.nn.Module, state: dict[str, Any], what: str = "this model"
                     ) -> None:
    """Load a checkpoint's ``state["model"]`` into ``model``; a mismatch (another backbone or
    number of classes) raises :class:`CheckpointError` naming the file and ``what``."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {state.get('path', '?')} does not fit {what}: "
            f"{str(exc).splitlines()[0]}") from exc


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Serialise ``state`` and write it atomically to ``path``; returns the path."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not a
    mapdet checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = find_last_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint found in directory {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a mapdet checkpoint (no 'model' entry)")
    state["path"] = str(path)
    return state


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    """``<directory>/iter_<iteration:07d>.pt``."""
    return Path(directory) / f"iter_{iteration:07d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest checkpoint of a run directory (or of its ``checkpoints/`` subdirectory).

    Uses the ``last_checkpoint`` pointer file when it names an existing file, otherwise the
    highest iteration number. Temporary files of interrupted writes are never returned.
    """
    run_dir = Path(run_dir)
    for directory in (run_dir / "checkpoints", run_dir):
        pointer = directory / LAST_FILE
        if pointer.is_file():
            target = directory / pointer.read_text().strip()
            if target.is_file():
                return target
        found = list_checkpoints(directory)
        if found:
            return found[-1][1]
    return None


def write_last_pointer(directory: str | Path, path: str | Path) -> None:
    """Atomically point ``<directory>/last_checkpoint`` at ``path`` (a file in ``directory``)."""
    atomic_write_bytes(Path(directory) / LAST_FILE, Path(path).name.encode() + b"\n")


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0``: keep all), each named
    in the log."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(directory)[:-keep]:
        with contextlib.suppress(OSError):
            p.unlink()
            log.info("removed old checkpoint %s (train.keep_checkpoints=%d)", p, keep)
