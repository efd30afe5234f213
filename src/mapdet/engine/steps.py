"""One training step's loss, for each of the two losses on the same Fast R-CNN model.

- :func:`softmax_loss`: Fast R-CNN's multi-task loss on sampled RoIs (ground truth added to
  the proposals, ``rois_per_image`` per image, ``fg_fraction`` foreground).
- :func:`map_loss`: all proposals of the minibatch's images go through the head; the softmax
  probabilities of the K foreground classes and the class-specific regressed boxes (clipped
  to the image) go to :class:`mapdet.MAPLoss`, which runs the test-time post-processing
  (threshold, NMS) and returns ``1 - mAP`` with pseudo-gradients; a smooth-L1 box loss on
  sampled foreground proposals stands beside it.

Both return ``(loss, stats)``: the scalar to minimise and a dict of floats for the logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mapdet.config import Config
from mapdet.engine.data_loading import Batch
from mapdet.models.fast_rcnn import FastRCNN
from mapdet.models.losses import box_regression_loss, fast_rcnn_loss
from mapdet.models.postprocess import class_specific_boxes
from mapdet.models.sampling import label_proposals, sample_rois
from mapdet.row_subset import attach_grad, loss_and_grad, row_dependence, rows_with_grad

__all__ = ["full_path_reason", "map_loss", "softmax_loss", "training_gt"]


def training_gt(sample, use_difficult: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth used for RoI labels and box targets: difficult objects dropped unless
    ``use_difficult`` (Fast R-CNN's default for VOC). Returns ``boxes (M, 4)``, ``labels (M,)``."""
    if use_difficult:
        return sample.boxes, sample.labels
    keep = ~sample.difficult
    return sample.boxes[keep], sample.labels[keep]


def softmax_loss(
    model: torch.nn.Module, batch: Batch, cfg: Config, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fast R-CNN's multi-task loss on ``train.rois_per_image`` sampled RoIs per image.

    ``generators[b]`` draws image ``b``'s RoI sample (one per image, so that a sample does not
    depend on which other images share the minibatch or the process)."""
    t = cfg.train
    rois, labels, targets = [], [], []
    for s, generator in zip(batch.samples, generators, strict=True):
        gt_boxes, gt_labels = training_gt(s, cfg.data.use_difficult)
        r, lab, tgt, _ = sample_rois(
            s.proposals, gt_boxes, gt_labels, batch_size=t.rois_per_image,
            fg_fraction=t.fg_fraction, fg_iou=t.fg_iou, bg_iou_lo=t.bg_iou_low,
            bg_iou_hi=t.bg_iou_high, add_gt=t.add_gt, generator=generator,
        )
        rois.append(r)
        labels.append(lab)
        targets.append(tgt)
    device = batch.images.device
    logits, deltas = model(batch.images, [r.to(device) for r in rois])
    labels_t = torch.cat(labels).to(device)
    losses = fast_rcnn_loss(logits, deltas, labels_t, torch.cat(targets).to(device))
    loss = losses["loss_cls"] + losses["loss_box"]
    with torch.no_grad():
        acc = (logits.argmax(1) == labels_t).float().mean().item() if len(labels_t) else math.nan
    stats = {
        "loss": loss.item(),
        "loss_cls": losses["loss_cls"].item(),
        "loss_box": losses["loss_box"].item(),
        "accuracy": acc,
        "fg_rois": float((labels_t > 0).sum().item()),
        "rois": float(len(labels_t)),
    }
    return loss, stats


def _sample_foreground(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of up to ``k`` foreground entries (``labels > 0``), uniformly without replacement."""
    fg = torch.nonzero(labels > 0).flatten()
    if fg.numel() <= k:
        return fg
    perm = torch.randperm(fg.numel(), generator=generator)[:k]
    return fg[perm.to(fg.device)]


