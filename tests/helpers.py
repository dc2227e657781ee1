"""Shared test helpers: load configs/*.py the way `--config=...` does, with overrides."""

import importlib.util
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def bench_module(name: str):
  """``benchmarks/<name>.py`` as a module (the benchmarks import their sibling `common` as the
  scripts do: the folder goes on ``sys.path`` once)."""
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  return importlib.import_module(name)


# The one tiny run of the job tests (32 px, width-4 model, one batch of 16 per step). The
# learning rate is constant, so the compiled steps do not depend on how long a run is: tests
# that train the same method share them through the session's persistent compilation cache
# (conftest.py) instead of compiling their own. Plain SGD (+ momentum): its update is linear in
# the gradient, so runs that sum in another order (populations, other device counts) agree to
# float rounding instead of Adam's 1/sqrt(v) amplification of it.
TINY_RUN = dict(
  data__num_train=32,
  data__num_val=16,
  data__num_test=16,
  data__image_size=32,
  model__width=4,
  batch_size=16,
  optim__name="sgd",
  optim__lr=0.05,
  optim__momentum=0.9,
  optim__schedule="constant",
  optim__warmup_epochs=0.0,
)


def load_config(name: str, arg: str | None = None, **overrides):
  """configs/<name>.py:get_config(arg) with dotted overrides, e.g. data__image_size=32."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    *path, leaf = key.split("__")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def override_flags(overrides: dict) -> list[str]:
  """The same overrides as `--config.a.b=value` flags for a subprocess."""
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]


def main_command(config_arg: str, workdir: str, overrides: dict, *extra) -> list[str]:
  return [
    sys.executable,
    "-m",
    "divisive_jax.main",
    f"--config={REPO}/configs/{config_arg}",
    f"--workdir={workdir}",
    *override_flags(overrides),
    *extra,
  ]


def subprocess_env(num_devices: int, x64: bool = False) -> dict:
  """The environment of a job run in a subprocess; ``x64``: jax's 64-bit mode (float64 runs)."""
  env = dict(os.environ)
  if x64:
    env["JAX_ENABLE_X64"] = "1"
  level = "--xla_backend_optimization_level=1"  # as conftest.py sets it for the tests
  env["XLA_FLAGS"] = f"{level} --xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def final_params(config, workdir: str, which: str = "latest"):
  """Parameters and BN statistics of a workdir's checkpoint, as numpy."""
  from divisive_jax import checkpoints, state

  ckpts = checkpoints.Checkpoints(workdir, async_save=False)
  target = state.abstract_state(state.build(config))
  restored, meta = ckpts.restore(ckpts.resolve(which), target)
  ckpts.close()
  return jax.tree.map(np.asarray, (restored.params, restored.batch_stats)), meta


def completed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


# A weight for every loss term: one program that trains them all.
EVERY_TERM = {
  "ce": 1.0,
  "cyborg": 0.5,
  "difference": 0.5,
  "opposition": 0.5,
  "margin": 0.5,
  "gradmask": 0.1,
  "rrr": 1.0,
  "actdiff": 1.0,
}


def step_batch(seed: int = 0, n: int = 8, size: int = 16, channels: int = 1) -> dict:
  """A float32 batch of the train step's inputs: random images, alternate labels, a rectangle
  as the human map, rows 2 and 5 without one."""
  rng = np.random.default_rng(seed)
  sal = np.zeros((n, size, size), np.float32)
  sal[:, 3:10, 4:12] = 1.0
  return {
    "image": rng.random((n, size, size, channels), np.float32),
    "label": (np.arange(n) % 2).astype(np.int32),
    "saliency": sal,
    "has_saliency": np.array([1, 1, 0, 1, 1, 0, 1, 1][:n], np.float32),
    "valid": np.ones(n, np.float32),
  }
