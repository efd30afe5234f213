"""MS COCO-format detection data sets.

Conversions done here, at the edge:

- category ids (sparse, e.g. 1..90) become contiguous labels ``0..K-1`` in increasing id
  order; :attr:`COCODataset.label_to_category_id` and :attr:`COCODataset.category_id_to_label`
  keep the mapping both ways (needed to export a COCO results JSON);
- ``bbox = [x, y, w, h]`` (continuous, COCO's own convention) becomes ``[x, y, x + w, y + h]``,
  clipped to the image; boxes empty after clipping are dropped with a warning;
- ``iscrowd = 1`` regions are kept with ``difficult = True``. Choice: a crowd region is then
  ignored by the VOC-style evaluation (a detection whose best match is a crowd box counts as
  neither a true nor a false positive), which approximates COCO's own crowd handling, and the
  mAP training loss treats it the same way. Pass ``include_crowd=False`` to drop them instead.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from mapdet.data.base import AnnotationError, DetectionDataset, ImageRecord, image_size

__all__ = ["COCODataset"]

logger = logging.getLogger(__name__)


class CocoIndex:
    """The lookups of a COCO annotation file that the data set needs, with pycocotools' names
    (``dataset``, ``imgs``, ``anns``, ``cats``, ``imgToAnns``, ``getCatIds``, ``loadCats``,
    ``getImgIds``) and no dependency. Ids are kept as the file writes them.

    Raises ``KeyError`` (an entry without ``id``, ``image_id``) or ``TypeError`` (an entry
    that is not an object), as pycocotools' ``createIndex`` does."""

    def __init__(self, dataset: dict):
        self.dataset = dataset
        self.imgs = {img["id"]: img for img in dataset.get("images", [])}
        self.cats = {cat["id"]: cat for cat in dataset.get("categories", [])}
        self.anns: dict = {}
        self.imgToAnns: dict = defaultdict(list)
        for ann in dataset.get("annotations", []):
            self.imgToAnns[ann["image_id"]].append(ann)
            self.anns[ann["id"]] = ann

    def getCatIds(self) -> list:
        return list(self.cats)

    def loadCats(self, ids) -> list:
        return [self.cats[i] for i in ids]

    def getImgIds(self) -> list:
        return list(self.imgs)


def _load_coco(annotation_json: Path) -> CocoIndex:
    """A :class:`CocoIndex` of the file, with clear errors naming it."""
    if not annotation_json.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_json}")
    try:
        with open(annotation_json, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"malformed JSON in {annotation_json}: {exc}") from exc
    if not isinstance(data, dict):
        raise AnnotationError(f"{annotation_json}: top level must be a JSON object")
    for key in ("images", "categories"):
        if key not in data:
            raise AnnotationError(f"{annotation_json}: missing the {key!r} list")
    data.setdefault("annotations", [])
    _check_ids(annotation_json, data)
    try:
        return CocoIndex(data)
    except (KeyError, TypeError) as exc:
        raise AnnotationError(f"{annotation_json}: malformed COCO structure: {exc!r}") from exc


def _check_ids(annotation_json: Path, data: dict) -> None:
    """Refuse what pycocotools' index would drop without a word: an image id listed twice
    (the later entry hides the earlier) and annotations whose ``image_id`` is not in
    ``images`` (no record would hold them: the ground truth would silently shrink)."""
    images, anns = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(anns, list):
        raise AnnotationError(f"{annotation_json}: 'images' and 'annotations' must be lists")
    ids: set = set()
    for k, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img:
            raise AnnotationError(f"{annotation_json}: images[{k}] has no 'id'")
        try:
            if img["id"] in ids:
                raise AnnotationError(
                    f"{annotation_json}: image id {img['id']!r} is listed more than once in "
                    "'images'")
            ids.add(img["id"])
        except TypeError:
            raise AnnotationError(f"{annotation_json}: images[{k}] has an id of type "
                                  f"{type(img['id']).__name__}") from None
    dangling = []
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise AnnotationError(f"{annotation_json}: annotations[{k}] has no 'image_id'")
        try:
            if ann["image_id"] not in ids:
                dangling.append(ann)
        except TypeError:
            raise AnnotationError(f"{annotation_json}: annotations[{k}] has an image_id of "
                                  f"type {type(ann['image_id']).__name__}") from None
    if dangling:
        first = ", ".join(f"{a.get('id')!r} (image_id {a['image_id']!r})" for a in dangling[:3])
        raise AnnotationError(
            f"{annotation_json}: {len(dangling)} of {len(anns)} annotations refer to an "
            f"image_id that is not in 'images', e.g. annotation {first}; add the images or "
            "remove those annotations")


