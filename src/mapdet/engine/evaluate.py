"""Evaluation runs: a model over a data set, scored with the VOC evaluator; result files.

- :func:`run_inference`: the model over a data set with the test-time post-processing
  (per class: score threshold 0.05, NMS 0.3; at most 100 detections per image), detections in
  the original images' pixels; also the images per second.
- :func:`evaluate_model`: the above, scored with :func:`mapdet.evaluation.voc.evaluate_voc`
  for each metric of ``eval.metrics`` (``voc07``, ``area``), written to an output folder:
  ``metrics.json``, devkit result files (``results/comp4_det_<split>_<class>.txt``), COCO
  results JSON, PR curves and a picture of detections.
- :func:`evaluate_checkpoint`: the same for a checkpoint file (``mapdet eval``).
- :func:`score_result_files`: devkit result files scored against VOC annotations, no images.
- :func:`detect_images`: a checkpoint on arbitrary image files (``mapdet detect``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mapdet.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import (
    build_dataset,
    build_model,
    build_proposals,
    resolve_device,
    set_threads,
    split_name,
)
from mapdet.engine.data_loading import Batch, make_eval_loader
from mapdet.engine.distributed import current_env, gather_dicts, init_distributed
from mapdet.evaluation.report import EvalReport, score_result_files
from mapdet.progress import progress_bar

__all__ = [
    "EvalReport",
    "detect_images",
    "evaluate_checkpoint",
    "evaluate_model",
    "model_from_checkpoint",
    "output_names",
    "run_inference",
    "score_result_files",
    "train_split_summary",
]

log = logging.getLogger(__name__)

Detections = dict[str, dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def detect_batch(model: torch.nn.Module, batch: Batch, cfg: Config) -> list[dict[str, np.ndarray]]:
    """Detections of each image of ``batch``, in original-image pixels (numpy arrays).

    Returns one ``{"boxes" (D, 4) float32 xyxy, "scores" (D,) float32, "labels" (D,) int64}``
    per image (test-time rule of :func:`mapdet.models.postprocess.detect`).
    """
    from mapdet.models.postprocess import detect

    e = cfg.eval
    device = batch.images.device
    if cfg.model.arch == "faster_rcnn":  # the model post-processes itself (eval.* in it)
        from mapdet.engine.faster_rcnn import faster_rcnn_detect

        dets = faster_rcnn_detect(model, batch)
    else:
        rois = [s.proposals.to(device) for s in batch.samples]
        logits, deltas = model(batch.images, rois)
        probs = F.softmax(logits, dim=1)
        dets, start = [], 0
        for s, r in zip(batch.samples, rois, strict=True):
            n = r.shape[0]
            dets.append(detect(probs[start:start + n], deltas[start:start + n], r, s.size,
                               score_threshold=e.score_threshold, nms_iou=e.nms_iou,
                               max_per_image=e.max_per_image or None))
            start += n
    out = []
    for s, det in zip(batch.samples, dets, strict=True):
        boxes = det["boxes"].float().cpu().numpy() / np.float32(s.scale)
        h0, w0 = s.orig_size
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)
        out.append({"boxes": boxes.astype(np.float32),
                    "scores": det["scores"].float().cpu().numpy(),
                    "labels": det["labels"].cpu().numpy().astype(np.int64)})
    return out


def run_inference(
    model: torch.nn.Module,
    dataset,
    proposals: dict[str, np.ndarray],
    cfg: Config,
    *,
    device: torch.device | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[Detections, float]:
    """Detections of every image (or of ``indices``) and the images per second.

    Returns ``(detections, images_per_sec)``; detections: image id -> arrays as in
    :func:`detect_batch`. The model is put in eval mode (and back in its previous mode).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    dets: Detections = {}
    n = len(dataset) if indices is None else len(indices)
    t0 = time.perf_counter()
    try:
        loader = make_eval_loader(dataset, proposals, cfg, indices, device)
        for batch in progress_bar(loader, enabled=progress, total=n, desc="eval",
                                  leave=False, dynamic_ncols=True):
            for s, d in zip(batch.samples, detect_batch(model, batch, cfg), strict=True):
                dets[s.image_id] = d
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    return dets, (n / seconds if seconds > 0 else math.nan)


# --------------------------------------------------------------------------------------------
# Evaluation of a model / a checkpoint
# --------------------------------------------------------------------------------------------


