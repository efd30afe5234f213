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


# -- the two backends agree ----------------------------------------------------------------


def random_coco_case(seed: int, n_images: int = 40, n_classes: int = 3):
    """Ground truth of every size range (small/medium/large), crowd regions, and noisy
    detections with tied scores, as COCO dicts."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 400, "height": 400, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(0, 6))):
            side = float(rng.choice([12.0, 50.0, 150.0])) * float(rng.uniform(0.7, 1.3))
            x, y = (float(v) for v in rng.uniform(0, 400 - side, 2))
            box = [x, y, side, side * float(rng.uniform(0.5, 1.5))]
            cat = int(rng.integers(1, n_classes + 1))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": int(rng.uniform() < 0.05)})
            for _ in range(int(rng.integers(0, 4))):
                jitter = rng.normal(0, side * 0.15, 4)
                det = [box[0] + jitter[0], box[1] + jitter[1], max(box[2] + jitter[2], 1.0),
                       max(box[3] + jitter[3], 1.0)]
                cat_d = cat if rng.uniform() < 0.8 else int(rng.integers(1, n_classes + 1))
                results.append({"image_id": i, "category_id": cat_d,
                                "bbox": [float(v) for v in det],
                                "score": float(np.round(rng.uniform(), 2))})
        for _ in range(int(rng.integers(0, 3))):  # background false positives
            x, y = (float(v) for v in rng.uniform(0, 300, 2))
            results.append({"image_id": i, "category_id": int(rng.integers(1, n_classes + 1)),
                            "bbox": [x, y, 40.0, 30.0], "score": float(rng.uniform())})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_equals_pycocotools(seed):
    gt, results = random_coco_case(seed)
    fast = evaluate_coco(gt, results, per_class=True, backend="faster")
    ref = evaluate_coco(gt, results, per_class=True, backend="pycocotools")
    assert 0 < fast["AP"] < 1
    for name in COCO_STAT_NAMES:  # AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l
        a, b = fast[name], ref[name]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), name
    for c, ap in ref["per_class"].items():
        assert fast["per_class"][c] == pytest.approx(ap, abs=1e-12)


def test_backends_agree_on_no_detections_and_reject_unknown_backend():
    gt, _ = random_coco_case(3, n_images=5)
    fast = evaluate_coco(gt, [], backend="faster")
    ref = evaluate_coco(gt, [], backend="pycocotools")
    assert fast["AP"] == ref["AP"] == 0.0
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate_coco(gt, [], backend="detectron")


def test_equals_faster_coco_eval_called_directly_and_leaves_inputs_alone(tmp_path):
    """From files: the numbers of faster-coco-eval's own COCO/loadRes/COCOeval_faster on the
    same files, pinned; from the caller's objects: the same numbers, and the objects as they
    were (the backends add keys to each annotation and result dict)."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt, results = random_coco_case(0)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox",
                         print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    direct = [float("nan") if v < 0 else float(v) for v in ev.stats]
    before = json.dumps([gt, results])
    for a, b in ((tmp_path / "gt.json", tmp_path / "dt.json"), (gt, results)):
        stats = evaluate_coco(a, b)
        for name, want in zip(COCO_STAT_NAMES, direct, strict=True):
            assert stats[name] == want or (math.isnan(stats[name]) and math.isnan(want)), name
        assert stats["AP"] == pytest.approx(0.1348843145258196, abs=1e-12)
    assert json.dumps([gt, results]) == before


def test_cycle_collector_state_is_restored():
    import gc

    gt, results = random_coco_case(1, n_images=5)
    assert gc.isenabled()
    evaluate_coco(gt, results)
    assert gc.isenabled()
    gc.disable()
    try:
        evaluate_coco(gt, results)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])
    assert gc.isenabled()
