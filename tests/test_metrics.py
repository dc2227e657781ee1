"""Tests for divisive_jax.metrics (scikit-learn is the independent reference, tests only)."""

import ast
import json
import math

import numpy as np
import pytest

from divisive_jax import alignment, divergence, jsonio
from divisive_jax import metrics as M
from divisive_jax.evaluators.pad import pad_metrics

sk = pytest.importorskip("sklearn.metrics")


def _random_tied(rng, n):
  y = rng.integers(0, 2, n)
  y[0], y[1] = 0, 1  # both classes present
  levels = int(rng.integers(1, 9))
  s = rng.integers(0, levels, n) / 4.0  # many ties, also across classes
  return y, s


# ------------------------------------------------------------------ ROC / AUROC vs sklearn


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_and_auroc_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  for _ in range(40):
    y, s = _random_tied(rng, int(rng.integers(2, 80)))
    for drop in (False, True):
      ref = sk.roc_curve(y, s, drop_intermediate=drop)
      got = M.roc_curve(y, s, drop_intermediate=drop)
      for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)
    assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_roc_one_point_per_distinct_score():
  y = [0, 1, 0, 1, 1]
  s = [0.2, 0.2, 0.5, 0.5, 0.9]
  fpr, tpr, thr = M.roc_curve(y, s)
  np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.2])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1])


