r"""Input-pipeline throughput: CSV-protocol preparation and `train_batches` examples/second.

Builds a CSV-protocol data set of N random RGB images with human maps (in a temporary folder,
or --dir), prepares it through `load_splits` (timed; a second call times the cache hit), then
times `train_batches` with and without augmentation for each --threads value: after --warmup
batches, --repeats runs of --steps batches each; the table shows the median (and min-max)
examples/second. The single-thread random-access read rate of the source is the reference
(decoding cost without batching). No device work: this is the rate the host can feed.

  python benchmarks/loader.py [--n 512] [--size 224] [--batch 32] [--json loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import ml_collections
import numpy as np
import PIL.Image

from divisive_jax.data import load_splits, pipeline


def write_dataset(root: str, n: int, size: int, seed: int = 0) -> str:
  """N smooth-plus-noise RGB PNGs (live/, print/) with grayscale maps; returns the CSV path."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "maps"), exist_ok=True)
  rows = []
  for i in range(n):
    kind = ("live", "print")[i % 2]
    split = "train" if i < 0.8 * n else "val" if i < 0.9 * n else "test"
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    image = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BILINEAR))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    path = f"{kind}/{i:05d}.png"
    os.makedirs(os.path.join(root, "images", kind), exist_ok=True)
    PIL.Image.fromarray(image).save(os.path.join(root, "images", path), compress_level=1)
    yy, xx = np.mgrid[0:size, 0:size] / size - rng.uniform(0.3, 0.7, (2, 1, 1))
    saliency = np.exp(-(yy**2 + xx**2) / 0.05) * 255
    PIL.Image.fromarray(saliency.astype(np.uint8)).save(os.path.join(root, "maps", f"{i:05d}.png"))
    rows.append(f"{split},{('Live', 'Spoof')[i % 2]},{path}" + (",printout" if i % 2 else ","))
  csv_path = os.path.join(root, "protocol.csv")
  with open(csv_path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return csv_path


def rate(run, examples: int, warmup, repeats: int) -> list[float]:
  warmup()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return [examples / t for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=512)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--dir", default="", help="data folder (default: a temporary one)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=16, help="batches per timed repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2, help="batches before timing")
  parser.add_argument(
    "--threads",
    default=f"1,{pipeline._DEFAULT_THREADS}",
    help="comma-separated read-thread counts to time",
  )
  parser.add_argument("--crop", type=int, default=16, help="crop pixels when augmenting")
  parser.add_argument("--json", default="", help="write the figures here")
  args = parser.parse_args()

  root = args.dir or tempfile.mkdtemp(prefix="loader_bench_")
  start = time.perf_counter()
  csv_path = write_dataset(root, args.n, args.size)
  write_seconds = time.perf_counter() - start
  config = ml_collections.ConfigDict(
    dict(
      csv_path=csv_path,
      image_dir=os.path.join(root, "images"),
      map_dir=os.path.join(root, "maps"),
      image_size=args.size,
      channels=3,
      attack_type_from="column",
      data_dir=os.path.join(root, "prepared"),
    )
  )
  start = time.perf_counter()
  splits = load_splits(config, root)
  load_seconds = time.perf_counter() - start
  start = time.perf_counter()
  load_splits(config, root)
  cached_seconds = time.perf_counter() - start
  source = splits.train

  order = np.random.default_rng(0).permutation(len(source))
  examples = args.steps * args.batch
  read = lambda: [source[i] for i in order[:examples]]
  results = {"source read (1 thread, no batching)": rate(read, examples, read, args.repeats)}
  for threads in sorted({int(t) for t in args.threads.split(",")}):
    for augment in (False, True):
      batches = pipeline.train_batches(
        source,
        args.batch,
        seed=0,
        flip=augment,
        crop=args.crop if augment else 0,
        num_threads=threads,
      )
      take = lambda n: [next(batches) for _ in range(n)]
      name = (
        f"train_batches, {threads} thread{'s' * (threads > 1)}, "
        f"{f'flip + crop {args.crop}' if augment else 'no augmentation'}"
      )
      results[name] = rate(
        lambda: take(args.steps), examples, lambda: take(args.warmup), args.repeats
      )
      batches.close()

  print(
    f"\n{args.n} images {args.size}x{args.size} RGB + maps; "
    f"{len(source)} train examples, batch {args.batch}, {os.cpu_count()} CPUs"
  )
  print(
    f"write PNGs {write_seconds:.1f} s | prepare (load_splits, first call) "
    f"{load_seconds:.2f} s = {args.n / load_seconds:.0f} examples/s | "
    f"load when cached {cached_seconds:.3f} s"
  )
  width = max(map(len, results))
  print(f"{'':{width}}  examples/s median (min-max over {args.repeats} repeats)")
  for name, values in results.items():
    print(f"{name:{width}}  {statistics.median(values):8.0f} ({min(values):.0f}-{max(values):.0f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "n": args.n,
          "size": args.size,
          "batch": args.batch,
          "cpus": os.cpu_count(),
          "machine": platform.platform(),
          "write_seconds": write_seconds,
          "prepare_seconds": load_seconds,
          "cached_load_seconds": cached_seconds,
          "examples_per_second": {
            k: {"median": statistics.median(v), "all": v} for k, v in results.items()
          },
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  main()
