"""AP after NMS under random score perturbations, and the perturbed-optimizer gradient.

AP after NMS is piecewise constant in the scores; its expectation under Gaussian noise,
``F(s) = E_z[AP(s + sigma z)]``, is smooth, and (Berthet et al., "Learning with
Differentiable Perturbed Optimizers", NeurIPS 2020; Stein's lemma)

    grad F(s) = E_z[AP(s + sigma z) z] / sigma.

:func:`perturbed_ap_gradient` estimates it with ``K`` antithetic pairs,
``g = sum_k (AP(s + sigma z_k) - AP(s - sigma z_k)) z_k / (2 K sigma)``, unbiased. One exact
variance reduction **[our choice]**: a window that is below the score threshold in both
scores of a pair (``s_i + sigma |z_ik| <= tau``) takes no part in either AP, so the pair's
term for it has conditional mean 0 given ``|z_ik|`` and the other windows' noise (flipping
the sign of ``z_ik`` changes neither AP); it is set to 0. So only windows that can become
candidates get a gradient.

The perturbations change only the order (and which windows are candidates): every window's
best ground truth and IoU are computed once, and :func:`perturbed_aps` evaluates the
detection function and AP for many score vectors in one compiled loop.
:func:`perturbed_aps_reference` is the obvious version (``ap_after_nms_reference`` per
vector), for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from mapdet.core.ap import GroundTruth, ap_weights, best_ground_truth, match_thresholds
from mapdet.core.boxes import as_boxes
from mapdet.defaults import NMS_IOU, SCORE_THRESHOLD

__all__ = ["perturbed_ap_gradient", "perturbed_aps", "perturbed_aps_reference",
           "perturbed_gradient_multiclass"]


@njit(cache=True, nogil=True)
def _iou(b, i, j):  # pragma: no cover - compiled
    ix1 = max(b[i, 0], b[j, 0])
    iy1 = max(b[i, 1], b[j, 1])
    ix2 = min(b[i, 2], b[j, 2])
    iy2 = min(b[i, 3], b[j, 3])
    iw = max(ix2 - ix1, 0.0)
    ih = max(iy2 - iy1, 0.0)
    inter = iw * ih
    union = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1]) + (b[j, 2] - b[j, 0]) * (
        b[j, 3] - b[j, 1]) - inter
    return inter / union if union > 0 else 0.0


@njit(cache=True, nogil=True)
def _aps_kernel(scores, boxes, img, n_img, best, best_iou, difficult, thetas, weights,
                tau, nu, out):  # pragma: no cover - compiled
    """AP after NMS of each row of ``scores (S, N)`` into ``out (S,)``."""
    n = scores.shape[1]
    n_gt = difficult.shape[0]
    kept = np.empty(n, dtype=np.int64)
    kept_img = np.empty(n, dtype=np.int64)
    taken = np.zeros(n_gt, dtype=np.bool_)
    for r in range(scores.shape[0]):
        s = scores[r]
        cand = np.flatnonzero(s > tau)
        order = cand[np.argsort(-s[cand], kind="mergesort")]
        d = 0
        for a in range(order.size):
            i = order[a]
            ok = True
            for q in range(d):
                if kept_img[q] == img[i] and _iou(boxes, i, kept[q]) > nu:
                    ok = False
                    break
            if ok:
                kept[d] = i
                kept_img[d] = img[i]
                d += 1
        total = 0.0
        for t in range(thetas.size):
            taken[:] = False
            n_tp = 0
            rank = 0
            v = np.empty(d, dtype=np.float64)
            for q in range(d):
                i = kept[q]
                g = best[i]
                if g >= 0 and best_iou[i] >= thetas[t]:
                    if difficult[g]:
                        continue  # ignored: not ranked
                    if not taken[g]:
                        taken[g] = True
                        rank += 1
                        v[n_tp] = (n_tp + 1) / rank
                        n_tp += 1
                        continue
                rank += 1
            ap = 0.0
            run = 0.0
            for m in range(n_tp - 1, -1, -1):
                run = max(run, v[m])
                if m < weights.size:
                    ap += weights[m] * run
            total += ap
        out[r] = total / thetas.size
    return out


def _problem(boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult, match_iou, ap_method):
    boxes = as_boxes("boxes", boxes)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    gt = GroundTruth(gt_boxes, gt_image_ids, gt_difficult)
    best, best_iou = best_ground_truth(boxes, image_ids, gt)
    _, dense = np.unique(image_ids, return_inverse=True)
    weights = ap_weights(gt.npos, ap_method)
    return (boxes, dense.astype(np.int64), best, best_iou, gt.difficult.astype(np.bool_),
            match_thresholds(match_iou).astype(np.float64), weights, gt.npos)


def perturbed_aps(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
) -> np.ndarray:
    """AP after NMS of one class for each row of ``scores (S, N)`` (the windows' boxes and the
    ground truth shared), as :func:`mapdet.core.apnms.ap_after_nms` row by row. ``(S,)``;
    NaN when there is no non-difficult ground truth."""
    scores = np.ascontiguousarray(np.atleast_2d(np.asarray(scores, dtype=np.float64)))
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (S, N), got {scores.shape}")
    b, img, best, best_iou, diff, thetas, weights, npos = _problem(
        boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult, match_iou, ap_method)
    if b.shape[0] != scores.shape[1]:
        raise ValueError(f"scores have {scores.shape[1]} columns but there are "
                         f"{b.shape[0]} boxes")
    if npos == 0:
        return np.full(scores.shape[0], np.nan)
    out = np.zeros(scores.shape[0], dtype=np.float64)
    return _aps_kernel(scores, b, img, int(img.max(initial=-1)) + 1, best, best_iou, diff,
                       thetas, weights, float(score_threshold), float(nms_iou), out)


def perturbed_aps_reference(scores, boxes, image_ids, gt_boxes, gt_image_ids,
                            gt_difficult=None, **kwargs) -> np.ndarray:
    """:func:`perturbed_aps` by the definition: ``ap_after_nms_reference`` on each row."""
    from mapdet.core.reference import ap_after_nms_reference

    return np.array([ap_after_nms_reference(row, boxes, image_ids, gt_boxes, gt_image_ids,
                                            gt_difficult, **kwargs)
                     for row in np.atleast_2d(np.asarray(scores, dtype=np.float64))])


def perturbed_ap_gradient(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    noise: np.ndarray, sigma: float, score_threshold: float = SCORE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area", aps=perturbed_aps,
) -> np.ndarray:
    """The antithetic perturbed-optimizer estimate of ``grad E_z[AP(s + sigma z)]`` for one
    class (module docstring).

    Args:
        scores: ``(N,)``; boxes, image ids and ground truth as :func:`perturbed_aps`.
        noise: ``(K, N)`` standard normal draws ``z_k``.
        sigma: the noise's scale (> 0).
        aps: the AP evaluator (:func:`perturbed_aps`; the tests pass the reference).

    Returns:
        ``(N,)`` float64; zeros when the AP is undefined.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    z = np.asarray(noise, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != s.size:
        raise ValueError(f"noise must have shape (K, {s.size}), got {z.shape}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    k = z.shape[0]
    if k == 0 or s.size == 0:
        return np.zeros(s.size)
    kw = dict(score_threshold=score_threshold, nms_iou=nms_iou, match_iou=match_iou,
              ap_method=ap_method)
    both = aps(np.concatenate([s + sigma * z, s - sigma * z]), boxes, image_ids, gt_boxes,
               gt_image_ids, gt_difficult, **kw)
    if np.isnan(both).any():
        return np.zeros(s.size)
    diff = both[:k] - both[k:]
    active = (s[None, :] + sigma * np.abs(z)) > score_threshold
    return (diff[:, None] * z * active).sum(axis=0) / (2.0 * k * sigma)


def perturbed_gradient_multiclass(
    scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids, gt_difficult=None, *,
    noise: np.ndarray, sigma: float, score_threshold: float = SCORE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class APs (unperturbed) and :func:`perturbed_ap_gradient` for ``K`` classes.

    ``scores (N, K)``; ``boxes (N, K, 4)`` or ``(N, 4)``; ``gt_labels (G,)`` in ``0..K-1``;
    ``noise (S, N, K)``: class ``c`` uses ``noise[:, :, c]``. Returns ``(aps (K,), grads
    (N, K))``, NaN and zeros where a class has no non-difficult ground truth."""
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    boxes = np.asarray(boxes, dtype=np.float64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64)
    gt_image_ids = np.asarray(gt_image_ids, dtype=np.int64)
    diff = (np.zeros(gt_labels.size, bool) if gt_difficult is None
            else np.asarray(gt_difficult, dtype=bool))
    noise = np.asarray(noise, dtype=np.float64)
    if noise.shape[1:] != (n, k):
        raise ValueError(f"noise must have shape (S, {n}, {k}), got {noise.shape}")
    aps = np.full(k, np.nan)
    grads = np.zeros((n, k))
    kw = dict(score_threshold=score_threshold, nms_iou=nms_iou, match_iou=match_iou,
              ap_method=ap_method)
    for c in range(k):
        b = boxes[:, c] if boxes.ndim == 3 else boxes
        g = gt_labels == c
        args = (b, image_ids, gt_boxes[g], gt_image_ids[g], diff[g])
        aps[c] = perturbed_aps(scores[None, :, c], *args, **kw)[0]
        if not np.isnan(aps[c]):
            grads[:, c] = perturbed_ap_gradient(scores[:, c], *args, noise=noise[:, :, c],
                                                sigma=sigma, **kw)
    return aps, grads
