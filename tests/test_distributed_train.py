"""DDP training: 2 gloo processes on CPU end with identical parameters on both ranks, equal
to a single-process run with the same global batch (both losses)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mapdet.config import load_config
from mapdet.engine.builders import build_dataset, build_proposals
from mapdet.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# float32 on CPU: the two runs sum the same gradients in a different order (DDP's
# all-reduce vs one backward pass), so they agree to rounding, not bit for bit.
TOLERANCE = 1e-5


def _overrides(root: Path, loss: str, images_per_batch: int) -> list[str]:
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 8, num_test: 2, image_size: 64, seed: 3}",
        "data.scale=64", "data.max_size=64", "data.flip=true",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=48", "train.rois_per_image=16", "model.fc_dim=32",
        "model.dropout=0.0",
        f"train.loss={loss}", "train.iterations=3", "train.checkpoint_every=0",
        "train.log_every=1", "train.threads=1", "train.lr=0.01",
        f"train.images_per_batch={images_per_batch}",
    ]


def _rank(rank: int, world: int, port: int, root: str, loss: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(CONFIGS / "digits.yaml", _overrides(Path(root), loss, 1))
    result = train(cfg, out=Path(root) / f"ddp_{loss}", progress=False)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    torch.save(state["model"], Path(root) / f"ddp_{loss}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("loss", ["softmax", "map"])
def test_two_ranks_match_single_process(tmp_path, loss):
    # Data and proposals once, so the ranks only read them.
    cfg1 = load_config(CONFIGS / "digits.yaml", _overrides(tmp_path, loss, 2))
    build_proposals(cfg1, build_dataset(cfg1, "train"), "train")
    single = train(cfg1, out=tmp_path / f"single_{loss}", progress=False)
    expected = torch.load(single.checkpoint, map_location="cpu", weights_only=False)["model"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(tmp_path), loss), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"ddp_{loss}_rank{r}.pt", weights_only=False)
             for r in range(2)]
    assert expected.keys() == ranks[0].keys() == ranks[1].keys()
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=TOLERANCE,
                                   msg=f"{name}: DDP differs from the single process")


def _eval_rank(rank: int, world: int, port: int, root: str, checkpoint: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mapdet.engine.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, out=Path(root) / "ddp_eval", progress=False)
    torch.save(report.to_json(), Path(root) / f"eval_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tmp_path):
    overrides = _overrides(tmp_path, "softmax", 2)
    overrides[1] = "data.digits={num_train: 8, num_test: 6, image_size: 64, seed: 3}"
    cfg = load_config(CONFIGS / "digits.yaml", overrides)
    build_proposals(cfg, build_dataset(cfg, "test"), "test")
    result = train(cfg, out=tmp_path / "run", progress=False)
    from mapdet.engine.evaluate import evaluate_checkpoint

    single = evaluate_checkpoint(result.checkpoint, out=tmp_path / "single_eval",
                                 progress=False).to_json()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_eval_rank, args=(2, port, str(tmp_path), str(result.checkpoint)),
                       nprocs=2, start_method="spawn")
    for r in range(2):
        got = torch.load(tmp_path / f"eval_rank{r}.pt", weights_only=False)
        assert got["mAP"] == single["mAP"]
        assert got["metrics"] == single["metrics"]
    assert (tmp_path / "ddp_eval" / "metrics.json").is_file()


def _diverging_rank(rank: int, world: int, port: int, root: str) -> None:
    """Rank 1's loss turns NaN at the third iteration; rank 0's stays finite."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mapdet.engine import steps as steps_mod
    from mapdet.engine.train import TrainingDiverged

    class Poisoned(steps_mod.SoftmaxStep):
        calls = 0

        def __call__(self, model, batch, generators):
            loss, stats = super().__call__(model, batch, generators)
            Poisoned.calls += 1
            if rank == 1 and Poisoned.calls == 3:
                loss = loss * float("nan")
            return loss, stats

    steps_mod.STEPS["softmax"] = Poisoned
    cfg = load_config(CONFIGS / "digits.yaml", _overrides(Path(root), "softmax", 1))
    try:
        train(cfg, out=Path(root) / "ddp_nan", progress=False)
        outcome = "finished"
    except TrainingDiverged as e:
        outcome = str(e)
    (Path(root) / f"outcome_rank{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    # Without the cross-rank agreement, rank 1 leaves the loop while rank 0 waits in the
    # backward all-reduce: the join below would time out instead of both ranks stopping.
    cfg1 = load_config(CONFIGS / "digits.yaml", _overrides(tmp_path, "softmax", 2))
    build_proposals(cfg1, build_dataset(cfg1, "train"), "train")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_diverging_rank, args=(2, port, str(tmp_path)), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "a rank is still waiting for its peer"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    outcomes = [(tmp_path / f"outcome_rank{r}.txt").read_text() for r in range(2)]
    assert all("training diverged" in o and "iteration 3" in o for o in outcomes), outcomes
    assert "another rank" in outcomes[0] and "the loss is nan" in outcomes[1]


def _resume_rank(rank: int, world: int, port: int, root: str, name: str, stop: int,
                 resume: bool) -> None:
    """Train (or resume) ``name`` for ``stop`` iterations on ``world`` gloo ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    overrides = [*_overrides(Path(root), "map", 1), "model.dropout=0.5",
                 "train.checkpoint_every=2", f"train.iterations={stop}"]
    cfg = load_config(CONFIGS / "digits.yaml", overrides)
    out = Path(root) / name
    train(cfg, out=out, resume=resume or None, progress=False)
    torch.distributed.destroy_process_group()


def _spawn(fn, *args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fn, args=(2, port, *args), nprocs=2, start_method="spawn")


def test_ddp_resume_restores_every_ranks_random_state(tmp_path):
    # Dropout draws from the global torch generator; in the mAP stage every proposal goes
    # through the head, so the ranks (different images, different proposal counts) draw
    # different amounts and their generators differ by the time of the checkpoint. A resume
    # that gave every rank rank 0's state would then drop different units than the
    # uninterrupted run.
    cfg = load_config(CONFIGS / "digits.yaml", _overrides(tmp_path, "map", 2))
    build_proposals(cfg, build_dataset(cfg, "train"), "train")
    _spawn(_resume_rank, str(tmp_path), "full", 4, False)
    _spawn(_resume_rank, str(tmp_path), "cut", 2, False)
    _spawn(_resume_rank, str(tmp_path), "cut", 4, True)
    full = torch.load(tmp_path / "full" / "checkpoints" / "iter_0000004.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "iter_0000004.pt", weights_only=False)
    assert len(cut["rng_per_rank"]) == 2
    for name, value in full["model"].items():
        assert torch.equal(cut["model"][name], value), f"{name}: resumed DDP run differs"
