"""Shared helpers of the benchmark scripts: device flags, interleaved timing, memory, tables.

The machines these benchmarks run on are small and shared, so every script compares variants
INSIDE ONE RUN: all variants are compiled first, then timed in rounds (each round runs every
variant's step `inner` times and blocks, in a freshly shuffled order), and the reported figures
are medians over rounds and medians of per-round ratios. A slow-down that hits one round hits every variant of that round
and cancels in the ratio.

Import this module BEFORE jax when you need `use_platform` / `set_host_device_count` (XLA reads
its flags when the backend starts).

The benchmarks build what they time with the library's own functions, as the trainer does:
`bench_config` (a `config_base.base()` config, the method set by `config_base.set_method`),
`train_setup` (`state.build`, optionally on a sub-mesh), `create_state` / `state_for`
(`state.create_state` once, then a copy per loss variant with that variant's loss weights), and
they time the trainer's own dispatch: `dispatch_runner` runs `loop.Dispatcher` -- the object
`train.train_and_evaluate` steps with (the step of its members, `step.make_train_step[s]`, and
its feed) -- on a `Repeat`ed device batch (step-only), the trainer's host feed (end-to-end) or
the device-resident split. Batches are what the data layer delivers (`uint8_batch`: uint8
images and maps), so the device-side preprocessing is part of every timed step.
"""

from __future__ import annotations

