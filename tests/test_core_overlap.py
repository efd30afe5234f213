"""The overlap graph (``later_neighbours``, whose IoU loop is written to vectorise) equals the
obvious pairwise loop over :func:`mapdet.core.overlap.iou`, decision for decision."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.core.overlap import group_by, iou, later_neighbours


def _later_neighbours_reference(boxes, img, order, nu):
    """For each window, its later neighbours (same image, ``iou > nu``) in rank order."""
    out = [[] for _ in range(len(boxes))]
    for a_pos, a in enumerate(order):
        for c in order[a_pos + 1:]:
            if img[a] == img[c] and iou(boxes, a, c) > nu:
                out[a].append(c)
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(1, 3),
       st.sampled_from([0.25, 0.5, 0.6, 1.0]), st.booleans())
def test_later_neighbours_equal_pairwise_iou(seed, n, n_img, nu, degenerate):
    rng = np.random.default_rng(seed)
    # Integer grid: exact IoU ties with the threshold (IoU exactly 0.5...), identical boxes;
    # optionally zero-width or zero-height boxes (a zero union).
    xy = rng.integers(0, 8, (n, 2))
    wh = rng.integers(0 if degenerate else 1, 5, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
    img = rng.integers(0, n_img, n).astype(np.int64)
    order = rng.permutation(n).astype(np.int64)[: rng.integers(0, n + 1)]  # the candidates
    need = rng.uniform(size=n_img) < 0.8
    iptr, icand = group_by(img, order, n_img)
    ptr, idx = later_neighbours(icand, iptr, need, boxes, nu, n)
    ref = _later_neighbours_reference(boxes, img, order, nu)
    for w in range(n):
        expect = ref[w] if need[img[w]] and nu < 1.0 else []
        assert list(idx[ptr[w]:ptr[w + 1]]) == expect, w
