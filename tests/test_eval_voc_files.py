"""Fast VOC evaluation from files: the vectorised reader, matcher and annotation cache
against their references, and devkit-counted degenerate ground truth."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from devkit_reference import voc_eval
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapdet.evaluation.voc_annotations as voc_annotations
from mapdet.core.ap import GroundTruth
from mapdet.core.ap import best_ground_truth as core_best_ground_truth
from mapdet.core.ap import label_detections as core_label_detections
from mapdet.data.base import AnnotationError
from mapdet.data.voc import VOCDataset
from mapdet.evaluation.voc import evaluate_voc, evaluate_voc_results_dir
from mapdet.evaluation.voc_annotations import load_voc_ground_truth
from mapdet.evaluation.voc_results import (
    ImageIndex,
    ResultsFormatError,
    parse_decimals,
    read_result_file,
    read_result_file_indexed,
    read_result_file_reference,
)
from mapdet.evaluation.voc_scoring import ClassGroundTruth, best_ground_truth, label_detections

SRC = Path(__file__).resolve().parents[1] / "src"

# -- result files: fast reader == reference reader -----------------------------------------

number_text = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(-1e4, 1e4, allow_nan=False).map(repr),
    st.floats(-1e4, 1e4, allow_nan=False).map(lambda x: f"{x:.3f}"),
    st.floats(0, 1, allow_nan=False).map(lambda x: f"{x:.17f}"),  # more than 15 digits
    st.from_regex(r"[+-]?[0-9]{0,9}\.?[0-9]{0,9}", fullmatch=True),
    st.sampled_from(["1e3", "-2.5E-1", "nan", "inf", "-inf", "1_0", "0x10", ".", "-", "+.5",
                     "5.", "1..2", "--1", "abc", "00012.50", "-0", "-0.0"]),
)
separator = st.sampled_from([" ", "  ", "\t", " \t "])
image_id_text = st.sampled_from(["000001", "000002", "2008_000003", "a.b", "x"])


@st.composite
def result_text(draw):
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.sampled_from(["", "   ", "\t"])))
            continue
        n_fields = 6 if kind > 1 else draw(st.sampled_from([5, 7]))
        fields = [draw(image_id_text)] + [draw(number_text) for _ in range(n_fields - 1)]
        line = draw(separator).join(fields)
        lines.append(draw(st.sampled_from(["", " "])) + line)
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


def _outcome(reader, path):
    try:
        ids, scores, boxes = reader(path)
    except ResultsFormatError as exc:
        return ("error", str(exc))
    return ("ok", ids, scores.tobytes(), boxes.tobytes(), scores.shape, boxes.shape)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(result_text())
def test_fast_reader_equals_reference_reader(tmp_path, text):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_bytes(text.encode("utf-8"))
    assert _outcome(read_result_file, path) == _outcome(read_result_file_reference, path)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(
    st.from_regex(r"[+-]?[0-9]{1,15}(\.[0-9]{0,15})?", fullmatch=True),
    st.from_regex(r"[+-]?\.[0-9]{1,20}", fullmatch=True),
    st.from_regex(r"[+-]?[0-9]{1,10}\.[0-9]{5,10}", fullmatch=True),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:.6f}"),
    st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: "e" not in repr(x)).map(repr),
    st.floats(0, 1000, width=32).map(lambda x: repr(float(x)))  # float32 boxes, 17 digits
    .filter(lambda t: "e" not in t),
), min_size=1, max_size=30))
def test_parse_decimals_equals_float(tokens):
    text = " ".join(tokens).encode("ascii")
    b = np.frombuffer(text, dtype=np.uint8)
    solid = np.concatenate(([0], (b > 32).view(np.int8), [0]))
    starts = np.flatnonzero(np.diff(solid) == 1)
    ends = np.flatnonzero(np.diff(solid) == -1)
    values, ok = parse_decimals(b, starts, ends)
    digits = [sum(ch.isdigit() for ch in t) for t in tokens]
    for t, v, good, n in zip(tokens, values, ok, digits, strict=True):
        assert good or n > 15  # up to 15 digits always; 16-18 unless halfway; more: float()
        if good:
            ref = float(t)
            assert v == ref and math.copysign(1, v) == math.copysign(1, ref), (t, v, ref)


def test_reader_errors_keep_file_and_line(tmp_path):
    bad = {
        "000001 0.9 1 2 30": "expected 6 fields",
        "000001 0.9 1 2 30 40 50": "expected 6 fields",
        "000001 nan 1 2 30 40": "score is 'nan'",
        "000001 0.9 1 2 x 40": "x2 'x' is not a number",
        "000001 0.9 1 2 30 inf": "y2 is 'inf'",
        "000001 0.9 10 2 5 40": "negative width",
    }
    index = ImageIndex(["000001", "000003"])
    for line, message in bad.items():
        p = tmp_path / "bad.txt"
        p.write_text("000003 0.1 1 1 2 2\n\n" + line + "\n000003 0.1 1 1 2 2\n")
        for read in (read_result_file, lambda q: read_result_file_indexed(q, index, "set")):
            with pytest.raises(ResultsFormatError, match=message) as info:
                read(p)
            assert f"{p}:3:" in str(info.value)
            assert "\n" not in str(info.value)
    p = tmp_path / "unknown.txt"
    p.write_text("000001 0.9 1 1 5 5\n000002 0.9 1 1 5 5\n")
    with pytest.raises(ValueError, match=r"unknown.txt: image id '000002' \(detection 2\)"):
        read_result_file_indexed(p, index, "set")


def test_image_index_lookup():
    index = ImageIndex(["b", "a", "c", "a"])
    np.testing.assert_array_equal(index.lookup(["a", "c", "zz", "b"]), [1, 2, -1, 0])
    np.testing.assert_array_equal(index.lookup(np.array([b"c", b"q"])), [2, -1])
    assert index.lookup([]).shape == (0,)
    assert index.num_unique == 3


# -- matching: vectorised == core ----------------------------------------------------------


@st.composite
def matching_case(draw):
    n_images = draw(st.integers(1, 4))
    g = draw(st.integers(0, 8))
    d = draw(st.integers(0, 12))
    coord = st.integers(0, 12)

    def boxes(n):
        out = []
        for _ in range(n):
            x1, y1 = draw(coord), draw(coord)
            out.append([x1, y1, x1 + draw(st.integers(0, 6)), y1 + draw(st.integers(0, 6))])
        return np.asarray(out, dtype=np.float64).reshape(-1, 4)

    gt_image = np.asarray(draw(st.lists(st.integers(0, n_images - 1), min_size=g, max_size=g)),
                          dtype=np.int64)
    gt_diff = np.asarray(draw(st.lists(st.booleans(), min_size=g, max_size=g)), dtype=bool)
    det_image = np.asarray(draw(st.lists(st.integers(0, n_images - 1), min_size=d, max_size=d)),
                           dtype=np.int64)
    return boxes(g), gt_image, gt_diff, boxes(d), det_image


@settings(max_examples=400, deadline=None)
@given(matching_case(), st.sampled_from([0.0, 1.0]), st.sampled_from([0.3, 0.5, 0.7]))
def test_vectorised_matching_equals_core(case, offset, theta):
    gt_boxes, gt_image, gt_diff, boxes, image = case
    order = np.argsort(gt_image, kind="stable")  # the core's indices refer to sorted gt
    core_gt = GroundTruth(gt_boxes[order], gt_image[order], gt_diff[order])
    fast_gt = ClassGroundTruth.build(gt_boxes, gt_image, gt_diff)
    best, iou = best_ground_truth(boxes, image, fast_gt, offset)
    best_ref, iou_ref = core_best_ground_truth(boxes, image, core_gt, offset)
    np.testing.assert_array_equal(best, best_ref)
    np.testing.assert_array_equal(iou, iou_ref)
    labels = label_detections(best, iou, fast_gt.difficult, theta)
    np.testing.assert_array_equal(labels, core_label_detections(best_ref, iou_ref,
                                                                core_gt.difficult, theta))


# -- files: degenerate ground truth, cache, CLI --------------------------------------------

CLASSES = ("cat", "dog")
XML = """<annotation><filename>{iid}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
OBJ = ("<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
       "<difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
       "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>\n")


