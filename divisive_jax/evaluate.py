r"""Evaluate a trained checkpoint on one split: PAD metrics, scores, ROC, saliency alignment.

CLI::

  python -m divisive_jax.evaluate --workdir=W [--checkpoint=best|latest|STEP] [--split=test]
      [--batch_size=N] [--top_p=0.1]

Library: ``evaluate_workdir(workdir, which='best', split='test', batch_size=None)`` (called by
`train.train_and_evaluate` at the end of training for 'val' then 'test').

Protocol
--------
* The checkpoint (``best`` = highest validation score, ``latest``, or a step) is restored onto
  all devices of all processes and the split is run with `train.run_split`: every example
  exactly once, the last batch padded and masked.
* Thresholds are chosen on the VALIDATION split and applied to the requested split
  (`metrics.pad_metrics`); they are never chosen on test. For ``split='val'`` the thresholds
  are val's own: the JSON says so (``thresholds_from_same_split: true`` and a note), and its
  error rates at them are optimistic.
* Validation scores of a checkpoint are cached in ``W/scores_val.csv`` with a sidecar
  ``W/scores_val.meta.json`` (checkpoint step, a SHA-1 of the restored weights, example count,
  a digest of ``config.data``, the data fingerprint and the validation label / attack-type /
  map columns). Evaluating another split reuses them when the sidecar matches and reruns
  validation otherwise (e.g. a different ``--checkpoint``, or retrained weights).

Outputs (process 0 writes; every process runs the evaluation)
--------------------------------------------------------------
* ``W/eval_<split>.json``: everything `metrics.pad_metrics` returns (NaN -> null) plus
  ``checkpoint_step``, ``checkpoint`` (as requested), ``split``, ``class_names``,
  ``positive_class`` (class_names[1]), ``score_polarity`` ('higher = attack'), ``n_examples``,
  ``val_scores_cached`` and ``saliency_alignment`` (below).
* ``W/scores_<split>.csv``: header ``id,label,attack_type,score,pred``; label and pred are class
  indices, attack_type is the type name ('' for bona fide / unknown), score = P(class 1).
* ``W/roc_<split>.png``.

Saliency alignment (examples with a human map only): per example the raw CAM (CAM or Grad-CAM
as ``config.loss.cam_kind``) of the TRUE class, and separately of the PREDICTED class, is
upsampled bilinearly to the human map's resolution and min-max normalised to [0, 1]; the human
mask is ``H > 0.5``. Reported as mean, std (ddof=0) and n over examples:
``proportional_energy`` = sum(A [M]) / sum(A) (Zhang et al.), ``proportional_energy_area_weighted``
(times (|image| - |M|) / |image|) and ``topk_iou`` = IoU of the top-p fraction of CAM pixels
with M (p = ``--top_p``, default 0.1). Computed batch by batch; maps are never all held in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
from absl import logging

SPLITS = ("train", "val", "test")
MASK_THRESHOLD = 0.5
SCORES_HEADER = ("id", "label", "attack_type", "score", "pred")


# ------------------------------------------------------------------------------------ helpers
def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
  return split


def check_which(which) -> str | int:
  """'best', 'latest' or a non-negative step number (int or digit string)."""
  if isinstance(which, (int, np.integer)) and not isinstance(which, bool) and which >= 0:
    return int(which)
  if isinstance(which, str):
    if which in ("best", "latest"):
      return which
    if which.strip().isdigit():
      return int(which)
  raise ValueError(f"checkpoint {which!r}: use 'best', 'latest' or a step number")


def eval_batch_size(config, batch_size: int | None = None) -> int:
  """The requested (or the config's) evaluation batch size, rounded up to a multiple of the
  global device count (every device gets the same number of rows)."""
  n = int(batch_size or 0) or int(config.get("eval_batch_size", 0) or 0) or int(config.batch_size)
  if n <= 0:
    raise ValueError(f"batch size must be positive, got {n}")
  d = jax.device_count()
  rounded = -(-n // d) * d
  if rounded != n:
    logging.info(
      "Evaluation batch size %d rounded up to %d (a multiple of %d devices).", n, rounded, d
    )
  return rounded


def is_lead() -> bool:
  return jax.process_index() == 0


def all_processes_agree(flag: bool) -> bool:
  """True iff `flag` is True on every process (collective in multi-process runs)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))
  return bool(np.all(np.asarray(flags)))


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def params_digest(state) -> str:
  """SHA-1 of the restored weights (params + batch_stats; this process's replica)."""
  h = hashlib.sha1()
  for leaf in jax.tree.leaves((state.params, state.batch_stats)):
    a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_scores_csv(path: str, result: dict, attack_types) -> None:
  """`result` from `train.run_split`; attack types by name ('' for -1)."""
  import io

  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(SCORES_HEADER)
  for i, lab, at, s, p in zip(
    result["id"], result["label"], result["attack_type"], result["score"], result["pred"]
  ):
    at = int(at)
    name = attack_types[at] if 0 <= at < len(attack_types) else ""
    w.writerow([str(i), int(lab), name, repr(float(s)), int(p)])
  _write_atomic(path, buf.getvalue())


