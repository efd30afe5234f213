"""Object proposals: Selective Search, proposal files, and a resumable on-disk cache.

Every proposal array here is ``(P, 4)`` float32 ``xyxy`` in continuous pixel coordinates:
pixel ``k`` covers ``[k, k+1)``, so an OpenCV rectangle ``(x, y, w, h)`` is the box
``[x, y, x + w, y + h]`` and a box lies inside a ``W x H`` image when
``0 <= x1 <= x2 <= W`` and ``0 <= y1 <= y2 <= H``.

The pieces, from small to large:

- :func:`selective_search`: proposals for one ``(H, W, 3)`` uint8 RGB image with OpenCV's
  Selective Search (``cv2.ximgproc``), optionally on a rescaled copy.
- :func:`clean_proposals`: clip to the image, drop boxes thinner than ``min_size``, drop exact
  duplicates (first occurrence kept, order kept); :func:`clean_proposals_reference` is the
  slow obvious version the tests compare it with.
- :func:`load_proposal_file` / :func:`save_proposals_npz`: precomputed proposals in the
  original Fast R-CNN MATLAB files, in our ``.npz`` format, or in JSON.
- :func:`load_or_compute_proposals`: proposals for a whole data set, computed once by worker
  processes and cached on disk in atomically written chunks, so that an interrupted run
  resumes where it stopped.
- :func:`proposal_stats` / :func:`proposal_recall`: recall of the ground truth, for
  diagnostics.

File formats (what :func:`load_proposal_file` reads, chosen by the file's suffix):

- ``.mat``: R-CNN / Fast R-CNN ``selective_search_data/<split>.mat``: a cell array ``boxes``
  with one ``(P, 4)`` array per image stored ``y1, x1, y2, x2`` in 1-based inclusive pixels,
  and a cell array ``images`` of image ids. ``[y1, x1, y2, x2]`` becomes
  ``[x1 - 1, y1 - 1, x2, y2]``.
- ``.npz`` (ours, written by :func:`save_proposals_npz`): one ``(P, 4)`` float32 array per
  image id, named by the id, plus ``__format_version__`` (an int) and optionally ``__meta__``
  (a JSON string).
- ``.json``: ``{"<image_id>": [[x1, y1, x2, y2], ...], ...}`` in our xyxy convention.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import multiprocessing
import shutil
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.core.boxes import box_iou, check_finite
from mapdet.io import atomic_file
from mapdet.progress import progress_bar

__all__ = [
    "DEFAULT_MIN_SIZE",
    "FORMAT_VERSION",
    "ProposalFileError",
    "ProposalStats",
    "clean_proposals",
    "clean_proposals_reference",
    "compute_image_proposals",
    "load_or_compute_proposals",
    "load_proposal_file",
    "proposal_cache_key",
    "proposal_recall",
    "proposal_stats",
    "save_proposals_npz",
    "selective_search",
]

logger = logging.getLogger(__name__)

#: Version of our ``.npz`` layouts (the consolidated file and the cache chunks).
FORMAT_VERSION = 1
#: Default smallest side, in pixels, of a kept proposal.
DEFAULT_MIN_SIZE = 4.0
#: Images per cache chunk.
DEFAULT_CHUNK_SIZE = 100
#: Proposal methods :func:`load_or_compute_proposals` can compute.
METHODS = ("selective_search",)

_VERSION_KEY = "__format_version__"
_META_KEY = "__meta__"
_CHUNK_KEYS = ("indices", "image_ids", "counts", "boxes")


class ProposalFileError(ValueError):
    """A proposal file or cache file is unreadable, empty or malformed.

    The message always names the file and says what is wrong with it.
    """


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------


def _as_float32_boxes(name: str, boxes: Any) -> np.ndarray:
    """``boxes`` as a ``(N, 4)`` float32 array (an empty input becomes ``(0, 4)``)."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    return arr


