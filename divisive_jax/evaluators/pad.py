"""The PAD evaluator: scores, ISO/IEC 30107-3 error rates at validation thresholds, ROC.

`pad_metrics` is the report of a test split at thresholds chosen on validation (never on
test); `PadEvaluator` collects a split's scores batch by batch and writes
``scores_<split>.csv`` and ``roc_<split>.png``. Conventions (labels, score polarity, decision
rule, NaN vs None) are those of `divisive_jax.metrics`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from divisive_jax import layout, metrics, scores
from divisive_jax.metrics import DECISION_RULE, SCORE_POLARITY, DegenerateInputWarning


_QUIET = dict(action="ignore", category=DegenerateInputWarning)  # for warnings.catch_warnings
_NAMED_OPS = {
  "eer": "val_eer",
  "apcer5": "val_apcer5",
  "apcer1": "val_apcer1",
  "bpcer1": "val_bpcer1",
}


def _attack_type_names(types: np.ndarray, names) -> list:
  """Per sample its attack type's name: names as given; an index looked up in ``names`` (-1:
  'unknown'; an index ``names`` lacks: the index itself)."""
  if types.dtype.kind in "USO":
    return [str(t) for t in types]
  if not isinstance(names, Mapping):
    names = dict(enumerate(() if names is None else names))
  return ["unknown" if t < 0 else str(names.get(t, t)) for t in types.astype(np.int64).tolist()]


def pad_metrics(
  val_labels,
  val_scores,
  test_labels,
  test_scores,
  test_attack_types=None,
  attack_type_names: Sequence[str] | Mapping[int, str] | None = None,
  operating_point: str | float = "eer",
) -> dict[str, Any]:
  """ISO/IEC 30107-3 style PAD report; thresholds chosen on validation, applied to test.

  Args:
    val_labels, val_scores: validation split (used ONLY to choose thresholds).
    test_labels, test_scores: test split (all reported error rates are measured here).
    test_attack_types: per test sample, an int index into ``attack_type_names`` (-1 =
      bona fide / unknown) or the type name itself; only attack samples (label 1) are used.
    attack_type_names: list (or {index: name}) naming the attack types.
    operating_point: which validation threshold defines ``threshold``/``apcer``/``bpcer``/
      ``accuracy``/``apcer_per_attack_type``: ``'eer'`` (default), ``'apcer5'``,
      ``'apcer1'``, ``'bpcer1'``, or a fixed float threshold (e.g. 0.5).

  Returns a JSON-able dict (floats may be NaN; `jsonio` writes them as null) with
    * ``auroc``: test AUROC (threshold-free);
    * ``eer``: the test set's own EER, a threshold-free summary (a.k.a. ``eer_test_oracle``);
    * ``threshold``, ``apcer``, ``bpcer``, ``accuracy``, ``apcer_per_attack_type``
      (name -> APCER), ``apcer_max`` (+ ``apcer_max_type``; equal to ``apcer`` when no types
      are given): on test, at the validation-chosen operating threshold;
    * ``accuracy_at_val_eer_threshold``; ``accuracy_at_0.5`` (None unless all test scores are
      in [0, 1], i.e. look like probabilities);
    * ``bpcer_at_apcer5`` / ``bpcer_at_apcer1``: test BPCER at the thresholds that give
      APCER <= 5% / 1% on VALIDATION (BPCER20 / BPCER100 done properly);
      ``apcer_at_bpcer1``: test APCER at the validation threshold for BPCER <= 1%;
    * ``thresholds``: {val_eer, val_apcer5, val_apcer1, val_bpcer1};
      ``operating_points``: per named point, threshold and val/test APCER, BPCER, accuracy;
    * ``bpcer20_test_oracle``, ``bpcer100_test_oracle``, ``apcer_at_bpcer1_test_oracle``,
      ``eer_test_oracle``, ``eer_threshold_test_oracle``: read off the TEST set's own ROC, as
      many papers report them (optimistic; not a valid protocol for choosing thresholds);
    * ``val_auroc``, ``val_eer``; counts ``n_val``, ``n_val_attack``, ``n_val_bona_fide``,
      ``n_test``, ``n_test_attack``, ``n_test_bona_fide``, ``n_test_per_attack_type``;
    * ``score_polarity`` ('higher = attack'), ``decision_rule``, ``threshold_source``
      ('validation'), ``operating_point``, ``warnings`` (reasons for NaN fields).
  """
  vl, vs = metrics.check_inputs(val_labels, val_scores, "validation")
  tl, ts = metrics.check_inputs(test_labels, test_scores, "test")
  notes: list[str] = []
  v_reason = metrics.single_class_reason(vl, "validation")
  t_reason = metrics.single_class_reason(tl, "test")
  if v_reason:
    notes.append(
      f"{v_reason}: validation thresholds (and every test error rate measured at "
      f"them), val AUROC and val EER are NaN"
    )
  if t_reason:
    notes.append(
      f"{t_reason}: test AUROC, EER and test-oracle figures are NaN, and so is "
      f"the error rate of the missing class"
    )

  with warnings.catch_warnings(**_QUIET):  # the reasons for NaN fields are listed in 'warnings'
    out = _pad_report(vl, vs, tl, ts, test_attack_types, attack_type_names, operating_point, notes)
  if notes:
    warnings.warn("pad_metrics: " + "; ".join(notes), DegenerateInputWarning, stacklevel=2)
  return out


def _pad_report(vl, vs, tl, ts, test_attack_types, attack_type_names, operating_point, notes):
  val_eer, val_eer_thr = metrics.eer(vl, vs)
  thresholds = {
    "val_eer": val_eer_thr,
    "val_apcer5": metrics.threshold_at_apcer(vl, vs, 0.05),
    "val_apcer1": metrics.threshold_at_apcer(vl, vs, 0.01),
    "val_bpcer1": metrics.threshold_at_bpcer(vl, vs, 0.01),
  }
  if isinstance(operating_point, str):
    if operating_point not in _NAMED_OPS:
      raise ValueError(
        f"operating_point must be one of {sorted(_NAMED_OPS)} or a float, got {operating_point!r}"
      )
    op_thr, op_name = thresholds[_NAMED_OPS[operating_point]], operating_point
  else:
    op_thr = float(operating_point)
    op_name = f"fixed {op_thr:g}"

  operating_points = {}
  for name, thr in thresholds.items():
    va, vb = metrics.error_rates(vl, vs, thr)
    ta, tb = metrics.error_rates(tl, ts, thr)
    operating_points[name] = {
      "threshold": thr,
      "val_apcer": va,
      "val_bpcer": vb,
      "test_apcer": ta,
      "test_bpcer": tb,
      "test_accuracy": metrics.accuracy(tl, ts, thr),
    }

  apcer, bpcer = metrics.error_rates(tl, ts, op_thr)

  # per attack type, at the operating threshold
  per_type: dict[str, float] = {}
  n_per_type: dict[str, int] = {}
  if test_attack_types is not None:
    types = np.asarray(test_attack_types).reshape(-1)
    if types.shape[0] != tl.shape[0]:
      raise ValueError(
        f"test_attack_types has {types.shape[0]} entries, test has {tl.shape[0]} samples"
      )
    names = np.asarray(_attack_type_names(types[tl == 1], attack_type_names), dtype=object)
    att_scores = ts[tl == 1]
    for name in sorted(set(names.tolist())):
      sel = names == name
      n_per_type[name] = int(sel.sum())
      per_type[name] = (
        float(np.mean(att_scores[sel] < op_thr)) if not np.isnan(op_thr) else float("nan")
      )
  finite = {k: v for k, v in per_type.items() if not math.isnan(v)}
  apcer_max_type = max(finite, key=finite.get) if finite else None
  apcer_max = finite[apcer_max_type] if finite else apcer

  t_eer, t_eer_thr = metrics.eer(tl, ts)
  oracle = {}
  for key, target, at, measured in (
    ("bpcer20_test_oracle", 0.05, metrics.threshold_at_apcer, 1),
    ("bpcer100_test_oracle", 0.01, metrics.threshold_at_apcer, 1),
    ("apcer_at_bpcer1_test_oracle", 0.01, metrics.threshold_at_bpcer, 0),
  ):
    oracle[key] = metrics.error_rates(tl, ts, at(tl, ts, target))[measured]

  probs = bool(ts.min() >= 0.0 and ts.max() <= 1.0)
  n_v1, n_t1 = int(vl.sum()), int(tl.sum())
  return {
    "score_polarity": SCORE_POLARITY,
    "decision_rule": DECISION_RULE,
    "threshold_source": "validation",
    "operating_point": op_name,
    "auroc": metrics.auroc(tl, ts),
    "eer": t_eer,
    "threshold": op_thr,
    "apcer": apcer,
    "bpcer": bpcer,
    "accuracy": metrics.accuracy(tl, ts, op_thr),
    "accuracy_at_val_eer_threshold": operating_points["val_eer"]["test_accuracy"],
    "accuracy_at_0.5": metrics.accuracy(tl, ts, 0.5) if probs else None,
    "apcer_per_attack_type": per_type,
    "apcer_max": apcer_max,
    "apcer_max_type": apcer_max_type,
    "bpcer_at_apcer5": operating_points["val_apcer5"]["test_bpcer"],
    "bpcer_at_apcer1": operating_points["val_apcer1"]["test_bpcer"],
    "apcer_at_bpcer1": operating_points["val_bpcer1"]["test_apcer"],
    "thresholds": thresholds,
    "operating_points": operating_points,
    "eer_test_oracle": t_eer,
    "eer_threshold_test_oracle": t_eer_thr,
    **oracle,
    "val_auroc": metrics.auroc(vl, vs),
    "val_eer": val_eer,
    "n_val": int(vl.size),
    "n_val_attack": n_v1,
    "n_val_bona_fide": int(vl.size - n_v1),
    "n_test": int(tl.size),
    "n_test_attack": n_t1,
    "n_test_bona_fide": int(tl.size - n_t1),
    "n_test_per_attack_type": n_per_type,
    "warnings": notes,
  }


class PadEvaluator:
  """Scores of a split -> the PAD report; thresholds from ``val`` = (labels, scores).

  For the validation split itself pass ``val=None``: its thresholds are its own (optimistic;
  the report says so). Options: none.
  """

  key = None  # the report's fields are the top level of eval_<split>.json
  extra_args = ("val",)
  output_keys = ("score", "pred", "ce")
  host_keys = ("id", "label", "attack_type")

  def __init__(self, ctx, val=None):
    self.ctx, self.val = ctx, val
    self._rows = {k: [] for k in self.host_keys + self.output_keys}

  def update(self, host: dict, outputs: dict) -> None:
    for k, rows in self._rows.items():
      rows.append(np.asarray(host[k] if k in self.host_keys else outputs[k]))

  def result(self) -> dict[str, np.ndarray]:
    """Per-example arrays in dataset order: id, label, attack_type, score, pred, ce."""
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in self._rows.items()}

  def validation_metrics(self) -> dict[str, float]:
    """The trainer's per-evaluation figures: accuracy (argmax), AUROC, mean cross-entropy."""
    r = self.result()
    with warnings.catch_warnings(**_QUIET):
      auc = metrics.auroc(r["label"], r["score"])
    return {
      "val/accuracy": float(np.mean(r["pred"] == r["label"])),
      "val/auroc": float(auc),
      "val/loss": float(np.mean(r["ce"])),
    }

  def summary(self) -> dict[str, Any]:
    r, ctx = self.result(), self.ctx
    val = (r["label"], r["score"]) if self.val is None else self.val
    with warnings.catch_warnings(**_QUIET):
      out = pad_metrics(*val, r["label"], r["score"], r["attack_type"], ctx.attack_types)
    names = ctx.class_names
    out.update(
      split=ctx.split,
      class_names=list(names),
      positive_class=names[1],
      negative_class=names[0],
      score=f"P(class 1) = P({names[1]})",
      n_examples=int(len(r["score"])),
      mean_cross_entropy=float(np.mean(r["ce"])) if len(r["ce"]) else float("nan"),
      thresholds_from_split="val",
      thresholds_from_same_split=self.val is None,
      threshold_note=(
        "split is 'val': thresholds were chosen on this same split (val's own thresholds), so "
        "its error rates at them are optimistic"
        if self.val is None
        else f"thresholds chosen on the validation split and applied to '{ctx.split}'"
      ),
    )
    return out

  def write(self, directory: str, summary: dict) -> None:
    from divisive_jax import plots

    r, ctx = self.result(), self.ctx
    scores.write_csv(layout.scores_file(directory, ctx.split), r, ctx.attack_types)
    with warnings.catch_warnings(**_QUIET):
      fpr, tpr, _ = metrics.roc_curve(r["label"], r["score"])
    plots.save_roc(
      layout.eval_file(directory, ctx.split, "roc", ".png"),
      fpr,
      tpr,
      summary["auroc"],
      title=f"{ctx.split} (step {ctx.step}): {ctx.class_names[1]} vs {ctx.class_names[0]}",
      task=ctx.task,
      class_names=tuple(ctx.class_names),
    )
