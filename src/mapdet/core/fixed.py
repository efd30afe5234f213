"""Fixed detections: the part of each class's problem that no gradient moves (the AP memory).

The windows of the minibatches kept by ``MAPLoss(memory=K)`` receive no gradient, their
scores are detached, and they lie in images of their own (``Windows.concat`` renumbers the
images). For class ``c``, everything the pseudo-gradient kernel needs of them is therefore
fixed the moment a minibatch enters the memory:

- its detections ``D_c``: the candidates (``s_ic > tau``) kept by greedy NMS in their image.
  A query moves the score of one current window, and a cascade stays inside that window's
  image (docs/method.md, section 5), so a fixed window's keep/suppress decision never
  changes. The suppressed ones take part in nothing but their own NMS, and greedy NMS run
  again on ``D_c`` alone keeps all of it (no kept window overlaps an earlier kept one by
  more than ``nu``; the pairs are compared in the same order), so ``D_c`` is all that is
  passed on;
- each detection's best ground truth: ``g*(d)``, an index into the minibatch's class-``c``
  ground truth (``-1`` without one), and its IoU (:func:`mapdet.core.ap.best_ground_truth`,
  the same arithmetic on the same pairs as on the concatenated problem);
- the images of ``D_c``, numbered densely ``0..B_c-1`` in increasing image id (every image
  with a candidate keeps one, so these are the images of the candidates).

:func:`fix_detections` computes :class:`FixedClass` parts once per minibatch (``O(N K)``
plus one NMS per class); :func:`join_fixed` lays the parts of several minibatches after a
current part, offsetting image numbers and ground-truth indices exactly as the concatenated
problem numbers them. Window order is preserved (current windows first, then each
minibatch's detections in their original order), so the detection order (score descending,
ties by window index) and hence the AP and every pseudo-partial are identical to those of
the concatenated problem, ties included; only the suppressed fixed windows are gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mapdet.core.ap import GroundTruth, best_ground_truth
from mapdet.core.gradkernel import base_detections

__all__ = ["FixedClass", "FixedDetections", "fix_detections", "join_fixed"]


class FixedClass(NamedTuple):
    """One minibatch's fixed part of one class's problem (``D`` detections, ``G`` ground truths).

    ``scores (D,)``, ``boxes (D, 4)`` C-contiguous, ``img (D,)`` dense image numbers in
    ``0..n_img-1``, ``n_img``, ``best (D,)`` int64 index into this minibatch's ground truth of
    the class (``-1``: none in the image), ``best_iou (D,)``, ``difficult (G,)`` bool flags
    of that ground truth (in its order), ``npos`` its non-difficult count."""

    scores: np.ndarray
    boxes: np.ndarray
    img: np.ndarray
    n_img: int
    best: np.ndarray
    best_iou: np.ndarray
    difficult: np.ndarray
    npos: int


class FixedDetections(NamedTuple):
    """:class:`FixedClass` parts of one minibatch for its ``K`` classes, and the detection
    function they were computed for (``tau``: score threshold, ``nu``: NMS IoU)."""

    classes: tuple[FixedClass, ...]
    tau: float
    nu: float


def fix_detections(scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids, gt_difficult,
                   *, score_threshold: float, nms_iou: float) -> FixedDetections:
    """The fixed parts of a minibatch whose windows receive no gradient.

    Args:
        scores: ``(N, K)`` float64; ``boxes``: ``(N, K, 4)`` class-specific or ``(N, 4)``;
        image_ids: ``(N,)`` int64; gt_boxes ``(G, 4)``, gt_labels ``(G,)`` in ``0..K-1``,
        gt_image_ids ``(G,)``, gt_difficult ``(G,)`` bool: the minibatch's, already checked
        (as :class:`mapdet.loss.Windows` holds them).
        score_threshold, nms_iou: the detection function (``tau``, ``nu``).

    Returns:
        :class:`FixedDetections`: per class, its detections in window order and their best
        ground truth (module docstring).
    """
    scores = np.asarray(scores, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    n, k = scores.shape
    if boxes.shape not in ((n, k, 4), (n, 4)) or image_ids.shape != (n,):
        raise ValueError(f"fix_detections: scores {scores.shape}, boxes {boxes.shape} and "
                         f"image_ids {image_ids.shape} do not describe the same N = {n} windows")
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    gt_image_ids = np.asarray(gt_image_ids, dtype=np.int64).reshape(-1)
    gt_difficult = np.asarray(gt_difficult, dtype=bool).reshape(-1)
    tau, nu = float(score_threshold), float(nms_iou)
    # All classes at once: every (class, image) pair is one NMS group and one matching group.
    # Candidates are laid out class-major, windows ascending, so each group's candidates
    # come in the class's detection order (score descending, window index ascending).
    cls, win = np.nonzero(scores.T > tau)
    s = scores[win, cls]
    b = np.ascontiguousarray(boxes[win, cls] if boxes.ndim == 3 else boxes[win])
    ids = np.unique(np.concatenate([image_ids, gt_image_ids]))
    n_ids = max(ids.size, 1)
    key = cls * n_ids + np.searchsorted(ids, image_ids[win])
    groups, group = np.unique(key, return_inverse=True)
    group = group.astype(np.int64).reshape(-1)
    order = np.argsort(-s, kind="stable").astype(np.int64)
    kept = base_detections(order, group, groups.size, b, nu, s.size)[1]
    keep = np.flatnonzero(kept)
    b = np.ascontiguousarray(b[keep])
    # Ground truth class-major too (its order within a class kept: ties go to the lowest).
    g_order = np.argsort(gt_labels, kind="stable")
    g_cls = gt_labels[g_order]
    gt = GroundTruth.checked(gt_boxes[g_order],
                             g_cls * n_ids + np.searchsorted(ids, gt_image_ids[g_order]),
                             gt_difficult[g_order])
    best, best_iou = best_ground_truth(b, key[keep], gt)
    g_lo = np.searchsorted(g_cls, np.arange(k + 1))
    best = np.where(best >= 0, best - g_lo[cls[keep]], -1)
    # Per class: its images numbered densely, in increasing image id, from 0.
    first_group = np.searchsorted(groups // n_ids, np.arange(k + 1))
    img = group[keep] - first_group[cls[keep]]
    lo = np.searchsorted(cls[keep], np.arange(k + 1))
    parts = []
    for c in range(k):
        r = slice(lo[c], lo[c + 1])
        difficult = gt.difficult[g_lo[c]:g_lo[c + 1]]
        parts.append(FixedClass(
            s[keep[r]], b[r], img[r], int(first_group[c + 1] - first_group[c]), best[r],
            best_iou[r], difficult, int(difficult.size - np.count_nonzero(difficult))))
    return FixedDetections(tuple(parts), tau, nu)


def join_fixed(head: FixedClass, parts: Sequence[FixedClass]) -> FixedClass:
    """``head`` (the current windows' part of a class, ``best`` indexing the current ground
    truth) followed by ``parts`` in order, numbered as in the concatenated problem: the
    images of part ``j`` come after those of ``head`` and of parts ``0..j-1``, and its
    ground-truth indices after theirs."""
    if not parts:
        return head
    all_parts = (head, *parts)
    sizes = [p.scores.size for p in all_parts]
    img_off = np.cumsum([0] + [p.n_img for p in all_parts])
    gt_off = np.cumsum([0] + [p.difficult.size for p in all_parts])
    best = np.concatenate([p.best for p in all_parts])
    best = np.where(best >= 0, best + np.repeat(gt_off[:-1], sizes), -1)
    img = np.concatenate([p.img for p in all_parts]) + np.repeat(img_off[:-1], sizes)
    return FixedClass(
        scores=np.concatenate([p.scores for p in all_parts]),
        boxes=np.concatenate([p.boxes for p in all_parts]),
        img=img, n_img=int(img_off[-1]), best=best,
        best_iou=np.concatenate([p.best_iou for p in all_parts]),
        difficult=np.concatenate([p.difficult for p in all_parts]),
        npos=sum(p.npos for p in all_parts),
    )
