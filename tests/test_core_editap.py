"""The edited-list AP (O(E log M) per threshold) equals the list built and labelled from
scratch: removals, insertions, a moved window, holders changing hands, ignored (difficult)
matches, several IoU thresholds, every AP flavour, and the direct-sum fallback."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.core.ap import ap_weights
from mapdet.core.editap import (
    COUNT,
    INS_GAP,
    INS_SEC,
    INS_W,
    REM,
    ap_of_list,
    build_base,
    edited_ap,
    make_edits,
    make_pool,
    make_scratch,
)
from mapdet.core.reference import edited_ap_reference


@st.composite
def edit_instances(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_gt = draw(st.integers(1, 6))
    n_win = draw(st.integers(1, 40))
    # Few ground truths, many claimants: holders change hands often.
    best = rng.integers(-1, n_gt, n_win)
    best_iou = rng.choice([0.3, 0.5, 0.6, 0.75, 0.9, 1.0], n_win)
    best_iou[best < 0] = 0.0
    gt_diff = rng.uniform(size=n_gt) < draw(st.sampled_from([0.0, 0.3]))
    if gt_diff.all():
        gt_diff[0] = False
    d_n = draw(st.integers(0, n_win))
    perm = rng.permutation(n_win)
    det = np.sort(perm[:d_n]).astype(np.int64)  # any fixed order will do
    others = perm[d_n:]
    n_rem = draw(st.integers(0, min(d_n, 5)))
    rem = np.sort(rng.choice(d_n, n_rem, replace=False)).astype(np.int64) if n_rem else \
        np.zeros(0, dtype=np.int64)
    n_ins = draw(st.integers(0, min(others.size, 5)))
    ins_w = others[:n_ins].astype(np.int64)
    ins_gap = rng.integers(0, d_n + 1, n_ins).astype(np.int64)
    ins_sec = rng.permutation(n_ins).astype(np.int64)
    mv = int(others[n_ins]) if others.size > n_ins and draw(st.booleans()) else -1
    mv_gap = int(rng.integers(0, d_n + 1))
    thetas = np.array(draw(st.sampled_from([[0.5], [0.5, 0.75], list(np.linspace(0.5, 0.95, 10))])))
    method = draw(st.sampled_from(["area", "voc07", "r101"]))
    budget = draw(st.sampled_from([0, 1 << 20]))  # 0: a 9-slot pool, the rest direct sums
    return dict(best=best, best_iou=best_iou, gt_diff=gt_diff, det=det, rem=rem, ins_w=ins_w,
                ins_gap=ins_gap, ins_sec=ins_sec, mv=mv, mv_gap=mv_gap, thetas=thetas,
                weights=ap_weights(int((~gt_diff).sum()), method), budget=budget)


def _fast(x, pool=None, per_t=None):
    """``(AP, pool)``; ``per_t`` (if given) receives the per-threshold APs."""
    base = build_base(x["det"], x["best"], x["best_iou"], x["gt_diff"], x["thetas"])
    if pool is None:
        pool = make_pool(x["thetas"].size, max(1, base[2][:, 0, -1].max()), x["budget"])
    edits = make_edits(x["det"].size, 16)
    ed, removed = edits
    ed[REM, : x["rem"].size] = x["rem"]
    removed[x["rem"]] = True
    k = x["ins_w"].size
    ed[INS_W, :k], ed[INS_GAP, :k], ed[INS_SEC, :k] = x["ins_w"], x["ins_gap"], x["ins_sec"]
    ed[COUNT, :2] = [x["rem"].size, k]
    gt = (x["best"], x["best_iou"], x["gt_diff"])
    if per_t is None:
        per_t = np.empty(x["thetas"].size)
    return edited_ap(base, pool, edits, x["mv"], x["mv_gap"], gt, x["weights"], x["thetas"],
                     make_scratch(16), per_t), pool


def _reference(x, thetas=None):
    inserts = [(g, s, w) for g, s, w in zip(x["ins_gap"], x["ins_sec"], x["ins_w"], strict=True)]
    if x["mv"] >= 0:
        inserts.append((x["mv_gap"], -1, x["mv"]))
    return edited_ap_reference(x["det"], x["rem"], inserts, x["best"], x["best_iou"],
                               x["gt_diff"], x["thetas"] if thetas is None else thetas,
                               x["weights"])


@settings(max_examples=400, deadline=None)
@given(edit_instances())
def test_edited_ap_equals_the_list_built_from_scratch(x):
    per_t = np.full(x["thetas"].size, np.nan)
    fast, pool = _fast(x, per_t=per_t)
    assert abs(fast - _reference(x)) < 1e-12
    # Each threshold's AP (what the multi-threshold walk bounds) is that threshold's own AP,
    # and the value returned is their mean in order.
    for t, theta in enumerate(x["thetas"]):
        assert abs(per_t[t] - _reference(x, np.array([theta]))) < 1e-12
    assert fast == sum(per_t.tolist()) / per_t.size
    # The same pool, reused by a second query, gives the same answer.
    again, _ = _fast(x, pool)
    assert abs(again - fast) < 1e-12


@settings(max_examples=100, deadline=None)
@given(edit_instances())
def test_no_edits_is_the_forward_ap(x):
    x = dict(x, rem=x["rem"][:0], ins_w=x["ins_w"][:0], ins_gap=x["ins_gap"][:0],
             ins_sec=x["ins_sec"][:0], mv=-1)
    fast, _ = _fast(x)
    direct = ap_of_list(x["det"], x["best"], x["best_iou"], x["gt_diff"], x["thetas"],
                        x["weights"])
    assert abs(fast - direct) < 1e-12
    assert abs(fast - _reference(x)) < 1e-12


def test_fallback_is_used_and_exact():
    # A long list, shifts beyond SHIFT_RANGE (8 removals in a row) and a 9-slot pool: some
    # segments are direct sums.
    rng = np.random.default_rng(0)
    n = 400
    best = rng.integers(0, 60, n)
    best_iou = rng.choice([0.4, 0.6], n)
    x = dict(best=best, best_iou=best_iou, gt_diff=np.zeros(60, bool),
             det=np.arange(300, dtype=np.int64), rem=np.array([3, *range(50, 58), 120, 200]),
             ins_w=np.arange(300, 305), ins_gap=np.array([0, 10, 60, 61, 250]),
             ins_sec=np.arange(5), mv=310, mv_gap=7, thetas=np.array([0.5]),
             weights=ap_weights(60, "area"), budget=0)
    fast, pool = _fast(x)
    assert abs(fast - _reference(x)) < 1e-12
    assert pool[4][2] > 0  # direct sums happened
    assert pool[4][3] > pool[4][2]  # and table queries
