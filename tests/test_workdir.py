"""One workdir = one experiment, and runs that fail loudly: the workdir lock, the config check on
resume, a run that diverges before its first checkpoint, a full disk, a complete run, runs that
cannot mean anything, and the first progress line."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO, TINY_RUN, completed_steps, load_config, main_command, subprocess_env

from divisive_jax import layout, preflight, train, workdir, writers
from divisive_jax.errors import DataError
from divisive_jax.errors import CheckpointError, ConfigError, NonFiniteLossError, WorkdirError

TINY = dict(
  TINY_RUN,
  final_eval=False,
  log_every_steps=2,
  num_train_steps=4,
  eval_every_steps=4,
)


def _records(w):
  with open(os.path.join(w, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_second_run_on_a_locked_workdir_is_refused_and_a_dead_holder_does_not_block(tmp_path):
  w = str(tmp_path / "w")
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\nfrom divisive_jax import workdir\n"
      f"workdir.Lock({w!r}).acquire(); print('locked', flush=True); time.sleep(600)",
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=REPO,
  )
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {holder.pid} on"):
    train.train_and_evaluate(load_config("iris_pad", "quick", **TINY), w)
  # At once, before any data work (no prepared data) or output: nothing of the other run touched.
  assert sorted(os.listdir(w)) == [".lock"]
  holder.kill()  # kill -9: the kernel releases the lock; the next run takes it
  holder.wait()
  with workdir.Lock(w):
    pass


def test_config_changes_on_resume(tmp_path, caplog):
  w = str(tmp_path / "w")
  train.train_and_evaluate(load_config("iris_pad", "quick", **TINY), w)
  changed = load_config("iris_pad", "quick,cyborg", **dict(TINY, optim__lr=0.01))
  with pytest.raises(WorkdirError) as e:
    train.train_and_evaluate(changed, w)
  msg = str(e.value)
  assert "optim.lr: 0.05 -> 0.01" in msg and "loss.weights.cyborg: 0.0 -> 0.5" in msg
  assert "new --workdir" in msg and "--allow_config_change" in msg and len(msg) < 800
  with open(os.path.join(w, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.05  # nothing overwritten
  # Logging cadence is safe to change: the run resumes (here: finds itself complete).
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(load_config("iris_pad", "quick", **dict(TINY, log_every_steps=1)), w)
  assert "do not affect training: log_every_steps: 2 -> 1" in caplog.text
  # An explicit flag continues the checkpoint with the new config and keeps the old one.
  longer = load_config("iris_pad", "quick", **dict(TINY, num_train_steps=6))
  train.train_and_evaluate(longer, w, allow_config_change=True)
  assert completed_steps(w)[-1] == 6
  with open(os.path.join(w, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert history[0]["replaced_at_step"] == 4 and history[0]["config"]["num_train_steps"] == 4


def test_complete_run_says_so(tmp_path, caplog):
  w = str(tmp_path / "w")
  config = load_config("iris_pad", "quick", **TINY)
  train.train_and_evaluate(config, w)
  caplog.clear()  # only the second run's records (another test may have made absl verbose)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, w)
  assert "is complete (step 4 of 4): nothing to train" in caplog.text
  assert "Training 4 steps" not in caplog.text


def test_divergence_before_the_first_checkpoint_leaves_no_records(tmp_path):
  w = str(tmp_path / "w")
  # Adam's first update is bounded by the learning rate: step 1 is finite (its record is
  # written), step 2 is not.
  config = load_config(
    "iris_pad",
    "quick",
    **dict(
      TINY,
      num_train_steps=30,
      eval_every_steps=30,
      log_every_steps=1,
      optim__name="adamw",
      optim__lr=1e30,
    ),
  )
  with pytest.raises(NonFiniteLossError, match=r"at step \d+;.*No checkpoint was saved before it"):
    train.train_and_evaluate(config, w)
  assert completed_steps(w) == []
  assert os.path.exists(os.path.join(w, "metrics.jsonl"))  # written, then emptied
  assert _records(w) == []  # the diverged run's lines are not left behind
  with pytest.raises(NonFiniteLossError) as e:
    train.train_and_evaluate(config, w)
  assert "step None" not in str(e.value)


def test_a_full_disk_stops_with_one_line(tmp_path):
  """A checkpoint write that fails for lack of space (here: a file-size limit, which makes the
  writes fail with EFBIG like a full disk fails with ENOSPC) stops training at once with one
  line naming the step, the folder and the last complete checkpoint -- no thread tracebacks."""
  w = str(tmp_path / "w")
  overrides = dict(TINY, num_train_steps=8, checkpoint_every_steps=2)
  script = textwrap.dedent(f"""
    import resource, signal, sys
    sys.argv = {main_command("iris_pad.py:quick", w, overrides)[2:]!r}
    sys.argv[0] = "divisive_jax.main"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    import runpy
    runpy.run_module("divisive_jax.main", run_name="__main__")
  """)
  env = subprocess_env(1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # its files would hit the limit too
  r = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert "file too large (a file-size limit of 20000 bytes;" in errors[0]
  assert (
    "to save checkpoint 2 in" in errors[0] and "the last complete checkpoint is none" in errors[0]
  )
  assert "Traceback" not in r.stderr
  assert r.stderr.count("\n") < 60, r.stderr[-3000:]


def test_runs_that_cannot_mean_anything(tmp_path):
  with pytest.raises(ConfigError, match="1x1 CAM grid.*silently be cross-entropy"):
    preflight.check_config(
      load_config("iris_pad", "difference", model__name="resnet18", data__image_size=24)
    )
  # Cross-entropy alone too: a CAM of one cell shows nothing (issue 28: 1 x 1 px images trained).
  with pytest.raises(ConfigError, match=r"1x1 CAM grid: no class map .*image_size=33 or larger"):
    preflight.check_config(
      load_config("iris_pad", "ce", model__name="resnet18", data__image_size=24)
    )
  with pytest.raises(ConfigError, match=r"image_size=1 gives a 1x1 CAM grid.*image_size=5 or"):
    preflight.check_config(load_config("iris_pad", "quick,ce", data__image_size=1))
  preflight.check_config(load_config("iris_pad", "quick,ce", data__image_size=5))
  with pytest.raises(ConfigError, match="optim.lr=-0.1 must be positive"):
    train.train_and_evaluate(load_config("iris_pad", "quick", optim__lr=-0.1), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="optim.lr=0.0 must be positive"):
    train.train_and_evaluate(load_config("iris_pad", "quick", optim__lr=0.0), str(tmp_path / "b"))

  class Split:
    def __init__(self, labels):
      self.label = labels

  class Splits:
    class_names = ("Live", "Spoof")
    train, val = Split([1, 1, 1]), Split([0, 1])

  with pytest.raises(DataError, match=r"single class \(Spoof, 3 examples\)"):
    preflight.check_splits(load_config("iris_pad"), Splits)
  Splits.train, Splits.val = Split([0, 1]), Split([0, 0])
  with pytest.raises(ConfigError, match="val/auroc is undefined"):
    preflight.check_splits(load_config("iris_pad", best_metric="val/auroc"), Splits)
  preflight.check_splits(load_config("iris_pad", best_metric="val/loss"), Splits)  # a warning


def test_first_progress_line_comes_by_time(tmp_path, caplog, monkeypatch):
  """A console line is owed every LOG_EVERY_SECONDS whatever log_every_steps is."""
  monkeypatch.setattr(writers, "LOG_EVERY_SECONDS", 0.0)
  config = load_config("iris_pad", "quick", **dict(TINY, log_every_steps=100))
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "step 1/4 (25%)" in caplog.text


def test_a_long_compilation_is_not_silent():
  """Issue 28, item 10: while a block runs (the first dispatch compiles), a line every
  ``every`` seconds names it and the time so far; none when it is not active."""
  import threading

  lines, beat = [], threading.Event()

  def log(line):
    lines.append(line)
    beat.set()

  with writers.Heartbeat("Compiling the train step", every=0.01, log=log):
    assert beat.wait(60)  # the block outlasts a beat
  n = len(lines)
  assert re.fullmatch(r"Compiling the train step: \d+ s so far", lines[0]), lines
  time.sleep(0.05)
  assert len(lines) == n  # it stops with the block
  with writers.Heartbeat("x", active=False, every=0.01, log=log):
    time.sleep(0.05)
  assert len(lines) == n


def test_a_population_closes_with_a_table_of_its_members():
  """Issue 28, item 10: one line per member, with its status and figures."""
  from divisive_jax import members

  def result(name, status, step, val, test):
    return dict(member=name, status=status, best_step=step, val_auroc=val, test_auroc=test)

  text = members.table(
    {
      "s0_rrr1": result("s0_rrr1", {"state": "live", "step": None}, 62, 0.8123, 0.79),
      "s0_rrr1e+38": result("s0_rrr1e+38", {"state": "diverged", "step": 1}, 0, 0.5, 0.5),
    }
  )
  lines = text.splitlines()
  assert lines[0] == "The population's 2 members:" and lines[1].split()[:2] == ["member", "status"]
  assert lines[2].split() == ["s0_rrr1", "trained", "62", "0.812", "0.790"]
  assert lines[3].split() == ["s0_rrr1e+38", "diverged", "at", "step", "1", "0", "0.500", "0.500"]


def test_pretrained_weights_are_checked_before_the_data(tmp_path):
  w = str(tmp_path / "w")
  config = load_config(
    "iris_pad", "quick", **dict(TINY, model__pretrained_path=str(tmp_path / "missing.pth"))
  )
  from divisive_jax.models.torchvision import WeightsError

  with pytest.raises(WeightsError, match="missing.pth"):
    train.train_and_evaluate(config, w)
  assert not os.path.exists(os.path.join(w, "data_info.json"))
  bad = tmp_path / "bad.pth"
  bad.write_bytes(os.urandom(256))
  config.model.pretrained_path = str(bad)
  config.model.name = "resnet18"
  with pytest.raises(WeightsError, match="bad.pth"):
    train.train_and_evaluate(config, w)


def test_checkpoint_error_names_the_reason(tmp_path):
  from divisive_jax.checkpoints import space_problem
  from divisive_jax.errors import write_error_reason as _write_error_reason

  assert space_problem(str(tmp_path / "checkpoints"), 1000) is None
  assert space_problem(str(tmp_path / "checkpoints"), 2**62).startswith("no space left on device (")

  err = OSError(28, "No space left on device")
  assert _write_error_reason(err) == "no space left on device"
  wrapped = RuntimeError("tensorstore: ... [errno 28] No space left on device")
  assert _write_error_reason(wrapped) == "no space left on device"
  assert _write_error_reason(ValueError("shape mismatch")) is None
  assert issubclass(CheckpointError, Exception)


def test_a_workdir_holds_one_kind_of_experiment(tmp_path):
  """A population in a single run's workdir, a single run in a population's, a single run or a
  population in a sweep's root, a sweep in a run's workdir: refused in one line before anything
  is written (each would overwrite the root config.json)."""
  from divisive_jax import sweep

  run, pop, swept = (str(tmp_path / n) for n in ("run", "pop", "sweep"))
  single = load_config("iris_pad", "quick", **dict(TINY, num_train_steps=2, eval_every_steps=2))
  train.train_and_evaluate(single, run)
  population = load_config("iris_pad", "quick", **TINY, population__seeds="0,1")
  with open(os.path.join(run, "config.json")) as f:
    before = f.read()
  with pytest.raises(WorkdirError, match="holds a single run; a population needs a workdir of"):
    train.train_and_evaluate(population, run)
  with open(os.path.join(run, "config.json")) as f:
    assert f.read() == before
  os.makedirs(os.path.join(pop, "members", "s0"))
  with pytest.raises(WorkdirError, match="holds a population; a single run needs a workdir"):
    train.train_and_evaluate(single, pop)
  os.makedirs(swept)
  with open(os.path.join(swept, layout.SWEEP_SETTINGS), "w") as f:
    f.write("{}")
  for config, what in ((single, "a single run"), (population, "a population")):
    with pytest.raises(WorkdirError, match=f"holds a sweep; {what} needs a workdir of its own"):
      train.train_and_evaluate(config, swept)
  with pytest.raises(WorkdirError, match="holds a single run; a sweep needs a workdir"):
    sweep.run_sweep(load_config("shortcut", "quick"), run, ["ce"], "", "0")
  assert layout.kind_of(str(tmp_path / "nothing")) is None


def test_class_names_are_two_and_written_as_a_tuple():
  from divisive_jax import config_base

  for names in (("NonFace,Face",), ("a", "b", "c"), ("a", "a")):
    with pytest.raises(
      ConfigError, match=r"must name two different classes.*\('NonFace', 'Face'\)"
    ):
      config_base.validate(load_config("iris_pad", "quick", data__class_names=names))
  config_base.validate(load_config("iris_pad", "quick", data__class_names=("NonFace", "Face")))
