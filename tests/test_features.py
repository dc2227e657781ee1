"""Features the README promises that no other test covers: CAM targets and ReLU, the CAM-entropy
evaluator, the learning-rate schedules and SGD's weight decay, training from a pretrained file,
and the evaluate CLI's success path with its flags."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import REPO, TINY_RUN, load_config

from divisive_jax import cams, losses, optim
from divisive_jax.evaluators import Context, EntropyEvaluator


def _batch(n=4, size=8):
  sal = np.zeros((n, size, size), np.float32)
  sal[:, 2:6, 2:6] = 1.0
  return {
    "label": jnp.asarray([0, 1, 0, 1], jnp.int32),
    "saliency": jnp.asarray(sal),
    "has_saliency": jnp.ones(n),
    "valid": jnp.ones(n),
  }


def test_cam_target_predicted_scores_the_predicted_class_map():
  """CYBORG's first release (`loss.cam_target=predicted`) compares the map of the predicted
  class with the human map: the loss of the true-class target with the labels replaced by the
  predictions, and another loss where a prediction is wrong."""
  b = _batch()
  logits = jnp.asarray([[2.0, -1.0], [1.0, 0.0], [0.0, 3.0], [-1.0, 2.0]])  # rows 1, 2 wrong
  maps = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  out = {"logits": logits, "maps": maps}

  def cyborg(batch, target):
    cfg = losses.LossConfig(weights=(("cyborg", 1.0),), cam_target=target)
    return float(losses.combine(out, batch, cfg)[1]["cyborg"])

  as_predicted = dict(b, label=losses.predicted_class(logits))
  assert cyborg(b, "predicted") == pytest.approx(cyborg(as_predicted, "true"), rel=1e-6)
  assert cyborg(b, "predicted") != pytest.approx(cyborg(b, "true"), rel=1e-3)
  cfg = losses.from_config(load_config("iris_pad", "cyborg", loss__cam_target="predicted").loss)
  assert cfg.cam_target == "predicted"


def test_cam_relu_keeps_the_positive_part_of_both_maps():
  a = jax.random.normal(jax.random.key(1), (3, 4, 4, 5))
  kernel = jax.random.normal(jax.random.key(2), (5, 2))

  def head(f):
    return f.mean(axis=(1, 2)) @ kernel

  _, raw = cams.class_maps(head, a, "cam", relu=False)
  _, clipped = cams.class_maps(head, a, "cam", relu=True)
  assert float(raw.min()) < 0  # there was something to clip
  np.testing.assert_array_equal(clipped, jax.nn.relu(raw))
  cfg = losses.from_config(load_config("iris_pad", "difference", loss__cam_relu=True).loss)
  assert cfg.cam_relu is True


def test_entropy_evaluator_in_nats():
  """A uniform map has the most entropy, log(h w); a map with one hot cell (after min-max) none;
  an all-constant map has no distribution and is counted apart."""
  ev = EntropyEvaluator(Context("test", ("Live", "Spoof")))
  uniform_ramp = np.zeros((2, 4, 4), np.float32)
  uniform_ramp[:, 0, 0] = -1.0  # min-max: one cell 0, fifteen cells 1
  hot = np.zeros((2, 4, 4), np.float32)
  hot[:, 1, 2] = 5.0
  flat = np.ones((2, 4, 4), np.float32)
  maps = np.stack([uniform_ramp, hot, flat])
  ev.update({"label": np.array([0, 1, 1])}, {"maps": maps, "pred": np.array([0, 1, 0])})
  s = ev.summary()
  assert s["max_nats"] == pytest.approx(math.log(16)) and s["grid"] == [4, 4]
  t = s["true_class"]
  assert t["n"] == 2 and t["n_constant_maps"] == 1
  assert t["mean"] == pytest.approx((math.log(15) + 0.0) / 2)


def test_schedules_and_sgd_weight_decay():
  """`step`: lr x decay_factor every decay_every_epochs; `cosine`: linear warm-up, then cosine to
  0; `constant`. SGD adds weight_decay x w to the gradient before momentum, as PyTorch does."""
  o = ml_collections.ConfigDict(
    dict(
      name="sgd",
      lr=0.1,
      momentum=0.9,
      weight_decay=0.01,
      schedule="step",
      decay_every_epochs=2.0,
      decay_factor=0.1,
      warmup_epochs=1.0,
    )
  )
  step = optim.make_schedule(o, steps_per_epoch=5, total_steps=40)
  assert [float(step(s)) for s in (0, 9, 10, 19, 20)] == pytest.approx(
    [0.1, 0.1, 0.01, 0.01, 0.001]
  )
  o.schedule = "cosine"
  cos = optim.make_schedule(o, 5, 40)
  assert float(cos(0)) == 0.0 and float(cos(3)) == pytest.approx(0.06)  # warm-up: 5 steps
  for s in (5, 12, 22, 31, 40):  # then cosine from lr to 0 over the remaining 35 steps
    assert float(cos(s)) == pytest.approx(0.05 * (1 + math.cos(math.pi * (s - 5) / 35)), abs=1e-7)
  o.schedule = "constant"
  assert float(optim.make_schedule(o, 5, 40)(33)) == pytest.approx(0.1)
  o.schedule = "step"
  tx, _ = optim.make_optimizer(o, 5, 40)
  w, g = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.5])
  state = tx.init(w)
  updates, state = tx.update(g, state, w)
  w1 = optax.apply_updates(w, updates)
  np.testing.assert_allclose(w1, w - 0.1 * (g + 0.01 * w), rtol=1e-6)  # buffer = grad at step 1
  updates, _ = tx.update(g, state, w1)
  buffer = 0.9 * (g + 0.01 * w) + (g + 0.01 * w1)
  np.testing.assert_allclose(optax.apply_updates(w1, updates), w1 - 0.1 * buffer, rtol=1e-6)


def test_training_starts_from_the_pretrained_file(tmp_path):
  """`model.pretrained_path`: the run starts from the file's weights, not from its own
  initialisation."""
  from test_weights import random_like, resnet18, torchvision_layout

  _, _, abstract = resnet18(width=4, stem="small")
  variables = random_like(abstract, seed=3)
  path = str(tmp_path / "pretrained.npz")
  np.savez(path, **torchvision_layout(variables))
  overrides = dict(
    TINY_RUN,
    model__name="resnet18",
    model__stem="small",
    model__width=4,
    model__pretrained_path=path,
    data__channels=3,  # torchvision's 3-channel stem; the gray images are replicated
  )
  config = load_config("iris_pad", "quick", **overrides)
  from divisive_jax import config_base, members, train
  from divisive_jax.errors import ConfigError

  with pytest.raises(ConfigError, match=r"num_outputs=1000 is not valid; valid: 1, 2"):
    config_base.validate(load_config("iris_pad", "quick", model__num_outputs=1000))

  # The job as the trainer prepares it (config checked, file read and matched, states built).
  job = train._setup(config, str(tmp_path / "w"), members.members_of(config), False)
  for got, want in zip(jax.tree.leaves(job.state.params), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(got, want)
  for r in job.records:
    r.ckpts.close()


def test_evaluate_cli_with_its_flags(tmp_path_factory, tmp_path):
  """`python -m divisive_jax.evaluate` on a trained run: another checkpoint, another split and
  top-p, one line on stdout, the files written."""
  from test_evaluate import trained_workdir

  w = str(tmp_path / "run")
  shutil.copytree(trained_workdir(tmp_path_factory), w)
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "divisive_jax.evaluate",
      f"--workdir={w}",
      "--checkpoint=8",
      "--split=val",
      "--top_p=0.25",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  (line,) = r.stdout.strip().splitlines()
  assert line.startswith("val (step 8, n=32): AUROC=") and "eval_val.json" in line
  with open(os.path.join(w, "eval_val.json")) as f:
    out = json.load(f)
  assert out["checkpoint_step"] == 8 and out["checkpoint"] == "8"
  assert out["saliency_alignment"]["top_p"] == 0.25
  assert out["thresholds_from_same_split"] is True
  assert os.path.isfile(os.path.join(w, "roc_val.png"))


def test_evaluate_refuses_a_run_in_training(tmp_path_factory, tmp_path):
  """`evaluate` on a member of a population that trains (the lock on the population's folder)
  says who trains it and writes nothing into the run."""
  from test_evaluate import trained_workdir

  from divisive_jax import evaluate, workdir
  from divisive_jax.errors import WorkdirError

  root = tmp_path / "pop"
  member = root / "members" / "s0"
  shutil.copytree(trained_workdir(tmp_path_factory), member)
  before = sorted((p.name, p.stat().st_mtime_ns) for p in member.iterdir())
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import time\nfrom divisive_jax import workdir\n"
      f"workdir.Lock({str(root)!r}).acquire(); print('locked', flush=True); time.sleep(600)",
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=REPO,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=rf"{root} is training \(pid {holder.pid} on .*stop it"):
      evaluate.evaluate_workdir(str(member), split="test")
  finally:
    holder.kill()
    holder.wait()
  assert sorted((p.name, p.stat().st_mtime_ns) for p in member.iterdir()) == before
  assert workdir.training(str(member)) is None  # the lock died with its holder
