"""The defaults every layer shares, each written once.

The configuration's sections (:mod:`mapdet.config`), :class:`mapdet.MAPLoss`, the
post-processing (:func:`mapdet.models.postprocess.detect`) and the core's functions
(:func:`mapdet.ap_after_nms`, ...) take their default values from here, so the API and the
CLI run the same loss and the same test-time post-processing. A leaf: imports nothing.
"""

from __future__ import annotations

__all__ = ["AP_METHOD", "DIRECTION", "FORM", "MATCH_IOU", "MIN_STEP", "NMS_IOU", "NORMALIZATION",
           "SAMPLES", "SCORE_THRESHOLD", "SIGMA", "SMOOTHING"]

#: Fast R-CNN's test-time per-class score threshold: a candidate has ``score > 0.05``.
SCORE_THRESHOLD = 0.05
#: Fast R-CNN's per-class NMS threshold: suppression at ``IoU > 0.3``.
NMS_IOU = 0.3
#: PASCAL VOC's true-positive threshold: ``IoU >= 0.5``.
MATCH_IOU = 0.5
#: The AP's interpolation: ``area`` (VOC 2010+), ``voc07`` (11 points) or ``r101`` (COCO).
AP_METHOD = "area"
#: ``mu``: the smallest score step the pseudo-gradient's slopes divide by.
MIN_STEP = 1e-3
#: The pseudo-partial's rule (:mod:`mapdet.core.pseudograd`).
DIRECTION = "nearest_improvement"
#: The loss's form: ``1 - mAP``.
FORM = "one_minus"
#: The pseudo-gradient's scaling: unit L1 norm, so a learning rate does not depend on the
#: minibatch's number of windows, classes or ties (the mAP stage's recipe, docs/method.md).
NORMALIZATION = "l1"
#: The exact pseudo-gradient, no smoothing of the AP.
SMOOTHING = "none"
#: Smoothing's score noise and its number of draws (used only with a smoothing).
SIGMA = 0.03
SAMPLES = 8
