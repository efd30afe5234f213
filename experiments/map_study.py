"""The mAP-stage study on the digits benchmark: gradient scale, sweep, equal-budget
controls, ablations. Every step writes a JSON file into ``--out``; training runs go to
``--work`` (checkpoints are large: keep them out of the repository).

Protocol. One softmax baseline (``configs/digits.yaml``, 3000 iterations, seed 0) is the
starting point of every stage. A stage trains ``--iterations`` iterations from it at a
constant learning rate (no warm-up, no steps) and is evaluated every ``--eval-every``
iterations on the train split (the whole split, or its first ``--train-eval-images``
images: a fixed subset, named so in the JSON's protocol and the report) and the whole test
split, with the test-time post-processing (score 0.05, NMS 0.3, 100 per image), VOC07 and
area mAP.

Usage (from the repository root; ``PYTHONPATH=src`` or an installed mapdet)::

    python experiments/map_study.py baseline --work W --out experiments/map_study
    python experiments/map_study.py scale    --work W --out experiments/map_study
    python experiments/map_study.py sweep    --work W --out experiments/map_study
    python experiments/map_study.py controls --work W --out experiments/map_study --seeds 0 1 2
    python experiments/map_study.py ablations --work W --out experiments/map_study
    python experiments/map_study.py report --out experiments/map_study   # docs/study.md's tables
    python experiments/map_study.py plot   --out experiments/map_study   # sweep_curves.png

``--base CKPT`` reuses an existing baseline checkpoint instead of ``W/baseline``;
``--set KEY=VALUE`` adds config overrides to every run (e.g. the quick data).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mapdet.config import apply_overrides
from mapdet.engine import checkpoint as ckpt
from mapdet.engine.builders import build_dataset, build_proposals, set_threads
from mapdet.engine.demo import default_config
from mapdet.engine.evaluate import evaluate_model, model_from_checkpoint
from mapdet.engine.train import train

log = logging.getLogger("map_study")

#: The sweep: (normalization, lr, min_step, memory). ``l1`` (the recipe's normalization) over
#: a decade and a half of rates below the softmax stage's 1e-3; the unnormalised gradient at
#: 1e-5; ``min_step`` 1e-2 and an AP memory of 20 at the middle rate.
SWEEP = [
    ("l1", 1e-5, 1e-3, 0), ("l1", 3e-5, 1e-3, 0), ("l1", 1e-4, 1e-3, 0), ("l1", 3e-4, 1e-3, 0),
    ("none", 1e-5, 1e-3, 0), ("l1", 1e-4, 1e-2, 0), ("l1", 1e-4, 1e-3, 20),
]
#: The softmax continuations at the same budget are the ``controls`` step's.


def _versions() -> dict:
    """The versions that decide the benchmark's numbers: the digits and Selective Search
    proposals (numpy, OpenCV) and the training (torch, torchvision, numba)."""
    import cv2
    import numba
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__, "numba": numba.__version__}


class Study:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        paths = [f"data.root={self.work / 'data'}", f"proposals.cache_dir={self.work / 'cache'}",
                 "train.checkpoint_every=0", "output.tensorboard=false"]
        self.cfg = default_config([*paths, *args.set])
        set_threads(self.cfg.train.threads)
        self.sets = {s: build_dataset(self.cfg, s) for s in ("train", "test")}
        self.props = {s: build_proposals(self.cfg, d, s, progress=False)
                      for s, d in self.sets.items()}
        self._eval_cache: dict[str, dict] = {}

    @property
    def base(self) -> Path:
        return Path(self.args.base) if self.args.base else self.work / "baseline"

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, checkpoint: Path, splits: tuple[str, ...] = ("train", "test")) -> dict:
        """Train and test mAP (VOC07 and area) of a checkpoint: the whole test split, and the
        whole train split or its first ``--train-eval-images`` images (a fixed subset);
        ``splits``: only those."""
        key = f"{checkpoint}|{self.args.train_eval_images}|{','.join(splits)}"
        disk = self.work / "eval_cache.json"  # shared by the study's processes
        if key not in self._eval_cache and disk.is_file():
            found = json.loads(disk.read_text()).get(key)
            if found and found.get("mtime") == Path(checkpoint).stat().st_mtime:
                self._eval_cache[key] = found["row"]
        if key not in self._eval_cache:
            model, _, _ = model_from_checkpoint(checkpoint, self.cfg.copy())
            row = {}
            for split in splits:
                t0 = time.perf_counter()
                n = self.args.train_eval_images if split == "train" else 0
                cfg = apply_overrides(self.cfg, [f"eval.max_images={n}"])
                rep = evaluate_model(model, cfg, split=split, dataset=self.sets[split],
                                     proposals=self.props[split], progress=False)
                row[f"{split}_voc07"] = rep.results["voc07"].mAP
                row[f"{split}_area"] = rep.results["area"].mAP
                row[f"{split}_eval_seconds"] = time.perf_counter() - t0
            self._eval_cache[key] = row
            from mapdet.io import atomic_write_text

            cache = json.loads(disk.read_text()) if disk.is_file() else {}
            cache[key] = {"mtime": Path(checkpoint).stat().st_mtime, "row": row}
            atomic_write_text(disk, json.dumps(cache) + "\n")
        return dict(self._eval_cache[key])

    # -- one stage ---------------------------------------------------------------------------
    def stage(self, name: str, overrides: list[str], *, seed: int = 0,
              iterations: int | None = None, eval_every: int | None = None) -> dict:
        """Trains one run and evaluates its curve. From the base checkpoint at a constant
        rate (no warm-up, no steps); with ``--from-start``, from the config's initial
        weights with the config's own schedule (warm-up and steps), like the baseline."""
        iterations = iterations or self.args.iterations
        eval_every = eval_every or self.args.eval_every
        start = [] if self.args.from_start else [
            f"train.init_from={self.base_checkpoint()}", "train.lr_steps=[]",
            "train.warmup_iterations=0"]
        cfg = apply_overrides(self.cfg, [
            *start, f"train.iterations={iterations}", f"train.seed={seed}",
            f"train.checkpoint_every={eval_every}", "train.keep_checkpoints=0",  # the curve
            "train.log_every=10", *overrides,
        ]).validate()
        run = self.work / "runs" / name
        t0 = time.perf_counter()
        if ckpt.checkpoint_path(run / "checkpoints", iterations).is_file():
            log.info("%s: already trained, evaluating only", name)  # an interrupted study
            spi = float(np.median([json.loads(x)["sec_per_iter"] for x in
                                   (run / "metrics.jsonl").read_text().splitlines()]))
        else:
            spi = train(cfg, out=run, progress=False).sec_per_iter
        seconds = time.perf_counter() - t0
        curve = [] if self.args.from_start else [
            {"iteration": 0, **self.evaluate(self.base_checkpoint())}]
        for it, path in ckpt.list_checkpoints(run / "checkpoints"):
            last = it == iterations or not self.args.curve_test_only
            curve.append({"iteration": it, **self.evaluate(
                path, ("train", "test") if last else ("test",))})
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        batch_map = [r["mAP"] for r in rows if "mAP" in r and r["mAP"] is not None]
        tail = batch_map[-max(1, len(batch_map) // 4):]
        out = {"name": name, "overrides": overrides, "seed": seed, "iterations": iterations,
               "lr": cfg.stage_lr(), "loss": cfg.train.loss, "curve": curve,
               "final": curve[-1], "sec_per_iter": spi, "train_seconds": seconds,
               "minibatch_mAP_last_quarter": float(np.mean(tail)) if tail else None}
        log.info("%s: %s", name, json.dumps(out["final"]))
        return out

    def base_checkpoint(self) -> Path:
        found = self.base if self.base.suffix == ".pt" else ckpt.find_last_checkpoint(self.base)
        if found is None:
            sys.exit(f"no baseline checkpoint in {self.base}: run the 'baseline' step first")
        return found

    def write(self, name: str, payload: dict) -> Path:
        from mapdet.io import atomic_write_text

        payload = {**payload, "machine": {"platform": platform.platform(),
                                          **_versions(), "note": self.args.note}}
        path = self.out / f"{name}.json"
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        log.info("wrote %s", path)
        return path


# -- steps -----------------------------------------------------------------------------------
def step_baseline(s: Study) -> None:
    t0 = time.perf_counter()
    res = train(apply_overrides(s.cfg, ["train.checkpoint_every=0"]), out=s.work / "baseline",
                progress=False)
    s.write("baseline", {"checkpoint": str(res.checkpoint), "iterations": res.iterations,
                         "seconds": time.perf_counter() - t0, **s.evaluate(res.checkpoint)})


def step_scale(s: Study) -> None:
    """Gradient size at the baseline, per normalization and min_step, against the softmax
    loss's: L1 norm and largest entry of d loss / d probs, the share of the L1 mass in the
    largest 1% of entries, and the parameters' gradient norm."""
    from mapdet import MAPLoss
    from mapdet.engine.data_loading import make_train_loader
    from mapdet.engine.distributed import RankOrder
    from mapdet.engine.schedule import DataOrder
    from mapdet.engine.steps import map_loss, softmax_loss

    cfg = apply_overrides(s.cfg, ["loss.box_loss_weight=0"]).validate()
    model, _, _ = model_from_checkpoint(s.base_checkpoint(), cfg.copy())
    model.train()
    order = DataOrder(len(s.sets["train"]), cfg.train.images_per_batch, 0, False)
    batches = list(make_train_loader(s.sets["train"], s.props["train"], cfg,
                                     RankOrder(order, 0, 1), 0, s.args.scale_batches))

    def param_norm() -> float:
        g = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        return float(torch.cat(g).norm()) if g else 0.0

    rows = []
    gens = lambda it: [torch.Generator().manual_seed(1000 * it + b)  # noqa: E731
                       for b in range(cfg.train.images_per_batch)]
    soft = []
    for it, batch in enumerate(batches):
        model.zero_grad()
        loss, _ = softmax_loss(model, batch, cfg, gens(it))
        loss.backward()
        soft.append(param_norm())
    rows.append({"loss": "softmax (cls + box)", "param_grad_norm": float(np.mean(soft))})
    for min_step in (1e-3, 1e-2, 1e-1):
        for norm in ("none", "nonzero", "per_class", "l1"):
            crit = MAPLoss(min_step=min_step, normalization=norm)
            seen: list[torch.Tensor] = []
            orig = crit.forward

            def hooked(probs, *a, _orig=orig, _seen=seen):
                probs.register_hook(lambda grad: _seen.append(grad.detach().clone()))
                return _orig(probs, *a)

            crit.forward = hooked
            stats = {"l1": [], "max": [], "top1pct": [], "param": [], "nonzero": []}
            for it, batch in enumerate(batches):
                model.zero_grad()
                loss, _ = map_loss(model, batch, cfg, crit, gens(it))
                loss.backward()
                g = seen[-1].abs().flatten().numpy()
                l1 = float(g.sum())
                top = np.sort(g)[::-1][: max(1, g.size // 100)].sum()
                stats["l1"].append(l1)
                stats["max"].append(float(g.max()) if g.size else 0.0)
                stats["top1pct"].append(float(top / l1) if l1 > 0 else math.nan)
                stats["param"].append(param_norm())
                stats["nonzero"].append(float((seen[-1] != 0).any(dim=1).sum()))
            rows.append({"loss": "map", "normalization": norm, "min_step": min_step,
                         "dprobs_l1": float(np.mean(stats["l1"])),
                         "dprobs_max": float(np.mean(stats["max"])),
                         "share_of_l1_in_top_1pct": float(np.nanmean(stats["top1pct"])),
                         "windows_with_nonzero_partial": float(np.mean(stats["nonzero"])),
                         "param_grad_norm": float(np.mean(stats["param"]))})
            log.info("scale %s", rows[-1])
    s.write("scale", {"batches": len(batches), "rows": rows,
                      "windows_per_batch": float(np.mean([sum(len(x.proposals)
                                                              for x in b.samples)
                                                          for b in batches]))})


def _sweep_name(norm: str, lr: float, mu: float, memory: int) -> str:
    return f"sweep_{norm}_lr{lr:g}_mu{mu:g}" + (f"_memory{memory}" if memory else "")


def _runs_on_disk(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.is_file() else {}


def step_sweep(s: Study) -> None:
    """The :data:`SWEEP` grid (``--only NAME...``: some of it). Runs already in sweep.json are
    kept; each write merges with the file on disk, so two processes can share the grid."""
    path = s.out / "sweep.json"
    names = [_sweep_name(*row) for row in SWEEP]
    for (norm, lr, mu, memory), name in zip(SWEEP, names, strict=True):
        if (s.args.only and name not in s.args.only) or name in _runs_on_disk(path):
            continue
        r = s.stage(name, ["train.loss=map", f"loss.normalization={norm}", f"loss.lr={lr}",
                           f"loss.min_step={mu}", f"loss.memory={memory}"])
        done = {**_runs_on_disk(path), name: r}
        runs = [done[n] for n in names if n in done] + [v for k, v in done.items()
                                                         if k not in names]
        s.write("sweep", {"runs": runs, "protocol": _protocol(s)})


def step_controls(s: Study) -> None:
    arms = {
        "map_recipe": ["train.loss=map", f"loss.lr={s.args.map_lr}", *s.args.map_set],
        "softmax_at_map_lr": ["train.loss=softmax", f"train.lr={s.args.map_lr}"],
        "softmax_at_best": ["train.loss=softmax", f"train.lr={s.args.softmax_lr}"],
        **{f"softmax_lr{lr:g}": ["train.loss=softmax", f"train.lr={lr}"]
           for lr in s.args.softmax_extra},
    }
    path = s.out / "controls.json"
    out = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    out.update({"protocol": _protocol(s), "seeds": s.args.seeds})
    for arm, ov in arms.items():
        if s.args.arms and arm not in s.args.arms:
            continue
        runs = [s.stage(f"control_{arm}_seed{seed}", ov, seed=seed,
                        eval_every=s.args.iterations) for seed in s.args.seeds]
        summary = {}
        for key in ("train_voc07", "test_voc07", "train_area", "test_area"):
            v = np.array([r["final"][key] for r in runs])
            summary[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1))
                            if len(v) > 1 else None, "values": v.tolist()}
        if path.is_file():  # arms another process wrote meanwhile (``--arms`` splits the work)
            out["arms"] = json.loads(path.read_text())["arms"]
        out["arms"][arm] = {"overrides": ov, "summary": summary, "runs": runs}
        s.write("controls", out)


def step_ablations(s: Study) -> None:
    """Variants of the ``--map-set`` setting (the mAP stage's recipe plus ``--map-lr``), one
    change each. Memory 0 is the setting itself; ``--only NAME...`` runs some of the variants
    (each write merges with ablations.json on disk, so two processes can share them)."""
    variants = {
        "setting (memory 0, NMS in the loss, nearest improvement, 1 - mAP)": [],
        "no_nms_in_loss": ["loss.nms_iou=1.0"],  # IoU > 1 never holds: AP without NMS
        "nearest_change": ["loss.direction=nearest_change"],
        "both_summed": ["loss.direction=both_summed"],
        "neg_log": ["loss.form=neg_log"],
        "memory5": ["loss.memory=5"],
        "memory20": ["loss.memory=20"],
    }
    path = s.out / "ablations.json"
    sweep = _runs_on_disk(s.out / "sweep.json")
    # the setting and memory 20 are sweep runs when the setting is the sweep's l1 at map_lr
    same = {"setting": _sweep_name("l1", s.args.map_lr, 1e-3, 0),
            "memory20": _sweep_name("l1", s.args.map_lr, 1e-3, 20)} if not s.args.map_set else {}
    for name, ov in variants.items():
        slug = name.split(" ")[0]
        if s.args.only and slug not in s.args.only:
            continue
        if same.get(slug) in sweep and sweep[same[slug]]["iterations"] == s.args.iterations:
            r = {**sweep[same[slug]], "from": "sweep.json"}
        else:
            r = s.stage(f"ablation_{slug}", ["train.loss=map", f"loss.lr={s.args.map_lr}",
                                             *s.args.map_set, *ov], eval_every=s.args.iterations)
        out = json.loads(path.read_text()) if path.is_file() else {"variants": {}}
        out.update({"protocol": _protocol(s), "map_set": [f"loss.lr={s.args.map_lr}",
                                                          *s.args.map_set]})
        out["variants"][name] = r
        out["variants"] = {k: out["variants"][k] for k in variants if k in out["variants"]}
        s.write("ablations", out)


#: The mechanisms' screen (``screen`` step): name -> overrides of one continuation. Every
#: entry starts from the same base and trains ``--iterations`` iterations; rates are the
#: stage's (``train.lr`` for softmax, the ranking losses and the mixture, ``loss.lr`` for the
#: mAP losses).
def _map(lr, *ov):
    return ["train.loss=map", f"loss.lr={lr}", "loss.normalization=l1", *ov]


SCREEN = {
    # the converged baseline: softmax from the baseline, the rate divided by 10 at 3/4
    **{f"converge_lr{lr:g}": ["train.loss=softmax", f"train.lr={lr}", "train.lr_steps=[4500]"]
       for lr in (3e-3, 1e-2)},
    **{f"softmax_lr{lr:g}": ["train.loss=softmax", f"train.lr={lr}"]
       for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
    **{f"map_lr{lr:g}": _map(lr) for lr in (1e-5, 1e-4)},
    **{f"map_mu{mu:g}_lr{lr:g}": _map(lr, f"loss.min_step={mu}")
       for mu in (0.1, 0.3, 1.0, 1000.0) for lr in (1e-4, 1e-3)},
    **{f"nearest_change_lr{lr:g}": _map(lr, "loss.direction=nearest_change")
       for lr in (1e-4, 1e-3)},
    **{f"smooth_avg_s{sig:g}_k{k}_lr{lr:g}": _map(lr, "loss.smoothing=average",
                                                  f"loss.sigma={sig}", f"loss.samples={k}")
       for sig in (0.01, 0.03) for k in (4,) for lr in (1e-4, 1e-3)},
    **{f"perturbed_s{sig:g}_k{k}_lr{lr:g}": _map(lr, "loss.smoothing=perturbed",
                                                 f"loss.sigma={sig}", f"loss.samples={k}")
       for sig in (0.01, 0.03, 0.1) for k in (8, 32) for lr in (1e-4, 3e-4, 1e-3)},
    **{f"ap_loss_nms_lr{lr:g}": ["train.loss=ap_loss_nms", f"loss.lr={lr}"]
       for lr in (1e-4, 1e-3, 3e-3)},
    **{f"ap_loss_lr{lr:g}": ["train.loss=ap_loss", f"train.lr={lr}"]
       for lr in (1e-4, 1e-3, 3e-3)},
    **{f"rank_sort_lr{lr:g}": ["train.loss=rank_sort", f"train.lr={lr}"]
       for lr in (1e-4, 1e-3, 3e-3)},
    **{f"mixed_w{w:g}": ["train.loss=softmax_map", "train.lr=0.001", f"loss.map_loss_weight={w}"]
       for w in (0.1, 0.3, 1.0, 3.0)},
    **{f"map_adam_lr{lr:g}": _map(lr, "train.optimizer=adam") for lr in (1e-6, 3e-6, 1e-5, 1e-4)},
    **{f"map_adamw_lr{lr:g}": _map(lr, "train.optimizer=adamw") for lr in (1e-6, 1e-5)},
    # for --from-start: the config's own recipe (its rate 0.02, warm-up and step)
    "start_softmax": ["train.loss=softmax"],
    **{f"start_mixed_w{w:g}": ["train.loss=softmax_map", f"loss.map_loss_weight={w}"]
       for w in (0.1, 1.0)},
    # clipping at 1.5, the median gradient norm of the exact rule from the converged base
    # (its 90th percentile is 10, softmax's 2.8: experiments/map_study_replicate/grad_norms.json)
    **{f"map_clip1.5_lr{lr:g}": _map(lr, "train.clip_grad_norm=1.5") for lr in (1e-4, 3e-4, 1e-3)},
    **{f"map_clip{c:g}_lr{lr:g}": _map(lr, f"train.clip_grad_norm={c}")
       for c in (0.5, 3.0) for lr in (1e-4,)},
    # the same clipping for softmax (its median norm is 2.2): is it the clip alone?
    **{f"softmax_clip1.5_lr{lr:g}": ["train.loss=softmax", f"train.lr={lr}",
                                     "train.clip_grad_norm=1.5"] for lr in (1e-3,)},
}


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("train_voc07", "test_voc07", "train_area", "test_area"):
        v = np.array([r["final"][key] for r in runs])
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                    "values": v.tolist()}
    return out


def step_screen(s: Study) -> None:
    """The :data:`SCREEN` entries named by ``--only`` (all when empty), each on ``--seeds``,
    into ``<--table>.json``: one object per entry with its runs (curves) and the summary over
    the seeds run so far. Runs already in the file are kept (an interrupted screen resumes;
    two processes can share a table)."""
    path = s.out / f"{s.args.table}.json"
    unknown = [n for n in s.args.only if n not in SCREEN]
    if unknown:
        sys.exit(f"unknown screen entries {unknown}; known: {sorted(SCREEN)}")
    for name in s.args.only or list(SCREEN):
        for seed in s.args.seeds:
            entries = json.loads(path.read_text())["entries"] if path.is_file() else {}
            key = f"seed{seed}"
            if key in entries.get(name, {}).get("runs", {}):
                continue
            r = s.stage(f"{s.args.table}_{name}_seed{seed}", SCREEN[name], seed=seed)
            entries = json.loads(path.read_text())["entries"] if path.is_file() else {}
            e = entries.setdefault(name, {"overrides": SCREEN[name], "runs": {}})
            e["runs"][key] = r
            e["summary"] = _summary(list(e["runs"].values()))
            s.write(s.args.table, {"entries": entries, "protocol": _protocol(s)})


def _protocol(s: Study) -> dict:
    return {"base": str(s.base_checkpoint()), "from_start": s.args.from_start,
            "iterations": s.args.iterations,
            "eval_every": s.args.eval_every, "set": s.args.set,
            "train_images": len(s.sets["train"]), "test_images": len(s.sets["test"]),
            "train_eval_images": s.args.train_eval_images or len(s.sets["train"]),
            "baseline": s.evaluate(s.base_checkpoint())}


def report(out_dir: Path) -> str:
    """docs/study.md's tables (markdown) from the JSON files in ``out_dir``; mAP in percent."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def load(name):
        path = out_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    lines = []
    scale = load("scale")
    if scale:
        lines += [f"Gradient size at the baseline ({scale['batches']} minibatches, "
                  f"{scale['windows_per_batch']:.0f} windows each):", "",
                  "| loss | normalization | min_step | windows with a nonzero partial | "
                  "L1 of d loss/d probs | parameter-gradient norm |", "|---|---|---|---|---|---|"]
        for r in scale["rows"]:
            if r["loss"] != "map":
                lines.append(f"| {r['loss']} | | | | | {r['param_grad_norm']:.2f} |")
                continue
            lines.append(f"| 1 - mAP | {r['normalization']} | {r['min_step']:g} | "
                         f"{r['windows_with_nonzero_partial']:.1f} | {r['dprobs_l1']:.2f} | "
                         f"{r['param_grad_norm']:.2f} |")
        lines.append("")
    sweep = load("sweep")
    if sweep:
        b = sweep["protocol"]["baseline"]
        pr = sweep["protocol"]
        pts = ", ".join(map(str, range(0, pr["iterations"] + 1, pr["eval_every"])))
        ntr = pr.get("train_eval_images", pr["train_images"])
        which = ("the whole train split" if ntr >= pr["train_images"] else
                 f"the first {ntr} of {pr['train_images']} train images")
        lines += [f"Sweep (seed 0; VOC07 mAP of {which} / the whole test split after "
                  f"{pts} iterations; minibatch AP over the last quarter of the "
                  "iterations):", "",
                  "| normalization | lr | min_step | memory | train mAP | test mAP | "
                  "minibatch AP |", "|---|---|---|---|---|---|---|"]
        for r in sweep["runs"]:
            ov = dict(o.split("=", 1) for o in r["overrides"])
            tr = " -> ".join(pct(c["train_voc07"]) for c in r["curve"])
            te = " -> ".join(pct(c["test_voc07"]) for c in r["curve"])
            lines.append(f"| {ov['loss.normalization']} | {ov['loss.lr']} | "
                         f"{ov['loss.min_step']} | {ov.get('loss.memory', '0')} | {tr} | {te} | "
                         f"{pct(r['minibatch_mAP_last_quarter'])} |")
        lines += ["", f"Baseline: train {pct(b['train_voc07'])}, test {pct(b['test_voc07'])} "
                  f"VOC07 mAP ({pct(b['train_area'])} / {pct(b['test_area'])} area).", ""]
    controls = load("controls")
    if controls:
        lines += ["Equal budget, seeds " + ", ".join(map(str, controls["seeds"])) +
                  " (mean +- sample std; VOC07 and area mAP):", "",
                  f"| continuation ({controls['protocol']['iterations']} it.) | train VOC07 | "
                  "test VOC07 | test area |",
                  "|---|---|---|---|"]
        for arm, a in controls["arms"].items():
            sm = a["summary"]
            cells = [f"{100 * sm[k]['mean']:.2f} +- {100 * (sm[k]['std'] or 0):.2f}"
                     for k in ("train_voc07", "test_voc07", "test_area")]
            lines.append(f"| {arm}: {' '.join(a['overrides'])} | " + " | ".join(cells) + " |")
        lines.append("")
    abl = load("ablations")
    if abl:
        lines += [f"Ablations (seed 0, {abl['protocol']['iterations']} it., one change each to "
                  f"{' '.join(abl['map_set'])}):", "",
                  "| variant | train VOC07 | test VOC07 | test area |", "|---|---|---|---|"]
        for name, r in abl["variants"].items():
            f = r["final"]
            lines.append(f"| {name} | {pct(f['train_voc07'])} | {pct(f['test_voc07'])} | "
                         f"{pct(f['test_area'])} |")
    return "\n".join(lines)


def report_table(out_dir: Path, table: str, bar: str | None = None,
                 min_seeds: int = 1) -> str:
    """A markdown table of ``<table>.json`` (the ``screen`` step): per entry with at least
    ``min_seeds`` seeds, the seeds run, train and test VOC07 mAP (mean +- sample std over the
    seeds, or the one value), the change from the base, and the median seconds per iteration
    (shared machine: not a benchmark). With ``bar`` (an entry's name): the difference of the
    means from the bar's, marked ``**`` where it exceeds 2 standard deviations (the larger of
    the two entries' sample stds), and Welch's t of the difference, ``d / sqrt(s1^2 / n1 +
    s2^2 / n2)`` (a difference of means against its standard error; both need 2 seeds)."""
    data = json.loads((out_dir / f"{table}.json").read_text())
    bar_sm = data["entries"][bar]["summary"] if bar else None

    def vs_bar(sm, key):
        d = 100 * (sm[key]["mean"] - bar_sm[key]["mean"])
        sd = [x for x in (sm[key]["std"], bar_sm[key]["std"]) if x is not None]
        mark = "**" if len(sd) == 2 and abs(d) > 2 * 100 * max(sd) else ""
        if len(sd) < 2:
            return f"{mark}{d:+.2f}{mark}"
        n1, n2 = len(sm[key]["values"]), len(bar_sm[key]["values"])
        se = 100 * math.sqrt(sd[0] ** 2 / n1 + sd[1] ** 2 / n2)
        t = f" (t {d / se:+.1f})" if se > 0 else ""
        return f"{mark}{d:+.2f}{mark}{t}"
    pr, b = data["protocol"], data["protocol"]["baseline"]

    def cell(sm, key):
        m, sd = 100 * sm[key]["mean"], sm[key]["std"]
        return f"{m:.2f} +- {100 * sd:.2f}" if sd is not None else f"{m:.2f}"

    base = Path(pr["base"]).parent.parent.name
    start = (f"from the config's initial weights (reference: `{base}`, "
             if pr.get("from_start") else f"from `{base}` (")
    lines = [f"`{table}`: {pr['iterations']} iterations {start}"
             f"train {100 * b['train_voc07']:.2f}, test {100 * b['test_voc07']:.2f} VOC07); "
             f"train mAP on {pr['train_eval_images']} of {pr['train_images']} train images, "
             f"test on {pr['test_images']}.", "",
             "| entry | overrides | seeds | train VOC07 | test VOC07 | d train | d test | "
             + (f"train vs {bar} | test vs {bar} | " if bar else "") + "s/it |",
             "|---|---|---|---|---|---|---|" + ("---|---|" if bar else "") + "---|"]
    for name, e in data["entries"].items():
        sm = e["summary"]
        runs = list(e["runs"].values())
        if len(runs) < min_seeds:
            continue
        spi = float(np.median([r["sec_per_iter"] for r in runs]))
        lines.append(
            f"| {name} | `{' '.join(e['overrides'])}` | {len(runs)} | "
            f"{cell(sm, 'train_voc07')} | {cell(sm, 'test_voc07')} | "
            f"{100 * (sm['train_voc07']['mean'] - b['train_voc07']):+.2f} | "
            f"{100 * (sm['test_voc07']['mean'] - b['test_voc07']):+.2f} | "
            + (f"{vs_bar(sm, 'train_voc07')} | {vs_bar(sm, 'test_voc07')} | " if bar else "")
            + f"{spi:.2f} |")
    return "\n".join(lines)


def plot_table(out_dir: Path, table: str, png: Path, only: list[str]) -> Path:
    """Test VOC07 mAP against iterations (seed 0 of each entry, or of ``only``) and the
    final train and test mAP of every run, from ``<table>.json``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = json.loads((out_dir / f"{table}.json").read_text())
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for name, e in data["entries"].items():
        if only and name not in only:
            continue
        r = e["runs"].get("seed0") or next(iter(e["runs"].values()))
        its = [c["iteration"] for c in r["curve"]]
        line, = ax.plot(its, [100 * c["test_voc07"] for c in r["curve"]], marker=".",
                        label=name)
        for run in e["runs"].values():
            bx.scatter(100 * run["final"]["train_voc07"], 100 * run["final"]["test_voc07"],
                       color=line.get_color(), s=14)
    b = data["protocol"]["baseline"]
    bx.scatter(100 * b["train_voc07"], 100 * b["test_voc07"], marker="x", color="k",
               label="base")
    ax.set_xlabel("iterations from the base")
    ax.set_ylabel("test VOC07 mAP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=2)
    bx.set_xlabel("train VOC07 mAP (%), whole split")
    bx.set_ylabel("test VOC07 mAP (%)")
    bx.set_title("final, every seed")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    return png


def plot(out_dir: Path) -> Path:
    """``sweep_curves.png`` in ``out_dir``: train and test VOC07 mAP against iterations for
    every sweep run (and the equal-budget controls' seed-0 runs when controls.json has
    curves), from the JSON files alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = json.loads((out_dir / "sweep.json").read_text())
    runs, pr = sweep["runs"], sweep["protocol"]
    ntr = pr.get("train_eval_images", pr["train_images"])
    names = {"train": "train split" if ntr >= pr["train_images"] else
             f"train split, first {ntr} of {pr['train_images']} images",
             "test": f"test split, {pr['test_images']} images"}
    controls = out_dir / "controls.json"
    if controls.is_file():
        for arm, a in json.loads(controls.read_text())["arms"].items():
            runs += [{**r, "name": f"control_{arm}"} for r in a["runs"][:1]
                     if len(r["curve"]) > 2]
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, split in zip(axes, ("train", "test"), strict=True):
        for r in runs:
            its = [c["iteration"] for c in r["curve"]]
            ax.plot(its, [100 * c[f"{split}_voc07"] for c in r["curve"]], marker="o",
                    label=r["name"].removeprefix("sweep_"))
        ax.set_xlabel("iterations from the softmax baseline")
        ax.set_ylabel("VOC07 mAP (%)")
        ax.set_title(names[split])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out_dir / "sweep_curves.png"
    fig.savefig(path, dpi=90)
    return path


STEPS = {"baseline": step_baseline, "scale": step_scale, "sweep": step_sweep,
         "controls": step_controls, "ablations": step_ablations, "screen": step_screen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=[*STEPS, "report", "plot", "report-table", "plot-table"])
    p.add_argument("--png", default="docs/img/study.png", help="plot-table: the image")
    p.add_argument("--bar", default=None, help="report-table: the entry to compare with")
    p.add_argument("--min-seeds", type=int, default=1,
                   help="report-table: only entries with at least this many seeds")
    p.add_argument("--work", default="runs/map_study", help="folder for data, proposals and runs")
    p.add_argument("--out", default="experiments/map_study", help="folder for the JSON files")
    p.add_argument("--base", default=None, help="baseline checkpoint or run directory")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--scale-batches", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--map-set", nargs="*", default=[],
                   help="more overrides of the mAP arm (default: the config's recipe)")
    p.add_argument("--map-lr", type=float, default=1e-2,
                   help="the mAP arm's lr (loss.lr), and the softmax control's at that rate")
    p.add_argument("--softmax-lr", type=float, default=1e-3,
                   help="the softmax continuation's best lr (from the sweep)")
    p.add_argument("--softmax-extra", type=float, nargs="*", default=[],
                   help="controls: more softmax arms at these learning rates")
    p.add_argument("--arms", nargs="*", default=[],
                   help="controls: run only these arms (the others kept from controls.json)")
    p.add_argument("--train-eval-images", type=int, default=0,
                   help="train mAP on the first N train images (0: the whole split)")
    p.add_argument("--only", nargs="*", default=[],
                   help="sweep, ablations: run only these (sweep names as in sweep.json; "
                        "ablation names as in ablations.json, first word)")
    p.add_argument("--curve-test-only", action="store_true",
                   help="evaluate the intermediate checkpoints on the test split only")
    p.add_argument("--table", default="screen",
                   help="screen: the JSON file's name (without .json) and the runs' prefix")
    p.add_argument("--note", default="", help="machine note stored in the JSON")
    p.add_argument("--from-start", action="store_true",
                   help="screen: train each entry from the config's initial weights with its "
                        "own schedule instead of continuing the base (which is then only the "
                        "table's reference row)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mapdet").setLevel(logging.WARNING)
    if args.step == "report":
        print(report(Path(args.out)))
        return 0
    if args.step == "plot":
        print(plot(Path(args.out)))
        return 0
    if args.step == "report-table":
        print(report_table(Path(args.out), args.table, args.bar, args.min_seeds))
        return 0
    if args.step == "plot-table":
        print(plot_table(Path(args.out), args.table, Path(args.png), args.only))
        return 0
    STEPS[args.step](Study(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
