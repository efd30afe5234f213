"""AP of an *edited* detection list in ``O(E log M)``: the base list plus a few edits.

Every AP the pseudo-gradient needs is the AP of the base detection list (``D`` detections in
rank order, base positions ``0..D-1``) with ``E`` edits: base detections removed, windows
inserted before a base position (a *gap* ``0..D``), and the relabels those imply. This module
evaluates such an AP without materialising the list.

**AP depends only on the TPs.** Per IoU threshold ``t``, the base has ``M`` TPs; the ``j``-th
(0-based) stands at non-ignored rank ``n_j`` (1-based). ``AP = sum_k w_k V_k`` with
``V_k = max_{j >= k} (j+1)/n_j`` (module :mod:`mapdet.core.ap`).

**Labels change only for the ground truths the edits touch.** A ground truth ``g``'s holder
is its first present *claimant* (a detection whose best ground truth is ``g`` with
``IoU >= theta``) in the edited order: the first non-removed base claimant (``holder``, then
the ``nxt`` chain) or the earliest inserted claimant, whichever comes first. The old holder,
if still present and no longer holding, becomes an FP; a base claimant that becomes the holder
becomes a TP. So an edit set is a short sorted list of events.

**Between events, base TPs have a constant shift** ``(a, b)``: base TP ``j`` becomes the
``(j+a)``-th TP at rank ``n_j + b``. For a shift, ``u_j = (j+1+a)/(n_j+b)``,
``w'_j = w_{j+a}``, and a *segment query* over base TPs ``[l, r)`` with running maximum ``c``
(of everything later in the edited list) is

    S(l, r, c) = sum_{m=l}^{r-1} w'_m max(c, max_{m <= j < r} u_j).

Let ``x`` be the last ``j`` in ``[l, r)`` with ``u_j >= c`` (none: ``S = c (W[r] - W[l])``,
``W`` the prefix sums of ``w'``), ``z`` the leftmost maximum of ``u`` over ``[l, x]``, and
``Q[j] = sum_{m<=j} w'_m max(u[m..j])`` (built in ``O(M)`` with the previous-greater-or-equal
pointers ``pg``: ``Q[j] = Q[pg[j]] + u_j (W[j+1] - W[pg[j]+1])``). Then

    S(l, r, c) = c (W[r] - W[x+1]) + (Q[x] - Q[z]) + u_z (W[z+1] - W[l]),

and the new running maximum is ``u_z``. ``x`` and ``z`` come from binary searches over a
sparse table of range maxima, so a segment costs ``O(log M)``. The per-shift tables are built
lazily (``O(M log M)``) into a fixed pool; a shift outside the pool falls back to the direct
``O(r - l)`` sum (exact too; counted in ``meta[2]``).

The obvious version, for tests: :func:`mapdet.core.reference.edited_ap_reference`.

Compile time: private helpers are ``register_jitable`` and every kernel uses
``error_model="numpy"``, as in :mod:`mapdet.core.overlap` (every divisor here is a rank or a
count, at least 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import register_jitable

__all__ = ["COUNT", "INS_GAP", "INS_SEC", "INS_W", "REM", "SHIFT_RANGE", "BaseList", "EditSet",
           "SegmentPool", "ap_of_list", "build_base", "edited_ap", "make_edits", "make_pool",
           "make_scratch"]


class BaseList(NamedTuple):
    """The base list's labels and TP ranks at every threshold (:func:`build_base`)."""

    det: np.ndarray
    lab: np.ndarray
    cnt: np.ndarray
    tp_n: np.ndarray
    holder: np.ndarray
    nxt: np.ndarray


class SegmentPool(NamedTuple):
    """Storage of the per-shift segment structures (:func:`make_pool`)."""

    slot_of: np.ndarray
    f: np.ndarray
    st: np.ndarray
    lg: np.ndarray
    meta: np.ndarray


class EditSet(NamedTuple):
    """An edit set of the base list (:func:`make_edits`)."""

    ed: np.ndarray
    removed: np.ndarray

#: Shifts ``(a, b)`` with ``|a|, |b| <= SHIFT_RANGE`` get a cached segment structure.
SHIFT_RANGE = 3
#: Rows of the edit-set array (:func:`make_edits`).
REM, INS_W, INS_GAP, INS_SEC, COUNT = 0, 1, 2, 3, 4
_TP, _FP, _IGN = 1, 0, -1
_INS, _REM, _RTP, _RFP = 0, 1, 2, 3


