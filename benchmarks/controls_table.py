r"""Saliency controls and computed maps on the built-in data (issue 27; README "Controls"): CYBORG
and the three Divisive Decisions terms trained with the true maps, with `shuffled` and `inverted`
control maps, and with PCA maps in place of every human one, each weight chosen on validation.

    G="--grid=cyborg=0.1,1,10 --grid=difference=0.1,1,10 --grid=opposition=0.1,1,10 \
       --grid=margin=0.1,1,10"
    python -m divisive_jax.sweep --config=configs/iris_pad.py:quick --workdir=W \
      --methods=cyborg,difference,opposition,margin $G --controls=none,shuffled,inverted \
      --seeds=0,1,2,3,4 --config.best_metric=val/auroc
    python -m divisive_jax.sweep --config=configs/iris_pad.py:quick --workdir=P \
      --methods=cyborg,difference,opposition,margin $G --seeds=0,1,2,3,4 \
      --config.best_metric=val/auroc --config.data.map_source=pca \
      --config.data.human_map_fraction=0
    python benchmarks/controls_table.py --controls W --pca P --json OUT.json --md OUT.md

This script reads the two sweeps' ``sweep.json`` (it trains nothing) and writes one table: per
method and map source, the weight chosen on validation AUROC, the validation AUROC at it, and
test AUROC and alignment (proportional energy of the true-class CAM inside the TRUE human map;
validation and test always keep the true maps) as mean ± std over the seeds; and how far each
control's maps are from the true ones (`overlaps`: mean IoU of the masks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

METHODS = ("cyborg", "difference", "opposition", "margin")
SOURCES = (  # (label, workdir flag, suffix of the sweep's method key)
  ("true maps", "controls", ""),
  ("shuffled", "controls", "_shuffled"),
  ("inverted", "controls", "_inverted"),
  ("PCA maps (no human map)", "pca", ""),
)


def rows(sweeps: dict) -> list[dict]:
  out = []
  for method in METHODS:
    for label, flag, suffix in SOURCES:
      entry = sweeps.get(flag, {}).get("methods", {}).get(method + suffix)
      if entry is None:
        continue
      chosen = next(g for g in entry["grid"] if g["weights"] == entry["chosen"])
      out.append(
        dict(
          method=method,
          maps=label,
          weight=entry["chosen"].get(method),
          val_auroc=(chosen["val_mean"], chosen["val_std"]),
          test_auroc=(entry["test_auroc_mean"], entry["test_auroc_std"]),
          alignment=(entry["test_alignment_pe_mean"], entry["test_alignment_pe_std"]),
          seeds=chosen["n"],
        )
      )
  return out


def markdown(table: list[dict]) -> str:
  pm = lambda x: f"{x[0]:.2f} ± {x[1]:.2f}"
  lines = [
    "| method | training maps | weight (val) | val AUROC | test AUROC | alignment |",
    "|---|---|---|---|---|---|",
  ]
  for r in table:
    lines.append(
      f"| {r['method']} | {r['maps']} | {r['weight']:g} | {pm(r['val_auroc'])} | "
      f"{pm(r['test_auroc'])} | {pm(r['alignment'])} |"
    )
  return "\n".join(lines) + "\n"


def overlaps(config_arg: str = "quick") -> dict:
  """How far each control's training maps are from the true ones: the mean IoU of each example's
  control mask with its own human mask (`maps.MASK_THRESHOLD`), on ``configs/iris_pad.py``'s
  training split. A control near the true maps (here: the iris sits near the centre of every
  image, so another image's iris covers much of this one's) tests little."""
  import numpy as np
  from configs import iris_pad

  from divisive_jax.data import load_splits
  from divisive_jax.maps import MASK_THRESHOLD

  config = iris_pad.get_config(config_arg)
  masks = {}
  for control in ("none", "shuffled", "inverted", "random"):
    config.data.saliency_control = control
    train = load_splits(config.data, "").train
    masks[control] = train.read(np.arange(len(train)))["saliency"] > MASK_THRESHOLD * 255
  true = masks.pop("none")
  iou = lambda m: float(np.mean((m & true).sum((1, 2)) / np.maximum((m | true).sum((1, 2)), 1)))
  return {control: round(iou(m), 3) for control, m in masks.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--controls", required=True, help="the workdir of the --controls sweep")
  p.add_argument("--pca", default="", help="the workdir of the PCA-maps sweep")
  p.add_argument("--json", default="")
  p.add_argument("--md", default="")
  args = p.parse_args(argv)
  sweeps = {}
  for flag in ("controls", "pca"):
    folder = getattr(args, flag)
    if folder:
      with open(os.path.join(folder, "sweep.json")) as f:
        sweeps[flag] = json.load(f)
  table = rows(sweeps)
  iou = overlaps()
  text = markdown(table) + (
    "\nMean IoU of the control masks with the true masks (training split): "
    + ", ".join(f"{k} {v:.2f}" for k, v in iou.items())
    + "\n"
  )
  print(text, end="")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": table, "control_iou": iou, "sweeps": sweeps}, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