def map_loss(
    model: torch.nn.Module,
    batch: Batch,
    cfg: Config,
    criterion: torch.nn.Module,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mAP loss over all proposals of the minibatch, plus smooth-L1 on sampled foreground.

    The windows handed to ``criterion`` (a :class:`mapdet.MAPLoss`) are every proposal of every
    image (capped at ``loss.max_rois_per_image`` per image when > 0), with the softmax probabilities
    of the K foreground classes ``(N, K)`` and the class-specific boxes ``(N, K, 4)`` (decoded
    and clipped to the image, detached: AP after NMS is trained through the scores); targets
    keep the difficult flags so that the AP treats them as the evaluation does.

    When the model's RoI head has independent rows (:func:`full_path_reason` is ``None``: no
    dropout, no BatchNorm with batch statistics), the proposals are scored without autograd
    and only the rows with a nonzero pseudo-gradient or a box target are recomputed with it
    (:mod:`mapdet.row_subset`): the same loss and, to float rounding, the same gradients.
    ``stats["grad_rows"]`` counts the rows that went through autograd.
    """
    lc, t = cfg.loss, cfg.train
    device = batch.images.device
    rois = []
    for s in batch.samples:
        p = s.proposals
        if lc.max_rois_per_image > 0:
            p = p[: lc.max_rois_per_image]
        rois.append(p)
    rois_dev = [r.to(device) for r in rois]
    counts = [r.shape[0] for r in rois]
    plan: dict[str, object] = {}

    def windows(deltas: torch.Tensor) -> None:
        """The loss's boxes and targets, and the box loss's foreground sample, into ``plan``."""
        boxes, image_ids, targets, box_sel, box_labels, box_targets = [], [], [], [], [], []
        start = 0
        n_box = max(1, round(t.fg_fraction * t.rois_per_image))
        for b, (s, r, generator) in enumerate(zip(batch.samples, rois, generators, strict=True)):
            d = deltas[start : start + r.shape[0]]
            with torch.no_grad():
                boxes.append(class_specific_boxes(d.detach(), r.to(device), s.size))
            image_ids.append(torch.full((r.shape[0],), b, dtype=torch.int64))
            targets.append({"boxes": s.boxes, "labels": s.labels, "difficult": s.difficult})
            gt_boxes, gt_labels = training_gt(s, cfg.data.use_difficult)
            labels, reg_targets, _, _ = label_proposals(r, gt_boxes, gt_labels, fg_iou=t.fg_iou)
            sel = _sample_foreground(labels, n_box, generator)
            box_sel.append(sel + start)
            box_labels.append(labels[sel])
            box_targets.append(reg_targets[sel])
            start += r.shape[0]
        plan.update(boxes=torch.cat(boxes), image_ids=torch.cat(image_ids).to(device),
                    targets=targets, box_sel=torch.cat(box_sel).to(device),
                    box_labels=torch.cat(box_labels).to(device),
                    box_targets=torch.cat(box_targets).to(device))

    def loss_fn(p: torch.Tensor) -> torch.Tensor:
        return criterion(p, plan["boxes"], plan["image_ids"], plan["targets"])

    def grad_rows(logits: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """All rows scored: the loss, its gradient, and the rows to recompute."""
        windows(deltas)
        probs = F.softmax(logits, dim=1)[:, 1:]
        value, grad = loss_and_grad(loss_fn, probs)
        nonzero = rows_with_grad(grad)
        need = torch.unique(torch.cat([nonzero, plan["box_sel"]]))
        if need.numel() == 0 and probs.shape[0]:  # keep the head's parameters in the graph
            need = torch.zeros(1, dtype=torch.int64, device=device)
        plan.update(probs=probs, value=value, grad=grad, nonzero=nonzero, need=need)
        return need

    net = getattr(model, "module", model)  # DistributedDataParallel
    if full_path_reason(net) is None:
        out = model(batch.images, rois_dev, grad_rows=grad_rows)
        need, nonzero = plan["need"], plan["nonzero"]
        sub_probs = F.softmax(out.sub_logits[torch.searchsorted(need, nonzero)], dim=1)[:, 1:]
        loss_map = attach_grad(plan["value"], sub_probs, plan["grad"][nonzero])
        box_deltas = out.sub_deltas[torch.searchsorted(need, plan["box_sel"])]
        probs, grad_row_count = plan["probs"], need.numel()
    else:
        logits, deltas = model(batch.images, rois_dev)
        probs = F.softmax(logits, dim=1)[:, 1:]
        windows(deltas)
        loss_map = loss_fn(probs)
        box_deltas = deltas[plan["box_sel"]]
        grad_row_count = probs.shape[0]
    loss_box = box_regression_loss(
        box_deltas, plan["box_labels"], plan["box_targets"],
        normalizer=t.rois_per_image * len(batch.samples),
    )
    loss = lc.map_loss_weight * loss_map + lc.box_loss_weight * loss_box
    batch_map = float(getattr(criterion, "last_map", math.nan))
    stats = {
        "loss": loss.item(),
        "loss_map": loss_map.item(),
        "loss_box": loss_box.item(),
        "mAP": batch_map,
        "windows": float(sum(counts)),
        "grad_rows": float(grad_row_count),
        "detections": float(probs.detach().gt(lc.score_threshold).sum().item()),
    }
    return loss, stats


def full_path_reason(model: torch.nn.Module) -> str | None:
    """Why the mAP step must run ``model``'s RoI head with autograd over every proposal, or
    ``None`` when scoring them without autograd and recomputing a few rows is exact: a
    :class:`~mapdet.models.FastRCNN` whose RoI head and predictors have independent rows
    (:func:`mapdet.row_subset.row_dependence`)."""
    if not isinstance(model, FastRCNN):
        return f"{type(model).__name__} is not a FastRCNN"
    return row_dependence(model.roi_head, model.cls_score, model.bbox_pred)
