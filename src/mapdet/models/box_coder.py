"""Box regression deltas: the R-CNN parametrisation of a box relative to a proposal.

Boxes are ``xyxy`` in continuous pixel coordinates (width ``x2 - x1``, no ``+1``). For a
proposal ``p`` with centre ``(px, py)`` and size ``(pw, ph)`` and a target box ``g``:

    dx = wx * (gx - px) / pw        dw = ww * log(gw / pw)
    dy = wy * (gy - py) / ph        dh = wh * log(gh / ph)

with weights ``(wx, wy, ww, wh) = (10, 10, 5, 5)`` by default: the inverse of Fast R-CNN's
target standard deviations ``(0.1, 0.1, 0.2, 0.2)``. Decoding clamps ``dw / ww`` and ``dh / wh``
at ``log(1000 / 16)`` as torchvision does, so that a wild prediction cannot overflow ``exp``.

References: Girshick et al., "Rich feature hierarchies...", CVPR 2014, appendix C;
torchvision ``models/detection/_utils.py`` (``BoxCoder``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["BBOX_XFORM_CLIP", "DEFAULT_WEIGHTS", "clip_boxes", "decode", "encode"]

DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``boxes (..., 4)`` xyxy -> centre x, centre y, width, height, each ``(...)``."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(
    reference_boxes: torch.Tensor,
    proposals: torch.Tensor,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> torch.Tensor:
    """Regression targets that take each proposal to its reference box.

    Args:
        reference_boxes: ``(R, 4)`` float xyxy, the targets (matched ground truth).
        proposals: ``(R, 4)`` float xyxy, with positive width and height.
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        ``(R, 4)`` deltas ``(dx, dy, dw, dh)``, in the dtype of ``proposals``.
    """
    reference_boxes = reference_boxes.to(proposals.dtype)
    wx, wy, ww, wh = weights
    px, py, pw, ph = _centre_size(proposals)
    gx, gy, gw, gh = _centre_size(reference_boxes)
    deltas = (
        wx * (gx - px) / pw,
        wy * (gy - py) / ph,
        ww * torch.log(gw / pw),
        wh * torch.log(gh / ph),
    )
    return torch.stack(deltas, dim=-1)


def decode(
    deltas: torch.Tensor,
    boxes: torch.Tensor,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    clip_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Apply regression deltas to boxes (the inverse of :func:`encode`).

    Args:
        deltas: ``(R, ..., 4)`` float ``(dx, dy, dw, dh)``, e.g. ``(R, K+1, 4)`` class-specific.
        boxes: ``(R, 4)`` float xyxy, the proposals the deltas are relative to.
        weights: ``(wx, wy, ww, wh)``, as used to encode.
        clip_to: optional image size ``(H, W)``; boxes are then clipped to ``[0, W] x [0, H]``.

    Returns:
        Boxes ``(R, ..., 4)`` xyxy, in the dtype of ``deltas``.
    """
    wx, wy, ww, wh = weights
    boxes = boxes.to(deltas.dtype).reshape(boxes.shape[0], *([1] * (deltas.dim() - 2)), 4)
    px, py, pw, ph = _centre_size(boxes)
    dw = torch.clamp(deltas[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[..., 3] / wh, max=BBOX_XFORM_CLIP)
    cx = deltas[..., 0] / wx * pw + px
    cy = deltas[..., 1] / wy * ph + py
    half_w = 0.5 * torch.exp(dw) * pw
    half_h = 0.5 * torch.exp(dh) * ph
    out = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
    return out if clip_to is None else clip_boxes(out, clip_to)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip ``boxes (..., 4)`` xyxy to the image ``[0, W] x [0, H]``, ``size = (H, W)``."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
