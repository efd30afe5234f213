"""mapdet.data: detection data sets and transforms.

- :mod:`mapdet.data.base`: :class:`ImageRecord`, :class:`DetectionDataset`,
  :class:`ConcatDataset` (e.g. VOC 07+12), :func:`read_image`.
- :mod:`mapdet.data.voc`: :class:`VOCDataset`, :func:`parse_voc_xml`, :data:`VOC_CLASSES`.
- :mod:`mapdet.data.coco`: :class:`COCODataset`.
- :mod:`mapdet.data.digits`: the embedded benchmark, :func:`write_digits_voc`,
  :data:`DIGIT_CLASSES`.
- :mod:`mapdet.data.transforms`: resize, flip, normalise, collate (imports torch).

The COCO, digits and transforms modules are imported on first use of one of their names here
(they pull in OpenCV and torch), so that reading VOC annotations stays light.
"""

import importlib

from mapdet.data.base import (
    AnnotationError,
    ConcatDataset,
    DetectionDataset,
    ImageRecord,
    image_size,
    read_image,
)
from mapdet.data.voc import VOC_CLASSES, VOCDataset, parse_voc_xml, voc_raw_boxes

_TRANSFORMS = (
    "collate",
    "denormalize",
    "hflip",
    "hflip_boxes",
    "make_sample",
    "normalize",
    "resize",
    "resize_scale",
)

__all__ = [
    "AnnotationError",
    "COCODataset",
    "ConcatDataset",
    "DIGIT_CLASSES",
    "DetectionDataset",
    "ImageRecord",
    "VOCDataset",
    "VOC_CLASSES",
    "digits_dataset",
    "image_size",
    "parse_voc_xml",
    "read_image",
    "voc_raw_boxes",
    "write_digits_voc",
    *_TRANSFORMS,
]


_LAZY = {
    "COCODataset": "mapdet.data.coco",
    "DIGIT_CLASSES": "mapdet.data.digits",
    "digits_dataset": "mapdet.data.digits",
    "write_digits_voc": "mapdet.data.digits",
    **{name: "mapdet.data.transforms" for name in _TRANSFORMS},
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mapdet.data' has no attribute {name!r}")
