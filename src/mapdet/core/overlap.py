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

All functions are numba kernels (``nogil``: classes run in parallel threads).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cascade", "cascade_graph", "group_by", "iou", "later_neighbours", "nms_keep",
           "reset_after"]


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, error_model="numpy")
def _overlaps_after(a, m, soa, nu, flags):
    """``flags[c] = IoU(a, c) > nu`` for ``c`` in ``a+1..m-1``, the image's candidates in rank
    order as columns of ``soa (5, m)`` (x1, y1, x2, y2, area). The arithmetic is
    :func:`iou`'s, operation for operation, so the decisions are the same; without branches
    (a zero union gives NaN, which compares False like :func:`iou`'s 0 for ``nu > 0``) the
    loop vectorises."""
    x1, y1, x2, y2, area = soa[0], soa[1], soa[2], soa[3], soa[4]
    ax1, ay1, ax2, ay2, area_a = x1[a], y1[a], x2[a], y2[a], area[a]
    for c in range(a + 1, m):
        iw = max(min(ax2, x2[c]) - max(ax1, x1[c]) + 0.0, 0.0)
        ih = max(min(ay2, y2[c]) - max(ay1, y1[c]) + 0.0, 0.0)
        inter = iw * ih
        flags[c] = inter / (area_a + area[c] - inter) > nu


@njit(cache=True, nogil=True)
def _neighbour_pass(icand, iptr, need, boxes, nu, cnt, idx, fill, soa, flags):
    """Visit every neighbour pair of the needed images once: count (``fill`` False) into
    ``cnt[w + 1]`` or write (``fill`` True) at ``idx[cnt[w]]``, advancing ``cnt[w]``.
    ``soa``, ``flags``: scratch for the largest image (:func:`_overlaps_after`)."""
    for b in range(iptr.size - 1):
        if not need[b]:
            continue
        lo = iptr[b]
        m = iptr[b + 1] - lo
        for k in range(m):
            w = icand[lo + k]
            for c in range(4):
                soa[c, k] = boxes[w, c]
            soa[4, k] = (boxes[w, 2] - boxes[w, 0] + 0.0) * (boxes[w, 3] - boxes[w, 1] + 0.0)
        for a in range(m - 1):
            _overlaps_after(a, m, soa, nu, flags)
            wa = icand[lo + a]
            if fill:
                for c in range(a + 1, m):
                    if flags[c]:
                        idx[cnt[wa]] = icand[lo + c]
                        cnt[wa] += 1
            else:
                k = 0
                for c in range(a + 1, m):
                    k += flags[c]
                cnt[wa + 1] += k


@njit(cache=True, nogil=True)
def later_neighbours(icand, iptr, need, boxes, nu, n):
    """Overlap graph of the images with ``need[b]``: for each window its later neighbours
    (same image, ``IoU > nu``) in rank order, as CSR ``(ptr (n+1,), idx (E,))``. Windows of
    the other images get no edges (nothing is ever asked about them)."""
    ptr = np.zeros(n + 1, dtype=np.int64)
    idx = np.empty(0, dtype=np.int64)
    if nu >= 1.0:
        return ptr, idx
    m_max = 0
    for b in range(iptr.size - 1):
        m_max = max(m_max, iptr[b + 1] - iptr[b])
    soa = np.empty((5, m_max), dtype=np.float64)
    flags = np.empty(m_max, dtype=np.bool_)
    count_only = n < 0  # a typed False: literal arguments would compile the pass twice
    _neighbour_pass(icand, iptr, need, boxes, nu, ptr, idx, count_only, soa, flags)
    for w in range(n):
        ptr[w + 1] += ptr[w]
    idx = np.empty(ptr[n], dtype=np.int64)
    pos = ptr[:-1].copy()
    _neighbour_pass(icand, iptr, need, boxes, nu, pos, idx, not count_only, soa, flags)
    return ptr, idx


