"""MAPLoss input validation: IoU thresholds in (0, 1], integer image ids and labels,
bfloat16 probabilities, and a clear error when K changes under an AP memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapdet import MAPLoss


def _batch(k: int = 3, n: int = 12, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, k, generator=g).to(dtype).requires_grad_(True)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], dim=1)
    ids = torch.arange(n) % 2
    targets = [{"boxes": boxes[i:i + 2].clone() + 1, "labels": torch.tensor([0, k - 1])}
               for i in range(2)]
    return probs, boxes, ids, targets


@pytest.mark.parametrize("kwargs", [{"nms_iou": 0.0}, {"nms_iou": 1.5}, {"nms_iou": -0.3},
                                    {"match_iou": 0.0}, {"match_iou": 2.0},
                                    {"match_iou": [0.5, 1.2]}])
def test_iou_thresholds_outside_0_1_are_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be in \\(0, 1\\]"):
        MAPLoss(**kwargs)
    MAPLoss(nms_iou=1.0, match_iou=[0.5, 0.75, 1.0])  # the bounds themselves are fine


def test_float_image_ids_and_labels_are_rejected():
    probs, boxes, ids, targets = _batch()
    with pytest.raises(ValueError, match="image_ids must be integers, got dtype float32"):
        MAPLoss(normalization="none")(probs, boxes, ids.float() + 0.7, targets)
    targets[1]["labels"] = torch.tensor([0.0, 1.9])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must be integers"):
        MAPLoss(normalization="none")(probs, boxes, ids, targets)


def test_bfloat16_probabilities_are_accepted():
    probs, boxes, ids, targets = _batch()
    ref_loss = MAPLoss(normalization="none")
    p32 = probs.detach().to(torch.bfloat16).float().requires_grad_(True)
    expected = ref_loss(p32, boxes, ids, targets)
    expected.backward()
    pbf = probs.detach().to(torch.bfloat16).requires_grad_(True)
    loss = MAPLoss(normalization="none")(pbf, boxes.to(torch.bfloat16), ids, targets)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and pbf.grad.dtype == torch.bfloat16
    # the same numbers as float32 inputs holding the same (bfloat16-rounded) values; boxes in
    # bfloat16 are rounded too, so compare the loss only where the boxes agree exactly
    assert loss.item() == pytest.approx(expected.item(), abs=1e-2)
    assert np.isfinite(pbf.grad.float().numpy()).all()


def test_memory_with_a_changed_number_of_classes_is_a_clear_error():
    crit = MAPLoss(normalization="none", memory=2)
    crit(*_batch(k=3))
    with pytest.raises(ValueError, match=r"K = 4 classes but the stored minibatches have "
                       r"K = 3; call reset_memory\(\)"):
        crit(*_batch(k=4, seed=1))
    crit.reset_memory()
    crit(*_batch(k=4, seed=1))


@pytest.mark.parametrize("kwargs, match", [({"fc_dim": 0}, "fc_dim must be >= 1"),
                                           ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")])
def test_fast_rcnn_rejects_a_degenerate_head(kwargs, match):
    from mapdet.models.fast_rcnn import FastRCNN

    with pytest.raises(ValueError, match=match):
        FastRCNN("small", 3, pretrained=False, **kwargs)
