"""Cleaning proposals: clip to the image, drop thin boxes and exact duplicates; a slow
reference beside the fast routine.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mapdet.core.boxes import check_finite

logger = logging.getLogger(__name__)

#: Default smallest side, in pixels, of a kept proposal.
DEFAULT_MIN_SIZE = 4.0


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
