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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparsePlan", "attach_grad", "loss_and_grad", "plan_sparse_step", "row_dependence",
           "rows_with_grad", "split_rows"]


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


@dataclass(frozen=True)
class SparsePlan:
    """The mAP step's loss on every window, and the head rows to recompute with autograd.

    Made by :func:`plan_sparse_step` from the scores of every row (taken without autograd);
    :meth:`loss` attaches the gradient to the recomputed rows' logits.

    Attributes:
        value: ``()`` the loss on every window, detached.
        windows: ``(G,)`` int64, ascending: the windows with a nonzero gradient.
        grad: ``(G, K)``: the loss's gradient w.r.t. those windows' probabilities.
        need: ``(R,)`` int64, ascending, unique: the head rows to recompute (the windows'
            rows and the extra rows); never empty when the head has rows, so that every
            head parameter stays in the graph (DistributedDataParallel).
        window_at: ``(G,)`` positions of the windows' rows in ``need``.
        extra_at: ``(E,)`` positions of the extra rows (e.g. the box loss's) in ``need``.
    """

    value: torch.Tensor
    windows: torch.Tensor
    grad: torch.Tensor
    need: torch.Tensor
    window_at: torch.Tensor
    extra_at: torch.Tensor

    def loss(self, sub_logits: torch.Tensor) -> torch.Tensor:
        """The loss (value exactly :attr:`value`) with its gradient on ``sub_logits (R, K+1)``,
        the recomputed rows :attr:`need`' class logits (background first): the foreground
        softmax probabilities of the windows' rows carry :attr:`grad` (:func:`attach_grad`)."""
        sub_probs = F.softmax(sub_logits[self.window_at], dim=1)[:, 1:]
        return attach_grad(self.value, sub_probs, self.grad)


def plan_sparse_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], probs: torch.Tensor, *,
                     extra_rows: torch.Tensor, num_rows: int,
                     window_rows: torch.Tensor | None = None,
                     no_grad_mask: torch.Tensor | None = None) -> SparsePlan:
    """Steps 2 and 3 of the module doc for one minibatch: the loss and its gradient on every
    window, and which head rows to recompute.

    Args:
        loss_fn: ``probs (W, K) -> scalar`` (e.g. a :class:`mapdet.MAPLoss` call).
        probs: ``(W, K)`` foreground probabilities of every window, scored without autograd.
        extra_rows: ``(E,)`` int64 head rows needed besides (the box loss's sample).
        num_rows: how many rows the head scored (``>= W``).
        window_rows: ``(W,)`` int64: window ``i``'s head row (``None``: row ``i``).
        no_grad_mask: ``(W, K)`` bool: entries whose gradient is dropped (pairs the loss
            only saw at a fixed score).
    """
    value, grad = loss_and_grad(loss_fn, probs)
    if no_grad_mask is not None:
        grad = grad.masked_fill(no_grad_mask, 0.0)
    windows = rows_with_grad(grad)
    rows = windows if window_rows is None else window_rows[windows]
    need = torch.unique(torch.cat([rows, extra_rows]))  # ascending
    if need.numel() == 0 and num_rows:
        need = torch.zeros(1, dtype=torch.int64, device=probs.device)
    return SparsePlan(value=value, windows=windows, grad=grad[windows], need=need,
                      window_at=torch.searchsorted(need, rows),
                      extra_at=torch.searchsorted(need, extra_rows))
