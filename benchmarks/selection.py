r"""Which checkpoint a run keeps on small real data, by selection rule (issue 26).

Writes a CSV-protocol set of real handwritten digits (scikit-learn's bundled ``load_digits``:
8 x 8 scans of 1,797 digits by 43 writers; no download), two classes, a few hundred images, and
trains ``configs/iris_pad.py:quick`` on it once per ``--rule`` (``config.best_metric``), with the
code of this checkout or of ``--checkout`` (another checkout's package, e.g. a ``git worktree`` of
an older commit: "before"). Prints and writes per rule: every evaluation's validation accuracy,
AUROC and loss, the chosen step, its validation and test AUROC, and the test AUROC of the last
evaluation's checkpoint.

  python benchmarks/selection.py --out /tmp/sel --json benchmarks/results/selection.json
  python benchmarks/selection.py --out /tmp/sel_old --checkout /tmp/old_main --rules val/accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_digits(root: str, classes=(3, 8), per_class: int = 100, seed: int = 0) -> str:
  """``per_class`` digits of each class as 8-bit PNGs (0..16 scaled to 0..255), split 60/20/20
  per class in a seeded order; returns the CSV path."""
  import PIL.Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  rng = np.random.default_rng(seed)
  lines = []
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for label, digit in enumerate(classes):
    idx = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class]
    for j, i in enumerate(idx):
      split = "train" if j < 0.6 * per_class else "val" if j < 0.8 * per_class else "test"
      name = f"{digit}_{i}.png"
      image = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
      PIL.Image.fromarray(image).save(os.path.join(root, "images", name))
      lines.append(f"{split},{('Negative', 'Positive')[label]},{name}")
  path = os.path.join(root, "protocol.csv")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def train(csv: str, workdir: str, rule: str, checkout: str | None, seed: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if checkout:
    env["PYTHONPATH"] = checkout
  cmd = [
    sys.executable,
    "-m",
    "divisive_jax.main",
    f"--config={os.path.join(checkout or REPO, 'configs', 'iris_pad.py')}:quick",
    f"--workdir={workdir}",
    f"--config.data.csv_path={csv}",
    f"--config.data.image_dir={os.path.join(os.path.dirname(csv), 'images')}",
    "--config.data.attack_type_from=none",
    "--config.data.class_names=('Negative', 'Positive')",
    "--config.task=classification",
    f"--config.best_metric={rule}",
    f"--config.seed={seed}",
  ]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=checkout or REPO)
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [
      {k: x[k] for k in ("step", "val/accuracy", "val/auroc", "val/loss")}
      for x in map(json.loads, f)
      if "val/auroc" in x
    ]
  with open(os.path.join(workdir, "eval_val.json")) as f:
    val = json.load(f)
  with open(os.path.join(workdir, "eval_test.json")) as f:
    test = json.load(f)
  last = subprocess.run(  # the last evaluation's checkpoint on test, for comparison
    [sys.executable, "-m", "divisive_jax.evaluate", f"--workdir={workdir}", "--checkpoint=latest"],
    env=env,
    capture_output=True,
    text=True,
    cwd=checkout or REPO,
  )
  if last.returncode:
    raise RuntimeError(last.stderr[-3000:])
  with open(os.path.join(workdir, "eval_test.json")) as f:
    latest = json.load(f)
  return {
    "rule": rule,
    "code": checkout or REPO,
    "seed": seed,
    "evaluations": evals,
    "chosen_step": val["checkpoint_step"],
    "chosen_val_auroc": val["auroc"],
    "chosen_test_auroc": test["auroc"],
    "last_step": latest["checkpoint_step"],
    "last_test_auroc": latest["auroc"],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for the data and the workdirs")
  p.add_argument("--rules", default="val/auroc,val/accuracy")
  p.add_argument("--seeds", default="0")
  p.add_argument("--checkout", default="", help="another checkout's root (its package and configs)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  csv = write_digits(os.path.join(args.out, "digits"))
  rows = []
  for rule in args.rules.split(","):
    for seed in map(int, args.seeds.split(",")):
      w = os.path.join(args.out, f"{rule.replace('/', '_')}_s{seed}")
      row = train(csv, w, rule, args.checkout or None, seed)
      rows.append(row)
      print(
        f"{rule} seed {seed}: chose step {row['chosen_step']} (val AUROC "
        f"{row['chosen_val_auroc']:.3f}, test AUROC {row['chosen_test_auroc']:.3f}); last "
        f"evaluation step {row['last_step']}: test AUROC {row['last_test_auroc']:.3f}"
      )
      for e in row["evaluations"]:
        print(
          f"  step {e['step']}: val accuracy {e['val/accuracy']:.3f}, AUROC "
          f"{e['val/auroc']:.3f}, loss {e['val/loss']:.4f}"
        )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"benchmark": "selection", "rows": rows}, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
