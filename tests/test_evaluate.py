"""evaluate.py: files written, every example once, thresholds from val, val-score cache,
checkpoint selection, errors. One tiny model is trained once (shared with test_explain.py)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import TINY_RUN, load_config

from divisive_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  # 4 steps per epoch: two evaluations and checkpoints, at 4 and 8. Checkpoints ranked by the
  # earliest epoch, so that 'best' (step 4) and 'latest' (step 8) are two different checkpoints
  # whatever the tiny model's validation scores turn out to be. final_eval: train_and_evaluate
  # -> evaluate_workdir(val), evaluate_workdir(test).
  return load_config(
    "iris_pad",
    "quick",
    **dict(TINY_RUN, data__num_train=64, data__num_val=32, data__num_test=32),
    num_train_steps=8,
    eval_every_steps=4,
    log_every_steps=4,
    final_eval=True,
    best_metric="epoch",
    best_mode="min",
  )


def trained_workdir(tmp_path_factory):
  """Train once per pytest session (both test files call this; the second reuses it)."""
  from divisive_jax import train

  w = str(tmp_path_factory.getbasetemp() / "evaluate_explain_workdir")
  if not os.path.exists(os.path.join(w, "TRAINED")):
    train.train_and_evaluate(tiny_config(), w)
    open(os.path.join(w, "TRAINED"), "w").close()
  return w


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def splits(workdir):
  from divisive_jax import data

  return data.load_splits(tiny_config().data, workdir)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def _json(workdir, split):
  with open(os.path.join(workdir, f"eval_{split}.json")) as f:
    return json.load(f)


def test_final_eval_writes_json_csv_png(workdir):
  for split in ("val", "test"):
    for name in (f"eval_{split}.json", f"scores_{split}.csv", f"roc_{split}.png"):
      assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  test = _json(workdir, "test")
  for key in (
    "auroc",
    "eer",
    "apcer",
    "bpcer",
    "bpcer_at_apcer5",
    "thresholds",
    "apcer_per_attack_type",
    "checkpoint_step",
    "class_names",
    "n_examples",
    "saliency_alignment",
  ):
    assert key in test
  assert test["split"] == "test" and test["positive_class"] == "Spoof"
  assert test["class_names"] == ["Live", "Spoof"]
  assert test["score_polarity"] == "higher = attack"
  assert test["thresholds_from_same_split"] is False
  assert _json(workdir, "val")["thresholds_from_same_split"] is True
  assert "own thresholds" in _json(workdir, "val")["threshold_note"]
  with open(os.path.join(workdir, "roc_test.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_example_exactly_once(workdir, splits):
  test = _json(workdir, "test")
  rows = _read_csv(os.path.join(workdir, "scores_test.csv"))
  assert rows[0] == ["id", "label", "attack_type", "score", "pred"]
  ids = [r[0] for r in rows[1:]]
  src = splits.test
  assert test["n_examples"] == len(src) == len(ids) == test["n_test"]
  assert len(set(ids)) == len(ids)
  assert ids == [src[i]["id"] for i in range(len(src))]
  labels = np.array([int(r[1]) for r in rows[1:]])
  np.testing.assert_array_equal(labels, src.label)
  names = [r[2] for r in rows[1:]]
  expect = [splits.attack_types[t] if t >= 0 else "" for t in src.attack_type]
  assert names == expect and "" in names and "printout" in names
  scores = np.array([float(r[3]) for r in rows[1:]])
  assert np.all((scores >= 0) & (scores <= 1))
  assert test["n_test_attack"] == int(labels.sum())


def test_thresholds_come_from_validation(workdir):
  from divisive_jax import jsonio, scores
  from divisive_jax.evaluators.pad import pad_metrics

  test = _json(workdir, "test")
  val = scores.read_csv(os.path.join(workdir, "scores_val.csv"))
  tst = scores.read_csv(os.path.join(workdir, "scores_test.csv"))
  expect = pad_metrics(val["label"], val["score"], tst["label"], tst["score"])
  assert test["thresholds"] == jsonio.to_jsonable(expect["thresholds"])
  assert test["threshold"] == test["thresholds"]["val_eer"]
  assert test["apcer"] == expect["apcer"] and test["bpcer"] == expect["bpcer"]
  # thresholds chosen on test itself would differ: the test's own EER threshold is elsewhere
  own = pad_metrics(tst["label"], tst["score"], tst["label"], tst["score"])
  assert own["thresholds"] != expect["thresholds"]
  # val was evaluated first at the same step, so test reused the cached val scores
  assert test["val_scores_cached"] is True
  assert _json(workdir, "val")["thresholds"] == test["thresholds"]
  assert test["n_val"] == len(val["score"])


def test_saliency_alignment(workdir):
  a = _json(workdir, "test")["saliency_alignment"]
  assert a["n_with_map"] == 32 and a["top_p"] == 0.1
  for cls in ("true_class", "predicted_class"):
    for m in ("proportional_energy", "topk_iou"):
      s = a[cls][m]
      assert s["n"] == 32 and 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0


def test_alignment_accumulator_oracle():
  """A CAM equal to the human mask: PE = 1, and top-p IoU = p-area / mask-area."""
  from divisive_jax.evaluators import AlignmentEvaluator, Context

  h = np.zeros((2, 16, 16), np.float32)
  h[:, 4:12, 4:12] = 1.0  # 64 of 256 pixels
  maps = np.zeros((2, 2, 4, 4), np.float32)
  maps[:, 1, 1:3, 1:3] = 5.0  # class-1 map peaks on the mask (after 4x bilinear upsampling)
  maps[:, 0] = -maps[:, 1]
  acc = AlignmentEvaluator(Context("test", ("Live", "Spoof")), top_p=0.25)
  acc.update(
    {"has_saliency": np.array([1.0, 0.0]), "saliency": h, "label": np.array([1, 1])},
    {"maps": maps, "pred": np.array([0, 0])},
  )
  s = acc.summary()
  assert s["n_with_map"] == 1
  assert s["true_class"]["topk_iou"]["mean"] == pytest.approx(1.0)
  assert s["true_class"]["proportional_energy"]["mean"] == pytest.approx(49 / 64, abs=0.01)
  assert s["predicted_class"]["proportional_energy"]["mean"] < 0.3


def test_checkpoint_selection_and_val_cache(workdir):
  from divisive_jax import checkpoints, evaluate

  ck = checkpoints.Checkpoints(workdir, async_save=False)
  steps, best = ck.manager.all_steps(), ck.resolve("best")
  ck.close()
  assert steps == [4, 8] and best == 4
  # The trainer's final evaluation cached the best checkpoint's (step 4) validation scores.
  first = evaluate.evaluate_workdir(workdir, which="8", split="test")
  assert first["checkpoint_step"] == 8 and first["checkpoint"] == "8"
  assert first["val_scores_cached"] is False  # cache held step 4's scores: recomputed
  with open(os.path.join(workdir, "scores_val.meta.json")) as f:
    assert json.load(f)["checkpoint_step"] == 8
  latest = evaluate.evaluate_workdir(workdir, which="latest", split="test", batch_size=6)
  assert latest["checkpoint_step"] == 8 and latest["val_scores_cached"] is True
  assert latest["n_examples"] == 32  # batch 6 -> 8 on 4 devices, last batch padded
  again = evaluate.evaluate_workdir(workdir, which=8, split="test")
  assert again["val_scores_cached"] is True and again["thresholds"] == latest["thresholds"]
  assert again["auroc"] == pytest.approx(latest["auroc"])
  assert evaluate.evaluate_workdir(workdir, which="best", split="test")["checkpoint_step"] == best


def test_best_checkpoint_survives_reopening(tmp_path):
  import jax.numpy as jnp

  from divisive_jax import checkpoints
  from divisive_jax.state import TrainState

  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  for step, score in ((1, 0.9), (2, 0.1)):
    w = {"w": jnp.full((2,), step, jnp.float32)}
    state = TrainState(jnp.int32(step), w, {}, {}, jnp.zeros(2, jnp.uint32), {})
    ck.save(step, state, {"step": step}, score=(score, 0.5))
  ck.close()
  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  assert ck.resolve("best") == 1
  ck.close()


def test_equal_scores_prefer_the_earlier_checkpoint(tmp_path):
  """Of two evaluations equal in score and validation loss the earlier is best, in the trainer
  (`loop.Best`) and in the checkpoint manager, and it is the one kept on disk."""
  import jax.numpy as jnp

  from divisive_jax import checkpoints
  from divisive_jax.state import TrainState

  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  for step, score in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.2)):
    w = {"w": jnp.full((2,), step, jnp.float32)}
    state = TrainState(jnp.int32(step), w, {}, {}, jnp.zeros(2, jnp.uint32), {})
    ck.save(step, state, {"step": step}, score=(score, 0.5))
  ck.close()
  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  assert ck.resolve("best") == 2
  assert ck.manager.all_steps() == [2, 4]  # the best (earliest of the tie) and the latest
  ck.close()


def test_errors(workdir, tmp_path):
  from divisive_jax import evaluate

  with pytest.raises(ValueError, match="unknown split 'dev'"):
    evaluate.evaluate_workdir(workdir, split="dev")
  with pytest.raises(ValueError, match="best', 'latest' or a step"):
    evaluate.evaluate_workdir(workdir, which="newest")
  with pytest.raises(ValueError, match=r"step 99 not in .*available: \[4, 8\]"):
    evaluate.evaluate_workdir(workdir, which=99)
  empty = str(tmp_path / "empty")
  with pytest.raises(UserError, match="config.json not found.*divisive_jax.main"):
    evaluate.evaluate_workdir(empty)
  os.makedirs(empty)
  with (
    open(os.path.join(workdir, "config.json")) as f,
    open(os.path.join(empty, "config.json"), "w") as g,
  ):
    g.write(f.read())
  with pytest.raises(UserError, match="no checkpoint in .*train first"):
    evaluate.evaluate_workdir(empty)


def test_cli_error_message(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "divisive_jax.evaluate", f"--workdir={tmp_path}", "--split=dev"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert r.returncode == 1
  assert "error: unknown split 'dev'" in r.stderr and "Traceback" not in r.stderr
