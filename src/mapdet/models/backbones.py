"""Convolutional backbones and RoI heads for Fast R-CNN.

Three designs, named by a string:

- ``"vgg16"``: torchvision's VGG16 ``features`` up to ``conv5_3`` + ReLU, without the last
  max-pool (stride 16, 512 channels); RoI head = two fully connected layers (``fc6``, ``fc7``,
  4096 wide as in Fast R-CNN) on a 7x7 RoI, initialised from VGG16's classifier when
  pretrained.
- ``"resnet50_c4"``: ResNet-50 ``conv1 .. layer3`` (stride 16, 1024 channels); RoI head =
  ``layer4`` on a 14x14 RoI followed by global average pooling (2048 features), as in the
  Faster R-CNN C4 design.
- ``"small"``: a CPU-friendly CNN for the embedded digits benchmark: three stages of two 3x3
  convolutions with GroupNorm (32, 64, 128 channels, stride 8, about 0.29M parameters); RoI head
  = two fully connected layers (256 wide by default) on a 7x7 RoI.

A RoI head is any ``nn.Module`` mapping pooled RoI features ``(R, C, P, P)`` to ``(R, D)`` that
carries two attributes, ``pool_size = P`` and ``out_dim = D`` (see :class:`TwoFCHead`,
:class:`ResNetC5Head`); :class:`mapdet.models.FastRCNN` accepts any such module.

Pretrained ImageNet weights come through torchvision's weights API (``VGG16_Weights.
IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V1``), which caches them under
``$TORCH_HOME/hub/checkpoints``. Without network access and without a cached file,
:class:`PretrainedWeightsUnavailableError` says so instead of hanging. Those weights expect RGB
images in ``[0, 1]`` normalised with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectorParts",
    "fetch_weights",
    "PretrainedWeightsUnavailableError",
    "ResNetC5Head",
    "SmallBackbone",
    "TwoFCHead",
    "build_backbone",
    "build_backbone_and_head",
    "build_roi_head",
    "load_imagenet_state_dict",
]

BACKBONES = ("vgg16", "resnet50_c4", "small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DOWNLOAD_TIMEOUT_S = 30.0
# Index of the first module of each VGG16 conv block in ``features`` (block k ends with a pool).
_VGG16_BLOCK_STARTS = (0, 5, 10, 17, 24)
_VGG16_CONV5_3_RELU_END = 30  # features[:30] ends with relu5_3; features[30] is pool5.
_FREEZE_MESSAGE = "freeze_at must be in 0..{n} for {name!r}, got {freeze_at}"


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained ImageNet weights could be neither found in the cache nor downloaded."""


@dataclass
class DetectorParts:
    """What :func:`build_backbone_and_head` returns.

    Attributes:
        backbone: ``(B, 3, H, W) -> (B, out_channels, ~H/stride, ~W/stride)``.
        out_channels: channels of the backbone's feature map.
        stride: the feature map's stride in input pixels (RoI ``spatial_scale = 1 / stride``).
        head: RoI head ``(R, out_channels, pool_size, pool_size) -> (R, head.out_dim)``, or
            ``None`` when built with ``with_head=False``.
    """

    backbone: nn.Module
    out_channels: int
    stride: int
    head: nn.Module | None


# ----------------------------------------------------------------------------- weights


