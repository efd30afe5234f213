"""Fixed-width text tables for the terminal: per-class AP of one or several methods.

Example (``format_per_class({"fast-rcnn": r1, "mapdet": r2})``)::

    class        fast-rcnn  mapdet
    ----------------------------------
    aeroplane         70.1    71.3
    ...
    ----------------------------------
    mAP               66.9    67.2
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

__all__ = ["PerClassResult", "format_cell", "format_per_class", "format_table"]


class PerClassResult(Protocol):
    """What :func:`format_per_class` reads of a result (e.g. an
    :class:`~mapdet.evaluation.voc.EvalResult`): a leaf of the evaluation package, so it
    imports none of its scorers."""

    per_class: Mapping[str, float]
    mAP: float


def format_cell(value: object, decimals: int = 1) -> str:
    """A cell's text: floats with ``decimals`` digits, NaN and ``None`` as ``"-"``."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{float(value):.{decimals}f}"
    return str(value)


def format_table(
    rows: Sequence[Sequence[object]],
    columns: Sequence[str],
    *,
    footer: Sequence[Sequence[object]] = (),
    decimals: int = 1,
) -> str:
    """Rows under a header, columns padded to their widest cell.

    The first column is left-aligned (names), the others right-aligned (numbers). A line of
    dashes separates the header, and the footer rows (e.g. the mean) when given.

    Args:
        rows: the body, each row with ``len(columns)`` cells.
        columns: the header.
        footer: rows printed after a separator.
        decimals: digits of float cells (see :func:`format_cell`).

    Returns:
        The table as one string, lines joined by ``"\\n"``, no trailing newline.
    """
    ncol = len(columns)
    body = [[format_cell(v, decimals) for v in r] for r in rows]
    foot = [[format_cell(v, decimals) for v in r] for r in footer]
    for r in body + foot:
        if len(r) != ncol:
            raise ValueError(f"a row has {len(r)} cells, the header {ncol}: {r}")
    all_rows = [list(columns)] + body + foot
    widths = [max(len(r[j]) for r in all_rows) for j in range(ncol)]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(widths[j]) for j, c in enumerate(cells) if j > 0]
        return "  ".join(parts).rstrip()

    rule = "-" * (sum(widths) + 2 * (ncol - 1))
    out = [line(columns), rule] + [line(r) for r in body]
    if foot:
        out += [rule] + [line(r) for r in foot]
    return "\n".join(out)


def format_per_class(
    results: Mapping[str, PerClassResult],
    *,
    scale: float = 100.0,
    decimals: int = 1,
    class_names: Sequence[str] | None = None,
) -> str:
    """Per-class AP table: classes as rows, one column per method, ``mAP`` at the bottom.

    Args:
        results: method name -> a result with ``per_class`` and ``mAP`` (an
            :class:`~mapdet.evaluation.voc.EvalResult`).
        scale: multiplies the APs (100 for percent, 1 for fractions).
        decimals: digits shown.
        class_names: the rows, in order (default: the classes of the results, in the order
            first met). A class missing from a result, or with an undefined AP, shows ``-``.
    """
    if not results:
        raise ValueError("format_per_class needs at least one result")
    if class_names is None:
        seen: dict[str, None] = {}
        for r in results.values():
            seen.update(dict.fromkeys(r.per_class))
        class_names = list(seen)
    nan = float("nan")
    rows = [[c] + [r.per_class.get(c, nan) * scale for r in results.values()]
            for c in class_names]
    footer = [["mAP"] + [r.mAP * scale for r in results.values()]]
    return format_table(rows, ["class", *results], footer=footer, decimals=decimals)
