r"""The shortcut benchmark of Viviano et al. (arXiv 1910.00199), redone with weights chosen on
validation: every method, its loss weight chosen by `divisive_jax.sweep` from a grid, N seeds.

    python benchmarks/shortcut_table.py --workdir=/tmp/shortcut --json OUT.json
    # the published architecture (ResNet-18, 1-channel 3x3 stem, no max-pool, 100 epochs,
    # patience 20) on a GPU:
    python benchmarks/shortcut_table.py --model resnet18 --workdir=... --json OUT.json

Data: the built-in `shortcut` set (configs/shortcut.py; 500 train / 128 val / 128 test, the
distractor aligned with the label in train and pointing to the wrong class in val and test).
Model and schedule: ``configs/shortcut.py:quick`` by default (tiny ResNet, up to 20 epochs,
early stopping after 6 evaluations without a lower validation loss, the checkpoint with the
lowest validation loss kept); ``--model resnet18`` the published settings; ``--model vit_tiny``
the quick settings with the tiny ViT (`models.vit`, patch 4: a 7 x 7 token grid, as the tiny
ResNet's 7 x 7 CAM).

Grids (``--grid_input`` for GradMask, RRR and ActDiff; ``--grid_cam`` for CYBORG and the three
Divisive Decisions terms): 1e-2 ... 1e3 and 0.1 ... 10 by default. Each method x weight x seed is
a member of a population (one program per method and chunk of seeds); the sweep chooses each
method's weight on the validation loss (the config's ``best_metric``; ties: the smaller
weight), never on test, and reports test AUROC (mean ± std over seeds, per seed) at that weight,
beside the published figure, and the alignment (proportional energy of the true-class CAM inside
the crosses). Re-running resumes (finished members are not trained again).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

METHODS = (
  "ce",
  "cyborg",
  "difference",
  "opposition",
  "margin",
  "gradmask",
  "rrr",
  "actdiff",
  "masked",
)
# Viviano et al., test AUC over 10 seeds.
PUBLISHED = {
  "ce": "0.00 ± 0.00",
  "actdiff": "1.00 ± 0.00",
  "masked": "0.99 ± 0.02",
  "gradmask": "0.76 ± 0.04",
  "rrr": "0.49 ± 0.08",
}
NOT_IN_PAPER = "n/a (not in the paper)"
# --model: the config variants of configs/shortcut.py, and the fields set after them.
MODELS = {
  "quick": ("quick", {}),
  "resnet18": (None, {}),
  "vit_tiny": ("quick,vit_tiny", {"patch_size": 4}),  # 28 px: patch 4 gives a 7 x 7 grid
}
INPUT_TERMS = ("gradmask", "rrr", "actdiff")
CAM_TERMS = ("cyborg", "difference", "opposition", "margin")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1")
  p.add_argument("--model", default="quick", choices=tuple(MODELS))
  p.add_argument("--grid_input", default="0.01,0.1,1,10,100,1000")
  p.add_argument("--grid_cam", default="0.1,0.3,1,3,10")
  p.add_argument("--num_epochs", type=int, default=0, help="> 0 overrides the config")
  p.add_argument("--num_train_steps", type=int, default=0, help="> 0 overrides the epochs")
  p.add_argument("--width", type=int, default=0, help="> 0: the model's width")
  p.add_argument("--max_population", type=int, default=32)
  p.add_argument("--workdir", required=True)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  bad = sorted(set(args.methods) - set(METHODS))
  if bad:
    p.error(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
  return args


def grid(args) -> str:
  """The weights to try of the swept methods' own terms (the sweep refuses others)."""
  parts = [f"{t}={args.grid_input}" for t in INPUT_TERMS if t in args.methods]
  parts += [f"{t}={args.grid_cam}" for t in CAM_TERMS if t in args.methods]
  return ";".join(parts)


def make_config(args):
  """configs/shortcut.py with ``--model``'s variants and fields and the overrides."""
  from divisive_jax import cli

  variants, model_fields = MODELS[args.model]
  config = cli.load_config_file(os.path.join(common.REPO, "configs", "shortcut.py"), variants)
  config.model.update(model_fields)
  if args.num_epochs:
    config.num_epochs = args.num_epochs
  if args.num_train_steps:
    config.num_train_steps = config.eval_every_steps = args.num_train_steps
  if args.width:
    config.model.width = args.width
  return config


def main(argv=None):
  args = parse_args(argv)
  from absl import logging

  from divisive_jax import sweep

  logging.use_absl_handler()  # the sweep's progress lines, as `python -m divisive_jax.sweep`
  logging.set_verbosity(logging.INFO)

  config = make_config(args)
  seeds = ",".join(str(s) for s in range(args.seeds))
  t0 = time.time()
  summary = sweep.run_sweep(
    config, args.workdir, args.methods, grid(args), seeds, args.max_population
  )
  rows = []
  for m, s in summary.items():
    rows.append(
      {
        "method": m,
        "chosen_weight": ", ".join(f"{t}={w:g}" for t, w in (s["chosen"] or {}).items()) or "-",
        "test_auroc": sweep.format_mean_std(s["test_auroc_mean"], s["test_auroc_std"]),
        "published_test_auroc": PUBLISHED.get(m, NOT_IN_PAPER),
        "alignment_pe": sweep.format_mean_std(
          s["test_alignment_pe_mean"], s["test_alignment_pe_std"]
        ),
        "test_auroc_mean": s["test_auroc_mean"],
        "test_auroc_std": s["test_auroc_std"],
        "test_auroc_per_seed": s["test_auroc_per_seed"],
        "val_grid": s["grid"],
      }
    )
  info = common.machine_info()
  print(
    common.table(
      rows,
      [
        ("method", "method"),
        ("chosen_weight", "weight (chosen on val)"),
        ("test_auroc", "test AUROC (ours)"),
        ("published_test_auroc", "test AUROC (published)"),
        ("alignment_pe", "alignment PE (test)"),
      ],
    )
  )
  common.write_json(
    args.json,
    {
      "benchmark": "shortcut_table",
      "args": vars(args),
      "machine": info,
      "total_s": time.time() - t0,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  from divisive_jax import cli

  cli.short_errors(main)  # a SIGTERM's stop or a bad config: one line, not a traceback
