"""mapdet.row_subset (backward through a subset of rows) and mapdet.models.roi_pool (the
no-autograd RoI max pooling, against torchvision's kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import roi_pool as tv_roi_pool

from mapdet.models.roi_pool import roi_pool, roi_pool_nograd
from mapdet.row_subset import (
    attach_grad,
    loss_and_grad,
    plan_sparse_step,
    row_dependence,
    rows_with_grad,
    split_rows,
)

# ----------------------------------------------------------------------------- row_subset


def test_attach_grad_keeps_the_value_and_hands_the_gradient():
    value = torch.tensor(0.123456789)
    x = torch.randn(5, 3, requires_grad=True)
    p = torch.softmax(x, 1)
    g = torch.randn(5, 3)
    want = torch.autograd.grad((p * g).sum(), x, retain_graph=True)[0]  # through the softmax
    out = attach_grad(value, p, g)
    assert out.item() == value.item()
    out.backward()
    torch.testing.assert_close(x.grad, want)


def test_loss_and_grad_is_the_gradient_of_the_loss():
    probs = torch.rand(6, 4)
    w = torch.randn(6, 4)
    with torch.no_grad():  # whatever the caller's mode
        value, grad = loss_and_grad(lambda p: (p * w).sum() ** 2, probs)
    s = (probs * w).sum()
    assert value.item() == pytest.approx((s**2).item())
    torch.testing.assert_close(grad, 2 * s * w)
    value, grad = loss_and_grad(lambda p: torch.tensor(1.0), probs)  # no dependence
    assert value.item() == 1.0 and not grad.any()


def test_the_subset_backward_equals_the_full_backward_for_independent_rows():
    """The mechanism on a plain MLP head: gradients of every parameter agree."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(40, 8)
    g = torch.zeros(40, 4)
    g[[3, 17, 30]] = torch.randn(3, 4)

    def loss_fn(p):
        return (p * g).sum()

    full = torch.softmax(head(x), 1)[:, 1:]
    loss_fn(full).backward()
    want = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    with torch.no_grad():
        scores = torch.softmax(head(x), 1)[:, 1:]
    value, grad = loss_and_grad(loss_fn, scores)
    rows = rows_with_grad(grad)
    assert rows.tolist() == [3, 17, 30]
    sub = torch.softmax(head(x[rows]), 1)[:, 1:]
    attach_grad(value, sub, grad[rows]).backward()
    for a, b in zip((p.grad for p in head.parameters()), want, strict=True):
        torch.testing.assert_close(a, b)


def test_the_sparse_plan_recomputes_the_touched_rows_and_equals_the_full_backward():
    """Windows are rows 2, 3, 5, 6 of a head with 8 rows; the loss touches windows 0 and 3
    (window 1's gradient is masked off); rows 7 and 2 are needed besides."""
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(8, 6)
    window_rows = torch.tensor([2, 3, 5, 6])
    g = torch.zeros(4, 3)
    g[0], g[1], g[3] = torch.randn(3), torch.randn(3), torch.randn(3)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1] = True

    def loss_fn(p):
        return (p * g).sum()

    full = torch.softmax(head(x), 1)[window_rows, 1:]
    (full * g.masked_fill(mask, 0.0)).sum().backward()
    want = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    with torch.no_grad():
        probs = torch.softmax(head(x), 1)[window_rows, 1:]
    extra = torch.tensor([7, 2])
    plan = plan_sparse_step(loss_fn, probs, extra_rows=extra, num_rows=8,
                            window_rows=window_rows, no_grad_mask=mask)
    assert plan.windows.tolist() == [0, 3] and plan.need.tolist() == [2, 6, 7]
    assert plan.need[plan.window_at].tolist() == [2, 6]
    assert plan.need[plan.extra_at].tolist() == [7, 2]
    assert plan.value.item() == loss_fn(probs).item()
    loss = plan.loss(head(x[plan.need]))
    assert loss.item() == plan.value.item()
    loss.backward()
    for a, b in zip((p.grad for p in head.parameters()), want, strict=True):
        torch.testing.assert_close(a, b)
    empty = plan_sparse_step(lambda p: p.sum() * 0, probs, num_rows=8,
                             extra_rows=torch.zeros(0, dtype=torch.int64))
    assert empty.need.tolist() == [0] and empty.windows.numel() == 0  # never an empty graph


def test_split_rows():
    rows = torch.tensor([0, 2, 5, 6, 9])
    parts = split_rows(rows, [3, 0, 4, 3])
    assert [p.tolist() for p in parts] == [[0, 2], [], [2, 3], [2]]
    assert [p.tolist() for p in split_rows(torch.zeros(0, dtype=torch.int64), [2, 2])] == [[], []]


def test_row_dependence_names_batchnorm_and_dropout_in_training_mode():
    assert row_dependence(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))) is None
    assert row_dependence(nn.Dropout(0.0)) is None
    head = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert "Sequential.1 (BatchNorm1d)" in row_dependence(nn.Linear(2, 2), head)
    head.eval()
    assert row_dependence(head) is None
    assert "batch's statistics" in row_dependence(
        nn.BatchNorm1d(2, track_running_stats=False).eval())
    drop = nn.Dropout(0.5)
    assert "Dropout, p=0.5" in row_dependence(drop)
    assert row_dependence(drop.eval()) is None


