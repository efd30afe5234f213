"""Plots (mapdet.evaluation.plots): valid PNG files of the expected size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapdet.data.base import ImageRecord
from mapdet.evaluation.plots import class_colors, draw_detections, plot_pr_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("cat", "dog", "person")


def open_png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path)
    im.load()
    return im


def test_pr_curves_png(tmp_path):
    rng = np.random.default_rng(0)
    curves = {}
    for i in range(20):
        labels = rng.uniform(size=30) < 0.5
        tp = np.cumsum(labels)
        curves[f"class{i}"] = (tp / max(tp[-1], 1), tp / np.arange(1, 31))
    curves["none"] = (np.full(3, np.nan), np.zeros(3))  # no positive: skipped
    curves["empty"] = (np.zeros(0), np.zeros(0))
    path = plot_pr_curves(curves, tmp_path / "plots" / "pr.png", "PR, VOC 2007 test",
                          ap={"class0": 0.5, "none": float("nan")})
    im = open_png(path)
    assert im.size == (1000, 640)
    assert not [p for p in path.parent.iterdir() if p.name != "pr.png"]  # atomic, no leftovers


@pytest.mark.parametrize("size", [(333, 217), (64, 48), (500, 375)])
def test_draw_detections_keeps_image_size(tmp_path, size):
    w, h = size
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    det = {"boxes": np.array([[5, 5, w / 2, h / 2], [w / 3, h / 3, w - 1, h - 1],
                              [0, 0, w, h]]),
           "scores": np.array([0.9, 0.6, 0.2]), "labels": np.array([0, 2, 1])}
    gt = ImageRecord("x", Path("x.jpg"), w, h, [[4, 6, w / 2 + 3, h / 2]], [0], [False])
    im = open_png(draw_detections(image, det, CLASSES, tmp_path / "d.png", gt=gt))
    assert im.size == (w, h) and im.mode == "RGB"
    assert not np.array_equal(np.asarray(im), image)  # something was drawn


def test_nothing_above_threshold_leaves_the_image_unchanged(tmp_path):
    # Pixel alignment check: with nothing drawn, the PNG is the image itself.
    image = np.random.default_rng(2).integers(0, 255, (217, 333, 3), dtype=np.uint8)
    det = {"boxes": [[1, 1, 50, 50]], "scores": [0.3], "labels": [0]}
    im = open_png(draw_detections(image, det, CLASSES, tmp_path / "d.png",
                                  score_threshold=0.5))
    np.testing.assert_array_equal(np.asarray(im), image)


def test_draw_detections_checks_the_image(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        draw_detections(np.zeros((10, 10)), {"boxes": [], "scores": [], "labels": []},
                        CLASSES, tmp_path / "d.png")


def test_class_colors_are_distinct():
    for k in (3, 20, 30):
        colors = class_colors(k)
        assert len(colors) == k and len(set(colors)) == k


def test_render_detections_draws_into_an_array():
    from mapdet.evaluation.plots import render_detections

    image = np.full((60, 80, 3), 128, np.uint8)
    dets = {"boxes": np.array([[10.0, 10.0, 50.0, 40.0]]), "scores": np.array([0.9]),
            "labels": np.array([1])}
    out = render_detections(image, dets, CLASSES, score_threshold=0.5)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    assert (out != 128).any(axis=2)[38:42, 20:40].any()  # the box's bottom edge is drawn
    blank = render_detections(image, dets, CLASSES, score_threshold=0.95)  # below threshold
    assert (np.abs(blank.astype(int) - 128) <= 1).all()


def test_tile_images_and_detection_grid(tmp_path):
    from owndata import write_own_voc

    from mapdet.data.voc import VOCDataset
    from mapdet.evaluation.plots import detection_grid, draw_detection_grid, tile_images

    grid = tile_images([np.zeros((10, 20, 3), np.uint8), np.zeros((12, 8, 3), np.uint8),
                        np.zeros((5, 5, 3), np.uint8)], columns=2)
    assert grid.shape == (24, 40, 3) and grid[23, 39].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="no images"):
        tile_images([])
    root = write_own_voc(tmp_path / "d", num_train=3, num_test=0, size=48)
    ds = VOCDataset(root, split="trainval", class_names=("crack", "pothole"))
    dets = {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)),
                         "labels": r.labels} for r in ds.records}
    arr = detection_grid(ds, dets, min_side=96, columns=2)
    assert arr.shape == (2 * 96, 2 * 96, 3)
    path = draw_detection_grid(ds, dets, tmp_path / "grid.png", min_side=96)
    assert open_png(path).size == (192, 192)
