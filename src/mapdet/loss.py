"""The mAP loss: the bridge from PyTorch tensors to the core's AP and pseudo-gradients.

``loss = 1 - mAP`` over the windows of a minibatch, where ``mAP`` is the mean over the
classes ``C'`` with at least one non-difficult ground truth of the AP after the detection
function (score threshold, NMS) run on the windows' class scores and class-specific boxes.
The gradient handed to autograd for ``probs[i, c]`` is ``-g_ic / |C'|`` with ``g_ic`` the
exact pseudo-gradient of ``AP_c`` w.r.t. ``probs[i, c]`` (docs/method.md, section 4).
With ``form="neg_log"`` the loss is ``-log(mAP)`` and the gradient ``-g_ic / (|C'| mAP)``.

The scale of that gradient (docs/method.md, "The scale of the pseudo-gradient"): a
pseudo-partial is ``delta AP / (delta s + min_step)``, so a window whose score nearly ties
another's gets up to ``delta AP / min_step`` (1000x ``delta AP`` at ``min_step = 1e-3``), and
every window can get one. ``normalization`` rescales the gradient (never the loss value, nor
the direction within one class) in one place, :func:`normalization_scale`:

- ``"none"``: the gradient above, ``P = a G / |C'|`` (``a = 1``, or ``1 / mAP`` for ``neg_log``);
- ``"nonzero"``: ``P / n``, ``n`` the number of windows with a nonzero partial in some
  class: the mean over the windows that the loss moves, as cross-entropy averages over RoIs;
- ``"per_class"``: column ``c`` of ``P`` divided by ``n_c``, the windows with a nonzero
  partial of ``AP_c``: every class's gradient has the same weight whatever its window count;
- ``"l1"``: ``P / ||P||_1``: unit L1 norm per minibatch, the size of cross-entropy's
  gradient w.r.t. the logits averaged over RoIs (between 0 and 2): a learning rate that suits
  the softmax stage suits this one. A zero gradient stays zero.

Beyond one minibatch (docs/method.md, section 6):

- ``memory=K`` keeps the detections of the last ``K`` minibatches (scores detached) and
  includes them in the AP; only the current windows receive a gradient. What a stored
  minibatch contributes to each class's problem (its detections after NMS, their best
  ground truth) is computed once, when it enters the memory
  (:func:`mapdet.core.fixed.fix_detections`), not at every step.
- ``distributed=True`` gathers the windows of every rank (``torch.distributed``) so that the
  AP is the global batch's; each rank receives the pseudo-gradients of its own windows,
  multiplied by the world size so that DDP's gradient averaging yields the global-batch
  gradient.

Boxes receive no gradient here (AP is piecewise constant in the scores and the loss is
defined through them); train the box regression with its smooth-L1 loss beside this one.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mapdet import defaults as D
from mapdet.core.ap import (
    GroundTruth,
    ap_from_labels,
    best_ground_truth,
    check_ap_method,
    check_iou_threshold,
    label_detections,
    match_thresholds,
)
from mapdet.core.apnms import ap_pseudo_gradient_multiclass
from mapdet.core.fixed import FixedDetections, fix_detections
from mapdet.core.nms import greedy_nms
from mapdet.core.perturbed import perturbed_gradient_multiclass
from mapdet.core.pseudograd import check_direction, check_min_step
from mapdet.ranking import PrecomputedGradient, ap_loss

__all__ = ["LOSS_FORMS", "MAPLoss", "NMSAPLoss", "NORMALIZATIONS", "SMOOTHINGS", "Windows",
           "normalization_scale"]

LOSS_FORMS = ("one_minus", "neg_log")
NORMALIZATIONS = ("none", "nonzero", "per_class", "l1")
SMOOTHINGS = ("none", "average", "perturbed")
#: ``-log(mAP)`` uses ``max(mAP, NEG_LOG_FLOOR)`` so that a zero mAP gives a finite loss.
NEG_LOG_FLOOR = 1e-4


@dataclass
class Windows:
    """A minibatch's windows and ground truth as float64/int64 numpy arrays.

    Attributes:
        probs: ``(N, K)``; boxes: ``(N, K, 4)`` or ``(N, 4)``; image_ids: ``(N,)`` in
        ``0..B-1``; gt_boxes ``(G, 4)``, gt_labels ``(G,)``, gt_image_ids ``(G,)``,
        gt_difficult ``(G,)``; num_images: ``B``; fixed: for a minibatch in the AP memory,
        its :class:`mapdet.core.fixed.FixedDetections` (a cache, never saved; ``None``
        until computed).
    """

    probs: np.ndarray
    boxes: np.ndarray
    image_ids: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_image_ids: np.ndarray
    gt_difficult: np.ndarray
    num_images: int
    fixed: FixedDetections | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def concat(parts: Sequence[Windows]) -> Windows:
        """Concatenate minibatches, renumbering images so they stay distinct."""
        offsets = np.cumsum([0] + [p.num_images for p in parts])
        starts = offsets[:-1]
        if all(p.boxes.ndim == 2 for p in parts):
            boxes = [p.boxes for p in parts]
        else:  # mixed shared/class-specific boxes: expand the shared ones
            k = parts[0].probs.shape[1]
            boxes = [p.boxes if p.boxes.ndim == 3 else np.repeat(p.boxes[:, None], k, axis=1)
                     for p in parts]
        return Windows(
            probs=np.concatenate([p.probs for p in parts]),
            boxes=np.concatenate(boxes),
            image_ids=np.concatenate([p.image_ids + o for p, o in zip(parts, starts, strict=True)]),
            gt_boxes=np.concatenate([p.gt_boxes for p in parts]),
            gt_labels=np.concatenate([p.gt_labels for p in parts]),
            gt_image_ids=np.concatenate(
                [p.gt_image_ids + o for p, o in zip(parts, starts, strict=True)]),
            gt_difficult=np.concatenate([p.gt_difficult for p in parts]),
            num_images=int(offsets[-1]),
        )


def _to_numpy(name: str, value, dtype) -> np.ndarray:
    """``value`` (tensor, array or list) as a numpy array of ``dtype``. Reduced-precision
    tensors numpy cannot hold (bfloat16) are converted through float32; for an integer
    ``dtype`` the values must already be integers (a float id or label would be truncated
    silently): ValueError naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32,
                                                             torch.float64):
            value = value.float()  # bfloat16, float8: numpy has no such type
        value = value.numpy()
    if np.issubdtype(np.dtype(dtype), np.integer):
        arr = np.asarray(value)
        if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return np.asarray(value, dtype=dtype)


