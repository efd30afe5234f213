"""Percentiles of the gradient's global norm in training runs' ``metrics.jsonl``: how
heavy-tailed a loss's steps are, and where to clip them (``train.clip_grad_norm``).

The norm is logged only while clipping is on; a limit no step reaches measures it without
clipping. From the repository root (B: a checkpoint, e.g. the study's converged base)::

    mapdet train configs/digits.yaml train.init_from=B train.iterations=40 \\
        train.loss=map loss.lr=0.0001 loss.normalization=l1 train.clip_grad_norm=1e9 \\
        train.log_every=1 'train.lr_steps=[]' train.warmup_iterations=0 --out runs/norm_map
    python experiments/grad_norms.py runs/norm_map runs/norm_softmax --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def norms(run: Path) -> np.ndarray:
    """``grad_norm`` of every logged iteration of a run folder (or its metrics.jsonl)."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["grad_norm"] for r in rows if r.get("split", "train") == "train"
              and "grad_norm" in r]
    if not values:
        raise SystemExit(f"{path}: no grad_norm logged (train with train.clip_grad_norm > 0)")
    return np.asarray(values, dtype=np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders or metrics.jsonl files")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    table = {}
    print(f"{'run':<24} {'steps':>5} {'p10':>7} {'p50':>7} {'p90':>7} {'max':>7}")
    for run in args.runs:
        g = norms(run)
        p10, p50, p90 = np.percentile(g, [10, 50, 90])
        table[run.name] = {"steps": int(g.size), "p10": p10, "p50": p50, "p90": p90,
                           "max": float(g.max())}
        print(f"{run.name:<24} {g.size:>5} {p10:>7.2f} {p50:>7.2f} {p90:>7.2f} {g.max():>7.2f}")
    if args.json:
        from mapdet.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
