"""The ``mapdet`` command line: train, eval, detect, proposals, demo.

Errors caused by bad input (a config typo, a missing file, a malformed annotation, an
unreadable checkpoint) end as one line ``mapdet: error: ...`` on stderr with exit code 2;
``--debug`` shows the traceback instead. A diverged training run, or a rank of a DDP job
whose peer died, exits with code 1; a run stopped by SIGINT or SIGTERM saves a checkpoint
first and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

log = logging.getLogger("mapdet.cli")

EXAMPLES = """\
examples:
  mapdet demo --quick                          # the embedded benchmark, about 2 minutes
  mapdet train configs/digits.yaml train.iterations=500 --out runs/softmax
  mapdet train configs/voc07_vgg16_map.yaml train.init_from=runs/voc07_softmax/checkpoints
  mapdet train configs/digits.yaml --out runs/softmax --resume
  mapdet eval configs/digits.yaml --checkpoint runs/softmax --out runs/softmax/eval
  mapdet eval --voc VOCdevkit --split test --results results/ --metric voc07 --out metrics.json
  mapdet detect img1.jpg img2.jpg --checkpoint runs/softmax --out detections/
  mapdet proposals configs/voc07_vgg16_softmax.yaml
"""


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mapdet`` command."""
    parser = argparse.ArgumentParser(
        prog="mapdet",
        description="Train Fast R-CNN object detectors directly for mean average precision "
        "(Henderson & Ferrari, ACCV 2016), evaluate them with VOC-devkit-compatible AP, and "
        "run the embedded digits benchmark.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from mapdet import __version__

    parser.add_argument("--version", action="version", version=f"mapdet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train", help="train a detector (softmax or mAP loss)",
        description="Train Fast R-CNN with the loss of train.loss (softmax | map). The resolved "
        "config, a log, metrics.jsonl, TensorBoard events and checkpoints go to the run "
        "directory (--out, else output.dir/output.name).",
        epilog="overrides are section.key=value with YAML values, e.g. train.lr=0.001 "
        "train.lr_steps=[30000] model.backbone=vgg16 data.digits.num_train=100",
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from CKPT, or from the latest checkpoint of --out (the "
                   "run's settings are kept: overrides that would change it are refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --out, deleting the earlier run's outputs "
                   "there (without it, a non-empty --out is refused)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    _add_common(p)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint, or score devkit result files",
        description="Two modes. (1) CONFIG --checkpoint CKPT: run the detector on the test "
        "split and score it. (2) --voc ROOT --results DIR: score VOC devkit result files "
        "(comp4_det_<split>_<class>.txt) against the annotations, no images needed.",
    )
    p.add_argument("config", nargs="?", help="YAML config (mode 1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (mode 1)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test_split "
                   "in mode 1, test in mode 2)")
    p.add_argument("--voc", type=Path, metavar="ROOT", help="VOC root (mode 2)")
    p.add_argument("--year", default="2007", help="VOC year under ROOT (mode 2, default 2007)")
    p.add_argument("--results", type=Path, metavar="DIR", help="devkit result files (mode 2)")
    p.add_argument("--metric", choices=("voc07", "area"), default=None,
                   help="AP definition (mode 2 default: voc07 for 2007, else area)")
    p.add_argument("--continuous", action="store_true",
                   help="mode 2: score with continuous boxes and IoU >= 0.5 instead of the "
                   "devkit's exact arithmetic (1-based pixels, +1 widths, IoU > 0.5)")
    p.add_argument("--no-cache", action="store_true",
                   help="mode 2: parse the annotations without the annotation cache "
                   "($MAPDET_CACHE_DIR or ~/.cache/mapdet; checked by file size and mtime)")
    p.add_argument("--classes", metavar="NAMES|RUN",
                   help="mode 2: the data set's class names, comma-separated (crack,pothole), "
                   "or a run directory / config.yaml whose data.classes to use (default: the "
                   "20 VOC classes)")
    p.add_argument("--out", type=Path, help="mode 1: output directory; mode 2: metrics.json path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier mapdet run in --out (without it, "
                   "existing outputs are refused; files mapdet did not write are never replaced)")
    p.add_argument("--blame", nargs="?", type=_positive_int, const=20, default=0, metavar="K",
                   help="also name the K detections (default 20) whose score change would "
                   "raise the test AP most, from the pseudo-partials of every detection "
                   "(mapdet.ap_blame); written to blame.json and blame.txt beside "
                   "metrics.json, the first 10 printed")
    _add_common(p)

    p = sub.add_parser(
        "detect", help="detect objects in images and draw them",
        description="Run a trained detector on image files; proposals are computed with the "
        "checkpoint's proposal method; boxes are drawn to <out>/<stem>.png (img_2.png etc. when "
        "two images share a name) and listed in <out>/detections.json.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--out", type=Path, default=Path("detections"), help="output directory")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="draw detections above this score (default 0.5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier mapdet run in --out (without it, "
                   "existing outputs are refused; an input image and files mapdet did not "
                   "write are never replaced)")
    _add_common(p)

    p = sub.add_parser(
        "proposals", help="compute and cache object proposals",
        description="Compute (or check) the proposals of the train and test splits of CONFIG's "
        "data set and cache them in proposals.cache_dir.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    _add_common(p)

    p = sub.add_parser(
        "demo", help="the embedded digits benchmark: softmax vs mAP training",
        description="Write the digits benchmark, compute proposals, train the softmax baseline, "
        "then from its checkpoint continue softmax training and fine-tune with the mAP loss "
        "for the same number of iterations; evaluate both and print a per-class table. "
        "About 10 minutes on 2 CPU cores (--quick: about 2).",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (tests)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--config", type=Path, default=None,
                   help="base config (default: configs/digits.yaml, shipped in the package)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _add_common(p)
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _cmd_train(args) -> int:
    from mapdet.config import ConfigError, load_config
    from mapdet.engine.evaluate import evaluate_checkpoint
    from mapdet.engine.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one")
    result = train(cfg, out=args.out, resume=args.resume, progress=not args.no_progress,
                   overwrite=args.overwrite)
    print(f"checkpoint: {result.checkpoint}")
    if math.isfinite(result.sec_per_iter):
        print(f"{result.sec_per_iter:.3f} s/iteration")
    else:
        print(f"no iterations trained: the checkpoint is at train.iterations={result.iterations}")
    if not args.no_eval and result.checkpoint is not None:
        report = evaluate_checkpoint(result.checkpoint, out=result.run_dir / "eval",
                                     progress=not args.no_progress, overwrite=True)
        print(report.table())
    return 0


def _cmd_eval(args) -> int:
    if args.voc is not None or args.results is not None:
        # scoring result files: numpy only, no torch (tests/test_cli_eval_files.py checks)
        if args.voc is None or args.results is None:
            raise _config_error("scoring result files needs both --voc ROOT and --results DIR")
        if args.config or args.checkpoint:
            raise _config_error("give either CONFIG --checkpoint CKPT or --voc/--results, "
                                "not both")
        from mapdet.evaluation.report import score_result_files

        report = score_result_files(args.voc, args.results, year=args.year,
                                    split=args.split or "test", metric=args.metric,
                                    devkit=not args.continuous, out=args.out,
                                    cache_dir=False if args.no_cache else None,
                                    class_names=_class_list(args.classes), blame=args.blame,
                                    overwrite=args.overwrite)
        print(report.table())
        _print_blame(report)
        return 0
    from mapdet.config import ConfigError

    if not args.checkpoint:
        raise ConfigError("mapdet eval needs --checkpoint CKPT (with an optional CONFIG), "
                          "or --voc ROOT --results DIR")
    from mapdet.engine.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, config=args.config, overrides=args.overrides,
                                 split=args.split, out=args.out, progress=not args.no_progress,
                                 blame=args.blame, overwrite=args.overwrite)
    print(report.table())
    _print_blame(report)
    return 0


def _print_blame(report, shown: int = 10) -> None:
    """The first ``shown`` blamed detections, and where all of them were written."""
    blame = report.blame
    if blame is None:
        return
    print()
    print(blame.table(limit=shown))
    if blame.files:
        print("all " + str(len(blame.entries)) + ": " + ", ".join(str(f) for f in blame.files))
    elif len(blame.entries) > shown:
        print(f"(--out keeps all {len(blame.entries)} in blame.json and blame.txt)")


def _config_error(message: str) -> Exception:
    from mapdet.config import ConfigError

    return ConfigError(message)


def _class_list(spec: str | None) -> tuple[str, ...] | None:
    """``--classes``: comma-separated names, or a run directory / YAML config whose
    ``data.classes`` is the list (the class list is saved with every run)."""
    if spec is None:
        return None
    from mapdet.config import ConfigError, config_from_dict, read_yaml_mapping

    path = Path(spec)
    if path.is_dir() or path.suffix in (".yaml", ".yml"):
        file = path / "config.yaml" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"--classes {spec}: no {file}")
        classes = config_from_dict(read_yaml_mapping(file)).data.classes
        if classes is None:
            raise ConfigError(f"--classes {spec}: {file} has no data.classes (the 20 VOC "
                              "classes); leave --classes out")
        return tuple(classes)
    names = tuple(n.strip() for n in spec.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"--classes {spec!r}: expected distinct comma-separated names")
    return names


def _cmd_detect(args) -> int:
    from mapdet.engine.evaluate import detect_images

    written = detect_images(args.images, args.checkpoint, out=args.out,
                            draw_threshold=args.score_threshold, overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def _cmd_proposals(args) -> int:
    from mapdet.config import load_config
    from mapdet.engine.builders import build_dataset, build_proposals

    cfg = load_config(args.config, args.overrides)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    for split in splits:
        dataset = build_dataset(cfg, split)
        props = build_proposals(cfg, dataset, split, progress=not args.no_progress)
        counts = [len(p) for p in props.values()] or [0]
        print(f"{split}: {len(props)} images, {sum(counts) / len(counts):.0f} proposals per "
              f"image on average (cache: {cfg.proposals.cache_dir})")
    return 0


def _cmd_demo(args) -> int:
    from mapdet.engine.demo import run_demo

    result = run_demo(out=args.out, quick=args.quick, config=args.config,
                      overrides=args.overrides, progress=not args.no_progress)
    print(result.table())
    print(f"results: {result.results_path}")
    return 0


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "detect": _cmd_detect,
             "proposals": _cmd_proposals, "demo": _cmd_demo}


#: Exception classes that mean bad input (reported in one line, exit code 2), by module. An
#: exception can only be an instance of a class whose module was imported, so only modules
#: already in ``sys.modules`` are looked at: reporting an error imports nothing (no torch
#: after ``mapdet eval --voc``).
_INPUT_ERRORS = (
    ("mapdet.config", "ConfigError"),
    ("mapdet.engine.checkpoint", "CheckpointError"),
    ("mapdet.data.base", "AnnotationError"),
    ("mapdet.models.backbones", "PretrainedWeightsUnavailableError"),
    ("mapdet.data.proposals", "ProposalFileError"),
)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported in one line, exit code 2)."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError,
                                         PermissionError, FileExistsError]
    for module, name in _INPUT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mapdet`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from mapdet.engine.logger import setup_logging

    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    setup_logging(level)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("mapdet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        interrupted = getattr(sys.modules.get("mapdet.engine.interrupt"), "TrainingInterrupted",
                              None)
        if interrupted is not None and isinstance(exc, interrupted):
            print(f"mapdet: {exc}", file=sys.stderr)
            return exc.exit_code
        if args.debug:
            raise
        stopped = tuple(c for c in (
            getattr(sys.modules.get("mapdet.engine.train"), "TrainingDiverged", None),
            getattr(sys.modules.get("mapdet.engine.interrupt"), "RankFailure", None)) if c)
        if isinstance(exc, stopped):
            _error(exc)
            return 1
        if isinstance(exc, _input_errors()) or isinstance(exc, (ValueError, KeyError, OSError)):
            _error(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
            return 2
        raise


def _error(message) -> None:
    """Print ``mapdet: error: <message>`` as one line on stderr."""
    text = " ".join(str(message).split("\n")).strip()
    print(f"mapdet: error: {text} (--debug shows the traceback)", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