@njit(cache=True, nogil=True, error_model="numpy")
def build_base(det, best, best_iou, gt_diff, thetas):
    """Labels and TP ranks of the base list ``det (D,)`` at every threshold ``thetas (T,)``.

    Returns a :class:`BaseList` ``(det, lab (T, D) int8, cnt (T, 2, D+1), tp_n (T, D),
    holder (T, G), nxt (T, D))``: ``cnt[t, 0, p]`` / ``cnt[t, 1, p]`` count TPs / non-ignored
    detections at base positions ``< p`` (so ``cnt[t, 0, D]`` is the number of TPs ``M``);
    ``tp_n[t, j]`` is the 1-based non-ignored rank of TP ``j``; ``holder[t, g]`` is the base
    position of ``g``'s first claimant (-1: none) and ``nxt[t, p]`` the next claimant of the same
    ground truth."""
    n_t = thetas.size
    d_n = det.size
    g_n = gt_diff.size
    # Allocations share the few (shape, dtype) forms used elsewhere: numba compiles
    # np.zeros / np.full / np.empty once per form (about 0.2 s of a fresh install each).
    lab = np.empty((n_t, d_n), dtype=np.int8)  # every entry is written below
    cnt = np.full((n_t, 2, d_n + 1), 0, dtype=np.int64)
    tp_n = np.full((n_t, max(d_n, 1)), 0, dtype=np.int64)
    holder = np.full((n_t, g_n), -1, dtype=np.int64)
    nxt = np.full((n_t, d_n), -1, dtype=np.int64)
    last = np.empty(g_n, dtype=np.int64)
    for t in range(n_t):
        theta = thetas[t]
        last[:] = -1
        m = 0
        r = 0
        for p in range(d_n):
            cnt[t, 0, p] = m
            cnt[t, 1, p] = r
            d = det[p]
            g = best[d]
            if g >= 0 and best_iou[d] >= theta:
                if gt_diff[g]:
                    lab[t, p] = _IGN
                    continue
                r += 1
                if last[g] < 0:
                    holder[t, g] = p
                    lab[t, p] = _TP
                    tp_n[t, m] = r
                    m += 1
                else:
                    nxt[t, last[g]] = p
                    lab[t, p] = _FP
                last[g] = p
            else:
                lab[t, p] = _FP
                r += 1
        cnt[t, 0, d_n] = m
        cnt[t, 1, d_n] = r
    return BaseList(det, lab, cnt, tp_n, holder, nxt)


