"""Benchmark: per-step cost of the global-batch gather of MAPLoss(distributed=True).

Spawns ``--world`` gloo processes on this machine; each holds one minibatch of
``--images`` images x ``--windows`` windows x ``--classes`` classes (proposal-like) and
runs the loss ``--steps`` times. Prints the time of the gather alone (all_gather of the
windows, boxes and targets) and of the whole distributed loss, per step, on rank 0.

    python benchmarks/bench_gather.py
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mapdet.core.synthetic import proposal_like_outputs
from mapdet.loss import MAPLoss, _gather_windows, windows_from_tensors


def _worker(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    o = proposal_like_outputs(args.images, args.windows, args.classes, seed=rank)
    targets = [dict(boxes=o.gt_boxes[o.gt_image_ids == b], labels=o.gt_labels[o.gt_image_ids == b],
                    difficult=o.gt_difficult[o.gt_image_ids == b]) for b in range(args.images)]
    probs = torch.tensor(o.probs, dtype=torch.float32, requires_grad=True)
    boxes = torch.tensor(o.boxes, dtype=torch.float32)
    loss_fn = MAPLoss(normalization="none", distributed=True, num_threads=1)
    w = windows_from_tensors(probs, boxes, o.image_ids, targets)
    gather, total = [], []
    for _ in range(args.steps + 1):
        dist.barrier()
        t = time.perf_counter()
        _gather_windows(w)
        gather.append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        loss_fn(probs, boxes, o.image_ids, targets).backward()
        total.append(time.perf_counter() - t)
    if rank == 0:
        mb = (w.probs.nbytes + w.boxes.nbytes) / 2**20
        print(f"world {args.world} (gloo, CPU), per rank {args.images} images x {args.windows} "
              f"windows x {args.classes} classes ({mb:.1f} MiB of scores and boxes)")
        print(f"gather per step:             {np.median(gather[1:]) * 1e3:.1f} ms (median)")
        print(f"distributed loss per step:   {np.median(total[1:]) * 1e3:.1f} ms (median, "
              "gather + AP and pseudo-gradient of the global batch)")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args, port), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
