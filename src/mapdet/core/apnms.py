"""AP after NMS and its exact pseudo-gradient: the public API.

:func:`ap_after_nms` and :func:`ap_pseudo_gradient` (one class),
:func:`ap_pseudo_gradient_multiclass` (classes in parallel threads). The inputs are checked
here and handed to the compiled kernels: :mod:`mapdet.core.overlap` (NMS, overlap graph,
cascades), :mod:`mapdet.core.editap` (AP of an edited detection list in ``O(E log M)``) and
:mod:`mapdet.core.gradkernel` (which states and positions to evaluate, and why that is exact).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mapdet.core.ap import (
    GroundTruth,
    ap_weights,
    as_integers,
    best_ground_truth,
    check_ap_method,
    check_iou_threshold,
    image_groups,
    match_thresholds,
)
from mapdet.core.boxes import as_boxes, check_boxes, check_finite
from mapdet.core.editap import ap_of_list
from mapdet.core.fixed import FixedClass, FixedDetections, join_fixed
from mapdet.core.gradkernel import (
    N_STATS,
    ClassData,
    KernelParams,
    base_detections,
    pseudo_gradient_kernel,
)
from mapdet.core.nms import detection_order
from mapdet.core.pseudograd import IMPROVEMENT_TOL, SLOPE_RTOL, check_direction, check_min_step
from mapdet.defaults import NMS_IOU, SCORE_THRESHOLD

__all__ = ["ClassProblem", "ap_after_nms", "ap_pseudo_gradient", "ap_pseudo_gradient_multiclass",
           "class_problem", "class_problems", "solve_class", "solve_classes"]


# ----------------------------------------------------------------------------- inputs


class ClassProblem:
    """One class's checked inputs in the integer form the kernels take.

    Built from raw inputs by :func:`class_problem` (one class, every input checked) or
    :func:`class_problems` (every class of a minibatch, the shared inputs checked once);
    both call this constructor with inputs already checked. Solved by :func:`solve_class`.

    Args:
        cfg: the checked settings (:meth:`_Settings.check`).
        scores: ``(N,)`` float64, finite; boxes: ``(N, 4)`` C-contiguous float64 xyxy;
            image_ids: ``(N,)`` int64 with ``dense_img (N,)`` their numbers ``0..n_img-1``.
        gt: the class's ground truth; groups: :func:`image_groups` of ``image_ids`` (or
            ``None``).
        fixed: parts of earlier minibatches appended after these windows
            (:func:`mapdet.core.fixed.join_fixed`); they are never queried.
        rows: ``(N,)`` the rows of the minibatch these windows are, when a subset
            (``None``: all ``n_all`` rows, in order); n_all: the minibatch's windows
            (default ``N``).
    """

    def __init__(self, cfg: _Settings, scores: np.ndarray, boxes: np.ndarray,
                 image_ids: np.ndarray, dense_img: np.ndarray, n_img: int, gt: GroundTruth,
                 groups=None, fixed: Sequence[FixedClass] = (), rows: np.ndarray | None = None,
                 n_all: int | None = None):
        self.direction, self.thetas, self.tau, self.nu = cfg.direction, cfg.thetas, cfg.tau, cfg.nu
        self.mu = cfg.mu
        self.rows = rows
        self.n_all = scores.size if n_all is None else int(n_all)
        self.scores, self.boxes, self.image_ids = scores, boxes, image_ids
        self.npos = gt.npos + sum(f.npos for f in fixed)
        self.gt_difficult = gt.difficult
        if self.npos == 0:
            return  # AP undefined: nothing else is needed
        self.best, self.best_iou = best_ground_truth(boxes, image_ids, gt, groups=groups)
        self.dense_img, self.n_img = dense_img, n_img
        if fixed:
            j = join_fixed(FixedClass(scores, boxes, dense_img, n_img, self.best, self.best_iou,
                                      gt.difficult, gt.npos), fixed)
            self.scores, self.boxes, self.dense_img, self.n_img = j.scores, j.boxes, j.img, j.n_img
            self.best, self.best_iou, self.gt_difficult = j.best, j.best_iou, j.difficult
        self.weights = ap_weights(self.npos, cfg.ap_method)
        self.order = detection_order(self.scores, self.tau)
        self.rank = np.full(self.scores.size, -1, dtype=np.int64)
        self.rank[self.order] = np.arange(self.order.size)


def class_problem(scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
                  score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                  match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
                  min_step: float | None = None,
                  direction: str = "nearest_improvement") -> ClassProblem:
    """The :class:`ClassProblem` of one class from raw inputs (arguments as
    :func:`ap_pseudo_gradient`; ``min_step=None``: the AP only, no gradient), every input
    checked with a one-line error."""
    cfg = _Settings.check(score_threshold, nms_iou, match_iou, ap_method, min_step, direction)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got {scores.shape}")
    check_finite("scores", scores)
    n = scores.shape[0]
    boxes = np.ascontiguousarray(as_boxes("boxes", boxes, n))
    image_ids = as_integers("image_ids", image_ids)
    if image_ids.shape[0] != n:
        raise ValueError(f"image_ids has {image_ids.shape[0]} entries, scores has {n}")
    image_ids = image_ids.astype(np.int64)
    dense_img, n_img = _dense_images(image_ids)
    gt = GroundTruth(gt_boxes, gt_image_ids, gt_difficult)
    return ClassProblem(cfg, scores, boxes, image_ids, dense_img, n_img, gt)


class _Settings(NamedTuple):
    """The detection function and AP settings, checked once (:meth:`check`)."""

    tau: float
    nu: float
    thetas: np.ndarray
    mu: float | None
    direction: int
    ap_method: str

    @staticmethod
    def check(score_threshold, nms_iou, match_iou, ap_method, min_step,
              direction) -> _Settings:
        """Check the settings (the first bad one raises, in this order)."""
        check_ap_method(ap_method)
        code = check_direction(direction)
        thetas = match_thresholds(match_iou)
        mu = None if min_step is None else check_min_step(min_step)
        tau = _check_number("score_threshold", score_threshold)
        if np.ndim(nms_iou) != 0:
            raise ValueError(f"nms_iou must be one number, got {nms_iou!r}")
        nu = float(check_iou_threshold("nms_iou", nms_iou)[0])
        return _Settings(tau, nu, thetas, mu, code, ap_method)


def _dense_images(image_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Image ids renumbered ``0..B-1`` (only windows' images matter for NMS), and ``B``."""
    _, dense = np.unique(image_ids, return_inverse=True)
    dense = dense.astype(np.int64).reshape(-1)
    return dense, int(dense.max()) + 1 if dense.size else 0


