"""Does one step along the mAP pseudo-gradient raise the AP of the minibatch it came from?

The training study (``experiments/map_study.py``) finds that the mAP stage lowers train-split
mAP at every learning rate where it moves the model. This script separates two explanations:

1. the pseudo-gradient is not an ascent direction of the minibatch AP even in *score space*
   (then the loss itself is at fault), or
2. it is one in score space, but a step of the *network's weights* along it does not raise
   the minibatch AP (the few windows with a nonzero pseudo-partial move, and with them, through
   the shared weights, every other window's score: collateral changes the loss never saw).

Protocol, at a trained checkpoint, for each of ``--batches`` training minibatches (the data
order of a training run with ``train.seed``):

- ``P (N, K)``: the softmax probabilities of the K classes of every proposal, ``B``: their
  class-specific boxes, ``A0``: the minibatch mAP after the detection function (threshold,
  NMS; the loss's settings), ``G (N, K)``: its exact pseudo-gradient (``MAPLoss``'s, before
  any normalization; the direction is the same for every normalization but ``per_class``).
- **score space**: ``A(P + e G / ||G||_2)`` for each step ``e`` in ``--score-steps``
  (probabilities clipped to [0, 1]; boxes unchanged).
- **weight space**: for each direction ``d`` of the weights ``theta`` (the gradient of the mAP
  loss, of the softmax classification loss on Fast R-CNN's sampled RoIs, and a random
  Gaussian direction), each step ``e`` in ``--weight-steps``: ``theta' = theta - e d / ||d||``,
  then ``A`` of the new probabilities with the *original* boxes (the mAP loss trains the scores
  only), so every direction moves the same distance in weight space.

- **averaged direction**: the gradients of the ``--batches`` minibatches averaged (raw, as
  SGD sums them, and each scaled to unit norm first, as ``normalization: l1`` roughly does),
  one step of each length along that mean, measured on the seen images (all minibatches'
  images as one AP context) and on the pool. SGD's many small steps follow this mean, so it
  tells whether the *expected* pseudo-gradient ascends the data set's AP.
- **whole context**: the pseudo-gradient of the AP of all seen images *as one context*
  (``map/context``), one step along it, measured the same way: is the AP over many images
  ascended by its own pseudo-gradient, where the mean of the minibatch ones is not?
- **transfer**: the same weight steps, measured on a fixed pool of ``--pool`` other training
  images scored together (one AP context, as the train-split evaluation does): does a step
  that raises the AP of its own minibatch raise the AP of images it did not see?

Printed and written (``--out``, JSON): for every (space, direction, step) the mean change of
the minibatch mAP (and of the pool's mAP) over the batches with its standard error, and how
often it rose and fell;
``||grad||`` of each loss, so that a weight step converts to a learning rate
(``e = lr * ||grad||`` for one SGD step without momentum).

Usage::

    python experiments/map_step_check.py --checkpoint RUN/checkpoints/iter_0003000.pt \\
        --batches 40 --out experiments/map_step_check/result.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mapdet import MAPLoss
from mapdet.config import config_from_dict, load_config
from mapdet.core.apnms import ap_after_nms
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import build_dataset, build_model, build_proposals, set_threads
from mapdet.engine.data_loading import Batch, make_eval_loader, make_train_loader
from mapdet.engine.distributed import RankOrder
from mapdet.engine.schedule import DataOrder
from mapdet.engine.steps import softmax_loss
from mapdet.engine.train import _generator as rois_generator
from mapdet.io import atomic_write_text
from mapdet.models.postprocess import class_specific_boxes


def minibatch_map(probs: np.ndarray, boxes: np.ndarray, image_ids: np.ndarray, targets,
                  loss: MAPLoss) -> float:
    """Mean over the classes with a non-difficult ground truth of the AP after the detection
    function. ``probs (N, K)``, ``boxes (N, K, 4)``, ``image_ids (N,)``; ``targets`` per image."""
    aps = []
    for c in range(probs.shape[1]):
        gb, gi, gd = [], [], []
        for b, t in enumerate(targets):
            m = (t["labels"] == c).numpy()
            gb.append(t["boxes"].numpy()[m])
            gi.append(np.full(int(m.sum()), b))
            gd.append(t["difficult"].numpy()[m])
        ap = ap_after_nms(probs[:, c], boxes[:, c], image_ids, np.concatenate(gb),
                          np.concatenate(gi), np.concatenate(gd),
                          score_threshold=loss.score_threshold, nms_iou=loss.nms_iou,
                          match_iou=loss.match_iou, ap_method=loss.ap_method)
        if not math.isnan(ap):
            aps.append(ap)
    return float(np.mean(aps)) if aps else math.nan


def _heads(model, batch):
    """Probabilities ``(N, K)`` (autograd on) and class boxes ``(N, K, 4)`` (detached)."""
    rois = [s.proposals for s in batch.samples]
    logits, deltas = model(batch.images, rois)
    probs = F.softmax(logits, dim=1)[:, 1:]
    boxes, start = [], 0
    for s, r in zip(batch.samples, rois, strict=True):
        d = deltas[start: start + r.shape[0]].detach()
        boxes.append(class_specific_boxes(d, r, s.size))
        start += r.shape[0]
    image_ids = np.concatenate([np.full(r.shape[0], b) for b, r in enumerate(rois)])
    return probs, torch.cat(boxes).numpy().astype(np.float64), image_ids


def _pool_heads(model, pool):
    """Probabilities ``(N, K)``, boxes ``(N, K, 4)`` and image ids ``(N,)`` of every proposal
    of the pool's images (a list of one-image batches), as one AP context."""
    probs, boxes, ids = [], [], []
    with torch.no_grad():
        for b, batch in enumerate(pool):
            p, bx, _ = _heads(model, batch)
            probs.append(p.numpy().astype(np.float64))
            boxes.append(bx)
            ids.append(np.full(p.shape[0], b))
    return np.concatenate(probs), np.concatenate(boxes), np.concatenate(ids)


