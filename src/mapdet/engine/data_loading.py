"""From data set records to model-ready minibatches, for training and for evaluation.

A :class:`Sample` is one image resized (shorter side ``data.scale``, longer side at most
``data.max_size``), possibly flipped, normalised, with its ground truth and proposals in the
resized image's pixel coordinates. A :class:`Batch` pads the images of a minibatch to a
common size (bottom/right, so coordinates do not move).

Loading a sample is a pure function of ``(dataset index, flip)``: training draws those from
:class:`~mapdet.engine.schedule.DataOrder`, so a ``torch.utils.data.DataLoader`` with any
number of workers (``data.num_workers``) yields the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mapdet.config import Config
from mapdet.data.transforms import make_sample
from mapdet.engine.schedule import DataOrder

__all__ = ["Batch", "ImageLoader", "Sample", "collate", "make_eval_loader", "make_train_loader"]

@dataclass
class Sample:
    """One prepared image.

    Attributes:
        image: ``(3, h, w)`` float32, normalised RGB.
        boxes: ``(M, 4)`` float32 ground truth, resized-image pixels (all objects).
        labels: ``(M,)`` int64 in ``0..K-1``.
        difficult: ``(M,)`` bool.
        proposals: ``(P, 4)`` float32, resized-image pixels.
        size: ``(h, w)`` of the resized image.
        scale: resized / original size.
        flipped: whether the image was flipped horizontally.
        index: position in the data set; image_id: its string id.
        orig_size: ``(H, W)`` of the original image.
    """

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    proposals: torch.Tensor
    size: tuple[int, int]
    scale: float
    flipped: bool
    index: int
    image_id: str
    orig_size: tuple[int, int]


@dataclass
class Batch:
    """A minibatch: ``images (B, 3, H, W)`` padded, and the per-image samples."""

    images: torch.Tensor
    samples: list[Sample]

    def to(self, device: torch.device) -> Batch:
        """The batch with its images on ``device`` (per-image tensors stay on the CPU)."""
        return Batch(self.images.to(device, non_blocking=True), self.samples)


class ImageLoader(Dataset):
    """Map-style data set of :class:`Sample`, indexed by ``(dataset index, flip)``.

    Resizing, flipping and normalisation are :func:`mapdet.data.transforms.make_sample`.

    Args:
        dataset: a :class:`~mapdet.data.base.DetectionDataset`.
        proposals: image id -> ``(P, 4)`` float32 xyxy in original pixels.
        scale, max_size: the resize rule (:func:`mapdet.data.transforms.resize_scale`).

    The proposals are used as given (``proposals.max_per_image`` was applied when they were
    built, :func:`mapdet.engine.builders.build_proposals`).
    """

    def __init__(self, dataset, proposals: dict[str, np.ndarray], scale: int, max_size: int):
        self.dataset = dataset
        self.proposals = proposals
        self.scale = scale
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool] | int) -> Sample:
        index, flip = key if isinstance(key, tuple) else (key, False)
        rec = self.dataset[index]
        try:
            props = self.proposals[rec.image_id]
        except KeyError:
            raise KeyError(f"no proposals for image {rec.image_id!r} ({rec.path})") from None
        image = self.dataset.load_image(index)
        d = make_sample(image, rec.boxes, rec.labels, rec.difficult, props, scale=self.scale,
                        max_size=self.max_size, flip=flip, image_id=rec.image_id)
        return Sample(
            image=d["image"], boxes=d["boxes"], labels=d["labels"], difficult=d["difficult"],
            proposals=d["proposals"], size=(int(d["image"].shape[1]), int(d["image"].shape[2])),
            scale=float(d["scale"]), flipped=bool(flip), index=int(index),
            image_id=rec.image_id, orig_size=tuple(d["orig_size"]),
        )


def collate(samples: Sequence[Sample]) -> Batch:
    """Pad the images to the largest height and width of the batch (zeros, bottom/right)."""
    h = max(s.image.shape[1] for s in samples)
    w = max(s.image.shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, h, w)
    for i, s in enumerate(samples):
        images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
    return Batch(images, list(samples))


class _Iterations:
    """Batch sampler yielding ``[(index, flip), ...]`` for iterations ``start .. stop-1``."""

    def __init__(self, order: DataOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for it in range(self.start, self.stop):
            yield self.order.batch(it)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _batches(loader: DataLoader) -> Iterator[Batch]:
    """Iterate ``loader``; an error raised in a worker process comes back as the same
    exception type with its original one-line message (torch re-raises it with the
    worker's whole traceback in the message, which would not fit a one-line CLI error)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as exc:
            text = str(exc)
            if "Original Traceback" not in text:
                raise
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            prefix = f"{type(exc).__name__}: "
            message = last[len(prefix):] if last.startswith(prefix) else last
            try:
                clean = type(exc)(f"{message} (in data loader worker)")
            except Exception:  # an exception type that does not take one message
                raise exc from None
            raise clean from None
        yield batch


def _loader(images: ImageLoader, batch_sampler, num_workers: int) -> DataLoader:
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the global
    # torch RNG, which would shift the dropout stream of a resumed run.
    return DataLoader(images, batch_sampler=batch_sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=2 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def make_train_loader(dataset, proposals, cfg: Config, order: DataOrder, start: int, stop: int,
                      device: torch.device | None = None) -> Iterator[Batch]:
    """Batches of iterations ``start .. stop-1`` in the order of ``order``, on ``device``."""
    images = ImageLoader(dataset, proposals, cfg.data.scale, cfg.data.max_size)
    loader = _loader(images, _Iterations(order, start, stop), cfg.data.num_workers)
    for batch in _batches(loader):
        yield batch.to(device) if device is not None else batch


def make_eval_loader(dataset, proposals, cfg: Config, indices: Sequence[int] | None = None,
                     device: torch.device | None = None) -> Iterator[Batch]:
    """One-image batches of ``indices`` (default: all images, in order), never flipped."""
    images = ImageLoader(dataset, proposals, cfg.data.scale, cfg.data.max_size)
    idx = range(len(dataset)) if indices is None else indices
    loader = _loader(images, [[(int(i), False)] for i in idx], cfg.data.num_workers)
    for batch in _batches(loader):
        yield batch.to(device) if device is not None else batch
