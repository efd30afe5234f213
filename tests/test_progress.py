"""Progress bars: --no-progress silences every bar (proposals computed inside training
too), and a bar written to a log file (not a terminal) redraws rarely."""

from __future__ import annotations

import io
from pathlib import Path

from mapdet.cli import main
from mapdet.progress import progress_bar

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_non_terminal_bar_redraws_rarely():
    log = io.StringIO()  # not a TTY, like a log file
    for _ in progress_bar(range(5000), file=log, desc="work"):
        pass
    text = log.getvalue()
    assert text.count("\r") <= 3 and "5000/5000" in text  # start, end; no per-step lines


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    with progress_bar(total=10, enabled=False, file=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def _tiny(root: Path) -> list[str]:
    return [str(CONFIGS / "digits.yaml"), f"data.root={root / 'digits'}",
            "data.digits={num_train: 3, num_test: 1, image_size: 48, seed: 4}",
            "data.scale=48", "data.max_size=48", f"proposals.cache_dir={root / 'cache'}",
            "proposals.num_workers=0", "proposals.max_per_image=32", "model.fc_dim=16",
            "train.checkpoint_every=0", "output.tensorboard=false"]


def test_no_progress_silences_the_proposals_bar_inside_training(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path), "train.iterations=2", "--out",
                 str(tmp_path / "run"), "--no-progress", "-q"]) == 0
    err = capsys.readouterr().err
    assert "proposals (" not in err and "train[" not in err and "eval" not in err


def test_training_bar_in_a_log_is_a_few_lines(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path), "train.iterations=60", "--out",
                 str(tmp_path / "run"), "--no-eval", "-q"]) == 0
    err = capsys.readouterr().err
    assert 1 <= err.count("train[softmax]") <= 4, err
