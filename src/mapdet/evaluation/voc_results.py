"""Devkit result files (``comp4_det_<split>_<class>.txt``): a vectorised reader and its reference.

A result file has one detection per line, ``image_id score x1 y1 x2 y2`` separated by any
whitespace, coordinates 1-based inclusive pixels; blank lines are skipped.

Two readers that must agree (``tests/test_eval_voc_results.py`` checks them on generated files):

- :func:`read_result_file_reference`: the obvious one, line by line with ``float()``; it
  also produces every error message (``file:line: what is wrong``).
- :func:`read_result_file`: the fast one. The file is read as bytes and tokenised with numpy
  (a token is a run of non-whitespace bytes, whitespace being ASCII space, ``\\t\\n\\v\\f\\r``);
  every non-blank line must hold 6 tokens. Numbers of the form ``[+-]digits[.digits]`` with
  up to 18 digits are decoded by :func:`parse_decimals`, bit for bit as ``float(text)``
  (its docstring gives the argument). Other tokens (exponents, longer numbers) go through
  ``float()`` one by one. Anything unusual (a byte outside ASCII, a lone ``\\r``, a wrong
  field count, a non-number, a NaN, a negative width) makes the reader fall back to the
  reference, which raises the one-line error naming the file and the line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mapdet.evaluation.export import devkit_result_filename
from mapdet.evaluation.voc_index import ImageIndex

__all__ = [
    "WIDTH_TOLERANCE",
    "ClassDetections",
    "ImageIndex",
    "ResultsFormatError",
    "find_results_folder",
    "parse_decimals",
    "read_devkit_results",
    "read_result_file",
    "read_result_file_indexed",
    "read_result_file_reference",
]

logger = logging.getLogger("mapdet.evaluation.voc")

#: Slack on "width >= 0": a zero-width continuous box written as ``x1 + 1 ... x2`` reads back
#: with ``x2 - x1 + 1`` a rounding error below 0 (about 1e-15); such boxes are valid.
WIDTH_TOLERANCE = 1e-6

#: One class's detections: ``(image_ids list[str] (D,), scores (D,) float64, boxes (D, 4))``.
ClassDetections = tuple[list[str], np.ndarray, np.ndarray]

_FIELDS = 6
#: Exact decimals: ``m / 10^f`` with at most 15 digits (``m < 2^53``) is one correctly
#: rounded double division; 16 to 18 digits go through the extended long double (below).
_SHORT_DIGITS = 15
_MAX_DIGITS = 18
_POW10 = 10.0 ** np.arange(_MAX_DIGITS + 1)
_POW10_INT = 10 ** np.arange(_MAX_DIGITS + 1, dtype=np.int64)
_COLUMNS = np.arange(_MAX_DIGITS + 6, dtype=np.int16)
#: x86's 80-bit long double has a 64-bit significand: 10^18 and every m < 10^18 are exact.
_EXTENDED = np.finfo(np.longdouble).nmant >= 63
#: x87 80-bit long doubles stored little-endian in 16 bytes (x86-64): significand first.
_X87_LAYOUT = (np.finfo(np.longdouble).nmant == 63 and np.little_endian
               and np.dtype(np.longdouble).itemsize == 16)


class ResultsFormatError(ValueError):
    """A devkit result file is malformed; the message names the file and the line."""


# -- reference reader ----------------------------------------------------------------------


def read_result_file_reference(path: str | Path) -> ClassDetections:
    """Read one result file line by line (the reference; see the module docstring).

    Returns:
        ``(image_ids (D,) list[str], scores (D,) float64, boxes (D, 4) float64)``, boxes as
        written (1-based inclusive).

    Raises:
        ResultsFormatError: a line without exactly 6 fields, a field that is not a number, a
            NaN or infinite score or coordinate, or a box with ``x2 < x1 - 1`` or
            ``y2 < y1 - 1`` (negative width even with the devkit's ``+1``; up to
            ``WIDTH_TOLERANCE`` of rounding is accepted); the message gives ``file:line``.
    """
    path = Path(path)
    ids: list[str] = []
    values: list[list[float]] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            ids.append(fields[0])
            values.append(_parse_numbers(fields, f"{path}:{lineno}"))
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 5)
    return ids, arr[:, 0].copy(), arr[:, 1:].copy()


def _parse_numbers(fields: list[str], where: str) -> list[float]:
    """Score and box of one result line, checked (see :func:`read_result_file_reference`)."""
    if len(fields) != _FIELDS:
        raise ResultsFormatError(
            f"{where}: expected 6 fields 'image_id score x1 y1 x2 y2', got {len(fields)}"
        )
    names = ("score", "x1", "y1", "x2", "y2")
    numbers = []
    for name, text in zip(names, fields[1:], strict=True):
        try:
            value = float(text)
        except ValueError:
            raise ResultsFormatError(f"{where}: {name} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ResultsFormatError(f"{where}: {name} is {text!r}; it must be finite")
        numbers.append(value)
    _, x1, y1, x2, y2 = numbers
    if min(x2 - x1, y2 - y1) + 1.0 < -WIDTH_TOLERANCE:
        raise ResultsFormatError(
            f"{where}: box {numbers[1:]} has a negative width or height "
            "(1-based inclusive coordinates need x2 >= x1 - 1 and y2 >= y1 - 1)"
        )
    return numbers


# -- vectorised reader ---------------------------------------------------------------------


#: Bytes the fast reader accepts: printable ASCII and the whitespace of ``bytes.split()``
#: (space, ``\\t \\n \\v \\f \\r``). With no other byte below 33 in the buffer, whitespace is
#: exactly ``byte <= 32``.
_PLAIN = bytes(range(32, 127)) + b"\t\n\v\f\r"


def _token_bounds(space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts (T,), ends (T,))`` of the runs of non-whitespace bytes (``ends`` exclusive),
    from the whitespace mask ``space (L,)`` of a buffer."""
    solid = np.zeros(space.size + 2, dtype=bool)  # framed by whitespace
    np.logical_not(space, out=solid[1:-1])
    # the changes alternate: a token's start (space -> solid), then its end (solid -> space);
    # flatnonzero of a bool array is several times faster than of an int8 one
    edges = np.flatnonzero(solid[1:] != solid[:-1])
    return edges[0::2].copy(), edges[1::2].copy()


