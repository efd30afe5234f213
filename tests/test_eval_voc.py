"""VOC scoring (mapdet.evaluation.voc) against hand-computed values and the devkit port."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from devkit_reference import build_class_recs, voc_eval, voc_eval_arrays
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.core.ap import average_precision
from mapdet.data.base import ImageRecord
from mapdet.evaluation.table import format_per_class, format_table
from mapdet.evaluation.voc import (
    EvalResult,
    ResultsFormatError,
    detections_by_class,
    devkit_threshold,
    evaluate_voc,
    evaluate_voc_results_dir,
    read_devkit_results,
    read_result_file,
)

CLASSES = ("cat", "dog")
SIZE = 40  # image width and height: every generated box fits, nothing is clipped


def record(image_id: str, raw_boxes, labels, difficult=None) -> ImageRecord:
    """A record whose raw (1-based inclusive) boxes are given, as a VOC XML would give them."""
    raw = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 4)
    cont = raw.copy()
    cont[:, :2] -= 1.0
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), SIZE, SIZE, cont, labels, difficult,
                       extra={"voc_raw_boxes": raw})


def dets(ids, scores, boxes):
    return (list(ids), np.asarray(scores, dtype=np.float64),
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def devkit_port_ap(records, class_dets, class_index, metric, sort_kind="stable"):
    """The devkit port's AP of one class on in-memory records and raw detections."""
    recs = {
        r.image_id: [
            {"name": CLASSES[int(lab)], "bbox": list(b), "difficult": int(d)}
            for b, lab, d in zip(r.extra["voc_raw_boxes"], r.labels, r.difficult, strict=True)
        ]
        for r in records
    }
    class_recs, npos = build_class_recs(recs, [r.image_id for r in records], CLASSES[class_index])
    ids, scores, boxes = class_dets
    _, _, ap = voc_eval_arrays(class_recs, ids, scores, boxes, npos, 0.5,
                               use_07_metric=(metric == "voc07"), sort_kind=sort_kind)
    return ap, npos


# -- hand-computed cases -------------------------------------------------------------------

BOX = [1, 1, 10, 10]  # raw 1-based: a 10 x 10 box


def two_image_set():
    return [record("a", [BOX], [0]), record("b", [BOX], [0]), record("c", [BOX], [0], [True]),
            record("d", [], [])]


@pytest.mark.parametrize("convention", ["devkit", "continuous"])
def test_tp_fp_tp_with_two_positives(convention):
    # 0.9 on a: TP; 0.8 on a: duplicate, FP; 0.7 on b: TP.  npos = 2.
    d = {"cat": dets(["a", "a", "b"], [0.9, 0.8, 0.7], [BOX, BOX, BOX])}
    recs = two_image_set()
    area = evaluate_voc(recs, d, class_names=CLASSES, metric="area", convention=convention,
                        box_format="raw")
    # precision at the two TPs: 1 and 2/3, each a recall step of 1/2
    assert area.per_class["cat"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    voc07 = evaluate_voc(recs, d, class_names=CLASSES, metric="voc07", convention=convention,
                         box_format="raw")
    # t = 0, .1, ..., .5 (6 points) see precision 1; t = .6, ..., 1 (5 points) see 2/3
    assert voc07.per_class["cat"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-12)
    assert area.npos == {"cat": 2, "dog": 0}
    assert math.isnan(area.per_class["dog"])
    assert area.mAP == area.per_class["cat"]  # dog (no ground truth) is left out


def test_difficult_is_ignored_and_images_without_gt_give_fp():
    # 0.9 TP on a; 0.8 on the difficult box of c: ignored; 0.7 on d (no gt): FP; 0.6 TP on b.
    d = {"cat": dets(["a", "c", "d", "b"], [0.9, 0.8, 0.7, 0.6], [BOX] * 4)}
    res = evaluate_voc(two_image_set(), d, class_names=CLASSES, metric="area", box_format="raw")
    assert res.per_class["cat"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    rec, prec = res.curves["cat"]  # the ignored detection is not on the curve
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3])


def test_class_without_detections_has_ap_zero():
    recs = [record("a", [BOX, BOX], [0, 1])]
    res = evaluate_voc(recs, {"cat": dets(["a"], [0.5], [BOX])}, class_names=CLASSES,
                       box_format="raw")
    assert res.per_class == {"cat": 1.0, "dog": 0.0}
    assert res.mAP == 0.5
    assert res.num_detections == {"cat": 1, "dog": 0}


