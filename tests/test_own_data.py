"""The README's "Train on your own data" commands, run as written (in a folder holding a
small generated data set; only the length and image size are shortened by overrides placed
before the README's own)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from owndata import CLASSES, voc_to_coco_json, write_own_voc

from mapdet.cli import main

REPO = Path(__file__).resolve().parents[1]
SHORTER = ["train.iterations=3", "train.checkpoint_every=0", "data.scale=64",
           "data.max_size=64", "model.fc_dim=16", "proposals.num_workers=0",
           "proposals.max_per_image=64", "output.tensorboard=false", "train.device=cpu"]


def readme_commands() -> list[list[str]]:
    """The ``mapdet`` lines of the first bash block of the README's own-data section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines()
            if line.startswith("mapdet ")]


def _shorten(argv: list[str]) -> list[str]:
    if argv[0] == "train":  # overrides right after the config: the README's own come later
        return [argv[0], argv[1], *SHORTER, *argv[2:], "--no-progress", "-q"]
    return [*argv, "--no-progress", "-q"] if argv[0] == "eval" else [*argv, "-q"]


def metrics_of(workdir: Path, run: str, metric: str) -> dict:
    """Per-class APs of ``metric`` in the run's evaluation after training."""
    metrics = json.loads((workdir / run / "eval" / "metrics.json").read_text())
    return metrics["metrics"][metric]["per_class"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A fresh folder like a user's: the repo's configs/, mydata/ (VOC layout), mycoco/
    (COCO JSON) and photo.jpg."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    root = write_own_voc(tmp_path / "mydata", num_train=6, num_test=3)
    coco = tmp_path / "mycoco"
    shutil.copytree(root / "JPEGImages", coco / "images")
    voc_to_coco_json(root, "trainval", coco / "train.json")
    voc_to_coco_json(root, "test", coco / "test.json")
    shutil.copy(root / "JPEGImages" / "img007.jpg", tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_readme_own_data_commands(workdir, capsys):
    commands = readme_commands()
    assert [c[0] for c in commands] == ["train", "eval", "eval", "detect", "train"]
    for argv in commands:
        assert main(_shorten(argv)) == 0, argv
    capsys.readouterr()
    for run in ("runs/mine", "runs/mine_coco"):
        metrics = json.loads((workdir / run / "eval" / "metrics.json").read_text())
        assert set(metrics["per_class"]) == set(CLASSES)  # the run's own classes
    again = json.loads((workdir / "runs/mine/eval_again/metrics.json").read_text())
    assert set(again["per_class"]) == set(CLASSES)
    # a config file without data.classes, with the run's checkpoint: the run's classes
    assert main(["eval", "configs/own_data.yaml", *SHORTER, "data.root=mydata",
                 "--checkpoint", "runs/mine", "--out", "runs/mine/eval_cfg", "-q",
                 "--no-progress"]) == 0
    by_cfg = json.loads((workdir / "runs/mine/eval_cfg/metrics.json").read_text())
    assert by_cfg["per_class"] == again["per_class"]
    scores = json.loads((workdir / "scores.json").read_text())  # eval --voc --classes RUN
    assert scores["per_class"] == pytest.approx(metrics_of(workdir, "runs/mine", "voc07"),
                                                nan_ok=True)
    listing = json.loads((workdir / "detections" / "detections.json").read_text())
    assert list(listing) == ["photo.jpg"]
    assert all(d["class"] in CLASSES for d in listing["photo.jpg"])
    assert (workdir / "detections" / "photo.png").is_file()
