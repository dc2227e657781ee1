"""ROC, AUROC, EER, ISO/IEC 30107-3 error rates and validation-chosen thresholds.

Pure numpy; no jax, no scikit-learn (scikit-learn is used only by the tests, as a reference).

Conventions (used by every function here)
-----------------------------------------
* ``labels``: 0 = bona fide (negative), 1 = attack (positive, class 1, e.g. 'Spoof',
  'Synthetic', 'abnormal').
* ``scores``: the attack score, **higher = attack** (e.g. P(class 1)). The polarity is
  written into `evaluators.pad.pad_metrics` output as ``score_polarity``.
* **Decision rule**: a presentation is classified *attack* iff ``score >= threshold``,
  *bona fide* iff ``score < threshold``. Hence, for a threshold ``t``::

      APCER(t) = #{attack with score <  t} / #attack      (attacks accepted as bona fide)
      BPCER(t) = #{bona fide with score >= t} / #bona fide (bona fide rejected as attack)

  This is scikit-learn's ROC convention: at ROC threshold ``t``, ``tpr = 1 - APCER`` and
  ``fpr = BPCER``.
* Thresholds are **chosen on validation** (:func:`eer`, :func:`threshold_at_apcer`,
  :func:`threshold_at_bpcer`) and **applied to test** (:func:`error_rates`,
  `evaluators.pad.pad_metrics`). Figures computed from the test set's own ROC (test EER, BPCER20 /
  BPCER100 read off the test ROC) are labelled ``*_test_oracle``; papers report them but they
  are optimistic.
* Selected thresholds are always one of the validation scores (the operating points of the
  ROC), or, for the "everything is bona fide" point, ``nextafter(max(scores), +inf)`` (finite,
  so JSON stays valid), never an interpolated value.
* Input validation: empty input or mismatched lengths -> ``ValueError``; non-finite scores
  -> ``ValueError`` naming how many are NaN / infinite; labels outside {0, 1} ->
  ``ValueError``. A split with a single class does not raise: threshold-free metrics that need
  both classes (AUROC, EER, thresholds) are ``float('nan')``, a
  :class:`DegenerateInputWarning` is emitted and `evaluators.pad.pad_metrics` lists the reason in its
  ``warnings`` field. Never a silent 0.5.
* In result dicts, ``float('nan')`` means *undefined for this data* (e.g. BPCER with no bona
  fide samples) and ``None`` means *not applicable* (e.g. accuracy at 0.5 for scores that are
  not probabilities). `jsonio` writes NaN as null.

The report that applies validation-chosen thresholds to a test split is `evaluators.pad.pad_metrics`.
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np

SCORE_POLARITY = "higher = attack"
DECISION_RULE = "attack iff score >= threshold"
_EPS = 1e-12  # tolerance when comparing error rates with a target


class DegenerateInputWarning(UserWarning):
  """A metric is undefined for the given data (e.g. a split with a single class)."""


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def check_inputs(labels, scores, name: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Validate and convert to (int64 labels, float64 scores), 1-D and of equal length."""
  where = f" ({name})" if name else ""

  def _flat(a, what):
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
      return a[:, 0]
    if a.ndim != 1:
      raise ValueError(f"{what} must be 1-D{where}; got shape {a.shape}")
    return a

  labels, scores = _flat(labels, "labels"), _flat(scores, "scores")
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
  n_nan, n_inf = int(np.isnan(scores).sum()), int(np.isinf(scores).sum())
  if n_nan or n_inf:
    raise ValueError(
      f"scores{where} contain {n_nan} NaN and {n_inf} infinite value(s) "
      f"out of {scores.size}; fix the model outputs before computing metrics"
    )
  bad = ~np.isin(labels, (0, 1))  # bool labels pass: True == 1
  if bad.any():
    raise ValueError(
      f"labels{where} must be 0 (bona fide) or 1 (attack); found "
      f"{int(bad.sum())} other value(s), e.g. {labels[bad][0]!r}"
    )
  return labels.astype(np.int64), scores


