"""Backbones, the Fast R-CNN module and its losses (CPU, tiny inputs)."""

import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mapdet.models import (
    FastRCNN,
    PretrainedWeightsUnavailableError,
    SmallBackbone,
    backbones,
    box_regression_loss,
    build_backbone,
    build_roi_head,
    fast_rcnn_loss,
)


def _rois(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size * 0.7)
    wh = torch.rand(n, 2, generator=g) * (size * 0.3) + 4
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- small


def test_small_backbone_shape_and_size():
    net, channels, stride = build_backbone("small")
    assert (channels, stride) == (128, 8)
    assert _n_params(net) == 287_456  # well under 1M
    assert net(torch.zeros(2, 3, 200, 200)).shape == (2, 128, 25, 25)
    head = build_roi_head("small", fc_dim=64)
    assert (head.pool_size, head.out_dim) == (7, 64)


@pytest.mark.parametrize("roi_op", ["pool", "align"])
def test_fast_rcnn_forward_shapes(roi_op):
    torch.manual_seed(0)
    model = FastRCNN("small", num_classes=5, roi_op=roi_op, fc_dim=32)
    logits, deltas = model(torch.randn(2, 3, 64, 48), [_rois(3, 48), _rois(4, 48, seed=1)])
    assert logits.shape == (7, 6) and deltas.shape == (7, 6, 4)


def test_roi_pool_and_align_differ_with_same_weights():
    torch.manual_seed(0)
    pool = FastRCNN("small", num_classes=2, roi_op="pool", fc_dim=16).eval()
    align = FastRCNN("small", num_classes=2, roi_op="align", fc_dim=16).eval()
    align.load_state_dict(pool.state_dict())
    images, rois = torch.randn(1, 3, 64, 64), [_rois(5, 64)]
    assert not torch.allclose(pool(images, rois)[0], align(images, rois)[0])


def test_rois_concatenated_in_image_order():
    torch.manual_seed(0)
    model = FastRCNN("small", num_classes=3, fc_dim=16).eval()
    images = torch.randn(2, 3, 40, 40)
    rois = [_rois(2, 40), _rois(3, 40, seed=1)]
    logits, _ = model(images, rois)
    first, _ = model(images[:1], rois[:1])
    second, _ = model(images[1:], rois[1:])
    torch.testing.assert_close(logits, torch.cat([first, second]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("roi_op", ["pool", "align"])
def test_spatial_scale(roi_op):
    model = FastRCNN("small", num_classes=1, roi_op=roi_op, fc_dim=8)
    xs = torch.arange(8.0).repeat(8, 1)  # feature value = column index, stride 8
    features = xs.expand(1, 4, 8, 8).contiguous()
    pooled = model.pool_rois(features, [torch.tensor([[16.0, 0.0, 48.0, 64.0]])])
    assert pooled.shape == (1, 4, 7, 7)
    # x in [16, 48) covers feature columns 2..5 (roi_pool's quantisation reaches column 6)
    assert pooled.min() >= 1.5 and pooled.max() <= 6.0


def test_gradients_flow_to_backbone_and_freezing():
    torch.manual_seed(0)
    model = FastRCNN("small", num_classes=2, fc_dim=16, freeze_at=1)
    logits, deltas = model(torch.randn(1, 3, 32, 32), [_rois(4, 32)])
    (logits.sum() + deltas.sum()).backward()
    first, second = model.backbone[0][0], model.backbone[1][0]
    assert first.weight.grad is None and not first.weight.requires_grad
    assert second.weight.grad is not None and second.weight.grad.abs().sum() > 0


def test_predictor_initialisation():
    torch.manual_seed(0)
    model = FastRCNN("small", num_classes=20, fc_dim=512)
    assert model.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert model.cls_score.bias.abs().sum() == 0 and model.bbox_pred.bias.abs().sum() == 0


def test_pluggable_roi_head():
    class MeanHead(nn.Module):
        pool_size, out_dim = 3, 128

        def forward(self, x):
            return x.mean(dim=(2, 3))

    model = FastRCNN("small", num_classes=4, roi_head=MeanHead())
    logits, deltas = model(torch.randn(1, 3, 32, 32), [_rois(2, 32)])
    assert logits.shape == (2, 5) and deltas.shape == (2, 5, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="roi_op"):
        FastRCNN("small", 2, roi_op="warp")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="no pretrained"):
        build_backbone("small", pretrained=True)
    model = FastRCNN("small", 2, fc_dim=8)
    with pytest.raises(ValueError, match="RoI tensors"):
        model(torch.zeros(2, 3, 16, 16), [_rois(1, 16)])


# ----------------------------------------------------------------------------- heavy ones


def test_vgg16_backbone_and_head_64px():
    net, channels, stride = build_backbone("vgg16")
    assert (channels, stride) == (512, 16)
    assert all(p.requires_grad for p in net.parameters())  # not pretrained: nothing frozen
    model = FastRCNN("vgg16", num_classes=3, fc_dim=32, freeze_at=2)
    assert model.backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 4, 4)
    assert not model.backbone[7].weight.requires_grad  # conv2_2
    assert model.backbone[10].weight.requires_grad  # conv3_1
    logits, deltas = model(torch.zeros(1, 3, 64, 64), [_rois(2, 64)])
    assert logits.shape == (2, 4) and deltas.shape == (2, 4, 4)


