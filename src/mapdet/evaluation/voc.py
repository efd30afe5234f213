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

Result files (``comp4_det_<split>_<class>.txt``; lines ``image_id score x1 y1 x2 y2``, 1-based
inclusive coordinates) are read by :func:`read_devkit_results`. A missing class file is not an
error by default (the devkit would fail): it counts as no detections, so that class's AP is 0,
and a warning names it; ``allow_missing=False`` makes it an error. No file at all is always an
error (a wrong folder or split name).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapdet.core.ap import (
    IGNORED,
    TP,
    GroundTruth,
    ap_from_labels,
    ap_weights,
    best_ground_truth,
    check_ap_method,
    label_detections,
)
from mapdet.core.nms import detection_order
from mapdet.data.base import DetectionDataset, ImageRecord
from mapdet.data.voc import VOC_CLASSES, VOCDataset, voc_raw_boxes
from mapdet.evaluation.export import (
    atomic_write_text,
    check_image_detections,
    devkit_result_filename,
)

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

#: Slack on "width >= 0": a zero-width continuous box written as ``x1 + 1 ... x2`` reads back
#: with ``x2 - x1 + 1`` a rounding error below 0 (about 1e-15); such boxes are valid.
WIDTH_TOLERANCE = 1e-6

#: One class's detections: ``(image_ids list[str] (D,), scores (D,) float64, boxes (D, 4))``.
ClassDetections = tuple[list[str], np.ndarray, np.ndarray]


class ResultsFormatError(ValueError):
    """A devkit result file is malformed; the message names the file and the line."""


# -- result files --------------------------------------------------------------------------


def read_result_file(path: str | Path) -> ClassDetections:
    """Read one ``comp4_det_<split>_<class>.txt`` file.

    Lines are ``image_id score x1 y1 x2 y2`` separated by any whitespace; blank lines are
    skipped. Coordinates are returned as written: 1-based inclusive pixels.

    Returns:
        ``(image_ids (D,) list[str], scores (D,) float64, boxes (D, 4) float64)``.

    Raises:
        ResultsFormatError: a line without exactly 6 fields, a field that is not a number, a
            NaN or infinite score or coordinate, or a box with ``x2 < x1 - 1`` or
            ``y2 < y1 - 1`` (negative width even with the devkit's ``+1``; up to
            ``WIDTH_TOLERANCE`` of rounding is accepted); the message gives
            ``file:line``.
    """
    path = Path(path)
    ids: list[str] = []
    values: list[list[float]] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            ids.append(fields[0])
            values.append(_parse_numbers(fields, f"{path}:{lineno}"))
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    return ids, arr[:, 0].copy(), arr[:, 1:].copy()


