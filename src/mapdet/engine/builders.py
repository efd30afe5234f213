"""The one mapping from a :class:`~mapdet.config.Config` to each component of a run.

Every command (``train``, ``eval``, ``detect``, ``proposals``, ``demo``) builds its pieces
here and nowhere else, so that a config key means the same thing everywhere (the idea of
detectron2's ``from_config``, kept in one module rather than on the classes so that
``models``/``data``/``loss`` stay free of the config):

==================  ==========================================  ===========================
component           built by                                    from
==================  ==========================================  ===========================
data set            :func:`build_dataset`                       ``data``
proposals           :func:`build_proposals`                     ``proposals``
model               :func:`build_model`                         ``model`` (+ ``eval``, ``train``
                                                                for ``arch: faster_rcnn``)
mAP loss            :func:`build_criterion`                     ``loss``
device, threads     :func:`resolve_device`, :func:`set_threads`  ``train.device/threads``
==================  ==========================================  ===========================

(the optimizer and LR schedule, from ``train``, are
:func:`mapdet.engine.train.build_optimizer` / ``build_scheduler``; test-time
post-processing reads ``eval`` in :func:`mapdet.engine.evaluate.detect_batch`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mapdet.config import Config, ConfigError

__all__ = [
    "NoProposals",
    "build_criterion",
    "build_dataset",
    "build_faster_rcnn_model",
    "build_model",
    "build_proposals",
    "resolve_device",
    "set_threads",
    "split_name",
]

log = logging.getLogger(__name__)


def split_name(cfg: Config, split: str) -> str:
    """The data set split behind ``"train"``/``"test"`` (``data.train_split``/``test_split``);
    any other name is used as it is."""
    return {"train": cfg.data.train_split, "test": cfg.data.test_split}.get(split, split)


def build_dataset(cfg: Config, split: str = "train"):
    """The :class:`~mapdet.data.base.DetectionDataset` of ``split`` (``"train"``, ``"test"``
    or a split file name).

    ``digits`` writes the benchmark into ``data.root`` first when it is not there. ``voc``
    unites the ``data.train_years`` for training (07+12); difficult objects are always kept
    (flagged), the training step drops them unless ``data.use_difficult``. ``coco`` reads
    images from ``<root>/<split>`` when that folder exists, else from ``root``.
    """
    d = cfg.data
    name = split_name(cfg, split)
    if d.kind == "digits":
        from mapdet.data.digits import digits_dataset

        try:
            return digits_dataset(d.root, split=name, **d.digits)
        except TypeError as exc:  # an unknown parameter name in data.digits
            raise ConfigError(f"data.digits: {exc}") from None
    if d.kind == "voc":
        from mapdet.data.base import ConcatDataset
        from mapdet.data.voc import VOC_CLASSES, UnknownClassError, VOCDataset, find_voc_base

        years = d.train_years if split == "train" else [d.test_year]
        classes = tuple(d.classes) if d.classes is not None else VOC_CLASSES
        bases = list(dict.fromkeys(find_voc_base(d.root, y) for y in years))
        try:
            parts = [VOCDataset(b, year=str(y), split=name, class_names=classes,
                                use_difficult=True, skip_unknown=d.skip_unknown)
                     for b, y in zip(bases, years, strict=False)]
        except UnknownClassError as exc:
            text = str(exc).replace(" (pass skip_unknown=True to ignore such objects)", "")
            raise ConfigError(
                f"data.classes: {text}. List your classes in data.classes, or set "
                "data.skip_unknown: true to drop objects of other classes") from None
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if d.kind == "coco":
        from mapdet.data.coco import COCODataset

        ann = d.train_ann if split == "train" else d.test_ann
        if not ann:
            key = "data.train_ann" if split == "train" else "data.test_ann"
            raise ConfigError(f"{key}: needed for the {split} split of a COCO data set")
        image_dir = Path(d.root) / name
        return COCODataset(ann, image_dir if image_dir.is_dir() else d.root)
    raise ConfigError(f"data.kind: unknown {d.kind!r}; valid: voc, coco, digits")


def build_proposals(cfg: Config, dataset, split: str = "train", *, progress: bool = True,
                    cache: bool = True) -> dict[str, np.ndarray]:
    """Proposals of every image of ``dataset``: image id -> ``(P, 4)`` float32 xyxy.

    ``proposals.method: selective_search`` computes them (``mode``, ``resize_to``,
    ``min_size``, ``seed``) in ``num_workers`` processes and caches them in ``cache_dir``
    (``cache=False``: neither, for a few arbitrary images as in ``mapdet detect``).
    ``method: file`` reads ``proposals.file`` (training) or ``proposals.test_file``
    (``split="test"``); for images that belong to no split (``split="images"``, ``mapdet
    detect``), which no file can hold, Selective Search with the same options is computed.
    Then ``proposals.max_per_image`` (> 0) keeps the first that many of each image: the one
    place where that cap is applied, so that the cache holds every box and a new cap reuses
    it.

    ``model.arch: faster_rcnn`` has its own RPN: :class:`NoProposals` (every image: ``(0, 4)``),
    nothing is computed.
    """
    if cfg.model.arch == "faster_rcnn":
        return NoProposals()
    from mapdet.data.proposals import load_or_compute_proposals

    p = cfg.proposals
    file = None
    if p.method == "file" and split != "images":
        file = p.test_file if split == "test" else p.file
        if not file:
            key = "proposals.test_file" if split == "test" else "proposals.file"
            raise ConfigError(f"{key}: needed for the {split} split with proposals.method: file")
    elif p.method == "file":
        log.info("proposals.method is file: computing Selective Search (mode %s) for these "
                 "images, which no proposal file covers", p.mode)
    props = load_or_compute_proposals(
        dataset, method="selective_search", file=file,
        cache_dir=Path(p.cache_dir) if (cache and p.cache_dir) else None,
        num_workers=p.num_workers if cache else 0, max_proposals=None, min_size=p.min_size,
        mode=p.mode, resize_to=p.resize_to, seed=p.seed, progress=progress,
    )
    if p.max_per_image > 0:
        props = {k: v[: p.max_per_image] for k, v in props.items()}
    return props


class NoProposals(dict):
    """The proposals of a detector with its own RPN: every image id maps to ``(0, 4)``."""

    def __missing__(self, key: str) -> np.ndarray:
        return np.zeros((0, 4), np.float32)


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The detector of ``cfg.model`` with ``num_classes`` foreground classes: the
    :class:`~mapdet.models.fast_rcnn.FastRCNN`, or for ``arch: faster_rcnn`` a torchvision
    ``FasterRCNN`` (:func:`build_faster_rcnn_model`)."""
    from mapdet.models.fast_rcnn import FastRCNN

    m = cfg.model
    if m.arch == "faster_rcnn":
        return build_faster_rcnn_model(cfg, num_classes)
    try:
        return FastRCNN(m.backbone, num_classes, roi_op=m.roi_op, pretrained=m.pretrained,
                        fc_dim=m.fc_dim, dropout=m.dropout, freeze_at=m.freeze_at)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def build_faster_rcnn_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """torchvision's ``FasterRCNN`` for ``model.arch: faster_rcnn``.

    Backbone and ``pretrained`` from ``model``; images arrive normalised and resized by
    mapdet's data pipeline, so the model's transform has mean 0, std 1 and sizes
    ``data.scale``/``data.max_size`` (a no-op resize). Test-time post-processing from
    ``eval`` (``score_threshold``, ``nms_iou``, ``max_per_image``; 0: no cap); the softmax
    loss's RoI sample from ``train`` (``rois_per_image``, ``fg_fraction``, ``fg_iou``,
    ``bg_iou_high``); then ``model.faster_rcnn`` (any ``FasterRCNN`` keyword) on top.
    """
    from mapdet.models.faster_rcnn import build_faster_rcnn

    m, e, t = cfg.model, cfg.eval, cfg.train
    if m.freeze_at is not None:
        raise ConfigError("model.freeze_at: Fast R-CNN only; for arch faster_rcnn use "
                          "model.faster_rcnn.trainable_layers")
    kwargs = dict(
        box_score_thresh=e.score_threshold, box_nms_thresh=e.nms_iou,
        box_detections_per_img=e.max_per_image or 10**9,
        box_batch_size_per_image=t.rois_per_image, box_positive_fraction=t.fg_fraction,
        box_fg_iou_thresh=t.fg_iou, box_bg_iou_thresh=t.bg_iou_high,
    )
    kwargs.update(m.faster_rcnn)
    try:
        return build_faster_rcnn(m.backbone, num_classes, pretrained=m.pretrained,
                                 min_size=cfg.data.scale, max_size=cfg.data.max_size,
                                 image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0),
                                 **kwargs)
    except (ValueError, TypeError) as exc:  # TypeError: an unknown model.faster_rcnn keyword
        raise ConfigError(f"model: {exc}") from None