def _grad_vector(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def _set_params(model, flat: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[i: i + p.numel()].view_as(p))
            i += p.numel()


def _summary(deltas: list[float]) -> dict:
    d = np.asarray([x for x in deltas if not math.isnan(x)])
    if d.size == 0:
        return {"n": 0}
    return {"n": int(d.size), "mean": float(d.mean()),
            "sem": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan,
            "rose": int((d > 0).sum()), "fell": int((d < 0).sum())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a trained (softmax) checkpoint")
    ap.add_argument("--config", default=None,
                    help="config (default: the checkpoint's own)")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides, key=value (e.g. train.images_per_batch=8: a larger "
                         "AP context)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--start", type=int, default=0, help="first iteration of the data order")
    ap.add_argument("--score-steps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--weight-steps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--pool", type=int, default=16,
                    help="held-out training images for the transfer measurement (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="random direction's seed")
    ap.add_argument("--averaged-only", action="store_true",
                    help="skip the per-minibatch steps (score space, weight space, transfer)")
    ap.add_argument("--direction-from-config", action="store_true",
                    help="the 'map' direction is the gradient of the configured training loss "
                         "(train.loss and its loss.* options, e.g. train.loss=map "
                         "loss.smoothing=perturbed, or train.loss=rank_sort), box terms off, "
                         "computed by the training step itself; the score-space and "
                         "whole-context measurements (MAPLoss only) are skipped")
    ap.add_argument("--out", default="experiments/map_step_check/result.json")
    args = ap.parse_args(argv)

    state = ckpt.load_checkpoint(args.checkpoint)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:  # the checkpoint's own config, with the overrides applied
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(json.dumps(config_from_dict(state["config"]).to_dict()))
            cfg = load_config(path, args.overrides)
    set_threads(cfg.train.threads)
    torch.manual_seed(args.seed)
    dataset = build_dataset(cfg, "train")
    proposals = build_proposals(cfg, dataset, "train", progress=False)
    model = build_model(cfg, dataset.num_classes)
    model.load_state_dict(state["model"])
    model.train()
    theta0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    lc = cfg.loss
    criterion = MAPLoss(score_threshold=lc.score_threshold, nms_iou=lc.nms_iou,
                        match_iou=lc.match_iou, ap_method=lc.ap_method, min_step=lc.min_step,
                        normalization="none")
    t = cfg.train
    mechanism = _mechanism(cfg) if args.direction_from_config else None
    order = DataOrder(len(dataset), t.images_per_batch, t.seed, flip=cfg.data.flip)
    rank_order = RankOrder(order, 0, 1)
    loader = make_train_loader(dataset, proposals, cfg, rank_order, args.start,
                               args.start + args.batches)

    seen = {i for it in range(args.start, args.start + args.batches)
            for i, _ in rank_order.batch(it)}
    pool_idx = [i for i in range(len(dataset) - 1, -1, -1) if i not in seen][: args.pool]
    pool = list(make_eval_loader(dataset, proposals, cfg, pool_idx))
    pool_targets = [{"boxes": b.samples[0].boxes, "labels": b.samples[0].labels,
                     "difficult": b.samples[0].difficult} for b in pool]
    pool_a0 = math.nan
    if pool:
        pool_probs, pool_boxes, pool_ids = _pool_heads(model, pool)
        pool_a0 = minibatch_map(pool_probs, pool_boxes, pool_ids, pool_targets, criterion)
    transfer = {(d, e): [] for d in ("map", "softmax", "random") for e in args.weight_steps}
    score = {e: [] for e in args.score_steps}
    weight = {(d, e): [] for d in ("map", "softmax", "random") for e in args.weight_steps}
    norms = {"map": [], "softmax": []}
    zero_grad_batches, t0 = 0, time.perf_counter()
    sums = {(d, k): torch.zeros_like(theta0) for d in ("map", "softmax") for k in ("raw", "unit")}
    seen_batches = []
    for it, batch in enumerate(loader):
        seen_batches.extend(Batch(s.image[None], [s]) for s in batch.samples)
        targets = [{"boxes": s.boxes, "labels": s.labels, "difficult": s.difficult}
                   for s in batch.samples]
        _set_params(model, theta0)
        probs, boxes, image_ids = _heads(model, batch)
        p0 = probs.detach().numpy().astype(np.float64)
        a0 = minibatch_map(p0, boxes, image_ids, targets, criterion)
        if args.direction_from_config:
            _set_params(model, theta0)
            gens = [rois_generator(t.seed, args.start + it, b)
                    for b in range(len(batch.samples))]
            g_map = _grad_vector(model, mechanism(model, batch, gens))
            G, gn = None, float(g_map.norm())
        else:
            loss = criterion(probs, torch.from_numpy(boxes), torch.from_numpy(image_ids),
                             targets)
            g_map = _grad_vector(model, loss)
            G = -probs_grad(probs, criterion, boxes, image_ids, targets)
            gn = float(np.linalg.norm(G))
        if gn == 0.0:
            zero_grad_batches += 1
        for e in ([] if args.averaged_only or G is None else args.score_steps):
            if gn == 0.0:
                score[e].append(0.0)
                continue
            p1 = np.clip(p0 + e * G / gn, 0.0, 1.0)
            score[e].append(minibatch_map(p1, boxes, image_ids, targets, criterion) - a0)

        _set_params(model, theta0)
        gens = [rois_generator(t.seed, args.start + it, b)
                for b in range(len(batch.samples))]
        sm, _ = softmax_loss(model, batch, cfg, gens)
        g_soft = _grad_vector(model, sm)
        dirs = {"map": g_map, "softmax": g_soft, "random": torch.randn_like(theta0)}
        for name, g in (("map", g_map), ("softmax", g_soft)):
            n = float(g.norm())
            sums[(name, "raw")] += g
            if n > 0:
                sums[(name, "unit")] += g / n
        norms["map"].append(float(g_map.norm()))
        norms["softmax"].append(float(g_soft.norm()))
        for name, d in ({} if args.averaged_only else dirs).items():
            dn = float(d.norm())
            for e in args.weight_steps:
                if dn == 0.0:
                    weight[(name, e)].append(0.0)
                    transfer[(name, e)].append(0.0)
                    continue
                _set_params(model, theta0 - e * d / dn)
                with torch.no_grad():
                    p1, _, _ = _heads(model, batch)
                p1 = p1.numpy().astype(np.float64)
                weight[(name, e)].append(minibatch_map(p1, boxes, image_ids, targets,
                                                       criterion) - a0)
                if pool:
                    q1 = _pool_heads(model, pool)[0]
                    transfer[(name, e)].append(minibatch_map(q1, pool_boxes, pool_ids,
                                                             pool_targets, criterion) - pool_a0)
        print(f"batch {it + 1}/{args.batches}: mAP {a0:.3f}, |G| {gn:.3g}", flush=True)

    if not args.direction_from_config:
        sums[("map", "context")] = _context_gradient(model, theta0, seen_batches, criterion)
    averaged = _averaged_steps(model, theta0, sums, args.weight_steps, seen_batches, pool,
                               criterion)
    result = {
        "averaged_direction": averaged,
        "checkpoint": str(args.checkpoint), "batches": args.batches,
        "overrides": args.overrides, "direction_from_config": args.direction_from_config,
        "images_per_batch": t.images_per_batch, "batches_with_zero_pseudo_gradient":
        zero_grad_batches, "seconds": time.perf_counter() - t0,
        "grad_norm": {k: _summary(v) for k, v in norms.items()},
        "score_space": {str(e): _summary(v) for e, v in score.items()},
        "weight_space": {f"{d}@{e}": _summary(v) for (d, e), v in weight.items()},
        "pool_images": len(pool), "pool_mAP": pool_a0,
        "transfer": {f"{d}@{e}": _summary(v) for (d, e), v in transfer.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    _print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))


def _mechanism(cfg):
    """``fn(model, batch, generators) -> loss``: the configured training loss (its training
    step), with the box terms off, so that its gradient moves the scores only."""
    from mapdet.config import apply_overrides
    from mapdet.engine.builders import build_criterion
    from mapdet.engine.steps import map_loss, ranking_loss, softmax_map_loss

    cfg = apply_overrides(cfg, ["loss.box_loss_weight=0"])
    loss = cfg.train.loss
    if loss in ("ap_loss", "rank_sort"):
        return lambda m, b, g: ranking_loss(m, b, cfg, g)[0]
    criterion = build_criterion(cfg)
    if loss == "softmax_map":
        return lambda m, b, g: softmax_map_loss(m, b, cfg, criterion, g)[0]
    if criterion is None:
        raise SystemExit(f"--direction-from-config: train.loss={loss} is the softmax "
                         "direction already measured")
    return lambda m, b, g: map_loss(m, b, cfg, criterion, g)[0]


def _context_gradient(model, theta0, seen, criterion) -> torch.Tensor:
    """The weight gradient of ``1 - mAP`` over *all* seen images as one AP context (what a
    memory as large as the data set would approximate): the pseudo-gradient ``G (N, K)``
    of the union's AP, then backpropagated one image at a time through ``<p_i, G_i>``."""
    _set_params(model, theta0)
    probs, boxes, ids = _pool_heads(model, seen)
    targets = [{"boxes": b.samples[0].boxes, "labels": b.samples[0].labels,
                "difficult": b.samples[0].difficult} for b in seen]
    g = probs_grad(torch.from_numpy(probs), criterion, boxes, ids, targets)
    model.zero_grad(set_to_none=True)
    start = 0
    for batch in seen:
        p, _, _ = _heads(model, batch)
        n = p.shape[0]
        (p * torch.from_numpy(g[start: start + n]).to(p.dtype)).sum().backward()
        start += n
    return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten()
                      for q in model.parameters()])


def _averaged_steps(model, theta0, sums, steps, seen, pool, criterion) -> dict:
    """mAP change of the seen images (one context) and of the pool after one step of each
    length along each averaged direction (see the module docstring)."""
    contexts = {"seen": seen, "pool": pool}
    targets = {k: [{"boxes": b.samples[0].boxes, "labels": b.samples[0].labels,
                    "difficult": b.samples[0].difficult} for b in v]
               for k, v in contexts.items()}
    _set_params(model, theta0)
    base = {}
    for k, v in contexts.items():
        if v:
            p, bx, ids = _pool_heads(model, v)
            base[k] = (bx, ids, minibatch_map(p, bx, ids, targets[k], criterion))
    out = {"base_mAP": {k: b[2] for k, b in base.items()}}
    for (name, kind), g in sums.items():
        n = float(g.norm())
        for e in steps:
            row = {}
            for k, (bx, ids, a0) in base.items():
                if n == 0.0:
                    row[k] = 0.0
                    continue
                _set_params(model, theta0 - e * g / n)
                p = _pool_heads(model, contexts[k])[0]
                row[k] = minibatch_map(p, bx, ids, targets[k], criterion) - a0
            out[f"{name}/{kind}@{e}"] = row
    _set_params(model, theta0)
    return out


def _print_table(result: dict) -> None:
    def cell(v):
        if not v.get("n"):
            return "-"
        return f"{100 * v['mean']:+.2f} +- {100 * v['sem']:.2f} ({v['rose']}/{v['fell']})"

    print(f"\nchange of mAP (points, mean +- s.e. over {result['batches']} minibatches; "
          "(rose/fell))")
    print("score space, step along G/|G|:")
    for e, v in result["score_space"].items():
        print(f"  e={e:<8} own minibatch {cell(v)}")
    print("weight space, step e along the direction / |direction|:")
    for k, v in result["weight_space"].items():
        print(f"  {k:<16} own minibatch {cell(v):<28} held-out pool "
              f"{cell(result['transfer'].get(k, {}))}")
    av = result["averaged_direction"]
    print(f"one step along the mean of the {result['batches']} gradients "
          f"(base mAP: {av['base_mAP']}), points:")
    for k, v in av.items():
        if k != "base_mAP":
            print(f"  {k:<22} " + "  ".join(f"{c} {100 * x:+.2f}" for c, x in v.items()))
    g = result["grad_norm"]
    print(f"|grad| of the losses: mAP {g['map'].get('mean', math.nan):.3g}, "
          f"softmax {g['softmax'].get('mean', math.nan):.3g}")


def probs_grad(probs, criterion, boxes, image_ids, targets) -> np.ndarray:
    """The gradient the loss hands to ``probs`` (``-G / |C'|``), as a numpy array."""
    p = probs.detach().clone().requires_grad_(True)
    criterion(p, torch.from_numpy(boxes), torch.from_numpy(image_ids), targets).backward()
    return p.grad.numpy().astype(np.float64)


if __name__ == "__main__":
    main()
