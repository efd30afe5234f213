"""RoI max pooling without autograd, bit-identical to ``torchvision.ops.roi_pool``, faster on CPU.

The mAP loss scores every proposal without autograd (``mapdet.row_subset``); on the digits
benchmark torchvision's CPU ``roi_pool`` kernel then costs more than the whole head after it
(about 40 us per RoI for 128 channels: it walks channel by channel through strided memory and
records the argmax for a backward that is never run). :func:`roi_pool_nograd` computes the
same numbers from channels-last features, one bin at a time for all channels (contiguous,
vectorised), without the argmax. :func:`roi_pool` picks it when no graph is needed (autograd
off or features without ``requires_grad``) for float32 CPU tensors, and torchvision's kernel
otherwise.

The arithmetic is torchvision's CPU kernel's (``roi_pool_kernel.cpp``), in float32: a RoI
``(x1, y1, x2, y2)`` starts at feature cell ``round(x1 * scale)`` (half away from zero) and
ends at ``round(x2 * scale)`` inclusive, at least 1 cell each way; bin ``ph`` of ``P`` covers
rows ``[floor(ph * h / P), ceil((ph + 1) * h / P))`` offset by the start and clipped to the
map; each output is the maximum over its bin (``>`` comparisons, so NaNs are skipped), or
0 for an empty bin. Max is exact, so the outputs equal torchvision's bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torchvision.ops import roi_pool as tv_roi_pool

__all__ = ["roi_pool", "roi_pool_nograd"]

_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True, nogil=True)
def _round_half_away(v):
    """``std::round`` of a float32: to the nearest integer, halves away from zero."""
    t = np.trunc(v)
    frac = v - t  # exact
    if frac >= 0.5:
        t += 1
    elif frac <= -0.5:
        t -= 1
    return int(t)


@njit(cache=True, nogil=True)
def _roi_max_pool(feat, rois, image_of, scale, p, out):
    """``feat (B, H, W, C)`` float32, ``rois (R, 4)`` float32 xyxy input pixels, ``image_of
    (R,)`` int64, ``scale`` float32, ``p`` bins per side -> fills ``out (R, C, p, p)``."""
    h_map, w_map, chans = feat.shape[1], feat.shape[2], feat.shape[3]
    fp = np.float32(p)
    acc = np.empty(chans, dtype=np.float32)
    for r in range(rois.shape[0]):
        b = image_of[r]
        sw = _round_half_away(rois[r, 0] * scale)
        sh = _round_half_away(rois[r, 1] * scale)
        ew = _round_half_away(rois[r, 2] * scale)
        eh = _round_half_away(rois[r, 3] * scale)
        bin_h = np.float32(max(eh - sh + 1, 1)) / fp
        bin_w = np.float32(max(ew - sw + 1, 1)) / fp
        for ph in range(p):
            hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + sh, 0), h_map)
            he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + sh, 0), h_map)
            for pw in range(p):
                ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + sw, 0), w_map)
                we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + sw, 0), w_map)
                if he <= hs or we <= ws:
                    for c in range(chans):
                        out[r, c, ph, pw] = 0.0
                    continue
                for c in range(chans):
                    acc[c] = -_FLT_MAX
                for y in range(hs, he):
                    for x in range(ws, we):
                        for c in range(chans):
                            v = feat[b, y, x, c]
                            if v > acc[c]:
                                acc[c] = v
                for c in range(chans):
                    out[r, c, ph, pw] = acc[c]


def roi_pool_nograd(features: torch.Tensor, boxes: list[torch.Tensor], output_size: int,
                    spatial_scale: float) -> torch.Tensor:
    """``torchvision.ops.roi_pool(features, boxes, output_size, spatial_scale)`` for float32 CPU
    tensors, without autograd (the result has no graph).

    Args:
        features: ``(B, C, H, W)`` float32 on the CPU.
        boxes: ``B`` tensors ``(R_b, 4)`` xyxy in input pixels.
        output_size: ``P``, bins per side.
        spatial_scale: input pixels to feature cells (``1 / stride``).

    Returns:
        ``(sum R_b, C, P, P)`` float32, RoIs in image order.
    """
    if features.dtype != torch.float32 or features.device.type != "cpu":
        raise ValueError(f"roi_pool_nograd: float32 CPU features only, got {features.dtype} "
                         f"on {features.device}")
    if len(boxes) != features.shape[0]:
        raise ValueError(f"roi_pool_nograd: {len(boxes)} box tensors for "
                         f"{features.shape[0]} images")
    p = int(output_size)
    feat = features.detach().permute(0, 2, 3, 1).contiguous().numpy()
    rois = (torch.cat([b.detach().reshape(-1, 4) for b in boxes]) if boxes
            else torch.zeros(0, 4)).to(torch.float32).contiguous().numpy()
    image_of = np.repeat(np.arange(len(boxes), dtype=np.int64), [b.shape[0] for b in boxes])
    out = np.empty((rois.shape[0], features.shape[1], p, p), dtype=np.float32)
    _roi_max_pool(feat, rois, image_of, np.float32(spatial_scale), p, out)
    return torch.from_numpy(out)


def roi_pool(features: torch.Tensor, boxes: list[torch.Tensor], output_size: int,
             spatial_scale: float) -> torch.Tensor:
    """RoI max pooling ``(B, C, H, W), [(R_b, 4)] -> (sum R_b, C, P, P)``:
    :func:`roi_pool_nograd` when no graph is needed and the features are float32 on the CPU,
    ``torchvision.ops.roi_pool`` otherwise (same numbers either way). Reduced-precision CPU
    features (bfloat16, float16 under ``torch.autocast``), which torchvision's CPU kernel
    does not take, are pooled in float32 and cast back: a maximum of values representable in
    the reduced type is one of them, so the result is exact."""
    if features.device.type == "cpu" and features.dtype in (torch.bfloat16, torch.float16):
        pooled = roi_pool(features.float(), [b.float() for b in boxes], output_size,
                          spatial_scale)
        return pooled.to(features.dtype)
    needs_graph = torch.is_grad_enabled() and (
        features.requires_grad or any(b.requires_grad for b in boxes))
    if (not needs_graph and features.dtype == torch.float32 and features.device.type == "cpu"
            and all(b.device.type == "cpu" for b in boxes)):
        return roi_pool_nograd(features, boxes, output_size, spatial_scale)
    return tv_roi_pool(features, boxes, output_size, spatial_scale)
