"""PASCAL VOC scoring of detections, in memory or from devkit result files.

Definitions (docs/method.md, section 2). For one class, walk the detections by score
descending (ties: earlier detection first). Detection ``d`` takes the ground truth ``g*(d)``
of its own image with the largest IoU (ties: lowest index), difficult ones included. If the
IoU clears the threshold: a difficult ``g*`` makes ``d`` ignored (neither TP nor FP), a free
``g*`` makes it a TP (and taken), a taken one a FP (duplicate); otherwise ``d`` is a FP.
With ``npos`` the number of non-difficult ground truths, ``tp_k``/``fp_k`` the counts among
the first ``k`` non-ignored detections, ``rec_k = tp_k / npos``, ``prec_k = tp_k / k`` and
the precision made monotone ``P(r) = max_{k: rec_k >= r} prec_k``:

- ``metric="area"`` (VOC 2010 onward): ``AP = sum_k (rec_k - rec_{k-1}) P(rec_k)``;
- ``metric="voc07"``: ``AP = 1/11 sum_{t in {0, 0.1, ..., 1}} P(t)`` (``P(t) = 0`` when no
  recall reaches ``t``).

``npos = 0`` leaves the AP undefined (NaN); ``mAP`` is the mean over the classes where it is
defined. The numbers come from :mod:`mapdet.core.ap`.

Two conventions:

- ``"devkit"`` reproduces the official devkit (py-faster-rcnn's ``voc_eval.py``, the MATLAB
  ``VOCevaldet.m``) to the last bit: raw 1-based inclusive coordinates (the XML's numbers for
  the ground truth, ``x1 + 1, y1 + 1, x2, y2`` for continuous detections), widths
  ``x2 - x1 + 1`` and the strict test ``IoU > 0.5``. Since the core matches on
  ``IoU >= theta``, devkit mode passes ``theta = nextafter(0.5, +inf)``, the smallest double
  above 0.5: for doubles, ``IoU >= nextafter(0.5, inf)`` is exactly ``IoU > 0.5``.
- ``"continuous"`` is the project's own definition: continuous boxes (the data set's clipped
  ground truth), widths ``x2 - x1`` and ``IoU >= 0.5``.

Order of tied scores: ``voc_eval.py`` sorts with ``np.argsort(-confidence)``, numpy's default
quicksort, which is not stable, so the order of tied detections (and hence the AP) is left to
the sort's implementation; MATLAB's ``sort`` in the devkit is stable. mapdet is stable in both
conventions: tied detections keep their order in the input (the line order of a result file).

Ground truth the devkit counts: ``voc_eval.py`` and ``VOCevaldet.m`` keep every annotated
object, degenerate boxes (``xmax < xmin``) and boxes wholly outside the image included (such
objects can never be matched, but a non-difficult one counts in ``npos``). Devkit mode does
the same: from files through :mod:`mapdet.evaluation.voc_annotations`, in memory through
``record.extra["voc_devkit_objects"]`` (set by the VOC reader). The continuous convention
scores the data set's boxes, clipped to the image, where such objects are dropped.

Result files (``comp4_det_<split>_<class>.txt``; lines ``image_id score x1 y1 x2 y2``, 1-based
inclusive coordinates) are read by :mod:`mapdet.evaluation.voc_results` (vectorised). A
missing class file is not an error by default (the devkit would fail): it counts as no
detections, so that class's AP is 0, and a warning names it; ``allow_missing=False`` makes it
an error. No file at all is always an error (a wrong folder or split name).

Speed: the matching is vectorised (:mod:`mapdet.evaluation.voc_scoring`), the result files are
tokenised with numpy and the annotations cached; ``benchmarks/bench_eval.py`` measures it
against ``voc_eval.py``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mapdet.core.ap import check_ap_method
from mapdet.data.base import DetectionDataset, ImageRecord
from mapdet.data.voc import VOC_CLASSES, find_voc_base, voc_raw_boxes
from mapdet.evaluation.export import atomic_write_text, check_image_detections
from mapdet.evaluation.voc_annotations import load_voc_ground_truth
from mapdet.evaluation.voc_results import (
    WIDTH_TOLERANCE,
    ClassDetections,
    ImageIndex,
    ResultsFormatError,
    find_results_folder,
    read_devkit_results,
    read_result_file,
    read_result_file_indexed,
    result_paths,
)
from mapdet.evaluation.voc_scoring import ClassGroundTruth, devkit_threshold, score_class

__all__ = [
    "CONVENTIONS",
    "METRICS",
    "ClassDetections",
    "EvalResult",
    "ResultsFormatError",
    "detections_by_class",
    "devkit_threshold",
    "evaluate_voc",
    "evaluate_voc_results_dir",
    "find_results_folder",
    "read_devkit_results",
    "read_result_file",
]

logger = logging.getLogger(__name__)

METRICS = ("voc07", "area")
CONVENTIONS = ("devkit", "continuous")
BOX_FORMATS = ("continuous", "raw")


# -- in-memory detections ------------------------------------------------------------------


def detections_by_class(
    detections: Mapping[str, Mapping], class_names: Sequence[str]
) -> dict[str, ClassDetections]:
    """Regroup per-image detections by class.

    Args:
        detections: image id -> ``{"boxes" (D, 4) continuous xyxy, "scores" (D,),
            "labels" (D,) in 0..K-1}``.
        class_names: the ``K`` class names.

    Returns:
        class name -> ``(image_ids, scores, boxes)`` with continuous boxes (pass
        ``box_format="continuous"`` to :func:`evaluate_voc`), detections in image order, then
        in their order within the image.
    """
    k = len(class_names)
    ids, scores, boxes, labels = [], [], [], []
    for image_id, det in detections.items():
        b, s, lab = check_image_detections(image_id, det, k)
        ids.extend([image_id] * lab.size)
        scores.append(s)
        boxes.append(b)
        labels.append(lab)
    ids_a = np.asarray(ids, dtype=object)
    scores_a = np.concatenate(scores) if scores else np.zeros(0)
    boxes_a = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    labels_a = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    out = {}
    for c, name in enumerate(class_names):
        sel = labels_a == c
        out[name] = (ids_a[sel].tolist(), scores_a[sel], boxes_a[sel])
    return out


# -- results -------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-class and mean AP of one evaluation.

    Attributes:
        mAP: mean of the defined per-class APs (NaN if none is defined).
        per_class: class name -> AP in ``[0, 1]``, NaN where ``npos == 0``.
        metric: ``"voc07"`` or ``"area"``.
        convention: ``"devkit"`` or ``"continuous"``.
        npos: class name -> number of non-difficult ground truths.
        num_detections: class name -> number of detections scored.
        match_iou: the nominal IoU threshold (0.5).
        num_images: the number of evaluated images.
        curves: class name -> ``(recall (D',), precision (D',))`` after each non-ignored
            detection (for plots; not in :meth:`to_json`).
        blame: the detections that cost the AP most (``blame=K`` of the evaluating
            functions; :class:`~mapdet.evaluation.blame.BlameReport`), else ``None``; not in
            :meth:`to_json`.
    """

    mAP: float
    per_class: dict[str, float]
    metric: str
    convention: str
    npos: dict[str, int]
    num_detections: dict[str, int] = field(default_factory=dict)
    match_iou: float = 0.5
    num_images: int = 0
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    blame: Any = field(default=None, repr=False)

    @property
    def defined_classes(self) -> list[str]:
        """The classes whose AP is defined (``npos > 0``)."""
        return [c for c, ap in self.per_class.items() if not math.isnan(ap)]

    def to_json(self) -> dict:
        """A JSON-ready dict: ``{"mAP", "per_class", "metric", "convention", "match_iou",
        "npos", "num_detections"}``; undefined APs (NaN) become ``null``."""
        return {
            "mAP": _json_float(self.mAP),
            "per_class": {c: _json_float(v) for c, v in self.per_class.items()},
            "metric": self.metric,
            "convention": self.convention,
            "match_iou": self.match_iou,
            "npos": dict(self.npos),
            "num_detections": dict(self.num_detections),
        }

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (indented, atomically); return the path."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# -- scoring -------------------------------------------------------------------------------


