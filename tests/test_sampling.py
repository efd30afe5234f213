"""RoI matching and Fast R-CNN's RoI sampling."""

import pytest
import torch

from mapdet.models.box_coder import encode
from mapdet.models.sampling import label_proposals, match_proposals, sample_rois

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0]])
GT_LABELS = torch.tensor([3, 0])


def _shifted(box, dx, n):
    """``n`` copies of ``box (4,)`` shifted right by ``dx``."""
    return (box + torch.tensor([dx, 0.0, dx, 0.0])).repeat(n, 1)


def _proposals():
    """100 foreground (IoU 0.82 / 0.67), 100 background (IoU 0.18), 20 below 0.1."""
    return torch.cat(
        [
            _shifted(GT[0], 1.0, 50),  # IoU 9/11 with gt 0
            _shifted(GT[1], 4.0, 50),  # IoU 16/24 with gt 1
            _shifted(GT[0], 7.0, 100),  # IoU 3/17
            torch.tensor([[200.0, 200.0, 220.0, 220.0]]).repeat(20, 1),  # IoU 0
        ]
    )


def test_match_proposals_best_gt_and_ties():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [55.0, 50.0, 75.0, 70.0], [30, 0, 40, 10.0]])
    matched, iou = match_proposals(proposals, GT)
    assert matched.tolist() == [0, 1, 0]
    torch.testing.assert_close(iou, torch.tensor([1.0, 300 / 500, 0.0]))
    twin = torch.cat([GT[:1], GT[:1]])  # two identical gt boxes: the lowest index wins
    assert match_proposals(proposals[:1], twin)[0].tolist() == [0]


def test_match_proposals_no_gt():
    matched, iou = match_proposals(torch.rand(3, 4).cumsum(1), torch.zeros(0, 4))
    assert matched.tolist() == [-1, -1, -1]
    assert iou.tolist() == [0.0, 0.0, 0.0]


def test_label_proposals_labels_and_targets():
    proposals = torch.tensor([[1.0, 0.0, 11.0, 10.0], [7.0, 0.0, 17.0, 10.0]])
    labels, targets, matched, iou = label_proposals(proposals, GT, GT_LABELS)
    assert labels.tolist() == [4, 0]  # gt label 3 -> softmax column 4
    torch.testing.assert_close(targets[0], encode(GT[:1], proposals[:1])[0])
    assert targets[1].abs().sum() == 0
    assert matched.tolist() == [0, 0]


def test_fractions_and_labels():
    g = torch.Generator().manual_seed(0)
    rois, labels, targets, matched = sample_rois(_proposals(), GT, GT_LABELS, generator=g)
    assert rois.shape == (64, 4) and targets.shape == (64, 4) and matched.shape == (64,)
    assert (labels[:16] > 0).all() and (labels[16:] == 0).all()
    assert set(labels[:16].tolist()) <= {4, 1}
    # background comes from IoU in [0.1, 0.5) while there are enough of those
    _, iou = match_proposals(rois[16:], GT)
    assert ((iou >= 0.1) & (iou < 0.5)).all()
    assert targets[16:].abs().sum() == 0
    torch.testing.assert_close(targets[:16], encode(GT[matched[:16]], rois[:16]))


def test_deterministic_with_seeded_generator():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        prop = _proposals() + torch.arange(220.0)[:, None] * 1e-3  # distinguishable rows
        return sample_rois(prop, GT, GT_LABELS, generator=g)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_gt_added_and_sampled():
    proposals = _shifted(GT[0], 7.0, 30)  # only background proposals
    g = torch.Generator().manual_seed(0)
    rois, labels, _, matched = sample_rois(proposals, GT, GT_LABELS, generator=g)
    assert labels[:2].tolist() in ([4, 1], [1, 4])
    assert sorted(matched[:2].tolist()) == [0, 1]
    assert {tuple(r) for r in rois[:2].tolist()} == {tuple(r) for r in GT.tolist()}
    rois, labels, _, _ = sample_rois(proposals, GT, GT_LABELS, add_gt=False, generator=g)
    assert (labels == 0).all() and rois.shape == (30, 4)


def test_fallback_below_bg_lo_when_too_few_background():
    proposals = torch.cat([_shifted(GT[0], 7.0, 5), _proposals()[-20:]])  # 5 in range, 20 below
    g = torch.Generator().manual_seed(0)
    rois, labels, _, _ = sample_rois(
        proposals, GT, GT_LABELS, batch_size=16, add_gt=False, generator=g
    )
    assert rois.shape == (16, 4) and (labels == 0).all()
    _, iou = match_proposals(rois, GT)
    assert int((iou >= 0.1).sum()) == 5  # all in-range background taken first


def test_no_gt_image_gives_only_background():
    proposals = _proposals()
    g = torch.Generator().manual_seed(0)
    rois, labels, targets, matched = sample_rois(
        proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), generator=g
    )
    assert rois.shape == (64, 4)
    assert (labels == 0).all() and (matched == -1).all() and (targets == 0).all()


def test_invalid_thresholds():
    with pytest.raises(ValueError, match="bg_iou_lo"):
        sample_rois(_proposals(), GT, GT_LABELS, bg_iou_lo=0.6)