def test_resnet50_c4_backbone_and_head_64px():
    model = FastRCNN("resnet50_c4", num_classes=2)
    assert (model.out_channels, model.stride, model.pool_size) == (1024, 16, 14)
    assert model.backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 1024, 4, 4)
    logits, deltas = model(torch.randn(1, 3, 64, 64), [_rois(2, 64)])
    assert logits.shape == (2, 3) and deltas.shape == (2, 3, 4)


def test_vgg16_pretrained_weights_are_loaded_and_conv1_conv2_frozen(monkeypatch):
    torch.manual_seed(0)
    reference = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    monkeypatch.setattr(backbones, "load_imagenet_state_dict", lambda name: state)
    net, _, _ = build_backbone("vgg16", pretrained=True)
    assert torch.equal(net[28].weight, reference[28].weight)  # conv5_3
    assert not net[7].weight.requires_grad and net[10].weight.requires_grad


def test_vgg16_head_takes_fc6_fc7():
    head = backbones.TwoFCHead(2, 1, 3)
    state = {
        "features.0.weight": torch.zeros(1),
        "classifier.0.weight": torch.ones(3, 2),
        "classifier.0.bias": torch.ones(3),
        "classifier.3.weight": torch.full((3, 3), 2.0),
        "classifier.3.bias": torch.full((3,), 2.0),
        "classifier.6.weight": torch.zeros(1),
    }
    backbones._init_or_load_(head, state, {"fc6.": "classifier.0.", "fc7.": "classifier.3."})
    assert (head.fc6.weight == 1).all() and (head.fc7.bias == 2).all()


def test_resnet50_c4_pretrained_weights_and_frozen_bn(monkeypatch):
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    monkeypatch.setattr(backbones, "load_imagenet_state_dict", lambda name: state)
    model = FastRCNN("resnet50_c4", num_classes=2, pretrained=True)
    assert torch.equal(model.backbone[0][0].weight, state["conv1.weight"])
    assert torch.equal(model.roi_head.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert isinstance(model.backbone[0][1], FrozenBatchNorm2d)
    assert not model.backbone[1][0].conv1.weight.requires_grad  # layer1 frozen
    assert model.backbone[2][0].conv1.weight.requires_grad  # layer2 trained


@pytest.mark.parametrize("name", ["vgg16", "resnet50_c4"])
def test_pretrained_offline_gives_clear_error(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        build_backbone(name, pretrained=True)
    message = str(info.value)
    assert "pretrained: false" in message and "TORCH_HOME" in message
    assert str(tmp_path) in message


def test_pretrained_faster_rcnn_offline_gives_clear_error(monkeypatch, tmp_path):
    from mapdet.models.faster_rcnn import build_faster_rcnn

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        build_faster_rcnn("resnet18_fpn", 2, pretrained=True)
    message = str(info.value)
    assert "Faster R-CNN backbone 'resnet18_fpn'" in message and str(tmp_path) in message


# ----------------------------------------------------------------------------- losses


def test_fast_rcnn_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    labels = torch.tensor([1, 0])
    deltas = torch.full((2, 3, 4), 100.0)  # only [0, 1] is used
    deltas[0, 1] = torch.tensor([0.5, -2.0, 0.0, 0.0])
    targets = torch.zeros(2, 4)
    targets[1] = 7.0  # background target: ignored
    losses = fast_rcnn_loss(logits, deltas, labels, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    assert losses["loss_cls"].item() == pytest.approx((math.log(3) + math.log(2)) / 2)
    assert losses["loss_box"].item() == pytest.approx((0.125 + 1.5) / 2)  # / 2 sampled RoIs
    with_beta = fast_rcnn_loss(logits, deltas, labels, targets, beta=0.5)["loss_box"]
    assert with_beta.item() == pytest.approx((0.25 + 1.75) / 2)


def test_box_regression_loss_normalizer_and_empty():
    deltas = torch.zeros(3, 2, 4, requires_grad=True)
    labels = torch.tensor([1, 0, 1])
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0.5, 0, 0]])
    loss = box_regression_loss(deltas, labels, targets, normalizer=1)
    assert loss.item() == pytest.approx(0.5 + 0.125)
    loss.backward()
    assert deltas.grad[1].abs().sum() == 0 and deltas.grad[0, 1, 0] == -1.0
    empty = fast_rcnn_loss(
        torch.zeros(0, 3),
        torch.zeros(0, 3, 4),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 4),
    )
    assert empty["loss_cls"].item() == 0 and empty["loss_box"].item() == 0


def test_small_model_param_count_is_small():
    assert _n_params(SmallBackbone()) < 1_000_000


def test_image_without_rois_in_batch():
    model = FastRCNN("small", num_classes=2, fc_dim=8)
    logits, deltas = model(torch.zeros(2, 3, 32, 32), [torch.zeros(0, 4), _rois(3, 32)])
    assert logits.shape == (3, 3) and deltas.shape == (3, 3, 4)
