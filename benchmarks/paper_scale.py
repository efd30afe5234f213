"""The paper's scale as a smoke run anyone can repeat: VGG16, about 500 x 375 images rescaled
to 600 px, 2,000 proposals per image, 20 classes, with the VOC07 configs.

What it does, in a work folder (``--work``, default a temporary folder):

1. writes a VOC2007-layout data set (``VOCdevkit/VOC2007``: ``JPEGImages``, ``Annotations``,
   ``ImageSets/Main/{trainval,test}.txt``) of ``--train-images`` + ``--test-images`` pictures
   of 500 x 375 pixels, 1-4 objects each from the 20 VOC classes, drawn from ``--seed``;
2. writes 2,000 proposals per image in the original Fast R-CNN ``.mat`` format
   (``selective_search_data/voc_2007_{trainval,test}.mat``: 1-based ``y1 x1 y2 x2``), a
   Selective-Search-like mix of windows around the objects and windows anywhere;
3. runs, each as its own process, ``mapdet train configs/voc07_vgg16_softmax.yaml`` for
   ``--iterations`` iterations (``model.pretrained=false``), then ``mapdet train
   configs/voc07_vgg16_map.yaml`` from that run, then ``mapdet eval`` and ``mapdet detect``
   on the mAP run;
4. in this process, times one softmax iteration and one mAP iteration split into their parts
   (network forward and backward against the CPU loss), with the same model and batch.

It prints one table: wall time, seconds per iteration (the training loop's own figure, first
iteration excluded) and peak resident memory of each command, and the mAP iteration's split.
Not a timed test: the figures depend on the machine, which the table names.

    python benchmarks/paper_scale.py                       # 3 iterations per loss
    python benchmarks/paper_scale.py --iterations 5 --work /tmp/paper_scale --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 500, 375
PROPOSALS_PER_IMAGE = 2000


# -- the data set ------------------------------------------------------------------------------
def _object_boxes(rng: np.random.Generator) -> np.ndarray:
    """1-4 boxes ``(M, 4)`` xyxy inside a 500 x 375 image, 40-300 px on a side."""
    m = int(rng.integers(1, 5))
    w = rng.uniform(40, 300, m)
    h = rng.uniform(40, 250, m)
    x1 = rng.uniform(0, WIDTH - w)
    y1 = rng.uniform(0, HEIGHT - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def _picture(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: a noisy background with one filled, textured rectangle per box."""
    img = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) // 4 + 64
    for b in boxes.astype(int):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        img[b[1]:b[3], b[0]:b[2]] = colour
        img[b[1]:b[3]:7, b[0]:b[2]] //= 2
    return img


def _xml(image_id: str, boxes: np.ndarray, labels: list[str]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}"
        f"</ymin><xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
        for b, name in zip(boxes, labels, strict=True))
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{WIDTH}</width><height>{HEIGHT}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>")


def _proposals(rng: np.random.Generator, boxes: np.ndarray) -> np.ndarray:
    """``(2000, 4)`` xyxy: half jittered copies of the objects (many overlapping windows per
    object, as Selective Search gives), half windows of any size anywhere."""
    n_near = PROPOSALS_PER_IMAGE // 2
    src = boxes[rng.integers(0, len(boxes), n_near)]
    wh = np.stack([src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]] * 2, axis=1)
    near = src + rng.normal(0, 0.15, (n_near, 4)) * wh
    n_far = PROPOSALS_PER_IMAGE - n_near
    x = np.sort(rng.uniform(0, WIDTH, (n_far, 2)), axis=1)
    y = np.sort(rng.uniform(0, HEIGHT, (n_far, 2)), axis=1)
    far = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    out = np.concatenate([near, far])
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, WIDTH)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, HEIGHT)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 8).clip(max=[WIDTH, HEIGHT])
    out[:, :2] = np.minimum(out[:, :2], out[:, 2:] - 8)
    return np.round(out)


def _write_mat(path: Path, ids: list[str], props: dict[str, np.ndarray]) -> None:
    """Fast R-CNN's ``selective_search_data`` layout: cell arrays ``boxes`` (1-based
    ``y1 x1 y2 x2``) and ``images``."""
    import scipy.io

    boxes = np.empty((1, len(ids)), dtype=object)
    images = np.empty((1, len(ids)), dtype=object)
    for j, i in enumerate(ids):
        p = props[i]
        boxes[0, j] = np.stack([p[:, 1] + 1, p[:, 0] + 1, p[:, 3], p[:, 2]], axis=1)
        images[0, j] = i
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"boxes": boxes, "images": images})