def _to_host(values: Sequence) -> list:
    """``values`` with every CUDA tensor copied to pinned host memory, all copies queued
    before one synchronisation per device (a ``.cpu()`` per tensor would wait for the device
    once per tensor, a minibatch's loss inputs a dozen times); other values unchanged."""
    out = list(values)
    devices = set()
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.is_cuda:
            v = v.detach()
            host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host.copy_(v, non_blocking=True)
            out[i] = host
            devices.add(v.device)
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out


def _to_device(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor of ``like``'s dtype on ``like``'s device; to a GPU through pinned
    memory without waiting for the copy (the caching host allocator keeps the buffer until
    the copy has run)."""
    t = torch.from_numpy(np.ascontiguousarray(array)).to(like.dtype)
    if like.is_cuda:
        return t.pin_memory().to(like.device, non_blocking=True)
    return t


def windows_from_tensors(probs, boxes, image_ids, targets) -> Windows:
    """Validate the loss inputs and convert them to :class:`Windows`.

    CUDA inputs are copied to the host together, with one synchronisation (:func:`_to_host`).
    Raises ``ValueError`` naming the argument on NaN/inf probabilities, shape mismatches,
    image ids outside ``0..len(targets)-1`` and labels outside ``0..K-1``.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {tuple(probs.shape)}")
    keys = [[key for key in ("boxes", "labels", "difficult") if key in t] for t in targets]
    flat = _to_host([probs, boxes, image_ids, *(t[key] for t, ks in zip(targets, keys,
                                                                        strict=True)
                                                 for key in ks)])
    probs, boxes, image_ids, rest = flat[0], flat[1], flat[2], iter(flat[3:])
    targets = [{**t, **{key: next(rest) for key in ks}} for t, ks in zip(targets, keys,
                                                                         strict=True)]
    n, k = probs.shape
    p = _to_numpy("probs", probs, np.float64)
    bad = ~np.isfinite(p)
    if bad.any():
        raise ValueError(f"probs contains {int(np.isnan(p).sum())} NaN and "
                         f"{int(bad.sum() - np.isnan(p).sum())} infinite value(s)")
    b = _to_numpy("boxes", boxes, np.float64)
    if b.shape not in ((n, k, 4), (n, 4)):
        raise ValueError(f"boxes must have shape (N, K, 4) = ({n}, {k}, 4) or (N, 4) = ({n}, 4), "
                         f"got {tuple(b.shape)}")
    ids = _to_numpy("image_ids", image_ids, np.int64).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"image_ids has {ids.shape[0]} entries, probs has {n} rows")
    num_images = len(targets)
    if n and (ids.min() < 0 or ids.max() >= num_images):
        raise ValueError(f"image_ids must index targets (0..{num_images - 1}), "
                         f"got values in [{ids.min()}, {ids.max()}]")
    gt_boxes, gt_labels, gt_images, gt_difficult = [], [], [], []
    for j, t in enumerate(targets):
        for key in ("boxes", "labels"):
            if key not in t:
                raise ValueError(f"targets[{j}] has no {key!r} entry (keys: {sorted(t)})")
        gb = _to_numpy(f"targets[{j}]['boxes']", t["boxes"], np.float64).reshape(-1, 4)
        gl = _to_numpy(f"targets[{j}]['labels']", t["labels"], np.int64).reshape(-1)
        if gl.shape[0] != gb.shape[0]:
            raise ValueError(f"targets[{j}] has {gb.shape[0]} boxes but {gl.shape[0]} labels")
        if gl.size and (gl.min() < 0 or gl.max() >= k):
            raise ValueError(f"targets[{j}]['labels'] must be in 0..{k - 1} (K = {k} foreground "
                             f"classes), got values in [{gl.min()}, {gl.max()}]")
        gd = t.get("difficult")
        gd = (np.zeros(gl.size, dtype=bool) if gd is None
              else _to_numpy(f"targets[{j}]['difficult']", gd, bool).reshape(-1))
        if gd.shape[0] != gl.shape[0]:
            raise ValueError(f"targets[{j}] has {gl.shape[0]} labels but {gd.shape[0]} "
                             "difficult flags")
        gt_boxes.append(gb)
        gt_labels.append(gl)
        gt_images.append(np.full(gl.size, j, dtype=np.int64))
        gt_difficult.append(gd)
    return Windows(
        probs=p, boxes=b, image_ids=ids,
        gt_boxes=np.concatenate(gt_boxes) if gt_boxes else np.zeros((0, 4)),
        gt_labels=np.concatenate(gt_labels) if gt_labels else np.zeros(0, np.int64),
        gt_image_ids=np.concatenate(gt_images) if gt_images else np.zeros(0, np.int64),
        gt_difficult=np.concatenate(gt_difficult) if gt_difficult else np.zeros(0, bool),
        num_images=num_images,
    )


