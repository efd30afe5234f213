"""The ground truth of a VOC split for evaluation: every object the devkit counts, cached.

:func:`load_voc_ground_truth` reads ``ImageSets/Main/<split>.txt`` and the annotation XML of
each listed image (:func:`mapdet.data.voc.read_voc_objects`: the same parser, quirks and
errors as :class:`~mapdet.data.voc.VOCDataset`), and keeps every object as written, in file
order: the devkit (``voc_eval.py``, ``VOCevaldet.m``) counts degenerate boxes
(``xmax < xmin``) and boxes wholly outside the image like any other, so devkit-mode scoring
needs them. The continuous convention uses :meth:`VOCGroundTruth.continuous_boxes`, the
boxes clipped to the image with the empty ones dropped (exactly those of ``VOCDataset``).

Plain annotation files (nearly all) are read by the fast scanner of
:mod:`mapdet.evaluation.voc_xml`, which gives the same numbers; any other goes through
``read_voc_objects``.

**The cache.** Parsing thousands of XML files dominates evaluation from files, so the result
is cached in one ``.npz`` file per (VOC folder, split, class list): arrays only, read with
``allow_pickle=False``, written atomically (:mod:`mapdet.io`). It is valid only while the
split's image list and every listed annotation file's size and modification time
(``st_size``, ``st_mtime_ns``) are unchanged, all checked on each load (one ``stat`` per
file); anything else, or an unreadable cache, means parsing again. Unlike ``voc_eval.py``'s
``annots.pkl``, which is reused whatever changed, an edited annotation is never scored from
a stale cache (short of an edit that keeps both the size and the modification time).
Default folder: ``$MAPDET_CACHE_DIR`` or ``~/.cache/mapdet``, under ``voc_annotations/``;
an unwritable cache folder only costs a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapdet.data.base import AnnotationError
from mapdet.data.voc import read_split, read_voc_objects
from mapdet.evaluation.voc_xml import scan_voc_objects
from mapdet.io import atomic_write_bytes

__all__ = ["CACHE_VERSION", "VOCGroundTruth", "default_cache_dir", "load_voc_ground_truth"]

logger = logging.getLogger("mapdet.evaluation.voc")

#: Bumped whenever the cached arrays' meaning changes.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$MAPDET_CACHE_DIR``, else ``~/.cache/mapdet``."""
    env = os.environ.get("MAPDET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mapdet"


@dataclass
class VOCGroundTruth:
    """Every annotated object of a split, as written.

    Attributes:
        image_ids: ``(N,)`` the split's image ids, in split-file order.
        width, height: ``(N,)`` int64 image sizes.
        image: ``(M,)`` int64 image index of each object (non-decreasing: file order).
        labels: ``(M,)`` int64 in ``0..K-1``.
        difficult: ``(M,)`` bool.
        raw_boxes: ``(M, 4)`` float64, the XML's 1-based inclusive numbers.
    """

    image_ids: list[str]
    width: np.ndarray
    height: np.ndarray
    image: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    raw_boxes: np.ndarray

    def continuous_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keep (M,) bool, boxes (M', 4) float64)``: ``[xmin - 1, ymin - 1, xmax, ymax]``
        clipped to the image and rounded to float32 as in :class:`~mapdet.data.voc.VOCDataset`
        records; boxes empty before or after clipping are dropped (``keep`` false)."""
        x1, y1 = self.raw_boxes[:, 0] - 1.0, self.raw_boxes[:, 1] - 1.0
        x2, y2 = self.raw_boxes[:, 2], self.raw_boxes[:, 3]
        w = self.width[self.image].astype(np.float64)
        h = self.height[self.image].astype(np.float64)
        clipped = np.stack([np.minimum(np.maximum(x1, 0.0), w), np.minimum(np.maximum(y1, 0.0), h),
                            np.minimum(np.maximum(x2, 0.0), w), np.minimum(np.maximum(y2, 0.0), h)],
                           axis=1)
        keep = ((x2 > x1) & (y2 > y1) & (clipped[:, 2] > clipped[:, 0])
                & (clipped[:, 3] > clipped[:, 1]))
        return keep, clipped[keep].astype(np.float32).astype(np.float64)

    def dropped_count(self) -> int:
        """How many objects the continuous convention drops (degenerate or outside)."""
        return int((~self.continuous_boxes()[0]).sum())


def _signature(paths: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """``(N, 2)`` int64 ``[st_size, st_mtime_ns]`` of each file, and the missing ones."""
    sig = np.zeros((len(paths), 2), dtype=np.int64)
    missing = []
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            missing.append(i)
            continue
        sig[i, 0], sig[i, 1] = st.st_size, st.st_mtime_ns
    return sig, missing


def _cache_file(cache_dir: Path, ann_dir: Path, split: str, class_names: Sequence[str],
                skip_unknown: bool) -> Path:
    key = "\n".join([str(CACHE_VERSION), str(ann_dir.resolve()), split, str(skip_unknown),
                     *class_names])
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]
    return cache_dir / "voc_annotations" / f"{split}_{digest}.npz"


def _load_cache(path: Path, ids: list[str], sig: np.ndarray) -> VOCGroundTruth | None:
    """The cached ground truth if ``path`` holds one for exactly these ids and signatures."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if (int(z["version"]) != CACHE_VERSION or z["image_ids"].shape != (len(ids),)
                    or not np.array_equal(z["signature"], sig)
                    or z["image_ids"].tolist() != ids):
                return None
            return VOCGroundTruth(ids, z["width"], z["height"], z["image"], z["labels"],
                                  z["difficult"], z["raw_boxes"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # a truncated or foreign file: parse again
        logger.debug("annotation cache %s unusable (%s); parsing the XML files", path, exc)
        return None


def _save_cache(path: Path, gt: VOCGroundTruth, sig: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, version=np.int64(CACHE_VERSION), image_ids=np.asarray(gt.image_ids, dtype=str),
             signature=sig, width=gt.width, height=gt.height, image=gt.image, labels=gt.labels,
             difficult=gt.difficult, raw_boxes=gt.raw_boxes)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        logger.warning("cannot write the annotation cache %s (%s); continuing without it",
                       path, exc)


def _read_file(path: str, size: int) -> bytes:
    """The bytes of ``path``, whose size ``os.stat`` gave as ``size``: one ``read`` call when
    the file still has that size, else reads to the end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        chunks = [data]
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 16))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_all(ann_dir: Path, image_dir: Path, ids: list[str], class_names: Sequence[str],
               skip_unknown: bool, sizes: np.ndarray) -> VOCGroundTruth:
    label_of = {c: i for i, c in enumerate(class_names)}
    n = len(ids)
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)
    image, labels, difficult, raw = [], [], [], []
    folder = str(ann_dir)
    for i, image_id in enumerate(ids):
        path = os.path.join(folder, f"{image_id}.xml")
        data = _read_file(path, int(sizes[i]))
        objs = scan_voc_objects(data, label_of, skip_unknown=skip_unknown)
        if objs is None:  # not plain: the reference reader (and its errors)
            objs = read_voc_objects(Path(path), label_of, data=data, image_dir=image_dir,
                                    image_id=image_id, skip_unknown=skip_unknown)
        width[i], height[i] = objs.width, objs.height
        image.extend([i] * len(objs.labels))
        labels.extend(objs.labels)
        difficult.extend(objs.difficult)
        raw.extend(objs.raw_boxes)
    return VOCGroundTruth(
        list(ids), width, height, np.array(image, dtype=np.int64),
        np.array(labels, dtype=np.int64), np.array(difficult, dtype=bool),
        np.array(raw, dtype=np.float64).reshape(-1, 4),
    )


def load_voc_ground_truth(
    base: str | Path,
    split: str,
    class_names: Sequence[str],
    *,
    cache_dir: str | Path | None | bool = None,
    skip_unknown: bool = False,
) -> VOCGroundTruth:
    """The ground truth of ``base/ImageSets/Main/<split>.txt`` (see the module docstring).

    Args:
        base: the VOC folder holding ``Annotations/`` and ``ImageSets/Main/`` (see
            :func:`mapdet.data.voc.find_voc_base`).
        split: the split file's stem.
        class_names: the ``K`` class names (label ``c`` is ``class_names[c]``).
        cache_dir: the cache folder; ``None`` for :func:`default_cache_dir`, ``False`` for
            no cache.
        skip_unknown: ignore objects of classes not in ``class_names`` instead of raising.

    Raises:
        FileNotFoundError: no such split file.
        AnnotationError: a listed image has no annotation file (the message gives how many and
            the first few), or a malformed one (naming it).
    """
    base = Path(base)
    ann_dir = base / "Annotations"
    ids = read_split(base, split)
    paths = [os.path.join(ann_dir, f"{i}.xml") for i in ids]
    sig, missing = _signature(paths)
    if missing:
        raise AnnotationError(
            f"{len(missing)} image id(s) listed in {base / 'ImageSets/Main' / split}.txt "
            f"have no annotation file in {ann_dir}, e.g. "
            + ", ".join(ids[i] for i in missing[:5])
        )
    cache = None
    if cache_dir is not False:
        folder = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        cache = _cache_file(folder, ann_dir, split, class_names, skip_unknown)
        gt = _load_cache(cache, ids, sig)
        if gt is not None:
            logger.debug("annotations of %s/%s from the cache %s", base, split, cache)
            return gt
    gt = _parse_all(ann_dir, base / "JPEGImages", ids, class_names, skip_unknown, sig[:, 0])
    if cache is not None:
        _save_cache(cache, gt, sig)
    return gt
