"""The divergence evaluator: the Divisive Decisions post-hoc tool, batch by batch.

Per image: the raw CAM of the PREDICTED class and of the OTHER class (the eval step's maps) and
``D = norm(CAM_pred) - norm(CAM_other)`` on the CAM grid (`divisive_jax.divergence`); where a
human map exists it is brought to the CAM grid (bilinear, antialiased, min-max normalised) and
``H > 0.5`` counts as inside. `update` and `summary` compute; `write` draws and saves
(process 0; ``write_files=False`` on the others keeps no panel data):

* ``panels/<id>.png``: image | CAM pred | CAM other | D | human map, with colour bars
  (``shared_scale``: one colour range for both CAMs);
* ``ranking.csv``: images by divergence energy sum|D| (descending) with their top 3 regions;
* ``regions.json``: the per-image `divergence.divergence_summary` in ranking order, and the
  per-class mean maps ``mean_divergence_{pred,true}_<class>.{npy,png}``: for class c the
  class-oriented ``D_c = norm(CAM_c) - norm(CAM_other)`` averaged over the images PREDICTED as
  c (= the mean of D) and over the images of TRUE class c (needs labels).
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import Any

import numpy as np

from divisive_jax import divergence, jsonio
from divisive_jax.maps import MASK_THRESHOLD, minmax

TOP_REGIONS_IN_CSV = 3
_COLUMNS = (
  "rank id panel label true_class pred pred_class score energy d_mean_abs d_min d_max "
  "human_energy_share human_area_fraction n_regions"
).split()
_REGION_COLUMNS = "supports energy_share centroid_row_frac centroid_col_frac bbox human_share"


def safe_name(name: str, taken: set) -> str:
  """A file name from an id: [A-Za-z0-9._-] kept, the rest '_'; a suffix keeps names unique."""
  base = (re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image")[:150]
  out, k = base, 1
  while out in taken:
    k += 1
    out = f"{base}_{k}"
  taken.add(out)
  return out


class DivergenceEvaluator:
  key = "divergence"
  output_keys = ("maps", "pred", "score")
  host_keys = ("id", "label", "has_saliency", "saliency", "image")
  extra_args = ("labels_known", "write_files")

  def __init__(
    self,
    ctx,
    labels_known: bool = True,
    write_files: bool = True,
    top_fraction: float = 0.1,
    max_regions: int = 10,
    shared_scale: bool = False,
  ):
    if not 0.0 < float(top_fraction) <= 1.0:
      raise ValueError(f"top_fraction must be a fraction in (0, 1], got {top_fraction}")
    self.ctx, self.labels_known = ctx, labels_known
    self.write_files, self.top_fraction = write_files, float(top_fraction)
    self.max_regions, self.shared_scale = int(max_regions), bool(shared_scale)
    self.entries: list[dict] = []
    self.panels: list[tuple[str, dict]] = []  # what `write` draws: (path, `save_panel` args)
    self.names: set = set()
    self.groups: dict[tuple[str, int], dict] = {}
    self.means: dict[str, dict] = {}  # the class mean maps `write` saves
    self.grid = None

  def _add(self, group, c, d, image, human):
    g = self.groups.setdefault((group, c), dict(n=0, d=0.0, image=0.0, n_human=0, human=0.0))
    g["n"] += 1
    g["d"] = g["d"] + d
    g["image"] = g["image"] + image.astype(np.float64)
    if human is not None:
      g["n_human"] += 1
      g["human"] = g["human"] + human

  def update(self, host: dict, outputs: dict) -> None:
    if not self.write_files:
      return
    import jax.numpy as jnp

    from divisive_jax import cams

    maps = np.asarray(outputs["maps"], np.float64)  # (n, 2, h, w)
    n, _, h, w = maps.shape
    self.grid = [h, w]
    rows = np.arange(n)
    pred = np.asarray(outputs["pred"], np.int64)
    score = np.asarray(outputs["score"], np.float64)
    has_map = (np.asarray(host["has_saliency"]) > 0) & self.labels_known
    human_grid = np.zeros((n, h, w))
    if has_map.any():
      small = cams.resize(jnp.asarray(host["saliency"][has_map], jnp.float32), (h, w))
      human_grid[has_map] = minmax(np.asarray(small, np.float64))
    cam_pred, cam_other = maps[rows, pred], maps[rows, 1 - pred]
    norm = minmax(maps)  # (n, 2, h, w)
    d = norm[rows, pred] - norm[rows, 1 - pred]  # (n, h, w): D of every image, computed once
    cn = self.ctx.class_names
    for i in range(n):
      human = human_grid[i] if has_map[i] else None
      summary = divergence.summarize(
        d[i],
        bool(np.ptp(cam_pred[i]) == 0),
        bool(np.ptp(cam_other[i]) == 0),
        human,
        self.top_fraction,
        MASK_THRESHOLD,
        self.max_regions,
      )
      label = int(host["label"][i]) if self.labels_known else None
      ident, p = str(host["id"][i]), int(pred[i])
      panel = os.path.join("panels", f"{safe_name(ident, self.names)}.png")
      true_txt = f"true {cn[label]} | " if label is not None else ""
      title = (
        f"{ident if len(ident) <= 48 else '...' + ident[-45:]}\n{true_txt}pred {cn[p]} "
        f"(P({cn[1]}) = {score[i]:.3f}), sum|D| = {summary['energy']:.1f}"
      )
      self.panels.append(
        (
          panel,
          dict(
            image=host["image"][i],
            maps={f"CAM pred ({cn[p]})": cam_pred[i], f"CAM other ({cn[1 - p]})": cam_other[i]},
            human_map=host["saliency"][i] if has_map[i] else None,
            title=title,
            divergence=d[i],
          ),
        )
      )
      self.entries.append(
        dict(
          id=ident,
          panel=panel,
          label=label,
          true_class=cn[label] if label is not None else None,
          pred=p,
          pred_class=cn[p],
          score=float(score[i]),
          has_human_map=bool(has_map[i]),
          summary=summary,
        )
      )
      self._add("pred", p, d[i], host["image"][i], human)
      if label is not None:
        self._add("true", label, norm[i, label] - norm[i, 1 - label], host["image"][i], human)

  def _class_means(self) -> dict:
    out = {}
    for group in ("pred", "true") if self.labels_known else ("pred",):
      for c, cname in enumerate(self.ctx.class_names):
        key, g = f"{group}_{cname}", self.groups.get((group, c))
        if g is None:
          out[key] = {"group": group, "class": cname, "n": 0}
          continue
        mean_d = (g["d"] / g["n"]).astype(np.float32)
        stem = f"mean_divergence_{group}_{safe_name(cname, set())}"
        what = "predicted as" if group == "pred" else "of true class"
        self.means[stem] = dict(
          mean_d=mean_d,
          title=f"mean D_{cname} over {g['n']} images {what} {cname}",
          class_name=cname,
          mean_image=g["image"] / g["n"],
          mean_human=g["human"] / g["n_human"] if g["n_human"] else None,
        )
        peak = np.unravel_index(int(np.argmax(mean_d)), mean_d.shape)
        low = np.unravel_index(int(np.argmin(mean_d)), mean_d.shape)
        out[key] = {
          "group": group,
          "n": int(g["n"]),
          "n_with_human_map": int(g["n_human"]),
          "npy": stem + ".npy",
          "png": stem + ".png",
          "mean_abs": float(np.abs(mean_d).mean()),
          "energy": float(np.abs(mean_d).sum()),
          "max": float(mean_d.max()),
          "max_at": [int(peak[0]), int(peak[1])],
          "min": float(mean_d.min()),
          "min_at": [int(low[0]), int(low[1])],
          "class": cname,
        }
    return out

  def summary(self) -> dict[str, Any]:
    entries = sorted(self.entries, key=lambda e: (-e["summary"]["energy"], e["id"]))
    for rank, e in enumerate(entries, 1):
      e["rank"] = rank
    self.entries = entries
    return {
      "n_images": len(entries),
      "class_names": list(self.ctx.class_names),
      "cam_grid": self.grid,
      "top_fraction": self.top_fraction,
      "human_threshold": MASK_THRESHOLD,
      "divergence": "D = norm(CAM_pred) - norm(CAM_other), per-image min-max, on the CAM grid; "
      "D > 0: evidence for the predicted class",
      "ranking": "images sorted by energy = sum |D| (descending)",
      "class_mean_maps": "D_c = norm(CAM_c) - norm(CAM_other) averaged over the images predicted "
      "as c ('pred_<c>') and of true class c ('true_<c>')",
      "class_means": self._class_means() if self.write_files else {},
      "images": entries,
    }

  def write(self, directory: str, summary: dict) -> None:
    from divisive_jax import panels

    os.makedirs(os.path.join(directory, "panels"), exist_ok=True)
    for path, p in self.panels:
      panels.save_panel(os.path.join(directory, path), shared_scale=self.shared_scale, **p)
    for stem, m in self.means.items():
      np.save(os.path.join(directory, stem + ".npy"), m["mean_d"])
      save_mean_map(os.path.join(directory, stem + ".png"), **m)
    jsonio.write_json(os.path.join(directory, "regions.json"), summary, indent=1)
    jsonio.write_text(os.path.join(directory, "ranking.csv"), _ranking_csv(summary["images"]))


def _ranking_csv(entries: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  regions = _REGION_COLUMNS.split()
  w.writerow(_COLUMNS + [f"top{k}_{c}" for k in range(1, TOP_REGIONS_IN_CSV + 1) for c in regions])
  fmt = lambda v: "" if v is None else (repr(float(v)) if isinstance(v, float) else v)
  for e in entries:
    s = e["summary"]
    row = [fmt(e[c] if c in e else s.get(c)) for c in _COLUMNS]  # the entry's, else its summary's
    top = s["top_regions"][:TOP_REGIONS_IN_CSV]
    for r in top:
      (row_frac, col_frac), bbox = r["centroid_frac"], " ".join(map(str, r["bbox"]))
      r = dict(r, centroid_row_frac=row_frac, centroid_col_frac=col_frac, bbox=bbox)
      row += [fmt(r.get(c)) for c in regions]
    w.writerow(row + [""] * len(regions) * (TOP_REGIONS_IN_CSV - len(top)))
  return buf.getvalue()


def save_mean_map(path, mean_d, title, class_name, mean_image=None, mean_human=None, dpi=100):
  """Mean image | mean divergence (RdBu_r, symmetric range) | mean human map."""
  from matplotlib.figure import Figure

  from divisive_jax import plots

  panels = []
  if mean_image is not None:
    panels.append(("mean image", plots.to_rgb_uint8(mean_image), None))
  lim = float(np.max(np.abs(mean_d))) or 1.0
  shown = mean_d if mean_image is None else plots.resize_map(mean_d, mean_image.shape[:2])
  panels.append((f"mean D (red: evidence for {class_name})", shown, lim))
  if mean_human is not None:
    panels.append(("mean human map", plots.overlay(mean_image, mean_human, 0.5), None))
  fig = Figure(figsize=(2.9 * len(panels), 3.1), dpi=dpi)
  for i, (name, arr, lim_i) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    if lim_i is None:
      ax.imshow(arr)
    else:
      im = ax.imshow(arr, cmap="RdBu_r", vmin=-lim_i, vmax=lim_i)
      fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(name, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return plots.save_figure(fig, path)
