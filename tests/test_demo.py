"""``mapdet demo --quick`` end to end, and the embedded config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mapdet.config import load_config
from mapdet.engine.demo import default_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_embedded_config_matches_configs_digits_yaml():
    assert default_config() == load_config(CONFIGS / "digits.yaml")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from mapdet.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "softmax voc07" in printed and "map area" in printed and "ms/iteration" in printed

    results = json.loads((out / "results.json").read_text())
    for name in ("softmax", "map"):
        r = results[name]
        assert {"mAP", "mAP_voc07", "per_class", "sec_per_iter"} <= set(r)
        assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["mAP_voc07"] <= 1.0
        assert len(r["per_class"]) == 10
        assert r["sec_per_iter"] > 0 and math.isfinite(r["sec_per_iter"])
    assert results["softmax"]["iterations"] == results["map"]["iterations"]
    assert results["config"]["model"]["backbone"] == "small"
    assert results["machine"]["cpu_count"] >= 1
    for name in ("pr_curves_softmax.png", "pr_curves_map.png", "detections_map.png"):
        assert (out / name).is_file(), name
    assert (out / "map" / "eval" / "metrics.json").is_file()