@njit(cache=True, nogil=True)
def cascade_graph(nb_ptr, nb_idx, base_kept, base_cnt, n):
    """The lists :func:`cascade` walks, as three CSR pairs in one tuple: the *kept* earlier
    neighbours of each window (``base_cnt[y]`` of them; kept in the base state), the later
    neighbours of each suppressed window that are kept (what a released window suppresses),
    and the later neighbours of each kept window (all suppressed, by it), sorted by
    ``base_cnt`` ascending (stable). A cascade only suppresses kept windows and only releases
    suppressed ones, so no other list is ever read; the lists of the other kind are empty."""
    e_ptr = np.zeros(n + 1, dtype=np.int64)
    lk_ptr = np.zeros(n + 1, dtype=np.int64)
    ls_ptr = np.zeros(n + 1, dtype=np.int64)
    for w in range(n):
        lo, hi = nb_ptr[w], nb_ptr[w + 1]
        if base_kept[w]:
            ls_ptr[w + 1] = hi - lo
            for e in range(lo, hi):
                e_ptr[nb_idx[e] + 1] += 1
        else:
            for e in range(lo, hi):
                if base_kept[nb_idx[e]]:
                    lk_ptr[w + 1] += 1
    for w in range(n):
        e_ptr[w + 1] += e_ptr[w]
        lk_ptr[w + 1] += lk_ptr[w]
        ls_ptr[w + 1] += ls_ptr[w]
    e_idx = np.empty(e_ptr[n], dtype=np.int64)
    lk_idx = np.empty(lk_ptr[n], dtype=np.int64)
    ls_idx = np.empty(ls_ptr[n], dtype=np.int64)
    e_pos = e_ptr[:-1].copy()
    tally = np.zeros(n + 2, dtype=np.int64)
    for w in range(n):
        lo, hi = nb_ptr[w], nb_ptr[w + 1]
        if not base_kept[w]:
            k = lk_ptr[w]
            for e in range(lo, hi):
                if base_kept[nb_idx[e]]:
                    lk_idx[k] = nb_idx[e]
                    k += 1
            continue
        for e in range(lo, hi):
            y = nb_idx[e]
            e_idx[e_pos[y]] = w
            e_pos[y] += 1
        # Its suppressed list, sorted by base_cnt (counting sort, stable; keys are small).
        out = ls_ptr[w]
        if hi - lo < 2:
            for e in range(lo, hi):
                ls_idx[out + e - lo] = nb_idx[e]
            continue
        top = 0
        for e in range(lo, hi):
            k = base_cnt[nb_idx[e]]
            tally[k + 1] += 1
            top = max(top, k + 1)
        for k in range(top):
            tally[k + 1] += tally[k]
        for e in range(lo, hi):
            k = base_cnt[nb_idx[e]]
            ls_idx[out + tally[k]] = nb_idx[e]
            tally[k] += 1
        tally[: top + 1] = 0
    return (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx)


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
def cascade(seeds, n_seeds, n_events, extra, boxes, nu, rank, graph, base_cnt, base_kept, cs):
    """Re-run NMS decisions event by event after a local change; return the changes.

    Windows are processed in rank order; window ``y`` is kept iff it has no kept earlier
    neighbour in the new state (``now_kept(x) = base_kept[x] != (chg[x] != 0)``), plus
    ``extra`` when ``extra >= 0``: a window placed above every processed window and kept.
    Only windows whose decision may flip are processed: the ``seeds``, the kept later
    neighbours of a window that becomes kept, and, after the ``R``-th suppression event
    (``n_events`` already happened), the suppressed later neighbours with ``base_cnt <= R``.

    ``cs = (inq (N,) bool, chg (N,) int8, q (5, N+1) int64)`` is scratch, the rows of ``q``
    being the heap keys and values, the pushed windows, the changed ones and the *blocked*
    ones. Returns ``(n_changed, n_pushed, n_blocked)``; ``changed[:n_changed]`` (rank order)
    have ``chg = 1`` (now kept) or ``2`` (now suppressed); ``blocked[:n_blocked]`` are the
    windows ``extra`` kept from being pushed (it overlaps them) that would be kept but for
    ``extra`` (their kept earlier neighbours in the base state all ended suppressed, and no
    window that became kept above them overlaps them). (They are marked in ``inq`` and listed
    among the pushed, so that
    :func:`reset_after` clears them.) Another ``extra'`` whose kept neighbours are the same
    seeds gives the same changes when it overlaps every blocked window and no window that
    became kept, and is not one of those (docs/method.md, section 5). Clear with
    :func:`reset_after`.
    """
    (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx) = graph
    (inq, chg, q) = cs
    hk, hv, pushed, changed, blocked = q[0], q[1], q[2], q[3], q[4]
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


@njit(cache=True, nogil=True)
def reset_after(cs, n_pushed, n_changed):
    """Clear the scratch state ``cs`` touched by one :func:`cascade` call."""
    (inq, chg, q) = cs
    pushed, changed = q[2], q[3]
    for k in range(n_pushed):
        inq[pushed[k]] = False
    for k in range(n_changed):
        chg[changed[k]] = 0
