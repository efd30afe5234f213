"""Test-time detection for one image: class-specific boxes, threshold, per-class NMS, top-k.

The rule is the project's detection function (docs/method.md, section 1) applied per class,
followed by Fast R-CNN's cap on the number of detections per image:

1. class-specific boxes: the deltas of class ``c`` applied to each RoI, clipped to the image;
2. candidates: ``score > score_threshold``;
3. per-class greedy NMS: order by score descending, ties by RoI index ascending; suppress a
   window when its IoU with a kept one of the same class is ``> nms_iou`` (strictly);
4. at most ``max_per_image`` detections over all classes: the highest scores.

NMS runs through ``torchvision.ops.batched_nms`` in float64. Its kernel sorts stably, so ties
are broken by index as in ``mapdet.core.nms.greedy_nms``; in float32 the two disagree when an
IoU equals ``nms_iou`` exactly (common with integer boxes: float32 rounds ``3/10`` above the
threshold ``0.3``), which float64 avoids. Boxes that came from float32 are represented exactly
in float64, and so are their class offsets in ``batched_nms``, so the suppressions are those of
``greedy_nms`` on the same boxes (tests/test_postprocess.py checks this on tie-heavy cases).

Step 4 differs from Fast R-CNN's code on ties: it keeps every detection scoring at least the
``max_per_image``-th highest score (possibly more than ``max_per_image``); here exactly
``max_per_image`` are kept, ties broken by class then RoI index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from mapdet.defaults import NMS_IOU, SCORE_THRESHOLD
from mapdet.models.box_coder import DEFAULT_WEIGHTS, decode

__all__ = ["class_specific_boxes", "detect"]


def class_specific_boxes(
    box_deltas: torch.Tensor,
    rois: torch.Tensor,
    image_size: tuple[int, int],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> torch.Tensor:
    """Regressed boxes of the foreground classes, clipped to the image.

    Args:
        box_deltas: ``(R, K+1, 4)`` float, the network's class-specific deltas (column 0 is
            background and is dropped).
        rois: ``(R, 4)`` float xyxy, the RoIs the deltas are relative to.
        image_size: ``(H, W)`` of the image the RoIs live in.
        weights: box coder weights.

    Returns:
        ``(R, K, 4)`` float xyxy: entry ``[r, c]`` is RoI ``r`` regressed for class ``c``
        (``c`` in ``0..K-1``).
    """
    return decode(box_deltas[:, 1:], rois, weights, clip_to=image_size)


def _empty_detections(like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "boxes": like.new_zeros((0, 4)),
        "scores": like.new_zeros((0,)),
        "labels": torch.zeros(0, dtype=torch.int64, device=like.device),
    }


def detect(
    class_probs: torch.Tensor,
    box_deltas: torch.Tensor,
    rois: torch.Tensor,
    image_size: tuple[int, int],
    *,
    score_threshold: float = SCORE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    max_per_image: int | None = 100,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """Detections of one image from the RoI head's outputs (see the module docstring).

    Args:
        class_probs: ``(R, K+1)`` float, softmax probabilities, background at column 0.
        box_deltas: ``(R, K+1, 4)`` float, class-specific regression deltas.
        rois: ``(R, 4)`` float xyxy, the image's RoIs.
        image_size: ``(H, W)``; boxes are clipped to ``[0, W] x [0, H]``.
        score_threshold: candidates have ``score > score_threshold``.
        nms_iou: per-class NMS suppresses at ``IoU > nms_iou`` (``>= 1`` disables it).
        max_per_image: keep the highest-scoring detections over all classes (``None``: all).
        weights: box coder weights.

    Returns:
        ``{"boxes": (D, 4) float xyxy, "scores": (D,) float, "labels": (D,) int64 in 0..K-1}``,
        ordered by score descending, ties by class then RoI index ascending.
    """
    boxes = class_specific_boxes(box_deltas, rois, image_size, weights)
    num_rois = boxes.shape[0]
    # Flatten class-major, so that ascending flat index = (class, RoI index) order.
    flat_boxes = boxes.transpose(0, 1).reshape(-1, 4)
    flat_scores = class_probs[:, 1:].t().reshape(-1)
    # Compared in float64, as the core does: float32(0.05) > 0.05 there, but not in float32.
    cand = torch.nonzero(flat_scores.double() > score_threshold).flatten()
    if cand.numel() == 0:
        return _empty_detections(boxes)
    cand_labels = torch.div(cand, num_rois, rounding_mode="floor")
    kept = batched_nms(flat_boxes[cand].double(), flat_scores[cand].double(), cand_labels, nms_iou)
    keep = torch.sort(cand[kept]).values
    order = torch.sort(flat_scores[keep], descending=True, stable=True).indices
    keep = keep[order][:max_per_image]
    return {
        "boxes": flat_boxes[keep],
        "scores": flat_scores[keep],
        "labels": torch.div(keep, num_rois, rounding_mode="floor"),
    }
