"""The pseudo-gradient kernel of one class: which states and positions to evaluate.

Why it is exact (full argument in docs/method.md, section 5): let ``h`` be window ``i``'s
highest-ranked kept neighbour (same image, ``IoU > nms_iou``).

* ``i`` not kept (suppressed, or below the threshold). Moving ``s_i`` down changes nothing
  (``slope_down = 0``). Moving it up changes nothing until ``i`` passes ``h`` (or the
  threshold when it has no kept neighbour): from there on ``i`` is kept and the NMS state is
  one fixed state ``S_up`` (``i`` suppresses its kept neighbours, with a cascade).
* ``i`` kept. Moving up leaves the NMS state as it is. Moving down leaves it as it is until
  ``i`` passes ``h'``, its highest-ranked neighbour kept once ``i`` is removed; from there on
  the state is ``S_down`` (``i`` removed, with a cascade) and ``f`` is constant.

Within a fixed state, ``f`` as a function of ``i``'s place is, for one IoU threshold,
non-increasing then non-decreasing along a walk, so the first improvement is found by binary
search over the tied-score runs (computed once, on the base list: every position a walk can
reach is a run boundary of the base list). With several thresholds and ``i`` a TP candidate
at one of them, each threshold's AP still falls then rises, so blocks of runs whose bound
(the per-threshold maxima at their ends) cannot improve are skipped (:func:`_bounded_walk`);
only ``nearest_change`` then scans the runs. Every AP is that of the base list with a few edits,
evaluated exactly by :func:`mapdet.core.editap.edited_ap` in ``O(E log M)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import register_jitable

from mapdet.core.editap import (
    COUNT,
    INS_GAP,
    INS_SEC,
    INS_W,
    REM,
    build_base,
    edited_ap,
    make_edits,
    make_pool,
    make_scratch,
)
from mapdet.core.overlap import (
    Q_BLOCKED,
    Q_CHANGED,
    CascadeScratch,
    cascade,
    group_by,
    iou,
    kept_graph,
    nms_keep,
    reset_after,
)
from mapdet.core.pseudograd import BOTH_SUMMED, NEAREST_CHANGE

__all__ = ["N_STATS", "POOL_BYTES", "ClassData", "KernelParams", "base_detections",
           "pseudo_gradient_kernel"]

#: Length of the kernel's counter array (:func:`pseudo_gradient_kernel`).
N_STATS = 7
#: Memory budget of the per-shift segment structures of one class.
POOL_BYTES = 48 << 20


class ClassData(NamedTuple):
    """One class's problem in the kernel's form (:func:`mapdet.core.apnms.solve_class`), for
    ``N`` windows, ``B`` images, ``G`` ground truths and ``T`` IoU thresholds."""

    scores: np.ndarray
    """``(N,)`` float64."""
    boxes: np.ndarray
    """``(N, 4)`` float64, ``x1, y1, x2, y2``."""
    img: np.ndarray
    """``(N,)`` int64, the images numbered ``0..B-1``."""
    n_img: int
    """``B``."""
    order: np.ndarray
    """The candidates (scores above the threshold) in rank order, int64."""
    rank: np.ndarray
    """``(N,)`` int64, each candidate's place in ``order`` (-1: not a candidate)."""
    best: np.ndarray
    """``(N,)`` int64, each window's best ground truth (-1: none)."""
    best_iou: np.ndarray
    """``(N,)`` float64, its IoU with it."""
    gt_diff: np.ndarray
    """``(G,)`` bool, the difficult ground truths."""
    thetas: np.ndarray
    """``(T,)`` float64, the IoU thresholds."""
    weights: np.ndarray
    """float64, the AP's weight of each TP count (:mod:`mapdet.core.ap`)."""


class KernelParams(NamedTuple):
    """The detection function's and the pseudo-gradient's settings."""

    tau: float
    """The score threshold."""
    nu: float
    """The NMS IoU threshold."""
    mu: float
    """``min_step``, the least step in a slope's denominator."""
    tol: float
    """:data:`mapdet.core.pseudograd.IMPROVEMENT_TOL`."""
    slope_rtol: float
    """:data:`mapdet.core.pseudograd.SLOPE_RTOL`."""
    direction: int
    """The direction rule's code (:data:`mapdet.core.pseudograd.NEAREST_IMPROVEMENT`, ...)."""


class DetBoxes(NamedTuple):
    """The detections image by image, what a window that is not a detection scans for its
    kept neighbours (:func:`_kept_neighbours`)."""

    dptr: np.ndarray
    """``(B+1,)``, with ``idet (D,)``: the detections image by image (CSR), rank order."""
    idet: np.ndarray
    dsoa: np.ndarray
    """``(5, D)`` float64: ``x1, y1, x2, y2`` and area of ``idet``'s detections."""
    dflags: np.ndarray
    """``(D,)`` bool scratch."""


class NmsState(NamedTuple):
    """The base NMS state and what the windows' cascades read, ``D`` detections."""

    kept: np.ndarray
    """``(N,)`` bool, greedy NMS's decisions."""
    graph: object
    """The overlap lists (:class:`mapdet.core.overlap.KeptGraph`)."""
    base_cnt: np.ndarray
    """``(N,)`` int64, each window's number of kept earlier neighbours."""
    det_pos: np.ndarray
    """``(N,)`` int64, each detection's base position (-1: not a detection)."""
    det_rank: np.ndarray
    """``(D,)`` int64, the detections' ranks, ascending."""
    dets: DetBoxes
    """The detections' boxes image by image."""


class Runs(NamedTuple):
    """The tied-score runs of the base list, ``R`` of them, scores decreasing: run ``r`` is
    the base positions ``start[r]..end[r]``, all at score ``s[r]``."""

    start: np.ndarray
    end: np.ndarray
    s: np.ndarray
    id: np.ndarray
    """``(D,)``, the run of each base position."""


