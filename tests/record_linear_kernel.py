"""Recorded outputs of mapdet 0.x's O(D)-per-query kernel, the reference of
tests/test_core_pseudograd_large.py at sizes the brute force cannot reach.

That kernel recomputed every AP over the whole detection list: quadratic, but easy to trust.
It lived in tests/linear_kernel.py (last version: commit ba9ead1); its outputs on the
workloads below are in tests/data/linear_kernel_records.npz, written by this script:

    git show ba9ead1:tests/linear_kernel.py > /tmp/linear_kernel.py
    PYTHONPATH=src python tests/record_linear_kernel.py /tmp/linear_kernel.py

The tests import the workloads from here, so the records and the tests cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from mapdet.core.synthetic import proposal_like_outputs

RECORDS = Path(__file__).resolve().parent / "data" / "linear_kernel_records.npz"
COCO = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))

#: ``(seed, match_iou, ap_method, grad_rows, decimals)``: 4 images x 120 proposal-like
#: windows x 2 classes, scores rounded to ``decimals`` (ties).
PROPOSAL_CASES = [
    (seed, match_iou, ap_method, grad_rows, decimals)
    for seed, (match_iou, ap_method, grad_rows, decimals) in zip(
        (11, 237, 1409, 2718, 3141, 4096, 5000, 6174, 7321, 8128, 9001, 9973), [
            (0.5, "area", None, 2), ((0.5, 0.75), "voc07", 150, 3), (COCO, "r101", None, 3),
            (0.5, "voc07", 150, 2), ((0.5, 0.75), "r101", None, 2), (COCO, "area", 150, 2),
            (0.5, "r101", 150, 3), ((0.5, 0.75), "area", None, 3), (COCO, "voc07", None, 2),
            (0.5, "area", 150, 3), ((0.5, 0.75), "area", 150, 2), (COCO, "r101", 150, 3)],
        strict=True)
]

#: ``(seed, nms_iou, match_iou)``: one image, 600 windows around 1-3 objects (dense
#: clusters: many windows that are not kept share their kept neighbours).
CLUSTER_CASES = [(3, 0.3, 0.5), (58, 0.5, (0.5, 0.75)), (404, 0.7, 0.5), (1234, 0.3, (0.5, 0.75)),
                 (7777, 0.5, 0.5), (9090, 0.7, (0.5, 0.75))]


def proposal_inputs(seed: int, decimals: int) -> tuple:
    """The multiclass arguments of a :data:`PROPOSAL_CASES` workload."""
    o = proposal_like_outputs(num_images=4, windows_per_image=120, num_classes=2,
                              objects_per_image=(1, 4), seed=seed)
    return (np.round(o.probs, decimals), o.boxes, o.image_ids, o.gt_boxes, o.gt_labels,
            o.gt_image_ids, o.gt_difficult)


def cluster_inputs(seed: int) -> tuple:
    """The multiclass arguments (one class) of a :data:`CLUSTER_CASES` workload."""
    o = proposal_like_outputs(num_images=1, windows_per_image=600, num_classes=1,
                              objects_per_image=(1, 3), seed=seed)
    return (o.probs[:, :1], o.boxes[:, :1], o.image_ids, o.gt_boxes, o.gt_labels,
            o.gt_image_ids, o.gt_difficult)


def main(kernel_path: str) -> None:
    spec = importlib.util.spec_from_file_location("linear_kernel", kernel_path)
    linear = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(linear)
    out = {}
    for k, (seed, match_iou, ap_method, grad_rows, decimals) in enumerate(PROPOSAL_CASES):
        aps, grads = linear.ap_pseudo_gradient_multiclass(
            *proposal_inputs(seed, decimals), match_iou=match_iou, ap_method=ap_method,
            grad_rows=grad_rows, num_threads=1)
        out[f"proposal{k}_aps"], out[f"proposal{k}_grads"] = aps, grads
    for k, (seed, nms_iou, match_iou) in enumerate(CLUSTER_CASES):
        aps, grads = linear.ap_pseudo_gradient_multiclass(
            *cluster_inputs(seed), nms_iou=nms_iou, match_iou=match_iou, num_threads=1)
        out[f"cluster{k}_aps"], out[f"cluster{k}_grads"] = aps, grads
    RECORDS.parent.mkdir(exist_ok=True)
    np.savez_compressed(RECORDS, **out)


if __name__ == "__main__":
    main(sys.argv[1])
