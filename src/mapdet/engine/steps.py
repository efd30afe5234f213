"""One training iteration's loss: a step object per ``train.loss``, one signature for all.

Every step is built once from the configuration (and the criterion of
:func:`mapdet.engine.builders.build_criterion`) and called by the training loop as
``step(model, batch, generators) -> (loss, stats)``: the scalar to minimise and a dict of
floats for the logs (``loss`` among them). ``generators[b]`` draws image ``b``'s samples.
:func:`build_step` picks the class by name from :data:`STEPS`:

==============  ====================  =====================================================
name            class                 loss
==============  ====================  =====================================================
softmax         :class:`SoftmaxStep`  Fast R-CNN's multi-task loss (:func:`softmax_loss`)
map             :class:`MAPStep`      mAP loss + smooth-L1 (:func:`map_loss`)
ap_loss_nms     :class:`MAPStep`      the same step with ``NMSAPLoss`` as its criterion
softmax_map     :class:`SoftmaxMAPStep`  softmax loss + mAP loss (:func:`softmax_map_loss`)
ap_loss         :class:`RankingStep`  AP-Loss over every proposal (:func:`ranking_loss`)
rank_sort       :class:`RankingStep`  Rank & Sort Loss (:func:`ranking_loss`)
faster_rcnn     :class:`FasterRCNNStep`  ``model.arch: faster_rcnn``: the model's own losses
==============  ====================  =====================================================

A new loss is a :class:`Step` subclass registered under its name with
:func:`register_step` (and the name among ``train.loss``'s choices); the loop does not change.

The loss functions behind the steps:

- :func:`softmax_loss`: Fast R-CNN's multi-task loss on sampled RoIs (ground truth added to
  the proposals, ``rois_per_image`` per image, ``fg_fraction`` foreground).
- :func:`map_loss`: all proposals of the minibatch's images go through the head; the softmax
  probabilities of the K foreground classes and the class-specific regressed boxes (clipped
  to the image) go to :class:`mapdet.MAPLoss`, which runs the test-time post-processing
  (threshold, NMS) and returns ``1 - mAP`` with pseudo-gradients; a smooth-L1 box loss on
  sampled foreground proposals stands beside it.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mapdet.config import Config, ConfigError, apply_overrides
from mapdet.engine.data_loading import Batch
from mapdet.engine.faster_rcnn import faster_rcnn_loss
from mapdet.models.fast_rcnn import FastRCNN
from mapdet.models.losses import box_regression_loss, fast_rcnn_loss
from mapdet.models.postprocess import class_specific_boxes
from mapdet.models.sampling import label_proposals, sample_rois
from mapdet.row_subset import plan_sparse_step, row_dependence

__all__ = ["STEPS", "FasterRCNNStep", "MAPStep", "RankingStep", "SoftmaxMAPStep", "SoftmaxStep",
           "Step", "build_step", "class_log_odds", "full_path_reason", "map_loss",
           "ranking_loss", "register_step", "softmax_loss", "softmax_map_loss", "step_name",
           "training_gt"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _MapWindows:
    """The mAP loss's windows of one minibatch and the box loss's foreground sample.

    ``boxes (N, K, 4)`` class-specific, clipped, detached; ``image_ids (N,)``; ``targets``
    per image (with the difficult flags); ``box_sel (F,)`` the sampled foreground rows,
    ``box_labels (F,)`` in ``1..K``, ``box_targets (F, 4)`` encoded."""

    boxes: torch.Tensor
    image_ids: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    box_sel: torch.Tensor
    box_labels: torch.Tensor
    box_targets: torch.Tensor


def _map_windows(batch: Batch, rois: list[torch.Tensor], deltas: torch.Tensor, cfg: Config,
                 generators: Sequence[torch.Generator]) -> _MapWindows:
    """:func:`map_loss`'s windows from the head's ``deltas (N, K+1, 4)`` on ``rois``."""
    t = cfg.train
    device = batch.images.device
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
    return _MapWindows(boxes=torch.cat(boxes), image_ids=torch.cat(image_ids).to(device),
                       targets=targets, box_sel=torch.cat(box_sel).to(device),
                       box_labels=torch.cat(box_labels).to(device),
                       box_targets=torch.cat(box_targets).to(device))


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
    net = getattr(model, "module", model)  # DistributedDataParallel
    if full_path_reason(net) is None:
        found: list = []

        def grad_rows(logits: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
            """All rows scored: the loss, its gradient, and the rows to recompute."""
            w = _map_windows(batch, rois, deltas, cfg, generators)
            probs = F.softmax(logits, dim=1)[:, 1:]
            plan = plan_sparse_step(lambda p: criterion(p, w.boxes, w.image_ids, w.targets),
                                    probs, extra_rows=w.box_sel, num_rows=probs.shape[0])
            found.extend((w, probs, plan))
            return plan.need

        out = model(batch.images, rois_dev, grad_rows=grad_rows)
        w, probs, plan = found
        loss_map = plan.loss(out.sub_logits)
        box_deltas = out.sub_deltas[plan.extra_at]
        grad_row_count = plan.need.numel()
    else:
        logits, deltas = model(batch.images, rois_dev)
        probs = F.softmax(logits, dim=1)[:, 1:]
        w = _map_windows(batch, rois, deltas, cfg, generators)
        loss_map = criterion(probs, w.boxes, w.image_ids, w.targets)
        box_deltas = deltas[w.box_sel]
        grad_row_count = probs.shape[0]
    loss_box = box_regression_loss(
        box_deltas, w.box_labels, w.box_targets,
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
    return _softmax_map_loss(model, batch, cfg, _without_box_term(cfg), criterion, generators)


def _without_box_term(cfg: Config) -> Config:
    """``cfg`` with the mAP loss alone (weight 1, no box term): :func:`softmax_map_loss`'s
    mAP part."""
    return apply_overrides(cfg, ["loss.box_loss_weight=0", "loss.map_loss_weight=1"])


def _softmax_map_loss(model, batch, cfg: Config, no_box: Config, criterion, generators
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    soft, soft_stats = softmax_loss(model, batch, cfg, generators)
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
    proposals beside it, as in :func:`map_loss`, weighted by ``loss.box_loss_weight``, for
    ``rank_sort`` times ``L_RS / L_box`` (RS Loss's self-balance).
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
    if t.loss == "rank_sort":  # RS Loss's self-balance, times the configured weight
        weight = (lc.box_loss_weight * loss_rank.detach() / loss_box.detach()
                  if loss_box.item() > 0 else 0.0)
    else:
        weight = lc.box_loss_weight
    loss = loss_rank.to(loss_box.dtype) + weight * loss_box
    stats = {"loss": loss.item(), "loss_rank": loss_rank.item(), "loss_box": loss_box.item(),
             "positives": float(flat_lab.eq(1).sum().item()), "windows": float(x.shape[0])}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Steps: one object per loss, one signature, picked by name
# --------------------------------------------------------------------------------------------


class Step(ABC):
    """One training iteration's loss, built once: ``step(model, batch, generators)``.

    Args (of the constructor):
        cfg: the run's configuration.
        criterion: what :func:`~mapdet.engine.builders.build_criterion` built for it (the
            :class:`mapdet.MAPLoss`, an ``NMSAPLoss``, or ``None``).
    """

    #: the ``train.loss`` names this class is registered under (set by :func:`register_step`)
    names: tuple[str, ...] = ()

    def __init__(self, cfg: Config, criterion: torch.nn.Module | None = None):
        self.cfg = cfg
        self.criterion = criterion

    @abstractmethod
    def __call__(self, model: torch.nn.Module, batch: Batch,
                 generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise (a scalar with autograd) and the statistics to log.

        ``model``: the model (possibly in ``DistributedDataParallel``); ``batch``: the
        minibatch on the model's device; ``generators[b]``: image ``b``'s sampling
        generator."""


