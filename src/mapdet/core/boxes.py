"""Axis-aligned boxes: areas, IoU and input checks (numpy, no torch).

Boxes are ``xyxy`` float arrays of shape ``(N, 4)`` in continuous pixel coordinates:
pixel ``k`` covers ``[k, k+1)``, so a box's width is ``x2 - x1``. The PASCAL VOC devkit's
convention (1-based inclusive pixels, width ``x2 - x1 + 1``) is available through
``pixel_offset=1.0``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_boxes", "box_area", "box_iou", "check_finite", "check_boxes"]


def as_boxes(name: str, boxes, n: int | None = None) -> np.ndarray:
    """Return ``boxes`` as a float64 ``(N, 4)`` array, checked.

    Args:
        name: the argument's name, used in error messages.
        boxes: array-like ``(N, 4)`` (an empty list is accepted as ``(0, 4)``).
        n: expected number of rows, if known.

    Raises:
        ValueError: wrong shape, non-finite values, or ``x2 < x1`` / ``y2 < y1``.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows, expected {n} (one per window)")
    check_boxes(name, arr)
    return arr


def check_finite(name: str, values: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``name`` and the count if any value is NaN or infinite."""
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(f"{name} contains {n_nan} NaN and {n_inf} infinite value(s)")


def check_boxes(name: str, boxes: np.ndarray) -> None:
    """Raise ``ValueError`` if ``boxes (N, 4)`` has non-finite values or inverted corners."""
    check_finite(name, boxes)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        first = int(np.flatnonzero(inverted)[0])
        raise ValueError(
            f"{name} has {int(inverted.sum())} box(es) with x2 < x1 or y2 < y1 "
            f"(first: row {first} = {boxes[first].tolist()}); boxes must be xyxy"
        )


def box_area(boxes: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """Areas ``(x2-x1+o) * (y2-y1+o)`` of ``boxes (N, 4)`` (``o = pixel_offset``) -> ``(N,)``."""
    width = boxes[:, 2] - boxes[:, 0] + pixel_offset
    return width * (boxes[:, 3] - boxes[:, 1] + pixel_offset)


def box_iou(a: np.ndarray, b: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """Intersection over union of every pair: ``a (N, 4)``, ``b (M, 4)`` -> ``(N, M)``.

    ``IoU = |a & b| / (|a| + |b| - |a & b|)`` with widths ``x2 - x1 + pixel_offset``; the
    intersection's width is clipped at 0. A pair whose union is 0 (two empty boxes) has IoU 0.
    The arithmetic follows the devkit's order of operations so that ``pixel_offset=1`` on raw
    1-based coordinates reproduces its numbers bit for bit.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    iw = np.maximum(ix2 - ix1 + pixel_offset, 0.0)
    ih = np.maximum(iy2 - iy1 + pixel_offset, 0.0)
    inter = iw * ih
    union = box_area(a, pixel_offset)[:, None] + box_area(b, pixel_offset)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou
