"""SIGINT and SIGTERM save the current iteration and resume exactly; resuming past the end is
refused; old checkpoints are pruned by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mapdet.config import ConfigError, load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import build_dataset, build_proposals
from mapdet.engine.interrupt import TrainingInterrupted
from mapdet.engine.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny deterministic CPU run (dropout: the torch RNG must be restored too); data and
    proposals computed once."""
    root = tmp_path_factory.mktemp("interrupt")
    overrides = [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 6, num_test: 2, image_size: 64, seed: 0}",
        "data.scale=64", "data.max_size=64", "data.flip=true",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=64", "model.fc_dim=32", "model.dropout=0.5",
        "train.iterations=6", "train.checkpoint_every=4", "train.log_every=1",
        "train.warmup_iterations=2", "train.lr_steps=[4]", "train.deterministic=true",
        "train.threads=1", "output.tensorboard=false",
    ]
    cfg = load_config(CONFIG, overrides)
    build_proposals(cfg, build_dataset(cfg, "train"), "train", progress=False)
    return overrides


def _signal_after(n: int, signum: int):
    def cb(done, stats):
        if done == n:
            os.kill(os.getpid(), signum)
    return cb


def _assert_same_state(a_path: Path, b_path: Path) -> None:
    a, b = ckpt.load_checkpoint(a_path), ckpt.load_checkpoint(b_path)
    assert a["iteration"] == b["iteration"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["data_position"] == b["data_position"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_current_iteration_and_resume_is_exact(tmp_path, tiny, signum):
    cfg = load_config(CONFIG, tiny)
    full = train(cfg, out=tmp_path / "full", progress=False)
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, out=tmp_path / "cut", callbacks=[_signal_after(3, signum)], progress=False)
    assert signal.getsignal(signum) is before  # the handlers are put back
    assert info.value.iteration == 3 and info.value.exit_code == 128 + signum
    cut = tmp_path / "cut" / "checkpoints"
    # iteration 3 is saved, although the periodic checkpoint comes only at 4
    assert ckpt.find_last_checkpoint(tmp_path / "cut") == cut / "iter_0000003.pt"
    assert not list((tmp_path / "cut").rglob("*.tmp"))
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    assert resumed.iterations == 6
    _assert_same_state(full.checkpoint, resumed.checkpoint)


def test_resume_past_train_iterations_is_refused(tmp_path, tiny):
    cfg = load_config(CONFIG, tiny)
    train(cfg, out=tmp_path / "run", progress=False)
    shorter = load_config(CONFIG, [*tiny, "train.iterations=3"])
    with pytest.raises(ConfigError, match=r"is at iteration 6, past train\.iterations=3"):
        train(shorter, out=tmp_path / "run", resume=True, progress=False)
    same = train(cfg, out=tmp_path / "run", resume=True, progress=False)
    assert same.iterations == 6  # nothing to train; not an error


def test_old_checkpoints_are_pruned_by_default(tmp_path, tiny):
    cfg = load_config(CONFIG, [*tiny, "train.checkpoint_every=1"])
    assert cfg.train.keep_checkpoints == 3
    result = train(cfg, out=tmp_path / "run", progress=False)
    kept = [it for it, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert kept == [4, 5, 6] and result.checkpoint.name == "iter_0000006.pt"


def _start(tmp_path: Path, tiny: list[str], out: str, ignore_sigint: bool):
    """``mapdet train`` in a child process, started as a script starts a background job
    (SIGINT ignored) when ``ignore_sigint``; returns it once it has logged 2 iterations."""
    argv = [sys.executable, "-m", "mapdet", "train", str(CONFIG), *tiny,
            "train.iterations=100000", "train.checkpoint_every=0", "--out",
            str(tmp_path / out), "--no-progress", "--no-eval"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec)
    metrics = tmp_path / out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run did not start: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_exits_130_or_143_with_a_checkpoint(tmp_path, tiny, signum):
    proc = _start(tmp_path, tiny, "run", ignore_sigint=True)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    assert f"interrupted by {name} after iteration" in err and "--resume" in err
    found = ckpt.find_last_checkpoint(tmp_path / "run")
    assert found is not None and ckpt.load_checkpoint(found)["iteration"] >= 2
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert not (tmp_path / "run" / ".mapdet.lock").exists()
