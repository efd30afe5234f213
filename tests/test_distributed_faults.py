"""A rank of a 2-process gloo job dies mid-run: the survivor stops by itself within a bounded
time with a message naming its rank, the launcher names the dead rank, and ``--resume``
continues exactly as the job that was never interrupted."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed_train import _overrides as ddp_overrides

from mapdet.config import load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import build_dataset, build_proposals

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
#: fork: the ranks inherit the imported modules (spawn re-imports torch in each, most of the
#: test's time on one core).
START = "fork"
#: How long the survivor may take to notice the dead peer and stop (gloo notices at once).
BOUND_SECONDS = 30


def _overrides(root: Path) -> list[str]:
    """The DDP tests' tiny run, longer, with dropout (the generators must be restored too)
    and checkpoints every 2 iterations."""
    return [*ddp_overrides(root, "softmax", 1), "model.dropout=0.5", "train.iterations=5",
            "train.checkpoint_every=2", "output.tensorboard=false"]


def _rank(rank: int, world: int, port: int, root: str, out: str, kill_after: int,
          resume: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mapdet.engine.interrupt import RankFailure
    from mapdet.engine.train import train

    def die(done, stats):
        if rank == 1 and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = load_config(CONFIG, _overrides(Path(root)))
    try:
        result = train(cfg, out=Path(root) / out, callbacks=[die], resume=resume or None,
                       progress=False)
        outcome = f"finished {result.checkpoint}"
    except RankFailure as exc:
        outcome = f"RankFailure: {exc}"
    (Path(root) / f"{out}_rank{rank}.txt").write_text(outcome)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launch(root: Path, out: str, *, kill_after: int = 0, resume: bool = False, join=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return mp.start_processes(_rank, args=(2, port, str(root), out, kill_after, resume),
                              nprocs=2, start_method=START, join=join)


def test_a_dead_rank_stops_the_job_and_resume_is_exact(tmp_path):
    cfg = load_config(CONFIG, _overrides(tmp_path))
    build_proposals(cfg, build_dataset(cfg, "train"), "train", progress=False)
    _launch(tmp_path, "full")

    ctx = _launch(tmp_path, "cut", kill_after=3, join=False)
    survivor, victim = ctx.processes
    deadline = time.monotonic() + 120
    while victim.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.exitcode == -signal.SIGKILL
    survivor.join(BOUND_SECONDS)  # on its own: nothing kills it
    assert survivor.exitcode is not None, "the surviving rank hangs"
    assert survivor.exitcode == 0, "the surviving rank failed with another error"
    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with signal"):
        ctx.join()
    said = (tmp_path / "cut_rank0.txt").read_text()
    assert said.startswith("RankFailure: rank 0 of 2: a collective failed during iteration 3")
    assert "iter_0000002.pt" in said and "--resume" in said

    _launch(tmp_path, "cut", resume=True)
    full = ckpt.load_checkpoint(tmp_path / "full" / "checkpoints" / "iter_0000005.pt")
    resumed = ckpt.load_checkpoint(tmp_path / "cut" / "checkpoints" / "iter_0000005.pt")
    assert (tmp_path / "cut_rank0.txt").read_text().startswith("finished")
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for k, s in full["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"],
                           resumed["optimizer"]["state"][k]["momentum_buffer"])
