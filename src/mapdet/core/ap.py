"""Average precision of one class for a ranked list of detections (numpy, no torch).

Matching (docs/method.md, section 2). Walk the detections in order (score descending, ties
by index ascending). Detection ``d`` takes the ground truth ``g*(d)`` of its own image with
the largest IoU (ties: lowest index), difficult ones included. If ``IoU >= theta``: if
``g*`` is difficult, ``d`` is ignored (neither TP nor FP); else if ``g*`` is still free,
``d`` is a TP and takes it; else ``d`` is a FP (duplicate). Below ``theta``: FP.
``npos`` is the number of non-difficult ground truths over all images.

AP as a weighted sum. Let the non-ignored detections be labelled TP/FP, let the ``m``-th TP
stand at rank ``n_m`` (ignored detections removed), ``v_m = m / n_m`` its precision and
``V_k = max_{m >= k} v_m`` the precision made monotone from the right. Every AP flavour
here is ``AP = sum_{k=1}^{T} w_k V_k`` with weights that depend only on ``npos``:

- ``area`` (VOC 2010 onward): ``w_k = 1 / npos``, the area under the interpolated
  precision-recall curve summed over the recall steps;
- ``voc07``: ``w_k = #{t in {0, 0.1, ..., 1}: k(t) = k} / 11`` where ``k(t)`` is the first TP
  whose recall ``k / npos`` is ``>= t`` (the 11-point interpolated AP of VOC 2007);
- ``r101``: the same with the 101 points ``linspace(0, 1, 101)`` (COCO's interpolation).

Recall thresholds are compared in float64 exactly as the VOC devkit (``np.arange(0, 1.1,
0.1)``) and pycocotools (``np.linspace(0, 1, 101)``) do. With several IoU thresholds
(COCO-style), the AP is the mean of the per-threshold APs. ``npos = 0`` gives NaN.

References: M. Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV
2010; the VOC devkit and py-faster-rcnn ``voc_eval.py``; pycocotools ``cocoeval.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mapdet.core.boxes import as_boxes, box_iou, check_finite
from mapdet.core.nms import detection_order

__all__ = [
    "AP_METHODS",
    "IGNORED",
    "TP",
    "FP",
    "GroundTruth",
    "ap_from_labels",
    "ap_weights",
    "average_precision",
    "best_ground_truth",
    "image_groups",
    "as_integers",
    "check_ap_method",
    "check_iou_threshold",
    "label_detections",
    "match_detections",
    "match_thresholds",
    "precision_recall_curve",
]

AP_METHODS = ("area", "voc07", "r101")
TP, FP, IGNORED = 1, 0, -1


def check_ap_method(ap_method: str) -> str:
    """Return ``ap_method`` if valid, else raise ``ValueError`` listing the valid ones."""
    if ap_method not in AP_METHODS:
        raise ValueError(f"ap_method must be one of {list(AP_METHODS)}, got {ap_method!r}")
    return ap_method


def check_iou_threshold(name: str, value: float | Sequence[float]) -> np.ndarray:
    """``value`` (one IoU threshold or a sequence) as a float64 array ``(T,)``, each in (0, 1].

    Raises ``ValueError`` naming ``name`` otherwise (an IoU never exceeds 1, so a threshold
    above it, or at or below 0, silently makes every comparison the same)."""
    thr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if thr.ndim != 1 or thr.size == 0:
        raise ValueError(f"{name} must be a number or a non-empty sequence, got {value!r}")
    if not np.all((thr > 0.0) & (thr <= 1.0)):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return thr


def match_thresholds(match_iou: float | Sequence[float]) -> np.ndarray:
    """``match_iou`` (a number or a sequence) as a float64 array ``(T,)``, each in (0, 1]."""
    return check_iou_threshold("match_iou", match_iou)


def as_integers(name: str, values) -> np.ndarray:
    """``values`` as a flat int64 array; ``ValueError`` naming ``name`` when a value is not an
    integer (a float id such as 1.7 would otherwise be truncated silently to 1)."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))][0]
        raise ValueError(f"{name} must be integers, got {float(bad)!r}")
    return arr.astype(np.int64)


