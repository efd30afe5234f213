"""Benchmark: VOC and COCO evaluation against their peers, in one run, on one core.

Workload: ``--images`` images (5,000; VOC07 test has 4,952), 20 classes, 1-6
objects per image with about 10% difficult, and ``--dets`` detections per image (100) spread
over the classes, most near an object. It is written to a temporary folder as a VOC tree
(annotation XML, ``ImageSets/Main/test.txt``), devkit result files written by
:func:`mapdet.evaluation.export.write_devkit_results` (shortest round-trip decimals), and
the same data as COCO JSON (ground truth and results).

Timed after a warm-up on a small workload, the process pinned to one CPU, in ``--rounds``
rounds (3): every round times every entry once, so each peer and mapdet alternate, and each
row is its entry's least disturbed round (least CPU time):

- ``voc_eval.py`` (py-faster-rcnn's, the port in ``tests/devkit_reference.py``) looped over
  the classes, with its ``annots.pkl`` cache as in the original (the first class parses the
  XML, the others load the pickle; a new cache folder each round): the VOC peer;
- mapdet from the files, Python API (:func:`~mapdet.evaluation.voc.evaluate_voc_results_dir`)
  without the annotation cache (cold) and with it (warm), and the same through
  ``mapdet eval --voc ... --results ...`` in a fresh interpreter (the whole command:
  interpreter start, imports, reading, scoring; Python's bytecode cache allowed, as in an
  installed package); once, ``--blame K`` (every detection's pseudo-partial with
  :func:`mapdet.ap_blame`, numba's compiled kernels loaded from its disk cache) and mapdet
  on detections already in memory (:func:`~mapdet.evaluation.voc.evaluate_voc`);
- COCO AP@[.5:.95] of the same data from the JSON files: faster-coco-eval called directly
  (``COCO``, ``loadRes``, ``COCOeval_faster``: the COCO peer) and
  :func:`~mapdet.evaluation.coco.evaluate_coco`, alternating; once,
  ``evaluate_coco(backend="pycocotools")``.

The numbers are checked: every class's AP equals the port's to 1e-12, mapdet's COCO
statistics equal faster-coco-eval's exactly and pycocotools' to 1e-12.

    python benchmarks/bench_eval.py                     # the workload of docs/speed.md
    python benchmarks/bench_eval.py --dets 1000         # 1,000 detections per image
    python benchmarks/bench_eval.py --scaling           # mapdet only: n, 4n, 16n images
    python benchmarks/bench_eval.py --in-memory [--per-class]   # in-memory scoring only
    python benchmarks/bench_eval.py --blame 0                   # without the --blame row
    python benchmarks/bench_eval.py --only coco --no-pycocotools  # mapdet vs faster-coco-eval
"""

from __future__ import annotations

import argparse
import json
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
    (root / "coco_gt.json").write_text(json.dumps(gt))
    (root / "coco_results.json").write_text(json.dumps(coco_dets))
    return {"root": root, "base": base, "results": results,
            "coco_gt_json": root / "coco_gt.json", "coco_dt_json": root / "coco_results.json"}


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


def coco_direct(w: dict):
    """faster-coco-eval called directly on the JSON files, as its documentation shows: the
    peer of :func:`~mapdet.evaluation.coco.evaluate_coco` (its prints captured, as mapdet's)."""
    import contextlib
    import io

    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(w["coco_gt_json"]))
        ev = COCOeval_faster(gt, gt.loadRes(str(w["coco_dt_json"])), "bbox",
                             print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: float("nan") if v < 0 else float(v)
            for n, v in zip(COCO_STAT_NAMES, ev.stats, strict=True)}


def same_stats(a: dict, b: dict, tol: float) -> bool:
    return all((math.isnan(a[n]) and math.isnan(b[n])) or abs(a[n] - b[n]) <= tol
               for n in COCO_STAT_NAMES)


