"""COCO metrics (mapdet.evaluation.coco) on tiny synthetic cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mapdet.data.base import ImageRecord
from mapdet.evaluation.coco import (
    COCO_STAT_NAMES,
    coco_image_id_map,
    evaluate_coco,
    records_to_coco_gt,
)
from mapdet.evaluation.export import coco_results_list, write_coco_results

CLASSES = ("cat", "dog")


def records():
    return [
        ImageRecord("img_a", Path("a.jpg"), 200, 150,
                    [[10, 10, 60, 70], [100, 20, 190, 140]], [0, 1], [False, False]),
        ImageRecord("img_b", Path("b.jpg"), 120, 100, [[5, 5, 100, 90]], [0], [False]),
        ImageRecord("img_c", Path("c.jpg"), 64, 64, np.zeros((0, 4)), [], []),
    ]


def perfect_detections(recs):
    return {r.image_id: {"boxes": r.boxes, "scores": np.ones(r.num_objects),
                         "labels": r.labels} for r in recs}


def test_gt_dict():
    gt = records_to_coco_gt(records(), CLASSES)
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    a = gt["annotations"][0]
    assert a["bbox"] == [10.0, 10.0, 50.0, 60.0] and a["area"] == 3000.0
    assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["image_id"] == 1


def test_perfect_detections_give_ap_one(tmp_path, capsys):
    recs = records()
    gt = records_to_coco_gt(recs, CLASSES)
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    res = write_coco_results(tmp_path / "res.json", perfect_detections(recs),
                             coco_image_id_map(recs), [1, 2])
    stats = evaluate_coco(ann, res, per_class=True)
    assert capsys.readouterr().out == ""  # pycocotools' prints went to logging
    assert set(COCO_STAT_NAMES) <= set(stats)
    for name in ("AP", "AP50", "AP75", "APl", "AR1", "AR10", "AR100", "ARl"):
        assert stats[name] == pytest.approx(1.0), name
    assert math.isnan(stats["APs"])  # no small object: pycocotools' -1 becomes NaN
    assert stats["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_no_detections_and_a_false_positive():
    recs = records()
    gt = records_to_coco_gt(recs, CLASSES)
    assert evaluate_coco(gt, [])["AP"] == 0.0
    det = perfect_detections(recs)
    det["img_c"] = {"boxes": [[0, 0, 30, 30]], "scores": [2.0], "labels": [0]}  # FP first
    stats = evaluate_coco(gt, coco_results_list(det, coco_image_id_map(recs), [1, 2]),
                          per_class=True)
    assert stats["per_class"]["dog"] == pytest.approx(1.0)
    assert stats["per_class"]["cat"] < 1.0


def test_difficult_as_crowd_is_ignored():
    recs = records()
    recs[1] = ImageRecord("img_b", Path("b.jpg"), 120, 100, [[5, 5, 100, 90]], [0], [True])
    det = perfect_detections(recs)
    det["img_b"]["scores"] = np.array([5.0])  # the best detection hits the difficult box
    results = coco_results_list(det, coco_image_id_map(recs), [1, 2])
    crowd = evaluate_coco(records_to_coco_gt(recs, CLASSES), results)
    keep = evaluate_coco(records_to_coco_gt(recs, CLASSES, difficult_as="keep"), results)
    drop = evaluate_coco(records_to_coco_gt(recs, CLASSES, difficult_as="drop"), results)
    assert crowd["AP"] == pytest.approx(1.0)  # ignored, as VOC ignores it
    assert keep["AP"] == pytest.approx(1.0)  # an ordinary, matched object
    assert drop["AP"] < 1.0  # now a false positive ranked first
    with pytest.raises(ValueError, match="difficult_as"):
        records_to_coco_gt(recs, CLASSES, difficult_as="ignore")


def test_errors_name_the_file(tmp_path):
    gt = records_to_coco_gt(records(), CLASSES)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_coco(tmp_path / "nope.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        evaluate_coco(gt, bad)
    with pytest.raises(ValueError, match="absent from the annotations"):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])


def test_coco_image_ids_from_records():
    recs = records()
    for i, r in enumerate(recs):
        r.extra["coco_image_id"] = 100 + i
    assert coco_image_id_map(recs) == {"img_a": 100, "img_b": 101, "img_c": 102}
    assert [im["id"] for im in records_to_coco_gt(recs, CLASSES)["images"]] == [100, 101, 102]