def _check_number(name: str, value) -> float:
    v = float(value)
    if not np.isfinite(v) and name != "score_threshold":
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if np.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


# ----------------------------------------------------------------------------- public API


def ap_after_nms(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
) -> float:
    """AP of one class after the detection function (threshold, order, per-image NMS).

    Args:
        scores: ``(N,)`` float, the class's scores (softmax probabilities) of the windows.
        boxes: ``(N, 4)`` xyxy, the class-specific (regressed) boxes.
        image_ids: ``(N,)`` int, the image of each window.
        gt_boxes: ``(G, 4)`` xyxy ground truth of the class; ``gt_image_ids``: ``(G,)`` int;
            ``gt_difficult``: ``(G,)`` bool or None.
        score_threshold: candidates have ``score > score_threshold`` (Fast R-CNN: 0.05).
        nms_iou: suppression when ``IoU > nms_iou`` (Fast R-CNN: 0.3; ``1.0`` disables NMS).
        match_iou: IoU threshold for a TP, or a sequence of them (mean AP over them).
        ap_method: ``"area"``, ``"voc07"`` or ``"r101"``.

    Returns:
        AP in ``[0, 1]``; NaN when there is no non-difficult ground truth.
    """
    p = class_problem(scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
                      score_threshold=score_threshold, nms_iou=nms_iou, match_iou=match_iou,
                      ap_method=ap_method)
    if p.npos == 0:
        return float("nan")
    det = base_detections(p.order, p.dense_img, p.n_img, p.boxes, p.nu, p.scores.size)[0]
    return float(ap_of_list(det, p.best, p.best_iou, p.gt_difficult, p.thetas, p.weights))


