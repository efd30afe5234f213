"""Benchmark: the cost of an mAP iteration against a softmax iteration, and where it goes.

Two detectors on the digits benchmark (160 px images, 2 images per minibatch, CPU):

- ``faster``: torchvision's Faster R-CNN, ``configs/digits_faster_rcnn.yaml`` (small backbone),
  softmax heads vs :func:`mapdet.torchvision.use_map_loss`, at RPN post-NMS proposal counts
  ``--windows`` per image (n, 4n, 16n): the same model and settings, only the RoI heads'
  loss differs (softmax: ``train.rois_per_image`` sampled RoIs; mAP: every proposal);
- ``fast``: the project's Fast R-CNN, ``configs/digits.yaml`` (Selective Search proposals),
  :func:`mapdet.engine.steps.softmax_loss` vs :func:`mapdet.engine.steps.map_loss`.

Each iteration is forward, backward and an SGD step on the same minibatches (cycled), the
median over ``--repeats`` after a warm-up. The mAP iteration scores every proposal without
autograd and recomputes with autograd only the rows with a nonzero pseudo-gradient or a box
target (``mapdet.row_subset``; ``--full-path`` runs one forward with autograd over every row
instead). Where its time goes, against the softmax iteration:

- *head, all rows*: the RoI head's forward over every proposal without autograd (Faster
  R-CNN: RoI pooling + box head + predictor; Fast R-CNN: RoI pooling + FC head + predictor);
- *head, grad rows*: its forward with autograd over the recomputed rows (softmax: over the
  sampled RoIs), as a difference to the softmax iteration's;
- *backward*: the backward pass, as a difference;
- *to numpy*: ``windows_from_tensors``; *loss*: the AP and its pseudo-gradient (core);
- *cap*: Faster R-CNN's ``detections_per_img`` check (``check_cap``);
- *rest*: everything else, as a difference (RPN, sampling, box decoding, box loss, SGD step,
  Python); *rows*: the mean number of rows recomputed with autograd per minibatch.
``--checkpoint-faster``/``--checkpoint-fast`` load trained weights: an untrained model scores
every window above the 0.05 threshold in every class, the worst case for the loss.

    python benchmarks/bench_faster_rcnn.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import mapdet.loss as loss_module
from mapdet.config import load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine import steps
from mapdet.engine.builders import build_criterion, build_dataset, build_model, build_proposals
from mapdet.engine.data_loading import ImageLoader, collate
from mapdet.engine.faster_rcnn import faster_rcnn_loss
from mapdet.engine.steps import map_loss, softmax_loss
from mapdet.torchvision import MAPRoIHeads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Timers:
    """Accumulated seconds per name, for the current iteration."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - t0

    def wrap_forward(self, module: torch.nn.Module, name: str) -> None:
        """Time ``module``'s forward as ``name`` (with autograd) or ``name + "_all"``
        (without)."""
        forward = module.forward

        def timed(*args, **kwargs):
            with self.time(name if torch.is_grad_enabled() else name + "_all"):
                return forward(*args, **kwargs)

        module.forward = timed

    def wrap_function(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.time(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def _batches(cfg, n_batches: int, proposals=None):
    dataset = build_dataset(cfg, "train")
    props = proposals if proposals is not None else build_proposals(cfg, dataset, "train",
                                                                    progress=False)
    loader = ImageLoader(dataset, props, cfg.data.scale, cfg.data.max_size)
    b = cfg.train.images_per_batch
    return [collate([loader[(i * b + j, False)] for j in range(b)]) for i in range(n_batches)]


def _iterations(soft, mapm, batches, repeats: int, timers: Timers, rows=None):
    """``(softmax rows, mAP rows)``: ``soft``/``mapm`` are ``(step, model)``; the two
    iterations alternate on the same minibatch, so that a change in the machine's load hits
    both alike."""
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-9,
                            momentum=0.9) for _, m in (soft, mapm)]
    out: tuple[list, list] = ([], [])
    for i in range(repeats + 1):
        batch = batches[i % len(batches)]
        for k, ((step, model), opt) in enumerate(zip((soft, mapm), opts, strict=True)):
            timers.t.clear()
            t0 = time.perf_counter()
            loss = step(model, batch)
            opt.zero_grad(set_to_none=True)
            with timers.time("backward"):
                loss.backward()
            opt.step()
            total = time.perf_counter() - t0
            if i > 0:  # the first round is the warm-up (numba compilation, allocations)
                out[k].append({"total": total, **timers.t,
                               "rows": float(rows(model)) if rows and k == 1 else 0.0})
    return out


def _median(rows, key):
    return statistics.median(r.get(key, 0.0) for r in rows)


def _report(name: str, soft_rows, map_rows, extra: str) -> str:
    """One table row: both iterations, their ratio, and where the mAP iteration's time goes
    (absolute, or as a difference to the softmax iteration's: see the module doc)."""
    keys = ("head", "head_all", "to_numpy", "ap_grad", "cap", "backward", "rows")
    soft = {k: _median(soft_rows, k) for k in ("total", *keys)}
    mp = {k: _median(map_rows, k) for k in ("total", *keys)}
    delta = {k: mp[k] - soft[k] for k in mp}
    rest = delta["total"] - sum(delta[k] for k in keys if k != "rows")
    rows = statistics.mean(r["rows"] for r in map_rows)

    def ms(x):
        return f"{1000 * x:.1f}" if abs(x) < 0.01 else f"{1000 * x:.0f}"

    return (f"| {name} | {extra} | {ms(soft['total'])} | {ms(mp['total'])} | "
            f"{mp['total'] / soft['total']:.2f}x | {1000 * delta['total']:+.0f} | "
            f"{ms(mp['head_all'])} | {1000 * delta['head']:+.0f} | "
            f"{1000 * delta['backward']:+.0f} | {ms(mp['to_numpy'])} | {ms(mp['ap_grad'])} | "
            f"{ms(mp['cap'])} | {1000 * rest:+.0f} | {rows:.0f} |")


