"""``model.arch: faster_rcnn`` through the pipeline: CLI train (softmax, then mAP from it),
eval, detect, resume; exact resume; configuration mismatches named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapdet.cli import main
from mapdet.config import ConfigError, load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import build_criterion, build_model
from mapdet.engine.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_faster_rcnn.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frcnn")
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 6, num_test: 2, image_size: 64, seed: 4}",
        "data.scale=64", "data.max_size=64",
        "model.faster_rcnn={rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 40, "
        "rpn_pre_nms_top_n_test: 200, rpn_post_nms_top_n_test: 40}",
        "train.rois_per_image=16", "train.checkpoint_every=2", "train.log_every=1",
        "train.warmup_iterations=0", "train.lr=0.005", "train.threads=1",
        "eval.num_vis=1", "output.tensorboard=false",
    ]


def test_cli_train_softmax_then_map_eval_detect_resume(tmp_path, tiny, capsys):
    cfg = str(CONFIG)
    base = tmp_path / "softmax"
    assert main(["train", cfg, *tiny, "train.iterations=2", "--out", str(base),
                 "--no-progress"]) == 0
    assert "mAP" in capsys.readouterr().out
    logged = json.loads((base / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness"} <= set(logged)
    assert not (Path(tiny[0].split("=", 1)[1]).parent / "cache").exists()  # no proposals

    run = tmp_path / "map"
    assert main(["train", cfg, *tiny, "train.iterations=2", "train.loss=map",
                 f"train.init_from={base}", "--out", str(run), "--no-progress"]) == 0
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_map" in logged and "loss_classifier" not in logged and "mAP" in logged

    # Resume extends the mAP run by one iteration.
    assert main(["train", str(run / "config.yaml"), "train.iterations=3", "--out", str(run),
                 "--resume", "--no-progress"]) == 0
    assert ckpt.find_last_checkpoint(run).name == "iter_0000003.pt"

    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 2

    images = sorted((Path(tiny[0].split("=", 1)[1]) / "JPEGImages").glob("*.jpg"))[:1]
    out = tmp_path / "det"
    assert main(["detect", *map(str, images), "--checkpoint", str(run), "--out", str(out),
                 "--score-threshold", "0.0"]) == 0
    assert (out / "detections.json").is_file()


class _Crash(Exception):
    pass


def test_interrupted_and_resumed_map_run_equals_uninterrupted(tmp_path, tiny):
    cfg = load_config(CONFIG, [*tiny, "train.iterations=4", "train.loss=map", "loss.memory=2",
                               "train.deterministic=true"])
    full = train(cfg, out=tmp_path / "full", progress=False)

    def crash(done, stats):
        if done == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, out=tmp_path / "cut", callbacks=[crash], progress=False)
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    a = ckpt.load_checkpoint(full.checkpoint)
    b = ckpt.load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["loss_memory"]["memory"]) == 2


def test_the_loss_must_use_the_models_post_processing(tiny):
    cfg = load_config(CONFIG, [*tiny, "train.loss=map", "loss.nms_iou=0.5"])
    model = build_model(cfg, 10)
    with pytest.raises(ConfigError, match=r"loss.nms_iou=0.5 differs from eval.nms_iou=0.3"):
        build_criterion(cfg, model=model)
    cfg = load_config(CONFIG, [*tiny, "train.loss=map", "eval.score_threshold=0.1",
                               "loss.score_threshold=0.1", "eval.max_per_image=7"])
    model = build_model(cfg, 10)
    loss = build_criterion(cfg, model=model)
    assert loss is model.roi_heads.map_loss and loss.score_threshold == 0.1
    assert model.roi_heads.detections_per_img == 7
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16


def test_bad_faster_rcnn_options_are_named(tiny):
    with pytest.raises(ConfigError, match="unknown Faster R-CNN backbone 'vgg16'"):
        build_model(load_config(CONFIG, [*tiny, "model.backbone=vgg16"]), 3)
    with pytest.raises(ConfigError, match="rpn_top_n"):
        build_model(load_config(CONFIG, [*tiny, "model.faster_rcnn={rpn_top_n: 3}"]), 3)
    with pytest.raises(ConfigError, match="model.freeze_at"):
        build_model(load_config(CONFIG, [*tiny, "model.freeze_at=1"]), 3)


# ------------------------------------------------------------------------------- DDP


def _ddp_overrides(root: Path, loss: str, images_per_batch: int) -> list[str]:
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 8, num_test: 2, image_size: 64, seed: 3}",
        "data.scale=64", "data.max_size=64", "data.flip=true",
        "model.faster_rcnn={rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 40}",
        "train.rois_per_image=16", f"train.loss={loss}", "train.iterations=3",
        "train.checkpoint_every=0", "train.log_every=1", "train.threads=1", "train.lr=0.005",
        "train.warmup_iterations=0", f"train.images_per_batch={images_per_batch}",
        "output.tensorboard=false",
    ]


def _ddp_rank(rank: int, world: int, port: int, root: str, loss: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(CONFIG, _ddp_overrides(Path(root), loss, 1))
    result = train(cfg, out=Path(root) / f"ddp_{loss}", progress=False)
    state = ckpt.load_checkpoint(result.checkpoint)
    torch.save(state["model"], Path(root) / f"ddp_{loss}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("loss", ["softmax", "map"])
def test_ddp_two_ranks_match_the_single_process(tmp_path, loss):
    import socket

    import torch.multiprocessing as mp

    single = train(load_config(CONFIG, _ddp_overrides(tmp_path, loss, 2)),
                   out=tmp_path / "single", progress=False)
    expected = ckpt.load_checkpoint(single.checkpoint)["model"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(2, port, str(tmp_path), loss), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"ddp_{loss}_rank{r}.pt") for r in range(2)]
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # float32 sums in another order (DDP's all-reduce vs one backward): rounding only.
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-5, msg=name)
