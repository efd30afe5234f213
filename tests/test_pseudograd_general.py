"""General pseudo-gradients: the definition on simple functions, and a non-detection use."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mapdet import pseudo_gradient
from mapdet.core.pseudograd import combine_slopes, pseudo_partial

ROOT = Path(__file__).resolve().parents[1]


def test_step_function_nearest_improvement():
    # f(x) = floor(x) on [0, 3], constant between integer breakpoints, maximised.
    f = lambda x: float(np.floor(np.clip(x[0], 0, 3)))  # noqa: E731
    fx, g = pseudo_gradient(f, [1.5], [np.array([0.0, 1.0, 2.0, 3.0])], min_step=0.1)
    assert fx == 1.0
    assert g[0] == pytest.approx((2.0 - 1.0) / (0.5 + 0.1))  # up to 2 at distance 0.5


def test_nearest_improvement_not_largest():
    # Going up: +1 at distance 1, +10 at distance 2: the nearest improvement counts.
    f = lambda x: 0.0 if x[0] < 1 else (1.0 if x[0] < 2 else 11.0)  # noqa: E731
    _, g = pseudo_gradient(f, [0.0], [np.array([1.0, 2.0])], min_step=1e-3)
    assert g[0] == pytest.approx(1.0 / 1.001)


def test_down_wins_when_steeper_and_ties_prefer_up():
    assert combine_slopes(1.0, 2.0) == -2.0
    assert combine_slopes(2.0, 2.0) == 2.0
    assert combine_slopes(0.0, 0.0) == 0.0
    f = lambda x: 1.0 if x[0] < 0 else 0.0  # noqa: E731
    _, g = pseudo_gradient(f, [0.5], [np.array([0.0])], min_step=0.5)
    assert g[0] == pytest.approx(-1.0 / 1.0)


def test_breakpoint_at_x_has_distance_zero():
    f = lambda v: 1.0 if v > 0 else 0.0  # noqa: E731
    slope = pseudo_partial(f, 0.0, np.array([0.0]), f_x=0.0, min_step=0.25)
    assert slope == pytest.approx(1.0 / 0.25)


def test_no_improvement_gives_zero():
    _, g = pseudo_gradient(lambda x: 0.0, [0.3, 0.7], [np.array([0.5])] * 2)
    assert not g.any()


def test_linear_f1_ascent_improves_f1():
    spec = importlib.util.spec_from_file_location(
        "pseudograd_linear_f1", ROOT / "experiments" / "pseudograd_linear_f1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = mod.toy_data(seed=1)
    w0 = np.array([-1.0, 0.5, 0.3])
    _, hist = mod.ascend(x, y, w0, steps=15)
    assert hist[-1] > hist[0] + 0.2, hist
