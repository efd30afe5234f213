"""Hypothesis strategies for detection instances with the awkward cases the core must get
right: several images, exact score ties, scores at and below the threshold, identical and
touching boxes (IoU exactly on a threshold), difficult ground truth, empty inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

SCORE_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)  # includes 0.05, 0.25, 0.5 exactly


@st.composite
def detection_instances(draw, max_windows: int = 16, max_gt: int = 5, max_images: int = 3):
    """A dict of ``ap_after_nms`` arguments (one class)."""
    n_img = draw(st.integers(1, max_images))
    n_gt = draw(st.integers(0, max_gt))
    n = draw(st.integers(0, max_windows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Boxes on an integer grid: exact ties in IoU (identical boxes, IoU exactly 0.5...).
    gt_xy = rng.integers(0, 40, (n_gt, 2))
    gt_wh = rng.integers(4, 24, (n_gt, 2))
    gt_boxes = np.concatenate([gt_xy, gt_xy + gt_wh], 1).astype(np.float64)
    gt_img = rng.integers(0, n_img, n_gt)
    gt_diff = rng.uniform(size=n_gt) < draw(st.sampled_from([0.0, 0.3]))
    xy = rng.integers(0, 40, (n, 2))
    wh = rng.integers(2, 24, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
    img = rng.integers(0, n_img, n)
    for k in range(n):  # most windows sit on an object, jittered by a few pixels
        if n_gt and rng.uniform() < 0.7:
            j = rng.integers(n_gt)
            img[k] = gt_img[j]
            boxes[k] = gt_boxes[j] + rng.integers(-3, 4, 4) * draw(st.sampled_from([0, 1, 2]))
            boxes[k, 2:] = np.maximum(boxes[k, 2:], boxes[k, :2] + 1)
    tie_heavy = draw(st.booleans())
    if tie_heavy:
        scores = rng.choice(SCORE_GRID[:: draw(st.sampled_from([2, 5, 10]))], n)
    else:
        scores = rng.choice(SCORE_GRID, n)
    tau = draw(st.sampled_from([0.0, 0.05, 0.25, 0.5]))
    return dict(
        scores=scores, boxes=boxes, image_ids=img, gt_boxes=gt_boxes, gt_image_ids=gt_img,
        gt_difficult=gt_diff, score_threshold=tau,
        nms_iou=draw(st.sampled_from([0.3, 0.5, 1.0])),
        match_iou=draw(st.sampled_from([0.5, (0.5, 0.75), tuple(np.linspace(0.5, 0.95, 10))])),
        ap_method=draw(st.sampled_from(["area", "voc07", "r101"])),
    )
