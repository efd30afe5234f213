"""Pictures of an evaluation: precision-recall curves and detections drawn on an image.

Rendering uses matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``): no display, no pyplot global state, safe in worker threads. Every PNG is
written atomically (:func:`mapdet.io.atomic_write_bytes`).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mapdet.io import atomic_write_bytes

__all__ = [
    "class_colors",
    "detection_grid",
    "draw_detection_grid",
    "draw_detections",
    "plot_pr_curves",
    "render_detections",
    "save_png",
    "tile_images",
]

logger = logging.getLogger(__name__)


def _new_figure(width_px: float, height_px: float, dpi: float):
    """A Figure of ``width_px x height_px`` pixels on an Agg canvas: ``(fig, canvas)``.

    A thousandth of a pixel is added so that Agg's truncation of ``inches * dpi`` cannot lose
    a pixel to rounding.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=((width_px + 1e-3) / dpi, (height_px + 1e-3) / dpi), dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def class_colors(num_classes: int) -> list[tuple[float, float, float]]:
    """``num_classes`` distinct RGB colours in ``[0, 1]`` (tab10 up to 10, tab20 up to 20, then
    hsv)."""
    from matplotlib import colormaps

    if num_classes <= 10:
        cmap, n = colormaps["tab10"], 10
    elif num_classes <= 20:
        cmap, n = colormaps["tab20"], 20
    else:
        cmap, n = colormaps["hsv"], num_classes
    return [tuple(float(v) for v in cmap(i / n if n > 20 else i)[:3]) for i in range(num_classes)]


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "Precision-recall",
    *,
    ap: Mapping[str, float] | None = None,
    size: tuple[int, int] = (1000, 640),
    dpi: int = 100,
) -> Path:
    """One PNG with one precision-recall line per class.

    Args:
        curves: class name -> ``(recall (D,), precision (D,))``, e.g. ``EvalResult.curves`` or
            :func:`mapdet.core.ap.precision_recall_curve`. Curves with NaN recall (no positive)
            are skipped.
        path: the PNG file.
        title: the plot's title.
        ap: class name -> AP, shown in the legend (``"car (AP 0.712)"``).
        size: ``(width, height)`` in pixels.
        dpi: resolution (sets the size of text).

    Returns:
        ``path``.
    """
    fig, _ = _new_figure(size[0], size[1], dpi)
    ax = fig.add_axes([0.07, 0.09, 0.62, 0.83])
    colors = class_colors(len(curves))
    for (name, (recall, precision)), color in zip(curves.items(), colors, strict=True):
        recall = np.asarray(recall, dtype=np.float64)
        precision = np.asarray(precision, dtype=np.float64)
        if recall.size and np.isnan(recall).all():
            logger.debug("plot_pr_curves: class %r has no positive; skipped", name)
            continue
        label = name
        if ap is not None and name in ap and not math.isnan(ap[name]):
            label = f"{name} (AP {ap[name]:.3f})"
        ax.plot(recall, precision, color=color, linewidth=1.4, label=label)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                  ncol=1 if len(ax.lines) <= 20 else 2, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _as_arrays(dets, keys: Sequence[str]) -> list[np.ndarray]:
    """Entries of a detection/ground-truth mapping (or an object with those attributes)."""
    out = []
    for key in keys:
        value = dets[key] if isinstance(dets, Mapping) else getattr(dets, key)
        out.append(np.asarray(value))
    return out


