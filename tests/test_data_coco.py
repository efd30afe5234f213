"""COCO-format data set: label mapping, crowd boxes, xywh -> xyxy, degenerate boxes, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from mapdet.data import AnnotationError, COCODataset


def _coco(tmp_path, data: dict, with_images: bool = True):
    (tmp_path / "img").mkdir(exist_ok=True)
    if with_images:
        for im in data.get("images", []):
            w, h = im.get("width") or 32, im.get("height") or 24
            Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / "img" / im["file_name"])
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(data))
    return p, tmp_path / "img"


def _data():
    return {
        "images": [
            {"id": 42, "file_name": "b.jpg", "width": 64, "height": 48},
            {"id": 7, "file_name": "a.jpg", "width": 32, "height": 24},
            {"id": 9, "file_name": "c.jpg", "width": 32, "height": 24},
        ],
        "categories": [
            {"id": 18, "name": "dog"},
            {"id": 1, "name": "person"},
            {"id": 90, "name": "toothbrush"},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 18, "bbox": [10, 5, 20.5, 10], "iscrowd": 0,
             "area": 205},
            {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1,
             "area": 3072},
            {"id": 3, "image_id": 42, "category_id": 90, "bbox": [60, 40, 10, 10], "iscrowd": 0,
             "area": 100},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [3, 3, 0, 5], "iscrowd": 0,
             "area": 0},
            {"id": 5, "image_id": 7, "category_id": 18, "bbox": [40, 3, 5, 5], "iscrowd": 0,
             "area": 25},
        ],
    }  # fmt: skip


def test_coco_dataset(tmp_path, caplog):
    p, img = _coco(tmp_path, _data())
    with caplog.at_level(logging.WARNING, logger="mapdet.data.coco"):
        ds = COCODataset(p, img)
    # labels follow increasing category id
    assert ds.class_names == ("person", "dog", "toothbrush")
    assert ds.label_to_category_id == (1, 18, 90)
    assert ds.category_id_to_label == {1: 0, 18: 1, 90: 2}
    # images sorted by id, string ids, empty image kept
    assert ds.image_ids == ["7", "9", "42"]
    assert ds[1].num_objects == 0 and ds.coco_image_id(2) == 42
    r = ds[2]
    np.testing.assert_allclose(r.boxes, [[10, 5, 30.5, 15], [0, 0, 64, 48], [60, 40, 64, 48]])
    assert r.labels.tolist() == [1, 0, 2]
    assert r.difficult.tolist() == [False, True, False]
    assert r.extra["iscrowd"].tolist() == [False, True, False]
    assert r.extra["coco_annotation_ids"].tolist() == [1, 2, 3]
    # zero-width box and a box outside the image are dropped, with warnings naming them
    assert ds[0].num_objects == 0
    assert "annotation 4" in caplog.text and "annotation 5" in caplog.text
    assert str(p) in caplog.text
    assert ds.load_image(2).shape == (48, 64, 3)


def test_exclude_crowd(tmp_path):
    p, img = _coco(tmp_path, _data())
    ds = COCODataset(p, img, include_crowd=False)
    assert ds[2].extra["coco_annotation_ids"].tolist() == [1, 3]


def test_size_from_image_when_missing(tmp_path):
    data = _data()
    data["images"][0].pop("width")
    p, img = _coco(tmp_path, data, with_images=False)
    Image.new("RGB", (50, 40)).save(img / "b.jpg")
    ds = COCODataset(p, img)
    assert (ds[2].width, ds[2].height) == (50, 40)


def test_no_annotations_key(tmp_path):
    data = _data()
    data.pop("annotations")
    p, img = _coco(tmp_path, data)
    assert all(r.num_objects == 0 for r in COCODataset(p, img).records)


def test_malformed_json_names_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="malformed JSON") as info:
        COCODataset(p, tmp_path)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        COCODataset(tmp_path / "nope.json", tmp_path)


def test_missing_categories(tmp_path):
    data = _data()
    data.pop("categories")
    p, img = _coco(tmp_path, data)
    with pytest.raises(AnnotationError, match="categories"):
        COCODataset(p, img)


def test_unknown_category_and_bad_bbox(tmp_path):
    data = _data()
    data["annotations"][0]["category_id"] = 5
    p, img = _coco(tmp_path, data)
    with pytest.raises(AnnotationError, match="unknown category_id 5"):
        COCODataset(p, img)
    data = _data()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    p, img = _coco(tmp_path, data)
    with pytest.raises(AnnotationError, match="bbox"):
        COCODataset(p, img)
