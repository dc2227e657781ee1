"""Figures: ROC curves, CAM overlays and labelled image strips (CAM panels: `panels`).

matplotlib is imported lazily and only through its object-oriented API with the Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no pyplot, no global backend switch, so
this is safe on headless machines and in threads. Heatmaps are resized with PIL (bilinear).

Image conventions: ``image`` is (H, W), (H, W, 1) or (H, W, 3), float in [0, 1] or uint8.
Heatmaps are (h, w) of any range; each is min-max normalised per map for display (a constant
map shows as zeros) unless stated otherwise (``save_panel(shared_scale=True)`` puts all CAMs of
a panel on one common range). The one normalisation used for display is :func:`display_map`.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np

from divisive_jax.maps import minmax

__all__ = [
  "to_rgb_uint8",
  "display_map",
  "joint_range",
  "resize_map",
  "overlay",
  "roc_axis_labels",
  "roc_figure",
  "save_roc",
  "labelled_strip",
]

ROC_TASKS = ("pad", "classification")  # config.task: the words of the ROC axes
PAD_CLASS_NAMES = ("bona fide", "attack")


def to_rgb_uint8(image) -> np.ndarray:
  """(H, W[, 1|3]) float in [0, 1] or uint8 -> (H, W, 3) uint8."""
  x = np.asarray(image)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 2:
    x = np.stack([x] * 3, axis=-1)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3); got {np.shape(image)}")
  if x.dtype == np.uint8:
    return x
  x = np.nan_to_num(x.astype(np.float64))
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display_map(heatmap, value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Normalise a heatmap to [0, 1] for display.

  ``value_range=None``: per-map min-max (`maps.minmax`; a constant map shows as zeros).
  ``(lo, hi)``: the common scale ``(x - lo) / (hi - lo)``, clipped to [0, 1] (used to compare
  several maps); an empty or non-finite range gives zeros.
  """
  x = np.asarray(heatmap, dtype=np.float64)
  if value_range is None:
    return minmax(np.nan_to_num(x))
  lo, hi = map(float, value_range)
  if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
    return np.zeros_like(x)
  return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def joint_range(heatmaps) -> tuple[float, float]:
  """(min, max) over all finite values of several raw maps (the shared display scale)."""
  v = np.concatenate([np.zeros(0)] + [np.asarray(m, dtype=np.float64).ravel() for m in heatmaps])
  v = v[np.isfinite(v)]
  return (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)


