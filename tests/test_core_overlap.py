"""The cascade's overlap lists (``kept_graph``, whose IoU loop is written to vectorise) equal
the obvious construction from the pairwise loop over :func:`mapdet.core.overlap.iou`."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.core.overlap import group_by, iou, kept_graph, nms_keep


def _kept_graph_reference(boxes, img, order, kept, need, nu):
    """Per window: kept earlier neighbours (as a set), kept later neighbours in rank order
    (suppressed windows), later neighbours in rank order stably sorted by their number of
    kept earlier neighbours (kept windows); empty for the images not needed."""
    n = len(boxes)
    later = [[] for _ in range(n)]
    for a_pos, a in enumerate(order):
        for c in order[a_pos + 1:]:
            if need[img[a]] and img[a] == img[c] and nu < 1.0 and iou(boxes, a, c) > nu:
                later[a].append(c)
    earlier_kept = [{a for a in range(n) if kept[a] and w in later[a]} for w in range(n)]
    cnt = [len(e) for e in earlier_kept]
    lk = [[] if kept[w] else [c for c in later[w] if kept[c]] for w in range(n)]
    ls = [sorted(later[w], key=lambda c: cnt[c]) if kept[w] else [] for w in range(n)]
    return earlier_kept, lk, ls, cnt


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(1, 3),
       st.sampled_from([0.25, 0.5, 0.6, 1.0]), st.booleans())
def test_kept_graph_equals_pairwise_iou(seed, n, n_img, nu, degenerate):
    rng = np.random.default_rng(seed)
    # A small integer grid: exact IoU ties with the threshold (IoU exactly 0.5...), identical
    # boxes; optionally zero-width or zero-height boxes (a zero union).
    xy = rng.integers(0, 8, (n, 2))
    wh = rng.integers(0 if degenerate else 1, 5, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
    img = rng.integers(0, n_img, n).astype(np.int64)
    order = rng.permutation(n).astype(np.int64)[: rng.integers(0, n + 1)]  # the candidates
    need = rng.uniform(size=n_img) < 0.8
    iptr, icand = group_by(img, order, n_img)
    kept = nms_keep(icand, iptr, boxes, nu, n)
    (e_ptr, e_idx, lk_ptr, lk_idx, ls_ptr, ls_idx), base_cnt = kept_graph(
        icand, iptr, need, kept, boxes, nu, n)
    earlier_kept, lk, ls, cnt = _kept_graph_reference(boxes, img, list(order), kept, need, nu)
    for w in range(n):
        assert set(e_idx[e_ptr[w]:e_ptr[w + 1]]) == earlier_kept[w], w
        assert e_ptr[w + 1] - e_ptr[w] == base_cnt[w] == cnt[w], w
        assert list(lk_idx[lk_ptr[w]:lk_ptr[w + 1]]) == lk[w], w
        assert list(ls_idx[ls_ptr[w]:ls_ptr[w + 1]]) == ls[w], w
