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

import numpy as np
import torch
import torch.nn.functional as F

from mapdet.config import Config
from mapdet.engine.data_loading import Batch
from mapdet.models.fast_rcnn import FastRCNN
from mapdet.models.losses import box_regression_loss, fast_rcnn_loss
from mapdet.models.postprocess import class_specific_boxes
from mapdet.models.sampling import label_proposals, sample_rois
from mapdet.row_subset import attach_grad, loss_and_grad, row_dependence, rows_with_grad

__all__ = ["class_log_odds", "full_path_reason", "map_loss", "ranking_loss", "softmax_loss",
           "softmax_map_loss", "training_gt"]


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


def softmax_map_loss(
    model: torch.nn.Module,
    batch: Batch,
    cfg: Config,
    criterion: torch.nn.Module,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``train.loss: softmax_map``: Fast R-CNN's loss on sampled RoIs (:func:`softmax_loss`)
    plus ``loss.map_loss_weight`` times the mAP loss over all proposals (:func:`map_loss`,
    without its box term: the softmax loss has one)."""
    soft, soft_stats = softmax_loss(model, batch, cfg, generators)
    from mapdet.config import apply_overrides

    no_box = apply_overrides(cfg, ["loss.box_loss_weight=0", "loss.map_loss_weight=1"])
    mp, map_stats = map_loss(model, batch, no_box, criterion, generators)
    loss = soft + cfg.loss.map_loss_weight * mp
    stats = {**{f"softmax_{k}": v for k, v in soft_stats.items()},
             "loss_map": map_stats["loss_map"], "mAP": map_stats["mAP"],
             "grad_rows": map_stats["grad_rows"], "loss": loss.item()}
    return loss, stats


def class_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """``(N, K)``: ``log p_c - log(1 - p_c)`` of the softmax over ``logits (N, K+1)`` for the
    foreground classes ``c = 1..K``, computed as ``z_c - logsumexp_{k != c} z_k`` (exact where
    ``p_c`` rounds to 1). Ranks each class's windows as its probability does."""
    n, k1 = logits.shape
    eye = torch.eye(k1, dtype=torch.bool, device=logits.device)[1:]  # (K, K+1)
    others = logits[:, None, :].masked_fill(eye[None], float("-inf"))
    return logits[:, 1:] - torch.logsumexp(others, dim=2)


def ranking_loss(
    model: torch.nn.Module, batch: Batch, cfg: Config, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, dict[str, float]]:
    """``train.loss: ap_loss`` (AP-Loss) or ``rank_sort`` (Rank & Sort Loss) over every
    proposal of the minibatch, without NMS, as the papers rank a one-stage detector's
    anchors: the ``N x K`` (proposal, class) log-odds (:func:`class_log_odds`) form one list;
    ``(i, c)`` is positive when proposal ``i``'s best ground truth (IoU >= ``train.fg_iou``)
    has class ``c``, negative otherwise. RS Loss's sorting targets are the IoUs of the
    positives' regressed boxes with their ground truth. Smooth-L1 on sampled foreground
    proposals beside it, as in :func:`map_loss`; for ``rank_sort`` weighted by
    ``L_RS / L_box`` (RS Loss's self-balance), for ``ap_loss`` by ``loss.box_loss_weight``.
    """
    from mapdet.core.boxes import box_iou
    from mapdet.ranking import AP_LOSS_DELTA, RANK_SORT_DELTA, ap_loss, rank_sort_loss

    lc, t = cfg.loss, cfg.train
    device = batch.images.device
    rois = [s.proposals[: lc.max_rois_per_image] if lc.max_rois_per_image > 0 else s.proposals
            for s in batch.samples]
    logits, deltas = model(batch.images, [r.to(device) for r in rois])
    x = class_log_odds(logits)
    k = x.shape[1]
    labels, ious, box_sel, box_labels, box_targets = [], [], [], [], []
    start = 0
    n_box = max(1, round(t.fg_fraction * t.rois_per_image))
    for s, r, generator in zip(batch.samples, rois, generators, strict=True):
        gt_boxes, gt_labels = training_gt(s, cfg.data.use_difficult)
        lab, reg, matched, _ = label_proposals(r, gt_boxes, gt_labels, fg_iou=t.fg_iou)
        onehot = torch.zeros((r.shape[0], k), dtype=torch.int64)
        fg = torch.nonzero(lab > 0).flatten()
        onehot[fg, lab[fg] - 1] = 1
        labels.append(onehot)
        iou = torch.zeros((r.shape[0], k), dtype=torch.float64)
        if fg.numel():
            with torch.no_grad():
                d = deltas[start : start + r.shape[0]].detach().cpu()
                boxes = class_specific_boxes(d[fg], r[fg], s.size)  # (F, K, 4)
                own = boxes[torch.arange(fg.numel()), lab[fg] - 1]
                gt = gt_boxes[matched[fg]]
                iou[fg, lab[fg] - 1] = torch.as_tensor(np.diagonal(
                    box_iou(own.double().numpy(), gt.double().numpy())).copy())
        ious.append(iou)
        sel = _sample_foreground(lab, n_box, generator)
        box_sel.append(sel + start)
        box_labels.append(lab[sel])
        box_targets.append(reg[sel])
        start += r.shape[0]
    flat_x = x.reshape(-1)
    flat_lab = torch.cat(labels).reshape(-1).to(device)
    if t.loss == "ap_loss":
        delta = AP_LOSS_DELTA if lc.ranking_delta is None else lc.ranking_delta
        loss_rank = ap_loss(flat_x, flat_lab, delta)
    else:
        delta = RANK_SORT_DELTA if lc.ranking_delta is None else lc.ranking_delta
        loss_rank = rank_sort_loss(flat_x, flat_lab, torch.cat(ious).reshape(-1).to(device),
                                   delta)
    box_sel_t = torch.cat(box_sel).to(device)
    loss_box = box_regression_loss(deltas[box_sel_t], torch.cat(box_labels).to(device),
                                   torch.cat(box_targets).to(device),
                                   normalizer=t.rois_per_image * len(batch.samples))
    if t.loss == "rank_sort":
        weight = loss_rank.detach() / loss_box.detach() if loss_box.item() > 0 else 0.0
    else:
        weight = lc.box_loss_weight
    loss = loss_rank.to(loss_box.dtype) + weight * loss_box
    stats = {"loss": loss.item(), "loss_rank": loss_rank.item(), "loss_box": loss_box.item(),
             "positives": float(flat_lab.eq(1).sum().item()), "windows": float(x.shape[0])}
    return loss, stats
