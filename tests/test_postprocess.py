"""Test-time detection: threshold, per-class NMS, max-per-image, clipping, core agreement."""

import numpy as np
import torch

from mapdet.core.nms import greedy_nms
from mapdet.models.postprocess import class_specific_boxes, detect

ROIS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [1.0, 0.0, 11.0, 10.0],  # IoU 9/11 with RoI 0
        [50.0, 50.0, 60.0, 60.0],
    ]
)


def _probs(fg, dtype=torch.float32):
    """``fg (R, K)`` foreground probabilities -> ``(R, K+1)`` with background first."""
    fg = torch.as_tensor(fg, dtype=dtype)
    return torch.cat([1 - fg.sum(1, keepdim=True), fg], dim=1)


def _zero_deltas(r, k):
    return torch.zeros(r, k + 1, 4)


def test_threshold_is_strict():
    probs = _probs([[0.05, 0.0], [0.0, 0.0], [0.06, 0.0]], dtype=torch.float64)
    out = detect(probs, _zero_deltas(3, 2), ROIS, (100, 100))
    assert out["labels"].tolist() == [0]
    torch.testing.assert_close(out["boxes"], ROIS[2:])
    none = detect(probs, _zero_deltas(3, 2), ROIS, (100, 100), score_threshold=0.9)
    assert none["boxes"].shape == (0, 4) and none["labels"].dtype == torch.int64


def test_threshold_compared_in_float64_like_the_core():
    # float32(0.05) = 0.0500000007 > 0.05: a candidate for core.nms, so here too.
    probs = _probs([[0.05]], dtype=torch.float32)
    out = detect(probs, _zero_deltas(1, 1), ROIS[:1], (100, 100))
    assert out["labels"].tolist() == [0]


def test_nms_is_per_class():
    # RoIs 0 and 1 overlap: suppressed within class 0, but not across classes 0 and 1.
    probs = _probs([[0.6, 0.0], [0.3, 0.5], [0.0, 0.0]])
    out = detect(probs, _zero_deltas(3, 2), ROIS, (100, 100))
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([0.6, 0.5]))
    torch.testing.assert_close(out["boxes"], ROIS[:2])
    loose = detect(probs, _zero_deltas(3, 2), ROIS, (100, 100), nms_iou=0.9)
    assert loose["labels"].tolist() == [0, 1, 0]


def test_nms_suppresses_strictly_above_threshold_and_ties_by_index():
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0]])
    probs = _probs([[0.5], [0.5], [0.4]])  # RoIs 0/1 tie; IoU(0, 2) = 0.3 exactly
    out = detect(probs, _zero_deltas(3, 1), rois, (20, 20), nms_iou=0.3)
    torch.testing.assert_close(out["boxes"], rois[[0, 2]])


def test_max_per_image_keeps_top_scores_over_classes():
    rois = torch.tensor([[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(6)])
    fg = torch.tensor(
        [[0.1, 0.2], [0.3, 0.15], [0.25, 0.06], [0.07, 0.3], [0.08, 0.09], [0.2, 0.2]]
    )
    out = detect(_probs(fg), _zero_deltas(6, 2), rois, (10, 100), max_per_image=4)
    torch.testing.assert_close(out["scores"], torch.tensor([0.3, 0.3, 0.25, 0.2]))
    # ties broken by class, then RoI index: (c0, r1) before (c1, r3); (c0, r5) before (c1, r0)
    assert out["labels"].tolist() == [0, 1, 0, 0]
    torch.testing.assert_close(out["boxes"], rois[[1, 3, 2, 5]])
    assert (
        len(detect(_probs(fg), _zero_deltas(6, 2), rois, (10, 100), max_per_image=None)["scores"])
        == 12
    )


def test_boxes_are_class_specific_and_clipped():
    deltas = _zero_deltas(3, 2)
    deltas[2, 2] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # class 1 of RoI 2 moves right by 10
    boxes = class_specific_boxes(deltas, ROIS, (100, 65))
    assert boxes.shape == (3, 2, 4)
    torch.testing.assert_close(boxes[2, 0], ROIS[2])
    torch.testing.assert_close(boxes[2, 1], torch.tensor([60.0, 50.0, 65.0, 60.0]))
    out = detect(_probs([[0, 0], [0, 0], [0, 0.9]]), deltas, ROIS, (100, 65))
    torch.testing.assert_close(out["boxes"], torch.tensor([[60.0, 50.0, 65.0, 60.0]]))


def test_agrees_with_core_greedy_nms_on_ties():
    rng = np.random.default_rng(0)
    for _ in range(60):
        r, k = int(rng.integers(1, 60)), int(rng.integers(1, 4))
        xy = rng.integers(0, 20, (r, 2)).astype(np.float32)
        rois = torch.from_numpy(np.concatenate([xy, xy + rng.integers(1, 10, (r, 2))], 1)).float()
        fg = torch.from_numpy(rng.integers(0, 5, (r, k)) / 5.0 / k).float()  # many ties
        out = detect(_probs(fg), _zero_deltas(r, k), rois, (100, 100), max_per_image=None)
        for c in range(k):
            s = fg[:, c].numpy()
            keep = greedy_nms(s, rois.numpy(), np.zeros(r, int), score_threshold=0.05, nms_iou=0.3)
            mine = out["boxes"][out["labels"] == c]
            np.testing.assert_array_equal(mine.numpy(), rois.numpy()[keep])
