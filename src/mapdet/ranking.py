"""The field's ranking losses for detection, with their papers' error-driven backward.

Two losses that optimise AP-like measures of a flat list of (window, class) scores, without
NMS, each a :class:`torch.autograd.Function` whose backward is the paper's update rule (not
the derivative of its forward, which is piecewise constant):

- :func:`ap_loss`: AP-Loss (Chen et al., "Towards Accurate One-Stage Object Detection with
  AP-Loss", CVPR 2019). With ``x_ij = s_j - s_i`` and the step ``H`` interpolated over
  ``[-delta, delta]`` (:func:`step`), for a positive ``i``
  ``rank(i) = 1 + sum_{k in P, k != i} H(x_ik) + sum_{j in N} H(x_ij)`` and, for a negative
  ``j``, the pair's primary term ``L_ij = H(x_ij) / rank(i)``. The loss is
  ``(1/|P|) sum_{i in P} sum_{j in N} L_ij`` (``1 - AP`` when ``H`` is the exact step); the
  error-driven update gives ``dL/ds_i = -(1/|P|) sum_j L_ij`` to a positive and
  ``dL/ds_j = (1/|P|) sum_i L_ij`` to a negative. Published ``delta = 1``.
- :func:`rank_sort_loss`: Rank & Sort Loss (Oksuz et al., ICCV 2021), as in the authors'
  implementation: ``H`` as above with ``delta_RS`` (published 0.5), every positive's rank
  among the positives counting itself (``H(0)``); ranking error ``l_R(i) = N_FP(i) / rank(i)``,
  sorting error ``l_S(i)`` = the current mean of ``1 - y_j`` over the positives ranked above
  ``i`` minus its target (the same mean over those with ``y_j >= y_i``), ``y`` the IoU
  targets in ``[0, 1]``. The loss is ``mean_i l_R(i) + mean_i l_S(i)``; the update hands each
  positive ``-l_R(i) - l_S(i)`` and distributes ``l_R(i)`` over the negatives above it in
  proportion to ``H(x_ij)`` and ``l_S(i)`` over the mis-sorted positives above it (``y_j <
  y_i``) uniformly in ``H``, all divided by ``|P|``.

Scores are whatever the caller ranks by (the papers use the classifier's logits; on a
softmax detector, the log-odds of the class's probability rank as the probability does).
``labels`` are ``1`` (positive), ``0`` (negative) or ``-1`` (ignored: takes no part).
With no positive, both losses are 0 and give no gradient.

:func:`ap_loss_reference` and :func:`rank_sort_loss_reference` compute the same values and
updates pair by pair in plain Python loops, for the tests.
"""

from __future__ import annotations

import torch

__all__ = ["PrecomputedGradient", "ap_loss", "ap_loss_reference", "rank_sort_loss",
           "rank_sort_loss_reference", "step"]

#: Published interpolation widths.
AP_LOSS_DELTA = 1.0
RANK_SORT_DELTA = 0.5


def step(x: torch.Tensor, delta: float) -> torch.Tensor:
    """The step function interpolated over ``[-delta, delta]``: ``clamp(x / (2 delta) + 1/2,
    0, 1)``; ``delta = 0``: ``x >= 0`` (the exact step, ``H(0) = 1``)."""
    if delta > 0:
        return torch.clamp(x / (2.0 * delta) + 0.5, min=0.0, max=1.0)
    return (x >= 0).to(x.dtype)


def _check(scores: torch.Tensor, labels: torch.Tensor, delta: float) -> None:
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of the same length, got "
                         f"{tuple(scores.shape)} and {tuple(labels.shape)}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")