def single_class_reason(labels: np.ndarray, name: str = "") -> str | None:
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
  labels, scores = check_inputs(labels, scores)
  fps, tps, thr = _roc_counts(labels, scores)
  if drop_intermediate and fps.size > 2:
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    fps, tps, thr = fps[keep], tps[keep], thr[keep]
  reason = single_class_reason(labels)
  rates = []
  for counts, what in ((np.r_[0.0, fps], "fpr (BPCER)"), (np.r_[0.0, tps], "tpr (1 - APCER)")):
    if counts[-1] <= 0:
      _warn(reason, what)
    rates.append(counts / counts[-1] if counts[-1] > 0 else np.full(counts.shape, np.nan))
  return rates[0], rates[1], np.r_[np.inf, thr]


def auroc(labels, scores) -> float:
  """Area under the ROC curve = P(score_attack > score_bona) + 0.5 P(tie) (Mann–Whitney U).

  Equal to ``sklearn.metrics.roc_auc_score``. NaN (with a warning) if a class is absent.
  """
  labels, scores = check_inputs(labels, scores)
  reason = single_class_reason(labels)
  if reason:
    _warn(reason, "AUROC")
    return float("nan")
  n1 = int(labels.sum())
  _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
  cum = np.cumsum(counts).astype(np.float64)
  avg_rank = cum - (counts - 1) / 2.0  # 1-based average rank of each tie group
  ranks = avg_rank[inv.reshape(-1)]
  u = ranks[labels == 1].sum() - n1 * (n1 + 1) / 2.0
  return float(u / (n1 * (labels.size - n1)))


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
  labels, scores = check_inputs(labels, scores)
  reason = single_class_reason(labels)
  if reason:
    _warn(reason, "EER")
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


def error_rates(labels, scores, threshold: float) -> tuple[float, float]:
  """``(APCER, BPCER)`` at ``threshold`` (attack iff ``score >= threshold``).

  APCER is NaN when there are no attacks, BPCER when there is no bona fide sample, and both
  are NaN when ``threshold`` is NaN. No warning: callers decide.
  """
  labels, scores = check_inputs(labels, scores)
  if threshold is None or np.isnan(threshold):
    return float("nan"), float("nan")
  att = scores[labels == 1]
  bon = scores[labels == 0]
  apcer = float(np.mean(att < threshold)) if att.size else float("nan")
  bpcer = float(np.mean(bon >= threshold)) if bon.size else float("nan")
  return apcer, bpcer


def accuracy(labels, scores, threshold) -> float:
  """The fraction classified correctly at ``threshold`` (NaN for a NaN threshold)."""
  labels, scores = check_inputs(labels, scores)
  if threshold is None or np.isnan(threshold):
    return float("nan")
  return float(np.mean((scores >= threshold).astype(np.int64) == labels))


def _threshold_at(labels, scores, target: float, constrained: str) -> float:
  labels, scores = check_inputs(labels, scores)
  if not (0.0 <= float(target) <= 1.0):
    raise ValueError(f"target error rate must be in [0, 1], got {target}")
  reason = single_class_reason(labels)
  if reason:
    _warn(reason, f"threshold at {constrained.upper()}")
    return float("nan")
  thr, apcer, bpcer = _points(labels, scores)
  own, other = (apcer, bpcer) if constrained == "apcer" else (bpcer, apcer)
  idx = np.flatnonzero(own <= target + _EPS)  # never empty: the extreme points have rate 0
  order = np.lexsort((own[idx], other[idx]))  # minimise the other rate, then this one
  return float(thr[idx[order[0]]])


def threshold_at_apcer(labels, scores, target: float) -> float:
  """Threshold with ``APCER <= target`` and the lowest BPCER (ties: lowest APCER).

  Meant for the VALIDATION set; apply the result to test with :func:`error_rates`.
  NaN with a warning if a class is absent.
  """
  return _threshold_at(labels, scores, target, "apcer")


def threshold_at_bpcer(labels, scores, target: float) -> float:
  """Threshold with ``BPCER <= target`` and the lowest APCER (ties: lowest BPCER).

  Meant for the VALIDATION set. NaN with a warning if a class is absent.
  """
  return _threshold_at(labels, scores, target, "bpcer")


def mean_std(values) -> tuple[float | None, float | None, int]:
  """(mean, sample standard deviation (ddof=1), count) of the values that are numbers (None and
  NaN skipped): (None, None, 0) for none, std None for one. Over seeds or runs (sweeps, report)."""
  vals = [float(v) for v in values if v is not None and not math.isnan(v)]
  if not vals:
    return None, None, 0
  return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)
