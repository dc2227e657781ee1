r"""The shortcut benchmark of Viviano et al. (arXiv 1910.00199): test AUROC and saliency alignment
of every training method over several seeds, beside the published AUROCs.

    python benchmarks/shortcut_table.py --json /tmp/bench/shortcut_table.json
    # the published architecture (ResNet-18, 1-channel 3x3 stem, no max-pool, 100 epochs):
    python benchmarks/shortcut_table.py --model resnet18 --json ...

Data: the built-in `shortcut` set (configs/shortcut.py; 500 train / 128 val / 128 test, the
distractor aligned with the label in train and pointing to the wrong class in val and test).
Model and schedule: `configs/shortcut.py:quick` by default (tiny ResNet, width 16, up to 20
epochs, early stopping after 6 evaluations without a lower validation loss) so the default run
fits in 30 minutes on a 2-core CPU; `--model resnet18` uses the published ResNet-18 settings of
`configs/shortcut.py` (100 epochs, patience 20). Each (method, seed) trains in-process with
`divisive_jax.train.train_and_evaluate(config, workdir)` in a temporary workdir
(`config.final_eval=False`, `config.seed=seed`; the data set itself is fixed, `data.seed=0`,
unless `--vary_data_seed`). Then the checkpoint with the best (lowest) validation loss is
restored (`checkpoints.load_for_inference(workdir, 'best')`) and evaluated on test with
`step.make_eval_step` and `train.run_split`:

* test AUROC (`metrics.auroc`, score = P(two crosses));
* saliency alignment: proportional energy (`metrics.proportional_energy`) of the TRUE-class CAM,
  per-sample min-max normalised after bilinear upsampling to 28 x 28 (`cams.resize`,
  `cams.normalize`), inside the human mask (the crosses), averaged over test images;
* the same PE divided by the mask's share of the image (`alignment_lift`): a spatially uniform
  map would score 1, so this separates "the CAM sits on the crosses" from the crosses' small
  area (1-2% of the pixels; a 7x7 CAM upsampled to 28x28 spreads over much more);
* validation AUROC / loss of the same checkpoint (the only split used for any choice).

Nothing is tuned on test. Loss weights are `config_base.METHODS` unless overridden with
`--lambda_gradmask`, `--lambda_rrr`, `--lambda_actdiff` (choose those on validation, e.g. with
`--methods gradmask --seeds 3 --lambda_gradmask 0.1` and comparing the `val_auroc` column).

Parallelism: `--workers 2` (default) trains two runs at a time in two worker processes (spawned;
each calls `train_and_evaluate` in-process for its runs) with one XLA compute thread each
(`--xla_cpu_multi_thread_eigen=false`): on 2 cores the tiny model's small ops and the trainer's
per-run Python work (tracing, evaluation, checkpoints) overlap better than one run with two
threads. `--workers 1` runs everything in this process. Results do not depend on the worker
count beyond float reduction order.

Compilation: JAX's persistent compilation cache lives in a temporary directory (or
`--cache_dir`). The seed is runtime data of the train state (`TrainState.rng`), not a constant
of the compiled step, so all seeds of a method share one compilation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
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
# Viviano et al., test AUC over 10 seeds (SPEC §1).
PUBLISHED = {
  "ce": "0.00 ± 0.00",
  "actdiff": "1.00 ± 0.00",
  "masked": "0.99 ± 0.02",
  "gradmask": "0.76 ± 0.04",
  "rrr": "0.49 ± 0.08",
}
NOT_IN_PAPER = "n/a (not in the paper)"


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1")
  p.add_argument("--first_seed", type=int, default=0)
  p.add_argument(
    "--model",
    default="quick",
    choices=("quick", "resnet18"),
    help="quick: configs/shortcut.py:quick (tiny ResNet); resnet18: published",
  )
  p.add_argument("--num_epochs", type=int, default=0, help="> 0 overrides the config")
  p.add_argument("--patience", type=int, default=-1, help=">= 0 overrides early_stop_patience")
  p.add_argument("--lambda_gradmask", type=float, default=None)
  p.add_argument("--lambda_rrr", type=float, default=None)
  p.add_argument("--lambda_actdiff", type=float, default=None)
  p.add_argument(
    "--vary_data_seed",
    action="store_true",
    help="also regenerate the data set per seed (data.seed = seed)",
  )
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default: temp)")
  p.add_argument("--keep_workdirs", default="", help="keep each run's workdir under this dir")
  p.add_argument(
    "--workers",
    type=int,
    default=2,
    help="parallel worker processes (each trains whole runs in-process); 1: all "
    "runs in this process",
  )
  p.add_argument(
    "--worker_xla_flags",
    default="--xla_cpu_multi_thread_eigen=false",
    help="XLA_FLAGS of each worker when --workers > 1 (one core each)",
  )
  p.add_argument("--json", default="")
  p.add_argument("--verbose", action="store_true", help="the trainer's log lines")
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  bad = sorted(set(args.methods) - set(METHODS))
  if bad:
    p.error(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
  return args


def load_config_module():
  path = os.path.join(common.REPO, "configs", "shortcut.py")
  spec = importlib.util.spec_from_file_location("shortcut_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_config(args, method: str, seed: int):
  cfg_mod = load_config_module()
  variant = method if args.model == "resnet18" else f"quick,{method}"
  c = cfg_mod.get_config(variant)
  c.seed = seed
  if args.vary_data_seed:
    c.data.seed = seed
  c.final_eval = False
  c.log_every_steps = 10_000
  if args.num_epochs > 0:
    c.num_epochs = args.num_epochs
  if args.patience >= 0:
    c.early_stop_patience = args.patience
  for term in ("gradmask", "rrr", "actdiff"):
    lam = getattr(args, f"lambda_{term}")
    if lam is not None and c.loss.weights[term] > 0:
      c.loss.weights[term] = lam
  return c


def evaluate(workdir: str) -> dict:
  import jax.numpy as jnp
  import numpy as np
  from divisive_jax import cams, checkpoints, data as data_lib, metrics, step as step_lib, train

  inf = checkpoints.load_for_inference(workdir, "best")
  cfg = train.loss_config(inf.config)
  eval_step = step_lib.make_eval_step(inf.model, cfg, inf.mesh)
  splits = data_lib.load_splits(inf.config.data, workdir)
  batch = int(inf.config.get("eval_batch_size", 0)) or int(inf.config.batch_size)
  out = {"best_step": int(inf.step)}
  for split in ("val", "test"):
    pes, lifts = [], []

    def on_batch(host, outputs):
      keep = host["has_saliency"] > 0
      if not keep.any():
        return
      labels = host["label"][keep]
      maps = outputs["maps"][keep]  # (n, 2, h, w) raw class maps
      true_map = maps[np.arange(len(labels)), labels]
      mask = host["saliency"][keep]
      up = cams.normalize(cams.resize(jnp.asarray(true_map), mask.shape[-2:]))
      pe = np.atleast_1d(metrics.proportional_energy(np.asarray(up), mask))
      area = np.mean(mask > 0, axis=(-2, -1))  # PE of a constant map = chance level
      pes.append(pe)
      lifts.append(pe / np.where(area > 0, area, np.nan))

    res = train.run_split(
      eval_step, inf.state, getattr(splits, split), inf.mesh, batch, on_batch=on_batch
    )
    out[f"{split}_auroc"] = float(metrics.auroc(res["label"], res["score"]))
    out[f"{split}_accuracy"] = float(np.mean(res["pred"] == res["label"]))
    out[f"{split}_loss"] = float(np.mean(res["ce"]))
    out[f"{split}_alignment_pe"] = float(np.mean(np.concatenate(pes))) if pes else float("nan")
    out[f"{split}_alignment_lift"] = (
      float(np.nanmean(np.concatenate(lifts))) if lifts else float("nan")
    )
  return out


def run_one(args, method: str, seed: int, root: str) -> dict:
  from divisive_jax import train

  config = make_config(args, method, seed)
  workdir = os.path.join(root, f"{method}_seed{seed}")
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  train_s = time.perf_counter() - t0
  row = {
    "method": method,
    "seed": seed,
    "train_s": train_s,
    "weights": {k: v for k, v in config.loss.weights.to_dict().items() if v > 0},
    "mask_input": bool(config.loss.mask_input),
    "model": config.model.name,
    "num_epochs": int(config.num_epochs),
    "early_stop_patience": int(config.early_stop_patience),
  }
  row.update(evaluate(workdir))
  row["eval_s"] = time.perf_counter() - t0 - train_s
  if not args.keep_workdirs:
    shutil.rmtree(workdir, ignore_errors=True)
  return row


def summarise(rows, methods):
  import numpy as np

  out = []
  for m in methods:
    rs = [r for r in rows if r["method"] == m]
    if not rs:
      continue
    s = {"method": m, "n": len(rs), "published_test_auroc": PUBLISHED.get(m, NOT_IN_PAPER)}
    for key in (
      "test_auroc",
      "test_alignment_pe",
      "test_alignment_lift",
      "val_auroc",
      "val_loss",
      "test_accuracy",
    ):
      v = np.array([r[key] for r in rs], float)
      s[f"{key}_mean"], s[f"{key}_std"] = float(np.nanmean(v)), float(np.nanstd(v))
      s[key] = f"{s[f'{key}_mean']:.2f} ± {s[f'{key}_std']:.2f}"
    s["train_s_mean"] = float(np.mean([r["train_s"] for r in rs]))
    s["weights"] = rs[0]["weights"]
    out.append(s)
  return out


def _setup_process(cache_dir: str, xla_flags: str, verbose: bool) -> None:
  """Per-process setup: XLA flags (before jax starts), the shared compilation cache, quiet logs."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  common.add_xla_flags(xla_flags)
  import jax  # noqa: F401
  from absl import logging as absl_logging

  if not verbose:
    absl_logging.set_verbosity(absl_logging.WARNING)
  common.enable_compilation_cache(cache_dir)


