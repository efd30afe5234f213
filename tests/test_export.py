"""Result export (mapdet.evaluation.export): devkit files and COCO JSON, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mapdet.data.base import ImageRecord
from mapdet.evaluation.export import (
    atomic_write_text,
    devkit_result_filename,
    write_coco_results,
    write_devkit_results,
)
from mapdet.evaluation.voc import (
    detections_by_class,
    evaluate_voc,
    evaluate_voc_results_dir,
    read_devkit_results,
)

CLASSES = ("cat", "dog", "bird")


def random_detections(seed: int, n_images: int = 5, size: float = 50.0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_images):
        d = int(rng.integers(0, 8))
        xy = rng.uniform(0, size, (d, 2))
        wh = rng.uniform(0, 20, (d, 2))
        if d:
            wh[0] = 0.0  # a zero-size box (clipped to the border)
        out[f"{i:06d}"] = {
            "boxes": np.concatenate([xy, xy + wh], axis=1),
            "scores": rng.uniform(0, 1, d).astype(np.float32),  # float32, as from torch
            "labels": rng.integers(0, len(CLASSES), d),
        }
    return out


def test_devkit_round_trip_is_exact(tmp_path):
    det = random_detections(0)
    written = write_devkit_results(tmp_path, "test", CLASSES, det)
    assert sorted(p.name for p in written.values()) == sorted(
        devkit_result_filename("test", c) for c in CLASSES)
    back = read_devkit_results(tmp_path, "test", CLASSES)
    expected = detections_by_class(det, CLASSES)
    for c in CLASSES:
        ids, scores, raw = back[c]
        e_ids, e_scores, e_boxes = expected[c]
        assert ids == e_ids
        np.testing.assert_array_equal(scores, e_scores)  # exact, float32 scores included
        np.testing.assert_array_equal(raw, e_boxes + np.array([1.0, 1.0, 0.0, 0.0]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_devkit_file_layout_and_fixed_decimals(tmp_path):
    det = {"000005": {"boxes": [[0.0, 9.5, 99.0, 20.25]], "scores": [0.5], "labels": [1]}}
    write_devkit_results(tmp_path, "val", CLASSES, det, decimals=2)
    assert (tmp_path / "comp4_det_val_dog.txt").read_text() == \
        "000005 0.50 1.00 10.50 99.00 20.25\n"
    assert (tmp_path / "comp4_det_val_cat.txt").read_text() == ""  # every class has a file
    write_devkit_results(tmp_path, "val", CLASSES, det, comp="comp3")
    assert (tmp_path / "comp3_det_val_dog.txt").read_text() == "000005 0.5 1.0 10.5 99.0 20.25\n"


def test_devkit_write_errors(tmp_path):
    ok = {"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [0]}
    with pytest.raises(ValueError, match="0..2"):
        write_devkit_results(tmp_path, "test", CLASSES, {"a": dict(ok, labels=[3])})
    with pytest.raises(ValueError, match="whitespace"):
        write_devkit_results(tmp_path, "test", CLASSES, {"a b": ok})
    with pytest.raises(ValueError, match="'a'.*finite"):
        write_devkit_results(tmp_path, "test", CLASSES, {"a": dict(ok, scores=[np.nan])})
    with pytest.raises(ValueError, match="'a'.*x2 >= x1"):
        write_devkit_results(tmp_path, "test", CLASSES, {"a": dict(ok, boxes=[[2, 0, 1, 1]])})
    with pytest.raises(ValueError, match="'a'.*no 'labels'"):
        write_devkit_results(tmp_path, "test", CLASSES, {"a": {"boxes": [], "scores": []}})


def records_for(det, seed: int):
    """Ground truth near the detections so that the APs are not trivial."""
    rng = np.random.default_rng(seed)
    records = []
    for image_id, d in det.items():
        boxes = np.asarray(d["boxes"])[: 3] + rng.uniform(-2, 2, (min(3, len(d["boxes"])), 4))
        boxes = np.clip(np.sort(boxes.reshape(-1, 2, 2), axis=1).reshape(-1, 4), 0, 80)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        boxes = np.round(boxes)
        labels = np.asarray(d["labels"])[: 3]
        records.append(ImageRecord(image_id, Path(f"{image_id}.jpg"), 80, 80, boxes, labels,
                                   rng.uniform(size=len(labels)) < 0.2))
    return records


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_files_score_as_in_memory(tmp_path, metric):
    det = random_detections(1, n_images=8)
    records = records_for(det, 2)
    from mapdet.data.base import DetectionDataset

    dataset = DetectionDataset(CLASSES, records)
    write_devkit_results(tmp_path, "test", CLASSES, det)
    from_files = evaluate_voc_results_dir(dataset, "test", tmp_path, metric)
    in_memory = evaluate_voc(records, detections_by_class(det, CLASSES), class_names=CLASSES,
                             metric=metric)
    assert from_files.per_class.keys() == in_memory.per_class.keys()
    for c in CLASSES:
        a, b = from_files.per_class[c], in_memory.per_class[c]
        assert a == b or (np.isnan(a) and np.isnan(b))
    assert any(v > 0 for v in in_memory.per_class.values())


def test_coco_results(tmp_path):
    det = {"b": {"boxes": [[10.0, 20.0, 15.5, 30.0]], "scores": [0.25], "labels": [2]},
           "a": {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}}
    path = write_coco_results(tmp_path / "r" / "res.json", det, {"a": 1, "b": 7}, [1, 2, 5])
    assert json.loads(path.read_text()) == [
        {"image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 5.5, 10.0], "score": 0.25}]
    with pytest.raises(KeyError, match="'b'"):
        write_coco_results(tmp_path / "x.json", det, {"a": 1}, [1, 2, 5])
    with pytest.raises(KeyError, match="label 2"):
        write_coco_results(tmp_path / "x.json", det, {"a": 1, "b": 7}, {0: 1})
    assert not (tmp_path / "x.json").exists()


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "f.txt", "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["f.txt"]
