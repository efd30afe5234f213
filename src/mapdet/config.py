"""The typed configuration of a mapdet run: nested dataclasses, YAML in and out.

One :class:`Config` holds everything a run needs, in seven sections (``data``,
``proposals``, ``model``, ``train``, ``loss``, ``eval``, ``output``). It is built from a YAML
file plus ``section.key=value`` overrides (values parsed as YAML scalars, so
``train.lr=1e-3``, ``train.lr_steps=[30000]`` and ``model.pretrained=false`` all work)::

    cfg = load_config("configs/digits.yaml", ["train.lr=0.001", "model.backbone=vgg16"])
    cfg.save(run_dir / "config.yaml")

Unknown keys are errors that list the valid keys of the section and suggest the closest
(``difflib``); values of the wrong type are errors that name the key. This module imports
nothing else of mapdet but the leaf :mod:`mapdet.defaults` (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mapdet import defaults

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OutputConfig",
    "ProposalConfig",
    "TrainConfig",
    "MAP_STAGE_LR",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_yaml_mapping",
    "yaml_key_lines",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the problem.

    ``key``: the ``section.key`` at fault when known (given, or read from a message that
    starts with it), so that :func:`load_config` can say where it was set.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        if key is None:
            m = _KEY_AT_START.match(str(message))
            key = m.group(1) if m else None
        self.key = key


_KEY_AT_START = re.compile(r"^([A-Za-z_]\w*\.[A-Za-z_]\w*)(?:\[\d+\])?:")


#: The mAP stage's learning rate when ``loss.lr`` is null (the recipe; docs/method.md,
#: "The recommended mAP stage", and experiments/map_study.py, which measured it on the
#: digits benchmark at the demo's budget of 500 iterations: every rate of the ``l1`` sweep
#: from 3e-5 up lowered train and test mAP, 1e-5 left both where they were; so this is the
#: least harmful rate, not a gain). It does not derive from ``train.lr``: with
#: ``loss.normalization: l1`` the gradient has unit L1 norm, so the rate does not depend on
#: the softmax stage's choices or on the ties of a minibatch.
MAP_STAGE_LR = 1e-5
#: The losses that train at ``loss.lr`` (the mAP stage's rate) instead of ``train.lr``.
MAP_STAGE_LOSSES = ("map", "ap_loss_nms")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the images and annotations come from, and how images are prepared.

    ``kind`` picks the data set reader: ``voc`` (PASCAL VOC layout under ``root``, which may
    be a ``VOCdevkit`` directory holding ``VOC2007``/``VOC2012`` or one ``VOC20XX`` directory),
    ``coco`` (``root`` holds the images, ``train_ann``/``test_ann`` the JSON files) or
    ``digits`` (the embedded procedural benchmark, written to ``root`` on first use).
    ``train_years`` lists the VOC years whose ``train_split`` lists are united (07+12 is
    ``[2007, 2012]``); a ``root`` that itself holds ``Annotations/``, ``JPEGImages/`` and
    ``ImageSets/Main/`` (a data set of one's own) ignores the years. ``classes``: the class
    names of a VOC-layout data set, label ``c`` being ``classes[c]`` (null: the 20 VOC
    classes); an object of another class is an error naming this key, or is dropped when
    ``skip_unknown`` is true. COCO data sets take their classes from the JSON file and the
    digits benchmark has its own, so ``classes`` must stay null for them. ``digits`` holds
    the parameters of :func:`mapdet.data.digits.write_digits_voc` (``num_train``,
    ``num_test``, ``image_size``, ``seed``, ...; empty: its defaults); override one with
    ``data.digits.num_train=100``.
    Images are resized so that the shorter side is ``scale`` and the longer at most
    ``max_size``.
    """

    kind: Literal["voc", "coco", "digits"] = "digits"
    root: str = "data/digits"
    train_years: list[int] = field(default_factory=lambda: [2007])
    train_split: str = "trainval"
    test_year: int = 2007
    test_split: str = "test"
    train_ann: str | None = None
    test_ann: str | None = None
    classes: list[str] | None = None
    skip_unknown: bool = False
    use_difficult: bool = False
    scale: int = 600
    max_size: int = 1000
    flip: bool = True
    num_workers: int = 0
    digits: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProposalConfig:
    """Object proposals (see :mod:`mapdet.data.proposals`).

    ``method: selective_search`` computes OpenCV Selective Search (``mode`` fast | quality,
    optionally on a copy resized to a shorter side of ``resize_to`` px) in ``num_workers``
    processes and caches them in ``cache_dir``; ``method: file`` reads ``file`` (training)
    and ``test_file`` (evaluation): a ``.mat`` (original Fast R-CNN format), ``.npz`` or
    ``.json`` file. ``max_per_image``: keep at most this many proposals per image, the
    first in the method's (or the file's) order (0: all); applied once, where the proposals
    are computed or read (:func:`mapdet.engine.builders.build_proposals`). ``seed``: the seed
    of Selective Search's randomised ranking (separate from ``train.seed``, so that a new
    training seed reuses the cached proposals).
    """

    method: Literal["selective_search", "file"] = "selective_search"
    file: str | None = None
    test_file: str | None = None
    cache_dir: str = "cache/proposals"
    mode: Literal["fast", "quality"] = "fast"
    resize_to: int | None = None
    max_per_image: int = 2000
    min_size: float = 4.0
    num_workers: int = 2
    seed: int = 0