# ----------------------------------------------------------------------------- roi_pool


@st.composite
def _roi_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 9))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    stride = draw(st.sampled_from([1, 4, 8, 16, 3]))
    feats = rng.standard_normal((b, c, h, w)).astype(np.float32)
    if draw(st.booleans()):  # ties and a constant region
        feats = np.round(feats).astype(np.float32)
    boxes = []
    for _ in range(b):
        n = draw(st.integers(0, 6))
        # Coordinates on a half-pixel grid of the feature map (rounding ties), some outside
        # the map, some degenerate (x2 < x1).
        xy = rng.integers(-4, 2 * max(h, w) + 4, (n, 4)) / 2.0 * stride
        if draw(st.booleans()):
            xy = rng.uniform(-10, (max(h, w) + 2) * stride, (n, 4))
        boxes.append(torch.from_numpy(xy.astype(np.float32)))
    p = draw(st.integers(1, 7))
    return torch.from_numpy(feats), boxes, p, 1.0 / stride


@settings(max_examples=200, deadline=None)
@given(_roi_cases())
def test_roi_pool_nograd_equals_torchvision_bit_for_bit(case):
    feats, boxes, p, scale = case
    want = tv_roi_pool(feats, boxes, p, scale)
    got = roi_pool_nograd(feats, boxes, p, scale)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_roi_pool_picks_torchvision_when_a_graph_is_needed():
    feats = torch.randn(1, 3, 6, 6, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 12.0]])]
    out = roi_pool(feats, boxes, 2, 0.25)
    assert out.grad_fn is not None
    out.sum().backward()
    assert feats.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(roi_pool(feats, boxes, 2, 0.25), out.detach())
    with pytest.raises(ValueError, match="float32 CPU"):
        roi_pool_nograd(feats.detach().double(), boxes, 2, 0.25)


# ----------------------------------------------------------- the Fast R-CNN pipeline's step


def _fast_rcnn_batch(seed: int = 0, num_images: int = 2, size: int = 64):
    from mapdet.engine.data_loading import Sample, collate

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num_images):
        xy = torch.rand(3, 2, generator=g) * 30
        gt = torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=g) * 20], 1)
        pxy = torch.rand(60, 2, generator=g) * 40
        props = torch.cat([pxy, pxy + 4 + torch.rand(60, 2, generator=g) * 24], 1)
        props[:12] = gt.repeat(4, 1) + torch.randn(12, 4, generator=g)  # some foreground
        samples.append(Sample(
            image=torch.randn(3, size, size, generator=g), boxes=gt,
            labels=torch.randint(0, 3, (3,), generator=g), difficult=torch.tensor([0, 0, 1]).bool(),
            proposals=props.clamp(0, size), size=(size, size), scale=1.0, flipped=False, index=i,
            image_id=str(i), orig_size=(size, size)))
    return collate(samples)


def _fast_rcnn_step(model, batch, cfg):
    from mapdet import MAPLoss
    from mapdet.engine.steps import map_loss

    criterion = MAPLoss(normalization="none", num_threads=1)
    gens = [torch.Generator().manual_seed(7 + b) for b in range(len(batch.samples))]
    loss, stats = map_loss(model, batch, cfg, criterion, gens)
    model.zero_grad()
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_fast_rcnn_map_step_recomputes_few_rows_and_equals_the_full_path(monkeypatch):
    from mapdet.config import config_from_dict
    from mapdet.engine import steps
    from mapdet.models import FastRCNN

    cfg = config_from_dict({"train": {"rois_per_image": 16}})
    torch.manual_seed(0)
    model = FastRCNN("small", 3, fc_dim=32, dropout=0.0).train()
    batch = _fast_rcnn_batch()
    assert steps.full_path_reason(model) is None
    loss_s, stats_s, grads_s = _fast_rcnn_step(model, batch, cfg)
    monkeypatch.setattr(steps, "full_path_reason", lambda m: "forced")
    loss_f, stats_f, grads_f = _fast_rcnn_step(model, batch, cfg)
    assert stats_f["grad_rows"] == 120 and 0 < stats_s["grad_rows"] < 120
    assert loss_s.item() == pytest.approx(loss_f.item(), rel=1e-6)
    assert stats_s["loss_map"] == stats_f["loss_map"]
    assert grads_f["cls_score.weight"].abs().sum() > 0
    assert grads_f["backbone.0.0.weight"].abs().sum() > 0
    for name in grads_f:
        torch.testing.assert_close(grads_s[name], grads_f[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_a_fast_rcnn_head_with_dropout_takes_the_full_path():
    from mapdet.engine.steps import full_path_reason
    from mapdet.models import FastRCNN

    model = FastRCNN("small", 3, fc_dim=32, dropout=0.5).train()
    assert "Dropout, p=0.5" in full_path_reason(model)
    assert full_path_reason(model.eval()) is None
    assert "not a FastRCNN" in full_path_reason(nn.Linear(2, 2))