def _ap_loss_update(s: torch.Tensor, labels: torch.Tensor, delta: float):
    """(loss, d loss / d s) of AP-Loss, vectorised over the positives (see the module)."""
    grad = torch.zeros_like(s)
    pos = torch.nonzero(labels == 1).flatten()
    if pos.numel() == 0:
        return s.new_zeros(()), grad
    neg = torch.nonzero(labels == 0).flatten()
    # only negatives with H > 0 for some positive take part (the others have L_ij = 0)
    neg = neg[s[neg] > s[pos].min() - delta] if delta > 0 else neg[s[neg] >= s[pos].min()]
    sp = s[pos]
    h_pp = step(sp[None, :] - sp[:, None], delta)          # (P, P): H(x_ik)
    h_pp.fill_diagonal_(0.0)
    h_pn = step(s[neg][None, :] - sp[:, None], delta)      # (P, Nr): H(x_ij)
    rank = 1.0 + h_pp.sum(1) + h_pn.sum(1)
    pair = h_pn / rank[:, None]                            # L_ij
    n_pos = float(pos.numel())
    grad[pos] = -pair.sum(1) / n_pos
    grad[neg] = pair.sum(0) / n_pos
    return pair.sum() / n_pos, grad


def _rank_sort_update(s: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                      delta: float):
    """(loss, d loss / d s) of Rank & Sort Loss (see the module)."""
    grad = torch.zeros_like(s)
    pos = torch.nonzero(labels == 1).flatten()
    if pos.numel() == 0:
        return s.new_zeros(()), grad
    neg = torch.nonzero(labels == 0).flatten()
    neg = neg[s[neg] >= s[pos].min() - delta]
    sp, y = s[pos], targets[pos].to(s.dtype)
    h_pp = step(sp[None, :] - sp[:, None], delta)          # row i: H(s_j - s_i), j in P
    h_pn = step(s[neg][None, :] - sp[:, None], delta)      # row i: H(s_j - s_i), j in N
    rank_pos = h_pp.sum(1)
    fp = h_pn.sum(1)
    ranking = fp / (rank_pos + fp)
    current = (h_pp * (1.0 - y)[None, :]).sum(1) / rank_pos
    above_target = (y[None, :] >= y[:, None]).to(s.dtype) * h_pp
    target = (above_target * (1.0 - y)[None, :]).sum(1) / above_target.sum(1)
    sorting = current - target
    n_pos = float(pos.numel())
    g_pos = torch.zeros_like(sp)
    eps = 1e-10
    has_fp = fp > eps
    g_pos -= torch.where(has_fp, ranking, torch.zeros_like(ranking))
    g_neg = (h_pn * torch.where(has_fp, ranking / fp.clamp_min(eps),
                                torch.zeros_like(fp))[:, None]).sum(0)
    missorted = (y[None, :] < y[:, None]).to(s.dtype) * h_pp
    denom = missorted.sum(1)
    has_mis = denom > eps
    g_pos -= torch.where(has_mis, sorting, torch.zeros_like(sorting))
    g_pos += (missorted * torch.where(has_mis, sorting / denom.clamp_min(eps),
                                      torch.zeros_like(denom))[:, None]).sum(0)
    grad[pos] = g_pos / n_pos
    grad[neg] = g_neg / n_pos
    return ranking.mean() + sorting.mean(), grad


class PrecomputedGradient(torch.autograd.Function):
    """``forward(scores, loss, grad) -> loss``; the backward hands autograd the precomputed
    ``grad`` (an update rule's, or the mAP loss's scaled pseudo-gradient) for ``scores``."""

    @staticmethod
    def forward(ctx, scores, loss, grad):  # noqa: D102
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def ap_loss(scores: torch.Tensor, labels: torch.Tensor,
            delta: float = AP_LOSS_DELTA) -> torch.Tensor:
    """AP-Loss of a flat list (module docstring).

    Args:
        scores: ``(M,)`` float, the ranking scores (logits).
        labels: ``(M,)`` int, ``1`` positive, ``0`` negative, ``-1`` ignored.
        delta: the step's interpolation width (AP-Loss: 1).

    Returns:
        A scalar whose backward is AP-Loss's error-driven update.
    """
    _check(scores, labels, delta)
    with torch.no_grad():
        value, grad = _ap_loss_update(scores.detach(), labels, float(delta))
    return PrecomputedGradient.apply(scores, value, grad)


