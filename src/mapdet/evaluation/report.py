"""Evaluation reports, and the scoring of devkit result files (``mapdet eval --voc``).

- :class:`EvalReport`: the scores of one evaluation, one
  :class:`~mapdet.evaluation.voc.EvalResult` per metric, with its table and JSON.
- :func:`score_result_files`: devkit result files against a VOC-layout folder.

Neither imports torch: scoring result files needs only numpy (the engine re-exports both).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EvalReport", "score_result_files"]


@dataclass
class EvalReport:
    """Scores of one evaluation: one :class:`~mapdet.evaluation.voc.EvalResult` per metric."""

    results: dict[str, Any]
    class_names: tuple[str, ...]
    num_images: int = 0
    images_per_sec: float = math.nan
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: :class:`~mapdet.evaluation.blame.BlameReport` of the primary metric (``--blame``).
    blame: Any = None

    @property
    def metric(self) -> str:
        """The primary metric (the first evaluated)."""
        return next(iter(self.results))

    @property
    def mAP(self) -> float:  # noqa: N802 - the field name used everywhere
        return float(self.results[self.metric].mAP)

    def to_json(self) -> dict[str, Any]:
        """``{"mAP", "metric", "per_class", "mAP_<metric>"..., "metrics", "num_images",
        "images_per_sec", ...}``; undefined APs are ``null``."""
        primary = self.results[self.metric].to_json()
        out: dict[str, Any] = {"mAP": primary["mAP"], "metric": self.metric,
                               "per_class": primary["per_class"]}
        for name, r in self.results.items():
            out[f"mAP_{name}"] = r.to_json()["mAP"]
        out["metrics"] = {name: r.to_json() for name, r in self.results.items()}
        out["num_images"] = self.num_images
        out["images_per_sec"] = None if math.isnan(self.images_per_sec) else self.images_per_sec
        out.update(self.extra)
        return out

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically to ``path``."""
        from mapdet.evaluation.export import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        """A per-class table of every metric (APs in percent), then the mean and the speed."""
        from mapdet.evaluation.table import format_per_class

        text = format_per_class(self.results, class_names=self.class_names)
        tr = self.extra.get("train_split")
        if tr:
            parts = [f"{m} mAP {100 * tr['mAP_' + m]:.1f}" for m in self.results
                     if tr.get("mAP_" + m) is not None]
            text += f"\ntrain split ({tr['split']}, {tr['num_images']} images): " + ", ".join(parts)
        if not math.isnan(self.images_per_sec):
            text += f"\n{self.num_images} images, {self.images_per_sec:.1f} images/s"
        return text


def score_result_files(voc_root: str | Path, results_dir: str | Path, *, year: str = "2007",
                       split: str = "test", metric: str | None = None, devkit: bool = True,
                       out: str | Path | None = None,
                       cache_dir: str | Path | None | bool = None,
                       class_names: Sequence[str] | None = None,
                       blame: int = 0, overwrite: bool = False) -> EvalReport:
    """Score devkit result files against a VOC-layout data set (``mapdet eval --voc``).

    ``metric`` defaults to ``voc07`` for VOC 2007 and ``area`` otherwise. ``class_names``:
    the data set's classes (``mapdet eval --classes``); ``None``: those listed in
    ``voc_root/classes.txt`` when it exists (the digits benchmark writes one), else VOC's 20.
    ``out``: the ``metrics.json`` path (``{"mAP", "per_class", "metric", ...}``), written
    atomically.
    ``cache_dir``: the annotation cache (see
    :func:`~mapdet.evaluation.voc_annotations.load_voc_ground_truth`; ``False``: none).
    ``blame``: also find the ``blame`` detections that cost the AP most
    (:mod:`mapdet.evaluation.blame`), written as ``blame.json`` and ``blame.txt`` beside
    ``metrics.json`` when ``out`` is given. Those that exist are refused before anything is
    read, unless ``overwrite`` and mapdet wrote them (:func:`mapdet.outputs.claim_outputs`).
    """
    from mapdet.data.voc import VOC_CLASSES, read_class_file
    from mapdet.evaluation.voc import evaluate_voc_results_dir

    if out is not None:
        from mapdet.outputs import claim_outputs

        out = Path(out)
        if out.suffix != ".json":
            out = out / "metrics.json"
        claim_outputs(out.parent, [out.name, *(("blame.json", "blame.txt") if blame else ())],
                      overwrite=overwrite)
    metric = metric or ("voc07" if str(year) == "2007" else "area")
    if class_names is not None:
        class_names = tuple(class_names)
    else:
        class_names = read_class_file(voc_root) or VOC_CLASSES
    result = evaluate_voc_results_dir(voc_root, split, results_dir, metric,
                                      convention="devkit" if devkit else "continuous",
                                      year=year, class_names=class_names, cache_dir=cache_dir,
                                      blame=blame)
    report = EvalReport({metric: result}, class_names, num_images=result.num_images,
                        blame=result.blame)
    if out is not None:
        result.write_json(out)
        report.out_dir = out.parent
        if report.blame is not None:
            report.blame.write(report.out_dir)
    return report
