r"""The Divisive Decisions post-hoc tool: which image regions separate the two classes.

CLI::

  python -m divisive_jax.explain --workdir=W --out=DIR [--checkpoint=best|latest|STEP]
      [--split=test | --images=GLOB] [--max_images=32] [--top_fraction=0.1] [--batch_size=N]

Library: ``explain(workdir, out, which='best', split='test', images=None, max_images=32,
top_fraction=0.1)``.

Per image (SPEC §1): the raw CAM of the PREDICTED class and of the OTHER class (CAM or Grad-CAM
as ``config.loss.cam_kind``; computed by the evaluation step, `step.make_eval_step`, so there is
one CAM implementation), and the divergence map ``D = norm(CAM_pred) - norm(CAM_other)`` with
per-image min-max normalisation, on the CAM grid (D > 0: evidence for the predicted class, D < 0:
for the other one). `metrics.divergence_summary` ranks the regions where |D| is largest (the
top ``top_fraction`` of |D| pixels, split by sign, grouped into 8-connected components); where a
human map H exists it is brought to the CAM grid (bilinear, antialiased, min-max normalised)
and ``H > 0.5`` counts as inside, giving the share of |D| energy inside the human map.

Outputs in DIR (process 0 writes; every process runs the model):
* ``panels/<id>.png``: image | CAM pred overlay | CAM other overlay | D (RdBu_r on [-1, 1]) |
  human map overlay (when one exists); file name = the example id with characters other than
  ``[A-Za-z0-9._-]`` replaced by ``_`` (a numeric suffix keeps names unique).
* ``ranking.csv``: images sorted by divergence energy sum|D| (descending; CAM grid, so the
  values of one model are comparable), with score, labels, the human-map energy share and the
  top 3 regions (which class they support, energy share, |D|-weighted centroid as fractions of
  height and width, bbox on the CAM grid, share inside the human map).
* ``regions.json``: run metadata and, per image in ranking order, the full
  `metrics.divergence_summary`, plus per-class mean-map statistics.
* Per-class mean divergence maps ``mean_divergence_{pred,true}_<class>.{npy,png}``: for class c
  the class-oriented map ``D_c = norm(CAM_c) - norm(CAM_other)`` averaged over the images
  PREDICTED as c (= the average of D itself), and over the images whose TRUE class is c (equal
  to D for correctly classified images; the sign is flipped for misclassified ones so that red
  always means evidence for c). ``.npy``: float32 on the CAM grid; ``.png``: mean image, mean
  D_c and, where maps exist, the mean human map. Files for an empty group are not written
  (``n = 0`` in regions.json); true-class maps need labels (not available with ``--images``).

Images: ``--split`` takes ``max_images`` examples evenly spaced over the split (0 = all;
evenly spaced so that a split stored class by class still yields both classes). ``--images``
takes files matching GLOB (``**`` recursive; a directory means every image in it), sorted, the
same even spacing; each is read with PIL and converted exactly as the CSV data layer does
(``convert('L')`` or ``convert('RGB')`` for ``config.data.channels`` 1 or 3, bilinear resize to
``image_size`` x ``image_size`` ignoring the aspect ratio, uint8 / 255); no human map, label
unknown; ids are paths relative to the files' common folder.
"""

from __future__ import annotations

import csv
import glob as glob_lib
import io
import json
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from divisive_jax import evaluate as eval_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
HUMAN_THRESHOLD = 0.5
TOP_REGIONS_IN_CSV = 3


# ------------------------------------------------------------------------------------ inputs
def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """An image file as the data layer prepares it: float32 (S, S, channels) in [0, 1].

  The conversion of `divisive_jax.data.csv_dataset.to_model_image`.
  """
  import PIL.Image
  from divisive_jax.data.csv_dataset import to_model_image

  if channels not in (1, 3):
    raise ValueError(f"config.data.channels={channels}; expected 1 or 3")
  try:
    with PIL.Image.open(path) as im:
      im.load()
      arr = to_model_image(im, int(image_size), channels)
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr.astype(np.float32) / 255