def score_detections(dataset, detections: Detections, cfg: Config, *, blame: int = 0
                     ) -> dict[str, Any]:
    """``{metric: EvalResult}`` for each of ``eval.metrics`` (VOC devkit convention);
    ``blame > 0``: the first metric's result also names the ``blame`` detections that cost
    its AP most (:mod:`mapdet.evaluation.blame`)."""
    from mapdet.evaluation.voc import detections_by_class, evaluate_voc

    records = [dataset.records[dataset.index_of(i)] for i in detections]
    per_class = detections_by_class(detections, dataset.class_names)
    return {m: evaluate_voc(records, per_class, class_names=dataset.class_names, metric=m,
                            convention=cfg.eval.convention, match_iou=cfg.eval.match_iou,
                            blame=blame if j == 0 else 0)
            for j, m in enumerate(cfg.eval.metrics)}


def _coco_metrics(dataset, detections: Detections, cfg: Config, out_dir: Path | None):
    """COCO metrics (faster-coco-eval) and/or the COCO results file, as configured."""
    from mapdet.evaluation.coco import coco_image_id_map, evaluate_coco, records_to_coco_gt
    from mapdet.evaluation.export import coco_results_list, write_coco_results

    records = [dataset.records[dataset.index_of(i)] for i in detections]
    id_map = coco_image_id_map(records)
    cats = getattr(dataset, "label_to_category_id", None) or list(
        range(1, dataset.num_classes + 1))
    if out_dir is not None and cfg.eval.export_coco:
        write_coco_results(out_dir / "coco_results.json", detections, id_map, cats)
    if not (cfg.eval.coco_metrics or cfg.data.kind == "coco"):
        return None
    results = coco_results_list(detections, id_map, cats)
    if not results:
        log.warning("no detections: COCO metrics skipped")
        return None
    gt = records_to_coco_gt(records, dataset.class_names, category_ids=cats)
    return evaluate_coco(gt, results)


def output_files(cfg: Config, class_names: Sequence[str], split: str, *, blame: int = 0
                 ) -> list[str]:
    """The files :func:`evaluate_model` writes into its output folder, relative to it."""
    from mapdet.evaluation.export import devkit_result_filename

    names = ["metrics.json"]
    if cfg.eval.export_devkit:
        names += [f"results/{devkit_result_filename(split, c)}" for c in class_names]
    if cfg.eval.export_coco:
        names.append("coco_results.json")
    if cfg.eval.plots:
        names += ["pr_curves.png"] + (["detections.png"] if cfg.eval.num_vis > 0 else [])
    if blame:
        names += ["blame.json", "blame.txt"]
    return names


def write_outputs(report: EvalReport, dataset, detections: Detections, cfg: Config,
                  out_dir: Path, split: str) -> None:
    """metrics.json, devkit results, PR curves and a detections picture in ``out_dir``."""
    from mapdet.evaluation.export import write_devkit_results

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.eval.export_devkit:
        write_devkit_results(out_dir / "results", split, dataset.class_names, detections)
    if cfg.eval.plots:
        _plots(report, dataset, detections, cfg, out_dir)
    report.write_json(out_dir / "metrics.json")


def _plots(report: EvalReport, dataset, detections: Detections, cfg: Config,
           out_dir: Path) -> None:
    """PR curves (``pr_curves.png``) and sample detections (``detections.png``)."""
    from mapdet.evaluation.plots import draw_detection_grid, plot_pr_curves

    res = report.results[report.metric]
    plot_pr_curves(res.curves, out_dir / "pr_curves.png",
                   title=f"Precision-recall ({report.metric} mAP {100 * res.mAP:.1f})",
                   ap=res.per_class)
    ids = list(detections)[: max(0, cfg.eval.num_vis)]
    if ids:
        draw_detection_grid(dataset, {i: detections[i] for i in ids}, out_dir / "detections.png",
                            score_threshold=cfg.eval.vis_threshold)