def make_dataset(work: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Writes the VOC layout and the two proposal files under ``work``; returns their paths."""
    from PIL import Image

    from mapdet.data.voc import VOC_CLASSES

    rng = np.random.default_rng(seed)
    base = work / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    splits = {"trainval": [f"{k:06d}" for k in range(n_train)],
              "test": [f"{k:06d}" for k in range(n_train, n_train + n_test)]}
    props: dict[str, np.ndarray] = {}
    for ids in splits.values():
        for i in ids:
            boxes = _object_boxes(rng)
            labels = [VOC_CLASSES[int(c)] for c in rng.integers(0, 20, len(boxes))]
            Image.fromarray(_picture(rng, boxes)).save(base / "JPEGImages" / f"{i}.jpg",
                                                      quality=90)
            (base / "Annotations" / f"{i}.xml").write_text(_xml(i, boxes, labels))
            props[i] = _proposals(rng, boxes)
    out = {"root": work / "VOCdevkit"}
    for split, ids in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        out[split] = work / "selective_search_data" / f"voc_2007_{split}.mat"
        _write_mat(out[split], ids, props)
    return out


# -- the commands ------------------------------------------------------------------------------
def _common(paths: dict[str, Path], iterations: int, device: str) -> list[str]:
    return [f"data.root={paths['root']}", "model.pretrained=false", "data.num_workers=0",
            f"train.device={device}",
            "proposals.method=file", f"proposals.file={paths['trainval']}",
            f"proposals.test_file={paths['test']}", f"train.iterations={iterations}",
            "train.checkpoint_every=0", "train.log_every=1", "output.tensorboard=false",
            "train.threads=1"]


def _run(name: str, args: list[str], log_dir: Path) -> dict:
    """Runs ``python -m mapdet ARGS`` as a child process: its wall time, its peak resident
    memory (``wait4``'s ``ru_maxrss``), its exit code, and the training loop's s/iteration."""
    log = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mapdet", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    row = {"rc": proc.returncode, "wall_s": time.perf_counter() - t0,
           "peak_rss_mb": usage.ru_maxrss / 1024, "sec_per_iter": _sec_per_iter(text),
           "log": str(log)}
    if row["rc"] != 0:
        row["error"] = text.strip().splitlines()[-1] if text.strip() else "no output"
    return row


def _sec_per_iter(text: str) -> float | None:
    marker = "iterations ("
    for line in reversed(text.splitlines()):
        if marker in line and "s/iteration" in line:
            return float(line.split(marker)[1].split()[0])
    return None


# -- the in-process split of one iteration -----------------------------------------------------
def iteration_split(paths: dict[str, Path], checkpoint: Path, repeats: int, device: str
                    ) -> dict:
    """One softmax and one mAP iteration on the same model and batch, split into the network's
    forward + backward and the loss on the CPU (``MAPLoss``'s forward, timed around the
    criterion; its backward only hands back a precomputed gradient). Minimum over
    ``repeats`` (the training commands before it have compiled the kernels into numba's
    on-disk cache; on a GPU use 2 or more: the first call warms the device up). On the CPU the
    times are this process's CPU time; on a GPU, wall time with the device synchronised
    before each clock reading."""
    import torch

    from mapdet.config import load_config
    from mapdet.engine import steps
    from mapdet.engine.builders import build_criterion, build_dataset, build_model, build_proposals
    from mapdet.engine.data_loading import make_train_loader
    from mapdet.engine.schedule import DataOrder
    from mapdet.engine.train import load_model_weights

    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
    else:
        clock = time.process_time
    over = _common(paths, 1, device)
    cfg = load_config(REPO / "configs" / "voc07_vgg16_map.yaml",
                      [*over, f"train.init_from={checkpoint}"])
    dataset = build_dataset(cfg, "train")
    proposals = build_proposals(cfg, dataset, "train", progress=False)
    model = build_model(cfg, dataset.num_classes)
    load_model_weights(model, checkpoint)
    model.to(dev)
    model.train()
    order = DataOrder(len(dataset), cfg.train.images_per_batch, 0, cfg.data.flip)
    loader = make_train_loader(dataset, proposals, cfg, order, 0, 1, dev)
    batch = next(iter(loader))
    criterion = build_criterion(cfg, distributed=False, model=model)
    loss_time = [0.0]
    inner = criterion.forward

    def timed_forward(*a, **k):
        t0 = clock()
        out = inner(*a, **k)
        loss_time[0] += clock() - t0
        return out

    criterion.forward = timed_forward
    soft_cfg = load_config(REPO / "configs" / "voc07_vgg16_softmax.yaml", over)
    rows: dict[str, list[float]] = {"softmax": [], "map": [], "map_loss": []}
    for r in range(repeats):
        gens = [torch.Generator().manual_seed(r + s) for s in range(len(batch.samples))]
        model.zero_grad(set_to_none=True)
        t0 = clock()
        loss, _ = steps.softmax_loss(model, batch, soft_cfg, gens)
        loss.backward()
        t_soft = clock() - t0
        model.zero_grad(set_to_none=True)
        loss_time[0] = 0.0
        t0 = clock()
        loss, stats = steps.map_loss(model, batch, cfg, criterion, gens)
        loss.backward()
        t_map = clock() - t0
        rows["softmax"].append(t_soft)
        rows["map"].append(t_map)
        rows["map_loss"].append(loss_time[0])
    best = {k: min(v) for k, v in rows.items()}
    return {"softmax_s": best["softmax"], "map_s": best["map"], "map_loss_s": best["map_loss"],
            "map_network_s": best["map"] - best["map_loss"],
            "windows": int(sum(len(s.proposals) for s in batch.samples)),
            "grad_rows": stats.get("grad_rows")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=6)
    ap.add_argument("--test-images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the in-process split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (train.device)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    work = args.work or Path(tempfile.mkdtemp(prefix="mapdet-paper-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_dataset(work, args.train_images, args.test_images, args.seed)
    made = time.perf_counter() - t0
    over = _common(paths, args.iterations, args.device)
    soft, mp = work / "runs" / "softmax", work / "runs" / "map"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    image = paths["root"] / "VOC2007" / "JPEGImages" / "000000.jpg"
    commands = [
        ("train softmax", ["train", "configs/voc07_vgg16_softmax.yaml", *over, "--out", str(soft),
                           "--no-eval", "--no-progress"]),
        ("train map", ["train", "configs/voc07_vgg16_map.yaml", *over,
                       f"train.init_from={soft}", "--out", str(mp), "--no-progress"]),
        ("eval", ["eval", "--checkpoint", str(mp), "--out", str(work / "eval"),
                  "--no-progress"]),
        ("detect", ["detect", str(image), "--checkpoint", str(mp), "--out",
                    str(work / "detections")]),
    ]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{platform.python_version()}", "device": args.device,
               "work": str(work), "iterations": args.iterations, "data_s": made,
               "train_images": args.train_images, "test_images": args.test_images,
               "proposals_per_image": PROPOSALS_PER_IMAGE, "commands": {}}
    failed = False
    for name, cmd in commands:
        row = _run(name.replace(" ", "_"), cmd, logs)
        results["commands"][name] = row
        failed |= row["rc"] != 0
        print(f"{name:>14}: rc {row['rc']}, {row['wall_s']:.1f} s wall, "
              f"{row['peak_rss_mb']:.0f} MB peak RSS"
              + (f", {row['sec_per_iter']:.2f} s/iteration" if row["sec_per_iter"] else "")
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
        if row["rc"] != 0:
            break
    if not failed:
        from mapdet.engine.checkpoint import find_last_checkpoint

        split = iteration_split(paths, find_last_checkpoint(soft), args.repeats,
                                args.device)
        results["split"] = split
        clock = "wall time" if args.device.startswith("cuda") else "CPU time, 1 thread"
        print(f"one iteration on {args.device}, {clock}: softmax {split['softmax_s']:.2f} s; mAP "
              f"{split['map_s']:.2f} s = network {split['map_network_s']:.2f} s + CPU loss "
              f"{split['map_loss_s']:.3f} s ({split['windows']} windows, "
              f"{split['grad_rows']} rows with a gradient)")
    print(f"machine: {results['machine']}; peak RSS of this process tree "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        from mapdet.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
