"""Proposal files: the original Fast R-CNN ``.mat``, our ``.npz`` and JSON; reading, and
atomic writing.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.io import atomic_file

logger = logging.getLogger(__name__)

#: Version of our ``.npz`` layouts (the consolidated file and the cache chunks).
FORMAT_VERSION = 1

_VERSION_KEY = "__format_version__"
_META_KEY = "__meta__"


class ProposalFileError(ValueError):
    """A proposal file or cache file is unreadable, empty or malformed.

    The message always names the file and says what is wrong with it.
    """



def _check_proposal_array(path: Path, image_id: str, arr: Any) -> np.ndarray:
    """Validate one image's boxes read from ``path`` -> ``(P, 4)`` float32."""
    a = _check_raw_shape(path, image_id, arr)
    n_bad = int((~np.isfinite(a)).any(axis=1).sum())
    if n_bad:
        raise ProposalFileError(f"{path}: image {image_id!r}: {n_bad} box(es) with NaN or inf")
    inverted = (a[:, 2] < a[:, 0]) | (a[:, 3] < a[:, 1])
    if inverted.any():
        row = int(np.flatnonzero(inverted)[0])
        raise ProposalFileError(
            f"{path}: image {image_id!r}: {int(inverted.sum())} box(es) with x2 < x1 or "
            f"y2 < y1 (first: row {row} = {a[row].tolist()}); wrong coordinate order?"
        )
    return a.astype(np.float32)