def read_scores_csv(path: str) -> dict[str, np.ndarray]:
  """-> {'id', 'label', 'attack_type' (names), 'score', 'pred'} numpy arrays."""
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = tuple(next(reader, ()))
    if header != SCORES_HEADER:
      raise ValueError(f"{path}: header {header} != {SCORES_HEADER}")
    rows = list(reader)
  cols = list(zip(*rows)) if rows else [()] * len(SCORES_HEADER)
  return {
    "id": np.array(cols[0], dtype=str),
    "label": np.array(cols[1], dtype=np.int64),
    "attack_type": np.array(cols[2], dtype=str),
    "score": np.array(cols[3], dtype=np.float64),
    "pred": np.array(cols[4], dtype=np.int64),
  }


# -------------------------------------------------------------------------- saliency alignment
class AlignmentAccumulator:
  """Per-example alignment of the true- and predicted-class CAMs with the human mask.

  `update(host_batch, outputs)` is a `run_split` on_batch callback; only per-example scalars
  are kept.
  """

  def __init__(self, top_p: float = 0.1, mask_threshold: float = MASK_THRESHOLD):
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be a fraction in (0, 1], got {top_p}")
    self.top_p, self.mask_threshold = float(top_p), float(mask_threshold)
    self.values = {
      c: {"proportional_energy": [], "proportional_energy_area_weighted": [], "topk_iou": []}
      for c in ("true_class", "predicted_class")
    }

  def update(self, host: dict, outputs: dict) -> None:
    from divisive_jax import cams, metrics

    keep = np.asarray(host["has_saliency"]) > 0
    if not keep.any():
      return
    human = np.asarray(host["saliency"])[keep]  # (n, H, W)
    maps = np.asarray(outputs["maps"])[keep]  # (n, 2, h, w)
    rows = np.arange(len(human))
    up = np.asarray(cams.resize(jax.numpy.asarray(maps, jax.numpy.float32), human.shape[-2:]))
    mask = human > self.mask_threshold
    for name, cls in (
      ("true_class", np.asarray(host["label"])[keep]),
      ("predicted_class", np.asarray(outputs["pred"])[keep]),
    ):
      cam = metrics.normalize_map(up[rows, np.asarray(cls, np.int64)])  # (n, H, W) in [0, 1]
      v = self.values[name]
      v["proportional_energy"].extend(np.atleast_1d(metrics.proportional_energy(cam, mask)))
      v["proportional_energy_area_weighted"].extend(
        np.atleast_1d(metrics.proportional_energy(cam, mask, weight_by_area=True))
      )
      v["topk_iou"].extend(
        np.atleast_1d(
          metrics.topk_iou(cam, mask.astype(np.float32), p=self.top_p, mask_threshold=0.5)
        )
      )

  def summary(self) -> dict[str, Any]:
    def stats(x):
      x = np.asarray(x, np.float64)
      if x.size == 0:
        return {"mean": None, "std": None, "n": 0}
      return {"mean": float(x.mean()), "std": float(x.std()), "n": int(x.size)}

    out: dict[str, Any] = {
      "n_with_map": len(self.values["true_class"]["proportional_energy"]),
      "top_p": self.top_p,
      "mask": f"human map > {self.mask_threshold:g}",
      "cam": "raw class map upsampled bilinearly to the human-map resolution, then min-max "
      "normalised to [0, 1] per example",
      "std": "population std (ddof=0) over examples with a human map",
    }
    for name, v in self.values.items():
      out[name] = {k: stats(x) for k, x in v.items()}
    return out


