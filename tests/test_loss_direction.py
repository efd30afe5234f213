"""MAPLoss(direction=...) and the config key ``loss.direction``: the variant reaches the
kernel, its backward is the reference pseudo-gradient of that variant."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mapdet import MAPLoss
from mapdet.config import ConfigError, load_config
from mapdet.core.reference import ap_pseudo_gradient_reference
from mapdet.core.synthetic import proposal_like_outputs
from mapdet.engine.builders import build_criterion

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("direction", ["nearest_improvement", "nearest_change", "both_summed"])
def test_backward_is_the_variants_pseudo_gradient(direction):
    o = proposal_like_outputs(num_images=2, windows_per_image=12, num_classes=2,
                              objects_per_image=(1, 3), image_size=(200, 150), seed=4)
    probs = np.round(o.probs, 2)
    targets = [dict(boxes=torch.tensor(o.gt_boxes[o.gt_image_ids == b]),
                    labels=torch.tensor(o.gt_labels[o.gt_image_ids == b]))
               for b in range(2)]
    p = torch.tensor(probs, requires_grad=True)
    loss = MAPLoss(direction=direction, normalization="none")
    loss(p, o.boxes, o.image_ids, targets).backward()
    grads = []
    for c in range(2):
        sel = o.gt_labels == c
        _, g = ap_pseudo_gradient_reference(probs[:, c], o.boxes[:, c], o.image_ids,
                                            o.gt_boxes[sel], o.gt_image_ids[sel],
                                            direction=direction)
        grads.append(g)
    n_def = int(np.isfinite(loss.last_ap).sum())
    np.testing.assert_allclose(p.grad.numpy(), -np.stack(grads, 1) / n_def, atol=1e-9)
    assert f"direction={direction!r}" in repr(loss)


def test_config_key_reaches_the_loss():
    cfg = load_config(CONFIGS / "digits.yaml", ["train.loss=map", "loss.direction=both_summed"])
    assert build_criterion(cfg).direction == "both_summed"
    assert load_config(CONFIGS / "digits.yaml").loss.direction == "nearest_improvement"
    with pytest.raises(ConfigError, match="loss.direction"):
        load_config(CONFIGS / "digits.yaml", ["loss.direction=up"])
    with pytest.raises(ValueError, match="direction must be one of"):
        MAPLoss(direction="up")
