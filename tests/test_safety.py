"""What users own is kept: output claims, file modes, full disks, where config errors come
from, non-finite values, dropped annotations, and a build backend without deprecations."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mapdet.config import ConfigError, TrainConfig, load_config
from mapdet.io import atomic_write_text
from mapdet.outputs import MANIFEST, OutputExistsError, claim_outputs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


# -- output folders ---------------------------------------------------------------------------


def test_claim_refuses_existing_inputs_and_foreign_files(tmp_path):
    out = tmp_path / "out"
    claim_outputs(out, ["a.png", "b.json"])
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.png", "b.json"]
    (out / "a.png").write_bytes(b"1")
    with pytest.raises(OutputExistsError, match=r"already holds .*a\.png.*--overwrite"):
        claim_outputs(out, ["a.png", "b.json"])
    claim_outputs(out, ["a.png"], overwrite=True)  # mapdet wrote it: may be replaced
    (out / "user.png").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=r"user\.png was not written by mapdet"):
        claim_outputs(out, ["user.png"], overwrite=True)
    assert "user.png" not in json.loads((out / MANIFEST).read_text())["files"]
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="would replace the input"):
        claim_outputs(tmp_path, ["photo.png"], overwrite=True, inputs=[photo])
    # a missing input cannot be the same file, but the same path still is
    with pytest.raises(OutputExistsError, match="would replace the input"):
        claim_outputs(tmp_path, ["new.png"], inputs=[tmp_path / "new.png"])


# -- atomic writes: modes and full disks ------------------------------------------------------


def test_atomic_writes_use_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "new.json", "{}")
        assert p.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
        os.chmod(p, 0o604)
        atomic_write_text(p, "[]")
        assert p.stat().st_mode & 0o777 == 0o604 and p.read_text() == "[]"
    finally:
        os.umask(old)


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import mapdet.io

    target = tmp_path / "checkpoints" / "iter_0000005.pt"
    atomic_write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mapdet.io.os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new")
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no .tmp left


# -- config errors name where the value came from ---------------------------------------------


def test_config_errors_name_the_command_line_or_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, ["train.iteratons=2"])
    text = str(info.value)
    assert text.startswith("command line override 'train.iteratons=2': unknown key")
    assert "digits.yaml" not in text and "Did you mean 'train.iterations'" in text

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backbone: small\ntrain:\n  lr: 0.1\n  iteratons: 3\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:5: unknown key 'train.iteratons'"):
        load_config(cfg)
    cfg.write_text("train:\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:2: train.lr: must be >= 0"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"^command line override 'train.lr=-2': train.lr"):
        load_config(cfg, ["train.lr=0.5", "train.lr=-2"])
    # a value typed on the command line that breaks a rule is blamed on that override
    with pytest.raises(ConfigError, match=r"^command line override 'train.lr_steps=\[5, 3\]'"):
        load_config(DIGITS, ["train.lr_steps=[5, 3]"])


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999", "'NaN'"])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number"):
        load_config(DIGITS, [f"train.lr={value}"])
    with pytest.raises(ConfigError, match=r"loss\.sigma: must be a finite number"):
        load_config(DIGITS, [f"loss.sigma={value}"])


def test_non_finite_floats_built_in_code_are_refused():
    from mapdet.config import Config

    cfg = Config(train=TrainConfig(momentum=float("nan")))
    with pytest.raises(ConfigError, match=r"train\.momentum: must be a finite number"):
        cfg.validate()


# -- nothing dropped silently -----------------------------------------------------------------


def _coco(tmp_path, annotations, images=None):
    data = {"images": images if images is not None else
            [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
            "categories": [{"id": 3, "name": "cat"}], "annotations": annotations}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_dangling_coco_annotations_are_an_error(tmp_path):
    from mapdet.data.base import AnnotationError
    from mapdet.data.coco import COCODataset

    good = {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}
    ds = COCODataset(_coco(tmp_path, [good]), tmp_path)
    assert ds.records[0].num_objects == 1
    dangling = {"id": 11, "image_id": 7, "category_id": 3, "bbox": [1, 1, 4, 4]}
    path = _coco(tmp_path, [good, dangling])
    with pytest.raises(AnnotationError, match=rf"{path}: 1 of 2 annotations refer to an "
                       r"image_id that is not in 'images', e.g. annotation 11 \(image_id 7\)"):
        COCODataset(path, tmp_path)
    twice = [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}] * 2
    with pytest.raises(AnnotationError, match="image id 1 is listed more than once"):
        COCODataset(_coco(tmp_path, [good], images=twice), tmp_path)


def test_skipped_voc_objects_are_counted_in_one_warning(tmp_path, caplog):
    from mapdet.data.digits import DIGIT_CLASSES, write_digits_voc
    from mapdet.data.voc import VOCDataset

    root = write_digits_voc(tmp_path / "d", num_train=3, num_test=1, image_size=48)
    xml = root / "Annotations" / "train_00001.xml"
    text = xml.read_text()
    extra = ("<object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1"
             "</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>")
    xml.write_text(text.replace("</annotation>", extra * 2 + "</annotation>"))
    with caplog.at_level(logging.WARNING, logger="mapdet.data.voc"):
        VOCDataset(root, split="train", class_names=DIGIT_CLASSES, skip_unknown=True)
    warnings = [r.getMessage() for r in caplog.records if "skip_unknown" in r.getMessage()]
    assert len(warnings) == 1 and "2 object(s)" in warnings[0] and "1 of 3" in warnings[0]
    assert str(xml) in warnings[0] and "cat" in warnings[0]


# -- packaging --------------------------------------------------------------------------------


def _metadata_build_output(tmp_path: Path, pyproject: str) -> str:
    """stdout + stderr of setuptools building the metadata of a copy of the project."""
    shutil.copytree(ROOT / "src" / "mapdet", tmp_path / "src" / "mapdet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "pyproject.toml").write_text(pyproject)
    (tmp_path / "meta").mkdir()
    code = ("import setuptools.build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel('meta'))")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_the_build_backend_gives_no_deprecation_warning(tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\nlicense = "MIT"\n' in pyproject  # an SPDX expression, not a table
    output = _metadata_build_output(tmp_path / "now", pyproject)
    assert "deprecat" not in output.lower(), output
    # the check can fail: the old table form draws the deprecation this test looks for
    old = pyproject.replace('\nlicense = "MIT"\n', '\nlicense = { text = "MIT" }\n')
    assert "deprecat" in _metadata_build_output(tmp_path / "old", old).lower()
