"""`benchmarks/aot.py`: the real train step compiled ahead of time, on this CPU, for accelerators
it does not have. The TPU case needs libtpu (the `tpu` extra, which the README's test command
installs). The H100 case needs jax's CUDA plugin and ptxas (the `aot` extra), which the test
environment leaves out (README): it runs in this process where the plugin imports, else in a
subprocess with ``DIVISIVE_JAX_AOT_PLUGINS`` (a folder holding the `aot` wheels, as `.ci/run`
installs them) on its path; it is skipped where neither is there."""

import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from helpers import BENCH, REPO, bench_module

PLUGINS = os.environ.get("DIVISIVE_JAX_AOT_PLUGINS", "")


def _run(tmp_path, *args, plugins: str = ""):
  """(the JSON benchmarks/aot.py wrote, its stdout): run in this process, or with ``plugins``
  in a subprocess with that folder first on its path."""
  out, buf = tmp_path / "aot.json", io.StringIO()
  args = [*args, "--json", str(out)]
  if plugins:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([plugins, REPO]))
    cmd = [sys.executable, os.path.join(BENCH, "aot.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    buf.write(proc.stdout)
  else:
    with contextlib.redirect_stdout(buf):
      bench_module("aot").main(args)
  with open(out) as f:
    return json.load(f), buf.getvalue()


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.parametrize("target", ["h100_sxm", "v5e:2x2"])
def test_aot_compiles_the_step_for_a_gpu_and_a_tpu_slice(tmp_path, target):
  """The tiny model's train step and eval step, `accel` (bfloat16), compiled here for an H100
  (XLA's GPU compiler through jax's CUDA plugin) and for a TPU v5e 2x2 slice (libtpu), neither
  present: every backbone convolution bf16 (cuDNN on the GPU), memory below the device's,
  gradients (in float32) and BatchNorm statistics all-reduced over the slice's 4 chips, nothing
  sent to the host."""
  plugins = ""
  if ":" in target:
    pytest.importorskip("libtpu")
  elif not _has_cuda_plugin():
    if not PLUGINS:
      pytest.skip("no CUDA plugin: install the `aot` extra or set DIVISIVE_JAX_AOT_PLUGINS")
    plugins = PLUGINS
  args = ["--target", target, "--models", "tiny", "--image_size", "32", "--batch", "16"]
  # A GPU's FLOPs are XLA's cost analysis of the step lowered for the CPU (`aot` docstring), the
  # same for any GPU target: the FLOPs ratio to CE is checked once, on the TPU's compiled steps.
  methods = "ce,difference,eval" if ":" in target else "difference,eval"
  result, stdout = _run(tmp_path, *args, "--methods", methods, plugins=plugins)
  *trained, difference, evaluation = result["rows"]
  assert evaluation["batch"] == 32 and evaluation["members"] == 1  # the eval step, twice the batch
  for r in (*trained, difference, evaluation):
    convs = {k: v for k, v in r["kinds"].items() if "conv" in k and "(backbone)" in k}
    assert convs and all(" bf16 " in k for k in convs), convs
    if ":" not in target:
      assert all(k.startswith("cudnn") for k in convs), convs
    assert r["fits"] and 0 < r["peak_bytes"] < result["target"]["memory_bytes"]
    assert r["host_ops"] == {} and r["flops"] > 0
    if ":" in target and r is not evaluation:
      assert r["collectives"]["all-reduce"]["count"] >= 2, r["collectives"]
      # Gradients are summed in float32 under bfloat16 compute (`step._varying`).
      assert set(r["collectives"]["all-reduce"]["dtypes"]) == {"f32"}, r["collectives"]
  if ":" in target:  # the dual-CAM step does the CE step's arithmetic, give or take fusion
    assert 0.85 < difference["flops_over_ce"] < 1.15
  assert result["target"]["platform"] == ("tpu" if ":" in target else "cuda")
  assert "Compiled for" in stdout and "| tiny | difference |" in stdout