def find_images(pattern: str) -> list[str]:
  """Sorted image files matching `pattern` (a glob, or a directory = every image in it)."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*")
  paths = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  images = [p for p in paths if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
  if not images:
    raise FileNotFoundError(
      f"no image files match --images={pattern!r} ({len(paths)} other file(s); image "
      f"extensions: {', '.join(IMAGE_EXTENSIONS)})"
    )
  return images


class ImageFilesSource:
  """Random-access source over image files (no human map, label unknown: stored as 0)."""

  def __init__(self, paths: Sequence[str], image_size: int, channels: int):
    self.paths = list(paths)
    self.image_size, self.channels = int(image_size), int(channels)
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])
    self.ids = [os.path.relpath(os.path.abspath(p), base) for p in self.paths]
    n = len(self.paths)
    self.label = np.zeros(n, np.int32)
    self.attack_type = np.full(n, -1, np.int32)
    self.has_saliency = np.zeros(n, np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    s = self.image_size
    return {
      "image": load_image(self.paths[index], s, self.channels),
      "label": np.int32(0),
      "saliency": np.zeros((s, s), np.float32),
      "has_saliency": np.float32(0),
      "attack_type": np.int32(-1),
      "id": self.ids[index],
    }


class Subset:
  """Examples `indices` of a random-access source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]


def spaced_indices(n: int, max_images: int) -> np.ndarray:
  """`max_images` indices evenly spaced over range(n) (all of them when max_images <= 0)."""
  if max_images <= 0 or max_images >= n:
    return np.arange(n)
  return np.unique(np.round(np.linspace(0, n - 1, max_images)).astype(np.int64))


def safe_name(name: str, taken: set) -> str:
  base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image"
  base = base[:150]
  out, k = base, 1
  while out in taken:
    k += 1
    out = f"{base}_{k}"
  taken.add(out)
  return out


