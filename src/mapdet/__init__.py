"""mapdet: train object detectors directly for mean average precision.

Implements Henderson & Ferrari, "End-to-end training of object class detectors for mean
average precision" (ACCV 2016): AP after NMS as the training measure, with exact
pseudo-gradients computed by a fast algorithm.

Public names:

- :func:`ap_after_nms`, :func:`ap_pseudo_gradient`: the detection function, AP and its
  pseudo-gradient for one class (numpy in, no torch needed).
- :func:`ap_blame`: pseudo-partials of every class's AP over a whole test set, and which
  detections cost the AP most (:class:`mapdet.core.blame.APBlame`).
- :func:`pseudo_gradient`: pseudo-gradients of any piecewise-constant function.
- :class:`MAPLoss`: the PyTorch loss.

Every name is imported on first use: ``import mapdet`` loads neither torch (``MAPLoss``) nor
numba (the core's compiled kernels), so that ``mapdet.core`` works without torch and the
evaluation of result files (``mapdet eval --voc``) starts fast.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MAPLoss": "mapdet.loss",
    "ap_after_nms": "mapdet.core.apnms",
    "ap_blame": "mapdet.core.blame",
    "ap_pseudo_gradient": "mapdet.core.apnms",
    "pseudo_gradient": "mapdet.core.pseudograd",
}

__all__ = ["MAPLoss", "ap_after_nms", "ap_blame", "ap_pseudo_gradient", "pseudo_gradient",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mapdet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
