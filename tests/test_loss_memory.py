"""The AP memory through fixed detections (mapdet.core.fixed) equals the concatenated problem
exactly: the same APs and the same pseudo-gradients, bit for bit, ties included."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import SCORE_GRID

import mapdet.loss as loss_module
from mapdet import MAPLoss
from mapdet.core.apnms import ap_pseudo_gradient_multiclass
from mapdet.core.fixed import fix_detections
from mapdet.core.pseudograd import DIRECTIONS
from mapdet.core.synthetic import proposal_like_outputs
from mapdet.loss import NORMALIZATIONS, Windows, normalization_scale

COCO = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))


def _minibatch(rng, k, shared_boxes, tie_step):
    """A small minibatch: integer-grid boxes (exact IoU ties), most windows on an object,
    scores on a coarse grid (exact score ties), difficult ground truth."""
    n_img = int(rng.integers(1, 4))
    n_gt = int(rng.integers(0, 5))
    n = int(rng.integers(0, 13))
    gt_xy = rng.integers(0, 40, (n_gt, 2))
    gt_boxes = np.concatenate([gt_xy, gt_xy + rng.integers(4, 24, (n_gt, 2))], 1).astype(float)
    gt_img = rng.integers(0, n_img, n_gt)
    xy = rng.integers(0, 40, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.integers(2, 24, (n, k, 2))], 2).astype(float)
    img = rng.integers(0, n_img, n)
    for i in range(n):
        if n_gt and rng.uniform() < 0.7:
            j = rng.integers(n_gt)
            img[i] = gt_img[j]
            boxes[i] = gt_boxes[j] + rng.integers(-2, 3, (k, 4))
            boxes[i, :, 2:] = np.maximum(boxes[i, :, 2:], boxes[i, :, :2] + 1)
    return Windows(
        probs=rng.choice(SCORE_GRID[::tie_step], (n, k)),
        boxes=boxes[:, 0] if shared_boxes else boxes, image_ids=img.astype(np.int64),
        gt_boxes=gt_boxes.reshape(-1, 4), gt_labels=rng.integers(0, k, n_gt).astype(np.int64),
        gt_image_ids=gt_img.astype(np.int64), gt_difficult=rng.uniform(size=n_gt) < 0.3,
        num_images=n_img)


def _concat_reference(cur, memory, **kw):
    """The AP context as the loss built it before the fixed detections: every minibatch
    concatenated, only the current windows queried."""
    ctx = Windows.concat([cur, *memory])
    n = cur.probs.shape[0]
    aps, g = ap_pseudo_gradient_multiclass(
        ctx.probs, ctx.boxes, ctx.image_ids, ctx.gt_boxes, ctx.gt_labels, ctx.gt_image_ids,
        ctx.gt_difficult, grad_rows=n, num_threads=1, **kw)
    return aps, g[:n]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 3), n_mem=st.integers(1, 3),
       shared=st.lists(st.booleans(), min_size=4, max_size=4),
       tie_step=st.sampled_from([1, 2, 5, 10]),
       tau=st.sampled_from([0.0, 0.05, 0.25, 0.5]), nu=st.sampled_from([0.3, 0.5, 1.0]),
       match_iou=st.sampled_from([0.5, (0.5, 0.75), COCO]),
       ap_method=st.sampled_from(["area", "voc07", "r101"]),
       direction=st.sampled_from(DIRECTIONS))
def test_fixed_detections_equal_the_concatenated_problem(seed, k, n_mem, shared, tie_step, tau,
                                                         nu, match_iou, ap_method, direction):
    rng = np.random.default_rng(seed)
    cur, *memory = [_minibatch(rng, k, shared[j], tie_step) for j in range(n_mem + 1)]
    kw = dict(score_threshold=tau, nms_iou=nu, match_iou=match_iou, ap_method=ap_method,
              direction=direction)
    aps_ref, g_ref = _concat_reference(cur, memory, **kw)
    fixed = [fix_detections(w.probs, w.boxes, w.image_ids, w.gt_boxes, w.gt_labels,
                            w.gt_image_ids, w.gt_difficult, score_threshold=tau, nms_iou=nu)
             for w in memory]
    aps, g = ap_pseudo_gradient_multiclass(
        cur.probs, cur.boxes, cur.image_ids, cur.gt_boxes, cur.gt_labels, cur.gt_image_ids,
        cur.gt_difficult, num_threads=1, fixed=fixed, **kw)
    np.testing.assert_array_equal(aps, aps_ref)  # NaN where undefined, on both sides
    assert g.shape == g_ref.shape and np.array_equal(g, g_ref)


def test_fixed_detections_keep_only_the_kept_windows():
    o = proposal_like_outputs(num_images=2, windows_per_image=60, num_classes=2, seed=3)
    f = fix_detections(o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
                       o.gt_difficult, score_threshold=0.05, nms_iou=0.3)
    for c, part in enumerate(f.classes):
        cand = int((o.probs[:, c] > 0.05).sum())
        assert 0 < part.scores.size < cand  # NMS removed some candidates, kept some
        assert part.difficult.size == int((o.gt_labels == c).sum())
        assert part.boxes.flags.c_contiguous and part.npos == int(
            (~o.gt_difficult[o.gt_labels == c]).sum())


def test_fixed_detections_made_for_other_settings_are_refused():
    o = proposal_like_outputs(num_images=1, windows_per_image=20, num_classes=2, seed=1)
    args = (o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
            o.gt_difficult)
    f = fix_detections(*args, score_threshold=0.05, nms_iou=0.3)
    with pytest.raises(ValueError, match="nms_iou 0.3"):
        ap_pseudo_gradient_multiclass(*args, nms_iou=0.5, fixed=[f])
    with pytest.raises(ValueError, match="grad_rows"):
        ap_pseudo_gradient_multiclass(*args, grad_rows=3, fixed=[f])


def _targets(w):
    return [dict(boxes=torch.tensor(w.gt_boxes[w.gt_image_ids == b]),
                 labels=torch.tensor(w.gt_labels[w.gt_image_ids == b]),
                 difficult=torch.tensor(w.gt_difficult[w.gt_image_ids == b]))
            for b in range(w.num_images)]


def _expected(loss_fn, cur, memory, n_grad=None):
    """The loss value and the gradient of ``probs`` as MAPLoss computed them on the
    concatenated context (the first ``n_grad`` rows: this rank's)."""
    aps, g = _concat_reference(
        cur, memory, score_threshold=loss_fn.score_threshold, nms_iou=loss_fn.nms_iou,
        match_iou=loss_fn.match_iou, ap_method=loss_fn.ap_method, min_step=loss_fn.min_step,
        direction=loss_fn.direction)
    defined = ~np.isnan(aps)
    n_def = int(defined.sum())
    if n_def == 0:
        value, base = 0.0, 0.0
    elif loss_fn.form == "one_minus":
        value, base = 1.0 - float(aps[defined].mean()), 1.0 / n_def
    else:
        floor = max(float(aps[defined].mean()), loss_module.NEG_LOG_FLOOR)
        value, base = -math.log(floor), 1.0 / (n_def * floor)
    scale = normalization_scale(g, base, loss_fn.normalization)
    if n_grad is not None:
        g = g[:n_grad] * 2
    return aps, value, torch.as_tensor(-scale * g)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), memory=st.integers(1, 3),
       form=st.sampled_from(["one_minus", "neg_log"]),
       normalization=st.sampled_from(NORMALIZATIONS), shared=st.booleans(),
       match_iou=st.sampled_from([0.5, (0.5, 0.75)]))
