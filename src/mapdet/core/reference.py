"""Brute-force references: AP after NMS and its pseudo-gradient, straight from the definitions.

Slow on purpose (``O(N^2)`` full detection-function evaluations for the gradient): the fast
code in :mod:`mapdet.core.apnms` is tested against these on generated instances.
:func:`edited_ap_reference` is the obvious version of :func:`mapdet.core.editap.edited_ap`:
it materialises the edited list and labels it from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mapdet.core.ap import ap_from_labels, average_precision, label_detections
from mapdet.core.nms import greedy_nms
from mapdet.core.pseudograd import (
    IMPROVEMENT_TOL,
    check_direction,
    check_min_step,
    pseudo_partial,
)
from mapdet.defaults import NMS_IOU, SCORE_THRESHOLD

__all__ = ["ap_after_nms_reference", "ap_pseudo_gradient_reference", "edited_ap_reference"]


def ap_after_nms_reference(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
) -> float:
    """Detection function (threshold, order, greedy per-image NMS) followed by AP."""
    scores = np.asarray(scores, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    keep = greedy_nms(scores, boxes, image_ids, score_threshold=score_threshold, nms_iou=nms_iou)
    return average_precision(
        scores[keep], boxes[keep], image_ids[keep], gt_boxes, gt_image_ids, gt_difficult,
        match_iou=match_iou, ap_method=ap_method,
    )


def ap_pseudo_gradient_reference(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3, tol: float = IMPROVEMENT_TOL,
    direction: str = "nearest_improvement",
) -> tuple[float, np.ndarray]:
    """Pseudo-gradient of AP after NMS w.r.t. the scores, by brute force.

    Along ``s_i`` the breakpoints are the distinct values among the other windows' scores and
    ``score_threshold`` (docs/method.md, section 3); ``f`` is re-evaluated from scratch just
    beyond each of them until the first improvement (``direction="nearest_change"``: the
    first change) in each direction; ``direction`` as in :mod:`mapdet.core.pseudograd`.
    """
    check_min_step(min_step)
    check_direction(direction)
    scores = np.asarray(scores, dtype=np.float64)
    kwargs = dict(score_threshold=score_threshold, nms_iou=nms_iou, match_iou=match_iou,
                  ap_method=ap_method)

    def f(s: np.ndarray) -> float:
        return ap_after_nms_reference(s, boxes, image_ids, gt_boxes, gt_image_ids,
                                      gt_difficult, **kwargs)

    f_x = f(scores)
    grad = np.zeros_like(scores)
    if np.isnan(f_x):
        return f_x, grad
    for i in range(scores.size):
        others = np.delete(scores, i)
        points = np.append(others, score_threshold)

        def f_along(value: float, i: int = i) -> float:
            moved = scores.copy()
            moved[i] = value
            return f(moved)

        grad[i] = pseudo_partial(f_along, scores[i], points, f_x=f_x, min_step=min_step, tol=tol,
                                 direction=direction)
    return f_x, grad


def edited_ap_reference(det, removed, inserts, best, best_iou, gt_difficult, thetas,
                        weights) -> float:
    """AP (mean over ``thetas``) of the list ``det`` without the base positions in ``removed``
    and with ``inserts``: ``(gap, sec, window)`` triples, each window placed before base
    position ``gap`` (same gap: by ``sec`` ascending). Built and labelled from scratch."""
    removed = set(int(p) for p in removed)
    by_gap: dict[int, list] = {}
    for gap, _sec, w in sorted(inserts):
        by_gap.setdefault(int(gap), []).append(int(w))
    seq = []
    for p in range(len(det) + 1):
        seq.extend(by_gap.get(p, []))
        if p < len(det) and p not in removed:
            seq.append(int(det[p]))
    seq = np.asarray(seq, dtype=np.int64)
    npos = int((~np.asarray(gt_difficult, dtype=bool)).sum())
    aps = [ap_from_labels(label_detections(best[seq], best_iou[seq], gt_difficult, t), npos,
                          weights) for t in thetas]
    return float(np.mean(aps))
