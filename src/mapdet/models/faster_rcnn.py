"""torchvision Faster R-CNN models, for ``model.arch: faster_rcnn`` (no Selective Search).

:func:`build_faster_rcnn` returns a ``torchvision.models.detection.FasterRCNN`` with ``K + 1``
classes (background at 0, as torchvision counts them) on one of :data:`FASTER_RCNN_BACKBONES`:

- ``resnet50_fpn``, ``resnet50_fpn_v2``, ``mobilenet_v3_large_fpn``: torchvision's own
  builders (``fasterrcnn_*``); ``pretrained=True`` loads their ImageNet backbone weights
  (``weights_backbone``), frozen BatchNorm; from scratch: trainable BatchNorm.
- ``resnet18_fpn``: ``resnet_fpn_backbone("resnet18")`` in a ``FasterRCNN``, same rules.
- ``small``: :class:`~mapdet.models.backbones.SmallBackbone` (GroupNorm, stride 8, 128
  channels) as a single feature level, anchors 16..128 px, RoI max pooling 7x7 (as the
  project's Fast R-CNN; torchvision's CPU RoIAlign backward is ~14x slower than RoIPool's,
  see ``benchmarks/bench_faster_rcnn.py``), a 256-wide two-layer head: a from-scratch model
  small enough for CPU training on the digits benchmark.

The RPN's and the RoI heads' samplers are :class:`SeededSampler`: with
:func:`set_sampling_generators` each image draws its anchor and RoI sample from its own
generator (as the pipeline's Fast R-CNN does), so a minibatch split over DDP ranks samples
what one process with the whole minibatch samples; without generators they draw from the
global RNG, as torchvision's.

Pretrained weights offline raise :class:`~mapdet.models.backbones.PretrainedWeightsUnavailableError`
(naming the weights and the cache file) within 30 s instead of hanging.

The model normalises and resizes images itself (``GeneralizedRCNNTransform``): ``min_size``,
``max_size``, ``image_mean``, ``image_std``. Inputs already normalised by mapdet's data
pipeline pass ``image_mean=(0, 0, 0)``, ``image_std=(1, 1, 1)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from mapdet.models.backbones import SmallBackbone, fetch_weights
from mapdet.models.roi_pool import roi_pool

__all__ = [
    "FASTER_RCNN_BACKBONES",
    "SeededSampler",
    "SingleLevelRoIPool",
    "build_faster_rcnn",
    "set_sampling_generators",
]

FASTER_RCNN_BACKBONES = (
    "resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn", "resnet18_fpn", "small",
)  # fmt: skip


def _backbone_weights(name: str):
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights

    return {
        "resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
        "resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
        "mobilenet_v3_large_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "resnet18_fpn": ResNet18_Weights.IMAGENET1K_V1,
    }[name]


def build_faster_rcnn(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    **detector_kwargs,
) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` for ``num_classes`` foreground classes.

    Args:
        backbone: one of :data:`FASTER_RCNN_BACKBONES`.
        num_classes: ``K``; the model predicts ``K + 1`` classes (background 0, labels
            ``1..K``).
        pretrained: ImageNet backbone weights (not for ``small``).
        trainable_layers: backbone stages left trainable (torchvision's meaning; default 3
            when pretrained, all when not). Not for ``small``.
        min_size, max_size, image_mean, image_std: the model's image transform.
        **detector_kwargs: ``FasterRCNN`` options (``box_score_thresh``, ``box_nms_thresh``,
            ``box_detections_per_img``, ``rpn_post_nms_top_n_train``, ...).

    Raises:
        ValueError: unknown backbone, ``num_classes < 1``, an option that does not apply.
        PretrainedWeightsUnavailableError: ``pretrained=True`` offline without a cached file.
    """
    if backbone not in FASTER_RCNN_BACKBONES:
        raise ValueError(f"unknown Faster R-CNN backbone {backbone!r}; choose one of "
                         f"{list(FASTER_RCNN_BACKBONES)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 foreground classes, got {num_classes}")
    _check_detector_kwargs(detector_kwargs)
    kw = dict(detector_kwargs, min_size=min_size, max_size=max_size)
    if image_mean is not None:
        kw["image_mean"] = list(image_mean)
    if image_std is not None:
        kw["image_std"] = list(image_std)
    model = _build(backbone, num_classes, pretrained, trainable_layers, kw)
    for owner in (model.rpn, model.roi_heads):
        old = owner.fg_bg_sampler
        owner.fg_bg_sampler = SeededSampler(old.batch_size_per_image, old.positive_fraction)
    return model


