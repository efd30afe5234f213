"""Matching proposals to ground truth, and Fast R-CNN's RoI sampling for the softmax loss.

Boxes are ``xyxy`` float tensors in continuous pixel coordinates. Ground-truth labels are
``0..K-1``; the labels produced here are softmax columns: ``1..K`` for foreground (ground-truth
label + 1) and ``0`` for background.

Fast R-CNN's rule (Girshick, ICCV 2015, section 2.3): a RoI is foreground when its IoU with the
best-matching ground truth is ``>= 0.5``, background when that IoU is in ``[0.1, 0.5)``; a
minibatch of 64 RoIs per image (128 over 2 images) takes up to 25% foreground, the rest
background, both sampled uniformly without replacement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from mapdet.models.box_coder import DEFAULT_WEIGHTS, encode

__all__ = ["label_proposals", "match_proposals", "sample_rois"]


def match_proposals(
    proposals: torch.Tensor, gt_boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ground truth of every proposal.

    Args:
        proposals: ``(P, 4)`` float xyxy.
        gt_boxes: ``(M, 4)`` float xyxy, one image's ground truth.

    Returns:
        ``matched_gt (P,)`` int64, the index of the ground truth with the largest IoU (ties: the
        lowest index; ``-1`` when ``M == 0``), and ``max_iou (P,)`` float, that IoU (0 when
        ``M == 0``).
    """
    num = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        matched = torch.full((num,), -1, dtype=torch.int64, device=proposals.device)
        return matched, proposals.new_zeros(num)
    iou = box_iou(proposals, gt_boxes.to(proposals.dtype))
    max_iou, matched = iou.max(dim=1)  # first maximal index on ties
    return matched, max_iou


def label_proposals(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    *,
    fg_iou: float = 0.5,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax labels and box regression targets of every proposal (no sampling).

    This is what the mAP training path uses: all proposals are scored, and the smooth-L1 box
    loss applies to those with ``label > 0``.

    Args:
        proposals: ``(P, 4)`` float xyxy, positive width and height.
        gt_boxes: ``(M, 4)`` float xyxy.
        gt_labels: ``(M,)`` int64 in ``0..K-1``.
        fg_iou: a proposal is foreground when its best IoU is ``>= fg_iou``.
        weights: box coder weights.

    Returns:
        ``labels (P,)`` int64 (``gt_label + 1`` for foreground, 0 otherwise),
        ``regression_targets (P, 4)`` (zeros for background), ``matched_gt (P,)`` int64 and
        ``max_iou (P,)`` as in :func:`match_proposals`.
    """
    matched, max_iou = match_proposals(proposals, gt_boxes)
    fg = max_iou >= fg_iou
    labels = torch.zeros_like(matched)
    targets = torch.zeros_like(proposals)
    if fg.any():
        gt_idx = matched[fg]
        labels[fg] = gt_labels.to(labels.device)[gt_idx] + 1
        targets[fg] = encode(gt_boxes.to(proposals)[gt_idx], proposals[fg], weights)
    return labels, targets, matched, max_iou


def _choose(candidates: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` of ``candidates (n,)`` uniformly without replacement (all of them if ``k >= n``)."""
    n = candidates.numel()
    if k >= n:
        return candidates
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(n, generator=generator, device=device)[:k]
    return candidates[perm.to(candidates.device)]


def _check_thresholds(fg_fraction, fg_iou, bg_iou_lo, bg_iou_hi) -> None:
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
    if not 0.0 <= bg_iou_lo <= bg_iou_hi <= fg_iou:
        raise ValueError(
            "need 0 <= bg_iou_lo <= bg_iou_hi <= fg_iou, got "
            f"bg_iou_lo={bg_iou_lo}, bg_iou_hi={bg_iou_hi}, fg_iou={fg_iou}"
        )


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    *,
    batch_size: int = 64,
    fg_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_lo: float = 0.1,
    bg_iou_hi: float = 0.5,
    add_gt: bool = True,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast R-CNN's RoI sampling for one image.

    1. If ``add_gt``, the ground-truth boxes are appended to the proposals.
    2. Each RoI takes the ground truth of largest IoU (:func:`match_proposals`).
    3. Foreground: IoU ``>= fg_iou``; ``n_fg = min(round(fg_fraction * batch_size), #fg)`` of
       them are drawn.
    4. Background: IoU in ``[bg_iou_lo, bg_iou_hi)``; up to ``batch_size - n_fg`` are drawn.
       When there are too few, the rest is drawn from the RoIs with IoU in
       ``[0, bg_iou_lo)`` (a fallback of ours; Fast R-CNN then returns a smaller minibatch).
       An image without ground truth therefore yields only background RoIs.

    Draws are uniform without replacement from ``generator`` (deterministic for a seeded
    generator; the global RNG when ``None``). Fewer than ``batch_size`` RoIs are returned when
    the image has fewer eligible ones.

    Args:
        proposals: ``(P, 4)`` float xyxy, positive width and height.
        gt_boxes: ``(M, 4)`` float xyxy (``M`` may be 0).
        gt_labels: ``(M,)`` int64 in ``0..K-1``.

    Returns:
        ``rois (S, 4)``, foreground first; ``labels (S,)`` int64 in ``0..K`` (0 = background);
        ``regression_targets (S, 4)`` (zeros for background, see
        :func:`mapdet.models.box_coder.encode`); ``matched_gt (S,)`` int64, the best ground truth
        of each RoI (``-1`` without ground truth).
    """
    _check_thresholds(fg_fraction, fg_iou, bg_iou_lo, bg_iou_hi)
    if add_gt and gt_boxes.shape[0] > 0:
        proposals = torch.cat([proposals, gt_boxes.to(proposals)], dim=0)
    labels, targets, matched, max_iou = label_proposals(
        proposals, gt_boxes, gt_labels, fg_iou=fg_iou, weights=weights
    )
    fg = _choose(
        torch.nonzero(max_iou >= fg_iou).flatten(), round(fg_fraction * batch_size), generator
    )
    n_bg = batch_size - fg.numel()
    in_range = (max_iou >= bg_iou_lo) & (max_iou < bg_iou_hi)
    bg = _choose(torch.nonzero(in_range).flatten(), n_bg, generator)
    if bg.numel() < n_bg:
        below = torch.nonzero(max_iou < bg_iou_lo).flatten()
        bg = torch.cat([bg, _choose(below, n_bg - bg.numel(), generator)])
    keep = torch.cat([fg, bg])  # background has IoU < bg_iou_hi <= fg_iou: label 0, target 0
    return proposals[keep], labels[keep], targets[keep], matched[keep]