def _missing_ids_error(path: Path, missing: Sequence[str], total: int) -> ProposalFileError:
    shown = ", ".join(repr(m) for m in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return ProposalFileError(
        f"{path}: {len(missing)} of the data set's {total} image ids are missing from the "
        f"file: {shown}{more}"
    )


def _select(path: Path, table: Mapping[str, Any], image_ids: Sequence[str], convert) -> dict:
    """``{id: convert(id, table[id])}`` for ``image_ids``; error listing missing ids."""
    missing = [i for i in image_ids if i not in table]
    if missing:
        raise _missing_ids_error(path, missing, len(image_ids))
    return {i: _check_proposal_array(path, i, convert(i, table[i])) for i in image_ids}


def load_proposal_file(path: str | Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Read precomputed proposals for ``image_ids`` from a ``.mat``, ``.npz`` or ``.json`` file.

    See the module docstring for the three formats. Ids in the file but not in ``image_ids``
    are ignored. Boxes are converted to our convention but not cleaned (see
    :func:`clean_proposals`).

    Args:
        path: the file; its suffix picks the format.
        image_ids: the data set's string image ids.

    Returns:
        ``{image_id: (P, 4) float32 xyxy}`` in the order of ``image_ids``.

    Raises:
        FileNotFoundError: no such file.
        ProposalFileError: unreadable, empty or malformed file, a missing variable, image ids
            of the data set absent from the file (a few are listed), boxes of the wrong shape,
            NaN or inverted boxes. The message names the file.
    """
    path = Path(path)
    image_ids = [str(i) for i in image_ids]
    if not path.is_file():
        raise FileNotFoundError(f"proposal file not found: {path}")
    if path.stat().st_size == 0:
        raise ProposalFileError(f"{path}: the file is empty")
    readers = {".mat": _read_mat, ".npz": _read_npz, ".json": _read_json}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ProposalFileError(
            f"{path}: unknown proposal file type {path.suffix!r}; expected .mat, .npz or .json"
        )
    return reader(path, image_ids)


def _read_mat(path: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise ProposalFileError(f"{path}: unsupported MATLAB file version ({exc})") from exc
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ...
        raise ProposalFileError(f"{path}: cannot read as a MATLAB .mat file ({exc})") from exc
    for var in ("boxes", "images"):
        if var not in data:
            found = sorted(k for k in data if not k.startswith("__"))
            raise ProposalFileError(
                f"{path}: missing variable {var!r} (found: {found}); expected a Selective "
                f"Search file with cell arrays 'boxes' and 'images'"
            )
    boxes = np.asarray(data["boxes"]).ravel()
    ids = _mat_strings(path, data["images"])
    if len(boxes) != len(ids):
        raise ProposalFileError(
            f"{path}: 'boxes' has {len(boxes)} entries but 'images' has {len(ids)}"
        )
    table = _index_unique(path, ids, set(image_ids))
    return _select(path, table, image_ids, lambda _, k: _mat_to_xyxy(path, ids[k], boxes[k]))


def _mat_strings(path: Path, arr: np.ndarray) -> list[str]:
    """Image ids of a MATLAB cell array (or char matrix, or numeric array) as strings."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":  # char matrix: one id per row
        return [str(s).strip() for s in (arr if arr.ndim == 1 else arr.reshape(arr.shape[0], -1))]
    out = []
    for el in arr.ravel():
        v = np.asarray(el).ravel()
        if v.dtype.kind == "U" and v.size >= 1:
            out.append("".join(str(s) for s in v).strip())
        elif v.dtype.kind in "iuf" and v.size == 1:
            out.append(str(int(v[0])))
        else:
            raise ProposalFileError(f"{path}: 'images' entry {el!r} is not an image id")
    return out


def _index_unique(path: Path, ids: Sequence[str], wanted: set[str]) -> dict[str, int]:
    """``{id: position}``; error if a wanted id appears twice."""
    table: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in table and i in wanted:
            raise ProposalFileError(f"{path}: image id {i!r} appears more than once")
        table.setdefault(i, k)
    return table


def _mat_to_xyxy(path: Path, image_id: str, raw: Any) -> np.ndarray:
    """``(P, 4)`` 1-based inclusive ``y1 x1 y2 x2`` -> continuous ``x1-1, y1-1, x2, y2``."""
    a = _check_raw_shape(path, image_id, raw)
    return np.stack([a[:, 1] - 1, a[:, 0] - 1, a[:, 3], a[:, 2]], axis=1)


def _check_raw_shape(path: Path, image_id: str, raw: Any) -> np.ndarray:
    """``raw`` as a ``(P, 4)`` float64 array (empty -> ``(0, 4)``), or ``ProposalFileError``."""
    try:
        a = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProposalFileError(
            f"{path}: image {image_id!r}: boxes are not numeric ({exc})"
        ) from exc
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ProposalFileError(
            f"{path}: image {image_id!r}: boxes must have shape (P, 4), got {a.shape}"
        )
    return a


def _read_json(path: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProposalFileError(f"{path}: cannot read as JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise ProposalFileError(
            f"{path}: expected a JSON object {{image_id: [[x1, y1, x2, y2], ...]}}, "
            f"got {type(table).__name__}"
        )
    return _select(path, table, image_ids, lambda i, v: _check_raw_shape(path, i, v))


def _read_npz(path: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_npz_version(path, z)
            names = set(z.files)
            return _select(path, _LazyNpz(z, names), image_ids, lambda i, v: v)
    except ProposalFileError:
        raise
    except Exception as exc:  # BadZipFile, CRC errors, truncated members, pickled data
        raise ProposalFileError(f"{path}: cannot read as a proposals .npz file ({exc})") from exc


class _LazyNpz(Mapping):
    """Read-only mapping over an open ``NpzFile`` whose members are read on access."""

    def __init__(self, z: Any, names: set[str]) -> None:
        self._z, self._names = z, names

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._names:
            raise KeyError(key)
        return self._z[key]

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_npz_version(path: Path, z: Any) -> None:
    if _VERSION_KEY not in z.files:
        raise ProposalFileError(
            f"{path}: not a mapdet proposals .npz file (no {_VERSION_KEY!r} entry); write one "
            f"with mapdet.data.proposals.save_proposals_npz"
        )
    version = int(np.asarray(z[_VERSION_KEY]).reshape(-1)[0])
    if version > FORMAT_VERSION:
        raise ProposalFileError(
            f"{path}: format version {version} is newer than this mapdet's {FORMAT_VERSION}"
        )


# ---------------------------------------------------------------------------------------------
# Writing .npz files atomically
# ---------------------------------------------------------------------------------------------


def _write_npz(path: Path, arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write ``(name, array)`` pairs as an uncompressed ``.npz``, atomically, one at a time.

    Unlike ``np.savez`` this accepts any member name (``np.savez(f, file=...)`` clashes) and
    never holds more than one array's bytes.
    """
    with (
        atomic_file(path) as f,
        zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf,
    ):
        for name, arr in arrays:
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


def save_proposals_npz(
    path: str | Path, proposals: Mapping[str, np.ndarray], *, meta: Mapping | None = None
) -> None:
    """Write proposals in our ``.npz`` format, atomically.

    Args:
        path: the file to write (its directory is created).
        proposals: ``{image_id: (P, 4) xyxy}``; stored as float32. Ids must not start with
            ``"__"`` (reserved for ``__format_version__`` and ``__meta__``).
        meta: optional JSON-serialisable description, stored as ``__meta__``.

    Raises:
        ValueError: a reserved id, or boxes of the wrong shape or with NaN.
    """
    path = Path(path)
    for image_id, boxes in proposals.items():
        if str(image_id).startswith("__"):
            raise ValueError(f"image id {image_id!r} is reserved (ids must not start with '__')")
        _check_proposal_array(path, str(image_id), boxes)

    def members() -> Iterator[tuple[str, np.ndarray]]:
        yield _VERSION_KEY, np.array(FORMAT_VERSION, dtype=np.int64)
        if meta is not None:
            yield _META_KEY, np.array(json.dumps(dict(meta), sort_keys=True))
        for image_id, boxes in proposals.items():
            yield str(image_id), np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    _write_npz(path, members())
