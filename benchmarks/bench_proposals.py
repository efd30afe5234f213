"""Benchmark of mapdet.data.proposals: Selective Search speed and recall, cache memory.

Three tables:

1. ``speed``: time per image of ``selective_search`` (fast mode, one OpenCV thread) on
   synthetic images of 200x200 and 500x375 (noise, blobs and rectangles).
2. ``recall``: recall at IoU 0.5 / 0.7, proposals per image and time per image on
   synthetic "digit" images (white digit strokes on a noisy grey background, 200 px), with
   and without upscaling (``resize_to``), fast and quality modes.
3. ``memory``: ``load_or_compute_proposals`` over N synthetic images, run in a fresh child
   process per phase (compute with a cold cache, then load from the cache); prints the peak
   RSS of that process (``resource.getrusage``), the size of the boxes themselves and the
   time. ``--boxes-per-image P`` replaces Selective Search by P random boxes per image
   (in-process, no workers) to measure the cache machinery at a realistic volume.

Usage::

    python benchmarks/bench_proposals.py                      # all tables, N = 10000
    python benchmarks/bench_proposals.py --only memory --n 10000 --boxes-per-image 2000
    python benchmarks/bench_proposals.py --only recall --images 20
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue as queue_module
import resource
import sys
import tempfile
import time

import cv2
import numpy as np

from mapdet.core.boxes import box_iou
from mapdet.data import proposals as P


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth noise with a few coloured ellipses and rectangles, (H, W, 3) uint8 RGB."""
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    image += rng.normal(0, 10, image.shape)
    for _ in range(6):
        colour = [int(c) for c in rng.integers(0, 255, 3)]
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        a = int(rng.integers(max(2, width // 20), max(3, width // 4)))
        b = int(rng.integers(max(2, height // 20), max(3, height // 4)))
        if rng.random() < 0.5:
            cv2.ellipse(image, (x, y), (a, b), float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + a, y + b), colour, -1)
    return image.clip(0, 255).astype(np.uint8)


def digit_image(rng: np.random.Generator, size: int = 200, n: int = 4):
    """White digits on noisy grey, (size, size, 3) uint8 and tight gt boxes (M, 4) xyxy."""
    image = rng.normal(90, 30, (size, size, 3)).astype(np.float32)
    image = cv2.GaussianBlur(image.clip(0, 255), (0, 0), 1.0)
    gt = []
    for _ in range(n):
        canvas = np.zeros((size, size), np.uint8)
        scale, thick = float(rng.uniform(0.6, 2.2)), int(rng.integers(2, 6))
        text = str(int(rng.integers(0, 10)))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = int(rng.integers(0, max(1, size - tw)))
        y = int(rng.integers(th, size - base))
        cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
        ys, xs = np.nonzero(canvas > 127)
        if len(xs) == 0:
            continue
        alpha = canvas.astype(np.float32)[..., None] / 255
        image = image * (1 - alpha) + 240 * alpha
        gt.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image.clip(0, 255).astype(np.uint8), np.array(gt, np.float64).reshape(-1, 4)


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def bench_speed(images: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for width, height in [(200, 200), (500, 375)]:
        batch = [natural_image(rng, width, height) for _ in range(images)]
        P.selective_search(batch[0])  # warm-up
        t0 = time.perf_counter()
        counts = [len(P.selective_search(im, max_proposals=None)) for im in batch]
        ms = (time.perf_counter() - t0) / images * 1000
        rows.append([f"{width}x{height}", "fast", images, f"{ms:.0f}", f"{np.mean(counts):.0f}"])
    table("Selective Search time per image (1 thread)", ["image", "mode", "n", "ms/img",
          "boxes/img"], rows)  # fmt: skip


def bench_recall(images: int) -> None:
    rng = np.random.default_rng(0)
    data = [digit_image(rng) for _ in range(images)]
    rows = []
    settings = [("fast", None), ("fast", 300), ("fast", 400), ("fast", 600), ("quality", None),
                ("quality", 400)]  # fmt: skip
    for mode, resize_to in settings:
        cov5 = cov7 = total = 0
        counts = []
        t0 = time.perf_counter()
        for image, gt in data:
            boxes = P.selective_search(image, mode=mode, resize_to=resize_to, max_proposals=2000)
            counts.append(len(boxes))
            best = box_iou(gt, boxes).max(axis=1) if len(boxes) else np.zeros(len(gt))
            cov5, cov7, total = (
                cov5 + (best >= 0.5).sum(),
                cov7 + (best >= 0.7).sum(),
                total + len(gt),
            )
        ms = (time.perf_counter() - t0) / images * 1000
        rows.append([mode, resize_to or "-", f"{cov5 / total:.3f}", f"{cov7 / total:.3f}",
                     f"{np.mean(counts):.0f}", f"{ms:.0f}"])  # fmt: skip
    table(f"Digit images 200x200, {images} images, {total} digits (min_size="
          f"{P.DEFAULT_MIN_SIZE:g})", ["mode", "resize_to", "recall@.5", "recall@.7",
          "boxes/img", "ms/img"], rows)  # fmt: skip


class _Record:
    def __init__(self, image_id: str, size: int) -> None:
        self.image_id, self.width, self.height = image_id, size, size
        self.boxes = np.zeros((0, 4), np.float32)


class TinyDataset:
    """N tiny synthetic images, generated on the fly from their index (picklable)."""

    def __init__(self, n: int, size: int) -> None:
        self.size = size
        self.records = [_Record(f"{i:07d}", size) for i in range(n)]

    def load_image(self, i: int) -> np.ndarray:
        return natural_image(np.random.default_rng(i), self.size, self.size)


def _random_boxes(per_image: int):
    def compute(image, method, params):
        rng = np.random.default_rng(int(image[0, 0, 0]))
        xy = rng.uniform(0, image.shape[1], (per_image, 2)).astype(np.float32)
        return np.concatenate([xy, xy + 1 + rng.uniform(0, 10, (per_image, 2))], axis=1)

    return compute


def _memory_phase(args, cache_dir: str, queue) -> None:
    """Child process: one call of load_or_compute_proposals; reports time and peak RSS."""
    dataset = TinyDataset(args.n, args.size)
    workers = args.workers
    if args.boxes_per_image:
        P.compute_image_proposals = _random_boxes(args.boxes_per_image)
        workers = 0
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = P.load_or_compute_proposals(
        dataset, cache_dir=cache_dir, num_workers=workers, progress=args.progress
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    nbytes = sum(b.nbytes for b in out.values())
    nboxes = sum(len(b) for b in out.values())
    queue.put((seconds, base, peak, children, nbytes, nboxes, workers))


def _wait_for(child, queue):
    """The child's result from ``queue``; ``SystemExit`` if the child dies without one."""
    while True:
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not child.is_alive():
                msg = f"benchmark child failed with exit code {child.exitcode}"
                raise SystemExit(msg) from None
            continue
        child.join()
        return result


def bench_memory(args) -> None:
    ctx = multiprocessing.get_context("fork" if args.boxes_per_image else "spawn")
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for phase in ("compute", "load"):
            queue = ctx.Queue()
            child = ctx.Process(target=_memory_phase, args=(args, cache_dir, queue))
            child.start()
            result = _wait_for(child, queue)
            seconds, base, peak, children, nbytes, nboxes, workers = result
            mib = 1024.0  # ru_maxrss is in KiB on Linux
            rows.append([phase, args.n, workers, nboxes, f"{nbytes / 2**20:.1f}",
                         f"{base / mib:.0f}", f"{peak / mib:.0f}", f"{(peak - base) / mib:.0f}",
                         f"{children / mib:.0f}", f"{seconds:.1f}"])  # fmt: skip
    source = f"{args.boxes_per_image} random boxes" if args.boxes_per_image else "selective search"
    table(f"load_or_compute_proposals, {args.n} images {args.size}x{args.size} ({source})",
          ["phase", "images", "workers", "boxes", "boxes MiB", "RSS before MiB", "peak RSS MiB",
           "peak - before", "worker peak MiB", "seconds"], rows)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["speed", "recall", "memory"], action="append")
    parser.add_argument("--images", type=int, default=10, help="images per speed/recall row")
    parser.add_argument("--n", type=int, default=10000, help="images in the memory run")
    parser.add_argument("--size", type=int, default=32, help="side of the memory run's images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--boxes-per-image", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    only = set(args.only or ["speed", "recall", "memory"])
    if "speed" in only:
        bench_speed(args.images)
    if "recall" in only:
        bench_recall(args.images)
    if "memory" in only:
        bench_memory(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