def rank_sort_loss(scores: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                   delta: float = RANK_SORT_DELTA) -> torch.Tensor:
    """Rank & Sort Loss of a flat list (module docstring).

    Args:
        scores: ``(M,)`` float, the ranking scores (logits).
        labels: ``(M,)`` int, ``1`` positive, ``0`` negative, ``-1`` ignored.
        targets: ``(M,)`` float in ``[0, 1]``, the sorting targets of the positives (the IoU
            of their predicted boxes with their ground truth); ignored elsewhere.
        delta: ``delta_RS`` (RS Loss: 0.5).

    Returns:
        A scalar (``L_R + L_S``) whose backward is RS Loss's update.
    """
    _check(scores, labels, delta)
    if targets.shape != scores.shape:
        raise ValueError(f"targets must have the scores' shape {tuple(scores.shape)}, got "
                         f"{tuple(targets.shape)}")
    with torch.no_grad():
        value, grad = _rank_sort_update(scores.detach(), labels, targets.detach(), float(delta))
    return PrecomputedGradient.apply(scores, value, grad)


# -- references: the definitions, pair by pair ------------------------------------------------
def _h(x: float, delta: float) -> float:
    if delta > 0:
        return min(1.0, max(0.0, x / (2.0 * delta) + 0.5))
    return 1.0 if x >= 0 else 0.0


def ap_loss_reference(scores, labels, delta: float = AP_LOSS_DELTA) -> tuple[float, list[float]]:
    """AP-Loss's value and update by the definition, in plain Python (for tests)."""
    s, lab = [float(v) for v in scores], [int(v) for v in labels]
    P = [i for i, v in enumerate(lab) if v == 1]
    N = [j for j, v in enumerate(lab) if v == 0]
    grad = [0.0] * len(s)
    if not P:
        return 0.0, grad
    loss = 0.0
    for i in P:
        rank = 1.0 + sum(_h(s[k] - s[i], delta) for k in P if k != i)
        rank += sum(_h(s[j] - s[i], delta) for j in N)
        for j in N:
            lij = _h(s[j] - s[i], delta) / rank
            loss += lij
            grad[i] -= lij
            grad[j] += lij
    return loss / len(P), [g / len(P) for g in grad]


def rank_sort_loss_reference(scores, labels, targets,
                             delta: float = RANK_SORT_DELTA) -> tuple[float, list[float]]:
    """RS Loss's value and update by the definition, one positive at a time (for tests)."""
    s, lab, y = [float(v) for v in scores], [int(v) for v in labels], [float(v) for v in targets]
    P = [i for i, v in enumerate(lab) if v == 1]
    N = [j for j, v in enumerate(lab) if v == 0]
    grad = [0.0] * len(s)
    if not P:
        return 0.0, grad
    l_r, l_s = 0.0, 0.0
    for i in P:
        rank_pos = sum(_h(s[j] - s[i], delta) for j in P)
        fp = sum(_h(s[j] - s[i], delta) for j in N)
        ranking = fp / (rank_pos + fp)
        current = sum(_h(s[j] - s[i], delta) * (1 - y[j]) for j in P) / rank_pos
        above = [j for j in P if y[j] >= y[i]]
        target = (sum(_h(s[j] - s[i], delta) * (1 - y[j]) for j in above)
                  / sum(_h(s[j] - s[i], delta) for j in above))
        sorting = current - target
        l_r += ranking
        l_s += sorting
        if fp > 1e-10:
            grad[i] -= ranking
            for j in N:
                grad[j] += _h(s[j] - s[i], delta) * ranking / fp
        mis = [j for j in P if y[j] < y[i]]
        denom = sum(_h(s[j] - s[i], delta) for j in mis)
        if denom > 1e-10:
            grad[i] -= sorting
            for j in mis:
                grad[j] += _h(s[j] - s[i], delta) * sorting / denom
    n = len(P)
    return l_r / n + l_s / n, [g / n for g in grad]
