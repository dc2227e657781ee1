r"""Evaluate a trained checkpoint on one split: PAD metrics, scores, ROC, saliency alignment.

CLI::

  python -m divisive_jax.evaluate --workdir=W [--checkpoint=best|latest|STEP] [--split=test]
      [--batch_size=N] [--top_p=0.1]

Library: ``evaluate_workdir(workdir, which='best', split='test', batch_size=None, top_p=None)``.

The checkpoint (``best`` = highest validation score, earliest of equals; ``latest``; or a step)
is restored onto all devices of all processes (parameters and BatchNorm statistics only) and
the evaluators of the workdir's ``config.evals`` run on the split (`evaluators.common`): every example
exactly once. Thresholds are chosen on the VALIDATION split and applied to the requested split;
they are never chosen on test. For ``split='val'`` the thresholds are val's own and the JSON
says so (``thresholds_from_same_split: true``). Outputs (process 0): ``W/eval_<split>.json``
(NaN written as null), ``W/scores_<split>.csv``, ``W/roc_<split>.png``.
"""

from __future__ import annotations

from absl import flags

from divisive_jax import checkpoints, cli, layout, multihost
from divisive_jax.evaluators import common as evaluation
from divisive_jax.data import load_splits
from divisive_jax import workdir as workdir_lib
from divisive_jax.errors import ConfigError, WorkdirError


def check_which(which) -> str | int:
  """'best', 'latest' or a non-negative step number (int or digit string)."""
  if isinstance(which, int) and not isinstance(which, bool) and which >= 0:
    return which
  if isinstance(which, str):
    if which in ("best", "latest"):
      return which
    if which.strip().isdigit():
      return int(which)
  raise ConfigError(f"checkpoint {which!r}: use 'best', 'latest' or a step number")


def evaluate_workdir(
  workdir: str,
  which: str | int = "best",
  split: str = "test",
  batch_size: int | None = None,
  top_p: float | None = None,
) -> dict:
  """Evaluate checkpoint ``which`` of ``workdir`` on ``split``; returns eval_<split>.json's dict."""
  evaluation.check_split(split)
  which = check_which(which)
  if top_p is not None and not 0.0 < float(top_p) <= 1.0:
    raise ConfigError(f"top_p must be a fraction in (0, 1], got {top_p}")
  if busy := workdir_lib.training(workdir):
    raise WorkdirError(
      f"{busy}: evaluating now would write an intermediate eval_{split}.json into the run. Wait "
      "for it to finish (its final evaluation writes these files), or stop it"
    )
  inf = checkpoints.load_for_inference(workdir, which)
  evals = inf.config.evals
  if top_p is not None and "alignment" in evals:
    evals = {k: dict(v) for k, v in evals.items()}
    evals["alignment"]["top_p"] = float(top_p)
  splits = load_splits(inf.config.data, workdir)
  results = evaluation.evaluate_checkpoint(workdir, splits, inf, which, (split,), batch_size, evals)
  return results[split]


def _define_flags():
  flags.DEFINE_string("workdir", None, "Trained workdir (with config.json and checkpoints/).")
  flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
  flags.DEFINE_string("split", "test", "train | val | test.")
  flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: the config's).")
  flags.DEFINE_float(
    "top_p",
    None,
    "Fraction of CAM pixels for the top-p IoU (default: the config's evals.alignment.top_p).",
  )
  multihost.define_flags()
  flags.mark_flag_as_required("workdir")


def main(argv):
  f = flags.FLAGS
  out = evaluate_workdir(f.workdir, f.checkpoint, f.split, f.batch_size, f.top_p)
  if multihost.is_lead():
    a = out.get("saliency_alignment", {}).get("true_class", {}).get("proportional_energy", {})
    status = layout.Status.of(out).describe()
    print(
      f"{f.split} (step {out['checkpoint_step']}{'; the run ' + status if status else ''}, "
      f"n={out['n_examples']}): "
      f"AUROC={out['auroc']} EER={out['eer']} APCER={out['apcer']} BPCER={out['bpcer']} "
      f"(threshold {out['threshold']} from val); true-class CAM proportional energy "
      f"{a.get('mean')} (n={a.get('n', 0)}). Wrote {layout.eval_file(f.workdir, f.split)}"
    )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
