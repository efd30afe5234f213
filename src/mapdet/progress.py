"""Progress bars that suit both a terminal and a log file (a leaf: every layer may use it).

:func:`progress_bar` is ``tqdm`` with two rules:

- ``enabled=False`` (``--no-progress``) gives a bar that draws nothing;
- when the bar's stream (stderr) is not a terminal (a log file, a CI job, ``nohup``), tqdm's
  carriage-return redraws would each become a line of the log. There the bar redraws at most
  every :data:`LOG_INTERVAL_S` seconds (and at the end), so a 16-minute run adds a few dozen
  lines, not one per iteration.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_S", "is_terminal", "progress_bar"]

#: Seconds between two redraws of a bar written to a non-terminal stream.
LOG_INTERVAL_S = 30.0


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress_bar(iterable: Any = None, *, enabled: bool = True, file: Any = None,
                 **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar over ``iterable`` (or with ``total=``), as described in the module
    docstring; ``kwargs`` go to ``tqdm`` (``total``, ``initial``, ``desc``, ``unit``, ...)."""
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if not is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, 10.0))
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, file=stream, **kwargs)
