"""Fast R-CNN: backbone, RoI pooling, RoI head, class scores and class-specific box deltas.

Girshick, "Fast R-CNN", ICCV 2015. The network maps a batch of images and each image's RoIs
(object proposals, ``xyxy`` in the input image's continuous pixel coordinates) to ``K+1`` class
logits per RoI (background at index 0) and ``K+1`` sets of box deltas per RoI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import roi_align

from mapdet.models.backbones import build_backbone_and_head
from mapdet.models.roi_pool import roi_pool
from mapdet.row_subset import split_rows

__all__ = ["ROI_OPS", "FastRCNN", "RowSubsetOutput"]

ROI_OPS = ("pool", "align")


class FastRCNN(nn.Module):
    """Fast R-CNN detector.

    ``images (B, 3, H, W)`` -> backbone -> RoI max pooling (``roi_op="pool"``,
    ``torchvision.ops.roi_pool``) or RoIAlign (``roi_op="align"``, ``sampling_ratio=2``,
    ``aligned=True``, the right half-pixel shift for continuous coordinates) to ``P x P`` with
    ``spatial_scale = 1 / stride`` -> RoI head -> ``cls_score`` (``K+1`` outputs) and
    ``bbox_pred`` (``(K+1) * 4``), initialised ``N(0, 0.01)`` and ``N(0, 0.001)`` with zero bias
    as in Fast R-CNN.

    Args:
        backbone: ``"vgg16"``, ``"resnet50_c4"`` or ``"small"`` (see ``models/backbones.py``).
        num_classes: ``K``, the number of foreground classes.
        roi_op: ``"pool"`` or ``"align"``.
        pretrained: initialise the backbone and head from ImageNet weights (``vgg16``'s head
            from ``fc6``/``fc7``); needs the weights cached or network access.
        fc_dim: width of the fully connected head (``vgg16``: 4096, ``small``: 256 by default).
        dropout: dropout probability in the fully connected head.
        freeze_at: leading backbone stages to freeze (default: 2 if ``pretrained`` else 0).
        roi_head: optional replacement RoI head: a module ``(R, C, P, P) -> (R, D)`` with
            attributes ``pool_size = P`` and ``out_dim = D``.

    Attributes:
        backbone, roi_head, cls_score, bbox_pred: the modules.
        num_classes, stride, out_channels, pool_size, roi_op: as above.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        roi_op: str = "pool",
        pretrained: bool = False,
        fc_dim: int | None = None,
        dropout: float = 0.5,
        *,
        freeze_at: int | None = None,
        roi_head: nn.Module | None = None,
    ):
        super().__init__()
        if roi_op not in ROI_OPS:
            raise ValueError(f"roi_op must be one of {ROI_OPS}, got {roi_op!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if fc_dim is not None and fc_dim < 1:
            raise ValueError(f"fc_dim must be >= 1 (the width of the FC head), got {fc_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        parts = build_backbone_and_head(
            backbone, pretrained=pretrained, freeze_at=freeze_at, fc_dim=fc_dim, dropout=dropout
        )
        self.backbone = parts.backbone
        self.roi_head = parts.head if roi_head is None else roi_head
        self.num_classes = num_classes
        self.stride = parts.stride
        self.out_channels = parts.out_channels
        self.pool_size = int(self.roi_head.pool_size)
        self.roi_op = roi_op
        self.cls_score = nn.Linear(self.roi_head.out_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(self.roi_head.out_dim, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def pool_rois(self, features: torch.Tensor, rois: list[torch.Tensor]) -> torch.Tensor:
        """Pool each RoI from its image's feature map.

        Args:
            features: ``(B, C, h, w)`` backbone output.
            rois: ``B`` tensors ``(R_b, 4)`` float xyxy in input-image pixels.

        Returns:
            ``(R, C, P, P)`` with ``R = sum R_b``, RoIs concatenated in image order.
        """
        if len(rois) != features.shape[0]:
            raise ValueError(f"got {len(rois)} RoI tensors for {features.shape[0]} images")
        rois = [r.to(device=features.device, dtype=features.dtype) for r in rois]
        scale = 1.0 / self.stride
        if self.roi_op == "align":
            return roi_align(
                features, rois, self.pool_size, spatial_scale=scale, sampling_ratio=2, aligned=True
            )
        return roi_pool(features, rois, self.pool_size, spatial_scale=scale)

    def predict(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``roi_features (R, D)`` -> ``class_logits (R, K+1)``, ``box_deltas (R, K+1, 4)``."""
        logits = self.cls_score(roi_features)
        deltas = self.bbox_pred(roi_features).reshape(-1, self.num_classes + 1, 4)
        return logits, deltas

    def forward(
        self,
        images: torch.Tensor,
        rois: list[torch.Tensor],
        grad_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | RowSubsetOutput:
        """Class logits and box deltas of every RoI.

        Args:
            images: ``(B, 3, H, W)`` float, normalised (padded batch).
            rois: ``B`` tensors ``(R_b, 4)`` float xyxy, continuous pixel coordinates of
                ``images``.
            grad_rows: for a loss whose gradient reaches few rows (the mAP loss, see
                :mod:`mapdet.row_subset`): every RoI is scored without autograd, then
                ``grad_rows(class_logits, box_deltas)`` returns the ascending global indices
                ``(R',)`` int64 of the rows the loss needs gradients for, and only those are
                recomputed with autograd. The backbone runs once, with autograd. Exact only
                when the RoI head's rows are independent (``row_dependence(roi_head)`` is
                ``None``); it is one forward call so that ``DistributedDataParallel`` sees it.

        Returns:
            ``class_logits (R, K+1)`` (background at column 0) and ``box_deltas (R, K+1, 4)``
            (see ``box_coder.decode``), RoIs concatenated in image order, ``R = sum R_b``;
            with ``grad_rows``: a :class:`RowSubsetOutput`.
        """
        features = self.backbone(images)
        if grad_rows is None:
            return self.predict(self.roi_head(self.pool_rois(features, rois)))
        with torch.no_grad():
            logits, deltas = self.predict(self.roi_head(self.pool_rois(features, rois)))
        rows = grad_rows(logits, deltas)
        local = split_rows(rows, [r.shape[0] for r in rois])
        sub = [r[i.to(r.device)] for r, i in zip(rois, local, strict=True)]
        sub_logits, sub_deltas = self.predict(self.roi_head(self.pool_rois(features, sub)))
        return RowSubsetOutput(logits, deltas, rows, sub_logits, sub_deltas)


class RowSubsetOutput(NamedTuple):
    """:meth:`FastRCNN.forward` with ``grad_rows``: ``class_logits (R, K+1)`` and
    ``box_deltas (R, K+1, 4)`` of every RoI (no autograd graph), the recomputed ``rows (R',)``
    and their ``sub_logits (R', K+1)``, ``sub_deltas (R', K+1, 4)`` (with autograd)."""

    class_logits: torch.Tensor
    box_deltas: torch.Tensor
    rows: torch.Tensor
    sub_logits: torch.Tensor
    sub_deltas: torch.Tensor
