"""Hooks the training loop calls around each step (detectron2's ``HookBase`` habit).

The loop (:func:`mapdet.engine.train.train`) runs, for each iteration ``it`` (0-based)::

    hook.before_step(it)            for every hook, in order
    loss, stats = step(model, batch, generators); backward; optimizer and LR step
    hook.after_step(it + 1, stats)  for every hook, in order (done = finished iterations)

and ``hook.after_train(done, stats)`` once the last iteration finished. Logging, checkpoints
and the caller's callbacks are hooks; an evaluation during training is one more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from mapdet.engine.train_state import Checkpointer

__all__ = ["CallbackHook", "CheckpointHook", "Hook", "LogHook", "Running"]

log = logging.getLogger(__name__)


class Hook:
    """Does nothing; subclasses override what they need."""

    def before_step(self, iteration: int) -> None:
        """Before iteration ``iteration`` (0-based) runs."""

    def after_step(self, done: int, stats: dict[str, float]) -> None:
        """After ``done`` iterations (1-based count) finished; ``stats`` are the last one's."""

    def after_train(self, done: int, stats: dict[str, float]) -> None:
        """After the last iteration (not called when training stopped with an error)."""


class Running:
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


class LogHook(Hook):
    """Every ``log_every`` iterations (and the last): ``stats`` into ``metrics`` (JSONL,
    TensorBoard) and the DEBUG log; every iteration: the progress bar's running averages."""

    def __init__(self, metrics: Any, bar: Any, log_every: int, iterations: int):
        self.metrics, self.bar = metrics, bar
        self.log_every, self.iterations = log_every, iterations
        self.running = Running()

    def after_step(self, done: int, stats: dict[str, float]) -> None:
        self.running.update(stats)
        if done % self.log_every == 0 or done == self.iterations:
            self.metrics.log(done, stats)
            log.debug("iteration %d: %s", done, _fmt(stats))
        self.bar.set_postfix(_postfix(self.running.values), refresh=False)
        self.bar.update(1)


class CheckpointHook(Hook):
    """A checkpoint every ``every`` iterations (0: none) before the last, and one after it."""

    def __init__(self, checkpointer: Checkpointer, every: int, iterations: int):
        self.checkpointer, self.every, self.iterations = checkpointer, every, iterations

    def after_step(self, done: int, stats: dict[str, float]) -> None:
        if self.every and done % self.every == 0 and done < self.iterations:
            self.checkpointer.save(done, stats)

    def after_train(self, done: int, stats: dict[str, float]) -> None:
        self.checkpointer.save_final(done, stats)


class CallbackHook(Hook):
    """The caller's ``fn(done, stats)`` after every iteration (an exception stops training)."""

    def __init__(self, callbacks: Sequence[Callable[[int, dict[str, float]], None]]):
        self.callbacks = list(callbacks)

    def after_step(self, done: int, stats: dict[str, float]) -> None:
        for fn in self.callbacks:
            fn(done, stats)


def _fmt(stats: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, (int, float)))


def _postfix(values: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "mAP", "accuracy", "lr")
    return {k: f"{values[k]:.3g}" for k in keys if k in values}
