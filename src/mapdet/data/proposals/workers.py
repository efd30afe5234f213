"""Computing proposals in this process or in a pool of worker processes, writing cache
chunks as they come.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.data.proposals.cache import _write_chunk
from mapdet.data.proposals.cleaning import _as_float32_boxes
from mapdet.data.proposals.selective_search import compute_image_proposals
from mapdet.progress import progress_bar

logger = logging.getLogger(__name__)



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
