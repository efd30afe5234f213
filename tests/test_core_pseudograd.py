"""The pseudo-gradient: the fast algorithm equals the brute-force definition exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import detection_instances

from mapdet import ap_pseudo_gradient
from mapdet.core.apnms import ap_pseudo_gradient_multiclass, class_problem, solve_class
from mapdet.core.gradkernel import N_STATS
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.core.synthetic import proposal_like_outputs

BOX = [0.0, 0.0, 10.0, 10.0]


def _check_equal(inst, min_step):
    ap_fast, g_fast = ap_pseudo_gradient(**inst, min_step=min_step)
    ap_ref, g_ref = ap_pseudo_gradient_reference(**inst, min_step=min_step)
    assert (np.isnan(ap_fast) and np.isnan(ap_ref)) or abs(ap_fast - ap_ref) < 1e-9
    assert g_fast.shape == (len(inst["scores"]),)
    np.testing.assert_allclose(g_fast, g_ref, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(g_fast))


@settings(max_examples=250, deadline=None)
@given(detection_instances(max_windows=16), st.sampled_from([1e-3, 1e-2, 0.5]))
def test_fast_equals_reference(inst, min_step):
    _check_equal(inst, min_step)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.5, 0.7]))
def test_fast_equals_reference_on_proposal_clusters(seed, nms_iou):
    # Dense clusters of overlapping windows make long NMS cascades.
    o = proposal_like_outputs(num_images=2, windows_per_image=18, num_classes=1,
                              objects_per_image=(1, 3), image_size=(200, 150), seed=seed)
    inst = dict(scores=np.round(o.probs[:, 0], 2), boxes=o.boxes[:, 0], image_ids=o.image_ids,
                gt_boxes=o.gt_boxes, gt_image_ids=o.gt_image_ids, gt_difficult=o.gt_difficult,
                score_threshold=0.0, nms_iou=nms_iou)
    _check_equal(inst, 1e-3)


def test_tie_is_bounded_by_min_step():
    # Two windows on the object with tied scores: the one ranked second (index 1) is an FP
    # duplicate; moving it above index 0 (distance 0) keeps the AP, so no gradient there.
    # A lone FP tied with a TP: moving the TP up past it (distance 0) gains precision.
    scores = np.array([0.5, 0.5])
    boxes = np.array([[50, 50, 60, 60], BOX], dtype=float)  # FP first by index, then TP
    ap, g = ap_pseudo_gradient(scores, boxes, [0, 0], [BOX], [0], score_threshold=0.0,
                               min_step=1e-3)
    assert ap == pytest.approx(0.5)
    assert g[1] == pytest.approx((1.0 - 0.5) / (0.0 + 1e-3))  # up past the tie: AP 1
    assert g[0] == pytest.approx(-(1.0 - 0.5) / (0.0 + 1e-3))  # the FP moving down


def test_threshold_crossing():
    # A TP below the threshold: moving up past tau makes it a detection.
    ap, g = ap_pseudo_gradient([0.02], [BOX], [0], [BOX], [0], score_threshold=0.05,
                               min_step=0.01)
    assert ap == 0.0
    assert g[0] == pytest.approx(1.0 / (0.03 + 0.01))


def test_min_step_must_be_positive():
    for bad in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="min_step must be a finite number > 0"):
            ap_pseudo_gradient([0.5], [BOX], [0], [BOX], [0], min_step=bad)


def test_empty_and_undefined():
    ap, g = ap_pseudo_gradient([], np.zeros((0, 4)), [], [BOX], [0])
    assert ap == 0.0 and g.shape == (0,)
    ap, g = ap_pseudo_gradient([0.9], [BOX], [0], np.zeros((0, 4)), [])
    assert np.isnan(ap) and g.tolist() == [0.0]


def test_multiclass_equals_per_class_and_threads_agree():
    o = proposal_like_outputs(num_images=2, windows_per_image=150, num_classes=4, seed=3)
    aps1, g1 = ap_pseudo_gradient_multiclass(o.probs, o.boxes, o.image_ids, o.gt_boxes,
                                             o.gt_labels, o.gt_image_ids, o.gt_difficult,
                                             num_threads=1)
    aps2, g2 = ap_pseudo_gradient_multiclass(o.probs, o.boxes, o.image_ids, o.gt_boxes,
                                             o.gt_labels, o.gt_image_ids, o.gt_difficult,
                                             num_threads=3)
    np.testing.assert_array_equal(g1, g2)
    for c in range(4):
        sel = o.gt_labels == c
        ap, g = ap_pseudo_gradient(o.probs[:, c], o.boxes[:, c], o.image_ids, o.gt_boxes[sel],
                                   o.gt_image_ids[sel], o.gt_difficult[sel])
        assert (np.isnan(ap) and np.isnan(aps1[c])) or ap == aps1[c]
        np.testing.assert_array_equal(g, g1[:, c])


def test_grad_rows_restricts_the_gradient_only():
    o = proposal_like_outputs(num_images=2, windows_per_image=100, num_classes=3, seed=5)
    args = (o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
            o.gt_difficult)
    aps, g = ap_pseudo_gradient_multiclass(*args)
    aps_r, g_r = ap_pseudo_gradient_multiclass(*args, grad_rows=60)
    np.testing.assert_array_equal(aps, aps_r)
    np.testing.assert_array_equal(g[:60], g_r[:60])
    assert not g_r[60:].any()


def test_ascent_on_pseudo_gradient_raises_ap():
    o = proposal_like_outputs(num_images=2, windows_per_image=300, num_classes=1,
                              objects_per_image=(3, 5), seed=11)
    s = o.probs[:, 0].copy()
    args = (o.boxes[:, 0], o.image_ids, o.gt_boxes, o.gt_image_ids, o.gt_difficult)
    ap0, _ = ap_pseudo_gradient(s, *args)
    for _ in range(30):
        ap, g = ap_pseudo_gradient(s, *args)
        s = np.clip(s + 0.01 * g / max(np.abs(g).max(), 1e-12), 0, 1)
    assert ap_pseudo_gradient(s, *args)[0] > ap0


def test_release_needs_every_suppressor_gone():
    # y (a TP) is suppressed by two kept FPs h1, h2. Window i overlaps h1 and h2 but not y:
    # moving i above h1 suppresses both, which releases y: AP goes 0 -> 1/2.
    h1, h2 = [0, 0, 10, 10], [12, 0, 22, 10]
    y = [5, 0, 17, 3]
    i = [0, 3, 22, 10]
    boxes = np.array([h1, h2, y, i], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.5])
    kw = dict(score_threshold=0.0, nms_iou=0.1, min_step=1e-3)
    ap, g = ap_pseudo_gradient(scores, boxes, [0] * 4, [y], [0], **kw)
    ap_ref, g_ref = ap_pseudo_gradient_reference(scores, boxes, [0] * 4, [y], [0], **kw)
    assert ap == ap_ref == 0.0
    assert g[3] == pytest.approx(0.5 / (0.9 - 0.5 + 1e-3))
    np.testing.assert_allclose(g, g_ref, atol=1e-12)


def test_fp_window_above_a_tp_with_a_later_claimant_cannot_gain():
    # h: a TP; d: a later claimant of the same object (kept: IoU(h, d) < nu), an FP; b: a TP
    # on another object. i (below the threshold, an FP, overlapping h only) moved above h
    # suppresses h, and also s, the one window h alone suppresses; d takes the object:
    # [T, F, T] -> [F, T, T] loses. The kernel decides this without a cascade.
    obj1, obj2 = [0, 0, 10, 10], [50, 50, 60, 60]
    h, s_box, d, b, i = [2, 0, 12, 10], [4, 0, 14, 10], [-3, 0, 7, 10], obj2, [5, 0, 15, 10]
    boxes = np.array([h, s_box, d, b, i], dtype=float)
    scores = np.array([0.9, 0.7, 0.6, 0.5, 0.02])
    args = (scores, boxes, [0] * 5, [obj1, obj2], [0, 0])
    kw = dict(score_threshold=0.05, nms_iou=0.4, min_step=1e-3)
    assert ap_pseudo_gradient(*args, **kw)[0] == pytest.approx((1 + 2 / 3) / 2)
    for direction in ("nearest_improvement", "both_summed", "nearest_change"):
        _, g = ap_pseudo_gradient(*args, direction=direction, **kw)
        _, g_ref = ap_pseudo_gradient_reference(*args, direction=direction, **kw)
        np.testing.assert_allclose(g, g_ref, atol=1e-12)
        assert (g[4] < 0) if direction == "nearest_change" else g[4] == 0.0
    # [F, T, T]: 1/2, 2/3 -> AP 2/3, a change of -1/6 at distance 0.88.
    assert g[4] == pytest.approx((2 / 3 - (1 + 2 / 3) / 2) / (0.9 - 0.02 + 1e-3))


@pytest.mark.parametrize("i1_first", [True, False])
def test_recorded_cascade_is_reused_only_when_it_is_provably_the_same(i1_first):
    # h (kept, an FP) suppresses z (a TP on the object). Below the threshold: i1 and i3 (the
    # same box, FPs) overlap h but not z; i2 overlaps h and z. All three have kept
    # neighbours {h}. Placed above h, i1 (or i3) releases z; i2 suppresses z too. So i2 may
    # not reuse i1's cascade (z became kept and overlaps i2) but may reuse z's own (h
    # suppressed, z blocked by the moved window); i3 reuses i1's, value included.
    h, z = [0, 0, 10, 10], [4, 0, 14, 10]
    i1, i2 = [-4, 0, 6, 10], [2, 0, 12, 10]
    lows = [i1, i2] if i1_first else [i2, i1]
    boxes = np.array([h, z, *lows, i1], dtype=float)
    scores = np.array([0.9, 0.8, 0.01, 0.02, 0.03])
    args = (scores, boxes, [0] * 5, [z], [0])
    kw = dict(score_threshold=0.05, nms_iou=0.3, min_step=1e-3)
    p = class_problem(*args, None, match_iou=0.5, ap_method="area", **kw)
    stats = np.zeros(N_STATS, dtype=np.int64)
    ap, g = solve_class(p, None, stats)
    ap_ref, g_ref = ap_pseudo_gradient_reference(*args, **kw)
    assert ap == ap_ref == 0.0
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-12)
    assert g[2:].min() > 0  # each low window gains by releasing z or by being a TP itself
    # Cascades of windows not kept, run / reused: z's is run (h suppressed, z the moved
    # window). i1 cannot reuse it (z would be released) and runs its own; i2 cannot reuse
    # i1's (z released overlaps i2) but reuses z's; i3 reuses i1's. In either order: 2 / 2.
    assert list(stats[4:6]) == [2, 2]


@pytest.mark.parametrize("fp_on_top", [False, True])
def test_windows_that_cannot_change_the_ap_are_skipped(fp_on_top):
    # Image 0: a TP (0.9), the last TP. Image 1 has no object: a kept FP d1 (0.5), a window it
    # suppresses (0.4) and one below the threshold (0.02). Every state these reach differs
    # only below the last TP, so under the nearest improvement they are skipped (counted in
    # stats[6]) with pseudo-partial 0. With an FP above the TP in image 1 (0.95), that FP
    # gains by moving down and is not skipped; d1 still is (the other two then provably
    # release nothing and are skipped before that test).
    obj, far = [0, 0, 10, 10], [50, 50, 60, 60]
    boxes = [obj, far, [51, 50, 61, 60], [50, 51, 60, 61]]
    scores = [0.9, 0.5, 0.4, 0.02]
    img = [0, 1, 1, 1]
    if fp_on_top:
        boxes, scores, img = boxes + [[20, 20, 30, 30]], scores + [0.95], img + [1]
    args = (np.array(scores), np.array(boxes, dtype=float), img, [obj], [0])
    kw = dict(score_threshold=0.05, nms_iou=0.3, min_step=1e-3)
    for direction in ("nearest_improvement", "both_summed", "nearest_change"):
        p = class_problem(*args, None, match_iou=0.5, ap_method="area", direction=direction,
                          **kw)
        stats = np.zeros(N_STATS, dtype=np.int64)
        ap, g = solve_class(p, None, stats)
        ap_ref, g_ref = ap_pseudo_gradient_reference(*args, direction=direction, **kw)
        assert ap == pytest.approx(ap_ref)
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-12)
        assert stats[6] == (0 if direction == "nearest_change" else 1 if fp_on_top else 3)
        if fp_on_top:
            assert g[4] != 0  # the top FP gains by moving down


def test_window_below_the_last_tp_is_not_skipped_when_it_can_release_a_tp():
    # Image 1 has an object that no detection holds: its only match z (0.3) is suppressed by
    # an FP h (0.5). The last TP (image 0, 0.9) is above both, but a window i below the
    # threshold that overlaps h and not z, moved above h, releases z: a new TP.
    obj0, obj1 = [0, 0, 10, 10], [50, 50, 60, 60]
    h, z, i = [46, 50, 56, 60], [50, 50, 60, 60], [42, 50, 52, 60]
    args = (np.array([0.9, 0.5, 0.3, 0.02]), np.array([obj0, h, z, i], dtype=float),
            [0, 1, 1, 1], [obj0, obj1], [0, 1])
    kw = dict(score_threshold=0.05, nms_iou=0.3, min_step=1e-3)
    ap, g = ap_pseudo_gradient(*args, **kw)
    ap_ref, g_ref = ap_pseudo_gradient_reference(*args, **kw)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-12)
    assert g[3] > 0 and g[1] < 0  # i gains by entering above h; h by dropping below z


def test_counter_array_of_the_wrong_size_is_refused():
    # The kernel writes its counters without bounds checks: a short array would corrupt memory.
    p = class_problem([0.5], [BOX], [0], [BOX], [0], None, min_step=1e-3)
    with pytest.raises(ValueError, match="stats must be int64 of shape"):
        solve_class(p, None, np.zeros(4, dtype=np.int64))