@dataclass
class ModelConfig:
    """The detector.

    ``arch: fast_rcnn`` (default): the project's Fast R-CNN on proposals (see
    :class:`mapdet.models.FastRCNN`); ``backbone``: ``vgg16`` | ``resnet50_c4`` | ``small``.
    ``fc_dim``: width of the fully connected head (null: the backbone's default, 4096 for
    VGG16, 256 for ``small``). ``freeze_at``: leading backbone stages kept frozen (null: 2 when
    pretrained, else 0).

    ``arch: faster_rcnn``: torchvision's Faster R-CNN (its own RPN: no Selective Search, the
    ``proposals`` section is unused), see :func:`mapdet.models.faster_rcnn.build_faster_rcnn`;
    ``backbone``: ``resnet50_fpn`` | ``resnet50_fpn_v2`` | ``mobilenet_v3_large_fpn`` |
    ``resnet18_fpn`` | ``small``. Its test-time post-processing is ``eval``'s, its RoI
    sampling ``train``'s (``rois_per_image``, ``fg_fraction``, ``fg_iou``, ``bg_iou_high``);
    ``faster_rcnn`` passes any other torchvision ``FasterRCNN`` keyword (e.g.
    ``rpn_post_nms_top_n_train``). ``roi_op``, ``fc_dim``, ``dropout``, ``freeze_at`` are Fast
    R-CNN's only.
    """

    arch: Literal["fast_rcnn", "faster_rcnn"] = "fast_rcnn"
    backbone: str = "vgg16"
    roi_op: Literal["pool", "align"] = "pool"
    pretrained: bool = True
    fc_dim: int | None = None
    dropout: float = 0.5
    freeze_at: int | None = None
    faster_rcnn: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The optimisation: which loss, how long, minibatches, SGD, checkpoints, seeding.

    ``loss: softmax`` is Fast R-CNN's multi-task loss on ``rois_per_image`` sampled RoIs per
    image (``fg_fraction`` of them foreground at IoU >= ``fg_iou``, background at IoU in
    ``[bg_iou_low, bg_iou_high)``); ``loss: map`` sends all proposals through the head and
    trains with :class:`mapdet.MAPLoss` (options in :class:`LossConfig`). ``init_from`` loads
    model weights (only) from a checkpoint, e.g. a softmax run for the map fine-tuning.
    The learning rate is multiplied by ``lr_gamma`` at every iteration in ``lr_steps``.
    ``clip_grad_norm`` > 0 clips the gradient's global norm (the mAP loss's pseudo-gradients
    can be spiky). ``threads`` > 0 sets torch's intra-op CPU threads. ``amp``: mixed
    precision for the step's forward passes (:mod:`mapdet.engine.amp`): ``none``, ``bf16``
    (``torch.autocast`` with bfloat16) or ``fp16`` (float16 with a gradient scaler).
    ``keep_checkpoints``: after each save, only the newest that many checkpoints stay (the
    last one among them), so a long run's disk use is bounded; 0 keeps every checkpoint.

    More losses (docs/study.md): ``softmax_map`` is the softmax loss plus
    ``loss.map_loss_weight`` times the mAP loss (both at ``train.lr``); ``ap_loss_nms`` is
    AP-Loss's ranking-pair update on the detections after the test-time NMS (at ``loss.lr``,
    as ``map``); ``ap_loss`` (AP-Loss, Chen et al. 2019) and ``rank_sort`` (Rank & Sort
    Loss, Oksuz et al. 2021) rank every proposal's class scores without NMS (at
    ``train.lr``). ``optimizer``: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``
    (betas 0.9, 0.999; ``weight_decay`` as L2 for ``adam``, decoupled for ``adamw``).
    """

    loss: Literal["softmax", "map", "softmax_map", "ap_loss_nms", "ap_loss", "rank_sort"] = (
        "softmax")
    iterations: int = 40000
    images_per_batch: int = 2
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1
    bg_iou_high: float = 0.5
    add_gt: bool = True
    lr: float = 0.001
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 0.0005
    lr_steps: list[int] = field(default_factory=lambda: [30000])
    lr_gamma: float = 0.1
    warmup_iterations: int = 0
    clip_grad_norm: float = 0.0
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    init_from: str | None = None
    checkpoint_every: int = 10000
    keep_checkpoints: int = 3
    log_every: int = 20
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: int = 0
    amp: Literal["none", "bf16", "fp16"] = "none"


@dataclass
class LossConfig:
    """Options of the mAP loss (``train.loss: map``), see :class:`mapdet.MAPLoss`.

    ``max_rois_per_image`` caps the proposals per image sent through the head and into the
    AP (0: all of them, as in the paper).
    ``box_loss_weight`` weighs the smooth-L1 box loss on up to ``fg_fraction *
    rois_per_image`` sampled foreground proposals per image, ``map_loss_weight`` the mAP
    term. ``memory``: detections of that many past minibatches (scores detached) join the AP
    context. ``num_threads``: threads for the per-class AP computation (0: all cores).
    ``direction``: the pseudo-partial's rule (``nearest_improvement``, the method's; the
    ablation variants ``nearest_change`` and ``both_summed``, see :mod:`mapdet.core.pseudograd`).

    The mAP stage's own recipe (used whenever ``train.loss`` is ``map``):
    ``normalization`` scales the pseudo-gradient (``none`` | ``nonzero`` | ``per_class`` |
    ``l1``, see :mod:`mapdet.loss`); ``lr`` is the mAP stage's learning rate, in place of
    ``train.lr`` (which stays the softmax stage's); null: :data:`MAP_STAGE_LR`. So
    ``mapdet train CONFIG train.loss=map train.init_from=RUN`` gets the recommended recipe
    even when the config's softmax stage uses a large ``train.lr``.

    ``smoothing`` (:mod:`mapdet.smoothing`): the gradient of ``E_z[AP(s + sigma z)]``, the AP
    after NMS under Gaussian score noise: ``average`` averages the exact pseudo-gradient over
    ``samples`` perturbed scores, ``perturbed`` is the perturbed-optimizer estimator over
    ``samples`` antithetic pairs; the draws are a function of ``train.seed`` and the step.
    ``ranking_delta``: the step function's width of ``ap_loss`` / ``ap_loss_nms`` (null: 1,
    AP-Loss's) and ``rank_sort`` (null: 0.5, RS Loss's).
    """

    score_threshold: float = defaults.SCORE_THRESHOLD
    nms_iou: float = defaults.NMS_IOU
    match_iou: float = defaults.MATCH_IOU
    ap_method: Literal["area", "voc07", "r101"] = defaults.AP_METHOD
    min_step: float = defaults.MIN_STEP
    direction: Literal["nearest_improvement", "nearest_change", "both_summed"] = (
        defaults.DIRECTION)
    form: Literal["one_minus", "neg_log"] = defaults.FORM
    map_loss_weight: float = 1.0
    box_loss_weight: float = 1.0
    max_rois_per_image: int = 0
    memory: int = 0
    num_threads: int = 0
    normalization: Literal["none", "nonzero", "per_class", "l1"] = defaults.NORMALIZATION
    lr: float | None = None
    smoothing: Literal["none", "average", "perturbed"] = defaults.SMOOTHING
    sigma: float = defaults.SIGMA
    samples: int = defaults.SAMPLES
    ranking_delta: float | None = None


@dataclass
class EvalConfig:
    """Test-time post-processing and scoring.

    Per class: score threshold, NMS; at most ``max_per_image`` detections per image (0: no
    cap). ``metrics``: VOC AP definitions to report (the first is the primary one in
    ``metrics.json``). ``convention``: ``devkit`` (1-based pixels, +1 widths, comparable
    with published numbers) or ``continuous``. ``max_images`` > 0 evaluates only the first
    images. ``coco_metrics``: also compute COCO metrics (always for ``data.kind: coco``).
    ``num_vis`` images go into ``detections.png``, boxes above ``vis_threshold``.
    ``train_split_map``: evaluating a checkpoint on the test split (``mapdet train``,
    ``mapdet eval``) also scores the train split with the same post-processing and adds
    ``train_split`` to ``metrics.json``: optimisation and generalisation, measured apart.
    """

    score_threshold: float = defaults.SCORE_THRESHOLD
    nms_iou: float = defaults.NMS_IOU
    max_per_image: int = 100
    metrics: list[str] = field(default_factory=lambda: ["voc07", "area"])
    convention: Literal["devkit", "continuous"] = "devkit"
    match_iou: float = defaults.MATCH_IOU
    max_images: int = 0
    export_devkit: bool = True
    export_coco: bool = True
    coco_metrics: bool = False
    plots: bool = True
    num_vis: int = 4
    vis_threshold: float = 0.5
    train_split_map: bool = True


@dataclass
class OutputConfig:
    """Where runs are written: ``<dir>/<name>`` (``name`` empty: a timestamp)."""

    dir: str = "runs"
    name: str = ""
    tensorboard: bool = False  # TensorBoard event files too (needs ``mapdet[tensorboard]``)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "proposals": ProposalConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "loss": LossConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}


@dataclass
class Config:
    """The whole configuration of a run. Build it with :func:`load_config`."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def copy(self) -> Config:
        """An independent deep copy."""
        return config_from_dict(self.to_dict())

    def stage_lr(self) -> float:
        """The base learning rate of this run: ``train.lr`` for the softmax loss; for the mAP
        loss ``loss.lr``, or :data:`MAP_STAGE_LR` when that is null."""
        if self.train.loss not in MAP_STAGE_LOSSES:
            return self.train.lr
        return MAP_STAGE_LR if self.loss.lr is None else self.loss.lr

    def validate(self) -> Config:
        """Check cross-field constraints; raises :class:`ConfigError`. Returns ``self``."""
        t, d, lo, p, m, e = (self.train, self.data, self.loss, self.proposals, self.model,
                             self.eval)
        for name in _SECTIONS:  # also configs built in code, which _coerce never saw
            for f in dataclasses.fields(getattr(self, name)):
                value = getattr(getattr(self, name), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{name}.{f.name}: must be a finite number, got {value}")
        _positive("train.iterations", t.iterations, allow_zero=True)
        _positive("train.images_per_batch", t.images_per_batch)
        _positive("train.rois_per_image", t.rois_per_image)
        _positive("train.lr", t.lr, allow_zero=True)
        _positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
        _positive("train.log_every", t.log_every)
        _positive("data.scale", d.scale)
        _positive("data.max_size", d.max_size)
        _positive("loss.min_step", lo.min_step)
        if lo.lr is not None:
            _positive("loss.lr", lo.lr, allow_zero=True)
        _positive("loss.sigma", lo.sigma)
        _positive("loss.samples", lo.samples)
        if lo.ranking_delta is not None:
            _positive("loss.ranking_delta", lo.ranking_delta, allow_zero=True)
        for key, val in (("data.num_workers", d.num_workers),
                         ("proposals.max_per_image", p.max_per_image),
                         ("proposals.min_size", p.min_size),
                         ("proposals.num_workers", p.num_workers),
                         ("train.warmup_iterations", t.warmup_iterations),
                         ("train.keep_checkpoints", t.keep_checkpoints),
                         ("train.threads", t.threads), ("train.momentum", t.momentum),
                         ("train.weight_decay", t.weight_decay),
                         ("train.clip_grad_norm", t.clip_grad_norm),
                         ("loss.max_rois_per_image", lo.max_rois_per_image),
                         ("loss.memory", lo.memory), ("loss.num_threads", lo.num_threads),
                         ("eval.max_per_image", e.max_per_image),
                         ("eval.max_images", e.max_images), ("eval.num_vis", e.num_vis)):
            _positive(key, val, allow_zero=True)
        for key, opt in (("proposals.resize_to", p.resize_to), ("model.fc_dim", m.fc_dim)):
            if opt is not None:
                _positive(key, opt)
        if m.freeze_at is not None:
            _positive("model.freeze_at", m.freeze_at, allow_zero=True)
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
        for key, val in (("train.fg_fraction", t.fg_fraction),
                         ("loss.score_threshold", lo.score_threshold),
                         ("eval.score_threshold", e.score_threshold),
                         ("eval.vis_threshold", e.vis_threshold)):
            if not 0.0 <= val <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], got {val}")
        for key, val in (("loss.nms_iou", lo.nms_iou), ("loss.match_iou", lo.match_iou),
                         ("eval.nms_iou", e.nms_iou), ("eval.match_iou", e.match_iou)):
            if not 0.0 < val <= 1.0:
                raise ConfigError(f"{key}: must be in (0, 1], got {val}")
        self._validate_classes()
        if not t.bg_iou_low <= t.bg_iou_high <= t.fg_iou:
            raise ConfigError(
                "train.bg_iou_low <= train.bg_iou_high <= train.fg_iou must hold, got "
                f"{t.bg_iou_low}, {t.bg_iou_high}, {t.fg_iou}")
        if sorted(t.lr_steps) != list(t.lr_steps):
            raise ConfigError(f"train.lr_steps: must be increasing, got {t.lr_steps}")
        if self.proposals.method == "file" and not (self.proposals.file
                                                    or self.proposals.test_file):
            raise ConfigError("proposals.file: required when proposals.method is 'file'")
        if d.kind == "coco" and not (d.train_ann or d.test_ann):
            raise ConfigError("data.train_ann / data.test_ann: required when data.kind is 'coco'")
        bad = [m for m in self.eval.metrics if m not in ("voc07", "area")]
        if bad or not self.eval.metrics:
            raise ConfigError(f"eval.metrics: unknown {bad or 'empty list'}; valid: voc07, area")
        return self

    def _validate_classes(self) -> None:
        classes = self.data.classes
        if classes is None:
            return
        if self.data.kind != "voc":
            raise ConfigError(
                f"data.classes: only used with data.kind: voc (a {self.data.kind} data set "
                "has its own class list); remove it or set it to null")
        if not classes:
            raise ConfigError("data.classes: empty list; give at least one class name "
                              "(or null for the 20 VOC classes)")
        for i, c in enumerate(classes):
            if not c.strip() or c != c.strip():
                raise ConfigError(f"data.classes[{i}]: {c!r} is empty or has surrounding "
                                  "spaces")
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup:
            raise ConfigError(f"data.classes: listed more than once: {', '.join(dup)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# --------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides
# --------------------------------------------------------------------------------------------


def _unknown_key(key: str, valid: Sequence[str], prefix: str = "") -> ConfigError:
    """The error for an unknown key, with the closest valid key (difflib) and all valid keys."""
    what = "section" if not prefix else "key"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown {what} {prefix + key!r}.{hint} Valid {what}s"
        f"{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}",
        key=prefix + key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict or tp is dict:
        return "mapping"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert harmless cases.

    Accepted conversions: int -> float; strings that parse as floats (``"1e-3"``, which
    YAML 1.1 reads as a string) -> float; a scalar -> one-element list. Everything else
    that does not match raises :class:`ConfigError` naming ``key``, and so does a float
    that is NaN or infinite (``train.lr=nan``).
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a split named 2007 or a device "0"
    else:  # pragma: no cover - no other field types are used
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


#: Keys that were renamed: ``(section, old key) -> new key``. ``max_proposals`` meant two
#: different things in two sections; each now has a name that says which.
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("proposals", "max_proposals"): "max_per_image",
    ("loss", "max_proposals"): "max_rois_per_image",
}