class WalkBuffers(NamedTuple):
    """:func:`_bounded_walk`'s buffers: the per-threshold APs and the APs of the probed runs
    (at most one per run and walk), and its stack of blocks (two per level of bisection)."""

    vbuf: np.ndarray
    """``(R+2, T)`` float64."""
    vval: np.ndarray
    """``(R+2,)`` float64."""
    stk: np.ndarray
    """``(4, 160)`` int64, a block's two ends and their rows of ``vbuf``."""


class ApQuery(NamedTuple):
    """What :func:`mapdet.core.editap.edited_ap` reads: the base list, the segment pool, the
    edit set (the window's fixed NMS state), the ground-truth arrays ``(best, best_iou,
    gt_diff)``, the weights and thresholds, and the scratch (replaced by a larger one when a
    cascade needs it)."""

    base: object
    pool: object
    edits: object
    gt: tuple
    weights: np.ndarray
    thetas: np.ndarray
    scratch: np.ndarray
    wk: WalkBuffers


class Walks(NamedTuple):
    """What every walk of one class shares: the scores, the runs, ``f0 = f(x)``, ``tol``,
    ``mu``, whether the rule is ``nearest_change`` and the counters."""

    scores: np.ndarray
    runs: Runs
    f0: float
    tol: float
    mu: float
    change: bool
    stats: np.ndarray


class Walk(NamedTuple):
    """One walk: window ``i`` moving up (``up``) or down over the runs ``a..b``."""

    i: int
    up: bool
    a: int
    b: int


class Inert(NamedTuple):
    """:func:`_below_last_tp`'s ``(last, free, quiet)``."""

    last: int
    free: np.ndarray
    quiet: np.ndarray


class Memo(NamedTuple):
    """The cascade memo (:func:`_memo_find`): its record buffer, the first group of each
    highest kept neighbour ``(N,)``, the value slots, and ``used = [buffer entries, value
    slots]``; the buffer and the slots grow by doubling (:func:`_memo_reserve`)."""

    mb: np.ndarray
    head: np.ndarray
    val: np.ndarray
    used: np.ndarray


@njit(cache=True, nogil=True, error_model="numpy")
def base_detections(order, img, n_img, boxes, nu, n):
    """The detections (kept candidates, rank order) and the per-image candidate CSR."""
    iptr, icand = group_by(img, order, n_img)
    kept = nms_keep(icand, iptr, boxes, nu, n)
    n_det = 0
    for r in range(order.size):
        if kept[order[r]]:
            n_det += 1
    det = np.empty(n_det, dtype=np.int64)
    k = 0
    for r in range(order.size):
        if kept[order[r]]:
            det[k] = order[r]
            k += 1
    return det, kept, iptr, icand


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _combine(up, down, rtol, code):
    """:func:`mapdet.core.pseudograd.combine_slopes`, compiled: ``(pseudo-partial, side)``
    with ``side`` +1 / -1 / 0 when the up / down / neither direction's slope decides it.
    ``code``: the direction rule's code (:data:`mapdet.core.pseudograd.DIRECTIONS`)."""
    if code == BOTH_SUMMED:
        v = up - down
        return v, (1 if v > 0.0 else (-1 if v < 0.0 else 0))
    au = up
    ad = down
    if code == NEAREST_CHANGE:  # signed slopes, the larger magnitude
        au = abs(up)
        ad = abs(down)
    slack = rtol * max(au, ad)
    if au > 0.0 and au >= ad - slack:
        return up, 1
    if ad > au + slack:
        return -down, -1
    return 0.0, 0


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _holder_run(g, base, removed, run_id, nr):
    """The run of ``g``'s first claimant at the (single) threshold that is not removed;
    ``nr`` (past every run) when there is none."""
    holder, nxt = base.holder, base.nxt
    p = holder[0, g]
    while p >= 0 and removed[p]:
        p = nxt[0, p]
    return run_id[p] if p >= 0 else nr


