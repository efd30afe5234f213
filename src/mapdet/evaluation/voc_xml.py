"""A fast scanner for plain VOC annotation XML, with the ElementTree reader as its fallback.

:func:`scan_voc_objects` reads what the evaluation needs from one annotation file (image
size; each object's class, ``difficult`` flag and raw box, in file order) with a few
compiled regular expressions instead of building an ElementTree. It accepts only documents
whose meaning is plain, and returns ``None`` for anything else, so that the caller uses
:func:`mapdet.data.voc.read_voc_objects` (the reference, which also produces every error
message). Accepted: ASCII bytes; an optional XML declaration (version 1.0, encoding utf-8 or
ascii) at the very start; elements without attributes, nested at most 4 levels below the
root, each holding either text only (no markup: no entity, comment, CDATA, processing
instruction, empty-element tag) or child elements separated by whitespace only; no control
character but tab, newline and carriage return (line ends normalised as XML does). Within
that subset the tree is fixed by the text, and the scanner reads it as the reference does:

- the first ``<size>`` child of the root, its first ``<width>`` and ``<height>`` children
  (``float(text or 0)``; both must be > 0, else the reference reads the image file);
- every ``<object>`` child of the root, in order; of each, the first ``<name>``,
  ``<difficult>``, ``<truncated>`` and ``<bndbox>`` children, and the first ``<xmin>``,
  ``<ymin>``, ``<xmax>``, ``<ymax>`` of the box, ``float()`` of their stripped text;
- an element's text is its content stripped of whitespace when it has no child element,
  else ``None`` (ElementTree's ``.text`` is then the whitespace before the first child).

Anything the reference would reject (a missing or non-numeric field, an unknown class
without ``skip_unknown``, a non-finite coordinate) also gives ``None``: the reference then
raises its one-line error. ``tests/test_eval_voc_xml.py`` checks that the two agree on
generated documents, the unusual ones included.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["ScannedObjects", "scan_voc_objects"]

_NAME = rb"[A-Za-z_][A-Za-z0-9_.:-]*"
_DECL = (rb"<\?xml[ \t\n]+version[ \t\n]*=[ \t\n]*(?:\"1\.0\"|'1\.0')"
         rb"(?:[ \t\n]+encoding[ \t\n]*=[ \t\n]*"
         rb"(?:\"(?:utf-8|UTF-8|ascii|ASCII|us-ascii|US-ASCII)\"|"
         rb"'(?:utf-8|UTF-8|ascii|ASCII|us-ascii|US-ASCII)'))?"
         rb"(?:[ \t\n]+standalone[ \t\n]*=[ \t\n]*(?:\"(?:yes|no)\"|'(?:yes|no)'))?"
         rb"[ \t\n]*\?>")
#: Bytes that the scanner leaves to the reference: control characters (but tab, newline,
#: carriage return), and ``&`` (entities); everything non-ASCII is refused separately.
_REFUSED = bytes(range(0, 9)) + b"\x0b\x0c" + bytes(range(14, 32)) + b"&"
_DEPTH = 4


def _body(depth: int) -> bytes:
    """The content of an element whose descendants nest at most ``depth`` levels: text
    without markup, or child elements separated by whitespace."""
    if depth == 0:
        return rb"[^<]*"
    tag = b"t%d" % depth
    return (rb"(?:(?:[ \t\n]*<(?P<" + tag + rb">" + _NAME + rb")>" + _body(depth - 1)
            + rb"</(?P=" + tag + rb")>)+[ \t\n]*|[^<]*)")


_DOCUMENT = re.compile(rb"(?:" + _DECL + rb")?[ \t\n]*<(?P<root>" + _NAME + rb")>(?P<body>"
                       + _body(_DEPTH) + rb")</(?P=root)>[ \t\n]*")
#: ``_CHILD[d]``: one child element (tag, content) whose descendants nest at most ``d``
#: levels, after optional whitespace; consecutive matches walk a validated content.
_CHILD = [re.compile(rb"[ \t\n]*<(" + _NAME + rb")>(" + _body(d) + rb")</\1>")
          for d in range(_DEPTH)]


_LEAVES = rb"((?:[ \t\n]*<" + _NAME + rb">[^<]*</" + _NAME + rb">)*)"
_LEAF = re.compile(rb"<(" + _NAME + rb")>([^<]*)</\1>")
_PLAIN_SIZE = re.compile(rb"<size>" + _LEAVES + rb"[ \t\n]*</size>")
_PLAIN_OBJECT = re.compile(
    rb"<object>" + _LEAVES + rb"[ \t\n]*<bndbox>"
    + b"".join(rb"[ \t\n]*<" + t + rb">([^<]*)</" + t + rb">"
               for t in (b"xmin", b"ymin", b"xmax", b"ymax"))
    + rb"[ \t\n]*</bndbox>" + _LEAVES + rb"[ \t\n]*</object>")


class ScannedObjects(NamedTuple):
    """What the evaluation needs from one annotation file (see :func:`scan_voc_objects`).

    Attributes:
        width, height: the image size.
        raw_boxes: ``M`` lists ``[xmin, ymin, xmax, ymax]`` as written (1-based).
        labels: ``M`` ints; ``difficult``: ``M`` bools.
    """

    width: int
    height: int
    raw_boxes: list[list[float]]
    labels: list[int]
    difficult: list[bool]


class _Refused(Exception):
    """The document is outside the scanner's subset, or the reference would reject it."""