def build_criterion(cfg: Config, *, distributed: bool = False, model=None):
    """The :class:`mapdet.MAPLoss` of ``cfg.loss`` for ``train.loss: map`` (``None`` for the
    softmax loss, which has no options beyond ``train``).

    ``model.arch: faster_rcnn``: the loss goes inside ``model``'s RoI heads
    (:func:`mapdet.torchvision.use_map_loss`, ``loss.max_rois_per_image``,
    ``loss.map_loss_weight``) and uses the model's post-processing, i.e. ``eval``'s:
    ``loss.score_threshold``/``nms_iou`` that differ from ``eval``'s are an error naming both.
    The returned loss is the one inside the heads (its AP memory goes into checkpoints).
    """
    lc = cfg.loss
    if cfg.train.loss == "ap_loss_nms":
        from mapdet.loss import NMSAPLoss

        return NMSAPLoss(score_threshold=lc.score_threshold, nms_iou=lc.nms_iou,
                         match_iou=lc.match_iou,
                         delta=1.0 if lc.ranking_delta is None else lc.ranking_delta)
    if cfg.train.loss not in ("map", "softmax_map"):
        return None
    from mapdet import MAPLoss

    if cfg.model.arch == "faster_rcnn":
        return _faster_rcnn_criterion(cfg, distributed, model)
    return MAPLoss.from_config(lc, seed=cfg.train.seed, distributed=distributed)


def _faster_rcnn_criterion(cfg: Config, distributed: bool, model):
    from mapdet.torchvision import use_map_loss

    lc, e = cfg.loss, cfg.eval
    if model is None:
        raise ValueError("build_criterion: model.arch faster_rcnn needs the model")
    for key in ("score_threshold", "nms_iou"):
        if getattr(lc, key) != getattr(e, key):
            raise ConfigError(
                f"loss.{key}={getattr(lc, key)} differs from eval.{key}={getattr(e, key)}: "
                f"with model.arch faster_rcnn the mAP loss uses the model's test-time "
                f"post-processing (eval.*); set them equal")
    if lc.box_loss_weight != 1.0:
        raise ConfigError("loss.box_loss_weight: Fast R-CNN only (arch faster_rcnn keeps "
                          "torchvision's box loss, loss_box_reg)")
    from mapdet import MAPLoss

    use_map_loss(model, max_proposals=lc.max_rois_per_image or None,
                 map_weight=lc.map_loss_weight,
                 loss=MAPLoss.from_config(lc, seed=cfg.train.seed, distributed=distributed))
    return model.roi_heads.map_loss


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device!r} requested but CUDA is not available")
    return dev


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op CPU threads (0: leave torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
