"""Fast R-CNN's multi-task loss: softmax cross-entropy plus class-specific smooth-L1.

Girshick, "Fast R-CNN", ICCV 2015, eq. (1)-(3): ``L = L_cls(p, u) + [u >= 1] L_loc(t^u, v)``,
with ``L_loc`` the smooth-L1 loss summed over the four coordinates of the ground-truth class's
deltas. As in the reference implementation, the box term is summed over foreground RoIs and
divided by the number of sampled RoIs (foreground and background), and the classification term
is the mean over all RoIs.

For mAP training, :class:`mapdet.MAPLoss` replaces the classification term and
:func:`box_regression_loss` stays beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["box_regression_loss", "fast_rcnn_loss"]


def box_regression_loss(
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    regression_targets: torch.Tensor,
    *,
    beta: float = 1.0,
    normalizer: int | None = None,
) -> torch.Tensor:
    """Smooth-L1 loss of the ground-truth class's deltas on the foreground RoIs.

    ``sum_{r: labels[r] > 0} smooth_l1(box_deltas[r, labels[r]] - regression_targets[r]) / n``
    with ``smooth_l1(x) = 0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``, summed
    over the 4 coordinates.

    Args:
        box_deltas: ``(S, K+1, 4)`` float, predicted class-specific deltas.
        labels: ``(S,)`` int64 in ``0..K`` (0 = background, no box loss).
        regression_targets: ``(S, 4)`` float, encoded targets (see ``box_coder.encode``).
        beta: smooth-L1 transition point (Fast R-CNN: 1, i.e. ``sigma = 1``).
        normalizer: ``n``; default ``S``, the number of RoIs (at least 1).

    Returns:
        Scalar tensor.
    """
    n = box_deltas.shape[0] if normalizer is None else normalizer
    fg = torch.nonzero(labels > 0).flatten()
    pred = box_deltas[fg, labels[fg]]
    loss = F.smooth_l1_loss(pred, regression_targets[fg].to(pred), beta=beta, reduction="sum")
    return loss / max(n, 1)


def fast_rcnn_loss(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    regression_targets: torch.Tensor,
    *,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Fast R-CNN's loss over sampled RoIs.

    Args:
        class_logits: ``(S, K+1)`` float, unnormalised class scores, background at column 0.
        box_deltas: ``(S, K+1, 4)`` float.
        labels: ``(S,)`` int64 in ``0..K`` (0 = background).
        regression_targets: ``(S, 4)`` float.
        beta: smooth-L1 transition point.

    Returns:
        ``{"loss_cls": mean cross-entropy, "loss_box": box_regression_loss(...)}``, scalars
        (both 0, still attached to the graph, when ``S == 0``). The total is their sum.
    """
    if class_logits.shape[0] == 0:
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box": zero.clone()}
    return {
        "loss_cls": F.cross_entropy(class_logits, labels),
        "loss_box": box_regression_loss(box_deltas, labels, regression_targets, beta=beta),
    }
