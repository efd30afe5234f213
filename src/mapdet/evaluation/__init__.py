"""mapdet.evaluation: VOC-devkit-compatible scoring, result export, COCO metrics, plots, tables.

No module here imports torch; scoring result files needs numpy only.

- :mod:`~mapdet.evaluation.voc`: :func:`evaluate_voc` (in memory), :func:`read_devkit_results`
  and :func:`evaluate_voc_results_dir` (devkit result files), :class:`EvalResult`; its parts:
  :mod:`~mapdet.evaluation.voc_results` (the vectorised result-file reader),
  :mod:`~mapdet.evaluation.voc_annotations` (ground truth as the devkit counts it, cached),
  :mod:`~mapdet.evaluation.voc_scoring` (matching and AP on whole arrays).
- :mod:`~mapdet.evaluation.report`: :class:`EvalReport`, :func:`score_result_files`
  (``mapdet eval --voc ... --results ...``).
- :mod:`~mapdet.evaluation.export`: :func:`write_devkit_results`, :func:`write_coco_results`.
- :mod:`~mapdet.evaluation.coco`: :func:`evaluate_coco`, :func:`records_to_coco_gt`
  (faster-coco-eval by default, or pycocotools; imported lazily).
- :mod:`~mapdet.evaluation.plots`: :func:`plot_pr_curves`, :func:`draw_detections`
  (matplotlib, imported lazily).
- :mod:`~mapdet.evaluation.table`: :func:`format_table`, :func:`format_per_class`.
"""

from mapdet.evaluation.export import write_coco_results, write_devkit_results
from mapdet.evaluation.report import EvalReport, score_result_files
from mapdet.evaluation.table import format_per_class, format_table
from mapdet.evaluation.voc import (
    EvalResult,
    ResultsFormatError,
    detections_by_class,
    evaluate_voc,
    evaluate_voc_results_dir,
    read_devkit_results,
)

_LAZY = {
    "evaluate_coco": "mapdet.evaluation.coco",
    "records_to_coco_gt": "mapdet.evaluation.coco",
    "coco_image_id_map": "mapdet.evaluation.coco",
    "plot_pr_curves": "mapdet.evaluation.plots",
    "draw_detections": "mapdet.evaluation.plots",
}

__all__ = [
    "EvalReport",
    "EvalResult",
    "ResultsFormatError",
    "coco_image_id_map",
    "detections_by_class",
    "draw_detections",
    "evaluate_coco",
    "evaluate_voc",
    "evaluate_voc_results_dir",
    "format_per_class",
    "format_table",
    "plot_pr_curves",
    "read_devkit_results",
    "records_to_coco_gt",
    "score_result_files",
    "write_coco_results",
    "write_devkit_results",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mapdet.evaluation' has no attribute {name!r}")
