"""Tests for divisive_jax.report (open-set aggregation, CLI) and divisive_jax.plots."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from divisive_jax import report


def _write_run(root, name, config, metrics, eval_file=True):
  d = os.path.join(root, name)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  if eval_file:
    with open(os.path.join(d, "eval_test.json"), "w") as f:
      f.write(json.dumps(metrics))  # may contain NaN, as json.dump writes by default
  return d


def _metrics(auroc, **kw):
  m = {
    "auroc": auroc,
    "eer": 0.1,
    "apcer": 0.2,
    "bpcer": 0.3,
    "bpcer_at_apcer5": 0.4,
    "bpcer_at_apcer1": 0.5,
    "score_polarity": "higher = attack",
  }
  m.update(kw)
  return m


@pytest.fixture
def runs(tmp_path):
  root = str(tmp_path / "runs")
  for seed, (a, e) in enumerate([(0.9, 0.10), (0.8, 0.20), (0.7, 0.30)]):
    _write_run(
      root,
      f"cyborg_print_s{seed}",
      {"method": "cyborg", "seed": seed, "data": {"heldout_attack": "print"}},
      _metrics(a, eer=e),
    )
  # method derived from nonzero loss weights; metrics nested under 'metrics'
  for seed, a in enumerate([0.95, 0.85]):
    _write_run(
      root,
      f"diff_print_s{seed}",
      {
        "seed": seed,
        "data": {"heldout_attack": "print"},
        "loss": {"weights": {"ce": 1.0, "difference": 0.5, "cyborg": 0.0}},
      },
      {"metrics": _metrics(a, apcer=float("nan") if seed else 0.25)},
    )
  _write_run(
    root,
    "cyborg_contacts_s0",
    {"method": "cyborg", "seed": 0, "data": {"heldout_attack": "contacts"}},
    _metrics(0.6),
  )
  # a minimal config: no method, no loss, no data, no seed
  _write_run(root, "bare", {}, _metrics(None))
  return root


def test_summarize_runs_mean_std(runs, tmp_path):
  out = str(tmp_path / "out")
  rows, md = report.summarize_runs([os.path.join(runs, "*")], out_dir=out)
  by = {(r["method"], r["heldout_attack"]): r for r in rows}
  assert set(by) == {
    ("cyborg", "print"),
    ("ce+difference", "print"),
    ("cyborg", "contacts"),
    ("unknown", "none"),
  }
  r = by[("cyborg", "print")]
  assert r["n"] == 3 and sorted(r["seeds"]) == [0, 1, 2]
  assert r["auroc_mean"] == pytest.approx(0.8)
  assert r["auroc_std"] == pytest.approx(0.1)  # sample std, ddof=1
  assert r["auroc_std"] == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
  assert r["eer_mean"] == pytest.approx(0.2) and r["eer_std"] == pytest.approx(0.1)
  assert r["bpcer_at_apcer1_mean"] == pytest.approx(0.5) and r["bpcer_at_apcer1_std"] == 0.0
  d = by[("ce+difference", "print")]
  assert d["auroc_mean"] == pytest.approx(0.9)
  assert d["auroc_std"] == pytest.approx(math.sqrt(0.005))
  assert d["apcer_n"] == 1 and d["apcer_mean"] == 0.25 and d["apcer_std"] is None
  c = by[("cyborg", "contacts")]
  assert c["n"] == 1 and c["auroc_mean"] == 0.6 and c["auroc_std"] is None
  u = by[("unknown", "none")]
  assert u["auroc_mean"] is None and u["auroc_n"] == 0
  # rows sorted by held-out attack, then method
  assert [(r["heldout_attack"], r["method"]) for r in rows] == sorted(
    (r["heldout_attack"], r["method"]) for r in rows
  )
  # markdown
  assert "| cyborg | print | 3 | 0, 1, 2 | 0.8000 ± 0.1000 |" in md
  assert "0.2500 (n=1)" in md
  assert "| cyborg | contacts | 1 | 0 | 0.6000 |" in md
  # files
  with open(os.path.join(out, "summary.md")) as f:
    assert f.read() == md
  with open(os.path.join(out, "summary.json")) as f:
    js = json.load(f)
  assert len(js["rows"]) == 4 and len(js["runs"]) == 7
  assert js["metrics"] == list(report.METRICS)


def test_missing_eval_file_names_file_and_command(runs):
  w = _write_run(runs, "not_evaluated", {"method": "x"}, None, eval_file=False)
  with pytest.raises(FileNotFoundError) as e:
    report.summarize_runs([os.path.join(runs, "cyborg_print_s0"), w])
  msg = str(e.value)
  assert os.path.join(w, "eval_test.json") in msg
  assert f"python -m divisive_jax.evaluate --workdir={w}" in msg
  with pytest.raises(FileNotFoundError, match="no workdir matches"):
    report.summarize_runs([os.path.join(runs, "nothing*")])


def _report(*args):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, "-m", "divisive_jax.report", *args],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_cli(runs, tmp_path):
  out = str(tmp_path / "cli")
  r = _report(f"--out={out}", os.path.join(runs, "cyborg_*"), os.path.join(runs, "cyborg_print_s0"))
  assert r.returncode == 0, r.stderr  # the duplicate is dropped
  assert "| cyborg | print | 3 |" in r.stdout
  assert os.path.isfile(os.path.join(out, "summary.json"))
  w = _write_run(runs, "nope", {}, None, eval_file=False)
  r = _report(w)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
  assert "eval_test.json" in line and "divisive_jax.evaluate" in line
  r = _report()
  assert r.returncode == 1 and "error: no workdirs given" in r.stderr


def test_cli_module_entry_point(runs, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "divisive_jax.report",
      "--out",
      str(tmp_path / "m"),
      os.path.join(runs, "diff_*"),
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert res.returncode == 0, res.stderr
  assert "| ce+difference | print | 2 |" in res.stdout


def test_runs_of_one_method_with_other_weights_are_told_apart(tmp_path):
  root = str(tmp_path)
  for seed, (name, w) in enumerate((("a", 1.0), ("b", 1.0), ("c", 100.0))):
    config = {"method": "rrr", "seed": seed, "loss": {"weights": {"ce": 1.0, "rrr": w}}}
    _write_run(root, name, config, _metrics(0.5))
  rows, md = report.summarize_runs([os.path.join(root, "*")])
  assert [(r["method"], r["n"]) for r in rows] == [("rrr", 2), ("rrr (rrr=100)", 1)]


def test_the_same_run_given_twice_is_refused(tmp_path):
  """Two workdirs of one experiment (two populations trained alike: the same config and seed,
  other folders) would count one seed twice: one line naming both."""
  from divisive_jax.errors import ConfigError

  config = {"method": "cyborg", "seed": 0, "name": "a", "data": {"data_dir": "/x/data"}}
  a = _write_run(str(tmp_path), "A_s0", config, _metrics(0.8))
  b = _write_run(
    str(tmp_path), "B_s0", dict(config, name="b", data={"data_dir": "/y"}), _metrics(0.8)
  )
  with pytest.raises(ConfigError, match=rf"{a} and {b} are the same run .*seed 0\): give one"):
    report.summarize_runs([a, b])
  other = _write_run(str(tmp_path), "C_s1", dict(config, seed=1), _metrics(0.7))
  rows, _ = report.summarize_runs([a, other])
  assert rows[0]["n"] == 2 and rows[0]["seeds"] == [0, 1]
