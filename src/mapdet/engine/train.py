"""The training loop, one for every loss.

:func:`train` runs ``train.iterations`` optimizer iterations (``train.optimizer``, weight
decay, step LR) of the step registered for ``train.loss`` (:mod:`mapdet.engine.steps`:
Fast R-CNN's multi-task loss, the mAP loss, the ranking losses, torchvision's Faster R-CNN),
with hooks around each step for logging, checkpoints and callbacks
(:mod:`mapdet.engine.hooks`). What a checkpoint holds is
:class:`~mapdet.engine.train_state.TrainState`.

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
from mapdet.engine.amp import MixedPrecision
from mapdet.engine.builders import (
    build_criterion,
    build_dataset,
    build_model,
    build_proposals,
    resolve_device,
    set_threads,
)
from mapdet.engine.data_loading import make_train_loader
from mapdet.engine.distributed import DistEnv, RankOrder, all_ranks, init_distributed
from mapdet.engine.hooks import CallbackHook, CheckpointHook, Hook, LogHook
from mapdet.engine.interrupt import StopHook, StopSignals
from mapdet.engine.logger import MetricsLogger, add_file_handler, check_tensorboard
from mapdet.engine.run_dir import RESUME_FREE_KEYS, RunDirectory, resume_differences
from mapdet.engine.schedule import DataOrder
from mapdet.engine.seeding import seed_everything, set_deterministic
from mapdet.engine.steps import Step, build_step
from mapdet.engine.train_state import Checkpointer, TrainState
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
        TrainingInterrupted: SIGINT or SIGTERM; a checkpoint of the iteration then finished
            was saved first (see :mod:`mapdet.engine.interrupt`).
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
        at = int(resume_state["iteration"])
        if cfg.train.iterations < at:
            raise ConfigError(
                f"--resume: {resume_state['path']} is at iteration {at}, past "
                f"train.iterations={cfg.train.iterations}; to train longer pass "
                f"train.iterations=N with N > {at}")
        if cfg.train.iterations == at:
            log.warning("--resume: %s is already at train.iterations=%d; nothing to train "
                        "(pass a larger train.iterations to train longer)",
                        resume_state["path"], at)

    check_tensorboard(cfg.output.tensorboard)  # before the run directory is made
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
    order = DataOrder(len(dataset), t.images_per_batch * env.world_size, t.seed, cfg.data.flip)
    rank_order = RankOrder(order, env.rank, env.world_size)
    criterion = build_criterion(cfg, distributed=env.distributed, model=model)
    step = build_step(cfg, criterion)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg), cfg, order,
                       tuple(dataset.class_names), criterion)
    checkpointer = Checkpointer(state, run_dir / "checkpoints", env)

    start = 0
    if resume_state is not None:
        start = state.restore(resume_state, env)
        checkpointer.last = Path(resume_state["path"])
        log.info("resumed from %s at iteration %d", checkpointer.last, start)
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
    model.train()
    loader = make_train_loader(dataset, proposals, cfg, rank_order, start, t.iterations, device)
    bar = progress_bar(total=t.iterations, initial=start, enabled=progress and env.is_main,
                       dynamic_ncols=True, desc=f"train[{t.loss}]", leave=False)
    logger = LogHook(metrics, bar, t.log_every, t.iterations)
    signals = StopSignals().install()
    stop = StopHook(signals, checkpointer, env, device)  # last: after the callbacks
    hooks = [logger, CheckpointHook(checkpointer, t.checkpoint_every, t.iterations),
             CallbackHook(callbacks), stop]
    try:
        step_times, stats = _loop(step, train_model, state, loader, range(start, t.iterations),
                           rank_order, hooks, checkpointer, env)
        done = max(t.iterations, start)
        for hook in hooks:
            hook.after_train(done, stats)
    except RuntimeError as exc:
        failure = stop.failure(exc)
        if failure is None:
            raise
        raise failure from exc
    finally:
        signals.restore()
        bar.close()
        metrics.close()
    # Skip the first iteration (warm-up, allocations) in the timing when there are several.
    timed = step_times[1:] if len(step_times) > 1 else step_times
    spi = sum(timed) / len(timed) if timed else math.nan
    log.info("finished %d iterations (%.3f s/iteration); checkpoint %s", done, spi,
             checkpointer.last)
    return TrainResult(run_dir, checkpointer.last, done, spi, logger.running.values,
                       dataset.num_classes)


def _loop(step: Step, train_model: torch.nn.Module, state: TrainState, loader,
          iterations: range, rank_order: RankOrder, hooks: list[Hook],
          checkpointer: Checkpointer, env: DistEnv) -> tuple[list[float], dict[str, float]]:
    """Run ``step`` for each iteration of ``iterations`` (one batch of ``loader`` each), with
    the backward pass, gradient clipping, the optimizer and LR steps, and ``hooks`` around
    it; under ``train.amp`` the step's forward passes run in autocast (:mod:`.amp`). Returns
    each iteration's seconds and the last iteration's statistics."""
    t = state.cfg.train
    optimizer, scheduler = state.optimizer, state.scheduler
    precision = MixedPrecision(t.amp, next(state.model.parameters()).device)
    step_times: list[float] = []
    stats: dict[str, float] = {}
    for it, batch in zip(iterations, loader, strict=False):
        for hook in hooks:
            hook.before_step(it)
        t0 = time.perf_counter()
        gens = [_generator(t.seed, it, slot) for slot in rank_order.slots()]
        with precision.autocast():
            loss, stats = step(train_model, batch, gens)
        _check_finite(loss, it, stats, checkpointer.last, env)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        norm = precision.step(optimizer, state.model.parameters(), t.clip_grad_norm)
        if norm is not None:
            stats["grad_norm"] = norm
        stats["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step_times.append(time.perf_counter() - t0)
        stats["sec_per_iter"] = step_times[-1]
        for hook in hooks:
            hook.after_step(it + 1, stats)
    return step_times, stats


class _NoMetrics:
    """Stands in for the metrics logger on ranks other than 0 (only rank 0 writes)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