def evaluate_model(
    model: torch.nn.Module,
    cfg: Config,
    *,
    split: str = "test",
    dataset=None,
    proposals: dict[str, np.ndarray] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    blame: int = 0,
    overwrite: bool = False,
) -> EvalReport:
    """Run ``model`` over ``split`` (``eval.max_images`` > 0: the first that many images),
    score it, and write the outputs to ``out`` when given. ``blame > 0``: also the ``blame``
    detections that cost the AP most (``report.blame``; ``blame.json`` and ``blame.txt``
    in ``out``). Outputs that exist in ``out`` are refused before anything runs, unless
    ``overwrite`` and an earlier mapdet command wrote them (:func:`mapdet.outputs.claim_outputs`).
    """
    dataset = dataset if dataset is not None else build_dataset(cfg, split)
    env = current_env()
    if out is not None:  # every rank checks (all stop together), rank 0 records
        from mapdet.outputs import claim_outputs

        claim_outputs(out, output_files(cfg, dataset.class_names, split_name(cfg, split),
                                        blame=blame), overwrite=overwrite, record=env.is_main)
    proposals = proposals if proposals is not None else build_proposals(
        cfg, dataset, split, progress=progress)
    n = len(dataset) if cfg.eval.max_images <= 0 else min(cfg.eval.max_images, len(dataset))
    # Under torchrun each rank runs its share of the images; the detections are gathered and
    # every rank scores them (rank 0 alone writes the outputs).
    t0 = time.perf_counter()
    shard, _ = run_inference(model, dataset, proposals, cfg,
                             indices=range(env.rank, n, env.world_size),
                             progress=progress and env.is_main)
    gathered = gather_dicts(shard, env)
    seconds = time.perf_counter() - t0
    ips = n / seconds if seconds > 0 else math.nan
    detections = {r.image_id: gathered[r.image_id] for r in dataset.records[:n]}
    results = score_detections(dataset, detections, cfg, blame=blame if env.is_main else 0)
    report = EvalReport(results, dataset.class_names, num_images=n, images_per_sec=ips,
                        extra=dict(extra or {}), blame=next(iter(results.values())).blame)
    report.extra["split"] = split_name(cfg, split)
    out_dir = Path(out) if out is not None else None
    coco = _coco_metrics(dataset, detections, cfg, out_dir if env.is_main else None)
    if coco is not None:
        report.extra["coco"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in coco.items()}
    if out_dir is not None and env.is_main:
        report.out_dir = out_dir
        write_outputs(report, dataset, detections, cfg, out_dir, split_name(cfg, split))
        if report.blame is not None:
            report.blame.write(out_dir)
    log.info("%s mAP %.4f on %d images (%.1f images/s)", report.metric, report.mAP, n, ips)
    return report


def model_from_checkpoint(path: str | Path, cfg: Config | None = None,
                          device: torch.device | None = None):
    """``(model, cfg, state)`` from a checkpoint file or run directory; ``cfg`` defaults to
    the checkpoint's own configuration. The model is in eval mode on ``device``."""
    state = ckpt.load_checkpoint(path)
    cfg = cfg or config_from_dict(state["config"])
    cfg.model.pretrained = False  # the checkpoint holds all the weights
    num_classes = int(state.get("num_classes") or 0)
    if num_classes <= 0:
        raise ckpt.CheckpointError(f"{state['path']}: no num_classes entry")
    model = build_model(cfg, num_classes)
    ckpt.load_model_state(model, state,
                          f"model {cfg.model.backbone!r} with {num_classes} classes")
    device = device or resolve_device(cfg.train.device)
    return model.to(device).eval(), cfg, state


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    split: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    train_split: bool | None = None,
    blame: int = 0,
    overwrite: bool = False,
) -> EvalReport:
    """Evaluate a checkpoint (``mapdet eval CONFIG --checkpoint CKPT``).

    The configuration is ``config`` (a YAML file) if given, else the checkpoint's own, with
    ``overrides`` applied. Outputs go to ``out`` (default ``<run dir>/eval``). On the test
    split, ``train_split`` (default ``eval.train_split_map``) also scores the train split
    and stores it as ``train_split`` in ``metrics.json`` (:func:`train_split_summary`).
    ``blame``, ``overwrite``: see :func:`evaluate_model`.
    """
    state = ckpt.load_checkpoint(checkpoint)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        cfg = apply_overrides(config_from_dict(state["config"]), overrides,
                              migrate=False).validate()
    names = tuple(state.get("class_names") or ())
    if cfg.data.kind == "voc" and cfg.data.classes is None and names:
        from mapdet.data.voc import VOC_CLASSES

        if names != VOC_CLASSES:  # a run on one's own classes: they are saved with it
            cfg.data.classes = list(names)
    set_threads(cfg.train.threads)
    model, cfg, state = model_from_checkpoint(state["path"], cfg)
    device = next(model.parameters()).device
    env = init_distributed(device)  # under torchrun: shard the images over the ranks
    if env.distributed and device.type == "cuda":
        model = model.to(torch.device("cuda", env.local_rank))
    split = split or "test"
    dataset = build_dataset(cfg, split)
    if names and tuple(dataset.class_names) != names:
        raise ConfigError(f"the checkpoint was trained on classes {list(names)}, the data set "
                          f"has {list(dataset.class_names)}")
    if out is None:
        p = Path(state["path"]).resolve().parent
        out = (p.parent if p.name == "checkpoints" else p) / "eval"
    from mapdet.outputs import claim_outputs  # refused before the train split's evaluation

    claim_outputs(out, output_files(cfg, dataset.class_names, split_name(cfg, split),
                                    blame=blame), overwrite=overwrite, record=env.is_main)
    extra = {"checkpoint": state["path"], "iteration": int(state.get("iteration", 0))}
    if (cfg.eval.train_split_map if train_split is None else train_split) and split == "test":
        extra["train_split"] = train_split_summary(model, cfg, progress=progress)
    return evaluate_model(model, cfg, split=split, dataset=dataset, out=out, progress=progress,
                          extra=extra, blame=blame, overwrite=True)