def test_tied_scores_keep_input_order():
    # X (FP, on an image without gt) and Y (TP) tie: the earlier one in the input goes first.
    recs = [record("a", [BOX], [0]), record("z", [], [])]
    x_first = evaluate_voc(recs, {"cat": dets(["z", "a"], [0.5, 0.5], [BOX, BOX])},
                           class_names=CLASSES, metric="area", box_format="raw")
    y_first = evaluate_voc(recs, {"cat": dets(["a", "z"], [0.5, 0.5], [BOX, BOX])},
                           class_names=CLASSES, metric="area", box_format="raw")
    assert x_first.per_class["cat"] == 0.5
    assert y_first.per_class["cat"] == 1.0


def test_iou_exactly_half_devkit_strict_continuous_inclusive():
    # raw gt [1,1,10,10]: 10 x 10 with +1 widths; raw det [1,1,10,5]: 10 x 5, inside it.
    # IoU = 50 / 100 = 0.5 exactly, in both conventions.
    recs = [record("a", [BOX], [0])]
    d = {"cat": dets(["a"], [0.9], [[1, 1, 10, 5]])}
    devkit = evaluate_voc(recs, d, class_names=CLASSES, convention="devkit", box_format="raw")
    cont = evaluate_voc(recs, d, class_names=CLASSES, convention="continuous", box_format="raw")
    assert devkit.per_class["cat"] == 0.0  # devkit: ovmax > 0.5 fails
    assert cont.per_class["cat"] == 1.0  # method.md: IoU >= 0.5 matches
    class_recs, npos = build_class_recs(
        {"a": [{"name": "cat", "bbox": BOX, "difficult": 0}]}, ["a"], "cat")
    assert voc_eval_arrays(class_recs, ["a"], [0.9], [[1, 1, 10, 5]], npos)[2] == 0.0


def test_devkit_threshold_is_the_next_double():
    t = devkit_threshold(0.5)
    assert t > 0.5 and np.nextafter(t, 0.0) == 0.5
    for iou in (0.5, np.nextafter(0.5, 1.0), 0.75, 0.25):
        assert (iou >= t) == (iou > 0.5)


def test_zero_width_continuous_box_is_accepted_in_devkit_convention():
    # A box clipped to the border, [40, 5, 40, 9] continuous, is [41, 6, 40, 9] raw: width 0
    # with the devkit's +1. It must score (as a FP), not raise.
    recs = [record("a", [BOX], [0])]
    d = {"cat": dets(["a", "a"], [0.9, 0.8], [[40, 5, 40, 9], [0, 0, 10, 10]])}
    res = evaluate_voc(recs, d, class_names=CLASSES, metric="area", box_format="continuous")
    assert res.per_class["cat"] == 0.5


def test_in_memory_continuous_detections_equal_raw_ones():
    recs = [record("a", [BOX, [5, 5, 20, 20]], [0, 1]), record("b", [[3, 3, 12, 14]], [0])]
    per_image = {
        "a": {"boxes": [[0, 0, 10, 10], [4.5, 4, 19, 20.5], [1, 1, 9, 9]],
              "scores": [0.9, 0.8, 0.7], "labels": [0, 1, 0]},
        "b": {"boxes": [[2, 2, 12, 14]], "scores": [0.95], "labels": [0]},
    }
    by_class = detections_by_class(per_image, CLASSES)
    assert by_class["cat"][0] == ["a", "a", "b"]
    raw = {c: (ids, s, b + np.array([1.0, 1.0, 0.0, 0.0])) for c, (ids, s, b) in by_class.items()}
    for metric in ("voc07", "area"):
        a = evaluate_voc(recs, by_class, class_names=CLASSES, metric=metric)
        b = evaluate_voc(recs, raw, class_names=CLASSES, metric=metric, box_format="raw")
        assert a.per_class == b.per_class


def test_errors_name_the_culprit():
    recs = [record("a", [BOX], [0])]
    with pytest.raises(ValueError, match="'zz'"):
        evaluate_voc(recs, {"cat": dets(["zz"], [0.5], [BOX])}, class_names=CLASSES)
    with pytest.raises(ValueError, match="unknown class"):
        evaluate_voc(recs, {"bird": dets([], [], [])}, class_names=CLASSES)
    with pytest.raises(ValueError, match="metric"):
        evaluate_voc(recs, {}, class_names=CLASSES, metric="coco")
    with pytest.raises(ValueError, match="convention"):
        evaluate_voc(recs, {}, class_names=CLASSES, convention="matlab")
    with pytest.raises(ValueError, match="finite"):
        evaluate_voc(recs, {"cat": dets(["a"], [np.nan], [BOX])}, class_names=CLASSES)


