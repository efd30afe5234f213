"""The training loop, for both losses on the same Fast R-CNN model.

:func:`train` runs ``train.iterations`` SGD iterations (momentum, weight decay, step LR) of
either Fast R-CNN's multi-task loss (``train.loss: softmax``) or the mAP loss
(``train.loss: map``, :class:`mapdet.MAPLoss` + smooth-L1), see :mod:`mapdet.engine.steps`.

A run directory holds::

    config.yaml        the resolved configuration
    train.log          the log (DEBUG and up)
    metrics.jsonl      one JSON object per logged iteration
    tensorboard/       TensorBoard event files
    checkpoints/       iter_<iteration>.pt, atomically written, and a last_checkpoint pointer

Exact resume: the data order is a pure function of the seed and the iteration
(:class:`~mapdet.engine.schedule.DataOrder`), RoI sampling draws from a generator seeded by
``(seed, iteration)``, and checkpoints hold the model, optimizer, scheduler, the iteration
and the global RNG states (dropout). In deterministic mode on CPU a run interrupted and
resumed from a checkpoint ends with bit-identical weights to an uninterrupted run.

A non-finite loss stops training with :class:`TrainingDiverged` naming the iteration; no
checkpoint is written for the diverged state, so the last good one stays the latest.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mapdet.config import Config, ConfigError, config_from_dict
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import (
    build_criterion,
    build_dataset,
    build_model,
    build_proposals,
    resolve_device,
    set_threads,
)
from mapdet.engine.data_loading import make_train_loader
from mapdet.engine.distributed import (
    DistEnv,
    RankOrder,
    all_ranks,
    barrier,
    gather_dicts,
    init_distributed,
)
from mapdet.engine.faster_rcnn import faster_rcnn_loss
from mapdet.engine.logger import MetricsLogger, add_file_handler
from mapdet.engine.run_dir import RESUME_FREE_KEYS, RunDirectory, resume_differences
from mapdet.engine.schedule import DataOrder
from mapdet.engine.seeding import get_rng_state, seed_everything, set_deterministic, set_rng_state
from mapdet.engine.steps import map_loss, ranking_loss, softmax_loss, softmax_map_loss
from mapdet.progress import progress_bar

__all__ = ["TrainResult", "TrainingDiverged", "build_optimizer", "build_scheduler", "train"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last checkpoint."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    checkpoint: Path | None
    iterations: int
    sec_per_iter: float
    last_stats: dict[str, float] = field(default_factory=dict)
    num_classes: int = 0


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer`` (SGD with momentum, Adam or AdamW) at :meth:`Config.stage_lr`
    (``loss.lr`` for the mAP loss). As in Fast R-CNN, biases get ``lr * bias_lr_factor`` and
    no weight decay; other 1-D parameters (normalisation scales) get no weight decay."""
    t = cfg.train
    lr = cfg.stage_lr()
    weights, norms, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            biases.append(p)
        elif p.ndim <= 1:
            norms.append(p)
        else:
            weights.append(p)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": t.weight_decay},
        {"params": norms, "lr": lr, "weight_decay": 0.0},
        {"params": biases, "lr": lr * t.bias_lr_factor, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    """Step LR: multiply by ``lr_gamma`` at each of ``lr_steps``; linear warm-up over
    ``warmup_iterations`` (from 1/3 of the rate). Stepped once per iteration."""
    t = cfg.train
    steps, gamma, warm = list(t.lr_steps), t.lr_gamma, t.warmup_iterations

    def factor(it: int) -> float:
        f = gamma ** bisect.bisect_right(steps, it)
        if warm > 0 and it < warm:
            f *= 1.0 / 3.0 + (2.0 / 3.0) * it / warm
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Run directory and checkpoints
# --------------------------------------------------------------------------------------------


def make_run_dir(cfg: Config, out: str | Path | None = None) -> Path:
    """``out`` if given, else ``<output.dir>/<output.name or timestamp>`` (not created: see
    :class:`~mapdet.engine.run_dir.RunDirectory`)."""
    if out is None:
        name = cfg.output.name or datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.train.loss}"
        out = Path(cfg.output.dir) / name
    return Path(out)


