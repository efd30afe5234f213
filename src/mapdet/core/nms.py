"""The detection function of one class: score threshold, order, greedy per-image NMS.

Definition (docs/method.md, section 1): windows with ``score > score_threshold`` are the
candidates; they are ordered by score descending, equal scores by window index ascending;
walking that order, window ``i`` is kept unless an already kept window of the same image has
``IoU > nms_iou`` with it. The kept windows, in order, are the detections.
"""

from __future__ import annotations

import numpy as np

from mapdet.core.boxes import box_iou

__all__ = ["detection_order", "greedy_nms"]


def detection_order(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """Indices of the candidates (``score > score_threshold``) in detection order.

    Order: score descending, ties by index ascending (a stable sort of ``-score``).
    Returns ``(C,)`` int64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    cand = np.flatnonzero(scores > score_threshold)
    return cand[np.argsort(-scores[cand], kind="stable")].astype(np.int64)


def greedy_nms(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_ids: np.ndarray,
    *,
    score_threshold: float,
    nms_iou: float,
    pixel_offset: float = 0.0,
) -> np.ndarray:
    """Greedy non-maximum suppression per image.

    Args:
        scores: ``(N,)`` float.
        boxes: ``(N, 4)`` xyxy.
        image_ids: ``(N,)`` int, windows only suppress windows of the same image.
        score_threshold: candidates have ``score > score_threshold``.
        nms_iou: a window is suppressed by a kept one when ``IoU > nms_iou``
            (``nms_iou >= 1`` disables suppression).

    Returns:
        ``(D,)`` int64: indices of the kept windows in detection order.
    """
    order = detection_order(scores, score_threshold)
    if order.size == 0 or nms_iou >= 1.0:
        return order
    image_ids = np.asarray(image_ids)
    keep = []
    for img in np.unique(image_ids[order]):
        idx = order[image_ids[order] == img]
        iou = box_iou(boxes[idx], boxes[idx], pixel_offset)
        alive = np.ones(idx.size, dtype=bool)
        for a in range(idx.size):
            if alive[a]:
                alive[a + 1 :] &= ~(iou[a, a + 1 :] > nms_iou)
        keep.append(idx[alive])
    kept = np.concatenate(keep)
    # Restore the global detection order (score descending, index ascending).
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(order.size)
    return kept[np.argsort(rank[kept], kind="stable")]
