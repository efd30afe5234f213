"""Benchmark: VOC and COCO evaluation against their peers, in one run, on one core.

Workload (issue 11): ``--images`` images (5,000; VOC07 test has 4,952), 20 classes, 1-6
objects per image with about 10% difficult, and ``--dets`` detections per image (100) spread
over the classes, most near an object. It is written to a temporary folder as a VOC tree
(annotation XML, ``ImageSets/Main/test.txt``), devkit result files written by
:func:`mapdet.evaluation.export.write_devkit_results` (shortest round-trip decimals), and
the same data as COCO JSON (ground truth and results).

Timed, each once after a warm-up on a small workload, the process pinned to one CPU:

- ``voc_eval.py`` (py-faster-rcnn's, the port in ``tests/devkit_reference.py``) looped over
  the classes, with its ``annots.pkl`` cache as in the original (the first class parses the
  XML, the others load the pickle): the peer;
- mapdet from the files, Python API (:func:`~mapdet.evaluation.voc.evaluate_voc_results_dir`)
  without the annotation cache (cold) and with it (warm), and the same through
  ``mapdet eval --voc ... --results ...`` in a fresh interpreter (the whole command:
  interpreter start, imports, reading, scoring; Python's bytecode cache allowed, as in an
  installed package), and with ``--blame K`` (every detection's pseudo-partial with
  :func:`mapdet.ap_blame`, numba's compiled kernels loaded from its disk cache);
- mapdet on detections already in memory (:func:`~mapdet.evaluation.voc.evaluate_voc`);
- COCO AP@[.5:.95] of the same data: :func:`~mapdet.evaluation.coco.evaluate_coco` with
  faster-coco-eval (the default) and with pycocotools.

The numbers are checked: every class's AP equals the port's to 1e-12, and the two COCO
backends' statistics agree to 1e-12.

    python benchmarks/bench_eval.py                     # the issue's workload
    python benchmarks/bench_eval.py --dets 1000         # 1,000 detections per image
    python benchmarks/bench_eval.py --scaling           # mapdet only: n, 4n, 16n images
    python benchmarks/bench_eval.py --in-memory [--per-class]   # in-memory scoring only
    python benchmarks/bench_eval.py --blame 0                   # without the --blame row
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the voc_eval.py port is test-only code

from devkit_reference import voc_eval  # noqa: E402

from mapdet.data.base import ImageRecord  # noqa: E402
from mapdet.data.voc import VOC_CLASSES  # noqa: E402
from mapdet.evaluation.coco import COCO_STAT_NAMES, evaluate_coco, records_to_coco_gt  # noqa: E402
from mapdet.evaluation.export import (  # noqa: E402
    coco_results_list,
    write_devkit_results,
)
from mapdet.evaluation.voc import (  # noqa: E402
    detections_by_class,
    evaluate_voc,
    evaluate_voc_results_dir,
)

XML = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>{iid}.jpg</filename>
\t<source><database>mapdet benchmark</database></source>
\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
OBJ = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>{d}</difficult>
\t\t<bndbox>
\t\t\t<xmin>{b[0]}</xmin>
\t\t\t<ymin>{b[1]}</ymin>
\t\t\t<xmax>{b[2]}</xmax>
\t\t\t<ymax>{b[3]}</ymax>
\t\t</bndbox>
\t</object>
"""


