"""VOC XML parsing (real-world quirks), the VOC-layout data set, and ConcatDataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapdet.data import (
    VOC_CLASSES,
    AnnotationError,
    ConcatDataset,
    VOCDataset,
    parse_voc_xml,
    voc_raw_boxes,
)
from mapdet.data.base import DetectionDataset, ImageRecord


def _obj(name: str, box, difficult=None, extra: str = "") -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{diff}{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _xml(objects: str = "", size: tuple[int, int] | None = (500, 375), filename="x.jpg") -> str:
    sz = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height>"
    sz += "<depth>3</depth></size>" if size is not None else ""
    return f"<annotation><filename>{filename}</filename>{sz}{objects}</annotation>"


def _write(tmp_path: Path, text: str, name: str = "000001.xml") -> Path:
    ann = tmp_path / "Annotations"
    ann.mkdir(exist_ok=True)
    p = ann / name
    p.write_text(text)
    return p


def test_basic_conversion_and_raw_numbers(tmp_path):
    p = _write(
        tmp_path, _xml(_obj("dog", (48, 240, 195, 371), 0) + _obj("person", (8, 12, 352, 498), 1))
    )
    rec = parse_voc_xml(p, VOC_CLASSES)
    assert rec.image_id == "000001"
    assert (rec.width, rec.height) == (500, 375)
    np.testing.assert_array_equal(rec.boxes, [[47, 239, 195, 371], [7, 11, 352, 375]])
    assert rec.boxes.dtype == np.float32
    assert rec.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert rec.difficult.tolist() == [False, True]
    # the raw 1-based numbers stay available, unclipped (498 > height 375)
    np.testing.assert_array_equal(voc_raw_boxes(rec), [[48, 240, 195, 371], [8, 12, 352, 498]])
    # no image file exists: the path falls back to the devkit's JPEGImages/<id>.jpg
    assert rec.path == tmp_path / "JPEGImages" / "000001.jpg"
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "JPEGImages" / "x.jpg")
    assert parse_voc_xml(p).path == tmp_path / "JPEGImages" / "x.jpg"  # the <filename> tag


def test_float_coordinates(tmp_path):
    p = _write(tmp_path, _xml(_obj("cat", ("273.5", "10.0", "300.25", "40"))))
    rec = parse_voc_xml(p)
    np.testing.assert_allclose(rec.boxes, [[272.5, 9.0, 300.25, 40.0]])
    np.testing.assert_allclose(voc_raw_boxes(rec), [[273.5, 10.0, 300.25, 40.0]])


def test_missing_difficult_truncated_pose_and_extra_tags(tmp_path):
    extra = "<occluded>1</occluded><attributes><a>b</a></attributes><part><name>head</name></part>"
    p = _write(tmp_path, _xml(_obj("car", (1, 1, 10, 10), extra=extra) + "<weird>1</weird>"))
    rec = parse_voc_xml(p)
    assert rec.difficult.tolist() == [False]
    assert rec.extra["truncated"].tolist() == [False]
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 10, 10]])


def test_difficult_as_float_text_and_use_difficult(tmp_path):
    p = _write(tmp_path, _xml(_obj("car", (1, 1, 10, 10), "1.0") + _obj("bus", (5, 5, 9, 9), "0")))
    assert parse_voc_xml(p).difficult.tolist() == [True, False]
    rec = parse_voc_xml(p, use_difficult=False)
    assert rec.labels.tolist() == [VOC_CLASSES.index("bus")]
    assert voc_raw_boxes(rec).shape == (1, 4)


def test_out_of_border_is_clipped_with_warning(tmp_path, caplog):
    p = _write(tmp_path, _xml(_obj("bird", (0, -3, 520, 380)), size=(500, 375)))
    with caplog.at_level(logging.WARNING, logger="mapdet.data.voc"):
        rec = parse_voc_xml(p)
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 500, 375]])
    assert "clipped" in caplog.text and str(p) in caplog.text and "object 0" in caplog.text


def test_degenerate_box_is_dropped_with_warning(tmp_path, caplog):
    objs = (
        _obj("bird", (50, 10, 40, 20))
        + _obj("boat", (600, 10, 700, 20))
        + _obj("cow", (5, 5, 5, 5))
    )
    p = _write(tmp_path, _xml(objs, size=(500, 375)))
    with caplog.at_level(logging.WARNING, logger="mapdet.data.voc"):
        rec = parse_voc_xml(p)
    # a 1-pixel box (xmin == xmax) is valid in VOC: width 1
    assert rec.labels.tolist() == [VOC_CLASSES.index("cow")]
    np.testing.assert_array_equal(rec.boxes, [[4, 4, 5, 5]])
    assert caplog.text.count("; dropped") == 2 and "clipped" not in caplog.text
    assert "object 0 ('bird')" in caplog.text and "object 1 ('boat')" in caplog.text


def test_unknown_class_raises_or_is_skipped(tmp_path):
    p = _write(tmp_path, _xml(_obj("unicorn", (1, 1, 5, 5)) + _obj("dog", (1, 1, 5, 5))))
    with pytest.raises(AnnotationError, match="unicorn") as info:
        parse_voc_xml(p)
    assert str(p) in str(info.value) and "aeroplane" in str(info.value)
    rec = parse_voc_xml(p, skip_unknown=True)
    assert rec.labels.tolist() == [VOC_CLASSES.index("dog")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("<annotation><object><name>dog</name>", "malformed XML"),
        (_xml("<object><bndbox><xmin>1</xmin></bndbox></object>"), "without <name>"),
        (_xml("<object><name>dog</name></object>"), "without <bndbox>"),
        (_xml(_obj("dog", (1, "abc", 3, 4))), "ymin"),
        (_xml(_obj("dog", (1, 1, 3, 4), "x")), "difficult"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(AnnotationError, match=match) as info:
        parse_voc_xml(p)
    assert str(p) in str(info.value)


def test_missing_size_is_read_from_image(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "JPEGImages" / "000001.jpg")
    p = _write(tmp_path, _xml(_obj("dog", (1, 1, 10, 10)), size=None, filename="000001.jpg"))
    rec = parse_voc_xml(p)
    assert (rec.width, rec.height) == (64, 48)
    p0 = _write(tmp_path, _xml(_obj("dog", (1, 1, 10, 10)), size=(0, 0), filename="000001.jpg"))
    assert parse_voc_xml(p0).width == 64


def test_missing_size_and_missing_image(tmp_path):
    p = _write(tmp_path, _xml(_obj("dog", (1, 1, 10, 10)), size=None))
    with pytest.raises(FileNotFoundError, match="no <size>"):
        parse_voc_xml(p)


def test_no_objects(tmp_path):
    rec = parse_voc_xml(_write(tmp_path, _xml("")))
    assert rec.boxes.shape == (0, 4) and rec.labels.shape == (0,) and rec.difficult.shape == (0,)
    assert voc_raw_boxes(rec).shape == (0, 4)


# ------------------------------------------------------------------------------------------
# a tiny VOC tree
# ------------------------------------------------------------------------------------------


def _make_tree(base: Path, ids_objs: dict[str, str], split="trainval", image_ext=".jpg") -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i, objs in ids_objs.items():
        (base / "Annotations" / f"{i}.xml").write_text(
            _xml(objs, size=(40, 30), filename=f"{i}{image_ext}")
        )
        arr = np.full((30, 40, 3), 100, np.uint8)
        Image.fromarray(arr).save(base / "JPEGImages" / f"{i}{image_ext}")
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids_objs))
    return base


def test_voc_dataset_layouts(tmp_path):
    objs = {"000005": _obj("dog", (2, 3, 20, 25)), "000007": ""}
    _make_tree(tmp_path / "VOCdevkit" / "VOC2007", objs)
    for root in (tmp_path / "VOCdevkit", tmp_path, tmp_path / "VOCdevkit" / "VOC2007"):
        ds = VOCDataset(root, year=2007, split="trainval")
        assert len(ds) == 2 and ds.image_ids == ["000005", "000007"]
        assert ds.tag == "2007" and ds.class_names == VOC_CLASSES
    img = ds.load_image(0)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert ds[0].labels.tolist() == [VOC_CLASSES.index("dog")] and ds[1].num_objects == 0
    assert ds.index_of("000007") == 1
    assert ds.class_counts()["dog"] == (1, 0)


def test_custom_layout_png_images(tmp_path):
    _make_tree(tmp_path / "mydata", {"a": _obj("one", (1, 1, 4, 4))}, "train", ".png")
    ds = VOCDataset(tmp_path / "mydata", split="train", class_names=("zero", "one"))
    assert ds[0].path.suffix == ".png" and ds.load_image(0).shape == (30, 40, 3)
    assert ds.tag == "mydata"


def test_missing_split_lists_available(tmp_path):
    _make_tree(tmp_path / "VOC2007", {"1": ""}, "train")
    with pytest.raises(FileNotFoundError, match="available splits: train"):
        VOCDataset(tmp_path, split="test")


def test_no_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCDataset(tmp_path, year="2012")


def test_split_lists_id_without_xml(tmp_path):
    base = _make_tree(tmp_path / "VOC2007", {"1": ""})
    (base / "ImageSets/Main/trainval.txt").write_text("1\n2\n\n")
    with pytest.raises(AnnotationError, match="1 image id.*e.g. 2"):
        VOCDataset(tmp_path)


def test_duplicate_id_in_split(tmp_path):
    base = _make_tree(tmp_path / "VOC2007", {"1": ""})
    (base / "ImageSets/Main/trainval.txt").write_text("1\n1\n")
    with pytest.raises(AnnotationError, match="more than once"):
        VOCDataset(tmp_path)


def test_load_image_errors_name_the_file(tmp_path):
    base = _make_tree(tmp_path / "VOC2007", {"1": "", "2": ""})
    (base / "JPEGImages" / "1.jpg").unlink()
    (base / "JPEGImages" / "2.jpg").write_bytes(b"not an image")
    ds = VOCDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="1.jpg"):
        ds.load_image(0)
    with pytest.raises(OSError, match="2.jpg"):
        ds.load_image(1)


def test_class_index(tmp_path):
    ds = VOCDataset(_make_tree(tmp_path / "VOC2007", {"1": ""}))
    assert ds.class_index("dog") == VOC_CLASSES.index("dog")
    with pytest.raises(KeyError, match="known classes: aeroplane"):
        ds.class_index("unicorn")


def test_concat_07_12(tmp_path):
    _make_tree(tmp_path / "VOC2007", {"000005": _obj("dog", (2, 3, 20, 25))})
    _make_tree(tmp_path / "VOC2012", {"2008_000008": _obj("cat", (2, 3, 20, 25))})
    ds = ConcatDataset([VOCDataset(tmp_path, "2007"), VOCDataset(tmp_path, "2012")])
    assert ds.image_ids == ["000005", "2008_000008"]
    assert ds.load_image(1).shape == (30, 40, 3)
    assert ds[1].extra["source_dataset"] == 1


def test_concat_colliding_ids_are_prefixed(tmp_path):
    _make_tree(tmp_path / "VOC2007", {"000005": ""})
    _make_tree(tmp_path / "VOC2012", {"000005": ""})
    ds = ConcatDataset([VOCDataset(tmp_path, "2007"), VOCDataset(tmp_path, "2012")])
    assert ds.image_ids == ["2007_000005", "2012_000005"]
    assert ds[0].extra["source_image_id"] == "000005"
    with pytest.raises(ValueError, match="collide"):
        ConcatDataset([VOCDataset(tmp_path, "2007"), VOCDataset(tmp_path, "2007")])


def test_concat_requires_same_classes(tmp_path):
    _make_tree(tmp_path / "VOC2007", {"1": ""})
    a = VOCDataset(tmp_path)
    b = DetectionDataset(("x",), [], name="other")
    with pytest.raises(ValueError, match="class names"):
        ConcatDataset([a, b])


def test_record_validation():
    with pytest.raises(ValueError, match="labels"):
        ImageRecord("a", Path("a.jpg"), 10, 10, np.zeros((2, 4)), np.zeros(1), np.zeros(2))
    with pytest.raises(ValueError, match="labels must be in"):
        DetectionDataset(("a",), [ImageRecord("a", "a.jpg", 5, 5, [[0, 0, 1, 1]], [3], [False])])


def test_class_file_lists_the_classes_and_names_itself_when_bad(tmp_path):
    from mapdet.data.voc import read_class_file

    assert read_class_file(tmp_path) is None
    (tmp_path / "classes.txt").write_text("crack\n\npothole\n")
    assert read_class_file(tmp_path) == ("crack", "pothole")
    (tmp_path / "classes.txt").write_text("crack\ncrack\n")
    with pytest.raises(AnnotationError, match=r"classes.txt: class 'crack' is listed more"):
        read_class_file(tmp_path)
    (tmp_path / "classes.txt").write_text("\n")
    with pytest.raises(AnnotationError, match="no class names"):
        read_class_file(tmp_path)
