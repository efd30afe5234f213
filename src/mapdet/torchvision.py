"""MAPLoss in torchvision's Faster R-CNN: :func:`use_map_loss` swaps the RoI heads' loss.

torchvision's ``RoIHeads`` computes its loss inside ``forward`` with no hook for another one.
``use_map_loss(model, **MAPLoss kwargs)`` re-classes ``model.roi_heads`` (same parameters,
same ``state_dict`` keys for the weights) so that in **training mode** its forward

1. takes **every** RPN proposal of every image as a window (the paper's "all windows": no
   512-RoI sampling), optionally the first ``max_proposals`` of each image;
2. runs the box head once over the proposals and the ground-truth boxes (appended, as
   torchvision's ``add_gt_proposals`` does; they only serve the box regression). With
   ``sparse_backward=True`` (the default) that pass runs **without autograd**, and only the
   rows with a nonzero pseudo-gradient or a box-regression target (about 40 of 600 on a
   trained digits model) are recomputed with autograd and backpropagated
   (:mod:`mapdet.row_subset`): the same loss and, to float rounding, the same gradients,
   because torchvision's ``TwoMLPHead`` (ResNet-50-FPN v1, MobileNetV3-FPN, ResNet-18-FPN,
   ``small``) computes each row on its own. A box head with BatchNorm in training mode
   (``fasterrcnn_resnet50_fpn_v2``'s ``FastRCNNConvFCHead`` trained from scratch) or dropout
   is recognised and takes the full path: one forward with autograd over every row
   (``last_full_path`` says why);
3. decodes the class-specific boxes of the proposals with the model's own ``box_coder``,
   clipped to the image (``clip_boxes_to_image``), exactly as ``postprocess_detections`` does;
4. hands ``softmax(class_logits)[:, 1:]`` ``(N, K)``, those boxes ``(N, K, 4)`` and the
   targets (labels ``1..K`` shifted to ``0..K-1``; ``difficult`` flags when the targets carry
   them) to :class:`mapdet.MAPLoss`, whose detection function is the model's test-time one:
   ``score > roi_heads.score_thresh`` (``box_score_thresh``), per-class NMS at
   ``IoU > roi_heads.nms_thresh`` (``box_nms_thresh``), and torchvision's removal of boxes
   with a side below ``1e-2`` px (those (window, class) pairs can never be detections: their
   probability enters the loss as 0, so they also receive no gradient);
5. keeps torchvision's smooth-L1 box regression (``beta = 1/9``) on foreground rows
   (IoU >= ``fg_iou_thresh`` with a non-difficult ground truth), at most
   ``positive_fraction * batch_size_per_image`` per image drawn by the model's own
   ``fg_bg_sampler``, normalised by ``batch_size_per_image * B`` as ``fastrcnn_loss`` is
   when the sample is full.

The model's ``state_dict`` is unchanged (the loss is not registered as a submodule). The loss
dict is ``{"loss_map", "loss_box_reg"}`` (``loss_map`` in place of
``loss_classifier``; the RPN's losses are untouched), so a loop that sums the dict works as
it is. In **eval mode** the forward is torchvision's own, bit for bit.

Where the loss and test time still differ (named, not silent):

- ``detections_per_img`` (at most 100 detections per image over all classes) couples the
  classes, which the AP's pseudo-gradient (per class) does not model. When an image of the
  minibatch has more detections after NMS than the cap, the loss's AP counts them all:
  ``last_capped_images`` says how many images did, and a warning is issued the first time
  (``check_cap=False`` skips this check: it costs one NMS per image with more candidates
  than the cap).
- Windows whose scores tie exactly: MAPLoss orders them by index, torchvision's NMS by its
  sort, which does not promise an order.
- The windows are the RPN's training-mode proposals (``rpn.post_nms_top_n`` for training,
  2000 by default), test time sees its testing-mode ones (1000).

The loss's score and NMS thresholds are set from the model's by :func:`use_map_loss` and
checked at every step: changing ``roi_heads.score_thresh``/``nms_thresh`` afterwards is an
error naming both values until ``use_map_loss`` is called again (which validates them).
Only these two options of the loss are the model's; ``MAPLoss``'s other
options (``match_iou``, ``ap_method``, ``min_step``, ``form``, ``memory``, ``distributed``,
``num_threads``) are the keyword arguments of :func:`use_map_loss`. Passing
``score_threshold``/``nms_iou`` that differ from the model's is an error naming both.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from mapdet.loss import MAPLoss
from mapdet.row_subset import plan_sparse_step, row_dependence, split_rows

__all__ = ["MAPRoIHeads", "SMALL_BOX_SIZE", "map_windows", "use_map_loss"]

#: torchvision's ``postprocess_detections`` removes boxes with a side below this (pixels).
SMALL_BOX_SIZE = 1e-2


def use_map_loss(model: torch.nn.Module, *, max_proposals: int | None = None,
                 map_weight: float = 1.0, sparse_backward: bool = True, check_cap: bool = True,
                 loss: MAPLoss | None = None, **map_loss_kwargs: Any) -> torch.nn.Module:
    """Train ``model``'s RoI heads with :class:`mapdet.MAPLoss`; returns ``model`` (modified).

    Args:
        model: a torchvision ``FasterRCNN`` (or any ``GeneralizedRCNN`` whose ``roi_heads`` is
            a ``RoIHeads`` without mask or keypoint branch).
        max_proposals: windows per image for the loss: the first ``max_proposals`` RPN
            proposals (sorted by objectness); ``None``: all of them.
        map_weight: multiplies ``loss_map``.
        sparse_backward: score every proposal without autograd and recompute with autograd
            only the rows the gradient needs (:mod:`mapdet.row_subset`), when the box head's
            rows are independent; ``False``: always one forward with autograd over all rows.
        check_cap: count the images whose detections after NMS exceed
            ``detections_per_img`` (``last_capped_images``, a warning the first time): one
            extra NMS per image with more candidates than the cap; ``False`` skips it.
        loss: a :class:`mapdet.MAPLoss` to use (e.g. ``MAPLoss.from_config(cfg.loss)``), its
            thresholds equal to the model's; ``None``: one built from ``map_loss_kwargs``.
        **map_loss_kwargs: :class:`mapdet.MAPLoss` options (without ``loss``). ``score_threshold``
            and ``nms_iou`` may be given only when equal to the model's
            ``roi_heads.score_thresh`` and ``roi_heads.nms_thresh``: the loss always uses the
            model's values.

    Raises:
        TypeError: ``model`` has no torchvision ``RoIHeads`` at ``model.roi_heads``.
        ValueError: mask/keypoint heads; a threshold that differs from the model's; a bad
            ``MAPLoss`` option (its own message).
    """
    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, RoIHeads):
        raise TypeError(f"use_map_loss: model.roi_heads must be a torchvision RoIHeads, got "
                        f"{type(heads).__name__} (model: {type(model).__name__})")
    if heads.has_mask() or heads.has_keypoint():
        raise ValueError("use_map_loss: mask and keypoint heads are not supported (their "
                         "losses need torchvision's sampled RoIs); use a plain FasterRCNN")
    if loss is not None and map_loss_kwargs:
        raise ValueError(f"use_map_loss: give either loss or MAPLoss options, not both "
                         f"({', '.join(sorted(map_loss_kwargs))})")
    given_values = map_loss_kwargs if loss is None else {
        "score_threshold": loss.score_threshold, "nms_iou": loss.nms_iou}
    for key, attr, tv_name in (("score_threshold", "score_thresh", "box_score_thresh"),
                               ("nms_iou", "nms_thresh", "box_nms_thresh")):
        if key in given_values:
            given, own = float(given_values.pop(key)), float(getattr(heads, attr))
            if given != own:
                raise ValueError(
                    f"use_map_loss: {key}={given} differs from the model's roi_heads.{attr}="
                    f"{own} ({tv_name}); the loss uses the model's test-time post-processing, "
                    f"so set {tv_name} when building the model instead")
    if max_proposals is not None and int(max_proposals) < 1:
        raise ValueError(f"use_map_loss: max_proposals must be >= 1 or None, got {max_proposals}")
    if loss is None:
        loss = MAPLoss(score_threshold=heads.score_thresh, nms_iou=heads.nms_thresh,
                       **map_loss_kwargs)
    if not isinstance(heads, MAPRoIHeads):
        base = type(heads)
        heads.__class__ = (MAPRoIHeads if base is RoIHeads else
                           type(f"MAP{base.__name__}", (MAPRoIHeads, base), {}))
    # Not a submodule: the model's state_dict stays torchvision's, key for key, so weights
    # move freely between the plain and the wrapped model. The AP memory (memory=K > 0) is
    # saved with ``model.roi_heads.map_loss.state_dict()``.
    object.__setattr__(heads, "map_loss", loss)
    heads.max_proposals = None if max_proposals is None else int(max_proposals)
    heads.map_weight = float(map_weight)
    heads.sparse_backward = bool(sparse_backward)
    heads.check_cap = bool(check_cap)
    heads.last_capped_images = 0
    heads.last_full_path = None
    heads.last_grad_rows = 0
    heads._warned_cap = False
    return model


def map_windows(class_logits: torch.Tensor, box_regression: torch.Tensor,
                proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]], box_coder,
                score_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's windows from the head's outputs on ``proposals``, as test time sees them.

    Args:
        class_logits: ``(N, K+1)``, background first; box_regression: ``(N, (K+1)*4)``;
            proposals: per image ``(P_b, 4)`` xyxy with ``sum P_b = N``; image_shapes:
            ``(h, w)`` per image; box_coder: the model's ``BoxCoder``.

    Returns:
        ``probs (N, K)``: softmax probabilities of the foreground classes, with (window,
        class) pairs whose box has a side below :data:`SMALL_BOX_SIZE` set to
        ``min(0, score_thresh)`` (never a candidate, no gradient); ``boxes (N, K, 4)``:
        decoded, clipped to the image, detached; ``image_ids (N,)`` int64.
    """
    probs, boxes, image_ids, _ = _windows(class_logits, box_regression, proposals,
                                          image_shapes, box_coder, score_thresh)
    return probs, boxes, image_ids