@njit(cache=True, nogil=True, error_model="numpy")
def make_pool(n_t, m_max, budget_bytes):
    """Storage for the lazily built per-shift segment structures.

    Returns a :class:`SegmentPool` ``(slot_of (T, 2S+1, 2S+1), f (P, 3, M+1), st (P, L, M),
    lg (M+1,), meta (4,))``: ``f[sl]`` holds ``u``, ``W`` and ``Q`` of slot ``sl``, ``st[sl]`` its
    sparse table; ``meta = [slots used, capacity P, fallbacks, segments]``; the capacity ``P`` keeps
    the pool within ``budget_bytes`` (at least 9 slots)."""
    side = 2 * SHIFT_RANGE + 1
    m = max(m_max, 1)
    levels = 1
    while (1 << levels) <= m:
        levels += 1
    per_slot = 8 * (m * levels + 3 * (m + 1))
    cap = min(n_t * side * side, max(9, budget_bytes // per_slot))
    lg = np.zeros(m + 1, dtype=np.int64)
    for k in range(2, m + 1):
        lg[k] = lg[k >> 1] + 1
    meta = np.zeros(4, dtype=np.int64)
    meta[1] = cap
    return SegmentPool(np.full((n_t, side, side), -1, dtype=np.int64), np.empty((cap, 3, m + 1)),
                       np.empty((cap, levels, m)), lg, meta)


@njit(cache=True, nogil=True, error_model="numpy")
def make_edits(d_n, cap):
    """Edit-set storage, an :class:`EditSet` ``(ed (5, cap) int64, removed (D,) bool)``: rows ``REM,
    INS_W, INS_GAP, INS_SEC`` hold the removed base positions and the inserted windows, their gaps
    and tie-break keys; ``ed[COUNT, 0]`` / ``ed[COUNT, 1]`` count removals / insertions;
    ``removed[p]`` marks the removed base positions."""
    ed = np.full((5, max(cap, 2)), 0, dtype=np.int64)  # np.full: a form compiled anyway
    return EditSet(ed, np.zeros(max(d_n, 1), dtype=np.bool_))


@njit(cache=True, nogil=True, error_model="numpy")
def make_scratch(n_edits):
    """Scratch ``(11, 8 * (n_edits + 2))`` int64 for :func:`edited_ap`."""
    return np.empty((11, 8 * (n_edits + 2)), dtype=np.int64)


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _build_slot(pool, sl, t, a, b, base, weights):
    """Fill pool slot ``sl`` with the segment structure of threshold ``t``, shift ``(a, b)``."""
    f, st = pool.f, pool.st
    tp_n = base.tp_n
    m_n = base.cnt[t, 0, -1]
    nw = weights.size
    u = f[sl, 0]
    W = f[sl, 1]
    Q = f[sl, 2]
    W[0] = 0.0
    for j in range(m_n):
        k = j + a
        n = tp_n[t, j] + b
        if k < 0 or n <= 0:
            u[j] = 0.0  # never inside a queried segment
            W[j + 1] = W[j]
        else:
            u[j] = (k + 1) / n
            W[j + 1] = W[j] + (weights[k] if k < nw else 0.0)
    # Q[j+1] = sum_{m<=j} w'_m max(u[m..j]) via previous-greater-or-equal pointers (stack).
    stack = np.empty(m_n, dtype=np.int64)
    top = 0
    Q[0] = 0.0
    for j in range(m_n):
        while top > 0 and u[stack[top - 1]] < u[j]:
            top -= 1
        pg = stack[top - 1] if top > 0 else -1
        Q[j + 1] = Q[pg + 1] + u[j] * (W[j + 1] - W[pg + 1])
        stack[top] = j
        top += 1
    lev = st[sl]
    for j in range(m_n):
        lev[0, j] = u[j]
    k = 1
    while k < lev.shape[0] and (1 << k) <= m_n:
        h = 1 << (k - 1)
        for j in range(m_n - (1 << k) + 1):
            lev[k, j] = max(lev[k - 1, j], lev[k - 1, j + h])
        k += 1


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _rmax(lev, lg, l, r):
    """max u[l:r] (``l < r``) from the sparse table ``lev``."""
    k = lg[r - l]
    return max(lev[k, l], lev[k, r - (1 << k)])


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _segment(pool, base, weights, t, l, r, a, b, c):
    """``(S(l, r, c), new c)`` for base TPs ``[l, r)`` under shift ``(a, b)`` (module doc)."""
    (slot_of, f, st, lg, meta) = pool
    meta[3] += 1
    s_r = (slot_of.shape[1] - 1) // 2
    sl = -1
    if -s_r <= a <= s_r and -s_r <= b <= s_r:
        sl = slot_of[t, a + s_r, b + s_r]
        if sl < 0 and meta[0] < meta[1]:
            sl = meta[0]
            meta[0] += 1
            _build_slot(pool, sl, t, a, b, base, weights)
            slot_of[t, a + s_r, b + s_r] = sl
    if sl < 0:  # direct sum, exact
        meta[2] += 1
        tp_n = base.tp_n
        nw = weights.size
        total = 0.0
        for j in range(r - 1, l - 1, -1):
            k = j + a
            v = (k + 1) / (tp_n[t, j] + b)
            if v > c:
                c = v
            if k < nw:
                total += weights[k] * c
        return total, c
    u = f[sl, 0]
    W = f[sl, 1]
    Q = f[sl, 2]
    lev = st[sl]
    if _rmax(lev, lg, l, r) < c:
        return c * (W[r] - W[l]), c
    # x: last j in [l, r) with u_j >= c (max u[j:r] >= c is true at j = l, false past x).
    lo = l
    hi = r - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if _rmax(lev, lg, mid, r) >= c:
            lo = mid
        else:
            hi = mid - 1
    x = lo
    mx = _rmax(lev, lg, l, x + 1)
    # z: first j in [l, x] with u_j >= mx (the leftmost maximum).
    lo = l
    hi = x
    while lo < hi:
        mid = (lo + hi) >> 1
        if _rmax(lev, lg, l, mid + 1) >= mx:
            hi = mid
        else:
            lo = mid + 1
    z = lo
    total = c * (W[r] - W[x + 1]) + (Q[x + 1] - Q[z + 1]) + u[z] * (W[z + 1] - W[l])
    return total, u[z]


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _add_unique(arr, n, v):
    for k in range(n):
        if arr[k] == v:
            return n
    arr[n] = v
    return n + 1


@njit(cache=True, nogil=True, error_model="numpy")
def edited_ap(base, pool, edits, mv_w, mv_gap, gt, weights, thetas, scratch, per_t):
    """AP (mean over thresholds) of the base list with the edits, ``O(E log M)`` per threshold.

    Args:
        base: from :func:`build_base`.
        pool: from :func:`make_pool` (filled lazily).
        edits: from :func:`make_edits`: the base positions ``ed[REM, :ed[COUNT, 0]]``
            removed (``removed[p]`` must mark them), the windows ``ed[INS_W, :ed[COUNT, 1]]``
            inserted before base position ``ed[INS_GAP]`` (same gap: by ``ed[INS_SEC]``).
        mv_w, mv_gap: one more inserted window (the moved one), first in its gap; ``mv_w < 0``
            for none.
        gt: ``(best, best_iou, gt_diff)``: every window's best ground truth, its IoU, and the
            difficult flags.
        scratch: from :func:`make_scratch` for at least ``E`` edits.
        per_t: ``(>= T,)`` float64, receives each threshold's AP (``per_t[t]``; their sum in
            order over ``T`` is the value returned).
    """
    (det, lab, cnt, tp_n, holder, nxt) = base
    (ed, removed) = edits
    rem, ins_w, ins_gap, ins_sec = ed[REM], ed[INS_W], ed[INS_GAP], ed[INS_SEC]
    (best, best_iou, gt_diff) = gt
    ev_key, ev_sec, ev_type, ev_arg = scratch[0], scratch[1], scratch[2], scratch[3]
    ag, ag_hold, pk, pl, pr, pa, pb = (scratch[4], scratch[5], scratch[6], scratch[7],
                                       scratch[8], scratch[9], scratch[10])
    n_rem = ed[COUNT, 0]
    n_ins = ed[COUNT, 1]
    d_n = det.size
    nw = weights.size
    total = 0.0
    for t in range(thetas.size):
        theta = thetas[t]
        # Ground truths whose holder may change: those of removed or inserted claimants.
        na = np.int64(0)  # typed: a literal 0 would compile _add_unique twice
        for k in range(n_rem):
            d = det[rem[k]]
            g = best[d]
            if g >= 0 and not gt_diff[g] and best_iou[d] >= theta:
                na = _add_unique(ag, na, g)
        for k in range(-1, n_ins):
            x = mv_w if k < 0 else ins_w[k]
            if x < 0:
                continue
            g = best[x]
            if g >= 0 and not gt_diff[g] and best_iou[x] >= theta:
                na = _add_unique(ag, na, g)
        ne = 0
        for q in range(na):
            g = ag[q]
            hb = holder[t, g]
            p_b = hb
            while p_b >= 0 and removed[p_b]:
                p_b = nxt[t, p_b]
            hi = -2
            h_gap = 0
            h_sec = 0
            for k in range(-1, n_ins):
                x = mv_w if k < 0 else ins_w[k]
                if x < 0 or best[x] != g or best_iou[x] < theta:
                    continue
                gap = mv_gap if k < 0 else ins_gap[k]
                sec = -1 if k < 0 else ins_sec[k]
                if hi == -2 or gap < h_gap or (gap == h_gap and sec < h_sec):
                    hi = k
                    h_gap = gap
                    h_sec = sec
            if hi != -2 and (p_b < 0 or h_gap <= p_b):
                ag_hold[q] = hi  # an inserted window holds g
                if hb >= 0 and not removed[hb]:
                    ev_key[ne] = 4 * hb + 2
                    ev_sec[ne] = 0
                    ev_type[ne] = _RFP
                    ne += 1
            else:
                ag_hold[q] = -2  # a base detection holds g (or nobody)
                if p_b != hb and p_b >= 0:
                    ev_key[ne] = 4 * p_b + 2
                    ev_sec[ne] = 0
                    ev_type[ne] = _RTP
                    ne += 1
        for k in range(n_rem):
            ev_key[ne] = 4 * rem[k] + 2
            ev_sec[ne] = 0
            ev_type[ne] = _REM
            ne += 1
        for k in range(-1, n_ins):
            x = mv_w if k < 0 else ins_w[k]
            if x < 0:
                continue
            g = best[x]
            lb = _FP
            if g >= 0 and best_iou[x] >= theta:
                if gt_diff[g]:
                    lb = _IGN
                else:
                    for q in range(na):
                        if ag[q] == g and ag_hold[q] == k:
                            lb = _TP
            if lb == _IGN:
                continue
            ev_key[ne] = 4 * (mv_gap if k < 0 else ins_gap[k])
            ev_sec[ne] = -1 if k < 0 else ins_sec[k]
            ev_type[ne] = _INS
            ev_arg[ne] = lb
            ne += 1
        # Sort the events by (key, sec) (insertion sort: E is small).
        for e in range(1, ne):
            k0, s0, t0, a0 = ev_key[e], ev_sec[e], ev_type[e], ev_arg[e]
            f = e - 1
            while f >= 0 and (ev_key[f] > k0 or (ev_key[f] == k0 and ev_sec[f] > s0)):
                ev_key[f + 1] = ev_key[f]
                ev_sec[f + 1] = ev_sec[f]
                ev_type[f + 1] = ev_type[f]
                ev_arg[f + 1] = ev_arg[f]
                f -= 1
            ev_key[f + 1], ev_sec[f + 1], ev_type[f + 1], ev_arg[f + 1] = k0, s0, t0, a0
        # Walk forward: pieces are base TP segments [l, r) with a shift, or single new TPs
        # (pk = 1; pl = 0-based TP index, pr = rank).
        pos = 0
        a = 0
        b = 0
        npc = 0
        for e in range(ne + 1):
            p = d_n if e == ne else ev_key[e] >> 2
            if p > pos:
                lo_tp = cnt[t, 0, pos]
                hi_tp = cnt[t, 0, p]
                if hi_tp > lo_tp:
                    pk[npc] = 0
                    pl[npc] = lo_tp
                    pr[npc] = hi_tp
                    pa[npc] = a
                    pb[npc] = b
                    npc += 1
                pos = p
            if e == ne:
                break
            et = ev_type[e]
            if et == _INS:
                if ev_arg[e] == _TP:
                    pk[npc] = 1
                    pl[npc] = cnt[t, 0, p] + a
                    pr[npc] = cnt[t, 1, p] + b + 1
                    npc += 1
                    a += 1
                b += 1
            else:
                lb = lab[t, p]
                if et == _REM:
                    if lb == _TP:
                        a -= 1
                        b -= 1
                    elif lb == _FP:
                        b -= 1
                elif et == _RTP:
                    pk[npc] = 1
                    pl[npc] = cnt[t, 0, p] + a
                    pr[npc] = cnt[t, 1, p] + b + 1
                    npc += 1
                    a += 1
                else:  # _RFP
                    a -= 1
                pos = p + 1
        # Evaluate from the back with the running maximum c.
        c = 0.0
        ap = 0.0
        for q in range(npc - 1, -1, -1):
            if pk[q] == 1:
                k = pl[q]
                v = (k + 1) / pr[q]
                if v > c:
                    c = v
                if k < nw:
                    ap += weights[k] * c
            else:
                s_val, c = _segment(pool, base, weights, t, pl[q], pr[q], pa[q], pb[q], c)
                ap += s_val
        per_t[t] = ap
        total += ap
    return total / thetas.size


@njit(cache=True, nogil=True, error_model="numpy")
def ap_of_list(det, best, best_iou, gt_diff, thetas, weights):
    """AP (mean over thresholds) of the detection list ``det`` in ``O(D)`` per threshold: the
    forward pass, and the obvious version of :func:`edited_ap` with no edits."""
    taken = np.zeros(gt_diff.size, dtype=np.bool_)
    vbuf = np.empty(det.size + 1, dtype=np.float64)
    nw = weights.size
    total = 0.0
    for t in range(thetas.size):
        theta = thetas[t]
        taken[:] = False
        m = 0
        r = 0
        for p in range(det.size):
            d = det[p]
            g = best[d]
            if g >= 0 and best_iou[d] >= theta:
                if gt_diff[g]:
                    continue
                if not taken[g]:
                    taken[g] = True
                    r += 1
                    m += 1
                    vbuf[m - 1] = m / r
                    continue
            r += 1
        run = 0.0
        ap = 0.0
        for k in range(m - 1, -1, -1):
            if vbuf[k] > run:
                run = vbuf[k]
            if k < nw:
                ap += weights[k] * run
        total += ap
    return total / thetas.size
