"""``mapdet demo``: softmax vs mAP training on the embedded digits benchmark.

Steps (each logged with its wall time):

1. write the digits benchmark (:func:`mapdet.data.digits.write_digits_voc`) and compute the
   Selective Search proposals of both splits (cached: a second run reuses them);
2. train the softmax baseline for ``demo_baseline_iterations``;
3. from that checkpoint, (a) continue with the softmax loss and (b) fine-tune with the mAP
   loss, for the same number of iterations and the same seed (the mAP stage at its own
   learning rate and with an AP memory: see :class:`DemoPlan`);
4. evaluate the baseline and both models on the test split (VOC07 and area mAP, per class);
5. print a table and write ``results.json``, PR curves and detection pictures.

The configuration is ``configs/digits.yaml``, shipped in the package (:data:`DIGITS_CONFIG`);
``quick`` shrinks the data set and the iteration counts for tests (about 2 minutes on 2 CPU
cores; the full demo, 1200 training and 200 test images, about 10).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from mapdet.config import Config, apply_overrides, config_from_dict, load_config
from mapdet.engine.builders import build_dataset, build_proposals, set_threads
from mapdet.engine.evaluate import (
    EvalReport,
    evaluate_model,
    model_from_checkpoint,
    train_split_summary,
)
from mapdet.engine.train import train

__all__ = ["DIGITS_CONFIG", "DemoResult", "default_config", "run_demo"]

log = logging.getLogger(__name__)

#: The digits configuration, shipped in the package (``mapdet/configs/digits.yaml``;
#: ``configs/digits.yaml`` in a checkout is a link to it).
DIGITS_CONFIG = "configs/digits.yaml"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo: iterations of the baseline and of each continuation, the softmax
    continuation's learning rate, and overrides of the data and baseline.

    The mAP fine-tuning uses the recommended recipe of the configuration (``loss.lr``,
    ``loss.normalization``, ``loss.memory``: see :class:`mapdet.config.LossConfig` and
    docs/method.md) with no override: what a user gets from ``mapdet train CONFIG
    train.loss=map train.init_from=RUN``. The softmax continuation runs at ``finetune_lr``
    for the same number of iterations (equal budget).
    """

    baseline_iterations: int
    finetune_iterations: int
    finetune_lr: float
    overrides: tuple[str, ...] = ()


QUICK_BASELINE_ITERATIONS = 900
QUICK_OVERRIDES = (
    "data.digits.num_train=150", "data.digits.num_test=60", "data.digits.max_digits=4",
    "data.digits.scale_range=[0.25, 0.45]", "data.digits.contrast_range=[0.5, 0.9]",
    "train.lr_steps=[675]", "train.checkpoint_every=0",
)
#: 1200 training images (5 epochs of the baseline, so that train and test mAP stay within
#: about 10 points), 500-iteration continuations: about 9-10 minutes on 2 idle cores.
FULL = DemoPlan(baseline_iterations=3000, finetune_iterations=500, finetune_lr=0.001)
#: About 2 minutes on 2 cores: fewer, larger and higher-contrast digits (a benchmark that a
#: few hundred iterations can learn), so that the quick baseline visibly works.
QUICK = DemoPlan(
    baseline_iterations=QUICK_BASELINE_ITERATIONS, finetune_iterations=50, finetune_lr=0.001,
    overrides=QUICK_OVERRIDES,
)


