"""MAPLoss: its backward is the scaled pseudo-gradient, training with it raises mAP."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet import MAPLoss
from mapdet.core.boxes import box_iou
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.core.synthetic import proposal_like_outputs
from mapdet.loss import NORMALIZATIONS, normalization_scale


def _batch(num_images=2, windows=40, classes=3, seed=0):
    o = proposal_like_outputs(num_images=num_images, windows_per_image=windows,
                              num_classes=classes, objects_per_image=(2, 4),
                              image_size=(200, 150), seed=seed)
    targets = [dict(boxes=torch.tensor(o.gt_boxes[o.gt_image_ids == b]),
                    labels=torch.tensor(o.gt_labels[o.gt_image_ids == b]),
                    difficult=torch.tensor(o.gt_difficult[o.gt_image_ids == b]))
               for b in range(num_images)]
    return o, targets


def _reference_grads(o, **kw):
    k = o.probs.shape[1]
    aps, grads = [], []
    for c in range(k):
        sel = o.gt_labels == c
        ap, g = ap_pseudo_gradient_reference(
            np.round(o.probs[:, c], 3), o.boxes[:, c], o.image_ids, o.gt_boxes[sel],
            o.gt_image_ids[sel], o.gt_difficult[sel], **kw)
        aps.append(ap)
        grads.append(g)
    return np.array(aps), np.stack(grads, 1)


@pytest.mark.parametrize("form", ["one_minus", "neg_log"])
def test_backward_is_scaled_reference_pseudo_gradient(form):
    o, targets = _batch(windows=25, classes=3, seed=4)
    probs = torch.tensor(np.round(o.probs, 3), requires_grad=True)
    loss_fn = MAPLoss(normalization="none", score_threshold=0.05, nms_iou=0.3, form=form,
                      min_step=1e-3)
    loss = loss_fn(probs, torch.tensor(o.boxes), torch.tensor(o.image_ids), targets)
    loss.backward()
    aps, grads = _reference_grads(o, score_threshold=0.05, nms_iou=0.3, min_step=1e-3)
    defined = ~np.isnan(aps)
    m_ap = aps[defined].mean()
    np.testing.assert_allclose(loss_fn.last_ap[defined], aps[defined], atol=1e-12)
    if form == "one_minus":
        assert loss.item() == pytest.approx(1 - m_ap)
        expected = -grads / defined.sum()
    else:
        assert loss.item() == pytest.approx(-np.log(m_ap))
        expected = -grads / (defined.sum() * m_ap)
    np.testing.assert_allclose(probs.grad.numpy(), expected, atol=1e-9)


def _normalized_reference(grads: np.ndarray, base: float, normalization: str) -> np.ndarray:
    """The documented rules written out entry by entry (slow, obvious)."""
    n, k = grads.shape
    out = np.zeros_like(grads)
    moved = [i for i in range(n) if any(grads[i, c] != 0 for c in range(k))]
    l1 = sum(abs(base * grads[i, c]) for i in range(n) for c in range(k))
    for c in range(k):
        n_c = sum(1 for i in range(n) if grads[i, c] != 0)
        for i in range(n):
            p = base * grads[i, c]
            if normalization == "none":
                out[i, c] = p
            elif normalization == "nonzero":
                out[i, c] = p / max(len(moved), 1)
            elif normalization == "per_class":
                out[i, c] = p / max(n_c, 1)
            else:
                out[i, c] = p / l1 if l1 > 0 else 0.0
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 12), k=st.integers(1, 4), base=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       normalization=st.sampled_from(NORMALIZATIONS), seed=st.integers(0, 2**31),
       density=st.sampled_from([0.0, 0.3, 1.0]))
def test_normalization_scale_matches_the_rules(n, k, base, normalization, seed, density):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(n, k)) * (rng.uniform(size=(n, k)) < density)
    grads[rng.uniform(size=(n, k)) < 0.2] = 1e3  # the size of a near-tie partial
    got = normalization_scale(grads, base, normalization) * grads
    np.testing.assert_allclose(got, _normalized_reference(grads, base, normalization),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("form", ["one_minus", "neg_log"])
def test_normalized_backward_is_the_scaled_exact_pseudo_gradient(normalization, form):
    o, targets = _batch(num_images=3, windows=20, classes=3, seed=7)
    probs = torch.tensor(np.round(o.probs, 3), requires_grad=True)
    loss_fn = MAPLoss(form=form, normalization=normalization, min_step=1e-2)
    loss = loss_fn(probs, torch.tensor(o.boxes), torch.tensor(o.image_ids), targets)
    loss.backward()
    aps, grads = _reference_grads(o, score_threshold=0.05, nms_iou=0.3, min_step=1e-2)
    defined = ~np.isnan(aps)
    m_ap = aps[defined].mean()
    assert loss.item() == pytest.approx(1 - m_ap if form == "one_minus" else -np.log(m_ap))
    base = 1 / defined.sum() if form == "one_minus" else 1 / (defined.sum() * m_ap)
    expected = -_normalized_reference(grads, base, normalization)
    assert np.abs(expected).sum() > 0  # the instance moves some windows
    np.testing.assert_allclose(probs.grad.numpy(), expected, rtol=1e-9, atol=1e-12)
    if normalization == "l1":
        assert np.abs(probs.grad.numpy()).sum() == pytest.approx(1.0)


def test_gradient_flows_through_softmax_and_raises_map():
    # A tiny scorer: per-window features -> K+1 logits -> softmax -> MAPLoss. One feature per
    # class carries the signal (the window's IoU with that class's objects), four are noise;
    # from a random start, descending the mAP loss must find the signal.
    torch.manual_seed(0)
    o, targets = _batch(windows=120, classes=3, seed=7)
    k = 3
    signal = np.zeros((o.image_ids.size, k))
    for c in range(k):
        for b in range(2):
            rows = o.image_ids == b
            objs = (o.gt_labels == c) & (o.gt_image_ids == b)
            if objs.any():
                signal[rows, c] = box_iou(o.boxes[rows, c], o.gt_boxes[objs]).max(1)
    noise = np.random.default_rng(0).normal(0, 1, (o.image_ids.size, 4))
    feats = torch.tensor(np.concatenate([signal, noise], 1), dtype=torch.float32)
    model = torch.nn.Linear(feats.shape[1], k + 1)
    loss_fn = MAPLoss(normalization="none", min_step=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    boxes, ids = torch.tensor(o.boxes), torch.tensor(o.image_ids)
    history = []
    for _ in range(15):
        probs = torch.softmax(model(feats), 1)[:, 1:]
        loss = loss_fn(probs, boxes, ids, targets)
        history.append(loss_fn.last_map)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] > history[0] + 0.3, history


def test_memory_keeps_the_last_k_minibatches():
    o, targets = _batch(windows=60, classes=2, seed=2)
    loss_fn = MAPLoss(normalization="none", memory=2)
    for step in range(4):
        probs = torch.tensor(o.probs, requires_grad=True)
        loss_fn(probs, o.boxes, o.image_ids, targets).backward()
        assert probs.grad.shape == probs.shape
        assert len(loss_fn._memory) == min(step + 1, 2)
    # The context holds the current minibatch and two stored ones: 3 copies of each image.
    loss_fn.reset_memory()
    assert len(loss_fn._memory) == 0


def test_memory_changes_the_ap_context():
    o, targets = _batch(windows=60, classes=2, seed=9)
    o2, targets2 = _batch(windows=60, classes=2, seed=10)
    plain, with_memory = MAPLoss(normalization="none"), MAPLoss(normalization="none", memory=1)
    with_memory(torch.tensor(o2.probs), o2.boxes, o2.image_ids, targets2)
    a = plain(torch.tensor(o.probs), o.boxes, o.image_ids, targets).item()
    b = with_memory(torch.tensor(o.probs), o.boxes, o.image_ids, targets).item()
    joint = MAPLoss(normalization="none")(torch.tensor(np.concatenate([o.probs, o2.probs])),
                      np.concatenate([o.boxes, o2.boxes]),
                      np.concatenate([o.image_ids, o2.image_ids + 2]), targets + targets2).item()
    assert b == pytest.approx(joint)
    assert a != pytest.approx(b)


def test_no_positive_gives_zero_loss_and_gradient():
    probs = torch.full((3, 2), 0.4, requires_grad=True)
    targets = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    loss = MAPLoss(normalization="none")(probs, boxes, torch.zeros(3, dtype=torch.long), targets)
    loss.backward()
    assert loss.item() == 0.0 and not probs.grad.any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(probs=torch.tensor([[np.nan, 0.2]])), "probs contains 1 NaN"),
        (dict(boxes=torch.zeros(1, 3, 4)), "boxes must have shape"),
        (dict(image_ids=torch.tensor([1])), "image_ids must index targets"),
        (dict(targets=[dict(boxes=torch.zeros(1, 4), labels=torch.tensor([5]))]),
         "labels'] must be in 0..1"),
        (dict(targets=[dict(labels=torch.tensor([0]))]), "has no 'boxes' entry"),
    ],
)
def test_bad_input(change, message):
    args = dict(probs=torch.tensor([[0.5, 0.2]]), boxes=torch.tensor([[0.0, 0, 1, 1]]),
                image_ids=torch.tensor([0]),
                targets=[dict(boxes=torch.zeros(1, 4), labels=torch.tensor([0]))])
    args.update(change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        MAPLoss()(**args)


def test_bad_options():
    with pytest.raises(ValueError, match="form must be one of"):
        MAPLoss(normalization="none", form="log")
    with pytest.raises(ValueError, match="min_step"):
        MAPLoss(normalization="none", min_step=0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        MAPLoss(normalization="mean")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors():
    o, targets = _batch(windows=30, classes=2)
    probs = torch.tensor(o.probs, device="cuda", requires_grad=True)
    loss = MAPLoss(normalization="none")(probs, torch.tensor(o.boxes, device="cuda"),
                     torch.tensor(o.image_ids, device="cuda"), targets)
    loss.backward()
    assert loss.device.type == "cuda" and probs.grad.device.type == "cuda"


def test_memory_travels_in_state_dict():
    o, targets = _batch(windows=60, classes=2, seed=2)
    a = MAPLoss(normalization="none", memory=2)
    a(torch.tensor(o.probs), o.boxes, o.image_ids, targets)
    b = MAPLoss(normalization="none", memory=2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    o2, targets2 = _batch(windows=60, classes=2, seed=3)
    la = a(torch.tensor(o2.probs), o2.boxes, o2.image_ids, targets2).item()
    lb = b(torch.tensor(o2.probs), o2.boxes, o2.image_ids, targets2).item()
    assert la == lb and len(a._memory) == len(b._memory) == 2
