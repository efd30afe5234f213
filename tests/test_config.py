"""The typed configuration: YAML loading, overrides, unknown keys, type errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapdet.config import (
    MAP_STAGE_LR,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.images_per_batch == 2
    assert cfg.train.rois_per_image == 64
    assert cfg.loss.score_threshold == 0.05
    assert cfg.loss.nms_iou == 0.3
    assert cfg.eval.max_per_image == 100


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.loss in ("softmax", "map")


def test_paper_settings():
    s = load_config(CONFIGS / "voc07_vgg16_softmax.yaml")
    assert (s.model.backbone, s.data.scale, s.data.max_size) == ("vgg16", 600, 1000)
    assert (s.train.lr, s.train.iterations, s.train.lr_steps) == (0.001, 40000, [30000])
    assert s.train.images_per_batch * s.train.rois_per_image == 128
    m = load_config(CONFIGS / "voc07_vgg16_map.yaml")
    assert m.train.loss == "map" and m.train.init_from
    assert m.stage_lr() == MAP_STAGE_LR and m.loss.normalization == "l1"
    assert m.loss.max_rois_per_image == 0  # all proposals


def test_overrides_are_yaml_scalars(tmp_path):
    cfg = load_config(CONFIGS / "digits.yaml", [
        "train.lr=1e-3",  # YAML 1.1 reads this as a string; the float field converts it
        "train.lr_steps=[10, 20]",
        "model.pretrained=false",
        "model.backbone=vgg16",
        "train.init_from=null",
        "data.digits.num_train=7",
        "train.iterations=12",
    ])
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.train.lr_steps == [10, 20]
    assert cfg.model.pretrained is False
    assert cfg.model.backbone == "vgg16"
    assert cfg.train.init_from is None
    assert cfg.data.digits["num_train"] == 7
    assert cfg.data.digits["num_test"] == 200  # the other entries of the mapping stay
    assert cfg.train.iterations == 12


def test_unknown_key_lists_valid_ones_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=0.1"])
    msg = str(e.value)
    assert "'train.lrr'" in msg and "Did you mean 'train.lr'" in msg
    assert "momentum" in msg and "iterations" in msg  # the valid keys are listed

    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "Did you mean 'train'" in msg and "proposals" in msg


def test_type_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.iterations: expected int"):
        load_config(None, ["train.iterations=ten"])
    with pytest.raises(ConfigError, match=r"train\.loss: must be one of 'softmax', 'map'"):
        load_config(None, ["train.loss=focal"])
    with pytest.raises(ConfigError, match=r"model\.pretrained: expected bool"):
        load_config(None, ["model.pretrained=maybe"])
    with pytest.raises(ConfigError, match=r"train\.lr_steps\[1\]: expected int"):
        load_config(None, ["train.lr_steps=[1, x]"])
    with pytest.raises(ConfigError, match=r"train\.lr_steps: must be increasing"):
        load_config(None, ["train.lr_steps=[20, 10]"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(None, ["train.lr"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "digits.yaml", ["train.lr=0.02", "data.digits.seed=5"])
    path = cfg.save(tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert apply_overrides(cfg, ["train.seed=3"]).train.seed == 3
    assert cfg.train.seed == 0  # overrides return a new config


# --------------------------------------------------------------------------------------------
# Custom classes, keys written twice, degenerate sizes, thresholds, renamed keys
# --------------------------------------------------------------------------------------------


def test_a_section_written_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 0.1\nmodel:\n  fc_dim: 8\ntrain:\n  iterations: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "'train' is written twice" in msg
    assert "line 5" in msg and "line 1" in msg
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")  # a key inside a section, too
    with pytest.raises(ConfigError, match="'lr' is written twice"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("model.fc_dim=0", "model.fc_dim"),
    ("data.scale=0", "data.scale"),
    ("data.max_size=-5", "data.max_size"),
    ("proposals.max_per_image=-1", "proposals.max_per_image"),
    ("proposals.resize_to=0", "proposals.resize_to"),
    ("proposals.num_workers=-2", "proposals.num_workers"),
    ("loss.memory=-1", "loss.memory"),
    ("eval.max_per_image=-1", "eval.max_per_image"),
    ("loss.nms_iou=0", "loss.nms_iou"),
    ("loss.match_iou=1.5", "loss.match_iou"),
    ("eval.nms_iou=0", "eval.nms_iou"),
    ("eval.match_iou=0", "eval.match_iou"),
    ("loss.score_threshold=-0.1", "loss.score_threshold"),
    ("model.dropout=1.0", "model.dropout"),
])
def test_degenerate_sizes_and_thresholds_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": must be"):
        load_config(None, [override])


def test_renamed_max_proposals_keys_name_the_new_key(tmp_path):
    with pytest.raises(ConfigError, match=r"proposals\.max_proposals: renamed to "
                       r"proposals\.max_per_image"):
        load_config(None, ["proposals.max_proposals=10"])
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  max_proposals: 100\n")
    with pytest.raises(ConfigError, match=r"loss\.max_rois_per_image"):
        load_config(path)
    # a config saved by an older version (inside a checkpoint) still loads
    old = config_from_dict({"proposals": {"max_proposals": 64}, "loss": {"max_proposals": 9}})
    assert old.proposals.max_per_image == 64 and old.loss.max_rois_per_image == 9


def test_proposal_seed_is_its_own_key():
    cfg = load_config(CONFIGS / "digits.yaml", ["train.seed=5"])
    assert cfg.proposals.seed == 0
    assert load_config(None, ["proposals.seed=3"]).proposals.seed == 3


def test_custom_classes():
    cfg = load_config(None, ["data.kind=voc", "data.classes=[crack, pothole]",
                             "data.skip_unknown=true"])
    assert cfg.data.classes == ["crack", "pothole"] and cfg.data.skip_unknown
    assert load_config(None, ["data.kind=voc"]).data.classes is None  # the 20 VOC classes
    with pytest.raises(ConfigError, match=r"data\.classes: empty list"):
        load_config(None, ["data.kind=voc", "data.classes=[]"])
    with pytest.raises(ConfigError, match=r"data\.classes: listed more than once: a"):
        load_config(None, ["data.kind=voc", "data.classes=[a, b, a]"])
    with pytest.raises(ConfigError, match=r"data\.classes: only used with data\.kind: voc"):
        load_config(None, ["data.kind=digits", "data.classes=[a]"])


@pytest.mark.parametrize("softmax_lr", [0.001, 0.02, 0.5])
def test_map_stage_recipe_does_not_depend_on_the_softmax_lr(softmax_lr):
    """``train.loss=map train.init_from=RUN`` alone gives the recommended mAP stage, whatever
    the softmax stage's ``train.lr``; ``loss.lr`` is the one key that changes its rate."""
    import torch

    from mapdet.engine.train import build_optimizer

    cfg = load_config(CONFIGS / "digits.yaml", [f"train.lr={softmax_lr}", "train.loss=map",
                                                "train.init_from=runs/x"])
    assert cfg.loss.lr is None and cfg.loss.normalization == "l1"
    assert cfg.stage_lr() == MAP_STAGE_LR
    opt = build_optimizer(torch.nn.Sequential(torch.nn.Linear(2, 2)), cfg)
    assert {g["lr"] for g in opt.param_groups} == {MAP_STAGE_LR,
                                                    MAP_STAGE_LR * cfg.train.bias_lr_factor}
    own = load_config(CONFIGS / "digits.yaml", ["train.loss=map", "loss.lr=3e-4"])
    assert own.stage_lr() == pytest.approx(3e-4)
    soft = load_config(CONFIGS / "digits.yaml", [f"train.lr={softmax_lr}", "loss.lr=3e-4"])
    assert soft.stage_lr() == softmax_lr  # loss.lr is the mAP stage's only