class GroundTruth:
    """Ground truth boxes of one class over a set of images, checked once.

    Attributes:
        boxes: ``(G, 4)`` float64 xyxy.
        image_ids: ``(G,)`` int64.
        difficult: ``(G,)`` bool.
        npos: number of non-difficult boxes.
    """

    def __init__(self, boxes, image_ids, difficult=None):
        self.boxes = as_boxes("gt_boxes", boxes)
        g = self.boxes.shape[0]
        self.image_ids = as_integers("gt_image_ids", image_ids)
        if self.image_ids.shape[0] != g:
            raise ValueError(
                f"gt_image_ids has {self.image_ids.shape[0]} entries, gt_boxes has {g} rows"
            )
        if difficult is None:
            self.difficult = np.zeros(g, dtype=bool)
        else:
            self.difficult = np.asarray(difficult, dtype=bool).reshape(-1)
            if self.difficult.shape[0] != g:
                raise ValueError(
                    f"gt_difficult has {self.difficult.shape[0]} entries, gt_boxes has {g} rows"
                )
        self.npos = int((~self.difficult).sum())

    @classmethod
    def checked(cls, boxes: np.ndarray, image_ids: np.ndarray,
                difficult: np.ndarray) -> GroundTruth:
        """Wrap arrays that are already checked (float64 ``(G, 4)``, int64 ``(G,)``, bool
        ``(G,)``, as :meth:`__init__` would make them) without checking them again."""
        gt = cls.__new__(cls)
        gt.boxes, gt.image_ids, gt.difficult = boxes, image_ids, difficult
        gt.npos = int(difficult.size - np.count_nonzero(difficult))
        return gt


def best_ground_truth(
    boxes: np.ndarray, image_ids: np.ndarray, gt: GroundTruth, pixel_offset: float = 0.0,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For every window, the ground truth of its image with the largest IoU.

    Args:
        boxes: ``(N, 4)`` xyxy windows; ``image_ids``: ``(N,)`` int.
        groups: optional :func:`image_groups` of ``image_ids``, when several calls share them.

    Returns:
        ``(best (N,) int64, iou (N,) float64)``: index into ``gt`` (ties: lowest index), or -1
        with IoU 0 for a window whose image has no ground truth. Independent of the scores.
    """
    n = boxes.shape[0]
    best = np.full(n, -1, dtype=np.int64)
    best_iou = np.zeros(n, dtype=np.float64)
    if n == 0 or gt.boxes.shape[0] == 0:
        return best, best_iou
    order, sorted_ids = groups if groups is not None else image_groups(image_ids)
    gt_order, gt_sorted = image_groups(gt.image_ids)
    imgs = np.unique(gt_sorted)  # images with ground truth, then those with windows too
    lo, hi = np.searchsorted(sorted_ids, imgs, "left"), np.searchsorted(sorted_ids, imgs, "right")
    has = hi > lo
    imgs, lo, hi = imgs[has], lo[has], hi[has]
    g_lo = np.searchsorted(gt_sorted, imgs, "left")
    g_hi = np.searchsorted(gt_sorted, imgs, "right")
    for k in range(imgs.size):
        rows = order[lo[k]:hi[k]]
        cols = gt_order[g_lo[k]:g_hi[k]]  # ascending: ties go to the lowest index
        iou = box_iou(boxes[rows], gt.boxes[cols], pixel_offset)
        arg = np.argmax(iou, axis=1)  # first maximum: lowest index on ties
        best[rows] = cols[arg]
        best_iou[rows] = iou[np.arange(rows.size), arg]
    return best, best_iou


def image_groups(image_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(order, sorted_ids)``: a stable sort of ``image_ids`` (each image's rows ascending)."""
    image_ids = np.asarray(image_ids).reshape(-1)
    order = np.argsort(image_ids, kind="stable")
    return order, image_ids[order]


def label_detections(
    best: np.ndarray, best_iou: np.ndarray, difficult: np.ndarray, theta: float
) -> np.ndarray:
    """TP/FP/ignored labels of detections already in detection order.

    Args:
        best, best_iou: ``(D,)`` the best ground truth of each detection and its IoU
            (from :func:`best_ground_truth`, restricted to the detections, in order).
        difficult: ``(G,)`` bool flags of the ground truth.
        theta: matching IoU threshold (``IoU >= theta`` matches).

    Returns:
        ``(D,)`` int8 with values ``TP=1``, ``FP=0``, ``IGNORED=-1``.
    """
    labels = np.full(best.shape[0], FP, dtype=np.int8)
    taken = np.zeros(difficult.shape[0], dtype=bool)
    for d in range(best.shape[0]):
        g = best[d]
        if g < 0 or best_iou[d] < theta:
            continue
        if difficult[g]:
            labels[d] = IGNORED
        elif not taken[g]:
            taken[g] = True
            labels[d] = TP
    return labels


def ap_weights(npos: int, ap_method: str, max_tp: int | None = None) -> np.ndarray:
    """Weights ``w_k`` (k = 1..npos, returned 0-based) with ``AP = sum_k w_k V_k``.

    See the module docstring. ``max_tp`` caps the length (default ``npos``).
    """
    check_ap_method(ap_method)
    size = npos if max_tp is None else min(npos, max_tp)
    if npos <= 0:
        return np.zeros(0, dtype=np.float64)
    if ap_method == "area":
        return np.full(size, 1.0 / npos, dtype=np.float64)
    if ap_method == "voc07":
        thresholds = np.arange(0.0, 1.1, 0.1)
    else:
        thresholds = np.linspace(0.0, 1.0, 101)
    recall = np.arange(1, npos + 1, dtype=np.float64) / float(npos)
    # k(t): the first TP (1-based) with recall >= t; t = 0 is reached by the first TP.
    k = np.searchsorted(recall, thresholds, side="left")
    weights = np.bincount(k[k < npos], minlength=npos).astype(np.float64) / thresholds.size
    return weights[:size]


def ap_from_labels(labels: np.ndarray, npos: int, weights: np.ndarray | None = None,
                   ap_method: str = "area") -> float:
    """AP of a ranked label sequence ``(D,)`` (``TP``/``FP``/``IGNORED``): ``sum_k w_k V_k``.

    Returns NaN when ``npos == 0``.
    """
    if npos <= 0:
        return float("nan")
    if weights is None:
        weights = ap_weights(npos, ap_method)
    labels = labels[labels != IGNORED]
    tp_rank = np.flatnonzero(labels == TP) + 1  # n_m, 1-based ranks of the TPs
    if tp_rank.size == 0:
        return 0.0
    precision = np.arange(1, tp_rank.size + 1) / tp_rank
    monotone = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.dot(weights[: tp_rank.size], monotone))


