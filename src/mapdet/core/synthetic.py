"""Synthetic detector outputs that look like a partly trained Fast R-CNN (numpy, no torch).

Used by the benchmarks and tests: windows clustered around objects as Selective Search
proposals are, class-specific regressed boxes, and softmax scores where windows on an object
lean towards its class without being sure of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet.core.boxes import box_iou

__all__ = ["FAMILIES", "DetectorOutputs", "one_class_family", "proposal_like_outputs"]


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


#: The one-class instance families of :func:`one_class_family`.
FAMILIES = ("proposal-like", "jittered", "selective-search", "crowded")


def _objects(rng, n_obj: int, width: float, height: float, lo: float, hi: float) -> np.ndarray:
    wh = rng.uniform(lo, hi, (n_obj, 2))
    xy = rng.uniform(0, 1, (n_obj, 2)) * (np.array([width, height]) - wh)
    return np.concatenate([xy, xy + wh], axis=1)


def _random_boxes(rng, n: int, width: float, height: float) -> np.ndarray:
    return _objects(rng, n, width, height, 16, 0.8 * min(width, height))


def _clip(win: np.ndarray, width: float, height: float) -> np.ndarray:
    win[:, [0, 2]] = np.clip(win[:, [0, 2]], 0, width)
    win[:, [1, 3]] = np.clip(win[:, [1, 3]], 0, height)
    win[:, 2:] = np.maximum(win[:, 2:], win[:, :2] + 2.0)
    return win


def one_class_family(
    family: str,
    num_images: int,
    windows_per_image: int = 50,
    *,
    image_size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """One class's windows and ground truth, drawn from an instance family.

    Families (``windows_per_image`` windows per image; image ``500 x 375``):

    - ``"proposal-like"``: :func:`proposal_like_outputs` with one class and 3 objects per
      image (windows jittered around objects at three noise levels and random windows,
      softmax scores leaning with the IoU).
    - ``"jittered"``: 3 objects per image; half the windows are ground-truth boxes jittered
      by ``N(0, 8 px)`` per coordinate with ``Beta(4, 2)`` scores, the other half random
      boxes with ``Beta(1, 4)`` scores.
    - ``"selective-search"``: 3 objects per image; 80% of the windows overlap an object as a
      hierarchical grouping's do (parts, the object, the object with context: scale
      ``exp(U(-0.7, 0.7))`` per side, shift ``N(0, 0.15)`` of its size), scored
      ``sigmoid(6 (IoU - 0.5) + N(0, 1))``; the rest random with ``Beta(1, 6)`` scores.
    - ``"crowded"``: 12 objects per image, packed into a third of the image (pairs overlap at
      IoU up to about 0.5, as people in a crowd); windows jittered around objects by
      ``N(0, 0.1)`` of the object's size, scored ``Beta(4, 2)`` scaled by the IoU with that
      object, and 20% random ones with ``Beta(1, 4)`` scores.

    Returns:
        ``(scores (N,), boxes (N, 4), image_ids (N,), gt_boxes (G, 4), gt_image_ids (G,),
        gt_difficult (G,))``, the arguments of
        :func:`~mapdet.core.apnms.ap_pseudo_gradient` in order; about 10% of the ground
        truth difficult (none in ``"jittered"``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    if family == "proposal-like":
        o = proposal_like_outputs(num_images, windows_per_image, 1, objects_per_image=(3, 4),
                                  image_size=image_size, seed=seed)
        return (o.probs[:, 0], o.boxes[:, 0], o.image_ids, o.gt_boxes, o.gt_image_ids,
                o.gt_difficult)
    rng = np.random.default_rng(seed)
    width, height = image_size
    scores, boxes, image_ids, gt_boxes, gt_images, gt_difficult = [], [], [], [], [], []
    n = windows_per_image
    for img in range(num_images):
        if family == "crowded":
            objs = _objects(rng, 12, width / 3, height / 3, 30, 60)
            offset = rng.uniform(0, 1, 2) * np.array([2 * width / 3, 2 * height / 3])
            objs = objs + np.concatenate([offset, offset])
        else:
            objs = _objects(rng, 3, width, height, 40, 0.6 * min(width, height))
        n_obj = len(objs)
        if family == "jittered":
            k = n // 2
            src = rng.integers(0, n_obj, k)
            near = objs[src] + rng.normal(0, 8.0, (k, 4))
            win = np.concatenate([near, _random_boxes(rng, n - k, width, height)])
            score = np.concatenate([rng.beta(4, 2, k), rng.beta(1, 4, n - k)])
            difficult = np.zeros(n_obj, dtype=bool)
        elif family == "selective-search":
            k = int(round(0.8 * n))
            src = rng.integers(0, n_obj, k)
            size = objs[src, 2:] - objs[src, :2]
            centre = 0.5 * (objs[src, :2] + objs[src, 2:]) + rng.normal(0, 0.15, (k, 2)) * size
            half = 0.5 * size * np.exp(rng.uniform(-0.7, 0.7, (k, 2)))
            near = np.concatenate([centre - half, centre + half], axis=1)
            win = np.concatenate([near, _random_boxes(rng, n - k, width, height)])
            difficult = rng.uniform(size=n_obj) < 0.1
            score = None
        else:  # crowded
            k = int(round(0.8 * n))
            src = rng.integers(0, n_obj, k)
            size = objs[src, 2:] - objs[src, :2]
            near = objs[src] + rng.normal(0, 0.1, (k, 4)) * np.concatenate([size, size], 1)
            win = np.concatenate([near, _random_boxes(rng, n - k, width, height)])
            difficult = rng.uniform(size=n_obj) < 0.1
            score = None
        win = _clip(win, width, height)
        if family == "selective-search":
            iou = box_iou(win[:k], objs)[np.arange(k), src]
            near_score = 1.0 / (1.0 + np.exp(-(6.0 * (iou - 0.5) + rng.normal(0, 1, k))))
            score = np.concatenate([near_score, rng.beta(1, 6, n - k)])
        elif family == "crowded":
            iou = box_iou(win[:k], objs)[np.arange(k), src]
            score = np.concatenate([rng.beta(4, 2, k) * iou, rng.beta(1, 4, n - k)])
        scores.append(score)
        boxes.append(win)
        image_ids.append(np.full(n, img))
        gt_boxes.append(objs)
        gt_images.append(np.full(n_obj, img))
        gt_difficult.append(difficult)
    return (np.concatenate(scores).astype(np.float64), np.concatenate(boxes).astype(np.float64),
            np.concatenate(image_ids).astype(np.int64),
            np.concatenate(gt_boxes).astype(np.float64),
            np.concatenate(gt_images).astype(np.int64), np.concatenate(gt_difficult))
