"""Checkpoints: atomic writes (a crash mid-write keeps the previous one) and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mapdet import io as atomic_io
from mapdet.config import load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.schedule import DataOrder
from mapdet.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- atomic writes ---------------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"iteration": int(value), "model": {"w": torch.full((64, 64), value)}}


def test_save_load_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "iter_0000001.pt", _state(1.0))
    state = ckpt.load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.full((64, 64), 1.0))
    assert state["format"] == ckpt.FORMAT
    assert ckpt.load_checkpoint(tmp_path)["iteration"] == 1  # a directory: its latest


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_crash_during_write_keeps_previous(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "iter_0000002.pt"
    ckpt.save_checkpoint(path, _state(1.0))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash in {fail_at}")

    if fail_at == "write":
        real_save = torch.save

        def partial_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            raise OSError("simulated crash in write")

        monkeypatch.setattr(torch, "save", partial_save)
    else:
        monkeypatch.setattr(atomic_io.os, fail_at, boom)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


_WRITER = """
import sys, torch
from mapdet.engine.checkpoint import save_checkpoint
path = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(path, {"iteration": i, "model": {"w": torch.full((512, 1024), float(i))}})
"""


def test_kill_during_write_keeps_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 2 MB checkpoint in a loop: the file on disk is always
    a complete checkpoint, and leftover temporary files are never taken for one."""
    path = tmp_path / "checkpoints" / "iter_0000001.pt"
    ckpt.save_checkpoint(path, {"iteration": 0, "model": {"w": torch.zeros(512, 1024)}})
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(1.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = ckpt.load_checkpoint(path)
    w = state["model"]["w"]
    assert torch.equal(w, torch.full_like(w, float(state["iteration"])))
    assert ckpt.find_last_checkpoint(tmp_path) == path


def test_find_last_checkpoint_ignores_temp_files(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint(d / "iter_0000002.pt", _state(2.0))
    ckpt.save_checkpoint(d / "iter_0000004.pt", _state(4.0))
    (d / ".iter_0000006.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert ckpt.find_last_checkpoint(tmp_path) == d / "iter_0000004.pt"
    ckpt.write_last_pointer(d, d / "iter_0000002.pt")
    assert ckpt.find_last_checkpoint(tmp_path) == d / "iter_0000002.pt"
    (d / "iter_0000002.pt").unlink()  # a pointer to a missing file falls back to the newest
    assert ckpt.find_last_checkpoint(tmp_path) == d / "iter_0000004.pt"
    ckpt.prune_checkpoints(d, keep=1)
    assert [p.name for _, p in ckpt.list_checkpoints(d)] == ["iter_0000004.pt"]


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ckpt.CheckpointError, match=str(bad)):
        ckpt.load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(ckpt.CheckpointError, match="not a mapdet checkpoint"):
        ckpt.load_checkpoint(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found in directory"):
        ckpt.load_checkpoint(tmp_path / "empty")


# -- data order ------------------------------------------------------------------------------


def test_data_order_is_a_function_of_the_position():
    order = DataOrder(num_images=7, images_per_batch=2, seed=3, flip=True)
    seq = [x for it in range(20) for x in order.batch(it)]
    for epoch in range(5):
        idx = sorted(i for i, _ in seq[7 * epoch: 7 * epoch + 7])
        if len(idx) == 7:
            assert idx == list(range(7))  # each epoch is a permutation
    again = DataOrder(7, 2, 3, True)
    assert [again.batch(it) for it in (13, 2, 9)] == [order.batch(it) for it in (13, 2, 9)]
    other = DataOrder(7, 2, seed=4, flip=True)
    assert [other.batch(it) for it in range(4)] != [order.batch(it) for it in range(4)]
    assert any(f for _, f in seq) and not all(f for _, f in seq)
    assert all(not f for it in range(10) for _, f in DataOrder(7, 2, 3, flip=False).batch(it))


# -- exact resume ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Overrides for a tiny deterministic CPU run on 6 generated 64 px images."""
    root = tmp_path_factory.mktemp("tiny")
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 6, num_test: 3, image_size: 64, seed: 0}",
        "data.scale=64", "data.max_size=64", "data.flip=true",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=64",
        "model.fc_dim=32", "model.dropout=0.5",  # dropout: the torch RNG must be restored
        "train.iterations=6", "train.checkpoint_every=2", "train.log_every=1",
        "train.warmup_iterations=2", "train.lr_steps=[4]",
        "train.deterministic=true", "train.threads=1", "train.seed=0",
        "output.tensorboard=false",
    ]


class _Crash(Exception):
    pass


def _crash_after(n):
    def cb(done, stats):
        if done == n:
            raise _Crash(f"simulated kill after iteration {n}")
    return cb


@pytest.mark.parametrize("loss", ["softmax", "map", "map_memory"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny, loss):
    extra = [f"train.loss={loss}"]
    if loss == "map_memory":  # the AP memory of past minibatches is part of the state
        extra = ["train.loss=map", "loss.memory=2"]
    cfg = load_config(CONFIGS / "digits.yaml", [*tiny, *extra])
    full = train(cfg, out=tmp_path / "full", progress=False)

    with pytest.raises(_Crash):
        train(cfg, out=tmp_path / "cut", callbacks=[_crash_after(3)], progress=False)
    # The kill came after iteration 3; the latest checkpoint is iteration 2's.
    assert ckpt.find_last_checkpoint(tmp_path / "cut").name == "iter_0000002.pt"
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    assert resumed.iterations == full.iterations == 6

    a = ckpt.load_checkpoint(full.checkpoint)
    b = ckpt.load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in ma:
        assert torch.equal(ma[k]["momentum_buffer"], mb[k]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert a["data_position"] == b["data_position"] == 12
    iters = [json.loads(x)["iteration"] for x in
             (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5, 6]  # iteration 3 of the killed run was dropped


def test_resume_from_explicit_checkpoint_and_extend(tmp_path, tiny):
    cfg = load_config(CONFIGS / "digits.yaml", tiny)
    first = train(cfg, out=tmp_path / "run", progress=False)
    longer = load_config(CONFIGS / "digits.yaml", [*tiny, "train.iterations=8"])
    more = train(longer, resume=first.checkpoint, progress=False)
    assert more.run_dir == tmp_path / "run"
    assert more.iterations == 8
    assert ckpt.load_checkpoint(more.checkpoint)["iteration"] == 8
