"""The benchmark's instance families (mapdet.core.synthetic.one_class_family), and the fast
pseudo-gradient against the brute force on a small draw of each."""

from __future__ import annotations

import numpy as np
import pytest

from mapdet.core.apnms import ap_pseudo_gradient
from mapdet.core.boxes import box_iou
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.core.synthetic import FAMILIES, one_class_family, proposal_like_outputs

COCO = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_shapes_and_determinism(family):
    a = one_class_family(family, 6, 50, seed=3)
    b = one_class_family(family, 6, 50, seed=3)
    scores, boxes, image_ids, gt_boxes, gt_image_ids, gt_difficult = a
    assert scores.shape == (300,) and boxes.shape == (300, 4) and image_ids.shape == (300,)
    assert np.array_equal(np.bincount(image_ids), np.full(6, 50))
    assert gt_boxes.shape == (len(gt_image_ids), 4) and gt_difficult.dtype == bool
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (gt_boxes[:, 2:] > gt_boxes[:, :2]).all()
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_families_are_what_they_say():
    scores, boxes, image_ids, gt, gt_img, diff = one_class_family("jittered", 20, seed=1)
    assert np.array_equal(np.bincount(gt_img), np.full(20, 3)) and not diff.any()
    near = np.concatenate([np.arange(j * 50, j * 50 + 25) for j in range(20)])
    dist = [np.abs(boxes[i] - gt[gt_img == image_ids[i]]).max(1).min() for i in near]
    assert np.median(dist) < 20  # N(0, 8 px) around a ground-truth box
    assert scores[near].mean() > 0.6 > 0.3 > np.delete(scores, near).mean()  # Beta(4,2), (1,4)
    _, _, _, gt, gt_img, _ = one_class_family("crowded", 10, seed=1)
    assert np.array_equal(np.bincount(gt_img), np.full(10, 12))
    overlap = [np.triu(box_iou(gt[gt_img == j], gt[gt_img == j]), 1).max() for j in range(10)]
    assert min(overlap) > 0.2  # objects overlap each other in every image
    same = one_class_family("proposal-like", 4, seed=7)
    o = proposal_like_outputs(4, 50, 1, objects_per_image=(3, 4), seed=7)
    assert np.array_equal(same[0], o.probs[:, 0]) and np.array_equal(same[1], o.boxes[:, 0])
    with pytest.raises(ValueError, match="family must be one of"):
        one_class_family("dense", 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("match_iou", [0.5, COCO], ids=["iou0.5", "coco"])
def test_fast_equals_brute_force_on_each_family(family, match_iou):
    inputs = one_class_family(family, 2, 16, seed=16)
    ap, grad = ap_pseudo_gradient(*inputs, match_iou=match_iou)
    ap_ref, grad_ref = ap_pseudo_gradient_reference(*inputs, match_iou=match_iou)
    assert ap == pytest.approx(ap_ref, abs=1e-12)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-9, rtol=0)
    assert np.count_nonzero(grad) > 0
