"""Benchmark: AP after NMS and its pseudo-gradient, fast vs brute force (one core).

Workload: proposal-like detector outputs (``mapdet.core.synthetic.proposal_like_outputs``):
2 images x 2000 windows x 20 classes, windows clustered around objects, scores like a
partly trained detector. Prints a table; ``--json PATH`` also writes the numbers.

    python benchmarks/bench_loss.py                # full run (brute force takes a while)
    python benchmarks/bench_loss.py --skip-brute   # fast part only

Targets (issue 2): pseudo-gradient of all 20 classes <= 50 ms on one core, and >= 1000x
faster than brute force at N = 300 windows per class.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mapdet.core.apnms import (  # noqa: E402
    ap_after_nms,
    ap_pseudo_gradient,
    ap_pseudo_gradient_multiclass,
)
from mapdet.core.reference import ap_pseudo_gradient_reference  # noqa: E402
from mapdet.core.synthetic import proposal_like_outputs  # noqa: E402


def _cpu_time(fn, repeats: int) -> float:
    """Minimum CPU time of ``fn()`` over ``repeats`` runs, in seconds (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def _one_class(o, c: int):
    sel = o.gt_labels == c
    return (o.probs[:, c], o.boxes[:, c], o.image_ids, o.gt_boxes[sel], o.gt_image_ids[sel],
            o.gt_difficult[sel])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2000, help="windows per image")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5, help="workloads averaged over")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--brute-n", type=int, default=300, help="windows per class, brute force")
    parser.add_argument("--skip-brute", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rows = []
    fwd_times, grad_times, cands, dets = [], [], [], []
    for seed in range(args.seeds):
        o = proposal_like_outputs(args.images, args.windows, args.classes, seed=seed)
        k = o.probs.shape[1]

        def forward(o=o, k=k):
            return [ap_after_nms(*_one_class(o, c)) for c in range(k)]

        def gradient(o=o):
            return ap_pseudo_gradient_multiclass(
                o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
                o.gt_difficult, num_threads=1)

        fwd_times.append(_cpu_time(forward, args.repeats))
        grad_times.append(_cpu_time(gradient, args.repeats))
        cands.append(float((o.probs > 0.05).sum(0).mean()))
        aps = np.array(forward())
        dets.append(float(np.nanmean(aps)))
    fwd, grad = float(np.mean(fwd_times)), float(np.mean(grad_times))
    rows.append(("workload", f"{args.images} images x {args.windows} windows x {args.classes} "
                 f"classes, {np.mean(cands):.0f} candidates/class (s > 0.05), "
                 f"mean AP {np.mean(dets):.2f}, {args.seeds} seeds"))
    rows.append(("forward AP after NMS, all classes", f"{fwd * 1e3:.1f} ms"))
    rows.append(("pseudo-gradient, all classes", f"{grad * 1e3:.1f} ms  (target <= 50 ms)"))
    rows.append(("pseudo-gradient / forward", f"{grad / fwd:.1f}x"))

    result = dict(forward_ms=fwd * 1e3, gradient_ms=grad * 1e3, ratio=grad / fwd)
    if not args.skip_brute:
        # One class with objects, N windows: the brute force is the definition itself.
        o = proposal_like_outputs(args.images, args.brute_n // args.images, 1,
                                  objects_per_image=(2, 4), seed=100)
        inputs = _one_class(o, 0)
        fast = _cpu_time(lambda: ap_pseudo_gradient(*inputs), args.repeats)
        t = time.process_time()
        ap_ref, g_ref = ap_pseudo_gradient_reference(*inputs)
        brute = time.process_time() - t
        ap_fast, g_fast = ap_pseudo_gradient(*inputs)
        assert np.allclose(g_fast, g_ref, atol=1e-9, rtol=0), "fast != brute force"
        rows.append((f"brute force, N = {args.brute_n}, one class", f"{brute:.1f} s"))
        rows.append((f"fast, N = {args.brute_n}, one class", f"{fast * 1e3:.2f} ms"))
        rows.append(("speed-up over brute force", f"{brute / fast:,.0f}x  (target >= 1000x)"))
        result.update(brute_s=brute, fast_small_ms=fast * 1e3, speedup=brute / fast)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 used"
    rows.append(("machine", machine))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(result, machine=machine), fh, indent=2)


if __name__ == "__main__":
    main()
