"""Figures: ROC curves, CAM overlays and CAM / divergence panels.

matplotlib is imported lazily and only through its object-oriented API with the Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no pyplot, no global backend switch, so
this is safe on headless machines and in threads. Heatmaps are resized with PIL (bilinear).

Image conventions: ``image`` is (H, W), (H, W, 1) or (H, W, 3), float in [0, 1] or uint8.
Heatmaps are (h, w) of any range; each is min-max normalised per map for display (a constant
map shows as zeros) unless stated otherwise.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

__all__ = ["to_rgb_uint8", "resize_map", "overlay", "save_roc", "save_panel"]


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


def _minmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  lo, hi = x.min(), x.max()
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


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
  image, heatmap, alpha: float = 0.5, cmap: str = "jet", normalize: bool = True
) -> np.ndarray:
  """Blend a colour-mapped heatmap onto an image -> (H, W, 3) uint8 RGB.

  The heatmap is min-max normalised (if ``normalize``; otherwise clipped to [0, 1]), resized
  bilinearly to the image size and mapped through ``cmap`` ('jet'); the result is
  ``(1 - alpha) * image + alpha * colour``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  rgb = to_rgb_uint8(image).astype(np.float64) / 255.0
  m = np.asarray(heatmap, dtype=np.float64)
  m = _minmax(m) if normalize else np.clip(np.nan_to_num(m), 0.0, 1.0)
  m = np.clip(resize_map(m, rgb.shape[:2]), 0.0, 1.0)
  colour = _colormap(cmap)(m)[..., :3]
  out = (1.0 - alpha) * rgb + alpha * colour
  return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(fig, path) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  path = os.fspath(path)
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path)
  return path


def save_roc(path, fpr, tpr, auroc: float | None = None, title: str = "ROC", dpi: int = 100) -> str:
  """Write a ROC curve (x: BPCER = FPR, y: 1 - APCER = TPR) to ``path`` (PNG by extension).

  ``auroc`` (may be None/NaN) goes into the legend. Returns the path.
  """
  from matplotlib.figure import Figure

  fpr = np.asarray(fpr, dtype=np.float64)
  tpr = np.asarray(tpr, dtype=np.float64)
  if fpr.shape != tpr.shape or fpr.ndim != 1:
    raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape}, {tpr.shape}")
  fig = Figure(figsize=(4.5, 4.5), dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  label = "ROC"
  if auroc is not None and np.isfinite(auroc):
    label = f"AUROC = {auroc:.4f}"
  ax.plot(fpr, tpr, color="C0", lw=2, label=label, drawstyle="default")
  ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_xlabel("BPCER (false positive rate)")
  ax.set_ylabel("1 - APCER (true positive rate)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  return _save(fig, path)


def save_panel(
  path,
  image,
  maps: Mapping[str, np.ndarray],
  human_map=None,
  title: str = "",
  alpha: float = 0.5,
  divergence: bool = True,
  dpi: int = 100,
) -> str:
  """One row of panels: the image, a jet overlay per map, the divergence, the human map.

  Args:
    image: (H, W[, C]) float [0, 1] or uint8.
    maps: ordered {title: 2-D map}, e.g. {'CAM pred (Spoof)': ..., 'CAM other (Live)': ...};
      maps may be at CAM resolution (resized bilinearly for display).
    human_map: optional 2-D human saliency map, shown as a jet overlay.
    divergence: when True and ``maps`` has at least two entries, add
      ``D = norm(first) - norm(second)`` (the post-hoc divergence of SPEC §1) with the
      diverging colormap 'RdBu_r' on the fixed range [-1, 1] (red: first map's class).
  Returns the path.
  """
  from matplotlib.figure import Figure

  rgb = to_rgb_uint8(image)
  hw = rgb.shape[:2]
  panels: list[tuple[str, np.ndarray, dict]] = [("image", rgb, {})]
  names = list(maps)
  for name in names:
    panels.append((str(name), overlay(rgb, maps[name], alpha), {}))
  if divergence and len(names) >= 2:
    d = _minmax(maps[names[0]]) - _minmax(maps[names[1]])
    d = resize_map(d, hw)
    panels.append(
      (
        f"D = {names[0]} - {names[1]}",
        d,
        {"cmap": "RdBu_r", "vmin": -1.0, "vmax": 1.0, "colorbar": True},
      )
    )
  if human_map is not None:
    panels.append(("human map", overlay(rgb, human_map, alpha), {}))

  n = len(panels)
  fig = Figure(figsize=(2.6 * n, 3.0 if title else 2.7), dpi=dpi)
  for i, (name, arr, kw) in enumerate(panels):
    ax = fig.add_subplot(1, n, i + 1)
    if "cmap" in kw:
      im = ax.imshow(arr, cmap=kw["cmap"], vmin=kw["vmin"], vmax=kw["vmax"])
      if kw.get("colorbar"):
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    else:
      ax.imshow(arr)
    ax.set_title(name, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)
