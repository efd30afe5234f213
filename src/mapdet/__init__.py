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
- :class:`MAPLoss`: the PyTorch loss (imported lazily, so ``mapdet.core`` works without torch).
"""

from mapdet.core.apnms import ap_after_nms, ap_pseudo_gradient
from mapdet.core.blame import ap_blame
from mapdet.core.pseudograd import pseudo_gradient

__version__ = "0.1.0"

__all__ = ["MAPLoss", "ap_after_nms", "ap_blame", "ap_pseudo_gradient", "pseudo_gradient",
           "__version__"]


def __getattr__(name: str):
    if name == "MAPLoss":
        from mapdet.loss import MAPLoss

        return MAPLoss
    raise AttributeError(f"module 'mapdet' has no attribute {name!r}")