#: ``train.loss`` name (or ``faster_rcnn``) -> the :class:`Step` class that trains it
STEPS: dict[str, type[Step]] = {}


def register_step(*names: str) -> Callable[[type[Step]], type[Step]]:
    """Class decorator: ``@register_step("name")`` makes :func:`build_step` build the class
    for ``train.loss: name``."""

    def add(cls: type[Step]) -> type[Step]:
        for name in names:
            STEPS[name] = cls
        cls.names = (*cls.names, *names)
        return cls

    return add


def step_name(cfg: Config) -> str:
    """The registry name of the run's step: ``faster_rcnn`` for ``model.arch: faster_rcnn``
    (the model computes its own losses, the mAP loss inside its RoI heads), else
    ``train.loss``."""
    return "faster_rcnn" if cfg.model.arch == "faster_rcnn" else cfg.train.loss


def build_step(cfg: Config, criterion: torch.nn.Module | None = None) -> Step:
    """The :class:`Step` registered under :func:`step_name`, built from ``cfg`` and
    ``criterion``."""
    name = step_name(cfg)
    if name not in STEPS:
        raise ConfigError(f"train.loss: no training step is registered as {name!r} "
                          f"(registered: {', '.join(sorted(STEPS))})")
    return STEPS[name](cfg, criterion)


