"""mapdet.torchvision.use_map_loss on torchvision's Faster R-CNN: a training step, eval mode
identical to torchvision's, the model's post-processing inside the loss, DDP."""

from __future__ import annotations

import copy
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.roi_heads import RoIHeads

from mapdet.core.nms import greedy_nms
from mapdet.models.faster_rcnn import build_faster_rcnn
from mapdet.row_subset import row_dependence
from mapdet.torchvision import MAPRoIHeads, map_windows, use_map_loss

SIZE = 96


def _small(**kw):
    torch.manual_seed(0)
    return build_faster_rcnn("small", 3, min_size=SIZE, max_size=SIZE,
                             rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=300, **kw)


def _data(num_images: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(num_images)]
    targets = []
    for _ in range(num_images):
        xy = torch.rand(2, 2, generator=g) * 50
        wh = 15 + torch.rand(2, 2, generator=g) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, 4, (2,), generator=g)})
    return images, targets


def test_training_step_gives_finite_losses_and_a_classifier_gradient():
    model = use_map_loss(_small(), normalization="none", num_threads=1)
    model.train()
    images, targets = _data()
    losses = model(images, targets)
    assert set(losses) == {"loss_map", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0.0 <= losses["loss_map"].item() <= 1.0
    sum(losses.values()).backward()
    grad = model.roi_heads.box_predictor.cls_score.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_works_on_torchvisions_own_builder():
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=64, max_size=64,
        rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_train=100)
    use_map_loss(model, normalization="none", num_threads=1)
    model.train()
    images, targets = _data()
    losses = model(images, targets)
    assert "loss_classifier" not in losses and torch.isfinite(losses["loss_map"])
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_eval_outputs_equal_torchvisions_for_the_same_weights():
    plain = _small(box_score_thresh=0.0)
    wrapped = use_map_loss(copy.deepcopy(plain), normalization="none", num_threads=1)
    assert type(wrapped.roi_heads) is MAPRoIHeads and type(plain.roi_heads) is RoIHeads
    plain.eval()
    wrapped.eval()
    images, _ = _data(3, seed=1)
    with torch.no_grad():
        a, b = plain(images), wrapped(images)
    assert sum(len(d["boxes"]) for d in a) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_weights_keep_their_state_dict_keys():
    plain = _small()
    wrapped = use_map_loss(copy.deepcopy(plain), normalization="none")
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    wrapped.load_state_dict(plain.state_dict())
    plain.load_state_dict(wrapped.state_dict())


def test_custom_thresholds_are_carried_into_the_loss():
    model = use_map_loss(_small(box_score_thresh=0.2, box_nms_thresh=0.45), normalization="none",
                         num_threads=1)
    assert model.roi_heads.map_loss.score_threshold == 0.2
    assert model.roi_heads.map_loss.nms_iou == 0.45
    model.train()
    images, targets = _data()
    model(images, targets)  # a step does not touch them
    assert model.roi_heads.map_loss.score_threshold == 0.2
    assert model.roi_heads.map_loss.nms_iou == 0.45


@pytest.mark.parametrize(("attr", "value", "name"), [
    ("score_thresh", 0.1, "score_threshold"), ("nms_thresh", 0.6, "nms_iou")])
def test_a_threshold_changed_on_the_model_later_is_named(attr, value, name):
    """Changed on the model after use_map_loss: the next step names both values, and
    use_map_loss again (validated by MAPLoss) carries the new one into the loss."""
    model = use_map_loss(_small(), normalization="none", num_threads=1)
    setattr(model.roi_heads, attr, value)
    model.train()
    images, targets = _data()
    with pytest.raises(ValueError, match=rf"roi_heads.{attr}={value} .* map_loss.{name}="):
        model(images, targets)
    use_map_loss(model, normalization="none", num_threads=1)
    assert getattr(model.roi_heads.map_loss, name) == value
    model(images, targets)
    model.roi_heads.nms_thresh = 1.5  # invalid: MAPLoss's own check names it
    with pytest.raises(ValueError, match="nms_iou"):
        use_map_loss(model, normalization="none")


def test_a_threshold_that_differs_from_the_model_is_named():
    with pytest.raises(ValueError, match="box_score_thresh"):
        use_map_loss(_small(box_score_thresh=0.2), normalization="none", score_threshold=0.05)
    with pytest.raises(ValueError, match="box_nms_thresh"):
        use_map_loss(_small(), normalization="none", nms_iou=0.3)
    use_map_loss(_small(), normalization="none", score_threshold=0.05, nms_iou=0.5)  # equal: fine


def test_a_given_loss_is_used_when_its_thresholds_are_the_models():
    from mapdet import MAPLoss

    loss = MAPLoss(score_threshold=0.05, nms_iou=0.5, min_step=0.01)
    model = use_map_loss(_small(), loss=loss)
    assert model.roi_heads.map_loss is loss
    with pytest.raises(ValueError, match="box_nms_thresh"):
        use_map_loss(_small(), loss=MAPLoss(nms_iou=0.3))
    with pytest.raises(ValueError, match="either loss or MAPLoss options, not both .min_step"):
        use_map_loss(_small(), loss=loss, min_step=0.1)


def test_bad_models_and_targets_are_named():
    with pytest.raises(TypeError, match="roi_heads"):
        use_map_loss(torch.nn.Linear(2, 2), normalization="none")
    model = use_map_loss(_small(), normalization="none")
    model.train()
    images, targets = _data()
    targets[1]["labels"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must be in 1..K"):
        model(images, targets)


def _torchvision_detections(heads, logits, regression, proposals, shapes):
    """torchvision's post-processing without the per-image cap: (image, class, box, score)."""
    heads = copy.copy(heads)
    heads.detections_per_img = 10**9
    boxes, scores, labels = RoIHeads.postprocess_detections(heads, logits, regression,
                                                            proposals, shapes)
    return boxes, scores, labels


@pytest.mark.parametrize("seed", range(4))
def test_the_loss_windows_give_torchvisions_detections(seed):
    """Threshold, clipping, small-box removal and NMS of the loss's detection function
    (mapdet.core.nms on map_windows' output) equal torchvision's postprocess_detections."""
    g = torch.Generator().manual_seed(seed)
    k, shapes = 3, [(60, 80), (50, 40)]
    proposals = []
    for h, w in shapes:
        xy = torch.rand(30, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(30, 2, generator=g) * 30
        wh[:3] = 0.0  # degenerate proposals: decoded boxes below 1e-2 px
        proposals.append(torch.cat([xy, xy + wh], 1))
    n = sum(len(p) for p in proposals)
    logits = torch.randn(n, k + 1, generator=g) * 2
    regression = torch.randn(n, 4 * (k + 1), generator=g) * 0.3
    heads = _small(box_score_thresh=0.15, box_nms_thresh=0.4).roi_heads
    probs, boxes, ids = map_windows(logits, regression, proposals, shapes, heads.box_coder,
                                    heads.score_thresh)
    tv_boxes, tv_scores, tv_labels = _torchvision_detections(heads, logits, regression,
                                                             proposals, shapes)
    for b in range(len(shapes)):
        on = (ids == b).numpy()
        for c in range(k):
            s = probs[on, c].detach().double().numpy()
            bx = boxes[on, c].double().numpy()
            kept = greedy_nms(s, bx, np.zeros(len(s), np.int64),
                              score_threshold=heads.score_thresh, nms_iou=heads.nms_thresh)
            mine = sorted(map(float, s[kept]))
            theirs = sorted(map(float, tv_scores[b][tv_labels[b] == c + 1].double()))
            np.testing.assert_allclose(mine, theirs, rtol=1e-6)


def test_the_per_image_cap_is_named_when_it_binds():
    model = use_map_loss(_small(box_score_thresh=0.0, box_detections_per_img=5),
                         normalization="none",
                         num_threads=1)
    model.train()
    images, targets = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(images, targets)
    assert model.roi_heads.last_capped_images == 2
    assert any("detections_per_img=5" in str(w.message) for w in caught)


def _grads(model, seed=3, **kw):
    """One training step from the global RNG state ``seed``: the loss dict and every
    parameter's gradient."""
    model.train()
    images, targets = _data(2, seed=seed)
    torch.manual_seed(seed)
    losses = model(images, targets)
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("score_thresh", [0.05, 0.3])
def test_the_sparse_backward_equals_the_full_path(score_thresh):
    """Scoring every proposal without autograd and recomputing only the rows with a nonzero
    pseudo-gradient or a box target gives the full path's loss and gradients, at the head
    and the backbone."""
    full = use_map_loss(_small(box_score_thresh=score_thresh), normalization="none", num_threads=1,
                        sparse_backward=False)
    sparse = use_map_loss(copy.deepcopy(full), normalization="none", num_threads=1,
                          sparse_backward=True)
    lf, gf = _grads(full)
    ls, gs = _grads(sparse)
    assert full.roi_heads.last_full_path == "sparse_backward=False"
    assert sparse.roi_heads.last_full_path is None
    assert 0 < sparse.roi_heads.last_grad_rows < full.roi_heads.last_grad_rows
    assert ls["loss_map"].item() == lf["loss_map"].item()
    torch.testing.assert_close(ls, lf, rtol=1e-5, atol=1e-7)
    assert gs.keys() == gf.keys()
    assert gf["roi_heads.box_predictor.cls_score.weight"].abs().sum() > 0
    assert gf["backbone.body.0.0.weight"].abs().sum() > 0  # the first convolution
    for name in gf:
        torch.testing.assert_close(gs[name], gf[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_a_head_whose_rows_interact_takes_the_full_path(layer):
    """BatchNorm with batch statistics, or dropout, in the box head: the rows are not
    independent, so the step runs the full path (and says why)."""
    model = _small()
    extra = torch.nn.BatchNorm1d(256) if layer == "batchnorm" else torch.nn.Dropout(0.3)
    model.roi_heads.box_head = torch.nn.Sequential(model.roi_heads.box_head, extra)
    plain = use_map_loss(copy.deepcopy(model), normalization="none", num_threads=1,
                         sparse_backward=False)
    auto = use_map_loss(model, normalization="none", num_threads=1)
    lp, gp = _grads(plain)
    la, ga = _grads(auto)
    assert type(extra).__name__ in auto.roi_heads.last_full_path
    for name in gp:
        assert torch.equal(ga[name], gp[name]), name


def test_torchvisions_v2_box_head_is_recognised_as_not_row_independent():
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    model.train()
    reason = row_dependence(model.roi_heads.box_head)
    assert reason is not None and "BatchNorm2d" in reason
    model.eval()  # running statistics: rows independent again
    assert row_dependence(model.roi_heads.box_head) is None


def test_the_cap_check_can_be_switched_off():
    model = use_map_loss(_small(box_score_thresh=0.0, box_detections_per_img=5),
                         normalization="none",
                         num_threads=1, check_cap=False)
    model.train()
    images, targets = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(images, targets)
    assert model.roi_heads.last_capped_images == 0


# ------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, images, targets):
    losses = model(images, targets)
    sum(losses.values()).backward()
    heads = model.module.roi_heads if hasattr(model, "module") else model.roi_heads
    return ({k: v.item() for k, v in losses.items()}, heads.map_loss.last_map,
            heads.box_predictor.cls_score.weight.grad.clone(),
            heads.box_predictor.bbox_pred.weight.grad.clone())


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = use_map_loss(_small(), normalization="none", distributed=True, num_threads=1)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = _data(4, seed=5)
        part = slice(2 * rank, 2 * rank + 2)
        _, m_ap, g_cls, g_box = _step(ddp, images[part], targets[part])
        torch.save({"map": m_ap, "cls": g_cls, "box": g_box}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_the_single_process_global_batch(tmp_path):
    world = 2
    mp.start_processes(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    model = use_map_loss(_small(), normalization="none", num_threads=1)
    model.train()
    images, targets = _data(4, seed=5)
    _, m_ap, g_cls, g_box = _step(model, images, targets)
    assert g_cls.abs().sum() > 0
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        assert got["map"] == pytest.approx(m_ap, abs=1e-12)
        # The classifier sees only loss_map: DDP's average of the ranks' gradients is the
        # global batch's (to float32 rounding: the sums run in another order).
        torch.testing.assert_close(got["cls"], g_cls, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["box"], g_box, rtol=1e-4, atol=1e-6)