class COCODataset(DetectionDataset):
    """A COCO-format detection data set.

    Args:
        annotation_json: the ``instances_*.json`` file.
        image_dir: folder of the images named by ``file_name``.
        include_crowd: keep ``iscrowd`` regions as ``difficult`` boxes (default) or drop them.

    Records: ``image_id`` is the COCO image id as a string; ``extra`` holds ``"coco_image_id"``
    (int), ``"coco_annotation_ids"`` ``(M,)`` int64 and ``"iscrowd"`` ``(M,)`` bool, aligned
    with the boxes. Images are sorted by COCO id; images without annotations are kept.

    Attributes:
        coco: the file's :class:`CocoIndex`.
        label_to_category_id: tuple, ``label_to_category_id[c]`` is the COCO category id of
            label ``c``.
        category_id_to_label: dict, the inverse.

    Raises:
        FileNotFoundError: the JSON file is missing.
        AnnotationError: malformed JSON or COCO structure, an annotation referring to an
            unknown category or to an image id not in ``images``, an image id listed twice,
            or a bad ``bbox`` (always naming the file).
    """

    def __init__(
        self, annotation_json: str | Path, image_dir: str | Path, *, include_crowd: bool = True
    ) -> None:
        self.annotation_json = Path(annotation_json)
        self.image_dir = Path(image_dir)
        self.coco = _load_coco(self.annotation_json)
        try:
            cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
            self.label_to_category_id: tuple[int, ...] = tuple(int(c["id"]) for c in cats)
            self.category_id_to_label: dict[int, int] = {
                cid: i for i, cid in enumerate(self.label_to_category_id)
            }
            class_names = [str(c.get("name", c["id"])) for c in cats]
            records = [self._record(img_id, include_crowd)
                       for img_id in sorted(self.coco.getImgIds())]
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            if isinstance(exc, AnnotationError):
                raise
            # a value of the wrong type or a missing key that the checks above did not name
            raise AnnotationError(
                f"{self.annotation_json}: malformed COCO structure ({type(exc).__name__}: "
                f"{exc})") from exc
        super().__init__(class_names, records, name=self.annotation_json.stem)
        logger.info(
            "%s: %d images, %d classes, %d objects",
            self.name,
            len(records),
            len(class_names),
            sum(r.num_objects for r in records),
        )

    def _record(self, img_id: int, include_crowd: bool) -> ImageRecord:
        src = self.annotation_json
        info = self.coco.imgs[img_id]
        path = self.image_dir / str(info.get("file_name", f"{img_id}.jpg"))
        width, height = int(info.get("width") or 0), int(info.get("height") or 0)
        if width <= 0 or height <= 0:
            try:
                width, height = image_size(path)
            except (OSError, AnnotationError) as exc:
                raise AnnotationError(f"{src}, image {img_id}: no width and height, and the "
                                      f"image cannot tell them: {exc}") from exc
        boxes, labels, crowd, ann_ids = [], [], [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            where = f"{src}, annotation {ann.get('id')} (image {img_id})"
            cat = ann.get("category_id")
            if cat not in self.category_id_to_label:
                raise AnnotationError(
                    f"{where}: unknown category_id {cat!r}; known ids: "
                    f"{list(self.label_to_category_id)}"
                )
            is_crowd = bool(ann.get("iscrowd", 0))
            if is_crowd and not include_crowd:
                continue
            bbox = ann.get("bbox")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}") from None
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if not (x2 > x1 and y2 > y1):
                logger.warning(
                    "%s: bbox %s is empty inside the %dx%d image; dropped",
                    where,
                    bbox,
                    width,
                    height,
                )
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.category_id_to_label[cat])
            crowd.append(is_crowd)
            ann_ids.append(int(ann.get("id", -1)))
        box_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if not np.isfinite(box_arr).all():
            raise AnnotationError(f"{src}, image {img_id}: a bbox or the image size is too large "
                                  f"for float32 ({width}x{height})")
        crowd_arr = np.asarray(crowd, dtype=bool)
        return ImageRecord(
            image_id=str(img_id),
            path=path,
            width=width,
            height=height,
            boxes=box_arr,
            labels=np.asarray(labels, dtype=np.int64),
            difficult=crowd_arr.copy(),
            extra={
                "coco_image_id": int(img_id),
                "coco_annotation_ids": np.asarray(ann_ids, dtype=np.int64),
                "iscrowd": crowd_arr,
            },
        )

    def coco_image_id(self, i: int) -> int:
        """The COCO (integer) image id of record ``i``."""
        return int(self.records[i].extra["coco_image_id"])