def normalization_scale(grads: np.ndarray, base: float, normalization: str) -> np.ndarray:
    """The factor ``S`` (shape ``(1, K)``) such that the gradient handed to autograd is
    ``-S * grads``, for ``grads (N, K)`` the per-class pseudo-gradients of the windows that
    receive one (the global batch's under DDP) and ``base`` the form's factor (``1/|C'|``,
    or ``1/(|C'| mAP)`` for ``neg_log``). See the module docstring for the four rules.
    """
    k = grads.shape[1] if grads.ndim == 2 else 0
    if normalization == "none":
        return np.full((1, k), base)
    if normalization == "nonzero":
        n = int(np.count_nonzero((grads != 0).any(axis=1))) if grads.size else 0
        return np.full((1, k), base / max(n, 1))
    if normalization == "per_class":
        n_c = np.count_nonzero(grads, axis=0) if grads.size else np.zeros(k)
        return (base / np.maximum(n_c, 1)).reshape(1, k)
    if normalization == "l1":
        norm = float(np.abs(base * grads).sum())
        return np.full((1, k), base / norm if norm > 0 else 0.0)
    raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, "
                     f"got {normalization!r}")


class MAPLoss(nn.Module):
    """``1 - mAP`` after NMS with exact pseudo-gradients (Henderson & Ferrari, ACCV 2016).

    Args:
        score_threshold: candidates have ``prob > score_threshold`` (Fast R-CNN: 0.05).
        nms_iou: NMS suppresses at ``IoU > nms_iou`` (Fast R-CNN: 0.3).
        match_iou: TP threshold, or a sequence for COCO-style AP averaged over thresholds.
        ap_method: ``"area"``, ``"voc07"`` or ``"r101"``.
        min_step: ``mu > 0`` in the pseudo-gradient's slopes.
        direction: the pseudo-partial's rule: ``"nearest_improvement"`` (docs/method.md,
            section 3) or an ablation variant, ``"nearest_change"`` or ``"both_summed"``
            (:mod:`mapdet.core.pseudograd`).
        form: ``"one_minus"`` (``1 - mAP``) or ``"neg_log"`` (``-log mAP``).
        normalization: ``"none"``, ``"nonzero"``, ``"per_class"`` or ``"l1"``: how the
            gradient is scaled (module docstring); the loss value is unchanged. Default
            ``"l1"``, the configuration's (``loss.normalization``), so ``MAPLoss()`` and
            ``mapdet train ... train.loss=map`` train the same loss; ``"none"`` is the raw
            pseudo-gradient times the form's factor.

    Every default is :mod:`mapdet.defaults`'s, shared with :class:`mapdet.config.LossConfig`;
    :meth:`from_config` builds the loss of a configuration's ``loss`` section.
        memory: number of past minibatches whose (detached) detections join the AP.
        distributed: gather every rank's windows (``torch.distributed`` must be
            initialised); the AP is the global batch's.
        num_threads: threads for the classes (default: all cores).
        smoothing: ``"none"`` (the exact pseudo-gradient), or the gradient of the smoothed
            AP ``E_z[AP(s + sigma z)]`` after NMS: ``"average"`` averages the exact
            pseudo-gradient over ``samples`` perturbed scores ``s + sigma z``;
            ``"perturbed"`` is the perturbed-optimizer estimator over ``samples`` antithetic
            pairs (:mod:`mapdet.core.perturbed`). The loss value stays ``1 - mAP`` of the
            unperturbed scores. Call ``t`` draws from ``numpy.random.default_rng([seed, t])``
            (the count is in the extra state, so a resumed run draws what it would have).

    ``forward(probs (N, K), boxes (N, K, 4) | (N, 4), image_ids (N,), targets)``: ``probs``
    are the softmax probabilities of the K foreground classes (background column removed),
    ``targets[b] = {"boxes": (M, 4), "labels": (M,) in 0..K-1, "difficult": (M,) optional}``
    and ``image_ids`` index ``targets``. Returns a scalar tensor on ``probs``' device.
    After a call, ``last_ap (K,)`` holds the per-class APs (NaN where undefined) and
    ``last_map`` their mean over the defined classes.
    """

    def __init__(self, score_threshold: float = D.SCORE_THRESHOLD, nms_iou: float = D.NMS_IOU,
                 match_iou: float | Sequence[float] = D.MATCH_IOU, ap_method: str = D.AP_METHOD,
                 min_step: float = D.MIN_STEP, form: str = D.FORM, *, memory: int = 0,
                 distributed: bool = False, num_threads: int | None = None,
                 normalization: str = D.NORMALIZATION, direction: str = D.DIRECTION,
                 smoothing: str = D.SMOOTHING, sigma: float = D.SIGMA,
                 samples: int = D.SAMPLES, seed: int = 0):
        super().__init__()
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {list(SMOOTHINGS)}, got {smoothing!r}")
        if smoothing != "none" and not (sigma > 0 and int(samples) >= 1):
            raise ValueError(f"smoothing {smoothing!r} needs sigma > 0 and samples >= 1, got "
                             f"sigma={sigma!r}, samples={samples!r}")
        if smoothing != "none" and int(memory):
            raise ValueError("smoothing and memory cannot be combined")
        check_ap_method(ap_method)
        match_thresholds(match_iou)
        check_iou_threshold("nms_iou", nms_iou)
        check_min_step(min_step)
        check_direction(direction)
        if form not in LOSS_FORMS:
            raise ValueError(f"form must be one of {list(LOSS_FORMS)}, got {form!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, "
                             f"got {normalization!r}")
        if int(memory) < 0:
            raise ValueError(f"memory must be >= 0 minibatches, got {memory!r}")
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.match_iou = match_iou
        self.ap_method = ap_method
        self.min_step = float(min_step)
        self.direction = direction
        self.form = form
        self.normalization = normalization
        self.memory = int(memory)
        self.distributed = bool(distributed)
        self.num_threads = num_threads
        self.smoothing = smoothing
        self.sigma = float(sigma)
        self.samples = int(samples)
        self.seed = int(seed)
        self._calls = 0  # draws of call t: default_rng([seed, t]), so a resume repeats them
        self._memory: deque[Windows] = deque(maxlen=max(self.memory, 1))
        self.last_ap = np.zeros(0)
        self.last_map = float("nan")

    @classmethod
    def from_config(cls, lc, *, seed: int = 0, distributed: bool = False) -> MAPLoss:
        """The loss of a configuration's ``loss`` section (:class:`mapdet.config.LossConfig`,
        or any object with its attributes): thresholds, AP, pseudo-gradient rule and scaling,
        form, memory, threads (``0``: all cores) and smoothing; ``seed`` seeds the smoothing's
        draws (the CLI passes ``train.seed``), ``distributed`` gathers every rank's windows."""
        return cls(score_threshold=lc.score_threshold, nms_iou=lc.nms_iou,
                   match_iou=lc.match_iou, ap_method=lc.ap_method, min_step=lc.min_step,
                   form=lc.form, memory=lc.memory, distributed=distributed,
                   num_threads=lc.num_threads or None, normalization=lc.normalization,
                   direction=lc.direction, smoothing=lc.smoothing, sigma=lc.sigma,
                   samples=lc.samples, seed=seed)

    def extra_repr(self) -> str:
        return (f"score_threshold={self.score_threshold}, nms_iou={self.nms_iou}, "
                f"match_iou={self.match_iou}, ap_method={self.ap_method!r}, "
                f"min_step={self.min_step}, direction={self.direction!r}, form={self.form!r}, "
                f"normalization={self.normalization!r}, memory={self.memory}, "
                f"distributed={self.distributed}"
                + (f", smoothing={self.smoothing!r}, sigma={self.sigma}, "
                   f"samples={self.samples}" if self.smoothing != "none" else ""))

    def reset_memory(self) -> None:
        """Forget the stored minibatches."""
        self._memory.clear()

    def get_extra_state(self) -> dict:
        """The AP memory, so that ``state_dict()`` (and a checkpoint) carries it: a resumed
        run then sees the same AP context as an uninterrupted one. Arrays are stored as
        tensors so that ``torch.load(..., weights_only=True)`` accepts them."""
        return {"calls": self._calls, "memory": [
            {f.name: (getattr(w, f.name) if f.name == "num_images"
                      else torch.from_numpy(np.array(getattr(w, f.name))))
             for f in dataclasses.fields(w) if f.name != "fixed"}
            for w in self._memory]}

    def set_extra_state(self, state: dict) -> None:
        self._calls = int(state.get("calls", 0))
        self._memory.clear()
        for w in state.get("memory", []):
            self._memory.append(Windows(**{
                k: int(v) if k == "num_images" else
                (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in w.items()}))  # their fixed parts are rebuilt when first needed

    def _fixed(self, w: Windows) -> FixedDetections:
        """``w``'s fixed parts for the current detection function, computed once."""
        f = w.fixed
        if f is None or f.tau != self.score_threshold or f.nu != self.nms_iou:
            f = w.fixed = fix_detections(
                w.probs, w.boxes, w.image_ids, w.gt_boxes, w.gt_labels, w.gt_image_ids,
                w.gt_difficult, score_threshold=self.score_threshold, nms_iou=self.nms_iou)
        return f

    def forward(self, probs: torch.Tensor, boxes, image_ids, targets) -> torch.Tensor:
        current = windows_from_tensors(probs, boxes, image_ids, targets)
        local = current
        rank_slices = None
        world = 1
        if self.distributed:
            local, rank_slices, world = _gather_windows(current)
        fixed = []
        if self.memory and self._memory:
            k_old = self._memory[0].probs.shape[1]
            if k_old != local.probs.shape[1]:
                raise ValueError(
                    f"MAPLoss(memory={self.memory}): probs has K = {local.probs.shape[1]} "
                    f"classes but the stored minibatches have K = {k_old}; call "
                    "reset_memory() when the number of classes changes")
            # The AP context is Windows.concat([local, *self._memory]) with only the current
            # windows queried; the stored ones enter as their fixed parts, in deque order.
            fixed = [self._fixed(w) for w in self._memory]
        aps, grads = self._ap_and_gradient(local, fixed)
        if self.memory:
            stored = _detached_detections(local, self.score_threshold)
            self._fixed(stored)  # once, as it enters the memory
            self._memory.appendleft(stored)
        defined = ~np.isnan(aps)
        self.last_ap = aps
        n_def = int(defined.sum())
        if n_def == 0:
            self.last_map = float("nan")
            loss_value, base = 0.0, 0.0
        else:
            m_ap = float(aps[defined].mean())
            self.last_map = m_ap
            if self.form == "one_minus":
                loss_value, base = 1.0 - m_ap, 1.0 / n_def
            else:
                floor = max(m_ap, NEG_LOG_FLOOR)
                loss_value, base = -math.log(floor), 1.0 / (n_def * floor)
        # The scale is a function of the global batch's gradient, so every rank uses the same.
        scale = normalization_scale(grads, base, self.normalization)
        if rank_slices is not None:
            grads = grads[rank_slices] * world
        grad_probs = _to_device(-scale * grads, probs)
        value = torch.full((), loss_value, dtype=probs.dtype, device=probs.device)
        return PrecomputedGradient.apply(probs, value, grad_probs)


    def _ap_and_gradient(self, w: Windows, fixed) -> tuple[np.ndarray, np.ndarray]:
        """Per-class APs and the gradient rule's ``(N, K)`` gradient of each class's AP."""
        kw = dict(score_threshold=self.score_threshold, nms_iou=self.nms_iou,
                  match_iou=self.match_iou, ap_method=self.ap_method)
        args = (w.boxes, w.image_ids, w.gt_boxes, w.gt_labels, w.gt_image_ids, w.gt_difficult)

        def exact(probs):
            return ap_pseudo_gradient_multiclass(
                probs, *args, **kw, min_step=self.min_step, num_threads=self.num_threads,
                direction=self.direction, fixed=fixed)

        if self.smoothing == "none":
            return exact(w.probs)
        rng = np.random.default_rng([self.seed, self._calls])
        self._calls += 1
        noise = rng.standard_normal((self.samples, *w.probs.shape))
        if self.smoothing == "perturbed":
            return perturbed_gradient_multiclass(w.probs, *args, **kw, noise=noise,
                                                 sigma=self.sigma)
        aps = perturbed_gradient_multiclass(w.probs, *args, **kw, noise=noise[:0],
                                            sigma=self.sigma)[0]
        grads = sum(exact(w.probs + self.sigma * z)[1] for z in noise) / self.samples
        return aps, grads


def _detached_detections(w: Windows, score_threshold: float) -> Windows:
    """What the memory keeps of a minibatch: windows scoring above the threshold in some
    class (the others can never be detections) and all the ground truth."""
    keep = (w.probs > score_threshold).any(axis=1)
    return Windows(
        probs=w.probs[keep].copy(), boxes=w.boxes[keep].copy(), image_ids=w.image_ids[keep],
        gt_boxes=w.gt_boxes, gt_labels=w.gt_labels, gt_image_ids=w.gt_image_ids,
        gt_difficult=w.gt_difficult, num_images=w.num_images,
    )


def _gather_windows(w: Windows) -> tuple[Windows, slice, int]:
    """All ranks' windows, concatenated in rank order; this rank's rows; the world size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("MAPLoss(distributed=True) needs torch.distributed to be "
                           "initialised (launch with torchrun)")
    world = dist.get_world_size()
    parts: list[Windows | None] = [None] * world
    dist.all_gather_object(parts, w)
    rank = dist.get_rank()
    start = sum(p.probs.shape[0] for p in parts[:rank])
    return Windows.concat(parts), slice(start, start + w.probs.shape[0]), world


class NMSAPLoss(nn.Module):
    """AP-Loss's ranking-pair update on the detection list after the test-time NMS.

    Per class ``c`` with a non-difficult ground truth, the windows' class scores go through
    the detection function (``prob > score_threshold``, greedy NMS at ``nms_iou``); its
    detections, labelled TP / FP / ignored at ``match_iou`` as the AP labels them, form the
    list on which :func:`mapdet.ranking.ap_loss` (Chen et al., CVPR 2019: every mis-ordered
    TP-FP pair contributes through the step function interpolated over ``delta``) acts on
    the log-odds ``log p - log(1 - p)`` of the probabilities, which rank as the
    probabilities do **[our choice]**. The class's loss is AP-Loss times ``|TP| / npos``
    (its error-driven terms divided by the class's ground-truth count, as the AP's are);
    the loss is the mean over the classes with a defined AP. Only detections get a gradient,
    so NMS stays inside the loss: a suppressed window gets none.

    ``forward(probs (N, K), boxes (N, K, 4) | (N, 4), image_ids (N,), targets)`` as
    :class:`MAPLoss`; ``last_ap``/``last_map`` hold the list's APs after a call.
    """

    def __init__(self, score_threshold: float = D.SCORE_THRESHOLD, nms_iou: float = D.NMS_IOU,
                 match_iou: float = D.MATCH_IOU, delta: float = 1.0):
        super().__init__()
        check_iou_threshold("nms_iou", nms_iou)
        if len(match_thresholds(match_iou)) != 1:
            raise ValueError(f"NMSAPLoss takes one match_iou, got {match_iou!r}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.match_iou = float(match_thresholds(match_iou)[0])
        self.delta = float(delta)
        self.last_ap = np.zeros(0)
        self.last_map = float("nan")

    def forward(self, probs: torch.Tensor, boxes, image_ids, targets) -> torch.Tensor:
        w = windows_from_tensors(probs, boxes, image_ids, targets)
        k = w.probs.shape[1]
        losses, aps = [], np.full(k, np.nan)
        for c in range(k):
            g = w.gt_labels == c
            gt = GroundTruth(w.gt_boxes[g], w.gt_image_ids[g], w.gt_difficult[g])
            if gt.npos == 0:
                continue
            b = w.boxes[:, c] if w.boxes.ndim == 3 else w.boxes
            keep = greedy_nms(w.probs[:, c], b, w.image_ids, score_threshold=self.score_threshold,
                              nms_iou=self.nms_iou)
            best, best_iou = best_ground_truth(b[keep], w.image_ids[keep], gt)
            labels = label_detections(best, best_iou, gt.difficult, self.match_iou)
            aps[c] = ap_from_labels(labels, gt.npos)
            if keep.size == 0:
                losses.append(probs.sum() * 0.0)
                continue
            idx = torch.as_tensor(keep, device=probs.device)
            p = probs[idx, c].double().clamp(1e-12, 1.0 - 1e-7)
            x = torch.log(p) - torch.log1p(-p)
            lab = torch.as_tensor(labels.astype(np.int64), device=probs.device)
            n_tp = int((labels == 1).sum())
            losses.append(ap_loss(x, lab, self.delta) * (n_tp / gt.npos))
        self.last_ap = aps
        defined = ~np.isnan(aps)
        self.last_map = float(aps[defined].mean()) if defined.any() else float("nan")
        if not losses:
            return probs.sum() * 0.0
        return (torch.stack(losses).sum() / len(losses)).to(probs.dtype)
