"""Pseudo-gradients of piecewise-constant functions (docs/method.md, section 3).

Let ``f: R^n -> R`` (to be maximised) be constant between finitely many known breakpoints
along each coordinate. At ``x``, along coordinate ``i`` and for a direction ``d in {+1, -1}``:

- walk the breakpoints in direction ``d``, nearest first, at distances
  ``delta_1 <= delta_2 <= ...`` (a breakpoint at ``x_i`` itself has distance 0 and is
  walked in both directions);
- ``v_k`` is ``f`` just beyond breakpoint ``k``, i.e. with ``x_i`` moved strictly past it
  but not as far as the next one;
- ``k*`` is the first ``k`` with ``v_k > f(x)`` (the nearest improvement);
- ``slope_d = (v_k* - f(x)) / (delta_k* + mu)``, or 0 when no breakpoint improves ``f``.

The pseudo-partial derivative is ``+slope_up`` if ``slope_up >= slope_down`` and
``slope_up > 0``, ``-slope_down`` if ``slope_down > slope_up``, and 0 otherwise.
``mu > 0`` (``min_step``) bounds the slope where breakpoints (tied scores) sit at distance 0.

That rule is ``direction="nearest_improvement"`` (the default, the definition of
docs/method.md). Two variants, for ablations (:data:`DIRECTIONS`):

- ``"nearest_change"``: ``k*`` is the first ``k`` with ``|v_k - f(x)| > tol`` (a change of
  either sign); each direction gives the derivative estimate
  ``g_up = (v_k* - f(x)) / (delta_k* + mu)`` and ``g_down = -(v_k* - f(x)) / (delta_k* + mu)``
  (0 without a change); the pseudo-partial is the one of larger magnitude, ``g_up`` when the
  magnitudes are equal (within :data:`SLOPE_RTOL`).
- ``"both_summed"``: ``slope_up - slope_down``, both with the nearest improvement.

This module is the literal definition: it evaluates ``f`` at every breakpoint until the first
improvement, which makes it the reference that fast special cases (AP after NMS) are tested
against, and a usable tool for any small piecewise-constant objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["BOTH_SUMMED", "DIRECTIONS", "IMPROVEMENT_TOL", "NEAREST_CHANGE",
           "NEAREST_IMPROVEMENT", "SLOPE_RTOL", "check_direction", "check_min_step",
           "combine_slopes", "pseudo_gradient", "pseudo_partial"]

#: The direction rules' codes (module doc), what :func:`check_direction` returns and the
#: compiled kernels read. A new rule is one more code here and one more entry of ``_CODES``.
NEAREST_IMPROVEMENT = 0
NEAREST_CHANGE = 1
BOTH_SUMMED = 2
_CODES = {"nearest_improvement": NEAREST_IMPROVEMENT, "nearest_change": NEAREST_CHANGE,
          "both_summed": BOTH_SUMMED}
#: The direction rules by name, in code order (``DIRECTIONS[code]``); the first is the default.
DIRECTIONS = tuple(sorted(_CODES, key=_CODES.__getitem__))


def check_direction(direction: str) -> int:
    """The code of ``direction`` (its index in :data:`DIRECTIONS`), or ``ValueError``."""
    if direction not in _CODES:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return _CODES[direction]

#: ``v`` counts as an improvement over ``f(x)`` only when ``v > f(x) + IMPROVEMENT_TOL``.
#: Piecewise-constant objectives computed in floating point (AP is a sum of ratios) can
#: return values that differ in the last bits for the same mathematical value; this keeps
#: such rounding from being mistaken for an improvement. 0 recovers the bare definition.
IMPROVEMENT_TOL = 1e-12


def check_min_step(min_step: float) -> float:
    """Return ``min_step`` as a float, or raise ``ValueError`` unless it is finite and > 0."""
    value = float(min_step)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(
            "min_step must be a finite number > 0 (it bounds slopes at tied scores), "
            f"got {min_step!r}"
        )
    return value


#: Relative tolerance under which the two one-sided slopes count as equal (the definition
#: then prefers moving up). Equal slopes computed along different paths can differ in the
#: last bits; without this, rounding would pick the direction.
SLOPE_RTOL = 1e-9


def combine_slopes(slope_up: float, slope_down: float,
                   direction: str = "nearest_improvement") -> float:
    """The pseudo-partial from the two one-sided slopes.

    ``nearest_improvement`` (both >= 0): ``+slope_up`` if ``slope_up >= slope_down`` and
    ``slope_up > 0``; ``-slope_down`` if ``slope_down > slope_up``; 0 if neither direction
    improves. Equality is judged with :data:`SLOPE_RTOL`. ``both_summed``:
    ``slope_up - slope_down``. ``nearest_change`` (signed: the change of ``f`` per unit moved
    in that direction): ``slope_up`` if ``|slope_up| >= |slope_down|`` (within
    :data:`SLOPE_RTOL`) and it is not 0, else ``-slope_down``.
    """
    code = check_direction(direction)
    if code == BOTH_SUMMED:
        return slope_up - slope_down
    # One comparison of magnitudes serves both other rules: nearest_improvement's slopes are
    # >= 0, so their magnitudes are the slopes themselves.
    au, ad = abs(slope_up), abs(slope_down)
    slack = SLOPE_RTOL * max(au, ad)
    if au > 0.0 and au >= ad - slack:
        return slope_up
    if ad > au + slack:
        return -slope_down
    return 0.0


def _just_beyond(points: np.ndarray, k: int, direction: int) -> float:
    """A value strictly past ``points[k]`` in ``direction`` and short of the next point.

    ``points`` is sorted ascending and unique. Beyond the last point, ``+-1`` further.
    """
    b = points[k]
    nxt = k + direction
    if 0 <= nxt < points.size:
        mid = 0.5 * (b + points[nxt])
        if not (min(b, points[nxt]) < mid < max(b, points[nxt])):
            raise ValueError(
                f"breakpoints {b!r} and {points[nxt]!r} are adjacent floats: no value lies between"
            )
        return mid
    return b + direction * max(1.0, abs(b))


def pseudo_partial(
    f_along: Callable[[float], float],
    x_i: float,
    breakpoints: np.ndarray,
    *,
    f_x: float,
    min_step: float = 1e-3,
    tol: float = IMPROVEMENT_TOL,
    direction: str = "nearest_improvement",
) -> float:
    """Pseudo-partial derivative along one coordinate, by the definition.

    Args:
        f_along: ``f`` as a function of this coordinate only (the others held fixed).
        x_i: the coordinate's current value.
        breakpoints: values of the coordinate where ``f`` may change (any order, repeats ok).
        f_x: ``f(x)``.
        min_step: ``mu > 0``.
        tol: improvement tolerance (see :data:`IMPROVEMENT_TOL`).
        direction: the rule, one of :data:`DIRECTIONS` (module doc).
    """
    mu = check_min_step(min_step)
    change = check_direction(direction) == NEAREST_CHANGE
    points = np.unique(np.asarray(breakpoints, dtype=np.float64))
    slopes = []
    for sense in (+1, -1):
        if sense > 0:
            ks = np.flatnonzero(points >= x_i)
        else:
            ks = np.flatnonzero(points <= x_i)[::-1]
        slope = 0.0
        for k in ks:
            v = f_along(_just_beyond(points, int(k), sense))
            if v > f_x + tol or (change and v < f_x - tol):
                slope = (v - f_x) / (abs(points[k] - x_i) + mu)
                break
        slopes.append(slope)
    return combine_slopes(slopes[0], slopes[1], direction)


def pseudo_gradient(
    f: Callable[[np.ndarray], float],
    x,
    breakpoints: Callable[[int, np.ndarray], np.ndarray] | Sequence[np.ndarray],
    *,
    min_step: float = 1e-3,
    tol: float = IMPROVEMENT_TOL,
    direction: str = "nearest_improvement",
) -> tuple[float, np.ndarray]:
    """Pseudo-gradient of a piecewise-constant ``f`` at ``x``, by the definition.

    Args:
        f: ``f(x) -> float`` for ``x (n,)``; it is called with modified copies of ``x``.
        x: ``(n,)`` the point.
        breakpoints: for each coordinate ``i``, the values of ``x_i`` where ``f`` may change
            with the other coordinates fixed: a sequence of arrays, or a callable
            ``(i, x) -> array``.
        min_step: ``mu > 0``, the minimum step in the slope's denominator.
        tol: improvement tolerance (see :data:`IMPROVEMENT_TOL`).
        direction: the rule, one of :data:`DIRECTIONS` (module doc).

    Returns:
        ``(f(x), grad (n,))``. Cost: up to one evaluation of ``f`` per breakpoint.

    Example: F1 of a linear classifier ``1[X @ w > 0]`` is piecewise constant in ``w``;
    along ``w_j`` it changes where a sample's margin crosses 0, at
    ``w_j = w_j - (X @ w)[s] / X[s, j]`` for every sample ``s`` with ``X[s, j] != 0``.
    """
    check_min_step(min_step)
    check_direction(direction)
    x = np.asarray(x, dtype=np.float64).copy()
    f_x = float(f(x))
    grad = np.zeros_like(x)
    for i in range(x.size):
        pts = breakpoints(i, x) if callable(breakpoints) else breakpoints[i]

        def f_along(value: float, i: int = i) -> float:
            moved = x.copy()
            moved[i] = value
            return float(f(moved))

        grad[i] = pseudo_partial(f_along, x[i], pts, f_x=f_x, min_step=min_step, tol=tol,
                                 direction=direction)
    return f_x, grad
