"""``mapdet demo --quick`` end to end, and the packaged config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from mapdet.config import MAP_STAGE_LR, load_config
from mapdet.engine.demo import default_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_demo_reads_the_packaged_digits_yaml_that_configs_links_to():
    import mapdet

    packaged = Path(mapdet.__file__).parent / "configs" / "digits.yaml"
    assert (CONFIGS / "digits.yaml").resolve() == packaged.resolve()
    cfg = default_config(["train.iterations=7"])
    assert cfg == load_config(packaged, ["train.iterations=7"])
    assert (cfg.data.kind, cfg.model.backbone, cfg.train.iterations, cfg.train.lr) == (
        "digits", "small", 7, 0.02)
    assert cfg.data.digits["num_train"] == 1200 and cfg.data.digits["num_test"] == 200


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from mapdet.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "softmax voc07" in printed and "map area" in printed and "ms/iteration" in printed
    assert "train voc07" in printed and "test voc07" in printed

    results = json.loads((out / "results.json").read_text())
    for name in ("baseline", "softmax", "map"):
        r = results[name]
        assert {"mAP", "mAP_voc07", "per_class", "sec_per_iter", "train_mAP"} <= set(r)
        assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["mAP_voc07"] <= 1.0
        assert 0.0 <= r["train_mAP"] <= 1.0 and 0.0 <= r["train_mAP_voc07"] <= 1.0
        assert len(r["per_class"]) == 10
        assert r["sec_per_iter"] > 0 and math.isfinite(r["sec_per_iter"])
    assert results["softmax"]["iterations"] == results["map"]["iterations"]
    # The quick baseline clearly learned: it reaches 0.255 VOC07 mAP on the development machine
    # (experiments/demo/results_quick.json); the bound leaves room for other machines'
    # floating point.
    assert results["baseline"]["mAP_voc07"] >= 0.2
    # The mAP stage ran the recipe, not the softmax stage's learning rate.
    assert results["finetune"]["map_lr"] == MAP_STAGE_LR
    assert results["finetune"]["map_normalization"] == default_config().loss.normalization
    assert results["config"]["model"]["backbone"] == "small"
    assert results["machine"]["cpu_count"] >= 1
    # the versions that move the figures between machines are named
    assert results["machine"]["numpy"] == np.__version__
    assert results["machine"]["opencv"].startswith(cv2.__version__)
    for name in ("pr_curves_softmax.png", "pr_curves_map.png", "detections_map.png"):
        assert (out / name).is_file(), name
    assert (out / "map" / "eval" / "metrics.json").is_file()