def _needs_criterion(step: Step) -> torch.nn.Module:
    if step.criterion is None:
        raise ValueError(f"{type(step).__name__} needs the loss of build_criterion")
    return step.criterion


@register_step("softmax")
class SoftmaxStep(Step):
    """Fast R-CNN's multi-task loss on sampled RoIs (:func:`softmax_loss`)."""

    def __call__(self, model, batch, generators):
        return softmax_loss(model, batch, self.cfg, generators)


@register_step("map", "ap_loss_nms")
class MAPStep(Step):
    """The criterion (``MAPLoss``, or ``NMSAPLoss`` for ``ap_loss_nms``) over all proposals
    plus smooth-L1 on sampled foreground (:func:`map_loss`)."""

    def __init__(self, cfg: Config, criterion: torch.nn.Module | None = None):
        super().__init__(cfg, criterion)
        _needs_criterion(self)
        if cfg.train.loss == "map":
            _log_map_stage(cfg)

    def __call__(self, model, batch, generators):
        return map_loss(model, batch, self.cfg, self.criterion, generators)


@register_step("softmax_map")
class SoftmaxMAPStep(Step):
    """The softmax loss plus ``loss.map_loss_weight`` times the mAP loss
    (:func:`softmax_map_loss`)."""

    def __init__(self, cfg: Config, criterion: torch.nn.Module | None = None):
        super().__init__(cfg, criterion)
        _needs_criterion(self)
        self.no_box = _without_box_term(cfg)
        _log_map_stage(cfg)

    def __call__(self, model, batch, generators):
        return _softmax_map_loss(model, batch, self.cfg, self.no_box, self.criterion, generators)


@register_step("ap_loss", "rank_sort")
class RankingStep(Step):
    """AP-Loss or Rank & Sort Loss over every (proposal, class) pair, without NMS
    (:func:`ranking_loss`)."""

    def __call__(self, model, batch, generators):
        return ranking_loss(model, batch, self.cfg, generators)


@register_step("faster_rcnn")
class FasterRCNNStep(Step):
    """``model.arch: faster_rcnn``: the sum of torchvision's loss dict (the mAP loss, if
    any, inside the RoI heads; :func:`mapdet.engine.faster_rcnn.faster_rcnn_loss`)."""

    def __init__(self, cfg: Config, criterion: torch.nn.Module | None = None):
        super().__init__(cfg, criterion)
        if cfg.train.loss == "map":
            _log_map_stage(cfg)

    def __call__(self, model, batch, generators):
        return faster_rcnn_loss(model, batch, generators)


def _log_map_stage(cfg: Config) -> None:
    lc = cfg.loss
    log.info("mAP stage: lr %g (loss.lr; train.lr %g is the softmax stage's), "
             "normalization %s, min_step %g, memory %d", cfg.stage_lr(), cfg.train.lr,
             lc.normalization, lc.min_step, lc.memory)
