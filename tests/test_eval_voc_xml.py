"""The fast VOC XML scanner agrees with the ElementTree reader, or leaves the file to it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapdet.data.base import AnnotationError
from mapdet.data.voc import read_voc_objects
from mapdet.evaluation.voc_xml import scan_voc_objects

LABELS = {"cat": 0, "dog": 1, "a.b-c": 2}

NUMBERS = st.sampled_from(["1", "12", "12.5", " 7 ", "\n30\t", "0", "-3", "1e2", "1_0", "nan",
                           "inf", "x", "", "  ", "3."])
FLAGS = st.sampled_from(["0", "1", "1.0", " 0 ", "", "2", "yes", "0.0"])
NAMES = st.sampled_from(["cat", "dog", " cat\n", "a.b-c", "cow", "", "Cat"])
SPACE = st.sampled_from(["", "\n", "\n\t", " ", "\r\n\t", "\n  "])


def leaf(tag: str, text: str) -> str:
    return f"<{tag}>{text}</{tag}>"


@st.composite
def container(draw, tag: str, children: list[str]) -> str:
    sp = [draw(SPACE) for _ in range(len(children) + 1)]
    body = "".join(s + c for s, c in zip(sp, children, strict=False)) + sp[-1]
    return f"<{tag}>{body}</{tag}>"


@st.composite
def bndbox(draw) -> str:
    coords = [leaf(t, draw(NUMBERS)) for t in ("xmin", "ymin", "xmax", "ymax")]
    if draw(st.booleans()):
        coords = draw(st.permutations(coords))
    if draw(st.integers(0, 9)) == 0:
        coords = coords[: draw(st.integers(0, 3))]
    return draw(container("bndbox", coords))


@st.composite
def obj(draw) -> str:
    kids = [leaf("name", draw(NAMES)), leaf("pose", "Unspecified"),
            leaf("truncated", draw(FLAGS)), leaf("difficult", draw(FLAGS)), draw(bndbox())]
    extra = draw(st.lists(st.sampled_from(["occluded", "part", "actions", "name2", "dupname",
                                           "dupbox", "nobox", "noname", "point"]), max_size=2))
    if "part" in extra:
        kids.append(draw(container("part", [leaf("name", "head"), draw(bndbox())])))
    if "actions" in extra:
        kids.append(draw(container("actions", [leaf("jumping", "0"), leaf("other", "1")])))
    if "point" in extra:
        kids.append(draw(container("point", [leaf("x", "3"), leaf("y", "4")])))
    if "occluded" in extra:
        kids.append(leaf("occluded", "1"))
    if "dupname" in extra:
        kids.append(leaf("name", draw(NAMES)))
    if "dupbox" in extra:
        kids.append(draw(bndbox()))
    if "name2" in extra:  # a container called name: its text is None for ElementTree
        kids.insert(0, draw(container("name", [leaf("x", "cat")])))
    if "nobox" in extra:
        kids = [k for k in kids if not k.startswith("<bndbox>")]
    if "noname" in extra:
        kids = [k for k in kids if not k.startswith("<name>")]
    if draw(st.booleans()):
        kids = draw(st.permutations(kids))
    return draw(container("object", kids))


@st.composite
def document(draw) -> tuple[str, bool]:
    """``(xml text, plain)``: ``plain`` when nothing unusual was injected."""
    size = [leaf("width", draw(st.sampled_from(["50", "50.4", "0", "", "x", " 64 "]))),
            leaf("height", draw(st.sampled_from(["40", "39.6", "0", "7"])))]
    kids = [leaf("folder", "VOC2007"), leaf("filename", "x.jpg"),
            draw(container("source", [leaf("database", "db"), leaf("annotation", "a")])),
            leaf("segmented", "0")]
    if draw(st.integers(0, 9)):
        kids.append(draw(container("size", size)))
    kids += draw(st.lists(obj(), max_size=4))
    nested = draw(st.integers(0, 5)) == 0
    if nested:  # an object nested where the reader does not look
        kids.append(draw(container("owner", [draw(obj())])))
    if draw(st.booleans()):
        kids = draw(st.permutations(kids))
    text = draw(container(draw(st.sampled_from(["annotation", "annotation", "ann"])), kids))
    decl = draw(st.sampled_from(["", "", '<?xml version="1.0"?>\n',
                                 "<?xml version='1.0' encoding='utf-8'?>"]))
    text = decl + text + draw(SPACE)
    odd = draw(st.sampled_from([None] * 6 + [
        ("<folder>", '<folder kind="x">'), ("<segmented>0</segmented>", "<segmented/>"),
        ("<folder>VOC2007", "<folder>VOC&amp;2007"), ("VOC2007", "<!-- c -->VOC2007"),
        ("VOC2007", "VOC\u00e92007"), ("VOC2007", "VO<![CDATA[x]]>C"),
        ("<source>", "<source>text"), ("</annotation>", "</annotation><x/>"),
        ("<segmented>", "<segmented>\x01"), ("</folder>", "</folder >"),
        ("<folder>VOC2007</folder>", "<folder>VOC2007</folderx>"),
    ]))
    if odd is not None:
        text = text.replace(*odd, 1)
    # A nested object is not plain: the reader ignores it, and the scanner may decline the
    # file when it is malformed (an empty <bndbox>), which is safe (the reader then runs).
    return text, odd is None and not nested


def reference(tmp_path, data: bytes, skip_unknown: bool):
    try:
        return read_voc_objects(tmp_path / "a.xml", LABELS, data=data, image_dir=tmp_path,
                                image_id="missing", skip_unknown=skip_unknown)
    except (AnnotationError, FileNotFoundError):
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(doc=document(), skip_unknown=st.booleans())
def test_scanner_equals_reference_or_declines(tmp_path, doc, skip_unknown):
    text, plain = doc
    data = text.encode("utf-8")
    fast = scan_voc_objects(data, LABELS, skip_unknown=skip_unknown)
    ref = reference(tmp_path, data, skip_unknown)
    if plain:  # nothing unusual: the scanner declines exactly what the reference rejects
        assert (fast is None) == (ref is None)
    if fast is None:
        return
    assert ref is not None, "the scanner accepted what the reference rejects"
    assert (fast.width, fast.height) == (ref.width, ref.height)
    np.testing.assert_array_equal(np.asarray(fast.raw_boxes, dtype=float).reshape(-1, 4),
                                  ref.raw_boxes)
    assert fast.labels == ref.labels.tolist() and fast.difficult == ref.difficult.tolist()


PLAIN = """<annotation>
\t<folder>VOC2007</folder>
\t<size><width>353</width><height>500</height><depth>3</depth></size>
\t<object>
\t\t<name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
\t\t<bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>cat</name><difficult>1</difficult>
\t\t<bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498.5</ymax></bndbox>
\t\t<part><name>head</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>
\t\t</bndbox></part>
\t</object>
</annotation>
"""


@pytest.mark.parametrize("variant", ["plain", "parts", "crlf", "declaration"])
def test_scanner_reads_common_layouts(tmp_path, variant):
    """VOC's own layouts are read by the scanner (not left to the reference), identically."""
    text = PLAIN if variant == "parts" else PLAIN.replace(PLAIN[PLAIN.index("\t\t<part>"):
                                                               PLAIN.index("\t</object>\n</")], "")
    if variant == "crlf":
        text = text.replace("\n", "\r\n")
    if variant == "declaration":
        text = '<?xml version="1.0" encoding="utf-8"?>\n' + text
    data = text.encode()
    fast = scan_voc_objects(data, LABELS)
    ref = reference(tmp_path, data, False)
    assert fast is not None and ref is not None
    assert (fast.width, fast.height) == (353, 500) == (ref.width, ref.height)
    assert fast.raw_boxes == ref.raw_boxes.tolist() == [[48, 240, 195, 371], [8, 12, 352, 498.5]]
    assert fast.labels == [1, 0] and fast.difficult == [False, True]
