"""Run logging: the ``logging`` setup, a JSONL metrics log and TensorBoard event files."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "check_tensorboard", "setup_logging"]

#: The one-line error when TensorBoard logging is asked for and not installed.
TENSORBOARD_MISSING = ("output.tensorboard is true but TensorBoard is not installed: "
                       "pip install 'mapdet[tensorboard]', or set output.tensorboard=false")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO, file: str | Path | None = None) -> None:
    """Configure the ``mapdet`` logger: stderr at ``level``, and ``file`` (if given) at DEBUG.

    Calling it again replaces the handlers it installed before (not other ones).
    """
    logger = logging.getLogger("mapdet")
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        if getattr(h, "_mapdet", False):
            logger.removeHandler(h)
            h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(level)
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    stream._mapdet = True  # type: ignore[attr-defined]
    logger.addHandler(stream)
    if file is not None:
        add_file_handler(file)
    logger.propagate = False


def add_file_handler(file: str | Path) -> logging.Handler:
    """Also write ``mapdet`` log records (DEBUG and up) to ``file``; returns the handler."""
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._mapdet = True  # type: ignore[attr-defined]
    logging.getLogger("mapdet").addHandler(handler)
    return handler


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Keep the rows of ``path`` with ``iteration <= last_iteration`` (rewritten atomically)."""
    import os

    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("iteration", 0)) <= last_iteration:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def check_tensorboard(enabled: bool) -> None:
    """Raise a one-line :class:`~mapdet.config.ConfigError` when ``enabled`` and the
    ``tensorboard`` package (an extra: ``mapdet[tensorboard]``) is not installed."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        from mapdet.config import ConfigError

        raise ConfigError(TENSORBOARD_MISSING)


class MetricsLogger:
    """Scalars of a run to ``<run_dir>/metrics.jsonl`` (one JSON object per line) and, when
    ``tensorboard`` is true, to TensorBoard event files in ``<run_dir>/tensorboard``.

    On resume (``purge_step`` given) the records past ``purge_step`` (written after the
    checkpoint, before a crash) are dropped from both, so the logs read as one run.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False,
                 purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if purge_step is not None and self.path.is_file():
            _truncate_jsonl(self.path, purge_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                check_tensorboard(True)
            except Exception:
                self._file.close()
                raise
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
            except Exception as exc:  # tensorboard installed but broken: keep training
                logging.getLogger(__name__).warning("TensorBoard disabled: %s", exc)

    def log(self, iteration: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        """Record ``scalars`` at ``iteration`` (keys written as ``prefix/key`` to TensorBoard)."""
        row = {"iteration": iteration, "split": prefix}
        row.update({k: _jsonable(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                v = _jsonable(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, iteration)

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
