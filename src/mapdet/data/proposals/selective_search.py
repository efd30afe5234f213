"""OpenCV Selective Search for one image, seeded and optionally on a resized copy.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping

import numpy as np

from mapdet.data.proposals.cleaning import DEFAULT_MIN_SIZE, clean_proposals

logger = logging.getLogger(__name__)

#: Proposal methods :func:`load_or_compute_proposals` can compute.
METHODS = ("selective_search",)


@functools.lru_cache(maxsize=1)
def _libc_srand():
    """The C library's ``srand``, or ``None`` where it cannot be found."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name).srand if name else None
    return None


def _seed_opencv(seed: int) -> None:
    """Seed the generator OpenCV's Selective Search ranks its regions with.

    OpenCV's ``SelectiveSearchSegmentation`` orders regions by ``level * rand()`` using the C
    library's ``rand()``, so the *order* (not the set) of its boxes depends on the state of
    ``rand()``. Seeding it before each image makes the output a function of the image alone.
    """
    srand = _libc_srand()
    if srand is not None:
        srand(ctypes.c_uint(seed))


def _resized(image: np.ndarray, resize_to: int | None) -> np.ndarray:
    """``image`` rescaled so that its shorter side is ``resize_to`` (unchanged if ``None``)."""
    if resize_to is None:
        return image
    import cv2

    h, w = image.shape[:2]
    scale = resize_to / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")


def _check_ss_args(mode: str, max_proposals: int | None, resize_to: int | None) -> None:
    if mode not in ("fast", "quality"):
        raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
    if max_proposals is not None and max_proposals < 1:
        raise ValueError(f"max_proposals must be >= 1 or None, got {max_proposals}")
    if resize_to is not None and resize_to < 1:
        raise ValueError(f"resize_to must be >= 1 or None, got {resize_to}")


def selective_search(
    image_rgb: np.ndarray,
    *,
    mode: str = "fast",
    max_proposals: int | None = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    resize_to: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Selective Search proposals (Uijlings et al., IJCV 2013) for one image, with OpenCV.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB.
        mode: ``"fast"`` (``switchToSelectiveSearchFast``, as R-CNN / Fast R-CNN used) or
            ``"quality"`` (more strategies, more boxes, several times slower).
        max_proposals: keep at most this many boxes, the first in OpenCV's ranking (``None``:
            all).
        min_size: smallest kept width and height, in pixels of the *original* image.
        resize_to: run on a copy rescaled so that its shorter side is ``resize_to`` pixels
            and map the boxes back (``None``: the image as it is). Upscaling small images
            (about 200 px) to 300-400 px raises recall at the price of more boxes and time.
        seed: seed of the C ``rand()`` OpenCV ranks the boxes with (see ``_seed_opencv``), so
            the result is deterministic; this touches the process-wide ``rand()`` state.

    Returns:
        ``(P, 4)`` float32 ``xyxy`` continuous coordinates inside ``[0, W] x [0, H]``, cleaned
        by :func:`clean_proposals`, in OpenCV's ranking order. Without ``resize_to`` the
        coordinates are integers (OpenCV's ``(x, y, w, h)`` becomes ``[x, y, x + w, y + h]``).

    OpenCV's own threading is left as it is; :func:`load_or_compute_proposals` sets it to one
    thread in its worker processes.
    """
    import cv2

    _check_image(image_rgb)
    _check_ss_args(mode, max_proposals, resize_to)
    h, w = image_rgb.shape[:2]
    work = _resized(image_rgb, resize_to)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(work[..., ::-1]))  # OpenCV wants BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_opencv(seed)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
    boxes = _rects_to_boxes(rects, w / work.shape[1], h / work.shape[0])
    boxes = clean_proposals(boxes, w, h, min_size)
    return boxes if max_proposals is None else boxes[:max_proposals]


def _rects_to_boxes(rects: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """OpenCV ``(x, y, w, h)`` rectangles ``(N, 4)`` -> xyxy ``(N, 4)`` scaled by ``scale_*``."""
    boxes = np.empty_like(rects)
    boxes[:, 0] = rects[:, 0] * scale_x
    boxes[:, 1] = rects[:, 1] * scale_y
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * scale_x
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * scale_y
    return boxes


def compute_image_proposals(image_rgb: np.ndarray, method: str, params: Mapping) -> np.ndarray:
    """Proposals of one ``(H, W, 3)`` uint8 RGB image -> ``(P, 4)`` float32 xyxy.

    ``method`` is one of :data:`METHODS`; ``params`` are the keyword arguments of that method
    (for ``"selective_search"``: those of :func:`selective_search`). This is the unit of work
    of :func:`load_or_compute_proposals`.
    """
    if method == "selective_search":
        return selective_search(image_rgb, **params)
    raise ValueError(f"unknown proposal method {method!r}; known: {', '.join(METHODS)}")