def write_voc(root: Path, images: dict, size=(50, 50)) -> Path:
    """``images``: id -> list of (class, difficult, raw box)."""
    base = root / "VOC2007"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for iid, objs in images.items():
        text = "".join(OBJ.format(name=c, d=int(d), b=b) for c, d, b in objs)
        (base / "Annotations" / f"{iid}.xml").write_text(
            XML.format(iid=iid, w=size[0], h=size[1], objects=text))
    (base / "ImageSets" / "Main" / "test.txt").write_text("\n".join(images) + "\n")
    return base


def write_results(folder: Path, lines: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        (folder / f"comp4_det_test_{c}.txt").write_text("".join(f"{x}\n" for x in
                                                                lines.get(c, [])))
    return folder


def port_aps(base: Path, results: Path, metric: str) -> dict:
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in CLASSES:
            _, _, ap = voc_eval(str(results / "comp4_det_test_{}.txt"),
                                str(base / "Annotations" / "{}.xml"),
                                str(base / "ImageSets" / "Main" / "test.txt"), c,
                                use_07_metric=(metric == "voc07"), sort_kind="stable")
            out[c] = ap
    return out


# a degenerate box (xmax < xmin), one wholly outside the 50 x 50 image, and an ordinary one
DEGENERATE = {
    "000001": [("cat", 0, [10, 10, 30, 30]), ("cat", 0, [20, 5, 12, 15])],
    "000002": [("cat", 0, [60, 60, 80, 80]), ("dog", 0, [5, 5, 20, 20])],
}
DEGENERATE_RESULTS = {
    "cat": ["000001 0.9 10 10 30 30", "000002 0.8 60 60 80 80", "000002 0.7 1 1 5 5"],
    "dog": ["000002 0.6 5 5 20 20", "000001 0.5 20 5 30 15"],
}


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_devkit_mode_counts_degenerate_and_outside_ground_truth(tmp_path, metric):
    base = write_voc(tmp_path, DEGENERATE)
    results = write_results(tmp_path / "res", DEGENERATE_RESULTS)
    expected = port_aps(base, results, metric)
    assert expected["cat"] < 1.0  # the devkit's npos counts all three cats
    for cache in (False, tmp_path / "cache"):
        res = evaluate_voc_results_dir(tmp_path, "test", results, metric,
                                       class_names=CLASSES, cache_dir=cache)
        assert res.npos == {"cat": 3, "dog": 1}
        for c in CLASSES:
            assert abs(res.per_class[c] - expected[c]) <= 1e-12
    # the same from a data set (records from VOCDataset), from files and in memory
    dataset = VOCDataset(tmp_path, split="test", class_names=CLASSES)
    assert dataset.records[0].num_objects == 1  # the continuous boxes drop the degenerate one
    res = evaluate_voc_results_dir(dataset, "test", results, metric)
    assert all(abs(res.per_class[c] - expected[c]) <= 1e-12 for c in CLASSES)
    from mapdet.evaluation.voc import read_devkit_results

    mem = evaluate_voc(dataset, read_devkit_results(results, "test", CLASSES),
                       class_names=CLASSES, metric=metric, box_format="raw")
    assert all(abs(mem.per_class[c] - expected[c]) <= 1e-12 for c in CLASSES)
    # the continuous convention drops them: only the ordinary cat counts
    cont = evaluate_voc_results_dir(tmp_path, "test", results, metric, class_names=CLASSES,
                                    convention="continuous", cache_dir=False)
    assert cont.npos == {"cat": 1, "dog": 1} and cont.per_class["cat"] == 1.0


def test_zero_area_pair_is_a_false_positive_as_in_the_devkit(tmp_path):
    # gt [10, 10, 9, 20] has width 0 (+1 convention); a zero-width detection on it gives
    # 0 / 0, NaN in voc_eval.py (np.max is then NaN: a FP). A zero-area detection meets every
    # box with intersection 0, so it is a FP in any case; the degenerate cat still counts.
    images = {"000001": [("cat", 0, [10, 10, 9, 20]), ("cat", 0, [1, 1, 40, 40])]}
    base = write_voc(tmp_path, images)
    results = write_results(tmp_path / "res", {"cat": ["000001 0.9 10 10 9 20",
                                                       "000001 0.8 1 1 40 40"]})
    expected = port_aps(base, results, "area")
    res = evaluate_voc_results_dir(tmp_path, "test", results, "area", class_names=CLASSES,
                                   cache_dir=False)
    assert abs(res.per_class["cat"] - expected["cat"]) <= 1e-12


def test_annotation_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    base = write_voc(tmp_path, DEGENERATE)
    cache = tmp_path / "cache"
    first = load_voc_ground_truth(base, "test", CLASSES, cache_dir=cache)
    files = list((cache / "voc_annotations").glob("*.npz"))
    assert len(files) == 1

    calls = []
    real = voc_annotations.scan_voc_objects  # every file parsed goes through it first

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(voc_annotations, "scan_voc_objects", counting)
    again = load_voc_ground_truth(base, "test", CLASSES, cache_dir=cache)
    assert calls == []
    for name in ("image", "labels", "difficult", "raw_boxes", "width", "height"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    # an edited annotation (new size and mtime) is parsed again, never read stale
    xml = base / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>",
                                           "<difficult>1</difficult>", 1) + " ")
    st = xml.stat()
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    edited = load_voc_ground_truth(base, "test", CLASSES, cache_dir=cache)
    assert len(calls) == 2 and edited.difficult.sum() == first.difficult.sum() + 1
    # a corrupt cache file is replaced, not trusted
    files[0].write_bytes(b"not an npz")
    calls.clear()
    load_voc_ground_truth(base, "test", CLASSES, cache_dir=cache)
    assert len(calls) == 2
    # no cache at all
    calls.clear()
    load_voc_ground_truth(base, "test", CLASSES, cache_dir=False)
    assert len(calls) == 2