def _build(backbone: str, num_classes: int, pretrained: bool, trainable_layers: int | None,
           kw: dict) -> FasterRCNN:
    if backbone == "small":
        if pretrained:
            raise ValueError("no pretrained weights for Faster R-CNN backbone 'small'; "
                             "use pretrained=False")
        if trainable_layers is not None:
            raise ValueError("trainable_layers does not apply to backbone 'small'")
        return _small_faster_rcnn(num_classes + 1, **kw)
    weights = _backbone_weights(backbone) if pretrained else None
    if weights is not None:
        _fetch_weights(backbone, weights)  # fail clearly before building
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    if backbone == "resnet18_fpn":
        norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
        body = resnet_fpn_backbone(backbone_name="resnet18", weights=weights, norm_layer=norm,
                                   trainable_layers=trainable_layers)
        return FasterRCNN(body, num_classes + 1, **kw)
    build = {"resnet50_fpn": fasterrcnn_resnet50_fpn,
             "resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
             "mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn}[backbone]
    if backbone == "mobilenet_v3_large_fpn":
        trainable_layers = min(trainable_layers, 6)
    return build(weights=None, weights_backbone=weights, num_classes=num_classes + 1,
                 trainable_backbone_layers=trainable_layers, **kw)


def _check_detector_kwargs(kwargs: dict) -> None:
    """``FasterRCNN`` swallows unknown keywords (``**kwargs``): name them here instead."""
    valid = [n for n, p in inspect.signature(FasterRCNN.__init__).parameters.items()
             if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]
    valid = sorted(set(valid) - {"self", "backbone", "num_classes", "min_size", "max_size",
                                 "image_mean", "image_std"})
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown FasterRCNN option {key!r}{hint}; valid: {valid}")


def _fetch_weights(backbone: str, weights) -> None:
    """Put ``weights`` in torch's hub cache (download with a timeout) or raise clearly."""
    fetch_weights(weights, f"Faster R-CNN backbone {backbone!r}")


def _small_faster_rcnn(num_classes: int, **kw) -> FasterRCNN:
    """The CPU-sized from-scratch model (see the module doc); ``num_classes`` counts the
    background."""
    body = SmallBackbone()
    anchors = AnchorGenerator(sizes=((16, 32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
    # FasterRCNN accepts only MultiScaleRoIAlign here; the RoI pooling is swapped in after.
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    head = TwoMLPHead(body.out_channels * 7 * 7, 256)
    model = FasterRCNN(_SingleLevel(body), num_classes=None, rpn_anchor_generator=anchors,
                       box_roi_pool=pool, box_head=head,
                       box_predictor=FastRCNNPredictor(256, num_classes), **kw)
    model.roi_heads.box_roi_pool = SingleLevelRoIPool(7, 1.0 / body.stride)
    return model


class _SingleLevel(nn.Module):
    """A backbone ``(B, 3, H, W) -> (B, C, h, w)`` as torchvision's one-level feature dict
    ``{"0": features}``, with the ``out_channels`` attribute ``FasterRCNN`` needs."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.out_channels = body.out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": self.body(x)}


class SingleLevelRoIPool(nn.Module):
    """RoI max pooling on the one feature level ``"0"``, with ``MultiScaleRoIAlign``'s call
    signature: ``(features {"0": (B, C, h, w)}, boxes [(R_b, 4)], image_shapes) ->
    (sum R_b, C, output_size, output_size)``, boxes in input pixels (``spatial_scale`` maps
    them to the feature map). Without autograd, on the CPU, the faster kernel of
    :mod:`mapdet.models.roi_pool` (same numbers as ``torchvision.ops.roi_pool``)."""

    def __init__(self, output_size: int, spatial_scale: float):
        super().__init__()
        self.output_size = int(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        return roi_pool(features["0"], boxes, self.output_size, self.spatial_scale)


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's positive/negative sampler; image ``b`` draws from ``generators[b]`` when
    :attr:`generators` is set (CPU ``torch.Generator`` s), else from the global RNG.

    ``__call__(matched_idxs [(A_b,)]) -> (pos_masks, neg_masks)``, uint8 masks as torchvision's:
    up to ``batch_size_per_image * positive_fraction`` positives (``>= 1``), the rest
    negatives (``== 0``), uniformly without replacement."""

    generators: list[torch.Generator] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]):
        gens = self.generators
        if gens is None:
            return super().__call__(matched_idxs)
        if len(gens) != len(matched_idxs):
            raise ValueError(f"SeededSampler: {len(gens)} generators for "
                             f"{len(matched_idxs)} images")
        pos_masks, neg_masks = [], []
        for m, g in zip(matched_idxs, gens, strict=True):
            positive = torch.where(m >= 1)[0]
            negative = torch.where(m == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), generator=g)[:num_pos].to(m.device)]
            neg = negative[torch.randperm(negative.numel(), generator=g)[:num_neg].to(m.device)]
            pm = torch.zeros_like(m, dtype=torch.uint8)
            nm = torch.zeros_like(m, dtype=torch.uint8)
            pm[pos] = 1
            nm[neg] = 1
            pos_masks.append(pm)
            neg_masks.append(nm)
        return pos_masks, neg_masks


def set_sampling_generators(model: nn.Module, generators: list[torch.Generator] | None) -> None:
    """Give the next forward's images their own sampling generators (``None``: global RNG).
    The RPN draws first, then the RoI heads, from the same per-image generator."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    for owner in (model.rpn, model.roi_heads):
        if isinstance(owner.fg_bg_sampler, SeededSampler):
            owner.fg_bg_sampler.generators = generators
