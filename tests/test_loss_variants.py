"""The mAP loss's smoothing rules against their references, AP-Loss after NMS on a
hand-computed list, the ranking steps' log-odds, and every new loss and optimiser through a
tiny training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet import MAPLoss
from mapdet.config import load_config
from mapdet.core.perturbed import perturbed_ap_gradient, perturbed_aps_reference
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.engine.steps import class_log_odds
from mapdet.engine.train import build_optimizer, train
from mapdet.loss import NMSAPLoss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@st.composite
def _minibatch(draw):
    """Two images, K = 2 classes, a few windows near the ground truth."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 8))
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 34]], dtype=np.float64)
    targets = [{"boxes": torch.tensor(gt[:1]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor(gt), "labels": torch.tensor([1, 0])}]
    img = rng.integers(0, 2, n)
    boxes = gt[rng.integers(0, 2, n)] + rng.integers(-3, 4, (n, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    probs = rng.choice(np.round(np.linspace(0, 1, 11), 1), (n, 2))
    return probs, boxes, img, targets, seed


def _class_args(boxes, img, targets, c):
    gt_b, gt_i = [], []
    for b, t in enumerate(targets):
        m = t["labels"].numpy() == c
        gt_b.append(t["boxes"].numpy()[m])
        gt_i += [b] * int(m.sum())
    return boxes, img, np.concatenate(gt_b), np.array(gt_i, dtype=np.int64)


def _grad(loss, probs, boxes, img, targets):
    p = torch.tensor(probs, requires_grad=True)
    value = loss(p, torch.tensor(boxes), torch.tensor(img), targets)
    value.backward()
    return float(value.detach()), p.grad.numpy()


@settings(max_examples=40, deadline=None)
@given(_minibatch(), st.sampled_from([0.02, 0.2]), st.integers(1, 3))
def test_average_smoothing_is_the_mean_of_reference_pseudo_gradients(case, sigma, k):
    probs, boxes, img, targets, seed = case
    loss = MAPLoss(normalization="none", smoothing="average", sigma=sigma, samples=k, seed=seed,
                   num_threads=1)
    _, g = _grad(loss, probs, boxes, img, targets)
    noise = np.random.default_rng([seed, 0]).standard_normal((k, *probs.shape))
    ref = np.zeros_like(probs)
    for c in range(2):
        for z in noise:
            ref[:, c] += ap_pseudo_gradient_reference(
                probs[:, c] + sigma * z[:, c], *_class_args(boxes, img, targets, c))[1]
    ref /= k
    defined = [c for c in range(2) if np.isfinite(loss.last_ap[c])]
    np.testing.assert_allclose(g, -ref / max(len(defined), 1), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(_minibatch(), st.sampled_from([0.02, 0.2]), st.integers(1, 4))
def test_perturbed_smoothing_equals_the_reference_estimator(case, sigma, k):
    probs, boxes, img, targets, seed = case
    loss = MAPLoss(normalization="none", smoothing="perturbed", sigma=sigma, samples=k, seed=seed)
    value, g = _grad(loss, probs, boxes, img, targets)
    noise = np.random.default_rng([seed, 0]).standard_normal((k, *probs.shape))
    ref = np.zeros_like(probs)
    for c in range(2):
        ref[:, c] = perturbed_ap_gradient(probs[:, c], *_class_args(boxes, img, targets, c),
                                          noise=noise[:, :, c], sigma=sigma,
                                          aps=perturbed_aps_reference)
    np.testing.assert_allclose(g, -ref / 2, atol=1e-12)  # both classes have ground truth
    assert value == pytest.approx(1 - loss.last_map)


def test_smoothing_draws_advance_and_resume_from_the_extra_state():
    probs = np.array([[0.3, 0.2], [0.6, 0.1]])
    boxes = np.array([[0, 0, 10, 10], [40, 40, 50, 50]], dtype=np.float64)
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    a = MAPLoss(normalization="none", smoothing="perturbed", sigma=0.3, samples=2)
    g1 = _grad(a, probs, boxes, [0, 0], targets)[1]
    state = a.get_extra_state()
    g2 = _grad(a, probs, boxes, [0, 0], targets)[1]
    assert not np.array_equal(g1, g2)
    b = MAPLoss(normalization="none", smoothing="perturbed", sigma=0.3, samples=2)
    b.set_extra_state(state)
    np.testing.assert_array_equal(_grad(b, probs, boxes, [0, 0], targets)[1], g2)
    with pytest.raises(ValueError, match="smoothing"):
        MAPLoss(normalization="none", smoothing="gauss")
    with pytest.raises(ValueError, match="memory"):
        MAPLoss(normalization="none", smoothing="average", memory=2)


def test_ap_loss_after_nms_hand_case():
    # one image, one class, ground truth [0, 0, 10, 10]. Windows: a TP (p 0.5), an FP far away
    # (p 0.6, above it), a duplicate of the TP (p 0.4) that NMS suppresses, and one below the
    # threshold. The list after NMS is [FP, TP]: x = logit(p); x_FP - x_TP = logit(.6) -
    # logit(.5) = 0.405 < delta = 1: H = 0.703; rank(TP) = 1.703, L = H / rank.
    probs = np.array([[0.5], [0.6], [0.4], [0.01]])
    boxes = np.array([[0, 0, 10, 10], [40, 40, 50, 50], [0, 0, 10, 9], [0, 0, 9, 10]],
                     dtype=np.float64)
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    loss = NMSAPLoss(delta=1.0)
    value, g = _grad(loss, probs, boxes, [0, 0, 0, 0], targets)
    h = math.log(0.6 / 0.4) / 2 + 0.5
    pair = h / (1 + h)
    assert value == pytest.approx(pair)
    assert loss.last_map == pytest.approx(0.5)
    # d logit / dp = 1 / (p (1 - p)); the TP moves up, the FP down; the others get nothing
    assert g[0, 0] == pytest.approx(-pair / (0.5 * 0.5))
    assert g[1, 0] == pytest.approx(pair / (0.6 * 0.4))
    assert g[2, 0] == 0.0 and g[3, 0] == 0.0


def test_class_log_odds_match_the_probabilities():
    logits = torch.tensor([[0.0, 1.0, -2.0], [3.0, 40.0, 0.5]], dtype=torch.float64)
    p = torch.softmax(logits, 1)[:, 1:]
    x = class_log_odds(logits)
    np.testing.assert_allclose(x[0], torch.log(p[0] / (1 - p[0])), rtol=1e-12)
    assert x[1, 0] == pytest.approx(40.0 - math.log(math.exp(3.0) + math.exp(0.5)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_variants")
    return [
        f"data.root={root / 'digits'}",
        "data.digits={num_train: 6, num_test: 4, image_size: 64, seed: 1}",
        "data.scale=64", "data.max_size=64",
        f"proposals.cache_dir={root / 'cache'}", "proposals.num_workers=0",
        "proposals.max_per_image=64", "model.fc_dim=32",
        "train.iterations=3", "train.checkpoint_every=0", "train.log_every=1",
        "train.threads=1", "output.tensorboard=false", "loss.num_threads=1",
    ]


@pytest.mark.parametrize("overrides", [
    ["train.loss=ap_loss"], ["train.loss=rank_sort"], ["train.loss=ap_loss_nms"],
    ["train.loss=softmax_map", "loss.map_loss_weight=0.5"],
    ["train.loss=map", "loss.smoothing=perturbed", "loss.samples=2"],
    ["train.loss=map", "loss.smoothing=average", "loss.samples=2"],
    ["train.loss=map", "train.optimizer=adam", "train.clip_grad_norm=1.0"],
])
def test_every_new_loss_trains(tmp_path, tiny, overrides):
    cfg = load_config(CONFIGS / "digits.yaml", [*tiny, *overrides])
    res = train(cfg, out=tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert res.checkpoint is not None


def test_optimizer_choice(tiny):
    model = torch.nn.Linear(2, 2)
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                      ("adamw", torch.optim.AdamW)):
        cfg = load_config(CONFIGS / "digits.yaml", [*tiny, f"train.optimizer={name}"])
        assert type(build_optimizer(model, cfg)) is cls
