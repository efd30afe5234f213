"""Fuzzing the readers: real VOC XML, COCO JSON and devkit result files, mutated.

Truncations, values of the wrong type, missing keys and elements, huge numbers: every
mutated file either parses or raises an error the command line reports as one line
(``mapdet.cli._input_errors`` plus ``ValueError``/``KeyError``/``OSError``) whose message
names the file. Any other exception (``TypeError``, ``IndexError``, ...) would be a
traceback in front of the user, and fails the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapdet.data.coco import COCODataset
from mapdet.data.digits import DIGIT_CLASSES, write_digits_voc
from mapdet.data.voc import parse_voc_xml
from mapdet.evaluation.export import write_devkit_results
from mapdet.evaluation.voc_annotations import load_voc_ground_truth
from mapdet.evaluation.voc_results import read_result_file, read_result_file_reference

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

#: Replacement values: wrong types, huge and non-finite numbers, empty and odd text.
ODD_TEXT = st.sampled_from(["", "abc", "-1", "0", "1e400", "-1e400", "nan", "inf",
                            "99999999999999999999999999999", "1.5.2", "0x10", "é", " ", "<",
                            "&amp;", "1e-400", "-0", "[1, 2]", "null", "true"])
ODD_JSON = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                     st.floats(allow_nan=False), st.sampled_from([1e308, -1e308]),
                     st.text(max_size=5), st.lists(st.integers(-5, 5), max_size=5),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _one_line_naming(exc: BaseException, path: Path) -> None:
    """``exc`` is reported by the CLI as one line, and that line names ``path``."""
    from mapdet.cli import _input_errors

    assert isinstance(exc, _input_errors() + (ValueError, KeyError, OSError)), repr(exc)
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    assert str(path) in text or path.name in text, f"{type(exc).__name__}: {text}"


def _mutate_text(data: st.DataObject, text: str) -> str:
    """One of: a truncation, a token replaced by an odd value, a token deleted, a line
    deleted or repeated."""
    kind = data.draw(st.sampled_from(["truncate", "replace", "delete", "line"]))
    if kind == "truncate":
        return text[:data.draw(st.integers(0, max(0, len(text) - 1)))]
    tokens = list(re.finditer(r"[^\s<>]+", text))
    if kind in ("replace", "delete") and tokens:
        m = tokens[data.draw(st.integers(0, len(tokens) - 1))]
        new = data.draw(ODD_TEXT) if kind == "replace" else ""
        return text[:m.start()] + new + text[m.end():]
    lines = text.splitlines(keepends=True)
    k = data.draw(st.integers(0, max(0, len(lines) - 1)))
    return "".join(lines[:k] + lines[k + 1:]) if data.draw(st.booleans()) else \
        "".join(lines[:k + 1] + lines[k:])


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = write_digits_voc(tmp_path_factory.mktemp("fuzz") / "d", num_train=1, num_test=1,
                            image_size=48, seed=3)
    return root, (root / "Annotations" / "test_00000.xml").read_text()


@FUZZ
@given(data=st.data())
def test_mutated_voc_xml_parses_or_names_the_file(voc, data):
    root, original = voc
    xml = root / "Annotations" / "test_00000.xml"
    xml.write_text(_mutate_text(data, original), encoding="utf-8")
    try:
        for reader in (lambda: parse_voc_xml(xml, DIGIT_CLASSES),
                       lambda: load_voc_ground_truth(root, "test", DIGIT_CLASSES,
                                                     cache_dir=False)):
            try:
                reader()
            except Exception as exc:  # noqa: BLE001 - the point of the test
                _one_line_naming(exc, xml)
    finally:
        xml.write_text(original)


def _coco_json() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.jpg", "width": 20, "height": 20}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8], "iscrowd": 0,
             "area": 80},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [5.5, 3, 20, 20], "iscrowd": 1,
             "area": 400},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 19, 19], "area": 361},
        ],
    }


def _paths(node, prefix=()):
    """Every (path, value) in a nested JSON structure."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_mutated_coco_json_parses_or_names_the_file(tmp_path, data):
    doc = _coco_json()
    kind = data.draw(st.sampled_from(["replace", "delete", "truncate"]))
    if kind == "truncate":
        text = json.dumps(doc)
        text = text[:data.draw(st.integers(0, len(text) - 1))]
    else:
        paths = [p for p, _ in _paths(doc) if p]
        path = paths[data.draw(st.integers(0, len(paths) - 1))]
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if kind == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(ODD_JSON)
        text = json.dumps(doc)
    ann = tmp_path / "instances.json"
    ann.write_text(text)
    try:
        ds = COCODataset(ann, tmp_path)
    except Exception as exc:  # noqa: BLE001
        _one_line_naming(exc, ann)
        return
    for r in ds.records:  # what parsed is usable: finite boxes inside the image
        assert np.isfinite(r.boxes).all() and r.boxes.shape == (len(r.labels), 4)
        assert (r.boxes[:, 2:] > r.boxes[:, :2]).all()
        assert (r.labels >= 0).all() and (r.labels < ds.num_classes).all()


@pytest.fixture(scope="module")
def result_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    dets = {"000001": {"boxes": np.array([[0.0, 1.0, 10.5, 20.0], [3.0, 3.0, 9.0, 9.0]]),
                       "scores": np.array([0.9, 0.25]), "labels": np.array([0, 0])},
            "000002": {"boxes": np.array([[5.0, 5.0, 30.0, 40.0]]),
                       "scores": np.array([0.5]), "labels": np.array([0])}}
    (path,) = write_devkit_results(folder, "test", ["cat"], dets).values()
    return path.read_text()


@FUZZ
@given(data=st.data())
def test_mutated_result_files_parse_or_name_the_file(tmp_path, result_text, data):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text(_mutate_text(data, result_text), encoding="utf-8")
    outcomes = []
    for reader in (read_result_file, read_result_file_reference):
        try:
            ids, scores, boxes = reader(path)
        except Exception as exc:  # noqa: BLE001
            _one_line_naming(exc, path)
            outcomes.append(type(exc))
        else:
            assert np.isfinite(scores).all() and np.isfinite(boxes).all()
            assert len(ids) == len(scores) == len(boxes)
            outcomes.append((list(ids), scores.tolist(), boxes.tolist()))
    assert outcomes[0] == outcomes[1]  # the fast reader agrees with the reference