def make_records(n_images: int, dets: int, seed: int = 0):
    """``(records, detections)``: raw integer 1-based ground truth and per-image detections
    ``{"boxes" continuous xyxy, "scores", "labels"}``."""
    rng = np.random.default_rng(seed)
    records, detections = [], {}
    for i in range(n_images):
        iid = f"{i:06d}"
        w, h = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        m = int(rng.integers(1, 7))
        x1, y1 = rng.integers(1, w - 40, m), rng.integers(1, h - 40, m)
        x2 = np.minimum(x1 + rng.integers(10, 300, m), w)
        y2 = np.minimum(y1 + rng.integers(10, 300, m), h)
        raw = np.stack([x1, y1, x2, y2], axis=1).astype(np.float64)
        labels = rng.integers(0, len(VOC_CLASSES), m)
        difficult = rng.uniform(size=m) < 0.1
        cont = raw - np.array([1.0, 1.0, 0.0, 0.0])
        records.append(ImageRecord(iid, Path(f"{iid}.jpg"), w, h, cont, labels, difficult,
                                   extra={"voc_raw_boxes": raw}))
        src = rng.integers(0, m, dets)
        lab = np.where(rng.uniform(size=dets) < 0.5, labels[src],
                       rng.integers(0, len(VOC_CLASSES), dets))
        boxes = cont[src] + rng.normal(0, 8, (dets, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        detections[iid] = {"boxes": boxes.astype(np.float32),
                           "scores": rng.uniform(0.05, 1, dets).astype(np.float32),
                           "labels": lab.astype(np.int64)}
    return records, detections


def write_workload(root: Path, records, detections) -> dict:
    base = root / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for r in records:
        objects = "".join(OBJ.format(name=VOC_CLASSES[int(lab)], d=int(d), b=[int(v) for v in b])
                          for b, lab, d in zip(r.extra["voc_raw_boxes"], r.labels, r.difficult,
                                               strict=True))
        (base / "Annotations" / f"{r.image_id}.xml").write_text(
            XML.format(iid=r.image_id, w=r.width, h=r.height, objects=objects))
    (base / "ImageSets" / "Main" / "test.txt").write_text(
        "".join(f"{r.image_id}\n" for r in records))
    results = root / "results"
    write_devkit_results(results, "test", VOC_CLASSES, detections)
    gt = records_to_coco_gt(records, VOC_CLASSES)
    ids = {r.image_id: k + 1 for k, r in enumerate(records)}
    coco_dets = coco_results_list(detections, ids, list(range(1, len(VOC_CLASSES) + 1)))
    return {"root": root, "base": base, "results": results, "coco_gt": gt,
            "coco_dets": coco_dets}


def timed(fn):
    """``((wall seconds, CPU seconds of this process), fn())``."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t, time.process_time() - c), out


def _children_cpu() -> float:
    if resource is None:  # pragma: no cover - not on POSIX
        return float("nan")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ratio(peer: tuple[float, float], ours: tuple[float, float]) -> float:
    """Speed-up in CPU time."""
    return peer[1] / ours[1]


def port_all(w: dict, cachedir: Path) -> dict:
    base = w["base"]
    return {c: voc_eval(str(w["results"] / "comp4_det_test_{}.txt"),
                        str(base / "Annotations" / "{}.xml"),
                        str(base / "ImageSets" / "Main" / "test.txt"), c,
                        use_07_metric=True, sort_kind="stable", cachedir=str(cachedir))[2]
            for c in VOC_CLASSES}


def cli(w: dict, cache: Path, use_cache: bool, extra: tuple[str, ...] = ()
        ) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of one ``mapdet eval --voc`` run in a fresh interpreter, with
    Python's bytecode cache allowed (as in an installed package: the warm-up run writes it)."""
    env = dict(os.environ, MAPDET_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, "-m", "mapdet", "eval", "--voc", str(w["root"]), "--results",
           str(w["results"]), "-q", *extra] + ([] if use_cache else ["--no-cache"])
    t, c = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t, _children_cpu() - c


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})  # children (the CLI runs) inherit it
        return f"pinned to CPU {cpu}"
    return "not pinned"