# A block of a bounded walk is skipped when its bound is below the improvement threshold by
# this much: the bound and the APs are sums of the same per-threshold values in the same order,
# but each threshold's monotonicity holds exactly only in real arithmetic.
_BOUND_MARGIN = 1e-9


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _slope(w, mv, r, v):
    """``(slope, gain)`` of ``i`` landing in run ``r`` with AP ``v``: ``gain = v - f0`` over
    the score distance plus ``mu``."""
    s, run_s, f0 = w.scores, w.runs.s, w.f0
    delta = run_s[r] - s[mv.i] if mv.up else s[mv.i] - run_s[r]
    return (v - f0) / (delta + w.mu), v - f0


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _probe(w, q, mv, j, sl):
    """AP with ``i`` at the walk's candidate ``j`` (as :func:`_walk` numbers them), its
    per-threshold APs into row ``sl`` of the walk buffer and the AP into ``vval[sl]``."""
    run_start, run_end = w.runs.start, w.runs.end
    (base, pool, edits, gt, weights, thetas, scratch, wk) = q
    i, up, a, b = mv
    r = b - j if up else a + j
    gap = run_start[r] if up else run_end[r] + 1
    v = edited_ap(base, pool, edits, i, gap, gt, weights, thetas, scratch, wk.vbuf[sl])
    wk.vval[sl] = v
    w.stats[0] += 1
    return v


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _block_bound(vbuf, sa, sb, n_t):
    """Upper bound of the AP on a block of a walk from the per-threshold APs at its two ends
    (rows ``sa``, ``sb``): ``mean_t max(AP_t(a), AP_t(b))``."""
    total = 0.0
    for t in range(n_t):
        total += max(vbuf[sa, t], vbuf[sb, t])
    return total / n_t


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _bounded_walk(w, q, mv):
    """Nearest improvement of a walk ``mv`` over the runs ``a..b`` whose AP is not monotone:
    several IoU thresholds, ``i`` a TP candidate at one of them (docs/method.md, section 5,
    "Several thresholds: a bounded search"). Same result as trying every candidate in order.

    Along a walk in a fixed state each threshold's AP is monotone, or falls and then rises
    (``i`` an FP, or a TP, at that threshold moving past others; a swap with its ground truth's
    competing claimant in between), so on a block of candidates it is at most the larger of
    its values at the block's two ends, and the mean over thresholds at most
    :func:`_block_bound`. Candidates (``j = 0..cnt-1``, nearest first) are probed at ``j = 0``
    and then in blocks ``(lo, lo + 1], (lo, lo + 2], (lo, lo + 4], ...``; a block whose bound
    cannot exceed ``f0 + tol`` is skipped whole, another is bisected, nearer half first, each
    half skipped by its own bound. The first improving candidate found is the nearest.
    Returns ``(slope, gain)`` as :func:`_walk`."""
    vbuf, vval, stk = q.wk
    cnt = mv.b - mv.a + 1
    if cnt <= 0:
        return 0.0, 0.0
    n_t = vbuf.shape[1]
    target = w.f0 + w.tol
    prune = target - _BOUND_MARGIN
    found = -1
    found_sl = -1
    if _probe(w, q, mv, 0, 0) > target:
        found, found_sl = 0, 0
    lo = 0
    slo = 0
    n_sl = 1
    step = 1
    while found < 0 and lo < cnt - 1:
        hi = min(cnt - 1, lo + step)
        sh = n_sl
        n_sl += 1
        _probe(w, q, mv, hi, sh)
        if _block_bound(vbuf, slo, sh, n_t) > prune:
            stk[0, 0], stk[1, 0], stk[2, 0], stk[3, 0] = lo, hi, slo, sh
            top = 1
            while top > 0:
                top -= 1
                x, y, sx, sy = stk[0, top], stk[1, top], stk[2, top], stk[3, top]
                if y == x + 1:
                    if vval[sy] > target:
                        found, found_sl = y, sy
                        break
                    continue
                m = (x + y) >> 1
                sm = n_sl
                n_sl += 1
                _probe(w, q, mv, m, sm)
                if _block_bound(vbuf, sm, sy, n_t) > prune:  # the farther half, popped last
                    stk[0, top], stk[1, top], stk[2, top], stk[3, top] = m, y, sm, sy
                    top += 1
                if _block_bound(vbuf, sx, sm, n_t) > prune:
                    stk[0, top], stk[1, top], stk[2, top], stk[3, top] = x, m, sx, sm
                    top += 1
        lo = hi
        slo = sh
        step *= 2
    if found < 0:
        return 0.0, 0.0
    r = mv.b - found if mv.up else mv.a + found
    return _slope(w, mv, r, vval[found_sl])


