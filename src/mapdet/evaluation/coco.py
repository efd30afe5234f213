"""COCO metrics, for COCO itself and for any data set of ImageRecords.

Two backends compute the official COCO numbers: ``"faster"`` (default) is faster-coco-eval's
``COCOeval_faster`` (maintained, its matching and accumulation in C++), ``"pycocotools"`` is
``pycocotools.cocoeval.COCOeval`` (the reference implementation, unmaintained). They give
identical statistics (``tests/test_eval_coco.py`` asserts it on generated data: AP, AP50,
AP75, the three areas and the six ARs); ``benchmarks/bench_eval.py`` times both.

The matching of ``COCOeval`` differs
from the VOC one (docs/method.md, section 2): per image and category it matches in score order
to the free ground truth of highest IoU, with crowd regions absorbing any number of
detections, and reads precision at 101 recall points, for 10 IoU thresholds
``{0.50, 0.55, ..., 0.95}``, three object sizes and three detection caps. This module only
wraps it: the statistics get names, and the backends' prints go to ``logging`` (debug level).

``COCOeval.stats`` -> names::

    AP    AP@[.50:.95], all sizes, 100 dets      AR1    AR@[.50:.95], 1 det per image
    AP50  AP@.50                                  AR10   10 dets
    AP75  AP@.75                                  AR100  100 dets
    APs   small objects (area < 32^2)             ARs    small, 100 dets
    APm   medium (32^2 .. 96^2)                   ARm    medium
    APl   large (> 96^2)                          ARl    large

A value of -1 (pycocotools' "undefined", e.g. no ground truth of that size) is returned as NaN.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapdet.data.base import ImageRecord

__all__ = [
    "COCO_BACKENDS",
    "COCO_STAT_NAMES",
    "coco_image_id_map",
    "evaluate_coco",
    "records_to_coco_gt",
]

logger = logging.getLogger(__name__)

COCO_BACKENDS = ("faster", "pycocotools")

COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


@contextlib.contextmanager
def _stdout_to_log(what: str):
    """Capture pycocotools' prints and log them at debug level."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            logger.debug("COCO backend (%s):\n%s", what, text)


@contextlib.contextmanager
def _cycle_collector_paused():
    """Python's cycle collector off, and restored as it was on exit. The backends build and
    drop a few small dicts and lists per detection, none of them in a cycle; with the
    collector on, each of its full passes walks all of them again (about half the time of
    reading and indexing 500,000 results). Anything that does form a cycle is collected once
    the collector runs again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def coco_image_id_map(records: Sequence[ImageRecord]) -> dict[str, int]:
    """String image id -> COCO integer id: ``record.extra["coco_image_id"]`` when every record
    has it (COCO data), else ``1..N`` in record order."""
    if records and all("coco_image_id" in r.extra for r in records):
        return {r.image_id: int(r.extra["coco_image_id"]) for r in records}
    return {r.image_id: i + 1 for i, r in enumerate(records)}


def records_to_coco_gt(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    *,
    category_ids: Sequence[int] | None = None,
    difficult_as: str = "crowd",
) -> dict:
    """A COCO ground-truth dict (``images``, ``annotations``, ``categories``) from records.

    Args:
        records: the evaluated images.
        class_names: the ``K`` class names; label ``c`` becomes category ``category_ids[c]``.
        category_ids: default ``1..K``.
        difficult_as: what a ``difficult`` object becomes: ``"crowd"`` (``iscrowd=1``:
            detections on it are ignored, as VOC ignores detections of difficult objects,
            though COCO's crowd IoU is intersection over the detection's area),
            ``"drop"`` (removed) or ``"keep"`` (an ordinary object).

    Image ids follow :func:`coco_image_id_map`. Boxes are written as
    ``[x1, y1, x2 - x1, y2 - y1]`` (continuous, as COCO's) and ``area`` is the box area (COCO's
    own annotations use the segmentation's area; the size ranges then differ slightly).
    """
    if difficult_as not in ("crowd", "drop", "keep"):
        raise ValueError(f"difficult_as must be 'crowd', 'drop' or 'keep', got {difficult_as!r}")
    k = len(class_names)
    category_ids = list(range(1, k + 1)) if category_ids is None else list(category_ids)
    if len(category_ids) != k:
        raise ValueError(f"{len(category_ids)} category_ids for {k} classes")
    id_map = coco_image_id_map(records)
    images, annotations = [], []
    for rec in records:
        cid = id_map[rec.image_id]
        images.append({"id": cid, "width": rec.width, "height": rec.height,
                       "file_name": rec.path.name})
        for box, label, diff in zip(rec.boxes.astype(np.float64), rec.labels, rec.difficult,
                                    strict=True):
            if diff and difficult_as == "drop":
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": cid,
                "category_id": category_ids[int(label)],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(bool(diff) and difficult_as == "crowd"),
            })
    categories = [{"id": i, "name": n} for i, n in zip(category_ids, class_names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _load_json(source, what: str):
    """``source`` as parsed JSON, an object this call owns: a path is read (parsed once), and
    a caller's dict or list is copied down to each record's own dict.

    That copy is what the backends need to leave the caller's data as it was: ``loadRes``
    and ``COCOeval`` only add or replace keys of the annotation and result dicts (``id``,
    ``area``, ``iscrowd``, ``segmentation``, ``ignore``, ...), never a nested value. A deep
    copy of 500,000 results took longer than the evaluation itself.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            with path.open("rb") as f:
                return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if isinstance(source, Mapping):
        return {k: [dict(r) if isinstance(r, Mapping) else r for r in v]
                if isinstance(v, list) else copy.copy(v) for k, v in source.items()}
    if isinstance(source, list):
        return [dict(r) if isinstance(r, Mapping) else r for r in source]
    return source


def _coco_gt(annotation, COCO):
    data = _load_json(annotation, "COCO annotation")
    data.setdefault("info", {})
    gt = COCO()
    gt.dataset = data
    with _stdout_to_log("ground truth"):
        gt.createIndex()
    return gt


def _coco_dt(gt, results: list, COCO):
    """Detections as a COCO object (``results`` owned by this call, see :func:`_load_json`);
    an empty list is allowed (pycocotools' loadRes is not)."""
    if not isinstance(results, list):
        raise ValueError("COCO results must be a list of {image_id, category_id, bbox, score}")
    unknown = {r["image_id"] for r in results}.difference(gt.imgs)
    if unknown:
        raise ValueError(f"COCO results name {len(unknown)} image id(s) absent from the "
                         f"annotations, e.g. {sorted(unknown)[0]}")
    if results:
        with _stdout_to_log("results"):
            return gt.loadRes(results)
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                  "categories": copy.deepcopy(gt.dataset["categories"])}
    with _stdout_to_log("results"):
        dt.createIndex()
    return dt