def compare(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_workload(tmp / "small", *make_records(50, 20, seed=1))
        evaluate_voc_results_dir(small["root"], "test", small["results"], cache_dir=False)
        evaluate_coco(small["coco_gt"], small["coco_dets"])  # warm-ups
        evaluate_coco(small["coco_gt"], small["coco_dets"], backend="pycocotools")
        t = time.perf_counter()
        records, detections = make_records(args.images, args.dets)
        w = write_workload(tmp / "w", records, detections)
        total = sum(len(d["scores"]) for d in detections.values())
        print(f"workload: {args.images} images, 20 classes, {total:,} detections "
              f"(written in {time.perf_counter() - t:.0f} s)")

        t_port, port = timed(lambda: port_all(w, tmp / "port_cache"))
        rows.append(("voc_eval.py looped over the classes (annots.pkl cache)", t_port, None))
        t_cold, res = timed(lambda: evaluate_voc_results_dir(
            w["root"], "test", w["results"], "voc07", cache_dir=False))
        for c in VOC_CLASSES:
            assert abs(res.per_class[c] - port[c]) <= 1e-12, (c, res.per_class[c], port[c])
        cache = tmp / "cache"
        evaluate_voc_results_dir(w["root"], "test", w["results"], "voc07", cache_dir=cache)
        t_warm, res2 = timed(lambda: evaluate_voc_results_dir(
            w["root"], "test", w["results"], "voc07", cache_dir=cache))
        assert res2.per_class == res.per_class
        rows.append(("mapdet API from files, no annotation cache", t_cold, ratio(t_port, t_cold)))
        rows.append(("mapdet API from files, annotation cache", t_warm, ratio(t_port, t_warm)))
        t_cli_cold = cli(w, tmp / "cli_cache", use_cache=False)
        cli(w, tmp / "cli_cache", use_cache=True)
        t_cli_warm = cli(w, tmp / "cli_cache", use_cache=True)
        rows.append(("mapdet eval --voc --results --no-cache (whole command)", t_cli_cold,
                     ratio(t_port, t_cli_cold)))
        rows.append(("mapdet eval --voc --results (whole command, cache)", t_cli_warm,
                     ratio(t_port, t_cli_warm)))
        if args.blame:
            out = tmp / "blame_out"
            blame_args = ("--blame", str(args.blame), "--out", str(out))
            cli(w, tmp / "cli_cache", True, blame_args)  # warm-up: numba's disk cache
            t_blame = cli(w, tmp / "cli_cache", True, blame_args)
            import json

            blamed = json.loads((out / "blame.json").read_text())
            assert abs(blamed["mAP"] - res.mAP) <= 1e-9, (blamed["mAP"], res.mAP)
            rows.append((f"the same with --blame {args.blame} (all partials, numba)", t_blame,
                         None))
        per_class = detections_by_class(detections, VOC_CLASSES)
        t_mem, res3 = timed(lambda: evaluate_voc(records, per_class, class_names=VOC_CLASSES,
                                                 metric="voc07"))
        rows.append(("mapdet API, detections in memory", t_mem, ratio(t_port, t_mem)))

        t_pyc, ref = timed(lambda: evaluate_coco(w["coco_gt"], w["coco_dets"],
                                                 backend="pycocotools"))
        t_fast, fast = timed(lambda: evaluate_coco(w["coco_gt"], w["coco_dets"]))
        for name in COCO_STAT_NAMES:
            a, b = fast[name], ref[name]
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12, name
        coco_rows = [("COCO AP@[.5:.95], pycocotools", t_pyc, None),
                     ("COCO AP@[.5:.95], faster-coco-eval (mapdet's default)", t_fast,
                      ratio(t_pyc, t_fast))]

    print(f"VOC07 mAP {res.mAP:.4f} (equal to voc_eval.py's per class to 1e-12); "
          f"COCO AP {fast['AP']:.4f} (both backends)\n")
    print("CPU: seconds of CPU time of the process (one core: it is pinned); the speed-up is")
    print("the ratio of CPU times, which a loaded machine disturbs less than wall times.\n")
    print(f"| {'what':<58} | {'CPU':>8} | {'wall':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 60}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|")
    for name, (wall, cpu), r in rows + coco_rows:
        r = "" if r is None else f"{r:.1f}x"
        print(f"| {name:<58} | {cpu:>6.2f} s | {wall:>6.2f} s | {r:>8} |")


def scaling(args) -> None:
    print("CPU seconds of evaluate_voc_results_dir with the annotation cache")
    print(f"| {'images':>7} | {'detections':>11} | {'API, cache':>10} | {'per 1k images':>13} |")
    print(f"|{'-' * 9}:|{'-' * 13}:|{'-' * 12}:|{'-' * 15}:|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in enumerate((args.images // 4, args.images, args.images * 4)):
            records, detections = make_records(n, args.dets, seed=k)
            w = write_workload(Path(tmp) / str(n), records, detections)
            cache = Path(tmp) / "cache"
            evaluate_voc_results_dir(w["root"], "test", w["results"], cache_dir=cache)
            (_, t), _ = timed(lambda w=w, cache=cache: evaluate_voc_results_dir(
                w["root"], "test", w["results"], cache_dir=cache))
            print(f"| {n:>7} | {n * args.dets:>11,} | {t:>8.2f} s | {1000 * t / n:>11.3f} s |")


def in_memory(args) -> None:
    records, detections = make_records(args.images, args.dets if not args.per_class else
                                       args.dets * len(VOC_CLASSES))
    per_class = detections_by_class(detections, VOC_CLASSES)
    total = sum(len(v[0]) for v in per_class.values())
    evaluate_voc(records[:50], {}, class_names=VOC_CLASSES)
    for metric in ("voc07", "area"):
        (wall, cpu), res = timed(lambda metric=metric: evaluate_voc(
            records, per_class, class_names=VOC_CLASSES, metric=metric))
        print(f"{metric:>5}: {args.images} images, 20 classes, {total:,} detections in memory "
              f"-> mAP {res.mAP:.3f} in {cpu:.2f} s CPU ({wall:.2f} s wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--scaling", action="store_true", help="mapdet only, n/4, n, 4n")
    parser.add_argument("--in-memory", action="store_true", help="in-memory scoring only")
    parser.add_argument("--per-class", action="store_true",
                        help="with --in-memory: --dets per image *and class*")
    parser.add_argument("--blame", type=int, default=20, metavar="K",
                        help="also time mapdet eval --blame K (0: not)")
    args = parser.parse_args()
    pinned = pin_one_core()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.in_memory:
        in_memory(args)
    elif args.scaling:
        scaling(args)
    else:
        compare(args)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {pinned}; "
          f"load average at the start {load:.2f}")


if __name__ == "__main__":
    main()
