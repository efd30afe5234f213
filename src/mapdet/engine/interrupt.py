"""How a training run stops: on SIGINT or SIGTERM without losing the iterations since the
last checkpoint, and under DDP when another rank dies.

:class:`StopSignals` turns the first SIGINT (Ctrl-C) or SIGTERM (what a cluster sends before
it preempts a job) into a request: the training loop finishes the iteration it is in, saves a
checkpoint at that iteration and raises :class:`TrainingInterrupted`. ``mapdet train`` then
exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal does not wait:
SIGINT raises ``KeyboardInterrupt`` and SIGTERM ``SystemExit(143)``, so that the ``finally``
blocks still run (an atomic write in progress removes its temporary file).

Under ``torchrun`` every rank must stop at the same iteration (the checkpoint gathers every
rank's generator states): :meth:`StopSignals.requested` takes the largest request over the
ranks, one small all-reduce per iteration.

When a rank dies (``kill -9``, out of memory, a lost node), the others fail in their next
collective (gloo reports a reset connection at once). :func:`peer_failure` turns that error
into :class:`RankFailure`, one line naming this rank, the iteration and the checkpoint to
resume from, so no survivor waits and the job ends; the launcher (``torchrun``, or
``torch.multiprocessing``) names the rank that died.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from mapdet.engine.distributed import DistEnv, all_ranks
from mapdet.engine.hooks import Hook
from mapdet.engine.train_state import Checkpointer

__all__ = ["RankFailure", "StopHook", "StopSignals", "TrainingInterrupted", "peer_failure"]

log = logging.getLogger(__name__)

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint at ``iteration``."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None) -> None:
        self.signum = int(signum)
        self.iteration = int(iteration)
        self.checkpoint = checkpoint
        name = signal.Signals(self.signum).name
        super().__init__(
            f"interrupted by {name} after iteration {iteration}; saved {checkpoint}; "
            "continue with --resume")

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, as a shell reports a process ended by that signal."""
        return 128 + self.signum


class RankFailure(RuntimeError):
    """Under DDP a collective failed: another rank has stopped; this one stops too."""


def peer_failure(exc: BaseException, env: DistEnv, iteration: int,
                 checkpoint: Path | None) -> RankFailure | None:
    """The :class:`RankFailure` that ``exc`` (raised during ``iteration``, 1-based) means, or
    ``None`` when it is not a failed collective of a distributed run."""
    if not env.distributed or not isinstance(exc, RuntimeError) or isinstance(exc, RankFailure):
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    if type(exc) is not RuntimeError and not isinstance(exc, dist_error):
        return None  # a subclass with its own meaning (a diverged loss, a bad checkpoint)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = (f"resume every rank with --resume from {checkpoint}" if checkpoint is not None
             else "no checkpoint was written yet")
    return RankFailure(
        f"rank {env.rank} of {env.world_size}: a collective failed during iteration "
        f"{iteration}, so another rank has stopped ({first[:300]}); this rank stops too; "
        f"{where}")


class StopSignals:
    """Context manager: SIGINT and SIGTERM request a stop instead of ending the process.

    Installed only in the main thread (Python delivers signals there); elsewhere it does
    nothing and :meth:`requested` only reflects the other ranks. The previous handlers are
    restored on exit.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # the second signal: stop now, without the save
            log.warning("second %s: stopping without saving", signal.Signals(signum).name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this iteration, then stopping "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def install(self) -> StopSignals:
        """Take over SIGINT and SIGTERM (also when the parent ignored SIGINT, as a shell
        does for a background job: the guarantee is the same however the run was started)."""
        if threading.current_thread() is threading.main_thread():
            for s in _HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def requested(self, env: DistEnv, device: torch.device) -> int:
        """The signal to stop on (0: none), decided alike on every rank: a rank that got
        none stops on SIGTERM when another got one. ``device``: as for
        :func:`~mapdet.engine.distributed.all_ranks`."""
        if all_ranks(self.signum == 0, env, device):
            return 0
        return self.signum or int(signal.SIGTERM)


class StopHook(Hook):
    """The training loop's last hook: after each iteration, when a stop was requested
    (:meth:`StopSignals.requested`), save that iteration's checkpoint and raise
    :class:`TrainingInterrupted`; after the last one, raise it when a signal came during the
    final save. :meth:`failure` names the iteration a failed collective interrupted."""

    def __init__(self, signals: StopSignals, checkpointer: Checkpointer, env: DistEnv,
                 device: torch.device) -> None:
        self.signals, self.checkpointer, self.env, self.device = signals, checkpointer, env, device
        self.current = 0

    def before_step(self, iteration: int) -> None:
        self.current = iteration + 1

    def after_step(self, done: int, stats: dict[str, float]) -> None:
        signum = self.signals.requested(self.env, self.device)
        if signum:
            raise TrainingInterrupted(signum, done, self.checkpointer.save_final(done, stats))

    def after_train(self, done: int, stats: dict[str, float]) -> None:
        signum = self.signals.requested(self.env, self.device)
        if signum:
            raise TrainingInterrupted(signum, done, self.checkpointer.last)

    def failure(self, exc: RuntimeError) -> RankFailure | None:
        """``exc`` as a :class:`RankFailure` when it is a failed collective, else ``None``."""
        return peer_failure(exc, self.env, self.current, self.checkpointer.last)
