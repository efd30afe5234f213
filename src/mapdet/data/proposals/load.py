"""Proposals for a whole data set: read from a file, loaded from the cache, or computed.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.data.base import first_repeated
from mapdet.data.proposals.cache import (
    DEFAULT_CHUNK_SIZE,
    _cache_meta,
    _load_chunks,
    _load_consolidated,
    _method_params,
    _write_parts_meta,
    proposal_cache_key,
)
from mapdet.data.proposals.cleaning import DEFAULT_MIN_SIZE, clean_proposals
from mapdet.data.proposals.formats import load_proposal_file, save_proposals_npz
from mapdet.data.proposals.workers import _compute_missing

logger = logging.getLogger(__name__)



def _dataset_ids(dataset: Any) -> list[str]:
    ids = [str(r.image_id) for r in dataset.records]
    repeated = first_repeated(ids)
    if repeated is not None:
        raise ValueError(f"the data set has duplicate image id {repeated!r}")
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
    # Temporary files of a killed run's atomic writes (chunks, the consolidated file).
    for tmp in [*parts.glob(".*.tmp"), *cache_dir.glob(f".{final.name}.*.tmp")]:
        logger.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink(missing_ok=True)
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
