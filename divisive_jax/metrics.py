"""Metrics: ROC / AUROC, ISO/IEC 30107-3 PAD error rates, saliency alignment, divergence summary.

Pure numpy; no jax, no scikit-learn (scikit-learn is used only by the tests, as a reference).

Conventions (used by every function here)
-----------------------------------------
* ``labels``: 0 = bona fide (negative), 1 = attack (positive, class 1, e.g. 'Spoof',
  'Synthetic', 'abnormal').
* ``scores``: the attack score, **higher = attack** (e.g. P(class 1)). The polarity is
  written into :func:`pad_metrics` output as ``score_polarity``.
* **Decision rule**: a presentation is classified *attack* iff ``score >= threshold``,
  *bona fide* iff ``score < threshold``. Hence, for a threshold ``t``::

      APCER(t) = #{attack with score <  t} / #attack      (attacks accepted as bona fide)
      BPCER(t) = #{bona fide with score >= t} / #bona fide (bona fide rejected as attack)

  This is scikit-learn's ROC convention: at ROC threshold ``t``, ``tpr = 1 - APCER`` and
  ``fpr = BPCER``.
* Thresholds are **chosen on validation** (:func:`eer`, :func:`threshold_at_apcer`,
  :func:`threshold_at_bpcer`) and **applied to test** (:func:`error_rates`,
  :func:`pad_metrics`). Figures computed from the test set's own ROC (test EER, BPCER20 /
  BPCER100 read off the test ROC) are labelled ``*_test_oracle``; papers report them but they
  are optimistic.
* Selected thresholds are always one of the validation scores (the operating points of the
  ROC), or, for the "everything is bona fide" point, ``nextafter(max(scores), +inf)`` (finite,
  so JSON stays valid), never an interpolated value.
* Input validation: empty input or mismatched lengths -> ``ValueError``; non-finite scores
  -> ``ValueError`` naming how many are NaN / infinite; labels outside {0, 1} ->
  ``ValueError``. A split with a single class does not raise: threshold-free metrics that need
  both classes (AUROC, EER, thresholds) are ``float('nan')``, a
  :class:`DegenerateInputWarning` is emitted and :func:`pad_metrics` lists the reason in its
  ``warnings`` field. Never a silent 0.5.
* In result dicts, ``float('nan')`` means *undefined for this data* (e.g. BPCER with no bona
  fide samples) and ``None`` means *not applicable* (e.g. accuracy at 0.5 for scores that are
  not probabilities). Use :func:`to_jsonable` before ``json.dump(..., allow_nan=False)``.

Saliency alignment
------------------
* :func:`proportional_energy` (Zhang, Bieri, Günther, SDS 2024; SPEC §1):
  ``PE = sum(A * [M > 0]) / sum(A)`` (0 when A is all zero), optionally times
  ``(|image| - |M|) / |image|`` with ``|M| = #{M > 0}``.
* :func:`topk_iou`: IoU between the top-``p`` fraction of saliency pixels and the binarised
  mask ``M > mask_threshold``.
* :func:`divergence_summary`: the post-hoc tool of Divisive Decisions (SPEC §1), see there.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
  "DegenerateInputWarning",
  "SCORE_POLARITY",
  "DECISION_RULE",
  "roc_curve",
  "auroc",
  "eer",
  "error_rates",
  "threshold_at_apcer",
  "threshold_at_bpcer",
  "pad_metrics",
  "proportional_energy",
  "topk_iou",
  "normalize_map",
  "divergence_map",
  "divergence_summary",
  "to_jsonable",
]

SCORE_POLARITY = "higher = attack"
DECISION_RULE = "attack iff score >= threshold"
_EPS = 1e-12  # tolerance when comparing error rates with a target


class DegenerateInputWarning(UserWarning):
  """A metric is undefined for the given data (e.g. a split with a single class)."""


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _check(labels, scores, name: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Validate and convert to (int64 labels, float64 scores), 1-D and of equal length."""
  where = f" ({name})" if name else ""
  labels = np.asarray(labels)
  scores = np.asarray(scores)

  def _flat(a, what):
    if a.ndim == 2 and a.shape[1] == 1:
      return a[:, 0]
    if a.ndim != 1:
      raise ValueError(f"{what} must be 1-D{where}; got shape {a.shape}")
    return a

  labels = _flat(labels, "labels")
  scores = _flat(scores, "scores")
  if labels.shape[0] != scores.shape[0]:
    raise ValueError(
      f"labels and scores differ in length{where}: {labels.shape[0]} vs {scores.shape[0]}"
    )
  if labels.size == 0:
    raise ValueError(f"empty input{where}: no labels/scores given")
  try:
    scores = scores.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"scores must be numeric{where}: {e}") from None
  n_nan = int(np.isnan(scores).sum())
  n_inf = int(np.isinf(scores).sum())
  if n_nan or n_inf:
    raise ValueError(
      f"scores{where} contain {n_nan} NaN and {n_inf} infinite value(s) "
      f"out of {scores.size}; fix the model outputs before computing metrics"
    )
  if labels.dtype == bool:
    labels = labels.astype(np.int64)
  bad = ~np.isin(labels, (0, 1))
  if bad.any():
    raise ValueError(
      f"labels{where} must be 0 (bona fide) or 1 (attack); found "
      f"{int(bad.sum())} other value(s), e.g. {labels[bad][0]!r}"
    )
  return labels.astype(np.int64), scores


