"""The O(D)-per-query kernel of mapdet 0.x (before the prefix structures): a reference.

Each AP it needs is recomputed over the whole detection list, which makes it quadratic in the
AP context but easy to trust; tests compare the near-linear kernel with it at sizes the brute
force cannot reach. Original module docstring follows.

Public API: :func:`ap_after_nms` and :func:`ap_pseudo_gradient` (one class),
:func:`ap_pseudo_gradient_multiclass` (classes in parallel threads).

Why the fast algorithm is exact (full argument in docs/method.md, "The fast algorithm"):
let ``h`` be window ``i``'s highest-ranked kept neighbour (same image, ``IoU > nms_iou``).

* ``i`` not kept (suppressed, or below the threshold). Moving ``s_i`` down changes nothing
  (``slope_down = 0``). Moving it up changes nothing until ``i`` passes ``h`` (or the
  threshold when it has no kept neighbour): from there on ``i`` is kept and the NMS state is
  one fixed state ``S_up`` (``i`` suppresses its kept neighbours, with a cascade), whatever
  ``i``'s exact position.
* ``i`` kept. Moving up leaves the NMS state as it is. Moving down leaves it as it is until
  ``i`` passes ``h'``, its highest-ranked neighbour that is kept when ``i`` is removed; from
  there on the state is ``S_down`` (``i`` removed, with a cascade) and ``f`` is constant.

So each window needs at most one alternative NMS state, computed by an event-driven cascade
touching only the windows whose decision changes. Within a fixed state, ``f`` as a function
of ``i``'s place in the detection list is, for a single IoU threshold, non-increasing then
non-decreasing in the walking direction (an FP moving up, or a TP moving down, can only lower
AP; crossing the detection that competes for ``i``'s ground truth swaps the two labels and
leaves the sequence unchanged). The first improvement is then found by binary search over the
tied-score groups of the detection list. With several IoU thresholds the groups are scanned.
Every AP is recomputed exactly from the edited label sequence; nothing is approximated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from mapdet.core.ap import (
    GroundTruth,
    ap_weights,
    best_ground_truth,
    check_ap_method,
    match_thresholds,
)
from mapdet.core.boxes import as_boxes, check_finite
from mapdet.core.nms import detection_order
from mapdet.core.pseudograd import IMPROVEMENT_TOL, SLOPE_RTOL, check_min_step

__all__ = ["ap_after_nms", "ap_pseudo_gradient", "ap_pseudo_gradient_multiclass"]


# ----------------------------------------------------------------------------- inputs


class _ClassProblem:
    """Validated inputs of one class, in the integer form the kernels take."""

    def __init__(self, scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
                 score_threshold, nms_iou, match_iou, ap_method, min_step=None):
        check_ap_method(ap_method)
        self.thetas = match_thresholds(match_iou)
        if min_step is not None:
            self.mu = check_min_step(min_step)
        self.tau = _check_number("score_threshold", score_threshold)
        self.nu = _check_number("nms_iou", nms_iou)
        self.scores = np.asarray(scores, dtype=np.float64)
        if self.scores.ndim != 1:
            raise ValueError(f"scores must have shape (N,), got {self.scores.shape}")
        check_finite("scores", self.scores)
        n = self.scores.shape[0]
        self.boxes = np.ascontiguousarray(as_boxes("boxes", boxes, n))
        image_ids = np.asarray(image_ids).reshape(-1)
        if image_ids.shape[0] != n:
            raise ValueError(f"image_ids has {image_ids.shape[0]} entries, scores has {n}")
        gt = GroundTruth(gt_boxes, gt_image_ids, gt_difficult)
        self.npos = gt.npos
        self.gt_difficult = gt.difficult
        self.image_ids = image_ids.astype(np.int64)
        if self.npos == 0:
            return  # AP undefined: nothing else is needed
        self.best, self.best_iou = best_ground_truth(self.boxes, self.image_ids, gt)
        self.weights = ap_weights(gt.npos, ap_method)
        self.order = detection_order(self.scores, self.tau)
        self.rank = np.full(n, -1, dtype=np.int64)
        self.rank[self.order] = np.arange(self.order.size)
        # Dense image ids 0..B-1 (only windows' images matter for NMS).
        _, self.dense_img = np.unique(self.image_ids, return_inverse=True)
        self.dense_img = self.dense_img.astype(np.int64).reshape(-1)
        self.n_img = int(self.dense_img.max()) + 1 if n else 0


def _check_number(name: str, value) -> float:
    v = float(value)
    if not np.isfinite(v) and name != "score_threshold":
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if np.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True, inline="always")
def _iou(boxes, a, b):
    """IoU of windows ``a`` and ``b`` (continuous convention, same arithmetic as numpy)."""
    ix1 = max(boxes[a, 0], boxes[b, 0])
    iy1 = max(boxes[a, 1], boxes[b, 1])
    ix2 = min(boxes[a, 2], boxes[b, 2])
    iy2 = min(boxes[a, 3], boxes[b, 3])
    iw = max(ix2 - ix1 + 0.0, 0.0)
    ih = max(iy2 - iy1 + 0.0, 0.0)
    inter = iw * ih
    area_a = (boxes[a, 2] - boxes[a, 0] + 0.0) * (boxes[a, 3] - boxes[a, 1] + 0.0)
    area_b = (boxes[b, 2] - boxes[b, 0] + 0.0) * (boxes[b, 3] - boxes[b, 1] + 0.0)
    union = area_a + area_b - inter
    if union > 0.0:
        return inter / union
    return 0.0


@njit(cache=True, nogil=True)
def _nms_keep(order, boxes, img, n_img, nu):
    """Greedy per-image NMS over ``order`` (candidates in detection order) -> kept flags (N,)."""
    n = boxes.shape[0]
    kept = np.zeros(n, dtype=np.bool_)
    # Kept windows per image, appended in order.
    counts = np.zeros(n_img, dtype=np.int64)
    for r in range(order.size):
        counts[img[order[r]]] += 1
    ptr = np.zeros(n_img + 1, dtype=np.int64)
    for b in range(n_img):
        ptr[b + 1] = ptr[b] + counts[b]
    fill = ptr[:-1].copy()
    kept_list = np.empty(order.size, dtype=np.int64)
    for r in range(order.size):
        w = order[r]
        b = img[w]
        ok = True
        if nu < 1.0:
            for k in range(ptr[b], fill[b]):
                if _iou(boxes, kept_list[k], w) > nu:
                    ok = False
                    break
        if ok:
            kept[w] = True
            kept_list[fill[b]] = w
            fill[b] += 1
    return kept


@njit(cache=True, nogil=True)
def _ap_of(L, n, q, ins, best, best_iou, gt_diff, thetas, weights, stamp, vbuf):
    """AP (mean over thresholds) of the detection list ``L[:n]`` with window ``ins``
    inserted at position ``q`` (``q < 0``: no insertion). ``stamp`` (G+1,) int64 scratch:
    ``stamp[G]`` is the running stamp id, ``stamp[g] == id`` marks ground truth ``g`` taken.
    """
    total = 0.0
    nw = weights.size
    n_all = n + 1 if q >= 0 else n
    g_count = stamp.size - 1
    for t in range(thetas.size):
        theta = thetas[t]
        stamp[g_count] += 1
        sid = stamp[g_count]
        m = 0
        r = 0
        for pos in range(n_all):
            if q < 0:
                d = L[pos]
            elif pos == q:
                d = ins
            elif pos < q:
                d = L[pos]
            else:
                d = L[pos - 1]
            g = best[d]
            if g >= 0 and best_iou[d] >= theta:
                if gt_diff[g]:
                    continue  # ignored: neither TP nor FP
                if stamp[g] != sid:
                    stamp[g] = sid
                    r += 1
                    m += 1
                    vbuf[m - 1] = m / r
                    continue
            r += 1  # false positive
        run = 0.0
        ap = 0.0
        for k in range(m - 1, -1, -1):
            if vbuf[k] > run:
                run = vbuf[k]
            if k < nw:
                ap += weights[k] * run
        total += ap
    return total / thetas.size


@njit(cache=True, nogil=True)
def _heap_push(hk, hv, size, key, val):
    i = size
    hk[i] = key
    hv[i] = val
    while i > 0:
        p = (i - 1) >> 1
        if hk[p] <= hk[i]:
            break
        hk[p], hk[i] = hk[i], hk[p]
        hv[p], hv[i] = hv[i], hv[p]
        i = p
    return size + 1


@njit(cache=True, nogil=True)
def _heap_pop(hk, hv, size):
    val = hv[0]
    size -= 1
    hk[0] = hk[size]
    hv[0] = hv[size]
    i = 0
    while True:
        lft = 2 * i + 1
        if lft >= size:
            break
        c = lft
        if lft + 1 < size and hk[lft + 1] < hk[lft]:
            c = lft + 1
        if hk[i] <= hk[c]:
            break
        hk[c], hk[i] = hk[i], hk[c]
        hv[c], hv[i] = hv[i], hv[c]
        i = c
    return val, size


@njit(cache=True, nogil=True)
def _cascade(seeds, n_seeds, n_events, extra, boxes, nu, rank, graph, base_cnt, base_kept,
             inq, chg, hk, hv, pushed, changed):
    """Re-run NMS decisions event by event after a local change; return the changes.

    Windows are processed in rank order; window ``y`` is kept iff it has no kept earlier
    neighbour in the new state (``now_kept(x) = base_kept[x] != (chg[x] != 0)``), plus
    ``extra`` when ``extra >= 0``: a window placed above every processed window and kept.
    Only windows whose decision may flip are processed: the ``seeds``, the kept later
    neighbours of a window that becomes kept, and, after the ``R``-th suppression event
    (``n_events`` already happened), the suppressed later neighbours with ``base_cnt <= R``
    (a window with ``k`` kept earlier neighbours needs ``k`` of them suppressed first).

    Returns ``(n_changed, n_pushed)``; ``changed[:n_changed]`` (rank order) have
    ``chg = 1`` (now kept) or ``2`` (now suppressed). Scratch state is left for
    :func:`_reset_after`.
    """
    (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx) = graph
    size = 0
    n_pushed = 0
    for k in range(n_seeds):
        x = seeds[k]
        if not inq[x]:
            inq[x] = True
            pushed[n_pushed] = x
            n_pushed += 1
            size = _heap_push(hk, hv, size, rank[x], x)
    n_changed = 0
    events = n_events
    while size > 0:
        y, size = _heap_pop(hk, hv, size)
        # Kept iff no kept earlier neighbour. Those kept in the base state are the first
        # base_cnt[y] entries of its earlier list; the others can only be kept now if this
        # cascade released them, and those are in ``changed`` (all ranked above y).
        now_kept = not (extra >= 0 and _iou(boxes, extra, y) > nu)
        if now_kept:
            lo = e_ptr[y]
            for e in range(lo, lo + base_cnt[y]):
                if chg[e_idx[e]] != 2:
                    now_kept = False
                    break
        if now_kept:
            for k in range(n_changed):
                x = changed[k]
                if chg[x] == 1 and _iou(boxes, x, y) > nu:
                    now_kept = False
                    break
        if now_kept == base_kept[y]:
            continue
        chg[y] = 1 if now_kept else 2
        changed[n_changed] = y
        n_changed += 1
        if now_kept:
            lo, hi = lk_ptr[y], lk_ptr[y + 1]
            targets = lk_idx
        else:
            events += 1
            lo, hi = ls_ptr[y], ls_ptr[y + 1]
            targets = ls_idx
        for e in range(lo, hi):
            z = targets[e]
            if not now_kept and base_cnt[z] > events:
                break  # sorted by base_cnt: the rest cannot be released yet
            if z == extra or inq[z]:
                continue
            if not now_kept and extra >= 0 and _iou(boxes, extra, z) > nu:
                continue  # the extra window suppresses z whatever happens above it
            inq[z] = True
            pushed[n_pushed] = z
            n_pushed += 1
            size = _heap_push(hk, hv, size, rank[z], z)
    return n_changed, n_pushed


@njit(cache=True, nogil=True)
def _reset_after(pushed, n_pushed, changed, n_changed, inq, chg):
    """Clear the scratch state touched by one :func:`_cascade` call."""
    for k in range(n_pushed):
        inq[pushed[k]] = False
    for k in range(n_changed):
        chg[changed[k]] = 0


@njit(cache=True, nogil=True)
def _state_list(det_list, skip, changed, n_changed, chg, rank, out):
    """Detections of a modified state, in rank order: the base detections minus ``skip`` and
    those now suppressed, merged with those now kept. Returns the length written to ``out``."""
    n = 0
    k = 0
    # advance k to the next "now kept" entry
    while k < n_changed and chg[changed[k]] != 1:
        k += 1
    for j in range(det_list.size):
        d = det_list[j]
        while k < n_changed and rank[changed[k]] < rank[d]:
            out[n] = changed[k]
            n += 1
            k += 1
            while k < n_changed and chg[changed[k]] != 1:
                k += 1
        if d == skip or chg[d] == 2:
            continue
        out[n] = d
        n += 1
    while k < n_changed:
        if chg[changed[k]] == 1:
            out[n] = changed[k]
            n += 1
        k += 1
    return n


@njit(cache=True, nogil=True)
def _runs(L, n, s, run_start):
    """Start positions of the runs of equal scores in ``L[:n]``; returns their number."""
    nr = 0
    for k in range(n):
        if k == 0 or s[L[k]] != s[L[k - 1]]:
            run_start[nr] = k
            nr += 1
    return nr


@njit(cache=True, nogil=True)
def _walk_is_monotone(i, best, best_iou, gt_diff, thetas):
    """Whether "the AP improves" is monotone along a walk (false, then true), so that the
    first improvement can be found by binary search.

    With one IoU threshold, ``f`` along the walk is non-increasing then non-decreasing (an
    FP moving up or a TP moving down only loses; crossing the detection that competes for
    ``i``'s ground truth swaps two labels and leaves the sequence as it was), and the
    non-increasing part starts from a value that is not an improvement. The same holds with
    several thresholds when ``i`` is a TP at none of them. Otherwise the walk is scanned.
    """
    if thetas.size == 1:
        return True
    g = best[i]
    return not (g >= 0 and not gt_diff[g] and best_iou[i] >= thetas.min())


@njit(cache=True, nogil=True)
def _search_up(L, n, q_start, i, s, f0, tol, mu, best, best_iou, gt_diff, thetas, weights,
               stamp, vbuf, run_start):
    """First improvement when ``i`` (a detection in a fixed NMS state, at position
    ``q_start`` of ``L[:n]``, not improving there) moves up. Returns the slope (0 if none).

    Crossing run ``r`` (tied scores ``v``) upwards puts ``i`` at ``run_start[r]``;
    ``delta = v - s_i``."""
    nr = _runs(L, n, s, run_start)
    r_max = -1  # last run starting above i
    for r in range(nr):
        if run_start[r] < q_start:
            r_max = r
    if r_max < 0:
        return 0.0
    g = best[i]
    if not (g >= 0 and not gt_diff[g] and best_iou[i] >= thetas.min()):
        return 0.0  # FP or ignored at every threshold: moving up cannot improve AP
    si = s[i]
    if _walk_is_monotone(i, best, best_iou, gt_diff, thetas):
        top = _ap_of(L, n, run_start[0], i, best, best_iou, gt_diff, thetas, weights,
                     stamp, vbuf)
        if not top > f0 + tol:
            return 0.0
        # Improvement holds for runs 0..r* and not below: find r*, the nearest one.
        a = 0
        b = r_max
        v_a = top
        while a < b:
            mid = (a + b + 1) >> 1
            v = _ap_of(L, n, run_start[mid], i, best, best_iou, gt_diff, thetas, weights,
                       stamp, vbuf)
            if v > f0 + tol:
                a = mid
                v_a = v
            else:
                b = mid - 1
        return (v_a - f0) / (s[L[run_start[a]]] - si + mu)
    for r in range(r_max, -1, -1):
        v = _ap_of(L, n, run_start[r], i, best, best_iou, gt_diff, thetas, weights, stamp, vbuf)
        if v > f0 + tol:
            return (v - f0) / (s[L[run_start[r]]] - si + mu)
    return 0.0


@njit(cache=True, nogil=True)
def _run_end(run_start, nr, n, r):
    return (run_start[r + 1] - 1) if r + 1 < nr else n - 1


@njit(cache=True, nogil=True)
def _search_down(L, n, q_start, i, b_stop, s, f0, tol, mu, best, best_iou, gt_diff, thetas,
                 weights, stamp, vbuf, run_start):
    """First improvement when detection ``i`` moves down from position ``q_start`` of
    ``L[:n]`` through the runs scoring ``> b_stop``. Returns the slope (0 when none).

    Crossing run ``r`` downwards puts ``i`` just below its end; ``delta = s_i - v``."""
    nr = _runs(L, n, s, run_start)
    si = s[i]
    r_lo = -1
    r_hi = -1
    for r in range(nr):
        if _run_end(run_start, nr, n, r) >= q_start and s[L[run_start[r]]] > b_stop:
            if r_lo < 0:
                r_lo = r
            r_hi = r
    if r_lo < 0:
        return 0.0
    if _walk_is_monotone(i, best, best_iou, gt_diff, thetas):
        v_b = _ap_of(L, n, _run_end(run_start, nr, n, r_hi) + 1, i, best, best_iou, gt_diff,
                     thetas, weights, stamp, vbuf)
        if not v_b > f0 + tol:
            return 0.0
        # Improvement holds for runs r*..r_hi and not before: find r*, the nearest one.
        a = r_lo
        b = r_hi
        while a < b:
            mid = (a + b) >> 1
            vm = _ap_of(L, n, _run_end(run_start, nr, n, mid) + 1, i, best, best_iou, gt_diff,
                        thetas, weights, stamp, vbuf)
            if vm > f0 + tol:
                b = mid
                v_b = vm
            else:
                a = mid + 1
        return (v_b - f0) / (si - s[L[run_start[a]]] + mu)
    for r in range(r_lo, r_hi + 1):
        v = _ap_of(L, n, _run_end(run_start, nr, n, r) + 1, i, best, best_iou, gt_diff, thetas,
                   weights, stamp, vbuf)
        if v > f0 + tol:
            return (v - f0) / (si - s[L[run_start[r]]] + mu)
    return 0.0


@njit(cache=True, nogil=True)
def _combine(up, down, rtol):
    """:func:`mapdet.core.pseudograd.combine_slopes`, compiled."""
    slack = rtol * max(up, down)
    if up > 0.0 and up >= down - slack:
        return up
    if down > up + slack:
        return -down
    return 0.0


@njit(cache=True, nogil=True)
def _later_neighbours(icand, iptr, n_img, boxes, nu, n):
    """Overlap graph among candidates: for each window, its later neighbours (same image,
    ``IoU > nu``) in rank order, as CSR ``(ptr (n+1,), idx (E,))``."""
    cnt = np.zeros(n, dtype=np.int64)
    if nu < 1.0:
        for b in range(n_img):
            for a in range(iptr[b], iptr[b + 1]):
                wa = icand[a]
                for c in range(a + 1, iptr[b + 1]):
                    if _iou(boxes, wa, icand[c]) > nu:
                        cnt[wa] += 1
    ptr = np.zeros(n + 1, dtype=np.int64)
    for w in range(n):
        ptr[w + 1] = ptr[w] + cnt[w]
    idx = np.empty(ptr[n], dtype=np.int64)
    if nu < 1.0:
        pos = ptr[:-1].copy()
        for b in range(n_img):
            for a in range(iptr[b], iptr[b + 1]):
                wa = icand[a]
                for c in range(a + 1, iptr[b + 1]):
                    wc = icand[c]
                    if _iou(boxes, wa, wc) > nu:
                        idx[pos[wa]] = wc
                        pos[wa] += 1
    return ptr, idx


@njit(cache=True, nogil=True)
def _csr(counts, n):
    ptr = np.zeros(n + 1, dtype=np.int64)
    for w in range(n):
        ptr[w + 1] = ptr[w] + counts[w]
    return ptr


@njit(cache=True, nogil=True)
def _cascade_graph(nb_ptr, nb_idx, base_kept, base_cnt, n):
    """The lists :func:`_cascade` walks: earlier neighbours of each window (all, those kept
    in the base state first), later
    neighbours kept in the base state, and later neighbours suppressed in the base state
    sorted by ``base_cnt`` ascending."""
    e_cnt = np.zeros(n, dtype=np.int64)
    lk_cnt = np.zeros(n, dtype=np.int64)
    ls_cnt = np.zeros(n, dtype=np.int64)
    for w in range(n):
        for e in range(nb_ptr[w], nb_ptr[w + 1]):
            y = nb_idx[e]
            e_cnt[y] += 1
            if base_kept[y]:
                lk_cnt[w] += 1
            else:
                ls_cnt[w] += 1
    e_ptr = _csr(e_cnt, n)
    lk_ptr = _csr(lk_cnt, n)
    ls_ptr = _csr(ls_cnt, n)
    e_idx = np.empty(e_ptr[n], dtype=np.int64)
    lk_idx = np.empty(lk_ptr[n], dtype=np.int64)
    ls_idx = np.empty(ls_ptr[n], dtype=np.int64)
    e_pos = e_ptr[:-1].copy()
    lk_pos = lk_ptr[:-1].copy()
    ls_pos = ls_ptr[:-1].copy()
    for w in range(n):  # earlier neighbours kept in the base state first
        if base_kept[w]:
            for e in range(nb_ptr[w], nb_ptr[w + 1]):
                y = nb_idx[e]
                e_idx[e_pos[y]] = w
                e_pos[y] += 1
    for w in range(n):
        for e in range(nb_ptr[w], nb_ptr[w + 1]):
            y = nb_idx[e]
            if not base_kept[w]:
                e_idx[e_pos[y]] = w
                e_pos[y] += 1
            if base_kept[y]:
                lk_idx[lk_pos[w]] = y
                lk_pos[w] += 1
            else:
                ls_idx[ls_pos[w]] = y
                ls_pos[w] += 1
    for w in range(n):
        lo, hi = ls_ptr[w], ls_ptr[w + 1]
        if hi - lo > 1:
            seg = ls_idx[lo:hi].copy()
            keys = np.empty(hi - lo, dtype=np.int64)
            for k in range(hi - lo):
                keys[k] = base_cnt[seg[k]]
            perm = np.argsort(keys, kind="mergesort")
            for k in range(hi - lo):
                ls_idx[lo + k] = seg[perm[k]]
    return (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx)


@njit(cache=True, nogil=True)
def _pseudo_gradient_kernel(s, boxes, img, n_img, order, rank, best, best_iou, gt_diff,
                            thetas, weights, tau, nu, mu, tol, slope_rtol, n_grad, grad):
    """Exact pseudo-gradient of AP after NMS for one class; returns ``f(x)``.

    Fills ``grad[:n_grad]``; the windows from ``n_grad`` on take part in the AP only."""
    n = s.size
    n_cand = order.size
    # Candidates per image, in rank order.
    counts = np.zeros(n_img, dtype=np.int64)
    for r in range(n_cand):
        counts[img[order[r]]] += 1
    iptr = np.zeros(n_img + 1, dtype=np.int64)
    for b in range(n_img):
        iptr[b + 1] = iptr[b] + counts[b]
    fill = iptr[:-1].copy()
    icand = np.empty(n_cand, dtype=np.int64)
    for r in range(n_cand):
        w = order[r]
        icand[fill[img[w]]] = w
        fill[img[w]] += 1
    nb_ptr, nb_idx = _later_neighbours(icand, iptr, n_img, boxes, nu, n)
    # Base NMS: kept iff no kept earlier neighbour; base_cnt = kept earlier neighbours.
    base_cnt = np.zeros(n, dtype=np.int64)
    base_kept = np.zeros(n, dtype=np.bool_)
    n_det = 0
    for r in range(n_cand):
        w = order[r]
        if base_cnt[w] == 0:
            base_kept[w] = True
            n_det += 1
            for e in range(nb_ptr[w], nb_ptr[w + 1]):
                base_cnt[nb_idx[e]] += 1
    graph = _cascade_graph(nb_ptr, nb_idx, base_kept, base_cnt, n)
    det_list = np.empty(n_det, dtype=np.int64)
    det_pos = np.full(n, -1, dtype=np.int64)
    k = 0
    for r in range(n_cand):
        w = order[r]
        if base_kept[w]:
            det_list[k] = w
            det_pos[w] = k
            k += 1
    # Detections per image (rank order), for the kept neighbours of any window.
    dcounts = np.zeros(n_img, dtype=np.int64)
    for j in range(n_det):
        dcounts[img[det_list[j]]] += 1
    dptr = np.zeros(n_img + 1, dtype=np.int64)
    for b in range(n_img):
        dptr[b + 1] = dptr[b] + dcounts[b]
    dfill = dptr[:-1].copy()
    idet = np.empty(n_det, dtype=np.int64)
    for j in range(n_det):
        w = det_list[j]
        idet[dfill[img[w]]] = w
        dfill[img[w]] += 1

    g_count = gt_diff.size
    stamp = np.zeros(g_count + 1, dtype=np.int64)
    vbuf = np.empty(n_det + 2, dtype=np.float64)
    f0 = _ap_of(det_list, n_det, -1, -1, best, best_iou, gt_diff, thetas, weights, stamp, vbuf)
    if weights.size == 0:
        return np.nan  # AP undefined: no positive; the gradient stays 0

    # Scratch for cascades and state lists.
    inq = np.zeros(n, dtype=np.bool_)
    pushed = np.empty(n + 1, dtype=np.int64)
    chg = np.zeros(n, dtype=np.int8)
    hk = np.empty(n + 1, dtype=np.int64)
    hv = np.empty(n + 1, dtype=np.int64)
    changed = np.empty(n + 1, dtype=np.int64)
    seeds = np.empty(n + 1, dtype=np.int64)
    L = np.empty(n + 1, dtype=np.int64)
    L2 = np.empty(n + 1, dtype=np.int64)
    run_start = np.empty(n + 1, dtype=np.int64)
    vbuf = np.empty(n + 2, dtype=np.float64)
    t_min = thetas.min()

    for i in range(n_grad):
        si = s[i]
        if base_kept[i]:
            # ---- i is a detection.
            m = 0
            for j in range(n_det):
                if det_list[j] != i:
                    L[m] = det_list[j]
                    m += 1
            q0 = det_pos[i]
            up = _search_up(L, m, q0, i, s, f0, tol, mu, best, best_iou, gt_diff, thetas,
                            weights, stamp, vbuf, run_start)
            # S_down: i removed (one suppression event; chg[i] = 2 marks it gone).
            chg[i] = 2
            (_, _, _, _, ls_ptr, ls_idx) = graph
            n_seeds = 0
            for e in range(ls_ptr[i], ls_ptr[i + 1]):
                if base_cnt[ls_idx[e]] > 1:
                    break
                seeds[n_seeds] = ls_idx[e]
                n_seeds += 1
            n_chg, n_push = _cascade(seeds, n_seeds, 1, -1, boxes, nu, rank, graph, base_cnt,
                                     base_kept, inq, chg, hk, hv, pushed, changed)
            # h': the highest-ranked neighbour of i that is kept once i is gone.
            b_sw = tau
            for k in range(n_chg):
                y = changed[k]
                if chg[y] == 1 and _iou(boxes, i, y) > nu:
                    b_sw = s[y]
                    break
            m2 = _state_list(det_list, i, changed, n_chg, chg, rank, L2)
            f_down = _ap_of(L2, m2, -1, -1, best, best_iou, gt_diff, thetas, weights, stamp,
                            vbuf)
            _reset_after(pushed, n_push, changed, n_chg, inq, chg)
            chg[i] = 0
            down = _search_down(L, m, q0, i, b_sw, s, f0, tol, mu, best, best_iou, gt_diff,
                                thetas, weights, stamp, vbuf, run_start)
            if down == 0.0 and f_down > f0 + tol:
                down = (f_down - f0) / (si - b_sw + mu)
            grad[i] = _combine(up, down, slope_rtol)
        else:
            # ---- i is not a detection: only moving up can change anything.
            n_seeds = 0
            b = img[i]
            for j in range(dptr[b], dptr[b + 1]):
                d = idet[j]
                if nu < 1.0 and _iou(boxes, d, i) > nu:
                    seeds[n_seeds] = d
                    n_seeds += 1
            g = best[i]
            tp_any = g >= 0 and not gt_diff[g] and best_iou[i] >= t_min
            if n_seeds == 0 and not tp_any:
                # Enters at the bottom as an FP (AP unchanged: an FP after the last TP
                # changes no precision) and can only lose by moving further up.
                continue
            b_entry = s[seeds[0]] if n_seeds > 0 else tau
            n_chg, n_push = _cascade(seeds, n_seeds, 0, i, boxes, nu, rank, graph, base_cnt,
                                     base_kept, inq, chg, hk, hv, pushed, changed)
            if n_chg == 0:
                m = n_det
                L[:n_det] = det_list
            else:
                m = _state_list(det_list, -1, changed, n_chg, chg, rank, L)
            _reset_after(pushed, n_push, changed, n_chg, inq, chg)
            # Entry position: below every detection scoring > b_entry.
            q_e = 0
            while q_e < m and s[L[q_e]] > b_entry:
                q_e += 1
            v = _ap_of(L, m, q_e, i, best, best_iou, gt_diff, thetas, weights, stamp, vbuf)
            if v > f0 + tol:
                grad[i] = (v - f0) / (b_entry - si + mu)
            else:
                grad[i] = _search_up(L, m, q_e, i, s, f0, tol, mu, best, best_iou, gt_diff,
                                     thetas, weights, stamp, vbuf, run_start)
    return f0


# ----------------------------------------------------------------------------- public API


def ap_after_nms(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = 0.05, nms_iou: float = 0.3,
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
    p = _ClassProblem(scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
                      score_threshold, nms_iou, match_iou, ap_method)
    if p.npos == 0:
        return float("nan")
    kept = _nms_keep(p.order, p.boxes, p.dense_img, p.n_img, p.nu)
    det = p.order[kept[p.order]]
    stamp = np.zeros(p.gt_difficult.size + 1, dtype=np.int64)
    vbuf = np.empty(det.size + 1, dtype=np.float64)
    return float(_ap_of(det, det.size, -1, -1, p.best, p.best_iou, p.gt_difficult,
                        p.thetas, p.weights, stamp, vbuf))


def ap_pseudo_gradient(
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = 0.05, nms_iou: float = 0.3,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3,
) -> tuple[float, np.ndarray]:
    """AP after NMS and its exact pseudo-gradient with respect to the scores.

    Arguments as :func:`ap_after_nms`, plus ``min_step`` (``mu > 0``, the minimum step in
    each slope's denominator). The pseudo-gradient is the one defined in docs/method.md
    (nearest improvement in each direction, the larger slope wins), computed exactly.

    Returns:
        ``(ap, grad)``: the AP (NaN when undefined) and ``grad (N,)`` float64, the
        pseudo-partial derivative of the AP along each window's score (zeros when the AP
        is undefined). Ascending ``grad`` raises the AP.
    """
    p = _ClassProblem(scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult,
                      score_threshold, nms_iou, match_iou, ap_method, min_step)
    return _solve(p)


def _solve(p: _ClassProblem, grad_rows: int | None = None) -> tuple[float, np.ndarray]:
    n = p.scores.size
    grad = np.zeros(n, dtype=np.float64)
    if p.npos == 0:
        return float("nan"), grad
    if n == 0:
        return 0.0, grad
    f0 = _pseudo_gradient_kernel(
        p.scores, p.boxes, p.dense_img, p.n_img, p.order, p.rank, p.best, p.best_iou,
        p.gt_difficult, p.thetas, p.weights, p.tau, p.nu, p.mu, IMPROVEMENT_TOL, SLOPE_RTOL,
        n if grad_rows is None else min(int(grad_rows), n), grad,
    )
    return float(f0), grad


def ap_pseudo_gradient_multiclass(
    scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = 0.05, nms_iou: float = 0.3,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3, num_threads: int | None = None, grad_rows: int | None = None,
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

    Returns:
        ``(aps (K,), grads (N, K))``: AP per class (NaN where undefined) and the
        pseudo-gradient of each class's AP w.r.t. that class's scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got {scores.shape}")
    n, k = scores.shape
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape not in ((n, k, 4), (n, 4)):
        raise ValueError(f"boxes must have shape (N, K, 4) or (N, 4) = ({n}, {k}, 4) or ({n}, 4), "
                         f"got {boxes.shape}")
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    gt_boxes = as_boxes("gt_boxes", gt_boxes)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"gt_labels has {gt_labels.shape[0]} entries, gt_boxes has "
                         f"{gt_boxes.shape[0]} rows")
    if gt_labels.size and (gt_labels.min() < 0 or gt_labels.max() >= k):
        raise ValueError(f"gt_labels must be in 0..{k - 1}, got values in "
                         f"[{gt_labels.min()}, {gt_labels.max()}]")
    gt_image_ids = np.asarray(gt_image_ids, dtype=np.int64).reshape(-1)
    difficult = (np.zeros(gt_labels.size, dtype=bool) if gt_difficult is None
                 else np.asarray(gt_difficult, dtype=bool).reshape(-1))
    problems = []
    for c in range(k):
        sel = gt_labels == c
        problems.append(_ClassProblem(
            scores[:, c], boxes[:, c] if boxes.ndim == 3 else boxes, image_ids,
            gt_boxes[sel], gt_image_ids[sel], difficult[sel],
            score_threshold, nms_iou, match_iou, ap_method, min_step,
        ))
    threads = num_threads or os.cpu_count() or 1
    if threads <= 1 or k <= 1:
        results = [_solve(p, grad_rows) for p in problems]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, k)) as pool:
            results = list(pool.map(lambda p: _solve(p, grad_rows), problems))
    aps = np.array([r[0] for r in results], dtype=np.float64)
    grads = np.stack([r[1] for r in results], axis=1) if k else np.zeros((n, 0))
    return aps, grads
