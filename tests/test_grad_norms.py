"""experiments/grad_norms.py: the percentiles behind the advice to clip the mAP loss at its
median gradient norm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "grad_norms.py"


@pytest.fixture(scope="module")
def grad_norms():
    spec = importlib.util.spec_from_file_location("grad_norms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_percentiles_of_the_train_rows_only(tmp_path, grad_norms):
    norms = [0.9, 1.4, 1.5, 1.6, 9.0, 18.5]
    rows = [{"iteration": i + 1, "split": "train", "grad_norm": g} for i, g in enumerate(norms)]
    rows.insert(2, {"iteration": 3, "split": "train", "loss": 0.3})   # logged without a norm
    rows.append({"iteration": 6, "split": "test", "grad_norm": 1000.0})  # not a train step
    run = _run(tmp_path / "norm_map", rows)
    out = tmp_path / "norms.json"
    assert grad_norms.main([str(run), "--json", str(out)]) == 0
    got = json.loads(out.read_text())["norm_map"]
    assert got["steps"] == 6 and got["max"] == 18.5
    p10, p50, p90 = np.percentile(norms, [10, 50, 90])
    assert (got["p10"], got["p50"], got["p90"]) == (p10, p50, p90)
    assert got["p50"] == pytest.approx(1.55)


def test_a_run_without_norms_names_its_file(tmp_path, grad_norms):
    run = _run(tmp_path / "plain", [{"iteration": 1, "split": "train", "loss": 0.3}])
    with pytest.raises(SystemExit, match=r"plain/metrics.jsonl: no grad_norm logged"):
        grad_norms.main([str(run)])
