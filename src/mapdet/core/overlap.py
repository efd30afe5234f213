"""The NMS side of AP after NMS, compiled: IoU, greedy per-image NMS, the overlap graph and
the event-driven cascade that recomputes keep/suppress decisions after a local change.

Windows are integers ``0..N-1``; ``rank[w]`` is a candidate's place in the detection order
(score descending, index ascending). Two candidates of the same image are *neighbours* when
``IoU > nu``. Greedy NMS keeps a candidate iff no kept earlier neighbour exists.

Why the cascade is exact (docs/method.md, section 5): after a local change (a window removed
or a window placed above the others and kept), only windows whose decision may flip need to
be re-decided, in rank order. A window with ``k`` kept earlier neighbours can only be
released once all ``k`` are suppressed, so after the ``R``-th suppression only suppressed
later neighbours with ``base_cnt <= R`` are visited.

All functions are numba kernels (``nogil``: classes run in parallel threads). The private
helpers and those only kernels call are ``register_jitable``: compiled for their callers
without the Python and C wrappers a ``njit`` function gets (the wrappers of tuple arguments
are large: 0.1-0.4 s each of a fresh install's compile time); called from Python they run as
plain Python. Every kernel uses ``error_model="numpy"`` (no ZeroDivisionError paths): every
division is guarded or, in the branch-free IoU loops, meant to give NaN on a zero union.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import register_jitable

__all__ = ["CascadeScratch", "KeptGraph", "cascade", "group_by", "iou", "kept_graph", "nms_keep",
           "reset_after"]


class KeptGraph(NamedTuple):
    """The overlap lists :func:`cascade` walks (:func:`kept_graph`): three CSR pairs over the
    windows ``0..N-1`` (each ``ptr`` ``(N+1,)``)."""

    e_ptr: np.ndarray
    """With ``e_idx``: each window's kept earlier neighbours."""
    e_idx: np.ndarray
    lk_ptr: np.ndarray
    """With ``lk_idx``: a suppressed window's kept later neighbours, in rank order."""
    lk_idx: np.ndarray
    ls_ptr: np.ndarray
    """With ``ls_idx``: a kept window's later neighbours, in rank order, then stably sorted by
    their number of kept earlier neighbours."""
    ls_idx: np.ndarray


class CascadeScratch(NamedTuple):
    """The scratch state of :func:`cascade`, for ``N`` windows."""

    inq: np.ndarray
    """``(N,)`` bool: pushed on the heap (or blocked)."""
    chg: np.ndarray
    """``(N,)`` int8: 1 now kept, 2 now suppressed, 0 unchanged."""
    q: np.ndarray
    """``(5, N+1)`` int64, rows :data:`Q_KEY`, :data:`Q_VAL` (the heap), :data:`Q_PUSHED`,
    :data:`Q_CHANGED` and :data:`Q_BLOCKED`."""


#: Rows of :attr:`CascadeScratch.q`.
Q_KEY, Q_VAL, Q_PUSHED, Q_CHANGED, Q_BLOCKED = 0, 1, 2, 3, 4


@njit(cache=True, nogil=True, error_model="numpy")
def iou(boxes, a, b):
    """IoU of windows ``a`` and ``b`` of ``boxes (N, 4)`` xyxy (continuous convention)."""
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


@njit(cache=True, nogil=True, error_model="numpy")
def group_by(key, items, n_keys):
    """CSR grouping: ``items (K,)`` grouped by ``key[item]`` in ``0..n_keys-1``, stable.

    Returns ``(ptr (n_keys+1,), out (K,))``: group ``b`` is ``out[ptr[b]:ptr[b+1]]``, in the
    order the items came in."""
    ptr = np.zeros(n_keys + 1, dtype=np.int64)
    for k in range(items.size):
        ptr[key[items[k]] + 1] += 1
    for b in range(n_keys):
        ptr[b + 1] += ptr[b]
    fill = ptr[:-1].copy()
    out = np.empty(items.size, dtype=np.int64)
    for k in range(items.size):
        b = key[items[k]]
        out[fill[b]] = items[k]
        fill[b] += 1
    return ptr, out