def test_loss_with_memory_equals_the_concatenated_context(seed, memory, form, normalization,
                                                           shared, match_iou):
    rng = np.random.default_rng(seed)
    loss_fn = MAPLoss(memory=memory, form=form, normalization=normalization,
                      match_iou=match_iou, num_threads=1)
    for step in range(memory + 2):
        cur = _minibatch(rng, 3, shared and step % 2 == 0, 2)  # shared and class-specific boxes
        stored = list(loss_fn._memory)
        probs = torch.tensor(cur.probs, requires_grad=True)
        loss = loss_fn(probs, torch.tensor(cur.boxes), torch.tensor(cur.image_ids),
                       _targets(cur))
        loss.backward()
        aps, value, grad = _expected(loss_fn, cur, stored)
        np.testing.assert_array_equal(loss_fn.last_ap, aps)
        assert loss.item() == value
        assert torch.equal(probs.grad, grad)
        assert loss_fn._memory[0].fixed is not None  # computed as it entered the memory


def test_memory_resumed_from_a_state_dict_rebuilds_its_fixed_parts():
    o = [proposal_like_outputs(num_images=2, windows_per_image=60, num_classes=3, seed=s)
         for s in range(4)]
    ws = [Windows(p.probs, p.boxes, p.image_ids, p.gt_boxes, p.gt_labels, p.gt_image_ids,
                  p.gt_difficult, 2) for p in o]
    a = MAPLoss(normalization="none", memory=2, num_threads=1)
    for w in ws[:2]:
        a(torch.tensor(w.probs), w.boxes, w.image_ids, _targets(w))
    state = a.state_dict()
    assert set(state["_extra_state"]["memory"][0]) == {
        "probs", "boxes", "image_ids", "gt_boxes", "gt_labels", "gt_image_ids",
        "gt_difficult", "num_images"}  # the checkpoint format is unchanged
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = MAPLoss(normalization="none", memory=2, num_threads=1)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert all(w.fixed is None for w in b._memory)
    for w in ws[2:]:
        pa = torch.tensor(w.probs, requires_grad=True)
        pb = torch.tensor(w.probs, requires_grad=True)
        la = a(pa, w.boxes, w.image_ids, _targets(w))
        lb = b(pb, w.boxes, w.image_ids, _targets(w))
        la.backward()
        lb.backward()
        assert la.item() == lb.item() and torch.equal(pa.grad, pb.grad)
    # A changed detection function recomputes the stored minibatches' parts.
    for fn in (a, b):
        fn.score_threshold, fn.nms_iou = 0.2, 0.5
    cur = ws[0]
    stored = list(a._memory)
    probs = torch.tensor(cur.probs, requires_grad=True)
    a(probs, cur.boxes, cur.image_ids, _targets(cur)).backward()
    assert torch.equal(probs.grad, _expected(a, cur, stored)[2])
    assert a._memory[1].fixed.tau == 0.2 and a._memory[1].fixed.nu == 0.5


def test_gathered_windows_with_memory_equal_the_concatenated_context(monkeypatch):
    """DDP: the gathered global batch (here two ranks, this one rank 0) followed by the
    memory; this rank's rows get the world-size-scaled gradient."""
    rng = np.random.default_rng(5)
    other = [_minibatch(rng, 3, False, 2) for _ in range(4)]
    monkeypatch.setattr(loss_module, "_gather_windows", lambda w: (
        Windows.concat([w, other.pop(0)]), slice(0, w.probs.shape[0]), 2))
    loss_fn = MAPLoss(normalization="none", memory=2, distributed=True, num_threads=1)
    for _ in range(4):
        cur = _minibatch(rng, 3, False, 2)
        nxt = other[0]
        stored = list(loss_fn._memory)
        probs = torch.tensor(cur.probs, requires_grad=True)
        loss = loss_fn(probs, cur.boxes, cur.image_ids, _targets(cur))
        loss.backward()
        aps, value, grad = _expected(loss_fn, Windows.concat([cur, nxt]), stored,
                                     n_grad=cur.probs.shape[0])
        assert loss.item() == value and torch.equal(probs.grad, grad)
