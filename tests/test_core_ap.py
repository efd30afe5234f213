"""AP, NMS and the detection function: hand-computed cases, fast == reference, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import detection_instances

from mapdet import ap_after_nms, ap_pseudo_gradient
from mapdet.core.ap import ap_from_labels, ap_weights, average_precision
from mapdet.core.apnms import ap_pseudo_gradient_multiclass
from mapdet.core.boxes import box_iou
from mapdet.core.nms import greedy_nms
from mapdet.core.reference import ap_after_nms_reference

BOX = [0.0, 0.0, 10.0, 10.0]


def _same(a, b):
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-12


def test_area_ap_hand_computed():
    # Ranked TP, FP, TP with 2 positives: precisions 1, 1/2, 2/3 -> (1 + 2/3) / 2.
    labels = np.array([1, 0, 1])
    assert ap_from_labels(labels, npos=2) == pytest.approx((1 + 2 / 3) / 2)
    # The monotone envelope lifts an earlier, lower precision: FP, TP, TP with 2 positives:
    # precisions 1/2, 2/3 -> both TPs read 2/3.
    assert ap_from_labels(np.array([0, 1, 1]), npos=2) == pytest.approx(2 / 3)


def test_voc07_hand_computed():
    # One TP of two positives at rank 1: recall 0.5, precision 1. Points t = 0..0.5 (6 of 11)
    # read precision 1, the others 0.
    assert ap_from_labels(np.array([1]), 2, ap_method="voc07") == pytest.approx(6 / 11)
    # r101: t = 0..0.5 (51 of 101 points).
    assert ap_from_labels(np.array([1]), 2, ap_method="r101") == pytest.approx(51 / 101)


def test_weights_sum_to_one_when_every_positive_is_found():
    for npos in (1, 3, 7, 10):
        for method in ("area", "voc07", "r101"):
            assert ap_weights(npos, method).sum() == pytest.approx(1.0)


def test_matching_rules():
    gt = np.array([BOX, [20, 0, 30, 10]], dtype=float)
    # Duplicate on gt 0 is an FP; a detection on a difficult gt is ignored.
    scores = np.array([0.9, 0.8, 0.7])
    boxes = np.array([BOX, BOX, [20, 0, 30, 10]], dtype=float)
    ap = average_precision(scores, boxes, [0, 0, 0], gt, [0, 0], [False, True])
    assert ap == pytest.approx(1.0)  # TP, then FP after every TP, ignored one
    # The same with the gt not difficult: TP FP TP over 2 positives.
    ap = average_precision(scores, boxes, [0, 0, 0], gt, [0, 0], [False, False])
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    # Other image: no match.
    assert average_precision([0.9], [BOX], [1], gt[:1], [0]) == 0.0


def test_iou_exactly_at_match_threshold_is_a_match():
    half = [0.0, 0.0, 10.0, 5.0]  # IoU with BOX = 50 / 100
    assert box_iou(np.array([half]), np.array([BOX]))[0, 0] == 0.5
    assert average_precision([1.0], [half], [0], [BOX], [0], match_iou=0.5) == 1.0


def test_nms_threshold_is_strict_and_per_image():
    boxes = np.array([BOX, [0, 0, 10, 5], [0, 0, 10, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    # IoU(0, 1) = 0.5: not > 0.5, kept; box 2 is box 0 again but in another image.
    keep = greedy_nms(scores, boxes, np.array([0, 0, 1]), score_threshold=0.0, nms_iou=0.5)
    assert keep.tolist() == [0, 1, 2]
    keep = greedy_nms(scores, boxes, np.array([0, 0, 0]), score_threshold=0.0, nms_iou=0.3)
    assert keep.tolist() == [0]


def test_ties_ordered_by_index():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)
    keep = greedy_nms(np.array([0.5, 0.5]), boxes, np.zeros(2, int), score_threshold=0.0,
                      nms_iou=0.3)
    assert keep.tolist() == [0]


def test_threshold_is_strict():
    assert ap_after_nms([0.05], [BOX], [0], [BOX], [0], score_threshold=0.05) == 0.0
    assert ap_after_nms([0.0501], [BOX], [0], [BOX], [0], score_threshold=0.05) == 1.0


def test_empty_inputs():
    empty = np.zeros((0, 4))
    assert ap_after_nms([], empty, [], [BOX], [0]) == 0.0
    assert np.isnan(ap_after_nms([], empty, [], empty, []))
    assert np.isnan(ap_after_nms([0.9], [BOX], [0], [BOX], [0], [True]))


def test_several_thresholds_average():
    det = [0.0, 0.0, 10.0, 8.0]  # IoU 0.8 with BOX
    thresholds = np.linspace(0.5, 0.95, 10)
    ap = ap_after_nms([0.9], [det], [0], [BOX], [0], match_iou=thresholds)
    assert ap == pytest.approx(np.mean(thresholds <= 0.8 + 1e-12))


@settings(max_examples=300, deadline=None)
@given(detection_instances(max_windows=25))
def test_fast_forward_equals_reference(inst):
    assert _same(ap_after_nms(**inst), ap_after_nms_reference(**inst))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores=[np.nan, 0.5, np.inf]), "scores contains 1 NaN and 1 infinite"),
        (dict(boxes=[[0, 0, 1, 1]] * 2), "boxes has 2 rows, expected 3"),
        (dict(boxes=[[0, 0, 1, 1], [5, 0, 1, 1], [0, 0, 1, 1]]), "x2 < x1 or y2 < y1"),
        (dict(image_ids=[0, 0]), "image_ids has 2 entries"),
        (dict(ap_method="coco"), "ap_method must be one of ['area', 'voc07', 'r101']"),
        (dict(gt_image_ids=[0, 0]), "gt_image_ids has 2 entries"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    args = dict(scores=[0.9, 0.5, 0.3], boxes=[BOX] * 3, image_ids=[0, 0, 0], gt_boxes=[BOX],
                gt_image_ids=[0])
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        ap_after_nms(**args)
    assert message in str(err.value)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), [0.5, 1.2]])
def test_iou_thresholds_outside_unit_interval_are_refused(bad):
    s, b, ids = np.array([0.9]), np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([0])
    gt = np.array([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="match_iou must be in"):
        ap_after_nms(s, b, ids, gt, [0], match_iou=bad)
    if np.ndim(bad) == 0:
        with pytest.raises(ValueError, match="nms_iou must be in"):
            ap_pseudo_gradient(s, b, ids, gt, [0], nms_iou=bad)


def test_fractional_ids_are_refused_not_truncated():
    s, b = np.array([0.9, 0.8]), np.array([[0.0, 0.0, 1.0, 1.0]] * 2)
    gt = np.array([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="image_ids must be integers, got 0.5"):
        ap_after_nms(s, b, [0, 0.5], gt, [0])
    with pytest.raises(ValueError, match="gt_image_ids must be integers"):
        ap_pseudo_gradient(s, b, [0, 1], gt, [1.5])
    with pytest.raises(ValueError, match="gt_labels must be integers"):
        ap_pseudo_gradient_multiclass(s[:, None], b, [0, 1], gt, [0.2], [0])
    # integral floats are exact and accepted
    assert ap_after_nms(s, b, np.array([0.0, 1.0]), gt, np.array([0.0])) == 1.0