def _windows(class_logits, box_regression, proposals, image_shapes, box_coder, score_thresh):
    """:func:`map_windows` and the mask ``small (N, K)`` of the pairs it set aside."""
    counts = [p.shape[0] for p in proposals]
    probs = F.softmax(class_logits, -1)[:, 1:]
    with torch.no_grad():
        decoded = box_coder.decode(box_regression.detach(), proposals)  # (N, K+1, 4)
        parts = [box_ops.clip_boxes_to_image(b, shape)
                 for b, shape in zip(decoded.split(counts, 0), image_shapes, strict=True)]
        boxes = torch.cat(parts)[:, 1:] if parts else decoded[:, 1:]
        wh = boxes[..., 2:] - boxes[..., :2]
        small = (wh < SMALL_BOX_SIZE).any(-1)  # remove_small_boxes keeps w >= s and h >= s
    probs = probs.masked_fill(small, min(0.0, float(score_thresh)))
    image_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return probs, boxes, image_ids, small


class MAPRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` trained with :class:`mapdet.MAPLoss` (see the module doc).

    Made by :func:`use_map_loss` by re-classing an existing ``RoIHeads``; not built directly.
    Attributes added: ``map_loss`` (the :class:`MAPLoss`; not a submodule, so the model's
    ``state_dict`` keeps torchvision's keys: save ``map_loss.state_dict()`` for its AP
    memory), ``max_proposals``, ``map_weight``, ``sparse_backward``, ``check_cap``,
    ``last_capped_images``, and after each training step ``last_full_path`` (``None`` when
    the step recomputed only the rows the gradient needs, else the reason it did not) and
    ``last_grad_rows`` (the rows recomputed with autograd).
    """

    map_loss: MAPLoss
    max_proposals: int | None
    map_weight: float
    sparse_backward: bool
    check_cap: bool
    last_capped_images: int
    last_full_path: str | None
    last_grad_rows: int

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: D102
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        return [], self.map_losses(features, proposals, image_shapes, targets)

    def map_losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                   image_shapes: list[tuple[int, int]],
                   targets: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
        """``{"loss_map", "loss_box_reg"}`` for one training minibatch."""
        _check_targets(targets, len(proposals))
        self._check_thresholds()
        dtype = proposals[0].dtype
        if self.max_proposals is not None:
            proposals = [p[: self.max_proposals] for p in proposals]
        # Ground truth for box regression: the non-difficult boxes (all without flags).
        reg_boxes, reg_labels = [], []
        for t in targets:
            keep = ~t["difficult"].bool() if "difficult" in t else slice(None)
            reg_boxes.append(t["boxes"].to(dtype)[keep])
            reg_labels.append(t["labels"][keep])
        rows = self.add_gt_proposals(proposals, reg_boxes)  # per image: proposals, then gt
        pos, pos_labels, pos_targets = self._box_targets(rows, reg_boxes, reg_labels)
        reason = ("sparse_backward=False" if not self.sparse_backward else
                  row_dependence(self.box_roi_pool, self.box_head, self.box_predictor))
        self.last_full_path = reason
        with torch.set_grad_enabled(torch.is_grad_enabled() and reason is not None):
            class_logits, box_regression = self._head(features, rows, image_shapes)

        # The windows: the proposal rows of every image (the appended gt rows are not).
        counts = [r.shape[0] for r in rows]
        starts = torch.cumsum(torch.tensor([0] + counts), 0)[:-1].tolist()
        sel = torch.cat([torch.arange(s, s + p.shape[0]) for s, p in
                         zip(starts, proposals, strict=True)]).to(class_logits.device)
        probs, boxes, image_ids, small = _windows(
            class_logits[sel], box_regression[sel], proposals, image_shapes, self.box_coder,
            self.score_thresh)
        loss_targets = [_map_target(t, j) for j, t in enumerate(targets)]

        def loss_fn(p):
            return self.map_loss(p, boxes, image_ids, loss_targets)

        if reason is not None:  # the full path: autograd through every row
            loss_map = loss_fn(probs)
            self.last_grad_rows = int(class_logits.shape[0])
            loss_box = self._box_loss(box_regression, pos, pos_labels, pos_targets, len(rows))
        else:
            plan = plan_sparse_step(loss_fn, probs, extra_rows=pos, num_rows=len(class_logits),
                                    window_rows=sel, no_grad_mask=small)
            self.last_grad_rows = int(plan.need.numel())
            local = split_rows(plan.need, counts)
            sub_logits, sub_regression = self._head(
                features, [r[i.to(r.device)] for r, i in zip(rows, local, strict=True)],
                image_shapes)
            loss_map = plan.loss(sub_logits)
            loss_box = self._box_loss(sub_regression, plan.extra_at, pos_labels, pos_targets,
                                      len(rows))
        if self.check_cap:
            self._note_cap(probs.detach(), boxes, image_ids)
        return {"loss_map": self.map_weight * loss_map, "loss_box_reg": loss_box}

    def _head(self, features, rows, image_shapes) -> tuple[torch.Tensor, torch.Tensor]:
        """``class_logits (R, K+1)``, ``box_regression (R, (K+1)*4)`` of ``rows`` (per image)."""
        return self.box_predictor(self.box_head(self.box_roi_pool(features, rows,
                                                                  image_shapes)))

    def _check_thresholds(self) -> None:
        """The loss's thresholds are the model's, as set by :func:`use_map_loss`."""
        for attr, key, tv_name in (("score_thresh", "score_threshold", "box_score_thresh"),
                                   ("nms_thresh", "nms_iou", "box_nms_thresh")):
            own, used = float(getattr(self, attr)), float(getattr(self.map_loss, key))
            if own != used:
                raise ValueError(
                    f"MAPRoIHeads: roi_heads.{attr}={own} ({tv_name}) but map_loss.{key}="
                    f"{used}: the loss must use the model's test-time post-processing; call "
                    f"use_map_loss(model, ...) again after changing the model's {attr}")

    def _box_targets(self, rows, gt_boxes, gt_labels):
        """The sampled foreground rows (see the module doc): global indices ``(F,)`` into the
        concatenated ``rows``, their labels ``(F,)`` and encoded targets ``(F, 4)``."""
        matched, labels = self.assign_targets_to_proposals(rows, gt_boxes, gt_labels)
        pos_masks, _ = self.fg_bg_sampler(labels)
        pos_rows, pos_labels, pos_targets = [], [], []
        start = 0
        for r, m, lab, idx, gt in zip(rows, pos_masks, labels, matched, gt_boxes, strict=True):
            pos = torch.where(m)[0]
            if pos.numel():
                pos_rows.append(pos + start)
                pos_labels.append(lab[pos])
                pos_targets.append(self.box_coder.encode_single(gt[idx[pos]], r[pos]))
            start += r.shape[0]
        device = rows[0].device
        if not pos_rows:
            return (torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(0, 4, dtype=rows[0].dtype, device=device))
        return torch.cat(pos_rows), torch.cat(pos_labels), torch.cat(pos_targets)

    def _box_loss(self, box_regression, at, labels, targets, num_images) -> torch.Tensor:
        """torchvision's smooth-L1 (``beta = 1/9``) of rows ``at`` of ``box_regression`` for
        their ``labels``, normalised by ``batch_size_per_image * num_images``."""
        if at.numel() == 0:
            return box_regression.sum() * 0.0
        normalizer = self.fg_bg_sampler.batch_size_per_image * num_images
        reg = box_regression.reshape(box_regression.shape[0], -1, 4)
        loss = F.smooth_l1_loss(reg[at, labels], targets, beta=1 / 9, reduction="sum")
        return loss / normalizer

    def _note_cap(self, probs: torch.Tensor, boxes: torch.Tensor, image_ids: torch.Tensor):
        """Count the images with more detections after NMS than ``detections_per_img``."""
        capped = 0
        cand = probs > self.score_thresh
        for b in range(int(image_ids.max()) + 1 if image_ids.numel() else 0):
            on = image_ids == b
            c = cand[on]
            if int(c.sum()) <= self.detections_per_img:  # cheap bound: no NMS needed
                continue
            rows, cls = torch.where(c)
            kept = box_ops.batched_nms(boxes[on][rows, cls].float(), probs[on][rows, cls].float(),
                                       cls, self.nms_thresh)
            capped += int(kept.numel() > self.detections_per_img)
        self.last_capped_images = capped
        if capped and not self._warned_cap:
            self._warned_cap = True
            warnings.warn(
                f"MAPRoIHeads: {capped} image(s) of this minibatch have more than "
                f"detections_per_img={self.detections_per_img} detections after NMS; the "
                "loss's AP counts them all (the cap couples the classes), test time keeps the "
                "top ones (warned once; see last_capped_images)", stacklevel=3)


def _check_targets(targets, num_images: int) -> None:
    if targets is None:
        raise ValueError("MAPRoIHeads: targets are needed in training mode")
    if len(targets) != num_images:
        raise ValueError(f"MAPRoIHeads: {len(targets)} targets for {num_images} images")
    for j, t in enumerate(targets):
        if not t["boxes"].is_floating_point():
            raise TypeError(f"targets[{j}]['boxes'] must be float, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"targets[{j}]['labels'] must be int64, got {t['labels'].dtype}")
        if t["labels"].numel() and int(t["labels"].min()) < 1:
            raise ValueError(f"targets[{j}]['labels'] must be in 1..K (0 is torchvision's "
                             f"background), got {int(t['labels'].min())}")


def _map_target(t: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    """A torchvision target (labels ``1..K``) as MAPLoss's (labels ``0..K-1``)."""
    out = {"boxes": t["boxes"], "labels": t["labels"] - 1}
    if "difficult" in t:
        out["difficult"] = t["difficult"]
    return out