def test_unwritable_cache_only_warns(tmp_path, caplog):
    base = write_voc(tmp_path, DEGENERATE)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="mapdet.evaluation.voc"):
        gt = load_voc_ground_truth(base, "test", CLASSES, cache_dir=blocker)
    assert gt.labels.size == 4 and "annotation cache" in caplog.text


def test_missing_annotation_is_named(tmp_path):
    base = write_voc(tmp_path, DEGENERATE)
    (base / "Annotations" / "000002.xml").unlink()
    with pytest.raises(AnnotationError, match="000002"):
        load_voc_ground_truth(base, "test", CLASSES, cache_dir=False)


def _run_cli(args, tmp_path):
    """``mapdet eval`` in a fresh interpreter; returns (rc, stdout, stderr, torch loaded)."""
    code = ("import sys\nfrom mapdet.cli import main\nrc = main(sys.argv[1:])\n"
            "print('TORCH', 'torch' in sys.modules, 'numba' in sys.modules)\nsys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(SRC), MAPDET_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def _run_cli_catching(args, tmp_path):
    """As :func:`_run_cli`, reporting the modules also when ``main`` fails."""
    code = ("import sys\nfrom mapdet.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nfinally:\n"
            "    print('TORCH', 'torch' in sys.modules, 'numba' in sys.modules)\n"
            "sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(SRC), MAPDET_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_scores_result_files_without_torch(tmp_path):
    base = write_voc(tmp_path, DEGENERATE)
    results = write_results(tmp_path / "res", DEGENERATE_RESULTS)
    out = tmp_path / "metrics.json"
    rc, stdout, stderr = _run_cli(["eval", "--voc", str(tmp_path), "--results", str(results),
                                   "--out", str(out)], tmp_path)
    assert rc == 0, stderr
    assert "TORCH False False" in stdout
    import json

    got = json.loads(out.read_text())
    expected = port_aps(base, results, "voc07")
    assert abs(got["per_class"]["cat"] - expected["cat"]) <= 1e-12
    # a bad results file: one line naming file and line, still no torch
    (results / "comp4_det_test_dog.txt").write_text("000001 0.9 1 1 5 5\n000001 0.9 1 x 5 5\n")
    rc, stdout, stderr = _run_cli_catching(["eval", "--voc", str(tmp_path), "--results",
                                            str(results)], tmp_path)
    assert rc == 2
    assert "TORCH False False" in stdout
    lines = [ln for ln in stderr.splitlines() if ln.startswith("mapdet: error:")]
    assert len(lines) == 1 and "comp4_det_test_dog.txt:2: y1 'x' is not a number" in lines[0]