def best(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The round with the least CPU time (the least disturbed)."""
    return min(times, key=lambda t: t[1])


def compare_voc(args, tmp: Path, w: dict, records, detections, rows: list) -> float:
    """The VOC rows; returns the mAP. Every round times every entry once, in this order, so
    the peer and mapdet alternate; each entry's row is its least disturbed round."""
    times: dict[str, list] = {}
    res = None
    for k in range(args.rounds):
        t, port = timed(lambda k=k: port_all(w, tmp / f"port_cache{k}"))
        times.setdefault("port", []).append(t)
        t, res = timed(lambda: evaluate_voc_results_dir(
            w["root"], "test", w["results"], "voc07", cache_dir=False))
        times.setdefault("cold", []).append(t)
        for c in VOC_CLASSES:
            assert abs(res.per_class[c] - port[c]) <= 1e-12, (c, res.per_class[c], port[c])
        cache = tmp / f"cache{k}"
        evaluate_voc_results_dir(w["root"], "test", w["results"], "voc07", cache_dir=cache)
        t, res2 = timed(lambda cache=cache: evaluate_voc_results_dir(
            w["root"], "test", w["results"], "voc07", cache_dir=cache))
        times.setdefault("warm", []).append(t)
        assert res2.per_class == res.per_class
        times.setdefault("cli_cold", []).append(cli(w, tmp / f"cli_cache{k}", use_cache=False))
        cli(w, tmp / f"cli_cache{k}", use_cache=True)
        times.setdefault("cli_warm", []).append(cli(w, tmp / f"cli_cache{k}", use_cache=True))
    port = best(times["port"])
    rows.append(("voc_eval.py looped over the classes (annots.pkl cache)", port, None))
    for key, name in (("cold", "mapdet API from files, no annotation cache"),
                      ("warm", "mapdet API from files, annotation cache"),
                      ("cli_cold", "mapdet eval --voc --results --no-cache (whole command)"),
                      ("cli_warm", "mapdet eval --voc --results (whole command, cache)")):
        rows.append((name, best(times[key]), ratio(port, best(times[key]))))
    if args.blame:
        out = tmp / "blame_out"
        # the timed run writes where the warm-up did: --overwrite replaces mapdet's own files
        blame_args = ("--blame", str(args.blame), "--out", str(out), "--overwrite")
        cli(w, tmp / "cli_cache0", True, blame_args)  # warm-up: numba's disk cache
        t_blame = cli(w, tmp / "cli_cache0", True, blame_args)
        blamed = json.loads((out / "blame.json").read_text())
        assert abs(blamed["mAP"] - res.mAP) <= 1e-9, (blamed["mAP"], res.mAP)
        rows.append((f"the same with --blame {args.blame} (all partials, numba)", t_blame,
                     None))
    per_class = detections_by_class(detections, VOC_CLASSES)
    t_mem, _ = timed(lambda: evaluate_voc(records, per_class, class_names=VOC_CLASSES,
                                          metric="voc07"))
    rows.append(("mapdet API, detections in memory", t_mem, ratio(port, t_mem)))
    return res.mAP


def compare_coco(args, w: dict, rows: list) -> float:
    """The COCO rows, from the JSON files; returns the AP. faster-coco-eval called directly
    and mapdet alternate in every round; pycocotools (the reference) runs once."""
    direct_t, ours_t, ours_stats = [], [], {}
    for _ in range(args.rounds):
        t, direct = timed(lambda: coco_direct(w))
        direct_t.append(t)
        t, ours_stats = timed(lambda: evaluate_coco(w["coco_gt_json"], w["coco_dt_json"]))
        ours_t.append(t)
        assert same_stats(ours_stats, direct, 0.0), (ours_stats, direct)
    direct, ours = best(direct_t), best(ours_t)
    per_round = ", ".join(f"{d[1] / o[1]:.2f}x" for d, o in zip(direct_t, ours_t, strict=True))
    rows.append(("COCO AP@[.5:.95], faster-coco-eval called directly", direct, None))
    rows.append((f"mapdet evaluate_coco, same files (rounds: {per_round})", ours,
                 ratio(direct, ours)))
    if args.pycocotools:
        t_pyc, ref = timed(lambda: evaluate_coco(w["coco_gt_json"], w["coco_dt_json"],
                                                 backend="pycocotools"))
        assert same_stats(ref, ours_stats, 1e-12), (ref, ours_stats)
        rows.append(("COCO AP@[.5:.95], evaluate_coco(backend='pycocotools')", t_pyc, None))
    return ours_stats["AP"]


def compare(args) -> None:
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_workload(tmp / "small", *make_records(50, 20, seed=1))
        evaluate_voc_results_dir(small["root"], "test", small["results"], cache_dir=False)
        coco_direct(small)  # warm-ups
        evaluate_coco(small["coco_gt_json"], small["coco_dt_json"])
        evaluate_coco(small["coco_gt_json"], small["coco_dt_json"], backend="pycocotools")
        t = time.perf_counter()
        records, detections = make_records(args.images, args.dets)
        w = write_workload(tmp / "w", records, detections)
        total = sum(len(d["scores"]) for d in detections.values())
        print(f"workload: {args.images} images, 20 classes, {total:,} detections "
              f"(written in {time.perf_counter() - t:.0f} s); {args.rounds} rounds")
        voc_map = compare_voc(args, tmp, w, records, detections, rows) \
            if args.only in ("all", "voc") else None
        coco_ap = compare_coco(args, w, rows) if args.only in ("all", "coco") else None

    if voc_map is not None:
        print(f"VOC07 mAP {voc_map:.4f} (equal to voc_eval.py's per class to 1e-12)")
    if coco_ap is not None:
        print(f"COCO AP {coco_ap:.4f} (mapdet's statistics equal to faster-coco-eval's)")
    print("\nCPU: seconds of CPU time of the process (one core: it is pinned), the least of")
    print("the rounds; the speed-up is the ratio of CPU times (peer / row), which a loaded")
    print("machine disturbs less than wall times.\n")
    print(f"| {'what':<62} | {'CPU':>8} | {'wall':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 64}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|")
    for name, (wall, cpu), r in rows:
        r = "" if r is None else f"{r:.2f}x"
        print(f"| {name:<62} | {cpu:>6.2f} s | {wall:>6.2f} s | {r:>8} |")


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
    parser.add_argument("--only", choices=("all", "voc", "coco"), default="all")
    parser.add_argument("--rounds", type=int, default=3,
                        help="every timed entry once per round, peers alternating")
    parser.add_argument("--no-pycocotools", dest="pycocotools", action="store_false",
                        help="without the pycocotools row (40 s)")
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