# Inlined into _walk by numba (not a call): a call per walk passing the walk's tuples costs a
# reference count per array they hold, about 15% of the pseudo-gradient's time.
@register_jitable(error_model="numpy", no_cfunc_wrapper=True, inline="always")
def _search(w, q, mv, monotone):
    """The nearest improving (with ``change``: changing) candidate of one walk ``mv`` (as
    :func:`_walk` searches it) and its AP: ``(j, v)``, ``(-1, 0)`` where there is none."""
    i, up, a, b = mv
    cnt = b - a + 1
    best_j = -1
    best_v = 0.0
    if cnt <= 0:
        return best_j, best_v
    run_start, run_end = w.runs.start, w.runs.end
    f0, tol, change, stats = w.f0, w.tol, w.change, w.stats
    (base, pool, edits, gt, weights, thetas, scratch, wk) = q
    per_t = wk.vbuf[0]
    lo = 0  # monotone, once bracketed: the first improving j is in [lo, hi]
    hi = -1
    step = 1
    j = cnt - 1 if monotone else 0
    probed = not monotone or cnt == 1
    near = change and monotone and cnt > 1
    if near:
        j = 0
    while True:
        r = b - j if up else a + j
        gap = run_start[r] if up else run_end[r] + 1
        v = edited_ap(base, pool, edits, i, gap, gt, weights, thetas, scratch, per_t)
        stats[0] += 1
        better = v > f0 + tol or (change and v < f0 - tol)
        if better:
            best_j, best_v = j, v
        if near:  # nearest first; then the farthest, then gallop from 1
            near = False
            if better:
                break
            lo = 1
            j = cnt - 1
            continue
        if not monotone:
            if better or j == cnt - 1:
                break
            j += 1
            continue
        if not probed:  # the farthest candidate decides whether there is any improvement
            probed = True
            if not better:
                break
            j = lo
            continue
        if hi < 0:  # galloping
            if better:
                hi = j
            else:
                lo = j + 1
                if j == cnt - 1:
                    break  # no improvement anywhere
                j = min(cnt - 1, j + step)
                step *= 2
                continue
        elif better:
            hi = j
        else:
            lo = j + 1
        if lo >= hi:
            break
        j = (lo + hi) >> 1
    return best_j, best_v


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _walk(w, q, mv, monotone, rp):
    """Nearest improvement when ``i`` walks over the runs ``mv.a..mv.b`` (up: from ``b``
    towards ``a``, landing at the run's start; down: from ``a`` on, landing just below the
    run's end). The NMS state and the other edits are fixed in ``q``.

    Candidates are numbered ``j = 0..cnt-1``, nearest first. Monotone walks ("improves" is
    false then true): probe the farthest (no improvement there: none anywhere), then gallop
    from the nearest (``j = 0, 1, 3, 7, ...``) to the first improving probe and binary search
    the bracket: ``O(log distance)`` queries (:func:`_search`). Otherwise (several thresholds,
    ``i`` a TP candidate at one): :func:`_bounded_walk`; with ``change``, every ``j`` in order.

    ``change``: the nearest change of either sign (``|v - f0| > tol``) instead. With one
    threshold, ``i``'s label along a walk in a fixed state is that of an FP while its ground
    truth's first claimant (run ``rp``, :func:`_holder_run`) is above it and a TP past it,
    and no other label changes. Moving an FP up (a TP down) never raises the AP, moving a TP
    up (an FP down) never lowers it, so the AP is monotone on each side of ``rp``, and each
    side is searched as one monotone walk, the nearer first (up: runs ``> rp``, then
    ``<= rp``; down: runs ``< rp``, then ``>= rp``); ``rp = -1`` (up) or the run count
    (down) when ``i`` is an FP or ignored everywhere. A monotone side probes its nearest run
    first (its value may already differ); "changes" is then false then true on the rest.
    ``rp`` is unused without ``change``.

    Returns ``(slope, gain)``: ``gain`` is the AP gained at the nearest improvement (change)
    and ``slope`` is ``gain / (delta + mu)``; ``(0, 0)`` where there is none."""
    change = w.change
    if not monotone:
        w.stats[1] += 1
        if not change:
            return _bounded_walk(w, q, mv)
    sides = 2 if change and monotone else 1
    for side in range(sides):
        part = mv  # this side's runs
        if sides == 2:
            if mv.up:
                part = (Walk(mv.i, mv.up, max(mv.a, rp + 1), mv.b) if side == 0
                        else Walk(mv.i, mv.up, mv.a, min(mv.b, rp)))
            else:
                part = (Walk(mv.i, mv.up, mv.a, min(mv.b, rp - 1)) if side == 0
                        else Walk(mv.i, mv.up, max(mv.a, rp), mv.b))
        best_j, best_v = _search(w, q, part, monotone)
        if best_j >= 0:
            return _slope(w, part, part.b - best_j if part.up else part.a + best_j, best_v)
    return 0.0, 0.0


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _kept_neighbours(i, b, boxes, nu, dets, seeds):
    """The detections of image ``b`` with ``IoU > nu`` with window ``i``, in rank order,
    into ``seeds``; returns their number. ``dets``: :class:`DetBoxes`, ``dsoa (5, D)`` the
    detections' x1, y1, x2, y2 and area, image by image (``dptr``, ``idet``), ``dflags (D,)``
    scratch. Same arithmetic as :func:`overlap.iou`, so the same decisions; the IoU loop has
    no branch (a zero union gives NaN, which compares False like ``iou``'s 0 for ``nu > 0``)
    and vectorises."""
    x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
    area_i = (x2 - x1 + 0.0) * (y2 - y1 + 0.0)
    (dptr, idet, dsoa, flags) = dets
    dx1, dy1, dx2, dy2, darea = dsoa[0], dsoa[1], dsoa[2], dsoa[3], dsoa[4]
    lo, hi = dptr[b], dptr[b + 1]
    for j in range(lo, hi):
        iw = max(min(x2, dx2[j]) - max(x1, dx1[j]) + 0.0, 0.0)
        ih = max(min(y2, dy2[j]) - max(y1, dy1[j]) + 0.0, 0.0)
        inter = iw * ih
        flags[j] = inter / (darea[j] + area_i - inter) > nu
    k = 0
    for j in range(lo, hi):
        if flags[j]:
            seeds[k] = idet[j]
            k += 1
    return k


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _releases_nothing(i, h, boxes, nu, graph, base_cnt):
    """Whether ``i``, placed above its only kept neighbour ``h``, releases no window: every
    window that ``h`` alone suppresses overlaps ``i`` (so ``i`` suppresses it in turn).

    Then ``S_up`` is the base list with ``h`` removed and ``i`` inserted just above ``h``'s
    run, and for an ``i`` that is an FP at every threshold the AP cannot rise (so the
    nearest-improvement rules give 0 without a cascade or a query). Per threshold, with ``X``
    the windows tied with ``h`` above it: ``h`` an FP: ``[X, F, ...]`` becomes
    ``[F, X, ...]``, an FP moving up; ``h`` ignored: an FP inserted; ``h`` a TP whose ground
    truth's next claimant ``d`` (an FP) takes it: ``[X, T, Y, F(d), Z]`` becomes
    ``[F, X, Y, T(d), Z]``, i.e. an FP moving up then a TP moving down; ``h`` a TP with no
    later claimant: a TP turned FP, then moving up. None of these raises the AP (docs/
    method.md, section 5)."""
    ls_ptr, ls_idx = graph.ls_ptr, graph.ls_idx
    for e in range(ls_ptr[h], ls_ptr[h + 1]):
        z = ls_idx[e]
        if base_cnt[z] > 1:
            break  # sorted by base_cnt: the rest have another kept earlier neighbour
        if not iou(boxes, i, z) > nu:
            return False
    return True


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _count_below(sorted_arr, v):
    """Number of entries of the ascending ``sorted_arr`` below ``v`` (binary search)."""
    lo = 0
    hi = sorted_arr.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_arr[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _load_changes(edits, n_rem0, enc, lo, n_chg, det_pos, det_rank, rank):
    """Append a cascade's changes ``enc[lo:lo + n_chg]`` (a now-kept window ``y`` as ``y``, a
    now-suppressed one as ``-1 - y``) to the edit set after its first ``n_rem0`` removals:
    now-suppressed base detections are removed (and marked), now-kept windows are inserted
    at their rank's gap."""
    (ed, removed) = edits
    n_rem = n_rem0
    n_ins = 0
    for k in range(lo, lo + n_chg):
        y = enc[k]
        if y < 0:
            ed[REM, n_rem] = det_pos[-1 - y]
            removed[det_pos[-1 - y]] = True
            n_rem += 1
        else:
            ed[INS_W, n_ins] = y
            ed[INS_GAP, n_ins] = _count_below(det_rank, rank[y])
            ed[INS_SEC, n_ins] = rank[y]
            n_ins += 1
    ed[COUNT, 0] = n_rem
    ed[COUNT, 1] = n_ins


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _encode_changes(changed, n_chg, chg, enc, lo):
    """Write ``changed[:n_chg]`` into ``enc[lo:]`` as :func:`_load_changes` reads them."""
    for k in range(n_chg):
        y = changed[k]
        enc[lo + k] = y if chg[y] == 1 else -1 - y


#: The cascade memo (:func:`_memo_find`) is one int64 buffer of records. A *group* (one seed
#: list) holds ``[next group, first variant, seed count, seed hash, seeds...]``; a *variant*
#: (one cascade outcome) ``[next variant, change count, test count, value slot, changes...,
#: tests...]``: the changes as :func:`_load_changes` reads them, the tests as ``y`` (a window
#: that became kept: ``i`` must not overlap it, nor be it) or ``-1 - z`` (a window kept but
#: for the moved window's overlap: ``i`` must overlap it, or be it).
_G_NEXT, _G_VAR, _G_NS, _G_HASH, _G_LEN = 0, 1, 2, 3, 4
_V_NEXT, _V_NC, _V_NT, _V_VAL, _V_LEN = 0, 1, 2, 3, 4
#: A variant with more tests, or beyond this many per group, is not recorded: in dense
#: clusters the tests cost more than the cascades they would save.
_V_MAX_TESTS, _V_MAX_PER_GROUP = 1 << 30, 1 << 30


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _seed_hash(seeds, n_seeds):
    h = n_seeds
    for k in range(n_seeds):
        h = h * 1000003 + seeds[k]
    return h


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _memo_group(mb, head, seeds, n_seeds, key):
    """Offset of the group of this seed list (-1: none)."""
    o = head[seeds[0]]
    while o >= 0:
        if mb[o + _G_HASH] == key and mb[o + _G_NS] == n_seeds:
            same = True
            for k in range(n_seeds):
                if mb[o + _G_LEN + k] != seeds[k]:
                    same = False
                    break
            if same:
                return o
        o = mb[o + _G_NEXT]
    return -1


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _memo_find(mb, grp, i, boxes, nu):
    """A recorded cascade that is provably window ``i``'s: the offset of its variant in group
    ``grp`` (moved to the front of the group's list), -1 if none.

    Window ``i`` (not kept) placed above its kept neighbours (the group's seeds) suppresses
    them and, by the cascade, changes a set of decisions (:func:`mapdet.core.overlap.cascade`
    with ``extra = i``). That cascade depends on ``i`` only through which windows ``i``
    overlaps. A variant recorded for ``i1`` lists the windows that became kept and those that
    would have but for ``i1``'s overlap (``i1`` itself among them when it is a candidate: in
    ``i``'s cascade it could be released). If ``i`` is none of the former, overlaps none of
    them and overlaps all of the latter, every decision of the cascade is the same for ``i``
    (docs/method.md, section 5), so the variant's changes are ``i``'s."""
    prev = -1
    o = mb[grp + _G_VAR]
    while o >= 0:
        p = o + _V_LEN + mb[o + _V_NC]
        same = True
        for k in range(p, p + mb[o + _V_NT]):
            y = mb[k]
            if y >= 0:
                if y == i or iou(boxes, i, y) > nu:
                    same = False
                    break
            elif -1 - y != i and not iou(boxes, i, -1 - y) > nu:
                same = False
                break
        if same:
            if prev >= 0:  # to the front: windows near one object tend to share an outcome
                mb[prev + _V_NEXT] = mb[o + _V_NEXT]
                mb[o + _V_NEXT] = mb[grp + _G_VAR]
                mb[grp + _G_VAR] = o
            return o
        prev = o
        o = mb[o + _V_NEXT]
    return -1


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _memo_reserve(memo, extra):
    """The memo with room for ``extra`` more buffer entries and one more value slot."""
    (mb, head, val, used) = memo
    if used[0] + extra > mb.size:
        grown = np.empty(2 * mb.size + extra, dtype=np.int64)
        for k in range(used[0]):  # explicit loops: slice copies cost seconds of compile time
            grown[k] = mb[k]
        mb = grown
    if used[1] >= val.size:
        grown_v = np.empty(2 * val.size, dtype=np.float64)
        for k in range(used[1]):
            grown_v[k] = val[k]
        val = grown_v
    return Memo(mb, head, val, used)


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _memo_new_group(memo, seeds, n_seeds, key):
    """Write a new group for the seed list ``seeds[:n_seeds]`` (hash ``key``) at the end of
    the used part (room reserved); returns its offset."""
    (mb, head, _, used) = memo
    grp = used[0]
    mb[grp + _G_NEXT] = head[seeds[0]]
    mb[grp + _G_VAR] = -1
    mb[grp + _G_NS] = n_seeds
    mb[grp + _G_HASH] = key
    for k in range(n_seeds):
        mb[grp + _G_LEN + k] = seeds[k]
    head[seeds[0]] = grp
    used[0] = grp + _G_LEN + n_seeds
    return grp


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _memo_add_variant(memo, grp, i, cs, n_chg, n_blk, candidate):
    """Record window ``i``'s cascade (just run, in ``cs``: ``n_chg`` changes, ``n_blk``
    blocked windows) as a variant of group ``grp`` (room reserved); returns the variant's
    offset. ``candidate``: ``i`` is a candidate (its own test is recorded). A variant that is
    not kept (:data:`_V_MAX_TESTS`) is written past the used part, to be read once, and gets
    no value slot (-1)."""
    (mb, _, val, used) = memo
    chg, changed, blocked = cs.chg, cs.q[Q_CHANGED], cs.q[Q_BLOCKED]
    o = used[0]
    n_var = 0
    v = mb[grp + _G_VAR]
    while v >= 0:
        n_var += 1
        v = mb[v + _V_NEXT]
    mb[o + _V_NC] = n_chg
    p = o + _V_LEN
    _encode_changes(changed, n_chg, chg, mb, p)
    p += n_chg
    n_t = 0
    for k in range(n_chg):
        if chg[changed[k]] == 1:
            mb[p + n_t] = changed[k]
            n_t += 1
    for k in range(n_blk):
        mb[p + n_t] = -1 - blocked[k]
        n_t += 1
    if candidate:
        mb[p + n_t] = -1 - i
        n_t += 1
    mb[o + _V_NT] = n_t
    if n_t > _V_MAX_TESTS or n_var >= _V_MAX_PER_GROUP:
        mb[o + _V_VAL] = -1
        return o
    mb[o + _V_NEXT] = mb[grp + _G_VAR]
    mb[grp + _G_VAR] = o
    mb[o + _V_VAL] = used[1]
    val[used[1]] = np.nan
    used[1] += 1
    used[0] = p + n_t
    return o


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _unload(edits, n_keep):
    """Unmark the removals past the first ``n_keep`` and empty the insertions."""
    ed, removed = edits.ed, edits.removed
    for k in range(n_keep, ed[COUNT, 0]):
        removed[ed[REM, k]] = False
    ed[COUNT, 0] = n_keep
    ed[COUNT, 1] = 0


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _below_last_tp(data, t_min, base, nms, runs):
    """What decides which windows cannot change the AP (docs/method.md, section 5, "Windows
    that cannot change the AP"): an :class:`Inert` ``(last, free, quiet)``.

    ``last``: the base list's last TP position over the thresholds (-1: none). ``free
    (n_img,)``: the image has a candidate that would be a TP if it entered the list (its
    best ground truth is non-difficult, matched at some threshold, and has no holder there).
    A window that is not a TP candidate itself, of an image without such a candidate, whose
    every reachable state changes the list only after ``last`` (its entry gap, or its base
    position when kept, is past ``last``), leaves the AP at ``f(x)`` bit for bit: only FPs and
    ignored windows move, and none is a TP's rank or count. ``quiet (n_img,)``: images none
    of whose windows can be a TP, whose highest detection's run starts past ``last``: all
    their windows are such windows."""
    img, best, best_iou, gt_diff, thetas = (data.img, data.best, data.best_iou, data.gt_diff,
                                            data.thetas)
    cnt, holder = base.cnt, base.holder
    last = -1
    d_end = cnt.shape[2] - 1
    for t in range(cnt.shape[0]):
        m = cnt[t, 0, d_end]
        if m == 0:
            continue
        p = d_end - 1
        while cnt[t, 0, p] == m:
            p -= 1
        last = max(last, p)
    quiet = np.zeros(data.n_img, dtype=np.bool_)  # np.zeros then a loop: a form compiled anyway
    quiet[:] = True
    for w in range(img.size):
        g = best[w]
        if g >= 0 and not gt_diff[g] and best_iou[w] >= t_min:
            quiet[img[w]] = False
    free = np.zeros(data.n_img, dtype=np.bool_)
    for r in range(data.order.size):
        w = data.order[r]
        g = best[w]
        if g < 0 or gt_diff[g]:
            continue
        for t in range(thetas.size):
            if best_iou[w] >= thetas[t] and holder[t, g] < 0:
                free[img[w]] = True
    dptr, idet = nms.dets.dptr, nms.dets.idet
    for b in range(data.n_img):
        if quiet[b] and dptr[b + 1] > dptr[b]:
            if runs.start[runs.id[nms.det_pos[idet[dptr[b]]]]] <= last:
                quiet[b] = False
    return Inert(last, free, quiet)


# ---------------------------------------------------------------------------- setup


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _nms_state(data, nu, n_grad):
    """The detections ``det (D,)`` (rank order) and the :class:`NmsState` around them; the
    overlap lists cover the images of the first ``n_grad`` windows."""
    n = data.scores.size
    img, boxes = data.img, data.boxes
    det, kept, iptr, icand = base_detections(data.order, img, data.n_img, boxes, nu, n)
    n_det = det.size
    need = np.zeros(data.n_img, dtype=np.bool_)
    for i in range(n_grad):
        need[img[i]] = True
    graph, base_cnt = kept_graph(icand, iptr, need, kept, boxes, nu, n)
    det_pos = np.full(n, -1, dtype=np.int64)
    det_rank = np.empty(n_det, dtype=np.int64)
    for p in range(n_det):
        det_pos[det[p]] = p
        det_rank[p] = data.rank[det[p]]
    dptr, idet = group_by(img, det, data.n_img)
    # The detections' boxes and areas per image, contiguous: every window that is not a
    # detection scans its image's detections for its kept neighbours.
    dsoa = np.empty((5, n_det), dtype=np.float64)
    dflags = np.empty(n_det, dtype=np.bool_)
    for j in range(n_det):
        d = idet[j]
        for c in range(4):
            dsoa[c, j] = boxes[d, c]
        dsoa[4, j] = (boxes[d, 2] - boxes[d, 0] + 0.0) * (boxes[d, 3] - boxes[d, 1] + 0.0)
    return det, NmsState(kept, graph, base_cnt, det_pos, det_rank,
                         DetBoxes(dptr, idet, dsoa, dflags))


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _tied_runs(s, det):
    """The tied-score :class:`Runs` of the base list ``det``, computed once: every position a
    walk can reach is a run boundary of the base list."""
    n_det = det.size
    run_id = np.empty(n_det, dtype=np.int64)
    run_start = np.empty(n_det, dtype=np.int64)
    run_end = np.empty(n_det, dtype=np.int64)
    run_s = np.empty(n_det, dtype=np.float64)
    nr = 0
    for p in range(n_det):
        if p == 0 or s[det[p]] != s[det[p - 1]]:
            run_start[nr] = p
            run_s[nr] = s[det[p]]
            nr += 1
        run_id[p] = nr - 1
        run_end[nr - 1] = p
    return Runs(run_start[:nr], run_end[:nr], run_s[:nr], run_id)


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _ap_query(data, det, n_runs):
    """The :class:`ApQuery` of the base list ``det`` with an empty edit set, walk buffers
    for ``n_runs`` runs."""
    thetas = data.thetas
    n_det = det.size
    base = build_base(det, data.best, data.best_iou, data.gt_diff, thetas)
    # Loops instead of ndarray.min() / max(): those compile about 1.5 s of a fresh install.
    m_max = np.int64(1)  # typed: a literal 1 would compile make_pool a second time
    for t in range(thetas.size):
        m_max = max(m_max, base.cnt[t, 0, n_det])
    pool = make_pool(thetas.size, m_max, POOL_BYTES)
    gt = (data.best, data.best_iou, data.gt_diff)
    edits = make_edits(n_det, data.scores.size + 2)
    # Numba compiles a callee once per argument types, and a literal argument has its own
    # type: constants of njit callees go through typed values so that each compiles once.
    scratch = make_scratch(np.int64(16))
    wk = WalkBuffers(np.empty((n_runs + 2, thetas.size), dtype=np.float64),
                     np.empty(n_runs + 2, dtype=np.float64), np.empty((4, 160), dtype=np.int64))
    return ApQuery(base, pool, edits, gt, data.weights, thetas, scratch, wk)


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _down_runs(runs, q0, b_sw):
    """The runs a detection at base position ``q0`` walks down over in the base state:
    ``(first, last)``, those below ``q0`` scoring above ``b_sw`` (``last < first``: none)."""
    run_s = runs.s
    r0 = runs.id[q0]
    r_first = r0 if runs.end[r0] > q0 else r0 + 1
    lo = r_first - 1  # last run with run_s > b_sw: run_s is decreasing
    hi = run_s.size - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if run_s[mid] > b_sw:
            lo = mid
        else:
            hi = mid - 1
    return r_first, lo


@njit(cache=True, nogil=True, error_model="numpy")
def pseudo_gradient_kernel(data, par, n_grad, grad, gain, stats):
    """Exact pseudo-gradient of AP after NMS for one class; returns ``f(x)``.

    ``data``: the class's :class:`ClassData`; ``par``: its :class:`KernelParams`
    (``direction`` the rule's code, :data:`mapdet.core.pseudograd.DIRECTIONS`). Fills
    ``grad[:n_grad]`` and ``gain[:n_grad]`` (the AP gained at the nearest improvement, or
    change, in the direction whose slope decides the pseudo-partial; 0 where none does); the
    windows from ``n_grad`` on take part in the AP only. ``stats (7,)`` int64 accumulates
    ``[AP queries, scanned walks, direct segment sums, segment queries, cascades run and
    cascades reused for windows that are not kept, windows that cannot change the AP]``
    (reuse: :func:`_memo_find`; the last: :func:`_below_last_tp`, their pseudo-partials are
    0). The setup (:func:`_nms_state`, :func:`_tied_runs`, :func:`_ap_query`,
    :func:`_below_last_tp`) builds the base list, its runs and the buffers; then each window
    in one loop: a kept one walks up in the base state and down to ``S_down``, another enters
    in ``S_up`` (its cascade recorded in the memo, :func:`_memo_find`) and walks up there
    (:func:`_walk`).

    The loop is one function on purpose, reading locals only: every tuple passed to a
    function, or read from inside the loop, costs an atomic reference count per array it
    holds, and per-window phase functions taking the class's tuples made the pseudo-gradient
    about three times slower (``bench_loss.py --only minibatch``)."""
    n = data.scores.size
    thetas = data.thetas
    det, nms = _nms_state(data, par.nu, n_grad)
    runs = _tied_runs(data.scores, det)
    q = _ap_query(data, det, runs.start.size)  # typed (nr can reach a callee as a literal 0)
    t_min = thetas[0]
    for t in range(1, thetas.size):
        t_min = min(t_min, thetas[t])
    (base, pool, edits, gt, weights, _, scratch, wk) = q
    # Numba compiles a njit callee once per argument types, and a literal argument has its own
    # type: constants go through typed values so that each compiles once.
    f0 = edited_ap(base, pool, edits, np.int64(-1), np.int64(0), gt, weights, thetas, scratch,
                   wk.vbuf[0])
    cs = CascadeScratch(np.zeros(n, dtype=np.bool_), np.zeros(n, dtype=np.int8),
                        np.empty((5, n + 1), dtype=np.int64))
    seeds = np.empty(n + 1, dtype=np.int64)
    enc = np.empty(n + 1, dtype=np.int64)  # a cascade's changes, encoded (_load_changes)
    inert = _below_last_tp(data, t_min, base, nms, runs)
    change = par.direction == NEAREST_CHANGE
    walks = Walks(data.scores, runs, f0, par.tol, par.mu, change, stats)
    # Cascades of windows that are not kept, recorded by highest kept neighbour (_memo_find).
    memo = Memo(np.empty(1024, dtype=np.int64), np.full(n, -1, dtype=np.int64),
                np.empty(64, dtype=np.float64), np.zeros(2, dtype=np.int64))
    s, boxes, img, rank, best, best_iou, gt_diff = (data.scores, data.boxes, data.img, data.rank,
                                                    data.best, data.best_iou, data.gt_diff)
    tau, nu, mu, tol, rtol, code = par
    kept, det_pos, det_rank, graph, base_cnt, dets = (nms.kept, nms.det_pos, nms.det_rank,
                                                      nms.graph, nms.base_cnt, nms.dets)
    run_start, run_id = runs.start, runs.id
    n_runs = run_start.size
    n_det = det.size
    last, free, quiet = inert
    removed = edits.removed
    ed = edits.ed
    chg, changed = cs.chg, cs.q[Q_CHANGED]
    ls_ptr, ls_idx = graph.ls_ptr, graph.ls_idx
    multi = thetas.size > 1
    none = np.int64(-1)
    zero = np.int64(0)
    one = np.int64(1)
    go_up = n >= 0
    go_down = not go_up
    for i in range(n_grad):
        if quiet[img[i]] and not change:
            stats[6] += 1
            continue
        si = s[i]
        g = best[i]
        tp_any = g >= 0 and not gt_diff[g] and best_iou[i] >= t_min  # a TP candidate somewhere
        fp_all = g < 0 or best_iou[i] < t_min  # an FP at every threshold
        monotone = not (multi and tp_any)  # its walks' APs are monotone
        if kept[i]:
            # ---- i is a detection at base position q0.
            q0 = det_pos[i]
            if q0 > last and not (tp_any or change or free[img[i]]):
                stats[6] += 1  # every state it reaches differs only past the last TP
                continue
            ed[REM, 0] = q0
            removed[q0] = True
            ed[COUNT, 0] = 1
            ed[COUNT, 1] = 0
            r0 = run_id[q0]
            up = 0.0
            up_gain = 0.0
            if tp_any or change:  # an FP or ignored detection moving up cannot raise the AP
                r_max = r0 if run_start[r0] < q0 else r0 - 1
                rp = _holder_run(g, base, removed, run_id, n_runs) if change and tp_any else none
                up, up_gain = _walk(walks, q, Walk(i, go_up, zero, r_max), monotone, rp)
            # S_down: i removed (one suppression event; chg[i] = 2 marks it gone).
            chg[i] = 2
            n_seeds = zero
            for e in range(ls_ptr[i], ls_ptr[i + 1]):
                if base_cnt[ls_idx[e]] > 1:
                    break
                seeds[n_seeds] = ls_idx[e]
                n_seeds += 1
            n_chg, n_push, _ = cascade(seeds, n_seeds, one, none, boxes, nu, rank, graph,
                                       base_cnt, kept, cs)
            b_sw = tau  # h': the highest-ranked neighbour kept once i is gone
            for m in range(n_chg):
                y = changed[m]
                if chg[y] == 1 and iou(boxes, i, y) > nu:
                    b_sw = s[y]
                    break
            if 8 * (n_chg + 3) > scratch.shape[1]:
                scratch = make_scratch(n_chg + 1)
                q = ApQuery(base, pool, edits, gt, weights, thetas, scratch, wk)
            _encode_changes(changed, n_chg, chg, enc, zero)
            _load_changes(edits, one, enc, zero, n_chg, det_pos, det_rank, rank)
            f_down = edited_ap(base, pool, edits, none, zero, gt, weights, thetas, scratch,
                               wk.vbuf[0])
            stats[0] += 1
            _unload(edits, one)
            reset_after(cs, n_push, n_chg)
            chg[i] = 0
            r_first, r_last = _down_runs(runs, q0, b_sw)
            rp = _holder_run(g, base, removed, run_id, n_runs) if change and tp_any else n_runs
            down, down_gain = _walk(walks, q, Walk(i, go_down, r_first, r_last), monotone, rp)
            removed[q0] = False
            ed[COUNT, 0] = 0
            if down == 0.0 and (f_down > f0 + tol or (change and f_down < f0 - tol)):
                down = (f_down - f0) / (si - b_sw + mu)
                down_gain = f_down - f0
            grad[i], side = _combine(up, down, rtol, code)
            if side > 0:
                gain[i] = up_gain
            elif side < 0:
                gain[i] = down_gain
        else:
            # ---- i is not a detection: only moving up can change anything.
            n_seeds = zero
            if nu < 1.0:
                n_seeds = _kept_neighbours(i, img[i], boxes, nu, dets, seeds)
            if n_seeds == 0 and not tp_any and not change:
                # Enters at the bottom as an FP (an FP after the last TP changes no
                # precision) and can only lose by moving further up.
                continue
            if n_seeds == 1 and fp_all and not change and _releases_nothing(i, seeds[0], boxes,
                                                                          nu, graph, base_cnt):
                continue
            # Entry: just above h's run (or at the bottom, past the threshold).
            if n_seeds > 0:
                r_entry = run_id[det_pos[seeds[0]]]
                q_e = run_start[r_entry]
            else:
                r_entry = n_runs
                q_e = n_det
            if q_e > last and not (tp_any or change or free[img[i]]):
                stats[6] += 1  # every state it reaches differs only past the last TP
                continue
            b_entry = s[seeds[0]] if n_seeds > 0 else tau
            # S_up's cascade: a recorded one that is provably i's, or run (and recorded).
            src = enc
            lo = zero
            n_chg = zero
            slot = none  # where the entry AP of an FP-everywhere i is kept
            if n_seeds > 0:
                key = _seed_hash(seeds, n_seeds)
                grp = _memo_group(memo.mb, memo.head, seeds, n_seeds, key)
                o = _memo_find(memo.mb, grp, i, boxes, nu) if grp >= 0 else none
                if o >= 0:
                    stats[5] += 1
                else:
                    n_chg, n_push, n_blk = cascade(seeds, n_seeds, zero, i, boxes, nu, rank,
                                                   graph, base_cnt, kept, cs)
                    stats[4] += 1
                    memo = _memo_reserve(memo, _G_LEN + n_seeds + _V_LEN + 2 * n_chg + n_blk + 1)
                    if grp < 0:
                        grp = _memo_new_group(memo, seeds, n_seeds, key)
                    o = _memo_add_variant(memo, grp, i, cs, n_chg, n_blk, rank[i] >= 0)
                    reset_after(cs, n_push, n_chg)
                src = memo.mb
                lo = o + _V_LEN
                n_chg = src[o + _V_NC]
                if fp_all:
                    slot = src[o + _V_VAL]  # -1 when not recorded
            if 8 * (n_chg + 3) > scratch.shape[1]:
                scratch = make_scratch(n_chg + 1)
                q = ApQuery(base, pool, edits, gt, weights, thetas, scratch, wk)
            v = memo.val[slot] if slot >= 0 else np.nan
            loaded = np.isnan(v)
            if loaded:
                _load_changes(edits, zero, src, lo, n_chg, det_pos, det_rank, rank)
                v = edited_ap(base, pool, edits, i, q_e, gt, weights, thetas, scratch,
                              wk.vbuf[0])
                stats[0] += 1
                if slot >= 0:
                    memo.val[slot] = v
            if v > f0 + tol or (change and v < f0 - tol):
                grad[i] = (v - f0) / (b_entry - si + mu)
                gain[i] = v - f0
            elif tp_any or change:
                if not loaded:
                    _load_changes(edits, zero, src, lo, n_chg, det_pos, det_rank, rank)
                    loaded = True
                rp = _holder_run(g, base, removed, run_id, n_runs) if change and tp_any else none
                grad[i], gain[i] = _walk(walks, q, Walk(i, go_up, zero, r_entry - 1), monotone,
                                         rp)
            if loaded:
                _unload(edits, zero)
    stats[2] += pool.meta[2]
    stats[3] += pool.meta[3]
    return f0
