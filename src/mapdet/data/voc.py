"""PASCAL VOC annotations: XML parsing and the VOC-layout data set.

Layout read by :class:`VOCDataset` (also used by the embedded digits benchmark)::

    <base>/Annotations/<id>.xml
    <base>/JPEGImages/<id>.jpg            (or the XML's <filename>, or <id>.png)
    <base>/ImageSets/Main/<split>.txt     one image id per line

Coordinates: VOC ``xmin..xmax`` are 1-based inclusive pixel indices. The internal box is
``[xmin - 1, ymin - 1, xmax, ymax]`` in continuous coordinates (so its continuous IoU equals the
devkit's ``+1`` IoU), clipped to the image. The XML's own numbers, unclipped, are kept in
``record.extra["voc_raw_boxes"]`` (see :func:`voc_raw_boxes`) for devkit-exact evaluation.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mapdet.data.base import (
    AnnotationError,
    DetectionDataset,
    ImageRecord,
    first_repeated,
    image_size,
)

__all__ = [
    "CLASS_FILE",
    "VOC_CLASSES",
    "UnknownClassError",
    "VOCDataset",
    "VOCObjects",
    "find_voc_base",
    "parse_voc_xml",
    "read_split",
    "read_voc_objects",
    "voc_raw_boxes",
]

logger = logging.getLogger(__name__)

#: The 20 PASCAL VOC classes in the devkit's order (label ``c`` is ``VOC_CLASSES[c]``).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: A VOC-layout root may name its classes in this file, one per line, in label order
#: (``mapdet eval --voc`` uses it when ``--classes`` is not given).
CLASS_FILE = "classes.txt"


def read_class_file(root: str | Path) -> tuple[str, ...] | None:
    """The class names listed in ``root/classes.txt`` (blank lines skipped), or ``None`` when
    the file does not exist. Raises ``AnnotationError`` naming the file for an empty list or a
    name listed twice."""
    path = Path(root) / CLASS_FILE
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise AnnotationError(f"{path}: no class names")
    repeated = first_repeated(names)
    if repeated is not None:
        raise AnnotationError(f"{path}: class {repeated!r} is listed more than once")
    return names


class UnknownClassError(AnnotationError):
    """An object's class name is not in the data set's class list (the message names the
    file, the object and the known classes)."""


_IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".JPEG", ".PNG", ".bmp")


def _text(elem: ET.Element | None, tag: str) -> str | None:
    """Stripped text of the child ``tag`` of ``elem``, or ``None`` when absent or empty."""
    if elem is None:
        return None
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    text = child.text.strip()
    return text or None


def _flag(obj: ET.Element, tag: str, where: str) -> bool:
    """A 0/1 flag such as ``difficult``; missing means 0; ``"1.0"`` is accepted."""
    text = _text(obj, tag)
    if text is None:
        return False
    try:
        return float(text) != 0.0
    except ValueError:
        raise AnnotationError(f"{where}: <{tag}> must be 0 or 1, got {text!r}") from None


def _resolve_image_path(image_dir: Path, image_id: str, filename: str | None) -> Path:
    """The image file of ``image_id``: the XML's ``<filename>`` if it exists, else ``<id>.jpg``,
    ``<id>.png``, ...; when none exists, ``<id>.jpg`` (``load_image`` then names it)."""
    candidates = []
    if filename:
        candidates.append(image_dir / filename)
    candidates += [image_dir / f"{image_id}{ext}" for ext in _IMAGE_EXTENSIONS]
    for c in candidates:
        if c.is_file():
            return c
    return image_dir / f"{image_id}.jpg"


class VOCObjects(NamedTuple):
    """The objects of one VOC annotation file, as written (nothing clipped or dropped).

    Attributes:
        width, height: the image size (``<size>``, or the image file's header).
        filename: the ``<filename>`` text, or ``None``.
        raw_boxes: ``(M, 4)`` float64, the XML's 1-based inclusive ``xmin, ymin, xmax, ymax``.
        labels: ``(M,)`` int64 in ``0..K-1``.
        difficult: ``(M,)`` bool.
        truncated: ``(M,)`` bool.
        skipped_unknown: the class names of the objects left out by ``skip_unknown``.
        dropped_difficult: how many ``difficult`` objects ``use_difficult=False`` left out.
    """

    width: int
    height: int
    filename: str | None
    raw_boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray
    skipped_unknown: tuple[str, ...] = ()
    dropped_difficult: int = 0


def read_voc_objects(
    path: str | Path,
    label_of: dict[str, int],
    *,
    data: bytes | None = None,
    image_dir: str | Path | None = None,
    image_id: str | None = None,
    use_difficult: bool = True,
    skip_unknown: bool = False,
) -> VOCObjects:
    """Parse one VOC annotation file into its objects, in file order, boxes as written.

    Args:
        path: the XML file (named in errors).
        label_of: class name -> label.
        data: the file's bytes when already read (else ``path`` is read).
        image_dir, image_id: where to find the image when ``<size>`` is missing or zero
            (default ``<xml folder>/../JPEGImages`` and the file's stem).
        use_difficult, skip_unknown: as in :func:`parse_voc_xml`.

    Raises:
        AnnotationError, FileNotFoundError: as :func:`parse_voc_xml`.
    """
    path = Path(path)
    try:
        root = ET.fromstring(data) if data is not None else ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"malformed XML in {path}: {exc}") from exc
    except OSError as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {exc}") from exc
    filename = _text(root, "filename")

    def image_path() -> Path:
        folder = Path(image_dir) if image_dir is not None else path.parent.parent / "JPEGImages"
        return _resolve_image_path(folder, image_id if image_id is not None else path.stem,
                                   filename)

    width, height = _read_size(root, path, image_path)
    raw, labels, difficult, truncated, skipped = [], [], [], [], []
    dropped_difficult = 0
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        where = f"{path}, object {k}" + (f" ({name!r})" if name else "")
        if name is None:
            raise AnnotationError(f"{where}: object without <name>")
        label = label_of.get(name)
        if label is None:
            if skip_unknown:
                logger.debug("%s: skipping unknown class %r", where, name)
                skipped.append(name)
                continue
            raise UnknownClassError(
                f"{where}: unknown class name {name!r}; known classes: {', '.join(label_of)}"
                " (pass skip_unknown=True to ignore such objects)"
            )
        is_difficult = _flag(obj, "difficult", where)
        if is_difficult and not use_difficult:
            dropped_difficult += 1
            continue
        raw.append(_read_bndbox(obj, where))
        labels.append(label)
        difficult.append(is_difficult)
        truncated.append(_flag(obj, "truncated", where))
    return VOCObjects(width, height, filename,
                      np.asarray(raw, dtype=np.float64).reshape(-1, 4),
                      np.asarray(labels, dtype=np.int64), np.asarray(difficult, dtype=bool),
                      np.asarray(truncated, dtype=bool), tuple(skipped), dropped_difficult)


def parse_voc_xml(
    path: str | Path,
    class_names: Sequence[str] = VOC_CLASSES,
    *,
    image_dir: str | Path | None = None,
    image_id: str | None = None,
    use_difficult: bool = True,
    skip_unknown: bool = False,
) -> ImageRecord:
    """Parse one VOC annotation file into an :class:`ImageRecord`.

    Args:
        path: the XML file.
        class_names: the ``K`` class names; an object's label is its name's position.
        image_dir: folder of the image files (default: ``<xml folder>/../JPEGImages``).
        image_id: the record's id (default: the XML file's stem).
        use_difficult: keep objects marked ``difficult`` (with ``difficult=True``); when
            ``False`` they are dropped (Fast R-CNN's training default). Keep ``True`` for
            evaluation: the devkit needs them to ignore detections that hit them.
        skip_unknown: drop objects whose class is not in ``class_names`` instead of raising
            (listed in ``VOCObjects.skipped_unknown``; :class:`VOCDataset` warns once with
            the count and a file).

    Returns:
        The record. ``boxes`` is ``(M, 4)`` float32 continuous ``xyxy``, clipped to the image;
        ``extra`` holds ``"voc_raw_boxes"`` ``(M, 4)`` float64 (the file's 1-based inclusive
        ``xmin, ymin, xmax, ymax``, unclipped), ``"truncated"`` ``(M,)`` bool,
        ``"xml_path"``, and ``"voc_devkit_objects"``: the :class:`VOCObjects` of the file,
        every object the devkit counts (degenerate and outside boxes included), for
        devkit-exact evaluation.

    Real-world quirks handled: float coordinates (``"273.5"``); missing ``difficult``,
    ``truncated`` or ``pose`` (treated as 0 / absent); unknown extra tags (ignored); a missing
    or zero ``<size>`` (read from the image file's header); boxes past the image border
    (clipped, with a warning naming file and object); boxes empty after clipping (dropped
    from ``boxes``, with a warning; the devkit still counts them, see above). An image
    without objects gives ``M = 0``.

    Raises:
        AnnotationError: malformed XML (with the parser's message), an object without
            ``<name>`` or with a missing / non-numeric coordinate, an unknown class name
            (listing the known ones) unless ``skip_unknown``; always naming the file.
        FileNotFoundError: ``<size>`` is missing and the image file does not exist.
    """
    path = Path(path)
    class_names = tuple(class_names)
    label_of = {c: i for i, c in enumerate(class_names)}
    objs = read_voc_objects(path, label_of, image_dir=image_dir, image_id=image_id,
                            use_difficult=use_difficult, skip_unknown=skip_unknown)
    image_id = image_id if image_id is not None else path.stem
    image_dir = Path(image_dir) if image_dir is not None else path.parent.parent / "JPEGImages"
    image_path = _resolve_image_path(image_dir, image_id, objs.filename)
    keep, boxes = [], []
    for k, raw in enumerate(objs.raw_boxes.tolist()):
        where = f"{path}, object {k} ({class_names[objs.labels[k]]!r})"
        box = _clip_box(raw, objs.width, objs.height, where)
        if box is not None:
            keep.append(k)
            boxes.append(box)
    return ImageRecord(
        image_id=image_id,
        path=image_path,
        width=objs.width,
        height=objs.height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=objs.labels[keep],
        difficult=objs.difficult[keep],
        extra={
            "voc_raw_boxes": objs.raw_boxes[keep].reshape(-1, 4),
            "truncated": objs.truncated[keep],
            "xml_path": path,
            "voc_devkit_objects": objs,
        },
    )


def _read_size(root: ET.Element, path: Path, image_path: Callable[[], Path]
               ) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, or from the image file (``image_path()``) when
    absent or zero."""
    size = root.find("size")
    try:
        w = float(_text(size, "width") or 0)
        h = float(_text(size, "height") or 0)
    except ValueError:
        raise AnnotationError(f"{path}: <size> has a non-numeric width or height") from None
    if w > 0 and h > 0:
        return int(round(w)), int(round(h))
    image_path = image_path()
    logger.debug("%s: no usable <size>; reading the size of %s", path, image_path)
    try:
        return image_size(image_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} has no <size> and its image {image_path} does not exist"
        ) from None


def _read_bndbox(obj: ET.Element, where: str) -> list[float]:
    """The raw ``[xmin, ymin, xmax, ymax]`` (1-based inclusive, as written) of an object."""
    bb = obj.find("bndbox")
    if bb is None:
        raise AnnotationError(f"{where}: object without <bndbox>")
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = _text(bb, tag)
        try:
            values.append(float(text))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise AnnotationError(
                f"{where}: <bndbox><{tag}> is missing or not a number: {text!r}"
            ) from None
    if not np.all(np.isfinite(values)):
        raise AnnotationError(f"{where}: <bndbox> has a non-finite coordinate: {values}")
    return values


def _clip_box(raw: list[float], width: int, height: int, where: str) -> list[float] | None:
    """Continuous ``[xmin-1, ymin-1, xmax, ymax]`` clipped to the image; ``None`` if empty.

    One warning naming ``where`` for a clipped box, one for a dropped one.
    """
    x1, y1, x2, y2 = raw[0] - 1.0, raw[1] - 1.0, raw[2], raw[3]
    if x2 <= x1 or y2 <= y1:
        logger.warning("%s: box %s (1-based) has xmax < xmin or ymax < ymin; dropped", where, raw)
        return None
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        logger.warning(
            "%s: box %s (1-based) lies outside the %dx%d image; dropped", where, raw, width, height
        )
        return None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        logger.warning(
            "%s: box %s (1-based) extends past the %dx%d image; clipped", where, raw, width, height
        )
    return [cx1, cy1, cx2, cy2]


def voc_raw_boxes(record: ImageRecord) -> np.ndarray:
    """The devkit's own numbers for a record's boxes: ``(M, 4)`` float64 1-based inclusive.

    Taken from ``record.extra["voc_raw_boxes"]`` when the record came from a VOC XML file;
    otherwise reconstructed from the continuous boxes as ``[x1 + 1, y1 + 1, x2, y2]``.
    """
    raw = record.extra.get("voc_raw_boxes")
    if raw is not None:
        return np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    b = record.boxes.astype(np.float64)
    return np.stack([b[:, 0] + 1, b[:, 1] + 1, b[:, 2], b[:, 3]], axis=1).reshape(-1, 4)


def _is_voc_base(p: Path) -> bool:
    return (p / "Annotations").is_dir() and (p / "ImageSets" / "Main").is_dir()


def find_voc_base(root: str | Path, year: str | int = "2007") -> Path:
    """The folder holding ``Annotations/`` and ``ImageSets/Main/``.

    Tried in order: ``root/VOC<year>``, ``root/VOCdevkit/VOC<year>``, ``root`` itself (a
    ``VOC2007``-style folder or a custom data set with the same layout).

    Raises:
        FileNotFoundError: none of these has the layout; the message lists what was tried.
    """
    root = Path(root).expanduser()
    tried = [root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}", root]
    for p in tried:
        if _is_voc_base(p):
            return p
    raise FileNotFoundError(
        "no VOC-layout folder (with Annotations/ and ImageSets/Main/) found; tried "
        + ", ".join(str(p) for p in tried)
    )


def read_split(base: str | Path, split: str) -> list[str]:
    """Image ids of ``base/ImageSets/Main/<split>.txt`` (first token of each non-empty line).

    Raises:
        FileNotFoundError: the split file is missing (the message lists the available splits).
        AnnotationError: an id is listed twice.
    """
    split_file = Path(base) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(
            p.stem
            for p in split_file.parent.glob("*.txt")
            if not re.search(r"_(train|val|test|trainval)$", p.stem)
        )
        raise FileNotFoundError(
            f"split file {split_file} not found; available splits: {', '.join(available) or 'none'}"
        )
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    repeated = first_repeated(ids)
    if repeated is not None:
        raise AnnotationError(f"{split_file}: image id {repeated!r} is listed more than once")
    return ids


class VOCDataset(DetectionDataset):
    """A PASCAL VOC (or VOC-layout) detection data set, all annotations parsed at construction.

    Args:
        root: the ``VOCdevkit`` folder (holding ``VOC<year>/``), its parent, or a
            ``VOC2007``-style folder / custom data set with the same layout (see
            :func:`find_voc_base`).
        year: ``"2007"``, ``"2012"``, ...: selects ``VOC<year>`` under ``root``; ignored when
            ``root`` itself has the layout. Also the tag used by :class:`ConcatDataset` when ids
            collide.
        split: the split file's stem in ``ImageSets/Main`` (``"trainval"``, ``"test"``, ...).
        class_names: the class names, label ``c`` = ``class_names[c]``.
        use_difficult: keep ``difficult`` objects (flagged); ``False`` drops them (training
            only; evaluation needs them).
        skip_unknown: ignore objects of classes not in ``class_names`` instead of raising.

    Raises:
        FileNotFoundError: no VOC layout under ``root`` or no such split.
        AnnotationError: a listed id has no XML file (the message gives how many and the first
            few), or an XML file is malformed (see :func:`parse_voc_xml`).
    """

    def __init__(
        self,
        root: str | Path,
        year: str | int = "2007",
        split: str = "trainval",
        class_names: Sequence[str] = VOC_CLASSES,
        use_difficult: bool = True,
        *,
        skip_unknown: bool = False,
    ) -> None:
        self.root = Path(root)
        self.base = find_voc_base(root, year)
        self.year = str(year)
        self.split = split
        self.use_difficult = use_difficult
        m = re.fullmatch(r"VOC(\d{4})", self.base.name)
        self.tag = m.group(1) if m else self.base.name
        if m and m.group(1) != self.year:
            logger.info(
                "%s: using year %s from the folder name (year=%s given)",
                self.base,
                m.group(1),
                self.year,
            )
            self.year = m.group(1)

        ids = read_split(self.base, split)
        ann_dir = self.base / "Annotations"
        missing = [i for i in ids if not (ann_dir / f"{i}.xml").is_file()]
        if missing:
            raise AnnotationError(
                f"{len(missing)} image id(s) listed in {self.base / 'ImageSets/Main' / split}.txt "
                f"have no annotation file in {ann_dir}, e.g. {', '.join(missing[:5])}"
            )
        image_dir = self.base / "JPEGImages"
        records = [
            parse_voc_xml(
                ann_dir / f"{i}.xml",
                class_names,
                image_dir=image_dir,
                image_id=i,
                use_difficult=use_difficult,
                skip_unknown=skip_unknown,
            )
            for i in ids
        ]
        super().__init__(class_names, records, name=f"{self.base.name}_{split}")
        objs = [r.extra["voc_devkit_objects"] for r in records]
        skipped = [(r.extra["xml_path"], o.skipped_unknown) for r, o in zip(records, objs,
                                                                             strict=True)
                   if o.skipped_unknown]
        if skipped:
            names = sorted({n for _, found in skipped for n in found})
            logger.warning(
                "%s: %d object(s) of classes not in the class list were skipped (skip_unknown) "
                "in %d of %d annotation files, e.g. %s; classes skipped: %s",
                ann_dir, sum(len(f) for _, f in skipped), len(skipped), len(records),
                skipped[0][0], ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
        logger.info(
            "%s: %d images, %d objects%s",
            self.name,
            len(records),
            sum(r.num_objects for r in records),
            "" if use_difficult else
            f" ({sum(o.dropped_difficult for o in objs)} difficult ones left out)",
        )
