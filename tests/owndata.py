"""A small data set "of one's own" in VOC layout, written from a seed (tests only).

Two classes, ``crack`` (a dark bar) and ``pothole`` (a dark disc), drawn on noisy grey
images, in one folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``
(the layout the README's "Train on your own data" section describes); also as COCO JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("crack", "pothole")


def _objects(rng: np.random.Generator, size: int) -> list[tuple[str, list[int]]]:
    out = []
    for _ in range(int(rng.integers(1, 3))):
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        out.append((CLASSES[int(rng.integers(0, 2))], [x + 1, y + 1, x + w, y + h]))
    return out


def write_own_voc(root: str | Path, *, num_train: int = 6, num_test: int = 3, size: int = 64,
                  seed: int = 0, extra_class: str | None = None) -> Path:
    """Write the data set to ``root`` (``trainval`` and ``test`` splits); returns ``root``.

    ``extra_class``: also give the first training image an object of that class (a name
    outside the class list).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"trainval": [], "test": []}
    for k in range(num_train + num_test):
        image_id = f"img{k:03d}"
        splits["trainval" if k < num_train else "test"].append(image_id)
        pixels = rng.integers(150, 220, (size, size, 3)).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        objects = _objects(rng, size)
        if extra_class and k == 0:
            objects.append((extra_class, [2, 2, 10, 10]))
        xml = [f"<annotation><filename>{image_id}.jpg</filename><size><width>{size}</width>"
               f"<height>{size}</height><depth>3</depth></size>"]
        for name, (x1, y1, x2, y2) in objects:
            box = [x1 - 1, y1 - 1, x2 - 1, y2 - 1]
            if name == "pothole":
                draw.ellipse(box, fill=(30, 30, 30))
            else:
                draw.rectangle(box, fill=(60, 20, 20))
            xml.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>"
                       f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                       "</bndbox></object>")
        xml.append("</annotation>")
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def voc_to_coco_json(root: str | Path, split: str, path: str | Path) -> Path:
    """The ``split`` of :func:`write_own_voc` as a COCO JSON file (images in JPEGImages/)."""
    from mapdet.data.voc import VOCDataset

    ds = VOCDataset(root, split=split, class_names=CLASSES)
    images, annotations = [], []
    for i, rec in enumerate(ds.records, start=1):
        images.append({"id": i, "file_name": rec.path.name, "width": rec.width,
                       "height": rec.height})
        for box, label in zip(rec.boxes.tolist(), rec.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    path = Path(path)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": cats}))
    return path