# -------------------------------------------------------------------------------- evaluation
def _val_cache_key(step: int, digest: str, splits, data_config) -> dict:
  """What the cached validation scores depend on: weights and validation data."""
  h = hashlib.sha1(json.dumps(data_config.to_dict(), sort_keys=True, default=str).encode())
  h.update(str(splits.info.get("fingerprint", "")).encode())
  for column in ("label", "attack_type", "has_saliency"):  # cheap: read without decoding
    h.update(np.asarray(getattr(splits.val, column, ()), np.int64).tobytes())
  return {
    "checkpoint_step": int(step),
    "params_digest": digest,
    "n_examples": int(len(splits.val)),
    "data_digest": h.hexdigest(),
  }


def _load_cached_val(workdir: str, key: dict) -> dict | None:
  csv_path = os.path.join(workdir, "scores_val.csv")
  meta_path = os.path.join(workdir, "scores_val.meta.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if {k: meta.get(k) for k in key} != key:
      return None
    cached = read_scores_csv(csv_path)
  except (OSError, ValueError, KeyError):
    return None
  if len(cached["score"]) != key["n_examples"] or not np.all(np.isfinite(cached["score"])):
    return None
  return cached


def _save_val_cache(workdir: str, key: dict, result: dict, attack_types) -> None:
  write_scores_csv(os.path.join(workdir, "scores_val.csv"), result, attack_types)
  _write_atomic(os.path.join(workdir, "scores_val.meta.json"), json.dumps(key, indent=2))


def evaluate_workdir(
  workdir: str,
  which: str | int = "best",
  split: str = "test",
  batch_size: int | None = None,
  top_p: float = 0.1,
) -> dict:
  """Evaluate checkpoint `which` of `workdir` on `split`; write eval/scores/ROC files.

  Returns the JSON-able dict written to ``W/eval_<split>.json``. See the module docstring.
  """
  from divisive_jax import checkpoints, data as data_lib, metrics, plots, step as step_lib, train

  check_split(split)
  which = check_which(which)
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be a fraction in (0, 1], got {top_p}")
  inf = checkpoints.load_for_inference(workdir, which)
  config = inf.config
  splits = data_lib.load_splits(config.data, workdir)
  class_names = tuple(splits.class_names)
  attack_types = tuple(splits.attack_types)
  eval_step = step_lib.make_eval_step(inf.model, train.loss_config(config), inf.mesh)
  gbs = eval_batch_size(config, batch_size)
  logging.info(
    "Evaluating %s checkpoint (step %d) of %s on %s (%d examples, batch %d, %d devices)",
    which,
    inf.step,
    workdir,
    split,
    len(getattr(splits, split)),
    gbs,
    jax.device_count(),
  )

  lead = is_lead()
  key = _val_cache_key(inf.step, params_digest(inf.state), splits, config.data)
  align = AlignmentAccumulator(top_p)
  result = train.run_split(
    eval_step, inf.state, getattr(splits, split), inf.mesh, gbs, on_batch=align.update
  )
  if split == "val":
    val_labels, val_scores, cached = result["label"], result["score"], False
    if lead:
      _save_val_cache(workdir, key, result, attack_types)
  else:
    val = _load_cached_val(workdir, key)
    cached = all_processes_agree(val is not None)
    if cached:
      logging.info(
        "Validation scores of step %d reused from %s",
        inf.step,
        os.path.join(workdir, "scores_val.csv"),
      )
      val_labels, val_scores = val["label"], val["score"]
    else:
      logging.info("Running validation (step %d) for the thresholds", inf.step)
      vres = train.run_split(eval_step, inf.state, splits.val, inf.mesh, gbs)
      val_labels, val_scores = vres["label"], vres["score"]
      if lead:
        _save_val_cache(workdir, key, vres, attack_types)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", metrics.DegenerateInputWarning)
    pad = metrics.pad_metrics(
      val_labels,
      val_scores,
      result["label"],
      result["score"],
      test_attack_types=result["attack_type"],
      attack_type_names=attack_types,
    )
    fpr, tpr, _ = metrics.roc_curve(result["label"], result["score"])
  out: dict[str, Any] = dict(pad)
  out.update(
    checkpoint_step=int(inf.step),
    checkpoint=str(which),
    split=split,
    class_names=list(class_names),
    positive_class=class_names[1],
    negative_class=class_names[0],
    score="P(class 1) = P(%s)" % class_names[1],
    score_polarity=metrics.SCORE_POLARITY,
    n_examples=int(len(result["score"])),
    thresholds_from_split="val",
    thresholds_from_same_split=split == "val",
    val_scores_cached=bool(cached),
    cam_kind=str(config.loss.get("cam_kind", "cam")),
    heldout_attack=str(config.data.get("heldout_attack", "")),
    saliency_alignment=align.summary(),
  )
  if split == "val":
    out["threshold_note"] = (
      "split is 'val': thresholds were chosen on this same split (val's "
      "own thresholds), so its error rates at them are optimistic"
    )
  else:
    out["threshold_note"] = f"thresholds chosen on the validation split and applied to '{split}'"
  out = metrics.to_jsonable(out)

  if lead:
    _write_atomic(
      os.path.join(workdir, f"eval_{split}.json"), json.dumps(out, indent=2, allow_nan=False) + "\n"
    )
    write_scores_csv(os.path.join(workdir, f"scores_{split}.csv"), result, attack_types)
    plots.save_roc(
      os.path.join(workdir, f"roc_{split}.png"),
      fpr,
      tpr,
      pad["auroc"],
      title=f"{split} (step {inf.step}): {class_names[1]} vs {class_names[0]}",
    )
  sync(f"evaluate_{split}_written")
  logging.info(
    "%s: AUROC %s, APCER %s, BPCER %s at the val-EER threshold %s; wrote %s",
    split,
    out["auroc"],
    out["apcer"],
    out["bpcer"],
    out["threshold"],
    os.path.join(workdir, f"eval_{split}.json"),
  )
  return out


# ------------------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "Trained workdir (with config.json and checkpoints/).")
  flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
  flags.DEFINE_string("split", "test", "train | val | test.")
  flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: the config's).")
  flags.DEFINE_float("top_p", 0.1, "Fraction of CAM pixels for the top-p IoU.")
  define_distributed_flags()
  flags.mark_flag_as_required("workdir")


def define_distributed_flags():
  from absl import flags

  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
  flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator HOST:PORT.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")


def init_distributed(FLAGS) -> None:
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )


def main(argv):
  import sys
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  init_distributed(FLAGS)
  try:
    out = evaluate_workdir(
      FLAGS.workdir, FLAGS.checkpoint, FLAGS.split, FLAGS.batch_size, FLAGS.top_p
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if is_lead():
    a = out["saliency_alignment"]["true_class"]["proportional_energy"]
    print(
      f"{FLAGS.split} (step {out['checkpoint_step']}, n={out['n_examples']}): "
      f"AUROC={out['auroc']} EER={out['eer']} APCER={out['apcer']} BPCER={out['bpcer']} "
      f"(threshold {out['threshold']} from val); true-class CAM proportional energy "
      f"{a['mean']} (n={a['n']}). Wrote {os.path.join(FLAGS.workdir, f'eval_{FLAGS.split}.json')}"
    )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
