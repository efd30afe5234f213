"""Detection data sets: the per-image record, the data-set base class and unions of data sets.

Every data set in :mod:`mapdet.data` (VOC, COCO, the digits benchmark, unions such as VOC 07+12)
is a :class:`DetectionDataset`: a tuple of class names and a list of :class:`ImageRecord`, one per
image, parsed once at construction. Images are read lazily with :meth:`DetectionDataset.load_image`.

Box convention (see ``docs/architecture.md``): ``xyxy`` float32 ``(M, 4)`` in continuous pixel
coordinates, pixel ``k`` covering ``[k, k+1)``, clipped to ``[0, width] x [0, height]``.
Format-specific conversions (VOC's 1-based inclusive pixels, COCO's ``xywh``) happen in the
readers, never here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AnnotationError",
    "ConcatDataset",
    "DetectionDataset",
    "ImageRecord",
    "first_repeated",
    "image_size",
    "read_image",
]

logger = logging.getLogger(__name__)


def first_repeated(items):
    """The first item of ``items`` (an iterable of hashables) equal to an earlier one, or
    ``None`` when all are distinct."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


class AnnotationError(ValueError):
    """An annotation file (XML, JSON, split list) is malformed or inconsistent.

    The message always names the offending file and, where it applies, the object in it.
    """


@dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        image_id: the data set's string id, e.g. ``"000005"`` (unique within a data set).
        path: the image file.
        width: image width in pixels.
        height: image height in pixels.
        boxes: ``(M, 4)`` float32 ``xyxy``, continuous pixel coordinates, clipped to the image.
        labels: ``(M,)`` int64 class indices in ``0..K-1``.
        difficult: ``(M,)`` bool; difficult objects are neither true nor false positives in
            evaluation (VOC ``difficult``; COCO ``iscrowd``).
        extra: format-specific extras aligned with the boxes, e.g. ``"voc_raw_boxes"``
            (``(M, 4)`` float64, the XML's 1-based inclusive numbers, unclipped) or
            ``"coco_image_id"``. Readers document the keys they set.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.width = int(self.width)
        self.height = int(self.height)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        m = self.boxes.shape[0]
        if self.labels.shape[0] != m or self.difficult.shape[0] != m:
            raise ValueError(
                f"image {self.image_id!r}: boxes has {m} rows but labels has "
                f"{self.labels.shape[0]} and difficult has {self.difficult.shape[0]}"
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"image {self.image_id!r}: size must be positive, got "
                f"width={self.width}, height={self.height}"
            )

    @property
    def num_objects(self) -> int:
        """Number of ground-truth boxes ``M``."""
        return int(self.boxes.shape[0])


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (grey and RGBA images are converted).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        OSError: the file exists but cannot be decoded (the message names it and gives PIL's
            reason).
    """
    from PIL import Image  # not at import: scoring result files reads no image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise OSError(f"cannot read image file {path}: {exc}") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only.

    Raises the same errors as :func:`read_image`.
    """
    from PIL import Image  # not at import: scoring result files reads no image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise OSError(f"cannot read image file {path}: {exc}") from exc


class DetectionDataset:
    """A list of :class:`ImageRecord` with class names.

    Args:
        class_names: the ``K`` foreground class names; label ``c`` is ``class_names[c]``.
        records: one record per image, image ids unique.
        name: a short human-readable name (used in logs and by :class:`ConcatDataset`).

    Subclasses (:class:`~mapdet.data.voc.VOCDataset`, :class:`~mapdet.data.coco.COCODataset`)
    parse their annotations in ``__init__`` and call this constructor.
    """

    def __init__(
        self, class_names: Sequence[str], records: Sequence[ImageRecord], name: str = ""
    ) -> None:
        self.class_names: tuple[str, ...] = tuple(str(c) for c in class_names)
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names contains duplicates: {self.class_names}")
        self.records: list[ImageRecord] = list(records)
        self.name = name or type(self).__name__
        self._index_of_id: dict[str, int] = {}
        for i, rec in enumerate(self.records):
            if rec.image_id in self._index_of_id:
                raise ValueError(f"data set {self.name!r}: duplicate image id {rec.image_id!r}")
            self._index_of_id[rec.image_id] = i
        k = len(self.class_names)
        for rec in self.records:
            if rec.labels.size and (rec.labels.min() < 0 or rec.labels.max() >= k):
                raise ValueError(
                    f"data set {self.name!r}, image {rec.image_id!r}: labels must be in "
                    f"0..{k - 1}, got {sorted(set(rec.labels.tolist()))}"
                )

    # -- sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, images={len(self)}, "
            f"classes={len(self.class_names)})"
        )

    # -- helpers -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``K``."""
        return len(self.class_names)

    @property
    def image_ids(self) -> list[str]:
        """The string image ids, in record order."""
        return [r.image_id for r in self.records]

    def index_of(self, image_id: str) -> int:
        """Position of the record with this string id; ``KeyError`` naming it when unknown."""
        try:
            return self._index_of_id[image_id]
        except KeyError:
            raise KeyError(f"data set {self.name!r} has no image with id {image_id!r}") from None

    def class_index(self, name: str) -> int:
        """Label ``0..K-1`` of a class name; ``KeyError`` listing the known names when unknown."""
        try:
            return self.class_names.index(name)
        except ValueError:
            raise KeyError(
                f"unknown class name {name!r} in data set {self.name!r}; "
                f"known classes: {', '.join(self.class_names)}"
            ) from None

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as ``(H, W, 3)`` uint8 RGB.

        Raises ``FileNotFoundError`` / ``OSError`` naming the file when it is missing or
        unreadable. A decoded size that differs from the record's is logged as a warning
        (the boxes were clipped to the record's size).
        """
        rec = self.records[i]
        image = read_image(rec.path)
        h, w = image.shape[:2]
        if (w, h) != (rec.width, rec.height):
            logger.warning(
                "image %s (id %r) is %dx%d but its annotation says %dx%d",
                rec.path,
                rec.image_id,
                w,
                h,
                rec.width,
                rec.height,
            )
        return image

    def class_counts(self) -> dict[str, tuple[int, int]]:
        """Per class ``(non-difficult, difficult)`` object counts, for logs and sanity checks."""
        counts = np.zeros((self.num_classes, 2), dtype=np.int64)
        for rec in self.records:
            np.add.at(counts, (rec.labels, rec.difficult.astype(np.int64)), 1)
        return {c: (int(a), int(b)) for c, (a, b) in zip(self.class_names, counts, strict=True)}


class ConcatDataset(DetectionDataset):
    """The union of data sets with the same class names, e.g. VOC 2007 + 2012 trainval.

    Image ids stay as they are when they are unique across the parts (VOC 2007's ``"000005"``
    and VOC 2012's ``"2008_000008"`` do not collide). When any id occurs in two parts, every
    id of every part is prefixed with that part's tag, ``"<tag>_<id>"``; the tag is the
    ``tags`` argument, else the part's ``tag`` attribute (the year, for VOC), else its
    position. The original id is kept in ``record.extra["source_image_id"]`` and the part
    in ``record.extra["source_dataset"]``.

    Raises:
        ValueError: no parts, class names that differ (the message shows both lists), or ids
            still colliding after prefixing (duplicate tags).
    """

    def __init__(
        self, datasets: Sequence[DetectionDataset], tags: Sequence[str] | None = None
    ) -> None:
        datasets = list(datasets)
        if not datasets:
            raise ValueError("ConcatDataset needs at least one data set")
        names = datasets[0].class_names
        for d in datasets[1:]:
            if d.class_names != names:
                raise ValueError(
                    f"ConcatDataset: class names of {d.name!r} {list(d.class_names)} differ "
                    f"from those of {datasets[0].name!r} {list(names)}"
                )
        if tags is None:
            tags = [str(getattr(d, "tag", "") or f"d{i}") for i, d in enumerate(datasets)]
        elif len(tags) != len(datasets):
            raise ValueError(f"ConcatDataset: {len(tags)} tags for {len(datasets)} data sets")
        all_ids = [r.image_id for d in datasets for r in d.records]
        prefix = len(set(all_ids)) != len(all_ids)
        if prefix:
            logger.info("ConcatDataset: image ids collide; prefixing them with tags %s", tags)
        records = []
        for j, (d, tag) in enumerate(zip(datasets, tags, strict=True)):
            for rec in d.records:
                new_id = f"{tag}_{rec.image_id}" if prefix else rec.image_id
                extra = dict(rec.extra, source_image_id=rec.image_id, source_dataset=j)
                records.append(dataclasses.replace(rec, image_id=new_id, extra=extra))
        if len({r.image_id for r in records}) != len(records):
            raise ValueError(
                f"ConcatDataset: image ids collide even after prefixing with tags {list(tags)}; "
                "give distinct tags (or do not include the same data set twice)"
            )
        self.datasets = datasets
        self.tags = tuple(tags)
        super().__init__(names, records, name="+".join(d.name for d in datasets))