def render_detections(
    image_rgb: np.ndarray,
    detections: Mapping,
    class_names: Sequence[str],
    gt=None,
    score_threshold: float = 0.5,
    *,
    dpi: int = 100,
) -> np.ndarray:
    """Draw detections (and optionally the ground truth) on an image, into an array.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB.
        detections: ``{"boxes" (D, 4) continuous xyxy, "scores" (D,), "labels" (D,) in
            0..K-1}`` (numpy arrays, or anything ``np.asarray`` takes).
        class_names: the ``K`` class names.
        gt: optional ground truth drawn as dashed white boxes: a mapping with ``"boxes"`` and
            ``"labels"``, or an :class:`~mapdet.data.base.ImageRecord`.
        score_threshold: detections scoring below it are not drawn.
        dpi: sets the size of the text relative to the image.

    Returns:
        ``(H, W, 3)`` uint8 RGB, the image's own size.
    """
    from matplotlib.patches import Rectangle

    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_rgb must have shape (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    fig, canvas = _new_figure(w, h, dpi)
    ax = fig.add_axes([0.0, 0.0, 1.0, 1.0])
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    fontsize = float(np.clip(min(w, h) / 40.0, 6.0, 14.0)) * 100.0 / dpi
    linewidth = max(1.0, min(w, h) / 250.0) * 100.0 / dpi

    if gt is not None:
        (gt_boxes,) = _as_arrays(gt, ("boxes",))
        for box in gt_boxes.reshape(-1, 4):
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                   linestyle="--", linewidth=linewidth))

    boxes, scores, labels = _as_arrays(detections, ("boxes", "scores", "labels"))
    colors = class_colors(len(class_names))
    keep = np.flatnonzero(scores.reshape(-1) >= score_threshold)
    for i in keep[np.argsort(scores[keep], kind="stable")]:  # best drawn last, on top
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        color = colors[int(labels[i])]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                               linewidth=linewidth * 1.5))
        ax.text(x1, y1, f"{class_names[int(labels[i])]} {float(scores[i]):.2f}",
                fontsize=fontsize, color="white", va="bottom" if y1 > 2 * fontsize else "top",
                ha="left", clip_on=True,
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1.5, "alpha": 0.85})
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:h, :w, :3])


def save_png(image_rgb: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB array as a PNG, atomically; returns ``path``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_rgb, dtype=np.uint8)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def draw_detections(
    image_rgb: np.ndarray,
    detections: Mapping,
    class_names: Sequence[str],
    path: str | Path,
    gt=None,
    score_threshold: float = 0.5,
    *,
    dpi: int = 100,
) -> Path:
    """:func:`render_detections` written to the PNG ``path`` (``W x H`` pixels); returns it."""
    return save_png(render_detections(image_rgb, detections, class_names, gt=gt,
                                      score_threshold=score_threshold, dpi=dpi), path)


def tile_images(tiles: Sequence[np.ndarray], columns: int = 2) -> np.ndarray:
    """Tile ``(H_i, W_i, 3)`` uint8 images row by row, ``columns`` per row, on white; each
    cell is as large as the largest tile. Returns ``(rows * H, cols * W, 3)`` uint8."""
    if not tiles:
        raise ValueError("tile_images: no images")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    grid = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * th:r * th + t.shape[0], c * tw:c * tw + t.shape[1]] = t
    return grid


def detection_grid(dataset, detections: Mapping[str, Mapping], *, score_threshold: float = 0.5,
                   min_side: int = 320, columns: int = 2) -> np.ndarray:
    """The detections (and dashed ground truth) of a few images of ``dataset``, tiled.

    Args:
        dataset: a :class:`~mapdet.data.base.DetectionDataset` (``index_of``, ``load_image``,
            ``records``, ``class_names``).
        detections: image id -> ``{"boxes", "scores", "labels"}`` in the image's pixels.
        score_threshold: detections below it are not drawn.
        min_side: images whose shorter side is smaller are upscaled to it (legible labels).
        columns: images per row.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    import cv2

    tiles = []
    for image_id, det in detections.items():
        i = dataset.index_of(image_id)
        image = dataset.load_image(i)
        f = max(1.0, min_side / min(image.shape[:2]))
        if f > 1.0:
            image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        rec = dataset.records[i]
        gt = {"boxes": rec.boxes * f, "labels": rec.labels}
        scaled = {"boxes": np.asarray(det["boxes"]) * f, "scores": det["scores"],
                  "labels": det["labels"]}
        tiles.append(render_detections(image, scaled, dataset.class_names, gt=gt,
                                       score_threshold=score_threshold))
    return tile_images(tiles, columns)


def draw_detection_grid(dataset, detections: Mapping[str, Mapping], path: str | Path, *,
                        score_threshold: float = 0.5, min_side: int = 320,
                        columns: int = 2) -> Path:
    """:func:`detection_grid` written to the PNG ``path``; returns it."""
    return save_png(detection_grid(dataset, detections, score_threshold=score_threshold,
                                   min_side=min_side, columns=columns), path)
