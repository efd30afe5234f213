"""Benchmark: the pseudo-gradient of AP after NMS against the forward AP, on one core.

Prints one table per part (``--only`` picks some). CPU time (``time.process_time``), the
minimum over ``--repeats`` runs after a warm-up (the two sides of a ratio alternate within
each round), ``NUMBA_NUM_THREADS=1``, classes run inline.

* ``minibatch``: 2 images x 2000 proposal-like windows x 20 classes
  (``mapdet.core.synthetic.proposal_like_outputs``, about 250 candidates per class above
  0.05), and a heavier one with 400-1200 candidates per class (four 5-class draws side by
  side, class-specific boxes); each with one IoU threshold and with the 10 COCO thresholds.
* ``scaling``: one class, N = 2k / 8k / 32k windows spread over N/50 images (50 windows
  each), for each instance family of ``mapdet.core.synthetic.one_class_family``
  (``--families``: proposal-like, jittered ground truth, Selective-Search-like, crowded), at
  IoU 0.5 and at the 10 COCO thresholds: forward, pseudo-gradient, their ratio, the growth
  from 2k, and the kernel's counters (AP queries, non-monotone walks, direct segment sums,
  cascades run and reused, windows skipped because they cannot change the AP). Progress
  goes to stderr row by row.
* ``memory``: ``MAPLoss(memory=20)`` against ``MAPLoss(memory=0)`` on the 2 x 2000 x 20
  minibatch, forward and backward, after 20 other minibatches filled the memory, with
  ``torch.set_num_threads(1)`` (torch's other pool threads spin after each parallel op, and
  CPU time counts that spin: about 15 ms a step on a 2-core machine, the loss's cost on no
  core). Each step also pays what the memory costs in use: the minibatch entering it.
* ``smoothing``: the smoothed AP's gradients (``MAPLoss(smoothing=...)``) on the 2 x 2000 x
  20 minibatch against the exact pseudo-gradient once.
* ``testset``: all pseudo-partials of a test set: 5,000 images x 100 windows x 20 classes.
* ``brute``: fast against the definition (brute force), N = 300, one class; asserted equal.
* every run: a calibration workload (sorting 2M floats) at the start and the end, since this
  machine's speed drifts: compare runs through it.
* ``compile``: numba compile time of a fresh install (an empty ``NUMBA_CACHE_DIR``): the
  first call of the pseudo-gradient, in a fresh process; then the first call in a second
  fresh process that finds the cache the first one filled (what a compile-at-install step
  would leave a user).

    python benchmarks/bench_loss.py                  # everything (about 5 minutes)
    python benchmarks/bench_loss.py --only scaling memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mapdet.core.apnms import (  # noqa: E402
    ap_after_nms,
    ap_pseudo_gradient,
    ap_pseudo_gradient_multiclass,
    class_problem,
    solve_class,
)
from mapdet.core.gradkernel import N_STATS  # noqa: E402
from mapdet.core.reference import ap_pseudo_gradient_reference  # noqa: E402
from mapdet.core.synthetic import (  # noqa: E402
    FAMILIES,
    DetectorOutputs,
    one_class_family,
    proposal_like_outputs,
)

COCO = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))
PARTS = ("minibatch", "scaling", "memory", "smoothing", "testset", "brute", "compile")


def _cpu_time(fn, repeats: int) -> float:
    """Minimum CPU time of ``fn()`` over ``repeats`` runs, in seconds (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def _cpu_times(fns, repeats: int) -> list[float]:
    """Minimum CPU time of each of ``fns`` over ``repeats`` rounds, in seconds (after one
    warm-up each). The functions alternate within every round, so a drift of the machine's
    speed during the measurement (this one drifts) affects their ratio little."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.process_time()
            fn()
            best[k] = min(best[k], time.process_time() - t)
    return best


def _one_class(o, c: int):
    sel = o.gt_labels == c
    return (o.probs[:, c], o.boxes[:, c], o.image_ids, o.gt_boxes[sel], o.gt_image_ids[sel],
            o.gt_difficult[sel])


def _stack_classes(parts) -> DetectorOutputs:
    """Draws of the same images side by side as one problem with all their classes."""
    k = [p.probs.shape[1] for p in parts]
    offs = np.cumsum([0] + k)
    return DetectorOutputs(
        probs=np.concatenate([p.probs for p in parts], 1),
        boxes=np.concatenate([p.boxes for p in parts], 1),
        image_ids=parts[0].image_ids,
        gt_boxes=np.concatenate([p.gt_boxes for p in parts]),
        gt_labels=np.concatenate([p.gt_labels + o for p, o in zip(parts, offs, strict=False)]),
        gt_image_ids=np.concatenate([p.gt_image_ids for p in parts]),
        gt_difficult=np.concatenate([p.gt_difficult for p in parts]),
    )


def _concat_images(parts) -> DetectorOutputs:
    """Draws of different images as one set of images."""
    n_img = [int(p.image_ids.max()) + 1 for p in parts]
    offs = np.cumsum([0] + n_img)
    return DetectorOutputs(
        probs=np.concatenate([p.probs for p in parts]),
        boxes=np.concatenate([p.boxes for p in parts]),
        image_ids=np.concatenate([p.image_ids + o for p, o in zip(parts, offs, strict=False)]),
        gt_boxes=np.concatenate([p.gt_boxes for p in parts]),
        gt_labels=np.concatenate([p.gt_labels for p in parts]),
        gt_image_ids=np.concatenate(
            [p.gt_image_ids + o for p, o in zip(parts, offs, strict=False)]),
        gt_difficult=np.concatenate([p.gt_difficult for p in parts]),
    )


def _heavy(seed: int) -> DetectorOutputs:
    return _stack_classes([proposal_like_outputs(2, 2000, 5, seed=1000 + 4 * seed + j)
                           for j in range(4)])


def _fwd_grad(o, repeats, match_iou=0.5):
    k = o.probs.shape[1]
    forward = lambda: [ap_after_nms(*_one_class(o, c), match_iou=match_iou)  # noqa: E731
                       for c in range(k)]
    gradient = lambda: ap_pseudo_gradient_multiclass(  # noqa: E731
        o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
        o.gt_difficult, match_iou=match_iou, num_threads=1)
    return tuple(_cpu_times([forward, gradient], repeats))


def part_minibatch(args, rows, result):
    for name, make in (("2 x 2000 x 20", lambda s: proposal_like_outputs(2, 2000, 20, seed=s)),
                       ("heavier 2 x 2000 x 20", _heavy)):
        for thr_name, thr in (("IoU 0.5", 0.5), ("COCO 10 thresholds", COCO)):
            f, g, cand = [], [], []
            for seed in range(args.seeds):
                o = make(seed)
                tf, tg = _fwd_grad(o, args.repeats, thr)
                f.append(tf)
                g.append(tg)
                c = (o.probs > 0.05).sum(0)
                cand.append((c.mean(), c.min(), c.max()))
            cand = np.array(cand)
            fwd, grad = float(np.mean(f)), float(np.mean(g))
            label = (f"{name} ({cand[:, 0].mean():.0f} cand/class, {cand[:, 1].min():.0f}-"
                     f"{cand[:, 2].max():.0f}), {thr_name}")
            rows.append((label, f"forward {fwd * 1e3:6.1f} ms | pseudo-gradient "
                         f"{grad * 1e3:6.1f} ms | ratio {grad / fwd:4.1f}x"))
            result[f"minibatch/{name}/{thr_name}"] = dict(forward_ms=fwd * 1e3,
                                                          gradient_ms=grad * 1e3)


def part_smoothing(args, rows, result):
    """The smoothed AP's gradients (``MAPLoss(smoothing=...)``) on the 2 x 2000 x 20
    minibatch: the perturbed-optimizer estimator with K antithetic pairs (2K APs after NMS per
    class) and the exact pseudo-gradient averaged over K perturbed scores, against the exact
    pseudo-gradient once."""
    from mapdet.core.perturbed import perturbed_gradient_multiclass

    times = {}
    for seed in range(args.seeds):
        o = proposal_like_outputs(2, 2000, 20, seed=seed)
        args_ = (o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
                 o.gt_difficult)
        rng = np.random.default_rng(seed)
        fns = {"exact pseudo-gradient": lambda a=args_: ap_pseudo_gradient_multiclass(
            *a, num_threads=1)}
        for k in (8, 32):
            z = rng.standard_normal((k, *o.probs.shape))
            fns[f"perturbed, K = {k} pairs"] = lambda a=args_, z=z: (
                perturbed_gradient_multiclass(*a, noise=z, sigma=0.03))
        z4 = 0.03 * rng.standard_normal((4, *o.probs.shape))
        fns["averaged pseudo-gradient, K = 4"] = lambda a=args_, z=z4: [
            ap_pseudo_gradient_multiclass(a[0] + zk, *a[1:], num_threads=1) for zk in z]
        for name, t in zip(fns, _cpu_times(list(fns.values()), args.repeats), strict=True):
            times.setdefault(name, []).append(t)
    base = float(np.mean(times["exact pseudo-gradient"]))
    for name, ts in times.items():
        t = float(np.mean(ts))
        rows.append((f"2 x 2000 x 20, sigma 0.03: {name}",
                     f"{t * 1e3:7.1f} ms | {t / base:4.1f}x the exact pseudo-gradient"))
        result[f"smoothing/{name}"] = dict(ms=t * 1e3)


def part_scaling(args, rows, result):
    for family in args.families:
        for thr_name, thr in (("IoU 0.5", 0.5), ("COCO 10 thresholds", COCO)):
            base = None
            for n in (2000, 8000, 32000):
                inputs = one_class_family(family, n // 50, 50, seed=7)
                fwd, grad = _cpu_times(
                    [lambda: ap_after_nms(*inputs, match_iou=thr),  # noqa: B023
                     lambda: ap_pseudo_gradient(*inputs, match_iou=thr)],  # noqa: B023
                    args.repeats)
                stats = np.zeros(N_STATS, dtype=np.int64)
                solve_class(class_problem(*inputs, match_iou=thr, min_step=1e-3), None, stats)
                base = base or grad
                rows.append((f"{family}, N = {n:>6,} ({int((inputs[0] > 0.05).sum()):,} "
                             f"candidates), {thr_name}",
                             f"forward {fwd * 1e3:6.1f} ms | pseudo-gradient "
                             f"{grad * 1e3:7.1f} ms | ratio {grad / fwd:5.1f}x | growth "
                             f"{grad / base:5.1f}x | {stats[0]:,} AP queries, {stats[1]:,} "
                             f"non-monotone walks, {stats[2]} direct sums of {stats[3]:,} "
                             f"segments, {stats[4]:,} cascades run, {stats[5]:,} reused, "
                             f"{stats[6]:,} windows that cannot change the AP"))
                key = f"scaling/{family}/{n}" + ("/coco" if thr_name != "IoU 0.5" else "")
                result[key] = dict(forward_ms=fwd * 1e3, gradient_ms=grad * 1e3,
                                   queries=int(stats[0]), non_monotone=int(stats[1]),
                                   direct=int(stats[2]), segments=int(stats[3]),
                                   cascades=int(stats[4]), reused=int(stats[5]),
                                   skipped=int(stats[6]))
                print(f"  {rows[-1][0]}: {rows[-1][1][:90]}", file=sys.stderr, flush=True)


def part_memory(args, rows, result):
    import torch

    from mapdet import MAPLoss

    torch.set_num_threads(1)  # one core: see the module docstring

    def call(loss, o):
        probs = torch.tensor(o.probs, requires_grad=True)
        targets = []
        for j in range(int(o.image_ids.max()) + 1):
            sel = o.gt_image_ids == j
            targets.append(dict(boxes=o.gt_boxes[sel], labels=o.gt_labels[sel],
                                difficult=o.gt_difficult[sel]))
        loss(probs, o.boxes, o.image_ids, targets).backward()

    o = proposal_like_outputs(2, 2000, 20, seed=0)
    steps, ctx = [], {}
    for memory in (0, 20):
        loss = MAPLoss(normalization="none", memory=memory, num_threads=1)
        for s in range(memory):
            call(loss, proposal_like_outputs(2, 2000, 20, seed=500 + s))
        state = list(loss._memory)

        def step(loss=loss, state=state):
            loss._memory.clear()
            loss._memory.extend(state)  # the same context at every repeat
            call(loss, o)

        steps.append(step)
        ctx[memory] = sum(w.probs.shape[0] for w in state) + o.probs.shape[0]
    times = dict(zip((0, 20), _cpu_times(steps, args.repeats), strict=True))
    for memory in (0, 20):
        rows.append((f"MAPLoss(memory={memory}), 2 x 2000 x 20, forward + backward",
                     f"{times[memory] * 1e3:7.1f} ms  ({ctx[memory]:,} windows in the AP context)"))
    rows.append(("memory=20 / memory=0", f"{times[20] / times[0]:.2f}x"))
    result["memory"] = dict(memory0_ms=times[0] * 1e3, memory20_ms=times[20] * 1e3)


def part_testset(args, rows, result):
    o = _concat_images([proposal_like_outputs(500, 100, 20, seed=2000 + j)
                        for j in range(args.testset_images // 500)])
    gradient = lambda: ap_pseudo_gradient_multiclass(  # noqa: E731
        o.probs, o.boxes, o.image_ids, o.gt_boxes, o.gt_labels, o.gt_image_ids,
        o.gt_difficult, num_threads=1)
    t = _cpu_time(gradient, max(1, args.repeats // 3))
    cand = int((o.probs > 0.05).sum())
    n_img = int(o.image_ids.max()) + 1
    rows.append((f"test set: {n_img:,} images x 100 windows x 20 classes ({cand:,} candidates)",
                 f"all pseudo-partials {t:.2f} s ({t / cand * 1e6:.1f} us per candidate)"))
    result["testset"] = dict(seconds=t, candidates=cand)


def part_brute(args, rows, result):
    o = proposal_like_outputs(2, 150, 1, objects_per_image=(2, 4), seed=100)
    inputs = _one_class(o, 0)
    fast = _cpu_time(lambda: ap_pseudo_gradient(*inputs), args.repeats)
    t = time.process_time()
    _, g_ref = ap_pseudo_gradient_reference(*inputs)
    brute = time.process_time() - t
    _, g_fast = ap_pseudo_gradient(*inputs)
    assert np.allclose(g_fast, g_ref, atol=1e-9, rtol=0), "fast != brute force"
    rows.append(("brute force (the definition), N = 300, one class", f"{brute:.1f} s"))
    rows.append(("fast, same problem", f"{fast * 1e3:.2f} ms  (speed-up {brute / fast:,.0f}x)"))
    result["brute"] = dict(brute_s=brute, fast_ms=fast * 1e3)


_COMPILE_CHILD = """
import time
from mapdet.core.apnms import ap_pseudo_gradient, ap_after_nms
B = [0.0, 0.0, 10.0, 10.0]
t = time.process_time()
ap_pseudo_gradient([0.5, 0.4], [B, B], [0, 0], [B], [0])
g = time.process_time() - t
t = time.process_time()
ap_after_nms([0.5], [B], [0], [B], [0])
print(g, time.process_time() - t)
"""


def part_compile(args, rows, result):
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [[float(v) for v in subprocess.run(
            [sys.executable, "-c", _COMPILE_CHILD], env=env, check=True, capture_output=True,
            text=True).stdout.split()] for _ in range(2)]
    (g, f), (g_cached, f_cached) = runs
    rows.append(("numba compile, fresh install: pseudo-gradient (first call)", f"{g:.1f} s CPU"))
    rows.append(("numba compile, fresh install: forward AP after NMS (then)", f"{f:.1f} s CPU"))
    rows.append(("first call in a new process, the cache filled (pseudo-gradient, forward)",
                 f"{g_cached:.2f} s, {f_cached:.2f} s CPU"))
    result["compile"] = dict(gradient_s=g, forward_s=f, gradient_cached_s=g_cached,
                             forward_cached_s=f_cached)


def _calibration_ms() -> float:
    """CPU time of a fixed workload (sorting 2M floats), minimum of 5, in ms: this machine's
    speed drifts between runs (a shared virtual machine), so runs are compared through it."""
    x = np.random.default_rng(0).random(2_000_000)
    return 1e3 * _cpu_time(lambda: np.sort(x), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, default=3, help="minibatch workloads averaged")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="instance families of the scaling part")
    parser.add_argument("--testset-images", type=int, default=5000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result: dict = {}
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"1 used, load average {os.getloadavg()[0]:.1f} at start")
    calibration = [_calibration_ms()]
    for part in args.only:
        rows: list = []
        globals()[f"part_{part}"](args, rows, result)
        width = max(len(r[0]) for r in rows)
        print(f"--- {part}")
        print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)
    calibration.append(_calibration_ms())
    machine += (f"; calibration (np.sort of 2M floats) {calibration[0]:.1f} ms at start, "
                f"{calibration[1]:.1f} ms at end")
    print(f"machine: {machine}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(result, machine=machine, calibration_ms=calibration), fh, indent=2)


if __name__ == "__main__":
    main()