def bench_faster(args, timers: Timers, data_root: Path) -> list[str]:
    lines = []
    for n in args.windows:
        cfg = load_config(CONFIGS / "digits_faster_rcnn.yaml", [
            f"data.root={data_root}", f"model.faster_rcnn={{rpn_post_nms_top_n_train: {n}, "
            f"rpn_pre_nms_top_n_train: {max(1000, n)}}}", f"data.digits.num_train={args.images}"])
        batches = _batches(cfg, args.batches)
        torch.manual_seed(0)
        soft = build_model(cfg, 10)
        if args.checkpoint_faster:
            ckpt.load_model_state(soft, ckpt.load_checkpoint(args.checkpoint_faster))
        mapm = copy.deepcopy(soft)
        cfg.train.loss = "map"
        build_criterion(cfg, model=mapm)
        mapm.roi_heads.map_loss.num_threads = 1
        mapm.roi_heads.sparse_backward = not args.full_path
        for model in (soft, mapm):
            model.train()
            for mod in (model.roi_heads.box_roi_pool, model.roi_heads.box_head,
                        model.roi_heads.box_predictor):
                timers.wrap_forward(mod, "head")

        def step(model, batch):
            return faster_rcnn_loss(model, batch)[0]

        soft_rows, map_rows = _iterations((step, soft), (step, mapm), batches, args.repeats,
                                          timers, rows=lambda m: m.roi_heads.last_grad_rows)
        lines.append(_report("Faster R-CNN (torchvision)", soft_rows, map_rows,
                             f"{n} proposals/img vs {cfg.train.rois_per_image} sampled"))
    return lines


def bench_fast(args, timers: Timers, data_root: Path, cache: Path) -> list[str]:
    cfg = load_config(CONFIGS / "digits.yaml", [
        f"data.root={data_root}", f"proposals.cache_dir={cache}", "proposals.num_workers=1",
        f"data.digits.num_train={args.images}"])
    dataset = build_dataset(cfg, "train")
    props = build_proposals(cfg, dataset, "train", progress=False)
    batches = _batches(cfg, args.batches, props)
    per_img = statistics.mean(len(s.proposals) for b in batches for s in b.samples)
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    if args.checkpoint_fast:
        ckpt.load_model_state(model, ckpt.load_checkpoint(args.checkpoint_fast))
    model.train()
    model_map = copy.deepcopy(model)  # before the timers wrap the forwards
    for m in (model, model_map):
        for mod in (m.roi_head, m.cls_score, m.bbox_pred):
            timers.wrap_forward(mod, "head")
        timers.wrap_function(m, "pool_rois", "head")
    gens = [torch.Generator().manual_seed(i) for i in range(cfg.train.images_per_batch)]
    cfg.train.loss = "map"
    criterion = build_criterion(cfg)
    criterion.num_threads = 1
    last = {}

    def map_step(m, b):
        loss, last["stats"] = map_loss(m, b, cfg, criterion, gens)
        return loss

    if args.full_path:
        steps.full_path_reason = lambda m: "--full-path"
    soft_rows, map_rows = _iterations(
        (lambda m, b: softmax_loss(m, b, cfg, gens)[0], model), (map_step, model_map),
        batches, args.repeats, timers, rows=lambda m: last["stats"]["grad_rows"])
    return [_report("Fast R-CNN (mapdet)", soft_rows, map_rows,
                    f"{per_img:.0f} SS proposals/img vs {cfg.train.rois_per_image} sampled")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[75, 300, 1200],
                    help="Faster R-CNN: RPN proposals per image in training (n, 4n, 16n)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--images", type=int, default=20, help="digits training images written")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("faster", "fast"), default=None)
    ap.add_argument("--checkpoint-faster", help="trained Faster R-CNN weights (digits config)")
    ap.add_argument("--checkpoint-fast", help="trained Fast R-CNN weights (digits config)")
    ap.add_argument("--data", type=Path, default=None, help="where to write the data")
    ap.add_argument("--full-path", action="store_true",
                    help="mAP iteration: one forward with autograd over every proposal")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timers = Timers()
    timers.wrap_function(loss_module, "windows_from_tensors", "to_numpy")
    timers.wrap_function(loss_module, "ap_pseudo_gradient_multiclass", "ap_grad")
    timers.wrap_function(MAPRoIHeads, "_note_cap", "cap")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        lines = []
        if args.only in (None, "faster"):
            lines += bench_faster(args, timers, root / "digits_frcnn")
        if args.only in (None, "fast"):
            lines += bench_fast(args, timers, root / "digits_fast", root / "cache")
    path = "full path" if args.full_path else "row subset"
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          f"at the end, torch threads {args.threads}, median of {args.repeats} iterations "
          f"(2 images of 160 px, forward + backward + SGD step), mAP step: {path}, ms")
    print("| detector | windows | softmax it. | mAP it. | ratio | extra | head, all rows | "
          "head, grad rows | backward | to numpy | loss | cap | rest | rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
