"""MAPLoss(distributed=True) under 2 gloo processes equals one process on the global batch."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mapdet import MAPLoss
from mapdet.core.synthetic import proposal_like_outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank):
    o = proposal_like_outputs(num_images=2, windows_per_image=80, num_classes=3,
                              image_size=(200, 150), seed=20 + rank)
    targets = [dict(boxes=o.gt_boxes[o.gt_image_ids == b], labels=o.gt_labels[o.gt_image_ids == b],
                    difficult=o.gt_difficult[o.gt_image_ids == b]) for b in range(2)]
    return o, targets


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        o, targets = _shard(rank)
        probs = torch.tensor(o.probs, requires_grad=True)
        loss_fn = MAPLoss(normalization="none", distributed=True, num_threads=1)
        loss = loss_fn(probs, o.boxes, o.image_ids, targets)
        loss.backward()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), loss=loss.item(),
                 grad=probs.grad.numpy(), ap=loss_fn.last_ap)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_global_batch(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    shards = [_shard(r) for r in range(world)]
    probs = np.concatenate([s[0].probs for s in shards])
    boxes = np.concatenate([s[0].boxes for s in shards])
    ids = np.concatenate([s[0].image_ids + 2 * r for r, s in enumerate(shards)])
    targets = shards[0][1] + shards[1][1]
    p = torch.tensor(probs, requires_grad=True)
    single = MAPLoss(normalization="none")
    loss = single(p, boxes, ids, targets)
    loss.backward()
    n0 = shards[0][0].probs.shape[0]
    for r in range(world):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-12)
        np.testing.assert_allclose(got["ap"], single.last_ap, atol=1e-12)
        rows = slice(0, n0) if r == 0 else slice(n0, None)
        # Each rank's gradient is its share of the global one, times the world size
        # (DDP then averages the parameter gradients over the ranks).
        np.testing.assert_allclose(got["grad"], world * p.grad.numpy()[rows], atol=1e-12)
