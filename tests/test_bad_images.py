"""A missing, truncated or garbage image is one line on stderr and exit code 2, naming the
file, in the main process and in worker processes (proposals and training data loading)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from owndata import write_own_voc

from mapdet.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _spoil(root: Path, how: str) -> Path:
    path = root / "JPEGImages" / "img001.jpg"
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"this is not a JPEG at all" * 10)
    return path


def _args(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [str(CONFIGS / "digits.yaml"), "data.kind=voc", f"data.root={root}",
            "data.train_split=trainval", "data.classes=[crack, pothole]", "data.digits={}",
            "data.scale=64", "data.max_size=64", f"proposals.cache_dir={tmp / 'cache'}",
            "model.fc_dim=16", "train.iterations=2", "train.checkpoint_every=0",
            "output.tensorboard=false", *extra]


def _one_line(capsys, path: Path) -> str:
    text = capsys.readouterr().err.strip()
    assert "Traceback" not in text, text
    err = text.splitlines()[-1]
    assert err.startswith("mapdet: error:") and str(path) in err, text
    return err


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage"])
@pytest.mark.parametrize("workers", [0, 2])
def test_proposals_with_a_bad_image(tmp_path, capsys, how, workers):
    root = write_own_voc(tmp_path / "data", num_train=4, num_test=1)
    path = _spoil(root, how)
    code = main(["proposals", *_args(root, tmp_path, f"proposals.num_workers={workers}"),
                 "--split", "train", "--no-progress", "-q"])
    assert code == 2
    err = _one_line(capsys, path)
    assert "'img001'" in err


def test_training_data_loader_worker_with_a_bad_image(tmp_path, capsys):
    """Proposals from a file (so that only the training loader reads the image), two data
    loader workers."""
    from mapdet.data.proposals import save_proposals_npz

    root = write_own_voc(tmp_path / "data", num_train=4, num_test=1)
    ids = [line for line in (root / "ImageSets/Main/trainval.txt").read_text().split()]
    file = tmp_path / "props.npz"
    save_proposals_npz(file, {i: np.array([[0, 0, 20, 20], [5, 5, 40, 40]], np.float32)
                              for i in ids})
    path = _spoil(root, "garbage")
    code = main(["train", *_args(root, tmp_path, "proposals.method=file",
                                 f"proposals.file={file}", "data.num_workers=2"),
                 "--out", str(tmp_path / "run"), "--no-eval", "--no-progress", "-q"])
    assert code == 2
    err = _one_line(capsys, path)
    assert "cannot read image file" in err
