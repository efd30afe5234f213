"""Writing detections in the formats official scorers read: VOC devkit files and COCO JSON.

Per-image detections, the form every writer here takes::

    detections: Mapping[str, Mapping[str, array]]   # image id -> one image's detections
        "boxes":  (D, 4) float xyxy, continuous pixel coordinates (pixel k covers [k, k+1))
        "scores": (D,) float
        "labels": (D,) int, class indices in 0..K-1

Conversions happen only here, at the edge (docs/architecture.md):

- VOC devkit (``comp4_det_<split>_<class>.txt``, one line ``image_id score x1 y1 x2 y2`` per
  detection): 1-based inclusive pixels, written as ``x1 + 1, y1 + 1, x2, y2``.
- COCO results JSON: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with
  ``[x, y, w, h] = [x1, y1, x2 - x1, y2 - y1]`` (COCO boxes are continuous too).

Every file is written atomically: to a temporary file in the same folder, then renamed over
the target, so that a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapdet.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_image_detections",
    "devkit_result_filename",
    "write_coco_results",
    "write_devkit_results",
]

logger = logging.getLogger(__name__)


def devkit_result_filename(split: str, class_name: str, comp: str = "comp4") -> str:
    """``"<comp>_det_<split>_<class_name>.txt"``, the devkit's name for a class's results."""
    return f"{comp}_det_{split}_{class_name}.txt"


def check_image_detections(image_id: str, det: Mapping, num_classes: int | None = None):
    """Validate one image's detections; return ``(boxes (D, 4), scores (D,), labels (D,))``.

    Boxes and scores as float64, labels as int64. Raises ``ValueError`` naming the image for
    a missing key, mismatched lengths, non-finite values, ``x2 < x1`` / ``y2 < y1`` or a label
    outside ``0..num_classes-1``.
    """
    for key in ("boxes", "scores", "labels"):
        if key not in det:
            raise ValueError(f"detections of image {image_id!r} have no {key!r} entry")
    boxes = np.asarray(det["boxes"], dtype=np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(det["labels"]).reshape(-1)
    where = f"detections of image {image_id!r}"
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (D, 4), got {boxes.shape}")
    if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
        raise ValueError(
            f"{where}: {boxes.shape[0]} boxes, {scores.shape[0]} scores, "
            f"{labels.shape[0]} labels"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"{where}: boxes and scores must be finite")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError(f"{where}: boxes must be xyxy with x2 >= x1 and y2 >= y1")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    out_of_range = labels.size and (labels.min() < 0 or labels.max() >= (num_classes or 0))
    if num_classes is not None and out_of_range:
        raise ValueError(f"{where}: labels must be in 0..{num_classes - 1}")
    return boxes, scores, labels


def _fmt(value: float, decimals: int | None) -> str:
    """Shortest exact repr (``decimals=None``) or fixed-point with ``decimals`` digits."""
    return repr(float(value)) if decimals is None else f"{value:.{decimals}f}"


def _check_image_id(image_id: str) -> str:
    image_id = str(image_id)
    if not image_id or any(ch.isspace() for ch in image_id):
        raise ValueError(f"image id {image_id!r} cannot be written to a devkit file: "
                         "it must be non-empty and without whitespace")
    return image_id


def write_devkit_results(
    out_dir: str | Path,
    split: str,
    class_names: Sequence[str],
    detections: Mapping[str, Mapping],
    *,
    comp: str = "comp4",
    decimals: int | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<comp>_det_<split>_<class>.txt`` for every class (empty if none).

    Each line is ``image_id score x1+1 y1+1 x2 y2``: the continuous box written as the
    devkit's 1-based inclusive pixel numbers. Lines are grouped by image (in ``detections``'s
    order) and, within an image, follow the given detection order.

    Args:
        out_dir: folder for the files (created).
        split: split name in the file names (``"test"``).
        class_names: the ``K`` class names; label ``c`` goes to ``class_names[c]``'s file.
        detections: image id -> ``{"boxes" (D, 4) continuous xyxy, "scores" (D,),
            "labels" (D,)}``.
        comp: competition prefix (``comp4``: trained on VOC data only, any proposals).
        decimals: ``None`` (default) writes the shortest decimal that reads back as the same
            float64 (an exact round trip); an integer writes that many decimals (py-faster-rcnn
            wrote ``.3f`` scores and ``.1f`` boxes).

    Returns:
        class name -> the file written.
    """
    out_dir = Path(out_dir)
    class_names = list(class_names)
    lines: list[list[str]] = [[] for _ in class_names]
    for image_id, det in detections.items():
        image_id = _check_image_id(image_id)
        boxes, scores, labels = check_image_detections(image_id, det, len(class_names))
        raw = boxes.copy()
        raw[:, :2] += 1.0
        for box, score, label in zip(raw, scores, labels, strict=True):
            coords = " ".join(_fmt(v, decimals) for v in box)
            lines[label].append(f"{image_id} {_fmt(score, decimals)} {coords}\n")
    written = {}
    for c, name in enumerate(class_names):
        path = out_dir / devkit_result_filename(split, name, comp)
        written[name] = atomic_write_text(path, "".join(lines[c]))
    logger.info("wrote %d devkit result files (%d detections) to %s",
                len(written), sum(len(x) for x in lines), out_dir)
    return written


def coco_results_list(
    detections: Mapping[str, Mapping],
    image_id_map: Mapping[str, int],
    category_id_map: Mapping[int, int] | Sequence[int],
) -> list[dict]:
    """COCO result entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    See :func:`write_coco_results` for the arguments.
    """
    results = []
    for image_id, det in detections.items():
        if image_id not in image_id_map:
            raise KeyError(f"image id {image_id!r} is not in image_id_map")
        coco_image = int(image_id_map[image_id])
        boxes, scores, labels = check_image_detections(image_id, det)
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            try:
                category = int(category_id_map[int(label)])
            except (KeyError, IndexError):
                raise KeyError(f"label {int(label)} (image {image_id!r}) is not in "
                               "category_id_map") from None
            results.append({
                "image_id": coco_image,
                "category_id": category,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(score),
            })
    return results


def write_coco_results(
    path: str | Path,
    detections: Mapping[str, Mapping],
    image_id_map: Mapping[str, int],
    category_id_map: Mapping[int, int] | Sequence[int],
) -> Path:
    """Write detections as a COCO results JSON file (a list of entries), atomically.

    Args:
        path: the JSON file.
        detections: image id -> ``{"boxes" (D, 4) continuous xyxy, "scores", "labels"}``.
        image_id_map: string image id -> COCO integer image id.
        category_id_map: label ``0..K-1`` -> COCO category id (a mapping or a sequence).

    Each entry's ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]``. Returns ``path``.
    """
    results = coco_results_list(detections, image_id_map, category_id_map)
    path = atomic_write_text(path, json.dumps(results))
    logger.info("wrote %d COCO results to %s", len(results), path)
    return path