def _parse_numbers(fields: list[str], where: str) -> list[float]:
    """Score and box of one result line, checked (see :func:`read_result_file`)."""
    if len(fields) != 6:
        raise ResultsFormatError(
            f"{where}: expected 6 fields 'image_id score x1 y1 x2 y2', got {len(fields)}"
        )
    names = ("score", "x1", "y1", "x2", "y2")
    numbers = []
    for name, text in zip(names, fields[1:], strict=True):
        try:
            value = float(text)
        except ValueError:
            raise ResultsFormatError(f"{where}: {name} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ResultsFormatError(f"{where}: {name} is {text!r}; it must be finite")
        numbers.append(value)
    _, x1, y1, x2, y2 = numbers
    if min(x2 - x1, y2 - y1) + 1.0 < -WIDTH_TOLERANCE:
        raise ResultsFormatError(
            f"{where}: box {numbers[1:]} has a negative width or height "
            "(1-based inclusive coordinates need x2 >= x1 - 1 and y2 >= y1 - 1)"
        )
    return numbers


def find_results_folder(results_dir: str | Path, split: str, class_names: Sequence[str],
                        comp: str = "comp4", year: str | int | None = None) -> Path:
    """The folder holding the result files: ``results_dir`` itself, else its ``Main/`` or
    ``VOC<year>/Main/`` (the devkit's ``results/VOC2007/Main`` layout).

    Raises:
        FileNotFoundError: no candidate holds any ``<comp>_det_<split>_<class>.txt``; the
            message lists the folders tried and the file pattern.
    """
    results_dir = Path(results_dir)
    tried = [results_dir, results_dir / "Main"]
    if year is not None:
        tried.append(results_dir / f"VOC{year}" / "Main")
    names = [devkit_result_filename(split, c, comp) for c in class_names]
    for folder in tried:
        if any((folder / n).is_file() for n in names):
            if folder != results_dir:
                logger.info("reading result files from %s", folder)
            return folder
    raise FileNotFoundError(
        f"no result files {devkit_result_filename(split, '<class>', comp)} found in "
        + ", ".join(str(p) for p in tried)
    )


def read_devkit_results(
    results_dir: str | Path,
    split: str,
    class_names: Sequence[str],
    comp: str = "comp4",
    *,
    allow_missing: bool = True,
) -> dict[str, ClassDetections]:
    """Read ``<results_dir>/<comp>_det_<split>_<class>.txt`` for every class.

    Args:
        results_dir: the folder holding the files.
        split: the split in the file names (``"test"``).
        class_names: the classes to read, in order.
        comp: the competition prefix in the file names.
        allow_missing: a missing class file counts as no detections (its AP is then 0) and a
            warning names it; ``False`` makes it an error, as in the devkit.

    Returns:
        class name -> ``(image_ids, scores (D,), boxes (D, 4))``, boxes raw 1-based inclusive
        as written in the file (pass ``box_format="raw"`` to :func:`evaluate_voc`).

    Raises:
        FileNotFoundError: no file at all, or a missing one with ``allow_missing=False``.
        ResultsFormatError: a malformed line (see :func:`read_result_file`).
    """
    results_dir = Path(results_dir)
    paths = {c: results_dir / devkit_result_filename(split, c, comp) for c in class_names}
    missing = [c for c, p in paths.items() if not p.is_file()]
    if missing and (len(missing) == len(paths) or not allow_missing):
        raise FileNotFoundError(
            f"missing result file(s) in {results_dir}: "
            + ", ".join(paths[c].name for c in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    if missing:
        logger.warning("no result file for class(es) %s in %s: counted as no detections (AP 0)",
                       ", ".join(missing), results_dir)
    out: dict[str, ClassDetections] = {}
    for c, p in paths.items():
        if c in missing:
            out[c] = ([], np.zeros(0), np.zeros((0, 4)))
        else:
            out[c] = read_result_file(p)
    return out


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
        curves: class name -> ``(recall (D',), precision (D',))`` after each non-ignored
            detection (for plots; not in :meth:`to_json`).
    """

    mAP: float
    per_class: dict[str, float]
    metric: str
    convention: str
    npos: dict[str, int]
    num_detections: dict[str, int] = field(default_factory=dict)
    match_iou: float = 0.5
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

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


def devkit_threshold(match_iou: float = 0.5) -> float:
    """The core threshold that reproduces the devkit's strict ``IoU > match_iou``.

    The core matches on ``IoU >= theta``; for float64 values, ``IoU > t`` holds exactly when
    ``IoU >= nextafter(t, +inf)``.
    """
    return float(np.nextafter(float(match_iou), np.inf))


# -- scoring -------------------------------------------------------------------------------


def _check_options(metric: str, convention: str, box_format: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    check_ap_method(metric)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {list(BOX_FORMATS)}, got {box_format!r}")


def _gt_boxes(record: ImageRecord, convention: str) -> np.ndarray:
    """A record's ground truth: raw 1-based numbers (devkit) or continuous boxes."""
    if convention == "devkit":
        return voc_raw_boxes(record)
    return record.boxes.astype(np.float64)


def _class_ground_truth(
    records: Sequence[ImageRecord], num_classes: int, convention: str
) -> list[GroundTruth]:
    """One :class:`GroundTruth` per class, image ids = positions in ``records``."""
    boxes, labels, difficult, image = [], [], [], []
    for i, rec in enumerate(records):
        b = _gt_boxes(rec, convention)
        if b.shape[0] != rec.labels.shape[0]:
            raise ValueError(f"image {rec.image_id!r}: {b.shape[0]} raw boxes for "
                             f"{rec.labels.shape[0]} labels")
        boxes.append(b)
        labels.append(rec.labels)
        difficult.append(rec.difficult)
        image.append(np.full(rec.labels.shape[0], i, dtype=np.int64))
    boxes_a = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    labels_a = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    diff_a = np.concatenate(difficult) if difficult else np.zeros(0, dtype=bool)
    image_a = np.concatenate(image) if image else np.zeros(0, dtype=np.int64)
    if labels_a.size and (labels_a.min() < 0 or labels_a.max() >= num_classes):
        raise ValueError(f"ground-truth labels must be in 0..{num_classes - 1}")
    return [
        GroundTruth(boxes_a[labels_a == c], image_a[labels_a == c], diff_a[labels_a == c])
        for c in range(num_classes)
    ]


def _detection_arrays(
    name: str, dets: ClassDetections, index_of: Mapping[str, int], convention: str,
    box_format: str,
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
    unknown = [i for i in ids if i not in index_of]
    if unknown:
        raise ValueError(f"detections of class {name!r}: {len(unknown)} detection(s) on "
                         f"image id(s) not in the evaluated set, e.g. {unknown[0]!r}")
    image = np.fromiter((index_of[i] for i in ids), dtype=np.int64, count=n)
    boxes = _convert_boxes(boxes, box_format, convention)
    offset = 1.0 if convention == "devkit" else 0.0
    width = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + offset
    bad = width < -WIDTH_TOLERANCE
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"detections of class {name!r}: {int(bad.sum())} box(es) with a "
                         f"negative width or height, first {boxes[r].tolist()} "
                         f"({convention} convention)")
    return image, scores, boxes


def _convert_boxes(boxes: np.ndarray, box_format: str, convention: str) -> np.ndarray:
    """Raw 1-based ``[x1, y1, x2, y2]`` <-> continuous ``[x1 - 1, y1 - 1, x2, y2]``."""
    want = "raw" if convention == "devkit" else "continuous"
    if box_format == want:
        return boxes
    shift = 1.0 if want == "raw" else -1.0
    out = boxes.copy()
    out[:, :2] += shift
    return out


def _score_class(
    gt: GroundTruth, image: np.ndarray, scores: np.ndarray, boxes: np.ndarray, *,
    metric: str, theta: float, pixel_offset: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """AP and the raw PR curve of one class, through :mod:`mapdet.core.ap`.

    The steps are those of :func:`mapdet.core.ap.average_precision` (order, best ground
    truth, labels, weighted sum); they are called one by one so that the labels also give the
    curve, and so that boxes the core's input check refuses but the devkit scores are
    accepted: a zero-width continuous box is, in raw 1-based numbers, ``x2 = x1 - 1`` (width
    0 once the devkit adds 1).
    """
    order = detection_order(scores, -np.inf)
    best, best_iou = best_ground_truth(boxes[order], image[order], gt, pixel_offset)
    labels = label_detections(best, best_iou, gt.difficult, theta)
    labels = labels[labels != IGNORED]
    tp = np.cumsum(labels == TP)
    precision = tp / np.arange(1, labels.size + 1)
    if gt.npos == 0:
        return float("nan"), np.full(labels.size, np.nan), precision
    ap = ap_from_labels(labels, gt.npos, ap_weights(gt.npos, metric))
    return ap, tp / gt.npos, precision


def evaluate_voc(
    dataset_records: Sequence[ImageRecord] | DetectionDataset,
    detections_per_class: Mapping[str, ClassDetections],
    *,
    class_names: Sequence[str],
    metric: str = "voc07",
    convention: str = "devkit",
    box_format: str = "continuous",
    match_iou: float = 0.5,
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
    index_of = {rec.image_id: i for i, rec in enumerate(records)}
    if len(index_of) != len(records):
        raise ValueError("dataset_records has duplicate image ids")
    gts = _class_ground_truth(records, len(class_names), convention)
    devkit = convention == "devkit"
    theta = devkit_threshold(match_iou) if devkit else float(match_iou)
    empty: ClassDetections = ([], np.zeros(0), np.zeros((0, 4)))

    per_class, npos, ndet, curves = {}, {}, {}, {}
    for name, gt in zip(class_names, gts, strict=True):
        dets = detections_per_class.get(name, empty)
        image, scores, boxes = _detection_arrays(name, dets, index_of, convention, box_format)
        ap, rec, prec = _score_class(gt, image, scores, boxes, metric=metric, theta=theta,
                                     pixel_offset=1.0 if devkit else 0.0)
        per_class[name], npos[name], ndet[name] = ap, gt.npos, int(scores.size)
        curves[name] = (rec, prec)
    defined = [v for v in per_class.values() if not math.isnan(v)]
    if not defined:
        logger.warning("no class has a non-difficult ground truth: mAP is undefined (NaN)")
    m_ap = float(np.mean(defined)) if defined else float("nan")
    logger.info("VOC %s (%s convention): mAP %.4f over %d classes, %d images",
                metric, convention, m_ap, len(defined), len(records))
    return EvalResult(mAP=m_ap, per_class=per_class, metric=metric, convention=convention,
                      npos=npos, num_detections=ndet, match_iou=float(match_iou),
                      curves=curves)


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
) -> EvalResult:
    """Score devkit result files against VOC annotations (no image is read).

    Args:
        voc_root_or_dataset: a VOC root (anything :class:`~mapdet.data.voc.VOCDataset`
            accepts) or an already built data set (difficult objects included).
        split: the evaluated split (``"test"``): the split file read, and the name in the
            result files.
        results_dir: the folder of ``<comp>_det_<split>_<class>.txt`` (or its ``Main/`` or
            ``VOC<year>/Main/``, see :func:`find_results_folder`).
        metric, convention: as in :func:`evaluate_voc`.
        year: the VOC year under ``voc_root`` (``"2007"``).
        class_names: default: the data set's, or the 20 VOC classes.
        comp: the competition prefix in the file names.
        allow_missing: see :func:`read_devkit_results`.

    Raises:
        ValueError: a result file names an image that is not in the split (the message names
            the file and the id), besides the errors of :func:`read_devkit_results`.
    """
    if isinstance(voc_root_or_dataset, DetectionDataset):
        dataset = voc_root_or_dataset
        if class_names is not None and tuple(class_names) != dataset.class_names:
            raise ValueError(f"class_names {list(class_names)} differ from the data set's "
                             f"{list(dataset.class_names)}")
    else:
        dataset = VOCDataset(voc_root_or_dataset, year=year, split=split,
                             class_names=class_names or VOC_CLASSES, use_difficult=True)
    class_names = dataset.class_names
    folder = find_results_folder(results_dir, split, class_names, comp, year)
    dets = read_devkit_results(folder, split, class_names, comp, allow_missing=allow_missing)
    known = set(dataset.image_ids)
    for name, (ids, _, _) in dets.items():
        bad = next((i for i in ids if i not in known), None)
        if bad is not None:
            raise ValueError(
                f"{folder / devkit_result_filename(split, name, comp)}: image id {bad!r} is "
                f"not in the evaluated set {dataset.name!r} ({len(known)} images)"
            )
    return evaluate_voc(dataset, dets, class_names=class_names, metric=metric,
                        convention=convention, box_format="raw")