def match_detections(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    match_iou: float = 0.5, pixel_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Order the detections and label them.

    Returns:
        ``(order (D,) int64, labels (D,) int8)``: detection indices in order (score
        descending, ties by index ascending) and their ``TP``/``FP``/``IGNORED`` labels.
    """
    scores, boxes, image_ids = _check_windows(scores, boxes, image_ids)
    gt = GroundTruth(gt_boxes, gt_image_ids, gt_difficult)
    order = detection_order(scores, -np.inf)
    best, best_iou = best_ground_truth(boxes[order], image_ids[order], gt, pixel_offset)
    return order, label_detections(best, best_iou, gt.difficult, float(match_iou))


def average_precision(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    pixel_offset: float = 0.0,
) -> float:
    """AP of one class for the given detections (all of them count: no threshold, no NMS).

    Args:
        scores: ``(D,)`` float, detection confidences.
        boxes: ``(D, 4)`` xyxy detection boxes.
        image_ids: ``(D,)`` int image of each detection.
        gt_boxes: ``(G, 4)`` xyxy; ``gt_image_ids``: ``(G,)`` int; ``gt_difficult``: ``(G,)`` bool.
        match_iou: IoU threshold, or a sequence of them (the AP is their mean).
        ap_method: ``"area"``, ``"voc07"`` or ``"r101"`` (see the module docstring).
        pixel_offset: ``1.0`` for the devkit's ``+1`` widths.

    Returns:
        The AP in ``[0, 1]``, or NaN when there is no non-difficult ground truth.
    """
    check_ap_method(ap_method)
    thresholds = match_thresholds(match_iou)
    scores, boxes, image_ids = _check_windows(scores, boxes, image_ids)
    gt = GroundTruth(gt_boxes, gt_image_ids, gt_difficult)
    if gt.npos == 0:
        return float("nan")
    order = detection_order(scores, -np.inf)
    best, best_iou = best_ground_truth(boxes[order], image_ids[order], gt, pixel_offset)
    weights = ap_weights(gt.npos, ap_method)
    aps = [
        ap_from_labels(label_detections(best, best_iou, gt.difficult, t), gt.npos, weights)
        for t in thresholds
    ]
    return float(np.mean(aps))


def precision_recall_curve(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    match_iou: float = 0.5, pixel_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (not interpolated) recall and precision after each non-ignored detection.

    Returns ``(recall (D',), precision (D',))``; recall is NaN-free only when ``npos > 0``.
    """
    order, labels = match_detections(
        scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
        match_iou=match_iou, pixel_offset=pixel_offset,
    )
    npos = GroundTruth(gt_boxes, gt_image_ids, gt_difficult).npos
    labels = labels[labels != IGNORED]
    tp = np.cumsum(labels == TP)
    ranks = np.arange(1, labels.size + 1)
    recall = tp / npos if npos > 0 else np.full(labels.size, np.nan)
    return recall.astype(np.float64), (tp / ranks).astype(np.float64)


def _check_windows(scores, boxes, image_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate ``scores (N,)``, ``boxes (N, 4)``, ``image_ids (N,)``; return them as arrays."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got {scores.shape}")
    check_finite("scores", scores)
    n = scores.shape[0]
    boxes = as_boxes("boxes", boxes, n)
    image_ids = np.asarray(image_ids).reshape(-1)
    if image_ids.shape[0] != n:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries, scores has {n}")
    if n and not np.issubdtype(image_ids.dtype, np.integer):
        if not np.all(np.mod(image_ids, 1) == 0):
            raise ValueError("image_ids must be integers")
    return scores, boxes, image_ids.astype(np.int64)