def _weights_enum(name: str):
    if name == "vgg16":
        return torchvision.models.VGG16_Weights.IMAGENET1K_V1
    if name == "resnet50_c4":
        return torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    raise ValueError(f"no pretrained ImageNet weights for backbone {name!r}; use pretrained=False")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Temporarily bound blocking socket operations so an offline download fails, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The torchvision ImageNet state dict of the classifier behind backbone ``name``.

    Uses the file cached under ``$TORCH_HOME/hub/checkpoints`` when present, else downloads it
    (with a socket timeout of 30 s).

    Args:
        name: ``"vgg16"`` (``VGG16_Weights.IMAGENET1K_V1``) or ``"resnet50_c4"``
            (``ResNet50_Weights.IMAGENET1K_V1``).

    Raises:
        PretrainedWeightsUnavailableError: no cached file and the download failed (offline).
        ValueError: ``name`` has no pretrained weights.
    """
    return fetch_weights(_weights_enum(name), f"backbone {name!r}")


def fetch_weights(weights, what: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision ``weights`` (a ``WeightsEnum`` member): the file cached
    under ``$TORCH_HOME/hub/checkpoints`` when present, else a download with a 30 s socket
    timeout. ``what`` names the model part in the error.

    Raises:
        PretrainedWeightsUnavailableError: no cached file and the download failed (offline).
    """
    file_name = os.path.basename(urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(
                weights.url, progress=False, check_hash=True, map_location="cpu"
            )
    except OSError as err:  # URLError, HTTPError, socket timeouts, unreachable network
        raise PretrainedWeightsUnavailableError(
            f"pretrained ImageNet weights for {what} ({weights!r}) are not available: "
            f"no cached file at {cached} and the download from {weights.url} failed ({err}). "
            f"Set `pretrained: false` in the model config to train from scratch, or point "
            f"TORCH_HOME at a directory whose hub/checkpoints/ holds {file_name}."
        ) from err


# ----------------------------------------------------------------------------- heads


class TwoFCHead(nn.Module):
    """Fast R-CNN's RoI head: flatten, ``fc6`` + ReLU + dropout, ``fc7`` + ReLU + dropout.

    Maps pooled RoI features ``(R, in_channels, pool_size, pool_size)`` to ``(R, fc_dim)``.

    Args:
        in_channels: channels of the pooled features.
        pool_size: side of the RoI pooling grid (7 in Fast R-CNN).
        fc_dim: width of both fully connected layers (4096 in Fast R-CNN's VGG16).
        dropout: dropout probability after each layer (0.5 in Fast R-CNN).
    """

    def __init__(self, in_channels: int, pool_size: int, fc_dim: int, dropout: float = 0.5):
        super().__init__()
        self.pool_size = pool_size
        self.out_dim = fc_dim
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (R, C, P, P) -> (R, fc_dim)``."""
        x = self.dropout(torch.relu(self.fc6(x.flatten(1))))
        return self.dropout(torch.relu(self.fc7(x)))


class ResNetC5Head(nn.Module):
    """ResNet C4 RoI head: ``layer4`` (stride 2) then global average pooling.

    Maps pooled RoI features ``(R, 1024, 14, 14)`` to ``(R, 2048)``.
    """

    def __init__(self, layer4: nn.Module, pool_size: int = 14, out_dim: int = 2048):
        super().__init__()
        self.pool_size = pool_size
        self.out_dim = out_dim
        self.layer4 = layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (R, 1024, P, P) -> (R, 2048)``."""
        return self.layer4(x).mean(dim=(2, 3))


# ----------------------------------------------------------------------------- small


def _conv_gn_relu(c_in: int, c_out: int, stride: int, groups: int = 8) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    ]


class SmallBackbone(nn.Sequential):
    """A small CNN for CPU training: stages of two 3x3 conv + GroupNorm + ReLU.

    The first convolution of each stage has stride 2, so ``len(widths)`` stages give stride
    ``2 ** len(widths)``. Default ``widths=(32, 64, 128)``: stride 8, 128 channels, 287,456
    parameters. ``(B, 3, H, W) -> (B, widths[-1], ceil(H/8), ceil(W/8))``.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        stages = []
        c_in = 3
        for width in widths:
            stages.append(
                nn.Sequential(*_conv_gn_relu(c_in, width, 2), *_conv_gn_relu(width, width, 1))
            )
            c_in = width
        super().__init__(*stages)
        self.out_channels = c_in
        self.stride = 2 ** len(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# ----------------------------------------------------------------------------- builders


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)


def _check_freeze(name: str, freeze_at: int, n: int) -> None:
    if not 0 <= freeze_at <= n:
        raise ValueError(_FREEZE_MESSAGE.format(n=n, name=name, freeze_at=freeze_at))


def _init_vgg_(module: nn.Module) -> None:
    """torchvision's VGG initialisation, for training from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _build_vgg16(
    pretrained: bool, freeze_at: int, fc_dim: int | None, dropout: float, with_head: bool
):
    _check_freeze("vgg16", freeze_at, len(_VGG16_BLOCK_STARTS))
    fc_dim = 4096 if fc_dim is None else fc_dim
    if pretrained and fc_dim != 4096:
        raise ValueError(f"pretrained VGG16 heads are 4096 wide (fc6/fc7), got fc_dim={fc_dim}")
    state = load_imagenet_state_dict("vgg16") if pretrained else None  # fail before building
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    features = features[:_VGG16_CONV5_3_RELU_END]
    _init_or_load_(features, state, {"": "features."})
    frozen_end = (*_VGG16_BLOCK_STARTS, _VGG16_CONV5_3_RELU_END)[freeze_at]
    _freeze(features[:frozen_end])
    head = None
    if with_head:  # fc6 alone has 103M parameters: only build it when asked
        head = TwoFCHead(512, 7, fc_dim, dropout)
        _init_or_load_(head, state, {"fc6.": "classifier.0.", "fc7.": "classifier.3."})
    return DetectorParts(features, 512, 16, head)


def _init_or_load_(
    module: nn.Module, state: dict[str, torch.Tensor] | None, prefixes: dict[str, str]
) -> None:
    """Load ``state`` renamed by ``prefixes`` (ours -> torchvision's), or VGG-initialise."""
    if state is None:
        _init_vgg_(module)
        return
    renamed = {
        ours + k[len(theirs) :]: v
        for ours, theirs in prefixes.items()
        for k, v in state.items()
        if k.startswith(theirs)
    }
    module.load_state_dict(renamed)


