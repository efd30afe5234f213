"""Selective Search on the embedded digits benchmark: time per image, recall, boxes per image.

For each setting (``mode``, ``resize_to``, ``max_per_image``) runs
:func:`mapdet.data.proposals.selective_search` on the first ``--images`` test images of the
digits benchmark (the demo's data parameters, ``configs/digits.yaml``), one process, one
OpenCV thread, and prints the median time per image, the recall of the non-difficult ground
truth at IoU 0.5 and 0.7 and the mean number of boxes per image. The demo computes proposals
in ``proposals.num_workers`` processes, so its wall time per image is about this time divided
by the number of workers.

Usage::

    python benchmarks/bench_digits_proposals.py --images 100 --root /tmp/digits
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from mapdet.data.proposals import selective_search
from mapdet.data.proposals.stats import proposal_stats
from mapdet.engine.builders import build_dataset
from mapdet.engine.demo import default_config

SETTINGS = [  # (mode, resize_to, max_per_image)
    ("fast", None, 2000), ("fast", 128, 2000), ("fast", 112, 2000), ("fast", 96, 2000),
    ("fast", 80, 2000), ("fast", 200, 2000), ("quality", 96, 2000),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--root", default="runs/bench_digits_proposals/data")
    p.add_argument("--split", default="test")
    p.add_argument("--set", nargs="*", default=[], help="config overrides (data.digits.*)")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    cfg = default_config([f"data.root={args.root}", *args.set])
    ds = build_dataset(cfg, args.split)

    class Subset:  # the first --images records, for proposal_stats
        records = [ds[i] for i in range(min(args.images, len(ds)))]

    images = [ds.load_image(i) for i in range(len(Subset.records))]
    print(f"{len(images)} {args.split} images of {images[0].shape[1]} px, one process\n")
    print("| mode | resize_to | max/image | ms/image (median) | boxes/image | recall@0.5 | "
          "recall@0.7 |")
    print("|---|---|---|---|---|---|---|")
    for mode, resize_to, cap in SETTINGS:
        times, props = [], {}
        for rec, img in zip(Subset.records, images, strict=True):
            t0 = time.perf_counter()
            props[rec.image_id] = selective_search(img, mode=mode, max_proposals=cap,
                                                   min_size=cfg.proposals.min_size,
                                                   resize_to=resize_to)
            times.append(time.perf_counter() - t0)
        s5, s7 = proposal_stats(props, Subset, 0.5), proposal_stats(props, Subset, 0.7)
        print(f"| {mode} | {resize_to or '-'} | {cap} | {1000 * np.median(times):.1f} | "
              f"{s5.mean_proposals:.0f} | {s5.recall:.3f} | {s7.recall:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
