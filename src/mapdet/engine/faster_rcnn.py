"""Training step and detection for ``model.arch: faster_rcnn`` (torchvision's Faster R-CNN).

The model computes its own losses: in training mode ``model(images, targets)`` returns the
loss dict (RPN: ``loss_objectness``, ``loss_rpn_box_reg``; RoI heads: ``loss_classifier``
and ``loss_box_reg`` for the softmax loss, ``loss_map`` in place of ``loss_classifier`` once
:func:`mapdet.torchvision.use_map_loss` is applied), and the step minimises their sum, as
torchvision's reference ``train_one_epoch`` does.

Targets: every ground-truth box with labels ``1..K`` (torchvision's numbering) and the
``difficult`` flags. The RPN and the softmax head take difficult objects as targets
(torchvision's convention); the mAP loss ignores detections of them, as the evaluation does,
and leaves them out of its box regression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mapdet.engine.data_loading import Batch
from mapdet.models.faster_rcnn import set_sampling_generators

__all__ = ["faster_rcnn_detect", "faster_rcnn_loss", "faster_rcnn_targets"]


def faster_rcnn_targets(batch: Batch) -> list[dict[str, torch.Tensor]]:
    """One torchvision target per image: ``boxes (M, 4)``, ``labels (M,)`` in ``1..K``,
    ``difficult (M,)`` bool, on the images' device."""
    device = batch.images.device
    return [{"boxes": s.boxes.to(device), "labels": (s.labels + 1).to(device),
             "difficult": s.difficult.to(device)} for s in batch.samples]


def _images(batch: Batch) -> list[torch.Tensor]:
    """Each image without the batch's padding: ``(3, h, w)``."""
    return [batch.images[i, :, : s.size[0], : s.size[1]] for i, s in enumerate(batch.samples)]


def faster_rcnn_loss(model: torch.nn.Module, batch: Batch,
                     generators: Sequence[torch.Generator] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The sum of the model's loss dict, and the logged statistics (each loss, and for the
    mAP loss the minibatch's mAP and the images where ``detections_per_img`` bound).

    ``generators[b]`` draws image ``b``'s anchor and RoI samples
    (:func:`mapdet.models.faster_rcnn.set_sampling_generators`), so that the sample of an
    image does not depend on the other images of the minibatch or on the process."""
    set_sampling_generators(model, list(generators) if generators is not None else None)
    try:
        losses = model(_images(batch), faster_rcnn_targets(batch))
    finally:
        set_sampling_generators(model, None)
    loss = sum(losses.values())
    stats = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
    heads = getattr(model, "module", model).roi_heads
    if hasattr(heads, "map_loss"):
        stats["mAP"] = float(getattr(heads.map_loss, "last_map", math.nan))
        stats["capped_images"] = float(heads.last_capped_images)
    return loss, stats


@torch.no_grad()
def faster_rcnn_detect(model: torch.nn.Module, batch: Batch) -> list[dict[str, torch.Tensor]]:
    """The model's detections (its own post-processing) per image, in the resized image's
    pixels: ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)`` in ``0..K-1``."""
    out = model(_images(batch))
    return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in out]
