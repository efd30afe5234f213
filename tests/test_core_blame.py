"""The whole-test-set entry point: its partials are the brute-force pseudo-partials, its gains
the AP really gained at the nearest improvement, and its summary names the culprits."""

import numpy as np
from hypothesis import given, settings
from strategies import detection_instances

from mapdet import ap_after_nms, ap_blame
from mapdet.core.reference import ap_pseudo_gradient_reference


def _two_class(inst):
    s = np.asarray(inst["scores"], dtype=float)
    scores = np.stack([s, s[::-1].copy()], 1)
    g = len(inst["gt_boxes"])
    labels = np.arange(g) % 2
    return scores, labels


@settings(max_examples=60, deadline=None)
@given(detection_instances(max_windows=12))
def test_blame_equals_reference_and_gains_are_real(inst):
    scores, labels = _two_class(inst)
    kw = dict(score_threshold=inst["score_threshold"], nms_iou=inst["nms_iou"],
              match_iou=inst["match_iou"], ap_method=inst["ap_method"])
    b = ap_blame(scores, inst["boxes"], inst["image_ids"], inst["gt_boxes"], labels,
                 inst["gt_image_ids"], inst["gt_difficult"], num_threads=1, **kw)
    for c in range(2):
        sel = labels == c
        args = (scores[:, c], inst["boxes"], inst["image_ids"], inst["gt_boxes"][sel],
                inst["gt_image_ids"][sel], inst["gt_difficult"][sel])
        ap_ref, g_ref = ap_pseudo_gradient_reference(*args, **kw)
        assert (np.isnan(ap_ref) and np.isnan(b.aps[c])) or abs(b.aps[c] - ap_ref) < 1e-9
        np.testing.assert_allclose(b.partials[:, c], g_ref, rtol=0, atol=1e-9)
        for n in np.flatnonzero(b.partials[:, c]):
            # Move the score as the summary says and check the AP gained.
            g = b.partials[n, c]
            step = b.gains[n, c] / abs(g) - b.min_step
            moved = scores[:, c].copy()
            target = moved[n] + np.sign(g) * step
            # Just beyond the breakpoint nearest to the target (another score, or tau).
            points = np.unique(np.append(np.delete(moved, n), kw["score_threshold"]))
            bp = points[np.argmin(np.abs(points - target))]
            if g > 0:
                nxt = points[points > bp]
                moved[n] = (bp + nxt.min()) / 2 if nxt.size else bp + 0.5
            else:
                nxt = points[points < bp]
                moved[n] = (bp + nxt.max()) / 2 if nxt.size else bp - 0.5
            ap_new = ap_after_nms(moved, *args[1:], **kw)
            assert abs((ap_new - b.aps[c]) - b.gains[n, c]) < 1e-9
    assert not b.gains[b.partials == 0].any()


def test_summary_names_the_worst_detection():
    box = [0.0, 0.0, 10.0, 10.0]
    far = [50.0, 50.0, 60.0, 60.0]
    # An FP (index 0) ranked above the only TP (index 1): moving it below gains 0.5 AP.
    b = ap_blame(np.array([[0.9], [0.8]]), np.array([far, box]), [0, 0], [box], [0], [0],
                 num_threads=1)
    assert b.aps[0] == 0.5
    top = b.top(1)
    assert top[0][1] == 0 and abs(top[0][4] - 0.5) < 1e-12
    text = b.summary(5, class_names=["digit"])
    assert "mAP 0.5000" in text and "digit" in text
