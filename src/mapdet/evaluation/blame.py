"""Which detections cost the test AP most: ``mapdet eval ... --blame [K]``.

After an evaluation, every detection's pseudo-partial of its class AP is computed over the
whole test set with :func:`mapdet.ap_blame` (docs/method.md, section 3): for detection ``d``
of class ``c`` with score ``s_d``, the partial points to the nearest score change that raises
``AP_c`` (up: ``d`` is ranked too low; down: too high) and ``gain`` is the AP gained there.
With ``delta`` the score distance to that breakpoint (another detection's score ``s_b``;
``d`` must pass every detection scoring exactly ``s_b``) and ``mu = min_step``::

    partial = +-gain / (delta + mu),    mAP gain = gain / |C'|

(``C'``: the classes with a defined AP). The ``K`` detections with the largest gain are
reported, largest first (ties: class order, then the detection's position in its class).

The detections are blamed **as scored**: the evaluation counts every detection it is given,
with no threshold and no NMS, so the AP whose partials are taken is the evaluated AP
(checked: a class whose AP differs from the evaluation's by more than ``1e-9`` is named in a
warning). Moving a detection then reorders its class's list; nothing is suppressed.

Devkit arithmetic: the core scores continuous boxes with ``IoU >= theta``. Devkit boxes
(1-based, ``+1`` widths, ``IoU > 0.5``) are handed over as ``[x1 - 1, y1 - 1, x2, y2]``
with ``theta = nextafter(0.5, 1)``, which gives the devkit's widths and strict test
(bit-exact for integer and float32 coordinates; the AP check above catches any other case).

numba (the core's kernels) is imported only here, on first use.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["BlameEntry", "BlameReport", "blame_classes"]

logger = logging.getLogger("mapdet.evaluation.blame")

#: Relative agreement required between the blamed AP and the evaluated AP.
AP_CHECK_TOL = 1e-9


@dataclass(frozen=True)
class BlameEntry:
    """One blamed detection.

    Attributes:
        image_id: its image; ``cls``: its class name.
        index: its position among its class's detections (0-based; in a result file, the
            ``index + 1``-th detection line).
        score: its score; ``box``: its box as given (``box_format`` of the report).
        partial: the pseudo-partial of the class AP along its score (> 0: raise it).
        ap_gain, map_gain: the class AP and the mAP gained at the nearest improvement.
        move_to: the breakpoint score it must pass (strictly above when ``partial > 0``,
            strictly below otherwise).
    """

    image_id: str
    cls: str
    index: int
    score: float
    box: tuple[float, float, float, float]
    partial: float
    ap_gain: float
    map_gain: float
    move_to: float

    @property
    def action(self) -> str:
        """``"raise above"`` or ``"lower below"``."""
        return "raise above" if self.partial > 0 else "lower below"

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "class": self.cls, "index": self.index,
                "score": self.score, "box": list(self.box), "partial": self.partial,
                "ap_gain": self.ap_gain, "map_gain": self.map_gain,
                "action": self.action.split()[0], "move_to": self.move_to}


@dataclass
class BlameReport:
    """The ``K`` detections that cost the test AP most, and what was blamed.

    Attributes:
        entries: the blamed detections, largest gain first (at most ``k``; only those whose
            move gains AP).
        aps: class name -> AP of the blamed lists (NaN: undefined), equal to the evaluation's.
        metric, convention: as the evaluation's; ``box_format``: ``"raw"`` (1-based, as in
            devkit result files) or ``"continuous"``.
        min_step: ``mu``; ``k``: how many were asked for; ``num_detections``: how many
            were blamed.
    """

    entries: list[BlameEntry]
    aps: dict[str, float]
    metric: str
    convention: str
    box_format: str
    min_step: float
    k: int
    num_detections: int
    files: list[Path] = field(default_factory=list)

    @property
    def mAP(self) -> float:  # noqa: N802 - the name used everywhere
        defined = [v for v in self.aps.values() if not math.isnan(v)]
        return float(np.mean(defined)) if defined else float("nan")

    def to_json(self) -> dict:
        return {"mAP": None if math.isnan(self.mAP) else self.mAP, "metric": self.metric,
                "convention": self.convention, "box_format": self.box_format,
                "min_step": self.min_step, "k": self.k,
                "num_detections": self.num_detections,
                "per_class": {c: None if math.isnan(v) else v for c, v in self.aps.items()},
                "detections": [e.to_json() for e in self.entries]}

    def table(self, limit: int | None = None) -> str:
        """A fixed-width table of the first ``limit`` entries (all by default)."""
        from mapdet.evaluation.table import format_table

        rows = [(i + 1, e.image_id, e.cls, f"{e.score:.4f}", f"{e.action} {e.move_to:.4f}",
                 f"{100 * e.ap_gain:+.3f}", f"{100 * e.map_gain:+.4f}", f"{e.partial:.4g}",
                 " ".join(f"{v:g}" for v in e.box))
                for i, e in enumerate(self.entries[:limit])]
        head = (f"{self.metric} mAP {100 * self.mAP:.2f}: the {len(self.entries)} of "
                f"{self.num_detections:,} detections whose score change gains most "
                f"(AP in points; min_step {self.min_step:g}; box {self.box_format})")
        if not rows:
            return head + "\nno detection's score change raises the AP"
        return head + "\n" + format_table(
            rows, ["#", "image", "class", "score", "move", "AP gain", "mAP gain", "partial",
                   "box"])

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``blame.json`` and ``blame.txt`` (the table) atomically into ``folder``."""
        from mapdet.io import atomic_write_text

        folder = Path(folder)
        self.files = [
            atomic_write_text(folder / "blame.json", json.dumps(self.to_json(), indent=2)
                              + "\n"),
            atomic_write_text(folder / "blame.txt", self.table() + "\n"),
        ]
        return self.files