def _resumed_config(cfg: Config, saved: Config, checkpoint: str | Path) -> Config:
    """The checkpoint's configuration, with the keys of ``cfg`` that may change on resume
    (:data:`~mapdet.engine.run_dir.RESUME_FREE_KEYS`: length, logging, workers, output,
    evaluation). Any other difference would silently change the run: a ConfigError names
    each one."""
    diffs = resume_differences(cfg.to_dict(), saved.to_dict())
    if diffs:
        listed = "; ".join(f"{k}={g!r} (the run has {s!r})" for k, g, s in diffs)
        raise ConfigError(
            f"--resume continues the run of {checkpoint} as it was configured, but these "
            f"settings differ and would change it: {listed}. Drop them (or use the run's own "
            "config.yaml), or start a new run with train.init_from=CHECKPOINT")
    given, out = cfg.to_dict(), saved.to_dict()
    for section, values in given.items():
        for key, value in values.items():
            if section in RESUME_FREE_KEYS or f"{section}.{key}" in RESUME_FREE_KEYS:
                out[section][key] = value
    return config_from_dict(out)


def _state(model, optimizer, scheduler, cfg: Config, iteration: int, order: DataOrder,
           class_names, stats: dict[str, float], criterion=None,
           rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    state = {
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": cfg.to_dict(),
        "rng": get_rng_state(),
        "data_position": order.position(iteration),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "metrics": {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
    }
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    memory = loss_state(criterion)
    if memory is not None:
        state["loss_memory"] = memory
    return state


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


def load_model_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load only the model weights of checkpoint ``path`` into ``model`` (``init_from``)."""
    state = ckpt.load_checkpoint(path)
    ckpt.load_model_state(model, state, "this model (different backbone or number of classes?)")
    return state


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _check_finite(loss: torch.Tensor, iteration: int, stats: dict[str, float], last: Path | None,
                  env: DistEnv) -> None:
    """Stop with :class:`TrainingDiverged` when the loss is not finite, on this rank or any
    other (under DDP every rank stops at the same iteration, before the backward pass's
    all-reduce, instead of waiting there for a rank that has left)."""
    finite_here = bool(torch.isfinite(loss).all())
    if all_ranks(finite_here, env, loss.device):
        return
    parts = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if "loss" in k)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    value = (f"the loss is {loss.item()}" if not finite_here
             else f"the loss of another rank is not finite (rank {env.rank}: {loss.item():.4g})")
    raise TrainingDiverged(
        f"training diverged: {value} at iteration {iteration + 1} ({parts}); stopped "
        f"without saving; {where}. Try a lower "
        f"{'loss.lr' if 'loss_map' in stats else 'train.lr'}.")


def _generator(seed: int, iteration: int, slot: int) -> torch.Generator:
    """The RoI-sampling generator of image ``slot`` of the (global) minibatch of
    ``iteration``: a pure function of its arguments, so that a run on several ranks samples
    exactly what a single process with the global batch would."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + iteration * 1_009 + slot) % 2**63)


class _Running:
    """Exponential moving averages of the logged statistics (for the progress bar)."""

    def __init__(self, momentum: float = 0.9):
        self.m = momentum
        self.values: dict[str, float] = {}

    def update(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            old = self.values.get(k)
            self.values[k] = v if old is None else self.m * old + (1 - self.m) * v


def train(
    cfg: Config,
    *,
    out: str | Path | None = None,
    resume: str | Path | bool | None = None,
    callbacks: list[Callable[[int, dict[str, float]], None]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train a Fast R-CNN model as configured and return where its checkpoint is.

    Args:
        cfg: the configuration.
        out: the run directory (default ``<output.dir>/<output.name or timestamp>``).
        resume: ``True``: continue from the latest checkpoint in ``out``; a path: continue
            from that checkpoint (its run directory becomes ``out`` unless given). The
            checkpoint's configuration is used; ``cfg`` may differ from it only in
            :data:`~mapdet.engine.run_dir.RESUME_FREE_KEYS` (e.g. a larger
            ``train.iterations`` to train longer): any other difference is a ConfigError
            naming each key.
        callbacks: called as ``fn(iteration, stats)`` after every iteration (1-based count of
            finished iterations); an exception raised there stops training (tests use it to
            simulate a crash).
        progress: show a tqdm progress bar.
        overwrite: accept a non-empty ``out`` without ``resume``, deleting the earlier
            run's outputs there (see :class:`~mapdet.engine.run_dir.RunDirectory`, which
            also locks the directory against a second concurrent run).

    Raises:
        TrainingDiverged: a non-finite loss.
        RunDirError: ``out`` is not empty (without ``resume``/``overwrite``) or is locked.
        CheckpointError, ConfigError, FileNotFoundError, ...: bad input, naming the file/key.
    """
    resume_state = None
    if resume:
        if resume is True:
            if out is None:
                raise ValueError("--resume without a checkpoint needs the run directory (--out)")
            found = ckpt.find_last_checkpoint(out)
            if found is None:
                raise ckpt.CheckpointError(f"nothing to resume: no checkpoint in {out}")
            resume = found
        resume_state = ckpt.load_checkpoint(resume)
        if out is None:
            p = Path(resume_state["path"]).resolve().parent
            out = p.parent if p.name == "checkpoints" else p
        cfg = _resumed_config(cfg, config_from_dict(resume_state["config"]),
                              resume_state["path"])

    run_dir = make_run_dir(cfg, out)
    with RunDirectory(run_dir, resume=resume_state is not None, overwrite=overwrite) as rd:
        # Only rank 0 writes into the run directory (the other ranks log to stderr).
        handler = add_file_handler(run_dir / "train.log") if rd.main else None
        try:
            return _train(cfg, run_dir, resume_state, callbacks or [], progress)
        finally:
            if handler is not None:
                logging.getLogger("mapdet").removeHandler(handler)
                handler.close()


def _train(cfg: Config, run_dir: Path, resume_state, callbacks, progress: bool) -> TrainResult:
    t = cfg.train
    set_threads(t.threads)
    set_deterministic(t.deterministic)
    seed_everything(t.seed)
    device = resolve_device(t.device)
    env = init_distributed(device)
    if env.distributed and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if env.is_main:
        cfg.save(run_dir / "config.yaml")
    log.info("run directory %s, device %s, loss %s, rank %d of %d", run_dir, device, t.loss,
             env.rank, env.world_size)

    dataset = build_dataset(cfg, "train")
    proposals = build_proposals(cfg, dataset, "train", progress=progress and env.is_main)
    model = build_model(cfg, dataset.num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    order = DataOrder(len(dataset), t.images_per_batch * env.world_size, t.seed, cfg.data.flip)
    rank_order = RankOrder(order, env.rank, env.world_size)
    criterion = build_criterion(cfg, distributed=env.distributed, model=model)
    faster = cfg.model.arch == "faster_rcnn"
    if t.loss in ("map", "softmax_map"):
        lc = cfg.loss
        log.info("mAP stage: lr %g (loss.lr; train.lr %g is the softmax stage's), "
                 "normalization %s, min_step %g, memory %d", cfg.stage_lr(), t.lr,
                 lc.normalization, lc.min_step, lc.memory)

    ckpt_dir = run_dir / "checkpoints"
    start = 0
    last_ckpt: Path | None = None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(_rank_rng_state(resume_state, env))
        load_loss_state(criterion, resume_state.get("loss_memory"))
        start = int(resume_state["iteration"])
        if int(resume_state.get("data_position", order.position(start))) != order.position(start):
            log.warning("checkpoint data position %s differs from iteration %d x %d images",
                        resume_state.get("data_position"), start, t.images_per_batch)
        last_ckpt = Path(resume_state["path"])
        log.info("resumed from %s at iteration %d", last_ckpt, start)
    elif t.init_from:
        load_model_weights(model, t.init_from)
        log.info("initialised the model from %s", t.init_from)

    train_model = model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    metrics = (MetricsLogger(run_dir, tensorboard=cfg.output.tensorboard,
                             purge_step=start if resume_state is not None else None)
               if env.is_main else _NoMetrics())
    running = _Running()
    stats: dict[str, float] = {}
    model.train()
    loader = make_train_loader(dataset, proposals, cfg, rank_order, start, t.iterations, device)
    bar = progress_bar(total=t.iterations, initial=start, enabled=progress and env.is_main,
                       dynamic_ncols=True, desc=f"train[{t.loss}]", leave=False)
    step_times: list[float] = []
    try:
        for it, batch in zip(range(start, t.iterations), loader, strict=False):
            t0 = time.perf_counter()
            gens = [_generator(t.seed, it, slot) for slot in rank_order.slots()]
            if faster:  # the model computes its own loss (its RoI heads hold the MAPLoss)
                loss, stats = faster_rcnn_loss(train_model, batch, gens)
            elif t.loss in ("ap_loss", "rank_sort"):
                loss, stats = ranking_loss(train_model, batch, cfg, gens)
            elif t.loss == "softmax_map":
                loss, stats = softmax_map_loss(train_model, batch, cfg, criterion, gens)
            elif criterion is None:
                loss, stats = softmax_loss(train_model, batch, cfg, gens)
            else:
                loss, stats = map_loss(train_model, batch, cfg, criterion, gens)
            _check_finite(loss, it, stats, last_ckpt, env)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                stats["grad_norm"] = float(norm)
            optimizer.step()
            stats["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step_times.append(time.perf_counter() - t0)
            stats["sec_per_iter"] = step_times[-1]
            running.update(stats)
            done = it + 1
            if done % t.log_every == 0 or done == t.iterations:
                metrics.log(done, stats)
                log.debug("iteration %d: %s", done, _fmt(stats))
            bar.set_postfix(_postfix(running.values), refresh=False)
            bar.update(1)
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.iterations:
                last_ckpt = _save(model, optimizer, scheduler, cfg, done, order, dataset,
                                  stats, ckpt_dir, criterion, env)
            for fn in callbacks:
                fn(done, stats)
        done = max(t.iterations, start)
        final = ckpt.checkpoint_path(ckpt_dir, done)
        if last_ckpt is None or Path(last_ckpt).resolve() != final.resolve():
            last_ckpt = _save(model, optimizer, scheduler, cfg, done, order, dataset, stats,
                              ckpt_dir, criterion, env)
    finally:
        bar.close()
        metrics.close()
    # Skip the first iteration (warm-up, allocations) in the timing when there are several.
    timed = step_times[1:] if len(step_times) > 1 else step_times
    spi = sum(timed) / len(timed) if timed else math.nan
    log.info("finished %d iterations (%.3f s/iteration); checkpoint %s", done, spi, last_ckpt)
    return TrainResult(run_dir, last_ckpt, done, spi, running.values, dataset.num_classes)


class _NoMetrics:
    """Stands in for the metrics logger on ranks other than 0 (only rank 0 writes)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _save(model, optimizer, scheduler, cfg, done, order, dataset, stats, ckpt_dir,
          criterion=None, env: DistEnv | None = None) -> Path:
    """Write a checkpoint (rank 0 only; the others wait for it) and return its path."""
    env = env or DistEnv()
    rng_per_rank = None
    if env.distributed:  # every rank's generators, so that a resume restores each its own
        states = gather_dicts({env.rank: get_rng_state()}, env)
        rng_per_rank = [states[r] for r in range(env.world_size)]
    if not env.is_main:
        barrier(env)
        return ckpt.checkpoint_path(ckpt_dir, done)
    path = ckpt.save_checkpoint(
        ckpt.checkpoint_path(ckpt_dir, done),
        _state(model, optimizer, scheduler, cfg, done, order, dataset.class_names, stats,
               criterion, rng_per_rank),
    )
    ckpt.write_last_pointer(ckpt_dir, path)
    ckpt.prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
    log.info("saved checkpoint %s", path)
    barrier(env)
    return path


def _fmt(stats: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, (int, float)))


def _postfix(values: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "mAP", "accuracy", "lr")
    return {k: f"{values[k]:.3g}" for k in keys if k in values}