# ---------------------------------------------------------------------------------- figures
def save_mean_map(
  path: str,
  mean_d: np.ndarray,
  title: str,
  class_name: str,
  mean_image: np.ndarray | None = None,
  mean_human: np.ndarray | None = None,
  dpi: int = 100,
) -> str:
  """Mean image | mean divergence (RdBu_r, symmetric range) | mean human map."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
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
  FigureCanvasAgg(fig)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path)
  return path


# ---------------------------------------------------------------------------------- the tool
class _Collector:
  """`run_split` callback: panels, per-image summaries and per-class sums, batch by batch."""

  def __init__(self, out_dir, class_names, labels_known, top_fraction, max_regions, write):
    self.out_dir, self.class_names = out_dir, tuple(class_names)
    self.labels_known, self.top_fraction = labels_known, float(top_fraction)
    self.max_regions, self.write = int(max_regions), write
    self.entries: list[dict] = []
    self.names: set = set()
    self.groups: dict[tuple[str, int], dict] = {}
    self.grid = None

  def _add(self, group, c, d, image, human):
    g = self.groups.setdefault(
      (group, c), {"n": 0, "d": 0.0, "image": 0.0, "n_human": 0, "human": 0.0}
    )
    g["n"] += 1
    g["d"] = g["d"] + d
    g["image"] = g["image"] + image.astype(np.float64)
    if human is not None:
      g["n_human"] += 1
      g["human"] = g["human"] + human

  def __call__(self, host: dict, outputs: dict) -> None:
    if not self.write:
      return
    from divisive_jax import cams, metrics, plots

    maps = np.asarray(outputs["maps"], np.float64)  # (n, 2, h, w)
    n, _, h, w = maps.shape
    self.grid = [h, w]
    rows = np.arange(n)
    pred = np.asarray(outputs["pred"], np.int64)
    score = np.asarray(outputs["score"], np.float64)
    has_map = (np.asarray(host["has_saliency"]) > 0) & self.labels_known
    human_grid = np.zeros((n, h, w))
    if has_map.any():
      small = np.asarray(
        cams.resize(jax.numpy.asarray(host["saliency"][has_map], jax.numpy.float32), (h, w))
      )
      human_grid[has_map] = metrics.normalize_map(small)
    cam_pred, cam_other = maps[rows, pred], maps[rows, 1 - pred]
    d = metrics.divergence_map(cam_pred, cam_other)  # (n, h, w)
    norm = metrics.normalize_map(maps)  # (n, 2, h, w)
    for i in range(n):
      human = human_grid[i] if has_map[i] else None
      summary = metrics.divergence_summary(
        cam_pred[i],
        cam_other[i],
        human_map=human,
        top_fraction=self.top_fraction,
        human_threshold=HUMAN_THRESHOLD,
        max_regions=self.max_regions,
      )
      label = int(host["label"][i]) if self.labels_known else None
      ident = str(host["id"][i])
      name = safe_name(ident, self.names)
      panel = os.path.join("panels", f"{name}.png")
      cn = self.class_names
      p = int(pred[i])
      true_txt = f"true {cn[label]} | " if label is not None else ""
      title = (
        f"{ident if len(ident) <= 48 else '...' + ident[-45:]}\n{true_txt}pred {cn[p]} "
        f"(P({cn[1]}) = {score[i]:.3f}), sum|D| = {summary['energy']:.1f}"
      )
      plots.save_panel(
        os.path.join(self.out_dir, panel),
        host["image"][i],
        {f"CAM pred ({cn[p]})": cam_pred[i], f"CAM other ({cn[1 - p]})": cam_other[i]},
        human_map=host["saliency"][i] if has_map[i] else None,
        title=title,
      )
      self.entries.append(
        {
          "id": ident,
          "panel": panel,
          "label": label,
          "true_class": cn[label] if label is not None else None,
          "pred": p,
          "pred_class": cn[p],
          "score": float(score[i]),
          "has_human_map": bool(has_map[i]),
          "summary": summary,
        }
      )
      self._add("pred", p, d[i], host["image"][i], human)
      if label is not None:
        self._add("true", label, norm[i, label] - norm[i, 1 - label], host["image"][i], human)

  def class_means(self) -> dict:
    out = {}
    for group in ("pred", "true"):
      if group == "true" and not self.labels_known:
        continue
      for c, cname in enumerate(self.class_names):
        key = f"{group}_{cname}"
        g = self.groups.get((group, c))
        if g is None:
          out[key] = {"group": group, "class": cname, "n": 0}
          continue
        mean_d = (g["d"] / g["n"]).astype(np.float32)
        mean_img = g["image"] / g["n"]
        mean_h = g["human"] / g["n_human"] if g["n_human"] else None
        stem = f"mean_divergence_{group}_{safe_name(cname, set())}"
        what = "predicted as" if group == "pred" else "of true class"
        np.save(os.path.join(self.out_dir, stem + ".npy"), mean_d)
        save_mean_map(
          os.path.join(self.out_dir, stem + ".png"),
          mean_d,
          f"mean D_{cname} over {g['n']} images {what} {cname}",
          cname,
          mean_img,
          mean_h,
        )
        peak = np.unravel_index(int(np.argmax(mean_d)), mean_d.shape)
        low = np.unravel_index(int(np.argmin(mean_d)), mean_d.shape)
        out[key] = {
          "group": group,
          "class": cname,
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
        }
    return out


def _ranking_csv(entries: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  header = [
    "rank",
    "id",
    "panel",
    "label",
    "true_class",
    "pred",
    "pred_class",
    "score",
    "energy",
    "d_mean_abs",
    "d_min",
    "d_max",
    "human_energy_share",
    "human_area_fraction",
    "n_regions",
  ]
  for k in range(1, TOP_REGIONS_IN_CSV + 1):
    header += [
      f"top{k}_supports",
      f"top{k}_energy_share",
      f"top{k}_centroid_row_frac",
      f"top{k}_centroid_col_frac",
      f"top{k}_bbox",
      f"top{k}_human_share",
    ]
  w.writerow(header)
  fmt = lambda v: "" if v is None else (repr(float(v)) if isinstance(v, float) else v)
  for e in entries:
    s = e["summary"]
    row = [
      e["rank"],
      e["id"],
      e["panel"],
      fmt(e["label"]),
      e["true_class"] or "",
      e["pred"],
      e["pred_class"],
      fmt(e["score"]),
      fmt(s["energy"]),
      fmt(s["d_mean_abs"]),
      fmt(s["d_min"]),
      fmt(s["d_max"]),
      fmt(s.get("human_energy_share")),
      fmt(s.get("human_area_fraction")),
      s["n_regions"],
    ]
    for k in range(TOP_REGIONS_IN_CSV):
      if k < len(s["top_regions"]):
        r = s["top_regions"][k]
        row += [
          r["supports"],
          fmt(r["energy_share"]),
          fmt(r["centroid_frac"][0]),
          fmt(r["centroid_frac"][1]),
          " ".join(map(str, r["bbox"])),
          fmt(r.get("human_share")),
        ]
      else:
        row += [""] * 6
    w.writerow(row)
  return buf.getvalue()


def explain(
  workdir: str,
  out: str,
  which: str | int = "best",
  split: str | None = "test",
  images: str | None = None,
  max_images: int = 32,
  top_fraction: float = 0.1,
  batch_size: int | None = None,
  max_regions: int = 10,
) -> dict:
  """Run the post-hoc divergence tool; see the module docstring. Returns regions.json's dict."""
  from divisive_jax import checkpoints, data as data_lib, metrics, step as step_lib, train

  which = eval_lib.check_which(which)
  if not 0.0 < float(top_fraction) <= 1.0:
    raise ValueError(f"top_fraction must be a fraction in (0, 1], got {top_fraction}")
  if images is None:
    eval_lib.check_split(split)
  else:
    paths = find_images(images)
  inf = checkpoints.load_for_inference(workdir, which)
  config = inf.config
  class_names = tuple(config.data.class_names)
  if images is None:
    splits = data_lib.load_splits(config.data, workdir)
    class_names = tuple(splits.class_names)
    full = getattr(splits, split)
    source = Subset(full, spaced_indices(len(full), int(max_images)))
    origin = {"split": split, "split_size": len(full)}
    labels_known = True
  else:
    chosen = [paths[i] for i in spaced_indices(len(paths), int(max_images))]
    source = ImageFilesSource(chosen, config.data.image_size, config.data.channels)
    origin = {"images": images, "files_matched": len(paths)}
    labels_known = False
  if len(source) == 0:
    raise ValueError(f"nothing to explain: split {split!r} is empty")

  lead = eval_lib.is_lead()
  if lead:
    os.makedirs(os.path.join(out, "panels"), exist_ok=True)
  eval_step = step_lib.make_eval_step(inf.model, train.loss_config(config), inf.mesh)
  gbs = eval_lib.eval_batch_size(config, batch_size)
  logging.info(
    "Explaining %d image(s) with the %s checkpoint (step %d) of %s -> %s",
    len(source),
    which,
    inf.step,
    workdir,
    out,
  )
  collect = _Collector(out, class_names, labels_known, top_fraction, max_regions, lead)
  train.run_split(eval_step, inf.state, source, inf.mesh, gbs, on_batch=collect)

  result: dict[str, Any] = {}
  if lead:
    entries = sorted(collect.entries, key=lambda e: (-e["summary"]["energy"], e["id"]))
    for rank, e in enumerate(entries, 1):
      e["rank"] = rank
    class_means = collect.class_means()
    result = {
      "workdir": os.path.abspath(workdir),
      "checkpoint": str(which),
      "checkpoint_step": int(inf.step),
      **origin,
      "n_images": len(entries),
      "class_names": list(class_names),
      "cam_kind": str(config.loss.get("cam_kind", "cam")),
      "cam_grid": collect.grid,
      "image_size": int(config.data.image_size),
      "top_fraction": float(top_fraction),
      "human_threshold": HUMAN_THRESHOLD,
      "divergence": (
        "D = norm(CAM_pred) - norm(CAM_other), per-image min-max, on the CAM "
        "grid; D > 0: evidence for the predicted class"
      ),
      "ranking": "images sorted by energy = sum |D| (descending)",
      "class_mean_maps": (
        "D_c = norm(CAM_c) - norm(CAM_other) averaged over the images "
        "predicted as c ('pred_<c>') and of true class c ('true_<c>')"
      ),
      "class_means": class_means,
      "images": entries,
    }
    result = metrics.to_jsonable(result)
    with open(os.path.join(out, "regions.json"), "w") as f:
      json.dump(result, f, indent=1, allow_nan=False)
    with open(os.path.join(out, "ranking.csv"), "w", newline="") as f:
      f.write(_ranking_csv(entries))
  eval_lib.sync("explain_written")
  return result