import collections
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import types
from typing import Any, Callable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python benchmarks/x.py` from a venv without the package
  sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- environment
def set_host_device_count(n: int) -> None:
  """Ask XLA for `n` simulated CPU devices unless XLA_FLAGS already sets a count.

  Must run before jax is imported (the flag is read when the CPU backend starts).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def use_platform(platform: str, host_devices: int = 1) -> None:
  """Choose JAX's backend before jax is imported: ``cpu`` (with ``host_devices`` simulated
  devices), ``gpu`` (CUDA), ``tpu``, or ``''``: JAX's default (an accelerator when there is one).
  """
  if platform == "cpu":
    set_host_device_count(host_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif platform:
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(platform, platform)


def add_xla_flags(flags: str) -> None:
  if flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def machine_info() -> dict:
  """The machine and software a figure was measured on."""
  info = {
    "nproc": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L3 cache"):
      m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
      if m:
        info[key] = m.group(1).strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    with open("/proc/loadavg") as f:
      info["loadavg_at_start"] = f.read().split()[:3]
  except OSError:
    pass
  if "jax" in sys.modules:
    import jax
    import jaxlib

    info.update(
      jax=jax.__version__,
      jaxlib=jaxlib.__version__,
      backend=jax.default_backend(),
      devices=jax.device_count(),
      device_kind=jax.devices()[0].device_kind,
    )
    memory = device_memory_bytes()
    if memory:
      info["device_memory_gib"] = round(memory / 2**30, 1)
  info["packages"] = package_versions()
  return info


PACKAGES = (
  "jax",
  "jaxlib",
  "jax-cuda13-plugin",
  "jax-cuda12-plugin",
  "flax",
  "optax",
  "numpy",
  "protobuf",
  "tensorflow-datasets",
  "array-record",
  "ml-collections",
  "clu",
  "torch",
  "torchvision",
)


def package_versions(names=PACKAGES) -> dict:
  """Installed versions of the packages a figure depends on (absent ones left out)."""
  from importlib import metadata

  out = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def device_memory_bytes() -> int | None:
  """The memory XLA may use on device 0 (``bytes_limit``; None where not reported, e.g. CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`, caching every executable."""
  import jax

  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def module_at(rev: str, path: str, replace=()):
  """The file ``path`` (e.g. ``divisive_jax/step.py``) of git revision ``rev`` as a module, its
  imports today's; ``replace``: (old, new) pairs of source text (e.g. an import of a sibling module
  redirected to that revision's). What ``--against REV`` of the benchmarks times."""
  src = subprocess.run(
    ["git", "-C", REPO, "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
  ).stdout
  for old, new in replace:
    src = src.replace(old, new)
  stem = os.path.splitext(os.path.basename(path))[0]
  module = types.ModuleType(f"{stem}_at_{rev}")
  sys.modules[module.__name__] = module  # dataclasses (flax's too) look their module up
  exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
  return module


# -------------------------------------------------------------------------------- timing
def block(tree) -> None:
  import jax

  jax.block_until_ready(tree)


def interleaved(
  fns: Mapping[str, Callable[[], Any]],
  rounds: int,
  inner: int = 1,
  warmup: int = 1,
  blocker: Callable[[Any], None] = block,
  log: Callable[[str], None] | None = None,
  seed: int = 0,
) -> dict[str, list[float]]:
  """Round-robin timing: per round, each variant runs `inner` times, then blocks.

  `fns[name]()` runs one step (dispatch) and returns something to block on. The order of the
  variants is shuffled every round (seeded), so no variant always runs first or always right
  after the same (e.g. a memory-hungry) variant. Returns {name: [seconds per step, one per
  round]}. `warmup` untimed rounds come first.
  """
  import random

  rng = random.Random(seed)
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(-warmup, rounds):
    order = names[:]
    rng.shuffle(order)
    for name in order:
      fn = fns[name]
      t0 = time.perf_counter()
      out = None
      for _ in range(inner):
        out = fn()
      blocker(out)
      dt = (time.perf_counter() - t0) / inner
      if r >= 0:
        times[name].append(dt)
    if log and r >= 0:
      log(
        f"  round {r + 1}/{rounds}: " + ", ".join(f"{n}={times[n][-1] * 1e3:.1f}ms" for n in names)
      )
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if len(xs) else float("nan")


def ratios(times: Mapping[str, Sequence[float]], ref: str) -> dict[str, float]:
  """Median over rounds of time[v][r] / time[ref][r]."""
  return {name: median([a / b for a, b in zip(ts, times[ref])]) for name, ts in times.items()}


def ratio_iqr(ts: Sequence[float], ref: Sequence[float]) -> tuple[float, float]:
  """25th and 75th percentile of the per-round ratios (spread, for the JSON)."""
  rs = sorted(a / b for a, b in zip(ts, ref))
  if not rs:
    return float("nan"), float("nan")
  q = statistics.quantiles(rs, n=4, method="inclusive") if len(rs) > 1 else [rs[0]] * 3
  return float(q[0]), float(q[2])


# -------------------------------------------------------------------------------- memory
def max_rss_mb() -> float:
  """Process high-water resident set size in MiB (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb() -> float | None:
  """Peak bytes in use on device 0 in MiB, when the backend reports it (GPU/TPU; not CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def compiled_stats(compiled) -> dict:
  """XLA's static view of one executable: FLOPs, bytes accessed, buffer sizes, op counts."""
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    out["flops"] = float(cost.get("flops", float("nan")))
    out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
  except Exception as e:  # pragma: no cover - backend dependent
    out["cost_analysis_error"] = repr(e)
  try:
    mem = compiled.memory_analysis()
    out["temp_mb"] = mem.temp_size_in_bytes / 2**20
    out["argument_mb"] = mem.argument_size_in_bytes / 2**20
    out["output_mb"] = mem.output_size_in_bytes / 2**20
    out["alias_mb"] = mem.alias_size_in_bytes / 2**20
    out["xla_peak_mb"] = (
      mem.temp_size_in_bytes
      + mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    ) / 2**20
  except Exception as e:  # pragma: no cover
    out["memory_analysis_error"] = repr(e)
  try:
    out["hlo_ops"] = hlo_op_counts(compiled.as_text())
  except Exception as e:  # pragma: no cover
    out["hlo_error"] = repr(e)
  return out


_OP = re.compile(r"(?<![\w\-])([a-z][a-z0-9\-]*)\(")
_KEEP_OPS = (
  "convolution",
  "dot",
  "fusion",
  "custom-call",
  "all-reduce",
  "reduce-window",
  "select-and-scatter",
  "sort",
  "scatter",
  "gather",
  "while",
  "reduce",
)


def hlo_op_counts(text: str) -> dict[str, int]:
  """Counts of the expensive HLO opcodes anywhere in an optimized module (fusion bodies too)."""
  counts = collections.Counter()
  for line in text.splitlines():
    _, eq, rhs = line.partition(" = ")
    m = _OP.search(rhs) if eq else None
    if m:
      counts[m.group(1)] += 1
  return {op: counts.get(op, 0) for op in _KEEP_OPS}


# -------------------------------------------------------------------------------- output
def fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if x != x:
      return "nan"
    return f"{x:.{digits}f}"
  return str(x)


def table(
  rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], digits: int = 3
) -> str:
  """A Markdown table; `columns` = [(key, header)]."""
  head = "| " + " | ".join(h for _, h in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(fmt(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
  return "\n".join([head, sep] + body)


def write_json(path: str | None, obj: Any) -> None:
  """Write a benchmark's figures under the project's JSON policy (divisive_jax.jsonio)."""
  if not path:
    return
  from divisive_jax import jsonio

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  jsonio.write_json(path, obj)
  print(f"wrote {path}")


def default_width(model_name: str) -> int:
  """The zoo's default base width (tiny: 16; the torchvision architectures: 64)."""
  return 16 if model_name == "tiny" else 64


# ------------------------------------------------------------------ configs, states, steps
def bench_config(
  model: str,
  image_size: int,
  batch: int,
  *,
  variant: str = "ce",
  dtype: str = "float32",
  width: int = 0,
  stem: str = "imagenet",
  channels: int = 3,
):
  """A config from `config_base.base()` for one benchmark variant.

  ``variant``: a method of `losses.METHODS`, optionally ``+<cam kind>`` (``difference+gradcam``)
  and ``#<tag>`` (a second copy of the same step, e.g. ``ce#2``). The method is set with
  `config_base.set_method`, so what a method sets beyond the weights (``masked``:
  ``loss.mask_input``) is kept.
  """
  from divisive_jax import config_base

  method, _, kind = variant.split("#")[0].partition("+")
  c = config_base.base()
  c.model.name = model
  c.model.stem = stem
  c.model.width = width or default_width(model)
  c.model.dtype = dtype
  c.data.image_size = image_size
  c.data.channels = channels
  c.batch_size = batch
  config_base.set_method(c, method)
  if kind:
    c.loss.cam_kind = kind
  return c


def train_setup(config, devices=None):
  """`state.build(config)` (schedule lengths 100 / 1000 steps), on a mesh of ``devices``
  (default: all devices, as the trainer)."""
  import dataclasses

  from divisive_jax import sharding, state

  setup = state.build(config, steps_per_epoch=100, total_steps=1000)
  if devices is not None:
    setup = dataclasses.replace(setup, mesh=sharding.make_mesh(list(devices)))
  return setup


def create_state(setup, seed: int = 0):
  """A fresh replicated TrainState (`state.create_state`), computed before returning."""
  from divisive_jax import state

  state0 = state.create_state(setup, seed)
  block(state0)
  return state0


def state_for(state0, setup):
  """A copy of ``state0`` (steps donate their state) carrying ``setup``'s loss weights, as a
  resumed run sets them: one initialisation serves every loss variant of a model."""
  import jax

  from divisive_jax import sharding, state

  copy = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state0)
  weights = jax.device_put(state.loss_weights(setup.loss_cfg), sharding.replicated(setup.mesh))
  return copy.replace(loss_weights=weights)


class Repeat:
  """A feed of one device batch, again and again: the trainer's dispatch without the input path
  (step-only timings)."""

  def __init__(self, batch):
    self.batch = batch

  def __iter__(self):
    return self

  def __next__(self):
    return self.batch

  def close(self) -> None:
    pass


def dispatch_runner(setup, state, source, dispatches: int = 1, compiled=None, **dispatcher_args):
  """The trainer's own dispatch, timed: (run, compiled, compile seconds).

  A `loop.Dispatcher` (what `train.train_and_evaluate` steps with) over ``source`` (`Repeat`, a
  `feed.DevicePrefetch` or a `feed.ResidentData`; ``dispatcher_args``: members, strategy, k_max,
  seeds), compiled ahead for ``state`` (tracing, lowering and compiling are timed; a host feed
  gives one batch to it) unless ``compiled`` (an executable of the same program) is given.
  ``run()`` runs ``dispatches`` dispatches from the next step, as the
  trainer's loop does, and returns the last metrics; the (donated) state lives in
  ``run.box['state']``; ``run.dispatcher`` is the dispatcher (its ``source`` may be replaced
  between calls)."""
  from divisive_jax import loop

  dispatcher = loop.Dispatcher(setup, source, **dispatcher_args)
  t0 = time.perf_counter()
  if compiled is None:
    compiled = dispatcher.compile(state)
  dispatcher.fn = compiled
  compile_s = time.perf_counter() - t0
  box = {"state": state, "step": 0}

  def run():
    metrics = None
    for _ in range(dispatches):
      box["state"], k, metrics = dispatcher(box["state"], box["step"])
      box["step"] += k
    return metrics

  run.box, run.dispatcher = box, dispatcher
  return run, compiled, compile_s


def synthetic_batch(n: int, size: int, channels: int = 3, seed: int = 0) -> dict:
  """`uint8_batch` as float32 in [0, 1] (images and maps), for code that feeds floats."""
  import numpy as np

  batch = uint8_batch(n, size, channels, seed)
  for key in ("image", "saliency"):
    batch[key] = batch[key].astype(np.float32) / np.float32(255)
  return batch


def uint8_batch(n: int, size: int, channels: int = 3, seed: int = 0) -> dict:
  """A random host batch as the data layer delivers it: uint8 images (n, H, W, C), one
  Gaussian-blob uint8 human map per example, balanced int32 labels, every example with a map,
  ``valid`` ones (`pipeline.train_batches` adds it)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  cy, cx = rng.uniform(0.25 * size, 0.75 * size, (2, n, 1, 1)).astype(np.float32)
  sigma = np.float32(0.15 * size)
  sal = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
  return {
    "image": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
    "label": (np.arange(n) % 2).astype(np.int32),
    "saliency": np.round(255 * sal).astype(np.uint8),
    "has_saliency": np.ones(n, np.float32),
    "attack_type": np.full(n, -1, np.int32),
    "valid": np.ones(n, np.float32),
  }


def is_oom(error: BaseException) -> bool:
  """True for an accelerator out-of-memory error (XLA's RESOURCE_EXHAUSTED, torch's OOM)."""
  text = f"{type(error).__name__}: {error}"
  return any(
    s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory")
  )
