"""The ``mapdet`` command line: help, and bad input as one clear line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mapdet.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "detect", "proposals", "demo"):
        assert cmd in out
    assert "examples:" in out


@pytest.mark.parametrize("cmd", ["train", "eval", "detect", "proposals", "demo"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mapdet " + cmd in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mapdet", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "mapdet" in proc.stdout


def test_bad_config_key_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mapdet: error:") and len(err.splitlines()) == 1
    assert "train.learning_rate" in err and "Valid keys of train" in err
    assert "Traceback" not in err


def test_bad_override_and_missing_files_exit_2(tmp_path, capsys):
    assert main(["train", str(CONFIGS / "digits.yaml"), "train.lr=fast"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["eval", "--voc", str(tmp_path)]) == 2
    assert "--results" in capsys.readouterr().err
    assert main(["eval", "--voc", str(tmp_path), "--results", str(tmp_path)]) == 2
    assert "no VOC-layout folder" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    from mapdet.config import ConfigError

    with pytest.raises(ConfigError):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])


def test_resume_and_overrides_parse():
    args = build_parser().parse_args(
        ["train", "c.yaml", "train.lr=0.1", "model.backbone=vgg16", "--resume"])
    assert args.overrides == ["train.lr=0.1", "model.backbone=vgg16"] and args.resume is True
    args = build_parser().parse_args(["train", "c.yaml", "--resume", "ck.pt", "--out", "r"])
    assert args.resume == "ck.pt" and str(args.out) == "r"


def test_eval_scores_devkit_result_files(tmp_path, capsys):
    """``mapdet eval --voc ROOT --results DIR``: perfect detections score 1.0, no images read."""
    from mapdet.data.digits import DIGIT_CLASSES, write_digits_voc
    from mapdet.data.voc import VOCDataset
    from mapdet.evaluation.export import write_devkit_results

    root = write_digits_voc(tmp_path / "digits", num_train=1, num_test=3, image_size=64)
    ds = VOCDataset(root, split="test", class_names=DIGIT_CLASSES)
    dets = {r.image_id: {"boxes": r.boxes, "scores": [1.0] * len(r.boxes), "labels": r.labels}
            for r in ds.records}
    write_devkit_results(tmp_path / "results", "test", DIGIT_CLASSES, dets)
    for p in (root / "JPEGImages").iterdir():
        p.unlink()  # images are not needed
    out = tmp_path / "metrics.json"
    assert main(["eval", "--voc", str(root), "--split", "test", "--results",
                 str(tmp_path / "results"), "--metric", "area", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["metric"] == "area" and metrics["mAP"] == pytest.approx(1.0)
    assert set(metrics["per_class"]) == set(DIGIT_CLASSES)
    assert "mAP" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 4, num_test: 2, image_size: 64, seed: 2}",
        "data.scale=64", "data.max_size=64",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=64", "model.fc_dim=32",
        "train.iterations=2", "train.checkpoint_every=0", "train.log_every=1",
        "output.tensorboard=false",
    ]


def test_proposals_train_eval_detect(tmp_path, tiny_args, capsys):
    cfg = str(CONFIGS / "digits.yaml")
    assert main(["proposals", cfg, *tiny_args, "--no-progress"]) == 0
    assert "train: 4 images" in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["train", cfg, *tiny_args, "--out", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint:" in printed and "mAP" in printed  # evaluated after training
    assert (run / "eval" / "metrics.json").is_file()

    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--blame", "4"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    # --blame in checkpoint mode names the same detections as scoring its exported result
    # files with --blame (mode 2), where tests/test_eval_blame.py checks them against ap_blame
    blamed = json.loads((tmp_path / "ev" / "blame.json").read_text())
    assert "blame.txt" in capsys.readouterr().out
    digits_root = Path(tiny_args[0].split("=", 1)[1])
    assert main(["eval", "--voc", str(digits_root), "--results", str(tmp_path / "ev" / "results"),
                 "--out", str(tmp_path / "ev2"), "--blame", "4", "--split", "test"]) == 0
    again = json.loads((tmp_path / "ev2" / "blame.json").read_text())
    assert blamed["per_class"] == again["per_class"]
    assert ([(d["image_id"], d["class"], d["score"], d["ap_gain"]) for d in blamed["detections"]]
            == [(d["image_id"], d["class"], d["score"], d["ap_gain"])
                for d in again["detections"]])

    images = sorted((Path(tiny_args[0].split("=", 1)[1]) / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "det"
    assert main(["detect", *map(str, images), "--checkpoint", str(run), "--out", str(out),
                 "--score-threshold", "0.0"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.stem + ".png" for p in images)
    listing = json.loads((out / "detections.json").read_text())
    assert set(listing) == {str(p) for p in images}

    assert main(["detect", str(tmp_path / "missing.jpg"), "--checkpoint", str(run)]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    _check_outputs_are_guarded(tmp_path, run, images, digits_root, capsys)


def _check_outputs_are_guarded(tmp_path, run, images, digits_root, capsys):
    """A second detect / eval into the same --out is refused (files unchanged) unless
    --overwrite; an input image and a file mapdet did not write are never replaced."""
    out = tmp_path / "det"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["detect", *map(str, images), "--checkpoint", str(run), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    # the input image is never an output, --overwrite or not
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "photo.png"
    from PIL import Image

    Image.open(images[0]).save(photo)
    original = photo.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["detect", str(photo), "--checkpoint", str(run), "--out", str(photos),
                     *extra]) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert photo.read_bytes() == original and sorted(photos.iterdir()) == [photo]

    # a user's own file with an output's name survives --overwrite
    mine = out / "mine.png"
    mine.write_bytes(b"the user's own picture")
    other = tmp_path / "mine.jpg"
    other.write_bytes(images[0].read_bytes())
    assert main(["detect", str(other), "--checkpoint", str(run), "--out", str(out),
                 "--overwrite"]) == 2
    assert "not written by mapdet" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's own picture"

    # eval, both modes
    metrics = (tmp_path / "ev" / "metrics.json").read_bytes()
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert (tmp_path / "ev" / "metrics.json").read_bytes() == metrics
    argv = ["eval", "--voc", str(digits_root), "--results", str(tmp_path / "ev" / "results"),
            "--out", str(tmp_path / "ev2"), "--split", "test"]
    assert main(argv) == 2
    assert "ev2" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_eval_classes_option(tmp_path):
    from mapdet.cli import _class_list
    from mapdet.config import ConfigError

    assert _class_list(None) is None
    assert _class_list("crack, pothole") == ("crack", "pothole")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  kind: voc\n  classes: [a, b]\n")
    assert _class_list(str(tmp_path / "run")) == ("a", "b")
    (tmp_path / "voc.yaml").write_text("data:\n  kind: voc\n")
    with pytest.raises(ConfigError, match="has no data.classes"):
        _class_list(str(tmp_path / "voc.yaml"))
    with pytest.raises(ConfigError, match="distinct comma-separated"):
        _class_list("a,,b")