def _check_options(metric: str, convention: str, box_format: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    check_ap_method(metric)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {list(BOX_FORMATS)}, got {box_format!r}")


def _record_objects(record: ImageRecord, convention: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes (M, 4) float64, labels (M,), difficult (M,))`` of a record in a convention:
    in devkit mode every object the devkit counts, raw 1-based (``extra["voc_devkit_objects"]``
    when the record came from a VOC XML file, else the raw numbers of its boxes); else the
    record's continuous boxes."""
    if convention != "devkit":
        return record.boxes.astype(np.float64), record.labels, record.difficult
    objs = record.extra.get("voc_devkit_objects")
    if objs is not None:
        return (np.asarray(objs.raw_boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(objs.labels, dtype=np.int64), np.asarray(objs.difficult, dtype=bool))
    raw = voc_raw_boxes(record)
    if raw.shape[0] != record.labels.shape[0]:
        raise ValueError(f"image {record.image_id!r}: {raw.shape[0]} raw boxes for "
                         f"{record.labels.shape[0]} labels")
    return raw, record.labels, record.difficult


def _split_by_class(boxes: np.ndarray, image: np.ndarray, labels: np.ndarray,
                    difficult: np.ndarray, num_classes: int) -> list[ClassGroundTruth]:
    """One :class:`ClassGroundTruth` per class from all objects' arrays."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"ground-truth labels must be in 0..{num_classes - 1}")
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    out = []
    for c in range(num_classes):
        sel = order[bounds[c]:bounds[c + 1]]
        out.append(ClassGroundTruth.build(boxes[sel], image[sel], difficult[sel]))
    return out


def _class_ground_truth(records: Sequence[ImageRecord], num_classes: int, convention: str
                        ) -> list[ClassGroundTruth]:
    """One :class:`ClassGroundTruth` per class, image index = position in ``records``."""
    boxes, labels, difficult, image = [], [], [], []
    for i, rec in enumerate(records):
        b, lab, diff = _record_objects(rec, convention)
        boxes.append(b)
        labels.append(lab)
        difficult.append(diff)
        image.append(np.full(lab.shape[0], i, dtype=np.int64))
    return _split_by_class(
        np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        np.concatenate(image) if image else np.zeros(0, dtype=np.int64),
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        np.concatenate(difficult) if difficult else np.zeros(0, dtype=bool),
        num_classes)


def _detection_arrays(
    name: str, dets: ClassDetections, index: ImageIndex, convention: str, box_format: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(image index (D,), scores (D,), boxes (D, 4))`` in the convention's format."""
    try:
        ids, scores, boxes = dets
    except (TypeError, ValueError):
        raise ValueError(f"detections of class {name!r} must be a tuple "
                         "(image_ids, scores, boxes)") from None
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    n = scores.shape[0]
    if boxes.shape != (n, 4) or len(ids) != n:
        raise ValueError(f"detections of class {name!r}: {len(ids)} image ids, {n} scores "
                         f"and boxes of shape {boxes.shape}; expected (D,), (D,), (D, 4)")
    if not (np.isfinite(scores).all() and np.isfinite(boxes).all()):
        raise ValueError(f"detections of class {name!r}: scores and boxes must be finite")
    ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    image = index.lookup(ids)
    unknown = np.flatnonzero(image < 0)
    if unknown.size:
        raise ValueError(f"detections of class {name!r}: {unknown.size} detection(s) on "
                         f"image id(s) not in the evaluated set, e.g. {ids[unknown[0]]!r}")
    boxes = _convert_boxes(boxes, box_format, convention)
    _check_widths(name, boxes, convention)
    return image, scores, boxes


def _check_widths(name: str, boxes: np.ndarray, convention: str) -> None:
    offset = 1.0 if convention == "devkit" else 0.0
    width = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + offset
    bad = width < -WIDTH_TOLERANCE
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"detections of class {name!r}: {int(bad.sum())} box(es) with a "
                         f"negative width or height, first {boxes[r].tolist()} "
                         f"({convention} convention)")


def _convert_boxes(boxes: np.ndarray, box_format: str, convention: str) -> np.ndarray:
    """Raw 1-based ``[x1, y1, x2, y2]`` <-> continuous ``[x1 - 1, y1 - 1, x2, y2]``."""
    want = "raw" if convention == "devkit" else "continuous"
    if box_format == want:
        return boxes
    shift = 1.0 if want == "raw" else -1.0
    out = boxes.copy()
    out[:, :2] += shift
    return out


def _score_all(
    class_names: Sequence[str], gts: Sequence[ClassGroundTruth], detections, *, metric: str,
    convention: str, match_iou: float, num_images: int, blame: int = 0,
    image_ids: Sequence[str] = (),
) -> EvalResult:
    """Score every class; ``detections(c, name)`` gives ``(image, scores, boxes)``. With
    ``blame > 0``, also the ``blame`` detections that cost the AP most (``image_ids``: the
    evaluated images' ids)."""
    devkit = convention == "devkit"
    theta = devkit_threshold(match_iou) if devkit else float(match_iou)
    per_class, npos, ndet, curves = {}, {}, {}, {}
    kept = []
    for c, (name, gt) in enumerate(zip(class_names, gts, strict=True)):
        image, scores, boxes = detections(c, name)
        if blame > 0:
            kept.append((image, scores, boxes, gt))
        ap, rec, prec = score_class(gt, image, scores, boxes, metric=metric, theta=theta,
                                    pixel_offset=1.0 if devkit else 0.0, devkit=devkit)
        per_class[name], npos[name], ndet[name] = ap, gt.npos, int(scores.size)
        curves[name] = (rec, prec)
    defined = [v for v in per_class.values() if not math.isnan(v)]
    if not defined:
        logger.warning("no class has a non-difficult ground truth: mAP is undefined (NaN)")
    m_ap = float(np.mean(defined)) if defined else float("nan")
    logger.info("VOC %s (%s convention): mAP %.4f over %d classes, %d images",
                metric, convention, m_ap, len(defined), num_images)
    result = EvalResult(mAP=m_ap, per_class=per_class, metric=metric, convention=convention,
                        npos=npos, num_detections=ndet, match_iou=float(match_iou),
                        num_images=int(num_images), curves=curves)
    if blame > 0:
        from mapdet.evaluation.blame import blame_classes

        result.blame = blame_classes(class_names, kept, image_ids, per_class, metric=metric,
                                     convention=convention, match_iou=match_iou, k=blame)
    return result


def evaluate_voc(
    dataset_records: Sequence[ImageRecord] | DetectionDataset,
    detections_per_class: Mapping[str, ClassDetections],
    *,
    class_names: Sequence[str],
    metric: str = "voc07",
    convention: str = "devkit",
    box_format: str = "continuous",
    match_iou: float = 0.5,
    blame: int = 0,
) -> EvalResult:
    """Score detections against ground truth, class by class (see the module docstring).

    Args:
        dataset_records: the evaluated images' :class:`ImageRecord` (a data set works too),
            difficult objects included. In devkit convention their raw 1-based boxes are
            ``record.extra["voc_raw_boxes"]`` when present (VOC XML), else
            ``[x1 + 1, y1 + 1, x2, y2]`` of the continuous boxes.
        detections_per_class: class name -> ``(image_ids (D,), scores (D,), boxes (D, 4))``.
            A class absent from the mapping has no detections; an unknown class name or
            image id is an error.
        class_names: the ``K`` class names; ground-truth label ``c`` is ``class_names[c]``.
        metric: ``"voc07"`` (11-point) or ``"area"``.
        convention: ``"devkit"`` (1-based, ``+1`` widths, ``IoU > match_iou``) or
            ``"continuous"`` (continuous boxes, ``IoU >= match_iou``).
        box_format: how the detection boxes are given: ``"continuous"`` xyxy (the library's
            convention, :func:`detections_by_class`) or ``"raw"`` 1-based inclusive (devkit
            result files, :func:`read_devkit_results`); they are converted as needed.
        match_iou: the IoU threshold (0.5 for VOC).
        blame: also find the ``blame`` detections that cost the AP most
            (:mod:`mapdet.evaluation.blame`; their boxes are reported in the convention's
            format); 0: not.

    Returns:
        An :class:`EvalResult`.
    """
    _check_options(metric, convention, box_format)
    class_names = list(class_names)
    records = list(dataset_records.records if isinstance(dataset_records, DetectionDataset)
                   else dataset_records)
    unknown = sorted(set(detections_per_class) - set(class_names))
    if unknown:
        raise ValueError(f"detections for unknown class(es) {unknown}; known: {class_names}")
    index = ImageIndex([rec.image_id for rec in records])
    if index.num_unique != len(records):
        raise ValueError("dataset_records has duplicate image ids")
    gts = _class_ground_truth(records, len(class_names), convention)
    empty: ClassDetections = ([], np.zeros(0), np.zeros((0, 4)))
    return _score_all(
        class_names, gts,
        lambda c, name: _detection_arrays(name, detections_per_class.get(name, empty), index,
                                          convention, box_format),
        metric=metric, convention=convention, match_iou=match_iou, num_images=len(records),
        blame=blame, image_ids=index.ids)


def evaluate_voc_results_dir(
    voc_root_or_dataset: str | Path | DetectionDataset,
    split: str,
    results_dir: str | Path,
    metric: str = "voc07",
    *,
    convention: str = "devkit",
    year: str | int = "2007",
    class_names: Sequence[str] | None = None,
    comp: str = "comp4",
    allow_missing: bool = True,
    cache_dir: str | Path | None | bool = None,
    blame: int = 0,
) -> EvalResult:
    """Score devkit result files against VOC annotations (no image is read).

    Args:
        voc_root_or_dataset: a VOC root (anything :func:`~mapdet.data.voc.find_voc_base`
            accepts; its annotations are read through the cache of
            :mod:`mapdet.evaluation.voc_annotations`) or an already built data set
            (difficult objects included).
        split: the evaluated split (``"test"``): the split file read, and the name in the
            result files.
        results_dir: the folder of ``<comp>_det_<split>_<class>.txt`` (or its ``Main/`` or
            ``VOC<year>/Main/``, see :func:`find_results_folder`).
        metric, convention: as in :func:`evaluate_voc`.
        year: the VOC year under ``voc_root`` (``"2007"``).
        class_names: default: the data set's, or the 20 VOC classes.
        comp: the competition prefix in the file names.
        allow_missing: see :func:`read_devkit_results`.
        cache_dir: the annotation cache folder (``None``: the default, ``False``: no cache;
            see :func:`~mapdet.evaluation.voc_annotations.load_voc_ground_truth`).
        blame: also find the ``blame`` detections that cost the AP most
            (:mod:`mapdet.evaluation.blame`; boxes in the convention's format: in devkit
            mode as written in the files); 0: not.

    Raises:
        ValueError: a result file names an image that is not in the split (the message names
            the file and the id), besides the errors of :func:`read_devkit_results`.
    """
    _check_options(metric, convention, "raw")
    if isinstance(voc_root_or_dataset, DetectionDataset):
        dataset = voc_root_or_dataset
        if class_names is not None and tuple(class_names) != dataset.class_names:
            raise ValueError(f"class_names {list(class_names)} differ from the data set's "
                             f"{list(dataset.class_names)}")
        class_names = list(dataset.class_names)
        image_ids = list(dataset.image_ids)
        what = f"{dataset.name!r} ({len(image_ids)} images)"
        gts = _class_ground_truth(dataset.records, len(class_names), convention)
    else:
        base = find_voc_base(voc_root_or_dataset, year)
        class_names = list(class_names or VOC_CLASSES)
        gt = load_voc_ground_truth(base, split, class_names, cache_dir=cache_dir)
        image_ids = gt.image_ids
        what = f"'{base.name}_{split}' ({len(image_ids)} images)"
        if convention == "devkit":
            gts = _split_by_class(gt.raw_boxes, gt.image, gt.labels, gt.difficult,
                                  len(class_names))
        else:
            keep, boxes = gt.continuous_boxes()
            if not keep.all():
                logger.info("%d degenerate or outside ground-truth box(es) dropped "
                            "(continuous convention; devkit mode counts them)",
                            int((~keep).sum()))
            gts = _split_by_class(boxes, gt.image[keep], gt.labels[keep], gt.difficult[keep],
                                  len(class_names))
    folder = find_results_folder(results_dir, split, class_names, comp, year)
    paths = result_paths(folder, split, class_names, comp, allow_missing=allow_missing)
    index = ImageIndex(image_ids)

    def detections(c: int, name: str):
        path = paths[name]
        if path is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, 4))
        image, scores, boxes = read_result_file_indexed(path, index, what)
        return image, scores, _convert_boxes(boxes, "raw", convention)

    return _score_all(class_names, gts, detections, metric=metric, convention=convention,
                      match_iou=0.5, num_images=len(image_ids), blame=blame,
                      image_ids=image_ids)