def _build_resnet50_c4(pretrained: bool, freeze_at: int, fc_dim: int | None):
    _check_freeze("resnet50_c4", freeze_at, 4)
    if fc_dim is not None:
        raise ValueError("fc_dim does not apply to 'resnet50_c4' (its RoI head is layer4)")
    state = load_imagenet_state_dict("resnet50_c4") if pretrained else None
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = torchvision.models.resnet50(weights=None, norm_layer=norm)
    if state is not None:
        net.load_state_dict(state)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3]
    for stage in stages[:freeze_at]:
        _freeze(stage)
    backbone = nn.Sequential(*stages)
    return DetectorParts(backbone, 1024, 16, ResNetC5Head(net.layer4))


def _build_small(pretrained: bool, freeze_at: int, fc_dim: int | None, dropout: float):
    if pretrained:
        raise ValueError("no pretrained weights for backbone 'small'; use pretrained=False")
    backbone = SmallBackbone()
    _check_freeze("small", freeze_at, len(backbone))
    for stage in list(backbone)[:freeze_at]:
        _freeze(stage)
    head = TwoFCHead(backbone.out_channels, 7, 256 if fc_dim is None else fc_dim, dropout)
    return DetectorParts(backbone, backbone.out_channels, backbone.stride, head)


def build_backbone_and_head(
    name: str,
    *,
    pretrained: bool = False,
    freeze_at: int | None = None,
    fc_dim: int | None = None,
    dropout: float = 0.5,
    with_head: bool = True,
) -> DetectorParts:
    """Backbone and matching RoI head of design ``name``, loading pretrained weights once.

    Args:
        name: one of :data:`BACKBONES`.
        pretrained: initialise from torchvision's ImageNet weights (``vgg16``: features and
            ``fc6``/``fc7``; ``resnet50_c4``: all layers, with frozen BatchNorm statistics).
        freeze_at: number of leading stages whose parameters get ``requires_grad=False``
            (``vgg16``: conv blocks, 0..5; ``resnet50_c4``: stem, layer1, layer2, layer3, 0..4;
            ``small``: stages, 0..3). ``None``: as in Fast R-CNN, 2 (``conv1``, ``conv2`` for
            VGG16; stem and ``layer1`` for ResNet) when ``pretrained``, else 0.
        fc_dim: width of the fully connected head (``vgg16``: 4096, ``small``: 256 by
            default; not applicable to ``resnet50_c4``).
        dropout: dropout probability of the fully connected head (unused by ``resnet50_c4``).
        with_head: ``False`` skips the RoI head (``head=None``); VGG16's alone is 120M
            parameters.

    Raises:
        ValueError: unknown ``name`` or inapplicable options.
        PretrainedWeightsUnavailableError: ``pretrained=True`` offline without a cached file.
    """
    if freeze_at is None:
        freeze_at = 2 if pretrained else 0
    if name == "vgg16":
        return _build_vgg16(pretrained, freeze_at, fc_dim, dropout, with_head)
    if name == "resnet50_c4":
        return _build_resnet50_c4(pretrained, freeze_at, fc_dim)
    if name == "small":
        return _build_small(pretrained, freeze_at, fc_dim, dropout)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def build_backbone(
    name: str, *, pretrained: bool = False, freeze_at: int | None = None
) -> tuple[nn.Module, int, int]:
    """Backbone ``name`` as ``(module, out_channels, stride)``.

    ``module`` maps images ``(B, 3, H, W)`` to features ``(B, out_channels, ~H/stride,
    ~W/stride)``: ``vgg16`` (512, 16), ``resnet50_c4`` (1024, 16), ``small`` (128, 8).
    See :func:`build_backbone_and_head` for the arguments.
    """
    parts = build_backbone_and_head(
        name, pretrained=pretrained, freeze_at=freeze_at, with_head=False
    )
    return parts.backbone, parts.out_channels, parts.stride


def build_roi_head(
    name: str, *, pretrained: bool = False, fc_dim: int | None = None, dropout: float = 0.5
) -> nn.Module:
    """RoI head of design ``name``: ``(R, C, P, P) -> (R, head.out_dim)``, ``P = head.pool_size``.

    ``vgg16``: :class:`TwoFCHead` (7, 4096); ``resnet50_c4``: :class:`ResNetC5Head` (14, 2048);
    ``small``: :class:`TwoFCHead` (7, 256). See :func:`build_backbone_and_head`.
    """
    return build_backbone_and_head(name, pretrained=pretrained, fc_dim=fc_dim, dropout=dropout).head
