"""Messages a person can read: every CLI prints our errors as one short line without a
traceback, a misspelled config field names the closest valid ones, and a run's log is a story
of the run (no library chatter, no progress bars, no escape codes)."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from helpers import REPO, load_config, subprocess_env

from divisive_jax import cli, config_base


def _run(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _one_error_line(r):
  assert r.returncode in (1, 2), r.stderr[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  return errors[0]


def test_misspelled_config_field_names_the_closest():
  r = _run("divisive_jax.main", "--config=configs/iris_pad.py:quick", "--config.optim.lrr=0.1")
  line = _one_error_line(r)
  assert "--config.optim.lrr: unknown field 'lrr' in config.optim; did you mean lr?" in line
  assert len(r.stderr.splitlines()) <= 3


def test_config_errors_of_every_kind_are_short(tmp_path):
  line = _one_error_line(_run("divisive_jax.main", "--config=configs/iris_pad.py:quick,cyborgg"))
  assert "unknown config variant 'cyborgg'" in line
  line = _one_error_line(
    _run("divisive_jax.main", "--config=configs/iris_pad.py:quick", "--config.optim.lr=abc")
  )
  assert "abc" in line
  line = _one_error_line(
    _run(
      "divisive_jax.main",
      "--config=configs/iris_pad.py:quick",
      "--config.model.name=resnet81",
      f"--workdir={tmp_path / 'w'}",
    )
  )
  assert "config.model.name='resnet81' is not valid; did you mean resnet18" in line


@pytest.mark.parametrize(
  "args,fragment",
  [
    (("divisive_jax.evaluate", "--workdir=/nonexistent", "--splitt=test"), "splitt"),
    (("divisive_jax.evaluate", "--workdir=/nonexistent"), "config.json not found"),
    (("divisive_jax.explain", "--workdir=/nonexistent", "--out=/tmp/x"), "config.json not found"),
    (("divisive_jax.report", "/nonexistent_workdir"), "does not exist"),
  ],
)
def test_every_cli_prints_short_errors(args, fragment):
  assert fragment in _one_error_line(_run(*args))


def test_missing_field_helper():
  c = config_base.base()
  assert cli.missing_field(c, "optim.lr") is None
  assert "did you mean weights" in cli.missing_field(c, "loss.weigths.ce")
  assert "valid:" in cli.missing_field(c, "zzz")


def _csv_data(root):
  rng = np.random.default_rng(0)
  lines = []
  for i in range(24):
    split = ("train", "train", "val", "test")[i % 4]
    cls = ("Live", "Spoof")[(i // 4) % 2]  # both classes in every split
    path = os.path.join(root, "images", f"{cls}_{i}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 10:30] = 255
    os.makedirs(os.path.join(root, "maps"), exist_ok=True)
    PIL.Image.fromarray(m).save(os.path.join(root, "maps", f"{cls}_{i}.png"))
    lines.append(f"{split},{cls},{cls}_{i}.png")
  with open(os.path.join(root, "protocol.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")


def test_the_log_of_a_csv_run_is_a_story(tmp_path):
  _csv_data(str(tmp_path))
  w = str(tmp_path / "w")
  args = [
    "divisive_jax.main",
    "--config=configs/iris_pad.py:quick",
    f"--workdir={w}",
    f"--config.data.csv_path={tmp_path / 'protocol.csv'}",
    f"--config.data.image_dir={tmp_path / 'images'}",
    f"--config.data.map_dir={tmp_path / 'maps'}",
    "--config.data.image_size=32",
    "--config.model.width=4",
    "--config.batch_size=4",
    "--config.num_train_steps=4",
    "--config.eval_every_steps=4",
    "--config.data.attack_type_from=none",
  ]
  r = _run(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  log = r.stderr + r.stdout
  first = next(line for line in log.splitlines() if line.startswith("I"))
  assert "Training on CSV-protocol data" in first
  for chatter in (
    "Downloading and preparing",
    "\x1b[",
    "libtpu",
    "Unable to initialize backend",
    "opencv",
    "OpenCV",
    "Generating splits",
    "Shuffling",
    "Using custom data configuration",
    "dataset_info.json",
  ):
    assert chatter not in log, chatter
  lines = [line for line in log.splitlines() if line.strip()]
  noisy = [line for line in lines if "orbax" in line or "checkpoint_manager" in line]
  assert not noisy, noisy[:3]
  assert any("Done. Best checkpoint" in line for line in lines)
  assert len(lines) < 40, "\n".join(lines)


def test_library_records_kept_and_dropped():
  """The log filter: library INFO and known non-news warnings dropped, other warnings, errors
  and our own records kept."""
  import logging

  from divisive_jax import writers

  keep = writers._LibraryInfoFilter().filter

  def record(package, level, msg):
    path = os.path.join(os.sep, "site-packages", package, "module.py")
    return logging.LogRecord("absl", level, path, 1, msg, None, None)

  tracked = "Requested `tracked_metric`; did not provide metrics."
  assert not keep(record("orbax", logging.WARNING, tracked))
  assert not keep(record("orbax", logging.INFO, "Saving checkpoint"))
  assert keep(record("orbax", logging.WARNING, "something went wrong"))
  assert keep(record("orbax", logging.ERROR, tracked))
  assert not keep(record("tensorflow_datasets", logging.WARNING, "Using custom data configuration"))
  assert keep(record("tensorflow_datasets", logging.ERROR, "failed"))
  assert keep(record("divisive_jax", logging.INFO, "step 4/72"))


def test_a_misspelled_config_file_and_damaged_json_are_one_line(tmp_path):
  """A config file that does not exist names the closest one; a damaged config.json or member
  result.json (cut short, edited by hand) names the file, where it breaks and the fix."""
  r = _run("divisive_jax.main", "--config=configs/iris_pda.py:quick", f"--workdir={tmp_path}/w")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
    "error: --config=configs/iris_pda.py:quick: config file configs/iris_pda.py not found; did "
    "you mean configs/iris_pad.py?"
  )
  from divisive_jax import config_base, evaluate, sweep
  from divisive_jax.errors import DamagedFileError
  from divisive_jax.members import members_of

  w = tmp_path / "run"
  w.mkdir()
  (w / "config.json").write_text('{"model": {"name": "tiny",')
  with pytest.raises(DamagedFileError, match=r"run/config.json is not valid JSON \(.*line 1\); it"):
    evaluate.evaluate_workdir(str(w))
  config = load_config("iris_pad", "quick,rrr", population__weights="rrr=1")
  (member,) = members_of(config)
  folder = tmp_path / "rrr" / "seeds_0-0" / "members" / member.name
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(config_base.to_json(member.config))
  (folder / "result.json").write_text('{"member": "s0_rrr1", "val_au')
  with pytest.raises(
    DamagedFileError, match=r"result.json is not valid JSON.*delete it: the sweep"
  ):
    sweep.reusable_results(str(tmp_path / "rrr"), [member])
