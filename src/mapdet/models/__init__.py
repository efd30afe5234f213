"""mapdet.models: Fast R-CNN (backbones, RoI head, box coder, RoI sampling, post-processing).

Boxes are ``xyxy`` float tensors in continuous pixel coordinates; ground-truth labels are
``0..K-1``; the network's softmax has ``K+1`` columns with background at 0.
"""

from mapdet.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectorParts,
    PretrainedWeightsUnavailableError,
    ResNetC5Head,
    SmallBackbone,
    TwoFCHead,
    build_backbone,
    build_backbone_and_head,
    build_roi_head,
    load_imagenet_state_dict,
)
from mapdet.models.box_coder import DEFAULT_WEIGHTS, clip_boxes, decode, encode
from mapdet.models.fast_rcnn import ROI_OPS, FastRCNN
from mapdet.models.losses import box_regression_loss, fast_rcnn_loss
from mapdet.models.postprocess import class_specific_boxes, detect
from mapdet.models.sampling import label_proposals, match_proposals, sample_rois

__all__ = [
    "BACKBONES",
    "DEFAULT_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ROI_OPS",
    "DetectorParts",
    "FastRCNN",
    "PretrainedWeightsUnavailableError",
    "ResNetC5Head",
    "SmallBackbone",
    "TwoFCHead",
    "box_regression_loss",
    "build_backbone",
    "build_backbone_and_head",
    "build_roi_head",
    "class_specific_boxes",
    "clip_boxes",
    "decode",
    "detect",
    "encode",
    "fast_rcnn_loss",
    "label_proposals",
    "load_imagenet_state_dict",
    "match_proposals",
    "sample_rois",
]