def test_auroc_continuous_scores_match_sklearn():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 500)
  s = rng.normal(size=500) + y
  assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_auroc_ties_count_half():
  # every attack ties with every bona fide -> exactly 0.5 (Mann-Whitney)
  assert M.auroc([0, 0, 1, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
  # one tie pair out of 4 pairs, other 3 pairs correct: (3 + 0.5) / 4
  assert M.auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)


def test_separable_and_inverted():
  y = [0, 0, 0, 1, 1, 1]
  s = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
  assert M.auroc(y, s) == 1.0
  e, t = M.eer(y, s)
  assert e == 0.0 and M.error_rates(y, s, t) == (0.0, 0.0)
  s_inv = [1 - v for v in s]
  assert M.auroc(y, s_inv) == 0.0
  assert M.eer(y, s_inv)[0] == 1.0


# ------------------------------------------------------------------ APCER / BPCER by hand


def test_error_rates_hand_computed_with_ties_at_threshold():
  bona = [0.1, 0.2, 0.5, 0.5, 0.9]
  att = [0.3, 0.5, 0.7, 0.8]
  y = [0] * 5 + [1] * 4
  s = bona + att
  # score >= t is attack: the attack at 0.5 is caught, both bona fide at 0.5 are rejected
  assert M.error_rates(y, s, 0.5) == (pytest.approx(1 / 4), pytest.approx(3 / 5))
  assert M.error_rates(y, s, 0.55) == (pytest.approx(2 / 4), pytest.approx(1 / 5))
  assert M.error_rates(y, s, 0.0) == (0.0, 1.0)
  assert M.error_rates(y, s, 1.0) == (1.0, 0.0)
  # consistent with the ROC: at ROC threshold t, fpr = BPCER(t), 1 - tpr = APCER(t)
  fpr, tpr, thr = M.roc_curve(y, s)
  for f, t_, th in zip(fpr[1:], tpr[1:], thr[1:]):
    a, b = M.error_rates(y, s, th)
    assert a == pytest.approx(1 - t_) and b == pytest.approx(f)


def test_eer_exact_and_interpolated():
  # exact crossing at a point: threshold 0.4 gives APCER = BPCER = 0.5
  assert M.eer([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == (0.5, 0.4)
  # crossing between points: (APCER, BPCER) jumps (0.5, 0) -> (0, 0.5) at a cross-class tie
  e, t = M.eer([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
  assert e == pytest.approx(0.25)
  assert t in (0.9, 0.5)
  # threshold minimises max(APCER, BPCER): bona 0.1,0.2,0.3 / attack 0.25,0.4
  y, s = [0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.25, 0.4]
  e, t = M.eer(y, s)
  assert e == pytest.approx(1 / 3) and t == 0.25
  assert M.error_rates(y, s, t) == (0.0, pytest.approx(1 / 3))


@pytest.mark.parametrize("seed", range(3))
def test_eer_matches_sklearn_roc_interpolation(seed):
  rng = np.random.default_rng(seed)
  for _ in range(30):
    y, s = _random_tied(rng, int(rng.integers(4, 60)))
    fpr, tpr, thr = sk.roc_curve(y, s, drop_intermediate=False)
    fnr = 1 - tpr
    ref = np.interp(0.0, fpr - fnr, fpr)  # fpr - fnr is strictly increasing
    e, t = M.eer(y, s)
    assert e == pytest.approx(ref, abs=1e-12)
    a, b = M.error_rates(y, s, t)
    assert max(a, b) == pytest.approx(np.min(np.maximum(fpr, fnr)), abs=1e-12)


def test_threshold_at_apcer_and_bpcer_hand():
  bona = [0.1, 0.2, 0.3, 0.4, 0.6]
  att = [0.35, 0.5, 0.7, 0.8, 0.9]
  y, s = [0] * 5 + [1] * 5, bona + att
  assert M.threshold_at_apcer(y, s, 0.2) == 0.5  # APCER 1/5, BPCER 1/5
  assert M.threshold_at_apcer(y, s, 0.0) == 0.35  # APCER 0, BPCER 2/5
  assert M.threshold_at_bpcer(y, s, 0.2) == 0.5  # BPCER 1/5 with the lower APCER (1/5 < 2/5)
  assert M.threshold_at_bpcer(y, s, 0.0) == 0.7  # APCER 2/5
  # the "everything bona fide" point gets a finite threshold above every score
  t = M.threshold_at_bpcer([0, 1], [0.9, 0.1], 0.0)
  assert math.isfinite(t) and t > 0.9 and M.error_rates([0, 1], [0.9, 0.1], t) == (1.0, 0.0)
  with pytest.raises(ValueError, match="target"):
    M.threshold_at_apcer(y, s, 1.5)


@pytest.mark.parametrize("seed", range(3))
def test_threshold_selection_brute_force(seed):
  rng = np.random.default_rng(seed)
  for _ in range(20):
    y, s = _random_tied(rng, int(rng.integers(4, 50)))
    cands = np.r_[np.unique(s), s.max() + 1.0]
    rates = np.array([M.error_rates(y, s, c) for c in cands])
    for target in (0.0, 0.05, 0.2, 0.5):
      a, b = M.error_rates(y, s, M.threshold_at_apcer(y, s, target))
      assert a <= target + 1e-12
      assert b == pytest.approx(rates[rates[:, 0] <= target + 1e-12, 1].min())
      a, b = M.error_rates(y, s, M.threshold_at_bpcer(y, s, target))
      assert b <= target + 1e-12
      assert a == pytest.approx(rates[rates[:, 1] <= target + 1e-12, 0].min())


# ------------------------------------------------------------------ pad_metrics


def _val_test():
  val_y = [0, 0, 0, 1, 1, 1]
  val_s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
  test_y = [0, 0, 0, 1, 1, 1]
  test_s = [0.4, 0.5, 0.55, 0.45, 0.9, 0.95]
  return val_y, val_s, test_y, test_s


def test_pad_metrics_thresholds_come_from_validation():
  vy, vs, ty, ts = _val_test()
  r = pad_metrics(vy, vs, ty, ts)
  assert r["threshold"] == 0.6 == r["thresholds"]["val_eer"]
  # test errors at the validation threshold 0.6
  assert r["apcer"] == pytest.approx(1 / 3) and r["bpcer"] == 0.0
  assert r["accuracy"] == pytest.approx(5 / 6) == r["accuracy_at_val_eer_threshold"]
  # the test-optimal (oracle) EER threshold differs and is reported separately
  assert r["eer_threshold_test_oracle"] == 0.55
  assert r["eer"] == pytest.approx(1 / 3) == r["eer_test_oracle"]
  # BPCER20: validation threshold for APCER <= 5% is 0.6 -> test BPCER 0; the oracle reads
  # the test ROC (threshold 0.45) -> 2/3
  assert r["thresholds"]["val_apcer5"] == 0.6
  assert r["bpcer_at_apcer5"] == 0.0 and r["bpcer_at_apcer1"] == 0.0
  assert r["bpcer20_test_oracle"] == pytest.approx(2 / 3)
  assert r["bpcer100_test_oracle"] == pytest.approx(2 / 3)
  assert r["apcer_at_bpcer1"] == pytest.approx(1 / 3)  # val threshold for BPCER<=1% is 0.6
  assert r["apcer_at_bpcer1_test_oracle"] == pytest.approx(1 / 3)  # test: threshold 0.9
  assert r["auroc"] == pytest.approx(sk.roc_auc_score(ty, ts))
  assert r["val_auroc"] == 1.0 and r["val_eer"] == 0.0
  assert r["score_polarity"] == "higher = attack"
  assert r["threshold_source"] == "validation"
  assert (r["n_val"], r["n_test"], r["n_test_attack"], r["n_test_bona_fide"]) == (6, 6, 3, 3)
  assert r["accuracy_at_0.5"] == pytest.approx(3 / 6)  # 0.5 and 0.55 rejected, 0.45 missed
  assert r["warnings"] == []
  json.dumps(jsonio.to_jsonable(r), allow_nan=False)


def test_pad_metrics_operating_points():
  vy, vs, ty, ts = _val_test()
  r = pad_metrics(vy, vs, ty, ts, operating_point=0.5)
  assert r["threshold"] == 0.5
  assert (r["apcer"], r["bpcer"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
  assert r["operating_point"] == "fixed 0.5"
  r = pad_metrics(vy, vs, ty, ts, operating_point="bpcer1")
  assert r["threshold"] == r["thresholds"]["val_bpcer1"]
  op = r["operating_points"]["val_apcer5"]
  assert op["val_apcer"] <= 0.05 and op["test_bpcer"] == r["bpcer_at_apcer5"]
  with pytest.raises(ValueError, match="operating_point"):
    pad_metrics(vy, vs, ty, ts, operating_point="best")


def test_pad_metrics_per_attack_type():
  vy, vs, _, _ = _val_test()
  ty = [0, 0, 1, 1, 1, 1, 1]
  ts = [0.1, 0.7, 0.5, 0.65, 0.9, 0.3, 0.2]
  types = [-1, -1, 0, 0, 1, 1, -1]
  r = pad_metrics(vy, vs, ty, ts, types, ["print", "contacts"])  # threshold 0.6
  assert r["apcer_per_attack_type"] == {"print": 0.5, "contacts": 0.5, "unknown": 1.0}
  assert r["apcer_max"] == 1.0 and r["apcer_max_type"] == "unknown"
  assert r["n_test_per_attack_type"] == {"print": 2, "contacts": 2, "unknown": 1}
  assert r["apcer"] == pytest.approx(3 / 5)
  # names given directly as strings
  names = ["-", "-", "a", "a", "b", "b", "b"]
  r = pad_metrics(vy, vs, ty, ts, names)
  assert r["apcer_per_attack_type"] == {"a": 0.5, "b": pytest.approx(2 / 3)}
  # without types, apcer_max is the overall APCER
  r = pad_metrics(vy, vs, ty, ts)
  assert r["apcer_per_attack_type"] == {} and r["apcer_max"] == r["apcer"]
  with pytest.raises(ValueError, match="test_attack_types"):
    pad_metrics(vy, vs, ty, ts, [0, 1])


def test_pad_metrics_logit_scores_have_no_accuracy_at_half():
  vy, vs, ty, ts = _val_test()
  r = pad_metrics(vy, np.array(vs) * 10 - 5, ty, np.array(ts) * 10 - 5)
  assert r["accuracy_at_0.5"] is None
  assert r["threshold"] == pytest.approx(1.0)


# ------------------------------------------------------------------ degenerate inputs


def test_single_class_is_nan_with_reason_not_crash():
  with pytest.warns(M.DegenerateInputWarning, match="no attack samples"):
    assert math.isnan(M.auroc([0, 0, 0], [0.1, 0.5, 0.9]))
  with pytest.warns(M.DegenerateInputWarning, match="no bona fide"):
    e, t = M.eer([1, 1], [0.1, 0.5])
  assert math.isnan(e) and math.isnan(t)
  with pytest.warns(M.DegenerateInputWarning):
    fpr, tpr, _ = M.roc_curve([1, 1], [0.1, 0.5])
  assert np.isnan(fpr).all() and not np.isnan(tpr).any()
  with pytest.warns(M.DegenerateInputWarning):
    assert math.isnan(M.threshold_at_apcer([1, 1], [0.1, 0.5], 0.05))


def test_pad_metrics_single_class_test_split():
  vy, vs, _, _ = _val_test()
  with pytest.warns(M.DegenerateInputWarning):
    r = pad_metrics(vy, vs, [1, 1, 1], [0.2, 0.7, 0.9], [0, 0, 1], ["x", "y"])
  assert math.isnan(r["auroc"]) and math.isnan(r["eer"])
  assert math.isnan(r["bpcer"]) and r["apcer"] == pytest.approx(1 / 3)
  assert math.isnan(r["bpcer20_test_oracle"])
  assert r["apcer_per_attack_type"] == {"x": 0.5, "y": 0.0}
  assert any("no bona fide" in w for w in r["warnings"])
  out = json.loads(json.dumps(jsonio.to_jsonable(r), allow_nan=False))
  assert out["auroc"] is None


def test_pad_metrics_single_class_val_split():
  _, _, ty, ts = _val_test()
  with pytest.warns(M.DegenerateInputWarning):
    r = pad_metrics([0, 0], [0.1, 0.2], ty, ts)
  assert math.isnan(r["threshold"]) and math.isnan(r["apcer"]) and math.isnan(r["bpcer"])
  assert math.isnan(r["bpcer_at_apcer5"]) and math.isnan(r["accuracy"])
  assert r["auroc"] == pytest.approx(sk.roc_auc_score(ty, ts))  # threshold-free, still fine
  assert any("validation" in w for w in r["warnings"])


def test_invalid_inputs_raise():
  with pytest.raises(ValueError, match="empty"):
    M.auroc([], [])
  with pytest.raises(ValueError, match="2 NaN"):
    M.auroc([0, 1, 1], [0.1, float("nan"), float("nan")])
  with pytest.raises(ValueError, match="1 infinite"):
    M.eer([0, 1], [0.1, float("inf")])
  with pytest.raises(ValueError, match="length"):
    M.auroc([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="0 \\(bona fide\\) or 1"):
    M.auroc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="test"):
    pad_metrics([0, 1], [0.1, 0.9], [0, 1], [0.1, float("nan")])
  # (N, 1) columns and booleans are accepted
  assert M.auroc(np.array([[False], [True]]), np.array([[0.1], [0.9]])) == 1.0


# ------------------------------------------------------------------ saliency alignment


def test_proportional_energy_hand():
  a = np.array([[1.0, 2.0], [3.0, 4.0]])
  m = np.array([[1, 0], [0, 1]])
  assert alignment.proportional_energy(a, m) == pytest.approx(0.5)
  assert alignment.proportional_energy(a, m, weight_by_area=True) == pytest.approx(0.25)
  assert alignment.proportional_energy(np.zeros((2, 2)), m) == 0.0
  assert alignment.proportional_energy(a, np.ones((2, 2))) == 1.0
  assert alignment.proportional_energy(a, np.ones((2, 2)), weight_by_area=True) == 0.0
  batch = alignment.proportional_energy(np.stack([a, np.zeros((2, 2)), a]), np.stack([m, m, 1 - m]))
  np.testing.assert_allclose(batch, [0.5, 0.0, 0.5])
  with pytest.raises(ValueError, match="resize"):
    alignment.proportional_energy(np.ones((4, 4)), np.ones((2, 2)))
  with pytest.raises(ValueError, match="negative"):
    alignment.proportional_energy(-a, m)


def test_topk_iou_hand():
  a = np.arange(100, dtype=float).reshape(10, 10)  # top 10% = last row
  m = np.zeros((10, 10))
  m[9] = 1.0
  assert alignment.topk_iou(a, m, p=0.1) == 1.0
  m2 = np.zeros((10, 10))
  m2[9, :5] = 1.0
  m2[0, :5] = 0.6  # above mask_threshold 0.5 -> inside
  assert alignment.topk_iou(a, m2, p=0.1) == pytest.approx(5 / 15)
  assert alignment.topk_iou(a, m2, p=0.1, mask_threshold=0.7) == pytest.approx(5 / 10)
  assert alignment.topk_iou(a, m, p=0.2) == pytest.approx(10 / 20)
  # constant map: every pixel ties at the cut, all are selected -> IoU = |M| / |image|
  assert alignment.topk_iou(np.ones((10, 10)), m, p=0.1) == pytest.approx(0.1)
  # empty mask -> 0
  assert alignment.topk_iou(a, np.zeros((10, 10))) == 0.0
  np.testing.assert_allclose(alignment.topk_iou(np.stack([a, a]), np.stack([m, m2])), [1.0, 1 / 3])
  with pytest.raises(ValueError, match="shape"):
    alignment.topk_iou(a, m[:5])


# ------------------------------------------------------------------ divergence summary


def _blobs():
  pred = np.zeros((10, 10))
  pred[1:4, 1:4] = 5.0  # 9 px, evidence for the predicted class
  other = np.zeros((10, 10))
  other[6:8, 6:8] = 2.0  # 4 px, evidence for the other class
  human = np.zeros((10, 10))
  human[1:4, 1:4] = 1.0
  return pred, other, human


def test_divergence_summary_known_regions():
  pred, other, human = _blobs()
  s = divergence.divergence_summary(pred, other, human, top_fraction=0.13)
  assert s["energy"] == pytest.approx(13.0)
  assert s["d_max"] == 1.0 and s["d_min"] == -1.0
  assert s["n_regions"] == 2
  r0, r1 = s["top_regions"]
  assert (r0["rank"], r0["supports"], r0["area"]) == (0, "predicted", 9)
  assert r0["bbox"] == [1, 1, 4, 4] and r0["centroid"] == pytest.approx([2.0, 2.0])
  assert r0["energy_share"] == pytest.approx(9 / 13) and r0["human_share"] == 1.0
  assert (r1["rank"], r1["supports"], r1["area"]) == (1, "other", 4)
  assert r1["bbox"] == [6, 6, 8, 8] and r1["centroid"] == pytest.approx([6.5, 6.5])
  assert r1["mean_d"] == -1.0 and r1["human_share"] == 0.0
  assert s["human_energy_share"] == pytest.approx(9 / 13)
  assert s["human_area_fraction"] == pytest.approx(0.09)
  assert s["human_pred_energy_share"] == 1.0
  json.dumps(s, allow_nan=False)
  # human map at a different resolution is refused
  with pytest.raises(ValueError, match="resize"):
    divergence.divergence_summary(pred, other, np.ones((5, 5)))


def test_divergence_summary_constant_maps_and_batch():
  pred, other, _ = _blobs()
  s = divergence.divergence_summary(pred, np.full((10, 10), 3.0))
  assert s["other_map_constant"] and not s["pred_map_constant"]
  assert s["d_min"] == 0.0 and s["top_regions"][0]["supports"] == "predicted"
  z = divergence.divergence_summary(np.ones((10, 10)), np.ones((10, 10)), np.ones((10, 10)))
  assert z["energy"] == 0.0 and z["top_regions"] == [] and z["human_energy_share"] is None
  out = divergence.divergence_summary(np.stack([pred, other]), np.stack([other, pred]))
  assert isinstance(out, list) and len(out) == 2
  assert out[1]["top_regions"][0]["supports"] == "other"  # pred blob is now the other class
  np.testing.assert_allclose(divergence.divergence_map(pred, other)[1:4, 1:4], 1.0)


def test_divergence_summary_connectivity():
  pred = np.zeros((6, 6))
  pred[1, 1] = pred[2, 2] = 1.0  # diagonal neighbours
  other = np.zeros((6, 6))
  s8 = divergence.divergence_summary(pred, other, top_fraction=2 / 36)
  s4 = divergence.divergence_summary(pred, other, top_fraction=2 / 36, connectivity=4)
  assert s8["n_regions"] == 1 and s8["top_regions"][0]["area"] == 2
  assert s4["n_regions"] == 2


def test_no_sklearn_or_jax_import_in_metrics():
  """metrics, alignment and divergence are plain numpy (the tests use sklearn as a reference)."""
  import inspect

  for module in (M, alignment, divergence):
    _assert_numpy_only(ast.parse(inspect.getsource(module)))


def _assert_numpy_only(tree):
  mods = {
    a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
  }
  mods |= {
    n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
  }
  assert not mods & {"sklearn", "jax", "scipy", "matplotlib"}