def _single_class_reason(labels: np.ndarray, name: str = "") -> str | None:
  n1 = int(labels.sum())
  n0 = labels.size - n1
  where = f"{name} split" if name else "input"
  if n1 == 0:
    return f"{where} has no attack samples (all {n0} are bona fide)"
  if n0 == 0:
    return f"{where} has no bona fide samples (all {n1} are attacks)"
  return None


def _warn(reason: str, what: str) -> None:
  warnings.warn(f"{what} is undefined (NaN): {reason}", DegenerateInputWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# ROC, AUROC, EER
# --------------------------------------------------------------------------------------


def _roc_counts(labels: np.ndarray, scores: np.ndarray):
  """fps, tps, thresholds at each distinct score, descending (no leading +inf point)."""
  order = np.argsort(scores, kind="mergesort")[::-1]
  s = scores[order]
  y = labels[order].astype(np.float64)
  distinct = np.flatnonzero(np.diff(s))
  idx = np.r_[distinct, y.size - 1]
  tps = np.cumsum(y)[idx]
  fps = 1.0 + idx - tps
  return fps, tps, s[idx]


def roc_curve(labels, scores, drop_intermediate: bool = False):
  """ROC curve, identical to ``sklearn.metrics.roc_curve`` (for the same ``drop_intermediate``).

  Returns ``(fpr, tpr, thresholds)``: one point per distinct score, thresholds decreasing,
  preceded by the point ``(0, 0)`` at threshold ``+inf``. At threshold ``t`` a sample is
  predicted attack iff ``score >= t``, so ``fpr = BPCER(t)`` and ``tpr = 1 - APCER(t)``.
  Tied scores form a single point. With ``drop_intermediate=True`` collinear points are
  dropped exactly as scikit-learn does (its default); here the default keeps them all.
  If a class is absent the corresponding rate is all-NaN and a
  :class:`DegenerateInputWarning` is emitted.
  """
  labels, scores = _check(labels, scores)
  fps, tps, thr = _roc_counts(labels, scores)
  if drop_intermediate and fps.size > 2:
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    fps, tps, thr = fps[keep], tps[keep], thr[keep]
  fps = np.r_[0.0, fps]
  tps = np.r_[0.0, tps]
  thr = np.r_[np.inf, thr]
  reason = _single_class_reason(labels)
  if fps[-1] <= 0:
    _warn(reason, "fpr (BPCER)")
    fpr = np.full(fps.shape, np.nan)
  else:
    fpr = fps / fps[-1]
  if tps[-1] <= 0:
    _warn(reason, "tpr (1 - APCER)")
    tpr = np.full(tps.shape, np.nan)
  else:
    tpr = tps / tps[-1]
  return fpr, tpr, thr


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
  n1 = int(labels.sum())
  n0 = labels.size - n1
  if n1 == 0 or n0 == 0:
    return float("nan")
  _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
  cum = np.cumsum(counts).astype(np.float64)
  avg_rank = cum - (counts - 1) / 2.0  # 1-based average rank of each tie group
  ranks = avg_rank[inv.reshape(-1)]
  u = ranks[labels == 1].sum() - n1 * (n1 + 1) / 2.0
  return float(u / (n1 * n0))


def auroc(labels, scores) -> float:
  """Area under the ROC curve = P(score_attack > score_bona) + 0.5 P(tie) (Mann–Whitney U).

  Equal to ``sklearn.metrics.roc_auc_score``. NaN (with a warning) if a class is absent.
  """
  labels, scores = _check(labels, scores)
  reason = _single_class_reason(labels)
  if reason:
    _warn(reason, "AUROC")
  return _auroc(labels, scores)


def _points(labels: np.ndarray, scores: np.ndarray):
  """All achievable operating points: (thresholds, apcer, bpcer), thresholds decreasing.

  The first point (predict everything bona fide) gets the finite threshold
  ``nextafter(max(scores), inf)`` instead of +inf. Rates of an absent class are NaN.
  """
  fps, tps, thr = _roc_counts(labels, scores)
  fps = np.r_[0.0, fps]
  tps = np.r_[0.0, tps]
  thr = np.r_[np.nextafter(scores.max(), np.inf), thr]
  with np.errstate(invalid="ignore", divide="ignore"):
    apcer = 1.0 - tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    bpcer = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
  return thr, apcer, bpcer


def _eer(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
  if _single_class_reason(labels):
    return float("nan"), float("nan")
  thr, apcer, bpcer = _points(labels, scores)
  diff = bpcer - apcer  # strictly increasing from -1 to +1 along the points
  k = int(np.argmax(diff >= 0))
  if diff[k] == 0 or k == 0:
    value = bpcer[k]
  else:
    w = -diff[k - 1] / (diff[k] - diff[k - 1])
    value = bpcer[k - 1] + w * (bpcer[k] - bpcer[k - 1])
  # threshold: the operating point minimising max(APCER, BPCER); ties -> smallest |APCER-BPCER|
  i = int(np.lexsort((np.abs(diff), np.maximum(apcer, bpcer)))[0])
  return float(value), float(thr[i])


def eer(labels, scores) -> tuple[float, float]:
  """Equal error rate and a threshold for it: ``(eer, threshold)``.

  * ``eer`` is the value where the APCER and BPCER curves cross, **linearly interpolated**
    between the two consecutive ROC operating points that bracket the crossing (the usual
    ROC-convex-combination EER; exact when some point has APCER == BPCER).
  * ``threshold`` is a *real* operating point: the validation score (decision rule
    ``score >= threshold`` = attack) minimising ``max(APCER, BPCER)``, ties broken by the
    smallest ``|APCER - BPCER|``. It is one of the two points bracketing the crossing, so its
    error rates on the same data are the nearest achievable to ``eer``.

  ``(nan, nan)`` with a warning if a class is absent.
  """
  labels, scores = _check(labels, scores)
  reason = _single_class_reason(labels)
  if reason:
    _warn(reason, "EER")
  return _eer(labels, scores)


def error_rates(labels, scores, threshold: float) -> tuple[float, float]:
  """``(APCER, BPCER)`` at ``threshold`` (attack iff ``score >= threshold``).

  APCER is NaN when there are no attacks, BPCER when there is no bona fide sample, and both
  are NaN when ``threshold`` is NaN. No warning: callers decide.
  """
  labels, scores = _check(labels, scores)
  return _error_rates(labels, scores, threshold)


def _error_rates(labels, scores, threshold) -> tuple[float, float]:
  if threshold is None or np.isnan(threshold):
    return float("nan"), float("nan")
  att = scores[labels == 1]
  bon = scores[labels == 0]
  apcer = float(np.mean(att < threshold)) if att.size else float("nan")
  bpcer = float(np.mean(bon >= threshold)) if bon.size else float("nan")
  return apcer, bpcer


def _accuracy(labels, scores, threshold) -> float:
  if threshold is None or np.isnan(threshold):
    return float("nan")
  return float(np.mean((scores >= threshold).astype(np.int64) == labels))


def _threshold_at(labels, scores, target: float, constrained: str) -> float:
  if not (0.0 <= float(target) <= 1.0):
    raise ValueError(f"target error rate must be in [0, 1], got {target}")
  if _single_class_reason(labels):
    return float("nan")
  thr, apcer, bpcer = _points(labels, scores)
  if constrained == "apcer":
    feasible = apcer <= target + _EPS
    key = (apcer, bpcer)  # minimise BPCER, then APCER
  else:
    feasible = bpcer <= target + _EPS
    key = (bpcer, apcer)
  idx = np.flatnonzero(feasible)  # never empty: the extreme points have rate 0
  order = np.lexsort((key[0][idx], key[1][idx]))
  return float(thr[idx[order[0]]])


def threshold_at_apcer(labels, scores, target: float) -> float:
  """Threshold with ``APCER <= target`` and the lowest BPCER (ties: lowest APCER).

  Meant for the VALIDATION set; apply the result to test with :func:`error_rates`.
  NaN with a warning if a class is absent.
  """
  labels, scores = _check(labels, scores)
  reason = _single_class_reason(labels)
  if reason:
    _warn(reason, "threshold at APCER")
  return _threshold_at(labels, scores, target, "apcer")


def threshold_at_bpcer(labels, scores, target: float) -> float:
  """Threshold with ``BPCER <= target`` and the lowest APCER (ties: lowest BPCER).

  Meant for the VALIDATION set. NaN with a warning if a class is absent.
  """
  labels, scores = _check(labels, scores)
  reason = _single_class_reason(labels)
  if reason:
    _warn(reason, "threshold at BPCER")
  return _threshold_at(labels, scores, target, "bpcer")


# --------------------------------------------------------------------------------------
# PAD report
# --------------------------------------------------------------------------------------

_NAMED_OPS = {
  "eer": "val_eer",
  "apcer5": "val_apcer5",
  "apcer1": "val_apcer1",
  "bpcer1": "val_bpcer1",
}


def _attack_type_names(types: np.ndarray, names) -> list:
  if types.dtype.kind in "USO":
    return [str(t) for t in types]
  out = []
  for t in types.astype(np.int64):
    t = int(t)
    if t < 0:
      out.append("unknown")
    elif names is None:
      out.append(str(t))
    elif isinstance(names, Mapping):
      out.append(str(names.get(t, t)))
    elif t < len(names):
      out.append(str(names[t]))
    else:
      out.append(str(t))
  return out


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

  Returns a JSON-able dict (floats may be NaN, see :func:`to_jsonable`) with
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
  vl, vs = _check(val_labels, val_scores, "validation")
  tl, ts = _check(test_labels, test_scores, "test")
  notes: list[str] = []
  v_reason = _single_class_reason(vl, "validation")
  t_reason = _single_class_reason(tl, "test")
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

  val_eer, val_eer_thr = _eer(vl, vs)
  thresholds = {
    "val_eer": val_eer_thr,
    "val_apcer5": _threshold_at(vl, vs, 0.05, "apcer"),
    "val_apcer1": _threshold_at(vl, vs, 0.01, "apcer"),
    "val_bpcer1": _threshold_at(vl, vs, 0.01, "bpcer"),
  }
  if isinstance(operating_point, str):
    if operating_point not in _NAMED_OPS:
      raise ValueError(
        f"operating_point must be one of {sorted(_NAMED_OPS)} or a float, got {operating_point!r}"
      )
    op_thr = thresholds[_NAMED_OPS[operating_point]]
    op_name = operating_point
  else:
    op_thr = float(operating_point)
    op_name = f"fixed {op_thr:g}"

  operating_points = {}
  for name, thr in thresholds.items():
    va, vb = _error_rates(vl, vs, thr)
    ta, tb = _error_rates(tl, ts, thr)
    operating_points[name] = {
      "threshold": thr,
      "val_apcer": va,
      "val_bpcer": vb,
      "test_apcer": ta,
      "test_bpcer": tb,
      "test_accuracy": _accuracy(tl, ts, thr),
    }

  apcer, bpcer = _error_rates(tl, ts, op_thr)

  # per attack type, at the operating threshold
  per_type: dict[str, float] = {}
  n_per_type: dict[str, int] = {}
  if test_attack_types is not None:
    types = np.asarray(test_attack_types).reshape(-1)
    if types.shape[0] != tl.shape[0]:
      raise ValueError(
        f"test_attack_types has {types.shape[0]} entries, test has {tl.shape[0]} samples"
      )
    att = tl == 1
    names = np.asarray(_attack_type_names(types[att], attack_type_names), dtype=object)
    att_scores = ts[att]
    for name in sorted(set(names.tolist())):
      sel = names == name
      n_per_type[name] = int(sel.sum())
      per_type[name] = (
        float(np.mean(att_scores[sel] < op_thr)) if not np.isnan(op_thr) else float("nan")
      )
  finite = {k: v for k, v in per_type.items() if not math.isnan(v)}
  if finite:
    apcer_max_type = max(finite, key=finite.get)
    apcer_max = finite[apcer_max_type]
  else:
    apcer_max_type, apcer_max = None, apcer

  t_eer, t_eer_thr = _eer(tl, ts)
  oracle = {}
  for key, target, constrained, measured in (
    ("bpcer20_test_oracle", 0.05, "apcer", 1),
    ("bpcer100_test_oracle", 0.01, "apcer", 1),
    ("apcer_at_bpcer1_test_oracle", 0.01, "bpcer", 0),
  ):
    thr = _threshold_at(tl, ts, target, constrained)
    oracle[key] = _error_rates(tl, ts, thr)[measured]

  probs = bool(ts.min() >= 0.0 and ts.max() <= 1.0)
  n_v1, n_t1 = int(vl.sum()), int(tl.sum())
  out: dict[str, Any] = {
    "score_polarity": SCORE_POLARITY,
    "decision_rule": DECISION_RULE,
    "threshold_source": "validation",
    "operating_point": op_name,
    "auroc": _auroc(tl, ts),
    "eer": t_eer,
    "threshold": op_thr,
    "apcer": apcer,
    "bpcer": bpcer,
    "accuracy": _accuracy(tl, ts, op_thr),
    "accuracy_at_val_eer_threshold": operating_points["val_eer"]["test_accuracy"],
    "accuracy_at_0.5": _accuracy(tl, ts, 0.5) if probs else None,
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
    "val_auroc": _auroc(vl, vs),
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
  if notes:
    warnings.warn("pad_metrics: " + "; ".join(notes), DegenerateInputWarning, stacklevel=2)
  return out


def to_jsonable(obj):
  """Recursively convert numpy scalars/arrays to Python and non-finite floats to ``None``.

  ``json.dumps(to_jsonable(x), allow_nan=False)`` then always succeeds.
  """
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


# --------------------------------------------------------------------------------------
# saliency alignment
# --------------------------------------------------------------------------------------


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape != b.shape:
    raise ValueError(
      f"{what}: saliency map shape {a.shape} != mask shape {b.shape}; resize "
      f"one to the other first (e.g. the CAM to image resolution)"
    )
  if a.ndim < 2:
    raise ValueError(f"{what}: expected (H, W) or (N, H, W) maps, got shape {a.shape}")


def _scalar_or_array(x: np.ndarray):
  return float(x) if x.ndim == 0 else x


def proportional_energy(saliency_map, mask, weight_by_area: bool = False):
  """Proportional energy ``sum(A * [M > 0]) / sum(A)`` over the last two axes (SPEC §1).

  ``saliency_map`` A must be non-negative (e.g. a min-max normalised or ReLU'd CAM) and have
  the same shape as ``mask`` M: (H, W) -> float, (N, H, W) -> (N,) array. 0 where A is all
  zero. With ``weight_by_area`` the value is multiplied by ``(|image| - |M|) / |image|``,
  ``|M| = #{M > 0}``, ``|image| = H * W`` (penalises large masks, Zhang et al.).
  """
  a = np.asarray(saliency_map, dtype=np.float64)
  m = np.asarray(mask)
  _same_shape(a, m, "proportional_energy")
  if np.isnan(a).any():
    raise ValueError("proportional_energy: saliency map contains NaN")
  if (a < 0).any():
    raise ValueError(
      "proportional_energy: saliency map has negative values; normalise (min-max) or ReLU it first"
    )
  inside = m > 0
  total = a.sum(axis=(-2, -1))
  num = (a * inside).sum(axis=(-2, -1))
  pe = np.divide(num, total, out=np.zeros_like(total), where=total > 0)
  if weight_by_area:
    n = a.shape[-2] * a.shape[-1]
    pe = pe * (n - inside.sum(axis=(-2, -1))) / n
  return _scalar_or_array(pe)


def _top_mask(values: np.ndarray, fraction: float) -> np.ndarray:
  """Boolean mask of the top-``fraction`` pixels over the last two axes, ties included.

  k = max(1, round(fraction * H * W)); every pixel >= the k-th largest value is selected, so
  ties at the cut are all kept (a constant map selects every pixel).
  """
  if not (0.0 < fraction <= 1.0):
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  h, w = values.shape[-2:]
  flat = values.reshape(values.shape[:-2] + (h * w,))
  k = max(1, int(round(fraction * h * w)))
  kth = np.partition(flat, h * w - k, axis=-1)[..., h * w - k]
  return values >= kth[..., None, None]


def topk_iou(saliency_map, mask, p: float = 0.1, mask_threshold: float = 0.5):
  """IoU of the top-``p`` fraction of saliency pixels with the binarised mask ``M > mask_threshold``.

  ``p`` is a fraction (0.1 = top 10%); k = max(1, round(p * H * W)) pixels, ties at the cut
  included. Maps and masks must have the same shape ((H, W) -> float, (N, H, W) -> (N,));
  the caller resizes. Union is never empty (the top set has >= 1 pixel).
  """
  a = np.asarray(saliency_map, dtype=np.float64)
  m = np.asarray(mask)
  _same_shape(a, m, "topk_iou")
  if np.isnan(a).any():
    raise ValueError("topk_iou: saliency map contains NaN")
  top = _top_mask(a, p)
  gt = m > mask_threshold
  inter = (top & gt).sum(axis=(-2, -1))
  union = (top | gt).sum(axis=(-2, -1))
  return _scalar_or_array(inter / union)


# --------------------------------------------------------------------------------------
# divergence (post-hoc tool of Divisive Decisions)
# --------------------------------------------------------------------------------------


def normalize_map(x) -> np.ndarray:
  """Per-map min-max normalisation to [0, 1] over the last two axes; constant maps -> 0."""
  x = np.asarray(x, dtype=np.float64)
  lo = x.min(axis=(-2, -1), keepdims=True)
  hi = x.max(axis=(-2, -1), keepdims=True)
  rng = hi - lo
  return np.divide(x - lo, rng, out=np.zeros_like(x), where=rng > 0)


def divergence_map(cam_pred, cam_other) -> np.ndarray:
  """``D = norm(cam_pred) - norm(cam_other)`` in [-1, 1], (H, W) or (N, H, W).

  Positive D: evidence for the predicted class; negative: for the other class. Average D
  over images of one class to get the per-class divergence map of SPEC §1.
  """
  p = np.asarray(cam_pred)
  o = np.asarray(cam_other)
  if p.shape != o.shape:
    raise ValueError(f"divergence_map: cam_pred shape {p.shape} != cam_other shape {o.shape}")
  return normalize_map(p) - normalize_map(o)


_NEIGHBOURS = {
  4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
  8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


def _components(mask: np.ndarray, connectivity: int) -> list[np.ndarray]:
  """Connected components of a 2-D boolean mask: list of (n_i, 2) (row, col) index arrays."""
  h, w = mask.shape
  seen = np.zeros_like(mask, dtype=bool)
  comps = []
  offs = _NEIGHBOURS[connectivity]
  for r0, c0 in zip(*np.nonzero(mask)):
    if seen[r0, c0]:
      continue
    seen[r0, c0] = True
    queue = deque([(int(r0), int(c0))])
    pix = []
    while queue:
      r, c = queue.popleft()
      pix.append((r, c))
      for dr, dc in offs:
        rr, cc = r + dr, c + dc
        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
          seen[rr, cc] = True
          queue.append((rr, cc))
    comps.append(np.asarray(pix, dtype=np.int64))
  return comps


def _summary_one(
  d: np.ndarray,
  pred_const: bool,
  other_const: bool,
  human,
  top_fraction: float,
  human_threshold: float,
  max_regions: int,
  connectivity: int,
) -> dict[str, Any]:
  h, w = d.shape
  ad = np.abs(d)
  energy = float(ad.sum())
  out: dict[str, Any] = {
    "shape": [h, w],
    "d_min": float(d.min()),
    "d_max": float(d.max()),
    "d_mean": float(d.mean()),
    "d_mean_abs": float(ad.mean()),
    "energy": energy,
    "pred_map_constant": pred_const,
    "other_map_constant": other_const,
  }
  inside = None
  if human is not None:
    inside = human > human_threshold
    area = float(inside.mean())
    out["human_area_fraction"] = area
    if energy > 0:
      out["human_energy_share"] = float(ad[inside].sum() / energy)
      out["human_weighted_energy_share"] = float((ad * np.clip(human, 0, None)).sum() / energy)
      pos = np.clip(d, 0, None)
      out["human_pred_energy_share"] = (
        float(pos[inside].sum() / pos.sum()) if pos.sum() > 0 else None
      )
    else:
      out["human_energy_share"] = None
      out["human_weighted_energy_share"] = None
      out["human_pred_energy_share"] = None
  regions = []
  if energy > 0:
    top = _top_mask(ad, top_fraction) & (ad > 0)
    for sign, sel in ((1, top & (d > 0)), (-1, top & (d < 0))):
      for pix in _components(sel, connectivity):
        rr, cc = pix[:, 0], pix[:, 1]
        wts = ad[rr, cc]
        e = float(wts.sum())
        peak = int(np.argmax(wts))
        reg = {
          "supports": "predicted" if sign > 0 else "other",
          "area": int(pix.shape[0]),
          "energy": e,
          "energy_share": e / energy,
          "mean_d": float(d[rr, cc].mean()),
          "peak": [int(rr[peak]), int(cc[peak])],
          "peak_d": float(d[rr[peak], cc[peak]]),
          "centroid": [float((rr * wts).sum() / e), float((cc * wts).sum() / e)],
          "bbox": [int(rr.min()), int(cc.min()), int(rr.max()) + 1, int(cc.max()) + 1],
        }
        reg["centroid_frac"] = [(reg["centroid"][0] + 0.5) / h, (reg["centroid"][1] + 0.5) / w]
        if inside is not None:
          reg["human_share"] = float(wts[inside[rr, cc]].sum() / e)
        regions.append(reg)
    regions.sort(key=lambda r: (-r["energy"], r["bbox"]))
    for rank, reg in enumerate(regions):
      reg["rank"] = rank
  out["n_regions"] = len(regions)
  out["top_regions"] = regions[:max_regions]
  return out


def divergence_summary(
  cam_pred,
  cam_other,
  human_map=None,
  top_fraction: float = 0.1,
  human_threshold: float = 0.0,
  max_regions: int = 10,
  connectivity: int = 8,
):
  """Post-hoc divergence tool of Divisive Decisions (SPEC §1), per image.

  ``D = norm(cam_pred) - norm(cam_other)`` with per-image min-max normalisation (a constant
  map normalises to all zeros, flagged ``*_map_constant``). The regions where ``|D|`` is
  largest are the features that separate the classes: the top-``top_fraction`` pixels of
  ``|D|`` (ties at the cut included, zero pixels excluded) are split by sign and grouped into
  connected components (``connectivity`` 4 or 8), ranked by their ``|D|`` energy.

  Args:
    cam_pred, cam_other: (H, W) or (N, H, W) CAMs of the predicted and of the other class,
      any range (normalised here).
    human_map: optional human saliency map(s) of the same shape (the caller resizes; e.g.
      bilinear down to the CAM grid); pixels with ``H > human_threshold`` count as inside.
    top_fraction: fraction of pixels forming the candidate regions.
    max_regions: regions kept per image (``n_regions`` counts them all).

  Returns a JSON-able dict per image (a list of them for (N, H, W) input) with
    ``d_min``, ``d_max``, ``d_mean``, ``d_mean_abs``, ``energy`` (= sum |D|);
    if ``human_map``: ``human_area_fraction`` (share expected by chance),
    ``human_energy_share`` (= sum(|D| [H > thr]) / sum |D|), ``human_weighted_energy_share``
    (= sum(|D| H) / sum |D|), ``human_pred_energy_share`` (same as the first for the
    positive part of D only); None when D is all zero;
    ``top_regions``: list of {``rank``, ``supports`` ('predicted' for D > 0, 'other' for
    D < 0), ``area`` (pixels), ``energy``, ``energy_share`` (of the image's total |D|),
    ``mean_d``, ``peak`` [row, col], ``peak_d``, ``centroid`` [row, col] (|D|-weighted, pixel
    units), ``centroid_frac`` (pixel centres as fractions of H and W), ``bbox`` [row0, col0,
    row1, col1) (end exclusive), ``human_share`` (if ``human_map``)}.
  """
  if connectivity not in _NEIGHBOURS:
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
  p = np.asarray(cam_pred, dtype=np.float64)
  o = np.asarray(cam_other, dtype=np.float64)
  if p.shape != o.shape:
    raise ValueError(f"divergence_summary: cam_pred shape {p.shape} != cam_other shape {o.shape}")
  if p.ndim not in (2, 3):
    raise ValueError(f"divergence_summary: expected (H, W) or (N, H, W), got {p.shape}")
  if np.isnan(p).any() or np.isnan(o).any():
    raise ValueError("divergence_summary: CAMs contain NaN")
  hm = None
  if human_map is not None:
    hm = np.asarray(human_map, dtype=np.float64)
    if hm.shape != p.shape:
      raise ValueError(
        f"divergence_summary: human_map shape {hm.shape} != CAM shape "
        f"{p.shape}; resize the human map to the CAM grid first"
      )
  d = divergence_map(p, o)
  pc = np.ptp(p, axis=(-2, -1)) == 0
  oc = np.ptp(o, axis=(-2, -1)) == 0
  if p.ndim == 2:
    return _summary_one(
      d, bool(pc), bool(oc), hm, top_fraction, human_threshold, max_regions, connectivity
    )
  return [
    _summary_one(
      d[i],
      bool(pc[i]),
      bool(oc[i]),
      None if hm is None else hm[i],
      top_fraction,
      human_threshold,
      max_regions,
      connectivity,
    )
    for i in range(p.shape[0])
  ]
