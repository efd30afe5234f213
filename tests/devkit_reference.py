"""Reference PASCAL VOC scoring for the tests: a literal port of py-faster-rcnn's ``voc_eval.py``.

``voc_eval.py`` (R. Girshick, py-faster-rcnn, ``lib/datasets/voc_eval.py``) is itself the
Python transcription of the official MATLAB devkit (``VOCevaldet.m``, ``VOCap.m``). This file
keeps its arithmetic and control flow line for line so that the evaluator in
``mapdet.evaluation.voc`` can be checked against it; it is used only by the tests.

Deliberate departures, all marked ``# port:`` below:

- the annotation cache (``cachedir``/``annots.pkl``) is optional: without ``cachedir``,
  annotations are parsed on every call; with it, the first call parses them and pickles
  them to ``<cachedir>/annots.pkl`` and later calls load that file, whatever changed since,
  as in the original (``benchmarks/bench_eval.py`` times the port this way);
- the sort of the detections is ``np.argsort(-confidence)`` (numpy's default quicksort, not
  stable) as in the original, but ``sort_kind="stable"`` can be asked for; the MATLAB devkit's
  ``sort`` is stable, and so is ``mapdet``. Tests with tied scores pass ``sort_kind="stable"``;
- an empty detection file gives ``BB`` of shape ``(0, 4)`` (the original indexes a 1-d empty
  array and crashes; later forks such as Detectron add the same guard);
- ``np.bool`` (removed from numpy) is spelled ``bool``;
- the core matching loop is also exposed on in-memory arrays (:func:`voc_eval_arrays`).

What the port keeps: 1-based inclusive pixel coordinates with ``+ 1.`` widths, the strict
``ovmax > ovthresh`` test, the first maximum (``np.argmax``) as the matched ground truth,
difficult ground truth matched but neither TP nor FP, ``prec = tp / max(tp + fp, eps)``, and
``voc_ap`` with the 11-point (``np.arange(0., 1.1, 0.1)``) and the area variants.
"""

from __future__ import annotations

import os
import pickle
import xml.etree.ElementTree as ET

import numpy as np


def parse_rec(filename):
    """Parse a PASCAL VOC xml file (as in voc_eval.py: integer coordinates)."""
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        obj_struct = {}
        obj_struct["name"] = obj.find("name").text
        obj_struct["pose"] = obj.find("pose").text if obj.find("pose") is not None else None
        obj_struct["truncated"] = (
            int(obj.find("truncated").text) if obj.find("truncated") is not None else 0
        )
        obj_struct["difficult"] = int(obj.find("difficult").text)
        bbox = obj.find("bndbox")
        obj_struct["bbox"] = [
            int(bbox.find("xmin").text),
            int(bbox.find("ymin").text),
            int(bbox.find("xmax").text),
            int(bbox.find("ymax").text),
        ]
        objects.append(obj_struct)
    return objects


def voc_ap(rec, prec, use_07_metric=False):
    """ap = voc_ap(rec, prec, [use_07_metric])
    Compute VOC AP given precision and recall.
    If use_07_metric is true, uses the VOC 07 11 point method (default:False).
    """
    if use_07_metric:
        # 11 point metric
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        # correct AP calculation
        # first append sentinel values at the end
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))

        # compute the precision envelope
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])

        # to calculate area under PR curve, look for points
        # where X axis (recall) changes value
        i = np.where(mrec[1:] != mrec[:-1])[0]

        # and sum (\Delta recall) * prec
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def voc_eval_arrays(
    class_recs, image_ids, confidence, BB, npos, ovthresh=0.5, use_07_metric=False,
    sort_kind="quicksort",
):
    """The matching loop of voc_eval on in-memory data.

    Args:
        class_recs: ``{image_name: {"bbox": (G, 4) 1-based, "difficult": (G,) bool,
            "det": [False] * G}}`` for every image of the set (mutated, as in the original).
        image_ids: list of image names, one per detection.
        confidence: ``(D,)`` scores; ``BB``: ``(D, 4)`` 1-based detection boxes.
        npos: number of non-difficult ground truths.

    Returns:
        ``(rec, prec, ap)``.
    """
    confidence = np.asarray(confidence, dtype=float)
    BB = np.asarray(BB, dtype=float).reshape(-1, 4)  # port: guard for empty files

    # sort by confidence
    sorted_ind = np.argsort(-confidence, kind=sort_kind)  # port: kind selectable
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    # go down dets and mark TPs and FPs
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)

        if BBGT.size > 0:
            # compute overlaps
            # intersection
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih

            # union
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                - inters
            )

            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)

        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    # compute precision recall
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):  # port: npos == 0 is left to callers
        rec = tp / float(npos)
    # avoid divide by zero in case the first detection matches a difficult
    # ground truth
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = voc_ap(rec, prec, use_07_metric)

    return rec, prec, ap


def build_class_recs(recs, imagenames, classname):
    """``class_recs`` and ``npos`` of one class from parsed annotations (as in voc_eval)."""
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        R = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R]).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    return class_recs, int(npos)


def voc_eval(
    detpath, annopath, imagesetfile, classname, ovthresh=0.5, use_07_metric=False,
    sort_kind="quicksort", cachedir=None,
):
    """rec, prec, ap = voc_eval(detpath, annopath, imagesetfile, classname, [ovthresh],
    [use_07_metric])

    detpath: Path to detections; detpath.format(classname) should produce the detection
        results file.
    annopath: Path to annotations; annopath.format(imagename) should be the xml annotations
        file.
    imagesetfile: Text file containing the list of images, one image per line.
    classname: Category name (duh)
    """
    # read list of images
    with open(imagesetfile) as f:
        lines = f.readlines()
    imagenames = [x.strip() for x in lines]

    # load annots  (port: the cache is optional)
    cachefile = None if cachedir is None else os.path.join(cachedir, "annots.pkl")
    if cachefile is None or not os.path.isfile(cachefile):
        recs = {}
        for imagename in imagenames:
            recs[imagename] = parse_rec(annopath.format(imagename))
        if cachefile is not None:
            os.makedirs(cachedir, exist_ok=True)
            with open(cachefile, "wb") as f:
                pickle.dump(recs, f)
    else:
        with open(cachefile, "rb") as f:
            recs = pickle.load(f)

    # extract gt objects for this class
    class_recs, npos = build_class_recs(recs, imagenames, classname)

    # read dets
    detfile = detpath.format(classname)
    with open(detfile) as f:
        lines = f.readlines()

    splitlines = [x.strip().split(" ") for x in lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])

    return voc_eval_arrays(
        class_recs, image_ids, confidence, BB, npos, ovthresh, use_07_metric, sort_kind
    )
