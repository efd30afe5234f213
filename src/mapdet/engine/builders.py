"""Build the pieces of a run from its :class:`~mapdet.config.Config`: data set, proposals,
model, device."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mapdet.config import Config, ConfigError

__all__ = [
    "build_dataset",
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
        from mapdet.data.voc import VOCDataset

        years = d.train_years if split == "train" else [d.test_year]
        parts = [VOCDataset(d.root, year=str(y), split=name, use_difficult=True) for y in years]
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


def build_proposals(cfg: Config, dataset, split: str = "train",
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Proposals of every image of ``dataset`` (computed once and cached, or read from
    ``proposals.file`` / ``proposals.test_file``): image id -> ``(P, 4)`` float32 xyxy."""
    from mapdet.data.proposals import load_or_compute_proposals

    p = cfg.proposals
    file = None
    if p.method == "file":
        file = p.test_file if split == "test" else p.file
        if not file:
            key = "proposals.test_file" if split == "test" else "proposals.file"
            raise ConfigError(f"{key}: needed for the {split} split with proposals.method: file")
    return load_or_compute_proposals(
        dataset, method="selective_search" if p.method == "file" else p.method,
        cache_dir=Path(p.cache_dir) if p.cache_dir else None, file=file,
        num_workers=p.num_workers, max_proposals=p.max_proposals or None, min_size=p.min_size,
        mode=p.mode, resize_to=p.resize_to, seed=cfg.train.seed, progress=progress,
    )


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The :class:`~mapdet.models.fast_rcnn.FastRCNN` of ``cfg.model`` with ``num_classes``
    foreground classes."""
    from mapdet.models.fast_rcnn import FastRCNN

    m = cfg.model
    try:
        return FastRCNN(m.backbone, num_classes, roi_op=m.roi_op, pretrained=m.pretrained,
                        fc_dim=m.fc_dim, dropout=m.dropout, freeze_at=m.freeze_at)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


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