def default_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The packaged digits configuration (:data:`DIGITS_CONFIG`) with ``overrides``."""
    text = resources.files("mapdet").joinpath(DIGITS_CONFIG).read_text(encoding="utf-8")
    return apply_overrides(config_from_dict(yaml.safe_load(text)), overrides).validate()


@dataclass
class DemoResult:
    """What :func:`run_demo` returns; :meth:`table` is what ``mapdet demo`` prints."""

    reports: dict[str, EvalReport]
    sec_per_iter: dict[str, float]
    results_path: Path
    results: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Per-class AP (VOC07 and area, percent) of each model, then s/iteration."""
        from mapdet.evaluation.table import format_per_class, format_table

        cols = {f"{name} {metric}": res for name, rep in self.reports.items()
                for metric, res in rep.results.items()}
        names = next(iter(self.reports.values())).class_names
        text = format_per_class(cols, class_names=names)
        rows = []
        for name, rep in self.reports.items():
            tr = rep.extra.get("train_split") or {}
            rows.append([name, *(100 * _nan(tr.get(f"mAP_{m}")) for m in ("voc07", "area")),
                         *(100 * _nan(rep.results[m].mAP) if m in rep.results else math.nan
                           for m in ("voc07", "area")),
                         self.sec_per_iter.get(name, math.nan) * 1000.0, rep.images_per_sec])
        text += "\n\n" + format_table(rows, ["model", "train voc07", "train area", "test voc07",
                                              "test area", "ms/iteration", "test images/s"])
        return text


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _machine() -> dict[str, Any]:
    """Where the figures came from: the same config's mAP moves by a few points between
    numpy and OpenCV versions (the digits' rendering, Selective Search), so they are named."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "opencv": _version("opencv-contrib-python-headless"),
        "numba": _version("numba"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _summary(report: EvalReport, sec_per_iter: float, iterations: int) -> dict[str, Any]:
    area, voc07 = report.results.get("area"), report.results.get("voc07")

    def js(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    tr = report.extra.get("train_split") or {}
    return {
        "train_mAP": tr.get("mAP_area"),
        "train_mAP_voc07": tr.get("mAP_voc07"),
        "mAP": js(area.mAP) if area else None,
        "mAP_voc07": js(voc07.mAP) if voc07 else None,
        "per_class": {c: js(v) for c, v in area.per_class.items()} if area else {},
        "per_class_voc07": {c: js(v) for c, v in voc07.per_class.items()} if voc07 else {},
        "sec_per_iter": js(sec_per_iter),
        "iterations": iterations,
        "test_images_per_sec": js(report.images_per_sec),
    }


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> DemoResult:
    """Run the demo into ``out`` (see the module docstring) and return its results.

    The data and proposal cache go to ``<out>/data`` and ``<out>/cache`` unless
    ``overrides`` say otherwise; ``config`` replaces the embedded configuration.
    """
    t_start = time.perf_counter()
    out = Path(out)
    plan = QUICK if quick else FULL
    paths = (f"data.root={out / 'data' / ('digits_quick' if quick else 'digits')}",
             f"proposals.cache_dir={out / 'cache'}", f"output.dir={out}")
    base_overrides = [*paths, *plan.overrides,
                      f"train.iterations={plan.baseline_iterations}", *overrides]
    if config is not None:
        cfg = load_config(config, base_overrides)
    else:
        cfg = default_config(base_overrides)
    set_threads(cfg.train.threads)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    train_set, test_set = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    timings["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_proposals(cfg, train_set, "train", progress=progress)
    test_props = build_proposals(cfg, test_set, "test", progress=progress)
    timings["proposals"] = time.perf_counter() - t0
    log.info("demo: %d train / %d test images; data %.1f s, proposals %.1f s",
             len(train_set), len(test_set), timings["data"], timings["proposals"])

    t0 = time.perf_counter()
    log.info("demo: training the softmax baseline (%d iterations)", cfg.train.iterations)
    baseline = train(cfg, out=out / "baseline", progress=progress, overwrite=True)
    timings["baseline_train"] = time.perf_counter() - t0

    runs = {}
    for loss in ("softmax", "map"):
        ft = apply_overrides(cfg, [
            f"train.loss={loss}", f"train.init_from={baseline.checkpoint}",
            f"train.iterations={plan.finetune_iterations}", "train.lr_steps=[]",
            "train.warmup_iterations=0",
            *(() if loss == "map" else (f"train.lr={plan.finetune_lr}",)),
        ]).validate()
        t0 = time.perf_counter()
        log.info("demo: continuing from the baseline with the %s loss (%d iterations)", loss,
                 plan.finetune_iterations)
        runs[loss] = train(ft, out=out / loss, progress=progress, overwrite=True)
        if loss == "map":
            cfg_map = ft
        timings[f"{loss}_train"] = time.perf_counter() - t0

    reports: dict[str, EvalReport] = {}
    checkpoints = {"baseline": baseline.checkpoint,
                   **{k: r.checkpoint for k, r in runs.items()}}
    for name, path in checkpoints.items():
        t0 = time.perf_counter()
        model, _, _ = model_from_checkpoint(path, cfg.copy())
        train_map = train_split_summary(model, cfg, progress=progress)
        reports[name] = evaluate_model(model, cfg, split="test", dataset=test_set,
                                       proposals=test_props, out=out / name / "eval",
                                       progress=progress, extra={"train_split": train_map})
        timings[f"{name}_eval"] = time.perf_counter() - t0
    spi = {"baseline": baseline.sec_per_iter, **{k: r.sec_per_iter for k, r in runs.items()}}
    iters = {"baseline": baseline.iterations, **{k: r.iterations for k, r in runs.items()}}

    _comparison_plots(reports, out)
    timings["total"] = time.perf_counter() - t_start
    results = {
        "softmax": _summary(reports["softmax"], spi["softmax"], iters["softmax"]),
        "map": _summary(reports["map"], spi["map"], iters["map"]),
        "baseline": _summary(reports["baseline"], spi["baseline"], iters["baseline"]),
        "map_over_softmax_time_per_iter": (spi["map"] / spi["softmax"]
                                           if spi["softmax"] > 0 else None),
        "quick": quick,
        "data": {"train_images": len(train_set), "test_images": len(test_set)},
        "timings_sec": timings,
        "config": cfg.to_dict(),
        "finetune": {"iterations": plan.finetune_iterations, "lr": plan.finetune_lr,
                     "map_lr": cfg_map.stage_lr(), "map_memory": cfg_map.loss.memory,
                     "map_normalization": cfg_map.loss.normalization,
                     "map_min_step": cfg_map.loss.min_step},
        "machine": _machine(),
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("demo finished in %.0f s; results in %s", timings["total"], path)
    return DemoResult(reports, spi, path, results)


def _comparison_plots(reports: dict[str, EvalReport], out: Path) -> None:
    """``pr_curves_<model>.png`` and ``detections_<model>.png`` side by side in ``out``."""
    import shutil

    from mapdet.evaluation.plots import plot_pr_curves

    for name, rep in reports.items():
        res = rep.results.get("area") or rep.results[rep.metric]
        plot_pr_curves(res.curves, out / f"pr_curves_{name}.png",
                       title=f"{name}: precision-recall (area mAP {100 * res.mAP:.1f})",
                       ap=res.per_class)
        pic = rep.out_dir / "detections.png" if rep.out_dir else None
        if pic is not None and pic.is_file():
            shutil.copyfile(pic, out / f"detections_{name}.png")
