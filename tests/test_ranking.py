"""AP-Loss and Rank & Sort Loss (mapdet.ranking): hand-computed cases from the papers'
definitions, and the vectorised update against the pair-by-pair reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.ranking import (
    ap_loss,
    ap_loss_reference,
    rank_sort_loss,
    rank_sort_loss_reference,
    step,
)


def _grad(fn, scores, *args):
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    value = fn(s, *args)
    value.backward()
    return float(value.detach()), s.grad.tolist()


def test_step_interpolates_and_exact_at_zero_width():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    assert step(x, 1.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert step(x, 0.0).tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_ap_loss_exact_step_is_one_minus_ap():
    # ranking a(P, 3) > c(N, 2) > b(P, 1) > d(N, 0): AP = (1 + 2/3) / 2, 1 - AP = 1/6;
    # the only mis-ordered pair is (b, c): L_bc = 1 / rank(b) = 1/3.
    labels = torch.tensor([1, 1, 0, 0])
    for delta in (0.1, 1.0):  # every gap is >= 1, so delta = 1 gives the exact step too
        value, grad = _grad(ap_loss, [3.0, 1.0, 2.0, 0.0], labels, delta)
        assert value == pytest.approx(1 / 6)
        assert grad == pytest.approx([0.0, -1 / 6, 1 / 6, 0.0])


def test_ap_loss_interpolated_hand_case():
    # P = {a: 1, b: 0}, N = {c: 0.5}, delta = 1: H(x) = clamp(x/2 + 1/2, 0, 1).
    # a: rank = 1 + H(-1) + H(-0.5) = 1.25, L_ac = 0.25 / 1.25 = 0.2
    # b: rank = 1 + H(1) + H(0.5) = 2.75, L_bc = 0.75 / 2.75 = 3/11
    value, grad = _grad(ap_loss, [1.0, 0.0, 0.5], torch.tensor([1, 1, 0]), 1.0)
    assert value == pytest.approx((0.2 + 3 / 11) / 2)
    assert grad == pytest.approx([-0.1, -3 / 22, (0.2 + 3 / 11) / 2])


def test_rank_sort_hand_case_exact_step():
    # P = {a: s 3, IoU 0.6; b: s 1, IoU 0.9}, N = {c: s 2}, delta_RS = 0 (exact step).
    # a: no FP above, alone above itself: l_R = 0, current sorting 0.4 = target: l_S = 0.
    # b: rank_pos 2 (a, itself), one FP: l_R = 1/3; current (0.4 + 0.1)/2 = 0.25, target 0.1
    #    (only b has IoU >= 0.9): l_S = 0.15, distributed to a (mis-sorted above b).
    labels = torch.tensor([1, 1, 0])
    y = torch.tensor([0.6, 0.9, 0.0], dtype=torch.float64)
    value, grad = _grad(rank_sort_loss, [3.0, 1.0, 2.0], labels, y, 0.0)
    assert value == pytest.approx((1 / 3) / 2 + 0.15 / 2)
    assert grad == pytest.approx([0.15 / 2, -(1 / 3 + 0.15) / 2, (1 / 3) / 2])


def test_rank_sort_published_width_hand_case():
    # delta_RS = 0.5, one positive p (s 0, IoU 0.7) and one negative n (s 0.25):
    # H(0) = 0.5 (p itself), H(0.25) = 0.75: l_R = 0.75 / 1.25 = 0.6; sorting: p alone, 0.
    value, grad = _grad(rank_sort_loss, [0.0, 0.25], torch.tensor([1, 0]),
                        torch.tensor([0.7, 0.0], dtype=torch.float64), 0.5)
    assert value == pytest.approx(0.6)
    assert grad == pytest.approx([-0.6, 0.6])


def test_no_positive_gives_zero_and_no_gradient():
    for fn, extra in ((ap_loss, ()), (rank_sort_loss, (torch.zeros(3, dtype=torch.float64),))):
        value, grad = _grad(fn, [0.3, 0.1, 0.2], torch.tensor([0, 0, -1]), *extra)
        assert value == 0.0 and grad == [0.0, 0.0, 0.0]


def test_ignored_entries_take_no_part():
    labels = torch.tensor([1, 0, -1, 0])
    value, grad = _grad(ap_loss, [0.0, 0.4, 5.0, -0.3], labels, 1.0)
    ref_v, ref_g = ap_loss_reference([0.0, 0.4, -0.3], [1, 0, 0], 1.0)
    assert value == pytest.approx(ref_v)
    assert grad == pytest.approx([ref_g[0], ref_g[1], 0.0, ref_g[2]])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same length"):
        ap_loss(torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="delta"):
        ap_loss(torch.zeros(2), torch.zeros(2, dtype=torch.int64), -1.0)


_lists = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([-1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0])
             | st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n),
    st.lists(st.sampled_from([1, 0, 0, -1]), min_size=n, max_size=n),
    st.lists(st.floats(0, 1, allow_nan=False) | st.sampled_from([0.5, 0.7]),
             min_size=n, max_size=n),
    st.sampled_from([0.0, 0.5, 1.0, 0.3])))


@settings(max_examples=150, deadline=None)
@given(_lists)
def test_ap_loss_matches_reference(case):
    scores, labels, _, delta = case
    value, grad = _grad(ap_loss, scores, torch.tensor(labels), delta)
    ref_v, ref_g = ap_loss_reference(scores, labels, delta)
    assert value == pytest.approx(ref_v, abs=1e-12)
    assert np.allclose(grad, ref_g, atol=1e-12)
    if 1 in labels and 0 in labels and delta == 0.0:  # exact step: 1 - AP without ties
        s = np.asarray(scores)
        if len(set(s[np.asarray(labels) >= 0].tolist())) == int((np.asarray(labels) >= 0).sum()):
            keep = np.asarray(labels) >= 0
            order = np.argsort(-s[keep])
            lab = np.asarray(labels)[keep][order]
            prec = np.cumsum(lab)[lab == 1] / (np.flatnonzero(lab == 1) + 1)
            assert value == pytest.approx(1 - prec.mean(), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(_lists)
def test_rank_sort_matches_reference(case):
    scores, labels, ious, delta = case
    value, grad = _grad(rank_sort_loss, scores, torch.tensor(labels),
                        torch.tensor(ious, dtype=torch.float64), delta)
    ref_v, ref_g = rank_sort_loss_reference(scores, labels, ious, delta)
    assert math.isclose(value, ref_v, abs_tol=1e-12)
    assert np.allclose(grad, ref_g, atol=1e-12)
