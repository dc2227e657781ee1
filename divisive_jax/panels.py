"""CAM / divergence panels: the image, a CAM overlay per class map, the divergence and the
human map side by side, each map with a colour bar (`save_panel`).

Conventions of `plots` (images, display normalisation, the Agg canvas). Every CAM is min-max
normalised on its own for display unless ``shared_scale=True`` puts all CAMs of a panel on one
common range of their raw values.
"""

from __future__ import annotations

import textwrap
from typing import Mapping

import numpy as np

from divisive_jax.plots import (
  _colormap,
  display_map,
  joint_range,
  overlay,
  resize_map,
  save_figure,
  to_rgb_uint8,
)

# save_panel layout (inches): every panel is PANEL_WIDTH wide (an image PANEL_IMAGE wide + the
# space between panels), a panel with a colour bar COLORBAR_WIDTH more (gap, bar, ticks, label).
PANEL_WIDTH = 2.6
PANEL_IMAGE = 2.3
COLORBAR_WIDTH = 0.75
_CB_GAP, _CB_BAR = 0.08, 0.12
_TITLE_LINE, _SUPTITLE_LINE, _MARGIN = 0.15, 0.19, 0.12
LABEL_PER_MAP = "per-map min-max"
LABEL_SHARED = "shared scale"


def _panel_title(name: str, width: int = 34) -> str:
  """A panel title wrapped to fit over its image (the divergence breaks before its ' - ')."""
  lines = []
  for part in str(name).replace(" - ", "\n- ").splitlines() if len(name) > width else [name]:
    lines.extend(textwrap.wrap(part, width) or [part])
  return "\n".join(lines)


def panel_figure(
  image,
  maps: Mapping[str, np.ndarray],
  human_map=None,
  title: str = "",
  alpha: float = 0.5,
  divergence: bool | np.ndarray = True,
  dpi: int = 100,
  *,
  shared_scale: bool = False,
):
  """One row of panels: the image, a jet overlay per map, the divergence, the human map, as a
  ``matplotlib.figure.Figure`` (`save_panel` writes it).

  Args:
    image: (H, W[, C]) float [0, 1] or uint8.
    maps: ordered {title: 2-D map}, e.g. {'CAM pred (Spoof)': ..., 'CAM other (Live)': ...};
      maps may be at CAM resolution (resized bilinearly for display).
    human_map: optional 2-D human saliency map, shown as a jet overlay (min-max, colour bar
      0..1).
    divergence: when True and ``maps`` has at least two entries, add
      ``D = norm(first) - norm(second)`` (the post-hoc divergence, per-map min-max; an array
      is taken as D already computed, e.g. on the CAM grid) with the diverging colormap
      'RdBu_r' on the fixed range [-1, 1] (red: first map's class).
    shared_scale: False (default): each CAM is min-max normalised on its own (colour bar 0..1,
      "per-map min-max"). True: all CAMs use the common range [min, max] over the raw maps and
      the colour bar shows those raw values ("shared scale"), so magnitudes can be compared.

  Every panel except the image has a labelled colour bar (a figure axes of its own). The
  figure is ``PANEL_WIDTH`` inches per panel plus ``COLORBAR_WIDTH`` per colour bar wide.
  """
  from matplotlib.cm import ScalarMappable
  from matplotlib.colors import Normalize
  from matplotlib.figure import Figure

  rgb = to_rgb_uint8(image)
  hw = rgb.shape[:2]
  names = list(maps)
  vrange = joint_range([maps[k] for k in names]) if shared_scale and names else None
  if vrange is not None:
    if vrange[1] <= vrange[0]:  # all maps one constant: shown as zeros, i.e. that value
      vrange = (vrange[0], vrange[0] + 1.0)
    cam_norm, cam_label = Normalize(*vrange), LABEL_SHARED
  else:
    cam_norm, cam_label = Normalize(0.0, 1.0), LABEL_PER_MAP
  jet = _colormap("jet")

  # (title, array shown, colour-bar mappable or None, colour-bar label)
  panels: list[tuple[str, np.ndarray, object, str]] = [("image", rgb, None, "")]
  for name in names:
    shown = overlay(rgb, maps[name], alpha, value_range=vrange)
    panels.append((str(name), shown, ScalarMappable(cam_norm, jet), cam_label))
  if isinstance(divergence, np.ndarray) or (divergence is True and len(names) >= 2):
    if not isinstance(divergence, np.ndarray):
      divergence = display_map(maps[names[0]]) - display_map(maps[names[1]])
    d = resize_map(divergence, hw)
    div = ScalarMappable(Normalize(-1.0, 1.0), _colormap("RdBu_r"))
    panels.append((f"D = {names[0]} - {names[1]}", d, div, "D (per-map min-max)"))
  if human_map is not None:
    human = ScalarMappable(Normalize(0, 1), jet)
    panels.append(("human map", overlay(rgb, human_map, alpha), human, LABEL_PER_MAP))

  widths = [PANEL_WIDTH + (COLORBAR_WIDTH if sm is not None else 0.0) for _, _, sm, _ in panels]
  titles = [_panel_title(name) for name, _, _, _ in panels]
  img_w = PANEL_IMAGE * min(1.0, hw[1] / hw[0])  # a tall image is PANEL_IMAGE high
  img_h = img_w * hw[0] / hw[1]
  title_h = _TITLE_LINE * max(len(t.splitlines()) for t in titles) + 0.06
  sup_lines = len(title.splitlines()) if title else 0
  sup_h = _SUPTITLE_LINE * sup_lines + (0.08 if sup_lines else 0.0)
  fig_w, fig_h = sum(widths), _MARGIN + img_h + title_h + sup_h + 0.04
  fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
  left = 0.0
  for (name, arr, sm, label), t, w in zip(panels, titles, widths):
    x0 = left + (PANEL_WIDTH - img_w) / 2
    ax = fig.add_axes((x0 / fig_w, _MARGIN / fig_h, img_w / fig_w, img_h / fig_h))
    if arr.ndim == 2:  # the divergence: values, drawn through its colour map
      ax.imshow(arr, cmap=sm.cmap, norm=sm.norm, aspect="auto")
    else:
      ax.imshow(arr, aspect="auto")
    ax.set_title(t, fontsize=8, pad=3)
    ax.set_xticks([])
    ax.set_yticks([])
    if sm is not None:
      cax = fig.add_axes(
        ((x0 + img_w + _CB_GAP) / fig_w, _MARGIN / fig_h, _CB_BAR / fig_w, img_h / fig_h)
      )
      cax.set_label(f"colorbar: {name}")  # the artist label, to find a panel's bar
      cb = fig.colorbar(sm, cax=cax)
      cb.ax.tick_params(labelsize=7, length=2, pad=1)
      cb.ax.yaxis.get_offset_text().set_fontsize(7)
      cb.set_label(label, fontsize=7, labelpad=2)
    left += w
  if title:
    fig.suptitle(title, fontsize=9, y=1.0 - 0.04 / fig_h, va="top")
  return fig


def save_panel(path, *args, **kwargs) -> str:
  """Write `panel_figure` (the same arguments) to ``path``; returns the path."""
  return save_figure(panel_figure(*args, **kwargs), path)