def test_no_ground_truth_at_all_gives_nan_map_and_json_null():
    res = evaluate_voc([record("a", [], [])], {}, class_names=CLASSES)
    assert math.isnan(res.mAP)
    js = res.to_json()
    assert js["mAP"] is None and js["per_class"] == {"cat": None, "dog": None}
    json.dumps(js, allow_nan=False)


def test_to_json_and_write_json(tmp_path):
    res = evaluate_voc(two_image_set(), {"cat": dets(["a"], [0.9], [BOX])},
                       class_names=CLASSES, metric="area", box_format="raw")
    path = res.write_json(tmp_path / "out" / "metrics.json")
    data = json.loads(path.read_text())
    assert data["mAP"] == 0.5 and data["metric"] == "area" and data["convention"] == "devkit"
    assert data["per_class"] == {"cat": 0.5, "dog": None}
    assert data["npos"] == {"cat": 2, "dog": 0}
    assert not list(path.parent.glob(".*tmp"))


# -- generated cases against the devkit port -----------------------------------------------


@st.composite
def raw_box(draw, min_width=0):
    """Integer 1-based box; ``min_width=-1`` allows the devkit's zero-width boxes."""
    x1 = draw(st.integers(1, 20))
    y1 = draw(st.integers(1, 20))
    x2 = x1 + draw(st.integers(min_width, 12))
    y2 = y1 + draw(st.integers(min_width, 12))
    return [x1, y1, x2, y2]


@st.composite
def voc_case(draw):
    n_images = draw(st.integers(1, 4))
    image_ids = [f"{i:06d}" for i in range(n_images)]
    records = []
    for iid in image_ids:
        m = draw(st.integers(0, 4))
        boxes = [draw(raw_box()) for _ in range(m)]
        labels = draw(st.lists(st.integers(0, 1), min_size=m, max_size=m))
        difficult = draw(st.lists(st.booleans(), min_size=m, max_size=m))
        records.append(record(iid, boxes, labels, difficult))
    detections = {}
    for c in CLASSES:
        if draw(st.booleans()) and c == "dog":
            continue  # a class absent from the mapping: no detections
        n = draw(st.integers(0, 10))
        ids = [draw(st.sampled_from(image_ids)) for _ in range(n)]
        scores = [draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.3])) for _ in range(n)]
        boxes = []
        for iid in ids:
            rec = records[image_ids.index(iid)]
            if rec.num_objects and draw(st.booleans()):  # near a gt: matches are likely
                g = rec.extra["voc_raw_boxes"][draw(st.integers(0, rec.num_objects - 1))]
                jitter = draw(st.lists(st.integers(-2, 2), min_size=4, max_size=4))
                b = [g[0] + jitter[0], g[1] + jitter[1], g[2] + jitter[2], g[3] + jitter[3]]
                b[2], b[3] = max(b[2], b[0] - 1), max(b[3], b[1] - 1)
                boxes.append(b)
            else:
                boxes.append(draw(raw_box(min_width=-1)))
        detections[c] = dets(ids, scores, boxes)
    return records, detections


@settings(max_examples=300, deadline=None)
@given(voc_case(), st.sampled_from(["voc07", "area"]))
def test_devkit_convention_equals_devkit_port(case, metric):
    records, detections = case
    res = evaluate_voc(records, detections, class_names=CLASSES, metric=metric,
                       convention="devkit", box_format="raw")
    for k, c in enumerate(CLASSES):
        class_dets = detections.get(c, dets([], [], []))
        ap, npos = devkit_port_ap(records, class_dets, k, metric)
        assert res.npos[c] == npos
        if npos == 0:
            assert math.isnan(res.per_class[c])
        else:
            assert abs(res.per_class[c] - ap) <= 1e-12, (c, res.per_class[c], ap)


