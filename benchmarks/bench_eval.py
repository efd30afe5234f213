"""Benchmark: VOC evaluation at test-set scale (issue 4: <= 10 s on the 2-core machine).

Workload: ``--images`` images (default 5,000, VOC07 test has 4,952) with 1-4 objects of
``--classes`` classes (20) and ``--dets`` detections per image spread over the classes
(default 100, Fast R-CNN's cap per image; ``--per-class`` makes it 100 per image *and class*),
most of them near objects. Times ``evaluate_voc`` (VOC07 11-point and area, devkit
convention) on in-memory detections, after one warm-up call.

    python benchmarks/bench_eval.py
    python benchmarks/bench_eval.py --per-class
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from mapdet.data.base import ImageRecord
from mapdet.evaluation.voc import evaluate_voc


def workload(n_images: int, n_classes: int, dets: int, per_class: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    class_names = [f"class{c}" for c in range(n_classes)]
    records, per_cls = [], {name: ([], [], []) for name in class_names}
    for i in range(n_images):
        n_obj = int(rng.integers(1, 5))
        wh = rng.uniform(20, 200, (n_obj, 2))
        xy = rng.uniform(0, 300, (n_obj, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.integers(0, n_classes, n_obj)
        records.append(ImageRecord(image_id=f"{i:06d}", path=f"{i:06d}.jpg", width=500,
                                   height=500, boxes=boxes, labels=labels,
                                   difficult=rng.uniform(size=n_obj) < 0.1))
        n_det = dets * n_classes if per_class else dets
        lab = (np.repeat(np.arange(n_classes), dets) if per_class
               else rng.integers(0, n_classes, n_det))
        src = rng.integers(0, n_obj, n_det)
        near = boxes[src] + rng.normal(0, 10, (n_det, 4))
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 2)
        scores = rng.uniform(0, 1, n_det)
        for c in range(n_classes):
            sel = lab == c
            ids, sc, bx = per_cls[class_names[c]]
            ids.extend([records[-1].image_id] * int(sel.sum()))
            sc.append(scores[sel])
            bx.append(near[sel])
    dets_by_class = {k: (v[0], np.concatenate(v[1]), np.concatenate(v[2]))
                     for k, v in per_cls.items()}
    return records, dets_by_class, class_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--per-class", action="store_true")
    args = parser.parse_args()
    records, dets, names = workload(args.images, args.classes, args.dets, args.per_class)
    total = sum(len(v[0]) for v in dets.values())
    small = {k: (v[0][:50], v[1][:50], v[2][:50]) for k, v in dets.items()}
    evaluate_voc(records[:50], {k: ([], v[1][:0], v[2][:0]) for k, v in small.items()},
                 class_names=names)  # warm-up (numba compilation)
    for metric in ("voc07", "area"):
        t = time.perf_counter()
        res = evaluate_voc(records, dets, class_names=names, metric=metric)
        dt = time.perf_counter() - t
        print(f"{metric:>5}: {args.images} images, {args.classes} classes, {total:,} detections "
              f"-> mAP {res.mAP:.3f} in {dt:.2f} s (target <= 10 s)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
