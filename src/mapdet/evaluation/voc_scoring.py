"""VOC scoring of one class, vectorised over the detections (numpy, no torch).

The definitions are those of :mod:`mapdet.core.ap` (docs/method.md, section 2): walk the
detections by score descending (ties: input order); detection ``d`` takes the ground truth
``g*(d)`` of its own image with the largest IoU (ties: lowest index). If ``IoU >= theta``: a
difficult ``g*`` makes ``d`` ignored, a free one makes it a TP (and taken), a taken one a FP;
otherwise ``d`` is a FP.

The core walks images and detections in Python loops (:func:`mapdet.core.ap.best_ground_truth`,
:func:`mapdet.core.ap.label_detections`): clear, and the reference these functions are tested
against, but about 10 us per image and class. Here the same result comes from whole-array
operations:

- **best ground truth**: the ground truth is sorted by image, so detection ``d`` meets the
  slice ``[lo_d, hi_d)`` of it; all ``(d, g)`` pairs are listed with ``np.repeat``
  (``sum_d (hi_d - lo_d)`` pairs: each detection against the ground truth of its image and
  class only), their IoUs computed with the core's arithmetic (the devkit's order of
  operations, bit for bit), the maximum per detection taken with ``np.maximum.reduceat`` and
  the first pair reaching it kept (``np.argmax``'s tie rule);
- **labels**: ``d`` is a TP exactly when it is matched (``IoU >= theta``) to a non-difficult
  ``g`` and is the first such detection of ``g`` in the order; the first occurrence of each
  ``g`` comes from a stable sort of the matched ``g`` (what ``np.unique(...,
  return_index=True)`` does, without its import of ``numpy.ma``).

Devkit arithmetic (``devkit=True``): the IoU is the devkit's plain ``inters / uni``, so a
pair whose union is 0 (a zero-area detection on a zero-area ground truth, which only a
degenerate annotation can give) is NaN, as in ``voc_eval.py`` (``np.max`` propagates it,
``NaN > 0.5`` is false: a FP). The core (``devkit=False``) gives such a pair IoU 0. Either way
the detection is a FP (a zero-area detection has intersection 0 with every box), so the two
rules never give different labels; the devkit's is kept to follow its arithmetic literally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet.core.ap import FP, IGNORED, TP, ap_from_labels, ap_weights
from mapdet.core.nms import detection_order

__all__ = ["ClassGroundTruth", "best_ground_truth", "devkit_threshold", "label_detections",
           "score_class"]


def devkit_threshold(match_iou: float = 0.5) -> float:
    """The core threshold that reproduces the devkit's strict ``IoU > match_iou``.

    The core matches on ``IoU >= theta``; for float64 values, ``IoU > t`` holds exactly when
    ``IoU >= nextafter(t, +inf)``.
    """
    return float(np.nextafter(float(match_iou), np.inf))


@dataclass
class ClassGroundTruth:
    """The ground truth of one class, sorted by image.

    Attributes:
        boxes: ``(G, 4)`` float64 xyxy (raw 1-based numbers in devkit mode; not checked, so
            degenerate annotations are kept as the devkit keeps them).
        image: ``(G,)`` int64 image index, non-decreasing.
        difficult: ``(G,)`` bool.
    """

    boxes: np.ndarray
    image: np.ndarray
    difficult: np.ndarray

    @classmethod
    def build(cls, boxes, image, difficult) -> ClassGroundTruth:
        """Arrays in any image order -> sorted by image (stable: file order kept per image)."""
        image = np.asarray(image, dtype=np.int64).reshape(-1)
        order = np.argsort(image, kind="stable")
        return cls(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order], image[order],
                   np.asarray(difficult, dtype=bool).reshape(-1)[order])

    @property
    def npos(self) -> int:
        """The number of non-difficult ground truths."""
        return int(self.difficult.size - self.difficult.sum())


def _pair_iou(a: np.ndarray, g: np.ndarray, pixel_offset: float, devkit: bool) -> np.ndarray:
    """IoU of the pairs ``a[p]``, ``g[p]`` (``(P, 4)`` each), in the devkit's order of
    operations (as :func:`mapdet.core.boxes.box_iou`); see the module docstring for
    ``devkit``."""
    iw = np.maximum(np.minimum(a[:, 2], g[:, 2]) - np.maximum(a[:, 0], g[:, 0]) + pixel_offset,
                    0.0)
    ih = np.maximum(np.minimum(a[:, 3], g[:, 3]) - np.maximum(a[:, 1], g[:, 1]) + pixel_offset,
                    0.0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0] + pixel_offset) * (a[:, 3] - a[:, 1] + pixel_offset)
    area_g = (g[:, 2] - g[:, 0] + pixel_offset) * (g[:, 3] - g[:, 1] + pixel_offset)
    union = area_a + area_g - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        if devkit:
            return inter / union
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_ground_truth(boxes: np.ndarray, image: np.ndarray, gt: ClassGroundTruth,
                      pixel_offset: float = 0.0, *, devkit: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """For every detection, the ground truth of its image with the largest IoU.

    Args:
        boxes: ``(D, 4)`` float64 xyxy; ``image``: ``(D,)`` int64.
        gt: the class's ground truth.
        pixel_offset: ``1.0`` for the devkit's ``+1`` widths.
        devkit: the devkit's NaN rule (module docstring).

    Returns:
        ``(best (D,) int64, iou (D,) float64)``: index into ``gt`` (ties: lowest index), or
        -1 with IoU 0 when the image has no ground truth of the class (and -1 with IoU NaN
        under the devkit's NaN rule).
    """
    n = image.shape[0]
    best = np.full(n, -1, dtype=np.int64)
    best_iou = np.zeros(n, dtype=np.float64)
    if n == 0 or gt.image.size == 0:
        return best, best_iou
    lo = np.searchsorted(gt.image, image, side="left")
    count = np.searchsorted(gt.image, image, side="right") - lo
    det = np.flatnonzero(count)
    if det.size == 0:
        return best, best_iou
    c = count[det]
    seg = np.cumsum(c) - c  # first pair of each detection
    local = np.repeat(np.arange(det.size), c)  # pair -> position in det
    pair_gt = lo[det][local] + (np.arange(local.size) - seg[local])
    iou = _pair_iou(boxes[det[local]], gt.boxes[pair_gt], pixel_offset, devkit)
    top = np.maximum.reduceat(iou, seg)  # NaN propagates, as np.max does
    hit = np.flatnonzero(iou == top[local])
    first = np.ones(hit.size, dtype=bool)
    first[1:] = local[hit[1:]] != local[hit[:-1]]
    hit = hit[first]
    best[det[local[hit]]] = pair_gt[hit]
    best_iou[det] = top
    return best, best_iou


def label_detections(best: np.ndarray, best_iou: np.ndarray, difficult: np.ndarray,
                     theta: float) -> np.ndarray:
    """TP/FP/ignored labels of detections already in detection order (vectorised
    :func:`mapdet.core.ap.label_detections`).

    Returns:
        ``(D,)`` int8: ``TP=1``, ``FP=0``, ``IGNORED=-1``.
    """
    labels = np.full(best.shape[0], FP, dtype=np.int8)
    matched = np.flatnonzero((best >= 0) & (best_iou >= theta))
    if matched.size == 0:
        return labels
    hard = difficult[best[matched]]
    labels[matched[hard]] = IGNORED
    free = matched[~hard]
    g = best[free]
    order = np.argsort(g, kind="stable")  # by g, then detection order
    run_start = np.ones(order.size, dtype=bool)
    run_start[1:] = g[order[1:]] != g[order[:-1]]
    labels[free[order[run_start]]] = TP  # the first detection of each g
    return labels


def score_class(gt: ClassGroundTruth, image: np.ndarray, scores: np.ndarray,
                boxes: np.ndarray, *, metric: str, theta: float, pixel_offset: float,
                devkit: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """AP and the raw PR curve of one class.

    Args:
        gt: the class's ground truth.
        image, scores, boxes: ``(D,)``, ``(D,)``, ``(D, 4)`` the class's detections.
        metric: ``"voc07"`` or ``"area"``.
        theta: match when ``IoU >= theta``.
        pixel_offset, devkit: see :func:`best_ground_truth`.

    Returns:
        ``(ap, recall (D',), precision (D',))`` after each non-ignored detection; the AP (and
        the recall) is NaN when ``npos == 0``.
    """
    order = detection_order(scores, -np.inf)
    best, best_iou = best_ground_truth(boxes[order], image[order], gt, pixel_offset,
                                       devkit=devkit)
    labels = label_detections(best, best_iou, gt.difficult, theta)
    labels = labels[labels != IGNORED]
    tp = np.cumsum(labels == TP)
    precision = tp / np.arange(1, labels.size + 1)
    npos = gt.npos
    if npos == 0:
        return float("nan"), np.full(labels.size, np.nan), precision
    ap = ap_from_labels(labels, npos, ap_weights(npos, metric))
    return ap, tp / npos, precision