def _children(content: bytes, depth: int) -> dict[bytes, bytes]:
    """Tag -> content of the *first* child of each tag, in a validated ``content`` whose
    children's descendants nest at most ``depth`` levels."""
    first: dict[bytes, bytes] = {}
    for m in _CHILD[depth].finditer(content):
        first.setdefault(m.group(1), m.group(2))
    return first


def _text(content: bytes | None) -> bytes | None:
    """ElementTree's ``.text`` stripped, ``None`` when empty: an element with children has
    only whitespace before its first child."""
    if content is None or b"<" in content:
        return None
    return content.strip() or None


def _flag(content: bytes | None) -> bool:
    """A 0/1 flag as the reference reads it: missing is 0, else ``float(text) != 0``."""
    text = _text(content)
    if text is None:
        return False
    try:
        return float(text.decode("ascii")) != 0.0
    except ValueError:
        raise _Refused from None


def _number(content: bytes | None) -> float:
    text = _text(content)
    if text is None:
        raise _Refused
    try:
        value = float(text.decode("ascii"))
    except ValueError:
        raise _Refused from None
    if not math.isfinite(value):
        raise _Refused
    return value


def scan_voc_objects(data: bytes, label_of: dict[str, int], *,
                     skip_unknown: bool = False) -> ScannedObjects | None:
    """The size and objects of one VOC annotation file, or ``None`` when it must be read by
    the reference :func:`~mapdet.data.voc.read_voc_objects` (see the module docstring).

    Args:
        data: the file's bytes.
        label_of: class name -> label.
        skip_unknown: skip objects of classes not in ``label_of`` (as the reference).
    """
    if not data.isascii() or len(data.translate(None, _REFUSED)) != len(data):
        return None
    if b"\r" in data:  # XML's end-of-line handling
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"]]>" in data:  # not allowed in text
        return None
    doc = _DOCUMENT.fullmatch(data)
    if doc is None:
        return None
    body = doc.group("body")
    try:
        plain = _read_plain(body, label_of, skip_unknown)
        return plain if plain is not None else _read(body, label_of, skip_unknown)
    except _Refused:
        return None


def _at_top(body: bytes, matches) -> list | None:
    """The matches that start at the top level of a validated content (outside every
    element), or ``None`` if one does not."""
    depth, prev = 0, 0
    for m in matches:
        # every "<" opens or closes a tag, "</" closes one
        depth += body.count(b"<", prev, m.start()) - 2 * body.count(b"</", prev, m.start())
        if depth != 0:
            return None
        prev = m.start()
    return matches