def ap_pseudo_gradient(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3, direction: str = "nearest_improvement",
) -> tuple[float, np.ndarray]:
    """AP after NMS and its exact pseudo-gradient with respect to the scores.

    Arguments as :func:`ap_after_nms`, plus ``min_step`` (``mu > 0``, the minimum step in
    each slope's denominator). The pseudo-gradient is the one defined in docs/method.md
    (nearest improvement in each direction, the larger slope wins), computed exactly;
    ``direction`` picks an ablation variant instead (``"nearest_change"``, ``"both_summed"``:
    :mod:`mapdet.core.pseudograd`).

    Returns:
        ``(ap, grad)``: the AP (NaN when undefined) and ``grad (N,)`` float64, the
        pseudo-partial derivative of the AP along each window's score (zeros when the AP
        is undefined). Ascending ``grad`` raises the AP.
    """
    p = class_problem(scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
                      score_threshold=score_threshold, nms_iou=nms_iou, match_iou=match_iou,
                      ap_method=ap_method, min_step=min_step, direction=direction)
    return solve_class(p)


def solve_class(p: ClassProblem, grad_rows: int | None = None, stats: np.ndarray | None = None,
                gain: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Run the kernel on one checked class; ``stats (N_STATS,)`` int64 accumulates the kernel's
    counters and ``gain (N,)`` receives the AP gains (see
    :func:`mapdet.core.gradkernel.pseudo_gradient_kernel`)."""
    n = p.scores.size
    grad = np.zeros(n, dtype=np.float64)
    if p.npos == 0:
        return float("nan"), grad
    if n == 0:
        return 0.0, grad
    # Plain floats and an int: one set of argument types, so the kernel compiles once.
    par = KernelParams(float(p.tau), float(p.nu), float(p.mu), float(IMPROVEMENT_TOL),
                       float(SLOPE_RTOL), int(p.direction))
    data = ClassData(p.scores, p.boxes, p.dense_img, int(p.n_img), p.order, p.rank, p.best,
                     p.best_iou, p.gt_difficult, p.thetas, p.weights)
    if stats is None:
        stats = np.zeros(N_STATS, dtype=np.int64)
    elif stats.shape != (N_STATS,) or stats.dtype != np.int64:  # the kernel writes unchecked
        raise ValueError(f"stats must be int64 of shape ({N_STATS},), got {stats.dtype} "
                         f"{stats.shape}")
    if gain is None:
        gain = np.zeros(n, dtype=np.float64)
    f0 = pseudo_gradient_kernel(data, par, n if grad_rows is None else min(int(grad_rows), n),
                                grad, gain, stats)
    return float(f0), grad


def ap_pseudo_gradient_multiclass(
    scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3, num_threads: int | None = None, grad_rows: int | None = None,
    direction: str = "nearest_improvement", fixed: Sequence[FixedDetections] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class APs and pseudo-gradients for ``K`` classes, classes in parallel threads.

    Args:
        scores: ``(N, K)`` float, per-class scores of the windows.
        boxes: ``(N, K, 4)`` class-specific boxes, or ``(N, 4)`` shared by all classes.
        image_ids: ``(N,)`` int.
        gt_boxes: ``(G, 4)``; ``gt_labels``: ``(G,)`` int in ``0..K-1``;
            ``gt_image_ids``: ``(G,)``; ``gt_difficult``: ``(G,)`` bool or None.
        num_threads: threads for the classes (default: ``os.cpu_count()``; 1 runs inline).
            The numba kernels release the GIL, so threads run truly in parallel.
        grad_rows: compute the gradient of the first ``grad_rows`` windows only (the others,
            e.g. detections kept from earlier minibatches, only take part in the AP; their
            gradient is returned as 0). Default: all.
        direction: the pseudo-partial's rule (:func:`ap_pseudo_gradient`).
        fixed: detections of earlier minibatches that take part in the AP only
            (:func:`mapdet.core.fixed.fix_detections`, images of their own, computed with
            the same ``score_threshold`` and ``nms_iou``): the result is that of these
            windows concatenated with theirs (``grad_rows = N``), the rows of the latter
            left out of ``grads``.

    Returns:
        ``(aps (K,), grads (N, K))``: AP per class (NaN where undefined) and the
        pseudo-gradient of each class's AP w.r.t. that class's scores.
    """
    problems = class_problems(scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids,
                              gt_difficult, score_threshold=score_threshold, nms_iou=nms_iou,
                              match_iou=match_iou, ap_method=ap_method, min_step=min_step,
                              grad_rows=grad_rows, direction=direction, fixed=fixed)
    aps, grads, _ = solve_classes(problems, num_threads, grad_rows)
    if not problems:
        grads = np.zeros((np.asarray(scores).shape[0], 0))
    return aps, grads


def class_problems(scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids,
                   gt_difficult=None, *, score_threshold, nms_iou, match_iou, ap_method,
                   min_step, grad_rows=None, direction="nearest_improvement",
                   fixed: Sequence[FixedDetections] = ()) -> list[ClassProblem]:
    """Check the ``K``-class inputs (as :func:`ap_pseudo_gradient_multiclass`) and split them
    into one problem per class.

    With ``grad_rows``, a class's problem keeps only the first ``grad_rows`` windows and the
    others that are candidates of that class (``score > score_threshold``): a window that is
    neither queried nor a candidate changes neither the detections nor the AP. ``rows``
    (on each problem) maps its windows back, ``None`` when all are kept.

    ``fixed``: :class:`mapdet.core.fixed.FixedDetections` of earlier minibatches, appended
    to every class's problem after these windows (:class:`ClassProblem`'s ``fixed``); they are
    never queried and their rows are not returned. ``grad_rows`` must be ``None`` (or ``N``)
    then."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got {scores.shape}")
    n, k = scores.shape
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape not in ((n, k, 4), (n, 4)):
        raise ValueError(f"boxes must have shape (N, K, 4) or (N, 4) = ({n}, {k}, 4) or ({n}, 4), "
                         f"got {boxes.shape}")
    gt_labels = as_integers("gt_labels", gt_labels)
    gt_boxes = as_boxes("gt_boxes", gt_boxes)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"gt_labels has {gt_labels.shape[0]} entries, gt_boxes has "
                         f"{gt_boxes.shape[0]} rows")
    if gt_labels.size and (gt_labels.min() < 0 or gt_labels.max() >= k):
        raise ValueError(f"gt_labels must be in 0..{k - 1}, got values in "
                         f"[{gt_labels.min()}, {gt_labels.max()}]")
    gt_image_ids = as_integers("gt_image_ids", gt_image_ids)
    difficult = (np.zeros(gt_labels.size, dtype=bool) if gt_difficult is None
                 else np.asarray(gt_difficult, dtype=bool).reshape(-1))
    if gt_image_ids.shape[0] != gt_labels.shape[0]:
        raise ValueError(f"gt_image_ids has {gt_image_ids.shape[0]} entries, gt_labels has "
                         f"{gt_labels.shape[0]}")
    if difficult.shape[0] != gt_labels.shape[0]:
        raise ValueError(f"gt_difficult has {difficult.shape[0]} entries, gt_labels has "
                         f"{gt_labels.shape[0]}")
    # Once for all classes: the settings, scores and boxes checked, the image ids and their
    # groups.
    cfg = _Settings.check(score_threshold, nms_iou, match_iou, ap_method, min_step, direction)
    check_finite("scores", scores)
    check_boxes("boxes", boxes.reshape(-1, 4))
    ids = as_integers("image_ids", image_ids)
    if ids.shape[0] != n:
        raise ValueError(f"image_ids has {ids.shape[0]} entries, scores has {n}")
    ids = ids.astype(np.int64)
    dense, n_img = _dense_images(ids)
    shared = (ids, dense, n_img, image_groups(ids))
    tau = cfg.tau
    fixed = tuple(fixed)
    for f in fixed:
        if len(f.classes) != k or f.tau != tau or f.nu != cfg.nu:
            raise ValueError(f"fixed detections were made for K = {len(f.classes)} classes, "
                             f"score_threshold {f.tau}, nms_iou {f.nu}; these inputs have "
                             f"K = {k}, {tau}, {cfg.nu}")
    if fixed and grad_rows is not None and int(grad_rows) < n:
        raise ValueError(f"grad_rows = {grad_rows} < N = {n} cannot be combined with fixed "
                         "detections (which already take part in the AP only)")
    # Per-class columns made contiguous in one pass each (20 strided copies cost 5x more).
    scores_t = np.ascontiguousarray(scores.T)
    boxes_t = np.ascontiguousarray(boxes.transpose(1, 0, 2)) if boxes.ndim == 3 else None
    boxes_shared = np.ascontiguousarray(boxes) if boxes.ndim == 2 else None
    problems = []
    for c in range(k):
        sel = gt_labels == c
        box_c = boxes[:, c] if boxes.ndim == 3 else boxes
        rows = None
        if grad_rows is not None and int(grad_rows) < n:
            head = max(int(grad_rows), 0)
            rows = np.concatenate([np.arange(head), head + np.flatnonzero(scores[head:, c] > tau)])
        if rows is None or rows.size == n:
            gt = GroundTruth.checked(gt_boxes[sel], gt_image_ids[sel], difficult[sel])
            p = ClassProblem(cfg, scores_t[c], boxes_shared if boxes_t is None else boxes_t[c],
                             ids, dense, n_img, gt, shared[3], [f.classes[c] for f in fixed])
        else:
            sub = ids[rows]
            dense_s, n_img_s = _dense_images(sub)
            gt = GroundTruth(gt_boxes[sel], gt_image_ids[sel], difficult[sel])
            p = ClassProblem(cfg, scores[rows, c], np.ascontiguousarray(box_c[rows]), sub,
                             dense_s, n_img_s, gt, image_groups(sub), rows=rows, n_all=n)
        problems.append(p)
    return problems


def solve_classes(problems: list[ClassProblem], num_threads: int | None = None,
                  grad_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the kernel on every class (in threads): ``(aps (K,), grads (N, K), gains (N, K))``,
    ``gains`` the AP gained at each pseudo-partial's nearest improvement."""
    k = len(problems)
    n = problems[0].n_all if k else 0

    def one(p):
        gain = np.zeros(p.scores.size, dtype=np.float64)
        n_out = p.n_all
        ap, grad = solve_class(p, n_out if grad_rows is None else grad_rows, None, gain)
        rows = p.rows
        if rows is None:  # fixed detections appended past n_out are not returned
            return ap, grad[:n_out], gain[:n_out]
        full_g = np.zeros(p.n_all)  # back to all N windows (those dropped get 0)
        full_gain = np.zeros(p.n_all)
        full_g[rows] = grad
        full_gain[rows] = gain
        return ap, full_g, full_gain

    threads = num_threads or os.cpu_count() or 1
    if threads <= 1 or k <= 1:
        results = [one(p) for p in problems]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, k)) as pool:
            results = list(pool.map(one, problems))
    aps = np.array([r[0] for r in results], dtype=np.float64)
    if not k:
        return aps, np.zeros((n, 0)), np.zeros((n, 0))
    return aps, np.stack([r[1] for r in results], 1), np.stack([r[2] for r in results], 1)