def clean_proposals(
    boxes: np.ndarray, image_width: float, image_height: float, min_size: float
) -> np.ndarray:
    """Clip proposals to the image, drop small ones and exact duplicates.

    Args:
        boxes: ``(N, 4)`` xyxy, continuous pixel coordinates (any float or int dtype; the
            values are first cast to float32).
        image_width, image_height: the image size ``W, H`` in pixels.
        min_size: smallest kept width and height, in pixels (``>= 0``).

    Returns:
        ``(P, 4)`` float32, ``P <= N``: each box clipped to ``[0, W] x [0, H]``; a box is kept
        iff its clipped width ``x2 - x1`` and height ``y2 - y1`` are both ``>= min_size``
        (so inverted boxes always go) and no earlier kept box is identical to it. The kept
        boxes keep their input order.

    Raises:
        ValueError: wrong shape, NaN or infinite coordinates, non-positive image size or
            negative ``min_size``.
    """
    b = _as_float32_boxes("boxes", boxes)
    check_finite("boxes", b)
    _check_clean_args(image_width, image_height, min_size)
    w32, h32 = np.float32(image_width), np.float32(image_height)
    b = b.copy()
    np.clip(b[:, 0::2], np.float32(0), w32, out=b[:, 0::2])
    np.clip(b[:, 1::2], np.float32(0), h32, out=b[:, 1::2])
    b += np.float32(0)  # -0.0 -> +0.0, so that duplicates are equal bit for bit
    widths = b[:, 2].astype(np.float64) - b[:, 0]
    heights = b[:, 3].astype(np.float64) - b[:, 1]
    b = b[(widths >= min_size) & (heights >= min_size)]
    return b[_first_unique_rows(b)]


def _check_clean_args(image_width: float, image_height: float, min_size: float) -> None:
    if not (image_width > 0 and image_height > 0):
        raise ValueError(f"image size must be positive, got {image_width} x {image_height}")
    if not min_size >= 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")


