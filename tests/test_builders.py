"""The one config -> component mapping (engine/builders.py): custom VOC classes, a
single-folder VOC root, proposals.seed, proposals.max_per_image applied once, detect with
proposals.method: file."""

from __future__ import annotations

import numpy as np
import pytest
from owndata import CLASSES, write_own_voc

from mapdet.config import ConfigError, load_config
from mapdet.engine import builders


@pytest.fixture(scope="module")
def own_root(tmp_path_factory):
    return write_own_voc(tmp_path_factory.mktemp("own") / "mydata", num_train=3, num_test=2)


def _voc_cfg(root, *extra):
    return load_config(None, ["data.kind=voc", f"data.root={root}", "data.train_split=trainval",
                              "data.classes=[crack, pothole]", *extra])


def test_single_folder_voc_root_with_custom_classes(own_root):
    cfg = _voc_cfg(own_root, "data.train_years=[2007, 2012]")  # years are moot for one folder
    ds = builders.build_dataset(cfg, "train")
    assert ds.class_names == CLASSES and len(ds) == 3  # not the folder twice
    assert {int(lab) for r in ds.records for lab in r.labels} <= {0, 1}
    assert len(builders.build_dataset(cfg, "test")) == 2


def test_unknown_class_names_the_config_key_or_is_skipped(tmp_path):
    root = write_own_voc(tmp_path / "d", num_train=2, num_test=1, extra_class="manhole")
    with pytest.raises(ConfigError) as e:
        builders.build_dataset(_voc_cfg(root), "train")
    msg = str(e.value)
    assert "data.classes" in msg and "'manhole'" in msg and "data.skip_unknown" in msg
    assert "img000.xml" in msg
    ds = builders.build_dataset(_voc_cfg(root, "data.skip_unknown=true"), "train")
    assert all("manhole" not in ds.class_names[int(lab)] for r in ds.records for lab in r.labels)
    # the default class list is VOC's 20: 'crack' and 'pothole' are not among them
    with pytest.raises(ConfigError, match="unknown class name '(crack|pothole)'"):
        builders.build_dataset(load_config(None, ["data.kind=voc", f"data.root={root}"]),
                               "train")


def test_proposals_follow_proposals_seed_not_train_seed(own_root, monkeypatch):
    seen = []

    def fake(dataset, **kw):
        seen.append(kw)
        return {r.image_id: np.zeros((5, 4), np.float32) for r in dataset.records}

    monkeypatch.setattr("mapdet.data.proposals.load_or_compute_proposals", fake)
    ds = builders.build_dataset(_voc_cfg(own_root), "train")
    builders.build_proposals(_voc_cfg(own_root, "train.seed=7"), ds, progress=False)
    builders.build_proposals(_voc_cfg(own_root, "proposals.seed=3"), ds, progress=False)
    assert [kw["seed"] for kw in seen] == [0, 3]


def test_max_per_image_is_applied_once_for_computed_and_file_proposals(own_root, tmp_path):
    from mapdet.data.proposals import save_proposals_npz

    ds = builders.build_dataset(_voc_cfg(own_root), "train")
    file = tmp_path / "props.npz"
    boxes = np.array([[0, 0, 10 + k, 10 + k] for k in range(20)], np.float32)
    save_proposals_npz(file, {r.image_id: boxes for r in ds.records})
    cfg = _voc_cfg(own_root, "proposals.method=file", f"proposals.file={file}",
                   "proposals.max_per_image=7")
    props = builders.build_proposals(cfg, ds, "train", progress=False)
    assert {len(p) for p in props.values()} == {7}
    np.testing.assert_array_equal(props[ds.records[0].image_id], boxes[:7])
    cfg = _voc_cfg(own_root, f"proposals.cache_dir={tmp_path / 'cache'}",
                   "proposals.num_workers=0", "proposals.max_per_image=3")
    props = builders.build_proposals(cfg, ds, "train", progress=False)
    assert max(len(p) for p in props.values()) <= 3
    # a different cap reuses the cache (the cache holds every box)
    cfg.proposals.max_per_image = 0
    more = builders.build_proposals(cfg, ds, "train", progress=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert max(len(p) for p in more.values()) > 3


def test_detect_images_with_proposals_from_a_file(own_root, tmp_path):
    """Images outside any split cannot be in a proposal file: Selective Search is computed
    for them instead of failing with "unknown proposal method 'file'"."""
    cfg = _voc_cfg(own_root, "proposals.method=file", f"proposals.file={tmp_path / 'x.npz'}",
                   "proposals.max_per_image=10")
    from mapdet.data.base import DetectionDataset

    ds = builders.build_dataset(_voc_cfg(own_root), "test")
    images = DetectionDataset(ds.class_names, ds.records, name="images")
    props = builders.build_proposals(cfg, images, "images", progress=False, cache=False)
    assert set(props) == {r.image_id for r in ds.records}
    assert all(0 < len(p) <= 10 for p in props.values())