@njit(cache=True, nogil=True, error_model="numpy")
def nms_keep(icand, iptr, boxes, nu, n):
    """Greedy NMS per image; ``icand[iptr[b]:iptr[b+1]]`` are image ``b``'s candidates in
    rank order. Returns ``kept (n,)`` bool."""
    kept = np.zeros(n, dtype=np.bool_)
    kept_list = np.empty(icand.size, dtype=np.int64)
    for b in range(iptr.size - 1):
        lo = iptr[b]
        top = lo
        for a in range(lo, iptr[b + 1]):
            w = icand[a]
            ok = True
            if nu < 1.0:
                for k in range(lo, top):
                    if iou(boxes, kept_list[k], w) > nu:
                        ok = False
                        break
            if ok:
                kept[w] = True
                kept_list[top] = w
                top += 1
    return kept


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _overlaps_kept(c, boxes, nk, ksoa, nu, flags):
    """``flags[j] = IoU(c, j-th kept window) > nu`` for ``j < nk``, the kept windows as
    columns of ``ksoa (5, K)`` (x1, y1, x2, y2, area). :func:`iou`'s arithmetic operation for
    operation (it is symmetric), so the same decisions; without branches (a zero union gives
    NaN, which compares False like :func:`iou`'s 0 for ``nu > 0``) the loop vectorises."""
    x1, y1, x2, y2 = boxes[c, 0], boxes[c, 1], boxes[c, 2], boxes[c, 3]
    area_c = (x2 - x1 + 0.0) * (y2 - y1 + 0.0)
    kx1, ky1, kx2, ky2, karea = ksoa[0], ksoa[1], ksoa[2], ksoa[3], ksoa[4]
    for j in range(nk):
        iw = max(min(kx2[j], x2) - max(kx1[j], x1) + 0.0, 0.0)
        ih = max(min(ky2[j], y2) - max(ky1[j], y1) + 0.0, 0.0)
        inter = iw * ih
        flags[j] = inter / (karea[j] + area_c - inter) > nu


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def _kept_pairs(icand, iptr, need, kept, boxes, nu, graph, base_cnt, fill, scratch):
    """Visit every (candidate, kept neighbour) pair of the needed images once. Count
    (``fill`` False: into ``ptr[w + 1]`` of the three lists, and ``base_cnt``) or write
    (``fill`` True: at ``idx[ptr[w]]``, advancing ``ptr[w]``) the edges of
    :func:`kept_graph`. ``scratch = (ksoa (5, K), kwin (K,), kpos (K,), flags (K,))`` for the
    largest number ``K`` of kept windows in an image."""
    (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx) = graph
    (ksoa, kwin, kpos, flags) = scratch
    for b in range(iptr.size - 1):
        if not need[b]:
            continue
        lo = iptr[b]
        m = iptr[b + 1] - lo
        nk = 0
        for a in range(m):
            w = icand[lo + a]
            if kept[w]:
                for c in range(4):
                    ksoa[c, nk] = boxes[w, c]
                ksoa[4, nk] = ((boxes[w, 2] - boxes[w, 0] + 0.0)
                               * (boxes[w, 3] - boxes[w, 1] + 0.0))
                kwin[nk] = w
                kpos[nk] = a
                nk += 1
        for a in range(m):
            c = icand[lo + a]
            _overlaps_kept(c, boxes, nk, ksoa, nu, flags)
            for j in range(nk):
                if not flags[j] or kpos[j] == a:
                    continue
                k = kwin[j]
                if kpos[j] < a:  # k kept above c: c suppressed by k
                    if fill:
                        e_idx[e_ptr[c]] = k
                        e_ptr[c] += 1
                        ls_idx[ls_ptr[k]] = c
                        ls_ptr[k] += 1
                    else:
                        e_ptr[c + 1] += 1
                        ls_ptr[k + 1] += 1
                        base_cnt[c] += 1
                elif fill:  # k kept below c (c is suppressed: kept windows do not overlap)
                    lk_idx[lk_ptr[c]] = k
                    lk_ptr[c] += 1
                else:
                    lk_ptr[c + 1] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def kept_graph(icand, iptr, need, kept, boxes, nu, n):
    """The overlap lists :func:`cascade` walks, for the images with ``need[b]``; windows of
    the other images get empty lists (nothing is ever asked about them).

    ``icand[iptr[b]:iptr[b+1]]`` are image ``b``'s candidates in rank order, ``kept (n,)``
    greedy NMS's decisions. Returns ``(graph, base_cnt)``: ``graph`` is three CSR pairs in
    a :class:`KeptGraph`, ``(e_ptr, e_idx)`` each window's kept earlier neighbours (there are
    ``base_cnt[w]`` of them), ``(lk_ptr, lk_idx)`` a suppressed window's kept later
    neighbours in rank order (what it suppresses once released) and ``(ls_ptr, ls_idx)`` a
    kept window's later neighbours (all suppressed, by it) in rank order, then stably sorted
    by ``base_cnt``. A cascade only suppresses kept windows and only releases suppressed
    ones, so no other list is ever read, and every pair involves a kept window:
    ``O(C K)`` IoUs per image (``C`` candidates, ``K`` kept), not ``O(C^2)``."""
    z = np.zeros(n + 1, dtype=np.int64)
    none = np.empty(0, dtype=np.int64)
    graph = KeptGraph(z, none, z.copy(), none, z.copy(), none)
    base_cnt = np.zeros(n, dtype=np.int64)
    if nu >= 1.0:
        return graph, base_cnt
    k_max = 0
    for b in range(iptr.size - 1):
        nk = 0
        for a in range(iptr[b], iptr[b + 1]):
            if kept[icand[a]]:
                nk += 1
        k_max = max(k_max, nk)
    scratch = (np.empty((5, k_max), dtype=np.float64), np.empty(k_max, dtype=np.int64),
               np.empty(k_max, dtype=np.int64), np.empty(k_max, dtype=np.bool_))
    count_only = n < 0  # a typed False: literal arguments would compile the pass twice
    _kept_pairs(icand, iptr, need, kept, boxes, nu, graph, base_cnt, count_only, scratch)
    (e_ptr, _, lk_ptr, _, ls_ptr, _) = graph
    for w in range(n):
        e_ptr[w + 1] += e_ptr[w]
        lk_ptr[w + 1] += lk_ptr[w]
        ls_ptr[w + 1] += ls_ptr[w]
    e_idx = np.empty(e_ptr[n], dtype=np.int64)
    lk_idx = np.empty(lk_ptr[n], dtype=np.int64)
    ls_idx = np.empty(ls_ptr[n], dtype=np.int64)
    # The write pass's cursors, in a graph's layout (one compile of _kept_pairs).
    fill = KeptGraph(e_ptr[:-1].copy(), e_idx, lk_ptr[:-1].copy(), lk_idx, ls_ptr[:-1].copy(),
                     ls_idx)
    _kept_pairs(icand, iptr, need, kept, boxes, nu, fill, base_cnt, not count_only, scratch)
    # Each kept window's list sorted by base_cnt (counting sort, stable; keys are small).
    tally = np.zeros(n + 2, dtype=np.int64)
    tmp = np.empty(ls_idx.size, dtype=np.int64)
    for w in range(n):
        lo, hi = ls_ptr[w], ls_ptr[w + 1]
        if hi - lo < 2:
            continue
        top = 0
        for e in range(lo, hi):
            k = base_cnt[ls_idx[e]]
            tally[k + 1] += 1
            top = max(top, k + 1)
        for k in range(top):
            tally[k + 1] += tally[k]
        for e in range(lo, hi):
            k = base_cnt[ls_idx[e]]
            tmp[lo + tally[k]] = ls_idx[e]
            tally[k] += 1
        for e in range(lo, hi):
            ls_idx[e] = tmp[e]
        tally[: top + 1] = 0
    return KeptGraph(e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx), base_cnt


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
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


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
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


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def cascade(seeds, n_seeds, n_events, extra, boxes, nu, rank, graph, base_cnt, base_kept, cs):
    """Re-run NMS decisions event by event after a local change; return the changes.

    Windows are processed in rank order; window ``y`` is kept iff it has no kept earlier
    neighbour in the new state (``now_kept(x) = base_kept[x] != (chg[x] != 0)``), plus
    ``extra`` when ``extra >= 0``: a window placed above every processed window and kept.
    Only windows whose decision may flip are processed: the ``seeds``, the kept later
    neighbours of a window that becomes kept, and, after the ``R``-th suppression event
    (``n_events`` already happened), the suppressed later neighbours with ``base_cnt <= R``.

    ``cs`` (:class:`CascadeScratch`: ``inq (N,) bool, chg (N,) int8, q (5, N+1) int64``) is scratch,
    the rows of ``q`` being the heap keys and values, the pushed windows, the changed ones and the
    *blocked* ones. Returns ``(n_changed, n_pushed, n_blocked)``; ``changed[:n_changed]`` (rank
    order) have ``chg = 1`` (now kept) or ``2`` (now suppressed); ``blocked[:n_blocked]`` are the
    windows ``extra`` kept from being pushed (it overlaps them) that would be kept but for ``extra``
    (their kept earlier neighbours in the base state all ended suppressed, and no window that became
    kept above them overlaps them). (They are marked in ``inq`` and listed among the pushed, so that
    :func:`reset_after` clears them.) Another ``extra'`` whose kept neighbours are the same seeds
    gives the same changes when it overlaps every blocked window and no window that became kept, and
    is not one of those (docs/method.md, section 5). Clear with
    :func:`reset_after`.
    """
    (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx) = graph
    (inq, chg, q) = cs
    hk, hv, pushed, changed = q[Q_KEY], q[Q_VAL], q[Q_PUSHED], q[Q_CHANGED]
    blocked = q[Q_BLOCKED]
    size = np.int64(0)  # typed: a literal 0 would compile the heap functions twice
    n_pushed = 0
    n_blocked = 0
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
        # Kept iff no kept earlier neighbour: those kept in the base state are the first
        # base_cnt[y] of its earlier list; the others can only be kept now if this cascade
        # released them, and those are in ``changed`` (all ranked above y).
        now_kept = not (extra >= 0 and iou(boxes, extra, y) > nu)
        if now_kept:
            lo = e_ptr[y]
            for e in range(lo, lo + base_cnt[y]):
                if chg[e_idx[e]] != 2:
                    now_kept = False
                    break
        if now_kept:
            for k in range(n_changed):
                x = changed[k]
                if chg[x] == 1 and iou(boxes, x, y) > nu:
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
            inq[z] = True
            pushed[n_pushed] = z
            n_pushed += 1
            if not now_kept and extra >= 0 and iou(boxes, extra, z) > nu:
                blocked[n_blocked] = z  # the extra window suppresses z whatever happens above
                n_blocked += 1
                continue
            size = _heap_push(hk, hv, size, rank[z], z)
    # Keep the blocked windows that would have been kept but for ``extra``: their kept
    # earlier neighbours (in the base state) all ended suppressed, and no window that became
    # kept above them overlaps them.
    # (The same test as for ``y`` above, written out twice on purpose: as one shared function,
    # even inlined, the heavier 2 x 2000 x 20 minibatch took 112 ms instead of 87 ms.)
    n_kept_blk = 0
    for k in range(n_blocked):
        z = blocked[k]
        lo = e_ptr[z]
        free = True
        for e in range(lo, lo + base_cnt[z]):
            if chg[e_idx[e]] != 2:
                free = False
                break
        if free:
            for c in range(n_changed):
                x = changed[c]
                if chg[x] == 1 and rank[x] < rank[z] and iou(boxes, x, z) > nu:
                    free = False
                    break
        if free:
            blocked[n_kept_blk] = z
            n_kept_blk += 1
    return n_changed, n_pushed, n_kept_blk


@register_jitable(error_model="numpy", no_cfunc_wrapper=True)
def reset_after(cs, n_pushed, n_changed):
    """Clear the scratch state ``cs`` touched by one :func:`cascade` call."""
    (inq, chg, q) = cs
    pushed, changed = q[Q_PUSHED], q[Q_CHANGED]
    for k in range(n_pushed):
        inq[pushed[k]] = False
    for k in range(n_changed):
        chg[changed[k]] = 0