def _eight_digits(words: np.ndarray) -> np.ndarray:
    """The integers of 8 decimal digits packed in each uint64 (byte ``i`` holds digit ``i``
    as a value 0..9, the first byte the most significant): three multiply-and-shift steps
    combine digits by pairs, quads and octets (D. Lemire's SWAR parsing); wrapping uint64
    arithmetic is what the method uses."""
    v = words * np.uint64(10) + (words >> np.uint64(8))
    mask = np.uint64(0x000000FF000000FF)
    mul1 = np.uint64(100 + (1000000 << 32))
    mul2 = np.uint64(1 + (10000 << 32))
    return ((v & mask) * mul1 + ((v >> np.uint64(16)) & mask) * mul2) >> np.uint64(32)


def parse_decimals(b: np.ndarray, starts: np.ndarray, ends: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Decode the tokens ``b[starts[t]:ends[t]]`` of a byte buffer as decimal numbers.

    A token ``[+-]digits[.digits]`` (the dot anywhere, at least one digit) has the value
    ``±m / 10^f``: ``m`` the integer of its digits, ``f`` its number of fraction digits.
    The dots are squeezed out of the buffer, each token's last 24 bytes copied to a row (its
    digits right-aligned, ``'0'`` subtracted, the bytes before them cleared, every byte
    checked to be a digit) and ``m`` read from the row's 3 words 8 digits at a time
    (:func:`_eight_digits`), exactly, up to 18 digits. The double nearest to ``±m / 10^f``, which is
    ``float(token)``:

    - up to 15 digits, ``m`` and ``10^f`` are exact doubles and one IEEE division rounds
      correctly (Clinger's fast path);
    - 16 to 18 digits (``repr`` of a double writes up to 17), where the platform's long
      double has a 64-bit significand (x86): ``q = m / 10^f`` in long double, with ``m`` and
      ``10^f`` exact, is within half a long-double ulp of the true value, and rounding ``q``
      to double is correct unless ``q`` is exactly halfway between two doubles (halfway points
      lie on the long-double grid, so the true value is on ``q``'s side of any other); those
      rare tokens, like longer ones, are left to ``float()``.

    Args:
        b: ``(L,)`` uint8, the buffer (``L < 2^31``); ``starts``, ``ends``: ``(T,)`` the
            bounds of *all* its tokens (runs of non-whitespace bytes, :func:`_token_bounds`).

    Returns:
        ``(values (T,) float64, ok (T,) bool)``: ``ok`` marks the tokens decoded here, whose
        value equals ``float(token)`` bit for bit; the others' values are meaningless.
    """
    n = starts.size
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    width = _MAX_DIGITS + 6  # 24 digit columns, 3 words
    length = ends - starts
    first = b[starts]
    signed = (first == 45) | (first == 43)
    dot = b == 46
    dot_pos = np.flatnonzero(dot)
    dot_token = np.searchsorted(ends, dot_pos, side="right")  # every dot lies in a token
    ndots = np.bincount(dot_token, minlength=n)
    dot_at = np.full(n, -1, dtype=np.int64)
    dot_at[dot_token] = dot_pos  # meaningful where ndots == 1
    ndigits = length - signed - ndots  # every other byte must be a digit
    ok = (ndots <= 1) & (ndigits >= 1) & (ndigits <= _MAX_DIGITS)
    # squeeze the dots out of the buffer; then a token's digits are its last ndigits bytes
    squeezed = np.concatenate((np.full(width, 48, dtype=np.uint8), np.delete(b, dot_pos)))
    new_ends = ends - np.cumsum(ndots) + width
    # rows[t, j] = the j-th of the width bytes that end the squeezed token t, minus '0'
    rows = np.lib.stride_tricks.sliding_window_view(squeezed, width)[new_ends - width]
    rows -= np.uint8(48)
    # clear the bytes before the token's digits, then check that the others are digits
    rows *= _COLUMNS >= (width - np.minimum(ndigits, width)).astype(np.int16)[:, None]
    bad = (rows > 9).view("<u8")  # (T, 3): nonzero where a byte is not a digit
    ok &= (bad[:, 0] | bad[:, 1] | bad[:, 2]) == 0
    words = _eight_digits(rows.view("<u8"))  # byte j of word w is column 8 * w + j
    mantissa = (words[:, 0] * np.uint64(10**16) + words[:, 1] * np.uint64(10**8)
                + words[:, 2]).astype(np.int64)
    fraction = np.where(ndots == 1, ends - dot_at - 1, 0)
    np.clip(fraction, 0, _MAX_DIGITS, out=fraction)
    values = mantissa / _POW10[fraction]
    long = np.flatnonzero(ok & (ndigits > _SHORT_DIGITS))
    if long.size:
        if _EXTENDED:
            q = mantissa[long].astype(np.longdouble) / _POW10_INT[fraction[long]].astype(
                np.longdouble)
            values[long] = q.astype(np.float64)
            ok[long[(_significand(q) & np.uint64(0x7FF)) == np.uint64(0x400)]] = False  # halfway
        else:
            ok[long] = False
    np.negative(values, out=values, where=first == 45)
    return values, ok


def _significand(q: np.ndarray) -> np.ndarray:
    """The 64-bit significands of long doubles ``q`` (x86 extended precision: the low 8
    bytes of each, read in place; elsewhere through ``frexp``)."""
    if _X87_LAYOUT:
        return q.view(np.uint64).reshape(q.size, -1)[:, 0]
    return (np.frexp(q)[0] * np.longdouble(2.0**64)).astype(np.uint64)


def _fast_parse(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """``(image ids (D,) bytes array 'S', numbers (D, 5) float64)``, or ``None`` when the
    file needs the reference reader (anything unusual; see the module docstring)."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size >= 2**31 or data.translate(None, _PLAIN):
        return None
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return None  # a lone \r ends a line for the reference reader
    starts, ends = _token_bounds(b <= 32)
    if starts.size % _FIELDS:
        return None
    if starts.size == 0:
        return np.zeros(0, dtype="S1"), np.zeros((0, 5))
    # 6 tokens a line: the gaps between tokens that hold a newline are exactly those
    # before tokens 6, 12, ...
    after_newline = np.searchsorted(starts, np.flatnonzero(b == 10))  # sorted
    keep = (after_newline > 0) & (after_newline < starts.size)
    keep[1:] &= after_newline[1:] != after_newline[:-1]  # one per gap (np.unique, faster)
    breaks = after_newline[keep]
    if not np.array_equal(breaks, np.arange(_FIELDS, starts.size, _FIELDS)):
        return None
    values, ok = parse_decimals(b, starts, ends)
    numeric = np.ones(starts.size, dtype=bool)
    numeric[::_FIELDS] = False
    for t in np.flatnonzero(numeric & ~ok):
        try:
            values[t] = float(data[starts[t]:ends[t]])
        except ValueError:
            return None
    values = values[numeric].reshape(-1, 5)
    if not np.isfinite(values).all():
        return None
    width = np.minimum(values[:, 3] - values[:, 1], values[:, 4] - values[:, 2]) + 1.0
    if (width < -WIDTH_TOLERANCE).any():
        return None
    return _gather_tokens(b, starts[::_FIELDS], ends[::_FIELDS]), values


def _gather_tokens(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The tokens ``b[starts[t]:ends[t]]`` as a ``(T,)`` bytes array (dtype ``S<longest>``)."""
    length = ends - starts
    width = int(length.max()) if length.size else 1
    padded = np.concatenate((b, np.zeros(width, dtype=np.uint8)))
    chars = np.lib.stride_tricks.sliding_window_view(padded, width)[starts]  # a copy
    chars *= np.arange(width) < length[:, None]  # NUL after each token
    return chars.view(f"S{width}").reshape(-1)


_HEAP_PRIMED = False


def prime_heap() -> None:
    """Allocate and free one 30 MiB block, once per process, before reading result files.

    The reader's temporaries are a few MiB each. glibc serves such blocks with a fresh
    ``mmap`` (and a page fault per 4 KiB touched) until a large mmapped block has been freed:
    then its dynamic threshold rises to that block's size (at most 32 MiB) and later blocks
    come from the heap and are reused. Freeing a 30 MiB block first gives that state at once
    instead of after many faults; on the 5,000-image benchmark this removed about 200,000
    page faults (0.4 s of system time in a VM). Elsewhere it is a harmless allocation.
    """
    global _HEAP_PRIMED
    if not _HEAP_PRIMED:
        block = np.empty(30 * 2**20, dtype=np.uint8)
        del block
        _HEAP_PRIMED = True


def read_result_file(path: str | Path) -> ClassDetections:
    """Read one result file (vectorised; same output and errors as
    :func:`read_result_file_reference`).

    Returns:
        ``(image_ids (D,) list[str], scores (D,) float64, boxes (D, 4) float64)``.
    """
    path = Path(path)
    prime_heap()
    parsed = _fast_parse(path.read_bytes())
    if parsed is None:
        return read_result_file_reference(path)
    ids, values = parsed
    return ids.astype(str).tolist(), values[:, 0].copy(), values[:, 1:].copy()


def read_result_file_indexed(path: str | Path, index: ImageIndex, what: str
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one result file with its image ids mapped to positions in the evaluated set.

    Args:
        path: the file.
        index: the evaluated set's :class:`ImageIndex`.
        what: the evaluated set's description, for the error message.

    Returns:
        ``(image (D,) int64, scores (D,) float64, boxes (D, 4) float64)``.

    Raises:
        ResultsFormatError: as :func:`read_result_file_reference`.
        ValueError: an image id not in the set; the message names the file, the line and the id.
    """
    path = Path(path)
    prime_heap()
    parsed = _fast_parse(path.read_bytes())
    if parsed is None:
        ids_str, scores, boxes = read_result_file_reference(path)
        ids = np.asarray(ids_str, dtype=str).reshape(-1)
        values = np.concatenate([scores[:, None], boxes], axis=1)
    else:
        ids, values = parsed
    image = index.lookup(ids)
    if (image < 0).any():
        r = int(np.flatnonzero(image < 0)[0])
        bad = ids[r].decode("ascii") if isinstance(ids[r], bytes) else str(ids[r])
        raise ValueError(f"{path}: image id {bad!r} (detection {r + 1}) is not in the "
                         f"evaluated set {what}")
    return image, values[:, 0].copy(), values[:, 1:].copy()


# -- folders -------------------------------------------------------------------------------


def find_results_folder(results_dir: str | Path, split: str, class_names: Sequence[str],
                        comp: str = "comp4", year: str | int | None = None) -> Path:
    """The folder holding the result files: ``results_dir`` itself, else its ``Main/`` or
    ``VOC<year>/Main/`` (the devkit's ``results/VOC2007/Main`` layout).

    Raises:
        FileNotFoundError: no candidate holds any ``<comp>_det_<split>_<class>.txt``; the
            message lists the folders tried and the file pattern.
    """
    results_dir = Path(results_dir)
    tried = [results_dir, results_dir / "Main"]
    if year is not None:
        tried.append(results_dir / f"VOC{year}" / "Main")
    names = [devkit_result_filename(split, c, comp) for c in class_names]
    for folder in tried:
        if any((folder / n).is_file() for n in names):
            if folder != results_dir:
                logger.info("reading result files from %s", folder)
            return folder
    raise FileNotFoundError(
        f"no result files {devkit_result_filename(split, '<class>', comp)} found in "
        + ", ".join(str(p) for p in tried)
    )


def result_paths(results_dir: str | Path, split: str, class_names: Sequence[str],
                 comp: str = "comp4", *, allow_missing: bool = True) -> dict[str, Path | None]:
    """class name -> its result file, or ``None`` when missing and ``allow_missing``.

    Raises:
        FileNotFoundError: no file at all, or a missing one with ``allow_missing=False``.
    """
    results_dir = Path(results_dir)
    paths = {c: results_dir / devkit_result_filename(split, c, comp) for c in class_names}
    missing = [c for c, p in paths.items() if not p.is_file()]
    if missing and (len(missing) == len(paths) or not allow_missing):
        raise FileNotFoundError(
            f"missing result file(s) in {results_dir}: "
            + ", ".join(paths[c].name for c in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    if missing:
        logger.warning("no result file for class(es) %s in %s: counted as no detections (AP 0)",
                       ", ".join(missing), results_dir)
    return {c: (None if c in missing else p) for c, p in paths.items()}


def read_devkit_results(
    results_dir: str | Path,
    split: str,
    class_names: Sequence[str],
    comp: str = "comp4",
    *,
    allow_missing: bool = True,
) -> dict[str, ClassDetections]:
    """Read ``<results_dir>/<comp>_det_<split>_<class>.txt`` for every class.

    Args:
        results_dir: the folder holding the files.
        split: the split in the file names (``"test"``).
        class_names: the classes to read, in order.
        comp: the competition prefix in the file names.
        allow_missing: a missing class file counts as no detections (its AP is then 0) and a
            warning names it; ``False`` makes it an error, as in the devkit.

    Returns:
        class name -> ``(image_ids, scores (D,), boxes (D, 4))``, boxes raw 1-based inclusive
        as written in the file (pass ``box_format="raw"`` to
        :func:`~mapdet.evaluation.voc.evaluate_voc`).

    Raises:
        FileNotFoundError: no file at all, or a missing one with ``allow_missing=False``.
        ResultsFormatError: a malformed line (see :func:`read_result_file_reference`).
    """
    paths = result_paths(results_dir, split, class_names, comp, allow_missing=allow_missing)
    return {c: ([], np.zeros(0), np.zeros((0, 4))) if p is None else read_result_file(p)
            for c, p in paths.items()}