def test_map_stage_recipe_defaults_are_the_studys():
    """The recipe docs/method.md and docs/study.md justify: l1, lr 1e-5, min_step 1e-3,
    memory 0, the nearest improvement, 1 - mAP (a change here must come with a new study)."""
    lc = load_config(CONFIGS / "digits.yaml", ["train.loss=map"]).loss
    assert MAP_STAGE_LR == 1e-5 and lc.lr is None
    assert (lc.normalization, lc.min_step, lc.memory, lc.form) == ("l1", 1e-3, 0, "one_minus")
    assert lc.direction == "nearest_improvement"


def test_map_stage_keys_are_checked():
    with pytest.raises(ConfigError, match="loss.lr: must be >= 0"):
        load_config(CONFIGS / "digits.yaml", ["loss.lr=-1"])
    with pytest.raises(ConfigError, match="loss.normalization: must be one of"):
        load_config(CONFIGS / "digits.yaml", ["loss.normalization=mean"])


def test_maploss_defaults_are_the_configs_and_from_config_reads_every_option():
    import inspect

    from mapdet import MAPLoss
    from mapdet.config import LossConfig

    lc = LossConfig()
    params = inspect.signature(MAPLoss).parameters
    shared = [k for k in params if hasattr(lc, k)]
    assert {"score_threshold", "nms_iou", "normalization", "min_step", "sigma"} <= set(shared)
    for key in shared:  # num_threads: the config's 0 and the loss's None both mean all cores
        want = (lc.num_threads or None) if key == "num_threads" else getattr(lc, key)
        assert params[key].default == want, key
    assert MAPLoss().normalization == "l1" == lc.normalization
    cfg = load_config(None, ["loss.score_threshold=0.1", "loss.nms_iou=0.45",
                             "loss.normalization=per_class", "loss.min_step=0.01",
                             "loss.direction=both_summed", "loss.memory=3", "loss.form=neg_log",
                             "loss.num_threads=2", "loss.ap_method=voc07"])
    loss = MAPLoss.from_config(cfg.loss, seed=7)
    got = {k: getattr(loss, k) for k in ("score_threshold", "nms_iou", "normalization",
                                         "min_step", "direction", "memory", "form",
                                         "num_threads", "ap_method", "seed")}
    assert got == {"score_threshold": 0.1, "nms_iou": 0.45, "normalization": "per_class",
                   "min_step": 0.01, "direction": "both_summed", "memory": 3,
                   "form": "neg_log", "num_threads": 2, "ap_method": "voc07", "seed": 7}
    assert MAPLoss.from_config(LossConfig()).num_threads is None  # 0: all cores
