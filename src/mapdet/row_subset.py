"""Backward through a subset of rows: the mAP loss's gradient reaches few of the head's rows.

A RoI head maps each window (a row: one proposal's pooled features) to ``K+1`` class logits
and box deltas. The mAP loss sees every window, but its gradient ``G = dL/dprobs (N, K)``
is nonzero on few rows: a pseudo-partial is nonzero only where moving one score changes the
AP after NMS (on trained digits models from a few to a few hundred of 600 rows,
measured by `benchmarks/bench_faster_rcnn.py`), and the box-regression loss
beside it needs only the sampled foreground rows. A training step can therefore

1. score all ``N`` rows **without autograd** (no activations kept, no backward over them);
2. evaluate the loss on those scores and take its gradient ``G`` w.r.t. the probabilities
   (:func:`loss_and_grad`; the loss only ever sees the scores, so nothing is approximated);
3. recompute **with autograd** only the rows ``R = {i : G_i != 0}`` plus the rows the box
   loss needs, and hand autograd the surrogate (:func:`attach_grad`)

   ``L' = L + sum_{i in R} <p_i - sg(p_i), G_i>``    (``sg``: stop-gradient),

   whose value is ``L`` exactly (the bracket is exactly 0) and whose gradient w.r.t. the
   recomputed probabilities ``p_i`` is ``G_i``.

When the head's rows are **independent** (each output row a function of its own input row
and the parameters), the rows outside ``R`` contribute exactly zero to every parameter's
gradient in the full backward, so ``dL'/dtheta = dL/dtheta``, up to float rounding: the
recomputed rows come out of matrix products over fewer rows, which may sum in another order.

Rows are **not** independent in training mode when the head has BatchNorm using batch
statistics (torchvision's ``fasterrcnn_resnet50_fpn_v2`` box head, a ResNet C5 head trained
from scratch) or dropout (the two passes would draw different masks).
:func:`row_dependence` names such modules, and the callers then run the full path: one
forward with autograd over every row. A head whose rows interact in some other way (attention
across RoIs, say) is not recognised: switch the subset off for it (``sparse_backward=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["attach_grad", "loss_and_grad", "row_dependence", "rows_with_grad", "split_rows"]


def row_dependence(*modules: nn.Module) -> str | None:
    """Why the rows of these modules' batch are not computed independently, or ``None``.

    Looks for BatchNorm layers that normalise with batch statistics (training mode, or no
    running statistics) and dropout with ``p > 0`` in training mode, anywhere inside
    ``modules``. Returns a one-line reason naming the first such layer.
    """
    for top in modules:
        for name, mod in top.named_modules():
            label = f"{type(top).__name__}{'.' + name if name else ''}"
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
                    mod.training or not mod.track_running_stats):
                return (f"{label} ({type(mod).__name__}) normalises with the batch's statistics "
                        "in training mode")
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
                return f"{label} ({type(mod).__name__}, p={mod.p}) draws a random mask per pass"
    return None


def loss_and_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor],
                  probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, dL/dprobs)`` for ``L = loss_fn(probs)``, ``probs (N, K)`` taken as a leaf.

    ``loss_fn`` runs once, with autograd on (whatever the caller's mode); ``L`` is returned
    detached, the gradient has ``probs``' shape (zeros where the loss does not depend on an
    entry).
    """
    leaf = probs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf)
        if not loss.requires_grad:  # the loss does not depend on probs at all
            return loss.detach(), torch.zeros_like(leaf)
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


def rows_with_grad(grad: torch.Tensor) -> torch.Tensor:
    """Indices ``(R,)`` int64, ascending, of the rows of ``grad (N, K)`` with a nonzero entry."""
    return torch.nonzero((grad != 0).any(dim=1)).flatten()


def attach_grad(value: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The surrogate ``value + sum((probs - sg(probs)) * grad)``: equal to ``value`` bit for
    bit, with gradient ``grad`` w.r.t. ``probs`` (``(R, K)`` each, ``grad`` constant)."""
    term = ((probs - probs.detach()) * grad.to(probs.dtype)).sum()
    return value.to(probs.dtype) + term


def split_rows(rows: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Global row indices ``rows (R,)`` (ascending) of images with ``counts[b]`` rows each, as
    per-image local indices: a list of ``len(counts)`` int64 tensors."""
    bounds = torch.cumsum(torch.tensor([0, *counts], dtype=torch.int64), 0)
    rows = rows.to("cpu")
    lo = torch.searchsorted(rows, bounds[:-1])
    hi = torch.searchsorted(rows, bounds[1:])
    return [rows[a:b] - s for a, b, s in zip(lo.tolist(), hi.tolist(), bounds[:-1].tolist(),
                                             strict=True)]
