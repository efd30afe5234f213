"""Which detections cost a test set's AP most, and by how much: pseudo-partials over a whole
test set, with a readable summary.

For every detection and class, the pseudo-partial of the class AP (docs/method.md,
section 3) points to the nearest score change that raises the AP; ``gain`` is the AP gained
there. A detection with a large negative partial is ranked too high (an FP above TPs, a
duplicate that should be suppressed...); a large positive one is ranked too low (a TP below
FPs, or a window whose raise would suppress an FP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mapdet.core.apnms import class_problems, solve_classes
from mapdet.defaults import NMS_IOU, SCORE_THRESHOLD

__all__ = ["APBlame", "ap_blame"]


@dataclass
class APBlame:
    """Pseudo-partials of every class's AP with respect to every detection's score.

    Attributes:
        aps: ``(K,)`` AP per class (NaN where no non-difficult ground truth).
        partials: ``(N, K)`` pseudo-partial of ``aps[c]`` along ``scores[n, c]``.
        gains: ``(N, K)`` AP gained at the nearest improvement the partial points to (0 where
            the partial is 0); the score move it needs is ``gains / |partials| - min_step``.
        scores: ``(N, K)`` the scores; ``image_ids``: ``(N,)``.
        min_step: the ``mu`` of the pseudo-partials.
    """

    aps: np.ndarray
    partials: np.ndarray
    gains: np.ndarray
    scores: np.ndarray
    image_ids: np.ndarray
    min_step: float

    @property
    def mean_ap(self) -> float:
        """Mean AP over the classes where it is defined (NaN if none)."""
        d = self.aps[~np.isnan(self.aps)]
        return float(d.mean()) if d.size else float("nan")

    def top(self, k: int = 10) -> list[tuple[int, int, float, float, float]]:
        """The ``k`` (detection, class) pairs with the largest AP gain, largest first:
        ``(index, class, score, partial, gain)``; the mAP gain is ``gain / #defined``."""
        flat = np.argsort(-self.gains, axis=None, kind="stable")[:k]
        out = []
        for f in flat:
            n, c = np.unravel_index(f, self.gains.shape)
            if self.gains[n, c] <= 0:
                break
            out.append((int(n), int(c), float(self.scores[n, c]), float(self.partials[n, c]),
                        float(self.gains[n, c])))
        return out

    def summary(self, k: int = 10, class_names: Sequence[str] | None = None) -> str:
        """A plain-text table of the ``k`` detections whose score change gains most AP."""
        names = class_names or [str(c) for c in range(self.aps.size)]
        lines = [f"mAP {self.mean_ap:.4f} over {int((~np.isnan(self.aps)).sum())} classes",
                 f"{'detection':>9} {'image':>6} {'class':>12} {'score':>7} {'move to':>9} "
                 f"{'AP gain':>8} {'partial':>10}"]
        for n, c, s, g, gain in self.top(k):
            step = gain / abs(g) - self.min_step
            target = s + step if g > 0 else s - step
            lines.append(f"{n:>9} {int(self.image_ids[n]):>6} {names[c][:12]:>12} {s:>7.4f} "
                         f"{target:>9.4f} {gain:>8.4f} {g:>10.3f}")
        return "\n".join(lines)


def ap_blame(
    scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids, gt_difficult=None, *,
    score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
    match_iou: float | Sequence[float] = 0.5, ap_method: str = "area",
    min_step: float = 1e-3, num_threads: int | None = None,
) -> APBlame:
    """Pseudo-partials of every class's AP over a whole test set (arguments as
    :func:`mapdet.core.apnms.ap_pseudo_gradient_multiclass`; with detections that are
    already post-processed, the default threshold and NMS leave them as they are when they
    were made with the same settings). Cost: near-linear in the number of detections."""
    problems = class_problems(scores, boxes, image_ids, gt_boxes, gt_labels, gt_image_ids,
                              gt_difficult, score_threshold=score_threshold, nms_iou=nms_iou,
                              match_iou=match_iou, ap_method=ap_method, min_step=min_step)
    aps, partials, gains = solve_classes(problems, num_threads)
    scores = np.asarray(scores, dtype=np.float64)
    return APBlame(aps=aps, partials=partials.reshape(scores.shape),
                   gains=gains.reshape(scores.shape), scores=scores,
                   image_ids=np.asarray(image_ids).reshape(-1), min_step=float(min_step))
