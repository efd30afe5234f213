"""Pseudo-gradients beyond detection: train a linear classifier for F1 directly.

F1 of ``predict = 1[X @ w > 0]`` is piecewise constant in ``w``. Along ``w_j`` (the others
fixed) sample ``s``'s margin ``(X @ w)[s]`` crosses 0 at ``w_j - (X @ w)[s] / X[s, j]`` when
``X[s, j] != 0``: those are the breakpoints. ``mapdet.pseudo_gradient`` gives an ascent
direction; a few steps of it raise the F1 of a deliberately poor start.

    python experiments/pseudograd_linear_f1.py
"""

from __future__ import annotations

import numpy as np

from mapdet import pseudo_gradient


def toy_data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian blobs, 25% positives; features ``[x1, x2, 1]`` (with bias)."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.25).astype(int)
    x = rng.normal(0, 1, (n, 2)) + np.where(y[:, None] == 1, [1.5, 1.0], [-0.5, -0.5])
    return np.concatenate([x, np.ones((n, 1))], 1), y


def f1(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    pred = (x @ w > 0).astype(int)
    tp = int((pred & y).sum())
    return 2 * tp / max(int(pred.sum()) + int(y.sum()), 1)


def breakpoints(j: int, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    margin = x @ w
    col = x[:, j]
    nz = col != 0
    return w[j] - margin[nz] / col[nz]


def ascend(x, y, w, steps: int = 25, lr: float = 0.2, min_step: float = 1e-2):
    """Normalised ascent on the pseudo-gradient; returns the F1 after each step."""
    history = [f1(w, x, y)]
    for _ in range(steps):
        _, g = pseudo_gradient(lambda v: f1(v, x, y), w,
                               lambda j, v: breakpoints(j, v, x), min_step=min_step)
        if not np.any(g):
            break
        w = w + lr * g / np.linalg.norm(g)
        history.append(f1(w, x, y))
    return w, history


if __name__ == "__main__":
    x, y = toy_data()
    w0 = np.array([-1.0, 0.5, 0.3])
    w, hist = ascend(x, y, w0)
    print("F1 by step:", " ".join(f"{h:.3f}" for h in hist))
