"""The trainer end to end: outputs, resume after SIGTERM and SIGKILL, non-finite stop,
2 processes x 2 devices == 1 process x 4 devices."""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from helpers import TINY_RUN, completed_steps, final_params, load_config, main_command
from helpers import subprocess_env

from divisive_jax import train

# Small and fast; `difference` exercises the dual-CAM path. Flags and in-process configs use the
# same overrides so subprocess and in-process runs are the same job.
SMALL = dict(TINY_RUN, final_eval=False, log_every_steps=10)
# Device-side augmentation on: the resumed run must draw the flips and shifts an uninterrupted
# run draws (they come from (seed, step, row)).
RESUME = dict(
  SMALL,
  num_train_steps=160,
  checkpoint_every_steps=20,
  eval_every_steps=80,
  data__augment_flip=True,
  data__augment_crop=2,
)


def _read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = load_config("iris_pad", "quick", **RESUME)
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_outputs_of_a_run(uninterrupted):
  config, workdir = uninterrupted
  for name in ("config.json", "metrics.jsonl", "data_info.json", "parameters.txt"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["loss"]["weights"]["difference"] == 0.5
  records = _read_jsonl(workdir)
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == list(range(10, 161, 10))
  for r in records:
    if "loss" in r:
      assert {"loss/ce", "loss/difference", "accuracy", "lr", "steps_per_s"} <= set(r)
  val = [r for r in records if "val/auroc" in r]
  assert [r["step"] for r in val] == [80, 160]
  assert all(0.0 <= r["val/auroc"] <= 1.0 for r in val)
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  # Latest and best kept by the preservation policy; nothing else.
  steps = completed_steps(workdir)
  assert 160 in steps and 1 <= len(steps) <= 2


def _wait_for(predicate, proc, timeout=240.0):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return predicate()
    time.sleep(0.05)
  return False


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
  config, reference = uninterrupted
  workdir = str(tmp_path / "interrupted")
  env = subprocess_env(4)  # the test process also has 4 devices (conftest)
  cmd = main_command("iris_pad.py:quick", workdir, RESUME)

  log1 = open(tmp_path / "run1.log", "w")
  p1 = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT)
  assert _wait_for(lambda: completed_steps(workdir), p1), "no checkpoint appeared"
  p1.send_signal(signal.SIGTERM)
  assert p1.wait(timeout=120) == 128 + signal.SIGTERM  # the shell's convention: 143
  log1.close()
  text = (tmp_path / "run1.log").read_text()
  assert "Received signal" in text, text[-2000:]
  assert "stopped: SIGTERM at step" in text and "re-run the same command to resume" in text
  assert "Traceback" not in text
  first = next(line for line in text.splitlines() if "] " in line and line.startswith("I"))
  assert "built-in synthetic 'synthetic_iris' set" in first, first
  after_term = max(completed_steps(workdir))
  assert after_term < 160

  log2 = open(tmp_path / "run2.log", "w")
  p2 = subprocess.Popen(cmd, env=env, stdout=log2, stderr=subprocess.STDOUT)
  assert _wait_for(lambda: max(completed_steps(workdir)) > after_term, p2)
  p2.kill()  # SIGKILL: no chance to save
  p2.wait(timeout=60)
  log2.close()
  assert "Resuming from the checkpoint at step" in (tmp_path / "run2.log").read_text()
  after_kill = max(completed_steps(workdir))
  assert after_term < after_kill < 160, "run 2 finished before it was killed: make it longer"

  train.train_and_evaluate(config, workdir)  # resumes and finishes
  (p_ref, s_ref), _ = final_params(config, reference)
  (p_res, s_res), meta = final_params(config, workdir)
  assert meta["step"] == 160
  import jax

  for a, b in zip(jax.tree.leaves((p_ref, s_ref)), jax.tree.leaves((p_res, s_res))):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in _read_jsonl(workdir) if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 160


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
  # Adam's first update is bounded by the learning rate: finite after step 1, then not.
  config = load_config(
    "iris_pad",
    "quick",
    **dict(SMALL, optim__name="adamw", optim__lr=1e30),
    num_train_steps=40,
    checkpoint_every_steps=1,
  )
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.train_and_evaluate(config, workdir)
  import jax

  assert completed_steps(workdir)  # the last good checkpoint is there
  if completed_steps(workdir):
    (params, stats), _ = final_params(config, workdir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((params, stats)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  """2 processes x 2 devices (gloo collectives over 127.0.0.1) == 1 process x 4 devices.

  Both layouts compute the same maths on the same global batches (4 rows per device, BatchNorm
  over all devices, keys from global rows); only the order in which the cross-process
  all-reduces add their partial sums differs. In float32 that rounding (~1e-7) is not a bound
  worth asserting: the `difference` loss's per-sample min/max normalisation and ReLU kinks can
  turn it into a switched near-tie, amplified over 8 steps of momentum SGD (1.7e-5 measured on a
  2-core AMD EPYC). So both runs compute in float64 (jax's x64 mode, `model.dtype=float64`),
  where the rounding is ~1e-16 (amplified to ~1e-8 at most by that normalisation: test_step)
  and a real difference -- one batch, one step, a wrong reduction -- still changes parameters
  by ~lr * |g| ~ 1e-3: the bound asserted (1e-6 relative) sits far from both (measured here:
  2.2e-16 absolute, 1.4e-14 relative).
  """
  overrides = dict(
    SMALL,
    num_train_steps=8,
    eval_every_steps=8,
    log_every_steps=1,
    model__dtype="float64",
    optim__name="sgd",
    optim__lr=0.01,
    optim__momentum=0.9,
    optim__schedule="constant",
  )
  config = load_config("iris_pad", "quick", **overrides)
  port = _free_port()
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  procs = [
    subprocess.Popen(
      main_command(
        "iris_pad.py:quick",
        multi,
        overrides,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      env=subprocess_env(2, x64=True),
      stdout=open(tmp_path / f"p{i}.log", "w"),
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  ref = subprocess.Popen(
    main_command("iris_pad.py:quick", single, overrides),
    env=subprocess_env(4, x64=True),
    stdout=open(tmp_path / "ref.log", "w"),
    stderr=subprocess.STDOUT,
  )
  for p, name in zip(procs + [ref], ["p0", "p1", "ref"]):
    assert p.wait(timeout=400) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
  assert "2 process(es)" in (tmp_path / "p0.log").read_text()
  import jax

  with jax.enable_x64(True):
    (pm, sm), _ = final_params(config, multi)
    (ps, ss), _ = final_params(config, single)
  leaves = jax.tree.leaves((pm, sm, ps, ss))
  assert {x.dtype for x in leaves} == {np.dtype("float64")}
  for a, b in zip(jax.tree.leaves((pm, sm)), jax.tree.leaves((ps, ss))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  losses_m = [r["loss"] for r in _read_jsonl(multi) if "loss" in r]
  losses_s = [r["loss"] for r in _read_jsonl(single) if "loss" in r]
  assert len(losses_m) == len(losses_s) == 8
  np.testing.assert_allclose(losses_m, losses_s, rtol=1e-6)
  val_multi = [r for r in _read_jsonl(multi) if "val/auroc" in r][-1]
  val_single = [r for r in _read_jsonl(single) if "val/auroc" in r][-1]
  assert val_multi["val/auroc"] == val_single["val/auroc"]
