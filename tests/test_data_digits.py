"""The embedded digits benchmark: determinism, VOC round trip, tight boxes, reuse, errors."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from mapdet.data import DIGIT_CLASSES, VOCDataset, digits_dataset, write_digits_voc
from mapdet.data.digits import (
    _INK_THRESHOLD,
    MANIFEST_NAME,
    DigitsConfig,
    _pool,
    _render_patch,
    render_digits_image,
)

SMALL = dict(num_train=8, num_test=4, image_size=96)


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_digits_voc(tmp_path_factory.mktemp("digits") / "d", **SMALL)


def test_layout_and_voc_round_trip(small_root):
    for split, n in (("train", 8), ("trainval", 8), ("test", 4)):
        ds = VOCDataset(small_root, split=split, class_names=DIGIT_CLASSES)
        assert len(ds) == n
    ds = VOCDataset(small_root, split="train", class_names=DIGIT_CLASSES)
    assert ds.load_image(0).shape == (96, 96, 3)
    # the files hold exactly what the renderer produced
    cfg = DigitsConfig(**SMALL)
    crops, labels = _pool("train", cfg.test_fraction)
    for i, rec in enumerate(ds.records):
        _, objects = render_digits_image(np.random.default_rng([0, 0, i]), crops, labels, cfg)
        np.testing.assert_array_equal(rec.boxes, [o["box"] for o in objects] or np.zeros((0, 4)))
        assert rec.labels.tolist() == [o["label"] for o in objects]
        assert rec.difficult.tolist() == [o["difficult"] for o in objects]
    manifest = json.loads((small_root / MANIFEST_NAME).read_text())
    assert manifest["params"]["seed"] == 0 and manifest["classes"] == list(DIGIT_CLASSES)
    assert (small_root / "classes.txt").read_text().split() == list(DIGIT_CLASSES)


def test_boxes_inside_images_and_counts(small_root):
    ds = VOCDataset(small_root, split="train", class_names=DIGIT_CLASSES)
    n = 0
    for rec in ds.records:
        b = rec.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b == np.round(b)).all()  # whole pixels
        assert rec.num_objects <= 6
        n += rec.num_objects
    assert n >= 8 * 2 * 0.5


def test_same_seed_identical_files(tmp_path, small_root):
    again = write_digits_voc(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small_root)


def test_different_seed_differs(tmp_path, small_root):
    other = write_digits_voc(tmp_path / "other", seed=1, **SMALL)
    a, b = _files(small_root), _files(other)
    assert a.keys() == b.keys()
    assert a["JPEGImages/train_00000.jpg"] != b["JPEGImages/train_00000.jpg"]
    assert a["Annotations/train_00000.xml"] != b["Annotations/train_00000.xml"]


def test_train_and_test_pools_are_disjoint():
    tr, _ = _pool("train", 0.3)
    te, te_labels = _pool("test", 0.3)
    assert len(tr) == 3500 and len(te) == 1500
    assert np.bincount(te_labels).tolist() == [150] * 10
    keys = {c.tobytes() + bytes(c.shape) for c in tr}
    assert not any(c.tobytes() + bytes(c.shape) in keys for c in te)


def test_render_patch_box_is_tight():
    crops, labels = _pool("train", 0.3)
    cfg = DigitsConfig()
    rng = np.random.default_rng(3)
    for k in range(30):
        a, (r0, r1, c0, c1) = _render_patch(rng, crops[k * 97], rng.uniform(8, 70), cfg)
        ink = a >= _INK_THRESHOLD
        assert ink[r0].any() and ink[r1].any() and ink[:, c0].any() and ink[:, c1].any()
        assert not ink[:r0].any() and not ink[r1 + 1 :].any()
        assert not ink[:, :c0].any() and not ink[:, c1 + 1 :].any()
        assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0


def test_image_content_pairs_and_difficult():
    """Over a few rendered images: same-class overlapping pairs and difficult digits occur."""
    cfg = DigitsConfig(image_size=160)
    crops, labels = _pool("train", cfg.test_fraction)
    pair_ious, difficult, small = [], 0, 0
    for i in range(40):
        image, objects = render_digits_image(np.random.default_rng([5, 0, i]), crops, labels, cfg)
        assert image.shape == (160, 160, 3) and image.dtype == np.uint8
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
            difficult += o["difficult"]
            small += (y2 - y1) < cfg.difficult_below * 160
            assert o["difficult"] or ((y2 - y1) >= 16 and o["visible"] >= cfg.min_visible)
        for a, b in combinations(objects, 2):
            if a["label"] == b["label"]:
                pair_ious.append(_iou(a["box"], b["box"]))
    assert any(0.1 <= v <= 0.4 for v in pair_ious)
    assert difficult >= small > 0


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_reuse_existing_folder(small_root):
    marker = small_root / "JPEGImages" / "train_00000.jpg"
    before = marker.stat().st_mtime_ns
    assert write_digits_voc(small_root, **SMALL) == small_root
    assert marker.stat().st_mtime_ns == before


def test_mismatch_errors_then_overwrite(tmp_path):
    root = write_digits_voc(tmp_path / "d", num_train=2, num_test=1, image_size=64)
    with pytest.raises(FileExistsError, match="seed: 0 -> 3"):
        write_digits_voc(root, num_train=2, num_test=1, image_size=64, seed=3)
    write_digits_voc(root, num_train=2, num_test=1, image_size=64, seed=3, overwrite=True)
    assert json.loads((root / MANIFEST_NAME).read_text())["params"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a digits benchmark"):
        write_digits_voc(tmp_path / "x", num_train=1, num_test=1, overwrite=True)
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep me"


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "e").mkdir()
    root = write_digits_voc(tmp_path / "e", num_train=1, num_test=1, image_size=64)
    assert (root / MANIFEST_NAME).is_file()


def test_png_and_digits_dataset(tmp_path):
    ds = digits_dataset(tmp_path / "p", "test", num_train=1, num_test=2, image_format="png")
    assert len(ds) == 2 and ds[0].path.suffix == ".png"
    assert ds.class_names == DIGIT_CLASSES and ds.load_image(1).shape == (160, 160, 3)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_digits=3), TypeError, "unknown parameter"),
        (dict(scale_range=(0.5, 0.2)), ValueError, "scale_range"),
        (dict(image_format="gif"), ValueError, "image_format"),
        (dict(min_digits=4, max_digits=2), ValueError, "min_digits"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        write_digits_voc(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
