"""Run directories that never lose work: a non-empty --out is refused, a lock keeps a second
run out (stale locks are taken over), --resume refuses run-changing overrides, stale .tmp
files go, and detect's picture names never collide."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mapdet.cli import main
from mapdet.config import ConfigError, load_config
from mapdet.engine.evaluate import output_names
from mapdet.engine.run_dir import LOCK_NAME, RunDirectory, RunDirError
from mapdet.engine.train import _resumed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_non_empty_out_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (out / "checkpoints" / "iter_0000010.pt").write_bytes(b"weights")
    before = _snapshot(out)
    assert main(["train", str(CONFIGS / "digits.yaml"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--resume" in err
    assert "--overwrite" in err and str(out) in err
    assert _snapshot(out) == before and not (out / LOCK_NAME).exists()


def test_overwrite_removes_the_earlier_runs_outputs_only(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "iter_0000010.pt").write_bytes(b"old")
    (out / "train.log").write_text("old log\n")
    (out / "notes.txt").write_text("mine")
    with RunDirectory(out, overwrite=True):
        assert (out / LOCK_NAME).is_file()
        assert not (out / "checkpoints").exists() and not (out / "train.log").exists()
    assert (out / "notes.txt").read_text() == "mine" and not (out / LOCK_NAME).exists()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out):
        with pytest.raises(RunDirError) as e:
            with RunDirectory(out, resume=True):
                pass
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
        assert "still running" in msg
    with RunDirectory(out, resume=True):  # free again once the first run is over
        pass


def test_live_lock_from_another_process_is_refused_and_a_stale_one_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps(
            {"pid": live.pid, "host": socket.gethostname(), "started": "earlier"}))
        with pytest.raises(RunDirError, match=f"pid {live.pid}"):
            with RunDirectory(out, resume=True):
                pass
    finally:
        live.kill()
        live.wait()
    # the process is gone now: its lock is stale, reported and replaced
    with caplog.at_level("WARNING", logger="mapdet"), RunDirectory(out, resume=True):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(live.pid) in caplog.text
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunDirError, match="another host.*delete"):
        with RunDirectory(out, resume=True):
            pass


def test_stale_tmp_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    tmp = out / "checkpoints" / ".iter_0000004.pt.k2j3h.tmp"
    tmp.write_bytes(b"half a checkpoint")
    keep = out / "checkpoints" / "iter_0000002.pt"
    keep.write_bytes(b"whole")
    with RunDirectory(out, resume=True):
        pass
    assert not tmp.exists() and keep.read_bytes() == b"whole"


def test_resume_refuses_overrides_that_change_the_run():
    saved = load_config(CONFIGS / "digits.yaml")
    given = load_config(CONFIGS / "digits.yaml", ["train.lr=0.5", "train.loss=map"])
    with pytest.raises(ConfigError) as e:
        _resumed_config(given, saved, "run/checkpoints/iter_0000100.pt")
    msg = str(e.value)
    assert "train.lr=0.5 (the run has 0.02)" in msg and "train.loss='map'" in msg
    # the length, logging, output and evaluation may change
    longer = load_config(CONFIGS / "digits.yaml", ["train.iterations=5000", "train.log_every=7",
                                                    "eval.num_vis=0", "output.tensorboard=false"])
    cfg = _resumed_config(longer, saved, "ck.pt")
    assert (cfg.train.iterations, cfg.train.log_every, cfg.eval.num_vis) == (5000, 7, 0)
    assert cfg.output.tensorboard is False and cfg.train.lr == saved.train.lr


def test_resume_with_an_override_is_one_line_exit_2(tmp_path, capsys):
    """End to end through the CLI, with a real (tiny) run to resume."""
    root = tmp_path
    tiny = [f"data.root={root / 'digits'}",
            "data.digits={num_train: 2, num_test: 1, image_size: 48, seed: 1}",
            "data.scale=48", "data.max_size=48", f"proposals.cache_dir={root / 'cache'}",
            "proposals.num_workers=0", "proposals.max_per_image=32", "model.fc_dim=16",
            "train.iterations=1", "train.checkpoint_every=0", "output.tensorboard=false"]
    cfg, out = str(CONFIGS / "digits.yaml"), str(root / "run")
    assert main(["train", cfg, *tiny, "--out", out, "--no-eval", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", cfg, *tiny, "train.lr=0.5", "--out", out, "--resume",
                 "--no-eval", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr=0.5" in err
    assert main(["train", cfg, *tiny, "train.iterations=2", "--out", out, "--resume",
                 "--no-eval", "--no-progress"]) == 0
    assert (root / "run" / "checkpoints" / "iter_0000002.pt").is_file()


def test_detect_names_never_collide():
    assert output_names(["a/img.jpg", "b/img.jpg", "c/other.png"]) == ["img", "img_2", "other"]
    assert output_names(["a/img.jpg", "img_2.jpg", "b/img.jpg"]) == ["img", "img_2", "img_3"]


@given(st.lists(st.sampled_from(["a/x.jpg", "b/x.jpg", "x_2.png", "x_3.jpg", "y.jpg",
                                 "c/x_2.jpg"]), max_size=8))
def test_detect_names_are_distinct(paths):
    names = output_names(paths)
    assert len(set(names)) == len(names) == len(paths)
    stems = [Path(p).stem for p in paths]
    for i, (name, stem) in enumerate(zip(names, stems, strict=True)):
        assert name.startswith(stem)
        if stem not in stems[:i]:  # the first image of a stem keeps it
            assert name == stem
