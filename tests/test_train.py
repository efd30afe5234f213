"""A tiny end-to-end train + eval for both losses, and a diverging run."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
import torch

from mapdet.config import ConfigError, TrainConfig, load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine import steps as steps_mod
from mapdet.engine import train as train_mod
from mapdet.engine.evaluate import evaluate_checkpoint
from mapdet.engine.train import TrainingDiverged, build_scheduler, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Overrides for a tiny CPU run on generated 64 px images (data written once)."""
    root = tmp_path_factory.mktemp("tiny_train")
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 6, num_test: 4, image_size: 64, seed: 1}",
        "data.scale=64", "data.max_size=64",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=64",
        "model.fc_dim=32",
        "train.iterations=4", "train.checkpoint_every=2", "train.log_every=1",
        "train.threads=1", "eval.num_vis=2",
    ]


@pytest.mark.parametrize("loss", ["softmax", "map"])
def test_train_and_eval_end_to_end(tmp_path, tiny, loss):
    cfg = load_config(CONFIGS / "digits.yaml", [*tiny, f"train.loss={loss}",
                                                "output.tensorboard=true"])
    result = train(cfg, out=tmp_path / loss, progress=False)
    run = tmp_path / loss
    assert result.checkpoint == run / "checkpoints" / "iter_0000004.pt"
    assert (run / "checkpoints" / "iter_0000002.pt").is_file()
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if loss == "map":
        assert all("loss_map" in r and "mAP" in r for r in rows)
    else:
        assert all("loss_cls" in r and "loss_box" in r for r in rows)
    assert math.isfinite(result.sec_per_iter) and result.sec_per_iter > 0

    report = evaluate_checkpoint(result.checkpoint, progress=False)
    out = run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mAP", "metric", "per_class", "mAP_voc07", "mAP_area", "images_per_sec",
            "num_images", "metrics", "checkpoint"} <= set(metrics)
    assert metrics["num_images"] == 4 and metrics["metric"] == "voc07"
    assert set(metrics["per_class"]) == set(report.class_names)
    assert 0.0 <= report.mAP <= 1.0
    assert len(list((out / "results").glob("comp4_det_test_*.txt"))) == 10
    for name in ("coco_results.json", "pr_curves.png", "detections.png"):
        assert (out / name).is_file(), name
    assert "mAP" in report.table()


def test_map_training_from_a_softmax_checkpoint(tmp_path, tiny):
    base = train(load_config(CONFIGS / "digits.yaml", tiny), out=tmp_path / "base",
                 progress=False)
    cfg = load_config(CONFIGS / "digits.yaml",
                      [*tiny, "train.loss=map", f"train.init_from={tmp_path / 'base'}"])
    res = train(cfg, out=tmp_path / "map", progress=False)
    assert res.checkpoint is not None and "mAP" in res.last_stats
    assert base.checkpoint != res.checkpoint


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    class Poisoned(steps_mod.SoftmaxStep):
        calls = 0

        def __call__(self, model, batch, generators):
            loss, stats = super().__call__(model, batch, generators)
            if Poisoned.calls == 2:  # the third iteration
                loss = loss * float("nan")
            Poisoned.calls += 1
            return loss, stats

    monkeypatch.setitem(steps_mod.STEPS, "softmax", Poisoned)
    cfg = load_config(CONFIGS / "digits.yaml", tiny)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, out=tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "iteration 3" in msg and "iter_0000002.pt" in msg
    last = ckpt.find_last_checkpoint(tmp_path / "run")
    assert last.name == "iter_0000002.pt"
    state = ckpt.load_checkpoint(last)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())
    assert not (tmp_path / "run" / "checkpoints" / "iter_0000003.pt").exists()


def test_step_schedule_with_warmup(tmp_path):
    cfg = load_config(None, ["train.lr=0.1", "train.lr_steps=[5, 8]", "train.lr_gamma=0.1",
                             "train.warmup_iterations=3"])
    model = torch.nn.Linear(2, 2)
    opt = train_mod.build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 3)
    assert lrs[3:5] == pytest.approx([0.1, 0.1])
    assert lrs[5:8] == pytest.approx([0.01] * 3)
    assert lrs[8:] == pytest.approx([0.001] * 2)
    # Fast R-CNN: biases at twice the rate, without weight decay.
    bias_group = [g for g in opt.param_groups if any(p is model.bias for p in g["params"])][0]
    assert bias_group["weight_decay"] == 0.0


def test_every_train_loss_has_one_registered_step():
    choices = typing.get_args(typing.get_type_hints(TrainConfig)["loss"])
    assert set(steps_mod.STEPS) == {*choices, "faster_rcnn"}
    expected = {"softmax": steps_mod.SoftmaxStep, "map": steps_mod.MAPStep,
                "ap_loss_nms": steps_mod.MAPStep, "softmax_map": steps_mod.SoftmaxMAPStep,
                "ap_loss": steps_mod.RankingStep, "rank_sort": steps_mod.RankingStep}
    criterion = torch.nn.Identity()
    for loss, cls in expected.items():
        step = steps_mod.build_step(load_config(None, [f"train.loss={loss}"]), criterion)
        assert type(step) is cls and loss in cls.names
    faster = load_config(None, ["model.arch=faster_rcnn", "model.backbone=small"])
    assert type(steps_mod.build_step(faster)) is steps_mod.FasterRCNNStep
    with pytest.raises(ValueError, match="MAPStep needs the loss"):
        steps_mod.build_step(load_config(None, ["train.loss=map"]), None)


def test_a_new_loss_is_a_step_class_and_a_registry_name(tmp_path, tiny, monkeypatch):
    """The loop runs whatever step the registry names, with no change of its own: a step that
    doubles the softmax loss trains (its logged loss is twice the softmax step's)."""

    class Doubled(steps_mod.SoftmaxStep):
        def __call__(self, model, batch, generators):
            loss, stats = super().__call__(model, batch, generators)
            return 2 * loss, {**stats, "loss": 2 * stats["loss"], "doubled": 1.0}

    overrides = [*tiny, "train.iterations=1", "train.checkpoint_every=0"]
    plain = train(load_config(CONFIGS / "digits.yaml", overrides), out=tmp_path / "plain",
                  progress=False)
    monkeypatch.setitem(steps_mod.STEPS, "softmax", Doubled)
    doubled = train(load_config(CONFIGS / "digits.yaml", overrides), out=tmp_path / "double",
                    progress=False)
    assert doubled.last_stats["doubled"] == 1.0
    assert doubled.last_stats["loss"] == pytest.approx(2 * plain.last_stats["loss"], rel=1e-6)
    monkeypatch.delitem(steps_mod.STEPS, "softmax")
    with pytest.raises(ConfigError, match="no training step is registered as 'softmax'"):
        steps_mod.build_step(load_config(None, []))
