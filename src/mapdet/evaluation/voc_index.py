"""Image ids -> positions in an evaluated set, for whole arrays of ids at once.

:class:`ImageIndex` maps the image ids of result files (a bytes array ``S``, as the
vectorised reader of :mod:`mapdet.evaluation.voc_results` gathers them) with a binary search
in the sorted ids' UTF-8 bytes, and lists of strings with a dictionary; both give the same
positions (``tests/test_eval_voc_reader.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["ImageIndex"]


class ImageIndex:
    """Image ids -> positions in an evaluated set (see the module docstring).

    Args:
        image_ids: the set's ids in order (for a duplicated id, the first position counts).
    """

    def __init__(self, image_ids: Sequence[str]) -> None:
        self.ids = list(image_ids)
        self._str = {}
        for i, image_id in enumerate(self.ids):
            self._str.setdefault(image_id, i)
        self._bytes: dict[bytes, int] | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_unique(self) -> int:
        """The number of distinct ids."""
        return len(self._str)

    def lookup(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """``(D,)`` int64 positions of ``ids`` (strings, or a bytes array ``S``); -1 for an
        id not in the set."""
        if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" and ids.size:
            table = self._sorted_table()
            if table is not None:
                return self._lookup_sorted(ids, *table)
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if ids and isinstance(ids[0], bytes):
            if self._bytes is None:
                self._bytes = {k.encode("utf-8"): v for k, v in self._str.items()}
            table = self._bytes
        else:
            table = self._str
        return np.fromiter(map(table.get, ids, itertools.repeat(-1)), dtype=np.int64,
                           count=len(ids))

    def _sorted_table(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._sorted is None:
            self._sorted = _sorted_ids(self.ids) or (np.zeros(0, dtype="S1"), None)
        return None if self._sorted[1] is None else self._sorted

    @staticmethod
    def _lookup_sorted(ids: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Binary search of a bytes array ``ids`` in the sorted ``keys``."""
        if keys.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return np.where(keys[at] == ids, positions[at], -1)


def _sorted_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(keys (U,) S sorted, positions (U,) int64)`` of the distinct ids' UTF-8 bytes (the
    first position of a repeated id), or ``None`` when an id ends with a NUL byte (numpy's
    ``S`` type would drop it)."""
    raw = [i.encode("utf-8") for i in ids]
    if any(r.endswith(b"\0") for r in raw):
        return None
    keys = np.array(raw, dtype=f"S{max(1, max(map(len, raw), default=1))}")
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], order[first].astype(np.int64)
