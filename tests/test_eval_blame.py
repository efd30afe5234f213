"""``mapdet eval ... --blame K``: the blamed detections are ap_blame's, the reported moves
really gain the reported AP, and numba is imported only when blaming."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet import ap_blame
from mapdet.data.base import ImageRecord
from mapdet.evaluation.voc import devkit_threshold, evaluate_voc

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ("cat", "dog", "bird")

XML = ("<annotation><filename>{iid}.jpg</filename><size><width>60</width><height>60</height>"
       "<depth>3</depth></size>{objects}</annotation>")
OBJ = ("<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
       "<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>")


def make_case(rng: np.random.Generator, n_images: int, dets_per_class: int):
    """``(gt, dets)``: gt ``[(image, class, difficult, raw box)]`` with integer 1-based boxes,
    dets class -> ``[(image, score, raw box)]`` near the objects, scores with ties."""
    gt = []
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = (int(v) for v in rng.integers(1, 30, 2))
            w, h = (int(v) for v in rng.integers(4, 30, 2))
            gt.append((i, int(rng.integers(0, len(CLASSES))), bool(rng.uniform() < 0.15),
                       [x1, y1, min(x1 + w, 60), min(y1 + h, 60)]))
    dets = {}
    for c in range(len(CLASSES)):
        rows = []
        for _ in range(dets_per_class):
            i, _, _, b = gt[int(rng.integers(0, len(gt)))]
            box = (np.array(b, dtype=float) + rng.integers(-6, 7, 4) / 2).tolist()
            box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
            rows.append((int(i), float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])), box))
        dets[CLASSES[c]] = rows
    return gt, dets


def expected_blame(gt, dets, n_images: int, k: int, metric: str = "voc07"):
    """Straight from :func:`mapdet.ap_blame`, class by class (devkit boxes shifted by -1)."""
    out, aps = [], {}
    for c, name in enumerate(CLASSES):
        rows = dets[name]
        scores = np.array([[s] for _, s, _ in rows]).reshape(-1, 1)
        boxes = np.array([b for _, _, b in rows], dtype=float).reshape(-1, 4)
        boxes[:, :2] -= 1
        mine = [g for g in gt if g[1] == c]
        gboxes = np.array([g[3] for g in mine], dtype=float).reshape(-1, 4)
        gboxes[:, :2] -= 1
        b = ap_blame(scores, boxes, [i for i, _, _ in rows], gboxes, np.zeros(len(mine), int),
                     [g[0] for g in mine], [g[2] for g in mine], score_threshold=-np.inf,
                     nms_iou=1.0, match_iou=devkit_threshold(0.5), ap_method=metric,
                     num_threads=1)
        aps[name] = b.aps[0]
        out += [(-b.gains[j, 0], c, j, b.partials[j, 0]) for j in range(len(rows))
                if b.gains[j, 0] > 0]
    out.sort()
    return out[:k], aps


def write_case(root: Path, gt, dets, n_images: int) -> tuple[Path, Path]:
    base = root / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for i in range(n_images):
        objs = "".join(OBJ.format(name=CLASSES[c], d=int(d), b=b) for j, c, d, b in gt if j == i)
        (base / "Annotations" / f"{i:04d}.xml").write_text(XML.format(iid=i, objects=objs))
    (base / "ImageSets" / "Main" / "test.txt").write_text(
        "".join(f"{i:04d}\n" for i in range(n_images)))
    results = root / "results"
    results.mkdir()
    for name, rows in dets.items():
        (results / f"comp4_det_test_{name}.txt").write_text("".join(
            f"{i:04d} {s} {' '.join(repr(v) for v in b)}\n" for i, s, b in rows))
    return root, results


def test_cli_blame_writes_ap_blames_top_k_without_torch(tmp_path):
    n_images, k = 8, 7
    gt, dets = make_case(np.random.default_rng(5), n_images, 12)
    root, results = write_case(tmp_path, gt, dets, n_images)
    out = tmp_path / "eval" / "metrics.json"
    code = ("import sys\nfrom mapdet.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MODULES', 'torch' in sys.modules, 'numba' in sys.modules)\nsys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(SRC), MAPDET_CACHE_DIR=str(tmp_path / "cache"))
    args = ["eval", "--voc", str(root), "--results", str(results), "--classes",
            ",".join(CLASSES), "--out", str(out), "--blame", str(k)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MODULES False True" in proc.stdout  # numba for the blame, never torch
    got = json.loads((tmp_path / "eval" / "blame.json").read_text())
    table = (tmp_path / "eval" / "blame.txt").read_text()
    metrics = json.loads(out.read_text())
    want, aps = expected_blame(gt, dets, n_images, k)
    assert want, "the case must have something to blame"
    assert len(got["detections"]) == len(want)
    n_defined = sum(not math.isnan(v) for v in aps.values())
    for entry, (neg_gain, c, j, partial) in zip(got["detections"], want, strict=True):
        i, score, box = dets[CLASSES[c]][j]
        assert (entry["class"], entry["index"], entry["image_id"]) == (CLASSES[c], j, f"{i:04d}")
        assert entry["score"] == score and entry["box"] == box
        assert entry["partial"] == partial and entry["ap_gain"] == -neg_gain
        assert entry["map_gain"] == -neg_gain / n_defined
        assert entry["action"] == ("raise" if partial > 0 else "lower")
    for name in CLASSES:  # the blamed AP is the evaluated one
        assert abs(got["per_class"][name] - metrics["per_class"][name]) <= 1e-12
    assert table.count("\n") == len(want) + 3  # title, header, rule, one line each
    assert "raise above" in proc.stdout or "lower below" in proc.stdout


def _records(gt, n_images: int) -> list[ImageRecord]:
    recs = []
    for i in range(n_images):
        mine = [g for g in gt if g[0] == i]
        raw = np.array([g[3] for g in mine], dtype=float).reshape(-1, 4)
        recs.append(ImageRecord(f"{i:04d}", Path(f"{i:04d}.jpg"), 60, 60,
                                raw - np.array([1.0, 1.0, 0.0, 0.0]),
                                np.array([g[1] for g in mine], dtype=np.int64),
                                np.array([g[2] for g in mine], dtype=bool),
                                extra={"voc_raw_boxes": raw}))
    return recs


def _per_class(dets):
    return {name: ([f"{i:04d}" for i, _, _ in rows], np.array([s for _, s, _ in rows]),
                   np.array([b for _, _, b in rows], dtype=float).reshape(-1, 4))
            for name, rows in dets.items()}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n_images=st.integers(1, 5), n_dets=st.integers(0, 9),
       metric=st.sampled_from(["voc07", "area"]))
def test_each_blamed_move_gains_what_it_says(seed, n_images, n_dets, metric):
    """Moving a blamed detection just past ``move_to`` changes its class's evaluated AP
    (devkit arithmetic, ties, difficult objects) by exactly ``ap_gain``."""
    gt, dets = make_case(np.random.default_rng(seed), n_images, n_dets)
    recs = _records(gt, n_images)
    kw = dict(class_names=CLASSES, metric=metric, box_format="raw")
    per_class = _per_class(dets)
    res = evaluate_voc(recs, per_class, blame=50, **kw)
    blame = res.blame
    want, _ = expected_blame(gt, dets, n_images, 50, metric)
    assert [(e.cls, e.index) for e in blame.entries] == [(CLASSES[c], j) for _, c, j, _ in want]
    assert all(a.ap_gain >= b.ap_gain > 0
               for a, b in zip(blame.entries, blame.entries[1:], strict=False))
    for e in blame.entries:
        ids, scores, boxes = per_class[e.cls]
        others = np.unique(np.delete(scores, e.index))
        if e.partial > 0:
            beyond = others[others > e.move_to]
            new = (e.move_to + beyond[0]) / 2 if beyond.size else e.move_to + 1
        else:
            beyond = others[others < e.move_to]
            new = (e.move_to + beyond[-1]) / 2 if beyond.size else e.move_to - 1
        assert e.move_to in others
        moved = scores.copy()
        moved[e.index] = new
        after = evaluate_voc(recs, {**per_class, e.cls: (ids, moved, boxes)}, **kw)
        assert abs(after.per_class[e.cls] - res.per_class[e.cls] - e.ap_gain) <= 1e-9


def test_nothing_to_blame_and_empty_classes():
    gt = [(0, 0, False, [1, 1, 20, 20])]
    dets = {"cat": [(0, 0.9, [1.0, 1.0, 20.0, 20.0])], "dog": [], "bird": []}
    res = evaluate_voc(_records(gt, 1), _per_class(dets), class_names=CLASSES, box_format="raw",
                       blame=5)
    assert res.blame.entries == [] and res.blame.num_detections == 1
    assert math.isnan(res.blame.aps["dog"]) and res.blame.aps["cat"] == 1.0
    assert "no detection's score change raises the AP" in res.blame.table()
