"""What a training checkpoint holds and restores: :class:`TrainState`, written by
:class:`Checkpointer`.

The checkpoint dict (:mod:`mapdet.engine.checkpoint`) is :meth:`TrainState.to_dict`: the
model, optimizer and scheduler states, the configuration, the iteration and its data
position, the class names, the logged metrics, the global RNG states (every rank's under
DDP) and the loss's own state (the mAP loss's AP memory and smoothing draws).
:meth:`TrainState.restore` puts all of it back, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mapdet.config import Config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.distributed import DistEnv, barrier, gather_dicts
from mapdet.engine.schedule import DataOrder
from mapdet.engine.seeding import get_rng_state, set_rng_state

__all__ = ["Checkpointer", "TrainState", "load_loss_state", "loss_state"]

log = logging.getLogger(__name__)


def loss_state(criterion) -> dict[str, Any] | None:
    """The extra state of a :class:`mapdet.MAPLoss` (its AP memory, ``loss.memory`` > 0; its
    arrays are tensors, so checkpoints load with ``weights_only=True``; the count of its
    smoothing draws); ``None`` when there is nothing to keep."""
    if criterion is None or not (getattr(criterion, "memory", 0)
                                 or getattr(criterion, "smoothing", "none") != "none"):
        return None
    return criterion.get_extra_state()


def load_loss_state(criterion, state: dict[str, Any] | None) -> None:
    """Restore what :func:`loss_state` saved (no-op for ``None``)."""
    if state is not None and criterion is not None:
        criterion.set_extra_state(state)


@dataclass
class TrainState:
    """The objects of a training run whose state a checkpoint holds.

    ``model`` is the bare module (not its ``DistributedDataParallel`` wrapper);
    ``criterion`` the loss of :func:`~mapdet.engine.builders.build_criterion` (or ``None``).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfg: Config
    order: DataOrder
    class_names: tuple[str, ...]
    criterion: torch.nn.Module | None = None

    def to_dict(self, iteration: int, stats: dict[str, float],
                rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint after ``iteration`` finished iterations, with the last ``stats``."""
        state = {
            "iteration": iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "rng": get_rng_state(),
            "data_position": self.order.position(iteration),
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "metrics": {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        memory = loss_state(self.criterion)
        if memory is not None:
            state["loss_memory"] = memory
        return state

    def restore(self, saved: dict[str, Any], env: DistEnv) -> int:
        """Load checkpoint ``saved`` (a :meth:`to_dict` read back) into the objects and this
        rank's generators; returns its iteration."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(_rank_rng_state(saved, env))
        load_loss_state(self.criterion, saved.get("loss_memory"))
        start = int(saved["iteration"])
        position = self.order.position(start)
        if int(saved.get("data_position", position)) != position:
            log.warning("checkpoint data position %s differs from iteration %d x %d images",
                        saved.get("data_position"), start, self.cfg.train.images_per_batch)
        return start


def _rank_rng_state(state: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """The generator state this rank resumes from: its own under DDP when the checkpoint was
    written by as many ranks (each rank's dropout draws differ), else the saved ``rng``."""
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    if env.distributed or per_rank is not None:
        log.warning("the checkpoint holds the random state of %s rank(s), this job has %d: "
                    "every rank resumes from rank 0's (dropout masks will differ from an "
                    "uninterrupted run)", len(per_rank) if per_rank else 1, env.world_size)
    return state["rng"]


@dataclass
class Checkpointer:
    """Writes ``state``'s checkpoints into ``directory`` (rank 0 writes, the other ranks
    wait); ``last`` is the latest one written or resumed from."""

    state: TrainState
    directory: Path
    env: DistEnv
    last: Path | None = None

    def save(self, done: int, stats: dict[str, float]) -> Path:
        """Write the checkpoint after ``done`` iterations, point ``last_checkpoint`` at it,
        prune to ``train.keep_checkpoints``, and return its path."""
        env = self.env
        rng_per_rank = None
        if env.distributed:  # every rank's generators, so that a resume restores each its own
            states = gather_dicts({env.rank: get_rng_state()}, env)
            rng_per_rank = [states[r] for r in range(env.world_size)]
        path = ckpt.checkpoint_path(self.directory, done)
        if env.is_main:
            path = ckpt.save_checkpoint(path, self.state.to_dict(done, stats, rng_per_rank))
            ckpt.write_last_pointer(self.directory, path)
            ckpt.prune_checkpoints(self.directory, self.state.cfg.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        barrier(env)
        self.last = path
        return path

    def save_final(self, done: int, stats: dict[str, float]) -> Path:
        """The checkpoint after the last iteration, written unless it is ``last`` already."""
        final = ckpt.checkpoint_path(self.directory, done)
        if self.last is None or Path(self.last).resolve() != final.resolve():
            return self.save(done, stats)
        return self.last
