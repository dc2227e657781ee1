"""Smoke tests of benchmarks/*.py: each script runs with tiny settings and writes valid JSON with
the expected keys. No timing assertions (the figures themselves are in benchmarks/RESULTS.md)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

BENCH = os.path.join(REPO, "benchmarks")


def _run(script, tmp_path, *args, python=sys.executable, devices=2, timeout=600):
  out = tmp_path / f"{script}.json"
  cmd = [python, os.path.join(BENCH, f"{script}.py"), *args, "--json", str(out)]
  proc = subprocess.run(
    cmd, cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def test_cam_overhead_smoke(tmp_path):
  result, stdout = _run(
    "cam_overhead",
    tmp_path,
    "--models",
    "tiny",
    "--stem",
    "small",
    "--width",
    "4",
    "--image_size",
    "16",
    "--batch",
    "4",
    "--devices",
    "2",
    "--variants",
    "ce,difference",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--quiet",
  )
  assert result["benchmark"] == "cam_overhead"
  assert "machine" in result and "memory_label" in result
  assert [r["variant"] for r in result["rows"]] == ["ce", "difference"]
  for r in result["rows"]:
    for key in (
      "compile_s",
      "step_ms",
      "ratio_to_ce",
      "images_per_s",
      "flops",
      "flops_ratio_to_ce",
      "temp_mb",
      "rss_hwm_delta_mb",
      "hlo_ops",
      "first_loss",
    ):
      assert key in r, key
    assert r["step_ms"] > 0 and len(r["step_ms_per_round"]) == 2
  assert result["rows"][0]["ratio_to_ce"] == 1.0
  assert [c["variant"] for c in result["floor_checks"]] == ["difference"]
  assert "| tiny | difference |" in stdout


def test_scaling_smoke(tmp_path):
  result, stdout = _run(
    "scaling",
    tmp_path,
    "--width",
    "4",
    "--image_size",
    "16",
    "--devices",
    "1,2",
    "--per_device_batch",
    "2",
    "--global_batch",
    "4",
    "--losses",
    "difference",
    "--steps",
    "1",
    "--inner",
    "1",
    "--warmup",
    "0",
    "--quiet",
  )
  assert result["benchmark"] == "scaling"
  assert "simulated CPU devices" in result["label"] and "simulated CPU devices" in stdout
  keys = {(r["mode"], r["devices"]) for r in result["rows"]}
  assert keys == {("per_device", 1), ("per_device", 2), ("global", 1), ("global", 2)}
  for r in result["rows"]:
    for key in ("steps_per_s", "images_per_s", "images_per_s_vs_1_device", "global_batch"):
      assert key in r, key
  assert {r["global_batch"] for r in result["rows"] if r["mode"] == "global"} == {4}


def test_shortcut_table_smoke(tmp_path):
  result, stdout = _run(
    "shortcut_table",
    tmp_path,
    "--methods",
    "rrr",
    "--seeds",
    "1",
    "--num_epochs",
    "1",
    "--workers",
    "1",
    "--lambda_rrr",
    "0.5",
  )
  assert result["benchmark"] == "shortcut_table"
  assert [s["method"] for s in result["summary"]] == ["rrr"]
  assert result["summary"][0]["published_test_auroc"] == "0.49 ± 0.08"
  for s in result["summary"]:
    for key in ("test_auroc_mean", "test_auroc_std", "test_alignment_pe_mean", "val_auroc_mean"):
      assert key in s, key
  assert len(result["runs"]) == 1
  for r in result["runs"]:
    assert 0.0 <= r["test_auroc"] <= 1.0
    assert 0.0 <= r["test_alignment_pe"] <= 1.0
    assert r["best_step"] > 0
  assert result["runs"][0]["weights"] == {"ce": 1.0, "rrr": 0.5}
  assert "test AUROC (published)" in stdout


def test_shortcut_table_job_order_compiles_each_method_first():
  sys.path.insert(0, BENCH)
  import shortcut_table

  order = shortcut_table.job_order(["ce", "rrr"], [0, 1])
  assert order == [("ce", 0), ("rrr", 0), ("ce", 1), ("rrr", 1)]
  assert shortcut_table.PUBLISHED["ce"] == "0.00 ± 0.00"
  assert shortcut_table.PUBLISHED.get("difference") is None


def _torch_python():
  """A Python with torch + torchvision (this one, or the project's torch venv)."""
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    return sys.executable
  except ImportError:
    candidate = "/work/venv-torch/bin/python"
    return candidate if os.path.exists(candidate) else None


def test_torch_compare_skips_cleanly_without_torch(tmp_path):
  try:
    import torch  # noqa: F401

    pytest.skip("torch is importable here; the skip path is not reachable")
  except ImportError:
    pass
  result, stdout = _run("torch_compare", tmp_path, "--steps", "1")
  assert result == {"benchmark": "torch_compare", "skipped": True, "reason": result["reason"]}
  assert "skipped" in stdout


def test_torch_compare_smoke(tmp_path):
  python = _torch_python()
  if python is None:
    pytest.skip("no Python with torch + torchvision")
  probe = subprocess.run(
    [python, "-c", "import torch, torchvision, jax, flax, optax, ml_collections"],
    capture_output=True,
  )
  if probe.returncode:
    pytest.skip(f"{python} lacks part of the stack: {probe.stderr.decode()[-300:]}")
  result, stdout = _run(
    "torch_compare",
    tmp_path,
    "--model",
    "resnet18",
    "--image_size",
    "32",
    "--batch",
    "2",
    "--variants",
    "cam",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--quiet",
    python=python,
    devices=1,
  )
  assert result["skipped"] is False
  assert [r["variant"] for r in result["rows"]] == ["cam"]
  for r in result["rows"]:
    for key in ("jax_step_ms", "torch_step_ms", "ours_over_torch_images_per_s"):
      assert r[key] > 0, key
  assert result["cam_over_ce"] == {}  # needs both variants