# ------------------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "Trained workdir (with config.json and checkpoints/).")
  flags.DEFINE_string("out", None, "Output directory for panels, ranking.csv, regions.json.")
  flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
  flags.DEFINE_string("split", "test", "Data split to explain (train | val | test).")
  flags.DEFINE_string(
    "images",
    None,
    "Glob of image files (or a folder) to explain instead "
    "of a split; quote it to keep the shell from expanding it.",
  )
  flags.DEFINE_integer("max_images", 32, "Images to explain (evenly spaced; 0 = all).")
  flags.DEFINE_float("top_fraction", 0.1, "Fraction of |D| pixels forming the regions.")
  flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
  eval_lib.define_distributed_flags()
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  import sys
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.images and FLAGS["split"].present:
    raise app.UsageError("give either --split or --images, not both")
  eval_lib.init_distributed(FLAGS)
  try:
    res = explain(
      FLAGS.workdir,
      FLAGS.out,
      FLAGS.checkpoint,
      None if FLAGS.images else FLAGS.split,
      FLAGS.images,
      FLAGS.max_images,
      FLAGS.top_fraction,
      FLAGS.batch_size,
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if eval_lib.is_lead():
    print(
      f"Explained {res['n_images']} image(s) (step {res['checkpoint_step']}); wrote "
      f"{FLAGS.out}/ranking.csv, regions.json, panels/ and mean_divergence_*."
    )
    for e in res["images"][:5]:
      top = e["summary"]["top_regions"][:1]
      where = (
        f"; top region supports {top[0]['supports']} at (row, col) fraction "
        f"({top[0]['centroid_frac'][0]:.2f}, {top[0]['centroid_frac'][1]:.2f})"
        if top
        else ""
      )
      print(
        f"  {e['rank']}. {e['id']}: pred {e['pred_class']}, sum|D| = "
        f"{e['summary']['energy']:.2f}{where}"
      )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