@settings(max_examples=150, deadline=None)
@given(voc_case(), st.sampled_from(["voc07", "area"]))
def test_continuous_convention_equals_core_average_precision(case, metric):
    records, detections = case
    res = evaluate_voc(records, detections, class_names=CLASSES, metric=metric,
                       convention="continuous", box_format="raw")
    index = {r.image_id: i for i, r in enumerate(records)}
    for k, c in enumerate(CLASSES):
        ids, scores, raw = detections.get(c, dets([], [], []))
        boxes = raw - np.array([1.0, 1.0, 0.0, 0.0])
        boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0])  # the core refuses x2 < x1
        boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1])
        gt = [(r.boxes[r.labels == k], index[r.image_id], r.difficult[r.labels == k])
              for r in records]
        gt_boxes = np.concatenate([g[0] for g in gt]).astype(np.float64).reshape(-1, 4)
        gt_ids = np.concatenate([np.full(len(g[0]), g[1]) for g in gt]).astype(np.int64)
        gt_diff = np.concatenate([g[2] for g in gt]).astype(bool)
        expected = average_precision(scores, boxes, [index[i] for i in ids], gt_boxes, gt_ids,
                                     gt_diff, match_iou=0.5, ap_method=metric)
        got = res.per_class[c]
        assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_voc07_and_area_differ_as_expected():
    # one TP at rank 2 of 2 detections, npos = 1: area = 1/2; voc07 = 11 points at 1/2.
    recs = [record("a", [BOX], [0]), record("z", [], [])]
    d = {"cat": dets(["z", "a"], [0.9, 0.8], [BOX, BOX])}
    area = evaluate_voc(recs, d, class_names=CLASSES, metric="area", box_format="raw")
    voc07 = evaluate_voc(recs, d, class_names=CLASSES, metric="voc07", box_format="raw")
    assert area.per_class["cat"] == 0.5 and voc07.per_class["cat"] == pytest.approx(0.5)
    # npos = 3, TPs at ranks 1 and 3: area = (1 + 2/3)/3; voc07: t <= 1/3 (4 points) see 1,
    # t in .4 .. .6 (3 points) see 2/3, t >= .7 (4 points) see 0.
    recs = [record(i, [BOX], [0]) for i in "abc"] + [record("z", [], [])]
    d = {"cat": dets(["a", "z", "b"], [0.9, 0.8, 0.7], [BOX] * 3)}
    area = evaluate_voc(recs, d, class_names=CLASSES, metric="area", box_format="raw")
    voc07 = evaluate_voc(recs, d, class_names=CLASSES, metric="voc07", box_format="raw")
    assert area.per_class["cat"] == pytest.approx((1 + 2 / 3) / 3, abs=1e-12)
    assert voc07.per_class["cat"] == pytest.approx((4 + 3 * 2 / 3) / 11, abs=1e-12)


# -- result files --------------------------------------------------------------------------


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_read_result_file_and_format_errors(tmp_path):
    p = write_lines(tmp_path / "comp4_det_test_cat.txt",
                    ["000001 0.9 1 2 30 40", "", "000002  0.5\t3.5 4 5 6"])
    ids, scores, boxes = read_result_file(p)
    assert ids == ["000001", "000002"]
    np.testing.assert_array_equal(scores, [0.9, 0.5])
    np.testing.assert_array_equal(boxes, [[1, 2, 30, 40], [3.5, 4, 5, 6]])
    bad = {
        "000001 0.9 1 2 30": "expected 6 fields",
        "000001 nan 1 2 30 40": "score is 'nan'",
        "000001 0.9 1 2 x 40": "x2 'x' is not a number",
        "000001 0.9 1 2 30 inf": "y2 is 'inf'",
        "000001 0.9 10 2 5 40": "negative width",
    }
    for line, message in bad.items():
        p = write_lines(tmp_path / "bad.txt", ["000003 0.1 1 1 2 2", line])
        with pytest.raises(ResultsFormatError, match=message) as info:
            read_result_file(p)
        assert f"{p}:2:" in str(info.value)


def test_missing_class_files(tmp_path, caplog):
    write_lines(tmp_path / "comp4_det_test_cat.txt", ["a 0.9 1 1 10 10"])
    with caplog.at_level(logging.WARNING, logger="mapdet.evaluation.voc"):
        d = read_devkit_results(tmp_path, "test", CLASSES)
    assert "dog" in caplog.text
    assert d["dog"][0] == [] and d["dog"][2].shape == (0, 4)
    with pytest.raises(FileNotFoundError, match="comp4_det_test_dog.txt"):
        read_devkit_results(tmp_path, "test", CLASSES, allow_missing=False)
    with pytest.raises(FileNotFoundError, match="comp4_det_val_cat.txt"):
        read_devkit_results(tmp_path, "val", CLASSES)


