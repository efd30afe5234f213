"""``train.amp``: training steps under ``torch.autocast`` (bfloat16 on the CPU) for both losses
and both detectors; ``fp16`` with a gradient scaler; ``none`` is the plain float32 step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mapdet.config import ConfigError, load_config
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.amp import MixedPrecision
from mapdet.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("amp")
    return {
        "fast_rcnn": ("digits.yaml", [
            f"data.root={root / 'digits'}",
            "data.digits={num_train: 4, num_test: 2, image_size: 64, seed: 2}",
            "data.scale=64", "data.max_size=64", f"proposals.cache_dir={root / 'cache'}",
            "proposals.num_workers=0", "proposals.max_per_image=48", "model.fc_dim=32",
            "train.checkpoint_every=0", "train.log_every=1", "train.threads=1",
            "output.tensorboard=false"]),
        "faster_rcnn": ("digits_faster_rcnn.yaml", [
            f"data.root={root / 'digits_f'}",
            "data.digits={num_train: 4, num_test: 2, image_size: 64, seed: 2}",
            "data.scale=64", "data.max_size=64",
            "model.faster_rcnn={rpn_pre_nms_top_n_train: 100, rpn_post_nms_top_n_train: 30, "
            "rpn_pre_nms_top_n_test: 100, rpn_post_nms_top_n_test: 30}",
            "train.rois_per_image=16", "train.warmup_iterations=0", "train.lr=0.005",
            "train.checkpoint_every=0", "train.log_every=1", "train.threads=1",
            "output.tensorboard=false"]),
    }


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.find_last_checkpoint(run))["model"]


def _linear_output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every Linear layer's forward (autocast's footprint)."""
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("arch", ["fast_rcnn", "faster_rcnn"])
def test_bf16_steps_for_both_losses(tmp_path, tiny, arch, monkeypatch):
    """Softmax, then the mAP loss from it, two iterations each under bfloat16 autocast: the
    linear layers run in bfloat16, every logged loss is finite, and the weights move."""
    from mapdet.engine import train as train_mod

    name, over = tiny[arch]
    seen: list[list[torch.dtype]] = []  # per model built: its Linear layers' output dtypes
    build = train_mod.build_model

    def hooked(*a, **k):
        model = build(*a, **k)
        seen.append(_linear_output_dtypes(model))
        return model

    monkeypatch.setattr(train_mod, "build_model", hooked)
    base = tmp_path / "softmax"
    logged: list[dict] = []
    cfg = load_config(CONFIGS / name, [*over, "train.iterations=2", "train.amp=bf16"])
    train(cfg, out=base, progress=False, callbacks=[lambda i, s: logged.append(dict(s))])
    cfg = load_config(CONFIGS / name, [*over, "train.iterations=2", "train.amp=bf16",
                                       "train.loss=map", f"train.init_from={base}",
                                       "loss.lr=0.01"])
    train(cfg, out=tmp_path / "map", progress=False,
          callbacks=[lambda i, s: logged.append(dict(s))])
    assert len(logged) == 4 and all(math.isfinite(s["loss"]) for s in logged)
    assert all("loss_map" in s for s in logged[2:])
    assert len(seen) == 2  # the softmax run's model, the mAP run's
    for dtypes in seen:
        assert dtypes and torch.bfloat16 in dtypes, dtypes
    before, after = _weights(base), _weights(tmp_path / "map")
    moved = [k for k in before if before[k].is_floating_point()
             and not torch.equal(before[k], after[k])]
    assert moved, "the mAP stage under autocast changed no weight"
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())


def test_amp_none_is_the_plain_step():
    """``MixedPrecision('none')`` does exactly ``loss.backward(); optimizer.step()``."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 6)
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    amp = MixedPrecision("none", torch.device("cpu"))
    for _ in range(3):
        oa.zero_grad()
        a(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        oa.step()
        ob.zero_grad()
        with amp.autocast():
            loss = b(x).square().mean()
        amp.backward(loss)
        amp.step(ob, b.parameters(), 0.5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert amp.state_dict() is None


def test_fp16_scaler_skips_an_overflowing_step():
    """With ``fp16`` the loss is scaled; an infinite gradient skips the step and lowers the
    scale, a finite one steps (the unscaled gradient, clipped)."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", torch.device("cpu"))
    w0 = model.weight.detach().clone()
    scale0 = amp.scaler.get_scale()
    amp.backward(model(torch.full((1, 3), float("inf"))).sum())
    amp.step(opt, model.parameters(), 0.0)
    assert torch.equal(model.weight, w0) and amp.scaler.get_scale() < scale0
    opt.zero_grad()
    with amp.autocast():
        out = model(torch.ones(1, 3))  # float16 gradients: 1 x the scale 2**15 fits
    assert out.dtype == torch.float16
    amp.backward(out.float().sum())
    norm = amp.step(opt, model.parameters(), 1e-3)
    assert norm == pytest.approx(2.0, rel=1e-3)  # unscaled: ones for the 3 weights, the bias
    assert not torch.equal(model.weight, w0)
    assert set(amp.state_dict()) >= {"scale", "growth_factor"}


def test_unknown_amp_mode_is_one_line_error():
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(CONFIGS / "digits.yaml", ["train.amp=fp8"])