def _to_continuous(boxes: np.ndarray, devkit: bool) -> np.ndarray:
    if not devkit:
        return boxes
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    out[:, :2] -= 1.0
    return out


def blame_classes(
    class_names: Sequence[str],
    classes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, object]],
    image_ids: Sequence[str],
    evaluated: dict[str, float],
    *,
    metric: str,
    convention: str,
    match_iou: float = 0.5,
    k: int = 20,
    min_step: float = 1e-3,
    box_format: str | None = None,
    boxes_out: Sequence[np.ndarray] | None = None,
) -> BlameReport:
    """Pseudo-partials of every detection, the ``k`` that gain most (see the module docstring).

    Args:
        class_names: the ``K`` classes.
        classes: per class ``(image (D,) int64 index into image_ids, scores (D,), boxes (D, 4)
            in the convention's format, ground truth)``, the ground truth a
            :class:`~mapdet.evaluation.voc_scoring.ClassGroundTruth` in the same format.
        image_ids: the evaluated images' ids.
        evaluated: class name -> the evaluation's AP (checked against the blamed AP).
        metric: ``"voc07"`` or ``"area"``; ``convention``: ``"devkit"`` or ``"continuous"``.
        match_iou: the nominal IoU threshold.
        k: how many detections to report.
        min_step: ``mu``.
        box_format: how boxes are reported (default: ``"raw"`` in devkit convention).
        boxes_out: per class, the boxes to report (default: those of ``classes``).
    """
    from mapdet.core.blame import ap_blame  # numba: only when blaming
    from mapdet.evaluation.voc_scoring import devkit_threshold

    devkit = convention == "devkit"
    theta = devkit_threshold(match_iou) if devkit else float(match_iou)
    aps: dict[str, float] = {}
    rows = []  # (gain, class, index, partial)
    blamed: list[tuple[np.ndarray, np.ndarray]] = []
    total = 0
    for c, (name, (image, scores, boxes, gt)) in enumerate(
            zip(class_names, classes, strict=True)):
        scores = np.asarray(scores, dtype=np.float64)
        total += scores.size
        b = ap_blame(scores[:, None], _to_continuous(boxes, devkit), image,
                     _to_continuous(gt.boxes, devkit), np.zeros(gt.image.size, dtype=np.int64),
                     gt.image, gt.difficult, score_threshold=-np.inf, nms_iou=1.0,
                     match_iou=theta, ap_method=metric, min_step=min_step, num_threads=1)
        aps[name] = float(b.aps[0])
        ev = evaluated.get(name, float("nan"))
        if not ((math.isnan(ev) and math.isnan(aps[name]))
                or abs(ev - aps[name]) <= AP_CHECK_TOL * max(1.0, abs(ev))):
            logger.warning("class %s: the blamed AP %.12g differs from the evaluated %.12g "
                           "(box arithmetic); its partials are those of the blamed AP",
                           name, aps[name], ev)
        gains, partials = b.gains[:, 0], b.partials[:, 0]
        top = np.flatnonzero(gains > 0)
        top = top[np.argsort(-gains[top], kind="stable")[:k]]
        rows.extend((float(gains[i]), c, int(i), float(partials[i])) for i in top)
        blamed.append((scores, np.sort(scores)))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    n_defined = sum(not math.isnan(v) for v in aps.values())
    entries = []
    for gain, c, i, partial in rows[:k]:
        scores, ordered = blamed[c]
        s = float(scores[i])
        step = gain / abs(partial) - min_step
        entries.append(BlameEntry(
            image_id=str(image_ids[int(classes[c][0][i])]), cls=class_names[c], index=i,
            score=s, box=tuple(float(v) for v in (boxes_out or [x[2] for x in classes])[c][i]),
            partial=partial, ap_gain=gain, map_gain=gain / max(n_defined, 1),
            move_to=_breakpoint(ordered, s, s + step if partial > 0 else s - step)))
    return BlameReport(entries, aps, metric, convention,
                       box_format or ("raw" if devkit else "continuous"), float(min_step),
                       int(k), total)


def _breakpoint(ordered: np.ndarray, score: float, target: float) -> float:
    """The class score nearest to ``target`` (the breakpoint ``target`` stands for, up to
    rounding in ``gain / |partial| - mu``); ``ordered``: the class's scores, sorted."""
    j = int(np.searchsorted(ordered, target))
    near = [ordered[x] for x in (j - 1, j) if 0 <= x < ordered.size]
    return float(min(near, key=lambda v: abs(v - target))) if near else float(target)