def _job(job):
  args, method, seed, root = job
  return run_one(args, method, seed, root)


def job_order(methods, seeds):
  """Every method's first seed first: with several workers, each method is compiled once (by one
  worker) before its other seeds load it from the cache."""
  return [(m, s) for s in seeds for m in methods]


def main(argv=None):
  args = parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="shortcut_table_")
  cache_dir = args.cache_dir or os.path.join(tmp, "jax_cache")
  root = args.keep_workdirs or os.path.join(tmp, "runs")
  os.makedirs(root, exist_ok=True)
  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  jobs = [(args, m, s, root) for m, s in job_order(args.methods, seeds)]
  workers = max(1, min(args.workers, len(jobs)))
  worker_flags = args.worker_xla_flags if workers > 1 else ""
  info = common.machine_info()
  print(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; model {args.model}; "
    f"methods {', '.join(args.methods)}; seeds {seeds[0]}..{seeds[-1]}; {workers} "
    f"worker process(es){' with XLA_FLAGS ' + repr(worker_flags) if worker_flags else ''}",
    flush=True,
  )
  t_start = time.perf_counter()
  rows = []

  def report(row):
    rows.append(row)
    print(
      f"  {row['method']:10s} seed {row['seed']}: test AUROC {row['test_auroc']:.3f}  "
      f"alignment {row['test_alignment_pe']:.3f}  val AUROC {row['val_auroc']:.3f}  val loss "
      f"{row['val_loss']:.3f}  best step {row['best_step']}  ({row['train_s']:.0f}s train, "
      f"{row['eval_s']:.0f}s eval; {time.perf_counter() - t_start:.0f}s total)",
      flush=True,
    )

  try:
    if workers == 1:
      _setup_process(cache_dir, "", args.verbose)
      for job in jobs:
        report(_job(job))
    else:
      import multiprocessing

      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(
        workers, initializer=_setup_process, initargs=(cache_dir, worker_flags, args.verbose)
      ) as pool:
        for row in pool.imap_unordered(_job, jobs):
          report(row)
  finally:
    if not args.cache_dir:
      shutil.rmtree(tmp, ignore_errors=True)
  total_s = time.perf_counter() - t_start
  rows.sort(key=lambda r: (args.methods.index(r["method"]), r["seed"]))
  summary = summarise(rows, args.methods)
  if "jax" in sys.modules:
    info = common.machine_info()
  with open("/proc/loadavg") as f:
    info["loadavg_at_end"] = f.read().split()[:3]
  print()
  print(
    f"Shortcut benchmark (Viviano et al.), {args.model} model, {args.seeds} seeds, mean ± "
    f"std; alignment = proportional energy of the true-class CAM inside the crosses; total "
    f"{total_s / 60:.1f} min"
  )
  print(
    common.table(
      summary,
      [
        ("method", "method"),
        ("test_auroc", "test AUROC (ours)"),
        ("published_test_auroc", "test AUROC (published)"),
        ("test_alignment_pe", "alignment PE (test)"),
        ("test_alignment_lift", "PE / mask area (test)"),
        ("val_auroc", "val AUROC"),
        ("val_loss", "val loss"),
      ],
    )
  )
  common.write_json(
    args.json,
    {
      "benchmark": "shortcut_table",
      "args": vars(args),
      "machine": info,
      "total_s": total_s,
      "workers": workers,
      "worker_xla_flags": worker_flags,
      "summary": summary,
      "runs": rows,
    },
  )
  return summary


if __name__ == "__main__":
  main()
