"""The direction variants of the pseudo-partial (``nearest_change``, ``both_summed``): the fast
kernel equals the brute-force definition, on the same awkward instances as the default."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import detection_instances

from mapdet import pseudo_gradient
from mapdet.core.apnms import ap_pseudo_gradient, ap_pseudo_gradient_multiclass
from mapdet.core.pseudograd import (
    BOTH_SUMMED,
    DIRECTIONS,
    NEAREST_CHANGE,
    NEAREST_IMPROVEMENT,
    check_direction,
    combine_slopes,
)
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.core.synthetic import proposal_like_outputs

VARIANTS = ["nearest_change", "both_summed"]


def _check_equal(inst, min_step, direction):
    ap_fast, g_fast = ap_pseudo_gradient(**inst, min_step=min_step, direction=direction)
    ap_ref, g_ref = ap_pseudo_gradient_reference(**inst, min_step=min_step, direction=direction)
    assert (np.isnan(ap_fast) and np.isnan(ap_ref)) or abs(ap_fast - ap_ref) < 1e-9
    np.testing.assert_allclose(g_fast, g_ref, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(g_fast))


@settings(max_examples=200, deadline=None)
@given(detection_instances(max_windows=16), st.sampled_from([1e-3, 0.5]),
       st.sampled_from(VARIANTS))
def test_variants_fast_equal_reference(inst, min_step, direction):
    _check_equal(inst, min_step, direction)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.7]), st.sampled_from(VARIANTS),
       st.sampled_from([0.5, (0.5, 0.75)]))
def test_variants_on_proposal_clusters(seed, nms_iou, direction, match_iou):
    o = proposal_like_outputs(num_images=2, windows_per_image=18, num_classes=1,
                              objects_per_image=(1, 3), image_size=(200, 150), seed=seed)
    inst = dict(scores=np.round(o.probs[:, 0], 2), boxes=o.boxes[:, 0], image_ids=o.image_ids,
                gt_boxes=o.gt_boxes, gt_image_ids=o.gt_image_ids, gt_difficult=o.gt_difficult,
                score_threshold=0.0, nms_iou=nms_iou, match_iou=match_iou)
    _check_equal(inst, 1e-3, direction)


@settings(max_examples=40, deadline=None)
@given(detection_instances(max_windows=14), st.integers(0, 14), st.sampled_from(VARIANTS))
def test_variants_with_memory_windows(inst, k, direction):
    n = len(inst["scores"])
    k = min(k, n)
    labels = np.zeros(len(inst["gt_boxes"]), dtype=np.int64)
    aps, g = ap_pseudo_gradient_multiclass(
        np.asarray(inst["scores"])[:, None], inst["boxes"], inst["image_ids"], inst["gt_boxes"],
        labels, inst["gt_image_ids"], inst["gt_difficult"],
        score_threshold=inst["score_threshold"], nms_iou=inst["nms_iou"],
        match_iou=inst["match_iou"], ap_method=inst["ap_method"], grad_rows=k, num_threads=1,
        direction=direction)
    ap_ref, g_ref = ap_pseudo_gradient_reference(**inst, direction=direction)
    assert (np.isnan(ap_ref) and np.isnan(aps[0])) or abs(aps[0] - ap_ref) < 1e-9
    np.testing.assert_allclose(g[:k, 0], g_ref[:k], rtol=0, atol=1e-9)
    assert not g[k:, 0].any()


def test_summed_is_up_minus_down_of_the_default_slopes():
    o = proposal_like_outputs(num_images=2, windows_per_image=60, num_classes=1, seed=2)
    args = (np.round(o.probs[:, 0], 2), o.boxes[:, 0], o.image_ids, o.gt_boxes, o.gt_image_ids,
            o.gt_difficult)
    _, g = ap_pseudo_gradient(*args)
    _, g_sum = ap_pseudo_gradient(*args, direction="both_summed")
    # Where the default is 0 no direction improves, so the sum is 0 too; where it is not 0,
    # the sum has the same sign and is no larger (the other direction's slope is subtracted).
    assert not g_sum[g == 0].any()
    assert np.all(g_sum * g >= 0) and np.all(np.abs(g_sum) <= np.abs(g) + 1e-12)


def test_nearest_change_sees_a_loss_the_default_ignores():
    # An FP ranked below the only TP: moving it up past the TP halves the AP. Nearest
    # improvement: down changes nothing, up only loses: 0. Nearest change: the loss up, so
    # the pseudo-partial is negative.
    box = [0.0, 0.0, 10.0, 10.0]
    scores = np.array([0.9, 0.5])
    boxes = np.array([box, [50, 50, 60, 60]], dtype=float)
    kw = dict(score_threshold=0.0, min_step=0.1)
    _, g = ap_pseudo_gradient(scores, boxes, [0, 0], [box], [0], **kw)
    _, g_ch = ap_pseudo_gradient(scores, boxes, [0, 0], [box], [0], direction="nearest_change",
                                 **kw)
    assert g[1] == 0.0
    assert g_ch[1] == pytest.approx((0.5 - 1.0) / (0.4 + 0.1))


def test_combine_rules_and_tie():
    assert combine_slopes(1.0, 2.0, "both_summed") == -1.0
    assert combine_slopes(-1.0, 1.0, "nearest_change") == -1.0  # a tie: the up estimate
    assert combine_slopes(0.5, -2.0, "nearest_change") == 2.0  # down loses 2: derivative +2
    assert combine_slopes(0.0, 0.0, "nearest_change") == 0.0
    f = lambda x: 1.0 if x[0] < 0 else (0.0 if x[0] < 1 else -5.0)  # noqa: E731
    _, g = pseudo_gradient(f, [0.5], [np.array([0.0, 1.0])], min_step=0.5,
                           direction="nearest_change")
    assert g[0] == pytest.approx(-5.0)  # up: -5 over 1.0; down: +1 over 1.0 (derivative -1)


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction must be one of"):
        ap_pseudo_gradient([0.5], [[0, 0, 1, 1]], [0], [[0, 0, 1, 1]], [0], direction="up")
    assert DIRECTIONS[0] == "nearest_improvement"


def test_direction_codes_name_the_rules():
    """The codes the kernels read and the names are one table: code ``c`` is DIRECTIONS[c]."""
    codes = {"nearest_improvement": NEAREST_IMPROVEMENT, "nearest_change": NEAREST_CHANGE,
             "both_summed": BOTH_SUMMED}
    assert sorted(codes.values()) == list(range(len(DIRECTIONS)))
    for name, code in codes.items():
        assert DIRECTIONS[code] == name
        assert check_direction(name) == code
