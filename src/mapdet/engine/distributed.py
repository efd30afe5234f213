"""Distributed training with PyTorch DDP, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m mapdet train CONFIG ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the process group (nccl on GPUs, gloo on
CPU). The global minibatch is ``train.images_per_batch`` images *per rank*: rank ``r`` takes
slots ``r*B .. (r+1)*B-1`` of the global data order, so that a run on N ranks sees exactly the
images (and flips, and RoI samples) of a single-process run with ``N*B`` images per batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mapdet.engine.schedule import DataOrder

__all__ = ["DistEnv", "RankOrder", "all_ranks", "barrier", "current_env", "gather_dicts",
           "init_distributed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group described by torchrun's environment, if any.

    Returns the :class:`DistEnv`; with ``WORLD_SIZE`` unset or 1, does nothing. On CUDA the
    process uses GPU ``LOCAL_RANK`` and the nccl backend; otherwise gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank)


def current_env() -> DistEnv:
    """The :class:`DistEnv` of an already initialised process group (else not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return DistEnv()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def gather_dicts(part: dict, env: DistEnv) -> dict:
    """Merge every rank's dict (``all_gather_object``); keys must be disjoint."""
    if not env.distributed:
        return part
    parts: list[dict | None] = [None] * env.world_size
    dist.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p or {})
    return merged


def all_ranks(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """``True`` when ``flag`` is true on every rank: one all-reduce (MIN) of one integer.

    Every rank must call it at the same point. Used to agree on a decision that one rank
    alone could otherwise take (stopping on a non-finite loss), so that no rank is left
    waiting in a collective for a peer that has already left the loop. ``device`` is where
    the backend expects its tensors (CUDA for nccl, CPU for gloo).
    """
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


@dataclass(frozen=True)
class RankOrder:
    """The slice of a global :class:`DataOrder` that one rank trains on.

    ``order.images_per_batch`` is the *global* batch; rank ``r`` of ``world_size`` gets
    slots ``[r * b, (r + 1) * b)`` with ``b = order.images_per_batch // world_size``.
    """

    order: DataOrder
    rank: int
    world_size: int

    def slots(self) -> range:
        b = self.order.images_per_batch // self.world_size
        return range(self.rank * b, (self.rank + 1) * b)

    def batch(self, iteration: int) -> list[tuple[int, bool]]:
        items = self.order.batch(iteration)
        return [items[s] for s in self.slots()]

    def position(self, iteration: int) -> int:
        return self.order.position(iteration)