def resize_map(heatmap, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a 2-D float map to ``(H, W)`` (PIL, float32 'F' mode)."""
  from PIL import Image

  m = np.asarray(heatmap, dtype=np.float32)
  if m.ndim != 2:
    raise ValueError(f"heatmap must be 2-D, got shape {m.shape}")
  h, w = int(size_hw[0]), int(size_hw[1])
  if m.shape == (h, w):
    return m.astype(np.float64)
  out = Image.fromarray(m).resize((w, h), resample=Image.BILINEAR)
  return np.asarray(out, dtype=np.float64)


def _colormap(name: str):
  import matplotlib

  return matplotlib.colormaps[name]


def overlay(
  image,
  heatmap,
  alpha: float = 0.5,
  cmap: str = "jet",
  normalize: bool = True,
  *,
  value_range: tuple[float, float] | None = None,
) -> np.ndarray:
  """Blend a colour-mapped heatmap onto an image -> (H, W, 3) uint8 RGB.

  The heatmap is normalised by :func:`display_map` (per-map min-max, or the common
  ``value_range`` when given; with ``normalize=False`` and no ``value_range`` it is only
  clipped to [0, 1]), resized bilinearly to the image size and mapped through ``cmap``
  ('jet'); the result is ``(1 - alpha) * image + alpha * colour``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  rgb = to_rgb_uint8(image).astype(np.float64) / 255.0
  m = np.asarray(heatmap, dtype=np.float64)
  if normalize or value_range is not None:
    m = display_map(m, value_range)
  else:
    m = np.clip(np.nan_to_num(m), 0.0, 1.0)
  m = np.clip(resize_map(m, rgb.shape[:2]), 0.0, 1.0)
  colour = _colormap(cmap)(m)[..., :3]
  out = (1.0 - alpha) * rgb + alpha * colour
  return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_figure(fig, path) -> str:
  """Render ``fig`` with the Agg canvas and write it to ``path`` (folders created)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path)
  return path


# ---------------------------------------------------------------------------------------- ROC
def roc_axis_labels(task: str = "pad", class_names: Sequence[str] = PAD_CLASS_NAMES):
  """(x label, y label) of a ROC plot in the task's words; ``class_names`` = (negative, positive).

  ``'pad'`` (ISO/IEC 30107-3): x "BPCER (<neg> classified as <pos>)", y "1 - APCER (<pos>
  detected)" (the generic name 'attack' reads "attacks detected"). ``'classification'``:
  x "FPR (<neg> classified as <pos>)", y "TPR (<pos> recognised)".
  """
  if task not in ROC_TASKS:
    raise ValueError(f"unknown ROC task {task!r}; expected one of {ROC_TASKS}")
  names = tuple(str(c) for c in class_names)
  if len(names) != 2:
    raise ValueError(f"class_names must be (negative, positive), got {tuple(class_names)!r}")
  neg, pos = names
  if task == "pad":
    detected = "attacks" if pos == "attack" else pos
    return f"BPCER ({neg} classified as {pos})", f"1 - APCER ({detected} detected)"
  return f"FPR ({neg} classified as {pos})", f"TPR ({pos} recognised)"


def roc_figure(
  fpr,
  tpr,
  auroc: float | None = None,
  title: str = "ROC",
  dpi: int = 100,
  *,
  task: str = "pad",
  class_names: Sequence[str] = PAD_CLASS_NAMES,
):
  """A ROC curve (x: FPR, y: TPR) as a ``matplotlib.figure.Figure`` (`save_roc` writes it).

  Axis labels are in the task's words (:func:`roc_axis_labels`): ``task='pad'`` (default)
  BPCER / 1 - APCER, ``task='classification'`` FPR / TPR; ``class_names`` = (negative,
  positive). ``auroc`` (may be None/NaN) goes into the legend.
  """
  from matplotlib.figure import Figure

  xlabel, ylabel = roc_axis_labels(task, class_names)
  fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
  if fpr.shape != tpr.shape or fpr.ndim != 1:
    raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape}, {tpr.shape}")
  fig = Figure(figsize=(4.5, 4.5), dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  label = f"AUROC = {auroc:.4f}" if auroc is not None and np.isfinite(auroc) else "ROC"
  ax.plot(fpr, tpr, color="C0", lw=2, label=label, drawstyle="default")
  ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_xlabel(xlabel, fontsize=9)
  ax.set_ylabel(ylabel, fontsize=9)
  ax.set_title("\n".join(textwrap.wrap(title, 55)) or title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  return fig


def save_roc(path, *args, **kwargs) -> str:
  """Write `roc_figure` (the same arguments) to ``path`` (PNG by extension); returns the path."""
  return save_figure(roc_figure(*args, **kwargs), path)


# -------------------------------------------------------------------------------------- panels
def _font(size: int):
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    return ImageFont.load_default()


def _fit_text(draw, text: str, font, max_w: int) -> str:
  """``text``, shortened with '...' until it fits ``max_w`` pixels."""
  if draw.textlength(text, font=font) <= max_w:
    return text
  while text and draw.textlength(text + "...", font=font) > max_w:
    text = text[:-1]
  return text + "..." if text else ""


def labelled_strip(
  panels: Sequence[tuple[str, np.ndarray]], *, height: int | None = None, gap: int = 4
) -> np.ndarray:
  """Panels side by side, each with its title above it -> one (H, W, 3) uint8 image.

  ``panels``: ``(title, image)`` pairs; images as :func:`to_rgb_uint8` accepts. Images are
  resized (bilinear, aspect kept) to ``height`` (default: the tallest panel's height) when
  they differ. Titles are drawn in black with PIL's default font on a white band above the
  images (shortened with '...' when wider than their panel); ``gap`` white pixels separate
  the panels. For TensorBoard, e.g. ``[("Spoof (p=0.83)", img), ("CAM Spoof", overlay(...)),
  ("human map", overlay(...))]``.
  """
  from PIL import Image, ImageDraw

  if not panels:
    raise ValueError("labelled_strip needs at least one (title, image) panel")
  rgbs = [to_rgb_uint8(img) for _, img in panels]
  h = int(height) if height is not None else max(x.shape[0] for x in rgbs)
  if h < 1:
    raise ValueError(f"height must be positive, got {height}")
  resized = []
  for x in rgbs:
    if x.shape[0] != h:
      w = max(1, round(x.shape[1] * h / x.shape[0]))
      x = np.asarray(Image.fromarray(x).resize((w, h), resample=Image.BILINEAR))
    resized.append(x)

  font = _font(max(10, min(24, h // 14)))
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  top, bottom = probe.textbbox((0, 0), "Ag(p=0.83)|", font=font)[1::2]
  pad = max(2, (bottom - top) // 3)
  band = (bottom - top) + 2 * pad

  width = sum(x.shape[1] for x in resized) + gap * (len(resized) - 1)
  canvas = Image.new("RGB", (width, band + h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  x0 = 0
  for (title, _), x in zip(panels, resized):
    canvas.paste(Image.fromarray(x), (x0, band))
    text = _fit_text(draw, str(title), font, x.shape[1] - 2)
    tw = draw.textlength(text, font=font)
    draw.text((x0 + max(1, (x.shape[1] - tw) / 2), pad - top), text, fill=(0, 0, 0), font=font)
    x0 += x.shape[1] + gap
  return np.asarray(canvas, dtype=np.uint8)