def _first_unique_rows(b: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of each distinct row of ``b (N, 4)``."""
    if len(b) < 2:
        return np.arange(len(b))
    rows = np.ascontiguousarray(b).view(np.dtype((np.void, b.dtype.itemsize * 4))).ravel()
    _, first = np.unique(rows, return_index=True)
    return np.sort(first)


def clean_proposals_reference(
    boxes: np.ndarray, image_width: float, image_height: float, min_size: float
) -> np.ndarray:
    """Slow, obvious version of :func:`clean_proposals` (one Python loop), for the tests."""
    w32, h32 = float(np.float32(image_width)), float(np.float32(image_height))
    kept: list[tuple[float, float, float, float]] = []
    seen: set[tuple[float, float, float, float]] = set()
    for x1, y1, x2, y2 in _as_float32_boxes("boxes", boxes).tolist():
        box = (
            min(max(x1, 0.0), w32),
            min(max(y1, 0.0), h32),
            min(max(x2, 0.0), w32),
            min(max(y2, 0.0), h32),
        )
        if box[2] - box[0] < min_size or box[3] - box[1] < min_size or box in seen:
            continue
        seen.add(box)
        kept.append(box)
    return np.array(kept, dtype=np.float32).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Selective Search
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _libc_srand():
    """The C library's ``srand``, or ``None`` where it cannot be found."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name).srand if name else None
    return None


def _seed_opencv(seed: int) -> None:
    """Seed the generator OpenCV's Selective Search ranks its regions with.

    OpenCV's ``SelectiveSearchSegmentation`` orders regions by ``level * rand()`` using the C
    library's ``rand()``, so the *order* (not the set) of its boxes depends on the state of
    ``rand()``. Seeding it before each image makes the output a function of the image alone.
    """
    srand = _libc_srand()
    if srand is not None:
        srand(ctypes.c_uint(seed))


def _resized(image: np.ndarray, resize_to: int | None) -> np.ndarray:
    """``image`` rescaled so that its shorter side is ``resize_to`` (unchanged if ``None``)."""
    if resize_to is None:
        return image
    import cv2

    h, w = image.shape[:2]
    scale = resize_to / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")


def _check_ss_args(mode: str, max_proposals: int | None, resize_to: int | None) -> None:
    if mode not in ("fast", "quality"):
        raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
    if max_proposals is not None and max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1 or None, got {max_proposals}")
    if resize_to is not None and resize_to < 1:
        raise ValueError(f"resize_to must be >= 1 or None, got {resize_to}")


def selective_search(
    image_rgb: np.ndarray,
    *,
    mode: str = "fast",
    max_proposals: int | None = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    resize_to: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Selective Search proposals (Uijlings et al., IJCV 2013) for one image, with OpenCV.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB.
        mode: ``"fast"`` (``switchToSelectiveSearchFast``, as R-CNN / Fast R-CNN used) or
            ``"quality"`` (more strategies, more boxes, several times slower).
        max_proposals: keep at most this many boxes, the first in OpenCV's ranking (``None``:
            all).
        min_size: smallest kept width and height, in pixels of the *original* image.
        resize_to: run on a copy rescaled so that its shorter side is ``resize_to`` pixels
            and map the boxes back (``None``: the image as it is). Upscaling small images
            (about 200 px) to 300-400 px raises recall at the price of more boxes and time.
        seed: seed of the C ``rand()`` OpenCV ranks the boxes with (see ``_seed_opencv``), so
            the result is deterministic; this touches the process-wide ``rand()`` state.

    Returns:
        ``(P, 4)`` float32 ``xyxy`` continuous coordinates inside ``[0, W] x [0, H]``, cleaned
        by :func:`clean_proposals`, in OpenCV's ranking order. Without ``resize_to`` the
        coordinates are integers (OpenCV's ``(x, y, w, h)`` becomes ``[x, y, x + w, y + h]``).

    OpenCV's own threading is left as it is; :func:`load_or_compute_proposals` sets it to one
    thread in its worker processes.
    """
    import cv2

    _check_image(image_rgb)
    _check_ss_args(mode, max_proposals, resize_to)
    h, w = image_rgb.shape[:2]
    work = _resized(image_rgb, resize_to)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(work[..., ::-1]))  # OpenCV wants BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_opencv(seed)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
    boxes = _rects_to_boxes(rects, w / work.shape[1], h / work.shape[0])
    boxes = clean_proposals(boxes, w, h, min_size)
    return boxes if max_proposals is None else boxes[:max_proposals]


def _rects_to_boxes(rects: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rectangles ``(N, 4)`` -> xyxy ``(N, 4)`` scaled by ``scale_*``."""
    boxes = np.empty_like(rects)
    boxes[:, 0] = rects[:, 0] * scale_x
    boxes[:, 1] = rects[:, 1] * scale_y
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * scale_x
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * scale_y
    return boxes


def compute_image_proposals(image_rgb: np.ndarray, method: str, params: Mapping) -> np.ndarray:
    """Proposals of one ``(H, W, 3)`` uint8 RGB image -> ``(P, 4)`` float32 xyxy.

    ``method`` is one of :data:`METHODS`; ``params`` are the keyword arguments of that method
    (for ``"selective_search"``: those of :func:`selective_search`). This is the unit of work
    of :func:`load_or_compute_proposals`.
    """
    if method == "selective_search":
        return selective_search(image_rgb, **params)
    raise ValueError(f"unknown proposal method {method!r}; known: {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------
# Proposal files
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The cache: key, chunks, consolidated file
# ---------------------------------------------------------------------------------------------


def _method_params(method: str, **params: Any) -> dict[str, Any]:
    """Canonical parameters (JSON types, fixed key order) of ``method``, for the cache key."""
    if method not in METHODS:
        raise ValueError(f"unknown proposal method {method!r}; known: {', '.join(METHODS)}")
    _check_ss_args(params["mode"], params["max_proposals"], params["resize_to"])
    if not params["min_size"] >= 0:
        raise ValueError(f"min_size must be >= 0, got {params['min_size']}")
    return {
        "mode": str(params["mode"]),
        "max_proposals": None if params["max_proposals"] is None else int(params["max_proposals"]),
        "min_size": float(params["min_size"]),
        "resize_to": None if params["resize_to"] is None else int(params["resize_to"]),
        "seed": int(params["seed"]),
    }


def proposal_cache_key(image_ids: Sequence[str], method: str, params: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the format version, method, parameters and image ids.

    The ids are taken in order, so a data set with the same images in another order gets
    another key (the cache stores positions).
    """
    h = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "method": method, "params": dict(params)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for image_id in image_ids:
        h.update(b"\n" + str(image_id).encode())
    return h.hexdigest()[:16]


def _chunk_path(parts: Path, first_index: int) -> Path:
    return parts / f"chunk_{first_index:08d}.npz"


def _write_chunk(parts: Path, indices: Sequence[int], ids: Sequence[str], results: Mapping) -> None:
    """Write the boxes of ``indices`` as one chunk file, atomically."""
    boxes = [results[ids[i]] for i in indices]
    members = [
        (_VERSION_KEY, np.array(FORMAT_VERSION, dtype=np.int64)),
        ("indices", np.asarray(indices, dtype=np.int64)),
        ("image_ids", np.array([ids[i] for i in indices], dtype=str)),
        ("counts", np.array([len(b) for b in boxes], dtype=np.int64)),
        ("boxes", np.concatenate(boxes, axis=0).astype(np.float32).reshape(-1, 4)),
    ]
    _write_npz(_chunk_path(parts, indices[0]), members)


def _read_chunk(path: Path, ids: Sequence[str]) -> dict[int, np.ndarray]:
    """``{index: (P, 4) float32}`` from one chunk; ``ProposalFileError`` if it is corrupt."""
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_npz_version(path, z)
            missing = [k for k in _CHUNK_KEYS if k not in z.files]
            if missing:
                raise ProposalFileError(f"{path}: missing entries {missing}")
            indices, names, counts, boxes = (z[k] for k in _CHUNK_KEYS)
    except ProposalFileError:
        raise
    except Exception as exc:
        raise ProposalFileError(f"{path}: unreadable cache chunk ({exc})") from exc
    _check_chunk(path, ids, indices, names, counts, boxes)
    splits = np.split(boxes, np.cumsum(counts)[:-1]) if len(counts) else []
    return {int(i): b for i, b in zip(indices, splits, strict=True)}


def _check_chunk(path: Path, ids, indices, names, counts, boxes) -> None:
    """Raise ``ProposalFileError`` unless the chunk's arrays are consistent with ``ids``."""
    n = len(indices)
    problems = []
    if not (indices.ndim == names.ndim == counts.ndim == 1 and len(names) == len(counts) == n):
        problems.append("indices, image_ids and counts differ in length")
    elif n and (indices.min() < 0 or indices.max() >= len(ids)):
        problems.append("an index is out of range")
    elif any(ids[i] != str(s) for i, s in zip(indices.tolist(), names.tolist(), strict=True)):
        problems.append("its image ids do not match the data set")
    if boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        problems.append(f"boxes have dtype {boxes.dtype} and shape {boxes.shape}")
    elif (counts < 0).any() or counts.sum() != len(boxes):
        problems.append("counts do not add up to the number of boxes")
    elif not np.isfinite(boxes).all():
        problems.append("boxes contain NaN or inf")
    if problems:
        raise ProposalFileError(f"{path}: corrupt cache chunk: {'; '.join(problems)}")


def _load_chunks(parts: Path, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Boxes of every valid chunk in ``parts``; corrupt chunks are logged and deleted."""
    results: dict[str, np.ndarray] = {}
    for path in sorted(parts.glob("chunk_*.npz")):
        try:
            chunk = _read_chunk(path, ids)
        except ProposalFileError as exc:
            logger.warning("%s; deleting it, its images will be recomputed", exc)
            path.unlink(missing_ok=True)
            continue
        results.update((ids[i], b) for i, b in chunk.items())
    return results


def _load_consolidated(path: Path, ids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached proposals at ``path``, or ``None`` (a corrupt file is logged and deleted)."""
    if not path.is_file():
        return None
    try:
        return load_proposal_file(path, ids)
    except ProposalFileError as exc:
        logger.warning("corrupt proposal cache %s (%s); deleting it and recomputing", path, exc)
        path.unlink(missing_ok=True)
        return None


# ---------------------------------------------------------------------------------------------
# Computing: in-process or in a pool of worker processes
# ---------------------------------------------------------------------------------------------

_WORKER_STATE: tuple[Any, str, dict] | None = None


def _init_worker(dataset: Any, method: str, params: dict) -> None:
    """Pool initializer: one OpenCV thread per worker, and the data set to read from."""
    global _WORKER_STATE
    import cv2

    cv2.setNumThreads(1)
    _WORKER_STATE = (dataset, method, params)


def _compute_index(dataset: Any, index: int, method: str, params: Mapping) -> np.ndarray:
    """Proposals of image ``index`` of ``dataset`` -> ``(P, 4)`` float32."""
    image_id = dataset.records[index].image_id
    try:
        image = dataset.load_image(index)
    except OSError as exc:  # missing, truncated, not an image: bad input, named in one line
        raise OSError(f"proposals for image {image_id!r}: {exc}") from None
    try:
        boxes = compute_image_proposals(image, method, params)
    except Exception as exc:
        raise RuntimeError(f"proposals for image {image_id!r} (index {index}): {exc}") from exc
    return _as_float32_boxes(f"proposals of image {image_id!r}", boxes)


def _worker_task(index: int) -> tuple[int, np.ndarray]:
    assert _WORKER_STATE is not None, "worker not initialised"
    dataset, method, params = _WORKER_STATE
    return index, _compute_index(dataset, index, method, params)


def _iter_computed(
    dataset: Any,
    indices: Sequence[int],
    method: str,
    params: dict,
    num_workers: int,
    start_method: str,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, boxes)`` for ``indices``, in order, in-process or from a pool."""
    if num_workers <= 0:
        for i in indices:
            yield i, _compute_index(dataset, i, method, params)
        return
    ctx = multiprocessing.get_context(start_method)
    chunksize = max(1, min(8, len(indices) // (4 * num_workers)))
    with ctx.Pool(
        num_workers, initializer=_init_worker, initargs=(dataset, method, params)
    ) as pool:
        yield from pool.imap(_worker_task, indices, chunksize=chunksize)


def _compute_missing(
    dataset: Any,
    ids: Sequence[str],
    results: dict[str, np.ndarray],
    parts: Path | None,
    *,
    method: str,
    params: dict,
    num_workers: int,
    start_method: str,
    chunk_size: int,
    progress: bool,
) -> None:
    """Compute the images not in ``results`` into it, writing a chunk every ``chunk_size``."""
    todo = [i for i, image_id in enumerate(ids) if image_id not in results]
    if not todo:
        return
    pending: list[int] = []
    bar = progress_bar(
        total=len(ids),
        initial=len(ids) - len(todo),
        enabled=progress,
        unit="img",
        desc=f"proposals ({method})",
    )
    computed = _iter_computed(dataset, todo, method, params, num_workers, start_method)
    try:
        with bar, contextlib.closing(computed):
            for i, boxes in computed:
                results[ids[i]] = boxes
                pending.append(i)
                bar.update(1)
                if parts is not None and len(pending) >= chunk_size:
                    _write_chunk(parts, pending, ids, results)
                    pending = []
    finally:  # also on errors and Ctrl-C: keep what was computed
        if parts is not None and pending:
            _write_chunk(parts, pending, ids, results)


def _dataset_ids(dataset: Any) -> list[str]:
    ids = [str(r.image_id) for r in dataset.records]
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"the data set has duplicate image id {image_id!r}")
        seen.add(image_id)
    return ids


def _proposals_from_file(dataset: Any, file: str | Path, ids: Sequence[str], min_size: float):
    """Proposals read from ``file``, cleaned with each record's image size."""
    t0 = time.perf_counter()
    raw = load_proposal_file(file, ids)
    out = {
        r.image_id: clean_proposals(raw[r.image_id], r.width, r.height, min_size)
        for r in dataset.records
    }
    logger.info(
        "loaded proposals for %d images from %s (%.1f per image after cleaning) in %.1f s",
        len(out),
        file,
        _mean_count(out),
        time.perf_counter() - t0,
    )
    return out


def _mean_count(proposals: Mapping[str, np.ndarray]) -> float:
    return float(np.mean([len(b) for b in proposals.values()])) if proposals else 0.0


def load_or_compute_proposals(
    dataset: Any,
    *,
    method: str = "selective_search",
    cache_dir: str | Path | None,
    file: str | Path | None = None,
    num_workers: int = 2,
    max_proposals: int | None = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    mode: str = "fast",
    resize_to: int | None = None,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    start_method: str = "spawn",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Proposals for every image of ``dataset``: read from a file, from the cache, or computed.

    With ``file``: the boxes are read with :func:`load_proposal_file` and cleaned with
    :func:`clean_proposals` (``min_size``; ``max_proposals`` is not applied, as Fast R-CNN used
    every Selective Search box); nothing is cached.

    Otherwise the proposals are computed with ``method`` (``"selective_search"``, with
    ``mode``, ``max_proposals``, ``min_size``, ``resize_to``, ``seed``: see
    :func:`selective_search`) and cached under ``cache_dir``:

    - the cache key (:func:`proposal_cache_key`) covers the data set's image ids in order, the
      method and its parameters, so a changed parameter never reuses stale boxes (the
      OpenCV version is recorded in the file's ``__meta__`` but is not part of the key);
    - ``<cache_dir>/<method>-<key>.npz`` is the consolidated file in our ``.npz`` format
      (usable as ``file=`` too), written atomically when everything is computed; when it
      exists it is simply loaded;
    - while computing, every ``chunk_size`` images are written atomically (temporary file,
      fsync, ``os.replace``) to ``<cache_dir>/<method>-<key>.parts/chunk_*.npz``; a run that
      is killed or fails resumes from the finished chunks and computes only the rest; the
      parts directory is deleted once the consolidated file is in place;
    - a corrupt chunk or consolidated file (unreadable zip, CRC error, inconsistent arrays)
      is **not** an error: it is logged as a warning, deleted and its images are recomputed.

    Memory: the main process holds the boxes (float32) and one chunk's worth of pending
    writes; images are read and released inside the workers.

    Not safe to run concurrently on the same cache from several processes (they would both
    compute; the files stay consistent): in distributed training compute on one rank first.

    Args:
        dataset: a :class:`~mapdet.data.base.DetectionDataset` or anything with ``records``
            (each with ``image_id``, ``width``, ``height``) and ``load_image(i) -> (H, W, 3)
            uint8 RGB``. It must be picklable for ``num_workers > 0`` with ``spawn``.
        method: the proposal method (see :data:`METHODS`).
        cache_dir: directory of the cache (created if needed); ``None``: no cache.
        file: precomputed proposals to read instead of computing.
        num_workers: worker processes; ``0`` computes in this process.
        chunk_size: images per cache chunk.
        start_method: ``multiprocessing`` start method of the pool (``"spawn"`` is safe with
            threads and CUDA in the parent, but a calling script needs the usual
            ``if __name__ == "__main__":`` guard; ``"fork"`` starts faster on Linux).
        progress: show a ``tqdm`` progress bar.

    Returns:
        ``{image_id: (P, 4) float32 xyxy}``, continuous coordinates, inside the image,
        deduplicated, boxes thinner than ``min_size`` removed, in the data set's order.
    """
    ids = _dataset_ids(dataset)
    if file is not None:
        return _proposals_from_file(dataset, file, ids, min_size)
    params = _method_params(
        method,
        mode=mode,
        max_proposals=max_proposals,
        min_size=min_size,
        resize_to=resize_to,
        seed=seed,
    )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    run = dict(
        method=method,
        params=params,
        num_workers=num_workers,
        start_method=start_method,
        chunk_size=chunk_size,
        progress=progress,
    )
    if cache_dir is None:
        results: dict[str, np.ndarray] = {}
        _compute_missing(dataset, ids, results, None, **run)
        return {i: results[i] for i in ids}
    return _cached(dataset, ids, Path(cache_dir), run)


def _cached(dataset: Any, ids: list[str], cache_dir: Path, run: dict) -> dict[str, np.ndarray]:
    """:func:`load_or_compute_proposals` with a cache directory."""
    method, params = run["method"], run["params"]
    stem = f"{method}-{proposal_cache_key(ids, method, params)}"
    final, parts = cache_dir / f"{stem}.npz", cache_dir / f"{stem}.parts"
    t0 = time.perf_counter()
    cached = _load_consolidated(final, ids)
    if cached is not None:
        shutil.rmtree(parts, ignore_errors=True)  # left over if killed before its removal
        logger.info(
            "loaded %s proposals for %d images from cache %s in %.1f s",
            method,
            len(ids),
            final,
            time.perf_counter() - t0,
        )
        return cached
    parts.mkdir(parents=True, exist_ok=True)
    _write_parts_meta(parts, ids, method, params)
    results = _load_chunks(parts, ids)
    logger.info(
        "%s proposals: %d of %d images resumed from %s, computing %d",
        method,
        len(results),
        len(ids),
        parts,
        len(ids) - len(results),
    )
    _compute_missing(dataset, ids, results, parts, **run)
    meta = _cache_meta(ids, method, params)
    save_proposals_npz(final, {i: results[i] for i in ids}, meta=meta)
    shutil.rmtree(parts, ignore_errors=True)
    logger.info(
        "wrote %s proposals for %d images (%.1f per image) to %s in %.1f s",
        method,
        len(ids),
        _mean_count(results),
        final,
        time.perf_counter() - t0,
    )
    return {i: results[i] for i in ids}


def _cache_meta(ids: Sequence[str], method: str, params: Mapping) -> dict[str, Any]:
    import cv2

    return {
        "method": method,
        "params": dict(params),
        "num_images": len(ids),
        "opencv": cv2.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_parts_meta(parts: Path, ids: Sequence[str], method: str, params: Mapping) -> None:
    """A human-readable ``meta.json`` in the parts directory (not read back)."""
    path = parts / "meta.json"
    if not path.exists():
        with atomic_file(path) as f:
            f.write(json.dumps(_cache_meta(ids, method, params), indent=1).encode())


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProposalStats:
    """Ground-truth recall of a set of proposals.

    Attributes:
        recall: fraction of non-difficult ground-truth boxes with a proposal at
            ``IoU >= iou`` (NaN when there are none).
        num_gt: number of non-difficult ground-truth boxes.
        num_covered: how many of them are covered.
        mean_proposals: mean number of proposals per image.
        iou: the IoU threshold.
    """

    recall: float
    num_gt: int
    num_covered: int
    mean_proposals: float
    iou: float


def proposal_stats(
    proposals: Mapping[str, np.ndarray], dataset: Any, iou: float = 0.5
) -> ProposalStats:
    """Recall of the non-difficult ground truth of ``dataset`` by ``proposals``, and counts.

    Args:
        proposals: ``{image_id: (P, 4) xyxy}`` with every image id of the data set.
        dataset: records with ``image_id``, ``boxes (M, 4)`` xyxy and optionally
            ``difficult (M,)`` bool.
        iou: a ground-truth box is covered by a proposal with continuous IoU ``>= iou``.
    """
    num_gt = covered = 0
    counts = []
    for rec in dataset.records:
        if rec.image_id not in proposals:
            raise KeyError(f"no proposals for image {rec.image_id!r}")
        props = np.asarray(proposals[rec.image_id]).reshape(-1, 4)
        counts.append(len(props))
        gt = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
        difficult = getattr(rec, "difficult", None)
        if difficult is not None:
            gt = gt[~np.asarray(difficult, dtype=bool).reshape(-1)]
        num_gt += len(gt)
        if len(gt) and len(props):
            covered += int((box_iou(gt, props).max(axis=1) >= iou).sum())
    recall = covered / num_gt if num_gt else float("nan")
    mean = float(np.mean(counts)) if counts else 0.0
    return ProposalStats(recall, num_gt, covered, mean, float(iou))


def proposal_recall(proposals: Mapping[str, np.ndarray], dataset: Any, iou: float = 0.5) -> float:
    """Fraction of non-difficult ground-truth boxes covered by a proposal at ``IoU >= iou``.

    See :func:`proposal_stats`, which also gives the mean number of proposals per image.
    """
    return proposal_stats(proposals, dataset, iou).recall
