"""Output folders of ``mapdet detect`` and ``mapdet eval``: nothing a user owns is replaced.

Before a command writes anything, :func:`claim_outputs` checks every path it is about to
write in its output folder:

- a path that is one of the command's inputs (``mapdet detect photos/a.png --out photos``
  would draw over ``photos/a.png``) is always refused;
- a path that exists is refused unless ``overwrite`` (``--overwrite``), so a second run
  into the same folder does not silently replace the first run's files;
- with ``overwrite``, a path that exists may be replaced only when an earlier mapdet
  command wrote it there: every claimed path is recorded in the folder's
  :data:`MANIFEST` (``.mapdet-outputs.json``). A file of the user's that happens to have
  an output's name is never replaced.

A leaf module, like :mod:`mapdet.io`: it imports nothing else of mapdet but that.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from mapdet.io import atomic_write_text

__all__ = ["MANIFEST", "OutputExistsError", "claim_outputs", "recorded_outputs"]

#: The file in an output folder that lists what mapdet wrote there (paths relative to it).
MANIFEST = ".mapdet-outputs.json"


class OutputExistsError(FileExistsError):
    """An output path exists (or is an input) and may not be replaced; the message says
    which and what to do."""


def recorded_outputs(folder: str | Path) -> set[str]:
    """The paths (relative to ``folder``) that mapdet commands wrote there; an unreadable
    manifest counts as empty (so nothing is replaced on its word)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _shown(paths: Sequence[Path], limit: int = 4) -> str:
    text = ", ".join(str(p) for p in paths[:limit])
    return text + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def claim_outputs(folder: str | Path, names: Iterable[str], *, overwrite: bool = False,
                  inputs: Iterable[str | Path] = (), option: str = "--out",
                  record: bool = True) -> list[Path]:
    """Check that the files ``names`` (relative to ``folder``) may be written, and record
    them in the folder's :data:`MANIFEST`; returns their paths.

    Args:
        folder: the output folder (created when missing).
        names: the relative paths the command will write.
        overwrite: existing outputs of an earlier mapdet command there may be replaced.
        inputs: files the command reads (never an output path).
        option: how the user named the folder, for the messages.
        record: add ``names`` to the manifest (``False``: only check; under ``torchrun``
            every rank checks, so that all stop together, and rank 0 records).

    Raises:
        OutputExistsError: an output is an input; an output exists and not ``overwrite``;
            or, with ``overwrite``, an existing output was not written by mapdet.
    """
    folder = Path(folder)
    names = list(dict.fromkeys(names))
    paths = [folder / n for n in names]
    inputs = [Path(p) for p in inputs]
    for p in paths:
        for src in inputs:
            if _same_file(p, src):
                raise OutputExistsError(
                    f"{option} {folder}: the output {p} would replace the input {src}; choose "
                    f"another {option}")
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{option} {folder} already holds {_shown(existing)}; pass --overwrite to replace "
            f"them, or choose another {option}")
    ours = recorded_outputs(folder)
    foreign = [p for n, p in zip(names, paths, strict=True) if p in existing and n not in ours]
    if foreign:
        raise OutputExistsError(
            f"{option} {folder}: {_shown(foreign)} {'was' if len(foreign) == 1 else 'were'} "
            f"not written by mapdet (not listed in {folder / MANIFEST}); --overwrite replaces "
            f"only mapdet's own outputs: move {'it' if len(foreign) == 1 else 'them'} or choose "
            f"another {option}")
    if record:
        listed = sorted(ours | set(names))
        atomic_write_text(folder / MANIFEST, json.dumps({"files": listed}, indent=1) + "\n")
    return paths
