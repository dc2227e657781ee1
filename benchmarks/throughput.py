r"""Training throughput in one run: the input path alone, the train step alone, end-to-end.

    python benchmarks/throughput.py --model resnet18 --image_size 224 --batch 64 --json OUT.json
    python benchmarks/throughput.py --model tiny --width 8 --stem small --image_size 32 \
        --batch 8 --n_images 64 --rounds 2 --json /tmp/throughput_smoke.json

A CSV-protocol data set of ``--n_images`` random RGB images with human maps (PNG files, 80% of
them in the train split) is written to a temporary folder (or ``--dir``; an existing one is
reused) and prepared once through `data.load_splits` (the tfds builder: decoded uint8 arrays).
Then, compiled first and timed INTERLEAVED (every round runs each variant once, in a shuffled
order; the figures are medians over ``--rounds`` rounds after one warm-up round):

* (a) ``input``: the input path alone: `pipeline.train_batches` host batches (uint8 images and
  maps, read by its background thread), ``--input_batches`` of them per round;
* (b) ``step``: the train step alone, ``--steps_per_round`` steps on one batch of the prepared
  set already on the device, through the trainer's own dispatch (`loop.Dispatcher`, the step
  `step.make_train_step` builds for a `config_base.base()` config with ``--method`` set by
  `config_base.set_method`; `state.build` + `state.create_state`), uint8 -> float on the device;
* (c) ``end_to_end``: the same dispatch on the trainer's host feed (`feed.host_batches`:
  ``train_batches`` -> `feed.DevicePrefetch`, ``config.data.prefetch`` batches ahead);
* (d) ``resident`` (``--resident_k`` > 0 and the split fits: a quarter of the device memory,
  2 GiB on CPU): the same dispatch on `feed.ResidentData`, k steps per dispatch
  (`step.make_train_step(resident=True)`), as ``config.data.on_device`` / ``config.steps_per_dispatch`` train.

Each round builds a FRESH input pipeline for (a) and (c) (from the next unseen step), so a
variant never starts a round with batches its background thread read while the others ran; the
pipeline's fill (one batch read and transferred) is inside each round: a slightly pessimistic
figure. Written to ``--json``: ``input_examples_per_s``, ``step_examples_per_s``,
``end_to_end_examples_per_s`` (medians over rounds), ``end_to_end_over_step`` (the median of
per-round (c)/(b) ratios), ``resident_*`` for (d), per-round figures, the data preparation
times, the machine, and the floor checks (on this project's 2-core CPU: the input path reads
>= 3,000 examples/s of 224 px RGB with maps; end-to-end runs at >= 0.9 of step-only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

INPUT_FLOOR = 3000.0  # examples/s; 224 px RGB + maps (the lead's data layer: ~5,600/s quiet)
END_TO_END_FLOOR = 0.9  # end-to-end / step-only
FLOOR_IMAGE = (224, 3)  # the input floor is defined at this (image size, channels)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="resnet18", help="resnet18, resnet50, densenet121, tiny")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64, help="global batch size")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--method", default="difference", help="a method of losses.METHODS")
  p.add_argument("--width", type=int, default=0, help="0: the model's default width")
  p.add_argument("--stem", default="imagenet", choices=("imagenet", "small"))
  p.add_argument("--platform", default="", help="cpu, gpu, tpu; '': JAX's default backend")
  p.add_argument("--n_images", type=int, default=512, help="images in the CSV set (80%% train)")
  p.add_argument("--dir", default="", help="data folder (default: a temporary one; reused)")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps_per_round", type=int, default=2, help="train steps per round")
  p.add_argument("--input_batches", type=int, default=16, help="(a): batches per round")
  p.add_argument("--prefetch", type=int, default=0, help="DevicePrefetch size; 0: the config's")
  p.add_argument("--resident_k", type=int, default=2, help="(d) steps per dispatch; 0: off")
  p.add_argument("--json", default="")
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------- data
def write_dataset(root: str, n: int, size: int, seed: int = 0) -> str:
  """N smooth-plus-noise RGB PNGs (images/live, images/print) with grayscale Gaussian-blob maps
  (maps/) and the CSV protocol (split,class,path,attack type); returns the CSV path. Files are
  written by a thread pool (PIL encodes without the GIL)."""
  import numpy as np
  import PIL.Image

  for sub in ("images/live", "images/print", "maps"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)

  def one(i):
    rng = np.random.default_rng([seed, i])
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    image = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BILINEAR))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    path = f"{('live', 'print')[i % 2]}/{i:05d}.png"
    PIL.Image.fromarray(image).save(os.path.join(root, "images", path), compress_level=1)
    yy, xx = np.mgrid[0:size, 0:size] / size - rng.uniform(0.3, 0.7, (2, 1, 1))
    saliency = (np.exp(-(yy**2 + xx**2) / 0.05) * 255).astype(np.uint8)
    PIL.Image.fromarray(saliency).save(os.path.join(root, "maps", f"{i:05d}.png"))
    split = "train" if i < 0.8 * n else "val" if i < 0.9 * n else "test"
    return f"{split},{('Live', 'Spoof')[i % 2]},{path}" + (",printout" if i % 2 else ",")

  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    rows = list(pool.map(one, range(n)))
  csv_path = os.path.join(root, "protocol.csv")
  with open(csv_path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return csv_path


def use_csv_data(config, root: str, csv_path: str) -> None:
  """Point ``config.data`` at the CSV set written by `write_dataset` (prepared under root)."""
  config.data.csv_path = csv_path
  config.data.image_dir = os.path.join(root, "images")
  config.data.map_dir = os.path.join(root, "maps")
  config.data.attack_type_from = "column"
  config.data.data_dir = os.path.join(root, "prepared")


def prepared_data(config, root: str, n: int) -> tuple:
  """(splits, timings): the CSV set under ``root`` (written unless there), prepared through
  `data.load_splits` (a cache hit when already prepared)."""
  from divisive_jax import data, writers

  writers.quiet_library_logs()  # no tfds progress bars
  csv_path = os.path.join(root, "protocol.csv")
  t0 = time.perf_counter()
  if not os.path.exists(csv_path):
    csv_path = write_dataset(root, n, int(config.data.image_size))
  write_s = time.perf_counter() - t0
  use_csv_data(config, root, csv_path)
  t0 = time.perf_counter()
  splits = data.load_splits(config.data, root)
  timings = {
    "write_s": write_s,
    "load_splits_s": time.perf_counter() - t0,
    "prepared_now": bool(splits.info.get("prepared_now")),
    "n_train": len(splits.train),
    "stored_channels": int(splits.train.channels),
  }
  return splits, timings


def fits_on_device(source, fraction: float = 0.25, cpu_bytes: int = 2 << 30) -> bool:
  """Whether ``source`` (uint8 images and maps) fits in ``fraction`` of the device memory."""
  size = int(source.read([0])["image"].shape[1])
  nbytes = len(source) * size * size * (int(source.channels) + 1)
  limit = common.device_memory_bytes()
  return nbytes <= (fraction * limit if limit else cpu_bytes)


# ---------------------------------------------------------------------------------- runners
def input_runner(source, batch: int, n_batches: int, seed: int = 0):
  """(a): ``n_batches`` host batches from a fresh `pipeline.train_batches` (next steps)."""
  from divisive_jax.data import pipeline

  pos = {"step": 0}

  def run():
    batches = pipeline.train_batches(source, batch, seed=seed, start_step=pos["step"])
    try:
      for _ in range(n_batches):
        next(batches)
    finally:
      batches.close()
    pos["step"] += n_batches
    return None

  return run


def end_to_end_runner(setup, state, source, steps: int, compiled=None):
  """(c): the trainer's dispatch on the trainer's host feed (`feed.host_batches`:
  ``train_batches`` -> `feed.DevicePrefetch`, ``config.data.prefetch`` batches ahead), ``steps``
  steps, a fresh feed per call (from the next steps); ``compiled``: the step-only runner's
  executable (else compiled here)."""
  from divisive_jax import feed

  first = feed.host_batches(setup.config, source, setup.mesh, 0)
  run, _, _ = common.dispatch_runner(setup, state, first, steps, compiled)
  first.close()
  box = run.box

  def fresh():
    run.dispatcher.source = feed.host_batches(setup.config, source, setup.mesh, box["step"])
    try:
      return run()
    finally:
      run.dispatcher.source.close()

  fresh.box = box
  return fresh


def resident_runner(setup, state, source, batch: int, k: int, steps: int, log=print):
  """(d): the trainer's dispatch on `feed.ResidentData` with k steps per dispatch
  (`step.make_train_step(resident=True)`), ``steps`` steps (compiled here). Returns (run, compile seconds,
  steps per call)."""
  from divisive_jax import feed

  resident = feed.ResidentData(source, setup.mesh, batch, seed=0)
  dispatches = max(1, steps // k)
  run, _, compile_s = common.dispatch_runner(setup, state, resident, dispatches, k_max=k)
  log(f"compiled resident ({k} steps per dispatch) in {compile_s:.1f}s")
  run.resident = resident
  return run, compile_s, dispatches * k


def rates(times, examples: dict) -> dict:
  """{variant: [examples/s per round]} from `common.interleaved` times (seconds per call)."""
  return {name: [examples[name] / t for t in ts] for name, ts in times.items()}


def floor_checks(summary: dict, image_size: int, channels: int) -> list[dict]:
  checks = []
  applies = (image_size, channels) == FLOOR_IMAGE
  value = summary["input_examples_per_s"]
  checks.append(
    {
      "name": "input_examples_per_s",
      "value": value,
      "floor": INPUT_FLOOR,
      "applies": applies,
      "ok": (value >= INPUT_FLOOR) if applies else None,
      "note": "224 px RGB with maps" if applies else f"defined at 224 px RGB, not {image_size} px",
    }
  )
  value = summary["end_to_end_over_step"]
  checks.append(
    {
      "name": "end_to_end_over_step",
      "value": value,
      "floor": END_TO_END_FLOOR,
      "applies": True,
      "ok": value >= END_TO_END_FLOOR,
      "note": "end-to-end / step-only, median of per-round ratios",
    }
  )
  return checks


def print_floors(checks: list[dict]) -> None:
  for c in checks:
    verdict = "n/a" if c["ok"] is None else ("MET" if c["ok"] else "NOT MET")
    print(f"floor {c['name']} >= {c['floor']:g} ({c['note']}): {c['value']:.3f} -> {verdict}")


# ------------------------------------------------------------------------------------- main
def main(argv=None):
  args = parse_args(argv)
  common.use_platform(args.platform, 1)
  import jax  # noqa: F401  (the backend starts here, before machine_info)

  from divisive_jax import sharding
  from divisive_jax.data import pipeline

  info = common.machine_info()
  print(
    f"machine: {info.get('Model name', '?')}, {info['nproc']} CPUs; jax {info.get('jax')} on "
    f"{info.get('backend')} ({info.get('device_kind')}); load {info.get('loadavg_at_start')}"
  )
  config = common.bench_config(
    args.model,
    args.image_size,
    args.batch,
    variant=args.method,
    dtype=args.dtype,
    width=args.width,
    stem=args.stem,
  )
  if args.prefetch:
    config.data.prefetch = args.prefetch
  root = args.dir or tempfile.mkdtemp(prefix="throughput_bench_")
  splits, data_timings = prepared_data(config, root, args.n_images)
  source = splits.train
  print(
    f"data: {args.n_images} images {args.image_size} px in {root}: written in "
    f"{data_timings['write_s']:.1f}s, load_splits {data_timings['load_splits_s']:.1f}s "
    f"({'prepared now' if data_timings['prepared_now'] else 'cached'}); "
    f"{len(source)} train examples"
  )

  setup = common.train_setup(config)
  first = pipeline.train_batches(source, args.batch, seed=1)
  resident_batch = sharding.to_global(next(first), setup.mesh)  # (b)'s batch, on the device
  first.close()
  state0 = common.create_state(setup)
  steps, b = args.steps_per_round, args.batch
  step_run, compiled, compile_s = common.dispatch_runner(
    setup, common.state_for(state0, setup), common.Repeat(resident_batch), steps
  )
  print(f"compiled the {args.method} train step in {compile_s:.1f}s")
  fns = {
    "input": input_runner(source, b, args.input_batches),
    "step": step_run,
    "end_to_end": end_to_end_runner(
      setup, common.state_for(state0, setup), source, steps, compiled
    ),
  }
  examples = {"input": args.input_batches * b, "step": steps * b, "end_to_end": steps * b}
  resident_note = "off (--resident_k 0)"
  resident_compile_s = None
  if args.resident_k > 0:
    if fits_on_device(source):
      k = min(args.resident_k, steps)
      fns["resident"], resident_compile_s, n = resident_runner(
        setup, common.state_for(state0, setup), source, b, k, steps
      )
      examples["resident"] = n * b
      resident_note = f"{k} steps per dispatch"
    else:
      resident_note = "skipped: the training split does not fit"

  times = common.interleaved(
    fns, rounds=args.rounds, warmup=1, blocker=common.block, log=None if args.quiet else print
  )
  per_round = rates(times, examples)
  summary = {f"{name}_examples_per_s": common.median(r) for name, r in per_round.items()}
  summary["end_to_end_over_step"] = common.median(
    [c / s for c, s in zip(per_round["end_to_end"], per_round["step"])]
  )
  if "resident" in per_round:
    summary["resident_over_step"] = common.median(
      [c / s for c, s in zip(per_round["resident"], per_round["step"])]
    )
  checks = floor_checks(summary, args.image_size, int(source.channels))

  print()
  print(
    f"{args.model} {args.image_size} px, batch {b}, {args.dtype}, method {args.method}; "
    f"{args.rounds} rounds (a: {args.input_batches} batches, b-d: {steps} steps per round); "
    f"prefetch {config.data.prefetch}; resident: {resident_note}"
  )
  rows = [
    {
      "variant": name,
      "examples_per_s": summary[f"{name}_examples_per_s"],
      "min": min(r),
      "max": max(r),
      "over_step": common.median([a / s for a, s in zip(r, per_round["step"])]),
    }
    for name, r in per_round.items()
  ]
  print(
    common.table(
      rows,
      [
        ("variant", "variant"),
        ("examples_per_s", "examples/s (median)"),
        ("min", "min"),
        ("max", "max"),
        ("over_step", "/ step-only (median)"),
      ],
      digits=1,
    )
  )
  print_floors(checks)
  common.write_json(
    args.json,
    {
      "benchmark": "throughput",
      "args": vars(args),
      "machine": info,
      "data": {**data_timings, "n_images": args.n_images, "dir": root},
      "compile_s": compile_s,
      "resident_compile_s": resident_compile_s,
      "resident": resident_note,
      "prefetch": int(config.data.prefetch),
      **summary,
      "examples_per_s_per_round": per_round,
      "floor_checks": checks,
    },
  )
  for run in fns.values():
    if hasattr(run, "resident"):
      run.resident.close()
  return summary


if __name__ == "__main__":
  main()