XML = """<annotation>
  <filename>{iid}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
OBJ = """  <object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
    <difficult>{d}</difficult>
    <bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>
  </object>
"""


def write_voc_tree(root: Path, records) -> Path:
    base = root / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for r in records:
        objects = "".join(
            OBJ.format(name=CLASSES[int(lab)], d=int(d), b=[int(v) for v in b])
            for b, lab, d in zip(r.extra["voc_raw_boxes"], r.labels, r.difficult, strict=True)
        )
        (base / "Annotations" / f"{r.image_id}.xml").write_text(
            XML.format(iid=r.image_id, w=r.width, h=r.height, objects=objects))
    write_lines(base / "ImageSets" / "Main" / "test.txt", [r.image_id for r in records])
    return base


def write_results(folder: Path, detections, distinct_scores: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        ids, scores, boxes = detections.get(c, dets([], [], []))
        if distinct_scores:  # the port's quicksort is not stable: no ties
            scores = np.linspace(0.9, 0.1, len(ids))[np.argsort(np.argsort(-scores, kind="stable"))]
        write_lines(folder / f"comp4_det_test_{c}.txt",
                    [f"{i} {float(s)!r} {' '.join(str(int(v)) for v in b)}"
                     for i, s, b in zip(ids, scores, boxes, strict=True)])


@settings(max_examples=40, deadline=None)
@given(voc_case(), st.sampled_from(["voc07", "area"]), st.booleans())
def test_results_dir_equals_devkit_port_on_files(tmp_path_factory, case, metric, distinct):
    records, detections = case
    root = tmp_path_factory.mktemp("voc")
    base = write_voc_tree(root, records)
    results = root / "results" / "VOC2007" / "Main"
    write_results(results, detections, distinct)
    res = evaluate_voc_results_dir(root, "test", root / "results", metric,
                                   class_names=CLASSES)
    for c in CLASSES:
        _, _, ap = voc_eval(
            str(results / "comp4_det_test_{}.txt"), str(base / "Annotations" / "{}.xml"),
            str(base / "ImageSets" / "Main" / "test.txt"), c,
            use_07_metric=(metric == "voc07"),
            sort_kind="quicksort" if distinct else "stable",
        )
        if res.npos[c] == 0:
            assert math.isnan(res.per_class[c])
        else:
            assert abs(res.per_class[c] - ap) <= 1e-12


def test_results_dir_rejects_unknown_image(tmp_path):
    write_voc_tree(tmp_path, [record("000001", [BOX], [0])])
    (tmp_path / "res").mkdir()
    write_lines(tmp_path / "res" / "comp4_det_test_cat.txt", ["000001 0.9 1 1 10 10",
                                                              "999999 0.8 1 1 10 10"])
    with pytest.raises(ValueError, match=r"comp4_det_test_cat.txt: image id '999999'"):
        evaluate_voc_results_dir(tmp_path, "test", tmp_path / "res", class_names=CLASSES)
    with pytest.raises(FileNotFoundError, match="no result files"):
        evaluate_voc_results_dir(tmp_path, "test", tmp_path, class_names=CLASSES)


# -- table ---------------------------------------------------------------------------------


def test_format_per_class_table():
    a = EvalResult(mAP=0.5, per_class={"cat": 0.75, "dog": 0.25}, metric="voc07",
                   convention="devkit", npos={"cat": 1, "dog": 1})
    b = EvalResult(mAP=0.6, per_class={"cat": 0.6, "dog": float("nan")}, metric="voc07",
                   convention="devkit", npos={"cat": 1, "dog": 0})
    text = format_per_class({"baseline": a, "mapdet": b})
    lines = text.splitlines()
    assert lines[0].split() == ["class", "baseline", "mapdet"]
    assert lines[2].split() == ["cat", "75.0", "60.0"]
    assert lines[3].split() == ["dog", "25.0", "-"]
    assert lines[-1].split() == ["mAP", "50.0", "60.0"]
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    assert len({len(line) for line in (lines[0], lines[2], lines[-1])}) == 1  # aligned


def test_format_table_checks_row_length():
    with pytest.raises(ValueError, match="2 cells"):
        format_table([["x", 1.0]], ["a", "b", "c"])
    assert format_table([["x", None, 0.123]], ["a", "b", "c"], decimals=2).splitlines()[-1] \
        .split() == ["x", "-", "0.12"]