def _section_from_dict(name: str, cls: type, values: Mapping[str, Any],
                       migrate: bool = True) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        new = RENAMED_KEYS.get((name, str(key)))
        if new is not None:
            if not migrate:
                raise ConfigError(f"{name}.{key}: renamed to {name}.{new}; use that name")
            if new in values:
                continue  # both spellings (an old config with an override): the new one wins
            key = new
        if key not in hints:
            raise _unknown_key(str(key), names, f"{name}.")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any] | None, *, migrate: bool = True) -> Config:
    """Build a :class:`Config` from a nested dict; missing keys take their defaults.

    ``migrate``: accept the old names of :data:`RENAMED_KEYS` (configs saved in older
    checkpoints) under their new names; ``False`` makes them errors that give the new name
    (what :func:`load_config` does for files and overrides written by a user).
    """
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
    sections = {}
    for name, values in d.items():
        if name not in _SECTIONS:
            raise _unknown_key(str(name), list(_SECTIONS))
        sections[name] = _section_from_dict(name, _SECTIONS[name], values or {}, migrate)
    return Config(**sections)


def parse_override(text: str) -> tuple[str, str, str | None, Any]:
    """Split ``section.key[.entry]=value`` into ``(section, key, entry, value)``.

    The value is parsed as a YAML scalar (or flow list/mapping); ``entry`` addresses one
    entry of a mapping-valued key such as ``data.digits.num_train=100`` (else ``None``).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts[0], parts[1], (parts[2] if len(parts) == 3 else None), value


def apply_overrides(cfg: Config | Mapping[str, Any], overrides: Sequence[str], *,
                    migrate: bool = True) -> Config:
    """Return a new :class:`Config` with ``section.key=value`` overrides applied
    (``migrate``: see :func:`config_from_dict`)."""
    if isinstance(cfg, Config):
        d = cfg.to_dict()
    else:
        d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    for text in overrides:
        section, key, entry, value = parse_override(text)
        if section not in _SECTIONS:
            raise _unknown_key(section, list(_SECTIONS))
        values = d.setdefault(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        if entry is None:
            values[key] = value
            continue
        hints = typing.get_type_hints(_SECTIONS[section])
        if key not in hints:
            raise _unknown_key(key, list(hints), f"{section}.")
        if typing.get_origin(hints[key]) is not dict:
            raise ConfigError(f"override {text!r}: {section}.{key} is not a mapping; "
                              f"use {section}.{key}=value")
        values[key] = {**dict(values.get(key) or {}), entry: value}
    return config_from_dict(d, migrate=migrate)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults), apply overrides, validate.

    Raises :class:`ConfigError` naming the file or key on a missing file, bad YAML, a key
    written twice, an unknown or renamed key or a wrongly typed value. The message says
    where the bad value came from: ``FILE:LINE:`` for a key written in the file,
    ``command line override 'KEY=VALUE':`` for one typed as an override (the last one that
    sets the key), ``FILE:`` for a default or a rule between several keys.
    """
    d: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        d = read_yaml_mapping(path)
        lines = yaml_key_lines(path)

    def in_file(exc: ConfigError) -> ConfigError:
        if path is None:
            return exc
        key = exc.key or ""
        line = lines.get(key) or lines.get(key.split(".", 1)[0])
        where = f"{path}:{line}" if line else str(path)
        return ConfigError(f"{where}: {exc}", key=exc.key)

    try:
        cfg = config_from_dict(d, migrate=False)
    except ConfigError as exc:
        raise in_file(exc) from None
    set_by: dict[str, str] = {}
    for text in overrides:
        try:
            cfg = apply_overrides(cfg, [text], migrate=False)
        except ConfigError as exc:
            raise _on_command_line(text, exc) from None
        section, key, _, _ = parse_override(text)
        set_by[f"{section}.{key}"] = text
    try:
        return cfg.validate()
    except ConfigError as exc:
        text = set_by.get(exc.key or "")
        raise (in_file(exc) if text is None else _on_command_line(text, exc)) from None


def _on_command_line(text: str, exc: ConfigError) -> ConfigError:
    """``exc`` blamed on the override ``text`` typed on the command line."""
    message = str(exc)
    if message.startswith(f"override {text!r}"):
        return ConfigError(f"command line {message}", key=exc.key)
    return ConfigError(f"command line override {text!r}: {message}", key=exc.key)


def yaml_key_lines(path: str | Path) -> dict[str, int]:
    """``{"section": line, "section.key": line}``: where each section and key of the YAML
    config ``path`` is written (1-based); ``{}`` when it cannot be parsed."""
    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        section = str(key_node.value)
        lines.setdefault(section, key_node.start_mark.line + 1)
        if isinstance(value_node, yaml.MappingNode):
            for k, _ in value_node.value:
                lines.setdefault(f"{section}.{k.value}", k.start_mark.line + 1)
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key written twice (PyYAML keeps the last
    silently: a section written twice would drop the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is written twice "
                    f"(first on line {first.start_mark.line + 1}); merge the two")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (``{}`` for an empty file).

    Raises :class:`ConfigError` naming the file on a missing file, bad YAML, a key written
    twice in one mapping, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return dict(loaded or {})