def train_split_summary(model: torch.nn.Module, cfg: Config, *, progress: bool = False
                        ) -> dict[str, Any]:
    """``{"split", "num_images", "mAP_<metric>"...}``: the model on the whole train split
    with the test-time post-processing (no output files)."""
    report = evaluate_model(model, cfg, split="train", progress=progress)
    out: dict[str, Any] = {"split": split_name(cfg, "train"), "num_images": report.num_images}
    for name, r in report.results.items():
        out[f"mAP_{name}"] = None if math.isnan(r.mAP) else float(r.mAP)
    return out


# --------------------------------------------------------------------------------------------
# Result files, and detection on image files
# --------------------------------------------------------------------------------------------


def output_names(paths: Sequence[str | Path]) -> list[str]:
    """One distinct picture name per input image: the file's stem, and for stems given more
    than once (``a/img.jpg b/img.jpg``) the stem with a counter (``img``, ``img_2``), never
    equal to another input's name."""
    stems = [Path(p).stem for p in paths]
    taken = set(stems)
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        k = seen.get(stem, 0) + 1
        seen[stem] = k
        name = stem
        if k > 1:
            name = f"{stem}_{k}"
            while name in taken:
                k += 1
                name = f"{stem}_{k}"
            seen[stem] = k
            taken.add(name)
        names.append(name)
    return names


def detect_images(images: Sequence[str | Path], checkpoint: str | Path, *,
                  out: str | Path = "detections", draw_threshold: float = 0.5,
                  overwrite: bool = False) -> list[Path]:
    """Detect objects in image files with a checkpoint; draw them to ``<out>/<name>.png``
    (the file's stem, made distinct by :func:`output_names` when two inputs share it) and
    list them in ``<out>/detections.json``. Returns the files written.

    An output that is an input image is refused, and so is one that exists unless
    ``overwrite`` and an earlier mapdet command wrote it (:func:`mapdet.outputs.claim_outputs`);
    checked before the model is loaded.
    """
    from mapdet.data.base import DetectionDataset, ImageRecord, image_size
    from mapdet.evaluation.plots import draw_detection_grid
    from mapdet.outputs import claim_outputs

    for p in images:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
    pictures = [f"{name}.png" for name in output_names(images)]
    claim_outputs(out, [*pictures, "detections.json"], overwrite=overwrite, inputs=images)
    model, cfg, state = model_from_checkpoint(checkpoint)
    names = tuple(state.get("class_names") or [f"class{i}" for i in range(model.num_classes)])
    records = []
    for i, p in enumerate(images):
        w, h = image_size(p)
        records.append(ImageRecord(image_id=f"{i:05d}_{Path(p).stem}", path=Path(p), width=w,
                                   height=h, boxes=np.zeros((0, 4)), labels=np.zeros(0),
                                   difficult=np.zeros(0)))
    dataset = DetectionDataset(names, records, name="images")
    proposals = build_proposals(cfg, dataset, "images", progress=False, cache=False)
    detections, _ = run_inference(model, dataset, proposals, cfg, progress=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    listing = {}
    for rec, picture in zip(dataset.records, pictures, strict=True):
        det = detections[rec.image_id]
        keep = det["scores"] >= draw_threshold
        path = draw_detection_grid(dataset, {rec.image_id: det}, out / picture,
                                   score_threshold=draw_threshold, min_side=0)
        written.append(path)
        listing[str(rec.path)] = [
            {"class": names[int(lab)], "score": float(s), "box": [float(v) for v in b]}
            for b, s, lab in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep],
                                 strict=True)]
    from mapdet.io import atomic_write_text

    js = atomic_write_text(out / "detections.json", json.dumps(listing, indent=2) + "\n")
    written.append(js)
    return written