def _read_plain(root: bytes, label_of: dict[str, int], skip_unknown: bool
                ) -> ScannedObjects | None:
    """The common layout, read with one expression per object: ``<size>`` and every
    ``<object>`` hold leaf elements only, an object's ``<bndbox>`` exactly ``<xmin>``,
    ``<ymin>``, ``<xmax>``, ``<ymax>`` in this order. ``None`` when the document is not of
    that layout (:func:`_read` reads it). Values are read with ``float(bytes)``, which
    strips ASCII whitespace and parses as ``float(str)`` does."""
    sizes = _at_top(root, list(_PLAIN_SIZE.finditer(root))[:1])
    objects = _at_top(root, list(_PLAIN_OBJECT.finditer(root)))
    if (not sizes or objects is None or len(objects) != root.count(b"<object>")
            or sizes[0].start() != _first_top(root, b"<size>")):
        return None  # another layout, or elements nested elsewhere
    fields = dict(reversed(_LEAF.findall(sizes[0].group(1))))
    try:
        w = float(fields.get(b"width", b"").strip() or b"0")
        h = float(fields.get(b"height", b"").strip() or b"0")
    except ValueError:
        raise _Refused from None
    if not (w > 0 and h > 0):
        raise _Refused  # the reference reads the image file's size
    boxes, labels, difficult = [], [], []
    isfinite = math.isfinite
    try:
        for m in objects:
            leaves, x1, y1, x2, y2, after = m.groups()
            fields = dict(reversed(_LEAF.findall(leaves + after)))  # the first of each tag
            name = fields.get(b"name", b"").strip()
            label = label_of.get(name.decode("ascii")) if name else None
            if label is None:
                if name and skip_unknown:
                    continue
                raise _Refused
            flag = fields.get(b"difficult", b"").strip()
            is_difficult = bool(flag) and float(flag) != 0.0
            box = [float(x1), float(y1), float(x2), float(y2)]
            if not isfinite(box[0] + box[1] + box[2] + box[3]):
                raise _Refused  # (or an overflowing sum: then the reference decides)
            flag = fields.get(b"truncated", b"").strip()
            if flag:
                float(flag)  # the reference rejects a malformed flag
            boxes.append(box)
            labels.append(label)
            difficult.append(is_difficult)
    except ValueError:
        raise _Refused from None
    return ScannedObjects(int(round(w)), int(round(h)), boxes, labels, difficult)


def _first_top(body: bytes, tag: bytes) -> int:
    """Position of the first ``tag`` at the top level of a validated content, or -1."""
    at = body.find(tag)
    depth, prev = 0, 0
    while at >= 0:
        depth += body.count(b"<", prev, at) - 2 * body.count(b"</", prev, at)
        if depth == 0:
            return at
        prev = at
        at = body.find(tag, at + 1)
    return -1


def _read(root: bytes, label_of: dict[str, int], skip_unknown: bool) -> ScannedObjects:
    size, objects = None, []
    for m in _CHILD[_DEPTH - 1].finditer(root):
        tag = m.group(1)
        if tag == b"object":
            objects.append(m.group(2))
        elif tag == b"size" and size is None:
            size = m.group(2)
    fields = {} if size is None else _children(size, _DEPTH - 2)
    try:
        w = float((_text(fields.get(b"width")) or b"0").decode("ascii"))
        h = float((_text(fields.get(b"height")) or b"0").decode("ascii"))
    except ValueError:
        raise _Refused from None
    if not (w > 0 and h > 0):
        raise _Refused  # the reference reads the image file's size
    boxes, labels, difficult = [], [], []
    for content in objects:
        fields = _children(content, _DEPTH - 2)
        name = _text(fields.get(b"name"))
        if name is None:
            raise _Refused
        label = label_of.get(name.decode("ascii"))
        if label is None:
            if skip_unknown:
                continue
            raise _Refused
        is_difficult = _flag(fields.get(b"difficult"))
        box = fields.get(b"bndbox")
        if box is None:
            raise _Refused
        coords = _children(box, _DEPTH - 3)
        boxes.append([_number(coords.get(t)) for t in (b"xmin", b"ymin", b"xmax", b"ymax")])
        _flag(fields.get(b"truncated"))  # the reference rejects a malformed flag
        labels.append(label)
        difficult.append(is_difficult)
    return ScannedObjects(int(round(w)), int(round(h)), boxes, labels, difficult)