def _backend(name: str):
    """``(COCO, COCOeval factory)`` of a backend, imported on first use."""
    if name == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:  # pragma: no cover - a dependency, but say what to do
            raise ImportError("the 'faster' COCO backend needs faster-coco-eval: "
                              "pip install faster-coco-eval (or backend='pycocotools')") from None

        def make(gt, dt, iou_type):
            return COCOeval_faster(gt, dt, iou_type, print_function=logger.debug)

        return COCO, make
    if name == "pycocotools":
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise ImportError("the 'pycocotools' COCO backend needs pycocotools: "
                              "pip install 'mapdet[pycocotools]' (or backend='faster', "
                              "the default)") from None

        return COCO, COCOeval
    raise ValueError(f"backend must be one of {list(COCO_BACKENDS)}, got {name!r}")


def evaluate_coco(
    annotation_json: str | Path | Mapping,
    results_json: str | Path | list,
    *,
    iou_type: str = "bbox",
    per_class: bool = False,
    backend: str = "faster",
) -> dict[str, float | dict[str, float]]:
    """COCO metrics of detections.

    Args:
        annotation_json: a COCO annotation file, or the dict itself (e.g. from
            :func:`records_to_coco_gt`).
        results_json: a COCO results file, or the list itself
            (:func:`mapdet.evaluation.export.write_coco_results` writes one).
        iou_type: ``"bbox"``.
        per_class: also return ``"per_class"``: category name -> AP@[.50:.95] (NaN where
            the category has no ground truth).
        backend: ``"faster"`` (faster-coco-eval) or ``"pycocotools"``: same numbers.

    Returns:
        ``{"AP": ..., "AP50": ..., ..., "ARl": ...}`` (see the module docstring; NaN for
        COCOeval's -1), plus ``"per_class"`` if asked.
    """
    COCO, COCOeval = _backend(backend)
    with _cycle_collector_paused():
        gt = _coco_gt(annotation_json, COCO)
        dt = _coco_dt(gt, _load_json(results_json, "COCO results"), COCO)
        ev = COCOeval(gt, dt, iou_type)
        with _stdout_to_log("evaluate"):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    stats = {n: _undefined_to_nan(v) for n, v in zip(COCO_STAT_NAMES, ev.stats, strict=True)}
    logger.info("COCO %s: AP %.4f, AP50 %.4f, AP75 %.4f", iou_type, stats["AP"],
                stats["AP50"], stats["AP75"])
    out: dict[str, float | dict[str, float]] = dict(stats)
    if per_class:
        out["per_class"] = _per_class_ap(ev, gt)
    return out


def _undefined_to_nan(v: float) -> float:
    return float("nan") if v < 0 else float(v)


def _per_class_ap(ev, gt) -> dict[str, float]:
    """AP@[.50:.95] per category, all areas, the largest detection cap."""
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else float("nan")
    return out
