"""Faster R-CNN (torchvision, small backbone from scratch) on the digits benchmark: softmax
vs mAP fine-tuning from the same softmax baseline, over several seeds.

Protocol, per seed s (``train.seed=s``: initialisation, data order, RoI/anchor sampling):

1. softmax baseline: ``configs/digits_faster_rcnn.yaml`` for ``--base`` iterations
   (lr 0.02, step at 80%);
2. from it, ``--more`` iterations of continued softmax (lr 1e-3), and separately ``--more``
   iterations of mAP training (``train.loss=map``, lr 1e-5, AP memory of 20 minibatches: the
   recipe of the Fast R-CNN demo);
3. each evaluated on the test split (VOC07 and area mAP, devkit convention).

Writes ``<out>/results.json`` (every run's numbers and the mean and std over seeds) and
prints a table. Usage::

    python experiments/faster_rcnn_digits.py --seeds 0 1 2 --out runs/faster_rcnn_digits
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_faster_rcnn.yaml"


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "mapdet", "train", str(CONFIG), *args, "--no-progress"]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def _read(run: Path) -> dict:
    m = json.loads((run / "eval" / "metrics.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    spi = statistics.median(x["sec_per_iter"] for x in lines if "sec_per_iter" in x)
    return {"voc07": 100 * m["mAP_voc07"], "area": 100 * m["mAP_area"],
            "ms_per_iter": 1000 * spi}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base", type=int, default=1500, help="softmax baseline iterations")
    ap.add_argument("--more", type=int, default=300, help="iterations of each continuation")
    ap.add_argument("--out", type=Path, default=Path("runs/faster_rcnn_digits"))
    a = ap.parse_args(argv)
    common = [f"data.root={a.out / 'data'}", "output.tensorboard=false",
              "train.checkpoint_every=0"]
    results: dict[str, list[dict]] = {"baseline": [], "softmax": [], "map": []}
    t0 = time.time()
    for seed in a.seeds:
        base = a.out / f"seed{seed}" / "baseline"
        _run([*common, f"train.seed={seed}", f"train.iterations={a.base}",
              f"train.lr_steps=[{int(0.8 * a.base)}]", "--out", str(base)])
        results["baseline"].append(_read(base))
        cont = [*common, f"train.seed={seed}", f"train.iterations={a.more}",
                f"train.init_from={base}", "train.warmup_iterations=0",
                "train.lr_steps=[1000000]"]
        _run([*cont, "train.lr=0.001", "--out", str(a.out / f"seed{seed}" / "softmax")])
        results["softmax"].append(_read(a.out / f"seed{seed}" / "softmax"))
        _run([*cont, "train.loss=map", "loss.lr=0.00001", "loss.normalization=none",
              "loss.memory=20", "--out", str(a.out / f"seed{seed}" / "map")])
        results["map"].append(_read(a.out / f"seed{seed}" / "map"))
    summary = {}
    for name, runs in results.items():
        summary[name] = {k: {"mean": statistics.fmean(r[k] for r in runs),
                             "std": statistics.stdev(r[k] for r in runs) if len(runs) > 1
                             else 0.0} for k in runs[0]}
    out = {"protocol": {"seeds": a.seeds, "base": a.base, "more": a.more,
                        "config": str(CONFIG.name)},
           "runs": results, "summary": summary, "seconds": time.time() - t0}
    (a.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'model':<28}{'VOC07 mAP':>14}{'area mAP':>14}{'ms/iter':>10}")
    labels = {"baseline": f"softmax baseline ({a.base} it.)",
              "softmax": f"+ {a.more} it. softmax", "map": f"+ {a.more} it. mAP loss"}
    for name, s in summary.items():
        print(f"{labels[name]:<28}{s['voc07']['mean']:>8.1f} ± {s['voc07']['std']:<4.1f}"
              f"{s['area']['mean']:>8.1f} ± {s['area']['std']:<4.1f}"
              f"{s['ms_per_iter']['mean']:>10.0f}")
    return out


if __name__ == "__main__":
    main()
