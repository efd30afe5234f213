"""Diagnostics: ground-truth recall of a set of proposals.

Part of :mod:`mapdet.data.proposals` (see its docstring for the conventions).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mapdet.core.boxes import box_iou

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ProposalStats:
    """Ground-truth recall of a set of proposals.

    Attributes:
        recall: fraction of non-difficult ground-truth boxes with a proposal at
            ``IoU >= iou`` (NaN when there are none).
        num_gt: number of non-difficult ground-truth boxes.
        num_covered: how many of them are covered.
        mean_proposals: mean number of proposals per image.
        iou: the IoU threshold.
    """

    recall: float
    num_gt: int
    num_covered: int
    mean_proposals: float
    iou: float


def proposal_stats(
    proposals: Mapping[str, np.ndarray], dataset: Any, iou: float = 0.5
) -> ProposalStats:
    """Recall of the non-difficult ground truth of ``dataset`` by ``proposals``, and counts.

    Args:
        proposals: ``{image_id: (P, 4) xyxy}`` with every image id of the data set.
        dataset: records with ``image_id``, ``boxes (M, 4)`` xyxy and optionally
            ``difficult (M,)`` bool.
        iou: a ground-truth box is covered by a proposal with continuous IoU ``>= iou``.
    """
    num_gt = covered = 0
    counts = []
    for rec in dataset.records:
        if rec.image_id not in proposals:
            raise KeyError(f"no proposals for image {rec.image_id!r}")
        props = np.asarray(proposals[rec.image_id]).reshape(-1, 4)
        counts.append(len(props))
        gt = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
        difficult = getattr(rec, "difficult", None)
        if difficult is not None:
            gt = gt[~np.asarray(difficult, dtype=bool).reshape(-1)]
        num_gt += len(gt)
        if len(gt) and len(props):
            covered += int((box_iou(gt, props).max(axis=1) >= iou).sum())
    recall = covered / num_gt if num_gt else float("nan")
    mean = float(np.mean(counts)) if counts else 0.0
    return ProposalStats(recall, num_gt, covered, mean, float(iou))


def proposal_recall(proposals: Mapping[str, np.ndarray], dataset: Any, iou: float = 0.5) -> float:
    """Fraction of non-difficult ground-truth boxes covered by a proposal at ``IoU >= iou``.

    See :func:`proposal_stats`, which also gives the mean number of proposals per image.
    """
    return proposal_stats(proposals, dataset, iou).recall
