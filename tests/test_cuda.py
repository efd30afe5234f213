"""Training and evaluation on a CUDA device: both losses and both detectors, eval, resume,
and mixed precision (float16 with a gradient scaler, bfloat16). Every test here is marked
``cuda`` and skips without a CUDA device; ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mapdet.config import load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.evaluate import evaluate_checkpoint
from mapdet.engine.train import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    common = ["data.scale=64", "data.max_size=64", "train.log_every=1",
              "train.checkpoint_every=2", "train.device=cuda", "output.tensorboard=false",
              "eval.num_vis=1"]
    return {
        "fast_rcnn": ("digits.yaml", [
            f"data.root={root / 'digits'}",
            "data.digits={num_train: 6, num_test: 2, image_size: 64, seed: 3}",
            f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
            "proposals.max_per_image=64", "model.fc_dim=32", *common]),
        "faster_rcnn": ("digits_faster_rcnn.yaml", [
            f"data.root={root / 'digits_f'}",
            "data.digits={num_train: 6, num_test: 2, image_size: 64, seed: 3}",
            "model.faster_rcnn={rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 40, "
            "rpn_pre_nms_top_n_test: 200, rpn_post_nms_top_n_test: 40}",
            "train.rois_per_image=16", "train.warmup_iterations=0", "train.lr=0.005", *common]),
    }


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ["fast_rcnn", "faster_rcnn"])
def test_train_both_losses_eval_and_resume_on_cuda(tmp_path, tiny, arch, amp):
    """Softmax, then mAP from it, on the GPU (under ``amp``); the mAP run resumed from its
    iteration-2 checkpoint; the final model evaluated on the GPU."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    name, over = tiny[arch]
    over = [*over, f"train.amp={amp}"]
    base = tmp_path / "softmax"
    train(load_config(CONFIGS / name, [*over, "train.iterations=2"]), out=base, progress=False)
    run = tmp_path / "map"
    cfg = load_config(CONFIGS / name, [*over, "train.iterations=3", "train.loss=map",
                                       f"train.init_from={base}", "loss.lr=0.001"])
    train(cfg, out=run, progress=False)
    rows = _metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "loss_map" in r for r in rows)
    # Resume the same run from its iteration-2 checkpoint to a 4th iteration.
    (run / "checkpoints" / "iter_0000003.pt").unlink()
    train(load_config(run / "config.yaml", ["train.iterations=4"]), out=run,
          resume=run / "checkpoints" / "iter_0000002.pt", progress=False)
    assert ckpt.find_last_checkpoint(run).name == "iter_0000004.pt"
    state = ckpt.load_checkpoint(ckpt.find_last_checkpoint(run))
    assert all(v.device.type == "cpu" for v in state["model"].values())
    report = evaluate_checkpoint(ckpt.find_last_checkpoint(run), progress=False)
    assert 0.0 <= report.mAP <= 1.0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 2
