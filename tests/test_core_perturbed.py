"""AP after NMS under perturbations (mapdet.core.perturbed): the compiled evaluator equals
the reference row by row, the estimator equals the reference's, and it estimates the
derivative of the smoothed AP."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import detection_instances

from mapdet.core.perturbed import perturbed_ap_gradient, perturbed_aps, perturbed_aps_reference


def _kwargs(inst):
    return {k: inst[k] for k in ("score_threshold", "nms_iou", "match_iou", "ap_method")}


def _args(inst):
    return (inst["boxes"], inst["image_ids"], inst["gt_boxes"], inst["gt_image_ids"],
            inst["gt_difficult"])


@settings(max_examples=200, deadline=None)
@given(detection_instances(max_windows=14), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 0.01, 0.1, 0.3]))
def test_perturbed_aps_equal_the_reference(inst, seed, sigma):
    rng = np.random.default_rng(seed)
    n = len(inst["scores"])
    rows = inst["scores"][None, :] + sigma * rng.standard_normal((4, n))
    if sigma == 0.1:  # exact ties between windows after the perturbation
        rows = np.round(rows, 1)
    fast = perturbed_aps(rows, *_args(inst), **_kwargs(inst))
    ref = perturbed_aps_reference(rows, *_args(inst), **_kwargs(inst))
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(detection_instances(max_windows=12), st.integers(0, 2**31 - 1),
       st.sampled_from([0.01, 0.1]), st.integers(1, 5))
def test_estimator_equals_the_reference_estimator(inst, seed, sigma, k):
    z = np.random.default_rng(seed).standard_normal((k, len(inst["scores"])))
    fast = perturbed_ap_gradient(inst["scores"], *_args(inst), noise=z, sigma=sigma,
                                 **_kwargs(inst))
    ref = perturbed_ap_gradient(inst["scores"], *_args(inst), noise=z, sigma=sigma,
                                aps=perturbed_aps_reference, **_kwargs(inst))
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


def test_estimator_approaches_the_smoothed_derivative():
    # one TP window near the threshold and one ground truth: AP = [s > tau], so
    # E[AP(s + sigma z)] = Phi((s - tau) / sigma), derivative phi((s - tau)/sigma) / sigma;
    # a far-away FP below every perturbed score gets no gradient.
    s, tau, sigma = 0.06, 0.05, 0.02
    scores = np.array([s, 0.0])
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float64)
    z = np.random.default_rng(0).standard_normal((20000, 2))
    g = perturbed_ap_gradient(scores, boxes, [0, 0], boxes[:1], [0], noise=z, sigma=sigma,
                              score_threshold=tau)
    u = (s - tau) / sigma
    exact = math.exp(-u * u / 2) / math.sqrt(2 * math.pi) / sigma
    assert g[0] == pytest.approx(exact, rel=0.05)
    # window 1: s + sigma |z| <= tau unless |z| > 2.5: mostly zeroed, mean ~ 0
    assert abs(g[1]) < 0.1 * exact


def test_estimator_is_zero_without_ground_truth_and_checks_its_input():
    boxes = np.array([[0, 0, 10, 10]], dtype=np.float64)
    z = np.ones((3, 1))
    g = perturbed_ap_gradient([0.5], boxes, [0], np.zeros((0, 4)), [], noise=z, sigma=0.1)
    assert g.tolist() == [0.0]
    with pytest.raises(ValueError, match="noise"):
        perturbed_ap_gradient([0.5], boxes, [0], boxes, [0], noise=np.ones((3, 2)), sigma=0.1)
    with pytest.raises(ValueError, match="sigma"):
        perturbed_ap_gradient([0.5], boxes, [0], boxes, [0], noise=z, sigma=0.0)
