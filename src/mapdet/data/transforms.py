"""Image and box transforms for Fast R-CNN training and testing; pure functions.

Images are ``(H, W, 3)`` uint8 RGB numpy arrays until :func:`normalize` turns them into
``(3, H, W)`` float tensors. Boxes and proposals are ``(N, 4)`` ``xyxy`` arrays in continuous
pixel coordinates (pixel ``k`` covers ``[k, k+1)``), so a resize by factor ``f`` multiplies them
by ``f`` and a horizontal flip of an image of width ``W`` maps ``x -> W - x``.

The usual order: :func:`resize` -> (training) :func:`hflip` -> :func:`normalize`, bundled by
:func:`make_sample`; then :func:`collate` pads a list of samples into a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "collate",
    "denormalize",
    "hflip",
    "hflip_boxes",
    "make_sample",
    "normalize",
    "resize",
    "resize_scale",
]

#: ImageNet channel statistics (RGB, for images in [0, 1]), as used by torchvision backbones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) numpy array, got shape {shape}")


def _boxes_or_none(name: str, boxes) -> np.ndarray | None:
    if boxes is None:
        return None
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    return arr


def resize_scale(height: int, width: int, scale: float, max_size: float | None) -> float:
    """The factor that makes the shorter side ``scale`` px, capped so the longer side is at
    most ``max_size`` px (Fast R-CNN's rule; ``max_size=None`` means no cap).

    Example: a 375x500 image with ``scale=600, max_size=1000`` gets ``f = 1.6``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    f = scale / min(height, width)
    if max_size is not None:
        if max_size < scale:
            raise ValueError(f"max_size ({max_size}) must be >= scale ({scale})")
        if round(f * max(height, width)) > max_size:
            f = max_size / max(height, width)
    return float(f)


def resize(
    image: np.ndarray,
    boxes: np.ndarray | None = None,
    proposals: np.ndarray | None = None,
    *,
    scale: float = 600,
    max_size: float | None = 1000,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float]:
    """Resize an image (bilinear) so its shorter side is ``scale`` (longer side <= ``max_size``).

    Args:
        image: ``(H, W, 3)`` uint8.
        boxes, proposals: ``(N, 4)`` / ``(P, 4)`` xyxy in the input's pixels, or ``None``.
        scale, max_size: see :func:`resize_scale`.

    Returns:
        ``(image (round(H f), round(W f), 3) uint8, boxes * f, proposals * f, f)``; boxes as
        float32, clipped to the resized image (rounding of the size can shave up to half a
        pixel). Divide detections by ``f`` to return to the original image.
    """
    _check_image(image)
    h, w = image.shape[:2]
    f = resize_scale(h, w, scale, max_size)
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    out = (
        image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    )

    def scaled(name: str, b) -> np.ndarray | None:
        b = _boxes_or_none(name, b)
        if b is None:
            return None
        b = b * np.float32(f)
        b[:, 0::2] = np.clip(b[:, 0::2], 0, nw)
        b[:, 1::2] = np.clip(b[:, 1::2], 0, nh)
        return b

    return out, scaled("boxes", boxes), scaled("proposals", proposals), f


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror ``(N, 4)`` xyxy boxes in an image of width ``width``: ``x1' = W - x2``,
    ``x2' = W - x1`` (continuous coordinates; applying it twice is the identity)."""
    b = _boxes_or_none("boxes", boxes)
    out = b.copy()
    out[:, 0] = width - b[:, 2]
    out[:, 2] = width - b[:, 0]
    return out


def hflip(
    image: np.ndarray, boxes: np.ndarray | None = None, proposals: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mirror an ``(H, W, 3)`` image left-right, with its ``(N, 4)`` boxes and ``(P, 4)``
    proposals (see :func:`hflip_boxes`); ``None`` passes through."""
    _check_image(image)
    w = image.shape[1]
    out = np.ascontiguousarray(image[:, ::-1])
    fb = None if boxes is None else hflip_boxes(boxes, w)
    fp = None if proposals is None else hflip_boxes(proposals, w)
    return out, fb, fp


def normalize(
    image: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 tensor ``(image / 255 - mean) / std``."""
    _check_image(image)
    # np.require copies only when needed: torch.from_numpy wants a writable, contiguous array.
    t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    t = t.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


def denormalize(
    tensor: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Inverse of :func:`normalize`: ``(3, H, W)`` float tensor -> ``(H, W, 3)`` uint8 RGB."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor must have shape (3, H, W), got {tuple(tensor.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (tensor.detach().cpu().float() * s + m).clamp_(0.0, 1.0).mul_(255.0).round_()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def make_sample(
    image: np.ndarray,
    boxes: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    difficult: np.ndarray | None = None,
    proposals: np.ndarray | None = None,
    *,
    scale: float = 600,
    max_size: float | None = 1000,
    flip: bool = False,
    image_id: str = "",
) -> dict[str, Any]:
    """Resize, optionally flip and normalise one image with its annotations.

    Returns a dict for :func:`collate`: ``"image"`` ``(3, H', W')`` float32 tensor,
    ``"boxes"`` ``(M, 4)`` float32, ``"labels"`` ``(M,)`` int64, ``"difficult"`` ``(M,)`` bool,
    ``"proposals"`` ``(P, 4)`` float32 (tensors, in the resized and flipped image's pixels;
    empty when not given), ``"scale"`` (the resize factor ``f``), ``"flipped"``,
    ``"image_id"`` and ``"orig_size"`` ``(H, W)``.
    """
    _check_image(image)
    h, w = image.shape[:2]
    img, b, p, f = resize(image, boxes, proposals, scale=scale, max_size=max_size)
    if flip:
        img, b, p = hflip(img, b, p)
    b = np.zeros((0, 4), np.float32) if b is None else b
    p = np.zeros((0, 4), np.float32) if p is None else p
    m = b.shape[0]
    lab = np.zeros(m, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
    dif = np.zeros(m, bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
    if lab.shape[0] != m or dif.shape[0] != m:
        raise ValueError(
            f"image {image_id!r}: {m} boxes but {lab.shape[0]} labels and {dif.shape[0]} difficult"
        )
    return {
        "image": normalize(img),
        "boxes": torch.from_numpy(np.ascontiguousarray(b)),
        "labels": torch.from_numpy(lab),
        "difficult": torch.from_numpy(dif),
        "proposals": torch.from_numpy(np.ascontiguousarray(p)),
        "scale": f,
        "flipped": bool(flip),
        "image_id": image_id,
        "orig_size": (h, w),
    }


def collate(samples: Sequence[dict[str, Any]], size_divisible: int = 1) -> dict[str, Any]:
    """Batch samples: images zero-padded at the bottom and right to a common size.

    Args:
        samples: dicts with an ``"image"`` ``(3, H_b, W_b)`` tensor (e.g. from
            :func:`make_sample`); every sample must have the same keys.
        size_divisible: round the padded ``Hmax, Wmax`` up to a multiple of this.

    Returns:
        ``"images"``: ``(B, 3, Hmax, Wmax)`` float tensor (padding is 0, i.e. the mean colour
        after normalisation); ``"image_sizes"``: ``(B, 2)`` int64 tensor of the unpadded
        ``(H_b, W_b)``; every other key ``k``: the list ``[s[k] for s in samples]``.
        Box coordinates are unchanged by padding (it is at the bottom/right).
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    keys = set(samples[0])
    for i, s in enumerate(samples):
        if set(s) != keys:
            raise ValueError(f"collate: sample {i} has keys {sorted(s)}, sample 0 {sorted(keys)}")
        if "image" not in s or s["image"].ndim != 3:
            raise ValueError(f"collate: sample {i} needs an 'image' tensor of shape (C, H, W)")
    sizes = torch.tensor([tuple(s["image"].shape[1:]) for s in samples], dtype=torch.int64)
    hmax, wmax = (int(v) for v in sizes.max(dim=0).values)
    if size_divisible > 1:
        hmax = -(-hmax // size_divisible) * size_divisible
        wmax = -(-wmax // size_divisible) * size_divisible
    c = samples[0]["image"].shape[0]
    images = samples[0]["image"].new_zeros((len(samples), c, hmax, wmax))
    for i, s in enumerate(samples):
        _, h, w = s["image"].shape
        images[i, :, :h, :w] = s["image"]
    batch: dict[str, Any] = {"images": images, "image_sizes": sizes}
    for k in sorted(keys - {"image"}):
        batch[k] = [s[k] for s in samples]
    return batch
