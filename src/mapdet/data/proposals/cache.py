"""The on-disk proposal cache: its key, resumable chunks, the consolidated file and its metadata.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.data.proposals.formats import (
    _VERSION_KEY,
    FORMAT_VERSION,
    ProposalFileError,
    _check_npz_version,
    _write_npz,
    load_proposal_file,
)
from mapdet.data.proposals.selective_search import METHODS, _check_ss_args
from mapdet.io import atomic_file

logger = logging.getLogger(__name__)

#: Images per cache chunk.
DEFAULT_CHUNK_SIZE = 100

_CHUNK_KEYS = ("indices", "image_ids", "counts", "boxes")


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
