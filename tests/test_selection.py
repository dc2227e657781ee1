"""Model selection: which evaluation's checkpoint a run keeps and evaluates, and early stopping.

The rule (`loop.selection`): the best value of ``config.best_metric`` (default val/auroc:
it ranks a binary classifier at every threshold), of equal values the lower validation loss, then
the earlier step -- the same order in the trainer (`loop.Best`) and the checkpoints
(`checkpoints.selection_key`). Accuracy at 0.5 ties while a model still predicts one class; ties
used to go to the earliest evaluation, an untrained checkpoint.
"""

import json
import logging
import os

import numpy as np
import PIL.Image
import pytest

from helpers import TINY_RUN, load_config

from divisive_jax import checkpoints, config_base, loop, train
from divisive_jax.errors import ConfigError


def test_accuracy_ties_are_broken_by_the_validation_loss():
  """Small real data as the issue saw it: accuracy 0.5 / 0.525 while the model predicts one
  class, AUROC rising to 0.83 at the last evaluation."""
  evals = [  # step, accuracy, auroc, loss
    (3, 0.525, 0.38, 0.69),
    (6, 0.5, 0.55, 0.68),
    (9, 0.525, 0.61, 0.66),
    (12, 0.5, 0.70, 0.64),
    (18, 0.525, 0.83, 0.60),
  ]
  by_accuracy, by_auroc = loop.Best(), loop.Best()
  for step, acc, auroc, loss in evals:
    by_accuracy.update(step, acc, loss)
    by_auroc.update(step, auroc, loss)
  assert by_auroc.step == 18 and by_auroc.tied == []
  assert by_accuracy.step == 18 and sorted(by_accuracy.tied) == [3, 9]  # not step 3
  assert by_accuracy.stale == 4  # accuracy never improved after step 3: early stopping's count
  same = loop.Best()
  for step in (2, 4):
    same.update(step, 0.5, 0.7)  # a full tie: the earlier step
  assert same.step == 2 and same.tied == [4]
  restored = loop.Best.of({"best": by_accuracy.to_json()})
  assert (restored.step, restored.tied, restored.stale) == (18, by_accuracy.tied, 4)


def test_checkpoints_are_ranked_by_the_same_rule(tmp_path):
  import jax.numpy as jnp

  from divisive_jax.state import TrainState

  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  scored = {1: (0.5, 0.69), 2: (0.5, 0.60), 3: (0.5, float("nan")), 4: (0.5, 0.60), 5: None}
  for step, score in scored.items():
    w = {"w": jnp.full((2,), step, jnp.float32)}
    state = TrainState(jnp.int32(step), w, {}, {}, jnp.zeros(2, jnp.uint32), {})
    ck.save(step, state, {"step": step}, score=score)
  ck.close()
  ck = checkpoints.Checkpoints(str(tmp_path), async_save=False)
  assert ck.resolve("best") == 2  # the lowest loss of the tie, the earlier of 2 and 4
  assert ck.manager.all_steps() == [2, 5]  # the best and the latest are kept
  ck.close()


def test_the_default_metric_ranks_and_a_mode_that_would_choose_the_worst_is_refused():
  c = config_base.base()
  assert c.best_metric == "val/auroc" and c.best_mode == "auto"
  assert loop.selection(c) == (
    1.0,
    "the highest val/auroc (ties: the lower val/loss, then the earlier step)",
  )
  c.best_metric = "val/loss"
  assert loop.selection(c) == (-1.0, "the lowest val/loss (ties: the earlier step)")
  c.best_mode = "max"
  with pytest.raises(ConfigError, match="best_mode='max' would choose the worst val/loss"):
    config_base.validate(c)
  c.best_metric = "val/accuracy"  # CYBORG's published recipe stays available
  config_base.validate(c)


def _tied_validation_data(root: str) -> dict:
  """A CSV set whose validation split is one image twice, once per class: every model scores
  both alike, so val/accuracy is 0.5 and val/auroc 0.5 at every evaluation -- a tie by
  construction -- while the validation loss moves with the model."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(16):
    cls = ("Live", "Spoof")[i % 2]
    level = 60 if cls == "Live" else 190  # learnable: brightness
    name = f"{cls}_{i}.png"
    image = np.clip(rng.normal(level, 30, (24, 24)), 0, 255).astype(np.uint8)
    PIL.Image.fromarray(image).save(os.path.join(root, name))
    lines.append(f"{'train' if i < 12 else 'test'},{cls},{name}")
  same = rng.integers(0, 256, (24, 24), dtype=np.uint8)
  for cls in ("Live", "Spoof"):
    PIL.Image.fromarray(same).save(os.path.join(root, f"val_{cls}.png"))
    lines.append(f"val,{cls},val_{cls}.png")
  with open(os.path.join(root, "protocol.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return dict(
    data__csv_path=os.path.join(root, "protocol.csv"),
    data__image_dir=root,
    data__attack_type_from="none",
  )


def test_tied_evaluations_choose_the_lowest_loss_warn_and_stop_early(tmp_path, caplog):
  """Every evaluation ties on val/auroc: the run keeps the one with the lowest validation loss
  (not the first), says so in a warning and in result.json, and -- the metric never improving
  after the first evaluation -- stops early after ``early_stop_patience`` evaluations."""
  data = _tied_validation_data(str(tmp_path))
  overrides = dict(TINY_RUN, data__image_size=24, batch_size=4, num_train_steps=40)
  config = load_config(
    "iris_pad", "quick", **overrides, **data, eval_every_steps=2, early_stop_patience=3
  )
  w = str(tmp_path / "w")
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, w)[config.name]
  with open(os.path.join(w, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "val/auroc" in r]
  assert [r["step"] for r in evals] == [2, 4, 6, 8]  # 3 evaluations without progress: stop
  assert {r["val/auroc"] for r in evals} == {0.5} and {r["val/accuracy"] for r in evals} == {0.5}
  lowest = min(evals, key=lambda r: (r["val/loss"], r["step"]))["step"]
  assert len({r["val/loss"] for r in evals}) > 1  # the loss does tell them apart
  assert result["best_step"] == lowest
  assert result["status"] == {"state": "early_stopped", "step": 8}
  assert result["selection"] == {
    "metric": "val/auroc",
    "rule": "the highest val/auroc (ties: the lower val/loss, then the earlier step)",
    "step": lowest,
    "tied_steps": sorted({2, 4, 6, 8} - {lowest}),
  }
  assert "tie with step" in caplog.text and "Early stop" in caplog.text
  assert f"Best checkpoint: step {lowest}, chosen on validation by the highest" in caplog.text
  assert "stopped early at step 8" in caplog.text
