"""Synthetic detector outputs that look like a partly trained Fast R-CNN (numpy, no torch).

Used by the benchmarks and tests: windows clustered around objects as Selective Search
proposals are, class-specific regressed boxes, and softmax scores where windows on an object
lean towards its class without being sure of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet.core.boxes import box_iou

__all__ = ["DetectorOutputs", "proposal_like_outputs"]


@dataclass
class DetectorOutputs:
    """Windows of a minibatch and the ground truth of its images.

    Attributes:
        probs: ``(N, K)`` foreground softmax probabilities (rows sum to < 1; the rest is
            background).
        boxes: ``(N, K, 4)`` class-specific boxes, xyxy.
        image_ids: ``(N,)`` int64.
        gt_boxes: ``(G, 4)``; gt_labels: ``(G,)`` in ``0..K-1``; gt_image_ids: ``(G,)``;
            gt_difficult: ``(G,)`` bool.
    """

    probs: np.ndarray
    boxes: np.ndarray
    image_ids: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_image_ids: np.ndarray
    gt_difficult: np.ndarray


def proposal_like_outputs(
    num_images: int = 2,
    windows_per_image: int = 2000,
    num_classes: int = 20,
    *,
    objects_per_image: tuple[int, int] = (2, 6),
    image_size: tuple[int, int] = (500, 375),
    clustered_fraction: float = 0.6,
    confidence: float = 1.0,
    seed: int = 0,
) -> DetectorOutputs:
    """Generate detector outputs for ``num_images`` images.

    Args:
        windows_per_image: proposals per image; ``clustered_fraction`` of them are jittered
            copies of object boxes (at several noise levels), the rest uniform random boxes.
        num_classes: K foreground classes.
        objects_per_image: inclusive-exclusive range of the number of objects.
        confidence: how strongly a window's logits lean towards the class of the object it
            overlaps (scaled by its IoU); 0 gives uninformative scores.
        seed: all randomness comes from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    width, height = image_size
    probs, boxes, image_ids = [], [], []
    gt_boxes, gt_labels, gt_images, gt_difficult = [], [], [], []
    for img in range(num_images):
        n_obj = int(rng.integers(*objects_per_image))
        wh = rng.uniform(40, 0.6 * min(width, height), (n_obj, 2))
        xy = rng.uniform(0, 1, (n_obj, 2)) * (np.array([width, height]) - wh)
        objs = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, num_classes, n_obj)
        gt_boxes.append(objs)
        gt_labels.append(labels)
        gt_images.append(np.full(n_obj, img))
        gt_difficult.append(rng.uniform(size=n_obj) < 0.1)

        n_clu = int(round(clustered_fraction * windows_per_image))
        src = rng.integers(0, n_obj, n_clu)
        size = objs[src, 2:] - objs[src, :2]
        noise = rng.choice([0.05, 0.15, 0.3], n_clu)[:, None] * np.concatenate([size, size], 1)
        clustered = objs[src] + rng.normal(0, 1, (n_clu, 4)) * noise
        n_rand = windows_per_image - n_clu
        rwh = rng.uniform(16, 0.8 * min(width, height), (n_rand, 2))
        rxy = rng.uniform(0, 1, (n_rand, 2)) * (np.array([width, height]) - rwh)
        rand = np.concatenate([rxy, rxy + rwh], axis=1)
        win = np.concatenate([clustered, rand])
        win[:, [0, 2]] = np.clip(win[:, [0, 2]], 0, width)
        win[:, [1, 3]] = np.clip(win[:, [1, 3]], 0, height)
        win[:, 2:] = np.maximum(win[:, 2:], win[:, :2] + 2.0)

        iou = box_iou(win, objs)
        best = iou.argmax(1)
        best_iou = iou.max(1)
        n_win = win.shape[0]
        logits = rng.normal(0, 1, (n_win, num_classes + 1))
        logits[:, 0] += 5.0  # background leans high
        lean = confidence * 3.0 * best_iou + rng.normal(0, 1.5, n_win)
        logits[np.arange(n_win), labels[best] + 1] += lean
        logits[:, 0] -= confidence * best_iou
        # Confusions: a few windows lean towards a wrong class, as a partly trained
        # detector's false positives do.
        confused = rng.uniform(size=n_win) < 0.03
        logits[confused, rng.integers(1, num_classes + 1, int(confused.sum()))] += rng.normal(
            4.0, 1.0, int(confused.sum()))
        e = np.exp(logits - logits.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        probs.append(p[:, 1:])
        # Class-specific regression: the object's class pulls towards the object.
        per_class = np.repeat(win[:, None, :], num_classes, axis=1)
        per_class = per_class + rng.normal(0, 2.0, per_class.shape)
        pulled = 0.5 * (win + objs[best])
        per_class[np.arange(win.shape[0]), labels[best]] = pulled
        per_class[..., 2:] = np.maximum(per_class[..., 2:], per_class[..., :2] + 1.0)
        boxes.append(per_class)
        image_ids.append(np.full(win.shape[0], img))
    return DetectorOutputs(
        probs=np.concatenate(probs).astype(np.float64),
        boxes=np.concatenate(boxes).astype(np.float64),
        image_ids=np.concatenate(image_ids).astype(np.int64),
        gt_boxes=np.concatenate(gt_boxes).astype(np.float64),
        gt_labels=np.concatenate(gt_labels).astype(np.int64),
        gt_image_ids=np.concatenate(gt_images).astype(np.int64),
        gt_difficult=np.concatenate(gt_difficult),
    )
