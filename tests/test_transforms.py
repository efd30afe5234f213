"""Transforms: resize rule, flip and resize round trips, normalisation, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    collate,
    denormalize,
    hflip,
    hflip_boxes,
    make_sample,
    normalize,
    resize,
    resize_scale,
)


@st.composite
def image_and_boxes(draw, max_side=60):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    n = draw(st.integers(0, 5))
    xs = draw(st.lists(st.floats(0, w, width=32), min_size=2 * n, max_size=2 * n))
    ys = draw(st.lists(st.floats(0, h, width=32), min_size=2 * n, max_size=2 * n))
    x = np.sort(np.asarray(xs, np.float32).reshape(n, 2), axis=1)
    y = np.sort(np.asarray(ys, np.float32).reshape(n, 2), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).reshape(n, 4)
    seed = draw(st.integers(0, 2**16))
    image = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return image, boxes


def test_resize_scale_examples():
    assert resize_scale(375, 500, 600, 1000) == pytest.approx(1.6)
    assert resize_scale(100, 1000, 600, 1000) == pytest.approx(1.0)  # capped by the long side
    assert resize_scale(50, 80, 100, None) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_size"):
        resize_scale(10, 10, 600, 500)
    with pytest.raises(ValueError, match="positive"):
        resize_scale(0, 10, 600, 1000)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(16, 800), st.integers(0, 800))
def test_resize_scale_rule(h, w, scale, extra):
    max_size = scale + extra
    f = resize_scale(h, w, scale, max_size)
    assert round(max(h, w) * f) <= max_size
    # the shorter side reaches `scale` unless the longer side's cap bound first
    if round(min(h, w) * f) != scale:
        assert max(h, w) * f == pytest.approx(max_size)


@settings(max_examples=60, deadline=None)
@given(image_and_boxes(), st.integers(8, 120))
def test_resize_round_trip(sample, scale):
    image, boxes = sample
    out, b, p, f = resize(image, boxes, boxes[::-1], scale=scale, max_size=4 * scale)
    h, w = image.shape[:2]
    assert out.shape == (max(1, round(h * f)), max(1, round(w * f)), 3) and out.dtype == np.uint8
    assert b.dtype == np.float32 and b.shape == boxes.shape
    # boxes scale by f; clipping to the rounded size moves them by at most half a pixel
    np.testing.assert_allclose(b / f, boxes, atol=0.5 / f + 1e-3)
    np.testing.assert_array_equal(p, b[::-1])
    assert (b[:, 0::2] <= out.shape[1]).all() and (b[:, 1::2] <= out.shape[0]).all()


@settings(max_examples=60, deadline=None)
@given(image_and_boxes())
def test_flip_round_trip(sample):
    image, boxes = sample
    w = image.shape[1]
    fi, fb, fp = hflip(image, boxes, None)
    assert fp is None
    np.testing.assert_array_equal(fi[:, ::-1], image)
    np.testing.assert_allclose(fb[:, 0], w - boxes[:, 2], rtol=0, atol=1e-4)
    np.testing.assert_allclose(fb[:, 2], w - boxes[:, 0], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(fb[:, 1::2], boxes[:, 1::2])
    assert (fb[:, 2] >= fb[:, 0]).all()
    ii, bb, _ = hflip(fi, fb)
    np.testing.assert_array_equal(ii, image)
    np.testing.assert_allclose(bb, boxes, atol=1e-4)


def test_flip_moves_the_pixels_with_the_box():
    image = np.zeros((4, 10, 3), np.uint8)
    image[:, 2:5] = 255  # pixels 2, 3, 4 -> continuous [2, 5)
    box = np.array([[2, 0, 5, 4]], np.float32)
    fi, fb, _ = hflip(image, box)
    np.testing.assert_array_equal(fb, [[5, 0, 8, 4]])
    cols = np.flatnonzero(fi[0, :, 0])
    assert (cols.min(), cols.max() + 1) == (5, 8)
    np.testing.assert_array_equal(hflip_boxes(np.zeros((0, 4)), 10), np.zeros((0, 4)))


def test_normalize_and_back():
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    t = normalize(image)
    assert t.shape == (3, 7, 5) and t.dtype == torch.float32
    expect = (image[1, 2, 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert float(t[0, 1, 2]) == pytest.approx(expect, abs=1e-6)
    np.testing.assert_array_equal(denormalize(t), image)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        normalize(np.zeros((5, 5)))


def test_make_sample_and_collate():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(50, 20, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 25]], np.float32)
    s1 = make_sample(a, boxes, [0, 1], [False, True], boxes, scale=60, max_size=100, flip=True,
                     image_id="a")  # fmt: skip
    s2 = make_sample(b, scale=40, max_size=100, image_id="b")
    assert s1["image"].shape == (3, 60, 80) and s1["scale"] == pytest.approx(2.0)
    np.testing.assert_allclose(s1["boxes"].numpy(), [[60, 0, 80, 20], [40, 10, 70, 50]])
    assert s1["labels"].dtype == torch.int64 and s1["difficult"].tolist() == [False, True]
    assert s2["boxes"].shape == (0, 4) and s2["proposals"].shape == (0, 4)
    batch = collate([s1, s2])
    assert batch["images"].shape == (2, 3, 100, 80)
    assert batch["image_sizes"].tolist() == [[60, 80], [100, 40]]
    assert torch.equal(batch["images"][0, :, :60], s1["image"])
    assert (batch["images"][0, :, 60:] == 0).all()
    assert torch.equal(batch["images"][1, :, :100, :40], s2["image"])
    assert (batch["images"][1, :, :, 40:] == 0).all()
    assert batch["image_id"] == ["a", "b"] and batch["scale"][1] == pytest.approx(2.0)
    assert collate([s1, s2], size_divisible=32)["images"].shape == (2, 3, 128, 96)
    with pytest.raises(ValueError, match="3 labels"):
        make_sample(a, boxes, [0, 1, 2])
    with pytest.raises(ValueError, match="keys"):
        collate([s1, {"image": s2["image"]}])
    with pytest.raises(ValueError, match="at least one"):
        collate([])
